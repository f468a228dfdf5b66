//! Reading JSONL: one JSON value per line.

use std::fmt;
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures::stream::{FusedStream, Stream};
use serde::de::DeserializeOwned;
use tokio::fs::File;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::task::JoinHandle;

use super::blocking::{joined, spawn_blocking};

/// How much of a bad line an error keeps.
const EXCERPT_CHARS: usize = 200;

/// A line of a JSONL file that could not be read or decoded.
#[derive(Debug)]
pub struct JsonlError {
    path: PathBuf,
    line: u64,
    text: Option<String>,
    source: Option<io::Error>,
    message: String,
}

impl JsonlError {
    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The 1-based line number (0 when the file could not be opened).
    pub fn line(&self) -> u64 {
        self.line
    }

    /// The start of the offending line, if it could be read.
    pub fn text(&self) -> Option<&str> {
        self.text.as_deref()
    }
}

impl fmt::Display for JsonlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.path.display(), self.message)
        } else {
            write!(
                f,
                "{} line {}: {}",
                self.path.display(),
                self.line,
                self.message
            )
        }
    }
}

/// Where a bad input line was: the item of the [`Failure`](crate::Failure)
/// a [`JsonlError`] becomes, so that the line is dead-lettered (and, in a
/// [`Journal`](super::Journal), keyed) by its place in the file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InputLine {
    /// The file.
    pub path: PathBuf,
    /// The 1-based line number (0 when the file could not be opened).
    pub line: u64,
    /// The start of the line, if it could be read.
    pub text: Option<String>,
}

/// A bad line becomes a [`Failure`](crate::Failure) of kind
/// [`InvalidInput`](crate::FetchErrorKind::InvalidInput) whose item is its
/// [`InputLine`].
impl From<JsonlError> for crate::Failure {
    fn from(error: JsonlError) -> Self {
        let message = error.to_string();
        let line = InputLine {
            path: error.path,
            line: error.line,
            text: error.text,
        };
        let source = error
            .source
            .map(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>);
        crate::Failure::invalid_input(line, message, source)
    }
}

/// A stream read with [`read_jsonl`] feeds a fetch stage directly: each bad
/// line passes through as a [`Failure`](crate::Failure), in its place, to
/// be dead-lettered.
impl<T> crate::StageError<T> for JsonlError
where
    T: serde::Serialize + Send + Sync + 'static,
{
    type Output = crate::Failure;
    fn pass(self) -> crate::Failure {
        self.into()
    }
    fn lift(error: crate::FetchError<T>) -> crate::Failure {
        error.into()
    }
}

impl std::error::Error for JsonlError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Bytes read from the file at a time: each read is one hop to tokio's
/// blocking pool, for hundreds of lines.
const READ_BYTES: usize = 64 * 1024;

/// Stream returned by [`read_jsonl`].
///
/// It is `Send`, `Sync` and `Unpin` whatever `T` is: it holds the file and
/// the text of a line, never a `T` between polls.
#[must_use = "streams do nothing unless polled"]
pub struct ReadJsonl<T> {
    path: PathBuf,
    state: ReadState,
    /// The number of the line read last.
    line: u64,
    _item: PhantomData<fn() -> T>,
}

enum ReadState {
    /// Not polled yet: the file is opened on the first poll.
    Start,
    Opening(JoinHandle<io::Result<std::fs::File>>),
    Reading(Lines<BufReader<File>>),
    /// The end, an error opening the file, or a read error (after which
    /// the reader cannot go on).
    Done,
}

impl<T> fmt::Debug for ReadJsonl<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadJsonl")
            .field("path", &self.path)
            .field("line", &self.line)
            .finish_non_exhaustive()
    }
}

impl<T: DeserializeOwned> Stream for ReadJsonl<T> {
    type Item = Result<T, JsonlError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                ReadState::Start => {
                    let path = this.path.clone();
                    this.state =
                        ReadState::Opening(spawn_blocking(move || std::fs::File::open(path)));
                }
                ReadState::Opening(opening) => {
                    let opened = ready!(Pin::new(opening).poll(cx));
                    this.state = ReadState::Done;
                    match joined(opened).and_then(|opened| opened) {
                        Ok(file) => {
                            let reader = BufReader::with_capacity(READ_BYTES, File::from_std(file));
                            this.state = ReadState::Reading(reader.lines());
                        }
                        Err(e) => {
                            return Poll::Ready(Some(Err(JsonlError {
                                message: format!("cannot open: {e}"),
                                path: this.path.clone(),
                                line: 0,
                                text: None,
                                source: Some(e),
                            })))
                        }
                    }
                }
                ReadState::Reading(lines) => {
                    let next = ready!(Pin::new(lines).poll_next_line(cx));
                    this.line += 1;
                    match next {
                        Ok(None) => {
                            this.state = ReadState::Done;
                            return Poll::Ready(None);
                        }
                        Ok(Some(line)) if line.trim().is_empty() => continue,
                        Ok(Some(line)) => {
                            let item = serde_json::from_str::<T>(&line).map_err(|e| JsonlError {
                                path: this.path.clone(),
                                line: this.line,
                                text: Some(line.chars().take(EXCERPT_CHARS).collect()),
                                source: None,
                                message: e.to_string(),
                            });
                            return Poll::Ready(Some(item));
                        }
                        Err(e) => {
                            this.state = ReadState::Done;
                            return Poll::Ready(Some(Err(JsonlError {
                                path: this.path.clone(),
                                line: this.line,
                                text: None,
                                message: format!("cannot read: {e}"),
                                source: Some(e),
                            })));
                        }
                    }
                }
                ReadState::Done => return Poll::Ready(None),
            }
        }
    }
}

impl<T: DeserializeOwned> FusedStream for ReadJsonl<T> {
    fn is_terminated(&self) -> bool {
        matches!(self.state, ReadState::Done)
    }
}

/// Reads `path` as JSONL: each non-blank line decoded as a `T`.
///
/// A line that does not decode is an error item with its line number and
/// an excerpt; the lines after it still come. A file that cannot be opened
/// is one error item. Blank lines are skipped. The file is opened on the
/// first poll and read 64 KiB at a time on tokio's blocking pool.
///
/// # Panics
///
/// The stream panics when polled outside a tokio runtime.
///
/// ```
/// use futures::StreamExt;
/// use sluicegate::etl::read_jsonl;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let path = std::env::temp_dir().join(format!("sluicegate-doc-{}.jsonl", std::process::id()));
/// std::fs::write(&path, "1\n2\nthree\n4\n").unwrap();
/// let read: Vec<_> = read_jsonl::<u64>(&path).collect().await;
/// assert_eq!(read.len(), 4);
/// assert_eq!(read[2].as_ref().unwrap_err().line(), 3);
/// assert_eq!(*read[3].as_ref().unwrap(), 4);
/// # std::fs::remove_file(&path).unwrap();
/// # }
/// ```
pub fn read_jsonl<T>(path: impl AsRef<Path>) -> ReadJsonl<T>
where
    T: DeserializeOwned,
{
    ReadJsonl {
        path: path.as_ref().to_owned(),
        state: ReadState::Start,
        line: 0,
        _item: PhantomData,
    }
}
