//! The ledger of a body budget: how much of it each body being read holds,
//! and whether one more grant still lets every one of them finish.
//!
//! Pure: no lock, no waiting. [`BodyBudget`](super::BodyBudget) keeps a
//! ledger behind a lock and does the waiting.
//!
//! # Why not a semaphore
//!
//! A body holds what it has actually received, and asks for more as more
//! comes (see [`read_capped`](super::read_capped)); nothing is held for
//! bytes a server only announced. But bodies that each hold part of the
//! budget and each wait for more can wait for one another for ever: with
//! 100 units, four bodies of 40 that have each received 25 hold all of it,
//! and none can take its next 15. A plain semaphore lets that happen.
//!
//! So each body also states a claim: the most it will ever hold (its
//! announced length, or the cap when none was announced; never more than
//! the whole budget). A grant is made only if it fits in what is free *and*
//! leaves the ledger safe: there is an order in which every holder, given
//! the rest of its claim from what is free, finishes and gives back what it
//! held, so that the next one can finish (the banker's algorithm, with one
//! resource). With one resource that order is simply the holders by what
//! they still need, fewest first. A body whose grant would make the ledger
//! unsafe waits, holding only what it already had, and in a safe ledger
//! some holder can always be given all it still needs: bodies waiting for
//! room never wait on each other in a circle. In the example above, the
//! fourth body's first 25 are not granted (all four would then be stuck);
//! it waits until one of the other three is done.
//!
//! A body that holds nothing is not in the ledger, so a server that
//! announces a large body and then sends nothing takes no part in these
//! decisions, and a body that stalls half way holds what it received.
//!
//! Asks that cannot be granted yet are queued in arrival order, and when
//! room comes back they are granted in that order; but one that still
//! cannot be granted does not hold back those behind it that can (that
//! could again leave every holder waiting). A large ask may so be overtaken
//! by smaller ones while room is short.

use std::collections::VecDeque;

/// Which body a holding or an ask is for.
pub(super) type Id = u64;

/// The budget in units (the budget counts KiB), who holds what, and who
/// waits for more; `W` is whatever wakes a waiting body.
pub(super) struct Ledger<W> {
    total: usize,
    free: usize,
    holders: Vec<Holding>,
    asks: VecDeque<Ask<W>>,
    next_id: Id,
    /// Reused by [`safe`](Self::safe): (still needed, held) per holder.
    scratch: Vec<(usize, usize)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Holding {
    id: Id,
    held: usize,
    claim: usize,
}

struct Ask<W> {
    id: Id,
    hold: usize,
    claim: usize,
    waiter: Option<W>,
}

impl<W> Ledger<W> {
    /// A ledger of `total` units, all free (at least one).
    pub(super) fn new(total: usize) -> Self {
        let total = total.max(1);
        Self {
            total,
            free: total,
            holders: Vec::new(),
            asks: VecDeque::new(),
            next_id: 0,
            scratch: Vec::new(),
        }
    }

    /// A new body, holding nothing.
    pub(super) fn open(&mut self) -> Id {
        self.next_id += 1;
        self.next_id
    }

    /// The units held by every body together.
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.total - self.free
    }

    /// Asks for body `id` to hold `hold` units in all, and at most `claim`
    /// until it is done: granted at once (`true`) if that fits and leaves
    /// the ledger safe, otherwise queued (`false`) until a release makes it
    /// so. A later ask of the same body replaces a queued one.
    ///
    /// A claim is never more than the whole budget, nor less than what is
    /// asked for or was claimed before; an ask is never more than the
    /// claim. So a body larger than the whole budget holds all of it, once
    /// nobody else holds any, and goes on uncounted: the one body at a time
    /// that a budget below the cap lets through.
    pub(super) fn ask(&mut self, id: Id, hold: usize, claim: usize) -> bool {
        self.asks.retain(|ask| ask.id != id);
        let before = self.holding(id);
        let claim = claim.max(hold).max(before.claim).min(self.total);
        let hold = hold.min(claim).max(before.held);
        if self.grantable(id, hold, claim) {
            self.grant(id, hold, claim);
            return true;
        }
        self.asks.push_back(Ask {
            id,
            hold,
            claim,
            waiter: None,
        });
        false
    }

    /// Whether body `id` has an ask queued.
    pub(super) fn waiting(&self, id: Id) -> bool {
        self.asks.iter().any(|ask| ask.id == id)
    }

    /// Sets what wakes body `id` when its queued ask is granted, handing
    /// back the one it replaces (to be dropped outside any lock).
    pub(super) fn wait(&mut self, id: Id, waiter: W) -> Option<W> {
        let ask = self.asks.iter_mut().find(|ask| ask.id == id)?;
        ask.waiter.replace(waiter)
    }

    /// Body `id` is done (or gave up): what it held is free again, its ask
    /// if any is withdrawn, and every queued ask that can now be granted
    /// is, in order. Returns the waiters of those, to be woken outside any
    /// lock.
    pub(super) fn release(&mut self, id: Id) -> Vec<W> {
        self.asks.retain(|ask| ask.id != id);
        if let Some(at) = self.holders.iter().position(|h| h.id == id) {
            self.free += self.holders.swap_remove(at).held;
        }
        // One pass is enough: a grant only ever makes other asks harder to
        // grant (less is free, and an order that works after it worked
        // before it), never easier.
        let mut woken = Vec::new();
        let mut at = 0;
        while at < self.asks.len() {
            let Ask {
                id, hold, claim, ..
            } = self.asks[at];
            if self.grantable(id, hold, claim) {
                self.grant(id, hold, claim);
                let ask = self.asks.remove(at).expect("in range");
                woken.extend(ask.waiter);
            } else {
                at += 1;
            }
        }
        woken
    }

    fn holding(&self, id: Id) -> Holding {
        self.holders
            .iter()
            .find(|h| h.id == id)
            .copied()
            .unwrap_or(Holding {
                id,
                held: 0,
                claim: 0,
            })
    }

    /// Whether body `id` may now hold `hold` units under `claim`.
    fn grantable(&mut self, id: Id, hold: usize, claim: usize) -> bool {
        let more = hold - self.holding(id).held;
        if more > self.free {
            return false;
        }
        let after = self.holders.iter().filter(|h| h.id != id).copied();
        let after = after.chain([Holding {
            id,
            held: hold,
            claim,
        }]);
        self.scratch.clear();
        self.scratch
            .extend(after.map(|h| (h.claim.saturating_sub(h.held), h.held)));
        safe(self.free - more, &mut self.scratch)
    }

    fn grant(&mut self, id: Id, hold: usize, claim: usize) {
        match self.holders.iter_mut().find(|h| h.id == id) {
            Some(h) => {
                self.free -= hold - h.held;
                *h = Holding {
                    id,
                    held: hold,
                    claim,
                };
            }
            None => {
                self.free -= hold;
                self.holders.push(Holding {
                    id,
                    held: hold,
                    claim,
                });
            }
        }
    }
}

/// Whether holders (what each still needs, what each holds) can all finish
/// one after the other from `free`: fewest needs first, each giving back
/// what it held. If the one needing least cannot finish, none can.
fn safe(mut free: usize, holders: &mut [(usize, usize)]) -> bool {
    holders.sort_unstable();
    for &(need, held) in holders.iter() {
        if need > free {
            return false;
        }
        free += held;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_what_fits_and_queues_the_rest_in_order() {
        let mut ledger = Ledger::<&str>::new(100);
        let (a, b, c) = (ledger.open(), ledger.open(), ledger.open());
        assert!(ledger.ask(a, 60, 60));
        assert!(!ledger.ask(b, 50, 50), "does not fit");
        assert_eq!(ledger.wait(b, "b"), None);
        assert!(!ledger.ask(c, 45, 45), "does not fit either");
        ledger.wait(c, "c");
        assert_eq!(ledger.held(), 60);
        // Growing within what it has is granted at once.
        assert!(ledger.ask(a, 30, 60));
        assert_eq!(ledger.release(a), ["b", "c"]);
        assert_eq!(ledger.held(), 95);
        assert!(!ledger.waiting(b) && !ledger.waiting(c));
        assert_eq!(ledger.release(b), Vec::<&str>::new());
        assert_eq!(ledger.release(c), Vec::<&str>::new());
        assert_eq!(ledger.held(), 0);
    }

    #[test]
    fn bodies_that_each_hold_a_part_are_never_all_left_waiting() {
        // Four bodies of 40 in a budget of 100, their bytes coming 25 then
        // 15. Granting every first 25 would hold all 100 with each body
        // needing 15 more: stuck for good.
        let mut ledger = Ledger::<Id>::new(100);
        let ids: Vec<Id> = (0..4).map(|_| ledger.open()).collect();
        let first: Vec<bool> = ids.iter().map(|&id| ledger.ask(id, 25, 40)).collect();
        assert_eq!(first, [true, true, true, false]);
        ledger.wait(ids[3], ids[3]);
        assert_eq!(ledger.held(), 75);
        // Whichever asks for its last 15 first can finish.
        assert!(ledger.ask(ids[0], 40, 40));
        assert_eq!(ledger.release(ids[0]), [ids[3]]);
        for &id in &ids[1..] {
            assert!(ledger.ask(id, 40, 40));
            ledger.release(id);
        }
        assert_eq!(ledger.held(), 0);
    }

    #[test]
    fn an_ask_that_must_wait_does_not_hold_back_one_that_can_finish() {
        let mut ledger = Ledger::<&str>::new(100);
        let (x, y) = (ledger.open(), ledger.open());
        assert!(ledger.ask(x, 60, 100));
        assert!(ledger.ask(y, 30, 40));
        // x's next 10 would leave nothing for y's last 10, and x itself
        // needs y's 30 back first: it waits.
        assert!(!ledger.ask(x, 70, 100));
        ledger.wait(x, "x");
        // y's last 10 are granted though x asked first.
        assert!(ledger.ask(y, 40, 40));
        assert_eq!(ledger.release(y), ["x"]);
        // 30 are free and x needs all of them: a newcomer that would take
        // one and need more than is left waits, though there is room...
        let (z, w) = (ledger.open(), ledger.open());
        assert!(!ledger.ask(z, 1, 40));
        ledger.wait(z, "z");
        // ...and one that can finish from what is left goes first.
        assert!(ledger.ask(w, 1, 10));
        assert!(ledger.release(w).is_empty());
        assert_eq!(ledger.release(x), ["z"]);
    }

    #[test]
    fn a_body_over_the_whole_budget_holds_it_alone() {
        let mut ledger = Ledger::<&str>::new(10);
        let (big, small) = (ledger.open(), ledger.open());
        assert!(ledger.ask(small, 2, 2));
        // Claims and asks are cut to the budget: the big body waits for
        // all of it.
        assert!(!ledger.ask(big, 50, 500));
        ledger.wait(big, "big");
        assert!(ledger.ask(small, 2, 2), "what it holds, again");
        assert_eq!(ledger.release(small), ["big"]);
        assert_eq!(ledger.held(), 10);
        assert!(!ledger.ask(small, 1, 1), "nothing left");
        assert!(ledger.ask(big, 70, 500), "beyond the budget: uncounted");
        ledger.wait(small, "small");
        assert_eq!(ledger.release(big), ["small"]);
    }

    #[test]
    fn a_release_withdraws_the_ask_and_an_unknown_body_is_nothing() {
        let mut ledger = Ledger::<&str>::new(10);
        let (a, b) = (ledger.open(), ledger.open());
        assert!(ledger.ask(a, 10, 10));
        assert!(!ledger.ask(b, 5, 5));
        ledger.wait(b, "b");
        assert_eq!(ledger.wait(b, "b2"), Some("b"));
        assert!(ledger.release(b).is_empty());
        assert!(!ledger.waiting(b));
        assert!(ledger.release(99).is_empty());
        assert!(ledger.release(a).is_empty());
        assert_eq!(ledger.held(), 0);
    }

    #[test]
    fn safe_means_some_order_lets_everyone_finish() {
        assert!(safe(0, &mut []));
        assert!(safe(10, &mut [(10, 30), (40, 0)]));
        assert!(!safe(9, &mut [(10, 30), (40, 0)]));
        assert!(!safe(10, &mut [(10, 20), (40, 0)]));
    }
}
