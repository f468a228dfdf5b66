//! Writing results: successes to JSONL, failures to a dead-letter file.

use std::any::Any;
use std::fmt;
use std::fs::File;
use std::future::{Future, IntoFuture};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures::stream::Stream;
use pin_project_lite::pin_project;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::blocking::{joined, spawn_blocking};
use super::jsonl::JsonlError;
use crate::body::{Decoded, Element};
use crate::endpoint::Fetched;
use crate::error::{Failure, FetchError, FetchErrorKind};

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

/// A failure a [`Journal`](super::Journal) can commit: it says what it is
/// about, so the journal can key it.
///
/// A failure that carries its item ([`FetchError<T>`], or an error type of
/// your own that implements [`HasItem`]) is about that item. A
/// [`Failure`] is about its item, or has a key fixed with
/// [`Failure::with_key`]. The journal then keys an item by the first-stage
/// item it descends from: itself, when it is one, or what
/// [`Journal::origin_of`](super::Journal::origin_of) says.
pub trait JournalFailure: DeadLetter {
    /// What this failure is about.
    fn failed_about(&self) -> FailedAbout<'_>;
}

/// What a failure is about, for a [`Journal`](super::Journal) to key it
/// ([`JournalFailure`]).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum FailedAbout<'a> {
    /// The failed item, whose type the journal looks up.
    Item {
        /// The item.
        item: &'a dyn Any,
        /// Its type's name, for the error when the journal cannot key it.
        type_name: &'static str,
    },
    /// The key to commit the failure under, as it is.
    Key(&'a str),
}

impl<E> JournalFailure for E
where
    E: DeadLetter + HasItem,
    E::Item: 'static,
{
    fn failed_about(&self) -> FailedAbout<'_> {
        FailedAbout::Item {
            item: self.item(),
            type_name: std::any::type_name::<E::Item>(),
        }
    }
}

impl JournalFailure for Failure {
    fn failed_about(&self) -> FailedAbout<'_> {
        match self.key() {
            Some(key) => FailedAbout::Key(key),
            None => FailedAbout::Item {
                item: self.item_any(),
                type_name: self.item_type(),
            },
        }
    }
}

/// An output that knows the input item it came from, so a
/// [`Journal`](super::Journal) can key it.
///
/// What the fetch and decode stages yield implement it: [`Fetched`],
/// [`Decoded`], [`Element`] (and [`FetchError`] on the error side). Keep
/// them as they are up to the sink: each is written as its value alone.
#[diagnostic::on_unimplemented(
    message = "a journal cannot tell which item `{Self}` came from",
    label = "the `Ok` values of the stream given to `Journal::write_jsonl`",
    note = "give the sink what the last stage yields (a `Decoded`, `Fetched` or `Element`, written as its value alone) instead of mapping it to its value, or implement `sluicegate::etl::HasItem` for `{Self}`"
)]
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

/// Bytes of lines a sink gathers for one file before it hands them to the
/// operating system in one write: a few hundred lines per hop to the
/// blocking pool instead of a system call per line, and a bound on memory
/// (per file, one batch gathering while the previous one is written).
const BATCH_BYTES: usize = 64 * 1024;

/// Future for [`SluiceExt::write_jsonl`](crate::SluiceExt::write_jsonl):
/// `.await` it to run the pipeline to its end.
///
/// The files are created, and written, on tokio's blocking pool, so a slow
/// disk never stalls the runtime. Lines are gathered in memory and handed
/// to the operating system 64 KiB at a time and at the end (not fsynced),
/// while the stream goes on filling the next batch.
///
/// # Errors
///
/// When a file cannot be created or written (the message names the file),
/// or a record cannot be serialized.
///
/// # Panics
///
/// When polled outside a tokio runtime (the writes run on its blocking
/// pool).
///
/// # Cancel safety
///
/// Dropping it stops reading the stream; the lines already taken from it
/// are still written, in the background, as a buffered writer would on
/// drop (errors then go unreported). For a run that must survive being
/// stopped, use a [`Journal`](super::Journal).
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

// No `Send` or `'static` bound on the stream: only files and bytes go to
// the blocking pool, so the future is `Send` exactly when the stream is.
impl<S, V, E> IntoFuture for WriteJsonl<S>
where
    S: Stream<Item = Result<V, E>>,
    V: Serialize,
    E: DeadLetter,
{
    type Output = io::Result<Report>;
    type IntoFuture = WriteJsonlFuture<S>;

    fn into_future(self) -> Self::IntoFuture {
        WriteJsonlFuture {
            stream: self.stream,
            state: SinkState::Start,
            gathering: Lines::default(),
            spare: Lines::default(),
            ended: false,
            started: None,
            report: Report {
                ok: 0,
                failed: 0,
                skipped: 0,
                elapsed: Duration::ZERO,
                output: self.output,
                dead_letters: self.dead_letters,
            },
        }
    }
}

pin_project! {
    /// The running [`WriteJsonl`] sink, what `.await` on it polls; see
    /// [`WriteJsonl`] for its errors, panics and cancel safety.
    #[must_use = "futures do nothing unless polled"]
    pub struct WriteJsonlFuture<S> {
        #[pin]
        stream: S,
        state: SinkState,
        // Lines taken from the stream and not yet handed to a write.
        gathering: Lines,
        // The buffers of the last finished write, reused for the next batch.
        spare: Lines,
        ended: bool,
        started: Option<Instant>,
        report: Report,
    }

    impl<S> PinnedDrop for WriteJsonlFuture<S> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            let lines = std::mem::take(this.gathering);
            let state = std::mem::replace(this.state, SinkState::Done);
            if !lines.is_empty() {
                write_detached(state, lines);
            }
        }
    }
}

impl<S> fmt::Debug for WriteJsonlFuture<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteJsonlFuture")
            .field("output", &self.report.output)
            .field("dead_letters", &self.report.dead_letters)
            .field("ok", &self.report.ok)
            .field("failed", &self.report.failed)
            .finish_non_exhaustive()
    }
}

/// Where a [`WriteJsonlFuture`]'s files are.
enum SinkState {
    /// Not polled yet: nothing created.
    Start,
    /// Being created on the blocking pool.
    Opening(JoinHandle<io::Result<SinkFiles>>),
    /// Ready for the next batch.
    Idle(SinkFiles),
    /// A batch is being written on the blocking pool.
    Writing(JoinHandle<Written>),
    /// The report was returned (or the future dropped).
    Done,
}

/// A finished write hands back the files and the buffers, for reuse.
type Written = (SinkFiles, Lines, io::Result<()>);

/// The output and dead-letter files, with their paths for error messages.
struct SinkFiles {
    ok: File,
    failed: File,
    output: PathBuf,
    dead_letters: PathBuf,
}

impl SinkFiles {
    /// Creates (or empties) both files; blocking.
    fn create(output: PathBuf, dead_letters: PathBuf) -> io::Result<Self> {
        let ok = File::create(&output).map_err(|e| in_file(e, "output", &output))?;
        let failed =
            File::create(&dead_letters).map_err(|e| in_file(e, "dead letters", &dead_letters))?;
        Ok(Self {
            ok,
            failed,
            output,
            dead_letters,
        })
    }

    /// Hands one batch to the operating system; blocking.
    fn write(&mut self, lines: &Lines) -> io::Result<()> {
        if !lines.ok.is_empty() {
            self.ok
                .write_all(&lines.ok)
                .map_err(|e| in_file(e, "output", &self.output))?;
        }
        if !lines.failed.is_empty() {
            self.failed
                .write_all(&lines.failed)
                .map_err(|e| in_file(e, "dead letters", &self.dead_letters))?;
        }
        Ok(())
    }
}

/// JSON lines gathered for one write to each file.
#[derive(Default)]
struct Lines {
    ok: Vec<u8>,
    failed: Vec<u8>,
}

impl Lines {
    fn is_empty(&self) -> bool {
        self.ok.is_empty() && self.failed.is_empty()
    }

    /// Whether either file's batch is big enough to write.
    fn is_full(&self) -> bool {
        self.ok.len() >= BATCH_BYTES || self.failed.len() >= BATCH_BYTES
    }

    fn clear(&mut self) {
        self.ok.clear();
        self.failed.clear();
    }
}

impl<S, V, E> Future for WriteJsonlFuture<S>
where
    S: Stream<Item = Result<V, E>>,
    V: Serialize,
    E: DeadLetter,
{
    type Output = io::Result<Report>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let started = *this.started.get_or_insert_with(Instant::now);
        loop {
            let idle = match this.state {
                SinkState::Start => {
                    let output = this.report.output.clone();
                    let dead_letters = this.report.dead_letters.clone();
                    *this.state = SinkState::Opening(spawn_blocking(move || {
                        SinkFiles::create(output, dead_letters)
                    }));
                    continue;
                }
                // Nothing is taken from the stream before both files exist:
                // a sink that cannot write consumes nothing.
                SinkState::Opening(opening) => {
                    let opened = ready!(Pin::new(opening).poll(cx));
                    *this.state = SinkState::Done; // a finished task is not polled again
                    *this.state = SinkState::Idle(joined(opened)??);
                    continue;
                }
                SinkState::Writing(writing) => match Pin::new(writing).poll(cx) {
                    Poll::Ready(written) => {
                        *this.state = SinkState::Done;
                        let (files, mut lines, result) = joined(written)?;
                        *this.state = SinkState::Idle(files);
                        result?;
                        lines.clear();
                        *this.spare = lines;
                        continue;
                    }
                    Poll::Pending => false,
                },
                SinkState::Idle(_) => true,
                SinkState::Done => panic!("WriteJsonlFuture polled after it completed"),
            };
            let full = this.gathering.is_full();
            if idle && (full || (*this.ended && !this.gathering.is_empty())) {
                let SinkState::Idle(mut files) = std::mem::replace(this.state, SinkState::Done)
                else {
                    unreachable!("checked idle above")
                };
                let lines = std::mem::replace(this.gathering, std::mem::take(this.spare));
                *this.state = SinkState::Writing(spawn_blocking(move || {
                    let result = files.write(&lines);
                    (files, lines, result)
                }));
                continue;
            }
            if *this.ended {
                if !idle {
                    return Poll::Pending; // the last write is in flight
                }
                *this.state = SinkState::Done;
                this.report.elapsed = started.elapsed();
                return Poll::Ready(Ok(this.report.clone()));
            }
            if full {
                return Poll::Pending; // until the write in flight frees the files
            }
            match ready!(this.stream.as_mut().poll_next(cx)) {
                Some(Ok(value)) => {
                    encode_into(&mut this.gathering.ok, &value)?;
                    this.report.ok += 1;
                }
                Some(Err(failure)) => {
                    encode_into(&mut this.gathering.failed, &failure.dead_letter())?;
                    this.report.failed += 1;
                }
                None => *this.ended = true,
            }
        }
    }
}

/// Writes what a dropped sink had gathered, after any write in flight, off
/// the caller's thread: on the runtime's blocking pool, or right here when
/// no runtime is running (then blocking is harmless). Errors have nowhere
/// to go and are dropped, as a buffered writer's are when it is dropped.
fn write_detached(state: SinkState, lines: Lines) {
    let finish = move |mut files: SinkFiles| {
        let _ = files.write(&lines);
    };
    let runtime = tokio::runtime::Handle::try_current();
    match (state, runtime) {
        (SinkState::Idle(files), Ok(_)) => drop(spawn_blocking(move || finish(files))),
        (SinkState::Idle(files), Err(_)) => finish(files),
        (SinkState::Writing(writing), Ok(runtime)) => drop(runtime.spawn(async move {
            if let Ok((files, _, Ok(()))) = writing.await {
                drop(spawn_blocking(move || finish(files)));
            }
        })),
        // Lines are gathered only once the files exist, and a write in
        // flight cannot be awaited without a runtime.
        _ => {}
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

/// Appends one JSON line to `lines`; a value that fails to serialize
/// leaves no partial line behind.
fn encode_into(lines: &mut Vec<u8>, value: &impl Serialize) -> io::Result<()> {
    let before = lines.len();
    encode(lines, value).inspect_err(|_| lines.truncate(before))
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
