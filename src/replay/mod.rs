//! Replay: fold the log from offset 0 in memory, with the same pure folds as the
//! projector (`tasklog-core`), and compare the result with the Postgres projection.
//!
//! `tasklog replay verify` reads the projection in one repeatable-read snapshot together
//! with the offsets it was built up to, then reads every topic up to exactly those
//! offsets, so that a projector working meanwhile cannot cause a false difference; how
//! far the projection is behind the log is reported beside, not as a difference.

pub mod export;
pub mod verify;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Of those, the records the fold refused (each is in `rejected_events` too, or it
    /// is a difference).
    pub rejected: u64,
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

/// Folds `topics` from offset 0 up to the offsets of `head` (a snapshot's offsets and
/// rejected records, read first) and compares the result with `snapshot`, the whole of
/// that snapshot, awaited only once the log is folded (it is read meanwhile).
/// `progress` is called with the records folded so far, now and then.
pub async fn verify(
    brokers: &str,
    topics: &Topics,
    head: &ProjectionSnapshot,
    snapshot: impl Future<Output = Result<ProjectionSnapshot, ReplayError>>,
    progress: impl Fn(u64) + Send + Sync + Clone + 'static,
) -> Result<VerifyReport, ReplayError> {
    let started = Instant::now();
    let mut replayed = Replayed::new();
    let mut behind = Vec::new();
    for (topic, kind) in topics_of(topics) {
        let ends = kafka::watermarks(brokers, topic).await?;
        let stored = head.offsets.get(topic).cloned().unwrap_or_default();
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
        let refused: HashSet<(i32, i64)> = head
            .rejected
            .iter()
            .filter(|((t, _, _), reason)| t == topic && reason.as_str() == STORAGE_REJECTED)
            .map(|((_, p, o), _)| (*p, *o))
            .collect();
        let (brokers, name, report) = (brokers.to_string(), topic.to_string(), progress.clone());
        let (back, read) = tokio::task::spawn_blocking(move || {
            fold_topic(replayed, &brokers, &name, kind, &ranges, &refused, &report)
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
    let snapshot = snapshot.await?;
    let read = started.elapsed();
    let differences = compare(&replayed, &snapshot);
    tracing::debug!(
        read_and_fold_ms = folded.as_millis() as u64,
        snapshot_wait_ms = (read - folded).as_millis() as u64,
        compare_ms = (started.elapsed() - read).as_millis() as u64,
        "replay verify"
    );
    let mut storage_rejected: Vec<Coordinates> = snapshot
        .rejected
        .iter()
        .filter(|(_, r)| r.as_str() == STORAGE_REJECTED)
        .map(|(at, _)| at.clone())
        .collect();
    storage_rejected.sort();
    let (records, rejected) = (replayed.records, replayed.rejected.len() as u64);
    // Freeing a whole replay and snapshot takes a while and nobody waits for it.
    let _ = std::thread::Builder::new()
        .name("replay-free".into())
        .spawn(move || drop((replayed, snapshot)));
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
        records,
        rejected,
        elapsed: started.elapsed(),
        differences,
        behind,
        storage_rejected,
    })
}

/// Folds the records of `topic` in `ranges` into `replayed`: its partitions split in two
/// halves read and folded on two threads (a task's, worker's or service's records all
/// share one partition, so the halves fold independently), then merged. Should one key
/// turn up in both halves — a producer that chose partitions itself — the topic is
/// folded again on one thread, in the scanner's order, as if there had been no split.
/// Returns the replay and the records read (or why the topic could not be read).
fn fold_topic(
    replayed: Replayed,
    brokers: &str,
    topic: &str,
    kind: Kind,
    ranges: &HashMap<i32, (i64, i64)>,
    refused: &HashSet<(i32, i64)>,
    report: &(impl Fn(u64) + Sync),
) -> (Replayed, Result<u64, KafkaIoError>) {
    let before = replayed.records;
    let folded = AtomicU64::new(before);
    let fold_part = |part: &HashMap<i32, (i64, i64)>| {
        let mut part_replay = Replayed::new();
        let read = kafka::scan(brokers, topic, part, |message| {
            let at = (topic, message.partition(), message.offset());
            let record = kafka::raw_record(message);
            let refused = refused.contains(&(at.1, at.2));
            let _ = match kind {
                Kind::Tasks => part_replay.task_record(at, &record, refused),
                Kind::Workers => part_replay.worker_record(at, &record, refused),
                Kind::Services => part_replay.service_record(at, &record, refused),
            };
            if part_replay.records % PROGRESS_EVERY == 0 {
                report(folded.fetch_add(PROGRESS_EVERY, Ordering::Relaxed) + PROGRESS_EVERY);
            }
        });
        (part_replay, read)
    };
    let [first, second] = halves(ranges);
    let ((a, read_a), (b, read_b)) = std::thread::scope(|s| {
        let other = s.spawn(|| fold_part(&second));
        let here = fold_part(&first);
        let there = other
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (here, there)
    });
    let read = match (read_a, read_b) {
        (Ok(x), Ok(y)) => x + y,
        (Err(e), _) | (_, Err(e)) => return (replayed, Err(e)),
    };
    let mut replayed = replayed;
    if replayed.shares_keys(&a) || replayed.shares_keys(&b) || a.shares_keys(&b) {
        tracing::warn!(
            topic,
            "a key's records sit in more than one partition; folding the topic on one thread"
        );
        let (whole, read) = fold_part(ranges);
        replayed.absorb(whole);
        return (replayed, read);
    }
    replayed.absorb(a);
    replayed.absorb(b);
    (replayed, Ok(read))
}

/// How often (in records folded) progress is reported.
const PROGRESS_EVERY: u64 = 10_000;

/// `ranges` split in two, partitions dealt out largest first to the lighter half.
fn halves(ranges: &HashMap<i32, (i64, i64)>) -> [HashMap<i32, (i64, i64)>; 2] {
    let mut partitions: Vec<(&i32, &(i64, i64))> = ranges.iter().collect();
    partitions.sort_by_key(|(p, (from, to))| (std::cmp::Reverse(to - from), **p));
    let mut out = [HashMap::new(), HashMap::new()];
    let mut load = [0i64; 2];
    for (p, (from, to)) in partitions {
        let lighter = usize::from(load[1] < load[0]);
        load[lighter] += (to - from).max(0);
        out[lighter].insert(*p, (*from, *to));
    }
    out
}

/// Reads the projection's snapshot from `store` and verifies it against the log.
pub async fn verify_store(
    brokers: &str,
    topics: &Topics,
    store: &Store,
    progress: impl Fn(u64, u64) + Send + Sync + Clone + 'static,
) -> Result<VerifyReport, ReplayError> {
    let started = Instant::now();
    let (head_tx, head_rx) = tokio::sync::oneshot::channel();
    let reader = store.clone();
    let whole = tokio::spawn(async move {
        reader
            .snapshot_with(move |head| {
                let _ = head_tx.send(ProjectionSnapshot {
                    offsets: head.offsets.clone(),
                    rejected: head.rejected.clone(),
                    ..ProjectionSnapshot::default()
                });
            })
            .await
    });
    let whole = async move {
        match whole.await {
            Ok(snapshot) => Ok(snapshot?),
            Err(e) => Err(ReplayError::Store(StoreError::Pool(format!(
                "the snapshot reader stopped: {e}"
            )))),
        }
    };
    let result = match head_rx.await {
        Ok(head) => {
            tracing::debug!(
                snapshot_head_ms = started.elapsed().as_millis() as u64,
                "replay verify"
            );
            let total = planned(&head, topics);
            verify(brokers, topics, &head, whole, move |n| progress(n, total)).await
        }
        // The reader failed before it had the offsets: its error says why.
        Err(_) => match whole.await {
            Err(e) => Err(e),
            Ok(_) => Err(ReplayError::Store(StoreError::Pool(
                "the snapshot ended without its offsets".into(),
            ))),
        },
    };
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
