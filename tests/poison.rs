//! One bad record never stops a projection: records the folds accept but Postgres
//! refuses (a NUL in text or json, a constraint, an index row over the limit) are found
//! inside their batch, dead-lettered with reason `storage_rejected` and Postgres' own
//! message, and every other record is applied exactly once — for every projection.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use common::{Proc, Stack, eventually, start_projector, start_projector_with};
use serde_json::{Value, json};
use tasklog::events::service::{ServiceEvent, ServicePayload, ServiceSpec};
use tasklog::events::worker::{WorkerCapacity, WorkerEvent, WorkerInfo, WorkerPayload};
use tasklog::events::{EncodedEvent, Event, Payload, TaskSpec};
use tasklog::kafka::{Appender, AppenderOptions};
use tasklog::logs::{LogWriter, LogWriterOptions, Stream};
use uuid::Uuid;

fn appender(s: &Stack) -> Appender {
    Appender::new(&AppenderOptions::new(&s.broker.addr)).expect("appender")
}

/// A `submitted` event for a new task with this spec, as an outside producer would
/// publish it (the fold accepts it: the spec is valid).
fn submitted(spec: Value) -> (Uuid, EncodedEvent) {
    let id = Uuid::new_v4();
    let spec: TaskSpec = serde_json::from_value(spec).expect("spec");
    spec.check().expect("the fold accepts this spec");
    let event = Event::new(
        "test://poison",
        id,
        1,
        Payload::Submitted {
            spec: std::sync::Arc::new(spec),
        },
    );
    (id, event.encode())
}

/// 4000 random CJK characters: a valid `working_dir` (at most 4096 characters) whose
/// index entry is far over Postgres' limit, even compressed.
fn incompressible_path() -> String {
    let mut x: u32 = 0x9e37_79b9;
    (0..4000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            char::from_u32(0x4e00 + x % 0x5000).unwrap_or('x')
        })
        .collect()
}

/// The dead letters of `topic`, by `ce_id` (or by source offset for log records).
fn dead_letters(s: &Stack) -> Vec<common::Record> {
    s.broker.read_all(&s.broker.dlq_topic())
}

async fn rejected_reasons(s: &Stack, topic: &str) -> Vec<(String, String)> {
    s.db.client()
        .await
        .query(
            "SELECT reason, message FROM rejected_events WHERE topic = $1 ORDER BY \"offset\"",
            &[&topic],
        )
        .await
        .expect("rejected events")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Stops the projector, so that what is published next waits in one backlog and is
/// read as one batch when it starts again.
fn stop_projector(s: &mut Stack) {
    s.projector.kill();
}

fn restart_projector(s: &mut Stack, env: &[(&str, &str)]) {
    let p: Proc = if env.is_empty() {
        start_projector(&s.broker, &s.db)
    } else {
        start_projector_with(&s.broker, &s.db, env)
    };
    s.projector = p;
}

/// Publishes good and poisoned task submissions interleaved, all in one backlog;
/// returns (good ids, poisoned (id, ce_id, expected SQLSTATE)).
async fn publish_task_backlog(s: &Stack) -> (Vec<Uuid>, Vec<(Uuid, String, &'static str)>) {
    let topic = s.broker.events_topic();
    let appender = appender(s);
    let poisons: Vec<(Value, &'static str)> = vec![
        // A NUL in a text column.
        (json!({"shell": "true", "name": "nul\u{0}name"}), "22021"),
        // A NUL in the spec's env: stored as json, but the service index reads into it.
        (json!({"shell": "true", "env": {"A": "x\u{0}"}}), "22P05"),
        // A constraint an operator added.
        (
            json!({"shell": "true", "name": "refused-by-check"}),
            "23514",
        ),
        // An index row over Postgres' limit.
        (
            json!({"shell": "true", "working_dir": incompressible_path()}),
            "54000",
        ),
    ];
    let mut good = Vec::new();
    let mut poisoned = Vec::new();
    for (i, (spec, code)) in poisons.into_iter().enumerate() {
        let (id, e) = submitted(json!({"shell": "true", "name": format!("good-{i}")}));
        appender.append(&topic, &e).await.expect("append");
        good.push(id);
        let (id, e) = submitted(spec);
        appender.append(&topic, &e).await.expect("append");
        poisoned.push((id, e.ce_id.clone(), code));
    }
    let (id, e) = submitted(json!({"shell": "true", "name": "good-last"}));
    appender.append(&topic, &e).await.expect("append");
    good.push(id);
    (good, poisoned)
}

async fn add_operator_rules(s: &Stack) {
    s.db.client()
        .await
        .batch_execute(
            "ALTER TABLE tasks ADD CONSTRAINT operator_rule CHECK (name IS DISTINCT FROM 'refused-by-check');
             CREATE INDEX operator_index ON tasks ((doc->'spec'->>'working_dir'));
             ALTER TABLE workers ADD CONSTRAINT operator_rule CHECK (id <> 'refused-worker');
             ALTER TABLE services ADD CONSTRAINT operator_rule CHECK (name <> 'refused-service');
             ALTER TABLE log_index ADD CONSTRAINT operator_rule CHECK (attempt < 1000);",
        )
        .await
        .expect("operator rules");
}

async fn assert_tasks_outcome(s: &Stack, good: &[Uuid], poisoned: &[(Uuid, String, &str)]) {
    // A restarted projector waits out the killed one's session before it owns the
    // partitions: longer than a read waits.
    s.wait_caught_up(&s.broker.events_topic()).await;
    for id in good {
        let task = s.task(&id.to_string()).await;
        assert_eq!(task["seq"], 1, "{task}");
    }
    for (id, _, _) in poisoned {
        let (status, body) = s.get(&format!("/v1/tasks/{id}")).await;
        assert_eq!(status, 404, "a refused submission made no task: {body}");
    }
    // Exactly once: one event row per good task, none for the refused.
    let events = s.db.count("SELECT count(*) FROM task_events").await;
    assert_eq!(events, good.len() as i64);
    let topic = s.broker.events_topic();
    let rejected = rejected_reasons(s, &topic).await;
    assert_eq!(rejected.len(), poisoned.len(), "{rejected:?}");
    for (_, ce_id, code) in poisoned {
        let row =
            s.db.client()
                .await
                .query_one(
                    "SELECT reason, message FROM rejected_events WHERE ce_id = $1",
                    &[ce_id],
                )
                .await
                .expect("one rejected_events row per refused record");
        let (reason, message): (String, String) = (row.get(0), row.get(1));
        assert_eq!(reason, "storage_rejected");
        assert!(message.contains(code), "{message} names {code}");
    }
    let dlq = dead_letters(s);
    for (_, ce_id, code) in poisoned {
        let copies: Vec<_> = dlq
            .iter()
            .filter(|r| r.header("ce_id") == Some(ce_id.as_str()))
            .collect();
        assert!(!copies.is_empty(), "{ce_id} dead-lettered");
        for r in copies {
            assert_eq!(r.header("tasklog_dlq_reason"), Some("storage_rejected"));
            assert!(
                r.header("tasklog_dlq_message")
                    .is_some_and(|m| m.contains(code)),
                "{:?}",
                r.header("tasklog_dlq_message")
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn records_postgres_refuses_are_isolated_in_their_batch_and_the_rest_applied_once() {
    let mut s = Stack::start().await;
    add_operator_rules(&s).await;
    // A task first, so the projection is known to run.
    let (id, e) = submitted(json!({"shell": "true", "name": "first"}));
    appender(&s)
        .append(&s.broker.events_topic(), &e)
        .await
        .expect("append");
    s.task(&id.to_string()).await;

    stop_projector(&mut s);
    let (mut good, poisoned) = publish_task_backlog(&s).await;
    good.push(id);
    restart_projector(&mut s, &[]);
    assert_tasks_outcome(&s, &good, &poisoned).await;

    // And it goes on.
    let (status, body) = s
        .post("/v1/tasks", &json!({"shell": "true", "name": "after"}))
        .await;
    assert_eq!(status, 202, "{body}");
    let after = s.task(body["id"].as_str().unwrap()).await;
    assert_eq!(after["spec"]["name"], "after");
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_while_isolating_the_restarted_projector_applies_everything_once() {
    let mut s = Stack::start().await;
    add_operator_rules(&s).await;
    stop_projector(&mut s);
    let (good, poisoned) = publish_task_backlog(&s).await;
    // Abort the fourth time a batch is split: by then its first records are committed
    // (one applied, one dead-lettered) and the rest are not.
    restart_projector(&mut s, &[("TASKLOG_FAILPOINT", "isolating:4")]);
    assert!(
        common::exits_within(&mut s.projector, Duration::from_secs(120)).await,
        "the projector reached the failpoint"
    );
    restart_projector(&mut s, &[]);
    assert_tasks_outcome(&s, &good, &poisoned).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_services_and_the_log_index_go_on_past_refused_records() {
    let mut s = Stack::start().await;
    add_operator_rules(&s).await;
    stop_projector(&mut s);
    let prefix = &s.broker.prefix;
    let (workers, services, logs) = (
        format!("{prefix}.workers"),
        format!("{prefix}.services"),
        format!("{prefix}.logs"),
    );
    let appender = appender(&s);
    let info = WorkerInfo {
        capacity: WorkerCapacity {
            cpu: 1.0,
            memory: 1 << 30,
            gpu: 0,
        },
        labels: BTreeMap::new(),
        projects: Vec::new(),
        hostname: Some("poison-test".into()),
        pid: None,
        incarnation: None,
    };
    for id in ["good-worker-1", "refused-worker", "good-worker-2"] {
        let e = WorkerEvent::new("test://poison", id, WorkerPayload::Registered(info.clone()));
        appender
            .append(&workers, &e.encode())
            .await
            .expect("append");
    }
    for name in ["good-service", "refused-service"] {
        let spec = ServiceSpec {
            replicas: 1,
            template: json!({"shell": "sleep 1"}),
            retry: None,
            probe: None,
        };
        let e = ServiceEvent::new(
            "test://poison",
            name,
            ServicePayload::Created(Box::new(spec)),
        );
        appender
            .append(&services, &e.encode())
            .await
            .expect("append");
    }
    let writer = LogWriter::new(appender.clone(), LogWriterOptions::new(&logs));
    let task = Uuid::new_v4();
    for attempt in [1, 5000, 2] {
        let (_, delivered) = writer.write(
            task,
            attempt,
            Stream::Stdout,
            b"a line",
            Some(Utc::now()),
            None,
        );
        delivered.await.expect("line delivered");
    }
    restart_projector(&mut s, &[]);
    for topic in [&workers, &services, &logs] {
        s.wait_caught_up(topic).await;
    }

    for id in ["good-worker-1", "good-worker-2"] {
        let (status, body) = s.get(&format!("/v1/workers/{id}")).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, _) = s.get("/v1/workers/refused-worker").await;
    assert_eq!(status, 404);
    let (status, body) = s.get("/v1/services/good-service").await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = s.get("/v1/services/refused-service").await;
    assert_eq!(status, 404);
    let db = &s.db;
    eventually(
        "log lines indexed",
        Duration::from_secs(60),
        || async move {
            let attempts = db
                .count("SELECT coalesce(sum(attempt), 0)::bigint FROM log_index")
                .await;
            (attempts == 3).then_some(())
        },
    )
    .await;

    for (topic, count) in [(&workers, 1), (&services, 1), (&logs, 1)] {
        let rejected = rejected_reasons(&s, topic).await;
        assert_eq!(rejected.len(), count, "{topic}: {rejected:?}");
        assert_eq!(rejected[0].0, "storage_rejected");
        assert!(rejected[0].1.contains("23514"), "{}", rejected[0].1);
    }
    let dlq = dead_letters(&s);
    for topic in [&workers, &services, &logs] {
        assert_eq!(
            dlq.iter()
                .filter(|r| r.header("tasklog_dlq_topic") == Some(topic.as_str()))
                .filter(|r| r.header("tasklog_dlq_reason") == Some("storage_rejected"))
                .count(),
            1,
            "{topic}"
        );
    }
}
