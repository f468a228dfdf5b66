//! Which public types are `Send`, `Sync` and `Unpin`, checked when this
//! file compiles (as futures-util and tokio check theirs): a change that
//! makes a handle or a combinator lose one of them breaks the build here,
//! not in a user's `tokio::spawn` or `Arc<…>`.
//!
//! Combinators are checked over an inner stream that is `Send + Sync +
//! Unpin` itself, so each line says what the combinator adds or takes away.

#![allow(dead_code)]

use std::future::IntoFuture as _;

use futures::stream::{self, Iter};
use sluicegate::mock::MockTransport;
use sluicegate::prelude::*;
use sluicegate::{ClientBuilder, Endpoint, Failure, KeyedLimiter, Stats, Step};

fn send<T: Send>() {}
fn sync<T: Sync>() {}
fn unpin<T: Unpin>() {}

/// `Send + Sync + Unpin`, the ordinary case for a handle or a stream.
fn all<T: Send + Sync + Unpin>() {}

/// The same, for a value whose type is too long to spell.
fn all_of<T: Send + Sync + Unpin>(_: &T) {}

type Ints = Iter<std::vec::IntoIter<u32>>;

/// Cheap handles: shared across tasks and threads, stored in `Arc`s.
fn handles() {
    all::<Client>();
    all::<ClientBuilder>();
    all::<Endpoint<u32>>();
    all::<Limiter>();
    all::<KeyedLimiter<String>>();
    all::<PauseHandle>();
    all::<Rate>();
    all::<Stats>();
    all::<Step<u32, u32, std::io::Error>>();
    all::<Journal<u32>>();
}

/// Errors go into `Box<dyn Error + Send + Sync>` and across tasks.
fn errors() {
    all::<Failure>();
    all::<FetchError<u32>>();
    all::<sluicegate::BuildError>();
}

/// Every combinator over a `Send + Sync + Unpin` stream is all three
/// itself: a pipeline can be spawned, held behind a shared reference, and
/// polled with `StreamExt::next` without pinning it first.
fn combinators(client: &Client) {
    all::<sluicegate::Throttle<Ints>>();

    let fetched = || {
        stream::iter(vec![1u32, 2])
            .fetch_concurrent(2, client.get(|id: &u32| format!("/items/{id}")))
    };
    all_of(&fetched());
    all_of(&fetched().ordered());
    all_of(&fetched().flat_unpack::<u64>());
    all_of(&fetched().json::<serde_json::Value>());
    all_of(
        &fetched()
            .json::<serde_json::Value>()
            .write_jsonl("out.jsonl")
            .into_future(),
    );

    let step = Step::new(|row: u32| async move { Ok::<_, std::io::Error>(row) });
    all_of(&stream::iter(vec![1u32, 2]).map_concurrent(2, step));

    // `Paginate` keeps its walk as a `dyn Stream + Send + Sync`, so the
    // stages after it stay `Sync` too.
    all_of(&paginate(client, "/items", Pagination::link_header()));

    #[cfg(feature = "progress")]
    all_of(&fetched().progress(sluicegate::Progress::new(None)));
}

/// `Throttle` holds the wait for a token only through `&mut`, so it is
/// `Sync` even though that wait is a `dyn Future + Send`.
fn throttle_is_sync() {
    send::<sluicegate::Throttle<Ints>>();
    sync::<sluicegate::Throttle<Ints>>();
    unpin::<sluicegate::Throttle<Ints>>();
}

#[test]
fn a_mock_client_is_enough_to_build_every_combinator() {
    let client = Client::builder()
        .transport(MockTransport::new())
        .base_url("http://mock")
        .build()
        .unwrap();
    combinators(&client);
    handles();
    errors();
    throttle_is_sync();
}
