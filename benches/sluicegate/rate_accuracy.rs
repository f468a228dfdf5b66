//! Real-time rate accuracy: our `Limiter` (through `.throttle`) against
//! `tokio_stream::StreamExt::throttle` and `governor`'s `until_ready`, at
//! 1 000/s and 10 000/s, in one run. Reports the achieved rate as a share
//! of the target and the most items seen in any 10 ms window. A measurement
//! printed as a table, not a criterion timing: the quantity is a rate.

use std::num::NonZeroU32;
use std::time::Duration;

use futures::{stream, StreamExt};
use sluicegate::{Rate, SluiceExt};
use tokio::time::Instant;

const RUN: Duration = Duration::from_secs(2);

use crate::common::max_in_window;

async fn collect(items: impl futures::Stream<Item = ()>) -> Vec<Duration> {
    let t0 = Instant::now();
    let mut items = std::pin::pin!(items);
    let mut times = Vec::new();
    while t0.elapsed() < RUN {
        if items.next().await.is_none() {
            break;
        }
        times.push(t0.elapsed());
    }
    times
}

/// `tasks` tasks each taking a token at a time from one budget (`acquire`
/// makes a wait for one) for `RUN`: every grant's instant, in order.
async fn shared<F, Fut>(tasks: usize, acquire: F) -> Vec<Duration>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let t0 = Instant::now();
    let acquire = std::sync::Arc::new(acquire);
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let acquire = acquire.clone();
            tokio::spawn(async move {
                let mut times = Vec::new();
                loop {
                    acquire().await;
                    let at = t0.elapsed();
                    if at >= RUN {
                        return times;
                    }
                    times.push(at);
                }
            })
        })
        .collect();
    let mut times = Vec::new();
    for handle in handles {
        times.extend(handle.await.unwrap());
    }
    times.sort();
    times
}

fn row(name: &str, target: u32, burst: u32, times: &[Duration]) {
    let achieved = times.len() as f64 / RUN.as_secs_f64();
    let allowed_10ms = burst as f64 + target as f64 / 100.0;
    println!(
        "| {name:<34} | {target:>6}/s | {achieved:>9.0}/s | {:>6.1}% | {:>4} (GCRA allows {allowed_10ms:.0}) |",
        100.0 * achieved / target as f64,
        max_in_window(times, Duration::from_millis(10)),
    );
}

pub(crate) fn report() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("\nrate accuracy over {RUN:?} of real time, burst = rate x 2 ms\n");
    println!("| pacer                              | target    | achieved    | share   | max in 10 ms            |");
    println!("|------------------------------------|-----------|-------------|---------|-------------------------|");
    // The default burst (1) and burst 2 at 1 000/s: one token per timer
    // tick, where a limiter that dates a token at the late wake-up instead
    // of its due instant loses a share of every late tick.
    for burst in [1u32, 2] {
        runtime.block_on(async {
            let ours =
                collect(stream::repeat(()).throttle(Rate::per_second(1_000).burst(burst))).await;
            row(
                &format!("sluicegate throttle, burst {burst}"),
                1_000,
                burst,
                &ours,
            );
            let quota = governor::Quota::per_second(NonZeroU32::new(1_000).unwrap())
                .allow_burst(NonZeroU32::new(burst).unwrap());
            let governor = governor::RateLimiter::direct(quota);
            let governed = collect(stream::repeat(()).then(|()| governor.until_ready())).await;
            row(
                &format!("governor until_ready, burst {burst}"),
                1_000,
                burst,
                &governed,
            );
        });
    }
    // Eight tasks sharing one budget: a line of waiters, each woken by
    // its own timer, where a late timer must cost no token.
    for target in [1_000u32, 500] {
        runtime.block_on(async {
            let limiter = sluicegate::Limiter::new(Rate::per_second(target));
            let ours = shared(8, move || {
                let limiter = limiter.clone();
                async move { limiter.acquire().await }
            })
            .await;
            row("sluicegate Limiter, 8 tasks", target, 1, &ours);
            let quota = governor::Quota::per_second(NonZeroU32::new(target).unwrap())
                .allow_burst(NonZeroU32::MIN);
            let governor = std::sync::Arc::new(governor::RateLimiter::direct(quota));
            let governed = shared(8, move || {
                let governor = governor.clone();
                async move { governor.until_ready().await }
            })
            .await;
            row("governor until_ready, 8 tasks", target, 1, &governed);
        });
    }
    for target in [1_000u32, 10_000] {
        let burst = (target / 500).max(1);
        runtime.block_on(async {
            let ours =
                collect(stream::repeat(()).throttle(Rate::per_second(target).burst(burst))).await;
            row("sluicegate throttle (Limiter)", target, burst, &ours);
            // tokio's timers tick every millisecond: a tolerance of one tick
            // (burst = rate x 2 ms at 1 000/s) drifts whenever a wake-up
            // lands late; one more tick of tolerance absorbs it.
            let roomy = burst + target / 1_000;
            let ours =
                collect(stream::repeat(()).throttle(Rate::per_second(target).burst(roomy))).await;
            row(
                &format!("sluicegate throttle, burst {roomy}"),
                target,
                roomy,
                &ours,
            );

            let gap = Duration::from_secs(1) / target;
            let fixed = collect(tokio_stream::StreamExt::throttle(stream::repeat(()), gap)).await;
            row("tokio_stream throttle", target, burst, &fixed);

            let quota = governor::Quota::per_second(NonZeroU32::new(target).unwrap())
                .allow_burst(NonZeroU32::new(burst).unwrap());
            let governor = governor::RateLimiter::direct(quota);
            let governed = collect(stream::repeat(()).then(|()| governor.until_ready())).await;
            row("governor until_ready", target, burst, &governed);
        });
    }
    println!();
}
