//! [`Stats`]: counters and a latency histogram, cheap to update from many
//! tasks at once, and a few tens of kilobytes per client.
//!
//! Counters of sends and items are atomics. What an answer adds (status,
//! bytes, latency) goes into one of several shards, one per thread slot,
//! under one uncontended lock, so tasks on different worker threads never
//! wait on one another; a [`snapshot`](Stats::snapshot) merges them.
//!
//! Latencies go into a log-linear histogram of fixed size (see
//! "Latency percentiles" on [`Stats`]) rather than an HDR histogram with
//! three significant digits, which cost 1.57 MB per client and 196 KB per
//! snapshot for a precision that percentiles of request latency do not
//! need.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http::StatusCode;
use serde::Serialize;
use tokio::time::Instant;

use crate::error::TransportErrorKind;

const SHARDS: usize = 8;
/// Buckets per power of two, as a power of two: 2⁴ = 16.
const SUB_BITS: u32 = 4;
const SUB: usize = 1 << SUB_BITS;
/// Latencies are bucketed below 2^`TOP_BITS` µs.
const TOP_BITS: u32 = 32;
/// Exact buckets below `2 * SUB`, then `SUB` for each power of two above.
const BUCKETS: usize = (TOP_BITS - SUB_BITS + 1) as usize * SUB;
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
/// # Latency percentiles
///
/// Attempt latencies are counted in microseconds in log-linear buckets:
/// exact up to 32 µs, then 16 buckets per power of two, so no bucket is
/// wider than 1/16 of its lower bound. A percentile is reported as the
/// middle of its bucket, kept within the smallest and largest latency
/// seen: within 3.2% of the true value, and exact when every latency is
/// the same. The largest latency is kept exactly. Buckets reach 2³² µs
/// (71 minutes); a longer latency counts in the last one.
///
/// # Memory
///
/// A new `Stats` takes about 330 bytes. Answers are counted per thread
/// slot (up to 8), each slot's 464 counters (3.7 KB) allocated by the first
/// answer recorded in it: about 3.7 KB per thread that records answers,
/// 31 KB at most, plus 16 bytes per distinct status code seen. A
/// [`snapshot`](Self::snapshot) merges the shards on the stack and
/// allocates only what it returns (a few hundred bytes).
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
    /// answer instead of an atomic per counter. A slot is allocated by the
    /// first answer recorded in it: a pipeline on one or two threads pays
    /// for one or two shards (3.7 KB each), not eight, and a new `Stats` is
    /// small enough that building it copies nothing large through the
    /// stack (stack pages, once touched, stay resident).
    answers: [OnceLock<Box<Shard>>; SHARDS],
}

/// One thread slot's answers, on cache lines of its own so that threads
/// recording into neighbouring shards do not contend for a line.
#[repr(align(128))]
struct Shard(Mutex<Answers>);

struct Answers {
    latency: Latencies,
    /// Responses by status code, sorted by code: a handful of entries in
    /// practice, at most one per code a server can send (100..=999).
    statuses: Vec<(u16, u64)>,
    bytes: u64,
}

impl Answers {
    fn new() -> Self {
        Self {
            latency: Latencies::new(),
            statuses: Vec::new(),
            bytes: 0,
        }
    }
}

/// A log-linear histogram of latencies in microseconds (see the module
/// docs for its precision).
#[derive(Clone)]
struct Latencies {
    buckets: [u64; BUCKETS],
    count: u64,
    min: u64,
    max: u64,
}

impl Latencies {
    fn new() -> Self {
        Self {
            buckets: [0; BUCKETS],
            count: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    fn record(&mut self, micros: u64) {
        self.buckets[bucket(micros)] += 1;
        self.count += 1;
        self.min = self.min.min(micros);
        self.max = self.max.max(micros);
    }

    fn add(&mut self, other: &Self) {
        for (sum, n) in self.buckets.iter_mut().zip(&other.buckets) {
            *sum += n;
        }
        self.count += other.count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// The latency below which a share `q` of the counted ones lie: the
    /// middle of its bucket, kept between the smallest and largest seen.
    fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        // The rank of the latency wanted, from 1 to `count`.
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (low, width) = bucket_bounds(i);
                return (low + width / 2).clamp(self.min, self.max);
            }
        }
        self.max
    }
}

/// The bucket of a latency of `micros`.
fn bucket(micros: u64) -> usize {
    let micros = micros.min((1 << TOP_BITS) - 1);
    if micros < 2 * SUB as u64 {
        return micros as usize;
    }
    // The power of two below `micros` is 2^`top`; its `SUB` buckets are
    // each 2^`shift` wide.
    let top = u64::BITS - 1 - micros.leading_zeros();
    let shift = top - SUB_BITS;
    (shift as usize + 1) * SUB + ((micros >> shift) as usize - SUB)
}

/// The lowest latency of bucket `i`, and the bucket's width.
fn bucket_bounds(i: usize) -> (u64, u64) {
    if i < 2 * SUB {
        return (i as u64, 1);
    }
    let shift = (i / SUB - 1) as u32;
    (((SUB + i % SUB) as u64) << shift, 1 << shift)
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
                answers: std::array::from_fn(|_| OnceLock::new()),
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
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let mut answers = inner.answers[shard()]
            .get_or_init(|| Box::new(Shard(Mutex::new(Answers::new()))))
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        answers.latency.record(micros);
        match outcome {
            Ok((status, bytes)) => {
                let code = status.as_u16();
                match answers.statuses.binary_search_by_key(&code, |(c, _)| *c) {
                    Ok(i) => answers.statuses[i].1 += 1,
                    Err(i) => answers.statuses.insert(i, (code, 1)),
                }
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
    ///
    /// Merges the shards on the stack (a few kilobytes); the only heap it
    /// takes is what the snapshot holds: its name and maps.
    pub fn snapshot(&self) -> StatsSnapshot {
        let inner = &self.inner;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut merged = Latencies::new();
        let mut by_status = BTreeMap::new();
        let mut bytes = 0;
        for shard in inner.answers.iter().filter_map(OnceLock::get) {
            let shard = shard
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            merged.add(&shard.latency);
            for (code, n) in &shard.statuses {
                *by_status.entry(*code).or_insert(0) += n;
            }
            bytes += shard.bytes;
        }
        let at = |q: f64| Duration::from_micros(merged.quantile(q));
        StatsSnapshot {
            name: inner.name.clone(),
            elapsed: inner.started.elapsed(),
            requests: load(&inner.requests),
            by_status,
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
            bytes_received: bytes,
            in_flight: load(&inner.in_flight),
            learned_rate: match load(&inner.learned_rate) {
                u64::MAX => None,
                bits => Some(f64::from_bits(bits)),
            },
            malformed_rate_headers: load(&inner.malformed_rate_headers),
            retry_after_capped: load(&inner.retry_after_capped),
            peak_in_flight: load(&inner.peak_in_flight),
            latency: LatencySummary {
                count: merged.count,
                p50: at(0.5),
                p90: at(0.9),
                p99: at(0.99),
                max: Duration::from_micros(merged.max),
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
///
/// Percentiles are within 3.2% of the true latency (exact when all
/// latencies are equal), at microsecond resolution; `max` is exact (see
/// "Latency percentiles" on [`Stats`]).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_slot_is_allocated_by_its_first_answer_only() {
        // Inline shards would make a new `Stats` 31 KB, built on the stack.
        assert!(std::mem::size_of::<Inner>() <= 512);
        let stats = Stats::new(None);
        let allocated = || {
            stats
                .inner
                .answers
                .iter()
                .filter(|s| s.get().is_some())
                .count()
        };
        assert_eq!(allocated(), 0);
        for _ in 0..3 {
            stats.request_sent();
            stats.request_ended(Ok((StatusCode::OK, 2)), Duration::from_millis(1));
        }
        assert_eq!(allocated(), 1);
        let snapshot = stats.snapshot();
        assert_eq!((snapshot.latency.count, snapshot.bytes_received), (3, 6));
    }

    #[test]
    fn every_latency_falls_in_the_bucket_whose_bounds_hold_it() {
        let mut last = 0;
        let mut micros = 0u64;
        while micros < 1 << TOP_BITS {
            let i = bucket(micros);
            let (low, width) = bucket_bounds(i);
            assert!(low <= micros && micros < low + width, "{micros} in {i}");
            assert!(i == last || i == last + 1, "buckets are contiguous");
            // No bucket wider than 1/16 of its lowest latency.
            assert!(width == 1 || width * SUB as u64 <= low, "bucket {i}");
            last = i;
            micros += 1 + micros / 97;
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        assert_eq!(
            bucket_bounds(BUCKETS - 1).0 + bucket_bounds(BUCKETS - 1).1,
            1 << TOP_BITS
        );
    }

    #[test]
    fn percentiles_are_within_a_thirty_second_of_the_truth() {
        // 1 µs to 4 000 s, spread over every power of two in range.
        let truth: Vec<u64> = (0..20_000u64).map(|i| 1 + i * i * 10).collect();
        let mut latencies = Latencies::new();
        for &t in &truth {
            latencies.record(t);
        }
        for q in [0.01, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0] {
            let exact = truth[((q * truth.len() as f64).ceil() as usize).max(1) - 1];
            let reported = latencies.quantile(q);
            let error = reported.abs_diff(exact) as f64 / exact as f64;
            assert!(error <= 1.0 / 32.0, "q {q}: {reported} for {exact}");
        }
        assert_eq!(latencies.max, *truth.last().unwrap());
        assert_eq!(latencies.count, truth.len() as u64);

        // The worst place: the top of the first (widest) bucket of each
        // power of two, where the bucket's bottom would be 1/17 off.
        let mut latencies = Latencies::new();
        let truth: Vec<u64> = (6..TOP_BITS)
            .map(|top| (1u64 << top) + (1 << (top - SUB_BITS)) - 1)
            .collect();
        for &t in &truth {
            for _ in 0..10 {
                latencies.record(t);
            }
        }
        latencies.record(1 << TOP_BITS); // so that the largest is no clamp
        for (k, &exact) in truth.iter().enumerate() {
            let q = (k as f64 + 0.5) / truth.len() as f64 * 0.99;
            let reported = latencies.quantile(q);
            let error = reported.abs_diff(exact) as f64 / exact as f64;
            assert!(error <= 1.0 / 32.0, "q {q}: {reported} for {exact}");
        }
    }

    #[test]
    fn equal_latencies_are_reported_exactly() {
        for micros in [0, 1, 31, 7_000, 100_000, 2_500_000, u64::from(u32::MAX) + 5] {
            let mut latencies = Latencies::new();
            for _ in 0..3 {
                latencies.record(micros);
            }
            for q in [0.5, 0.9, 0.99] {
                assert_eq!(latencies.quantile(q), micros);
            }
        }
        assert_eq!(Latencies::new().quantile(0.5), 0);
    }

    #[test]
    fn answers_from_many_threads_merge_in_a_snapshot() {
        let stats = Stats::new(None);
        std::thread::scope(|scope| {
            for thread in 0..2 * SHARDS as u64 {
                let stats = &stats;
                scope.spawn(move || {
                    for (status, micros) in [(200, 1_000), (404, 2_000), (200, 3_000)] {
                        stats.request_sent();
                        let status = StatusCode::from_u16(status).unwrap();
                        let latency = Duration::from_micros(micros + thread);
                        stats.request_ended(Ok((status, 10)), latency);
                    }
                });
            }
        });
        let snapshot = stats.snapshot();
        let threads = 2 * SHARDS as u64;
        assert_eq!(
            snapshot.by_status.into_iter().collect::<Vec<_>>(),
            [(200, 2 * threads), (404, threads)]
        );
        assert_eq!(snapshot.bytes_received, 30 * threads);
        assert_eq!(snapshot.latency.count, 3 * threads);
        assert_eq!(
            snapshot.latency.max,
            Duration::from_micros(3_000 + threads - 1)
        );
        assert_eq!((snapshot.requests, snapshot.in_flight), (3 * threads, 0));
    }

    #[test]
    fn a_stats_stays_within_its_memory_budget() {
        assert!(std::mem::size_of::<Inner>() <= 32 * 1024);
        assert!(std::mem::size_of::<Latencies>() <= 4 * 1024);
    }
}
