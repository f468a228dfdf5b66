//! An in-process HTTP server speaking the lesson's `/items` API, for the
//! examples, the real-socket tests and the benchmarks (feature `demo`).
//!
//! - `GET /` → `Hello, world`
//! - `GET /items` → a JSON array of ids `0..items`
//! - `GET /items/{id}` → `{"email": "..."}`, the same for an id every time;
//!   `404` past the end
//! - `GET /customers?cursor=K` → a page of `{"id", "email"}` records, with
//!   the next page in a `Link` header and in `"next_cursor"`
//!
//! Optionally it answers `429 Too Many Requests` with `Retry-After` above a
//! server-side [`Rate`], and `503 Service Unavailable` with `Retry-After`
//! during periodic outages. It binds `127.0.0.1:0` only.
//!
//! # A GitHub-style API
//!
//! Beside the lesson's routes, a small API shaped like GitHub's REST API,
//! for the pipelines people write against it first:
//!
//! - `GET /orgs/{org}/repos?page=N&per_page=M` → a JSON array of repos
//!   (`{"id", "name", "full_name", "url", "contributors_url"}`, absolute
//!   URLs), [`DemoConfig::repos`] of them in pages of 30 (`per_page` up to
//!   100); the other pages in a `Link` header with absolute URLs
//!   (`rel="next"`, `"last"`, `"first"`, `"prev"`); a page past the last is
//!   an empty array
//! - `GET /repos/{org}/{name}` → the repo's details (`description`,
//!   `language`, `stargazers_count`, `forks_count`, `open_issues_count`)
//! - `GET /repos/{org}/{name}/contributors` → a JSON array of
//!   `{"login", "contributions"}`, or, as GitHub does for a repo with no
//!   contributors, `204 No Content` with an empty body
//!
//! Every one of them wants `Authorization: Bearer <token>` (or GitHub's
//! older `token <token>`) with [`DemoConfig::api_token`]'s token
//! ([`DEMO_TOKEN`] by default), and answers `401` with a JSON `message`
//! otherwise. Every authenticated answer carries GitHub's quota headers:
//! `x-ratelimit-limit`, `x-ratelimit-remaining`, `x-ratelimit-used`,
//! `x-ratelimit-reset` (a Unix time, in seconds) and the server's `Date`.
//! The quota ([`DemoConfig::api_quota`], 5 000 an hour by default) is
//! counted in fixed windows aligned on Unix time; a request beyond it is
//! refused with `403` (GitHub's primary limit) or `429` (with
//! `Retry-After`), `x-ratelimit-remaining: 0`, and is not counted.
//! [`DemoServer::counts`] has the refusals, so a test can assert that a
//! client obeyed the quota.
//!
//! ```
//! use sluicegate::demo::{DemoConfig, DemoServer, DEMO_TOKEN};
//! use sluicegate::prelude::*;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let server = DemoServer::start(
//!     DemoConfig::default().repos(3).api_quota(2, Duration::from_secs(60), StatusCode::FORBIDDEN),
//! )
//! .await?;
//! let client = Client::builder()
//!     .base_url(server.url())
//!     .default_header("authorization", format!("Bearer {DEMO_TOKEN}"))
//!     .build()?;
//! let page = client.send("/orgs/demo/repos?per_page=2").await?;
//! assert_eq!(page.headers()["x-ratelimit-remaining"], "1");
//! assert!(page.headers()["link"].to_str()?.contains(r#"page=2&per_page=2>; rel="next""#));
//! // The second request of the window spends the quota, and the client
//! // holds the third until the reset it was told (up to a minute here).
//! client.send("/repos/demo/repo-0").await?;
//! assert_eq!(server.counts().forbidden, 0);
//! // Without the token: 401, not counted against the quota.
//! let anonymous = Client::builder().base_url(server.url()).build()?;
//! let err = anonymous.send("/repos/demo/repo-0").await.unwrap_err();
//! assert_eq!(err.status(), Some(StatusCode::UNAUTHORIZED));
//! # Ok(())
//! # }
//! ```
//!
//! # An ingest endpoint
//!
//! - `POST /orders` with a JSON object holding a numeric `"id"` → `201`
//!   with `{"id", "receipt"}`; `422` when the body is not such an object.
//!
//! With [`DemoConfig::flaky_orders`] it misbehaves on a fixed schedule:
//! an order whose id is a multiple of `broken_every` is answered `500`
//! for its first `broken_for` attempts, and every `throttle_every`-th POST
//! of the others is answered `429` with `Retry-After: 1` (so a broken
//! order's attempts are all 500s, and how many it takes is known). An order stored twice is counted
//! in [`DemoCounts::duplicate_orders`], unless the repeat carries an
//! `Idempotency-Key` header (then it is answered as the first time, and
//! stored once).
//!
//! The server's clock is tokio's: its date is [`DemoConfig::date`] (a
//! fixed date by default, [`DemoConfig::DEFAULT_DATE`]) moved on by `tokio::time`, so under a paused
//! clock its `Date` headers and quota windows move with virtual time.
//!
//! ```
//! use sluicegate::demo::{DemoConfig, DemoServer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! let server = DemoServer::start(DemoConfig::default().items(10)).await?;
//! assert!(server.url().starts_with("http://127.0.0.1:"));
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, DATE, LINK, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use crate::limiter::Limiter;
use crate::rate::Rate;

/// What the demo server serves and how it misbehaves.
#[derive(Debug, Clone)]
#[must_use = "a DemoConfig does nothing until given to DemoServer::start; its methods return a new one"]
pub struct DemoConfig {
    items: u64,
    latency: Duration,
    rate_limit: Option<Rate>,
    outage: Option<Outage>,
    record: bool,
    repos: u64,
    token: Token,
    quota: ApiQuota,
    date: Option<SystemTime>,
    orders: Option<OrderFaults>,
}

/// The API token, kept out of `Debug` output.
#[derive(Clone, PartialEq, Eq)]
struct Token(String);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sensitive")
    }
}

/// The token the GitHub-style routes accept unless told otherwise.
pub const DEMO_TOKEN: &str = "demo-token";

/// How many repos one page of `/orgs/{org}/repos` holds unless `per_page`
/// says otherwise (GitHub's default).
pub const REPOS_PER_PAGE: u64 = 30;

/// The GitHub-style routes' quota: `limit` requests per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiQuota {
    /// Requests allowed in one window.
    pub limit: u64,
    /// The window, in whole seconds; windows start at multiples of it in
    /// Unix time, so `x-ratelimit-reset` is a whole second.
    pub window: Duration,
    /// What a request beyond the quota is answered: `403 Forbidden` (as
    /// GitHub answers its primary limit) or `429 Too Many Requests` (with
    /// `Retry-After`).
    pub refusal: StatusCode,
}

/// How `POST /orders` misbehaves; see [`DemoConfig::flaky_orders`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderFaults {
    /// Every `throttle_every`-th POST (counting from 1) of an order that is
    /// not broken is answered `429` with `Retry-After: 1`; 0 for never.
    pub throttle_every: u64,
    /// Orders whose id is a multiple of this fail...; 0 for none.
    pub broken_every: u64,
    /// ...with `500` for their first `broken_for` attempts.
    pub broken_for: u32,
}

/// Periodic outages: every `every`, the server answers 503 for `lasting`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outage {
    /// Time between the starts of two outages; the first starts one
    /// `every` after the server does.
    pub every: Duration,
    /// How long each outage lasts.
    pub lasting: Duration,
}

impl Default for DemoConfig {
    /// 1 000 items, no latency, no limit, no outages; 100 repos behind
    /// [`DEMO_TOKEN`] with GitHub's quota of 5 000 an hour (refused with
    /// 403); orders that never fail.
    fn default() -> Self {
        Self {
            items: 1_000,
            latency: Duration::ZERO,
            rate_limit: None,
            outage: None,
            record: false,
            repos: 100,
            token: Token(DEMO_TOKEN.to_owned()),
            quota: ApiQuota {
                limit: 5_000,
                window: Duration::from_secs(3_600),
                refusal: StatusCode::FORBIDDEN,
            },
            date: None,
            orders: None,
        }
    }
}

impl DemoConfig {
    /// The date a demo server starts at unless told otherwise, as time
    /// since the Unix epoch: a fixed one (2026-01-01T00:00:00Z), so that
    /// its `Date` headers and Unix resets are the same on every run and no
    /// system clock is read.
    pub const DEFAULT_DATE: std::time::Duration = std::time::Duration::from_secs(1_767_225_600);

    /// Serves ids `0..n`.
    pub fn items(mut self, n: u64) -> Self {
        self.items = n;
        self
    }

    /// Waits `latency` before every answer.
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Answers 429 with `Retry-After` to requests above `rate`.
    pub fn rate_limit(mut self, rate: Rate) -> Self {
        self.rate_limit = Some(rate);
        self
    }

    /// Keeps a log of every request's arrival time and answer, for
    /// measurements ([`DemoServer::arrivals`]); off by default so long runs
    /// stay small.
    pub fn record_arrivals(mut self, yes: bool) -> Self {
        self.record = yes;
        self
    }

    /// Answers 503 with `Retry-After` during periodic outages.
    ///
    /// # Panics
    ///
    /// If `lasting` is not shorter than `every`.
    #[track_caller]
    pub fn outages(mut self, every: Duration, lasting: Duration) -> Self {
        assert!(lasting < every, "an outage must be shorter than its period");
        self.outage = Some(Outage { every, lasting });
        self
    }

    /// Lists repos `repo-0..repo-{n-1}` on the GitHub-style routes.
    pub fn repos(mut self, n: u64) -> Self {
        self.repos = n;
        self
    }

    /// The bearer token the GitHub-style routes want (default
    /// [`DEMO_TOKEN`]).
    pub fn api_token(mut self, token: impl Into<String>) -> Self {
        self.token = Token(token.into());
        self
    }

    /// The GitHub-style routes' quota: `limit` requests per `window`,
    /// refused with `refusal` (403 or 429) beyond it.
    ///
    /// # Panics
    ///
    /// If `window` is not a whole, non-zero number of seconds, `limit` is
    /// 0, or `refusal` is neither 403 nor 429.
    #[track_caller]
    pub fn api_quota(mut self, limit: u64, window: Duration, refusal: StatusCode) -> Self {
        assert!(
            window.as_secs() > 0 && window.subsec_nanos() == 0,
            "the quota window must be whole seconds: its reset is a Unix time in seconds"
        );
        assert!(limit > 0, "a quota of zero requests serves nothing");
        assert!(
            matches!(
                refusal,
                StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS
            ),
            "a quota refusal is 403 or 429"
        );
        self.quota = ApiQuota {
            limit,
            window,
            refusal,
        };
        self
    }

    /// The server's date when it starts (default
    /// [`DEFAULT_DATE`](Self::DEFAULT_DATE)), from
    /// which tokio's clock moves it on: a fixed date makes `Date` headers
    /// and quota resets the same on every run.
    pub fn date(mut self, date: SystemTime) -> Self {
        self.date = Some(date);
        self
    }

    /// Makes `POST /orders` misbehave on a fixed schedule: an order whose
    /// id is a multiple of `broken_every` gets a 500 for its first
    /// `broken_for` attempts, and every `throttle_every`-th POST of the
    /// others gets a 429 with `Retry-After: 1` (0 turns either off).
    pub fn flaky_orders(mut self, faults: OrderFaults) -> Self {
        self.orders = Some(faults);
        self
    }
}

/// Counts of what the demo server answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DemoCounts {
    /// Every request received.
    pub requests: u64,
    /// `200` answers.
    pub ok: u64,
    /// `404` answers.
    pub not_found: u64,
    /// `429` answers.
    pub too_many_requests: u64,
    /// `503` answers.
    pub unavailable: u64,
    /// `401` answers: a GitHub-style route without the right token.
    pub unauthorized: u64,
    /// `403` answers: the GitHub-style quota spent.
    pub forbidden: u64,
    /// `500` answers: a broken order.
    pub server_errors: u64,
    /// Orders stored again without an `Idempotency-Key`.
    pub duplicate_orders: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    ok: AtomicU64,
    not_found: AtomicU64,
    too_many_requests: AtomicU64,
    unavailable: AtomicU64,
    unauthorized: AtomicU64,
    forbidden: AtomicU64,
    server_errors: AtomicU64,
    duplicate_orders: AtomicU64,
}

/// The quota window being counted: which one (its start over its length,
/// in Unix seconds) and how much of it is used.
#[derive(Default)]
struct QuotaWindow {
    index: u64,
    used: u64,
}

#[derive(Default)]
struct Orders {
    posts: u64,
    failures: HashMap<u64, u32>,
    stored: HashSet<u64>,
}

struct State {
    config: DemoConfig,
    addr: SocketAddr,
    started: Instant,
    /// The date at `started`; the server's date is this plus tokio's
    /// elapsed time, so it follows a paused clock.
    date: SystemTime,
    limiter: Option<Limiter>,
    counters: Counters,
    arrivals: std::sync::Mutex<Vec<Arrival>>,
    /// Requests per path and query, when recording.
    targets: std::sync::Mutex<BTreeMap<String, u64>>,
    quota: std::sync::Mutex<QuotaWindow>,
    orders: std::sync::Mutex<Orders>,
}

/// One request as the demo server saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// When it arrived, since the server started.
    pub at: Duration,
    /// What it was answered.
    pub status: u16,
}

/// A running demo server. Dropping it stops it and closes its connections.
pub struct DemoServer {
    addr: SocketAddr,
    state: Arc<State>,
    _accept: AbortOnDropHandle<()>,
}

impl DemoServer {
    /// Binds `127.0.0.1:0` and serves `config` on the current runtime.
    ///
    /// # Errors
    ///
    /// If the socket cannot be bound.
    pub async fn start(config: DemoConfig) -> io::Result<Self> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            limiter: config.rate_limit.map(Limiter::new),
            date: config
                .date
                .unwrap_or(SystemTime::UNIX_EPOCH + DemoConfig::DEFAULT_DATE),
            config,
            addr,
            started: Instant::now(),
            counters: Counters::default(),
            arrivals: std::sync::Mutex::default(),
            targets: std::sync::Mutex::default(),
            quota: std::sync::Mutex::default(),
            orders: std::sync::Mutex::default(),
        });
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        Ok(Self {
            addr,
            state,
            _accept: AbortOnDropHandle::new(accept),
        })
    }

    /// The address bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, for a client's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far, when [`DemoConfig::record_arrivals`] is on.
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.state.arrivals.lock().expect("arrivals lock").clone()
    }

    /// How many requests each path (with its query) received, when
    /// [`DemoConfig::record_arrivals`] is on: to check that a pipeline
    /// asked for every page and item once.
    pub fn requests_by_target(&self) -> BTreeMap<String, u64> {
        self.state.targets.lock().expect("targets lock").clone()
    }

    /// The server's date now: [`DemoConfig::date`] moved on by tokio's
    /// clock.
    pub fn date(&self) -> SystemTime {
        self.state.now()
    }

    /// What the server has answered so far.
    pub fn counts(&self) -> DemoCounts {
        let c = &self.state.counters;
        DemoCounts {
            requests: c.requests.load(Ordering::Relaxed),
            ok: c.ok.load(Ordering::Relaxed),
            not_found: c.not_found.load(Ordering::Relaxed),
            too_many_requests: c.too_many_requests.load(Ordering::Relaxed),
            unavailable: c.unavailable.load(Ordering::Relaxed),
            unauthorized: c.unauthorized.load(Ordering::Relaxed),
            forbidden: c.forbidden.load(Ordering::Relaxed),
            server_errors: c.server_errors.load(Ordering::Relaxed),
            duplicate_orders: c.duplicate_orders.load(Ordering::Relaxed),
        }
    }
}

impl fmt::Debug for DemoServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DemoServer")
            .field("addr", &self.addr)
            .field("config", &self.state.config)
            .finish()
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    // Connections live in this set, so aborting the loop closes them all.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let state = state.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, req).await) }
                    });
                    // A client hanging up mid-request is not the server's problem.
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn handle(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let at = state.started.elapsed();
    if state.config.record {
        let target = request
            .uri()
            .path_and_query()
            .map_or_else(|| request.uri().path().to_owned(), |pq| pq.to_string());
        *state
            .targets
            .lock()
            .expect("targets lock")
            .entry(target)
            .or_default() += 1;
    }
    let response = answer(state, request).await;
    if state.config.record {
        let status = response.status().as_u16();
        state
            .arrivals
            .lock()
            .expect("arrivals lock")
            .push(Arrival { at, status });
    }
    response
}

async fn answer(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let counters = &state.counters;
    counters.requests.fetch_add(1, Ordering::Relaxed);
    if !state.config.latency.is_zero() {
        tokio::time::sleep(state.config.latency).await;
    }
    if let Some(wait) = state.outage_left() {
        counters.unavailable.fetch_add(1, Ordering::Relaxed);
        return refusal(StatusCode::SERVICE_UNAVAILABLE, wait);
    }
    if let Some(limiter) = &state.limiter {
        if let Err(refused) = limiter.check() {
            counters.too_many_requests.fetch_add(1, Ordering::Relaxed);
            return refusal(
                StatusCode::TOO_MANY_REQUESTS,
                refused.wait_from(Instant::now()),
            );
        }
    }
    let path = request.uri().path();
    if path.starts_with("/orgs/") || path.starts_with("/repos/") {
        return api(state, &request);
    }
    if path == "/orders" && request.method() == Method::POST {
        return order(state, request).await;
    }
    let found = match (request.method(), path) {
        (&Method::GET, "/") => Some(text("Hello, world")),
        (&Method::GET, "/items") => Some(json(items_body(state.config.items))),
        (&Method::GET, "/customers") => {
            Some(customers_page(state.config.items, request.uri().query()))
        }
        (&Method::GET, _) => path
            .strip_prefix("/items/")
            .and_then(|id| id.parse::<u64>().ok())
            .filter(|id| *id < state.config.items)
            .map(|id| json(format!(r#"{{"email": "{}"}}"#, email(id)))),
        _ => None,
    };
    match found {
        Some(response) => {
            counters.ok.fetch_add(1, Ordering::Relaxed);
            response
        }
        None => {
            counters.not_found.fetch_add(1, Ordering::Relaxed);
            let mut response = text("not found");
            *response.status_mut() = StatusCode::NOT_FOUND;
            response
        }
    }
}

impl State {
    /// The server's date: the configured one moved on by tokio's clock.
    fn now(&self) -> SystemTime {
        self.date + self.started.elapsed()
    }

    /// Takes one request from the current quota window: what remains of
    /// it if the request fits, `None` if the window is spent; with the
    /// window's used count and reset (Unix seconds) either way.
    fn take_quota(&self, now: SystemTime) -> (Option<u64>, u64, u64) {
        let quota = self.config.quota;
        let window = quota.window.as_secs();
        let unix = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let index = unix / window;
        let mut current = self.quota.lock().expect("quota lock");
        if current.index != index {
            *current = QuotaWindow { index, used: 0 };
        }
        let reset = (index + 1) * window;
        if current.used < quota.limit {
            current.used += 1;
            (Some(quota.limit - current.used), current.used, reset)
        } else {
            (None, current.used, reset)
        }
    }

    /// How long the current outage still lasts, if one is on.
    fn outage_left(&self) -> Option<Duration> {
        let outage = self.config.outage?;
        let elapsed = self.started.elapsed();
        if elapsed < outage.every {
            return None;
        }
        let every = outage.every.as_nanos();
        let phase = Duration::from_nanos((elapsed.as_nanos() % every) as u64);
        (phase < outage.lasting).then(|| outage.lasting - phase)
    }
}

fn refusal(status: StatusCode, wait: Duration) -> Response<Full<Bytes>> {
    // Retry-After has whole seconds; round up so a client that obeys it
    // exactly is never early.
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let mut response = text(status.canonical_reason().unwrap_or("refused"));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(RETRY_AFTER, seconds.max(1).into());
    response
}

fn text(body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
    response
}

fn json(body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// How many customers one page of `/customers` holds.
pub const PAGE_SIZE: u64 = 50;

/// `GET /customers?cursor=K`: up to [`PAGE_SIZE`] customers from id `K`, with
/// the next page both as a `Link: <...>; rel="next"` header and as
/// `"next_cursor"` in the body (`null` on the last page).
fn customers_page(n: u64, query: Option<&str>) -> Response<Full<Bytes>> {
    let start = query
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("cursor=")))
        .and_then(|c| c.parse::<u64>().ok())
        .unwrap_or(0)
        .min(n);
    let end = (start + PAGE_SIZE).min(n);
    let customers: Vec<serde_json::Value> = (start..end)
        .map(|id| serde_json::json!({ "id": id, "email": email(id) }))
        .collect();
    let next = (end < n).then(|| end.to_string());
    let body = serde_json::json!({ "customers": customers, "next_cursor": next });
    let mut response = json(body.to_string());
    if let Some(next) = next {
        let link = format!("</customers?cursor={next}>; rel=\"next\"");
        response.headers_mut().insert(
            http::header::LINK,
            http::HeaderValue::from_str(&link).expect("ascii link"),
        );
    }
    response
}

fn items_body(n: u64) -> String {
    let mut body = String::with_capacity(n as usize * 6 + 2);
    body.push('[');
    for id in 0..n {
        if id > 0 {
            body.push_str(", ");
        }
        body.push_str(&id.to_string());
    }
    body.push(']');
    body
}

/// A GitHub-style route: token, quota, then the answer, with the quota
/// headers on every authenticated answer.
fn api(state: &State, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let counters = &state.counters;
    let expected = &state.config.token.0;
    let given = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let authorized = given.is_some_and(|v| {
        v.strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("token "))
            .is_some_and(|t| t == expected)
    });
    if !authorized {
        counters.unauthorized.fetch_add(1, Ordering::Relaxed);
        let message = if given.is_some() {
            "Bad credentials"
        } else {
            "Requires authentication"
        };
        return message_json(StatusCode::UNAUTHORIZED, message);
    }
    let now = state.now();
    let (taken, used, reset) = state.take_quota(now);
    let (mut response, remaining) = match taken {
        Some(remaining) => (api_answer(state, request), remaining),
        None => {
            let status = state.config.quota.refusal;
            let counter = if status == StatusCode::FORBIDDEN {
                &counters.forbidden
            } else {
                &counters.too_many_requests
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let mut response = message_json(status, "API rate limit exceeded");
            if status == StatusCode::TOO_MANY_REQUESTS {
                let unix = now.duration_since(UNIX_EPOCH).unwrap_or_default();
                let wait = Duration::from_secs(reset).saturating_sub(unix);
                let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, seconds.max(1).into());
            }
            (response, 0)
        }
    };
    match response.status() {
        StatusCode::OK | StatusCode::NO_CONTENT => {
            counters.ok.fetch_add(1, Ordering::Relaxed);
        }
        StatusCode::NOT_FOUND => {
            counters.not_found.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
    let headers = response.headers_mut();
    headers.insert("x-ratelimit-limit", state.config.quota.limit.into());
    headers.insert("x-ratelimit-remaining", remaining.into());
    headers.insert("x-ratelimit-used", used.into());
    headers.insert("x-ratelimit-reset", reset.into());
    headers.insert(
        "x-ratelimit-resource",
        http::HeaderValue::from_static("core"),
    );
    // The server's own date, so a client reads the Unix reset against the
    // same clock that set it (hyper would write the system's).
    headers.insert(
        DATE,
        http::HeaderValue::from_str(&httpdate::fmt_http_date(now)).expect("an HTTP date"),
    );
    response
}

/// The answer of an authorized GitHub-style request within its quota.
fn api_answer(state: &State, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let not_found = || message_json(StatusCode::NOT_FOUND, "Not Found");
    if request.method() != Method::GET {
        return not_found();
    }
    let segments: Vec<&str> = request.uri().path()[1..].split('/').collect();
    let repo = |org: &str, name: &str| {
        name.strip_prefix("repo-")
            .and_then(|i| i.parse::<u64>().ok())
            .filter(|i| *i < state.config.repos && !org.is_empty())
    };
    match segments[..] {
        ["orgs", org, "repos"] if !org.is_empty() => repos_page(state, org, request.uri().query()),
        ["repos", org, name] => match repo(org, name) {
            Some(i) => json(repo_details(state, org, i).to_string()),
            None => not_found(),
        },
        ["repos", org, name, "contributors"] => match repo(org, name) {
            Some(i) => contributors(i),
            None => not_found(),
        },
        _ => not_found(),
    }
}

/// A repo as a listing shows it.
fn repo_summary(state: &State, org: &str, i: u64) -> serde_json::Value {
    let full_name = format!("{org}/repo-{i}");
    let url = format!("http://{}/repos/{full_name}", state.addr);
    serde_json::json!({
        "id": 1_000 + i,
        "name": format!("repo-{i}"),
        "full_name": full_name,
        "contributors_url": format!("{url}/contributors"),
        "url": url,
    })
}

/// A repo as `/repos/{org}/{name}` shows it.
fn repo_details(state: &State, org: &str, i: u64) -> serde_json::Value {
    const LANGUAGES: [&str; 4] = ["Rust", "Python", "Go", "TypeScript"];
    let z = mix(i);
    let mut repo = repo_summary(state, org, i);
    let fields = [
        (
            "description",
            serde_json::json!(format!("Demo repository {i}")),
        ),
        ("language", serde_json::json!(LANGUAGES[(z % 4) as usize])),
        ("stargazers_count", serde_json::json!((z >> 8) % 5_000)),
        ("forks_count", serde_json::json!((z >> 24) % 300)),
        ("open_issues_count", serde_json::json!((z >> 40) % 50)),
    ];
    for (name, value) in fields {
        repo[name] = value;
    }
    repo
}

/// How many contributors repo `i` has: 0 to 5, the same every time.
pub fn contributor_count(i: u64) -> u64 {
    (mix(i) >> 48) % 6
}

/// `/repos/{org}/repo-{i}/contributors`: 204 with no body for a repo
/// without contributors, as GitHub answers.
fn contributors(i: u64) -> Response<Full<Bytes>> {
    let n = contributor_count(i);
    if n == 0 {
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::NO_CONTENT;
        return response;
    }
    let list: Vec<serde_json::Value> = (0..n)
        .map(|k| {
            serde_json::json!({
                "login": format!("user-{}", (mix(i + k) >> 16) % 1_000),
                "contributions": 100 / (k + 1),
            })
        })
        .collect();
    json(serde_json::Value::from(list).to_string())
}

/// `/orgs/{org}/repos?page=N&per_page=M`, with GitHub's `Link` header.
fn repos_page(state: &State, org: &str, query: Option<&str>) -> Response<Full<Bytes>> {
    let param = |name: &str| {
        query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let per_page = param("per_page").unwrap_or(REPOS_PER_PAGE).clamp(1, 100);
    let page = param("page").unwrap_or(1).max(1);
    let n = state.config.repos;
    let last = n.div_ceil(per_page).max(1);
    let start = (page - 1).saturating_mul(per_page).min(n);
    let end = (start + per_page).min(n);
    let repos: Vec<serde_json::Value> = (start..end).map(|i| repo_summary(state, org, i)).collect();
    let mut response = json(serde_json::Value::from(repos).to_string());
    let link = |p: u64, rel: &str| {
        format!(
            "<http://{}/orgs/{org}/repos?page={p}&per_page={per_page}>; rel=\"{rel}\"",
            state.addr
        )
    };
    let mut links = Vec::new();
    if page > 1 {
        links.push(link(page - 1, "prev"));
    }
    if page < last {
        links.push(link(page + 1, "next"));
        links.push(link(last, "last"));
    }
    if page > 1 {
        links.push(link(1, "first"));
    }
    if !links.is_empty() {
        if let Ok(value) = http::HeaderValue::from_str(&links.join(", ")) {
            response.headers_mut().insert(LINK, value);
        }
    }
    response
}

/// `POST /orders`: stores the order, or misbehaves as configured.
async fn order(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let counters = &state.counters;
    let idempotent = request.headers().contains_key("idempotency-key");
    // Orders are small; a body beyond 64 KiB is refused unread.
    let body = match http_body_util::Limited::new(request.into_body(), 64 * 1024)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => return message_json(StatusCode::PAYLOAD_TOO_LARGE, "body too large"),
    };
    let id = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("id").and_then(serde_json::Value::as_u64));
    let Some(id) = id else {
        return message_json(
            StatusCode::UNPROCESSABLE_ENTITY,
            "an order is a JSON object with a numeric \"id\"",
        );
    };
    let faults = state.config.orders;
    let mut orders = state.orders.lock().expect("orders lock");
    orders.posts += 1;
    if let Some(faults) = faults {
        if faults.broken_every > 0 && id.is_multiple_of(faults.broken_every) {
            let failed = orders.failures.entry(id).or_default();
            if *failed < faults.broken_for {
                *failed += 1;
                counters.server_errors.fetch_add(1, Ordering::Relaxed);
                return message_json(StatusCode::INTERNAL_SERVER_ERROR, "order store unavailable");
            }
        } else if faults.throttle_every > 0 && orders.posts.is_multiple_of(faults.throttle_every) {
            counters.too_many_requests.fetch_add(1, Ordering::Relaxed);
            return refusal(StatusCode::TOO_MANY_REQUESTS, Duration::from_secs(1));
        }
    }
    if !orders.stored.insert(id) && !idempotent {
        counters.duplicate_orders.fetch_add(1, Ordering::Relaxed);
    }
    drop(orders);
    counters.ok.fetch_add(1, Ordering::Relaxed);
    let mut response =
        json(serde_json::json!({ "id": id, "receipt": format!("r-{id}") }).to_string());
    *response.status_mut() = StatusCode::CREATED;
    response
}

fn message_json(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let mut response = json(serde_json::json!({ "message": message }).to_string());
    *response.status_mut() = status;
    response
}

/// splitmix64: a fixed, well-spread hash of `x`.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The email address the demo server gives item `id`: made up, but the
/// same for an id every time.
pub fn email(id: u64) -> String {
    const FIRST: [&str; 8] = [
        "judy", "tom", "pamela", "valerie", "kevin", "gabriela", "ronald", "kayla",
    ];
    const LAST: [&str; 8] = [
        "woods", "cantrell", "perkins", "robbins", "nash", "gomez", "rivera", "hudson",
    ];
    const DOMAIN: [&str; 3] = ["com", "net", "org"];
    let z = mix(id);
    format!(
        "{}{}{}@example.{}",
        FIRST[(z % 8) as usize],
        LAST[((z >> 8) % 8) as usize],
        (z >> 16) % 100,
        DOMAIN[((z >> 24) % 3) as usize]
    )
}
