//! Benchmarks: one entry, one module per scenario.
//!
//! ```text
//! cargo bench --bench sluicegate                 # everything
//! cargo bench --bench sluicegate -- fetch        # criterion groups matching "fetch"
//! cargo bench --bench sluicegate -- rate_accuracy
//! cargo bench --bench sluicegate -- real_http
//! cargo bench --bench sluicegate -- stats_memory   # Client and snapshot() bytes
//! ```

use criterion::Criterion;

#[path = "../tests/common/mod.rs"]
mod common;

#[path = "sluicegate/fetch_overhead.rs"]
mod fetch_overhead;
#[path = "sluicegate/flat_unpack.rs"]
mod flat_unpack;
#[path = "shared/hand_written.rs"]
mod hand_written;
#[path = "sluicegate/rate_accuracy.rs"]
mod rate_accuracy;
#[path = "sluicegate/real_http.rs"]
mod real_http;
#[path = "sluicegate/stats_memory.rs"]
mod stats_memory;

/// The runtimes every comparison runs on: current-thread, and multi-thread
/// with the machine's two workers.
fn runtimes() -> [(&'static str, tokio::runtime::Runtime); 2] {
    [
        (
            "current_thread",
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        ),
        (
            "multi_thread",
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
        ),
    ]
}

fn main() {
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    let listing = std::env::args().any(|a| a == "--list");
    if !listing && (filter.is_empty() || "rate_accuracy".contains(filter.as_str())) {
        rate_accuracy::report();
    }
    if !listing && (filter.is_empty() || "stats_memory".contains(filter.as_str())) {
        stats_memory::report();
    }
    let mut criterion = Criterion::default().configure_from_args();
    fetch_overhead::bench(&mut criterion);
    flat_unpack::bench(&mut criterion);
    real_http::bench(&mut criterion);
    stats_memory::bench(&mut criterion);
    criterion.final_summary();
}
