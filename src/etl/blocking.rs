//! File work on tokio's blocking pool, for the ETL sources and sinks.
//!
//! A file operation can stall (a full disk queue, a network file system),
//! and on a runtime worker it would stall every request on that worker
//! with it. So the JSONL reader and the sinks open, read and write their
//! files here, in batches, and only wait for the result.

use std::io;

use tokio::task::{JoinError, JoinHandle};

/// Runs `f` on tokio's blocking pool.
///
/// The closure must be `Send + 'static` because it runs on another thread
/// and may outlive the future that started it (dropping a future cannot
/// stop a blocking task): it owns its files and bytes, and nothing of the
/// caller's stream or items, which therefore need neither bound.
///
/// # Panics
///
/// Outside a tokio runtime.
pub(crate) fn spawn_blocking<T, F>(f: F) -> JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
}

/// The result of a blocking task: its own panic goes on unwinding here; the
/// only other way to lose it is a runtime shutting down under it.
pub(crate) fn joined<T>(result: Result<T, JoinError>) -> io::Result<T> {
    result.map_err(|e| match e.try_into_panic() {
        Ok(panic) => std::panic::resume_unwind(panic),
        Err(_) => io::Error::other("the runtime shut down before a file operation ran"),
    })
}
