//! Who may do what, against a live API (tokens on) on a real broker and Postgres:
//! every route × every role, every kind of bad token, a worker token that tries to act
//! for another worker, a revocation reaching a second API server, the principal on
//! the log, no secret anywhere it should not be, and the safe defaults of the servers.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{
    Stack, client_with_token, create_token, eventually, finish, free_port, kcat_event, role,
    start_server,
};
use reqwest::Method;
use serde_json::{Value, json};

/// The roles, as the issue names them, with what each may do (written here, not taken
/// from the code under test).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Admin,
    Submitter,
    Reader,
    Worker,
}

/// What a route needs, as the test reads the route's purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needs {
    Nothing,
    AnyToken,
    Read,
    Write,
    Report,
    Tokens,
}

impl Needs {
    fn allows(self, who: Who) -> bool {
        match self {
            Needs::Nothing | Needs::AnyToken => true,
            Needs::Read => who != Who::Worker,
            Needs::Write => matches!(who, Who::Admin | Who::Submitter),
            Needs::Report => matches!(who, Who::Admin | Who::Worker),
            Needs::Tokens => who == Who::Admin,
        }
    }
}

/// Whether the route is about one project's entity (or makes one): refused (403) for a
/// token that does not reach that project. Lists are filtered instead; tokens, who am
/// I, a worker's own assignments and the open routes know no project.
fn project_scoped(method: &str, path: &str) -> bool {
    !matches!(
        needs(method, path),
        Needs::Nothing | Needs::AnyToken | Needs::Tokens
    ) && !matches!(
        (method, path),
        (
            "GET",
            "/v1/tasks"
                | "/v1/services"
                | "/v1/workers"
                | "/v1/workers/{id}/assignments"
                | "/v1/traces/{trace_id}"
                | "/v1/logs"
        )
    )
}

fn needs(method: &str, path: &str) -> Needs {
    match (method, path) {
        (_, "/healthz" | "/readyz" | "/metrics" | "/v1/openapi.json") => Needs::Nothing,
        (_, "/v1/whoami") => Needs::AnyToken,
        (_, p) if p.starts_with("/v1/tokens") => Needs::Tokens,
        (_, p) if p.contains("/attempts/") || p.ends_with("/assignments") => Needs::Report,
        ("POST", "/v1/workers/{id}/events") => Needs::Report,
        ("GET", _) => Needs::Read,
        _ => Needs::Write,
    }
}

/// The tokens of one test: one per role (the worker's acts as worker `w1`).
struct Callers {
    admin: reqwest::Client,
    submitter: reqwest::Client,
    reader: reqwest::Client,
    worker: reqwest::Client,
}

impl Callers {
    fn of(&self, who: Who) -> &reqwest::Client {
        match who {
            Who::Admin => &self.admin,
            Who::Submitter => &self.submitter,
            Who::Reader => &self.reader,
            Who::Worker => &self.worker,
        }
    }
}

async fn call(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    body: Option<&Value>,
) -> (u16, Value, Option<String>) {
    let mut request = http.request(method, url);
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = response.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
        challenge,
    )
}

/// Submits a task of `project` as admin; returns its id once projected.
async fn task(s: &Stack, project: &str) -> String {
    let (status, body) = s
        .post("/v1/tasks", &json!({"shell": "true", "project": project}))
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    s.task(&id).await;
    id
}

/// A task of `project` assigned to `worker` (attempt 1), as a scheduler would have
/// appended it.
async fn assigned(s: &Stack, worker: &str, project: &str) -> String {
    let id = task(s, project).await;
    let data = json!({"task_id": id, "seq": 2, "worker_id": worker, "attempt": 1});
    kcat_event(
        &s.broker,
        &id,
        &uuid::Uuid::new_v4().to_string(),
        "dev.tasklog.task.assigned.v1",
        "test://scheduler",
        &data.to_string(),
    );
    eventually(
        "the assignment projected",
        Duration::from_secs(20),
        || async {
            let (status, t) = s.get(&format!("/v1/tasks/{id}?wait_ms=2000")).await;
            (status == 200 && t["state"] == "assigned").then_some(())
        },
    )
    .await;
    id
}

/// A task whose attempt 1 runs on `worker` (started by the admin on its behalf).
async fn running(s: &Stack, worker: &str, project: &str) -> String {
    let id = assigned(s, worker, project).await;
    let (status, body) = s
        .post(
            &format!("/v1/tasks/{id}/attempts/1/start"),
            &json!({"worker_id": worker}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    id
}

/// A service (no scheduler runs, so it has no replicas; that changes nothing here).
async fn service(s: &Stack, name: &str, project: &str) -> String {
    let body = json!({"name": name, "replicas": 1,
                      "template": {"shell": "sleep 1", "project": project}});
    let (status, answer) = s.post("/v1/services", &body).await;
    assert_eq!(status, 201, "{answer}");
    name.to_string()
}

/// Fixtures of one project, shared by the read routes.
struct Fixtures {
    project: &'static str,
    task: String,
    service: String,
    worker: String,
}

/// The request for one route, made afresh for each caller (a cancel needs a task that
/// is not cancelled yet, a stop a service still active, ...).
async fn request_for(
    s: &Stack,
    f: &Fixtures,
    method: &str,
    path: &str,
    n: usize,
) -> (Method, String, Option<Value>, &'static [u16]) {
    let post = Method::POST;
    let get = Method::GET;
    let at = |p: String| format!("{}{p}", s.url);
    match (method, path) {
        ("POST", "/v1/tasks") => (
            post,
            at(path.into()),
            Some(json!({"shell": "true", "project": f.project})),
            &[202],
        ),
        ("GET", "/v1/tasks") => (get, at(path.into()), None, &[200]),
        ("POST", "/v1/tasks/batch") => (
            post,
            at(path.into()),
            Some(json!({"tasks": [{"shell": "true", "project": f.project}]})),
            &[200, 202, 207],
        ),
        ("GET", "/v1/tasks/{id}") => (get, at(format!("/v1/tasks/{}", f.task)), None, &[200]),
        ("GET", "/v1/tasks/{id}/events") => (
            get,
            at(format!("/v1/tasks/{}/events", f.task)),
            None,
            &[200],
        ),
        ("GET", "/v1/tasks/{id}/audit") => {
            (get, at(format!("/v1/tasks/{}/audit", f.task)), None, &[200])
        }
        ("POST", "/v1/tasks/{id}/cancel") => {
            let id = task(s, f.project).await;
            (
                post,
                at(format!("/v1/tasks/{id}/cancel")),
                Some(json!({})),
                &[202],
            )
        }
        ("POST", "/v1/tasks/{id}/attempts/{n}/start") => {
            let id = assigned(s, "w1", f.project).await;
            let body = json!({"worker_id": "w1", "pid": 4242});
            (
                post,
                at(format!("/v1/tasks/{id}/attempts/1/start")),
                Some(body),
                &[200],
            )
        }
        ("POST", "/v1/tasks/{id}/attempts/{n}/finish") => {
            let id = running(s, "w1", f.project).await;
            let body = json!({"outcome": "succeeded", "exit_code": 0});
            (
                post,
                at(format!("/v1/tasks/{id}/attempts/1/finish")),
                Some(body),
                &[200],
            )
        }
        ("POST", "/v1/tasks/{id}/attempts/{n}/ready") => {
            let id = running(s, "w1", f.project).await;
            (
                post,
                at(format!("/v1/tasks/{id}/attempts/1/ready")),
                None,
                &[204],
            )
        }
        ("POST", "/v1/services") => {
            let body = json!({"name": format!("made-{n}"), "replicas": 0,
                              "template": {"shell": "true", "project": f.project}});
            (post, at(path.into()), Some(body), &[201])
        }
        ("GET", "/v1/services") => (get, at(path.into()), None, &[200]),
        ("GET", "/v1/services/{name}") => {
            (get, at(format!("/v1/services/{}", f.service)), None, &[200])
        }
        ("PATCH", "/v1/services/{name}") => (
            Method::PATCH,
            at(format!("/v1/services/{}", f.service)),
            Some(json!({"replicas": 2})),
            &[200],
        ),
        ("POST", "/v1/services/{name}/stop") => {
            let name = service(s, &format!("stopped-{n}"), f.project).await;
            (post, at(format!("/v1/services/{name}/stop")), None, &[202])
        }
        ("GET", "/v1/workers") => (get, at(path.into()), None, &[200]),
        ("GET", "/v1/workers/{id}") => (get, at(format!("/v1/workers/{}", f.worker)), None, &[200]),
        ("POST", "/v1/workers/{id}/events") => {
            let data = json!({"worker_id": "w1", "capacity": {"cpu": 1.0, "memory": 1 << 30},
                              "projects": [f.project]});
            let body = json!({"type": "dev.tasklog.worker.registered.v1", "data": data});
            (post, at("/v1/workers/w1/events".into()), Some(body), &[202])
        }
        ("GET", "/v1/workers/{id}/assignments") => {
            (get, at("/v1/workers/w1/assignments".into()), None, &[200])
        }
        ("GET", "/v1/traces/{trace_id}") => {
            // The trace the fixture task was submitted in. It lists only what the caller
            // may read: another project's trace is not found (the list check below makes
            // sure a 200 shows none of it).
            let (_, t) = s.get(&format!("/v1/tasks/{}", f.task)).await;
            let tp = t["traceparent"]
                .as_str()
                .expect("a submitted task has a trace");
            let trace_id = tp.split('-').nth(1).expect("trace id").to_string();
            let ok: &'static [u16] = if f.project == "default" {
                &[200]
            } else {
                &[200, 404]
            };
            (get, at(format!("/v1/traces/{trace_id}")), None, ok)
        }
        ("GET", "/v1/logs") => (get, at(path.into()), None, &[200]),
        ("GET", "/v1/tasks/{id}/logs") => {
            (get, at(format!("/v1/tasks/{}/logs", f.task)), None, &[200])
        }
        ("POST", "/v1/tasks/{id}/logs") => (
            post,
            at(format!("/v1/tasks/{}/logs?attempt=1", f.task)),
            Some(json!([{"stream": "stdout", "text": "posted"}])),
            &[202],
        ),
        ("POST", "/v1/tokens") => (
            post,
            at(path.into()),
            Some(json!({"name": format!("made-{n}"), "role": "reader"})),
            &[201],
        ),
        ("GET", "/v1/tokens") => (get, at(path.into()), None, &[200]),
        ("GET", "/v1/whoami") => (get, at(path.into()), None, &[200]),
        ("POST", "/v1/tokens/{name}/revoke") => {
            let name = format!("doomed-{n}");
            create_token(&s.broker, &s.db, &name, "reader", &[]);
            (post, at(format!("/v1/tokens/{name}/revoke")), None, &[200])
        }
        ("GET", "/healthz" | "/readyz" | "/metrics" | "/v1/openapi.json") => {
            (get, at(path.into()), None, &[200])
        }
        (m, p) => panic!("no request for {m} {p}: add the route to tests/auth.rs"),
    }
}

/// A worker agent `name` calling the API with `token`, once the projection lists it
/// as active; with its state directory.
async fn start_agent(s: &Stack, name: &str, token: &str) -> (common::Proc, tempfile::TempDir) {
    let state_dir = tempfile::tempdir().expect("state dir");
    let child = role(
        &s.broker,
        &s.db,
        &[
            "worker",
            "--name",
            name,
            "--api",
            &s.url,
            "--heartbeat",
            "500ms",
            "--state-dir",
            state_dir.path().to_str().expect("UTF-8"),
        ],
    )
    .env("TASKLOG_TOKEN", token)
    .spawn()
    .expect("spawn worker");
    eventually(
        &format!("worker {name} active"),
        Duration::from_secs(60),
        || async {
            let (status, w) = s.get(&format!("/v1/workers/{name}")).await;
            (status == 200 && w["state"] == "active").then_some(())
        },
    )
    .await;
    (common::Proc::wrap(child, "worker"), state_dir)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_answers_every_role_and_refuses_every_bad_token() {
    let s = Stack::start().await;
    let callers = Callers {
        admin: s.http.clone(),
        submitter: client_with_token(&create_token(&s.broker, &s.db, "sam", "submitter", &[])),
        reader: client_with_token(&create_token(&s.broker, &s.db, "rita", "reader", &[])),
        worker: client_with_token(&create_token(&s.broker, &s.db, "w1", "worker", &[])),
    };
    // A real worker agent with a worker token of its own registers (on Kafka) and polls
    // its assignments through the API with that token.
    let agent_token = create_token(&s.broker, &s.db, "agent-1", "worker", &[]);
    let (mut agent, _agent_dir) = start_agent(&s, "agent-1", &agent_token).await;
    // And one that serves only project ml, for the other project's fixtures.
    let ml_token = create_token(&s.broker, &s.db, "agent-ml", "worker", &["--project", "ml"]);
    let (_ml_agent, _ml_dir) = start_agent(&s, "agent-ml", &ml_token).await;
    // The tokens but the admin's reach project `default` only: its entities are their
    // own, those of `ml` another project's.
    let fixtures = Fixtures {
        project: "default",
        task: task(&s, "default").await,
        service: service(&s, "shared", "default").await,
        worker: "agent-1".into(),
    };
    let others = Fixtures {
        project: "ml",
        task: task(&s, "ml").await,
        service: service(&s, "shared-ml", "ml").await,
        worker: "agent-ml".into(),
    };

    let routes = tasklog::api::routes::all();
    let mut n = 0;
    for (verb, path) in &routes {
        let method = verb.as_str();
        let need = needs(method, path);
        for f in [&fixtures, &others] {
            for who in [Who::Admin, Who::Submitter, Who::Reader, Who::Worker] {
                n += 1;
                let (m, url, body, ok) = request_for(&s, f, method, path, n).await;
                let (status, answer, _) = call(callers.of(who), m, &url, body.as_ref()).await;
                let fenced =
                    f.project != "default" && who != Who::Admin && project_scoped(method, path);
                if need.allows(who) && fenced && *path == "/v1/tasks/batch" {
                    // A batch refuses the item, not the batch.
                    assert_eq!(status, 202, "{who:?} batch into ml: {answer}");
                    assert_eq!(
                        answer["results"][0]["error"]["code"], "forbidden",
                        "{answer}"
                    );
                } else if need.allows(who) && !fenced {
                    assert!(
                        ok.contains(&status),
                        "{who:?} {method} {path} ({}): expected {ok:?}, got {status} {answer}",
                        f.project
                    );
                } else {
                    assert_eq!(
                        status, 403,
                        "{who:?} {method} {path} ({}): {answer}",
                        f.project
                    );
                    assert_eq!(answer["error"]["code"], "forbidden", "{answer}");
                }
                // A list shows a caller nothing of a project it does not reach.
                let list = matches!(
                    (method, *path),
                    (
                        "GET",
                        "/v1/tasks"
                            | "/v1/services"
                            | "/v1/workers"
                            | "/v1/traces/{trace_id}"
                            | "/v1/logs"
                    )
                );
                if list && who != Who::Admin && status == 200 {
                    let text = answer.to_string();
                    for hidden in [&others.task, &others.service, &others.worker] {
                        assert!(
                            !text.contains(hidden.as_str()),
                            "{who:?} {method} {path} shows {hidden} of project ml: {text}"
                        );
                    }
                }
            }
        }
    }
    assert_eq!(
        n,
        routes.len() * 8,
        "every route was called by every role, in both projects"
    );
    assert!(routes.len() >= 28, "the route table shrank: {routes:?}");
    // The agent polled with its own token all along; it is still active.
    assert!(agent.running(), "the worker agent exited");

    // Every bad token, on every route that needs one.
    let unknown = format!("tlk_{}", "A".repeat(43));
    let revoked = create_token(&s.broker, &s.db, "gone", "admin", &[]);
    let (status, body) = s.post("/v1/tokens/gone/revoke", &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let expiring = create_token(&s.broker, &s.db, "brief", "admin", &["--expires", "1s"]);
    let brief = client_with_token(&expiring);
    eventually(
        "the 1 s token to expire",
        Duration::from_secs(15),
        || async {
            let (status, _, _) =
                call(&brief, Method::GET, &format!("{}/v1/tasks", s.url), None).await;
            (status == 401).then_some(())
        },
    )
    .await;
    let bad: Vec<(&str, reqwest::Client)> = vec![
        ("none", reqwest::Client::new()),
        ("malformed", client_with_token("not-a-token")),
        ("unknown", client_with_token(&unknown)),
        ("revoked", client_with_token(&revoked)),
        ("expired", brief),
    ];
    for (verb, path) in &routes {
        let method = verb.as_str();
        let concrete = path
            .replace("{id}", &fixtures.task)
            .replace("{n}", "1")
            .replace("{name}", "shared");
        let url = format!("{}{concrete}", s.url);
        let m = Method::from_bytes(method.as_bytes()).expect("method");
        for (kind, client) in &bad {
            let (status, answer, challenge) = call(client, m.clone(), &url, Some(&json!({}))).await;
            if needs(method, path) == Needs::Nothing {
                assert!(
                    status < 400,
                    "{kind} token on open {method} {path}: {status}"
                );
                continue;
            }
            assert_eq!(status, 401, "{kind} token, {method} {path}: {answer}");
            let code = answer["error"]["code"].as_str().unwrap_or_default();
            let expected = if *kind == "none" {
                "unauthenticated"
            } else {
                "invalid_token"
            };
            assert_eq!(code, expected, "{kind}: {answer}");
            assert!(
                challenge
                    .as_deref()
                    .is_some_and(|c| c.starts_with("Bearer")),
                "{kind} {method} {path}: WWW-Authenticate {challenge:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_token_acts_only_as_its_own_worker() {
    let s = Stack::start().await;
    let w1 = client_with_token(&create_token(&s.broker, &s.db, "w1", "worker", &[]));
    let theirs = assigned(&s, "w2", "default").await;
    let url = |p: &str| format!("{}{p}", s.url);

    // Register as another worker, poll for it, report for it, or claim its attempt.
    let registered = |worker: &str, projects: Value| {
        json!({"type": "dev.tasklog.worker.registered.v1",
               "data": {"worker_id": worker, "capacity": {"cpu": 1.0, "memory": 1 << 30},
                        "projects": projects}})
    };
    let register = url("/v1/workers/w2/events");
    let (status, body, _) = call(
        &w1,
        Method::POST,
        &register,
        Some(&registered("w2", json!(["default"]))),
    )
    .await;
    assert_eq!(status, 403, "registering as w2: {body}");
    let own = url("/v1/workers/w1/events");
    let (status, body, _) = call(
        &w1,
        Method::POST,
        &own,
        Some(&registered("w1", json!(["ml"]))),
    )
    .await;
    assert_eq!(
        status, 403,
        "registering for a project out of reach: {body}"
    );
    let (status, body, _) = call(&w1, Method::POST, &own, Some(&registered("w1", json!([])))).await;
    assert_eq!(status, 403, "registering for every project: {body}");
    let (status, body, _) = call(
        &w1,
        Method::POST,
        &own,
        Some(&registered("w2", json!(["default"]))),
    )
    .await;
    assert_eq!(status, 400, "data of another worker: {body}");
    let lost =
        json!({"type": "dev.tasklog.worker.lost.v1", "data": {"worker_id": "w1", "reason": "x"}});
    let (status, body, _) = call(&w1, Method::POST, &own, Some(&lost)).await;
    assert_eq!(status, 400, "a worker saying it is lost: {body}");
    let (status, body, _) = call(
        &w1,
        Method::POST,
        &own,
        Some(&registered("w1", json!(["default"]))),
    )
    .await;
    assert_eq!(status, 202, "registering as itself: {body}");
    let (status, body, _) = call(&w1, Method::GET, &url("/v1/workers/w2/assignments"), None).await;
    assert_eq!(status, 403, "{body}");
    let start = url(&format!("/v1/tasks/{theirs}/attempts/1/start"));
    let (status, body, _) =
        call(&w1, Method::POST, &start, Some(&json!({"worker_id": "w2"}))).await;
    assert_eq!(status, 403, "{body}");
    let (status, body, _) =
        call(&w1, Method::POST, &start, Some(&json!({"worker_id": "w1"}))).await;
    assert_eq!(status, 403, "claiming w2's attempt as w1: {body}");
    let finish = url(&format!("/v1/tasks/{theirs}/attempts/1/finish"));
    let outcome = json!({"outcome": "failed", "exit_code": 1});
    let (status, body, _) = call(&w1, Method::POST, &finish, Some(&outcome)).await;
    assert_eq!(status, 403, "{body}");
    // Nor submit or cancel.
    let (status, body, _) = call(
        &w1,
        Method::POST,
        &url("/v1/tasks"),
        Some(&json!({"shell": "true"})),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let cancel = url(&format!("/v1/tasks/{theirs}/cancel"));
    let (status, body, _) = call(&w1, Method::POST, &cancel, Some(&json!({}))).await;
    assert_eq!(status, 403, "{body}");
    // None of it reached the log: w2's attempt is as the scheduler left it.
    let t = s.task(&theirs).await;
    assert_eq!(t["state"], "assigned", "{t}");
    assert_eq!(t["seq"], 2, "{t}");

    // Its own attempt it may report, and the events say who did.
    let mine = assigned(&s, "w1", "default").await;
    let start = url(&format!("/v1/tasks/{mine}/attempts/1/start"));
    let (status, body, _) =
        call(&w1, Method::POST, &start, Some(&json!({"worker_id": "w1"}))).await;
    assert_eq!(status, 200, "{body}");
    let (_, events) = s.get(&format!("/v1/tasks/{mine}/events")).await;
    let started = &events["events"][2];
    assert_eq!(started["type"], "dev.tasklog.task.started.v1", "{events}");
    assert_eq!(started["principal"], "w1", "{events}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_principal_is_on_every_event_the_api_appends() {
    let s = Stack::start().await;
    let alice = client_with_token(&create_token(&s.broker, &s.db, "alice", "submitter", &[]));
    let (status, body, _) = call(
        &alice,
        Method::POST,
        &format!("{}/v1/tasks", s.url),
        Some(&json!({"shell": "sleep 60"})),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    s.task(&id).await;
    let (status, body) = s.post(&format!("/v1/tasks/{id}/cancel"), &json!({})).await;
    assert_eq!(status, 202, "{body}");
    let (_, history) = s.get(&format!("/v1/tasks/{id}/events")).await;
    let who: Vec<(&str, &str)> = history["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default(),
                e["principal"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        who,
        vec![
            ("dev.tasklog.task.submitted.v1", "alice"),
            ("dev.tasklog.task.cancel_requested.v1", "harness"),
            ("dev.tasklog.task.cancelled.v1", "harness"),
        ]
    );
    // On the log itself, as the CloudEvents extension attribute.
    let records = s.broker.read_all(&s.broker.events_topic());
    let principals: Vec<Option<&str>> = records
        .iter()
        .filter(|r| r.key.as_deref() == Some(id.as_str()))
        .map(|r| r.header("ce_tasklogprincipal"))
        .collect();
    assert_eq!(
        principals,
        vec![Some("alice"), Some("harness"), Some("harness")]
    );
    // And the grants: who created the tokens.
    let (_, tokens) = s.get("/v1/tokens").await;
    let alice = tokens["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .find(|t| t["name"] == "alice")
        .expect("alice's token")
        .clone();
    assert!(
        alice["created_by"]
            .as_str()
            .is_some_and(|c| c.starts_with("operator:")),
        "{alice}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revocation_reaches_a_second_api_server_within_the_bound() {
    let s = Stack::start().await;
    let (_second, second) = start_server(&s.broker, &s.db, &[("TASKLOG_AUTH", "tokens")]).await;
    let token = create_token(&s.broker, &s.db, "ci", "reader", &[]);
    let ci = client_with_token(&token);
    for base in [&s.url, &second] {
        let (status, body, _) = call(&ci, Method::GET, &format!("{base}/v1/tasks"), None).await;
        assert_eq!(status, 200, "{base}: {body}");
    }
    let revoked_at = Instant::now();
    let (status, body) = s.post("/v1/tokens/ci/revoke", &json!({})).await;
    assert_eq!(status, 200, "{body}");
    // The documented bound: the projector applies it (the revoke answers then), and
    // every server reloads on the projection's notification, at the latest 5 s later.
    eventually(
        "the second server to refuse",
        Duration::from_secs(20),
        || async {
            let (status, _, _) = call(&ci, Method::GET, &format!("{second}/v1/tasks"), None).await;
            (status == 401).then_some(())
        },
    )
    .await;
    let took = revoked_at.elapsed();
    assert!(
        took <= tasklog::api::auth::RELOAD_EVERY + Duration::from_secs(1),
        "the second server refused the revoked token only after {took:?}"
    );
    eprintln!("revocation reached the second server in {took:?}");

    // An admin cannot revoke its own token by accident; the operator on the host can.
    let (status, body) = s.post("/v1/tokens/harness/revoke", &json!({})).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "revoking_yourself", "{body}");
    let output = finish(
        role(
            &s.broker,
            &s.db,
            &["token", "revoke", "--direct", "harness"],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped()),
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    eventually(
        "the second server to refuse the admin",
        Duration::from_secs(20),
        || async {
            let (status, _, _) =
                call(&s.http, Method::GET, &format!("{second}/v1/tasks"), None).await;
            (status == 401).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_or_hash_reaches_logs_metrics_events_or_errors() {
    let s = Stack::start().await;
    let log = tempfile::NamedTempFile::new().expect("log file");
    let port = free_port();
    let mut server = common::Proc::wrap(
        role(
            &s.broker,
            &s.db,
            &["server", "--http-addr", &format!("127.0.0.1:{port}")],
        )
        .env("RUST_LOG", "debug")
        .stdout(log.reopen().expect("log"))
        .stderr(log.reopen().expect("log"))
        .spawn()
        .expect("spawn server"),
        "server",
    );
    let url = format!("http://127.0.0.1:{port}");
    common::wait_ready("the logging server", &url).await;
    // Tokens made by the operator command (its output captured) and by the API.
    let output = finish(
        role(
            &s.broker,
            &s.db,
            &[
                "token",
                "create",
                "--direct",
                "--name",
                "op",
                "--role",
                "submitter",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped()),
    );
    assert!(output.status.success());
    let op = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let op_stderr = String::from_utf8_lossy(&output.stderr).to_string();
    let (status, made) = s
        .post("/v1/tokens", &json!({"name": "made", "role": "reader"}))
        .await;
    assert_eq!(status, 201, "{made}");
    let api_made = made["token"].as_str().expect("token").to_string();
    let mut errors = String::new();
    for token in [&op, &api_made] {
        let client = client_with_token(token);
        let (status, body, _) = call(
            &client,
            Method::POST,
            &format!("{url}/v1/tasks"),
            Some(&json!({"shell": "true"})),
        )
        .await;
        errors.push_str(&body.to_string());
        assert!(status == 202 || status == 403, "{status} {body}");
        // A near miss of a real token: refused, without echoing it.
        let near = format!("{}x", &token[..token.len() - 1]);
        let (status, body, _) = call(
            &client_with_token(&near),
            Method::GET,
            &format!("{url}/v1/tasks"),
            None,
        )
        .await;
        assert_eq!(status, 401);
        errors.push_str(&body.to_string());
    }
    let (status, body) = s.post("/v1/tokens/made/revoke", &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let (_, revoked, _) = call(
        &client_with_token(&api_made),
        Method::GET,
        &format!("{url}/v1/tasks"),
        None,
    )
    .await;
    errors.push_str(&revoked.to_string());
    let (_, listed) = s.get("/v1/tokens").await;
    let metrics = s.text("/metrics").await
        + &reqwest::get(format!("{url}/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
    server.kill();
    let server_log = std::fs::read_to_string(log.path()).expect("server log");
    let mut on_the_log = String::new();
    for topic in ["events", "auth", "dlq", "workers", "services", "logs"] {
        for r in s.broker.read_all(&format!("{}.{topic}", s.broker.prefix)) {
            on_the_log.push_str(&format!("{r:?}"));
        }
    }
    assert!(
        on_the_log.contains("token_created"),
        "the auth topic was read"
    );
    let rows =
        s.db.client()
            .await
            .query("SELECT doc::text FROM tokens", &[])
            .await
            .expect("tokens");
    let projected: String = rows.iter().map(|r| r.get::<_, String>(0)).collect();
    for token in [&op, &api_made, &s.token] {
        let hash = sha2_hex(token);
        for (what, text) in [
            ("the server's log", &server_log),
            ("the operator command's messages", &op_stderr),
            ("the API's errors", &errors),
            ("the token list", &listed.to_string()),
            ("/metrics", &metrics),
            ("the topics", &on_the_log),
            ("the tokens projection", &projected),
        ] {
            assert!(!text.contains(token.as_str()), "a token is in {what}");
            assert!(!text.contains(&hash), "a token's hash is in {what}");
        }
    }
}

/// The hex SHA-256 of a token (what would leak if the stored hash did).
fn sha2_hex(token: &str) -> String {
    tasklog::events::auth::token_hash(token)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_defaults_are_safe() {
    let s = Stack::start().await;
    // No auth is refused beyond loopback, before anything listens.
    let port = free_port();
    let output = finish(
        role(
            &s.broker,
            &s.db,
            &[
                "server",
                "--http-addr",
                &format!("0.0.0.0:{port}"),
                "--auth",
                "off",
            ],
        )
        .stderr(Stdio::piped()),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("loopback"), "{stderr}");

    // `tasklog up`: an admin token on first start, mode 0600, which the CLI uses; kept
    // across a restart; TASKLOG_TOKEN overrides it.
    let state_dir = tempfile::tempdir().expect("state dir");
    let dir = state_dir.path().to_str().expect("UTF-8").to_string();
    let start_up = || {
        let port = free_port();
        let child = role(
            &s.broker,
            &s.db,
            &[
                "up",
                "--http-addr",
                &format!("127.0.0.1:{port}"),
                "--no-worker",
                "--state-dir",
                &dir,
            ],
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn up");
        (
            common::Proc::wrap(child, "up"),
            format!("http://127.0.0.1:{port}"),
        )
    };
    let (mut up, url) = start_up();
    common::wait_ready("tasklog up", &url).await;
    let file = state_dir.path().join("admin.token");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&file).expect("token file").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the token file's mode");
    let token = common::up_token(state_dir.path());
    let ls = |token: Option<&str>| {
        let mut c = role(&s.broker, &s.db, &["ls", "--json"]);
        c.env("TASKLOG_API_URL", &url)
            .env("TASKLOG_STATE_DIR", &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(t) = token {
            c.env("TASKLOG_TOKEN", t);
        }
        finish(&mut c)
    };
    let found = ls(None);
    assert!(
        found.status.success(),
        "{}",
        String::from_utf8_lossy(&found.stderr)
    );
    let overridden = ls(Some(&format!("tlk_{}", "B".repeat(43))));
    assert!(!overridden.status.success());
    assert!(String::from_utf8_lossy(&overridden.stderr).contains("401"));
    let (status, _, _) = call(
        &reqwest::Client::new(),
        Method::GET,
        &format!("{url}/v1/tasks"),
        None,
    )
    .await;
    assert_eq!(status, 401, "no token, no answer");
    common::signal(up.pid().into(), "-TERM");
    assert!(common::exits_within(&mut up, Duration::from_secs(30)).await);
    let (_up, url) = start_up();
    common::wait_ready("tasklog up, restarted", &url).await;
    assert_eq!(
        common::up_token(state_dir.path()),
        token,
        "the token is kept"
    );
    let (status, body, _) = call(
        &client_with_token(&token),
        Method::GET,
        &format!("{url}/v1/tasks"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn projects_fence_every_route_and_the_scheduler() {
    let mut c = common::Cluster::start(&[]).await;
    let (broker, db) = (&c.stack.broker, &c.stack.db);
    let ml_submitter = client_with_token(&create_token(
        broker,
        db,
        "ml-sub",
        "submitter",
        &["--project", "ml"],
    ));
    let default_submitter =
        client_with_token(&create_token(broker, db, "def-sub", "submitter", &[]));
    let ml_reader = client_with_token(&create_token(
        broker,
        db,
        "ml-read",
        "reader",
        &["--project", "ml"],
    ));
    let default_reader = client_with_token(&create_token(broker, db, "def-read", "reader", &[]));
    let base = c.stack.url.clone();
    let url = |p: &str| format!("{base}{p}");

    // Workers: one with a worker token of project ml (it serves what its token
    // reaches), one told to serve `default` only.
    let wml_token = create_token(broker, db, "wml", "worker", &["--project", "ml"]);
    let child = c
        .worker_command("wml", &[])
        .env("TASKLOG_TOKEN", &wml_token)
        .spawn()
        .expect("spawn worker");
    c.workers
        .push(("wml".into(), common::Proc::wrap(child, "worker")));
    c.wait_worker("wml", "active").await;
    c.add_worker("wdef", &["--project", "default"]).await;
    let (_, wml) = c.stack.get("/v1/workers/wml").await;
    assert_eq!(wml["projects"], json!(["ml"]), "{wml}");

    // Submitting: only into a project the token reaches.
    let submit = |client: &reqwest::Client, spec: Value| {
        let client = client.clone();
        let u = url("/v1/tasks");
        async move { call(&client, Method::POST, &u, Some(&spec)).await }
    };
    let (status, body, _) =
        submit(&ml_submitter, json!({"shell": "echo ml", "project": "ml"})).await;
    assert_eq!(status, 202, "{body}");
    let ml_task = body["id"].as_str().expect("id").to_string();
    let (status, body, _) = submit(&ml_submitter, json!({"shell": "true"})).await;
    assert_eq!(status, 403, "an ml token submitting into default: {body}");
    let (status, body, _) = submit(&default_submitter, json!({"shell": "echo default"})).await;
    assert_eq!(status, 202, "{body}");
    let default_task = body["id"].as_str().expect("id").to_string();

    // The scheduler places each on a worker of its project.
    let done = c
        .wait_state(&ml_task, "succeeded", Duration::from_secs(60))
        .await;
    assert_eq!(done["worker_id"], "wml", "{done}");
    let done = c
        .wait_state(&default_task, "succeeded", Duration::from_secs(60))
        .await;
    assert_eq!(done["worker_id"], "wdef", "{done}");

    // Reading: another project's task is refused on every route, and left out of lists.
    for path in [
        format!("/v1/tasks/{ml_task}"),
        format!("/v1/tasks/{ml_task}/events"),
        format!("/v1/tasks/{ml_task}/audit"),
        format!("/v1/tasks/{ml_task}/logs"),
        "/v1/tasks?project=ml".to_string(),
    ] {
        let (status, body, _) = call(&default_reader, Method::GET, &url(&path), None).await;
        assert_eq!(status, 403, "default reader, {path}: {body}");
        let (status, body, _) = call(&ml_reader, Method::GET, &url(&path), None).await;
        assert_eq!(status, 200, "ml reader, {path}: {body}");
    }
    let listed = |client: &reqwest::Client, path: &str| {
        let client = client.clone();
        let u = url(path);
        async move {
            let (status, body, _) = call(&client, Method::GET, &u, None).await;
            assert_eq!(status, 200, "{body}");
            body
        }
    };
    let ids = |body: &Value, key: &str, field: &str| -> Vec<String> {
        body[key]
            .as_array()
            .expect("a list")
            .iter()
            .filter_map(|t| t[field].as_str().map(str::to_string))
            .collect()
    };
    let seen = ids(&listed(&default_reader, "/v1/tasks").await, "tasks", "id");
    assert!(
        seen.contains(&default_task) && !seen.contains(&ml_task),
        "{seen:?}"
    );
    let seen = ids(&listed(&ml_reader, "/v1/tasks").await, "tasks", "id");
    assert!(
        seen.contains(&ml_task) && !seen.contains(&default_task),
        "{seen:?}"
    );
    let workers = ids(
        &listed(&default_reader, "/v1/workers").await,
        "workers",
        "id",
    );
    assert!(
        workers.contains(&"wdef".to_string()) && !workers.contains(&"wml".to_string()),
        "{workers:?}"
    );
    let (status, _, _) = call(&default_reader, Method::GET, &url("/v1/workers/wml"), None).await;
    assert_eq!(status, 403);

    // Writing: cancel, post log lines, services, all fenced by project.
    let (status, body, _) = call(
        &ml_submitter,
        Method::POST,
        &url("/v1/tasks"),
        Some(&json!({"shell": "sleep 60", "project": "ml", "selector": {"nowhere": "x"}})),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let parked = body["id"].as_str().expect("id").to_string();
    let cancel = url(&format!("/v1/tasks/{parked}/cancel"));
    let (status, body, _) = call(&default_submitter, Method::POST, &cancel, Some(&json!({}))).await;
    assert_eq!(status, 403, "{body}");
    let logs = url(&format!("/v1/tasks/{parked}/logs?attempt=1"));
    let line = json!([{"stream": "stdout", "text": "x"}]);
    let (status, body, _) = call(&default_submitter, Method::POST, &logs, Some(&line)).await;
    assert_eq!(status, 403, "{body}");
    let (status, body, _) = call(&ml_submitter, Method::POST, &cancel, Some(&json!({}))).await;
    assert_eq!(status, 202, "{body}");
    let service =
        json!({"name": "ml-svc", "replicas": 0, "template": {"shell": "true", "project": "ml"}});
    let (status, body, _) = call(
        &default_submitter,
        Method::POST,
        &url("/v1/services"),
        Some(&service),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, body, _) = call(
        &ml_submitter,
        Method::POST,
        &url("/v1/services"),
        Some(&service),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    for (method, path, body) in [
        (Method::GET, "/v1/services/ml-svc", None),
        (
            Method::PATCH,
            "/v1/services/ml-svc",
            Some(json!({"replicas": 0})),
        ),
        (Method::POST, "/v1/services/ml-svc/stop", None),
    ] {
        let (status, answer, _) = call(&default_submitter, method, &url(path), body.as_ref()).await;
        assert_eq!(status, 403, "{path}: {answer}");
    }
    let names = ids(
        &listed(&default_reader, "/v1/services").await,
        "services",
        "name",
    );
    assert!(!names.contains(&"ml-svc".to_string()), "{names:?}");
    let names = ids(
        &listed(&ml_reader, "/v1/services").await,
        "services",
        "name",
    );
    assert!(names.contains(&"ml-svc".to_string()), "{names:?}");
}
