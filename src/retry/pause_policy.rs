//! [`PausePolicy`]: how long a pause rule pauses, and how many times.

use std::time::Duration;

/// What a pause rule ([`pause_on`](crate::WithPolicy::pause_on)) does: pause
/// the shared handle for the server's `Retry-After`, else for the
/// `fallback`, then send the item again; at most
/// [`max_attempts`](Self::max_attempts) attempts for the item.
///
/// A bare `Duration` is a policy with that fallback and the default cap, so
/// `pause_on(503, Duration::from_secs(10))` reads as it did.
///
/// Each rule carries the one cap on attempts that applies when it matches:
/// this one for a pause rule, [`Backoff::max_attempts`](super::Backoff::max_attempts)
/// for a retry rule. There is no other cap on the endpoint or the client to
/// stop an item earlier.
///
/// ```
/// use sluicegate::prelude::*;
/// use sluicegate::retry::PausePolicy;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mock = MockTransport::new();
/// mock.mount(Route::get("/down").respond(MockResponse::status(503)));
/// let client = Client::builder().transport(mock.clone()).base_url("http://mock").build()?;
///
/// let err = client
///     .get(|_: &()| "/down")
///     .pause_on(503, PausePolicy::fallback(Duration::from_secs(1)).max_attempts(4))
///     .fetch(())
///     .await
///     .unwrap_err();
/// assert_eq!((err.attempts(), err.elapsed()), (4, Duration::from_secs(3)));
/// assert_eq!(mock.call_count(), 4);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a PausePolicy does nothing until given to a pause rule; its methods return a new one"]
pub struct PausePolicy {
    fallback: Duration,
    max_attempts: u32,
}

impl PausePolicy {
    /// The default number of attempts per item under a pause rule, the
    /// first one included: 10. With the default 60 s cap on a pause, an
    /// item gives up after at most 9 pauses.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;

    /// Pauses for the server's `Retry-After` (capped by the pause handle),
    /// or for `fallback` when it gives none.
    pub fn fallback(fallback: Duration) -> Self {
        Self {
            fallback,
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
        }
    }

    /// Attempts per item, the first one included (default
    /// [`DEFAULT_MAX_ATTEMPTS`](Self::DEFAULT_MAX_ATTEMPTS)). Attempts that
    /// other rules caused count too: the cap is on the item's attempts
    /// when an outcome this rule matches arrives.
    ///
    /// # Panics
    ///
    /// If `attempts` is 0: an item always gets its first attempt.
    #[track_caller]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        assert!(attempts > 0, "PausePolicy::max_attempts must be at least 1");
        self.max_attempts = attempts;
        self
    }

    /// The pause when the server gives no `Retry-After`.
    pub fn fallback_delay(&self) -> Duration {
        self.fallback
    }

    /// The number of attempts per item.
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }
}

impl From<Duration> for PausePolicy {
    fn from(fallback: Duration) -> Self {
        Self::fallback(fallback)
    }
}
