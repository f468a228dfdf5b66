//! What [`FetchConcurrent`](super::FetchConcurrent) and
//! [`MapConcurrent`](super::MapConcurrent) share: take items while fewer
//! than `n` are outstanding, run each on a driver task, yield each result
//! (in input order if asked), pass upstream errors through.
//!
//! # Who drives a request: the runtime, never the consumer
//!
//! Admitted items run off the consumer, from each item's first rate token
//! to its last retry, polled by the runtime alone whenever one of them is
//! woken: a send, a body read, a retry wait, a pause wait or a limiter
//! wait moves when it is due, whether or not anything downstream is
//! polling. The stream only admits items and collects outputs.
//! Backpressure applies at admission alone: no new item is taken from
//! upstream while `n` are outstanding.
//!
//! What runs them (see `Driver`): driver tasks, one per worker of the
//! runtime (one on a current-thread runtime), each owning the futures of
//! the items admitted to it, fed through a channel of its own, emptied
//! through one shared with the others, and never polled by the consumer.
//! An item goes to the driver with the fewest running, so a stage's items
//! spread over the workers.
//!
//! This is a choice against two others, made on what they did:
//! - polling the request futures only from `poll_next` (as
//!   `buffer_unordered` does) stalls every request while the consumer is
//!   busy: retries go out late, timeouts fire falsely;
//! - a driver task polled by the consumer while it waits and by the task
//!   while it is busy routed every wake-up through a lock and still hung:
//!   a stage whose downstream was full was polled by nobody, and its
//!   waiter at the head of a shared limiter's line blocked every stage
//!   behind it. The driver here is never polled by the consumer, so it is
//!   armed whenever an item is: nobody's absence can stop it.
//!
//! What it costs, against bare `buffer_unordered`: a boxed future per item
//! and two channel messages, and on a multi-thread runtime the hand-off of
//! outputs from a worker to the consumer's thread (a wake-up of that
//! thread when it sleeps, once per burst of answers: see `Held`);
//! `benches/` measures it. It buys that progress
//! never depends on who polls (`tests/topology.rs`). The stream owns what
//! runs its items: dropping it aborts the drivers, and with them every
//! request in flight. A panic in an item is raised in the stream, as if
//! the stream had polled the item itself.
//!
//! "Outstanding" counts items taken from upstream whose output has not been
//! yielded yet (in flight, or done and waiting for the consumer, or waiting
//! for their turn in ordered mode), so memory stays bounded by `n` however
//! slow the consumer is.

use std::any::Any;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{BoxFuture, CatchUnwind, FutureExt as _};
use futures::stream::{Fuse, FusedStream, FuturesUnordered, Stream, StreamExt as _};
use pin_project_lite::pin_project;
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

use crate::error::{Failure, FetchError};

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
    /// Admission, driver tasks, and collection, for a stage whose items
    /// each run `W`.
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
        // The stage's drivers, spawned at the first admission.
        driver: Option<Driver<(u64, Output<W, A, S::Item>)>>,
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
            driver: None,
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
                                this.driver
                                    .get_or_insert_with(Driver::start)
                                    // A map, not an async block: awaiting the
                                    // captured future would store it twice.
                                    .admit(Box::pin(
                                        run.map(move |out| (index, out.map_err(A::lift))),
                                    ));
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
            // Collect what the driver finished.
            let finished = match this.driver.as_mut() {
                Some(driver) if driver.running > 0 => driver.poll_next(cx),
                _ => Poll::Ready(None),
            };
            match finished {
                // A panic in a transport or a request builder surfaces here,
                // as it would had the stream polled the item itself. In
                // input order its slot never fills, as with `buffered`;
                // out of order it is counted out first, so that a consumer
                // that catches it gets the other items and the end.
                Poll::Ready(Some(Err(panic))) => {
                    if !*this.ordered {
                        *this.outstanding -= 1;
                    }
                    std::panic::resume_unwind(panic)
                }
                Poll::Ready(Some(Ok((index, out)))) => {
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

/// What runs a stage's items, off the consumer: driver tasks, one per
/// worker of the runtime (one on a current-thread runtime).
///
/// Each driver task owns the futures of the items admitted to it and polls
/// them whenever one is woken; outputs come back on one channel. It keeps
/// progress independent of who polls, as a task per item would, for less:
/// per item a channel message each way instead of a spawn, a join handle
/// and a wake-up of the consumer's thread for every output, and the items
/// of one driver woken together are polled in one pass. With a driver per
/// worker, the runtime can run a stage's items on every worker at once (it
/// moves driver tasks between workers as it moves any task), which a single
/// driver could not (`benches/RESULTS.md` has the comparison).
struct Driver<O> {
    // Admitted, output not yet collected, all drivers together.
    running: usize,
    drivers: Vec<DriverHandle<O>>,
    outputs: mpsc::UnboundedReceiver<Sent<O>>,
}

/// One driver task, as the stream sees it.
struct DriverHandle<O> {
    intake: mpsc::UnboundedSender<BoxFuture<'static, O>>,
    // Admitted to this driver, output not yet collected.
    running: usize,
    _task: AbortOnDropHandle<()>,
}

impl<O: Send + 'static> Driver<O> {
    /// # Panics
    ///
    /// Outside a tokio runtime.
    fn start() -> Self {
        let runtime = tokio::runtime::Handle::current();
        let workers = runtime.metrics().num_workers();
        let hold = runtime.runtime_flavor() != tokio::runtime::RuntimeFlavor::CurrentThread;
        let (done, outputs) = mpsc::unbounded_channel();
        let drivers = (0..workers.max(1))
            .map(|index| {
                let (intake, admitted) = mpsc::unbounded_channel();
                let task = tokio::spawn(Drive {
                    index,
                    admitted,
                    closed: false,
                    running: FuturesUnordered::new(),
                    done: done.clone(),
                    held: hold.then(Held::default),
                });
                DriverHandle {
                    intake,
                    running: 0,
                    _task: AbortOnDropHandle::new(task),
                }
            })
            .collect();
        Self {
            running: 0,
            drivers,
            outputs,
        }
    }

    /// Hands `item` to the driver with the fewest items running.
    fn admit(&mut self, item: BoxFuture<'static, O>) {
        self.running += 1;
        let driver = self
            .drivers
            .iter_mut()
            .min_by_key(|driver| driver.running)
            .expect("at least one driver");
        driver.running += 1;
        // A driver ends only once this sender is gone, or when the runtime
        // drops it (then `poll_next` says so).
        let _ = driver.intake.send(item);
    }

    /// The next output, or the panic of an item (already counted out);
    /// only while some item is running.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<O, Panic>>> {
        match std::task::ready!(self.outputs.poll_recv(cx)) {
            Some((index, out)) => {
                self.running -= 1;
                self.drivers[index].running -= 1;
                Poll::Ready(Some(out))
            }
            // The drivers are aborted only by dropping this handle, which then
            // polls them no more: only a runtime shutting down ends here.
            None => panic!("a sluicegate stage's driver was cancelled by its runtime"),
        }
    }
}

/// What an item that panicked left: raised again in the stream.
type Panic = Box<dyn Any + Send>;

/// An item's end, sent by driver number `.0`.
type Sent<O> = (usize, Result<O, Panic>);

/// A driver task: runs every item admitted to it, sends each output on.
struct Drive<O> {
    index: usize,
    admitted: mpsc::UnboundedReceiver<BoxFuture<'static, O>>,
    closed: bool,
    running: FuturesUnordered<CatchUnwind<AssertUnwindSafe<BoxFuture<'static, O>>>>,
    done: mpsc::UnboundedSender<Sent<O>>,
    // On a multi-thread runtime: outputs held back until this worker has
    // run its other ready tasks (see `Held`).
    held: Option<Held<O>>,
}

/// Outputs a driver holds back while its worker has other tasks ready.
///
/// On a multi-thread runtime the consumer is often on another thread (the
/// one in `block_on`, under `#[tokio::main]`), asleep between outputs, and
/// each output sent alone wakes it: a system call and a context switch
/// per item. Answers come in bursts (one poll of the I/O driver readies
/// several connections), so the driver holds what it finished and sends
/// it once its worker has run every other task that was ready: it yields
/// with tokio's `yield_now`, whose wake-up the worker defers until it runs
/// out of ready tasks, or until its next poll of the I/O driver (every 61
/// tasks at most, by default). One wake-up of the consumer per burst: on
/// two workers, about a third fewer context switches and 8% less time
/// per item (`benches/RESULTS.md`).
///
/// It holds at most `HOLD_AT_MOST`, and only while answers keep coming: a
/// pass that finds no new output, or that leaves nothing running, sends
/// what is held, so an answer never waits for one that may not come.
/// Not on a current-thread runtime, where the consumer shares the thread
/// and a wake-up costs no switch.
struct Held<O> {
    outputs: Vec<Sent<O>>,
}

impl<O> Default for Held<O> {
    fn default() -> Self {
        Self {
            outputs: Vec::new(),
        }
    }
}

// Nothing in a `Drive` is pinned in place: its futures are boxed.
impl<O> Unpin for Drive<O> {}

/// Outputs held back at most, per driver.
const HOLD_AT_MOST: usize = 16;

impl<O: Send + 'static> Drive<O> {
    /// Hands an output on, or holds it back.
    fn emit(&mut self, out: Sent<O>) {
        match &mut self.held {
            Some(held) => held.outputs.push(out),
            // The stream is gone only if it was dropped, and then this
            // task is being aborted.
            None => {
                let _ = self.done.send(out);
            }
        }
    }

    /// Before the task returns: sends what is held, unless this pass
    /// found new outputs, items are still running and the worker may have
    /// more answers ready (then it asks to be polled once the worker has
    /// run them).
    fn settle(&mut self, cx: &mut Context<'_>, found: bool) {
        let running = !self.running.is_empty();
        let Some(held) = &mut self.held else { return };
        if held.outputs.is_empty() {
            return;
        }
        if found && running && held.outputs.len() < HOLD_AT_MOST {
            // Its first poll hands this task's waker to the scheduler, to
            // be woken once the worker has nothing else ready.
            let yielding = std::pin::pin!(tokio::task::yield_now());
            if yielding.poll(cx).is_pending() {
                return;
            }
        }
        for out in held.outputs.drain(..) {
            let _ = self.done.send(out);
        }
    }
}

impl<O: Send + 'static> Future for Drive<O> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let mut found = false;
        loop {
            let mut admitted = false;
            while !this.closed {
                match this.admitted.poll_recv(cx) {
                    Poll::Ready(Some(item)) => {
                        this.running.push(AssertUnwindSafe(item).catch_unwind());
                        admitted = true;
                    }
                    Poll::Ready(None) => this.closed = true,
                    Poll::Pending => break,
                }
            }
            loop {
                match this.running.poll_next_unpin(cx) {
                    Poll::Ready(Some(out)) => {
                        let index = this.index;
                        this.emit((index, out));
                        found = true;
                    }
                    Poll::Ready(None) => break,
                    // An item's waker, or `FuturesUnordered` yielding,
                    // polls this task again.
                    Poll::Pending => {
                        this.settle(cx, found);
                        return Poll::Pending;
                    }
                }
            }
            // Nothing running: done once the stream admits no more, else
            // wait for an admission (the intake's waker is registered,
            // unless an admission just came, which the loop takes).
            if this.closed {
                this.settle(cx, false);
                return Poll::Ready(());
            }
            if !admitted {
                this.settle(cx, found);
                return Poll::Pending;
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
