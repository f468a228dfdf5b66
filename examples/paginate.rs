//! Walk a paginated listing two ways, by `Link` header and by cursor, and
//! unpack every page into its records.
//!
//! ```text
//! cargo run --example paginate
//! ```

use std::time::Duration;

use http::StatusCode;
use sluicegate::demo::{DemoConfig, DemoServer};
use sluicegate::etl::{paginate, Pagination};
use sluicegate::prelude::*;
use sluicegate::ReqwestTransport;

#[derive(serde::Deserialize, Debug)]
struct Customer {
    id: u64,
    email: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = DemoServer::start(DemoConfig::default().items(480)).await?;
    let client = Client::builder()
        .transport(ReqwestTransport::default())
        .base_url(server.url())
        .rate(Rate::per_second(50).burst(5))
        .retry_on(
            Matcher::server_errors(),
            Backoff::exponential(Duration::from_millis(100)),
        )
        .build()?;

    // Follow `Link: </customers?cursor=50>; rel="next"` until there is none.
    let by_link: Vec<Customer> = paginate(&client, "/customers", Pagination::link_header())
        .flat_unpack_at::<Customer>("/customers")
        .try_collect()
        .await?;
    println!(
        "by Link header: {} customers, last {:?}",
        by_link.len(),
        by_link.last()
    );

    // The same walk by the cursor in the body, `?cursor=...` on each request.
    let pages = paginate(
        &client,
        "/customers",
        Pagination::cursor("/next_cursor", "cursor"),
    )
    .retry_on(
        StatusCode::TOO_MANY_REQUESTS,
        Backoff::constant(Duration::from_secs(1)),
    );
    let by_cursor: Vec<Customer> = pages
        .flat_unpack_at::<Customer>("/customers")
        .try_collect()
        .await?;
    println!("by cursor:      {} customers", by_cursor.len());

    assert_eq!(by_link.len(), 480);
    assert!(by_link
        .iter()
        .zip(&by_cursor)
        .all(|(a, b)| a.id == b.id && a.email == b.email));
    if let Some(stats) = client.stats() {
        println!("{}", stats.snapshot());
    }
    Ok(())
}
