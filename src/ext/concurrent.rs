//! What [`FetchConcurrent`](super::FetchConcurrent) and
//! [`MapConcurrent`](super::MapConcurrent) share: take items while fewer
//! than `n` are outstanding, run each as its own task, yield each result
//! (in input order if asked), pass upstream errors through.
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

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::stream::{Fuse, FusedStream, FuturesUnordered, Stream, StreamExt as _};
use pin_project_lite::pin_project;

use crate::error::{Failure, FetchError};
use crate::task::Task;

/// How a concurrent stage takes its input: plain items, or the `Ok`s of a
/// stream of results (whose `Err`s pass through untouched).
///
/// Sealed; chosen by [`fetch_concurrent`](crate::SluiceExt::fetch_concurrent)
/// and [`try_fetch_concurrent`](crate::SluiceExt::try_fetch_concurrent).
pub trait StageInput<I>: sealed::Sealed {
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
    impl Sealed for super::Items {}
    impl Sealed for super::Results {}
}

/// [`StageInput`] of plain items.
#[derive(Debug)]
pub enum Items {}

/// [`StageInput`] of `Result`s: `Ok` items are fetched, `Err`s pass through.
#[derive(Debug)]
pub enum Results {}

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

impl<T: Send + 'static> StageInput<T> for Items {
    type Item = T;
    type Error = FetchError<T>;
    fn intake(input: T) -> Result<T, FetchError<T>> {
        Ok(input)
    }
    fn lift(error: FetchError<T>) -> FetchError<T> {
        error
    }
}

impl<T, E> StageInput<Result<T, E>> for Results
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

/// What runs for each admitted item: a fetch, or a step.
pub(crate) trait Work<T>: Send + Sync + 'static {
    /// What a success gives.
    type Output: Send + 'static;
    /// Runs item number `index` to its end, its attempts and waits
    /// included.
    fn run(
        self: Arc<Self>,
        item: T,
        index: u64,
    ) -> impl Future<Output = Result<Self::Output, FetchError<T>>> + Send + 'static;
}

type Output<W, A, I> =
    Result<<W as Work<<A as StageInput<I>>::Item>>::Output, <A as StageInput<I>>::Error>;

pin_project! {
    /// Admission, one task per item, and collection, for a stage whose
    /// items each run `W`.
    pub(crate) struct Concurrent<S, A, W>
    where
        S: Stream,
        A: StageInput<S::Item>,
        W: Work<A::Item>,
    {
        #[pin]
        stream: Fuse<S>,
        pub(crate) work: Arc<W>,
        limit: usize,
        pub(crate) ordered: bool,
        // Polled at least once: configuring now would apply to some items only.
        pub(crate) started: bool,
        // Index of the next item taken from upstream.
        next_in: u64,
        // Index of the next output to yield in ordered mode.
        next_out: u64,
        pub(crate) outstanding: usize,
        // Ordered mode: outputs that arrived before their turn, at
        // `index - next_out`. At most `limit` long.
        waiting: VecDeque<Option<Output<W, A, S::Item>>>,
        // One task per item in flight.
        running: FuturesUnordered<Task<(u64, Output<W, A, S::Item>)>>,
        _intake: PhantomData<fn() -> A>,
    }
}

impl<S, A, W> Concurrent<S, A, W>
where
    S: Stream,
    A: StageInput<S::Item>,
    W: Work<A::Item>,
{
    pub(crate) fn new(stream: S, limit: usize, work: W) -> Self {
        Self {
            stream: stream.fuse(),
            work: Arc::new(work),
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

    /// Panics with a message naming `what` if the stage was polled.
    #[track_caller]
    pub(crate) fn assert_not_started(&self, stage: &str, what: &str) {
        assert!(
            !self.started,
            "{stage}: {what} called after the stream was first polled: it would \
             apply to some items only; configure the stage before polling it"
        );
    }

    pub(crate) fn stream_ref(&self) -> &S {
        self.stream.get_ref()
    }

    pub(crate) fn into_stream(self) -> S {
        self.stream.into_inner()
    }

    pub(crate) fn size_hint(&self) -> (usize, Option<usize>) {
        // Every input yields exactly one output.
        let (low, high) = self.stream.size_hint();
        (
            low.saturating_add(self.outstanding),
            high.and_then(|h| h.checked_add(self.outstanding)),
        )
    }

    pub(crate) fn is_terminated(&self) -> bool {
        self.stream.is_terminated() && self.outstanding == 0
    }

    pub(crate) fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Output<W, A, S::Item>>> {
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
                                let run = this.work.clone().run(item, index);
                                this.running.push(Task::spawn(async move {
                                    (index, run.await.map_err(A::lift))
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
}

impl<S, A, W> fmt::Debug for Concurrent<S, A, W>
where
    S: Stream + fmt::Debug,
    A: StageInput<S::Item>,
    W: Work<A::Item> + fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Concurrent")
            .field("stream", &self.stream)
            .field("work", &self.work)
            .field("limit", &self.limit)
            .field("ordered", &self.ordered)
            .field("outstanding", &self.outstanding)
            .finish()
    }
}
