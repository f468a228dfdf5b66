//! What a newcomer writes first, compiled and checked as written.

use sluicegate::prelude::*;

#[tokio::test(start_paused = true)]
async fn a_bare_status_number_is_a_matcher() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/items/{id}").sequence([
        MockResponse::status(429),
        MockResponse::json(&serde_json::json!({ "email": "a@example.com" })),
    ]));
    let client = Client::builder()
        .transport(mock.clone())
        .base_url("http://mock")
        .build()
        .unwrap();
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
#[should_panic(expected = "FetchConcurrent::retry_on called after the stream was first polled")]
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
    let client = Client::builder()
        .transport(mock.clone())
        .base_url("http://mock")
        .build()
        .unwrap();
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
    let client = Client::builder()
        .transport(mock.clone())
        .base_url("http://mock")
        .build()
        .unwrap();
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
