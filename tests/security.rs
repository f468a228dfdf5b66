//! Issue 15: credentials and item data stay where they belong, and every
//! hostile input is bounded and explained. Real sockets bind 127.0.0.1:0
//! only; mock tests run on tokio's paused clock with exact times.

use std::path::{Path, PathBuf};

use futures::stream;
use sluicegate::etl::Journal;
use sluicegate::mock::{MockResponse, MockTransport, Route};
use sluicegate::{Client, SluiceExt};

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
