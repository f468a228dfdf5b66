//! Reading the limits a server advertises in its response headers.
//!
//! Three families are understood:
//!
//! - the IETF fields (draft-ietf-httpapi-ratelimit-headers), one list member
//!   per quota policy, paired by the policy's name:
//!   `RateLimit-Policy: "permin";q=50;w=60,"perhr";q=1000;w=3600` and
//!   `RateLimit: "permin";r=40;t=30,"perhr";r=5;t=1800` (remaining `r`,
//!   seconds to reset `t`); either list may be split over several fields;
//! - the earlier draft's `RateLimit-Limit` (`10, 10;w=1, 50;w=60`),
//!   `RateLimit-Remaining` and `RateLimit-Reset` (seconds);
//! - the common `X-RateLimit-Limit`, `X-RateLimit-Remaining` and
//!   `X-RateLimit-Reset`, whose reset is either seconds or a Unix time:
//!   values past 1 000 000 000 (2001) are read as Unix times, against the
//!   response's `Date` (else the local clock).
//!
//! Every policy counts: each one's remaining quota is held until its own
//! reset, and the quota the adaptive learner is told is the most
//! restrictive one (the lowest `q / w`). A quota of zero is not a rate but
//! a hold: nothing goes until the reset (or, without one, until its window
//! has passed). Policies counted in units other than requests are ignored.
//!
//! Everything is parsed defensively: a value that is not a plain
//! non-negative integer, a reset longer than [`MAX_RESET`], a Unix reset in
//! the past, a list member without its required parameter or more than
//! [`MAX_POLICIES`] policies is ignored and counted as malformed; nothing
//! panics.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::DATE;
use http::HeaderMap;

/// The longest reset believed; beyond it a header is taken as absurd.
pub(crate) const MAX_RESET: Duration = Duration::from_secs(3_600);

/// The most policies one response may describe, and one limiter remembers.
pub(crate) const MAX_POLICIES: usize = 8;

/// Resets at or above this are Unix times, below it delta-seconds.
const UNIX_TIME_FROM: u64 = 1_000_000_000;

/// What a server said about its limits, for one response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Advertised {
    /// What is left of each policy's window, and when it resets.
    pub(crate) limits: Vec<Limit>,
    /// The most restrictive non-zero quota per window, if any was stated.
    pub(crate) quota: Option<Quota>,
}

impl Advertised {
    /// Whether some policy has nothing left until its reset.
    pub(crate) fn exhausted(&self) -> bool {
        self.limits.iter().any(|l| l.remaining == 0)
    }
}

/// One policy's service limit: what is left, and when it is made whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Limit {
    /// The policy's name; empty for the single-policy header families.
    pub(crate) policy: String,
    /// Requests left in the current window.
    pub(crate) remaining: u64,
    /// Time until the window resets.
    pub(crate) reset: Duration,
    /// The policy's whole quota per window, when the server said it: what
    /// the next window will hold.
    pub(crate) quota: Option<u64>,
}

/// Requests allowed per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Quota {
    /// Requests per window, never zero.
    pub(crate) count: u64,
    /// The window, never zero.
    pub(crate) window: Duration,
}

impl Quota {
    /// The rate this quota sustains, requests per second.
    pub(crate) fn per_second(&self) -> f64 {
        self.count as f64 / self.window.as_secs_f64()
    }

    /// Whether this quota sustains a lower rate than `other` (exact:
    /// `q1 / w1 < q2 / w2` compared as `q1 * w2 < q2 * w1`).
    fn stricter_than(&self, other: &Self) -> bool {
        u128::from(self.count) * other.window.as_nanos()
            < u128::from(other.count) * self.window.as_nanos()
    }

    /// A quota with a window, if both are non-zero.
    fn new(count: u64, window: Option<u64>) -> Option<Self> {
        let window = window.filter(|&w| w > 0)?;
        (count > 0).then(|| Self {
            count,
            window: Duration::from_secs(window),
        })
    }
}

/// Keeps the stricter of two quotas.
fn stricter(a: Option<Quota>, b: Option<Quota>) -> Option<Quota> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.stricter_than(&a) { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// The outcome of reading a response's headers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Reading {
    /// What was understood, if anything.
    pub(crate) advertised: Option<Advertised>,
    /// How many rate-limit headers (or list members) were present but
    /// ignored as malformed.
    pub(crate) malformed: u32,
}

/// One `RateLimit-Policy` member: its name, quota and window.
struct Policy<'a> {
    name: &'a str,
    quota: u64,
    window: Option<u64>,
    /// Whether the quota counts requests (the default unit).
    requests: bool,
}

/// Reads the rate-limit headers of a response. `wall_now` is used only for
/// a Unix-time reset without a `Date` header.
pub(crate) fn read(headers: &HeaderMap, wall_now: impl FnOnce() -> Option<SystemTime>) -> Reading {
    // Most responses carry none of these: one pass over the names decides.
    if !headers
        .keys()
        .any(|name| name.as_str().contains("ratelimit"))
    {
        return Reading::default();
    }
    let mut ad = Advertised::default();
    let mut malformed = 0;
    let policy_field = joined(headers, "ratelimit-policy");
    let policies = policy_field
        .as_deref()
        .map(|field| policies(field, &mut malformed))
        .unwrap_or_default();
    if let Some(field) = joined(headers, "ratelimit") {
        service_limits(&field, &policies, &mut ad.limits, &mut malformed);
    }
    // A zero quota that no service limit speaks for still closes its
    // window: hold for the window, the longest it can take to end.
    let unspoken = |p: &&Policy<'_>| !ad.limits.iter().any(|l| l.policy == p.name);
    let closed: Vec<_> = policies
        .iter()
        .filter(|p| p.requests && p.quota == 0)
        .filter(unspoken)
        .collect();
    for policy in closed {
        let window = policy.window.map(Duration::from_secs);
        if let Some(reset) = window.filter(|w| !w.is_zero() && *w <= MAX_RESET) {
            add(&mut ad.limits, policy.name, 0, reset, None, &mut malformed);
        }
    }
    ad.quota = policies
        .iter()
        .filter(|p| p.requests)
        .fold(None, |q, p| stricter(q, Quota::new(p.quota, p.window)));
    legacy(headers, wall_now, &mut ad, &mut malformed);
    Reading {
        advertised: (ad != Advertised::default()).then_some(ad),
        malformed,
    }
}

/// The members of `RateLimit-Policy` that count requests.
fn policies<'a>(field: &'a str, malformed: &mut u32) -> Vec<Policy<'a>> {
    let mut policies = Vec::new();
    for member in members(field) {
        let (name, params) = item(member);
        let Some(quota) = param(&params, "q").and_then(integer) else {
            *malformed += 1;
            continue;
        };
        let window = match param(&params, "w") {
            None => None,
            Some(w) => match integer(w).filter(|&w| w > 0) {
                Some(w) => Some(w),
                None => {
                    *malformed += 1;
                    None
                }
            },
        };
        if policies.len() == MAX_POLICIES {
            *malformed += 1;
            continue;
        }
        policies.push(Policy {
            name,
            quota,
            window,
            // Bytes or concurrency are not requests per window: not ours.
            requests: param(&params, "qu").is_none_or(|u| unquote(u) == "requests"),
        });
    }
    policies
}

/// The members of `RateLimit`, each paired with its policy by name.
fn service_limits(
    field: &str,
    policies: &[Policy<'_>],
    limits: &mut Vec<Limit>,
    malformed: &mut u32,
) {
    for member in members(field) {
        let (name, params) = item(member);
        let Some(remaining) = param(&params, "r").and_then(integer) else {
            *malformed += 1;
            continue;
        };
        let policy = policies.iter().find(|p| p.name == name);
        if policy.is_some_and(|p| !p.requests) {
            continue;
        }
        let reset = match param(&params, "t") {
            Some(t) => match integer(t) {
                Some(t) => Some(Duration::from_secs(t)),
                None => {
                    *malformed += 1;
                    continue;
                }
            },
            // Without a reset, the policy's window bounds the wait.
            None => policy
                .and_then(|p| p.window)
                .map(Duration::from_secs)
                .filter(|w| *w <= MAX_RESET),
        };
        // A remaining count without a reset cannot be waited out.
        let Some(reset) = reset else { continue };
        if reset > MAX_RESET {
            *malformed += 1;
            continue;
        }
        // Never more left than the whole quota: `q=0` holds like `r=0`.
        let remaining = policy.map_or(remaining, |p| remaining.min(p.quota));
        add(
            limits,
            name,
            remaining,
            reset,
            policy.map(|p| p.quota),
            malformed,
        );
    }
}

/// Adds one policy's limit; a policy named twice keeps the stricter reading.
fn add(
    limits: &mut Vec<Limit>,
    policy: &str,
    remaining: u64,
    reset: Duration,
    quota: Option<u64>,
    malformed: &mut u32,
) {
    if let Some(limit) = limits.iter_mut().find(|l| l.policy == policy) {
        limit.remaining = limit.remaining.min(remaining);
        limit.reset = limit.reset.max(reset);
        limit.quota = match (limit.quota, quota) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    } else if limits.len() == MAX_POLICIES {
        *malformed += 1;
    } else {
        limits.push(Limit {
            policy: policy.to_owned(),
            remaining,
            reset,
            quota,
        });
    }
}

/// The earlier draft's fields, then the X- family; the first present wins,
/// and only where the IETF fields said nothing.
fn legacy(
    headers: &HeaderMap,
    wall_now: impl FnOnce() -> Option<SystemTime>,
    ad: &mut Advertised,
    malformed: &mut u32,
) {
    let get = |name: &str| {
        headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("\u{fffd}").trim())
    };
    let (mut remaining, mut reset, mut limit) = (None, None, None);
    let mut quota = None;
    for [remaining_name, reset_name, limit_name] in [
        ["ratelimit-remaining", "ratelimit-reset", "ratelimit-limit"],
        [
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
            "x-ratelimit-limit",
        ],
    ] {
        if remaining.is_none() {
            if let Some(value) = get(remaining_name) {
                remaining = integer(value);
                *malformed += u32::from(remaining.is_none());
            }
        }
        if reset.is_none() {
            if let Some(value) = get(reset_name) {
                // Seconds or a Unix time: told apart below.
                reset = integer(value);
                *malformed += u32::from(reset.is_none());
            }
        }
        if limit.is_none() {
            if let Some(value) = get(limit_name) {
                // `100` or, in the earlier draft, `10, 10;w=1, 50;w=60`: the
                // limit in force, then each policy with its window.
                for (i, member) in members(value).enumerate() {
                    let (bare, params) = item(member);
                    let Some(count) = integer(bare) else {
                        *malformed += 1;
                        continue;
                    };
                    if i == 0 {
                        limit = Some(count);
                    }
                    let window = param(&params, "w").and_then(integer);
                    quota = stricter(quota, Quota::new(count, window));
                }
            }
        }
    }
    if ad.quota.is_none() {
        ad.quota = quota;
    }
    if !ad.limits.is_empty() {
        return;
    }
    // A reset given as a Unix time becomes a delay from the server's "now".
    let reset = reset.and_then(|secs| {
        if secs < UNIX_TIME_FROM {
            return Some(Duration::from_secs(secs));
        }
        // Without the server's Date nor a known date, a Unix time cannot
        // be read: the reset says nothing.
        let now = headers
            .get(DATE)
            .and_then(|d| d.to_str().ok())
            .and_then(|d| httpdate::parse_http_date(d).ok())
            .or_else(wall_now)?;
        let delay = (UNIX_EPOCH + Duration::from_secs(secs))
            .duration_since(now)
            .ok();
        *malformed += u32::from(delay.is_none()); // a reset in the past says nothing
        delay
    });
    let reset = match reset {
        Some(r) if r > MAX_RESET => {
            *malformed += 1;
            None
        }
        r => r,
    };
    // A remaining count without a reset cannot be waited out: ignore it.
    if let (Some(remaining), Some(reset)) = (remaining, reset) {
        let remaining = limit.map_or(remaining, |l| remaining.min(l));
        add(&mut ad.limits, "", remaining, reset, limit, malformed);
    }
}

/// All values of a list field, joined as one list (a list may be split over
/// several fields); a value that is not text is kept as a malformed member.
fn joined(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut values = headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap_or("\u{fffd}"));
    let first = values.next()?;
    Some(values.fold(first.to_owned(), |all, v| all + "," + v))
}

/// The members of a structured-field list: split at commas outside quotes.
fn members(field: &str) -> impl Iterator<Item = &str> {
    split_outside_quotes(field, b',').map(str::trim)
}

/// A list member's bare item (a quoted name loses its quotes) and its
/// parameters (`;key=value`; a bare `;key` is `?1`, true).
fn item(member: &str) -> (&str, Vec<(&str, &str)>) {
    let mut parts = split_outside_quotes(member, b';');
    let bare = unquote(parts.next().unwrap_or_default().trim());
    let params = parts
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.trim(), v.trim()),
            None => (p.trim(), "?1"),
        })
        .collect();
    (bare, params)
}

/// The value of parameter `name`, if present.
fn param<'a>(params: &[(&str, &'a str)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| *v)
}

/// A string without its surrounding double quotes, if it has them.
fn unquote(text: &str) -> &str {
    text.strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text)
}

/// Splits `text` at `separator` wherever it is outside a quoted string
/// (`"..."`, with `\` escaping the next character).
fn split_outside_quotes(text: &str, separator: u8) -> impl Iterator<Item = &str> {
    let bytes = text.as_bytes();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    let mut cuts = Vec::new();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            _ if b == separator && !quoted => {
                cuts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    cuts.push(&text[start..]);
    cuts.into_iter()
}

/// A plain non-negative integer, or nothing.
fn integer(text: &str) -> Option<u64> {
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) || text.len() > 18 {
        return None;
    }
    text.parse().ok()
}

/// Two resets of one policy closer than this are taken to end the same
/// server window (a reset in whole seconds, read at different instants).
const SAME_WINDOW_NANOS: u64 = 1_000_000_000;

/// What a limiter holds of the advertised limits between answers: what is
/// left of each policy's window and when it resets, in nanoseconds since
/// the limiter's epoch. A token must fit every window.
#[derive(Debug, Clone, Default)]
pub(crate) struct Held {
    windows: Vec<Window>,
}

#[derive(Debug, Clone)]
struct Window {
    policy: String,
    remaining: u64,
    reset: u64,
    /// The whole quota, if the server said it: a window that has reset
    /// holds this much, and no more, until an answer says otherwise.
    quota: Option<u64>,
    /// The longest time to reset seen for this policy: how far the next
    /// reset is guessed to be, until an answer of the new window says.
    span: u64,
}

impl Window {
    /// This window as it stands at `t`: once its reset has passed, a window
    /// whose quota is known starts a new one with the whole quota (so the
    /// line waiting for the reset goes out at most a quota's worth at a
    /// time, not all at once); one whose quota is unknown says nothing.
    fn at(&self, t: u64) -> Option<(u64, u64)> {
        if t < self.reset {
            return Some((self.remaining, self.reset));
        }
        let quota = self.quota?;
        let span = self.span.max(1);
        let periods = (t - self.reset) / span + 1;
        Some((
            quota,
            self.reset.saturating_add(periods.saturating_mul(span)),
        ))
    }

    fn roll(&mut self, t: u64) {
        if let (true, Some((remaining, reset))) = (t >= self.reset, self.at(t)) {
            (self.remaining, self.reset) = (remaining, reset);
        }
    }
}

impl Held {
    /// `None` when the advertised quotas let a token go at `now`; otherwise
    /// the instant every exhausted window has reset (the latest of them, so
    /// an hourly quota is not forgotten when a per-minute one resets).
    pub(crate) fn earliest(&self, now: u64) -> Option<u64> {
        self.windows
            .iter()
            .filter_map(|w| w.at(now))
            .filter(|&(remaining, _)| remaining == 0)
            .map(|(_, reset)| reset)
            .max()
    }

    /// A token was granted at `t`: it counts against every policy's window
    /// as it stands then.
    pub(crate) fn take(&mut self, t: u64) {
        for window in &mut self.windows {
            window.roll(t);
            window.remaining = window.remaining.saturating_sub(1);
        }
    }

    /// Takes in one answer's limits, read at `now`. Requests still in
    /// flight (`in_flight`) may already count against what is left: assume
    /// they do, so no quota is overrun. A policy the answer does not
    /// mention keeps what was known of it until its reset.
    pub(crate) fn update(&mut self, limits: &[Limit], now: u64, in_flight: u64) {
        for window in &mut self.windows {
            window.roll(now);
        }
        self.windows.retain(|w| now < w.reset);
        for limit in limits {
            let left = limit.remaining.saturating_sub(in_flight);
            let nanos = u64::try_from(limit.reset.as_nanos()).unwrap_or(u64::MAX);
            let reset = now.saturating_add(nanos);
            match self.windows.iter_mut().find(|w| w.policy == limit.policy) {
                Some(old) if old.reset.abs_diff(reset) < SAME_WINDOW_NANOS => {
                    old.remaining = old.remaining.min(left);
                    old.reset = old.reset.max(reset);
                    old.quota = limit.quota.or(old.quota);
                    old.span = old.span.max(nanos);
                }
                Some(old) => {
                    (old.remaining, old.reset) = (left, reset);
                    old.quota = limit.quota.or(old.quota);
                    old.span = old.span.max(nanos);
                }
                None => {
                    if self.windows.len() == MAX_POLICIES {
                        // Bounded memory: the window ending first goes.
                        let first = (0..self.windows.len())
                            .min_by_key(|&i| self.windows[i].reset)
                            .unwrap_or_default();
                        self.windows.swap_remove(first);
                    }
                    self.windows.push(Window {
                        policy: limit.policy.clone(),
                        remaining: left,
                        reset,
                        quota: limit.quota,
                        span: nanos,
                    });
                }
            }
        }
    }

    /// Whether, at `per_second`, some window would run out before it
    /// resets: the server's quota, not the pace, then limits sending.
    pub(crate) fn binds(&self, now: u64, per_second: f64) -> bool {
        self.windows.iter().any(|w| {
            let left = w.reset.saturating_sub(now) as f64 / 1e9;
            now < w.reset && (w.remaining as f64) < per_second * left
        })
    }
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

    const fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn limit(policy: &str, remaining: u64, reset: u64) -> Limit {
        Limit {
            policy: policy.to_owned(),
            remaining,
            reset: secs(reset),
            quota: None,
        }
    }

    /// Parsed limits without the quota each carries (checked on its own).
    fn plain(mut limits: Vec<Limit>) -> Vec<Limit> {
        for limit in &mut limits {
            limit.quota = None;
        }
        limits
    }

    fn quota(count: u64, window: u64) -> Option<Quota> {
        Some(Quota {
            count,
            window: secs(window),
        })
    }

    fn ad(pairs: &[(&'static str, &'static str)]) -> (Advertised, u32) {
        let r = read(&headers(pairs), || Some(at(0)));
        (r.advertised.unwrap_or_default(), r.malformed)
    }

    #[test]
    fn ietf_fields() {
        let r = read(
            &headers(&[
                ("ratelimit-policy", "\"default\";q=100;w=60"),
                ("ratelimit", "\"default\";r=7;t=30"),
            ]),
            || Some(at(0)),
        );
        assert_eq!(
            r.advertised.map(|mut a| {
                a.limits = plain(a.limits);
                a
            }),
            Some(Advertised {
                limits: vec![limit("default", 7, 30)],
                quota: quota(100, 60),
            })
        );
        assert_eq!(r.malformed, 0);
    }

    #[test]
    fn every_policy_of_the_drafts_example_is_read_and_the_strictest_quota_wins() {
        let (ad, malformed) = ad(&[
            (
                "ratelimit-policy",
                "\"permin\";q=50;w=60,\"perhr\";q=1000;w=3600",
            ),
            ("ratelimit", "\"permin\";r=40;t=30,\"perhr\";r=5;t=1800"),
        ]);
        assert_eq!(malformed, 0);
        assert_eq!(
            plain(ad.limits.clone()),
            [limit("permin", 40, 30), limit("perhr", 5, 1800)]
        );
        // 50 a minute is 0.83/s, 1000 an hour 0.28/s: the hour binds.
        assert_eq!(ad.quota, quota(1000, 3600));
        assert!(!ad.exhausted());
    }

    #[test]
    fn lists_split_over_several_fields_and_quoted_names_are_one_list() {
        let (ad, malformed) = ad(&[
            ("ratelimit-policy", "\"a, b;c\";q=10;w=1"),
            (
                "ratelimit-policy",
                "\"hour\";q=100;w=3600;pk=:cHsdsRa894==:",
            ),
            ("ratelimit", "\"a, b;c\";r=3;t=1"),
            ("ratelimit", "\"hour\";r=0;t=600;comment=\"x,y\""),
        ]);
        assert_eq!(malformed, 0);
        assert_eq!(
            plain(ad.limits.clone()),
            [limit("a, b;c", 3, 1), limit("hour", 0, 600)]
        );
        assert_eq!(ad.quota, quota(100, 3600));
        assert!(ad.exhausted());
    }

    #[test]
    fn a_zero_quota_is_a_hold_and_never_a_rate() {
        // With a service limit: its remaining can be no more than the quota.
        let (ad1, _) = ad(&[
            ("ratelimit-policy", "\"closed\";q=0;w=60"),
            ("ratelimit", "\"closed\";r=10;t=20"),
        ]);
        assert_eq!(plain(ad1.limits.clone()), [limit("closed", 0, 20)]);
        assert_eq!(ad1.quota, None, "no rate stated");
        // Without one: closed for at most the window.
        let (ad2, _) = ad(&[("ratelimit-policy", "\"closed\";q=0;w=5")]);
        assert_eq!(plain(ad2.limits), [limit("closed", 0, 5)]);
        assert_eq!(ad2.quota, None);
        // `r=0` alone holds too; without a reset or window, nothing can.
        let (ad3, _) = ad(&[("ratelimit", "\"d\";r=0;t=9,\"e\";r=0")]);
        assert_eq!(plain(ad3.limits), [limit("d", 0, 9)]);
        // The older families: a limit of zero empties what remains.
        let (ad4, _) = ad(&[
            ("x-ratelimit-limit", "0"),
            ("x-ratelimit-remaining", "5"),
            ("x-ratelimit-reset", "7"),
        ]);
        assert_eq!(plain(ad4.limits), [limit("", 0, 7)]);
        assert_eq!(ad4.quota, None);
    }

    #[test]
    fn a_missing_reset_falls_back_on_the_window_and_other_units_are_ignored() {
        let (ad, malformed) = ad(&[
            (
                "ratelimit-policy",
                "\"min\";q=50;w=60,\"bytes\";q=1000;qu=\"content-bytes\";w=1,\"day\";q=9;w=86400",
            ),
            ("ratelimit", "\"min\";r=4,\"bytes\";r=0;t=1,\"day\";r=1"),
        ]);
        assert_eq!(malformed, 0);
        // The day's window is too long to wait on, but still a quota.
        assert_eq!(plain(ad.limits.clone()), [limit("min", 4, 60)]);
        assert_eq!(ad.quota, quota(9, 86_400));
    }

    #[test]
    fn the_earlier_drafts_policies_are_all_read() {
        let (ad, malformed) = ad(&[
            ("ratelimit-limit", "10, 10;w=1, 50;w=60"),
            ("ratelimit-remaining", "3"),
            ("ratelimit-reset", "20"),
        ]);
        assert_eq!(malformed, 0);
        assert_eq!(plain(ad.limits.clone()), [limit("", 3, 20)]);
        assert_eq!(ad.quota, quota(50, 60));
    }

    #[test]
    fn x_family_with_seconds_or_unix_reset() {
        let (secs_ad, _) = ad(&[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "12")]);
        assert_eq!(plain(secs_ad.limits), [limit("", 0, 12)]);
        let unix = read(
            &headers(&[
                ("x-ratelimit-limit", "5000"),
                ("x-ratelimit-remaining", "3"),
                ("x-ratelimit-reset", "1000000060"),
                ("date", "Sun, 09 Sep 2001 01:46:40 GMT"),
            ]),
            || Some(at(0)),
        );
        let ad = unix.advertised.unwrap();
        // A limit without a window states no rate.
        assert_eq!(
            (plain(ad.limits.clone()), ad.quota),
            (vec![limit("", 3, 60)], None)
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
            &[("ratelimit", "\"a\";r=;t=5")][..],
            &[("ratelimit", "\"a\";r=0;t=-5")][..],
            &[("ratelimit", "\"a\";r=0;t=1000000060")][..], // never a Unix time
            &[("ratelimit", ",,;;\"")][..],
            &[("ratelimit", "\"unterminated;r=0;t=1")][..],
            &[("ratelimit-policy", "\"a\";q=0;w=0")][..],
            &[("ratelimit-policy", "\"a\";w=60")][..],
        ] {
            let r = read(&headers(pairs), || Some(at(2_000_000_000)));
            assert!(r.malformed >= 1, "{pairs:?}");
            assert!(
                r.advertised.is_none_or(|a| a.limits.is_empty()),
                "{pairs:?}: nothing to hold on"
            );
        }
        assert_eq!(read(&HeaderMap::new(), || Some(at(0))), Reading::default());
    }

    #[test]
    fn more_policies_than_the_cap_are_counted_not_kept() {
        let mut h = HeaderMap::new();
        let many = (0..20)
            .map(|i| format!("\"p{i}\";r=1;t=10"))
            .collect::<Vec<_>>()
            .join(",");
        h.insert("ratelimit", HeaderValue::from_str(&many).unwrap());
        let r = read(&h, || Some(at(0)));
        assert_eq!(r.advertised.unwrap().limits.len(), MAX_POLICIES);
        assert_eq!(r.malformed, 20 - MAX_POLICIES as u32);
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn held_windows_each_hold_until_their_own_reset() {
        let mut held = Held::default();
        held.update(&[limit("min", 1, 60), limit("hour", 2, 3_600)], 0, 0);
        assert_eq!(held.earliest(0), None);
        held.take(0);
        // The minute is spent: hold until its reset.
        assert_eq!(held.earliest(S), Some(60 * S));
        assert_eq!(held.earliest(60 * S), None);
        held.take(60 * S);
        // The hour is spent too: its reset, the later one, decides.
        assert_eq!(held.earliest(61 * S), Some(3_600 * S));
        // A new minute window says 10 left; the hour still holds.
        held.update(&[limit("min", 10, 60)], 61 * S, 0);
        assert_eq!(held.earliest(61 * S), Some(3_600 * S));
        assert_eq!(held.earliest(3_600 * S), None);
    }

    #[test]
    fn held_windows_merge_one_window_and_count_what_is_in_flight() {
        let mut held = Held::default();
        held.update(&[limit("d", 5, 10)], 0, 2);
        // Read half a second later, the same window: the lower count stays.
        held.update(&[limit("d", 9, 10)], S / 2, 0);
        for _ in 0..3 {
            assert_eq!(held.earliest(S), None);
            held.take(S);
        }
        assert_eq!(held.earliest(S), Some(10 * S + S / 2));
        assert!(held.binds(S, 1.0));
        // A window resetting well apart is a new one.
        held.update(&[limit("d", 9, 10)], 11 * S, 0);
        assert_eq!(held.earliest(11 * S), None);
        assert!(!held.binds(11 * S, 0.5), "9 left for 10 s at 0.5/s");
        assert!(held.binds(11 * S, 1.0));
    }

    #[test]
    fn a_window_that_resets_holds_its_quota_and_no_more_until_an_answer() {
        let mut held = Held::default();
        let mut ten = limit("", 0, 2);
        ten.quota = Some(10);
        held.update(&[ten], 0, 0);
        assert_eq!(held.earliest(S), Some(2 * S));
        // At the reset, a new window of 10: ten go, the eleventh waits for
        // the next reset (2 s on), though no answer has come yet.
        for _ in 0..10 {
            assert_eq!(held.earliest(2 * S), None);
            held.take(2 * S);
        }
        assert_eq!(held.earliest(2 * S), Some(4 * S));
        // An answer of the new window says fewer are left: it wins.
        let mut seven = limit("", 0, 2);
        seven.quota = Some(10);
        held.update(&[seven], 2 * S, 3);
        assert_eq!(held.earliest(3 * S), Some(4 * S));
        // Windows with no stated quota still say nothing once reset.
        let mut bare = Held::default();
        bare.update(&[limit("", 0, 2)], 0, 0);
        assert_eq!(bare.earliest(2 * S), None);
    }

    #[test]
    fn held_windows_stay_bounded() {
        let mut held = Held::default();
        for i in 0..100u64 {
            held.update(&[limit(&format!("p{i}"), 0, 10 + i)], 0, 0);
        }
        assert_eq!(held.windows.len(), MAX_POLICIES);
        // The latest resets are kept.
        assert_eq!(held.earliest(0), Some(109 * S));
    }
}
