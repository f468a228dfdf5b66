//! [`PauseHandle`]: one shared deadline that stalls every operator holding it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// A shared pause: a deadline before which no request starts.
///
/// A pause is a deadline, not a flag, so it ends by itself: nothing has to
/// remember to lift it. [`pause_until`](Self::pause_until) only ever extends
/// an active pause (two 503s with different `Retry-After`s give the later of
/// the two), [`resume`](Self::resume) ends it at once and wakes every waiter.
/// Every pause is capped at [`max_pause`](Self::max_pause) from the moment it
/// is asked for, so a hostile `Retry-After` cannot stall a run forever.
///
/// Clones share one deadline: give the same handle (or the same
/// [`Client`](crate::Client)) to every stage that must stall together.
///
/// ```
/// use std::time::Duration;
/// use sluicegate::PauseHandle;
/// use tokio::time::Instant;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let pause = PauseHandle::new();
/// let t0 = Instant::now();
/// pause.pause_for(Duration::from_secs(2));
/// pause.pause_for(Duration::from_secs(1)); // does not shorten it
/// assert!(pause.is_paused());
///
/// pause.ready().await;
/// assert_eq!(t0.elapsed(), Duration::from_secs(2));
/// # }
/// ```
#[derive(Clone)]
pub struct PauseHandle {
    shared: Arc<Shared>,
}

struct Shared {
    deadline: watch::Sender<Option<Instant>>,
    max_pause: Duration,
    /// Where pauses and resumes are also sent, for other processes.
    remote: Option<Arc<dyn RemotePause>>,
}

/// Carries a handle's pauses and resumes to other processes.
pub(crate) trait RemotePause: Send + Sync {
    /// A pause of `duration` from now began here.
    fn publish_pause(&self, duration: Duration);
    /// The pause was ended here.
    fn publish_resume(&self);
}

/// A handle that does not keep the pause alive (for background listeners).
#[cfg(feature = "redis")]
pub(crate) struct WeakPauseHandle(std::sync::Weak<Shared>);

#[cfg(feature = "redis")]
impl WeakPauseHandle {
    pub(crate) fn upgrade(&self) -> Option<PauseHandle> {
        self.0.upgrade().map(|shared| PauseHandle { shared })
    }
}

impl PauseHandle {
    /// The default cap on one pause: 60 seconds.
    ///
    /// A pause stalls every request sharing the handle, so a server's
    /// `Retry-After` is trusted for at most a minute by default; raise it
    /// with [`with_max_pause`](Self::with_max_pause) (or
    /// [`ClientBuilder::max_pause`](crate::ClientBuilder::max_pause)) for an
    /// API known to ask for longer.
    pub const DEFAULT_MAX_PAUSE: Duration = Duration::from_secs(60);

    /// A handle that is not paused, with the default cap.
    pub fn new() -> Self {
        Self::with_max_pause(Self::DEFAULT_MAX_PAUSE)
    }

    /// A handle whose pauses never last longer than `max_pause`.
    pub fn with_max_pause(max_pause: Duration) -> Self {
        Self {
            shared: Arc::new(Shared {
                deadline: watch::Sender::new(None),
                max_pause,
                remote: None,
            }),
        }
    }

    /// A handle whose pauses and resumes also go to `remote`.
    #[cfg(feature = "redis")]
    pub(crate) fn with_remote(max_pause: Duration, remote: Arc<dyn RemotePause>) -> Self {
        Self {
            shared: Arc::new(Shared {
                deadline: watch::Sender::new(None),
                max_pause,
                remote: Some(remote),
            }),
        }
    }

    #[cfg(feature = "redis")]
    pub(crate) fn downgrade(&self) -> WeakPauseHandle {
        WeakPauseHandle(Arc::downgrade(&self.shared))
    }

    /// The cap on any one pause.
    pub fn max_pause(&self) -> Duration {
        self.shared.max_pause
    }

    /// Pauses for `duration` from now (capped), unless already paused for
    /// longer. Returns the deadline in force afterwards.
    pub fn pause_for(&self, duration: Duration) -> Instant {
        // Cap before adding: a hostile duration must not overflow the clock.
        let now = Instant::now();
        let capped = duration.min(self.shared.max_pause);
        self.pause_until(now.checked_add(capped).unwrap_or_else(|| far_future(now)))
    }

    /// Pauses until `deadline` (capped at `max_pause` from now), unless
    /// already paused until later. Returns the deadline in force afterwards.
    pub fn pause_until(&self, deadline: Instant) -> Instant {
        let (in_force, extended) = self.extend(deadline);
        if extended {
            if let Some(remote) = &self.shared.remote {
                remote.publish_pause(in_force.saturating_duration_since(Instant::now()));
            }
        }
        in_force
    }

    /// Applies a pause another process announced, without announcing it again.
    #[cfg(feature = "redis")]
    pub(crate) fn pause_local(&self, duration: Duration) {
        let now = Instant::now();
        self.extend(
            now.checked_add(duration.min(self.shared.max_pause))
                .unwrap_or_else(|| far_future(now)),
        );
    }

    /// Applies a resume another process announced.
    pub(crate) fn resume_local(&self) {
        // The deadline moves to now rather than vanishing, so `last_end`
        // still says when the last pause ended.
        let now = Instant::now();
        self.shared
            .deadline
            .send_if_modified(|current| match current {
                Some(deadline) if *deadline > now => {
                    *current = Some(now);
                    true
                }
                _ => false,
            });
    }

    /// When the pause in force ends, or the last one ended; `None` if this
    /// handle was never paused. A limiter grants nobody who honours this
    /// handle a token dated before it, so no more go at a pause's end than
    /// the rate's burst allows.
    pub(crate) fn last_end(&self) -> Option<Instant> {
        *self.shared.deadline.borrow()
    }

    /// Moves the deadline to `deadline` (capped) if that is later; returns
    /// the deadline in force and whether it moved.
    fn extend(&self, deadline: Instant) -> (Instant, bool) {
        let now = Instant::now();
        let deadline = match now.checked_add(self.shared.max_pause) {
            Some(cap) => deadline.min(cap),
            None => deadline,
        };
        let mut in_force = deadline;
        let extended = self
            .shared
            .deadline
            .send_if_modified(|current| match current {
                Some(existing) if *existing >= deadline => {
                    in_force = *existing;
                    false
                }
                _ => {
                    *current = Some(deadline);
                    true
                }
            });
        (in_force, extended)
    }

    /// Ends any pause now and wakes every waiter.
    pub fn resume(&self) {
        self.resume_local();
        if let Some(remote) = &self.shared.remote {
            remote.publish_resume();
        }
    }

    /// Whether a pause is in force now.
    pub fn is_paused(&self) -> bool {
        self.paused_until().is_some()
    }

    /// The deadline of the pause in force now, if any.
    pub fn paused_until(&self) -> Option<Instant> {
        // Read the clock only when there is a deadline to compare with.
        let deadline = (*self.shared.deadline.borrow())?;
        (deadline > Instant::now()).then_some(deadline)
    }

    /// Waits until no pause is in force. Returns at once when not paused.
    ///
    /// A pause extended while waiting is waited for to its new end; a
    /// [`resume`](Self::resume) wakes every waiter at once.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the future only watches the deadline, holds no place
    /// in any line and takes nothing, so dropping it changes nothing and a
    /// new call waits exactly as the dropped one would have.
    ///
    /// # Panics
    ///
    /// When it has to wait outside a tokio runtime with its time driver
    /// enabled (it sleeps on tokio's clock). Not paused, it returns at
    /// once anywhere.
    pub async fn ready(&self) {
        if !self.is_paused() {
            return;
        }
        let mut changes = self.shared.deadline.subscribe();
        loop {
            let deadline = *changes.borrow_and_update();
            match deadline {
                Some(deadline) if deadline > Instant::now() => {
                    tokio::select! {
                        () = tokio::time::sleep_until(deadline) => {}
                        _ = changes.changed() => {}
                    }
                }
                _ => return,
            }
        }
    }
}

impl Default for PauseHandle {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for PauseHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PauseHandle")
            .field("paused_until", &self.paused_until())
            .field("max_pause", &self.shared.max_pause)
            .finish()
    }
}

/// About thirty years from `now`: "for ever" without overflowing the clock.
fn far_future(now: Instant) -> Instant {
    now + Duration::from_secs(86_400 * 365 * 30)
}
