//! [`Limiter`]: one shared rate budget, handed out first-come first-served.
//!
//! The decision of whether an event may go now is pure (see `pacing`): it
//! takes tokio's `now` and answers "go" or "not before T". Waiting lives in
//! the [`acquire`](Limiter::acquire) future, on tokio timers only.
//!
//! # Why a line with due instants, granted by whoever looks
//!
//! A lone atomic GCRA word (as in `governor`) lets whichever task polls
//! first after a token frees up take it, so one busy stage can starve
//! another. Here waiters line up, first come first served. But a line
//! whose head must be polled to move is a trap: a waiter that nobody polls
//! (a stage whose consumer is busy, a `throttle` upstream of a full fetch
//! stage) would hold up everyone behind it, for ever. So the line never
//! waits for its head. Every waiter sleeps until its own due instant, and
//! whoever looks at the line (any waiter, or [`check`](Limiter::check))
//! first grants every waiter ahead whose instant has come, in order, on
//! its behalf, dated at that instant; the owner finds its token granted
//! when it is next polled. Nobody's wait depends on anybody else being
//! polled.
//!
//! Tokens are dated at their ideal instant (when the waiter was due), not
//! at the moment somebody looked, so a timer that fires late costs no
//! capacity and the rate is exact at every burst. Only lateness up to one
//! timer tick is forgiven this way: a waiter looked at later than that was
//! held up by something else, and dating it far back would let it go out
//! in a burst with those on time. A waiter dropped before
//! its token was granted takes nothing, and those behind it move up. A
//! waiter honouring a [`PauseHandle`] keeps its place during the pause but
//! is dated no earlier than the pause's end, so the end is not a burst.
//!
//! No lock is held while a waker is woken or dropped: wakers are carried
//! out of the lock and woken after it.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
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

/// tokio's timer resolution: a timer fires up to this late, by design.
const TIMER_TICK_NANOS: u64 = 1_000_000;

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

struct State {
    rate: Rate,
    pacing: Pacing,
    /// Waiters in arrival order, granted ones included until their owner
    /// takes the token (or drops).
    queue: VecDeque<Waiter>,
    next_id: u64,
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

/// The earliest instant, not before `t`, at which the pacing and the
/// server's advertised quotas let a token go.
fn earliest(pacing: &Pacing, advert: Option<&Advert>, t: u64) -> u64 {
    let t = advert.and_then(|a| a.earliest(t)).map_or(t, |at| at.max(t));
    pacing.earliest(t)
}

/// Takes a token dated `t`, which must be `earliest(.., t)`.
fn take(pacing: &mut Pacing, advert: Option<&mut Advert>, t: u64) {
    let taken = pacing.take(t);
    debug_assert_eq!(taken, Ok(()), "a token taken before its instant");
    if let Some(advert) = advert {
        advert.take(t);
    }
}

/// A copy of the budget (the pacing and the advertised quotas), to play the
/// line forward on without touching the real one.
struct Budget {
    pacing: Pacing,
    advert: Option<Advert>,
}

impl Budget {
    fn earliest(&self, t: u64) -> u64 {
        earliest(&self.pacing, self.advert.as_ref(), t)
    }

    fn take(&mut self, t: u64) {
        take(&mut self.pacing, self.advert.as_mut(), t);
    }
}

impl State {
    fn budget(&self) -> Budget {
        Budget {
            pacing: self.pacing.clone(),
            advert: self.advert.clone(),
        }
    }

    fn earliest(&self, t: u64) -> u64 {
        earliest(&self.pacing, self.advert.as_ref(), t)
    }

    /// Takes a token dated `t`, which must be `earliest(t)`.
    fn take(&mut self, t: u64) {
        take(&mut self.pacing, self.advert.as_mut(), t);
        self.outstanding += 1;
    }

    /// Grants, in line order, every waiter whose token is due by `now`,
    /// each dated at its due instant, and hands back their wakers. A waiter
    /// still paused is passed over (it keeps its place); the first one not
    /// yet due stops the walk, so nobody overtakes it.
    fn settle(&mut self, now: u64, floor: &dyn Fn(&Waiter) -> u64, woken: &mut Vec<Waker>) {
        let mut previous = 0;
        for i in 0..self.queue.len() {
            let waiter = &self.queue[i];
            if waiter.granted {
                continue;
            }
            let lower = floor(waiter);
            if lower > now {
                continue;
            }
            let due = self.earliest(lower).max(previous);
            if due > now {
                break;
            }
            // Dated at its due instant if looked at less than a timer tick
            // after it (a late timer costs nothing); a waiter looked at later than
            // that was held up by something else (a busy thread, a consumer
            // that did not poll), and a token dated far back would let its
            // request go out in a burst with those on time.
            let dated = due.max(now.saturating_sub(TIMER_TICK_NANOS - 1));
            self.take(dated);
            previous = dated;
            let waiter = &mut self.queue[i];
            waiter.granted = true;
            waiter.dated = dated;
            woken.extend(waiter.waker.take());
        }
    }

    /// When waiter `id` is due if nothing changes (`None`: a newcomer at
    /// the back of the line): its place in line played forward on a copy of
    /// the budget. Waiters ahead that are paused are left out, so this is
    /// never later than the truth; a waiter woken early just looks again.
    fn due(&self, id: Option<u64>, now: u64, floor: &dyn Fn(&Waiter) -> u64) -> u64 {
        let mut budget = self.budget();
        // Nobody goes before those ahead, even where the burst tolerance
        // would let a later token conform sooner.
        let mut ahead = now;
        for waiter in &self.queue {
            if waiter.granted {
                continue;
            }
            let lower = floor(waiter);
            if Some(waiter.id) == id {
                return budget.earliest(lower).max(ahead);
            }
            if lower > now {
                continue;
            }
            ahead = budget.earliest(lower).max(ahead);
            budget.take(ahead);
        }
        budget.earliest(now).max(ahead)
    }

    /// Every waiter must work out its due instant again (the rate or the
    /// quota changed): their wakers, to wake once the lock is released.
    fn rate_changed(&mut self) -> Vec<Waker> {
        self.queue
            .iter_mut()
            .filter(|w| !w.granted)
            .filter_map(|w| w.waker.take())
            .collect()
    }
}

struct Waiter {
    id: u64,
    /// When it joined the line (nanoseconds since the epoch): no token is
    /// dated before.
    arrived: u64,
    /// The pause it honours: no token is dated before that pause ends.
    pause: Option<PauseHandle>,
    waker: Option<Waker>,
    /// A token was granted to it; the owner takes it when next polled.
    granted: bool,
    /// The instant its token is dated, once granted.
    dated: u64,
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
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
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
        wall_now: impl FnOnce() -> SystemTime,
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
        let mut woken = Vec::new();
        if let Some(per_second) = changed {
            let rate = Rate::per_second_f64_burst(per_second, state.rate.burst_size());
            state.pacing.retune(&rate, self.offset(now));
            woken = state.rate_changed();
        }
        let observed = Observed {
            changed,
            learned,
            malformed,
        };
        drop(state);
        woken.into_iter().for_each(Waker::wake);
        observed
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
        if self.shared.remote.is_some() {
            return Err(NotUntil { earliest: now });
        }
        let offset = self.offset(now);
        let floor = self.floor();
        let mut woken = Vec::new();
        let verdict = {
            let mut state = self.lock();
            state.settle(offset, &floor, &mut woken);
            // After everyone eligible in line: a newcomer's turn.
            let waiting = state.queue.iter().any(|w| !w.granted && floor(w) <= offset);
            let due = if waiting {
                state.due(None, offset, &floor)
            } else {
                state.earliest(offset)
            };
            if due <= offset {
                state.take(offset);
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
        if let Some(remote) = &self.shared.remote {
            return remote.clone().acquire(pause).await;
        }
        self.acquire_local(pause).await;
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

    async fn acquire_local(self, pause: Option<PauseHandle>) {
        if !pause.as_ref().is_some_and(PauseHandle::is_paused) && self.check().is_ok() {
            return;
        }
        let mut ticket = self.join(pause.clone());
        loop {
            if let Some(pause) = &pause {
                pause.ready().await;
            }
            if self.wait_in_line(&mut ticket).await {
                return;
            }
        }
    }

    /// Waits in line until the token is granted (`true`), or until the
    /// waiter's own pause is found in force (`false`: wait it out, keeping
    /// the place, and come back).
    async fn wait_in_line(&self, ticket: &mut Ticket<'_>) -> bool {
        let floor = self.floor();
        let mut sleep: Option<Pin<Box<tokio::time::Sleep>>> = None;
        std::future::poll_fn(|cx| loop {
            let now = self.offset(Instant::now());
            let mut woken = Vec::new();
            let mut stale = None;
            let mut old_waker = None;
            let step = {
                let mut state = self.lock();
                let pos = state
                    .queue
                    .iter()
                    .position(|w| w.id == ticket.id)
                    .expect("a waiter stays in line until its ticket is dropped");
                let waiter = &mut state.queue[pos];
                if waiter.granted && waiter.dated < floor(waiter) {
                    // Granted, then a pause began before the owner came for
                    // the token: sent now, it would go out with those due
                    // at the pause's end, in a burst. It is spent; the
                    // waiter keeps its place and is granted anew.
                    waiter.granted = false;
                    state.outstanding = state.outstanding.saturating_sub(1);
                }
                state.settle(now, &floor, &mut woken);
                if state.queue[pos].granted {
                    stale = state.queue.remove(pos);
                    ticket.served = true;
                    Err(true)
                } else if floor(&state.queue[pos]) > now {
                    // Paused: those behind counted on this waiter's turn
                    // and may now be due sooner.
                    woken.extend(
                        state
                            .queue
                            .range_mut(pos + 1..)
                            .filter(|w| !w.granted)
                            .filter_map(|w| w.waker.take()),
                    );
                    Err(false)
                } else {
                    let due = state.due(Some(ticket.id), now, &floor);
                    let waiter = &mut state.queue[pos];
                    if !waiter
                        .waker
                        .as_ref()
                        .is_some_and(|w| w.will_wake(cx.waker()))
                    {
                        // The old waker is dropped below, outside the lock.
                        old_waker = waiter.waker.replace(cx.waker().clone());
                    }
                    Ok(due)
                }
            };
            drop((stale, old_waker));
            woken.into_iter().for_each(Waker::wake);
            let due = match step {
                Err(granted) => return Poll::Ready(granted),
                Ok(due) => {
                    // Everyone due by `now` was just granted.
                    debug_assert!(due > now, "waiter {} due at {due}, now {now}", ticket.id);
                    self.instant(due.max(now + 1))
                }
            };
            match &mut sleep {
                Some(sleep) if sleep.deadline() == due => {}
                Some(sleep) => sleep.as_mut().reset(due),
                None => sleep = Some(Box::pin(tokio::time::sleep_until(due))),
            }
            if let Some(sleep) = sleep.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
        })
        .await
    }

    /// Joins the back of the line, honouring `pause`.
    fn join(&self, pause: Option<PauseHandle>) -> Ticket<'_> {
        let arrived = self.offset(Instant::now());
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.queue.push_back(Waiter {
            id,
            arrived,
            pause,
            waker: None,
            granted: false,
            dated: 0,
        });
        Ticket {
            limiter: self,
            id,
            served: false,
        }
    }

    /// The earliest instant a waiter's token may be dated: when it arrived,
    /// or when its pause ends, whichever is later.
    fn floor(&self) -> impl Fn(&Waiter) -> u64 + '_ {
        move |waiter| {
            let pause_end = waiter
                .pause
                .as_ref()
                .and_then(PauseHandle::last_end)
                .map_or(0, |end| self.offset(end));
            waiter.arrived.max(pause_end)
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

/// A place in line. Dropped before its token was granted, it takes
/// nothing, and those behind it look again (they may be due sooner).
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
        let mut woken = Vec::new();
        let left = {
            let mut state = self.limiter.lock();
            let Some(pos) = state.queue.iter().position(|w| w.id == self.id) else {
                return;
            };
            let left = state.queue.remove(pos);
            if left.as_ref().is_some_and(|w| w.granted) {
                // Granted but never taken: the token is spent, no request went.
                state.outstanding = state.outstanding.saturating_sub(1);
            } else {
                woken.extend(
                    state
                        .queue
                        .range_mut(pos..)
                        .filter(|w| !w.granted)
                        .filter_map(|w| w.waker.take()),
                );
            }
            left
        };
        // Its waker and pause handle are dropped here, outside the lock.
        drop(left);
        woken.into_iter().for_each(Waker::wake);
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
