//! The [`Transport`] trait: the one place a request leaves the process.
//!
//! Everything above this trait (limits, pauses, retries, timeouts) is the
//! same for every transport, so a pipeline tested on [`MockTransport`](mock::MockTransport) in
//! virtual time behaves the same on `ReqwestTransport` over real sockets.

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response};

use crate::error::TransportError;

#[cfg(any(feature = "reqwest", feature = "tower"))]
mod body;
pub mod mock;
#[cfg(feature = "reqwest")]
mod reqwest;
#[cfg(feature = "tower")]
mod tower;

#[cfg(feature = "reqwest")]
pub use self::reqwest::ReqwestTransport;
#[cfg(feature = "tower")]
pub use self::tower::TowerTransport;

/// Sends one request and returns its whole response.
///
/// The trait is object safe: a [`Client`](crate::Client) keeps its transport
/// as `Arc<dyn Transport>`, so clients with different transports have one
/// type, and the returned future is `'static` so the fetch operators can keep
/// driving it from a background task while the consumer is busy.
///
/// # Example
///
/// A transport that answers everything with `204 No Content`:
///
/// ```
/// use bytes::Bytes;
/// use futures::future::BoxFuture;
/// use sluicegate::{Transport, TransportError};
///
/// struct NoContent;
///
/// impl Transport for NoContent {
///     fn send(
///         &self,
///         _request: http::Request<Bytes>,
///     ) -> BoxFuture<'static, Result<http::Response<Bytes>, TransportError>> {
///         Box::pin(async {
///             Ok(http::Response::builder().status(204).body(Bytes::new()).unwrap())
///         })
///     }
/// }
/// ```
pub trait Transport: Send + Sync + 'static {
    /// Sends `request` and reads the whole response body.
    ///
    /// # Errors
    ///
    /// A [`TransportError`] when no complete response could be had: no
    /// connection, a reset, a timeout inside the transport, a body over the
    /// cap. A response with an error status is *not* an error here.
    fn send(
        &self,
        request: Request<Bytes>,
    ) -> BoxFuture<'static, Result<Response<Bytes>, TransportError>>;
}

// Pins the decision that `Transport` stays object safe.
const _: Option<&dyn Transport> = None;
