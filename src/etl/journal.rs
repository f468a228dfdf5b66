//! [`Journal`]: resumable runs that write every item exactly once.
//!
//! # How exactly-once survives `kill -9`
//!
//! Three files: the output (`customers.jsonl`), its dead letters
//! (`customers.failed.jsonl`) and a journal (`customers.jsonl.journal`).
//! For each finished item the sink appends its record to the output or the
//! dead letters, and *then* appends a journal line naming the item's key and
//! the length the file had after the record. The journal is the commit log:
//! a record counts only once its journal line is complete.
//!
//! Opening a journal reads it, keeps the keys it names as done, and cuts the
//! output and dead-letter files back to the last committed length. Whatever
//! a crash left behind (a record without its journal line, half a line) is
//! removed, and the item it belonged to is simply done again. So after any
//! number of crashes and re-runs, each item appears exactly once, in the
//! output or in the dead letters.
//!
//! # One key per first-stage item, whatever stage an item ends in
//!
//! The journal's keys are those of the first stage's items, the ones
//! [`Journal::skip_done`] filters: a re-run can skip only those. So every
//! result is committed under the key of the first-stage item it descends
//! from, in whichever stage it succeeded or failed; a later stage's item
//! leads back to it through [`Journal::origin_of`]. A result that leads
//! nowhere is refused (the run stops with an error naming its type) rather
//! than committed under a key no re-run would ever skip, which would write
//! its item a second time.
//!
//! Failures are committed like successes, so a plain re-run does not try
//! them again; [`Journal::open_retrying_failed`] drops the failures from
//! the journal (rewritten atomically) and empties the dead letters, so
//! those items go through once more and still end up exactly once.
//!
//! # What a commit guarantees
//!
//! A commit returns once its record and its journal line have been handed
//! to the operating system (`write`, not `fsync`): a killed process loses
//! nothing it committed; surviving a power cut would need an `fsync` per
//! item, which this does not do.
//!
//! Each commit runs on tokio's blocking pool (one hop and two writes per
//! item), so a slow disk never stalls the runtime. Commits are not batched
//! across items, on purpose: the sink asks for the next result only after
//! the last one is committed, and a consumer may act on that, as the Redis
//! work queue's `ack_after_commit` (feature `redis`) does by acknowledging
//! the last item when the next is asked for. Items that are already done
//! cost no hop at all.

use std::any::{Any, TypeId};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use futures::stream::{Stream, StreamExt as _};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::blocking::{joined, spawn_blocking};
use super::sink::{
    dead_letter_path, encode, in_file, FailedAbout, HasItem, JournalFailure, Report,
};
use crate::error::Failure;

/// How a journal keys its items. `Send + Sync` because clones of one
/// journal are used at once from the tasks of a pipeline (the filter of
/// `skip_done` and the sink); `'static` because a `Journal` borrows nothing.
type KeyFn<I> = dyn Fn(&I) -> String + Send + Sync;

/// The first-stage item an item of a later stage descends from, given the
/// later item as `Any` (`None` when it is not of the type registered).
type OriginFn<I> = dyn Fn(&dyn Any) -> Option<I> + Send + Sync;

/// A resumable JSONL sink: skips items an earlier run finished, and writes
/// each item exactly once across crashes and re-runs.
///
/// ```
/// use futures::stream;
/// use sluicegate::etl::Journal;
/// use sluicegate::mock::{MockResponse, MockTransport, Route};
/// use sluicegate::{Client, SluiceExt};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> std::io::Result<()> {
/// let mock = MockTransport::new();
/// mock.mount(Route::get("/items/{id}").respond_with(|r| {
///     MockResponse::json(&serde_json::json!({ "id": r.param("id") }))
/// }));
/// let client = Client::builder().transport(mock.clone()).base_url("http://mock").build().unwrap();
/// let dir = std::env::temp_dir().join(format!("sluicegate-journal-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// let output = dir.join("items.jsonl");
///
/// for run in 0..2 {
///     let journal = Journal::open(&output, |id: &u32| id.to_string())?;
///     let report = journal
///         .write_jsonl(
///             journal
///                 .skip_done(stream::iter(0..10u32))
///                 .fetch_concurrent(4, client.get(|id: &u32| format!("/items/{id}")))
///                 .json::<serde_json::Value>(),
///         )
///         .await?;
///     // The second run finds everything done and sends nothing.
///     assert_eq!((report.ok, report.skipped), if run == 0 { (10, 0) } else { (0, 10) });
/// }
/// assert_eq!(mock.call_count(), 10);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok(())
/// # }
/// ```
///
/// # Three stages
///
/// A journal keys every result by the first stage's item (here an id), so
/// that a re-run skips that item whichever stage it ended in. A later
/// stage's results are about that stage's items (a `Detail` fetched for an
/// id): [`origin_of`](Self::origin_of) says, once per such type, which id
/// one comes from. Give the sink what the last stage yields (a
/// [`Decoded`](crate::Decoded), written as its value alone): it knows its
/// item. A result the journal cannot key stops the run with an error naming
/// its type, never a second copy of an item on a re-run.
///
/// ```
/// use sluicegate::etl::Journal;
/// use sluicegate::prelude::*;
///
/// #[derive(serde::Deserialize, serde::Serialize)]
/// struct Summary { id: u64, slug: String }
/// #[derive(serde::Deserialize, serde::Serialize)]
/// struct Detail { id: u64, owner: String }
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mock = MockTransport::new();
/// mock.mount(Route::get("/items/{id}").respond_with(|r| {
///     let id: u64 = r.param("id").unwrap().parse().unwrap();
///     MockResponse::json(&serde_json::json!({ "id": id, "slug": format!("s{id}") }))
/// }));
/// mock.mount(Route::get("/details/{slug}").respond_with(|r| {
///     let id: u64 = r.param("slug").unwrap()[1..].parse().unwrap();
///     MockResponse::json(&serde_json::json!({ "id": id, "owner": format!("o{id}") }))
/// }));
/// // Stage 3 fails for item 2 on the first run only.
/// mock.mount(Route::get("/owners/o2").sequence([MockResponse::status(500), MockResponse::json(&["x"])]));
/// mock.mount(Route::get("/owners/{owner}").respond(MockResponse::json(&["a", "b"])));
/// let client = Client::builder().transport(mock.clone()).base_url("http://mock").build()?;
/// let dir = std::env::temp_dir().join(format!("sluicegate-journal-stages-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// let output = dir.join("owners.jsonl");
///
/// for retry_failed in [false, true] {
///     let key = |id: &u64| id.to_string();
///     let journal = if retry_failed {
///         Journal::open_retrying_failed(&output, key)?
///     } else {
///         Journal::open(&output, key)?
///     }
///     .origin_of(|summary: &Summary| summary.id) // stage 2's items
///     .origin_of(|detail: &Detail| detail.id); // stage 3's items
///     let results = journal
///         .skip_done(stream::iter(1..=3u64))
///         .fetch_concurrent(2, client.get(|id: &u64| format!("/items/{id}")))
///         .json::<Summary>()
///         .map_ok(|d| d.value)
///         .try_fetch_concurrent(2, client.get(|s: &Summary| format!("/details/{}", s.slug)))
///         .json::<Detail>()
///         .map_ok(|d| d.value)
///         .try_fetch_concurrent(2, client.get(|d: &Detail| format!("/owners/{}", d.owner)))
///         .json::<Vec<String>>(); // Decoded<Detail, Vec<String>>: keyed by its Detail's id
///     let report = journal.write_jsonl(results).await?;
///     if retry_failed {
///         // Only item 2, dead-lettered by stage 3, went through again.
///         assert_eq!((report.ok, report.failed, report.skipped), (1, 0, 2));
///     } else {
///         assert_eq!((report.ok, report.failed, report.skipped), (2, 1, 0));
///     }
/// }
/// assert_eq!(std::fs::read_to_string(dir.join("owners.jsonl"))?.lines().count(), 3);
/// assert_eq!(std::fs::read_to_string(dir.join("owners.failed.jsonl"))?, "");
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok(())
/// # }
/// ```
pub struct Journal<I> {
    shared: Arc<Shared<I>>,
}

struct Shared<I> {
    key: Box<KeyFn<I>>,
    /// By the type of a later stage's item: the first-stage item it comes
    /// from. Read per result, written only by `origin_of`; the function is
    /// cloned out before it is called, so no lock is held across user code.
    origins: RwLock<HashMap<TypeId, Arc<OriginFn<I>>>>,
    skipped: AtomicU64,
    store: Arc<Store>,
}

/// The files and the keys they commit: everything a commit touches, and
/// nothing of the item type, so a commit can move to the blocking pool.
struct Store {
    output: PathBuf,
    dead_letters: PathBuf,
    /// Keys committed, by earlier runs and this one. Apart from the files
    /// so that `is_done` never waits for a write; a key is added only by a
    /// commit holding `files`, once its journal line is written.
    done: Mutex<HashSet<String>>,
    /// Locked only by commits, on the blocking pool, never on a runtime
    /// worker.
    files: Mutex<Files>,
}

struct Files {
    ok: File,
    failed: File,
    journal: File,
    ok_len: u64,
    failed_len: u64,
    journal_len: u64,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    key: String,
    /// Which file the record went to: `"ok"` or `"failed"`.
    file: String,
    /// That file's length once the record was written.
    end: u64,
}

impl<I> Clone for Journal<I> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<I> fmt::Debug for Journal<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("output", &self.shared.store.output)
            .field("done", &self.done_count())
            .field("skipped", &self.shared.skipped.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<I> Journal<I> {
    /// Opens (or starts) the journal of `output`, keying items with `key`.
    ///
    /// Repairs what a crash may have left: the output and dead-letter files
    /// are cut back to what the journal committed.
    ///
    /// # Errors
    ///
    /// When `output` is empty (`InvalidInput`), a file cannot be read or
    /// written (the message names the file), or an output file is shorter
    /// than its journal says (it was edited or replaced since). A torn or
    /// garbled tail of the journal itself is not an error: it is cut back
    /// to the last complete line.
    pub fn open<F>(output: impl AsRef<Path>, key: F) -> io::Result<Self>
    where
        F: Fn(&I) -> String + Send + Sync + 'static,
    {
        Self::open_with(output.as_ref(), Box::new(key), false)
    }

    /// Opens the journal of `output` like [`open`](Self::open), but gives
    /// the items an earlier run dead-lettered another chance: they are no
    /// longer done, so [`skip_done`](Self::skip_done) lets them through,
    /// and their old dead letters are dropped (the dead-letter file is
    /// emptied), so each item still ends up exactly once, in the output or,
    /// if it fails again, in the dead letters. Successes stay done.
    ///
    /// The journal is rewritten without the failures first (to a new file,
    /// then renamed over the old one), so a crash midway leaves either the
    /// old journal or the new one, never a mix.
    ///
    /// # Errors
    ///
    /// As [`open`](Self::open).
    ///
    /// ```
    /// use sluicegate::etl::Journal;
    /// use sluicegate::prelude::*;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> std::io::Result<()> {
    /// let mock = MockTransport::new();
    /// // Item 3 fails on the first run only.
    /// mock.mount(Route::get("/items/3").sequence([MockResponse::status(500), MockResponse::json(&3)]));
    /// mock.mount(Route::get("/items/{id}").respond_with(|r| MockResponse::text(MockResponse::ok(), r.param("id").unwrap())));
    /// let client = Client::builder().transport(mock.clone()).base_url("http://mock").build().unwrap();
    /// let dir = std::env::temp_dir().join(format!("sluicegate-retry-failed-doc-{}", std::process::id()));
    /// std::fs::create_dir_all(&dir)?;
    /// let output = dir.join("items.jsonl");
    ///
    /// let key = |id: &u32| id.to_string();
    /// for retry_failed in [false, true] {
    ///     let journal = if retry_failed {
    ///         Journal::open_retrying_failed(&output, key)? // item 3 is not done
    ///     } else {
    ///         Journal::open(&output, key)?
    ///     };
    ///     let report = journal
    ///         .write_jsonl(
    ///             journal
    ///                 .skip_done(stream::iter(1..=4u32))
    ///                 .fetch_concurrent(4, client.get(|id: &u32| format!("/items/{id}")))
    ///                 .json::<u32>(),
    ///         )
    ///         .await?;
    ///     println!("{report}");
    /// }
    /// // The second run sent only item 3, which now succeeded.
    /// assert_eq!(mock.call_count(), 5);
    /// let mut lines: Vec<_> = std::fs::read_to_string(&output)?.lines().map(String::from).collect();
    /// lines.sort();
    /// assert_eq!(lines, ["1", "2", "3", "4"]);
    /// assert_eq!(std::fs::read_to_string(dir.join("items.failed.jsonl"))?, "");
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn open_retrying_failed<F>(output: impl AsRef<Path>, key: F) -> io::Result<Self>
    where
        F: Fn(&I) -> String + Send + Sync + 'static,
    {
        Self::open_with(output.as_ref(), Box::new(key), true)
    }

    fn open_with(output: &Path, key: Box<KeyFn<I>>, retry_failed: bool) -> io::Result<Self> {
        let output = output.to_owned();
        if output.as_os_str().is_empty() {
            // Else the journal would be a stray `.journal` in the working directory.
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "journal output path is empty",
            ));
        }
        let dead_letters = dead_letter_path(&output);
        let mut journal_path = output.clone().into_os_string();
        journal_path.push(".journal");
        let journal_path = PathBuf::from(journal_path);

        let in_journal = |e: io::Error| in_file(e, "journal", &journal_path);
        let mut journal = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&journal_path)
            .map_err(in_journal)?;
        let (mut entries, mut journal_len) = replay(&journal).map_err(in_journal)?;
        journal.set_len(journal_len).map_err(in_journal)?;
        journal.seek(io::SeekFrom::End(0)).map_err(in_journal)?;
        if retry_failed && entries.iter().any(|e| e.file == "failed") {
            entries.retain(|e| e.file == "ok");
            (journal, journal_len) = rewrite(&journal_path, &entries).map_err(in_journal)?;
        }
        let last_end = |file: &str| {
            entries
                .iter()
                .rev()
                .find(|e| e.file == file)
                .map_or(0, |e| e.end)
        };
        let (ok_len, failed_len) = (last_end("ok"), last_end("failed"));
        let done: HashSet<String> = entries.into_iter().map(|e| e.key).collect();

        let ok = cut_back(&output, ok_len)?;
        let failed = cut_back(&dead_letters, failed_len)?;
        Ok(Self {
            shared: Arc::new(Shared {
                key,
                origins: RwLock::new(HashMap::new()),
                skipped: AtomicU64::new(0),
                store: Arc::new(Store {
                    output,
                    dead_letters,
                    done: Mutex::new(done),
                    files: Mutex::new(Files {
                        ok,
                        failed,
                        journal,
                        ok_len,
                        failed_len,
                        journal_len,
                    }),
                }),
            }),
        })
    }

    /// How many items are done (by earlier runs, and this one so far).
    pub fn done_count(&self) -> usize {
        self.shared.store.done().len()
    }

    /// Whether `item` is done: an earlier run, or this one, committed it.
    pub fn is_done(&self, item: &I) -> bool {
        let key = (self.shared.key)(item);
        self.shared.store.done().contains(&key)
    }

    /// Drops the items of `items` that an earlier run finished (counted as
    /// skipped in the report). Checking an item takes no file access: the
    /// journal's keys are in memory.
    ///
    /// The stream returned holds a clone of the journal and `items`: it is
    /// `Send` when `items` is, and `'static` when `items` and `I` are.
    pub fn skip_done<S>(&self, items: S) -> impl Stream<Item = I>
    where
        S: Stream<Item = I>,
    {
        let journal = self.clone();
        items.filter(move |item| {
            let done = journal.is_done(item);
            if done {
                journal.shared.skipped.fetch_add(1, Ordering::Relaxed);
            }
            futures::future::ready(!done)
        })
    }
}

impl<I: 'static> Journal<I> {
    /// Tells the journal which first-stage item an item of a later stage
    /// descends from, so that its results are keyed as that item is.
    ///
    /// A journal keys every result by the first stage's item (with the
    /// key function given to [`open`](Self::open)), so that a re-run skips
    /// it, whichever stage it ended in. The outputs and failures of a later
    /// stage are about that stage's items (a `Detail` fetched for an id),
    /// so for each later stage's item type, say how to get back to the
    /// first stage's item. Call it once per type, before the run.
    ///
    /// A result the journal cannot key (its item is neither an `I` nor of
    /// a type given here, and it has no key of its own) stops
    /// [`write_jsonl`](Self::write_jsonl) with an error naming the type,
    /// before anything of it is written: keying it by itself would let a
    /// re-run fetch its first-stage item again and write that item twice.
    ///
    /// See the [type's docs](Journal#three-stages) for a whole pipeline.
    ///
    /// # Panics
    ///
    /// If `T` is `I` (first-stage items are keyed by `key` already).
    #[track_caller]
    pub fn origin_of<T, F>(self, origin: F) -> Self
    where
        T: 'static,
        F: Fn(&T) -> I + Send + Sync + 'static,
    {
        assert!(
            TypeId::of::<T>() != TypeId::of::<I>(),
            "Journal::origin_of: items of the first stage are keyed by the journal's key already"
        );
        let origin: Arc<OriginFn<I>> =
            Arc::new(move |item: &dyn Any| item.downcast_ref::<T>().map(&origin));
        self.shared
            .origins
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(TypeId::of::<T>(), origin);
        self
    }

    /// The key of a result about `item`: its own, or its first-stage
    /// item's. `None` when the journal cannot tell which that is.
    fn key_of(&self, item: &dyn Any) -> Option<String> {
        if let Some(item) = item.downcast_ref::<I>() {
            return Some((self.shared.key)(item));
        }
        let origin = self
            .shared
            .origins
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&item.type_id())
            .cloned()?;
        origin(item).map(|first| (self.shared.key)(&first))
    }

    /// The error `write_jsonl` stops with on a result it cannot key.
    fn unkeyed(&self, type_name: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "journal of {}: a result about an item of type `{type_name}` cannot be keyed: \
                 say which first-stage `{}` it descends from with \
                 `.origin_of(|item: &{type_name}| ...)` (nothing of it was written)",
                self.shared.store.output.display(),
                std::any::type_name::<I>(),
            ),
        )
    }

    /// Like [`skip_done`](Self::skip_done), on a stream of `Result`s: `Ok`
    /// items an earlier run finished are dropped; errors pass through, as
    /// [`Failure`]s, to be dead-lettered. For the ids unpacked from a list,
    /// or the records of [`read_jsonl`](super::read_jsonl).
    ///
    /// An error here comes from before the journal's items exist (the list
    /// request failed, a page, a bad input line), so it descends from no
    /// first-stage item: its key is fixed ([`Failure::with_key`]) as its
    /// item's type and JSON, or its item's key if its item is an `I`. A
    /// re-run then skips it like any dead letter, and
    /// [`open_retrying_failed`](Self::open_retrying_failed) retries it.
    ///
    /// The stream returned holds a clone of the journal and `items`: it is
    /// `Send` when `items` is, and `'static` when `items` is.
    pub fn try_skip_done<S, E>(&self, items: S) -> impl Stream<Item = Result<I, Failure>>
    where
        S: Stream<Item = Result<I, E>>,
        E: Into<Failure>,
    {
        let journal = self.clone();
        items.filter_map(move |item| {
            let item = match item {
                Ok(item) if journal.is_done(&item) => {
                    journal.shared.skipped.fetch_add(1, Ordering::Relaxed);
                    None
                }
                Ok(item) => Some(Ok(item)),
                Err(error) => {
                    let failure: Failure = error.into();
                    Some(Err(if failure.key().is_some() {
                        failure
                    } else {
                        let key = journal.key_of(failure.item_any()).unwrap_or_else(|| {
                            format!("{} {}", failure.item_type(), failure.item_json())
                        });
                        failure.with_key(key)
                    }))
                }
            };
            futures::future::ready(item)
        })
    }

    /// Runs `results` to its end, committing each success to the output and
    /// each failure to the dead letters, exactly once.
    ///
    /// Each result is committed (its record and journal line handed to the
    /// operating system, on tokio's blocking pool) before the next one is
    /// asked for. A result whose key is already done (it came twice, or
    /// the stream was not filtered through `skip_done`) is not written
    /// again and counts as skipped.
    ///
    /// # Errors
    ///
    /// When a file cannot be written (the message names it) or a record
    /// cannot be serialized; what was committed stays committed, and a
    /// record whose commit failed is cut back off its file. With
    /// [`InvalidInput`](io::ErrorKind::InvalidInput), when a result cannot
    /// be keyed: it is about an item of a later stage whose type was not
    /// given to [`origin_of`](Self::origin_of) (the message names the type);
    /// nothing of that result is written, so a re-run after the fix does it.
    ///
    /// # Panics
    ///
    /// When polled outside a tokio runtime (commits run on its blocking
    /// pool).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops reading `results`. A commit already
    /// running finishes (its item is done, and a re-run skips it); the
    /// results not yet committed are simply done again by the next run.
    pub async fn write_jsonl<S, V, E>(&self, results: S) -> io::Result<Report>
    where
        S: Stream<Item = Result<V, E>>,
        V: Serialize + HasItem,
        V::Item: 'static,
        E: JournalFailure,
    {
        let started = Instant::now();
        let store = &self.shared.store;
        let mut ok = 0;
        let mut failed = 0;
        let mut results = std::pin::pin!(results);
        let mut line = Vec::with_capacity(256);
        while let Some(result) = results.next().await {
            line.clear();
            let (key, to_ok) = match &result {
                Ok(value) => {
                    let key = self
                        .key_of(value.item())
                        .ok_or_else(|| self.unkeyed(std::any::type_name::<V::Item>()))?;
                    encode(&mut line, value)?;
                    (key, true)
                }
                Err(failure) => {
                    let key = match failure.failed_about() {
                        FailedAbout::Key(key) => key.to_owned(),
                        FailedAbout::Item { item, type_name } => {
                            self.key_of(item).ok_or_else(|| self.unkeyed(type_name))?
                        }
                    };
                    encode(&mut line, &failure.dead_letter())?;
                    (key, false)
                }
            };
            // Done already: no hop to the blocking pool. The commit checks
            // again, under the files' lock, for a sink on a clone racing
            // this one.
            let done_before = store.done().contains(&key);
            let committed = !done_before && {
                let store = store.clone();
                let (record, committed) = joined(
                    spawn_blocking(move || {
                        let committed = store.commit(key, to_ok, &line);
                        (line, committed)
                    })
                    .await,
                )?;
                line = record; // the buffer comes back for the next item
                committed?
            };
            if !committed {
                self.shared.skipped.fetch_add(1, Ordering::Relaxed);
            } else if to_ok {
                ok += 1;
            } else {
                failed += 1;
            }
        }
        Ok(Report {
            ok,
            failed,
            skipped: self.shared.skipped.load(Ordering::Relaxed),
            elapsed: started.elapsed(),
            output: store.output.clone(),
            dead_letters: store.dead_letters.clone(),
        })
    }
}

impl Store {
    fn done(&self) -> MutexGuard<'_, HashSet<String>> {
        self.done.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes the record, then the journal line that commits it, then marks
    /// the key done; `false` (and nothing written) when the key is already
    /// done. Blocking: runs on the blocking pool.
    ///
    /// A failed write is cut back off its file, so the lengths the journal
    /// records stay true for the commits after it.
    fn commit(&self, key: String, to_ok: bool, record: &[u8]) -> io::Result<bool> {
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        let files = &mut *files;
        if self.done().contains(&key) {
            return Ok(false);
        }
        let (file, len, path) = if to_ok {
            (&mut files.ok, &mut files.ok_len, &self.output)
        } else {
            (&mut files.failed, &mut files.failed_len, &self.dead_letters)
        };
        if let Err(e) = file.write_all(record) {
            let _ = file.set_len(*len);
            return Err(in_file(e, "journaled output", path));
        }
        let entry = Entry {
            key,
            file: if to_ok { "ok" } else { "failed" }.to_owned(),
            end: *len + record.len() as u64,
        };
        let mut line = Vec::with_capacity(64);
        encode(&mut line, &entry)?;
        if let Err(e) = files.journal.write_all(&line) {
            let _ = files.journal.set_len(files.journal_len);
            let _ = file.set_len(*len);
            return Err(io::Error::new(
                e.kind(),
                format!("journal of {}: {e}", self.output.display()),
            ));
        }
        *len = entry.end;
        files.journal_len += line.len() as u64;
        self.done().insert(entry.key);
        Ok(true)
    }
}

/// Reads the journal: its committed entries, and the length of its own
/// complete lines.
fn replay(journal: &File) -> io::Result<(Vec<Entry>, u64)> {
    let mut entries = Vec::new();
    let mut committed = 0;
    let mut reader = BufReader::new(journal);
    // Bytes, not a `String`: a crash can tear a line inside a multi-byte
    // character, and that torn tail must be cut, not refused.
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            break; // the end, or half a line from a crash
        }
        let Ok(entry) = serde_json::from_slice::<Entry>(&line) else {
            break;
        };
        if !matches!(entry.file.as_str(), "ok" | "failed") {
            break;
        }
        entries.push(entry);
        committed += n as u64;
    }
    Ok((entries, committed))
}

/// Replaces the journal at `path` with `entries`, atomically: written to a
/// new file, flushed, then renamed over the old one. Returns the new
/// journal, open for appending, and its length.
fn rewrite(path: &Path, entries: &[Entry]) -> io::Result<(File, u64)> {
    let mut tmp = path.to_owned().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut text = Vec::new();
    for entry in entries {
        encode(&mut text, entry)?;
    }
    {
        let mut file = File::create(&tmp)?;
        file.write_all(&text)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    let mut journal = OpenOptions::new().read(true).append(true).open(path)?;
    journal.seek(io::SeekFrom::End(0))?;
    Ok((journal, text.len() as u64))
}

/// Opens `path` for appending, cut back to `len` bytes.
fn cut_back(path: &Path, len: u64) -> io::Result<File> {
    let in_output = |e: io::Error| in_file(e, "journaled output", path);
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(in_output)?;
    let actual = file.metadata().map_err(in_output)?.len();
    if actual < len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} holds {actual} bytes but its journal committed {len}: it was changed outside the journal",
                path.display()
            ),
        ));
    }
    file.set_len(len).map_err(in_output)?;
    Ok(file)
}
