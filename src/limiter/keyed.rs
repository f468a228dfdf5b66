//! [`KeyedLimiter`]: one budget per key (per host, per tenant), with memory
//! that stays bounded because idle keys are forgotten.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;

use super::Limiter;
use crate::rate::Rate;

/// A separate [`Limiter`] per key, all at the same rate.
///
/// A key's limiter is dropped once it is idle (its budget full again and
/// nobody holding or waiting on it), which is exactly when forgetting it
/// changes nothing: a fresh one would decide the same. The sweep runs when
/// the map has doubled since the last one, so the cost is amortised and
/// the map never holds more than about twice the keys active recently.
///
/// ```
/// use sluicegate::{KeyedLimiter, Rate};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let per_host = KeyedLimiter::new(Rate::per_second(5));
/// per_host.acquire("a.example").await;
/// per_host.acquire("b.example").await; // a different budget: no wait
/// assert_eq!(per_host.len(), 2);
/// # }
/// ```
pub struct KeyedLimiter<K> {
    shared: Arc<Shared<K>>,
}

struct Shared<K> {
    map: Mutex<KeyMap<K>>,
}

struct KeyMap<K> {
    rate: Rate,
    limiters: HashMap<K, Limiter>,
    sweep_at: usize,
}

const MIN_SWEEP_AT: usize = 64;

impl<K> Clone for KeyedLimiter<K> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// A keyed limiter giving each key `rate`.
    pub fn new(rate: Rate) -> Self {
        Self {
            shared: Arc::new(Shared {
                map: Mutex::new(KeyMap {
                    rate,
                    limiters: HashMap::new(),
                    sweep_at: MIN_SWEEP_AT,
                }),
            }),
        }
    }

    /// The limiter for `key`, made on first use.
    pub fn get(&self, key: K) -> Limiter {
        let mut map = self.lock();
        if let Some(limiter) = map.limiters.get(&key) {
            return limiter.clone();
        }
        if map.limiters.len() >= map.sweep_at {
            map.sweep(Instant::now());
        }
        let limiter = Limiter::new(map.rate);
        map.limiters.insert(key, limiter.clone());
        limiter
    }

    /// Waits for a token of `key`'s budget.
    pub fn acquire(&self, key: K) -> impl Future<Output = ()> + Send + 'static {
        self.get(key).acquire()
    }

    /// Changes the rate of every key, present and future.
    pub fn set_rate(&self, rate: Rate) {
        let mut map = self.lock();
        map.rate = rate;
        for limiter in map.limiters.values() {
            limiter.set_rate(rate);
        }
    }

    /// How many keys are remembered now.
    pub fn len(&self) -> usize {
        self.lock().limiters.len()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every idle key now, instead of waiting for the next sweep.
    pub fn forget_idle(&self) {
        self.lock().sweep(Instant::now());
    }

    fn lock(&self) -> MutexGuard<'_, KeyMap<K>> {
        self.shared
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<K> KeyMap<K> {
    fn sweep(&mut self, now: Instant) {
        self.limiters
            .retain(|_, limiter| limiter.is_shared() || !limiter.is_idle(now));
        self.sweep_at = (self.limiters.len() * 2).max(MIN_SWEEP_AT);
    }
}

impl<K> fmt::Debug for KeyedLimiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let map = self
            .shared
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f.debug_struct("KeyedLimiter")
            .field("rate", &map.rate)
            .field("keys", &map.limiters.len())
            .finish()
    }
}
