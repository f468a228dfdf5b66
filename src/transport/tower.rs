//! [`TowerTransport`]: a [`Transport`] over any tower `Service` taking an
//! `http::Request<Bytes>`, so the layers a user already has (an HTTP client
//! service, tower-http, limits, timeouts, a load balancer) sit beneath the
//! pipeline's own limits, pauses and retries.

use std::fmt;

use ::tower::Service;
use bytes::Bytes;
use futures::future::{poll_fn, BoxFuture};
use http::{Request, Response};
use http_body::Body;

use super::body::{self, read_body, BodyBudget};
use super::classify::{classify, BoxError};
use super::without_query;
use super::Transport;
use crate::error::TransportError;

/// Sends requests through a tower [`Service`] and reads each response body
/// whole, up to a cap.
///
/// The service takes an `http::Request<Bytes>` and answers an
/// `http::Response<B>` for any body type `B` implementing
/// [`http_body::Body`]: `http_body_util::Full<Bytes>` from a
/// `tower::service_fn`, hyper's `Incoming` from hyper-util's client, or a
/// tower-http layer's body. A body type rather than `Response<Bytes>`
/// because that is what HTTP services answer, and because reading it here,
/// frame by frame, is what lets the cap stop a body while it streams in.
///
/// # Readiness and concurrency
///
/// Each request clones the service, waits until the clone is ready
/// (`poll_ready`) and calls it, as tower's `oneshot` does; the clone and its
/// readiness go with the request's future, which is `'static` and `Send`,
/// so the pipeline drives many requests at once. Layers that share state
/// between clones, such as `ConcurrencyLimit` or `RateLimit` behind a
/// `Buffer`, hold every request of the transport to one limit. A waiting
/// request that is dropped (its attempt timed out, its item was cancelled)
/// gives back whatever readiness it held.
///
/// The service must be `Clone + Send + Sync + 'static`. Most stacks are; one
/// that is not `Sync` (a `BoxCloneService`, say) can be put behind
/// `tower::buffer::Buffer`, or boxed as a `BoxCloneSyncService`.
///
/// # Errors
///
/// A [`TransportError`], whose kind comes from the service's error and its
/// [source](std::error::Error::source) chain: a [`TransportError`] keeps its own
/// kind (so a service can report exactly what happened), tower's and tokio's
/// timeout `Elapsed` and an `io::Error` of kind `TimedOut` are `Timeout`,
/// `ConnectionRefused` is `Connect`, `ConnectionReset`, `ConnectionAborted`,
/// `BrokenPipe` and `UnexpectedEof` are `Reset`, and anything else is
/// `Other`. A body over the cap is `BodyTooLarge`. Messages name the URL
/// without its query; the service's error is the source.
///
/// # Memory
///
/// As for [`ReqwestTransport`](crate::ReqwestTransport): a body whose size
/// hint says it is over [`max_body_bytes`](Self::max_body_bytes) is refused
/// before a frame is read, any other is refused as soon as it passes the
/// cap, and all bodies being read share one
/// [budget](Self::max_body_bytes_in_flight), which counts what they hold as
/// their bytes arrive, never what they announce.
///
/// # Redirects and credentials
///
/// The transport hands redirect responses back as they are. A
/// redirect-following layer beneath it (tower-http's `FollowRedirect`)
/// would send the request's headers, the client's default headers and
/// secrets included, wherever a server points, unless its policy drops
/// them; the pipeline's credential checks cannot see those hops.
///
/// # Example
///
/// A `service_fn` standing in for an API, and a concurrency limit beneath
/// the pipeline, on tokio's paused clock:
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use sluicegate::prelude::*;
/// use sluicegate::{TowerTransport, TransportError};
/// use tower::ServiceBuilder;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let service = ServiceBuilder::new()
///     .concurrency_limit(2) // your layers, beneath the pipeline
///     .service_fn(|request: http::Request<Bytes>| async move {
///         tokio::time::sleep(Duration::from_millis(100)).await;
///         let id = request.uri().path().rsplit('/').next().unwrap_or("").to_owned();
///         Ok::<_, TransportError>(http::Response::new(Full::new(Bytes::from(id))))
///     });
/// let client = Client::builder()
///     .transport(TowerTransport::new(service))
///     .base_url("http://127.0.0.1:8080")
///     .build()?;
///
/// let start = tokio::time::Instant::now();
/// let mut ids: Vec<u64> = stream::iter(0..6u64)
///     .fetch_concurrent(6, client.get(|id: &u64| format!("/items/{id}")))
///     .map_ok(|fetched| String::from_utf8_lossy(fetched.response.body()).parse::<u64>().unwrap())
///     .try_collect()
///     .await?;
/// ids.sort();
/// assert_eq!(ids, [0, 1, 2, 3, 4, 5]);
/// assert_eq!(start.elapsed(), Duration::from_millis(300)); // two at a time
/// # Ok(())
/// # }
/// ```
pub struct TowerTransport<S> {
    service: S,
    max_body_bytes: usize,
    budget: BodyBudget,
}

impl<S> TowerTransport<S> {
    /// The default body cap: 16 MiB.
    pub const DEFAULT_MAX_BODY_BYTES: usize = body::DEFAULT_MAX_BODY_BYTES;

    /// The default budget for body bytes being read at once, all requests
    /// of the transport together: 64 MiB, four bodies at the default cap.
    pub const DEFAULT_MAX_BODY_BYTES_IN_FLIGHT: usize = body::DEFAULT_MAX_BODY_BYTES_IN_FLIGHT;

    /// Wraps `service`, with the default body cap and budget.
    ///
    /// The transport works once `service` is a
    /// `Service<http::Request<Bytes>, Response = http::Response<B>>` as
    /// described on [`TowerTransport`]; the bounds are checked where it is
    /// used as a [`Transport`].
    pub fn new(service: S) -> Self {
        Self {
            service,
            max_body_bytes: Self::DEFAULT_MAX_BODY_BYTES,
            budget: BodyBudget::new(Self::DEFAULT_MAX_BODY_BYTES_IN_FLIGHT),
        }
    }

    /// Sets the largest body, in bytes, that a response may have.
    pub fn max_body_bytes(mut self, max: usize) -> Self {
        self.max_body_bytes = max;
        self
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

    /// The wrapped service.
    pub fn service(&self) -> &S {
        &self.service
    }
}

impl<S: Clone> Clone for TowerTransport<S> {
    /// Clones the service; the clone shares the body budget.
    fn clone(&self) -> Self {
        Self {
            service: self.service.clone(),
            max_body_bytes: self.max_body_bytes,
            budget: self.budget.clone(),
        }
    }
}

impl<S> fmt::Debug for TowerTransport<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The service's type, not its value: a service need not be Debug,
        // and one that is may hold credentials.
        f.debug_struct("TowerTransport")
            .field("service", &std::any::type_name::<S>())
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_body_bytes_in_flight", &self.budget.bytes())
            .finish()
    }
}

impl<S, B> Transport for TowerTransport<S>
where
    S: Service<Request<Bytes>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    fn send(
        &self,
        request: Request<Bytes>,
    ) -> BoxFuture<'static, Result<Response<Bytes>, TransportError>> {
        // A clone per request: readiness belongs to the clone that is
        // polled, so concurrent requests never share one `poll_ready`.
        let mut service = self.service.clone();
        let max = self.max_body_bytes;
        let budget = self.budget.clone();
        Box::pin(async move {
            let target = without_query(request.uri());
            poll_fn(|cx| service.poll_ready(cx))
                .await
                .map_err(|e| classify(e.into(), &target))?;
            let response = service
                .call(request)
                .await
                .map_err(|e| classify(e.into(), &target))?;
            // Done with the service: release what it holds (a concurrency
            // permit travels with the response future, not the clone).
            drop(service);
            let (parts, body) = response.into_parts();
            let body = read_body(body, max, &budget, &|| target.clone(), |e, target| {
                classify(e.into(), target)
            })
            .await?;
            Ok(Response::from_parts(parts, body))
        })
    }
}
