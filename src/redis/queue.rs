//! [`WorkQueue`]: items shared out to many workers through a Redis Stream
//! and a consumer group.
//!
//! # How every item ends up in the outputs exactly once
//!
//! A producer [`push`](WorkQueue::push)es each item once under a key (a
//! key seen before is not enqueued again). Each worker reads items as a
//! consumer of the group (`XREADGROUP`): Redis hands every item to one
//! consumer and keeps it *pending* until that consumer acknowledges it.
//! A worker writes its results through a [`Journal`](crate::etl::Journal),
//! and [`ack_after_commit`](WorkQueue::ack_after_commit) acknowledges
//! (`XACK`) an item only once the journal committed its result or dead
//! letter: the sink asks for the next result only after committing the
//! last, and that is when the last is acknowledged.
//!
//! A worker killed with items pending leaves them to the others: after
//! [`claim_after`](WorkQueue::claim_after) without progress they are
//! claimed (`XAUTOCLAIM`) and done again. A worker restarted under its
//! consumer name and journal first reads its own pending items and
//! acknowledges, without redoing, those its journal already committed
//! ([`Jobs::skip_done`]).
//!
//! The one gap: a worker killed after committing an item and before
//! acknowledging it, whose items another worker claims, leaves that item
//! in two outputs (at most one item per worker killed, since each is
//! acknowledged as soon as the next is asked for). Delivery is
//! at-least-once; deduplicate the union of outputs by key to make it
//! exactly once.

use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::{BoxStream, Stream, StreamExt as _};
use redis::aio::ConnectionManager;
use redis::Value;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::RedisCoordinator;
use crate::etl::HasItem;

/// Adds items whose key was never seen: `KEYS` = the stream and the set of
/// keys seen; `ARGV` = key, item, key, item... Returns how many were added.
const PUSH: &str = r"
local added = 0
for i = 1, #ARGV, 2 do
  if redis.call('SADD', KEYS[2], ARGV[i]) == 1 then
    redis.call('XADD', KEYS[1], '*', 'key', ARGV[i], 'item', ARGV[i + 1])
    added = added + 1
  end
end
return added
";

/// Items per call when pushing many.
const PUSH_CHUNK: usize = 500;

/// A queue operation Redis could not carry out.
#[derive(Debug, Clone, thiserror::Error)]
#[error("work queue {queue}: {message}")]
pub struct QueueError {
    queue: String,
    message: String,
}

impl QueueError {
    fn new(queue: &str, message: impl fmt::Display) -> Self {
        Self {
            queue: queue.to_owned(),
            message: message.to_string(),
        }
    }
}

/// A work queue on a Redis Stream, read by many workers through one
/// consumer group. Cheap to clone.
///
/// ```no_run
/// use futures::StreamExt as _;
/// use sluicegate::etl::Journal;
/// use sluicegate::redis::{Job, RedisCoordinator, WorkQueue};
/// use sluicegate::{Client, Rate, SluiceExt};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let redis = RedisCoordinator::new("redis://127.0.0.1:6379", "my-api")?;
/// let queue = WorkQueue::new(&redis, "customers");
/// queue.push_all((0..1000u64).map(|id| (id.to_string(), id))).await?;
///
/// // In each worker:
/// let client = Client::builder()
///     .base_url("https://api.example.com")
///     .limiter(redis.limiter(Rate::per_second(200).burst(5)))
///     .build()?;
/// let journal = Journal::open("worker-1.jsonl", |job: &Job<u64>| job.key().to_owned())?;
/// let done = journal.clone();
/// let jobs = queue
///     .jobs::<u64>("worker-1")
///     .skip_done(move |job| done.is_done(job))
///     .until_drained();
/// let results = jobs
///     .fetch_concurrent(8, client.get(|job: &Job<u64>| format!("/customers/{}", job.item)))
///     .json::<serde_json::Value>();
/// let report = journal.write_jsonl(queue.ack_after_commit(results)).await?;
/// println!("{report}");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct WorkQueue {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    name: String,
    stream: String,
    seen: String,
    group: String,
    claim_after: Duration,
    poll_every: Duration,
    op_timeout: Duration,
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
    /// The consumer group is known to exist.
    group_ready: AtomicBool,
}

impl fmt::Debug for WorkQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkQueue")
            .field("stream", &self.inner.stream)
            .field("claim_after", &self.inner.claim_after)
            .finish_non_exhaustive()
    }
}

/// One item of a [`WorkQueue`], with the key it was pushed under and its
/// entry in the stream. Written (say, in a dead letter) as
/// `{"key", "item"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job<T> {
    #[serde(skip)]
    id: String,
    key: String,
    /// The item.
    pub item: T,
}

impl<T> Job<T> {
    /// The key it was pushed under: the same for every delivery of it.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Its entry in the Redis Stream.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl WorkQueue {
    /// The queue `queue` of `coordinator`'s name (its keys start with the
    /// name). Nothing connects until first use; the queue has a connection
    /// of its own, so reading it never delays the limiter's calls.
    pub fn new(coordinator: &RedisCoordinator, queue: &str) -> Self {
        let stream = format!("{}:queue:{queue}", coordinator.inner.name);
        Self {
            inner: Arc::new(Inner {
                client: coordinator.inner.client.clone(),
                name: queue.to_owned(),
                seen: format!("{stream}:seen"),
                group: "workers".to_owned(),
                stream,
                claim_after: Duration::from_secs(30),
                poll_every: Duration::from_millis(100),
                op_timeout: coordinator.inner.op_timeout.max(Duration::from_secs(2)),
                connection: tokio::sync::Mutex::new(None),
                group_ready: AtomicBool::new(false),
            }),
        }
    }

    /// How long an item may stay pending with a consumer before another
    /// claims it (default 30 s): longer than a worker may take over one
    /// item, waits for the rate limit included.
    ///
    /// # Panics
    ///
    /// If the queue was cloned already.
    #[track_caller]
    pub fn claim_after(mut self, idle: Duration) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("configure a work queue before sharing it")
            .claim_after = idle;
        self
    }

    fn error(&self, message: impl fmt::Display) -> QueueError {
        QueueError::new(&self.inner.name, message)
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, QueueError> {
        let result = tokio::time::timeout(self.inner.op_timeout, async {
            let mut connection = super::connect(
                &self.inner.connection,
                &self.inner.client,
                self.inner.op_timeout,
            )
            .await?;
            cmd.query_async::<T>(&mut connection).await
        })
        .await;
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.error(e)),
            Err(_) => Err(self.error(format!(
                "no answer from Redis within {:?}",
                self.inner.op_timeout
            ))),
        }
    }

    /// Creates the consumer group (reading from the stream's start) unless
    /// it exists.
    async fn ensure_group(&self) -> Result<(), QueueError> {
        if self.inner.group_ready.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(&self.inner.stream)
            .arg(&self.inner.group)
            .arg("0")
            .arg("MKSTREAM");
        match self.query::<()>(&cmd).await {
            Err(e) if !e.message.contains("BUSYGROUP") => return Err(e),
            _ => {}
        }
        self.inner.group_ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Enqueues `item` under `key`, unless an item was ever pushed under
    /// that key; `true` when it was enqueued.
    ///
    /// # Errors
    ///
    /// When Redis cannot be reached, or `item` cannot be serialized.
    pub async fn push<T: Serialize>(&self, key: &str, item: &T) -> Result<bool, QueueError> {
        Ok(self.push_all([(key.to_owned(), item)]).await? == 1)
    }

    /// Enqueues every `(key, item)` whose key was never pushed; returns how
    /// many were. Keys already seen (pushed twice, or by another producer)
    /// are skipped: the keys seen are kept in Redis for the queue's life.
    ///
    /// # Errors
    ///
    /// When Redis cannot be reached (the chunks sent before stay
    /// enqueued: push again, the keys make it safe), or an item cannot be
    /// serialized.
    pub async fn push_all<K, T, I>(&self, items: I) -> Result<u64, QueueError>
    where
        K: Into<String>,
        T: Serialize,
        I: IntoIterator<Item = (K, T)>,
    {
        self.ensure_group().await?;
        let mut added = 0;
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(PUSH)
                .arg(2)
                .arg(&self.inner.stream)
                .arg(&self.inner.seen);
            for (key, item) in items.by_ref().take(PUSH_CHUNK) {
                let json = serde_json::to_string(&item).map_err(|e| self.error(e))?;
                cmd.arg(key.into()).arg(json);
            }
            added += self.query::<u64>(&cmd).await?;
        }
        Ok(added)
    }

    /// How many items were delivered to a consumer and not acknowledged.
    ///
    /// # Errors
    ///
    /// When Redis cannot be reached.
    pub async fn pending(&self) -> Result<u64, QueueError> {
        self.ensure_group().await?;
        let mut cmd = redis::cmd("XPENDING");
        cmd.arg(&self.inner.stream).arg(&self.inner.group);
        let reply: Value = self.query(&cmd).await?;
        match reply {
            Value::Array(fields) => match fields.first() {
                Some(Value::Int(n)) => Ok(u64::try_from(*n).unwrap_or(0)),
                _ => Ok(0),
            },
            _ => Ok(0),
        }
    }

    /// The items of this queue, read as consumer `consumer` of the group:
    /// first those pending with this consumer from an earlier run, then new
    /// ones, and those another consumer left pending longer than
    /// [`claim_after`](Self::claim_after). Use one consumer name per worker,
    /// and the same one when a worker restarts with its journal.
    ///
    /// Endless unless [`until_drained`](Jobs::until_drained). Every item
    /// read must be acknowledged, through
    /// [`ack_after_commit`](Self::ack_after_commit) or
    /// [`skip_done`](Jobs::skip_done); an entry that does not decode as a
    /// `T` is logged and acknowledged, so it cannot block the queue.
    pub fn jobs<T>(&self, consumer: &str) -> Jobs<T>
    where
        T: DeserializeOwned + Send + 'static,
    {
        Jobs {
            queue: self.clone(),
            consumer: consumer.to_owned(),
            skip: None,
            until_drained: false,
            batch: 16,
            stream: None,
            _item: PhantomData,
        }
    }

    /// Passes `results` on unchanged, acknowledging each one's job once the
    /// sink asks for the next result (or for the end): a sink such as
    /// [`Journal::write_jsonl`](crate::etl::Journal::write_jsonl) asks only
    /// after it committed the last one, so a job is acknowledged only once
    /// its result or dead letter is committed. A job whose
    /// acknowledgement fails stays pending and is delivered again (the
    /// journal skips it as done).
    pub fn ack_after_commit<S, V, E, T>(
        &self,
        results: S,
    ) -> impl Stream<Item = Result<V, E>> + Send + 'static
    where
        S: Stream<Item = Result<V, E>> + Send + 'static,
        V: HasItem<Item = Job<T>> + Send + 'static,
        E: HasItem<Item = Job<T>> + Send + 'static,
        T: 'static,
    {
        let queue = self.clone();
        futures::stream::unfold(
            (Box::pin(results), None::<String>, queue),
            |(mut results, committed, queue)| async move {
                if let Some(id) = committed {
                    queue.ack(&[id]).await;
                }
                let next = results.next().await?;
                let id = match &next {
                    Ok(value) => value.item().id.clone(),
                    Err(failure) => failure.item().id.clone(),
                };
                Some((next, (results, Some(id), queue)))
            },
        )
    }

    /// Acknowledges `ids`, trying twice; a failure is logged (the items
    /// stay pending and come again).
    async fn ack(&self, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        let mut cmd = redis::cmd("XACK");
        cmd.arg(&self.inner.stream).arg(&self.inner.group).arg(ids);
        for attempt in 0..2 {
            match self.query::<u64>(&cmd).await {
                Ok(_) => return,
                Err(e) if attempt == 1 => {
                    tracing::warn!(error = %e, "could not acknowledge; the items will come again");
                }
                Err(_) => tokio::time::sleep(self.inner.poll_every).await,
            }
        }
    }

    /// Reads up to `count` entries with `XREADGROUP` from `from` (`>` for
    /// new ones, an id for this consumer's pending ones after it).
    async fn read(
        &self,
        consumer: &str,
        from: &str,
        count: usize,
    ) -> Result<Vec<Entry>, QueueError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.inner.group)
            .arg(consumer)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg(&self.inner.stream)
            .arg(from);
        let reply: Value = self.query(&cmd).await?;
        // [[stream, [[id, [field, value, ...]], ...]]], or nil.
        let Value::Array(streams) = reply else {
            return Ok(Vec::new());
        };
        let Some(Value::Array(stream)) = streams.into_iter().next() else {
            return Ok(Vec::new());
        };
        match stream.into_iter().nth(1) {
            Some(Value::Array(entries)) => Ok(entries.into_iter().filter_map(entry).collect()),
            _ => Ok(Vec::new()),
        }
    }

    /// Claims up to `count` entries pending longer than `claim_after` with
    /// any consumer, for `consumer`; entries deleted meanwhile are
    /// acknowledged.
    async fn claim(&self, consumer: &str, count: usize) -> Result<Vec<Entry>, QueueError> {
        let mut cmd = redis::cmd("XAUTOCLAIM");
        cmd.arg(&self.inner.stream)
            .arg(&self.inner.group)
            .arg(consumer)
            .arg(self.inner.claim_after.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(count);
        let reply: Value = self.query(&cmd).await?;
        // [next-cursor, [[id, [field, value, ...]], ...], [deleted ids]]
        let Value::Array(parts) = reply else {
            return Ok(Vec::new());
        };
        let mut parts = parts.into_iter().skip(1);
        let entries = match parts.next() {
            Some(Value::Array(entries)) => entries.into_iter().filter_map(entry).collect(),
            _ => Vec::new(),
        };
        if let Some(Value::Array(deleted)) = parts.next() {
            let deleted: Vec<String> = deleted.iter().filter_map(text).collect();
            self.ack(&deleted).await;
        }
        Ok(entries)
    }
}

/// An entry as read: its id, and its fields when it still exists.
struct Entry {
    id: String,
    fields: Option<(String, String)>,
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// `[id, [field, value, ...]]` (the fields nil for a deleted entry).
fn entry(value: Value) -> Option<Entry> {
    let Value::Array(parts) = value else {
        return None;
    };
    let id = text(parts.first()?)?;
    let fields = match parts.get(1) {
        Some(Value::Array(fields)) => {
            let (mut key, mut item) = (None, None);
            for pair in fields.chunks(2) {
                match (pair.first().and_then(text).as_deref(), pair.get(1)) {
                    (Some("key"), Some(v)) => key = text(v),
                    (Some("item"), Some(v)) => item = text(v),
                    _ => {}
                }
            }
            key.zip(item)
        }
        _ => None,
    };
    Some(Entry { id, fields })
}

type Skip<T> = Box<dyn Fn(&Job<T>) -> bool + Send + Sync>;

/// The items of a [`WorkQueue`] for one consumer: a [`Stream`] of
/// [`Job`]s. See [`WorkQueue::jobs`].
#[must_use = "streams do nothing unless polled"]
pub struct Jobs<T> {
    queue: WorkQueue,
    consumer: String,
    skip: Option<Skip<T>>,
    until_drained: bool,
    batch: usize,
    stream: Option<BoxStream<'static, Job<T>>>,
    _item: PhantomData<fn() -> T>,
}

impl<T> fmt::Debug for Jobs<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Jobs")
            .field("queue", &self.queue)
            .field("consumer", &self.consumer)
            .field("until_drained", &self.until_drained)
            .finish_non_exhaustive()
    }
}

impl<T: DeserializeOwned + Send + 'static> Jobs<T> {
    /// Acknowledges, without passing them on, the jobs `done` says are
    /// done: those a restarted worker's journal committed before it was
    /// killed, and were delivered again. Say `move |job| journal.is_done(job)`.
    pub fn skip_done(mut self, done: impl Fn(&Job<T>) -> bool + Send + Sync + 'static) -> Self {
        self.skip = Some(Box::new(done));
        self
    }

    /// Ends once the queue is drained: nothing new to read and nothing
    /// pending with any consumer (so every item was acknowledged, and a
    /// worker that dies leaves its items to be claimed first).
    pub fn until_drained(mut self) -> Self {
        self.until_drained = true;
        self
    }

    fn start(&mut self) -> BoxStream<'static, Job<T>> {
        let state = Reader {
            queue: self.queue.clone(),
            consumer: self.consumer.clone(),
            skip: self.skip.take(),
            until_drained: self.until_drained,
            batch: self.batch,
            buffer: VecDeque::new(),
            own_pending_from: Some("0".to_owned()),
        };
        futures::stream::unfold(state, |mut state| async move {
            let job = state.next().await?;
            Some((job, state))
        })
        .boxed()
    }
}

impl<T: DeserializeOwned + Send + 'static> Stream for Jobs<T> {
    type Item = Job<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Job<T>>> {
        if self.stream.is_none() {
            let stream = self.start();
            self.stream = Some(stream);
        }
        self.stream
            .as_mut()
            .expect("started above")
            .poll_next_unpin(cx)
    }
}

struct Reader<T> {
    queue: WorkQueue,
    consumer: String,
    skip: Option<Skip<T>>,
    until_drained: bool,
    batch: usize,
    buffer: VecDeque<Entry>,
    /// Where to read this consumer's own pending entries from, until they
    /// are all read.
    own_pending_from: Option<String>,
}

impl<T: DeserializeOwned> Reader<T> {
    async fn next(&mut self) -> Option<Job<T>> {
        loop {
            while let Some(entry) = self.buffer.pop_front() {
                let job = entry.fields.and_then(|(key, item)| {
                    match serde_json::from_str::<T>(&item) {
                        Ok(item) => Some(Job {
                            id: entry.id.clone(),
                            key,
                            item,
                        }),
                        Err(e) => {
                            tracing::warn!(id = %entry.id, error = %e, "an undecodable queue entry was dropped");
                            None
                        }
                    }
                });
                match job {
                    Some(job) if !self.skip.as_ref().is_some_and(|done| done(&job)) => {
                        return Some(job)
                    }
                    _ => self.queue.ack(&[entry.id]).await,
                }
            }
            match self.fill().await {
                Ok(true) => {}
                Ok(false) if self.until_drained => match self.queue.pending().await {
                    Ok(0) => return None,
                    Ok(_) | Err(_) => tokio::time::sleep(self.queue.inner.poll_every).await,
                },
                Ok(false) => tokio::time::sleep(self.queue.inner.poll_every).await,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the work queue; trying again");
                    tokio::time::sleep(self.queue.inner.poll_every).await;
                }
            }
        }
    }

    /// Reads the next batch into the buffer; `false` when there was none.
    async fn fill(&mut self) -> Result<bool, QueueError> {
        self.queue.ensure_group().await?;
        if let Some(from) = self.own_pending_from.clone() {
            let entries = self.queue.read(&self.consumer, &from, self.batch).await?;
            match entries.last() {
                Some(last) => self.own_pending_from = Some(last.id.clone()),
                None => self.own_pending_from = None,
            }
            if !entries.is_empty() {
                self.buffer.extend(entries);
                return Ok(true);
            }
        }
        let entries = self.queue.read(&self.consumer, ">", self.batch).await?;
        if entries.is_empty() {
            let claimed = self.queue.claim(&self.consumer, self.batch).await?;
            self.buffer.extend(claimed);
        } else {
            self.buffer.extend(entries);
        }
        Ok(!self.buffer.is_empty())
    }
}
