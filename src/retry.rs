//! Retry and pause rules: which outcomes to try again, after how long.
//!
//! A rule pairs a [`Matcher`] with what to do: retry the item after a
//! [`Backoff`] delay, or pause the shared [`PauseHandle`](crate::PauseHandle)
//! and retry after the pause ([`PausePolicy`]). Rules are tried in order and
//! the first match wins.
//!
//! # One cap on attempts, on the rule
//!
//! How many attempts an item gets is said in one place: on the policy of
//! the rule that matched its last outcome — [`Backoff::max_attempts`]
//! (default [`Backoff::DEFAULT_MAX_ATTEMPTS`], 3) for a retry rule,
//! [`PausePolicy::max_attempts`] (default
//! [`PausePolicy::DEFAULT_MAX_ATTEMPTS`], 10) for a pause rule. The cap
//! counts every attempt of the item, whichever rule caused it. Nothing on
//! the endpoint or the client stops an item sooner, so
//! `Backoff::exponential(..).max_attempts(50)` means 50. Other limits stop
//! retrying by time or share, never by a count of their own:
//! [`Backoff::max_elapsed`], a [`RetryBudget`], a per-item timeout. The decision (inside the fetch operator) is pure: it sees the outcome, the
//! item's attempt count and elapsed time, the server's `Retry-After` and
//! `now`, and returns what to do; the fetch operator does the waiting.

use std::time::Duration;

use bytes::Bytes;
use http::Response;
use tokio::time::Instant;

use crate::error::TransportError;
use crate::stats::Stats;

mod backoff;
mod budget;
mod matcher;
mod pause_policy;
mod retry_after;

pub use self::backoff::Backoff;
pub use self::budget::RetryBudget;
pub use self::matcher::Matcher;
pub use self::pause_policy::PausePolicy;
pub use self::retry_after::parse_retry_after;
pub(crate) use self::retry_after::retry_after;

#[derive(Debug, Clone)]
enum Rule<M> {
    Retry { matcher: M, policy: Backoff },
    Pause { matcher: M, policy: PausePolicy },
}

/// Which outcomes of type `O` a rule's matcher applies to: a [`Matcher`]
/// reads HTTP outcomes; [`map_concurrent`](crate::SluiceExt::map_concurrent)
/// rules read a step's error.
pub(crate) trait Matches<O> {
    fn matches(&self, outcome: &O) -> bool;
}

impl Matches<Result<Response<Bytes>, TransportError>> for Matcher {
    fn matches(&self, outcome: &Result<Response<Bytes>, TransportError>) -> bool {
        Matcher::matches(self, outcome)
    }
}

/// An ordered list of rules, shared by every item of one fetch operator.
#[derive(Debug, Clone)]
pub(crate) struct Rules<M = Matcher> {
    rules: Vec<Rule<M>>,
    /// How many rules at the front were added on the operator (they come
    /// before the client's defaults, so they win).
    own: usize,
    /// The pause handle's cap, so a capped `Retry-After` is noticed (and
    /// logged) here, where the server's value is still known.
    pause_cap: Option<Duration>,
    /// Where a capped `Retry-After` is counted: the client's stats.
    stats: Option<Stats>,
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The outcome is final.
    Finish,
    /// Wait `delay`, then try again.
    Retry { delay: Duration, cause: DelayCause },
    /// Pause every operator sharing the handle for `delay`, then try again.
    Pause { delay: Duration, cause: DelayCause },
}

/// Where a delay came from, for tracing and stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DelayCause {
    Policy,
    RetryAfter,
}

impl DelayCause {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Policy => "policy",
            Self::RetryAfter => "retry-after",
        }
    }
}

/// What an item's history looks like when an attempt ends.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attempted {
    /// Attempts made so far, this one included.
    pub(crate) attempts: u32,
    /// Since the item's first attempt started.
    pub(crate) elapsed: Duration,
    /// The previous computed delay (for decorrelated jitter).
    pub(crate) previous_delay: Duration,
}

impl<M> Default for Rules<M> {
    fn default() -> Self {
        Self {
            rules: Vec::new(),
            own: 0,
            pause_cap: None,
            stats: None,
        }
    }
}

impl<M: Clone> Rules<M> {
    /// Adds a retry rule ahead of inherited defaults, after earlier own rules.
    pub(crate) fn retry_on(&mut self, matcher: M, policy: Backoff) {
        self.insert(Rule::Retry { matcher, policy });
    }

    /// Adds a pause rule ahead of inherited defaults, after earlier own rules.
    pub(crate) fn pause_on(&mut self, matcher: M, policy: PausePolicy) {
        self.insert(Rule::Pause { matcher, policy });
    }

    fn insert(&mut self, rule: Rule<M>) {
        self.rules.insert(self.own, rule);
        self.own += 1;
    }

    /// The same rules, all counted as inherited defaults.
    pub(crate) fn inherited(&self) -> Self {
        Self {
            own: 0,
            ..self.clone()
        }
    }

    /// Pauses these rules ask for are capped at `cap` (the handle's own cap).
    pub(crate) fn set_pause_cap(&mut self, cap: Duration) {
        self.pause_cap = Some(cap);
    }

    /// Counts capped `Retry-After` values in `stats`.
    pub(crate) fn set_stats(&mut self, stats: Option<Stats>) {
        self.stats = stats;
    }

    /// Whether there are no rules at all (every outcome is final).
    pub(crate) fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Records an original request with every budget the rules spend from.
    pub(crate) fn deposit(&self) {
        for rule in &self.rules {
            if let Rule::Retry { policy, .. } = rule {
                if let Some(budget) = policy.budget_ref() {
                    budget.deposit(Instant::now());
                }
            }
        }
    }

    /// The seed of the first rule that sets one.
    pub(crate) fn seed(&self) -> Option<u64> {
        self.rules.iter().find_map(|rule| match rule {
            Rule::Retry { policy, .. } => policy.seed_value(),
            Rule::Pause { .. } => None,
        })
    }

    /// Decides what follows an attempt. Pure but for spending from a retry
    /// budget, which is itself decided from the given `now`.
    pub(crate) fn decide<O>(
        &self,
        outcome: &O,
        history: Attempted,
        retry_after: Option<Duration>,
        now: Instant,
        draw: u64,
    ) -> Verdict
    where
        M: Matches<O>,
    {
        let Some(rule) = self.rules.iter().find(|rule| match rule {
            Rule::Retry { matcher, .. } | Rule::Pause { matcher, .. } => matcher.matches(outcome),
        }) else {
            return Verdict::Finish;
        };
        match rule {
            Rule::Pause { policy, .. } => {
                if history.attempts >= policy.attempts() {
                    return Verdict::Finish;
                }
                match retry_after {
                    Some(delay) => Verdict::Pause {
                        delay: self.capped(delay, self.pause_cap, "pause"),
                        cause: DelayCause::RetryAfter,
                    },
                    None => Verdict::Pause {
                        delay: policy.fallback_delay(),
                        cause: DelayCause::Policy,
                    },
                }
            }
            Rule::Retry { policy, .. } => {
                if history.attempts >= policy.attempts() {
                    return Verdict::Finish;
                }
                let (delay, cause) = match policy.server_delay(retry_after) {
                    Some(delay) => {
                        let asked = retry_after.unwrap_or(delay);
                        self.capped(asked, Some(policy.retry_after_limit()), "retry");
                        (delay, DelayCause::RetryAfter)
                    }
                    None => (
                        policy.delay(history.attempts, history.previous_delay, draw),
                        DelayCause::Policy,
                    ),
                };
                if policy
                    .max_elapsed_limit()
                    .is_some_and(|max| history.elapsed.saturating_add(delay) > max)
                {
                    return Verdict::Finish;
                }
                if policy.budget_ref().is_some_and(|b| !b.withdraw(now)) {
                    return Verdict::Finish;
                }
                Verdict::Retry { delay, cause }
            }
        }
    }
}

impl<M> Rules<M> {
    /// `asked` within `cap`, with a warning when the server asked for more:
    /// a capped `Retry-After` is a server misbehaving (or a hostile one),
    /// and the run should say so rather than quietly wait less.
    fn capped(&self, asked: Duration, cap: Option<Duration>, wait: &'static str) -> Duration {
        match cap {
            Some(cap) if asked > cap => {
                tracing::warn!(
                    retry_after_s = asked.as_secs(),
                    capped_s = cap.as_secs(),
                    wait,
                    "server's Retry-After capped"
                );
                if let Some(stats) = &self.stats {
                    stats.retry_after_capped();
                }
                cap
            }
            _ => asked,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::TransportErrorKind;
    use http::StatusCode;

    fn status(code: u16) -> Result<Response<Bytes>, TransportError> {
        let mut r = Response::new(Bytes::new());
        *r.status_mut() = StatusCode::from_u16(code).unwrap();
        Ok(r)
    }

    fn at(attempts: u32, elapsed_ms: u64) -> Attempted {
        Attempted {
            attempts,
            elapsed: Duration::from_millis(elapsed_ms),
            previous_delay: Duration::ZERO,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn first_match_wins_and_limits_apply() {
        let ms = Duration::from_millis;
        let mut rules = Rules::default();
        rules.retry_on(
            StatusCode::TOO_MANY_REQUESTS.into(),
            Backoff::constant(ms(10))
                .max_attempts(3)
                .max_elapsed(ms(100)),
        );
        rules.pause_on(Matcher::server_errors(), ms(500).into());
        rules.retry_on(Matcher::transport_errors(), Backoff::constant(ms(1)));
        let now = Instant::now();
        let rng = 0;

        let retry = Verdict::Retry {
            delay: ms(10),
            cause: DelayCause::Policy,
        };
        assert_eq!(rules.decide(&status(429), at(1, 0), None, now, rng), retry);
        assert_eq!(
            rules.decide(&status(429), at(3, 0), None, now, rng),
            Verdict::Finish
        );
        assert_eq!(
            rules.decide(&status(429), at(1, 95), None, now, rng),
            Verdict::Finish
        );
        assert_eq!(
            rules.decide(&status(429), at(1, 0), Some(ms(40)), now, rng),
            Verdict::Retry {
                delay: ms(40),
                cause: DelayCause::RetryAfter
            }
        );
        assert_eq!(
            rules.decide(&status(503), at(1, 0), None, now, rng),
            Verdict::Pause {
                delay: ms(500),
                cause: DelayCause::Policy
            }
        );
        assert_eq!(
            rules.decide(&status(404), at(1, 0), None, now, rng),
            Verdict::Finish
        );
        let reset = Err(TransportError::new(TransportErrorKind::Reset, "x"));
        assert!(matches!(
            rules.decide(&reset, at(1, 0), None, now, rng),
            Verdict::Retry { .. }
        ));
        // A pause rule has its own cap, default 10 attempts.
        assert!(matches!(
            rules.decide(&status(503), at(9, 0), None, now, rng),
            Verdict::Pause { .. }
        ));
        assert_eq!(
            rules.decide(
                &status(503),
                at(PausePolicy::DEFAULT_MAX_ATTEMPTS, 0),
                None,
                now,
                rng
            ),
            Verdict::Finish
        );
    }

    #[tokio::test(start_paused = true)]
    async fn own_rules_come_before_inherited_ones() {
        let ms = Duration::from_millis;
        let mut defaults = Rules::default();
        defaults.retry_on(Matcher::server_errors(), Backoff::constant(ms(1)));
        let mut own = defaults.inherited();
        own.pause_on(StatusCode::SERVICE_UNAVAILABLE.into(), ms(7).into());
        let rng = 0;
        assert_eq!(
            own.decide(&status(503), at(1, 0), None, Instant::now(), rng),
            Verdict::Pause {
                delay: ms(7),
                cause: DelayCause::Policy
            }
        );
        assert!(matches!(
            own.decide(&status(500), at(1, 0), None, Instant::now(), rng),
            Verdict::Retry { .. }
        ));
    }
}
