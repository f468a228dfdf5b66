//! [`Rate`]: how many events per period, with what burst, in which mode.

use std::fmt;
use std::time::Duration;

use crate::error::BuildError;

/// A rate: `count` events per `period`, allowing bursts of `burst` events.
///
/// A rate is a value; a [`Limiter`](crate::Limiter) enforces one. By default
/// the rate is paced with GCRA (the generic cell rate algorithm): events are
/// spaced `period / count` apart, and up to `burst` of them may go at once
/// after an idle spell. The default burst is 1: perfectly even spacing.
///
/// ```
/// use std::time::Duration;
/// use sluicegate::Rate;
///
/// let api = Rate::per_second(100).burst(10);
/// assert_eq!(api.interval(), Duration::from_millis(10));
///
/// // The lesson's `Throttler(rate_limit=60, period=10.0)`.
/// let lesson = Rate::new(60, Duration::from_secs(10));
/// assert_eq!(lesson.interval(), Duration::from_nanos(166_666_666));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[must_use = "a Rate does nothing until given to a limiter, a client or throttle; its methods return a new one"]
pub struct Rate {
    count: u32,
    period: Duration,
    burst: u32,
    mode: RateMode,
    start_empty: bool,
}

/// How a [`Rate`] is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RateMode {
    /// GCRA: even spacing, bursts up to `burst`, no window edges.
    Gcra,
    /// Fixed windows of one `period`, aligned to when the limiter was made:
    /// at most `count` events per window, for servers that count requests
    /// per fixed window. `burst` is ignored.
    FixedWindow,
}

impl Rate {
    /// `count` events per `period`.
    ///
    /// # Panics
    ///
    /// If `count` is 0 or `period` is zero, or the spacing would be under
    /// one nanosecond; use [`try_new`](Self::try_new) for values from input.
    #[track_caller]
    pub fn new(count: u32, period: Duration) -> Self {
        match Self::try_new(count, period) {
            Ok(rate) => rate,
            Err(e) => panic!("{e}"),
        }
    }

    /// `count` events per `period`, or an error saying what is wrong.
    ///
    /// # Errors
    ///
    /// If `count` is 0, `period` is zero, or `period / count` is under one
    /// nanosecond. Zero never means "unlimited".
    pub fn try_new(count: u32, period: Duration) -> Result<Self, BuildError> {
        if count == 0 {
            return Err(BuildError::new("rate count must be at least 1"));
        }
        if period.is_zero() {
            return Err(BuildError::new("rate period must be longer than zero"));
        }
        if period.as_nanos() < u128::from(count) {
            return Err(BuildError::new(
                "rate is faster than one event per nanosecond",
            ));
        }
        Ok(Self {
            count,
            period,
            burst: 1,
            mode: RateMode::Gcra,
            start_empty: false,
        })
    }

    /// `count` events per second.
    ///
    /// # Panics
    ///
    /// If `count` is 0.
    #[track_caller]
    pub fn per_second(count: u32) -> Self {
        Self::new(count, Duration::from_secs(1))
    }

    /// `count` events per minute.
    ///
    /// # Panics
    ///
    /// If `count` is 0.
    #[track_caller]
    pub fn per_minute(count: u32) -> Self {
        Self::new(count, Duration::from_secs(60))
    }

    /// Allows up to `burst` events at once after an idle spell.
    ///
    /// # Panics
    ///
    /// If `burst` is 0.
    #[track_caller]
    pub fn burst(mut self, burst: u32) -> Self {
        assert!(burst > 0, "rate burst must be at least 1");
        self.burst = burst;
        self
    }

    /// Enforces the rate in fixed windows instead of with GCRA.
    pub fn fixed_window(mut self) -> Self {
        self.mode = RateMode::FixedWindow;
        self
    }

    /// Starts with no burst saved up: the first events are spaced evenly
    /// instead of `burst` of them going at once.
    pub fn start_empty(mut self) -> Self {
        self.start_empty = true;
        self
    }

    /// Events per period.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The period.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// The burst size.
    pub fn burst_size(&self) -> u32 {
        self.burst
    }

    /// The enforcement mode.
    pub fn mode(&self) -> RateMode {
        self.mode
    }

    /// Whether the limiter starts with an empty bucket.
    pub fn starts_empty(&self) -> bool {
        self.start_empty
    }

    /// The spacing between events: `period / count`.
    pub fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval_nanos())
    }

    pub(crate) fn interval_nanos(&self) -> u64 {
        (self.period.as_nanos() / u128::from(self.count)) as u64
    }

    /// `per_second` events per second (fractions allowed), with `burst`:
    /// what adaptive pacing sets as it learns. Clamped to at least one
    /// event per hour.
    pub(crate) fn per_second_f64_burst(per_second: f64, burst: u32) -> Self {
        let per_second = per_second.max(1.0 / 3_600.0);
        let interval = Duration::from_secs_f64(1.0 / per_second).max(Duration::from_nanos(1));
        Self::new(1, interval).burst(burst.max(1))
    }

    /// Events per second, as a float, for display and arithmetic.
    pub fn per_second_f64(&self) -> f64 {
        f64::from(self.count) / self.period.as_secs_f64()
    }
}

impl fmt::Debug for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Rate({self})")
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} per {:?}", self.count, self.period)?;
        match self.mode {
            RateMode::Gcra if self.burst > 1 => write!(f, ", burst {}", self.burst),
            RateMode::Gcra => Ok(()),
            RateMode::FixedWindow => f.write_str(", fixed window"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_rates_are_refused_with_a_reason() {
        assert!(Rate::try_new(0, Duration::from_secs(1))
            .unwrap_err()
            .to_string()
            .contains("count"));
        assert!(Rate::try_new(1, Duration::ZERO)
            .unwrap_err()
            .to_string()
            .contains("period"));
        assert!(Rate::try_new(10, Duration::from_nanos(5)).is_err());
    }

    #[test]
    #[should_panic(expected = "burst")]
    fn zero_burst_panics() {
        let _ = Rate::per_second(1).burst(0);
    }

    #[test]
    fn display_is_readable() {
        assert_eq!(
            Rate::per_second(100).burst(10).to_string(),
            "100 per 1s, burst 10"
        );
        assert_eq!(
            Rate::new(60, Duration::from_secs(10))
                .fixed_window()
                .to_string(),
            "60 per 10s, fixed window"
        );
    }
}
