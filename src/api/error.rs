//! API errors: every failure is `{"error": {"code": "...", "message": "..."}}` with a
//! fitting status. Bad input is always a 4xx.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::consistency::ConsistencyError;
use crate::kafka::AppendError;
use crate::store::StoreError;

/// An error response.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human-readable detail.
    pub message: String,
    /// Extra machine-readable fields inside `error` (e.g. `earliest_cursor`).
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl ApiError {
    /// A 400 with `code`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// A 404.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// A 409 with `code`.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, code, message)
    }

    /// A 401 with `code`: answered with `WWW-Authenticate: Bearer`.
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, code, message)
    }

    /// A 403 `forbidden`.
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// Any status.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            details: serde_json::Map::new(),
        }
    }

    /// Adds a field to the error object.
    pub fn with_detail(mut self, key: &str, value: serde_json::Value) -> ApiError {
        self.details.insert(key.to_string(), value);
        self
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        let mut error = self.details.clone();
        error.insert("code".into(), json!(self.code));
        error.insert("message".into(), json!(self.message));
        json!({ "error": error })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            // RFC 6750: which scheme, and (when one was sent) that the token is bad.
            let challenge = if self.code == "invalid_token" {
                r#"Bearer realm="tasklog", error="invalid_token""#
            } else {
                r#"Bearer realm="tasklog""#
            };
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static(challenge),
            );
        }
        response
    }
}

impl From<tasklog_core::auth::Denied> for ApiError {
    fn from(e: tasklog_core::auth::Denied) -> ApiError {
        ApiError::forbidden(e.0)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        tracing::error!(error = %e, "store error");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            e.to_string(),
        )
    }
}

impl From<AppendError> for ApiError {
    fn from(e: AppendError) -> ApiError {
        match e {
            AppendError::Unavailable(..) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "broker_unavailable",
                e.to_string(),
            ),
            AppendError::Refused(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "append_refused",
                e.to_string(),
            ),
        }
    }
}

impl From<ConsistencyError> for ApiError {
    fn from(e: ConsistencyError) -> ApiError {
        match e {
            ConsistencyError::Store(e) => e.into(),
            ConsistencyError::Append(e) => e.into(),
            ConsistencyError::Kafka(e) => {
                tracing::warn!(error = %e, "cannot read a partition's end");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "broker_unavailable",
                    format!("cannot check the log for read-your-writes: {e}"),
                )
            }
        }
    }
}
