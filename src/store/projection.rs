//! The projector's writes: one batch, one transaction.
//!
//! The transaction locks the topic's offset rows, loads what the fold needs, and writes
//! task rows, the event index, rejections, state counts and the next offsets together,
//! then notifies waiting readers. Either all of it commits or none of it does.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::Transaction;
use uuid::Uuid;

use super::{PROJECTION_CHANNEL, StoreError, ctx};
use crate::events::TaskState;

/// A task row to upsert: its final state in this batch and where its last event sits.
#[derive(Debug, Clone)]
pub struct TaskRow {
    /// Folded state.
    pub state: TaskState,
    /// Partition of its events.
    pub partition: i32,
    /// Offset of its last applied event.
    pub last_offset: i64,
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
    /// Kafka partition.
    pub partition: i32,
    /// Kafka offset.
    pub offset: i64,
    /// The event data.
    pub data: Value,
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

/// Everything one batch writes.
#[derive(Debug, Default)]
pub struct BatchWrite {
    /// Task rows (one per task).
    pub tasks: Vec<TaskRow>,
    /// Applied events.
    pub events: Vec<AppliedEvent>,
    /// Rejected records.
    pub rejected: Vec<RejectedRecord>,
    /// Next offset per partition after this batch.
    pub next_offsets: HashMap<i32, i64>,
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
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = tx
        .query("SELECT id, doc FROM tasks WHERE id = ANY($1)", &[&ids])
        .await
        .map_err(ctx("load tasks for the fold"))?;
    rows.iter()
        .map(|r| {
            let doc: Value = r.get(1);
            serde_json::from_value(doc)
                .map(|t| (r.get(0), t))
                .map_err(|e| StoreError::Corrupt {
                    context: "tasks.doc",
                    message: e.to_string(),
                })
        })
        .collect()
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

/// Writes the batch and notifies readers (delivered at commit).
pub async fn write_batch(
    tx: &Transaction<'_>,
    topic: &str,
    batch: &BatchWrite,
) -> Result<(), StoreError> {
    if !batch.tasks.is_empty() {
        let mut ids = Vec::with_capacity(batch.tasks.len());
        let mut states = Vec::with_capacity(batch.tasks.len());
        let mut seqs = Vec::with_capacity(batch.tasks.len());
        let mut types = Vec::with_capacity(batch.tasks.len());
        let mut names = Vec::with_capacity(batch.tasks.len());
        let mut priorities = Vec::with_capacity(batch.tasks.len());
        let mut labels = Vec::with_capacity(batch.tasks.len());
        let mut keys = Vec::with_capacity(batch.tasks.len());
        let mut submitted = Vec::with_capacity(batch.tasks.len());
        let mut updated = Vec::with_capacity(batch.tasks.len());
        let mut partitions = Vec::with_capacity(batch.tasks.len());
        let mut offsets = Vec::with_capacity(batch.tasks.len());
        let mut docs = Vec::with_capacity(batch.tasks.len());
        for row in &batch.tasks {
            let t = &row.state;
            ids.push(t.id);
            states.push(t.state.as_str());
            seqs.push(t.seq as i64);
            types.push(t.spec.task_type());
            names.push(t.spec.name.as_deref());
            priorities.push(t.spec.priority() as i32);
            labels.push(serde_json::to_value(&t.spec.labels).unwrap_or_default());
            keys.push(t.spec.idempotency_key.as_deref());
            submitted.push(t.submitted_at);
            updated.push(t.updated_at);
            partitions.push(row.partition);
            offsets.push(row.last_offset);
            docs.push(serde_json::to_value(t).map_err(|e| StoreError::Corrupt {
                context: "serialise task",
                message: e.to_string(),
            })?);
        }
        tx.execute(
            "INSERT INTO tasks (id, state, seq, type, name, priority, labels, idempotency_key,
                                submitted_at, updated_at, event_partition, last_offset, doc)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::text[],
                                  $6::int[], $7::jsonb[], $8::text[], $9::timestamptz[],
                                  $10::timestamptz[], $11::int[], $12::bigint[], $13::jsonb[])
             ON CONFLICT (id) DO UPDATE SET
                 state = EXCLUDED.state, seq = EXCLUDED.seq, updated_at = EXCLUDED.updated_at,
                 event_partition = EXCLUDED.event_partition, last_offset = EXCLUDED.last_offset,
                 doc = EXCLUDED.doc",
            &[
                &ids,
                &states,
                &seqs,
                &types,
                &names,
                &priorities,
                &labels,
                &keys,
                &submitted,
                &updated,
                &partitions,
                &offsets,
                &docs,
            ],
        )
        .await
        .map_err(ctx("upsert tasks"))?;
    }

    if !batch.events.is_empty() {
        let e = &batch.events;
        let ce_ids: Vec<&str> = e.iter().map(|x| x.ce_id.as_str()).collect();
        let task_ids: Vec<Uuid> = e.iter().map(|x| x.task_id).collect();
        let seqs: Vec<i64> = e.iter().map(|x| x.seq).collect();
        let types: Vec<&str> = e.iter().map(|x| x.event_type).collect();
        let times: Vec<DateTime<Utc>> = e.iter().map(|x| x.time).collect();
        let sources: Vec<&str> = e.iter().map(|x| x.source.as_str()).collect();
        let partitions: Vec<i32> = e.iter().map(|x| x.partition).collect();
        let offsets: Vec<i64> = e.iter().map(|x| x.offset).collect();
        let data: Vec<&Value> = e.iter().map(|x| &x.data).collect();
        tx.execute(
            "INSERT INTO task_events (ce_id, task_id, seq, type, time, source, partition, \"offset\", data)
             SELECT * FROM unnest($1::text[], $2::uuid[], $3::bigint[], $4::text[],
                                  $5::timestamptz[], $6::text[], $7::int[], $8::bigint[], $9::jsonb[])",
            &[&ce_ids, &task_ids, &seqs, &types, &times, &sources, &partitions, &offsets, &data],
        )
        .await
        .map_err(ctx("insert task events"))?;
    }

    for r in &batch.rejected {
        tx.execute(
            "INSERT INTO rejected_events (topic, partition, \"offset\", ce_id, ce_type, subject,
                                          reason, message, record_key, headers, payload)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            &[
                &r.topic,
                &r.partition,
                &r.offset,
                &r.ce_id,
                &r.ce_type,
                &r.subject,
                &r.reason,
                &r.message,
                &r.key,
                &r.headers,
                &r.payload,
            ],
        )
        .await
        .map_err(ctx("insert rejected event"))?;
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

    if !batch.next_offsets.is_empty() {
        let partitions: Vec<i32> = batch.next_offsets.keys().copied().collect();
        let offsets: Vec<i64> = partitions.iter().map(|p| batch.next_offsets[p]).collect();
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

    tx.execute(&format!("NOTIFY {PROJECTION_CHANNEL}"), &[])
        .await
        .map_err(ctx("notify"))?;
    Ok(())
}
