//! The hand-written clients the benches measure sluicegate against:
//! `buffer_unordered(n)` over the mock's `send`, or over reqwest itself,
//! each request optionally spawned as a tokio task.
//!
//! The spawned form is the least a client needs for its requests to
//! progress while the consumer is busy (which `fetch_concurrent`
//! guarantees and bare `buffer_unordered` does not): on a multi-thread
//! runtime it wakes the worker threads, whose scheduler loop, task cells
//! and per-thread heaps the bare form never touches. A reference for where
//! a gap comes from, not a replacement.

#![allow(dead_code)] // each bench binary uses some of these

use std::future::Future;

use bytes::Bytes;
use futures::future::Either;
use futures::{stream, StreamExt};
use sluicegate::mock::{MockResponse, MockTransport, Route};
use sluicegate::Transport;

/// A zero-latency mock answering `/items/{id}` with a small JSON object,
/// its call log off.
pub(crate) fn items_mock() -> MockTransport {
    let mock = MockTransport::new();
    mock.record_calls(false);
    mock.mount(Route::get("/items/{id}").respond(MockResponse::json(
        &serde_json::json!({ "email": "a@example.com" }),
    )));
    mock
}

/// `GET {base}/items/{id}` for every id below `items` on `mock`, `n` at a
/// time; how many came back.
pub(crate) async fn over_mock(
    mock: &MockTransport,
    base: &str,
    items: u64,
    n: usize,
    spawned: bool,
) -> u64 {
    count_ok(items, n, spawned, |id| {
        let request = http::Request::get(format!("{base}/items/{id}"))
            .body(Bytes::new())
            .unwrap();
        mock.send(request)
    })
    .await
}

/// `GET {base}/items/{id}` for every id below `items` with reqwest, the
/// body read whole, `n` at a time; how many came back.
pub(crate) async fn over_reqwest(
    http: &sluicegate::reqwest::Client,
    base: &str,
    items: u64,
    n: usize,
    spawned: bool,
) -> u64 {
    count_ok(items, n, spawned, |id| {
        let http = http.clone();
        let url = format!("{base}/items/{id}");
        async move { http.get(url).send().await?.bytes().await }
    })
    .await
}

/// `buffer_unordered(n)` over `request(id)` for every id below `items`,
/// each future spawned as a task if asked; how many came back `Ok`.
async fn count_ok<F, T, E>(
    items: u64,
    n: usize,
    spawned: bool,
    request: impl FnMut(u64) -> F,
) -> u64
where
    F: Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: Send + 'static,
{
    stream::iter(0..items)
        .map(request)
        .map(|request| {
            // The bare form polls the request's future as it is.
            if spawned {
                Either::Left(async move { tokio::spawn(request).await.unwrap() })
            } else {
                Either::Right(request)
            }
        })
        .buffer_unordered(n)
        .filter(|r| futures::future::ready(r.is_ok()))
        .count()
        .await as u64
}
