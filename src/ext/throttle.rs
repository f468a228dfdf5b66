//! The [`Throttle`] combinator: paces any stream's items.

use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures::stream::{Fuse, FusedStream, Stream, StreamExt as _};
use pin_project_lite::pin_project;
use tokio_util::sync::ReusableBoxFuture;

use crate::limiter::Limiter;
use crate::pause::PauseHandle;

pin_project! {
    /// Stream for [`SluiceExt::throttle`](crate::SluiceExt::throttle).
    ///
    /// `Send`, `Sync` and `Unpin` whenever the inner stream and its items
    /// are (see `tests/auto_traits.rs`).
    ///
    /// # Cancel safety
    ///
    /// An item is taken from the inner stream before its token is waited
    /// for, and held here meanwhile: dropping the `Throttle` (or calling
    /// [`into_inner`](Self::into_inner)) while it waits drops that one
    /// item, and the token it was waiting for is not taken. Dropping a
    /// `next()` future between polls loses nothing: the item stays held
    /// for the next poll.
    ///
    /// # Panics
    ///
    /// When it has to wait for a token outside a tokio runtime with its
    /// time driver enabled (waits are tokio timers; a Redis-backed limiter
    /// also starts its line's task on the runtime).
    #[must_use = "streams do nothing unless polled"]
    pub struct Throttle<S: Stream> {
        #[pin]
        stream: Fuse<S>,
        limiter: Limiter,
        pause: Option<PauseHandle>,
        // The item that left the inner stream and waits for its token.
        pending: Option<S::Item>,
        // The wait for that token. A `ReusableBoxFuture` rather than a
        // `Pin<Box<dyn Future + Send>>`: it is `Sync` (a future is only
        // ever reached through `&mut`), so `Throttle` is `Sync` like the
        // streams it wraps, and the one allocation is reused for every
        // item that has to wait.
        wait: Option<ReusableBoxFuture<'static, ()>>,
    }
}

impl<S: Stream> Throttle<S> {
    pub(crate) fn new(stream: S, limiter: Limiter) -> Self {
        Self {
            stream: stream.fuse(),
            limiter,
            pause: None,
            pending: None,
            wait: None,
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

    /// The inner stream.
    pub fn get_ref(&self) -> &S {
        self.stream.get_ref()
    }

    /// The inner stream, mutably. Taking items from it directly bypasses
    /// the throttle.
    pub fn get_mut(&mut self) -> &mut S {
        self.stream.get_mut()
    }

    /// The inner stream, pinned. Taking items from it directly bypasses
    /// the throttle.
    pub fn get_pin_mut(self: Pin<&mut Self>) -> Pin<&mut S> {
        self.project().stream.get_pin_mut()
    }

    /// The inner stream. An item already taken from it and waiting for
    /// its token is dropped, and no token is taken for it (as
    /// `futures::stream::Buffered::into_inner` drops what it buffered).
    pub fn into_inner(self) -> S {
        self.stream.into_inner()
    }
}

impl<S: Stream> Stream for Throttle<S> {
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = self.project();
        if this.pending.is_some() {
            if let Some(wait) = this.wait.as_mut() {
                ready!(wait.poll(cx));
            }
            return Poll::Ready(this.pending.take());
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
        let acquire = this
            .limiter
            .clone()
            .acquire_until_granted(this.pause.clone());
        let wait = match this.wait {
            Some(wait) => {
                wait.set(acquire);
                wait
            }
            None => this.wait.insert(ReusableBoxFuture::new(acquire)),
        };
        match wait.poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(item)),
            Poll::Pending => {
                *this.pending = Some(item);
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
