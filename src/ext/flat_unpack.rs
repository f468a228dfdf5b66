//! The [`FlatUnpack`] combinator: a JSON array body becomes its elements.
//!
//! Decoding copies nothing it does not have to. The common case (every
//! element decodes) is one `serde_json::from_slice::<Vec<T>>` over the body,
//! exactly what a hand-written loop does. Only when that fails is the body
//! walked again to tell a malformed body from a bad element: the elements
//! are then located as byte ranges of the body (no copy) and decoded one at
//! a time, so one bad element becomes one error item and the rest go on.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures::stream::{FusedStream, Stream};
use pin_project_lite::pin_project;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use super::json::FetchResult;
use crate::endpoint::Fetched;
use crate::error::{FetchError, FetchErrorKind};

// `Element` and JSON pointer location live in `crate::body`, beneath this
// operator and the ETL sources that also find values by pointer; named here
// too so that this operator's public API and the crate paths stay as they were.
use crate::body::locate;
pub use crate::body::Element;

/// The elements of one page still to be yielded, with the page's item.
struct Page<S, T> {
    source: S,
    elements: Elements<T>,
}

enum Elements<T> {
    /// Every element decoded in one pass.
    Decoded(std::iter::Enumerate<std::vec::IntoIter<T>>),
    /// Some element did not decode: each is decoded alone from its range.
    Ranges(
        Bytes,
        std::iter::Enumerate<std::vec::IntoIter<Range<usize>>>,
    ),
}

impl<T> Elements<T> {
    fn len(&self) -> usize {
        match self {
            Self::Decoded(elements) => elements.len(),
            Self::Ranges(_, ranges) => ranges.len(),
        }
    }
}

pin_project! {
    /// Stream for [`SluiceExt::flat_unpack`](crate::SluiceExt::flat_unpack)
    /// and its variants.
    ///
    /// # Cancel safety
    ///
    /// A page is taken from the inner stream whole and its elements are
    /// yielded one per poll: dropping this stream part way through a page
    /// drops the elements not yet yielded. Dropping a `next()` future
    /// between polls loses nothing.
    ///
    /// # Panics
    ///
    /// Never on a body, however malformed: a body that is not a JSON array
    /// (at the pointer), and each element that does not decode, is an error
    /// item carrying the page's input item.
    #[must_use = "streams do nothing unless polled"]
    pub struct FlatUnpack<St, T, Out>
    where
        St: Stream,
        St::Item: FetchResult,
    {
        #[pin]
        stream: St,
        pointer: String,
        page: Option<Page<<St::Item as FetchResult>::Item, T>>,
        emit: fn(&<St::Item as FetchResult>::Item, usize, T) -> Out,
        _out: PhantomData<fn() -> Out>,
    }
}

impl<St, T, Out> FlatUnpack<St, T, Out>
where
    St: Stream,
    St::Item: FetchResult,
{
    pub(crate) fn new(
        stream: St,
        pointer: &str,
        emit: fn(&<St::Item as FetchResult>::Item, usize, T) -> Out,
    ) -> Self {
        Self {
            stream,
            pointer: pointer.to_owned(),
            page: None,
            emit,
            _out: PhantomData,
        }
    }

    /// The inner stream.
    pub fn get_ref(&self) -> &St {
        &self.stream
    }

    /// The inner stream, mutably. Items taken from it directly do not pass
    /// through this combinator.
    pub fn get_mut(&mut self) -> &mut St {
        &mut self.stream
    }

    /// The inner stream, pinned. Items taken from it directly do not pass
    /// through this combinator.
    pub fn get_pin_mut(self: Pin<&mut Self>) -> Pin<&mut St> {
        self.project().stream
    }

    /// The inner stream. The elements of a page already taken from it and not yet
    /// yielded are dropped (as `futures::stream::Flatten` would drop its
    /// current inner stream).
    pub fn into_inner(self) -> St {
        self.stream
    }
}

type Source<St> = <<St as Stream>::Item as FetchResult>::Item;
type Failure<St> = <<St as Stream>::Item as FetchResult>::Error;

impl<St, T, Out> Stream for FlatUnpack<St, T, Out>
where
    St: Stream,
    St::Item: FetchResult,
    Source<St>: Clone,
    T: DeserializeOwned,
{
    type Item = Result<Out, Failure<St>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        loop {
            if let Some(page) = this.page.as_mut() {
                if let Some(next) = next_element(page, *this.emit) {
                    return Poll::Ready(Some(next.map_err(Into::into)));
                }
                *this.page = None;
            }
            let Some(result) = ready!(this.stream.as_mut().poll_next(cx)) else {
                return Poll::Ready(None);
            };
            match result.into_result() {
                Ok(fetched) => match unpack(fetched, this.pointer) {
                    Ok(page) => *this.page = Some(page),
                    Err(e) => return Poll::Ready(Some(Err(e.into()))),
                },
                Err(upstream) => return Poll::Ready(Some(Err(upstream))),
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let pending = self.page.as_ref().map_or(0, |page| page.elements.len());
        // Each upstream page may hold any number of elements.
        let (_, high) = self.stream.size_hint();
        (pending, if high == Some(0) { Some(pending) } else { None })
    }
}

impl<St, T, Out> FusedStream for FlatUnpack<St, T, Out>
where
    St: FusedStream,
    St::Item: FetchResult,
    Source<St>: Clone,
    T: DeserializeOwned,
{
    fn is_terminated(&self) -> bool {
        self.page.is_none() && self.stream.is_terminated()
    }
}

impl<St, T, Out> fmt::Debug for FlatUnpack<St, T, Out>
where
    St: Stream + fmt::Debug,
    St::Item: FetchResult,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlatUnpack")
            .field("stream", &self.stream)
            .field("pointer", &self.pointer)
            .field("into", &std::any::type_name::<T>())
            .finish_non_exhaustive()
    }
}

fn next_element<S: Clone, T: DeserializeOwned, Out>(
    page: &mut Page<S, T>,
    emit: fn(&S, usize, T) -> Out,
) -> Option<Result<Out, FetchError<S>>> {
    let source = &page.source;
    match &mut page.elements {
        Elements::Decoded(elements) => elements.next().map(|(i, value)| Ok(emit(source, i, value))),
        Elements::Ranges(body, ranges) => ranges.next().map(|(i, range)| {
            serde_json::from_slice(&body[range])
                .map(|value| emit(source, i, value))
                .map_err(|e| {
                    FetchError::new(source.clone(), FetchErrorKind::Decode)
                        .with_detail(format!("element {i} does not decode: {e}"))
                        .with_source(e)
                })
        }),
    }
}

/// Turns a fetched page into its elements, or one error for the page.
fn unpack<S, T: DeserializeOwned>(
    fetched: Fetched<S>,
    pointer: &str,
) -> Result<Page<S, T>, FetchError<S>> {
    match elements(fetched.response.body(), pointer) {
        Ok(elements) => Ok(Page {
            source: fetched.item,
            elements,
        }),
        Err(detail) => Err(FetchError::new(fetched.item, FetchErrorKind::Decode)
            .with_attempts(fetched.attempts, fetched.elapsed)
            .with_detail(detail)
            .with_response(fetched.response)),
    }
}

fn elements<T: DeserializeOwned>(body: &Bytes, pointer: &str) -> Result<Elements<T>, String> {
    // At the root there is nothing to find: the one decoding pass below
    // also validates the body.
    let range = if pointer.is_empty() {
        0..body.len()
    } else {
        locate(body, pointer)?
    };
    let array = &body[range];
    if let Ok(all) = serde_json::from_slice::<Vec<T>>(array) {
        return Ok(Elements::Decoded(all.into_iter().enumerate()));
    }
    let raw: Vec<&RawValue> =
        serde_json::from_slice(array).map_err(|_| describe_non_array(array))?;
    let base = body.as_ptr() as usize;
    let ranges: Vec<Range<usize>> = raw
        .iter()
        .map(|element| {
            let start = element.get().as_ptr() as usize - base;
            start..start + element.get().len()
        })
        .collect();
    Ok(Elements::Ranges(
        body.clone(),
        ranges.into_iter().enumerate(),
    ))
}

fn describe_non_array(json: &[u8]) -> String {
    match serde_json::from_slice::<&RawValue>(json) {
        Ok(raw) => {
            let kind = match raw.get().as_bytes().first() {
                Some(b'{') => "an object",
                Some(b'"') => "a string",
                Some(b't' | b'f') => "a boolean",
                Some(b'n') => "null",
                _ => "a number",
            };
            format!("expected a JSON array, found {kind}")
        }
        Err(e) => format!("malformed JSON: {e}"),
    }
}
