//! HyperTransport over TLS on 127.0.0.1: a certificate made at test time, a
//! rustls server behind hyper, and the client's ALPN choosing HTTP/2 or
//! HTTP/1.1. Real sockets and real time, every wait bounded.
#![cfg(feature = "hyper-transport")]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{stream, StreamExt};
use http::{Request, Response, StatusCode, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sluicegate::{Client, Fetched, HyperTransport, SluiceExt, Transport, TransportErrorKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::AbortOnDropHandle;

/// A hang is a failure, not a stuck CI job.
const BOUND: Duration = Duration::from_secs(30);

async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(BOUND, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {BOUND:?}"))
}

/// A self-signed certificate for `localhost` and `127.0.0.1` (an IP SAN,
/// so `https://127.0.0.1:PORT` verifies against it), and its key.
fn self_signed() -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let made = rcgen::generate_simple_self_signed(["localhost".into(), "127.0.0.1".into()])
        .expect("rcgen makes a certificate");
    let key = PrivatePkcs8KeyDer::from(made.signing_key.serialize_der());
    (made.cert.der().clone(), key.into())
}

/// A TLS acceptor with a fresh self-signed certificate (returned beside
/// it), offering `alpn` in order of preference.
fn acceptor(alpn: ProtocolIds<'_>) -> (TlsAcceptor, CertificateDer<'static>) {
    let (cert, key) = self_signed();
    let mut config = rustls::ServerConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .expect("the key fits the certificate");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    (TlsAcceptor::from(Arc::new(config)), cert)
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client config trusting exactly `roots`.
fn trusting(roots: &[CertificateDer<'static>]) -> rustls::ClientConfig {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).expect("a valid root");
    }
    rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth()
}

/// The test server's answer header saying whether a request came with a
/// `Proxy-Authorization` header.
const SAW_PROXY_AUTH: &str = "x-saw-proxy-authorization";

/// ALPN protocol ids, in order of preference.
type ProtocolIds<'a> = &'a [&'a [u8]];

/// What the server saw of one connection's TLS handshake: the protocol
/// chosen by ALPN, or the handshake's error.
type Handshake = Result<Option<Vec<u8>>, String>;

struct TlsServer {
    addr: SocketAddr,
    cert: CertificateDer<'static>,
    /// Requests that reached the handler.
    hits: Arc<AtomicUsize>,
    handshakes: mpsc::UnboundedReceiver<Handshake>,
    _accepting: AbortOnDropHandle<()>,
}

impl TlsServer {
    /// Serves HTTPS on 127.0.0.1 with a fresh self-signed certificate,
    /// offering `alpn` (in order of preference). Each request is answered
    /// `203` with `"{version:?} {path}"` as the server saw it; `203` rather
    /// than `200` so a status made up on the way would show.
    async fn start(alpn: ProtocolIds<'_>) -> Self {
        let (acceptor, cert) = acceptor(alpn);

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let (tell, handshakes) = mpsc::unbounded_channel();
        let counted = hits.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, tell, hits) = (acceptor.clone(), tell.clone(), counted.clone());
                tokio::spawn(async move {
                    let tls = match acceptor.accept(tcp).await {
                        Ok(tls) => tls,
                        Err(e) => {
                            let _ = tell.send(Err(e.to_string()));
                            return;
                        }
                    };
                    let chosen = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                    let h2 = chosen.as_deref() == Some(b"h2");
                    let _ = tell.send(Ok(chosen));
                    let service = service_fn(move |request: Request<Incoming>| {
                        hits.fetch_add(1, Ordering::SeqCst);
                        let body = format!("{:?} {}", request.version(), request.uri().path());
                        let proxy_auth = request.headers().contains_key("proxy-authorization");
                        async move {
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(StatusCode::NON_AUTHORITATIVE_INFORMATION)
                                    .header(SAW_PROXY_AUTH, proxy_auth.to_string())
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    let io = TokioIo::new(tls);
                    // The protocol is the one ALPN chose, as a real server's is.
                    let _ = if h2 {
                        http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service)
                            .await
                    } else {
                        http1::Builder::new().serve_connection(io, service).await
                    };
                });
            }
        });
        Self {
            addr,
            cert,
            hits,
            handshakes,
            _accepting: AbortOnDropHandle::new(accepting),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    async fn next_handshake(&mut self) -> Handshake {
        within("the server's handshake", self.handshakes.recv())
            .await
            .expect("the server is running")
    }
}

/// Fetches `/items/0` to `/items/{count - 1}` from `server` over
/// `transport`, four at a time, and hands back each, in item order, having
/// checked that every item came back once and none failed.
async fn fetch_items(
    transport: HyperTransport,
    server: &TlsServer,
    count: u64,
) -> Vec<Fetched<u64>> {
    let client = Client::builder()
        .transport(transport)
        .base_url(format!("https://{}", server.addr))
        .build()
        .unwrap();
    let results = within(
        "the pipeline",
        stream::iter(0..count)
            .fetch_concurrent(4, client.get(|id: &u64| format!("/items/{id}")))
            .collect::<Vec<_>>(),
    )
    .await;
    let mut fetched: Vec<Fetched<u64>> = results
        .into_iter()
        .map(|result| result.unwrap_or_else(|e| panic!("a fetch failed: {e}")))
        .collect();
    fetched.sort_by_key(|f| f.item);
    let items: Vec<u64> = fetched.iter().map(|f| f.item).collect();
    assert_eq!(items, (0..count).collect::<Vec<_>>(), "every item once");
    fetched
}

fn get(url: String) -> Request<Bytes> {
    Request::get(url).body(Bytes::new()).unwrap()
}

#[tokio::test]
async fn a_pipeline_fetches_over_https_with_the_callers_roots() {
    let server = TlsServer::start(&[b"h2", b"http/1.1"]).await;
    let transport = HyperTransport::with_tls_config(trusting(std::slice::from_ref(&server.cert)));
    for fetched in fetch_items(transport, &server, 8).await {
        assert_eq!(fetched.status(), StatusCode::NON_AUTHORITATIVE_INFORMATION);
        assert_eq!(fetched.body(), &format!("HTTP/2.0 /items/{}", fetched.item));
    }
    assert_eq!(server.hits.load(Ordering::SeqCst), 8);
}

#[tokio::test]
async fn alpn_picks_http2_where_offered_and_http11_otherwise() {
    // (what the server offers, what it chooses, what the client gets back)
    let cases: [(ProtocolIds<'_>, Option<&[u8]>, Version); 3] = [
        (&[b"h2", b"http/1.1"], Some(b"h2"), Version::HTTP_2),
        (&[b"http/1.1"], Some(b"http/1.1"), Version::HTTP_11),
        // A server that says nothing by ALPN gets HTTP/1.1, never a guess
        // at HTTP/2 (which such a server would not understand).
        (&[], None, Version::HTTP_11),
    ];
    for (offered, chosen, version) in cases {
        let mut server = TlsServer::start(offered).await;
        let offered: Vec<_> = offered.iter().map(|p| String::from_utf8_lossy(p)).collect();
        let transport =
            HyperTransport::with_tls_config(trusting(std::slice::from_ref(&server.cert)));

        let response = within("a request", transport.send(get(server.url("/v"))))
            .await
            .unwrap_or_else(|e| panic!("offering {offered:?}: {e}"));

        assert_eq!(response.version(), version, "offering {offered:?}");
        assert_eq!(response.status(), StatusCode::NON_AUTHORITATIVE_INFORMATION);
        assert_eq!(response.body(), &format!("{version:?} /v"));
        assert_eq!(
            server.next_handshake().await,
            Ok(chosen.map(<[u8]>::to_vec))
        );
    }
}

#[tokio::test]
async fn the_platform_verifier_refuses_a_self_signed_certificate() {
    let mut server = TlsServer::start(&[b"h2", b"http/1.1"]).await;
    let transport = HyperTransport::new();

    let err = within(
        "a refused request",
        transport.send(get(server.url("/secret?token=abc"))),
    )
    .await
    .expect_err("a certificate no system root signed is refused");

    // The refusal is the certificate's, not some other failure on the way.
    // No connection was made, as `ReqwestTransport` says of the same
    // refusal (reqwest marks a failed handshake `is_connect`).
    assert_eq!(err.kind(), TransportErrorKind::Connect, "{err:?}");
    assert_eq!(
        certificate_error(&err),
        Some(rustls::CertificateError::UnknownIssuer),
        "{err:?}"
    );
    // The message names the URL without its query.
    assert!(!err.to_string().contains("token"), "{err}");
    // The server's side of the handshake failed too: the client hung up.
    let handshake = server.next_handshake().await;
    assert!(handshake.is_err(), "{handshake:?}");
    assert_eq!(server.hits.load(Ordering::SeqCst), 0);
}

/// rustls' verdict on the server's certificate, found down the error's
/// source chain. An `io::Error`'s `source()` skips the error it wraps (and
/// hyper-rustls wraps one `io::Error` in another), so each one is opened
/// with `get_ref` too.
fn certificate_error(err: &(dyn std::error::Error + 'static)) -> Option<rustls::CertificateError> {
    if let Some(rustls::Error::InvalidCertificate(verdict)) = err.downcast_ref::<rustls::Error>() {
        return Some(verdict.clone());
    }
    let wrapped = err
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref());
    wrapped
        .and_then(|inner| certificate_error(inner))
        .or_else(|| err.source().and_then(certificate_error))
}

#[tokio::test]
async fn roots_without_the_servers_certificate_refuse_it_as_a_connect_error() {
    let mut server = TlsServer::start(&[b"h2", b"http/1.1"]).await;
    let (stranger, _) = self_signed();
    let transport = HyperTransport::with_tls_config(trusting(&[stranger]));

    let err = within("a refused request", transport.send(get(server.url("/"))))
        .await
        .expect_err("a certificate the roots do not hold is refused");

    // Not `UnknownIssuer`: rcgen gives every certificate the same subject,
    // so webpki takes the stranger for the issuer and finds the signature
    // wrong (`BadSignature`). Either way rustls refused the certificate.
    assert!(certificate_error(&err).is_some(), "{err:?}");
    assert_eq!(err.kind(), TransportErrorKind::Connect, "{err:?}");
    assert!(server.next_handshake().await.is_err());
    assert_eq!(server.hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_closed_port_over_https_is_a_connect_error() {
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let (cert, _) = self_signed();
    let transport = HyperTransport::with_tls_config(trusting(&[cert]));
    let err = within(
        "a refused connection",
        transport.send(get(format!("https://{closed}/"))),
    )
    .await
    .expect_err("nothing listens there");
    assert_eq!(err.kind(), TransportErrorKind::Connect, "{err:?}");
}

// ---------------------------------------------------------------------------
// Through a proxy.
// ---------------------------------------------------------------------------

/// `Basic` credentials for `user:s@cret` (written `s%40cret` in a URL).
const PROXY_AUTH: &str = "Basic dXNlcjpzQGNyZXQ=";

/// A forward proxy on 127.0.0.1 that, for requests carrying
/// `Proxy-Authorization: PROXY_AUTH`, opens a `CONNECT` tunnel to a
/// loopback target and answers a plain `GET` to one itself (`proxied`),
/// and answers anything else `407`. Records each request head it reads.
struct ConnectProxy {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    _accepting: AbortOnDropHandle<()>,
}

impl ConnectProxy {
    /// An `http://` proxy.
    async fn start() -> Self {
        Self::start_with(None).await
    }

    /// An `https://` proxy: spoken to over TLS, with a self-signed
    /// certificate of its own, returned beside it.
    async fn start_tls() -> (Self, CertificateDer<'static>) {
        let (acceptor, cert) = acceptor(&[b"http/1.1"]);
        let proxy = Self::start_with(Some(acceptor)).await;
        (proxy, cert)
    }

    async fn start_with(tls: Option<TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let record = heads.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (record, tls) = (record.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(tls) => {
                            if let Ok(client) = tls.accept(client).await {
                                Self::serve(client, record).await;
                            }
                        }
                        None => Self::serve(client, record).await,
                    }
                });
            }
        });
        Self {
            addr,
            heads,
            _accepting: AbortOnDropHandle::new(accepting),
        }
    }

    async fn serve<S>(mut client: S, record: Arc<Mutex<Vec<String>>>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if client.read(&mut byte).await.unwrap_or(0) == 0 {
                return;
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        record.lock().unwrap().push(head.clone());
        let authorized = head.lines().any(|line| {
            line.split_once(':').is_some_and(|(name, value)| {
                name.eq_ignore_ascii_case("proxy-authorization") && value.trim() == PROXY_AUTH
            })
        });
        let target = head
            .strip_prefix("CONNECT ")
            .and_then(|rest| rest.split(' ').next())
            // Loopback only: the tests reach nothing further.
            .filter(|target| target.starts_with("127.0.0.1:"));
        match target {
            Some(target) if authorized => {
                let Ok(mut origin) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut origin).await;
            }
            // A plain-`http` request in absolute form: answered here.
            None if authorized && head.starts_with("GET http://127.0.0.1:") => {
                let _ = client
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\nconnection: close\r\n\r\nproxied",
                    )
                    .await;
            }
            _ => {
                let _ = client
                    .write_all(
                        b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n",
                    )
                    .await;
            }
        }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

/// An `https://` target goes through a `CONNECT` tunnel with the proxy's
/// credentials, TLS (and ALPN's HTTP/2) inside it, end to end with the
/// origin: the proxy reads nothing but the `CONNECT`, and the origin never
/// gets the proxy's credentials.
#[tokio::test]
async fn an_https_target_tunnels_through_the_proxy_which_sees_only_the_connect() {
    let server = TlsServer::start(&[b"h2", b"http/1.1"]).await;
    let proxy = ConnectProxy::start().await;
    let transport = HyperTransport::with_tls_config(trusting(std::slice::from_ref(&server.cert)))
        .proxy(&format!("http://user:s%40cret@{}", proxy.addr))
        .unwrap();
    assert!(!format!("{transport:?}").contains("cret"));
    for fetched in fetch_items(transport, &server, 4).await {
        assert_eq!(fetched.body(), &format!("HTTP/2.0 /items/{}", fetched.item));
        assert_eq!(fetched.response.headers()[SAW_PROXY_AUTH], "false");
    }
    assert_eq!(server.hits.load(Ordering::SeqCst), 4);
    let heads = proxy.heads();
    assert!(!heads.is_empty());
    for head in &heads {
        let expected = format!("CONNECT 127.0.0.1:{} HTTP/1.1\r\n", server.addr.port());
        assert!(head.starts_with(&expected), "{head}");
        assert!(head.contains(PROXY_AUTH), "{head}");
        assert!(!head.contains("/items/"), "{head}");
    }
}

/// A proxy refusing the credentials is a `Connect` error, and neither the
/// password nor its encoding shows anywhere in the error; the origin is
/// never reached, directly or otherwise.
#[tokio::test]
async fn a_proxy_refusing_the_credentials_is_a_connect_error_that_shows_none() {
    let server = TlsServer::start(&[b"http/1.1"]).await;
    let proxy = ConnectProxy::start().await;
    let transport = HyperTransport::with_tls_config(trusting(std::slice::from_ref(&server.cert)))
        .proxy(&format!("http://user:wrongpass@{}", proxy.addr))
        .unwrap();
    let err = within("the refused tunnel", transport.send(get(server.url("/x"))))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Connect, "{err:?}");
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = next {
        for shown in [e.to_string(), format!("{e:?}")] {
            assert!(!shown.contains("wrongpass"), "{shown}");
            assert!(!shown.contains("dXNlcjp3cm9uZ3Bhc3M="), "{shown}");
        }
        next = e.source();
    }
    assert_eq!(proxy.heads().len(), 1);
    assert_eq!(server.hits.load(Ordering::SeqCst), 0);
}

/// An `https://` proxy is spoken to over TLS, checked against the
/// transport's roots, and tunnels to the origin with TLS inside: two
/// handshakes, neither of which the other end can read.
#[tokio::test]
async fn an_https_proxy_is_reached_over_tls_and_tunnels_to_the_origin() {
    let server = TlsServer::start(&[b"h2", b"http/1.1"]).await;
    let (proxy, proxy_cert) = ConnectProxy::start_tls().await;
    let transport =
        HyperTransport::with_tls_config(trusting(&[server.cert.clone(), proxy_cert.clone()]))
            .proxy(&format!("https://user:s%40cret@{}", proxy.addr))
            .unwrap();
    let response = within(
        "the request through the TLS proxy",
        transport.send(get(server.url("/a"))),
    )
    .await
    .unwrap_or_else(|e| panic!("through the TLS proxy: {e:?}"));
    assert_eq!(response.body(), "HTTP/2.0 /a");
    assert_eq!(response.headers()[SAW_PROXY_AUTH], "false");
    let heads = proxy.heads();
    assert_eq!(heads.len(), 1);
    assert!(heads[0].starts_with(&format!(
        "CONNECT 127.0.0.1:{} HTTP/1.1\r\n",
        server.addr.port()
    )));
    assert!(heads[0].contains(PROXY_AUTH));

    // A plain-`http` target goes to the proxy over TLS too, in absolute
    // form with the credentials.
    let plain = format!("http://127.0.0.1:{}/plain", server.addr.port());
    let response = within(
        "a plain request through the TLS proxy",
        transport.send(get(plain.clone())),
    )
    .await
    .unwrap_or_else(|e| panic!("plain through the TLS proxy: {e:?}"));
    assert_eq!(response.body(), "proxied");
    let heads = proxy.heads();
    assert_eq!(heads.len(), 2);
    assert!(
        heads[1].starts_with(&format!("GET {plain} HTTP/1.1\r\n")),
        "{}",
        heads[1]
    );
    assert!(heads[1].contains(PROXY_AUTH));

    // A proxy whose certificate the roots do not hold is refused before
    // anything is sent to it.
    let distrusting = HyperTransport::with_tls_config(trusting(std::slice::from_ref(&server.cert)))
        .proxy(&format!("https://user:s%40cret@{}", proxy.addr))
        .unwrap();
    let err = within(
        "the distrusted proxy",
        distrusting.send(get(server.url("/b"))),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Connect, "{err:?}");
    assert_eq!(proxy.heads().len(), 2, "nothing more reached the proxy");
    assert_eq!(server.hits.load(Ordering::SeqCst), 1);
}
