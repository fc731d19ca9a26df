//! The projector's writes: one batch, one transaction.
//!
//! The transaction locks the topic's offset rows, loads what the fold needs, and writes
//! task rows, the event index, rejections, state counts and the next offsets together,
//! then notifies waiting readers. Either all of it commits or none of it does.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::Transaction;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{FromSql, Json, ToSql, Type};
use uuid::Uuid;

use super::{StoreError, ctx};
use crate::events::TaskState;
use crate::events::auth::TokenState;
use crate::events::service::ServiceState;
use crate::events::worker::WorkerState;

/// A task row to upsert: its final state in this batch and where its last event sits.
#[derive(Debug, Clone)]
pub struct TaskRow {
    /// Folded state.
    pub state: TaskState,
    /// Partition of its events.
    pub partition: i32,
    /// Offset of its last applied event.
    pub last_offset: i64,
    /// Whether the task has no row yet (inserted with COPY rather than upserted).
    pub is_new: bool,
}

/// An applied event for the task's history.
#[derive(Debug, Clone)]
pub struct AppliedEvent {
    /// `ce_id`.
    pub ce_id: String,
    /// Task id.
    pub task_id: Uuid,
    /// Per-task seq.
    pub seq: i64,
    /// `ce_type`.
    pub event_type: &'static str,
    /// `ce_time`.
    pub time: DateTime<Utc>,
    /// `ce_source`.
    pub source: String,
    /// `ce_tasklogprincipal`.
    pub principal: Option<String>,
    /// `ce_traceparent`.
    pub traceparent: Option<crate::events::trace::TraceContext>,
    /// Kafka partition.
    pub partition: i32,
    /// Kafka offset.
    pub offset: i64,
    /// The event data: the record value exactly as it was on the log (valid JSON).
    pub data: Vec<u8>,
}

impl AppliedEvent {
    /// The history row of `event`, read at `partition`/`offset` with value `data`.
    pub fn new(event: &crate::events::Event, partition: i32, offset: i64, data: Vec<u8>) -> Self {
        AppliedEvent {
            ce_id: event.envelope.id.clone(),
            task_id: event.task_id,
            seq: event.seq as i64,
            event_type: event.envelope.event_type.as_str(),
            time: event.envelope.time,
            source: event.envelope.source.clone(),
            principal: event.envelope.principal.clone(),
            traceparent: event.envelope.traceparent,
            partition,
            offset,
            data,
        }
    }
}

/// JSON text sent as is to a `json` column: no parse and re-serialise on the hot path.
#[derive(Debug)]
struct RawJson<'a>(&'a [u8]);

impl ToSql for RawJson<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(self.0);
        Ok(tokio_postgres::types::IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSON
    }

    tokio_postgres::types::to_sql_checked!();
}

/// A record that was not applied.
#[derive(Debug, Clone)]
pub struct RejectedRecord {
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// `ce_id`, if the record had one.
    pub ce_id: Option<String>,
    /// `ce_type`, if the record had one.
    pub ce_type: Option<String>,
    /// `ce_subject`, if the record had one.
    pub subject: Option<String>,
    /// Reason code.
    pub reason: &'static str,
    /// Detail.
    pub message: String,
    /// Record key.
    pub key: Option<Vec<u8>>,
    /// Record headers as a JSON array of `[name, value]` (values lossily UTF-8).
    pub headers: Value,
    /// Record value.
    pub payload: Option<Vec<u8>>,
}

/// What one batch of the task projection writes.
#[derive(Debug, Default)]
pub struct TaskBatchWrite {
    /// Task rows (one per task).
    pub tasks: Vec<TaskRow>,
    /// Applied events.
    pub events: Vec<AppliedEvent>,
    /// Change in the number of tasks per state.
    pub state_deltas: HashMap<&'static str, i64>,
}

/// Makes sure an offset row exists for every partition, so that batches can lock them.
pub async fn init_offsets(
    tx: &Transaction<'_>,
    topic: &str,
    partitions: i32,
) -> Result<(), StoreError> {
    let parts: Vec<i32> = (0..partitions).collect();
    tx.execute(
        "INSERT INTO projection_offsets (topic, partition, next_offset)
         SELECT $1, p, 0 FROM unnest($2::int[]) AS p
         ON CONFLICT DO NOTHING",
        &[&topic, &parts],
    )
    .await
    .map_err(ctx("initialise projection offsets"))?;
    Ok(())
}

/// Locks the topic's offset rows for this transaction and returns the next offset to
/// apply per partition. A concurrent projector batch waits here; a stale one then sees
/// offsets past its records and skips them.
pub async fn lock_offsets(
    tx: &Transaction<'_>,
    topic: &str,
    partitions: &[i32],
) -> Result<HashMap<i32, i64>, StoreError> {
    // The offsets commit atomically with the rows they produced, so losing the last
    // commits in a Postgres crash only means re-applying them from Kafka: the durability
    // of each commit is not needed, and waiting for its flush is wasted time.
    tx.batch_execute("SET LOCAL synchronous_commit = off")
        .await
        .map_err(ctx("set synchronous_commit"))?;
    let rows = tx
        .query(
            "SELECT partition, next_offset FROM projection_offsets
             WHERE topic = $1 AND partition = ANY($2) ORDER BY partition FOR UPDATE",
            &[&topic, &partitions],
        )
        .await
        .map_err(ctx("lock projection offsets"))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Current states of these tasks.
pub async fn load_tasks(
    tx: &Transaction<'_>,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, TaskState>, StoreError> {
    load_docs(
        tx,
        "SELECT id, doc FROM tasks WHERE id = ANY($1)",
        ids,
        "tasks.doc",
    )
    .await
}

/// Current states of these workers.
pub async fn load_workers(
    tx: &Transaction<'_>,
    ids: &[String],
) -> Result<HashMap<String, WorkerState>, StoreError> {
    load_docs(
        tx,
        "SELECT id, doc FROM workers WHERE id = ANY($1)",
        ids,
        "workers.doc",
    )
    .await
}

/// Current states of these services.
pub async fn load_services(
    tx: &Transaction<'_>,
    names: &[String],
) -> Result<HashMap<String, ServiceState>, StoreError> {
    load_docs(
        tx,
        "SELECT name, doc FROM services WHERE name = ANY($1)",
        names,
        "services.doc",
    )
    .await
}

/// The tokens of these names, for the fold.
pub async fn load_tokens(
    tx: &Transaction<'_>,
    names: &[String],
) -> Result<HashMap<String, TokenState>, StoreError> {
    load_docs(
        tx,
        "SELECT name, doc FROM tokens WHERE name = ANY($1)",
        names,
        "tokens.doc",
    )
    .await
}

/// The `(key, doc)` rows `sql` selects for `keys` (its `$1`), with each doc parsed.
async fn load_docs<K, T>(
    tx: &Transaction<'_>,
    sql: &str,
    keys: &[K],
    context: &'static str,
) -> Result<HashMap<K, T>, StoreError>
where
    K: Eq + std::hash::Hash + ToSql + Sync + for<'a> FromSql<'a>,
    T: serde::de::DeserializeOwned,
{
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = tx
        .query(sql, &[&keys])
        .await
        .map_err(ctx("load states for the fold"))?;
    rows.iter()
        .map(|r| {
            serde_json::from_value(r.get(1))
                .map(|doc| (r.get(0), doc))
                .map_err(|e| StoreError::Corrupt {
                    context,
                    message: e.to_string(),
                })
        })
        .collect()
}

/// `value` as a JSON document for column `context`.
fn to_doc(value: &impl serde::Serialize, context: &'static str) -> Result<Value, StoreError> {
    serde_json::to_value(value).map_err(|e| StoreError::Corrupt {
        context,
        message: e.to_string(),
    })
}

/// Upserts worker rows (one statement).
pub async fn write_workers(
    tx: &Transaction<'_>,
    workers: &[&WorkerState],
) -> Result<(), StoreError> {
    if workers.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = workers.iter().map(|w| w.id.as_str()).collect();
    let states: Vec<&str> = workers.iter().map(|w| w.state.as_str()).collect();
    let heartbeats: Vec<DateTime<Utc>> = workers.iter().map(|w| w.last_heartbeat_at).collect();
    let updated: Vec<DateTime<Utc>> = workers.iter().map(|w| w.updated_at).collect();
    let docs: Vec<Value> = workers
        .iter()
        .map(|w| to_doc(w, "workers.doc"))
        .collect::<Result<_, _>>()?;
    tx.execute(
        "INSERT INTO workers (id, state, last_heartbeat_at, updated_at, doc)
         SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[],
                              $5::json[])
         ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state,
             last_heartbeat_at = EXCLUDED.last_heartbeat_at,
             updated_at = EXCLUDED.updated_at, doc = EXCLUDED.doc",
        &[&ids, &states, &heartbeats, &updated, &docs],
    )
    .await
    .map_err(ctx("upsert workers"))?;
    Ok(())
}

/// Upserts service rows (one statement).
pub async fn write_services(
    tx: &Transaction<'_>,
    services: &[&ServiceState],
) -> Result<(), StoreError> {
    if services.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
    let lifecycles: Vec<&str> = services.iter().map(|s| s.lifecycle.as_str()).collect();
    let updated: Vec<DateTime<Utc>> = services.iter().map(|s| s.updated_at).collect();
    let docs: Vec<Value> = services
        .iter()
        .map(|s| to_doc(s, "services.doc"))
        .collect::<Result<_, _>>()?;
    tx.execute(
        "INSERT INTO services (name, lifecycle, updated_at, doc)
         SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::json[])
         ON CONFLICT (name) DO UPDATE SET lifecycle = EXCLUDED.lifecycle,
             updated_at = EXCLUDED.updated_at, doc = EXCLUDED.doc",
        &[&names, &lifecycles, &updated, &docs],
    )
    .await
    .map_err(ctx("upsert services"))?;
    Ok(())
}

/// Upserts folded tokens.
pub async fn write_tokens(tx: &Transaction<'_>, tokens: &[&TokenState]) -> Result<(), StoreError> {
    if tokens.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = tokens.iter().map(|t| t.name.as_str()).collect();
    let ids: Vec<Uuid> = tokens.iter().map(|t| t.token_id).collect();
    let roles: Vec<&str> = tokens.iter().map(|t| t.role.as_str()).collect();
    let revoked: Vec<bool> = tokens.iter().map(|t| t.revoked_at.is_some()).collect();
    let updated: Vec<DateTime<Utc>> = tokens
        .iter()
        .map(|t| t.revoked_at.unwrap_or(t.created_at))
        .collect();
    let docs: Vec<Value> = tokens
        .iter()
        .map(|t| to_doc(t, "tokens.doc"))
        .collect::<Result<_, _>>()?;
    tx.execute(
        "INSERT INTO tokens (name, token_id, role, revoked, updated_at, doc)
         SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::bool[],
                              $5::timestamptz[], $6::json[])
         ON CONFLICT (name) DO UPDATE SET token_id = EXCLUDED.token_id, role = EXCLUDED.role,
             revoked = EXCLUDED.revoked, updated_at = EXCLUDED.updated_at, doc = EXCLUDED.doc",
        &[&names, &ids, &roles, &revoked, &updated, &docs],
    )
    .await
    .map_err(ctx("upsert tokens"))?;
    Ok(())
}

/// Which of these `ce_id`s were already applied.
pub async fn applied_ce_ids(
    tx: &Transaction<'_>,
    ce_ids: &[String],
) -> Result<HashSet<String>, StoreError> {
    if ce_ids.is_empty() {
        return Ok(HashSet::new());
    }
    let rows = tx
        .query(
            "SELECT ce_id FROM task_events WHERE ce_id = ANY($1)",
            &[&ce_ids],
        )
        .await
        .map_err(ctx("look up applied ce_ids"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Writes the task projection's part of a batch.
pub async fn write_task_batch(
    tx: &Transaction<'_>,
    batch: &TaskBatchWrite,
) -> Result<(), StoreError> {
    let (new_tasks, existing): (Vec<&TaskRow>, Vec<&TaskRow>) =
        batch.tasks.iter().partition(|t| t.is_new);
    if !new_tasks.is_empty() {
        copy_tasks(tx, &new_tasks).await?;
    }
    if !existing.is_empty() {
        update_tasks(tx, &existing).await?;
    }
    if !batch.events.is_empty() {
        copy_events(tx, &batch.events).await?;
    }
    let deltas: Vec<(&str, i64)> = batch
        .state_deltas
        .iter()
        .filter(|(_, d)| **d != 0)
        .map(|(s, d)| (*s, *d))
        .collect();
    if !deltas.is_empty() {
        let states: Vec<&str> = deltas.iter().map(|(s, _)| *s).collect();
        let counts: Vec<i64> = deltas.iter().map(|(_, d)| *d).collect();
        tx.execute(
            "INSERT INTO task_state_counts (state, count)
             SELECT * FROM unnest($1::text[], $2::bigint[])
             ON CONFLICT (state) DO UPDATE SET count = task_state_counts.count + EXCLUDED.count",
            &[&states, &counts],
        )
        .await
        .map_err(ctx("update state counts"))?;
    }
    Ok(())
}

/// `text` as Postgres can store it in `text` or `jsonb`: every NUL (U+0000), which it
/// refuses, replaced by U+FFFD.
pub fn storable_text(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// `value` with [`storable_text`] applied to every string and object key in it.
pub fn storable_json(value: &Value) -> Value {
    match value {
        Value::String(s) => Value::String(storable_text(s).into_owned()),
        Value::Array(items) => Value::Array(items.iter().map(storable_json).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (storable_text(k).into_owned(), storable_json(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Writes what every projection's batch ends with: its rejections, the next offset of
/// every partition it read, and a `NOTIFY` on `channel`, if given (delivered at commit).
pub async fn finish_batch(
    tx: &Transaction<'_>,
    topic: &str,
    rejected: &[RejectedRecord],
    next_offsets: &HashMap<i32, i64>,
    channel: Option<&str>,
) -> Result<(), StoreError> {
    for r in rejected {
        // A record is often refused *because* of what Postgres cannot hold (a NUL):
        // its row here must be storable whatever the record holds.
        let (ce_id, ce_type, subject) = (
            r.ce_id.as_deref().map(storable_text),
            r.ce_type.as_deref().map(storable_text),
            r.subject.as_deref().map(storable_text),
        );
        let message = storable_text(&r.message);
        let headers = storable_json(&r.headers);
        tx.execute(
            "INSERT INTO rejected_events (topic, partition, \"offset\", ce_id, ce_type, subject,
                                          reason, message, record_key, headers, payload)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            &[
                &r.topic,
                &r.partition,
                &r.offset,
                &ce_id,
                &ce_type,
                &subject,
                &r.reason,
                &message,
                &r.key,
                &headers,
                &r.payload,
            ],
        )
        .await
        .map_err(ctx("insert rejected event"))?;
    }
    if !next_offsets.is_empty() {
        let partitions: Vec<i32> = next_offsets.keys().copied().collect();
        let offsets: Vec<i64> = partitions.iter().map(|p| next_offsets[p]).collect();
        tx.execute(
            "INSERT INTO projection_offsets (topic, partition, next_offset, updated_at)
             SELECT $1, p, o, now() FROM unnest($2::int[], $3::bigint[]) AS t(p, o)
             ON CONFLICT (topic, partition) DO UPDATE
                 SET next_offset = EXCLUDED.next_offset, updated_at = now()",
            &[&topic, &partitions, &offsets],
        )
        .await
        .map_err(ctx("store projection offsets"))?;
    }
    if let Some(channel) = channel {
        let payload = super::progress::notify_payload(topic, next_offsets);
        tx.execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
            .await
            .map_err(ctx("notify"))?;
    }
    Ok(())
}

const TASK_COLUMNS: &str = "id, state, seq, type, name, priority, labels, idempotency_key, \
                            submitted_at, updated_at, event_partition, last_offset, doc";

/// The column values of a task row, in [`TASK_COLUMNS`] order.
struct TaskValues<'a> {
    seq: i64,
    priority: i32,
    labels: Json<&'a std::collections::BTreeMap<String, String>>,
    /// The folded state, serialised as it is (field order, no intermediate `Value`):
    /// `replay verify` compares this text with the fold's.
    doc: Json<&'a TaskState>,
    row: &'a TaskRow,
}

impl<'a> TaskValues<'a> {
    fn new(row: &'a TaskRow) -> Result<TaskValues<'a>, StoreError> {
        let t = &row.state;
        Ok(TaskValues {
            seq: t.seq as i64,
            priority: t.spec.priority() as i32,
            labels: Json(&t.spec.labels),
            doc: Json(t),
            row,
        })
    }
}

/// Inserts tasks that have no row yet, with binary COPY (the fastest path into Postgres).
async fn copy_tasks(tx: &Transaction<'_>, rows: &[&TaskRow]) -> Result<(), StoreError> {
    let sink = tx
        .copy_in::<_, Bytes>(&format!(
            "COPY tasks ({TASK_COLUMNS}) FROM STDIN (FORMAT binary)"
        ))
        .await
        .map_err(ctx("copy tasks"))?;
    let types = [
        Type::UUID,
        Type::TEXT,
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::INT4,
        Type::JSONB,
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::INT4,
        Type::INT8,
        Type::JSON,
    ];
    let writer = BinaryCopyInWriter::new(sink, &types);
    let mut writer = std::pin::pin!(writer);
    for row in rows {
        let v = TaskValues::new(row)?;
        let t = &row.state;
        let values: [&(dyn ToSql + Sync); 13] = [
            &t.id,
            &t.state.as_str(),
            &v.seq,
            &t.spec.task_type(),
            &t.spec.name,
            &v.priority,
            &v.labels,
            &t.spec.idempotency_key,
            &t.submitted_at,
            &t.updated_at,
            &v.row.partition,
            &v.row.last_offset,
            &v.doc,
        ];
        writer
            .as_mut()
            .write(&values)
            .await
            .map_err(ctx("copy tasks"))?;
    }
    writer.finish().await.map_err(ctx("copy tasks"))?;
    Ok(())
}

/// Updates tasks that already have a row.
async fn update_tasks(tx: &Transaction<'_>, rows: &[&TaskRow]) -> Result<(), StoreError> {
    let values: Vec<TaskValues<'_>> = rows
        .iter()
        .map(|r| TaskValues::new(r))
        .collect::<Result<_, _>>()?;
    let ids: Vec<Uuid> = rows.iter().map(|r| r.state.id).collect();
    let states: Vec<&str> = rows.iter().map(|r| r.state.state.as_str()).collect();
    let seqs: Vec<i64> = values.iter().map(|v| v.seq).collect();
    let updated: Vec<DateTime<Utc>> = rows.iter().map(|r| r.state.updated_at).collect();
    let partitions: Vec<i32> = rows.iter().map(|r| r.partition).collect();
    let offsets: Vec<i64> = rows.iter().map(|r| r.last_offset).collect();
    let docs: Vec<&Json<&TaskState>> = values.iter().map(|v| &v.doc).collect();
    tx.execute(
        "UPDATE tasks SET state = u.state, seq = u.seq, updated_at = u.updated_at,
                          event_partition = u.partition, last_offset = u.last_offset, doc = u.doc
         FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::timestamptz[], $5::int[],
                     $6::bigint[], $7::json[])
              AS u(id, state, seq, updated_at, partition, last_offset, doc)
         WHERE tasks.id = u.id",
        &[&ids, &states, &seqs, &updated, &partitions, &offsets, &docs],
    )
    .await
    .map_err(ctx("update tasks"))?;
    Ok(())
}

/// Appends applied events to the task histories, with binary COPY.
async fn copy_events(tx: &Transaction<'_>, events: &[AppliedEvent]) -> Result<(), StoreError> {
    let sink = tx
        .copy_in::<_, Bytes>(
            "COPY task_events (ce_id, task_id, seq, type, time, source, partition, \"offset\", data,
                               principal, trace_id, span_id)
             FROM STDIN (FORMAT binary)",
        )
        .await
        .map_err(ctx("copy task events"))?;
    let types = [
        Type::TEXT,
        Type::UUID,
        Type::INT8,
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::TEXT,
        Type::INT4,
        Type::INT8,
        Type::JSON,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
    ];
    let writer = BinaryCopyInWriter::new(sink, &types);
    let mut writer = std::pin::pin!(writer);
    for e in events {
        let data = RawJson(&e.data);
        let trace_id = e.traceparent.map(|t| t.trace_id_hex());
        let span_id = e.traceparent.map(|t| t.span_id_hex());
        let values: [&(dyn ToSql + Sync); 12] = [
            &e.ce_id,
            &e.task_id,
            &e.seq,
            &e.event_type,
            &e.time,
            &e.source,
            &e.partition,
            &e.offset,
            &data,
            &e.principal,
            &trace_id,
            &span_id,
        ];
        writer
            .as_mut()
            .write(&values)
            .await
            .map_err(ctx("copy task events"))?;
    }
    writer.finish().await.map_err(ctx("copy task events"))?;
    Ok(())
}
