//! An ETL step: read ids from a JSONL file, enrich each with a fetch, write
//! the results to JSONL (failures to a dead-letter file beside it), and
//! resume where it stopped if it is interrupted.
//!
//! To show the resume, the first pass stops after `--stop-after` items, as
//! a crash would; the second pass skips what the first one committed.
//! Run it again and the journal finds everything done.
//!
//! ```text
//! cargo run --example etl_jsonl
//! cargo run --example etl_jsonl -- --dir /tmp/etl --stop-after 100
//! ```

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use http::StatusCode;
use sluicegate::demo::{DemoConfig, DemoServer};
use sluicegate::etl::{read_jsonl, Journal};
use sluicegate::prelude::*;
use sluicegate::ReqwestTransport;

#[derive(Parser, Debug)]
struct Args {
    /// Where ids.jsonl, enriched.jsonl and their companions go.
    #[arg(long, default_value = "etl-demo")]
    dir: PathBuf,
    /// Stop the first pass after this many items, as a crash would.
    #[arg(long, default_value_t = 300)]
    stop_after: usize,
}

#[derive(serde::Deserialize, serde::Serialize, Debug, Clone)]
struct Input {
    id: u64,
}

#[derive(serde::Deserialize, serde::Serialize)]
struct Customer {
    email: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir)?;
    let input = args.dir.join("ids.jsonl");
    if !input.exists() {
        // 1 000 ids, two of them past the end of the server's list, one bad line.
        let mut lines: Vec<String> = (0..1_000u64)
            .map(|id| format!(r#"{{"id": {id}}}"#))
            .collect();
        lines[500] = "{\"id\": \"five hundred\"}".into();
        lines.push(r#"{"id": 5000}"#.into());
        lines.push(r#"{"id": 5001}"#.into());
        std::fs::write(&input, lines.join("\n") + "\n")?;
    }
    let output = args.dir.join("enriched.jsonl");

    let server = DemoServer::start(DemoConfig::default().items(1_000)).await?;
    let client = Client::builder()
        .transport(ReqwestTransport::default())
        .base_url(server.url())
        .rate(Rate::per_second(500).burst(20))
        .retry_on(
            StatusCode::TOO_MANY_REQUESTS,
            Backoff::exponential(Duration::from_millis(100)),
        )
        .build()?;

    for (pass, limit) in [
        ("first pass (interrupted)", Some(args.stop_after)),
        ("second pass", None),
    ] {
        let journal = Journal::<Input>::open(&output, |input| input.id.to_string())?;
        // A bad line passes through in its place and is dead-lettered with
        // its line number, journaled like any other failure.
        let todo = journal.try_skip_done(read_jsonl::<Input>(&input));
        let results = todo
            .try_fetch_concurrent(
                16,
                client.get(|input: &Input| format!("/items/{}", input.id)),
            )
            .json::<Customer>();
        let report = match limit {
            Some(n) => journal.write_jsonl(results.take(n)).await?,
            None => journal.write_jsonl(results).await?,
        };
        println!("{pass}: {report}");
    }
    let failed = std::fs::read_to_string(args.dir.join("enriched.failed.jsonl"))?;
    for line in failed.lines() {
        println!("dead letter: {line}");
    }
    Ok(())
}
