//! [`Matcher`]: which attempt outcomes a retry or pause rule applies to.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};

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
    QuotaExhausted,
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

    /// Refusals because a rate-limit quota is spent: a `403 Forbidden` or
    /// `429 Too Many Requests` whose headers say no request is left
    /// (`X-RateLimit-Remaining: 0`, `RateLimit-Remaining: 0`, or a
    /// `RateLimit` member with `r=0`).
    ///
    /// Some APIs (GitHub's among them) answer a spent quota with a 403, not
    /// a 429, so `retry_on(429, ..)` lets those fail, and retrying every
    /// 403 would retry a real "forbidden" too. This matches only the 403s
    /// (and 429s) that say the quota is the reason.
    ///
    /// A retry it causes waits for the quota's reset, with no rule of its
    /// own: the client's [`Limiter`](crate::Limiter) reads the same headers
    /// from every response (with or without a configured rate) and holds
    /// every request, this retry included, until the reset they give
    /// (`X-RateLimit-Reset` in seconds or as a Unix time, `RateLimit`'s
    /// `t`). A `Retry-After`, when the server sends one, is waited out
    /// first. Give the rule a [`Backoff`](crate::retry::Backoff) whose
    /// [`max_elapsed`](crate::retry::Backoff::max_elapsed), if any, leaves
    /// room for a reset (quota windows are often an hour).
    ///
    /// ```
    /// use sluicegate::prelude::*;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let mock = MockTransport::new();
    /// mock.mount(Route::get("/repos").sequence([
    ///     MockResponse::status(403)
    ///         .header("x-ratelimit-remaining", "0")
    ///         .header("x-ratelimit-reset", "30"), // seconds until the reset
    ///     MockResponse::json(&["sluicegate"]),
    /// ]));
    /// let client = Client::builder().transport(mock.clone()).base_url("http://mock").build()?;
    /// let start = tokio::time::Instant::now();
    /// let repos = client
    ///     .get(|_: &()| "/repos")
    ///     .retry_on(Matcher::quota_exhausted(), Backoff::constant(Duration::from_secs(1)))
    ///     .fetch(())
    ///     .await?;
    /// assert_eq!(repos.attempts, 2);
    /// assert_eq!(start.elapsed(), Duration::from_secs(30)); // sent again at the reset
    /// # Ok(())
    /// # }
    /// ```
    pub fn quota_exhausted() -> Self {
        Self::one(Match::QuotaExhausted)
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
            (Match::QuotaExhausted, Ok(r)) => {
                matches!(
                    r.status(),
                    StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS
                ) && quota_spent(r.headers())
            }
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
                Match::QuotaExhausted => list.entry(&format_args!("quota exhausted")),
                Match::Predicate(_) => list.entry(&format_args!("predicate")),
            };
        }
        list.finish()
    }
}

/// Whether rate-limit headers say no request is left: a `Remaining` of 0,
/// or a member of the IETF `RateLimit` field with `r=0`. Only the count is
/// read here; when the quota comes back is the limiter's business.
fn quota_spent(headers: &HeaderMap) -> bool {
    let zero = |name: &str| {
        headers
            .get_all(name)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.trim() == "0"))
    };
    zero("x-ratelimit-remaining")
        || zero("ratelimit-remaining")
        || headers
            .get_all("ratelimit")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|field| unquoted_params(field).any(|(k, v)| k == "r" && v == "0"))
}

/// The `key=value` parameters of a structured-field list (RFC 8941), with
/// quoted strings skipped, so a policy named `"a;r=0"` is not read as one.
fn unquoted_params(field: &str) -> impl Iterator<Item = (&str, &str)> {
    let mut pieces = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in field.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ';' | ',' if !quoted => {
                pieces.push(&field[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    pieces.push(&field[start..]);
    pieces
        .into_iter()
        .filter_map(|piece| piece.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(
        status: u16,
        headers: &[(&'static str, &'static str)],
    ) -> Result<Response<Bytes>, TransportError> {
        let mut r = Response::builder().status(status);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        Ok(r.body(Bytes::new()).unwrap())
    }

    #[test]
    fn quota_exhausted_needs_a_refusal_that_says_none_is_left() {
        let m = Matcher::quota_exhausted();
        let spent = [("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "30")];
        assert!(m.matches(&response(403, &spent)));
        assert!(m.matches(&response(429, &spent)));
        assert!(m.matches(&response(403, &[("ratelimit-remaining", " 0 ")])));
        assert!(m.matches(&response(429, &[("ratelimit", "\"hour\";r=0;t=600")])));
        assert!(m.matches(&response(
            403,
            &[("ratelimit", "\"min\";r=4;t=1, \"hour\";r=0;t=600")]
        )));
        // A real "forbidden", a quota with requests left, a success that
        // spent the last request, garbage, a name that only looks like it.
        assert!(!m.matches(&response(403, &[])));
        assert!(!m.matches(&response(403, &[("x-ratelimit-remaining", "12")])));
        assert!(!m.matches(&response(200, &spent)));
        assert!(!m.matches(&response(500, &spent)));
        assert!(!m.matches(&response(403, &[("x-ratelimit-remaining", "00x")])));
        assert!(!m.matches(&response(429, &[("ratelimit", "\"a;r=0\";r=3;t=1")])));
        assert!(!m.matches(&Err(TransportError::new(TransportErrorKind::Reset, "x"))));
        assert_eq!(format!("{m:?}"), "[quota exhausted]");
    }
}
