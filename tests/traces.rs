//! W3C Trace Context end to end, with real processes: a request's `traceparent` reaches
//! every event it causes (`ce_traceparent`), every scheduler and worker event of its task,
//! every log record and the task's `TRACEPARENT`; a retry, a dependent task (`after`)
//! and a service's replicas join their parent's trace; `GET /v1/traces/{id}` and
//! `tasklog trace` list it; and the spans exported over OTLP, received by the harness'
//! receiver, link submit → queue wait / attempts / projection.

mod common;

use std::time::Duration;

use common::{Broker, Cluster, OtlpReceiver, ReceivedSpan, Stack, finish};
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

/// The caller's span: a trace of the test's own.
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// (trace id, span id) of a `traceparent` value.
fn ids(traceparent: &str) -> (String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "not a traceparent: {traceparent:?}");
    assert_eq!(parts[0], "00", "{traceparent}");
    assert_eq!(parts[1].len(), 32, "{traceparent}");
    assert_eq!(parts[2].len(), 16, "{traceparent}");
    (parts[1].to_string(), parts[2].to_string())
}

/// A cluster (scheduler, one worker) whose roles export spans to `receiver`.
async fn traced_cluster(receiver: &OtlpReceiver) -> Cluster {
    let mut broker = Broker::start();
    broker.role_env.extend(receiver.role_env());
    let mut c = Cluster::start_on(Stack::start_on(broker).await, &[]);
    c.add_worker("w", &[]).await;
    c
}

/// POSTs `body` to `path` with `traceparent` (when given); returns status, body and the
/// response's `traceparent`.
async fn post_traced(
    s: &Stack,
    path: &str,
    body: &Value,
    traceparent: Option<&str>,
) -> (u16, Value, Option<String>) {
    let mut request = s.http.post(format!("{}{path}", s.url)).json(body);
    if let Some(tp) = traceparent {
        request = request.header("traceparent", tp);
    }
    let response = request.send().await.expect("POST");
    let status = response.status().as_u16();
    let told = response
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (status, response.json().await.unwrap_or(Value::Null), told)
}

fn named<'a>(spans: &'a [ReceivedSpan], name: &str) -> Vec<&'a ReceivedSpan> {
    spans.iter().filter(|s| s.name == name).collect()
}

/// One request's trace through submit, the queue, a failed attempt, its retry, the
/// logs, the projection, a dependent task, the trace API, the CLI and OTLP.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_trace_reaches_events_logs_attempts_and_otlp() {
    let receiver = OtlpReceiver::start().await;
    let c = traced_cluster(&receiver).await;
    let s = &c.stack;
    let marker = c.state_dir.path().join("failed-once");
    let caller = format!("00-{TRACE}-{CALLER_SPAN}-01");
    let spec = json!({
        "name": "traced",
        "shell": format!(
            "echo \"tp=$TRACEPARENT\"; if [ -e '{m}' ]; then exit 0; fi; touch '{m}'; exit 1",
            m = marker.display()
        ),
        "retry": {"max_attempts": 2, "backoff": {"initial": "50ms"}},
    });
    let (status, body, told) = post_traced(s, "/v1/tasks", &spec, Some(&caller)).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    // The response names the submit span: a child of the caller's, in its trace.
    let (trace, submit_span) = ids(&told.expect("a traceparent on the response"));
    assert_eq!(trace, TRACE);
    assert_ne!(submit_span, CALLER_SPAN);

    let t = c.wait_state(&id, "succeeded", MINUTE).await;
    assert_eq!(t["attempts"].as_array().map(Vec::len), Some(2), "{t}");
    assert_eq!(
        ids(t["traceparent"].as_str().expect("traceparent")),
        (trace.clone(), submit_span.clone())
    );

    // A dependent task submitted without a traceparent joins its parent's trace.
    let (status, body) = s
        .post("/v1/tasks", &json!({"shell": "true", "after": [id]}))
        .await;
    assert_eq!(status, 202, "{body}");
    let dependent = body["id"].as_str().expect("id").to_string();
    let d = c.wait_state(&dependent, "succeeded", MINUTE).await;
    let (d_trace, d_span) = ids(d["traceparent"].as_str().expect("traceparent"));
    assert_eq!(d_trace, TRACE, "{d}");
    assert_ne!(d_span, submit_span);

    // The task saw its attempt's span in TRACEPARENT: in the trace, one per attempt.
    let (_, page) = s.get(&format!("/v1/tasks/{id}/logs?limit=100")).await;
    let attempt_spans: Vec<String> = page["lines"]
        .as_array()
        .expect("lines")
        .iter()
        .filter_map(|l| l["text"].as_str()?.strip_prefix("tp=").map(str::to_string))
        .collect();
    assert_eq!(attempt_spans.len(), 2, "{page}");
    for tp in &attempt_spans {
        assert_eq!(ids(tp).0, TRACE, "{tp}");
    }
    assert_ne!(
        attempt_spans[0], attempt_spans[1],
        "each attempt is a span of its own"
    );

    // On the log: every event of both tasks carries ce_traceparent in the trace; every
    // log record carries its attempt's traceparent.
    let events: Vec<_> = s
        .broker
        .read_all(&s.broker.events_topic())
        .into_iter()
        .filter(|r| {
            r.key.as_deref() == Some(id.as_str()) || r.key.as_deref() == Some(dependent.as_str())
        })
        .collect();
    assert!(events.len() >= 9, "{} events", events.len());
    for r in &events {
        let ce_type = r.header("ce_type").unwrap_or_default().to_string();
        let tp = r.header("ce_traceparent").unwrap_or_else(|| {
            panic!(
                "{ce_type} at {}:{} has no ce_traceparent",
                r.partition, r.offset
            )
        });
        assert_eq!(ids(tp).0, TRACE, "{ce_type}: {tp}");
    }
    let logs: Vec<_> = s
        .broker
        .read_all(&format!("{}.logs", s.broker.prefix))
        .into_iter()
        .filter(|r| r.key.as_deref() == Some(id.as_str()))
        .collect();
    assert_eq!(logs.len(), 2, "one line per attempt");
    for r in &logs {
        let attempt: usize = r
            .header("attempt")
            .expect("attempt")
            .parse()
            .expect("number");
        assert_eq!(
            r.header("traceparent"),
            Some(attempt_spans[attempt - 1].as_str())
        );
    }

    // GET /v1/traces/{id}: both tasks, every event, in order, with timings.
    let (status, view) = s.get(&format!("/v1/traces/{TRACE}")).await;
    assert_eq!(status, 200, "{view}");
    let listed = view["events"].as_array().expect("events");
    assert_eq!(listed.len(), events.len(), "{view}");
    let types: Vec<&str> = listed
        .iter()
        .filter(|e| e["task_id"] == id.as_str())
        .filter_map(|e| e["type"].as_str())
        .collect();
    for expected in [
        "submitted",
        "assigned",
        "started",
        "retry_scheduled",
        "succeeded",
    ] {
        assert!(
            types
                .iter()
                .any(|t| *t == format!("dev.tasklog.task.{expected}.v1")),
            "no {expected} in {types:?}"
        );
    }
    assert!(listed.iter().all(|e| e["trace_id"] == TRACE), "{view}");
    let times: Vec<&str> = listed.iter().filter_map(|e| e["time"].as_str()).collect();
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted, "events in time order");
    let tasks = view["tasks"].as_array().expect("tasks");
    assert_eq!(tasks.len(), 2, "{view}");
    assert_eq!(tasks[0]["task_id"], id.as_str());
    assert_eq!(tasks[1]["task_id"], dependent.as_str());
    for key in [
        "submitted_at",
        "assigned_at",
        "started_at",
        "finished_at",
        "queue_wait_ms",
        "run_ms",
    ] {
        assert!(!tasks[0][key].is_null(), "no {key} in {}", tasks[0]);
    }
    assert_eq!(tasks[0]["attempts"], 2);

    // The trace API refuses what is not a trace id and finds nothing for an unknown one.
    let (status, body) = s.get("/v1/traces/not-a-trace").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_trace_id")),
        "{body}"
    );
    let (status, body) = s.get(&format!("/v1/traces/{}", "ab".repeat(16))).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );

    // `tasklog trace` by trace id and by task id.
    for arg in [TRACE, id.as_str()] {
        let out = finish(s.cli(&["trace", arg]).stdout(std::process::Stdio::piped()));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "tasklog trace {arg}: {text}");
        assert!(text.contains(&format!("trace {TRACE}")), "{text}");
        assert!(text.contains(&id) && text.contains(&dependent), "{text}");
        assert!(
            text.contains("retry_scheduled") && text.contains("succeeded"),
            "{text}"
        );
    }

    // OTLP: submit under the caller's span; the queue waits and attempts under submit;
    // each projected event's span under the span that caused it.
    let spans = receiver
        .wait_trace(TRACE, "the trace's spans over OTLP", |spans| {
            named(spans, "attempt 2").len() == 1
                && named(spans, "attempt 1").len() == 2
                && named(spans, "queue wait").len() >= 3
                && named(spans, "project succeeded.v1").len() == 2
        })
        .await;
    let submits = named(&spans, "submit");
    let first = submits
        .iter()
        .find(|sp| sp.span_id == submit_span)
        .unwrap_or_else(|| panic!("no submit span {submit_span}: {submits:?}"));
    assert_eq!(first.parent_span_id, CALLER_SPAN);
    assert_eq!(first.service, "tasklog-api");
    for name in ["attempt 1", "attempt 2"] {
        let attempt: Vec<_> = named(&spans, name)
            .into_iter()
            .filter(|sp| sp.attributes.get("tasklog.task_id") == Some(&Value::from(id.as_str())))
            .collect();
        assert_eq!(attempt.len(), 1, "{name}: {attempt:?}");
        assert_eq!(attempt[0].parent_span_id, submit_span, "{name}");
        assert_eq!(attempt[0].service, "tasklog-worker");
        let n: usize = name[8..].parse().expect("n");
        assert_eq!(
            ids(&attempt_spans[n - 1]).1,
            attempt[0].span_id,
            "{name} is the TRACEPARENT the task saw"
        );
    }
    let waits: Vec<_> = named(&spans, "queue wait")
        .into_iter()
        .filter(|sp| sp.attributes.get("tasklog.task_id") == Some(&Value::from(id.as_str())))
        .collect();
    assert_eq!(waits.len(), 2, "a queue wait per attempt: {waits:?}");
    assert!(
        waits
            .iter()
            .all(|sp| sp.parent_span_id == submit_span && sp.service == "tasklog-scheduler")
    );
    let known: std::collections::HashSet<&str> =
        spans.iter().map(|sp| sp.span_id.as_str()).collect();
    let projected: Vec<_> = spans
        .iter()
        .filter(|sp| sp.name.starts_with("project "))
        .collect();
    assert!(
        projected.len() >= events.len(),
        "{} project spans",
        projected.len()
    );
    for sp in projected {
        assert_eq!(sp.service, "tasklog-projector");
        // Caused by a span of this trace: the submit, a queue wait or an attempt.
        assert!(known.contains(sp.parent_span_id.as_str()), "orphan {sp:?}");
    }
}

/// A request without a (valid) traceparent starts a trace of its own; a service's
/// replicas join the trace the service was created in.
#[tokio::test(flavor = "multi_thread")]
async fn new_traces_and_service_replicas() {
    let receiver = OtlpReceiver::start().await;
    let c = traced_cluster(&receiver).await;
    let s = &c.stack;

    // Unreadable context: a new trace (W3C), not a refusal.
    let (status, body, told) = post_traced(
        s,
        "/v1/tasks",
        &json!({"shell": "true"}),
        Some("00-zz-zz-01"),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let (fresh, _) = ids(&told.expect("traceparent"));
    assert_ne!(fresh, "0".repeat(32));
    let id = body["id"].as_str().expect("id");
    let t = c.wait_state(id, "succeeded", MINUTE).await;
    assert_eq!(
        ids(t["traceparent"].as_str().expect("traceparent")).0,
        fresh
    );

    let caller = format!("00-{TRACE}-{CALLER_SPAN}-01");
    let service = json!({"name": "traced", "replicas": 2,
                         "template": {"shell": "sleep 1000", "resources": {"cpu": 0.1}}});
    let (status, body, told) = post_traced(s, "/v1/services", &service, Some(&caller)).await;
    assert_eq!(status, 201, "{body}");
    let (trace, create_span) = ids(&told.expect("traceparent"));
    assert_eq!(trace, TRACE);
    assert_eq!(
        body["traceparent"].as_str(),
        Some(format!("00-{TRACE}-{create_span}-01").as_str()),
        "{body}"
    );
    let running = common::eventually("both replicas running", MINUTE, || async {
        let (_, v) = s.get("/v1/services/traced").await;
        (v["status"] == "running").then_some(v)
    })
    .await;
    let replicas = running["replicas"].as_array().expect("replicas");
    assert_eq!(replicas.len(), 2, "{running}");
    let mut replica_ids = Vec::new();
    for r in replicas {
        let task = s.task(r["task_id"].as_str().expect("task id")).await;
        let (trace, span) = ids(task["traceparent"].as_str().expect("traceparent"));
        assert_eq!(trace, TRACE, "{task}");
        replica_ids.push((task["id"].as_str().expect("id").to_string(), span));
    }
    let (status, view) = s.get(&format!("/v1/traces/{TRACE}")).await;
    assert_eq!(status, 200, "{view}");
    let listed: Vec<&str> = view["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .filter_map(|t| t["task_id"].as_str())
        .collect();
    for (replica, _) in &replica_ids {
        assert!(
            listed.contains(&replica.as_str()),
            "{replica} not in {listed:?}"
        );
    }
    // Each replica's submit span hangs under the service's create request.
    let spans = receiver
        .wait_trace(TRACE, "replica spans", |spans| {
            named(spans, "submit replica").len() == 2
                && named(spans, "queue wait").len() == 2
                && !named(spans, "create service").is_empty()
        })
        .await;
    let create = spans
        .iter()
        .find(|sp| sp.span_id == create_span)
        .unwrap_or_else(|| panic!("no span {create_span}: {spans:?}"));
    assert_eq!(
        (create.name.as_str(), create.parent_span_id.as_str()),
        ("create service", CALLER_SPAN)
    );
    for (_, span) in &replica_ids {
        let submit = spans
            .iter()
            .find(|sp| &sp.span_id == span)
            .unwrap_or_else(|| panic!("no span {span}"));
        assert_eq!(submit.name, "submit replica");
        assert_eq!(submit.parent_span_id, create.span_id);
    }
    let (status, _) = s.post("/v1/services/traced/stop", &json!({})).await;
    assert_eq!(status, 202);
}
