//! Replay: fold the log from offset 0 in memory, with the same pure folds as the
//! projector (`tasklog-core`), and compare the result with the Postgres projection.
//!
//! `tasklog replay verify` reads the projection in one repeatable-read snapshot together
//! with the offsets it was built up to, then reads every topic up to exactly those
//! offsets, so that a projector working meanwhile cannot cause a false difference; how
//! far the projection is behind the log is reported beside, not as a difference.

pub mod export;
pub mod verify;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::message::Message;

use crate::kafka::{self, KafkaIoError, Topics};
use crate::metrics::metrics;
use crate::store::snapshot::{Coordinates, ProjectionSnapshot};
use crate::store::{Store, StoreError};
pub use verify::{Difference, Replayed, STORAGE_REJECTED, compare};

/// Why a replay could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Postgres could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Kafka could not be read.
    #[error(transparent)]
    Kafka(#[from] KafkaIoError),
    /// A file could not be written or read.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The log no longer starts at offset 0: what was deleted cannot be replayed.
    #[error(
        "{topic} partition {partition} starts at offset {low}: records before it were deleted \
         (retention), so the log cannot be replayed from 0"
    )]
    Truncated {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Its first offset.
        low: i64,
    },
}

/// What `replay verify` found.
#[derive(Debug)]
pub struct VerifyReport {
    /// Records folded, all topics.
    pub records: u64,
    /// How long reading and folding took.
    pub elapsed: Duration,
    /// Every difference, in a stable order.
    pub differences: Vec<Difference>,
    /// Records the projection has not reached yet, per topic and partition (not
    /// differences: the snapshot is compared at the offsets it was built to).
    pub behind: Vec<(String, i32, i64)>,
    /// Records the projection lists as refused by Postgres (`storage_rejected`): taken
    /// as given, listed for the reader.
    pub storage_rejected: Vec<Coordinates>,
}

/// The topics replay folds, in the order it folds them.
fn topics_of(topics: &Topics) -> [(&str, Kind); 3] {
    [
        (topics.events.as_str(), Kind::Tasks),
        (topics.workers.as_str(), Kind::Workers),
        (topics.services.as_str(), Kind::Services),
    ]
}

#[derive(Clone, Copy)]
enum Kind {
    Tasks,
    Workers,
    Services,
}

/// How many records a verification will fold (for a progress bar), from the snapshot's
/// offsets.
pub fn planned(snapshot: &ProjectionSnapshot, topics: &Topics) -> u64 {
    topics_of(topics)
        .iter()
        .filter_map(|(t, _)| snapshot.offsets.get(*t))
        .flat_map(|p| p.values())
        .map(|n| *n as u64)
        .sum()
}

/// Folds `topics` from offset 0 up to the offsets of `snapshot` and compares the result
/// with it. `progress` is called with the records folded so far, now and then.
pub async fn verify(
    brokers: &str,
    topics: &Topics,
    snapshot: &ProjectionSnapshot,
    progress: impl Fn(u64) + Send + Sync + Clone + 'static,
) -> Result<VerifyReport, ReplayError> {
    let started = Instant::now();
    let mut replayed = Replayed::new();
    let mut behind = Vec::new();
    for (topic, kind) in topics_of(topics) {
        let ends = kafka::watermarks(brokers, topic).await?;
        let stored = snapshot.offsets.get(topic).cloned().unwrap_or_default();
        let mut ranges = HashMap::new();
        for (partition, (low, high)) in ends.iter().enumerate() {
            let partition = partition as i32;
            let upto = stored.get(&partition).copied().unwrap_or(0);
            if *low > 0 && upto > 0 {
                return Err(ReplayError::Truncated {
                    topic: topic.to_string(),
                    partition,
                    low: *low,
                });
            }
            if high > &upto {
                behind.push((topic.to_string(), partition, high - upto));
            }
            ranges.insert(partition, (0, upto));
        }
        let refused: std::collections::HashSet<(i32, i64)> = snapshot
            .rejected
            .iter()
            .filter(|((t, _, _), reason)| t == topic && reason.as_str() == STORAGE_REJECTED)
            .map(|((_, p, o), _)| (*p, *o))
            .collect();
        let (brokers, name, report) = (brokers.to_string(), topic.to_string(), progress.clone());
        let (back, read) = tokio::task::spawn_blocking(move || {
            let mut replayed = replayed;
            let read = kafka::scan(&brokers, &name, &ranges, |message| {
                let at = (name.as_str(), message.partition(), message.offset());
                let record = kafka::raw_record(message);
                let refused = refused.contains(&(at.1, at.2));
                let _ = match kind {
                    Kind::Tasks => replayed.task_record(at, &record, refused),
                    Kind::Workers => replayed.worker_record(at, &record, refused),
                    Kind::Services => replayed.service_record(at, &record, refused),
                };
                if replayed.records % 10_000 == 0 {
                    report(replayed.records);
                }
            });
            (replayed, read)
        })
        .await
        .map_err(|e| KafkaIoError::Interrupted(e.to_string()))?;
        replayed = back;
        let read = read?;
        metrics()
            .replay_records
            .with_label_values(&[topic])
            .inc_by(read);
        progress(replayed.records);
    }
    let folded = started.elapsed();
    let differences = compare(&replayed, snapshot);
    tracing::debug!(
        read_and_fold_ms = folded.as_millis() as u64,
        compare_ms = (started.elapsed() - folded).as_millis() as u64,
        "replay verify"
    );
    let mut storage_rejected: Vec<Coordinates> = snapshot
        .rejected
        .iter()
        .filter(|(_, r)| r.as_str() == STORAGE_REJECTED)
        .map(|(at, _)| at.clone())
        .collect();
    storage_rejected.sort();
    let m = metrics();
    m.replay_differences.set(differences.len() as i64);
    m.replay_runs
        .with_label_values(&[if differences.is_empty() {
            "consistent"
        } else {
            "differences"
        }])
        .inc();
    Ok(VerifyReport {
        records: replayed.records,
        elapsed: started.elapsed(),
        differences,
        behind,
        storage_rejected,
    })
}

/// Reads the projection's snapshot from `store` and verifies it against the log.
pub async fn verify_store(
    brokers: &str,
    topics: &Topics,
    store: &Store,
    progress: impl Fn(u64, u64) + Send + Sync + Clone + 'static,
) -> Result<VerifyReport, ReplayError> {
    let started = Instant::now();
    let snapshot = store.snapshot().await?;
    tracing::debug!(
        snapshot_ms = started.elapsed().as_millis() as u64,
        "replay verify"
    );
    let total = planned(&snapshot, topics);
    let result = verify(brokers, topics, &snapshot, move |n| progress(n, total)).await;
    if result.is_err() {
        metrics().replay_runs.with_label_values(&["error"]).inc();
    }
    // The whole verification, reading the projection included.
    result.map(|report| VerifyReport {
        elapsed: started.elapsed(),
        ..report
    })
}

/// A moment of the log: what had been appended by a time, or up to given offsets.
#[derive(Debug, Clone, PartialEq)]
pub enum Moment {
    /// Every record whose timestamp (when it reached the log) is at or before this.
    Time(chrono::DateTime<chrono::Utc>),
    /// Per partition, the records before this offset; partitions not named: none.
    Offsets(HashMap<i32, i64>),
}

impl Moment {
    /// Reads `P:O,P:O,...` (each partition's next offset: records before it count).
    pub fn parse_offsets(text: &str) -> Result<Moment, String> {
        let mut offsets = HashMap::new();
        for pair in text.split(',').filter(|s| !s.trim().is_empty()) {
            let (p, o) = pair
                .trim()
                .split_once(':')
                .ok_or_else(|| format!("{pair:?} is not PARTITION:OFFSET"))?;
            let p: i32 = p.parse().map_err(|_| format!("{p:?} is not a partition"))?;
            let o: i64 = o.parse().map_err(|_| format!("{o:?} is not an offset"))?;
            if p < 0 || o < 0 {
                return Err(format!("{pair:?}: partitions and offsets are not negative"));
            }
            offsets.insert(p, o);
        }
        if offsets.is_empty() {
            return Err("give at least one PARTITION:OFFSET".into());
        }
        Ok(Moment::Offsets(offsets))
    }
}

/// The state of every task (or of task `only`) as the events topic had it at `moment`,
/// folded from offset 0 with the projector's fold.
pub async fn state_at(
    brokers: &str,
    topic: &str,
    moment: Moment,
    only: Option<uuid::Uuid>,
) -> Result<Vec<crate::events::TaskState>, ReplayError> {
    let ends = kafka::watermarks(brokers, topic).await?;
    let partition_of_only =
        only.map(|id| kafka::partition_for_key(id.to_string().as_bytes(), ends.len() as i32));
    let mut ranges = HashMap::new();
    for (partition, (low, high)) in ends.iter().enumerate() {
        let partition = partition as i32;
        if partition_of_only.is_some_and(|p| p != partition) {
            continue;
        }
        let upto = match &moment {
            Moment::Time(_) => *high,
            Moment::Offsets(o) => o.get(&partition).copied().unwrap_or(0).min(*high),
        };
        if *low > 0 && upto > *low {
            return Err(ReplayError::Truncated {
                topic: topic.to_string(),
                partition,
                low: *low,
            });
        }
        ranges.insert(partition, (0, upto));
    }
    let cutoff = match &moment {
        Moment::Time(t) => Some(t.timestamp_millis()),
        Moment::Offsets(_) => None,
    };
    let key = only.map(|id| id.to_string());
    let (brokers, name) = (brokers.to_string(), topic.to_string());
    let fold = tokio::task::spawn_blocking(move || {
        let mut fold = crate::events::fold::TaskFold::new();
        kafka::scan(&brokers, &name, &ranges, |m| {
            if key.as_ref().is_some_and(|k| m.key() != Some(k.as_bytes())) {
                return;
            }
            if let Some(cutoff) = cutoff
                && m.timestamp().to_millis().is_none_or(|t| t > cutoff)
            {
                return;
            }
            if let Ok(event) = crate::events::Event::decode(&kafka::raw_record(m)) {
                let _ = fold.apply(&event);
            }
        })
        .map(|_| fold)
    })
    .await
    .map_err(|e| KafkaIoError::Interrupted(e.to_string()))??;
    let mut states: Vec<crate::events::TaskState> = fold.states.into_values().collect();
    states.sort_by_key(|s| (s.submitted_at, s.id));
    Ok(states)
}
