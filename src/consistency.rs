//! Read-your-writes: waiting until the projections have what the log has.
//!
//! The log is the truth; the projections in Postgres follow it a few milliseconds
//! behind. Two waits close that gap, both woken by the projections' `NOTIFY` (no
//! polling), both bounded:
//!
//! - [`append_and_wait`]: append events, then wait until the projection has passed the
//!   last of them — a command that must see its own effect (cancel, an attempt report,
//!   the scheduler before its next pass).
//! - [`catch_up`]: wait until the projection has reached the end a partition had when
//!   asked — a read about one task or service, so that "not found" means "not on the
//!   log", whoever appended it and through whichever server.
//!
//! Both sit on the I/O layer (Kafka and Postgres); the roles (API, scheduler, benchmarks)
//! share them.

use std::collections::HashMap;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::events::EncodedEvent;
use crate::kafka::{AppendError, Appended, Appender, KafkaIoError, PartitionEnds};
use crate::metrics::metrics;
use crate::store::{KnownOffsets, Store, StoreError};

/// Why a wait could not be carried out (not: that it timed out — see [`Lag`]).
#[derive(Debug, thiserror::Error)]
pub enum ConsistencyError {
    /// Postgres could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Kafka could not be asked where a partition ends.
    #[error(transparent)]
    Kafka(#[from] KafkaIoError),
    /// An append failed (nothing after it was appended).
    #[error(transparent)]
    Append(#[from] AppendError),
}

/// How many records the projections still had to apply when a wait ended: 0 when they
/// had everything waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lag(pub i64);

impl Lag {
    /// Whether the projections had everything waited for.
    pub fn caught_up(self) -> bool {
        self.0 <= 0
    }
}

/// Where the projections must get to: per topic, per partition, the next offset they
/// must have stored (everything below it applied or rejected).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Targets(HashMap<String, HashMap<i32, i64>>);

impl Targets {
    /// No targets (a wait for them returns at once).
    pub fn new() -> Targets {
        Targets::default()
    }

    /// The projection of `topic` must have passed the record at `appended`.
    pub fn past(&mut self, topic: &str, appended: Appended) -> &mut Targets {
        self.reach(topic, appended.partition, appended.offset + 1)
    }

    /// The projection of `topic` must have stored `next_offset` (or more) for
    /// `partition`.
    pub fn reach(&mut self, topic: &str, partition: i32, next_offset: i64) -> &mut Targets {
        let next = self
            .0
            .entry(topic.to_string())
            .or_default()
            .entry(partition)
            .or_insert(next_offset);
        *next = (*next).max(next_offset);
        self
    }

    /// Whether there is nothing to wait for.
    pub fn is_empty(&self) -> bool {
        self.0.values().all(HashMap::is_empty)
    }
}

/// The projections' progress as Postgres records it, and waits on it.
#[derive(Clone)]
pub struct Projections {
    store: Store,
    changes: watch::Receiver<u64>,
    known: KnownOffsets,
}

impl Projections {
    /// Progress in `store`, re-read whenever `changes` moves; `known` is what the
    /// notifications said was stored (both from one [`Store::follow_progress`] of the
    /// channels of the projections waited on), so that a target it already covers needs
    /// no query.
    pub fn new(store: Store, changes: watch::Receiver<u64>, known: KnownOffsets) -> Projections {
        Projections {
            store,
            changes,
            known,
        }
    }

    /// Follows the projections of `channels` in `store`.
    pub fn follow(store: Store, channels: &[&'static str]) -> Projections {
        let (changes, known) = store.follow_progress(channels);
        Projections::new(store, changes, known)
    }

    /// The counter that moves after every notified projection commit.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    /// How many records the projections still have to apply to reach `targets`.
    pub async fn lag(&self, targets: &Targets) -> Result<Lag, StoreError> {
        let mut lag = 0;
        for (topic, wanted) in &targets.0 {
            let short = |stored: &dyn Fn(i32) -> i64| {
                wanted
                    .iter()
                    .map(|(p, next)| (next - stored(*p)).max(0))
                    .sum::<i64>()
            };
            if short(&|p| self.known.get(topic, p)) == 0 {
                continue;
            }
            let stored = self.store.projection_offsets(topic).await?;
            self.known
                .raise(topic, stored.iter().map(|(p, o)| (*p, *o)));
            lag += short(&|p| stored.get(&p).copied().unwrap_or(0));
        }
        Ok(Lag(lag))
    }

    /// Waits until the projections reach `targets` or `deadline` passes; returns the
    /// lag left (0: reached).
    pub async fn wait(&self, targets: &Targets, deadline: Instant) -> Result<Lag, StoreError> {
        let mut changes = self.changes.clone();
        loop {
            changes.borrow_and_update();
            let lag = self.lag(targets).await?;
            if lag.caught_up() || Instant::now() >= deadline {
                return Ok(lag);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                // Deadline reached (or notifications gone): one last look.
                _ => return self.lag(targets).await,
            }
        }
    }
}

/// Counts one append in `tasklog_events_appended_total` or
/// `tasklog_append_failures_total`.
pub fn count_append(event_type: &str, result: &Result<Appended, AppendError>) {
    match result {
        Ok(_) => metrics()
            .events_appended
            .with_label_values(&[event_type])
            .inc(),
        Err(e) => {
            let reason = match e {
                AppendError::Unavailable(..) => "unavailable",
                AppendError::Refused(_) => "refused",
            };
            metrics().append_failures.with_label_values(&[reason]).inc();
        }
    }
}

/// Appends `events` to `topic` in order (counting each), then waits until `topic`'s
/// projection has passed the last of them or `deadline` passes. Returns where the last
/// landed and the lag left; `None` for no events. Fails on the first failed append.
pub async fn append_and_wait(
    appender: &Appender,
    projections: &Projections,
    topic: &str,
    events: &[EncodedEvent],
    deadline: Instant,
) -> Result<Option<(Appended, Lag)>, ConsistencyError> {
    let results = appender.append_all(topic, events).await;
    for (e, r) in events.iter().zip(&results) {
        count_append(e.event_type, r);
    }
    let mut last = None;
    for r in results {
        last = Some(r?);
    }
    let Some(last) = last else {
        return Ok(None);
    };
    let mut targets = Targets::new();
    targets.past(topic, last);
    let lag = projections.wait(&targets, deadline).await?;
    Ok(Some((last, lag)))
}

/// Waits until `topic`'s projection has reached the end `partition` has now (its high
/// watermark, asked of Kafka), or `deadline` passes; returns the lag left.
pub async fn catch_up(
    ends: &PartitionEnds,
    projections: &Projections,
    topic: &str,
    partition: i32,
    deadline: Instant,
) -> Result<Lag, ConsistencyError> {
    let end = ends.high_watermark(topic, partition).await?;
    let mut targets = Targets::new();
    targets.reach(topic, partition, end);
    Ok(projections.wait(&targets, deadline).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_keep_the_furthest_offset_per_partition() {
        let mut t = Targets::new();
        assert!(t.is_empty());
        t.past(
            "e",
            Appended {
                partition: 1,
                offset: 9,
            },
        );
        t.reach("e", 1, 5).reach("e", 2, 3).reach("w", 0, 1);
        assert_eq!(t.0["e"][&1], 10);
        assert_eq!(t.0["e"][&2], 3);
        assert_eq!(t.0["w"][&0], 1);
        assert!(!t.is_empty());
        assert!(Lag(0).caught_up());
        assert!(!Lag(3).caught_up());
    }
}
