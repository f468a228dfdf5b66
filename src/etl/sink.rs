//! Writing results: successes to JSONL, failures to a dead-letter file.

use std::fmt;
use std::fs::File;
use std::future::{Future, IntoFuture};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use futures::stream::{Stream, StreamExt as _};
use serde::Serialize;
use tokio::time::Instant;

use super::jsonl::JsonlError;
use crate::endpoint::Fetched;
use crate::error::{Failure, FetchError, FetchErrorKind};
use crate::ext::{Decoded, Element};

/// A failure that can be written to a dead-letter file: what failed, why,
/// and how hard it was tried.
pub trait DeadLetter {
    /// The record to write, one JSON object per failure.
    fn dead_letter(&self) -> serde_json::Value;
}

/// The dead-letter record of a failed fetch: `{"item", "kind", "status",
/// "attempts", "error"}`; `error` is the error's text, which never holds
/// request headers.
fn fetch_record(
    item: serde_json::Value,
    kind: FetchErrorKind,
    status: Option<http::StatusCode>,
    attempts: u32,
    error: &dyn fmt::Display,
) -> serde_json::Value {
    serde_json::json!({
        "item": item,
        "kind": kind.to_string(),
        "status": status.map(|s| s.as_u16()),
        "attempts": attempts,
        "error": error.to_string(),
    })
}

impl<T: Serialize> DeadLetter for FetchError<T> {
    fn dead_letter(&self) -> serde_json::Value {
        let item = serde_json::to_value(self.item()).unwrap_or(serde_json::Value::Null);
        fetch_record(item, self.kind(), self.status(), self.attempts(), self)
    }
}

impl DeadLetter for Failure {
    fn dead_letter(&self) -> serde_json::Value {
        fetch_record(
            self.item_json().clone(),
            self.kind(),
            self.status(),
            self.attempts(),
            self,
        )
    }
}

impl DeadLetter for JsonlError {
    /// `{"path", "line", "text", "kind", "error"}`.
    fn dead_letter(&self) -> serde_json::Value {
        serde_json::json!({
            "path": self.path(),
            "line": self.line(),
            "text": self.text(),
            "kind": "invalid input",
            "error": self.to_string(),
        })
    }
}

/// A failure a [`Journal<I>`](super::Journal) can commit, under a key.
///
/// A failure that carries its `I` ([`HasItem`]) is keyed as its item is.
/// A [`Failure`] of a multi-stage pipeline is keyed by its item when that
/// is an `I`, and otherwise (the list request failed, or a page) by its
/// item's type and JSON, so it is written once and, with
/// [`Journal::open_retrying_failed`](super::Journal::open_retrying_failed),
/// retried on a re-run like any dead letter.
pub trait JournalFailure<I>: DeadLetter {
    /// The key this failure is committed under, given the journal's key
    /// for items.
    fn journal_key(&self, key: &dyn Fn(&I) -> String) -> String;
}

impl<I, E> JournalFailure<I> for E
where
    E: DeadLetter + HasItem<Item = I>,
{
    fn journal_key(&self, key: &dyn Fn(&I) -> String) -> String {
        key(self.item())
    }
}

impl<I: 'static> JournalFailure<I> for Failure {
    fn journal_key(&self, key: &dyn Fn(&I) -> String) -> String {
        match self.item::<I>() {
            Some(item) => key(item),
            None => format!("{} {}", self.item_type(), self.item_json()),
        }
    }
}

/// An output that knows the input item it came from, so a
/// [`Journal`](super::Journal) can key it.
pub trait HasItem {
    /// The input item's type.
    type Item;
    /// The input item.
    fn item(&self) -> &Self::Item;
}

impl<T> HasItem for Fetched<T> {
    type Item = T;
    fn item(&self) -> &T {
        &self.item
    }
}

impl<T> HasItem for FetchError<T> {
    type Item = T;
    fn item(&self) -> &T {
        FetchError::item(self)
    }
}

impl<T, U> HasItem for Decoded<T, U> {
    type Item = T;
    fn item(&self) -> &T {
        &self.item
    }
}

impl<S, T> HasItem for Element<S, T> {
    type Item = S;
    fn item(&self) -> &S {
        &self.source
    }
}

/// What a sink wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Records written to the output file.
    pub ok: u64,
    /// Records written to the dead-letter file.
    pub failed: u64,
    /// Items a journal skipped because an earlier run had done them.
    pub skipped: u64,
    /// From the first poll of the stream to the last write.
    pub elapsed: Duration,
    /// The output file.
    pub output: PathBuf,
    /// The dead-letter file.
    pub dead_letters: PathBuf,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} items in {:.2?}: {} ok -> {}, {} failed -> {}, {} skipped (done before)",
            self.ok + self.failed + self.skipped,
            self.elapsed,
            self.ok,
            self.output.display(),
            self.failed,
            self.dead_letters.display(),
            self.skipped,
        )
    }
}

/// The dead-letter file beside `output`: `customers.jsonl` →
/// `customers.failed.jsonl`.
pub fn dead_letter_path(output: &Path) -> PathBuf {
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = output.extension().map(|e| e.to_string_lossy().into_owned());
    let name = match ext {
        Some(ext) => format!("{stem}.failed.{ext}"),
        None => format!("{stem}.failed"),
    };
    output.with_file_name(name)
}

/// Future for [`SluiceExt::write_jsonl`](crate::SluiceExt::write_jsonl):
/// `.await` it to run the pipeline to its end.
#[must_use = "futures do nothing unless awaited"]
pub struct WriteJsonl<S> {
    stream: S,
    output: PathBuf,
    dead_letters: PathBuf,
}

impl<S> fmt::Debug for WriteJsonl<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteJsonl")
            .field("output", &self.output)
            .field("dead_letters", &self.dead_letters)
            .finish_non_exhaustive()
    }
}

impl<S> WriteJsonl<S> {
    pub(crate) fn new(stream: S, output: PathBuf) -> Self {
        Self {
            dead_letters: dead_letter_path(&output),
            output,
            stream,
        }
    }

    /// Writes failures to `path` instead of the default beside the output.
    pub fn dead_letters(mut self, path: impl AsRef<Path>) -> Self {
        self.dead_letters = path.as_ref().to_owned();
        self
    }
}

impl<S, V, E> IntoFuture for WriteJsonl<S>
where
    S: Stream<Item = Result<V, E>> + Send + 'static,
    V: Serialize,
    E: DeadLetter,
{
    type Output = io::Result<Report>;
    type IntoFuture = Pin<Box<dyn Future<Output = io::Result<Report>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let started = Instant::now();
            let output = self.output.clone();
            let dead_letters = self.dead_letters.clone();
            let in_output = |e: io::Error| in_file(e, "output", &output);
            let in_dead_letters = |e: io::Error| in_file(e, "dead letters", &dead_letters);
            let mut ok_file = BufWriter::new(File::create(&output).map_err(in_output)?);
            let mut failed_file =
                BufWriter::new(File::create(&dead_letters).map_err(in_dead_letters)?);
            let mut report = Report {
                ok: 0,
                failed: 0,
                skipped: 0,
                elapsed: Duration::ZERO,
                output: self.output,
                dead_letters: self.dead_letters,
            };
            let mut stream = std::pin::pin!(self.stream);
            let mut line = Vec::with_capacity(256);
            while let Some(result) = stream.next().await {
                line.clear();
                match result {
                    Ok(value) => {
                        encode(&mut line, &value)?;
                        ok_file.write_all(&line).map_err(in_output)?;
                        report.ok += 1;
                    }
                    Err(failure) => {
                        encode(&mut line, &failure.dead_letter())?;
                        failed_file.write_all(&line).map_err(in_dead_letters)?;
                        report.failed += 1;
                    }
                }
            }
            ok_file.flush().map_err(in_output)?;
            failed_file.flush().map_err(in_dead_letters)?;
            report.elapsed = started.elapsed();
            Ok(report)
        })
    }
}

/// `error` with the role and path of the file it happened on, so a message
/// says which file to look at; the kind is kept for callers that match on it.
pub(crate) fn in_file(error: io::Error, role: &str, path: &Path) -> io::Error {
    io::Error::new(error.kind(), format!("{role} {}: {error}", path.display()))
}

/// One JSON line, newline included.
pub(crate) fn encode(line: &mut Vec<u8>, value: &impl Serialize) -> io::Result<()> {
    serde_json::to_writer(&mut *line, value).map_err(io::Error::other)?;
    line.push(b'\n');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letters_sit_beside_the_output() {
        assert_eq!(
            dead_letter_path(Path::new("out/customers.jsonl")),
            Path::new("out/customers.failed.jsonl")
        );
        assert_eq!(
            dead_letter_path(Path::new("plain")),
            Path::new("plain.failed")
        );
    }
}
