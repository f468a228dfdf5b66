//! The [`Transport`] trait: the one place a request leaves the process.
//!
//! Everything above this trait (limits, pauses, retries, timeouts) is the
//! same for every transport, so a pipeline tested on [`MockTransport`](mock::MockTransport) in
//! virtual time behaves the same on `ReqwestTransport` over real sockets.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::header::HeaderName;
use http::{Request, Response};

use crate::error::TransportError;

#[cfg(any(feature = "reqwest", feature = "tower", feature = "hyper-transport"))]
mod body;
#[cfg(any(feature = "tower", feature = "hyper-transport"))]
mod classify;
#[cfg(feature = "hyper-transport")]
mod hyper;
pub mod mock;
#[cfg(feature = "hyper-transport")]
mod proxy;
#[cfg(any(feature = "reqwest", feature = "hyper-transport"))]
mod redirect;
#[cfg(feature = "reqwest")]
mod reqwest;
#[cfg(feature = "tower")]
mod tower;

#[cfg(feature = "hyper-transport")]
pub use self::hyper::HyperTransport;
#[cfg(feature = "reqwest")]
pub use self::reqwest::ReqwestTransport;
#[cfg(feature = "tower")]
pub use self::tower::TowerTransport;

/// Sends one request and returns its whole response.
///
/// The trait is object safe: a [`Client`](crate::Client) keeps its transport
/// as `Arc<dyn Transport>`, so clients with different transports have one
/// type, and the returned future is `'static` so the fetch operators can keep
/// driving it from a background task while the consumer is busy.
///
/// # Example
///
/// A transport that answers everything with `204 No Content`:
///
/// ```
/// use bytes::Bytes;
/// use futures::future::BoxFuture;
/// use sluicegate::{Transport, TransportError};
///
/// struct NoContent;
///
/// impl Transport for NoContent {
///     fn send(
///         &self,
///         _request: http::Request<Bytes>,
///     ) -> BoxFuture<'static, Result<http::Response<Bytes>, TransportError>> {
///         Box::pin(async {
///             Ok(http::Response::builder().status(204).body(Bytes::new()).unwrap())
///         })
///     }
/// }
/// ```
pub trait Transport: Send + Sync + 'static {
    /// Sends `request` and reads the whole response body.
    ///
    /// # Errors
    ///
    /// A [`TransportError`] when no complete response could be had: no
    /// connection, a reset, a timeout inside the transport, a body over the
    /// cap. A response with an error status is *not* an error here.
    fn send(
        &self,
        request: Request<Bytes>,
    ) -> BoxFuture<'static, Result<Response<Bytes>, TransportError>>;

    /// Sends a request the client prepared, with what the client worked
    /// out for it beside it (see [`Prepared`]), not in the request's
    /// extensions: putting it there costs three allocations per request,
    /// for a transport that may never read it.
    ///
    /// Hidden: a transport of yours implements [`send`](Self::send) only,
    /// and this default hands it the request with [`Prepared`] in its
    /// extensions, where a reqwest transport it wraps still finds the
    /// credential scope (so a client's default headers never follow a
    /// redirect to another origin, whatever sits in between). Only this
    /// crate's own transports override it.
    #[doc(hidden)]
    fn send_prepared(
        &self,
        mut request: Request<Bytes>,
        prepared: Prepared,
    ) -> BoxFuture<'static, Result<Response<Bytes>, TransportError>> {
        request.extensions_mut().insert(prepared);
        self.send(request)
    }

    /// Whether this transport reads the `url::Url` the client parsed while
    /// preparing a request, handed beside it in [`Prepared`], so the URL
    /// is not rendered and parsed again (reqwest's transport does).
    ///
    /// Hidden: the URL is handed in a type of this crate's own, so a
    /// transport of yours has no use for it. The client parses the URL for
    /// the transports that say yes and for no other: on a mock or a tower
    /// stack it would be work for nothing. (The credential scope beside it
    /// goes with every request, whatever the transport says.)
    #[doc(hidden)]
    fn wants_parsed_url(&self) -> bool {
        false
    }
}

// Pins the decision that `Transport` stays object safe.
const _: Option<&dyn Transport> = None;

/// Tells the transport which headers are the client's credentials and
/// where they may go, so a redirect to another origin can drop them. Part
/// of [`Prepared`]; it is part of what a transport is given, so it lives on
/// this floor. A client keeps one, shared by all its requests.
#[derive(Debug, Clone)]
pub(crate) struct CredentialScope {
    /// Origins (ASCII serialisation) the default headers may go to; empty
    /// when there is no base URL and nothing is trusted.
    pub(crate) home: Arc<[String]>,
    /// The names of the client's default headers.
    pub(crate) defaults: Arc<[HeaderName]>,
}

/// What the client worked out for a request, handed to the transport beside
/// it ([`Transport::send_prepared`]): the credential scope, and the URL the
/// client parsed (WHATWG) while preparing it, for a transport that
/// [wants it](Transport::wants_parsed_url), so a transport that needs a
/// `url::Url` (reqwest's) does not render and parse the URI again. A
/// transport must check the URL still names the request's URI before using
/// it: a layer between the client and the transport may have changed the
/// URI.
///
/// Public only to appear in [`Transport::send_prepared`]; nothing outside
/// this crate can make one or read it. Two pointers, so that it adds little
/// to the future every item keeps.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct Prepared {
    #[cfg_attr(
        not(any(feature = "reqwest", feature = "hyper-transport")),
        allow(dead_code)
    )]
    pub(crate) scope: Arc<CredentialScope>,
    /// Only for a transport that [wants it](Transport::wants_parsed_url).
    #[cfg_attr(not(feature = "reqwest"), allow(dead_code))]
    pub(crate) url: Option<Box<url::Url>>,
}

/// Removes every credential a request carries, for a hop to an origin it
/// was not meant for: every header marked secret, the client's default
/// headers (`scope`'s), and the standard credential headers. One rule for
/// redirects and for next links.
pub(crate) fn strip_credentials(headers: &mut http::HeaderMap, scope: Option<&CredentialScope>) {
    use http::header::{AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION};
    let secret: Vec<HeaderName> = headers
        .iter()
        .filter(|(_, value)| value.is_sensitive())
        .map(|(name, _)| name.clone())
        .collect();
    let defaults = scope.map_or(&[][..], |s| &s.defaults[..]);
    for name in secret
        .iter()
        .chain(defaults)
        .chain(&[AUTHORIZATION, PROXY_AUTHORIZATION, COOKIE])
    {
        headers.remove(name);
    }
}

impl CredentialScope {
    /// Whether the credentials may follow a redirect to `origin`.
    #[cfg_attr(
        not(any(feature = "reqwest", feature = "hyper-transport")),
        allow(dead_code)
    )]
    pub(crate) fn trusts(&self, origin: &str) -> bool {
        self.home.iter().any(|h| h == origin)
    }
}

/// A URI as errors and logs may show it: scheme, host, port and path,
/// never the userinfo or the query (which often carry keys).
pub(crate) fn without_query(uri: &http::Uri) -> String {
    shown(
        uri.scheme_str(),
        uri.authority().map(|a| a.as_str()),
        uri.path(),
    )
}

/// [`without_query`] for a `url::Url`.
#[cfg_attr(
    not(any(feature = "reqwest", feature = "hyper-transport")),
    allow(dead_code)
)]
pub(crate) fn url_without_query(url: &url::Url) -> String {
    use url::Position;
    shown(
        Some(url.scheme()),
        Some(&url[Position::BeforeUsername..Position::AfterPort]),
        url.path(),
    )
}

/// `scheme://host:port/path`, with no userinfo even if the authority has
/// one (it is a password, or a token in its place).
fn shown(scheme: Option<&str>, authority: Option<&str>, path: &str) -> String {
    match (scheme, authority) {
        (Some(scheme), Some(authority)) => {
            let host = authority
                .rsplit_once('@')
                .map_or(authority, |(_, host)| host);
            format!("{scheme}://{host}{path}")
        }
        _ => path.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_shown_without_userinfo_or_query() {
        let raw = "http://user:hunter2@h.example:8080/a/b?key=SECRET#f";
        let uri: http::Uri = raw.parse().unwrap();
        assert_eq!(without_query(&uri), "http://h.example:8080/a/b");
        let url = url::Url::parse(raw).unwrap();
        assert_eq!(url_without_query(&url), "http://h.example:8080/a/b");
        let token_only = url::Url::parse("https://TOKEN@h/p").unwrap();
        assert_eq!(url_without_query(&token_only), "https://h/p");
        assert_eq!(without_query(&"/p?k=v".parse().unwrap()), "/p");
    }
}
