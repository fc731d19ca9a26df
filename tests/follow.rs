//! Following logs at scale through the API server's hub (one tail per partition, shared
//! by every follower): many followers each get exactly their task's lines, live, in
//! order; a follower that disconnects and resumes with `Last-Event-ID` loses and repeats
//! nothing; a follower that stops reading is cut off and told, then resumes with nothing
//! lost; followers cost no threads of their own and leave none behind; past the cap a
//! follower gets a JSON 503.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use common::{Stack, eventually, sse_events, sse_open, sse_read, threads_of};
use serde_json::{Value, json};
use tasklog::kafka::{Appender, AppenderOptions};
use tasklog::logs::{LogWriter, LogWriterOptions, Stream};
use uuid::Uuid;

type Events = Vec<(String, String, String)>;

fn writer(s: &Stack) -> LogWriter {
    let appender = Appender::new(&AppenderOptions::new(&s.broker.addr)).expect("appender");
    LogWriter::new(
        appender,
        LogWriterOptions::new(&format!("{}.logs", s.broker.prefix)),
    )
}

/// A task that stays queued (no worker runs here) until cancelled.
async fn task(s: &Stack) -> Uuid {
    let (status, body) = s.post("/v1/tasks", &json!({"shell": "true"})).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    s.task(&id).await;
    Uuid::parse_str(&id).expect("uuid")
}

/// Writes `lines` for each task, one round of one line per task at a time (so that the
/// tasks' lines interleave on the log), every round acknowledged before the next.
async fn write_rounds(w: &LogWriter, tasks: &[Uuid], rounds: std::ops::Range<usize>) {
    for round in rounds {
        let pending: Vec<_> = tasks
            .iter()
            .map(|id| {
                w.write(
                    *id,
                    1,
                    Stream::Stdout,
                    format!("{id} {round}").as_bytes(),
                    Some(Utc::now()),
                    None,
                )
                .1
            })
            .collect();
        for p in pending {
            p.await.expect("line delivered");
        }
    }
}

fn texts(events: &[(String, String, String)]) -> Vec<String> {
    events
        .iter()
        .filter(|(_, event, _)| event == "line")
        .map(|(_, _, data)| {
            serde_json::from_str::<Value>(data).expect("JSON")["text"]
                .as_str()
                .expect("text")
                .to_string()
        })
        .collect()
}

fn expected(id: Uuid, rounds: usize) -> Vec<String> {
    (0..rounds).map(|r| format!("{id} {r}")).collect()
}

fn ends(events: &[(String, String, String)]) -> bool {
    events.last().is_some_and(|(_, event, _)| event == "end")
}

/// `tasklog_log_followers` on the server's `/metrics`.
async fn followers(s: &Stack) -> i64 {
    let text = s.text("/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix("tasklog_log_followers "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as i64)
        .expect("tasklog_log_followers on /metrics")
}

async fn wait_followers(s: &Stack, n: i64) {
    eventually(
        &format!("{n} followers on the hub"),
        Duration::from_secs(60),
        || async move { (followers(s).await == n).then_some(()) },
    )
    .await;
}

/// 8 tasks, 3 live SSE followers each, the tasks' lines interleaved on one log: each
/// follower gets exactly its task's lines in order; one follower per task disconnects
/// halfway and resumes from its last event id without losing or repeating a line.
#[tokio::test(flavor = "multi_thread")]
async fn each_follower_gets_exactly_its_tasks_lines_and_resumes_without_loss() {
    let s = Stack::start().await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        tasks.push(task(&s).await);
    }
    const ROUNDS: usize = 200;
    let url = |id: Uuid| format!("{}/v1/tasks/{id}/logs", s.url);
    let mut whole = Vec::new();
    let mut halves = Vec::new();
    for id in &tasks {
        for _ in 0..2 {
            let (http, u) = (s.http.clone(), url(*id));
            whole.push((
                *id,
                tokio::spawn(async move { sse_events(&http, &u, None, ends).await }),
            ));
        }
        let (http, u) = (s.http.clone(), url(*id));
        halves.push((
            *id,
            tokio::spawn(async move {
                let first = sse_events(&http, &u, None, |e| texts(e).len() >= ROUNDS / 2).await;
                let last = first.last().expect("an event").0.clone();
                let rest = sse_events(&http, &u, Some(&last), ends).await;
                (first, rest)
            }),
        ));
    }
    // Every follower is registered before the first line: all of them read live.
    wait_followers(&s, 24).await;
    let w = writer(&s);
    write_rounds(&w, &tasks, 0..ROUNDS).await;
    for id in &tasks {
        let (status, body) = s.post(&format!("/v1/tasks/{id}/cancel"), &json!({})).await;
        assert_eq!(status, 202, "{body}");
    }
    for (id, follower) in whole {
        let events: Events = tokio::time::timeout(Duration::from_secs(120), follower)
            .await
            .expect("the follower ended")
            .expect("follower");
        assert_eq!(texts(&events), expected(id, ROUNDS), "follower of {id}");
        assert!(ends(&events));
    }
    for (id, follower) in halves {
        let (first, rest) = tokio::time::timeout(Duration::from_secs(120), follower)
            .await
            .expect("the follower ended")
            .expect("follower");
        let mut all = texts(&first);
        assert_eq!(all.len(), ROUNDS / 2);
        all.extend(texts(&rest));
        assert_eq!(all, expected(id, ROUNDS), "resumed follower of {id}");
        assert!(ends(&rest));
    }
    wait_followers(&s, 0).await;
}

/// A follower that stops reading is not buffered without bound: the hub cuts it off once
/// its buffer is full, and when it reads again it is told (`event: lagging`, with the
/// cursor it resumes from) and gets every line exactly once, in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_follower_that_stops_reading_is_told_it_lagged_and_loses_nothing() {
    let s = Stack::start().await;
    let id = task(&s).await;
    let stalled = sse_open(&s.http, &format!("{}/v1/tasks/{id}/logs", s.url), None).await;
    wait_followers(&s, 1).await;
    // ~36 MB of events: far more than the follower's 1024-record buffer and the loopback
    // socket buffers (a few MiB each way) hold while nobody reads.
    const LINES: usize = 30_000;
    let pad = "x".repeat(1000);
    let w = writer(&s);
    let pending: Vec<_> = (0..LINES)
        .map(|i| {
            w.write(
                id,
                1,
                Stream::Stdout,
                format!("{i} {pad}").as_bytes(),
                Some(Utc::now()),
                None,
            )
            .1
        })
        .collect();
    for p in pending {
        p.await.expect("line delivered");
    }
    eventually(
        "the stalled follower cut off",
        Duration::from_secs(60),
        || async {
            let text = s.text("/metrics").await;
            text.lines()
                .find_map(|l| l.strip_prefix("tasklog_log_followers_lagged_total "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|v| *v >= 1.0)
        },
    )
    .await;
    let (status, body) = s.post(&format!("/v1/tasks/{id}/cancel"), &json!({})).await;
    assert_eq!(status, 202, "{body}");
    // Only now does the follower read.
    let events = sse_read(stalled, ends).await;
    let lagging: Vec<Value> = events
        .iter()
        .filter(|(_, event, _)| event == "lagging")
        .map(|(_, _, data)| serde_json::from_str(data).expect("JSON"))
        .collect();
    assert!(
        !lagging.is_empty(),
        "no lagging notice in {} events",
        events.len()
    );
    eprintln!("{} lagging notices over {LINES} lines", lagging.len());
    for notice in &lagging {
        assert_eq!(notice["lagging"], true, "{notice}");
        assert!(notice["resume_cursor"].is_string(), "{notice}");
    }
    let want: Vec<String> = (0..LINES).map(|i| format!("{i} {pad}")).collect();
    let got = texts(&events);
    assert_eq!(got.len(), want.len(), "lines received");
    assert!(got == want, "lines lost, repeated or out of order");
    wait_followers(&s, 0).await;
}

/// Threads of one librdkafka consumer (its main and internal threads, one per broker
/// and the bootstrap), with margin: the shared tail's.
const TAIL_THREADS: usize = 8;

/// A hundred idle followers cost the server no thread each, and once they leave the
/// server is back to the threads it had before any follower (the tail and the reader's
/// consumers close when unused).
#[tokio::test(flavor = "multi_thread")]
async fn followers_add_no_threads_and_leave_none_behind() {
    let s = Stack::start().await;
    let pid = s.server.pid();
    let mut tasks = Vec::new();
    for _ in 0..5 {
        tasks.push(task(&s).await);
    }
    let baseline = threads_of(pid);
    let open = |n: usize| {
        (0..n)
            .map(|i| {
                let (http, u) = (
                    s.http.clone(),
                    format!("{}/v1/tasks/{}/logs", s.url, tasks[i % tasks.len()]),
                );
                tokio::spawn(async move { sse_events(&http, &u, None, ends).await })
            })
            .collect::<Vec<_>>()
    };
    let streams = open(100);
    wait_followers(&s, 100).await;
    // Their first reads borrow the reader's few consumers (at most MAX_SESSIONS at once);
    // once those rest, what 100 idle followers hold is the one shared tail.
    let idle = eventually(
        "100 idle followers holding only the shared tail's threads",
        Duration::from_secs(60),
        || async move {
            let now = threads_of(pid);
            (now <= baseline + TAIL_THREADS).then_some(now)
        },
    )
    .await;
    eprintln!("threads: {baseline} before any follower, {idle} with 100 idle followers");
    // They leave (the client goes away mid-stream).
    for stream in &streams {
        stream.abort();
    }
    wait_followers(&s, 0).await;
    let after = eventually(
        "the server back to its threads before any follower",
        Duration::from_secs(60),
        || async move {
            let now = threads_of(pid);
            (now <= baseline + 1).then_some(now)
        },
    )
    .await;
    eprintln!("threads: {after} after the followers left");
}

/// Past `TASKLOG_MAX_FOLLOWERS` a follower is refused with a JSON 503, a stream and a
/// follow long-poll alike; once one leaves, the next is accepted.
#[tokio::test(flavor = "multi_thread")]
async fn past_the_cap_a_follower_gets_a_json_503() {
    let s = Stack::start().await;
    let (_capped, url) = common::start_server(
        &s.broker,
        &s.db,
        &[("TASKLOG_MAX_FOLLOWERS", "2"), ("TASKLOG_AUTH", "off")],
    )
    .await;
    let id = task(&s).await;
    let logs = format!("{url}/v1/tasks/{id}/logs");
    let http = reqwest::Client::new();
    let streams: Vec<_> = (0..2)
        .map(|_| {
            let (http, u) = (http.clone(), logs.clone());
            tokio::spawn(async move { sse_events(&http, &u, None, ends).await })
        })
        .collect();
    let metric = |url: String| {
        let http = http.clone();
        async move {
            let text = http
                .get(format!("{url}/metrics"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            text.lines()
                .find_map(|l| l.strip_prefix("tasklog_log_followers "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        }
    };
    eventually("2 followers", Duration::from_secs(60), || {
        let m = metric(url.clone());
        async move { (m.await == Some(2.0)).then_some(()) }
    })
    .await;
    let refused = http
        .get(&logs)
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("GET");
    assert_eq!(refused.status(), 503);
    let body: Value = refused.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "too_many_followers", "{body}");
    let polled = http
        .get(format!("{logs}?follow=true&wait_ms=2000"))
        .send()
        .await
        .expect("GET");
    assert_eq!(polled.status(), 503);
    let body: Value = polled.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "too_many_followers", "{body}");
    // One leaves: a new one is taken.
    streams[0].abort();
    eventually("1 follower", Duration::from_secs(60), || {
        let m = metric(url.clone());
        async move { (m.await == Some(1.0)).then_some(()) }
    })
    .await;
    let again = http
        .get(format!("{logs}?follow=true&wait_ms=200"))
        .send()
        .await
        .expect("GET");
    assert_eq!(again.status(), 200);
}

/// `tasklog logs -f --label team=vision` follows every matching task on one stream,
/// current and submitted later, each line prefixed with its task; another team's lines
/// never show.
#[tokio::test(flavor = "multi_thread")]
async fn one_stream_follows_every_task_with_a_label_current_and_new() {
    use std::io::BufRead;
    let s = Stack::start().await;
    let named =
        |name: &str, team: &str| json!({"shell": "true", "name": name, "labels": {"team": team}});
    let mut ids = HashMap::new();
    for (name, team) in [("v1", "vision"), ("v2", "vision"), ("n1", "nlp")] {
        let (status, body) = s.post("/v1/tasks", &named(name, team)).await;
        assert_eq!(status, 202, "{body}");
        let id = body["id"].as_str().expect("id").to_string();
        s.task(&id).await;
        ids.insert(name.to_string(), Uuid::parse_str(&id).expect("uuid"));
    }
    let mut cli = s
        .cli(&["logs", "-f", "--label", "team=vision"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("tasklog logs");
    let printed: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let reader = {
        let printed = printed.clone();
        let stdout = cli.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                printed.lock().expect("lines").push(line);
            }
        })
    };
    wait_followers(&s, 2).await;
    let w = writer(&s);
    let all: Vec<Uuid> = ["v1", "v2", "n1"].iter().map(|n| ids[*n]).collect();
    write_rounds(&w, &all, 0..20).await;
    // A new task with the label joins the stream.
    let (status, body) = s.post("/v1/tasks", &named("v3", "vision")).await;
    assert_eq!(status, 202, "{body}");
    let v3 = Uuid::parse_str(body["id"].as_str().expect("id")).expect("uuid");
    wait_followers(&s, 3).await;
    write_rounds(&w, &[v3], 0..20).await;
    let of = |name: &str, id: Uuid| -> Vec<String> {
        (0..20).map(|r| format!("{name} | {id} {r}")).collect()
    };
    let got = eventually("every vision line printed", Duration::from_secs(60), || {
        let printed = printed.clone();
        async move {
            let lines = printed.lock().expect("lines").clone();
            (lines.len() >= 60).then_some(lines)
        }
    })
    .await;
    for name in ["v1", "v2"] {
        let mine: Vec<String> = got
            .iter()
            .filter(|l| l.starts_with(&format!("{name} |")))
            .cloned()
            .collect();
        assert_eq!(mine, of(name, ids[name]), "{name}");
    }
    let mine: Vec<String> = got
        .iter()
        .filter(|l| l.starts_with("v3 |"))
        .cloned()
        .collect();
    assert_eq!(mine, of("v3", v3));
    assert_eq!(
        got.len(),
        60,
        "nothing but the vision tasks' lines: {got:?}"
    );
    let _ = cli.kill();
    let _ = cli.wait();
    let _ = reader.join();
}
