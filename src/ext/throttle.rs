//! The [`Throttle`] combinator: paces any stream's items.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures::stream::{Fuse, FusedStream, Stream, StreamExt as _};
use pin_project_lite::pin_project;

use crate::limiter::Limiter;
use crate::pause::PauseHandle;

type Wait = Pin<Box<dyn Future<Output = ()> + Send>>;

pin_project! {
    /// Stream for [`SluiceExt::throttle`](crate::SluiceExt::throttle).
    #[must_use = "streams do nothing unless polled"]
    pub struct Throttle<S: Stream> {
        #[pin]
        stream: Fuse<S>,
        limiter: Limiter,
        pause: Option<PauseHandle>,
        pending: Option<(S::Item, Wait)>,
    }
}

impl<S: Stream> Throttle<S> {
    pub(crate) fn new(stream: S, limiter: Limiter) -> Self {
        Self {
            stream: stream.fuse(),
            limiter,
            pause: None,
            pending: None,
        }
    }

    /// Holds items while `pause` is in force; the budget is taken after the
    /// pause, so its end is not a burst.
    pub fn pause_with(mut self, pause: PauseHandle) -> Self {
        self.pause = Some(pause);
        self
    }

    /// The limiter pacing this stream.
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }
}

impl<S: Stream> Stream for Throttle<S> {
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = self.project();
        if let Some((_, wait)) = this.pending.as_mut() {
            ready!(wait.as_mut().poll(cx));
            return Poll::Ready(this.pending.take().map(|(item, _)| item));
        }
        // The upstream is asked first and the budget only for an item that
        // exists, so the end of the stream is never delayed.
        let Some(item) = ready!(this.stream.poll_next(cx)) else {
            return Poll::Ready(None);
        };
        let paused = this.pause.as_ref().is_some_and(PauseHandle::is_paused);
        if !paused && this.limiter.check().is_ok() {
            return Poll::Ready(Some(item));
        }
        let mut wait: Wait = Box::pin(
            this.limiter
                .clone()
                .acquire_until_granted(this.pause.clone()),
        );
        match wait.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(item)),
            Poll::Pending => {
                *this.pending = Some((item, wait));
                Poll::Pending
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let extra = usize::from(self.pending.is_some());
        let (low, high) = self.stream.size_hint();
        (
            low.saturating_add(extra),
            high.and_then(|h| h.checked_add(extra)),
        )
    }
}

impl<S: Stream> FusedStream for Throttle<S> {
    fn is_terminated(&self) -> bool {
        self.pending.is_none() && self.stream.is_terminated()
    }
}

impl<S: Stream> fmt::Debug for Throttle<S>
where
    S: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Throttle")
            .field("stream", &self.stream)
            .field("limiter", &self.limiter)
            .field("pause", &self.pause)
            .field("waiting", &self.pending.is_some())
            .finish()
    }
}
