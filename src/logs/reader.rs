//! Reading task logs straight from Kafka.
//!
//! Records are fetched in aligned blocks of [`BLOCK`] offsets by pooled consumers
//! (assign + seek; no consumer group) and kept in a bounded LRU cache, so that forward
//! and backward paging with any page size touch Kafka about once per block. Lines are
//! filtered to the task's key; the caller bounds the scan with the log index.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Statistics};
use rdkafka::{Offset, TopicPartitionList};
use uuid::Uuid;

use super::{LogMeta, Stream, decode_meta};
use crate::kafka::client_config;

/// A pooled reader consumer.
type ReaderConsumer = BaseConsumer<ReaderContext>;

/// Client context of the reader's consumers: reaching the end of a partition is how
/// every read ends, not an error worth a log line (librdkafka also reports it as a
/// global error for consumers resting in the pool).
struct ReaderContext;

impl ClientContext for ReaderContext {
    fn stats(&self, _: Statistics) {}

    fn error(&self, error: KafkaError, reason: &str) {
        let end_of_partition = matches!(error, KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF);
        if !end_of_partition {
            tracing::warn!(%error, reason, "log reader: Kafka error");
        }
    }
}

impl ConsumerContext for ReaderContext {}

/// Offsets per cached block.
pub const BLOCK: i64 = 1024;

/// One record of the logs topic.
#[derive(Debug, Clone)]
pub struct LogRecord {
    /// Offset.
    pub offset: i64,
    /// Decoded headers (`None`: not a valid log record; skipped by readers).
    pub meta: Option<LogMeta>,
    /// The line's bytes.
    pub value: Vec<u8>,
}

#[derive(Debug)]
struct Block {
    records: Vec<LogRecord>,
    /// First offset not covered.
    end: i64,
    bytes: usize,
}

impl Block {
    fn new(records: Vec<LogRecord>, end: i64) -> Arc<Block> {
        let bytes = records.iter().map(|r| r.value.len() + 160).sum();
        Arc::new(Block {
            records,
            end,
            bytes,
        })
    }
}

/// Most blocks read in one consumer session.
const READ_AHEAD: i64 = 8;

/// Errors reading logs.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The offsets asked for were deleted by retention; `earliest` is the first kept.
    #[error("offset {offset} is no longer retained; the earliest is {earliest}")]
    Expired {
        /// Offset asked for.
        offset: i64,
        /// Earliest retained offset.
        earliest: i64,
    },
    /// Kafka failed.
    #[error("reading the logs topic failed: {0}")]
    Kafka(String),
}

/// What to return of the records in a range.
#[derive(Debug, Clone, Default)]
pub struct LineFilter {
    /// The task.
    pub task_id: Uuid,
    /// Only this attempt.
    pub attempt: Option<i32>,
    /// Only this stream.
    pub stream: Option<Stream>,
    /// Only lines numbered at least this (within `attempt`).
    pub from_line: Option<i64>,
}

impl LineFilter {
    /// Whether `record` is one of the lines asked for.
    pub fn matches(&self, record: &LogRecord) -> bool {
        let Some(m) = &record.meta else { return false };
        m.task_id == self.task_id
            && self.attempt.is_none_or(|a| a == m.attempt)
            && self.stream.is_none_or(|s| s == m.stream)
            && self.from_line.is_none_or(|k| m.line >= k)
    }
}

/// The part of a partition to scan: `[low, high)` minus an optional gap known (from the
/// index) to hold none of the task's lines.
#[derive(Debug, Clone, Copy)]
pub struct ScanRange {
    /// First offset that may hold a line.
    pub low: i64,
    /// End of the log (exclusive).
    pub high: i64,
    /// `[from, to)` to skip.
    pub skip: Option<(i64, i64)>,
}

/// Pages through task logs; shareable.
pub struct LogReader {
    brokers: String,
    topic: String,
    /// Consumers at rest, with when they were given back.
    idle: Mutex<Vec<(ReaderConsumer, Instant)>>,
    cache: Mutex<Cache>,
    /// Bounds the consumer sessions (and so the consumers and blocking threads) open
    /// at once: many readers at once queue here instead of opening one each.
    sessions: tokio::sync::Semaphore,
}

/// Most consumer sessions a reader runs at once.
pub const MAX_SESSIONS: usize = 8;

/// How long a consumer rests in the pool before it is closed (with its threads).
pub const IDLE_CONSUMER_TTL: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Cache {
    blocks: HashMap<(i32, i64), Arc<Block>>,
    order: VecDeque<(i32, i64)>,
    bytes: usize,
    limit: usize,
}

impl Cache {
    fn get(&self, key: &(i32, i64)) -> Option<Arc<Block>> {
        self.blocks.get(key).cloned()
    }

    fn put(&mut self, key: (i32, i64), block: Arc<Block>) {
        if let Some(old) = self.blocks.insert(key, block.clone()) {
            self.bytes -= old.bytes;
        } else {
            self.order.push_back(key);
        }
        self.bytes += block.bytes;
        while self.bytes > self.limit
            && let Some(old) = self.order.pop_front()
        {
            if let Some(b) = self.blocks.remove(&old) {
                self.bytes -= b.bytes;
            }
        }
    }
}

impl LogReader {
    /// A reader of `topic` keeping at most `cache_bytes` of records in memory.
    pub fn new(brokers: &str, topic: &str, cache_bytes: usize) -> LogReader {
        LogReader {
            brokers: brokers.to_string(),
            topic: topic.to_string(),
            idle: Mutex::new(Vec::new()),
            sessions: tokio::sync::Semaphore::new(MAX_SESSIONS),
            cache: Mutex::new(Cache {
                limit: cache_bytes,
                ..Cache::default()
            }),
        }
    }

    /// Forgets every cached block, so the next reads go to Kafka (what benchmarks of
    /// cold reads need).
    pub fn clear_cache(&self) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let limit = cache.limit;
        *cache = Cache {
            limit,
            ..Cache::default()
        };
    }

    /// The logs topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    fn consumer(&self) -> Result<ReaderConsumer, ReadError> {
        if let Some((c, _)) = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(c);
        }
        client_config(&self.brokers)
            .set("group.id", "tasklog-log-reader")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "error")
            .set("fetch.wait.max.ms", "10")
            // Prefetch about what a few blocks need, and fetch again as soon as the
            // queue drains: librdkafka's default backoff waits a whole second once the
            // queue is above its threshold, which made a 1M-line read take 15 s.
            .set("queued.min.messages", "10000")
            .set("fetch.queue.backoff.ms", "1")
            .create_with_context(ReaderContext)
            .map_err(|e| ReadError::Kafka(e.to_string()))
    }

    fn give_back(&self, consumer: ReaderConsumer) {
        let _ = consumer.unassign();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < 16 {
            idle.push((consumer, Instant::now()));
        }
    }

    /// Closes the pooled consumers that have rested longer than `ttl` (blocking: a
    /// consumer's close talks to the broker). Returns how many it closed.
    pub fn close_idle(&self, ttl: Duration) -> usize {
        let stale: Vec<ReaderConsumer> = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let (stale, fresh): (Vec<_>, Vec<_>) = idle
                .drain(..)
                .partition(|(_, since)| since.elapsed() >= ttl);
            *idle = fresh;
            stale.into_iter().map(|(c, _)| c).collect()
        };
        let n = stale.len();
        drop(stale);
        n
    }

    /// Consumers resting in the pool now.
    pub fn idle_consumers(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Closes rested consumers every [`IDLE_CONSUMER_TTL`] for as long as the reader
    /// lives, so that a burst of reads leaves no threads behind. Must be called inside
    /// a Tokio runtime.
    pub fn close_idle_in_background(self: &Arc<Self>) {
        let reader = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(IDLE_CONSUMER_TTL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(reader) = reader.upgrade() else {
                    return;
                };
                if reader.idle_consumers() > 0 {
                    let _ =
                        tokio::task::spawn_blocking(move || reader.close_idle(IDLE_CONSUMER_TTL))
                            .await;
                }
            }
        });
    }

    async fn session(&self) -> Result<tokio::sync::SemaphorePermit<'_>, ReadError> {
        self.sessions
            .acquire()
            .await
            .map_err(|e| ReadError::Kafka(e.to_string()))
    }

    /// Low and high watermarks of a partition.
    pub async fn watermarks(self: &Arc<Self>, partition: i32) -> Result<(i64, i64), ReadError> {
        let _session = self.session().await?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let consumer = this.consumer()?;
            let marks = consumer
                .fetch_watermarks(&this.topic, partition, Duration::from_secs(5))
                .map_err(|e| ReadError::Kafka(e.to_string()));
            this.give_back(consumer);
            marks
        })
        .await
        .map_err(|e| ReadError::Kafka(e.to_string()))?
    }

    /// Block `index` of a partition, from the cache or Kafka. On a miss, the `span - 1`
    /// blocks after it (at most [`READ_AHEAD`] in all; all of them when the block before
    /// is cached, as in a forward scan) are read in the same consumer session and cached
    /// too: a page of many blocks costs one session, not one each.
    async fn block(
        self: &Arc<Self>,
        partition: i32,
        index: i64,
        span: i64,
        high: i64,
        low: i64,
    ) -> Result<Arc<Block>, ReadError> {
        let start = index * BLOCK;
        let want_end = (start + BLOCK).min(high);
        let mut block = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(partition, index));
        // Fetch what is missing — the whole block, or the tail of a partial one — until
        // the block reaches `want_end` (a read can stop early on a stale end-of-partition).
        for _ in 0..5 {
            if let Some(b) = &block
                && b.end >= want_end
            {
                return Ok(b.clone());
            }
            let from = block.as_ref().map(|b| b.end).unwrap_or(start).max(low);
            let fetch_end = match &block {
                // The tail of a partial block: just that.
                Some(_) => want_end,
                None => {
                    // A forward scan that read the block before reads further ahead.
                    let sequential = index > 0
                        && self
                            .cache
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get(&(partition, index - 1))
                            .is_some();
                    let span = if sequential { READ_AHEAD } else { span };
                    (start + span.clamp(1, READ_AHEAD) * BLOCK)
                        .min(high)
                        .max(want_end)
                }
            };
            let _session = self.session().await?;
            let this = self.clone();
            let (mut fetched, covered) =
                tokio::task::spawn_blocking(move || this.fetch(partition, from, fetch_end))
                    .await
                    .map_err(|e| ReadError::Kafka(e.to_string()))??;
            // Records past this block go to the blocks after it (offsets ascend).
            let block_end = start + BLOCK;
            let split = fetched.partition_point(|r| r.offset < block_end);
            let mut later = fetched.split_off(split);
            let mut records = block.map(|b| b.records.clone()).unwrap_or_default();
            records.extend(fetched);
            let fresh = Block::new(records, covered.min(block_end).max(from));
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache.put((partition, index), fresh.clone());
            let mut next = index + 1;
            while covered > next * BLOCK {
                let end = (next + 1) * BLOCK;
                let rest = later.split_off(later.partition_point(|r| r.offset < end));
                let records = std::mem::replace(&mut later, rest);
                // Never replace a cached block with one that covers less.
                if cache
                    .get(&(partition, next))
                    .is_none_or(|cached| cached.end < covered.min(end))
                {
                    cache.put((partition, next), Block::new(records, covered.min(end)));
                }
                next += 1;
            }
            drop(cache);
            block = Some(fresh);
        }
        Err(ReadError::Kafka(format!(
            "could not read offsets up to {want_end} of partition {partition}"
        )))
    }

    /// Reads records `[from, to)` of a partition (blocking). Returns them and the first
    /// offset *not* covered: `to`, or less when the read stopped early. A block never
    /// claims offsets it did not read.
    fn fetch(
        &self,
        partition: i32,
        from: i64,
        to: i64,
    ) -> Result<(Vec<LogRecord>, i64), ReadError> {
        if from >= to {
            return Ok((Vec::new(), from));
        }
        let consumer = self.consumer()?;
        let result = (|| {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&self.topic, partition, Offset::Offset(from))
                .map_err(|e| ReadError::Kafka(e.to_string()))?;
            consumer
                .assign(&tpl)
                .map_err(|e| ReadError::Kafka(e.to_string()))?;
            let mut out = Vec::with_capacity((to - from) as usize);
            let mut covered = from;
            let deadline = Instant::now() + Duration::from_secs(30);
            while covered < to {
                if Instant::now() > deadline {
                    return Err(ReadError::Kafka(format!(
                        "timed out reading offsets {from}..{to} of partition {partition}"
                    )));
                }
                match consumer.poll(Duration::from_millis(500)) {
                    Some(Ok(m)) => {
                        // A pooled consumer may still hold records of an earlier assignment.
                        if m.partition() != partition
                            || m.topic() != self.topic
                            || m.offset() < covered
                        {
                            continue;
                        }
                        if m.offset() >= to {
                            covered = to;
                            break;
                        }
                        let headers: Vec<(&str, Option<&[u8]>)> = m
                            .headers()
                            .map(|h| h.iter().map(|h| (h.key, h.value)).collect())
                            .unwrap_or_default();
                        out.push(LogRecord {
                            offset: m.offset(),
                            meta: decode_meta(m.key(), &headers).ok(),
                            value: m.payload().unwrap_or_default().to_vec(),
                        });
                        covered = m.offset() + 1;
                    }
                    // End of the partition as the fetcher knows it (possibly stale): what
                    // was read so far is all this call covers.
                    Some(Err(KafkaError::PartitionEOF(p))) if p == partition && !out.is_empty() => {
                        break;
                    }
                    Some(Err(KafkaError::PartitionEOF(_))) => {}
                    Some(Err(e))
                        if e.rdkafka_error_code() == Some(RDKafkaErrorCode::OffsetOutOfRange) =>
                    {
                        return Err(ReadError::Expired {
                            offset: from,
                            earliest: -1,
                        });
                    }
                    Some(Err(e)) => return Err(ReadError::Kafka(e.to_string())),
                    None => {}
                }
            }
            Ok((out, covered))
        })();
        self.give_back(consumer);
        result
    }

    /// Up to `limit` matching lines from `start` toward newer offsets. Returns the lines
    /// and the offset to continue from.
    pub async fn forward(
        self: &Arc<Self>,
        partition: i32,
        start: i64,
        range: ScanRange,
        filter: &LineFilter,
        limit: usize,
        low_watermark: i64,
    ) -> Result<(Vec<LogRecord>, i64), ReadError> {
        let mut pos = start.max(range.low);
        let mut lines = Vec::new();
        'scan: while lines.len() < limit && pos < range.high {
            if let Some((a, b)) = range.skip
                && pos >= a
                && pos < b
            {
                pos = b;
                continue;
            }
            // Read the blocks this page needs (as far as lines map to offsets) in one
            // consumer session.
            let wanted = (pos % BLOCK + (limit - lines.len()) as i64 + BLOCK - 1) / BLOCK;
            let block = self
                .block(partition, pos / BLOCK, wanted, range.high, low_watermark)
                .await?;
            // Records are in offset order: start at `pos` directly.
            let from = block.records.partition_point(|r| r.offset < pos);
            for r in &block.records[from..] {
                if filter.matches(r) {
                    lines.push(r.clone());
                    if lines.len() == limit {
                        pos = r.offset + 1;
                        break 'scan;
                    }
                }
            }
            if block.end <= pos {
                break;
            }
            pos = block.end;
        }
        Ok((lines, pos.min(range.high.max(start))))
    }

    /// Up to `limit` matching lines before `before` (exclusive), oldest first. Returns
    /// the lines and the exclusive bound to continue backward from.
    pub async fn backward(
        self: &Arc<Self>,
        partition: i32,
        before: i64,
        range: ScanRange,
        filter: &LineFilter,
        limit: usize,
        low_watermark: i64,
    ) -> Result<(Vec<LogRecord>, i64), ReadError> {
        let mut pos = before.min(range.high);
        let mut lines = Vec::new();
        'scan: while lines.len() < limit && pos > range.low {
            if let Some((a, b)) = range.skip
                && pos > a
                && pos <= b
            {
                pos = a;
                continue;
            }
            let index = (pos - 1) / BLOCK;
            let block = self
                .block(partition, index, 1, range.high, low_watermark)
                .await?;
            let upto = block.records.partition_point(|r| r.offset < pos);
            for r in block.records[..upto]
                .iter()
                .rev()
                .take_while(|r| r.offset >= range.low)
            {
                if filter.matches(r) {
                    lines.push(r.clone());
                    if lines.len() == limit {
                        pos = r.offset;
                        break 'scan;
                    }
                }
            }
            pos = (index * BLOCK).max(range.low);
        }
        lines.reverse();
        Ok((lines, pos))
    }
}
