//! The attempt loop every operator runs per item: wait at the gate (the
//! pause, then each rate limiter in order), attempt, let the rules decide,
//! wait as they say, again.
//!
//! What an attempt is — an HTTP request ([`Endpoint`](crate::Endpoint)) or
//! any async step ([`Step`](crate::Step)) — and what its rules read are
//! the [`Attempt`]'s; the waiting, the counting and the logging are here,
//! once. The decision is pure (the rules see the outcome, the history and
//! `now`, and return a [`Verdict`]); only this loop sleeps.

use std::future::Future;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;

use crate::error::FetchError;
use crate::limiter::Limiter;
use crate::pause::PauseHandle;
use crate::retry::{Attempted, DelayCause, Verdict};
use crate::stats::Stats;

/// What is attempted for one item, and how its outcomes are judged.
pub(crate) trait Attempt: Send {
    /// What one attempt gives.
    type Outcome: Send;

    /// Attempt number `attempt` (from 1), once the gate let it through.
    fn attempt(&mut self, attempt: u32) -> impl Future<Output = Self::Outcome> + Send;

    /// [`attempt`](Self::attempt), started at `now` (the clock as the gate
    /// let it through), for an attempt that reads the time as it starts.
    fn attempt_at(
        &mut self,
        attempt: u32,
        _now: Instant,
    ) -> impl Future<Output = Self::Outcome> + Send {
        self.attempt(attempt)
    }

    /// When the last attempt's outcome came, if the attempt read the clock
    /// then: the loop judges the outcome at that instant instead of
    /// reading the clock again.
    fn ended_at(&self) -> Option<Instant> {
        None
    }

    /// What follows `outcome`: finish, retry after a delay, or pause.
    fn decide(
        &self,
        outcome: &Self::Outcome,
        history: Attempted,
        now: Instant,
        draw: u64,
    ) -> Verdict;

    /// The status to log when an outcome pauses everything, if it has one.
    fn status(_outcome: &Self::Outcome) -> Option<u16> {
        None
    }
}

/// An attempt lent to the loop: the loop's futures then hold a pointer to
/// it, not a copy of it (with its request) in each of their frames.
impl<A: Attempt> Attempt for &mut A {
    type Outcome = A::Outcome;

    fn attempt(&mut self, attempt: u32) -> impl Future<Output = Self::Outcome> + Send {
        (**self).attempt(attempt)
    }

    fn attempt_at(
        &mut self,
        attempt: u32,
        now: Instant,
    ) -> impl Future<Output = Self::Outcome> + Send {
        (**self).attempt_at(attempt, now)
    }

    fn ended_at(&self) -> Option<Instant> {
        (**self).ended_at()
    }

    fn decide(
        &self,
        outcome: &Self::Outcome,
        history: Attempted,
        now: Instant,
        draw: u64,
    ) -> Verdict {
        (**self).decide(outcome, history, now, draw)
    }

    fn status(outcome: &Self::Outcome) -> Option<u16> {
        A::status(outcome)
    }
}

/// The pause and the limiters every attempt of an item waits for, in the
/// order it waits for them.
pub(crate) struct Gate {
    pub(crate) pause: PauseHandle,
    pub(crate) limiters: Vec<Limiter>,
    /// Whether what goes through is a request whose answer the limiters
    /// will hear (an HTTP attempt): each token then counts as a request in
    /// flight until they do, so a quota the server advertises is shared
    /// out net of the requests still on their way. A step's tokens count
    /// nothing: no answer would ever take them off.
    pub(crate) answered: bool,
}

impl Gate {
    /// What to wait for before the next attempt, or `None` to go now.
    ///
    /// Pause first, then the tokens in order: a token taken before a pause
    /// would be spent at the pause's end, all at once. The common case (no
    /// pause, every token free) takes the tokens here and allocates
    /// nothing. A token taken here while a later limiter makes the request
    /// wait is spent, not held: nothing another request waits for is held,
    /// so no order of waits can deadlock.
    fn wait(&self, now: Instant) -> Option<BoxFuture<'static, Result<(), String>>> {
        let paused = self.pause.is_paused();
        let free = if paused {
            0
        } else {
            self.limiters
                .iter()
                .take_while(|limiter| limiter.check_at(now, self.answered).is_ok())
                .count()
        };
        if !paused && free == self.limiters.len() {
            return None;
        }
        let pause = self.pause.clone();
        let answered = self.answered;
        let mut taken = Taken {
            limiters: self.limiters[..free].to_vec(),
            kept: !answered,
        };
        let rest: Vec<Limiter> = self.limiters[free..].to_vec();
        Some(Box::pin(async move {
            pause.ready().await;
            for limiter in rest {
                limiter
                    .clone()
                    .acquire_owned(Some(pause.clone()), answered)
                    .await?;
                taken.limiters.push(limiter);
            }
            // The request is sent at once: its in-flight count takes over.
            taken.keep();
            Ok(())
        }))
    }
}

/// Tokens taken for a request that may never be sent (a later limiter
/// failed, or the item's time ran out while it waited): each limiter
/// counts its token's request as in flight until told it was abandoned.
/// Kept from the start when the tokens count nothing (a step's).
struct Taken {
    limiters: Vec<Limiter>,
    kept: bool,
}

impl Taken {
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        if !self.kept {
            for limiter in &self.limiters {
                limiter.abandoned();
            }
        }
    }
}

/// An item begins: every counter it reports to hears of it.
pub(crate) fn item_started(stats: &[Stats]) {
    for stats in stats {
        stats.item_started();
    }
}

/// Item number `index` ended with `result`: every counter hears how, and
/// a failure is logged.
pub(crate) fn item_ended<U, T>(stats: &[Stats], index: u64, result: &Result<U, FetchError<T>>) {
    for stats in stats {
        stats.item_finished(result.is_ok());
    }
    if let Err(error) = result {
        tracing::warn!(item = index, kind = %error.kind(), attempts = error.attempts(), "item failed");
    }
}

/// How the attempts of one item ended.
pub(crate) enum Ended<O> {
    /// The rules took this outcome as final.
    Outcome(O),
    /// The item's own time ran out.
    ItemTimeout,
    /// A remote rate limiter stayed unreachable (failing closed).
    LimiterUnavailable(String),
}

/// The attempts of one item, and how they ended.
pub(crate) struct Run<O> {
    pub(crate) ended: Ended<O>,
    pub(crate) attempts: u32,
    pub(crate) elapsed: Duration,
}

/// What every item of an operator shares in its attempt loop.
pub(crate) struct Loop<'a> {
    pub(crate) gate: &'a Gate,
    pub(crate) stats: &'a [Stats],
    pub(crate) item_timeout: Option<Duration>,
    /// A seed for the rules' random draws, if they set one (else random).
    pub(crate) seed: Option<u64>,
}

impl<'a> Loop<'a> {
    /// Runs the attempts of item number `index` to their end.
    ///
    /// An `async` block, not an `async fn`, here and in
    /// [`attempts`](Self::attempts): an `async fn` keeps each argument
    /// twice in its future (as passed and as moved into the body), and
    /// this future is part of what every admitted item keeps.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn keeps its arguments twice in its future"
    )]
    pub(crate) fn run<A: Attempt + 'a>(
        self,
        attempt: A,
        index: u64,
    ) -> impl Future<Output = Run<A::Outcome>> + 'a {
        async move {
            // The one clock reading before the first attempt: the item's
            // start, its deadline, the gate's check and the send all share it.
            let started = Instant::now();
            let mut attempts = 0;
            let mut finished = None;
            let ended = match self.item_timeout {
                // Boxed: the item's own deadline is opt-in, and its timer
                // held in place would make every item's future larger.
                Some(limit) => Box::pin(tokio::time::timeout_at(
                    started + limit,
                    self.attempts(attempt, index, started, &mut attempts, &mut finished),
                ))
                .await
                .unwrap_or(Ended::ItemTimeout),
                None => {
                    self.attempts(attempt, index, started, &mut attempts, &mut finished)
                        .await
                }
            };
            let finished = finished.unwrap_or_else(Instant::now);
            Run {
                ended,
                attempts,
                elapsed: finished.saturating_duration_since(started),
            }
        }
    }

    fn attempts<'s, A: Attempt + 's>(
        &'s self,
        mut what: A,
        index: u64,
        started: Instant,
        attempts: &'s mut u32,
        finished: &'s mut Option<Instant>,
    ) -> impl Future<Output = Ended<A::Outcome>> + 's {
        async move {
            let seed = self.seed.unwrap_or_else(|| fastrand::u64(..));
            let mut rng =
                fastrand::Rng::with_seed(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut previous_delay = Duration::ZERO;
            let mut paused_by_us = false;
            let mut now = started;
            loop {
                let attempt = *attempts + 1;
                if let Some(wait) = self.gate.wait(now) {
                    if let Err(reason) = wait.await {
                        return Ended::LimiterUnavailable(reason);
                    }
                    now = Instant::now();
                }
                // Counted once it goes: an item whose time runs out at the
                // gate (a pause, a limiter's line) sent nothing more.
                *attempts = attempt;
                if std::mem::take(&mut paused_by_us) {
                    tracing::info!(item = index, "pause over, resuming");
                }
                let outcome = what.attempt_at(attempt, now).await;
                // The outcome is judged in a function of its own: borrowed in
                // this body, it would keep its room through the retry's sleep.
                let (retry_at, ended) = match self.judge(
                    &what,
                    outcome,
                    attempt,
                    index,
                    started,
                    &mut previous_delay,
                    &mut paused_by_us,
                    &mut rng,
                ) {
                    Ok(next) => next,
                    Err((outcome, ended)) => {
                        *finished = Some(ended);
                        return Ended::Outcome(outcome);
                    }
                };
                match retry_at {
                    Some(at) => {
                        // Boxed: a retry is the slow path; the common path keeps a small future.
                        Box::pin(tokio::time::sleep_until(at)).await;
                        now = Instant::now();
                    }
                    None => now = ended,
                }
            }
        }
    }

    /// What follows `outcome`: `Err` with it when it is final, else when
    /// to try again (`None`: once the pause it started ends) and the
    /// instant it was judged at.
    #[allow(clippy::too_many_arguments)]
    fn judge<A: Attempt>(
        &self,
        what: &A,
        outcome: A::Outcome,
        attempt: u32,
        index: u64,
        started: Instant,
        previous_delay: &mut Duration,
        paused_by_us: &mut bool,
        rng: &mut fastrand::Rng,
    ) -> Result<(Option<Instant>, Instant), (A::Outcome, Instant)> {
        {
            let ended = what.ended_at().unwrap_or_else(Instant::now);
            let history = Attempted {
                attempts: attempt,
                elapsed: ended.saturating_duration_since(started),
                previous_delay: *previous_delay,
            };
            match what.decide(&outcome, history, ended, rng.u64(..)) {
                Verdict::Finish => Err((outcome, ended)),
                Verdict::Retry { delay, cause } => {
                    tracing::debug!(
                        item = index,
                        attempt,
                        delay_ms = delay.as_millis() as u64,
                        cause = cause.as_str(),
                        "retrying"
                    );
                    for stats in self.stats {
                        stats.retried();
                    }
                    if cause == DelayCause::Policy {
                        *previous_delay = delay;
                    }
                    Ok((Some(ended + delay), ended))
                }
                Verdict::Pause { delay, cause } => {
                    let now = Instant::now();
                    let pause = &self.gate.pause;
                    let before = pause.paused_until().unwrap_or(now);
                    let until = pause.pause_for(delay);
                    let added = until.saturating_duration_since(before);
                    // The item is tried again once the pause ends: a retry
                    // like any other, besides the pause it asked for.
                    for stats in self.stats {
                        stats.paused(added);
                        stats.retried();
                    }
                    *paused_by_us = true;
                    tracing::info!(
                        item = index,
                        attempt,
                        status = A::status(&outcome),
                        pause_ms = until.saturating_duration_since(now).as_millis() as u64,
                        cause = cause.as_str(),
                        "pausing every request sharing this pause handle"
                    );
                    Ok((None, now))
                }
            }
        }
    }
}
