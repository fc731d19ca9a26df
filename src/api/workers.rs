//! Workers and their attempts: `GET /v1/workers`, `GET /v1/workers/{id}`, the
//! assignment long-poll a worker agent waits on, and the attempt reports it sends.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::auth::Caller;
use super::traces::RequestTrace;
use super::transition::{Decision, Outcome, transition};
use super::{ApiError, AppState, JsonBody};
use crate::events::auth::{Principal, Role};
use crate::events::worker::{WorkerEvent, WorkerEventType, WorkerState};
use crate::events::{Payload, TaskState, TaskStatus};
use crate::scheduler::plan::Capacity;
use crate::store::TaskRecord;

use super::tasks::{parse_id, query_pairs, single, wait_param};

/// The capacity these tasks take.
fn used_by(tasks: &[TaskRecord]) -> Capacity {
    tasks.iter().fold(Capacity::default(), |used, t| {
        used.saturating_add(crate::scheduler::need_of(&t.task.spec))
    })
}

/// A worker with what it runs and the capacity that takes.
fn worker_view(worker: &WorkerState, tasks: &[TaskRecord]) -> Value {
    let used = used_by(tasks);
    let mut v = serde_json::to_value(worker).unwrap_or_default();
    v["used"] = json!({
        "cpu": used.cpu_milli as f64 / 1000.0,
        "memory": used.memory,
        "gpu": used.gpu,
    });
    v["tasks"] = Value::from(
        tasks
            .iter()
            .map(|t| json!({"id": t.task.id, "state": t.task.state, "attempt": t.task.attempt}))
            .collect::<Vec<_>>(),
    );
    v
}

fn checked_worker_id(id: &str) -> Result<&str, ApiError> {
    if crate::events::worker::valid_worker_id(id) {
        Ok(id)
    } else {
        Err(ApiError::bad_request(
            "invalid_worker_id",
            format!("{id:?} is not a worker id (letters, digits and ._:@- up to 256)"),
        ))
    }
}

/// Whether `caller` sees `worker`: it serves a project the caller reaches.
fn sees(caller: &Principal, worker: &WorkerState) -> bool {
    match caller.visible_projects() {
        None => true,
        Some(projects) => projects.iter().any(|p| worker.info.serves(p)),
    }
}

/// `GET /v1/workers`: the workers serving a project the caller reaches.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
) -> Result<Json<Value>, ApiError> {
    let (workers, mut placed) =
        tokio::try_join!(state.store.workers(), state.store.tasks_by_worker())?;
    let out: Vec<Value> = workers
        .iter()
        .filter(|w| sees(&caller, w))
        .map(|w| worker_view(w, &placed.remove(&w.id).unwrap_or_default()))
        .collect();
    Ok(Json(json!({ "workers": out })))
}

/// `GET /v1/workers/{id}`
pub async fn get_worker(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = checked_worker_id(&id)?;
    state.read_worker(id).await?;
    let Some(worker) = state.store.worker(id).await? else {
        return Err(ApiError::not_found(format!(
            "worker {id:?} is not on the log"
        )));
    };
    if !sees(&caller, &worker) {
        return Err(ApiError::forbidden(format!(
            "worker {id:?} serves no project the token {:?} reaches",
            caller.name
        )));
    }
    let tasks = state.store.tasks_on_worker(id).await?;
    Ok(Json(worker_view(&worker, &tasks)))
}

/// One assignment as the worker agent sees it.
fn assignment(task: &TaskState) -> Value {
    json!({
        "task_id": task.id,
        "attempt": task.attempt,
        "state": task.state,
        "cancel_requested": task.cancel_requested,
        "reason": task.reason,
        "spec": task.spec,
        "traceparent": task.traceparent,
    })
}

/// `GET /v1/workers/{id}/assignments?wait_ms=N&known=V`
///
/// The attempts assigned to or running on the worker, with cancel requests, and the
/// worker's own state (so an agent learns that it was declared lost). `version`
/// identifies the answer: with `known` equal to it, the call waits (on projection
/// notifications) up to `wait_ms` for something to change.
pub async fn assignments(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let id = checked_worker_id(&id)?.to_string();
    caller.may_act_as_worker(&id)?;
    let pairs = query_pairs(&query, &["wait_ms", "known"])?;
    let wait = wait_param(&state, &pairs, Duration::ZERO)?;
    let known = single(&pairs, "known")?.map(str::to_string);
    let deadline = Instant::now() + wait;
    let mut changes = state.projection.clone();
    loop {
        changes.borrow_and_update();
        let (worker, tasks) =
            tokio::try_join!(state.store.worker(&id), state.store.tasks_on_worker(&id))?;
        let worker_state = worker.as_ref().map(|w| w.state.as_str());
        let incarnation = worker.as_ref().and_then(|w| w.info.incarnation.clone());
        let mut hasher = DefaultHasher::new();
        worker_state.hash(&mut hasher);
        incarnation.hash(&mut hasher);
        for t in &tasks {
            (t.task.id, t.task.seq).hash(&mut hasher);
        }
        let version = format!("{:016x}", hasher.finish());
        let unchanged = known.as_deref() == Some(version.as_str());
        if !unchanged || Instant::now() >= deadline {
            let items: Vec<Value> = tasks.iter().map(|t| assignment(&t.task)).collect();
            return Ok(Json(json!({
                "worker_id": id,
                "worker_state": worker_state,
                "incarnation": incarnation,
                "version": version,
                "assignments": items,
            })));
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => {}
            // Deadline: answer with what there is (one more look first). Without
            // notifications (their follower is gone), wait out the deadline rather
            // than query in a loop.
            Err(_) => {}
            Ok(Err(_)) => tokio::time::sleep_until(deadline).await,
        }
    }
}

/// Body of `POST /v1/workers/{id}/events`: a worker's own event, as its agent would
/// have appended it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PostedWorkerEvent {
    /// `dev.tasklog.worker.registered.v1`, `...heartbeat.v1` or `...draining.v1`.
    #[serde(rename = "type")]
    event_type: String,
    /// The event's data, as its schema says (`worker_id` equal to the path's).
    data: Value,
    /// `ce_source` (default: this API's).
    #[serde(default)]
    source: Option<String>,
}

/// `POST /v1/workers/{id}/events`: a worker agent registers, heartbeats and drains
/// through the API, as the worker its token is named after (an admin, as any), and
/// only for projects its token reaches. `lost` is the scheduler's to say. `202` once
/// the broker has the record.
pub async fn post_event(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let id = checked_worker_id(&id)?.to_string();
    caller.may_act_as_worker(&id)?;
    let posted: PostedWorkerEvent = super::body::from_object(body, "{type, data, source?}")?;
    let allowed = [
        WorkerEventType::Registered,
        WorkerEventType::Heartbeat,
        WorkerEventType::Draining,
    ];
    if !allowed.iter().any(|t| t.as_str() == posted.event_type) {
        return Err(ApiError::bad_request(
            "invalid_event_type",
            format!(
                "type {:?}: a worker posts registered, heartbeat or draining (v1)",
                posted.event_type
            ),
        ));
    }
    let source = posted
        .source
        .unwrap_or_else(|| state.options.source.clone());
    let event = WorkerEvent::from_data(&source, &id, &posted.event_type, &posted.data)
        .map_err(|r| ApiError::bad_request("invalid_event", r.to_string()))?;
    if let Some(info) = event.payload.info() {
        let reach_all = caller.reaches_all();
        if info.projects.is_empty() && !reach_all {
            return Err(ApiError::forbidden(format!(
                "the token {:?} does not reach every project: the worker must name its projects",
                caller.name
            )));
        }
        for p in info
            .projects
            .iter()
            .filter(|p| p.as_str() != "*" || !reach_all)
        {
            caller.may_reach(p)?;
        }
    }
    let encoded = event.encode().with_principal(&caller.name);
    let result = state
        .appender
        .append(&state.options.topics.workers, &encoded)
        .await;
    crate::consistency::count_append(encoded.event_type, &result);
    let at = result?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"event": {"partition": at.partition, "offset": at.offset}})),
    )
        .into_response())
}

/// Body of `POST /v1/tasks/{id}/attempts/{n}/start`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartReport {
    worker_id: String,
    #[serde(default)]
    pid: Option<u32>,
}

/// How an attempt ended, as its worker reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ReportedOutcome {
    Succeeded,
    Failed,
    Cancelled,
}

/// Body of `POST /v1/tasks/{id}/attempts/{n}/finish`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FinishReport {
    outcome: ReportedOutcome,
    #[serde(default)]
    exit_code: Option<i32>,
    #[serde(default)]
    signal: Option<i32>,
    #[serde(default)]
    duration_ms: Option<u64>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

fn parse_body<T: serde::de::DeserializeOwned>(body: Value) -> Result<T, ApiError> {
    super::body::from_object(body, "the attempt report")
}

pub(super) fn parse_attempt(n: &str) -> Result<u32, ApiError> {
    n.parse::<u32>().ok().filter(|n| *n >= 1).ok_or_else(|| {
        ApiError::bad_request("invalid_attempt", format!("{n:?} is not an attempt number"))
    })
}

fn not_current(task: &TaskState, attempt: u32) -> ApiError {
    ApiError::conflict(
        "attempt_not_current",
        format!(
            "attempt {attempt} of task {} is not current (the task is {} at attempt {})",
            task.id, task.state, task.attempt
        ),
    )
}

/// A worker token reports only attempts assigned to its worker (an admin, any).
pub(super) fn reporter_may_report(caller: &Principal, task: &TaskState) -> Result<(), ApiError> {
    caller.may_reach(task.spec.project())?;
    if caller.role != Role::Worker || task.worker_id.as_deref() == Some(caller.name.as_str()) {
        return Ok(());
    }
    Err(ApiError::forbidden(format!(
        "task {} is not assigned to worker {:?}; a worker token reports only its own attempts",
        task.id, caller.name
    )))
}

fn respond(outcome: Outcome) -> Response {
    match outcome {
        Outcome::Applied(record) => {
            (StatusCode::OK, Json(json!({ "task": record }))).into_response()
        }
        Outcome::NotYetApplied { partition, offset } => (
            StatusCode::ACCEPTED,
            Json(json!({"applied": false, "event": {"partition": partition, "offset": offset}})),
        )
            .into_response(),
    }
}

/// `POST /v1/tasks/{id}/attempts/{n}/start` `{"worker_id", "pid"}`: the worker started
/// the attempt's process. 409 `attempt_not_current` tells the worker to stop it.
pub async fn start(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    trace: RequestTrace,
    Path((id, n)): Path<(String, String)>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let attempt = parse_attempt(&n)?;
    let report: StartReport = parse_body(body)?;
    checked_worker_id(&report.worker_id)?;
    caller.may_act_as_worker(&report.worker_id)?;
    let outcome = transition(&state, &caller, id, trace.parent, |task| {
        reporter_may_report(&caller, task)?;
        let ours = task.attempt == attempt && task.worker_id.as_deref() == Some(&report.worker_id);
        match task.state {
            TaskStatus::Assigned if ours => Ok(Decision::Append(vec![Payload::Started {
                attempt,
                worker_id: Some(report.worker_id.clone()),
                pid: report.pid,
            }])),
            TaskStatus::Running if ours => Ok(Decision::AlreadyDone),
            _ => Err(not_current(task, attempt)),
        }
    })
    .await?;
    Ok(respond(outcome))
}

/// `POST /v1/tasks/{id}/attempts/{n}/finish`
/// `{"outcome": "succeeded"|"failed"|"cancelled", "exit_code", "signal", "duration_ms",
/// "reason", "message"}`: how the attempt ended. Idempotent: reporting the same end
/// again answers 200.
pub async fn finish(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    trace: RequestTrace,
    Path((id, n)): Path<(String, String)>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let attempt = parse_attempt(&n)?;
    let report: FinishReport = parse_body(body)?;
    super::tasks::check_reason(report.reason.as_deref(), report.message.as_deref())?;
    let outcome = transition(&state, &caller, id, trace.parent, |task| {
        reporter_may_report(&caller, task)?;
        if task.attempt != attempt {
            return Err(not_current(task, attempt));
        }
        // Reported again: after the end, or after it was turned into a retry.
        let same_end =
            task.current_attempt().and_then(|a| a.outcome) == Some(outcome_status(report.outcome));
        if same_end && (task.state == TaskStatus::Pending || task.state.is_terminal()) {
            return Ok(Decision::AlreadyDone);
        }
        if !matches!(task.state, TaskStatus::Assigned | TaskStatus::Running) {
            return Err(not_current(task, attempt));
        }
        let cancelled = |reason: Option<String>| {
            Payload::Cancelled(crate::events::CancelledData {
                reason: reason.or_else(|| Some("cancelled".into())),
                message: report.message.clone(),
                attempt: Some(attempt),
                exit_code: report.exit_code,
                signal: report.signal,
                duration_ms: report.duration_ms,
            })
        };
        let payload = match report.outcome {
            ReportedOutcome::Succeeded if task.state == TaskStatus::Running => Payload::Succeeded {
                attempt: Some(attempt),
                exit_code: report.exit_code,
                duration_ms: report.duration_ms,
            },
            ReportedOutcome::Succeeded => {
                return Err(ApiError::conflict(
                    "attempt_not_started",
                    format!("attempt {attempt} of task {id} was never reported started"),
                ));
            }
            // A cancel was asked for: however the process ended, the task is cancelled.
            ReportedOutcome::Failed if task.cancel_requested => cancelled(task.reason.clone()),
            ReportedOutcome::Failed => crate::events::retry::failure_event(
                task,
                Some(attempt),
                &report.reason.clone().unwrap_or_else(|| "error".into()),
                report.exit_code,
                report.signal,
                report.duration_ms,
                report.message.clone(),
                chrono::Utc::now(),
            ),
            // The reason of the cancel request (user_requested, scaled_down, ...) is the
            // task's; the worker only knows it stopped the process.
            ReportedOutcome::Cancelled => cancelled(
                task.cancel_requested
                    .then(|| task.reason.clone())
                    .flatten()
                    .or_else(|| report.reason.clone()),
            ),
        };
        Ok(Decision::Append(vec![payload]))
    })
    .await?;
    Ok(respond(outcome))
}

fn outcome_status(outcome: ReportedOutcome) -> TaskStatus {
    match outcome {
        ReportedOutcome::Succeeded => TaskStatus::Succeeded,
        ReportedOutcome::Failed => TaskStatus::Failed,
        ReportedOutcome::Cancelled => TaskStatus::Cancelled,
    }
}

/// Sets the queue-depth, worker and capacity gauges from the projection (at scrape
/// time, so any API process reports them).
pub async fn refresh_gauges(state: &AppState) -> Result<(), ApiError> {
    let m = crate::metrics::metrics();
    for (band, n) in state.store.queue_depth_by_band().await? {
        m.queue_depth.with_label_values(&[band]).set(n);
    }
    let (workers, placed) = tokio::try_join!(state.store.workers(), state.store.tasks_by_worker())?;
    let (mut used, mut total) = ([0f64; 3], [0f64; 3]);
    for s in crate::events::worker::WorkerStatus::ALL {
        let n = workers.iter().filter(|w| w.state == *s).count();
        m.workers.with_label_values(&[s.as_str()]).set(n as i64);
    }
    for w in workers
        .iter()
        .filter(|w| w.state == crate::events::worker::WorkerStatus::Active)
    {
        let c = &w.info.capacity;
        total[0] += c.cpu;
        total[1] += c.memory as f64;
        total[2] += f64::from(c.gpu);
        let u = used_by(placed.get(&w.id).map(Vec::as_slice).unwrap_or_default());
        used[0] += u.cpu_milli as f64 / 1000.0;
        used[1] += u.memory as f64;
        used[2] += f64::from(u.gpu);
    }
    for (i, resource) in ["cpu", "memory", "gpu"].iter().enumerate() {
        m.capacity
            .with_label_values(&[resource, "used"])
            .set(used[i]);
        m.capacity
            .with_label_values(&[resource, "free"])
            .set((total[i] - used[i]).max(0.0));
    }
    Ok(())
}
