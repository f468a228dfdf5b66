//! [`MockTransport`]: a scripted server in the same process, on tokio's
//! clock, with a log of every call.
//!
//! Routes match by method and path pattern (`/items/{id}`, `/files/*`), in
//! the order they were mounted; the first match answers. A route answers
//! with a fixed [`MockResponse`], a sequence (the last one repeats), or a
//! closure of the request. Latency and faults are drawn from one seeded
//! random generator, so a run is the same every time under a
//! current-thread runtime with `start_paused = true`.
//!
//! ```
//! use std::time::Duration;
//! use sluicegate::mock::{Latency, MockResponse, MockTransport, Route};
//! use sluicegate::Transport;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let mock = MockTransport::new();
//! mock.mount(
//!     Route::get("/items/{id}")
//!         .latency(Latency::fixed(Duration::from_millis(20)))
//!         .respond_with(|req| MockResponse::json(&serde_json::json!({ "id": req.param("id") }))),
//! );
//!
//! let t0 = tokio::time::Instant::now();
//! let request = http::Request::get("http://mock/items/7").body(bytes::Bytes::new()).unwrap();
//! let response = mock.send(request).await.unwrap();
//! assert_eq!(response.body().as_ref(), br#"{"id":"7"}"#);
//!
//! let calls = mock.calls();
//! assert_eq!(calls[0].sent_at - t0, Duration::ZERO);
//! assert_eq!(calls[0].answered_at.unwrap() - t0, Duration::from_millis(20));
//! // Due and collected at the same instant: nothing held the answer up.
//! assert_eq!(calls[0].collected_at, calls[0].answered_at);
//! # }
//! ```

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use tokio::time::Instant;

use super::{Prepared, Transport};
use crate::error::{TransportError, TransportErrorKind};

/// An in-process transport that answers from scripted routes, for tests and
/// examples. Cheap to clone: clones share routes and the call log.
#[derive(Clone)]
pub struct MockTransport {
    inner: Arc<Inner>,
}

struct Inner {
    routes: RwLock<Vec<Arc<Route>>>,
    calls: Mutex<CallLog>,
    unmatched: Mutex<Unmatched>,
    rng: Mutex<fastrand::Rng>,
}

struct CallLog {
    enabled: bool,
    calls: Vec<Call>,
    count: usize,
}

impl Default for MockTransport {
    fn default() -> Self {
        Self::with_seed(0)
    }
}

impl fmt::Debug for MockTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockTransport")
            .field(
                "routes",
                &self.inner.routes.read().expect("mock lock").len(),
            )
            .field("calls", &self.call_count())
            .finish()
    }
}

impl MockTransport {
    /// A mock with no routes, whose random draws use seed 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// A mock whose random latency and faults are drawn from `seed`.
    pub fn with_seed(seed: u64) -> Self {
        Self {
            inner: Arc::new(Inner {
                routes: RwLock::new(Vec::new()),
                calls: Mutex::new(CallLog {
                    enabled: true,
                    calls: Vec::new(),
                    count: 0,
                }),
                unmatched: Mutex::new(Unmatched::NotFound),
                rng: Mutex::new(fastrand::Rng::with_seed(seed)),
            }),
        }
    }

    /// Adds a route. Routes are tried in the order they were mounted.
    pub fn mount(&self, route: Route) -> &Self {
        self.inner
            .routes
            .write()
            .expect("mock lock")
            .push(Arc::new(route));
        self
    }

    /// Chooses what a request that matches no route gets.
    pub fn on_unmatched(&self, unmatched: Unmatched) -> &Self {
        *self.inner.unmatched.lock().expect("mock lock") = unmatched;
        self
    }

    /// Turns the call log on or off (on by default). Long benchmarks turn it
    /// off so memory stays flat; [`call_count`](Self::call_count) still counts.
    pub fn record_calls(&self, enabled: bool) -> &Self {
        self.inner.calls.lock().expect("mock lock").enabled = enabled;
        self
    }

    /// Every call so far, in the order sent.
    pub fn calls(&self) -> Vec<Call> {
        self.inner.calls.lock().expect("mock lock").calls.clone()
    }

    /// How many requests were sent, logged or not.
    pub fn call_count(&self) -> usize {
        self.inner.calls.lock().expect("mock lock").count
    }

    /// Forgets the calls logged so far.
    pub fn clear_calls(&self) {
        let mut log = self.inner.calls.lock().expect("mock lock");
        log.calls.clear();
        log.count = 0;
    }

    fn record(&self, request: &Request<Bytes>, sent_at: Instant) -> Option<usize> {
        let mut log = self.inner.calls.lock().expect("mock lock");
        log.count += 1;
        if !log.enabled {
            return None;
        }
        log.calls.push(Call {
            method: request.method().clone(),
            uri: request.uri().clone(),
            headers: request.headers().clone(),
            body: request.body().clone(),
            sent_at,
            due_at: sent_at,
            answered_at: None,
            collected_at: None,
            outcome: None,
        });
        Some(log.calls.len() - 1)
    }

    fn schedule(&self, index: Option<usize>, due_at: Instant) {
        if let Some(index) = index {
            let mut log = self.inner.calls.lock().expect("mock lock");
            if let Some(call) = log.calls.get_mut(index) {
                call.due_at = due_at;
            }
        }
    }

    fn answer(&self, index: Option<usize>, outcome: Result<StatusCode, TransportErrorKind>) {
        if let Some(index) = index {
            let mut log = self.inner.calls.lock().expect("mock lock");
            if let Some(call) = log.calls.get_mut(index) {
                call.answered_at = Some(call.due_at);
                call.collected_at = Some(Instant::now());
                call.outcome = Some(outcome);
            }
        }
    }

    fn respond(&self, request: &Request<Bytes>) -> (MockResponse, Duration) {
        let routes = self.inner.routes.read().expect("mock lock");
        let path = request.uri().path();
        for route in routes.iter() {
            if route.method.as_ref().is_some_and(|m| m != request.method()) {
                continue;
            }
            let Some(params) = route.pattern.matches(path) else {
                continue;
            };
            let mut rng = self.inner.rng.lock().expect("mock lock");
            let latency = route.latency.draw(&mut rng);
            for (probability, fault) in &route.faults {
                if rng.f64() < *probability {
                    return (fault.clone(), latency);
                }
            }
            drop(rng);
            // The responder is user code: call it with no lock held, so it
            // may mount routes or read the call log.
            let route = Arc::clone(route);
            drop(routes);
            return (route.responder.respond(request, params), latency);
        }
        let message = format!("no mock route for {} {}", request.method(), path);
        let response = match *self.inner.unmatched.lock().expect("mock lock") {
            Unmatched::NotFound => MockResponse::status(StatusCode::NOT_FOUND).text(message),
            Unmatched::Error => {
                MockResponse::transport_error(TransportErrorKind::Other).text(message)
            }
        };
        (response, Duration::ZERO)
    }
}

impl Transport for MockTransport {
    /// The mock follows no redirect, so it has no use for the credential
    /// scope: the request goes as it is, without the extension.
    fn send_prepared(
        &self,
        request: Request<Bytes>,
        _prepared: Prepared,
    ) -> BoxFuture<'static, Result<Response<Bytes>, TransportError>> {
        self.send(request)
    }

    fn send(
        &self,
        request: Request<Bytes>,
    ) -> BoxFuture<'static, Result<Response<Bytes>, TransportError>> {
        let sent_at = Instant::now();
        let index = self.record(&request, sent_at);
        let (response, latency) = self.respond(&request);
        let head = sent_at + response.delay.unwrap_or(latency);
        let due_at = head + response.body_delay;
        self.schedule(index, due_at);
        let mock = self.clone();
        Box::pin(async move {
            // Two steps, as a real server's head and then its body: each
            // needs its own wake-up, so a stalled poller shows in `collected_at`.
            if head > sent_at {
                tokio::time::sleep_until(head).await;
            }
            if due_at > head {
                tokio::time::sleep_until(due_at).await;
            }
            let result = response.into_result();
            mock.answer(
                index,
                result.as_ref().map(Response::status).map_err(|e| e.kind()),
            );
            result
        })
    }
}

/// What a request that matches no route gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unmatched {
    /// A `404 Not Found` whose body names the method and path (the default).
    #[default]
    NotFound,
    /// A transport error of kind [`Other`](TransportErrorKind::Other).
    Error,
}

/// One request the mock received, as the call log records it.
#[derive(Clone)]
pub struct Call {
    /// The request method.
    pub method: Method,
    /// The full request URI.
    pub uri: Uri,
    /// The request headers.
    pub headers: HeaderMap,
    /// The request body.
    pub body: Bytes,
    /// When the request reached the mock, on tokio's clock.
    pub sent_at: Instant,
    /// When the answer was due: `sent_at` plus the latency drawn (or the
    /// response's own delays). Known from the moment the request arrives.
    pub due_at: Instant,
    /// When the mock answered: `Some(due_at)` once the answer was taken,
    /// `None` if the request was cancelled (or is still in flight).
    pub answered_at: Option<Instant>,
    /// When the caller actually took the answer, on tokio's clock. Later
    /// than `due_at` only if nobody polled the request when it was due: a
    /// stall that `answered_at` alone would hide.
    pub collected_at: Option<Instant>,
    /// The status answered, or the transport error raised; `None` while
    /// unanswered.
    pub outcome: Option<Result<StatusCode, TransportErrorKind>>,
}

impl Call {
    /// The path of the request URI.
    pub fn path(&self) -> &str {
        self.uri.path()
    }

    /// The status answered, if the call got a response.
    pub fn status(&self) -> Option<StatusCode> {
        self.outcome.and_then(Result::ok)
    }
}

impl fmt::Debug for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call")
            .field("method", &self.method)
            .field("uri", &self.uri)
            .field("sent_at", &self.sent_at)
            .field("due_at", &self.due_at)
            .field("answered_at", &self.answered_at)
            .field("collected_at", &self.collected_at)
            .field("outcome", &self.outcome)
            .finish_non_exhaustive()
    }
}

/// A request as a route's closure sees it, with the path parameters.
#[derive(Debug, Clone)]
pub struct MockRequest {
    /// The request method.
    pub method: Method,
    /// The full request URI.
    pub uri: Uri,
    /// The request headers.
    pub headers: HeaderMap,
    /// The request body.
    pub body: Bytes,
    params: Vec<(String, String)>,
}

impl MockRequest {
    /// The value of the path parameter `name` (`{name}` in the pattern).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value of query parameter `name`, percent-decoded.
    pub fn query(&self, name: &str) -> Option<String> {
        let query = self.uri.query()?;
        url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    /// The body decoded as JSON.
    ///
    /// # Errors
    ///
    /// The decoder's error when the body is not valid JSON for `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

/// A scripted answer: a response, or a transport error.
///
/// ```
/// use std::time::Duration;
/// use sluicegate::mock::MockResponse;
/// use sluicegate::TransportErrorKind;
///
/// let limited = MockResponse::status(429).header("retry-after", "2");
/// let customer = MockResponse::json(&serde_json::json!({ "email": "a@example.com" }));
/// let slow = MockResponse::ok().text("late").delay(Duration::from_secs(3));
/// let reset = MockResponse::transport_error(TransportErrorKind::Reset);
/// # let _ = (limited, customer, slow, reset);
/// ```
#[derive(Debug, Clone)]
#[must_use = "a MockResponse does nothing until mounted in a Route; its methods return a new one"]
pub struct MockResponse {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    delay: Option<Duration>,
    body_delay: Duration,
    error: Option<TransportErrorKind>,
}

impl MockResponse {
    /// `200 OK` with an empty body.
    pub fn ok() -> Self {
        Self::status(StatusCode::OK)
    }

    /// An empty response with `status`.
    ///
    /// # Panics
    ///
    /// If `status` is a number outside 100..=999.
    #[track_caller]
    pub fn status(status: impl TryInto<StatusCode>) -> Self {
        let Ok(status) = status.try_into() else {
            panic!("MockResponse::status: not an HTTP status code");
        };
        Self {
            status,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            delay: None,
            body_delay: Duration::ZERO,
            error: None,
        }
    }

    /// `200 OK` with `value` as a JSON body.
    ///
    /// # Panics
    ///
    /// If `value` cannot be serialized (a map with non-string keys, say).
    #[track_caller]
    pub fn json<T: serde::Serialize + ?Sized>(value: &T) -> Self {
        let body = serde_json::to_vec(value).expect("MockResponse::json: unserializable value");
        Self::ok()
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(body)
    }

    /// A transport error of `kind` instead of a response.
    pub fn transport_error(kind: TransportErrorKind) -> Self {
        Self {
            error: Some(kind),
            ..Self::ok()
        }
    }

    /// Replaces the body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Replaces the body with `text` (for an error, sets its message).
    pub fn text(self, text: impl Into<String>) -> Self {
        self.body(text.into())
    }

    /// Adds a header.
    ///
    /// # Panics
    ///
    /// If the name or value is not valid in HTTP.
    #[track_caller]
    pub fn header<K, V>(mut self, name: K, value: V) -> Self
    where
        K: TryInto<HeaderName>,
        V: TryInto<HeaderValue>,
    {
        let (Ok(name), Ok(value)) = (name.try_into(), value.try_into()) else {
            panic!("MockResponse::header: invalid header name or value");
        };
        self.headers.append(name, value);
        self
    }

    /// Answers after `delay` instead of the route's latency.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Sends the body `delay` after the head, as a slow server would: the
    /// answer is due at the head's time plus `delay`, and reaching it takes
    /// two separate wake-ups of whoever polls the request.
    pub fn body_delay(mut self, delay: Duration) -> Self {
        self.body_delay = delay;
        self
    }

    fn into_result(self) -> Result<Response<Bytes>, TransportError> {
        if let Some(kind) = self.error {
            let message = String::from_utf8_lossy(&self.body).into_owned();
            return Err(TransportError::new(kind, message));
        }
        let mut response = Response::new(self.body);
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        Ok(response)
    }
}

type RespondFn = dyn Fn(&MockRequest) -> MockResponse + Send + Sync;

enum Responder {
    Fixed(MockResponse),
    Sequence(Vec<MockResponse>, AtomicUsize),
    Closure(Box<RespondFn>),
}

impl Responder {
    fn respond(&self, request: &Request<Bytes>, params: Vec<(String, String)>) -> MockResponse {
        match self {
            Self::Fixed(response) => response.clone(),
            Self::Sequence(responses, next) => {
                let i = next
                    .fetch_add(1, Ordering::Relaxed)
                    .min(responses.len() - 1);
                responses[i].clone()
            }
            // Only a closure looks at the request: copy it out for that alone.
            Self::Closure(f) => f(&MockRequest {
                method: request.method().clone(),
                uri: request.uri().clone(),
                headers: request.headers().clone(),
                body: request.body().clone(),
                params,
            }),
        }
    }
}

/// How long a route takes to answer, on tokio's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Latency {
    /// Answer at once (the default).
    #[default]
    Zero,
    /// Always this long.
    Fixed(Duration),
    /// Uniformly drawn between the two bounds (inclusive), from the mock's
    /// seeded generator.
    Uniform(Duration, Duration),
}

impl Latency {
    /// Always `d`.
    pub fn fixed(d: Duration) -> Self {
        Self::Fixed(d)
    }

    /// Uniform in `low..=high`.
    ///
    /// # Panics
    ///
    /// If `low > high`.
    #[track_caller]
    pub fn uniform(low: Duration, high: Duration) -> Self {
        assert!(low <= high, "Latency::uniform: low must not exceed high");
        Self::Uniform(low, high)
    }

    fn draw(&self, rng: &mut fastrand::Rng) -> Duration {
        match *self {
            Self::Zero => Duration::ZERO,
            Self::Fixed(d) => d,
            Self::Uniform(low, high) => {
                let (low, high) = (low.as_nanos() as u64, high.as_nanos() as u64);
                Duration::from_nanos(rng.u64(low..=high))
            }
        }
    }
}

/// One scripted endpoint of a [`MockTransport`].
///
/// ```
/// use std::time::Duration;
/// use sluicegate::mock::{Latency, MockResponse, MockTransport, Route};
///
/// let mock = MockTransport::with_seed(7);
/// mock.mount(
///     Route::get("/items/{id}")
///         // 10 to 50 ms, drawn from the mock's seeded generator
///         .latency(Latency::uniform(Duration::from_millis(10), Duration::from_millis(50)))
///         // one answer in ten is a 503, also seeded
///         .fault(0.1, MockResponse::status(503).header("retry-after", "1"))
///         .respond_with(|r| MockResponse::json(&serde_json::json!({ "id": r.param("id") }))),
/// );
/// mock.mount(Route::post("/login").sequence([MockResponse::status(401), MockResponse::ok()]));
/// ```
#[must_use = "a Route does nothing until mounted with MockTransport::mount; its methods return a new one"]
pub struct Route {
    method: Option<Method>,
    pattern: PathPattern,
    responder: Responder,
    latency: Latency,
    faults: Vec<(f64, MockResponse)>,
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field("method", &self.method)
            .field("pattern", &self.pattern.source)
            .field("latency", &self.latency)
            .finish_non_exhaustive()
    }
}

impl Route {
    /// A route for `method` on `pattern`, answering `200 OK` until told
    /// otherwise. In the pattern, `{name}` matches one path segment and a
    /// final `*` matches the rest of the path.
    pub fn new(method: Method, pattern: &str) -> Self {
        Self {
            method: Some(method),
            pattern: PathPattern::parse(pattern),
            responder: Responder::Fixed(MockResponse::ok()),
            latency: Latency::Zero,
            faults: Vec::new(),
        }
    }

    /// A `GET` route.
    pub fn get(pattern: &str) -> Self {
        Self::new(Method::GET, pattern)
    }

    /// A `POST` route.
    pub fn post(pattern: &str) -> Self {
        Self::new(Method::POST, pattern)
    }

    /// A route for any method.
    pub fn any(pattern: &str) -> Self {
        Self {
            method: None,
            ..Self::new(Method::GET, pattern)
        }
    }

    /// Always answers `response`.
    pub fn respond(mut self, response: MockResponse) -> Self {
        self.responder = Responder::Fixed(response);
        self
    }

    /// Answers with each response in turn, then repeats the last one.
    ///
    /// # Panics
    ///
    /// If `responses` is empty.
    #[track_caller]
    pub fn sequence(mut self, responses: impl IntoIterator<Item = MockResponse>) -> Self {
        let responses: Vec<_> = responses.into_iter().collect();
        assert!(!responses.is_empty(), "Route::sequence: no responses given");
        self.responder = Responder::Sequence(responses, AtomicUsize::new(0));
        self
    }

    /// Answers with whatever `f` makes of the request.
    pub fn respond_with<F>(mut self, f: F) -> Self
    where
        F: Fn(&MockRequest) -> MockResponse + Send + Sync + 'static,
    {
        self.responder = Responder::Closure(Box::new(f));
        self
    }

    /// Sets the route's latency.
    pub fn latency(mut self, latency: Latency) -> Self {
        self.latency = latency;
        self
    }

    /// With `probability` (0.0 to 1.0, drawn from the mock's seeded
    /// generator), answers `response` instead; faults are tried in the order
    /// added.
    ///
    /// # Panics
    ///
    /// If `probability` is not within 0.0..=1.0.
    #[track_caller]
    pub fn fault(mut self, probability: f64, response: MockResponse) -> Self {
        assert!(
            (0.0..=1.0).contains(&probability),
            "Route::fault: probability must be within 0.0..=1.0"
        );
        self.faults.push((probability, response));
        self
    }
}

#[derive(Debug)]
enum Segment {
    Literal(String),
    Param(String),
    Rest,
}

#[derive(Debug)]
struct PathPattern {
    source: String,
    segments: Vec<Segment>,
}

impl PathPattern {
    fn parse(pattern: &str) -> Self {
        let segments = pattern
            .trim_start_matches('/')
            .split('/')
            .map(|s| {
                if s == "*" {
                    Segment::Rest
                } else if let Some(name) = s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Segment::Param(name.to_owned())
                } else {
                    Segment::Literal(s.to_owned())
                }
            })
            .collect();
        Self {
            source: pattern.to_owned(),
            segments,
        }
    }

    fn matches(&self, path: &str) -> Option<Vec<(String, String)>> {
        let mut parts = path.trim_start_matches('/').split('/');
        let mut params = Vec::new();
        for segment in &self.segments {
            match segment {
                Segment::Rest => return Some(params),
                Segment::Literal(lit) => {
                    if parts.next()? != lit {
                        return None;
                    }
                }
                Segment::Param(name) => {
                    let value = parts.next().filter(|v| !v.is_empty())?;
                    params.push((name.clone(), value.to_owned()));
                }
            }
        }
        parts.next().is_none().then_some(params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_segments_params_and_rest() {
        let p = PathPattern::parse("/items/{id}");
        assert_eq!(
            p.matches("/items/42"),
            Some(vec![("id".into(), "42".into())])
        );
        assert_eq!(p.matches("/items"), None);
        assert_eq!(p.matches("/items/"), None);
        assert_eq!(p.matches("/items/42/x"), None);
        assert_eq!(PathPattern::parse("/").matches("/"), Some(vec![]));
        assert_eq!(PathPattern::parse("/items").matches("/items"), Some(vec![]));
        assert!(PathPattern::parse("/files/*")
            .matches("/files/a/b")
            .is_some());
    }
}
