//! The projection's guarantees about the log it is built from: it refuses a log that is
//! not the one it applied, and it rebuilds identically from offset 0.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{Broker, Stack, eventually, exits_within, role, start_projector};
use serde_json::json;

/// Starts a projector that must refuse to run: it exits non-zero, saying `needle`.
async fn expect_projector_refuses(broker: &Broker, db: &common::Db, needle: &str) {
    let child = role(broker, db, &["projector"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn projector");
    let mut p = common::Proc::wrap(child, "projector");
    assert!(
        exits_within(&mut p, Duration::from_secs(60)).await,
        "the projector must refuse, not run"
    );
    let (code, stderr) = p.finish();
    assert_ne!(code, Some(0));
    assert!(stderr.contains(needle), "{stderr}");
}

async fn snapshot(s: &Stack) -> Vec<String> {
    let client = s.db.client().await;
    let mut rows: Vec<String> = client
        .query("SELECT id::text || ' ' || state || ' ' || seq || ' ' || doc::text FROM tasks ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    rows.extend(
        client
            .query("SELECT ce_id || ' ' || task_id || ' ' || seq || ' ' || partition || ':' || \"offset\" || ' ' || data::text FROM task_events ORDER BY ce_id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0)),
    );
    rows.extend(
        client
            .query("SELECT partition || ':' || \"offset\" || ' ' || reason FROM rejected_events ORDER BY 1", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0)),
    );
    rows.extend(
        client
            .query(
                "SELECT state || '=' || count FROM task_state_counts WHERE count <> 0 ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0)),
    );
    rows
}

#[tokio::test(flavor = "multi_thread")]
async fn rebuild_from_offset_zero_gives_the_same_projection() {
    let mut s = Stack::start().await;
    let tasks: Vec<_> = (0..300)
        .map(|i| json!({"name": format!("r{i}"), "shell": "true", "labels": {"i": i.to_string()}}))
        .collect();
    let (_, body) = s.post("/v1/tasks/batch", &json!({"tasks": tasks})).await;
    let first = body["results"][0]["id"].as_str().unwrap().to_string();
    s.task(&first).await;
    let (status, _) = s
        .post(&format!("/v1/tasks/{first}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202);
    s.broker
        .produce(
            &s.broker.events_topic(),
            Some(&first),
            &[("ce_specversion", "1.0")],
            b"junk",
        )
        .await;
    s.wait_projected(303).await;
    let before = snapshot(&s).await;
    assert!(before.len() > 600);

    s.projector.kill();
    let client = s.db.client().await;
    let t0: chrono::DateTime<chrono::Utc> =
        client.query_one("SELECT now()", &[]).await.unwrap().get(0);
    let mut rebuild = role(
        &s.broker,
        &s.db,
        &["projector", "--rebuild", "--session-timeout-ms", "6000"],
    )
    .spawn()
    .expect("spawn projector --rebuild");
    // Offsets written by the rebuild only (the old ones already add up to 303).
    eventually(
        "the rebuild to reach 303 records",
        Duration::from_secs(120),
        || {
            let client = &client;
            async move {
                let done: i64 = client
                    .query_one(
                        "SELECT coalesce(sum(next_offset), 0)::bigint FROM projection_offsets
                     WHERE updated_at > $1",
                        &[&t0],
                    )
                    .await
                    .unwrap()
                    .get(0);
                (done >= 303).then_some(())
            }
        },
    )
    .await;
    let after = snapshot(&s).await;
    let _ = rebuild.kill();
    let _ = rebuild.wait();
    assert_eq!(before, after);
    s.projector = start_projector(&s.broker, &s.db);
}

#[tokio::test(flavor = "multi_thread")]
async fn projector_refuses_a_log_that_is_not_the_one_it_applied() {
    let mut s = Stack::start().await;
    let tasks: Vec<_> = (0..50).map(|_| json!({"shell": "true"})).collect();
    s.post("/v1/tasks/batch", &json!({"tasks": tasks})).await;
    s.wait_projected(50).await;
    s.projector.kill();

    // A fresh, empty broker with the same topics (as after restarting the in-memory
    // mock, `tasklog dev-broker`, or pointing at another cluster).
    let empty = Broker::mock(12, s.broker.prefix.clone());
    expect_projector_refuses(&empty, &s.db, "different or truncated log").await;
    // Nothing was touched.
    assert_eq!(s.db.count("SELECT count(*) FROM tasks").await, 50);
}

/// Retention, an operator's DeleteRecords, or the in-memory mock's 5 MiB limit can delete
/// records the projection has not applied. A projector whose unapplied events were
/// deleted must stop and say so, never skip them.
#[tokio::test(flavor = "multi_thread")]
async fn projector_refuses_to_skip_events_deleted_from_the_log() {
    let mut s = Stack::start().await;
    let (_, body) = s.post("/v1/tasks", &json!({"shell": "true"})).await;
    let partition = body["event"]["partition"].as_i64().unwrap() as i32;
    s.wait_projected(1).await;
    s.projector.kill();
    // An event the projector has not applied on the same partition, then deleted.
    let key = (0..)
        .map(|i| format!("lost-{i}"))
        .find(|k| {
            tasklog::kafka::partition_for_key(
                tasklog::events::idempotency::task_id_for_key(k)
                    .to_string()
                    .as_bytes(),
                12,
            ) == partition
        })
        .unwrap();
    let (status, lost) = s
        .post(
            "/v1/tasks",
            &json!({"shell": "true", "idempotency_key": key}),
        )
        .await;
    assert_eq!(status, 202, "{lost}");
    assert_eq!(lost["event"]["partition"].as_i64(), Some(partition as i64));
    s.broker
        .delete_all_records(&s.broker.events_topic(), partition);
    let (low, high) = s.broker.watermarks(&s.broker.events_topic(), partition);
    assert_eq!(low, high, "the partition's records are deleted");
    assert!(low >= 2);

    expect_projector_refuses(&s.broker, &s.db, "gone from the log").await;
}
