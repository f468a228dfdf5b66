//! The lesson's pipeline, end to end: `/items` → ids → `/items/{id}` →
//! `customers.jsonl`.
//!
//! By default it starts the in-process demo server on 127.0.0.1 with a
//! server-side rate limit (429 + Retry-After) and periodic outages
//! (503 + Retry-After). One client's limiter and pause handle are shared by
//! every request: the listing, every item, every retry.
//!
//! ```text
//! cargo run --example items
//! cargo run --example items -- --items 500 --rate 200 --concurrency 32
//! cargo run --example items -- --url http://127.0.0.1:8080   # your own server
//! ```

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use futures::stream;
use http::StatusCode;
use sluicegate::demo::{DemoConfig, DemoServer};
use sluicegate::prelude::*;
use sluicegate::{Progress, ReqwestTransport};

#[derive(Parser, Debug)]
#[command(about = "Fetch /items, then every /items/{id}, under one shared rate limit")]
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
    /// Where to write the customers (failures go beside it).
    #[arg(long, default_value = "customers.jsonl")]
    out: PathBuf,
}

#[derive(serde::Deserialize, serde::Serialize)]
struct Customer {
    email: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let (server, url) = match &args.url {
        Some(url) => (None, url.clone()),
        None => {
            let config = DemoConfig::default()
                .items(args.items)
                .rate_limit(Rate::try_new(args.server_rate, Duration::from_secs(1))?.burst(10))
                .outages(Duration::from_secs(3), Duration::from_secs(1));
            let server = DemoServer::start(config).await?;
            let url = server.url();
            eprintln!(
                "demo server on {url}: 429 above {}/s, 503 for 1 s every 3 s",
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
        // Rules every request of this client follows, first match wins.
        .retry_on(
            StatusCode::TOO_MANY_REQUESTS,
            Backoff::exponential(Duration::from_millis(100)).max_attempts(8),
        )
        .pause_on(StatusCode::SERVICE_UNAVAILABLE, Duration::from_secs(1))
        .retry_on(
            Matcher::transport_errors(),
            Backoff::full_jitter(Duration::from_millis(100)).max_attempts(4),
        )
        .build()?;

    // GET /items → the ids. One request, through the same limiter and rules.
    let ids: Vec<u64> = stream::iter([()])
        .fetch_concurrent(1, client.get(|_: &()| "/items"))
        .flat_unpack::<u64>()
        .try_collect()
        .await?;
    eprintln!("GET /items: {} ids", ids.len());

    // GET /items/{id} for each, 16 at a time, into customers.jsonl.
    let report = stream::iter(ids)
        .fetch_concurrent(
            args.concurrency,
            client.get(|id: &u64| format!("/items/{id}")),
        )
        .json::<Customer>()
        .progress(Progress::new(None).watch(&client))
        .write_jsonl(&args.out)
        .await?;

    println!("{report}");
    if let Some(stats) = client.stats() {
        println!("{}", stats.snapshot());
    }
    if let Some(server) = &server {
        let c = server.counts();
        println!(
            "server saw {} requests: {} ok, {} answered 429, {} answered 503",
            c.requests, c.ok, c.too_many_requests, c.unavailable
        );
    }
    Ok(())
}
