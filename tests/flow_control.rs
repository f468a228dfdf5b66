//! Rate, Limiter, throttle and PauseHandle, in exact virtual time.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{stream, StreamExt};
use proptest::prelude::*;
use sluicegate::{KeyedLimiter, Limiter, PauseHandle, Rate, SluiceExt};
use tokio::time::{sleep, Instant};

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

use common::max_in_window;

#[tokio::test(start_paused = true)]
async fn throttle_allows_exactly_what_gcra_allows_over_ten_seconds() {
    let t0 = Instant::now();
    let times: Vec<Duration> = stream::iter(0u64..)
        .throttle(Rate::per_second(100).burst(10))
        .map(|_| t0.elapsed())
        .take_while(|t| futures::future::ready(*t <= Duration::from_secs(10)))
        .collect()
        .await;
    // Burst of 10 at t = 0, then one every 10 ms up to and including 10 s.
    assert_eq!(times.len(), 10 + 100 * 10);
    assert!(times[..10].iter().all(|t| t.is_zero()));
    assert_eq!(times[10], ms(10));
    assert_eq!(*times.last().unwrap(), Duration::from_secs(10));
    // In every sliding 100 ms window: at most burst + rate * 0.1.
    assert!(max_in_window(&times, ms(100)) <= 10 + 10);
}

#[tokio::test(start_paused = true)]
async fn throttle_ends_with_the_stream_not_a_period_later() {
    let t0 = Instant::now();
    let n = stream::iter(0..3)
        .throttle(Rate::per_second(1))
        .count()
        .await;
    assert_eq!(n, 3);
    assert_eq!(t0.elapsed(), Duration::from_secs(2));
    // tokio-stream's throttle waits a whole period after the last item.
    let t1 = Instant::now();
    let n = tokio_stream::StreamExt::throttle(stream::iter(0..3), Duration::from_secs(1))
        .count()
        .await;
    assert_eq!(n, 3);
    assert_eq!(t1.elapsed(), Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn throttle_catches_up_after_a_slow_upstream_up_to_the_burst() {
    let t0 = Instant::now();
    let upstream = stream::iter(0..8).then(|i| async move {
        if i == 2 {
            sleep(ms(500)).await; // a slow item: the budget saves up meanwhile
        }
        i
    });
    let times: Vec<u128> = upstream
        .throttle(Rate::per_second(10).burst(3))
        .map(|_| t0.elapsed().as_millis())
        .collect()
        .await;
    assert_eq!(times, [0, 0, 500, 500, 500, 600, 700, 800]);
}

#[tokio::test(start_paused = true)]
async fn two_stages_sharing_a_limiter_never_exceed_it_and_share_fairly() {
    let limiter = Limiter::new(Rate::per_second(50).burst(5));
    let t0 = Instant::now();
    let log = Arc::new(Mutex::new(Vec::new()));
    let stage = |name: &'static str| {
        let log = log.clone();
        stream::iter(0..200).throttle(&limiter).for_each(move |_| {
            log.lock().unwrap().push((t0.elapsed(), name));
            futures::future::ready(())
        })
    };
    tokio::time::timeout(
        Duration::from_secs(3),
        futures::future::join(stage("a"), stage("b")),
    )
    .await
    .unwrap_err(); // 400 items at 50/s take 8 s: cut at 3 s and look
    let log = log.lock().unwrap().clone();
    let times: Vec<Duration> = log.iter().map(|(t, _)| *t).collect();
    assert_eq!(times.len(), 5 + 50 * 3);
    assert!(max_in_window(&times, Duration::from_secs(1)) <= 5 + 50);
    // First come, first served: `a` came first and took the burst; from
    // then on both wait in line and they alternate.
    assert!(log[..5].iter().all(|(_, n)| *n == "a"));
    let a = log[5..].iter().filter(|(_, n)| *n == "a").count();
    let b = log.len() - 5 - a;
    assert!(a.abs_diff(b) <= 1, "a got {a}, b got {b}");
    for pair in log[5..].windows(2) {
        assert_ne!(
            pair[0].1, pair[1].1,
            "no stage goes twice while the other waits"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_pause_mid_stream_stops_everything_until_its_deadline() {
    let pause = PauseHandle::new();
    let t0 = Instant::now();
    {
        let pause = pause.clone();
        tokio::spawn(async move {
            sleep(Duration::from_secs(3)).await;
            pause.pause_for(Duration::from_secs(2));
        });
    }
    let times: Vec<Duration> = stream::iter(0..800)
        .throttle(Rate::per_second(100).burst(10))
        .pause_with(pause)
        .map(|_| t0.elapsed())
        .collect()
        .await;
    let during = times
        .iter()
        .filter(|t| **t > Duration::from_secs(3) && **t < Duration::from_secs(5))
        .count();
    assert_eq!(during, 0);
    let first_after = times.iter().find(|t| **t > Duration::from_secs(3)).unwrap();
    assert_eq!(*first_after, Duration::from_secs(5));
    let next_second = times
        .iter()
        .filter(|t| **t >= Duration::from_secs(5) && **t < Duration::from_secs(6))
        .count();
    assert!(
        next_second <= 10 + 100,
        "{next_second} items in the second after the pause"
    );
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_leaks_no_capacity_and_keeps_the_line_moving() {
    let limiter = Limiter::new(Rate::per_second(10));
    let t0 = Instant::now();
    limiter.acquire().await; // t = 0
    let first = tokio::spawn(limiter.acquire()); // would get t = 100 ms
    tokio::task::yield_now().await;
    let second = tokio::spawn({
        let limiter = limiter.clone();
        async move {
            limiter.acquire().await;
            t0.elapsed()
        }
    });
    tokio::task::yield_now().await;
    assert_eq!(limiter.waiting(), 2);
    sleep(ms(50)).await;
    first.abort();
    // The second takes the slot the first gave up: nothing was spent by it.
    assert_eq!(second.await.unwrap(), ms(100));
    assert_eq!(limiter.waiting(), 0);
    limiter.acquire().await;
    assert_eq!(t0.elapsed(), ms(200));
}

#[tokio::test(start_paused = true)]
async fn set_rate_wakes_a_sleeping_waiter_to_the_new_rate() {
    let limiter = Limiter::new(Rate::per_second(1));
    let t0 = Instant::now();
    limiter.acquire().await;
    let waiter = tokio::spawn({
        let limiter = limiter.clone();
        async move {
            limiter.acquire().await;
            t0.elapsed()
        }
    });
    sleep(ms(5)).await;
    limiter.set_rate(Rate::per_second(100));
    // The 995 ms still owed at 1/s are rescaled to 9.95 ms at 100/s: the
    // waiter goes at 14.95 ms, on tokio's next 1 ms timer tick.
    assert_eq!(waiter.await.unwrap(), ms(15));
    assert_eq!(limiter.rate(), Rate::per_second(100));
}

#[tokio::test(start_paused = true)]
async fn empty_start_spaces_the_first_events() {
    let limiter = Limiter::new(Rate::per_second(10).burst(5).start_empty());
    let t0 = Instant::now();
    let mut times = Vec::new();
    for _ in 0..3 {
        limiter.acquire().await;
        times.push(t0.elapsed());
    }
    assert_eq!(times, [ms(0), ms(100), ms(200)]);
}

#[tokio::test(start_paused = true)]
async fn fixed_windows_never_send_more_than_count_per_window() {
    let limiter = Limiter::new(Rate::new(5, Duration::from_secs(1)).fixed_window());
    let t0 = Instant::now();
    sleep(ms(900)).await;
    let mut times = Vec::new();
    for _ in 0..12 {
        limiter.acquire().await;
        times.push(t0.elapsed().as_millis());
    }
    assert_eq!(
        times,
        [900, 900, 900, 900, 900, 1000, 1000, 1000, 1000, 1000, 2000, 2000]
    );
}

#[tokio::test(start_paused = true)]
async fn a_limiter_given_a_pause_grants_nothing_during_it() {
    let limiter = Limiter::new(Rate::per_second(10).burst(3));
    let pause = PauseHandle::new();
    let t0 = Instant::now();
    pause.pause_for(Duration::from_secs(1));
    limiter.acquire_during(&pause).await;
    assert_eq!(t0.elapsed(), Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn keyed_limiters_forget_idle_keys() {
    let per_key = KeyedLimiter::new(Rate::per_second(1));
    for round in 0..50u64 {
        for k in 0..100u64 {
            per_key.acquire(round * 100 + k).await;
        }
        sleep(Duration::from_secs(2)).await; // every key idle again
    }
    // 5 000 keys were used; only a bounded number are remembered.
    assert!(per_key.len() <= 2 * 100 + 64, "{} keys kept", per_key.len());
    per_key.forget_idle();
    assert_eq!(per_key.len(), 0);
}

#[tokio::test(start_paused = true)]
async fn keyed_limiters_keep_separate_budgets() {
    let per_key = KeyedLimiter::new(Rate::per_second(10));
    let t0 = Instant::now();
    per_key.acquire("a").await;
    per_key.acquire("b").await;
    assert_eq!(t0.elapsed(), Duration::ZERO);
    per_key.acquire("a").await;
    assert_eq!(t0.elapsed(), ms(100));
}

#[tokio::test(start_paused = true)]
async fn pause_extends_but_never_shortens_and_resume_wakes_everyone() {
    let pause = PauseHandle::with_max_pause(Duration::from_secs(60));
    let t0 = Instant::now();
    pause.pause_for(Duration::from_secs(5));
    let until = pause.pause_for(Duration::from_secs(2));
    assert_eq!(until, t0 + Duration::from_secs(5));
    assert_eq!(pause.paused_until(), Some(t0 + Duration::from_secs(5)));
    // A hostile hour is capped at max_pause.
    assert_eq!(
        pause.pause_for(Duration::from_secs(3600)),
        t0 + Duration::from_secs(60)
    );

    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let pause = pause.clone();
            tokio::spawn(async move {
                pause.ready().await;
                t0.elapsed()
            })
        })
        .collect();
    sleep(Duration::from_secs(1)).await;
    pause.resume();
    for w in waiters {
        assert_eq!(w.await.unwrap(), Duration::from_secs(1));
    }
    assert!(!pause.is_paused());
}

/// A waiter's own timer that fires late costs no token. Here the clock
/// moves 1.6 ms past the waiter's due instant before the runtime runs its
/// timer, as tokio's timer does in real time by its own design (up to two
/// ticks). The token is dated when it was due (1 ms), so the next one is
/// due at 2 ms and goes at once, not a period after the late wake-up.
#[tokio::test(start_paused = true)]
async fn a_waiter_woken_late_by_its_own_timer_keeps_the_schedule() {
    let us = Duration::from_micros;
    let limiter = Limiter::new(Rate::per_second(1_000));
    let t0 = Instant::now();
    limiter.acquire().await;
    let waiter = tokio::spawn({
        let limiter = limiter.clone();
        async move {
            limiter.acquire().await;
            let woken = t0.elapsed();
            limiter.acquire().await;
            (woken, t0.elapsed())
        }
    });
    // The waiter joins the line and sleeps until 1 ms.
    tokio::task::yield_now().await;
    tokio::time::advance(us(2_600)).await;
    assert_eq!(waiter.await.unwrap(), (us(2_600), us(2_600)));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// For any rate, burst and arrival pattern, every grant is due at the
    /// instant an ideal GCRA schedule gives it (from its arrival and the
    /// schedule of the grants before it, not from when the previous one
    /// happened to return) and happens within one tokio timer tick (1 ms)
    /// of that instant: the bound "at most burst + span / interval in any
    /// span" holds on the due instants, nothing waits needlessly, and a
    /// timer that fires late costs no capacity.
    #[test]
    fn gcra_grants_exactly_when_allowed(
        count in 1u32..500,
        period_ms in 1u64..2_000,
        burst in 1u32..20,
        gaps in proptest::collection::vec(0u64..50, 1..120),
    ) {
        let rate = Rate::new(count, ms(period_ms)).burst(burst);
        let interval = rate.interval().as_nanos();
        let grants = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(async {
                let limiter = Limiter::new(rate);
                let t0 = Instant::now();
                let mut grants = Vec::new();
                for gap in &gaps {
                    sleep(ms(*gap)).await;
                    let arrival = t0.elapsed();
                    limiter.acquire().await;
                    grants.push((arrival.as_nanos(), t0.elapsed().as_nanos()));
                }
                grants
            });
        let tolerance = u128::from(burst - 1) * interval;
        let tick = ms(1).as_nanos();
        // The ideal schedule: theoretical arrival time `tat`, each grant due
        // at max(arrival, tat - tolerance), then tat = max(tat, due) + interval.
        let mut tat = 0u128;
        for (j, &(arrival, granted)) in grants.iter().enumerate() {
            let due = arrival.max(tat.saturating_sub(tolerance));
            tat = tat.max(due) + interval;
            prop_assert!(granted >= due, "grant {j} at {granted} before it was due at {due}");
            prop_assert!(granted < due + tick, "grant {j} at {granted} waited past {due}");
        }
    }
}
