//! The line of a [`Limiter`]: waiters with due instants, granted by whoever
//! looks.
//!
//! # Why
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
//! capacity. tokio fires a timer up to two ticks late by its own design
//! (see `TIMER_LATENESS_NANOS`), so a waiter woken by its own timer is
//! forgiven up to that much. Any other look is forgiven one tick: a
//! waiter granted on its behalf by somebody else, or looked at late by a
//! busy thread or a consumer that did not poll, is dated at most one tick
//! before the look, and the lateness beyond that is lost, since a token
//! dated far back would let its request go out in a burst with those on
//! time. So in virtual time the rate is exact at every burst (a paused
//! clock wakes a timer on its tick, never a tick late), and in real time
//! a line of waiters keeps its rate. A stream that asks for one token at
//! a time (a `throttle` at burst 1) still runs a few percent under at an
//! interval of one tick: its next item arrives only when the late one is
//! let go, and GCRA dates an arrival no earlier than itself
//! (`benches/RESULTS.md`). A waiter dropped before
//! its token was granted takes nothing, and those behind it move up. A
//! waiter honouring a [`PauseHandle`] keeps its place during the pause but
//! is dated no earlier than the pause's end, so the end lets out no more
//! than the rate's burst.
//!
//! No lock is held while a waker is woken or dropped: wakers are carried
//! out of the lock and woken after it.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Poll, Waker};

use tokio::time::Instant;

use super::adaptive::Learner;
use super::advertised;
use super::pacing::Pacing;
use super::{Limiter, TIMER_LATENESS_NANOS, TIMER_TICK_NANOS};
use crate::pause::PauseHandle;
use crate::rate::Rate;

pub(super) struct State {
    pub(super) rate: Rate,
    pub(super) pacing: Pacing,
    /// Waiters in arrival order, granted ones included until their owner
    /// takes the token (or drops).
    pub(super) queue: VecDeque<Waiter>,
    pub(super) next_id: u64,
    /// Opt-in: the controller that learns the server's limit.
    pub(super) learner: Option<Learner>,
    /// What the server last said is left of its window, and when it resets.
    pub(super) advert: Option<Advert>,
    /// Tokens granted whose request has not been reported back yet.
    pub(super) outstanding: u64,
    /// Rate-limit headers ignored as malformed.
    pub(super) malformed: u64,
}

/// What is left of each quota policy the server advertised, and when each
/// resets: a token goes only when [`earliest`](advertised::Held::earliest)
/// says so, and [`take`](advertised::Held::take) counts it against all.
pub(super) type Advert = advertised::Held;

/// The earliest instant, not before `t`, at which the pacing and the
/// server's advertised quotas let a token go.
pub(super) fn earliest(pacing: &Pacing, advert: Option<&Advert>, t: u64) -> u64 {
    let t = advert.and_then(|a| a.earliest(t)).map_or(t, |at| at.max(t));
    pacing.earliest(t)
}

/// Takes a token dated `t`, which must be `earliest(.., t)`.
pub(super) fn take(pacing: &mut Pacing, advert: Option<&mut Advert>, t: u64) {
    let taken = pacing.take(t);
    debug_assert_eq!(taken, Ok(()), "a token taken before its instant");
    if let Some(advert) = advert {
        advert.take(t);
    }
}

/// A copy of the budget (the pacing and the advertised quotas), to play the
/// line forward on without touching the real one.
pub(super) struct Budget {
    pub(super) pacing: Pacing,
    pub(super) advert: Option<Advert>,
}

impl Budget {
    pub(super) fn earliest(&self, t: u64) -> u64 {
        earliest(&self.pacing, self.advert.as_ref(), t)
    }

    pub(super) fn take(&mut self, t: u64) {
        take(&mut self.pacing, self.advert.as_mut(), t);
    }
}

impl State {
    pub(super) fn budget(&self) -> Budget {
        Budget {
            pacing: self.pacing.clone(),
            advert: self.advert.clone(),
        }
    }

    pub(super) fn earliest(&self, t: u64) -> u64 {
        earliest(&self.pacing, self.advert.as_ref(), t)
    }

    /// Takes a token dated `t`, which must be `earliest(t)`.
    pub(super) fn take(&mut self, t: u64) {
        take(&mut self.pacing, self.advert.as_mut(), t);
    }

    /// Grants, in line order, every waiter whose token is due by `now`,
    /// each dated at its due instant, and hands back their wakers. A waiter
    /// still paused is passed over (it keeps its place); the first one not
    /// yet due stops the walk, so nobody overtakes it. `timer_fired` names
    /// the waiter looking because its own timer fired, if one is.
    pub(super) fn settle(
        &mut self,
        now: u64,
        floor: &dyn Fn(&Waiter) -> u64,
        timer_fired: Option<u64>,
        woken: &mut Vec<Waker>,
    ) {
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
            // after it, or less than the timer's own lateness when its own
            // timer woke it (a late timer costs nothing); looked at later
            // (a busy thread, a consumer that did not poll), as far back as
            // that allows: a token dated far back would let its request go
            // out in a burst with those on time.
            let back = if timer_fired == Some(waiter.id) {
                TIMER_LATENESS_NANOS
            } else {
                TIMER_TICK_NANOS - 1
            };
            let dated = due.max(now.saturating_sub(back));
            self.take(dated);
            self.outstanding += u64::from(self.queue[i].answered);
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
    pub(super) fn due(&self, id: Option<u64>, now: u64, floor: &dyn Fn(&Waiter) -> u64) -> u64 {
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
    pub(super) fn rate_changed(&mut self) -> Vec<Waker> {
        self.queue
            .iter_mut()
            .filter(|w| !w.granted)
            .filter_map(|w| w.waker.take())
            .collect()
    }
}

pub(super) struct Waiter {
    pub(super) id: u64,
    /// When it joined the line (nanoseconds since the epoch): no token is
    /// dated before.
    pub(super) arrived: u64,
    /// The pause it honours: no token is dated before that pause ends.
    pub(super) pause: Option<PauseHandle>,
    pub(super) waker: Option<Waker>,
    /// A token was granted to it; the owner takes it when next polled.
    pub(super) granted: bool,
    /// The instant its token is dated, once granted.
    pub(super) dated: u64,
    /// Its token is for a request whose answer the limiter will hear: it
    /// counts as in flight from its grant.
    pub(super) answered: bool,
}

/// A place in line. Dropped before its token was granted, it takes
/// nothing, and those behind it look again (they may be due sooner).
pub(super) struct Ticket<'a> {
    pub(super) limiter: &'a Limiter,
    pub(super) id: u64,
    pub(super) served: bool,
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
            if let Some(left) = left.as_ref().filter(|w| w.granted) {
                // Granted but never taken: the token is spent, no request went.
                state.outstanding = state.outstanding.saturating_sub(u64::from(left.answered));
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

impl Limiter {
    pub(super) async fn acquire_local(self, pause: Option<PauseHandle>, answered: bool) {
        if !pause.as_ref().is_some_and(PauseHandle::is_paused)
            && self.check_at(Instant::now(), answered).is_ok()
        {
            return;
        }
        let mut ticket = self.join(pause.clone(), answered);
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
    pub(super) async fn wait_in_line(&self, ticket: &mut Ticket<'_>) -> bool {
        let floor = self.floor();
        let mut sleep: Option<Pin<Box<tokio::time::Sleep>>> = None;
        std::future::poll_fn(|cx| loop {
            let now = self.offset(Instant::now());
            let fired = sleep.as_ref().is_some_and(|s| s.is_elapsed());
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
                    let answered = u64::from(waiter.answered);
                    state.outstanding = state.outstanding.saturating_sub(answered);
                }
                state.settle(now, &floor, fired.then_some(ticket.id), &mut woken);
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

    /// Joins the back of the line, honouring `pause`; `answered` as for
    /// [`check_at`](Limiter::check_at).
    pub(super) fn join(&self, pause: Option<PauseHandle>, answered: bool) -> Ticket<'_> {
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
            answered,
        });
        Ticket {
            limiter: self,
            id,
            served: false,
        }
    }

    /// The earliest instant a waiter's token may be dated: when it arrived,
    /// or when its pause ends, whichever is later.
    pub(super) fn floor(&self) -> impl Fn(&Waiter) -> u64 + '_ {
        move |waiter| {
            let pause_end = waiter
                .pause
                .as_ref()
                .and_then(PauseHandle::last_end)
                .map_or(0, |end| self.offset(end));
            waiter.arrived.max(pause_end)
        }
    }
}
