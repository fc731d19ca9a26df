//! Who is calling: `Authorization: Bearer <token>` checked against the credentials the
//! tokens projection holds, and each route's [`Access`] enforced before its handler
//! runs (a role or project that does not allow a call is a 403 from the handler that
//! knows the project).
//!
//! Every API server keeps every token's hash in memory and reloads them whenever the
//! tokens projection commits (its `NOTIFY`), at the latest every [`RELOAD_EVERY`], and
//! when it meets a token it does not know (at most every [`MISS_RELOAD_GAP`], so a
//! flood of bad tokens costs nothing): a revocation takes effect on every server as
//! soon as the projector has applied it — within [`RELOAD_EVERY`] even if a
//! notification was lost — and a token just created through another server works at
//! once.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::time::Instant;

use super::{ApiError, AppState, routes};
use crate::consistency::Projections;
use crate::events::auth::{
    Access, Principal, TokenState, hashes_equal, looks_like_token, token_hash,
};
use crate::store::{Store, StoreError};

/// Whether the API asks for tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Every route but health, readiness, the description (and `/metrics`, unless
    /// configured otherwise) needs a token.
    Tokens,
    /// No token is asked for; every caller is the admin `anonymous`. For local
    /// experiments only: refused on anything but loopback.
    Off,
}

/// The longest the credentials go without a reload.
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// The least time between two reloads caused by unknown tokens.
pub const MISS_RELOAD_GAP: Duration = Duration::from_millis(200);

/// How long a token the projection no longer has at all keeps working. Tokens are
/// never deleted — a revocation is a state the projection keeps — so one is missing
/// only while a rebuild (`replay rebuild`, `projector --rebuild`) folds the auth topic
/// again; this carries the API through that without refusing every caller.
pub const ABSENT_GRACE: Duration = Duration::from_secs(60);

/// A credential as last loaded, and when the projection last had it.
#[derive(Clone)]
struct Known {
    token: TokenState,
    seen: Instant,
}

/// Every token that can authenticate (revoked and expired ones too, to say so), by the
/// hash of its secret.
pub struct Credentials {
    store: Store,
    by_hash: RwLock<Arc<HashMap<[u8; 32], Known>>>,
    /// When the last reload finished (single flight for reloads on a miss).
    reloaded: tokio::sync::Mutex<Option<Instant>>,
}

impl Credentials {
    /// Loads the credentials and keeps them fresh, following `tokens` (the progress of
    /// the tokens projection), until the returned value is dropped.
    pub fn start(store: Store, tokens: &Projections) -> Arc<Credentials> {
        let credentials = Arc::new(Credentials {
            store,
            by_hash: RwLock::new(Arc::new(HashMap::new())),
            reloaded: tokio::sync::Mutex::new(None),
        });
        tokio::spawn(keep_fresh(Arc::downgrade(&credentials), tokens.changes()));
        credentials
    }

    /// Reads every credential again.
    async fn reload(&self) -> Result<(), StoreError> {
        let mut reloaded = self.reloaded.lock().await;
        let loaded = self.store.credentials().await?;
        let now = Instant::now();
        let mut by_hash = HashMap::with_capacity(loaded.len());
        for c in loaded {
            let Ok(hash) = <[u8; 32]>::try_from(c.hash.as_slice()) else {
                tracing::warn!(token = %c.token.name, "a credential's hash is not 32 bytes; ignored");
                continue;
            };
            by_hash.insert(
                hash,
                Known {
                    token: c.token,
                    seen: now,
                },
            );
        }
        let previous = self
            .by_hash
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (hash, known) in previous.iter() {
            if !by_hash.contains_key(hash) && known.seen.elapsed() < ABSENT_GRACE {
                by_hash.insert(*hash, known.clone());
            }
        }
        *self.by_hash.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(by_hash);
        *reloaded = Some(Instant::now());
        Ok(())
    }

    /// Reloads unless a reload finished less than [`MISS_RELOAD_GAP`] ago.
    async fn reload_after_miss(&self) -> Result<(), StoreError> {
        {
            let reloaded = self.reloaded.lock().await;
            if reloaded.is_some_and(|t| t.elapsed() < MISS_RELOAD_GAP) {
                return Ok(());
            }
        }
        self.reload().await
    }

    fn lookup(&self, hash: &[u8; 32]) -> Option<TokenState> {
        let by_hash = self.by_hash.read().unwrap_or_else(|e| e.into_inner());
        by_hash
            .get_key_value(hash)
            .filter(|(stored, _)| hashes_equal(*stored, hash))
            .map(|(_, known)| known.token.clone())
    }

    /// The principal of a request's `Authorization` header, or the 401 to answer.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, ApiError> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::unauthorized(
                "unauthenticated",
                "this API needs a token: send `Authorization: Bearer <token>` \
                 (`tasklog token create` makes one)",
            ));
        };
        let malformed = || {
            ApiError::unauthorized(
                "invalid_token",
                "the Authorization header is not `Bearer tlk_<43 characters>`",
            )
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .filter(|t| looks_like_token(t))
            .ok_or_else(malformed)?;
        let hash = token_hash(token);
        let known = match self.lookup(&hash) {
            Some(t) => Some(t),
            None => {
                self.reload_after_miss().await?;
                self.lookup(&hash)
            }
        };
        let Some(state) = known else {
            return Err(ApiError::unauthorized(
                "invalid_token",
                "the token is not known (never issued, or issued to another tasklog)",
            ));
        };
        if state.revoked_at.is_some() {
            return Err(ApiError::unauthorized(
                "invalid_token",
                format!("token {:?} was revoked", state.name),
            ));
        }
        if !state.active_at(chrono::Utc::now()) {
            return Err(ApiError::unauthorized(
                "invalid_token",
                format!("token {:?} has expired", state.name),
            ));
        }
        Ok(state.principal())
    }
}

/// Reloads on every notification of the tokens projection and every [`RELOAD_EVERY`],
/// until the credentials are dropped.
async fn keep_fresh(
    credentials: Weak<Credentials>,
    mut changes: tokio::sync::watch::Receiver<u64>,
) {
    loop {
        {
            let Some(c) = credentials.upgrade() else {
                return;
            };
            if let Err(e) = c.reload().await {
                tracing::warn!(error = %e, "cannot reload the API tokens (keeping the last ones)");
            }
        }
        changes.borrow_and_update();
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    tokio::time::sleep(RELOAD_EVERY).await;
                }
            }
            _ = tokio::time::sleep(RELOAD_EVERY) => {}
        }
    }
}

/// The caller of a request, as the authentication middleware found it.
#[derive(Debug, Clone)]
pub struct Caller(pub Principal);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Caller, ApiError> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .map(Caller)
            .ok_or_else(|| ApiError::unauthorized("unauthenticated", "no caller was established"))
    }
}

/// The middleware: finds the route's [`Access`], authenticates the caller when it needs
/// one, checks the role, and hands the [`Principal`] to the handler.
pub(super) async fn authorize(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string());
    let mut access = path
        .as_deref()
        .and_then(|p| routes::access(request.method(), p))
        .unwrap_or(Access::Read);
    if path.as_deref() == Some("/metrics") && !state.options.metrics_open {
        access = Access::Read;
    }
    let principal = match (access, state.options.auth) {
        (Access::Open, _) | (_, AuthMode::Off) => Principal::anonymous(),
        (_, AuthMode::Tokens) => match state.credentials.authenticate(request.headers()).await {
            Ok(p) => p,
            Err(e) => return e.into_response(),
        },
    };
    if let Err(denied) = principal.allows(access) {
        return ApiError::from(denied).into_response();
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}
