//! One pipeline per process, for counting what an item costs with tools
//! that watch a whole process: `valgrind --tool=callgrind` (instructions,
//! the same on a busy machine as on a quiet one) or `perf`.
//!
//! ```text
//! cargo bench --features demo --bench per_item --no-run
//! valgrind --tool=callgrind target/release/deps/per_item-<hash> http sluicegate current 5000 2
//! target/release/deps/per_item-<hash> mock hand multi 20000 4
//! ```
//!
//! Arguments: the transport (`mock`: a zero-latency `MockTransport`;
//! `http`: the demo server in the same process, over loopback, through
//! `ReqwestTransport`; `hyper`: the same server through `HyperTransport`,
//! with feature `hyper-transport`), the client
//! (`sluicegate`: `fetch_concurrent(64)`; `hand`: `buffer_unordered(64)`
//! over the mock's `send`, or over reqwest itself), the runtime (`current`
//! or `multi`, two workers, the pipeline in `block_on` as under
//! `#[tokio::main]`), the items per round and the rounds. Prints items/s
//! per round after the first; subtract a run of one item to leave out what
//! the process spends starting.

use std::time::Instant;

use futures::{stream, StreamExt};
use sluicegate::demo::{DemoConfig, DemoServer};
use sluicegate::{Client, ReqwestTransport, SluiceExt};

#[path = "shared/hand_written.rs"]
mod hand_written;

const CONCURRENCY: usize = 64;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or(default.to_owned());
    let (transport, client, runtime) = (arg(0, "mock"), arg(1, "sluicegate"), arg(2, "current"));
    let items: u64 = arg(3, "20000").parse().expect("items: a number");
    let rounds: u32 = arg(4, "4").parse().expect("rounds: a number");
    let runtime = match runtime.as_str() {
        "current" => tokio::runtime::Builder::new_current_thread(),
        "multi" => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(2);
            builder
        }
        other => panic!("runtime {other:?}: current or multi"),
    }
    .enable_all()
    .build()
    .unwrap();
    runtime.block_on(async {
        let server = DemoServer::start(DemoConfig::default().items(items))
            .await
            .unwrap();
        let mock = hand_written::items_mock();
        let http = ReqwestTransport::client_builder().build().unwrap();
        let (base, sluice) = match transport.as_str() {
            "mock" => (
                "http://127.0.0.1:8080".to_owned(),
                Client::builder().transport(mock.clone()),
            ),
            "http" => (
                server.url(),
                Client::builder().transport(ReqwestTransport::new(http.clone())),
            ),
            #[cfg(feature = "hyper-transport")]
            "hyper" => (
                server.url(),
                Client::builder().transport(sluicegate::HyperTransport::new()),
            ),
            other => panic!("transport {other:?}: mock, http or hyper"),
        };
        let sluice = sluice.base_url(base.clone()).build().unwrap();
        for round in 0..rounds {
            let started = Instant::now();
            let ok = match (transport.as_str(), client.as_str()) {
                (_, "sluicegate") => {
                    stream::iter(0..items)
                        .fetch_concurrent(
                            CONCURRENCY,
                            sluice.get(|id: &u64| format!("/items/{id}")),
                        )
                        .filter(|r| futures::future::ready(r.is_ok()))
                        .count()
                        .await
                }
                ("mock", "hand") => {
                    hand_written::over_mock(&mock, &base, items, CONCURRENCY, false).await as usize
                }
                (_, "hand") => {
                    hand_written::over_reqwest(&http, &base, items, CONCURRENCY, false).await
                        as usize
                }
                (_, other) => panic!("client {other:?}: sluicegate or hand"),
            };
            assert_eq!(ok as u64, items, "every item answered");
            if round > 0 {
                let rate = items as f64 / started.elapsed().as_secs_f64();
                println!("{transport} {client}: {rate:.0} items/s");
            }
        }
    });
}
