//! The task that runs a fetch stream's items, apart from its consumer.
//!
//! One task per stream rather than one per item: a spawned task per item
//! costs an allocation, a registry entry and a join per item, while this
//! costs two channel operations, and still keeps every request moving while
//! the consumer is busy.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

use crate::endpoint::{Endpoint, Fetched};
use crate::error::FetchError;

pub(super) struct Driver<T, O> {
    inbox: Option<mpsc::UnboundedSender<(u64, T)>>,
    outbox: mpsc::UnboundedReceiver<(u64, O)>,
    task: AbortOnDropHandle<()>,
}

impl<T, O> Driver<T, O>
where
    T: Send + 'static,
    O: Send + 'static,
{
    /// Starts the driver on the current tokio runtime. `finish` turns each
    /// item's result into the stream's output.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub(super) fn spawn(
        endpoint: Endpoint<T>,
        finish: fn(Result<Fetched<T>, FetchError<T>>) -> O,
    ) -> Self {
        let (inbox, mut items) = mpsc::unbounded_channel::<(u64, T)>();
        let (results, outbox) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let endpoint = &endpoint;
            let mut running = FuturesUnordered::new();
            let mut open = true;
            std::future::poll_fn(|cx| {
                while open {
                    match items.poll_recv(cx) {
                        Poll::Ready(Some((index, item))) => running.push(async move {
                            (index, finish(endpoint.fetch_indexed(item, index).await))
                        }),
                        Poll::Ready(None) => open = false,
                        Poll::Pending => break,
                    }
                }
                loop {
                    match running.poll_next_unpin(cx) {
                        Poll::Ready(Some(done)) => {
                            if results.send(done).is_err() {
                                return Poll::Ready(());
                            }
                        }
                        Poll::Ready(None) if open => return Poll::Pending,
                        Poll::Ready(None) => return Poll::Ready(()),
                        Poll::Pending => return Poll::Pending,
                    }
                }
            })
            .await;
        });
        Self {
            inbox: Some(inbox),
            outbox,
            task: AbortOnDropHandle::new(task),
        }
    }

    /// Hands the driver an item to fetch.
    pub(super) fn send(&mut self, index: u64, item: T) {
        if let Some(inbox) = &self.inbox {
            // A closed inbox means the driver died; `poll_recv` reports why.
            let _ = inbox.send((index, item));
        }
    }

    /// No more items will come: the driver ends once the last one is done.
    pub(super) fn close(&mut self) {
        self.inbox = None;
    }

    /// The next finished item, or `None` once the driver has ended.
    ///
    /// # Panics
    ///
    /// Resumes a panic raised while fetching (in a transport or a builder).
    pub(super) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<(u64, O)>> {
        match self.outbox.poll_recv(cx) {
            Poll::Ready(None) => match Pin::new(&mut self.task).poll(cx) {
                Poll::Ready(Ok(())) => Poll::Ready(None),
                Poll::Ready(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Poll::Ready(Err(e)) => panic!("fetch driver ended unexpectedly: {e}"),
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}
