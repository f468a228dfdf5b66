//! [`ReqwestTransport`]: real HTTP over reqwest 0.13, with rustls and its
//! `ring` crypto provider.
//!
//! Why reqwest is built with `rustls-no-provider` and rustls with `ring`:
//! see "TLS" in [`ReqwestTransport`]'s docs.

use std::error::Error as StdError;
use std::fmt;
use std::io;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::header::{HeaderValue, LOCATION};
use http::{Request, Response, StatusCode};

use super::body::{self, read_capped, BodyBudget};
use super::redirect::{self, Answer, Hop};
use super::Transport;
use super::{url_without_query, without_query};
use crate::error::{TransportError, TransportErrorKind};
use crate::transport::Prepared;

/// Sends requests with a [`reqwest::Client`] and reads bodies up to a cap.
///
/// [`ReqwestTransport::default()`] is a ready transport: rustls with the
/// system's roots, connection pooling, HTTP/1.1 and HTTP/2 (negotiated over
/// TLS), no redirects left to reqwest. For proxies, your own TLS roots,
/// cookies or pool settings, configure a
/// [`client_builder`](Self::client_builder) and hand the client to
/// [`new`](Self::new).
///
/// # TLS: rustls with `ring`, no cmake
///
/// reqwest 0.13's default TLS is rustls with the aws-lc-rs provider, whose
/// `aws-lc-sys` needs cmake and a C toolchain to build. This crate asks
/// reqwest for `rustls-no-provider` (rustls, with certificates checked by
/// `rustls-platform-verifier` against the system's roots, and no crypto
/// built in) and depends on rustls with its `ring` provider, which builds
/// with Rust and the C compiler `cc` finds, no cmake. So `cargo build`
/// works on a fresh machine, and `cargo tree -i aws-lc-sys` finds nothing.
///
/// With `rustls-no-provider`, reqwest panics when a client is built while
/// no rustls provider is installed for the process. So
/// [`ReqwestTransport::default`] and [`ReqwestTransport::client_builder`]
/// install `ring` as the process's default provider, once, **if no
/// provider is installed yet**: an application that installs its own first
/// (aws-lc-rs, say, or a FIPS one) keeps it. A reqwest client built some
/// other way, before either is called, needs a provider installed by its
/// application (`rustls::crypto::ring::default_provider().install_default()`).
///
/// An application that depends on reqwest with reqwest's default features
/// (a plain `cargo add reqwest`) turns reqwest's `rustls` feature on for the
/// whole build, aws-lc-rs included. That works too (it is the same reqwest
/// 0.13, so the same `reqwest::Client`) but needs cmake again; with
/// `default-features = false` and `http2` it does not. `sluicegate::reqwest`
/// is this crate's reqwest, so no dependency of your own is needed.
///
/// # Memory
///
/// The cap ([`max_body_bytes`](Self::max_body_bytes)) is enforced while
/// reading: a body that announces a larger `Content-Length` is refused
/// before any of it is read, and a body without one is read chunk by chunk
/// and refused as soon as it passes the cap. No buffer is ever allocated
/// past the cap, nor past the announced length: a body that arrives in one
/// chunk is that chunk, a longer one is copied into a buffer that doubles
/// as its bytes come, and is cut to its length at the end if none was
/// announced.
///
/// The cap bounds one response; a budget
/// ([`max_body_bytes_in_flight`](Self::max_body_bytes_in_flight)) bounds
/// them all. It counts the memory bodies hold, as their bytes arrive, not
/// what they announce: a body's buffer grows only once the budget has
/// room for its new size, and the read waits for that room with the bytes
/// that did not fit in hand. So a server that announces a large body and
/// then sends nothing holds none of the budget, and one that stalls half
/// way holds what it sent. However many requests are in flight, the
/// bodies being read hold at most the budget, plus one chunk per body
/// that is not counted (its first, or the one waiting for room; at most
/// what hyper reads off the connection at once). A body that arrives
/// whole in one chunk (most small ones) is neither copied nor counted.
///
/// Bodies waiting for room never wait for each other in a circle: room is
/// granted only while every body holding part of the budget could still
/// be read to its end, one after the other, from what is left, counting a
/// body of unknown length as one that may reach the cap. A budget below
/// the cap lets one body at a time take it whole (that body alone may hold
/// more than the budget), and holds back other bodies that might need it
/// all, of unknown length say, until that one is done. A body handed to
/// the pipeline no longer counts: what it holds downstream is bounded by
/// the stages' concurrency.
///
/// # Redirects and credentials
///
/// The transport follows redirects itself (up to
/// [`max_redirects`](Self::max_redirects)), so that credentials stay at
/// their origin: on a hop to another scheme, host or port, every header
/// marked secret (`Authorization`, `Cookie`, and whatever
/// [`ClientBuilder::redact_header`](crate::ClientBuilder::redact_header)
/// names) and every default header of the client is dropped, unless the
/// client [trusts](crate::ClientBuilder::trust_origin) that origin. reqwest
/// itself would only drop its own short list, so the reqwest client must
/// not follow redirects: see [`new`](Self::new).
///
/// # Errors
///
/// A [`TransportError`]: `Connect`, `Reset` and `Timeout` from reqwest's
/// own failures, `BodyTooLarge` from the cap, `InvalidRequest` for a
/// request reqwest cannot send or a reqwest client that followed a
/// redirect itself. Messages name the URL without its query; reqwest's
/// error, without its URL, is the [`source`](std::error::Error::source).
///
/// Clones share the reqwest client (and so its connection pool) and the
/// body budget.
#[derive(Clone)]
pub struct ReqwestTransport {
    client: reqwest::Client,
    max_body_bytes: usize,
    max_redirects: usize,
    budget: BodyBudget,
}

impl ReqwestTransport {
    /// The default number of redirects followed: 10.
    pub const DEFAULT_MAX_REDIRECTS: usize = 10;

    /// The default budget for body bytes being read at once, all requests
    /// of the transport together: 64 MiB, four bodies at the default cap.
    pub const DEFAULT_MAX_BODY_BYTES_IN_FLIGHT: usize = body::DEFAULT_MAX_BODY_BYTES_IN_FLIGHT;

    /// The default body cap: 16 MiB.
    pub const DEFAULT_MAX_BODY_BYTES: usize = body::DEFAULT_MAX_BODY_BYTES;

    /// A reqwest client builder to configure and hand to [`new`](Self::new):
    /// redirects off (the transport follows them, see below), and rustls
    /// ready with its `ring` provider.
    ///
    /// Installs `ring` as the process's default rustls provider if none is
    /// installed yet (see [TLS](Self#tls-rustls-with-ring-no-cmake)),
    /// so the builder's `build()` cannot panic for want of one. Everything
    /// else is reqwest's own [`ClientBuilder`](reqwest::ClientBuilder):
    /// proxies (`proxy`, `no_proxy`; `HTTP_PROXY`/`HTTPS_PROXY` are read by
    /// default), TLS roots (`tls_certs_merge`, `tls_certs_only`), HTTP/2
    /// (`http2_prior_knowledge`, or negotiated over TLS by default),
    /// cookies (`cookie_provider` with a store of your own; the `cookies`
    /// feature of reqwest for `cookie_store`), timeouts and pool settings.
    ///
    /// Keep `redirect` as it is: a reqwest client that follows redirects
    /// itself forwards custom secret headers (an `X-Api-Key`, say) across
    /// origins. The transport refuses a response it sees reqwest got
    /// through a redirect.
    ///
    /// # Example
    ///
    /// A client through a proxy, with a 5 s connect timeout, against a
    /// server on `127.0.0.1`:
    ///
    /// ```
    /// # #[cfg(feature = "demo")]
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use sluicegate::demo::{DemoConfig, DemoServer};
    /// use sluicegate::prelude::*;
    /// use sluicegate::reqwest; // this crate's reqwest: no second version to match
    ///
    /// let server = DemoServer::start(DemoConfig::default().items(3)).await?;
    /// let http = ReqwestTransport::client_builder()
    ///     .connect_timeout(Duration::from_secs(5))
    ///     .no_proxy() // or .proxy(reqwest::Proxy::https("http://proxy.internal:3128")?)
    ///     .user_agent("my-etl/1.0")
    ///     .build()?;
    /// let client = Client::builder()
    ///     .transport(ReqwestTransport::new(http).max_body_bytes(1 << 20))
    ///     .base_url(server.url())
    ///     .build()?;
    /// let ids: Vec<u64> = stream::iter([()])
    ///     .fetch_concurrent(1, client.get(|_: &()| "/items"))
    ///     .flat_unpack::<u64>()
    ///     .try_collect()
    ///     .await?;
    /// assert_eq!(ids, [0, 1, 2]);
    /// # let _ = reqwest::redirect::Policy::none();
    /// # Ok(())
    /// # }
    /// # #[cfg(not(feature = "demo"))]
    /// # fn main() {}
    /// ```
    pub fn client_builder() -> reqwest::ClientBuilder {
        install_ring_if_none();
        reqwest::Client::builder().redirect(reqwest::redirect::Policy::none())
    }

    /// Wraps a configured reqwest client, with the default body cap, budget
    /// and redirect limit.
    ///
    /// Build the client from [`client_builder`](Self::client_builder), or
    /// at least with `redirect(reqwest::redirect::Policy::none())`: the
    /// transport follows redirects itself so that secrets stay at their
    /// origin, and a client that follows them first would send custom
    /// secret headers to wherever a server points. A response that reqwest
    /// reached through a redirect is refused with an `InvalidRequest` error
    /// that says so.
    ///
    /// ```
    /// # #[cfg(feature = "demo")]
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use sluicegate::demo::{DemoConfig, DemoServer};
    /// use sluicegate::prelude::*;
    /// use sluicegate::reqwest::{self, redirect};
    ///
    /// let server = DemoServer::start(DemoConfig::default().items(1)).await?;
    /// // An existing client: redirects must be off, and a rustls provider
    /// // installed (client_builder() does both).
    /// let http = ReqwestTransport::client_builder()
    ///     .redirect(redirect::Policy::none())
    ///     .http1_only()
    ///     .build()?;
    /// let transport = ReqwestTransport::new(http);
    /// let client = Client::builder().transport(transport).base_url(server.url()).build()?;
    /// let fetched = client.get(|id: &u64| format!("/items/{id}")).fetch(0).await?;
    /// assert_eq!(fetched.response.status(), StatusCode::OK);
    /// # let _: reqwest::Client;
    /// # Ok(())
    /// # }
    /// # #[cfg(not(feature = "demo"))]
    /// # fn main() {}
    /// ```
    pub fn new(client: reqwest::Client) -> Self {
        Self {
            client,
            max_body_bytes: Self::DEFAULT_MAX_BODY_BYTES,
            max_redirects: Self::DEFAULT_MAX_REDIRECTS,
            budget: BodyBudget::new(Self::DEFAULT_MAX_BODY_BYTES_IN_FLIGHT),
        }
    }

    /// Caps the bytes of response bodies that this transport and its
    /// clones hold while reading them, all requests together (default
    /// [`DEFAULT_MAX_BODY_BYTES_IN_FLIGHT`](Self::DEFAULT_MAX_BODY_BYTES_IN_FLIGHT)).
    /// What counts is what a body holds as its bytes arrive, never the
    /// length it announces; a read waits (inside its attempt's timeout)
    /// only when bytes it has received do not fit. See
    /// [Memory](Self#memory). A budget below the body cap lets one body at
    /// a time take it whole.
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

    /// The underlying reqwest client.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }
}

impl Default for ReqwestTransport {
    /// A transport over a reqwest client from
    /// [`client_builder`](ReqwestTransport::client_builder), unchanged.
    ///
    /// # Panics
    ///
    /// As `reqwest::Client::new()` does, if the TLS backend cannot start
    /// (for example, no system roots can be read).
    fn default() -> Self {
        let client = Self::client_builder()
            .build()
            .expect("the TLS backend starts");
        Self::new(client)
    }
}

/// Installs rustls' `ring` provider as the process default unless one is
/// installed already, so that a reqwest client built with
/// `rustls-no-provider` has one and an application's own choice stands.
fn install_ring_if_none() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another installer is fine: either way one
        // provider is installed, which is all reqwest needs.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

impl fmt::Debug for ReqwestTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReqwestTransport")
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_redirects", &self.max_redirects)
            .field("max_body_bytes_in_flight", &self.budget.bytes())
            .finish_non_exhaustive()
    }
}

impl Transport for ReqwestTransport {
    fn wants_parsed_url(&self) -> bool {
        true
    }

    /// A request handed on by a transport of the user's, or built by hand:
    /// what the client prepared for it, if anything, is in its extensions.
    fn send(
        &self,
        mut request: Request<Bytes>,
    ) -> BoxFuture<'static, Result<Response<Bytes>, TransportError>> {
        let prepared = request.extensions_mut().remove::<Prepared>();
        self.dispatch(request, prepared)
    }

    fn send_prepared(
        &self,
        request: Request<Bytes>,
        prepared: Prepared,
    ) -> BoxFuture<'static, Result<Response<Bytes>, TransportError>> {
        self.dispatch(request, Some(prepared))
    }
}

impl ReqwestTransport {
    /// Sends `request`, with the credential scope and parsed URL the
    /// client prepared for it, if any.
    fn dispatch(
        &self,
        request: Request<Bytes>,
        prepared: Option<Prepared>,
    ) -> BoxFuture<'static, Result<Response<Bytes>, TransportError>> {
        let client = self.client.clone();
        let max = self.max_body_bytes;
        let max_redirects = self.max_redirects;
        let budget = self.budget.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let (scope, url) = match prepared {
                // The URL the client parsed, unless something between it and
                // here changed the URI.
                Some(Prepared {
                    scope,
                    url: Some(url),
                }) if names(&url, &parts.uri) => (Some(scope), *url),
                prepared => {
                    let url = url::Url::parse(&parts.uri.to_string()).map_err(|e| {
                        TransportError::new(
                            TransportErrorKind::InvalidRequest,
                            without_query(&parts.uri),
                        )
                        .with_source(e)
                    })?;
                    (prepared.map(|p| p.scope), url)
                }
            };
            let hop = Hop {
                method: parts.method,
                target: url,
                headers: parts.headers,
                version: parts.version,
                body,
            };
            let send = |hop: &Hop<url::Url>| {
                let mut request = reqwest::Request::new(hop.method.clone(), hop.target.clone());
                *request.headers_mut() = hop.headers.clone();
                *request.body_mut() = Some(hop.body.clone().into());
                *request.version_mut() = hop.version;
                let url = hop.target.clone();
                let sent = client.execute(request);
                async move {
                    let response = sent
                        .await
                        .map_err(|e| classify(e, &url_without_query(&url)))?;
                    if *response.url() != url {
                        // The reqwest client followed a redirect itself, past
                        // the credential checks: say so rather than carry on.
                        return Err(followed_by_the_client(&url_without_query(&url)));
                    }
                    Ok(response)
                }
            };
            let (response, url) =
                redirect::follow(hop, scope.as_deref(), max_redirects, send).await?;
            read_whole(response, max, &budget, &|| url_without_query(&url)).await
        })
    }
}

impl Answer for reqwest::Response {
    fn status(&self) -> StatusCode {
        self.status()
    }

    fn location(&self) -> Option<&HeaderValue> {
        self.headers().get(LOCATION)
    }
}

/// Whether `url` names exactly the target `uri` does, compared part by
/// part without rendering either.
fn names(url: &url::Url, uri: &http::Uri) -> bool {
    use url::Position;
    uri.scheme_str() == Some(url.scheme())
        && uri.authority().map(|a| a.as_str())
            == Some(&url[Position::BeforeUsername..Position::AfterPort])
        && uri.path_and_query().map(|p| p.as_str())
            == Some(&url[Position::BeforePath..Position::AfterQuery])
}

/// Reads the whole body of `response` under the cap and the budget (see
/// [`read_capped`]), keeping its status, version and headers.
async fn read_whole(
    mut response: reqwest::Response,
    max: usize,
    budget: &BodyBudget,
    target: &(dyn Fn() -> String + Sync),
) -> Result<Response<Bytes>, TransportError> {
    let announced = response.content_length();
    let status = response.status();
    let version = response.version();
    let headers = std::mem::take(response.headers_mut());
    let chunks = futures::stream::try_unfold(response, |mut response| async move {
        let chunk = response.chunk().await.map_err(|e| classify(e, &target()))?;
        Ok(chunk.map(|chunk| (chunk, response)))
    });
    let body = read_capped(announced, chunks, max, budget, target).await?;
    let mut out = Response::new(body);
    *out.status_mut() = status;
    *out.version_mut() = version;
    *out.headers_mut() = headers;
    Ok(out)
}

fn followed_by_the_client(target: &str) -> TransportError {
    TransportError::new(
        TransportErrorKind::InvalidRequest,
        format!(
            "the reqwest client followed a redirect from {target} itself, where secret headers \
             are not checked; build it with `redirect(reqwest::redirect::Policy::none())` \
             (ReqwestTransport::client_builder does) and let the transport follow redirects"
        ),
    )
}

fn classify(error: reqwest::Error, target: &str) -> TransportError {
    let kind = if error.is_timeout() {
        TransportErrorKind::Timeout
    } else if error.is_connect() {
        TransportErrorKind::Connect
    } else if error.is_builder() {
        TransportErrorKind::InvalidRequest
    } else if is_reset(&error) {
        TransportErrorKind::Reset
    } else {
        TransportErrorKind::Other
    };
    let message = if error.is_redirect() {
        format!("too many redirects (or a redirect loop) from {target}")
    } else {
        target.to_owned()
    };
    // reqwest's error names the URL, query (and its keys) included.
    TransportError::new(kind, message).with_source(error.without_url())
}

/// Whether a connection broke mid-exchange, looking through the source
/// chain because reqwest reports resets as generic request or body errors.
fn is_reset(error: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn StdError + 'static)> = error.source();
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            ) {
                return true;
            }
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
                return true;
            }
        }
        source = e.source();
    }
    false
}
