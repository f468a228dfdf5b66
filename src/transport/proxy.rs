//! [`ProxyConnector`]: the connections of [`HyperTransport`](super::HyperTransport),
//! straight to the origin or through an HTTP proxy.
//!
//! Which proxy a target goes through is hyper-util's [`Matcher`] decision
//! (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`, read as curl and
//! reqwest read them, or the system's settings where none names a proxy:
//! [`from_environment`]). What this file adds is how each case connects:
//!
//! - no proxy: a TCP connection to the origin;
//! - an HTTP proxy and an `https://` target: a `CONNECT` tunnel through
//!   the proxy (with its credentials, if it has any), and TLS to the
//!   origin inside it, so the proxy sees neither the request nor its
//!   headers;
//! - an HTTP proxy and an `http://` target: a connection to the proxy,
//!   marked as one, so that hyper-util sends the request in absolute form
//!   (`GET http://host/path`); the proxy's credentials go in a
//!   `Proxy-Authorization` header on that request alone
//!   ([`ProxyConnector::authorization`]);
//! - an HTTP proxy is spoken to over TLS when it is an `https://` one
//!   (checked against the transport's roots, HTTP/1.1 by ALPN), in
//!   plain text when it is an `http://` one;
//! - a SOCKS5 proxy (`socks5://`, names resolved here; `socks5h://`, names
//!   resolved by the proxy): a SOCKS5 tunnel to the origin, with the
//!   proxy's user and password if it has them, and TLS inside it for an
//!   `https://` target.
//!
//! A SOCKS4 proxy is not spoken to: a target whose proxy it is fails to
//! connect, with an error that says so (and names the proxy without its
//! credentials), rather than going out directly.
//!
//! Every proxy URL goes through [`unambiguous`] before the matcher reads
//! it, so its credentials end at the last `@`, as browsers, curl and
//! reqwest read them: the matcher alone ends them at the first, and would
//! keep the rest of the password as the proxy's host, where `Debug` and
//! errors show it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Uri};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::proxy::{SocksV5, Tunnel};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The proxies the environment names: `ALL_PROXY`, `HTTP_PROXY`,
/// `HTTPS_PROXY` and `NO_PROXY` (or their lowercase forms, read second),
/// each URL made [`unambiguous`]. Where none of them names a proxy, the
/// system's settings on macOS and Windows. None at all in a CGI program
/// (`REQUEST_METHOD` set), where `HTTP_PROXY` may come from a client's
/// `Proxy` header.
pub(crate) fn from_environment() -> Matcher {
    let read = |names: [&str; 2]| {
        names
            .iter()
            .find_map(|name| std::env::var(name).ok())
            .unwrap_or_default()
    };
    let all = read(["ALL_PROXY", "all_proxy"]);
    let http = read(["HTTP_PROXY", "http_proxy"]);
    let https = read(["HTTPS_PROXY", "https_proxy"]);
    let cgi = std::env::var_os("REQUEST_METHOD").is_some();
    if cgi || [&all, &http, &https].iter().all(|value| value.is_empty()) {
        // hyper-util's own reading: none in a CGI program, else the
        // system's settings (and `NO_PROXY` with them).
        return Matcher::from_system();
    }
    Matcher::builder()
        .all(unambiguous(&all))
        .http(unambiguous(&http))
        .https(unambiguous(&https))
        .no(read(["NO_PROXY", "no_proxy"]))
        .build()
}

/// `url` with its userinfo percent-encoded, so that only the `@` that
/// ends it is left: `http://me@corp:pw@proxy:3128` (user `me@corp`,
/// password `pw`, as the WHATWG URL standard reads it) becomes
/// `http://me%40corp:pw@proxy:3128/`. A URL without a scheme is taken as
/// an `http://` one, as the matcher takes it; one that does not parse is
/// left as it is (the matcher then refuses it too, or reads it the same).
pub(crate) fn unambiguous(url: &str) -> String {
    let url = url.trim();
    if url.is_empty() {
        return String::new();
    }
    let absolute = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    let Ok(parsed) = url::Url::parse(&absolute) else {
        return url.to_owned();
    };
    let Some(host) = parsed.host_str() else {
        return url.to_owned();
    };
    // `url` keeps the userinfo percent-encoded, `@` and `:` included.
    let mut shown = format!("{}://", parsed.scheme());
    if !parsed.username().is_empty() || parsed.password().is_some() {
        shown.push_str(parsed.username());
        if let Some(password) = parsed.password() {
            shown.push(':');
            shown.push_str(password);
        }
        shown.push('@');
    }
    shown.push_str(host);
    if let Some(port) = parsed.port() {
        shown.push_str(&format!(":{port}"));
    }
    shown.push('/');
    shown
}

/// Why SOCKS5 credentials cannot be sent, if they cannot: the handshake
/// gives each a length byte (RFC 1929), and hyper-util's sends at most
/// 259 bytes of the two together.
pub(crate) fn socks_credentials_unfit(user: &str, password: &str) -> Option<&'static str> {
    if user.len() > 255 || password.len() > 255 {
        Some("a SOCKS5 proxy's user name and password are each at most 255 bytes")
    } else if user.len() + password.len() > 259 {
        Some(
            "HyperTransport sends a SOCKS5 proxy at most 259 bytes of user name and password \
             together (ReqwestTransport sends 255 bytes of each)",
        )
    } else {
        None
    }
}

/// Connects to a target, through the proxy the matcher names for it, if
/// any. Cheap to clone.
#[derive(Clone)]
pub(crate) struct ProxyConnector {
    http: HttpConnector,
    /// To an `http://` proxy as it is, to an `https://` one over TLS
    /// (HTTP/1.1 only: a `CONNECT` or an absolute-form request is sent on
    /// it).
    to_proxy: HttpsConnector<HttpConnector>,
    proxies: Option<Arc<Matcher>>,
}

impl ProxyConnector {
    /// Connects with `http`, to an `https://` proxy with `tls`, through
    /// `proxies`.
    pub(crate) fn new(
        http: HttpConnector,
        tls: rustls::ClientConfig,
        proxies: Option<Matcher>,
    ) -> Self {
        let to_proxy = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http.clone());
        Self {
            http,
            to_proxy,
            proxies: proxies.map(Arc::new),
        }
    }

    /// The `Proxy-Authorization` a request to `target` carries: the
    /// credentials of the proxy a plain-`http` target is sent to, if it
    /// has any. (An `https` target's go in its tunnel's `CONNECT` alone.)
    pub(crate) fn authorization(&self, target: &Uri) -> Option<HeaderValue> {
        if target.scheme_str() != Some("http") {
            return None;
        }
        let intercept = self.proxies.as_deref()?.intercept(target)?;
        intercept.basic_auth().cloned()
    }
}

/// The proxies as the matcher shows them: their URLs without credentials,
/// and the hosts exempted.
impl std::fmt::Debug for ProxyConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.proxies {
            Some(proxies) => proxies.fmt(f),
            None => f.write_str("none"),
        }
    }
}

type Connecting = Pin<Box<dyn Future<Output = Result<ProxyStream, BoxError>> + Send>>;

impl Service<Uri> for ProxyConnector {
    type Response = ProxyStream;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, target: Uri) -> Connecting {
        let Some(intercept) = self.proxies.as_deref().and_then(|m| m.intercept(&target)) else {
            let mut http = self.http.clone();
            return Box::pin(async move {
                let io = http.call(target).await?;
                Ok(ProxyStream::direct(io))
            });
        };
        let proxy = intercept.uri().clone();
        let https_target = target.scheme_str() == Some("https");
        match proxy.scheme_str() {
            Some("http" | "https") if https_target => {
                let mut tunnel = Tunnel::new(proxy, self.to_proxy.clone());
                if let Some(auth) = intercept.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                Box::pin(async move {
                    let io = tunnel.call(target).await?;
                    Ok(ProxyStream {
                        io,
                        to_proxy: false,
                    })
                })
            }
            Some("http" | "https") => {
                let mut to_proxy = self.to_proxy.clone();
                Box::pin(async move {
                    let io = to_proxy.call(proxy).await?;
                    Ok(ProxyStream { io, to_proxy: true })
                })
            }
            Some(scheme @ ("socks5" | "socks5h")) => {
                // `socks5h` leaves names to the proxy, as curl does.
                let local_dns = scheme == "socks5";
                let mut socks = SocksV5::new(with_port(proxy, SOCKS_PORT), self.http.clone())
                    .local_dns(local_dns);
                if let Some((user, password)) = intercept.raw_auth() {
                    if let Some(unfit) = socks_credentials_unfit(user, password) {
                        return Box::pin(async move { Err(unfit.into()) });
                    }
                    socks = socks.with_auth(user.to_owned(), password.to_owned());
                }
                // A target without a port is tunnelled to its scheme's (the
                // SOCKS handshake would take 443 for any).
                let target = with_port(target, if https_target { 443 } else { 80 });
                Box::pin(async move {
                    // Resolved here, off the runtime's threads: hyper-util's
                    // handshake would resolve it with a blocking call, which
                    // stalls every task on the thread while it lasts.
                    let target = if local_dns {
                        resolved(target).await?
                    } else {
                        target
                    };
                    let io = socks.call(target).await?;
                    Ok(ProxyStream::direct(io))
                })
            }
            _ => Box::pin(async move {
                // Named by its scheme, host and port alone: whatever else
                // its URI holds is not shown.
                let scheme = proxy.scheme_str().unwrap_or("?");
                let host = proxy.host().unwrap_or("?");
                let port = proxy.port_u16().map(|port| format!(":{port}"));
                Err(format!(
                    "the proxy {scheme}://{host}{} is not an http://, https:// or SOCKS5 proxy, \
                     which are all HyperTransport speaks (ReqwestTransport speaks SOCKS4 too)",
                    port.unwrap_or_default()
                )
                .into())
            }),
        }
    }
}

/// `target` (which has a port) with its host name resolved to an address,
/// by tokio's resolver (on its blocking pool); as it is if its host is an
/// address already.
async fn resolved(target: Uri) -> Result<Uri, BoxError> {
    let (Some(host), Some(port)) = (target.host(), target.port_u16()) else {
        return Ok(target);
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<std::net::IpAddr>().is_ok() {
        return Ok(target);
    }
    let address = tokio::net::lookup_host((bare, port))
        .await?
        .next()
        .ok_or_else(|| format!("no address found for {bare}"))?;
    let mut parts = target.into_parts();
    parts.authority = Some(address.to_string().parse()?);
    Ok(Uri::from_parts(parts)?)
}

/// The port a SOCKS proxy named without one listens on.
const SOCKS_PORT: u16 = 1080;

/// `uri`, with `port` if it names none.
fn with_port(uri: Uri, port: u16) -> Uri {
    if uri.port().is_some() {
        return uri;
    }
    let Some(host) = uri.host() else {
        return uri;
    };
    let authority = format!("{host}:{port}");
    let mut parts = uri.clone().into_parts();
    match authority.parse() {
        Ok(authority) => {
            parts.authority = Some(authority);
            Uri::from_parts(parts).unwrap_or(uri)
        }
        Err(_) => uri,
    }
}

/// A connection to an origin (maybe through a tunnel), or to a proxy a
/// plain-`http` request is sent to in absolute form. Over TLS when it goes
/// to or through an `https://` proxy.
pub(crate) struct ProxyStream {
    io: MaybeHttpsStream<TokioIo<TcpStream>>,
    to_proxy: bool,
}

impl ProxyStream {
    /// A plain TCP connection to the origin, or a tunnel to it.
    fn direct(io: TokioIo<TcpStream>) -> Self {
        Self {
            io: MaybeHttpsStream::Http(io),
            to_proxy: false,
        }
    }
}

impl Connection for ProxyStream {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.to_proxy)
    }
}

impl Read for ProxyStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for ProxyStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt as _;

    use super::*;

    /// A connector through `proxies`, trusting no TLS roots.
    pub(super) fn connector_through(proxies: Matcher) -> ProxyConnector {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        ProxyConnector::new(HttpConnector::new(), tls, Some(proxies))
    }

    /// A target whose proxy (say, from `ALL_PROXY`) is SOCKS or `https://`
    /// fails to connect, saying why, and never goes out directly instead.
    #[tokio::test]
    async fn a_proxy_not_spoken_fails_the_connection_and_never_bypasses() {
        let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target: Uri = format!("http://{}/x", origin.local_addr().unwrap())
            .parse()
            .unwrap();
        for proxy in [
            "socks4://user:pw-123@127.0.0.1:9",
            "socks4a://user:pw-123@127.0.0.1:9",
            // Read at its first `@` (as the matcher reads what it is
            // given), the rest of the password would pass for the host.
            "socks4://me@corp:pw-123@127.0.0.1:9",
        ] {
            let proxies = Matcher::builder().all(proxy.to_owned()).build();
            let mut connector = connector_through(proxies);
            let Err(err) = connector.call(target.clone()).await else {
                panic!("{proxy}: connected");
            };
            let shown = err.to_string();
            assert!(
                shown.contains("is not an http://, https:// or SOCKS5 proxy"),
                "{shown}"
            );
            assert!(!shown.contains("pw-123"), "{shown}");
            assert!(
                origin.accept().now_or_never().is_none(),
                "{proxy}: went direct"
            );
        }
    }
}

#[cfg(test)]
mod url_tests {
    use super::*;

    #[test]
    fn credentials_end_at_the_last_at_and_nothing_else_changes_meaning() {
        let cases = [
            (
                "http://me@corp.example:hunter2@127.0.0.1:3128",
                "http://me%40corp.example:hunter2@127.0.0.1:3128/",
            ),
            (
                "http://user:p@ssw0rd@127.0.0.1:3128",
                "http://user:p%40ssw0rd@127.0.0.1:3128/",
            ),
            (
                "socks5h://a:b:c@127.0.0.1:1080",
                "socks5h://a:b%3Ac@127.0.0.1:1080/",
            ),
            (
                "http://user:s%40cret@proxy.test:3128",
                "http://user:s%40cret@proxy.test:3128/",
            ),
            ("127.0.0.1:3128", "http://127.0.0.1:3128/"),
            ("https://[::1]:8443/path?q", "https://[::1]:8443/"),
            ("http://proxy.test", "http://proxy.test/"),
            ("  ", ""),
            ("http://", "http://"),
        ];
        for (given, expected) in cases {
            assert_eq!(unambiguous(given), expected, "{given}");
        }
    }

    /// What the matcher makes of it: the whole user and password, and a
    /// proxy URI without them.
    #[test]
    fn the_matcher_reads_an_unambiguous_url_whole() {
        let proxies = Matcher::builder()
            .all(unambiguous("socks5://me@corp:pw@127.0.0.1:1080"))
            .build();
        let intercept = proxies
            .intercept(&Uri::from_static("http://x.test/"))
            .unwrap();
        assert_eq!(intercept.raw_auth(), Some(("me@corp", "pw")));
        assert_eq!(intercept.uri().to_string(), "socks5://127.0.0.1:1080/");
    }

    /// SOCKS5 credentials too long for the handshake fail the connection
    /// before anything is sent (they may come from `ALL_PROXY`).
    #[tokio::test]
    async fn socks5_credentials_too_long_fail_before_the_proxy_hears_anything() {
        use futures::FutureExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        let user = "u".repeat(256);
        let proxies = Matcher::builder()
            .all(format!("socks5://{user}:pw-123@{proxy}"))
            .build();
        let mut connector = tests::connector_through(proxies);
        let Err(err) = connector
            .call(Uri::from_static("http://127.0.0.1:9/"))
            .await
        else {
            panic!("connected");
        };
        assert!(err.to_string().contains("255 bytes"), "{err}");
        assert!(!err.to_string().contains("pw-123"), "{err}");
        assert!(
            listener.accept().now_or_never().is_none(),
            "the proxy was called"
        );
        assert_eq!(socks_credentials_unfit(&"u".repeat(255), "abcd"), None);
        assert!(socks_credentials_unfit(&"u".repeat(255), "abcde").is_some());
    }
}

#[cfg(test)]
mod resolve_tests {
    use super::*;

    #[tokio::test]
    async fn a_name_is_resolved_and_an_address_left_as_it_is() {
        for given in ["http://127.0.0.1:8080/x?y", "https://[::1]:443/"] {
            let uri: Uri = given.parse().unwrap();
            assert_eq!(resolved(uri.clone()).await.unwrap(), uri);
        }
        // From the hosts file: no query leaves the machine.
        let uri = resolved("http://localhost:8080/x?y".parse().unwrap())
            .await
            .unwrap();
        let host = uri
            .host()
            .unwrap()
            .trim_start_matches('[')
            .trim_end_matches(']');
        assert!(
            host.parse::<std::net::IpAddr>().unwrap().is_loopback(),
            "{uri}"
        );
        assert_eq!(
            (uri.port_u16(), uri.path_and_query().unwrap().as_str()),
            (Some(8080), "/x?y")
        );
    }
}

#[cfg(test)]
mod port_tests {
    use super::*;

    #[test]
    fn a_uri_without_a_port_gets_the_one_given_and_keeps_its_own_otherwise() {
        let cases = [
            ("http://example.test/a?b", 80, "http://example.test:80/a?b"),
            (
                "https://example.test:8443/",
                443,
                "https://example.test:8443/",
            ),
            ("socks5://127.0.0.1", 1080, "socks5://127.0.0.1:1080/"),
            ("http://[::1]/x", 80, "http://[::1]:80/x"),
        ];
        for (uri, port, expected) in cases {
            assert_eq!(with_port(uri.parse().unwrap(), port).to_string(), expected);
        }
    }
}
