//! A journal keyed by the first stage's item, on a pipeline of three
//! stages: every first-stage item ends up exactly once in the output or the
//! dead letters, across a run dropped midway, a re-run, and a re-run that
//! retries the dead letters.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sluicegate::etl::{Journal, Report};
use sluicegate::mock::Latency;
use sluicegate::prelude::*;

#[derive(Debug, serde::Deserialize, serde::Serialize)]
struct Summary {
    id: u64,
    slug: String,
}

#[derive(Debug, serde::Deserialize, serde::Serialize)]
struct Detail {
    id: u64,
    owner: String,
}

const ITEMS: u64 = 20;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "sluicegate-journal-stages-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `/items/{id}` → a summary, `/details/{slug}` → a detail, `/owners/{owner}`
/// → the row written. While `broken` is set, stage 2 fails for item 3 and
/// stage 3 for item 7; every response takes 10 ms.
fn mount(mock: &MockTransport, broken: Arc<AtomicBool>) {
    let ms10 = Latency::fixed(Duration::from_millis(10));
    mock.mount(Route::get("/items/{id}").latency(ms10).respond_with(|r| {
        let id: u64 = r.param("id").unwrap().parse().unwrap();
        MockResponse::json(&serde_json::json!({ "id": id, "slug": format!("s{id}") }))
    }));
    let stage2 = broken.clone();
    mock.mount(
        Route::get("/details/{slug}")
            .latency(ms10)
            .respond_with(move |r| {
                let id: u64 = r.param("slug").unwrap()[1..].parse().unwrap();
                if id == 3 && stage2.load(Ordering::SeqCst) {
                    return MockResponse::status(500);
                }
                MockResponse::json(&serde_json::json!({ "id": id, "owner": format!("o{id}") }))
            }),
    );
    mock.mount(
        Route::get("/owners/{owner}")
            .latency(ms10)
            .respond_with(move |r| {
                let id: u64 = r.param("owner").unwrap()[1..].parse().unwrap();
                if id == 7 && broken.load(Ordering::SeqCst) {
                    return MockResponse::status(500);
                }
                MockResponse::json(&serde_json::json!({ "id": id, "owners": ["a", "b"] }))
            }),
    );
}

/// The three-stage pipeline, written through `journal`.
async fn run(client: &Client, journal: &Journal<u64>) -> std::io::Result<Report> {
    let results = journal
        .skip_done(stream::iter(1..=ITEMS))
        .fetch_concurrent(4, client.get(|id: &u64| format!("/items/{id}")))
        .json::<Summary>()
        .map_ok(|d| d.value)
        .try_fetch_concurrent(4, client.get(|s: &Summary| format!("/details/{}", s.slug)))
        .json::<Detail>()
        .map_ok(|d| d.value)
        .try_fetch_concurrent(4, client.get(|d: &Detail| format!("/owners/{}", d.owner)))
        .json::<serde_json::Value>();
    journal.write_jsonl(results).await
}

fn open(output: &Path, retry_failed: bool) -> Journal<u64> {
    let key = |id: &u64| id.to_string();
    let journal = if retry_failed {
        Journal::open_retrying_failed(output, key)
    } else {
        Journal::open(output, key)
    };
    journal
        .unwrap()
        .origin_of(|s: &Summary| s.id)
        .origin_of(|d: &Detail| d.id)
}

/// How many times each first-stage id is in the output, and in the dead
/// letters (by the item of the stage that failed, which holds the id).
fn tally(output: &Path) -> (BTreeMap<u64, u32>, BTreeMap<u64, u32>) {
    let read = |path: PathBuf, id: fn(&serde_json::Value) -> u64| {
        let mut seen = BTreeMap::new();
        for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            *seen.entry(id(&value)).or_insert(0) += 1;
        }
        seen
    };
    (
        read(output.to_owned(), |v| v["id"].as_u64().unwrap()),
        read(output.with_file_name("out.failed.jsonl"), |v| {
            v["item"]["id"].as_u64().unwrap()
        }),
    )
}

/// Every id once, in the output or the dead letters, never both.
fn assert_exactly_once(output: &Path) -> (Vec<u64>, Vec<u64>) {
    let (ok, failed) = tally(output);
    for id in 1..=ITEMS {
        let count = ok.get(&id).unwrap_or(&0) + failed.get(&id).unwrap_or(&0);
        assert_eq!(count, 1, "item {id}: ok {ok:?}, failed {failed:?}");
    }
    assert_eq!(ok.len() + failed.len(), ITEMS as usize);
    (ok.into_keys().collect(), failed.into_keys().collect())
}

#[tokio::test(start_paused = true)]
async fn every_first_stage_item_is_written_once_across_a_kill_and_re_runs() {
    let mock = MockTransport::new();
    let broken = Arc::new(AtomicBool::new(true));
    mount(&mock, broken.clone());
    let client = Client::builder()
        .transport(mock.clone())
        .base_url("http://mock")
        .build()
        .unwrap();
    let dir = scratch("kill");
    let output = dir.join("out.jsonl");

    // Killed midway: the run is dropped after 50 ms of its 150 ms.
    let killed = tokio::time::timeout(
        Duration::from_millis(50),
        run(&client, &open(&output, false)),
    )
    .await;
    assert!(killed.is_err(), "the run was still going");
    let done_before = open(&output, false).done_count();
    assert!(
        done_before > 0 && done_before < ITEMS as usize,
        "{done_before}"
    );

    // A re-run finishes the rest: the two failures, in stages 2 and 3, are
    // dead-lettered under their first-stage ids.
    let report = run(&client, &open(&output, false)).await.unwrap();
    assert_eq!(report.skipped, done_before as u64);
    let (_, failed) = assert_exactly_once(&output);
    assert_eq!(failed, [3, 7]);

    // A plain re-run, with the server fixed, sends nothing: everything is
    // done, dead letters included.
    broken.store(false, Ordering::SeqCst);
    mock.clear_calls();
    let report = run(&client, &open(&output, false)).await.unwrap();
    assert_eq!((report.ok, report.failed, report.skipped), (0, 0, ITEMS));
    assert_eq!(mock.call_count(), 0);
    let (_, failed) = assert_exactly_once(&output);
    assert_eq!(failed, [3, 7]);

    // Retrying the dead letters runs items 3 and 7 again, all three stages.
    let report = run(&client, &open(&output, true)).await.unwrap();
    assert_eq!(
        (report.ok, report.failed, report.skipped),
        (2, 0, ITEMS - 2)
    );
    assert_eq!(mock.call_count(), 2 * 3);
    let (ok, failed) = assert_exactly_once(&output);
    assert_eq!(ok, (1..=ITEMS).collect::<Vec<_>>());
    assert!(failed.is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_result_the_journal_cannot_key_stops_the_run_before_it_is_written() {
    let mock = MockTransport::new();
    mount(&mock, Arc::new(AtomicBool::new(false)));
    let client = Client::builder()
        .transport(mock.clone())
        .base_url("http://mock")
        .build()
        .unwrap();
    let dir = scratch("unkeyed");
    let output = dir.join("out.jsonl");

    // No `origin_of` for `Detail`: the first row, about a `Detail`, cannot
    // be keyed by an id.
    let journal = Journal::open(&output, |id: &u64| id.to_string()).unwrap();
    let err = run(&client, &journal).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    let message = err.to_string();
    assert!(
        message.contains("journal_stages::Detail") && message.contains(".origin_of("),
        "{message}"
    );
    assert_eq!(journal.done_count(), 0);
    assert_eq!(std::fs::read_to_string(&output).unwrap(), "");

    // Told, the same journal files take the whole run.
    let report = run(&client, &open(&output, false)).await.unwrap();
    assert_eq!((report.ok, report.failed), (ITEMS, 0));
    assert_exactly_once(&output);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_failure_with_a_key_of_its_own_is_committed_under_it() {
    let dir = scratch("own-key");
    let output = dir.join("out.jsonl");
    let mock = MockTransport::new();
    mock.mount(Route::get("/x/{id}").respond(MockResponse::status(404)));
    let client = Client::builder()
        .transport(mock)
        .base_url("http://mock")
        .build()
        .unwrap();
    // Stage items that are strings: no origin given, but each failure
    // carries the key of the id it came from.
    let journal = Journal::open(&output, |id: &u64| id.to_string()).unwrap();
    let results = stream::iter([1u64, 2])
        .map(|id| Ok::<_, Failure>(format!("x{id}")))
        .try_fetch_concurrent(2, client.get(|s: &String| format!("/x/{s}")))
        .map_err(|f: Failure| {
            let id = f.item::<String>().unwrap()[1..].to_owned();
            f.with_key(id)
        })
        .map_ok(|f| Decoded {
            item: 0u64,
            value: f.item,
        });
    let report = journal.write_jsonl(results).await.unwrap();
    assert_eq!((report.ok, report.failed), (0, 2));
    assert!(journal.is_done(&1) && journal.is_done(&2));
    std::fs::remove_dir_all(&dir).unwrap();
}
