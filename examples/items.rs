//! The lesson's pipeline, end to end: `/items` → ids → `/items/{id}`.
//!
//! By default it starts the in-process demo server on 127.0.0.1 with a
//! server-side rate limit (429 + Retry-After) and periodic outages
//! (503 + Retry-After), then fetches every item through one client whose
//! limiter and pause handle every request shares.
//!
//! ```text
//! cargo run --example items
//! cargo run --example items -- --items 500 --rate 200 --concurrency 32
//! cargo run --example items -- --url http://127.0.0.1:8080   # your own server
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Parser;
use futures::stream;
use http::StatusCode;
use sluicegate::demo::{DemoConfig, DemoServer};
use sluicegate::prelude::*;
use sluicegate::ReqwestTransport;
use tokio::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Fetch /items, then every /items/{id}, under a shared rate limit")]
struct Args {
    /// Items the embedded demo server serves.
    #[arg(long, default_value_t = 1_000)]
    items: u64,
    /// Requests per second the client allows itself.
    #[arg(long, default_value_t = 250)]
    rate: u32,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Requests per second the embedded server accepts before answering 429.
    #[arg(long, default_value_t = 300)]
    server_rate: u32,
    /// Use this server instead of the embedded one.
    #[arg(long)]
    url: Option<String>,
}

#[derive(serde::Deserialize)]
struct Customer {
    email: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let (_server, url) = match &args.url {
        Some(url) => (None, url.clone()),
        None => {
            let config = DemoConfig::default()
                .items(args.items)
                .rate_limit(Rate::try_new(args.server_rate, Duration::from_secs(1))?.burst(10))
                .outages(Duration::from_secs(3), Duration::from_secs(1));
            let server = DemoServer::start(config).await?;
            let url = server.url();
            println!(
                "demo server on {url} (429 above {}/s, 503 for 1 s every 3 s)",
                args.server_rate
            );
            (Some(server), url)
        }
    };

    let client = Client::builder()
        .transport(ReqwestTransport::default())
        .base_url(&url)
        .rate(Rate::try_new(args.rate, Duration::from_secs(1))?.burst(10))
        .timeout(Duration::from_secs(10))
        .retry_on(
            Matcher::transport_errors(),
            Backoff::exponential(Duration::from_millis(100)),
        )
        .build()?;

    let started = Instant::now();
    let ids: Vec<u64> = stream::iter([()])
        .fetch_concurrent(1, client.get(|_: &()| "/items"))
        .pause_on(StatusCode::SERVICE_UNAVAILABLE, Duration::from_secs(1))
        .retry_on(
            StatusCode::TOO_MANY_REQUESTS,
            Backoff::exponential(Duration::from_millis(100)).max_attempts(8),
        )
        .json::<Vec<u64>>()
        .map_ok(|decoded| decoded.value)
        .try_concat()
        .await?;
    println!("GET /items: {} ids", ids.len());

    let mut by_outcome: BTreeMap<String, u64> = BTreeMap::new();
    let mut attempts = 0u64;
    let mut sample = None;
    let mut results = stream::iter(ids.clone())
        .fetch_concurrent(
            args.concurrency,
            client.get(|id: &u64| format!("/items/{id}")),
        )
        .retry_on(
            StatusCode::TOO_MANY_REQUESTS,
            Backoff::exponential(Duration::from_millis(100)).max_attempts(8),
        )
        .pause_on(StatusCode::SERVICE_UNAVAILABLE, Duration::from_secs(1))
        .json::<Customer>();
    while let Some(result) = results.next().await {
        match result {
            Ok(decoded) => {
                *by_outcome.entry("ok".into()).or_default() += 1;
                sample.get_or_insert((decoded.item, decoded.value.email));
            }
            Err(e) => {
                attempts += u64::from(e.attempts());
                *by_outcome
                    .entry(format!("failed: {}", e.kind()))
                    .or_default() += 1;
            }
        }
    }
    let elapsed = started.elapsed();
    let accounted: u64 = by_outcome.values().sum();
    println!(
        "GET /items/{{id}}: {accounted} of {} ids accounted for in {elapsed:.2?}",
        ids.len()
    );
    for (outcome, count) in &by_outcome {
        println!("  {outcome:<24} {count}");
    }
    if attempts > 0 {
        println!("  attempts spent on failures: {attempts}");
    }
    if let Some((id, email)) = sample {
        println!("  e.g. item {id}: {email}");
    }
    if let Some(server) = &_server {
        let c = server.counts();
        println!(
            "server saw {} requests: {} ok, {} answered 429, {} answered 503",
            c.requests, c.ok, c.too_many_requests, c.unavailable
        );
    }
    if accounted != ids.len() as u64 {
        return Err("some items were not accounted for".into());
    }
    Ok(())
}
