//! [`Limiter`]: one shared rate budget, handed out first-come first-served.
//!
//! The decision of whether an event may go now is pure (see `pacing`): it
//! takes tokio's `now` and answers "go" or "not before T". Waiting lives in
//! the [`acquire`](Limiter::acquire) future, on tokio timers only.
//!
//! The line itself (waiters with due instants, granted by whoever looks)
//! is in `line`; what the limiter learns from responses (advertised
//! quotas, the opt-in learner) in `feedback`.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::Duration;

use tokio::time::Instant;

use crate::pause::PauseHandle;
use crate::rate::Rate;

mod adaptive;
pub(crate) mod advertised;
mod feedback;
mod keyed;
mod line;
mod pacing;

pub use self::adaptive::Adaptive;
use self::adaptive::Learner;
pub use self::keyed::KeyedLimiter;
use self::line::State;
use self::pacing::Pacing;

/// tokio's timer tick. A deadline is rounded up to the next tick, and the
/// driver sleeps whole ticks counted from a `now` rounded down, so a timer
/// can fire up to two ticks late by design (see `TIMER_LATENESS_NANOS`).
/// A token looked at late for any other reason is forgiven one tick of
/// lateness (see `line`).
const TIMER_TICK_NANOS: u64 = 1_000_000;

/// How late tokio fires a timer by its own design: just under two ticks.
/// A waiter woken by its own timer is forgiven this much lateness, so a
/// late timer costs no token.
const TIMER_LATENESS_NANOS: u64 = 2 * TIMER_TICK_NANOS - 1;

/// A shared rate budget. Clones share one budget, across stages, branches
/// and clients.
///
/// ```
/// use std::time::Duration;
/// use sluicegate::{Limiter, Rate};
/// use tokio::time::Instant;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let limiter = Limiter::new(Rate::per_second(10));
/// let t0 = Instant::now();
/// for _ in 0..3 {
///     limiter.acquire().await;
/// }
/// // The first goes at once, then one every 100 ms.
/// assert_eq!(t0.elapsed(), Duration::from_millis(200));
/// # }
/// ```
#[derive(Clone)]
pub struct Limiter {
    shared: Arc<Shared>,
}

struct Shared {
    epoch: Instant,
    state: Mutex<State>,
    /// A limit decided elsewhere (Redis); the local state then serves as
    /// the fallback.
    remote: Option<Remote>,
}

type Remote = Arc<dyn RemoteBudget>;

/// A budget kept outside this process (the `redis` module's is one): a
/// limiter built on one asks it for every token instead of its own line.
/// The limiter's floor defines the seam; the backend implements it, so the
/// limiter names no backend.
pub(crate) trait RemoteBudget: Send + Sync {
    /// Waits for a token, granting none while `pause` is in force.
    /// Cancel safe. `Err` when the backend stayed unreachable past what a
    /// fail-closed limit allows.
    fn acquire(
        self: Arc<Self>,
        pause: Option<PauseHandle>,
    ) -> futures::future::BoxFuture<'static, Result<(), String>>;
    /// Changes the rate this process asks the backend for.
    fn set_rate(&self, rate: Rate);
    /// How many of this process's callers wait for a token.
    fn waiting(&self) -> usize;
}

/// A refusal from [`Limiter::check`]: no token now, and when one could be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotUntil {
    earliest: Instant,
}

impl NotUntil {
    /// The earliest instant at which a token could be granted (later if
    /// others are queued first).
    pub fn earliest(&self) -> Instant {
        self.earliest
    }

    /// How long from `now` until [`earliest`](Self::earliest).
    pub fn wait_from(&self, now: Instant) -> Duration {
        self.earliest.saturating_duration_since(now)
    }
}

/// A private budget at `rate`: what `.throttle(Rate::per_second(5))` paces by.
impl From<Rate> for Limiter {
    fn from(rate: Rate) -> Self {
        Self::new(rate)
    }
}

/// The same shared budget: what `.throttle(&limiter)` paces by.
impl From<&Limiter> for Limiter {
    fn from(limiter: &Limiter) -> Self {
        limiter.clone()
    }
}

impl Limiter {
    /// A limiter enforcing `rate`, starting now.
    pub fn new(rate: Rate) -> Self {
        Self::build(rate)
    }

    /// A limiter decided by `remote` (at the rate it holds), falling back
    /// to the local state at `local_rate`.
    #[cfg(feature = "redis")]
    pub(crate) fn with_remote(local_rate: Rate, remote: Remote) -> Self {
        let mut limiter = Self::build(local_rate);
        Arc::get_mut(&mut limiter.shared)
            .expect("fresh limiter")
            .remote = Some(remote);
        limiter
    }

    /// A limiter that paces nothing but still holds requests while a quota
    /// the server advertised is spent: what a client without a rate uses.
    pub(crate) fn unpaced() -> Self {
        let limiter = Self::build(Rate::per_second(1_000_000_000));
        limiter.lock().pacing = Pacing::Unpaced;
        limiter
    }

    fn build(rate: Rate) -> Self {
        let epoch = Instant::now();
        Self {
            shared: Arc::new(Shared {
                epoch,
                state: Mutex::new(State {
                    rate,
                    pacing: Pacing::new(&rate, 0),
                    queue: VecDeque::new(),
                    next_id: 0,
                    learner: None,
                    advert: None,
                    outstanding: 0,
                    malformed: 0,
                }),
                remote: None,
            }),
        }
    }

    /// The rate in force.
    pub fn rate(&self) -> Rate {
        self.lock().rate
    }

    /// Changes the rate; the next token is granted under the new one. The
    /// budget already used is carried over in proportion. With adaptive
    /// pacing on, this is the new ceiling, and learning starts again from it.
    pub fn set_rate(&self, rate: Rate) {
        if let Some(remote) = &self.shared.remote {
            remote.set_rate(rate);
            return;
        }
        let now = Instant::now();
        let woken = {
            let mut state = self.lock();
            state.rate = rate;
            state.pacing.retune(&rate, self.offset(now));
            if let Some(learner) = &mut state.learner {
                *learner = Learner::new(learner.config().clone(), rate.per_second_f64(), now);
            }
            state.rate_changed()
        };
        woken.into_iter().for_each(Waker::wake);
    }

    /// Takes a token now if one is free and nobody is waiting ahead.
    ///
    /// # Errors
    ///
    /// [`NotUntil`] when the caller would have to wait; nothing is taken. A
    /// limiter shared through Redis always answers this way (asking Redis
    /// is not instant): use [`acquire`](Self::acquire).
    pub fn check(&self) -> Result<(), NotUntil> {
        self.check_at(Instant::now(), false)
    }

    /// [`check`](Self::check) at `now`, a clock reading the caller already
    /// holds: the per-item path reads the clock once for the gate, the
    /// in-flight count and the item's start. With `answered`, the token is
    /// for a request whose answer this limiter will hear: it counts as in
    /// flight until then (see `feedback`).
    pub(crate) fn check_at(&self, now: Instant, answered: bool) -> Result<(), NotUntil> {
        // A remote limit is only known by asking it, which is not instant.
        if self.shared.remote.is_some() {
            return Err(NotUntil { earliest: now });
        }
        let offset = self.offset(now);
        let floor = self.floor();
        let mut woken = Vec::new();
        let verdict = {
            let mut state = self.lock();
            state.settle(offset, &floor, None, &mut woken);
            // After everyone eligible in line: a newcomer's turn.
            let waiting = state.queue.iter().any(|w| !w.granted && floor(w) <= offset);
            let due = if waiting {
                state.due(None, offset, &floor)
            } else {
                state.earliest(offset)
            };
            if due <= offset {
                state.take(offset);
                state.outstanding += u64::from(answered);
                Ok(())
            } else {
                Err(NotUntil {
                    earliest: self.instant(due),
                })
            }
        };
        woken.into_iter().for_each(Waker::wake);
        verdict
    }

    /// Waits for a token, in line behind earlier callers.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe. Dropped before its turn, a waiter leaves the line and
    /// takes nothing, and those behind it move up. A token granted on its
    /// behalf as it is dropped is spent with it, never handed on later (so
    /// a cancellation never turns into a burst).
    ///
    /// # Panics
    ///
    /// When polled outside a tokio runtime with time enabled.
    pub fn acquire(&self) -> impl Future<Output = ()> + Send + 'static {
        self.clone().acquire_until_granted(None)
    }

    /// Like [`acquire`](Self::acquire), but grants nothing while `pause` is
    /// in force, and dates no token before its end, so the tokens that fell
    /// due during the pause are not all spent when it ends: no more go at
    /// once than the rate's burst allows. A waiter keeps its place in line
    /// during the pause.
    ///
    /// # Cancel safety
    ///
    /// As [`acquire`](Self::acquire).
    ///
    /// # Panics
    ///
    /// When polled outside a tokio runtime with time enabled.
    pub fn acquire_during(&self, pause: &PauseHandle) -> impl Future<Output = ()> + Send + 'static {
        self.clone().acquire_until_granted(Some(pause.clone()))
    }

    /// Waits for a token however long it takes: a limiter that cannot be
    /// consulted (Redis down, failing closed) means waiting, never going.
    pub(crate) async fn acquire_until_granted(self, pause: Option<PauseHandle>) {
        while let Err(e) = self.clone().acquire_owned(pause.clone(), false).await {
            tracing::warn!(error = %e, "still waiting for the rate limiter");
        }
    }

    /// Waits for a token; fails only when a remote limiter that fails closed
    /// stayed unreachable past its limit. `answered` as for `check_at`.
    pub(crate) async fn acquire_owned(
        self,
        pause: Option<PauseHandle>,
        answered: bool,
    ) -> Result<(), String> {
        if let Some(remote) = &self.shared.remote {
            return remote.clone().acquire(pause).await;
        }
        self.acquire_local(pause, answered).await;
        Ok(())
    }

    /// How many callers are waiting in line for a token.
    pub fn waiting(&self) -> usize {
        let local = self.lock().queue.iter().filter(|w| !w.granted).count();
        if let Some(remote) = &self.shared.remote {
            return local + remote.waiting();
        }
        local
    }

    /// Whether this limiter's budget is full and nobody waits, so it is
    /// indistinguishable from a fresh one.
    pub(crate) fn is_idle(&self, now: Instant) -> bool {
        let state = self.lock();
        state.queue.is_empty() && state.pacing.is_idle(self.offset(now))
    }

    pub(crate) fn is_shared(&self) -> bool {
        Arc::strong_count(&self.shared) > 1
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is plain integers, consistent at every unlock, so a
        // panic elsewhere cannot leave it half-updated: ignore poisoning.
        self.shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn offset(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.shared.epoch)
            .as_nanos()
            .min(u128::from(u64::MAX)) as u64
    }

    fn instant(&self, offset: u64) -> Instant {
        self.shared.epoch + Duration::from_nanos(offset)
    }
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("Limiter")
            .field("rate", &state.rate)
            .field("waiting", &state.queue.len())
            .finish()
    }
}
