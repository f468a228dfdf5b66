//! The [`FetchConcurrent`] combinator: one request per item, at most `n`
//! outstanding.
//!
//! # Who drives a request: the runtime, never the consumer
//!
//! Each admitted item runs as its own tokio task, from its first rate
//! token to its last retry. Its send, body read, retry waits, pause waits
//! and limiter waits move whenever they are due, whether or not anything
//! downstream is polling; the stream only admits items and collects
//! outputs. Backpressure applies at admission alone: no new item is taken
//! from upstream while `n` are outstanding.
//!
//! This is a choice against two others, made on what they did:
//! - polling the request futures only from `poll_next` (as
//!   `buffer_unordered` does) stalls every request while the consumer is
//!   busy: retries go out late, timeouts fire falsely;
//! - one driver task per stage, polled by the consumer while it waits and
//!   by the task while it is busy, routed every wake-up through a lock and
//!   still hung: a stage whose downstream was full was polled by nobody,
//!   and its waiter at the head of a shared limiter's line blocked every
//!   stage behind it.
//!
//! A task per item costs one spawn (an allocation and a scheduler
//! hand-off) per item; `benches/` measures it against bare
//! `buffer_unordered`. It buys the guarantee that progress never depends
//! on who polls, and on a multi-thread runtime items run on every worker.
//! The stream owns its tasks: dropping it aborts every one, and with them
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

use std::collections::VecDeque;
use std::sync::Arc;

use futures::stream::{Fuse, FusedStream, FuturesUnordered, Stream, StreamExt as _};
use pin_project_lite::pin_project;

use crate::endpoint::{Endpoint, Fetched};
use crate::error::{Failure, FetchError};
use crate::policy::{Policy, Sealed, WithPolicy};
use crate::task::Task;

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

/// An upstream error type that a later fetch stage (of items `T`) can pass
/// through, and the one error type the stage then yields.
///
/// What makes chaining stages need no `map_err`: a [`FetchError<U>`] of an
/// earlier stage (whatever its item type `U`) and a [`Failure`] both become
/// `Failure`, the stage's own [`FetchError<T>`] too. For an error type of
/// your own, implement it with `Output = Self` and say how a fetch failure
/// becomes one (see
/// [`try_fetch_concurrent`](crate::SluiceExt::try_fetch_concurrent)).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be the upstream error of a fetch stage of `{T}` items",
    label = "the stream's `Err` type",
    note = "a `FetchError<_>` of any stage or a `Failure` works as it is (the stage then yields `Failure`s); for an error type of your own, implement `sluicegate::StageError<{T}>` for it",
    note = "a stage's items must be `Serialize` for its failures to become `Failure`s (they are kept as JSON for reports and dead letters)"
)]
pub trait StageError<T>: Send + 'static {
    /// The error side of the stage's output.
    type Output: Send + 'static;
    /// An error from upstream, passed through in its place.
    fn pass(self) -> Self::Output;
    /// A fetch of `T` that failed.
    fn lift(error: FetchError<T>) -> Self::Output;
}

impl<T, U> StageError<T> for FetchError<U>
where
    T: serde::Serialize + Send + Sync + 'static,
    U: serde::Serialize + Send + Sync + 'static,
{
    type Output = Failure;
    fn pass(self) -> Failure {
        self.into()
    }
    fn lift(error: FetchError<T>) -> Failure {
        error.into()
    }
}

impl<T> StageError<T> for Failure
where
    T: serde::Serialize + Send + Sync + 'static,
{
    type Output = Failure;
    fn pass(self) -> Failure {
        self
    }
    fn lift(error: FetchError<T>) -> Failure {
        error.into()
    }
}

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
    E: StageError<T>,
{
    type Item = T;
    type Error = E::Output;
    fn intake(input: Result<T, E>) -> Result<T, E::Output> {
        input.map_err(E::pass)
    }
    fn lift(error: FetchError<T>) -> E::Output {
        E::lift(error)
    }
}

type Output<A, I> = Result<Fetched<<A as Intake<I>>::Item>, <A as Intake<I>>::Error>;

pin_project! {
    /// Stream for [`SluiceExt::fetch_concurrent`](crate::SluiceExt::fetch_concurrent)
    /// and [`SluiceExt::try_fetch_concurrent`](crate::SluiceExt::try_fetch_concurrent).
    ///
    /// Configure it (`ordered`, `retry_on`, `pause_on`, timeouts) before the
    /// first poll: each of those methods panics once the stream has been
    /// polled, since a rule added then would apply to some items only.
    #[must_use = "streams do nothing unless polled"]
    pub struct FetchConcurrent<S, A>
    where
        S: Stream,
        A: Intake<S::Item>,
    {
        #[pin]
        stream: Fuse<S>,
        endpoint: Arc<Endpoint<A::Item>>,
        limit: usize,
        ordered: bool,
        // Polled at least once: configuring now would apply to some items only.
        started: bool,
        // Index of the next item taken from upstream.
        next_in: u64,
        // Index of the next output to yield in ordered mode.
        next_out: u64,
        outstanding: usize,
        // Ordered mode: outputs that arrived before their turn, at
        // `index - next_out`. At most `limit` long.
        waiting: VecDeque<Option<Output<A, S::Item>>>,
        // One task per item in flight.
        running: FuturesUnordered<Task<(u64, Output<A, S::Item>)>>,
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
            endpoint: Arc::new(endpoint),
            limit,
            ordered: false,
            started: false,
            next_in: 0,
            next_out: 0,
            outstanding: 0,
            waiting: VecDeque::new(),
            running: FuturesUnordered::new(),
            _intake: PhantomData,
        }
    }

    /// Yields results in input order. A slow item then holds back those
    /// after it (but never more than `n` are outstanding).
    ///
    /// # Panics
    ///
    /// If called after the stream was first polled.
    #[track_caller]
    pub fn ordered(mut self) -> Self {
        self.assert_not_started("ordered");
        self.ordered = true;
        self
    }

    #[track_caller]
    fn assert_not_started(&self, method: &str) {
        assert!(
            !self.started,
            "FetchConcurrent::{method} called after the stream was first polled: it would \
             apply to some items only; configure the stream (or its Endpoint) before polling it"
        );
    }

    /// How many items are outstanding: taken from upstream, output not yet
    /// yielded.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }
}

impl<S, A> Sealed for FetchConcurrent<S, A>
where
    S: Stream,
    A: Intake<S::Item>,
{
}

/// Rules, timeouts and limits for this stage's requests, before the
/// endpoint's own rules (see [`WithPolicy`]).
///
/// # Panics
///
/// Each method panics if called after the stream was first polled: a rule
/// added then would apply to some items only.
impl<S, A> WithPolicy for FetchConcurrent<S, A>
where
    S: Stream,
    A: Intake<S::Item>,
{
    #[track_caller]
    fn map_policy(mut self, change: impl FnOnce(&mut Policy)) -> Self {
        self.assert_not_started("a policy method (retry_on, pause_on, timeout, limit, ...)");
        let endpoint = Arc::unwrap_or_clone(self.endpoint).map_policy(change);
        self.endpoint = Arc::new(endpoint);
        self
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
        *this.started = true;
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
            while *this.outstanding < *this.limit {
                match this.stream.as_mut().poll_next(cx) {
                    Poll::Ready(Some(input)) => {
                        let index = *this.next_in;
                        *this.next_in += 1;
                        match A::intake(input) {
                            Ok(item) => {
                                *this.outstanding += 1;
                                let endpoint = this.endpoint.clone();
                                this.running.push(Task::spawn(async move {
                                    let result = endpoint.fetch_indexed(item, index).await;
                                    (index, result.map_err(A::lift))
                                }));
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
                    Poll::Pending => break,
                }
            }
            if *this.ordered && matches!(this.waiting.front(), Some(Some(_))) {
                continue;
            }
            // Collect what the tasks finished.
            match this.running.poll_next_unpin(cx) {
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
