//! Stats, tracing and redaction.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{stream, StreamExt};
use http::StatusCode;
use sluicegate::mock::{Latency, MockResponse, MockTransport, Route};
use sluicegate::prelude::*;
use sluicegate::{Stats, TransportErrorKind};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A scripted run: 40 items, some refused once with 429, one 503 pausing
/// everything, some failing for good (404), some reset then fine.
fn scripted() -> MockTransport {
    let mock = MockTransport::new();
    let seen = Arc::new(Mutex::new(BTreeMap::<u32, u32>::new()));
    mock.mount(
        Route::get("/items/{id}")
            .latency(Latency::fixed(ms(7)))
            .respond_with(move |r| {
                let id: u32 = r.param("id").unwrap().parse().unwrap();
                let mut seen = seen.lock().unwrap();
                let n = seen.entry(id).or_default();
                *n += 1;
                match (id % 10, *n) {
                    (1, 1) => MockResponse::status(429),
                    (2, 1) => MockResponse::transport_error(TransportErrorKind::Reset),
                    (3, _) => MockResponse::status(404),
                    (5, 1) if id == 25 => MockResponse::status(503).header("retry-after", "2"),
                    _ => MockResponse::ok().text("0123456789"),
                }
            }),
    );
    mock
}

async fn run(
    mock: &MockTransport,
    client: &Client,
    stage: Option<Stats>,
) -> Vec<Result<Fetched<u32>, FetchError<u32>>> {
    let _ = mock;
    let mut fetch = stream::iter(0u32..40)
        .fetch_concurrent(4, client.get(|id: &u32| format!("/items/{id}")))
        .retry_on(StatusCode::TOO_MANY_REQUESTS, Backoff::constant(ms(50)))
        .retry_on(Matcher::transport_errors(), Backoff::constant(ms(20)))
        .pause_on(StatusCode::SERVICE_UNAVAILABLE, Duration::from_secs(10));
    if let Some(stage) = stage {
        fetch = fetch.with_stats(stage);
    }
    fetch.collect().await
}

#[tokio::test(start_paused = true)]
async fn stats_match_the_call_log_exactly() {
    let mock = scripted();
    let client = Client::builder()
        .transport(mock.clone())
        .base_url("http://mock")
        .build()
        .unwrap();
    let stage = Stats::new(Some("items"));
    let results = run(&mock, &client, Some(stage.clone())).await;

    let calls = mock.calls();
    let stats = client.stats().unwrap().snapshot();
    assert_eq!(stats.requests, calls.len() as u64);
    let mut by_status = BTreeMap::new();
    for status in calls.iter().filter_map(|c| c.status()) {
        *by_status.entry(status.as_u16()).or_insert(0u64) += 1;
    }
    assert_eq!(stats.by_status, by_status);
    assert_eq!(by_status[&429], 4);
    assert_eq!(by_status[&404], 4);
    assert_eq!(
        stats.transport_errors,
        BTreeMap::from([("connection reset".to_owned(), 4)])
    );
    assert_eq!(
        stats.retries,
        4 + 4 + 1,
        "the 429s, the resets, and the re-attempt after the 503's pause"
    );
    assert_eq!(stats.pauses, 1);
    assert_eq!(stats.paused, Duration::from_secs(2));
    assert_eq!(
        (stats.items_in, stats.items_ok, stats.items_failed),
        (40, 36, 4)
    );
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 36);
    assert_eq!(stats.bytes_received, 10 * (by_status[&200]));
    assert_eq!((stats.in_flight, stats.peak_in_flight), (0, 4));
    assert_eq!(stats.latency.count, calls.len() as u64);
    assert_eq!((stats.latency.p50, stats.latency.max), (ms(7), ms(7)));
    // The stage counted the same run.
    let staged = stage.snapshot();
    assert_eq!(
        (staged.name.as_deref(), staged.requests),
        (Some("items"), stats.requests)
    );

    let summary = stats.to_string();
    assert!(summary.contains("40 in: 36 ok, 4 failed"), "{summary}");
    assert!(summary.contains("429: 4"), "{summary}");
    let json = serde_json::to_value(&stats).unwrap();
    assert_eq!(json["items_ok"], 36);
}

/// Records every span and event with its fields, as text.
#[derive(Clone, Default)]
struct Capture {
    lines: Arc<Mutex<Vec<String>>>,
}

struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={:?}", field.name(), value);
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields(String::new());
        attrs.record(&mut fields);
        ctx.span(id).unwrap().extensions_mut().insert(fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let span = ctx.span(id).unwrap();
        let mut ext = span.extensions_mut();
        values.record(ext.get_mut::<Fields>().unwrap());
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        let scope = ctx
            .event_span(event)
            .map(|span| {
                let ext = span.extensions();
                format!(
                    "{}{{{}}}",
                    span.name(),
                    ext.get::<Fields>().map_or("", |f| f.0.trim())
                )
            })
            .unwrap_or_default();
        self.lines.lock().unwrap().push(format!(
            "{} {scope}:{}",
            event.metadata().level(),
            fields.0
        ));
    }
}

#[tokio::test(start_paused = true)]
async fn every_attempt_is_logged_before_and_after_in_its_span() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    let _guard = tracing::subscriber::set_default(subscriber);

    let mock = scripted();
    let client = Client::builder()
        .transport(mock.clone())
        .base_url("http://mock")
        .build()
        .unwrap();
    run(&mock, &client, None).await;

    let lines = capture.lines.lock().unwrap().clone();
    let sending: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("message=sending"))
        .collect();
    let answered = lines
        .iter()
        .filter(|l| l.contains("message=answered"))
        .count();
    let failed = lines
        .iter()
        .filter(|l| l.contains("message=failed"))
        .count();
    let calls = mock.calls();
    assert_eq!(sending.len(), calls.len());
    assert_eq!(
        answered + failed,
        calls.len(),
        "one 'after' event per attempt"
    );
    assert_eq!(failed, 4, "the resets");
    // Spans carry method, URL (without query), item and attempt.
    assert!(
        sending.iter().any(|l| l.contains(
            r#"sluicegate::fetch{method=GET item=11 attempt=2 url=http://mock/items/11}"#
        )),
        "{sending:#?}"
    );
    let retry = lines
        .iter()
        .find(|l| l.contains("message=retrying"))
        .unwrap();
    assert!(
        retry.starts_with("DEBUG")
            && retry.contains("delay_ms=")
            && retry.contains("cause=\"policy\""),
        "{retry}"
    );
    let pause = lines
        .iter()
        .find(|l| l.contains("message=pausing every request"))
        .unwrap();
    assert!(
        pause.starts_with("INFO")
            && pause.contains("pause_ms=2000")
            && pause.contains("cause=\"retry-after\""),
        "{pause}"
    );
    assert!(lines.iter().any(|l| l.contains("pause over")));
    let answer = lines
        .iter()
        .find(|l| l.contains("message=answered"))
        .unwrap();
    assert!(
        answer.contains("status=200")
            && answer.contains("duration_ms=7.0")
            && answer.contains("bytes=10"),
        "{answer}"
    );
    // A healthy item says nothing at info; only the pause and the failures do.
    let info: Vec<_> = lines.iter().filter(|l| !l.starts_with("DEBUG")).collect();
    assert_eq!(info.len(), 2 + 4, "{info:#?}");
}

#[tokio::test(start_paused = true)]
async fn secrets_appear_nowhere() {
    const SECRET: &str = "s3cr3t-t0ken";
    const QUERY_KEY: &str = "k3y-in-query";
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    let _guard = tracing::subscriber::set_default(subscriber);

    let mock = MockTransport::new();
    mock.mount(
        Route::get("/private/{id}").respond(
            MockResponse::status(500)
                .header("set-cookie", format!("session={SECRET}"))
                .header("x-api-key", SECRET),
        ),
    );
    let client = Client::builder()
        .transport(mock.clone())
        .base_url("http://mock")
        .default_header("authorization", format!("Bearer {SECRET}"))
        .redact_header("x-api-key")
        .build()
        .unwrap();
    let endpoint = client
        .request(|id: &u32| {
            RequestSpec::get(format!("/private/{id}?key={QUERY_KEY}"))
                .header("cookie", format!("c={SECRET}"))
        })
        .retry_on(Matcher::server_errors(), Backoff::constant(ms(10)));
    let dir = std::env::temp_dir().join(format!("sluicegate-redact-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let output = dir.join("out.jsonl");
    let report = stream::iter([1u32])
        .fetch_concurrent(1, endpoint.clone())
        .json::<serde_json::Value>()
        .write_jsonl(&output)
        .await
        .unwrap();
    assert_eq!(report.failed, 1);

    let err = endpoint.fetch(2).await.unwrap_err();
    let mut everything = String::new();
    let _ = write!(
        everything,
        "{err} {err:?} {:?} {:?}",
        err.response(),
        endpoint
    );
    let _ = write!(everything, "{:?}", endpoint.build_request(&3));
    everything.push_str(&std::fs::read_to_string(&report.dead_letters).unwrap());
    let logs = capture.lines.lock().unwrap().join("\n");
    everything.push_str(&logs);
    assert!(
        everything.contains("Sensitive"),
        "redacted values are marked, not dropped silently"
    );
    assert!(!everything.contains(SECRET), "{everything}");
    // Queries often carry keys too: logs leave them out.
    assert!(
        logs.contains("url=http://mock/private/1}") && !logs.contains(QUERY_KEY),
        "{logs}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
