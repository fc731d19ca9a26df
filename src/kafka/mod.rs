//! Kafka I/O: topic names, client settings, the idempotent appender, topic creation,
//! watermarks, and Kafka's default (murmur2) partitioner.
//!
//! Everything here talks to a broker over a socket; the embedded development broker
//! lives in [`dev_broker`].

pub mod dev_broker;
pub mod producer;
pub mod scan;
pub mod security;

pub use scan::{raw_record, scan};
pub use security::{KafkaSecurity, KafkaSecurityError};

/// Headers added to a dead letter, beside the original record's own headers.
pub mod dlq_header {
    /// Reason code (`invalid_json`, `seq_conflict`, ...).
    pub const REASON: &str = "tasklog_dlq_reason";
    /// Human-readable detail.
    pub const MESSAGE: &str = "tasklog_dlq_message";
    /// Source topic.
    pub const TOPIC: &str = "tasklog_dlq_topic";
    /// Source partition.
    pub const PARTITION: &str = "tasklog_dlq_partition";
    /// Source offset.
    pub const OFFSET: &str = "tasklog_dlq_offset";
    /// When it was dead-lettered (RFC 3339).
    pub const TIME: &str = "tasklog_dlq_time";
}

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::types::RDKafkaErrorCode;

use crate::events::EncodedEvent;

/// Default broker list: the local Apache Kafka broker `scripts/kafka start` runs (also
/// where `tasklog dev-broker` listens by default).
pub const DEFAULT_BROKERS: &str = "127.0.0.1:9092";
/// Default number of partitions for topics tasklog creates.
pub const DEFAULT_PARTITIONS: i32 = 12;

/// Names of the topics tasklog uses, derived from one prefix (default `tasklog`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// The prefix every name starts with (default `tasklog`).
    pub prefix: String,
    /// Task events. Kept forever.
    pub events: String,
    /// Worker events (registered, heartbeat, draining, lost), keyed by worker id.
    /// Compacted: every heartbeat carries the worker's whole description, so the
    /// latest record of each worker is enough to rebuild the workers table.
    pub workers: String,
    /// Service events (created, scaled, stop_requested, stopped, failed), keyed by name.
    pub services: String,
    /// Auth events (token created, revoked), keyed by token name. Kept forever, not
    /// compacted: a revocation alone does not describe the token it ends.
    pub auth: String,
    /// Dead letters: records the projector could not apply, with the reason in headers.
    pub dlq: String,
    /// Task log lines, one record per line.
    pub logs: String,
    /// Retention of the logs topic (`retention.ms`).
    pub logs_retention_ms: i64,
    /// Replication factor of the topics tasklog creates (-1: the broker's
    /// `default.replication.factor`).
    pub replication_factor: i32,
    /// `min.insync.replicas` of the topics tasklog creates (None: the broker's default).
    /// With `acks=all`, an append is acknowledged only once this many replicas have it.
    pub min_insync_replicas: Option<i32>,
}

/// Default retention of the logs topic: 7 days.
pub const DEFAULT_LOGS_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;

impl Topics {
    /// Topics named `<prefix>.events`, `.workers`, `.services`, `.auth`, `.dlq` and `.logs`.
    pub fn with_prefix(prefix: &str) -> Topics {
        Topics {
            prefix: prefix.to_string(),
            events: format!("{prefix}.events"),
            workers: format!("{prefix}.workers"),
            services: format!("{prefix}.services"),
            auth: format!("{prefix}.auth"),
            dlq: format!("{prefix}.dlq"),
            logs: format!("{prefix}.logs"),
            logs_retention_ms: DEFAULT_LOGS_RETENTION_MS,
            replication_factor: -1,
            min_insync_replicas: None,
        }
    }

    /// All topics with the settings they are created with. The events topic is kept
    /// forever; the workers topic is compacted (every heartbeat carries the worker's
    /// whole description). The services topic is kept forever, not compacted: its
    /// `scaled` and `stop_requested` records are changes to a service, so the latest
    /// one alone does not describe it.
    pub fn all(&self) -> Vec<TopicSpec> {
        let spec = |name: &str, retention_ms: i64, compact: bool| TopicSpec {
            name: name.to_string(),
            retention_ms,
            compact,
            replication_factor: self.replication_factor,
            min_insync_replicas: self.min_insync_replicas,
        };
        vec![
            spec(&self.events, -1, false),
            spec(&self.workers, -1, true),
            spec(&self.services, -1, false),
            spec(&self.auth, -1, false),
            spec(&self.dlq, -1, false),
            spec(&self.logs, self.logs_retention_ms, false),
        ]
    }
}

/// A topic tasklog needs, and how to create it when missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// Topic name.
    pub name: String,
    /// `retention.ms` (-1: forever).
    pub retention_ms: i64,
    /// `cleanup.policy=compact` (keep the latest record per key).
    pub compact: bool,
    /// Replication factor (-1: the broker's default).
    pub replication_factor: i32,
    /// `min.insync.replicas` (None: the broker's default).
    pub min_insync_replicas: Option<i32>,
}

impl TopicSpec {
    /// A topic kept for `retention_ms` (-1: forever), not compacted, replicated as the
    /// broker's defaults say.
    pub fn plain(name: &str, retention_ms: i64) -> TopicSpec {
        TopicSpec {
            name: name.to_string(),
            retention_ms,
            compact: false,
            replication_factor: -1,
            min_insync_replicas: None,
        }
    }
}

/// Errors talking to Kafka, with context.
#[derive(Debug, thiserror::Error)]
pub enum KafkaIoError {
    /// A client could not be created (bad settings).
    #[error("cannot create a Kafka client for {brokers}: {source}")]
    Client {
        /// The broker list.
        brokers: String,
        /// The underlying error.
        source: KafkaError,
    },
    /// Metadata could not be fetched.
    #[error("cannot reach the Kafka brokers at {brokers}: {source}")]
    Unreachable {
        /// The broker list.
        brokers: String,
        /// The underlying error.
        source: KafkaError,
    },
    /// The brokers refused the connection: wrong credentials or TLS settings.
    #[error(
        "the Kafka brokers at {brokers} refused the connection: {reason} (check the TASKLOG_KAFKA_* security settings)"
    )]
    Refused {
        /// The broker list.
        brokers: String,
        /// What librdkafka said (authentication or TLS handshake failure; no secret).
        reason: String,
    },
    /// A blocking Kafka call did not finish (its thread panicked or the runtime shut down).
    #[error("a Kafka metadata call was interrupted: {0}")]
    Interrupted(String),
    /// A topic is missing and could not be created.
    #[error("topic {topic} does not exist and could not be created: {reason}")]
    TopicMissing {
        /// The topic.
        topic: String,
        /// Why creation failed.
        reason: String,
    },
}

/// Base client settings shared by producers and consumers, with the security settings
/// of the `TASKLOG_KAFKA_*` variables ([`KafkaSecurity::global`]) applied. Should those
/// be invalid (`tasklog` refuses to start then), the config is made unusable rather than
/// falling back to plaintext: creating a client from it fails.
pub fn client_config(brokers: &str) -> ClientConfig {
    let mut config = base_client_config(brokers);
    match KafkaSecurity::global() {
        Ok(security) => security.apply(&mut config),
        Err(_) => {
            config.set(
                "security.protocol",
                "invalid-TASKLOG_KAFKA-security-settings",
            );
        }
    }
    config
}

/// [`client_config`] with the given security settings instead of the environment's.
pub fn client_config_with(brokers: &str, security: &KafkaSecurity) -> ClientConfig {
    let mut config = base_client_config(brokers);
    security.apply(&mut config);
    config
}

fn base_client_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("client.id", "tasklog")
        .set("socket.keepalive.enable", "true")
        // Loopback brokers answer in microseconds; do not wait long before reconnecting.
        .set("reconnect.backoff.ms", "50")
        .set("reconnect.backoff.max.ms", "1000")
        .set("topic.metadata.refresh.interval.ms", "10000");
    config
}

/// A Kafka client (admin, consumer) with the base settings of [`client_config`].
fn client<C: rdkafka::config::FromClientConfig>(brokers: &str) -> Result<C, KafkaIoError> {
    client_config(brokers)
        .create()
        .map_err(|source| KafkaIoError::Client {
            brokers: brokers.to_string(),
            source,
        })
}

/// Runs a blocking metadata call off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KafkaIoError> + Send + 'static,
) -> Result<T, KafkaIoError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(KafkaIoError::Interrupted(e.to_string())))
}

/// Where an appended record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Appended {
    /// Partition.
    pub partition: i32,
    /// Offset within the partition.
    pub offset: i64,
}

/// Why an append was not acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    /// The broker did not acknowledge within the append timeout. The record may or may
    /// not be on the log; a retry with the same idempotency key is safe.
    #[error("the Kafka broker did not acknowledge the append within {0:?}: {1}")]
    Unavailable(Duration, String),
    /// The broker refused the record.
    #[error("the Kafka broker refused the record: {0}")]
    Refused(String),
}

/// Settings of an [`Appender`].
#[derive(Debug, Clone)]
pub struct AppenderOptions {
    /// Broker list.
    pub brokers: String,
    /// How long an append may take before it counts as failed (`message.timeout.ms`).
    pub timeout: Duration,
    /// `linger.ms`: how long the producer waits to fill a batch.
    pub linger: Duration,
}

impl AppenderOptions {
    /// Defaults: 10 s timeout, 1 ms linger.
    pub fn new(brokers: &str) -> AppenderOptions {
        AppenderOptions {
            brokers: brokers.to_string(),
            timeout: Duration::from_secs(10),
            linger: Duration::from_millis(1),
        }
    }
}

/// The producer settings used for every append (also by the benchmark's raw baseline).
pub fn producer_config(options: &AppenderOptions) -> ClientConfig {
    let mut config = client_config(&options.brokers);
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", options.linger.as_millis().to_string())
        .set(
            "message.timeout.ms",
            options.timeout.as_millis().max(1).to_string(),
        )
        .set("socket.connection.setup.timeout.ms", "5000")
        .set("queue.buffering.max.messages", "1000000")
        // Batches compress well (repeated headers and keys). It also matters to the
        // embedded broker, which keeps at most 5 MiB of batches per partition.
        .set("compression.type", "lz4")
        // Same partition for the same key as Java clients and Kafka Streams.
        .set("partitioner", "murmur2_random");
    config
}

/// Appends records through one idempotent producer (`enable.idempotence=true`,
/// `acks=all`) and reports where each one landed, only after the broker's ack.
#[derive(Clone)]
pub struct Appender {
    producer: producer::AckProducer,
    timeout: Duration,
}

impl Appender {
    /// Creates the producer. It connects lazily.
    pub fn new(options: &AppenderOptions) -> Result<Appender, KafkaIoError> {
        let producer =
            producer::AckProducer::create(&producer_config(options)).map_err(|source| {
                KafkaIoError::Client {
                    brokers: options.brokers.clone(),
                    source,
                }
            })?;
        Ok(Appender {
            producer,
            timeout: options.timeout,
        })
    }

    /// Appends one event to `topic`.
    pub async fn append(&self, topic: &str, event: &EncodedEvent) -> Result<Appended, AppendError> {
        self.append_all(topic, std::slice::from_ref(event))
            .await
            .pop()
            .unwrap_or_else(|| Err(AppendError::Refused("nothing was sent".into())))
    }

    /// Appends events in order (records with the same key keep their order) and waits
    /// for every acknowledgement. One result per event, in the same order.
    pub async fn append_all(
        &self,
        topic: &str,
        events: &[EncodedEvent],
    ) -> Vec<Result<Appended, AppendError>> {
        let pending: Vec<_> = events
            .iter()
            .map(|e| self.send(topic, Some(e.key.as_bytes()), event_headers(e), &e.payload))
            .collect();
        let mut results = Vec::with_capacity(pending.len());
        for p in pending {
            results.push(p.await);
        }
        results
    }

    /// Sends one record; the returned future resolves when the broker acknowledges it.
    /// Records sent one after another with the same key keep their order.
    pub fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        headers: OwnedHeaders,
        payload: &[u8],
    ) -> impl Future<Output = Result<Appended, AppendError>> + Send + 'static {
        let timeout = self.timeout;
        let queued = self.producer.send(topic, key, headers, payload, timeout);
        async move {
            let delivery = queued.map_err(|e| classify(timeout, e))?;
            // librdkafka enforces message.timeout.ms itself; the outer timeout only
            // guards against a delivery report that never comes.
            match tokio::time::timeout(timeout + Duration::from_secs(2), delivery).await {
                Err(_) => Err(AppendError::Unavailable(
                    timeout,
                    "no delivery report".into(),
                )),
                Ok(Err(_cancelled)) => Err(AppendError::Unavailable(
                    timeout,
                    "the producer was shut down".into(),
                )),
                Ok(Ok(Ok((partition, offset)))) => Ok(Appended { partition, offset }),
                Ok(Ok(Err(e))) => Err(classify(timeout, e)),
            }
        }
    }

    /// Waits until everything queued is acknowledged (or the timeout passes).
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }
}

/// The CloudEvents headers of an encoded event.
pub fn event_headers(event: &EncodedEvent) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(event.headers.len());
    for (k, v) in &event.headers {
        headers = headers.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    headers
}

fn classify(timeout: Duration, e: KafkaError) -> AppendError {
    match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::MessageTimedOut
            | RDKafkaErrorCode::QueueFull
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::NetworkException
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::NotEnoughReplicas
            | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
            | RDKafkaErrorCode::LeaderNotAvailable
            | RDKafkaErrorCode::NotLeaderForPartition,
        ) => AppendError::Unavailable(timeout, e.to_string()),
        _ => AppendError::Refused(e.to_string()),
    }
}

/// Makes sure every topic exists: missing ones are created with `partitions`
/// partitions through the admin API. A broker that cannot create topics (the embedded
/// mock) must have them created up front, as `tasklog dev-broker` does.
pub async fn ensure_topics(
    brokers: &str,
    topics: &[TopicSpec],
    partitions: i32,
) -> Result<(), KafkaIoError> {
    let existing = list_topics(brokers).await?;
    let missing: Vec<&TopicSpec> = topics
        .iter()
        .filter(|t| !existing.iter().any(|(name, _)| *name == t.name))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = client(brokers)?;
    let retention: Vec<String> = missing.iter().map(|t| t.retention_ms.to_string()).collect();
    let min_isr: Vec<Option<String>> = missing
        .iter()
        .map(|t| t.min_insync_replicas.map(|n| n.to_string()))
        .collect();
    let new_topics: Vec<NewTopic<'_>> = missing
        .iter()
        .zip(&retention)
        .zip(&min_isr)
        .map(|((t, r), isr)| {
            let topic = NewTopic::new(
                &t.name,
                partitions,
                TopicReplication::Fixed(t.replication_factor),
            )
            .set("retention.ms", r)
            .set(
                "cleanup.policy",
                if t.compact { "compact" } else { "delete" },
            );
            match isr {
                Some(isr) => topic.set("min.insync.replicas", isr),
                None => topic,
            }
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(new_topics.iter(), &options)
        .await
        .map_err(|e| KafkaIoError::TopicMissing {
            topic: missing[0].name.clone(),
            reason: e.to_string(),
        })?;
    for result in results {
        if let Err((topic, code)) = result
            && code != RDKafkaErrorCode::TopicAlreadyExists
        {
            return Err(KafkaIoError::TopicMissing {
                topic,
                reason: code.to_string(),
            });
        }
    }
    // Kafka answers CreateTopics before every partition has a leader; until then
    // metadata, watermarks and produce requests fail. Wait for the leaders.
    let names: Vec<String> = missing.iter().map(|t| t.name.clone()).collect();
    wait_for_leaders(brokers, &names, Duration::from_secs(30)).await
}

/// Waits until every partition of `topics` has a leader.
async fn wait_for_leaders(
    brokers: &str,
    topics: &[String],
    timeout: Duration,
) -> Result<(), KafkaIoError> {
    let brokers = brokers.to_string();
    let topics = topics.to_vec();
    blocking(move || {
        let consumer: BaseConsumer = client(&brokers)?;
        let deadline = std::time::Instant::now() + timeout;
        let mut waiting_for = topics.clone();
        while !waiting_for.is_empty() {
            waiting_for.retain(|topic| {
                let Ok(metadata) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))
                else {
                    return true;
                };
                !metadata.topics().first().is_some_and(|t| {
                    t.error().is_none()
                        && !t.partitions().is_empty()
                        && t.partitions()
                            .iter()
                            .all(|p| p.error().is_none() && p.leader() >= 0)
                })
            });
            if waiting_for.is_empty() {
                break;
            }
            if std::time::Instant::now() >= deadline {
                return Err(KafkaIoError::TopicMissing {
                    topic: waiting_for[0].clone(),
                    reason: format!("its partitions have no leader after {timeout:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    })
    .await
}

/// Deletes topics (those that do not exist are skipped). Used by benchmarks and tests
/// to leave a shared cluster as they found it.
pub async fn delete_topics(brokers: &str, names: &[String]) -> Result<(), KafkaIoError> {
    let existing = list_topics(brokers).await?;
    let names: Vec<&str> = names
        .iter()
        .filter(|n| existing.iter().any(|(e, _)| e == *n))
        .map(String::as_str)
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = client(brokers)?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    admin
        .delete_topics(&names, &options)
        .await
        .map_err(|e| KafkaIoError::TopicMissing {
            topic: names[0].to_string(),
            reason: format!("cannot delete: {e}"),
        })?;
    Ok(())
}

/// Lists topics and their partition counts. Never auto-creates a topic.
pub async fn list_topics(brokers: &str) -> Result<Vec<(String, i32)>, KafkaIoError> {
    let brokers = brokers.to_string();
    blocking(move || {
        // Every role's first call to the brokers: a refused password or certificate is
        // reported as such (librdkafka says so only in its log).
        let consumer: BaseConsumer<security::RefusalRecorder> = client_config(&brokers)
            .create_with_context(security::RefusalRecorder::default())
            .map_err(|source| KafkaIoError::Client {
                brokers: brokers.clone(),
                source,
            })?;
        let metadata = consumer
            .fetch_metadata(None, Duration::from_secs(5))
            .map_err(|source| match refusal(&consumer) {
                Some(reason) => KafkaIoError::Refused {
                    brokers: brokers.clone(),
                    reason,
                },
                None => KafkaIoError::Unreachable {
                    brokers: brokers.clone(),
                    source,
                },
            })?;
        Ok(metadata
            .topics()
            .iter()
            .map(|t| (t.name().to_string(), t.partitions().len() as i32))
            .collect())
    })
    .await
}

/// Why the brokers refused `consumer`'s connection, if they did: its log and error events
/// are served (they wait on its queue) for up to a second until one says so.
fn refusal(consumer: &BaseConsumer<security::RefusalRecorder>) -> Option<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        if let Some(reason) = consumer.context().refusal() {
            return Some(reason);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        // No subscription: polling only serves the client's events.
        let _ = consumer.poll(Duration::from_millis(50));
    }
}

/// `fetch.wait.max.ms` for a consumer that waits at the log's end (a projector, the
/// log-follow tail) against `brokers`. Kafka answers such a long poll as soon as a
/// record arrives, so a long wait costs no latency and saves ~100 empty fetches a
/// second per idle consumer. librdkafka's mock cluster (`--dev-broker`) instead holds
/// every fetch that finds nothing for the whole wait: against it (told by its cluster
/// id) the wait is short. Asked of the cluster once per `brokers` and remembered; while
/// it does not answer, the long wait is used and it is asked again next time.
pub async fn tail_fetch_wait_ms(brokers: &str) -> &'static str {
    const LONG: &str = "500";
    const SHORT: &str = "10";
    static KNOWN: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, bool>>> =
        std::sync::OnceLock::new();
    let known = KNOWN.get_or_init(Default::default);
    let remembered = known.lock().ok().and_then(|k| k.get(brokers).copied());
    let is_mock = match remembered {
        Some(is_mock) => is_mock,
        None => {
            let asked = brokers.to_string();
            let cluster_id = blocking(move || {
                let consumer: BaseConsumer = client(&asked)?;
                Ok(consumer.client().fetch_cluster_id(Duration::from_secs(5)))
            })
            .await;
            match cluster_id {
                Ok(Some(id)) => {
                    let is_mock = id.starts_with("mockCluster");
                    if let Ok(mut k) = known.lock() {
                        k.insert(brokers.to_string(), is_mock);
                    }
                    is_mock
                }
                _ => false,
            }
        }
    };
    if is_mock { SHORT } else { LONG }
}

/// Low and high watermarks of every partition of `topic`, indexed by partition.
pub async fn watermarks(brokers: &str, topic: &str) -> Result<Vec<(i64, i64)>, KafkaIoError> {
    let brokers = brokers.to_string();
    let topic = topic.to_string();
    blocking(move || {
        let unreachable = |source| KafkaIoError::Unreachable {
            brokers: brokers.clone(),
            source,
        };
        let consumer: BaseConsumer = client(&brokers)?;
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(5))
            .map_err(unreachable)?;
        let partitions = metadata
            .topics()
            .first()
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        // A partition between leaders (a broker restarting, a topic just created)
        // answers NotLeaderForPartition for a moment: ask again for up to 10 s.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        (0..partitions as i32)
            .map(|p| {
                loop {
                    match consumer.fetch_watermarks(&topic, p, Duration::from_secs(5)) {
                        Err(e)
                            if std::time::Instant::now() < deadline
                                && matches!(
                                    e.rdkafka_error_code(),
                                    Some(
                                        RDKafkaErrorCode::NotLeaderForPartition
                                            | RDKafkaErrorCode::LeaderNotAvailable
                                            | RDKafkaErrorCode::UnknownTopicOrPartition
                                    )
                                ) =>
                        {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        other => break other.map_err(unreachable),
                    }
                }
            })
            .collect()
    })
    .await
}

/// Reads where partitions end (their high watermarks: the offset the next record will
/// get) over one long-lived connection, for read-your-writes checks.
#[derive(Clone)]
pub struct PartitionEnds {
    consumer: std::sync::Arc<BaseConsumer>,
    brokers: String,
    /// Bounds the asks in flight (each holds a blocking thread while the broker
    /// answers): a burst of reads queues here rather than growing the thread pool.
    in_flight: std::sync::Arc<tokio::sync::Semaphore>,
}

impl PartitionEnds {
    /// A reader of partition ends on `brokers` (connects lazily).
    pub fn new(brokers: &str) -> Result<PartitionEnds, KafkaIoError> {
        Ok(PartitionEnds {
            consumer: std::sync::Arc::new(client(brokers)?),
            brokers: brokers.to_string(),
            in_flight: std::sync::Arc::new(tokio::sync::Semaphore::new(Self::MAX_IN_FLIGHT)),
        })
    }

    /// Most asks in flight at once.
    pub const MAX_IN_FLIGHT: usize = 16;

    /// The high watermark of one partition, asked of its leader now. A partition whose
    /// leader is moving or not known yet (a topic just created, a broker restarting)
    /// answers with an error for a moment: asked again, with a short backoff, for up to
    /// [`PartitionEnds::RETRY_FOR`].
    pub async fn high_watermark(&self, topic: &str, partition: i32) -> Result<i64, KafkaIoError> {
        let give_up = tokio::time::Instant::now() + Self::RETRY_FOR;
        let mut backoff = Duration::from_millis(20);
        loop {
            let consumer = self.consumer.clone();
            let brokers = self.brokers.clone();
            let name = topic.to_string();
            // Taken after the call began: the answer is still the end as of now or later.
            let _permit = self.in_flight.acquire().await.ok();
            let asked = blocking(move || {
                consumer
                    .fetch_watermarks(&name, partition, Duration::from_secs(5))
                    .map(|(_, high)| high)
                    .map_err(|source| KafkaIoError::Unreachable { brokers, source })
            })
            .await;
            match asked {
                Err(e) if tokio::time::Instant::now() + backoff < give_up => {
                    tracing::debug!(error = %e, topic, partition, "partition end: asking again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                other => return other,
            }
        }
    }

    /// How long [`PartitionEnds::high_watermark`] keeps asking through errors.
    pub const RETRY_FOR: Duration = Duration::from_secs(3);
}

/// Kafka's murmur2 hash, as in the Java client's `Utils.murmur2`.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's default partitioner (and tasklog's producers, which use
/// `murmur2_random`) choose for `key` among `partitions`.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    if partitions <= 0 {
        return 0;
    }
    ((murmur2(key) as u32 & 0x7fff_ffff) % partitions as u32) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_the_java_client() {
        // Vectors from Kafka's UtilsTest.testMurmur2.
        assert_eq!(murmur2(b"21"), -973_932_308);
        assert_eq!(murmur2(b"foobar"), -790_332_482);
        assert_eq!(murmur2(b"a-little-bit-long-string"), -985_981_536);
        assert_eq!(murmur2(b"a-little-bit-longer-string"), -1_486_304_829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"),
            -58_897_971
        );
        assert_eq!(murmur2(b"abc"), 479_470_107);
    }

    #[test]
    fn partitions_are_in_range_and_stable() {
        for i in 0..1000 {
            let key = format!("task-{i}");
            let p = partition_for_key(key.as_bytes(), 12);
            assert!((0..12).contains(&p));
            assert_eq!(p, partition_for_key(key.as_bytes(), 12));
        }
        assert_eq!(partition_for_key(b"x", 0), 0);
    }

    #[test]
    fn topic_names_follow_the_prefix() {
        let t = Topics::with_prefix("t42");
        assert_eq!(t.events, "t42.events");
        assert_eq!(t.dlq, "t42.dlq");
        assert_eq!(t.logs, "t42.logs");
        assert_eq!(t.workers, "t42.workers");
        assert_eq!(t.auth, "t42.auth");
        assert_eq!(t.all().len(), 6);
    }
}
