//! A write ETL: read orders from a JSONL file, POST each one to an API that
//! sometimes answers 429 (with `Retry-After`) or 500, and write the
//! receipts to JSONL through a `Journal`, so that a run that was killed
//! resumes where it stopped, and dead letters get another chance when
//! asked.
//!
//! Four passes over the same files show it:
//! 1. a first pass that stops after `--stop-after` receipts, as a crash would;
//! 2. a resumed pass that does only what the first one left;
//! 3. a plain re-run, which finds everything done and sends nothing;
//! 4. a re-run with `Journal::open_retrying_failed`, which sends the dead
//!    letters (orders the server kept failing) once more.
//!
//! ```text
//! cargo run --example etl_post
//! cargo run --example etl_post -- --orders 1000 --stop-after 300 --dir /tmp/orders
//! ```
//!
//! `run_pass` is the whole pipeline; `tests/newcomer_tasks.rs` runs it too.

use std::path::{Path, PathBuf};

use clap::Parser;
use sluicegate::demo::{DemoConfig, DemoServer, OrderFaults};
use sluicegate::prelude::*;
use sluicegate::Transport;

#[derive(Parser, Debug)]
struct Args {
    /// How many orders the input holds (plus one bad line).
    #[arg(long, default_value_t = 300)]
    orders: u64,
    /// Stop the first pass after this many results, as a crash would.
    #[arg(long, default_value_t = 100)]
    stop_after: usize,
    /// Where orders.jsonl, receipts.jsonl and their companions go
    /// (emptied first). Default: a directory under the system's temp dir.
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// One input line.
#[derive(serde::Deserialize, serde::Serialize, Debug, Clone)]
pub struct Order {
    pub id: u64,
    pub customer: String,
    pub amount_cents: u64,
}

/// What the API answers for a stored order.
#[derive(serde::Deserialize, serde::Serialize, Debug)]
pub struct Receipt {
    pub id: u64,
    pub receipt: String,
}

/// Every 9th POST is throttled; orders 0, 40, 80... fail 4 times with 500.
pub const FAULTS: OrderFaults = OrderFaults {
    throttle_every: 9,
    broken_every: 40,
    broken_for: 4,
};

/// The client: retries 429s (as the server's `Retry-After` says) and 500s
/// (three attempts, then the order is a dead letter); `transport`:
/// `ReqwestTransport` here, `MockTransport` in tests.
pub fn client(transport: impl Transport, api: &str) -> Result<Client, sluicegate::BuildError> {
    Client::builder()
        .transport(transport)
        .base_url(api)
        // The server's Retry-After wins over the 100 ms.
        .retry_on(
            429,
            Backoff::constant(Duration::from_millis(100)).max_attempts(10),
        )
        .retry_on(500, Backoff::exponential(Duration::from_millis(100))) // 3 attempts
        .build()
}

/// One pass: every order of `input` not yet done is POSTed, and its
/// receipt (or dead letter) committed to `output`'s journal. Stops after
/// `stop_after` results when given, as a crash would. With `retry_failed`,
/// the dead letters of earlier passes are sent again.
pub async fn run_pass(
    client: &Client,
    input: &Path,
    output: &Path,
    retry_failed: bool,
    stop_after: Option<usize>,
) -> std::io::Result<Report> {
    let key = |order: &Order| order.id.to_string();
    let journal = if retry_failed {
        Journal::open_retrying_failed(output, key)?
    } else {
        Journal::open(output, key)?
    };
    let post = client.request(|order: &Order| {
        RequestSpec::post("/orders")
            .json(order)
            // A POST that reached the server before a crash is sent
            // again on resume: the key lets the server store it once.
            .header("idempotency-key", order.id.to_string())
    });
    // A bad input line is dead-lettered in its place, with its number.
    let results = journal
        .try_skip_done(read_jsonl::<Order>(input))
        .try_fetch_concurrent(8, post)
        .json::<Receipt>();
    match stop_after {
        Some(n) => journal.write_jsonl(results.take(n)).await,
        None => journal.write_jsonl(results).await,
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let dir = args
        .dir
        .unwrap_or_else(|| std::env::temp_dir().join("sluicegate-etl-post"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let input = dir.join("orders.jsonl");
    write_orders(&input, args.orders)?;
    let output = dir.join("receipts.jsonl");

    let server = DemoServer::start(DemoConfig::default().flaky_orders(FAULTS)).await?;
    let client = client(ReqwestTransport::default(), &server.url())?;
    let passes: [(&str, bool, Option<usize>); 4] = [
        ("1. first pass, stopped early", false, Some(args.stop_after)),
        ("2. resumed", false, None),
        ("3. run again", false, None),
        ("4. run again, retrying dead letters", true, None),
    ];
    for (name, retry_failed, stop_after) in passes {
        let before = server.counts();
        let report = run_pass(&client, &input, &output, retry_failed, stop_after).await?;
        let after = server.counts();
        println!("{name}: {report}");
        println!(
            "   server: {} POSTs (429: {}, 500: {}), {} stored",
            after.requests - before.requests,
            after.too_many_requests - before.too_many_requests,
            after.server_errors - before.server_errors,
            after.ok - before.ok,
        );
    }

    let receipts = std::fs::read_to_string(&output)?;
    let mut ids: Vec<u64> = receipts
        .lines()
        .map(|line| serde_json::from_str::<Receipt>(line).map(|r| r.id))
        .collect::<Result<_, _>>()?;
    ids.sort_unstable();
    let dead = std::fs::read_to_string(dir.join("receipts.failed.jsonl"))?;
    for line in dead.lines() {
        println!("dead letter: {line}");
    }
    let counts = server.counts();
    println!(
        "{} receipts for {} orders, {} dead letters; the server stored {} orders twice",
        ids.len(),
        args.orders,
        dead.lines().count(),
        counts.duplicate_orders,
    );
    assert_eq!(
        ids,
        (0..args.orders).collect::<Vec<_>>(),
        "every order once"
    );
    assert_eq!(dead.lines().count(), 1, "only the bad line");
    assert_eq!(counts.duplicate_orders, 0);
    Ok(())
}

/// `n` orders, one per line, with one line that is not an order.
pub fn write_orders(path: &Path, n: u64) -> std::io::Result<()> {
    let mut lines: Vec<String> = (0..n)
        .map(|id| {
            let order = Order {
                id,
                customer: sluicegate::demo::email(id),
                amount_cents: 100 + id * 7 % 5_000,
            };
            serde_json::to_string(&order).expect("an order serializes")
        })
        .collect();
    lines.insert(n as usize / 2, r#"{"id": "not a number"}"#.to_owned());
    std::fs::write(path, lines.join("\n") + "\n")
}
