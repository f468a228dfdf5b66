//! Whole pipeline topologies against the liveness contract (DESIGN.md,
//! "Liveness and trust"): chained fetch stages on one client, on clients
//! sharing a `Limiter`, or on independent clients; `paginate` and
//! `throttle(&limiter)` sources on the same budget; busy consumers; scripted
//! 429s, 503s and resets. Every run must finish within a bound derived from
//! its inputs, account for every item exactly once, keep each limiter's GCRA
//! bound, and collect every answer the instant it was due.
//!
//! Everything runs on `MockTransport` in virtual time except the drop test,
//! which needs real threads (and so a real clock, bounded generously).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{self, BoxStream, Stream};
use futures::StreamExt as _;
use http::StatusCode;
use proptest::prelude::*;
use sluicegate::etl::{paginate, Pagination};
use sluicegate::mock::{Call, Latency, MockResponse, MockTransport, Route};
use sluicegate::prelude::*;
use sluicegate::{FetchConcurrent, StageInput, TransportErrorKind};
use tokio::time::{sleep, Instant};

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const TICK: Duration = ms(1);

fn builder(mock: &MockTransport) -> sluicegate::ClientBuilder {
    Client::builder()
        .transport(mock.clone())
        .base_url("http://mock")
}

/// `due` rounded up to tokio's next timer tick, counted from `origin` (the
/// instant the paused runtime started): when a timer set for `due` fires.
/// Whole-millisecond deadlines come back unchanged.
fn tick_after(origin: Instant, due: Instant) -> Instant {
    let nanos = (due - origin).as_nanos();
    let tick = TICK.as_nanos();
    origin + Duration::from_nanos((nanos.div_ceil(tick) * tick) as u64)
}

/// The most events GCRA lets into any half-open window of `width` (whole
/// milliseconds), for grants on tokio's millisecond grid.
///
/// k events in `[a, a + w)` have `last - first < w`, and GCRA spaces them
/// so that `last - first >= (k - burst) * interval`: `k < burst + w /
/// interval`, so `k <= burst + ceil(w / interval) - 1` (never more than the
/// usual `burst + floor(w * rate)`). A paused clock fires a timer at the
/// first tick at or after its deadline, so a grant at grid instant `g`
/// stands for an ideal instant in `(g - 1 ms, g]`; a window of grid instants
/// `[a, a + w)` then holds ideal instants of `(a - 1 ms, a + w - 1 ms]`,
/// still a span of `w`, and the same bound holds.
fn gcra_window_bound(rate: Rate, width: Duration) -> usize {
    let interval = rate.interval().as_nanos();
    rate.burst_size() as usize + width.as_nanos().div_ceil(interval) as usize - 1
}

/// Checks every window width in `widths` against the GCRA bound.
fn check_windows(rate: Rate, sent: &[Instant], widths: &[Duration]) -> Result<(), String> {
    let mut sent = sent.to_vec();
    sent.sort();
    for &width in widths {
        let most = common::max_in_window(&sent, width);
        let bound = gcra_window_bound(rate, width);
        if most > bound {
            return Err(format!(
                "{most} requests within {width:?} through one limiter at {rate}: GCRA allows {bound}"
            ));
        }
    }
    Ok(())
}

/// Window widths worth checking for `rate`: about one, two and ten
/// intervals, and a second, all in whole milliseconds.
fn widths_for(rate: Rate) -> Vec<Duration> {
    let interval = rate.interval().as_nanos();
    let whole = |n: u128| ms(((n * interval).div_ceil(TICK.as_nanos()) as u64).max(1));
    vec![whole(1), whole(2), whole(10), ms(1_000)]
}

/// Every call answered the instant it was due: nothing it needed waited for
/// somebody to poll.
fn check_no_stall(origin: Instant, calls: &[Call]) -> Result<(), String> {
    for call in calls {
        let due = tick_after(origin, call.due_at);
        match call.collected_at {
            Some(collected) if collected == due => {}
            Some(collected) => {
                return Err(format!(
                    "{} answered at {:?} but collected at {:?} ({:?} late)",
                    call.uri,
                    due - origin,
                    collected - origin,
                    collected - due
                ))
            }
            None => return Err(format!("{} was never collected", call.uri)),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The topology space
// ---------------------------------------------------------------------------

/// How the stages reach the rate budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sharing {
    /// Every stage (and the source) on one client.
    OneClient,
    /// One client per stage, all given the same `Limiter`.
    SharedLimiter,
    /// One client per stage, each with its own budget.
    Independent,
}

/// Where the items come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// `stream::iter(0..items)`.
    Items,
    /// `paginate` on the first stage's client, pages `flat_unpack`ed.
    Paginate,
    /// `stream::iter(0..items).throttle(&limiter)` on the first stage's
    /// limiter.
    Throttle,
}

#[derive(Debug, Clone, Copy)]
struct StageShape {
    n: usize,
    ordered: bool,
}

/// Mock latency in whole milliseconds.
#[derive(Debug, Clone, Copy)]
enum Lat {
    Zero,
    Fixed(u64),
    Uniform(u64, u64),
}

impl Lat {
    fn latency(self) -> Latency {
        match self {
            Lat::Zero => Latency::Zero,
            Lat::Fixed(d) => Latency::fixed(ms(d)),
            Lat::Uniform(lo, hi) => Latency::uniform(ms(lo), ms(hi)),
        }
    }

    fn max(self) -> Duration {
        match self {
            Lat::Zero => Duration::ZERO,
            Lat::Fixed(d) | Lat::Uniform(_, d) => ms(d),
        }
    }
}

#[derive(Debug, Clone)]
struct Shape {
    items: u64,
    source: Source,
    stages: Vec<StageShape>,
    sharing: Sharing,
    /// Per second, burst.
    rate: Option<(u32, u32)>,
    latency: Lat,
    /// How long the consumer sleeps on each item.
    consumer_ms: u64,
    /// One (stage, item) pair in `faults` misbehaves; `None`: no faults.
    faults: Option<u64>,
    backoff_ms: u64,
    pause_ms: u64,
    seed: u64,
}

const PAGE: u64 = 5;

impl Shape {
    fn rate(&self) -> Option<Rate> {
        self.rate
            .map(|(per_second, burst)| Rate::per_second(per_second).burst(burst))
    }

    fn pages(&self) -> u64 {
        match self.source {
            // The walk ends at the first empty page.
            Source::Paginate => self.items.div_ceil(PAGE) + 1,
            _ => 0,
        }
    }

    /// Which limiter stage `k` draws from (an index into the budgets).
    fn budget_of(&self, stage: usize) -> usize {
        match self.sharing {
            Sharing::OneClient => 0,
            Sharing::SharedLimiter if self.rate.is_some() => 0,
            Sharing::SharedLimiter | Sharing::Independent => stage,
        }
    }

    /// What the server does the first time stage `stage` asks for `id`.
    fn fault(&self, stage: usize, id: u64) -> Fault {
        let Some(every) = self.faults else {
            return Fault::None;
        };
        let h = mix(self.seed ^ mix(stage as u64 + 1) ^ mix(id.wrapping_add(0x1000)));
        if !h.is_multiple_of(every) {
            return Fault::None;
        }
        match (h / every) % 7 {
            0 => Fault::TooManyAfter,
            1 => Fault::TooMany,
            2 => Fault::Unavailable,
            3 => Fault::UnavailableAfter,
            4 | 5 => Fault::Reset,
            _ => Fault::Gone,
        }
    }

    /// The stage at which `id` fails for good, if any.
    fn gone_at(&self, id: u64) -> Option<usize> {
        (0..self.stages.len()).find(|&k| self.fault(k, id) == Fault::Gone)
    }

    /// How long a fault holds its item before the next attempt.
    fn fault_wait(&self, fault: Fault) -> Duration {
        match fault {
            Fault::TooManyAfter | Fault::UnavailableAfter => ms(1_000),
            Fault::TooMany | Fault::Reset => ms(self.backoff_ms),
            Fault::Unavailable => ms(self.pause_ms),
            Fault::None | Fault::Gone => Duration::ZERO,
        }
    }

    /// A virtual-time bound no correct run can pass.
    ///
    /// At every instant of a live run something is being waited for: a
    /// rate token, a mock latency, a backoff or pause, or the consumer's
    /// sleep. Serialising all of them is the slowest any correct schedule
    /// can be: every token at the rate (requests, retries, pages and the
    /// throttle's own grants, counted as if one budget served them all),
    /// every request's full latency one after the other, every retry wait
    /// and pause end to end, every consumer sleep, and up to a tick of
    /// rounding on each timer. Twice that plus a second is the bound; a
    /// deadlock exceeds any bound, and the timeout fires at once in virtual
    /// time.
    fn liveness_bound(&self) -> Duration {
        let items = self.items;
        let stages = self.stages.len() as u64;
        let mut retries = 0u64;
        let mut waits = Duration::ZERO;
        for k in 0..self.stages.len() {
            for id in 0..items {
                let fault = self.fault(k, id);
                if !matches!(fault, Fault::None | Fault::Gone) {
                    retries += 1;
                    waits += self.fault_wait(fault);
                }
            }
        }
        let requests = items * stages + retries + self.pages();
        let throttled = if self.source == Source::Throttle {
            items
        } else {
            0
        };
        let tokens = requests + throttled;
        let pacing = self
            .rate()
            .map_or(Duration::ZERO, |rate| rate.interval() * tokens as u32);
        let latency = self.latency.max() * requests as u32;
        let consumer = ms(self.consumer_ms) * items as u32;
        let rounding = TICK * (tokens + requests + retries + items) as u32;
        (pacing + latency + waits + consumer + rounding) * 2 + ms(1_000)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// 429 with `Retry-After: 1`, then 200.
    TooManyAfter,
    /// 429 without `Retry-After` (the constant backoff), then 200.
    TooMany,
    /// 503 without `Retry-After` (the pause fallback), then 200.
    Unavailable,
    /// 503 with `Retry-After: 1`, then 200.
    UnavailableAfter,
    /// A connection reset, then 200.
    Reset,
    /// 404 every time: the item leaves as an error at this stage.
    Gone,
}

fn mix(mut x: u64) -> u64 {
    // splitmix64: deterministic, well spread.
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn shapes() -> impl Strategy<Value = Shape> {
    let stage = (1usize..=32, any::<bool>()).prop_map(|(n, ordered)| StageShape { n, ordered });
    (
        1u64..=24,
        prop_oneof![
            2 => Just(Source::Items),
            1 => Just(Source::Paginate),
            1 => Just(Source::Throttle),
        ],
        prop::collection::vec(stage, 1..=3),
        prop_oneof![
            Just(Sharing::OneClient),
            Just(Sharing::SharedLimiter),
            Just(Sharing::Independent),
        ],
        prop::option::weighted(0.8, (5u32..=200, 1u32..=5)),
        prop_oneof![
            Just(Lat::Zero),
            (0u64..=50).prop_map(Lat::Fixed),
            (0u64..=20, 0u64..=60).prop_map(|(lo, spread)| Lat::Uniform(lo, lo + spread)),
        ],
        prop_oneof![Just(0u64), 0u64..=1_000],
        prop::option::of(prop_oneof![Just(3u64), Just(8), Just(20)]),
        0u64..=300,
        50u64..=500,
        any::<u64>(),
    )
        .prop_map(
            |(
                items,
                source,
                stages,
                sharing,
                rate,
                latency,
                consumer_ms,
                faults,
                backoff_ms,
                pause_ms,
                seed,
            )| {
                // A throttle on "the same limiter" needs a limiter.
                let rate = match (source, rate) {
                    (Source::Throttle, None) => Some((50, 1)),
                    (_, rate) => rate,
                };
                Shape {
                    items,
                    source,
                    stages,
                    sharing,
                    rate,
                    latency,
                    consumer_ms,
                    faults,
                    backoff_ms,
                    pause_ms,
                    seed,
                }
            },
        )
}

/// Why an item left the pipeline as an error.
#[derive(Debug)]
enum Failed {
    Item(FetchError<u64>),
    Page(String),
}

impl From<FetchError<u64>> for Failed {
    fn from(e: FetchError<u64>) -> Self {
        Failed::Item(e)
    }
}

impl sluicegate::StageError<u64> for Failed {
    type Output = Failed;
    fn pass(self) -> Failed {
        self
    }
    fn lift(e: FetchError<u64>) -> Failed {
        Failed::Item(e)
    }
}

type Out = Result<u64, Failed>;

/// The mock server of a shape: `/s/{stage}/{id}` answers as the shape's
/// faults say, `/pages?page=N` lists the ids `PAGE` at a time.
fn server(shape: &Shape) -> MockTransport {
    let mock = MockTransport::with_seed(shape.seed);
    let items = shape.items;
    mock.mount(
        Route::get("/pages")
            .latency(shape.latency.latency())
            .respond_with(move |r| {
                let page: u64 = r.query("page").and_then(|p| p.parse().ok()).unwrap_or(1);
                let ids: Vec<u64> = ((page - 1) * PAGE..(page * PAGE).min(items)).collect();
                MockResponse::json(&ids)
            }),
    );
    let asked: Mutex<HashMap<(usize, u64), u32>> = Mutex::new(HashMap::new());
    let faults = shape.clone();
    mock.mount(
        Route::get("/s/{stage}/{id}")
            .latency(shape.latency.latency())
            .respond_with(move |r| {
                let stage: usize = r.param("stage").unwrap().parse().unwrap();
                let id: u64 = r.param("id").unwrap().parse().unwrap();
                let first = {
                    let mut asked = asked.lock().unwrap();
                    let n = asked.entry((stage, id)).or_insert(0);
                    *n += 1;
                    *n == 1
                };
                match faults.fault(stage, id) {
                    Fault::Gone => MockResponse::status(404),
                    _ if !first => MockResponse::ok(),
                    Fault::None => MockResponse::ok(),
                    Fault::TooManyAfter => MockResponse::status(429).header("retry-after", "1"),
                    Fault::TooMany => MockResponse::status(429),
                    Fault::Unavailable => MockResponse::status(503),
                    Fault::UnavailableAfter => MockResponse::status(503).header("retry-after", "1"),
                    Fault::Reset => MockResponse::transport_error(TransportErrorKind::Reset),
                }
            }),
    );
    mock
}

/// One client per stage, sharing a budget as the shape says.
fn clients(shape: &Shape, mock: &MockTransport) -> Vec<Client> {
    let with_rate = |b: sluicegate::ClientBuilder| match shape.rate() {
        Some(rate) => b.rate(rate),
        None => b,
    };
    let stages = shape.stages.len();
    match (shape.sharing, shape.rate()) {
        (Sharing::OneClient, _) => {
            let client = with_rate(builder(mock)).build().unwrap();
            vec![client; stages]
        }
        (Sharing::SharedLimiter, Some(rate)) => {
            let limiter = Limiter::new(rate);
            (0..stages)
                .map(|_| builder(mock).limiter(limiter.clone()).build().unwrap())
                .collect()
        }
        (Sharing::SharedLimiter | Sharing::Independent, _) => (0..stages)
            .map(|_| with_rate(builder(mock)).build().unwrap())
            .collect(),
    }
}

/// The shape's retry and pause rules, and its order.
fn configure<S, A>(stage: FetchConcurrent<S, A>, shape: &Shape, k: usize) -> FetchConcurrent<S, A>
where
    S: Stream,
    A: StageInput<S::Item>,
{
    let backoff = Backoff::constant(ms(shape.backoff_ms));
    let stage = stage
        .retry_on(StatusCode::TOO_MANY_REQUESTS, backoff.clone())
        .retry_on(Matcher::transport_errors(), backoff)
        .pause_on(StatusCode::SERVICE_UNAVAILABLE, ms(shape.pause_ms));
    if shape.stages[k].ordered {
        stage.ordered()
    } else {
        stage
    }
}

fn endpoint(client: &Client, stage: usize) -> Endpoint<u64> {
    client.get(move |id: &u64| format!("/s/{stage}/{id}"))
}

fn pipeline(shape: &Shape, clients: &[Client]) -> BoxStream<'static, Out> {
    let first = shape.stages[0].n;
    let mut out: BoxStream<'static, Out> = match shape.source {
        Source::Items | Source::Throttle => {
            let ids = stream::iter(0..shape.items);
            let ids = match (shape.source, clients[0].limiter()) {
                (Source::Throttle, Some(limiter)) => ids.throttle(limiter).boxed(),
                _ => ids.boxed(),
            };
            configure(
                ids.fetch_concurrent(first, endpoint(&clients[0], 0)),
                shape,
                0,
            )
            .map_ok(|f| f.item)
            .map_err(Failed::from)
            .boxed()
        }
        Source::Paginate => {
            let ids = paginate(&clients[0], "/pages", Pagination::page_number("page", ""))
                .flat_unpack::<u64>()
                .map_err(|e| Failed::Page(format!("{e:?}")));
            configure(
                ids.try_fetch_concurrent(first, endpoint(&clients[0], 0)),
                shape,
                0,
            )
            .map_ok(|f| f.item)
            .boxed()
        }
    };
    for (k, client) in clients.iter().enumerate().skip(1) {
        let n = shape.stages[k].n;
        out = configure(out.try_fetch_concurrent(n, endpoint(client, k)), shape, k)
            .map_ok(|f| f.item)
            .boxed();
    }
    out
}

/// Runs `f` on a thread of its own, giving it `limit` of real time.
///
/// Virtual time ends any run that merely waits (`tokio::time::timeout`
/// fires as soon as nothing else can happen), but not one whose thread is
/// blocked outright, on a lock taken again by a drop or a wake-up under
/// it: that takes the runtime and its timers down with it, and only a
/// watchdog outside the runtime can report it instead of hanging the suite.
/// The limit is a backstop for that alone, far above any run's real time.
fn watched<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (done, outcome) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    match outcome.recv_timeout(limit) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => Err(format!(
            "deadlock: the runtime's thread is blocked (no end within {limit:?} of real time)"
        )),
    }
}

/// Runs one shape on its own paused runtime, on a watched thread.
fn run_shape(shape: &Shape) -> Result<(), String> {
    let shape = shape.clone();
    watched(Duration::from_secs(10), move || run_shape_here(&shape))?
}

/// Runs one shape on its own paused runtime and checks it.
fn run_shape_here(shape: &Shape) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let result = runtime.block_on(async {
        // The runtime's clock has not moved: this is its timer grid's origin.
        let origin = Instant::now();
        let mock = server(shape);
        let clients = clients(shape, &mock);
        let bound = shape.liveness_bound();
        let done = Arc::new(AtomicUsize::new(0));
        let consumer = ms(shape.consumer_ms);
        let run = {
            let done = done.clone();
            pipeline(shape, &clients)
                .then(move |x| async move {
                    if !consumer.is_zero() {
                        sleep(consumer).await;
                    }
                    x
                })
                .inspect(move |_| {
                    done.fetch_add(1, Ordering::Relaxed);
                })
                .collect::<Vec<Out>>()
        };
        let mut run = Box::pin(run);
        let Ok(outputs) = tokio::time::timeout(bound, run.as_mut()).await else {
            // Leak the stuck pipeline (and below, its runtime): tearing it
            // down may block the thread for good (see `watched`), and the
            // hang is what this run has to report.
            std::mem::forget(run);
            let calls = mock.calls();
            let uncollected = calls.iter().filter(|c| c.collected_at.is_none()).count();
            return Err(format!(
                "hang: no end within {bound:?} (derived bound): {} of {} items out, \
                     {} calls ({uncollected} never collected)",
                done.load(Ordering::Relaxed),
                shape.items,
                calls.len(),
            ));
        };

        // (b) Exactly once: each item leaves once, as the script says.
        let mut seen: HashMap<u64, usize> = HashMap::new();
        for out in &outputs {
            let id = match out {
                Ok(id) => {
                    if let Some(k) = shape.gone_at(*id) {
                        return Err(format!("item {id} came through though stage {k} 404s it"));
                    }
                    *id
                }
                Err(Failed::Item(e)) => {
                    let id = *e.item();
                    if shape.gone_at(id).is_none() || e.status() != Some(StatusCode::NOT_FOUND) {
                        return Err(format!("item {id} failed unexpectedly: {e:?}"));
                    }
                    id
                }
                Err(Failed::Page(e)) => return Err(format!("a page failed: {e}")),
            };
            *seen.entry(id).or_default() += 1;
        }
        for id in 0..shape.items {
            match seen.get(&id) {
                Some(1) => {}
                Some(n) => return Err(format!("item {id} left {n} times")),
                None => return Err(format!("item {id} never left the pipeline")),
            }
        }
        if outputs.len() as u64 != shape.items {
            return Err(format!(
                "{} outputs for {} items",
                outputs.len(),
                shape.items
            ));
        }

        let calls = mock.calls();
        // (c) Each limiter's GCRA bound over the sends of every stage it serves.
        if let Some(rate) = shape.rate() {
            let mut by_budget: HashMap<usize, Vec<Instant>> = HashMap::new();
            for call in &calls {
                let stage = match call.path().strip_prefix("/s/") {
                    Some(rest) => rest.split('/').next().unwrap().parse().unwrap(),
                    None => 0, // a page, on the first stage's client
                };
                by_budget
                    .entry(shape.budget_of(stage))
                    .or_default()
                    .push(call.sent_at);
            }
            for (budget, sent) in &by_budget {
                check_windows(rate, sent, &widths_for(rate)).map_err(|e| {
                    let log: Vec<_> = calls
                        .iter()
                        .map(|c| (c.path().to_owned(), c.sent_at - origin, c.status()))
                        .collect();
                    format!("budget {budget}: {e}; calls: {log:?}")
                })?;
            }
        }
        // (d) No stall: every answer collected the instant it was due.
        check_no_stall(origin, &calls)
    });
    if result.as_ref().is_err_and(|e| e.starts_with("hang")) {
        std::mem::forget(runtime);
    }
    result
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any composition of stages, clients and limiters finishes, accounts
    /// for every item once, keeps every limiter's bound, and never leaves an
    /// answer waiting for a poll.
    #[test]
    fn every_topology_finishes_exactly_once_within_its_rate_without_stalls(shape in shapes()) {
        if let Err(e) = run_shape(&shape) {
            prop_assert!(false, "{e}\nshape: {shape:?}");
        }
    }
}

/// The shape first seen to hang: two stages on one client at 10/s with no
/// latency, the first wider than the second.
#[test]
fn two_chained_stages_on_one_rate_limited_client_finish() {
    let shape = Shape {
        items: 40,
        source: Source::Items,
        stages: vec![
            StageShape {
                n: 8,
                ordered: false,
            },
            StageShape {
                n: 2,
                ordered: false,
            },
        ],
        sharing: Sharing::OneClient,
        rate: Some((10, 1)),
        latency: Lat::Zero,
        consumer_ms: 0,
        faults: None,
        backoff_ms: 0,
        pause_ms: 100,
        seed: 0,
    };
    if let Err(e) = run_shape(&shape) {
        panic!("{e}\nshape: {shape:?}");
    }
}

// ---------------------------------------------------------------------------
// A busy consumer
// ---------------------------------------------------------------------------

/// Items whose ids are odd get a 429 (no `Retry-After`) first, then 200;
/// every answer after `latency`.
fn odd_items_refused_once(latency: Duration) -> MockTransport {
    let mock = MockTransport::new();
    let asked: Mutex<HashMap<u32, u32>> = Mutex::new(HashMap::new());
    mock.mount(
        Route::get("/items/{id}")
            .latency(Latency::fixed(latency))
            .respond_with(move |r| {
                let id: u32 = r.param("id").unwrap().parse().unwrap();
                let mut asked = asked.lock().unwrap();
                let n = asked.entry(id).or_insert(0);
                *n += 1;
                if id % 2 == 1 && *n == 1 {
                    MockResponse::status(429)
                } else {
                    MockResponse::ok()
                }
            }),
    );
    mock
}

async fn busy<T>(x: T) -> T {
    sleep(ms(1_000)).await;
    x
}

#[tokio::test(start_paused = true)]
async fn answers_due_together_are_collected_when_due_while_the_consumer_sleeps() {
    let origin = Instant::now();
    let mock = MockTransport::new();
    mock.mount(
        Route::get("/items/{id}")
            .latency(Latency::fixed(ms(50)))
            .respond(MockResponse::ok()),
    );
    let client = builder(&mock).build().unwrap();
    let out: Vec<_> = stream::iter(0u32..2)
        .fetch_concurrent(2, client.get(|id: &u32| format!("/items/{id}")))
        .then(busy)
        .collect()
        .await;
    assert!(out.iter().all(Result::is_ok));
    let calls = mock.calls();
    assert_eq!(calls.len(), 2);
    for call in &calls {
        assert_eq!(call.due_at - origin, ms(50));
    }
    check_no_stall(origin, &calls).unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_retry_goes_after_its_backoff_not_when_the_consumer_returns() {
    let origin = Instant::now();
    // Four answers due together at 100 ms, two of them 429s; the consumer
    // takes one 200 and sleeps for a second.
    let mock = odd_items_refused_once(ms(100));
    let client = builder(&mock).build().unwrap();
    let out: Vec<_> = stream::iter(0u32..4)
        .fetch_concurrent(4, client.get(|id: &u32| format!("/items/{id}")))
        .retry_on(StatusCode::TOO_MANY_REQUESTS, Backoff::constant(ms(10)))
        .then(busy)
        .collect()
        .await;
    assert!(out.iter().all(Result::is_ok));
    let calls = mock.calls();
    for id in [1, 3] {
        let path = format!("/items/{id}");
        let sent: Vec<Duration> = calls
            .iter()
            .filter(|c| c.path() == path)
            .map(|c| c.sent_at - origin)
            .collect();
        assert_eq!(
            sent,
            [ms(0), ms(110)],
            "item {id}: refused at 100 ms, retried 10 ms later"
        );
    }
    check_no_stall(origin, &calls).unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_busy_consumer_causes_no_false_item_timeout() {
    let origin = Instant::now();
    // Retries answer at 210 ms, well inside the 300 ms each item has.
    let mock = odd_items_refused_once(ms(100));
    let client = builder(&mock).build().unwrap();
    let out: Vec<_> = stream::iter(0u32..4)
        .fetch_concurrent(4, client.get(|id: &u32| format!("/items/{id}")))
        .retry_on(StatusCode::TOO_MANY_REQUESTS, Backoff::constant(ms(10)))
        .item_timeout(ms(300))
        .then(busy)
        .collect()
        .await;
    for r in &out {
        if let Err(e) = r {
            panic!("item {} failed: {:?} ({e})", e.item(), e.kind());
        }
    }
    assert_eq!(out.len(), 4);
    check_no_stall(origin, &mock.calls()).unwrap();
}

#[tokio::test(start_paused = true)]
async fn two_step_answers_and_a_busy_consumer_cause_no_false_attempt_timeout() {
    let origin = Instant::now();
    let mock = MockTransport::new();
    // Head at 50 ms, body at 100 ms: two wake-ups per request.
    mock.mount(
        Route::get("/items/{id}").respond(MockResponse::ok().delay(ms(50)).body_delay(ms(50))),
    );
    let client = builder(&mock).build().unwrap();
    let out: Vec<_> = stream::iter(0u32..6)
        .fetch_concurrent(3, client.get(|id: &u32| format!("/items/{id}")))
        .timeout(ms(150))
        .then(busy)
        .collect()
        .await;
    for r in &out {
        if let Err(e) = r {
            panic!("item {} failed: {:?} ({e})", e.item(), e.kind());
        }
    }
    assert_eq!(out.len(), 6);
    let calls = mock.calls();
    assert_eq!(calls.len(), 6);
    check_no_stall(origin, &calls).unwrap();
}

// ---------------------------------------------------------------------------
// Dropping a pipeline while another goes on
// ---------------------------------------------------------------------------

/// One pipeline of one stage, or two chained, on `client`: each item's id.
fn ids_through(
    client: &Client,
    ids: std::ops::Range<u64>,
    chained: bool,
) -> BoxStream<'static, u64> {
    let first = stream::iter(ids)
        .fetch_concurrent(8, client.get(|id: &u64| format!("/items/{id}")))
        .map_ok(|f| f.item);
    if chained {
        first
            .try_fetch_concurrent(4, client.get(|id: &u64| format!("/items/{id}")))
            .map(|r| {
                r.map(|f| f.item)
                    .unwrap_or_else(|e| *e.item::<u64>().expect("a u64 item"))
            })
            .boxed()
    } else {
        first.map(|r| r.unwrap_or_else(|e| *e.item())).boxed()
    }
}

/// Two pipelines share a fast `Limiter` on a two-worker runtime; in every
/// round one is dropped mid-flight, by aborting its task or by dropping its
/// stream after a few items, and the other must still deliver every item
/// once. Pipelines of one stage and of two chained stages take turns.
async fn drop_rounds(round_now: Arc<Mutex<String>>) {
    const ITEMS: u64 = 40;
    for round in 0..48u64 {
        let abort = round % 2 == 0;
        let chained = round % 4 >= 2;
        *round_now.lock().unwrap() = format!(
            "round {round}: {} pipelines, the victim {}",
            if chained { "two-stage" } else { "one-stage" },
            if abort {
                "aborted"
            } else {
                "dropped after a few items"
            },
        );
        let limiter = Limiter::new(Rate::per_second(2_000));
        let mock = MockTransport::new();
        mock.record_calls(false);
        mock.mount(Route::get("/items/{id}").respond(MockResponse::ok()));
        let survivor_client = builder(&mock).limiter(limiter.clone()).build().unwrap();
        let victim_client = builder(&mock).limiter(limiter.clone()).build().unwrap();

        let survivor =
            tokio::spawn(ids_through(&survivor_client, 0..ITEMS, chained).collect::<Vec<u64>>());
        let victim = ids_through(&victim_client, 0..10_000, chained);
        if abort {
            let task = tokio::spawn(victim.for_each(|_| async {}));
            sleep(Duration::from_micros(500 + 700 * (round % 7))).await;
            task.abort();
        } else {
            let mut victim = victim;
            for _ in 0..(round % 9 + 1) {
                victim.next().await;
            }
            drop(victim);
        }
        let mut got = survivor.await.unwrap();
        got.sort_unstable();
        assert_eq!(
            got,
            (0..ITEMS).collect::<Vec<_>>(),
            "round {round}: the survivor lost or repeated items"
        );
    }
}

/// Real time on a real multi-thread runtime, so the bound is generous
/// (each round takes a few tens of milliseconds); `watched` also catches a
/// runtime whose threads are blocked, which no timer inside it can.
#[test]
fn dropping_one_pipeline_never_stalls_another_on_the_same_limiter() {
    let round_now = Arc::new(Mutex::new(String::new()));
    let rounds = {
        let round_now = round_now.clone();
        move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_time()
                .build()
                .unwrap()
                .block_on(async {
                    let rounds = drop_rounds(round_now.clone());
                    if tokio::time::timeout(Duration::from_secs(30), rounds)
                        .await
                        .is_err()
                    {
                        let at = round_now.lock().unwrap().clone();
                        panic!("the survivor stalled in {at}");
                    }
                })
        }
    };
    if let Err(e) = watched(Duration::from_secs(40), rounds) {
        let at = round_now.lock().unwrap().clone();
        panic!("{e}, in {at}");
    }
}

// ---------------------------------------------------------------------------
// Rates at burst 1
// ---------------------------------------------------------------------------

const TEN_SECONDS: Duration = Duration::from_secs(10);

fn burst_one_rates() -> [Rate; 6] {
    [
        Rate::per_second(400),
        Rate::per_second(600),
        Rate::per_second(1_000),
        Rate::per_second(7),
        Rate::per_second(33),
        Rate::new(60, Duration::from_secs(10)),
    ]
}

/// How many events GCRA at burst 1 passes in `[0, 10 s]` on a paused clock.
///
/// Keeping the ideal instants `k * interval` (k = 0, 1, ...), each grant
/// happens when its timer fires: at the first millisecond tick at or after
/// `k * interval`. That tick is within 10 s exactly when `k * interval <=
/// 10 s` (10 s is itself a tick), so `1 + floor(10 s / interval)` events
/// pass, the interval being the rate's own (whole nanoseconds, rounded
/// down). A limiter that restarts its schedule from the late tick instead
/// drifts by up to a tick per event and passes fewer: at 400/s it spaces
/// events 3 ms apart, at 7/s it loses the 71st event.
fn gcra_count_in_ten_seconds(rate: Rate) -> usize {
    let burst = rate.burst_size() as usize;
    burst + (TEN_SECONDS.as_nanos() / rate.interval().as_nanos()) as usize
}

fn check_burst_one(what: &str, rate: Rate, origin: Instant, sent: &[Instant]) {
    let within: Vec<Instant> = sent
        .iter()
        .copied()
        .filter(|t| *t - origin <= TEN_SECONDS)
        .collect();
    assert_eq!(
        within.len(),
        gcra_count_in_ten_seconds(rate),
        "{what} at {rate}: events in the first 10 s"
    );
    let mut widths = widths_for(rate);
    widths.push(TEN_SECONDS);
    if let Err(e) = check_windows(rate, &within, &widths) {
        panic!("{what}: {e}");
    }
}

#[tokio::test(start_paused = true)]
async fn throttle_at_burst_one_passes_exactly_the_gcra_count() {
    for rate in burst_one_rates() {
        let origin = Instant::now();
        let sent: Vec<Instant> = stream::iter(0u64..)
            .throttle(rate)
            .map(|_| Instant::now())
            .take_while(|t| futures::future::ready(*t - origin <= TEN_SECONDS))
            .collect()
            .await;
        check_burst_one("throttle", rate, origin, &sent);
    }
}

#[tokio::test(start_paused = true)]
async fn a_fetch_stage_at_burst_one_passes_exactly_the_gcra_count() {
    for rate in burst_one_rates() {
        let origin = Instant::now();
        let mock = MockTransport::new();
        mock.mount(Route::get("/items/{id}").respond(MockResponse::ok()));
        let client = builder(&mock).rate(rate).build().unwrap();
        let run = stream::iter(0u64..)
            .fetch_concurrent(8, client.get(|id: &u64| format!("/items/{id}")))
            .for_each(|r| {
                assert!(r.is_ok());
                futures::future::ready(())
            });
        // Cut the endless run shortly after 10 s and look at what was sent.
        let _ = tokio::time::timeout(TEN_SECONDS + ms(500), run).await;
        let sent: Vec<Instant> = mock.calls().iter().map(|c| c.sent_at).collect();
        check_burst_one("fetch_concurrent(8)", rate, origin, &sent);
    }
}
