//! A producer whose delivery reports complete futures, served by one thread that
//! sleeps until librdkafka has something to report.
//!
//! rdkafka's `FutureProducer` serves its reports in 100 ms slices and, because each
//! slice's remaining time is truncated to whole milliseconds, spins through the last
//! millisecond of every slice: ~0.8% of a core per producer that has nothing to send
//! (measured on `tasklog up`, which has eight). Reports wake the thread at once either
//! way, so this one waits in [`AckProducer::SLICE`]-long slices instead.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::oneshot;

/// Where an acknowledged record landed: partition and offset.
pub type Delivered = (i32, i64);

/// The answer to one send: where the record landed, or why it was not stored.
pub type Delivery = oneshot::Receiver<Result<Delivered, KafkaError>>;

/// Hands each delivery report to the future of its record.
pub struct AckContext;

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = Box<oneshot::Sender<Result<Delivered, KafkaError>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, answer: Self::DeliveryOpaque) {
        let outcome = match result {
            Ok(message) => Ok((message.partition(), message.offset())),
            Err((error, _)) => Err(error.clone()),
        };
        // The caller may have stopped waiting; that is its business.
        let _ = answer.send(outcome);
    }
}

/// Producers of this process whose serving thread has not ended yet.
static SERVING: (std::sync::Mutex<usize>, std::sync::Condvar) =
    (std::sync::Mutex::new(0), std::sync::Condvar::new());

/// Waits, up to `timeout`, until no [`AckProducer`] of this process is left: each one
/// closes its connections on its own thread within a slice of its last clone being
/// dropped. An embedded broker waits on this before it goes away, so that no client sees
/// it vanish; a producer still in use when it does makes it wait the whole timeout.
/// Returns whether none was left.
pub fn wait_closed(timeout: Duration) -> bool {
    let (count, closed) = &SERVING;
    let Ok(guard) = count.lock() else {
        return false;
    };
    closed
        .wait_timeout_while(guard, timeout, |n| *n > 0)
        .map(|(n, _)| *n == 0)
        .unwrap_or(false)
}

/// An idempotent-capable producer with one report-serving thread. Cloning shares it;
/// the thread ends (and the producer is dropped, purging what is still queued) within
/// one slice of the last clone going away ([`wait_closed`] waits for that).
#[derive(Clone)]
pub struct AckProducer {
    shared: Arc<Shared>,
}

struct Shared {
    producer: Arc<BaseProducer<AckContext>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl AckProducer {
    /// Longest wait of the serving thread between two looks at its stop flag.
    pub const SLICE: Duration = Duration::from_secs(1);

    /// Creates the producer (it connects lazily) and starts its serving thread.
    pub fn create(config: &ClientConfig) -> KafkaResult<AckProducer> {
        let producer: Arc<BaseProducer<AckContext>> =
            Arc::new(config.create_with_context(AckContext)?);
        let stop = Arc::new(AtomicBool::new(false));
        let serving = (producer.clone(), stop.clone());
        let (count, closed) = &SERVING;
        if let Ok(mut n) = count.lock() {
            *n += 1;
        }
        let started = std::thread::Builder::new()
            .name("tasklog-acks".into())
            .spawn(move || {
                let (producer, stop) = serving;
                while !stop.load(Ordering::Relaxed) {
                    producer.poll(Self::SLICE);
                }
                // The last reference: purges what is queued and closes the connections.
                drop(producer);
                if let Ok(mut n) = count.lock() {
                    *n -= 1;
                }
                closed.notify_all();
            });
        if let Err(e) = started {
            if let Ok(mut n) = count.lock() {
                *n -= 1;
            }
            return Err(KafkaError::ClientCreation(format!(
                "no thread for acks: {e}"
            )));
        }
        Ok(AckProducer {
            shared: Arc::new(Shared { producer, stop }),
        })
    }

    /// Queues one record. The returned receiver answers once the broker acknowledged
    /// it (or it failed for good). While librdkafka's queue is full this waits for it
    /// to drain, for up to `queue_wait`.
    pub fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        headers: OwnedHeaders,
        payload: &[u8],
        queue_wait: Duration,
    ) -> Result<Delivery, KafkaError> {
        let (answer, delivery) = oneshot::channel();
        let mut record = BaseRecord::with_opaque_to(topic, Box::new(answer))
            .payload(payload)
            .headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        let deadline = std::time::Instant::now() + queue_wait;
        loop {
            match self.shared.producer.send(record) {
                Ok(()) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                    if std::time::Instant::now() < deadline =>
                {
                    // Let librdkafka drain its queue a little.
                    self.shared.producer.poll(Duration::from_millis(5));
                    record = r;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// Waits until everything queued is acknowledged (or the timeout passes).
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.shared.producer.flush(timeout)
    }
}
