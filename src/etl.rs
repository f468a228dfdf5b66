//! The ends of an ETL step: where items come from and where they go.
//!
//! - [`paginate`] — a source that follows `Link: rel="next"` headers, a
//!   cursor in the body, or page numbers, and stops with an error on a loop.
//! - [`read_jsonl`] — a source of typed records from a JSONL file; a bad
//!   line is an error item with its line number, the rest go on. It feeds
//!   a fetch stage directly (`try_fetch_concurrent`), a bad line passing
//!   through as a [`Failure`](crate::Failure) to be dead-lettered.
//! - [`write_jsonl`](crate::SluiceExt::write_jsonl) — a sink writing
//!   successes to a JSONL file and failures to a dead-letter file beside it,
//!   returning a [`Report`].
//! - [`Journal`] — the same sink, made resumable: a re-run after a crash
//!   skips what is done and the output holds every item exactly once. It
//!   writes pipelines of any number of stages (their
//!   [`Failure`](crate::Failure)s included), keying each result by the
//!   first-stage item it descends from ([`Journal::origin_of`]), and
//!   [`Journal::open_retrying_failed`] gives an earlier run's dead letters
//!   another chance.

mod blocking;
mod journal;
mod jsonl;
mod paginate;
mod sink;

pub use self::journal::Journal;
pub use self::jsonl::{read_jsonl, InputLine, JsonlError, ReadJsonl};
pub use self::paginate::{paginate, PageRef, Paginate, Pagination};
pub use self::sink::{
    dead_letter_path, DeadLetter, FailedAbout, HasItem, JournalFailure, Report, WriteJsonl,
    WriteJsonlFuture,
};
