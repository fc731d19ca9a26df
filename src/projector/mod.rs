//! Projections: consumers that fold a topic into Postgres, exactly once.
//!
//! Exactly once, because each batch is one Postgres transaction that writes the rows it
//! produced *and* the next offset of every partition it read. On (re)assignment the
//! consumer starts from the offsets stored in Postgres, not from Kafka's group offsets,
//! and a batch whose records are below the stored offsets (a redelivery, or a zombie
//! projector after a rebalance) skips them. Killed at any moment, restarted: every record
//! is applied once.
//!
//! Records that cannot be applied are recorded in `rejected_events` and copied to the
//! dead-letter topic, with the reason in headers; the projection goes on. The copy is
//! produced and acknowledged *before* the batch commits, so a crash can repeat a dead
//! letter (at-least-once, with the source partition/offset in headers to dedupe) but
//! never lose one.
//!
//! The runner here is generic; [`tasks::TaskProjection`] folds task events,
//! [`workers::WorkerProjection`] worker events, and the log index
//! ([`crate::logs::index`]) indexes log lines.

pub mod keyed;
pub mod services;
pub mod tasks;
pub mod tokens;
pub mod workers;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::consumer::{
    BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_postgres::Transaction;

use crate::events;
use crate::kafka::{self, AppendError, Appender, AppenderOptions, KafkaIoError, Topics};
use crate::metrics::metrics;
use crate::store::projection::{self, RejectedRecord};
use crate::store::{Store, StoreError};

pub use tasks::TaskProjection;

/// One consumed record and what [`Projection::decode`] made of it.
pub struct Record<D> {
    /// The Kafka record.
    pub message: OwnedMessage,
    /// Its decoded form.
    pub decoded: D,
}

/// A record a projection refused, by index into the batch it was given.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// Index of the record in the slice passed to [`Projection::apply`].
    pub index: usize,
    /// Stable reason code.
    pub reason: &'static str,
    /// Detail.
    pub message: String,
}

pub use crate::kafka::raw_record;

/// A fold of one topic into Postgres.
pub trait Projection: Send + Sync + 'static {
    /// What a record decodes to (computed off the write path, while the previous batch
    /// is being written).
    type Decoded: Send + Sync + 'static;

    /// Decodes one record. Pure.
    fn decode(message: &OwnedMessage) -> Self::Decoded;

    /// Applies records (not yet applied, in offset order per partition) inside `tx`, and
    /// says which it refused. It must not commit.
    fn apply<'a>(
        &'a self,
        tx: &'a Transaction<'_>,
        records: &'a [&'a Record<Self::Decoded>],
    ) -> impl Future<Output = Result<Vec<Refusal>, StoreError>> + Send + 'a;

    /// The `NOTIFY` channel signalled after each commit.
    fn channel(&self) -> &'static str;

    /// Whether the commit of this batch (these fresh records, of which `refusals` were
    /// refused) is signalled on [`Projection::channel`]. Always, unless a projection
    /// knows that no reader waits for what the batch holds.
    fn notifies(&self, _records: &[&Record<Self::Decoded>], _refusals: &[Refusal]) -> bool {
        true
    }
}

/// Test-only crash points. `TASKLOG_FAILPOINT=<point>:<n>` makes the projector abort the
/// process (as abruptly as SIGKILL) the n-th time it reaches `<point>`:
/// `before_commit` (batch written, dead letters sent, transaction not committed) or
/// `after_commit` (committed, Kafka offsets not stored yet). Unset in normal runs.
mod failpoint {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);

    pub fn hit(point: &str) {
        let armed = ARMED.get_or_init(|| {
            let value = std::env::var("TASKLOG_FAILPOINT").ok()?;
            let (name, n) = value.split_once(':')?;
            Some((name.to_string(), n.parse().ok()?))
        });
        if let Some((name, n)) = armed
            && name == point
            && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n
        {
            eprintln!("tasklog projector: failpoint {point} reached; aborting");
            std::process::abort();
        }
    }
}

/// Default consumer group of the task projection (with the default topic prefix).
pub const DEFAULT_GROUP: &str = "tasklog-projector";

/// The default consumer group of the task projection for topics named `<prefix>.*`:
/// [`DEFAULT_GROUP`] for the default prefix, `<prefix>-projector` for any other, so that
/// deployments sharing a cluster under different prefixes never share a group (a group
/// whose members follow different topics rebalances all of them on every change).
pub fn default_group(prefix: &str) -> String {
    if prefix == "tasklog" {
        DEFAULT_GROUP.to_string()
    } else {
        format!("{prefix}-projector")
    }
}

pub use crate::kafka::dlq_header;

/// Settings of the projector.
#[derive(Debug, Clone)]
pub struct ProjectorOptions {
    /// Broker list.
    pub brokers: String,
    /// The topic this projection consumes.
    pub topic: String,
    /// All of tasklog's topics (created when missing; the DLQ among them).
    pub topics: Topics,
    /// Consumer group id.
    pub group_id: String,
    /// Most records per batch (one transaction).
    pub max_batch: usize,
    /// How long to wait for more records once a batch has started.
    pub linger: Duration,
    /// Consumer group session timeout: how soon a dead projector's partitions move.
    pub session_timeout: Duration,
    /// Whether records deleted from the log before they were applied are an error (the
    /// events topic: the log is the truth) or retention (the logs topic).
    pub truncation_is_fatal: bool,
}

impl ProjectorOptions {
    /// The same settings for the log index projection (topic `logs`; its own group).
    pub fn for_logs(&self) -> ProjectorOptions {
        let mut logs = self.derived(&self.topics.logs, crate::logs::index::DEFAULT_GROUP, "logs");
        logs.truncation_is_fatal = false;
        // Indexing a record is cheap (headers only): larger batches, fewer commits.
        logs.max_batch = 20_000;
        logs
    }

    /// The same settings for the workers projection (topic `workers`; its own group).
    pub fn for_workers(&self) -> ProjectorOptions {
        let mut workers = self.derived(&self.topics.workers, workers::DEFAULT_GROUP, "workers");
        // Heartbeats removed by compaction or retention lose nothing: every one carries
        // the worker's whole description.
        workers.truncation_is_fatal = false;
        workers
    }

    /// The same settings for the services projection (topic `services`; its own group).
    pub fn for_services(&self) -> ProjectorOptions {
        self.derived(&self.topics.services, services::DEFAULT_GROUP, "services")
    }

    /// The same settings for the tokens projection (topic `auth`; its own group).
    pub fn for_tokens(&self) -> ProjectorOptions {
        self.derived(&self.topics.auth, tokens::DEFAULT_GROUP, "tokens")
    }

    /// These settings for another projection over `topic`: its group is
    /// `default_group` beside the default task group, `<group>-<suffix>` beside another.
    fn derived(&self, topic: &str, default_group: &str, suffix: &str) -> ProjectorOptions {
        let mut derived = self.clone();
        derived.topic = topic.to_string();
        derived.group_id = if self.group_id == DEFAULT_GROUP {
            default_group.to_string()
        } else {
            format!("{}-{suffix}", self.group_id)
        };
        derived
    }

    /// Defaults for the given brokers and topics.
    pub fn new(brokers: &str, topics: Topics) -> ProjectorOptions {
        ProjectorOptions {
            brokers: brokers.to_string(),
            topic: topics.events.clone(),
            group_id: default_group(&topics.prefix),
            topics,
            max_batch: 5000,
            linger: Duration::from_millis(1),
            session_timeout: Duration::from_secs(10),
            truncation_is_fatal: true,
        }
    }
}

/// Why the projector stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    /// Kafka could not be reached or set up.
    #[error(transparent)]
    Kafka(#[from] KafkaIoError),
    /// The consumer failed.
    #[error("Kafka consumer error: {0}")]
    Consumer(#[from] rdkafka::error::KafkaError),
    /// Postgres failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Records the projection had not applied were deleted from the log.
    #[error(
        "records of {topic} that the projection had not applied are gone from the log{detail}. \
         Nothing was applied out of order, but the projection cannot be completed from this log. \
         (Retention, DeleteRecords, or the in-memory mock's 5 MiB per partition deletes records; \
         the events topic must be kept forever: retention.ms=-1.)"
    )]
    LogTruncated {
        /// Topic.
        topic: String,
        /// Where, when known.
        detail: String,
    },
    /// Stored offsets are past the end of the log: this is not the log the projection
    /// was built from.
    #[error(
        "the projection in Postgres has applied {topic} partition {partition} up to offset {stored}, \
         but the broker's log ends at {high}: this is a different or truncated log. \
         Rebuild the projection (`tasklog projector --rebuild`) or point tasklog at the right cluster"
    )]
    DivergedLog {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Next offset stored in Postgres.
        stored: i64,
        /// The partition's high watermark.
        high: i64,
    },
}

/// Shared between the consumer's callbacks and the batch loop.
struct Shared {
    store: Store,
    topic: String,
    runtime: tokio::runtime::Handle,
    /// Next offset to apply per assigned partition, as committed to Postgres.
    next_offsets: Mutex<HashMap<i32, i64>>,
    /// Per partition, for `tasklog_projector_lag_seconds`: the append time of the last
    /// record applied and when the partition was last seen caught up (ms since the epoch).
    lag_clocks: Mutex<HashMap<i32, LagClock>>,
}

/// What `tasklog_projector_lag_seconds` is computed from ([`crate::metrics::lag_seconds`]).
#[derive(Default, Clone, Copy)]
struct LagClock {
    last_applied_ms: Option<i64>,
    caught_up_ms: Option<i64>,
}

impl Shared {
    /// The projection's offsets in Postgres, read from inside a consumer callback.
    ///
    /// The callback runs wherever the consumer is polled or closed: on a runtime worker,
    /// or on a thread already inside `block_on` (the consumer's close on drop). Running
    /// `Handle::block_on` on that thread would share its parker with the outer
    /// `block_on` and swallow the outer future's wake-ups (a rebuild once hung forever
    /// this way, its other projections never polled again). So the query runs on a
    /// thread of its own, and a worker hands its other tasks off while it waits
    /// (`block_in_place`; outside the runtime, on the closing thread, it just runs).
    fn stored_offsets(&self) -> Result<HashMap<i32, i64>, crate::store::StoreError> {
        tokio::task::block_in_place(|| {
            std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        self.runtime
                            .block_on(self.store.projection_offsets(&self.topic))
                    })
                    .join()
                    .unwrap_or_else(|_| {
                        Err(crate::store::StoreError::Pool(
                            "the thread reading projection offsets panicked".into(),
                        ))
                    })
            })
        })
    }
}

/// Consumer callbacks: seek to the Postgres offsets on assignment; publish lag.
struct ProjectorContext(Arc<Shared>);

impl ClientContext for ProjectorContext {
    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.0.topic) else {
            return;
        };
        let next = self
            .0
            .next_offsets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut clocks = self.0.lag_clocks.lock().unwrap_or_else(|e| e.into_inner());
        let now_ms = chrono::Utc::now().timestamp_millis();
        for (partition, stats) in &topic.partitions {
            if let Some(next) = next.get(partition)
                && stats.hi_offset >= 0
            {
                let lag = (stats.hi_offset - next).max(0);
                let labels = [self.0.topic.as_str(), &partition.to_string()];
                metrics().projector_lag.with_label_values(&labels).set(lag);
                let clock = clocks.entry(*partition).or_default();
                if lag == 0 {
                    clock.caught_up_ms = Some(now_ms);
                }
                let seconds = crate::metrics::lag_seconds(
                    lag,
                    now_ms,
                    clock.last_applied_ms,
                    clock.caught_up_ms,
                );
                if let Some(seconds) = seconds {
                    metrics()
                        .projector_lag_seconds
                        .with_label_values(&labels)
                        .set(seconds);
                }
            }
        }
    }
}

impl ConsumerContext for ProjectorContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                // Kafka's group offsets are informational; Postgres holds the truth.
                let stored = self.0.stored_offsets();
                let stored = match stored {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read projection offsets on assignment; not consuming");
                        let _ = consumer.assign(&TopicPartitionList::new());
                        return;
                    }
                };
                // Cooperative-sticky: this callback names only the partitions added to
                // this member, and the ones it keeps go on undisturbed.
                let cooperative = matches!(
                    consumer.rebalance_protocol(),
                    RebalanceProtocol::Cooperative
                );
                let mut next = self
                    .0
                    .next_offsets
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if !cooperative {
                    forget_partitions(&self.0.topic, next.drain().map(|(p, _)| p));
                }
                let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                for p in &partitions {
                    let offset = stored.get(p).copied().unwrap_or(0);
                    next.insert(*p, offset);
                    metrics()
                        .projector_partition_assigned
                        .with_label_values(&[&self.0.topic, &p.to_string()])
                        .set(1);
                    let _ = tpl.set_partition_offset(&self.0.topic, *p, Offset::Offset(offset));
                }
                tracing::info!(
                    ?partitions,
                    cooperative,
                    "partitions assigned; resuming from Postgres offsets"
                );
                metrics()
                    .projector_rebalances
                    .with_label_values(&[&self.0.topic, "assigned"])
                    .inc();
                let assigned = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = assigned {
                    tracing::error!(error = %e, "assign failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let cooperative = matches!(
                    consumer.rebalance_protocol(),
                    RebalanceProtocol::Cooperative
                );
                let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(?partitions, cooperative, "partitions revoked");
                metrics()
                    .projector_rebalances
                    .with_label_values(&[&self.0.topic, "revoked"])
                    .inc();
                {
                    let mut next = self
                        .0
                        .next_offsets
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    for p in &partitions {
                        next.remove(p);
                    }
                    forget_partitions(&self.0.topic, partitions.iter().copied());
                }
                // A batch of revoked partitions still in flight is harmless: the new
                // owner locks the offset rows, and whoever commits second skips what
                // the first applied.
                let _ = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
            }
            other => {
                tracing::error!(error = ?other, "rebalance error");
                let _ = consumer.unassign();
            }
        }
    }
}

/// Drops the per-partition gauges of partitions this process no longer owns.
fn forget_partitions(topic: &str, partitions: impl Iterator<Item = i32>) {
    let m = metrics();
    for p in partitions {
        let p = p.to_string();
        let _ = m
            .projector_partition_assigned
            .remove_label_values(&[topic, &p]);
        let _ = m.projector_lag.remove_label_values(&[topic, &p]);
        let _ = m.projector_lag_seconds.remove_label_values(&[topic, &p]);
    }
}

/// Checks that no stored offset is beyond the broker's high watermark.
pub async fn check_log_matches(
    store: &Store,
    brokers: &str,
    topic: &str,
    truncation_is_fatal: bool,
) -> Result<(), ProjectorError> {
    let stored = store.projection_offsets(topic).await?;
    let marks = kafka::watermarks(brokers, topic).await?;
    for (partition, next) in stored {
        let (low, high) = marks.get(partition as usize).copied().unwrap_or((0, 0));
        if truncation_is_fatal && next < low {
            return Err(ProjectorError::LogTruncated {
                topic: topic.to_string(),
                detail: format!(
                    ": partition {partition} now starts at offset {low}, but the projection has applied only up to {next}"
                ),
            });
        }
        if next > high {
            return Err(ProjectorError::DivergedLog {
                topic: topic.to_string(),
                partition,
                stored: next,
                high,
            });
        }
    }
    Ok(())
}

/// Runs every projection — tasks, workers, services and the log index — until
/// `shutdown` resolves.
pub async fn run_all(
    options: ProjectorOptions,
    store: Store,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProjectorError> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let logs = options.for_logs();
    let worker_options = options.for_workers();
    let service_options = options.for_services();
    let token_options = options.for_tokens();
    let all = futures::future::try_join5(
        run_projection(
            options,
            store.clone(),
            TaskProjection,
            stopped(stop_rx.clone()),
        ),
        run_projection(
            worker_options,
            store.clone(),
            workers::WorkerProjection::new(),
            stopped(stop_rx.clone()),
        ),
        run_projection(
            service_options,
            store.clone(),
            services::ServiceProjection::new(),
            stopped(stop_rx.clone()),
        ),
        run_projection(
            token_options,
            store.clone(),
            tokens::TokenProjection::new(),
            stopped(stop_rx.clone()),
        ),
        run_projection(
            logs,
            store,
            crate::logs::index::LogIndexProjection,
            stopped(stop_rx),
        ),
    );
    let mut all = std::pin::pin!(all);
    tokio::select! {
        result = &mut all => return result.map(|_| ()),
        _ = shutdown => {}
    }
    let _ = stop_tx.send(true);
    all.await.map(|_| ())
}

/// Runs the task projection until `shutdown` resolves.
pub async fn run(
    options: ProjectorOptions,
    store: Store,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProjectorError> {
    run_projection(options, store, TaskProjection, shutdown).await
}

/// Runs `projection` over `options.topic` until `shutdown` resolves. Returns an error
/// only for conditions it cannot recover from by retrying (a diverged log, an unusable
/// configuration).
pub async fn run_projection<P: Projection>(
    options: ProjectorOptions,
    store: Store,
    projection: P,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProjectorError> {
    let topic = options.topic.clone();
    kafka::ensure_topics(
        &options.brokers,
        &options.topics.all(),
        kafka::DEFAULT_PARTITIONS,
    )
    .await?;
    let partitions = kafka::list_topics(&options.brokers)
        .await?
        .into_iter()
        .find(|(name, _)| *name == topic)
        .map(|(_, n)| n)
        .unwrap_or(0);
    {
        let mut client = store.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(crate::store::ctx("begin"))?;
        projection::init_offsets(&tx, &topic, partitions).await?;
        tx.commit().await.map_err(crate::store::ctx("commit"))?;
    }
    check_log_matches(
        &store,
        &options.brokers,
        &topic,
        options.truncation_is_fatal,
    )
    .await?;

    let shared = Arc::new(Shared {
        store: store.clone(),
        topic: topic.clone(),
        runtime: tokio::runtime::Handle::current(),
        next_offsets: Mutex::new(HashMap::new()),
        lag_clocks: Mutex::new(HashMap::new()),
    });
    let consumer: StreamConsumer<ProjectorContext> = kafka::client_config(&options.brokers)
        .set("group.id", &options.group_id)
        // Group offsets are informational (Postgres holds the truth): committed
        // asynchronously after each batch, so closing never waits on a commit.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Offsets come from Postgres. One that is no longer on the log means records were
        // deleted before they were applied: fatal for events, retention for logs.
        .set(
            "auto.offset.reset",
            if options.truncation_is_fatal {
                "error"
            } else {
                "earliest"
            },
        )
        .set("isolation.level", "read_committed")
        // Scaling out or losing a member moves only the partitions that must move; the
        // others keep being applied through the rebalance.
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set(
            "session.timeout.ms",
            options.session_timeout.as_millis().to_string(),
        )
        .set(
            "heartbeat.interval.ms",
            (options.session_timeout.as_millis() / 4)
                .max(100)
                .to_string(),
        )
        .set("statistics.interval.ms", "5000")
        .set(
            "fetch.wait.max.ms",
            kafka::tail_fetch_wait_ms(&options.brokers).await,
        )
        // Fetch again as soon as the queue drains below its threshold (librdkafka's
        // default backoff waits up to a second, which starves a projector catching up).
        .set("fetch.queue.backoff.ms", "1")
        // One task's burst lands in one partition: let a fetch bring a lot of it.
        .set("max.partition.fetch.bytes", "8388608")
        .create_with_context(ProjectorContext(shared.clone()))?;
    consumer.subscribe(&[&topic])?;
    let consumer = Arc::new(consumer);
    let runner = Runner {
        consumer: consumer.clone(),
        shared: shared.clone(),
        dlq: Appender::new(&AppenderOptions::new(&options.brokers))?,
        topic,
        dlq_topic: options.topics.dlq.clone(),
        projection,
        rewound_gaps: Mutex::new(HashMap::new()),
    };
    tracing::info!(group = %options.group_id, topic = %runner.topic, "projection running");

    // The reader receives and decodes the next batch while this loop writes the current
    // one to Postgres. After a failure or a skip the loop asks it to rewind: it then
    // seeks every assigned partition back to the offsets committed in Postgres and
    // starts a new epoch; batches of older epochs are dropped unapplied.
    let (batches_tx, mut batches) =
        mpsc::channel::<Result<DecodedBatch<P::Decoded>, ProjectorError>>(1);
    let (rewind_tx, rewinds) = mpsc::unbounded_channel::<()>();
    let reader = tokio::spawn(read_batches::<P>(
        consumer.clone(),
        shared,
        options.max_batch,
        options.linger,
        batches_tx,
        rewinds,
    ));
    let mut epoch = 0u64;
    let mut shutdown = std::pin::pin!(shutdown);
    let mut backoff = Duration::from_millis(100);
    loop {
        let batch = tokio::select! {
            _ = &mut shutdown => break,
            batch = batches.recv() => match batch {
                Some(Ok(b)) => b,
                Some(Err(e)) => {
                    reader.abort();
                    return Err(e);
                }
                None => break,
            },
        };
        if batch.epoch != epoch {
            continue;
        }
        match runner.apply(batch).await {
            Ok(Progress::Continue) => backoff = Duration::from_millis(100),
            Ok(Progress::Rewind) => {
                epoch += 1;
                let _ = rewind_tx.send(());
            }
            Err(e) => {
                tracing::error!(error = %e, "batch failed; rewinding and retrying");
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                epoch += 1;
                let _ = rewind_tx.send(());
            }
        }
    }
    reader.abort();
    // The reader holds the consumer too: once it is gone, the consumer closes (leaving
    // its group) now, not later, when the broker may be gone.
    let _ = reader.await;
    consumer.unsubscribe();
    let topic = runner.topic.clone();
    drop(runner);
    close_consumer(consumer, &topic).await;
    Ok(())
}

/// How long a projection waits on shutdown for its consumer to leave its group.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Closes the consumer (leaving its group) on a thread of its own, waiting at most
/// [`CLOSE_TIMEOUT`]: librdkafka's close blocks until the group lets go — through a
/// join in flight, for instance — and must hold up neither the runtime nor the exit
/// (everything applied is committed in Postgres already; the group's session timeout
/// removes a member that did not leave).
async fn close_consumer(consumer: Arc<StreamConsumer<ProjectorContext>>, topic: &str) {
    let (closed_tx, closed) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("projector-close".into())
        .spawn(move || {
            drop(consumer);
            let _ = closed_tx.send(());
        });
    if spawned.is_err() {
        tracing::warn!(
            topic,
            "cannot start a thread to close the consumer; leaving it"
        );
        return;
    }
    if tokio::time::timeout(CLOSE_TIMEOUT, closed).await.is_err() {
        tracing::warn!(
            topic,
            timeout_s = CLOSE_TIMEOUT.as_secs(),
            "the consumer did not leave its group in time; going on without it"
        );
    }
}

/// Decoded records of one batch, tagged with the reader's epoch.
struct DecodedBatch<D> {
    epoch: u64,
    records: Vec<Record<D>>,
    decode_time: Duration,
}

/// What the loop does after a committed batch.
enum Progress {
    /// Go on with the next batch.
    Continue,
    /// This consumer was behind Postgres: rewind (forward) to the stored offsets.
    Rewind,
}

/// Receives batches, decodes them, and hands them over; rewinds on request.
async fn read_batches<P: Projection>(
    consumer: Arc<StreamConsumer<ProjectorContext>>,
    shared: Arc<Shared>,
    max: usize,
    linger: Duration,
    batches: mpsc::Sender<Result<DecodedBatch<P::Decoded>, ProjectorError>>,
    mut rewinds: mpsc::UnboundedReceiver<()>,
) {
    let mut epoch = 0u64;
    loop {
        tokio::select! {
            biased;
            request = rewinds.recv() => {
                if request.is_none() {
                    return;
                }
                epoch += 1;
                rewind_to_committed(&consumer, &shared);
            }
            messages = next_batch(&consumer, &shared.topic, max, linger) => {
                let messages = match messages {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = batches.send(Err(e)).await;
                        return;
                    }
                };
                let received = Instant::now();
                let records: Vec<Record<P::Decoded>> = messages
                    .into_iter()
                    .map(|message| {
                        let decoded = P::decode(&message);
                        Record { message, decoded }
                    })
                    .collect();
                let batch = DecodedBatch { epoch, records, decode_time: received.elapsed() };
                if batches.send(Ok(batch)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Seeks every assigned partition to the next offset committed in Postgres.
fn rewind_to_committed(consumer: &StreamConsumer<ProjectorContext>, shared: &Shared) {
    let mut tpl = TopicPartitionList::new();
    for (partition, offset) in shared
        .next_offsets
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        let _ = tpl.add_partition_offset(&shared.topic, *partition, Offset::Offset(*offset));
    }
    if tpl.count() == 0 {
        return;
    }
    match consumer.seek_partitions(tpl, Duration::from_secs(5)) {
        Ok(result) => {
            for e in result.elements() {
                if let Err(error) = e.error() {
                    // Not assigned any more (rebalanced): the new owner starts from
                    // Postgres. Any other failure is caught by the runner's gap check.
                    tracing::warn!(partition = e.partition(), %error, "rewind failed");
                }
            }
        }
        Err(error) => tracing::warn!(%error, "rewind failed"),
    }
}

/// Waits for one record, then takes whatever else arrives within `linger`. Fails only
/// when the log lost records (with `auto.offset.reset=error`).
async fn next_batch(
    consumer: &StreamConsumer<ProjectorContext>,
    topic: &str,
    max: usize,
    linger: Duration,
) -> Result<Vec<OwnedMessage>, ProjectorError> {
    let truncated = |e: &rdkafka::error::KafkaError| {
        e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::OffsetOutOfRange)
    };
    let mut batch = Vec::new();
    loop {
        match consumer.recv().await {
            Ok(m) => {
                batch.push(m.detach());
                break;
            }
            Err(e) if truncated(&e) => {
                return Err(ProjectorError::LogTruncated {
                    topic: topic.to_string(),
                    detail: String::new(),
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "consumer error");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let deadline = tokio::time::Instant::now() + linger;
    while batch.len() < max {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => batch.push(m.detach()),
            Ok(Err(e)) if truncated(&e) => {
                return Err(ProjectorError::LogTruncated {
                    topic: topic.to_string(),
                    detail: String::new(),
                });
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "consumer error"),
            Err(_) => break,
        }
    }
    Ok(batch)
}

/// The write loop's state.
struct Runner<P> {
    consumer: Arc<StreamConsumer<ProjectorContext>>,
    shared: Arc<Shared>,
    dlq: Appender,
    topic: String,
    dlq_topic: String,
    projection: P,
    /// Per partition, the stored offset the consumer was last rewound to because it
    /// delivered records beyond it (see [`Runner::gaps`]).
    rewound_gaps: Mutex<HashMap<i32, i64>>,
}

#[derive(Debug, thiserror::Error)]
enum BatchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("dead-lettering failed: {0}")]
    Dlq(#[from] AppendError),
}

/// Reason code of a record Postgres refused to store (found by isolating it).
pub const STORAGE_REJECTED: &str = "storage_rejected";

/// A record the runner itself refuses before the projection sees it.
struct Forced {
    refusal: Refusal,
    /// Keep only the record's coordinates in `rejected_events` (its headers could not
    /// be stored either).
    bare: bool,
}

type Applying<'a> =
    std::pin::Pin<Box<dyn Future<Output = Result<Progress, BatchError>> + Send + 'a>>;

impl<P: Projection> Runner<P> {
    async fn apply(&self, batch: DecodedBatch<P::Decoded>) -> Result<Progress, BatchError> {
        let records: Vec<&Record<P::Decoded>> = batch.records.iter().collect();
        tracing::trace!(
            decode_ms = batch.decode_time.as_secs_f64() * 1e3,
            "batch decoded"
        );
        self.apply_isolating(&records).await
    }

    /// Writes `records`; when Postgres refuses the data of the batch (the same write
    /// would fail every time), finds the records it refuses by halving the batch — each
    /// half its own exactly-once transaction, in order, so per-partition order holds —
    /// and dead-letters each such record alone with reason [`STORAGE_REJECTED`].
    /// Transient failures are returned, for the loop to retry with backoff.
    fn apply_isolating<'a>(&'a self, records: &'a [&'a Record<P::Decoded>]) -> Applying<'a> {
        Box::pin(async move {
            let e = match self.write(records, None).await {
                Err(BatchError::Store(e)) if e.is_data_rejection() => e,
                other => return other,
            };
            if let [record] = records {
                tracing::warn!(
                    topic = %self.topic,
                    partition = record.message.partition(),
                    offset = record.message.offset(),
                    error = %e,
                    "Postgres refuses this record; dead-lettering it"
                );
                let refusal = Refusal {
                    index: 0,
                    reason: STORAGE_REJECTED,
                    message: e.to_string(),
                };
                let forced = Forced {
                    refusal: refusal.clone(),
                    bare: false,
                };
                return match self.write(records, Some(forced)).await {
                    Err(BatchError::Store(again)) if again.is_data_rejection() => {
                        let forced = Forced {
                            refusal,
                            bare: true,
                        };
                        self.write(records, Some(forced)).await
                    }
                    other => other,
                };
            }
            tracing::warn!(
                topic = %self.topic,
                records = records.len(),
                error = %e,
                "Postgres refuses part of a batch; isolating the records it refuses"
            );
            metrics()
                .batches_isolated
                .with_label_values(&[&self.topic])
                .inc();
            failpoint::hit("isolating");
            let (first, second) = records.split_at(records.len() / 2);
            let first = self.apply_isolating(first).await?;
            let second = self.apply_isolating(second).await?;
            Ok(match (first, second) {
                (Progress::Continue, Progress::Continue) => Progress::Continue,
                _ => Progress::Rewind,
            })
        })
    }

    /// Partitions whose first record in `records` not applied yet lies beyond the stored
    /// offset, with that offset, when the consumer has not yet been rewound to it for
    /// them. Remembers them, so that the same gap delivered again after the rewind is
    /// accepted.
    fn gaps(
        &self,
        records: &[&Record<P::Decoded>],
        stored: &HashMap<i32, i64>,
    ) -> HashMap<i32, i64> {
        // Per partition, the first record not applied yet.
        let mut first: HashMap<i32, (i64, i64)> = HashMap::new();
        for r in records {
            let (p, o) = (r.message.partition(), r.message.offset());
            // Nothing stored yet: the partition starts wherever the log starts.
            let Some(&next) = stored.get(&p) else {
                continue;
            };
            if o >= next {
                first.entry(p).or_insert((o, next));
            }
        }
        let mut rewound = self.rewound_gaps.lock().unwrap_or_else(|e| e.into_inner());
        let mut gaps = HashMap::new();
        for (p, (first, next)) in first {
            if first > next && rewound.get(&p) != Some(&next) {
                rewound.insert(p, next);
                gaps.insert(p, next);
            }
        }
        gaps
    }

    /// Writes `records` in one transaction: the projection's rows (unless `forced`
    /// refuses the one record), the refusals, the next offsets; dead letters are
    /// acknowledged before the commit.
    async fn write(
        &self,
        records: &[&Record<P::Decoded>],
        forced: Option<Forced>,
    ) -> Result<Progress, BatchError> {
        let started = Instant::now();
        let mut partitions: Vec<i32> = records
            .iter()
            .map(|r| r.message.partition())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        partitions.sort_unstable();

        let mut client = self.shared.store.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(crate::store::ctx("begin batch"))?;
        let stored = projection::lock_offsets(&tx, &self.topic, &partitions).await?;

        // Records below the stored offset were applied by an earlier (or concurrent) run.
        // Records beyond it, with the ones in between not delivered, are not applied
        // before the consumer has been rewound once to the stored offset: the consumer
        // follows the offsets this process committed, and Postgres may have lost the
        // last of those commits (they are asynchronous: a Postgres crash takes back the
        // last few batches, rows and offsets together). Delivered that way again after a
        // rewind, the offsets in between do not exist (compaction, transaction markers).
        let gaps = self.gaps(records, &stored);
        let mut behind: HashMap<i32, i64> = HashMap::new();
        let mut next_offsets: HashMap<i32, i64> = HashMap::new();
        let fresh: Vec<&Record<P::Decoded>> = records
            .iter()
            .copied()
            .filter(|r| {
                let (p, o) = (r.message.partition(), r.message.offset());
                let next = stored.get(&p).copied().unwrap_or(0);
                if o < next {
                    behind.insert(p, next);
                    false
                } else if gaps.contains_key(&p) {
                    false
                } else {
                    next_offsets.insert(p, o + 1);
                    true
                }
            })
            .collect();
        let mut bare = false;
        let refusals = if fresh.is_empty() {
            Vec::new()
        } else if let Some(forced) = forced {
            bare = forced.bare;
            // `records` is the one record; it is fresh, so it is `fresh[0]`.
            vec![forced.refusal]
        } else {
            self.projection.apply(&tx, &fresh).await?
        };
        let folded_at = started.elapsed();
        let mut written_at = folded_at;
        let rejected: Vec<(RejectedRecord, &OwnedMessage)> = refusals
            .iter()
            .filter_map(|r| {
                fresh.get(r.index).map(|rec| {
                    (
                        rejected_record(&self.topic, &rec.message, r, bare),
                        &rec.message,
                    )
                })
            })
            .collect();
        if !next_offsets.is_empty() {
            let rows: Vec<RejectedRecord> = rejected.iter().map(|(r, _)| r.clone()).collect();
            let channel = self
                .projection
                .notifies(&fresh, &refusals)
                .then(|| self.projection.channel());
            projection::finish_batch(&tx, &self.topic, &rows, &next_offsets, channel).await?;
            // Dead letters are acknowledged before the commit: a crash may repeat one,
            // never lose one.
            let pending: Vec<_> = rejected
                .iter()
                .map(|(r, source)| {
                    self.dlq.send(
                        &self.dlq_topic,
                        source.key(),
                        dlq_headers(source, r),
                        source.payload().unwrap_or_default(),
                    )
                })
                .collect();
            for p in pending {
                p.await?;
            }
            written_at = started.elapsed();
            failpoint::hit("before_commit");
            tx.commit()
                .await
                .map_err(crate::store::ctx("commit batch"))?;
            failpoint::hit("after_commit");
        }

        // Committed. Publish progress: in memory (lag), to Kafka (informational), metrics.
        {
            let mut next = self
                .shared
                .next_offsets
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            // Only partitions still assigned: one revoked meanwhile belongs to another
            // member now, which starts from Postgres.
            for (p, o) in &next_offsets {
                if let Some(current) = next.get_mut(p) {
                    *current = *o;
                }
            }
        }
        {
            let mut clocks = self
                .shared
                .lag_clocks
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for r in &fresh {
                if let Some(ms) = r.message.timestamp().to_millis() {
                    let clock = clocks.entry(r.message.partition()).or_default();
                    clock.last_applied_ms = Some(clock.last_applied_ms.map_or(ms, |t| t.max(ms)));
                }
            }
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in &next_offsets {
            let _ = tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*o));
        }
        if tpl.count() > 0
            && let Err(e) = self.consumer.store_offsets(&tpl).and_then(|()| {
                self.consumer
                    .commit(&tpl, rdkafka::consumer::CommitMode::Async)
            })
        {
            tracing::debug!(error = %e, "committing Kafka group offsets failed (informational only)");
        }
        tracing::debug!(
            topic = %self.topic,
            records = records.len(),
            fresh = fresh.len(),
            rejected = rejected.len(),
            apply_ms = folded_at.as_secs_f64() * 1e3,
            dlq_ms = (written_at - folded_at).as_secs_f64() * 1e3,
            commit_ms = (started.elapsed() - written_at).as_secs_f64() * 1e3,
            "batch applied"
        );
        let m = metrics();
        for (r, _) in &rejected {
            m.events_rejected.with_label_values(&[r.reason]).inc();
            m.dead_letters.with_label_values(&[r.reason]).inc();
            tracing::warn!(topic = %self.topic, partition = r.partition, offset = r.offset, reason = r.reason, message = %r.message, "record rejected and dead-lettered");
        }
        m.batch_size.observe(records.len() as f64);
        m.batch_duration.observe(started.elapsed().as_secs_f64());

        // This consumer was behind Postgres on some partitions: skip ahead.
        let skip: HashMap<i32, i64> = behind
            .into_iter()
            .filter(|(p, _)| !next_offsets.contains_key(p))
            .collect();
        if !gaps.is_empty() {
            tracing::warn!(topic = %self.topic, stored = ?gaps, "records delivered past the offsets stored in Postgres (it lost its last commits?); rewinding to them");
            let mut next = self
                .shared
                .next_offsets
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for (p, o) in &gaps {
                if let Some(current) = next.get_mut(p) {
                    *current = *o;
                }
            }
            return Ok(Progress::Rewind);
        }
        if skip.is_empty() {
            return Ok(Progress::Continue);
        }
        tracing::info!(?skip, "records already applied elsewhere; skipping ahead");
        let mut next = self
            .shared
            .next_offsets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (p, o) in skip {
            if let Some(current) = next.get_mut(&p) {
                *current = (*current).max(o);
            }
        }
        Ok(Progress::Rewind)
    }
}

fn header_str<'a>(message: &'a OwnedMessage, name: &str) -> Option<&'a str> {
    message.headers().and_then(|h| {
        h.iter()
            .filter(|h| h.key == name)
            .last()
            .and_then(|h| h.value.and_then(|v| std::str::from_utf8(v).ok()))
    })
}

/// What `rejected_events` keeps of a refused record: its coordinates, ids, headers,
/// key and value — or, `bare`, only its coordinates, key and value (bytes, which Postgres
/// always accepts).
fn rejected_record(
    topic: &str,
    message: &OwnedMessage,
    refusal: &Refusal,
    bare: bool,
) -> RejectedRecord {
    let header = |name| {
        (!bare)
            .then(|| header_str(message, name).map(str::to_string))
            .flatten()
    };
    let headers: Vec<Value> = message
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    Value::Array(vec![
                        Value::String(h.key.to_string()),
                        h.value
                            .map(|v| Value::String(String::from_utf8_lossy(v).into_owned()))
                            .unwrap_or(Value::Null),
                    ])
                })
                .collect()
        })
        .unwrap_or_default();
    RejectedRecord {
        topic: topic.to_string(),
        partition: message.partition(),
        offset: message.offset(),
        ce_id: header(events::header::ID),
        ce_type: header(events::header::TYPE),
        subject: header(events::header::SUBJECT),
        reason: refusal.reason,
        message: refusal.message.clone(),
        key: message.key().map(<[u8]>::to_vec),
        headers: Value::Array(if bare { Vec::new() } else { headers }),
        payload: message.payload().map(<[u8]>::to_vec),
    }
}

fn dlq_headers(message: &OwnedMessage, rejected: &RejectedRecord) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    if let Some(original) = message.headers() {
        for h in original.iter() {
            headers = headers.insert(Header {
                key: h.key,
                value: h.value,
            });
        }
    }
    let extra = [
        (dlq_header::REASON, rejected.reason.to_string()),
        (dlq_header::MESSAGE, rejected.message.clone()),
        (dlq_header::TOPIC, rejected.topic.clone()),
        (dlq_header::PARTITION, rejected.partition.to_string()),
        (dlq_header::OFFSET, rejected.offset.to_string()),
        (dlq_header::TIME, Utc::now().to_rfc3339()),
    ];
    for (k, v) in &extra {
        headers = headers.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    headers
}
