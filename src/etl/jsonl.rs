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
use tokio::io::{AsyncBufRead, BufReader};
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

/// The bytes of a bad line kept for its excerpt: enough for
/// [`EXCERPT_CHARS`] characters of up to four bytes each.
const EXCERPT_BYTES: usize = EXCERPT_CHARS * 4;

/// The longest line read by default, in bytes: 16 MiB, the transports'
/// default body cap, since a line often becomes a request body.
const DEFAULT_MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// Stream returned by [`read_jsonl`].
///
/// It is `Send`, `Sync` and `Unpin` whatever `T` is: it holds the file and
/// the bytes of a line, never a `T` between polls.
#[must_use = "streams do nothing unless polled"]
pub struct ReadJsonl<T> {
    path: PathBuf,
    state: ReadState,
    /// The number of the line read last.
    line: u64,
    /// The line being read.
    pending: LineBuf,
    max_line_bytes: usize,
    _item: PhantomData<fn() -> T>,
}

enum ReadState {
    /// Not polled yet: the file is opened on the first poll.
    Start,
    Opening(JoinHandle<io::Result<std::fs::File>>),
    Reading(BufReader<File>),
    /// The end, an error opening the file, or a read error (after which
    /// the reader cannot go on).
    Done,
}

/// The bytes of the line being read, up to the limit. Past it only the
/// start is kept, for the error's excerpt, and the rest is dropped as it
/// is read, up to the next newline.
#[derive(Default)]
struct LineBuf {
    bytes: Vec<u8>,
    too_long: bool,
}

impl LineBuf {
    /// Adds a piece of the line: `max` bytes are allowed, and one more for
    /// the `\r` of a `\r\n` ending, known only when the `\n` comes.
    fn push(&mut self, piece: &[u8], max: usize) {
        if self.too_long {
            return;
        }
        if self.bytes.len() + piece.len() > max.saturating_add(1) {
            self.too_long = true;
            self.bytes.truncate(EXCERPT_BYTES);
            let room = EXCERPT_BYTES - self.bytes.len();
            self.bytes
                .extend_from_slice(&piece[..piece.len().min(room)]);
        } else {
            self.bytes.extend_from_slice(piece);
        }
    }

    /// Whether nothing of a line has been read.
    fn is_empty(&self) -> bool {
        self.bytes.is_empty() && !self.too_long
    }

    /// Ends the line: drops the `\r` of a `\r\n` ending and says whether
    /// the line is longer than `max`.
    fn finish(&mut self, max: usize) -> bool {
        if !self.too_long {
            if self.bytes.last() == Some(&b'\r') {
                self.bytes.pop();
            }
            self.too_long = self.bytes.len() > max;
        }
        self.too_long
    }

    /// Empties it for the next line; what a long line took is given back.
    fn clear(&mut self) {
        self.too_long = false;
        self.bytes.clear();
        if self.bytes.capacity() > READ_BYTES {
            self.bytes = Vec::new();
        }
    }
}

/// The start of a line as text, at most [`EXCERPT_CHARS`] characters, with
/// what is not UTF-8 replaced.
fn excerpt(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(EXCERPT_BYTES)])
        .chars()
        .take(EXCERPT_CHARS)
        .collect()
}

impl<T> ReadJsonl<T> {
    /// Sets the longest line read, in bytes, its line ending not counted
    /// (16 MiB unless set). A longer line is an error item with its line
    /// number and its start, and reading goes on at the next line: no more
    /// than `max` bytes of a line are ever held.
    ///
    /// ```
    /// use futures::StreamExt;
    /// use sluicegate::etl::read_jsonl;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let path = std::env::temp_dir().join(format!("sluicegate-doc-max-{}.jsonl", std::process::id()));
    /// std::fs::write(&path, "1\n[1,2,3,4,5,6,7,8,9]\n3\n").unwrap();
    /// let read: Vec<_> = read_jsonl::<serde_json::Value>(&path)
    ///     .max_line_bytes(8)
    ///     .collect()
    ///     .await;
    /// assert_eq!(read.len(), 3);
    /// assert_eq!(read[1].as_ref().unwrap_err().line(), 2);
    /// assert_eq!(*read[2].as_ref().unwrap(), 3);
    /// # std::fs::remove_file(&path).unwrap();
    /// # }
    /// ```
    pub fn max_line_bytes(mut self, max: usize) -> Self {
        self.max_line_bytes = max;
        self
    }
}

impl<T: DeserializeOwned> ReadJsonl<T> {
    /// Decodes the line just read; `None` for a blank line, which is
    /// skipped.
    fn decode(&mut self) -> Option<Result<T, JsonlError>> {
        self.line += 1;
        let too_long = self.pending.finish(self.max_line_bytes);
        let decoded = self.decode_line(too_long);
        self.pending.clear();
        decoded
    }

    fn decode_line(&self, too_long: bool) -> Option<Result<T, JsonlError>> {
        let bytes = &self.pending.bytes;
        let error = |message: String| JsonlError {
            path: self.path.clone(),
            line: self.line,
            text: Some(excerpt(bytes)),
            source: None,
            message,
        };
        if too_long {
            return Some(Err(error(format!(
                "longer than the limit of {} bytes; skipped to the next line",
                self.max_line_bytes
            ))));
        }
        let text = match std::str::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => return Some(Err(error(format!("not UTF-8: {e}")))),
        };
        if text.trim().is_empty() {
            return None;
        }
        Some(serde_json::from_str::<T>(text).map_err(|e| error(e.to_string())))
    }
}

impl<T> fmt::Debug for ReadJsonl<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadJsonl")
            .field("path", &self.path)
            .field("line", &self.line)
            .field("max_line_bytes", &self.max_line_bytes)
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
                            this.state = ReadState::Reading(reader);
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
                ReadState::Reading(reader) => {
                    let available = match ready!(Pin::new(&mut *reader).poll_fill_buf(cx)) {
                        Ok(available) => available,
                        Err(e) => {
                            this.state = ReadState::Done;
                            return Poll::Ready(Some(Err(JsonlError {
                                path: this.path.clone(),
                                line: this.line + 1,
                                text: None,
                                message: format!("cannot read: {e}"),
                                source: Some(e),
                            })));
                        }
                    };
                    if available.is_empty() {
                        // The end of the file: a last line without its
                        // newline is decoded, then the stream ends.
                        if this.pending.is_empty() {
                            this.state = ReadState::Done;
                            return Poll::Ready(None);
                        }
                    } else {
                        let newline = available.iter().position(|&b| b == b'\n');
                        let end = newline.unwrap_or(available.len());
                        this.pending.push(&available[..end], this.max_line_bytes);
                        let read = newline.map_or(end, |at| at + 1);
                        Pin::new(&mut *reader).consume(read);
                        if newline.is_none() {
                            continue;
                        }
                    }
                    if let Some(item) = this.decode() {
                        return Poll::Ready(Some(item));
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
/// Each bad line is an error item in its place, with its line number and
/// an excerpt, and the lines after it still come: a line that does not
/// decode as a `T`, a line that is not UTF-8, and a line longer than the
/// limit ([`ReadJsonl::max_line_bytes`], 16 MiB by default), which is never
/// held whole. Blank lines are skipped. Lines end in `\n` or `\r\n`; the
/// last may have no ending.
///
/// Two errors end the stream, as its last item: a file that cannot be
/// opened (line 0), and an error reading the file, after which the reader
/// cannot go on. The file is opened on the first poll and read 64 KiB at a
/// time on tokio's blocking pool.
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
        pending: LineBuf::default(),
        max_line_bytes: DEFAULT_MAX_LINE_BYTES,
        _item: PhantomData,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line past the limit is dropped as it comes: only its start stays.
    #[test]
    fn a_line_over_the_limit_is_not_held() {
        let mut line = LineBuf::default();
        for _ in 0..100 {
            line.push(&[b'x'; READ_BYTES], 1000);
        }
        assert!(line.bytes.len() <= EXCERPT_BYTES);
        assert!(
            line.bytes.capacity() <= 2 * READ_BYTES,
            "{}",
            line.bytes.capacity()
        );
        assert!(line.finish(1000));
        line.clear();
        assert!(line.is_empty());

        // The limit is on the line without its ending.
        line.push(b"12345\r", 5);
        assert!(!line.finish(5));
        assert_eq!(line.bytes, b"12345");
    }
}
