//! Two stages and two clients sharing one rate budget and one pause.
//!
//! The listing client and the item client are separate (say, different
//! timeouts and headers), but the API counts them together, so they share a
//! `Limiter`; and when the API says 503, everything must stop, so they share
//! a `PauseHandle`.
//!
//! ```text
//! cargo run --example shared_limit
//! ```

use std::time::Duration;

use http::StatusCode;
use sluicegate::demo::{DemoConfig, DemoServer};
use sluicegate::prelude::*;
use sluicegate::ReqwestTransport;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = DemoServer::start(
        DemoConfig::default()
            .items(600)
            .rate_limit(Rate::per_second(220).burst(10))
            .outages(Duration::from_secs(4), Duration::from_secs(1)),
    )
    .await?;

    // One budget and one pause for the whole API.
    let api_budget = Limiter::new(Rate::per_second(200).burst(5));
    let api_pause = PauseHandle::new();
    let http = ReqwestTransport::default();
    let client = |timeout| {
        Client::builder()
            .transport(http.clone())
            .base_url(server.url())
            .limiter(api_budget.clone())
            .pause_handle(api_pause.clone())
            .timeout(timeout)
            .pause_on(StatusCode::SERVICE_UNAVAILABLE, Duration::from_millis(500))
            .retry_on(
                StatusCode::TOO_MANY_REQUESTS,
                Backoff::exponential(Duration::from_millis(50)),
            )
            .build()
    };
    let lists = client(Duration::from_secs(30))?;
    let items = client(Duration::from_secs(5))?;

    // Stage 1 (listing client): fetch the list twice over, as two "pages".
    // Stage 2 (item client): fetch each id.
    let ok = futures::stream::iter(0..2u32)
        .fetch_concurrent(1, lists.get(|_: &u32| "/items"))
        .flat_unpack::<u64>()
        // The two stages fail with different items: both yield `Failure`s.
        .try_fetch_concurrent(16, items.get(|id: &u64| format!("/items/{id}")))
        .filter(|r| futures::future::ready(r.is_ok()))
        .count()
        .await;
    println!("{ok} of 1200 items fetched");
    println!("{}", lists.stats().unwrap().snapshot());
    println!("{}", items.stats().unwrap().snapshot());
    let c = server.counts();
    println!(
        "server: {} requests, {} answered 429, {} answered 503 (a 1 s outage every 4 s)",
        c.requests, c.too_many_requests, c.unavailable
    );
    Ok(())
}
