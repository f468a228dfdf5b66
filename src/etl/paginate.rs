//! [`paginate`]: a source that walks an API's pages.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::stream::{self, Stream, StreamExt as _};
use http::header::LINK;
use http::HeaderMap;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::body::locate;
use crate::client::Client;
use crate::endpoint::{Endpoint, Fetched};
use crate::error::{FetchError, FetchErrorKind};
use crate::policy::{Policy, Sealed, WithPolicy};
use crate::request::{shown_target, RequestSpec};
use crate::task::Task;

/// Which page to fetch: its number (from 1) and what identifies it.
///
/// # What is shown of it
///
/// A next link's URL often carries the API key again
/// (`</items?api_key=...&page=2>`). The token keeps it whole, to send and
/// to retry in the process ([`FetchError::into_item`]), but every form of
/// it that leaves the process hides it: `Debug`, `Serialize` (so a dead
/// letter, a journal's key and
/// [`Failure::item_json`](crate::Failure::item_json)) and error details
/// show a URL token with its userinfo masked and its query values as
/// `***`, as [`BuiltRequest`](crate::BuiltRequest)'s `Debug` shows a URI:
/// `{"number":2,"token":"http://h/items?api_key=***&page=***"}`. Always,
/// whatever [`log_query`](crate::ClientBuilder::log_query) says: that
/// option shows queries in logs, and a `PageRef` is shown without its
/// client.
///
/// The price: a dead letter of a link-mode page names the page (its
/// number, the link's host, path and query names) but cannot be replayed
/// from the file alone, since the link's values are gone. Walk the listing
/// again from its first page instead: the server hands the links out again.
/// A key written to a file for the sake of a replay would be the leak this
/// avoids.
///
/// A cursor (cursor mode) and a page number (page mode) are shown as they
/// are: a cursor is the server's opaque mark of a place in the listing, not
/// a credential, and resuming a walk needs it. A cursor that is a URL is
/// shown as a link is.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PageRef {
    /// 1 for the first page.
    pub number: u64,
    /// The URL followed (link mode), the cursor sent (cursor mode), or the
    /// page number sent (page mode); empty for the first page. Kept whole;
    /// shown without a URL's query values (see above).
    pub token: String,
}

impl PageRef {
    /// The token as it may be shown outside the process (see the type's
    /// documentation).
    fn shown_token(&self) -> Cow<'_, str> {
        if self.token.contains("://") {
            Cow::Owned(shown_target(&self.token))
        } else {
            Cow::Borrowed(&self.token)
        }
    }
}

impl fmt::Debug for PageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageRef")
            .field("number", &self.number)
            .field("token", &self.shown_token())
            .finish()
    }
}

impl Serialize for PageRef {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut page = serializer.serialize_struct("PageRef", 2)?;
        page.serialize_field("number", &self.number)?;
        page.serialize_field("token", &self.shown_token())?;
        page.end()
    }
}

/// How to find the next page.
#[derive(Debug, Clone)]
#[must_use = "a Pagination does nothing until given to paginate"]
pub enum Pagination {
    /// Follow `Link: <url>; rel="next"` until a page has none.
    LinkHeader,
    /// Read the next cursor at a JSON pointer in the body and send it as a
    /// query parameter, until the cursor is missing, null or empty.
    Cursor {
        /// Where the next cursor is in the body, e.g. `"/next_cursor"`.
        pointer: String,
        /// The query parameter that carries it.
        param: String,
    },
    /// Send page numbers 1, 2, 3... as a query parameter until a page's
    /// array (at a JSON pointer, `""` for the whole body) is empty.
    PageNumber {
        /// The query parameter that carries the number.
        param: String,
        /// Where the page's items are.
        items: String,
    },
}

impl Pagination {
    /// Follows `Link` headers.
    pub fn link_header() -> Self {
        Self::LinkHeader
    }

    /// Follows a cursor found at `pointer`, sent as `?param=`.
    pub fn cursor(pointer: &str, param: &str) -> Self {
        Self::Cursor {
            pointer: pointer.to_owned(),
            param: param.to_owned(),
        }
    }

    /// Counts pages as `?param=1, 2, ...` until the array at `items` is empty.
    pub fn page_number(param: &str, items: &str) -> Self {
        Self::PageNumber {
            param: param.to_owned(),
            items: items.to_owned(),
        }
    }
}

type Pages =
    Pin<Box<dyn Stream<Item = Result<Fetched<PageRef>, FetchError<PageRef>>> + Send + Sync>>;

/// Stream returned by [`paginate`]: each page as a fetch result, ready for
/// [`flat_unpack_at`](crate::SluiceExt::flat_unpack_at).
#[must_use = "streams do nothing unless polled"]
pub struct Paginate {
    endpoint: Option<Endpoint<PageRef>>,
    how: Pagination,
    max_pages: u64,
    pages: Option<Pages>,
}

impl fmt::Debug for Paginate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Paginate")
            .field("how", &self.how)
            .field("max_pages", &self.max_pages)
            .finish_non_exhaustive()
    }
}

/// Walks the pages of a listing, starting with `first`.
///
/// Every page is fetched through the client like any other request: it
/// waits for the pause and a rate token, and retries as the client's rules
/// (and [`Paginate::retry_on`]) say. A failed page ends the walk with its
/// error. Following a next link (or cursor) already seen ends it with a
/// [`PaginationLoop`](FetchErrorKind::PaginationLoop) error instead of
/// going round for ever.
///
/// ```
/// use futures::StreamExt;
/// use sluicegate::etl::{paginate, Pagination};
/// use sluicegate::mock::{MockResponse, MockTransport, Route};
/// use sluicegate::{Client, SluiceExt};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let mock = MockTransport::new();
/// mock.mount(Route::get("/users").respond_with(|r| match r.query("cursor").as_deref() {
///     None => MockResponse::json(&serde_json::json!({ "users": [1, 2], "next": "abc" })),
///     Some("abc") => MockResponse::json(&serde_json::json!({ "users": [3], "next": null })),
///     Some(_) => MockResponse::status(400),
/// }));
/// let client = Client::builder().transport(mock).base_url("http://mock").build().unwrap();
///
/// let users: Vec<u64> = paginate(&client, "/users", Pagination::cursor("/next", "cursor"))
///     .flat_unpack_at::<u64>("/users")
///     .map(Result::unwrap)
///     .collect()
///     .await;
/// assert_eq!(users, [1, 2, 3]);
/// # }
/// ```
pub fn paginate(client: &Client, first: impl Into<RequestSpec>, how: Pagination) -> Paginate {
    let first = first.into();
    let endpoint = {
        let how = how.clone();
        client.request(move |page: &PageRef| spec_for(&first, &how, page))
    };
    Paginate {
        endpoint: Some(endpoint),
        how,
        max_pages: u64::MAX,
        pages: None,
    }
}

impl Sealed for Paginate {}

/// Rules, timeouts and limits for the page requests, before the client's
/// (see [`WithPolicy`]).
///
/// # Panics
///
/// Each method panics if called after the stream has started: a rule added
/// once pages are being fetched would apply to some of them only.
impl WithPolicy for Paginate {
    #[track_caller]
    fn map_policy(mut self, change: impl FnOnce(&mut Policy)) -> Self {
        assert!(
            self.pages.is_none(),
            "configure a paginator before polling it: a rule added once pages are being \
             fetched would apply to some of them only"
        );
        self.endpoint = self.endpoint.take().map(|e| e.map_policy(change));
        self
    }
}

impl Paginate {
    /// Stops after `n` pages.
    ///
    /// # Panics
    ///
    /// If called after the stream has started.
    #[track_caller]
    pub fn max_pages(mut self, n: u64) -> Self {
        assert!(
            self.pages.is_none(),
            "configure a paginator before polling it: max_pages would be ignored"
        );
        self.max_pages = n;
        self
    }

    fn start(&mut self) -> &mut Pages {
        let endpoint = self.endpoint.take().expect("paginator started once");
        let how = self.how.clone();
        let max_pages = self.max_pages;
        let first = PageRef {
            number: 1,
            token: String::new(),
        };
        let walk = Walk::Next(first, HashSet::from([String::new()]));
        self.pages
            .get_or_insert(Box::pin(stream::unfold(walk, move |walk| {
                let endpoint = endpoint.clone();
                let how = how.clone();
                async move {
                    let (page, mut seen) = match walk {
                        Walk::Next(page, seen) if page.number <= max_pages => (page, seen),
                        Walk::Next(..) | Walk::Done => return None,
                        Walk::Fail(e) => return Some((Err(e), Walk::Done)),
                    };
                    // The URL this page was asked at, to resolve relative links.
                    let base = endpoint
                        .build_request(&page)
                        .map(|r| r.uri().to_string())
                        .ok();
                    if let (Pagination::LinkHeader, Some(url)) = (&how, &base) {
                        // Links are compared as absolute URLs, the first page's too.
                        seen.insert(url.clone());
                    }
                    // The page's request runs as its own task: once asked
                    // for, it keeps moving (in a shared limiter's line, in
                    // retries and pauses) whether or not this stream is polled.
                    let fetch = Task::spawn(async move { endpoint.fetch(page).await });
                    let fetched = match fetch.await {
                        Ok(fetched) => fetched,
                        Err(e) => return Some((Err(e), Walk::Done)),
                    };
                    let walk = match next_page(&how, &fetched, base.as_deref()) {
                        None => Walk::Done,
                        Some(next) if !seen.insert(next.token.clone()) => {
                            // Shown as the page is shown: the link's
                            // query may hold the key.
                            let detail = format!(
                                "page {} leads back to {:?}",
                                fetched.item.number,
                                next.shown_token()
                            );
                            Walk::Fail(
                                FetchError::new(next, FetchErrorKind::PaginationLoop)
                                    .with_detail(detail),
                            )
                        }
                        Some(next) => Walk::Next(next, seen),
                    };
                    Some((Ok(fetched), walk))
                }
            })))
    }
}

/// Where the walk stands between two pages.
enum Walk {
    /// Fetch this page next; the set holds every token seen so far.
    Next(PageRef, HashSet<String>),
    /// The last page led back to an earlier one: report it, then stop.
    Fail(FetchError<PageRef>),
    Done,
}

impl Stream for Paginate {
    type Item = Result<Fetched<PageRef>, FetchError<PageRef>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let pages = match self.pages {
            Some(ref mut pages) => pages,
            None => self.start(),
        };
        pages.poll_next_unpin(cx)
    }
}

/// The request for `page`: the first request, moved to the page.
fn spec_for(first: &RequestSpec, how: &Pagination, page: &PageRef) -> RequestSpec {
    let mut spec = first.clone();
    if page.number == 1 {
        if let Pagination::PageNumber { param, .. } = how {
            spec = spec.query(param, 1);
        }
        return spec;
    }
    match how {
        Pagination::LinkHeader => {
            // The link is a whole URL, query included. It came from a
            // server: it must keep the listing's origin (the client checks).
            spec.link_from = Some(first.target.clone());
            spec.target.clone_from(&page.token);
            spec.query.clear();
            spec
        }
        Pagination::Cursor { param, .. } => spec.query(param, &page.token),
        Pagination::PageNumber { param, .. } => spec.query(param, page.number),
    }
}

/// The page after `fetched`, if there is one.
fn next_page(how: &Pagination, fetched: &Fetched<PageRef>, base: Option<&str>) -> Option<PageRef> {
    let number = fetched.item.number + 1;
    let token = match how {
        Pagination::LinkHeader => {
            let link = next_link(fetched.response.headers())?;
            match base.and_then(|b| url::Url::parse(b).ok()) {
                Some(base) => base.join(&link).ok()?.to_string(),
                None => link,
            }
        }
        Pagination::Cursor { pointer, .. } => {
            let body = fetched.response.body();
            let raw: &RawValue = serde_json::from_slice(&body[locate(body, pointer).ok()?]).ok()?;
            match serde_json::from_str::<serde_json::Value>(raw.get()).ok()? {
                serde_json::Value::String(s) if !s.is_empty() => s,
                serde_json::Value::Number(n) => n.to_string(),
                _ => return None,
            }
        }
        Pagination::PageNumber { items, .. } => {
            let body = fetched.response.body();
            let list: Vec<&RawValue> =
                serde_json::from_slice(&body[locate(body, items).ok()?]).ok()?;
            if list.is_empty() {
                return None;
            }
            number.to_string()
        }
    };
    Some(PageRef { number, token })
}

/// The target of the first `rel="next"` link in `Link` headers (RFC 8288).
fn next_link(headers: &HeaderMap) -> Option<String> {
    for value in headers.get_all(LINK) {
        let mut rest = value.to_str().ok()?;
        while let Some(open) = rest.find('<') {
            let close = open + rest[open..].find('>')?;
            let target = &rest[open + 1..close];
            let params_end = rest[close..].find(",").map_or(rest.len(), |i| close + i);
            let params = &rest[close + 1..params_end];
            let is_next = params.split(';').any(|p| {
                let Some((name, value)) = p.split_once('=') else {
                    return false;
                };
                name.trim().eq_ignore_ascii_case("rel")
                    && value
                        .trim()
                        .trim_matches('"')
                        .split_ascii_whitespace()
                        .any(|rel| rel.eq_ignore_ascii_case("next"))
            });
            if is_next {
                return Some(target.to_owned());
            }
            rest = &rest[params_end..];
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn links(value: &'static str) -> Option<String> {
        let mut headers = HeaderMap::new();
        headers.insert(LINK, HeaderValue::from_static(value));
        next_link(&headers)
    }

    #[test]
    fn finds_the_next_link_among_others() {
        assert_eq!(
            links(
                r#"<https://api.test/x?page=1>; rel="prev", <https://api.test/x?page=3&a=b,c>; rel="next""#
            ),
            Some("https://api.test/x?page=3&a=b,c".into())
        );
        assert_eq!(
            links(r#"</x?page=2>; title="n"; rel="last next""#),
            Some("/x?page=2".into())
        );
        assert_eq!(links(r#"</x?page=9>; rel="last""#), None);
        assert_eq!(links("garbage"), None);
    }
}
