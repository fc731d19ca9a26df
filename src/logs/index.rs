//! The log index projection: per task attempt, where its lines are — exactly once, with
//! the offsets in the same transaction, like the task projection.

use std::collections::HashMap;

use rdkafka::message::{Message, OwnedMessage};
use tokio_postgres::Transaction;
use uuid::Uuid;

use super::{CHECKPOINT_EVERY, InvalidLogRecord, LogMeta, decode_meta};
use crate::metrics::metrics;
use crate::projector::{Projection, Record, Refusal};
use crate::store::{LOG_INDEX_CHANNEL, StoreError, ctx};

/// Default consumer group of the log indexer.
pub const DEFAULT_GROUP: &str = "tasklog-log-indexer";

/// Indexes `tasklog.logs` into `log_index` and `log_checkpoints`.
pub struct LogIndexProjection;

#[derive(Debug, Default)]
struct Span {
    partition: i32,
    first: i64,
    last: i64,
    lines: i64,
    bytes: i64,
    last_line: i64,
}

impl Projection for LogIndexProjection {
    type Decoded = Result<LogMeta, InvalidLogRecord>;

    fn decode(message: &OwnedMessage) -> Self::Decoded {
        let record = crate::projector::raw_record(message);
        decode_meta(record.key, &record.headers)
    }

    fn channel(&self) -> &'static str {
        LOG_INDEX_CHANNEL
    }

    async fn apply(
        &self,
        tx: &Transaction<'_>,
        records: &[&Record<Self::Decoded>],
    ) -> Result<Vec<Refusal>, StoreError> {
        let mut spans: HashMap<(Uuid, i32), Span> = HashMap::new();
        let mut checkpoints: Vec<(Uuid, i32, i64, i64)> = Vec::new();
        let mut refusals = Vec::new();
        for (index, record) in records.iter().enumerate() {
            let meta = match &record.decoded {
                Ok(m) => m,
                Err(e) => {
                    refusals.push(Refusal {
                        index,
                        reason: "invalid_log_record",
                        message: e.to_string(),
                    });
                    continue;
                }
            };
            let (partition, offset) = (record.message.partition(), record.message.offset());
            let span = spans.entry((meta.task_id, meta.attempt)).or_insert(Span {
                partition,
                first: offset,
                last: offset,
                ..Span::default()
            });
            span.first = span.first.min(offset);
            span.last = span.last.max(offset);
            if meta.part.unwrap_or(0) == 0 {
                span.lines += 1;
                if (meta.line - 1) % CHECKPOINT_EVERY == 0 {
                    checkpoints.push((meta.task_id, meta.attempt, meta.line, offset));
                }
            }
            span.bytes += record.message.payload().map(<[u8]>::len).unwrap_or(0) as i64;
            span.last_line = span.last_line.max(meta.line);
        }
        if !spans.is_empty() {
            let mut ids = Vec::with_capacity(spans.len());
            let mut attempts = Vec::with_capacity(spans.len());
            let mut partitions = Vec::with_capacity(spans.len());
            let mut firsts = Vec::with_capacity(spans.len());
            let mut lasts = Vec::with_capacity(spans.len());
            let mut lines = Vec::with_capacity(spans.len());
            let mut bytes = Vec::with_capacity(spans.len());
            let mut last_lines = Vec::with_capacity(spans.len());
            for ((id, attempt), s) in &spans {
                ids.push(*id);
                attempts.push(*attempt);
                partitions.push(s.partition);
                firsts.push(s.first);
                lasts.push(s.last);
                lines.push(s.lines);
                bytes.push(s.bytes);
                last_lines.push(s.last_line);
            }
            tx.execute(
                "INSERT INTO log_index (task_id, attempt, partition, first_offset, last_offset, lines, bytes, last_line)
                 SELECT * FROM unnest($1::uuid[], $2::int[], $3::int[], $4::bigint[], $5::bigint[],
                                      $6::bigint[], $7::bigint[], $8::bigint[])
                 ON CONFLICT (task_id, attempt) DO UPDATE SET
                     first_offset = least(log_index.first_offset, EXCLUDED.first_offset),
                     last_offset = greatest(log_index.last_offset, EXCLUDED.last_offset),
                     lines = log_index.lines + EXCLUDED.lines,
                     bytes = log_index.bytes + EXCLUDED.bytes,
                     last_line = greatest(log_index.last_line, EXCLUDED.last_line),
                     updated_at = now()",
                &[&ids, &attempts, &partitions, &firsts, &lasts, &lines, &bytes, &last_lines],
            )
            .await
            .map_err(ctx("upsert log index"))?;
        }
        if !checkpoints.is_empty() {
            let ids: Vec<Uuid> = checkpoints.iter().map(|c| c.0).collect();
            let attempts: Vec<i32> = checkpoints.iter().map(|c| c.1).collect();
            let lines: Vec<i64> = checkpoints.iter().map(|c| c.2).collect();
            let offsets: Vec<i64> = checkpoints.iter().map(|c| c.3).collect();
            tx.execute(
                "INSERT INTO log_checkpoints (task_id, attempt, line, \"offset\")
                 SELECT * FROM unnest($1::uuid[], $2::int[], $3::bigint[], $4::bigint[])
                 ON CONFLICT DO NOTHING",
                &[&ids, &attempts, &lines, &offsets],
            )
            .await
            .map_err(ctx("insert log checkpoints"))?;
        }
        metrics()
            .log_lines_indexed
            .inc_by((records.len() - refusals.len()) as u64);
        Ok(refusals)
    }
}
