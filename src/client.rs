//! [`Client`]: transport, base URL, headers, limits and rules in one cheap
//! handle; it turns a [`RequestSpec`] into the request every transport is
//! given. (The [`Endpoint`](crate::Endpoint)s made from it are the next
//! floor up: `Client::get` and `Client::request` live in `endpoint.rs`.)

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{
    HeaderName, HeaderValue, AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION, SET_COOKIE,
};
use http::{HeaderMap, Request, Uri};

use crate::error::BuildError;
use crate::limiter::Limiter;
use crate::pause::PauseHandle;
use crate::policy::{Policy, Sealed, WithPolicy};
use crate::rate::Rate;
use crate::request::{BuiltRequest, RequestSpec};
use crate::stats::Stats;
use crate::transport::{CredentialScope, Prepared, Transport};

/// A cheap-to-clone bundle of what every request of a pipeline shares:
/// transport, base URL, default headers, rate limiter, pause handle,
/// per-attempt timeout and default retry rules.
///
/// Clones share the limiter and the pause handle, so every stage built from
/// one client draws from one rate budget and stalls together on a pause.
///
/// ```
/// use std::time::Duration;
/// use sluicegate::mock::{MockResponse, MockTransport, Route};
/// use sluicegate::{Client, Rate, WithPolicy};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mock = MockTransport::new();
/// mock.mount(Route::get("/api/items").respond(MockResponse::json(&[1, 2, 3])));
///
/// let client = Client::builder()
///     .transport(mock.clone())
///     .base_url("http://mock/api")
///     .rate(Rate::per_second(100).burst(10))
///     .timeout(Duration::from_secs(5))
///     .build()?;
///
/// let response = client.send("/items").await?;
/// assert_eq!(response.body().as_ref(), b"[1,2,3]");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    transport: Arc<dyn Transport>,
    base: Option<String>,
    headers: HeaderMap,
    limiter: Option<Limiter>,
    /// Without a limiter of the user's, an unpaced one: the quotas a
    /// server advertises are obeyed by every client, with or without a rate.
    gate: Limiter,
    pause: PauseHandle,
    /// The defaults every endpoint of the client starts from.
    policy: Policy,
    wall_clock: WallClock,
    stats: Option<Stats>,
    sensitive: Vec<HeaderName>,
    log_query: bool,
    /// The base URL's path, the prefix every relative target stays under.
    base_path: String,
    /// The base URL already split for `http::Uri`, so a plain relative
    /// target is joined without parsing the base again.
    base_parts: Option<BaseParts>,
    /// Where the default headers may go (the base URL's origin and the
    /// trusted ones; none without a base URL) and their names, for the
    /// transport to strip on a redirect elsewhere. One for all requests.
    scope: Arc<CredentialScope>,
    follow_cross_origin_links: bool,
    /// The transport reads the parsed URL beside each request (see
    /// [`Transport::wants_parsed_url`]).
    wants_url: bool,
}

impl Client {
    /// The default per-attempt timeout: 30 seconds.
    ///
    /// Every attempt is bounded unless asked otherwise, so a server that
    /// accepts and never answers cannot hang an item: change it with
    /// [`WithPolicy::timeout`] (on the builder, an endpoint or a stage), or
    /// turn it off with [`WithPolicy::no_timeout`].
    pub const DEFAULT_TIMEOUT: Duration = Policy::DEFAULT_TIMEOUT;

    /// A builder; only the transport is needed (or the `reqwest` feature).
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The shared rate limiter, if the client has one.
    pub fn limiter(&self) -> Option<&Limiter> {
        self.inner.limiter.as_ref()
    }

    /// The date now, to read an absolute time (a `Retry-After` HTTP-date, a
    /// Unix reset) that came without the server's own `Date`.
    pub(crate) fn wall_now(&self) -> Option<SystemTime> {
        self.inner.wall_clock.now()
    }

    /// Takes in the date a response says it is, for later responses that
    /// give an absolute time without one.
    pub(crate) fn learn_date(&self, headers: &HeaderMap) {
        self.inner.wall_clock.learn(headers);
    }

    /// What every request of this client takes its token from: the
    /// client's limiter, or one that paces nothing but obeys advertised
    /// quotas.
    pub(crate) fn gate(&self) -> &Limiter {
        &self.inner.gate
    }

    /// The transport requests go through.
    pub(crate) fn transport(&self) -> &Arc<dyn Transport> {
        &self.inner.transport
    }

    /// The defaults every endpoint of the client starts from.
    pub(crate) fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// The shared pause handle.
    pub fn pause_handle(&self) -> &PauseHandle {
        &self.inner.pause
    }

    /// The client's counters (every request of every endpoint made from
    /// it), unless built [`without_stats`](ClientBuilder::without_stats).
    pub fn stats(&self) -> Option<&Stats> {
        self.inner.stats.as_ref()
    }

    /// Marks the values of sensitive headers so that no `Debug` output, log
    /// line or error shows them (`http` prints them as `Sensitive`).
    pub(crate) fn redact(&self, headers: &mut HeaderMap) {
        if headers.is_empty() {
            return;
        }
        for (name, value) in headers.iter_mut() {
            if self.inner.sensitive.contains(name) {
                value.set_sensitive(true);
            }
        }
    }

    /// The URL as logs show it: without its query unless asked, since
    /// queries often carry keys.
    pub(crate) fn loggable_url(&self, uri: &Uri) -> String {
        if self.inner.log_query {
            return uri.to_string();
        }
        crate::transport::without_query(uri)
    }

    /// Turns a spec into a request: target joined to the base URL, query
    /// encoded, default headers under the spec's own (only at a home
    /// origin).
    pub(crate) fn prepare(&self, spec: RequestSpec) -> Result<BuiltRequest, BuildError> {
        if let Some(error) = spec.error {
            return Err(error);
        }
        if spec.link_from.is_none() {
            if let Some((uri, url)) = self.join_plain(&spec.target, &spec.query) {
                // A relative target under the base URL: its origin is home.
                // The default headers were redacted as the client was built.
                let mut headers = self.inner.headers.clone();
                if !spec.headers.is_empty() {
                    for name in spec.headers.keys() {
                        headers.remove(name);
                    }
                    headers.extend(spec.headers);
                    self.redact(&mut headers);
                }
                return Ok(self.assemble(spec.method, uri, url, headers, spec.body));
            }
        }
        let url = self.resolve(&spec.target, &spec.query)?;
        // A relative target stays under the base URL (`resolve` sees to
        // it), so its origin is home: only an absolute target or a link has
        // its origin written out and compared, which costs a formatting.
        let relative = !is_absolute(&spec.target) && spec.link_from.is_none();
        let origin = if relative {
            String::new()
        } else {
            url.origin().ascii_serialization()
        };
        // A next link to another origin than its listing's, which the
        // client does not trust: the server chose it, so no credential of
        // the listing's request goes there, if it is followed at all.
        let mut foreign_link = false;
        if let Some(listing) = &spec.link_from {
            let from = self.resolve(listing, &[])?.origin().ascii_serialization();
            foreign_link = origin != from && !self.is_trusted(&origin);
            if foreign_link && !self.inner.follow_cross_origin_links {
                return Err(BuildError::new(format!(
                    "next link leads to {origin}, another origin than the listing's ({from}): \
                     not followed, so the client's credentials stay at their origin \
                     (ClientBuilder::trust_origin or follow_cross_origin_links to allow it)"
                )));
            }
        }
        // Default headers carry the client's credentials: only to a home origin.
        let mut headers = if relative || self.is_trusted(&origin) {
            self.inner.headers.clone()
        } else {
            HeaderMap::new()
        };
        for name in spec.headers.keys() {
            headers.remove(name);
        }
        headers.extend(spec.headers);
        self.redact(&mut headers);
        if foreign_link {
            crate::transport::strip_credentials(&mut headers, None);
        }
        let invalid = |e: http::uri::InvalidUri| BuildError::new(format!("invalid URL: {e}"));
        let (uri, url) = if self.inner.wants_url {
            let uri = Uri::from_maybe_shared(Bytes::copy_from_slice(url.as_str().as_bytes()));
            (uri.map_err(invalid)?, Some(url))
        } else {
            let uri = Uri::from_maybe_shared(Bytes::from(String::from(url)));
            (uri.map_err(invalid)?, None)
        };
        Ok(self.assemble(spec.method, uri, url, headers, spec.body))
    }

    /// The request, with what the transport is told beside it (see
    /// [`Prepared`]): the credential scope and, for a transport that wants
    /// it, the parsed `url`, which names the same target as `uri`.
    fn assemble(
        &self,
        method: http::Method,
        uri: Uri,
        url: Option<url::Url>,
        headers: HeaderMap,
        body: Bytes,
    ) -> BuiltRequest {
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        BuiltRequest::new(
            request,
            Prepared {
                scope: self.inner.scope.clone(),
                url: url.map(Box::new),
            },
        )
    }

    /// The common case of [`resolve`](Self::resolve) without its parsers:
    /// a relative target made only of characters that both `http::Uri` and
    /// the WHATWG parser take as they are, with no dot segment, joined to
    /// the pre-split base URL. `None` sends the target the long way, which
    /// gives the same URL or the error (a unit test checks the two agree
    /// on random targets).
    ///
    /// Why: the long way parses each URL three times (a strict `Uri`
    /// check, WHATWG with IDNA, `Uri` again) and allocates at each; on a
    /// zero-latency transport that was the largest cost per item. The only
    /// parse left here is `http`'s check of the path and query.
    fn join_plain(
        &self,
        target: &str,
        query: &[(String, String)],
    ) -> Option<(Uri, Option<url::Url>)> {
        let base = self.inner.base_parts.as_ref()?;
        if is_absolute(target) {
            return None;
        }
        let has_query = plain_path_len(target.as_bytes())? < target.len();
        let target = target.trim_start_matches('/');
        let mut raw = String::with_capacity(base.path.len() + target.len() + 1);
        raw.push_str(&base.path);
        raw.push('/');
        raw.push_str(target);
        if !query.is_empty() {
            raw.push(if has_query { '&' } else { '?' });
            let start = raw.len();
            let mut encoder = url::form_urlencoded::Serializer::for_suffix(raw, start);
            encoder.extend_pairs(query);
            raw = encoder.finish();
        }
        // The same path and query, joined to the parsed base: the host is
        // not parsed again (IDNA and all), only the path and the query. (A
        // path starting `//` would name a host to the joiner: the long way.)
        let url = if self.inner.wants_url {
            if raw.starts_with("//") {
                return None;
            }
            Some(base.url.join(&raw).ok()?)
        } else {
            None
        };
        let path_and_query = http::uri::PathAndQuery::from_maybe_shared(Bytes::from(raw)).ok()?;
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(base.scheme.clone());
        parts.authority = Some(base.authority.clone());
        parts.path_and_query = Some(path_and_query);
        Some((Uri::from_parts(parts).ok()?, url))
    }

    /// Whether `origin` is the base URL's or one the user trusted: the only
    /// places default headers (the client's credentials) may go. A client
    /// without a base URL has no home, so its credentials go nowhere it was
    /// not told to trust.
    fn is_trusted(&self, origin: &str) -> bool {
        self.inner.scope.trusts(origin)
    }

    /// The URL a target means, in the one form every transport is given.
    ///
    /// A relative target is item data under the base path: a `#` in it is
    /// data (`%23`), a dot segment (`.`, `..`, or `%2e`-encoded) is refused
    /// rather than resolved, and the result must stay under the base path.
    /// The URL is then normalised once, here, by the same WHATWG parser
    /// reqwest uses, so `MockTransport` sees exactly what goes on the wire.
    fn resolve(&self, target: &str, query: &[(String, String)]) -> Result<url::Url, BuildError> {
        let absolute = is_absolute(target);
        let mut raw = if absolute {
            target.to_owned()
        } else if let Some(base) = &self.inner.base {
            let target = target.replace('#', "%23");
            let path = target.split('?').next().unwrap_or_default();
            if has_dot_segment(path) {
                return Err(BuildError::new(format!(
                    "target path {path:?} has a dot segment: item data may not climb out of \
                     its path (encode it with RequestSpec::segment, or use an absolute URL)"
                )));
            }
            let mut url = String::with_capacity(base.len() + target.len() + 1);
            url.push_str(base);
            url.push('/');
            url.push_str(target.trim_start_matches('/'));
            url
        } else {
            return Err(BuildError::new(format!(
                "relative target {:?} but the client has no base URL",
                target.split('?').next().unwrap_or_default()
            )));
        };
        if !query.is_empty() {
            raw.push(if raw.contains('?') { '&' } else { '?' });
            let start = raw.len();
            let mut encoder = url::form_urlencoded::Serializer::for_suffix(raw, start);
            encoder.extend_pairs(query);
            raw = encoder.finish();
        }
        let invalid = |e: &dyn fmt::Display| {
            let shown = without_credentials(target.split('?').next().unwrap_or_default());
            BuildError::new(format!("invalid URL for {shown:?}: {e}"))
        };
        // http's parser is the stricter one (no spaces, no controls): what it
        // refuses stays refused, before the WHATWG parser would encode it.
        Uri::try_from(raw.as_str()).map_err(|e| invalid(&e))?;
        let mut url = url::Url::parse(&raw).map_err(|e| invalid(&e))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(BuildError::new(format!(
                "target {:?} has credentials in its URL: send them in a header instead",
                without_credentials(target.split('?').next().unwrap_or_default())
            )));
        }
        url.set_fragment(None);
        if !absolute && !within(url.path(), &self.inner.base_path) {
            return Err(BuildError::new(format!(
                "target path {:?} leaves the base path {:?}",
                url.path(),
                self.inner.base_path
            )));
        }
        Ok(url)
    }
}

/// The client's idea of the date. Read only to interpret an absolute time
/// (a `Retry-After` HTTP-date, a Unix reset) that came in a response
/// without the server's own `Date`.
#[derive(Debug)]
enum WallClock {
    /// The date the servers gave: the last `Date` header seen, moved on by
    /// tokio's clock since it arrived. No system clock is read, so under a
    /// paused clock the date moves with virtual time, and before any server
    /// has said a date an absolute time without one reads as unknown.
    Learned(std::sync::Mutex<Option<(HeaderValue, tokio::time::Instant)>>),
    /// A clock the user gave ([`ClientBuilder::wall_clock`]).
    Given(fn() -> SystemTime),
}

impl WallClock {
    fn now(&self) -> Option<SystemTime> {
        match self {
            Self::Given(now) => Some(now()),
            Self::Learned(last) => {
                let last = last
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let (date, at) = last.as_ref()?;
                let date = httpdate::parse_http_date(date.to_str().ok()?).ok()?;
                Some(date + at.elapsed())
            }
        }
    }

    /// Keeps the `Date` of a response (a cheap clone; parsed only when an
    /// absolute time needs it).
    fn learn(&self, headers: &HeaderMap) {
        if let (Self::Learned(last), Some(date)) = (self, headers.get(http::header::DATE)) {
            let at = tokio::time::Instant::now();
            *last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((date.clone(), at));
        }
    }
}

/// Whether a path has a `.` or `..` segment, literally or percent-encoded,
/// with `/` or `\\` (which WHATWG URLs also read as `/`) between segments.
fn has_dot_segment(path: &str) -> bool {
    path.split(['/', '\\'])
        .any(|segment| is_dot_segment(segment.as_bytes()))
}

/// Whether `segment` is `.` or `..`, each dot spelled `.` or `%2e` in
/// either case.
fn is_dot_segment(mut segment: &[u8]) -> bool {
    let mut dots = 0;
    while !segment.is_empty() {
        if segment[0] == b'.' {
            segment = &segment[1..];
        } else if segment.len() >= 3
            && segment[0] == b'%'
            && segment[1] == b'2'
            && segment[2] | 0x20 == b'e'
        {
            segment = &segment[3..];
        } else {
            return false;
        }
        dots += 1;
    }
    dots == 1 || dots == 2
}

/// The length of a relative target's path (up to its first `?`), if the
/// target is plain enough for [`Client::join_plain`]: every byte
/// [plain](plain_byte) and no dot segment in the path. One pass, for every
/// request: the same checks as `bytes().all(plain_byte)`, a split at `?`
/// and [`has_dot_segment`] (a `\\` is not plain, so `/` alone splits).
fn plain_path_len(target: &[u8]) -> Option<usize> {
    let mut path_len = None;
    let mut segment = 0;
    for (i, &byte) in target.iter().enumerate() {
        if !plain_byte(byte) {
            return None;
        }
        if path_len.is_none() && (byte == b'/' || byte == b'?') {
            if is_dot_segment(&target[segment..i]) {
                return None;
            }
            segment = i + 1;
            if byte == b'?' {
                path_len = Some(i);
            }
        }
    }
    match path_len {
        Some(len) => Some(len),
        None if is_dot_segment(&target[segment..]) => None,
        None => Some(target.len()),
    }
}

/// The base URL split as `http::Uri` keeps it (cloning these shares
/// their bytes), and parsed as `url::Url`, to join paths to.
struct BaseParts {
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// The base path without its trailing `/` (empty at the root).
    path: String,
    url: url::Url,
}

impl BaseParts {
    fn new(url: &str) -> Option<Self> {
        let parsed = url::Url::parse(url).ok()?;
        let uri = Uri::try_from(url).ok()?;
        let parts = uri.into_parts();
        let path = parts
            .path_and_query
            .as_ref()
            .map_or("", |p| p.path())
            .trim_end_matches('/')
            .to_owned();
        Some(Self {
            scheme: parts.scheme?,
            authority: parts.authority?,
            path,
            url: parsed,
        })
    }
}

/// Whether `byte` in a relative target means the same to `http::Uri` and
/// to the WHATWG parser, unchanged: letters, digits, `-._~`, and the
/// delimiters `!$&()*+,;=:@/?%`. Left out, for the long way: `#` (data,
/// to be encoded), `\` (a separator to WHATWG), `'` (encoded in a
/// query), and everything either parser refuses or encodes (space,
/// controls, `"`, `<`, `>`, `[`, `]`, `^`, a backtick, `{`, `|`, `}`,
/// non-ASCII).
fn plain_byte(byte: u8) -> bool {
    PLAIN[usize::from(byte)]
}

/// [`plain_byte`] as a table: it is asked for every byte of every target.
const PLAIN: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        table[byte] = plain_byte_slow(byte as u8);
        byte += 1;
    }
    table
};

const fn plain_byte_slow(byte: u8) -> bool {
    byte.is_ascii_alphanumeric()
        || matches!(
            byte,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
                | b'/'
                | b'?'
                | b'%'
        )
}

/// Whether `path` is `prefix` or below it.
fn within(path: &str, prefix: &str) -> bool {
    prefix == "/"
        || path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// `url` with any `user:password@` replaced, for messages.
///
/// The userinfo ends at the last `@` of the authority, which ends at the
/// first `/`, `?` or `#` (`\\` too, for WHATWG). A password with one of
/// those unencoded (`https://user:pa#ss@h/`) ends that authority early, at
/// `user:pa`, where no `@` is left to find. So the authority found must be
/// a plain `host[:port]` (after its userinfo, if it has one), and a
/// fragment must hold no `@`: when either is not so, the URL is in doubt
/// and everything up to its last `@` is taken for userinfo. A message that
/// hides too much is harmless; one that shows a password is not. A normal
/// URL (an `@` in its path or query, an IPv6 host) is shown as it is.
/// Beyond reach: a URL a parser reads as plain too, such as `user:12/pw@h`
/// (host `user`, port 12, path `/pw@h`).
pub(crate) fn without_credentials(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let authority_start = scheme_end + 3;
    let rest = &url[authority_start..];
    let authority_end = rest.find(['/', '?', '#', '\\']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let userinfo_end = authority.rfind('@');
    let host = userinfo_end.map_or(authority, |at| &authority[at + 1..]);
    let after = &rest[authority_end..];
    let in_doubt = !is_host_and_port(host) || (after.starts_with('#') && after.contains('@'));
    let at = if in_doubt {
        rest.rfind('@')
    } else {
        userinfo_end
    };
    match at {
        Some(at) => format!("{}***@{}", &url[..authority_start], &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// Whether `authority` is a plain `host`, `host:port`, `[v6]` or
/// `[v6]:port` (a port being digits), as a URL without userinfo has: not
/// `user:pa`, what is left of `user:pa#ss@host` before its `#`. An empty
/// one (`http:///x`) is plain too: nothing in it to hide.
fn is_host_and_port(authority: &str) -> bool {
    let (host_ok, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((address, port)) => (
                address
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'.' | b'%')),
                port,
            ),
            None => return false,
        },
        None => {
            let (host, port) = authority.split_at(authority.find(':').unwrap_or(authority.len()));
            let plain =
                |c: char| !matches!(c, '@' | '[' | ']') && !c.is_whitespace() && !c.is_control();
            (host.chars().all(plain), port)
        }
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    host_ok && port_ok
}

fn is_absolute(target: &str) -> bool {
    // Compared in place: this runs for every request.
    let has = |scheme: &str| {
        target
            .get(..scheme.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(scheme))
    };
    has("http://") || has("https://")
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base_url", &self.inner.base)
            .field("limiter", &self.inner.limiter)
            .field("pause", &self.inner.pause)
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Client`]. Mistakes are reported by [`build`](Self::build).
#[derive(Default)]
#[must_use = "a ClientBuilder does nothing until `build` is called"]
pub struct ClientBuilder {
    transport: Option<Arc<dyn Transport>>,
    base_url: Option<String>,
    headers: HeaderMap,
    limiter: Option<Limiter>,
    pause: Option<PauseHandle>,
    max_pause: Option<Duration>,
    policy: Policy,
    wall_clock: Option<fn() -> SystemTime>,
    without_stats: bool,
    sensitive: Vec<HeaderName>,
    log_query: bool,
    trusted: Vec<String>,
    follow_cross_origin_links: bool,
    error: Option<BuildError>,
}

impl ClientBuilder {
    /// Sends through `transport` (default: [`ReqwestTransport`](crate::ReqwestTransport)
    /// with the `reqwest` feature, else `HyperTransport` with the
    /// `hyper-transport` feature).
    pub fn transport(mut self, transport: impl Transport) -> Self {
        self.transport = Some(Arc::new(transport));
        self
    }

    /// Sends through an already shared transport.
    pub fn shared_transport(mut self, transport: Arc<dyn Transport>) -> Self {
        self.transport = Some(transport);
        self
    }

    /// Joins relative targets onto `url`, which must be an `http` or
    /// `https` URL with a host and without query or fragment. Its path is a
    /// prefix: base `http://h/api` and target `/items` give `http://h/api/items`.
    ///
    /// Credentials in it (`http://user:password@h`) become an
    /// `Authorization: Basic` default header (unless one is given), so no
    /// URI, log line or `Debug` output holds the password. Its scheme, host
    /// and port are the origin the default headers are sent to.
    pub fn base_url(mut self, url: impl AsRef<str>) -> Self {
        self.base_url = Some(url.as_ref().to_owned());
        self
    }

    /// Sends `name: value` with every request to the base URL's origin (and
    /// origins given to [`trust_origin`](Self::trust_origin)) unless the
    /// request sets it. Requests elsewhere, and every request of a client
    /// without a base URL or a trusted origin, go without it.
    pub fn default_header<K, V>(mut self, name: K, value: V) -> Self
    where
        K: TryInto<HeaderName>,
        V: TryInto<HeaderValue>,
    {
        match (name.try_into(), value.try_into()) {
            (Ok(name), Ok(value)) => {
                self.headers.append(name, value);
            }
            _ => self.fail("invalid default header name or value"),
        }
        self
    }

    /// Paces every request of the client at `rate` (a new private budget).
    pub fn rate(mut self, rate: Rate) -> Self {
        self.limiter = Some(Limiter::new(rate));
        self
    }

    /// Paces every request with a shared `limiter`.
    pub fn limiter(mut self, limiter: Limiter) -> Self {
        self.limiter = Some(limiter);
        self
    }

    /// Shares `pause` (default: a new handle per client).
    pub fn pause_handle(mut self, pause: PauseHandle) -> Self {
        self.pause = Some(pause);
        self
    }

    /// Caps each pause of the client's own handle at `max` (default
    /// [`PauseHandle::DEFAULT_MAX_PAUSE`]): a server's `Retry-After` beyond
    /// it is cut to it, with a warning. A handle given with
    /// [`pause_handle`](Self::pause_handle) keeps its own cap.
    pub fn max_pause(mut self, max: Duration) -> Self {
        self.max_pause = Some(max);
        self
    }

    /// The clock against which absolute times (a `Retry-After` HTTP-date, a
    /// Unix reset) are read when a response has no `Date` header.
    ///
    /// Default: the date the server gave in its last `Date` header, moved on
    /// by tokio's clock (so it follows virtual time); before any `Date` was
    /// seen, such a time is ignored rather than read against a guess. Give
    /// the system's clock (or a fixed one, in a test) for a server that
    /// never sends `Date`.
    pub fn wall_clock(mut self, now: fn() -> SystemTime) -> Self {
        self.wall_clock = Some(now);
        self
    }

    /// Keeps no [`Stats`] (they are on by default).
    pub fn without_stats(mut self) -> Self {
        self.without_stats = true;
        self
    }

    /// Treats header `name` as secret, besides `Authorization`,
    /// `Proxy-Authorization`, `Cookie` and `Set-Cookie`: its values never
    /// appear in `Debug` output, logs, errors or dead letters.
    pub fn redact_header<K: TryInto<HeaderName>>(mut self, name: K) -> Self {
        match name.try_into() {
            Ok(name) => self.sensitive.push(name),
            Err(_) => self.fail("invalid header name to redact"),
        }
        self
    }

    /// Lets the client's default headers (and so its credentials) go to
    /// `origin` too, besides the base URL's: for absolute targets, next
    /// links and redirects there. `origin` is a URL; only its scheme, host
    /// and port count.
    ///
    /// By default, credentials stay at their origin: a request to another
    /// scheme, host or port (an absolute target, a redirect, a next link)
    /// carries none of the default headers, and a redirect or a next link
    /// there drops every header marked secret. A redirect keeps them only
    /// between origins the client trusts: a third party that redirects a
    /// request home sends none of what the request carried for it.
    pub fn trust_origin(mut self, origin: impl AsRef<str>) -> Self {
        match url::Url::parse(origin.as_ref()) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {
                self.trusted.push(url.origin().ascii_serialization());
            }
            _ => self.fail(format!(
                "trusted origin {:?} is not an http or https URL",
                without_credentials(origin.as_ref())
            )),
        }
        self
    }

    /// Lets [`paginate`](crate::etl::paginate) follow a `Link: rel="next"`
    /// to another origin than the listing's, without credentials: neither
    /// the client's default headers nor the first request's own secret
    /// headers (`Authorization`, `Cookie`, `Proxy-Authorization`, and those
    /// named by [`redact_header`](Self::redact_header) or marked
    /// sensitive) go there. Off by default: such a link ends the walk with a
    /// [`Build`](crate::FetchErrorKind::Build) error carrying the page.
    pub fn follow_cross_origin_links(mut self, yes: bool) -> Self {
        self.follow_cross_origin_links = yes;
        self
    }

    /// Shows URL queries in logs (off by default: queries often carry keys).
    pub fn log_query(mut self, yes: bool) -> Self {
        self.log_query = yes;
        self
    }

    fn fail(&mut self, message: impl Into<String>) {
        if self.error.is_none() {
            self.error = Some(BuildError::new(message));
        }
    }

    /// Builds the client.
    ///
    /// # Errors
    ///
    /// An invalid base URL or default header, or no transport given while
    /// the `reqwest` and `hyper-transport` features are both off.
    pub fn build(self) -> Result<Client, BuildError> {
        if let Some(error) = self.error {
            return Err(error);
        }
        let base = self.base_url.as_deref().map(normalize_base).transpose()?;
        let mut headers = self.headers;
        let (base, base_path, mut home) = match base {
            Some(base) => {
                if let Some(auth) = base.basic_auth {
                    // A header given explicitly wins over the URL's.
                    headers.entry(AUTHORIZATION).or_insert(auth);
                }
                (Some(base.url), base.path, vec![base.origin])
            }
            None => (None, "/".to_owned(), Vec::new()),
        };
        home.extend(self.trusted);
        let sensitive: Vec<HeaderName> = [AUTHORIZATION, PROXY_AUTHORIZATION, COOKIE, SET_COOKIE]
            .into_iter()
            .chain(self.sensitive)
            .collect();
        // Marked once here: a request that adds no header of its own takes
        // these as they are.
        for (name, value) in headers.iter_mut() {
            if sensitive.contains(name) {
                value.set_sensitive(true);
            }
        }
        let default_names: Vec<HeaderName> = headers.keys().cloned().collect();
        let transport = match self.transport {
            Some(transport) => transport,
            None => default_transport()?,
        };
        let pause = match (self.pause, self.max_pause) {
            (Some(pause), _) => pause,
            (None, Some(max)) => PauseHandle::with_max_pause(max),
            (None, None) => PauseHandle::new(),
        };
        let stats = (!self.without_stats).then(|| Stats::new(None));
        let mut policy = self.policy.inherited();
        policy.rules.set_pause_cap(pause.max_pause());
        policy.rules.set_stats(stats.clone());
        policy.stats.splice(0..0, stats.clone());
        let base_parts = base.as_deref().and_then(BaseParts::new);
        let wants_url = transport.wants_parsed_url();
        Ok(Client {
            inner: Arc::new(ClientInner {
                transport,
                base,
                headers,
                gate: self.limiter.clone().unwrap_or_else(Limiter::unpaced),
                limiter: self.limiter,
                pause,
                policy,
                wall_clock: match self.wall_clock {
                    Some(now) => WallClock::Given(now),
                    None => WallClock::Learned(std::sync::Mutex::new(None)),
                },
                stats,
                sensitive,
                log_query: self.log_query,
                base_parts,
                base_path,
                scope: Arc::new(CredentialScope {
                    home: home.into(),
                    defaults: default_names.into(),
                }),
                follow_cross_origin_links: self.follow_cross_origin_links,
                wants_url,
            }),
        })
    }
}

impl Sealed for ClientBuilder {}

/// The rules, timeouts and limits set on the builder are the defaults of
/// every endpoint of the client: an endpoint's own rules come before them,
/// its own limits after them.
impl WithPolicy for ClientBuilder {
    fn map_policy(mut self, change: impl FnOnce(&mut Policy)) -> Self {
        change(&mut self.policy);
        self
    }
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field(
                "base_url",
                &self.base_url.as_deref().map(without_credentials),
            )
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "reqwest")]
fn default_transport() -> Result<Arc<dyn Transport>, BuildError> {
    Ok(Arc::new(crate::ReqwestTransport::default()))
}

#[cfg(all(not(feature = "reqwest"), feature = "hyper-transport"))]
fn default_transport() -> Result<Arc<dyn Transport>, BuildError> {
    Ok(Arc::new(crate::HyperTransport::default()))
}

#[cfg(not(any(feature = "reqwest", feature = "hyper-transport")))]
fn default_transport() -> Result<Arc<dyn Transport>, BuildError> {
    Err(BuildError::new(
        "no transport given (enable the `reqwest` or `hyper-transport` feature, or call `transport`)",
    ))
}

/// A base URL taken apart: the URL without credentials, its path, its
/// origin, and the `Authorization` its `user:password@` stood for.
struct Base {
    url: String,
    path: String,
    origin: String,
    basic_auth: Option<HeaderValue>,
}

fn normalize_base(raw: &str) -> Result<Base, BuildError> {
    let shown = without_credentials(raw);
    let mut url = url::Url::parse(raw)
        .map_err(|e| BuildError::new(format!("invalid base URL {shown:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(BuildError::new(format!(
            "base URL {shown:?} is not http or https"
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(BuildError::new(format!("base URL {shown:?} has no host")));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(BuildError::new(format!(
            "base URL {shown:?} must not have a query or fragment"
        )));
    }
    // Credentials in the URL become a header (as reqwest would do), so no
    // URI the client builds (and logs, and hands to a mock) holds them.
    let basic_auth = if url.username().is_empty() && url.password().is_none() {
        None
    } else {
        let user = percent_decode(url.username());
        let password = percent_decode(url.password().unwrap_or_default());
        let mut credentials = user;
        credentials.push(b':');
        credentials.extend_from_slice(&password);
        let mut value = HeaderValue::try_from(format!("Basic {}", base64(&credentials)))
            .map_err(|_| BuildError::new("base URL credentials cannot be a header"))?;
        value.set_sensitive(true);
        let _ = url.set_username("");
        let _ = url.set_password(None);
        Some(value)
    };
    let path = match url.path().trim_end_matches('/') {
        "" => "/".to_owned(),
        path => path.to_owned(),
    };
    Ok(Base {
        url: url.as_str().trim_end_matches('/').to_owned(),
        path,
        origin: url.origin().ascii_serialization(),
        basic_auth,
    })
}

fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::TransportError;
    use crate::mock::MockTransport;

    fn client(base: &str) -> Client {
        Client::builder()
            .transport(MockTransport::new())
            .base_url(base)
            .build()
            .unwrap()
    }

    /// A transport that asks for the parsed URL, as reqwest's does.
    struct WantsUrl(MockTransport);

    impl Transport for WantsUrl {
        fn send(
            &self,
            request: Request<Bytes>,
        ) -> futures::future::BoxFuture<'static, Result<http::Response<Bytes>, TransportError>>
        {
            self.0.send(request)
        }

        fn wants_parsed_url(&self) -> bool {
            true
        }
    }

    fn client_wanting_urls(base: &str) -> Client {
        Client::builder()
            .transport(WantsUrl(MockTransport::new()))
            .base_url(base)
            .build()
            .unwrap()
    }

    #[test]
    fn dot_segments_are_found_in_every_spelling() {
        for path in [
            "/a/../b",
            "/a/./b",
            "..",
            "/%2e%2e/x",
            "/%2E./x",
            "/.%2e",
            "a\\..\\b",
            "/x/%2e",
        ] {
            assert!(has_dot_segment(path), "{path}");
        }
        for path in [
            "/a/b",
            "/...",
            "/.hidden",
            "/a..b",
            "/%2e%2e%2e",
            "/%2f",
            "",
            "/",
            "/%2",
        ] {
            assert!(!has_dot_segment(path), "{path}");
        }
    }

    fn uri(c: &Client, spec: RequestSpec) -> String {
        c.prepare(spec).unwrap().uri().to_string()
    }

    #[test]
    fn targets_join_the_base_path() {
        let c = client("http://127.0.0.1:8080/api/");
        assert_eq!(uri(&c, "/items".into()), "http://127.0.0.1:8080/api/items");
        assert_eq!(
            uri(&c, "items/7".into()),
            "http://127.0.0.1:8080/api/items/7"
        );
        assert_eq!(
            uri(&c, "https://other.test/x".into()),
            "https://other.test/x"
        );
        let q = RequestSpec::get("/s?a=1").query("q", "a b&c").query("n", 2);
        assert_eq!(uri(&c, q), "http://127.0.0.1:8080/api/s?a=1&q=a+b%26c&n=2");
        let root = client("http://127.0.0.1:9");
        assert_eq!(uri(&root, "/".into()), "http://127.0.0.1:9/");
    }

    #[test]
    fn plain_targets_take_the_short_way() {
        let c = client("http://127.0.0.1:8080/api/");
        for target in ["/items/7", "items/a%2Fb", "/s?a=1&b=c", "", "/"] {
            assert!(c.join_plain(target, &[]).is_some(), "{target}");
        }
        for target in ["/a/../b", "/a#b", "/a\\b", "/a b", "/é", "/q?x='1'"] {
            assert!(c.join_plain(target, &[]).is_none(), "{target}");
        }
    }

    proptest::proptest! {
        /// The one-pass scan takes exactly the targets the three separate
        /// checks took, and finds the same end of the path.
        #[test]
        fn the_one_pass_scan_agrees_with_the_checks(
            target in proptest::collection::vec(
                proptest::sample::select(vec![
                    "a", "/", ".", "..", "%2e", "%2E", "%2", "?", "&", "=", "\\", "#", " ",
                    "\u{e9}", "e",
                ]),
                0..10,
            ),
        ) {
            let target = target.concat();
            let path = target.split('?').next().unwrap_or_default();
            let expected = (target.bytes().all(plain_byte) && !has_dot_segment(path))
                .then_some(path.len());
            proptest::prop_assert_eq!(plain_path_len(target.as_bytes()), expected, "{:?}", target);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]
        /// The short way gives what the long way gives, for every target it
        /// takes: the same URL, to the byte.
        #[test]
        fn the_short_way_agrees_with_the_parsers(
            base in proptest::sample::select(vec![
                "http://127.0.0.1:8080/api/",
                "http://h",
                "https://B\u{fc}cher.example:443/a%20b/c",
                "http://h:8080/x%2Fy",
            ]),
            target in proptest::collection::vec(
                proptest::prop_oneof![
                    9 => proptest::sample::select(vec![
                        "a", "Z", "7", "/", "//", ".", "..", "%", "%2e", "%2E", "%2F", "%41",
                        "?", "&", "=", "@", ":", "+", ";", "~", "!", "$", "(", "*", ",", "-",
                        "_", "http://",
                    ]),
                    1 => proptest::sample::select(vec![
                        "#", "\\", "'", " ", "\"", "<", "[", "]", "{", "|", "^", "`",
                        "\u{e9}", "\t", "\u{0}",
                    ]),
                ],
                0..12,
            ),
            query in proptest::collection::vec(("[a-z&= ]{0,3}", "[a-z?#&'%]{0,3}"), 0..3),
        ) {
            let c = client_wanting_urls(base);
            let target: String = target.concat();
            if let Some((uri, url)) = c.join_plain(&target, &query) {
                let url = url.expect("the transport asked for it");
                let long = c.resolve(&target, &query);
                proptest::prop_assert!(long.is_ok(), "{target:?}: {long:?}");
                let long = String::from(long.unwrap());
                // The URI the transport is given and the URL handed beside it
                // name the same target, and the long way's.
                proptest::prop_assert_eq!(uri.to_string(), long.clone());
                proptest::prop_assert_eq!(String::from(url), long);
            }
        }
    }

    #[test]
    fn bad_base_urls_fail_at_build_time() {
        for bad in [
            "not a url",
            "ftp://h/x",
            "http://h/?q=1",
            "http://h/#f",
            "file:///x",
        ] {
            let err = Client::builder()
                .transport(MockTransport::new())
                .base_url(bad)
                .build()
                .unwrap_err();
            assert!(err.to_string().contains("base URL"), "{bad}: {err}");
        }
    }

    #[test]
    fn bad_targets_fail_for_that_request_only() {
        let c = client("http://h");
        let err = c.prepare("/a b".into()).unwrap_err();
        assert!(err.to_string().contains("invalid URL"), "{err}");
        let relative = Client::builder()
            .transport(MockTransport::new())
            .build()
            .unwrap();
        assert!(relative.prepare("/x".into()).is_err());
        let header = c.prepare(RequestSpec::get("/x").header("bad name", "v"));
        assert!(header.is_err());
    }

    #[test]
    fn spec_headers_replace_defaults() {
        let c = Client::builder()
            .transport(MockTransport::new())
            .base_url("http://h")
            .default_header("x-a", "default")
            .default_header("x-b", "kept")
            .build()
            .unwrap();
        let r = c
            .prepare(RequestSpec::get("/").header("x-a", "mine"))
            .unwrap();
        assert_eq!(r.headers()["x-a"], "mine");
        assert_eq!(r.headers()["x-b"], "kept");
        assert_eq!(r.headers().get_all("x-a").iter().count(), 1);
    }

    #[test]
    fn credentials_are_hidden_whatever_the_password_holds() {
        for (url, shown) in [
            // A password with `#`, `?` or `/` unencoded: the authority ends
            // early, at `user:pa`, which is no `host:port`.
            ("https://user:pa#SS1@h.example/", "https://***@h.example/"),
            ("https://user:pa?SS1@h.example/", "https://***@h.example/"),
            ("https://user:pa/SS1@h.example/", "https://***@h.example/"),
            ("http://user:pa#TGT1@h.example/x", "http://***@h.example/x"),
            ("https://user:#SS1@h.example/", "https://***@h.example/"),
            (
                "https://user:/SS1@h.example/x?q=1",
                "https://***@h.example/x?q=1",
            ),
            ("https://user:pa\\SS1@h.example/", "https://***@h.example/"),
            // `@` in the password too, or a token alone.
            ("https://user:p@ss#SS1@h.example/", "https://***@h.example/"),
            ("https://user:p@ss@h.example/x", "https://***@h.example/x"),
            ("https://TOKEN#SS1@h.example/", "https://***@h.example/"),
            ("https://TOKEN@h.example", "https://***@h.example"),
            // Userinfo as it should be written, then an `@` in the path.
            ("https://user:pw@h.example/x", "https://***@h.example/x"),
            (
                "https://user:pw@h.example:8443/a@b",
                "https://***@h.example:8443/a@b",
            ),
            ("http://u:p@[::1]:8080/a@b", "http://***@[::1]:8080/a@b"),
            ("http://user:S3CRET@", "http://***@"),
            ("http://user:S3CRET@h/?q", "http://***@h/?q"),
        ] {
            assert_eq!(without_credentials(url), shown, "{url}");
        }
        // Without userinfo, shown as it is, whatever its `@`s.
        for url in [
            "https://h.example/",
            "https://h.example:8443/users/a@b.example",
            "https://h.example/search?email=a@b.example",
            "https://h.example?email=a@b.example",
            "https://h.example/x#a@b",
            "http://localhost:4873/@scope/pkg",
            "http://[::1]:8080/x",
            "http://[2001:db8::1]/@scope/pkg?by=a@b",
            "http://[fe80::1%25eth0]/x",
            "http://127.0.0.1:0/a@b",
            "https://B\u{fc}cher.example/x@y",
            "http:///x@y",
            "/relative@x",
            "not a url",
        ] {
            assert_eq!(without_credentials(url), url);
        }
    }

    #[test]
    fn a_password_with_a_delimiter_shows_in_no_debug_or_error() {
        for (base, secret) in [
            ("https://user:pa#SS1@h.example/", "SS1"),
            ("https://user:pa?SS1@h.example/", "SS1"),
            ("https://user:pa/SS1@h.example/", "SS1"),
        ] {
            let builder = Client::builder()
                .transport(MockTransport::new())
                .base_url(base);
            let shown = format!("{builder:?}");
            assert!(shown.contains("***@h.example/"), "{shown}");
            assert!(!shown.contains(secret), "{shown}");
            let err = builder.build().unwrap_err();
            let shown = format!("{err} {err:?}");
            assert!(shown.contains("***@h.example/"), "{shown}");
            assert!(!shown.contains(secret), "{shown}");
        }
        let c = client("http://127.0.0.1:8080");
        for target in [
            "http://user:pa#TGT1@h.example/x",
            "http://user:pa/TGT1@h.example/x",
            "http://user:pa?TGT1@h.example/x",
        ] {
            let err = c
                .request(move |_: &()| RequestSpec::get(target))
                .build_request(&())
                .unwrap_err();
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains("TGT1"), "{shown}");
        }
    }
}
