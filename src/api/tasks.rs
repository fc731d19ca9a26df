//! Task routes: submit (single and batch), get, list, history, cancel.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio::time::Instant;
use uuid::Uuid;

use super::auth::Caller;
use super::traces::{RequestTrace, tell};
use super::transition::{Decision, Outcome, transition};
use super::{ApiError, AppState, JsonBody};
use crate::consistency::Targets;
use crate::events::auth::Principal;
use crate::events::{
    EncodedEvent, Event, EventType, Payload, ReasonData, TaskSpec, TaskStatus, idempotency,
    trace::TraceContext,
};
use crate::kafka::{Appended, partition_for_key};
use crate::store::{TaskFilter, TaskRecord};

/// Most tasks in one batch submission.
pub const MAX_BATCH: usize = 1000;

/// How long a submission waits for the tasks its `after` names to be projected (a
/// dependency submitted a moment ago may not be yet) before it is refused.
pub const DEPENDENCY_WAIT: Duration = Duration::from_secs(2);
/// Largest encoded event accepted (Kafka's default `message.max.bytes` is 1 MB).
pub const MAX_EVENT_BYTES: usize = 900_000;
/// A validated submission, ready to append.
struct Prepared {
    id: Uuid,
    spec: TaskSpec,
    keyed: bool,
    encoded: EncodedEvent,
    initial_state: TaskStatus,
}

fn prepare(
    state: &AppState,
    caller: &Principal,
    body: Value,
    header_key: Option<&str>,
    span: &TraceContext,
) -> Result<Prepared, ApiError> {
    let Value::Object(mut object) = body else {
        return Err(ApiError::bad_request(
            "invalid_spec",
            "the task spec must be a JSON object",
        ));
    };
    if let Some(header_key) = header_key {
        match object.get("idempotency_key") {
            Some(Value::String(k)) if k != header_key => {
                return Err(ApiError::bad_request(
                    "idempotency_key_mismatch",
                    "the Idempotency-Key header and the idempotency_key field differ",
                ));
            }
            // Not a string: left for the spec's validation to refuse.
            Some(_) => {}
            None => {
                object.insert(
                    "idempotency_key".into(),
                    Value::String(header_key.to_string()),
                );
            }
        }
    }
    let spec = TaskSpec::from_json(Value::Object(object))
        .map_err(|m| ApiError::bad_request("invalid_spec", m))?;
    caller.may_reach(spec.project())?;
    let (id, keyed) = match &spec.idempotency_key {
        Some(key) => (idempotency::task_id_for_key(key), true),
        None => (Uuid::now_v7(), false),
    };
    let initial_state = if spec.after.is_empty() {
        TaskStatus::Queued
    } else {
        TaskStatus::Pending
    };
    let event = Event::new(
        &state.options.source,
        id,
        1,
        Payload::Submitted {
            spec: std::sync::Arc::new(spec.clone()),
        },
    );
    let encoded = event
        .encode()
        .with_principal(&caller.name)
        .with_traceparent(Some(span));
    if encoded.payload.len() > MAX_EVENT_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "spec_too_large",
            format!(
                "the encoded task is {} bytes; the limit is {MAX_EVENT_BYTES}",
                encoded.payload.len()
            ),
        ));
    }
    Ok(Prepared {
        id,
        spec,
        keyed,
        encoded,
        initial_state,
    })
}

fn accepted(id: Uuid, state: TaskStatus, seq: u64, at: Appended) -> Value {
    json!({
        "id": id,
        "state": state,
        "seq": seq,
        "event": {"partition": at.partition, "offset": at.offset},
    })
}

/// What an earlier submission with the same key says about this one.
enum Replay {
    /// Not seen: append.
    New,
    /// Seen with the same spec: answer with this.
    Same(Value),
    /// Seen with another spec.
    Conflict,
}

fn replay_of(state: &AppState, p: &Prepared, stored: Option<&TaskRecord>) -> Replay {
    if !p.keyed {
        return Replay::New;
    }
    if let Some(record) = stored {
        return if *record.task.spec == p.spec {
            let mut v = accepted(
                record.task.id,
                record.task.state,
                record.task.seq,
                Appended {
                    partition: record.partition,
                    offset: record.last_offset,
                },
            );
            v["idempotent_replay"] = Value::Bool(true);
            Replay::Same(v)
        } else {
            Replay::Conflict
        };
    }
    let recent = state.recent_keys.lock().unwrap_or_else(|e| e.into_inner());
    match recent.get(&p.id) {
        None => Replay::New,
        Some((spec, response)) => {
            if serde_json::to_value(&p.spec).ok().as_ref() == Some(spec) {
                let mut v = response.clone();
                v["idempotent_replay"] = Value::Bool(true);
                Replay::Same(v)
            } else {
                Replay::Conflict
            }
        }
    }
}

fn conflict(id: Uuid) -> ApiError {
    ApiError::conflict(
        "idempotency_conflict",
        format!("the idempotency key was already used for task {id} with a different spec"),
    )
}

fn remember(state: &AppState, p: &Prepared, response: &Value) {
    if p.keyed {
        let spec = serde_json::to_value(&p.spec).unwrap_or_default();
        state
            .recent_keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p.id, spec, response.clone());
    }
}

/// `POST /v1/tasks`
pub async fn submit(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    trace: RequestTrace,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let header_key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(idempotency::header_key(v.as_bytes()).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_idempotency_key",
                "Idempotency-Key must be 1 to 256 visible ASCII characters (spaces only inside)",
            )
        })?),
    };
    let mut span = trace.span();
    let mut parent = trace.parent;
    let mut prepared = prepare(&state, &caller, body, header_key, &span)?;
    let stored = if prepared.keyed {
        state.store.task(prepared.id).await?
    } else {
        None
    };
    match replay_of(&state, &prepared, stored.as_ref()) {
        Replay::Same(v) => {
            let mut response = (StatusCode::ACCEPTED, Json(v)).into_response();
            response
                .headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            return Ok(response);
        }
        Replay::Conflict => return Err(conflict(prepared.id)),
        Replay::New => {}
    }
    let missing = missing_dependencies(&state, &prepared.spec.after).await?;
    if !missing.is_empty() {
        return Err(unknown_dependencies(&missing));
    }
    // A dependent task submitted without a trace of its own continues the trace of the
    // first task it waits for.
    if trace.parent.is_none()
        && let Some(first) = prepared.spec.after.first()
        && let Some(inherited) = state
            .store
            .task(*first)
            .await?
            .and_then(|r| r.task.traceparent)
    {
        parent = Some(inherited);
        span = inherited.child();
        prepared.encoded = prepared.encoded.with_traceparent(Some(&span));
    }
    let result = state
        .appender
        .append(&state.options.topics.events, &prepared.encoded)
        .await;
    crate::consistency::count_append(EventType::Submitted.as_str(), &result);
    trace.export(
        "submit",
        span,
        parent,
        vec![
            ("tasklog.task_id", prepared.id.to_string()),
            ("tasklog.project", prepared.spec.project().to_string()),
        ],
        result.as_ref().err().map(ToString::to_string),
    );
    let at = result?;
    let body = accepted(prepared.id, prepared.initial_state, 1, at);
    remember(&state, &prepared, &body);
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    tell(&mut response, &span);
    Ok(response)
}

/// `POST /v1/tasks/batch` with `{"tasks": [...]}`: one result per item, in order.
pub async fn submit_batch(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    trace: RequestTrace,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let items = match body {
        Value::Object(mut o) => match o.remove("tasks") {
            Some(Value::Array(items)) => items,
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_batch",
                    "the body must be {\"tasks\": [ ... ]}",
                ));
            }
        },
        _ => {
            return Err(ApiError::bad_request(
                "invalid_batch",
                "the body must be {\"tasks\": [ ... ]}",
            ));
        }
    };
    if items.is_empty() || items.len() > MAX_BATCH {
        return Err(ApiError::bad_request(
            "invalid_batch",
            format!("a batch holds 1 to {MAX_BATCH} tasks, not {}", items.len()),
        ));
    }

    // One span for the batch, one under it for each task.
    let batch_span = trace.span();
    let prepared: Vec<Result<Prepared, ApiError>> = items
        .into_iter()
        .map(|item| prepare(&state, &caller, item, None, &batch_span.child()))
        .collect();
    let keyed_ids: Vec<Uuid> = prepared
        .iter()
        .filter_map(|p| p.as_ref().ok().filter(|p| p.keyed).map(|p| p.id))
        .collect();
    let stored = state.store.tasks(&keyed_ids).await?;

    let mut results: Vec<Option<Value>> = vec![None; prepared.len()];
    // Items to append, with the index of their first occurrence (a key repeated inside
    // the batch is appended once).
    let mut to_send: Vec<(usize, &Prepared)> = Vec::new();
    let mut first_of_key: HashMap<Uuid, usize> = HashMap::new();
    let mut repeats: Vec<(usize, usize)> = Vec::new();
    for (i, p) in prepared.iter().enumerate() {
        let p = match p {
            Err(e) => {
                results[i] = Some(json!({"index": i, "error": e.body()["error"]}));
                continue;
            }
            Ok(p) => p,
        };
        if p.keyed
            && let Some(&first) = first_of_key.get(&p.id)
        {
            let same = prepared[first]
                .as_ref()
                .map(|f| f.spec == p.spec)
                .unwrap_or(false);
            if same {
                repeats.push((i, first));
            } else {
                results[i] = Some(json!({"index": i, "error": conflict(p.id).body()["error"]}));
            }
            continue;
        }
        match replay_of(&state, p, stored.get(&p.id)) {
            Replay::Same(mut v) => {
                v["index"] = json!(i);
                results[i] = Some(v);
            }
            Replay::Conflict => {
                results[i] = Some(json!({"index": i, "error": conflict(p.id).body()["error"]}));
            }
            Replay::New => {
                first_of_key.insert(p.id, i);
                to_send.push((i, p));
            }
        }
    }

    // Dependencies may be tasks of this batch, or tasks already submitted.
    let in_batch: HashSet<Uuid> = to_send.iter().map(|(_, p)| p.id).collect();
    let named: Vec<Uuid> = to_send
        .iter()
        .flat_map(|(_, p)| p.spec.after.iter().copied())
        .filter(|id| !in_batch.contains(id))
        .collect::<HashSet<Uuid>>()
        .into_iter()
        .collect();
    let missing: HashSet<Uuid> = missing_dependencies(&state, &named)
        .await?
        .into_iter()
        .collect();
    to_send.retain(|(i, p)| {
        let unknown: Vec<Uuid> = p
            .spec
            .after
            .iter()
            .copied()
            .filter(|id| missing.contains(id))
            .collect();
        if unknown.is_empty() {
            return true;
        }
        results[*i] =
            Some(json!({"index": i, "error": unknown_dependencies(&unknown).body()["error"]}));
        false
    });
    let pending: Vec<_> = to_send
        .iter()
        .map(|(_, p)| {
            state.appender.send(
                &state.options.topics.events,
                Some(p.encoded.key.as_bytes()),
                crate::kafka::event_headers(&p.encoded),
                &p.encoded.payload,
            )
        })
        .collect();
    for ((i, p), pending) in to_send.iter().zip(pending) {
        let result = pending.await;
        crate::consistency::count_append(EventType::Submitted.as_str(), &result);
        if let Some(span) = p.encoded.traceparent() {
            trace.export(
                "submit",
                span,
                Some(batch_span),
                vec![("tasklog.task_id", p.id.to_string())],
                result.as_ref().err().map(ToString::to_string),
            );
        }
        results[*i] = Some(match result {
            Ok(at) => {
                let v = accepted(p.id, p.initial_state, 1, at);
                remember(&state, p, &v);
                let mut v = v;
                v["index"] = json!(i);
                v
            }
            Err(e) => json!({"index": i, "error": ApiError::from(e).body()["error"]}),
        });
    }
    for (i, first) in repeats {
        let mut v = results[first].clone().unwrap_or(Value::Null);
        if v.get("error").is_none() {
            v["idempotent_replay"] = Value::Bool(true);
        }
        v["index"] = json!(i);
        results[i] = Some(v);
    }
    let results: Vec<Value> = results
        .into_iter()
        .map(|r| r.unwrap_or(Value::Null))
        .collect();
    let failed = results.iter().filter(|r| r.get("error").is_some()).count();
    trace.export(
        "submit batch",
        batch_span,
        trace.parent,
        vec![("tasklog.tasks", results.len().to_string())],
        None,
    );
    let mut response = (
        StatusCode::ACCEPTED,
        Json(json!({
            "accepted": results.len() - failed,
            "failed": failed,
            "results": results,
        })),
    )
        .into_response();
    tell(&mut response, &batch_span);
    Ok(response)
}

/// The ids in `after` (unique: the spec schema says so) that name no task, once the
/// projection has had [`DEPENDENCY_WAIT`] to catch up with submissions made a moment ago.
async fn missing_dependencies(state: &AppState, after: &[Uuid]) -> Result<Vec<Uuid>, ApiError> {
    if after.is_empty() {
        return Ok(Vec::new());
    }
    // `wait_for` looks at once, on every projection change, and once more at the
    // deadline.
    let deadline = Instant::now() + DEPENDENCY_WAIT;
    let all_found = wait_for(state, deadline, || async {
        Ok((state.store.tasks(after).await?.len() == after.len()).then_some(()))
    })
    .await?;
    if all_found.is_some() {
        return Ok(Vec::new());
    }
    let found = state.store.tasks(after).await?;
    Ok(after
        .iter()
        .copied()
        .filter(|id| !found.contains_key(id))
        .collect())
}

fn unknown_dependencies(missing: &[Uuid]) -> ApiError {
    let shown: Vec<String> = missing.iter().take(5).map(Uuid::to_string).collect();
    let more = missing.len().saturating_sub(shown.len());
    ApiError::bad_request(
        "unknown_dependency",
        format!(
            "`after` names {} task(s) that do not exist: {}{}",
            missing.len(),
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ),
    )
}

pub(super) fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id)
        .map_err(|_| ApiError::bad_request("invalid_id", format!("{id:?} is not a task id (UUID)")))
}

/// The query's pairs, refusing any parameter not in `allowed` (`400 invalid_query`).
pub(super) fn query_pairs(
    query: &Option<String>,
    allowed: &[&str],
) -> Result<Vec<(String, String)>, ApiError> {
    let pairs: Vec<(String, String)> = query
        .as_deref()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    if let Some((k, _)) = pairs.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
        return Err(ApiError::bad_request(
            "invalid_query",
            if allowed.is_empty() {
                format!("unknown query parameter {k:?} (this endpoint takes none)")
            } else {
                format!("unknown query parameter {k:?} ({})", allowed.join(", "))
            },
        ));
    }
    Ok(pairs)
}

pub(super) fn single<'a>(
    pairs: &'a [(String, String)],
    name: &str,
) -> Result<Option<&'a str>, ApiError> {
    let mut values = pairs
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str());
    let first = values.next();
    if values.next().is_some() {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("{name} may be given once"),
        ));
    }
    Ok(first)
}

/// The `wait_ms` query parameter (0 to the server's `max_wait`), or `default`.
pub(super) fn wait_param(
    state: &AppState,
    pairs: &[(String, String)],
    default: Duration,
) -> Result<Duration, ApiError> {
    let max_wait = state.options.max_wait.as_millis() as i64;
    Ok(single(pairs, "wait_ms")?
        .map(|v| parse_number("wait_ms", v, 0, max_wait))
        .transpose()?
        .map_or(default, |ms| Duration::from_millis(ms as u64)))
}

pub(super) fn parse_number(name: &str, value: &str, min: i64, max: i64) -> Result<i64, ApiError> {
    value
        .parse::<i64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                format!("{name} must be a whole number from {min} to {max}, not {value:?}"),
            )
        })
}

/// Waits (on projector notifications, not by polling) until `check` gives a value or
/// the deadline passes (then `None`).
pub(super) async fn wait_for<T, F, Fut>(
    state: &AppState,
    deadline: Instant,
    mut check: F,
) -> Result<Option<T>, ApiError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, ApiError>>,
{
    let mut changes = state.projection.clone();
    loop {
        changes.borrow_and_update();
        if let Some(value) = check().await? {
            return Ok(Some(value));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => {}
            // Deadline reached (or notifications gone): one last look.
            _ => return check().await,
        }
    }
}

/// Whether the query asks for `consistency=eventual`: read the projection as it is,
/// without first waiting for it to reach the log's end (cheaper, for dashboards that
/// poll). The default, `strong`, is read-your-writes.
pub(super) fn eventual(pairs: &[(String, String)]) -> Result<bool, ApiError> {
    match single(pairs, "consistency")? {
        None | Some("strong") => Ok(false),
        Some("eventual") => Ok(true),
        Some(other) => Err(ApiError::bad_request(
            "invalid_query",
            format!("consistency must be strong or eventual, not {other:?}"),
        )),
    }
}

/// `GET /v1/tasks/{id}?min_offset=[P:]O&wait_ms=N`
pub async fn get_task(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<TaskRecord>, ApiError> {
    let id = parse_id(&id)?;
    let pairs = query_pairs(&query, &["min_offset", "wait_ms", "consistency"])?;
    let wait = wait_param(&state, &pairs, Duration::ZERO)?;
    let min_offset = single(&pairs, "min_offset")?
        .map(|v| parse_min_offset(v, id, state.options.partitions))
        .transpose()?;
    if !eventual(&pairs)? {
        state.read_task_waiting(id, wait).await?;
    }
    let mut past = Targets::new();
    if let Some((partition, offset)) = min_offset {
        past.reach(&state.options.topics.events, partition, offset + 1);
    }
    let deadline = Instant::now() + wait;
    let found = wait_for(&state, deadline, || async {
        if !state.projections.lag(&past).await?.caught_up() {
            return Ok(None);
        }
        let task = state.store.task(id).await?;
        // With min_offset, the answer is final once the projection is past it.
        Ok((task.is_some() || min_offset.is_some()).then_some(task))
    })
    .await?
    .flatten();
    if let Some(record) = &found {
        caller.may_reach(record.task.spec.project())?;
    }
    found
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("task {id} is not on the log")))
}

fn parse_min_offset(value: &str, id: Uuid, partitions: i32) -> Result<(i32, i64), ApiError> {
    let invalid = || {
        ApiError::bad_request(
            "invalid_query",
            format!("min_offset must be OFFSET or PARTITION:OFFSET, not {value:?}"),
        )
    };
    match value.split_once(':') {
        Some((p, o)) => {
            let p: i32 = p.parse().map_err(|_| invalid())?;
            let o: i64 = o.parse().map_err(|_| invalid())?;
            if p < 0 || o < 0 {
                return Err(invalid());
            }
            Ok((p, o))
        }
        None => {
            let o: i64 = value.parse().map_err(|_| invalid())?;
            if o < 0 {
                return Err(invalid());
            }
            Ok((partition_for_key(id.to_string().as_bytes(), partitions), o))
        }
    }
}

fn encode_cursor(at: DateTime<Utc>, id: Uuid) -> String {
    let raw = format!("v1|{}|{}", at.timestamp_micros(), id);
    URL_SAFE_NO_PAD.encode(raw)
}

fn decode_cursor(cursor: &str) -> Result<(DateTime<Utc>, Uuid), ApiError> {
    let invalid = || ApiError::bad_request("invalid_cursor", "the cursor is malformed");
    let raw = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| invalid())?;
    let raw = String::from_utf8(raw).map_err(|_| invalid())?;
    let mut parts = raw.split('|');
    if parts.next() != Some("v1") {
        return Err(invalid());
    }
    let micros: i64 = parts
        .next()
        .and_then(|m| m.parse().ok())
        .ok_or_else(invalid)?;
    let id = parts
        .next()
        .and_then(|i| Uuid::parse_str(i).ok())
        .ok_or_else(invalid)?;
    if parts.next().is_some() {
        return Err(invalid());
    }
    let at = DateTime::from_timestamp_micros(micros).ok_or_else(invalid)?;
    Ok((at, id))
}

/// `GET /v1/tasks?state=&type=&label=k=v&limit=&cursor=`
pub async fn list(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let pairs = query_pairs(
        &query,
        &["state", "type", "label", "project", "limit", "cursor"],
    )?;
    let mut filter = TaskFilter {
        limit: 100,
        projects: projects_param(&caller, &pairs)?,
        ..Default::default()
    };
    if let Some(s) = single(&pairs, "state")? {
        filter.state = Some(TaskStatus::parse(s).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                format!("state {s:?} is not one of pending, queued, assigned, running, succeeded, failed, cancelled"),
            )
        })?);
    }
    filter.task_type = single(&pairs, "type")?.map(str::to_string);
    filter.labels = label_params(&pairs)?;
    // Postgres cannot hold NUL in text: refuse it rather than fail the query.
    if filter
        .task_type
        .iter()
        .chain(filter.labels.iter().flat_map(|(k, v)| [k, v]))
        .any(|s| s.contains('\0'))
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            "type and label may not contain NUL (U+0000)",
        ));
    }
    if let Some(l) = single(&pairs, "limit")? {
        filter.limit = parse_number("limit", l, 1, 1000)?;
    }
    if let Some(c) = single(&pairs, "cursor")? {
        filter.after = Some(decode_cursor(c)?);
    }
    let tasks = state.store.list_tasks(&filter).await?;
    let next_cursor = (tasks.len() as i64 == filter.limit)
        .then(|| {
            tasks
                .last()
                .map(|t| encode_cursor(t.task.submitted_at, t.task.id))
        })
        .flatten();
    Ok(Json(json!({"tasks": tasks, "next_cursor": next_cursor})))
}

/// The `label=key=value` query values.
pub(super) fn label_params(pairs: &[(String, String)]) -> Result<Vec<(String, String)>, ApiError> {
    pairs
        .iter()
        .filter(|(k, _)| k == "label")
        .map(|(_, v)| {
            v.split_once('=')
                .filter(|(n, _)| !n.is_empty())
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .ok_or_else(|| {
                    ApiError::bad_request("invalid_query", format!("label {v:?} must be key=value"))
                })
        })
        .collect()
}

/// The projects a listing covers: the `project` query values (each must be within the
/// caller's reach: 403 otherwise), else everything the caller reaches (`None`: all).
pub(super) fn projects_param(
    caller: &Principal,
    pairs: &[(String, String)],
) -> Result<Option<Vec<String>>, ApiError> {
    let asked: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k == "project")
        .map(|(_, v)| v.clone())
        .collect();
    for p in &asked {
        if !crate::events::auth::valid_project(p) {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("project {p:?} is not a project name"),
            ));
        }
        caller.may_reach(p)?;
    }
    if !asked.is_empty() {
        return Ok(Some(asked));
    }
    Ok(caller.visible_projects().map(<[String]>::to_vec))
}

/// `GET /v1/tasks/{id}/events?consistency=`
pub async fn events(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    state.reach_task(&caller, id).await?;
    let pairs = query_pairs(&query, &["consistency"])?;
    if !eventual(&pairs)? {
        state.read_task(id).await?;
    }
    let events = state.store.task_events(id).await?;
    if events.is_empty() {
        return Err(ApiError::not_found(format!("task {id} is not on the log")));
    }
    Ok(Json(json!({"task_id": id, "events": events})))
}

/// `POST /v1/tasks/{id}/cancel` with an optional `{"reason": ..., "message": ...}`.
///
/// Appends `cancel_requested` (and `cancelled` for a task that is not assigned or running)
/// with the task's next seq, then waits for the projection to confirm (see
/// [`transition`]).
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    trace: RequestTrace,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let reason = cancel_body(body)?;
    let reason = ReasonData {
        reason: reason.reason.or_else(|| Some("user_requested".into())),
        message: reason.message,
    };
    let outcome = transition(&state, &caller, id, trace.parent, |task| {
        caller.may_reach(task.spec.project())?;
        if task.state.is_terminal() {
            return Err(ApiError::conflict(
                "task_terminal",
                format!("task {id} is already {}", task.state),
            ));
        }
        // Nothing runs yet: the task ends now. Otherwise its worker stops the attempt
        // (SIGTERM, grace, SIGKILL) and reports `cancelled`.
        Ok(Decision::Append(task.cancel_events(reason.clone())))
    })
    .await?;
    let body = match outcome {
        Outcome::Applied(record) => json!({
            "id": id,
            "cancel": "requested",
            "applied": true,
            "task": record,
        }),
        Outcome::NotYetApplied { partition, offset } => json!({
            "id": id,
            "cancel": "requested",
            "applied": false,
            "message": "the cancel is on the log; the projection has not applied it yet",
            "event": {"partition": partition, "offset": offset},
        }),
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// Longest `reason` of an event (as the event schemas say), in characters.
pub(super) const MAX_REASON_CHARS: usize = 128;
/// Longest `message` of an event (as the event schemas say), in characters.
pub(super) const MAX_MESSAGE_CHARS: usize = 4096;

/// Checks a `reason` and `message` against the event schemas' limits.
pub(super) fn check_reason(reason: Option<&str>, message: Option<&str>) -> Result<(), ApiError> {
    if let Some(r) = reason
        && (r.is_empty() || r.chars().count() > MAX_REASON_CHARS)
    {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("reason must be 1 to {MAX_REASON_CHARS} characters"),
        ));
    }
    if let Some(m) = message
        && m.chars().count() > MAX_MESSAGE_CHARS
    {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("message must be at most {MAX_MESSAGE_CHARS} characters"),
        ));
    }
    Ok(())
}

/// The optional body of a cancel: `{"reason", "message"}`, nothing else.
fn cancel_body(body: Value) -> Result<ReasonData, ApiError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct CancelBody {
        #[serde(default)]
        reason: Option<String>,
        #[serde(default)]
        message: Option<String>,
    }
    let body: CancelBody = match body {
        Value::Null => return Ok(ReasonData::default()),
        other => super::body::from_object(other, "{\"reason\", \"message\"}")?,
    };
    check_reason(body.reason.as_deref(), body.message.as_deref())?;
    Ok(ReasonData {
        reason: body.reason,
        message: body.message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_bodies_are_checked_like_the_events_they_become() {
        assert_eq!(cancel_body(Value::Null).unwrap(), ReasonData::default());
        let ok = cancel_body(json!({"reason": "é".repeat(128), "message": "m"})).unwrap();
        assert_eq!(ok.reason.as_deref().map(|r| r.chars().count()), Some(128));
        for bad in [
            json!({"reason": ""}),
            json!({"reason": "x".repeat(129)}),
            json!({"message": "x".repeat(4097)}),
            json!({"other": 1}),
            json!({"reason": 3}),
            json!([]),
            json!([null, null]),
        ] {
            assert_eq!(
                cancel_body(bad.clone()).unwrap_err().code,
                "invalid_body",
                "{bad}"
            );
        }
    }

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let at = DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap();
        let id = Uuid::now_v7();
        assert_eq!(decode_cursor(&encode_cursor(at, id)).unwrap(), (at, id));
        for bad in ["", "!!!", "djF8MTIz", &URL_SAFE_NO_PAD.encode("v2|1|x")] {
            assert_eq!(
                decode_cursor(bad).unwrap_err().code,
                "invalid_cursor",
                "{bad}"
            );
        }
    }

    #[test]
    fn min_offset_forms() {
        let id = Uuid::now_v7();
        assert_eq!(parse_min_offset("3:17", id, 12).unwrap(), (3, 17));
        let (p, o) = parse_min_offset("17", id, 12).unwrap();
        assert_eq!(o, 17);
        assert_eq!(p, partition_for_key(id.to_string().as_bytes(), 12));
        for bad in ["x", "1:", ":1", "-1", "1:-2"] {
            assert!(parse_min_offset(bad, id, 12).is_err(), "{bad}");
        }
    }

    mod properties {
        use super::super::{decode_cursor, encode_cursor, parse_min_offset};
        use base64::Engine;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use chrono::DateTime;
        use proptest::prelude::*;
        use uuid::Uuid;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

            /// The task list cursor: any text, and well-formed bodies with any numbers,
            /// decode to a position or a 400, never a panic.
            #[test]
            fn list_cursor_decoder_never_panics(
                text in prop_oneof![
                    any::<String>(),
                    (any::<i64>(), any::<u128>(), any::<String>()).prop_map(|(m, id, tail)| {
                        URL_SAFE_NO_PAD.encode(format!("v1|{m}|{}{tail}", Uuid::from_u128(id)))
                    }),
                    prop::collection::vec(any::<u8>(), 0..80).prop_map(|b| URL_SAFE_NO_PAD.encode(b)),
                ]
            ) {
                let _ = decode_cursor(&text);
            }

            /// What the list hands out comes back as the same position.
            #[test]
            fn list_cursors_round_trip(
                micros in -62_135_596_800_000_000i64..253_402_300_799_000_000,
                id in any::<u128>(),
            ) {
                let at = DateTime::from_timestamp_micros(micros).expect("in range");
                let id = Uuid::from_u128(id);
                let decoded = decode_cursor(&encode_cursor(at, id));
                prop_assert!(decoded.is_ok());
                prop_assert_eq!(decoded.ok(), Some((at, id)));
            }

            /// `min_offset` (OFFSET or PARTITION:OFFSET): a position or a 400.
            #[test]
            fn min_offset_parser_never_panics(text in any::<String>(), p in any::<i64>(), o in any::<i64>()) {
                let id = Uuid::nil();
                let _ = parse_min_offset(&text, id, 12);
                let parsed = parse_min_offset(&format!("{p}:{o}"), id, 12);
                prop_assert_eq!(parsed.is_ok(), i32::try_from(p).is_ok_and(|p| p >= 0) && o >= 0);
            }
        }
    }
}
