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
