//! Reading the limits a server advertises in its response headers.
//!
//! Three families are understood:
//!
//! - the IETF fields (draft-ietf-httpapi-ratelimit-headers):
//!   `RateLimit-Policy: "default";q=100;w=60` and
//!   `RateLimit: "default";r=50;t=30` (remaining `r`, seconds to reset `t`);
//! - the earlier draft's `RateLimit-Limit`, `RateLimit-Remaining` and
//!   `RateLimit-Reset` (seconds);
//! - the common `X-RateLimit-Limit`, `X-RateLimit-Remaining` and
//!   `X-RateLimit-Reset`, whose reset is either seconds or a Unix time:
//!   values past 1 000 000 000 (2001) are read as Unix times, against the
//!   response's `Date` (else the local clock).
//!
//! Everything is parsed defensively: a value that is not a plain
//! non-negative integer, a reset longer than [`MAX_RESET`], or a Unix reset
//! in the past is ignored and reported as malformed; nothing panics.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::DATE;
use http::HeaderMap;

/// The longest reset believed; beyond it a header is taken as absurd.
pub(crate) const MAX_RESET: Duration = Duration::from_secs(3_600);

/// Resets at or above this are Unix times, below it delta-seconds.
const UNIX_TIME_FROM: u64 = 1_000_000_000;

/// What a server said about its limit, for one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Advertised {
    /// Requests left in the current window.
    pub(crate) remaining: Option<u64>,
    /// Time until the window resets.
    pub(crate) reset: Option<Duration>,
    /// Requests allowed per window, and the window.
    pub(crate) quota: Option<(u64, Option<Duration>)>,
}

/// The outcome of reading a response's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Reading {
    /// What was understood, if anything.
    pub(crate) advertised: Option<Advertised>,
    /// How many rate-limit headers were present but ignored as malformed.
    pub(crate) malformed: u32,
}

/// Reads the rate-limit headers of a response. `wall_now` is used only for
/// a Unix-time reset without a `Date` header.
pub(crate) fn read(headers: &HeaderMap, wall_now: impl FnOnce() -> SystemTime) -> Reading {
    // Most responses carry none of these: one pass over the names decides.
    if !headers
        .keys()
        .any(|name| name.as_str().contains("ratelimit"))
    {
        return Reading::default();
    }
    let mut ad = Advertised::default();
    let mut malformed = 0;
    let get = |name: &str| {
        headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("\u{fffd}").trim().to_owned())
    };

    // IETF structured fields.
    if let Some(value) = get("ratelimit") {
        match (param(&value, "r"), param(&value, "t")) {
            (Some(r), t) => {
                ad.remaining = Some(r);
                ad.reset = t.map(Duration::from_secs);
            }
            _ => malformed += 1,
        }
    }
    if let Some(value) = get("ratelimit-policy") {
        match param(&value, "q") {
            Some(q) => ad.quota = Some((q, param(&value, "w").map(Duration::from_secs))),
            None => malformed += 1,
        }
    }

    // The earlier draft, then the X- family; the first present wins.
    for [remaining, reset, limit] in [
        ["ratelimit-remaining", "ratelimit-reset", "ratelimit-limit"],
        [
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
            "x-ratelimit-limit",
        ],
    ] {
        if ad.remaining.is_none() {
            if let Some(value) = get(remaining) {
                match integer(&value) {
                    Some(r) => ad.remaining = Some(r),
                    None => malformed += 1,
                }
            }
        }
        if ad.reset.is_none() {
            if let Some(value) = get(reset) {
                match integer(&value) {
                    // Seconds or a Unix time: told apart below.
                    Some(n) => ad.reset = Some(Duration::from_secs(n)),
                    None => malformed += 1,
                }
            }
        }
        if ad.quota.is_none() {
            if let Some(value) = get(limit) {
                // `100` or, in the earlier draft, `100, 100;w=60`.
                let first = value.split(',').next().unwrap_or_default();
                match integer(first.split(';').next().unwrap_or_default()) {
                    Some(q) => ad.quota = Some((q, param(&value, "w").map(Duration::from_secs))),
                    None => malformed += 1,
                }
            }
        }
    }

    // A reset given as a Unix time becomes a delay from the server's "now".
    if let Some(reset) = ad.reset {
        if reset.as_secs() >= UNIX_TIME_FROM {
            let now = headers
                .get(DATE)
                .and_then(|d| d.to_str().ok())
                .and_then(|d| httpdate::parse_http_date(d).ok())
                .unwrap_or_else(wall_now);
            let at = UNIX_EPOCH + reset;
            ad.reset = match at.duration_since(now) {
                Ok(delay) => Some(delay),
                Err(_) => {
                    malformed += 1; // a reset in the past says nothing
                    None
                }
            };
        }
    }
    if ad.reset.is_some_and(|r| r > MAX_RESET) {
        malformed += 1;
        ad.reset = None;
    }
    if ad.remaining.is_some() && ad.reset.is_none() {
        // A remaining count without a reset cannot be waited out: ignore it.
        ad.remaining = None;
    }
    Reading {
        advertised: (ad != Advertised::default()).then_some(ad),
        malformed,
    }
}

/// A plain non-negative integer, or nothing.
fn integer(text: &str) -> Option<u64> {
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) || text.len() > 18 {
        return None;
    }
    text.parse().ok()
}

/// The integer parameter `name` of a structured-field item (`;name=value`).
fn param(field: &str, name: &str) -> Option<u64> {
    field
        .split([';', ','])
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .and_then(|(_, v)| integer(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn ietf_fields() {
        let r = read(
            &headers(&[
                ("ratelimit-policy", "\"default\";q=100;w=60"),
                ("ratelimit", "\"default\";r=7;t=30"),
            ]),
            || at(0),
        );
        assert_eq!(
            r.advertised,
            Some(Advertised {
                remaining: Some(7),
                reset: Some(Duration::from_secs(30)),
                quota: Some((100, Some(Duration::from_secs(60)))),
            })
        );
        assert_eq!(r.malformed, 0);
    }

    #[test]
    fn x_family_with_seconds_or_unix_reset() {
        let secs = read(
            &headers(&[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "12")]),
            || at(0),
        );
        assert_eq!(
            secs.advertised.unwrap().reset,
            Some(Duration::from_secs(12))
        );
        let unix = read(
            &headers(&[
                ("x-ratelimit-limit", "5000"),
                ("x-ratelimit-remaining", "3"),
                ("x-ratelimit-reset", "1000000060"),
                ("date", "Sun, 09 Sep 2001 01:46:40 GMT"),
            ]),
            || at(0),
        );
        let ad = unix.advertised.unwrap();
        assert_eq!(
            (ad.remaining, ad.reset, ad.quota),
            (Some(3), Some(Duration::from_secs(60)), Some((5000, None)))
        );
    }

    #[test]
    fn hostile_values_are_ignored_and_counted() {
        for pairs in [
            &[("x-ratelimit-remaining", "-1"), ("x-ratelimit-reset", "10")][..],
            &[
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", "99999999"),
            ][..],
            &[
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", "1000000000"),
            ][..], // in the past
            &[("ratelimit", "garbage"), ("ratelimit-reset", "soon")][..],
            &[
                ("x-ratelimit-remaining", "99999999999999999999999"),
                ("x-ratelimit-reset", "1"),
            ][..],
        ] {
            let r = read(&headers(pairs), || at(2_000_000_000));
            assert!(r.malformed >= 1, "{pairs:?}");
            assert!(
                r.advertised.and_then(|a| a.remaining).is_none(),
                "{pairs:?}: nothing to hold on"
            );
        }
        assert_eq!(read(&HeaderMap::new(), || at(0)), Reading::default());
    }
}
