//! Issue 15: credentials and item data stay where they belong, and every
//! hostile input is bounded and explained. Real sockets bind 127.0.0.1:0
//! only; mock tests run on tokio's paused clock with exact times.
// Without reqwest only the mock tests run; the socket helpers sit idle.
#![cfg_attr(not(feature = "reqwest"), allow(dead_code, unused_imports))]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{stream, StreamExt};
use http::StatusCode;
use sluicegate::etl::{paginate, Journal, Pagination};
use sluicegate::mock::{Latency, MockResponse, MockTransport, Route};
use sluicegate::retry::Backoff;
#[cfg(feature = "hyper-transport")]
use sluicegate::HyperTransport;
#[cfg(feature = "reqwest")]
use sluicegate::ReqwestTransport;
#[cfg(any(feature = "reqwest", feature = "hyper-transport"))]
use sluicegate::Transport;
use sluicegate::{
    Client, FetchErrorKind, PauseHandle, RequestSpec, SluiceExt, TimeoutScope, WithPolicy,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn mock_client(mock: &MockTransport, base: &str) -> Client {
    Client::builder()
        .transport(mock.clone())
        .base_url(base)
        .build()
        .unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("sluicegate-security-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------
// 8. The journal reopens after any torn tail, and its errors name the file.
// ---------------------------------------------------------------------------

/// Runs items 1..=3 through a journal on `output`.
async fn journal_run(output: &Path, mock: &MockTransport) -> sluicegate::etl::Report {
    let journal = Journal::open(output, |id: &u64| id.to_string()).unwrap();
    journal
        .write_jsonl(
            journal
                .skip_done(stream::iter(1u64..=3))
                .fetch_concurrent(
                    1,
                    mock_client(mock, "http://mock").get(|id: &u64| format!("/items/{id}")),
                )
                .json::<serde_json::Value>(),
        )
        .await
        .unwrap()
}

fn items_mock() -> MockTransport {
    let mock = MockTransport::new();
    mock.mount(Route::get("/items/{id}").respond_with(|r| {
        MockResponse::json(&serde_json::json!({ "id": r.param("id"), "name": "é" }))
    }));
    mock
}

#[tokio::test(start_paused = true)]
async fn a_journal_torn_inside_a_multibyte_character_reopens() {
    let dir = temp_dir("torn-utf8");
    let output = dir.join("items.jsonl");
    let mock = items_mock();
    assert_eq!(journal_run(&output, &mock).await.ok, 3);
    let journal_path = dir.join("items.jsonl.journal");
    let committed = std::fs::read(&journal_path).unwrap();

    // A crash tore the next line in the middle of "é" (0xC3 0xA9).
    let mut torn = committed.clone();
    torn.extend_from_slice(b"{\"key\":\"\xC3");
    std::fs::write(&journal_path, &torn).unwrap();
    let again = journal_run(&output, &mock).await;
    assert_eq!((again.ok, again.skipped), (0, 3));
    assert_eq!(std::fs::read(&journal_path).unwrap(), committed);

    // Random bytes appended after the last complete line: cut the same way.
    let mut noisy = committed.clone();
    noisy.extend_from_slice(&[0xFF, 0xFE, b'\n', 0x80, 0x00, b'\n', 0xC3]);
    std::fs::write(&journal_path, &noisy).unwrap();
    let again = journal_run(&output, &mock).await;
    assert_eq!((again.ok, again.skipped), (0, 3));
    assert_eq!(std::fs::read(&journal_path).unwrap(), committed);
    assert_eq!(mock.call_count(), 3, "nothing committed was fetched again");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn journal_errors_name_the_file_and_an_empty_path_is_refused() {
    let dir = temp_dir("journal-errors");
    // The journal's place is taken by a directory: opening it fails.
    let output = dir.join("x.jsonl");
    std::fs::create_dir_all(dir.join("x.jsonl.journal")).unwrap();
    let err = Journal::<u64>::open(&output, |id| id.to_string()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("journal") && text.contains("x.jsonl.journal"),
        "{text}"
    );

    let cwd_before: Vec<_> = std::fs::read_dir(".")
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let err = Journal::<u64>::open("", |id| id.to_string()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("empty"), "{err}");
    assert!(!Path::new(".journal").exists(), "no stray file");
    let cwd_after: Vec<_> = std::fs::read_dir(".")
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(cwd_before.len(), cwd_after.len());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(start_paused = true)]
async fn write_jsonl_errors_name_their_file() {
    let dir = temp_dir("jsonl-errors");
    let mock = items_mock();
    let client = mock_client(&mock, "http://mock");
    // The output's directory does not exist.
    let output = dir.join("missing").join("out.jsonl");
    let err = stream::iter([1u64])
        .fetch_concurrent(1, client.get(|id: &u64| format!("/items/{id}")))
        .json::<serde_json::Value>()
        .write_jsonl(&output)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("out.jsonl"), "{err}");

    // The dead-letter file cannot be created, the output can.
    let output = dir.join("ok.jsonl");
    std::fs::create_dir_all(dir.join("ok.failed.jsonl")).unwrap();
    let err = stream::iter([1u64])
        .fetch_concurrent(1, client.get(|id: &u64| format!("/items/{id}")))
        .json::<serde_json::Value>()
        .write_jsonl(&output)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ok.failed.jsonl"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------
// 6. Every attempt has a timeout by default.
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn an_attempt_times_out_after_the_default_30_seconds() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/slow").latency(Latency::fixed(Duration::from_secs(3600))));
    assert_eq!(Client::DEFAULT_TIMEOUT, Duration::from_secs(30));

    let err = mock_client(&mock, "http://mock")
        .get(|_: &()| "/slow")
        .fetch(())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), FetchErrorKind::Timeout(TimeoutScope::Attempt));
    assert_eq!(
        (err.attempts(), err.elapsed()),
        (1, Duration::from_secs(30))
    );

    let five = Client::builder()
        .transport(mock.clone())
        .base_url("http://mock")
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let err = five.get(|_: &()| "/slow").fetch(()).await.unwrap_err();
    assert_eq!(err.elapsed(), Duration::from_secs(5));

    // Waiting for ever must be asked for.
    let patient = Client::builder()
        .transport(mock.clone())
        .base_url("http://mock")
        .no_timeout()
        .build()
        .unwrap();
    let fetched = patient.get(|_: &()| "/slow").fetch(()).await.unwrap();
    assert_eq!(fetched.elapsed, Duration::from_secs(3600));
}

/// A server on 127.0.0.1:0 that accepts, reads the request head, and never
/// answers; it says how many heads it read.
async fn silent_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(AtomicUsize::new(0));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                read_head(&mut socket).await;
                seen.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
                drop(socket);
            });
        }
    });
    (addr, heads)
}

/// Reads one request head (up to the blank line) and returns it.
async fn read_head(socket: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[cfg(feature = "reqwest")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_server_that_never_answers_times_out() {
    let (addr, heads) = silent_server().await;
    let client = Client::builder()
        .transport(ReqwestTransport::default())
        .base_url(format!("http://{addr}"))
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    // The bound only keeps a broken build from hanging the suite.
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        client.get(|_: &()| "/never").fetch(()),
    )
    .await
    .expect("the attempt timeout fired")
    .unwrap_err();
    assert_eq!(err.kind(), FetchErrorKind::Timeout(TimeoutScope::Attempt));
    assert_eq!(heads.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------
// 7. A server's Retry-After is capped low by default, configurably, loudly.
// ---------------------------------------------------------------------------

/// Collects formatted tracing output.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A log capture in force, for the thread that asked for it.
///
/// One global subscriber routes each event to the capture of the thread
/// it happened on (tests here run on current-thread runtimes). Scoped
/// per-thread subscribers were flaky: tracing caches per call site whether
/// anyone listens, across every thread's subscriber, and a test running in
/// parallel without one could leave a call site marked as unwanted.
struct Capturing;

type Route_ = (std::thread::ThreadId, tracing::Level, Captured);

static CAPTURES: Mutex<Vec<Route_>> = Mutex::new(Vec::new());

impl Drop for Capturing {
    fn drop(&mut self) {
        let me = std::thread::current().id();
        CAPTURES
            .lock()
            .unwrap()
            .retain(|(thread, _, _)| *thread != me);
    }
}

/// Where an event goes: the capture of its thread, if its level is wanted.
struct Router;

/// Bytes for one event: appended to a capture, or dropped.
struct Sink(Option<Captured>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(captured) = &mut self.0 {
            captured.write(buf)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Router {
    type Writer = Sink;
    fn make_writer(&'a self) -> Sink {
        Sink(None)
    }
    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Sink {
        let me = std::thread::current().id();
        let captures = CAPTURES.lock().unwrap();
        Sink(
            captures
                .iter()
                .find(|(thread, level, _)| *thread == me && meta.level() <= level)
                .map(|(_, _, captured)| captured.clone()),
        )
    }
}

fn capture(level: tracing::Level) -> (Captured, Capturing) {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(Router)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
    });
    let captured = Captured::default();
    CAPTURES
        .lock()
        .unwrap()
        .push((std::thread::current().id(), level, captured.clone()));
    (captured, Capturing)
}

fn capture_warnings() -> (Captured, Capturing) {
    capture(tracing::Level::WARN)
}

fn hostile_mock() -> MockTransport {
    let mock = MockTransport::new();
    mock.mount(Route::get("/seq503").sequence([
        MockResponse::status(503).header("retry-after", "86400"),
        MockResponse::ok(),
    ]));
    mock.mount(Route::get("/seq429").sequence([
        MockResponse::status(429).header("retry-after", "86400"),
        MockResponse::ok(),
    ]));
    mock
}

#[tokio::test(start_paused = true)]
async fn a_hostile_retry_after_is_capped_by_default_and_warned_about() {
    let (captured, _guard) = capture_warnings();
    assert_eq!(PauseHandle::DEFAULT_MAX_PAUSE, Duration::from_secs(60));
    assert_eq!(Backoff::DEFAULT_RETRY_AFTER_CAP, Duration::from_secs(30));

    let mock = hostile_mock();
    let client = Client::builder()
        .transport(mock.clone())
        .base_url("http://mock")
        .pause_on(StatusCode::SERVICE_UNAVAILABLE, Duration::from_secs(1))
        .retry_on(
            StatusCode::TOO_MANY_REQUESTS,
            Backoff::constant(Duration::from_millis(100)),
        )
        .build()
        .unwrap();
    let paused = client.get(|_: &()| "/seq503").fetch(()).await.unwrap();
    assert_eq!(paused.elapsed, Duration::from_secs(60));
    let retried = client.get(|_: &()| "/seq429").fetch(()).await.unwrap();
    assert_eq!(retried.elapsed, Duration::from_secs(30));

    let text = captured.text();
    assert_eq!(text.matches("WARN").count(), 2, "{text}");
    let stats = client.stats().unwrap().snapshot();
    assert_eq!(stats.retry_after_capped, 2);
    assert!(
        stats.to_string().contains("2 Retry-After capped"),
        "{stats}"
    );
    assert!(text.contains("retry_after_s=86400"), "{text}");
    assert!(
        text.contains("capped_s=60") && text.contains("capped_s=30"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_retry_after_caps_are_configurable() {
    let mock = hostile_mock();
    let client = Client::builder()
        .transport(mock.clone())
        .base_url("http://mock")
        .max_pause(Duration::from_secs(7))
        .pause_on(StatusCode::SERVICE_UNAVAILABLE, Duration::from_secs(1))
        .retry_on(
            StatusCode::TOO_MANY_REQUESTS,
            Backoff::constant(Duration::from_millis(100)).retry_after_cap(Duration::from_secs(3)),
        )
        .build()
        .unwrap();
    assert_eq!(client.pause_handle().max_pause(), Duration::from_secs(7));
    let paused = client.get(|_: &()| "/seq503").fetch(()).await.unwrap();
    assert_eq!(paused.elapsed, Duration::from_secs(7));
    let retried = client.get(|_: &()| "/seq429").fetch(()).await.unwrap();
    assert_eq!(retried.elapsed, Duration::from_secs(3));
}

// ---------------------------------------------------------------------------
// Real-socket helpers: servers on 127.0.0.1:0 that record request heads.
// ---------------------------------------------------------------------------

/// A server on 127.0.0.1:0 that records each request head and answers it
/// with `reply(head)` (raw bytes), then closes the connection.
async fn recording_server<F>(reply: F) -> (SocketAddr, Arc<Mutex<Vec<String>>>)
where
    F: Fn(&str) -> Vec<u8> + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    let reply = Arc::new(reply);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let seen = seen.clone();
            let reply = reply.clone();
            tokio::spawn(async move {
                let head = read_head(&mut socket).await;
                let bytes = reply(&head);
                seen.lock().unwrap().push(head);
                let _ = socket.write_all(&bytes).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (addr, heads)
}

fn ok_reply(_: &str) -> Vec<u8> {
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok".to_vec()
}

/// The request target of a head: `GET /x?y HTTP/1.1` gives `/x?y`.
fn request_target(head: &str) -> String {
    head.split(' ').nth(1).unwrap_or_default().to_owned()
}

// ---------------------------------------------------------------------------
// 1. Item data is data: it cannot leave the base path, and the mock and the
//    wire see the same URI.
// ---------------------------------------------------------------------------

/// What each item became: the request target sent, or the build error.
fn escape_cases() -> Vec<(&'static str, Result<&'static str, &'static str>)> {
    vec![
        ("7", Ok("/api/items/7")),
        ("../../admin", Err("dot segment")),
        ("%2e%2e/%2e%2e/x", Err("dot segment")),
        ("%2E./x", Err("dot segment")),
        ("..", Err("dot segment")),
        (".", Err("dot segment")),
        ("a/./b", Err("dot segment")),
        ("7#frag", Ok("/api/items/7%23frag")),
        ("a b", Err("invalid URL")),
    ]
}

#[tokio::test(start_paused = true)]
async fn item_data_cannot_climb_out_of_the_base_path_on_the_mock() {
    let mock = MockTransport::new();
    mock.record_calls(true);
    let client = mock_client(&mock, "http://mock/api");
    let endpoint = client.get(|s: &String| format!("/items/{s}"));
    for (item, expected) in escape_cases() {
        mock.clear_calls();
        match (endpoint.fetch(item.to_owned()).await, expected) {
            (Err(e), Err(why)) => {
                assert_eq!(e.kind(), FetchErrorKind::Build, "{item}: {e}");
                assert_eq!(e.item(), item, "the error carries the item");
                assert!(e.to_string().contains(why), "{item}: {e}");
                assert_eq!(mock.call_count(), 0, "{item}: nothing sent");
            }
            (outcome, Ok(target)) => {
                let calls = mock.calls();
                assert_eq!(calls.len(), 1, "{item}: {:?}", outcome.err());
                assert_eq!(calls[0].uri.path_and_query().unwrap().as_str(), target);
            }
            (Ok(_), Err(why)) => panic!("{item}: sent, expected {why}"),
        }
    }
}

#[cfg(feature = "reqwest")]
#[tokio::test]
async fn item_data_cannot_climb_out_of_the_base_path_on_the_wire() {
    let (addr, heads) = recording_server(ok_reply).await;
    let client = Client::builder()
        .transport(ReqwestTransport::default())
        .base_url(format!("http://{addr}/api"))
        .build()
        .unwrap();
    let endpoint = client.get(|s: &String| format!("/items/{s}"));
    for (item, expected) in escape_cases() {
        heads.lock().unwrap().clear();
        let outcome = endpoint.fetch(item.to_owned()).await;
        let sent: Vec<String> = heads
            .lock()
            .unwrap()
            .iter()
            .map(|h| request_target(h))
            .collect();
        match expected {
            Ok(target) => {
                assert!(outcome.is_ok(), "{item}: {:?}", outcome.err());
                assert_eq!(sent, [target], "{item}: the wire saw what the mock saw");
            }
            Err(why) => {
                let e = outcome.unwrap_err();
                assert!(e.to_string().contains(why), "{item}: {e}");
                assert!(sent.is_empty(), "{item}: nothing sent, got {sent:?}");
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn segment_keeps_a_query_or_a_slash_in_item_data_as_data() {
    let mock = MockTransport::new();
    mock.record_calls(true);
    let client = mock_client(&mock, "http://mock/api");
    let raw = client.get(|s: &String| format!("/items/{s}"));
    let encoded = client.get(|s: &String| format!("/items/{}", RequestSpec::segment(s)));
    for item in ["7?admin=1", "../admin", "a/b#c"] {
        let _ = encoded.fetch(item.to_owned()).await;
    }
    // Raw insertion is what it says: the `?` opens a query.
    raw.fetch("7?admin=1".to_owned()).await.unwrap_err();
    let targets: Vec<String> = mock
        .calls()
        .iter()
        .map(|c| c.uri.path_and_query().unwrap().to_string())
        .collect();
    assert_eq!(
        targets,
        [
            "/api/items/7%3Fadmin%3D1",
            "/api/items/..%2Fadmin",
            "/api/items/a%2Fb%23c",
            "/api/items/7?admin=1",
        ]
    );
}

// ---------------------------------------------------------------------------
// 2 and 3. Credentials stay at their origin: next links, absolute targets,
//          redirects.
// ---------------------------------------------------------------------------

fn credentialed(builder: sluicegate::ClientBuilder) -> sluicegate::ClientBuilder {
    builder
        .default_header("authorization", "Bearer TOKEN-123")
        .default_header("x-api-key", "KEY-456")
        .redact_header("x-api-key")
}

fn has_credentials(head: &str) -> bool {
    head.contains("TOKEN-123") || head.contains("KEY-456")
}

#[tokio::test(start_paused = true)]
async fn a_next_link_to_another_origin_ends_the_walk_by_default() {
    let mock = MockTransport::new();
    mock.record_calls(true);
    mock.mount(Route::get("/users").respond(
        MockResponse::json(&[1, 2]).header("link", "<http://evil.test/steal?p=2>; rel=\"next\""),
    ));
    mock.mount(Route::get("/steal").respond(MockResponse::json(&[3])));
    let client = credentialed(
        Client::builder()
            .transport(mock.clone())
            .base_url("http://mock"),
    )
    .build()
    .unwrap();
    let pages: Vec<_> = paginate(&client, "/users", Pagination::link_header())
        .collect()
        .await;
    assert_eq!(pages.len(), 2);
    assert!(pages[0].is_ok());
    let err = pages[1].as_ref().unwrap_err();
    assert_eq!(err.kind(), FetchErrorKind::Build);
    assert_eq!(err.item().number, 2);
    assert_eq!(err.item().token, "http://evil.test/steal?p=2");
    assert!(err.to_string().contains("another origin"), "{err}");
    assert_eq!(mock.call_count(), 1, "nothing went to the other origin");

    // Allowed: followed, without the client's credentials.
    let open = credentialed(
        Client::builder()
            .transport(mock.clone())
            .base_url("http://mock"),
    )
    .follow_cross_origin_links(true)
    .build()
    .unwrap();
    mock.clear_calls();
    let pages: Vec<_> = paginate(&open, "/users", Pagination::link_header())
        .collect()
        .await;
    assert!(pages.iter().all(Result::is_ok));
    let calls = mock.calls();
    assert_eq!(calls.len(), 2);
    assert!(calls[0].headers.contains_key("x-api-key"));
    assert_eq!(calls[1].uri.host(), Some("evil.test"));
    assert!(!calls[1].headers.contains_key("x-api-key"));
    assert!(!calls[1].headers.contains_key("authorization"));

    // Trusted: followed with them.
    let trusting = credentialed(
        Client::builder()
            .transport(mock.clone())
            .base_url("http://mock"),
    )
    .trust_origin("http://evil.test")
    .build()
    .unwrap();
    mock.clear_calls();
    let pages: Vec<_> = paginate(&trusting, "/users", Pagination::link_header())
        .collect()
        .await;
    assert!(pages.iter().all(Result::is_ok));
    assert!(mock.calls()[1].headers.contains_key("authorization"));
}

/// Followed to another origin, a next link carries none of the first
/// request's own secrets either: not its `Authorization` or cookie, not a
/// header the client redacts. Plain headers still go.
#[tokio::test(start_paused = true)]
async fn a_followed_link_elsewhere_carries_none_of_the_first_requests_secrets() {
    let mock = MockTransport::new();
    mock.record_calls(true);
    mock.mount(Route::get("/users").respond(
        MockResponse::json(&[1, 2]).header("link", "<http://evil.test/steal>; rel=\"next\""),
    ));
    mock.mount(Route::get("/steal").respond(MockResponse::json(&[3])));
    let client = Client::builder()
        .transport(mock.clone())
        .base_url("http://mock")
        .redact_header("x-session")
        .follow_cross_origin_links(true)
        .build()
        .unwrap();
    let first = RequestSpec::get("/users")
        .header("authorization", "Bearer SPEC")
        .header("cookie", "s=SPEC")
        .header("x-session", "SPEC")
        .header("accept", "application/json");
    let pages: Vec<_> = paginate(&client, first, Pagination::link_header())
        .collect()
        .await;
    assert!(pages.iter().all(Result::is_ok));
    let calls = mock.calls();
    assert_eq!(calls.len(), 2);
    for name in ["authorization", "cookie", "x-session"] {
        assert!(calls[0].headers.contains_key(name), "{name} went home");
        assert!(
            !calls[1].headers.contains_key(name),
            "{name} went to another origin"
        );
    }
    assert_eq!(calls[1].headers["accept"], "application/json");
}

/// A listing whose next link repeats the key, as many APIs do, and whose
/// second page fails.
fn keyed_listing_mock() -> MockTransport {
    let mock = MockTransport::new();
    mock.record_calls(true);
    mock.mount(Route::get("/items").respond_with(|r| {
        match r.query("page").as_deref() {
            None => MockResponse::json(&[1, 2])
                .header("link", "</items?api_key=LINKSECRET&page=2>; rel=\"next\""),
            _ => MockResponse::status(500),
        }
    }));
    mock
}

#[tokio::test(start_paused = true)]
async fn a_next_link_s_key_reaches_no_dead_letter_or_message() {
    let mock = keyed_listing_mock();
    let client = mock_client(&mock, "http://mock");
    let first = RequestSpec::get("/items").query("api_key", "LINKSECRET");
    let dir = temp_dir("next-link-key");
    let report = paginate(&client, first.clone(), Pagination::link_header())
        .flat_unpack::<u64>()
        .write_jsonl(dir.join("items.jsonl"))
        .await
        .unwrap();
    assert_eq!((report.ok, report.failed), (2, 1));
    // The link was followed as given, key included...
    let calls = mock.calls();
    assert_eq!(calls[1].uri.query(), Some("api_key=LINKSECRET&page=2"));
    // ...and its dead letter names the page without it.
    let failed = std::fs::read_to_string(dir.join("items.failed.jsonl")).unwrap();
    assert!(!failed.contains("LINKSECRET"), "{failed}");
    let record: serde_json::Value = serde_json::from_str(failed.trim()).unwrap();
    assert_eq!(
        record["item"],
        serde_json::json!({ "number": 2, "token": "http://mock/items?api_key=***&page=***" })
    );

    // In the process, the error keeps the whole link (to retry); it shows
    // none of it.
    let pages: Vec<_> = paginate(&client, first, Pagination::link_header())
        .collect()
        .await;
    let err = pages.into_iter().nth(1).unwrap().unwrap_err();
    assert_eq!(err.item().number, 2);
    assert_eq!(
        err.item().token,
        "http://mock/items?api_key=LINKSECRET&page=2"
    );
    let shown = format!("{err} {err:?} {:?}", err.item());
    let failure = sluicegate::Failure::from(err);
    let shown = format!("{shown} {failure} {failure:?} {}", failure.item_json());
    assert!(shown.contains("/items?api_key=***&page=***"), "{shown}");
    assert!(!shown.contains("LINKSECRET"), "{shown}");

    // A link back to a page already seen: the loop's detail, in the error
    // and in its dead letter, names the page the same way.
    let looping = MockTransport::new();
    looping.mount(Route::get("/items").respond(
        MockResponse::json(&[1]).header("link", "</items?api_key=LOOPSECRET>; rel=\"next\""),
    ));
    let client = mock_client(&looping, "http://mock");
    let first = RequestSpec::get("/items").query("api_key", "LOOPSECRET");
    let report = paginate(&client, first.clone(), Pagination::link_header())
        .flat_unpack::<u64>()
        .write_jsonl(dir.join("loop.jsonl"))
        .await
        .unwrap();
    assert_eq!((report.ok, report.failed), (1, 1));
    let failed = std::fs::read_to_string(dir.join("loop.failed.jsonl")).unwrap();
    assert!(
        failed.contains(r#"page 1 leads back to \"http://mock/items?api_key=***\""#),
        "{failed}"
    );
    assert!(!failed.contains("LOOPSECRET"), "{failed}");
    let pages: Vec<_> = paginate(&client, first, Pagination::link_header())
        .collect()
        .await;
    let err = pages.into_iter().nth(1).unwrap().unwrap_err();
    assert_eq!(err.kind(), FetchErrorKind::PaginationLoop);
    let failure = sluicegate::Failure::from(err);
    let shown = format!("{failure} {failure:?}");
    assert!(!shown.contains("LOOPSECRET"), "{shown}");
}

#[cfg(feature = "reqwest")]
#[tokio::test]
async fn a_next_link_to_another_port_gets_no_token_on_the_wire() {
    let (thief, stolen) = recording_server(ok_reply).await;
    let link = format!("<http://{thief}/steal>; rel=\"next\"");
    let (home, home_heads) = recording_server(move |_| {
        format!(
            "HTTP/1.1 200 OK\r\nlink: {link}\r\ncontent-length: 2\r\nconnection: close\r\n\r\n[]"
        )
        .into_bytes()
    })
    .await;
    let client = credentialed(
        Client::builder()
            .transport(ReqwestTransport::default())
            .base_url(format!("http://{home}")),
    )
    .build()
    .unwrap();
    let pages: Vec<_> = paginate(&client, "/users", Pagination::link_header())
        .collect()
        .await;
    assert_eq!(pages.len(), 2);
    assert_eq!(pages[1].as_ref().unwrap_err().kind(), FetchErrorKind::Build);
    assert!(stolen.lock().unwrap().is_empty());
    assert!(has_credentials(&home_heads.lock().unwrap()[0]));

    let open = credentialed(
        Client::builder()
            .transport(ReqwestTransport::default())
            .base_url(format!("http://{home}")),
    )
    .follow_cross_origin_links(true)
    .build()
    .unwrap();
    let pages: Vec<_> = paginate(&open, "/users", Pagination::link_header())
        .max_pages(2)
        .collect()
        .await;
    assert!(pages.iter().all(Result::is_ok));
    let stolen = stolen.lock().unwrap();
    assert_eq!(stolen.len(), 1);
    assert!(!has_credentials(&stolen[0]), "{}", stolen[0]);
}

#[tokio::test(start_paused = true)]
async fn an_absolute_target_elsewhere_gets_no_default_credentials() {
    let mock = MockTransport::new();
    mock.record_calls(true);
    let client = credentialed(
        Client::builder()
            .transport(mock.clone())
            .base_url("http://mock/api"),
    )
    .build()
    .unwrap();
    let endpoint = client.get(|url: &&str| *url);
    for url in [
        "http://mock/api/x",
        "http://other.test/x",
        "https://mock/api/x",
        "http://mock:8080/api/x",
    ] {
        let _ = endpoint.fetch(url).await;
    }
    let calls = mock.calls();
    let credentialed: Vec<bool> = calls
        .iter()
        .map(|c| c.headers.contains_key("authorization") && c.headers.contains_key("x-api-key"))
        .collect();
    let stripped: Vec<bool> = calls
        .iter()
        .map(|c| !c.headers.contains_key("authorization") && !c.headers.contains_key("x-api-key"))
        .collect();
    assert_eq!(credentialed, [true, false, false, false]);
    assert_eq!(stripped, [false, true, true, true]);

    // A header the request sets itself is the user's explicit choice.
    let own = client
        .request(|_: &()| RequestSpec::get("http://other.test/x").header("x-api-key", "MINE"));
    own.fetch(()).await.unwrap_err();
    assert_eq!(mock.calls().last().unwrap().headers["x-api-key"], "MINE");
}

#[cfg(feature = "reqwest")]
#[tokio::test]
async fn a_redirect_to_another_origin_drops_every_secret_header() {
    redirect_to_another_origin_drops_every_secret_header(ReqwestTransport::default).await;
}

#[cfg(feature = "hyper-transport")]
#[tokio::test]
async fn a_redirect_to_another_origin_drops_every_secret_header_over_hyper() {
    redirect_to_another_origin_drops_every_secret_header(HyperTransport::default).await;
}

/// Both transports that follow redirects themselves keep the same promise.
#[cfg(any(feature = "reqwest", feature = "hyper-transport"))]
async fn redirect_to_another_origin_drops_every_secret_header<T: Transport>(transport: fn() -> T) {
    let (elsewhere, elsewhere_heads) = recording_server(ok_reply).await;
    let (home, home_heads) = recording_server(move |head| {
        let location = if request_target(head) == "/away" {
            format!("http://{elsewhere}/landing")
        } else if request_target(head) == "/near" {
            "/landed".to_owned()
        } else {
            return ok_reply(head);
        };
        format!(
            "HTTP/1.1 302 Found\r\nlocation: {location}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        )
        .into_bytes()
    })
    .await;
    let build = |trust: bool, wrapped: bool| {
        let builder = Client::builder().base_url(format!("http://{home}"));
        // A transport of the user's own around reqwest's (a logging layer,
        // say) knows nothing of the client's private extensions and must
        // not need to: the credentials stay home all the same.
        let builder = if wrapped {
            builder.transport(Forwarding(transport()))
        } else {
            builder.transport(transport())
        };
        // A default header not marked secret goes home only too: every
        // default header is the client's.
        let mut builder = credentialed(builder).default_header("x-tenant", "TENANT-789");
        if trust {
            builder = builder.trust_origin(format!("http://{elsewhere}"));
        }
        builder.build().unwrap()
    };
    for (round, wrapped) in [false, true].into_iter().enumerate() {
        let client = build(false, wrapped);

        let away = client.get(|_: &()| "/away").fetch(()).await.unwrap();
        assert_eq!(away.body().as_ref(), b"ok");
        let landed = elsewhere_heads.lock().unwrap()[2 * round].clone();
        assert_eq!(request_target(&landed), "/landing");
        assert!(!has_credentials(&landed), "wrapped: {wrapped}: {landed}");
        assert!(
            !landed.contains("TENANT-789"),
            "wrapped: {wrapped}: {landed}"
        );

        // The same origin keeps them.
        client.get(|_: &()| "/near").fetch(()).await.unwrap();
        let near: Vec<String> = home_heads.lock().unwrap().clone();
        assert_eq!(request_target(&near[near.len() - 1]), "/landed");
        assert!(near.iter().all(|h| has_credentials(h)), "{near:?}");

        // A trusted origin gets them.
        build(true, wrapped)
            .get(|_: &()| "/away")
            .fetch(())
            .await
            .unwrap();
        let trusted = elsewhere_heads.lock().unwrap()[2 * round + 1].clone();
        assert!(has_credentials(&trusted), "wrapped: {wrapped}: {trusted}");
        assert!(
            trusted.contains("TENANT-789"),
            "wrapped: {wrapped}: {trusted}"
        );
    }

    // A request built by the endpoint and sent by hand carries the scope too.
    let request = build(false, false)
        .get(|_: &()| "/away")
        .build_request(&())
        .unwrap()
        .into_request();
    let away = transport().send(request).await.unwrap();
    assert_eq!(away.body().as_ref(), b"ok");
    let landed = elsewhere_heads.lock().unwrap()[4].clone();
    assert_eq!(request_target(&landed), "/landing");
    assert!(!has_credentials(&landed), "by hand: {landed}");
    assert!(!landed.contains("TENANT-789"), "by hand: {landed}");
}

#[cfg(feature = "reqwest")]
#[tokio::test]
async fn a_third_partys_redirect_home_carries_none_of_its_credentials() {
    third_party_redirect_home_carries_none_of_its_credentials(ReqwestTransport::default).await;
}

#[cfg(feature = "hyper-transport")]
#[tokio::test]
async fn a_third_partys_redirect_home_carries_none_of_its_credentials_over_hyper() {
    third_party_redirect_home_carries_none_of_its_credentials(HyperTransport::default).await;
}

/// A request's own token for a third party is the third party's: when that
/// party redirects it to the client's home origin (trusted, as home always
/// is), home does not get the token.
#[cfg(any(feature = "reqwest", feature = "hyper-transport"))]
async fn third_party_redirect_home_carries_none_of_its_credentials<T: Transport>(
    transport: fn() -> T,
) {
    let (home, home_heads) = recording_server(ok_reply).await;
    let (third, third_heads) = recording_server(move |_| {
        format!(
            "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://{home}/landing\r\n\
             content-length: 0\r\nconnection: close\r\n\r\n"
        )
        .into_bytes()
    })
    .await;
    let client = Client::builder()
        .transport(transport())
        .base_url(format!("http://{home}"))
        .build()
        .unwrap();
    let spec = RequestSpec::get(format!("http://{third}/x"))
        .header("authorization", "Bearer THIRD-TOKEN")
        .header("cookie", "third=THIRD-COOKIE");
    let landed = client.send(spec).await.unwrap();
    assert_eq!(landed.body().as_ref(), b"ok");
    let asked = third_heads.lock().unwrap()[0].clone();
    assert!(
        asked.contains("THIRD-TOKEN") && asked.contains("THIRD-COOKIE"),
        "{asked}"
    );
    let home_heads = home_heads.lock().unwrap();
    assert_eq!(request_target(&home_heads[0]), "/landing");
    assert!(!home_heads[0].contains("THIRD-"), "{}", home_heads[0]);
}

/// A transport that only hands requests on, as a user's logging or metrics
/// layer around reqwest's would.
#[cfg(any(feature = "reqwest", feature = "hyper-transport"))]
struct Forwarding<T>(T);

#[cfg(any(feature = "reqwest", feature = "hyper-transport"))]
impl<T: Transport> Transport for Forwarding<T> {
    fn send(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> futures::future::BoxFuture<
        'static,
        Result<http::Response<bytes::Bytes>, sluicegate::TransportError>,
    > {
        self.0.send(request)
    }
}

// ---------------------------------------------------------------------------
// 4. Secrets never reach a log, Debug, Display or error.
// ---------------------------------------------------------------------------

fn capture_debug() -> (Captured, Capturing) {
    capture(tracing::Level::DEBUG)
}

#[cfg(feature = "reqwest")]
#[tokio::test]
async fn userinfo_in_the_base_url_is_sent_as_a_header_and_never_shown() {
    let (captured, _guard) = capture_debug();
    let (addr, heads) = recording_server(ok_reply).await;
    let builder = Client::builder()
        .transport(ReqwestTransport::default())
        .base_url(format!("http://user:S3CRET@{addr}/api"));
    assert!(!format!("{builder:?}").contains("S3CRET"));
    let client = builder.build().unwrap();
    assert!(!format!("{client:?}").contains("S3CRET"), "{client:?}");
    let endpoint = client.get(|_: &()| "/x");
    assert!(!format!("{endpoint:?}").contains("S3CRET"));
    let request = endpoint.build_request(&()).unwrap();
    assert_eq!(
        request.uri().authority().unwrap().as_str(),
        addr.to_string()
    );
    let keyed = client.request(|_: &()| RequestSpec::get("/x").query("api_key", "KEY-789"));
    let shown = format!("{:?}", keyed.build_request(&()));
    assert!(
        shown.contains("/api/x?api_key=***") && shown.contains("Sensitive"),
        "{shown}"
    );
    assert!(
        !shown.contains("KEY-789") && !shown.contains("S3CRET"),
        "{shown}"
    );
    endpoint.fetch(()).await.unwrap();

    let head = heads.lock().unwrap()[0].clone();
    assert!(head.starts_with("GET /api/x HTTP/1.1"), "{head}");
    assert!(
        head.contains("authorization: Basic dXNlcjpTM0NSRVQ="),
        "{head}"
    );
    let logs = captured.text();
    assert!(logs.contains(&format!("url=http://{addr}/api/x")), "{logs}");
    assert!(
        !logs.contains("S3CRET") && !logs.contains("dXNlcjpTM0NSRVQ"),
        "{logs}"
    );

    for bad in [
        "ftp://user:S3CRET@h/",
        "http://user:S3CRET@h/?q",
        "http://user:S3CRET@",
    ] {
        let err = Client::builder()
            .transport(MockTransport::new())
            .base_url(bad)
            .build()
            .unwrap_err();
        assert!(!format!("{err} {err:?}").contains("S3CRET"), "{err}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_mock_sees_base_url_credentials_as_the_wire_does() {
    let mock = MockTransport::new();
    mock.record_calls(true);
    let client = mock_client(&mock, "http://user:S3CRET@mock/api");
    let _ = client.get(|_: &()| "/x").fetch(()).await;
    let call = &mock.calls()[0];
    assert_eq!(call.uri.to_string(), "http://mock/api/x");
    assert!(call.headers["authorization"].is_sensitive());
    assert_eq!(call.headers["authorization"], "Basic dXNlcjpTM0NSRVQ=");
}

/// Everything an error shows: Display and Debug, down its source chain.
fn everything_shown(err: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut shown = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        shown.push(e.to_string());
        shown.push(format!("{e:?}"));
        next = e.source();
    }
    shown
}

#[cfg(feature = "reqwest")]
#[tokio::test]
async fn a_query_key_never_shows_in_transport_errors() {
    query_key_never_shows_in_transport_errors(ReqwestTransport::default).await;
}

#[cfg(feature = "hyper-transport")]
#[tokio::test]
async fn a_query_key_never_shows_in_transport_errors_over_hyper() {
    query_key_never_shows_in_transport_errors(HyperTransport::default).await;
}

#[cfg(any(feature = "reqwest", feature = "hyper-transport"))]
async fn query_key_never_shows_in_transport_errors<T: Transport>(transport: fn() -> T) {
    // Bound, then closed: connecting is refused.
    let refused = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    // Announces 100 bytes, sends 3, hangs up.
    let (cut, _) = recording_server(|_| {
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\nconnection: close\r\n\r\nabc".to_vec()
    })
    .await;
    for addr in [refused, cut] {
        let client = Client::builder()
            .transport(transport())
            .base_url(format!("http://{addr}"))
            .build()
            .unwrap();
        let err = client
            .request(|_: &()| RequestSpec::get("/x").query("api_key", "KEY-789"))
            .fetch(())
            .await
            .unwrap_err();
        assert!(matches!(err.kind(), FetchErrorKind::Transport(_)), "{err}");
        let shown = everything_shown(&err);
        assert!(shown.len() > 2, "the chain has the transport's error");
        for text in shown {
            assert!(!text.contains("KEY-789"), "{text}");
        }
    }
}

// ---------------------------------------------------------------------------
// 5. Memory for bodies is bounded per response and per process.
// ---------------------------------------------------------------------------

/// A server that answers every request with `len` bytes of body, with or
/// without a `Content-Length`, in 64 KiB writes.
#[cfg(feature = "reqwest")]
async fn body_server(len: usize, announce: bool) -> SocketAddr {
    recording_stream_server(move |_| {
        let head = if announce {
            format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n")
        } else {
            "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_owned()
        };
        (head.into_bytes(), len)
    })
    .await
}

/// Like [`recording_server`], but the reply is a head and then `n` bytes of
/// body streamed in 64 KiB writes.
#[cfg(feature = "reqwest")]
async fn recording_stream_server<F>(reply: F) -> SocketAddr
where
    F: Fn(&str) -> (Vec<u8>, usize) + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reply = Arc::new(reply);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let reply = reply.clone();
            tokio::spawn(async move {
                let head = read_head(&mut socket).await;
                let (head, mut left) = reply(&head);
                if socket.write_all(&head).await.is_err() {
                    return;
                }
                let chunk = vec![b'x'; 64 * 1024];
                while left > 0 {
                    let n = left.min(chunk.len());
                    if socket.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    left -= n;
                }
                let _ = socket.shutdown().await;
            });
        }
    });
    addr
}

/// Peak resident memory of this process, in MiB (Linux).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Measures peak RSS while bodies over the 16 MiB default cap (and, with
/// `SLUICEGATE_RSS_BODY=under`, just under it) are read at a concurrency of
/// `SLUICEGATE_RSS_CONCURRENCY`. Run alone, one process per setting:
///
/// ```text
/// SLUICEGATE_RSS_CONCURRENCY=16 cargo test --release --test security \
///     measure_body_memory -- --ignored --nocapture
/// ```
#[cfg(feature = "reqwest")]
#[test]
#[ignore = "a measurement, not a check: run by hand, one process per setting"]
fn measure_body_memory() {
    let concurrency: usize = std::env::var("SLUICEGATE_RSS_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let under = std::env::var("SLUICEGATE_RSS_BODY").is_ok_and(|v| v == "under");
    let cap = ReqwestTransport::DEFAULT_MAX_BODY_BYTES;
    let len = if under {
        cap - 1024
    } else {
        cap + 8 * 1024 * 1024
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let before = peak_rss_mib().unwrap_or_default();
        let addr = body_server(len, false).await;
        let client = Client::builder()
            .transport(ReqwestTransport::default())
            .base_url(format!("http://{addr}"))
            .build()
            .unwrap();
        // Each body is dropped as soon as it comes out: what is measured is
        // what reading them holds.
        let ok = stream::iter(0..concurrency * 3)
            .fetch_concurrent(concurrency, client.get(|i: &usize| format!("/body/{i}")))
            .filter(|r| std::future::ready(r.is_ok()))
            .count()
            .await;
        let peak = peak_rss_mib().unwrap_or_default();
        println!(
            "concurrency {concurrency}, body {} MiB {}: {ok} ok, peak RSS {peak:.0} MiB (at start {before:.0} MiB)",
            len / (1024 * 1024),
            if under { "(under the cap)" } else { "(over the cap)" },
        );
    });
}

#[cfg(feature = "reqwest")]
#[tokio::test]
async fn bodies_in_many_chunks_come_back_whole_with_or_without_a_length() {
    let len = 3 * 1024 * 1024 + 17;
    for announce in [true, false] {
        let addr = body_server(len, announce).await;
        let transport = ReqwestTransport::default()
            .max_body_bytes(len)
            .max_body_bytes_in_flight(len);
        let client = Client::builder()
            .transport(transport)
            .base_url(format!("http://{addr}"))
            .build()
            .unwrap();
        // Four at once through a budget of one body: they take turns.
        let lens: Vec<usize> = stream::iter(0..4)
            .fetch_concurrent(4, client.get(|i: &i32| format!("/{i}")))
            .map(|r| r.unwrap().body().len())
            .collect()
            .await;
        assert_eq!(lens, [len; 4], "announce {announce}");

        let over = Client::builder()
            .transport(ReqwestTransport::default().max_body_bytes(len - 1))
            .base_url(format!("http://{addr}"))
            .build()
            .unwrap();
        let err = over.get(|_: &()| "/").fetch(()).await.unwrap_err();
        assert_eq!(
            err.kind(),
            FetchErrorKind::Transport(sluicegate::TransportErrorKind::BodyTooLarge)
        );
    }
}

/// A client without a base URL has no home origin: its default credentials
/// go only where it was told to trust (they used to go to every absolute
/// target an item named).
#[tokio::test(start_paused = true)]
async fn without_a_base_url_credentials_go_only_to_trusted_origins() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/x"));
    let fetch = |client: Client| async move {
        client
            .get(|_: &()| "http://mock/x")
            .fetch(())
            .await
            .unwrap();
    };
    let builder = || {
        Client::builder()
            .transport(mock.clone())
            .default_header("authorization", "Bearer SECRET-1")
    };
    fetch(builder().build().unwrap()).await;
    fetch(builder().trust_origin("http://mock").build().unwrap()).await;
    let sent: Vec<bool> = mock
        .calls()
        .iter()
        .map(|c| c.headers.contains_key("authorization"))
        .collect();
    assert_eq!(sent, [false, true]);
}
