//! Several worker processes sharing one rate limit, one pause and one work
//! queue through Redis, against the demo server; one is killed mid-run.
//!
//! With no `--redis` URL it starts its own `redis-server` (Debian package
//! `redis-server`) on a free loopback port. It enqueues the items on a
//! Redis Stream, then starts `--workers` copies of itself; each reads
//! items as a consumer of one group, fetches them through the shared
//! limit, and writes them to its own journaled JSONL file. Worker 0 is
//! killed with SIGKILL mid-run and restarted with its journal; the items
//! it held are taken over by the others or by its restart. With
//! `--restart-redis`, Redis itself is then killed with SIGKILL and started
//! again on the same port and data: it persists every write before
//! answering (`appendonly yes`, `appendfsync always`), and the workers
//! wait for it and go on. At the end the server says what rate it saw,
//! Redis how often it was asked, and the union of the outputs is checked
//! to hold every item exactly once.
//!
//! ```text
//! cargo run --features redis --example distributed
//! cargo run --features redis --example distributed -- --workers 8 --rate 300
//! cargo run --features redis --example distributed -- --restart-redis
//! cargo run --features redis --example distributed -- --redis redis://127.0.0.1:6379/
//! ```

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use clap::Parser;
use futures::TryStreamExt as _;
use http::StatusCode;
use sluicegate::demo::{DemoConfig, DemoServer};
use sluicegate::etl::Journal;
use sluicegate::prelude::*;
use sluicegate::redis::{FailureMode, Job, RedisCoordinator, WorkQueue};
use sluicegate::ReqwestTransport;
use tokio::time::Instant;

#[derive(Parser, Debug)]
struct Args {
    /// Worker processes.
    #[arg(long, default_value_t = 4)]
    workers: u64,
    /// Items in the queue, for all workers together.
    #[arg(long, default_value_t = 2000)]
    items: u64,
    /// The shared rate, requests per second, for all workers together.
    #[arg(long, default_value_t = 400)]
    rate: u32,
    /// Use this Redis instead of starting one.
    #[arg(long)]
    redis: Option<String>,
    /// Kill the Redis this starts mid-run, and start it again.
    #[arg(long, conflicts_with = "redis")]
    restart_redis: bool,
    /// Where the workers' outputs go.
    #[arg(long, default_value = "target/distributed")]
    dir: PathBuf,
    /// (internal) run as worker: redis-url server-url name consumer
    #[arg(long, num_args = 4, hide = true)]
    worker: Option<Vec<String>>,
}

/// How long an item may stay pending with a worker that shows no sign of
/// life (its running pipeline renews it) before another takes it.
const CLAIM_AFTER: Duration = Duration::from_secs(2);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if let Some(worker) = &args.worker {
        return run_worker(&worker[0], &worker[1], &worker[2], &worker[3], &args).await;
    }

    let (redis_url, mut own_redis) = match &args.redis {
        Some(url) => (url.clone(), None),
        None => {
            let redis = OwnRedis::start(&args.dir.with_extension("redis"))?;
            (redis.url(), Some(redis))
        }
    };
    // A name of this run's own: a Redis used before still holds the keys
    // of earlier runs' queues.
    let name = format!("distributed-example-{}", std::process::id());
    let server = DemoServer::start(
        DemoConfig::default()
            .items(args.items)
            .rate_limit(Rate::per_second(args.rate).burst(10))
            .record_arrivals(true),
    )
    .await?;
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)?;
    }
    std::fs::create_dir_all(&args.dir)?;

    let coordinator = RedisCoordinator::new(&redis_url, &name)?;
    let queue = WorkQueue::new(&coordinator, "items");
    let added = queue
        .push_all((0..args.items).map(|id| (id.to_string(), id)))
        .await?;
    println!(
        "{added} items queued on {redis_url}; {} workers sharing {}/s; demo server on {} (429 above {}/s)",
        args.workers,
        args.rate,
        server.url(),
        args.rate
    );

    let before = command_calls(&redis_url).await?;
    let started = Instant::now();
    let spawn = |w: u64| {
        Command::new(std::env::current_exe()?)
            .args(["--rate", &args.rate.to_string(), "--dir"])
            .arg(&args.dir)
            .arg("--worker")
            .args([&redis_url, &server.url(), &name, &format!("w{w}")])
            .spawn()
    };
    let mut workers: Vec<Child> = (0..args.workers).map(spawn).collect::<Result<_, _>>()?;

    // Worker 0 is killed once it has done a share of its part.
    let first_output = args.dir.join("w0.jsonl");
    let kill_after = (args.items / args.workers / 3).max(1) as usize;
    while lines(&first_output).len() < kill_after {
        if started.elapsed() > Duration::from_secs(120) {
            return Err("worker 0 made no progress".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    workers[0].kill()?; // SIGKILL: no chance to acknowledge or flush
    workers[0].wait()?;
    println!(
        "killed worker 0 after {} items; restarting it with its journal",
        lines(&first_output).len()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    workers[0] = spawn(0)?;

    if args.restart_redis {
        if let Some(redis) = own_redis.as_mut() {
            let done = || {
                (0..args.workers)
                    .map(|w| lines(&args.dir.join(format!("w{w}.jsonl"))).len())
                    .sum::<usize>()
            };
            while done() < (args.items / 2) as usize && started.elapsed() < Duration::from_secs(120)
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            redis.kill()?; // SIGKILL: Redis has no chance to save anything
            println!(
                "killed Redis after {} items; starting it again on the same data",
                done()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
            redis.spawn()?;
        }
    }

    let mut failed = 0;
    for mut worker in workers {
        let status = tokio::task::spawn_blocking(move || worker.wait()).await??;
        failed += u32::from(!status.success());
    }
    let elapsed = started.elapsed();
    let after = command_calls(&redis_url).await?;
    // A Redis started again counts from zero.
    let calls = |n: &str| {
        let after = after.get(n).copied().unwrap_or(0);
        if args.restart_redis {
            after
        } else {
            after - before.get(n).copied().unwrap_or(0)
        }
    };

    let mut arrivals = server.arrivals();
    arrivals.sort_by_key(|a| a.at);
    let span = match (arrivals.first(), arrivals.last()) {
        (Some(first), Some(last)) => last.at - first.at,
        _ => Duration::ZERO,
    };
    let rate = arrivals.len().saturating_sub(10) as f64 / span.as_secs_f64().max(1e-9);
    let refused = arrivals.iter().filter(|a| a.status == 429).count();
    println!(
        "server saw {} requests in {span:.2?} ({refused} refused): {rate:.1}/s all workers together, quota {}/s",
        arrivals.len(),
        args.rate
    );
    let requests = arrivals.len().max(1) as f64;
    // An acknowledgement is one transaction (`exec`).
    let restarted = if args.restart_redis {
        " (since Redis restarted)"
    } else {
        ""
    };
    println!(
        "Redis was asked {:.2} times per request by the limiters, {:.2} by the queue{restarted}",
        (calls("evalsha") + calls("eval")) as f64 / requests,
        (calls("xreadgroup") + calls("exec") + calls("xautoclaim") + calls("xpending")) as f64
            / requests
    );

    let (seen, twice) = union(&args.dir, args.workers)?;
    let missing = (0..args.items).filter(|id| !seen.contains_key(id)).count();
    println!(
        "union of {} outputs: {} distinct items of {}, {missing} missing, {} written twice (committed, then killed before the acknowledgement: deduplicated by key); done in {elapsed:.2?}",
        args.workers,
        seen.len(),
        args.items,
        twice.len()
    );
    let pending = queue.pending().await?;
    let dead = queue.dead_letters(100).await?.len();
    if let Some(redis) = own_redis.as_mut() {
        redis.kill()?;
    }
    if failed > 0 || missing > 0 || pending > 0 {
        return Err(format!(
            "{failed} workers failed, {missing} items missing, {pending} pending, {dead} dead letters"
        )
        .into());
    }
    println!("every item exactly once, nothing pending, {dead} undecodable entries");
    Ok(())
}

async fn run_worker(
    redis: &str,
    server: &str,
    name: &str,
    consumer: &str,
    args: &Args,
) -> Result<(), Box<dyn std::error::Error>> {
    let coordinator = RedisCoordinator::new(redis, name)?
        .on_failure(FailureMode::FallbackLocal { share: 1.0 / 4.0 });
    let queue = WorkQueue::new(&coordinator, "items").claim_after(CLAIM_AFTER);
    let client = Client::builder()
        .transport(ReqwestTransport::default())
        .base_url(server)
        .limiter(coordinator.limiter(Rate::per_second(args.rate).burst(5)))
        .pause_handle(coordinator.pause_handle())
        .pause_on(StatusCode::SERVICE_UNAVAILABLE, Duration::from_millis(500))
        .retry_on(
            StatusCode::TOO_MANY_REQUESTS,
            Backoff::exponential(Duration::from_millis(50)),
        )
        .build()?;
    let journal = Journal::open(
        args.dir.join(format!("{consumer}.jsonl")),
        |job: &Job<u64>| job.key().to_owned(),
    )?;
    let done = journal.clone();
    let results = queue
        .jobs::<u64>(consumer)
        .skip_done(move |job| done.is_done(job))
        .until_drained()
        .fetch_concurrent(
            8,
            client.get(|job: &Job<u64>| format!("/items/{}", job.item)),
        )
        .json::<serde_json::Value>()
        // Each record names its key, for the union of outputs.
        .map_ok(|mut record| {
            record.value["key"] = record.item.key().into();
            record
        });
    let report = journal.write_jsonl(queue.ack_after_commit(results)).await?;
    eprintln!("worker {consumer}: {report}");
    Ok(())
}

/// Every item in the workers' outputs and dead letters, with how often,
/// and the keys found more than once.
fn union(dir: &Path, workers: u64) -> std::io::Result<(HashMap<u64, u32>, Vec<u64>)> {
    let mut seen = HashMap::new();
    for w in 0..workers {
        let output = dir.join(format!("w{w}.jsonl"));
        // Opening the journal cuts off what a kill left half written.
        drop(Journal::open(&output, |job: &Job<u64>| {
            job.key().to_owned()
        })?);
        let failed = dir.join(format!("w{w}.failed.jsonl"));
        for (path, field) in [(&output, "/key"), (&failed, "/item/key")] {
            for line in lines(path) {
                let record: serde_json::Value = serde_json::from_str(&line)?;
                if let Some(key) = record.pointer(field).and_then(|k| k.as_str()) {
                    if let Ok(key) = key.parse::<u64>() {
                        *seen.entry(key).or_insert(0) += 1;
                    }
                }
            }
        }
    }
    let twice = seen
        .iter()
        .filter(|(_, &n)| n > 1)
        .map(|(&k, _)| k)
        .collect();
    Ok((seen, twice))
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|text| text.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Calls Redis served so far, by command.
async fn command_calls(url: &str) -> Result<HashMap<String, u64>, Box<dyn std::error::Error>> {
    let client = redis::Client::open(url)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await?;
    Ok(info
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
        .collect())
}

/// A redis-server of this run's own on a free loopback port, persisting
/// every write in its directory before answering, so that a restart loses
/// nothing it acknowledged.
struct OwnRedis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl OwnRedis {
    fn start(dir: &Path) -> Result<Self, Box<dyn std::error::Error>> {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::create_dir_all(dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut redis = Self {
            child: None,
            port,
            dir: dir.to_owned(),
        };
        redis.spawn()?;
        Ok(redis)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts the server (again), and waits until it has loaded its data.
    fn spawn(&mut self) -> Result<(), Box<dyn std::error::Error>> {
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start redis-server ({e}): install the Debian package `redis-server`, or pass --redis"
                )
            })?;
        let stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        for line in stdout.lines() {
            if line?.contains("Ready to accept connections") {
                break;
            }
        }
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL.
    fn kill(&mut self) -> std::io::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
