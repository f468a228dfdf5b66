//! MockTransport: routes, responders, latency, faults and the call log.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use sluicegate::mock::{Latency, MockResponse, MockTransport, Route, Unmatched};
use sluicegate::{Transport, TransportErrorKind};
use tokio::time::Instant;

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn get(path: &str) -> Request<Bytes> {
    Request::get(format!("http://mock{path}"))
        .body(Bytes::new())
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn routes_match_method_and_pattern_in_mount_order() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/items/special").respond(MockResponse::ok().text("special")))
        .mount(
            Route::get("/items/{id}").respond_with(|r| {
                MockResponse::ok().text(format!("item {}", r.param("id").unwrap()))
            }),
        )
        .mount(Route::post("/items").respond(MockResponse::status(201)))
        .mount(Route::any("/files/*").respond(MockResponse::ok().text("file")));

    let body = |r: http::Response<Bytes>| String::from_utf8(r.into_body().to_vec()).unwrap();
    assert_eq!(
        body(mock.send(get("/items/special")).await.unwrap()),
        "special"
    );
    assert_eq!(
        body(mock.send(get("/items/42?x=1")).await.unwrap()),
        "item 42"
    );
    let post = Request::post("http://mock/items")
        .body(Bytes::from("{}"))
        .unwrap();
    assert_eq!(mock.send(post).await.unwrap().status(), StatusCode::CREATED);
    let delete = Request::delete("http://mock/files/a/b")
        .body(Bytes::new())
        .unwrap();
    assert_eq!(body(mock.send(delete).await.unwrap()), "file");

    let calls = mock.calls();
    assert_eq!(calls.len(), 4);
    assert_eq!(calls[2].method, Method::POST);
    assert_eq!(calls[2].body.as_ref(), b"{}");
}

#[tokio::test(start_paused = true)]
async fn unmatched_requests_get_a_clear_404_or_an_error() {
    let mock = MockTransport::new();
    let response = mock.send(get("/nowhere")).await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(response.body().as_ref(), b"no mock route for GET /nowhere");

    mock.on_unmatched(Unmatched::Error);
    let err = mock.send(get("/nowhere")).await.unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Other);
    assert!(
        err.to_string().contains("no mock route for GET /nowhere"),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_sequence_repeats_its_last_response() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/x").sequence([
        MockResponse::status(429),
        MockResponse::status(429),
        MockResponse::ok(),
    ]));
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(mock.send(get("/x")).await.unwrap().status().as_u16());
    }
    assert_eq!(statuses, [429, 429, 200, 200, 200]);
}

#[tokio::test(start_paused = true)]
async fn the_call_log_records_exact_virtual_send_and_answer_times() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/slow").latency(Latency::fixed(ms(250))));
    mock.mount(Route::get("/slower").respond(MockResponse::ok().delay(ms(400))));
    let t0 = Instant::now();
    let (a, b) = tokio::join!(mock.send(get("/slow")), async {
        tokio::time::sleep(ms(100)).await;
        mock.send(get("/slower")).await
    });
    a.unwrap();
    b.unwrap();
    let calls = mock.calls();
    assert_eq!(calls[0].sent_at - t0, ms(0));
    assert_eq!(calls[0].answered_at.unwrap() - t0, ms(250));
    assert_eq!(calls[1].sent_at - t0, ms(100));
    assert_eq!(calls[1].answered_at.unwrap() - t0, ms(500));
    assert_eq!(calls[1].status(), Some(StatusCode::OK));
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_call_is_logged_without_an_answer() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/slow").latency(Latency::fixed(Duration::from_secs(10))));
    let r = tokio::time::timeout(ms(10), mock.send(get("/slow"))).await;
    assert!(r.is_err());
    let calls = mock.calls();
    assert_eq!(
        (calls.len(), calls[0].answered_at, calls[0].outcome),
        (1, None, None)
    );
}

async fn draw(seed: u64) -> (Vec<Duration>, Vec<u16>) {
    let mock = MockTransport::with_seed(seed);
    mock.mount(
        Route::get("/x")
            .latency(Latency::uniform(ms(10), ms(50)))
            .fault(0.3, MockResponse::status(503)),
    );
    let mut latencies = Vec::new();
    let mut statuses = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        statuses.push(mock.send(get("/x")).await.unwrap().status().as_u16());
        latencies.push(t.elapsed());
    }
    (latencies, statuses)
}

#[tokio::test(start_paused = true)]
async fn seeded_latency_and_faults_repeat_exactly() {
    let (lat_a, st_a) = draw(42).await;
    let (lat_b, st_b) = draw(42).await;
    let (lat_c, _) = draw(43).await;
    assert_eq!((&lat_a, &st_a), (&lat_b, &st_b));
    assert_ne!(lat_a, lat_c);
    assert!(lat_a.iter().all(|d| *d >= ms(10) && *d <= ms(50)));
    let faults = st_a.iter().filter(|s| **s == 503).count();
    assert!(
        (5..=25).contains(&faults),
        "{faults} faults of 50 at p = 0.3"
    );
}

#[tokio::test(start_paused = true)]
async fn transport_faults_are_errors_of_their_kind() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/x").fault(
        1.0,
        MockResponse::transport_error(TransportErrorKind::Reset),
    ));
    let err = mock.send(get("/x")).await.unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Reset);
    assert_eq!(
        mock.calls()[0].outcome,
        Some(Err(TransportErrorKind::Reset))
    );
}

#[tokio::test(start_paused = true)]
async fn the_call_log_can_be_switched_off_for_long_runs() {
    let mock = MockTransport::new();
    mock.record_calls(false);
    for _ in 0..10 {
        mock.send(get("/x")).await.unwrap();
    }
    assert_eq!((mock.call_count(), mock.calls().len()), (10, 0));
    mock.clear_calls();
    assert_eq!(mock.call_count(), 0);
}

#[test]
fn query_and_json_helpers_read_the_request() {
    let mock = MockTransport::new();
    mock.mount(Route::post("/search").respond_with(|r| {
        let body: serde_json::Value = r.json().unwrap();
        MockResponse::json(&serde_json::json!({ "page": r.query("page"), "q": body["q"] }))
    }));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let request = Request::post("http://mock/search?page=2&x=%20y")
        .body(Bytes::from(r#"{"q":"rust"}"#))
        .unwrap();
    let response = rt.block_on(mock.send(request)).unwrap();
    assert_eq!(response.body().as_ref(), br#"{"page":"2","q":"rust"}"#);
}

/// A responder is user code: it runs with no lock of the mock held, so it
/// may mount routes and read the call log (this deadlocked when the route
/// table stayed locked around it).
#[tokio::test(start_paused = true)]
async fn a_responder_may_use_the_mock_itself() {
    let mock = MockTransport::new();
    let inner = mock.clone();
    mock.mount(Route::get("/arm").respond_with(move |_| {
        inner.mount(Route::get("/armed").respond(MockResponse::status(204)));
        MockResponse::status(200).text(inner.call_count().to_string())
    }));
    let armed = tokio::time::timeout(Duration::from_secs(1), mock.send(get("/arm")))
        .await
        .expect("no deadlock")
        .unwrap();
    assert_eq!(armed.body().as_ref(), b"1");
    let then = mock.send(get("/armed")).await.unwrap();
    assert_eq!(then.status(), 204);
}
