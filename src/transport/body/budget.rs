//! [`BodyBudget`]: the memory that the bodies one transport is reading may
//! hold, all together, and the waiting for room in it. Who may hold what
//! is decided by the [ledger](super::ledger).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Poll, Waker};

use super::ledger::{Id, Ledger};

/// The bytes of response bodies one transport (and its clones) may hold
/// while reading them, counted in KiB.
#[derive(Clone)]
pub(crate) struct BodyBudget {
    ledger: Arc<Mutex<Ledger<Waker>>>,
    bytes: usize,
}

impl BodyBudget {
    pub(crate) fn new(bytes: usize) -> Self {
        Self {
            ledger: Arc::new(Mutex::new(Ledger::new(units(bytes)))),
            bytes,
        }
    }

    /// The budget in bytes, as configured.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// A share for one body, holding nothing until it asks.
    pub(super) fn share(&self) -> Share {
        let id = self.lock().open();
        Share {
            ledger: self.ledger.clone(),
            id,
        }
    }

    /// The bytes held by every body together, in whole KiB.
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.lock().held() * 1024
    }

    fn lock(&self) -> MutexGuard<'_, Ledger<Waker>> {
        lock(&self.ledger)
    }
}

/// What one body holds of a [`BodyBudget`]; all of it is given back when
/// the share is dropped (the body read, refused, or its read dropped).
pub(crate) struct Share {
    ledger: Arc<Mutex<Ledger<Waker>>>,
    id: Id,
}

impl Share {
    /// Waits until this body may hold `bytes` in all, stating that it will
    /// never hold more than `claim` (see the [ledger](super::ledger) for
    /// why that matters, and for what a body larger than the whole budget
    /// gets). Dropping the wait leaves the ask queued until the share is
    /// dropped or asks again.
    pub(super) async fn hold(&mut self, bytes: usize, claim: usize) {
        if lock(&self.ledger).ask(self.id, units(bytes), units(claim)) {
            return;
        }
        std::future::poll_fn(|cx| {
            let mut ledger = lock(&self.ledger);
            if !ledger.waiting(self.id) {
                return Poll::Ready(());
            }
            let replaced = ledger.wait(self.id, cx.waker().clone());
            drop(ledger);
            drop(replaced);
            Poll::Pending
        })
        .await;
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let woken = lock(&self.ledger).release(self.id);
        for waker in woken {
            waker.wake();
        }
    }
}

fn lock(ledger: &Mutex<Ledger<Waker>>) -> MutexGuard<'_, Ledger<Waker>> {
    // The ledger is consistent between calls: nothing in it can panic
    // half way through a change.
    ledger.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Bytes in budget units (KiB), rounded up.
fn units(bytes: usize) -> usize {
    bytes.div_ceil(1024)
}
