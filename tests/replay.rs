//! `tasklog replay verify` against a real broker and Postgres: a faithful projection
//! (with cancels, a retry-free history, a duplicate and junk records published straight
//! to Kafka) has no difference; each tampering with the projection is reported
//! precisely, and the command exits 1.

mod common;

use common::{Db, Stack, ce_headers, replay_verify, role};
use serde_json::{Value, json};

/// The differences of a report, as (difference, id or task, field) triples, sorted.
fn kinds(report: &Value) -> Vec<(String, String, String)> {
    let mut out: Vec<(String, String, String)> = report["differences"]
        .as_array()
        .expect("differences")
        .iter()
        .map(|d| {
            let who = d["id"].as_str().or(d["task"].as_str()).unwrap_or("");
            (
                d["difference"].as_str().unwrap_or("").to_string(),
                who.to_string(),
                d["field"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Every row that comes from the log, comparable across databases.
async fn rows(db: &Db) -> Vec<String> {
    let client = db.client().await;
    let mut out = Vec::new();
    for query in [
        "SELECT id::text || state || seq || event_partition || ':' || last_offset || doc::text FROM tasks",
        "SELECT task_id::text || seq || ce_id || partition || ':' || \"offset\" FROM task_events",
        "SELECT topic || partition || ':' || \"offset\" || reason FROM rejected_events",
        "SELECT topic || partition || ':' || next_offset FROM projection_offsets",
        "SELECT id || doc::text FROM workers",
    ] {
        let mut part: Vec<String> = client
            .query(query, &[])
            .await
            .expect(query)
            .iter()
            .map(|r| r.get(0))
            .collect();
        part.sort();
        out.extend(part);
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_finds_nothing_in_a_faithful_projection_and_names_every_tamper() {
    let s = Stack::start().await;
    let mut ids = Vec::new();
    for i in 0..40 {
        let (status, body) = s
            .post(
                "/v1/tasks",
                &json!({"name": format!("audit-{i}"), "shell": "true"}),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["id"].as_str().expect("id").to_string());
    }
    for id in ids.iter().take(5) {
        let (status, body) = s.post(&format!("/v1/tasks/{id}/cancel"), &json!({})).await;
        assert!(status < 300, "{body}");
    }
    // A record that does not decode, and a second copy of a submitted event.
    let topic = s.broker.events_topic();
    let junk = uuid::Uuid::new_v4().to_string();
    let h = ce_headers("dev.tasklog.task.submitted.v1", &junk, "junk-1");
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    s.broker.produce(&topic, Some(&junk), &h, b"not json").await;
    let first = s
        .broker
        .read_all(&topic)
        .into_iter()
        .next()
        .expect("a record");
    let headers: Vec<(&str, &str)> = first
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    s.broker
        .produce(&topic, first.key.as_deref(), &headers, &first.value)
        .await;
    s.wait_caught_up(&topic).await;
    assert_eq!(s.db.count("SELECT count(*) FROM rejected_events").await, 2);

    let (status, report) = replay_verify(&s.broker, &s.db);
    assert_eq!(status, 0, "{report}");
    assert_eq!(report["consistent"], true, "{report}");
    assert_eq!(report["differences"], json!([]), "{report}");
    assert_eq!(report["records"], 40 + 10 + 2, "{report}");

    // A rebuild into another database gives the same projection, twice (the second run
    // resumes at the end and changes nothing), and leaves the live one alone.
    let blue = Db::create().await;
    for _ in 0..2 {
        let status = common::finish(&mut role(
            &s.broker,
            &s.db,
            &["replay", "rebuild", "--database-url", &blue.url],
        ))
        .status;
        assert!(status.success(), "replay rebuild: {status}");
        assert_eq!(rows(&blue).await, rows(&s.db).await);
    }
    // The token hashes, which are not on the log, came from the live database.
    let credentials = "SELECT count(*) FROM token_credentials";
    assert!(s.db.count(credentials).await >= 1);
    assert_eq!(blue.count(credentials).await, s.db.count(credentials).await);
    let (status, report) = replay_verify(&s.broker, &blue);
    assert_eq!(
        (status, &report["differences"]),
        (0, &json!([])),
        "{report}"
    );
    let refused = common::finish(&mut role(
        &s.broker,
        &s.db,
        &["replay", "rebuild", "--database-url", &s.db.url],
    ))
    .status;
    assert!(
        !refused.success(),
        "a rebuild into the live database is refused"
    );

    // Each tampering, one after another: the report names exactly what was done so far.
    let client = s.db.client().await;
    let (a, b, c) = (&ids[10], &ids[11], &ids[12]);
    client
        .execute(
            "UPDATE tasks SET state = 'succeeded' WHERE id = $1::text::uuid",
            &[a],
        )
        .await
        .expect("tamper state");
    let mut expected = vec![("task_differs".into(), a.clone(), "state".into())];
    let (status, report) = replay_verify(&s.broker, &s.db);
    assert_eq!((status, kinds(&report)), (1, expected.clone()), "{report}");

    client
        .execute(
            "DELETE FROM task_events WHERE task_id = $1::text::uuid AND seq = 1",
            &[b],
        )
        .await
        .expect("tamper event index");
    expected.push(("missing_event".into(), b.clone(), String::new()));
    expected.sort();
    let (status, report) = replay_verify(&s.broker, &s.db);
    assert_eq!((status, kinds(&report)), (1, expected.clone()), "{report}");

    let extra = uuid::Uuid::new_v4().to_string();
    client
        .execute(
            "INSERT INTO tasks (id, state, seq, type, name, priority, labels, idempotency_key,
                                submitted_at, updated_at, event_partition, last_offset, doc)
             SELECT $1::text::uuid, state, seq, type, name, priority, labels, idempotency_key,
                    submitted_at, updated_at, event_partition, last_offset, doc
             FROM tasks WHERE id = $2::text::uuid",
            &[&extra, c],
        )
        .await
        .expect("tamper: extra task");
    expected.push(("extra_task".into(), extra.clone(), String::new()));
    expected.sort();
    let (status, report) = replay_verify(&s.broker, &s.db);
    assert_eq!((status, kinds(&report)), (1, expected.clone()), "{report}");

    client
        .execute(
            "UPDATE task_events SET \"offset\" = \"offset\" + 1000 WHERE task_id = $1::text::uuid",
            &[c],
        )
        .await
        .expect("tamper offset");
    expected.push(("event_differs".into(), c.clone(), "offset".into()));
    expected.sort();
    let (status, report) = replay_verify(&s.broker, &s.db);
    assert_eq!((status, kinds(&report)), (1, expected.clone()), "{report}");
    assert_eq!(report["consistent"], false);
    for d in report["differences"].as_array().expect("differences") {
        assert!(d["message"].as_str().is_some_and(|m| !m.is_empty()), "{d}");
    }
}

/// `tasklog replay state ARGS... --json`.
fn replay_state(s: &Stack, args: &[&str]) -> Value {
    let mut all = vec!["replay", "state", "--json"];
    all.extend_from_slice(args);
    let output = common::finish(role(&s.broker, &s.db, &all).stdout(std::process::Stdio::piped()));
    assert!(
        output.status.success(),
        "replay state {args:?}: {}",
        output.status
    );
    serde_json::from_slice(&output.stdout).expect("JSON")
}

/// The task as `GET` showed it, without where its last event is (not part of the state).
fn as_seen(mut task: Value) -> Value {
    let object = task.as_object_mut().expect("object");
    object.remove("partition");
    object.remove("last_offset");
    task
}

/// A moment strictly after everything appended so far, in the log's millisecond clock.
fn moment_now() -> chrono::DateTime<chrono::Utc> {
    let now = chrono::Utc::now();
    // Records appended from here on carry a later millisecond than this moment.
    while chrono::Utc::now().timestamp_millis() == now.timestamp_millis() {
        std::hint::spin_loop();
    }
    now
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_state_at_a_moment_is_what_get_showed_then() {
    let s = Stack::start().await;
    let (status, body) = s
        .post("/v1/tasks", &json!({"name": "then", "shell": "true"}))
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    let submitted_at = format!(
        "{}:{}",
        body["event"]["partition"],
        body["event"]["offset"].as_i64().expect("offset") + 1
    );
    let (_, first) = s.get(&format!("/v1/tasks/{id}")).await;
    let t1 = moment_now();
    let (status, body) = s.post(&format!("/v1/tasks/{id}/cancel"), &json!({})).await;
    assert!(status < 300, "{body}");
    let (_, second) = s.get(&format!("/v1/tasks/{id}")).await;
    assert_eq!(second["state"], "cancelled", "{second}");
    let t2 = moment_now();
    let (_, other) = s
        .post("/v1/tasks", &json!({"name": "later", "shell": "true"}))
        .await;

    assert_eq!(
        replay_state(&s, &["--at", &t1.to_rfc3339(), &id]),
        as_seen(first.clone())
    );
    assert_eq!(
        replay_state(&s, &["--at", &t2.to_rfc3339(), &id]),
        as_seen(second)
    );
    assert_eq!(
        replay_state(&s, &["--at-offsets", &submitted_at, &id]),
        as_seen(first)
    );
    // Every task at t2: this one, not the one submitted after.
    let all = replay_state(&s, &["--at", &t2.to_rfc3339()]);
    let ids: Vec<&str> = all
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|t| t["id"].as_str())
        .collect();
    assert!(ids.contains(&id.as_str()), "{all}");
    assert!(!ids.contains(&other["id"].as_str().expect("id")), "{all}");
}

/// A rebuild SIGKILLed half way, then run again, ends with the same projection as the
/// live one, nothing missing and nothing applied twice: it resumes from the offsets it
/// committed with its rows.
#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_killed_half_way_resumes_to_the_same_projection() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::FutureRecord;
    use tasklog::events::{Event, Payload, TaskSpec};

    let broker = common::Broker::start();
    let db = Db::create().await;
    let _projector = common::start_projector(&broker, &db);
    let topic = broker.events_topic();
    let total = 30_000usize;
    let producer = broker.producer();
    let encoded: Vec<_> = (0..total)
        .map(|i| {
            let spec = TaskSpec::from_json(json!({"name": format!("r{i}"), "shell": "true"}))
                .expect("spec");
            Event::new(
                "test://rebuild",
                uuid::Uuid::now_v7(),
                1,
                Payload::Submitted {
                    spec: std::sync::Arc::new(spec),
                },
            )
            .encode()
        })
        .collect();
    for chunk in encoded.chunks(2_000) {
        let sends = chunk.iter().map(|e| {
            let mut headers = OwnedHeaders::new();
            for (k, v) in &e.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                });
            }
            producer.send(
                FutureRecord::to(&topic)
                    .key(&e.key)
                    .payload(&e.payload)
                    .headers(headers),
                std::time::Duration::from_secs(30),
            )
        });
        for sent in futures::future::join_all(sends).await {
            assert!(sent.is_ok(), "produce: {sent:?}");
        }
    }
    common::wait_projected_on(&db, &topic, total as i64).await;

    let blue = Db::create().await;
    let mut rebuild = common::Proc::wrap(
        role(
            &broker,
            &db,
            &["replay", "rebuild", "--database-url", &blue.url],
        )
        .spawn()
        .expect("start replay rebuild"),
        "rebuild",
    );
    // Killed once it has committed some of the log, well before all of it.
    let applied = common::eventually(
        "the rebuild to commit part of the log",
        std::time::Duration::from_secs(120),
        || async {
            let done = common::applied_offsets(&blue, &topic).await.unwrap_or(0);
            (done >= 1_000).then_some(done)
        },
    )
    .await;
    rebuild.kill();
    let at_kill = common::applied_offsets(&blue, &topic).await.unwrap_or(0);
    assert!(
        at_kill < total as i64,
        "the rebuild had finished ({at_kill} of {total}) before it could be killed; first seen at {applied}"
    );

    let status = common::finish(&mut role(
        &broker,
        &db,
        &["replay", "rebuild", "--database-url", &blue.url],
    ))
    .status;
    assert!(status.success(), "replay rebuild after the kill: {status}");
    assert_eq!(
        blue.count("SELECT count(*) FROM tasks").await,
        total as i64,
        "every task once"
    );
    assert_eq!(
        blue.count("SELECT count(*) FROM task_events").await,
        total as i64,
        "every event once"
    );
    assert_eq!(rows(&blue).await, rows(&db).await);
    let (status, report) = replay_verify(&broker, &blue);
    assert_eq!(
        (status, &report["differences"]),
        (0, &json!([])),
        "{report}"
    );
}
