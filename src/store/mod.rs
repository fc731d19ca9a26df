//! Postgres: the connection pool, migrations, the projection's tables and the read side.
//!
//! Postgres holds projections only. Every row here can be rebuilt from the events topic
//! (`tasklog projector --rebuild`).

pub mod progress;
pub mod projection;
pub mod snapshot;
pub mod tls;
mod tokens;

pub use tokens::Credential;

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures::StreamExt;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;
use tokio_postgres::AsyncMessage;
use uuid::Uuid;

use crate::events::service::ServiceState;
use crate::events::worker::WorkerState;
use crate::events::{TaskState, TaskStatus};
pub use progress::KnownOffsets;

/// Default database URL.
pub const DEFAULT_DATABASE_URL: &str = "postgres://tasklog:tasklog@127.0.0.1:5432/tasklog";

/// The channel the projector notifies after every committed batch.
pub const PROJECTION_CHANNEL: &str = "tasklog_projection";
/// The channel the workers projection notifies after every committed batch.
pub const WORKERS_CHANNEL: &str = "tasklog_workers";
/// The channel the services projection notifies after every committed batch.
pub const SERVICES_CHANNEL: &str = "tasklog_services";
/// The channel the tokens projection notifies after every committed batch.
pub const TOKENS_CHANNEL: &str = "tasklog_tokens";
/// The channel the log indexer notifies after every committed batch.
pub const LOG_INDEX_CHANNEL: &str = "tasklog_log_index";

/// A task row's project, as SQL (the expression `tasks_by_project` indexes).
const TASK_PROJECT: &str = "COALESCE(doc->'spec'->>'project', 'default')";

/// Migrations, applied in order at start. Never edit one that has shipped: add a new one.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("migrations/0001_projection.sql")),
    (2, include_str!("migrations/0002_log_index.sql")),
    (3, include_str!("migrations/0003_workers.sql")),
    (4, include_str!("migrations/0004_services.sql")),
    (5, include_str!("migrations/0005_auth.sql")),
    (6, include_str!("migrations/0006_projects.sql")),
    (7, include_str!("migrations/0007_traces.sql")),
];

/// Errors from the store, with context.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database URL does not parse.
    #[error("invalid database URL: {0}")]
    Url(String),
    /// No connection could be had.
    #[error("cannot connect to Postgres: {0}")]
    Pool(String),
    /// A query failed.
    #[error("Postgres query failed ({context}): {}", describe(source))]
    Query {
        /// What was being done.
        context: &'static str,
        /// The underlying error.
        source: tokio_postgres::Error,
    },
    /// A stored document does not decode (a bug or a foreign writer).
    #[error("stored row does not decode ({context}): {message}")]
    Corrupt {
        /// What was being read.
        context: &'static str,
        /// The decode error.
        message: String,
    },
}

/// Postgres's own message and detail, which `tokio_postgres::Error`'s Display omits.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{}: {} ({detail})", db.code().code(), db.message()),
            None => format!("{}: {}", db.code().code(), db.message()),
        },
        None => e.to_string(),
    }
}

impl StoreError {
    /// Whether Postgres refused the data itself, so the same statement with the same
    /// values fails again every time: a data exception (SQLSTATE class 22, e.g. a NUL in
    /// text or jsonb), an integrity violation (23) or a program limit (54, e.g. an index
    /// row too large). Anything else — a lost connection, a restart, a serialization
    /// failure or deadlock (class 40), a timeout — is transient and worth retrying.
    pub fn is_data_rejection(&self) -> bool {
        match self {
            StoreError::Query { source, .. } => source
                .as_db_error()
                .is_some_and(|db| matches!(&db.code().code()[..2], "22" | "23" | "54")),
            _ => false,
        }
    }

    /// Postgres' SQLSTATE, when Postgres answered.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            StoreError::Query { source, .. } => source.as_db_error().map(|db| db.code().code()),
            _ => None,
        }
    }
}

/// Shorthand to attach context to a Postgres error.
pub(crate) fn ctx(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |source| StoreError::Query { context, source }
}

/// A pooled Postgres handle.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    url: String,
}

/// A projected task with where its last event sits on the log.
#[derive(Debug, Clone, Serialize)]
pub struct TaskRecord {
    /// The folded state.
    #[serde(flatten)]
    pub task: TaskState,
    /// Partition of the task's events.
    pub partition: i32,
    /// Offset of the last applied event.
    pub last_offset: i64,
}

/// One applied event of a task's history.
#[derive(Debug, Clone, Serialize)]
pub struct EventRecord {
    /// `ce_type`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Per-task sequence number.
    pub seq: i64,
    /// `ce_time`.
    pub time: DateTime<Utc>,
    /// `ce_source`.
    pub source: String,
    /// `ce_id`.
    pub ce_id: String,
    /// Kafka partition.
    pub partition: i32,
    /// Kafka offset.
    pub offset: i64,
    /// The event data.
    pub data: Value,
    /// Who caused it (`ce_tasklogprincipal`), when it says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// The trace it belongs to (`ce_traceparent`), when it says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The span that caused it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
}

/// One event of a trace, from any task.
#[derive(Debug, Clone, Serialize)]
pub struct TraceEvent {
    /// The task.
    pub task_id: Uuid,
    /// `ce_type`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Per-task sequence number.
    pub seq: i64,
    /// `ce_time`.
    pub time: DateTime<Utc>,
    /// `ce_source`.
    pub source: String,
    /// Who caused it, when it says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// Kafka partition.
    pub partition: i32,
    /// Kafka offset.
    pub offset: i64,
    /// The trace.
    pub trace_id: String,
    /// The span that caused it.
    pub span_id: String,
}

/// What became of an event, looked up by `ce_id`.
#[derive(Debug, Clone, PartialEq)]
pub enum EventOutcome {
    /// Applied with this seq.
    Applied,
    /// Rejected with this reason code and message.
    Rejected {
        /// Reason code.
        reason: String,
        /// Detail.
        message: String,
    },
}

/// Where one attempt's log lines are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LogIndexRow {
    /// Attempt.
    pub attempt: i32,
    /// Partition of the logs topic.
    pub partition: i32,
    /// Offset of its first record.
    pub first_offset: i64,
    /// Offset of its last record.
    pub last_offset: i64,
    /// Records.
    pub lines: i64,
    /// Bytes of text.
    pub bytes: i64,
    /// Highest line number.
    pub last_line: i64,
}

/// Filter and page of a task listing.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    /// Only tasks in this state.
    pub state: Option<TaskStatus>,
    /// Only tasks of this type.
    pub task_type: Option<String>,
    /// Only tasks carrying all these labels.
    pub labels: Vec<(String, String)>,
    /// Only tasks of these projects (`None`: every project).
    pub projects: Option<Vec<String>>,
    /// Only the replicas of this service.
    pub service: Option<String>,
    /// Only tasks that have not ended.
    pub unfinished: bool,
    /// Continue after this (submitted_at, id).
    pub after: Option<(DateTime<Utc>, Uuid)>,
    /// Page size.
    pub limit: i64,
}

impl Store {
    /// Connects a pool of at most `max_size` connections (lazily) to `url`.
    pub fn connect(url: &str, max_size: usize) -> Result<Store, StoreError> {
        // TLS as the URL's sslmode and sslrootcert say (see [`tls`]).
        let target = tls::parse(url).map_err(|e| StoreError::Url(e.to_string()))?;
        let manager = Manager::from_config(
            target.config,
            target.tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(max_size)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(10)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        Ok(Store {
            pool,
            url: url.to_string(),
        })
    }

    /// The URL this store connects to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A pooled connection.
    pub async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Pool(e.to_string()))
    }

    /// Applies pending migrations, under an advisory lock so concurrent starts are safe.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(ctx("begin migration"))?;
        tx.execute("SELECT pg_advisory_xact_lock(7305547060521713)", &[])
            .await
            .map_err(ctx("lock for migration"))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(ctx("create schema_migrations"))?;
        let applied: Vec<i32> = tx
            .query("SELECT version FROM schema_migrations", &[])
            .await
            .map_err(ctx("read schema_migrations"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for (version, sql) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            tx.batch_execute(sql)
                .await
                .map_err(ctx("apply migration"))?;
            tx.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .await
            .map_err(ctx("record migration"))?;
        }
        tx.commit().await.map_err(ctx("commit migration"))
    }

    /// Checks that Postgres answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.client()
            .await?
            .simple_query("SELECT 1")
            .await
            .map(|_| ())
            .map_err(ctx("ping"))
    }

    /// One task, or `None`.
    pub async fn task(&self, id: Uuid) -> Result<Option<TaskRecord>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT doc, event_partition, last_offset FROM tasks WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(ctx("read task"))?;
        row.map(|r| task_record(&r)).transpose()
    }

    /// The tasks among `ids` that exist, by id (one query).
    pub async fn tasks(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, TaskRecord>, StoreError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT doc, event_partition, last_offset FROM tasks WHERE id = ANY($1)",
                &[&ids],
            )
            .await
            .map_err(ctx("read tasks"))?;
        rows.iter()
            .map(|r| task_record(r).map(|t| (t.task.id, t)))
            .collect()
    }

    /// Which of `ids` have ended (succeeded, failed or cancelled): one query for every
    /// task the log followers of a process wait on.
    pub async fn ended_tasks(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let terminal: Vec<String> = crate::events::TaskStatus::ALL
            .iter()
            .filter(|s| s.is_terminal())
            .map(|s| s.to_string())
            .collect();
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id FROM tasks WHERE id = ANY($1) AND state = ANY($2)",
                &[&ids, &terminal],
            )
            .await
            .map_err(ctx("read ended tasks"))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// A page of tasks, newest first (by submission time, then id).
    pub async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<TaskRecord>, StoreError> {
        let mut sql =
            String::from("SELECT doc, event_partition, last_offset FROM tasks WHERE true");
        let mut params: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> = Vec::new();
        let mut push =
            |sql: &mut String,
             clause: &str,
             p: Box<dyn tokio_postgres::types::ToSql + Sync + Send>| {
                params.push(p);
                sql.push_str(&clause.replace('?', &format!("${}", params.len())));
            };
        if let Some(state) = filter.state {
            push(
                &mut sql,
                " AND state = ?",
                Box::new(state.as_str().to_string()),
            );
        }
        if let Some(t) = &filter.task_type {
            push(&mut sql, " AND type = ?", Box::new(t.clone()));
        }
        if !filter.labels.is_empty() {
            let labels: serde_json::Map<String, Value> = filter
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            push(
                &mut sql,
                " AND labels @> ?",
                Box::new(Value::Object(labels)),
            );
        }
        if let Some(service) = &filter.service {
            push(
                &mut sql,
                " AND doc->'spec'->>'service' = ?",
                Box::new(service.clone()),
            );
        }
        if filter.unfinished {
            let ended: Vec<String> = TaskStatus::ALL
                .iter()
                .filter(|s| s.is_terminal())
                .map(|s| s.as_str().to_string())
                .collect();
            push(&mut sql, " AND NOT (state = ANY(?))", Box::new(ended));
        }
        if let Some(projects) = &filter.projects {
            push(
                &mut sql,
                &format!(" AND {TASK_PROJECT} = ANY(?)"),
                Box::new(projects.clone()),
            );
        }
        if let Some((at, id)) = filter.after {
            push(&mut sql, " AND (submitted_at, id) < (?", Box::new(at));
            push(&mut sql, ", ?)", Box::new(id));
        }
        push(
            &mut sql,
            " ORDER BY submitted_at DESC, id DESC LIMIT ?",
            Box::new(filter.limit),
        );
        let client = self.client().await?;
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p.as_ref() as _).collect();
        let rows = client.query(&sql, &refs).await.map_err(ctx("list tasks"))?;
        rows.iter().map(task_record).collect()
    }

    /// A task's applied events in order.
    pub async fn task_events(&self, id: Uuid) -> Result<Vec<EventRecord>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT type, seq, time, source, ce_id, partition, \"offset\", data, principal,
                        trace_id, span_id
                 FROM task_events WHERE task_id = $1 ORDER BY seq",
                &[&id],
            )
            .await
            .map_err(ctx("read task events"))?;
        Ok(rows
            .iter()
            .map(|r| EventRecord {
                event_type: r.get(0),
                seq: r.get(1),
                time: r.get(2),
                source: r.get(3),
                ce_id: r.get(4),
                partition: r.get(5),
                offset: r.get(6),
                data: r.get(7),
                principal: r.get(8),
                trace_id: r.get(9),
                span_id: r.get(10),
            })
            .collect())
    }

    /// The events of trace `trace_id` (lowercase hex), across tasks, in order: event
    /// time, then partition and offset. At most `limit`.
    pub async fn trace_events(
        &self,
        trace_id: &str,
        limit: i64,
    ) -> Result<Vec<TraceEvent>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT task_id, type, seq, time, source, principal, partition, \"offset\",
                        trace_id, span_id
                 FROM task_events WHERE trace_id = $1
                 ORDER BY time, partition, \"offset\" LIMIT $2",
                &[&trace_id, &limit],
            )
            .await
            .map_err(ctx("read a trace"))?;
        Ok(rows
            .iter()
            .map(|r| TraceEvent {
                task_id: r.get(0),
                event_type: r.get(1),
                seq: r.get(2),
                time: r.get(3),
                source: r.get(4),
                principal: r.get(5),
                partition: r.get(6),
                offset: r.get(7),
                trace_id: r.get(8),
                span_id: r.get(9),
            })
            .collect())
    }

    /// What became of the event with this `ce_id`, if the projector has reached it.
    pub async fn event_outcome(&self, ce_id: &str) -> Result<Option<EventOutcome>, StoreError> {
        let client = self.client().await?;
        let applied = client
            .query_opt("SELECT 1 FROM task_events WHERE ce_id = $1", &[&ce_id])
            .await
            .map_err(ctx("find applied event"))?;
        if applied.is_some() {
            return Ok(Some(EventOutcome::Applied));
        }
        let rejected = client
            .query_opt(
                "SELECT reason, message FROM rejected_events WHERE ce_id = $1
                 ORDER BY rejected_at DESC LIMIT 1",
                &[&ce_id],
            )
            .await
            .map_err(ctx("find rejected event"))?;
        Ok(rejected.map(|r| EventOutcome::Rejected {
            reason: r.get(0),
            message: r.get(1),
        }))
    }

    /// The next offset to apply, per partition of `topic`.
    pub async fn projection_offsets(&self, topic: &str) -> Result<HashMap<i32, i64>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT partition, next_offset FROM projection_offsets WHERE topic = $1",
                &[&topic],
            )
            .await
            .map_err(ctx("read projection offsets"))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Tasks per state.
    pub async fn state_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT state, count FROM task_state_counts", &[])
            .await
            .map_err(ctx("read state counts"))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The cursor MAC key shared by every API server, created on first use.
    pub async fn cursor_key(&self) -> Result<Vec<u8>, StoreError> {
        let client = self.client().await?;
        let fresh: Vec<u8> = (0..2).flat_map(|_| *Uuid::new_v4().as_bytes()).collect();
        client
            .execute(
                "INSERT INTO server_keys (name, key) VALUES ('log_cursor', $1) ON CONFLICT DO NOTHING",
                &[&fresh],
            )
            .await
            .map_err(ctx("create cursor key"))?;
        let row = client
            .query_one("SELECT key FROM server_keys WHERE name = 'log_cursor'", &[])
            .await
            .map_err(ctx("read cursor key"))?;
        Ok(row.get(0))
    }

    /// One attempt's (or every attempt's) index rows, by attempt.
    pub async fn log_index(&self, task_id: Uuid) -> Result<Vec<LogIndexRow>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT attempt, partition, first_offset, last_offset, lines, bytes, last_line
                 FROM log_index WHERE task_id = $1 ORDER BY attempt",
                &[&task_id],
            )
            .await
            .map_err(ctx("read log index"))?;
        Ok(rows
            .iter()
            .map(|r| LogIndexRow {
                attempt: r.get(0),
                partition: r.get(1),
                first_offset: r.get(2),
                last_offset: r.get(3),
                lines: r.get(4),
                bytes: r.get(5),
                last_line: r.get(6),
            })
            .collect())
    }

    /// The offset of the checkpoint at or before `line` of an attempt.
    pub async fn log_checkpoint(
        &self,
        task_id: Uuid,
        attempt: i32,
        line: i64,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT line, \"offset\" FROM log_checkpoints
                 WHERE task_id = $1 AND attempt = $2 AND line <= $3 ORDER BY line DESC LIMIT 1",
                &[&task_id, &attempt, &line],
            )
            .await
            .map_err(ctx("read log checkpoint"))?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    /// The lowest offset of `topic` the projection saw for task `id` (applied or
    /// rejected), or `None` when it saw nothing of it.
    pub async fn first_offset_of(&self, topic: &str, id: Uuid) -> Result<Option<i64>, StoreError> {
        let key = id.to_string().into_bytes();
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT min(o) FROM (
                     SELECT \"offset\" AS o FROM task_events WHERE task_id = $1
                     UNION ALL
                     SELECT \"offset\" FROM rejected_events WHERE topic = $2 AND record_key = $3
                 ) AS t",
                &[&id, &topic, &key],
            )
            .await
            .map_err(ctx("find a task's first offset"))?;
        Ok(row.get(0))
    }

    /// Deletes every projected row and offset, so the projector rebuilds from offset 0.
    pub async fn reset_projection(&self) -> Result<(), StoreError> {
        self.client()
            .await?
            .batch_execute(
                &format!(
                    "TRUNCATE tasks, task_events, rejected_events, projection_offsets, task_state_counts,
                              log_index, log_checkpoints, workers, services, tokens;
                     {}",
                    [PROJECTION_CHANNEL, WORKERS_CHANNEL, SERVICES_CHANNEL, TOKENS_CHANNEL, LOG_INDEX_CHANNEL]
                        .iter()
                        .map(|c| format!("NOTIFY {c}, '{}';", progress::RESET_PAYLOAD))
                        .collect::<String>()
                ),
            )
            .await
            .map_err(ctx("reset projection"))
    }

    /// Follows `NOTIFY` on `channels` (e.g. [`PROJECTION_CHANNEL`]): the returned
    /// counter changes after every signalled projector commit (and after a reconnect,
    /// when one may have been missed). Reconnects by itself.
    pub fn follow(&self, channels: &[&'static str]) -> watch::Receiver<u64> {
        self.follow_progress(channels).0
    }

    /// [`Store::follow`], also folding what each notification says was stored into
    /// [`KnownOffsets`] (forgotten whenever the connection breaks: a Postgres crash may
    /// take back asynchronous commits it had notified).
    pub fn follow_progress(
        &self,
        channels: &[&'static str],
    ) -> (watch::Receiver<u64>, KnownOffsets) {
        let (tx, rx) = watch::channel(0u64);
        let known = KnownOffsets::new();
        let url = self.url.clone();
        let statement: String = channels.iter().map(|c| format!("LISTEN {c};")).collect();
        let follower_known = known.clone();
        tokio::spawn(async move {
            let known = follower_known;
            let mut backoff = Duration::from_millis(100);
            loop {
                let listened = listen_once(&url, &statement, &tx, &known).await;
                known.forget();
                // Nobody follows any more (e.g. the server stopped): end quietly.
                if tx.is_closed() {
                    return;
                }
                if let Err(e) = listened {
                    tracing::warn!(error = %e, "projection notifications lost; reconnecting");
                }
                tx.send_modify(|n| *n += 1);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
        (rx, known)
    }

    /// Every worker, by id.
    pub async fn workers(&self) -> Result<Vec<WorkerState>, StoreError> {
        let rows = self
            .client()
            .await?
            .query("SELECT doc FROM workers ORDER BY id", &[])
            .await
            .map_err(ctx("list workers"))?;
        rows.iter().map(|r| worker_doc(r.get(0))).collect()
    }

    /// One worker.
    pub async fn worker(&self, id: &str) -> Result<Option<WorkerState>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT doc FROM workers WHERE id = $1", &[&id])
            .await
            .map_err(ctx("read worker"))?;
        row.map(|r| worker_doc(r.get(0))).transpose()
    }

    /// Tasks assigned to or running on `worker_id`.
    pub async fn tasks_on_worker(&self, worker_id: &str) -> Result<Vec<TaskRecord>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT doc, event_partition, last_offset FROM tasks
                 WHERE state IN ('assigned', 'running') AND doc->>'worker_id' = $1
                 ORDER BY submitted_at, id",
                &[&worker_id],
            )
            .await
            .map_err(ctx("list a worker's tasks"))?;
        rows.iter().map(task_record).collect()
    }

    /// Every assigned or running task, by the worker it is on (one query for all
    /// workers).
    pub async fn tasks_by_worker(&self) -> Result<HashMap<String, Vec<TaskRecord>>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT doc, event_partition, last_offset FROM tasks
                 WHERE state IN ('assigned', 'running') ORDER BY submitted_at, id",
                &[],
            )
            .await
            .map_err(ctx("list tasks on workers"))?;
        let mut by_worker: HashMap<String, Vec<TaskRecord>> = HashMap::new();
        for row in &rows {
            let record = task_record(row)?;
            if let Some(w) = record.task.worker_id.clone() {
                by_worker.entry(w).or_default().push(record);
            }
        }
        Ok(by_worker)
    }

    /// Queued tasks per priority band (`0-24`, `25-49`, `50-74`, `75-100`), every band
    /// present.
    pub async fn queue_depth_by_band(&self) -> Result<Vec<(&'static str, i64)>, StoreError> {
        const BANDS: [&str; 4] = ["0-24", "25-49", "50-74", "75-100"];
        let rows = self
            .client()
            .await?
            .query(
                "SELECT LEAST(priority / 25, 3)::int, count(*) FROM tasks
                 WHERE state = 'queued' GROUP BY 1",
                &[],
            )
            .await
            .map_err(ctx("count queued tasks by band"))?;
        let mut counts = [0i64; 4];
        for r in rows {
            let band: i32 = r.get(0);
            counts[band.clamp(0, 3) as usize] = r.get(1);
        }
        Ok(BANDS.into_iter().zip(counts).collect())
    }

    /// Every service, by name.
    pub async fn services(&self) -> Result<Vec<ServiceState>, StoreError> {
        let rows = self
            .client()
            .await?
            .query("SELECT doc FROM services ORDER BY name", &[])
            .await
            .map_err(ctx("list services"))?;
        rows.iter().map(|r| service_doc(r.get(0))).collect()
    }

    /// One service.
    pub async fn service(&self, name: &str) -> Result<Option<ServiceState>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT doc FROM services WHERE name = $1", &[&name])
            .await
            .map_err(ctx("read service"))?;
        row.map(|r| service_doc(r.get(0))).transpose()
    }

    /// Every replica task of service `name` submitted at or after `since` (the current
    /// incarnation), oldest first.
    pub async fn service_replicas(
        &self,
        name: &str,
        since: DateTime<Utc>,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT doc, event_partition, last_offset FROM tasks
                 WHERE doc->'spec'->>'service' = $1 AND submitted_at >= $2
                 ORDER BY submitted_at, id",
                &[&name, &since],
            )
            .await
            .map_err(ctx("list a service's replicas"))?;
        rows.iter().map(task_record).collect()
    }

    /// The replica tasks of each of `services` (of its current incarnation, oldest
    /// first), by service name, in one query.
    pub async fn replicas_of(
        &self,
        services: &[ServiceState],
    ) -> Result<HashMap<String, Vec<TaskRecord>>, StoreError> {
        let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
        let since: Vec<DateTime<Utc>> = services.iter().map(|s| s.created_at).collect();
        let rows = self
            .client()
            .await?
            .query(
                "SELECT t.doc, t.event_partition, t.last_offset
                 FROM unnest($1::text[], $2::timestamptz[]) AS s(name, since)
                 JOIN tasks t ON t.doc->'spec'->>'service' = s.name AND t.submitted_at >= s.since
                 ORDER BY t.submitted_at, t.id",
                &[&names, &since],
            )
            .await
            .map_err(ctx("list services' replicas"))?;
        let mut by_service: HashMap<String, Vec<TaskRecord>> = HashMap::new();
        for row in &rows {
            let record = task_record(row)?;
            if let Some(name) = record.task.spec.service.clone() {
                by_service.entry(name).or_default().push(record);
            }
        }
        Ok(by_service)
    }

    /// Every task that is not terminal.
    pub async fn unfinished_tasks(&self) -> Result<Vec<TaskRecord>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT doc, event_partition, last_offset FROM tasks
                 WHERE state IN ('pending', 'queued', 'assigned', 'running')",
                &[],
            )
            .await
            .map_err(ctx("list unfinished tasks"))?;
        rows.iter().map(task_record).collect()
    }

    /// Tasks whose last event sits at or after `from[partition]`: every task changed
    /// since a reader saw offsets up to `from - 1`.
    pub async fn tasks_changed_since(
        &self,
        from: &HashMap<i32, i64>,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let partitions: Vec<i32> = from.keys().copied().collect();
        let offsets: Vec<i64> = partitions.iter().map(|p| from[p]).collect();
        let rows = self
            .client()
            .await?
            .query(
                "SELECT t.doc, t.event_partition, t.last_offset
                 FROM unnest($1::int[], $2::bigint[]) AS f(p, o)
                 JOIN tasks t ON t.event_partition = f.p AND t.last_offset >= f.o",
                &[&partitions, &offsets],
            )
            .await
            .map_err(ctx("list changed tasks"))?;
        rows.iter().map(task_record).collect()
    }
}

fn service_doc(doc: Value) -> Result<ServiceState, StoreError> {
    from_doc(doc, "services.doc")
}

fn worker_doc(doc: Value) -> Result<WorkerState, StoreError> {
    from_doc(doc, "workers.doc")
}

/// A JSON document of column `context`, parsed.
fn from_doc<T: serde::de::DeserializeOwned>(
    doc: Value,
    context: &'static str,
) -> Result<T, StoreError> {
    serde_json::from_value(doc).map_err(|e| StoreError::Corrupt {
        context,
        message: e.to_string(),
    })
}

async fn listen_once(
    url: &str,
    statement: &str,
    tx: &watch::Sender<u64>,
    known: &KnownOffsets,
) -> Result<(), tls::PgConnectError> {
    let (client, mut connection) = tls::connect(url).await?;
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    {
        // The connection must be driven while LISTEN runs.
        let mut listen = std::pin::pin!(client.batch_execute(statement));
        loop {
            tokio::select! {
                result = &mut listen => { result?; break; }
                message = messages.next() => match message {
                    Some(Err(e)) => return Err(e.into()),
                    None => return Ok(()),
                    Some(Ok(_)) => {}
                }
            }
        }
    }
    // Anything committed before LISTEN took effect must be re-checked by waiters.
    tx.send_modify(|n| *n += 1);
    while let Some(message) = messages.next().await {
        if let AsyncMessage::Notification(notification) = message? {
            known.apply(progress::parse_payload(notification.payload()));
            tx.send_modify(|n| *n += 1);
        }
        if tx.is_closed() {
            break;
        }
    }
    drop(client);
    Ok(())
}

fn task_record(row: &tokio_postgres::Row) -> Result<TaskRecord, StoreError> {
    let doc: Value = row.get(0);
    let task: TaskState = serde_json::from_value(doc).map_err(|e| StoreError::Corrupt {
        context: "tasks.doc",
        message: e.to_string(),
    })?;
    Ok(TaskRecord {
        task,
        partition: row.get(1),
        last_offset: row.get(2),
    })
}

/// Creates the database named in `url` when it does not exist, connecting to the
/// server's `postgres` database with the same credentials.
pub async fn ensure_database(url: &str) -> Result<(), StoreError> {
    let mut target = tls::parse(url).map_err(|e| StoreError::Url(e.to_string()))?;
    let config = &mut target.config;
    let name = config
        .get_dbname()
        .map(str::to_string)
        .ok_or_else(|| StoreError::Url("the URL names no database".into()))?;
    config.dbname("postgres");
    let (client, connection) = target.connect().await.map_err(ctx("connect to postgres"))?;
    let driver = tokio::spawn(connection);
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .map_err(ctx("look up database"))?
        .is_some();
    if !exists {
        let quoted = name.replace('"', "\"\"");
        if let Err(e) = client
            .batch_execute(&format!("CREATE DATABASE \"{quoted}\""))
            .await
        {
            // Another process may have created it meanwhile.
            if e.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) {
                return Err(StoreError::Query {
                    context: "create database",
                    source: e,
                });
            }
        }
    }
    drop(client);
    let _ = driver.await;
    Ok(())
}
