//! W3C Trace Context at the API: the `traceparent` a write request brings (or a new
//! trace), the span the request is, and `GET /v1/traces/{trace_id}`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::{Value, json};

use super::auth::Caller;
use super::{ApiError, AppState};
use crate::events::trace::TraceContext;
use crate::otlp;

/// The request header (and response header) W3C names.
pub const TRACEPARENT: &str = "traceparent";

/// Most events `GET /v1/traces/{id}` lists.
pub const MAX_TRACE_EVENTS: i64 = 10_000;

/// The trace context a request arrived with, and when it arrived.
///
/// An absent or unreadable `traceparent` is no context (W3C: the receiver starts a new
/// trace); the handler's span is then the first of a new trace.
#[derive(Debug, Clone, Copy)]
pub struct RequestTrace {
    /// The caller's span, when the request named one.
    pub parent: Option<TraceContext>,
    /// When the request arrived (the start of its span).
    pub started: SystemTime,
}

impl RequestTrace {
    /// The span this request's work is: a child of the caller's, or a new trace.
    pub fn span(&self) -> TraceContext {
        TraceContext::child_of(self.parent.as_ref())
    }

    /// Exports `context`, a span of this request's under `parent` (usually the
    /// caller's: [`RequestTrace::parent`]), from the request's arrival to now, with
    /// `attributes`.
    pub fn export(
        &self,
        name: &'static str,
        context: TraceContext,
        parent: Option<TraceContext>,
        attributes: Vec<(&'static str, String)>,
        error: Option<String>,
    ) {
        if !otlp::enabled() {
            return;
        }
        let mut span = otlp::Span::new(name, context, parent, self.started, SystemTime::now())
            .kind(opentelemetry::trace::SpanKind::Server);
        for (key, value) in attributes {
            span = span.attribute(key, value);
        }
        span.error = error;
        otlp::export(span);
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RequestTrace {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let parent =
            TraceContext::read(parts.headers.get(TRACEPARENT).and_then(|v| v.to_str().ok()));
        Ok(RequestTrace {
            parent,
            started: SystemTime::now(),
        })
    }
}

/// Adds `traceparent: <context>` to `response` (the span the request was).
pub fn tell(response: &mut Response, context: &TraceContext) {
    if let Ok(value) = HeaderValue::from_str(&context.to_string()) {
        response.headers_mut().insert(TRACEPARENT, value);
    }
}

fn millis_between(
    from: Option<chrono::DateTime<chrono::Utc>>,
    to: Option<chrono::DateTime<chrono::Utc>>,
) -> Option<i64> {
    Some((to? - from?).num_milliseconds().max(0))
}

/// `GET /v1/traces/{trace_id}`: every event of the trace across the tasks the caller may
/// read, in order, with each task's timing.
pub async fn get_trace(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    Path(trace_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    // The all-zero id is invalid in a traceparent, so no event names it: asking for it
    // finds nothing (404) rather than being refused.
    let well_formed = trace_id.len() == 32
        && trace_id
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !well_formed {
        return Err(ApiError::bad_request(
            "invalid_trace_id",
            format!(
                "trace id {:?} is not 32 lowercase hex characters",
                trace_id.chars().take(64).collect::<String>()
            ),
        ));
    }
    let events = state
        .store
        .trace_events(&trace_id, MAX_TRACE_EVENTS)
        .await?;
    let mut ids: Vec<uuid::Uuid> = events.iter().map(|e| e.task_id).collect();
    ids.sort();
    ids.dedup();
    let tasks = state.store.tasks(&ids).await?;
    let visible: HashMap<uuid::Uuid, &crate::store::TaskRecord> = tasks
        .iter()
        .filter(|(_, r)| caller.reaches(r.task.spec.project()))
        .map(|(id, r)| (*id, r))
        .collect();
    let events: Vec<_> = events
        .into_iter()
        .filter(|e| visible.contains_key(&e.task_id))
        .collect();
    if events.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no event of a task you may read is in trace {trace_id}"),
        ));
    }
    // Tasks in the order their first event appears.
    let mut order: Vec<uuid::Uuid> = Vec::new();
    for e in &events {
        if !order.contains(&e.task_id) {
            order.push(e.task_id);
        }
    }
    let timings: Vec<Value> = order
        .iter()
        .filter_map(|id| visible.get(id))
        .map(|r| timing(&r.task))
        .collect();
    Ok(Json(json!({
        "trace_id": trace_id,
        "tasks": timings,
        "events": events,
    })))
}

/// A task's timing: submitted → queued → assigned → started → finished.
fn timing(task: &crate::events::TaskState) -> Value {
    let first = task.attempts.first();
    let assigned_at = first.and_then(|a| a.assigned_at);
    let started_at = first.and_then(|a| a.started_at).or(task.started_at);
    let mut out = json!({
        "task_id": task.id,
        "state": task.state,
        "submitted_at": task.submitted_at,
        "project": task.spec.project(),
        "attempts": task.attempts.len(),
    });
    let mut put = |key: &str, value: Option<Value>| {
        if let Some(value) = value {
            out[key] = value;
        }
    };
    put("name", task.spec.name.clone().map(Value::from));
    put(
        "traceparent",
        task.traceparent.map(|t| Value::from(t.to_string())),
    );
    put("queued_at", task.queued_at.map(|t| json!(t)));
    put("assigned_at", assigned_at.map(|t| json!(t)));
    put("started_at", started_at.map(|t| json!(t)));
    put("finished_at", task.finished_at.map(|t| json!(t)));
    put(
        "queue_wait_ms",
        millis_between(Some(task.submitted_at), assigned_at).map(Value::from),
    );
    put(
        "run_ms",
        millis_between(started_at, task.finished_at).map(Value::from),
    );
    out
}
