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
//!
//! `crawl` is the whole pipeline; `tests/newcomer_tasks.rs` runs it too.

use std::path::{Path, PathBuf};

use clap::Parser;
use sluicegate::demo::{DemoConfig, DemoServer, DEMO_TOKEN};
use sluicegate::prelude::*;
use sluicegate::Transport;

#[derive(Parser, Debug)]
struct Args {
    /// How many repos the organisation has.
    #[arg(long, default_value_t = 200)]
    repos: u64,
    /// Where the repos go, one JSON line each (failures beside it).
    /// Default: a file in the system's temp dir.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// A repo as the listing shows it.
#[derive(serde::Deserialize, serde::Serialize, Debug, Clone)]
pub struct RepoRef {
    pub full_name: String,
    pub url: String,
}

/// A repo's details.
#[derive(serde::Deserialize, serde::Serialize, Debug, Clone)]
pub struct Repo {
    pub id: u64,
    pub full_name: String,
    pub language: String,
    pub stargazers_count: u64,
    pub contributors_url: String,
}

#[derive(serde::Deserialize, serde::Serialize, Debug)]
pub struct Contributor {
    pub login: String,
    pub contributions: u64,
}

/// One output line: the repo and who contributed to it.
#[derive(serde::Deserialize, serde::Serialize, Debug)]
pub struct Row {
    #[serde(flatten)]
    pub repo: Repo,
    pub contributors: Vec<Contributor>,
}

/// The API's quota in this demo: 120 requests per 2-second window.
const QUOTA: u64 = 120;
const WINDOW: Duration = Duration::from_secs(2);

/// Repos per page asked of the listing.
const PER_PAGE: u64 = 50;

/// The client: the API's base URL and a bearer token, no rate of its own
/// (`transport`: `ReqwestTransport` here, `MockTransport` in tests).
pub fn client(
    transport: impl Transport,
    api: &str,
    token: &str,
) -> Result<Client, sluicegate::BuildError> {
    Client::builder()
        .transport(transport)
        .base_url(api) // https://api.github.com for the real one
        // Sent only to the base URL's origin; redacted in logs and errors.
        .default_header("authorization", format!("Bearer {token}"))
        .default_header("accept", "application/vnd.github+json")
        .retry_on(
            Matcher::server_errors(),
            Backoff::exponential(Duration::from_millis(200)),
        )
        .build()
}

/// The crawl: every page of `org`'s repos (`per_page` a page), each
/// repo's details, then its contributors, one line per repo to `out`
/// (failures beside it).
pub async fn crawl(
    client: &Client,
    org: &str,
    per_page: u64,
    out: &Path,
) -> std::io::Result<Report> {
    let first_page = format!("/orgs/{org}/repos?per_page={per_page}");
    paginate(client, first_page, Pagination::link_header())
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
        })
        .write_jsonl(out)
        .await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let out = args
        .out
        .unwrap_or_else(|| std::env::temp_dir().join("sluicegate-repos.jsonl"));
    let token = std::env::var("GITHUB_TOKEN").unwrap_or_else(|_| DEMO_TOKEN.to_owned());
    let server = DemoServer::start(
        DemoConfig::default()
            .repos(args.repos)
            .api_quota(QUOTA, WINDOW, StatusCode::FORBIDDEN)
            .record_arrivals(true),
    )
    .await?;
    let client = client(ReqwestTransport::default(), &server.url(), &token)?;
    let report = crawl(&client, "demo", PER_PAGE, &out).await?;
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
    let expected_pages = args.repos.div_ceil(PER_PAGE).max(1);
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
