//! Bounded drain on shutdown: `tasklog worker` and `tasklog up`, on SIGTERM or SIGINT,
//! let running attempts finish for `--drain-timeout`, then stop what still runs and end
//! those attempts as `interruption` (service replicas included), so their retry
//! policies place them elsewhere; a second signal stops them at once. Either way the
//! process exits 0 and prints no warnings or errors.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Broker, Cluster, Db, Proc, eventually, free_port, gated, role, signal};
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

/// What the drain may take beyond the time it is given: stopping the process groups
/// (the kill grace below), reporting the outcomes, and exiting.
const MARGIN: Duration = Duration::from_secs(5);

/// Retries an interruption (and nothing else) at once, for ever.
fn retry_interruptions() -> Value {
    json!({"on_events": ["interruption"], "duration": "off",
           "backoff": {"initial": "100ms", "max": "100ms", "jitter": 0}})
}

/// Starts worker `name` with its stderr captured, and waits until it is active.
async fn add_worker_capturing_stderr(c: &mut Cluster, name: &str, args: &[&str]) {
    let child = c
        .worker_command(name, args)
        // The harness kills what carries this marker when the test ends.
        .env("TASKLOG_TEST_RUN", &c.stack.broker.prefix)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn worker");
    c.workers
        .push((name.to_string(), Proc::wrap(child, "worker")));
    c.wait_worker(name, "active").await;
}

/// Sends `sig` to `p` and waits (up to a minute) for it to exit; returns how long that
/// took, its exit code and its stderr.
async fn stop(p: &mut Proc, sig: &str) -> (Duration, Option<i32>, String) {
    let sent = Instant::now();
    signal(p.pid().into(), sig);
    assert!(
        common::exits_within(p, MINUTE).await,
        "{} still runs a minute after {sig}",
        p.name
    );
    let took = sent.elapsed();
    let (code, stderr) = p.finish();
    (took, code, stderr)
}

/// Lines of `stderr` that warn or report an error (the roles run with RUST_LOG=warn,
/// so anything tracing or librdkafka prints here is one).
fn complaints(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.starts_with("error:"))
        .collect()
}

/// The events of task `id` on the events topic: (type, data), in order.
fn events_of(broker: &Broker, id: &str) -> Vec<(String, Value)> {
    let mut records: Vec<_> = broker
        .read_all(&broker.events_topic())
        .into_iter()
        .filter(|r| r.key.as_deref() == Some(id))
        .collect();
    records.sort_by_key(|r| r.offset);
    records
        .iter()
        .map(|r| {
            let ce_type = r.header("ce_type").unwrap_or_default().to_string();
            let data = serde_json::from_slice(&r.value).unwrap_or(Value::Null);
            (ce_type, data)
        })
        .collect()
}

/// Asserts the log ends attempt `attempt` of task `id` as an interruption, retried.
fn assert_interrupted_and_retried(broker: &Broker, id: &str, attempt: u64) {
    let events = events_of(broker, id);
    let ends: Vec<&(String, Value)> = events
        .iter()
        .filter(|(t, d)| {
            d["attempt"] == attempt
                && (t.ends_with(".failed.v1")
                    || t.ends_with(".retry_scheduled.v1")
                    || t.ends_with(".succeeded.v1")
                    || t.ends_with(".cancelled.v1"))
        })
        .collect();
    assert_eq!(ends.len(), 1, "one end of attempt {attempt}: {events:?}");
    let (ce_type, data) = ends[0];
    assert_eq!(
        ce_type, "dev.tasklog.task.retry_scheduled.v1",
        "retried: {data}"
    );
    assert_eq!(data["reason"], "interruption", "{data}");
}

/// A worker told to stop while an attempt and a service replica run forever waits out
/// its drain timeout, stops both, ends them as interruption, and exits 0 in silence;
/// their retry policies run them again on another worker.
#[tokio::test(flavor = "multi_thread")]
async fn a_terminated_worker_interrupts_what_outlives_its_drain_timeout() {
    // The worker is not declared lost meanwhile, and the retried attempts wait for the
    // next worker.
    let mut c = Cluster::start(&["--worker-timeout", "120s", "--no-capacity-after", "120s"]).await;
    add_worker_capturing_stderr(
        &mut c,
        "leaving",
        &["--drain-timeout", "2s", "--kill-grace", "1s"],
    )
    .await;
    let task = c
        .submit(json!({"shell": "exec sleep 600", "retry": retry_interruptions()}))
        .await;
    let (status, s) = c
        .stack
        .post(
            "/v1/services",
            &json!({"name": "forever", "replicas": 1,
                    "template": {"shell": "exec sleep 600", "resources": {"cpu": 0.1}},
                    "retry": retry_interruptions()}),
        )
        .await;
    assert_eq!(status, 201, "{s}");
    let running = c.wait_state(&task, "running", MINUTE).await;
    let pid = running["attempts"][0]["pid"].as_u64().expect("pid");
    let replica_task = eventually("the replica running", MINUTE, || async {
        let (_, s) = c.stack.get("/v1/services/forever").await;
        let r = s["replicas"].as_array()?.first()?.clone();
        (r["state"] == "running").then(|| r["task_id"].as_str().map(str::to_string))?
    })
    .await;

    let (took, code, stderr) = stop(c.worker("leaving"), "-TERM").await;
    assert_eq!(code, Some(0), "exit status; stderr:\n{stderr}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(2) + MARGIN,
        "exited {took:?} after SIGTERM with a 2 s drain timeout"
    );
    assert!(complaints(&stderr).is_empty(), "stderr:\n{stderr}");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the attempt's process is gone"
    );
    for id in [&task, &replica_task] {
        let t = c
            .wait_task(id, "pending again after the interruption", MINUTE, |t| {
                t["attempts"][0]["reason"] == "interruption"
            })
            .await;
        assert_eq!(t["attempts"][0]["worker_id"], "leaving", "{t}");
        assert_interrupted_and_retried(&c.stack.broker, id, 1);
    }
    // The retry policy places them on the next worker.
    c.add_worker("next", &[]).await;
    for id in [&task, &replica_task] {
        let t = c
            .wait_task(id, "attempt 2 running on next", MINUTE, |t| {
                t["state"] == "running" && t["attempt"] == 2
            })
            .await;
        assert_eq!(t["worker_id"], "next", "{t}");
    }
}

/// An attempt that ends within the drain timeout ends as it would have anyway
/// (succeeded, not interrupted), and the worker exits 0 once it has.
#[tokio::test(flavor = "multi_thread")]
async fn an_attempt_that_ends_within_the_drain_timeout_succeeds() {
    let mut c = Cluster::start(&[]).await;
    add_worker_capturing_stderr(&mut c, "patient", &["--drain-timeout", "60s"]).await;
    let gate = tempfile::tempdir().unwrap();
    let open = gate.path().join("open");
    let id = c
        .submit(json!({"shell": gated(&open, "echo finished")}))
        .await;
    c.wait_state(&id, "running", MINUTE).await;
    let sent = Instant::now();
    signal(c.worker("patient").pid().into(), "-TERM");
    c.wait_worker("patient", "draining").await;
    std::fs::write(&open, b"").unwrap();
    let t = c.wait_state(&id, "succeeded", MINUTE).await;
    assert_eq!(t["attempts"][0]["worker_id"], "patient", "{t}");
    assert!(
        common::exits_within(c.worker("patient"), MINUTE).await,
        "the drained worker exits"
    );
    assert!(
        sent.elapsed() < Duration::from_secs(60),
        "it exited once the attempt ended, not at the drain timeout: {:?}",
        sent.elapsed()
    );
    let (code, stderr) = c.worker("patient").finish();
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    assert!(complaints(&stderr).is_empty(), "stderr:\n{stderr}");
    let types: Vec<String> = events_of(&c.stack.broker, &id)
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(
        types.last().map(String::as_str),
        Some("dev.tasklog.task.succeeded.v1"),
        "{types:?}"
    );
    assert!(
        !types.iter().any(|t| t.ends_with(".failed.v1")),
        "{types:?}"
    );
}

/// A second signal skips the rest of the drain and the kill grace: an attempt that
/// ignores SIGTERM is SIGKILLed at once, still ends as interruption, and the worker
/// exits 0 in silence.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_stops_the_attempts_at_once() {
    let mut c = Cluster::start(&["--worker-timeout", "120s"]).await;
    add_worker_capturing_stderr(
        &mut c,
        "hurried",
        &["--drain-timeout", "300s", "--kill-grace", "300s"],
    )
    .await;
    let id = c
        .submit(json!({"shell": "trap '' TERM; echo up; sleep 600 & wait",
                       "retry": retry_interruptions()}))
        .await;
    c.wait_state(&id, "running", MINUTE).await;
    let pid = c.worker("hurried").pid();
    signal(pid.into(), "-INT");
    c.wait_worker("hurried", "draining").await;
    let (took, code, stderr) = stop(c.worker("hurried"), "-INT").await;
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    assert!(took < MARGIN, "exited {took:?} after the second signal");
    assert!(complaints(&stderr).is_empty(), "stderr:\n{stderr}");
    let t = c
        .wait_task(&id, "interrupted", MINUTE, |t| {
            t["attempts"][0]["reason"] == "interruption"
        })
        .await;
    assert_eq!(t["attempts"][0]["signal"], 9, "SIGKILLed: {t}");
    assert_interrupted_and_retried(&c.stack.broker, &id, 1);
}

/// `tasklog up` on a free port with a short drain; waits until it answers /readyz.
async fn start_up(
    broker: &Broker,
    db: &Db,
    state_dir: &std::path::Path,
    extra: &[&str],
) -> (Proc, String) {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let state_dir = state_dir.to_str().expect("UTF-8 temp dir");
    let mut args = vec![
        "up",
        "--http-addr",
        &addr,
        "--name",
        "up-worker",
        "--state-dir",
        state_dir,
        "--heartbeat",
        "500ms",
        "--drain-timeout",
        "2s",
        "--kill-grace",
        "1s",
        "--no-capacity-after",
        "120s",
    ];
    args.extend_from_slice(extra);
    let child = role(broker, db, &args)
        .env("TASKLOG_TEST_RUN", &broker.prefix)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tasklog up");
    let url = format!("http://{addr}");
    let http = reqwest::Client::new();
    let probe = format!("{url}/readyz");
    eventually("tasklog up to be ready", MINUTE, || {
        let r = http.get(&probe).send();
        async move { r.await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
    })
    .await;
    (Proc::wrap(child, "up"), url)
}

/// Submits to `up` a task and a one-replica service that run until stopped; returns
/// the two task ids once both run.
async fn run_forever_on(url: &str, state_dir: &std::path::Path) -> [String; 2] {
    let http = common::client_with_token(&common::up_token(state_dir));
    let post = |path: &str, body: Value| {
        let r = http.post(format!("{url}{path}")).json(&body).send();
        async move {
            let r = r.await.expect("POST");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (status, t) = post(
        "/v1/tasks",
        json!({"shell": "exec sleep 600", "retry": retry_interruptions()}),
    )
    .await;
    assert_eq!(status, 202, "{t}");
    let task = t["id"].as_str().expect("id").to_string();
    let (status, s) = post(
        "/v1/services",
        json!({"name": "forever", "replicas": 1,
               "template": {"shell": "exec sleep 600", "resources": {"cpu": 0.1}},
               "retry": retry_interruptions()}),
    )
    .await;
    assert_eq!(status, 201, "{s}");
    let get = |path: String| {
        let r = http.get(format!("{url}{path}")).send();
        async move { r.await.ok()?.json::<Value>().await.ok() }
    };
    eventually("the task running", MINUTE, || {
        let t = get(format!("/v1/tasks/{task}"));
        async move { (t.await?["state"] == "running").then_some(()) }
    })
    .await;
    let replica = eventually("the replica running", MINUTE, || {
        let s = get("/v1/services/forever".into());
        async move {
            let s = s.await?;
            let r = s["replicas"].as_array()?.first()?.clone();
            (r["state"] == "running").then(|| r["task_id"].as_str().map(str::to_string))?
        }
    })
    .await;
    [task, replica]
}

/// SIGINT to `tasklog up` (on Apache Kafka) with a task and a service replica running:
/// it exits 0 within the drain timeout and a margin, prints no warning or error, and
/// the log ends both attempts as interruption; restarted, it runs them again.
#[tokio::test(flavor = "multi_thread")]
async fn tasklog_up_interrupts_what_outlives_its_drain_timeout() {
    let broker = Broker::start();
    let db = Db::create().await;
    let state_dir = tempfile::tempdir().unwrap();
    let (mut up, url) = start_up(&broker, &db, state_dir.path(), &[]).await;
    let ids = run_forever_on(&url, state_dir.path()).await;

    let (took, code, stderr) = stop(&mut up, "-INT").await;
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(2) + MARGIN,
        "exited {took:?} after SIGINT with a 2 s drain timeout; stderr:\n{stderr}"
    );
    assert!(complaints(&stderr).is_empty(), "stderr:\n{stderr}");
    for id in &ids {
        assert_interrupted_and_retried(&broker, id, 1);
    }

    // Back up, it runs them again (attempt 2) on its worker.
    let (_up, url) = start_up(&broker, &db, state_dir.path(), &[]).await;
    let http = common::client_with_token(&common::up_token(state_dir.path()));
    for id in &ids {
        let task_url = format!("{url}/v1/tasks/{id}");
        let http = &http;
        eventually(&format!("{id} running attempt 2"), MINUTE, || {
            let task_url = &task_url;
            async move {
                let t: Value = http.get(task_url).send().await.ok()?.json().await.ok()?;
                (t["state"] == "running" && t["attempt"] == 2).then_some(())
            }
        })
        .await;
    }
}

/// `tasklog up --dev-broker`: every client closes before the embedded broker, so a
/// SIGTERM with attempts running ends in an exit 0 within the drain timeout and a
/// margin, without a word about brokers going away.
#[tokio::test(flavor = "multi_thread")]
async fn tasklog_up_on_its_embedded_broker_exits_in_silence() {
    // Only the topic prefix of this broker is used: `up` runs its own.
    let broker = Broker::mock(1, format!("t_{}", uuid::Uuid::new_v4().simple()));
    let embedded = format!("127.0.0.1:{}", free_port());
    let db = Db::create().await;
    let state_dir = tempfile::tempdir().unwrap();
    let (mut up, url) = start_up(
        &broker,
        &db,
        state_dir.path(),
        &["--dev-broker", "--dev-broker-addr", &embedded],
    )
    .await;
    run_forever_on(&url, state_dir.path()).await;
    let (took, code, stderr) = stop(&mut up, "-TERM").await;
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(2) + MARGIN,
        "exited {took:?} after SIGTERM with a 2 s drain timeout; stderr:\n{stderr}"
    );
    assert!(complaints(&stderr).is_empty(), "stderr:\n{stderr}");
}
