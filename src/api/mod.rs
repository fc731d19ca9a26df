//! The HTTP API (axum): submit, read, list and cancel tasks; health, readiness, metrics.
//!
//! Writes go to Kafka and are acknowledged only once the broker has the record; reads
//! come from the Postgres projection. A read about one task, service or worker first
//! waits until the projection has reached the end of that entity's partition as it was
//! when the request arrived ([`AppState::read_your_writes`]), so every client reads its
//! own writes through every server, and a 404 means "not on the log".

mod audit;
pub mod auth;
mod body;
mod error;
mod limits;
mod logs;
pub mod openapi;
pub mod routes;
mod services;
mod tasks;
pub mod tokens;
pub mod traces;
mod transition;
mod workers;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;

pub use error::ApiError;

use crate::consistency::Projections;
use crate::kafka::{Appender, KafkaIoError, PartitionEnds, Topics};
use crate::logs::reader::LogReader;
use crate::logs::{CursorKey, LogWriter, LogWriterOptions};
use crate::metrics::{metrics, render};
use crate::store::Store;

/// Largest request body accepted (a batch of 1000 specs fits easily).
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// Settings of the API.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// Broker list (for readiness).
    pub brokers: String,
    /// Topics.
    pub topics: Topics,
    /// Partitions of the events topic (to locate a task's partition by its key).
    pub partitions: i32,
    /// Partitions of the logs topic.
    pub log_partitions: i32,
    /// Partitions of the services topic (to locate a service's partition by its name).
    pub service_partitions: i32,
    /// Partitions of the workers topic (to locate a worker's partition by its id).
    pub worker_partitions: i32,
    /// How long a read about one task, service or worker waits for the projection to
    /// reach the end its partition had when the request arrived (then
    /// `503 projection_lagging`).
    pub read_wait: Duration,
    /// `ce_source` of the events the API appends.
    pub source: String,
    /// How long a cancel waits for the projection to confirm it.
    pub cancel_wait: Duration,
    /// Longest `wait_ms` a reader may ask for.
    pub max_wait: Duration,
    /// Most log followers at once ([`crate::logs::follow::FollowOptions::max_followers`]).
    pub max_followers: usize,
    /// Whether requests need a token.
    pub auth: auth::AuthMode,
    /// Whether `/metrics` answers without a token (default: yes; the API listens on
    /// loopback unless told otherwise).
    pub metrics_open: bool,
}

impl ApiOptions {
    /// Defaults for the given brokers and topics.
    pub fn new(brokers: &str, topics: Topics, partitions: i32) -> ApiOptions {
        let host = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "localhost".into());
        ApiOptions {
            brokers: brokers.to_string(),
            topics,
            partitions,
            log_partitions: partitions,
            service_partitions: partitions,
            worker_partitions: partitions,
            read_wait: Duration::from_secs(5),
            source: format!("tasklog://api/{host}"),
            cancel_wait: Duration::from_secs(5),
            max_wait: Duration::from_secs(60),
            max_followers: crate::logs::follow::DEFAULT_MAX_FOLLOWERS,
            auth: auth::AuthMode::Tokens,
            metrics_open: true,
        }
    }
}

/// Shared state of the handlers.
pub struct AppState {
    /// Postgres.
    pub store: Store,
    /// Kafka producer.
    pub appender: Appender,
    /// Settings.
    pub options: ApiOptions,
    /// Changes after every projector commit.
    pub projection: watch::Receiver<u64>,
    /// The projections' progress, for read-your-writes waits.
    pub projections: Projections,
    /// Where partitions end, for read-your-writes waits.
    pub ends: PartitionEnds,
    /// Signs and checks log cursors.
    pub cursor_key: CursorKey,
    /// Reads log lines from Kafka.
    pub log_reader: Arc<LogReader>,
    /// The process's log followers and the one tail per followed partition.
    pub follows: crate::logs::follow::FollowHub,
    /// Which followed tasks have ended.
    task_ends: Arc<logs::TaskEnds>,
    /// Appends log lines posted by outside producers.
    pub log_writer: LogWriter,
    /// The tokens that authenticate callers.
    pub credentials: Arc<auth::Credentials>,
    /// Issues and revokes tokens.
    pub tokens: tokens::TokenDesk,
    /// Submissions with an idempotency key this process appended recently, so that a
    /// quick retry is recognised before the projection has caught up.
    recent_keys: Mutex<RecentKeys>,
}

impl AppState {
    /// Builds the state; starts following projector notifications.
    pub fn new(
        store: Store,
        appender: Appender,
        options: ApiOptions,
        cursor_key: CursorKey,
    ) -> Result<Arc<AppState>, KafkaIoError> {
        let projections = Projections::follow(
            store.clone(),
            &[
                crate::store::PROJECTION_CHANNEL,
                crate::store::WORKERS_CHANNEL,
                crate::store::SERVICES_CHANNEL,
            ],
        );
        let projection = projections.changes();
        let ends = PartitionEnds::new(&options.brokers)?;
        let log_reader = Arc::new(LogReader::new(
            &options.brokers,
            &options.topics.logs,
            256 << 20,
        ));
        log_reader.close_idle_in_background();
        let follows = crate::logs::follow::FollowHub::new(
            &options.brokers,
            &options.topics.logs,
            crate::logs::follow::FollowOptions {
                max_followers: options.max_followers,
                ..Default::default()
            },
        );
        let task_ends = logs::TaskEnds::start(store.clone());
        let log_writer = LogWriter::new(
            appender.clone(),
            LogWriterOptions::new(&options.topics.logs),
        );
        let token_projections = Projections::follow(store.clone(), &[crate::store::TOKENS_CHANNEL]);
        let credentials = auth::Credentials::start(store.clone(), &token_projections);
        let tokens = tokens::TokenDesk {
            store: store.clone(),
            appender: appender.clone(),
            projections: token_projections,
            topic: options.topics.auth.clone(),
            source: options.source.clone(),
            wait: options.cancel_wait,
        };
        Ok(Arc::new(AppState {
            store,
            appender,
            credentials,
            tokens,
            options,
            projection,
            projections,
            ends,
            cursor_key,
            log_reader,
            follows,
            task_ends,
            log_writer,
            recent_keys: Mutex::new(RecentKeys::default()),
        }))
    }

    /// Read-your-writes for one entity: waits until the projection of `topic` has
    /// reached the end that the partition of `key` (as Kafka's partitioner places it
    /// among `partitions`) had when called, so that what the handler reads next holds
    /// everything on the log about it — and "not found" means "not on the log".
    /// Past [`ApiOptions::read_wait`] (or `at_least`, when longer: a reader that asked
    /// to wait): `503 projection_lagging` with the lag.
    pub async fn read_your_writes(
        &self,
        topic: &str,
        key: &[u8],
        partitions: i32,
        at_least: Duration,
    ) -> Result<(), ApiError> {
        let partition = crate::kafka::partition_for_key(key, partitions);
        let wait = self.options.read_wait.max(at_least);
        let deadline = tokio::time::Instant::now() + wait;
        let lag =
            crate::consistency::catch_up(&self.ends, &self.projections, topic, partition, deadline)
                .await?;
        if lag.caught_up() {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "projection_lagging",
            format!(
                "the projection of {topic} is {} record(s) behind partition {partition} after {} ms; try again",
                lag.0,
                wait.as_millis()
            ),
        )
        .with_detail("lag", serde_json::json!(lag.0))
        .with_detail("partition", serde_json::json!(partition)))
    }

    /// [`AppState::read_your_writes`] for service `name` on the services topic.
    pub async fn read_service(&self, name: &str) -> Result<(), ApiError> {
        self.read_your_writes(
            &self.options.topics.services,
            name.as_bytes(),
            self.options.service_partitions,
            Duration::ZERO,
        )
        .await
    }

    /// [`AppState::read_your_writes`] for worker `id` on the workers topic.
    pub async fn read_worker(&self, id: &str) -> Result<(), ApiError> {
        self.read_your_writes(
            &self.options.topics.workers,
            id.as_bytes(),
            self.options.worker_partitions,
            Duration::ZERO,
        )
        .await
    }

    /// [`AppState::read_your_writes`] for task `id` on the events topic.
    pub async fn read_task(&self, id: uuid::Uuid) -> Result<(), ApiError> {
        self.read_task_waiting(id, Duration::ZERO).await
    }

    /// 403 unless `caller` reaches the project of task `id`. A caller limited to some
    /// projects reads its own writes first, so a task just submitted is checked too;
    /// a task not on the log passes (the handler answers 404 for it).
    pub async fn reach_task(
        &self,
        caller: &crate::events::auth::Principal,
        id: uuid::Uuid,
    ) -> Result<(), ApiError> {
        if caller.reaches_all() {
            return Ok(());
        }
        self.read_task(id).await?;
        if let Some(record) = self.store.task(id).await? {
            caller.may_reach(record.task.spec.project())?;
        }
        Ok(())
    }

    /// [`AppState::read_task`], waiting at least `at_least` (a reader's `wait_ms`).
    pub async fn read_task_waiting(
        &self,
        id: uuid::Uuid,
        at_least: Duration,
    ) -> Result<(), ApiError> {
        self.read_your_writes(
            &self.options.topics.events,
            id.to_string().as_bytes(),
            self.options.partitions,
            at_least,
        )
        .await
    }
}

/// A bounded memory of recent keyed submissions (task id -> spec and response).
#[derive(Default)]
struct RecentKeys {
    map: HashMap<uuid::Uuid, (serde_json::Value, serde_json::Value)>,
    order: VecDeque<uuid::Uuid>,
}

impl RecentKeys {
    const CAPACITY: usize = 100_000;

    fn get(&self, id: &uuid::Uuid) -> Option<&(serde_json::Value, serde_json::Value)> {
        self.map.get(id)
    }

    fn insert(&mut self, id: uuid::Uuid, spec: serde_json::Value, response: serde_json::Value) {
        if self.map.insert(id, (spec, response)).is_none() {
            self.order.push_back(id);
            if self.order.len() > Self::CAPACITY
                && let Some(old) = self.order.pop_front()
            {
                self.map.remove(&old);
            }
        }
    }
}

/// The router with every route (the table of [`routes`]).
pub fn router(state: Arc<AppState>) -> Router {
    routes::add_all(Router::new())
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ))
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not accept that method",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(limits::limit_body))
        .layer(middleware::from_fn(observe))
        .with_state(state)
}

/// Serves the API on `addr` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds the API's listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Records request duration by route, method and status.
async fn observe(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = request.method().as_str().to_string();
    let response = next.run(request).await;
    metrics()
        .http_duration
        .with_label_values(&[&route, &method, response.status().as_str()])
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(State(state): State<Arc<AppState>>) -> Result<impl IntoResponse, ApiError> {
    let not_ready =
        |what: String| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", what);
    match tokio::time::timeout(Duration::from_secs(3), state.store.ping()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(not_ready(format!("postgres: {e}"))),
        Err(_) => return Err(not_ready("postgres: no answer within 3 s".into())),
    }
    match tokio::time::timeout(
        Duration::from_secs(6),
        crate::kafka::list_topics(&state.options.brokers),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(not_ready(format!("kafka: {e}"))),
        Err(_) => return Err(not_ready("kafka: no answer within 6 s".into())),
    }
    Ok(axum::Json(serde_json::json!({"status": "ready"})))
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    if let Ok(counts) = state.store.state_counts().await {
        for (s, n) in counts {
            metrics().tasks.with_label_values(&[&s]).set(n);
        }
    }
    if let Err(e) = workers::refresh_gauges(&state).await {
        tracing::warn!(error = ?e, "cannot refresh scheduling gauges");
    }
    if let Err(e) = services::refresh_gauges(&state).await {
        tracing::warn!(error = ?e, "cannot refresh service gauges");
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        render(),
    )
}

/// A JSON request body parsed by us, so that every failure is a JSON 4xx.
pub struct JsonBody(pub serde_json::Value);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            let status = e.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    status,
                    "payload_too_large",
                    format!("the body is larger than {MAX_BODY_BYTES} bytes"),
                )
            } else {
                ApiError::bad_request("invalid_body", e.body_text())
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(JsonBody(serde_json::Value::Null));
        }
        let mut value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}"))
        })?;
        if let Some(field) = crate::events::text::nul_path(&value) {
            return Err(ApiError::bad_request(
                "invalid_text",
                format!("{field}: contains a NUL character (U+0000), which tasklog cannot store"),
            )
            .with_detail("field", serde_json::Value::String(field)));
        }
        body::integral_floats_to_integers(&mut value);
        Ok(JsonBody(value))
    }
}
