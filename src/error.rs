//! Error types, one per concern: sending ([`TransportError`]), describing a
//! request or a client ([`BuildError`]), and fetching an item
//! ([`FetchError`], which always carries the item it failed on, and
//! [`Failure`], the same with the item's type erased, for pipelines whose
//! stages have different items). Why an item failed is a
//! [`FetchErrorKind`], whose docs say where each kind comes from.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};

pub(crate) type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What went wrong while sending one request.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportErrorKind {
    /// The connection could not be established (refused, unreachable, DNS).
    Connect,
    /// The connection was reset or closed before the whole response arrived.
    Reset,
    /// The attempt took longer than its timeout. A fetch that ends on it
    /// fails with [`FetchErrorKind::Timeout`], not
    /// [`FetchErrorKind::Transport`]: one form for every timeout.
    Timeout,
    /// The response body was larger than the configured cap; reading stopped
    /// at the cap, so memory stayed bounded.
    BodyTooLarge,
    /// The request could not be sent as described (bad URI, bad header).
    InvalidRequest,
    /// Anything else the transport reported.
    Other,
}

impl fmt::Display for TransportErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Connect => "connect error",
            Self::Reset => "connection reset",
            Self::Timeout => "timed out",
            Self::BodyTooLarge => "body too large",
            Self::InvalidRequest => "invalid request",
            Self::Other => "transport error",
        })
    }
}

/// A request could not be sent or its response could not be read.
///
/// The underlying library error (for example reqwest's), if any, is only
/// reachable through [`source`](StdError::source).
#[derive(Debug)]
pub struct TransportError {
    kind: TransportErrorKind,
    message: String,
    source: Option<BoxError>,
}

impl TransportError {
    /// A new error of `kind` with a human-readable `message`.
    pub fn new(kind: TransportErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// What kind of failure this was.
    pub fn kind(&self) -> TransportErrorKind {
        self.kind
    }

    /// Whether the attempt ran out of time.
    pub fn is_timeout(&self) -> bool {
        self.kind == TransportErrorKind::Timeout
    }

    /// Whether no connection could be made.
    pub fn is_connect(&self) -> bool {
        self.kind == TransportErrorKind::Connect
    }

    /// The message, without the kind.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            write!(f, "{}", self.kind)
        } else {
            write!(f, "{}: {}", self.kind, self.message)
        }
    }
}

impl StdError for TransportError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

/// A client or a request could not be built from what was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildError {
    message: String,
}

impl BuildError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl StdError for BuildError {}

/// Whether a timeout covered one attempt or the whole item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimeoutScope {
    /// One request attempt took longer than the per-attempt timeout.
    Attempt,
    /// All attempts of one item together took longer than the per-item timeout.
    Item,
}

/// Why an item could not be fetched, or never got as far as a fetch.
///
/// One list for every stage, so a dead letter, a report or a `match` reads
/// the same whichever stage failed. Each kind comes from one place:
///
/// | kind | where it comes from | request sent? |
/// | --- | --- | --- |
/// | [`Build`](Self::Build) | the endpoint: the item did not make a valid request | no |
/// | [`Status`](Self::Status) | the server: a final response that is not a success | yes |
/// | [`Transport`](Self::Transport) | the transport: no response (connect, reset, body cap...) | yes |
/// | [`Timeout`](Self::Timeout) | a per-attempt or per-item timeout | yes |
/// | [`Decode`](Self::Decode) | a body that is not the type asked for ([`json`](crate::SluiceExt::json), [`flat_unpack`](crate::SluiceExt::flat_unpack)) | yes |
/// | [`LimiterUnavailable`](Self::LimiterUnavailable) | flow control: a remote budget could not be reached | no |
/// | [`PaginationLoop`](Self::PaginationLoop) | ETL source: [`paginate`](crate::etl::paginate) met a page twice | no (for that page) |
/// | [`InvalidInput`](Self::InvalidInput) | ETL source: a bad input record ([`read_jsonl`](crate::etl::read_jsonl)) | no |
/// | [`Step`](Self::Step) | a [`Step`](crate::Step) (work that is not HTTP) | its own |
///
/// # Was it a timeout?
///
/// Ask [`is_timeout`](Self::is_timeout) (or [`FetchError::is_timeout`],
/// [`Failure::is_timeout`]). A timed-out attempt is always
/// `Timeout(TimeoutScope::Attempt)`, whoever gave up: the endpoint's
/// per-attempt timeout or the transport itself (reqwest's own timeout, a
/// tower timeout layer); the transport's error stays reachable as the
/// error's [`source`](std::error::Error::source). So
/// `Transport(TransportErrorKind::Timeout)` never reaches a `FetchError`.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FetchErrorKind {
    /// The request builder produced a request that cannot be sent (bad
    /// URI, bad header, an absolute URL to another origin); nothing was
    /// sent.
    Build,
    /// The final response had a status that is not a success, and no rule
    /// retried it (or the retries ran out). The response is kept
    /// ([`FetchError::response`]).
    Status(StatusCode),
    /// The final attempt failed in the transport, for a reason other than
    /// time (see [`Timeout`](Self::Timeout)).
    Transport(TransportErrorKind),
    /// A per-attempt or per-item timeout fired, or the transport gave up
    /// waiting: every timeout, in one kind.
    Timeout(TimeoutScope),
    /// The body could not be decoded into the requested type; the detail
    /// holds why and an excerpt of the body. A `204 No Content` decodes as
    /// JSON `null`: into an `Option` as `None`, and into a type that cannot
    /// be absent (a `Vec`, a struct) as this error, whose detail says the
    /// body was empty. An empty body with any other status is this error.
    Decode,
    /// Pagination led back to a page already fetched. From the
    /// [`paginate`](crate::etl::paginate) source.
    PaginationLoop,
    /// A shared budget kept outside the process (such as the Redis limiter,
    /// feature `redis`) could not be reached in time, and it fails closed:
    /// nothing was sent. The reason is the [`source`](std::error::Error::source).
    LimiterUnavailable,
    /// An input record could not be read, such as a bad line of a JSONL
    /// file ([`read_jsonl`](crate::etl::read_jsonl)): nothing was sent.
    InvalidInput,
    /// A [`Step`](crate::Step)'s last attempt failed; its error is the
    /// [`source`](std::error::Error::source).
    Step,
}

impl FetchErrorKind {
    /// Whether time ran out: a per-attempt or per-item timeout, or the
    /// transport's own. The one question to ask; see
    /// [the type's docs](Self#was-it-a-timeout).
    pub fn is_timeout(self) -> bool {
        matches!(
            self,
            Self::Timeout(_) | Self::Transport(TransportErrorKind::Timeout)
        )
    }

    /// `Transport(Timeout)` as `Timeout(Attempt)`, so each timeout has one
    /// form whoever reported it.
    fn normalized(self) -> Self {
        match self {
            Self::Transport(TransportErrorKind::Timeout) => Self::Timeout(TimeoutScope::Attempt),
            kind => kind,
        }
    }
}

impl fmt::Display for FetchErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Build => f.write_str("invalid request"),
            Self::Status(s) => write!(f, "status {s}"),
            Self::Transport(k) => write!(f, "{k}"),
            Self::Timeout(TimeoutScope::Attempt) => f.write_str("attempt timed out"),
            Self::Timeout(TimeoutScope::Item) => f.write_str("item timed out"),
            Self::Decode => f.write_str("undecodable body"),
            Self::PaginationLoop => f.write_str("pagination loop"),
            Self::LimiterUnavailable => f.write_str("rate limiter unavailable"),
            Self::InvalidInput => f.write_str("invalid input"),
            Self::Step => f.write_str("step failed"),
        }
    }
}

/// An item that could not be fetched, handed back with everything known
/// about the failure.
///
/// A pipeline never drops an item: when it fails, this error carries it
/// ([`item`](Self::item), [`into_item`](Self::into_item)), together with the
/// number of attempts made and the last response, if there was one.
///
/// ```
/// use std::time::Duration;
/// use sluicegate::mock::{MockResponse, MockTransport, Route};
/// use sluicegate::retry::Backoff;
/// use sluicegate::{Client, FetchErrorKind, WithPolicy};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let mock = MockTransport::new();
/// mock.mount(Route::get("/items/{id}").respond(MockResponse::status(500).text("boom")));
/// let client = Client::builder().transport(mock).base_url("http://mock").build().unwrap();
///
/// let err = client
///     .get(|id: &u32| format!("/items/{id}"))
///     .retry_on(sluicegate::retry::Matcher::server_errors(), Backoff::constant(Duration::from_secs(1)))
///     .fetch(42)
///     .await
///     .unwrap_err();
/// assert_eq!(err.kind(), FetchErrorKind::Status(http::StatusCode::INTERNAL_SERVER_ERROR));
/// assert_eq!((err.attempts(), err.elapsed()), (3, Duration::from_secs(2)));
/// assert_eq!(err.response().unwrap().body().as_ref(), b"boom");
/// assert_eq!(err.to_string(), "fetch failed: status 500 Internal Server Error after 3 attempts");
/// assert_eq!(err.into_item(), 42); // to queue again, or to write off
/// # }
/// ```
pub struct FetchError<T> {
    item: T,
    kind: FetchErrorKind,
    attempts: u32,
    elapsed: Duration,
    response: Option<Box<Response<Bytes>>>,
    detail: Option<String>,
    source: Option<BoxError>,
}

impl<T> FetchError<T> {
    pub(crate) fn new(item: T, kind: FetchErrorKind) -> Self {
        Self {
            item,
            kind: kind.normalized(),
            attempts: 0,
            elapsed: Duration::ZERO,
            response: None,
            detail: None,
            source: None,
        }
    }

    pub(crate) fn with_attempts(mut self, attempts: u32, elapsed: Duration) -> Self {
        self.attempts = attempts;
        self.elapsed = elapsed;
        self
    }

    pub(crate) fn with_response(mut self, response: Response<Bytes>) -> Self {
        self.response = Some(Box::new(response));
        self
    }

    pub(crate) fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub(crate) fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The input item that failed.
    pub fn item(&self) -> &T {
        &self.item
    }

    /// Takes the input item back, for example to queue it again.
    pub fn into_item(self) -> T {
        self.item
    }

    /// What went wrong.
    pub fn kind(&self) -> FetchErrorKind {
        self.kind
    }

    /// The status of the final response, when the failure was a status.
    pub fn status(&self) -> Option<StatusCode> {
        match self.kind {
            FetchErrorKind::Status(s) => Some(s),
            _ => self.response.as_deref().map(Response::status),
        }
    }

    /// Whether time ran out: a per-attempt or per-item timeout, or the
    /// transport's own ([`FetchErrorKind::is_timeout`]).
    pub fn is_timeout(&self) -> bool {
        self.kind.is_timeout()
    }

    /// How many requests were sent for this item (0 if none could be built,
    /// or if its time ran out before the first went).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Time from the first attempt's start to the failure, pauses included.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// The last response received, if the failure came with one.
    pub fn response(&self) -> Option<&Response<Bytes>> {
        self.response.as_deref()
    }

    /// More text about the failure, such as a decode error and a body excerpt.
    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }

    /// Changes the item type, keeping everything else, e.g. to give the
    /// error a key instead of the whole item.
    pub fn map_item<U>(self, f: impl FnOnce(T) -> U) -> FetchError<U> {
        FetchError {
            item: f(self.item),
            kind: self.kind,
            attempts: self.attempts,
            elapsed: self.elapsed,
            response: self.response,
            detail: self.detail,
            source: self.source,
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for FetchError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FetchError")
            .field("item", &self.item)
            .field("kind", &self.kind)
            .field("attempts", &self.attempts)
            .field("elapsed", &self.elapsed)
            .field("status", &self.response.as_deref().map(Response::status))
            .field("detail", &self.detail)
            .finish()
    }
}

impl<T> fmt::Display for FetchError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fetch failed: {}", self.kind)?;
        if self.attempts > 0 {
            let s = if self.attempts == 1 { "" } else { "s" };
            write!(f, " after {} attempt{s}", self.attempts)?;
        }
        if let Some(detail) = &self.detail {
            write!(f, " ({detail})")?;
        }
        Ok(())
    }
}

impl<T: fmt::Debug> StdError for FetchError<T> {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

/// A failed item of any stage, with its item type erased: what a pipeline
/// of several stages uses as its one error type.
///
/// # Why `Failure` beside `FetchError`
///
/// A stream has one error type. A [`FetchError<T>`] is typed by its
/// stage's item, so where stages with different items meet (ids, then
/// details fetched for them), the errors of both cannot share a stream.
/// `Failure` is a `FetchError` whose item type is erased: the same facts
/// ([`kind`](Self::kind), [`status`](Self::status),
/// [`attempts`](Self::attempts), [`response`](Self::response),
/// [`is_timeout`](Self::is_timeout)...), the item kept as itself and as
/// JSON. Use `FetchError<T>` for one stage and `Failure` where stages
/// meet; nothing is lost between them ([`downcast`](Self::downcast)).
///
/// A stage's [`FetchError<T>`] is typed by that stage's item; when stages
/// with different items are chained with
/// [`try_fetch_concurrent`](crate::SluiceExt::try_fetch_concurrent), every
/// error becomes a `Failure` (no `map_err` needed), and later stages pass
/// them through. The item is kept: as JSON for reports and dead letters,
/// and as itself, so [`downcast`](Self::downcast) gives back the typed
/// `FetchError` of the stage that failed: which stage it was is a matter of
/// types, not of strings.
///
/// ```
/// use futures::{stream, StreamExt, TryStreamExt};
/// use sluicegate::mock::{MockResponse, MockTransport, Route};
/// use sluicegate::{Client, Failure, SluiceExt};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let mock = MockTransport::new();
/// mock.mount(Route::get("/lists/{n}").respond(MockResponse::json(&[1, 2, 404])));
/// mock.mount(Route::get("/items/404").respond(MockResponse::status(404)));
/// mock.mount(Route::get("/items/{id}").respond(MockResponse::ok()));
/// let client = Client::builder().transport(mock).base_url("http://mock").build().unwrap();
///
/// let results: Vec<_> = stream::iter(["a"])
///     .fetch_concurrent(1, client.get(|list: &&str| format!("/lists/{list}")))
///     .flat_unpack::<u64>()
///     .try_fetch_concurrent(4, client.get(|id: &u64| format!("/items/{id}")))
///     .ordered()
///     .collect()
///     .await;
/// let failure = results[2].as_ref().unwrap_err();
/// assert_eq!(failure.item::<u64>(), Some(&404));
/// assert_eq!(failure.status(), Some(http::StatusCode::NOT_FOUND));
/// assert!(failure.is::<u64>() && !failure.is::<&str>()); // an item's fetch, not the list's
/// # }
/// ```
pub struct Failure {
    item: Box<dyn std::any::Any + Send + Sync>,
    item_json: serde_json::Value,
    kind: FetchErrorKind,
    status: Option<StatusCode>,
    attempts: u32,
    // Boxed: a `Failure` is the error side of every item of a chained
    // pipeline, so it stays small; these are read only for reports.
    rest: Box<FailureRest>,
}

struct FailureRest {
    item_type: &'static str,
    elapsed: Duration,
    response: Option<Box<Response<Bytes>>>,
    detail: Option<String>,
    message: String,
    source: Option<BoxError>,
    /// The key a journal commits this failure under, when it was fixed
    /// before the failure reached the sink.
    key: Option<String>,
}

impl Failure {
    /// The failed item, if it is a `T`.
    pub fn item<T: 'static>(&self) -> Option<&T> {
        self.item.downcast_ref()
    }

    /// Whether the failed item is a `T`: which stage failed, for stages
    /// whose items have different types (the list request's `()` or a
    /// page, an item's id...).
    pub fn is<T: 'static>(&self) -> bool {
        self.item.is::<T>()
    }

    /// The typed [`FetchError`] this failure came from, when its item is a
    /// `T`, with everything it held (item, kind, attempts, elapsed time,
    /// last response, detail, source); else the failure itself, unchanged.
    ///
    /// # Errors
    ///
    /// `self`, when the failed item is not a `T`.
    pub fn downcast<T: 'static>(self) -> Result<FetchError<T>, Self> {
        if !self.item.is::<T>() {
            return Err(self);
        }
        let item = *self.item.downcast::<T>().expect("checked type");
        let rest = *self.rest;
        Ok(FetchError {
            item,
            kind: self.kind,
            attempts: self.attempts,
            elapsed: rest.elapsed,
            response: rest.response,
            detail: rest.detail,
            source: rest.source,
        })
    }

    /// The failed item as JSON.
    pub fn item_json(&self) -> &serde_json::Value {
        &self.item_json
    }

    /// The name of the failed item's type, as `std::any::type_name` gives
    /// it: for messages and keys, not for matching on (use
    /// [`is`](Self::is) or [`downcast`](Self::downcast)).
    pub fn item_type(&self) -> &'static str {
        self.rest.item_type
    }

    /// What went wrong.
    pub fn kind(&self) -> FetchErrorKind {
        self.kind
    }

    /// The status of the final response, if there was one.
    pub fn status(&self) -> Option<StatusCode> {
        self.status
    }

    /// Whether time ran out: a per-attempt or per-item timeout, or the
    /// transport's own ([`FetchErrorKind::is_timeout`]).
    pub fn is_timeout(&self) -> bool {
        self.kind.is_timeout()
    }

    /// Requests sent for the item.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Time from the item's first attempt's start to the failure.
    pub fn elapsed(&self) -> Duration {
        self.rest.elapsed
    }

    /// The last response received, if the failure came with one.
    pub fn response(&self) -> Option<&Response<Bytes>> {
        self.rest.response.as_deref()
    }

    /// More text about the failure, such as a decode error and a body excerpt.
    pub fn detail(&self) -> Option<&str> {
        self.rest.detail.as_deref()
    }

    /// Fixes the key a [`Journal`](crate::etl::Journal) commits this
    /// failure under, whatever its item is.
    ///
    /// A journal keys a failure by the first-stage item it descends from
    /// (see [`Journal::origin_of`](crate::etl::Journal::origin_of)); a key
    /// fixed here wins over that. [`Journal::try_skip_done`](crate::etl::Journal::try_skip_done)
    /// fixes the key of every error that passes through it (they come from
    /// before the journal's items exist: the list request, a page, a bad
    /// input line), so those never need one of their own.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.rest.key = Some(key.into());
        self
    }

    /// The key fixed with [`with_key`](Self::with_key), if any.
    pub fn key(&self) -> Option<&str> {
        self.rest.key.as_deref()
    }
}

impl Failure {
    /// The failed item, whatever its type: for a journal to look it up.
    pub(crate) fn item_any(&self) -> &dyn std::any::Any {
        &*self.item
    }

    /// A failure before any request: `item` could not become an input.
    pub(crate) fn invalid_input<T>(item: T, message: String, source: Option<BoxError>) -> Self
    where
        T: serde::Serialize + Send + Sync + 'static,
    {
        Self {
            item_json: serde_json::to_value(&item).unwrap_or(serde_json::Value::Null),
            kind: FetchErrorKind::InvalidInput,
            status: None,
            attempts: 0,
            rest: Box::new(FailureRest {
                item_type: std::any::type_name::<T>(),
                elapsed: Duration::ZERO,
                response: None,
                detail: None,
                message,
                source,
                key: None,
            }),
            item: Box::new(item),
        }
    }
}

impl<T> From<FetchError<T>> for Failure
where
    T: serde::Serialize + Send + Sync + 'static,
{
    fn from(mut error: FetchError<T>) -> Self {
        let message = error.to_string();
        let status = error.status();
        let source = error.source.take();
        Self {
            item_json: serde_json::to_value(&error.item).unwrap_or(serde_json::Value::Null),
            kind: error.kind,
            status,
            attempts: error.attempts,
            rest: Box::new(FailureRest {
                item_type: std::any::type_name::<T>(),
                elapsed: error.elapsed,
                response: error.response.take(),
                detail: error.detail.take(),
                message,
                source,
                key: None,
            }),
            item: Box::new(error.item),
        }
    }
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Failure")
            .field("item", &self.item_json)
            .field("kind", &self.kind)
            .field("status", &self.status)
            .field("attempts", &self.attempts)
            .finish()
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (item {})", self.rest.message, self.item_json)
    }
}

impl StdError for Failure {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.rest
            .source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_has_one_form_whoever_reports_it() {
        let transport =
            FetchError::new(1u32, FetchErrorKind::Transport(TransportErrorKind::Timeout));
        assert_eq!(
            transport.kind(),
            FetchErrorKind::Timeout(TimeoutScope::Attempt)
        );
        assert!(transport.is_timeout());
        let item = FetchError::new(2u32, FetchErrorKind::Timeout(TimeoutScope::Item));
        assert!(item.is_timeout() && Failure::from(item).is_timeout());
        let reset = FetchError::new(3u32, FetchErrorKind::Transport(TransportErrorKind::Reset));
        assert_eq!(
            reset.kind(),
            FetchErrorKind::Transport(TransportErrorKind::Reset)
        );
        assert!(!reset.is_timeout() && !Failure::from(reset).is_timeout());
    }

    #[test]
    fn a_failure_keeps_a_key_given_to_it() {
        let failure = Failure::from(FetchError::new("x", FetchErrorKind::Decode));
        assert_eq!(failure.key(), None);
        let failure = failure.with_key("7");
        assert_eq!(
            (failure.key(), failure.item::<&str>()),
            (Some("7"), Some(&"x"))
        );
    }
}
