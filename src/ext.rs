//! [`SluiceExt`]: the pipeline combinators, on every `Stream`.

use futures::Stream;
use serde::de::DeserializeOwned;

use crate::endpoint::Endpoint;
use crate::error::BoxError;
use crate::etl::WriteJsonl;
use crate::limiter::Limiter;
use crate::step::Step;

pub(crate) mod concurrent;
mod fetch_concurrent;
pub(crate) mod flat_unpack;
pub(crate) mod json;
mod map_concurrent;
#[cfg(feature = "progress")]
mod progress;
mod throttle;

pub use self::concurrent::{Items, Results, StageError, StageInput};
pub use self::fetch_concurrent::FetchConcurrent;
pub use self::flat_unpack::{Element, FlatUnpack};
pub use self::json::{Decoded, FetchResult, Json};
pub use self::map_concurrent::MapConcurrent;
#[cfg(feature = "progress")]
pub use self::progress::{Progress, WithProgress};
pub use self::throttle::Throttle;

/// Pipeline combinators for any [`Stream`].
///
/// Every name here is distinct from `futures::StreamExt` except
/// [`throttle`](Self::throttle), which `tokio_stream::StreamExt` also has.
/// If you import tokio-stream's trait too, call ours fully qualified:
/// `SluiceExt::throttle(stream, rate)`.
pub trait SluiceExt: Stream {
    /// Paces the stream's items at a rate: a [`Rate`](crate::Rate) (a
    /// private budget) or a [`Limiter`](crate::Limiter) (shared with
    /// whatever else holds it).
    ///
    /// Items go as GCRA allows: up to the burst at once, then one per
    /// interval, catching up after a slow upstream up to the burst. The
    /// upstream is polled first and the budget taken only for an item that
    /// exists, so the end of the stream is never delayed. Nothing is
    /// buffered but the one item waiting for its turn.
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::{stream, StreamExt};
    /// use sluicegate::{Rate, SluiceExt};
    /// use tokio::time::Instant;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let t0 = Instant::now();
    /// let times: Vec<_> = stream::iter(0..5)
    ///     .throttle(Rate::per_second(10).burst(2))
    ///     .map(|_| t0.elapsed().as_millis())
    ///     .collect()
    ///     .await;
    /// assert_eq!(times, [0, 0, 100, 200, 300]);
    /// // Ends with the last item, not one interval later.
    /// assert_eq!(t0.elapsed(), Duration::from_millis(300));
    /// # }
    /// ```
    fn throttle(self, limiter: impl Into<Limiter>) -> Throttle<Self>
    where
        Self: Sized,
    {
        Throttle::new(self, limiter.into())
    }

    /// Fetches one request per item, with at most `n` in flight, each
    /// waiting for the client's pause and rate before every attempt.
    ///
    /// Yields `Ok(Fetched { item, response, attempts, elapsed })` or
    /// `Err(FetchError)` carrying the item: exactly one output per input.
    /// Unordered by default (a slow item holds up nobody);
    /// [`ordered`](FetchConcurrent::ordered) keeps input order. Each
    /// admitted item runs on the stage's driver tasks (one per runtime
    /// worker), never on the consumer, so its request, retry
    /// waits, pause waits and rate-limit waits move whether or not anything
    /// downstream is polling: a busy consumer never makes a request late
    /// or time out, and stages sharing a limiter never wait on each other's
    /// consumers. Backpressure applies only at admission: no item is taken
    /// from upstream while `n` are outstanding (in flight, or done and not
    /// yet yielded). Dropping the stream aborts its drivers and the requests
    /// in them. Retry and pause rules
    /// come from the endpoint, its client, or
    /// [`retry_on`](crate::WithPolicy::retry_on) /
    /// [`pause_on`](crate::WithPolicy::pause_on) on the returned stream.
    ///
    /// Must be polled inside a tokio runtime.
    ///
    /// # Panics
    ///
    /// If `n` is 0: zero never means "unlimited".
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    /// use sluicegate::mock::{MockResponse, MockTransport, Route};
    /// use sluicegate::{Client, SluiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let mock = MockTransport::new();
    /// mock.mount(Route::get("/items/{id}").respond_with(|r| MockResponse::text(MockResponse::ok(), r.param("id").unwrap())));
    /// let client = Client::builder().transport(mock).base_url("http://mock").build().unwrap();
    ///
    /// let bodies: Vec<_> = stream::iter(1..=3)
    ///     .fetch_concurrent(2, client.get(|id: &u32| format!("/items/{id}")))
    ///     .ordered()
    ///     .map(|r| r.unwrap().body().clone())
    ///     .collect()
    ///     .await;
    /// assert_eq!(bodies, ["1", "2", "3"]);
    /// # }
    /// ```
    #[track_caller]
    fn fetch_concurrent<T>(self, n: usize, endpoint: Endpoint<T>) -> FetchConcurrent<Self, Items>
    where
        Self: Stream<Item = T> + Sized,
        T: Send + 'static,
    {
        assert!(n > 0, "fetch_concurrent: n must be at least 1");
        FetchConcurrent::new(self, n, endpoint)
    }

    /// Like [`fetch_concurrent`](Self::fetch_concurrent), on a stream of
    /// `Result`s: each `Ok` item is fetched, each `Err` passes through (in
    /// its place, in ordered mode). This is how a second stage is chained
    /// to a first.
    ///
    /// The error type comes from [`StageError`]: when the upstream errors
    /// are a [`FetchError`](crate::FetchError) of any item type (an earlier stage's) or a
    /// [`Failure`](crate::Failure), the stage yields `Failure`s, its own
    /// fetch failures and the passed-through ones alike, so stages chain
    /// with no `map_err`; the failed item stays reachable, typed, through
    /// [`Failure::downcast`](crate::Failure::downcast).
    ///
    /// # Panics
    ///
    /// If `n` is 0.
    ///
    /// ```
    /// use sluicegate::prelude::*;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let mock = MockTransport::new();
    /// mock.mount(Route::get("/items").respond(MockResponse::json(&[1, 2, 404])));
    /// mock.mount(Route::get("/items/404").respond(MockResponse::status(404)));
    /// mock.mount(Route::get("/items/{id}").respond(MockResponse::ok()));
    /// let client = Client::builder().transport(mock).base_url("http://mock").build()?;
    ///
    /// let out: Vec<Result<Fetched<u64>, Failure>> = stream::iter([()])
    ///     .fetch_concurrent(1, client.get(|_: &()| "/items")) // errors: FetchError<()>
    ///     .flat_unpack::<u64>()
    ///     .try_fetch_concurrent(4, client.get(|id: &u64| format!("/items/{id}"))) // errors: Failure
    ///     .ordered()
    ///     .collect()
    ///     .await;
    /// assert_eq!(out.len(), 3);
    /// let failed = out.into_iter().find_map(Result::err).unwrap();
    /// let failed = failed.downcast::<u64>().unwrap(); // a FetchError<u64>: an item's fetch
    /// assert_eq!((*failed.item(), failed.status()), (404, Some(StatusCode::NOT_FOUND)));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// With an error type of your own, implement [`StageError`] for it:
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    /// use sluicegate::mock::{MockResponse, MockTransport, Route};
    /// use sluicegate::{Client, FetchError, SluiceExt};
    ///
    /// #[derive(Debug)]
    /// enum Failed {
    ///     Parse(String),
    ///     Fetch(FetchError<u32>),
    /// }
    /// impl sluicegate::StageError<u32> for Failed {
    ///     type Output = Failed;
    ///     fn pass(self) -> Failed {
    ///         self
    ///     }
    ///     fn lift(e: FetchError<u32>) -> Failed {
    ///         Failed::Fetch(e)
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let mock = MockTransport::new();
    /// mock.mount(Route::get("/items/{id}").respond(MockResponse::ok()));
    /// let client = Client::builder().transport(mock).base_url("http://mock").build().unwrap();
    ///
    /// let inputs = ["1", "x", "3"].map(|s| s.parse::<u32>().map_err(|_| Failed::Parse(s.into())));
    /// let out: Vec<_> = stream::iter(inputs)
    ///     .try_fetch_concurrent(2, client.get(|id: &u32| format!("/items/{id}")))
    ///     .ordered()
    ///     .collect()
    ///     .await;
    /// assert!(out[0].is_ok() && out[2].is_ok());
    /// assert!(matches!(&out[1], Err(Failed::Parse(s)) if s == "x"));
    /// # }
    /// ```
    #[track_caller]
    fn try_fetch_concurrent<T, E>(
        self,
        n: usize,
        endpoint: Endpoint<T>,
    ) -> FetchConcurrent<Self, Results>
    where
        Self: Stream<Item = Result<T, E>> + Sized,
        T: Send + 'static,
        E: StageError<T>,
    {
        assert!(n > 0, "try_fetch_concurrent: n must be at least 1");
        FetchConcurrent::new(self, n, endpoint)
    }

    /// Runs an async [`Step`] per item (a database write, a call through
    /// another SDK) with at most `n` outstanding, under the step's limits,
    /// pause and retry rules: the flow control of a fetch stage for work
    /// that is not HTTP.
    ///
    /// Yields `Ok(`[`Decoded`]`)` (the item and the step's value) or an
    /// `Err(`[`FetchError`](crate::FetchError)`)` carrying the item:
    /// exactly one output per input. As with
    /// [`fetch_concurrent`](Self::fetch_concurrent), each item runs on the
    /// runtime's own tasks, never on the consumer, so the step's attempts,
    /// retries and waits go on while the consumer is busy; no new item is taken while `n` are outstanding;
    /// dropping the stream cancels every step in flight.
    ///
    /// ```
    /// use sluicegate::prelude::*;
    /// use sluicegate::Step;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// // A pipeline's pause, shared with a write that is not HTTP.
    /// let pause = PauseHandle::new();
    /// let save = Step::new(|row: u32| async move {
    ///     if row == 3 { Err(std::io::Error::other("disk full")) } else { Ok(()) }
    /// })
    /// .pause_with(&pause)
    /// .retry_if(|e: &std::io::Error| e.kind() == std::io::ErrorKind::Interrupted, Backoff::constant(Duration::from_millis(10)));
    ///
    /// let out: Vec<_> = stream::iter(1..=4u32).map_concurrent(2, save).collect().await;
    /// assert_eq!(out.iter().filter(|r| r.is_ok()).count(), 3);
    /// let failed = out.into_iter().find_map(Result::err).unwrap();
    /// assert_eq!((*failed.item(), failed.kind()), (3, FetchErrorKind::Step));
    /// # }
    /// ```
    ///
    /// # Panics
    ///
    /// If `n` is 0.
    #[track_caller]
    fn map_concurrent<T, U, E>(
        self,
        n: usize,
        step: Step<T, U, E>,
    ) -> MapConcurrent<Self, Items, U, E>
    where
        Self: Stream<Item = T> + Sized,
        T: Clone + Send + Sync + 'static,
        U: Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        assert!(n > 0, "map_concurrent: n must be at least 1");
        MapConcurrent::new(self, n, step)
    }

    /// [`map_concurrent`](Self::map_concurrent) over a stream of
    /// `Result`s: each `Ok` item runs the step, each `Err` passes through
    /// (as [`try_fetch_concurrent`](Self::try_fetch_concurrent) does, with
    /// the same [`StageError`] rule for the error type).
    ///
    /// # Panics
    ///
    /// If `n` is 0.
    #[track_caller]
    fn try_map_concurrent<T, Er, U, E>(
        self,
        n: usize,
        step: Step<T, U, E>,
    ) -> MapConcurrent<Self, Results, U, E>
    where
        Self: Stream<Item = Result<T, Er>> + Sized,
        T: Clone + Send + Sync + 'static,
        Er: StageError<T>,
        U: Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        assert!(n > 0, "try_map_concurrent: n must be at least 1");
        MapConcurrent::new(self, n, step)
    }

    /// Turns each fetched body holding a JSON array into its elements,
    /// decoded as `T` (use `serde_json::Value` to keep them untyped).
    ///
    /// A body that is not JSON, or not an array, becomes one error of kind
    /// [`Decode`](crate::FetchErrorKind::Decode) carrying the page's item
    /// and response; an element that does not decode becomes one error
    /// carrying the page's item and the element's position, and the other
    /// elements still come through. Upstream errors pass through. Never
    /// panics, never drops a page silently.
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    /// use sluicegate::mock::{MockResponse, MockTransport, Route};
    /// use sluicegate::{Client, SluiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let mock = MockTransport::new();
    /// mock.mount(Route::get("/items").respond(MockResponse::json(&[3, 1, 2])));
    /// let client = Client::builder().transport(mock).base_url("http://mock").build().unwrap();
    ///
    /// let ids: Vec<u64> = stream::iter([()])
    ///     .fetch_concurrent(1, client.get(|_: &()| "/items"))
    ///     .flat_unpack::<u64>()
    ///     .map(Result::unwrap)
    ///     .collect()
    ///     .await;
    /// assert_eq!(ids, [3, 1, 2]);
    /// # }
    /// ```
    fn flat_unpack<T>(self) -> FlatUnpack<Self, T, T>
    where
        Self: Sized,
        Self::Item: FetchResult,
        <Self::Item as FetchResult>::Item: Clone,
        T: DeserializeOwned,
    {
        FlatUnpack::new(self, "", |_, _, value| value)
    }

    /// Like [`flat_unpack`](Self::flat_unpack), for the array at a JSON
    /// pointer (RFC 6901) in each body, such as `"/data/items"`. A pointer
    /// that leads nowhere is an error item for that page.
    fn flat_unpack_at<T>(self, pointer: &str) -> FlatUnpack<Self, T, T>
    where
        Self: Sized,
        Self::Item: FetchResult,
        <Self::Item as FetchResult>::Item: Clone,
        T: DeserializeOwned,
    {
        FlatUnpack::new(self, pointer, |_, _, value| value)
    }

    /// Like [`flat_unpack_at`](Self::flat_unpack_at), keeping with each
    /// element the item of the page it came from and its position, for
    /// error reports and provenance.
    #[allow(clippy::type_complexity)]
    fn flat_unpack_sourced<T>(
        self,
        pointer: &str,
    ) -> FlatUnpack<Self, T, Element<<Self::Item as FetchResult>::Item, T>>
    where
        Self: Sized,
        Self::Item: FetchResult,
        <Self::Item as FetchResult>::Item: Clone,
        T: DeserializeOwned,
    {
        FlatUnpack::new(self, pointer, |source, index, value| Element {
            source: source.clone(),
            index,
            value,
        })
    }

    /// Decodes each fetched body as JSON into `U`, keeping the item.
    ///
    /// An undecodable body becomes an error of kind
    /// [`Decode`](crate::FetchErrorKind::Decode) carrying the item, the
    /// response, and an excerpt of the body; errors from upstream pass
    /// through. Decoding here happens after the attempts, so a malformed
    /// body is final; to retry one, decode inside each attempt with
    /// [`Endpoint::json`](crate::Endpoint::json) (this stage then takes the
    /// value decoded there, without decoding the body again).
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    /// use sluicegate::mock::{MockResponse, MockTransport, Route};
    /// use sluicegate::{Client, FetchErrorKind, SluiceExt};
    ///
    /// #[derive(Debug, serde::Deserialize)]
    /// struct Customer {
    ///     email: String,
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let mock = MockTransport::new();
    /// mock.mount(Route::get("/items/1").respond(MockResponse::json(&serde_json::json!({ "email": "a@example.com" }))));
    /// mock.mount(Route::get("/items/2").respond(MockResponse::ok().text("<html>")));
    /// let client = Client::builder().transport(mock).base_url("http://mock").build().unwrap();
    ///
    /// let out: Vec<_> = stream::iter([1u32, 2])
    ///     .fetch_concurrent(2, client.get(|id: &u32| format!("/items/{id}")))
    ///     .ordered()
    ///     .json::<Customer>()
    ///     .collect()
    ///     .await;
    /// assert_eq!(out[0].as_ref().unwrap().value.email, "a@example.com");
    /// let err = out[1].as_ref().unwrap_err();
    /// assert_eq!((err.kind(), *err.item()), (FetchErrorKind::Decode, 2));
    /// # }
    /// ```
    fn json<U>(self) -> Json<Self, U>
    where
        Self: Sized,
        Self::Item: FetchResult,
        U: DeserializeOwned + Send + 'static,
    {
        Json::new(self)
    }

    /// Runs the pipeline to its end, writing each success as a JSON line to
    /// `path` and each failure as a dead-letter record (item, error kind,
    /// status, attempts, error text) to the file beside it
    /// (`customers.jsonl` → `customers.failed.jsonl`). Both files are
    /// replaced. `.await` it for the [`Report`](crate::etl::Report).
    ///
    /// For a run that survives crashes and resumes where it stopped, use a
    /// [`Journal`](crate::etl::Journal) instead.
    ///
    /// ```
    /// use futures::stream;
    /// use sluicegate::mock::{MockResponse, MockTransport, Route};
    /// use sluicegate::{Client, SluiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> std::io::Result<()> {
    /// let mock = MockTransport::new();
    /// mock.mount(Route::get("/items/3").respond(MockResponse::status(404)));
    /// mock.mount(Route::get("/items/{id}").respond_with(|r| MockResponse::json(&serde_json::json!({ "id": r.param("id") }))));
    /// let client = Client::builder().transport(mock).base_url("http://mock").build().unwrap();
    /// let path = std::env::temp_dir().join(format!("sluicegate-sink-doc-{}.jsonl", std::process::id()));
    ///
    /// let report = stream::iter(1..=4u32)
    ///     .fetch_concurrent(2, client.get(|id: &u32| format!("/items/{id}")))
    ///     .json::<serde_json::Value>()
    ///     .write_jsonl(&path)
    ///     .await?;
    /// assert_eq!((report.ok, report.failed), (3, 1));
    /// let dead = std::fs::read_to_string(&report.dead_letters)?;
    /// assert!(dead.contains(r#""item":3"#) && dead.contains(r#""status":404"#));
    /// # std::fs::remove_file(&report.output)?;
    /// # std::fs::remove_file(&report.dead_letters)?;
    /// # Ok(())
    /// # }
    /// ```
    fn write_jsonl(self, path: impl AsRef<std::path::Path>) -> WriteJsonl<Self>
    where
        Self: Sized,
    {
        WriteJsonl::new(self, path.as_ref().to_owned())
    }

    /// Shows a progress bar on stderr as items pass (feature `progress`):
    /// done / total, rate, ETA, and with [`Progress::watch`] the client's
    /// retries and a visible paused state. Draws only on a terminal.
    #[cfg(feature = "progress")]
    fn progress(self, progress: Progress) -> WithProgress<Self>
    where
        Self: Sized,
    {
        WithProgress::new(self, progress)
    }
}

impl<S: Stream + ?Sized> SluiceExt for S {}
