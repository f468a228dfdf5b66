//! Reading JSONL: one JSON value per line.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::stream::{self, BoxStream, Stream, StreamExt as _};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt, BufReader};

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

/// Stream returned by [`read_jsonl`].
#[must_use = "streams do nothing unless polled"]
pub struct ReadJsonl<T> {
    inner: BoxStream<'static, Result<T, JsonlError>>,
}

impl<T> fmt::Debug for ReadJsonl<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadJsonl").finish_non_exhaustive()
    }
}

impl<T> Stream for ReadJsonl<T> {
    type Item = Result<T, JsonlError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}

/// Reads `path` as JSONL: each non-blank line decoded as a `T`.
///
/// A line that does not decode is an error item with its line number and
/// an excerpt; the lines after it still come. A file that cannot be opened
/// is one error item. Blank lines are skipped.
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
    T: DeserializeOwned + Send + 'static,
{
    let path = path.as_ref().to_owned();
    let opened = {
        let path = path.clone();
        async move {
            tokio::fs::File::open(&path)
                .await
                .map(|f| BufReader::new(f).lines())
        }
    };
    let inner = stream::once(opened)
        .flat_map(move |opened| {
            let path = path.clone();
            match opened {
                Err(e) => stream::iter([Err(JsonlError {
                    message: format!("cannot open: {e}"),
                    path,
                    line: 0,
                    text: None,
                    source: Some(e),
                })])
                .boxed(),
                Ok(lines) => stream::unfold(Some((lines, 0u64)), move |state| {
                    let path = path.clone();
                    async move {
                        let (mut lines, mut n) = state?;
                        loop {
                            n += 1;
                            match lines.next_line().await {
                                Ok(None) => return None,
                                Ok(Some(line)) if line.trim().is_empty() => continue,
                                Ok(Some(line)) => {
                                    let item =
                                        serde_json::from_str::<T>(&line).map_err(|e| JsonlError {
                                            path,
                                            line: n,
                                            text: Some(line.chars().take(EXCERPT_CHARS).collect()),
                                            source: None,
                                            message: e.to_string(),
                                        });
                                    return Some((item, Some((lines, n))));
                                }
                                // A read error leaves the reader where it cannot go on.
                                Err(e) => {
                                    let error = JsonlError {
                                        path,
                                        line: n,
                                        text: None,
                                        message: format!("cannot read: {e}"),
                                        source: Some(e),
                                    };
                                    return Some((Err(error), None));
                                }
                            }
                        }
                    }
                })
                .boxed(),
            }
        })
        .boxed();
    ReadJsonl { inner }
}
