//! Parsing `Retry-After` (RFC 9110 §10.2.3): delta-seconds or an HTTP-date.

use std::time::{Duration, SystemTime};

use http::header::{DATE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue};

/// The delay a `Retry-After` value asks for, or `None` when it is garbage.
///
/// `reference` is "now" for an HTTP-date: pass the response's `Date` when
/// it has one (the server's own clock, so client clock skew does not
/// matter). A date in the past asks for no delay. Negative numbers,
/// fractions and anything else unparseable give `None`: a hint that cannot
/// be read is ignored, never trusted. Huge values are returned as they are
/// (saturating); the caller caps them.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use http::HeaderValue;
/// use sluicegate::retry::parse_retry_after;
///
/// let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
/// assert_eq!(parse_retry_after(&HeaderValue::from_static("120"), now), Some(Duration::from_secs(120)));
/// assert_eq!(
///     parse_retry_after(&HeaderValue::from_static("Sun, 09 Sep 2001 01:46:50 GMT"), now),
///     Some(Duration::from_secs(10)),
/// );
/// assert_eq!(parse_retry_after(&HeaderValue::from_static("-1"), now), None);
/// assert_eq!(parse_retry_after(&HeaderValue::from_static("soon"), now), None);
/// ```
pub fn parse_retry_after(value: &HeaderValue, reference: SystemTime) -> Option<Duration> {
    parse(value, || Some(reference))
}

/// Delay-seconds as they are; an HTTP-date against `reference`, read only
/// for a date (and saying nothing if there is none to read it against).
fn parse(value: &HeaderValue, reference: impl FnOnce() -> Option<SystemTime>) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let seconds = text.bytes().fold(0u64, |acc, b| {
            acc.saturating_mul(10).saturating_add(u64::from(b - b'0'))
        });
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(reference()?).unwrap_or(Duration::ZERO))
}

/// The `Retry-After` of a response, read against its `Date` header when
/// present, else against `wall_now`. An HTTP-date with neither says
/// nothing (`None`); delay-seconds need no date at all.
pub(crate) fn retry_after(
    headers: &HeaderMap,
    wall_now: impl FnOnce() -> Option<SystemTime>,
) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?;
    parse(value, || {
        headers
            .get(DATE)
            .and_then(|d| d.to_str().ok())
            .and_then(|d| httpdate::parse_http_date(d).ok())
            .or_else(wall_now)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn parse(s: &str) -> Option<Duration> {
        parse_retry_after(&HeaderValue::from_str(s).unwrap(), at(1_000_000_000))
    }

    #[test]
    fn seconds_dates_and_garbage() {
        assert_eq!(parse("0"), Some(Duration::ZERO));
        assert_eq!(parse(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(
            parse("99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(parse("-3"), None);
        assert_eq!(parse("1.5"), None);
        assert_eq!(parse(""), None);
        assert_eq!(parse("tomorrow"), None);
        // An HTTP-date in the past asks for no wait.
        assert_eq!(parse("Thu, 01 Jan 1970 00:00:00 GMT"), Some(Duration::ZERO));
    }

    #[test]
    fn dates_are_read_against_the_servers_date_header() {
        let mut headers = HeaderMap::new();
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Sun, 09 Sep 2001 01:47:00 GMT"),
        );
        headers.insert(
            DATE,
            HeaderValue::from_static("Sun, 09 Sep 2001 01:46:40 GMT"),
        );
        // The local clock is a day off; the server's own Date decides.
        let skewed = || Some(at(1_000_000_000 + 86_400));
        assert_eq!(retry_after(&headers, skewed), Some(Duration::from_secs(20)));
    }
}
