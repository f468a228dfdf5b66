//! Real HTTP over loopback: the demo server with zero latency, 20 000
//! requests, 64 in flight. sluicegate against hand-written `reqwest` +
//! `buffer_unordered(64)` sharing one connection pool, same run; with
//! feature `hyper-transport`, sluicegate over `HyperTransport` too.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use futures::{stream, StreamExt};
use sluicegate::demo::{DemoConfig, DemoServer};
use sluicegate::{Client, ReqwestTransport, SluiceExt};

const REQUESTS: u64 = 20_000;
const CONCURRENCY: usize = 64;

pub(crate) fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("real_http_20k");
    group.throughput(Throughput::Elements(REQUESTS));
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(15));
    let runtimes = crate::runtimes();
    for (flavor, runtime) in &runtimes {
        let (server, http, client) = runtime.block_on(async {
            let server = DemoServer::start(DemoConfig::default().items(REQUESTS))
                .await
                .unwrap();
            // One pool for both; built where a rustls provider is ensured.
            let http = ReqwestTransport::client_builder().build().unwrap();
            let client = Client::builder()
                .transport(ReqwestTransport::new(http.clone()))
                .base_url(server.url())
                .build()
                .unwrap();
            (server, http, client)
        });
        let base = server.url();
        group.bench_function(
            BenchmarkId::new("hand_written_reqwest_buffer_unordered", flavor),
            |b| {
                b.to_async(runtime).iter(|| {
                    crate::hand_written::over_reqwest(&http, &base, REQUESTS, CONCURRENCY, false)
                })
            },
        );
        group.bench_function(BenchmarkId::new("fetch_concurrent", flavor), |b| {
            b.to_async(runtime).iter(|| async {
                stream::iter(0..REQUESTS)
                    .fetch_concurrent(CONCURRENCY, client.get(|id: &u64| format!("/items/{id}")))
                    .filter(|r| futures::future::ready(r.is_ok()))
                    .count()
                    .await
            })
        });
        #[cfg(feature = "hyper-transport")]
        {
            let over_hyper = runtime.block_on(async {
                Client::builder()
                    .transport(sluicegate::HyperTransport::new())
                    .base_url(server.url())
                    .build()
                    .unwrap()
            });
            group.bench_function(BenchmarkId::new("fetch_concurrent_hyper", flavor), |b| {
                b.to_async(runtime).iter(|| async {
                    stream::iter(0..REQUESTS)
                        .fetch_concurrent(
                            CONCURRENCY,
                            over_hyper.get(|id: &u64| format!("/items/{id}")),
                        )
                        .filter(|r| futures::future::ready(r.is_ok()))
                        .count()
                        .await
                })
            });
        }
        runtime.block_on(async move { drop(server) });
    }
    group.finish();
}
