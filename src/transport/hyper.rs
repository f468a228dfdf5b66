//! [`HyperTransport`]: real HTTP straight over hyper-util's pooled client,
//! with rustls and its `ring` crypto provider.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioExecutor;

use super::body::{self, read_body, BodyBudget};
use super::classify::classify;
use super::proxy::{self, ProxyConnector};
use super::redirect::{self, Hop};
use super::{without_query, CredentialScope, Prepared, Transport};
use crate::error::{BuildError, TransportError, TransportErrorKind};

type Pool = hyper_util::client::legacy::Client<HttpsConnector<ProxyConnector>, Full<Bytes>>;

/// Sends requests with hyper-util's pooled client and reads bodies up to a
/// cap: the request the pipeline built goes out as it is.
///
/// [`ReqwestTransport`](crate::ReqwestTransport) rebuilds every request as
/// reqwest's own, which parses its URL twice more and copies its headers
/// twice, before handing it to this same hyper-util client. This transport
/// skips all of that: a pipeline over it spends about two thirds of the
/// instructions per request of a hand-written reqwest loop, and outruns it
/// on a current-thread runtime; on a multi-thread one they are about level
/// (see the README's Performance section). What it leaves out is what
/// reqwest adds around the pool beyond proxies: no cookie store, no SOCKS4
/// proxies. Where you need those, use
/// `ReqwestTransport`; everything above the transport (limits, pauses,
/// retries, timeouts, credentials, caps) is the same.
///
/// `HyperTransport::new()` is ready to use: connection pooling, rustls
/// checking certificates against the system's roots (the same verifier
/// reqwest uses), HTTP/1.1, and HTTP/2 where the server offers it over TLS.
/// Plain `http://` is HTTP/1.1. For your own roots or client certificates,
/// hand a rustls config to [`with_tls_config`](Self::with_tls_config).
///
/// # Proxies
///
/// As reqwest does, it reads `HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY` and
/// `NO_PROXY` (and their lowercase forms) when it is made; where none of
/// them names a proxy, the system's proxy settings on macOS and Windows.
/// A proxy URL's credentials end at its last `@`, as browsers, curl and
/// reqwest read them (`http://me@corp:pw@proxy:3128` is user `me@corp`).
/// An `https://` target goes through
/// a `CONNECT` tunnel, TLS inside it, so the proxy sees neither request
/// nor headers; an `http://` target is sent to the proxy in absolute form.
/// A SOCKS5 proxy (`socks5://`, names resolved here, or `socks5h://`,
/// names resolved by the proxy) tunnels every target. The proxy's
/// credentials (`http://user:password@proxy:3128`) go to the proxy alone:
/// in the tunnel's `CONNECT` or SOCKS handshake, or in a
/// `Proxy-Authorization` header on a plain-`http` request, set again on
/// each redirect hop only if that hop goes through the proxy too. They
/// appear in no error and no `Debug`. An `https://` proxy is spoken to
/// over TLS, checked against the same roots as the origins. A SOCKS4 proxy
/// is not spoken to: a target whose proxy it is fails to connect with an
/// error that says so, rather than going out directly. Userinfo in a
/// request's own target (a hand-built request, a `Location`) is never
/// sent, to a proxy or an origin.
/// [`proxy`](Self::proxy) names one proxy for every request;
/// [`no_proxy`](Self::no_proxy) sends every request direct.
///
/// # Redirects and credentials
///
/// As `ReqwestTransport`: the transport follows redirects itself (up to
/// [`max_redirects`](Self::max_redirects)), and on a hop to another scheme,
/// host or port every header marked secret and every default header of the
/// client is dropped, unless the client
/// [trusts](crate::ClientBuilder::trust_origin) that origin.
///
/// # Memory
///
/// As `ReqwestTransport`: a body is read frame by frame under a cap
/// ([`max_body_bytes`](Self::max_body_bytes)), refused before any of it is
/// read when its `Content-Length` is over the cap, and all bodies being
/// read share one [budget](Self::max_body_bytes_in_flight), which counts
/// what they hold as their bytes arrive, never what they announce.
///
/// # Errors
///
/// A [`TransportError`]: `Connect` when no connection could be made
/// (refused, unknown host, TLS refused), `Reset` when one broke
/// mid-exchange, `BodyTooLarge` from the cap, `InvalidRequest` for a
/// request whose URI is not an absolute `http` or `https` URL or a
/// redirect that cannot be followed, `Other` past the redirect limit.
/// Messages name the URL without its query; hyper's error is the
/// [`source`](std::error::Error::source).
///
/// Clones share the pool and the body budget.
///
/// # Example
///
/// ```
/// # #[cfg(feature = "demo")]
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use sluicegate::demo::{DemoConfig, DemoServer};
/// use sluicegate::prelude::*;
/// use sluicegate::HyperTransport;
///
/// let server = DemoServer::start(DemoConfig::default().items(3)).await?;
/// let client = Client::builder()
///     .transport(HyperTransport::new().max_body_bytes(1 << 20))
///     .base_url(server.url())
///     .build()?;
/// let ids: Vec<u64> = stream::iter([()])
///     .fetch_concurrent(1, client.get(|_: &()| "/items"))
///     .flat_unpack::<u64>()
///     .try_collect()
///     .await?;
/// assert_eq!(ids, [0, 1, 2]);
/// # Ok(())
/// # }
/// # #[cfg(not(feature = "demo"))]
/// # fn main() {}
/// ```
#[derive(Clone)]
pub struct HyperTransport {
    pool: Pool,
    /// The pool's connector, for the proxy's credentials on plain-`http`
    /// requests.
    connector: ProxyConnector,
    /// Kept to build the pool again when the proxies change.
    tls: rustls::ClientConfig,
    max_body_bytes: usize,
    max_redirects: usize,
    budget: BodyBudget,
}

impl HyperTransport {
    /// The default number of redirects followed: 10.
    pub const DEFAULT_MAX_REDIRECTS: usize = 10;

    /// The default budget for body bytes being read at once, all requests
    /// of the transport together: 64 MiB, four bodies at the default cap.
    pub const DEFAULT_MAX_BODY_BYTES_IN_FLIGHT: usize = body::DEFAULT_MAX_BODY_BYTES_IN_FLIGHT;

    /// The default body cap: 16 MiB.
    pub const DEFAULT_MAX_BODY_BYTES: usize = body::DEFAULT_MAX_BODY_BYTES;

    /// A transport whose TLS checks certificates against the system's roots
    /// (with `rustls-platform-verifier`), over rustls' `ring` provider. The
    /// process's default rustls provider is neither read nor installed.
    ///
    /// # Panics
    ///
    /// If the platform's verifier cannot start (as `reqwest::Client::new()`
    /// does). [`with_tls_config`](Self::with_tls_config) cannot panic.
    pub fn new() -> Self {
        use rustls_platform_verifier::BuilderVerifierExt;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|builder| builder.with_platform_verifier())
            .expect("the platform's certificate verifier starts")
            .with_no_client_auth();
        Self::with_tls_config(config)
    }

    /// A transport whose TLS is `config`: your own roots, client
    /// certificates or crypto provider. Its ALPN protocols are replaced by
    /// HTTP/2 and HTTP/1.1.
    pub fn with_tls_config(config: rustls::ClientConfig) -> Self {
        let (pool, connector) = pool(config.clone(), Some(proxy::from_environment()));
        Self {
            pool,
            connector,
            tls: config,
            max_body_bytes: Self::DEFAULT_MAX_BODY_BYTES,
            max_redirects: Self::DEFAULT_MAX_REDIRECTS,
            budget: BodyBudget::new(Self::DEFAULT_MAX_BODY_BYTES_IN_FLIGHT),
        }
    }

    /// Sends every request through the proxy at `url` (`http://`,
    /// `https://`, `socks5://` or `socks5h://`), whatever the environment
    /// says.
    /// Credentials in its userinfo (`http://user:password@proxy:3128`,
    /// percent-encoded) go to the proxy alone.
    ///
    /// # Errors
    ///
    /// When `url` is not an absolute URL of one of those schemes. The
    /// message does not repeat `url`, which may hold a password.
    ///
    /// # Example
    ///
    /// ```
    /// use sluicegate::HyperTransport;
    ///
    /// let transport = HyperTransport::new().proxy("http://user:s%40cret@127.0.0.1:3128")?;
    /// // What it shows of the proxy has no credentials.
    /// assert!(!format!("{transport:?}").contains("cret"));
    /// assert!(HyperTransport::new().proxy("socks4://127.0.0.1:1080").is_err());
    /// # Ok::<(), sluicegate::BuildError>(())
    /// ```
    pub fn proxy(self, url: &str) -> Result<Self, BuildError> {
        let parsed =
            url::Url::parse(url).map_err(|_| BuildError::new("the proxy URL does not parse"))?;
        let spoken = matches!(parsed.scheme(), "http" | "https" | "socks5" | "socks5h");
        if !spoken || parsed.host_str().is_none() {
            return Err(BuildError::new(
                "the proxy URL is not an absolute http://, https://, socks5:// or socks5h:// URL \
                 (SOCKS4 proxies need ReqwestTransport)",
            ));
        }
        let proxies = Matcher::builder().all(proxy::unambiguous(url)).build();
        if parsed.scheme().starts_with("socks") {
            // The credentials as the handshake will send them (decoded).
            let any: Uri = Uri::from_static("http://any.invalid/");
            if let Some((user, password)) =
                proxies.intercept(&any).as_ref().and_then(|i| i.raw_auth())
            {
                if let Some(unfit) = proxy::socks_credentials_unfit(user, password) {
                    return Err(BuildError::new(unfit));
                }
            }
        }
        Ok(self.with_proxies(Some(proxies)))
    }

    /// Sends every request straight to its target, whatever the
    /// environment says.
    pub fn no_proxy(self) -> Self {
        self.with_proxies(None)
    }

    fn with_proxies(self, proxies: Option<Matcher>) -> Self {
        let (pool, connector) = pool(self.tls.clone(), proxies);
        Self {
            pool,
            connector,
            ..self
        }
    }

    /// Caps the bytes of response bodies that this transport and its
    /// clones hold while reading them, all requests together (default
    /// [`DEFAULT_MAX_BODY_BYTES_IN_FLIGHT`](Self::DEFAULT_MAX_BODY_BYTES_IN_FLIGHT)).
    /// What counts is what a body holds as its bytes arrive, never the
    /// length it announces; a read waits (inside its attempt's timeout)
    /// only when bytes it has received do not fit (see
    /// [`ReqwestTransport`](crate::ReqwestTransport#memory), read the same
    /// way). A budget below the body cap lets one body at a time take it
    /// whole.
    pub fn max_body_bytes_in_flight(mut self, max: usize) -> Self {
        self.budget = BodyBudget::new(max);
        self
    }

    /// Follows at most `max` redirects per request (0: hand every redirect
    /// response back as it is).
    pub fn max_redirects(mut self, max: usize) -> Self {
        self.max_redirects = max;
        self
    }

    /// Sets the largest body, in bytes, that a response may have.
    pub fn max_body_bytes(mut self, max: usize) -> Self {
        self.max_body_bytes = max;
        self
    }

    /// Sends `request` and each redirect it leads to, with the credential
    /// scope the client prepared for it, if any.
    fn dispatch(
        &self,
        request: Request<Bytes>,
        scope: Option<Arc<CredentialScope>>,
    ) -> BoxFuture<'static, Result<Response<Bytes>, TransportError>> {
        let pool = self.pool.clone();
        let connector = self.connector.clone();
        let (max, max_redirects) = (self.max_body_bytes, self.max_redirects);
        let budget = self.budget.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            if !matches!(parts.uri.scheme_str(), Some("http" | "https"))
                || parts.uri.authority().is_none()
            {
                return Err(TransportError::new(
                    TransportErrorKind::InvalidRequest,
                    format!(
                        "not an absolute http or https URL: {}",
                        without_query(&parts.uri)
                    ),
                ));
            }
            let hop = Hop {
                method: parts.method,
                target: parts.uri,
                headers: parts.headers,
                version: parts.version,
                body,
            };
            let send = |hop: &Hop<Uri>| {
                let mut request = Request::new(Full::new(hop.body.clone()));
                *request.method_mut() = hop.method.clone();
                *request.uri_mut() = without_userinfo(&hop.target);
                *request.version_mut() = hop.version;
                *request.headers_mut() = hop.headers.clone();
                if let Some(mut auth) = connector.authorization(&hop.target) {
                    auth.set_sensitive(true);
                    request
                        .headers_mut()
                        .entry(http::header::PROXY_AUTHORIZATION)
                        .or_insert(auth);
                }
                let sent = pool.request(request);
                let target = hop.target.clone();
                async move {
                    sent.await
                        .map_err(|e| classify(Box::new(e), &without_query(&target)))
                }
            };
            let (response, target) =
                redirect::follow(hop, scope.as_deref(), max_redirects, send).await?;
            let (parts, body) = response.into_parts();
            let body = read_body(
                body,
                max,
                &budget,
                &|| without_query(&target),
                |e, target| classify(Box::new(e), target),
            )
            .await?;
            Ok(Response::from_parts(parts, body))
        })
    }
}

/// `target` as it may be sent: without userinfo (RFC 9110, 4.2.4), which
/// an origin-form request line leaves out anyway but an absolute-form one,
/// to a proxy, would carry.
fn without_userinfo(target: &Uri) -> Uri {
    let Some(authority) = target.authority() else {
        return target.clone();
    };
    let Some((_, host_port)) = authority.as_str().rsplit_once('@') else {
        return target.clone();
    };
    let mut parts = target.clone().into_parts();
    parts.authority = host_port.parse().ok();
    Uri::from_parts(parts).unwrap_or_else(|_| target.clone())
}

/// hyper-util's pooled client over `proxies`, speaking TLS with `tls`, and
/// its connector.
fn pool(tls: rustls::ClientConfig, proxies: Option<Matcher>) -> (Pool, ProxyConnector) {
    let mut http = HttpConnector::new();
    // `https://` goes through the same connector, wrapped in TLS.
    http.enforce_http(false);
    http.set_nodelay(true);
    let connector = ProxyConnector::new(http, tls.clone(), proxies);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(connector.clone());
    let pool = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(https);
    (pool, connector)
}

impl Default for HyperTransport {
    /// [`HyperTransport::new`].
    ///
    /// # Panics
    ///
    /// As [`new`](HyperTransport::new).
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for HyperTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HyperTransport")
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_redirects", &self.max_redirects)
            .field("max_body_bytes_in_flight", &self.budget.bytes())
            .field("proxies", &self.connector)
            .finish_non_exhaustive()
    }
}

impl Transport for HyperTransport {
    /// A request handed on by a transport of the user's, or built by hand:
    /// what the client prepared for it, if anything, is in its extensions.
    fn send(
        &self,
        mut request: Request<Bytes>,
    ) -> BoxFuture<'static, Result<Response<Bytes>, TransportError>> {
        let prepared = request.extensions_mut().remove::<Prepared>();
        self.dispatch(request, prepared.map(|p| p.scope))
    }

    fn send_prepared(
        &self,
        request: Request<Bytes>,
        prepared: Prepared,
    ) -> BoxFuture<'static, Result<Response<Bytes>, TransportError>> {
        self.dispatch(request, Some(prepared.scope))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_target_that_is_not_an_absolute_http_url_is_refused_before_sending() {
        let transport = HyperTransport::new();
        for target in ["/relative?key=SECRET", "ftp://127.0.0.1/f?key=SECRET"] {
            let request = Request::get(target).body(Bytes::new()).unwrap();
            let error = transport.send(request).await.unwrap_err();
            assert_eq!(error.kind(), TransportErrorKind::InvalidRequest, "{target}");
            assert!(!error.to_string().contains("SECRET"), "{error}");
        }
    }
}
