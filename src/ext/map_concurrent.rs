//! The [`MapConcurrent`] combinator: one [`Step`] per item, at most `n`
//! outstanding, with the flow control of a fetch stage. Each item runs on
//! the stage's driver tasks (see [`concurrent`](super::concurrent)).

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::stream::{FusedStream, Stream};
use pin_project_lite::pin_project;

use super::concurrent::{Concurrent, StageInput, Work};
use crate::body::Decoded;
use crate::error::{BoxError, FetchError};
use crate::step::Step;

impl<T, U, E> Work<T> for Step<T, U, E>
where
    T: Clone + Send + Sync + 'static,
    U: Send + 'static,
    E: Into<BoxError> + Send + 'static,
{
    type Output = Decoded<T, U>;

    fn run(
        self: Arc<Self>,
        item: T,
        index: u64,
    ) -> impl std::future::Future<Output = Result<Decoded<T, U>, FetchError<T>>> + Send + 'static
    {
        // The item's future itself: no wrapper keeping the item again.
        Step::run_indexed(self, item, index)
    }
}

pin_project! {
    /// Stream for [`SluiceExt::map_concurrent`](crate::SluiceExt::map_concurrent)
    /// and [`SluiceExt::try_map_concurrent`](crate::SluiceExt::try_map_concurrent).
    #[must_use = "streams do nothing unless polled"]
    pub struct MapConcurrent<S, A, U, E>
    where
        S: Stream,
        A: StageInput<S::Item>,
        A::Item: Clone,
        A::Item: Sync,
        U: Send,
        U: 'static,
        E: Into<BoxError>,
        E: Send,
        E: 'static,
    {
        #[pin]
        inner: Concurrent<S, A, Step<A::Item, U, E>>,
    }
}

impl<S, A, U, E> MapConcurrent<S, A, U, E>
where
    S: Stream,
    A: StageInput<S::Item>,
    A::Item: Clone + Sync,
    U: Send + 'static,
    E: Into<BoxError> + Send + 'static,
{
    pub(crate) fn new(stream: S, limit: usize, step: Step<A::Item, U, E>) -> Self {
        Self {
            inner: Concurrent::new(stream, limit, step),
        }
    }

    /// Yields results in input order. A slow item then holds back those
    /// after it (but never more than `n` are outstanding).
    ///
    /// # Panics
    ///
    /// If called after the stream was first polled.
    #[track_caller]
    pub fn ordered(mut self) -> Self {
        self.inner.assert_not_started("MapConcurrent", "ordered");
        self.inner.ordered = true;
        self
    }

    /// How many items are outstanding: taken from upstream, output not yet
    /// yielded.
    pub fn outstanding(&self) -> usize {
        self.inner.outstanding
    }

    /// The upstream stream.
    pub fn get_ref(&self) -> &S {
        self.inner.stream_ref()
    }

    /// The upstream stream, giving up the stage: items in flight are
    /// cancelled and their outputs lost.
    pub fn into_inner(self) -> S {
        self.inner.into_stream()
    }
}

impl<S, A, U, E> Stream for MapConcurrent<S, A, U, E>
where
    S: Stream,
    A: StageInput<S::Item>,
    A::Item: Clone + Sync,
    U: Send + 'static,
    E: Into<BoxError> + Send + 'static,
{
    type Item = Result<Decoded<A::Item, U>, A::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.project().inner.poll_next(cx)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

impl<S, A, U, E> FusedStream for MapConcurrent<S, A, U, E>
where
    S: Stream,
    A: StageInput<S::Item>,
    A::Item: Clone + Sync,
    U: Send + 'static,
    E: Into<BoxError> + Send + 'static,
{
    fn is_terminated(&self) -> bool {
        self.inner.is_terminated()
    }
}

impl<S, A, U, E> fmt::Debug for MapConcurrent<S, A, U, E>
where
    S: Stream + fmt::Debug,
    A: StageInput<S::Item>,
    A::Item: Clone + Sync,
    U: Send + 'static,
    E: Into<BoxError> + Send + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MapConcurrent")
            .field("inner", &self.inner)
            .finish()
    }
}
