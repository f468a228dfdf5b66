//! What a [`Limiter`] learns from the responses to its tokens: the quotas a
//! server advertises (held until their reset), the opt-in learner's rate,
//! and its count of requests in flight.

use std::task::Waker;
use std::time::SystemTime;

use bytes::Bytes;
use http::Response;
use tokio::time::Instant;

use super::adaptive::{Adaptive, Learner};
use super::advertised;
use super::line::{Advert, State};
use super::Limiter;
use crate::error::TransportError;
use crate::rate::Rate;

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

impl Limiter {
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
        now: Instant,
        wall_now: impl FnOnce() -> Option<SystemTime>,
    ) -> Observed {
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
        } else if refused
            || outcome
                .as_ref()
                .map_or(true, |r| r.status().is_server_error())
        {
            // A refusal the headers explain (a quota spent until its reset)
            // is waited out by the hold; it says nothing about the pace.
            // Nor does a failure (an outage's 503, a reset): counted as
            // accepted, it would make a measurement under-cut, and probing
            // up on it would raise the pace while the server is down.
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
}
