//! The [`FetchConcurrent`] combinator: one request per item, at most `n` in
//! flight, each on its own task.
//!
//! Each item's attempts run on a spawned tokio task, so requests in flight
//! keep making progress while the consumer is busy elsewhere: a slow
//! consumer cannot make a request look slow and time out (the trap of
//! polling request futures only from inside `buffer_unordered`). The tasks
//! are owned by the stream; dropping it aborts them.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::{
    Fuse, FusedStream, FuturesOrdered, FuturesUnordered, Stream, StreamExt as _,
};
use pin_project_lite::pin_project;
use tokio_util::task::AbortOnDropHandle;

use crate::endpoint::{Endpoint, Fetched};
use crate::error::FetchError;
use crate::retry::{Backoff, Matcher};

/// How a fetch operator takes its input: plain items, or the `Ok`s of a
/// stream of results (whose `Err`s pass through untouched).
///
/// Sealed; chosen by [`fetch_concurrent`](crate::SluiceExt::fetch_concurrent)
/// and [`try_fetch_concurrent`](crate::SluiceExt::try_fetch_concurrent).
pub trait Intake<I>: sealed::Sealed {
    /// The item a request is built from.
    type Item: Send + 'static;
    /// The error side of the output.
    type Error: Send + 'static;
    #[doc(hidden)]
    fn intake(input: I) -> Result<Self::Item, Self::Error>;
    #[doc(hidden)]
    fn lift(error: FetchError<Self::Item>) -> Self::Error;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Plain {}
    impl Sealed for super::Fallible {}
}

/// [`Intake`] of plain items.
#[derive(Debug)]
pub enum Plain {}

/// [`Intake`] of `Result`s: `Ok` items are fetched, `Err`s pass through.
#[derive(Debug)]
pub enum Fallible {}

impl<T: Send + 'static> Intake<T> for Plain {
    type Item = T;
    type Error = FetchError<T>;
    fn intake(input: T) -> Result<T, FetchError<T>> {
        Ok(input)
    }
    fn lift(error: FetchError<T>) -> FetchError<T> {
        error
    }
}

impl<T, E> Intake<Result<T, E>> for Fallible
where
    T: Send + 'static,
    E: From<FetchError<T>> + Send + 'static,
{
    type Item = T;
    type Error = E;
    fn intake(input: Result<T, E>) -> Result<T, E> {
        input
    }
    fn lift(error: FetchError<T>) -> E {
        error.into()
    }
}

type Output<A, I> = Result<Fetched<<A as Intake<I>>::Item>, <A as Intake<I>>::Error>;

/// One slot in flight: a spawned fetch, or an upstream error waiting for its
/// turn (so ordered mode keeps it in place).
enum Slot<O> {
    Task(AbortOnDropHandle<O>),
    Ready(Option<O>),
}

impl<O> Unpin for Slot<O> {}

impl<O> Future for Slot<O> {
    type Output = O;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<O> {
        match self.get_mut() {
            Slot::Ready(out) => Poll::Ready(out.take().expect("slot polled after completion")),
            Slot::Task(handle) => Pin::new(handle).poll(cx).map(|joined| match joined {
                Ok(out) => out,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => panic!("fetch task ended without an answer: {e}"),
            }),
        }
    }
}

enum InFlight<O> {
    Unordered(FuturesUnordered<Slot<O>>),
    Ordered(FuturesOrdered<Slot<O>>),
}

impl<O> InFlight<O> {
    fn len(&self) -> usize {
        match self {
            Self::Unordered(q) => q.len(),
            Self::Ordered(q) => q.len(),
        }
    }

    fn push(&mut self, slot: Slot<O>) {
        match self {
            Self::Unordered(q) => q.push(slot),
            Self::Ordered(q) => q.push_back(slot),
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<O>> {
        match self {
            Self::Unordered(q) => q.poll_next_unpin(cx),
            Self::Ordered(q) => q.poll_next_unpin(cx),
        }
    }
}

pin_project! {
    /// Stream for [`SluiceExt::fetch_concurrent`](crate::SluiceExt::fetch_concurrent)
    /// and [`SluiceExt::try_fetch_concurrent`](crate::SluiceExt::try_fetch_concurrent).
    ///
    /// Configure it (`ordered`, `retry_on`, `pause_on`, timeouts) before the
    /// first poll.
    #[must_use = "streams do nothing unless polled"]
    pub struct FetchConcurrent<S, A>
    where
        S: Stream,
        A: Intake<S::Item>,
    {
        #[pin]
        stream: Fuse<S>,
        endpoint: Endpoint<A::Item>,
        limit: usize,
        next_index: u64,
        in_flight: InFlight<Output<A, S::Item>>,
        _intake: PhantomData<fn() -> A>,
    }
}

impl<S, A> FetchConcurrent<S, A>
where
    S: Stream,
    A: Intake<S::Item>,
{
    pub(crate) fn new(stream: S, limit: usize, endpoint: Endpoint<A::Item>) -> Self {
        Self {
            stream: stream.fuse(),
            endpoint,
            limit,
            next_index: 0,
            in_flight: InFlight::Unordered(FuturesUnordered::new()),
            _intake: PhantomData,
        }
    }

    /// Yields results in input order. A slow item then holds back those
    /// after it (but never more than `n` are in flight or buffered).
    ///
    /// # Panics
    ///
    /// If called after the stream has started.
    #[track_caller]
    pub fn ordered(mut self) -> Self {
        assert_eq!(
            self.in_flight.len(),
            0,
            "ordered() must be called before polling"
        );
        self.in_flight = InFlight::Ordered(FuturesOrdered::new());
        self
    }

    /// Retries outcomes that `matcher` matches with `policy`; see
    /// [`Endpoint::retry_on`].
    pub fn retry_on(mut self, matcher: impl Into<Matcher>, policy: Backoff) -> Self {
        self.endpoint = self.endpoint.retry_on(matcher, policy);
        self
    }

    /// Pauses the shared handle on outcomes that `matcher` matches; see
    /// [`Endpoint::pause_on`].
    pub fn pause_on(mut self, matcher: impl Into<Matcher>, fallback: Duration) -> Self {
        self.endpoint = self.endpoint.pause_on(matcher, fallback);
        self
    }

    /// Per-attempt timeout; see [`Endpoint::timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.endpoint = self.endpoint.timeout(timeout);
        self
    }

    /// Per-item timeout; see [`Endpoint::item_timeout`].
    pub fn item_timeout(mut self, timeout: Duration) -> Self {
        self.endpoint = self.endpoint.item_timeout(timeout);
        self
    }

    /// Caps attempts per item; see [`Endpoint::attempt_limit`].
    ///
    /// # Panics
    ///
    /// If `limit` is 0.
    #[track_caller]
    pub fn attempt_limit(mut self, limit: u32) -> Self {
        self.endpoint = self.endpoint.attempt_limit(limit);
        self
    }

    /// How many items are in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

impl<S, A> Stream for FetchConcurrent<S, A>
where
    S: Stream,
    A: Intake<S::Item>,
{
    type Item = Output<A, S::Item>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        while this.in_flight.len() < *this.limit {
            match this.stream.as_mut().poll_next(cx) {
                Poll::Ready(Some(input)) => match A::intake(input) {
                    Ok(item) => {
                        let endpoint = this.endpoint.clone();
                        let index = *this.next_index;
                        *this.next_index += 1;
                        let task = tokio::spawn(async move {
                            endpoint.fetch_indexed(item, index).await.map_err(A::lift)
                        });
                        this.in_flight
                            .push(Slot::Task(AbortOnDropHandle::new(task)));
                    }
                    Err(upstream) => this.in_flight.push(Slot::Ready(Some(Err(upstream)))),
                },
                Poll::Ready(None) | Poll::Pending => break,
            }
        }
        match this.in_flight.poll_next(cx) {
            Poll::Ready(Some(out)) => Poll::Ready(Some(out)),
            Poll::Ready(None) if this.stream.is_terminated() => Poll::Ready(None),
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        // Every input yields exactly one output.
        let in_flight = self.in_flight.len();
        let (low, high) = self.stream.size_hint();
        (
            low.saturating_add(in_flight),
            high.and_then(|h| h.checked_add(in_flight)),
        )
    }
}

impl<S, A> FusedStream for FetchConcurrent<S, A>
where
    S: Stream,
    A: Intake<S::Item>,
{
    fn is_terminated(&self) -> bool {
        self.stream.is_terminated() && self.in_flight.len() == 0
    }
}

impl<S, A> fmt::Debug for FetchConcurrent<S, A>
where
    S: Stream + fmt::Debug,
    A: Intake<S::Item>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FetchConcurrent")
            .field("stream", &self.stream)
            .field("endpoint", &self.endpoint)
            .field("limit", &self.limit)
            .field("in_flight", &self.in_flight.len())
            .finish()
    }
}
