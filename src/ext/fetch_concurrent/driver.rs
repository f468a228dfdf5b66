//! Who polls a fetch stream's requests: its consumer while it waits, a
//! background task while it is busy.
//!
//! The requests in flight live in one `FuturesUnordered` shared by the
//! consumer and a driver task, and are always polled with the same waker,
//! which routes each wake-up: to the consumer when it is waiting in
//! `poll_next` (it then drives the requests itself, as `buffer_unordered`
//! would, with no hand-off), to the driver task when the consumer is busy
//! elsewhere (so requests, retry waits and pauses keep moving and nothing
//! times out for want of a poll). Finished outputs the driver collects wait
//! in a queue, at most `n` of them.
//!
//! Lost wake-ups are excluded by the lock: the consumer says it is waiting
//! and looks for outputs under the same lock the driver holds while it
//! collects outputs and decides whom to wake.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use futures::stream::{FuturesUnordered, StreamExt as _};
use futures::task::{waker, ArcWake, AtomicWaker};
use tokio_util::task::AbortOnDropHandle;

use crate::endpoint::{Endpoint, Fetched};
use crate::error::FetchError;

type Running<O> = Pin<Box<dyn Future<Output = (u64, O)> + Send>>;

struct Shared<O> {
    core: Mutex<Core<O>>,
    consumer: AtomicWaker,
    driver: AtomicWaker,
    /// The consumer is parked in `poll_next`, waiting for an output.
    consumer_waiting: AtomicBool,
}

struct Core<O> {
    running: FuturesUnordered<Running<O>>,
    done: VecDeque<(u64, O)>,
}

impl<O: Send> ArcWake for Shared<O> {
    fn wake_by_ref(shared: &Arc<Self>) {
        if shared.consumer_waiting.load(Ordering::Acquire) {
            shared.consumer.wake();
        } else {
            shared.driver.wake();
        }
    }
}

impl<O> Shared<O> {
    fn lock(&self) -> MutexGuard<'_, Core<O>> {
        self.core
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

pub(super) struct Driver<T, O> {
    endpoint: Arc<Endpoint<T>>,
    finish: fn(Result<Fetched<T>, FetchError<T>>) -> O,
    shared: Arc<Shared<O>>,
    /// The routing waker every poll of the requests uses.
    hub: Waker,
    task: AbortOnDropHandle<()>,
}

impl<T, O> Driver<T, O>
where
    T: Send + 'static,
    O: Send + 'static,
{
    /// Starts the background half on the current tokio runtime. `finish`
    /// turns each item's result into the stream's output.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub(super) fn spawn(
        endpoint: Endpoint<T>,
        finish: fn(Result<Fetched<T>, FetchError<T>>) -> O,
    ) -> Self {
        let shared = Arc::new(Shared {
            core: Mutex::new(Core {
                running: FuturesUnordered::new(),
                done: VecDeque::new(),
            }),
            consumer: AtomicWaker::new(),
            driver: AtomicWaker::new(),
            consumer_waiting: AtomicBool::new(false),
        });
        let hub = waker(shared.clone());
        let task = {
            let shared = shared.clone();
            let hub = hub.clone();
            tokio::spawn(std::future::poll_fn(move |cx| {
                shared.driver.register(cx.waker());
                let mut core = shared.lock();
                let mut hub_cx = Context::from_waker(&hub);
                let mut collected = false;
                while let Poll::Ready(Some(output)) = core.running.poll_next_unpin(&mut hub_cx) {
                    core.done.push_back(output);
                    collected = true;
                }
                if collected && shared.consumer_waiting.load(Ordering::Acquire) {
                    shared.consumer.wake();
                }
                Poll::<()>::Pending
            }))
        };
        Self {
            endpoint: Arc::new(endpoint),
            finish,
            shared,
            hub,
            task: AbortOnDropHandle::new(task),
        }
    }

    /// Starts fetching an item.
    pub(super) fn send(&mut self, index: u64, item: T) {
        let endpoint = self.endpoint.clone();
        let finish = self.finish;
        let running: Running<O> =
            Box::pin(async move { (index, finish(endpoint.fetch_indexed(item, index).await)) });
        self.shared.lock().running.push(running);
    }

    /// The next finished item, driving the requests inline meanwhile;
    /// `None` when nothing is in flight.
    ///
    /// # Panics
    ///
    /// Resumes a panic raised while fetching (in a transport or a builder).
    pub(super) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<(u64, O)>> {
        if self.task.is_finished() {
            // The driver task never ends by itself: it panicked.
            if let Poll::Ready(Err(e)) = Pin::new(&mut self.task).poll(cx) {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
        self.shared.consumer.register(cx.waker());
        let mut core = self.shared.lock();
        if let Some(output) = core.done.pop_front() {
            self.shared.consumer_waiting.store(false, Ordering::Release);
            return Poll::Ready(Some(output));
        }
        let mut hub_cx = Context::from_waker(&self.hub);
        match core.running.poll_next_unpin(&mut hub_cx) {
            Poll::Ready(output) => {
                // An output, or `None`: nothing is in flight.
                self.shared.consumer_waiting.store(false, Ordering::Release);
                Poll::Ready(output)
            }
            Poll::Pending => {
                // Said under the lock the driver takes to decide whom to
                // wake, so a wake-up cannot fall between the two.
                self.shared.consumer_waiting.store(true, Ordering::Release);
                Poll::Pending
            }
        }
    }
}
