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

use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode};
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
    /// 1 000 items, no latency, no limit, no outages.
    fn default() -> Self {
        Self {
            items: 1_000,
            latency: Duration::ZERO,
            rate_limit: None,
            outage: None,
            record: false,
        }
    }
}

impl DemoConfig {
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
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    ok: AtomicU64,
    not_found: AtomicU64,
    too_many_requests: AtomicU64,
    unavailable: AtomicU64,
}

struct State {
    config: DemoConfig,
    started: Instant,
    limiter: Option<Limiter>,
    counters: Counters,
    arrivals: std::sync::Mutex<Vec<Arrival>>,
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
            config,
            started: Instant::now(),
            counters: Counters::default(),
            arrivals: std::sync::Mutex::default(),
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

    /// What the server has answered so far.
    pub fn counts(&self) -> DemoCounts {
        let c = &self.state.counters;
        DemoCounts {
            requests: c.requests.load(Ordering::Relaxed),
            ok: c.ok.load(Ordering::Relaxed),
            not_found: c.not_found.load(Ordering::Relaxed),
            too_many_requests: c.too_many_requests.load(Ordering::Relaxed),
            unavailable: c.unavailable.load(Ordering::Relaxed),
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
    // splitmix64: a fixed, well-spread hash of the id.
    let mut z = id.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    format!(
        "{}{}{}@example.{}",
        FIRST[(z % 8) as usize],
        LAST[((z >> 8) % 8) as usize],
        (z >> 16) % 100,
        DOMAIN[((z >> 24) % 3) as usize]
    )
}
