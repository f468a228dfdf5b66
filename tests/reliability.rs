//! Bad input, hostile servers, cancellation and concurrency: the pipeline
//! keeps going, loses nothing, and leaks no secret.
#![cfg(all(feature = "reqwest", feature = "demo"))]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{stream, StreamExt};
use http::StatusCode;
use sluicegate::mock::{Latency, MockResponse, MockTransport, Route};
use sluicegate::prelude::*;
use sluicegate::{FetchErrorKind, ReqwestTransport, TimeoutScope, TransportErrorKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// How a hand-made server treats each connection, after reading the request.
#[derive(Clone)]
enum Behaviour {
    /// Write these bytes, then close.
    Reply(Vec<u8>),
    /// Never write anything.
    Silent,
    /// Write these bytes, then stall for ever (slowloris).
    Stall(Vec<u8>),
    /// Close with a TCP reset.
    Reset,
    /// Stream this many bytes of body without a length, counting what went
    /// out, and say when it stops.
    Flood(usize, Arc<AtomicU64>, Arc<Notify>),
}

/// A server on 127.0.0.1:0 that records each request's head.
async fn server(behaviour: Behaviour) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let behaviour = behaviour.clone();
            let seen = seen.clone();
            tokio::spawn(serve(socket, behaviour, seen));
        }
    });
    (addr, heads)
}

async fn serve(mut socket: TcpStream, behaviour: Behaviour, seen: Arc<Mutex<Vec<String>>>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    seen.lock()
        .unwrap()
        .push(String::from_utf8_lossy(&head).into_owned());
    match behaviour {
        Behaviour::Reply(bytes) => {
            let _ = socket.write_all(&bytes).await;
            let _ = socket.shutdown().await;
        }
        Behaviour::Silent => std::future::pending().await,
        Behaviour::Stall(bytes) => {
            let _ = socket.write_all(&bytes).await;
            std::future::pending().await
        }
        Behaviour::Reset => {
            socket.set_zero_linger().unwrap();
            drop(socket);
        }
        Behaviour::Flood(total, sent, stopped) => {
            let _ = socket
                .write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")
                .await;
            let chunk = vec![b'x'; 64 * 1024];
            let mut left = total;
            while left > 0 {
                let n = left.min(chunk.len());
                if socket.write_all(&chunk[..n]).await.is_err() {
                    break;
                }
                sent.fetch_add(n as u64, Ordering::Relaxed);
                left -= n;
            }
            stopped.notify_one();
        }
    }
}

fn real_client(addr: SocketAddr, timeout: Duration) -> Client {
    Client::builder()
        .transport(ReqwestTransport::default().max_body_bytes(1024 * 1024))
        .base_url(format!("http://{addr}"))
        .timeout(timeout)
        .build()
        .unwrap()
}

/// Fetches items 1..=3 from `client` and returns each output, in order.
async fn three(client: &Client) -> Vec<Result<Fetched<u32>, FetchError<u32>>> {
    stream::iter(1u32..=3)
        .fetch_concurrent(3, client.get(|id: &u32| format!("/items/{id}")))
        .ordered()
        .collect()
        .await
}

fn assert_all_failed(results: &[Result<Fetched<u32>, FetchError<u32>>], kind: FetchErrorKind) {
    assert_eq!(results.len(), 3, "every item comes out");
    for (i, r) in results.iter().enumerate() {
        let e = r.as_ref().expect_err("fails");
        assert_eq!((e.kind(), *e.item()), (kind, i as u32 + 1), "{e}");
    }
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_per_attempt() {
    let (addr, _) = server(Behaviour::Silent).await;
    let results = three(&real_client(addr, Duration::from_millis(300))).await;
    assert_all_failed(&results, FetchErrorKind::Timeout(TimeoutScope::Attempt));
}

#[tokio::test]
async fn a_server_that_stalls_after_the_headers_times_out() {
    let (addr, _) = server(Behaviour::Stall(
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc".to_vec(),
    ))
    .await;
    let results = three(&real_client(addr, Duration::from_millis(300))).await;
    assert_all_failed(&results, FetchErrorKind::Timeout(TimeoutScope::Attempt));
}

#[tokio::test]
async fn a_server_that_resets_is_a_reset_and_is_retried() {
    let (addr, heads) = server(Behaviour::Reset).await;
    let client = real_client(addr, Duration::from_secs(5));
    let results: Vec<_> = stream::iter(1u32..=3)
        .fetch_concurrent(3, client.get(|id: &u32| format!("/items/{id}")))
        .retry_on(
            Matcher::transport_errors(),
            Backoff::constant(Duration::from_millis(10)).max_attempts(2),
        )
        .ordered()
        .collect()
        .await;
    assert_all_failed(
        &results,
        FetchErrorKind::Transport(TransportErrorKind::Reset),
    );
    assert!(results
        .iter()
        .all(|r| r.as_ref().unwrap_err().attempts() == 2));
    assert_eq!(heads.lock().unwrap().len(), 6);
}

#[tokio::test]
async fn a_refused_connection_fails_each_item_alone() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let results = three(&real_client(addr, Duration::from_secs(5))).await;
    assert_all_failed(
        &results,
        FetchErrorKind::Transport(TransportErrorKind::Connect),
    );
}

#[tokio::test]
async fn a_flood_is_cut_off_at_the_cap_without_reading_it_all() {
    let sent = Arc::new(AtomicU64::new(0));
    let stopped = Arc::new(Notify::new());
    let total = 256 * 1024 * 1024;
    let (addr, _) = server(Behaviour::Flood(total, sent.clone(), stopped.clone())).await;
    let err = real_client(addr, Duration::from_secs(30))
        .send("/")
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        FetchErrorKind::Transport(TransportErrorKind::BodyTooLarge)
    );
    // The server stops when its writes fail on the closed socket.
    stopped.notified().await;
    let sent = sent.load(Ordering::Relaxed);
    assert!(
        sent < 64 * 1024 * 1024,
        "the client stopped reading early: {sent} bytes went out"
    );
}

#[tokio::test]
async fn a_body_that_stops_mid_way_is_a_reset() {
    let (addr, _) = server(Behaviour::Reply(
        b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n[1, 2".to_vec(),
    ))
    .await;
    let results = three(&real_client(addr, Duration::from_secs(5))).await;
    assert_all_failed(
        &results,
        FetchErrorKind::Transport(TransportErrorKind::Reset),
    );
}

#[tokio::test]
async fn a_redirect_loop_ends_with_an_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reply =
        format!("HTTP/1.1 302 Found\r\nlocation: http://{addr}/again\r\ncontent-length: 0\r\n\r\n");
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(serve(
                socket,
                Behaviour::Reply(reply.clone().into_bytes()),
                Arc::default(),
            ));
        }
    });
    let err = real_client(addr, Duration::from_secs(5))
        .send("/start")
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        FetchErrorKind::Transport(TransportErrorKind::Other)
    );
    assert!(err.to_string().contains("too many redirects"), "{err}");
}

#[tokio::test]
async fn a_redirect_to_another_origin_drops_credentials() {
    let (landing, landing_heads) = server(Behaviour::Reply(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
    ))
    .await;
    let redirect = format!(
        "HTTP/1.1 302 Found\r\nlocation: http://{landing}/landing\r\ncontent-length: 0\r\n\r\n"
    );
    let (origin, origin_heads) = server(Behaviour::Reply(redirect.into_bytes())).await;
    let client = Client::builder()
        .transport(ReqwestTransport::default())
        .base_url(format!("http://{origin}"))
        .default_header("authorization", "Bearer secret-token")
        .default_header("cookie", "session=secret-cookie")
        .build()
        .unwrap();
    let response = client.send("/start").await.unwrap();
    assert_eq!(response.body().as_ref(), b"ok");
    let sent_to_origin = origin_heads.lock().unwrap().join("").to_ascii_lowercase();
    assert!(sent_to_origin.contains("authorization: bearer secret-token"));
    let sent_to_landing = landing_heads.lock().unwrap().join("").to_ascii_lowercase();
    assert!(
        sent_to_landing.starts_with("get /landing"),
        "{sent_to_landing}"
    );
    assert!(!sent_to_landing.contains("secret"), "{sent_to_landing}");
}

fn mock_client(mock: &MockTransport) -> Client {
    Client::builder()
        .transport(mock.clone())
        .base_url("http://mock")
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn bad_bodies_become_errors_carrying_their_items() {
    let mock = MockTransport::new();
    mock.mount(
        Route::get("/items/1").respond(MockResponse::ok().body(&b"{\"email\": \"\xff\xfe\"}"[..])),
    );
    mock.mount(
        Route::get("/items/2").respond(
            MockResponse::ok()
                .header("content-type", "text/html")
                .text("<html>busy</html>"),
        ),
    );
    mock.mount(Route::get("/items/3").respond(MockResponse::ok()));
    mock.mount(
        Route::get("/items/4").respond(MockResponse::ok().text(r#"{"email": "d@example.com"}"#)),
    );
    let results: Vec<_> = stream::iter(1u32..=4)
        .fetch_concurrent(4, mock_client(&mock).get(|id: &u32| format!("/items/{id}")))
        .ordered()
        .json::<serde_json::Value>()
        .collect()
        .await;
    assert_eq!(results.len(), 4);
    for (i, r) in results[..3].iter().enumerate() {
        let e = r.as_ref().unwrap_err();
        assert_eq!(
            (e.kind(), *e.item()),
            (FetchErrorKind::Decode, i as u32 + 1)
        );
    }
    assert!(
        results[1]
            .as_ref()
            .unwrap_err()
            .detail()
            .unwrap()
            .contains("<html>busy"),
        "the excerpt shows what came"
    );
    // No Content-Type at all, but JSON: decoded as asked.
    assert_eq!(results[3].as_ref().unwrap().value["email"], "d@example.com");
}

#[tokio::test(start_paused = true)]
async fn hostile_retry_after_values_change_nothing_dangerous() {
    let mock = MockTransport::new();
    for (path, value) in [
        ("/neg", "-10"),
        ("/junk", "soon"),
        ("/huge", "99999999999999999999"),
        ("/past", "Thu, 01 Jan 1970 00:00:00 GMT"),
    ] {
        mock.mount(
            Route::get(path).sequence([
                // A date in the past is read against the server's own Date.
                MockResponse::status(503)
                    .header("retry-after", value)
                    .header("date", "Thu, 01 Jan 2026 00:00:00 GMT"),
                MockResponse::ok(),
            ]),
        );
    }
    let pause = PauseHandle::with_max_pause(Duration::from_secs(30));
    let client = Client::builder()
        .transport(mock.clone())
        .base_url("http://mock")
        .pause_handle(pause.clone())
        .pause_on(StatusCode::SERVICE_UNAVAILABLE, Duration::from_secs(2))
        .build()
        .unwrap();
    for (path, paused) in [("/neg", 2), ("/junk", 2), ("/huge", 30), ("/past", 0)] {
        let fetched = client.get(move |_: &()| path).fetch(()).await.unwrap();
        assert_eq!(fetched.elapsed, Duration::from_secs(paused), "{path}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_pipeline_inside_a_timeout_ends_cleanly() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/items/{id}").latency(Latency::fixed(Duration::from_secs(1))));
    let client = mock_client(&mock);
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    let done = AtomicU64::new(0);
    let run = stream::iter(0u32..100)
        .fetch_concurrent(10, client.get(|id: &u32| format!("/items/{id}")))
        .for_each(|_| {
            done.fetch_add(1, Ordering::Relaxed);
            async {}
        });
    assert!(tokio::time::timeout(Duration::from_millis(3_500), run)
        .await
        .is_err());
    assert_eq!(done.load(Ordering::Relaxed), 30);
    tokio::task::yield_now().await;
    assert_eq!(metrics.num_alive_tasks(), before, "no task left behind");
    let unanswered = mock
        .calls()
        .iter()
        .filter(|c| c.answered_at.is_none())
        .count();
    assert_eq!(
        unanswered, 10,
        "the ten in flight were cancelled, not left running"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        mock.calls()
            .iter()
            .filter(|c| c.answered_at.is_none())
            .count(),
        10
    );
}

/// Many stages and clients sharing one Limiter and one PauseHandle on a
/// multi-thread runtime: everything completes, the shared rate holds, and
/// a pause raised by one stage stops all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_limits_hold_across_threads_without_deadlock() {
    const RATE: u32 = 2_000;
    const BURST: u32 = 20;
    const PER_STAGE: u32 = 250;
    let limiter = Limiter::new(Rate::per_second(RATE).burst(BURST));
    let pause = PauseHandle::new();
    let mock = MockTransport::new();
    mock.mount(Route::get("/s/3/100").sequence([
        MockResponse::status(503).header("retry-after", "1"),
        MockResponse::ok(),
    ]));
    mock.mount(
        Route::get("/s/{stage}/{id}")
            .latency(Latency::uniform(Duration::ZERO, Duration::from_millis(2))),
    );
    let clients: Vec<Client> = (0..2)
        .map(|_| {
            Client::builder()
                .transport(mock.clone())
                .base_url("http://mock")
                .limiter(limiter.clone())
                .pause_handle(pause.clone())
                .pause_on(StatusCode::SERVICE_UNAVAILABLE, Duration::from_secs(1))
                .build()
                .unwrap()
        })
        .collect();
    let stages = (0..8u32).map(|stage| {
        let client = clients[stage as usize % 2].clone();
        tokio::spawn(async move {
            stream::iter(0..PER_STAGE)
                .fetch_concurrent(8, client.get(move |id: &u32| format!("/s/{stage}/{id}")))
                .filter(|r| futures::future::ready(r.is_ok()))
                .count()
                .await
        })
    });
    // A guard against a hang, not a measure of speed.
    let counts = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(stages))
        .await
        .expect("no deadlock, no lost wake-up");
    assert!(counts.into_iter().all(|n| n.unwrap() == PER_STAGE as usize));

    let calls = mock.calls();
    assert_eq!(calls.len() as u32, 8 * PER_STAGE + 1);
    let mut sent: Vec<_> = calls.iter().map(|c| c.sent_at).collect();
    sent.sort();
    // The limiter never grants early: in any window of 100 ms at most
    // burst + rate * (0.1 s + 1 ms) tokens are granted, across all stages
    // and clients (the extra millisecond is the one timer tick by which a
    // token may be dated before the moment it was handed over). What the
    // mock sees is sends, and on worker threads a token granted on a
    // waiter's behalf is sent when its task next runs: a thread held up by
    // the machine can let tokens granted earlier go out together. Only a
    // waiting request holds such a token, so at most one per slot in
    // flight (8 stages x 8) can join a window late, however loaded the
    // machine. (Virtual time asserts the exact bound: tests/topology.rs.)
    let most = common::max_in_window(&sent, Duration::from_millis(100));
    assert!(
        most <= (BURST + RATE * 101 / 1000 + 8 * 8) as usize,
        "{most} in one window"
    );
    let refused = calls
        .iter()
        .find(|c| c.status() == Some(StatusCode::SERVICE_UNAVAILABLE))
        .unwrap();
    let from = refused.answered_at.unwrap();
    let during = calls
        .iter()
        .filter(|c| c.sent_at > from && c.sent_at < from + Duration::from_secs(1))
        .count();
    // On worker threads a request can pass its gate a moment before
    // another thread sets the pause: at most one per slot in flight
    // (8 stages x 8). Without the shared pause about 2 000 would go out.
    assert!(
        during <= 8 * 8,
        "one stage's 503 paused every stage of both clients: {during} sent"
    );
}

/// An HTTP-date `Retry-After` in a response without `Date` is read against
/// the date the server gave earlier, moved on by tokio's clock; before the
/// server has given any date it says nothing (the policy's wait applies).
#[tokio::test(start_paused = true)]
async fn a_retry_after_date_without_date_is_read_against_the_servers_last_date() {
    let mock = MockTransport::new();
    mock.mount(
        Route::get("/dated")
            .respond(MockResponse::ok().header("date", "Thu, 01 Jan 2026 00:00:00 GMT")),
    );
    // 00:00:10, sent without a Date of its own.
    let later = "Thu, 01 Jan 2026 00:00:10 GMT";
    for path in ["/early", "/late"] {
        mock.mount(Route::get(path).sequence([
            MockResponse::status(429).header("retry-after", later),
            MockResponse::ok(),
        ]));
    }
    let client = Client::builder()
        .transport(mock.clone())
        .base_url("http://mock")
        .retry_on(429, Backoff::constant(Duration::from_secs(1)))
        .build()
        .unwrap();
    // No date known yet: the policy's 1 s.
    let early = client.get(|_: &()| "/early").fetch(()).await.unwrap();
    assert_eq!(early.elapsed, Duration::from_secs(1));
    // The server says 00:00:00; 4 s later it asks to wait until 00:00:10.
    client.get(|_: &()| "/dated").fetch(()).await.unwrap();
    tokio::time::advance(Duration::from_secs(4)).await;
    let late = client.get(|_: &()| "/late").fetch(()).await.unwrap();
    assert_eq!(late.elapsed, Duration::from_secs(6));
}
