//! `tasklog audit export` and `tasklog audit verify` against a real broker: an export
//! verifies offline and against the log and every line matches
//! `schemas/audit-export.v1.json`; each tampering with the file is reported at its line;
//! a re-sealed forgery passes the offline check but not `--against-kafka`.

mod common;

use std::path::Path;

use common::{Stack, role};
use serde_json::{Value, json};
use tasklog::events::audit::{ExportWriter, check, record_bytes};

/// `tasklog audit verify FILE --json [--against-kafka]`: exit status and findings.
fn verify(s: &Stack, file: &Path, against_kafka: bool) -> (i32, Value) {
    let path = file.to_str().expect("path");
    let mut args = vec!["audit", "verify", path, "--json"];
    if against_kafka {
        args.push("--against-kafka");
    }
    let output = common::finish(role(&s.broker, &s.db, &args).stdout(std::process::Stdio::piped()));
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}): {}", String::from_utf8_lossy(&output.stdout)));
    (output.status.code().unwrap_or(-1), report)
}

fn export(s: &Stack, file: &Path, extra: &[&str]) {
    let mut args = vec!["audit", "export", "--out", file.to_str().expect("path")];
    args.extend_from_slice(extra);
    let status = common::finish(&mut role(&s.broker, &s.db, &args)).status;
    assert!(status.success(), "audit export {extra:?}: {status}");
}

fn first_line(report: &Value) -> u64 {
    report["findings"][0]["line"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn exports_verify_and_every_tamper_is_found_at_its_line() {
    let s = Stack::start().await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let (status, body) = s
            .post(
                "/v1/tasks",
                &json!({"name": format!("exp-{i}"), "shell": "true"}),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["id"].as_str().expect("id").to_string());
    }
    let (status, body) = s
        .post(&format!("/v1/tasks/{}/cancel", ids[0]), &json!({}))
        .await;
    assert!(status < 300, "{body}");
    let topic = s.broker.events_topic();
    s.wait_caught_up(&topic).await;
    let on_log = s.broker.read_all(&topic).len();

    let dir = tempfile::tempdir().expect("dir");
    let all = dir.path().join("all.jsonl");
    export(&s, &all, &[]);
    let text = std::fs::read_to_string(&all).expect("read export");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        on_log + 1,
        "a line per record and the manifest"
    );
    let schema: Value =
        serde_json::from_str(include_str!("../schemas/audit-export.v1.json")).expect("schema");
    let validator = jsonschema::validator_for(&schema).expect("compile schema");
    for line in &lines {
        let value: Value = serde_json::from_str(line).expect("a JSON line");
        assert!(validator.is_valid(&value), "{line}");
    }
    for against in [false, true] {
        let (status, report) = verify(&s, &all, against);
        assert_eq!((status, &report["findings"]), (0, &json!([])), "{report}");
        assert_eq!(report["records"], on_log);
    }

    // One task's records, and a time window with nothing in it.
    let one = dir.path().join("one.jsonl");
    export(&s, &one, &["--task", &ids[0]]);
    let checked = check(&std::fs::read_to_string(&one).expect("read"));
    assert_eq!(checked.findings, vec![]);
    let (_, events) = s.get(&format!("/v1/tasks/{}/events", ids[0])).await;
    let history = events["events"].as_array().map_or(0, Vec::len);
    assert!(history >= 2, "{events}");
    assert_eq!(checked.records.len(), history);
    assert!(checked.records.iter().all(|r| r.key.is_some()));
    let none = dir.path().join("none.jsonl");
    export(&s, &none, &["--since", "2999-01-01T00:00:00Z"]);
    assert_eq!(
        check(&std::fs::read_to_string(&none).expect("read"))
            .records
            .len(),
        0
    );

    // Each tampering of the file, found at its line.
    let write = |name: &str, l: &[String]| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            l.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .expect("write");
        path
    };
    let owned: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    let mut edited = owned.clone();
    edited[4] = edited[4].replace("\"partition\":", "\"partition\":1");
    let mut removed = owned.clone();
    removed.remove(5);
    let mut inserted = owned.clone();
    inserted.insert(7, owned[2].clone());
    let mut reordered = owned.clone();
    reordered.swap(8, 9);
    let mut manifest = owned.clone();
    let last = manifest.len() - 1;
    manifest[last] = manifest[last].replace("\"records\":", "\"records\":9");
    for (name, tampered, line) in [
        ("edited", edited, 5),
        ("removed", removed, 6),
        ("inserted", inserted, 8),
        ("reordered", reordered, 9),
        ("manifest", manifest, owned.len() as u64),
    ] {
        let (status, report) = verify(&s, &write(name, &tampered), false);
        assert_eq!((status, first_line(&report)), (1, line), "{name}: {report}");
    }

    // A forgery sealed again from scratch: one value changed, every hash recomputed.
    // The chain holds; only the log can tell.
    let mut writer = ExportWriter::new();
    let mut forged = String::new();
    for (i, r) in check(&text).records.iter().enumerate() {
        let (key, headers, value) = record_bytes(r).expect("bytes");
        let mut value = value.expect("value");
        if i == 3 {
            value = br#"{"forged":true}"#.to_vec();
        }
        let headers: Vec<(&str, Option<&[u8]>)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect();
        forged.push_str(&writer.record(
            &r.topic,
            r.partition,
            r.offset,
            r.timestamp_ms,
            key.as_deref(),
            &headers,
            Some(&value),
        ));
    }
    forged.push_str(&writer.manifest(json!({}), "2026-12-03T00:00:00Z".into()));
    let path = dir.path().join("forged.jsonl");
    std::fs::write(&path, forged).expect("write");
    let (status, report) = verify(&s, &path, false);
    assert_eq!((status, &report["findings"]), (0, &json!([])), "{report}");
    let (status, report) = verify(&s, &path, true);
    assert_eq!((status, first_line(&report)), (1, 4), "{report}");
    assert!(
        report["findings"][0]["problem"]
            .as_str()
            .is_some_and(|p| p.contains("value")),
        "{report}"
    );
}

/// `tasklog audit task ID --json`.
fn audit_task(broker: &common::Broker, db: &common::Db, id: &str) -> Value {
    let output = common::finish(
        role(broker, db, &["audit", "task", id, "--json"]).stdout(std::process::Stdio::piped()),
    );
    assert!(output.status.success(), "audit task: {}", output.status);
    serde_json::from_slice(&output.stdout).expect("JSON")
}

/// What matters of each record: offset, type, verdict, reason.
fn verdicts(audit: &Value) -> Vec<(i64, String, String, String)> {
    audit["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
            (
                r["offset"].as_i64().unwrap_or(-1),
                s("type"),
                s("verdict"),
                s("reason"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_task_reads_the_whole_history_from_kafka_even_with_postgres_killed() {
    let mut pg = common::OwnPostgres::start();
    let broker = common::Broker::start();
    let db = common::Db::create_on(&pg.admin_url()).await;
    let (_server, url) = common::start_server(&broker, &db, &[]).await;
    let _projector = common::start_projector(&broker, &db);
    let http = reqwest::Client::new();
    let body: Value = http
        .post(format!("{url}/v1/tasks"))
        .json(&json!({"name": "audited", "shell": "true"}))
        .send()
        .await
        .expect("submit")
        .json()
        .await
        .expect("json");
    let id = body["id"].as_str().expect("id").to_string();
    let r = http
        .post(format!("{url}/v1/tasks/{id}/cancel"))
        .json(&json!({"reason": "user_requested"}))
        .send()
        .await
        .expect("cancel");
    assert!(r.status().is_success());
    // A second copy of its submission, straight to Kafka: refused as a duplicate.
    let topic = broker.events_topic();
    let first = broker
        .read_all(&topic)
        .into_iter()
        .find(|r| r.key.as_deref() == Some(id.as_str()))
        .expect("its submission");
    let headers: Vec<(&str, &str)> = first
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let (_, copy_offset) = broker
        .produce(&topic, Some(&id), &headers, &first.value)
        .await;
    let end: i64 = broker.all_watermarks(&topic).iter().map(|(_, h)| h).sum();
    common::wait_projected_on(&db, &topic, end).await;

    let up = audit_task(&broker, &db, &id);
    assert_eq!(up["found_by"], "index", "{up}");
    let history = verdicts(&up);
    assert!(history.len() >= 3, "{up}");
    assert_eq!(history[0].1, "dev.tasklog.task.submitted.v1");
    let rejected: Vec<_> = history.iter().filter(|v| v.2 == "rejected").collect();
    assert_eq!(rejected.len(), 1, "{up}");
    assert_eq!(
        (rejected[0].0, rejected[0].3.as_str()),
        (copy_offset, "duplicate_ce_id")
    );
    assert!(
        history
            .iter()
            .filter(|v| v.2 == "applied")
            .all(|v| v.3.is_empty())
    );
    assert_eq!(up["state"]["state"], "cancelled", "{up}");
    assert_eq!(up["dead_letters"][0]["source_offset"], copy_offset, "{up}");
    assert_eq!(up["dead_letters"][0]["reason"], "duplicate_ce_id", "{up}");
    assert_eq!(up["logs"], json!([]), "{up}");
    // Every record as the log has it: the API's history is the applied part of it.
    let events: Value = http
        .get(format!("{url}/v1/tasks/{id}/events"))
        .send()
        .await
        .expect("events")
        .json()
        .await
        .expect("json");
    let applied_ids: Vec<&str> = up["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| r["verdict"] == "applied")
        .filter_map(|r| r["ce_id"].as_str())
        .collect();
    let api_ids: Vec<&str> = events["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["ce_id"].as_str().or(e["id"].as_str()))
        .collect();
    assert_eq!(applied_ids, api_ids, "{events}");

    // The same over HTTP; an id that is not on the log is a 404.
    let served: Value = http
        .get(format!("{url}/v1/tasks/{id}/audit"))
        .send()
        .await
        .expect("audit")
        .json()
        .await
        .expect("json");
    assert_eq!(verdicts(&served), history, "{served}");
    assert_eq!(served["dead_letters"], up["dead_letters"]);
    let r = http
        .get(format!("{url}/v1/tasks/{}/audit", uuid::Uuid::new_v4()))
        .send()
        .await
        .expect("audit");
    assert_eq!(r.status(), 404);

    pg.kill();
    let down = audit_task(&broker, &db, &id);
    assert_eq!(down["found_by"], "scan", "{down}");
    assert_eq!(verdicts(&down), history);
    assert_eq!(down["state"], up["state"]);
    assert_eq!(down["dead_letters"], up["dead_letters"]);
    assert_eq!(down["logs"], Value::Null);
}
