//! One task's complete history, read from Kafka — not from Postgres: every record of
//! it with its coordinates, the fold's verdict on each (the same pure fold as the
//! projector), its dead letters, its attempts and the extent of its logs.
//!
//! The projection's index (when Postgres answers) only says where to start reading;
//! the records themselves are always read and folded here. With Postgres down, or
//! asked to, the task's partition is scanned from its start.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use rdkafka::message::{Headers, Message};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::events::fold::TaskFold;
use crate::events::{Event, TaskState};
use crate::kafka::{self, KafkaIoError, Topics, dlq_header};
use crate::store::{LogIndexRow, Store};

/// How long the projection's index may take to answer before the partition is scanned.
const INDEX_WAIT: Duration = Duration::from_secs(2);

/// One record of the task, as the log has it, and the fold's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct AuditedRecord {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// `ce_id` header.
    pub ce_id: Option<String>,
    /// `ce_source` header.
    pub source: Option<String>,
    /// `ce_type` header.
    pub r#type: Option<String>,
    /// `ce_time` header.
    pub time: Option<String>,
    /// The data (the value as JSON; as text when it is not JSON).
    pub data: Value,
    /// `applied`, or `rejected`.
    pub verdict: &'static str,
    /// Why it was rejected.
    pub reason: Option<String>,
    /// The rejection's detail.
    pub message: Option<String>,
    /// The state after it (applied records).
    pub state: Option<String>,
}

/// A dead letter of one of the task's records.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// Where the dead letter is on the DLQ topic.
    pub dlq_partition: i32,
    /// Where the dead letter is on the DLQ topic.
    pub dlq_offset: i64,
    /// The source record's offset on the events topic.
    pub source_offset: Option<i64>,
    /// Reason header.
    pub reason: Option<String>,
    /// Message header.
    pub message: Option<String>,
}

/// A task's history as the log tells it.
#[derive(Debug, Clone, Serialize)]
pub struct TaskAudit {
    /// The task.
    pub task_id: Uuid,
    /// Its partition of the events topic.
    pub partition: i32,
    /// How the records were found: `index` (offsets from the projection) or `scan`.
    pub found_by: &'static str,
    /// The partition's end when read.
    pub high_watermark: i64,
    /// Every record keyed by the task, in log order.
    pub records: Vec<AuditedRecord>,
    /// The state the records fold to (`None`: nothing applied).
    pub state: Option<TaskState>,
    /// Dead letters of its records.
    pub dead_letters: Vec<DeadLetter>,
    /// Its logs' extent per attempt (`None`: the log index could not be read).
    pub logs: Option<Vec<LogIndexRow>>,
}

/// Reads task `id`'s history from the log. `store` (when given and answering) only
/// narrows where to read; `scan` reads the whole partition regardless.
pub async fn task(
    brokers: &str,
    topics: &Topics,
    store: Option<&Store>,
    id: Uuid,
    scan: bool,
) -> Result<TaskAudit, KafkaIoError> {
    let ends = kafka::watermarks(brokers, &topics.events).await?;
    let partition = kafka::partition_for_key(id.to_string().as_bytes(), ends.len() as i32);
    let (low, high) = ends.get(partition as usize).copied().unwrap_or((0, 0));
    let mut start = low;
    let mut found_by = "scan";
    let mut logs = None;
    if let (Some(store), false) = (store, scan) {
        let index = tokio::time::timeout(INDEX_WAIT, async {
            let first = store.first_offset_of(&topics.events, id).await?;
            let logs = store.log_index(id).await?;
            Ok::<_, crate::store::StoreError>((first, logs))
        })
        .await;
        if let Ok(Ok((first, index))) = index {
            if let Some(first) = first {
                start = first.max(low);
                found_by = "index";
            }
            logs = Some(index);
        }
    }
    let key = id.to_string();
    let (topic, brokers_owned) = (topics.events.clone(), brokers.to_string());
    let ranges = [(partition, (start, high))].into_iter().collect();
    let records = tokio::task::spawn_blocking(move || {
        let mut fold = TaskFold::new();
        let mut out = Vec::new();
        kafka::scan(&brokers_owned, &topic, &ranges, |m| {
            if m.key() != Some(key.as_bytes()) {
                return;
            }
            out.push(audit_record(&topic, m, &mut fold, id));
        })
        .map(|_| (out, fold.states.remove(&id)))
    })
    .await
    .map_err(|e| KafkaIoError::Interrupted(e.to_string()))??;
    let (records, state) = records;
    let offsets: HashSet<i64> = records.iter().map(|r| r.offset).collect();
    let dead_letters =
        dead_letters(brokers, &topics.dlq, &topics.events, partition, offsets).await?;
    Ok(TaskAudit {
        task_id: id,
        partition,
        found_by,
        high_watermark: high,
        records,
        state,
        dead_letters,
        logs,
    })
}

fn audit_record<M: Message>(topic: &str, m: &M, fold: &mut TaskFold, id: Uuid) -> AuditedRecord {
    let raw = kafka::raw_record(m);
    let header = |name: &str| raw.header(name).map(str::to_string);
    let data = m
        .payload()
        .map(|p| {
            serde_json::from_slice(p)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(p).into_owned()))
        })
        .unwrap_or(Value::Null);
    let outcome = Event::decode(&raw).and_then(|event| fold.apply(&event));
    let (verdict, reason, message, state) = match outcome {
        Ok(_) => (
            "applied",
            None,
            None,
            fold.states.get(&id).map(|s| s.state.as_str().to_string()),
        ),
        Err(r) => (
            "rejected",
            Some(r.code().to_string()),
            Some(r.to_string()),
            None,
        ),
    };
    AuditedRecord {
        topic: topic.to_string(),
        partition: m.partition(),
        offset: m.offset(),
        ce_id: header("ce_id"),
        source: header("ce_source"),
        r#type: header("ce_type"),
        time: header("ce_time"),
        data,
        verdict,
        reason,
        message,
        state,
    }
}

/// The dead letters whose source is one of `offsets` of `events` partition `partition`.
async fn dead_letters(
    brokers: &str,
    dlq: &str,
    events: &str,
    partition: i32,
    offsets: HashSet<i64>,
) -> Result<Vec<DeadLetter>, KafkaIoError> {
    let ranges = kafka::watermarks(brokers, dlq)
        .await?
        .into_iter()
        .enumerate()
        .map(|(p, range)| (p as i32, range))
        .collect();
    let (brokers, dlq, events) = (brokers.to_string(), dlq.to_string(), events.to_string());
    tokio::task::spawn_blocking(move || {
        let mut out = BTreeMap::new();
        kafka::scan(&brokers, &dlq, &ranges, |m| {
            let Some(headers) = m.headers() else { return };
            let get = |name: &str| {
                headers
                    .iter()
                    .filter(|h| h.key == name)
                    .last()
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            };
            let source_offset = get(dlq_header::OFFSET).and_then(|o| o.parse().ok());
            let ours = get(dlq_header::TOPIC).as_deref() == Some(events.as_str())
                && get(dlq_header::PARTITION).and_then(|p| p.parse().ok()) == Some(partition)
                && source_offset.is_some_and(|o| offsets.contains(&o));
            if ours {
                out.insert(
                    (m.partition(), m.offset()),
                    DeadLetter {
                        dlq_partition: m.partition(),
                        dlq_offset: m.offset(),
                        source_offset,
                        reason: get(dlq_header::REASON),
                        message: get(dlq_header::MESSAGE),
                    },
                );
            }
        })
        .map(|_| out.into_values().collect())
    })
    .await
    .map_err(|e| KafkaIoError::Interrupted(e.to_string()))?
}
