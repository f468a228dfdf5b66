//! The pipelines a newcomer writes first, as the examples write them: a
//! GitHub-style crawl (Link pages, bearer token, `x-ratelimit-*` quota with
//! a Unix-time reset, no rate of its own) and a JSONL → POST ETL through
//! 429s and 500s, killed and resumed. On the mock in virtual time, exactly;
//! then once against the in-process demo server on loopback.

#![cfg(all(feature = "demo", feature = "reqwest"))]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use sluicegate::demo::{DemoConfig, DemoServer, OrderFaults, DEMO_TOKEN};
use sluicegate::mock::{Call, MockRequest};
use sluicegate::prelude::*;
use tokio::time::Instant;

#[path = "../examples/github.rs"]
#[allow(dead_code)]
mod github;

#[path = "../examples/etl_post.rs"]
#[allow(dead_code)]
mod etl_post;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "sluicegate-newcomer-tasks-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

/// An HTTP-date (RFC 9110 IMF-fixdate) for a Unix time in whole seconds.
fn http_date(unix: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (days, secs) = (unix / 86_400, unix % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        secs / 3_600,
        secs / 60 % 60,
        secs % 60
    )
}

#[test]
fn http_dates_are_formatted_as_servers_send_them() {
    assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
    assert_eq!(http_date(1_000_000_000), "Sun, 09 Sep 2001 01:46:40 GMT");
    assert_eq!(http_date(1_700_000_000), "Tue, 14 Nov 2023 22:13:20 GMT");
}

/// The API's date when the test starts: a multiple of the window, so the
/// first window starts with the test.
const EPOCH: u64 = 1_700_000_000;
const LIMIT: u64 = 10;
const WINDOW: u64 = 10;
const REPOS: u64 = 12;
const PAGE: u64 = 5;
const TOKEN: &str = "s3cret-token";
/// The repo whose contributors are served from another origin.
const MIRRORED: u64 = 7;

/// A GitHub-style API on the mock: bearer token, pages with absolute
/// `Link`s, and a quota of `LIMIT` per `WINDOW` seconds in fixed windows,
/// told in `x-ratelimit-*` headers with a Unix reset and the server's
/// `Date`, refused with 403 beyond it.
struct FakeGitHub {
    started: Instant,
    /// The window being counted (its index) and how much of it is used.
    window: Mutex<(u64, u64)>,
}

impl FakeGitHub {
    fn mount(mock: &MockTransport) -> Arc<Self> {
        let api = Arc::new(Self {
            started: Instant::now(),
            window: Mutex::new((0, 0)),
        });
        let a = api.clone();
        mock.mount(Route::get("/orgs/{org}/repos").respond_with(move |r| {
            a.answer(r, || {
                let page: u64 = r.query("page").map_or(1, |p| p.parse().unwrap());
                let org = r.param("org").unwrap();
                let repos: Vec<_> = ((page - 1) * PAGE..(page * PAGE).min(REPOS))
                    .map(|i| {
                        serde_json::json!({
                            "id": i,
                            "full_name": format!("{org}/r{i}"),
                            "url": format!("http://api.mock/repos/{org}/r{i}"),
                        })
                    })
                    .collect();
                let mut response = MockResponse::json(&repos);
                if page * PAGE < REPOS {
                    let next = format!(
                        "<http://api.mock/orgs/{org}/repos?page={}>; rel=\"next\", \
                         <http://api.mock/orgs/{org}/repos?page=3>; rel=\"last\"",
                        page + 1
                    );
                    response = response.header("link", next.as_str());
                }
                response
            })
        }));
        let a = api.clone();
        mock.mount(Route::get("/repos/{org}/{name}").respond_with(move |r| {
            a.answer(r, || {
                let org = r.param("org").unwrap();
                let name = r.param("name").unwrap();
                let i: u64 = name[1..].parse().unwrap();
                let contributors_url = if i == MIRRORED {
                    format!("http://mirror.mock/{org}/{name}/contributors")
                } else {
                    format!("http://api.mock/repos/{org}/{name}/contributors")
                };
                MockResponse::json(&serde_json::json!({
                    "id": i,
                    "full_name": format!("{org}/{name}"),
                    "language": "Rust",
                    "stargazers_count": i * 10,
                    "contributors_url": contributors_url,
                }))
            })
        }));
        let a = api.clone();
        mock.mount(
            Route::get("/repos/{org}/{name}/contributors").respond_with(move |r| {
                a.answer(r, || {
                    if r.param("name") == Some("r0") {
                        // GitHub's answer for a repo without contributors.
                        return MockResponse::status(204);
                    }
                    MockResponse::json(
                        &serde_json::json!([{ "login": "octocat", "contributions": 3 }]),
                    )
                })
            }),
        );
        // Another origin: public, no quota, and it must never see the token.
        mock.mount(Route::get("/{org}/{name}/contributors").respond_with(|r| {
            assert_eq!(r.uri.host(), Some("mirror.mock"));
            MockResponse::json(&serde_json::json!([{ "login": "mirror", "contributions": 1 }]))
        }));
        api
    }

    /// Checks the token, counts the quota, and dates the answer.
    fn answer(&self, r: &MockRequest, ok: impl FnOnce() -> MockResponse) -> MockResponse {
        assert_eq!(r.uri.host(), Some("api.mock"));
        let authorized = r
            .headers
            .get("authorization")
            .is_some_and(|v| v.to_str().unwrap() == format!("Bearer {TOKEN}"));
        if !authorized {
            return MockResponse::status(401);
        }
        // The server's clock is tokio's: virtual seconds since the start.
        let now = EPOCH + self.started.elapsed().as_secs();
        let index = now / WINDOW;
        let reset = (index + 1) * WINDOW;
        let mut window = self.window.lock().unwrap();
        if window.0 != index {
            *window = (index, 0);
        }
        let (response, remaining) = if window.1 < LIMIT {
            window.1 += 1;
            (ok(), LIMIT - window.1)
        } else {
            let refused = MockResponse::status(403)
                .json_body(&serde_json::json!({ "message": "API rate limit exceeded" }));
            (refused, 0)
        };
        response
            .header("x-ratelimit-limit", LIMIT.to_string().as_str())
            .header("x-ratelimit-remaining", remaining.to_string().as_str())
            .header("x-ratelimit-used", window.1.to_string().as_str())
            .header("x-ratelimit-reset", reset.to_string().as_str())
            .header("date", http_date(now).as_str())
    }
}

/// A `MockResponse` with a JSON body and a given status.
trait JsonBody {
    fn json_body(self, value: &serde_json::Value) -> Self;
}

impl JsonBody for MockResponse {
    fn json_body(self, value: &serde_json::Value) -> Self {
        self.header("content-type", "application/json")
            .body(value.to_string())
    }
}

/// Calls by path and query.
fn targets(calls: &[Call]) -> BTreeMap<String, u64> {
    let mut targets = BTreeMap::new();
    for call in calls {
        let target = call.uri.path_and_query().unwrap().to_string();
        *targets.entry(target).or_default() += 1;
    }
    targets
}

#[tokio::test(start_paused = true)]
async fn the_github_crawl_obeys_an_advertised_quota_with_no_rate_set() {
    let mock = MockTransport::new();
    FakeGitHub::mount(&mock);
    let client = github::client(mock.clone(), "http://api.mock", TOKEN).unwrap();
    assert!(client.limiter().is_none(), "no rate of its own");
    let dir = scratch("github-mock");
    let out = dir.join("repos.jsonl");
    let t0 = Instant::now();

    let report = github::crawl(&client, "acme", 100, &out).await.unwrap();
    assert_eq!((report.ok, report.failed), (REPOS, 0));

    let calls = mock.calls();
    let (api, mirror): (Vec<&Call>, Vec<&Call>) =
        calls.iter().partition(|c| c.uri.host() == Some("api.mock"));
    // Every page, repo and contributor list asked for exactly once.
    let pages = REPOS.div_ceil(PAGE);
    assert_eq!(api.len() as u64, pages + 2 * REPOS - 1);
    assert_eq!(mirror.len(), 1);
    let asked = targets(&calls);
    assert!(asked.values().all(|&n| n == 1), "{asked:#?}");
    assert_eq!(
        asked.keys().filter(|t| t.starts_with("/orgs/")).count() as u64,
        pages
    );
    // Nothing refused: not even the first answer, since the quota was whole.
    assert!(
        api.iter().all(|c| c.status().unwrap().is_success()),
        "{:?}",
        api.iter().map(|c| c.status()).collect::<Vec<_>>()
    );
    // The token went with every API request, and never to the mirror.
    assert!(api
        .iter()
        .all(|c| c.headers["authorization"] == *format!("Bearer {TOKEN}")));
    assert!(mirror[0].headers.get("authorization").is_none());

    // Requests went out in bursts at the window starts: each burst within
    // its window's quota, and each after the first sent exactly at the
    // reset the server advertised (10 s, 20 s), not a tick later.
    let mut bursts: BTreeMap<Duration, u64> = BTreeMap::new();
    for call in &api {
        *bursts.entry(call.sent_at - t0).or_default() += 1;
    }
    let secs = Duration::from_secs;
    assert_eq!(
        bursts.keys().copied().collect::<Vec<_>>(),
        [secs(0), secs(10), secs(20)],
        "{bursts:?}"
    );
    assert!(bursts.values().all(|&n| n <= LIMIT), "{bursts:?}");
    assert_eq!(report.elapsed, secs(20));

    // The output: one line per repo; r0's 204 is an empty list; r7's
    // contributors came from the mirror.
    let rows: BTreeMap<u64, github::Row> = lines(&out)
        .iter()
        .map(|l| serde_json::from_str::<github::Row>(l).unwrap())
        .map(|row| (row.repo.id, row))
        .collect();
    assert_eq!(
        rows.keys().copied().collect::<Vec<_>>(),
        (0..REPOS).collect::<Vec<_>>()
    );
    assert!(rows[&0].contributors.is_empty());
    assert_eq!(rows[&MIRRORED].contributors[0].login, "mirror");
    assert_eq!(rows[&1].contributors[0].login, "octocat");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(start_paused = true)]
async fn without_the_token_the_crawl_fails_on_the_first_page_once() {
    let mock = MockTransport::new();
    FakeGitHub::mount(&mock);
    let client = github::client(mock.clone(), "http://api.mock", "wrong").unwrap();
    let dir = scratch("github-mock-401");
    let out = dir.join("repos.jsonl");
    let report = github::crawl(&client, "acme", 100, &out).await.unwrap();
    assert_eq!((report.ok, report.failed), (0, 1));
    assert_eq!(mock.call_count(), 1);
    let dead: serde_json::Value = serde_json::from_str(&lines(&report.dead_letters)[0]).unwrap();
    assert_eq!(dead["status"], 401);
    assert_eq!(
        dead["item"]["number"], 1,
        "the failed item is the first page"
    );
    assert!(
        !dead.to_string().contains("wrong"),
        "no token in a dead letter"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A scripted `POST /orders`: order 12 is throttled once (429,
/// `Retry-After: 2`), order 14 fails once (500), order 16 fails while
/// `broken` is set. (Past the first pass's reach, so their retries happen
/// within one pass.)
fn mount_orders(mock: &MockTransport, broken: Arc<AtomicBool>) {
    let tries: Mutex<HashMap<u64, u32>> = Mutex::default();
    mock.mount(Route::post("/orders").respond_with(move |r| {
        let order: etl_post::Order = r.json().unwrap();
        let id = order.id;
        let attempt = {
            let mut tries = tries.lock().unwrap();
            let n = tries.entry(id).or_default();
            *n += 1;
            *n
        };
        match id {
            12 if attempt == 1 => MockResponse::status(429).header("retry-after", "2"),
            14 if attempt == 1 => MockResponse::status(500),
            16 if broken.load(Ordering::SeqCst) => MockResponse::status(500),
            _ => {
                assert_eq!(r.headers["idempotency-key"], *id.to_string());
                MockResponse::status(201)
                    .json_body(&serde_json::json!({ "id": id, "receipt": format!("r-{id}") }))
            }
        }
    }));
}

const ORDERS: u64 = 20;

fn order_id(call: &Call) -> u64 {
    serde_json::from_slice::<etl_post::Order>(&call.body)
        .unwrap()
        .id
}

#[tokio::test(start_paused = true)]
async fn the_post_etl_retries_resumes_and_retries_dead_letters_when_asked() {
    let mock = MockTransport::new();
    let broken = Arc::new(AtomicBool::new(true));
    mount_orders(&mock, broken.clone());
    let client = etl_post::client(mock.clone(), "http://api.mock").unwrap();
    let dir = scratch("etl-post-mock");
    let input = dir.join("orders.jsonl");
    etl_post::write_orders(&input, ORDERS).unwrap();
    let output = dir.join("receipts.jsonl");
    let pass = |retry_failed, stop_after| {
        etl_post::run_pass(&client, &input, &output, retry_failed, stop_after)
    };

    // Killed after 4 results: whatever was in flight is lost, not written.
    let t0 = Instant::now();
    let first = pass(false, Some(4)).await.unwrap();
    assert_eq!(first.ok + first.failed, 4);
    let first_calls = mock.calls();
    let done_first: Vec<u64> = lines(&output)
        .iter()
        .map(|l| serde_json::from_str::<etl_post::Receipt>(l).unwrap().id)
        .collect();
    assert_eq!(done_first.len() as u64, first.ok);

    // Resumed: only what the first pass did not commit is sent.
    mock.clear_calls();
    let second = pass(false, None).await.unwrap();
    assert_eq!(second.skipped, 4);
    assert_eq!(
        first.ok + first.failed + second.ok + second.failed,
        ORDERS + 1
    );
    let second_calls = mock.calls();
    assert!(
        second_calls
            .iter()
            .all(|c| !done_first.contains(&order_id(c))),
        "a committed order was sent again"
    );
    // Order 16 is the only failed order, after its three attempts; the bad
    // line is dead-lettered in its place.
    let dead = lines(&second.dead_letters);
    assert_eq!(first.failed + second.failed, 2, "{dead:?}");
    assert!(dead.iter().any(|l| l.contains(r#""kind":"invalid input""#)));
    assert!(dead
        .iter()
        .any(|l| l.contains(r#""status":500"#) && l.contains(r#""attempts":3"#)));

    // Retries waited exactly as told, in virtual time: 2 s for the 429's
    // Retry-After, the backoff's 100 ms then 200 ms for the 500s.
    let all: Vec<&Call> = first_calls.iter().chain(&second_calls).collect();
    let sent = |id: u64| -> Vec<Duration> {
        all.iter()
            .filter(|c| order_id(c) == id)
            .map(|c| c.sent_at - t0)
            .collect()
    };
    let gaps = |id: u64| -> Vec<Duration> { sent(id).windows(2).map(|w| w[1] - w[0]).collect() };
    let ms = Duration::from_millis;
    assert_eq!(gaps(12), [ms(2_000)]);
    assert_eq!(gaps(14), [ms(100)]);
    assert_eq!(gaps(16), [ms(100), ms(200)]);

    // A plain re-run finds everything done and sends nothing.
    mock.clear_calls();
    let third = pass(false, None).await.unwrap();
    assert_eq!((third.ok, third.failed, third.skipped), (0, 0, ORDERS + 1));
    assert_eq!(mock.call_count(), 0);

    // Asked to, a re-run sends the dead letters again: order 16, now healed,
    // once; the bad line is dead-lettered again; nothing else is sent.
    broken.store(false, Ordering::SeqCst);
    let fourth = pass(true, None).await.unwrap();
    assert_eq!(
        (fourth.ok, fourth.failed, fourth.skipped),
        (1, 1, ORDERS - 1)
    );
    let calls = mock.calls();
    assert_eq!(calls.iter().map(order_id).collect::<Vec<_>>(), [16]);

    // Every order once in the output; the dead letters hold the bad line only.
    let mut ids: Vec<u64> = lines(&output)
        .iter()
        .map(|l| serde_json::from_str::<etl_post::Receipt>(l).unwrap().id)
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..ORDERS).collect::<Vec<_>>());
    let dead = lines(&fourth.dead_letters);
    assert_eq!(dead.len(), 1);
    assert!(dead[0].contains(r#""kind":"invalid input""#));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Both examples' pipelines against the in-process demo server on
/// loopback, in real time: the quota, token and faults are the server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_pipelines_run_against_the_demo_server() {
    let server = DemoServer::start(
        DemoConfig::default()
            .repos(25)
            .api_quota(30, Duration::from_secs(2), StatusCode::FORBIDDEN)
            .flaky_orders(OrderFaults {
                throttle_every: 9,
                broken_every: 20,
                broken_for: 4,
            })
            .record_arrivals(true),
    )
    .await
    .unwrap();
    let dir = scratch("demo");
    assert!(!format!("{server:?}").contains(DEMO_TOKEN), "{server:?}");

    // The crawl: 3 pages of 10, 25 repos, 25 contributor lists; the quota
    // of 30 per 2 s runs out at least once.
    let client = github::client(ReqwestTransport::default(), &server.url(), DEMO_TOKEN).unwrap();
    let report = github::crawl(&client, "demo", 10, &dir.join("repos.jsonl"))
        .await
        .unwrap();
    assert_eq!((report.ok, report.failed), (25, 0));
    let counts = server.counts();
    assert_eq!(counts.requests, 3 + 2 * 25);
    assert_eq!(
        (counts.forbidden, counts.unauthorized),
        (0, 0),
        "{counts:?}"
    );
    let asked = server.requests_by_target();
    assert_eq!(asked.len(), 3 + 2 * 25);
    assert!(asked.values().all(|&n| n == 1), "{asked:#?}");
    assert_eq!(asked.keys().filter(|t| t.starts_with("/orgs/")).count(), 3);
    let wrong = github::client(ReqwestTransport::default(), &server.url(), "nope").unwrap();
    let denied = github::crawl(&wrong, "demo", 10, &dir.join("denied.jsonl"))
        .await
        .unwrap();
    assert_eq!((denied.ok, denied.failed), (0, 1));
    assert_eq!(server.counts().unauthorized, 1);

    // The ETL: 40 orders and a bad line, killed after 10, resumed, dead
    // letters retried.
    let input = dir.join("orders.jsonl");
    etl_post::write_orders(&input, 40).unwrap();
    let output = dir.join("receipts.jsonl");
    let client = etl_post::client(ReqwestTransport::default(), &server.url()).unwrap();
    let first = etl_post::run_pass(&client, &input, &output, false, Some(10))
        .await
        .unwrap();
    assert_eq!(first.ok + first.failed, 10);
    let second = etl_post::run_pass(&client, &input, &output, false, None)
        .await
        .unwrap();
    assert_eq!(second.skipped, 10);
    assert_eq!(first.ok + first.failed + second.ok + second.failed, 41);
    // Orders 0 and 20 fail 4 times: one that got its 3 attempts in one
    // pass is a dead letter (besides the bad line); retried, it is stored
    // on its first or second attempt.
    let dead_orders = first.failed + second.failed - 1;
    let before = server.counts();
    let third = etl_post::run_pass(&client, &input, &output, true, None)
        .await
        .unwrap();
    let after = server.counts();
    assert_eq!((third.ok, third.failed), (dead_orders, 1));
    assert_eq!(
        after.ok - before.ok,
        dead_orders,
        "only the dead letters were sent again"
    );
    let mut ids: Vec<u64> = lines(&output)
        .iter()
        .map(|l| serde_json::from_str::<etl_post::Receipt>(l).unwrap().id)
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..40).collect::<Vec<_>>());
    assert_eq!(server.counts().duplicate_orders, 0);
    std::fs::remove_dir_all(&dir).unwrap();
}
