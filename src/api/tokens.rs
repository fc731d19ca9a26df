//! Tokens: `POST /v1/tokens` (the secret is in the answer, once), `GET /v1/tokens`,
//! `POST /v1/tokens/{name}/revoke` — admin only — and the [`TokenDesk`] that carries
//! them out, which `tasklog token create` also uses directly on a host with the
//! database and broker settings (the bootstrap: no token yet to call the API with).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::time::Instant;
use uuid::Uuid;

use super::auth::Caller;
use super::{ApiError, AppState, JsonBody};
use crate::consistency::{Projections, append_and_wait};
use crate::events::auth::{
    ALL_PROJECTS, DEFAULT_PROJECT, Grant, Role, TokenEvent, TokenPayload, TokenState,
    token_from_secret, token_hash, valid_grant_project, valid_token_name,
};
use crate::events::spec::parse_duration_ms;
use crate::kafka::Appender;
use crate::store::{EventOutcome, Store};

/// What issuing and revoking tokens needs: the credential store, the log, and the
/// progress of the tokens projection (to answer only once the change is in force).
#[derive(Clone)]
pub struct TokenDesk {
    /// Postgres (credentials, the projected tokens).
    pub store: Store,
    /// Appends the auth events.
    pub appender: Appender,
    /// Progress of the tokens projection.
    pub projections: Projections,
    /// The auth topic.
    pub topic: String,
    /// `ce_source` of the events.
    pub source: String,
    /// How long to wait for the projection to apply a change.
    pub wait: Duration,
}

/// A request for a new token (the body of `POST /v1/tokens`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Its name: unique among tokens that are not revoked; a worker token's name is the
    /// id of the worker it may act as.
    pub name: String,
    /// `admin`, `submitter`, `reader` or `worker`.
    pub role: Role,
    /// Projects it reaches (`*` for all). Default: `*` for admins, `default` otherwise.
    #[serde(default)]
    pub projects: Option<Vec<String>>,
    /// How long it lives: seconds, or a duration such as `90d` or `12h`. Default: for
    /// ever.
    #[serde(default)]
    pub expires_in: Option<Value>,
}

/// A token just issued: the secret (shown once, never stored) and what it grants.
#[derive(Debug, Clone, Serialize)]
pub struct IssuedToken {
    /// The bearer token.
    pub token: String,
    /// What it grants, as projected.
    #[serde(flatten)]
    pub state: TokenState,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_token_request", message)
}

impl TokenRequest {
    /// The grant this asks for, checked; `now` anchors `expires_in`.
    fn grant(&self, now: DateTime<Utc>) -> Result<Grant, ApiError> {
        if !valid_token_name(&self.name) {
            return Err(bad(format!(
                "name {:?}: letters, digits and ._:@- up to 256",
                self.name
            )));
        }
        let projects = match &self.projects {
            Some(p) if p.is_empty() => return Err(bad("projects: name at least one (or \"*\")")),
            Some(p) if p.len() > 100 => return Err(bad("projects: at most 100")),
            Some(p) => p.clone(),
            None if self.role == Role::Admin => vec![ALL_PROJECTS.to_string()],
            None => vec![DEFAULT_PROJECT.to_string()],
        };
        if let Some(p) = projects.iter().find(|p| !valid_grant_project(p)) {
            return Err(bad(format!(
                "projects: {p:?} is not a project (lowercase letters, digits, - and _, up to 64; or \"*\")"
            )));
        }
        let expires_at = match &self.expires_in {
            None => None,
            Some(v) => {
                let ms = match v {
                    Value::Number(n) => n.as_u64().map(|s| s.saturating_mul(1000)),
                    Value::String(s) => parse_duration_ms(s),
                    _ => None,
                }
                .filter(|ms| *ms > 0 && *ms <= 100 * 365 * 86_400_000)
                .ok_or_else(|| {
                    bad(format!(
                        "expires_in: {v} is not a positive duration (seconds, or e.g. \"90d\") of at most 100 years"
                    ))
                })?;
                Some(now + chrono::Duration::milliseconds(ms as i64))
            }
        };
        Ok(Grant {
            token_id: Uuid::new_v4(),
            role: self.role,
            projects,
            expires_at,
        })
    }
}

/// 256 bits from the operating system's generator.
fn random_secret() -> Result<[u8; 32], ApiError> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_randomness",
            format!("the operating system gave no random bytes: {e}"),
        )
    })?;
    Ok(secret)
}

impl TokenDesk {
    /// Issues a token for `request`, on behalf of `by`: stores the hash of a new
    /// secret, appends `token_created` (no secret, no hash), and waits until the
    /// projection has applied it.
    pub async fn issue(&self, by: &str, request: &TokenRequest) -> Result<IssuedToken, ApiError> {
        let grant = request.grant(Utc::now())?;
        if let Some(existing) = self.store.token(&request.name).await?
            && existing.revoked_at.is_none()
        {
            return Err(ApiError::conflict(
                "token_exists",
                format!(
                    "a token named {:?} exists; revoke it first, or choose another name",
                    request.name
                ),
            ));
        }
        let token = token_from_secret(&random_secret()?);
        self.store
            .insert_credential(grant.token_id, &token_hash(&token))
            .await?;
        let token_id = grant.token_id;
        let event = TokenEvent::new(
            &self.source,
            &request.name,
            by,
            TokenPayload::Created(grant),
        );
        self.append(&event).await?;
        match self.store.token(&request.name).await? {
            Some(state) if state.token_id == token_id => Ok(IssuedToken { token, state }),
            _ => Err(ApiError::conflict(
                "token_exists",
                format!(
                    "another token named {:?} was created at the same time",
                    request.name
                ),
            )),
        }
    }

    /// Revokes the token `name` on behalf of `by`, and waits until the projection has
    /// applied it (every API server then refuses it within seconds).
    pub async fn revoke(&self, by: &str, name: &str) -> Result<TokenState, ApiError> {
        match self.store.token(name).await? {
            None => {
                return Err(ApiError::not_found(format!("no token is named {name:?}")));
            }
            Some(t) if t.revoked_at.is_some() => return Ok(t),
            Some(_) => {}
        }
        let event = TokenEvent::new(&self.source, name, by, TokenPayload::Revoked);
        self.append(&event).await?;
        self.store
            .token(name)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no token is named {name:?}")))
    }

    /// Appends an auth event and waits for the projection to apply it.
    async fn append(&self, event: &TokenEvent) -> Result<(), ApiError> {
        let encoded = event.encode();
        let deadline = Instant::now() + self.wait;
        let waited = append_and_wait(
            &self.appender,
            &self.projections,
            &self.topic,
            std::slice::from_ref(&encoded),
            deadline,
        )
        .await?;
        if waited.is_some_and(|(_, lag)| !lag.caught_up()) {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "projection_lagging",
                format!(
                    "the change is on the log, but no projector applied it within {:?}; \
                     it takes effect once one does (is `tasklog projector` running?)",
                    self.wait
                ),
            ));
        }
        match self.store.event_outcome(&encoded.ce_id).await? {
            Some(EventOutcome::Rejected { reason, message }) => Err(ApiError::conflict(
                "token_event_rejected",
                format!("the change was not applied ({reason}): {message}"),
            )),
            _ => Ok(()),
        }
    }
}

/// `POST /v1/tokens`
pub async fn create(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let request: TokenRequest = super::body::from_object(body, "a token request")?;
    let issued = state.tokens.issue(&caller.name, &request).await?;
    let mut response = (StatusCode::CREATED, Json(json!(issued))).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// `GET /v1/whoami`: the caller's token name, role and projects (what a worker agent
/// serves when told no projects).
pub async fn whoami(Caller(caller): Caller) -> Json<Value> {
    Json(json!({
        "name": caller.name,
        "role": caller.role,
        "projects": caller.projects,
    }))
}

/// `GET /v1/tokens`: every token, revoked ones too (no secrets, no hashes).
pub async fn list(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "tokens": state.store.tokens().await? })))
}

/// `POST /v1/tokens/{name}/revoke` (not the caller's own token: `409 revoking_yourself`)
pub async fn revoke(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !valid_token_name(&name) {
        return Err(bad(format!("{name:?} is not a token name")));
    }
    if name == caller.name {
        // An admin cannot lock itself out by accident; another admin (or the
        // operator's `tasklog token revoke --direct` on the host) can.
        return Err(ApiError::conflict(
            "revoking_yourself",
            format!(
                "{name:?} is the token of this request; revoke it with another admin token, \
                 or with `tasklog token revoke --direct` on a host with the database and broker settings"
            ),
        ));
    }
    Ok(Json(json!(state.tokens.revoke(&caller.name, &name).await?)))
}
