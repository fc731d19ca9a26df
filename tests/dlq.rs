//! Outside producers publishing straight to Kafka, and every dead-letter case.

mod common;

use common::{Stack, ce_headers};
use serde_json::json;
use uuid::Uuid;

const SUBMITTED: &str = "dev.tasklog.task.submitted.v1";

async fn publish(s: &Stack, key: &str, headers: &[(String, String)], value: &[u8]) -> (i32, i64) {
    let h: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    s.broker
        .produce(&s.broker.events_topic(), Some(key), &h, value)
        .await
}

fn submitted_data(id: &str) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"task_id": id, "seq": 1, "spec": {"shell": "true", "name": "outside"}}),
    )
    .unwrap()
}

/// Exactly what the README shows: kcat in CloudEvents binary mode.
#[tokio::test(flavor = "multi_thread")]
async fn kcat_producer_submits_a_task_and_a_malformed_one_is_dead_lettered() {
    let s = Stack::start().await;
    let id = Uuid::new_v4().to_string();
    let data = format!(
        r#"{{"task_id":"{id}","seq":1,"spec":{{"name":"from-kcat","type":"evaluate","command":["python3","eval.py"]}}}}"#
    );
    let kcat = |value: &str, ce_id: &str, ce_type: &str| {
        common::kcat_event(&s.broker, &id, ce_id, ce_type, "kcat://ci", value)
    };
    kcat(&data, &Uuid::new_v4().to_string(), SUBMITTED);
    let task = s.task(&id).await;
    assert_eq!(task["state"], "queued");
    assert_eq!(task["spec"]["name"], "from-kcat");
    assert_eq!(task["submitted_by"], "kcat://ci");

    kcat("{this is not json", "bad-1", SUBMITTED);
    s.wait_projected(2).await;
    let dlq = s.broker.read_all(&s.broker.dlq_topic());
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].header("tasklog_dlq_reason"), Some("invalid_json"));
    assert_eq!(dlq[0].header("ce_id"), Some("bad-1"));
    assert_eq!(dlq[0].value, b"{this is not json");
    assert_eq!(dlq[0].key.as_deref(), Some(id.as_str()));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_rejection_is_recorded_dead_lettered_and_the_projector_goes_on() {
    let s = Stack::start().await;
    let id = Uuid::new_v4().to_string();
    let good = Uuid::new_v4().to_string();
    publish(
        &s,
        &id,
        &ce_headers(SUBMITTED, &id, &good),
        &submitted_data(&id),
    )
    .await;
    s.task(&id).await;

    let mut expected: Vec<(&str, String)> = Vec::new();
    // Bad JSON.
    let ce = Uuid::new_v4().to_string();
    publish(&s, &id, &ce_headers(SUBMITTED, &id, &ce), b"{oops").await;
    expected.push(("invalid_json", ce));
    // Unknown type.
    let ce = Uuid::new_v4().to_string();
    publish(
        &s,
        &id,
        &ce_headers("dev.tasklog.task.teleported.v1", &id, &ce),
        &submitted_data(&id),
    )
    .await;
    expected.push(("unknown_type", ce));
    // Schema violation: cancel_requested with a numeric reason.
    let ce = Uuid::new_v4().to_string();
    let data = serde_json::to_vec(&json!({"task_id": id, "seq": 2, "reason": 42})).unwrap();
    publish(
        &s,
        &id,
        &ce_headers("dev.tasklog.task.cancel_requested.v1", &id, &ce),
        &data,
    )
    .await;
    expected.push(("schema_violation", ce));
    // Seq gap: 5 where 2 is next.
    let ce = Uuid::new_v4().to_string();
    let data = serde_json::to_vec(&json!({"task_id": id, "seq": 5})).unwrap();
    publish(
        &s,
        &id,
        &ce_headers("dev.tasklog.task.cancel_requested.v1", &id, &ce),
        &data,
    )
    .await;
    expected.push(("seq_conflict", ce));
    // Illegal transition: succeeded while queued.
    let ce = Uuid::new_v4().to_string();
    let data = serde_json::to_vec(&json!({"task_id": id, "seq": 2, "exit_code": 0})).unwrap();
    publish(
        &s,
        &id,
        &ce_headers("dev.tasklog.task.succeeded.v1", &id, &ce),
        &data,
    )
    .await;
    expected.push(("illegal_transition", ce));
    // A legal event, then the same ce_id again with the next seq: a duplicate.
    let dup = Uuid::new_v4().to_string();
    let data = serde_json::to_vec(&json!({"task_id": id, "seq": 2, "reason": "first"})).unwrap();
    publish(
        &s,
        &id,
        &ce_headers("dev.tasklog.task.cancel_requested.v1", &id, &dup),
        &data,
    )
    .await;
    let data = serde_json::to_vec(&json!({"task_id": id, "seq": 3, "reason": "again"})).unwrap();
    publish(
        &s,
        &id,
        &ce_headers("dev.tasklog.task.cancel_requested.v1", &id, &dup),
        &data,
    )
    .await;
    expected.push(("duplicate_ce_id", dup.clone()));
    // Missing CloudEvents header.
    let mut headers = ce_headers(SUBMITTED, &id, "no-spec-version");
    headers.retain(|(k, _)| k != "ce_specversion");
    publish(&s, &id, &headers, &submitted_data(&id)).await;
    expected.push(("invalid_envelope", "no-spec-version".into()));
    // Finally a good event: the projector must still be going.
    let last = Uuid::new_v4().to_string();
    let data = serde_json::to_vec(&json!({"task_id": id, "seq": 3, "reason": "done"})).unwrap();
    publish(
        &s,
        &id,
        &ce_headers("dev.tasklog.task.cancelled.v1", &id, &last),
        &data,
    )
    .await;

    s.wait_projected(10).await;
    let task = s.task(&id).await;
    assert_eq!(task["state"], "cancelled", "{task}");
    assert_eq!(task["seq"], 3);
    assert_eq!(task["reason"], "done");

    let db = s.db.client().await;
    let rows = db
        .query(
            "SELECT reason, ce_id, partition, \"offset\" FROM rejected_events ORDER BY \"offset\"",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get::<_, Option<String>>(1).unwrap_or_default()))
        .collect();
    let want: Vec<(String, String)> = expected
        .iter()
        .map(|(r, c)| (r.to_string(), c.clone()))
        .collect();
    assert_eq!(got, want);
    assert_eq!(s.db.count("SELECT count(*) FROM task_events").await, 3);

    let dlq = s.broker.read_all(&s.broker.dlq_topic());
    assert_eq!(dlq.len(), expected.len());
    for (record, (reason, ce_id)) in dlq.iter().zip(&expected) {
        assert_eq!(record.header("tasklog_dlq_reason"), Some(*reason));
        assert_eq!(
            record.header("ce_id").unwrap_or("no-spec-version"),
            ce_id.as_str()
        );
        assert_eq!(
            record.header("tasklog_dlq_topic"),
            Some(s.broker.events_topic().as_str())
        );
        let offset: i64 = record
            .header("tasklog_dlq_offset")
            .unwrap()
            .parse()
            .unwrap();
        assert!(rows.iter().any(|r| r.get::<_, i64>(3) == offset));
        assert!(
            !record
                .header("tasklog_dlq_message")
                .unwrap_or("")
                .is_empty()
        );
    }

    let (_, list) = s.get("/v1/tasks?state=cancelled").await;
    assert_eq!(list["tasks"].as_array().map(Vec::len), Some(1));
}
