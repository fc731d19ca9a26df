//! The workers projection: folds `tasklog.workers` into the `workers` table with the
//! pure worker fold of [`crate::events::worker`].

use std::collections::HashMap;

use tokio_postgres::Transaction;

use super::keyed::{KeyedEntity, KeyedProjection};
use crate::events::worker::{WorkerEvent, WorkerState, apply_worker};
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
