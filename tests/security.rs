//! Issue 15: credentials and item data stay where they belong, and every
//! hostile input is bounded and explained. Real sockets bind 127.0.0.1:0
//! only; mock tests run on tokio's paused clock with exact times.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream;
use http::StatusCode;
use sluicegate::etl::Journal;
use sluicegate::mock::{Latency, MockResponse, MockTransport, Route};
use sluicegate::retry::Backoff;
#[cfg(feature = "reqwest")]
use sluicegate::ReqwestTransport;
use sluicegate::{Client, FetchErrorKind, PauseHandle, SluiceExt, TimeoutScope};
use tokio::io::AsyncReadExt;
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

fn capture_warnings() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
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
