//! Reading a topic's records in order, between given offsets: what replay and audit
//! read the log with (no consumer group, nothing committed).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::Offset;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::types::RDKafkaErrorCode;

use super::{KafkaIoError, client_config};

/// A consumed record as the pure decoders of [`crate::events`] see it (no Kafka types).
pub fn raw_record<M: Message>(message: &M) -> crate::events::RawRecord<'_> {
    crate::events::RawRecord {
        key: message.key(),
        headers: message
            .headers()
            .map(|h| h.iter().map(|h| (h.key, h.value)).collect())
            .unwrap_or_default(),
        payload: message.payload(),
    }
}

/// The scanner's client context: a partition's end is how a scan knows it is done, not
/// an error worth logging (librdkafka also reports it as a global error).
struct Scanning;

impl ClientContext for Scanning {
    fn error(&self, error: KafkaError, reason: &str) {
        // librdkafka reports a partition's end both per partition and as a global error.
        let end = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        );
        if !end {
            tracing::warn!(error = %error, reason, "kafka scan");
        }
    }
}

impl ConsumerContext for Scanning {}

/// How long a scan may go without a record before it gives up (the broker is gone).
const STALL: Duration = Duration::from_secs(30);

/// Reads every record of `topic` whose offset is in `ranges` (partition → `[from, to)`),
/// each partition in offset order (partitions interleaved), handing each to `each`.
/// Offsets the log no longer has (compaction, transaction markers) are skipped. Blocking:
/// call it from a blocking thread. Returns how many records were read.
pub fn scan(
    brokers: &str,
    topic: &str,
    ranges: &HashMap<i32, (i64, i64)>,
    mut each: impl FnMut(&BorrowedMessage<'_>),
) -> Result<u64, KafkaIoError> {
    let unreachable = |source: KafkaError| KafkaIoError::Unreachable {
        brokers: brokers.to_string(),
        source,
    };
    let mut wanted: HashMap<i32, i64> = ranges
        .iter()
        .filter(|(_, (from, to))| from < to)
        .map(|(p, (_, to))| (*p, *to))
        .collect();
    if wanted.is_empty() {
        return Ok(0);
    }
    let consumer: BaseConsumer<Scanning> = client_config(brokers)
        .set("group.id", "tasklog-scan")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.queue.backoff.ms", "0")
        .set("queued.max.messages.kbytes", "262144")
        .set("fetch.max.bytes", "104857600")
        .set("max.partition.fetch.bytes", "10485760")
        .create_with_context(Scanning)
        .map_err(|source| KafkaIoError::Client {
            brokers: brokers.to_string(),
            source,
        })?;
    let mut tpl = TopicPartitionList::new();
    for (partition, (from, to)) in ranges {
        if from < to {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*from))
                .map_err(unreachable)?;
        }
    }
    consumer.assign(&tpl).map_err(unreachable)?;
    let mut read = 0u64;
    let mut last_progress = Instant::now();
    while !wanted.is_empty() {
        match consumer.poll(Duration::from_millis(200)) {
            None => {
                if last_progress.elapsed() > STALL {
                    return Err(KafkaIoError::Interrupted(format!(
                        "reading {topic}: no record for {} s with partitions {:?} unfinished",
                        STALL.as_secs(),
                        wanted.keys().collect::<Vec<_>>()
                    )));
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                last_progress = Instant::now();
                wanted.remove(&partition);
            }
            Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::OffsetOutOfRange))) => {
                return Err(KafkaIoError::Interrupted(format!(
                    "reading {topic}: an offset asked for is no longer on the log"
                )));
            }
            Some(Err(e)) => {
                if last_progress.elapsed() > STALL {
                    return Err(unreachable(e));
                }
            }
            Some(Ok(message)) => {
                last_progress = Instant::now();
                let partition = message.partition();
                let Some(&to) = wanted.get(&partition) else {
                    continue;
                };
                if message.offset() < to {
                    each(&message);
                    read += 1;
                }
                if message.offset() + 1 >= to {
                    wanted.remove(&partition);
                }
            }
        }
    }
    Ok(read)
}
