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
use hyper_util::rt::TokioExecutor;

use super::body::{self, read_body, BodyBudget};
use super::classify::classify;
use super::redirect::{self, Hop};
use super::{without_query, CredentialScope, Prepared, Transport};
use crate::error::{TransportError, TransportErrorKind};

type Pool = hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

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
/// reqwest adds around the pool: **no proxy support** (`HTTP_PROXY` and the
/// like are not read), no cookie store, no decompression. Where you need
/// those, use `ReqwestTransport`; everything above the transport (limits,
/// pauses, retries, timeouts, credentials, caps) is the same.
///
/// `HyperTransport::new()` is ready to use: connection pooling, rustls
/// checking certificates against the system's roots (the same verifier
/// reqwest uses), HTTP/1.1, and HTTP/2 where the server offers it over TLS.
/// Plain `http://` is HTTP/1.1. For your own roots or client certificates,
/// hand a rustls config to [`with_tls_config`](Self::with_tls_config).
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
/// read share one [budget](Self::max_body_bytes_in_flight).
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
        let mut http = HttpConnector::new();
        // `https://` goes through the same connector, wrapped in TLS.
        http.enforce_http(false);
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        Self {
            pool: hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(https),
            max_body_bytes: Self::DEFAULT_MAX_BODY_BYTES,
            max_redirects: Self::DEFAULT_MAX_REDIRECTS,
            budget: BodyBudget::new(Self::DEFAULT_MAX_BODY_BYTES_IN_FLIGHT),
        }
    }

    /// Caps the bytes of response bodies that this transport and its
    /// clones hold while reading them, all requests together (default
    /// [`DEFAULT_MAX_BODY_BYTES_IN_FLIGHT`](Self::DEFAULT_MAX_BODY_BYTES_IN_FLIGHT)).
    /// A read waits (inside its attempt's timeout) until its share is free.
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
                *request.uri_mut() = hop.target.clone();
                *request.version_mut() = hop.version;
                *request.headers_mut() = hop.headers.clone();
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
