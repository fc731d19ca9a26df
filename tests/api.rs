//! The REST API against a real broker, Postgres and projector.

mod common;

use common::Stack;
use reqwest::header::HeaderValue;
use serde_json::{Value, json};

fn spec(name: &str) -> Value {
    json!({"name": name, "type": "train", "command": ["python3", "train.py"], "priority": 70,
           "labels": {"team": "vision"}, "resources": {"cpu": 2, "memory": "4GiB", "gpu": 1}})
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_then_get_list_events() {
    let s = Stack::start().await;
    let (status, body) = s.post("/v1/tasks", &spec("resnet")).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    assert_eq!(body["state"], "queued");
    assert_eq!(body["seq"], 1);
    let partition = body["event"]["partition"].as_i64().expect("partition");
    let offset = body["event"]["offset"].as_i64().expect("offset");

    // Read-your-writes: wait for exactly this event.
    let (status, task) = s
        .get(&format!(
            "/v1/tasks/{id}?min_offset={partition}:{offset}&wait_ms=20000"
        ))
        .await;
    assert_eq!(status, 200, "{task}");
    assert_eq!(task["state"], "queued");
    assert_eq!(task["spec"]["name"], "resnet");
    assert_eq!(task["spec"]["resources"]["memory"], "4GiB");
    assert_eq!(task["partition"].as_i64(), Some(partition));
    assert_eq!(task["last_offset"].as_i64(), Some(offset));

    // The bare-offset form locates the partition by the key, like Kafka's partitioner.
    let (status, _) = s
        .get(&format!("/v1/tasks/{id}?min_offset={offset}&wait_ms=5000"))
        .await;
    assert_eq!(status, 200);

    let (status, list) = s
        .get("/v1/tasks?state=queued&label=team=vision&type=train")
        .await;
    assert_eq!(status, 200);
    assert_eq!(list["tasks"].as_array().map(Vec::len), Some(1));
    let (_, none) = s.get("/v1/tasks?label=team=audio").await;
    assert_eq!(none["tasks"].as_array().map(Vec::len), Some(0));

    let (status, history) = s.get(&format!("/v1/tasks/{id}/events")).await;
    assert_eq!(status, 200);
    let events = history["events"].as_array().expect("events");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["type"], "dev.tasklog.task.submitted.v1");
    assert_eq!(events[0]["seq"], 1);
    assert_eq!(events[0]["partition"].as_i64(), Some(partition));
    assert_eq!(events[0]["offset"].as_i64(), Some(offset));
    assert!(events[0]["ce_id"].as_str().is_some_and(|c| !c.is_empty()));
    assert!(
        events[0]["source"]
            .as_str()
            .is_some_and(|c| c.starts_with("tasklog://api/"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotent_resubmission() {
    let s = Stack::start().await;
    let r = s
        .http
        .post(format!("{}/v1/tasks", s.url))
        .header("Idempotency-Key", "nightly-eval-2026-11-21")
        .json(&spec("eval"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let first: Value = r.json().await.unwrap();
    let id = first["id"].as_str().unwrap().to_string();

    // Immediately (before projection) and after projection: the same id, no second task.
    let mut with_field = spec("eval");
    with_field["idempotency_key"] = json!("nightly-eval-2026-11-21");
    let (status, again) = s.post("/v1/tasks", &with_field).await;
    assert_eq!(status, 202);
    assert_eq!(again["id"].as_str(), Some(id.as_str()));
    s.task(&id).await;
    let (status, again) = s.post("/v1/tasks", &with_field).await;
    assert_eq!(status, 202);
    assert_eq!(again["id"].as_str(), Some(id.as_str()));
    assert_eq!(again["idempotent_replay"], true);

    // Same key, different spec: 409.
    let mut different = with_field.clone();
    different["priority"] = json!(10);
    let (status, body) = s.post("/v1/tasks", &different).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "idempotency_conflict");

    // Header and field disagreeing: 400.
    let r = s
        .http
        .post(format!("{}/v1/tasks", s.url))
        .header("Idempotency-Key", "other")
        .json(&with_field)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // A header key that is not visible ASCII (a tab, a byte over 0x7e) or too long: 400.
    for bad in [
        HeaderValue::from_static("a\tb"),
        HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        HeaderValue::from_str(&"k".repeat(257)).unwrap(),
    ] {
        let r = s
            .http
            .post(format!("{}/v1/tasks", s.url))
            .header("Idempotency-Key", bad.clone())
            .json(&spec("eval"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad:?}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_idempotency_key", "{bad:?}");
    }

    s.wait_projected(1).await;
    assert_eq!(s.db.count("SELECT count(*) FROM tasks").await, 1);
    assert_eq!(s.db.count("SELECT count(*) FROM rejected_events").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_of_1000_gives_exactly_1000_tasks() {
    let s = Stack::start().await;
    let tasks: Vec<Value> = (0..1000)
        .map(|i| json!({"name": format!("t{i}"), "shell": "true"}))
        .collect();
    let (status, body) = s.post("/v1/tasks/batch", &json!({"tasks": tasks})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 1000);
    assert_eq!(body["failed"], 0);
    let results = body["results"].as_array().unwrap();
    let ids: std::collections::HashSet<&str> =
        results.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 1000);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["index"], i);
    }
    s.wait_projected(1000).await;
    assert_eq!(s.db.count("SELECT count(*) FROM tasks").await, 1000);
    assert_eq!(s.db.count("SELECT count(*) FROM task_events").await, 1000);

    // Keyset pagination walks all 1000 once, in a stable order.
    let mut seen = std::collections::HashSet::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/tasks?limit=300&cursor={c}"),
            None => "/v1/tasks?limit=300".to_string(),
        };
        let (status, page) = s.get(&path).await;
        assert_eq!(status, 200, "{page}");
        pages += 1;
        for t in page["tasks"].as_array().unwrap() {
            assert!(
                seen.insert(t["id"].as_str().unwrap().to_string()),
                "repeated {}",
                t["id"]
            );
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 1000);
    assert_eq!(pages, 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_bad_item_does_not_sink_the_batch() {
    let s = Stack::start().await;
    let batch = json!({"tasks": [
        {"shell": "true"},
        {"shell": "true", "priority": 1000},
        {"command": []},
        "not an object",
        {"shell": "true", "idempotency_key": "k1"},
        {"shell": "true", "idempotency_key": "k1"},
        {"shell": "false", "idempotency_key": "k1"},
    ]});
    let (status, body) = s.post("/v1/tasks/batch", &batch).await;
    assert_eq!(status, 202, "{body}");
    let r = body["results"].as_array().unwrap();
    assert!(r[0]["id"].is_string());
    assert_eq!(r[1]["error"]["code"], "invalid_spec");
    assert!(
        r[1]["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("priority"),
        "{}",
        r[1]
    );
    assert_eq!(r[2]["error"]["code"], "invalid_spec");
    assert_eq!(r[3]["error"]["code"], "invalid_spec");
    assert_eq!(r[4]["id"], r[5]["id"], "same key in one batch is one task");
    assert_eq!(r[6]["error"]["code"], "idempotency_conflict");
    assert_eq!(body["accepted"], 3);
    assert_eq!(body["failed"], 4);
    s.wait_projected(2).await;
    assert_eq!(s.db.count("SELECT count(*) FROM tasks").await, 2);
}

/// `after` must name tasks that exist: ones submitted before (even a moment before,
/// not yet projected) or ones in the same batch. Anything else is a 400 that names them,
/// and nothing reaches the log.
#[tokio::test(flavor = "multi_thread")]
async fn dependencies_must_name_known_tasks() {
    let s = Stack::start().await;
    let (status, a) = s.post("/v1/tasks", &json!({"shell": "true"})).await;
    assert_eq!(status, 202, "{a}");
    // Right away, before the projection may have it.
    let (status, b) = s
        .post("/v1/tasks", &json!({"shell": "true", "after": [a["id"]]}))
        .await;
    assert_eq!(status, 202, "{b}");
    assert_eq!(b["state"], "pending");

    let ghost = uuid::Uuid::new_v4().to_string();
    let (status, err) = s
        .post(
            "/v1/tasks",
            &json!({"shell": "true", "after": [a["id"], ghost]}),
        )
        .await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["code"], "unknown_dependency");
    let message = err["error"]["message"].as_str().unwrap();
    assert!(message.contains(&ghost), "{message}");
    assert!(!message.contains(a["id"].as_str().unwrap()), "{message}");

    let first = tasklog::events::idempotency::task_id_for_key("dep-first");
    let batch = json!({"tasks": [
        {"shell": "true", "after": [first]},
        {"shell": "true", "idempotency_key": "dep-first"},
        {"shell": "true", "after": [ghost]},
        {"shell": "true", "after": [a["id"], b["id"]]},
    ]});
    let (status, body) = s.post("/v1/tasks/batch", &batch).await;
    assert_eq!(status, 202, "{body}");
    let r = body["results"].as_array().unwrap();
    assert!(r[0]["id"].is_string(), "a task of the same batch: {}", r[0]);
    assert_eq!(r[1]["id"], json!(first));
    assert_eq!(r[2]["error"]["code"], "unknown_dependency", "{}", r[2]);
    assert!(r[3]["id"].is_string(), "{}", r[3]);
    assert_eq!(body["accepted"], 3);
    s.wait_projected(5).await;
    assert_eq!(s.db.count("SELECT count(*) FROM tasks").await, 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_a_json_4xx_naming_the_problem() {
    let s = Stack::start().await;
    // (method, path, body, status, error code, a word the message must contain)
    type Case<'a> = (&'a str, &'a str, &'a str, u16, &'a str, Option<&'a str>);
    let cases: Vec<Case> = vec![
        ("POST", "/v1/tasks", "{not json", 400, "invalid_json", None),
        ("POST", "/v1/tasks", "[1,2]", 400, "invalid_spec", None),
        (
            "POST",
            "/v1/tasks",
            r#"{"shell":"true","colour":"red"}"#,
            400,
            "invalid_spec",
            Some("colour"),
        ),
        (
            "POST",
            "/v1/tasks",
            r#"{"shell":"true","priority":101}"#,
            400,
            "invalid_spec",
            Some("priority"),
        ),
        (
            "POST",
            "/v1/tasks",
            r#"{"shell":"true","priority":-1}"#,
            400,
            "invalid_spec",
            Some("priority"),
        ),
        (
            "POST",
            "/v1/tasks",
            r#"{"shell":"true","resources":{"cpu":0}}"#,
            400,
            "invalid_spec",
            Some("resources.cpu"),
        ),
        (
            "POST",
            "/v1/tasks",
            r#"{"shell":"true","resources":{"memory":"lots"}}"#,
            400,
            "invalid_spec",
            Some("resources.memory"),
        ),
        (
            "POST",
            "/v1/tasks",
            r#"{"shell":"true","timeout":"soon"}"#,
            400,
            "invalid_spec",
            Some("timeout"),
        ),
        (
            "POST",
            "/v1/tasks",
            r#"{"shell":"true","after":["nope"]}"#,
            400,
            "invalid_spec",
            Some("after"),
        ),
        (
            "POST",
            "/v1/tasks",
            r#"{"name":"no command"}"#,
            400,
            "invalid_spec",
            None,
        ),
        (
            "POST",
            "/v1/tasks",
            r#"{"command":["a"],"shell":"b"}"#,
            400,
            "invalid_spec",
            None,
        ),
        (
            "POST",
            "/v1/tasks/batch",
            r#"{"tasks":[]}"#,
            400,
            "invalid_batch",
            None,
        ),
        (
            "POST",
            "/v1/tasks/batch",
            r#"{"items":[]}"#,
            400,
            "invalid_batch",
            None,
        ),
        ("GET", "/v1/tasks/not-a-uuid", "", 400, "invalid_id", None),
        (
            "GET",
            "/v1/tasks/01a1fb73-818f-7375-a8fd-214a8f0ca45f",
            "",
            404,
            "not_found",
            None,
        ),
        (
            "GET",
            "/v1/tasks/01a1fb73-818f-7375-a8fd-214a8f0ca45f?wait_ms=-5",
            "",
            400,
            "invalid_query",
            None,
        ),
        (
            "GET",
            "/v1/tasks/01a1fb73-818f-7375-a8fd-214a8f0ca45f?wait_ms=999999999",
            "",
            400,
            "invalid_query",
            None,
        ),
        (
            "GET",
            "/v1/tasks/01a1fb73-818f-7375-a8fd-214a8f0ca45f?min_offset=x",
            "",
            400,
            "invalid_query",
            None,
        ),
        (
            "GET",
            "/v1/tasks?limit=0",
            "",
            400,
            "invalid_query",
            Some("limit"),
        ),
        (
            "GET",
            "/v1/tasks?limit=1001",
            "",
            400,
            "invalid_query",
            Some("limit"),
        ),
        (
            "GET",
            "/v1/tasks?state=sleeping",
            "",
            400,
            "invalid_query",
            Some("state"),
        ),
        (
            "GET",
            "/v1/tasks?label=novalue",
            "",
            400,
            "invalid_query",
            Some("label"),
        ),
        (
            "GET",
            "/v1/tasks?cursor=garbage",
            "",
            400,
            "invalid_cursor",
            None,
        ),
        (
            "GET",
            "/v1/tasks?colour=red",
            "",
            400,
            "invalid_query",
            Some("colour"),
        ),
        (
            "GET",
            "/v1/tasks/01a1fb73-818f-7375-a8fd-214a8f0ca45f/events",
            "",
            404,
            "not_found",
            None,
        ),
        (
            "POST",
            "/v1/tasks/01a1fb73-818f-7375-a8fd-214a8f0ca45f/cancel",
            "",
            404,
            "not_found",
            None,
        ),
        ("POST", "/v1/tasks/nope/cancel", "", 400, "invalid_id", None),
        ("GET", "/v1/nothing-here", "", 404, "not_found", None),
        ("DELETE", "/v1/tasks", "", 405, "method_not_allowed", None),
    ];
    for (method, path, body, want_status, want_code, mentions) in cases {
        let url = format!("{}{path}", s.url);
        let request = match method {
            "POST" => s
                .http
                .post(&url)
                .header("content-type", "application/json")
                .body(body.to_string()),
            "GET" => s.http.get(&url),
            _ => s.http.delete(&url),
        };
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let json: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(status, want_status, "{method} {path} {body}: {json}");
        assert_eq!(
            json["error"]["code"], want_code,
            "{method} {path} {body}: {json}"
        );
        let message = json["error"]["message"].as_str().unwrap_or("");
        assert!(!message.is_empty(), "{method} {path}: no message");
        if let Some(m) = mentions {
            assert!(
                message.contains(m),
                "{method} {path} {body}: {message:?} should mention {m}"
            );
        }
    }
    // A huge spec is refused with 413 rather than failing at the broker.
    let huge = json!({"shell": "true", "env": {"BIG": "x".repeat(1_000_000)}});
    let (status, body) = s.post("/v1/tasks", &huge).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "spec_too_large");
    // Nothing bad reached the log.
    assert_eq!(s.broker.read_all(&s.broker.events_topic()).len(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_queued_task_and_refuse_terminal() {
    let s = Stack::start().await;
    let (_, body) = s.post("/v1/tasks", &json!({"shell": "sleep 100"})).await;
    let id = body["id"].as_str().unwrap().to_string();
    s.task(&id).await;
    let (status, body) = s
        .post(
            &format!("/v1/tasks/{id}/cancel"),
            &json!({"reason": "not needed"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["applied"], true);
    assert_eq!(body["task"]["state"], "cancelled");
    assert_eq!(body["task"]["reason"], "not needed");
    assert_eq!(body["task"]["seq"], 3);
    let (_, history) = s.get(&format!("/v1/tasks/{id}/events")).await;
    let types: Vec<&str> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "dev.tasklog.task.submitted.v1",
            "dev.tasklog.task.cancel_requested.v1",
            "dev.tasklog.task.cancelled.v1"
        ]
    );
    let (status, body) = s.post(&format!("/v1/tasks/{id}/cancel"), &json!({})).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "task_terminal");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_readiness_and_metrics() {
    let s = Stack::start().await;
    assert_eq!(s.get("/healthz").await.0, 200);
    assert_eq!(s.get("/readyz").await.0, 200);
    let (_, body) = s.post("/v1/tasks", &json!({"shell": "true"})).await;
    s.task(body["id"].as_str().unwrap()).await;
    s.post_raw("/v1/tasks", "{bad").await;
    let text = s.text("/metrics").await;
    for needle in [
        "tasklog_events_appended_total{type=\"dev.tasklog.task.submitted.v1\"} 1",
        "tasklog_http_request_duration_seconds_bucket{method=\"POST\",route=\"/v1/tasks\",status=\"202\"",
        "tasklog_http_request_duration_seconds_bucket{method=\"POST\",route=\"/v1/tasks\",status=\"400\"",
        "tasklog_tasks{state=\"queued\"} 1",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}\n{text}");
    }
}

/// A NUL (U+0000) anywhere in a body — a string, a map key or value, nested — is
/// refused with 400 `invalid_text` naming the field, on every kind of write; nothing
/// reaches the log, and the projection goes on.
#[tokio::test(flavor = "multi_thread")]
async fn nul_characters_are_refused_naming_the_field() {
    let s = Stack::start().await;
    let (status, body) = s
        .post("/v1/tasks", &json!({"name": "ok", "shell": "true"}))
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    s.task(&id).await;
    let cancel = format!("/v1/tasks/{id}/cancel");
    let finish = format!("/v1/tasks/{id}/attempts/1/finish");
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "/v1/tasks",
            json!({"name": "x", "shell": "true", "env": {"A": "x\u{0}"}}),
            "env.A",
        ),
        (
            "/v1/tasks",
            json!({"name": "x\u{0}", "shell": "true"}),
            "name",
        ),
        (
            "/v1/tasks",
            json!({"shell": "true", "labels": {"k\u{0}": "v"}}),
            "labels.<key \"k\\0\">",
        ),
        (
            "/v1/tasks/batch",
            json!({"tasks": [{"shell": "true"}, {"command": ["echo", "a\u{0}b"]}]}),
            "tasks[1].command[1]",
        ),
        (
            "/v1/services",
            json!({"name": "svc", "replicas": 1, "template": {"shell": "sleep 1", "env": {"B": "\u{0}"}}}),
            "template.env.B",
        ),
        (&cancel, json!({"message": "bye\u{0}"}), "message"),
        (
            &finish,
            json!({"worker_id": "w", "outcome": "failed", "reason": "error", "message": "\u{0}"}),
            "message",
        ),
    ];
    for (path, body, field) in &cases {
        let (status, answer) = s.post(path, body).await;
        assert_eq!(status, 400, "{path}: {answer}");
        assert_eq!(answer["error"]["code"], "invalid_text", "{path}: {answer}");
        assert_eq!(answer["error"]["field"], *field, "{path}: {answer}");
    }
    // Nothing of it reached the log: one record, the first submission.
    let end: i64 = s
        .broker
        .all_watermarks(&s.broker.events_topic())
        .iter()
        .map(|(_, h)| h)
        .sum();
    assert_eq!(end, 1);
    let (status, task) = s.get(&format!("/v1/tasks/{id}")).await;
    assert_eq!(status, 200, "{task}");
    assert_eq!(task["state"], "queued");
}
