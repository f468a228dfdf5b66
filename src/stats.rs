//! [`Stats`]: counters and a latency histogram, cheap to update from many
//! tasks at once.
//!
//! Counters of sends and items are atomics. What an answer adds (status,
//! bytes, latency) goes into one of several shards, one per thread slot,
//! under one uncontended lock, so tasks on different worker threads never
//! wait on one another; a [`snapshot`](Stats::snapshot) merges them.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use http::StatusCode;
use serde::Serialize;
use tokio::time::Instant;

use crate::error::TransportErrorKind;

const SHARDS: usize = 8;
const KINDS: [TransportErrorKind; 6] = [
    TransportErrorKind::Connect,
    TransportErrorKind::Reset,
    TransportErrorKind::Timeout,
    TransportErrorKind::BodyTooLarge,
    TransportErrorKind::InvalidRequest,
    TransportErrorKind::Other,
];

/// Live counters of a client or a named stage. Cheap to clone: clones
/// count together.
///
/// ```
/// use futures::{stream, StreamExt};
/// use sluicegate::mock::{MockResponse, MockTransport, Route};
/// use sluicegate::{Client, SluiceExt};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let mock = MockTransport::new();
/// mock.mount(Route::get("/items/{id}").respond(MockResponse::ok().text("hi")));
/// let client = Client::builder().transport(mock).base_url("http://mock").build().unwrap();
/// stream::iter(0..10u32)
///     .fetch_concurrent(4, client.get(|id: &u32| format!("/items/{id}")))
///     .for_each(|_| async {})
///     .await;
/// let stats = client.stats().unwrap().snapshot();
/// assert_eq!((stats.requests, stats.items_ok, stats.bytes_received), (10, 10, 20));
/// println!("{stats}");
/// # }
/// ```
#[derive(Clone)]
pub struct Stats {
    inner: Arc<Inner>,
}

struct Inner {
    name: Option<String>,
    started: Instant,
    requests: AtomicU64,
    transport_errors: [AtomicU64; KINDS.len()],
    retries: AtomicU64,
    pauses: AtomicU64,
    paused_nanos: AtomicU64,
    items_in: AtomicU64,
    items_ok: AtomicU64,
    items_failed: AtomicU64,
    in_flight: AtomicU64,
    peak_in_flight: AtomicU64,
    /// The learned rate's `f64` bits; `u64::MAX` while there is none.
    learned_rate: AtomicU64,
    malformed_rate_headers: AtomicU64,
    retry_after_capped: AtomicU64,
    /// What each answer adds, kept per thread slot: one uncontended lock per
    /// answer instead of an atomic per counter.
    answers: [Mutex<Answers>; SHARDS],
}

struct Answers {
    latency: Histogram<u64>,
    /// Index `status - 100`, for 100..=999.
    statuses: Vec<u64>,
    bytes: u64,
}

impl Answers {
    fn new() -> Self {
        Self {
            // Microseconds, from 1 µs to an hour, 3 significant digits.
            latency: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("valid histogram bounds"),
            statuses: vec![0; 900],
            bytes: 0,
        }
    }
}

impl Stats {
    /// Empty counters; `name` labels a stage in the summary.
    pub fn new(name: Option<&str>) -> Self {
        Self {
            inner: Arc::new(Inner {
                name: name.map(str::to_owned),
                started: Instant::now(),
                requests: AtomicU64::new(0),

                transport_errors: Default::default(),
                retries: AtomicU64::new(0),
                pauses: AtomicU64::new(0),
                paused_nanos: AtomicU64::new(0),
                items_in: AtomicU64::new(0),
                items_ok: AtomicU64::new(0),
                items_failed: AtomicU64::new(0),

                in_flight: AtomicU64::new(0),
                peak_in_flight: AtomicU64::new(0),
                learned_rate: AtomicU64::new(u64::MAX),
                malformed_rate_headers: AtomicU64::new(0),
                retry_after_capped: AtomicU64::new(0),
                answers: std::array::from_fn(|_| Mutex::new(Answers::new())),
            }),
        }
    }

    pub(crate) fn item_started(&self) {
        self.inner.items_in.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn item_finished(&self, ok: bool) {
        let counter = if ok {
            &self.inner.items_ok
        } else {
            &self.inner.items_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn request_sent(&self) {
        self.inner.requests.fetch_add(1, Ordering::Relaxed);
        let now = self.inner.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        // Most sends do not set a new peak: look before writing.
        if now > self.inner.peak_in_flight.load(Ordering::Relaxed) {
            self.inner.peak_in_flight.fetch_max(now, Ordering::Relaxed);
        }
    }

    /// The attempt ended, with a response (`status`, body size) or not.
    pub(crate) fn request_ended(
        &self,
        outcome: Result<(StatusCode, usize), TransportErrorKind>,
        latency: Duration,
    ) {
        let inner = &self.inner;
        inner.in_flight.fetch_sub(1, Ordering::Relaxed);
        let micros = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut answers = inner.answers[shard()]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        answers.latency.saturating_record(micros);
        match outcome {
            Ok((status, bytes)) => {
                answers.statuses[usize::from(status.as_u16() - 100)] += 1;
                answers.bytes += bytes as u64;
            }
            Err(kind) => {
                drop(answers);
                let i = KINDS
                    .iter()
                    .position(|k| *k == kind)
                    .unwrap_or(KINDS.len() - 1);
                inner.transport_errors[i].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A request that was sent and then abandoned (the item timed out or the
    /// stream was dropped) is no longer in flight.
    pub(crate) fn request_abandoned(&self) {
        self.inner.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// What the limiter knows after an answer: its learned rate (adaptive
    /// pacing) and the rate-limit headers it ignored.
    pub(crate) fn limiter_seen(&self, learned: Option<f64>, malformed: u64) {
        let bits = learned.map_or(u64::MAX, f64::to_bits);
        self.inner.learned_rate.store(bits, Ordering::Relaxed);
        self.inner
            .malformed_rate_headers
            .store(malformed, Ordering::Relaxed);
    }

    /// A server's `Retry-After` was longer than the cap and was cut.
    pub(crate) fn retry_after_capped(&self) {
        self.inner
            .retry_after_capped
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn retried(&self) {
        self.inner.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn paused(&self, added: Duration) {
        self.inner.pauses.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(added.as_nanos()).unwrap_or(u64::MAX);
        self.inner.paused_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Items that left with a success so far.
    pub fn items_ok(&self) -> u64 {
        self.inner.items_ok.load(Ordering::Relaxed)
    }

    /// Retries so far: attempts after an item's first, after a backoff or
    /// after a pause.
    pub fn retries(&self) -> u64 {
        self.inner.retries.load(Ordering::Relaxed)
    }

    /// The counters now, as plain data.
    pub fn snapshot(&self) -> StatsSnapshot {
        let inner = &self.inner;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut all = Answers::new();
        for shard in &inner.answers {
            let shard = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            all.latency.add(&shard.latency).expect("same bounds");
            for (sum, n) in all.statuses.iter_mut().zip(&shard.statuses) {
                *sum += n;
            }
            all.bytes += shard.bytes;
        }
        let merged = all.latency;
        // Bucket bottoms: exact for round latencies, within 0.1% otherwise.
        let at = |q: f64| {
            let value = if merged.is_empty() {
                0
            } else {
                merged.lowest_equivalent(merged.value_at_quantile(q))
            };
            Duration::from_micros(value)
        };
        StatsSnapshot {
            name: inner.name.clone(),
            elapsed: inner.started.elapsed(),
            requests: load(&inner.requests),
            by_status: all
                .statuses
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(i, n)| (i as u16 + 100, *n))
                .collect(),
            transport_errors: KINDS
                .iter()
                .zip(&inner.transport_errors)
                .filter_map(|(kind, n)| {
                    let n = load(n);
                    (n > 0).then(|| (kind.to_string(), n))
                })
                .collect(),
            retries: load(&inner.retries),
            pauses: load(&inner.pauses),
            paused: Duration::from_nanos(load(&inner.paused_nanos)),
            items_in: load(&inner.items_in),
            items_ok: load(&inner.items_ok),
            items_failed: load(&inner.items_failed),
            bytes_received: all.bytes,
            in_flight: load(&inner.in_flight),
            learned_rate: match load(&inner.learned_rate) {
                u64::MAX => None,
                bits => Some(f64::from_bits(bits)),
            },
            malformed_rate_headers: load(&inner.malformed_rate_headers),
            retry_after_capped: load(&inner.retry_after_capped),
            peak_in_flight: load(&inner.peak_in_flight),
            latency: LatencySummary {
                count: merged.len(),
                p50: at(0.5),
                p90: at(0.9),
                p99: at(0.99),
                max: Duration::from_micros(merged.lowest_equivalent(merged.max())),
            },
        }
    }
}

impl fmt::Debug for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stats")
            .field("name", &self.inner.name)
            .field("requests", &self.inner.requests.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Which latency shard this thread records into.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

/// Request latency percentiles, per attempt, from send to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct LatencySummary {
    /// Attempts measured.
    pub count: u64,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Slowest.
    pub max: Duration,
}

/// The counters of a [`Stats`] at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatsSnapshot {
    /// The stage's name, if it has one.
    pub name: Option<String>,
    /// Since the counters were made.
    pub elapsed: Duration,
    /// Requests sent, retries included.
    pub requests: u64,
    /// Responses by status code.
    pub by_status: BTreeMap<u16, u64>,
    /// Transport errors by kind (timeouts included).
    pub transport_errors: BTreeMap<String, u64>,
    /// Retries scheduled: every attempt of an item after its first, whether
    /// a backoff or a pause (which is also counted in `pauses`) came before
    /// it.
    pub retries: u64,
    /// Pauses asked for.
    pub pauses: u64,
    /// Time added to the shared pause by those pauses.
    pub paused: Duration,
    /// Items taken in.
    pub items_in: u64,
    /// Items that left with a success.
    pub items_ok: u64,
    /// Items that left with an error.
    pub items_failed: u64,
    /// Response body bytes.
    pub bytes_received: u64,
    /// Requests in flight now.
    pub in_flight: u64,
    /// The rate adaptive pacing has learned, events per second, as of the
    /// last answer: the pace the limiter grants at, never above its ceiling
    /// or a quota the server stated.
    pub learned_rate: Option<f64>,
    /// Rate-limit headers ignored as malformed or absurd.
    pub malformed_rate_headers: u64,
    /// Server `Retry-After` values cut to a cap (each also logged as a
    /// warning); counted by the client's own stats.
    pub retry_after_capped: u64,
    /// Most requests in flight at once.
    pub peak_in_flight: u64,
    /// Attempt latency.
    pub latency: LatencySummary,
}

impl StatsSnapshot {
    /// Attempts that timed out.
    pub fn timeouts(&self) -> u64 {
        self.transport_errors
            .get(&TransportErrorKind::Timeout.to_string())
            .copied()
            .unwrap_or(0)
    }
}

impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let title = self.name.as_deref().unwrap_or("requests");
        writeln!(
            f,
            "{title}: {} sent in {:.2?} ({:.0}/s), peak {} in flight",
            self.requests,
            self.elapsed,
            self.requests as f64 / secs,
            self.peak_in_flight
        )?;
        let statuses: Vec<String> = self
            .by_status
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect();
        let errors: Vec<String> = self
            .transport_errors
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect();
        writeln!(
            f,
            "  answers    {}{}",
            if statuses.is_empty() {
                "none".to_owned()
            } else {
                statuses.join(", ")
            },
            if errors.is_empty() {
                String::new()
            } else {
                format!("; errors {}", errors.join(", "))
            }
        )?;
        writeln!(
            f,
            "  items      {} in: {} ok, {} failed{}",
            self.items_in,
            self.items_ok,
            self.items_failed,
            match self.items_in - (self.items_ok + self.items_failed).min(self.items_in) {
                0 => String::new(),
                open => format!(", {open} unfinished"),
            }
        )?;
        if self.pauses == 0 {
            write!(f, "  retries    {}; no pause", self.retries)?;
        } else {
            write!(
                f,
                "  retries    {}; pauses {} ({:.2?} paused)",
                self.retries, self.pauses, self.paused
            )?;
        }
        match self.retry_after_capped {
            0 => writeln!(f)?,
            n => writeln!(f, "; {n} Retry-After capped")?,
        }
        write!(
            f,
            "  latency    p50 {:.1?}  p90 {:.1?}  p99 {:.1?}  max {:.1?}  ({} bytes received)",
            self.latency.p50,
            self.latency.p90,
            self.latency.p99,
            self.latency.max,
            self.bytes_received
        )
    }
}
