//! The pure pacing decision: given the state and `now`, may an event go, and
//! if not, from when? No clock is read and nothing waits here.
//!
//! Times are nanoseconds since the limiter's epoch, so the state is a couple
//! of integers and the arithmetic is exact.

use crate::rate::{Rate, RateMode};

#[derive(Debug, Clone)]
pub(crate) enum Pacing {
    /// GCRA: `tat` is the theoretical arrival time of the next event; an
    /// event at `now` conforms when `now >= tat - tolerance`.
    Gcra {
        interval: u64,
        tolerance: u64,
        tat: u64,
    },
    /// No pacing at all: every event conforms. What a client without a
    /// rate of its own paces with, so that the quotas a server advertises
    /// still hold requests until their reset.
    Unpaced,
    /// Fixed windows `[k * period, (k + 1) * period)` since the epoch.
    Window {
        period: u64,
        count: u32,
        window: u64,
        used: u32,
    },
}

impl Pacing {
    pub(crate) fn new(rate: &Rate, now: u64) -> Self {
        match rate.mode() {
            RateMode::Gcra => {
                let interval = rate.interval_nanos();
                let tolerance = interval.saturating_mul(u64::from(rate.burst_size() - 1));
                let tat = if rate.starts_empty() {
                    now.saturating_add(tolerance)
                } else {
                    now
                };
                Self::Gcra {
                    interval,
                    tolerance,
                    tat,
                }
            }
            RateMode::FixedWindow => {
                let period = rate.period().as_nanos().min(u128::from(u64::MAX)) as u64;
                Self::Window {
                    period,
                    count: rate.count(),
                    window: now / period,
                    used: if rate.starts_empty() { rate.count() } else { 0 },
                }
            }
        }
    }

    /// The earliest instant, not before `t`, at which one event conforms.
    pub(crate) fn earliest(&self, t: u64) -> u64 {
        match self {
            Self::Unpaced => t,
            Self::Gcra { tolerance, tat, .. } => t.max(tat.saturating_sub(*tolerance)),
            Self::Window {
                period,
                count,
                window,
                used,
            } => {
                // Never dated into a window already left behind.
                let t = t.max(window.saturating_mul(*period));
                if t / *period > *window || used < count {
                    t
                } else {
                    (*window + 1).saturating_mul(*period)
                }
            }
        }
    }

    /// Takes one event at `now` if it conforms; otherwise returns the
    /// earliest time at which one would, and changes nothing.
    ///
    /// `now` may be an instant in the recent past (an event that was due
    /// then, looked at late): the schedule then goes on from that ideal
    /// instant, so a late look costs no capacity.
    pub(crate) fn take(&mut self, now: u64) -> Result<(), u64> {
        match self {
            Self::Unpaced => Ok(()),
            Self::Gcra {
                interval,
                tolerance,
                tat,
            } => {
                let earliest = tat.saturating_sub(*tolerance);
                if now < earliest {
                    return Err(earliest);
                }
                *tat = (*tat).max(now).saturating_add(*interval);
                Ok(())
            }
            Self::Window {
                period,
                count,
                window,
                used,
            } => {
                let current = now / *period;
                if current > *window {
                    *window = current;
                    *used = 0;
                }
                if *used < *count {
                    *used += 1;
                    Ok(())
                } else {
                    Err((*window + 1).saturating_mul(*period))
                }
            }
        }
    }

    /// Whether the state at `now` is the same as a fresh, full one, so
    /// forgetting it loses nothing.
    pub(crate) fn is_idle(&self, now: u64) -> bool {
        match self {
            Self::Unpaced => true,
            Self::Gcra { tat, .. } => *tat <= now,
            Self::Window { period, window, .. } => now / *period > *window,
        }
    }

    /// Switches to `rate`, keeping the debt already run up in proportion,
    /// so a change neither forgives past bursts nor punishes them twice.
    pub(crate) fn retune(&mut self, rate: &Rate, now: u64) {
        let mut next = Self::new(rate, now);
        match (&*self, &mut next) {
            (
                Self::Gcra {
                    interval: old, tat, ..
                },
                Self::Gcra {
                    interval: new,
                    tat: next_tat,
                    ..
                },
            ) => {
                let debt = u128::from(tat.saturating_sub(now));
                let scaled = debt * u128::from(*new) / u128::from((*old).max(1));
                *next_tat = now.saturating_add(scaled.min(u128::from(u64::MAX)) as u64);
            }
            (
                Self::Window { window, used, .. },
                Self::Window {
                    window: w,
                    used: u,
                    period,
                    ..
                },
            ) if *window == now / *period => {
                *w = *window;
                *u = *used;
            }
            _ => {}
        }
        *self = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MS: u64 = 1_000_000;

    #[test]
    fn gcra_allows_burst_then_spaces_by_interval() {
        let mut p = Pacing::new(&Rate::per_second(100).burst(3), 0);
        assert_eq!(p.take(0), Ok(()));
        assert_eq!(p.take(0), Ok(()));
        assert_eq!(p.take(0), Ok(()));
        assert_eq!(p.take(0), Err(10 * MS));
        assert_eq!(p.take(10 * MS), Ok(()));
        assert_eq!(p.take(10 * MS), Err(20 * MS));
    }

    #[test]
    fn gcra_start_empty_has_no_initial_burst() {
        let mut p = Pacing::new(&Rate::per_second(100).burst(3).start_empty(), 0);
        assert_eq!(p.take(0), Ok(()));
        assert_eq!(p.take(0), Err(10 * MS));
        // After an idle spell the burst is saved up as usual.
        assert!(p.is_idle(50 * MS));
        for _ in 0..3 {
            assert_eq!(p.take(50 * MS), Ok(()));
        }
        assert_eq!(p.take(50 * MS), Err(60 * MS));
    }

    #[test]
    fn fixed_window_never_exceeds_count_per_window() {
        let rate = Rate::new(2, Duration::from_secs(1)).fixed_window();
        let mut p = Pacing::new(&rate, 0);
        assert_eq!(p.take(0), Ok(()));
        assert_eq!(p.take(999 * MS), Ok(()));
        assert_eq!(p.take(999 * MS), Err(1000 * MS));
        assert_eq!(p.take(1000 * MS), Ok(()));
    }

    #[test]
    fn earliest_agrees_with_take() {
        for rate in [
            Rate::per_second(100),
            Rate::per_second(100).burst(3),
            Rate::new(2, Duration::from_secs(1)).fixed_window(),
        ] {
            let mut p = Pacing::new(&rate, 0);
            let mut t = 0;
            for _ in 0..20 {
                let due = p.earliest(t);
                assert!(due >= t);
                if due > t {
                    assert_eq!(p.take(t), Err(due), "{rate:?}");
                }
                assert_eq!(p.take(due), Ok(()), "{rate:?}");
                t = due + MS / 3;
            }
        }
    }

    #[test]
    fn a_late_look_keeps_the_ideal_schedule() {
        let mut p = Pacing::new(&Rate::per_second(1000), 0);
        assert_eq!(p.take(0), Ok(()));
        // Due at 1 ms, taken at its ideal instant although looked at later:
        // the next is still due at 2 ms.
        assert_eq!(p.take(MS), Ok(()));
        assert_eq!(p.earliest(MS + MS / 2), 2 * MS);
    }

    #[test]
    fn retune_scales_outstanding_debt() {
        let mut p = Pacing::new(&Rate::per_second(10), 0);
        assert_eq!(p.take(0), Ok(()));
        assert_eq!(p.take(0), Err(100 * MS));
        p.retune(&Rate::per_second(100), 0);
        assert_eq!(p.take(0), Err(10 * MS));
        assert_eq!(p.take(10 * MS), Ok(()));
    }
}
