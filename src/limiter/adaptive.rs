//! Learning a server's limit from its refusals: the pure controller.
//!
//! The first refusal after a quiet stretch opens a measurement: the
//! answers that come back are counted, accepted and refused, until
//! [`MEASURED_REFUSALS`] refusals among at least [`MEASURED_ANSWERS`]
//! answers (or a window, whichever comes first). A server refusing the
//! excess accepts its limit and refuses the rest, so the share it accepted
//! is its answer to "how much of this pace do you take": the rate is cut at
//! once to that share of the pace in force, times a margin (multiplicative
//! decrease to the measured acceptance, not a fixed step per second).
//! Counting to a number of refusals bounds what learning wastes whatever
//! the excess: far over the limit it takes a few tens of milliseconds, just
//! over it (a probe) up to a window at a few refusals a second. After a
//! quiet stretch the rate rises additively, a small share of the ceiling at
//! a time, to probe for more. At most one cut per window: the refusals of
//! requests already in flight say nothing new. The result is one short
//! burst of refusals, then a sawtooth just under the limit.
//!
//! The share errs only on the high side: when fewer requests went out than
//! the pace allows (slots held by items sitting out a Retry-After), the
//! server saw less than the pace and refused a smaller share, so the cut
//! falls short of the limit, never below it, and the next refusals cut
//! again. Counting successes per second instead would undershoot exactly
//! then.
//!
//! The rate is always the one the limiter paces at, so what is reported is
//! what is granted: never above the configured ceiling (a floor above it
//! gives way), never above a quota the server stated (probing stops there,
//! and a stated quota below the floor is obeyed), and it does not rise
//! while an advertised quota rather than the pace is holding requests back.

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
    /// Cut on 429, to 97% of the share of the pace the server accepted
    /// (counted over the answers after the first refusal, up to ten more
    /// refusals or a second), probe up by 1% of the ceiling after each
    /// quiet second, never below 1/s (unless the ceiling or a quota the
    /// server states is lower).
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

    /// The cut, as a factor (default 0.85), when a measurement found the
    /// server accepting nothing at all: a server refusing everything says
    /// nothing about the pace it would take, so the rate steps down instead
    /// of dropping to the floor at once.
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

/// The refusals a measurement counts before it cuts: enough that one more
/// or less moves the share little, few enough that learning far over a
/// limit wastes only these (and the requests in flight), fewer than the
/// slots a pipeline usually has, so items sitting out a `Retry-After` do
/// not hold all of them.
const MEASURED_REFUSALS: u64 = 10;

/// The fewest answers a measurement counts before it cuts: with fewer, the
/// share is too coarse (two answers can only say 0, 50 or 100%).
const MEASURED_ANSWERS: u64 = 20;

/// The answers counted since the refusal that opened a measurement.
#[derive(Debug, Clone, Copy)]
struct Measurement {
    since: Instant,
    accepted: u64,
    refused: u64,
}

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
    /// Open from a refusal (outside the window after a cut) until the cut.
    measuring: Option<Measurement>,
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
            measuring: None,
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

    /// Counts an answer into an open measurement; cuts when it is complete.
    fn measure(&mut self, now: Instant, accepted: bool) -> Option<f64> {
        let m = self.measuring.as_mut()?;
        if accepted {
            m.accepted += 1;
        } else {
            m.refused += 1;
        }
        let answers = m.accepted + m.refused;
        let elapsed = now.saturating_duration_since(m.since);
        // Complete with enough refusals among enough answers, or after a
        // whole window with whatever came back (just over the limit, or at
        // a slow pace, refusals come seldom).
        let enough = m.refused >= MEASURED_REFUSALS && answers >= MEASURED_ANSWERS;
        if !(enough || elapsed >= self.config.window) {
            return None;
        }
        let m = self.measuring.take()?;
        let next = if m.accepted == 0 {
            self.current * self.config.decrease
        } else {
            self.current * (m.accepted as f64 / answers as f64) * self.config.target
        };
        self.current = next.min(self.current).max(self.floor());
        self.last_cut = Some(now);
        self.last_change = now;
        Some(self.current)
    }

    /// A success at `now`; returns the new rate if it changes: cut when it
    /// completes a measurement, raised if `may_probe` (the pace, not
    /// something else, limits sending) after a quiet stretch.
    pub(crate) fn success(&mut self, now: Instant, may_probe: bool) -> Option<f64> {
        if self.measuring.is_some() {
            return self.measure(now, true);
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
        // A measurement taken at another pace would scale the wrong rate.
        self.measuring = None;
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
        if self.measuring.is_none() {
            // The opening refusal is not counted: a measurement that ends
            // on its tenth refusal then spans whole periods of a server's
            // accept-refuse alternation, not one refusal more.
            self.measuring = Some(Measurement {
                since: now,
                accepted: 0,
                refused: 0,
            });
            return None;
        }
        self.measure(now, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn cuts_to_the_share_accepted_then_probes_up() {
        let t0 = Instant::now();
        let mut learner = Learner::new(Adaptive::new(), 400.0, t0);
        // The first refusal opens a measurement; nothing is cut yet.
        assert_eq!(learner.refusal(t0), None);
        // Every other answer accepted, one each 2 ms: a server taking half
        // of 400/s.
        for i in 1..=19u64 {
            let at = t0 + Duration::from_millis(2 * i);
            let changed = if i % 2 == 1 {
                learner.success(at, true)
            } else {
                learner.refusal(at)
            };
            assert_eq!(changed, None, "answer {i}");
        }
        // The tenth refusal after the opening one completes it: 10 of 20
        // accepted, so 97% of half the pace, in one cut.
        let cut_at = t0 + Duration::from_millis(40);
        let cut = learner.refusal(cut_at).unwrap();
        assert_eq!(cut, 400.0 * 0.5 * 0.97);
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
    async fn a_rare_refusal_is_measured_over_a_window() {
        let t0 = Instant::now();
        let mut learner = Learner::new(Adaptive::new(), 20.0, t0);
        assert_eq!(learner.refusal(t0), None);
        // One refusal among answers at 20/s: just over the limit.
        for i in 1..20u64 {
            let at = t0 + Duration::from_millis(50 * i);
            assert_eq!(learner.success(at, true), None, "answer {i}");
        }
        // A window after the refusal, all 20 answers since accepted: the
        // excess was too small to show, so only the margin is taken off.
        let cut = learner.success(t0 + Duration::from_secs(1), true);
        assert_eq!(cut, Some(20.0 * 0.97));
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_accepted_steps_down_by_the_factor() {
        let t0 = Instant::now();
        let mut learner = Learner::new(Adaptive::new(), 100.0, t0);
        for i in 0..20u64 {
            assert_eq!(learner.refusal(t0 + Duration::from_millis(5 * i)), None);
        }
        assert_eq!(
            learner.refusal(t0 + Duration::from_millis(100)),
            Some(100.0 * 0.85)
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
