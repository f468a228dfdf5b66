//! ReqwestTransport over real loopback sockets (127.0.0.1 only).
#![cfg(all(feature = "reqwest", feature = "demo"))]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures::{stream, StreamExt};
use http::{Request, StatusCode};
use sluicegate::demo::{email, DemoConfig, DemoServer};
use sluicegate::{
    Client, FetchErrorKind, Rate, ReqwestTransport, SluiceExt, TimeoutScope, Transport,
    TransportErrorKind, WithPolicy,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Generous: only there so that a broken build fails instead of hanging.
const BOUND: Duration = Duration::from_secs(30);

async fn bounded<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(BOUND, future)
        .await
        .expect("finished well inside the bound")
}

fn get(url: String) -> Request<Bytes> {
    Request::get(url).body(Bytes::new()).unwrap()
}

/// A one-shot server that answers each connection with `reply` verbatim,
/// then closes it.
async fn raw_server(reply: Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = socket.write_all(&reply).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn status_headers_and_body_come_back_whole() {
    let server = DemoServer::start(DemoConfig::default().items(10))
        .await
        .unwrap();
    let transport = ReqwestTransport::default();

    let response = transport
        .send(get(format!("{}/items/3", server.url())))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
    assert_eq!(body["email"], email(3));

    let list = transport
        .send(get(format!("{}/items", server.url())))
        .await
        .unwrap();
    let ids: Vec<u64> = serde_json::from_slice(list.body()).unwrap();
    assert_eq!(ids, (0..10).collect::<Vec<_>>());

    let missing = transport
        .send(get(format!("{}/items/10", server.url())))
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(server.counts().requests, 3);
}

#[tokio::test]
async fn a_pipeline_over_real_sockets_gets_every_item() {
    let server = DemoServer::start(DemoConfig::default().items(200))
        .await
        .unwrap();
    let client = Client::builder()
        .transport(ReqwestTransport::default())
        .base_url(server.url())
        .rate(Rate::per_second(2_000).burst(50))
        .build()
        .unwrap();
    let mut got: Vec<u64> = stream::iter(0u64..200)
        .fetch_concurrent(16, client.get(|id: &u64| format!("/items/{id}")))
        .map(|r| r.unwrap().item)
        .collect()
        .await;
    got.sort_unstable();
    assert_eq!(got, (0..200).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_server_that_does_not_answer_times_out() {
    let server = DemoServer::start(DemoConfig::default().latency(Duration::from_secs(30)))
        .await
        .unwrap();
    // The client's per-attempt timeout.
    let client = Client::builder()
        .transport(ReqwestTransport::default())
        .base_url(server.url())
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let err = client.send("/").await.unwrap_err();
    assert_eq!(err.kind(), FetchErrorKind::Timeout(TimeoutScope::Attempt));

    // reqwest's own timeout is classified as a timeout too.
    let http = ReqwestTransport::client_builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let err = ReqwestTransport::new(http)
        .send(get(server.url()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Timeout);
}

#[tokio::test]
async fn bodies_over_the_cap_are_refused_while_reading() {
    let big = vec![b'x'; 2 * 1024 * 1024];
    // With a Content-Length: refused before reading the body.
    let mut announced =
        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", big.len()).into_bytes();
    announced.extend_from_slice(&big);
    // Without one (the body runs to the end of the connection): refused
    // as soon as the cap is passed.
    let mut unannounced = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_vec();
    unannounced.extend_from_slice(&big);

    let transport = ReqwestTransport::default().max_body_bytes(1024 * 1024);
    for reply in [announced, unannounced] {
        let addr = raw_server(reply).await;
        let err = transport
            .send(get(format!("http://{addr}/")))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), TransportErrorKind::BodyTooLarge, "{err}");
        assert!(err.to_string().contains("exceeds 1048576 bytes"), "{err}");
    }
    // Under the cap, the same body is fine.
    let mut small = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_vec();
    small.extend_from_slice(&big[..1000]);
    let addr = raw_server(small).await;
    let ok = transport
        .send(get(format!("http://{addr}/")))
        .await
        .unwrap();
    assert_eq!(ok.body().len(), 1000);
}

#[tokio::test]
async fn bodies_larger_than_the_shared_budget_still_come_back() {
    // A budget of 1 KiB, far below every body: each read waits for the
    // whole budget in turn and none of them waits for ever.
    let body = vec![b'y'; 100_000];
    let mut announced = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    announced.extend_from_slice(&body);
    let mut unannounced = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_vec();
    unannounced.extend_from_slice(&body);
    let transport = ReqwestTransport::default().max_body_bytes_in_flight(1024);
    for reply in [announced, unannounced] {
        let addr = raw_server(reply).await;
        let lengths: Vec<usize> = bounded(
            stream::iter(0..8)
                .map(|_| transport.send(get(format!("http://{addr}/"))))
                .buffer_unordered(8)
                .map(|r| r.unwrap().body().len())
                .collect(),
        )
        .await;
        assert_eq!(lengths, [body.len(); 8]);
    }
}

/// A server on 127.0.0.1:0 that answers every request with `prefix` (a
/// head, and perhaps part of a body) and then sends nothing more, keeping
/// the connection open; it reports on the channel each time it has
/// written one.
async fn stalling_server(prefix: &'static [u8]) -> (SocketAddr, mpsc::UnboundedReceiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (written, heads) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let written = written.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                if socket.write_all(prefix).await.is_ok() {
                    let _ = written.send(());
                }
                // Silent until the client goes away.
                let _ = socket.read(&mut buf).await;
            });
        }
    });
    (addr, heads)
}

#[tokio::test]
async fn bodies_that_stall_hold_up_no_other_response() {
    // Announcing 16 MiB and sending nothing of it, and the same without a
    // length after two chunks of a few bytes.
    let stalls: [&[u8]; 2] = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 16777216\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n3\r\ndef\r\n",
    ];
    for stall in stalls {
        // Four bodies at the default cap: the whole default budget, had
        // what they announce been set aside for them.
        let transport = ReqwestTransport::default();
        let (stalling, mut heads) = stalling_server(stall).await;
        let stalled: Vec<_> = (0..4)
            .map(|_| tokio::spawn(transport.send(get(format!("http://{stalling}/")))))
            .collect();
        for _ in 0..4 {
            bounded(heads.recv()).await.unwrap();
        }
        // Let the four read their heads and start on their bodies.
        for _ in 0..32 {
            tokio::task::yield_now().await;
        }
        let whole =
            raw_server(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello world".to_vec());
        let chunked = raw_server(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
                .to_vec(),
        );
        for addr in [whole.await, chunked.await] {
            let response = bounded(transport.send(get(format!("http://{addr}/"))))
                .await
                .unwrap();
            assert_eq!(response.body().as_ref(), b"hello world");
        }
        assert!(
            stalled.iter().all(|read| !read.is_finished()),
            "the stalled bodies are still being waited for"
        );
        for read in stalled {
            read.abort();
        }
    }
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let err = ReqwestTransport::default()
        .send(get(format!("http://{addr}/")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Connect, "{err}");
    assert!(
        std::error::Error::source(&err).is_some(),
        "the reqwest error stays reachable"
    );
}

#[tokio::test]
async fn a_body_cut_off_mid_way_is_a_reset() {
    let addr =
        raw_server(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nonly a little".to_vec()).await;
    let err = ReqwestTransport::default()
        .send(get(format!("http://{addr}/")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Reset, "{err}");
}

#[tokio::test]
async fn the_demo_server_refuses_above_its_rate_with_retry_after() {
    let server = DemoServer::start(DemoConfig::default().rate_limit(Rate::per_second(1).burst(2)))
        .await
        .unwrap();
    let transport = ReqwestTransport::default();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let r = transport.send(get(server.url())).await.unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(r.headers()["retry-after"], "1");
        }
    }
    assert_eq!(statuses, [200, 200, 429]);
    assert_eq!(server.counts().too_many_requests, 1);
}

#[tokio::test]
async fn a_reqwest_client_that_follows_redirects_itself_is_refused() {
    let server = DemoServer::start(DemoConfig::default().items(1))
        .await
        .unwrap();
    let elsewhere = raw_server(
        format!(
            "HTTP/1.1 302 Found\r\nlocation: {}/items/0\r\ncontent-length: 0\r\n\r\n",
            server.url()
        )
        .into_bytes(),
    )
    .await;
    // The mistake: a client with reqwest's own redirect policy back on.
    let http = ReqwestTransport::client_builder()
        .redirect(reqwest::redirect::Policy::limited(5))
        .build()
        .unwrap();
    let err = ReqwestTransport::new(http)
        .send(get(format!("http://{elsewhere}/start?key=hush123")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::InvalidRequest, "{err}");
    let shown = err.to_string();
    assert!(shown.contains("Policy::none()"), "{shown}");
    assert!(!shown.contains("hush123"), "{shown}");

    // Built as documented, the transport follows the same redirect itself.
    let response = ReqwestTransport::new(ReqwestTransport::client_builder().build().unwrap())
        .send(get(format!("http://{elsewhere}/start")))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
    assert_eq!(body["email"], email(0));
}

#[tokio::test]
async fn an_own_client_keeps_its_settings() {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let record = seen.clone();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = socket.read(&mut buf).await.unwrap();
            head.extend_from_slice(&buf[..n]);
        }
        *record.lock().unwrap() = String::from_utf8_lossy(&head).to_lowercase();
        let _ = socket
            .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
            .await;
    });
    let http = ReqwestTransport::client_builder()
        .user_agent("my-etl/1.0")
        .no_proxy()
        .http1_only()
        .build()
        .unwrap();
    let response = ReqwestTransport::new(http)
        .send(get(format!("http://{addr}/")))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(seen.lock().unwrap().contains("user-agent: my-etl/1.0"));
}

/// A layer of the user's own between the client and the transport, which
/// sends every request to another path.
struct Rewrite<T>(T);

impl<T: Transport> Transport for Rewrite<T> {
    fn send(
        &self,
        mut request: Request<Bytes>,
    ) -> futures::future::BoxFuture<
        'static,
        Result<http::Response<Bytes>, sluicegate::TransportError>,
    > {
        let uri = request.uri().to_string().replace("/items/1", "/items/2");
        *request.uri_mut() = uri.parse().unwrap();
        self.0.send(request)
    }
}

#[tokio::test]
async fn a_uri_changed_between_client_and_transport_is_the_one_sent() {
    // The client hands the transport the URL it parsed beside the request;
    // the transport must notice the URI no longer matches and send to the
    // URI, not to the stale URL.
    let server = DemoServer::start(DemoConfig::default().items(5))
        .await
        .unwrap();
    let client = Client::builder()
        .transport(Rewrite(ReqwestTransport::default()))
        .base_url(server.url())
        .build()
        .unwrap();
    let response = client.send("/items/1").await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
    assert_eq!(body["email"], email(2));
}
