//! What only a real Apache Kafka allows: topic settings as created, retention that
//! really deletes, compaction, consumer-group scale-out and replication across brokers.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use common::{
    Broker, Cluster, Db, Proc, Stack, Submitters, eventually, free_port, role, signal,
    start_projector,
};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::{Value, json};
use tasklog::kafka::{Appender, AppenderOptions};
use tasklog::logs::{LogWriter, LogWriterOptions, Stream};
use uuid::Uuid;

/// A topic's settings as the broker reports them.
async fn topic_config(broker: &Broker, topic: &str) -> HashMap<String, String> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .create()
        .expect("admin");
    let resources = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &AdminOptions::new())
        .await
        .expect("describe configs");
    let resource = resources
        .into_iter()
        .next()
        .expect("one resource")
        .expect("config");
    resource
        .entries
        .iter()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect()
}

async fn submit(s: &Stack, spec: Value) -> Uuid {
    let (status, body) = s.post("/v1/tasks", &spec).await;
    assert_eq!(status, 202, "{body}");
    Uuid::parse_str(body["id"].as_str().unwrap()).unwrap()
}

fn log_writer(broker: &Broker) -> LogWriter {
    let appender = Appender::new(&AppenderOptions::new(&broker.addr)).expect("appender");
    LogWriter::new(
        appender,
        LogWriterOptions::new(&format!("{}.logs", broker.prefix)),
    )
}

/// Writes `n` lines "<from>".."<from+n-1>" of attempt 1 and waits for every delivery.
async fn write_lines(w: &LogWriter, id: Uuid, from: i64, n: i64) {
    let now = Utc::now();
    let pending: Vec<_> = (from..from + n)
        .map(|i| {
            w.write(
                id,
                1,
                Stream::Stdout,
                i.to_string().as_bytes(),
                Some(now),
                None,
            )
            .1
        })
        .collect();
    for p in pending {
        p.await.expect("line delivered");
    }
}

async fn indexed_lines(db: &Db, id: Uuid) -> i64 {
    db.client()
        .await
        .query_one(
            "SELECT coalesce(sum(lines), 0)::bigint FROM log_index WHERE task_id = $1",
            &[&id],
        )
        .await
        .expect("log index")
        .get(0)
}

/// tasklog creates its topics as documented: events kept forever, workers compacted,
/// logs with the configured retention. With small segments and a short retention on a
/// test's logs topic, old lines are really deleted: a cursor into them is 410
/// `cursor_expired` with the earliest valid cursor, while the events topic keeps all.
#[tokio::test(flavor = "multi_thread")]
async fn retention_deletes_old_log_lines_and_their_cursors_expire() {
    let broker = Broker::start_with_topic_settings(
        12,
        &[(
            "logs",
            &[
                ("segment.ms", "500"),
                ("retention.ms", "3000"),
                ("file.delete.delay.ms", "0"),
            ],
        )],
    );
    let s = Stack::start_on(broker).await;

    // Topics as tasklog creates them (all but logs, which this test made).
    let prefix = s.broker.prefix.clone();
    let events = topic_config(&s.broker, &format!("{prefix}.events")).await;
    assert_eq!(events["retention.ms"], "-1");
    assert_eq!(events["cleanup.policy"], "delete");
    let workers = topic_config(&s.broker, &format!("{prefix}.workers")).await;
    assert_eq!(workers["cleanup.policy"], "compact");
    let dlq = topic_config(&s.broker, &format!("{prefix}.dlq")).await;
    assert_eq!(dlq["retention.ms"], "-1");

    let id = submit(&s, json!({"shell": "true"})).await;
    s.task(&id.to_string()).await;
    let w = log_writer(&s.broker);
    write_lines(&w, id, 1, 10).await;
    let db = &s.db;
    eventually("10 lines indexed", Duration::from_secs(60), || async move {
        (indexed_lines(db, id).await >= 10).then_some(())
    })
    .await;
    let (status, first) = s.get(&format!("/v1/tasks/{id}/logs?limit=1")).await;
    assert_eq!(status, 200, "{first}");
    let old = first["next_cursor"].as_str().unwrap().to_string();
    let partition = tasklog::kafka::partition_for_key(id.to_string().as_bytes(), 12);
    let logs_topic = format!("{prefix}.logs");

    // Keep writing (each append past segment.ms rolls a segment) until the broker's
    // retention check has deleted the first segments.
    let next_line = AtomicUsize::new(11);
    let (w, next_line, broker, logs_topic) = (&w, &next_line, &s.broker, &logs_topic);
    let low = eventually(
        "retention to delete the first lines",
        Duration::from_secs(90),
        || async move {
            let from = next_line.fetch_add(10, Ordering::SeqCst) as i64;
            write_lines(w, id, from, 10).await;
            tokio::time::sleep(Duration::from_millis(250)).await;
            let (low, _) = broker.watermarks(logs_topic, partition);
            (low > 10).then_some(low)
        },
    )
    .await;
    assert!(low > 10);

    let (status, body) = s.get(&format!("/v1/tasks/{id}/logs?cursor={old}")).await;
    assert_eq!(status, 410, "{body}");
    assert_eq!(body["error"]["code"], "cursor_expired");
    let earliest = body["error"]["earliest_cursor"]
        .as_str()
        .expect("earliest cursor");
    let (status, body) = s
        .get(&format!("/v1/tasks/{id}/logs?cursor={earliest}&limit=5"))
        .await;
    assert_eq!(status, 200, "{body}");
    let lines = body["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 5, "{body}");
    let first_kept: i64 = lines[0]["text"].as_str().unwrap().parse().unwrap();
    assert!(first_kept > 10, "the first lines are gone: {body}");

    // The events topic kept every event.
    let events_topic = format!("{prefix}.events");
    for p in 0..12 {
        assert_eq!(s.broker.watermarks(&events_topic, p).0, 0, "partition {p}");
    }
    assert_eq!(s.broker.read_all(&events_topic).len(), 1);
}

/// With small segments and a low dirty ratio on a test's workers topic, compaction
/// removes old heartbeats; a projection rebuilt from offset 0 afterwards still knows
/// every worker and its last state.
#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_after_compaction_knows_every_worker_and_its_last_state() {
    let broker = Broker::start_with_topic_settings(
        12,
        &[(
            "workers",
            &[
                ("cleanup.policy", "compact"),
                ("segment.ms", "300"),
                ("min.cleanable.dirty.ratio", "0.01"),
                ("min.compaction.lag.ms", "0"),
                ("delete.retention.ms", "0"),
            ],
        )],
    );
    let stack = Stack::start_on(broker).await;
    let mut c = Cluster::start_on(stack, &["--worker-timeout", "2s"]);
    for name in ["w-drained", "w-killed", "w-live"] {
        c.add_worker(name, &["--label", "zone=test"]).await;
    }
    let workers_topic = format!("{}.workers", c.stack.broker.prefix);

    // A lost worker and a drained one; the third keeps beating.
    c.worker("w-killed").kill();
    c.wait_worker("w-killed", "lost").await;
    let drained = c.worker("w-drained").pid();
    signal(drained.into(), "-TERM");
    assert!(common::exits_within(c.worker("w-drained"), Duration::from_secs(30)).await);
    // Compaction has happened once the topic holds fewer records than offsets used.
    let broker = &c.stack.broker;
    let topic = &workers_topic;
    let (kept, offsets) = eventually(
        "compaction of the workers topic",
        Duration::from_secs(120),
        || async move {
            let offsets: i64 = (0..12).map(|p| broker.watermarks(topic, p).1).sum();
            let kept = broker.read_all(topic).len() as i64;
            (kept * 2 < offsets).then_some((kept, offsets))
        },
    )
    .await;
    eprintln!("workers topic: {kept} records kept of {offsets} appended");
    for (_, w) in &mut c.workers {
        w.kill();
    }
    c.wait_worker("w-live", "lost").await;
    let broker = &c.stack.broker;

    let snapshot = |db: &Db| {
        let db_url = db.url.clone();
        async move {
            let (client, conn) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            let rows = client
                .query(
                    "SELECT id, state, last_heartbeat_at::text, doc::text FROM workers ORDER BY id",
                    &[],
                )
                .await
                .unwrap();
            rows.iter()
                .map(|r| {
                    let doc: Value = serde_json::from_str(r.get::<_, &str>(3)).unwrap();
                    (r.get::<_, String>(0), r.get::<_, String>(1), doc)
                })
                .collect::<Vec<_>>()
        }
    };
    // Let the projection apply the last record (the live worker's final heartbeat).
    let db = &c.stack.db;
    let high: i64 = (0..12).map(|p| broker.watermarks(topic, p).1).sum();
    eventually(
        "the workers projection to reach the end of the topic",
        Duration::from_secs(60),
        || async move { (common::applied_offsets(db, topic).await? >= high).then_some(()) },
    )
    .await;
    let before = snapshot(&c.stack.db).await;
    assert_eq!(before.len(), 3);
    let states: BTreeMap<&str, &str> = before
        .iter()
        .map(|(id, state, _)| (id.as_str(), state.as_str()))
        .collect();
    assert_eq!(states["w-killed"], "lost");
    assert_ne!(states["w-drained"], "active", "{states:?}");

    // Rebuild from offset 0 into a fresh database.
    let fresh = Db::create().await;
    // A group of its own: the running projector keeps its partitions.
    let group = format!("{}-rebuild", c.stack.broker.prefix);
    let _rebuilt = Proc::wrap(
        role(&c.stack.broker, &fresh, &["projector", "--group", &group])
            .spawn()
            .expect("spawn projector"),
        "projector",
    );
    let fresh_ref = &fresh;
    eventually(
        "the rebuilt workers projection",
        Duration::from_secs(60),
        || async move { (common::applied_offsets(fresh_ref, topic).await? >= high).then_some(()) },
    )
    .await;
    let after = snapshot(&fresh).await;
    assert_eq!(
        after, before,
        "the rebuild equals the projection before compaction"
    );
}

/// When the projection's next offsets per partition were read.
type Sample = (Instant, HashMap<i32, i64>);

/// `tasklog projector --metrics-addr`: its `/metrics` URL.
fn start_projector_with_metrics(broker: &Broker, db: &Db) -> (Proc, String) {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let child = role(
        broker,
        db,
        &[
            "projector",
            "--session-timeout-ms",
            "6000",
            "--metrics-addr",
            &addr,
        ],
    )
    .spawn()
    .expect("spawn projector");
    (
        Proc::wrap(child, "projector"),
        format!("http://{addr}/metrics"),
    )
}

/// The partitions of `topic` a projector process owns, from its metrics.
async fn owned_partitions(
    http: &reqwest::Client,
    metrics: &str,
    topic: &str,
) -> Option<BTreeSet<i32>> {
    let text = http.get(metrics).send().await.ok()?.text().await.ok()?;
    let needle = format!("topic=\"{topic}\"");
    Some(
        text.lines()
            .filter(|l| {
                l.starts_with("tasklog_projector_partition_assigned{") && l.contains(&needle)
            })
            .filter(|l| l.ends_with(" 1"))
            .filter_map(|l| {
                let start = l.find("partition=\"")? + "partition=\"".len();
                l[start..].split('"').next()?.parse().ok()
            })
            .collect(),
    )
}

/// Waits until the live projectors own every partition of `topic` between them, each
/// at least one and none twice.
async fn wait_spread(http: &reqwest::Client, members: &[&str], topic: &str) -> Vec<BTreeSet<i32>> {
    eventually(
        &format!(
            "the partitions of {topic} spread over {} members",
            members.len()
        ),
        Duration::from_secs(90),
        || async move {
            let mut owned = Vec::new();
            for m in members {
                owned.push(owned_partitions(http, m, topic).await?);
            }
            let all: Vec<i32> = owned.iter().flatten().copied().collect();
            let distinct: BTreeSet<i32> = all.iter().copied().collect();
            (all.len() == 12 && distinct.len() == 12 && owned.iter().all(|o| !o.is_empty()))
                .then_some(owned)
        },
    )
    .await
}

/// Three `tasklog projector` processes in one consumer group (cooperative-sticky) on
/// 12 partitions. During 20,000 submissions and a stream of log lines, one is
/// SIGKILLed and another started: every record is applied exactly once, by the task
/// projection and by the log indexer alike, and the partitions spread over the live
/// members. Prints how long the rebalance paused the moved partitions and the others.
#[tokio::test(flavor = "multi_thread")]
async fn projectors_scale_out_and_a_sigkilled_member_loses_and_repeats_nothing() {
    let mut s = Stack::start().await;
    s.projector.kill();
    let http = reqwest::Client::new();
    let mut members: Vec<(Proc, String)> = (0..3)
        .map(|_| start_projector_with_metrics(&s.broker, &s.db))
        .collect();
    let events_topic = s.broker.events_topic();
    let logs_topic = format!("{}.logs", s.broker.prefix);
    {
        let urls: Vec<&str> = members.iter().map(|(_, m)| m.as_str()).collect();
        wait_spread(&http, &urls, &events_topic).await;
        wait_spread(&http, &urls, &logs_topic).await;
    }

    // One task per logs partition, whose lines stream throughout.
    let mut log_tasks: BTreeMap<i32, Uuid> = BTreeMap::new();
    let mut submitted = 0usize;
    while log_tasks.len() < 12 {
        let id = submit(&s, json!({"shell": "true"})).await;
        submitted += 1;
        let p = tasklog::kafka::partition_for_key(id.to_string().as_bytes(), 12);
        log_tasks.entry(p).or_insert(id);
    }
    let writer = Arc::new(log_writer(&s.broker));
    let written = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let lines_task = {
        let (writer, written, done) = (writer.clone(), written.clone(), done.clone());
        let ids: Vec<Uuid> = log_tasks.values().copied().collect();
        tokio::spawn(async move {
            let mut round = 0i64;
            while !done.load(Ordering::SeqCst) {
                for id in &ids {
                    write_lines(&writer, *id, round * 50 + 1, 50).await;
                }
                written.fetch_add(50, Ordering::SeqCst);
                round += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // Per partition, when its applied offset last moved: sampled every 50 ms.
    let progress: Arc<std::sync::Mutex<Vec<Sample>>> = Arc::default();
    let sampler = {
        let (url, topic, progress, done) = (
            s.db.url.clone(),
            events_topic.clone(),
            progress.clone(),
            done.clone(),
        );
        tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            while !done.load(Ordering::SeqCst) {
                if let Ok(rows) = client
                    .query(
                        "SELECT partition, next_offset FROM projection_offsets WHERE topic = $1",
                        &[&topic],
                    )
                    .await
                {
                    let offsets = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
                    progress.lock().unwrap().push((Instant::now(), offsets));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // 20 batches of 1000, one every 750 ms; the kill comes after the fifth.
    let mut killed_at = None;
    let mut moved = BTreeSet::new();
    for batch in 0..20 {
        let tasks: Vec<Value> = (0..1000)
            .map(|i| json!({"name": format!("scale-{batch}-{i}"), "shell": "true"}))
            .collect();
        let (status, body) = s.post("/v1/tasks/batch", &json!({"tasks": tasks})).await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["accepted"], 1000);
        submitted += 1000;
        if batch == 4 {
            moved = owned_partitions(&http, &members[0].1, &events_topic)
                .await
                .expect("metrics of the first member");
            members[0].0.kill();
            killed_at = Some(Instant::now());
            members.push(start_projector_with_metrics(&s.broker, &s.db));
        }
        tokio::time::sleep(Duration::from_millis(750)).await;
    }
    done.store(true, Ordering::SeqCst);
    lines_task.await.unwrap();
    sampler.await.unwrap();
    let killed_at = killed_at.unwrap();

    // Exactly once: the projection holds every record of the topic, once.
    let records = s.broker.read_all(&events_topic);
    assert_eq!(records.len(), submitted);
    s.wait_projected_topic(&events_topic, submitted as i64)
        .await;
    let rows =
        s.db.client()
            .await
            .query("SELECT partition, \"offset\" FROM task_events", &[])
            .await
            .unwrap();
    let applied: HashSet<(i32, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(rows.len(), submitted, "each record applied once");
    let on_log: HashSet<(i32, i64)> = records.iter().map(|r| (r.partition, r.offset)).collect();
    assert_eq!(applied, on_log);
    // The log index counted every line once.
    let per_task = written.load(Ordering::SeqCst) as i64;
    for id in log_tasks.values() {
        let db = &s.db;
        let id = *id;
        eventually(
            "every line indexed",
            Duration::from_secs(60),
            || async move { (indexed_lines(db, id).await >= per_task).then_some(()) },
        )
        .await;
        assert_eq!(indexed_lines(&s.db, id).await, per_task, "task {id}");
    }

    // The live members share the partitions of both topics.
    let live: Vec<&str> = members[1..].iter().map(|(_, m)| m.as_str()).collect();
    let spread = wait_spread(&http, &live, &events_topic).await;
    wait_spread(&http, &live, &logs_topic).await;

    // How long the rebalance paused the projection.
    let samples = progress.lock().unwrap().clone();
    let resumed = |p: i32| {
        let at_kill = samples
            .iter()
            .rev()
            .find(|(t, _)| *t <= killed_at)
            .and_then(|(_, o)| o.get(&p).copied())
            .unwrap_or(0);
        samples
            .iter()
            .find(|(t, o)| *t > killed_at && o.get(&p).copied().unwrap_or(0) > at_kill)
            .map(|(t, _)| *t - killed_at)
    };
    let moved_pause = moved.iter().filter_map(|p| resumed(*p)).max();
    let mut kept_pause = Duration::ZERO;
    for p in (0..12).filter(|p| !moved.contains(p)) {
        let mut last: Option<(Instant, i64)> = None;
        for (t, o) in samples.iter().filter(|(t, _)| *t >= killed_at) {
            let v = o.get(&p).copied().unwrap_or(0);
            match last {
                Some((since, prev)) if v == prev => {
                    kept_pause = kept_pause.max(*t - since);
                }
                _ => last = Some((*t, v)),
            }
        }
    }
    eprintln!(
        "rebalance after SIGKILL of a member (session timeout 6 s): its {} partitions resumed after {:?}; \
         the other partitions paused at most {kept_pause:?}; final spread {spread:?}",
        moved.len(),
        moved_pause
    );
    assert!(moved_pause.is_some(), "the moved partitions resumed");
}

/// Three brokers (KRaft, combined roles), every topic replicated three times with
/// `min.insync.replicas=2`. SIGKILL the leader of the events partitions during
/// submission: nothing acknowledged is lost and the projection equals the log.
#[tokio::test(flavor = "multi_thread")]
async fn replication_survives_a_sigkilled_leader() {
    let mut broker = Broker::own(3);
    // Every partition of the events topic has three replicas.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .create()
        .unwrap();
    let events_topic = broker.events_topic();
    let metadata = consumer
        .fetch_metadata(Some(&events_topic), Duration::from_secs(10))
        .unwrap();
    let partitions = metadata.topics()[0].partitions();
    assert_eq!(partitions.len(), 12);
    assert!(partitions.iter().all(|p| p.replicas().len() == 3));
    // The broker leading the most events partitions.
    let mut leads: BTreeMap<i32, usize> = BTreeMap::new();
    for p in partitions {
        *leads.entry(p.leader()).or_default() += 1;
    }
    let leader = *leads.iter().max_by_key(|(_, n)| **n).unwrap().0;
    let config = topic_config(&broker, &events_topic).await;
    assert_eq!(config["min.insync.replicas"], "2");

    let db = Db::create().await;
    let (_server, url) = common::start_server(&broker, &db, &[]).await;
    let _projector = start_projector(&broker, &db);
    const TOTAL: usize = 6_000;
    let submitters = Submitters::start(&url, "rep", TOTAL, 8);
    submitters
        .wait_acknowledged(1_500, Duration::from_secs(120))
        .await;
    let node = broker
        .nodes
        .iter_mut()
        .find(|n| n.id as i32 == leader)
        .unwrap();
    node.kill();
    let killed_at = Instant::now();

    let mut accepted = HashSet::new();
    let mut after_kill = 0;
    for o in submitters.finish().await {
        match o.status {
            202 => {
                accepted.insert(o.body["id"].as_str().unwrap().to_string());
                if o.at > killed_at {
                    after_kill += 1;
                }
            }
            503 => assert_eq!(o.body["error"]["code"], "broker_unavailable", "{}", o.body),
            other => panic!("{} answered {other}: {}", o.name, o.body),
        }
    }
    assert!(
        after_kill > 1_000,
        "only {after_kill} acknowledged after the leader died"
    );

    let records = broker.read_all(&events_topic);
    let on_log: HashSet<String> = records
        .iter()
        .map(|r| r.header("ce_subject").unwrap().to_string())
        .collect();
    assert_eq!(on_log.len(), records.len(), "no record twice");
    assert!(accepted.is_subset(&on_log), "an acknowledged task was lost");
    let db_ref = &db;
    let expected = records.len() as i64;
    eventually(
        "the projection to apply the whole log",
        Duration::from_secs(120),
        || async move { (db_ref.count("SELECT count(*) FROM tasks").await >= expected).then_some(()) },
    )
    .await;
    let rows = db
        .client()
        .await
        .query("SELECT id::text FROM tasks", &[])
        .await
        .unwrap();
    let projected: HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(projected, on_log, "the projection equals the log");
    assert_eq!(db.count("SELECT count(*) FROM task_events").await, expected);
}
