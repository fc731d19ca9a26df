//! Retry policies with real processes: `duration: off` retries until cancelled, a
//! duration and max_attempts stop it, backoff times stay within bounds, non-retryable
//! exit codes end it at once, a lost worker's attempt moves to another worker, and a
//! task nothing can fit waits until a fitting worker registers.

mod common;

use std::time::Duration;

use common::{Cluster, micros};
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

fn attempts(t: &Value) -> &Vec<Value> {
    t["attempts"].as_array().expect("attempts")
}

fn count_events(types: &[String], suffix: &str) -> usize {
    types.iter().filter(|t| t.ends_with(suffix)).count()
}

/// `duration: off`: an always-failing task keeps retrying until someone cancels it.
#[tokio::test(flavor = "multi_thread")]
async fn duration_off_retries_until_cancelled() {
    let mut c = Cluster::start(&[]).await;
    c.add_worker("w", &[]).await;
    let id = c
        .submit(json!({"shell": "exit 1", "retry": {"duration": "off",
            "backoff": {"initial": "50ms", "multiplier": 1.5, "max": "200ms"}}}))
        .await;
    let t = c
        .wait_task(&id, "8 attempts", MINUTE, |t| {
            t["attempts"].as_array().map(Vec::len).unwrap_or(0) >= 8
        })
        .await;
    assert_ne!(t["state"], "failed");
    let (status, body) = c
        .stack
        .post(&format!("/v1/tasks/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202, "{body}");
    let t = c.wait_state(&id, "cancelled", MINUTE).await;
    let n = attempts(&t).len();
    assert!(n >= 8, "{n} attempts");
    let types = c.event_types(&id).await;
    // Every attempt that ended before the cancel ended in a retry, on the log.
    assert!(count_events(&types, "retry_scheduled.v1") >= 7, "{types:?}");
    assert_eq!(count_events(&types, "failed.v1"), 0, "{types:?}");
}

/// `duration: 3s`: retrying stops once the window since the first failure has passed.
#[tokio::test(flavor = "multi_thread")]
async fn a_duration_ends_retrying() {
    let mut c = Cluster::start(&[]).await;
    c.add_worker("w", &[]).await;
    let id = c
        .submit(json!({"shell": "exit 1", "retry": {"duration": "3s", "backoff": {"initial": "300ms", "multiplier": 1}}}))
        .await;
    let t = c.wait_state(&id, "failed", MINUTE).await;
    assert_eq!(t["reason"], "retry_limit_exceeded", "{t}");
    let all = attempts(&t);
    assert!(all.len() >= 3, "{} attempts", all.len());
    let first_failure = micros(&t["first_failure_at"]);
    let last = all.last().unwrap();
    let window = 3_000_000;
    // The last attempt ended at or after the window's end, every earlier one before it.
    assert!(micros(&last["finished_at"]) - first_failure >= window);
    for a in &all[..all.len() - 1] {
        assert!(micros(&a["finished_at"]) - first_failure < window, "{a}");
    }
}

/// `max_attempts: 3` gives exactly three attempts, with the backoff between them.
#[tokio::test(flavor = "multi_thread")]
async fn max_attempts_and_backoff_bounds() {
    let mut c = Cluster::start(&[]).await;
    c.add_worker("w", &[]).await;
    let id = c
        .submit(json!({"shell": "exit 3", "retry": {"max_attempts": 3,
            "backoff": {"initial": "400ms", "multiplier": 2, "jitter": 0}}}))
        .await;
    let t = c.wait_state(&id, "failed", MINUTE).await;
    assert_eq!(t["reason"], "retry_limit_exceeded", "{t}");
    let all = attempts(&t);
    assert_eq!(all.len(), 3, "{t}");
    for (i, a) in all.iter().enumerate() {
        assert_eq!(a["attempt"], i + 1);
        assert_eq!(a["exit_code"], 3);
        assert_eq!(a["outcome"], "failed");
    }
    // Backoff: 400 ms, then 800 ms (jitter 0), measured from the failure to the next
    // assignment; the upper bound allows for scheduling on a loaded machine.
    for (i, expected_ms) in [(1, 400), (2, 800)] {
        let gap = micros(&all[i]["assigned_at"]) - micros(&all[i - 1]["finished_at"]);
        assert!(
            gap >= expected_ms * 1000 && gap < (expected_ms + 1500) * 1000,
            "gap before attempt {}: {} ms",
            i + 1,
            gap / 1000
        );
    }
    let types = c.event_types(&id).await;
    assert_eq!(count_events(&types, "retry_scheduled.v1"), 2, "{types:?}");
}

/// A non-retryable exit code fails the task at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_non_retryable_exit_code_is_final() {
    let mut c = Cluster::start(&[]).await;
    c.add_worker("w", &[]).await;
    let id = c
        .submit(json!({"shell": "exit 42", "retry": {"non_retryable_exit_codes": [42], "backoff": {"initial": "50ms"}}}))
        .await;
    let t = c.wait_state(&id, "failed", MINUTE).await;
    assert_eq!(attempts(&t).len(), 1);
    assert_eq!(t["reason"], "error");
    assert_eq!(t["exit_code"], 42);
    assert!(
        t["message"]
            .as_str()
            .unwrap_or("")
            .contains("not retryable"),
        "{t}"
    );
}

/// A SIGKILLed worker's attempt is retried (reason interruption) on another worker.
#[tokio::test(flavor = "multi_thread")]
async fn interruption_is_retried_on_another_worker() {
    let mut c = Cluster::start(&["--worker-timeout", "3s"]).await;
    c.add_worker("first", &[]).await;
    // The attempt runs until the gate opens, so it is still running on `first` when
    // that worker is killed, however long `second` takes to start.
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("open");
    let id = c
        .submit(json!({"shell": common::gated(&open, "true"), "retry": {"on_events": ["interruption"], "backoff": {"initial": "100ms"}}}))
        .await;
    let t = c.wait_state(&id, "running", MINUTE).await;
    assert_eq!(t["worker_id"], "first");
    c.add_worker("second", &[]).await;
    c.worker("first").kill();
    std::fs::write(&open, b"").unwrap();
    let t = c.wait_state(&id, "succeeded", MINUTE).await;
    let all = attempts(&t);
    assert_eq!(all.len(), 2, "{t}");
    assert_eq!(all[0]["worker_id"], "first");
    assert_eq!(all[0]["reason"], "interruption");
    assert_eq!(all[1]["worker_id"], "second");
    assert_eq!(all[1]["outcome"], "succeeded");
}

/// A task no worker can fit waits (pending, reason no_capacity) and runs as soon as a
/// fitting worker registers — woken by the registration, not by its backoff timer.
#[tokio::test(flavor = "multi_thread")]
async fn no_capacity_waits_for_a_fitting_worker() {
    let mut c = Cluster::start(&["--no-capacity-after", "500ms"]).await;
    c.add_worker("small", &["--cpu", "1"]).await;
    let id = c
        .submit(json!({"shell": "echo ran", "resources": {"gpu": 1},
            "retry": {"on_events": ["no_capacity"], "duration": "off", "backoff": {"initial": "10m"}}}))
        .await;
    let t = c
        .wait_task(&id, "waiting for capacity", MINUTE, |t| {
            t["state"] == "pending" && t["reason"] == "no_capacity"
        })
        .await;
    assert!(t["next_attempt_at"].is_string());
    c.add_worker("gpu", &["--gpu", "1"]).await;
    let t = c
        .wait_task(
            &id,
            "succeeded long before its 10-minute backoff",
            MINUTE,
            |t| t["state"] == "succeeded",
        )
        .await;
    let all = attempts(&t);
    assert_eq!(all.len(), 1, "waiting used no attempt: {t}");
    assert_eq!(all[0]["worker_id"], "gpu");
    let types = c.event_types(&id).await;
    assert!(count_events(&types, "retry_scheduled.v1") >= 1, "{types:?}");
}
