//! Whole-process measurements, printed as tables: memory that stays flat,
//! rate accuracy against a rate-limiting server, and pause latency. All
//! traffic goes to the in-process demo server on 127.0.0.1.
//!
//! ```text
//! cargo bench --bench loopback                 # everything (about a minute)
//! cargo bench --bench loopback -- memory
//! cargo bench --bench loopback -- rate
//! cargo bench --bench loopback -- pause
//! cargo bench --bench loopback -- chart       # writes benches/pictures/requests-per-100ms.png
//! ```

use std::process::Command;
use std::time::Duration;

use futures::{stream, StreamExt};
use http::StatusCode;
use sluicegate::demo::{DemoConfig, DemoServer};
use sluicegate::mock::{MockResponse, MockTransport, Route};
use sluicegate::prelude::*;
use sluicegate::{Adaptive, ReqwestTransport};

#[path = "shared/hand_written.rs"]
mod hand_written;
use tokio::time::Instant;

const CONCURRENCY: usize = 64;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--memory-child") {
        let mode = args[i + 1].clone();
        let n: u64 = args[i + 2].parse().unwrap();
        memory_child(&mode, n);
        return;
    }
    let filter = args
        .iter()
        .find(|a| !a.starts_with('-'))
        .cloned()
        .unwrap_or_default();
    let wanted = |name: &str| filter.is_empty() || name.contains(filter.as_str());
    if wanted("memory") {
        memory();
    }
    if wanted("rate") {
        rate_against_server();
    }
    if wanted("pause") {
        pause_latency();
    }
    if wanted("chart") {
        chart();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Peak resident memory of this process so far, in KiB (Linux `VmHWM`).
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The hand-written client the memory rows compare with (see
/// `shared/hand_written.rs`): over the mock or reqwest, bare or with a task
/// per request (`-spawned`).
async fn hand_written_count(mode: &str, n: u64) -> u64 {
    let spawned = mode.ends_with("-spawned");
    if mode.starts_with("mock-") {
        let mock = hand_written::items_mock();
        return hand_written::over_mock(&mock, "http://127.0.0.1:8080", n, CONCURRENCY, spawned)
            .await;
    }
    let server = DemoServer::start(DemoConfig::default().items(n))
        .await
        .unwrap();
    let http = ReqwestTransport::client_builder().build().unwrap();
    let ok = hand_written::over_reqwest(&http, &server.url(), n, CONCURRENCY, spawned).await;
    std::mem::forget(server);
    ok
}

fn memory_child(mode: &str, n: u64) {
    let detail = MemoryDetail::start();
    if mode.contains("-hand") {
        let ok = runtime().block_on(hand_written_count(mode, n));
        assert_eq!(ok, n);
        println!("{}", peak_rss_kib());
        if let Some(detail) = detail {
            detail.print();
        }
        return;
    }
    let ok = runtime().block_on(async {
        let client = match mode {
            "mock" => {
                let mock = MockTransport::new();
                mock.record_calls(false);
                mock.mount(Route::get("/items/{id}").respond(MockResponse::json(
                    &serde_json::json!({ "email": "a@example.com" }),
                )));
                Client::builder()
                    .transport(mock)
                    .base_url("http://127.0.0.1:8080")
                    .build()
                    .unwrap()
            }
            _ => {
                let server = DemoServer::start(DemoConfig::default().items(n))
                    .await
                    .unwrap();
                let builder = Client::builder();
                let builder = match mode {
                    #[cfg(feature = "hyper-transport")]
                    "hyper" => builder.transport(sluicegate::HyperTransport::new()),
                    _ => builder.transport(ReqwestTransport::default()),
                };
                let client = builder.base_url(server.url()).build().unwrap();
                // The server lives as long as the process.
                std::mem::forget(server);
                client
            }
        };
        stream::iter(0..n)
            .fetch_concurrent(CONCURRENCY, client.get(|id: &u64| format!("/items/{id}")))
            .filter(|r| futures::future::ready(r.is_ok()))
            .count()
            .await as u64
    });
    assert_eq!(ok, n);
    println!("{}", peak_rss_kib());
    if let Some(detail) = detail {
        detail.print();
    }
}

/// With `SLUICEGATE_MEMORY_DETAIL` set, where the resident memory is at its
/// peak (on stderr): a thread samples `/proc/self` every 2 ms and keeps the
/// breakdown of the largest resident set it saw. Diagnostic only: the
/// sampler's own thread and reads add a little to what it measures.
struct MemoryDetail {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sampler: std::thread::JoinHandle<(u64, Vec<(String, u64)>)>,
}

impl MemoryDetail {
    fn start() -> Option<Self> {
        std::env::var_os("SLUICEGATE_MEMORY_DETAIL")?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let sampler = std::thread::spawn(move || {
            let mut peak = (0, Vec::new());
            loop {
                let done = stopped.load(std::sync::atomic::Ordering::Relaxed);
                let rss = status_kib("VmRSS");
                if rss > peak.0 {
                    peak = (rss, resident_by_kind());
                }
                if done {
                    return peak;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Some(Self { stop, sampler })
    }

    fn print(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (rss, rows) = self.sampler.join().unwrap();
        eprintln!(
            "VmHWM {} kB, largest sampled VmRSS {rss} kB:",
            peak_rss_kib()
        );
        for (kind, kib) in rows.iter().filter(|(_, kib)| *kib > 0) {
            eprintln!("  {kind}: {kib}");
        }
    }
}

/// A `/proc/self/status` field, in KiB.
fn status_kib(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Resident KiB per kind of mapping: each file's mappings by permissions,
/// and the anonymous ones as the main heap, the main stack, 2 MiB thread
/// stacks, glibc's per-thread arenas (parts of 64 MiB reservations) and
/// the rest.
fn resident_by_kind() -> Vec<(String, u64)> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let mut kind = String::new();
    let mut rows: Vec<(String, u64)> = Vec::new();
    for l in smaps.lines() {
        let fields: Vec<&str> = l.split_whitespace().collect();
        let Some(first) = fields.first() else {
            continue;
        };
        if first.contains('-') && !first.ends_with(':') {
            let perms = fields.get(1).copied().unwrap_or("");
            let (lo, hi) = first.split_once('-').unwrap_or(("0", "0"));
            let span = (u64::from_str_radix(hi, 16).unwrap_or(0)
                - u64::from_str_radix(lo, 16).unwrap_or(0))
                / 1024;
            kind = match fields.get(5) {
                Some(name) if name.starts_with('/') => {
                    let file = name.rsplit('/').next().unwrap_or(name);
                    // The bench binary's name carries a hash.
                    let file = if file.starts_with("loopback-") {
                        "loopback"
                    } else {
                        file
                    };
                    format!("{file} {perms}")
                }
                Some(name) => name.to_string(),
                None if perms.starts_with("---") => "guard".into(),
                None if span == 2048 || span == 2044 => "thread stacks".into(),
                None if span >= 1024 => "arenas".into(),
                None => "anon small".into(),
            };
        } else if *first == "Rss:" {
            let rss: u64 = fields.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
            match rows.iter_mut().find(|(k, _)| *k == kind) {
                Some(row) => row.1 += rss,
                None => rows.push((kind.clone(), rss)),
            }
        }
    }
    rows.sort();
    rows
}

fn child_peak(mode: &str, n: u64) -> u64 {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--memory-child", mode, &n.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn memory() {
    println!("\n## Peak memory (VmHWM of a fresh process), fetch_concurrent({CONCURRENCY})\n");
    println!(
        "| transport | items | peak RSS | vs the smaller run | hand-written `buffer_unordered` | ratio | hand-written, a task per request | ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut rows = vec![("mock", 100_000, 1_000_000), ("http", 20_000, 200_000)];
    // `HyperTransport`, against the same hand-written reqwest clients.
    if cfg!(feature = "hyper-transport") {
        rows.push(("hyper", 20_000, 200_000));
    }
    for (mode, small, large) in rows {
        let base = if mode == "mock" { "mock" } else { "http" };
        let hand = format!("{base}-hand");
        let spawned = format!("{base}-hand-spawned");
        let mib = |k: u64| k as f64 / 1024.0;
        let mut first = 0;
        for n in [small, large] {
            let ours = child_peak(mode, n);
            let bare = child_peak(&hand, n);
            let tasks = child_peak(&spawned, n);
            let change = if n == small {
                first = ours;
                String::new()
            } else {
                format!(
                    "{:+.1}%",
                    100.0 * (ours as f64 - first as f64) / first as f64
                )
            };
            println!(
                "| {mode} | {n} | {:.1} MiB | {change} | {:.1} MiB | {:.2}× | {:.1} MiB | {:.2}× |",
                mib(ours),
                mib(bare),
                ours as f64 / bare as f64,
                mib(tasks),
                ours as f64 / tasks as f64,
            );
        }
    }
}

struct RateRun {
    asked: u32,
    adaptive: bool,
    items: u64,
    ok: u64,
    elapsed: Duration,
    server_ok: u64,
    server_429: u64,
    /// (ok, 429) answered after the first 5 s, once learning is done.
    steady: (u64, u64),
}

async fn rate_run(limit: u32, asked: u32, adaptive: bool, items: u64) -> RateRun {
    let server = DemoServer::start(
        DemoConfig::default()
            .items(items)
            .rate_limit(Rate::per_second(limit).burst(10))
            .record_arrivals(true),
    )
    .await
    .unwrap();
    let client = Client::builder()
        .transport(ReqwestTransport::default())
        .base_url(server.url())
        // Burst 2: a tolerance of one interval covers tokio's 1 ms timer tick.
        .limiter(if adaptive {
            Limiter::new(Rate::per_second(asked).burst(2)).adaptive(Adaptive::new())
        } else {
            Limiter::new(Rate::per_second(asked).burst(2))
        })
        .retry_on(
            StatusCode::TOO_MANY_REQUESTS,
            Backoff::full_jitter(Duration::from_millis(50))
                .max_attempts(50)
                .ignore_retry_after(),
        )
        .build()
        .unwrap();
    let started = Instant::now();
    let ok = stream::iter(0..items)
        .fetch_concurrent(16, client.get(|id: &u64| format!("/items/{id}")))
        .filter(|r| futures::future::ready(r.is_ok()))
        .count()
        .await as u64;
    let counts = server.counts();
    let late: Vec<_> = server
        .arrivals()
        .into_iter()
        .filter(|a| a.at >= Duration::from_secs(5))
        .collect();
    let steady = (
        late.iter().filter(|a| a.status == 200).count() as u64,
        late.iter().filter(|a| a.status == 429).count() as u64,
    );
    RateRun {
        asked,
        adaptive,
        items,
        ok,
        elapsed: started.elapsed(),
        server_ok: counts.ok,
        server_429: counts.too_many_requests,
        steady,
    }
}

fn rate_against_server() {
    const LIMIT: u32 = 200;
    println!("\n## Rate against a server that allows {LIMIT}/s (burst 10), 16 in flight\n");
    println!("| asked | adaptive | items | arrived | goodput | share of limit | 429s | wasted | wasted after 5 s |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let rt = runtime();
    for (asked, adaptive, items) in [
        (LIMIT, false, 1_000),
        (2 * LIMIT, false, 3_000),
        (2 * LIMIT, true, 3_000),
    ] {
        let run = rt.block_on(rate_run(LIMIT, asked, adaptive, items));
        let goodput = run.server_ok as f64 / run.elapsed.as_secs_f64();
        let total = run.server_ok + run.server_429;
        println!(
            "| {}/s | {} | {} | {} | {goodput:.1}/s | {:.1}% | {} | {:.1}% | {:.1}% |",
            run.asked,
            if run.adaptive { "yes" } else { "no" },
            run.items,
            run.ok,
            100.0 * goodput / f64::from(LIMIT),
            run.server_429,
            100.0 * run.server_429 as f64 / total as f64,
            100.0 * run.steady.1 as f64 / (run.steady.0 + run.steady.1).max(1) as f64,
        );
    }
}

fn pause_latency() {
    println!("\n## Pause latency: requests that still reach the server after its first 503 of an outage\n");
    println!(
        "| outage | first 503 at | arrivals after it, during the outage | in flight allowed |"
    );
    println!("|---|---|---|---|");
    let rt = runtime();
    rt.block_on(async {
        let every = Duration::from_secs(2);
        let lasting = Duration::from_millis(500);
        let server = DemoServer::start(
            DemoConfig::default()
                .items(3_000)
                .outages(every, lasting)
                .record_arrivals(true),
        )
        .await
        .unwrap();
        let client = Client::builder()
            .transport(ReqwestTransport::default())
            .base_url(server.url())
            .rate(Rate::per_second(500).burst(10))
            .pause_on(StatusCode::SERVICE_UNAVAILABLE, Duration::from_millis(500))
            .build()
            .unwrap();
        let ok = stream::iter(0..3_000u64)
            .fetch_concurrent(16, client.get(|id: &u64| format!("/items/{id}")))
            .filter(|r| futures::future::ready(r.is_ok()))
            .count()
            .await;
        assert_eq!(ok, 3_000);
        let arrivals = server.arrivals();
        let mut k = 1;
        loop {
            let start = every * k;
            let end = start + lasting;
            if arrivals.last().is_none_or(|a| a.at < start) {
                break;
            }
            let first = arrivals
                .iter()
                .find(|a| a.at >= start && a.at < end && a.status == 503);
            if let Some(first) = first {
                let after = arrivals
                    .iter()
                    .filter(|a| a.at > first.at && a.at < end)
                    .count();
                println!(
                    "| {k} | {:.1?} into it | {after} | {} |",
                    first.at - start,
                    16 - 1
                );
            }
            k += 1;
        }
    });
}

/// Requests per 100 ms as the server saw them, during a run asking for the
/// server's own limit with one 503 outage in the middle, drawn to a PNG.
fn chart() {
    const LIMIT: u32 = 200;
    let arrivals = runtime().block_on(async {
        let server = DemoServer::start(
            DemoConfig::default()
                .items(1_000)
                .rate_limit(Rate::per_second(LIMIT).burst(10))
                .outages(Duration::from_millis(2_500), Duration::from_millis(1_000))
                .record_arrivals(true),
        )
        .await
        .unwrap();
        let client = Client::builder()
            .transport(ReqwestTransport::default())
            .base_url(server.url())
            .rate(Rate::per_second(LIMIT).burst(2))
            .pause_on(StatusCode::SERVICE_UNAVAILABLE, Duration::from_secs(1))
            .build()
            .unwrap();
        stream::iter(0..700u64)
            .fetch_concurrent(16, client.get(|id: &u64| format!("/items/{id}")))
            .for_each(|_| async {})
            .await;
        server.arrivals()
    });
    let bins = (arrivals.iter().map(|a| a.at.as_millis()).max().unwrap_or(0) / 100 + 1) as usize;
    let mut ok = vec![0u32; bins];
    let mut refused = vec![0u32; bins];
    for a in &arrivals {
        let bin = (a.at.as_millis() / 100) as usize;
        if a.status == 200 {
            ok[bin] += 1
        } else {
            refused[bin] += 1
        }
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("benches/pictures/requests-per-100ms.png");
    match draw(&path, &ok, &refused, LIMIT) {
        Ok(()) => println!("\nchart written to {}", path.display()),
        Err(e) => println!("\nno chart: {e}"),
    }
}

fn draw(
    path: &std::path::Path,
    ok: &[u32],
    refused: &[u32],
    limit: u32,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").map_err(|e| {
        format!("DejaVuSans.ttf not found ({e}); install the Debian package fonts-dejavu-core")
    })?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| "unusable font")?;
    std::fs::create_dir_all(path.parent().unwrap())?;
    let root = BitMapBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let seconds = ok.len() as f64 / 10.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Requests per 100 ms at the server: asking for its limit ({limit}/s), one 503 outage"),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..seconds, 0u32..(limit / 10 + 16))?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("requests per 100 ms")
        .label_style(("sans-serif", 14))
        .draw()?;
    let at = |i: usize| i as f64 / 10.0;
    chart
        .draw_series(LineSeries::new(
            [(0.0, limit / 10), (seconds, limit / 10)],
            ShapeStyle::from(&BLACK.mix(0.5)).stroke_width(1),
        ))?
        .label(format!("server limit ({limit}/s)"))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.5)));
    chart
        .draw_series(ok.iter().enumerate().map(|(i, n)| {
            Rectangle::new(
                [(at(i) + 0.01, 0), (at(i) + 0.09, *n)],
                GREEN.mix(0.7).filled(),
            )
        }))?
        .label("answered 200")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], GREEN.mix(0.7).filled()));
    chart
        .draw_series(
            refused
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(i, n)| {
                    Rectangle::new([(at(i) + 0.01, 0), (at(i) + 0.09, *n)], RED.filled())
                }),
        )?
        .label("refused (503)")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], RED.filled()));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}
