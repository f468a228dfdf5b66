//! [`Matcher`]: which attempt outcomes a retry or pause rule applies to.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};

use crate::body::Undecodable;
use crate::error::{TransportError, TransportErrorKind};

type Predicate = dyn Fn(&Response<Bytes>) -> bool + Send + Sync;

/// Which outcomes of an attempt a rule applies to.
///
/// Made from a status (`StatusCode::TOO_MANY_REQUESTS.into()`, or a bare
/// number: `429.into()`), a class of statuses, transport errors, or a
/// predicate on the response.
///
/// ```
/// use http::StatusCode;
/// use sluicegate::retry::Matcher;
///
/// let too_many: Matcher = StatusCode::TOO_MANY_REQUESTS.into();
/// let flaky = Matcher::server_errors().or(Matcher::transport_errors());
/// let custom = Matcher::response(|r| r.headers().contains_key("x-try-again"));
/// # let _ = (too_many, flaky, custom);
/// ```
#[derive(Clone)]
#[must_use = "a Matcher does nothing until given to a rule; its methods return a new one"]
pub struct Matcher {
    any_of: Vec<Match>,
}

#[derive(Clone)]
enum Match {
    Status(StatusCode),
    Class(u16),
    Transport,
    Timeout,
    Undecodable,
    Predicate(Arc<Predicate>),
}

impl Matcher {
    fn one(m: Match) -> Self {
        Self { any_of: vec![m] }
    }

    /// Responses with exactly this status.
    pub fn status(status: StatusCode) -> Self {
        Self::one(Match::Status(status))
    }

    /// Every `4xx` response.
    pub fn client_errors() -> Self {
        Self::one(Match::Class(4))
    }

    /// Every `5xx` response.
    pub fn server_errors() -> Self {
        Self::one(Match::Class(5))
    }

    /// Every transport error: connect, reset, timeout, and so on.
    pub fn transport_errors() -> Self {
        Self::one(Match::Transport)
    }

    /// Timed-out attempts only.
    pub fn timeouts() -> Self {
        Self::one(Match::Timeout)
    }

    /// Successful responses whose body the endpoint could not decode, on
    /// an endpoint that decodes in each attempt
    /// ([`Endpoint::json`](crate::Endpoint::json)): a truncated or garbled
    /// body is then retried like a 503 would be.
    pub fn undecodable() -> Self {
        Self::one(Match::Undecodable)
    }

    /// Responses for which `predicate` is true.
    pub fn response<F>(predicate: F) -> Self
    where
        F: Fn(&Response<Bytes>) -> bool + Send + Sync + 'static,
    {
        Self::one(Match::Predicate(Arc::new(predicate)))
    }

    /// Matches what either matcher matches.
    pub fn or(mut self, other: Matcher) -> Self {
        self.any_of.extend(other.any_of);
        self
    }

    /// Whether this matcher applies to an attempt's outcome.
    pub fn matches(&self, outcome: &Result<Response<Bytes>, TransportError>) -> bool {
        self.any_of.iter().any(|m| match (m, outcome) {
            (Match::Status(s), Ok(r)) => r.status() == *s,
            (Match::Class(c), Ok(r)) => r.status().as_u16() / 100 == *c,
            (Match::Predicate(p), Ok(r)) => p(r),
            (Match::Undecodable, Ok(r)) => r.extensions().get::<Undecodable>().is_some(),
            (Match::Transport, Err(_)) => true,
            (Match::Timeout, Err(e)) => e.kind() == TransportErrorKind::Timeout,
            _ => false,
        })
    }
}

impl From<StatusCode> for Matcher {
    fn from(status: StatusCode) -> Self {
        Self::status(status)
    }
}

/// A bare status number, as in `retry_on(429, policy)`.
///
/// # Panics
///
/// If `status` is not a valid status code (outside `100..=999`): a typo in
/// a rule should stop the program where it is written, not match nothing.
///
/// ```
/// use sluicegate::retry::Matcher;
///
/// let by_number: Matcher = 429.into();
/// let by_name: Matcher = sluicegate::http::StatusCode::TOO_MANY_REQUESTS.into();
/// assert_eq!(format!("{by_number:?}"), format!("{by_name:?}"));
/// ```
impl From<u16> for Matcher {
    #[track_caller]
    fn from(status: u16) -> Self {
        match StatusCode::from_u16(status) {
            Ok(status) => Self::status(status),
            Err(_) => panic!("{status} is not an HTTP status code (100..=999)"),
        }
    }
}

impl fmt::Debug for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for m in &self.any_of {
            match m {
                Match::Status(s) => list.entry(&s.as_u16()),
                Match::Class(c) => list.entry(&format_args!("{c}xx")),
                Match::Transport => list.entry(&format_args!("transport errors")),
                Match::Timeout => list.entry(&format_args!("timeouts")),
                Match::Undecodable => list.entry(&format_args!("undecodable bodies")),
                Match::Predicate(_) => list.entry(&format_args!("predicate")),
            };
        }
        list.finish()
    }
}
