//! HyperTransport over real loopback sockets (127.0.0.1 only): what comes
//! back, the body caps, how failures are classified, the redirects it
//! follows and the credentials it drops on the way to another origin.
#![cfg(all(feature = "hyper-transport", feature = "demo"))]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{stream, StreamExt};
use http::{Method, Request, StatusCode};
use sluicegate::demo::{email, DemoConfig, DemoServer};
use sluicegate::{
    Client, ClientBuilder, HyperTransport, Rate, RequestSpec, SluiceExt, Transport, TransportError,
    TransportErrorKind,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Generous: only there so that a broken build fails instead of hanging.
#[path = "common/wire.rs"]
mod wire;

const BOUND: Duration = Duration::from_secs(30);

async fn bounded<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(BOUND, future)
        .await
        .expect("finished well inside the bound")
}

fn get(url: String) -> Request<Bytes> {
    Request::get(url).body(Bytes::new()).unwrap()
}

async fn send(
    transport: &HyperTransport,
    request: Request<Bytes>,
) -> Result<http::Response<Bytes>, TransportError> {
    bounded(transport.send(request)).await
}

/// A server that answers each connection with `reply` verbatim, then
/// closes it.
async fn raw_server(reply: Vec<u8>) -> SocketAddr {
    recording_server(move |_| reply.clone()).await.0
}

/// One request as the server read it off the socket.
#[derive(Clone, Debug)]
struct Seen {
    /// The head, up to the blank line, as sent.
    head: String,
    /// The body, as long as the head's `Content-Length` said.
    body: Vec<u8>,
}

impl Seen {
    /// `GET /x?y HTTP/1.1` gives `GET`.
    fn method(&self) -> &str {
        self.head.split(' ').next().unwrap_or_default()
    }

    /// `GET /x?y HTTP/1.1` gives `/x?y`.
    fn target(&self) -> &str {
        self.head.split(' ').nth(1).unwrap_or_default()
    }

    /// The value of header `name` (case-insensitive), if sent.
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Reads one request (head, then a body of its `Content-Length`).
async fn read_request(socket: &mut TcpStream) -> Option<Seen> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&data[..end]).into_owned();
    let mut seen = Seen {
        head,
        body: data[end..].to_vec(),
    };
    let length: usize = seen
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while seen.body.len() < length {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.body.extend_from_slice(&buf[..n]),
        }
    }
    Some(seen)
}

/// A server on 127.0.0.1:0 that records each request and answers it with
/// `reply(request)` (raw bytes), then closes the connection.
async fn recording_server<F>(reply: F) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>)
where
    F: Fn(&Seen) -> Vec<u8> + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let record = requests.clone();
    let reply = Arc::new(reply);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let record = record.clone();
            let reply = reply.clone();
            tokio::spawn(async move {
                let Some(seen) = read_request(&mut socket).await else {
                    return;
                };
                let bytes = reply(&seen);
                record.lock().unwrap().push(seen);
                let _ = socket.write_all(&bytes).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (addr, requests)
}

fn ok_reply(_: &Seen) -> Vec<u8> {
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok".to_vec()
}

fn redirect_reply(status: &str, location: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nlocation: {location}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
    .into_bytes()
}

/// Everything an error shows: Display and Debug, down its source chain.
fn everything_shown(err: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut shown = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        shown.push(e.to_string());
        shown.push(format!("{e:?}"));
        next = e.source();
    }
    shown
}

// ---------------------------------------------------------------------------
// What comes back.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn status_headers_and_body_come_back_whole() {
    let server = DemoServer::start(DemoConfig::default().items(10))
        .await
        .unwrap();
    let transport = HyperTransport::new();

    let response = send(&transport, get(format!("{}/items/3", server.url())))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
    assert_eq!(body["email"], email(3));

    let list = send(&transport, get(format!("{}/items", server.url())))
        .await
        .unwrap();
    let ids: Vec<u64> = serde_json::from_slice(list.body()).unwrap();
    assert_eq!(ids, (0..10).collect::<Vec<_>>());

    let missing = send(&transport, get(format!("{}/items/10", server.url())))
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(server.counts().requests, 3);
}

#[tokio::test]
async fn a_raw_reply_comes_back_byte_for_byte() {
    let body: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let mut reply = format!(
        "HTTP/1.1 418 I'm a teapot\r\nx-custom: one\r\nx-custom: two\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    reply.extend_from_slice(&body);
    // And the same body chunked, in uneven pieces, with no length.
    let mut chunked =
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
    for piece in body.chunks(7_777) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");

    let transport = HyperTransport::default();
    let addr = raw_server(reply).await;
    let response = send(&transport, get(format!("http://{addr}/tea")))
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 418);
    let custom: Vec<_> = response.headers().get_all("x-custom").iter().collect();
    assert_eq!(custom, ["one", "two"]);
    assert_eq!(response.body().as_ref(), &body[..]);

    let addr = raw_server(chunked).await;
    let response = send(&transport, get(format!("http://{addr}/chunked")))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.body().as_ref(), &body[..]);
}

#[tokio::test]
async fn a_pipeline_over_real_sockets_gets_every_item_once() {
    let server = DemoServer::start(DemoConfig::default().items(200))
        .await
        .unwrap();
    let client = Client::builder()
        .transport(HyperTransport::new())
        .base_url(server.url())
        .rate(Rate::per_second(2_000).burst(50))
        .build()
        .unwrap();
    let mut got: Vec<(u64, String)> = bounded(
        stream::iter(0u64..200)
            .fetch_concurrent(16, client.get(|id: &u64| format!("/items/{id}")))
            .map(|r| {
                let fetched = r.unwrap();
                let body: serde_json::Value = serde_json::from_slice(fetched.body()).unwrap();
                (fetched.item, body["email"].as_str().unwrap().to_owned())
            })
            .collect(),
    )
    .await;
    got.sort_unstable();
    let want: Vec<(u64, String)> = (0..200).map(|id| (id, email(id))).collect();
    assert_eq!(got, want);
    assert_eq!(server.counts().requests, 200);
}

// ---------------------------------------------------------------------------
// Body caps.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn an_announced_body_over_the_cap_is_refused_before_reading() {
    let cap = 1024 * 1024;
    // The head announces 2 MiB but not one byte of body follows, and the
    // connection stays open: only a refusal made from the head alone can
    // answer (reading would wait for bytes that never come).
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        read_request(&mut socket).await;
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", 2 * cap);
        socket.write_all(head.as_bytes()).await.unwrap();
        std::future::pending::<()>().await;
        drop(socket);
    });
    let err = send(
        &HyperTransport::new().max_body_bytes(cap),
        get(format!("http://{addr}/big?key=SECRET")),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::BodyTooLarge, "{err}");
    assert!(err.to_string().contains("exceeds 1048576 bytes"), "{err}");
    for text in everything_shown(&err) {
        assert!(!text.contains("SECRET"), "{text}");
    }
}

#[tokio::test]
async fn an_unannounced_body_passing_the_cap_is_refused() {
    let cap = 1024 * 1024;
    let big = vec![b'x'; 2 * cap];
    // To the end of the connection, no length.
    let mut to_close = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_vec();
    to_close.extend_from_slice(&big);
    // Chunked, no length.
    let mut chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for piece in big.chunks(64 * 1024) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");

    let transport = HyperTransport::new().max_body_bytes(cap);
    for reply in [to_close, chunked] {
        let addr = raw_server(reply).await;
        let err = send(&transport, get(format!("http://{addr}/?key=SECRET")))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), TransportErrorKind::BodyTooLarge, "{err}");
        assert!(err.to_string().contains("exceeds 1048576 bytes"), "{err}");
        for text in everything_shown(&err) {
            assert!(!text.contains("SECRET"), "{text}");
        }
    }

    // Exactly at the cap, the same body is fine.
    let mut at_cap = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_vec();
    at_cap.extend_from_slice(&big[..cap]);
    let addr = raw_server(at_cap).await;
    let ok = send(&transport, get(format!("http://{addr}/")))
        .await
        .unwrap();
    assert_eq!(ok.body().len(), cap);
}

#[tokio::test]
async fn bodies_larger_than_the_shared_budget_still_come_back() {
    wire::bodies_larger_than_the_budget_come_back(
        HyperTransport::new().max_body_bytes_in_flight(1024),
    )
    .await;
}

#[tokio::test]
async fn bodies_that_stall_hold_up_no_other_response() {
    wire::stalled_bodies_hold_up_no_other_response(HyperTransport::new).await;
}

// ---------------------------------------------------------------------------
// Failures and what they show.
// ---------------------------------------------------------------------------

/// A port on 127.0.0.1 that nothing listens on any more.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_error() {
    let addr = closed_port().await;
    let err = send(
        &HyperTransport::new(),
        get(format!("http://{addr}/x?key=SECRET")),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Connect, "{err}");
    assert!(err.is_connect());
    assert!(
        std::error::Error::source(&err).is_some(),
        "hyper's error stays reachable"
    );
    assert!(
        err.to_string().contains(&format!("http://{addr}/x")),
        "{err}"
    );
}

#[tokio::test]
async fn a_body_cut_off_mid_way_is_a_reset() {
    let addr =
        raw_server(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nonly a little".to_vec()).await;
    let err = send(&HyperTransport::new(), get(format!("http://{addr}/")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Reset, "{err}");
}

#[tokio::test]
async fn a_query_key_never_shows_in_an_error() {
    let refused = closed_port().await;
    let cut = raw_server(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc".to_vec()).await;
    let (looping, _) = recording_server(|_| redirect_reply("302 Found", "/again?key=SECRET")).await;
    let (ftp, _) =
        recording_server(|_| redirect_reply("302 Found", "ftp://127.0.0.1/f?key=SECRET")).await;
    let transport = HyperTransport::new().max_redirects(2);
    let mut kinds = Vec::new();
    for addr in [refused, cut, looping, ftp] {
        let err = send(&transport, get(format!("http://{addr}/x?key=SECRET")))
            .await
            .unwrap_err();
        kinds.push(err.kind());
        let shown = everything_shown(&err);
        for text in &shown {
            assert!(!text.contains("SECRET"), "{text}");
        }
        assert!(shown[0].contains(&format!("http://{addr}/")), "{shown:?}");

        // And through a client, with the key as a query parameter.
        let client = Client::builder()
            .transport(transport.clone())
            .base_url(format!("http://{addr}"))
            .build()
            .unwrap();
        let err = bounded(
            client
                .request(|_: &()| RequestSpec::get("/x").query("key", "SECRET"))
                .fetch(()),
        )
        .await
        .unwrap_err();
        for text in everything_shown(&err) {
            assert!(!text.contains("SECRET"), "{text}");
        }
    }
    assert_eq!(
        kinds,
        [
            TransportErrorKind::Connect,
            TransportErrorKind::Reset,
            TransportErrorKind::Other,
            TransportErrorKind::InvalidRequest,
        ]
    );
}

#[tokio::test]
async fn userinfo_in_the_url_never_shows_in_an_error() {
    let refused = closed_port().await;
    let err = send(
        &HyperTransport::new(),
        get(format!("http://user:PASSW0RD@{refused}/x")),
    )
    .await
    .unwrap_err();
    for text in everything_shown(&err) {
        assert!(!text.contains("PASSW0RD"), "{text}");
    }
}

// ---------------------------------------------------------------------------
// Redirects.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_relative_location_is_followed() {
    let (addr, seen) = recording_server(|request| match request.target() {
        "/a/start?q=1" => redirect_reply("302 Found", "next"),
        "/a/next" => redirect_reply("301 Moved Permanently", "/b/last?z=2#frag"),
        _ => ok_reply(request),
    })
    .await;
    let response = send(
        &HyperTransport::new(),
        get(format!("http://{addr}/a/start?q=1")),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.body().as_ref(), b"ok");
    let targets: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| format!("{} {}", s.method(), s.target()))
        .collect();
    assert_eq!(
        targets,
        ["GET /a/start?q=1", "GET /a/next", "GET /b/last?z=2"]
    );
}

fn post(url: String, body: &'static str) -> Request<Bytes> {
    Request::post(url)
        .header("content-type", "text/plain")
        .body(Bytes::from_static(body.as_bytes()))
        .unwrap()
}

#[tokio::test]
async fn a_see_other_after_a_post_becomes_a_get_without_a_body() {
    let (addr, seen) = recording_server(|request| match request.target() {
        "/form" => redirect_reply("303 See Other", "/result"),
        _ => ok_reply(request),
    })
    .await;
    let response = send(
        &HyperTransport::new(),
        post(format!("http://{addr}/form"), "name=x"),
    )
    .await
    .unwrap();
    assert_eq!(response.body().as_ref(), b"ok");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!((seen[0].method(), seen[0].target()), ("POST", "/form"));
    assert_eq!(seen[0].body, b"name=x");
    assert_eq!((seen[1].method(), seen[1].target()), ("GET", "/result"));
    assert!(seen[1].body.is_empty(), "{seen:?}");
    assert_eq!(seen[1].header("content-type"), None, "{}", seen[1].head);
    assert!(
        matches!(seen[1].header("content-length"), None | Some("0")),
        "{}",
        seen[1].head
    );
}

#[tokio::test]
async fn a_found_after_a_post_becomes_a_get_too() {
    let (addr, seen) = recording_server(|request| match request.target() {
        "/form" => redirect_reply("302 Found", "/result"),
        _ => ok_reply(request),
    })
    .await;
    send(
        &HyperTransport::new(),
        post(format!("http://{addr}/form"), "name=x"),
    )
    .await
    .unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!((seen[1].method(), seen[1].target()), ("GET", "/result"));
    assert!(seen[1].body.is_empty(), "{seen:?}");
}

#[tokio::test]
async fn a_temporary_or_permanent_redirect_keeps_method_and_body() {
    for status in ["307 Temporary Redirect", "308 Permanent Redirect"] {
        let (addr, seen) = recording_server(move |request| match request.target() {
            "/upload" => redirect_reply(status, "/elsewhere"),
            _ => ok_reply(request),
        })
        .await;
        let mut request = post(format!("http://{addr}/upload"), "payload=42");
        *request.method_mut() = Method::PUT;
        let response = send(&HyperTransport::new(), request).await.unwrap();
        assert_eq!(response.body().as_ref(), b"ok");
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "{status}");
        assert_eq!((seen[1].method(), seen[1].target()), ("PUT", "/elsewhere"));
        assert_eq!(seen[1].body, b"payload=42", "{status}");
        assert_eq!(seen[1].header("content-type"), Some("text/plain"));
    }
}

#[tokio::test]
async fn with_no_redirects_allowed_the_redirect_comes_back() {
    let (addr, seen) = recording_server(|request| match request.target() {
        "/start" => redirect_reply("302 Found", "/next"),
        _ => ok_reply(request),
    })
    .await;
    let response = send(
        &HyperTransport::new().max_redirects(0),
        get(format!("http://{addr}/start")),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::FOUND);
    assert_eq!(response.headers()["location"], "/next");
    assert_eq!(seen.lock().unwrap().len(), 1, "nothing followed");

    // A redirect status without a Location is an answer, not a redirect.
    let bare = raw_server(
        b"HTTP/1.1 302 Found\r\ncontent-length: 4\r\nconnection: close\r\n\r\nbare".to_vec(),
    )
    .await;
    let response = send(&HyperTransport::new(), get(format!("http://{bare}/")))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FOUND);
    assert_eq!(response.body().as_ref(), b"bare");
}

#[tokio::test]
async fn a_redirect_loop_ends_past_the_limit() {
    let (addr, seen) = recording_server(|_| redirect_reply("302 Found", "/loop")).await;
    let err = send(
        &HyperTransport::new().max_redirects(3),
        get(format!("http://{addr}/loop")),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Other, "{err}");
    assert!(err.to_string().contains("too many redirects"), "{err}");
    assert_eq!(
        seen.lock().unwrap().len(),
        4,
        "the first request and 3 hops"
    );

    // The default limit is 10.
    assert_eq!(HyperTransport::DEFAULT_MAX_REDIRECTS, 10);
    seen.lock().unwrap().clear();
    let err = send(&HyperTransport::new(), get(format!("http://{addr}/loop")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Other, "{err}");
    assert_eq!(seen.lock().unwrap().len(), 11);
}

#[tokio::test]
async fn a_location_with_another_scheme_is_an_invalid_request() {
    for location in [
        "ftp://127.0.0.1/file",
        "file:///etc/passwd",
        "javascript:alert(1)",
    ] {
        let (addr, seen) = recording_server(move |_| redirect_reply("302 Found", location)).await;
        let err = send(&HyperTransport::new(), get(format!("http://{addr}/x")))
            .await
            .unwrap_err();
        assert_eq!(
            err.kind(),
            TransportErrorKind::InvalidRequest,
            "{location}: {err}"
        );
        assert_eq!(seen.lock().unwrap().len(), 1);
    }
}

// ---------------------------------------------------------------------------
// Credentials stay at their origin.
// ---------------------------------------------------------------------------

/// The client's credentials: a default `Authorization`, a default header
/// marked secret, a default header not marked (still the client's), and a
/// header of the request's own marked secret by the client.
fn credentialed(builder: ClientBuilder) -> ClientBuilder {
    builder
        .transport(HyperTransport::new())
        .default_header("authorization", "Bearer TOKEN-123")
        .default_header("x-api-key", "KEY-456")
        .default_header("x-tenant", "TENANT-789")
        .redact_header("x-api-key")
        .redact_header("x-login")
}

const SECRETS: [&str; 4] = ["TOKEN-123", "KEY-456", "TENANT-789", "LOGIN-000"];

/// Which of [`SECRETS`] a request carried.
fn secrets_in(seen: &Seen) -> Vec<&'static str> {
    SECRETS
        .into_iter()
        .filter(|s| seen.head.contains(s))
        .collect()
}

/// A home server that redirects `/away` to `elsewhere` and `/near` to
/// its own `/landed`.
async fn home_server(elsewhere: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    recording_server(move |request| match request.target() {
        "/away" => redirect_reply("302 Found", &format!("http://{elsewhere}/landing")),
        "/near" => redirect_reply("307 Temporary Redirect", "/landed"),
        _ => ok_reply(request),
    })
    .await
}

async fn fetch_with_login(client: &Client, path: &'static str) {
    let fetched = bounded(
        client
            .request(move |_: &()| {
                RequestSpec::get(path)
                    .header("x-login", "LOGIN-000")
                    .header("x-plain", "PLAIN")
            })
            .fetch(()),
    )
    .await
    .unwrap();
    assert_eq!(fetched.body().as_ref(), b"ok");
}

#[tokio::test]
async fn a_redirect_to_another_origin_drops_every_credential() {
    let (elsewhere, elsewhere_seen) = recording_server(ok_reply).await;
    let (home, home_seen) = home_server(elsewhere).await;
    let client = credentialed(Client::builder().base_url(format!("http://{home}")))
        .build()
        .unwrap();
    fetch_with_login(&client, "/away").await;

    let sent = home_seen.lock().unwrap()[0].clone();
    assert_eq!(secrets_in(&sent), SECRETS, "home gets them: {}", sent.head);
    let landed = elsewhere_seen.lock().unwrap()[0].clone();
    assert_eq!(landed.target(), "/landing");
    assert!(secrets_in(&landed).is_empty(), "{}", landed.head);
    for name in ["authorization", "x-api-key", "x-tenant", "x-login"] {
        assert_eq!(landed.header(name), None, "{name}: {}", landed.head);
    }
    // A header of the request's own, not marked secret, is the user's.
    assert_eq!(landed.header("x-plain"), Some("PLAIN"), "{}", landed.head);
    let host = elsewhere.to_string();
    assert_eq!(
        landed.header("host"),
        Some(host.as_str()),
        "{}",
        landed.head
    );
}

#[tokio::test]
async fn another_port_on_the_same_host_is_another_origin() {
    // Both servers are 127.0.0.1; only the port differs.
    let (elsewhere, elsewhere_seen) = recording_server(ok_reply).await;
    let (home, _) = home_server(elsewhere).await;
    assert_eq!(home.ip(), elsewhere.ip());
    assert_ne!(home.port(), elsewhere.port());
    // A request with no base URL, sent by hand with a bare Authorization.
    let request = Request::get(format!("http://{home}/away"))
        .header("authorization", "Bearer TOKEN-123")
        .header("cookie", "id=TENANT-789")
        .header("proxy-authorization", "Basic KEY-456")
        .body(Bytes::new())
        .unwrap();
    send(&HyperTransport::new(), request).await.unwrap();
    let landed = elsewhere_seen.lock().unwrap()[0].clone();
    assert!(secrets_in(&landed).is_empty(), "{}", landed.head);
}

#[tokio::test]
async fn a_host_set_by_hand_does_not_follow_a_redirect_to_another_origin() {
    let (elsewhere, elsewhere_seen) = recording_server(ok_reply).await;
    let (home, home_seen) = home_server(elsewhere).await;
    let request = Request::get(format!("http://{home}/away"))
        .header("host", format!("{home}"))
        .body(Bytes::new())
        .unwrap();
    send(&HyperTransport::new(), request).await.unwrap();
    let left = home_seen.lock().unwrap()[0].clone();
    assert_eq!(left.header("host"), Some(home.to_string().as_str()));
    let landed = elsewhere_seen.lock().unwrap()[0].clone();
    assert_eq!(
        landed.header("host"),
        Some(elsewhere.to_string().as_str()),
        "{}",
        landed.head
    );
}

#[tokio::test]
async fn a_redirect_within_the_origin_keeps_every_credential() {
    let (elsewhere, elsewhere_seen) = recording_server(ok_reply).await;
    let (home, home_seen) = home_server(elsewhere).await;
    let client = credentialed(Client::builder().base_url(format!("http://{home}")))
        .build()
        .unwrap();
    fetch_with_login(&client, "/near").await;
    let seen = home_seen.lock().unwrap().clone();
    let targets: Vec<&str> = seen.iter().map(Seen::target).collect();
    assert_eq!(targets, ["/near", "/landed"]);
    for request in &seen {
        assert_eq!(secrets_in(request), SECRETS, "{}", request.head);
    }
    assert!(elsewhere_seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_trusted_origin_keeps_every_credential() {
    let (elsewhere, elsewhere_seen) = recording_server(ok_reply).await;
    let (home, _) = home_server(elsewhere).await;
    let client = credentialed(Client::builder().base_url(format!("http://{home}")))
        .trust_origin(format!("http://{elsewhere}"))
        .build()
        .unwrap();
    fetch_with_login(&client, "/away").await;
    let landed = elsewhere_seen.lock().unwrap()[0].clone();
    assert_eq!(landed.target(), "/landing");
    assert_eq!(secrets_in(&landed), SECRETS, "{}", landed.head);
}

#[tokio::test]
async fn a_request_built_by_the_client_and_sent_by_hand_drops_them_too() {
    let (elsewhere, elsewhere_seen) = recording_server(ok_reply).await;
    let (home, _) = home_server(elsewhere).await;
    let client = credentialed(Client::builder().base_url(format!("http://{home}")))
        .build()
        .unwrap();
    let request = client
        .get(|_: &()| "/away")
        .build_request(&())
        .unwrap()
        .into_request();
    let response = send(&HyperTransport::new(), request).await.unwrap();
    assert_eq!(response.body().as_ref(), b"ok");
    let landed = elsewhere_seen.lock().unwrap()[0].clone();
    assert_eq!(landed.target(), "/landing");
    assert!(secrets_in(&landed).is_empty(), "{}", landed.head);
}

#[tokio::test]
async fn trust_in_one_origin_does_not_carry_on_to_a_third() {
    let (third, third_seen) = recording_server(ok_reply).await;
    let (trusted, trusted_seen) =
        recording_server(move |_| redirect_reply("302 Found", &format!("http://{third}/stolen")))
            .await;
    let (home, _) = home_server(trusted).await;
    let client = credentialed(Client::builder().base_url(format!("http://{home}")))
        .trust_origin(format!("http://{trusted}"))
        .build()
        .unwrap();
    fetch_with_login(&client, "/away").await;
    let via = trusted_seen.lock().unwrap()[0].clone();
    assert_eq!(secrets_in(&via), SECRETS, "{}", via.head);
    let landed = third_seen.lock().unwrap()[0].clone();
    assert_eq!(landed.target(), "/stolen");
    assert!(secrets_in(&landed).is_empty(), "{}", landed.head);
}

// ---------------------------------------------------------------------------
// Through a proxy.
// ---------------------------------------------------------------------------

/// `Basic` credentials for `user:s@cret` (written `s%40cret` in a URL).
const PROXY_AUTH: &str = "Basic dXNlcjpzQGNyZXQ=";

/// A plain-`http` target goes to the proxy, in absolute form, with the
/// proxy's credentials; so does each redirect hop, credentials set again.
/// Nothing listens at the origin: only the proxy can answer.
#[tokio::test]
async fn an_http_target_goes_to_the_proxy_in_absolute_form_with_its_credentials() {
    let origin = closed_port().await;
    let (proxy, seen) = recording_server(move |request: &Seen| {
        if request.target().ends_with("/first?q=1") {
            redirect_reply("302 Found", &format!("http://{origin}/second"))
        } else {
            ok_reply(request)
        }
    })
    .await;
    let transport = HyperTransport::new()
        .proxy(&format!("http://user:s%40cret@{proxy}"))
        .unwrap();
    assert!(!format!("{transport:?}").contains("cret"));

    let response = send(&transport, get(format!("http://{origin}/first?q=1")))
        .await
        .unwrap();
    assert_eq!(
        (response.status(), response.body().as_ref()),
        (StatusCode::OK, &b"ok"[..])
    );
    let seen = seen.lock().unwrap().clone();
    let targets: Vec<&str> = seen.iter().map(Seen::target).collect();
    assert_eq!(
        targets,
        [
            format!("http://{origin}/first?q=1"),
            format!("http://{origin}/second")
        ]
    );
    for request in &seen {
        assert_eq!(request.header("proxy-authorization"), Some(PROXY_AUTH));
    }
}

/// A proxy URL whose user name holds an `@` unencoded
/// (`http://me@corp:pw@proxy`) is read as browsers, curl and reqwest read
/// it: the credentials end at the last `@`. Read at the first, the proxy
/// would get the wrong user and the password would be kept as part of the
/// proxy's host, where `Debug` showed it.
#[tokio::test]
async fn a_proxy_password_after_an_unencoded_at_goes_to_the_proxy_and_nowhere_else() {
    let (proxy, seen) = recording_server(ok_reply).await;
    let transport = HyperTransport::new()
        .proxy(&format!("http://me@corp.example:hunter2@{proxy}"))
        .unwrap();
    let shown = format!("{transport:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(!shown.contains("corp.example"), "{shown}");

    let origin = closed_port().await;
    send(&transport, get(format!("http://{origin}/x")))
        .await
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    // `me@corp.example:hunter2`, whole.
    assert_eq!(
        seen[0].header("proxy-authorization"),
        Some("Basic bWVAY29ycC5leGFtcGxlOmh1bnRlcjI=")
    );
}

/// Userinfo in a request's own target (a request built by hand) never
/// reaches the proxy's request line, nor anywhere else the proxy sees.
#[tokio::test]
async fn userinfo_in_a_target_is_not_sent_to_the_proxy() {
    let (proxy, seen) = recording_server(ok_reply).await;
    let transport = HyperTransport::new()
        .proxy(&format!("http://{proxy}"))
        .unwrap();
    let origin = closed_port().await;
    send(
        &transport,
        get(format!("http://bob:url-secret@{origin}/ui?a=1")),
    )
    .await
    .unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].target(), format!("http://{origin}/ui?a=1"));
    assert!(!format!("{seen:?}").contains("url-secret"));
}

/// SOCKS5 credentials the handshake cannot carry are refused when the
/// transport is made: each has a length byte (RFC 1929), and hyper-util's
/// handshake carries 259 bytes of the two together. Sent anyway, a
/// 256-byte name went out with a length of 0.
#[test]
fn socks5_credentials_too_long_for_the_handshake_are_refused() {
    let long = |n: usize| "u".repeat(n);
    for (user, password) in [
        (long(256), String::new()),
        (long(10), long(256)),
        (long(255), long(5)),
    ] {
        let url = format!("socks5://{user}:{password}@127.0.0.1:1080");
        let err = HyperTransport::new().proxy(&url).unwrap_err();
        assert!(err.to_string().contains("SOCKS5"), "{err}");
    }
    HyperTransport::new()
        .proxy(&format!(
            "socks5://{}:{}@127.0.0.1:1080",
            long(255),
            long(4)
        ))
        .unwrap();
}

/// `no_proxy` sends every request straight to its target, without the
/// proxy's credentials, and the proxy sees nothing.
#[tokio::test]
async fn no_proxy_goes_straight_to_the_origin() {
    let (proxy, at_proxy) = recording_server(ok_reply).await;
    let (origin, at_origin) = recording_server(ok_reply).await;
    let transport = HyperTransport::new()
        .proxy(&format!("http://user:s%40cret@{proxy}"))
        .unwrap()
        .no_proxy();
    send(&transport, get(format!("http://{origin}/x")))
        .await
        .unwrap();
    let at_origin = at_origin.lock().unwrap().clone();
    assert_eq!(at_origin.len(), 1);
    assert_eq!(at_origin[0].target(), "/x");
    assert_eq!(at_origin[0].header("proxy-authorization"), None);
    assert!(at_proxy.lock().unwrap().is_empty());
}

/// A proxy URL the transport cannot speak to is refused when the
/// transport is made (never ignored, which would send every request
/// direct), and the error does not repeat the URL's password.
#[test]
fn a_proxy_url_that_cannot_be_spoken_to_is_refused_without_its_password() {
    for url in [
        "socks4a://user:pw-123@127.0.0.1:3128",
        "socks4://user:pw-123@127.0.0.1:1080",
        "127.0.0.1:3128/user:pw-123",
        "http://user:pw-123@",
        "not a url pw-123",
    ] {
        let err = HyperTransport::new().proxy(url).unwrap_err();
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(shown.contains("proxy"), "{url}: {shown}");
            assert!(!shown.contains("pw-123"), "{url}: {shown}");
        }
    }
}

/// A SOCKS5 proxy on 127.0.0.1 that wants user `user` with password
/// `s@cret` and tunnels `CONNECT`s to loopback IPv4 targets. Records each
/// target asked for, or `refused` for bad credentials.
async fn socks5_proxy() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    async fn read_exact(socket: &mut TcpStream, n: usize) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; n];
        socket.read_exact(&mut buf).await.ok()?;
        Some(buf)
    }
    async fn serve(mut client: TcpStream, record: Arc<Mutex<Vec<String>>>) -> Option<()> {
        let greeting = read_exact(&mut client, 2).await?;
        let methods = read_exact(&mut client, usize::from(greeting[1])).await?;
        if greeting[0] != 5 || !methods.contains(&2) {
            client.write_all(&[5, 0xff]).await.ok()?;
            return None;
        }
        client.write_all(&[5, 2]).await.ok()?;
        let user_len = read_exact(&mut client, 2).await?[1];
        let user = read_exact(&mut client, usize::from(user_len)).await?;
        let pass_len = read_exact(&mut client, 1).await?[0];
        let pass = read_exact(&mut client, usize::from(pass_len)).await?;
        if (user.as_slice(), pass.as_slice()) != (&b"user"[..], &b"s@cret"[..]) {
            record.lock().unwrap().push("refused".to_owned());
            client.write_all(&[1, 1]).await.ok()?;
            return None;
        }
        client.write_all(&[1, 0]).await.ok()?;
        let request = read_exact(&mut client, 4).await?;
        if request[..4] != [5, 1, 0, 1] {
            // Only CONNECT to an IPv4 address: the tests use nothing else.
            return None;
        }
        let address = read_exact(&mut client, 6).await?;
        let ip = std::net::Ipv4Addr::new(address[0], address[1], address[2], address[3]);
        let port = u16::from_be_bytes([address[4], address[5]]);
        record.lock().unwrap().push(format!("{ip}:{port}"));
        if !ip.is_loopback() {
            return None;
        }
        let mut origin = TcpStream::connect((ip, port)).await.ok()?;
        client
            .write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0])
            .await
            .ok()?;
        tokio::io::copy_bidirectional(&mut client, &mut origin)
            .await
            .ok()?;
        Some(())
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let targets = Arc::new(Mutex::new(Vec::new()));
    let record = targets.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(serve(client, record.clone()));
        }
    });
    (addr, targets)
}

/// Through a SOCKS5 proxy, the request goes in a tunnel to the origin, as
/// the origin would get it directly: in origin form, with no proxy header;
/// the proxy's user and password go in the handshake alone.
#[tokio::test]
async fn a_socks5_proxy_tunnels_to_the_origin_with_its_credentials() {
    let (proxy, targets) = socks5_proxy().await;
    let (origin, at_origin) = recording_server(ok_reply).await;
    let transport = HyperTransport::new()
        .proxy(&format!("socks5://user:s%40cret@{proxy}"))
        .unwrap();
    let response = send(&transport, get(format!("http://{origin}/x?y=1")))
        .await
        .unwrap();
    assert_eq!(response.body().as_ref(), b"ok");
    assert_eq!(*targets.lock().unwrap(), [origin.to_string()]);
    let at_origin = at_origin.lock().unwrap().clone();
    assert_eq!(at_origin.len(), 1);
    assert_eq!(at_origin[0].target(), "/x?y=1");
    assert_eq!(at_origin[0].header("proxy-authorization"), None);
}

/// A SOCKS5 proxy refusing the credentials is a `Connect` error that shows
/// no password, and the origin is never reached.
#[tokio::test]
async fn a_socks5_proxy_refusing_the_credentials_is_a_connect_error() {
    let (proxy, targets) = socks5_proxy().await;
    let (origin, at_origin) = recording_server(ok_reply).await;
    let transport = HyperTransport::new()
        .proxy(&format!("socks5h://user:wrong-pw@{proxy}"))
        .unwrap();
    let err = send(&transport, get(format!("http://{origin}/x")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Connect, "{err:?}");
    for shown in everything_shown(&err) {
        assert!(!shown.contains("wrong-pw"), "{shown}");
    }
    assert_eq!(*targets.lock().unwrap(), ["refused"]);
    assert!(at_origin.lock().unwrap().is_empty());
}
