//! The [`FetchConcurrent`] combinator: one request per item, at most `n`
//! outstanding. Each item runs on the stage's driver tasks (see
//! [`concurrent`](super::concurrent) for why, and what it costs).

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::stream::{FusedStream, Stream};
use pin_project_lite::pin_project;

use super::concurrent::{Concurrent, StageInput, Work};
use crate::endpoint::{Endpoint, Fetched};
use crate::error::FetchError;
use crate::policy::{Policy, Sealed, WithPolicy};

impl<T: Send + 'static> Work<T> for Endpoint<T> {
    type Output = Fetched<T>;

    fn run(
        self: Arc<Self>,
        item: T,
        index: u64,
    ) -> impl std::future::Future<Output = Result<Fetched<T>, FetchError<T>>> + Send + 'static {
        // The item's future itself, with the stage's `Arc` in it: no
        // wrapper keeping the item a second time.
        Endpoint::fetch_indexed(self, item, index)
    }
}

pin_project! {
    /// Stream for [`SluiceExt::fetch_concurrent`](crate::SluiceExt::fetch_concurrent)
    /// and [`SluiceExt::try_fetch_concurrent`](crate::SluiceExt::try_fetch_concurrent).
    ///
    /// Configure it ([`ordered`](Self::ordered), and the rules, timeouts
    /// and limits of [`WithPolicy`]) before the first poll: each of those
    /// methods panics once the stream has been polled, since a rule added
    /// then would apply to some items only.
    #[must_use = "streams do nothing unless polled"]
    pub struct FetchConcurrent<S, A>
    where
        S: Stream,
        A: StageInput<S::Item>,
    {
        #[pin]
        inner: Concurrent<S, A, Endpoint<A::Item>>,
    }
}

impl<S, A> FetchConcurrent<S, A>
where
    S: Stream,
    A: StageInput<S::Item>,
{
    pub(crate) fn new(stream: S, limit: usize, endpoint: Endpoint<A::Item>) -> Self {
        Self {
            inner: Concurrent::new(stream, limit, endpoint),
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
        self.inner.assert_not_started("FetchConcurrent", "ordered");
        self.inner.ordered = true;
        self
    }

    /// How many items are outstanding: taken from upstream, output not yet
    /// yielded.
    pub fn outstanding(&self) -> usize {
        self.inner.outstanding
    }

    /// The endpoint each item is fetched with.
    pub fn endpoint(&self) -> &Endpoint<A::Item> {
        &self.inner.work
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

impl<S, A> Sealed for FetchConcurrent<S, A>
where
    S: Stream,
    A: StageInput<S::Item>,
{
}

/// Rules, timeouts and limits for this stage's requests, before the
/// endpoint's own rules (see [`WithPolicy`]).
///
/// # Panics
///
/// Each method panics if called after the stream was first polled: a rule
/// added then would apply to some items only.
impl<S, A> WithPolicy for FetchConcurrent<S, A>
where
    S: Stream,
    A: StageInput<S::Item>,
{
    #[track_caller]
    fn map_policy(mut self, change: impl FnOnce(&mut Policy)) -> Self {
        self.inner.assert_not_started(
            "FetchConcurrent",
            "a policy method (retry_on, pause_on, timeout, limit, ...)",
        );
        let endpoint = Arc::unwrap_or_clone(self.inner.work).map_policy(change);
        self.inner.work = Arc::new(endpoint);
        self
    }
}

impl<S, A> Stream for FetchConcurrent<S, A>
where
    S: Stream,
    A: StageInput<S::Item>,
{
    type Item = Result<Fetched<A::Item>, A::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.project().inner.poll_next(cx)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

impl<S, A> FusedStream for FetchConcurrent<S, A>
where
    S: Stream,
    A: StageInput<S::Item>,
{
    fn is_terminated(&self) -> bool {
        self.inner.is_terminated()
    }
}

impl<S, A> fmt::Debug for FetchConcurrent<S, A>
where
    S: Stream + fmt::Debug,
    A: StageInput<S::Item>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FetchConcurrent")
            .field("inner", &self.inner)
            .finish()
    }
}
