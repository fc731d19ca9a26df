//! Following logs: one tail per partition, shared by every follower in the process.
//!
//! A follower that has read a task's log to its end registers with the [`FollowHub`]
//! for the task's partition. The hub keeps one consumer (its own, no consumer group) for
//! every partition someone follows, positioned where the first follower stood, and hands
//! each new record to the followers of its task through a bounded channel. Followers cost
//! a map entry and a channel, not a consumer or a thread each.
//!
//! - **Catch-up stays with the reader.** [`Follower::from`] says from which offset the
//!   hub delivers; a follower whose cursor is before it reads the gap through the
//!   [`LogReader`](super::reader::LogReader) (block cache), and drops what it gets twice by
//!   offset.
//! - **Slow followers are cut off, not buffered.** When a follower's channel is full the
//!   hub drops it and [`Follower::overflowed`] says so: it resumes from its own cursor
//!   with catch-up reads, and registers again once caught up. Memory per follower is
//!   bounded by [`FollowOptions::buffer`] records.
//! - **Nothing follows, nothing runs.** A partition without followers is released after
//!   [`FollowOptions::idle_close`]; when none is left the consumer is closed and its
//!   threads end.
//! - **A bound**: at most [`FollowOptions::max_followers`] followers per process;
//!   [`FollowHub::follow`] refuses more with [`FollowError::TooMany`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{Notify, mpsc};
use uuid::Uuid;

use super::decode_meta;
use super::reader::LogRecord;
use crate::kafka::client_config;

/// Limits of a hub.
#[derive(Debug, Clone)]
pub struct FollowOptions {
    /// Most followers at once (the API answers 503 `too_many_followers` past it).
    pub max_followers: usize,
    /// Records held for one follower that has not taken them yet; past it the follower
    /// is cut off and resumes from its cursor.
    pub buffer: usize,
    /// How long a partition nobody follows stays assigned (and the consumer stays open
    /// once no partition is), so that a follower coming back soon finds it warm.
    pub idle_close: Duration,
}

impl Default for FollowOptions {
    fn default() -> FollowOptions {
        FollowOptions {
            max_followers: DEFAULT_MAX_FOLLOWERS,
            buffer: 1024,
            idle_close: Duration::from_secs(3),
        }
    }
}

/// Default of [`FollowOptions::max_followers`] (`TASKLOG_MAX_FOLLOWERS`).
pub const DEFAULT_MAX_FOLLOWERS: usize = 10_000;

/// Why a follower was not registered.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// The process already has as many followers as it allows.
    #[error("this API server already has {limit} log followers (its limit); try again later")]
    TooMany {
        /// The limit.
        limit: usize,
    },
}

/// The followers of one partition and how far the tail has handed records out.
struct PartitionFollowers {
    /// Every record below this offset has been handed to the followers registered at
    /// the time; the tail continues here.
    position: i64,
    /// Whether the tail's consumer has been told about this partition at `position`.
    assigned: bool,
    /// By task.
    followers: HashMap<Uuid, Vec<Slot>>,
    /// Since when it has had no follower.
    idle_since: Option<Instant>,
}

struct Slot {
    id: u64,
    tx: mpsc::Sender<LogRecord>,
    overflowed: Arc<AtomicBool>,
}

#[derive(Default)]
struct HubState {
    partitions: HashMap<i32, PartitionFollowers>,
    /// Whether a tail task runs.
    tail_running: bool,
    /// Changed when a partition is added or must be re-positioned.
    assignment_dirty: bool,
}

struct Shared {
    brokers: String,
    topic: String,
    options: FollowOptions,
    state: Mutex<HubState>,
    wake: Notify,
    followers: AtomicUsize,
    next_id: AtomicU64,
    /// Tail consumers ever opened (a benchmark and the tests read it).
    tails_opened: AtomicU64,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The per-process hub of log followers; cheap to clone.
#[derive(Clone)]
pub struct FollowHub {
    shared: Arc<Shared>,
}

/// One registered follower of one task. Dropping it unregisters.
pub struct Follower {
    shared: Arc<Shared>,
    id: u64,
    partition: i32,
    task_id: Uuid,
    rx: mpsc::Receiver<LogRecord>,
    overflowed: Arc<AtomicBool>,
    from: i64,
}

impl FollowHub {
    /// A hub reading `topic` on `brokers`; nothing is opened until someone follows.
    pub fn new(brokers: &str, topic: &str, options: FollowOptions) -> FollowHub {
        FollowHub {
            shared: Arc::new(Shared {
                brokers: brokers.to_string(),
                topic: topic.to_string(),
                options,
                state: Mutex::new(HubState::default()),
                wake: Notify::new(),
                followers: AtomicUsize::new(0),
                next_id: AtomicU64::new(1),
                tails_opened: AtomicU64::new(0),
            }),
        }
    }

    /// Followers registered now.
    pub fn followers(&self) -> usize {
        self.shared.followers.load(Ordering::Relaxed)
    }

    /// Partitions the tail reads now (followed, or idle and not yet released).
    pub fn partitions(&self) -> usize {
        self.shared.lock().partitions.len()
    }

    /// Whether a tail consumer is open.
    pub fn tail_open(&self) -> bool {
        self.shared.lock().tail_running
    }

    /// The limit on followers.
    pub fn max_followers(&self) -> usize {
        self.shared.options.max_followers
    }

    /// Registers a follower of `task_id`, whose lines are on `partition`, that has read
    /// everything before `from`. Records of the task at or after [`Follower::from`]
    /// (which may be before or after `from`) will be handed to it, in offset order.
    /// Must be called inside a Tokio runtime.
    pub fn follow(
        &self,
        partition: i32,
        task_id: Uuid,
        from: i64,
    ) -> Result<Follower, FollowError> {
        let limit = self.shared.options.max_followers;
        if self.shared.followers.fetch_add(1, Ordering::AcqRel) >= limit {
            self.shared.followers.fetch_sub(1, Ordering::AcqRel);
            return Err(FollowError::TooMany { limit });
        }
        crate::metrics::metrics().log_followers.inc();
        let (tx, rx) = mpsc::channel(self.shared.options.buffer.max(1));
        let overflowed = Arc::new(AtomicBool::new(false));
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let mut state = self.shared.lock();
        let entry = state
            .partitions
            .entry(partition)
            .or_insert_with(|| PartitionFollowers {
                position: from,
                assigned: false,
                followers: HashMap::new(),
                idle_since: None,
            });
        // Not handed out yet: the tail can still start earlier, for this follower.
        let mut dirty = !entry.assigned;
        if !entry.assigned && from < entry.position {
            entry.position = from;
        }
        entry.idle_since = None;
        let delivered_from = entry.position;
        entry.followers.entry(task_id).or_default().push(Slot {
            id,
            tx,
            overflowed: overflowed.clone(),
        });
        if !state.tail_running {
            state.tail_running = true;
            dirty = true;
            self.shared.tails_opened.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(tail(self.shared.clone()));
        }
        if dirty {
            state.assignment_dirty = true;
        }
        drop(state);
        self.shared.wake.notify_one();
        Ok(Follower {
            shared: self.shared.clone(),
            id,
            partition,
            task_id,
            rx,
            overflowed,
            from: delivered_from,
        })
    }
}

impl Follower {
    /// Every record of the task at or after this offset reaches this follower (until it
    /// is cut off): what is before it and after the follower's cursor is read from the log.
    pub fn from(&self) -> i64 {
        self.from
    }

    /// The next record of the task, in offset order. `None` when the follower was cut
    /// off for being slow ([`Follower::overflowed`]) or the hub stopped.
    pub async fn next(&mut self) -> Option<LogRecord> {
        self.rx.recv().await
    }

    /// Whether the hub cut this follower off because it did not keep up.
    pub fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.shared.followers.fetch_sub(1, Ordering::AcqRel);
        crate::metrics::metrics().log_followers.dec();
        let mut state = self.shared.lock();
        if let Some(p) = state.partitions.get_mut(&self.partition) {
            if let Some(slots) = p.followers.get_mut(&self.task_id) {
                slots.retain(|s| s.id != self.id);
                if slots.is_empty() {
                    p.followers.remove(&self.task_id);
                }
            }
            if p.followers.is_empty() && p.idle_since.is_none() {
                p.idle_since = Some(Instant::now());
            }
        }
    }
}

/// Hands `record` (at `partition`) to the followers of its task; cuts off the full ones.
fn dispatch(state: &mut HubState, partition: i32, record: LogRecord) {
    let Some(p) = state.partitions.get_mut(&partition) else {
        return;
    };
    if record.offset < p.position {
        return; // read again after a re-position: already handed out
    }
    p.position = record.offset + 1;
    let Some(task) = record.meta.as_ref().map(|m| m.task_id) else {
        return;
    };
    let Some(slots) = p.followers.get_mut(&task) else {
        return;
    };
    slots.retain(|slot| match slot.tx.try_send(record.clone()) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            slot.overflowed.store(true, Ordering::Release);
            crate::metrics::metrics().log_followers_lagged.inc();
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    });
    if slots.is_empty() {
        p.followers.remove(&task);
        if p.followers.is_empty() && p.idle_since.is_none() {
            p.idle_since = Some(Instant::now());
        }
    }
}

/// What the tail must do about its assignment after looking at the state.
enum Housekeeping {
    /// Nothing changed.
    Keep,
    /// Assign exactly these partitions at these offsets.
    Assign(Vec<(i32, i64)>),
    /// Nobody follows anything any more: close.
    Close,
}

/// Releases idle partitions; says what the consumer must do. Pure on the state.
fn housekeeping(state: &mut HubState, idle_close: Duration, now: Instant) -> Housekeeping {
    let before = state.partitions.len();
    state.partitions.retain(|_, p| {
        !(p.followers.is_empty() && p.idle_since.is_some_and(|t| now - t >= idle_close))
    });
    crate::metrics::metrics()
        .log_follow_partitions
        .set(state.partitions.len() as i64);
    if state.partitions.is_empty() {
        state.tail_running = false;
        state.assignment_dirty = false;
        return Housekeeping::Close;
    }
    if state.partitions.len() == before && !state.assignment_dirty {
        return Housekeeping::Keep;
    }
    state.assignment_dirty = false;
    let mut assignment: Vec<(i32, i64)> = state
        .partitions
        .iter_mut()
        .map(|(partition, p)| {
            p.assigned = true;
            (*partition, p.position)
        })
        .collect();
    assignment.sort_unstable();
    Housekeeping::Assign(assignment)
}

/// The tail: one consumer for every followed partition, until nothing is followed.
async fn tail(shared: Arc<Shared>) {
    let consumer: StreamConsumer = match client_config(&shared.brokers)
        .set("group.id", "tasklog-log-follow")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set(
            "fetch.wait.max.ms",
            crate::kafka::tail_fetch_wait_ms(&shared.brokers).await,
        )
        .set("fetch.queue.backoff.ms", "1")
        .create()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "log follow: cannot create the tail consumer");
            // Followers keep waiting for their tasks' ends; a later registration retries.
            let mut state = shared.lock();
            state.tail_running = false;
            for p in state.partitions.values_mut() {
                p.assigned = false;
            }
            return;
        }
    };
    let tick = (shared.options.idle_close / 2).max(Duration::from_millis(100));
    loop {
        let plan = housekeeping(
            &mut shared.lock(),
            shared.options.idle_close,
            Instant::now(),
        );
        match plan {
            Housekeeping::Close => break,
            Housekeeping::Keep => {}
            Housekeeping::Assign(partitions) => {
                let mut tpl = TopicPartitionList::new();
                for (partition, offset) in partitions {
                    if let Err(e) =
                        tpl.add_partition_offset(&shared.topic, partition, Offset::Offset(offset))
                    {
                        tracing::warn!(error = %e, partition, "log follow: bad assignment");
                    }
                }
                if let Err(e) = consumer.assign(&tpl) {
                    tracing::warn!(error = %e, "log follow: assign failed");
                }
            }
        }
        tokio::select! {
            received = consumer.recv() => match received {
                Ok(m) => {
                    let headers: Vec<(&str, Option<&[u8]>)> = m
                        .headers()
                        .map(|h| h.iter().map(|h| (h.key, h.value)).collect())
                        .unwrap_or_default();
                    let record = LogRecord {
                        offset: m.offset(),
                        meta: decode_meta(m.key(), &headers).ok(),
                        value: m.payload().unwrap_or_default().to_vec(),
                    };
                    dispatch(&mut shared.lock(), m.partition(), record);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "log follow: reading the logs topic");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(tick) => {}
        }
    }
    // Closing a consumer waits on the broker: not on a runtime thread.
    let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(task: Uuid, offset: i64) -> LogRecord {
        LogRecord {
            offset,
            meta: Some(super::super::LogMeta {
                task_id: task,
                attempt: 1,
                stream: super::super::Stream::Stdout,
                line: offset + 1,
                time: None,
                part: None,
                continued: false,
            }),
            value: format!("line {offset}").into_bytes(),
        }
    }

    fn state_with(partition: i32, position: i64, slots: Vec<(Uuid, Slot)>) -> HubState {
        let mut followers: HashMap<Uuid, Vec<Slot>> = HashMap::new();
        for (task, slot) in slots {
            followers.entry(task).or_default().push(slot);
        }
        let mut state = HubState::default();
        state.partitions.insert(
            partition,
            PartitionFollowers {
                position,
                assigned: true,
                followers,
                idle_since: None,
            },
        );
        state
    }

    fn slot(id: u64, buffer: usize) -> (Slot, mpsc::Receiver<LogRecord>, Arc<AtomicBool>) {
        let (tx, rx) = mpsc::channel(buffer);
        let overflowed = Arc::new(AtomicBool::new(false));
        (
            Slot {
                id,
                tx,
                overflowed: overflowed.clone(),
            },
            rx,
            overflowed,
        )
    }

    #[test]
    fn records_go_to_their_task_only_in_order_and_once() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let (sa, mut ra, _) = slot(1, 16);
        let (sb, mut rb, _) = slot(2, 16);
        let mut state = state_with(3, 10, vec![(a, sa), (b, sb)]);
        for (task, offset) in [(a, 10), (b, 11), (a, 12), (a, 11), (a, 9)] {
            dispatch(&mut state, 3, record(task, offset));
        }
        let got = |rx: &mut mpsc::Receiver<LogRecord>| {
            std::iter::from_fn(|| rx.try_recv().ok().map(|r| r.offset)).collect::<Vec<_>>()
        };
        // 11 and 9 again (a re-read after a re-position) are not handed out twice.
        assert_eq!(got(&mut ra), vec![10, 12]);
        assert_eq!(got(&mut rb), vec![11]);
        assert_eq!(state.partitions[&3].position, 13);
    }

    #[test]
    fn a_full_follower_is_cut_off_and_told() {
        let task = Uuid::new_v4();
        let (slow, mut rx, overflowed) = slot(1, 2);
        let mut state = state_with(0, 0, vec![(task, slow)]);
        for offset in 0..5 {
            dispatch(&mut state, 0, record(task, offset));
        }
        assert!(overflowed.load(Ordering::Acquire));
        assert!(state.partitions[&0].followers.is_empty());
        assert!(state.partitions[&0].idle_since.is_some());
        // What it had is still there, then the channel ends.
        assert_eq!(rx.try_recv().map(|r| r.offset).ok(), Some(0));
        assert_eq!(rx.try_recv().map(|r| r.offset).ok(), Some(1));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn idle_partitions_are_released_and_the_tail_closes() {
        let task = Uuid::new_v4();
        let (s, _rx, _) = slot(1, 4);
        let mut state = state_with(1, 5, vec![(task, s)]);
        state.partitions.insert(
            2,
            PartitionFollowers {
                position: 7,
                assigned: true,
                followers: HashMap::new(),
                idle_since: Some(Instant::now()),
            },
        );
        state.tail_running = true;
        let t0 = Instant::now();
        // Not idle long enough: kept.
        assert!(matches!(
            housekeeping(&mut state, Duration::from_secs(3), t0),
            Housekeeping::Keep
        ));
        // Idle long enough: released; the other stays assigned where it is.
        match housekeeping(
            &mut state,
            Duration::from_secs(3),
            t0 + Duration::from_secs(4),
        ) {
            Housekeeping::Assign(a) => assert_eq!(a, vec![(1, 5)]),
            _ => panic!("expected a new assignment"),
        }
        if let Some(p) = state.partitions.get_mut(&1) {
            p.followers.clear();
            p.idle_since = Some(t0);
        }
        assert!(matches!(
            housekeeping(
                &mut state,
                Duration::from_secs(3),
                t0 + Duration::from_secs(4)
            ),
            Housekeeping::Close
        ));
        assert!(!state.tail_running);
    }
}
