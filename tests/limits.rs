//! Limits that compose: an endpoint's (or a host's) own limiter on top of
//! the client's, waited on in one order, never deadlocking. Virtual time,
//! exact instants measured from the start of the run.

mod common;

use std::time::Duration;

use sluicegate::prelude::*;
use tokio::time::Instant;

const MS: fn(u64) -> Duration = Duration::from_millis;

fn since(start: Instant, calls: &[sluicegate::mock::Call], prefix: &str) -> Vec<Duration> {
    let mut at: Vec<Duration> = calls
        .iter()
        .filter(|c| c.path().starts_with(prefix))
        .map(|c| c.sent_at - start)
        .collect();
    at.sort();
    at
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_limit_holds_exactly_on_top_of_the_client_rate() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/search/{q}").respond(MockResponse::ok()));
    mock.mount(Route::get("/items/{id}").respond(MockResponse::ok()));
    let client = Client::builder()
        .transport(mock.clone())
        .base_url("http://127.0.0.1:8080")
        .rate(Rate::per_second(20))
        .build()
        .unwrap();
    let search = client
        .get(|q: &u32| format!("/search/{q}"))
        .limit(Limiter::new(Rate::per_second(5)));
    let items = client.get(|id: &u32| format!("/items/{id}"));
    let start = Instant::now();

    let run = async {
        let a = stream::iter(0..10u32)
            .fetch_concurrent(4, search)
            .collect::<Vec<_>>();
        let b = stream::iter(0..20u32)
            .fetch_concurrent(4, items)
            .collect::<Vec<_>>();
        futures::join!(a, b)
    };
    let (a, b) = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("two stages on one client with a stricter endpoint limit must finish");
    assert_eq!(a.iter().filter(|r| r.is_ok()).count(), 10);
    assert_eq!(b.iter().filter(|r| r.is_ok()).count(), 20);

    let calls = mock.calls();
    // The narrower limit is the last grant before the send: exact.
    let searches = since(start, &calls, "/search/");
    let expected: Vec<Duration> = (0..10).map(|i| MS(200 * i)).collect();
    assert_eq!(searches, expected, "5/s from the start, one every 200 ms");
    // The client's rate counts a token when it grants it, so sends may run
    // ahead of it by at most what the narrower limit allows in a window.
    let all = since(start, &calls, "/");
    assert_eq!(all.len(), 30);
    let in_a_second = common::max_in_window(&all, Duration::from_secs(1));
    assert!(in_a_second <= 20 + 5, "{in_a_second} sends in one second");
    // Every request took one client token: 30 tokens at 20/s end at 1.45 s.
    assert!(*all.last().unwrap() <= MS(1_800), "{all:?}");
    let items_only = since(start, &calls, "/items/");
    assert!(common::max_in_window(&items_only, Duration::from_secs(1)) <= 20);
}

#[tokio::test(start_paused = true)]
async fn limiters_shared_in_crossed_orders_do_not_deadlock() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/x/{id}").respond(MockResponse::ok()));
    mock.mount(Route::get("/y/{id}").respond(MockResponse::ok()));
    let client = Client::builder()
        .transport(mock.clone())
        .base_url("http://127.0.0.1:8080")
        .build()
        .unwrap();
    let one = Limiter::new(Rate::per_second(10));
    let two = Limiter::new(Rate::per_second(10));
    let x = client
        .get(|id: &u32| format!("/x/{id}"))
        .limit(one.clone())
        .limit(two.clone());
    let y = client
        .get(|id: &u32| format!("/y/{id}"))
        .limit(two.clone())
        .limit(one.clone());
    let start = Instant::now();
    let run = async {
        let a = stream::iter(0..12u32)
            .fetch_concurrent(4, x)
            .collect::<Vec<_>>();
        let b = stream::iter(0..12u32)
            .fetch_concurrent(4, y)
            .collect::<Vec<_>>();
        futures::join!(a, b)
    };
    // 24 requests each need a token of both 10/s limiters: 2.3 s at best.
    // A deadlock (or a lost wake-up) would run into the timeout instead.
    let (a, b) = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("crossed limit orders must not deadlock");
    assert!(a.iter().chain(&b).all(Result::is_ok));
    let all = since(start, &mock.calls(), "/");
    assert_eq!(all.len(), 24);
    assert!(
        *all.last().unwrap() >= MS(2_300),
        "no limiter was skipped: {all:?}"
    );
    assert!(*all.last().unwrap() <= MS(4_600), "{all:?}");
    assert_eq!((one.waiting(), two.waiting()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_per_host_limit_paces_each_host_on_its_own() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/page/{id}").respond(MockResponse::ok()));
    let client = Client::builder().transport(mock.clone()).build().unwrap();
    let pages = client
        .get(|(port, id): &(u16, u32)| format!("http://127.0.0.1:{port}/page/{id}"))
        .limit_per_host(KeyedLimiter::new(Rate::per_second(5)));
    let items: Vec<(u16, u32)> = (0..6).flat_map(|id| [(8080, id), (9090, id)]).collect();
    let start = Instant::now();
    let out: Vec<_> = tokio::time::timeout(
        Duration::from_secs(10),
        stream::iter(items)
            .fetch_concurrent(4, pages)
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    assert!(out.iter().all(Result::is_ok));
    let calls = mock.calls();
    let expected: Vec<Duration> = (0..6).map(|i| MS(200 * i)).collect();
    for port in [8080u16, 9090] {
        let mut at: Vec<Duration> = calls
            .iter()
            .filter(|c| c.uri.port_u16() == Some(port))
            .map(|c| c.sent_at - start)
            .collect();
        at.sort();
        assert_eq!(at, expected, "host :{port} at 5/s of its own");
    }
}

#[tokio::test(start_paused = true)]
async fn a_client_can_carry_two_quotas_at_once() {
    // A per-second rate and a per-minute quota, as many APIs publish both.
    let mock = MockTransport::new();
    mock.mount(Route::get("/items/{id}").respond(MockResponse::ok()));
    let client = Client::builder()
        .transport(mock.clone())
        .base_url("http://127.0.0.1:8080")
        .rate(Rate::per_second(10))
        .limit(Limiter::new(Rate::per_minute(30).burst(5)))
        .build()
        .unwrap();
    let start = Instant::now();
    let out: Vec<_> = stream::iter(0..7u32)
        .fetch_concurrent(7, client.get(|id: &u32| format!("/items/{id}")))
        .collect()
        .await;
    assert!(out.iter().all(Result::is_ok));
    let at = since(start, &mock.calls(), "/items/");
    // Five at 10/s (the minute quota's burst), then one every 2 s.
    assert_eq!(at, [0, 100, 200, 300, 400, 2_000, 4_000].map(MS).to_vec());
}
