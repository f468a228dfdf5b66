//! [`Backoff`]: how long to wait before a retry, and when to stop retrying.

use std::time::Duration;

use super::RetryBudget;

/// A retry policy: a delay schedule and the limits on retrying.
///
/// The delay for retry number `n` (1 for the first retry) is computed from
/// the schedule, then capped at [`max_delay`](Self::max_delay). A
/// `Retry-After` from the server replaces the computed delay, capped at
/// [`retry_after_cap`](Self::retry_after_cap). Retrying stops when the item
/// has had [`max_attempts`](Self::max_attempts) attempts, when the next wait
/// would pass [`max_elapsed`](Self::max_elapsed), or when the
/// [budget](Self::budget) is spent.
///
/// Jitter draws from a generator seeded per item ([`seed`](Self::seed)), so
/// a run in virtual time is the same every time.
///
/// ```
/// use std::time::Duration;
/// use sluicegate::retry::Backoff;
///
/// let ms = Duration::from_millis;
/// let policy = Backoff::exponential(ms(100)).max_attempts(6).max_delay(ms(1_000));
/// // No jitter in this schedule: the random draw (here 0) changes nothing.
/// let delays: Vec<_> = (1..=5).map(|n| policy.delay(n, ms(0), 0)).collect();
/// assert_eq!(delays, [ms(100), ms(200), ms(400), ms(800), ms(1_000)]);
///
/// // Full jitter: a draw of 0 is the shortest wait, `u64::MAX` the longest.
/// let jittered = Backoff::full_jitter(ms(100));
/// assert_eq!(jittered.delay(2, ms(0), 0), ms(0));
/// assert!(jittered.delay(2, ms(0), u64::MAX) <= ms(200));
/// ```
#[derive(Debug, Clone)]
#[must_use = "a Backoff does nothing until given to a retry rule; its methods return a new one"]
pub struct Backoff {
    schedule: Schedule,
    max_delay: Duration,
    max_attempts: u32,
    max_elapsed: Option<Duration>,
    retry_after_cap: Duration,
    honor_retry_after: bool,
    budget: Option<RetryBudget>,
    seed: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
enum Schedule {
    Constant(Duration),
    Exponential { base: Duration, factor: f64 },
    FullJitter { base: Duration, factor: f64 },
    Decorrelated { base: Duration },
}

impl Backoff {
    /// The default number of attempts per item, the first one included: 3.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
    /// The default cap on a computed delay: 30 seconds.
    pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(30);
    /// The default cap on a server's `Retry-After`: 30 seconds, the same
    /// as the default cap on a computed delay, so a server cannot make an
    /// item wait longer than the policy itself would. A capped value is
    /// logged as a warning.
    pub const DEFAULT_RETRY_AFTER_CAP: Duration = Duration::from_secs(30);

    fn with(schedule: Schedule) -> Self {
        Self {
            schedule,
            max_delay: Self::DEFAULT_MAX_DELAY,
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            max_elapsed: None,
            retry_after_cap: Self::DEFAULT_RETRY_AFTER_CAP,
            honor_retry_after: true,
            budget: None,
            seed: None,
        }
    }

    /// The same delay before every retry.
    pub fn constant(delay: Duration) -> Self {
        Self::with(Schedule::Constant(delay))
    }

    /// `base`, then doubling: `base * 2^(n-1)` before retry `n`.
    pub fn exponential(base: Duration) -> Self {
        Self::with(Schedule::Exponential { base, factor: 2.0 })
    }

    /// Exponential with full jitter: uniform in `0..=base * 2^(n-1)`, which
    /// spreads out clients that failed together.
    pub fn full_jitter(base: Duration) -> Self {
        Self::with(Schedule::FullJitter { base, factor: 2.0 })
    }

    /// Decorrelated jitter: uniform in `base..=3 * previous delay`.
    pub fn decorrelated(base: Duration) -> Self {
        Self::with(Schedule::Decorrelated { base })
    }

    /// Sets the growth factor of an exponential schedule (default 2).
    ///
    /// # Panics
    ///
    /// If `factor` is below 1 or not finite.
    #[track_caller]
    pub fn factor(mut self, factor: f64) -> Self {
        assert!(
            factor.is_finite() && factor >= 1.0,
            "Backoff::factor must be finite and at least 1"
        );
        match &mut self.schedule {
            Schedule::Exponential { factor: f, .. } | Schedule::FullJitter { factor: f, .. } => {
                *f = factor
            }
            Schedule::Constant(_) | Schedule::Decorrelated { .. } => {}
        }
        self
    }

    /// Caps every computed delay.
    pub fn max_delay(mut self, max: Duration) -> Self {
        self.max_delay = max;
        self
    }

    /// Attempts per item, the first one included (default
    /// [`DEFAULT_MAX_ATTEMPTS`](Self::DEFAULT_MAX_ATTEMPTS), 3).
    ///
    /// The one cap on attempts when this policy's rule matches: nothing on
    /// the endpoint or the client stops the item sooner, so
    /// `max_attempts(50)` gives up to 50 attempts. Attempts other rules
    /// caused (a pause, another status) count too.
    ///
    /// # Panics
    ///
    /// If `attempts` is 0: an item always gets its first attempt.
    #[track_caller]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        assert!(attempts > 0, "Backoff::max_attempts must be at least 1");
        self.max_attempts = attempts;
        self
    }

    /// Gives up instead of waiting past `max` since the item's first attempt.
    pub fn max_elapsed(mut self, max: Duration) -> Self {
        self.max_elapsed = Some(max);
        self
    }

    /// Caps the wait a server's `Retry-After` can ask for (default
    /// [`DEFAULT_RETRY_AFTER_CAP`](Self::DEFAULT_RETRY_AFTER_CAP)); each
    /// capped value is logged as a warning.
    pub fn retry_after_cap(mut self, cap: Duration) -> Self {
        self.retry_after_cap = cap;
        self
    }

    /// Ignores `Retry-After` and always uses the computed delay.
    pub fn ignore_retry_after(mut self) -> Self {
        self.honor_retry_after = false;
        self
    }

    /// Spends retries from a shared [`RetryBudget`].
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Seeds the jitter (mixed with each item's index), for reproducible runs.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The number of attempts per item.
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The delay before retry number `retry` (1-based), given the previous
    /// delay (used by decorrelated jitter) and `draw`, a uniformly random
    /// 64-bit number that places a jittered delay within its range (0 the
    /// shortest, `u64::MAX` the longest; ignored without jitter). Pure: the
    /// caller owns the randomness, so any generator, or a fixed number in a
    /// test, will do.
    pub fn delay(&self, retry: u32, previous: Duration, draw: u64) -> Duration {
        let exp = |base: Duration, factor: f64| {
            let scale = factor.powi(retry.saturating_sub(1).min(1_000) as i32);
            Duration::try_from_secs_f64(base.as_secs_f64() * scale).unwrap_or(Duration::MAX)
        };
        let delay = match self.schedule {
            Schedule::Constant(d) => d,
            Schedule::Exponential { base, factor } => exp(base, factor),
            Schedule::FullJitter { base, factor } => {
                uniform(draw, Duration::ZERO, exp(base, factor).min(self.max_delay))
            }
            Schedule::Decorrelated { base } => {
                let high = previous
                    .max(base)
                    .saturating_mul(3)
                    .min(self.max_delay.max(base));
                uniform(draw, base, high)
            }
        };
        delay.min(self.max_delay)
    }

    /// The wait honouring a server's `Retry-After`, if it gave one we use.
    pub(crate) fn server_delay(&self, retry_after: Option<Duration>) -> Option<Duration> {
        retry_after
            .filter(|_| self.honor_retry_after)
            .map(|d| d.min(self.retry_after_cap))
    }

    /// The cap on a server's `Retry-After`.
    pub(crate) fn retry_after_limit(&self) -> Duration {
        self.retry_after_cap
    }

    pub(crate) fn max_elapsed_limit(&self) -> Option<Duration> {
        self.max_elapsed
    }

    pub(crate) fn budget_ref(&self) -> Option<&RetryBudget> {
        self.budget.as_ref()
    }

    pub(crate) fn seed_value(&self) -> Option<u64> {
        self.seed
    }
}

/// `low..=high`, placed by `draw` (uniform over all 64-bit numbers gives a
/// uniform result: a 128-bit multiply, no modulo bias).
fn uniform(draw: u64, low: Duration, high: Duration) -> Duration {
    if high <= low {
        return low;
    }
    let span = (high - low).as_nanos().min(u128::from(u64::MAX - 1)) as u64;
    let offset = (u128::from(draw) * (u128::from(span) + 1)) >> 64;
    low + Duration::from_nanos(offset as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_draw_places_the_delay_across_its_whole_range() {
        assert_eq!(uniform(0, ms(10), ms(20)), ms(10));
        assert_eq!(uniform(u64::MAX, ms(10), ms(20)), ms(20));
        assert_eq!(uniform(u64::MAX / 2 + 1, ms(0), ms(2)), ms(1));
        assert_eq!(uniform(123, ms(5), ms(5)), ms(5));
    }

    #[test]
    fn schedules() {
        let mut rng = fastrand::Rng::with_seed(7);
        let c = Backoff::constant(ms(50));
        assert_eq!(c.delay(1, ms(0), rng.u64(..)), ms(50));
        assert_eq!(c.delay(9, ms(0), rng.u64(..)), ms(50));

        let e = Backoff::exponential(ms(10)).factor(3.0);
        assert_eq!(e.delay(3, ms(0), rng.u64(..)), ms(90));
        // Huge retry numbers saturate at the cap instead of overflowing.
        assert_eq!(
            e.delay(u32::MAX, ms(0), rng.u64(..)),
            Backoff::DEFAULT_MAX_DELAY
        );

        let j = Backoff::full_jitter(ms(100)).max_delay(ms(300));
        for n in 1..10 {
            let d = j.delay(n, ms(0), rng.u64(..));
            assert!(d <= ms(300).min(ms(100) * 2u32.pow(n - 1)));
        }

        let dj = Backoff::decorrelated(ms(100)).max_delay(ms(1_000));
        let mut prev = ms(100);
        for n in 1..20 {
            let d = dj.delay(n, prev, rng.u64(..));
            assert!(
                d >= ms(100) && d <= (prev * 3).min(ms(1_000)),
                "{d:?} after {prev:?}"
            );
            prev = d;
        }
    }

    #[test]
    fn retry_after_is_capped_or_ignored() {
        let b = Backoff::constant(ms(1)).retry_after_cap(Duration::from_secs(5));
        assert_eq!(
            b.server_delay(Some(Duration::from_secs(3))),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            b.server_delay(Some(Duration::from_secs(3600))),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            b.clone().ignore_retry_after().server_delay(Some(ms(5))),
            None
        );
    }
}
