//! Async HTTP dataflow pipelines from `Stream` combinators, on tokio.
//!
//! Fetch a list, unpack it, fan out one request per item under a rate
//! limit and a concurrency limit, retry what the server asks to retry, stall
//! the whole graph when the server says it is overloaded, and account for
//! every item at the end: each output carries the input item it came from,
//! as a result or as an error.
//!
//! The pipeline of the lesson this grew from, on the scripted
//! [`MockTransport`](mock::MockTransport) in virtual time (in production,
//! [`ReqwestTransport`] against a real server):
//!
//! ```
//! use sluicegate::prelude::*; // Duration, StatusCode, stream, the mock, the combinators
//!
//! #[derive(serde::Deserialize, serde::Serialize)]
//! struct Customer {
//!     email: String,
//! }
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mock = MockTransport::new();
//! mock.mount(Route::get("/items").respond(MockResponse::json(&[1, 2, 3])));
//! mock.mount(Route::get("/items/{id}").respond_with(|r| {
//!     MockResponse::json(&serde_json::json!({ "email": format!("{}@example.com", r.param("id").unwrap()) }))
//! }));
//!
//! let client = Client::builder()
//!     .transport(mock.clone())
//!     .base_url("http://127.0.0.1:8080")
//!     .rate(Rate::per_second(100).burst(10)) // one budget for every request of this client
//!     .retry_on(429, Backoff::exponential(Duration::from_millis(100)).max_attempts(6))
//!     .pause_on(StatusCode::SERVICE_UNAVAILABLE, Duration::from_secs(10)) // stalls every stage
//!     .build()?;
//!
//! let out = std::env::temp_dir().join(format!("sluicegate-crate-doc-{}.jsonl", std::process::id()));
//! let report = stream::iter([()])
//!     .fetch_concurrent(1, client.get(|_: &()| "/items"))
//!     .flat_unpack::<u64>() // JSON array -> ids
//!     .try_fetch_concurrent(16, client.get(|id: &u64| format!("/items/{id}")))
//!     .json::<Customer>()
//!     .write_jsonl(&out) // failures go beside it, to a .failed.jsonl
//!     .await?;
//! assert_eq!((report.ok, report.failed), (3, 0));
//! assert_eq!(mock.call_count(), 4);
//! # std::fs::remove_file(&report.output)?;
//! # std::fs::remove_file(&report.dead_letters)?;
//! # Ok(())
//! # }
//! ```
//!
//! # Concepts
//!
//! - A [`Transport`] sends one `http::Request<Bytes>` and returns the whole
//!   response. [`ReqwestTransport`] (feature `reqwest`, default) for real
//!   HTTP, or `HyperTransport` (feature `hyper-transport`, default:
//!   straight over hyper-util's pool, the fastest; HTTP, HTTPS and SOCKS5
//!   proxies);
//!   [`MockTransport`](mock::MockTransport) (always built) for tests,
//!   with scripted routes, latency and faults on tokio's clock, and a call log.
//! - A [`Client`] bundles a transport, base URL, default headers, a shared
//!   [`Limiter`], a shared [`PauseHandle`], timeouts and default retry rules.
//!   [`Client::get`] and [`Client::request`] make [`Endpoint`]s: how an item
//!   becomes a request.
//! - [`SluiceExt`] adds the combinators: [`throttle`](SluiceExt::throttle),
//!   [`fetch_concurrent`](SluiceExt::fetch_concurrent),
//!   [`json`](SluiceExt::json), [`flat_unpack`](SluiceExt::flat_unpack),
//!   [`write_jsonl`](SluiceExt::write_jsonl).
//! - Every output carries its input item: [`Fetched`] or [`FetchError`];
//!   [`Failure`] erases the item type where stages with different items meet.
//! - [`Limiter`] (GCRA, shared, fair, optionally [`Adaptive`]) and
//!   [`PauseHandle`] (a shared deadline) are what every fetch waits on.
//! - [`Stats`] count everything per client or stage; each attempt is a
//!   `sluicegate::fetch` tracing span with events before and after it.
//!
//! # Time
//!
//! Every operator reads time only through tokio, so a pipeline on the mock
//! runs under `#[tokio::test(start_paused = true)]` in virtual time and tests
//! assert exact instants. No global state: a pipeline runs on whatever tokio
//! runtime its caller built.
//!
//! # Layout
//!
//! Floors, from the bottom up; every import points down.
//!
//! 1. `error`, `task`, `body`, `pause` — [`FetchError`] and friends; a
//!    future run as its own task (aborted when its holder drops); what a
//!    body decodes to ([`Decoded`], [`Element`]) and JSON pointer
//!    location; [`PauseHandle`], a shared deadline.
//! 2. `transport`, `request`, `rate`, `stats` — the [`Transport`] trait
//!    (reqwest, tower and [`mock`] transports); [`RequestSpec`]; [`Rate`];
//!    [`Stats`].
//! 3. [`retry`] — matchers, backoff policies, retry budgets, `Retry-After`:
//!    pure decisions.
//! 4. `limiter` — the shared, fair [`Limiter`] (its line, the pure GCRA /
//!    fixed-window pacing, advertised quotas, the opt-in learner) and
//!    [`KeyedLimiter`]; a remote budget plugs in through a small trait.
//! 5. `policy`, `attempt` — [`Policy`] and [`WithPolicy`] (the rules,
//!    timeouts and extra limits of a fetch, set in one place); the attempt
//!    loop every operator runs per item (gate, attempt, verdict, wait).
//! 6. `client`, `step` — [`Client`] (turns a spec into the request every
//!    transport gets); [`Step`] (any async step under the same flow control).
//! 7. `endpoint` — [`Endpoint`]: what one HTTP attempt is; `Client::get`.
//! 8. [`etl`] — pagination, JSONL in and out, dead letters, resumable runs.
//! 9. `ext` — the [`SluiceExt`] trait; one file per combinator beneath it
//!    (`throttle`, `fetch_concurrent`, `map_concurrent`, `flat_unpack`,
//!    `json`, `progress`), the shared admission machinery in `concurrent`.
//!    `redis` — a `Limiter`, a `PauseHandle` and a work queue shared by many
//!    processes through Redis (feature `redis`).
//! 10. `demo` — an in-process server of the `/items` and GitHub-style APIs
//!     (feature `demo`).
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

mod attempt;
mod body;
mod client;
#[cfg(feature = "demo")]
pub mod demo;
mod endpoint;
mod error;
pub mod etl;
mod ext;
mod limiter;
mod pause;
mod policy;
mod rate;
#[cfg(feature = "redis")]
pub mod redis;
mod request;
pub mod retry;
mod stats;
mod step;
mod task;
mod transport;

pub use crate::client::{Client, ClientBuilder};
pub use crate::endpoint::{Endpoint, Fetched};
pub use crate::error::{
    BuildError, Failure, FetchError, FetchErrorKind, TimeoutScope, TransportError,
    TransportErrorKind,
};
pub use crate::ext::{
    Decoded, Element, FetchConcurrent, FetchResult, FlatUnpack, Items, Json, MapConcurrent,
    Results, SluiceExt, StageError, StageInput, Throttle,
};
#[cfg(feature = "progress")]
pub use crate::ext::{Progress, WithProgress};
pub use crate::limiter::{Adaptive, KeyedLimiter, Limiter, NotUntil};
pub use crate::pause::PauseHandle;
pub use crate::policy::{Policy, WithPolicy};
pub use crate::rate::{Rate, RateMode};
pub use crate::request::{BuiltRequest, RequestSpec};
pub use crate::stats::{LatencySummary, Stats, StatsSnapshot};
pub use crate::step::Step;
#[cfg(feature = "hyper-transport")]
pub use crate::transport::HyperTransport;
#[cfg(feature = "reqwest")]
pub use crate::transport::ReqwestTransport;
#[cfg(feature = "tower")]
pub use crate::transport::TowerTransport;
pub use crate::transport::Transport;

pub use crate::transport::mock;

/// The `http` crate this one is built on, so `http::StatusCode`,
/// `http::Method` and the request and response types need no dependency of
/// their own (and can never be a second, mismatched version).
pub use http;
/// The `reqwest` crate (0.13) [`ReqwestTransport`] wraps (feature
/// `reqwest`), for building a `reqwest::Client` to hand to it; see
/// [`ReqwestTransport::client_builder`].
#[cfg(feature = "reqwest")]
pub use reqwest;

/// What a pipeline usually needs, so one `use sluicegate::prelude::*;`
/// compiles the README's snippets: the combinators, `futures`' stream
/// traits and `stream` module, `Duration`, `StatusCode`, the client and
/// retry types, the mock transport, and the ETL ends.
///
/// ```
/// use sluicegate::prelude::*;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mock = MockTransport::new();
/// mock.mount(Route::get("/items").respond(MockResponse::json(&[1, 2, 3])));
/// let client = Client::builder().transport(mock).base_url("http://mock").build()?;
/// let ids: Vec<u64> = stream::iter([()])
///     .fetch_concurrent(1, client.get(|_: &()| "/items").retry_on(StatusCode::TOO_MANY_REQUESTS, Backoff::constant(Duration::from_millis(100))))
///     .flat_unpack::<u64>()
///     .try_collect()
///     .await?;
/// assert_eq!(ids, [1, 2, 3]);
/// # Ok(())
/// # }
/// ```
pub mod prelude {
    pub use crate::etl::{paginate, read_jsonl, Journal, Pagination, Report};
    pub use crate::mock::{MockResponse, MockTransport, Route};
    pub use crate::retry::{Backoff, Matcher, PausePolicy, RetryBudget};
    #[cfg(feature = "hyper-transport")]
    pub use crate::HyperTransport;
    #[cfg(feature = "reqwest")]
    pub use crate::ReqwestTransport;
    #[cfg(feature = "tower")]
    pub use crate::TowerTransport;
    pub use crate::{
        Client, Decoded, Endpoint, Failure, FetchError, FetchErrorKind, Fetched, KeyedLimiter,
        Limiter, PauseHandle, Rate, RequestSpec, SluiceExt, Stats, Step, Transport, WithPolicy,
    };
    pub use futures::{stream, StreamExt, TryStreamExt};
    pub use http::StatusCode;
    pub use std::time::Duration;
}

/// The README's code blocks, compiled and run as doctests so that they
/// cannot drift from the crate.
#[cfg(all(
    doctest,
    feature = "demo",
    feature = "reqwest",
    feature = "hyper-transport",
    feature = "tower",
    feature = "redis"
))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
