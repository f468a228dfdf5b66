//! `flat_unpack` on a 10 MB JSON array against `serde_json::from_slice::<Vec<T>>`
//! followed by `stream::iter`, same run. Also the slow path: the same body
//! with one bad element, where every element is decoded alone.

use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use futures::{stream, StreamExt};
use sluicegate::{FetchError, Fetched, SluiceExt};

#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct Customer {
    id: u64,
    email: String,
    active: bool,
}

fn body(bad_element: bool) -> Bytes {
    let mut out = String::from("[");
    let mut id = 0u64;
    while out.len() < 10 * 1024 * 1024 {
        if id > 0 {
            out.push(',');
        }
        if bad_element && id == 1_000 {
            out.push_str(r#"{"id": "not a number", "email": "x", "active": true}"#);
        } else {
            out.push_str(&format!(
                r#"{{"id": {id}, "email": "customer{id}@example.com", "active": {}}}"#,
                id.is_multiple_of(3)
            ));
        }
        id += 1;
    }
    out.push(']');
    Bytes::from(out)
}

fn page(body: &Bytes) -> Result<Fetched<()>, FetchError<()>> {
    Ok(Fetched {
        item: (),
        response: http::Response::new(body.clone()),
        attempts: 1,
        elapsed: Duration::ZERO,
    })
}

pub(crate) fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("flat_unpack_10MB");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(8));
    for (name, bad) in [("all_good", false), ("one_bad_element", true)] {
        let body = body(bad);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(BenchmarkId::new("from_slice_then_iter", name), |b| {
            b.to_async(&runtime).iter(|| async {
                match serde_json::from_slice::<Vec<Customer>>(&body) {
                    Ok(all) => stream::iter(all).count().await,
                    Err(_) => 0, // the baseline cannot isolate a bad element
                }
            })
        });
        group.bench_function(BenchmarkId::new("flat_unpack", name), |b| {
            b.to_async(&runtime).iter(|| {
                stream::iter([page(&body)])
                    .flat_unpack::<Customer>()
                    .count()
            })
        });
    }
    group.finish();
}
