//! One rate budget, one pause and one work queue for many processes,
//! through Redis (feature `redis`).
//!
//! The limit is decided on the Redis server, by a Lua script that reads the
//! server's own clock (`TIME`): no worker's clock is ever consulted, so
//! clock skew between workers cannot over-issue. A token is granted only
//! when it is due by that clock; otherwise the reply says how long until it
//! is, and the worker sleeps exactly that long before asking again (there
//! is no reservation a fast clock could cash in early). Only the head of
//! each process's line of waiting requests asks (see `line`), and Redis
//! gives each head its own turn, so the calls grow with the tokens granted,
//! not with the requests waiting. A pause is a deadline stored in Redis
//! (only ever extended, capped by `max_pause`); the limiter's script
//! refuses tokens while it holds, and a pub/sub channel carries pauses and
//! resumes to every worker's [`PauseHandle`] at once.
//!
//! When Redis is unreachable, [`FailureMode`] decides: wait for it (and give
//! up with a clear error after a limit), or fall back to an in-process
//! limiter at a share of the rate and of the burst. Either way the
//! connection is retried on its own, and the rate is never silently
//! unlimited.
//!
//! The work itself is shared by a [`WorkQueue`]: a Redis Stream read by a
//! consumer group, each item acknowledged once its result is committed.
//!
//! ```no_run
//! use sluicegate::redis::{FailureMode, RedisCoordinator};
//! use sluicegate::{Client, Rate};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let redis = RedisCoordinator::new("redis://127.0.0.1:6379", "my-api")?
//!     .on_failure(FailureMode::FallbackLocal { share: 0.25 });
//! let client = Client::builder()
//!     .base_url("https://api.example.com")
//!     .limiter(redis.limiter(Rate::per_second(200).burst(5)))
//!     .pause_handle(redis.pause_handle())
//!     .build()?;
//! # let _ = client;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use crate::error::BuildError;
use crate::limiter::{Limiter, RemoteBudget};
use crate::pause::{PauseHandle, RemotePause, WeakPauseHandle};
use crate::rate::Rate;

mod line;
mod queue;

/// The connection kept in `slot`, made on first use with `timeout` for
/// connecting and for every answer. The slot's lock is held only to look.
async fn connect(
    slot: &tokio::sync::Mutex<Option<ConnectionManager>>,
    client: &redis::Client,
    timeout: Duration,
) -> redis::RedisResult<ConnectionManager> {
    let mut slot = slot.lock().await;
    if slot.is_none() {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        *slot = Some(ConnectionManager::new_with_config(client.clone(), config).await?);
    }
    Ok(slot.clone().expect("connected above"))
}

pub(crate) use self::line::Outcome;
pub use self::queue::{DeadEntry, Job, Jobs, QueueError, WorkQueue};

/// Take a token of a GCRA limit if one is due now by the Redis server's
/// clock, and hand out turns so that the heads of many processes' lines do
/// not all come back at once.
///
/// `KEYS`: the limit's theoretical arrival time (µs), the shared pause's
/// end, and the instant of the last turn handed out. `ARGV`: interval and
/// burst tolerance (µs), the lateness forgiven to a head coming back for
/// its turn (µs), the caller's turn (an instant of this clock in µs, as a
/// reply gave it; 0 when it holds none), and whether it wants a turn for
/// another token after this one (1).
///
/// Returns `{status, wait_us, turn}`: 1 = granted (`wait_us` until the
/// caller's turn `turn` for the next token, or -1 when it asked for none);
/// 0 = not yet, come back for your turn `turn`, in `wait_us`; 2 = the
/// shared pause holds for `wait_us`.
///
/// A turn is the instant of a token nobody else was given a turn for, so
/// each head comes back when a token is due for it and the next call is a
/// grant. A turn reserves nothing: a token is still granted only when due
/// by this clock, and tokens are not earmarked, so a late head costs no
/// one their token. While turns are outstanding, a newcomer is given one
/// behind them rather than a token that a head is on its way to take.
///
/// A head keeps its place in this line of turns:
/// - arriving before its turn (its clock runs fast), it is told to come
///   back at the same turn, not given a new one behind the others;
/// - arriving on time when its token is not due yet (the rate was lowered
///   meanwhile), it comes back when it is due, still ahead of the turns
///   handed out after its own.
///
/// A head is forgiven lateness up to `ARGV[3]` (its round trip and a timer
/// tick, capped): its token is dated no earlier than that, so the rate
/// stays exact. A head later than that takes a token only if one was due
/// longer ago than that (left by a head that missed its turn, or its own:
/// no head still on time can be coming for it), and, when that token must
/// be dated later than it was due, only if the burst lets the next token
/// be due at once too. Otherwise it has missed its turn and asks as a
/// newcomer: granted a token dated at its late arrival, it would push the
/// next token past the next head's turn, and that head would arrive early.
const TAKE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local paused = tonumber(redis.call('GET', KEYS[2]) or '0')
if paused > now then
  redis.call('DEL', KEYS[3])
  return {2, paused - now, 0}
end
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local grace = tonumber(ARGV[3])
local turn = tonumber(ARGV[4])
local more = ARGV[5] == '1'
if turn > now then
  return {0, turn - now, turn}
end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local last = tonumber(redis.call('GET', KEYS[3]) or '0')
local has_turn = false
if turn > 0 then
  if now - turn <= grace then
    has_turn = true
    if tat < now - grace then tat = now - grace end
  elseif tat - tolerance <= now - grace and (tat >= now - grace or tolerance >= interval) then
    has_turn = true
    if tat < now - grace then tat = now - grace end
  end
end
if not has_turn and tat < now then tat = now end
if has_turn and tat - tolerance > now then
  local due = tat - tolerance
  if due > last then
    redis.call('SET', KEYS[3], string.format('%.0f', due), 'PX', math.floor((due - now) / 1000) + 1000)
  end
  return {0, due - now, due}
end
local granted = 0
if tat - tolerance <= now and (has_turn or last < now - grace) then
  granted = 1
  tat = tat + interval
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
  if not more then
    return {1, -1, 0}
  end
end
local next = tat - tolerance
if next < last + interval then next = last + interval end
if next < now then next = now end
redis.call('SET', KEYS[3], string.format('%.0f', next), 'PX', math.floor((next - now) / 1000) + 1000)
return {granted, next - now, next}
";

/// The lateness always forgiven a head coming back for its turn: tokio's
/// timer tick (a timer fires up to a tick late) and a margin. The head's
/// measured round trip to Redis is forgiven on top, since its turn is
/// counted from Redis's clock and reaches it a round trip later.
const LATE_FORGIVEN: Duration = Duration::from_millis(2);

/// The most lateness forgiven, however slow the round trip: a token is
/// never dated further back, so a burst never exceeds the configured one
/// by more than this much of the rate.
const LATE_FORGIVEN_MAX: Duration = Duration::from_millis(10);

static TAKE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(TAKE));

static PAUSE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(PAUSE));

/// End the shared pause now and tell every worker.
const RESUME: &str = "redis.call('DEL', KEYS[1]) redis.call('PUBLISH', KEYS[2], 'resume') return 1";

static RESUME_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RESUME));

/// Extend the shared pause to `now + ARGV[1]` µs (never shorten it) and
/// tell every worker how long is left.
const PAUSE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local wanted = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if wanted > current then
  redis.call('SET', KEYS[1], string.format('%.0f', wanted), 'PX', math.floor(tonumber(ARGV[1]) / 1000) + 1000)
  redis.call('PUBLISH', KEYS[2], 'pause ' .. ARGV[1])
  return tonumber(ARGV[1])
end
return current - now
";

/// What a worker does while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FailureMode {
    /// Wait for Redis, retrying the connection; a fetch waiting longer than
    /// `give_up_after` fails with a clear error instead of sending.
    FailClosed {
        /// How long one acquisition may wait for Redis.
        give_up_after: Duration,
    },
    /// Go on with an in-process limiter at `share` of the rate and of the
    /// burst (say 0.25 for four workers), until Redis answers again. The
    /// burst is rounded down but never below one, so four workers falling
    /// back from a burst of 8 keep 2 each; from a burst of 2, 1 each (the
    /// least there is, so together they may still burst 4).
    /// [`Limiter::set_rate`] rescales the share with the shared rate: the
    /// fallback is always `share` of the rate and burst in force.
    FallbackLocal {
        /// The share of the shared rate this worker may use alone.
        share: f64,
    },
}

/// The connection and names shared by the limiters and the pause of one
/// API. Cheap to clone.
#[derive(Clone)]
pub struct RedisCoordinator {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    name: String,
    failure: FailureMode,
    op_timeout: Duration,
    retry_every: Duration,
    max_pause: Duration,
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
    /// After a failure, Redis is not asked again before this instant.
    down_until: Mutex<Option<Instant>>,
    /// The shared pause while any handle to it lives. Weak: the handle
    /// holds the coordinator (to publish), so a strong one here would keep
    /// both, and the pause's tasks, alive for ever.
    pause: Mutex<Option<WeakPauseHandle>>,
}

impl fmt::Debug for RedisCoordinator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCoordinator")
            .field("name", &self.inner.name)
            .field("failure", &self.inner.failure)
            .finish_non_exhaustive()
    }
}

impl RedisCoordinator {
    /// Coordinates through the Redis at `url`; `name` prefixes every key and
    /// channel, so several APIs can share one Redis. Nothing connects until
    /// first use.
    ///
    /// # Errors
    ///
    /// If `url` is not a Redis URL.
    pub fn new(url: &str, name: &str) -> Result<Self, BuildError> {
        let client = redis::Client::open(url)
            .map_err(|e| BuildError::new(format!("invalid Redis URL: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                name: name.to_owned(),
                failure: FailureMode::FailClosed {
                    give_up_after: Duration::from_secs(30),
                },
                op_timeout: Duration::from_millis(500),
                retry_every: Duration::from_millis(500),
                max_pause: PauseHandle::DEFAULT_MAX_PAUSE,
                connection: tokio::sync::Mutex::new(None),
                down_until: Mutex::new(None),
                pause: Mutex::new(None),
            }),
        })
    }

    fn configure(mut self, f: impl FnOnce(&mut Inner)) -> Self {
        let inner =
            Arc::get_mut(&mut self.inner).expect("configure a coordinator before sharing it");
        f(inner);
        self
    }

    /// What to do while Redis is unreachable (default: fail closed after 30 s).
    ///
    /// # Panics
    ///
    /// If called after the coordinator was cloned or used, or with a share
    /// outside (0, 1].
    #[track_caller]
    pub fn on_failure(self, mode: FailureMode) -> Self {
        if let FailureMode::FallbackLocal { share } = mode {
            assert!(
                share > 0.0 && share <= 1.0,
                "FallbackLocal share must be within (0, 1]"
            );
        }
        self.configure(|i| i.failure = mode)
    }

    /// The cap on a shared pause (default [`PauseHandle::DEFAULT_MAX_PAUSE`]).
    ///
    /// # Panics
    ///
    /// If called after the coordinator was cloned or used.
    #[track_caller]
    pub fn max_pause(self, max: Duration) -> Self {
        self.configure(|i| i.max_pause = max)
    }

    /// How long one Redis call may take before it counts as a failure
    /// (default 500 ms), and how long to leave Redis alone after one.
    ///
    /// # Panics
    ///
    /// If called after the coordinator was cloned or used.
    #[track_caller]
    pub fn timeouts(self, op_timeout: Duration, retry_every: Duration) -> Self {
        self.configure(|i| {
            i.op_timeout = op_timeout;
            i.retry_every = retry_every;
        })
    }

    /// A limiter of `rate` shared by every process using this name.
    pub fn limiter(&self, rate: Rate) -> Limiter {
        self.limiter_for("default", rate)
    }

    /// A limiter of `rate` for `key` (per host, per tenant...), shared by
    /// every process using this name and key.
    ///
    /// Each process's waiters queue locally and only the head of the line
    /// asks Redis, so the Redis calls grow with the tokens granted (about
    /// one per token), not with the requests waiting.
    ///
    /// The head is a task of the limiter's, started by the first waiter
    /// (so acquiring needs a tokio runtime) and aborted as soon as nobody
    /// waits: nothing runs behind a limiter that is not used. Acquiring
    /// is cancel safe: a waiter dropped before its turn leaves the line and
    /// takes no token; a token granted to it as it was dropped is spent,
    /// never handed on late in a burst.
    pub fn limiter_for(&self, key: &str, rate: Rate) -> Limiter {
        let key = format!("{}:limit:{key}", self.inner.name);
        let fallback = fallback_rate(self.inner.failure, rate);
        // The limiter's own local budget is never used: the fallback lives
        // with the remote limit, where `set_rate` reaches it.
        Limiter::with_remote(
            fallback,
            Arc::new(RemoteLimit {
                coordinator: self.clone(),
                turns: format!("{key}:turns"),
                key,
                rate: Mutex::new(rate),
                fallback: Limiter::new(fallback),
                line: line::Line::default(),
                round_trip: AtomicU64::new(0),
            }),
        )
    }

    /// The pause shared by every process using this name.
    ///
    /// The first call starts two tasks: one listening for other workers'
    /// pauses and resumes, one publishing this process's, in the order
    /// they were made (a resume never overtakes the pause before it).
    /// Later calls return the same handle while any clone of it lives.
    /// Both tasks belong to the handle: once its last clone is dropped the
    /// listener is aborted, and the publisher ends after sending what was
    /// already announced (each call bounded by the
    /// [operation timeout](Self::timeouts)), so nothing runs on behind a
    /// coordinator that is no longer used.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime, the first time (or after every
    /// handle was dropped).
    #[track_caller]
    pub fn pause_handle(&self) -> PauseHandle {
        let mut slot = self
            .inner
            .pause
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(pause) = slot.as_ref().and_then(WeakPauseHandle::upgrade) {
            return pause;
        }
        let (announce, announcements) = mpsc::unbounded_channel();
        let shared = Arc::new(SharedPause {
            announce,
            listener: std::sync::OnceLock::new(),
        });
        let pause = PauseHandle::with_remote(self.inner.max_pause, shared.clone());
        // Not owned by the handle: it ends by itself once every handle
        // (every sender) is gone and what they announced is sent.
        drop(tokio::spawn(publish(self.clone(), announcements)));
        let listener =
            AbortOnDropHandle::new(tokio::spawn(listen(self.clone(), pause.downgrade())));
        let _ = shared.listener.set(listener);
        *slot = Some(pause.downgrade());
        pause
    }

    fn pause_key(&self) -> String {
        format!("{}:pause", self.inner.name)
    }

    fn channel(&self) -> String {
        format!("{}:pauses", self.inner.name)
    }

    /// Runs `script`, unless Redis failed a moment ago.
    async fn call<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T, String> {
        let now = Instant::now();
        if let Some(until) = *self
            .inner
            .down_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            if now < until {
                return Err("Redis was unreachable a moment ago".to_owned());
            }
        }
        let result = tokio::time::timeout(self.inner.op_timeout, async {
            let mut connection = connect(
                &self.inner.connection,
                &self.inner.client,
                self.inner.op_timeout,
            )
            .await?;
            invocation.invoke_async::<T>(&mut connection).await
        })
        .await;
        let error = match result {
            Ok(Ok(value)) => {
                *self
                    .inner
                    .down_until
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                return Ok(value);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer from Redis within {:?}", self.inner.op_timeout),
        };
        *self
            .inner
            .down_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(now + self.inner.retry_every);
        tracing::warn!(name = %self.inner.name, error = %error, "Redis unavailable");
        Err(error)
    }
}

/// The in-process limit a worker falls back to: its share of the rate and
/// of the burst, so that workers falling back together neither send faster
/// nor burst higher than the shared limit allows. The burst is rounded down
/// (at least one token, the smallest burst there is).
fn fallback_rate(failure: FailureMode, rate: Rate) -> Rate {
    match failure {
        FailureMode::FallbackLocal { share } => {
            let burst = (f64::from(rate.burst_size()) * share).floor() as u32;
            Rate::per_second_f64_burst(rate.per_second_f64() * share, burst.max(1))
        }
        FailureMode::FailClosed { .. } => rate,
    }
}

/// A pause or resume made here, for the other workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Announcement {
    /// A pause of this long from when Redis takes it.
    Pause(Duration),
    /// The pause ended.
    Resume,
}

/// What a Redis-backed [`PauseHandle`] holds: the way to the publisher,
/// and the listener, whose task ends when the last handle is dropped.
struct SharedPause {
    announce: mpsc::UnboundedSender<Announcement>,
    /// Set right after the handle is made (the listener needs a weak
    /// handle to it).
    listener: std::sync::OnceLock<AbortOnDropHandle<()>>,
}

/// One queue, so announcements reach Redis in the order they were made:
/// a task per announcement could let a resume run before the pause it
/// ends, and leave every worker paused. Unbounded, as the watch channel of
/// the handle itself is: announcements are made only when the deadline
/// actually moves, and each is sent within the operation timeout.
impl RemotePause for SharedPause {
    fn publish_pause(&self, duration: Duration) {
        // Fails only once the publisher is gone with its runtime.
        let _ = self.announce.send(Announcement::Pause(duration));
    }

    fn publish_resume(&self) {
        let _ = self.announce.send(Announcement::Resume);
    }
}

/// The publisher: sends this process's pauses and resumes to Redis one at
/// a time, in order. Ends when every handle is dropped and the queue is
/// empty. An announcement Redis does not take in time is dropped with a
/// warning (as `call` logs it): the pause still holds here, and the
/// limiter's own refusals carry a pause that Redis did take.
async fn publish(
    coordinator: RedisCoordinator,
    mut announcements: mpsc::UnboundedReceiver<Announcement>,
) {
    while let Some(announcement) = announcements.recv().await {
        let mut invocation = match announcement {
            Announcement::Pause(duration) => {
                let mut invocation = PAUSE_SCRIPT.prepare_invoke();
                invocation.arg(u64::try_from(duration.as_micros()).unwrap_or(u64::MAX));
                invocation
            }
            Announcement::Resume => RESUME_SCRIPT.prepare_invoke(),
        };
        invocation
            .key(coordinator.pause_key())
            .key(coordinator.channel());
        let _ = coordinator.call::<i64>(invocation).await;
    }
}

/// Follows the pause channel, applying other workers' pauses and resumes
/// to the local handle; reconnects after a failure. Ends when the handle
/// is dropped.
async fn listen(coordinator: RedisCoordinator, pause: WeakPauseHandle) {
    loop {
        if let Ok(mut pubsub) = coordinator.inner.client.get_async_pubsub().await {
            if pubsub.subscribe(coordinator.channel()).await.is_ok() {
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    let Some(pause) = pause.upgrade() else { return };
                    let text: String = message.get_payload().unwrap_or_default();
                    if text == "resume" {
                        pause.resume_local();
                    } else if let Some(micros) = text
                        .strip_prefix("pause ")
                        .and_then(|m| m.parse::<u64>().ok())
                    {
                        pause.pause_local(Duration::from_micros(micros));
                    }
                }
            }
        }
        if pause.upgrade().is_none() {
            return;
        }
        tokio::time::sleep(coordinator.inner.retry_every).await;
    }
}

/// One Redis-backed limit, and this process's line for it.
pub(crate) struct RemoteLimit {
    coordinator: RedisCoordinator,
    key: String,
    /// Where Redis keeps the last turn it handed out.
    turns: String,
    rate: Mutex<Rate>,
    /// The in-process limit used while Redis is unreachable, at this
    /// process's share of `rate` (see [`FailureMode::FallbackLocal`]).
    fallback: Limiter,
    line: line::Line,
    /// The round trip of a call, smoothed (µs).
    round_trip: AtomicU64,
}

/// What the Redis side of a limiter answered.
pub(crate) enum Reply {
    /// A token was taken: go now; `next` is the caller's turn for another,
    /// when it asked for one.
    Granted { next: Option<Turn> },
    /// No token is due yet: come back for this turn.
    NotYet(Turn),
    /// The shared pause holds for this long; nothing was taken.
    Paused(Duration),
    /// Redis could not be asked; the error says why.
    Unavailable(String),
}

/// A head's turn to come back to Redis for a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Turn {
    /// How long from the reply until the turn.
    pub(crate) wait: Duration,
    /// The turn's instant by Redis's clock (µs), handed back with the next
    /// call so that Redis knows whether the head comes on time.
    pub(crate) at: i64,
}

/// How the limiter asks: the head of this process's line asks Redis; while
/// Redis is unreachable, the fallback share grants.
impl RemoteBudget for RemoteLimit {
    fn acquire(
        self: Arc<Self>,
        pause: Option<PauseHandle>,
    ) -> futures::future::BoxFuture<'static, Result<(), String>> {
        Box::pin(async move {
            match RemoteLimit::acquire(&self, pause).await {
                Outcome::Granted | Outcome::Fallback => Ok(()),
                Outcome::Failed(error) => Err(error),
            }
        })
    }

    fn set_rate(&self, rate: Rate) {
        RemoteLimit::set_rate(self, rate);
    }

    fn waiting(&self) -> usize {
        RemoteLimit::waiting(self)
    }
}

impl RemoteLimit {
    /// Waits in this process's line for a token, honouring `pause`.
    /// Cancel safe.
    ///
    /// While Redis is unreachable and the limit falls back, the token is
    /// taken from the in-process fallback here, so the outcome is
    /// [`Granted`](Outcome::Granted) or [`Failed`](Outcome::Failed).
    pub(crate) async fn acquire(self: &Arc<Self>, pause: Option<PauseHandle>) -> Outcome {
        match line::acquire(self, pause.clone()).await {
            Outcome::Fallback => {
                // Boxed: the fallback is a `Limiter` too, and its future
                // type would otherwise contain this one.
                let wait: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
                    match &pause {
                        Some(pause) => Box::pin(self.fallback.acquire_during(pause)),
                        None => Box::pin(self.fallback.acquire()),
                    };
                wait.await;
                Outcome::Granted
            }
            outcome => outcome,
        }
    }

    /// How many of this process's requests wait for a token, from Redis or
    /// from the fallback.
    pub(crate) fn waiting(&self) -> usize {
        self.line.waiting() + self.fallback.waiting()
    }

    pub(crate) fn rate(&self) -> Rate {
        *self
            .rate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Changes the shared rate this process asks Redis for, and its
    /// fallback to its share of the new rate and burst (the fallback's
    /// budget already used carries over in proportion).
    pub(crate) fn set_rate(&self, rate: Rate) {
        *self
            .rate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = rate;
        self.fallback
            .set_rate(fallback_rate(self.coordinator.inner.failure, rate));
    }

    /// The in-process limit used while Redis is unreachable.
    #[cfg(test)]
    fn fallback(&self) -> &Limiter {
        &self.fallback
    }

    /// One call to Redis: a token if one is due, and a turn for the next
    /// when `more` wait. `turn` is the turn Redis gave this head last, if
    /// it holds one.
    async fn take(&self, rate: &Rate, turn: Option<Turn>, more: bool) -> Reply {
        let interval = rate.interval().as_micros().max(1) as u64;
        let tolerance = interval * u64::from(rate.burst_size().saturating_sub(1));
        let round_trip = self.round_trip.load(Ordering::Relaxed);
        let forgiven = (LATE_FORGIVEN.as_micros() as u64 + round_trip)
            .min(LATE_FORGIVEN_MAX.as_micros() as u64);
        let mut invocation = TAKE_SCRIPT.prepare_invoke();
        invocation
            .key(&self.key)
            .key(self.coordinator.pause_key())
            .key(&self.turns)
            .arg(interval)
            .arg(tolerance)
            .arg(forgiven)
            .arg(turn.map_or(0, |t| t.at))
            .arg(u8::from(more));
        let micros = |wait: i64| Duration::from_micros(wait.max(0) as u64);
        let sent = Instant::now();
        let reply = self.coordinator.call::<(i64, i64, i64)>(invocation).await;
        if reply.is_ok() {
            let sample = sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u64;
            self.round_trip
                .store((round_trip * 7 + sample) / 8, Ordering::Relaxed);
        }
        match reply {
            Ok((1, wait, at)) => Reply::Granted {
                next: (wait >= 0).then(|| Turn {
                    wait: micros(wait),
                    at,
                }),
            },
            Ok((0, wait, at)) => Reply::NotYet(Turn {
                wait: micros(wait).max(Duration::from_micros(1)),
                at,
            }),
            Ok((_, wait, _)) => Reply::Paused(micros(wait).max(Duration::from_micros(1))),
            Err(e) => Reply::Unavailable(e),
        }
    }

    pub(crate) fn failure(&self) -> FailureMode {
        self.coordinator.inner.failure
    }

    pub(crate) fn retry_every(&self) -> Duration {
        self.coordinator.inner.retry_every
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    /// Workers falling back together may not burst higher than the shared
    /// limit allows, any more than they may send faster.
    #[test]
    fn the_fallback_share_applies_to_the_burst_too() {
        let rate = Rate::per_second(200).burst(8);
        let share = |share| fallback_rate(FailureMode::FallbackLocal { share }, rate);
        assert_eq!(share(0.25).burst_size(), 2);
        assert!((share(0.25).per_second_f64() - 50.0).abs() < 1e-9);
        assert_eq!(share(1.0 / 3.0).burst_size(), 2, "rounded down");
        assert_eq!(share(0.1).burst_size(), 1, "never below one");
        assert_eq!(share(1.0).burst_size(), 8);
        let closed = fallback_rate(
            FailureMode::FailClosed {
                give_up_after: Duration::from_secs(1),
            },
            rate,
        );
        assert_eq!(closed, rate);
    }

    /// A redis-server of a test's own on a free loopback port, killed when
    /// dropped; `None` (after saying why) when the package is missing and
    /// CI did not ask for it.
    struct Server(std::process::Child, u16);

    impl Server {
        fn start() -> Option<Self> {
            if Command::new("redis-server")
                .arg("--version")
                .output()
                .is_err()
            {
                assert_ne!(
                    std::env::var("SLUICEGATE_REQUIRE_REDIS").as_deref(),
                    Ok("1"),
                    "redis-server not found: install the Debian package `redis-server`"
                );
                eprintln!("skipped: redis-server not found (Debian package `redis-server`)");
                return None;
            }
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut server = Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let stdout = BufReader::new(server.stdout.take().unwrap());
            for line in stdout.lines() {
                if line.unwrap().contains("Ready to accept connections") {
                    break;
                }
            }
            Some(Self(server, port))
        }

        /// A process's limit `name` at `rate`, as `limiter_for` makes it.
        fn limit(&self, name: &str, rate: Rate) -> RemoteLimit {
            let coordinator =
                RedisCoordinator::new(&format!("redis://127.0.0.1:{}/", self.1), name).unwrap();
            RemoteLimit {
                coordinator,
                key: format!("{name}:limit"),
                turns: format!("{name}:limit:turns"),
                rate: Mutex::new(rate),
                fallback: Limiter::new(rate),
                line: line::Line::default(),
                round_trip: AtomicU64::new(0),
            }
        }

        /// Redis's clock, in µs.
        async fn now(&self, limit: &RemoteLimit) -> i64 {
            let mut connection = connect(
                &limit.coordinator.inner.connection,
                &limit.coordinator.inner.client,
                Duration::from_secs(2),
            )
            .await
            .unwrap();
            let (secs, micros): (i64, i64) = redis::cmd("TIME")
                .query_async(&mut connection)
                .await
                .unwrap();
            secs * 1_000_000 + micros
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A worker whose clock runs arbitrarily fast is one that never waits:
    /// it asks again at once, as often as it can, and each time claims a
    /// turn that is just now by Redis's clock, so that it is forgiven the
    /// most lateness there is. Redis's clock still decides.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_that_never_waits_cannot_over_issue() {
        let Some(server) = Server::start() else {
            return;
        };
        let rate = Rate::per_second(100).burst(3);
        let limit = server.limit("skew", rate);
        let started = Instant::now();
        let (mut asked, mut granted) = (0u64, 0u64);
        while started.elapsed() < Duration::from_millis(500) {
            asked += 1;
            let turn = Turn {
                wait: Duration::ZERO,
                at: server.now(&limit).await,
            };
            if matches!(
                limit.take(&rate, Some(turn), true).await,
                Reply::Granted { .. }
            ) {
                granted += 1;
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        assert!(asked > 50, "the worker hammered ({asked} asks)");
        assert!(
            granted as f64 <= 3.0 + 100.0 * elapsed + 1.0,
            "{granted} granted in {elapsed:.3}s"
        );
    }

    /// The heads of two processes, A and B, hold turns one after the
    /// other. B coming back before its turn keeps it, rather than going
    /// behind every turn handed out since; A coming back late, past what
    /// is forgiven, has missed its turn and goes behind B, rather than
    /// taking a token that would make B's turn come too early.
    ///
    /// Real time, on Redis's clock: the interval (500 ms) is far longer
    /// than any lateness a busy machine adds to the steps below.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_head_arriving_early_keeps_its_turn() {
        let Some(server) = Server::start() else {
            return;
        };
        let rate = Rate::per_second(2);
        let a = server.limit("turns", rate);
        let b = server.limit("turns", rate);
        let Reply::Granted { next: Some(turn_a) } = a.take(&rate, None, true).await else {
            panic!("A, first, is granted a token and a turn for the next");
        };
        let Reply::NotYet(turn_b) = b.take(&rate, None, true).await else {
            panic!("B is given a turn behind A's");
        };
        assert_eq!(turn_b.at - turn_a.at, 500_000, "one interval apart");

        // B comes back early, twice: it keeps its turn.
        for _ in 0..2 {
            let Reply::NotYet(again) = b.take(&rate, Some(turn_b), true).await else {
                panic!("B is early: nothing is due for it");
            };
            assert_eq!(again.at, turn_b.at, "B keeps its turn");
        }

        // A comes back 150 ms after its turn, past the 10 ms forgiven: it
        // goes behind B, and B's token stays where it was.
        tokio::time::sleep(turn_a.wait + Duration::from_millis(150)).await;
        let Reply::NotYet(late_a) = a.take(&rate, Some(turn_a), true).await else {
            panic!("A missed its turn: no token now");
        };
        assert_eq!(late_a.at, turn_b.at + 500_000, "A goes behind B");
        let Reply::NotYet(still_b) = b.take(&rate, Some(turn_b), true).await else {
            panic!("B is still early");
        };
        assert_eq!(still_b.at, turn_b.at, "B still keeps its turn");
        assert!(
            server.now(&b).await < turn_b.at,
            "the steps above took less than the interval"
        );
    }

    /// `set_rate` on a Redis limiter moves the fallback with it: the
    /// share of the new rate and of its burst.
    #[tokio::test]
    async fn set_rate_rescales_the_fallback() {
        let coordinator = RedisCoordinator::new("redis://127.0.0.1:1/", "rescale")
            .unwrap()
            .on_failure(FailureMode::FallbackLocal { share: 0.25 });
        let limit = RemoteLimit {
            coordinator,
            key: "rescale:limit".to_owned(),
            turns: "rescale:limit:turns".to_owned(),
            rate: Mutex::new(Rate::per_second(100).burst(8)),
            fallback: Limiter::new(Rate::per_second(25).burst(2)),
            line: line::Line::default(),
            round_trip: AtomicU64::new(0),
        };
        limit.set_rate(Rate::per_second(400).burst(16));
        assert_eq!(limit.rate(), Rate::per_second(400).burst(16));
        let fallback = limit.fallback().rate();
        assert!((fallback.per_second_f64() - 100.0).abs() < 1e-9);
        assert_eq!(fallback.burst_size(), 4);
    }
}
