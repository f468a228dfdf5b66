//! Several worker processes sharing one rate limit and one pause through
//! Redis, against the demo server.
//!
//! With no `--redis` URL it starts its own `redis-server` (Debian package
//! `redis-server`) on a free loopback port, then starts `--workers` copies of
//! itself; each fetches its share of the items through the shared limit.
//! The server counts what it saw, all workers together.
//!
//! ```text
//! cargo run --features redis --example distributed
//! cargo run --features redis --example distributed -- --workers 8 --rate 300
//! cargo run --features redis --example distributed -- --redis redis://127.0.0.1:6379/
//! ```

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use clap::Parser;
use http::StatusCode;
use sluicegate::demo::{DemoConfig, DemoServer};
use sluicegate::prelude::*;
use sluicegate::redis::{FailureMode, RedisCoordinator};
use sluicegate::ReqwestTransport;
use tokio::time::Instant;

#[derive(Parser, Debug)]
struct Args {
    /// Worker processes.
    #[arg(long, default_value_t = 4)]
    workers: u64,
    /// Items per worker.
    #[arg(long, default_value_t = 200)]
    items: u64,
    /// The shared rate, requests per second, for all workers together.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Use this Redis instead of starting one.
    #[arg(long)]
    redis: Option<String>,
    /// (internal) run as worker: redis-url server-url first-item
    #[arg(long, num_args = 3, hide = true)]
    worker: Option<Vec<String>>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if let Some(worker) = &args.worker {
        return run_worker(&worker[0], &worker[1], worker[2].parse()?, &args).await;
    }

    let (redis_url, mut own_redis) = match &args.redis {
        Some(url) => (url.clone(), None),
        None => {
            let (url, child) = start_redis()?;
            (url, Some(child))
        }
    };
    let total = args.workers * args.items;
    let server = DemoServer::start(
        DemoConfig::default()
            .items(total)
            .outages(Duration::from_secs(3), Duration::from_millis(500)),
    )
    .await?;
    println!(
        "{} workers x {} items, sharing {}/s through {redis_url}; demo server on {} (503 for 0.5 s every 3 s)",
        args.workers,
        args.items,
        args.rate,
        server.url()
    );

    let started = Instant::now();
    let exe = std::env::current_exe()?;
    let workers: Vec<Child> = (0..args.workers)
        .map(|w| {
            Command::new(&exe)
                .args([
                    "--items",
                    &args.items.to_string(),
                    "--rate",
                    &args.rate.to_string(),
                    "--worker",
                ])
                .args([
                    redis_url.as_str(),
                    &server.url(),
                    &(w * args.items).to_string(),
                ])
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let mut failed = 0;
    for mut worker in workers {
        let status = tokio::task::spawn_blocking(move || worker.wait()).await??;
        failed += u32::from(!status.success());
    }
    let elapsed = started.elapsed();
    let c = server.counts();
    println!(
        "server saw {} requests in {elapsed:.2?}: {} ok ({:.1}/s all workers together), {} answered 503",
        c.requests,
        c.ok,
        c.ok as f64 / elapsed.as_secs_f64(),
        c.unavailable
    );
    if let Some(child) = own_redis.as_mut() {
        child.kill()?;
        child.wait()?;
    }
    if failed > 0 || c.ok < total {
        return Err(format!("{failed} workers failed; {} of {total} items arrived", c.ok).into());
    }
    Ok(())
}

async fn run_worker(
    redis: &str,
    server: &str,
    first: u64,
    args: &Args,
) -> Result<(), Box<dyn std::error::Error>> {
    let coordinator = RedisCoordinator::new(redis, "distributed-example")?
        .on_failure(FailureMode::FallbackLocal { share: 1.0 / 4.0 });
    let client = Client::builder()
        .transport(ReqwestTransport::default())
        .base_url(server)
        .limiter(coordinator.limiter(Rate::per_second(args.rate).burst(5)))
        .pause_handle(coordinator.pause_handle())
        .pause_on(StatusCode::SERVICE_UNAVAILABLE, Duration::from_millis(500))
        .build()?;
    let ok = futures::stream::iter(first..first + args.items)
        .fetch_concurrent(4, client.get(|id: &u64| format!("/items/{id}")))
        .filter(|r| futures::future::ready(r.is_ok()))
        .count()
        .await;
    let stats = client.stats().map(|s| s.snapshot());
    eprintln!(
        "worker {first}: {ok} ok, {} requests, {} pauses",
        stats.as_ref().map_or(0, |s| s.requests),
        stats.as_ref().map_or(0, |s| s.pauses)
    );
    Ok(())
}

/// Starts a redis-server on a free loopback port, without persistence.
fn start_redis() -> Result<(String, Child), Box<dyn std::error::Error>> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start redis-server ({e}): install the Debian package `redis-server`, or pass --redis"))?;
    let stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
    for line in stdout.lines() {
        if line?.contains("Ready to accept connections") {
            break;
        }
    }
    Ok((format!("redis://127.0.0.1:{port}/"), child))
}
