//! [`ReqwestTransport`]: real HTTP over reqwest (rustls, no OpenSSL).

use std::error::Error as StdError;
use std::fmt;
use std::io;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use http::{Request, Response};

use super::Transport;
use crate::error::{TransportError, TransportErrorKind};

/// Sends requests with a [`reqwest::Client`] and reads bodies up to a cap.
///
/// The cap is enforced while reading: a body that announces a larger
/// `Content-Length` is refused before any of it is read, and a body without
/// one is read chunk by chunk and refused as soon as it passes the cap, so a
/// hostile server cannot make the pipeline buffer more than the cap.
///
/// Clones share the reqwest client and so its connection pool.
///
/// ```no_run
/// use std::time::Duration;
/// use sluicegate::ReqwestTransport;
///
/// let http = reqwest::Client::builder()
///     .connect_timeout(Duration::from_secs(5))
///     .build()
///     .unwrap();
/// let transport = ReqwestTransport::new(http).max_body_bytes(1 << 20);
/// ```
#[derive(Clone)]
pub struct ReqwestTransport {
    client: reqwest::Client,
    max_body_bytes: usize,
}

impl ReqwestTransport {
    /// The default body cap: 16 MiB.
    pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

    /// Wraps a configured reqwest client, with the default body cap.
    pub fn new(client: reqwest::Client) -> Self {
        Self {
            client,
            max_body_bytes: Self::DEFAULT_MAX_BODY_BYTES,
        }
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
    /// A transport over `reqwest::Client::new()`.
    ///
    /// # Panics
    ///
    /// As `reqwest::Client::new()` does, if the TLS backend cannot start.
    fn default() -> Self {
        Self::new(reqwest::Client::new())
    }
}

impl fmt::Debug for ReqwestTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReqwestTransport")
            .field("max_body_bytes", &self.max_body_bytes)
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
        Box::pin(async move {
            // Keep the URI (cheap: shared bytes) and render it only for an error.
            let uri = request.uri().clone();
            let target = || without_query(&uri);
            let request = reqwest::Request::try_from(request).map_err(|e| {
                TransportError::new(TransportErrorKind::InvalidRequest, target()).with_source(e)
            })?;
            let mut response = client
                .execute(request)
                .await
                .map_err(|e| classify(e, &target()))?;
            if response
                .content_length()
                .is_some_and(|len| len > max as u64)
            {
                return Err(too_large(&target(), max));
            }
            let status = response.status();
            let version = response.version();
            let headers = std::mem::take(response.headers_mut());
            // Most bodies come in one chunk: keep it as it is, copy nothing.
            let mut body = match response.chunk().await.map_err(|e| classify(e, &target()))? {
                None => Bytes::new(),
                Some(first) => first,
            };
            if body.len() > max {
                return Err(too_large(&target(), max));
            }
            if let Some(second) = response.chunk().await.map_err(|e| classify(e, &target()))? {
                let capacity = response.content_length().unwrap_or(0).min(max as u64) as usize;
                let mut all = BytesMut::with_capacity(capacity.max(body.len() + second.len()));
                all.extend_from_slice(&body);
                all.extend_from_slice(&second);
                while let Some(chunk) =
                    response.chunk().await.map_err(|e| classify(e, &target()))?
                {
                    if all.len() + chunk.len() > max {
                        return Err(too_large(&target(), max));
                    }
                    all.extend_from_slice(&chunk);
                }
                if all.len() > max {
                    return Err(too_large(&target(), max));
                }
                body = all.freeze();
            }
            let mut out = Response::new(body);
            *out.status_mut() = status;
            *out.version_mut() = version;
            *out.headers_mut() = headers;
            Ok(out)
        })
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
    TransportError::new(kind, message).with_source(error)
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
