//! [`WorkQueue`]: items shared out to many workers through a Redis Stream
//! and a consumer group.
//!
//! # How every item ends up in the outputs exactly once
//!
//! A producer [`push`](WorkQueue::push)es each item under a key (a key
//! seen before is not enqueued again, within the
//! [dedupe window](WorkQueue::dedupe_window)). Each worker reads items as a
//! consumer of the group (`XREADGROUP`): Redis hands every item to one
//! consumer and keeps it *pending* until that consumer acknowledges it.
//! A worker writes its results through a [`Journal`](crate::etl::Journal),
//! and [`ack_after_commit`](WorkQueue::ack_after_commit) acknowledges
//! (`XACK`) an item only once the journal committed its result or dead
//! letter: the sink asks for the next result only after committing the
//! last, and that is when the last is acknowledged.
//!
//! A running worker renews the items it holds (resets their idle time in
//! Redis) every quarter of [`claim_after`](WorkQueue::claim_after), from
//! a task of its own, however long its pipeline takes over them: retries,
//! pauses and waits for the rate limit do not make it lose them. A worker
//! killed with items pending leaves them to the others: once they have
//! gone `claim_after` without renewal they are claimed (`XAUTOCLAIM`) and
//! done again. A worker restarted under its consumer name and journal
//! first reads its own pending items and acknowledges, without redoing,
//! those its journal already committed ([`Jobs::skip_done`]).
//!
//! The one gap: an item committed by a worker and claimed by another
//! before the first acknowledged it is in two outputs. That takes a worker
//! killed between its commit and its acknowledgement (at most one item
//! per worker killed, since each is acknowledged as soon as the next is
//! asked for), a worker frozen (say, stopped by its machine) for longer
//! than `claim_after`, or a Redis outage longer than `claim_after`, which
//! holds up acknowledgements and renewals alike. Delivery is
//! at-least-once; deduplicate the union of outputs by key to make it
//! exactly once.
//!
//! # When Redis goes away
//!
//! Nothing is lost and nothing is acknowledged twice. Reads, claims and
//! acknowledgements that fail for want of Redis (refused, dropped, timed
//! out, still loading its data) are tried again on tokio's clock, from
//! 100 ms doubling up to 1 s, for as long as it takes: the item stays
//! pending in Redis meanwhile, and giving up would only turn an outage
//! into duplicates. The pipeline waits, as a fail-closed limiter does;
//! drop it to stop. After an error the worker reads its own pending
//! entries again, so an entry Redis handed out in a reply that never
//! arrived is not left for `claim_after`; entries the worker already holds
//! are not handed out twice. Acknowledging again an entry acknowledged
//! already is a no-op. Run Redis with persistence (`appendonly yes`;
//! `appendfsync always` to lose no acknowledged write in a crash), or a
//! restart loses the queue itself.
//!
//! # Undecodable entries
//!
//! An entry whose `item` does not decode as the item type, or that lacks
//! its `key` or `item` field (written by another tool), becomes a dead
//! letter in the stream `<queue>:dead`, with its raw id and fields and the
//! error (what was missing, or the kind of decoding error and where: never
//! a value of the item, which may hold secrets, in the error or the log);
//! one Lua script adds the dead letter and acknowledges the entry,
//! so it is acknowledged only once its dead letter is committed, and only
//! if it is still pending with the worker that read it. Read them with
//! [`WorkQueue::dead_letters`].
//!
//! # What stays in Redis
//!
//! An acknowledged entry is deleted from the stream (`XDEL`, in the same
//! transaction as the `XACK`): with one consumer group, nobody reads it
//! again. Each key pushed is remembered (`<queue>:seen:<key>`) while its
//! item is in the queue, and for the [dedupe window](WorkQueue::dedupe_window)
//! after its acknowledgement (default 24 h); then it expires, and the key
//! may be pushed again as new work. So Redis holds the items not yet done
//! and the keys of those done within the window, never the queue's whole
//! history.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::{BoxStream, Stream, StreamExt as _};
use redis::aio::ConnectionManager;
use redis::{RedisError, Script, Value};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::RedisCoordinator;
use crate::etl::HasItem;
use crate::task::Task;

/// Adds items whose key is not remembered: `KEYS` = the stream, then the
/// key marker of each item; `ARGV` = key, item, key, item... Returns how
/// many were added. A marker has no expiry until its item is acknowledged.
const PUSH: &str = r"
local added = 0
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], '1', 'NX') then
    redis.call('XADD', KEYS[1], '*', 'key', ARGV[2 * i - 3], 'item', ARGV[2 * i - 2])
    added = added + 1
  end
end
return added
";

/// Moves an entry to the dead letters, if it is still pending with the
/// consumer that read it: adds `{entry, error, <its raw fields>...}` to the
/// dead-letter stream, then acknowledges and deletes the entry and starts
/// its key marker's expiry, all or nothing. `KEYS` = stream, dead-letter
/// stream, and the entry's key marker if it has a key; `ARGV` = group,
/// consumer, entry id, error, dedupe window (ms). Returns 1 when moved, 0
/// when the entry was no longer this consumer's.
const DEAD: &str = r"
local mine = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #mine == 0 then
  return 0
end
local found = redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3])
local record = {KEYS[2], '*', 'entry', ARGV[3], 'error', ARGV[4]}
if #found > 0 then
  for _, v in ipairs(found[1][2]) do
    record[#record + 1] = v
  end
end
redis.call('XADD', unpack(record))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
if KEYS[3] then
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
end
return 1
";

static DEAD_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(DEAD));

/// Renews the entries still pending with a consumer: resets their idle
/// time, so that [`XAUTOCLAIM`](WorkQueue::claim_after) leaves them to the
/// worker that holds them. An entry another consumer claimed meanwhile is
/// left to it. `KEYS` = stream; `ARGV` = group, consumer, entry ids.
/// Returns the ids another consumer holds now (the rest were renewed, or
/// acknowledged meanwhile).
const RENEW: &str = r"
local mine = {}
local taken = {}
for i = 3, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #pending > 0 then
    if pending[1][2] == ARGV[2] then
      mine[#mine + 1] = ARGV[i]
    else
      taken[#taken + 1] = ARGV[i]
    end
  end
end
if #mine > 0 then
  mine[#mine + 1] = 'JUSTID'
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(mine))
end
return taken
";

static RENEW_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW));

/// Entries per renewal call.
const RENEW_CHUNK: usize = 500;

/// The shortest time between two renewals, however short
/// [`claim_after`](WorkQueue::claim_after) is.
const RENEW_FLOOR: Duration = Duration::from_millis(10);

/// Items per call when pushing many.
const PUSH_CHUNK: usize = 500;

/// The longest wait between two tries of a call Redis did not answer.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A queue operation Redis could not carry out.
#[derive(Debug, Clone)]
pub struct QueueError {
    queue: String,
    message: String,
    transient: bool,
    code: Option<String>,
}

impl QueueError {
    fn new(queue: &str, message: impl fmt::Display) -> Self {
        Self {
            queue: queue.to_owned(),
            message: message.to_string(),
            transient: false,
            code: None,
        }
    }

    /// Whether the same call may succeed later: Redis could not be
    /// reached, did not answer in time, or was still loading its data.
    pub fn is_transient(&self) -> bool {
        self.transient
    }
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "work queue {}: {}", self.queue, self.message)
    }
}

// The Redis error is flattened into `message` when the error is made (the
// error is `Clone`, and a queue error outlives the connection that failed),
// so there is no `source()` to give.
impl std::error::Error for QueueError {}

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
    /// The dead-letter stream.
    dead: String,
    /// Prefix of the key markers.
    seen: String,
    group: String,
    claim_after: Duration,
    dedupe_window: Duration,
    poll_every: Duration,
    op_timeout: Duration,
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
    /// The consumer group is known to exist.
    group_ready: AtomicBool,
    /// Entries read and not yet acknowledged here, each with the reader
    /// holding it: reading this consumer's pending entries again must not
    /// hand them out twice. An entry whose reader was dropped is free.
    held: Mutex<HashMap<String, Weak<()>>>,
}

impl fmt::Debug for WorkQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkQueue")
            .field("stream", &self.inner.stream)
            .field("claim_after", &self.inner.claim_after)
            .field("dedupe_window", &self.inner.dedupe_window)
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

/// An entry of a [`WorkQueue`] that could not be decoded, as kept in the
/// queue's dead letters: its id, its raw fields and why it was refused.
/// See [`WorkQueue::dead_letters`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadEntry {
    id: String,
    entry: String,
    error: String,
    fields: Vec<(Vec<u8>, Vec<u8>)>,
}

impl DeadEntry {
    /// The dead letter's own id, in the dead-letter stream.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The id the entry had in the queue's stream.
    pub fn entry_id(&self) -> &str {
        &self.entry
    }

    /// Why it could not be decoded: what was missing, or the kind of
    /// decoding error and its line and column, never a value of the entry
    /// (decode [`field("item")`](Self::field) again for serde's own message,
    /// which quotes them).
    pub fn error(&self) -> &str {
        &self.error
    }

    /// The entry's fields, as they were, in order.
    pub fn fields(&self) -> &[(Vec<u8>, Vec<u8>)] {
        &self.fields
    }

    /// The value of the entry's field `name`, if it had one.
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(field, _)| field == name.as_bytes())
            .map(|(_, value)| value.as_slice())
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
                seen: format!("{stream}:seen:"),
                dead: format!("{stream}:dead"),
                group: "workers".to_owned(),
                stream,
                claim_after: Duration::from_secs(30),
                dedupe_window: Duration::from_secs(24 * 60 * 60),
                poll_every: Duration::from_millis(100),
                op_timeout: coordinator.inner.op_timeout.max(Duration::from_secs(2)),
                connection: tokio::sync::Mutex::new(None),
                group_ready: AtomicBool::new(false),
                held: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn configure(mut self, f: impl FnOnce(&mut Inner)) -> Self {
        f(Arc::get_mut(&mut self.inner).expect("configure a work queue before sharing it"));
        self
    }

    /// How long an item may stay pending with a worker that shows no sign
    /// of life before another claims it (default 30 s). A running
    /// [`Jobs`] stream renews the items it holds every quarter of this,
    /// however long the pipeline takes over them (retries, pauses and
    /// waits for the rate limit included), so only a worker that stopped,
    /// or froze for longer than this, loses its items to the others.
    ///
    /// # Panics
    ///
    /// If the queue was cloned already.
    #[track_caller]
    pub fn claim_after(self, idle: Duration) -> Self {
        self.configure(|i| i.claim_after = idle)
    }

    /// How long a key is remembered after its item is acknowledged
    /// (default 24 h), so that pushing it again is skipped: from its push
    /// until this long after its item is done (or dead-lettered), a key is
    /// enqueued once; after that it expires in Redis and the same key
    /// pushed again is new work. Only the keys of items done within the
    /// window are kept, so the memory they take does not grow with the
    /// queue's life. Applies to items acknowledged from now on.
    ///
    /// # Panics
    ///
    /// If the queue was cloned already, or `window` is under a millisecond.
    #[track_caller]
    pub fn dedupe_window(self, window: Duration) -> Self {
        assert!(
            window >= Duration::from_millis(1),
            "a dedupe window is at least a millisecond"
        );
        self.configure(|i| i.dedupe_window = window)
    }

    fn error(&self, message: impl fmt::Display) -> QueueError {
        QueueError::new(&self.inner.name, message)
    }

    /// The error for what Redis answered, telling a passing outage from a
    /// refusal.
    fn redis_error(&self, e: &RedisError) -> QueueError {
        let code = e.code().map(str::to_owned);
        if code.as_deref() == Some("NOGROUP") {
            // The stream or its group is gone (Redis lost its data, or
            // someone deleted them): create it again before the next try.
            self.inner.group_ready.store(false, Ordering::Relaxed);
        }
        let transient = code.as_deref() == Some("NOGROUP")
            || !matches!(e.retry_method(), redis::RetryMethod::NoRetry);
        QueueError {
            transient,
            code,
            ..self.error(e)
        }
    }

    /// Runs `call` on the queue's connection, within the time allowed. A
    /// connection found broken (Redis restarted, say) is made again and
    /// the call tried once more at once.
    async fn timed<T: redis::FromRedisValue>(&self, call: Call<'_>) -> Result<T, QueueError> {
        for attempt in 0.. {
            let result = tokio::time::timeout(self.inner.op_timeout, async {
                let mut connection = super::connect(
                    &self.inner.connection,
                    &self.inner.client,
                    self.inner.op_timeout,
                )
                .await?;
                match call {
                    Call::Cmd(cmd) => cmd.query_async::<T>(&mut connection).await,
                    Call::Pipe(pipe) => pipe.query_async::<T>(&mut connection).await,
                    Call::Script(script) => script.invoke_async::<T>(&mut connection).await,
                }
            })
            .await;
            return match result {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(e)) if attempt == 0 && (e.is_connection_dropped() || e.is_io_error()) => {
                    continue;
                }
                Ok(Err(e)) => Err(self.redis_error(&e)),
                Err(_) => Err(QueueError {
                    transient: true,
                    ..self.error(format!(
                        "no answer from Redis within {:?}",
                        self.inner.op_timeout
                    ))
                }),
            };
        }
        unreachable!("the loop returns")
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, QueueError> {
        self.timed(Call::Cmd(cmd)).await
    }

    /// Runs `op` until it succeeds or fails for good: while Redis cannot
    /// be reached, it is tried again after 100 ms, doubling up to
    /// [`BACKOFF_MAX`], for as long as it takes.
    async fn persist<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, QueueError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, QueueError>>,
    {
        let mut delay = self.inner.poll_every;
        let mut failures = 0u32;
        loop {
            match op().await {
                Ok(value) => {
                    if failures > 0 {
                        tracing::info!(queue = %self.inner.name, what, failures, "Redis answers the work queue again");
                    }
                    return Ok(value);
                }
                Err(e) if e.transient => {
                    if failures == 0 {
                        tracing::warn!(error = %e, what, "Redis unavailable to the work queue; trying again");
                    }
                    failures += 1;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(BACKOFF_MAX);
                }
                Err(e) => return Err(e),
            }
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
            Err(e) if e.code.as_deref() != Some("BUSYGROUP") => return Err(e),
            _ => {}
        }
        self.inner.group_ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The Redis key remembering that `key` was pushed.
    fn seen_key(&self, key: &[u8]) -> Vec<u8> {
        let mut seen = self.inner.seen.as_bytes().to_vec();
        seen.extend_from_slice(key);
        seen
    }

    /// Enqueues `item` under `key`, unless an item was pushed under that
    /// key within the [dedupe window](Self::dedupe_window); `true` when it
    /// was enqueued.
    ///
    /// # Errors
    ///
    /// When Redis cannot be reached, or `item` cannot be serialized.
    ///
    /// # Cancel safety
    ///
    /// Dropped before it returns, the item may or may not be enqueued
    /// (Redis may have taken the call); pushing it again under the same
    /// key is safe, the key makes a second push a no-op.
    ///
    /// # Panics
    ///
    /// When polled outside a tokio runtime with its time driver enabled
    /// (every call to Redis is timed on tokio's clock).
    pub async fn push<T: Serialize>(&self, key: &str, item: &T) -> Result<bool, QueueError> {
        Ok(self.push_all([(key.to_owned(), item)]).await? == 1)
    }

    /// Enqueues every `(key, item)` whose key is not remembered; returns
    /// how many were. A key is remembered from its push until the
    /// [dedupe window](Self::dedupe_window) after its item is done, so a
    /// key pushed twice, or by another producer, within that time is
    /// skipped.
    ///
    /// # Errors
    ///
    /// When Redis cannot be reached (the chunks sent before stay
    /// enqueued: push again, the keys make it safe), or an item cannot be
    /// serialized.
    ///
    /// # Cancel safety
    ///
    /// Dropped part way, the chunks already sent stay enqueued and the one
    /// in flight may or may not be; pushing the same items again is safe,
    /// their keys make it a no-op for those already in.
    ///
    /// # Panics
    ///
    /// When polled outside a tokio runtime with its time driver enabled
    /// (every call to Redis is timed on tokio's clock).
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
            let mut keys = vec![self.inner.stream.as_bytes().to_vec()];
            let mut args = Vec::new();
            for (key, item) in items.by_ref().take(PUSH_CHUNK) {
                let key: String = key.into();
                let json = serde_json::to_string(&item).map_err(|e| self.error(e))?;
                keys.push(self.seen_key(key.as_bytes()));
                args.push(key);
                args.push(json);
            }
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(PUSH).arg(keys.len()).arg(keys).arg(args);
            added += self.query::<u64>(&cmd).await?;
        }
        Ok(added)
    }

    /// How many items were delivered to a consumer and not acknowledged.
    ///
    /// # Errors
    ///
    /// When Redis cannot be reached.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads (after creating the consumer group if
    /// needed, which is idempotent).
    ///
    /// # Panics
    ///
    /// When polled outside a tokio runtime with its time driver enabled
    /// (every call to Redis is timed on tokio's clock).
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

    /// The first `count` dead letters of this queue, oldest first: the
    /// entries that could not be decoded, with their raw fields (see the
    /// module docs).
    ///
    /// # Errors
    ///
    /// When Redis cannot be reached.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads.
    ///
    /// # Panics
    ///
    /// When polled outside a tokio runtime with its time driver enabled
    /// (every call to Redis is timed on tokio's clock).
    pub async fn dead_letters(&self, count: usize) -> Result<Vec<DeadEntry>, QueueError> {
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(&self.inner.dead)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(count);
        let reply: Value = self.query(&cmd).await?;
        let Value::Array(entries) = reply else {
            return Ok(Vec::new());
        };
        Ok(entries
            .into_iter()
            .filter_map(entry)
            .filter_map(|Entry { id, fields }| {
                let mut fields = fields?.into_iter();
                let (_, entry) = fields.next()?;
                let (_, error) = fields.next()?;
                Some(DeadEntry {
                    id,
                    entry: String::from_utf8_lossy(&entry).into_owned(),
                    error: String::from_utf8_lossy(&error).into_owned(),
                    fields: fields.collect(),
                })
            })
            .collect())
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
    /// `T` becomes a [dead letter](Self::dead_letters), so it cannot block
    /// the queue. While Redis is unreachable the stream waits for it (see
    /// the module docs).
    ///
    /// # Cancel safety
    ///
    /// Dropping the stream loses no item: the entries it read and did not
    /// yield stay pending in Redis with this consumer, read again first by
    /// the next stream of the same consumer name, or claimed by another
    /// after [`claim_after`](Self::claim_after). An acknowledgement or dead
    /// letter in flight when it is dropped may not be taken: the entry
    /// comes again (and [`skip_done`](Jobs::skip_done) acknowledges it).
    ///
    /// # Panics
    ///
    /// When polled (the stream) outside a tokio runtime with its time driver enabled
    /// (every call to Redis is timed on tokio's clock).
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
    /// its result or dead letter is committed. An acknowledgement Redis
    /// cannot take for now is tried again until it can (the next result
    /// waits meanwhile); one it refuses for good is logged, and the job
    /// stays pending and is delivered again (the journal skips it as done).
    ///
    /// # Cancel safety
    ///
    /// Dropping the stream drops `results`; the job of the last result it
    /// passed on may not be acknowledged yet. Its entry stays pending and
    /// comes again, which is what a result the sink had not committed
    /// needs; a journal skips it if it had.
    ///
    /// # Panics
    ///
    /// When polled (the stream) outside a tokio runtime with its time driver enabled
    /// (every call to Redis is timed on tokio's clock).
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
            (Box::pin(results), None::<(String, String)>, queue),
            |(mut results, committed, queue)| async move {
                if let Some((id, key)) = committed {
                    queue.ack(&id, Some(key.as_bytes())).await;
                }
                let next = results.next().await?;
                let job = match &next {
                    Ok(value) => value.item(),
                    Err(failure) => failure.item(),
                };
                let committed = (job.id.clone(), job.key.clone());
                Some((next, (results, Some(committed), queue)))
            },
        )
    }

    /// Acknowledges entry `id` and deletes it from the stream, and starts
    /// the expiry of its key's marker, in one transaction; tried until
    /// Redis takes it. A refusal is logged: the entry stays pending and
    /// comes again.
    async fn ack(&self, id: &str, key: Option<&[u8]>) {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("XACK")
            .arg(&self.inner.stream)
            .arg(&self.inner.group)
            .arg(id)
            .ignore()
            .cmd("XDEL")
            .arg(&self.inner.stream)
            .arg(id)
            .ignore();
        if let Some(key) = key {
            pipe.cmd("PEXPIRE")
                .arg(self.seen_key(key))
                .arg(self.inner.dedupe_window.as_millis().max(1) as u64)
                .ignore();
        }
        let acked = self
            .persist("acknowledge", || self.timed::<()>(Call::Pipe(&pipe)))
            .await;
        if let Err(e) = acked {
            tracing::warn!(error = %e, id, "could not acknowledge; the item will come again");
        }
        self.release(id);
    }

    /// Moves an undecodable entry to the dead letters (see [`DEAD`]); tried
    /// until Redis takes it.
    async fn dead_letter(&self, consumer: &str, entry: &Entry, error: &str) {
        let key = entry
            .fields
            .as_deref()
            .and_then(|fields| field(fields, b"key"))
            .map(|key| self.seen_key(key));
        let moved = self
            .persist("dead-letter", || {
                let mut invocation = DEAD_SCRIPT.prepare_invoke();
                invocation.key(&self.inner.stream).key(&self.inner.dead);
                if let Some(key) = &key {
                    invocation.key(key);
                }
                invocation
                    .arg(&self.inner.group)
                    .arg(consumer)
                    .arg(&entry.id)
                    .arg(error)
                    .arg(self.inner.dedupe_window.as_millis().max(1) as u64);
                async move { self.timed::<u8>(Call::Script(&invocation)).await }
            })
            .await;
        match moved {
            Ok(1) => {}
            Ok(_) => {
                tracing::debug!(id = %entry.id, "an undecodable entry was claimed by another consumer")
            }
            Err(e) => {
                tracing::warn!(error = %e, id = %entry.id, "could not dead-letter; the entry will come again")
            }
        }
        self.release(&entry.id);
    }

    /// Acknowledges entries deleted from the stream while pending.
    async fn ack_deleted(&self, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        let mut cmd = redis::cmd("XACK");
        cmd.arg(&self.inner.stream).arg(&self.inner.group).arg(ids);
        if let Err(e) = self
            .persist("acknowledge", || self.query::<u64>(&cmd))
            .await
        {
            tracing::warn!(error = %e, "could not acknowledge deleted entries");
        }
        for id in ids {
            self.release(id);
        }
    }

    /// Takes entry `id` for `reader`, unless another reader still running
    /// holds it.
    fn hold(&self, id: &str, reader: &Arc<()>) -> bool {
        let mut held = self
            .inner
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if held.get(id).is_some_and(|r| r.strong_count() > 0) {
            return false;
        }
        held.insert(id.to_owned(), Arc::downgrade(reader));
        if held.len().is_multiple_of(1024) {
            // Entries of readers dropped without acknowledging them.
            held.retain(|_, r| r.strong_count() > 0);
        }
        true
    }

    fn release(&self, id: &str) {
        self.inner
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
    }

    /// The entries `reader` holds.
    fn held_by(&self, reader: &Weak<()>) -> Vec<String> {
        self.inner
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|(_, r)| Weak::ptr_eq(r, reader))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Renews, every quarter of [`claim_after`](Self::claim_after), the
    /// entries `reader` holds for `consumer`, until `reader` is dropped.
    /// One call tried once: a renewal Redis misses is made at the next.
    async fn renew_while_held(self, consumer: String, reader: Weak<()>) {
        let every = (self.inner.claim_after / 4).max(RENEW_FLOOR);
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Held entries found claimed by another worker, said once each.
        let mut taken_away = HashSet::new();
        // Renewals failing since the last that went through: an outage is
        // said once, not at every tick.
        let mut failing = false;
        while reader.strong_count() > 0 {
            ticks.tick().await;
            let held = self.held_by(&reader);
            taken_away.retain(|id| held.contains(id));
            for ids in held.chunks(RENEW_CHUNK) {
                let mut invocation = RENEW_SCRIPT.prepare_invoke();
                invocation
                    .key(&self.inner.stream)
                    .arg(&self.inner.group)
                    .arg(&consumer)
                    .arg(ids);
                match self.timed::<Vec<String>>(Call::Script(&invocation)).await {
                    Ok(taken) => {
                        failing = false;
                        let new = taken
                            .into_iter()
                            .filter(|id| taken_away.insert(id.clone()))
                            .count();
                        if new > 0 {
                            // Stopped, or cut off from Redis, for longer
                            // than claim_after: another worker claimed them.
                            tracing::warn!(
                                queue = %self.inner.name,
                                consumer = %consumer,
                                items = new,
                                "items held here were claimed by another worker and may be done twice"
                            );
                        }
                    }
                    Err(e) if failing => {
                        tracing::debug!(error = %e, "could not renew the items held; trying again");
                    }
                    Err(e) => {
                        failing = true;
                        tracing::warn!(error = %e, "could not renew the items held; trying again");
                    }
                }
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
    /// any consumer, for `consumer`; returns them, and the ids of entries
    /// deleted meanwhile.
    async fn claim(
        &self,
        consumer: &str,
        count: usize,
    ) -> Result<(Vec<Entry>, Vec<String>), QueueError> {
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
            return Ok((Vec::new(), Vec::new()));
        };
        let mut parts = parts.into_iter().skip(1);
        let entries = match parts.next() {
            Some(Value::Array(entries)) => entries.into_iter().filter_map(entry).collect(),
            _ => Vec::new(),
        };
        let deleted = match parts.next() {
            Some(Value::Array(deleted)) => deleted.iter().filter_map(text).collect(),
            _ => Vec::new(),
        };
        Ok((entries, deleted))
    }
}

/// One call to Redis, as [`WorkQueue::timed`] runs it.
#[derive(Clone, Copy)]
enum Call<'a> {
    Cmd(&'a redis::Cmd),
    Pipe(&'a redis::Pipeline),
    Script(&'a redis::ScriptInvocation<'a>),
}

/// An entry as read: its id, and its raw fields when it still exists.
struct Entry {
    id: String,
    fields: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

fn bytes(value: &Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(bytes) => Some(bytes.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        _ => None,
    }
}

fn text(value: &Value) -> Option<String> {
    bytes(value).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// `[id, [field, value, ...]]` (the fields nil for a deleted entry).
fn entry(value: Value) -> Option<Entry> {
    let Value::Array(parts) = value else {
        return None;
    };
    let id = text(parts.first()?)?;
    let fields = match parts.get(1) {
        Some(Value::Array(fields)) => Some(
            fields
                .chunks(2)
                .filter_map(|pair| Some((bytes(pair.first()?)?, bytes(pair.get(1)?)?)))
                .collect(),
        ),
        _ => None,
    };
    Some(Entry { id, fields })
}

fn field<'a>(fields: &'a [(Vec<u8>, Vec<u8>)], name: &[u8]) -> Option<&'a [u8]> {
    fields
        .iter()
        .find(|(f, _)| f == name)
        .map(|(_, v)| v.as_slice())
}

/// The key and item of an entry's fields, or why they are not there, in
/// words that hold nothing of the entry (see [`item_error`]).
fn decode<T: DeserializeOwned>(fields: &[(Vec<u8>, Vec<u8>)]) -> Result<(String, T), String> {
    let key = field(fields, b"key").ok_or("no `key` field")?;
    let key = std::str::from_utf8(key).map_err(|_| "the `key` field is not UTF-8")?;
    let item = field(fields, b"item").ok_or("no `item` field")?;
    let item = serde_json::from_slice(item).map_err(|e| item_error(&e))?;
    Ok((key.to_owned(), item))
}

/// Why an `item` field does not decode: the kind of error and where, never
/// serde_json's own text, which quotes the values it refused (`invalid
/// type: string "…"`) and so whatever secret an item carries. This text is
/// logged and kept as the dead letter's [`error`](DeadEntry::error); the
/// item itself stays in the dead letter's fields, to be decoded again where
/// the whole message is wanted.
fn item_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Data => "is JSON, but not of the item type",
        Category::Syntax => "is not JSON",
        Category::Eof => "ends before its JSON does",
        Category::Io => "could not be read",
    };
    format!(
        "the `item` field does not decode: it {what} (line {}, column {})",
        e.line(),
        e.column()
    )
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
        let holder = Arc::new(());
        let state = Reader {
            queue: self.queue.clone(),
            consumer: self.consumer.clone(),
            skip: self.skip.take(),
            until_drained: self.until_drained,
            batch: self.batch,
            buffer: VecDeque::new(),
            own_pending_from: Some("0".to_owned()),
            _renewal: Task::spawn(
                self.queue
                    .clone()
                    .renew_while_held(self.consumer.clone(), Arc::downgrade(&holder)),
            ),
            holder,
            delay: self.queue.inner.poll_every,
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
    /// are all read: at the start, and again after an error.
    own_pending_from: Option<String>,
    /// What this reader's held entries point to: once it is dropped, they
    /// are free to read again.
    holder: Arc<()>,
    /// Renews the held entries while the pipeline works on them, however
    /// long that takes; ends with the reader.
    _renewal: Task<()>,
    /// The wait before trying Redis again after a failure.
    delay: Duration,
}

impl<T: DeserializeOwned> Reader<T> {
    async fn next(&mut self) -> Option<Job<T>> {
        loop {
            while let Some(entry) = self.buffer.pop_front() {
                let Some(fields) = &entry.fields else {
                    // Deleted from the stream while pending.
                    self.queue.ack_deleted(&[entry.id]).await;
                    continue;
                };
                match decode::<T>(fields) {
                    Ok((key, item)) => {
                        let job = Job {
                            id: entry.id,
                            key,
                            item,
                        };
                        if self.skip.as_ref().is_some_and(|done| done(&job)) {
                            self.queue.ack(&job.id, Some(job.key.as_bytes())).await;
                        } else {
                            return Some(job);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(id = %entry.id, error = %error, "an undecodable queue entry goes to the dead letters");
                        self.queue.dead_letter(&self.consumer, &entry, &error).await;
                    }
                }
            }
            let filled = match self.fill().await {
                Ok(true) => Ok(()),
                Ok(false) if self.until_drained => match self.queue.pending().await {
                    Ok(0) => return None,
                    Ok(_) => {
                        tokio::time::sleep(self.queue.inner.poll_every).await;
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
                Ok(false) => {
                    tokio::time::sleep(self.queue.inner.poll_every).await;
                    Ok(())
                }
                Err(e) => Err(e),
            };
            match filled {
                Ok(()) => self.delay = self.queue.inner.poll_every,
                Err(e) => {
                    if e.transient {
                        tracing::warn!(error = %e, "cannot read the work queue; trying again");
                    } else {
                        tracing::error!(error = %e, "cannot read the work queue; trying again");
                    }
                    // A reply lost with the connection may have handed
                    // this consumer entries it never saw: read its own
                    // pending entries again (those held are skipped).
                    self.own_pending_from = Some("0".to_owned());
                    tokio::time::sleep(self.delay).await;
                    self.delay = (self.delay * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Takes the entries not held by a running reader into the buffer.
    fn take(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            if self.queue.hold(&entry.id, &self.holder) {
                self.buffer.push_back(entry);
            }
        }
    }

    /// Reads the next batch into the buffer; `false` when there was none.
    async fn fill(&mut self) -> Result<bool, QueueError> {
        self.queue.ensure_group().await?;
        while let Some(from) = self.own_pending_from.clone() {
            let entries = self.queue.read(&self.consumer, &from, self.batch).await?;
            self.own_pending_from = entries.last().map(|last| last.id.clone());
            self.take(entries);
            if !self.buffer.is_empty() {
                return Ok(true);
            }
        }
        let entries = self.queue.read(&self.consumer, ">", self.batch).await?;
        if entries.is_empty() {
            let (claimed, deleted) = self.queue.claim(&self.consumer, self.batch).await?;
            self.queue.ack_deleted(&deleted).await;
            self.take(claimed);
        } else {
            self.take(entries);
        }
        Ok(!self.buffer.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(item: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        vec![
            (b"key".to_vec(), b"k".to_vec()),
            (b"item".to_vec(), item.to_vec()),
        ]
    }

    /// serde_json's messages quote the values they refuse; the error of an
    /// undecodable entry, logged and dead-lettered, says where, not what.
    #[test]
    fn an_undecodable_item_is_described_without_its_values() {
        let cases: [(&[u8], &str); 4] = [
            (
                b"\"PAYLOADSECRET\"",
                "it is JSON, but not of the item type (line 1, column 15)",
            ),
            (
                b"{\"PAYLOADSECRET\": 1}",
                "it is JSON, but not of the item type (line 1, column 0)",
            ),
            (b"PAYLOADSECRET", "it is not JSON (line 1, column 1)"),
            (
                b"\"PAYLOADSECRET",
                "it ends before its JSON does (line 1, column 14)",
            ),
        ];
        for (item, expected) in cases {
            let raw = serde_json::from_slice::<u64>(item).unwrap_err().to_string();
            let error = decode::<u64>(&entry(item)).unwrap_err();
            assert!(!error.contains("PAYLOADSECRET"), "{error} (serde: {raw})");
            assert_eq!(
                error,
                format!("the `item` field does not decode: {expected}"),
                "serde: {raw}"
            );
        }
    }
}
