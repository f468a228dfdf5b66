//! `fetch_concurrent` on a zero-latency MockTransport against the
//! hand-written `stream::iter(..).map(send).buffer_unordered(n)` on the same
//! transport, in the same run. The difference is our overhead: building
//! the request from the client, pause and limiter checks, a task per item.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use futures::{stream, StreamExt};
use sluicegate::mock::MockTransport;
use sluicegate::{Client, Rate, SluiceExt};

const ITEMS: u64 = 20_000;
const CONCURRENCY: usize = 64;

async fn hand_written(transport: &MockTransport) -> u64 {
    crate::hand_written::over_mock(
        transport,
        "http://127.0.0.1:8080",
        ITEMS,
        CONCURRENCY,
        false,
    )
    .await
}

async fn pipeline(client: &Client) -> u64 {
    stream::iter(0..ITEMS)
        .fetch_concurrent(CONCURRENCY, client.get(|id: &u64| format!("/items/{id}")))
        .filter(|r| futures::future::ready(r.is_ok()))
        .count()
        .await as u64
}

pub(crate) fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("fetch_overhead");
    group.throughput(Throughput::Elements(ITEMS));
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(8));
    let runtimes = crate::runtimes();
    for (name, runtime) in &runtimes {
        let transport = crate::hand_written::items_mock();
        let client = runtime.block_on(async {
            Client::builder()
                .transport(transport.clone())
                .base_url("http://127.0.0.1:8080")
                .build()
                .unwrap()
        });
        let limited = runtime.block_on(async {
            Client::builder()
                .transport(transport.clone())
                .base_url("http://127.0.0.1:8080")
                .rate(Rate::per_second(1_000_000_000).burst(1_000))
                .build()
                .unwrap()
        });
        group.bench_function(
            BenchmarkId::new("hand_written_buffer_unordered", name),
            |b| b.to_async(runtime).iter(|| hand_written(&transport)),
        );
        group.bench_function(BenchmarkId::new("fetch_concurrent", name), |b| {
            b.to_async(runtime).iter(|| pipeline(&client))
        });
        group.bench_function(
            BenchmarkId::new("fetch_concurrent_with_limiter", name),
            |b| b.to_async(runtime).iter(|| pipeline(&limited)),
        );
    }
    group.finish();
    observability_overhead(c);
}

/// Stats and tracing (a real subscriber at `info`, writing to nowhere)
/// against the same pipeline with both off, same run, current-thread.
fn observability_overhead(c: &mut Criterion) {
    let mut group = c.benchmark_group("observability_overhead");
    group.throughput(Throughput::Elements(ITEMS));
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(8));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let transport = crate::hand_written::items_mock();
    let (plain, observed) = runtime.block_on(async {
        let builder = || {
            Client::builder()
                .transport(transport.clone())
                .base_url("http://127.0.0.1:8080")
        };
        (
            builder().without_stats().build().unwrap(),
            builder().build().unwrap(),
        )
    });
    group.bench_function("stats_off_no_subscriber", |b| {
        b.to_async(&runtime).iter(|| pipeline(&plain))
    });
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_writer(std::io::sink)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        group.bench_function("stats_on_info_subscriber", |b| {
            b.to_async(&runtime).iter(|| pipeline(&observed))
        });
    });
    group.finish();
}
