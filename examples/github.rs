//! A GitHub-style crawl: list an organisation's repos page by page (`Link`
//! headers), fetch each repo's details, then its contributors, and write
//! one JSON line per repo.
//!
//! The API wants a bearer token and allows a quota per window, told in
//! `x-ratelimit-*` headers with a Unix-time reset, refusing with 403 beyond
//! it. No `.rate()` is set: the client reads those headers and holds its
//! requests until the reset when the quota runs out, so after the first
//! answer no request is refused.
//!
//! ```text
//! cargo run --example github
//! GITHUB_TOKEN=demo-token cargo run --example github -- --repos 500 --out repos.jsonl
//! ```

use std::path::PathBuf;

use clap::Parser;
use sluicegate::demo::{DemoConfig, DemoServer, DEMO_TOKEN};
use sluicegate::prelude::*;

#[derive(Parser, Debug)]
struct Args {
    /// How many repos the organisation has.
    #[arg(long, default_value_t = 200)]
    repos: u64,
    /// Where the repos go, one JSON line each (failures beside it).
    #[arg(long, default_value = "repos.jsonl")]
    out: PathBuf,
}

/// A repo as the listing shows it.
#[derive(serde::Deserialize, serde::Serialize, Debug, Clone)]
struct RepoRef {
    full_name: String,
    url: String,
}

/// A repo's details.
#[derive(serde::Deserialize, serde::Serialize, Debug, Clone)]
struct Repo {
    id: u64,
    full_name: String,
    language: String,
    stargazers_count: u64,
    contributors_url: String,
}

#[derive(serde::Deserialize, serde::Serialize, Debug)]
struct Contributor {
    login: String,
    contributions: u64,
}

/// One output line: the repo and who contributed to it.
#[derive(serde::Serialize)]
struct Row {
    #[serde(flatten)]
    repo: Repo,
    contributors: Vec<Contributor>,
}

/// The API's quota in this demo: 120 requests per 2-second window.
const QUOTA: u64 = 120;
const WINDOW: Duration = Duration::from_secs(2);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let token = std::env::var("GITHUB_TOKEN").unwrap_or_else(|_| DEMO_TOKEN.to_owned());
    let server = DemoServer::start(
        DemoConfig::default()
            .repos(args.repos)
            .api_quota(QUOTA, WINDOW, StatusCode::FORBIDDEN)
            .record_arrivals(true),
    )
    .await?;

    let client = Client::builder()
        .transport(ReqwestTransport::default())
        .base_url(server.url()) // https://api.github.com for the real one
        // Sent only to the base URL's origin; redacted in logs and errors.
        .default_header("authorization", format!("Bearer {token}"))
        .default_header("accept", "application/vnd.github+json")
        .retry_on(
            Matcher::server_errors(),
            Backoff::exponential(Duration::from_millis(200)),
        )
        .build()?;

    let rows = paginate(
        &client,
        "/orgs/demo/repos?per_page=50",
        Pagination::link_header(),
    )
    .flat_unpack::<RepoRef>() // each page's array -> repos
    .try_fetch_concurrent(8, client.get(|r: &RepoRef| r.url.clone()))
    .json::<Repo>()
    .map_ok(|decoded| decoded.value)
    .try_fetch_concurrent(8, client.get(|r: &Repo| r.contributors_url.clone()))
    .map(|fetched| -> Result<Row, Failure> {
        let fetched = fetched?;
        // GitHub answers 204 with no body for a repo without contributors.
        if fetched.status() == StatusCode::NO_CONTENT {
            return Ok(Row {
                repo: fetched.item,
                contributors: Vec::new(),
            });
        }
        let decoded = fetched.json::<Vec<Contributor>>()?;
        Ok(Row {
            repo: decoded.item,
            contributors: decoded.value,
        })
    });
    let report = rows.write_jsonl(&args.out).await?;
    println!("{report}");

    // What the server saw: every page and every repo asked for once, and
    // nothing refused.
    let counts = server.counts();
    let targets = server.requests_by_target();
    let pages = targets.keys().filter(|t| t.starts_with("/orgs/")).count();
    let asked_twice = targets.values().filter(|&&n| n > 1).count();
    // A gap in the arrivals is the client holding until a reset.
    let mut arrivals = server.arrivals();
    arrivals.sort_by_key(|a| a.at);
    let holds = arrivals
        .windows(2)
        .filter(|pair| pair[1].at - pair[0].at >= Duration::from_millis(300))
        .count();
    println!(
        "server: {} requests ({pages} pages, {} repos, {} contributor lists), \
         {} refused (403: {}, 429: {}), {} unauthorized, {asked_twice} asked twice; \
         quota {QUOTA} per {WINDOW:?}: held until the reset {holds} times",
        counts.requests,
        args.repos,
        args.repos,
        counts.forbidden + counts.too_many_requests,
        counts.forbidden,
        counts.too_many_requests,
        counts.unauthorized,
    );
    if let Some(stats) = client.stats() {
        println!("{}", stats.snapshot());
    }
    let expected_pages = args.repos.div_ceil(50).max(1);
    assert_eq!(
        (report.ok, report.failed),
        (args.repos, 0),
        "every repo written"
    );
    assert_eq!(pages as u64, expected_pages, "every page once");
    assert_eq!(asked_twice, 0, "nothing asked twice");
    assert_eq!(counts.requests, expected_pages + 2 * args.repos);
    assert_eq!(counts.forbidden + counts.too_many_requests, 0, "no refusal");
    Ok(())
}
