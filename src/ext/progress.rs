//! The [`WithProgress`] combinator: a progress bar on stderr (feature
//! `progress`).

use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures::stream::{FusedStream, Stream};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use crate::client::Client;

/// A progress bar: done / total (or done alone), rate, ETA, retries, and a
/// visible "paused" state while the client's pause handle holds.
///
/// It draws on stderr and only when stderr is a terminal, so logs and
/// pipes stay clean.
///
/// ```
/// use futures::{stream, StreamExt};
/// use sluicegate::mock::{MockResponse, MockTransport, Route};
/// use sluicegate::{Client, Progress, SluiceExt};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let mock = MockTransport::new();
/// mock.mount(Route::get("/items/{id}").respond(MockResponse::ok()));
/// let client = Client::builder().transport(mock).base_url("http://mock").build().unwrap();
/// let done = stream::iter(0..100u32)
///     .fetch_concurrent(8, client.get(|id: &u32| format!("/items/{id}")))
///     .progress(Progress::new(Some(100)).watch(&client))
///     .count()
///     .await;
/// assert_eq!(done, 100);
/// # }
/// ```
pub struct Progress {
    bar: ProgressBar,
    client: Option<Client>,
}

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Progress")
            .field("position", &self.bar.position())
            .field("length", &self.bar.length())
            .finish()
    }
}

impl Progress {
    /// A bar for `total` items, or a counter when the total is unknown.
    pub fn new(total: Option<u64>) -> Self {
        let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
        let template = if total.is_some() {
            "{elapsed_precise} [{wide_bar}] {pos}/{len} {per_sec} eta {eta} {msg}"
        } else {
            "{elapsed_precise} {pos} done {per_sec} {msg}"
        };
        bar.set_style(ProgressStyle::with_template(template).expect("valid template"));
        Self { bar, client: None }
    }

    /// Shows `client`'s retries and pauses beside the count.
    pub fn watch(mut self, client: &Client) -> Self {
        self.client = Some(client.clone());
        self
    }

    /// The bar itself, for styling.
    pub fn bar(&self) -> &ProgressBar {
        &self.bar
    }
}

fn describe(client: &Client) -> String {
    let retries = client.stats().map_or(0, |s| s.retries());
    let mut msg = if retries > 0 {
        format!("retries {retries}")
    } else {
        String::new()
    };
    if let Some(until) = client.pause_handle().paused_until() {
        let left = until.saturating_duration_since(Instant::now());
        if !msg.is_empty() {
            msg.push_str(" · ");
        }
        msg.push_str(&format!("paused, {:.1}s left", left.as_secs_f64()));
    }
    msg
}

pin_project! {
    /// Stream for [`SluiceExt::progress`](crate::SluiceExt::progress).
    ///
    /// The bar's message is refreshed by a task of its own while items
    /// flow (a pause shows even when nothing moves); that task is owned by
    /// this stream and ends with it, or at the end of the stream.
    ///
    /// # Cancel safety
    ///
    /// Holds no item: dropping this stream (or a `next()` future) loses
    /// nothing the inner stream did not already hold.
    ///
    /// # Panics
    ///
    /// When first polled outside a tokio runtime (the refresh task is
    /// spawned on it).
    #[must_use = "streams do nothing unless polled"]
    pub struct WithProgress<S> {
        #[pin]
        stream: S,
        progress: Progress,
        ticker: Option<AbortOnDropHandle<()>>,
    }
}

impl<S> WithProgress<S> {
    pub(crate) fn new(stream: S, progress: Progress) -> Self {
        Self {
            stream,
            progress,
            ticker: None,
        }
    }

    /// The progress bar this stream advances.
    pub fn progress(&self) -> &Progress {
        &self.progress
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

    /// The inner stream. The bar stays where it was, and stops refreshing.
    pub fn into_inner(self) -> S {
        self.stream
    }
}

impl<S: Stream> Stream for WithProgress<S> {
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = self.project();
        if this.ticker.is_none() {
            // The message changes while no item moves (a pause): refresh it
            // on a timer, not only when items pass.
            let bar = this.progress.bar.clone();
            let client = this.progress.client.clone();
            *this.ticker = Some(AbortOnDropHandle::new(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                loop {
                    tick.tick().await;
                    if let Some(client) = &client {
                        bar.set_message(describe(client));
                    }
                    bar.tick();
                }
            })));
        }
        let next = ready!(this.stream.poll_next(cx));
        match next {
            Some(_) => this.progress.bar.inc(1),
            None => {
                if let Some(client) = &this.progress.client {
                    this.progress.bar.set_message(describe(client));
                }
                this.progress.bar.finish();
                *this.ticker = None;
            }
        }
        Poll::Ready(next)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.stream.size_hint()
    }
}

impl<S: FusedStream> FusedStream for WithProgress<S> {
    fn is_terminated(&self) -> bool {
        self.stream.is_terminated()
    }
}

impl<S: fmt::Debug> fmt::Debug for WithProgress<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WithProgress")
            .field("stream", &self.stream)
            .field("progress", &self.progress)
            .finish()
    }
}
