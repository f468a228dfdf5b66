//! Learning a server's limit from its refusals: the pure controller.
//!
//! On a refusal the rate is cut to just under what the server has been
//! accepting (the successes counted over the last window, which is the
//! server's real limit while it is refusing), but never by more than a
//! fixed factor at once. After a quiet stretch it rises additively, a small
//! share of the ceiling at a time, to probe for more. At most one cut per
//! window: the refusals of requests already in flight say nothing new. The
//! result is a sawtooth just under the limit instead of a hammer above it.
//!
//! The rate is always the one the limiter paces at, so what is reported is
//! what is granted: never above the configured ceiling (a floor above it
//! gives way), never above a quota the server stated (probing stops there,
//! and a stated quota below the floor is obeyed), and it does not rise
//! while an advertised quota rather than the pace is holding requests back.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::retry::Matcher;

/// Settings of adaptive pacing (opt-in, see
/// [`Limiter::adaptive`](crate::Limiter::adaptive)).
///
/// ```
/// use std::time::Duration;
/// use sluicegate::{Adaptive, Limiter, Rate};
///
/// let limiter = Limiter::new(Rate::per_second(400).burst(5))
///     .adaptive(Adaptive::new().floor(10.0).probe_every(Duration::from_secs(2)));
/// # let _ = limiter;
/// ```
#[derive(Debug, Clone)]
pub struct Adaptive {
    pub(crate) refusals: Matcher,
    pub(crate) decrease: f64,
    pub(crate) target: f64,
    pub(crate) step: f64,
    pub(crate) probe_every: Duration,
    pub(crate) window: Duration,
    pub(crate) floor: f64,
}

impl Default for Adaptive {
    fn default() -> Self {
        Self {
            refusals: http::StatusCode::TOO_MANY_REQUESTS.into(),
            decrease: 0.85,
            target: 0.97,
            step: 0.01,
            probe_every: Duration::from_secs(1),
            window: Duration::from_secs(1),
            floor: 1.0,
        }
    }
}

impl Adaptive {
    /// Cut on 429, to 97% of the accepted rate (by 15% at most), probe up by
    /// 1% of the ceiling after each quiet second, never below 1/s (unless the
    /// ceiling or a quota the server states is lower).
    pub fn new() -> Self {
        Self::default()
    }

    /// What counts as a refusal (default: status 429).
    pub fn refusals(mut self, matcher: impl Into<Matcher>) -> Self {
        self.refusals = matcher.into();
        self
    }

    /// The lowest rate a refusal can cut to, in events per second. It never
    /// lifts the rate above the limiter's ceiling or a quota the server
    /// states.
    ///
    /// # Panics
    ///
    /// If `per_second` is not a positive number.
    #[track_caller]
    pub fn floor(mut self, per_second: f64) -> Self {
        assert!(
            per_second.is_finite() && per_second > 0.0,
            "Adaptive::floor must be positive"
        );
        self.floor = per_second;
        self
    }

    /// The deepest single cut, as a factor (default 0.85).
    ///
    /// # Panics
    ///
    /// If `factor` is not within (0, 1).
    #[track_caller]
    pub fn decrease(mut self, factor: f64) -> Self {
        assert!(
            factor > 0.0 && factor < 1.0,
            "Adaptive::decrease must be within (0, 1)"
        );
        self.decrease = factor;
        self
    }

    /// How long without a refusal before each additive step up (default 1 s).
    pub fn probe_every(mut self, quiet: Duration) -> Self {
        self.probe_every = quiet;
        self
    }
}

/// The slowest pace a limiter keeps (one event an hour), as
/// `Rate::per_second_f64_burst` clamps it: below it, the rate reported
/// would not be the one granted.
const MIN_PER_SECOND: f64 = 1.0 / 3_600.0;

/// The controller's state, shared by every clone of a limiter.
#[derive(Debug)]
pub(crate) struct Learner {
    config: Adaptive,
    ceiling: f64,
    /// The server's own statement of its quota (already times `target`):
    /// a lower ceiling until it states another.
    stated: Option<f64>,
    current: f64,
    last_cut: Option<Instant>,
    last_change: Instant,
    /// Successes per slot of a tenth of the window, oldest first.
    successes: VecDeque<(Instant, u64)>,
}

impl Learner {
    pub(crate) fn new(config: Adaptive, ceiling: f64, now: Instant) -> Self {
        let ceiling = ceiling.max(MIN_PER_SECOND);
        Self {
            current: ceiling,
            ceiling,
            stated: None,
            config,
            last_cut: None,
            last_change: now,
            successes: VecDeque::new(),
        }
    }

    pub(crate) fn config(&self) -> &Adaptive {
        &self.config
    }

    pub(crate) fn matcher(&self) -> &Matcher {
        &self.config.refusals
    }

    /// The rate in force, events per second.
    pub(crate) fn current(&self) -> f64 {
        self.current
    }

    /// The highest rate in force: the ceiling, or a lower stated quota.
    fn limit(&self) -> f64 {
        self.stated.map_or(self.ceiling, |s| s.min(self.ceiling))
    }

    /// The lowest rate a refusal can cut to: the configured floor, but
    /// never above the limit (a floor over the ceiling would send faster
    /// than the user allowed).
    fn floor(&self) -> f64 {
        self.config.floor.max(MIN_PER_SECOND).min(self.limit())
    }

    /// Successes per second over the last window.
    fn accepted_rate(&mut self, now: Instant) -> f64 {
        self.forget(now);
        let count: u64 = self.successes.iter().map(|(_, n)| n).sum();
        count as f64 / self.config.window.as_secs_f64()
    }

    fn forget(&mut self, now: Instant) {
        while self
            .successes
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) >= self.config.window)
        {
            self.successes.pop_front();
        }
    }

    /// A success at `now`; returns the new rate if it rises. It rises only
    /// if `may_probe`: when the pace, not something else, limits sending.
    pub(crate) fn success(&mut self, now: Instant, may_probe: bool) -> Option<f64> {
        let slot = self.config.window / 10;
        match self.successes.back_mut() {
            Some((start, n)) if now.saturating_duration_since(*start) < slot => *n += 1,
            _ => self.successes.push_back((now, 1)),
        }
        let quiet = self
            .last_cut
            .is_none_or(|cut| now.saturating_duration_since(cut) >= self.config.probe_every);
        let limit = self.limit();
        if may_probe
            && quiet
            && now.saturating_duration_since(self.last_change) >= self.config.probe_every
            && self.current < limit
        {
            self.current = (self.current + self.config.step * self.ceiling).min(limit);
            self.last_change = now;
            return Some(self.current);
        }
        None
    }

    /// The server stated its limit (a quota per window, `per_second` > 0):
    /// keep under it, even below the floor, and probe no higher until it
    /// states another. A new statement is taken at once; the same one
    /// repeated only keeps the rate under it, so it does not undo a cut.
    /// Returns the new rate if it changed.
    pub(crate) fn stated(&mut self, per_second: f64, now: Instant) -> Option<f64> {
        let stated = (per_second * self.config.target).max(MIN_PER_SECOND);
        let news = self.stated != Some(stated);
        self.stated = Some(stated);
        let next = if news {
            self.limit()
        } else {
            self.current.min(self.limit())
        };
        if (next - self.current).abs() < f64::EPSILON {
            return None;
        }
        self.current = next;
        self.last_change = now;
        Some(next)
    }

    /// A refusal at `now`; returns the new rate if it is cut.
    pub(crate) fn refusal(&mut self, now: Instant) -> Option<f64> {
        if self
            .last_cut
            .is_some_and(|cut| now.saturating_duration_since(cut) < self.config.window)
        {
            return None; // refusals of requests already in flight: no news
        }
        let accepted = self.accepted_rate(now) * self.config.target;
        let by_factor = self.current * self.config.decrease;
        // Just under what the server took, but never more than a fixed cut
        // at once: while items sit out their Retry-After, fewer successes
        // come back than the server would take, and the count undershoots.
        let next = if accepted > 0.0 {
            accepted.max(by_factor)
        } else {
            by_factor
        };
        self.current = next.min(self.current).max(self.floor());
        self.last_cut = Some(now);
        self.last_change = now;
        Some(self.current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn cuts_to_what_was_accepted_then_probes_up() {
        let t0 = Instant::now();
        let mut learner = Learner::new(Adaptive::new(), 400.0, t0);
        // 200 successes over the last second: the server's real limit.
        for i in 0..200u64 {
            assert_eq!(
                learner.success(t0 + Duration::from_millis(i * 5), true),
                None
            );
        }
        let cut_at = t0 + Duration::from_millis(1_000);
        // Never more than 15% at once: 400 -> 340, not straight to 194.
        let cut = learner.refusal(cut_at).unwrap();
        assert_eq!(cut, 340.0);
        // More refusals in the same window change nothing.
        assert_eq!(learner.refusal(cut_at + Duration::from_millis(10)), None);
        // A quiet second later, one step of 1% of the ceiling.
        let up = learner
            .success(cut_at + Duration::from_secs(1), true)
            .unwrap();
        assert!((up - (cut + 4.0)).abs() < 1e-9, "{up}");
        assert_eq!(
            learner.success(cut_at + Duration::from_millis(1_500), true),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn never_goes_below_the_floor() {
        let t0 = Instant::now();
        let mut learner = Learner::new(Adaptive::new().floor(5.0), 10.0, t0);
        for s in 0..20 {
            learner.refusal(t0 + Duration::from_secs(s * 2));
        }
        assert_eq!(learner.current(), 5.0);
    }
}
