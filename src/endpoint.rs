//! [`Endpoint`]: how one item becomes a request, with the rules for
//! retrying it; and the attempt loop every fetch operator runs per item.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response, StatusCode};
use tokio::time::Instant;

use crate::client::Client;
use crate::error::{
    BuildError, FetchError, FetchErrorKind, TimeoutScope, TransportError, TransportErrorKind,
};
use crate::ext::json::{decode_detail, DecodedBody, Undecodable};
use crate::ext::Decoded;
use crate::limiter::Limiter;
use crate::request::{BuiltRequest, RequestSpec};
use crate::retry::{self, Attempted, Backoff, DelayCause, Matcher, PausePolicy, Rules, Verdict};
use crate::stats::Stats;
use tracing::Instrument as _;

type BuildFn<T> = dyn Fn(&T) -> RequestSpec + Send + Sync;
/// Decodes a successful response's body in the attempt, marking the
/// response with the value or with why it is undecodable.
type DecodeFn = dyn Fn(&mut Response<Bytes>) + Send + Sync;

/// A request builder bound to a [`Client`]: what to send for each item, and
/// what to do when it fails.
///
/// Made by [`Client::get`] or [`Client::request`]. Cheap to clone. Rules
/// added here come before the client's defaults; the first rule that matches
/// an outcome decides.
///
/// ```
/// use std::time::Duration;
/// use http::StatusCode;
/// use sluicegate::mock::{MockResponse, MockTransport, Route};
/// use sluicegate::retry::Backoff;
/// use sluicegate::Client;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let mock = MockTransport::new();
/// mock.mount(Route::get("/items/{id}").sequence([
///     MockResponse::status(429),
///     MockResponse::json(&serde_json::json!({ "email": "a@example.com" })),
/// ]));
/// let client = Client::builder().transport(mock).base_url("http://mock").build().unwrap();
///
/// let endpoint = client
///     .get(|id: &u64| format!("/items/{id}"))
///     .retry_on(StatusCode::TOO_MANY_REQUESTS, Backoff::constant(Duration::from_millis(100)));
/// let fetched = endpoint.fetch(7).await.unwrap();
/// assert_eq!((fetched.item, fetched.attempts), (7, 2));
/// assert_eq!(fetched.elapsed, Duration::from_millis(100));
/// # }
/// ```
///
/// Its methods return a new endpoint and leave the old one as it was, so a
/// rule added in a statement of its own is lost; the compiler says so
/// (`unused_must_use`), and this does not compile with that lint denied:
///
/// ```compile_fail
/// #![deny(unused_must_use)]
/// use sluicegate::prelude::*;
///
/// let client = Client::builder().transport(MockTransport::new()).build().unwrap();
/// let endpoint = client.get(|id: &u64| format!("/items/{id}"));
/// endpoint.retry_on(429, Backoff::constant(Duration::from_millis(100))); // lost
/// ```
#[must_use = "an Endpoint does nothing until fetched or handed to a fetch operator; its methods return a new one"]
pub struct Endpoint<T> {
    client: Client,
    build: Arc<BuildFn<T>>,
    rules: Rules,
    timeout: Option<Duration>,
    item_timeout: Option<Duration>,
    stats: Vec<Stats>,
    decode: Option<Arc<DecodeFn>>,
}

impl<T> Clone for Endpoint<T> {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            build: self.build.clone(),
            rules: self.rules.clone(),
            timeout: self.timeout,
            item_timeout: self.item_timeout,
            stats: self.stats.clone(),
            decode: self.decode.clone(),
        }
    }
}

impl<T> fmt::Debug for Endpoint<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("client", &self.client)
            .field("rules", &self.rules)
            .field("timeout", &self.timeout)
            .field("item_timeout", &self.item_timeout)
            .finish_non_exhaustive()
    }
}

/// A successful fetch: the item it was for and the whole response.
#[derive(Debug)]
pub struct Fetched<T> {
    /// The input item.
    pub item: T,
    /// The response, with its body read.
    pub response: Response<Bytes>,
    /// Requests sent for this item, retries included.
    pub attempts: u32,
    /// From the first attempt's start to the response, pauses and retry
    /// waits included.
    pub elapsed: Duration,
}

impl<T> Fetched<T> {
    /// The response status.
    pub fn status(&self) -> StatusCode {
        self.response.status()
    }

    /// The response body.
    pub fn body(&self) -> &Bytes {
        self.response.body()
    }

    /// The body decoded as JSON into `U`, with the item: the value the
    /// endpoint decoded in the attempt ([`Endpoint::json`]) if it decoded
    /// one as `U`, else decoded now.
    ///
    /// # Errors
    ///
    /// A [`Decode`](FetchErrorKind::Decode) error carrying the item, the
    /// response and an excerpt of the body.
    pub fn json<U>(self) -> Result<Decoded<T, U>, FetchError<T>>
    where
        U: serde::de::DeserializeOwned + Send + 'static,
    {
        crate::ext::json::decode(self)
    }
}

impl<T> Endpoint<T> {
    pub(crate) fn new<F>(client: Client, build: F) -> Self
    where
        F: Fn(&T) -> RequestSpec + Send + Sync + 'static,
    {
        let rules = client.inner.rules.inherited();
        let timeout = client.inner.timeout;
        let stats = client.inner.stats.iter().cloned().collect();
        Self {
            client,
            build: Arc::new(build),
            rules,
            timeout,
            item_timeout: None,
            stats,
            decode: None,
        }
    }

    /// Decodes each successful response's body as JSON into `U` inside the
    /// attempt, so that a malformed body is an outcome like a status:
    /// [`Matcher::undecodable`] matches it, and a rule can retry it.
    ///
    /// The body is decoded once: the value is kept with the response and
    /// taken by the [`json`](crate::SluiceExt::json) stage (or
    /// [`Fetched::json`]) without decoding again. A body that is still
    /// undecodable when the attempts end fails the item with
    /// [`Decode`](crate::FetchErrorKind::Decode), carrying the response and
    /// an excerpt of the body. Without a rule for it, the first malformed
    /// body is final, as with a decoding stage alone.
    ///
    /// ```
    /// use sluicegate::prelude::*;
    ///
    /// #[derive(Debug, serde::Deserialize)]
    /// struct Customer {
    ///     email: String,
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let mock = MockTransport::new();
    /// mock.mount(Route::get("/items/{id}").sequence([
    ///     MockResponse::ok().text(r#"{"email": "a@exa"#), // cut off mid-body
    ///     MockResponse::json(&serde_json::json!({ "email": "a@example.com" })),
    /// ]));
    /// let client = Client::builder().transport(mock).base_url("http://mock").build()?;
    ///
    /// let customers: Vec<Customer> = stream::iter([7u64])
    ///     .fetch_concurrent(
    ///         4,
    ///         client
    ///             .get(|id: &u64| format!("/items/{id}"))
    ///             .json::<Customer>()
    ///             .retry_on(Matcher::undecodable(), Backoff::constant(Duration::from_millis(50))),
    ///     )
    ///     .json::<Customer>() // takes the value decoded in the attempt
    ///     .map_ok(|decoded| decoded.value)
    ///     .try_collect()
    ///     .await?;
    /// assert_eq!(customers[0].email, "a@example.com");
    /// # Ok(())
    /// # }
    /// ```
    pub fn json<U>(mut self) -> Self
    where
        U: serde::de::DeserializeOwned + Send + 'static,
    {
        self.decode = Some(Arc::new(|response: &mut Response<Bytes>| {
            if !response.status().is_success() {
                return;
            }
            match serde_json::from_slice::<U>(response.body()) {
                Ok(value) => {
                    response.extensions_mut().insert(DecodedBody::new(value));
                }
                Err(e) => {
                    let detail = decode_detail(&e, response.body());
                    response.extensions_mut().insert(Undecodable(detail));
                }
            }
        }));
        self
    }

    /// Retries outcomes that `matcher` matches, waiting as `policy` says
    /// (or as the server's `Retry-After` says, capped by the policy), up to
    /// the policy's [`max_attempts`](Backoff::max_attempts) (default 3):
    /// the only cap on attempts when this rule matches.
    pub fn retry_on(mut self, matcher: impl Into<Matcher>, policy: Backoff) -> Self {
        self.rules.retry_on(matcher.into(), policy);
        self
    }

    /// On outcomes that `matcher` matches, pauses the client's shared
    /// [`PauseHandle`](crate::PauseHandle) for the server's `Retry-After`
    /// (else the policy's fallback: a bare `Duration` is one), then retries
    /// the item once the pause ends, up to the policy's
    /// [`max_attempts`](PausePolicy::max_attempts) (default 10).
    pub fn pause_on(mut self, matcher: impl Into<Matcher>, policy: impl Into<PausePolicy>) -> Self {
        self.rules.pause_on(matcher.into(), policy.into());
        self
    }

    /// Gives each attempt at most `timeout` (overrides the client's).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Gives each item at most `timeout` for all its attempts together,
    /// waits and pauses included.
    pub fn item_timeout(mut self, timeout: Duration) -> Self {
        self.item_timeout = Some(timeout);
        self
    }

    /// Also counts this endpoint's requests in `stats`, for example a
    /// stage's own [`Stats`] beside the client's.
    pub fn with_stats(mut self, stats: Stats) -> Self {
        self.stats.push(stats);
        self
    }

    /// The client this endpoint sends through.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The request for `item`, as it would be sent.
    ///
    /// # Errors
    ///
    /// When the builder's spec cannot become a valid request.
    pub fn build_request(&self, item: &T) -> Result<BuiltRequest, BuildError> {
        self.client.prepare((self.build)(item)).map(BuiltRequest)
    }

    /// Fetches one item: waits for the pause and a rate token before every
    /// attempt, retries and pauses as the rules say, and hands the item back
    /// with the outcome.
    ///
    /// # Errors
    ///
    /// A [`FetchError`] carrying `item` when the request cannot be built,
    /// the final outcome is a transport error or non-success status, or a
    /// timeout fires.
    pub async fn fetch(&self, item: T) -> Result<Fetched<T>, FetchError<T>> {
        self.fetch_indexed(item, 0).await
    }

    pub(crate) async fn fetch_indexed(
        &self,
        item: T,
        index: u64,
    ) -> Result<Fetched<T>, FetchError<T>> {
        for stats in &self.stats {
            stats.item_started();
        }
        let result = self.fetch_item(item, index).await;
        for stats in &self.stats {
            stats.item_finished(result.is_ok());
        }
        if let Err(e) = &result {
            tracing::warn!(item = index, kind = %e.kind(), attempts = e.attempts(), "item failed");
        }
        result
    }

    async fn fetch_item(&self, item: T, index: u64) -> Result<Fetched<T>, FetchError<T>> {
        let started = Instant::now();
        let request = match self.build_request(&item) {
            Ok(request) => request.into_request(),
            Err(e) => {
                return Err(FetchError::new(item, FetchErrorKind::Build)
                    .with_detail(e.to_string())
                    .with_source(e))
            }
        };
        let attempts = AtomicU32::new(0);
        let attempt_loop = self.attempt_loop(request, &attempts, started, index);
        let end = match self.item_timeout {
            Some(limit) => tokio::time::timeout(limit, attempt_loop)
                .await
                .unwrap_or(End::ItemTimeout),
            None => attempt_loop.await,
        };
        let attempts = attempts.load(Ordering::Relaxed);
        let elapsed = started.elapsed();
        let (kind, response, error) = match end {
            End::Response(mut response) if response.extensions().get::<Undecodable>().is_some() => {
                let Some(Undecodable(detail)) = response.extensions_mut().remove::<Undecodable>()
                else {
                    unreachable!("checked above")
                };
                return Err(FetchError::new(item, FetchErrorKind::Decode)
                    .with_attempts(attempts, elapsed)
                    .with_detail(detail)
                    .with_response(response));
            }
            End::Response(response) if response.status().is_success() => {
                return Ok(Fetched {
                    item,
                    response,
                    attempts,
                    elapsed,
                })
            }
            End::Response(response) => (
                FetchErrorKind::Status(response.status()),
                Some(response),
                None,
            ),
            End::Transport(e) if e.is_timeout() => (
                FetchErrorKind::Timeout(TimeoutScope::Attempt),
                None,
                Some(e),
            ),
            End::Transport(e) => (FetchErrorKind::Transport(e.kind()), None, Some(e)),
            End::ItemTimeout => (FetchErrorKind::Timeout(TimeoutScope::Item), None, None),
            End::LimiterUnavailable(reason) => (
                FetchErrorKind::LimiterUnavailable,
                None,
                Some(TransportError::new(TransportErrorKind::Other, reason)),
            ),
        };
        let mut error_out = FetchError::new(item, kind).with_attempts(attempts, elapsed);
        if let Some(response) = response {
            error_out = error_out.with_response(response);
        }
        if let Some(e) = error {
            error_out = error_out.with_detail(e.to_string()).with_source(e);
        }
        Err(error_out)
    }

    /// What to wait for before the next attempt, or `None` to send now.
    ///
    /// Pause first, then the token: a token taken before a pause would be
    /// spent at the pause's end, all at once. The common case (no pause, a
    /// token free) takes the token here and allocates nothing.
    fn gate(&self) -> Option<BoxFuture<'static, Result<(), String>>> {
        let client = &self.client.inner;
        let limiter = self.client.gate();
        if !client.pause.is_paused() && limiter.check().is_ok() {
            return None;
        }
        let pause = client.pause.clone();
        let limiter = limiter.clone();
        Some(Box::pin(async move {
            pause.ready().await;
            limiter.acquire_owned(Some(pause)).await
        }))
    }

    async fn attempt_loop(
        &self,
        request: Request<Bytes>,
        attempts: &AtomicU32,
        started: Instant,
        index: u64,
    ) -> End {
        let client = &self.client.inner;
        let seed = self.rules.seed().unwrap_or_else(|| fastrand::u64(..));
        let mut rng = fastrand::Rng::with_seed(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut previous_delay = Duration::ZERO;
        let mut spare = Some(request);
        let mut paused_by_us = false;
        loop {
            let attempt = attempts.fetch_add(1, Ordering::Relaxed) + 1;
            if let Some(wait) = self.gate() {
                if let Err(reason) = wait.await {
                    return End::LimiterUnavailable(reason);
                }
            }
            if std::mem::take(&mut paused_by_us) {
                tracing::info!(item = index, "pause over, resuming");
            }
            if attempt == 1 {
                self.rules.deposit();
            }
            // With no rules there is no second attempt: send the original.
            let this_attempt = if self.rules.is_empty() {
                spare.take().expect("one attempt without rules")
            } else {
                clone_request(spare.as_ref().expect("kept for retries"))
            };
            let span = tracing::debug_span!(
                "sluicegate::fetch",
                method = %this_attempt.method(),
                url = tracing::field::Empty,
                item = index,
                attempt,
            );
            if !span.is_disabled() {
                span.record(
                    "url",
                    tracing::field::display(self.client.loggable_url(this_attempt.uri())),
                );
            }
            // Entering a disabled span on every poll still costs: skip it.
            let mut outcome = if span.is_disabled() {
                self.send(this_attempt).await
            } else {
                self.send(this_attempt).instrument(span.clone()).await
            };
            if let (Some(decode), Ok(response)) = (&self.decode, &mut outcome) {
                decode(response);
            }
            let verdict = if self.rules.is_empty() {
                Verdict::Finish
            } else {
                let retry_after = outcome
                    .as_ref()
                    .ok()
                    .and_then(|r| retry::retry_after(r.headers(), || self.client.wall_now()));
                let history = Attempted {
                    attempts: attempt,
                    elapsed: started.elapsed(),
                    previous_delay,
                };
                let now = Instant::now();
                self.rules
                    .decide(&outcome, history, retry_after, now, &mut rng)
            };
            match verdict {
                Verdict::Finish => {
                    return match outcome {
                        Ok(response) => End::Response(response),
                        Err(e) => End::Transport(e),
                    }
                }
                Verdict::Retry { delay, cause } => {
                    span.in_scope(|| {
                        tracing::debug!(
                            delay_ms = delay.as_millis() as u64,
                            cause = cause.as_str(),
                            "retrying"
                        )
                    });
                    for stats in &self.stats {
                        stats.retried();
                    }
                    if cause == DelayCause::Policy {
                        previous_delay = delay;
                    }
                    // Boxed: a retry is the slow path; the common path keeps a small future.
                    Box::pin(tokio::time::sleep(delay)).await;
                }
                Verdict::Pause { delay, cause } => {
                    let now = Instant::now();
                    let before = client.pause.paused_until().unwrap_or(now);
                    let until = client.pause.pause_for(delay);
                    let added = until.saturating_duration_since(before);
                    // The item is sent again once the pause ends: a retry
                    // like any other, besides the pause it asked for.
                    for stats in &self.stats {
                        stats.paused(added);
                        stats.retried();
                    }
                    paused_by_us = true;
                    span.in_scope(|| {
                        tracing::info!(
                            status = outcome.as_ref().ok().map(|r| r.status().as_u16()),
                            pause_ms = until.saturating_duration_since(now).as_millis() as u64,
                            cause = cause.as_str(),
                            "pausing every request sharing this pause handle"
                        )
                    });
                }
            }
        }
    }

    /// One attempt: send with the attempt timeout, count it, log it.
    async fn send(&self, request: Request<Bytes>) -> Result<Response<Bytes>, TransportError> {
        let client = &self.client.inner;
        tracing::debug!("sending");
        let sent = InFlight::start(&self.stats, self.client.gate());
        let send = client.transport.send(request);
        let outcome = match self.timeout {
            Some(limit) => tokio::time::timeout(limit, send).await.unwrap_or_else(|_| {
                Err(TransportError::new(
                    TransportErrorKind::Timeout,
                    format!("no response within {limit:?}"),
                ))
            }),
            None => send.await,
        };
        let latency = sent.finish(&outcome, || self.client.wall_now());
        match &outcome {
            Ok(response) => tracing::debug!(
                status = response.status().as_u16(),
                duration_ms = latency.as_secs_f64() * 1e3,
                bytes = response.body().len(),
                "answered"
            ),
            Err(e) => tracing::debug!(
                error = %e,
                duration_ms = latency.as_secs_f64() * 1e3,
                "failed"
            ),
        }
        outcome.map(|mut response| {
            self.client.redact(response.headers_mut());
            response
        })
    }
}

/// Counts a request in flight until it ends, or is abandoned when dropped,
/// and reports its outcome to the limiter that granted its token.
struct InFlight<'a> {
    stats: &'a [Stats],
    limiter: &'a Limiter,
    sent_at: Option<Instant>,
    open: bool,
}

impl<'a> InFlight<'a> {
    fn start(stats: &'a [Stats], limiter: &'a Limiter) -> Self {
        for s in stats {
            s.request_sent();
        }
        let sent_at = (!stats.is_empty()).then(Instant::now);
        Self {
            stats,
            limiter,
            sent_at,
            open: true,
        }
    }

    fn finish(
        mut self,
        outcome: &Result<Response<Bytes>, TransportError>,
        wall_now: impl FnOnce() -> SystemTime,
    ) -> Duration {
        self.open = false;
        let latency = self.sent_at.map_or(Duration::ZERO, |t| t.elapsed());
        let summary = outcome
            .as_ref()
            .map(|r| (r.status(), r.body().len()))
            .map_err(TransportError::kind);
        for s in self.stats {
            s.request_ended(summary, latency);
        }
        let observed = self.limiter.observe(outcome, wall_now);
        if let Some(rate) = observed.changed {
            tracing::info!(rate_per_second = rate, "learned rate changed");
        }
        for s in self.stats {
            s.limiter_seen(observed.learned, observed.malformed);
        }
        latency
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.open {
            if self.sent_at.is_some() {
                for s in self.stats {
                    s.request_abandoned();
                }
            }
            self.limiter.abandoned();
        }
    }
}

/// How the attempts of one item ended.
enum End {
    Response(Response<Bytes>),
    Transport(TransportError),
    ItemTimeout,
    /// A remote rate limiter stayed unreachable (failing closed).
    LimiterUnavailable(String),
}

fn clone_request(request: &Request<Bytes>) -> Request<Bytes> {
    let mut copy = Request::new(request.body().clone());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.headers_mut() = request.headers().clone();
    *copy.version_mut() = request.version();
    copy
}
