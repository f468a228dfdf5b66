//! What [`Stats`] cost in memory: the heap a `Client` holds with and
//! without stats, and the heap and time a `snapshot()` takes.
//!
//! Bytes come from a counting global allocator that counts only while a
//! measurement is on (one relaxed load per allocation otherwise, so the
//! other groups in this binary are not slowed); time from criterion.
//!
//! ```text
//! cargo bench --bench sluicegate -- stats_memory
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion};
use futures::{stream, StreamExt};
use sluicegate::mock::{Latency, MockResponse, MockTransport, Route};
use sluicegate::{Client, SluiceExt, Stats};

/// Counts heap bytes while `COUNTING` is on: bytes allocated in total,
/// and bytes live (allocated minus freed) with their peak.
struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATED: AtomicUsize = AtomicUsize::new(0);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to `System` unchanged; the counters only
// observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if COUNTING.load(Ordering::Relaxed) {
            // Frees of blocks allocated before counting started would go
            // below zero: saturate instead.
            let _ = LIVE.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |live| {
                Some(live.saturating_sub(layout.size()))
            });
        }
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATED.fetch_add(new_size, Ordering::Relaxed);
            let live = LIVE.fetch_add(new_size, Ordering::Relaxed) + new_size;
            PEAK.fetch_max(live, Ordering::Relaxed);
            let _ = LIVE.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |live| {
                Some(live.saturating_sub(layout.size()))
            });
        }
        // SAFETY: forwarded with the caller's arguments.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Heap use of `f` on this thread's watch: bytes allocated in total, bytes
/// still live when it returned (what its result holds), and the peak.
struct Heap {
    allocated: usize,
    live: usize,
    peak: usize,
}

fn measure<T>(f: impl FnOnce() -> T) -> (T, Heap) {
    ALLOCATED.store(0, Ordering::Relaxed);
    LIVE.store(0, Ordering::Relaxed);
    PEAK.store(0, Ordering::Relaxed);
    COUNTING.store(true, Ordering::SeqCst);
    let value = f();
    COUNTING.store(false, Ordering::SeqCst);
    let heap = Heap {
        allocated: ALLOCATED.load(Ordering::Relaxed),
        live: LIVE.load(Ordering::Relaxed),
        peak: PEAK.load(Ordering::Relaxed),
    };
    (value, heap)
}

fn client(mock: &MockTransport, stats: bool) -> Client {
    let builder = Client::builder()
        .transport(mock.clone())
        .base_url("http://127.0.0.1:8080");
    let builder = if stats {
        builder
    } else {
        builder.without_stats()
    };
    builder.build().unwrap()
}

fn mock() -> MockTransport {
    let mock = MockTransport::new();
    mock.record_calls(false);
    mock.mount(
        Route::get("/items/{id}")
            .latency(Latency::uniform(
                Duration::from_micros(50),
                Duration::from_millis(20),
            ))
            .respond_with(
                |r| match r.param("id").unwrap().parse::<u32>().unwrap() % 10 {
                    0 => MockResponse::status(404),
                    1 => MockResponse::status(503),
                    _ => MockResponse::ok().text("hello"),
                },
            ),
    );
    mock
}

/// A client whose stats have seen `items` answers with spread latencies
/// and three statuses, from every worker thread of a multi-thread runtime
/// so that every shard is used (a fraction of a second in real time).
fn busy_client(items: u32) -> Client {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(8)
        .enable_all()
        .build()
        .unwrap();
    let mock = mock();
    let client = client(&mock, true);
    runtime.block_on(async {
        let tasks: Vec<_> = (0..8u32)
            .map(|worker| {
                let client = client.clone();
                tokio::spawn(async move {
                    stream::iter((0..items / 8).map(move |i| i * 8 + worker))
                        .fetch_concurrent(64, client.get(|id: &u32| format!("/items/{id}")))
                        .for_each(|_| async {})
                        .await;
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
    client
}

/// Prints the bytes: run with the group, since criterion reports only time.
pub(crate) fn report() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mock = mock();
    let _warm = runtime.block_on(async { client(&mock, true) });
    let (without, plain) = runtime.block_on(async { measure(|| client(&mock, false)) });
    let (with, observed) = runtime.block_on(async { measure(|| client(&mock, true)) });
    let (stats, alone) = measure(|| Stats::new(Some("stage")));
    println!("stats_memory: heap held by a new Client");
    println!("  without stats   {:>9} bytes", plain.live);
    println!("  with stats      {:>9} bytes", observed.live);
    println!("  Stats::new      {:>9} bytes", alone.live);
    drop((without, with, stats));

    let busy = busy_client(20_000);
    let stats = busy.stats().unwrap();
    let (snapshot, cost) = measure(|| stats.snapshot());
    println!(
        "stats_memory: one snapshot() after {} answers: {} bytes allocated (peak {}), {} kept",
        snapshot.requests, cost.allocated, cost.peak, cost.live
    );
    println!("  latency {:?}", snapshot.latency);
}

pub(crate) fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("stats_memory");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(4));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mock = mock();
    for stats in [false, true] {
        let name = if stats { "with_stats" } else { "without_stats" };
        group.bench_function(BenchmarkId::new("client_build", name), |b| {
            b.iter(|| runtime.block_on(async { client(&mock, stats) }))
        });
    }
    let busy = busy_client(20_000);
    let stats = busy.stats().unwrap().clone();
    group.bench_function("snapshot", |b| b.iter(|| stats.snapshot()));
    group.finish();
}
