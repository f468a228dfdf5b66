//! [`RetryBudget`]: retries as a share of requests, over a sliding window.
//!
//! # Why budgets and not only max attempts
//!
//! "Three attempts per item" caps each item, but not the load: when a
//! server falls over, every item retries, and the client triples the load on
//! a server that is already failing. A budget caps retries *across* items:
//! over the last `window`, retries may be at most `ratio` of the original
//! requests, plus a small floor so a quiet client can still retry at all.
//! When the budget is spent, an item fails with its last answer instead of
//! retrying. The same idea as tower's `TpsBudget` and Finagle's budgets.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

const SLOTS: u32 = 10;

/// A shared allowance of retries, replenished by original requests.
///
/// Clones share one budget. Pure in time: every call takes `now`.
///
/// ```
/// use std::time::Duration;
/// use sluicegate::retry::RetryBudget;
/// use tokio::time::Instant;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// // Retries may be 10% of requests over 10 s, plus 1 per second.
/// let budget = RetryBudget::new(Duration::from_secs(10), 1, 0.1);
/// let now = Instant::now();
/// for _ in 0..100 {
///     budget.deposit(now);
/// }
/// let granted = (0..100).filter(|_| budget.withdraw(now)).count();
/// assert_eq!(granted, 10 + 10); // 10% of 100, plus 1/s over 10 s
/// # }
/// ```
#[derive(Clone)]
#[must_use = "a RetryBudget does nothing until given to Backoff::budget"]
pub struct RetryBudget {
    shared: Arc<Mutex<Window>>,
}

struct Window {
    slot_width: Duration,
    floor: f64,
    ratio: f64,
    /// (slot start, requests, retries), oldest first.
    slots: VecDeque<(Instant, u64, u64)>,
}

impl RetryBudget {
    /// Retries may be `ratio` of the requests seen over `window`, plus
    /// `min_per_second` retries per second of the window.
    ///
    /// # Panics
    ///
    /// If `window` is zero or `ratio` is negative or not finite.
    #[track_caller]
    pub fn new(window: Duration, min_per_second: u32, ratio: f64) -> Self {
        assert!(
            !window.is_zero(),
            "RetryBudget window must be longer than zero"
        );
        assert!(
            ratio.is_finite() && ratio >= 0.0,
            "RetryBudget ratio must be a finite non-negative number"
        );
        Self {
            shared: Arc::new(Mutex::new(Window {
                slot_width: window / SLOTS,
                floor: f64::from(min_per_second) * window.as_secs_f64(),
                ratio,
                slots: VecDeque::new(),
            })),
        }
    }

    /// Records an original request at `now`.
    pub fn deposit(&self, now: Instant) {
        let mut w = self.lock();
        w.slot(now).1 += 1;
    }

    /// Spends one retry at `now` if the budget allows it.
    pub fn withdraw(&self, now: Instant) -> bool {
        let mut w = self.lock();
        w.slot(now);
        let (requests, retries) = w
            .slots
            .iter()
            .fold((0, 0), |(a, b), (_, req, ret)| (a + req, b + ret));
        let allowed = w.floor + w.ratio * requests as f64;
        if (retries + 1) as f64 <= allowed {
            w.slots.back_mut().expect("slot exists").2 += 1;
            true
        } else {
            false
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Window {
    /// The current slot, after dropping slots older than the window.
    fn slot(&mut self, now: Instant) -> &mut (Instant, u64, u64) {
        let window = self.slot_width * SLOTS;
        while self
            .slots
            .front()
            .is_some_and(|(start, _, _)| now.saturating_duration_since(*start) >= window)
        {
            self.slots.pop_front();
        }
        let fresh = self
            .slots
            .back()
            .is_none_or(|(start, _, _)| now.saturating_duration_since(*start) >= self.slot_width);
        if fresh {
            self.slots.push_back((now, 0, 0));
        }
        self.slots.back_mut().expect("slot exists")
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = self.lock();
        f.debug_struct("RetryBudget")
            .field("window", &(w.slot_width * SLOTS))
            .field("ratio", &w.ratio)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn budget_refills_as_the_window_slides() {
        let budget = RetryBudget::new(Duration::from_secs(1), 0, 0.5);
        let t0 = Instant::now();
        for _ in 0..4 {
            budget.deposit(t0);
        }
        assert!(budget.withdraw(t0));
        assert!(budget.withdraw(t0));
        assert!(!budget.withdraw(t0));
        // A second later the old requests and retries have left the window.
        let t1 = t0 + Duration::from_secs(1);
        assert!(!budget.withdraw(t1));
        budget.deposit(t1);
        budget.deposit(t1);
        assert!(budget.withdraw(t1));
    }
}
