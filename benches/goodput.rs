//! Goodput against servers that refuse and fail, in real time, each
//! scenario run by sluicegate with adaptive pacing and by a hand-written
//! client (reqwest + `buffer_unordered` + governor + a retry loop) in the
//! same process, one after the other. Traffic goes to 127.0.0.1 only.
//!
//! ```text
//! cargo bench --bench goodput               # both scenarios, twice each
//! cargo bench --bench goodput -- limit      # the demo server's 200/s GCRA
//! cargo bench --bench goodput -- faults     # token bucket, outages, resets, bad bodies
//! ```

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{stream, StreamExt};
use http::StatusCode;
use sluicegate::demo::{DemoConfig, DemoServer};
use sluicegate::prelude::*;
use sluicegate::{Adaptive, ReqwestTransport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

const IN_FLIGHT: usize = 16;
const ROUNDS: usize = 2;

fn main() {
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    let wanted = |name: &str| filter.is_empty() || name.contains(filter.as_str());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if wanted("limit") {
        limit(&rt);
    }
    if wanted("faults") {
        faults(&rt);
    }
}

/// What one run did, as the server counted it.
struct Run {
    elapsed: Duration,
    ok: u64,
    requests: u64,
    refused: u64,
}

fn row(who: &str, items: u64, limit: u32, run: &Run) {
    let ideal = items as f64 / f64::from(limit);
    println!(
        "| {who} | {}/{items} | {:.2} s | {:.3}× | {} | {} | {:.1}% |",
        run.ok,
        run.elapsed.as_secs_f64(),
        run.elapsed.as_secs_f64() / ideal,
        run.requests,
        run.refused,
        100.0 * run.refused as f64 / run.requests.max(1) as f64,
    );
}

fn header() {
    println!("| client | arrived | elapsed | / ideal | requests | 429s | 429s / requests |");
    println!("|---|---|---|---|---|---|---|");
}

// ---------------------------------------------------------------------------
// The demo server's GCRA: 200/s, burst 10, 429 + Retry-After above it.

const LIMIT: u32 = 200;
const ASKED: u32 = 400;
const LIMIT_ITEMS: u64 = 3_000;

fn limit(rt: &tokio::runtime::Runtime) {
    println!(
        "\n## The demo server allows {LIMIT}/s (GCRA, burst 10), the client asks {ASKED}/s, \
         {LIMIT_ITEMS} items, {IN_FLIGHT} in flight\n"
    );
    header();
    for _ in 0..ROUNDS {
        for sluicegate in [true, false] {
            let run = rt.block_on(async {
                let server = DemoServer::start(
                    DemoConfig::default()
                        .items(LIMIT_ITEMS)
                        .rate_limit(Rate::per_second(LIMIT).burst(10)),
                )
                .await
                .unwrap();
                let started = Instant::now();
                let ok = if sluicegate {
                    limit_sluicegate(&server.url()).await
                } else {
                    hand_written(&server.url(), LIMIT_ITEMS, ASKED, false, |_| Verdict::Done).await
                };
                let counts = server.counts();
                Run {
                    elapsed: started.elapsed(),
                    ok,
                    requests: counts.ok + counts.too_many_requests,
                    refused: counts.too_many_requests,
                }
            });
            let who = if sluicegate {
                "sluicegate, adaptive"
            } else {
                "hand-written"
            };
            row(who, LIMIT_ITEMS, LIMIT, &run);
        }
    }
}

async fn limit_sluicegate(base: &str) -> u64 {
    let client = Client::builder()
        .transport(ReqwestTransport::default())
        .base_url(base)
        .limiter(Limiter::new(Rate::per_second(ASKED).burst(2)).adaptive(Adaptive::new()))
        .retry_on(
            StatusCode::TOO_MANY_REQUESTS,
            Backoff::full_jitter(Duration::from_millis(50))
                .max_attempts(50)
                .ignore_retry_after(),
        )
        .build()
        .unwrap();
    stream::iter(0..LIMIT_ITEMS)
        .fetch_concurrent(IN_FLIGHT, client.get(|id: &u64| format!("/items/{id}")))
        .filter(|r| futures::future::ready(r.is_ok()))
        .count()
        .await as u64
}

// ---------------------------------------------------------------------------
// The hand-written client: what one writes without a library.

/// What the hand-written loop makes of a 200's body.
enum Verdict {
    Done,
    Again,
}

/// reqwest + `buffer_unordered` + governor `until_ready` + a retry loop:
/// 429, 5xx, transport errors and bodies `check` rejects are retried after
/// a jittered 50 ms (or the server's `Retry-After` if `honour_retry_after`
/// and it gives one), every attempt paced by the one governor: the same
/// rules the sluicegate client of the scenario has.
async fn hand_written(
    base: &str,
    items: u64,
    per_second: u32,
    honour_retry_after: bool,
    check: fn(&[u8]) -> Verdict,
) -> u64 {
    let http = ReqwestTransport::client_builder().build().unwrap();
    let governor = Arc::new(governor::RateLimiter::direct(
        governor::Quota::per_second(NonZeroU32::new(per_second).unwrap())
            .allow_burst(NonZeroU32::new(2).unwrap()),
    ));
    stream::iter(0..items)
        .map(|id| {
            let http = http.clone();
            let governor = governor.clone();
            let url = format!("{base}/items/{id}");
            async move {
                for _ in 0..100 {
                    governor.until_ready().await;
                    let mut wait = Duration::from_millis(fastrand::u64(0..=50));
                    match http.get(&url).send().await {
                        Ok(response) if response.status().is_success() => {
                            if let Ok(body) = response.bytes().await {
                                if matches!(check(&body), Verdict::Done) {
                                    return true;
                                }
                            }
                        }
                        Ok(response) => {
                            let told = response
                                .headers()
                                .get("retry-after")
                                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                            if let Some(seconds) = told.filter(|_| honour_retry_after) {
                                wait = Duration::from_secs(seconds);
                            }
                        }
                        Err(_) => {}
                    }
                    tokio::time::sleep(wait).await;
                }
                false
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await as u64
}

// ---------------------------------------------------------------------------
// Faults: a hand-written HTTP/1.1 server on 127.0.0.1.

const BUCKET: u32 = 300;
const BUCKET_BURST: f64 = 30.0;
const FAULT_ITEMS: u64 = 3_000;
const FAULT_ASKED: u32 = 600;
/// An outage of `OUTAGE` every `OUTAGE_EVERY`: 503 with no Retry-After.
const OUTAGE_EVERY: Duration = Duration::from_secs(4);
const OUTAGE: Duration = Duration::from_millis(500);
/// One request in `RESET_EVERY` gets its connection reset instead of an
/// answer; one accepted request in `MALFORMED_EVERY` a cut JSON body.
const RESET_EVERY: u64 = 50;
const MALFORMED_EVERY: u64 = 50;

#[derive(Default)]
struct FaultCounts {
    ok: AtomicU64,
    refused: AtomicU64,
    unavailable: AtomicU64,
    reset: AtomicU64,
    malformed: AtomicU64,
}

struct Bucket {
    tokens: f64,
    at: std::time::Instant,
}

struct FaultServer {
    /// Whether 429 and 503 carry `Retry-After: 1` (whole seconds, as most
    /// servers send it).
    retry_after: bool,
    started: std::time::Instant,
    bucket: Mutex<Bucket>,
    seen: AtomicU64,
    counts: FaultCounts,
}

impl FaultServer {
    fn answer(&self) -> Option<(u16, &'static str)> {
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        if n % RESET_EVERY == RESET_EVERY - 1 {
            self.counts.reset.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let since = self.started.elapsed();
        let phase = Duration::from_nanos((since.as_nanos() % OUTAGE_EVERY.as_nanos()) as u64);
        if since >= OUTAGE_EVERY && phase < OUTAGE {
            self.counts.unavailable.fetch_add(1, Ordering::Relaxed);
            return Some((503, "{\"error\":\"down\"}"));
        }
        let taken = {
            let mut bucket = self.bucket.lock().unwrap();
            let now = std::time::Instant::now();
            let refill = (now - bucket.at).as_secs_f64() * f64::from(BUCKET);
            bucket.tokens = (bucket.tokens + refill).min(BUCKET_BURST);
            bucket.at = now;
            if bucket.tokens >= 1.0 {
                bucket.tokens -= 1.0;
                true
            } else {
                false
            }
        };
        if !taken {
            self.counts.refused.fetch_add(1, Ordering::Relaxed);
            return Some((429, "{\"error\":\"slow down\"}"));
        }
        if n % MALFORMED_EVERY == MALFORMED_EVERY / 2 {
            self.counts.malformed.fetch_add(1, Ordering::Relaxed);
            return Some((200, "{\"id\": 1, \"name\": \"wid"));
        }
        self.counts.ok.fetch_add(1, Ordering::Relaxed);
        Some((200, "{\"id\": 1, \"name\": \"widget\"}"))
    }
}

async fn serve(listener: TcpListener, server: Arc<FaultServer>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let server = server.clone();
        tokio::spawn(connection(stream, server));
    }
}

async fn connection(mut stream: TcpStream, server: Arc<FaultServer>) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        // A GET has no body: a request ends at its blank line.
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        buf.drain(..end);
        let Some((status, body)) = server.answer() else {
            // A reset: RST instead of an answer.
            let _ = stream.set_zero_linger();
            return;
        };
        let reason = match status {
            200 => "OK",
            429 => "Too Many Requests",
            _ => "Service Unavailable",
        };
        let retry_after = if status != 200 && server.retry_after {
            "retry-after: 1\r\n"
        } else {
            ""
        };
        let head = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n\
             {retry_after}content-length: {}\r\n\r\n",
            body.len()
        );
        let mut out = head.into_bytes();
        out.extend_from_slice(body.as_bytes());
        if stream.write_all(&out).await.is_err() {
            return;
        }
    }
}

fn faults(rt: &tokio::runtime::Runtime) {
    for retry_after in [false, true] {
        faults_with(rt, retry_after);
    }
}

fn faults_with(rt: &tokio::runtime::Runtime, retry_after: bool) {
    println!(
        "\n## Faults ({}): a {BUCKET}/s token bucket (burst {BUCKET_BURST}), a {OUTAGE:?} outage \
         (503) every {OUTAGE_EVERY:?}, one request in {RESET_EVERY} reset, one in \
         {MALFORMED_EVERY} a cut JSON body; the client asks {FAULT_ASKED}/s, \
         {FAULT_ITEMS} items, {IN_FLIGHT} in flight\n",
        if retry_after {
            "429 and 503 say Retry-After: 1, honoured"
        } else {
            "no Retry-After"
        }
    );
    println!(
        "| client | arrived | elapsed | / ideal | requests | 429s | 429s / requests | 503s | resets | cut bodies |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for _ in 0..ROUNDS {
        for sluicegate in [true, false] {
            let (run, counts) = rt.block_on(async {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let base = format!("http://{}", listener.local_addr().unwrap());
                let server = Arc::new(FaultServer {
                    retry_after,
                    started: std::time::Instant::now(),
                    bucket: Mutex::new(Bucket {
                        tokens: BUCKET_BURST,
                        at: std::time::Instant::now(),
                    }),
                    seen: AtomicU64::new(0),
                    counts: FaultCounts::default(),
                });
                let serving = tokio::spawn(serve(listener, server.clone()));
                let started = Instant::now();
                let ok = if sluicegate {
                    faults_sluicegate(&base, retry_after).await
                } else {
                    hand_written(&base, FAULT_ITEMS, FAULT_ASKED, retry_after, |body| {
                        match serde_json::from_slice::<serde_json::Value>(body) {
                            Ok(_) => Verdict::Done,
                            Err(_) => Verdict::Again,
                        }
                    })
                    .await
                };
                let elapsed = started.elapsed();
                serving.abort();
                let c = &server.counts;
                let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
                let run = Run {
                    elapsed,
                    ok,
                    requests: server.seen.load(Ordering::Relaxed),
                    refused: load(&c.refused),
                };
                (
                    run,
                    [load(&c.unavailable), load(&c.reset), load(&c.malformed)],
                )
            });
            let ideal = FAULT_ITEMS as f64 / f64::from(BUCKET);
            println!(
                "| {} | {}/{FAULT_ITEMS} | {:.2} s | {:.3}× | {} | {} | {:.1}% | {} | {} | {} |",
                if sluicegate {
                    "sluicegate, adaptive"
                } else {
                    "hand-written"
                },
                run.ok,
                run.elapsed.as_secs_f64(),
                run.elapsed.as_secs_f64() / ideal,
                run.requests,
                run.refused,
                100.0 * run.refused as f64 / run.requests.max(1) as f64,
                counts[0],
                counts[1],
                counts[2],
            );
        }
    }
}

async fn faults_sluicegate(base: &str, retry_after: bool) -> u64 {
    let client = Client::builder()
        .transport(ReqwestTransport::default())
        .base_url(base)
        .limiter(Limiter::new(Rate::per_second(FAULT_ASKED).burst(2)).adaptive(Adaptive::new()))
        .build()
        .unwrap();
    let again = || {
        let backoff = Backoff::full_jitter(Duration::from_millis(50)).max_attempts(100);
        if retry_after {
            backoff
        } else {
            backoff.ignore_retry_after()
        }
    };
    let endpoint = client
        .get(|id: &u64| format!("/items/{id}"))
        .json::<serde_json::Value>()
        .retry_on(StatusCode::TOO_MANY_REQUESTS, again())
        .retry_on(Matcher::transport_errors(), again())
        .retry_on(Matcher::undecodable(), again())
        .pause_on(
            StatusCode::SERVICE_UNAVAILABLE,
            PausePolicy::fallback(Duration::from_millis(100)).max_attempts(100),
        );
    stream::iter(0..FAULT_ITEMS)
        .fetch_concurrent(IN_FLIGHT, endpoint)
        .filter(|r| futures::future::ready(r.is_ok()))
        .count()
        .await as u64
}
