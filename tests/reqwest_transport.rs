//! ReqwestTransport over real loopback sockets (127.0.0.1 only).
#![cfg(all(feature = "reqwest", feature = "demo"))]

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

/// Generous: only there so that a broken build fails instead of hanging.
#[path = "common/wire.rs"]
mod wire;

use wire::{get, raw_server};

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
    wire::bodies_larger_than_the_budget_come_back(
        ReqwestTransport::default().max_body_bytes_in_flight(1024),
    )
    .await;
}

#[tokio::test]
async fn bodies_that_stall_hold_up_no_other_response() {
    wire::stalled_bodies_hold_up_no_other_response(ReqwestTransport::default).await;
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
