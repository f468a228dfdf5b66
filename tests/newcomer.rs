//! What a newcomer writes first, compiled and checked as written.

use sluicegate::prelude::*;

#[tokio::test(start_paused = true)]
async fn a_bare_status_number_is_a_matcher() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/items/{id}").sequence([
        MockResponse::status(429),
        MockResponse::json(&serde_json::json!({ "email": "a@example.com" })),
    ]));
    let client = mock_client(&mock);
    let fetched = client
        .get(|id: &u32| format!("/items/{id}"))
        .retry_on(429, Backoff::constant(Duration::from_millis(100)))
        .fetch(7)
        .await
        .unwrap();
    assert_eq!(
        (fetched.attempts, fetched.elapsed),
        (2, Duration::from_millis(100))
    );
}

#[tokio::test(start_paused = true)]
#[should_panic(
    expected = "(retry_on, pause_on, timeout, limit, ...) called after the stream was first polled"
)]
async fn configuring_a_stage_after_it_was_polled_panics() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/items/{id}").respond(MockResponse::ok()));
    let client = Client::builder()
        .transport(mock)
        .base_url("http://mock")
        .build()
        .unwrap();
    let mut stage =
        stream::iter(0..4u32).fetch_concurrent(2, client.get(|id: &u32| format!("/items/{id}")));
    let _ = stage.next().await;
    // Would apply to the items not yet admitted only: refused, loudly.
    let _stage = stage.retry_on(500, Backoff::constant(Duration::from_millis(10)));
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_a_pause_counts_as_a_retry_and_a_pause() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/items/{id}").sequence([
        MockResponse::status(503).header("retry-after", "3"),
        MockResponse::ok(),
    ]));
    let client = Client::builder()
        .transport(mock.clone())
        .base_url("http://mock")
        .pause_on(503, Duration::from_secs(10))
        .build()
        .unwrap();
    let fetched = client
        .get(|id: &u32| format!("/items/{id}"))
        .fetch(1)
        .await
        .unwrap();
    assert_eq!(
        (fetched.attempts, fetched.elapsed),
        (2, Duration::from_secs(3))
    );
    let calls = mock.calls();
    assert_eq!(calls[1].sent_at - calls[0].sent_at, Duration::from_secs(3));
    let stats = client.stats().unwrap().snapshot();
    assert_eq!((stats.requests, stats.retries, stats.pauses), (2, 1, 1));
    assert_eq!(stats.paused, Duration::from_secs(3));
    assert!(
        stats.to_string().contains("retries    1; pauses 1"),
        "{stats}"
    );
}

#[tokio::test(start_paused = true)]
async fn max_attempts_is_the_one_cap_on_retries() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/flaky").respond(MockResponse::status(500)));
    let client = mock_client(&mock);
    let err = client
        .get(|_: &()| "/flaky")
        .retry_on(
            Matcher::server_errors(),
            Backoff::constant(Duration::from_millis(100)).max_attempts(50),
        )
        .fetch(())
        .await
        .unwrap_err();
    // 50, not stopped at some other, hidden, limit.
    assert_eq!((err.attempts(), mock.call_count()), (50, 50));
    assert_eq!(err.elapsed(), Duration::from_millis(49 * 100));
}

#[tokio::test(start_paused = true)]
async fn a_pause_rule_carries_its_own_cap() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/down").respond(MockResponse::status(503)));
    let client = mock_client(&mock);
    let endpoint = client.get(|_: &()| "/down");

    // A bare Duration: the default cap of 10 attempts, so 9 pauses.
    let err = endpoint
        .clone()
        .pause_on(503, Duration::from_secs(1))
        .fetch(())
        .await
        .unwrap_err();
    assert_eq!(err.attempts(), PausePolicy::DEFAULT_MAX_ATTEMPTS);
    assert_eq!(err.elapsed(), Duration::from_secs(9));

    // Raised on the policy, it is obeyed.
    mock.clear_calls();
    let err = endpoint
        .pause_on(
            503,
            PausePolicy::fallback(Duration::from_secs(1)).max_attempts(25),
        )
        .fetch(())
        .await
        .unwrap_err();
    assert_eq!((err.attempts(), mock.call_count()), (25, 25));
    let calls = mock.calls();
    for pair in calls.windows(2) {
        assert_eq!(pair[1].sent_at - pair[0].sent_at, Duration::from_secs(1));
    }
}

#[tokio::test(start_paused = true)]
async fn stages_chain_without_map_err_and_failures_say_which_stage() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/lists/good").respond(MockResponse::json(&[1, 2, 404])));
    mock.mount(Route::get("/lists/bad").respond(MockResponse::status(500)));
    mock.mount(Route::get("/items/404").respond(MockResponse::status(404)));
    mock.mount(Route::get("/items/{id}").respond(MockResponse::ok()));
    let client = Client::builder()
        .transport(mock)
        .base_url("http://mock")
        .build()
        .unwrap();

    let out: Vec<Result<Fetched<u64>, Failure>> = stream::iter(["good", "bad"])
        .fetch_concurrent(1, client.get(|list: &&str| format!("/lists/{list}")))
        .flat_unpack::<u64>()
        .try_fetch_concurrent(4, client.get(|id: &u64| format!("/items/{id}")))
        .ordered()
        .collect()
        .await;
    assert_eq!(out.len(), 4);
    let mut lists = Vec::new();
    let mut items = Vec::new();
    for failure in out.into_iter().filter_map(Result::err) {
        match failure.downcast::<&str>() {
            Ok(list) => lists.push((*list.item(), list.status())),
            Err(failure) => {
                let item = failure.downcast::<u64>().expect("an item's failure");
                items.push((*item.item(), item.status(), item.attempts()));
            }
        }
    }
    assert_eq!(lists, [("bad", Some(StatusCode::INTERNAL_SERVER_ERROR))]);
    assert_eq!(items, [(404, Some(StatusCode::NOT_FOUND), 1)]);
}

#[tokio::test(start_paused = true)]
async fn a_third_stage_passes_failures_of_both_earlier_ones_through() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/a/2").respond(MockResponse::status(404)));
    mock.mount(Route::get("/b/3").respond(MockResponse::status(410)));
    mock.mount(Route::any("/{stage}/{id}").respond(MockResponse::ok()));
    let client = mock_client(&mock);
    let out: Vec<_> = stream::iter(1..=4u32)
        .fetch_concurrent(2, client.get(|id: &u32| format!("/a/{id}")))
        .map_ok(|f| u64::from(f.item))
        .try_fetch_concurrent(2, client.get(|id: &u64| format!("/b/{id}")))
        .map_ok(|f| f.item.to_string())
        .try_fetch_concurrent(2, client.get(|id: &String| format!("/c/{id}")))
        .collect()
        .await;
    let mut failed: Vec<_> = out
        .iter()
        .filter_map(|r| r.as_ref().err())
        .map(|f| (f.item_json().clone(), f.status().map(|s| s.as_u16())))
        .collect();
    failed.sort_by_key(|(item, _)| item.as_u64());
    assert_eq!(
        failed,
        [
            (serde_json::json!(2), Some(404)),
            (serde_json::json!(3), Some(410))
        ]
    );
    let mut ok: Vec<_> = out
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|f| f.item.clone())
        .collect();
    ok.sort();
    assert_eq!(ok, ["1", "4"]);
    assert_eq!(mock.call_count(), 4 + 3 + 2);
}

/// Counts how many times a body was decoded.
static DECODES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[derive(Debug)]
struct Counted {
    email: String,
}

impl<'de> serde::Deserialize<'de> for Counted {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        struct Raw {
            email: String,
        }
        DECODES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Raw::deserialize(d).map(|r| Counted { email: r.email })
    }
}

#[tokio::test(start_paused = true)]
async fn a_malformed_body_is_retried_and_decoded_once() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/items/{id}").sequence([
        MockResponse::ok().text(r#"{"email": "a@exa"#),
        MockResponse::json(&serde_json::json!({ "oops": true })),
        MockResponse::json(&serde_json::json!({ "email": "a@example.com" })),
    ]));
    let client = mock_client(&mock);
    let out: Vec<_> = stream::iter([7u64])
        .fetch_concurrent(
            1,
            client
                .get(|id: &u64| format!("/items/{id}"))
                .json::<Counted>()
                .retry_on(
                    Matcher::undecodable(),
                    Backoff::constant(Duration::from_millis(50)),
                ),
        )
        .json::<Counted>()
        .collect()
        .await;
    let decoded = out.into_iter().next().unwrap().unwrap();
    assert_eq!(
        (decoded.item, decoded.value.email.as_str()),
        (7, "a@example.com")
    );
    // One decode per attempt, and none in the stage: it took the value.
    assert_eq!(DECODES.load(std::sync::atomic::Ordering::SeqCst), 3);
    let calls = mock.calls();
    assert_eq!(calls.len(), 3);
    assert_eq!(
        calls[1].sent_at - calls[0].sent_at,
        Duration::from_millis(50)
    );
    assert_eq!(
        calls[2].sent_at - calls[1].sent_at,
        Duration::from_millis(50)
    );
    let stats = client.stats().unwrap().snapshot();
    assert_eq!(stats.retries, 2);
}

#[derive(Debug, serde::Deserialize)]
#[allow(dead_code)]
struct Customer {
    email: String,
}

#[tokio::test(start_paused = true)]
async fn an_undecodable_body_is_a_decode_error_once_the_attempts_end() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/items/{id}").respond(MockResponse::ok().text("<html>")));
    let client = mock_client(&mock);
    let endpoint = client
        .get(|id: &u64| format!("/items/{id}"))
        .json::<Customer>();

    // No rule for it: the first malformed body is final.
    let err = endpoint.fetch(1).await.unwrap_err();
    assert_eq!((err.kind(), err.attempts()), (FetchErrorKind::Decode, 1));
    assert!(
        err.detail().unwrap().contains(r#"body starts "<html>""#),
        "{err}"
    );
    assert_eq!(err.response().unwrap().status(), StatusCode::OK);

    // With one, retried up to its policy's cap.
    let err = endpoint
        .retry_on(
            Matcher::undecodable(),
            Backoff::constant(Duration::from_secs(1)).max_attempts(4),
        )
        .fetch(2)
        .await
        .unwrap_err();
    assert_eq!((err.kind(), err.attempts()), (FetchErrorKind::Decode, 4));
    assert_eq!(err.elapsed(), Duration::from_secs(3));
    assert_eq!(mock.call_count(), 1 + 4);
}

#[tokio::test(start_paused = true)]
async fn a_status_failure_is_not_a_decode_failure() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/gone").respond(MockResponse::status(410).text("not json")));
    let client = mock_client(&mock);
    let err = client
        .get(|_: &()| "/gone")
        .json::<Customer>()
        .retry_on(
            Matcher::undecodable(),
            Backoff::constant(Duration::from_secs(1)),
        )
        .fetch(())
        .await
        .unwrap_err();
    // Only successful bodies are decoded: a 410's body is not retried.
    assert_eq!((err.status(), err.attempts()), (Some(StatusCode::GONE), 1));
}

/// A client on `mock` with no rules of its own.
fn mock_client(mock: &MockTransport) -> Client {
    Client::builder()
        .transport(mock.clone())
        .base_url("http://mock")
        .build()
        .unwrap()
}

/// `/items/{id}` answers `{"id": id}`.
fn mount_echo_ids(mock: &MockTransport) {
    mock.mount(Route::get("/items/{id}").respond_with(|r| {
        MockResponse::json(
            &serde_json::json!({ "id": r.param("id").unwrap().parse::<u64>().unwrap() }),
        )
    }));
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("sluicegate-newcomer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn sorted_lines(path: &std::path::Path) -> Vec<String> {
    let mut lines: Vec<String> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    lines.sort();
    lines
}

/// The list → ids → items pipeline, journaled by id.
async fn journaled_list_run(client: &Client, journal: &Journal<u64>) -> Report {
    let ids = stream::iter([()])
        .fetch_concurrent(1, client.get(|_: &()| "/items"))
        .flat_unpack::<u64>();
    let results = journal
        .try_skip_done(ids)
        .try_fetch_concurrent(4, client.get(|id: &u64| format!("/items/{id}")))
        .json::<serde_json::Value>();
    journal.write_jsonl(results).await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_journal_writes_a_multi_stage_pipeline_and_retries_dead_letters_when_asked() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/items").respond(MockResponse::json(&[1, 2, 3])));
    mock.mount(Route::get("/items/2").sequence([
        MockResponse::status(500),
        MockResponse::json(&serde_json::json!({ "id": 2 })),
    ]));
    mount_echo_ids(&mock);
    let client = mock_client(&mock);
    let dir = scratch("multi-stage");
    let output = dir.join("items.jsonl");
    let key = |id: &u64| id.to_string();

    let first = journaled_list_run(&client, &Journal::open(&output, key).unwrap()).await;
    assert_eq!((first.ok, first.failed, first.skipped), (2, 1, 0));
    assert!(std::fs::read_to_string(&first.dead_letters)
        .unwrap()
        .contains(r#""item":2"#));

    // A plain re-run: item 2's dead letter counts as done.
    let again = journaled_list_run(&client, &Journal::open(&output, key).unwrap()).await;
    assert_eq!((again.ok, again.failed, again.skipped), (0, 0, 3));
    assert_eq!(mock.call_count(), 4 + 1, "only the list again");

    // Asked to, a re-run gives the dead letters another chance.
    let retried = journaled_list_run(
        &client,
        &Journal::open_retrying_failed(&output, key).unwrap(),
    )
    .await;
    assert_eq!((retried.ok, retried.failed, retried.skipped), (1, 0, 2));
    assert_eq!(mock.call_count(), 4 + 1 + 2);
    assert_eq!(
        sorted_lines(&output),
        [r#"{"id":1}"#, r#"{"id":2}"#, r#"{"id":3}"#]
    );
    assert_eq!(std::fs::read_to_string(&retried.dead_letters).unwrap(), "");
    // And a journal opened after it agrees: all three done, nothing failed.
    let journal = Journal::open(&output, key).unwrap();
    assert_eq!(journal.done_count(), 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_failed_list_request_is_dead_lettered_by_the_journal() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/items").respond(MockResponse::status(503)));
    let client = mock_client(&mock);
    let dir = scratch("failed-list");
    let output = dir.join("items.jsonl");
    let report = journaled_list_run(
        &client,
        &Journal::open(&output, |id: &u64| id.to_string()).unwrap(),
    )
    .await;
    assert_eq!((report.ok, report.failed), (0, 1));
    let dead = std::fs::read_to_string(&report.dead_letters).unwrap();
    assert!(dead.contains(r#""status":503"#), "{dead}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[derive(Debug, serde::Deserialize, serde::Serialize)]
struct Input {
    id: u64,
}

#[tokio::test(start_paused = true)]
async fn a_bad_input_line_is_dead_lettered_in_its_place() {
    let mock = MockTransport::new();
    mount_echo_ids(&mock);
    let client = mock_client(&mock);
    let dir = scratch("bad-line");
    let input = dir.join("ids.jsonl");
    std::fs::write(&input, "{\"id\": 1}\nnot json\n{\"id\": 2}\n").unwrap();
    let output = dir.join("out.jsonl");

    for run in 0..2 {
        let journal = Journal::open(&output, |i: &Input| i.id.to_string()).unwrap();
        let results = journal
            .try_skip_done(read_jsonl::<Input>(&input))
            .try_fetch_concurrent(2, client.get(|i: &Input| format!("/items/{}", i.id)))
            .json::<serde_json::Value>();
        let report = journal.write_jsonl(results).await.unwrap();
        if run == 0 {
            assert_eq!((report.ok, report.failed, report.skipped), (2, 1, 0));
            let dead: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&report.dead_letters).unwrap())
                    .unwrap();
            assert_eq!(dead["kind"], "invalid input");
            assert_eq!(dead["item"]["line"], 2);
            assert_eq!(dead["item"]["text"], "not json");
            assert_eq!(dead["attempts"], 0);
        } else {
            // Committed once: the bad line is done too, like any dead letter.
            assert_eq!((report.ok, report.failed, report.skipped), (0, 0, 3));
        }
    }
    assert_eq!(mock.call_count(), 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(start_paused = true)]
async fn retrying_dead_letters_survives_a_crash_between_its_two_steps() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/items").respond(MockResponse::json(&[1, 2])));
    mock.mount(Route::get("/items/2").respond(MockResponse::status(500)));
    mock.mount(Route::get("/items/{id}").respond(MockResponse::json(&1)));
    let client = mock_client(&mock);
    let dir = scratch("retry-crash");
    let output = dir.join("items.jsonl");
    let key = |id: &u64| id.to_string();
    let first = journaled_list_run(&client, &Journal::open(&output, key).unwrap()).await;
    assert_eq!((first.ok, first.failed), (1, 1));

    // As if open_retrying_failed had renamed the new journal into place and
    // crashed before emptying the dead letters: only the success is left in
    // the journal, the dead letter still in its file.
    let journal_path = dir.join("items.jsonl.journal");
    let kept: String = std::fs::read_to_string(&journal_path)
        .unwrap()
        .lines()
        .filter(|l| l.contains(r#""file":"ok""#))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&journal_path, kept).unwrap();
    assert!(!std::fs::read_to_string(&first.dead_letters)
        .unwrap()
        .is_empty());

    // A plain open finishes the job: the stale dead letter is cut, item 2 is
    // not done, and the re-run writes it once.
    let journal = Journal::open(&output, key).unwrap();
    assert_eq!(journal.done_count(), 1);
    assert_eq!(std::fs::read_to_string(&first.dead_letters).unwrap(), "");
    let again = journaled_list_run(&client, &journal).await;
    assert_eq!((again.ok, again.failed, again.skipped), (0, 1, 1));
    assert_eq!(
        std::fs::read_to_string(&first.dead_letters)
            .unwrap()
            .lines()
            .count(),
        1
    );

    // A retrying open drops the new failure from the journal; one more
    // finds no failure to drop and leaves the journal as it is.
    drop(journal);
    let before = std::fs::read(&journal_path).unwrap();
    drop(Journal::open_retrying_failed(&output, key).unwrap());
    let rewritten = std::fs::read(&journal_path).unwrap();
    assert_ne!(before, rewritten);
    drop(Journal::open_retrying_failed(&output, key).unwrap());
    assert_eq!(rewritten, std::fs::read(&journal_path).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_quota_403_is_retried_at_its_reset_and_a_real_403_is_not() {
    // GitHub's way: a spent quota is a 403 with its reset as a Unix time,
    // read against the response's Date.
    let spent = || {
        MockResponse::status(403)
            .header("date", "Sun, 09 Sep 2001 01:46:40 GMT") // Unix 1_000_000_000
            .header("x-ratelimit-limit", "60")
            .header("x-ratelimit-remaining", "0")
            .header("x-ratelimit-reset", "1000000045")
    };
    let mock = MockTransport::new();
    mock.mount(Route::get("/quota/always").respond(spent()));
    mock.mount(Route::get("/quota/once").sequence([spent(), MockResponse::json(&["ok"])]));
    mock.mount(Route::get("/private").respond(MockResponse::status(403)));
    // A client each: the first quota 403 holds its client's limiter.
    let client = || {
        Client::builder()
            .transport(mock.clone())
            .base_url("http://mock")
            .build()
            .unwrap()
    };
    let backoff = || Backoff::constant(Duration::from_secs(1));

    // `retry_on(429)` does not see it: the item fails on its first 403.
    let err = client()
        .get(|_: &()| "/quota/always")
        .retry_on(429, backoff())
        .fetch(())
        .await
        .unwrap_err();
    assert_eq!(
        (err.status(), err.attempts()),
        (Some(StatusCode::FORBIDDEN), 1)
    );

    // The quota matcher retries it, sent again at the reset the headers gave.
    let start = tokio::time::Instant::now();
    let fetched = client()
        .get(|_: &()| "/quota/once")
        .retry_on(Matcher::quota_exhausted(), backoff())
        .fetch(())
        .await
        .unwrap();
    assert_eq!(fetched.attempts, 2);
    let sent: Vec<_> = mock
        .calls()
        .iter()
        .filter(|c| c.uri.path() == "/quota/once")
        .map(|c| c.sent_at.duration_since(start))
        .collect();
    assert_eq!(sent, [Duration::ZERO, Duration::from_secs(45)]);

    // A 403 that says nothing about a quota is a real "forbidden": final.
    let err = client()
        .get(|_: &()| "/private")
        .retry_on(Matcher::quota_exhausted(), backoff())
        .fetch(())
        .await
        .unwrap_err();
    assert_eq!(err.attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_204_decodes_as_an_absent_value_and_says_so_otherwise() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/contributors/empty").respond(MockResponse::status(204)));
    mock.mount(Route::get("/contributors/{repo}").respond(MockResponse::json(&["ann", "bob"])));
    let client = Client::builder()
        .transport(mock)
        .base_url("http://mock")
        .build()
        .unwrap();
    let repos = || stream::iter(["full", "empty"]);
    let endpoint = || client.get(|repo: &&str| format!("/contributors/{repo}"));

    // Into a type that can be absent: `None`, no error.
    let out: Vec<_> = repos()
        .fetch_concurrent(2, endpoint())
        .ordered()
        .json::<Option<Vec<String>>>()
        .map_ok(|d| d.value)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(out, [Some(vec!["ann".to_owned(), "bob".to_owned()]), None]);

    // Into a list: a decode error that names the empty body, after the
    // attempts and decoded inside them alike.
    for endpoint in [endpoint(), endpoint().json::<Vec<String>>()] {
        let out: Vec<_> = repos()
            .fetch_concurrent(2, endpoint)
            .ordered()
            .json::<Vec<String>>()
            .collect()
            .await;
        assert!(out[0].is_ok());
        let err = out[1].as_ref().unwrap_err();
        assert_eq!(
            (err.kind(), err.status()),
            (FetchErrorKind::Decode, Some(StatusCode::NO_CONTENT))
        );
        let detail = err.detail().unwrap();
        assert!(
            detail.contains("the body is empty") && detail.contains("Option"),
            "{detail}"
        );
    }
}

#[test]
fn the_prelude_names_the_transport_trait() {
    fn takes(_: &dyn Transport) {}
    takes(&MockTransport::new());
}
