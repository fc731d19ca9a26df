//! Running tasks: priority and aging, resources and labels, backfill, dependencies,
//! timeout, cancel, worker loss, scheduler failover, a 200k-line task, and tasks run
//! by an external executor — all with real processes.

mod common;

use std::time::Duration;

use common::{Cluster, eventually, gated, micros, start_scheduler};
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

fn first_attempt(t: &Value) -> &Value {
    &t["attempts"][0]
}

fn started_at(t: &Value) -> i64 {
    micros(&first_attempt(t)["started_at"])
}

/// On a one-slot worker, queued tasks start by priority, then submission order.
#[tokio::test(flavor = "multi_thread")]
async fn priority_orders_a_one_slot_worker() {
    let mut c = Cluster::start(&["--aging-per-minute", "0"]).await;
    c.add_worker("solo", &["--cpu", "1"]).await;
    let gate = tempfile::tempdir().unwrap();
    let open = gate.path().join("open");
    let blocker = c
        .submit(json!({"shell": gated(&open, "true"), "resources": {"cpu": 1}}))
        .await;
    c.wait_state(&blocker, "running", MINUTE).await;
    let mut ids = Vec::new();
    for (name, priority) in [("low", 10), ("mid-1", 50), ("high", 90), ("mid-2", 50)] {
        ids.push((
            name,
            c.submit(json!({"name": name, "shell": "true", "priority": priority, "resources": {"cpu": 1}}))
                .await,
        ));
    }
    for (_, id) in &ids {
        c.wait_state(id, "queued", MINUTE).await;
    }
    std::fs::write(&open, b"").unwrap();
    let mut starts = Vec::new();
    for (name, id) in &ids {
        let t = c.wait_state(id, "succeeded", MINUTE).await;
        assert_eq!(first_attempt(&t)["worker_id"], "solo");
        starts.push((started_at(&t), *name));
    }
    starts.sort();
    let order: Vec<&str> = starts.iter().map(|(_, n)| *n).collect();
    assert_eq!(order, ["high", "mid-1", "mid-2", "low"]);
}

/// Aging bounds the wait: with rate r per minute, a priority-0 task is overtaken only
/// by tasks that entered the queue less than 100/r minutes after it.
#[tokio::test(flavor = "multi_thread")]
async fn aging_lets_a_low_priority_task_through_a_stream_of_high_ones() {
    // r = 3000/min: the bound is 100/3000 min = 2 s.
    let bound_ms: i64 = 2_000;
    let mut c = Cluster::start(&["--aging-per-minute", "3000"]).await;
    c.add_worker("solo", &["--cpu", "1"]).await;
    let gate = tempfile::tempdir().unwrap();
    let open = gate.path().join("open");
    let blocker = c
        .submit(json!({"shell": gated(&open, "true"), "priority": 100}))
        .await;
    c.wait_state(&blocker, "running", MINUTE).await;
    let low = c
        .submit(json!({"name": "low", "shell": "true", "priority": 0}))
        .await;
    let low_queued = micros(&c.wait_state(&low, "queued", MINUTE).await["queued_at"]);

    // High-priority tasks arrive faster than the slot can serve them. The slot stays
    // taken until some of them entered the queue past the bound (so the low task has
    // both kinds ahead of it), then the stream goes on until the low one has run.
    let mut highs = Vec::new();
    let stream_started = std::time::Instant::now();
    let bound = Duration::from_millis(bound_ms as u64);
    let mut gate_open = false;
    loop {
        highs.push(
            c.submit(json!({"name": "high", "shell": "sleep 0.2", "priority": 100}))
                .await,
        );
        if !gate_open
            && highs.len() >= 5
            && stream_started.elapsed() > bound + Duration::from_secs(1)
        {
            std::fs::write(&open, b"").unwrap();
            gate_open = true;
        }
        if gate_open {
            let (_, t) = c.stack.get(&format!("/v1/tasks/{low}")).await;
            if t["state"] == "succeeded" {
                break;
            }
        }
        assert!(
            stream_started.elapsed() < Duration::from_secs(90),
            "the low-priority task never ran"
        );
        // The stream's pace (ten a second), not a wait for a condition.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let low_task = c.wait_state(&low, "succeeded", MINUTE).await;
    let low_started = started_at(&low_task);
    let mut before = 0;
    let mut late_ones = 0;
    for id in &highs {
        let t = c.stack.task(id).await;
        let queued = micros(&t["queued_at"]);
        let ran_before = t["attempts"][0]["started_at"].is_string() && started_at(&t) < low_started;
        if ran_before {
            before += 1;
        }
        if queued - low_queued > bound_ms * 1000 + 50_000 {
            late_ones += 1;
            assert!(
                !ran_before,
                "a task queued {} ms after the low one ran before it (bound {bound_ms} ms)",
                (queued - low_queued) / 1000
            );
        }
    }
    assert!(
        before > 0,
        "priority still counts: some high tasks go first"
    );
    assert!(late_ones > 0, "the stream outlasted the bound");
}

/// A gpu task waits for the only gpu worker and never lands on a cpu-only one; labels
/// must all match; a task nothing could ever fit fails with no_capacity.
#[tokio::test(flavor = "multi_thread")]
async fn resources_and_labels_decide_placement() {
    let mut c = Cluster::start(&["--no-capacity-after", "1s"]).await;
    c.add_worker("cpu-only", &["--cpu", "4"]).await;
    c.add_worker(
        "gpu-box",
        &["--cpu", "2", "--gpu", "1", "--label", "zone=a"],
    )
    .await;
    let gate = tempfile::tempdir().unwrap();
    let open = gate.path().join("open");
    let first = c
        .submit(json!({"shell": gated(&open, "true"), "resources": {"gpu": 1, "cpu": 0.5}}))
        .await;
    let first_running = c.wait_state(&first, "running", MINUTE).await;
    assert_eq!(first_running["worker_id"], "gpu-box");
    let zone_a = c
        .submit(json!({"shell": "true", "selector": {"zone": "a"}, "resources": {"cpu": 1}}))
        .await;
    let big = c
        .submit(json!({"shell": "true", "resources": {"cpu": 3}}))
        .await;
    let zone_b = c
        .submit(json!({"shell": "true", "resources": {"cpu": 1, "labels": {"zone": "b"}}}))
        .await;
    let huge = c
        .submit(json!({"shell": "true", "resources": {"cpu": 64}}))
        .await;

    // Submitted last: a blocked task holds its worker (no backfill onto it), and the
    // tasks above must not wait behind it.
    let second = c
        .submit(json!({"shell": "true", "resources": {"gpu": 1, "cpu": 0.5}}))
        .await;
    let t = c.wait_state(&zone_a, "succeeded", MINUTE).await;
    assert_eq!(first_attempt(&t)["worker_id"], "gpu-box");
    let t = c.wait_state(&big, "succeeded", MINUTE).await;
    assert_eq!(first_attempt(&t)["worker_id"], "cpu-only");
    for id in [&zone_b, &huge] {
        let t = c.wait_state(id, "failed", MINUTE).await;
        assert_eq!(t["reason"], "no_capacity", "{t}");
        assert!(t["attempts"].as_array().is_none_or(Vec::is_empty));
    }
    // The second gpu task is still waiting: the only gpu is taken.
    let t = c.stack.task(&second).await;
    assert_eq!(t["state"], "queued", "{t}");
    std::fs::write(&open, b"").unwrap();
    let first_done = c.wait_state(&first, "succeeded", MINUTE).await;
    let t = c.wait_state(&second, "succeeded", MINUTE).await;
    assert_eq!(first_attempt(&t)["worker_id"], "gpu-box");
    assert!(
        micros(&first_attempt(&t)["assigned_at"])
            >= micros(&first_attempt(&first_done)["finished_at"]),
        "the second gpu task was placed only after the first ended"
    );
}

/// The head that does not fit holds its worker; smaller tasks backfill elsewhere, and
/// none is placed on the held worker before the head starts.
#[tokio::test(flavor = "multi_thread")]
async fn backfill_does_not_starve_the_head() {
    let mut c = Cluster::start(&["--aging-per-minute", "0"]).await;
    c.add_worker("big", &["--cpu", "2"]).await;
    let gate = tempfile::tempdir().unwrap();
    let open = gate.path().join("open");
    let small_running = c
        .submit(json!({"shell": gated(&open, "true"), "priority": 90, "resources": {"cpu": 1}}))
        .await;
    c.wait_state(&small_running, "running", MINUTE).await;
    let head = c
        .submit(json!({"name": "head", "shell": "true", "priority": 80, "resources": {"cpu": 2}}))
        .await;
    c.wait_state(&head, "queued", MINUTE).await;
    c.add_worker("little", &["--cpu", "1"]).await;
    let mut smalls = Vec::new();
    for _ in 0..4 {
        smalls.push(
            c.submit(json!({"shell": "sleep 0.2", "priority": 50, "resources": {"cpu": 1}}))
                .await,
        );
    }
    // Backfill: the smaller tasks run on the other worker while the head waits.
    let first_small = c.wait_state(&smalls[0], "succeeded", MINUTE).await;
    assert_eq!(first_attempt(&first_small)["worker_id"], "little");
    let (_, h) = c.stack.get(&format!("/v1/tasks/{head}")).await;
    assert_eq!(h["state"], "queued", "the head waits for its worker: {h}");
    std::fs::write(&open, b"").unwrap();
    let h = c.wait_state(&head, "succeeded", MINUTE).await;
    assert_eq!(first_attempt(&h)["worker_id"], "big");
    let head_assigned = micros(&first_attempt(&h)["assigned_at"]);
    for id in &smalls {
        let t = c.wait_state(id, "succeeded", MINUTE).await;
        if first_attempt(&t)["worker_id"] == "big" {
            assert!(
                micros(&first_attempt(&t)["assigned_at"]) > head_assigned,
                "a small task took the held worker before the head: {t}"
            );
        }
    }
}

/// Chains, fan-in and a failure that cancels everything downstream.
#[tokio::test(flavor = "multi_thread")]
async fn dependencies_chain_fan_in_and_cascade() {
    let mut c = Cluster::start(&[]).await;
    c.add_worker("w", &["--cpu", "4"]).await;
    let a = c.submit(json!({"name": "a", "shell": "sleep 0.2"})).await;
    let b = c
        .submit(json!({"name": "b", "shell": "true", "after": [a]}))
        .await;
    let d = c.submit(json!({"name": "d", "shell": "sleep 0.1"})).await;
    let e = c.submit(json!({"name": "e", "shell": "sleep 0.3"})).await;
    let f = c
        .submit(json!({"name": "f", "shell": "true", "after": [b, d, e]}))
        .await;
    let g = c.submit(json!({"name": "g", "shell": "exit 3"})).await;
    let h = c
        .submit(json!({"name": "h", "shell": "true", "after": [g]}))
        .await;
    let i = c
        .submit(json!({"name": "i", "shell": "true", "after": [h, a]}))
        .await;
    let f_done = c.wait_state(&f, "succeeded", MINUTE).await;
    for dep in [&b, &d, &e] {
        let t = c.wait_state(dep, "succeeded", MINUTE).await;
        assert!(
            micros(&t["finished_at"]) <= micros(&first_attempt(&f_done)["assigned_at"]),
            "f ran before its dependency {dep} ended"
        );
    }
    let a_done = c.wait_state(&a, "succeeded", MINUTE).await;
    let b_done = c.wait_state(&b, "succeeded", MINUTE).await;
    assert!(micros(&a_done["finished_at"]) <= micros(&first_attempt(&b_done)["assigned_at"]));
    // Both waited in pending and were queued by the scheduler (queued is legal only
    // from pending).
    for id in [&b, &f] {
        assert_eq!(c.event_types(id).await[1], "dev.tasklog.task.queued.v1");
    }

    let g_done = c.wait_state(&g, "failed", MINUTE).await;
    assert_eq!(g_done["exit_code"], 3);
    for id in [&h, &i] {
        let t = c.wait_state(id, "cancelled", MINUTE).await;
        assert_eq!(t["reason"], "dependency_failed", "{t}");
        assert!(t["attempts"].as_array().is_none_or(Vec::is_empty), "{t}");
    }
}

/// The spec's timeout ends the attempt.
#[tokio::test(flavor = "multi_thread")]
async fn timeout_ends_the_attempt() {
    let mut c = Cluster::start(&[]).await;
    c.add_worker("w", &["--kill-grace", "1s"]).await;
    let id = c
        .submit(json!({"shell": "echo begin; sleep 30", "timeout": "1s"}))
        .await;
    let t = c.wait_state(&id, "failed", MINUTE).await;
    assert_eq!(t["reason"], "timeout", "{t}");
    let attempt = first_attempt(&t);
    assert_eq!(attempt["reason"], "timeout");
    let ran = attempt["duration_ms"].as_u64().unwrap();
    assert!((1000..10_000).contains(&ran), "ran {ran} ms");
    let (_, logs) = c.stack.get(&format!("/v1/tasks/{id}/logs")).await;
    assert_eq!(logs["lines"][0]["text"], "begin");
}

fn process_exists(pid: u64) -> bool {
    // A zombie (not reaped by a pid-1 that does not reap) is gone for our purposes.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Cancelling a queued task ends it at once; cancelling a running one stops its process
/// group (SIGTERM, grace, SIGKILL) and keeps the lines it printed.
#[tokio::test(flavor = "multi_thread")]
async fn cancel_of_a_queued_and_of_a_running_task() {
    let mut c = Cluster::start(&[]).await;
    c.add_worker("w", &["--cpu", "1", "--kill-grace", "1s"])
        .await;
    let running = c
        .submit(json!({"shell": "trap '' TERM; echo one; echo two; sleep 60 & wait; sleep 60"}))
        .await;
    let queued = c.submit(json!({"shell": "true"})).await;
    let t = c.wait_state(&running, "running", MINUTE).await;
    let pid = first_attempt(&t)["pid"].as_u64().expect("pid");
    assert!(process_exists(pid));
    let q = c.stack.task(&queued).await;
    assert_eq!(q["state"], "queued");
    let (status, body) = c
        .stack
        .post(
            &format!("/v1/tasks/{queued}/cancel"),
            &json!({"reason": "user"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["task"]["state"], "cancelled");

    // Lines first, so they are on the log before the cancel.
    eventually("two lines logged", MINUTE, || async {
        let (_, logs) = c.stack.get(&format!("/v1/tasks/{running}/logs")).await;
        (logs["lines"].as_array().map(Vec::len) == Some(2)).then_some(())
    })
    .await;
    let (status, _) = c
        .stack
        .post(&format!("/v1/tasks/{running}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202);
    let t = c.wait_state(&running, "cancelled", MINUTE).await;
    let attempt = first_attempt(&t);
    assert_eq!(attempt["outcome"], "cancelled");
    assert_eq!(
        attempt["signal"], 9,
        "TERM was trapped, so KILL after the grace: {t}"
    );
    assert!(!process_exists(pid), "process {pid} is gone");
    let (_, logs) = c.stack.get(&format!("/v1/tasks/{running}/logs")).await;
    let texts: Vec<&str> = logs["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["text"].as_str())
        .collect();
    assert_eq!(texts, ["one", "two"]);
}

/// A SIGKILLed worker stops heartbeating: it is declared lost and its attempt ends
/// with reason interruption.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_is_lost_and_its_attempts_interrupted() {
    let mut c = Cluster::start(&["--worker-timeout", "3s"]).await;
    c.add_worker("doomed", &[]).await;
    let id = c.submit(json!({"shell": "sleep 120"})).await;
    c.wait_state(&id, "running", MINUTE).await;
    c.worker("doomed").kill();
    let t = c.wait_state(&id, "failed", MINUTE).await;
    assert_eq!(t["reason"], "interruption", "{t}");
    assert_eq!(first_attempt(&t)["reason"], "interruption");
    let w = c.wait_worker("doomed", "lost").await;
    assert_eq!(w["reason"], "heartbeat_timeout");
    let lost_events = c
        .stack
        .broker
        .read_all(&format!("{}.workers", c.stack.broker.prefix))
        .into_iter()
        .filter(|r| r.header("ce_type") == Some("dev.tasklog.worker.lost.v1"))
        .count();
    assert_eq!(lost_events, 1);
}

async fn leads(http: &reqwest::Client, metrics: &str) -> bool {
    match http.get(metrics).send().await {
        Ok(r) => r
            .text()
            .await
            .unwrap_or_default()
            .lines()
            .any(|l| l.trim() == "tasklog_scheduler_leader 1"),
        Err(_) => false,
    }
}

/// Two schedulers; the leader is SIGKILLed while it places work. The standby takes
/// over within seconds, and no attempt is placed or run twice.
#[tokio::test(flavor = "multi_thread")]
async fn scheduler_failover_places_nothing_twice() {
    let ports = [common::free_port(), common::free_port()];
    let addr = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let metrics = |i: usize| format!("http://127.0.0.1:{}/metrics", ports[i]);
    let mut c = Cluster::start(&["--metrics-addr", &addr(0)]).await;
    let standby = start_scheduler(&c.stack.broker, &c.stack.db, &["--metrics-addr", &addr(1)]);
    c.schedulers.push(standby);
    let http = reqwest::Client::new();
    let leader = eventually("a leader", MINUTE, || {
        let http = &http;
        async move {
            for i in 0..2 {
                if leads(http, &metrics(i)).await {
                    return Some(i);
                }
            }
            None
        }
    })
    .await;
    c.add_worker("w", &["--cpu", "8"]).await;
    let mut ids = Vec::new();
    for i in 0..60 {
        ids.push(
            c.submit(
                json!({"name": format!("t{i}"), "shell": "sleep 0.05", "resources": {"cpu": 1}}),
            )
            .await,
        );
    }
    eventually("some tasks succeeded", MINUTE, || async {
        let n = c
            .stack
            .db
            .count("SELECT count(*) FROM tasks WHERE state = 'succeeded'")
            .await;
        (n >= 5).then_some(())
    })
    .await;
    c.schedulers[leader].kill();
    let killed = std::time::Instant::now();
    let other = 1 - leader;
    eventually("the standby leads", MINUTE, || {
        let (http, m) = (&http, metrics(other));
        async move { leads(http, &m).await.then_some(()) }
    })
    .await;
    let takeover = killed.elapsed();
    assert!(
        takeover < Duration::from_secs(10),
        "took over in {takeover:?}"
    );
    for id in &ids {
        c.wait_state(id, "succeeded", Duration::from_secs(120))
            .await;
    }
    let client = c.stack.db.client().await;
    let rows = client
        .query(
            "SELECT task_id, count(*) FILTER (WHERE type = 'dev.tasklog.task.assigned.v1'),
                    count(*) FILTER (WHERE type = 'dev.tasklog.task.started.v1')
             FROM task_events GROUP BY task_id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), ids.len());
    for r in rows {
        let (assigned, started): (i64, i64) = (r.get(1), r.get(2));
        assert_eq!(
            (assigned, started),
            (1, 1),
            "task {:?}",
            r.get::<_, uuid::Uuid>(0)
        );
    }
}

/// `seq 1 200000` as fast as it can: when the task has succeeded, its log is complete
/// and in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_task_printing_200k_lines_has_its_whole_log_when_it_succeeds() {
    let mut c = Cluster::start(&[]).await;
    c.add_worker("w", &[]).await;
    let id = c.submit(json!({"shell": "seq 1 200000"})).await;
    c.wait_state(&id, "succeeded", Duration::from_secs(180))
        .await;
    let mut next = 1u64;
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/tasks/{id}/logs?limit=5000");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (status, page) = c.stack.get(&path).await;
        assert_eq!(status, 200, "{page}");
        let lines = page["lines"].as_array().unwrap();
        for l in lines {
            assert_eq!(l["text"].as_str(), Some(next.to_string().as_str()));
            assert_eq!(l["line"], next);
            next += 1;
        }
        match page["next_cursor"].as_str() {
            Some(n) if !lines.is_empty() => cursor = Some(n.to_string()),
            _ => break,
        }
    }
    assert_eq!(next - 1, 200_000, "every line, once, in order");
}

/// A task run by an outside system: never scheduled; its lifecycle comes from events
/// produced with kcat and goes through the same fold.
#[tokio::test(flavor = "multi_thread")]
async fn external_executor_lifecycle_from_kcat() {
    let mut c = Cluster::start(&[]).await;
    c.add_worker("w", &[]).await;
    let id = c
        .submit(json!({"name": "spark-job", "executor": "external", "command": ["spark-submit", "job.py"]}))
        .await;
    // A normal task submitted after it runs; the external one stays queued.
    let normal = c.submit(json!({"shell": "true"})).await;
    c.wait_state(&normal, "succeeded", MINUTE).await;
    let t = c.stack.task(&id).await;
    assert_eq!(t["state"], "queued", "never scheduled: {t}");

    let kcat = |seq: u64, ce_type: &str, extra: &str| {
        let value = format!(r#"{{"task_id":"{id}","seq":{seq}{extra}}}"#);
        let ce_id = uuid::Uuid::new_v4().to_string();
        common::kcat_event(
            &c.stack.broker,
            &id,
            &ce_id,
            ce_type,
            "spark://cluster-1",
            &value,
        )
    };
    kcat(
        2,
        "dev.tasklog.task.started.v1",
        r#","attempt":1,"worker_id":"spark-driver-7""#,
    );
    let t = c.wait_state(&id, "running", MINUTE).await;
    assert_eq!(first_attempt(&t)["worker_id"], "spark-driver-7");
    // An outcome for the wrong attempt is refused by the fold (and dead-lettered).
    kcat(
        3,
        "dev.tasklog.task.failed.v1",
        r#","attempt":2,"reason":"error""#,
    );
    kcat(
        3,
        "dev.tasklog.task.failed.v1",
        r#","attempt":1,"exit_code":2,"reason":"error","message":"stage 3 failed""#,
    );
    let t = c.wait_state(&id, "failed", MINUTE).await;
    assert_eq!(t["exit_code"], 2);
    assert_eq!(first_attempt(&t)["outcome"], "failed");
    assert_eq!(
        c.stack
            .db
            .count("SELECT count(*) FROM rejected_events WHERE reason = 'attempt_mismatch'")
            .await,
        1
    );
}

/// `tasklog run` follows the logs and exits with the task's exit code.
#[tokio::test(flavor = "multi_thread")]
async fn tasklog_run_exits_with_the_task_exit_code() {
    let mut c = Cluster::start(&[]).await;
    c.add_worker("w", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("task.yaml");
    std::fs::write(&spec, "shell: 'echo out; echo err >&2; exit 7'\n").unwrap();
    let output = common::finish(
        std::process::Command::new(common::bin())
            .args(["run", "-f", spec.to_str().unwrap(), "--api", &c.stack.url])
            .env("TASKLOG_TOKEN", &c.stack.token)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped()),
    );
    assert_eq!(output.status.code(), Some(7));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("out") && stdout.contains("err"), "{stdout}");
}

/// On SIGTERM a worker appends `draining`, takes no new work, lets its attempt finish,
/// then exits; the scheduler places nothing more on it.
#[tokio::test(flavor = "multi_thread")]
async fn a_terminated_worker_drains() {
    let mut c = Cluster::start(&["--no-capacity-after", "60s"]).await;
    c.add_worker("leaving", &["--cpu", "2"]).await;
    let gate = tempfile::tempdir().unwrap();
    let open = gate.path().join("open");
    let running = c
        .submit(json!({"shell": gated(&open, "echo finished")}))
        .await;
    c.wait_state(&running, "running", MINUTE).await;
    let pid = c.worker("leaving").pid();
    common::signal(pid.into(), "-TERM");
    c.wait_worker("leaving", "draining").await;
    let later = c.submit(json!({"shell": "true"})).await;
    std::fs::write(&open, b"").unwrap();
    let t = c.wait_state(&running, "succeeded", MINUTE).await;
    assert_eq!(first_attempt(&t)["worker_id"], "leaving");
    assert!(
        common::exits_within(c.worker("leaving"), MINUTE).await,
        "the drained worker exits"
    );
    let (_, t) = c.stack.get(&format!("/v1/tasks/{later}")).await;
    assert_eq!(
        t["state"], "queued",
        "nothing new on a draining worker: {t}"
    );
    // Scheduling gauges from the API (attempt counters and latency histograms come
    // from the projector process, which observes every applied event).
    let metrics = c.stack.text("/metrics").await;
    for needle in [
        "tasklog_workers{state=\"draining\"} 1",
        "tasklog_queue_depth{band=\"50-74\"} 1",
        "tasklog_capacity{kind=\"free\",resource=\"cpu\"} 0",
    ] {
        assert!(metrics.contains(needle), "{needle} in\n{metrics}");
    }
}

/// The processes whose parent is `parent` and whose command line contains `needle`.
fn children_running(parent: u32, needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            ppid == Some(parent) && String::from_utf8_lossy(&cmdline).contains(needle)
        })
        .collect()
}

/// A SIGKILLed worker's watchdog stops its attempts at once: the whole process group,
/// a background grandchild included, not only when the worker comes back.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_workers_attempts_are_stopped_by_its_watchdog() {
    let mut c = Cluster::start(&["--worker-timeout", "120s"]).await;
    c.add_worker("mortal", &["--kill-grace", "1s"]).await;
    let id = c
        .submit(json!({"shell": "sleep 300 & echo \"child $!\"; wait"}))
        .await;
    let t = c.wait_state(&id, "running", MINUTE).await;
    let leader = first_attempt(&t)["pid"].as_u64().expect("pid");
    let grandchild: u64 = eventually("the child's pid on the log", MINUTE, || async {
        let (_, logs) = c.stack.get(&format!("/v1/tasks/{id}/logs")).await;
        logs["lines"]
            .as_array()?
            .iter()
            .find_map(|l| l["text"].as_str()?.strip_prefix("child ")?.parse().ok())
    })
    .await;
    assert!(process_exists(leader) && process_exists(grandchild));
    c.worker("mortal").kill();
    for pid in [leader, grandchild] {
        eventually("the attempt's processes are gone", MINUTE, || async move {
            (!process_exists(pid)).then_some(())
        })
        .await;
    }
}

/// A worker restarted after it and its watchdog were SIGKILLed stops the attempts its
/// crashed run left running (recorded in its ledger) and ends them as interrupted.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_worker_stops_what_its_crashed_run_left_behind() {
    // Loss detection is slow here, so the restart is what ends the attempt.
    let mut c = Cluster::start(&["--worker-timeout", "120s"]).await;
    c.add_worker("phoenix", &[]).await;
    let id = c.submit(json!({"shell": "exec sleep 300"})).await;
    let t = c.wait_state(&id, "running", MINUTE).await;
    let pid = first_attempt(&t)["pid"].as_u64().expect("pid");
    let worker_pid = c.worker("phoenix").pid();
    let watchdogs = children_running(worker_pid, "worker-watchdog");
    assert_eq!(watchdogs.len(), 1, "one watchdog per worker: {watchdogs:?}");
    common::signal(watchdogs[0].into(), "-9");
    c.worker("phoenix").kill();
    assert!(
        process_exists(pid),
        "without its watchdog, the attempt outlives its SIGKILLed worker"
    );
    c.add_worker("phoenix", &[]).await;
    let t = c.wait_state(&id, "failed", MINUTE).await;
    assert_eq!(t["reason"], "interruption", "{t}");
    eventually("the orphan is gone", MINUTE, || async move {
        (!process_exists(pid)).then_some(())
    })
    .await;
}
