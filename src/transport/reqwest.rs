//! [`ReqwestTransport`]: real HTTP over reqwest (rustls, no OpenSSL).

use std::error::Error as StdError;
use std::fmt;
use std::io;

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::header::{
    HeaderName, AUTHORIZATION, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, COOKIE, LOCATION,
    PROXY_AUTHORIZATION, TRANSFER_ENCODING, WWW_AUTHENTICATE,
};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::Transport;
use crate::client::CredentialScope;
use crate::error::{TransportError, TransportErrorKind};

/// Sends requests with a [`reqwest::Client`] and reads bodies up to a cap.
///
/// # Memory
///
/// The cap ([`max_body_bytes`](Self::max_body_bytes)) is enforced while
/// reading: a body that announces a larger `Content-Length` is refused
/// before any of it is read, and a body without one is read chunk by chunk
/// and refused as soon as it passes the cap. No buffer is ever allocated
/// past the cap: a known length is allocated exactly, an unknown one
/// is kept as the chunks that came and joined once.
///
/// The cap bounds one response; a budget
/// ([`max_body_bytes_in_flight`](Self::max_body_bytes_in_flight)) bounds
/// them all: every body being read reserves its bytes from it first (its
/// `Content-Length`, or the cap when the length is unknown and the body
/// comes in more than one chunk), and waits for them. So however many
/// requests are in flight, the bodies being read hold at most the budget,
/// plus the one chunk per connection that hyper has buffered anyway. A
/// body handed to the pipeline no longer counts: what it holds downstream
/// is bounded by the stages' concurrency.
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
    budget: BodyBudget,
}

impl ReqwestTransport {
    /// The default number of redirects followed: 10.
    pub const DEFAULT_MAX_REDIRECTS: usize = 10;

    /// The default budget for body bytes being read at once, all requests
    /// of the transport together: 64 MiB, four bodies at the default cap.
    pub const DEFAULT_MAX_BODY_BYTES_IN_FLIGHT: usize = 64 * 1024 * 1024;

    /// The default body cap: 16 MiB.
    pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

    /// Wraps a configured reqwest client, with the default body cap.
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
    /// A read waits (inside its attempt's timeout) until its share is free.
    /// A budget below the body cap lets one body at a time take it whole.
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
            .field("max_body_bytes_in_flight", &self.budget.bytes)
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
        let budget = self.budget.clone();
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
                    return read_whole(response, max, &budget, &target()).await;
                };
                if hops >= max_redirects {
                    if max_redirects == 0 {
                        return read_whole(response, max, &budget, &target()).await;
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

/// Reads the whole body of `response`, refusing one over `max` bytes,
/// with the bytes it holds counted against `budget`.
///
/// Never over-allocates past the cap: a body with a `Content-Length` gets
/// exactly that much, reserved from the budget before it is read; one
/// without is kept as the chunks that came (checked against the cap as
/// they come) and joined once at the end, after reserving the cap (its
/// worst case) from the budget, so concurrent reads never deadlock on a
/// budget each holds a part of. A body that arrives whole in its first
/// chunk (most small ones) is neither copied nor counted.
async fn read_whole(
    mut response: reqwest::Response,
    max: usize,
    budget: &BodyBudget,
    target: &str,
) -> Result<Response<Bytes>, TransportError> {
    let announced = response.content_length();
    if announced.is_some_and(|len| len > max as u64) {
        return Err(too_large(target, max));
    }
    let status = response.status();
    let version = response.version();
    let headers = std::mem::take(response.headers_mut());
    // Known length: reserve it before reading any of it.
    let mut permit = match announced {
        Some(len) if len > 0 => Some(budget.reserve(len as usize).await),
        _ => None,
    };
    let first = next_chunk(&mut response, target).await?.unwrap_or_default();
    if first.len() > max {
        return Err(too_large(target, max));
    }
    let body = match next_chunk(&mut response, target).await? {
        None => first,
        Some(second) => match announced {
            // Known length: one exact allocation, filled as chunks come.
            Some(len) => {
                let mut all = Vec::with_capacity(len as usize);
                for chunk in [first, second] {
                    append(&mut all, &chunk, max, target)?;
                }
                while let Some(chunk) = next_chunk(&mut response, target).await? {
                    append(&mut all, &chunk, max, target)?;
                }
                Bytes::from(all)
            }
            // Unknown length: keep the chunks as they came (no buffer that
            // doubles, no copy while reading), then join them once.
            None => {
                permit = Some(budget.reserve(max).await);
                let mut chunks = vec![first, second];
                let mut total = chunks.iter().map(Bytes::len).sum::<usize>();
                while let Some(chunk) = next_chunk(&mut response, target).await? {
                    total += chunk.len();
                    if total > max {
                        return Err(too_large(target, max));
                    }
                    chunks.push(chunk);
                }
                if total > max {
                    return Err(too_large(target, max));
                }
                join(chunks, total)
            }
        },
    };
    drop(permit);
    let mut out = Response::new(body);
    *out.status_mut() = status;
    *out.version_mut() = version;
    *out.headers_mut() = headers;
    Ok(out)
}

async fn next_chunk(
    response: &mut reqwest::Response,
    target: &str,
) -> Result<Option<Bytes>, TransportError> {
    response.chunk().await.map_err(|e| classify(e, target))
}

/// Appends `chunk` to a buffer allocated for the announced length; a body
/// longer than announced (hyper refuses those) still stops at `max`.
fn append(all: &mut Vec<u8>, chunk: &[u8], max: usize, target: &str) -> Result<(), TransportError> {
    if all.len() + chunk.len() > max {
        return Err(too_large(target, max));
    }
    all.extend_from_slice(chunk);
    Ok(())
}

/// Joins `chunks` (`total` bytes) into one exact buffer, dropping each
/// chunk once copied so the two copies never both exist in full.
fn join(chunks: Vec<Bytes>, total: usize) -> Bytes {
    let mut all = Vec::with_capacity(total);
    for chunk in chunks {
        all.extend_from_slice(&chunk);
    }
    Bytes::from(all)
}

/// The bytes of response bodies one transport (and its clones) may hold
/// while reading them, counted in KiB so any size fits one reservation.
#[derive(Clone)]
struct BodyBudget {
    permits: Arc<Semaphore>,
    bytes: usize,
}

impl BodyBudget {
    fn new(bytes: usize) -> Self {
        let kib = bytes.div_ceil(1024).clamp(1, Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(kib)),
            bytes,
        }
    }

    /// Waits until `bytes` (at most the whole budget) are free and holds
    /// them until the permit is dropped.
    async fn reserve(&self, bytes: usize) -> OwnedSemaphorePermit {
        let kib = bytes
            .div_ceil(1024)
            .min(self.permits_total())
            .min(u32::MAX as usize) as u32;
        self.permits
            .clone()
            .acquire_many_owned(kib)
            .await
            .expect("the budget's semaphore is never closed")
    }

    fn permits_total(&self) -> usize {
        self.bytes.div_ceil(1024).max(1)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt as _;

    #[tokio::test]
    async fn the_budget_holds_reads_back_until_bytes_are_free() {
        let budget = BodyBudget::new(1024 * 1024);
        let first = budget.reserve(800 * 1024).await;
        let mut second = Box::pin(budget.reserve(800 * 1024));
        assert!(
            (&mut second).now_or_never().is_none(),
            "over the budget: waits"
        );
        // A small one behind it waits too: the queue is fair.
        assert!(budget.reserve(100 * 1024).now_or_never().is_none());
        drop(first);
        let second = second.now_or_never().expect("free again");
        // A reservation over the whole budget takes the whole budget.
        drop(second);
        let whole = budget
            .reserve(64 * 1024 * 1024)
            .now_or_never()
            .expect("all of it");
        assert_eq!(budget.permits.available_permits(), 0);
        drop(whole);
        assert_eq!(budget.permits.available_permits(), 1024);
    }

    #[test]
    fn an_announced_buffer_never_grows_past_the_cap() {
        let max = 1000;
        let mut all = Vec::with_capacity(max);
        for _ in 0..9 {
            append(&mut all, &[7; 111], max, "t").unwrap();
        }
        assert_eq!((all.len(), all.capacity()), (999, max));
        let err = append(&mut all, &[7; 2], max, "t").unwrap_err();
        assert_eq!(err.kind(), TransportErrorKind::BodyTooLarge);
        let joined = join(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"c")], 3);
        assert_eq!(joined.as_ref(), b"abc");
    }
}
