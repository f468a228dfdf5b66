//! [`Step`]: any async step (a database write, a call through another
//! SDK) under the same flow control as a fetch: rate limits, the shared
//! pause, retries by a predicate on the error, a per-item timeout, and an
//! outcome that carries the item.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;

use crate::attempt::{self, Attempt, Ended, Gate, Loop, Run};
use crate::body::Decoded;
use crate::error::{BoxError, FetchError, FetchErrorKind, TimeoutScope};
use crate::limiter::Limiter;
use crate::pause::PauseHandle;
use crate::retry::{Attempted, Backoff, Matches, PausePolicy, Rules, Verdict};
use crate::stats::Stats;

type RunFn<T, U, E> = dyn Fn(T) -> BoxFuture<'static, Result<U, E>> + Send + Sync;

/// Which errors of a step a rule applies to.
pub(crate) struct ErrorMatcher<E>(Arc<dyn Fn(&E) -> bool + Send + Sync>);

impl<E> Clone for ErrorMatcher<E> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<E> fmt::Debug for ErrorMatcher<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ErrorMatcher(..)")
    }
}

impl<U, E> Matches<Result<U, E>> for ErrorMatcher<E> {
    fn matches(&self, outcome: &Result<U, E>) -> bool {
        outcome.as_ref().err().is_some_and(|e| (self.0)(e))
    }
}

/// An async step from an item `T` to a `U`, with the flow control of a
/// fetch: for [`map_concurrent`](crate::SluiceExt::map_concurrent), or
/// run alone with [`run`](Self::run).
///
/// Before every attempt it waits for its pause handle, then for each
/// limiter in the order added (share a [`Client`](crate::Client)'s with
/// [`limit`](Self::limit)`(client.limiter())` and
/// [`pause_with`](Self::pause_with)`(client.pause_handle())`, and the step
/// stalls with the pipeline on a 503 and spends from its budget). An
/// error that a [`retry_if`](Self::retry_if) predicate accepts is tried
/// again after the backoff; one that a [`pause_if`](Self::pause_if)
/// predicate accepts pauses everything sharing the handle. Each attempt
/// gets the item by value (a clone), so `T: Clone`.
///
/// ```
/// use sluicegate::prelude::*;
/// use sluicegate::Step;
///
/// #[derive(Debug)]
/// struct Busy; // what the database says when it is overloaded
/// # impl std::fmt::Display for Busy { fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str("busy") } }
/// # impl std::error::Error for Busy {}
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let tries = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
/// let write = Step::new({
///     let tries = tries.clone();
///     move |row: u32| {
///         let tries = tries.clone();
///         async move {
///             // The first attempt of every row finds the database busy.
///             if tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 2 == 0 {
///                 Err(Busy)
///             } else {
///                 Ok(row * 10)
///             }
///         }
///     }
/// })
/// .limit(Limiter::new(Rate::per_second(10)))
/// .retry_if(|_: &Busy| true, Backoff::constant(Duration::from_millis(50)));
///
/// let started = tokio::time::Instant::now();
/// let written: Vec<u32> = stream::iter([1, 2, 3])
///     .map_concurrent(1, write)
///     .map_ok(|done| done.value)
///     .try_collect()
///     .await
///     .unwrap();
/// assert_eq!(written, [10, 20, 30]);
/// // Six attempts at 10 per second: the last one 500 ms after the first.
/// assert_eq!(started.elapsed(), Duration::from_millis(500));
/// # }
/// ```
#[must_use = "a Step does nothing until run or handed to map_concurrent; its methods return a new one"]
pub struct Step<T, U, E> {
    run: Arc<RunFn<T, U, E>>,
    rules: Rules<ErrorMatcher<E>>,
    pause: PauseHandle,
    limiters: Vec<Limiter>,
    item_timeout: Option<Duration>,
    stats: Vec<Stats>,
}

impl<T, U, E> Clone for Step<T, U, E> {
    fn clone(&self) -> Self {
        Self {
            run: self.run.clone(),
            rules: self.rules.clone(),
            pause: self.pause.clone(),
            limiters: self.limiters.clone(),
            item_timeout: self.item_timeout,
            stats: self.stats.clone(),
        }
    }
}

impl<T, U, E> fmt::Debug for Step<T, U, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Step")
            .field("rules", &self.rules)
            .field("pause", &self.pause)
            .field("limiters", &self.limiters)
            .field("item_timeout", &self.item_timeout)
            .finish_non_exhaustive()
    }
}

impl<T, U, E> Step<T, U, E>
where
    T: Clone + Send + Sync + 'static,
    U: Send + 'static,
    E: Into<BoxError> + Send + 'static,
{
    /// A step running `run(item)` for each item: no limit, no retry, a
    /// pause handle of its own, until told otherwise.
    pub fn new<F, Fut>(run: F) -> Self
    where
        F: Fn(T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<U, E>> + Send + 'static,
    {
        Self {
            run: Arc::new(move |item| Box::pin(run(item))),
            rules: Rules::default(),
            pause: PauseHandle::new(),
            limiters: Vec::new(),
            item_timeout: None,
            stats: Vec::new(),
        }
    }

    /// Waits on `limiter` before every attempt, after the limiters added
    /// before it.
    pub fn limit(mut self, limiter: impl Into<Option<Limiter>>) -> Self {
        self.limiters.extend(limiter.into());
        self
    }

    /// Waits for `pause` before every attempt, and pauses it when a
    /// [`pause_if`](Self::pause_if) rule matches.
    pub fn pause_with(mut self, pause: &PauseHandle) -> Self {
        self.pause = pause.clone();
        self
    }

    /// Tries again after `policy`'s delay when the error satisfies
    /// `predicate`, up to the policy's
    /// [`max_attempts`](Backoff::max_attempts). Rules are tried in the
    /// order added; the first that matches decides.
    pub fn retry_if(
        mut self,
        predicate: impl Fn(&E) -> bool + Send + Sync + 'static,
        policy: Backoff,
    ) -> Self {
        self.rules
            .retry_on(ErrorMatcher(Arc::new(predicate)), policy);
        self
    }

    /// Pauses the step's handle (and everything sharing it) for the
    /// policy's delay when the error satisfies `predicate`, then tries
    /// again, up to the policy's
    /// [`max_attempts`](PausePolicy::max_attempts).
    pub fn pause_if(
        mut self,
        predicate: impl Fn(&E) -> bool + Send + Sync + 'static,
        policy: impl Into<PausePolicy>,
    ) -> Self {
        self.rules
            .pause_on(ErrorMatcher(Arc::new(predicate)), policy.into());
        self
    }

    /// Gives each item at most `timeout` for all its attempts together,
    /// waits and pauses included. (Bound a single attempt inside the step,
    /// with `tokio::time::timeout`, as an error of its own that a rule can
    /// retry.)
    pub fn item_timeout(mut self, timeout: Duration) -> Self {
        self.item_timeout = Some(timeout);
        self
    }

    /// Counts this step's items, attempts and retries in `stats`.
    pub fn with_stats(mut self, stats: Stats) -> Self {
        self.stats.push(stats);
        self
    }

    /// Runs the step for one item: its attempts, waits and pauses.
    ///
    /// # Errors
    ///
    /// A [`FetchError`] carrying `item` when the last attempt failed (kind
    /// [`Step`](FetchErrorKind::Step), the step's error as its
    /// [`source`](std::error::Error::source)), the item's time ran out, or
    /// a remote limiter stayed unreachable.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future cancels the attempt in flight and takes no
    /// further token.
    pub async fn run(&self, item: T) -> Result<Decoded<T, U>, FetchError<T>> {
        Self::run_indexed(self, item, 0).await
    }

    /// Item number `index`, start to end. `this` owns the step: a borrow
    /// for [`run`](Self::run), the stage's `Arc` for `map_concurrent`.
    /// One `async` block: an `async fn` keeps its arguments twice, so a
    /// chain of them kept the item once per layer.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn keeps its arguments twice in its future"
    )]
    pub(crate) fn run_indexed<S>(
        this: S,
        item: T,
        index: u64,
    ) -> impl Future<Output = Result<Decoded<T, U>, FetchError<T>>>
    where
        S: std::ops::Deref<Target = Self>,
    {
        async move {
            let step = &*this;
            attempt::item_started(&step.stats);
            let gate = Gate {
                pause: step.pause.clone(),
                limiters: step.limiters.clone(),
                answered: false,
            };
            let run = Loop {
                gate: &gate,
                stats: &step.stats,
                item_timeout: step.item_timeout,
                seed: step.rules.seed(),
            }
            .run(StepAttempt { step, item: &item }, index)
            .await;
            let result = finish(item, run);
            attempt::item_ended(&step.stats, index, &result);
            result
        }
    }
}

/// What a step's attempts came to: the item with its value, else the
/// error carrying it.
fn finish<T, U, E: Into<BoxError>>(
    item: T,
    run: Run<Result<U, E>>,
) -> Result<Decoded<T, U>, FetchError<T>> {
    let (kind, source) = match run.ended {
        Ended::Outcome(Ok(value)) => return Ok(Decoded { item, value }),
        Ended::Outcome(Err(e)) => (FetchErrorKind::Step, Some(e.into())),
        Ended::ItemTimeout => (FetchErrorKind::Timeout(TimeoutScope::Item), None),
        Ended::LimiterUnavailable(reason) => {
            (FetchErrorKind::LimiterUnavailable, Some(reason.into()))
        }
    };
    let mut error = FetchError::new(item, kind).with_attempts(run.attempts, run.elapsed);
    if let Some(source) = source {
        let source: BoxError = source;
        error = error.with_detail(source.to_string()).with_source(source);
    }
    Err(error)
}

/// One item's attempts at a step.
struct StepAttempt<'a, T, U, E> {
    step: &'a Step<T, U, E>,
    item: &'a T,
}

impl<T, U, E> Attempt for StepAttempt<'_, T, U, E>
where
    T: Clone + Send + Sync + 'static,
    U: Send + 'static,
    E: Send + 'static,
{
    type Outcome = Result<U, E>;

    fn attempt(&mut self, attempt: u32) -> impl Future<Output = Result<U, E>> + Send {
        if attempt == 1 {
            self.step.rules.deposit();
        }
        (self.step.run)(self.item.clone())
    }

    fn decide(
        &self,
        outcome: &Result<U, E>,
        history: Attempted,
        now: Instant,
        draw: u64,
    ) -> Verdict {
        self.step.rules.decide(outcome, history, None, now, draw)
    }
}
