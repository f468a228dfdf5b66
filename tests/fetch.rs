//! fetch_concurrent, retries, pauses and timeouts, on MockTransport in
//! exact virtual time — written the way a user tests their own pipeline.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{stream, StreamExt};
use http::StatusCode;
use proptest::prelude::*;
use sluicegate::mock::{Call, Latency, MockResponse, MockTransport, Route};
use sluicegate::prelude::*;
use sluicegate::{FetchErrorKind, TimeoutScope, TransportErrorKind};
use tokio::time::{sleep, Instant};

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn client(mock: &MockTransport) -> sluicegate::ClientBuilder {
    Client::builder()
        .transport(mock.clone())
        .base_url("http://127.0.0.1:8080")
}

/// The most calls sent in any window of `width`.
fn max_in_window(calls: &[Call], width: Duration) -> usize {
    let mut times: Vec<Instant> = calls.iter().map(|c| c.sent_at).collect();
    times.sort();
    common::max_in_window(&times, width)
}

/// The lesson's server: `/items` lists ids, `/items/{id}` answers an email,
/// with a hidden GCRA limit (429 + Retry-After) and outages (503 +
/// Retry-After) on tokio's clock.
fn lesson_server(n: u64, limit: Rate, outages: &[(u64, u64)]) -> MockTransport {
    let mock = MockTransport::new();
    let t0 = Instant::now();
    let server_limit = Limiter::new(limit);
    let outages: Vec<(Duration, Duration)> =
        outages.iter().map(|(a, b)| (ms(*a), ms(*b))).collect();
    mock.mount(Route::get("/items").respond(MockResponse::json(&(0..n).collect::<Vec<_>>())));
    mock.mount(
        Route::get("/items/{id}")
            .latency(Latency::uniform(ms(5), ms(30)))
            .respond_with(move |req| {
                let now = t0.elapsed();
                if let Some((_, end)) = outages
                    .iter()
                    .find(|(start, end)| now >= *start && now < *end)
                {
                    let secs = (*end - now).as_secs_f64().ceil() as u64;
                    return MockResponse::status(503).header("retry-after", secs.to_string());
                }
                if let Err(refused) = server_limit.check() {
                    let secs = refused
                        .wait_from(Instant::now())
                        .as_secs_f64()
                        .ceil()
                        .max(1.0) as u64;
                    return MockResponse::status(429).header("retry-after", secs.to_string());
                }
                let id = req.param("id").unwrap();
                MockResponse::json(&serde_json::json!({ "email": format!("user{id}@example.com") }))
            }),
    );
    mock
}

/// Outage windows of the scripted server, in ms since it started.
const OUTAGES: &[(u64, u64)] = &[(2_000, 3_000), (7_500, 8_200)];

#[derive(serde::Deserialize)]
struct Customer {
    email: String,
}

#[tokio::test(start_paused = true)]
async fn the_lesson_pipeline_accounts_for_every_item_and_respects_rate_and_pauses() {
    let mock = lesson_server(1_000, Rate::per_second(80).burst(5), OUTAGES);
    let client = client(&mock)
        .rate(Rate::per_second(100).burst(10))
        .build()
        .unwrap();

    let ids: Vec<u64> =
        serde_json::from_slice(client.send("/items").await.unwrap().body()).unwrap();
    assert_eq!(ids.len(), 1_000);

    let results: Vec<_> = stream::iter(ids)
        .fetch_concurrent(16, client.get(|id: &u64| format!("/items/{id}")))
        .retry_on(
            StatusCode::TOO_MANY_REQUESTS,
            Backoff::exponential(ms(100)).max_attempts(10),
        )
        .pause_on(
            StatusCode::SERVICE_UNAVAILABLE,
            PausePolicy::fallback(Duration::from_secs(10)).max_attempts(20),
        )
        .json::<Customer>()
        .collect()
        .await;

    // Every id arrives exactly once.
    let mut got: Vec<u64> = results
        .iter()
        .map(|r| {
            let d = r.as_ref().expect("no item fails");
            assert_eq!(d.value.email, format!("user{}@example.com", d.item));
            d.item
        })
        .collect();
    got.sort_unstable();
    assert_eq!(got, (0..1_000).collect::<Vec<_>>());

    let calls = mock.calls();
    let by_status = |s: u16| {
        calls
            .iter()
            .filter(|c| c.status() == Some(StatusCode::from_u16(s).unwrap()))
            .count()
    };
    assert_eq!(by_status(200), 1_001);
    assert!(
        by_status(429) > 0 && by_status(503) > 0,
        "the script exercises both"
    );
    assert_eq!(calls.len(), 1_001 + by_status(429) + by_status(503));

    // No sliding window exceeds the client's rate + burst.
    assert!(max_in_window(&calls, Duration::from_secs(1)) <= 100 + 10);
    assert!(max_in_window(&calls, ms(100)) <= 10 + 10);

    // No request is sent while paused: after each 503, nothing starts
    // until the Retry-After it carried has passed. The script answered the
    // whole seconds left in the outage, counted from when it was asked.
    let t0 = calls[0].sent_at;
    for refused in calls
        .iter()
        .filter(|c| c.status() == Some(StatusCode::SERVICE_UNAVAILABLE))
    {
        let asked = refused.sent_at - t0;
        let (_, end) = OUTAGES
            .iter()
            .map(|(a, b)| (ms(*a), ms(*b)))
            .find(|(a, b)| asked >= *a && asked < *b)
            .unwrap();
        let retry_after = Duration::from_secs((end - asked).as_secs_f64().ceil() as u64);
        let answered = refused.answered_at.unwrap();
        let resumes = answered + retry_after;
        let sent_during = calls
            .iter()
            .filter(|c| c.sent_at > answered && c.sent_at < resumes)
            .count();
        assert_eq!(
            sent_during, 0,
            "requests sent during the pause after {refused:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_503_seen_by_the_second_stage_pauses_the_first() {
    let mock = MockTransport::new();
    mock.mount(
        Route::get("/a/{id}")
            .latency(Latency::fixed(ms(10)))
            .respond(MockResponse::ok()),
    );
    mock.mount(Route::get("/b/3").sequence([
        MockResponse::status(503).header("retry-after", "3"),
        MockResponse::ok(),
    ]));
    mock.mount(
        Route::get("/b/{id}")
            .latency(Latency::fixed(ms(10)))
            .respond(MockResponse::ok()),
    );
    let client = client(&mock).build().unwrap();

    let outputs: Vec<_> = stream::iter(0u32..20)
        .throttle(Rate::per_second(20))
        .fetch_concurrent(2, client.get(|id: &u32| format!("/a/{id}")))
        .map(|r| r.map(|f| f.item))
        .try_fetch_concurrent(2, client.get(|id: &u32| format!("/b/{id}")))
        .pause_on(StatusCode::SERVICE_UNAVAILABLE, Duration::from_secs(1))
        .collect()
        .await;
    assert_eq!(outputs.len(), 20);
    assert!(outputs.iter().all(Result::is_ok));

    let calls = mock.calls();
    let refused = calls
        .iter()
        .find(|c| c.status() == Some(StatusCode::SERVICE_UNAVAILABLE))
        .unwrap();
    let from = refused.answered_at.unwrap();
    let until = from + Duration::from_secs(3);
    let during: Vec<_> = calls
        .iter()
        .filter(|c| c.sent_at > from && c.sent_at < until)
        .collect();
    assert!(during.is_empty(), "sent while paused: {during:?}");
    // Both stages resume exactly when the pause ends.
    let first_a = calls
        .iter()
        .filter(|c| c.path().starts_with("/a/") && c.sent_at >= until)
        .map(|c| c.sent_at)
        .min();
    let retry_b3 = calls
        .iter()
        .filter(|c| c.path() == "/b/3")
        .nth(1)
        .unwrap()
        .sent_at;
    assert_eq!(retry_b3, until);
    assert_eq!(first_a, Some(until));
}

#[tokio::test(start_paused = true)]
async fn retry_after_wins_over_the_computed_delay_and_is_capped() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/seconds").sequence([
        MockResponse::status(429).header("retry-after", "2"),
        MockResponse::ok(),
    ]));
    mock.mount(
        Route::get("/date").sequence([
            MockResponse::status(429)
                .header("date", "Sun, 09 Sep 2001 01:46:40 GMT")
                .header("retry-after", "Sun, 09 Sep 2001 01:46:45 GMT"),
            MockResponse::ok(),
        ]),
    );
    mock.mount(
        Route::get("/past").sequence([
            MockResponse::status(429)
                .header("date", "Sun, 09 Sep 2001 01:46:40 GMT")
                .header("retry-after", "Sun, 09 Sep 2001 01:46:00 GMT"),
            MockResponse::ok(),
        ]),
    );
    mock.mount(Route::get("/garbage").sequence([
        MockResponse::status(429).header("retry-after", "-5, or so"),
        MockResponse::ok(),
    ]));
    mock.mount(Route::get("/huge").sequence([
        MockResponse::status(429).header("retry-after", "999999999999"),
        MockResponse::ok(),
    ]));
    let client = client(&mock).build().unwrap();
    let policy = Backoff::constant(ms(300)).retry_after_cap(Duration::from_secs(30));
    for (path, wait) in [
        ("/seconds", ms(2_000)),
        ("/date", ms(5_000)),
        ("/past", ms(0)),
        ("/garbage", ms(300)),
        ("/huge", ms(30_000)),
    ] {
        let endpoint = client
            .get(move |_: &()| path)
            .retry_on(StatusCode::TOO_MANY_REQUESTS, policy.clone());
        let fetched = endpoint.fetch(()).await.unwrap();
        assert_eq!((fetched.attempts, fetched.elapsed), (2, wait), "{path}");
    }
}

#[tokio::test(start_paused = true)]
async fn retries_stop_at_max_attempts_with_the_last_answer() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/x").respond(MockResponse::status(500)));
    let client = client(&mock).build().unwrap();
    let err = client
        .get(|_: &()| "/x")
        .retry_on(
            Matcher::server_errors(),
            Backoff::exponential(ms(100)).max_attempts(4),
        )
        .fetch(())
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        FetchErrorKind::Status(StatusCode::INTERNAL_SERVER_ERROR)
    );
    assert_eq!(err.attempts(), 4);
    assert_eq!(err.elapsed(), ms(100 + 200 + 400));
    let sent: Vec<_> = mock.calls().iter().map(|c| c.sent_at).collect();
    assert_eq!(sent[3] - sent[0], ms(700));
}

#[tokio::test(start_paused = true)]
async fn a_retry_budget_caps_retries_across_items() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/x/{id}").respond(MockResponse::status(503)));
    let client = client(&mock).build().unwrap();
    // No floor, 20% of requests: 50 items may spend 10 retries between them.
    let budget = RetryBudget::new(Duration::from_secs(60), 0, 0.2);
    let results: Vec<_> = stream::iter(0u32..50)
        .fetch_concurrent(50, client.get(|i: &u32| format!("/x/{i}")))
        .retry_on(
            Matcher::server_errors(),
            Backoff::constant(ms(10)).max_attempts(5).budget(budget),
        )
        .collect()
        .await;
    assert_eq!(results.len(), 50);
    assert!(results.iter().all(Result::is_err));
    assert_eq!(mock.call_count(), 50 + 10);
}

#[tokio::test(start_paused = true)]
async fn transport_errors_are_retried_when_asked_and_reported_with_their_kind() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/flaky").sequence([
        MockResponse::transport_error(TransportErrorKind::Reset),
        MockResponse::transport_error(TransportErrorKind::Connect),
        MockResponse::ok().text("fine"),
    ]));
    mock.mount(
        Route::get("/down").respond(MockResponse::transport_error(TransportErrorKind::Connect)),
    );
    let client = client(&mock)
        .retry_on(
            Matcher::transport_errors(),
            Backoff::constant(ms(50)).max_attempts(3),
        )
        .build()
        .unwrap();
    let ok = client.get(|_: &()| "/flaky").fetch(()).await.unwrap();
    assert_eq!(
        (ok.attempts, ok.elapsed, ok.body().as_ref()),
        (3, ms(100), &b"fine"[..])
    );
    let err = client.get(|_: &()| "/down").fetch(()).await.unwrap_err();
    assert_eq!(
        err.kind(),
        FetchErrorKind::Transport(TransportErrorKind::Connect)
    );
    assert_eq!(err.attempts(), 3);
}

#[tokio::test(start_paused = true)]
async fn attempt_and_item_timeouts_are_their_own_kinds() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/slow").latency(Latency::fixed(Duration::from_secs(5))));
    let client = client(&mock)
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();

    let err = client.get(|_: &()| "/slow").fetch(()).await.unwrap_err();
    assert_eq!(err.kind(), FetchErrorKind::Timeout(TimeoutScope::Attempt));
    assert_eq!((err.attempts(), err.elapsed()), (1, Duration::from_secs(1)));
    assert!(err.is_timeout());

    let retried = client
        .get(|_: &()| "/slow")
        .retry_on(Matcher::timeouts(), Backoff::constant(Duration::ZERO));
    let err = retried.fetch(()).await.unwrap_err();
    assert_eq!((err.attempts(), err.elapsed()), (3, Duration::from_secs(3)));

    let err = retried.item_timeout(ms(2_500)).fetch(()).await.unwrap_err();
    assert_eq!(err.kind(), FetchErrorKind::Timeout(TimeoutScope::Item));
    assert_eq!((err.attempts(), err.elapsed()), (3, ms(2_500)));
    // The timed-out attempts were cancelled, not left running.
    assert!(mock.calls().iter().all(|c| c.answered_at.is_none()));
}

/// An item whose time runs out while it waits at the gate (here, in the
/// limiter's line) sent nothing, and says so: `attempts` counts requests
/// sent, not requests meant.
#[tokio::test(start_paused = true)]
async fn an_item_timed_out_in_line_counts_no_attempt() {
    let mock = MockTransport::new();
    mock.record_calls(true);
    mock.mount(Route::get("/items/{id}").respond(MockResponse::ok()));
    let client = client(&mock).rate(Rate::per_second(1)).build().unwrap();
    let endpoint = client
        .get(|id: &u32| format!("/items/{id}"))
        .item_timeout(ms(500));
    let mut results: Vec<_> = stream::iter(0..3u32)
        .fetch_concurrent(3, endpoint)
        .collect()
        .await;
    results.sort_by_key(|r| match r {
        Ok(f) => f.item,
        Err(e) => *e.item(),
    });
    assert!(results[0].is_ok());
    for late in &results[1..] {
        let err = late.as_ref().unwrap_err();
        assert_eq!(err.kind(), FetchErrorKind::Timeout(TimeoutScope::Item));
        assert_eq!((err.attempts(), err.elapsed()), (0, ms(500)));
    }
    assert_eq!(mock.call_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn ordered_keeps_input_order_and_unordered_is_not_held_up() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/items/0").latency(Latency::fixed(Duration::from_secs(10))));
    mock.mount(Route::get("/items/{id}").latency(Latency::fixed(ms(10))));
    let client = client(&mock).build().unwrap();
    let endpoint = client.get(|id: &u32| format!("/items/{id}"));
    let t0 = Instant::now();

    let unordered: Vec<(u32, Duration)> = stream::iter(0u32..6)
        .fetch_concurrent(3, endpoint.clone())
        .map(|r| (r.unwrap().item, t0.elapsed()))
        .collect()
        .await;
    assert_eq!(
        unordered.iter().map(|x| x.0).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 0]
    );
    assert_eq!(unordered[0].1, ms(10));
    assert_eq!(unordered[4].1, ms(30));

    let t1 = Instant::now();
    let ordered: Vec<(u32, Duration)> = stream::iter(0u32..6)
        .fetch_concurrent(3, endpoint)
        .ordered()
        .map(|r| (r.unwrap().item, t1.elapsed()))
        .collect()
        .await;
    assert_eq!(
        ordered.iter().map(|x| x.0).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4, 5]
    );
    assert_eq!(ordered[0].1, Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn requests_progress_while_the_consumer_is_slow() {
    let mock = MockTransport::new();
    // Every item is refused once, then answered after 60 ms.
    let seen = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
    mock.mount(
        Route::get("/items/{id}")
            .latency(Latency::fixed(ms(60)))
            .respond_with(move |r| {
                let mut seen = seen.lock().unwrap();
                let n = seen.entry(r.param("id").unwrap().to_owned()).or_default();
                *n += 1;
                if *n == 1 {
                    MockResponse::status(429)
                } else {
                    MockResponse::ok()
                }
            }),
    );
    let client = client(&mock).timeout(ms(100)).build().unwrap();
    let mut results = stream::iter(0u32..16)
        .fetch_concurrent(8, client.get(|id: &u32| format!("/items/{id}")))
        .retry_on(StatusCode::TOO_MANY_REQUESTS, Backoff::constant(ms(10)));
    let mut ok = 0;
    while let Some(r) = results.next().await {
        assert!(r.is_ok(), "{r:?}");
        ok += 1;
        sleep(ms(50)).await; // a slow consumer
    }
    assert_eq!(ok, 16);
    // Each retry went out exactly 10 ms after its refusal, whatever the
    // consumer was doing at the time.
    let calls = mock.calls();
    for id in 0..16 {
        let path = format!("/items/{id}");
        let tries: Vec<_> = calls.iter().filter(|c| c.path() == path).collect();
        assert_eq!(tries.len(), 2);
        assert_eq!(
            tries[1].sent_at - tries[0].answered_at.unwrap(),
            ms(10),
            "{path}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn dropping_the_stream_cancels_requests_and_leaves_no_task() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/items/{id}").latency(Latency::fixed(Duration::from_secs(60))));
    let client = client(&mock).build().unwrap();
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    let mut results =
        stream::iter(0u32..100).fetch_concurrent(8, client.get(|id: &u32| format!("/items/{id}")));
    // Start the first 8, then give up before any answer.
    let first = tokio::time::timeout(Duration::from_secs(1), results.next()).await;
    assert!(first.is_err());
    assert_eq!(results.outstanding(), 8);
    // Tasks of the stage's own run its requests (one driver on this
    // current-thread runtime, one per item on a multi-thread one).
    assert!(metrics.num_alive_tasks() > before);
    drop(results);
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
    assert_eq!(metrics.num_alive_tasks(), before);
    sleep(Duration::from_secs(120)).await;
    let calls = mock.calls();
    assert_eq!(calls.len(), 8);
    assert!(
        calls.iter().all(|c| c.answered_at.is_none()),
        "no request ran to completion"
    );
}

#[test]
#[should_panic(expected = "n must be at least 1")]
fn zero_concurrency_is_refused() {
    let client = Client::builder()
        .transport(MockTransport::new())
        .build()
        .unwrap();
    let _ = stream::iter(0u32..1).fetch_concurrent(0, client.get(|_: &u32| "/"));
}

#[tokio::test(start_paused = true)]
async fn one_bad_request_fails_only_its_item() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/items/{id}").respond(MockResponse::ok()));
    let client = client(&mock).build().unwrap();
    let results: Vec<_> = stream::iter(["1", "a b", "3"])
        .fetch_concurrent(3, client.get(|id: &&str| format!("/items/{id}")))
        .ordered()
        .collect()
        .await;
    assert!(results[0].is_ok() && results[2].is_ok());
    let err = results[1].as_ref().unwrap_err();
    assert_eq!(
        (err.kind(), *err.item(), err.attempts()),
        (FetchErrorKind::Build, "a b", 0)
    );
    assert_eq!(mock.call_count(), 2);
}

#[tokio::test(start_paused = true)]
async fn non_success_statuses_are_errors_carrying_the_item_and_response() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/items/{id}").respond(MockResponse::status(404).text("gone")));
    let client = client(&mock).build().unwrap();
    let err = client
        .get(|id: &u32| format!("/items/{id}"))
        .fetch(9)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::NOT_FOUND));
    assert_eq!(err.response().unwrap().body().as_ref(), b"gone");
    assert_eq!(err.into_item(), 9);
}

#[derive(Debug, Clone)]
enum Step {
    Ok,
    Status(u16),
    Reset,
    Hang,
}

fn step() -> impl Strategy<Value = (Step, u64)> {
    (
        prop_oneof![
            3 => Just(Step::Ok),
            2 => Just(Step::Status(429)),
            1 => Just(Step::Status(503)),
            1 => Just(Step::Status(500)),
            1 => Just(Step::Reset),
            1 => Just(Step::Hang),
        ],
        0u64..40,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever the server does, each input yields exactly one output,
    /// carrying its item, and no item gets more attempts than the rules allow.
    #[test]
    fn every_item_leaves_exactly_once_within_its_attempts(
        scripts in proptest::collection::vec(proptest::collection::vec(step(), 1..8), 1..40),
        concurrency in 1usize..8,
        ordered in any::<bool>(),
    ) {
        let n = scripts.len() as u32;
        let (outputs, calls) = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(async {
                let mock = MockTransport::new();
                let scripts = scripts.clone();
                let counters = Arc::new(Mutex::new(vec![0usize; scripts.len()]));
                mock.mount(Route::get("/items/{id}").respond_with(move |r| {
                    let id: usize = r.param("id").unwrap().parse().unwrap();
                    let mut counters = counters.lock().unwrap();
                    let script = &scripts[id];
                    let (step, latency) = script[counters[id].min(script.len() - 1)].clone();
                    counters[id] += 1;
                    let response = match step {
                        Step::Ok => MockResponse::ok(),
                        Step::Status(s) => MockResponse::status(s).header("retry-after", "1"),
                        Step::Reset => MockResponse::transport_error(TransportErrorKind::Reset),
                        Step::Hang => return MockResponse::ok().delay(Duration::from_secs(3600)),
                    };
                    response.delay(ms(latency))
                }));
                let client = client(&mock).timeout(ms(500)).build().unwrap();
                let mut fetch = stream::iter(0..n)
                    .fetch_concurrent(concurrency, client.get(|id: &u32| format!("/items/{id}")))
                    .retry_on(StatusCode::TOO_MANY_REQUESTS, Backoff::full_jitter(ms(20)).max_attempts(4).seed(7))
                    .retry_on(Matcher::transport_errors(), Backoff::constant(ms(5)).max_attempts(3))
                    .pause_on(StatusCode::SERVICE_UNAVAILABLE, PausePolicy::fallback(ms(100)).max_attempts(6));
                if ordered {
                    fetch = fetch.ordered();
                }
                let outputs: Vec<_> = fetch
                    .map(|r| match r {
                        Ok(f) => (f.item, f.attempts, true),
                        Err(e) => (*e.item(), e.attempts(), false),
                    })
                    .collect()
                    .await;
                (outputs, mock.calls())
            });
        prop_assert_eq!(outputs.len(), n as usize);
        let mut items: Vec<u32> = outputs.iter().map(|o| o.0).collect();
        if ordered {
            prop_assert_eq!(&items, &(0..n).collect::<Vec<_>>());
        }
        items.sort_unstable();
        prop_assert_eq!(items, (0..n).collect::<Vec<_>>());
        for (item, attempts, _) in &outputs {
            prop_assert!(*attempts >= 1 && *attempts <= 6);
            let path = format!("/items/{item}");
            let sent = calls.iter().filter(|c| c.path() == path).collect::<Vec<_>>();
            prop_assert_eq!(sent.len() as u32, *attempts, "attempts match the calls made");
            let refused_429 = sent.iter().filter(|c| c.status() == Some(StatusCode::TOO_MANY_REQUESTS)).count();
            prop_assert!(refused_429 <= 4, "429 retried past its policy");
        }
    }
}

/// On a multi-thread runtime a driver holds the answers a burst brings
/// and hands them over together; answers that came must still reach the
/// consumer while other items run, however few they are. Two workers,
/// real time: 20 items answer at once, the other 44 not within the test
/// (an hour); the 20 come out, each once, well inside a bound only a hang
/// would reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_came_are_handed_over_while_others_still_run() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/items/{id}").respond_with(|request| {
        let id: u64 = request.param("id").unwrap().parse().unwrap();
        if id < 20 {
            MockResponse::ok()
        } else {
            MockResponse::ok().delay(Duration::from_secs(3600))
        }
    }));
    let client = client(&mock).build().unwrap();
    let mut outputs =
        stream::iter(0..64u64).fetch_concurrent(64, client.get(|id: &u64| format!("/items/{id}")));
    let mut answered = Vec::new();
    for _ in 0..20 {
        let out = tokio::time::timeout(Duration::from_secs(30), outputs.next())
            .await
            .expect("handed over while the other items still run")
            .expect("the stream goes on");
        answered.push(out.expect("answered").item);
    }
    answered.sort_unstable();
    assert_eq!(answered, (0..20).collect::<Vec<u64>>());
}
