//! [`ReqwestTransport`]: real HTTP over reqwest (rustls, no OpenSSL).

use std::error::Error as StdError;
use std::fmt;
use std::io;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use http::header::{
    HeaderName, AUTHORIZATION, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, COOKIE, LOCATION,
    PROXY_AUTHORIZATION, TRANSFER_ENCODING, WWW_AUTHENTICATE,
};
use http::{HeaderMap, Method, Request, Response, StatusCode};

use super::Transport;
use crate::client::CredentialScope;
use crate::error::{TransportError, TransportErrorKind};

/// Sends requests with a [`reqwest::Client`] and reads bodies up to a cap.
///
/// The cap is enforced while reading: a body that announces a larger
/// `Content-Length` is refused before any of it is read, and a body without
/// one is read chunk by chunk and refused as soon as it passes the cap, so a
/// hostile server cannot make the pipeline buffer more than the cap.
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
/// itself would only drop its own short list. A reqwest client given to
/// [`new`](Self::new) should therefore be built with
/// `redirect(reqwest::redirect::Policy::none())`, as below; one that
/// follows redirects itself forwards custom secret headers across origins.
///
/// Clones share the reqwest client and so its connection pool.
///
/// ```no_run
/// use std::time::Duration;
/// use sluicegate::ReqwestTransport;
///
/// let http = reqwest::Client::builder()
///     .connect_timeout(Duration::from_secs(5))
///     .redirect(reqwest::redirect::Policy::none())
///     .build()
///     .unwrap();
/// let transport = ReqwestTransport::new(http).max_body_bytes(1 << 20);
/// ```
#[derive(Clone)]
pub struct ReqwestTransport {
    client: reqwest::Client,
    max_body_bytes: usize,
    max_redirects: usize,
}

impl ReqwestTransport {
    /// The default number of redirects followed: 10.
    pub const DEFAULT_MAX_REDIRECTS: usize = 10;

    /// The default body cap: 16 MiB.
    pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

    /// Wraps a configured reqwest client, with the default body cap.
    pub fn new(client: reqwest::Client) -> Self {
        Self {
            client,
            max_body_bytes: Self::DEFAULT_MAX_BODY_BYTES,
            max_redirects: Self::DEFAULT_MAX_REDIRECTS,
        }
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
    /// A transport over a default reqwest client that leaves redirects to
    /// the transport (see [`ReqwestTransport::new`]).
    ///
    /// # Panics
    ///
    /// As `reqwest::Client::new()` does, if the TLS backend cannot start.
    fn default() -> Self {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("the TLS backend starts");
        Self::new(client)
    }
}

impl fmt::Debug for ReqwestTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReqwestTransport")
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_redirects", &self.max_redirects)
            .finish_non_exhaustive()
    }
}

impl Transport for ReqwestTransport {
    fn send(
        &self,
        request: Request<Bytes>,
    ) -> BoxFuture<'static, Result<Response<Bytes>, TransportError>> {
        let client = self.client.clone();
        let max = self.max_body_bytes;
        let max_redirects = self.max_redirects;
        Box::pin(async move {
            let scope = request.extensions().get::<CredentialScope>().cloned();
            let (parts, mut body) = request.into_parts();
            let (mut method, mut uri, mut headers, version) =
                (parts.method, parts.uri, parts.headers, parts.version);
            let mut hops = 0;
            loop {
                // Keep the URI (cheap: shared bytes) and render it only for an error.
                let target = || without_query(&uri);
                let mut request = Request::new(body.clone());
                *request.method_mut() = method.clone();
                *request.uri_mut() = uri.clone();
                *request.headers_mut() = headers.clone();
                *request.version_mut() = version;
                let request = reqwest::Request::try_from(request).map_err(|e| {
                    TransportError::new(TransportErrorKind::InvalidRequest, target())
                        .with_source(e.without_url())
                })?;
                let response = client
                    .execute(request)
                    .await
                    .map_err(|e| classify(e, &target()))?;
                let Some(next) = redirect_target(&response, &uri) else {
                    return read_whole(response, max, &target()).await;
                };
                if hops >= max_redirects {
                    if max_redirects == 0 {
                        return read_whole(response, max, &target()).await;
                    }
                    return Err(TransportError::new(
                        TransportErrorKind::Other,
                        format!(
                            "too many redirects (more than {max_redirects}) from {}",
                            target()
                        ),
                    ));
                }
                hops += 1;
                let next = next.map_err(|message| {
                    TransportError::new(
                        TransportErrorKind::InvalidRequest,
                        format!("{message} from {}", target()),
                    )
                })?;
                let status = response.status();
                drop(response);
                if status == StatusCode::SEE_OTHER && method != Method::HEAD
                    || matches!(status.as_u16(), 301 | 302) && method == Method::POST
                {
                    method = Method::GET;
                    body = Bytes::new();
                    for name in [
                        CONTENT_TYPE,
                        CONTENT_LENGTH,
                        CONTENT_ENCODING,
                        TRANSFER_ENCODING,
                    ] {
                        headers.remove(name);
                    }
                }
                if origin(&uri) != origin(&next)
                    && !scope.as_ref().is_some_and(|s| s.trusts(&origin(&next)))
                {
                    strip_credentials(&mut headers, scope.as_ref());
                }
                uri = next;
            }
        })
    }
}

/// Reads the whole body of `response`, refusing one over `max` bytes.
async fn read_whole(
    mut response: reqwest::Response,
    max: usize,
    target: &str,
) -> Result<Response<Bytes>, TransportError> {
    if response
        .content_length()
        .is_some_and(|len| len > max as u64)
    {
        return Err(too_large(target, max));
    }
    let status = response.status();
    let version = response.version();
    let headers = std::mem::take(response.headers_mut());
    // Most bodies come in one chunk: keep it as it is, copy nothing.
    let mut body = match response.chunk().await.map_err(|e| classify(e, target))? {
        None => Bytes::new(),
        Some(first) => first,
    };
    if body.len() > max {
        return Err(too_large(target, max));
    }
    if let Some(second) = response.chunk().await.map_err(|e| classify(e, target))? {
        let capacity = response.content_length().unwrap_or(0).min(max as u64) as usize;
        let mut all = BytesMut::with_capacity(capacity.max(body.len() + second.len()));
        all.extend_from_slice(&body);
        all.extend_from_slice(&second);
        while let Some(chunk) = response.chunk().await.map_err(|e| classify(e, target))? {
            if all.len() + chunk.len() > max {
                return Err(too_large(target, max));
            }
            all.extend_from_slice(&chunk);
        }
        if all.len() > max {
            return Err(too_large(target, max));
        }
        body = all.freeze();
    }
    let mut out = Response::new(body);
    *out.status_mut() = status;
    *out.version_mut() = version;
    *out.headers_mut() = headers;
    Ok(out)
}

/// Where a redirect response points, if it is one to follow: `None` for
/// any other response, an error for a `Location` that cannot be followed.
fn redirect_target(
    response: &reqwest::Response,
    from: &http::Uri,
) -> Option<Result<http::Uri, &'static str>> {
    if !matches!(response.status().as_u16(), 301 | 302 | 303 | 307 | 308) {
        return None;
    }
    let location = response.headers().get(LOCATION)?;
    let next = location
        .to_str()
        .ok()
        .and_then(|location| url::Url::parse(&from.to_string()).ok()?.join(location).ok());
    Some(match next {
        Some(mut next) if matches!(next.scheme(), "http" | "https") => {
            next.set_fragment(None);
            http::Uri::try_from(next.as_str()).map_err(|_| "an invalid redirect")
        }
        Some(_) => Err("a redirect to a scheme other than http or https"),
        None => Err("an invalid redirect"),
    })
}

/// `scheme://host:port` of a URI, the unit credentials are scoped to.
fn origin(uri: &http::Uri) -> String {
    url::Url::parse(&uri.to_string())
        .map(|url| url.origin().ascii_serialization())
        .unwrap_or_default()
}

/// Removes what must not follow a redirect to an untrusted origin: every
/// header marked secret, the client's default headers, and the standard
/// credential headers.
fn strip_credentials(headers: &mut HeaderMap, scope: Option<&CredentialScope>) {
    let secret: Vec<HeaderName> = headers
        .iter()
        .filter(|(_, value)| value.is_sensitive())
        .map(|(name, _)| name.clone())
        .collect();
    let defaults = scope.map_or(&[][..], |s| &s.defaults[..]);
    for name in secret.iter().chain(defaults).chain(&[
        AUTHORIZATION,
        PROXY_AUTHORIZATION,
        COOKIE,
        WWW_AUTHENTICATE,
    ]) {
        headers.remove(name);
    }
}

fn without_query(uri: &http::Uri) -> String {
    match (uri.scheme_str(), uri.authority()) {
        (Some(scheme), Some(authority)) => format!("{scheme}://{authority}{}", uri.path()),
        _ => uri.path().to_owned(),
    }
}

fn too_large(target: &str, max: usize) -> TransportError {
    TransportError::new(
        TransportErrorKind::BodyTooLarge,
        format!("response from {target} exceeds {max} bytes"),
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
