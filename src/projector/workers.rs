//! The workers projection: folds `tasklog.workers` into the `workers` table with the
//! pure worker fold of [`crate::events::worker`].

use std::collections::HashMap;

use tokio_postgres::Transaction;

use super::keyed::{KeyedEntity, KeyedProjection};
use crate::events::worker::{WorkerEvent, WorkerPayload, WorkerState, apply_worker};
use crate::events::{RawRecord, Rejection};
use crate::store::projection;
use crate::store::{StoreError, WORKERS_CHANNEL};

/// Default consumer group of the workers projection.
pub const DEFAULT_GROUP: &str = "tasklog-worker-projector";

/// Workers, as a keyed entity.
pub struct Workers;

/// Folds worker events into `workers`.
pub type WorkerProjection = KeyedProjection<Workers>;

impl KeyedEntity for Workers {
    type Event = WorkerEvent;
    type State = WorkerState;
    const CHANNEL: &'static str = WORKERS_CHANNEL;

    fn decode(record: &RawRecord<'_>) -> Result<WorkerEvent, Rejection> {
        WorkerEvent::decode(record)
    }

    fn key(event: &WorkerEvent) -> &str {
        &event.worker_id
    }

    fn fold(state: Option<&WorkerState>, event: &WorkerEvent) -> Result<WorkerState, Rejection> {
        apply_worker(state, event)
    }

    /// Heartbeats: they only move `last_heartbeat`, which readers look up when they
    /// need it (the scheduler computes loss deadlines from it); waking every waiter on
    /// every heartbeat would cost each worker's assignments long-poll two queries per
    /// heartbeat of any worker.
    fn routine(event: &WorkerEvent) -> bool {
        matches!(event.payload, WorkerPayload::Heartbeat(_))
    }

    async fn load(
        tx: &Transaction<'_>,
        keys: &[String],
    ) -> Result<HashMap<String, WorkerState>, StoreError> {
        projection::load_workers(tx, keys).await
    }

    async fn write(tx: &Transaction<'_>, states: &[&WorkerState]) -> Result<(), StoreError> {
        projection::write_workers(tx, states).await
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::Timestamp;
    use rdkafka::message::OwnedMessage;

    use super::*;
    use crate::events::worker::WorkerInfo;
    use crate::projector::{Projection, Record, Refusal};

    fn record(payload: WorkerPayload) -> Record<Result<WorkerEvent, Rejection>> {
        let message =
            OwnedMessage::new(None, None, "w".into(), Timestamp::NotAvailable, 0, 0, None);
        Record {
            message,
            decoded: Ok(WorkerEvent::new("t", "w1", payload)),
        }
    }

    #[test]
    fn only_batches_of_applied_heartbeats_go_unannounced() {
        let projection = WorkerProjection::new();
        let beat = record(WorkerPayload::Heartbeat(WorkerInfo::default()));
        let registered = record(WorkerPayload::Registered(WorkerInfo::default()));
        let undecodable = Record {
            message: beat.message.clone(),
            decoded: Err(Rejection::InvalidJson("x".into())),
        };
        let refused = Refusal {
            index: 0,
            reason: "stale_incarnation",
            message: String::new(),
        };
        assert!(!projection.notifies(&[&beat, &beat], &[]));
        assert!(projection.notifies(&[&beat, &registered], &[]));
        assert!(projection.notifies(&[&beat], std::slice::from_ref(&refused)));
        assert!(projection.notifies(&[&undecodable], &[]));
    }
}
