//! One process's line of waiters for a Redis-backed limit.
//!
//! # Why one task asks for the whole line
//!
//! If every waiting request asked Redis, a "not yet" would send them all
//! back together at the same instant, and the calls per token would grow
//! with the requests waiting (about 40 per token with 16 processes of 64
//! waiters each). Here a process's waiters queue locally, first come first
//! served, and one task per process (the line's *head*) asks Redis on
//! their behalf. Redis answers a head that has more waiting behind it with
//! its turn for the next token (see `TAKE` in the parent module), so the
//! head sleeps exactly that long and its next call is a grant: about one
//! call per token, whatever the number of waiters or processes.
//!
//! # Keeping a turn
//!
//! The heads of all processes form a line of their own, in Redis: the
//! turns it handed out. The head hands its turn back with each call, so
//! Redis can tell a head on time from one that is early or late. One that
//! comes back before its token is due keeps its turn (it is told to come
//! back at it, or when its token is due, ahead of the turns handed out
//! after its own), instead of being sent behind every other process. A
//! head late by more than Redis forgives takes only a token nobody on time
//! can still be coming for; failing that, it has missed its turn and
//! queues again. Were it granted a token dated at its late arrival, every
//! token behind it would move back, and each head after it would arrive
//! early.
//! Its waiters keep their order here either way.
//!
//! The head is a spawned task, not one of the waiters: a waiter that
//! nobody polls must not hold up those behind it. A token granted is
//! handed to the first waiter not held by its pause, and the owner takes
//! it when next polled. A waiter dropped before its turn leaves the line
//! and takes nothing; a token handed to a waiter that was dropped or
//! paused before taking it is spent, never sent late in a burst. The task
//! ends when the line is empty and starts again with the next waiter.
//!
//! The line owns its head (an `AbortOnDropHandle`): the waiter that leaves
//! the line empty also ends the head, at once, even when it is asleep
//! until a turn far off or in the middle of a call to Redis. So a head
//! never outlives the waiters it asks for, and dropping every limiter
//! leaves no task behind. A token a head was being granted when the last
//! waiter left is spent, as one granted to a waiter that left would be.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use super::{FailureMode, RemoteLimit, Reply, Turn};
use crate::pause::PauseHandle;

/// How a waiter's turn ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Redis granted a token: go now.
    Granted,
    /// Redis is unreachable and the limit falls back to the local one:
    /// take a token there.
    Fallback,
    /// Redis stayed unreachable longer than a fail-closed limit allows.
    Failed(String),
}

/// The waiters of one process, in arrival order.
#[derive(Default)]
pub(crate) struct Line {
    state: Mutex<State>,
    /// Wakes a head waiting for its waiters' pause when the line changes.
    changed: Notify,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Waiter>,
    next_id: u64,
    /// The head task running for this line, if any.
    head: Option<Head>,
    /// How many heads were started, to tell the current one from one
    /// that was replaced.
    heads: u64,
}

/// The running head, owned by the line.
struct Head {
    id: u64,
    /// `None` for the moment between reserving the place and spawning
    /// the task (spawning wakes a worker, so it is done outside the lock).
    task: Option<AbortOnDropHandle<()>>,
}

impl State {
    /// Reserves the head's place if nobody holds it; the caller spawns the
    /// head with the id returned, outside the lock.
    fn claim_head(&mut self) -> Option<u64> {
        if self.head.is_some() {
            return None;
        }
        self.heads += 1;
        self.head = Some(Head {
            id: self.heads,
            task: None,
        });
        Some(self.heads)
    }

    /// Once nobody waits, takes the head out, to be dropped (and so
    /// aborted) outside the lock.
    fn release_head_if_empty(&mut self) -> Option<Head> {
        if self.queue.is_empty() {
            self.head.take()
        } else {
            None
        }
    }
}

/// Spawns head number `id` of `limit`'s line and hands its handle to the
/// line; a head that was released meanwhile is aborted at once.
fn start_head(limit: &Arc<RemoteLimit>, id: u64) {
    let task = AbortOnDropHandle::new(tokio::spawn(head(limit.clone(), id)));
    let unclaimed = {
        let mut state = limit.line.lock();
        match &mut state.head {
            Some(head) if head.id == id => {
                head.task = Some(task);
                None
            }
            _ => Some(task),
        }
    };
    drop(unclaimed);
}

struct Waiter {
    id: u64,
    joined: Instant,
    pause: Option<PauseHandle>,
    outcome: Option<Outcome>,
    waker: Option<Waker>,
}

impl Waiter {
    fn is_held(&self) -> bool {
        self.pause.as_ref().is_some_and(PauseHandle::is_paused)
    }
}

impl Line {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain data, consistent at every unlock: poisoning cannot leave it
        // half-updated.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many wait for their turn.
    pub(crate) fn waiting(&self) -> usize {
        self.lock()
            .queue
            .iter()
            .filter(|w| w.outcome.is_none())
            .count()
    }
}

/// Waits in `limit`'s line for a turn, honouring `pause`. Cancel safe.
pub(crate) async fn acquire(limit: &Arc<RemoteLimit>, pause: Option<PauseHandle>) -> Outcome {
    let ticket = Ticket::join(limit, pause);
    std::future::poll_fn(|cx| {
        let mut stale = None;
        let mut released = None;
        let mut old_waker = None;
        let mut start = None;
        let poll = {
            let mut state = limit.line.lock();
            let pos = state
                .queue
                .iter()
                .position(|w| w.id == ticket.id)
                .expect("a waiter stays in line until its ticket is dropped");
            let waiter = &mut state.queue[pos];
            if waiter.outcome == Some(Outcome::Granted) && waiter.is_held() {
                // Granted, then a pause began before the owner came for the
                // token: sent after the pause it would join a burst. The
                // token is spent; the waiter keeps its place.
                waiter.outcome = None;
            }
            if let Some(outcome) = waiter.outcome.take() {
                stale = state.queue.remove(pos);
                released = state.release_head_if_empty();
                Poll::Ready(outcome)
            } else {
                if !waiter
                    .waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    old_waker = waiter.waker.replace(cx.waker().clone());
                }
                // A head that ended with its runtime leaves the line
                // without one.
                start = state.claim_head();
                Poll::Pending
            }
        };
        // The old waker, the pause handle and a head no longer needed are
        // dropped outside the lock.
        drop((stale, old_waker, released));
        if let Some(id) = start {
            start_head(limit, id);
        }
        poll
    })
    .await
}

/// A place in line; dropped before its turn, it leaves the line.
struct Ticket<'a> {
    limit: &'a Arc<RemoteLimit>,
    id: u64,
}

impl<'a> Ticket<'a> {
    fn join(limit: &'a Arc<RemoteLimit>, pause: Option<PauseHandle>) -> Self {
        let (id, start) = {
            let mut state = limit.line.lock();
            let id = state.next_id;
            state.next_id += 1;
            state.queue.push_back(Waiter {
                id,
                joined: Instant::now(),
                pause,
                outcome: None,
                waker: None,
            });
            (id, state.claim_head())
        };
        limit.line.changed.notify_one();
        if let Some(head) = start {
            start_head(limit, head);
        }
        Self { limit, id }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let (left, released) = {
            let mut state = self.limit.line.lock();
            let pos = state.queue.iter().position(|w| w.id == self.id);
            let left = pos.and_then(|pos| state.queue.remove(pos));
            (left, state.release_head_if_empty())
        };
        if left.is_some() {
            self.limit.line.changed.notify_one();
        }
        // Its waker and pause handle, and the head when nobody is left to
        // ask for, are dropped here, outside the lock.
        drop((left, released));
    }
}

/// Marks the line as having no head when the head task ends, including
/// when it is aborted or its runtime drops it mid-wait; a head that was
/// already replaced leaves its successor alone.
struct Running<'a> {
    line: &'a Line,
    id: u64,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let own = {
            let mut state = self.line.lock();
            match &state.head {
                Some(head) if head.id == self.id => state.head.take(),
                _ => None,
            }
        };
        // Its own handle: dropping it aborts a task that is ending anyway.
        drop(own);
    }
}

/// What the head does next, decided under the lock.
enum Next {
    /// Nobody waits: the head ends.
    Done,
    /// Everyone waiting is held by a pause: wait for this one's end.
    Held(PauseHandle),
    /// Ask Redis for a token; `more` when others wait behind.
    Ask { more: bool },
}

/// The head of a process's line: the only one asking Redis for it.
async fn head(limit: Arc<RemoteLimit>, id: u64) {
    let line = &limit.line;
    let _running = Running { line, id };
    // The turn Redis gave this process to come back at: handed back, it
    // keeps the process's place among the heads of other processes.
    let mut turn: Option<Turn> = None;
    loop {
        let mut ended = None;
        let next = {
            let mut state = line.lock();
            let mut ready = state
                .queue
                .iter()
                .filter(|w| w.outcome.is_none() && !w.is_held());
            if ready.next().is_some() {
                Next::Ask {
                    more: ready.next().is_some(),
                }
            } else if let Some(held) = state.queue.iter().find(|w| w.outcome.is_none()) {
                Next::Held(held.pause.clone().expect("only a pause holds a waiter"))
            } else {
                // The place is given up under the same lock a newcomer
                // takes to see whether a head runs, so the next waiter
                // starts a head of its own.
                if state.head.as_ref().is_some_and(|head| head.id == id) {
                    ended = state.head.take();
                }
                Next::Done
            }
        };
        // Its own handle, if it still held it: dropping it aborts a task
        // that is returning anyway.
        drop(ended);
        let more = match next {
            Next::Done => return,
            Next::Held(pause) => {
                tokio::select! {
                    () = pause.ready() => {}
                    () = line.changed.notified() => {}
                }
                continue;
            }
            Next::Ask { more } => more,
        };
        let rate = limit.rate();
        match limit.take(&rate, turn, more).await {
            Reply::Granted { next } => {
                let (woken, spent) = {
                    let mut state = line.lock();
                    match state
                        .queue
                        .iter_mut()
                        .find(|w| w.outcome.is_none() && !w.is_held())
                    {
                        Some(waiter) => {
                            waiter.outcome = Some(Outcome::Granted);
                            (waiter.waker.take(), false)
                        }
                        None => (None, true),
                    }
                };
                if spent {
                    // Its waiter left or was paused while Redis answered.
                    tracing::debug!("a token granted by Redis found nobody to take it");
                }
                if let Some(waker) = woken {
                    waker.wake();
                }
                turn = next;
                if let Some(next) = next {
                    tokio::time::sleep(next.wait).await;
                }
            }
            Reply::NotYet(next) => {
                turn = Some(next);
                tokio::time::sleep(next.wait).await;
            }
            Reply::Paused(left) => {
                turn = None;
                let pause = line.lock().queue.iter().find_map(|w| w.pause.clone());
                match pause {
                    Some(pause) => {
                        pause.pause_local(left);
                        pause.ready().await;
                    }
                    None => tokio::time::sleep(left).await,
                }
            }
            Reply::Unavailable(error) => {
                turn = None;
                let now = Instant::now();
                let woken: Vec<Waker> = {
                    let mut state = line.lock();
                    let failure = limit.failure();
                    state
                        .queue
                        .iter_mut()
                        .filter(|w| w.outcome.is_none())
                        .filter_map(|w| match failure {
                            FailureMode::FallbackLocal { .. } => {
                                w.outcome = Some(Outcome::Fallback);
                                w.waker.take()
                            }
                            FailureMode::FailClosed { give_up_after }
                                if now.saturating_duration_since(w.joined) >= give_up_after =>
                            {
                                w.outcome = Some(Outcome::Failed(format!(
                                    "rate limiter unreachable for {give_up_after:?}: {error}"
                                )));
                                w.waker.take()
                            }
                            FailureMode::FailClosed { .. } => None,
                        })
                        .collect()
                };
                woken.into_iter().for_each(Waker::wake);
                if matches!(limit.failure(), FailureMode::FailClosed { .. }) {
                    tokio::time::sleep(limit.retry_every()).await;
                }
            }
        }
    }
}
