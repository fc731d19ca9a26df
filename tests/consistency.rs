//! Read-your-writes through every API server: a task (or service) that is on the log is
//! never "not found"; a 404 means "not on the log"; a projection that cannot catch up in
//! time answers 503 `projection_lagging`, never 404.

mod common;

use common::{Stack, start_server};
use serde_json::{Value, json};
use uuid::Uuid;

async fn get(http: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = http.get(url).send().await.expect("GET");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_submitted_through_one_server_is_read_at_once_through_another() {
    let mut s = Stack::start().await;
    let (_other, other) = start_server(&s.broker, &s.db, &[("TASKLOG_READ_WAIT_MS", "700")]).await;
    let http = reqwest::Client::new();
    for i in 0..30 {
        let (status, body) = s
            .post(
                "/v1/tasks",
                &json!({"name": format!("ryw-{i}"), "shell": "true"}),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        let id = body["id"].as_str().expect("id").to_string();
        // No wait_ms: the server itself waits for the projection to reach the log's end.
        let (status, task) = get(&http, &format!("{other}/v1/tasks/{id}")).await;
        assert_eq!(status, 200, "{task}");
        assert_eq!(task["spec"]["name"], format!("ryw-{i}"));
        let (status, events) = get(&http, &format!("{other}/v1/tasks/{id}/events")).await;
        assert_eq!(status, 200, "{events}");
        if i % 10 == 0 {
            let r = http
                .post(format!("{other}/v1/tasks/{id}/cancel"))
                .json(&json!({}))
                .send()
                .await
                .expect("cancel");
            assert!(
                r.status().is_success(),
                "cancel right after submit: {}",
                r.status()
            );
        }
    }
    let (status, body) = get(&http, &format!("{other}/v1/tasks/{}", Uuid::new_v4())).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "not_found");

    // With the projection stopped, a task on the log is lagging, not missing.
    s.projector.kill();
    let (status, body) = s
        .post(
            "/v1/tasks",
            &json!({"name": "while-stopped", "shell": "true"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    let (status, body) = get(&http, &format!("{other}/v1/tasks/{id}")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "projection_lagging");
    assert!(
        body["error"]["lag"].as_i64().is_some_and(|l| l >= 1),
        "{body}"
    );
    // Asking for the projection as it is answers at once (here: not projected yet).
    let (status, body) = get(
        &http,
        &format!("{other}/v1/tasks/{id}?consistency=eventual"),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = get(
        &http,
        &format!("{other}/v1/tasks/{id}?consistency=sometimes"),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    for query in ["bogus=1", "=false", "consistency=eventual&scan=true"] {
        let (status, body) = get(&http, &format!("{other}/v1/tasks/{id}?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["code"], "invalid_query", "{query}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_projection_is_lagging_not_missing() {
    // A server that has seen the projection reach the log's end keeps that in memory
    // (from the projector's notifications); deleting the projection (what `tasklog
    // projector --rebuild` does first) must make it forget, or it would answer 404 for
    // tasks that are on the log.
    let mut s = Stack::start().await;
    let (_other, other) = start_server(&s.broker, &s.db, &[("TASKLOG_READ_WAIT_MS", "700")]).await;
    let http = reqwest::Client::new();
    let (status, body) = s
        .post("/v1/tasks", &json!({"name": "kept", "shell": "true"}))
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    let (status, task) = get(&http, &format!("{other}/v1/tasks/{id}")).await;
    assert_eq!(status, 200, "{task}");

    s.projector.kill();
    let store = tasklog::store::Store::connect(&s.db.url, 1).expect("store");
    store
        .reset_projection()
        .await
        .expect("reset the projection");
    let (status, body) = get(&http, &format!("{other}/v1/tasks/{id}")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "projection_lagging");

    // Rebuilt from offset 0, it is there again.
    s.projector = common::start_projector(&s.broker, &s.db);
    let (status, task) = get(&http, &format!("{other}/v1/tasks/{id}?wait_ms=30000")).await;
    assert_eq!(status, 200, "{task}");
}
