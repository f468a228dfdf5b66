//! The [`Json`] combinator: decodes fetched bodies.

use std::fmt;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures::stream::{FusedStream, Stream};
use pin_project_lite::pin_project;
use serde::de::DeserializeOwned;

use crate::endpoint::Fetched;
use crate::error::FetchError;

/// The output of a fetch operator: `Result<Fetched<T>, E>` where a
/// [`FetchError<T>`] can become an `E`.
pub trait FetchResult {
    /// The input item the response was fetched for.
    type Item;
    /// The error side.
    type Error: From<FetchError<Self::Item>>;
    /// The result itself.
    fn into_result(self) -> Result<Fetched<Self::Item>, Self::Error>;
}

impl<T, E: From<FetchError<T>>> FetchResult for Result<Fetched<T>, E> {
    type Item = T;
    type Error = E;
    fn into_result(self) -> Self {
        self
    }
}

// The decoded value and the markers the attempt loop leaves on a response
// live in `crate::body`, beneath both this operator and the loop; named here
// too so that this operator's public API and the crate paths stay as they were.
pub use crate::body::Decoded;

pin_project! {
    /// Stream for [`SluiceExt::json`](crate::SluiceExt::json).
    ///
    /// # Cancel safety
    ///
    /// Holds nothing between polls: each result is decoded in the poll
    /// that takes it from the inner stream, so dropping this stream (or a
    /// `next()` future) loses no item the inner stream did not already
    /// hold.
    ///
    /// # Panics
    ///
    /// Never on a body, however malformed: a body that does not decode is
    /// an error item carrying its input item.
    #[must_use = "streams do nothing unless polled"]
    pub struct Json<S, U> {
        #[pin]
        stream: S,
        _value: PhantomData<fn() -> U>,
    }
}

impl<S, U> Json<S, U> {
    pub(crate) fn new(stream: S) -> Self {
        Self {
            stream,
            _value: PhantomData,
        }
    }

    /// The inner stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The inner stream, mutably. Items taken from it directly do not pass
    /// through this combinator.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// The inner stream, pinned. Items taken from it directly do not pass
    /// through this combinator.
    pub fn get_pin_mut(self: Pin<&mut Self>) -> Pin<&mut S> {
        self.project().stream
    }

    /// The inner stream. Nothing is buffered here, so nothing is lost.
    pub fn into_inner(self) -> S {
        self.stream
    }
}

impl<S, U> Stream for Json<S, U>
where
    S: Stream,
    S::Item: FetchResult,
    U: DeserializeOwned + Send + 'static,
{
    type Item = Result<Decoded<<S::Item as FetchResult>::Item, U>, <S::Item as FetchResult>::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let next = ready!(self.project().stream.poll_next(cx));
        Poll::Ready(next.map(|r| {
            r.into_result()
                .and_then(|f| Fetched::json(f).map_err(Into::into))
        }))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.stream.size_hint()
    }
}

impl<S, U> FusedStream for Json<S, U>
where
    S: FusedStream,
    S::Item: FetchResult,
    U: DeserializeOwned + Send + 'static,
{
    fn is_terminated(&self) -> bool {
        self.stream.is_terminated()
    }
}

impl<S: fmt::Debug, U> fmt::Debug for Json<S, U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Json")
            .field("stream", &self.stream)
            .field("into", &std::any::type_name::<U>())
            .finish()
    }
}
