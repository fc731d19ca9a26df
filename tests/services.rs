//! Services with real processes: `python3 -m http.server` replicas probed over HTTP,
//! fail-fast by default, self-healing with retry, unhealthy probes, scale, stop.

mod common;

use std::time::Duration;

use common::Cluster;
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

/// Ports `<base>0` to `<base>9`, one per replica index: 10000–31999, below Linux's
/// ephemeral range (32768+) so no client socket of the test holds one.
fn port_base() -> String {
    let n = uuid::Uuid::new_v4().as_u128() % 2200;
    format!("{}", 1000 + n)
}

/// A service of `replicas` HTTP servers probed over HTTP. Failures before the first
/// success count toward the threshold, so 150 × 200 ms gives Python 30 s to start even
/// on a loaded machine.
fn http_service(name: &str, replicas: u32, base: &str, retry: Value) -> Value {
    let mut body = json!({
        "name": name,
        "replicas": replicas,
        "template": {
            "shell": format!("exec python3 -m http.server --bind 127.0.0.1 {base}$TASKLOG_REPLICA"),
            "resources": {"cpu": 0.1},
        },
        "probe": {
            "http": {"url": format!("http://127.0.0.1:{base}${{TASKLOG_REPLICA}}/"), "expect_status": 200},
            "interval": "200ms", "timeout": "1s", "failure_threshold": 150, "ready_after": 1,
        },
    });
    if !retry.is_null() {
        body["retry"] = retry;
    }
    body
}

async fn create(c: &Cluster, body: &Value) -> Value {
    let (status, s) = c.stack.post("/v1/services", body).await;
    assert_eq!(status, 201, "{s}");
    s
}

async fn wait_service(c: &Cluster, name: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let done = &done;
    common::eventually(&format!("service {name}: {what}"), MINUTE, || async move {
        let (status, s) = c.stack.get(&format!("/v1/services/{name}")).await;
        (status == 200 && done(&s)).then_some(s)
    })
    .await
}

fn replica(s: &Value, index: u64) -> &Value {
    s["replicas"]
        .as_array()
        .and_then(|r| r.iter().rev().find(|r| r["index"] == index))
        .unwrap_or_else(|| panic!("no replica {index} in {s}"))
}

fn kill9(pid: &Value) {
    common::signal(pid.as_u64().expect("pid"), "-9");
}

/// Without retry, one failing replica fails the service; the others are cancelled.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_replica_fails_the_service_by_default() {
    let mut c = Cluster::start(&[]).await;
    c.add_worker("w", &["--kill-grace", "1s"]).await;
    let base = port_base();
    create(&c, &http_service("web", 2, &base, Value::Null)).await;
    let s = wait_service(&c, "web", "running", |s| s["status"] == "running").await;
    // The replicas really serve.
    for i in 0..2 {
        let r = reqwest::get(format!("http://127.0.0.1:{base}{i}/"))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    kill9(&replica(&s, 1)["pid"]);
    let s = wait_service(&c, "web", "failed", |s| s["status"] == "failed").await;
    assert_eq!(s["reason"], "replica_failed");
    let other = c
        .wait_state(
            replica(&s, 0)["task_id"].as_str().unwrap(),
            "cancelled",
            MINUTE,
        )
        .await;
    assert_eq!(other["reason"], "replica_failed");
}

/// With retry, only the failed replica restarts; the others keep their processes.
/// The status goes running → degraded → running.
#[tokio::test(flavor = "multi_thread")]
async fn with_retry_only_the_failed_replica_restarts() {
    let mut c = Cluster::start(&[]).await;
    c.add_worker("w", &["--kill-grace", "1s"]).await;
    let base = port_base();
    let retry = json!({"duration": "off", "backoff": {"initial": "1s"}});
    create(&c, &http_service("api", 3, &base, retry)).await;
    let before = wait_service(&c, "api", "running", |s| s["status"] == "running").await;
    let pids: Vec<Value> = (0..3).map(|i| replica(&before, i)["pid"].clone()).collect();
    kill9(&pids[1]);
    wait_service(&c, "api", "degraded", |s| s["status"] == "degraded").await;
    let after = wait_service(&c, "api", "running again", |s| {
        s["status"] == "running" && replica(s, 1)["attempt"] == 2
    })
    .await;
    assert_eq!(replica(&after, 0)["pid"], pids[0]);
    assert_eq!(replica(&after, 2)["pid"], pids[2]);
    assert_ne!(replica(&after, 1)["pid"], pids[1]);
    assert_eq!(
        replica(&after, 1)["task_id"],
        replica(&before, 1)["task_id"],
        "the same task, retried"
    );
    let metrics = c.stack.text("/metrics").await;
    assert!(
        metrics.contains("tasklog_service_status{service=\"api\",status=\"running\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("tasklog_service_replicas{service=\"api\",state=\"ready\"} 3"));
}

/// A probe that keeps failing ends the replica's attempt with reason unhealthy.
#[tokio::test(flavor = "multi_thread")]
async fn an_unhealthy_probe_ends_a_replica() {
    let mut c = Cluster::start(&[]).await;
    c.add_worker("w", &["--kill-grace", "1s"]).await;
    let dir = tempfile::tempdir().unwrap();
    let sick = dir.path().join("sick");
    let body = json!({
        "name": "db",
        "replicas": 1,
        "template": {"shell": "sleep 1000", "env": {"SICK": sick.to_str().unwrap()}},
        "probe": {"command": {"argv": ["sh", "-c", "test ! -e \"$SICK\""]},
                  "interval": "200ms", "failure_threshold": 2, "ready_after": 2},
    });
    create(&c, &body).await;
    let s = wait_service(&c, "db", "running", |s| s["status"] == "running").await;
    let task = replica(&s, 0)["task_id"].as_str().unwrap().to_string();
    std::fs::write(&sick, b"").unwrap();
    let t = c.wait_state(&task, "failed", MINUTE).await;
    assert_eq!(t["reason"], "unhealthy", "{t}");
    assert_eq!(t["attempts"][0]["reason"], "unhealthy");
    wait_service(&c, "db", "failed", |s| s["status"] == "failed").await;
}

/// Scale up adds replicas; scale down cancels the highest indexes; stop ends all.
#[tokio::test(flavor = "multi_thread")]
async fn scale_up_down_and_stop() {
    let mut c = Cluster::start(&[]).await;
    c.add_worker("w", &["--kill-grace", "1s"]).await;
    let body = json!({"name": "pool", "replicas": 1, "template": {"shell": "sleep 1000", "resources": {"cpu": 0.1}}});
    create(&c, &body).await;
    let one = wait_service(&c, "pool", "1 running", |s| s["status"] == "running").await;
    let first = replica(&one, 0)["task_id"].clone();
    let (status, answer) = c
        .stack
        .patch("/v1/services/pool", &json!({"replicas": 3}))
        .await;
    assert_eq!(status, 200, "{answer}");
    let three = wait_service(&c, "pool", "3 running", |s| {
        s["status"] == "running" && s["ready_replicas"] == 3
    })
    .await;
    assert_eq!(replica(&three, 0)["task_id"], first);
    let (status, answer) = c
        .stack
        .patch("/v1/services/pool", &json!({"replicas": 1}))
        .await;
    assert_eq!(status, 200, "{answer}");
    for i in [1, 2] {
        let t = c
            .wait_state(
                replica(&three, i)["task_id"].as_str().unwrap(),
                "cancelled",
                MINUTE,
            )
            .await;
        assert_eq!(t["reason"], "scaled_down");
    }
    let (_, s) = c.stack.get("/v1/services/pool").await;
    assert_eq!(s["status"], "running", "{s}");
    assert_eq!(replica(&s, 0)["task_id"], first);
    // Bad input is a JSON 4xx.
    let (status, err) = c
        .stack
        .post(
            "/v1/services",
            &json!({"name": "bad name!", "replicas": 1, "template": {"shell": "x"}}),
        )
        .await;
    assert_eq!(status, 400, "{err}");
    let (status, err) = c.stack.post("/v1/services", &body).await;
    assert_eq!(status, 409, "the name is taken: {err}");

    let (status, _) = c.stack.post("/v1/services/pool/stop", &json!({})).await;
    assert_eq!(status, 202);
    let s = wait_service(&c, "pool", "stopped", |s| s["lifecycle"] == "stopped").await;
    assert_eq!(s["status"], "stopped");
    let t = c
        .wait_state(first.as_str().unwrap(), "cancelled", MINUTE)
        .await;
    assert_eq!(t["reason"], "service_stopped");
}

/// With retry, a service whose every replica keeps failing is `down` (not `failed`, not
/// `degraded`), on the API and in the metrics; once the replicas can start, their retries
/// bring it back to `running`.
#[tokio::test(flavor = "multi_thread")]
async fn every_replica_retrying_is_down_until_they_come_up() {
    let mut c = Cluster::start(&[]).await;
    c.add_worker("w", &["--kill-grace", "1s"]).await;
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("up");
    let body = json!({
        "name": "flaky",
        "replicas": 2,
        "template": {
            "shell": "test -e \"$UP\" || exit 3; exec sleep 1000",
            "env": {"UP": up.to_str().unwrap()},
            "resources": {"cpu": 0.1},
        },
        "retry": {"duration": "off", "backoff": {"initial": "2s", "max": "2s", "jitter": 0}},
    });
    create(&c, &body).await;
    let s = wait_service(&c, "flaky", "down", |s| s["status"] == "down").await;
    assert_eq!(s["ready_replicas"], 0, "{s}");
    common::eventually("down in the metrics", MINUTE, || async {
        let metrics = c.stack.text("/metrics").await;
        metrics
            .contains("tasklog_service_status{service=\"flaky\",status=\"down\"} 1")
            .then_some(())
    })
    .await;

    std::fs::write(&up, b"").unwrap();
    let s = wait_service(&c, "flaky", "running", |s| {
        s["status"] == "running" && s["ready_replicas"] == 2
    })
    .await;
    for i in 0..2 {
        let r = replica(&s, i);
        assert!(r["attempt"].as_u64().unwrap() >= 2, "{r}");
    }
    let (_, t) = c
        .stack
        .get(&format!(
            "/v1/tasks/{}",
            replica(&s, 0)["task_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(t["state"], "running", "{t}");
    assert_eq!(t["attempts"][0]["exit_code"], 3, "{t}");
}
