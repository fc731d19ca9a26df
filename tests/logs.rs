//! Task logs on Kafka: every line exactly once, in order, whatever the page size,
//! direction or interleaving; follow and SSE resume; tail and from-line; cursor errors;
//! quota, continuation and non-UTF-8 lines.

mod common;

use std::time::Duration;

use base64::Engine;
use chrono::Utc;
use common::{Stack, eventually};
use serde_json::{Value, json};
use tasklog::kafka::{Appender, AppenderOptions, partition_for_key};
use tasklog::logs::reader::{LineFilter, LogReader, ScanRange};
use tasklog::logs::{LogWriter, LogWriterOptions, Stream};
use uuid::Uuid;

fn logs_topic(s: &Stack) -> String {
    format!("{}.logs", s.broker.prefix)
}

fn writer(s: &Stack) -> LogWriter {
    let appender = Appender::new(&AppenderOptions::new(&s.broker.addr)).expect("appender");
    LogWriter::new(appender, LogWriterOptions::new(&logs_topic(s)))
}

async fn submit(s: &Stack, spec: Value) -> Uuid {
    let (status, body) = s.post("/v1/tasks", &spec).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    s.task(&id).await;
    Uuid::parse_str(&id).unwrap()
}

/// Writes lines "1".."n" (or `text(i)`) for an attempt, all with the same timestamp.
async fn write_lines(w: &LogWriter, id: Uuid, n: i64, text: impl Fn(i64) -> String) {
    let same_instant = Utc::now();
    let mut pending = Vec::with_capacity(n as usize);
    for i in 1..=n {
        let (_, p) = w.write(
            id,
            1,
            Stream::Stdout,
            text(i).as_bytes(),
            Some(same_instant),
            None,
        );
        pending.push(p);
    }
    for p in pending {
        p.await.expect("line delivered");
    }
}

async fn wait_indexed(s: &Stack, id: Uuid, lines: i64) {
    let db = &s.db;
    eventually(
        &format!("{lines} lines indexed"),
        Duration::from_secs(180),
        || async move {
            let n: i64 = db
                .client()
                .await
                .query_one(
                    "SELECT coalesce(sum(lines), 0)::bigint FROM log_index WHERE task_id = $1",
                    &[&id],
                )
                .await
                .ok()?
                .get(0);
            (n >= lines).then_some(())
        },
    )
    .await;
}

async fn page(s: &Stack, id: Uuid, query: &str) -> Value {
    let (status, body) = s.get(&format!("/v1/tasks/{id}/logs?{query}")).await;
    assert_eq!(status, 200, "{query}: {body}");
    body
}

fn texts(page: &Value) -> Vec<String> {
    page["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["text"].as_str().unwrap().to_string())
        .collect()
}

/// Reads a whole log through HTTP cursors; returns the texts in log order.
async fn read_http(s: &Stack, id: Uuid, limit: usize, direction: &str, extra: &str) -> Vec<String> {
    let mut out: Vec<Vec<String>> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("limit={limit}&direction={direction}&cursor={c}{extra}"),
            None => format!("limit={limit}&direction={direction}{extra}"),
        };
        let p = page(s, id, &q).await;
        let t = texts(&p);
        assert!(t.len() <= limit);
        let empty = t.is_empty();
        out.push(t);
        match p["next_cursor"].as_str() {
            Some(c) if !empty => cursor = Some(c.to_string()),
            _ => break,
        }
    }
    if direction == "backward" {
        out.reverse();
    }
    out.concat()
}

/// Asserts equality, reporting where two long line lists first differ.
fn assert_lines(got: &[String], want: &[String], what: &str) {
    if let Some(i) = (0..got.len().min(want.len())).find(|i| got[*i] != want[*i]) {
        panic!(
            "{what}: first difference at index {i}: got {:?}, want {:?} ({} vs {} lines)",
            &got[i..(i + 5).min(got.len())],
            &want[i..(i + 5).min(want.len())],
            got.len(),
            want.len()
        );
    }
    assert_eq!(got.len(), want.len(), "{what}: line count");
}

fn numbers(n: i64) -> Vec<String> {
    (1..=n).map(|i| i.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_200k_lines_with_one_timestamp_reads_back_exactly_once_in_order() {
    const N: i64 = 200_000;
    let s = Stack::start().await;
    let id = submit(&s, json!({"shell": "seq 1 200000"})).await;
    write_lines(&writer(&s), id, N, |i| i.to_string()).await;
    wait_indexed(&s, id, N).await;
    let want = numbers(N);

    // Through the API, with opaque cursors.
    for limit in [1000, 5000] {
        for direction in ["forward", "backward"] {
            let got = read_http(&s, id, limit, direction, "").await;
            assert_lines(&got, &want, &format!("HTTP pages of {limit} {direction}"));
        }
    }

    // Pages of 1 and 7: the same reader functions the API pages with, called directly
    // (400,000 HTTP round trips per page size would test HTTP, not paging).
    let index =
        s.db.client()
            .await
            .query_one(
                "SELECT partition, first_offset FROM log_index WHERE task_id = $1",
                &[&id],
            )
            .await
            .unwrap();
    let partition: i32 = index.get(0);
    let reader = std::sync::Arc::new(LogReader::new(&s.broker.addr, &logs_topic(&s), 64 << 20));
    let (low, high) = reader.watermarks(partition).await.unwrap();
    let range = ScanRange {
        low: index.get(1),
        high,
        skip: None,
    };
    let filter = LineFilter {
        task_id: id,
        ..LineFilter::default()
    };
    for limit in [1usize, 7] {
        let mut got = Vec::with_capacity(N as usize);
        let mut pos = range.low;
        loop {
            let (lines, next) = reader
                .forward(partition, pos, range, &filter, limit, low)
                .await
                .unwrap();
            if lines.is_empty() {
                break;
            }
            assert!(lines.len() <= limit);
            got.extend(
                lines
                    .iter()
                    .map(|l| String::from_utf8(l.value.clone()).unwrap()),
            );
            pos = next;
        }
        assert!(got == want, "forward pages of {limit}");
        let mut pages: Vec<Vec<String>> = Vec::new();
        let mut before = range.high;
        loop {
            let (lines, next) = reader
                .backward(partition, before, range, &filter, limit, low)
                .await
                .unwrap();
            if lines.is_empty() {
                break;
            }
            assert!(lines.len() <= limit);
            pages.push(
                lines
                    .iter()
                    .map(|l| String::from_utf8(l.value.clone()).unwrap())
                    .collect(),
            );
            before = next;
        }
        pages.reverse();
        assert!(pages.concat() == want, "backward pages of {limit}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn eight_tasks_interleaved_in_one_partition_each_read_only_their_own_lines() {
    let s = Stack::start().await;
    // Idempotency keys whose task ids share a logs partition.
    let target = 0;
    let keys: Vec<String> = (0..)
        .map(|i| format!("interleave-{i}-{}", Uuid::new_v4()))
        .filter(|k| {
            partition_for_key(
                tasklog::events::idempotency::task_id_for_key(k)
                    .to_string()
                    .as_bytes(),
                12,
            ) == target
        })
        .take(8)
        .collect();
    let mut ids = Vec::new();
    for k in &keys {
        ids.push(submit(&s, json!({"shell": "true", "idempotency_key": k})).await);
    }
    let w = writer(&s);
    let mut pending = Vec::new();
    for line in 1..=500 {
        for (t, id) in ids.iter().enumerate() {
            let (_, p) = w.write(
                *id,
                1,
                Stream::Stdout,
                format!("task{t}-line{line}").as_bytes(),
                None,
                None,
            );
            pending.push(p);
        }
    }
    for p in pending {
        p.await.unwrap();
    }
    for id in &ids {
        wait_indexed(&s, *id, 500).await;
    }
    let partitions: Vec<i32> =
        s.db.client()
            .await
            .query("SELECT DISTINCT partition FROM log_index", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
    assert_eq!(partitions, vec![target], "all eight share one partition");
    for (t, id) in ids.iter().enumerate() {
        let want: Vec<String> = (1..=500).map(|l| format!("task{t}-line{l}")).collect();
        for (limit, direction) in [(7, "forward"), (1000, "forward"), (7, "backward")] {
            assert_eq!(
                read_http(&s, *id, limit, direction, "").await,
                want,
                "task {t} pages of {limit} {direction}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn follow_receives_lines_written_after_it_started_and_ends_when_the_task_does() {
    let s = Stack::start().await;
    let id = submit(&s, json!({"shell": "true"})).await;
    let url = s.url.clone();
    let http = s.http.clone();
    let follower = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut req = http
                .get(format!("{url}/v1/tasks/{id}/logs"))
                .query(&[("follow", "true"), ("wait_ms", "5000")]);
            if let Some(c) = &cursor {
                req = req.query(&[("cursor", c)]);
            }
            let p: Value = req.send().await.unwrap().json().await.unwrap();
            got.extend(texts(&p));
            cursor = p["next_cursor"].as_str().map(str::to_string);
            if p["complete"] == Value::Bool(true) {
                return got;
            }
        }
    });
    let w = writer(&s);
    for burst in 0..3 {
        write_lines(&w, id, 1000, |i| (burst * 1000 + i).to_string()).await;
    }
    let (status, _) = s.post(&format!("/v1/tasks/{id}/cancel"), &json!({})).await;
    assert_eq!(status, 202);
    let got = tokio::time::timeout(Duration::from_secs(120), follower)
        .await
        .expect("follower finished")
        .unwrap();
    assert_eq!(got, numbers(3000));
}

/// The task's log as Server-Sent Events, until `stop` says so.
async fn sse(
    s: &Stack,
    id: Uuid,
    last_event_id: Option<&str>,
    stop: impl Fn(&[(String, String, String)]) -> bool,
) -> Vec<(String, String, String)> {
    common::sse_events(
        &s.http,
        &format!("{}/v1/tasks/{id}/logs", s.url),
        last_event_id,
        stop,
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn server_sent_events_resume_exactly_from_last_event_id() {
    let s = Stack::start().await;
    let id = submit(&s, json!({"shell": "true"})).await;
    write_lines(&writer(&s), id, 2000, |i| i.to_string()).await;
    s.post(&format!("/v1/tasks/{id}/cancel"), &json!({})).await;
    let first = sse(&s, id, None, |e| e.len() >= 700).await;
    let last_id = first.last().unwrap().0.clone();
    let rest = sse(&s, id, Some(&last_id), |e| {
        e.last().is_some_and(|(_, ev, _)| ev == "end")
    })
    .await;
    let text = |events: &[(String, String, String)]| -> Vec<String> {
        events
            .iter()
            .filter(|(_, ev, _)| ev == "line")
            .map(|(_, _, d)| {
                serde_json::from_str::<Value>(d).unwrap()["text"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    let mut all = text(&first);
    assert_eq!(all.len(), 700);
    all.extend(text(&rest));
    assert_eq!(all, numbers(2000));
    assert_eq!(rest.last().unwrap().1, "end");
}

#[tokio::test(flavor = "multi_thread")]
async fn tail_from_line_and_cursor_errors() {
    let s = Stack::start().await;
    let id = submit(&s, json!({"shell": "true"})).await;
    let other = submit(&s, json!({"shell": "true"})).await;
    let w = writer(&s);
    write_lines(&w, id, 2500, |i| i.to_string()).await;
    write_lines(&w, other, 10, |i| i.to_string()).await;
    wait_indexed(&s, id, 2500).await;

    assert_eq!(
        texts(&page(&s, id, "tail=10").await),
        (2491..=2500).map(|i| i.to_string()).collect::<Vec<_>>()
    );
    assert_eq!(texts(&page(&s, id, "tail=1").await), vec!["2500"]);
    for k in [1, 57, 1001, 2222] {
        let p = page(&s, id, &format!("from_line={k}&limit=3")).await;
        assert_eq!(
            texts(&p),
            (k..k + 3).map(|i| i.to_string()).collect::<Vec<_>>(),
            "from_line {k}"
        );
        assert_eq!(p["lines"][0]["line"], k);
    }
    // The tail's cursor follows on from the end.
    let tail = page(&s, id, "tail=5").await;
    let next = tail["next_cursor"].as_str().unwrap();
    assert_eq!(
        texts(&page(&s, id, &format!("cursor={next}")).await),
        Vec::<String>::new()
    );

    let good = page(&s, id, "limit=10").await["next_cursor"]
        .as_str()
        .unwrap()
        .to_string();
    let mut tampered = good.clone().into_bytes();
    let last = tampered.len() - 10;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    for (query, status, code) in [
        ("cursor=not-a-cursor".to_string(), 400, "invalid_cursor"),
        (format!("cursor={tampered}"), 400, "invalid_cursor"),
        ("limit=0".to_string(), 400, "invalid_query"),
        ("limit=5001".to_string(), 400, "invalid_query"),
        ("direction=sideways".to_string(), 400, "invalid_query"),
        ("stream=tty".to_string(), 400, "invalid_query"),
        ("tail=5&from_line=3".to_string(), 400, "invalid_query"),
        (
            format!("cursor={good}&direction=backward"),
            400,
            "invalid_cursor",
        ),
    ] {
        let (st, body) = s.get(&format!("/v1/tasks/{id}/logs?{query}")).await;
        assert_eq!(
            (st, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{query}: {body}"
        );
    }
    let (st, body) = s
        .get(&format!("/v1/tasks/{other}/logs?cursor={good}"))
        .await;
    assert_eq!(
        (st, body["error"]["code"].as_str()),
        (400, Some("cursor_task_mismatch")),
        "{body}"
    );
    let (st, _) = s.get(&format!("/v1/tasks/{}/logs", Uuid::new_v4())).await;
    assert_eq!(st, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn posted_lines_quota_marker_continuation_and_raw_bytes() {
    let s = Stack::start().await;
    // Quota: 1000 bytes for the attempt; 100 lines of 20 bytes.
    let id = submit(&s, json!({"shell": "true", "log_quota": 1000})).await;
    let body: String = (0..100)
        .map(|i| json!({"stream": "stdout", "text": format!("{i:020}")}).to_string() + "\n")
        .collect();
    let (status, r) = s.post_raw(&format!("/v1/tasks/{id}/logs"), &body).await;
    assert_eq!(status, 202, "{r}");
    assert_eq!(r["appended"], 50);
    assert_eq!(r["dropped"], 50);
    wait_indexed(&s, id, 51).await;
    let p = page(&s, id, "limit=100").await;
    let lines = p["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 51);
    assert_eq!(lines[50]["stream"], "system");
    assert!(lines[50]["text"].as_str().unwrap().contains("quota"));
    let metrics = s.text("/metrics").await;
    assert!(
        metrics.contains("tasklog_log_lines_dropped_total 50"),
        "{metrics}"
    );

    // Continuation: a 150,000-byte line becomes three records (64 KiB limit).
    let long = "x".repeat(149_999) + "!";
    let id = submit(&s, json!({"shell": "true"})).await;
    let (status, r) = s
        .post(
            &format!("/v1/tasks/{id}/logs"),
            &json!([{"stream": "stderr", "text": long}, {"stream": "stdout", "text": "after"}]),
        )
        .await;
    assert_eq!(status, 202, "{r}");
    wait_indexed(&s, id, 2).await;
    let p = page(&s, id, "limit=10").await;
    let lines = p["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 4);
    let parts: Vec<(i64, bool)> = lines[..3]
        .iter()
        .map(|l| {
            (
                l["part"].as_i64().unwrap(),
                l["continued"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(parts, vec![(0, true), (1, true), (2, false)]);
    assert!(
        lines[..3]
            .iter()
            .all(|l| l["line"] == 1 && l["stream"] == "stderr")
    );
    let joined: String = lines[..3]
        .iter()
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    assert_eq!(joined, long);
    assert_eq!(
        (lines[3]["line"].as_i64(), lines[3]["text"].as_str()),
        (Some(2), Some("after"))
    );

    // Bytes that are not UTF-8 come back exactly (base64 in `bytes`).
    let id = submit(&s, json!({"shell": "true"})).await;
    let raw = vec![0xff, 0xfe, b'o', b'k', 0x00, 0xc3];
    let w = writer(&s);
    let (_, p) = w.write(id, 1, Stream::Stdout, &raw, None, None);
    p.await.unwrap();
    wait_indexed(&s, id, 1).await;
    let p = page(&s, id, "").await;
    let b = base64::engine::general_purpose::STANDARD
        .decode(p["lines"][0]["bytes"].as_str().unwrap())
        .unwrap();
    assert_eq!(b, raw);

    // Bad posts.
    let (status, body) = s
        .post_raw(&format!("/v1/tasks/{id}/logs"), "{\"stream\":\"stdout\"}")
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_body"))
    );
    let (status, _) = s
        .post_raw(
            &format!("/v1/tasks/{}/logs", Uuid::new_v4()),
            "[{\"stream\":\"stdout\",\"text\":\"x\"}]",
        )
        .await;
    assert_eq!(status, 404);
}

// Lines deleted by retention, and the 410 of a cursor into them: tests/kafka.rs.
