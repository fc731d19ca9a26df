//! The tamper-evident export, read from the log and checked against it; the format and
//! the offline check are `tasklog-core`'s ([`crate::events::audit`]).

use std::collections::HashMap;
use std::io::Write;

use chrono::{DateTime, Utc};
use rdkafka::message::{Headers, Message};
use uuid::Uuid;

use super::ReplayError;
use crate::events::audit::{ExportWriter, Finding, RecordLine, record_bytes};
use crate::kafka::{self, KafkaIoError};

/// Which records of the events topic an export holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    /// Every record.
    All,
    /// The records keyed by one task (its partition, scanned).
    Task(Uuid),
    /// The records whose timestamp is in `[since, until)`.
    Between(Option<DateTime<Utc>>, Option<DateTime<Utc>>),
}

impl Selection {
    /// The selection as the manifest records it.
    fn describe(&self) -> serde_json::Value {
        match self {
            Selection::All => serde_json::json!({}),
            Selection::Task(id) => serde_json::json!({"task": id}),
            Selection::Between(since, until) => serde_json::json!({
                "since": since.map(|t| t.to_rfc3339()),
                "until": until.map(|t| t.to_rfc3339()),
            }),
        }
    }

    fn keeps(&self, key: Option<&[u8]>, timestamp_ms: Option<i64>) -> bool {
        match self {
            Selection::All => true,
            Selection::Task(id) => key == Some(id.to_string().as_bytes()),
            Selection::Between(since, until) => timestamp_ms.is_some_and(|t| {
                since.is_none_or(|s| t >= s.timestamp_millis())
                    && until.is_none_or(|u| t < u.timestamp_millis())
            }),
        }
    }
}

/// Writes the export of `topic` for `selection` to `out`, up to the end the log has
/// now; returns how many records it holds.
pub async fn export(
    brokers: &str,
    topic: &str,
    selection: Selection,
    out: impl Write + Send + 'static,
) -> Result<u64, ReplayError> {
    let ends = kafka::watermarks(brokers, topic).await?;
    let only = match &selection {
        Selection::Task(id) => Some(kafka::partition_for_key(
            id.to_string().as_bytes(),
            ends.len() as i32,
        )),
        _ => None,
    };
    let ranges: HashMap<i32, (i64, i64)> = ends
        .iter()
        .enumerate()
        .map(|(p, (low, high))| (p as i32, (*low, *high)))
        .filter(|(p, _)| only.is_none_or(|o| o == *p))
        .collect();
    let (brokers, topic) = (brokers.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || -> Result<u64, ReplayError> {
        let mut out = std::io::BufWriter::new(out);
        let mut writer = ExportWriter::new();
        let mut failed: Option<std::io::Error> = None;
        let mut kept = 0u64;
        kafka::scan(&brokers, &topic, &ranges, |m| {
            let timestamp = m.timestamp().to_millis();
            if failed.is_some() || !selection.keeps(m.key(), timestamp) {
                return;
            }
            let headers: Vec<(&str, Option<&[u8]>)> = m
                .headers()
                .map(|h| h.iter().map(|h| (h.key, h.value)).collect())
                .unwrap_or_default();
            let line = writer.record(
                &topic,
                m.partition(),
                m.offset(),
                timestamp,
                m.key(),
                &headers,
                m.payload(),
            );
            kept += 1;
            if let Err(e) = out.write_all(line.as_bytes()) {
                failed = Some(e);
            }
        })?;
        let manifest = writer.manifest(selection.describe(), Utc::now().to_rfc3339());
        if let Some(e) = failed {
            return Err(ReplayError::Io(e));
        }
        out.write_all(manifest.as_bytes())?;
        out.flush()?;
        Ok(kept)
    })
    .await
    .map_err(|e| KafkaIoError::Interrupted(e.to_string()))?
}

/// Checks every record line against the record at its coordinates on the log: each one
/// whose key, headers or value differ, or that the log does not have, is a finding.
pub async fn against_log(
    brokers: &str,
    records: Vec<RecordLine>,
) -> Result<Vec<Finding>, ReplayError> {
    let mut by_topic: HashMap<String, Vec<RecordLine>> = HashMap::new();
    for r in records {
        by_topic.entry(r.topic.clone()).or_default().push(r);
    }
    let mut findings = Vec::new();
    for (topic, lines) in by_topic {
        let ends = kafka::watermarks(brokers, &topic).await?;
        let mut ranges: HashMap<i32, (i64, i64)> = HashMap::new();
        for r in &lines {
            let high = ends.get(r.partition as usize).map_or(0, |(_, h)| *h);
            let range = ranges
                .entry(r.partition)
                .or_insert((r.offset, r.offset + 1));
            range.0 = range.0.min(r.offset);
            range.1 = range.1.max(r.offset + 1).min(high);
        }
        let wanted: HashMap<(i32, i64), u64> = lines
            .iter()
            .map(|r| ((r.partition, r.offset), r.line))
            .collect();
        let (brokers, name) = (brokers.to_string(), topic.clone());
        let on_log = tokio::task::spawn_blocking(move || {
            let mut on_log: HashMap<(i32, i64), crate::events::audit::RecordBytes> = HashMap::new();
            kafka::scan(&brokers, &name, &ranges, |m| {
                if wanted.contains_key(&(m.partition(), m.offset())) {
                    let headers = m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                                .collect()
                        })
                        .unwrap_or_default();
                    on_log.insert(
                        (m.partition(), m.offset()),
                        (
                            m.key().map(<[u8]>::to_vec),
                            headers,
                            m.payload().map(<[u8]>::to_vec),
                        ),
                    );
                }
            })
            .map(|_| on_log)
        })
        .await
        .map_err(|e| KafkaIoError::Interrupted(e.to_string()))??;
        for r in &lines {
            let at = Some(format!("{} {}:{}", r.topic, r.partition, r.offset));
            let problem = match (record_bytes(r), on_log.get(&(r.partition, r.offset))) {
                (Err(e), _) => Some(e),
                (_, None) => Some("the log has no record there".to_string()),
                (Ok(exported), Some(log)) if &exported != log => Some(
                    ["key", "headers", "value"]
                        .iter()
                        .zip([
                            exported.0 != log.0,
                            exported.1 != log.1,
                            exported.2 != log.2,
                        ])
                        .filter(|(_, differs)| *differs)
                        .map(|(what, _)| *what)
                        .collect::<Vec<_>>()
                        .join(", ")
                        + " differ from the log's record",
                ),
                _ => None,
            };
            if let Some(problem) = problem {
                findings.push(Finding {
                    line: r.line,
                    at,
                    problem,
                });
            }
        }
    }
    findings.sort_by_key(|f| f.line);
    Ok(findings)
}
