//! TowerTransport: pipelines through a tower `Service`, a bare `service_fn`
//! and one under the user's own layers, on tokio's paused clock with exact
//! times. No sockets.
#![cfg(feature = "tower")]

use std::collections::HashSet;
use std::convert::Infallible;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{ready, Ready};
use http::{Request, Response};
use http_body_util::{Full, StreamBody};
use sluicegate::prelude::*;
use sluicegate::retry::Matcher;
use sluicegate::{
    FetchErrorKind, TimeoutScope, TowerTransport, Transport, TransportError, TransportErrorKind,
};
use tokio::time::{sleep, Instant};
use tower::util::BoxCloneService;
use tower::{service_fn, Service, ServiceBuilder};

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The lesson's API as a service: `/items` lists `0..n`, `/items/{id}`
/// answers an email after `latency`, with scripted failures, and a log of
/// what it saw.
#[derive(Default)]
struct Api {
    n: u64,
    latency: Duration,
    /// Ids answered 500 every time.
    broken: HashSet<u64>,
    /// Answer 429 + `Retry-After: 1` to each id's first request.
    throttle_first: bool,
    /// The call (counted from 1) that takes a second instead of `latency`.
    slow_call: Option<usize>,
    calls: AtomicUsize,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
    seen: Mutex<HashSet<u64>>,
}

impl Api {
    fn new(n: u64) -> Self {
        Self {
            n,
            latency: ms(100),
            ..Self::default()
        }
    }

    async fn answer(&self, request: Request<Bytes>) -> Response<Full<Bytes>> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let slow = self.slow_call == Some(call);
        sleep(if slow { ms(1000) } else { self.latency }).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let path = request.uri().path();
        let (status, body) = if path == "/items" {
            (
                200,
                serde_json::to_vec(&(0..self.n).collect::<Vec<_>>()).unwrap(),
            )
        } else {
            let id: u64 = path.rsplit('/').next().unwrap().parse().unwrap();
            let first = self.seen.lock().unwrap().insert(id);
            if self.broken.contains(&id) {
                (500, Vec::new())
            } else if self.throttle_first && first {
                (429, Vec::new())
            } else {
                let email = format!("{id}@example.com");
                (
                    200,
                    serde_json::to_vec(&serde_json::json!({ "email": email })).unwrap(),
                )
            }
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        if status == 429 {
            response
                .headers_mut()
                .insert("retry-after", http::HeaderValue::from_static("1"));
        }
        response
    }
}

/// `api` as a `service_fn`: cloned per request, sharing the state.
fn service(
    api: &Arc<Api>,
) -> impl Service<
    Request<Bytes>,
    Response = Response<Full<Bytes>>,
    Error = TransportError,
    Future = impl Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static {
    let api = api.clone();
    service_fn(move |request: Request<Bytes>| {
        let api = api.clone();
        async move { Ok::<_, TransportError>(api.answer(request).await) }
    })
}

fn client_on<T: Transport>(transport: T) -> sluicegate::ClientBuilder {
    Client::builder()
        .transport(transport)
        .base_url("http://127.0.0.1:8080")
}

#[derive(Debug, serde::Deserialize)]
struct Customer {
    email: String,
}

#[tokio::test(start_paused = true)]
async fn a_pipeline_through_a_service_fn_accounts_for_every_item_once() {
    let api = Arc::new(Api {
        broken: HashSet::from([7]),
        ..Api::new(10)
    });
    let client = client_on(TowerTransport::new(service(&api)))
        .build()
        .unwrap();
    let start = Instant::now();
    let results: Vec<_> = stream::iter([()])
        .fetch_concurrent(1, client.get(|_: &()| "/items"))
        .flat_unpack::<u64>()
        .try_fetch_concurrent(4, client.get(|id: &u64| format!("/items/{id}")))
        .json::<Customer>()
        .collect()
        .await;
    // The list at 100 ms, then ten ids four at a time: three more waves.
    assert_eq!(start.elapsed(), ms(400));
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for result in results {
        match result {
            Ok(decoded) => {
                assert_eq!(decoded.value.email, format!("{}@example.com", decoded.item));
                ok.push(decoded.item);
            }
            Err(failure) => {
                let error = failure
                    .downcast::<u64>()
                    .expect("a failure of the id stage");
                assert_eq!(error.status(), Some(StatusCode::INTERNAL_SERVER_ERROR));
                failed.push(*error.item());
            }
        }
    }
    ok.sort();
    assert_eq!(ok, [0, 1, 2, 3, 4, 5, 6, 8, 9]);
    assert_eq!(failed, [7]);
    assert_eq!(api.calls.load(Ordering::SeqCst), 11);
    assert_eq!(api.peak.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn retries_through_a_service_fn_wait_for_retry_after() {
    let api = Arc::new(Api {
        throttle_first: true,
        ..Api::new(5)
    });
    let client = client_on(TowerTransport::new(service(&api)))
        .retry_on(429, Backoff::constant(ms(50)).max_attempts(3))
        .build()
        .unwrap();
    let start = Instant::now();
    let fetched: Vec<_> = stream::iter(0..5u64)
        .fetch_concurrent(5, client.get(|id: &u64| format!("/items/{id}")))
        .try_collect()
        .await
        .unwrap();
    // 429 at 100 ms, `Retry-After: 1` beats the 50 ms backoff, answered
    // 100 ms after the retry.
    assert_eq!(start.elapsed(), ms(1200));
    let mut ids: Vec<u64> = fetched.iter().map(|f| f.item).collect();
    ids.sort();
    assert_eq!(ids, [0, 1, 2, 3, 4]);
    assert!(fetched
        .iter()
        .all(|f| f.attempts == 2 && f.elapsed == ms(1200)));
    assert_eq!(api.calls.load(Ordering::SeqCst), 10);
}

#[tokio::test(start_paused = true)]
async fn own_layers_beneath_the_pipeline_limit_and_time_out_and_retries_still_work() {
    // The fifth request the service sees takes a second.
    let api = Arc::new(Api {
        slow_call: Some(5),
        ..Api::new(6)
    });
    let stack = ServiceBuilder::new()
        .concurrency_limit(2)
        .timeout(ms(250))
        .service(service(&api));
    let client = client_on(TowerTransport::new(stack))
        .retry_on(
            Matcher::timeouts(),
            Backoff::constant(ms(50)).max_attempts(2),
        )
        .build()
        .unwrap();
    let start = Instant::now();
    let mut fetched: Vec<_> = stream::iter(0..6u64)
        .fetch_concurrent(6, client.get(|id: &u64| format!("/items/{id}")))
        .try_collect()
        .await
        .unwrap();
    // Two at a time (readiness waits on the limit): 0–100, 100–200, then
    // the slow one and another at 200; the slow one times out at 450, is
    // retried 50 ms later and answered at 600.
    assert_eq!(start.elapsed(), ms(600));
    assert_eq!(api.peak.load(Ordering::SeqCst), 2);
    assert_eq!(api.calls.load(Ordering::SeqCst), 7);
    fetched.sort_by_key(|f| f.item);
    assert_eq!(
        fetched.iter().map(|f| f.item).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4, 5]
    );
    let retried: Vec<_> = fetched.iter().filter(|f| f.attempts == 2).collect();
    assert_eq!(retried.len(), 1);
    // Its first attempt began at 0, waiting for the limit inside it.
    assert_eq!(retried[0].elapsed, ms(600));

    // Without the retry rule, the layer's timeout is the item's error: an
    // attempt that timed out, as the client's own timeout would be.
    let api = Arc::new(Api {
        slow_call: Some(1),
        ..Api::new(1)
    });
    let stack = ServiceBuilder::new()
        .timeout(ms(250))
        .service(service(&api));
    let client = client_on(TowerTransport::new(stack)).build().unwrap();
    let err = client
        .get(|id: &u64| format!("/items/{id}"))
        .fetch(0)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), FetchErrorKind::Timeout(TimeoutScope::Attempt));
    assert_eq!((*err.item(), err.attempts()), (0, 1));
}

#[tokio::test(start_paused = true)]
async fn a_service_that_is_not_sync_goes_behind_a_buffer() {
    let api = Arc::new(Api::new(3));
    // BoxCloneService is Send but not Sync; Buffer makes a handle that is
    // both, and the limit inside it holds for every clone.
    let boxed = BoxCloneService::new(service(&api));
    let stack = ServiceBuilder::new()
        .buffer(8)
        .concurrency_limit(1)
        .service(boxed);
    let client = client_on(TowerTransport::new(stack)).build().unwrap();
    let start = Instant::now();
    let fetched: Vec<_> = stream::iter(0..3u64)
        .fetch_concurrent(3, client.get(|id: &u64| format!("/items/{id}")))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(fetched.len(), 3);
    assert_eq!(start.elapsed(), ms(300));
    assert_eq!(api.peak.load(Ordering::SeqCst), 1);
}

/// Answers every request with `body()`.
fn body_service<B, F>(
    body: F,
) -> impl Service<
    Request<Bytes>,
    Response = Response<B>,
    Error = Infallible,
    Future = Ready<Result<Response<B>, Infallible>>,
> + Clone
       + Send
       + Sync
       + 'static
where
    F: Fn() -> B + Clone + Send + Sync + 'static,
{
    service_fn(move |_: Request<Bytes>| ready(Ok(Response::new(body()))))
}

type Frames = StreamBody<
    futures::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, io::Error>>>,
>;

fn frames(parts: Vec<Result<&'static [u8], io::ErrorKind>>) -> Frames {
    StreamBody::new(futures::stream::iter(
        parts
            .into_iter()
            .map(|part| {
                part.map(|bytes| http_body::Frame::data(Bytes::from_static(bytes)))
                    .map_err(|kind| io::Error::new(kind, "cut"))
            })
            .collect::<Vec<_>>(),
    ))
}

fn get(url: &str) -> Request<Bytes> {
    Request::get(url).body(Bytes::new()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn bodies_are_read_whole_under_the_cap() {
    // A body whose size is known: refused before it is read.
    let big = TowerTransport::new(body_service(|| Full::new(Bytes::from(vec![b'x'; 2000]))))
        .max_body_bytes(1000);
    let err = big
        .send(get("http://127.0.0.1:8080/big?key=hush123"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::BodyTooLarge, "{err}");
    assert_eq!(
        err.to_string(),
        "body too large: response from http://127.0.0.1:8080/big exceeds 1000 bytes"
    );

    // A streamed one, in frames with no length: refused once past the cap,
    // whole under it.
    let streamed = |max| {
        TowerTransport::new(body_service(|| {
            frames(vec![Ok(&[b'a'; 400]), Ok(&[b'b'; 400]), Ok(&[b'c'; 400])])
        }))
        .max_body_bytes(max)
    };
    let err = streamed(1000)
        .send(get("http://127.0.0.1:8080/s"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::BodyTooLarge, "{err}");
    let whole = streamed(1200)
        .send(get("http://127.0.0.1:8080/s"))
        .await
        .unwrap();
    assert_eq!(whole.body().len(), 1200);
    assert_eq!(&whole.body()[399..401], b"ab");

    // A body that breaks off is a reset, named without its query.
    let cut = TowerTransport::new(body_service(|| {
        frames(vec![Ok(b"half"), Err(io::ErrorKind::ConnectionReset)])
    }));
    let err = cut
        .send(get("http://127.0.0.1:8080/c?key=hush123"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Reset, "{err}");
    assert!(!err.to_string().contains("hush123"), "{err}");
}

/// A service that is never ready: its readiness error is the request's.
#[derive(Clone)]
struct Refusing;

impl Service<Request<Bytes>> for Refusing {
    type Response = Response<Full<Bytes>>;
    type Error = io::Error;
    type Future = Ready<Result<Self::Response, io::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "refused",
        )))
    }

    fn call(&mut self, _: Request<Bytes>) -> Self::Future {
        panic!("called a service that was not ready")
    }
}

#[tokio::test(start_paused = true)]
async fn readiness_errors_and_service_errors_keep_their_kind_and_their_item() {
    let client = client_on(TowerTransport::new(Refusing)).build().unwrap();
    let results: Vec<_> = stream::iter(0..3u64)
        .fetch_concurrent(3, client.get(|id: &u64| format!("/items/{id}")))
        .collect()
        .await;
    let mut items: Vec<u64> = results
        .into_iter()
        .map(|r| {
            let err = r.unwrap_err();
            assert_eq!(
                err.kind(),
                FetchErrorKind::Transport(TransportErrorKind::Connect)
            );
            *err.item()
        })
        .collect();
    items.sort();
    assert_eq!(items, [0, 1, 2]);

    // A service that reports a TransportError is taken at its word.
    let own = service_fn(|_: Request<Bytes>| async {
        Err::<Response<Full<Bytes>>, _>(TransportError::new(
            TransportErrorKind::Reset,
            "peer hung up",
        ))
    });
    let err = TowerTransport::new(own)
        .send(get("http://127.0.0.1:8080/"))
        .await
        .unwrap_err();
    assert_eq!(
        (err.kind(), err.message()),
        (TransportErrorKind::Reset, "peer hung up")
    );
}

#[test]
fn the_transport_is_a_shareable_transport() {
    fn assert_transport<T: Transport + Clone + std::fmt::Debug>(_: &T) {}
    let transport = TowerTransport::new(body_service(|| Full::new(Bytes::new())));
    assert_transport(&transport);
    let shown = format!("{transport:?}");
    assert!(shown.starts_with("TowerTransport { service: "), "{shown}");
}
