//! The [`FetchConcurrent`] combinator: one request per item, at most `n`
//! outstanding.
//!
//! The attempts of every item are polled by the consumer while it waits and
//! by a driver task while it is busy (see `driver`): requests in flight,
//! retry waits and pauses keep making progress while the consumer is busy
//! elsewhere, so a slow consumer cannot make a request look slow and time
//! out (the trap of polling request futures only from `buffer_unordered`).
//! The stream owns the driver; dropping the stream aborts it and with it
//! every request in flight.
//!
//! "Outstanding" counts items taken from upstream whose output has not been
//! yielded yet (in flight, or done and waiting for the consumer, or waiting
//! for their turn in ordered mode), so memory stays bounded by `n` however
//! slow the consumer is.

use std::fmt;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use std::collections::VecDeque;

use futures::stream::{Fuse, FusedStream, Stream, StreamExt as _};
use pin_project_lite::pin_project;

use self::driver::Driver;

mod driver;

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
        ordered: bool,
        // Index of the next item taken from upstream.
        next_in: u64,
        // Index of the next output to yield in ordered mode.
        next_out: u64,
        outstanding: usize,
        // Ordered mode: outputs that arrived before their turn, at
        // `index - next_out`. At most `limit` long.
        waiting: VecDeque<Option<Output<A, S::Item>>>,
        driver: Option<Driver<A::Item, Output<A, S::Item>>>,
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
            ordered: false,
            next_in: 0,
            next_out: 0,
            outstanding: 0,
            waiting: VecDeque::new(),
            driver: None,
            _intake: PhantomData,
        }
    }

    /// Yields results in input order. A slow item then holds back those
    /// after it (but never more than `n` are outstanding).
    ///
    /// # Panics
    ///
    /// If called after the stream has started.
    #[track_caller]
    pub fn ordered(mut self) -> Self {
        assert_eq!(self.next_in, 0, "ordered() must be called before polling");
        self.ordered = true;
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

    /// Also counts this stage in `stats`; see [`Endpoint::with_stats`].
    pub fn with_stats(mut self, stats: crate::Stats) -> Self {
        self.endpoint = self.endpoint.with_stats(stats);
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

    /// How many items are outstanding: taken from upstream, output not yet
    /// yielded.
    pub fn outstanding(&self) -> usize {
        self.outstanding
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
        loop {
            // Yield what is ready, in order if asked.
            if *this.ordered {
                if let Some(Some(_)) = this.waiting.front() {
                    let out = this.waiting.pop_front().flatten();
                    *this.next_out += 1;
                    *this.outstanding -= 1;
                    return Poll::Ready(out);
                }
            }
            // Take from upstream while there is room.
            let mut upstream_pending = false;
            while *this.outstanding < *this.limit {
                match this.stream.as_mut().poll_next(cx) {
                    Poll::Ready(Some(input)) => {
                        let index = *this.next_in;
                        *this.next_in += 1;
                        match A::intake(input) {
                            Ok(item) => {
                                *this.outstanding += 1;
                                let endpoint = &*this.endpoint;
                                this.driver
                                    .get_or_insert_with(|| {
                                        Driver::spawn(endpoint.clone(), |r| r.map_err(A::lift))
                                    })
                                    .send(index, item);
                                if *this.ordered {
                                    this.waiting.push_back(None);
                                }
                            }
                            Err(upstream) if *this.ordered => {
                                *this.outstanding += 1;
                                this.waiting.push_back(Some(Err(upstream)));
                            }
                            Err(upstream) => return Poll::Ready(Some(Err(upstream))),
                        }
                    }
                    Poll::Ready(None) => break,
                    Poll::Pending => {
                        upstream_pending = true;
                        break;
                    }
                }
            }
            if *this.ordered && matches!(this.waiting.front(), Some(Some(_))) {
                continue;
            }
            // Collect what the driver finished.
            let Some(driver) = this.driver.as_mut() else {
                return if upstream_pending || !this.stream.is_terminated() {
                    Poll::Pending
                } else {
                    Poll::Ready(None)
                };
            };
            match driver.poll_recv(cx) {
                Poll::Ready(Some((index, out))) => {
                    if !*this.ordered {
                        *this.outstanding -= 1;
                        return Poll::Ready(Some(out));
                    }
                    let slot = (index - *this.next_out) as usize;
                    this.waiting[slot] = Some(out);
                }
                Poll::Ready(None) => {
                    // Nothing in flight: the end, or waiting on upstream
                    // (whose waker the fill loop registered).
                    return if *this.outstanding == 0 && this.stream.is_terminated() {
                        Poll::Ready(None)
                    } else {
                        Poll::Pending
                    };
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        // Every input yields exactly one output.
        let (low, high) = self.stream.size_hint();
        (
            low.saturating_add(self.outstanding),
            high.and_then(|h| h.checked_add(self.outstanding)),
        )
    }
}

impl<S, A> FusedStream for FetchConcurrent<S, A>
where
    S: Stream,
    A: Intake<S::Item>,
{
    fn is_terminated(&self) -> bool {
        self.stream.is_terminated() && self.outstanding == 0
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
            .field("ordered", &self.ordered)
            .field("outstanding", &self.outstanding)
            .finish()
    }
}
