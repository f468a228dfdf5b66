//! [`Task`]: a future run as its own tokio task, owned by whoever holds it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio_util::task::AbortOnDropHandle;

/// A future running as its own tokio task, so it makes progress whether or
/// not its holder polls; dropping the holder aborts it.
pub(crate) struct Task<O> {
    handle: AbortOnDropHandle<O>,
}

impl<O: Send + 'static> Task<O> {
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub(crate) fn spawn(future: impl Future<Output = O> + Send + 'static) -> Self {
        // Boxed first: an item's fetch is a large future (over 1 KB), and
        // spawning it unboxed copies it through several frames into the
        // task; a box moves as a pointer.
        Self {
            handle: AbortOnDropHandle::new(tokio::spawn(Box::pin(future))),
        }
    }
}

impl<O> Future for Task<O> {
    type Output = O;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<O> {
        match std::task::ready!(Pin::new(&mut self.handle).poll(cx)) {
            Ok(output) => Poll::Ready(output),
            // A panic in a transport or a request builder surfaces in the
            // holder, as it would had the holder polled the future itself.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Tasks are aborted only by dropping their holder, which then
            // polls them no more: only a runtime shutting down ends here.
            Err(e) => panic!("a sluicegate task was cancelled: {e}"),
        }
    }
}
