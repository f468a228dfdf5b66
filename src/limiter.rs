//! [`Limiter`]: one shared rate budget, handed out first-come first-served.
//!
//! The decision of whether an event may go now is pure (see `pacing`): it
//! takes tokio's `now` and answers "go" or "not before T". Waiting lives in
//! the [`acquire`](Limiter::acquire) future, on tokio timers only.
//!
//! # Why a queue and not only an atomic word
//!
//! A lone atomic GCRA word (as in `governor`) lets whichever task polls
//! first after a token frees up take it, so one busy stage can starve
//! another, and it cannot be cancelled cleanly: a task that reserved a
//! future slot and then went away leaves a hole. Here waiters line up;
//! only the head of the line consults the pacing state, and a token is
//! taken only at the moment it is granted. Dropping a waiter just leaves
//! the line, so no capacity leaks, and [`set_rate`](Limiter::set_rate)
//! wakes the head to recompute its wait.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Response;

use tokio::time::Instant;

use crate::error::TransportError;
use crate::pause::PauseHandle;
use crate::rate::Rate;

mod adaptive;
pub(crate) mod advertised;
mod keyed;
mod pacing;

pub use self::adaptive::Adaptive;
use self::adaptive::Learner;
pub use self::keyed::KeyedLimiter;
use self::pacing::Pacing;

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
    #[cfg(feature = "redis")]
    remote: Option<Remote>,
}

#[cfg(feature = "redis")]
struct Remote {
    limit: Arc<crate::redis::RemoteLimit>,
    rate: Mutex<Rate>,
}

struct State {
    rate: Rate,
    pacing: Pacing,
    queue: VecDeque<Waiter>,
    next_id: u64,
    /// Bumped when the rate changes so a sleeping head recomputes its deadline.
    generation: u64,
    /// Opt-in: the controller that learns the server's limit.
    learner: Option<Learner>,
    /// What the server last said is left of its window, and when it resets.
    advert: Option<Advert>,
    /// Tokens granted whose request has not been reported back yet.
    outstanding: u64,
    /// Rate-limit headers ignored as malformed.
    malformed: u64,
}

/// What is left of each quota policy the server advertised, and when each
/// resets: a token goes only when [`earliest`](advertised::Held::earliest)
/// says so, and [`take`](advertised::Held::take) counts it against all.
type Advert = advertised::Held;

impl State {
    /// Takes a token at `now` if the pacing and the server's advertised
    /// quota allow it; otherwise says from when.
    fn grant(&mut self, now: u64) -> Result<(), u64> {
        if let Some(at) = self.advert.as_ref().and_then(|a| a.earliest(now)) {
            return Err(at);
        }
        self.pacing.take(now)?;
        if let Some(advert) = &mut self.advert {
            advert.take();
        }
        self.outstanding += 1;
        Ok(())
    }

    fn rate_changed(&mut self) {
        self.generation += 1;
        wake_head(self);
    }
}

struct Waiter {
    id: u64,
    waker: Option<Waker>,
}

/// What a limiter made of an answer, all read under one lock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Observed {
    /// The learned rate, when this answer changed it.
    pub(crate) changed: Option<f64>,
    /// The learned rate now, with adaptive pacing on.
    pub(crate) learned: Option<f64>,
    /// Rate-limit headers ignored so far.
    pub(crate) malformed: u64,
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

impl Limiter {
    /// A limiter enforcing `rate`, starting now.
    pub fn new(rate: Rate) -> Self {
        Self::build(rate)
    }

    /// A limiter decided by `remote` at `shared_rate`, falling back to the
    /// local state at `local_rate`.
    #[cfg(feature = "redis")]
    pub(crate) fn with_remote(
        local_rate: Rate,
        shared_rate: Rate,
        remote: Arc<crate::redis::RemoteLimit>,
    ) -> Self {
        let mut limiter = Self::build(local_rate);
        Arc::get_mut(&mut limiter.shared)
            .expect("fresh limiter")
            .remote = Some(Remote {
            limit: remote,
            rate: Mutex::new(shared_rate),
        });
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
                    generation: 0,
                    learner: None,
                    advert: None,
                    outstanding: 0,
                    malformed: 0,
                }),
                #[cfg(feature = "redis")]
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
        #[cfg(feature = "redis")]
        if let Some(remote) = &self.shared.remote {
            *remote
                .rate
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = rate;
            return;
        }
        let now = Instant::now();
        let mut state = self.lock();
        state.rate = rate;
        state.pacing.retune(&rate, self.offset(now));
        if let Some(learner) = &mut state.learner {
            *learner = Learner::new(learner.config().clone(), rate.per_second_f64(), now);
        }
        state.rate_changed();
    }

    /// Turns on adaptive pacing: the rate given is the ceiling, and the
    /// limiter learns the server's real limit from its refusals (see
    /// [`Adaptive`]). Every clone learns together.
    pub fn adaptive(self, config: Adaptive) -> Self {
        {
            let mut state = self.lock();
            let ceiling = state.rate.per_second_f64();
            state.learner = Some(Learner::new(config, ceiling, Instant::now()));
        }
        self
    }

    /// The rate learned so far, in events per second, with adaptive pacing
    /// on: the pace tokens are granted at, never above the ceiling or a
    /// quota the server stated. (An advertised quota that has run out holds
    /// tokens until its reset on top of this pace.)
    pub fn learned_rate(&self) -> Option<f64> {
        self.lock().learner.as_ref().map(Learner::current)
    }

    /// How many rate-limit headers were ignored as malformed or absurd.
    pub fn malformed_headers(&self) -> u64 {
        self.lock().malformed
    }

    /// Learns from the outcome of a request sent with a token from this
    /// limiter: the server's advertised quota (rate-limit headers) and, with
    /// adaptive pacing, whether it refused.
    pub(crate) fn observe(
        &self,
        outcome: &Result<Response<Bytes>, TransportError>,
        wall_now: fn() -> SystemTime,
    ) -> Observed {
        let now = Instant::now();
        let reading = outcome
            .as_ref()
            .map(|r| advertised::read(r.headers(), wall_now))
            .unwrap_or_default();
        let mut state = self.lock();
        state.outstanding = state.outstanding.saturating_sub(1);
        state.malformed += u64::from(reading.malformed);
        let at = self.offset(now);
        let advertised = reading.advertised.unwrap_or_default();
        if !advertised.limits.is_empty() {
            let in_flight = state.outstanding;
            state.advert.get_or_insert_with(Advert::default).update(
                &advertised.limits,
                at,
                in_flight,
            );
        }
        let malformed = state.malformed;
        let State {
            learner, advert, ..
        } = &mut *state;
        let Some(learner) = learner.as_mut() else {
            return Observed {
                changed: None,
                learned: None,
                malformed,
            };
        };
        let refused = learner.matcher().matches(outcome);
        let changed = if refused && !advertised.exhausted() {
            learner.refusal(now)
        } else if let Some(quota) = advertised.quota {
            // A server that states its quota per window saves the learning;
            // with several policies, the most restrictive one.
            learner.stated(quota.per_second(), now)
        } else if refused || outcome.is_err() {
            // A refusal the headers explain (a quota spent until its reset)
            // is waited out by the hold; it says nothing about the pace.
            None
        } else {
            // Probe up only when the pace is what limits sending: while an
            // advertised quota does, a higher rate would never be tried,
            // and the learned rate would drift above what is sent.
            let held = advert
                .as_ref()
                .is_some_and(|a| a.binds(at, learner.current()));
            learner.success(now, !held)
        };
        let learned = Some(learner.current());
        if let Some(per_second) = changed {
            let rate = Rate::per_second_f64_burst(per_second, state.rate.burst_size());
            state.pacing.retune(&rate, self.offset(now));
            state.rate_changed();
        }
        Observed {
            changed,
            learned,
            malformed,
        }
    }

    /// A token's request was dropped before it was answered.
    pub(crate) fn abandoned(&self) {
        let mut state = self.lock();
        state.outstanding = state.outstanding.saturating_sub(1);
    }

    /// Takes a token now if one is free and nobody is waiting ahead.
    ///
    /// # Errors
    ///
    /// [`NotUntil`] when the caller would have to wait; nothing is taken. A
    /// limiter shared through Redis always answers this way (asking Redis
    /// is not instant): use [`acquire`](Self::acquire).
    pub fn check(&self) -> Result<(), NotUntil> {
        let now = Instant::now();
        // A remote limit is only known by asking it, which is not instant.
        #[cfg(feature = "redis")]
        if self.shared.remote.is_some() {
            return Err(NotUntil { earliest: now });
        }
        let mut state = self.lock();
        let earliest = if state.queue.is_empty() {
            match state.grant(self.offset(now)) {
                Ok(()) => return Ok(()),
                Err(at) => self.instant(at),
            }
        } else {
            now
        };
        Err(NotUntil { earliest })
    }

    /// Waits for a token, in line behind earlier callers.
    ///
    /// Cancel safe: a dropped `acquire` leaves the line and takes nothing.
    pub fn acquire(&self) -> impl Future<Output = ()> + Send + 'static {
        self.clone().acquire_until_granted(None)
    }

    /// Like [`acquire`](Self::acquire), but grants nothing while `pause` is
    /// in force, so a pause never turns into a burst when it ends.
    pub fn acquire_during(&self, pause: &PauseHandle) -> impl Future<Output = ()> + Send + 'static {
        self.clone().acquire_until_granted(Some(pause.clone()))
    }

    /// Waits for a token however long it takes: a limiter that cannot be
    /// consulted (Redis down, failing closed) means waiting, never going.
    pub(crate) async fn acquire_until_granted(self, pause: Option<PauseHandle>) {
        while let Err(e) = self.clone().acquire_owned(pause.clone()).await {
            tracing::warn!(error = %e, "still waiting for the rate limiter");
        }
    }

    /// Waits for a token; fails only when a remote limiter that fails closed
    /// stayed unreachable past its limit.
    pub(crate) async fn acquire_owned(self, pause: Option<PauseHandle>) -> Result<(), String> {
        #[cfg(feature = "redis")]
        if let Some(remote) = &self.shared.remote {
            return self.acquire_remote(remote, pause).await;
        }
        self.acquire_local(pause).await;
        Ok(())
    }

    #[cfg(feature = "redis")]
    async fn acquire_remote(
        &self,
        remote: &Remote,
        pause: Option<PauseHandle>,
    ) -> Result<(), String> {
        use crate::redis::{FailureMode, Reply};
        let started = Instant::now();
        loop {
            if let Some(pause) = &pause {
                pause.ready().await;
            }
            let rate = *remote
                .rate
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match remote.limit.take(&rate).await {
                Reply::Granted => return Ok(()),
                Reply::NotYet(wait) => tokio::time::sleep(wait).await,
                Reply::Paused(left) => match &pause {
                    Some(pause) => pause.pause_local(left),
                    None => tokio::time::sleep(left).await,
                },
                Reply::Unavailable(error) => match remote.limit.failure() {
                    FailureMode::FallbackLocal { .. } => {
                        self.clone().acquire_local(pause).await;
                        return Ok(());
                    }
                    FailureMode::FailClosed { give_up_after } => {
                        if started.elapsed() >= give_up_after {
                            return Err(format!(
                                "rate limiter unreachable for {give_up_after:?}: {error}"
                            ));
                        }
                        tokio::time::sleep(remote.limit.retry_every()).await;
                    }
                },
            }
        }
    }

    /// How many callers are waiting in line.
    pub fn waiting(&self) -> usize {
        self.lock().queue.len()
    }

    async fn acquire_local(self, pause: Option<PauseHandle>) {
        let mut ticket: Option<Ticket<'_>> = None;
        loop {
            if let Some(pause) = &pause {
                pause.ready().await;
            }
            let now = Instant::now();
            let (deadline, generation) = {
                let mut state = self.lock();
                let ours = ticket.as_ref().map(|t| t.id);
                let at_head = state.queue.front().map(|w| w.id) == ours;
                if !at_head {
                    if ticket.is_none() {
                        ticket = Some(self.enqueue(&mut state));
                    }
                    (None, state.generation)
                } else if pause.as_ref().is_some_and(PauseHandle::is_paused) {
                    // A pause began since `ready`; wait it out at the head.
                    continue;
                } else {
                    match state.grant(self.offset(now)) {
                        Ok(()) => {
                            if let Some(ticket) = ticket.as_mut() {
                                state.queue.pop_front();
                                ticket.served = true;
                                wake_head(&mut state);
                            }
                            return;
                        }
                        Err(at) => {
                            if ticket.is_none() {
                                ticket = Some(self.enqueue(&mut state));
                            }
                            (Some(self.instant(at)), state.generation)
                        }
                    }
                }
            };
            let id = ticket.as_ref().map_or(0, |t| t.id);
            self.wait_turn(id, deadline, generation).await;
        }
    }

    /// Resolves when the waiter `id` should look again: its deadline passed,
    /// the rate changed, or (with no deadline) it reached the head.
    async fn wait_turn(&self, id: u64, deadline: Option<Instant>, generation: u64) {
        let mut sleep = pin!(deadline.map(tokio::time::sleep_until));
        std::future::poll_fn(|cx| {
            if let Some(sleep) = sleep.as_mut().as_pin_mut() {
                if sleep.poll(cx).is_ready() {
                    return Poll::Ready(());
                }
            }
            let mut state = self.lock();
            if state.generation != generation {
                return Poll::Ready(());
            }
            if deadline.is_none() && state.queue.front().map(|w| w.id) == Some(id) {
                return Poll::Ready(());
            }
            if let Some(waiter) = state.queue.iter_mut().find(|w| w.id == id) {
                match &waiter.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => waiter.waker = Some(cx.waker().clone()),
                }
            }
            Poll::Pending
        })
        .await;
    }

    fn enqueue(&self, state: &mut State) -> Ticket<'_> {
        let id = state.next_id;
        state.next_id += 1;
        state.queue.push_back(Waiter { id, waker: None });
        Ticket {
            limiter: self,
            id,
            served: false,
        }
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

fn wake_head(state: &mut State) {
    if let Some(head) = state.queue.front_mut() {
        if let Some(waker) = head.waker.take() {
            waker.wake();
        }
    }
}

/// A place in line; leaving the line (by drop) wakes the next head.
struct Ticket<'a> {
    limiter: &'a Limiter,
    id: u64,
    served: bool,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.served {
            return;
        }
        let mut state = self.limiter.lock();
        if let Some(pos) = state.queue.iter().position(|w| w.id == self.id) {
            state.queue.remove(pos);
            if pos == 0 {
                wake_head(&mut state);
            }
        }
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
