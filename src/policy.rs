//! [`Policy`]: what a fetch does besides sending — its retry and pause
//! rules, timeouts, extra rate limits and counters — and [`WithPolicy`],
//! the one trait that sets it on every type that has one.
//!
//! The same rules are set in four places: on the [`ClientBuilder`] as
//! defaults, on an [`Endpoint`], on a [`FetchConcurrent`] stage and on a
//! [`Paginate`] walk. Each of them holds a `Policy` and implements
//! `WithPolicy` by handing it out; the methods themselves (and their docs)
//! are written once, here.
//!
//! [`ClientBuilder`]: crate::ClientBuilder
//! [`Endpoint`]: crate::Endpoint
//! [`FetchConcurrent`]: crate::ext::FetchConcurrent
//! [`Paginate`]: crate::etl::Paginate

use std::fmt;
use std::time::Duration;

use crate::limiter::{KeyedLimiter, Limiter};
use crate::retry::{Backoff, Matcher, PausePolicy, Rules};
use crate::stats::Stats;

/// The rules, timeouts, extra limits and counters of a fetch; set through
/// [`WithPolicy`].
///
/// An endpoint starts from its client's policy: the client's rules come
/// after the endpoint's own (the first rule that matches decides), its
/// limits before the endpoint's own (a request waits on them in that
/// order), its timeouts unless the endpoint sets its own.
#[derive(Clone)]
pub struct Policy {
    pub(crate) rules: Rules,
    /// Per attempt; `None`: no limit.
    pub(crate) timeout: Option<Duration>,
    /// Per item, every attempt and wait included.
    pub(crate) item_timeout: Option<Duration>,
    /// Limiters a request waits on after the client's own, in this order.
    pub(crate) limits: Vec<Limit>,
    pub(crate) stats: Vec<Stats>,
}

/// One limit beyond the client's: a limiter, or one limiter per host.
#[derive(Clone)]
pub(crate) enum Limit {
    Shared(Limiter),
    PerHost(KeyedLimiter<String>),
}

impl Limit {
    /// Whether the limiter depends on the request's host.
    pub(crate) fn is_per_host(&self) -> bool {
        matches!(self, Self::PerHost(_))
    }

    /// The limiter a request to `host` (`host:port` when the URL has a
    /// port) waits on.
    pub(crate) fn for_host(&self, host: &str) -> Limiter {
        match self {
            Self::Shared(limiter) => limiter.clone(),
            Self::PerHost(keyed) => keyed.get(host.to_owned()),
        }
    }
}

impl Policy {
    /// The default per-attempt timeout: 30 seconds.
    ///
    /// Every attempt is bounded unless asked otherwise, so a server that
    /// accepts and never answers cannot hang an item: change it with
    /// [`WithPolicy::timeout`], or turn it off with
    /// [`WithPolicy::no_timeout`].
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

    /// The same policy as the defaults of another: its rules come after
    /// any added later.
    pub(crate) fn inherited(&self) -> Self {
        Self {
            rules: self.rules.inherited(),
            ..self.clone()
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            rules: Rules::default(),
            timeout: Some(Self::DEFAULT_TIMEOUT),
            item_timeout: None,
            limits: Vec::new(),
            stats: Vec::new(),
        }
    }
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("rules", &self.rules)
            .field("timeout", &self.timeout)
            .field("item_timeout", &self.item_timeout)
            .field("limits", &self.limits.len())
            .finish_non_exhaustive()
    }
}

mod sealed {
    pub trait Sealed {}
}
pub(crate) use sealed::Sealed;

/// Retry and pause rules, timeouts and extra limits, on every type that
/// fetches: [`ClientBuilder`](crate::ClientBuilder) (defaults for every
/// endpoint of the client), [`Endpoint`](crate::Endpoint),
/// [`FetchConcurrent`](crate::ext::FetchConcurrent) and
/// [`Paginate`](crate::etl::Paginate).
///
/// In the [prelude](crate::prelude). Each method returns the value it was
/// called on, changed; a stage panics if configured after its first poll,
/// since a rule added then would apply to some items only.
///
/// ```
/// use sluicegate::prelude::*;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mock = MockTransport::new();
/// mock.mount(Route::get("/search").sequence([MockResponse::status(429), MockResponse::ok()]));
/// mock.mount(Route::get("/items/{id}").respond(MockResponse::ok()));
/// let client = Client::builder()
///     .transport(mock.clone())
///     .base_url("http://127.0.0.1:8080")
///     .rate(Rate::per_second(20)) // every request of the client
///     .retry_on(429, Backoff::constant(Duration::from_millis(100)))
///     .build()?;
///
/// // One endpoint with a stricter quota of its own, on top of the client's.
/// let search = client.get(|q: &String| format!("/search?q={q}")).limit(Limiter::new(Rate::per_second(5)));
/// let found: Vec<_> = stream::iter(["a".to_owned()])
///     .fetch_concurrent(4, search)
///     .timeout(Duration::from_secs(5))
///     .try_collect()
///     .await?;
/// assert_eq!(found[0].attempts, 2);
/// # Ok(())
/// # }
/// ```
pub trait WithPolicy: Sized + Sealed {
    #[doc(hidden)]
    fn map_policy(self, change: impl FnOnce(&mut Policy)) -> Self;

    /// Retries outcomes that `matcher` matches, waiting as `policy` says
    /// (or as the server's `Retry-After` says, capped by the policy), up to
    /// the policy's [`max_attempts`](Backoff::max_attempts) (default 3):
    /// the only cap on attempts when this rule matches.
    ///
    /// Rules are tried in the order added, and rules added to an endpoint
    /// or stage come before the client's; the first that matches decides.
    #[track_caller]
    fn retry_on(self, matcher: impl Into<Matcher>, policy: Backoff) -> Self {
        let matcher = matcher.into();
        self.map_policy(|p| p.rules.retry_on(matcher, policy))
    }

    /// On outcomes that `matcher` matches, pauses the client's shared
    /// [`PauseHandle`](crate::PauseHandle) for the server's `Retry-After`
    /// (else the policy's fallback: a bare `Duration` is one), then retries
    /// the item once the pause ends, up to the policy's
    /// [`max_attempts`](PausePolicy::max_attempts) (default 10).
    #[track_caller]
    fn pause_on(self, matcher: impl Into<Matcher>, policy: impl Into<PausePolicy>) -> Self {
        let (matcher, policy) = (matcher.into(), policy.into());
        self.map_policy(|p| p.rules.pause_on(matcher, policy))
    }

    /// Gives each attempt at most `timeout` (default
    /// [`Policy::DEFAULT_TIMEOUT`], 30 s). A timed-out attempt is a
    /// transport error of kind timeout, which
    /// [`Matcher::timeouts`] matches.
    #[track_caller]
    fn timeout(self, timeout: Duration) -> Self {
        self.map_policy(|p| p.timeout = Some(timeout))
    }

    /// Lets an attempt wait for ever: no per-attempt timeout. Only for a
    /// transport that bounds its own waits.
    #[track_caller]
    fn no_timeout(self) -> Self {
        self.map_policy(|p| p.timeout = None)
    }

    /// Gives each item at most `timeout` for all its attempts together,
    /// waits and pauses included.
    #[track_caller]
    fn item_timeout(self, timeout: Duration) -> Self {
        self.map_policy(|p| p.item_timeout = Some(timeout))
    }

    /// Also waits on `limiter` before every attempt, after the client's
    /// own limiter and any added before: a stricter quota for one endpoint
    /// (or a second quota for the whole client, such as an hourly one
    /// beside a per-second one).
    ///
    /// Every request waits on its limiters in that one order, broadest
    /// first, and is sent as soon as the last one grants; no request holds
    /// anything another waits for, so limits shared between endpoints in
    /// any combination cannot deadlock. The last limiter's grant is the
    /// send, so the narrowest limit holds exactly at the server; a broader
    /// one counts its token when it grants it, up to one wait on the
    /// narrower ones earlier.
    #[track_caller]
    fn limit(self, limiter: Limiter) -> Self {
        self.map_policy(|p| p.limits.push(Limit::Shared(limiter)))
    }

    /// Also waits on the limiter of the request's host (with its port) in
    /// `limiters`: one budget per host, made at the keyed limiter's rate,
    /// waited on in the same order as [`limit`](Self::limit). For a
    /// politeness limit per site when items name absolute URLs.
    #[track_caller]
    fn limit_per_host(self, limiters: KeyedLimiter<String>) -> Self {
        self.map_policy(|p| p.limits.push(Limit::PerHost(limiters)))
    }

    /// Also counts these requests in `stats`, for example a stage's own
    /// [`Stats`] beside the client's.
    #[track_caller]
    fn with_stats(self, stats: Stats) -> Self {
        self.map_policy(|p| p.stats.push(stats))
    }
}
