//! [`RequestSpec`]: a description of one request, before it meets a client.

use std::fmt;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Method, Request};

use crate::error::BuildError;
use crate::transport::Prepared;

/// What to send for one item: method, target, query, headers and body.
///
/// The target is a path joined onto the client's base URL (`"/items/7"`,
/// `"items/7"`), or a full `http(s)://` URL used as it is. Mistakes (a bad
/// header, an unserializable body) are kept and reported as that item's
/// [`Build`](crate::FetchErrorKind::Build) error, so one bad item never
/// stops the pipeline.
///
/// ```
/// use sluicegate::RequestSpec;
///
/// let spec = RequestSpec::post("/search")
///     .query("page", "2")
///     .header("x-trace", "abc")
///     .json(&serde_json::json!({ "q": "rust" }));
/// assert_eq!(spec.method(), &http::Method::POST);
/// ```
#[derive(Clone)]
#[must_use = "a RequestSpec does nothing until sent; its methods return a new one"]
pub struct RequestSpec {
    pub(crate) method: Method,
    pub(crate) target: String,
    pub(crate) query: Vec<(String, String)>,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) error: Option<BuildError>,
    /// For a next link: the listing's first target, whose origin the link
    /// must keep unless the client allows otherwise.
    pub(crate) link_from: Option<String>,
}

impl RequestSpec {
    /// A request with `method` to `target`.
    pub fn new(method: Method, target: impl Into<String>) -> Self {
        Self {
            method,
            target: target.into(),
            query: Vec::new(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
            error: None,
            link_from: None,
        }
    }

    /// A `GET` request.
    pub fn get(target: impl Into<String>) -> Self {
        Self::new(Method::GET, target)
    }

    /// A `POST` request.
    pub fn post(target: impl Into<String>) -> Self {
        Self::new(Method::POST, target)
    }

    /// A `PUT` request.
    pub fn put(target: impl Into<String>) -> Self {
        Self::new(Method::PUT, target)
    }

    /// A `PATCH` request.
    pub fn patch(target: impl Into<String>) -> Self {
        Self::new(Method::PATCH, target)
    }

    /// A `DELETE` request.
    pub fn delete(target: impl Into<String>) -> Self {
        Self::new(Method::DELETE, target)
    }

    /// Adds a query parameter (percent-encoded when the request is built).
    pub fn query(mut self, name: impl Into<String>, value: impl ToString) -> Self {
        self.query.push((name.into(), value.to_string()));
        self
    }

    /// Adds a header; it replaces a client default of the same name.
    pub fn header<K, V>(mut self, name: K, value: V) -> Self
    where
        K: TryInto<HeaderName>,
        V: TryInto<HeaderValue>,
    {
        match (name.try_into(), value.try_into()) {
            (Ok(name), Ok(value)) => {
                self.headers.append(name, value);
            }
            _ => self.fail("invalid header name or value"),
        }
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets a JSON body and `Content-Type: application/json`.
    pub fn json<T: serde::Serialize + ?Sized>(mut self, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => {
                self.body = body.into();
                self.headers
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            Err(e) => self.fail(format!("unserializable JSON body: {e}")),
        }
        self
    }

    /// `value` as one path segment, percent-encoded: everything but
    /// letters, digits and `-._~` becomes `%XX`, so item data cannot add a
    /// segment (`/`), open a query (`?`) or a fragment (`#`). A value that
    /// is `.` or `..` stays so, and the client refuses it.
    ///
    /// Inserting item data with plain `format!` is raw insertion: the
    /// client still refuses dot segments and paths that leave the base
    /// path, but a `/` or `?` in the data changes the request.
    ///
    /// ```
    /// use sluicegate::RequestSpec;
    ///
    /// let id = "a/b?c=d#e f";
    /// let target = format!("/items/{}", RequestSpec::segment(id));
    /// assert_eq!(target, "/items/a%2Fb%3Fc%3Dd%23e%20f");
    /// ```
    pub fn segment(value: impl fmt::Display) -> impl fmt::Display {
        Segment(value)
    }

    /// The method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The target path or URL.
    pub fn target(&self) -> &str {
        &self.target
    }

    fn fail(&mut self, message: impl Into<String>) {
        if self.error.is_none() {
            self.error = Some(BuildError::new(message));
        }
    }
}

impl From<&str> for RequestSpec {
    fn from(target: &str) -> Self {
        Self::get(target)
    }
}

impl From<String> for RequestSpec {
    fn from(target: String) -> Self {
        Self::get(target)
    }
}

impl fmt::Debug for RequestSpec {
    // Headers are left out: they may hold credentials, and a spec's are
    // not marked sensitive yet (the client marks them as it builds the
    // request). The target and the query show as a built request's do:
    // no userinfo, query values as `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestSpec")
            .field("method", &self.method)
            .field("target", &shown_target(&self.target))
            .field("query", &HiddenValues(&self.query))
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// Query pairs as `Debug` shows them: each name, with its value as `***`.
struct HiddenValues<'a>(&'a [(String, String)]);

impl fmt::Debug for HiddenValues<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(name, _)| format!("{name}=***")))
            .finish()
    }
}

/// A target (a path, or a URL as written) as it may be shown, like
/// [`BuiltRequest`]'s URI: the userinfo masked, the query with its values
/// hidden, a fragment as `#***`.
pub(crate) fn shown_target(target: &str) -> String {
    let target = crate::client::without_credentials(target);
    let Some(end) = target.find(['?', '#']) else {
        return target;
    };
    let (path, rest) = target.split_at(end);
    let mut shown = String::with_capacity(target.len());
    shown.push_str(path);
    let fragment = match rest.strip_prefix('?') {
        Some(query) => {
            let (query, fragment) = query
                .split_once('#')
                .map_or((query, None), |(q, f)| (q, Some(f)));
            shown.push('?');
            push_hidden_values(&mut shown, query);
            fragment.is_some()
        }
        None => true,
    };
    if fragment {
        shown.push_str("#***");
    }
    shown
}

/// `query` with every value shown as `***`, and a name without a value
/// too (it may be a key).
fn push_hidden_values(shown: &mut String, query: &str) {
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            shown.push('&');
        }
        match pair.split_once('=') {
            Some((name, _)) => {
                shown.push_str(name);
                shown.push_str("=***");
            }
            None => shown.push_str("***"),
        }
    }
}

/// Displays its value percent-encoded as one path segment.
struct Segment<T>(T);

impl<T: fmt::Display> fmt::Display for Segment<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write as _;
        let text = self.0.to_string();
        for byte in text.bytes() {
            if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
                f.write_char(char::from(byte))?;
            } else {
                write!(f, "%{byte:02X}")?;
            }
        }
        Ok(())
    }
}

/// A request as it will be sent, from
/// [`Endpoint::build_request`](crate::Endpoint::build_request).
///
/// It derefs to the [`http::Request`]; its `Debug` differs from that one's
/// in leaving out what may be secret: query values (often API keys) show as
/// `***`, headers marked secret as `Sensitive`, the body by its length.
///
/// ```
/// use sluicegate::mock::MockTransport;
/// use sluicegate::{Client, RequestSpec};
///
/// let client = Client::builder().transport(MockTransport::new()).base_url("http://mock").build().unwrap();
/// let endpoint = client.request(|_: &()| RequestSpec::get("/x").query("api_key", "K3Y"));
/// let request = endpoint.build_request(&()).unwrap();
/// assert_eq!(request.uri().query(), Some("api_key=K3Y"));
/// assert!(format!("{request:?}").contains("/x?api_key=***"));
/// ```
pub struct BuiltRequest {
    request: Request<Bytes>,
    /// What the transport is told beside the request.
    prepared: Prepared,
}

impl BuiltRequest {
    pub(crate) fn new(request: Request<Bytes>, prepared: Prepared) -> Self {
        Self { request, prepared }
    }

    /// The request itself. It carries the client's credential scope in its
    /// extensions, so that a [`ReqwestTransport`](crate::ReqwestTransport)
    /// it is handed to still drops the client's default headers on a
    /// redirect to another origin.
    pub fn into_request(self) -> Request<Bytes> {
        let mut request = self.request;
        request.extensions_mut().insert(self.prepared);
        request
    }

    /// The request and what the transport is told beside it, for
    /// [`Transport::send_prepared`](crate::Transport::send_prepared).
    pub(crate) fn into_parts(self) -> (Request<Bytes>, Prepared) {
        (self.request, self.prepared)
    }
}

impl std::ops::Deref for BuiltRequest {
    type Target = Request<Bytes>;

    fn deref(&self) -> &Request<Bytes> {
        &self.request
    }
}

impl From<BuiltRequest> for Request<Bytes> {
    fn from(request: BuiltRequest) -> Self {
        request.into_request()
    }
}

impl fmt::Debug for BuiltRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let uri = self.request.uri();
        // The target as errors and logs show it (never a userinfo), then
        // the query with its values hidden.
        let mut shown = crate::transport::without_query(uri);
        if let Some(query) = uri.query() {
            shown.push('?');
            push_hidden_values(&mut shown, query);
        }
        f.debug_struct("BuiltRequest")
            .field("method", self.request.method())
            .field("uri", &format_args!("{shown}"))
            .field("headers", self.request.headers())
            .field("body_len", &self.request.body().len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::transport::CredentialScope;

    /// Whatever URI a built request holds, its `Debug` shows neither a
    /// userinfo nor a query value.
    #[test]
    fn a_built_request_never_shows_userinfo_or_query_values() {
        let mut request = Request::new(Bytes::new());
        *request.uri_mut() = "http://user:hunter2@h.example/a?key=SECRET&flag"
            .parse()
            .unwrap();
        let prepared = Prepared {
            scope: Arc::new(CredentialScope {
                home: Arc::new([]),
                defaults: Arc::new([]),
            }),
            url: None,
        };
        let shown = format!("{:?}", BuiltRequest::new(request, prepared));
        assert!(shown.contains("http://h.example/a?key=***&***"), "{shown}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("SECRET"),
            "{shown}"
        );
    }

    /// A spec's `Debug` hides what a built request's hides: query values,
    /// in its target or added, and a userinfo; its headers not at all.
    #[test]
    fn a_spec_never_shows_userinfo_query_values_or_headers() {
        let spec = RequestSpec::get("/x?token=TSECRET&flag")
            .query("api_key", "QSECRET")
            .header("authorization", "Bearer HSECRET")
            .header("x-api-key", "KSECRET");
        let shown = format!("{spec:?}");
        assert!(
            shown.contains(r#"target: "/x?token=***&***""#)
                && shown.contains(r#"query: ["api_key=***"]"#),
            "{shown}"
        );
        for secret in ["TSECRET", "flag", "QSECRET", "HSECRET", "KSECRET"] {
            assert!(!shown.contains(secret), "{secret}: {shown}");
        }
        for (target, expected) in [
            ("https://user:UPASS@h.example/x", "https://***@h.example/x"),
            (
                "https://user:pa#UPASS@h.example/x?k=v",
                "https://***@h.example/x?k=***",
            ),
            (
                "http://h.example/a@b?e=a@b#frag",
                "http://h.example/a@b?e=***#***",
            ),
            ("/items/7", "/items/7"),
            ("/items/a#b", "/items/a#***"),
        ] {
            let shown = format!("{:?}", RequestSpec::get(target));
            assert!(shown.contains(&format!("target: {expected:?}")), "{shown}");
        }
    }
}
