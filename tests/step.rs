//! `map_concurrent`: the flow control of a fetch stage for any async step.
//! Virtual time; instants measured from the start of the run, against when
//! each attempt was due.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluicegate::prelude::*;
use tokio::time::Instant;

const MS: fn(u64) -> Duration = Duration::from_millis;

#[derive(Debug, PartialEq)]
enum DbError {
    Busy,
    Constraint,
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}
impl std::error::Error for DbError {}

/// A fake database write that records when each attempt started.
#[derive(Clone, Default)]
struct Db {
    attempts: Arc<Mutex<Vec<(u32, Instant)>>>,
}

impl Db {
    fn write(
        &self,
        row: u32,
        fail: impl Fn(u32, usize) -> Option<DbError>,
    ) -> Result<u32, DbError> {
        let mut log = self.attempts.lock().unwrap();
        let nth = log.iter().filter(|(r, _)| *r == row).count();
        log.push((row, Instant::now()));
        match fail(row, nth) {
            Some(e) => Err(e),
            None => Ok(row * 10),
        }
    }

    fn attempts_of(&self, row: u32, start: Instant) -> Vec<Duration> {
        let log = self.attempts.lock().unwrap();
        log.iter()
            .filter(|(r, _)| *r == row)
            .map(|(_, t)| *t - start)
            .collect()
    }
}

#[tokio::test(start_paused = true)]
async fn retries_go_out_when_due_while_the_consumer_is_busy() {
    let db = Db::default();
    let step = Step::new({
        let db = db.clone();
        move |row: u32| {
            let db = db.clone();
            async move {
                tokio::time::sleep(MS(30)).await; // the write's own latency
                db.write(row, |_, nth| (nth == 0).then_some(DbError::Busy))
            }
        }
    })
    .retry_if(
        |e: &DbError| *e == DbError::Busy,
        Backoff::constant(MS(100)),
    );
    let start = Instant::now();
    let mut out = stream::iter(0..4u32).map_concurrent(4, step);
    let mut got = Vec::new();
    while let Some(result) = out.next().await {
        got.push(result.unwrap().value);
        tokio::time::sleep(Duration::from_secs(1)).await; // a slow consumer
    }
    got.sort();
    assert_eq!(got, [0, 10, 20, 30]);
    for row in 0..4 {
        // First attempt at 0 (written at 30 ms), the retry due 100 ms after
        // the error, at 130 ms (written at 160 ms): on time although the
        // consumer was asleep for a second.
        assert_eq!(db.attempts_of(row, start), [MS(30), MS(160)], "row {row}");
    }
}

#[tokio::test(start_paused = true)]
async fn every_row_leaves_once_and_failures_carry_their_row_and_error() {
    let db = Db::default();
    let step = Step::new({
        let db = db.clone();
        move |row: u32| {
            let db = db.clone();
            async move { db.write(row, |row, _| (row % 7 == 0).then_some(DbError::Constraint)) }
        }
    })
    .limit(Limiter::new(Rate::per_second(10)))
    .retry_if(|e: &DbError| *e == DbError::Busy, Backoff::constant(MS(10)));
    let start = Instant::now();
    let out: Vec<_> = stream::iter(0..30u32)
        .map_concurrent(8, step)
        .collect()
        .await;
    assert_eq!(out.len(), 30);
    let mut seen: Vec<u32> = Vec::new();
    for result in &out {
        match result {
            Ok(done) => {
                assert_eq!(done.value, done.item * 10);
                seen.push(done.item);
            }
            Err(e) => {
                assert_eq!(e.kind(), FetchErrorKind::Step);
                assert_eq!(e.item() % 7, 0);
                assert_eq!(e.attempts(), 1, "a constraint error is not retried");
                let source = std::error::Error::source(e).unwrap();
                assert_eq!(source.downcast_ref::<DbError>(), Some(&DbError::Constraint));
                seen.push(*e.item());
            }
        }
    }
    seen.sort();
    assert_eq!(seen, (0..30).collect::<Vec<_>>());
    // One write per 100 ms from the start, never faster.
    let mut at: Vec<Duration> = (0..30).flat_map(|r| db.attempts_of(r, start)).collect();
    at.sort();
    assert_eq!(at, (0..30).map(|i| MS(100 * i)).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn a_503_in_a_fetch_stage_stalls_the_step_too() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/items").sequence([
        MockResponse::status(503),
        MockResponse::json(&[1, 2, 3, 4, 5, 6]),
    ]));
    let client = Client::builder()
        .transport(mock)
        .base_url("http://127.0.0.1:8080")
        .pause_on(503, Duration::from_secs(2))
        .build()
        .unwrap();
    let db = Db::default();
    let step = Step::new({
        let db = db.clone();
        move |row: u64| {
            let db = db.clone();
            async move {
                tokio::time::sleep(MS(100)).await;
                db.write(row as u32, |_, _| None)
            }
        }
    })
    .pause_with(client.pause_handle());
    let start = Instant::now();
    // The step's own rows, written beside the fetch stage.
    let writes = stream::iter(100..110u64)
        .map_concurrent(1, step.clone())
        .collect::<Vec<_>>();
    let fetched = stream::iter([()])
        .fetch_concurrent(1, client.get(|_: &()| "/items"))
        .flat_unpack::<u64>()
        .try_map_concurrent(2, step)
        .collect::<Vec<_>>();
    let (writes, fetched) = futures::join!(writes, fetched);
    assert!(writes.iter().all(Result::is_ok));
    assert_eq!(fetched.iter().filter(|r| r.is_ok()).count(), 6);
    // The 503 came at 0 and paused everything sharing the handle for 2 s:
    // the first write started at 0, then none until the pause ended.
    let log = db.attempts.lock().unwrap();
    let starts: Vec<Duration> = log.iter().map(|(_, t)| *t - start - MS(100)).collect();
    assert_eq!(starts[0], MS(0));
    assert!(
        starts[1..].iter().all(|t| *t >= Duration::from_secs(2)),
        "a write began during the pause: {starts:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_step_can_run_alone_and_time_out_per_item() {
    let step = Step::new(|row: u32| async move {
        tokio::time::sleep(Duration::from_secs(row.into())).await;
        Ok::<_, std::io::Error>(row)
    })
    .item_timeout(Duration::from_millis(1_500));
    assert_eq!(step.run(1).await.unwrap().value, 1);
    let slow = step.run(2).await.unwrap_err();
    assert_eq!(*slow.item(), 2);
    assert!(slow.is_timeout());
}

/// The stage's drivers catch a panic in a step and raise it in the stream,
/// as if the stream had polled the step itself.
async fn a_panicking_step() {
    let step = Step::new(|row: u32| async move {
        if row == 3 {
            panic!("the step blew up on row 3");
        }
        Ok::<_, DbError>(row)
    });
    // A lost panic would leave the stream waiting: bounded, so that
    // fails (with another message) instead of hanging.
    let run = stream::iter(0..8u32)
        .map_concurrent(4, step)
        .collect::<Vec<_>>();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the stream ended or panicked within the bound");
}

#[tokio::test(start_paused = true)]
#[should_panic(expected = "the step blew up on row 3")]
async fn a_panic_in_a_step_is_raised_in_the_stream() {
    a_panicking_step().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[should_panic(expected = "the step blew up on row 3")]
async fn a_panic_in_a_step_is_raised_in_the_stream_on_two_workers() {
    a_panicking_step().await;
}

/// A consumer that catches the panic and polls on, as it may with
/// `buffer_unordered`, gets every other row once and then the end.
async fn polled_on_after_a_panic() {
    use futures::FutureExt as _;
    let step = Step::new(|row: u32| async move {
        if row == 3 {
            panic!("the step blew up on row 3");
        }
        Ok::<_, DbError>(row)
    });
    let mut rows = std::pin::pin!(stream::iter(0..8u32).map_concurrent(4, step));
    let drained = async {
        let (mut seen, mut panics) = (Vec::new(), 0);
        loop {
            match std::panic::AssertUnwindSafe(rows.next())
                .catch_unwind()
                .await
            {
                Ok(Some(row)) => seen.push(row.unwrap().value),
                Ok(None) => break,
                Err(_) => panics += 1,
            }
        }
        seen.sort();
        (seen, panics)
    };
    let (seen, panics) = tokio::time::timeout(Duration::from_secs(60), drained)
        .await
        .expect("the stream ended within the bound");
    assert_eq!((seen, panics), (vec![0, 1, 2, 4, 5, 6, 7], 1));
}

#[tokio::test(start_paused = true)]
async fn a_stream_polled_on_after_a_panic_yields_the_rest_and_ends() {
    polled_on_after_a_panic().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_polled_on_after_a_panic_yields_the_rest_and_ends_on_two_workers() {
    polled_on_after_a_panic().await;
}

/// Two workers, so two drivers share the stage's items: every row comes out
/// exactly once and never more than `n` run at once. Real time on a real
/// runtime, for races: no sleeps, only yields, and a generous bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_drivers_run_every_row_once_within_the_bound() {
    const ROWS: u32 = 2_000;
    const N: usize = 8;
    let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let step = Step::new({
        let (running, most) = (running.clone(), most.clone());
        move |row: u32| {
            let (running, most) = (running.clone(), most.clone());
            async move {
                use std::sync::atomic::Ordering::SeqCst;
                let now = running.fetch_add(1, SeqCst) + 1;
                most.fetch_max(now, SeqCst);
                for _ in 0..(row % 4) {
                    tokio::task::yield_now().await;
                }
                running.fetch_sub(1, SeqCst);
                Ok::<_, DbError>(row)
            }
        }
    });
    let run = stream::iter(0..ROWS)
        .map_concurrent(N, step)
        .map(|out| out.map(|d| d.value).unwrap())
        .collect::<Vec<u32>>();
    let mut rows = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the stage finished");
    rows.sort_unstable();
    assert_eq!(rows, (0..ROWS).collect::<Vec<_>>());
    let most = most.load(std::sync::atomic::Ordering::SeqCst);
    assert!((1..=N).contains(&most), "{most} ran at once, bound {N}");
}
