//! flat_unpack, pagination, JSONL in and out, and resumable runs.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{stream, StreamExt};
use http::{Request, Response};
use sluicegate::etl::{paginate, read_jsonl, Journal, PageRef, Pagination};
use sluicegate::mock::{MockResponse, MockTransport, Route};
use sluicegate::{Client, FetchErrorKind, SluiceExt, Transport, TransportError};

fn client(mock: &MockTransport) -> Client {
    Client::builder()
        .transport(mock.clone())
        .base_url("http://mock")
        .build()
        .unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluicegate-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Unpacks one body served at `/page` with `pointer`.
async fn unpack_body<T: serde::de::DeserializeOwned + Send + 'static>(
    body: impl Into<Bytes>,
    pointer: &str,
) -> Vec<Result<T, sluicegate::FetchError<&'static str>>> {
    let mock = MockTransport::new();
    mock.mount(Route::get("/page").respond(MockResponse::ok().body(body.into())));
    stream::iter(["page-1"])
        .fetch_concurrent(1, client(&mock).get(|_: &&str| "/page"))
        .flat_unpack_at::<T>(pointer)
        .collect()
        .await
}

#[tokio::test(start_paused = true)]
async fn flat_unpack_handles_empty_single_and_large_arrays() {
    assert!(unpack_body::<u64>("[]", "").await.is_empty());
    let one = unpack_body::<u64>("[7]", "").await;
    assert_eq!(one.into_iter().map(Result::unwrap).collect::<Vec<_>>(), [7]);
    let big: Vec<u64> = (0..100_000).collect();
    let out = unpack_body::<u64>(serde_json::to_vec(&big).unwrap(), "").await;
    assert_eq!(out.into_iter().map(Result::unwrap).collect::<Vec<_>>(), big);
}

#[tokio::test(start_paused = true)]
async fn flat_unpack_at_a_pointer() {
    let body = r#"{"data": {"items": [{"id": 1}, {"id": 2}]}, "next": null}"#;
    let out = unpack_body::<serde_json::Value>(body, "/data/items").await;
    let ids: Vec<_> = out
        .into_iter()
        .map(|r| r.unwrap()["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 2]);
    let missing = unpack_body::<u64>(body, "/data/nothing").await;
    assert_eq!(missing.len(), 1);
    assert!(missing[0]
        .as_ref()
        .unwrap_err()
        .detail()
        .unwrap()
        .contains("nothing at JSON pointer"));
}

#[tokio::test(start_paused = true)]
async fn malformed_and_non_array_bodies_are_one_error_carrying_the_source() {
    for (body, expected) in [
        ("[1, 2", "malformed JSON"),
        (r#"{"items": []}"#, "found an object"),
        ("\"text\"", "found a string"),
        ("", "malformed JSON"),
    ] {
        let out = unpack_body::<u64>(body, "").await;
        assert_eq!(out.len(), 1, "{body:?}");
        let err = out[0].as_ref().unwrap_err();
        assert_eq!(
            (err.kind(), *err.item()),
            (FetchErrorKind::Decode, "page-1")
        );
        assert!(err.detail().unwrap().contains(expected), "{body:?}: {err}");
        assert_eq!(err.response().unwrap().body().len(), body.len());
    }
}

#[tokio::test(start_paused = true)]
async fn an_element_that_does_not_decode_fails_alone() {
    let out = unpack_body::<u64>(r#"[1, "two", 3, {"four": 4}, 5]"#, "").await;
    assert_eq!(out.len(), 5);
    let good: Vec<u64> = out
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    assert_eq!(good, [1, 3, 5]);
    let err = out[1].as_ref().unwrap_err();
    assert_eq!(*err.item(), "page-1");
    assert!(
        err.detail()
            .unwrap()
            .starts_with("element 1 does not decode"),
        "{err}"
    );
    assert!(out[3]
        .as_ref()
        .unwrap_err()
        .detail()
        .unwrap()
        .starts_with("element 3"));
}

#[tokio::test(start_paused = true)]
async fn sourced_elements_keep_their_page_and_position() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/lists/{n}").respond_with(|r| {
        let n: u64 = r.param("n").unwrap().parse().unwrap();
        MockResponse::json(&[n * 10, n * 10 + 1])
    }));
    let out: Vec<_> = stream::iter([1u64, 2])
        .fetch_concurrent(1, client(&mock).get(|n: &u64| format!("/lists/{n}")))
        .ordered()
        .flat_unpack_sourced::<u64>("")
        .map(|r| {
            let e = r.unwrap();
            (e.source, e.index, e.value)
        })
        .collect()
        .await;
    assert_eq!(out, [(1, 0, 10), (1, 1, 11), (2, 0, 20), (2, 1, 21)]);
}

#[tokio::test(start_paused = true)]
async fn paginates_by_link_header_resolving_relative_links() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/v1/users").respond_with(|r| {
        let page: u32 = r.query("page").map_or(1, |p| p.parse().unwrap());
        let response = MockResponse::json(&[page * 10, page * 10 + 1]);
        match page {
            1 => response.header(
                "link",
                r#"<https://elsewhere.test/x>; rel="prev", </v1/users?page=2>; rel="next""#,
            ),
            2 => response.header("link", r#"<users?page=3>; rel="next""#),
            _ => response,
        }
    }));
    let pages: Vec<_> = paginate(&client(&mock), "/v1/users", Pagination::link_header())
        .map(|r| r.unwrap().item)
        .collect()
        .await;
    assert_eq!(
        pages.iter().map(|p| p.number).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    let uris: Vec<String> = mock.calls().iter().map(|c| c.uri.to_string()).collect();
    assert_eq!(
        uris,
        [
            "http://mock/v1/users",
            "http://mock/v1/users?page=2",
            "http://mock/v1/users?page=3"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn paginates_by_page_number_until_an_empty_page() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/items").respond_with(|r| {
        let page: u64 = r.query("p").unwrap().parse().unwrap();
        let items: Vec<u64> = if page <= 3 { vec![page; 2] } else { vec![] };
        MockResponse::json(&serde_json::json!({ "items": items }))
    }));
    let items: Vec<u64> = paginate(
        &client(&mock),
        "/items",
        Pagination::page_number("p", "/items"),
    )
    .flat_unpack_at::<u64>("/items")
    .map(Result::unwrap)
    .collect()
    .await;
    assert_eq!(items, [1, 1, 2, 2, 3, 3]);
    assert_eq!(mock.call_count(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_pagination_loop_is_detected_and_reported() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/a").respond(MockResponse::json(&[1]).header("link", "</b>; rel=next")));
    mock.mount(Route::get("/b").respond(MockResponse::json(&[2]).header("link", "</a>; rel=next")));
    let out: Vec<_> = paginate(&client(&mock), "/a", Pagination::link_header())
        .collect()
        .await;
    assert_eq!(out.len(), 3);
    assert!(out[0].is_ok() && out[1].is_ok());
    let err = out[2].as_ref().unwrap_err();
    assert_eq!(err.kind(), FetchErrorKind::PaginationLoop);
    assert_eq!(
        err.item(),
        &PageRef {
            number: 3,
            token: "http://mock/a".into()
        }
    );
    assert_eq!(
        mock.call_count(),
        2,
        "the loop is caught before asking again"
    );

    // A cursor that repeats is a loop too.
    let stuck = MockTransport::new();
    stuck.mount(
        Route::get("/c").respond(MockResponse::json(&serde_json::json!({ "next": "same" }))),
    );
    let out: Vec<_> = paginate(&client(&stuck), "/c", Pagination::cursor("/next", "cursor"))
        .collect()
        .await;
    assert_eq!(out.len(), 3);
    assert_eq!(
        out[2].as_ref().unwrap_err().kind(),
        FetchErrorKind::PaginationLoop
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_page_ends_the_walk_with_its_error() {
    let mock = MockTransport::new();
    mock.mount(Route::get("/a").respond(MockResponse::json(&[1]).header("link", "</b>; rel=next")));
    mock.mount(Route::get("/b").respond(MockResponse::status(500)));
    let out: Vec<_> = paginate(&client(&mock), "/a", Pagination::link_header())
        .collect()
        .await;
    assert_eq!(out.len(), 2);
    assert_eq!(
        out[1].as_ref().unwrap_err().status(),
        Some(http::StatusCode::INTERNAL_SERVER_ERROR)
    );
}

#[tokio::test]
async fn jsonl_round_trip_with_a_bad_line_and_dead_letters() {
    let dir = temp_dir("jsonl");
    let input = dir.join("ids.jsonl");
    std::fs::write(
        &input,
        "{\"id\": 1}\n{\"id\": 2}\nnot json\n\n{\"id\": 4}\n{\"id\": \"x\"}\n",
    )
    .unwrap();

    #[derive(serde::Deserialize, serde::Serialize, Debug, PartialEq)]
    struct Row {
        id: u64,
    }
    let read: Vec<_> = read_jsonl::<Row>(&input).collect().await;
    assert_eq!(read.len(), 5);
    assert_eq!(read[2].as_ref().unwrap_err().line(), 3);
    assert_eq!(read[2].as_ref().unwrap_err().text(), Some("not json"));
    assert_eq!(read[4].as_ref().unwrap_err().line(), 6);

    let output = dir.join("rows.jsonl");
    let report = read_jsonl::<Row>(&input)
        .write_jsonl(&output)
        .await
        .unwrap();
    assert_eq!((report.ok, report.failed, report.skipped), (3, 2, 0));
    assert_eq!(
        lines(&output),
        [
            serde_json::json!({"id": 1}),
            serde_json::json!({"id": 2}),
            serde_json::json!({"id": 4})
        ]
    );
    let dead = lines(&dir.join("rows.failed.jsonl"));
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0]["line"], 3);
    assert_eq!(dead[0]["kind"], "invalid input");

    let missing: Vec<_> = read_jsonl::<Row>(dir.join("nope.jsonl")).collect().await;
    assert_eq!(missing.len(), 1);
    assert!(missing[0]
        .as_ref()
        .unwrap_err()
        .to_string()
        .contains("cannot open"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Each item of a JSONL read: the value, or the error's line number.
fn outcomes(read: &[Result<u64, sluicegate::etl::JsonlError>]) -> Vec<Result<u64, u64>> {
    read.iter()
        .map(|r| r.as_ref().map(|v| *v).map_err(|e| e.line()))
        .collect()
}

#[tokio::test]
async fn a_line_that_is_not_utf8_is_an_error_in_its_place_and_the_rest_still_come() {
    let dir = temp_dir("jsonl-utf8");
    let input = dir.join("ids.jsonl");
    std::fs::write(&input, b"1\n2\n\"caf\xe9\"\n4\n5\n").unwrap();

    let read: Vec<_> = read_jsonl::<u64>(&input).collect().await;
    assert_eq!(outcomes(&read), [Ok(1), Ok(2), Err(3), Ok(4), Ok(5)]);
    let bad = read[2].as_ref().unwrap_err();
    assert!(bad.to_string().contains("line 3: not UTF-8"), "{bad}");
    assert_eq!(bad.text(), Some("\"caf\u{fffd}\""));

    let output = dir.join("ids.out.jsonl");
    let report = read_jsonl::<u64>(&input)
        .write_jsonl(&output)
        .await
        .unwrap();
    assert_eq!((report.ok, report.failed), (4, 1));
    assert_eq!(lines(&output), [1, 2, 4, 5].map(serde_json::Value::from));
    let dead = lines(&dir.join("ids.out.failed.jsonl"));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["line"], 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_line_over_the_limit_is_an_error_and_reading_resumes_at_the_next_line() {
    let dir = temp_dir("jsonl-long");
    let input = dir.join("ids.jsonl");
    // Line 2 is longer than a read (64 KiB) as well as the limit; line 4 is
    // exactly at the limit, line 5 one byte over.
    let long = format!("\"{}\"", "x".repeat(200_000));
    let at_limit = format!("{:>32}", 4);
    let over_limit = format!("{:>33}", 5);
    std::fs::write(
        &input,
        format!("1\n{long}\n3\n{at_limit}\r\n{over_limit}\n6\n7"),
    )
    .unwrap();

    let read: Vec<_> = read_jsonl::<u64>(&input).max_line_bytes(32).collect().await;
    assert_eq!(
        outcomes(&read),
        [Ok(1), Err(2), Ok(3), Ok(4), Err(5), Ok(6), Ok(7)]
    );
    let bad = read[1].as_ref().unwrap_err();
    assert!(
        bad.to_string()
            .contains("longer than the limit of 32 bytes"),
        "{bad}"
    );
    // The error holds the start of the line, not the line.
    let text = bad.text().unwrap();
    assert!(
        text.starts_with("\"xxx") && text.len() <= 200,
        "{}",
        text.len()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn crlf_endings_blank_lines_and_a_last_line_without_newline() {
    let dir = temp_dir("jsonl-crlf");
    let input = dir.join("ids.jsonl");
    std::fs::write(&input, b"1\r\n\r\nnot json\r\n  \n4\r\n\"\xff\"").unwrap();
    let read: Vec<_> = read_jsonl::<u64>(&input).collect().await;
    assert_eq!(outcomes(&read), [Ok(1), Err(3), Ok(4), Err(6)]);
    assert_eq!(read[1].as_ref().unwrap_err().text(), Some("not json"));
    assert!(read[3]
        .as_ref()
        .unwrap_err()
        .to_string()
        .contains("line 6: not UTF-8"));

    std::fs::write(&input, "1\n2").unwrap();
    let read: Vec<_> = read_jsonl::<u64>(&input).collect().await;
    assert_eq!(outcomes(&read), [Ok(1), Ok(2)]);
    std::fs::remove_dir_all(&dir).unwrap();
}

const CRASH_ITEMS: u64 = 200;

/// A transport that answers items below 60 at once (404 for multiples of 7)
/// and never answers the rest, announcing on stdout when it starts hanging.
struct HangsHalfway;

impl Transport for HangsHalfway {
    fn send(
        &self,
        request: Request<Bytes>,
    ) -> BoxFuture<'static, Result<Response<Bytes>, TransportError>> {
        let id: u64 = request
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        Box::pin(async move {
            if id >= 60 {
                println!("READY");
                std::future::pending::<()>().await;
            }
            let mut response = Response::new(Bytes::from(format!("{{\"id\":{id}}}")));
            if id.is_multiple_of(7) {
                *response.status_mut() = http::StatusCode::NOT_FOUND;
            }
            Ok(response)
        })
    }
}

async fn journaled_run(output: &Path, transport: impl Transport) -> sluicegate::etl::Report {
    let client = Client::builder()
        .transport(transport)
        .base_url("http://mock")
        .build()
        .unwrap();
    let journal = Journal::open(output, |id: &u64| id.to_string()).unwrap();
    let results = journal
        .skip_done(stream::iter(0..CRASH_ITEMS))
        .fetch_concurrent(4, client.get(|id: &u64| format!("/items/{id}")))
        .json::<serde_json::Value>();
    journal.write_jsonl(results).await.unwrap()
}

/// Not a test on its own: the child process of
/// `a_killed_run_resumes_and_writes_every_item_exactly_once`, which runs
/// this binary again with `SLUICEGATE_CRASH_CHILD` set.
#[tokio::test]
async fn crash_child_process() {
    let Ok(output) = std::env::var("SLUICEGATE_CRASH_CHILD") else {
        return;
    };
    journaled_run(Path::new(&output), HangsHalfway).await;
    unreachable!("the transport hangs; the parent kills this process");
}

#[tokio::test]
async fn a_killed_run_resumes_and_writes_every_item_exactly_once() {
    let dir = temp_dir("crash");
    let output = dir.join("items.jsonl");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SLUICEGATE_CRASH_CHILD", &output)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    for line in stdout.lines() {
        if line.unwrap() == "READY" {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL: no destructor, no flush runs
    child.wait().unwrap();
    let committed_before = Journal::<u64>::open(&output, |id| id.to_string())
        .unwrap()
        .done_count();
    assert!(
        committed_before > 0,
        "the child committed some items before it was killed"
    );

    // A crash can also tear a record; simulate one written but never committed.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&output)
        .unwrap()
        .write_all(b"{\"id\":999}\n{\"id\":99")
        .unwrap();

    let mock = MockTransport::new();
    mock.mount(Route::get("/items/{id}").respond_with(|r| {
        let id: u64 = r.param("id").unwrap().parse().unwrap();
        if id.is_multiple_of(7) {
            MockResponse::status(404)
        } else {
            MockResponse::json(&serde_json::json!({ "id": id }))
        }
    }));
    let report = journaled_run(&output, mock.clone()).await;
    assert_eq!(report.skipped as usize, committed_before);
    assert_eq!(mock.call_count() as u64, CRASH_ITEMS - report.skipped);

    let mut seen: HashMap<u64, usize> = HashMap::new();
    for record in lines(&output) {
        *seen.entry(record["id"].as_u64().unwrap()).or_default() += 1;
    }
    for record in lines(&dir.join("items.failed.jsonl")) {
        assert_eq!(record["status"], 404);
        *seen.entry(record["item"].as_u64().unwrap()).or_default() += 1;
    }
    assert_eq!(
        seen.len() as u64,
        CRASH_ITEMS,
        "every item is accounted for"
    );
    assert!(seen.values().all(|n| *n == 1), "and only once");
    let failed: Vec<u64> = lines(&dir.join("items.failed.jsonl"))
        .iter()
        .map(|r| r["item"].as_u64().unwrap())
        .collect();
    assert!(failed.iter().all(|id| id.is_multiple_of(7)));
    assert_eq!(failed.len() as u64, CRASH_ITEMS.div_ceil(7));

    // A third run has nothing left to do.
    let again = journaled_run(&output, mock.clone()).await;
    assert_eq!((again.ok, again.failed, again.skipped), (0, 0, CRASH_ITEMS));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_journal_refuses_output_changed_behind_its_back() {
    let dir = temp_dir("tamper");
    let output = dir.join("x.jsonl");
    std::fs::write(
        dir.join("x.jsonl.journal"),
        "{\"key\":\"1\",\"file\":\"ok\",\"end\":100}\n",
    )
    .unwrap();
    std::fs::write(&output, "short\n").unwrap();
    let err = Journal::<u64>::open(&output, |id| id.to_string()).unwrap_err();
    assert!(
        err.to_string().contains("changed outside the journal"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_journal_writes_an_item_once_even_when_it_comes_twice() {
    let dir = temp_dir("twice");
    let output = dir.join("items.jsonl");
    let mock = MockTransport::new();
    mock.mount(Route::get("/items/{id}").respond_with(|r| {
        MockResponse::json(
            &serde_json::json!({ "id": r.param("id").unwrap().parse::<u64>().unwrap() }),
        )
    }));
    let journal = Journal::open(&output, |id: &u64| id.to_string()).unwrap();
    // No skip_done here, and every id twice: the journal still writes each once.
    let report = journal
        .write_jsonl(
            stream::iter([1u64, 2, 1, 3, 2])
                .fetch_concurrent(1, client(&mock).get(|id: &u64| format!("/items/{id}")))
                .json::<serde_json::Value>(),
        )
        .await
        .unwrap();
    assert_eq!((report.ok, report.skipped), (3, 2));
    let ids: Vec<u64> = lines(&output)
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 2, 3]);
    assert_eq!(journal.done_count(), 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Rows padded so that a run spans many of the sinks' 64 KiB batches.
#[derive(serde::Deserialize, serde::Serialize, Debug, PartialEq)]
struct Padded {
    id: u64,
    pad: String,
}

#[tokio::test(start_paused = true)]
async fn large_runs_are_read_and_written_whole_and_in_order() {
    let dir = temp_dir("large");
    let input = dir.join("in.jsonl");
    let rows = 20_000u64;
    let pad = "x".repeat(60);
    let mut text = String::new();
    for id in 0..rows {
        if id % 1_000 == 999 {
            text.push_str("not json\n");
        } else {
            text.push_str(
                &serde_json::to_string(&Padded {
                    id,
                    pad: pad.clone(),
                })
                .unwrap(),
            );
            text.push('\n');
        }
    }
    assert!(text.len() > 20 * 64 * 1024, "many read and write batches");
    std::fs::write(&input, &text).unwrap();

    // A stream that is neither `Send` nor `'static` (it borrows an `Rc`):
    // the sink needs neither.
    let local = std::rc::Rc::new(pad.clone());
    let output = dir.join("out.jsonl");
    let report = read_jsonl::<Padded>(&input)
        .map(|row| row.inspect(|row| assert_eq!(row.pad, *local)))
        .write_jsonl(&output)
        .await
        .unwrap();
    assert_eq!((report.ok, report.failed), (rows - 20, 20));
    let ids: Vec<u64> = lines(&output)
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    let expected: Vec<u64> = (0..rows).filter(|id| id % 1_000 != 999).collect();
    assert_eq!(ids, expected);
    let dead: Vec<u64> = lines(&dir.join("out.failed.jsonl"))
        .iter()
        .map(|r| r["line"].as_u64().unwrap())
        .collect();
    assert_eq!(dead, (1..=20).map(|k| k * 1_000).collect::<Vec<_>>());

    // And a `Send + 'static` stream gives a future a task can run.
    let sink = read_jsonl::<Padded>(input).write_jsonl(dir.join("again.jsonl"));
    let spawned = tokio::spawn(std::future::IntoFuture::into_future(sink));
    let again = spawned.await.unwrap().unwrap();
    assert_eq!((again.ok, again.failed), (rows - 20, 20));
    assert_eq!(
        std::fs::read(dir.join("again.jsonl")).unwrap(),
        std::fs::read(&output).unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A result that knows its item, for a journal without any fetching.
#[derive(serde::Serialize)]
struct Done {
    id: u64,
}

impl sluicegate::etl::HasItem for Done {
    type Item = u64;
    fn item(&self) -> &u64 {
        &self.id
    }
}

/// A failure that knows its item.
struct Broken(u64);

impl sluicegate::etl::HasItem for Broken {
    type Item = u64;
    fn item(&self) -> &u64 {
        &self.0
    }
}

impl sluicegate::etl::DeadLetter for Broken {
    fn dead_letter(&self) -> serde_json::Value {
        serde_json::json!({ "item": self.0 })
    }
}

#[tokio::test(start_paused = true)]
async fn a_journal_commits_each_result_before_it_asks_for_the_next() {
    let dir = temp_dir("commit-each");
    let output = dir.join("items.jsonl");
    let journal_path = dir.join("items.jsonl.journal");
    let journal = Journal::open(&output, |id: &u64| id.to_string()).unwrap();
    let on_disk = || lines(&journal_path).len() as u64;
    let results = stream::iter(0..50u64).map(|id| {
        // Asked for result `id`: every one before it is committed, in the
        // journal's keys and in the file a killed process leaves behind.
        assert_eq!((journal.done_count() as u64, on_disk()), (id, id));
        if id % 5 == 0 {
            Err(Broken(id))
        } else {
            Ok(Done { id })
        }
    });
    let report = journal.write_jsonl(results).await.unwrap();
    assert_eq!((report.ok, report.failed, report.skipped), (40, 10, 0));
    assert_eq!(on_disk(), 50);

    // Neither skip_done nor try_skip_done needs a `'static` stream.
    let ids: Vec<u64> = (0..60).collect();
    let again = Journal::open(&output, |id: &u64| id.to_string()).unwrap();
    let todo: Vec<u64> = again
        .skip_done(stream::iter(ids.iter().copied()))
        .collect()
        .await;
    assert_eq!(todo, (50..60).collect::<Vec<_>>());
    let todo: Vec<Result<u64, sluicegate::Failure>> = again
        .try_skip_done(stream::iter(
            ids.iter().map(|id| Ok::<_, sluicegate::Failure>(*id)),
        ))
        .collect()
        .await;
    assert_eq!(todo.len(), 10);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Real time, on a multi-thread runtime: a drop, and writes on the blocking
/// pool that finish when they finish. The bounds are generous.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_sink_still_writes_the_lines_it_took() {
    let dir = temp_dir("dropped-sink");
    let output = dir.join("items.jsonl");
    let taken = stream::iter(0..10u64).map(|id| Ok::<_, Broken>(Done { id }));
    // Boxed, so that `drop` drops the future itself.
    let mut sink = Box::pin(std::future::IntoFuture::into_future(
        taken.chain(stream::pending()).write_jsonl(&output),
    ));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    // Poll until the sink has taken all ten (far below a batch, so none
    // is written yet), then drop it.
    while !format!("{sink:?}").contains("ok: 10") {
        assert!(futures::poll!(sink.as_mut()).is_pending());
        assert!(
            std::time::Instant::now() < deadline,
            "the files never opened"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    assert_eq!(std::fs::read(&output).unwrap(), b"");
    drop(sink);
    while lines(&output).len() < 10 {
        assert!(std::time::Instant::now() < deadline, "the lines were lost");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let ids: Vec<u64> = lines(&output)
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, (0..10).collect::<Vec<_>>());
    std::fs::remove_dir_all(&dir).unwrap();
}
