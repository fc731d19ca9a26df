//! Services: `POST /v1/services`, `GET /v1/services`, `GET /v1/services/{name}`,
//! `PATCH /v1/services/{name}` (scale), `POST /v1/services/{name}/stop`, and the
//! replica readiness report `POST /v1/tasks/{id}/attempts/{n}/ready`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::Caller;
use super::traces::RequestTrace;
use super::transition::{Confirmation, Decision, append_and_confirm, transition};
use super::{ApiError, AppState, JsonBody};
use crate::events::auth::Principal;
use crate::events::service::{
    MAX_REPLICAS, ServiceEvent, ServiceLifecycle, ServicePayload, ServiceSpec, ServiceState,
    ServiceStatus, derive_status, latest_replicas, replica_ready, valid_service_name,
};
use crate::events::trace::TraceContext;
use crate::events::{Payload, TaskSpec, TaskStatus};
use crate::store::{EventOutcome, TaskRecord};

use super::tasks::parse_id;
use super::workers::parse_attempt;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
    replicas: u32,
    template: Value,
    #[serde(default)]
    retry: Option<Value>,
    #[serde(default)]
    probe: Option<Value>,
}

fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(code, message)
}

fn checked_name(name: &str) -> Result<&str, ApiError> {
    if valid_service_name(name) {
        Ok(name)
    } else {
        Err(bad(
            "invalid_service_name",
            format!("{name:?} is not a service name (letters, digits and ._- up to 128)"),
        ))
    }
}

fn checked_replicas(n: u32) -> Result<u32, ApiError> {
    if n <= MAX_REPLICAS {
        Ok(n)
    } else {
        Err(bad(
            "invalid_replicas",
            format!("replicas must be 0..={MAX_REPLICAS}, not {n}"),
        ))
    }
}

/// Checks the template as a task spec, with the service's retry and probe in it.
fn check_template(spec: &ServiceSpec) -> Result<(), ApiError> {
    let Value::Object(fields) = &spec.template else {
        return Err(bad("invalid_spec", "template must be a task spec object"));
    };
    for reserved in ["service", "replica", "idempotency_key", "after", "executor"] {
        if fields.contains_key(reserved) {
            return Err(bad(
                "invalid_spec",
                format!("template.{reserved}: not allowed in a service template"),
            ));
        }
    }
    TaskSpec::from_json(spec.template_with_policies())
        .map(|_| ())
        .map_err(|e| bad("invalid_spec", format!("template.{e}")))
}

/// Appends a service event and waits (as long as a task command does) until the
/// services projection has it. `Some(response)`: it was not projected in time, and the
/// response (202) says where it is on the log.
async fn append_service(
    state: &Arc<AppState>,
    caller: &Principal,
    name: &str,
    payload: ServicePayload,
    span: Option<TraceContext>,
) -> Result<Option<Response>, ApiError> {
    let mut event = ServiceEvent::new(&state.options.source, name, payload);
    event.traceparent = span;
    let event = event.encode().with_principal(&caller.name);
    let topic = &state.options.topics.services;
    match append_and_confirm(state, topic, std::slice::from_ref(&event)).await? {
        Confirmation::Pending(at) => Ok(Some(
            (
                StatusCode::ACCEPTED,
                Json(json!({
                    "name": name,
                    "applied": false,
                    "event": {"topic": topic, "partition": at.partition, "offset": at.offset},
                })),
            )
                .into_response(),
        )),
        Confirmation::Projected(Some(EventOutcome::Rejected { reason, message })) => {
            Err(ApiError::conflict(
                "service_event_rejected",
                format!("the service event was not applied ({reason}): {message}"),
            ))
        }
        Confirmation::Projected(_) => Ok(None),
    }
}

/// A replica as the API shows it.
fn replica_view(t: &TaskRecord) -> Value {
    let task = &t.task;
    json!({
        "index": task.spec.replica,
        "task_id": task.id,
        "state": task.state,
        "ready": replica_ready(task),
        "attempt": task.attempt,
        "worker_id": task.worker_id,
        "pid": task.current_attempt().and_then(|a| a.pid),
        "reason": task.reason,
        "attempts": task.attempts,
    })
}

/// A service's replicas as the API and the gauges show them.
struct Summary {
    /// The latest task of each replica index, by index.
    latest: Vec<TaskRecord>,
    /// How many of the wanted replicas are ready.
    ready: u32,
    /// The derived status.
    status: ServiceStatus,
}

/// `replicas`: the service's replica tasks, oldest first.
fn summarize(service: &ServiceState, replicas: &[TaskRecord]) -> Summary {
    let latest: Vec<TaskRecord> = latest_replicas(replicas, |r| &r.task)
        .into_values()
        .cloned()
        .collect();
    let wanted = service.spec.replicas;
    let current = || {
        latest
            .iter()
            .filter(|r| r.task.spec.replica.is_some_and(|i| i < wanted))
    };
    let ready = current().filter(|r| replica_ready(&r.task)).count() as u32;
    let any_failure = current().any(|r| r.task.retries > 0 || r.task.state.is_terminal());
    let status = derive_status(service.lifecycle, wanted, ready, any_failure);
    Summary {
        latest,
        ready,
        status,
    }
}

/// The service with its replicas and derived status.
async fn service_view(state: &AppState, service: &ServiceState) -> Result<Value, ApiError> {
    let replicas = state
        .store
        .service_replicas(&service.name, service.created_at)
        .await?;
    Ok(view_of(service, &replicas))
}

/// [`service_view`], given the service's replica tasks.
fn view_of(service: &ServiceState, replicas: &[TaskRecord]) -> Value {
    let summary = summarize(service, replicas);
    let mut v = serde_json::to_value(service).unwrap_or_default();
    v["status"] = json!(summary.status);
    v["ready_replicas"] = json!(summary.ready);
    v["replicas"] = Value::from(summary.latest.iter().map(replica_view).collect::<Vec<_>>());
    v
}

/// `POST /v1/services` `{name, replicas, template, retry, probe}`
pub async fn create(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    trace: RequestTrace,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let body: CreateBody =
        super::body::from_object(body, "{name, replicas, template, retry, probe}")?;
    checked_name(&body.name)?;
    checked_replicas(body.replicas)?;
    let spec = ServiceSpec {
        replicas: body.replicas,
        template: body.template,
        retry: body.retry,
        probe: body.probe,
    };
    check_template(&spec)?;
    caller.may_reach(spec.project())?;
    state.read_service(&body.name).await?;
    if let Some(existing) = state.store.service(&body.name).await?
        && !existing.lifecycle.is_terminal()
    {
        return Err(ApiError::conflict(
            "service_exists",
            format!("service {} is {}", body.name, existing.lifecycle.as_str()),
        ));
    }
    // The service's span: its replicas' submissions are children of it.
    let span = trace.span();
    let appended = append_service(
        &state,
        &caller,
        &body.name,
        ServicePayload::Created(Box::new(spec)),
        Some(span),
    )
    .await;
    trace.export(
        "create service",
        span,
        trace.parent,
        vec![("tasklog.service", body.name.clone())],
        appended.as_ref().err().map(|e| e.message.clone()),
    );
    if let Some(mut pending) = appended? {
        super::traces::tell(&mut pending, &span);
        return Ok(pending);
    }
    let service = state
        .store
        .service(&body.name)
        .await?
        .ok_or_else(|| ApiError::not_found("the service was not projected"))?;
    let mut created = (
        StatusCode::CREATED,
        Json(service_view(&state, &service).await?),
    )
        .into_response();
    super::traces::tell(&mut created, &span);
    Ok(created)
}

/// `GET /v1/services`: those of the projects the caller reaches.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
) -> Result<Json<Value>, ApiError> {
    let mut services = state.store.services().await?;
    services.retain(|s| caller.reaches(s.spec.project()));
    let mut replicas = state.store.replicas_of(&services).await?;
    let out: Vec<Value> = services
        .iter()
        .map(|s| view_of(s, &replicas.remove(&s.name).unwrap_or_default()))
        .collect();
    Ok(Json(json!({ "services": out })))
}

/// The service `name` as the log has it: read-your-writes first (see
/// [`AppState::read_your_writes`]), then the projection.
async fn load_current(
    state: &AppState,
    caller: &Principal,
    name: &str,
) -> Result<ServiceState, ApiError> {
    let name = checked_name(name)?;
    state.read_service(name).await?;
    let service = load(state, name).await?;
    caller.may_reach(service.spec.project())?;
    Ok(service)
}

async fn load(state: &AppState, name: &str) -> Result<ServiceState, ApiError> {
    let name = checked_name(name)?;
    state
        .store
        .service(name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("service {name:?} is not on the log")))
}

/// `GET /v1/services/{name}`
pub async fn get_service(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let service = load_current(&state, &caller, &name).await?;
    Ok(Json(service_view(&state, &service).await?))
}

/// `PATCH /v1/services/{name}` `{replicas}`: scale up (new replicas) or down (the
/// highest indexes are cancelled with reason `scaled_down`).
pub async fn scale(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    trace: RequestTrace,
    Path(name): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ScaleBody {
        replicas: u32,
    }
    let body: ScaleBody = super::body::from_object(body, "{replicas}")?;
    let replicas = checked_replicas(body.replicas)?;
    let service = load_current(&state, &caller, &name).await?;
    if service.lifecycle != ServiceLifecycle::Active {
        return Err(ApiError::conflict(
            "service_not_active",
            format!("service {name} is {}", service.lifecycle.as_str()),
        ));
    }
    if let Some(pending) = append_service(
        &state,
        &caller,
        &service.name,
        ServicePayload::Scaled { replicas },
        trace.parent.or(service.traceparent),
    )
    .await?
    {
        return Ok(pending);
    }
    let service = load(&state, &name).await?;
    Ok(Json(service_view(&state, &service).await?).into_response())
}

/// `POST /v1/services/{name}/stop`: cancels every replica (reason `service_stopped`).
pub async fn stop(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    trace: RequestTrace,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let service = load_current(&state, &caller, &name).await?;
    if service.lifecycle != ServiceLifecycle::Active {
        return Err(ApiError::conflict(
            "service_not_active",
            format!("service {name} is {}", service.lifecycle.as_str()),
        ));
    }
    if let Some(pending) = append_service(
        &state,
        &caller,
        &service.name,
        ServicePayload::StopRequested,
        trace.parent.or(service.traceparent),
    )
    .await?
    {
        return Ok(pending);
    }
    let service = load(&state, &name).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(service_view(&state, &service).await?),
    )
        .into_response())
}

/// `POST /v1/tasks/{id}/attempts/{n}/ready`: the worker's probe passed.
pub async fn ready(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    trace: RequestTrace,
    Path((id, n)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let attempt = parse_attempt(&n)?;
    transition(&state, &caller, id, trace.parent, |task| {
        super::workers::reporter_may_report(&caller, task)?;
        if task.state != TaskStatus::Running || task.attempt != attempt {
            return Err(ApiError::conflict(
                "attempt_not_current",
                format!("attempt {attempt} of task {id} is not running"),
            ));
        }
        if task.ready {
            return Ok(Decision::AlreadyDone);
        }
        Ok(Decision::Append(vec![Payload::Ready { attempt }]))
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Sets the service gauges (at scrape time).
pub async fn refresh_gauges(state: &AppState) -> Result<(), ApiError> {
    let m = crate::metrics::metrics();
    let services = state.store.services().await?;
    let mut replicas = state.store.replicas_of(&services).await?;
    for service in services {
        let summary = summarize(
            &service,
            &replicas.remove(&service.name).unwrap_or_default(),
        );
        for s in ServiceStatus::ALL {
            m.service_status
                .with_label_values(&[&service.name, s.as_str()])
                .set(i64::from(*s == summary.status));
        }
        let mut counts: std::collections::BTreeMap<&str, i64> =
            [("ready", 0), ("starting", 0), ("waiting", 0), ("ended", 0)].into();
        for r in &summary.latest {
            let key = match r.task.state {
                _ if replica_ready(&r.task) => "ready",
                TaskStatus::Running | TaskStatus::Assigned => "starting",
                TaskStatus::Pending | TaskStatus::Queued => "waiting",
                _ => "ended",
            };
            *counts.entry(key).or_default() += 1;
        }
        for (k, n) in counts {
            m.service_replicas
                .with_label_values(&[&service.name, k])
                .set(n);
        }
    }
    Ok(())
}
