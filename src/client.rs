//! [`Client`]: transport, base URL, headers, limits and rules in one cheap
//! handle, and the [`Endpoint`]s made from it.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{
    HeaderName, HeaderValue, AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION, SET_COOKIE,
};
use http::{HeaderMap, Request, Response, Uri};

use crate::endpoint::Endpoint;
use crate::error::{BuildError, FetchError};
use crate::limiter::Limiter;
use crate::pause::PauseHandle;
use crate::rate::Rate;
use crate::request::RequestSpec;
use crate::retry::{Backoff, Matcher, Rules};
use crate::stats::Stats;
use crate::transport::Transport;

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
/// use sluicegate::{Client, Rate};
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
    pub(crate) inner: Arc<ClientInner>,
}

pub(crate) struct ClientInner {
    pub(crate) transport: Arc<dyn Transport>,
    base: Option<String>,
    headers: HeaderMap,
    pub(crate) limiter: Option<Limiter>,
    pub(crate) pause: PauseHandle,
    pub(crate) timeout: Option<Duration>,
    pub(crate) rules: Rules,
    pub(crate) wall_clock: fn() -> SystemTime,
    pub(crate) stats: Option<Stats>,
    sensitive: Vec<HeaderName>,
    log_query: bool,
}

impl Client {
    /// The default per-attempt timeout: 30 seconds.
    ///
    /// Every attempt is bounded unless asked otherwise, so a server that
    /// accepts and never answers cannot hang an item: change it with
    /// [`ClientBuilder::timeout`] (or [`Endpoint::timeout`]), or turn it off
    /// with [`ClientBuilder::no_timeout`].
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

    /// A builder; only the transport is needed (or the `reqwest` feature).
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// An endpoint sending `GET` to the path (or URL) `path(item)` for each
    /// item.
    pub fn get<T, P, F>(&self, path: F) -> Endpoint<T>
    where
        F: Fn(&T) -> P + Send + Sync + 'static,
        P: Into<String>,
    {
        Endpoint::new(self.clone(), move |item: &T| RequestSpec::get(path(item)))
    }

    /// An endpoint sending whatever request `build(item)` describes.
    pub fn request<T, F>(&self, build: F) -> Endpoint<T>
    where
        F: Fn(&T) -> RequestSpec + Send + Sync + 'static,
    {
        Endpoint::new(self.clone(), build)
    }

    /// Sends one request with the client's pause, rate, timeout and default
    /// rules, and returns the response when its status is a success.
    ///
    /// # Errors
    ///
    /// A [`FetchError`] if the request cannot be built, every attempt
    /// failed, or the final status is not a success.
    pub async fn send(
        &self,
        spec: impl Into<RequestSpec>,
    ) -> Result<Response<Bytes>, FetchError<()>> {
        let spec = spec.into();
        self.request(move |_: &()| spec.clone())
            .fetch(())
            .await
            .map(|fetched| fetched.response)
    }

    /// The shared rate limiter, if the client has one.
    pub fn limiter(&self) -> Option<&Limiter> {
        self.inner.limiter.as_ref()
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
        match (uri.scheme_str(), uri.authority()) {
            (Some(scheme), Some(authority)) => format!("{scheme}://{authority}{}", uri.path()),
            _ => uri.path().to_owned(),
        }
    }

    /// Turns a spec into a request: target joined to the base URL, query
    /// encoded, default headers under the spec's own.
    pub(crate) fn prepare(&self, spec: RequestSpec) -> Result<Request<Bytes>, BuildError> {
        if let Some(error) = spec.error {
            return Err(error);
        }
        let uri = self.resolve(&spec.target, &spec.query)?;
        let mut headers = self.inner.headers.clone();
        for name in spec.headers.keys() {
            headers.remove(name);
        }
        headers.extend(spec.headers);
        self.redact(&mut headers);
        let mut request = Request::new(spec.body);
        *request.method_mut() = spec.method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        Ok(request)
    }

    fn resolve(&self, target: &str, query: &[(String, String)]) -> Result<Uri, BuildError> {
        let mut url = if is_absolute(target) {
            target.to_owned()
        } else if let Some(base) = &self.inner.base {
            let mut url = String::with_capacity(base.len() + target.len() + 1);
            url.push_str(base);
            url.push('/');
            url.push_str(target.trim_start_matches('/'));
            url
        } else {
            return Err(BuildError::new(format!(
                "relative target {target:?} but the client has no base URL"
            )));
        };
        if !query.is_empty() {
            url.push(if url.contains('?') { '&' } else { '?' });
            let start = url.len();
            let mut encoder = url::form_urlencoded::Serializer::for_suffix(url, start);
            encoder.extend_pairs(query);
            url = encoder.finish();
        }
        // Hand the string over instead of copying it.
        Uri::from_maybe_shared(Bytes::from(url)).map_err(|e| {
            let shown = target.split('?').next().unwrap_or_default();
            BuildError::new(format!("invalid URL for {shown:?}: {e}"))
        })
    }
}

fn is_absolute(target: &str) -> bool {
    let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base_url", &self.inner.base)
            .field("limiter", &self.inner.limiter)
            .field("pause", &self.inner.pause)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Client`]. Mistakes are reported by [`build`](Self::build).
#[derive(Default)]
pub struct ClientBuilder {
    transport: Option<Arc<dyn Transport>>,
    base_url: Option<String>,
    headers: HeaderMap,
    limiter: Option<Limiter>,
    pause: Option<PauseHandle>,
    max_pause: Option<Duration>,
    /// `None`: the default; `Some(None)`: no timeout.
    timeout: Option<Option<Duration>>,
    rules: Rules,
    wall_clock: Option<fn() -> SystemTime>,
    without_stats: bool,
    sensitive: Vec<HeaderName>,
    log_query: bool,
    error: Option<BuildError>,
}

impl ClientBuilder {
    /// Sends through `transport` (default: [`ReqwestTransport`](crate::ReqwestTransport)
    /// with the `reqwest` feature).
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
    pub fn base_url(mut self, url: impl AsRef<str>) -> Self {
        self.base_url = Some(url.as_ref().to_owned());
        self
    }

    /// Sends `name: value` with every request unless the request sets it.
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

    /// Gives each attempt at most `timeout` (default
    /// [`Client::DEFAULT_TIMEOUT`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(Some(timeout));
        self
    }

    /// Lets an attempt wait for ever: no per-attempt timeout. Only for a
    /// transport that bounds its own waits.
    pub fn no_timeout(mut self) -> Self {
        self.timeout = Some(None);
        self
    }

    /// A default retry rule for every endpoint of the client.
    pub fn retry_on(mut self, matcher: impl Into<Matcher>, policy: Backoff) -> Self {
        self.rules.retry_on(matcher.into(), policy);
        self
    }

    /// A default pause rule for every endpoint of the client.
    pub fn pause_on(mut self, matcher: impl Into<Matcher>, fallback: Duration) -> Self {
        self.rules.pause_on(matcher.into(), fallback);
        self
    }

    /// The clock against which `Retry-After` dates are read when a response
    /// has no `Date` header (default: the system clock).
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
    /// the `reqwest` feature is off.
    pub fn build(self) -> Result<Client, BuildError> {
        if let Some(error) = self.error {
            return Err(error);
        }
        let base = self.base_url.as_deref().map(normalize_base).transpose()?;
        let transport = match self.transport {
            Some(transport) => transport,
            None => default_transport()?,
        };
        let pause = match (self.pause, self.max_pause) {
            (Some(pause), _) => pause,
            (None, Some(max)) => PauseHandle::with_max_pause(max),
            (None, None) => PauseHandle::new(),
        };
        let mut rules = self.rules.inherited();
        rules.set_pause_cap(pause.max_pause());
        Ok(Client {
            inner: Arc::new(ClientInner {
                transport,
                base,
                headers: self.headers,
                limiter: self.limiter,
                pause,
                timeout: self.timeout.unwrap_or(Some(Client::DEFAULT_TIMEOUT)),
                rules,
                // The wall clock is read only to interpret an absolute time
                // (a Retry-After HTTP-date or a Unix reset) that came without
                // the server's own Date; tests replace it with `wall_clock`.
                wall_clock: self.wall_clock.unwrap_or(SystemTime::now),
                stats: (!self.without_stats).then(|| Stats::new(None)),
                sensitive: [AUTHORIZATION, PROXY_AUTHORIZATION, COOKIE, SET_COOKIE]
                    .into_iter()
                    .chain(self.sensitive)
                    .collect(),
                log_query: self.log_query,
            }),
        })
    }
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "reqwest")]
fn default_transport() -> Result<Arc<dyn Transport>, BuildError> {
    Ok(Arc::new(crate::ReqwestTransport::default()))
}

#[cfg(not(feature = "reqwest"))]
fn default_transport() -> Result<Arc<dyn Transport>, BuildError> {
    Err(BuildError::new(
        "no transport given (enable the `reqwest` feature or call `transport`)",
    ))
}

fn normalize_base(raw: &str) -> Result<String, BuildError> {
    let url = url::Url::parse(raw)
        .map_err(|e| BuildError::new(format!("invalid base URL {raw:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(BuildError::new(format!(
            "base URL {raw:?} is not http or https"
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(BuildError::new(format!("base URL {raw:?} has no host")));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(BuildError::new(format!(
            "base URL {raw:?} must not have a query or fragment"
        )));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::MockTransport;

    fn client(base: &str) -> Client {
        Client::builder()
            .transport(MockTransport::new())
            .base_url(base)
            .build()
            .unwrap()
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
}
