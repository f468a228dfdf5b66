//! [`Endpoint`]: how one item becomes a request, with the policy for
//! retrying it, and [`Client::get`] / [`Client::request`] that make one.
//!
//! What one HTTP attempt is (send with a timeout, count it, report it to
//! the limiters, decode the body) lives here; the loop around the attempts
//! is [`crate::attempt`]'s.

use std::fmt;
use std::future::Future;

use futures::future::Either;
use futures::FutureExt as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use tokio::time::Instant;

use crate::attempt::{self, Attempt, Ended, Gate, Loop, Run};
use crate::body::{decode_detail, Decoded, DecodedBody, Undecodable};
use crate::client::Client;
use crate::error::{
    BuildError, FetchError, FetchErrorKind, TimeoutScope, TransportError, TransportErrorKind,
};
use crate::limiter::Limiter;
use crate::policy::{Limit, Policy, Sealed, WithPolicy};
use crate::request::{BuiltRequest, RequestSpec};
use crate::retry::{self, Attempted, Verdict};
use crate::stats::Stats;
use crate::transport::Prepared;
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
/// use sluicegate::{Client, WithPolicy};
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
    policy: Policy,
    decode: Option<Arc<DecodeFn>>,
    /// The gate every item waits at, made once when it is the same for
    /// all (no per-host limit), instead of once per item.
    gate: Option<Arc<Gate>>,
}

impl<T> Clone for Endpoint<T> {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            build: self.build.clone(),
            policy: self.policy.clone(),
            decode: self.decode.clone(),
            gate: self.gate.clone(),
        }
    }
}

impl<T> fmt::Debug for Endpoint<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("client", &self.client)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl<T> Sealed for Endpoint<T> {}

impl<T> WithPolicy for Endpoint<T> {
    fn map_policy(mut self, change: impl FnOnce(&mut Policy)) -> Self {
        change(&mut self.policy);
        self.gate = shared_gate(&self.client, &self.policy);
        self
    }
}

impl Client {
    /// An endpoint sending `GET` to the path (or URL) `path(item)` for each
    /// item.
    ///
    /// A path is joined under the base URL's path. Item data in it is
    /// checked, not trusted: a dot segment (`..`, `.`, also `%2e`-encoded)
    /// or a path leaving the base path fails that item with a
    /// [`Build`](crate::FetchErrorKind::Build) error, and a `#` is data.
    /// Wrap item data in [`RequestSpec::segment`] so that a `/` or `?` in
    /// it cannot add a segment or open a query. A full `http(s)://` URL is
    /// used as given, but gets the client's default headers only at the
    /// base URL's origin (or a [trusted](crate::ClientBuilder::trust_origin) one).
    pub fn get<T, P, F>(&self, path: F) -> Endpoint<T>
    where
        F: Fn(&T) -> P + Send + Sync + 'static,
        P: Into<String>,
    {
        Endpoint::new(self.clone(), move |item: &T| RequestSpec::get(path(item)))
    }

    /// An endpoint sending whatever request `build(item)` describes.
    pub fn request<T, F>(&self, build: F) -> Endpoint<T>
    where
        F: Fn(&T) -> RequestSpec + Send + Sync + 'static,
    {
        Endpoint::new(self.clone(), build)
    }

    /// Sends one request with the client's pause, rate, timeout and default
    /// rules, and returns the response when its status is a success.
    ///
    /// # Errors
    ///
    /// A [`FetchError`] if the request cannot be built, every attempt
    /// failed, or the final status is not a success.
    pub async fn send(
        &self,
        spec: impl Into<RequestSpec>,
    ) -> Result<Response<Bytes>, FetchError<()>> {
        let spec = spec.into();
        self.request(move |_: &()| spec.clone())
            .fetch(())
            .await
            .map(|fetched| fetched.response)
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
        if let Some(value) = DecodedBody::<U>::take(&self.response) {
            return Ok(Decoded {
                item: self.item,
                value,
            });
        }
        match crate::body::from_json(&self.response) {
            Ok(value) => Ok(Decoded {
                item: self.item,
                value,
            }),
            Err(e) => {
                let detail = decode_detail(&e, self.response.body());
                Err(FetchError::new(self.item, FetchErrorKind::Decode)
                    .with_attempts(self.attempts, self.elapsed)
                    .with_detail(detail)
                    .with_source(e)
                    .with_response(self.response))
            }
        }
    }
}

impl<T> Endpoint<T> {
    pub(crate) fn new<F>(client: Client, build: F) -> Self
    where
        F: Fn(&T) -> RequestSpec + Send + Sync + 'static,
    {
        let policy = client.policy().inherited();
        Self {
            gate: shared_gate(&client, &policy),
            client,
            build: Arc::new(build),
            policy,
            decode: None,
        }
    }

    /// Decodes each successful response's body as JSON into `U` inside the
    /// attempt, so that a malformed body is an outcome like a status:
    /// [`Matcher::undecodable`](crate::retry::Matcher::undecodable) matches it, and a rule can retry it.
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
            match crate::body::from_json::<U>(response) {
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
        self.client.prepare((self.build)(item))
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
        Self::fetch_indexed(self, item, 0).await
    }

    /// Item number `index`, start to end: counted, prepared, attempted as
    /// the rules say, and handed back with its outcome. `this` is whatever
    /// owns the endpoint: a borrow for [`fetch`](Self::fetch), the stage's
    /// `Arc` for the fetch operators.
    ///
    /// One `async` block, not a chain of `async fn`s: each `async fn` keeps
    /// its arguments twice in its future (as passed and as moved into the
    /// body), so the chain kept the item four times, and this future is
    /// what every admitted item keeps and is moved as it starts.
    ///
    /// # What an item costs here, and what each cost buys
    ///
    /// Against bare `buffer_unordered` over the same zero-latency mock, an
    /// item of `fetch_concurrent` costs about 10.5 k instructions where the
    /// bare loop costs 5.9 k, the mock's own work (about 2.1 k) in both
    /// (callgrind, current-thread, `benches/per_item.rs`; `benches/RESULTS.md`).
    /// Against any real server the difference is noise. Each part keeps a
    /// promise the bare loop does not make, so none is left out:
    ///
    /// | part | about | what it buys |
    /// |---|---|---|
    /// | the driver: a boxed future, a message each way (`ext::concurrent`) | 1.7 k | requests move while the consumer is busy, and a stalled stage never stalls another |
    /// | preparing the request (`Client::prepare`; the bare loop's `format!` and parse: 0.8 k) | 1.5 k | the item cannot move the request off the base's origin or path; secret headers are marked before anything can log them |
    /// | the gate: pause, then each limit in line (`Gate::wait`) | 330 | the shared pause and every rate, with nobody overtaking |
    /// | what the limiters hear of the answer (`InFlight::finish`) | 630 | quotas the server advertises hold the next requests; the learner's rate; stats |
    /// | the attempt's timer, the rules' verdict | 400 | every wait bounded; retries as configured |
    /// | redacting the answer's headers, reading its `Date` | 230 | no secret in a log; a `Retry-After` date read on the server's clock |
    ///
    /// The rest is moves of the item's future and of its outcome, which a
    /// unit test below keeps small.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn keeps its arguments twice in its future"
    )]
    pub(crate) fn fetch_indexed<E>(
        this: E,
        item: T,
        index: u64,
    ) -> impl Future<Output = Result<Fetched<T>, FetchError<T>>>
    where
        E: std::ops::Deref<Target = Self>,
    {
        async move {
            let endpoint = &*this;
            attempt::item_started(&endpoint.policy.stats);
            let result = 'item: {
                // Bound by a `let`: a `match` on the call would keep the
                // prepared pair's room in this future until the end.
                let (request, prepared, own_gate) = match endpoint.prepare_item(&item) {
                    Ok(prepared) => prepared,
                    Err(e) => {
                        break 'item Err(FetchError::new(item, FetchErrorKind::Build)
                            .with_detail(e.to_string())
                            .with_source(e))
                    }
                };
                let gate = own_gate
                    .as_ref()
                    .or(endpoint.gate.as_deref())
                    .expect("the endpoint's gate, or the item's own");
                // Lent to the loop, so that the request is stored once in
                // this item's future, not once per frame it passes through.
                let mut attempt = HttpAttempt {
                    endpoint,
                    limiters: &gate.limiters,
                    spare: Some((request, prepared)),
                    index,
                    ended: None,
                };
                let run = Loop {
                    gate,
                    stats: &endpoint.policy.stats,
                    item_timeout: endpoint.policy.item_timeout,
                    seed: endpoint.policy.rules.seed(),
                }
                .run(&mut attempt, index)
                .await;
                finish(item, run)
            };
            attempt::item_ended(&endpoint.policy.stats, index, &result);
            result
        }
    }

    /// The item's request and the gate it waits at. Outside the async
    /// body: a request borrowed there (for the gate's host) would keep a
    /// second room in the item's future after it moved on.
    ///
    /// The gate is the item's own only when a per-host limit makes it
    /// depend on the request's host; else the endpoint's serves.
    fn prepare_item(
        &self,
        item: &T,
    ) -> Result<(Request<Bytes>, Prepared, Option<Gate>), BuildError> {
        let (request, prepared) = self.build_request(item)?.into_parts();
        let gate = self.gate.is_none().then(|| {
            let host = request.uri().authority().map_or("", |a| a.as_str());
            gate_for(&self.client, &self.policy, host)
        });
        Ok((request, prepared, gate))
    }

    /// One attempt, sent at `now`: send with the attempt timeout, count it,
    /// log it. Also gives the instant the outcome came.
    ///
    /// The request is handed to the transport here, before the future is
    /// made, so that the future does not carry it.
    fn send<'s>(
        &'s self,
        (request, prepared): (Request<Bytes>, Prepared),
        limiters: &'s [Limiter],
        now: Instant,
    ) -> impl Future<Output = (Result<Response<Bytes>, TransportError>, Instant)> + Send + 's {
        tracing::debug!("sending");
        let sent = InFlight::start(&self.policy.stats, limiters, now);
        let send = self.client.transport().send_prepared(request, prepared);
        self.sent(sent, send, now)
    }

    /// The rest of [`send`](Self::send), once the transport has the request.
    /// An `async` block: an `async fn` would keep its arguments twice.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn keeps its arguments twice in its future"
    )]
    fn sent<'s>(
        &'s self,
        sent: InFlight<'s>,
        send: futures::future::BoxFuture<'static, Result<Response<Bytes>, TransportError>>,
        now: Instant,
    ) -> impl Future<Output = (Result<Response<Bytes>, TransportError>, Instant)> + Send + 's {
        async move {
            let outcome = match self.policy.timeout {
                Some(limit) => tokio::time::timeout_at(now + limit, send)
                    .await
                    .unwrap_or_else(|_| {
                        Err(TransportError::new(
                            TransportErrorKind::Timeout,
                            format!("no response within {limit:?}"),
                        ))
                    }),
                None => send.await,
            };
            if let Ok(response) = &outcome {
                self.client.learn_date(response.headers());
            }
            let (latency, ended) = sent.finish(&outcome, || self.client.wall_now());
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
            let outcome = outcome.map(|mut response| {
                self.client.redact(response.headers_mut());
                response
            });
            (outcome, ended)
        }
    }
}

/// What the requests to `host` wait for: the client's pause, the
/// client's limiter, then the policy's own limits in the order added (a
/// per-host one for `host`).
fn gate_for(client: &Client, policy: &Policy, host: &str) -> Gate {
    Gate {
        pause: client.pause_handle().clone(),
        limiters: std::iter::once(client.gate().clone())
            .chain(policy.limits.iter().map(|limit| limit.for_host(host)))
            .collect(),
        answered: true,
    }
}

/// The gate of every request, if it does not depend on the host.
fn shared_gate(client: &Client, policy: &Policy) -> Option<Arc<Gate>> {
    let per_host = policy.limits.iter().any(Limit::is_per_host);
    (!per_host).then(|| Arc::new(gate_for(client, policy, "")))
}

/// What the item's attempts came to: the item with its response on a
/// success, else the error carrying it.
fn finish<T>(
    item: T,
    run: Run<Result<Response<Bytes>, TransportError>>,
) -> Result<Fetched<T>, FetchError<T>> {
    let (attempts, elapsed) = (run.attempts, run.elapsed);
    let (kind, response, error) = match run.ended {
        Ended::Outcome(Ok(mut response))
            if response.extensions().get::<Undecodable>().is_some() =>
        {
            let Some(Undecodable(detail)) = response.extensions_mut().remove::<Undecodable>()
            else {
                unreachable!("checked above")
            };
            return Err(FetchError::new(item, FetchErrorKind::Decode)
                .with_attempts(attempts, elapsed)
                .with_detail(detail)
                .with_response(response));
        }
        Ended::Outcome(Ok(response)) if response.status().is_success() => {
            return Ok(Fetched {
                item,
                response,
                attempts,
                elapsed,
            })
        }
        Ended::Outcome(Ok(response)) => (
            FetchErrorKind::Status(response.status()),
            Some(response),
            None,
        ),
        Ended::Outcome(Err(e)) if e.is_timeout() => (
            FetchErrorKind::Timeout(TimeoutScope::Attempt),
            None,
            Some(e),
        ),
        Ended::Outcome(Err(e)) => (FetchErrorKind::Transport(e.kind()), None, Some(e)),
        Ended::ItemTimeout => (FetchErrorKind::Timeout(TimeoutScope::Item), None, None),
        Ended::LimiterUnavailable(reason) => (
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

/// One item's HTTP attempts: the request (cloned per attempt when rules
/// may ask for another), sent through the endpoint and judged by its rules.
struct HttpAttempt<'a, T> {
    endpoint: &'a Endpoint<T>,
    limiters: &'a [Limiter],
    /// The request and what the transport is told beside it, kept for
    /// retries (taken by the only attempt when there are no rules).
    spare: Option<(Request<Bytes>, Prepared)>,
    index: u64,
    /// When the last attempt's outcome came (read once, as it came).
    ended: Option<Instant>,
}

impl<T> Attempt for HttpAttempt<'_, T> {
    type Outcome = Result<Response<Bytes>, TransportError>;

    fn attempt(&mut self, attempt: u32) -> impl Future<Output = Self::Outcome> + Send {
        self.attempt_at(attempt, Instant::now())
    }

    fn ended_at(&self) -> Option<Instant> {
        self.ended
    }

    fn attempt_at(
        &mut self,
        attempt: u32,
        now: Instant,
    ) -> impl Future<Output = Self::Outcome> + Send {
        // Everything up to the send runs here, outside the future: a
        // request borrowed inside an async body keeps its room in the
        // future until the end, even once the transport has it.
        let endpoint = self.endpoint;
        let rules = &endpoint.policy.rules;
        if attempt == 1 {
            rules.deposit();
        }
        // With no rules there is no second attempt: send the original.
        let request = if rules.is_empty() {
            self.spare.take().expect("one attempt without rules")
        } else {
            let (request, prepared) = self.spare.as_ref().expect("kept for retries");
            (clone_request(request), prepared.clone())
        };
        let span = tracing::debug_span!(
            "sluicegate::fetch",
            method = %request.0.method(),
            url = tracing::field::Empty,
            item = self.index,
            attempt,
        );
        // Entering a disabled span on every poll still costs: skip it.
        let sending = if span.is_disabled() {
            Either::Left(endpoint.send(request, self.limiters, now))
        } else {
            span.record(
                "url",
                tracing::field::display(endpoint.client.loggable_url(request.0.uri())),
            );
            let sending = span.in_scope(|| endpoint.send(request, self.limiters, now));
            Either::Right(sending.instrument(span))
        };
        let ended_at = &mut self.ended;
        // A map, not an async block: awaiting a captured future would move
        // it into a second slot of the block's own.
        sending.map(move |(mut outcome, ended)| {
            *ended_at = Some(ended);
            if let (Some(decode), Ok(response)) = (&endpoint.decode, &mut outcome) {
                decode(response);
            }
            outcome
        })
    }

    fn decide(
        &self,
        outcome: &Self::Outcome,
        history: Attempted,
        now: Instant,
        draw: u64,
    ) -> Verdict {
        let rules = &self.endpoint.policy.rules;
        if rules.is_empty() {
            return Verdict::Finish;
        }
        let client = &self.endpoint.client;
        let retry_after = outcome
            .as_ref()
            .ok()
            .and_then(|r| retry::retry_after(r.headers(), || client.wall_now()));
        rules.decide(outcome, history, retry_after, now, draw)
    }

    fn status(outcome: &Self::Outcome) -> Option<u16> {
        outcome.as_ref().ok().map(|r| r.status().as_u16())
    }
}

/// Counts a request in flight until it ends, or is abandoned when dropped,
/// and reports its outcome to the limiter that granted its token.
struct InFlight<'a> {
    stats: &'a [Stats],
    limiters: &'a [Limiter],
    sent_at: Option<Instant>,
    open: bool,
}

impl<'a> InFlight<'a> {
    fn start(stats: &'a [Stats], limiters: &'a [Limiter], now: Instant) -> Self {
        for s in stats {
            s.request_sent();
        }
        let sent_at = (!stats.is_empty()).then_some(now);
        Self {
            stats,
            limiters,
            sent_at,
            open: true,
        }
    }

    fn finish(
        mut self,
        outcome: &Result<Response<Bytes>, TransportError>,
        wall_now: impl Fn() -> Option<SystemTime>,
    ) -> (Duration, Instant) {
        self.open = false;
        // Read once: the latency, what the limiters learn and the rules'
        // judgement of this outcome all date it the same.
        let now = Instant::now();
        let latency = self
            .sent_at
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        let summary = outcome
            .as_ref()
            .map(|r| (r.status(), r.body().len()))
            .map_err(TransportError::kind);
        for s in self.stats {
            s.request_ended(summary, latency);
        }
        // Every limiter that granted a token hears how it went: its count
        // of requests in flight ends, and it learns what the server said.
        for (i, limiter) in self.limiters.iter().enumerate() {
            let observed = limiter.observe(outcome, now, &wall_now);
            if let Some(rate) = observed.changed {
                tracing::info!(rate_per_second = rate, "learned rate changed");
            }
            if i == 0 {
                for s in self.stats {
                    s.limiter_seen(observed.learned, observed.malformed);
                }
            }
        }
        (latency, now)
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
            for limiter in self.limiters {
                limiter.abandoned();
            }
        }
    }
}

fn clone_request(request: &Request<Bytes>) -> Request<Bytes> {
    let mut copy = Request::new(request.body().clone());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.headers_mut() = request.headers().clone();
    *copy.version_mut() = request.version();
    copy
}

#[cfg(test)]
mod tests {
    fn mock_client() -> crate::Client {
        crate::Client::builder()
            .transport(crate::mock::MockTransport::new())
            .base_url("http://mock")
            .build()
            .unwrap()
    }

    /// The future of one item is what every admitted item keeps (in the
    /// stage's driver) and what is moved as it starts. It was 2 688 bytes
    /// before the clock reads were shared and the request stopped being
    /// stored once per frame, then 1 208 with the item kept four times and
    /// the item timeout's timer in place. Under 1 032 bytes, glibc's
    /// per-thread cache serves its allocation without taking a lock or
    /// consolidating.
    #[tokio::test(start_paused = true)]
    async fn an_item_future_stays_small() {
        let client = mock_client();
        let endpoint = std::sync::Arc::new(client.get(|id: &u64| format!("/items/{id}")));
        let future = super::Endpoint::fetch_indexed(endpoint, 1u64, 0);
        let size = std::mem::size_of_val(&future);
        assert!(size <= 1_000, "an item's future is {size} bytes");
    }

    /// An item is kept once in its future, not once per layer it passes.
    #[tokio::test(start_paused = true)]
    async fn an_item_is_kept_once_in_its_future() {
        let client = mock_client();
        let small = std::sync::Arc::new(client.get(|_: &u64| "/x".to_owned()));
        let large = std::sync::Arc::new(client.get(|_: &[u64; 64]| "/x".to_owned()));
        let small = std::mem::size_of_val(&super::Endpoint::fetch_indexed(small, 1u64, 0));
        let large = std::mem::size_of_val(&super::Endpoint::fetch_indexed(large, [1u64; 64], 0));
        assert_eq!(
            large - small,
            512 - 8,
            "a 512-byte item grew the future by {}",
            large - small
        );
    }
}
