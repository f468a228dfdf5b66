//! Following redirects so that credentials stay at their origin: the loop
//! the transports that follow redirects themselves (reqwest's and hyper's)
//! share, and the pure decisions it makes at each hop.
//!
//! A transport gives it a way to send one hop; the loop decides whether the
//! answer is a redirect to follow, where to, with which method, body and
//! headers, and hands back the last answer for the transport to read.

use std::future::Future;

use bytes::Bytes;
use http::header::{
    HeaderValue, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, HOST, LOCATION, TRANSFER_ENCODING,
};
use http::{HeaderMap, Method, StatusCode, Version};

use super::{strip_credentials, url_without_query, without_query, CredentialScope};
use crate::error::{TransportError, TransportErrorKind};

/// Where a hop goes: a `url::Url` (what reqwest takes) or an `http::Uri`
/// (what hyper takes, so a request that is not redirected is never parsed
/// as a URL at all).
pub(super) trait Target: Sized {
    /// As errors may show it: no userinfo, no query.
    fn shown(&self) -> String;
    /// The WHATWG origin, ASCII-serialised; `None` for one that cannot be.
    fn origin(&self) -> Option<String>;
    /// `location` resolved against this target, if it can be followed.
    fn follow(&self, location: &str) -> Result<Self, &'static str>;
}

impl Target for url::Url {
    fn shown(&self) -> String {
        url_without_query(self)
    }

    fn origin(&self) -> Option<String> {
        Some(url::Url::origin(self).ascii_serialization())
    }

    fn follow(&self, location: &str) -> Result<Self, &'static str> {
        match self.join(location) {
            Ok(mut next) if matches!(next.scheme(), "http" | "https") => {
                next.set_fragment(None);
                // What the next request is sent to must be a valid
                // `http::Uri` too (the contract every transport keeps).
                http::Uri::try_from(next.as_str())
                    .map(|_| next)
                    .map_err(|_| "an invalid redirect")
            }
            Ok(_) => Err("a redirect to a scheme other than http or https"),
            Err(_) => Err("an invalid redirect"),
        }
    }
}

impl Target for http::Uri {
    fn shown(&self) -> String {
        without_query(self)
    }

    fn origin(&self) -> Option<String> {
        url::Url::parse(&self.to_string())
            .ok()
            .map(|url| url.origin().ascii_serialization())
    }

    fn follow(&self, location: &str) -> Result<Self, &'static str> {
        let from = url::Url::parse(&self.to_string()).map_err(|_| "an invalid redirect")?;
        let next = from.follow(location)?;
        http::Uri::try_from(next.as_str()).map_err(|_| "an invalid redirect")
    }
}

/// What the loop reads of an answer: its status and where it points.
pub(super) trait Answer {
    fn status(&self) -> StatusCode;
    fn location(&self) -> Option<&HeaderValue>;
}

impl<B> Answer for http::Response<B> {
    fn status(&self) -> StatusCode {
        self.status()
    }

    fn location(&self) -> Option<&HeaderValue> {
        self.headers().get(LOCATION)
    }
}

/// One request of a chain of redirects.
pub(super) struct Hop<U> {
    pub(super) method: Method,
    pub(super) target: U,
    pub(super) headers: HeaderMap,
    pub(super) version: Version,
    pub(super) body: Bytes,
}

/// Sends `hop` with `send`, then each redirect it leads to (at most
/// `max_redirects`; with 0, a redirect is handed back as it is), and
/// returns the last answer with the target it came from.
///
/// On a hop to another origin that `scope` does not trust, every header
/// marked secret and every default header of the client is dropped first.
///
/// # Errors
///
/// What `send` fails with; `InvalidRequest` for a `Location` that cannot
/// be followed; `Other` past `max_redirects`.
pub(super) async fn follow<U, A, F, Fut>(
    mut hop: Hop<U>,
    scope: Option<&CredentialScope>,
    max_redirects: usize,
    mut send: F,
) -> Result<(A, U), TransportError>
where
    U: Target,
    A: Answer,
    F: FnMut(&Hop<U>) -> Fut,
    Fut: Future<Output = Result<A, TransportError>>,
{
    let mut hops = 0;
    loop {
        let answer = send(&hop).await?;
        let status = answer.status();
        if !is_redirect(status) {
            return Ok((answer, hop.target));
        }
        let Some(location) = answer.location() else {
            return Ok((answer, hop.target));
        };
        if hops >= max_redirects {
            if max_redirects == 0 {
                return Ok((answer, hop.target));
            }
            return Err(TransportError::new(
                TransportErrorKind::Other,
                format!(
                    "too many redirects (more than {max_redirects}) from {}",
                    hop.target.shown()
                ),
            ));
        }
        hops += 1;
        let next = location
            .to_str()
            .map_err(|_| "an invalid redirect")
            .and_then(|location| hop.target.follow(location))
            .map_err(|message| {
                TransportError::new(
                    TransportErrorKind::InvalidRequest,
                    format!("{message} from {}", hop.target.shown()),
                )
            })?;
        drop(answer);
        redirect(&mut hop, status, next, scope);
    }
}

fn is_redirect(status: StatusCode) -> bool {
    matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308)
}

/// Turns `hop` into the request a `status` redirect to `next` asks for:
/// a 303 (and a 301 or 302 after a POST) becomes a GET without a body, and
/// credentials are dropped on the way to another origin unless `scope`
/// trusts both the one left and the one reached.
fn redirect<U: Target>(
    hop: &mut Hop<U>,
    status: StatusCode,
    next: U,
    scope: Option<&CredentialScope>,
) {
    if status == StatusCode::SEE_OTHER && hop.method != Method::HEAD
        || matches!(status.as_u16(), 301 | 302) && hop.method == Method::POST
    {
        hop.method = Method::GET;
        hop.body = Bytes::new();
        for name in [
            CONTENT_TYPE,
            CONTENT_LENGTH,
            CONTENT_ENCODING,
            TRANSFER_ENCODING,
        ] {
            hop.headers.remove(name);
        }
    }
    let from = hop.target.origin();
    let to = next.origin();
    let same = to.is_some() && from == to;
    let trusted = |origin: Option<&str>| origin.is_some_and(|o| scope.is_some_and(|s| s.trusts(o)));
    if !same {
        // A `Host` set by hand names the origin left behind; the next one's
        // comes from its URL.
        hop.headers.remove(HOST);
        // Credentials go on only between origins the client trusts: not to
        // an untrusted one, and not from one either, since what a request
        // carries to a third party (its own token there) is not the home
        // origin's to see when the third party sends it home.
        if !trusted(to.as_deref()) || !trusted(from.as_deref()) {
            strip_credentials(&mut hop.headers, scope);
        }
    }
    hop.target = next;
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::AUTHORIZATION;

    #[test]
    fn a_uri_and_a_url_follow_a_location_alike() {
        for (from, location, next) in [
            ("http://127.0.0.1:1/a/b?k=v", "c", "http://127.0.0.1:1/a/c"),
            ("http://127.0.0.1:1/a/b", "/x#frag", "http://127.0.0.1:1/x"),
            (
                "http://127.0.0.1:1/a",
                "http://127.0.0.1:2/y?q",
                "http://127.0.0.1:2/y?q",
            ),
        ] {
            let uri: http::Uri = from.parse().unwrap();
            let url = url::Url::parse(from).unwrap();
            assert_eq!(uri.follow(location).unwrap().to_string(), next);
            assert_eq!(url.follow(location).unwrap().as_str(), next);
        }
        let uri: http::Uri = "http://127.0.0.1:1/a".parse().unwrap();
        assert!(uri.follow("ftp://127.0.0.1/f").is_err());
        assert_eq!(
            uri.origin().as_deref(),
            Some("http://127.0.0.1:1"),
            "the origin, as the URL parser serialises it"
        );
    }

    #[test]
    fn credentials_go_on_only_between_trusted_origins() {
        use std::sync::Arc;
        let scope = CredentialScope {
            home: Arc::from([
                "http://127.0.0.1:1".to_owned(),
                "http://127.0.0.1:2".to_owned(),
            ]),
            defaults: Arc::from([]),
        };
        let hop_from = |from: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer t"));
            Hop {
                method: Method::GET,
                target: from.parse::<http::Uri>().unwrap(),
                headers,
                version: Version::HTTP_11,
                body: Bytes::new(),
            }
        };
        for (from, to, kept) in [
            // Home to a trusted origin: the user's trust covers both.
            ("http://127.0.0.1:1/a", "http://127.0.0.1:2/b", true),
            // Home to a third party: nothing of the user's goes there.
            ("http://127.0.0.1:1/a", "http://127.0.0.1:3/b", false),
            // A third party sending the request home: its token for the
            // third party is not home's to see.
            ("http://127.0.0.1:3/a", "http://127.0.0.1:1/b", false),
        ] {
            let mut hop = hop_from(from);
            redirect(
                &mut hop,
                StatusCode::FOUND,
                to.parse().unwrap(),
                Some(&scope),
            );
            assert_eq!(
                hop.headers.contains_key(AUTHORIZATION),
                kept,
                "{from} -> {to}"
            );
        }
    }

    #[test]
    fn a_see_other_becomes_a_get_and_another_origin_loses_credentials() {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let mut marked = HeaderValue::from_static("s");
        marked.set_sensitive(true);
        headers.insert("x-key", marked);
        headers.insert("x-plain", HeaderValue::from_static("p"));
        headers.insert(HOST, HeaderValue::from_static("127.0.0.1:1"));
        let mut hop = Hop {
            method: Method::POST,
            target: "http://127.0.0.1:1/a".parse::<http::Uri>().unwrap(),
            headers,
            version: Version::HTTP_11,
            body: Bytes::from_static(b"body"),
        };
        let same = "http://127.0.0.1:1/b".parse().unwrap();
        redirect(&mut hop, StatusCode::TEMPORARY_REDIRECT, same, None);
        assert_eq!((hop.method.clone(), hop.body.len()), (Method::POST, 4));
        assert!(hop.headers.contains_key(AUTHORIZATION));
        assert!(hop.headers.contains_key(HOST));
        let away = "http://127.0.0.1:2/c".parse().unwrap();
        redirect(&mut hop, StatusCode::SEE_OTHER, away, None);
        assert_eq!((hop.method.clone(), hop.body.len()), (Method::GET, 0));
        let left: Vec<_> = hop.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-plain"]);
    }
}
