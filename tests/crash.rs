//! Nothing acknowledged is lost, nothing is applied twice: 20,000 submissions while the
//! projector process is killed with SIGKILL and restarted twice.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::{
    Broker, Db, Stack, ce_headers, eventually, exits_within, start_projector, start_projector_with,
    start_server,
};
use serde_json::{Value, json};

const TASKS: usize = 20_000;
const BATCH: usize = 1_000;

async fn projected(db: &Db) -> i64 {
    db.count("SELECT coalesce(sum(next_offset), 0)::bigint FROM projection_offsets")
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn projector_killed_twice_under_load_applies_every_event_exactly_once() {
    let broker = Broker::start();
    let db = Db::create().await;
    let (_server, url) = start_server(&broker, &db, &[]).await;
    let mut projector = start_projector(&broker, &db);

    // Submit in the background; keep every acknowledged id.
    let submitter = tokio::spawn(async move {
        let http = reqwest::Client::new();
        let mut acknowledged = Vec::with_capacity(TASKS);
        for b in 0..TASKS / BATCH {
            let tasks: Vec<Value> = (0..BATCH)
                .map(|i| json!({"name": format!("crash-{b}-{i}"), "shell": "true", "labels": {"batch": b.to_string()}}))
                .collect();
            let r = http
                .post(format!("{url}/v1/tasks/batch"))
                .json(&json!({"tasks": tasks}))
                .send()
                .await
                .expect("POST batch");
            assert_eq!(r.status(), 202);
            let body: Value = r.json().await.expect("json");
            assert_eq!(body["failed"], 0, "{body}");
            for item in body["results"].as_array().expect("results") {
                acknowledged.push(item["id"].as_str().expect("id").to_string());
            }
        }
        acknowledged
    });

    // Kill the projector twice while it is applying, restart it each time.
    let mut kills = Vec::new();
    for threshold in [3_000i64, 11_000] {
        let db_ref = &db;
        eventually(
            &format!("{threshold} records projected"),
            Duration::from_secs(180),
            || async move { (projected(db_ref).await >= threshold).then_some(()) },
        )
        .await;
        // Land the kill at an arbitrary moment inside the projector's work, not just
        // after a commit we observed.
        let jitter = uuid::Uuid::new_v4().as_u128() % 40;
        tokio::time::sleep(Duration::from_millis(jitter as u64)).await;
        let at = projected(db_ref).await;
        projector.kill();
        kills.push(at);
        projector = start_projector(&broker, db_ref);
    }

    let acknowledged = submitter.await.expect("submitter");
    assert_eq!(acknowledged.len(), TASKS);
    let started = Instant::now();
    let db_ref = &db;
    eventually(
        "the whole topic projected",
        Duration::from_secs(300),
        || async move { (projected(db_ref).await >= TASKS as i64).then_some(()) },
    )
    .await;
    eprintln!(
        "killed at {kills:?} projected records; caught up {:?} after the last submission",
        started.elapsed()
    );
    assert!(projector.running(), "the last projector is still running");

    // Compare the rows against the topic, record by record.
    let records = broker.read_all(&broker.events_topic());
    assert_eq!(records.len(), TASKS, "records on the topic");
    let client = db.client().await;
    assert_eq!(db.count("SELECT count(*) FROM tasks").await, TASKS as i64);
    assert_eq!(
        db.count("SELECT count(*) FROM task_events").await,
        TASKS as i64
    );
    assert_eq!(
        db.count("SELECT count(*) FROM rejected_events").await,
        0,
        "no event was seen twice"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM tasks WHERE seq <> 1 OR state <> 'queued'")
            .await,
        0
    );
    assert_eq!(
        db.count("SELECT coalesce(sum(count), 0)::bigint FROM task_state_counts")
            .await,
        TASKS as i64
    );

    let rows = client
        .query(
            "SELECT ce_id, partition, \"offset\", task_id::text FROM task_events",
            &[],
        )
        .await
        .unwrap();
    let applied: HashMap<(i32, i64), (String, String)> = rows
        .iter()
        .map(|r| ((r.get(1), r.get(2)), (r.get(0), r.get(3))))
        .collect();
    assert_eq!(applied.len(), TASKS);
    for record in &records {
        let (ce_id, task_id) = applied
            .get(&(record.partition, record.offset))
            .unwrap_or_else(|| {
                panic!(
                    "record {}:{} was never applied",
                    record.partition, record.offset
                )
            });
        assert_eq!(Some(ce_id.as_str()), record.header("ce_id"));
        assert_eq!(Some(task_id.as_str()), record.key.as_deref());
    }
    let projected_ids: HashSet<String> = client
        .query("SELECT id::text FROM tasks", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let acknowledged: HashSet<String> = acknowledged.into_iter().collect();
    assert_eq!(acknowledged.len(), TASKS, "acknowledged ids are distinct");
    assert_eq!(
        projected_ids, acknowledged,
        "every acknowledged task, and nothing else"
    );
    // And an auditor folding the log alone finds the projection to be exactly that.
    let (status, report) = common::replay_verify(&broker, &db);
    assert_eq!(
        (status, &report["differences"]),
        (0, &json!([])),
        "{report}"
    );
    assert_eq!(report["records"], TASKS as i64, "{report}");
}

/// The worst moments, made deterministic: the projector dies after writing a batch (and
/// sending its dead letters) but before committing, then after committing but before
/// telling Kafka. Each restart must apply every record exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn abort_before_and_after_commit_loses_and_repeats_nothing() {
    let mut s = Stack::start().await;
    // The stack's own projector has done nothing yet; replace it with a booby-trapped one.
    s.projector.kill();
    for (round, point) in ["before_commit:1", "after_commit:1"].iter().enumerate() {
        // A mix of good tasks and one bad record per round.
        let tasks: Vec<Value> = (0..500)
            .map(|i| json!({"name": format!("r{round}-{i}"), "shell": "true"}))
            .collect();
        let (status, body) = s.post("/v1/tasks/batch", &json!({"tasks": tasks})).await;
        assert_eq!((status, body["failed"].as_i64()), (202, Some(0)));
        let id = uuid::Uuid::new_v4().to_string();
        let h = ce_headers(
            "dev.tasklog.task.submitted.v1",
            &id,
            &format!("bad-{round}"),
        );
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        s.broker
            .produce(&s.broker.events_topic(), Some(&id), &h, b"not json")
            .await;

        let mut trapped = start_projector_with(&s.broker, &s.db, &[("TASKLOG_FAILPOINT", point)]);
        assert!(
            exits_within(&mut trapped, Duration::from_secs(60)).await,
            "failpoint {point} was not reached"
        );
        s.projector = start_projector(&s.broker, &s.db);
        let want = 501 * (round as i64 + 1);
        s.wait_projected(want).await;
        s.projector.kill();
    }
    assert_eq!(s.db.count("SELECT count(*) FROM tasks").await, 1000);
    assert_eq!(s.db.count("SELECT count(*) FROM task_events").await, 1000);
    assert_eq!(s.db.count("SELECT count(*) FROM rejected_events").await, 2);
    // Dead letters are at-least-once: the one sent before the aborted commit may repeat,
    // and carries its source offset so a reader can tell.
    let dlq = s.broker.read_all(&s.broker.dlq_topic());
    let sources: HashSet<(String, String)> = dlq
        .iter()
        .map(|r| {
            (
                r.header("tasklog_dlq_partition").unwrap().to_string(),
                r.header("tasklog_dlq_offset").unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(sources.len(), 2, "two distinct dead letters");
    assert!(dlq.len() >= 2);
    let (status, report) = common::replay_verify(&s.broker, &s.db);
    assert_eq!(
        (status, &report["differences"]),
        (0, &json!([])),
        "{report}"
    );
}
