//! `GET /v1/tasks/{id}/audit`: what `tasklog audit task` prints — the task's history
//! read from Kafka itself, with the fold's verdict on every record.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;

use super::auth::Caller;
use super::tasks::{parse_id, query_pairs, single};
use super::{ApiError, AppState};
use crate::audit::TaskAudit;

/// `GET /v1/tasks/{id}/audit?scan=true|false`
pub async fn task_audit(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<TaskAudit>, ApiError> {
    let id = parse_id(&id)?;
    state.reach_task(&caller, id).await?;
    let pairs = query_pairs(&query, &["scan"])?;
    let scan = match single(&pairs, "scan")? {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("scan must be true or false, not {other:?}"),
            ));
        }
    };
    let audit = crate::audit::task(
        &state.options.brokers,
        &state.options.topics,
        Some(&state.store),
        id,
        scan,
    )
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker_unavailable",
            format!("cannot read the log: {e}"),
        )
    })?;
    if audit.records.is_empty() {
        return Err(ApiError::not_found(format!("task {id} is not on the log")));
    }
    Ok(Json(audit))
}
