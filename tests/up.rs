//! `tasklog up` on Apache Kafka keeps everything across a restart: the tasks, their
//! events and log lines are still there, and the projection resumes from its stored
//! offsets instead of being reset.

mod common;

use std::time::Duration;

use common::{Broker, Db, Proc, eventually, exits_within, free_port, role, signal};
use serde_json::{Value, json};

/// `tasklog up` on a free port; waits until it answers /readyz.
async fn start_up(broker: &Broker, db: &Db, state_dir: &std::path::Path) -> (Proc, String) {
    let port = free_port();
    let child = role(
        broker,
        db,
        &[
            "up",
            "--http-addr",
            &format!("127.0.0.1:{port}"),
            "--name",
            "up-worker",
            "--state-dir",
            state_dir.to_str().expect("UTF-8 temp dir"),
            "--heartbeat",
            "500ms",
        ],
    )
    .spawn()
    .expect("spawn tasklog up");
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let probe = format!("{url}/readyz");
    eventually("tasklog up to be ready", Duration::from_secs(60), || {
        let r = http.get(&probe).send();
        async move { r.await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
    })
    .await;
    (Proc::wrap(child, "up"), url)
}

async fn get(http: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = http.get(url).send().await.expect("GET");
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Submits `spec` and waits until the task succeeded; returns its id and final view.
async fn run_to_success(http: &reqwest::Client, url: &str, spec: Value) -> (String, Value) {
    let r = http
        .post(format!("{url}/v1/tasks"))
        .json(&spec)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.expect("JSON")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let task_url = format!("{url}/v1/tasks/{id}");
    let done = eventually(
        &format!("task {id} to succeed"),
        Duration::from_secs(60),
        || {
            let task_url = &task_url;
            async move {
                let (status, t) = get(http, task_url).await;
                (status == 200 && t["state"] == "succeeded").then_some(t)
            }
        },
    )
    .await;
    (id, done)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_up_keeps_every_task_event_and_log_line() {
    let broker = Broker::start();
    let db = Db::create().await;
    let state_dir = tempfile::tempdir().unwrap();
    let (mut up, url) = start_up(&broker, &db, state_dir.path()).await;
    let http = common::client_with_token(&common::up_token(state_dir.path()));

    let spec = json!({"name": "kept", "shell": "for i in 1 2 3; do echo line-$i; done"});
    let (id, done) = run_to_success(&http, &url, spec).await;
    let task_url = format!("{url}/v1/tasks/{id}");
    let logs_url = format!("{url}/v1/tasks/{id}/logs");
    eventually("three log lines", Duration::from_secs(30), || {
        let (http, logs_url) = (&http, &logs_url);
        async move {
            let (_, page) = get(http, logs_url).await;
            (page["lines"].as_array().map(Vec::len) == Some(3)).then_some(())
        }
    })
    .await;
    let (_, events_before) = get(&http, &format!("{task_url}/events")).await;
    let offsets = || async {
        let rows = db
            .client()
            .await
            .query(
                "SELECT topic, partition, next_offset FROM projection_offsets ORDER BY 1, 2",
                &[],
            )
            .await
            .unwrap();
        rows.iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    r.get::<_, i32>(1),
                    r.get::<_, i64>(2),
                )
            })
            .filter(|(topic, _, _)| !topic.ends_with(".workers"))
            .collect::<Vec<_>>()
    };
    let offsets_before = offsets().await;

    // Ctrl-C: it drains and exits by itself.
    signal(up.pid().into(), "-INT");
    assert!(
        exits_within(&mut up, Duration::from_secs(30)).await,
        "tasklog up did not stop within 30 s of SIGINT"
    );

    let (_up, url) = start_up(&broker, &db, state_dir.path()).await;
    // Nothing was reset: the stored offsets are where they were (heartbeats aside).
    assert_eq!(offsets().await, offsets_before);
    let task_url = format!("{url}/v1/tasks/{id}");
    let (status, task) = get(&http, &task_url).await;
    assert_eq!(status, 200, "{task}");
    assert_eq!(task, done);
    let (_, events_after) = get(&http, &format!("{task_url}/events")).await;
    assert_eq!(events_after, events_before);
    let (_, page) = get(&http, &format!("{url}/v1/tasks/{id}/logs")).await;
    let texts: Vec<&str> = page["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["line-1", "line-2", "line-3"]);

    // And it goes on: a new task runs on the restarted worker.
    run_to_success(&http, &url, json!({"shell": "true"})).await;
}
