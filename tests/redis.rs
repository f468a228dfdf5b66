//! A Limiter and PauseHandle shared through a real redis-server, by worker
//! processes this test starts. Needs the Debian package `redis-server`:
//! without it these tests are skipped with a notice, or fail when
//! `SLUICEGATE_REQUIRE_REDIS=1` (as CI sets it).
#![cfg(all(feature = "redis", feature = "demo", feature = "reqwest"))]

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use futures::{stream, StreamExt, TryStreamExt};
use http::StatusCode;
use sluicegate::demo::{Arrival, DemoConfig, DemoServer};
use sluicegate::etl::Journal;
use sluicegate::mock::{MockResponse, MockTransport, Route};
use sluicegate::prelude::*;
use sluicegate::redis::{FailureMode, Job, RedisCoordinator, WorkQueue};
use sluicegate::ReqwestTransport;
use tokio::sync::Notify;

/// Held by every test here that starts processes or a Redis server, so
/// each runs alone: on a small machine two of them at once starve each
/// other's processes of CPU, and a process that runs late measures the
/// machine, not the limiter.
static MEASURING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const RATE: u32 = 200;
const BURST: u32 = 5;

/// A redis-server of this test's own, on a free loopback port.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    /// Every write is in its append-only file, on disk before Redis
    /// answers, so a restart in the same directory loses nothing it
    /// acknowledged.
    persistent: bool,
}

impl Redis {
    /// Starts one without persistence, or returns `None` (after saying
    /// why) when the package is missing and CI did not ask for it.
    fn start() -> Option<Self> {
        Self::start_with(false)
    }

    /// Starts one that persists every write (`appendonly yes`,
    /// `appendfsync always`) in its own directory.
    fn start_persistent() -> Option<Self> {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> Option<Self> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            if std::env::var("SLUICEGATE_REQUIRE_REDIS").as_deref() == Ok("1") {
                panic!("redis-server not found: install the Debian package `redis-server`");
            }
            eprintln!("skipped: redis-server not found (Debian package `redis-server`)");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir =
            std::env::temp_dir().join(format!("sluicegate-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut redis = Self {
            child: None,
            port,
            dir,
            persistent,
        };
        redis.spawn();
        Some(redis)
    }

    /// Starts the server (again) on this port and directory, and waits
    /// until it has loaded its data and accepts connections.
    fn spawn(&mut self) {
        let persistence: &[&str] = if self.persistent {
            &["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &["--appendonly", "no"]
        };
        let mut child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(persistence)
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        for line in stdout.lines() {
            if line.unwrap().contains("Ready to accept connections") {
                break;
            }
        }
        self.child = Some(child);
    }

    /// A placeholder that owns no server.
    fn detached() -> Self {
        Self {
            child: None,
            port: 0,
            dir: std::env::temp_dir().join("sluicegate-redis-detached"),
            persistent: false,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server with SIGKILL: no chance to save anything.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn client(redis: &RedisCoordinator, server: &str) -> Client {
    client_over(redis, server, ReqwestTransport::default())
}

fn client_over(redis: &RedisCoordinator, server: &str, transport: impl Transport) -> Client {
    Client::builder()
        .transport(transport)
        .base_url(server)
        .limiter(redis.limiter(Rate::per_second(RATE).burst(BURST)))
        .pause_handle(redis.pause_handle())
        .pause_on(StatusCode::SERVICE_UNAVAILABLE, Duration::from_millis(500))
        .build()
        .unwrap()
}

/// A transport that notes when each request is handed to it: right after
/// its rate token, so the instant the limiter let it go. Noted on the
/// system clock, which every worker process shares.
struct Stamped {
    inner: ReqwestTransport,
    sent: Arc<Mutex<Vec<u128>>>,
}

impl Transport for Stamped {
    fn send(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> futures::future::BoxFuture<
        'static,
        Result<http::Response<bytes::Bytes>, sluicegate::TransportError>,
    > {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        self.sent.lock().unwrap().push(now);
        self.inner.send(request)
    }
}

/// Not a test on its own: the worker process the tests below start, one
/// per `SLUICEGATE_REDIS_WORKER="redis-url server-url first count
/// sent-file"`. It writes to `sent-file` when each request was sent (see
/// [`Stamped`]), in nanoseconds of the system clock, one per line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_worker_process() {
    let Ok(spec) = std::env::var("SLUICEGATE_REDIS_WORKER") else {
        return;
    };
    let parts: Vec<&str> = spec.split(' ').collect();
    let (first, count): (u64, u64) = (parts[2].parse().unwrap(), parts[3].parse().unwrap());
    let redis = RedisCoordinator::new(parts[0], "workers").unwrap();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let transport = Stamped {
        inner: ReqwestTransport::default(),
        sent: sent.clone(),
    };
    let client = client_over(&redis, parts[1], transport);
    let ok = stream::iter(first..first + count)
        .fetch_concurrent(4, client.get(|id: &u64| format!("/items/{id}")))
        .filter(|r| futures::future::ready(r.is_ok()))
        .count()
        .await;
    let lines: Vec<String> = sent.lock().unwrap().iter().map(u128::to_string).collect();
    std::fs::write(parts[4], lines.join("\n")).unwrap();
    assert_eq!(ok as u64, count, "every item of the worker arrives");
}

/// Runs `workers` worker processes against `server`, 150 items each;
/// returns when the requests were sent, all workers together, sorted, from
/// the first.
fn run_workers(redis: &Redis, server: &DemoServer, workers: u64) -> Vec<Duration> {
    let sent_file = |w: u64| redis.dir.join(format!("sent-{w}.txt"));
    let started = std::time::Instant::now();
    let children: Vec<(String, Child)> = (0..workers)
        .map(|w| {
            let child = Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "redis_worker_process", "--test-threads=1"])
                .env(
                    "SLUICEGATE_REDIS_WORKER",
                    format!(
                        "{} {} {} 150 {}",
                        redis.url(),
                        server.url(),
                        w * 150,
                        sent_file(w).display()
                    ),
                )
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            (format!("w{w}"), child)
        })
        .collect();
    // A bound against a hang, not a measurement: the runs take seconds.
    wait_for_workers(children, started, Duration::from_secs(120));
    let mut sent: Vec<u128> = (0..workers)
        .flat_map(|w| {
            std::fs::read_to_string(sent_file(w))
                .unwrap()
                .lines()
                .map(|line| line.parse().unwrap())
                .collect::<Vec<u128>>()
        })
        .collect();
    sent.sort_unstable();
    sent.iter()
        .map(|&t| Duration::from_nanos((t - sent[0]) as u64))
        .collect()
}

/// The most arrivals (sorted) in any window of `width`.
fn max_in_window(arrivals: &[Arrival], width: Duration) -> usize {
    let times: Vec<Duration> = arrivals.iter().map(|a| a.at).collect();
    common::max_in_window(&times, width)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_worker_processes_share_one_rate() {
    let _measuring = MEASURING.lock().await;
    let Some(redis) = Redis::start() else { return };
    let server = DemoServer::start(DemoConfig::default().items(600).record_arrivals(true))
        .await
        .unwrap();
    let sent = tokio::task::block_in_place(|| run_workers(&redis, &server, 4));
    assert_eq!(sent.len(), 600);
    assert_eq!(server.arrivals().len(), 600);

    // Measured from the cause: when each worker let a request go, right
    // after its token, not when the server got to it (a busy machine
    // delays some arrivals and bunches them with later ones). GCRA lets
    // `RATE * w + BURST` into any window of `w`; a process's head may be
    // up to 10 ms late and still be given its turn (RATE / 100 tokens); 2
    // for a process preempted between its token and the note of it.
    let allowed =
        |w: Duration| (RATE as f64 * w.as_secs_f64()) as usize + (BURST + RATE / 100 + 2) as usize;
    let span = *sent.last().unwrap();
    eprintln!(
        "sent at {:.1}/s after the burst; most in 100 ms: {} (allowed {})",
        (sent.len() - BURST as usize) as f64 / span.as_secs_f64(),
        common::max_in_window(&sent, Duration::from_millis(100)),
        allowed(Duration::from_millis(100)),
    );
    assert!(
        sent.len() <= allowed(span),
        "{} requests in {span:?}: above the shared rate",
        sent.len()
    );
    for width in [10, 100, 1_000].map(Duration::from_millis) {
        let most = common::max_in_window(&sent, width);
        assert!(
            most <= allowed(width),
            "{most} requests in one {width:?} window, {} allowed",
            allowed(width)
        );
    }
    // What the server saw, for the record.
    let mut arrivals = server.arrivals();
    arrivals.sort_by_key(|a| a.at);
    eprintln!(
        "arrivals: most in 100 ms: {}",
        max_in_window(&arrivals, Duration::from_millis(100))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_seen_by_one_worker_stalls_every_worker() {
    let _measuring = MEASURING.lock().await;
    let Some(redis) = Redis::start() else { return };
    let every = Duration::from_millis(1_200);
    let lasting = Duration::from_millis(400);
    let server = DemoServer::start(
        DemoConfig::default()
            .items(600)
            .outages(every, lasting)
            .record_arrivals(true),
    )
    .await
    .unwrap();
    tokio::task::block_in_place(|| run_workers(&redis, &server, 3));

    let mut arrivals = server.arrivals();
    arrivals.sort_by_key(|a| a.at);
    let mut outages = 0;
    for k in 1.. {
        let (start, end) = (every * k, every * k + lasting);
        if arrivals.last().unwrap().at < start {
            break;
        }
        let Some(first) = arrivals.iter().find(|a| a.at >= start && a.status == 503) else {
            continue;
        };
        outages += 1;
        let after = arrivals
            .iter()
            .filter(|a| a.at > first.at && a.at < end)
            .count();
        eprintln!("outage {k}: {after} after the first 503");
        // Only requests already on their way (3 workers x 4 in flight) may
        // still arrive; no worker starts a new one.
        assert!(
            after <= 12,
            "outage {k}: {after} requests after the first 503"
        );
    }
    assert!(outages >= 1, "the run met an outage");
}

type Registry = Mutex<Vec<(String, Arc<Notify>)>>;

/// Who waits for the Redis of which coordinator to be reported unavailable.
static WAITING: Registry = Mutex::new(Vec::new());

/// Every event sluicegate logged in this process, at any level, as a log
/// would show it: its message and `field=value`s.
static LOGGED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Installs this process's one subscriber: it wakes [`WAITING`] and
/// fills [`LOGGED`].
fn install_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        use tracing_subscriber::layer::SubscriberExt;
        let subscriber = tracing_subscriber::registry()
            .with(OnFailure)
            .with(Recorder);
        tracing::subscriber::set_global_default(subscriber).unwrap();
    });
}

struct OnFailure;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for OnFailure {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        #[derive(Default)]
        struct Fields {
            unavailable: bool,
            name: String,
        }
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                match field.name() {
                    "message" => self.unavailable = format!("{value:?}") == "Redis unavailable",
                    "name" => self.name = format!("{value:?}"),
                    _ => {}
                }
            }
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        if fields.unavailable {
            for (name, notify) in WAITING.lock().unwrap().iter() {
                if *name == fields.name {
                    notify.notify_one();
                }
            }
        }
    }
}

struct Recorder;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Recorder {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if !event.metadata().target().starts_with("sluicegate") {
            return;
        }
        struct Line(String);
        impl tracing::field::Visit for Line {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                use std::fmt::Write;
                write!(self.0, " {}={value:?}", field.name()).unwrap();
            }
        }
        let mut line = Line(event.metadata().level().to_string());
        event.record(&mut line);
        LOGGED.lock().unwrap().push(line.0);
    }
}

/// Wakes whoever waits when sluicegate reports the Redis of coordinator
/// `name` unavailable (tests run in parallel, each with its own name).
fn redis_failures(name: &str) -> Arc<Notify> {
    install_tracing();
    let notify = Arc::new(Notify::new());
    WAITING
        .lock()
        .unwrap()
        .push((name.to_owned(), notify.clone()));
    notify
}

/// Kills Redis after 100 items while the pipeline keeps going, restarts it
/// once sluicegate notices (on another task: the consumer must keep polling,
/// or no new request would ask Redis anything), and checks every item
/// arrives. Returns how many requests reached the server while Redis was
/// down.
async fn survive_a_redis_restart(mode: FailureMode) -> Option<u64> {
    let mut redis = Redis::start()?;
    let name = format!("restart-{}", redis.port);
    let failures = redis_failures(&name);
    let server = Arc::new(
        DemoServer::start(DemoConfig::default().items(400))
            .await
            .unwrap(),
    );
    let coordinator = RedisCoordinator::new(&redis.url(), &name)
        .unwrap()
        .on_failure(mode)
        .timeouts(Duration::from_millis(300), Duration::from_millis(200));
    let client = client(&coordinator, &server.url());
    let mut results =
        stream::iter(0u64..400).fetch_concurrent(4, client.get(|id: &u64| format!("/items/{id}")));
    let mut ok = 0;
    let mut restarter = None;
    while let Some(result) = results.next().await {
        assert!(result.is_ok(), "{result:?}");
        ok += 1;
        if ok == 100 {
            let before = server.counts().requests;
            redis.kill();
            let server = server.clone();
            let failures = failures.clone();
            let mut redis = std::mem::replace(&mut redis, Redis::detached());
            restarter = Some(tokio::spawn(async move {
                failures.notified().await;
                let during = server.counts().requests - before;
                tokio::task::block_in_place(|| redis.spawn());
                (redis, during)
            }));
        }
    }
    assert_eq!(ok, 400, "no item lost");
    let (_redis, during) = restarter.expect("Redis was killed").await.unwrap();
    Some(during)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_closed_waits_for_redis_and_loses_nothing() {
    let _measuring = MEASURING.lock().await;
    let Some(during) = survive_a_redis_restart(FailureMode::FailClosed {
        give_up_after: Duration::from_secs(60),
    })
    .await
    else {
        return;
    };
    eprintln!("requests while Redis was down: {during}");
    assert!(
        during <= 4,
        "only the requests in flight went out: {during}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falling_back_keeps_going_at_a_share_and_loses_nothing() {
    let _measuring = MEASURING.lock().await;
    survive_a_redis_restart(FailureMode::FallbackLocal { share: 0.5 }).await;
}

/// Not a test on its own: a process of `inflight` tasks taking `count`
/// tokens in all from a shared limiter, one per
/// `SLUICEGATE_REDIS_LIMITER="redis-url name rate inflight count"`. Prints
/// the wall-clock instant (µs since the epoch) of each grant: the processes
/// share one machine, so one clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_limiter_process() {
    let Ok(spec) = std::env::var("SLUICEGATE_REDIS_LIMITER") else {
        return;
    };
    let parts: Vec<&str> = spec.split(' ').collect();
    let rate: u32 = parts[2].parse().unwrap();
    let (inflight, count): (usize, usize) = (parts[3].parse().unwrap(), parts[4].parse().unwrap());
    let redis = RedisCoordinator::new(parts[0], parts[1]).unwrap();
    let limiter = redis.limiter(Rate::per_second(rate).burst(BURST));
    let granted: Vec<u128> = stream::iter(0..count)
        .map(|_| {
            let acquire = limiter.acquire();
            async move {
                acquire.await;
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_micros()
            }
        })
        .buffer_unordered(inflight)
        .collect()
        .await;
    let lines: Vec<String> = granted.iter().map(u128::to_string).collect();
    // On a line of its own: the test harness may have started one.
    println!("\nGRANTS {}", lines.join(" "));
}

/// The calls of Lua scripts Redis has served so far.
fn script_calls(redis: &Redis) -> u64 {
    let output = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "INFO", "commandstats"])
        .output()
        .expect("redis-cli comes with redis-server");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Runs `processes` limiter processes of `inflight` waiters each, taking
/// `each` tokens per process at `rate`; returns the grant instants (sorted,
/// µs) and the script calls Redis served.
fn run_limiter_processes(
    redis: &Redis,
    name: &str,
    rate: u32,
    processes: usize,
    inflight: usize,
    each: usize,
) -> (Vec<u128>, u64) {
    let before = script_calls(redis);
    let started = std::time::Instant::now();
    let children: Vec<Child> = (0..processes)
        .map(|_| {
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "redis_limiter_process",
                    "--test-threads=1",
                    "--nocapture",
                ])
                .env(
                    "SLUICEGATE_REDIS_LIMITER",
                    format!("{} {name} {rate} {inflight} {each}", redis.url()),
                )
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut grants = Vec::new();
    for mut child in children {
        // A bound against a hang, not a measurement: the runs take seconds.
        while child.try_wait().unwrap().is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "a limiter process still running after 120 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "a limiter process failed");
        let text = String::from_utf8_lossy(&output.stdout);
        let line = text
            .lines()
            .find_map(|l| l.split_once("GRANTS ").map(|(_, grants)| grants))
            .expect("the process reports its grants");
        grants.extend(line.split(' ').map(|t| t.parse::<u128>().unwrap()));
    }
    grants.sort_unstable();
    (grants, script_calls(redis) - before)
}

/// Only the head of each process's line asks Redis, and Redis tells each
/// head when to come back, staggered, so the cost per token stays near one
/// call however many wait, and the rate holds.
#[test]
fn many_waiting_requests_cost_few_redis_calls() {
    let _measuring = MEASURING.blocking_lock();
    let Some(redis) = Redis::start() else { return };
    let (rate, processes, inflight, each) = (400, 16, 64, 100);
    let (grants, calls) = run_limiter_processes(&redis, "line", rate, processes, inflight, each);
    assert_eq!(grants.len(), processes * each);
    let span = (grants.last().unwrap() - grants[0]) as f64 / 1e6;
    let measured = (grants.len() - BURST as usize) as f64 / span;
    let per_grant = calls as f64 / grants.len() as f64;
    eprintln!(
        "{processes} processes x {inflight} waiting: {calls} Redis calls for {} grants ({per_grant:.2} per grant), {measured:.1}/s of {rate}/s",
        grants.len()
    );
    assert!(per_grant <= 2.0, "{per_grant:.2} Redis calls per grant");
    // Never above the shared rate. How close it comes from below is a
    // measurement (printed above: 397–401/s on a quiet machine), not a
    // test: with 16 processes on two cores a busy machine starves them.
    // That they finish at all is bounded in `run_limiter_processes`.
    assert!(
        measured <= 1.02 * f64::from(rate),
        "{measured:.1}/s against {rate}/s"
    );
}

/// The line of one process: first come first served; a waiter dropped
/// before its turn takes nothing and the next one gets its token; nothing
/// is granted to a waiter while its pause holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_line_is_fifo_cancel_safe_and_honours_the_pause() {
    let _measuring = MEASURING.lock().await;
    let Some(redis) = Redis::start() else { return };
    let coordinator = RedisCoordinator::new(&redis.url(), "line-order").unwrap();
    let limiter = coordinator.limiter(Rate::per_second(20));
    let pause = PauseHandle::new();
    let order = Arc::new(Mutex::new(Vec::new()));
    limiter.acquire().await; // the burst of one, spent
                             // Paused while they join, so they join in order and none goes yet.
    pause.pause_for(Duration::from_secs(30));
    let mut waiters = Vec::new();
    for id in 0..4 {
        let acquire = limiter.acquire_during(&pause);
        let order = order.clone();
        waiters.push(tokio::spawn(async move {
            acquire.await;
            order.lock().unwrap().push(id);
        }));
        let joining = tokio::time::Instant::now();
        while limiter.waiting() <= id {
            assert!(
                joining.elapsed() < Duration::from_secs(10),
                "waiter {id} joins"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    // Dropped before its turn: leaves the line, takes nothing.
    waiters.remove(1).abort();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while limiter.waiting() > 3 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    assert!(order.lock().unwrap().is_empty(), "nobody went while paused");
    pause.resume();
    for waiter in waiters {
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("the line moves on")
            .unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 2, 3]);

    // Paused: nobody is granted until the pause ends, then the line goes on.
    let paused_at = tokio::time::Instant::now();
    pause.pause_for(Duration::from_millis(300));
    let waiter = tokio::spawn(limiter.acquire_during(&pause));
    tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("granted after the pause")
        .unwrap();
    assert!(paused_at.elapsed() >= Duration::from_millis(300));
    assert_eq!(limiter.waiting(), 0);
}

/// The shared quota of the work-queue test, and its items.
const QUEUE_RATE: u32 = 400;
const QUEUE_ITEMS: u64 = 4_000;
/// The queue workers' `claim_after`: the items of a killed worker wait
/// this long for another, and a Redis outage shorter than this duplicates
/// nothing. Held items are renewed every quarter of it, so it is the
/// longest a worker process may freeze on a busy machine.
const QUEUE_CLAIM_AFTER: Duration = Duration::from_secs(5);

/// Not a test on its own: a worker draining the work queue into its own
/// journaled output, one per
/// `SLUICEGATE_QUEUE_WORKER="redis-url server-url consumer output"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_queue_worker_process() {
    let Ok(spec) = std::env::var("SLUICEGATE_QUEUE_WORKER") else {
        return;
    };
    let parts: Vec<&str> = spec.split(' ').collect();
    let redis = RedisCoordinator::new(parts[0], "queue").unwrap();
    let queue = WorkQueue::new(&redis, "items").claim_after(QUEUE_CLAIM_AFTER);
    let client = Client::builder()
        .transport(ReqwestTransport::default())
        .base_url(parts[1])
        .limiter(redis.limiter(Rate::per_second(QUEUE_RATE).burst(BURST)))
        .pause_handle(redis.pause_handle())
        .retry_on(
            StatusCode::TOO_MANY_REQUESTS,
            Backoff::exponential(Duration::from_millis(50)),
        )
        .build()
        .unwrap();
    let journal = Journal::open(parts[3], |job: &Job<u64>| job.key().to_owned()).unwrap();
    let done = journal.clone();
    let results = queue
        .jobs::<u64>(parts[2])
        .skip_done(move |job| done.is_done(job))
        .until_drained()
        .fetch_concurrent(
            8,
            client.get(|job: &Job<u64>| format!("/items/{}", job.item)),
        )
        .json::<serde_json::Value>()
        // The record names its key, for the union of outputs.
        .map_ok(|mut record| {
            record.value["key"] = record.item.key().into();
            record
        });
    journal
        .write_jsonl(queue.ack_after_commit(results))
        .await
        .unwrap();
}

/// Calls Redis served so far, by command (lowercase).
fn command_calls(redis: &Redis) -> std::collections::HashMap<String, u64> {
    let output = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "INFO", "commandstats"])
        .output()
        .expect("redis-cli comes with redis-server");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

fn queue_worker(
    redis: &Redis,
    server: &DemoServer,
    consumer: &str,
    dir: &std::path::Path,
) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "redis_queue_worker_process", "--test-threads=1"])
        .env(
            "SLUICEGATE_QUEUE_WORKER",
            format!(
                "{} {} {consumer} {}",
                redis.url(),
                server.url(),
                dir.join(format!("{consumer}.jsonl")).display()
            ),
        )
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn lines_of(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|text| text.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Waits for every worker to end, each successfully, within `limit` of
/// `started`.
fn wait_for_workers(workers: Vec<(String, Child)>, started: std::time::Instant, limit: Duration) {
    for (name, mut child) in workers {
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "worker {name} failed");
                break;
            }
            assert!(
                started.elapsed() < limit,
                "worker {name} still running after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The union of the outputs and dead letters of `workers` in `dir`: how
/// many times each key was committed, as each journal committed them
/// (opening a journal cuts off what a kill left half written).
fn union_of_outputs(dir: &std::path::Path, workers: &[String]) -> HashMap<u64, u32> {
    let mut seen = HashMap::<u64, u32>::new();
    for worker in workers {
        let output = dir.join(format!("{worker}.jsonl"));
        drop(Journal::open(&output, |job: &Job<u64>| job.key().to_owned()).unwrap());
        for line in lines_of(&output) {
            let record: serde_json::Value = serde_json::from_str(&line).unwrap();
            let key: u64 = record["key"].as_str().unwrap().parse().unwrap();
            *seen.entry(key).or_default() += 1;
        }
        for line in lines_of(&dir.join(format!("{worker}.failed.jsonl"))) {
            let record: serde_json::Value = serde_json::from_str(&line).unwrap();
            let key: u64 = record["item"]["key"].as_str().unwrap().parse().unwrap();
            *seen.entry(key).or_default() += 1;
        }
    }
    seen
}

/// The workers whose outputs hold `key`, for a failure's message.
fn writers_of(dir: &std::path::Path, workers: &[String], key: u64) -> Vec<String> {
    let key = format!("\"key\":\"{key}\"");
    workers
        .iter()
        .filter(|worker| {
            [".jsonl", ".failed.jsonl"].iter().any(|suffix| {
                lines_of(&dir.join(format!("{worker}{suffix}")))
                    .iter()
                    .any(|line| line.contains(&key))
            })
        })
        .cloned()
        .collect()
}

/// The keys committed more than once, sorted.
fn duplicates(seen: &HashMap<u64, u32>) -> Vec<u64> {
    let mut twice: Vec<u64> = seen
        .iter()
        .filter(|(_, &n)| n > 1)
        .map(|(&k, _)| k)
        .collect();
    twice.sort_unstable();
    twice
}

/// The rate the server saw (after the burst), and how many it refused;
/// prints the arrivals per second.
fn server_rate(server: &DemoServer) -> (f64, usize, usize) {
    let mut arrivals = server.arrivals();
    arrivals.sort_by_key(|a| a.at);
    let span = arrivals.last().unwrap().at - arrivals[0].at;
    let rate = (arrivals.len() - BURST as usize) as f64 / span.as_secs_f64();
    let refused = arrivals.iter().filter(|a| a.status == 429).count();
    let mut per_second = vec![0u32; span.as_secs() as usize + 1];
    for a in &arrivals {
        per_second[(a.at - arrivals[0].at).as_secs() as usize] += 1;
    }
    eprintln!(
        "{} requests ({refused} refused) in {span:.2?}: {rate:.1}/s of {QUEUE_RATE}/s; per second: {per_second:?}",
        arrivals.len()
    );
    (rate, refused, arrivals.len())
}

/// A queue of `items` pushed under keys `0..items`, checking that a key
/// pushed again is skipped.
async fn push_items(redis: &Redis, items: u64) -> WorkQueue {
    let coordinator = RedisCoordinator::new(&redis.url(), "queue").unwrap();
    let queue = WorkQueue::new(&coordinator, "items");
    let added = queue
        .push_all((0..items).map(|id| (id.to_string(), id)))
        .await
        .unwrap();
    assert_eq!(added, items);
    // Pushed again under the same keys: not enqueued twice.
    assert_eq!(
        queue
            .push_all((0..100u64).map(|id| (id.to_string(), id)))
            .await
            .unwrap(),
        0
    );
    assert!(!queue.push("7", &7u64).await.unwrap());
    queue
}

/// A server rate-limited at the shared quota (with room for twice the
/// burst), recording arrivals.
async fn rate_limited_server(items: u64) -> DemoServer {
    DemoServer::start(
        DemoConfig::default()
            .items(items)
            .rate_limit(Rate::per_second(QUEUE_RATE).burst(2 * BURST))
            .record_arrivals(true),
    )
    .await
    .unwrap()
}

/// Four workers drain one queue under one quota; one is killed mid-run and
/// another starts later. Every item is in the union of outputs once (after
/// deduplicating by key the at most one item a kill can leave committed and
/// unacknowledged), nothing stays pending, and the server saw the quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_drain_a_shared_queue_exactly_once_through_a_kill() {
    let _measuring = MEASURING.lock().await;
    let Some(redis) = Redis::start() else { return };
    let server = rate_limited_server(QUEUE_ITEMS).await;
    let dir = redis.dir.join("outputs");
    std::fs::create_dir_all(&dir).unwrap();
    let queue = push_items(&redis, QUEUE_ITEMS).await;

    let before = command_calls(&redis);
    let started = std::time::Instant::now();
    tokio::task::block_in_place(|| {
        let mut workers: Vec<(String, Child)> = (0..4)
            .map(|w| {
                let name = format!("w{w}");
                let child = queue_worker(&redis, &server, &name, &dir);
                (name, child)
            })
            .collect();
        // Killed mid-run, once it has committed a few hundred items.
        while lines_of(&dir.join("w0.jsonl")).len() < 300 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "w0 makes progress"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let (_, mut killed) = workers.remove(0);
        killed.kill().unwrap(); // SIGKILL
        killed.wait().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        workers.push(("w4".to_owned(), queue_worker(&redis, &server, "w4", &dir)));
        wait_for_workers(workers, started, Duration::from_secs(120));
    });
    let after = command_calls(&redis);
    let calls =
        |name: &str| after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0);

    let names: Vec<String> = (0..5).map(|w| format!("w{w}")).collect();
    let seen = union_of_outputs(&dir, &names);
    let twice = duplicates(&seen);
    let writers: Vec<(u64, Vec<String>)> = twice
        .iter()
        .map(|&key| (key, writers_of(&dir, &names, key)))
        .collect();
    eprintln!("items written twice (committed, then killed before the ack): {writers:?}");
    assert_eq!(seen.len() as u64, QUEUE_ITEMS, "every item is in the union");
    assert!(seen.keys().all(|&id| id < QUEUE_ITEMS));
    assert!(
        twice.len() <= 1,
        "at most the one item a kill can leave unacknowledged"
    );
    assert!(seen.values().all(|&n| n <= 2));
    assert_eq!(queue.pending().await.unwrap(), 0, "nothing left pending");
    assert_eq!(
        stream_length(&redis, "queue:queue:items"),
        0,
        "acknowledged entries are deleted"
    );

    let (rate, _, requests) = server_rate(&server);
    let scripts = calls("evalsha") + calls("eval");
    // One round trip each: an acknowledgement is one transaction (`exec`).
    let queue_calls = calls("xreadgroup")
        + calls("exec")
        + calls("xautoclaim")
        + calls("xpending")
        + calls("xgroup");
    eprintln!(
        "{:.2} limiter calls and {:.2} queue calls per request",
        scripts as f64 / requests as f64,
        queue_calls as f64 / requests as f64,
    );
    // Never above the shared quota; from below, the figure printed above is
    // a measurement (396–400/s on a quiet machine), kept out of the verdict
    // because worker processes on a busy two-core machine run slower.
    assert!(
        rate <= 1.02 * f64::from(QUEUE_RATE),
        "{rate:.1}/s against {QUEUE_RATE}/s"
    );
}

/// The entries left in a stream.
fn stream_length(redis: &Redis, stream: &str) -> u64 {
    redis_cli(redis, &["XLEN", stream]).trim().parse().unwrap()
}

fn redis_cli(redis: &Redis, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli comes with redis-server");
    assert!(output.status.success(), "redis-cli {args:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Redis itself is SIGKILLed while four workers drain the queue, and
/// started again on the same port and directory half a second later. It
/// persisted every write before answering, so the stream, the group and
/// the pending entries come back; the workers ride out the outage, and
/// afterwards every item is in the union of outputs exactly once, nothing
/// is pending, and nothing is left in the stream.
///
/// Duplicates: an item committed and claimed by another worker before its
/// acknowledgement reached Redis would be in two outputs. Here the outage
/// (about a second, with the workers' back-off) is shorter than the
/// workers' `claim_after` (5 s), so none may be; the test asserts none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_run_loses_and_duplicates_nothing() {
    const ITEMS: u64 = 2_000;
    let _measuring = MEASURING.lock().await;
    let Some(mut redis) = Redis::start_persistent() else {
        return;
    };
    let server = rate_limited_server(ITEMS).await;
    let dir = redis.dir.join("outputs");
    std::fs::create_dir_all(&dir).unwrap();
    let queue = push_items(&redis, ITEMS).await;
    let names: Vec<String> = (0..4).map(|w| format!("w{w}")).collect();

    let started = std::time::Instant::now();
    let committed_at_kill = tokio::task::block_in_place(|| {
        let workers: Vec<(String, Child)> = names
            .iter()
            .map(|name| (name.clone(), queue_worker(&redis, &server, name, &dir)))
            .collect();
        let committed = || -> usize {
            names
                .iter()
                .map(|name| lines_of(&dir.join(format!("{name}.jsonl"))).len())
                .sum()
        };
        while committed() < 600 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the workers make progress"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        redis.kill(); // SIGKILL
        let at_kill = committed();
        std::thread::sleep(Duration::from_millis(500));
        redis.spawn();
        wait_for_workers(workers, started, Duration::from_secs(120));
        at_kill
    });
    eprintln!(
        "Redis killed with {committed_at_kill} of {ITEMS} items committed, restarted 0.5 s later"
    );

    let seen = union_of_outputs(&dir, &names);
    let twice = duplicates(&seen);
    let lost = (0..ITEMS).filter(|id| !seen.contains_key(id)).count();
    eprintln!(
        "after a Redis restart: {lost} items lost, {} written twice: {twice:?}",
        twice.len()
    );
    assert_eq!(lost, 0, "no item lost");
    assert!(seen.keys().all(|&id| id < ITEMS));
    assert_eq!(twice, Vec::<u64>::new(), "no item written twice");
    assert_eq!(queue.pending().await.unwrap(), 0, "nothing left pending");
    assert_eq!(stream_length(&redis, "queue:queue:items"), 0);
    assert!(queue.dead_letters(10).await.unwrap().is_empty());
    let (rate, _, _) = server_rate(&server);
    assert!(
        rate <= 1.02 * f64::from(QUEUE_RATE),
        "{rate:.1}/s against {QUEUE_RATE}/s"
    );
}

/// A client on the mock, answering every `/items/{id}`.
fn mock_client() -> Client {
    let mock = MockTransport::new();
    mock.mount(Route::get("/items/{id}").respond_with(|_| MockResponse::ok()));
    Client::builder()
        .transport(mock)
        .base_url("http://mock")
        .build()
        .unwrap()
}

/// Drains `queue` as `consumer`, acknowledging each job after it is
/// "committed" (collected); returns the keys done.
async fn drain(queue: &WorkQueue, consumer: &str) -> Vec<String> {
    drain_through(queue, consumer, &mock_client(), 4).await
}

/// [`drain`], fetching through `client`, `concurrency` at a time.
async fn drain_through(
    queue: &WorkQueue,
    consumer: &str,
    client: &Client,
    concurrency: usize,
) -> Vec<String> {
    let results = queue
        .jobs::<u64>(consumer)
        .until_drained()
        .fetch_concurrent(
            concurrency,
            client.get(|job: &Job<u64>| format!("/items/{}", job.item)),
        );
    let done: Vec<String> = queue
        .ack_after_commit(results)
        .map(|result| result.unwrap().item.key().to_owned())
        .collect()
        .await;
    done
}

/// A worker whose pipeline takes twice `claim_after` over each item (a
/// slow server, one request at a time) keeps the items it read: they are
/// renewed while it holds them, though the pipeline does not ask for more
/// meanwhile, so another worker idle at the queue's end claims none of
/// them, and each is done once. Two queues on two connections stand for
/// two worker processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_worker_keeps_its_items_past_claim_after() {
    let _measuring = MEASURING.lock().await;
    let Some(redis) = Redis::start() else { return };
    let claim_after = Duration::from_secs(1);
    let worker = || {
        let coordinator = RedisCoordinator::new(&redis.url(), "slow").unwrap();
        WorkQueue::new(&coordinator, "items").claim_after(claim_after)
    };
    let (slow_queue, idle_queue) = (worker(), worker());
    slow_queue
        .push_all((0..3u64).map(|id| (id.to_string(), id)))
        .await
        .unwrap();

    let mock = MockTransport::new();
    mock.mount(Route::get("/items/{id}").respond(MockResponse::ok().delay(2 * claim_after)));
    let slow_client = Client::builder()
        .transport(mock)
        .base_url("http://mock")
        .build()
        .unwrap();
    let slow = drain_through(&slow_queue, "slow", &slow_client, 1);
    // The idle worker starts once the slow one holds every item.
    let idle = async {
        while slow_queue.pending().await.unwrap() < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drain(&idle_queue, "idle").await
    };
    let (mut slow_done, idle_done) =
        tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(slow, idle) })
            .await
            .expect("both workers end");
    slow_done.sort();
    assert_eq!(slow_done, ["0", "1", "2"]);
    assert!(
        idle_done.is_empty(),
        "the idle worker claimed {idle_done:?} from a worker still on them"
    );
    assert_eq!(slow_queue.pending().await.unwrap(), 0);
}

/// Renewal keeps what a worker holds and never takes back what another
/// claimed: an entry claimed away from a running worker (as when it froze
/// past `claim_after`) stays with the claimant through many renewals,
/// while the worker's other entry stays with it and keeps being renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_never_takes_back_a_claimed_item() {
    let _measuring = MEASURING.lock().await;
    let Some(redis) = Redis::start() else { return };
    let claim_after = Duration::from_secs(1);
    let coordinator = RedisCoordinator::new(&redis.url(), "renew").unwrap();
    let queue = WorkQueue::new(&coordinator, "items").claim_after(claim_after);
    queue.push("1", &1u64).await.unwrap();
    queue.push("2", &2u64).await.unwrap();
    let mut jobs = queue.jobs::<u64>("worker");
    let first = jobs.next().await.unwrap();
    let second = jobs.next().await.unwrap();
    let stream = "renew:queue:items";
    redis_cli(
        &redis,
        &[
            "XCLAIM",
            stream,
            "workers",
            "thief",
            "0",
            first.id(),
            "JUSTID",
        ],
    );

    // Three claim_afters: twelve renewals. A renewal is due every 250 ms,
    // so only a freeze of 750 ms could fail the idle check below.
    tokio::time::sleep(3 * claim_after).await;
    let owners = redis_cli(&redis, &["XPENDING", stream, "workers", "-", "+", "10"]);
    let owners: Vec<&str> = owners.lines().collect();
    // Each entry: id, consumer, idle (ms), deliveries.
    assert_eq!(owners.len(), 8, "{owners:?}");
    assert_eq!((owners[0], owners[1]), (first.id(), "thief"), "{owners:?}");
    assert_eq!(
        (owners[4], owners[5]),
        (second.id(), "worker"),
        "{owners:?}"
    );
    let idle: u64 = owners[6].parse().unwrap();
    assert!(
        idle < claim_after.as_millis() as u64,
        "held for {:?} and idle {idle} ms: not renewed",
        3 * claim_after
    );
    drop(jobs);
}

/// Entries that do not decode become dead letters in Redis, with their
/// raw id and fields, acknowledged and gone from the stream; the good
/// ones around them go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_entries_become_dead_letters() {
    let _measuring = MEASURING.lock().await;
    let Some(redis) = Redis::start() else { return };
    let coordinator = RedisCoordinator::new(&redis.url(), "dead").unwrap();
    let queue = WorkQueue::new(&coordinator, "items");
    queue.push("1", &1u64).await.unwrap();
    // Written by another tool: an item that is not a number, one with no
    // key, and one whose item is not even UTF-8.
    let stream = "dead:queue:items";
    let not_a_number = redis_cli(
        &redis,
        &["XADD", stream, "*", "key", "2", "item", "\"two\""],
    );
    let no_key = redis_cli(&redis, &["XADD", stream, "*", "item", "3"]);
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let binary: String = redis::cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg("key")
        .arg("4")
        .arg("item")
        .arg(&[0xff_u8, 0xfe, 0x00][..])
        .query_async(&mut connection)
        .await
        .unwrap();
    queue.push("5", &5u64).await.unwrap();

    let mut done = drain(&queue, "w").await;
    done.sort();
    assert_eq!(done, ["1", "5"]);
    assert_eq!(queue.pending().await.unwrap(), 0);
    assert_eq!(stream_length(&redis, stream), 0);

    let dead = queue.dead_letters(10).await.unwrap();
    let ids: Vec<&str> = dead.iter().map(|d| d.entry_id()).collect();
    assert_eq!(ids, [not_a_number.trim(), no_key.trim(), binary.as_str()]);
    assert_eq!(dead[0].field("key"), Some(&b"2"[..]));
    assert_eq!(dead[0].field("item"), Some(&b"\"two\""[..]));
    assert!(
        dead[0].error().contains("does not decode"),
        "{}",
        dead[0].error()
    );
    assert_eq!(
        dead[1].fields(),
        [(b"item".to_vec(), b"3".to_vec())],
        "the fields as they were"
    );
    assert!(dead[1].error().contains("no `key`"), "{}", dead[1].error());
    assert_eq!(dead[2].field("item"), Some(&[0xff_u8, 0xfe, 0x00][..]));
    // Drained again: nothing comes back, no dead letter is added twice.
    assert!(drain(&queue, "w2").await.is_empty());
    assert_eq!(queue.dead_letters(10).await.unwrap().len(), 3);
}

/// An item that does not decode is logged and dead-lettered without its
/// values: serde_json's message quotes them, and an item may carry
/// secrets. The item itself stays in the dead letter's fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_item_is_logged_without_its_values() {
    install_tracing();
    let _measuring = MEASURING.lock().await;
    let Some(redis) = Redis::start() else { return };
    let coordinator = RedisCoordinator::new(&redis.url(), "secret").unwrap();
    let queue = WorkQueue::new(&coordinator, "items");
    queue.push("k1", &1u64).await.unwrap();
    queue.push("k2", &"PAYLOADSECRET2").await.unwrap();
    queue.push("k3", &3u64).await.unwrap();

    let mut done = drain(&queue, "w1").await;
    done.sort();
    assert_eq!(done, ["k1", "k3"]);

    let dead = queue.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].field("item"), Some(&b"\"PAYLOADSECRET2\""[..]));
    let error = dead[0].error();
    assert!(!error.contains("PAYLOADSECRET2"), "{error}");
    assert!(
        error.contains("not of the item type (line 1, column"),
        "{error}"
    );

    let logged = LOGGED.lock().unwrap().clone();
    assert!(
        logged.iter().any(|line| line.starts_with("WARN")
            && line.contains("an undecodable queue entry goes to the dead letters")
            && line.contains(dead[0].entry_id())),
        "the warning was logged: {logged:#?}"
    );
    let leaks: Vec<_> = logged
        .iter()
        .filter(|line| line.contains("PAYLOADSECRET2"))
        .collect();
    assert!(leaks.is_empty(), "{leaks:#?}");
}

/// The keys a queue remembers, by their markers.
fn remembered_keys(redis: &Redis, queue: &str) -> Vec<String> {
    redis_cli(redis, &["--scan", "--pattern", &format!("{queue}:seen:*")])
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A key is remembered while its item is queued and for the dedupe window
/// after it is done, then forgotten: the keys Redis holds stay bounded by
/// the items queued and those done within the window, however many pass
/// through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_remembered_keys_stay_bounded() {
    let _measuring = MEASURING.lock().await;
    let Some(redis) = Redis::start() else { return };
    let coordinator = RedisCoordinator::new(&redis.url(), "bounded").unwrap();
    // Long enough that a busy machine cannot outlast it between a round's
    // drain and its checks (300 ms did, once, under a parallel build).
    let window = Duration::from_secs(3);
    let queue = WorkQueue::new(&coordinator, "items").dedupe_window(window);
    let prefix = "bounded:queue:items";
    for round in 0..3u64 {
        let keys = || (round * 100..round * 100 + 100).map(|id| (id.to_string(), id));
        assert_eq!(queue.push_all(keys()).await.unwrap(), 100);
        // Queued: remembered, with no expiry.
        assert_eq!(queue.push_all(keys()).await.unwrap(), 0);
        let marker = format!("{prefix}:seen:{}", round * 100);
        assert_eq!(redis_cli(&redis, &["PTTL", &marker]).trim(), "-1");

        assert_eq!(drain(&queue, "w").await.len(), 100);
        // Done: still remembered, now expiring within the window.
        assert_eq!(
            queue.push_all(keys()).await.unwrap(),
            0,
            "within the window"
        );
        let ttl: i64 = redis_cli(&redis, &["PTTL", &marker])
            .trim()
            .parse()
            .unwrap();
        assert!(ttl > 0 && ttl <= window.as_millis() as i64, "{ttl} ms");
        assert_eq!(stream_length(&redis, prefix), 0, "done entries are deleted");
        assert!(remembered_keys(&redis, prefix).len() <= 300);
    }
    // Past the window, every key is forgotten (generous bound: Redis
    // expires keys by its own clock, a little after they are due).
    let waiting = std::time::Instant::now();
    while !remembered_keys(&redis, prefix).is_empty() {
        assert!(
            waiting.elapsed() < Duration::from_secs(30),
            "the markers expire"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Only the stream and its group remain; a key pushed again now is new
    // work.
    assert_eq!(redis_cli(&redis, &["DBSIZE"]).trim(), "1");
    assert!(queue.push("0", &0u64).await.unwrap());
    assert_eq!(drain(&queue, "w").await, ["0"]);
}

/// `set_rate` on a Redis limiter rescales its fallback: with Redis out of
/// reach, the limiter paces at its share of the new rate and of the new
/// burst, not of the one it was made with.
#[tokio::test(start_paused = true)]
async fn set_rate_rescales_the_fallback_share() {
    // A loopback port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let coordinator = RedisCoordinator::new(&format!("redis://127.0.0.1:{port}/"), "gone")
        .unwrap()
        .on_failure(FailureMode::FallbackLocal { share: 0.5 })
        .timeouts(Duration::from_millis(100), Duration::from_secs(3600));
    let limiter = coordinator.limiter(Rate::per_second(10).burst(2));
    // Shared: 20/s, burst 8; this process's share: 10/s, burst 4.
    limiter.set_rate(Rate::per_second(20).burst(8));
    limiter.acquire().await; // Redis found out of reach: the fallback's first
    let t0 = tokio::time::Instant::now();
    let mut at = Vec::new();
    for _ in 0..5 {
        limiter.acquire().await;
        at.push(t0.elapsed());
    }
    let ms = Duration::from_millis;
    assert_eq!(at, [ms(0), ms(0), ms(0), ms(100), ms(200)]);
}

/// How many connections are subscribed to `channel`.
fn subscribers(redis: &Redis, channel: &str) -> u64 {
    let reply = redis_cli(redis, &["PUBSUB", "NUMSUB", channel]);
    reply.lines().last().unwrap().trim().parse().unwrap()
}

/// Waits, in real time, until `runtime` runs no task (or `limit` passes);
/// returns how many were still alive.
async fn tasks_left(runtime: &tokio::runtime::Handle, limit: Duration) -> usize {
    let started = std::time::Instant::now();
    loop {
        let alive = runtime.metrics().num_alive_tasks();
        if alive == 0 || started.elapsed() > limit {
            return alive;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Everything a coordinator starts belongs to what it handed out: once
/// the coordinator, its limiter and its pause handle are dropped, no task
/// of theirs runs on — not the pause's listener, not its publisher, not
/// the head of a line asleep until a turn a minute away.
///
/// Real time on a current-thread runtime, whose `num_alive_tasks` counts
/// exactly the tasks spawned on it; a generous bound for the drop to take
/// effect.
#[test]
fn dropping_the_coordinator_leaves_no_task_running() {
    let _measuring = MEASURING.blocking_lock();
    let Some(redis) = Redis::start() else { return };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let handle = tokio::runtime::Handle::current();
        let coordinator = RedisCoordinator::new(&redis.url(), "owned").unwrap();
        let pause = coordinator.pause_handle();
        let limiter = coordinator.limiter(Rate::per_minute(1));
        pause.pause_for(Duration::from_millis(20));
        pause.resume();
        limiter.acquire().await; // the burst of one
                                 // The next token is a minute away: its waiter gives up, and the
                                 // head is left asleep until that turn.
        let second = tokio::time::timeout(Duration::from_millis(200), limiter.acquire()).await;
        assert!(second.is_err(), "no second token within the minute");
        assert!(
            handle.metrics().num_alive_tasks() >= 2,
            "the listener and the publisher run while the handle lives"
        );

        drop((coordinator, limiter, pause));
        assert_eq!(
            tasks_left(&handle, Duration::from_secs(10)).await,
            0,
            "a task outlived the coordinator and everything it handed out"
        );
    });
}

/// Pauses and resumes made back to back reach the other workers in the
/// order they were made: a resume never overtakes the pause it ends, which
/// would leave every other worker paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pauses_and_resumes_are_published_in_order() {
    let _measuring = MEASURING.lock().await;
    let Some(redis) = Redis::start() else { return };
    let client = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("ordered:pauses").await.unwrap();
    let mut messages = pubsub.into_on_message();

    let here = RedisCoordinator::new(&redis.url(), "ordered").unwrap();
    let there = RedisCoordinator::new(&redis.url(), "ordered")
        .unwrap()
        .pause_handle();
    let pause = here.pause_handle();
    // Both workers listen before anything is announced.
    let listening = std::time::Instant::now();
    while subscribers(&redis, "ordered:pauses") < 3 {
        assert!(
            listening.elapsed() < Duration::from_secs(10),
            "both workers subscribe"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The other worker's own pause, so that it has one to lose.
    there.pause_for(Duration::from_secs(30));
    let first = tokio::time::timeout(Duration::from_secs(10), messages.next())
        .await
        .expect("the other worker's pause arrives")
        .unwrap();
    assert!(first.get_payload::<String>().unwrap().starts_with("pause "));
    const ROUNDS: u32 = 50;
    for round in 1..=ROUNDS {
        // Each pause longer than the last, so each one extends the pause
        // and is announced.
        pause.pause_for(Duration::from_secs(30) + Duration::from_millis(u64::from(round)));
        pause.resume();
    }
    let mut seen = Vec::new();
    // Out of order, some are also missing: a pause that Redis runs after
    // a later one extends nothing and is not announced. So gather what
    // comes, and compare the whole sequence.
    while seen.len() < 2 * ROUNDS as usize {
        let Ok(message) = tokio::time::timeout(Duration::from_secs(5), messages.next()).await
        else {
            break;
        };
        let text: String = message.unwrap().get_payload().unwrap();
        seen.push(if text == "resume" { "resume" } else { "pause" });
    }
    let expected: Vec<&str> = (0..ROUNDS).flat_map(|_| ["pause", "resume"]).collect();
    assert_eq!(seen, expected);
    assert_eq!(redis_cli(&redis, &["EXISTS", "ordered:pause"]).trim(), "0");
    // Another worker saw them in that order too: it is not left paused.
    let settled = std::time::Instant::now();
    while there.is_paused() {
        assert!(
            settled.elapsed() < Duration::from_secs(10),
            "the other worker's pause ends with the last resume"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
