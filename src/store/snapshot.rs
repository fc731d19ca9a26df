//! The whole projection as one consistent snapshot, for replay to compare with what the
//! log folds to: every row that claims to come from the log, read in one repeatable-read
//! transaction together with the offsets it was built up to.

use std::collections::HashMap;

use serde_json::Value;
use uuid::Uuid;

use super::{Store, StoreError, ctx};

/// A task row.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTask {
    /// `state`.
    pub state: String,
    /// `seq`.
    pub seq: i64,
    /// `event_partition`.
    pub partition: i32,
    /// `last_offset`.
    pub last_offset: i64,
    /// `doc`: the folded state, as the JSON text stored.
    pub doc: String,
}

/// A `task_events` row (the event index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// `ce_id`.
    pub ce_id: String,
    /// `type`.
    pub event_type: String,
    /// `partition`.
    pub partition: i32,
    /// `offset`.
    pub offset: i64,
}

/// Where a record sits: topic, partition, offset.
pub type Coordinates = (String, i32, i64);

/// Every projected row, as of one moment.
#[derive(Debug, Clone, Default)]
pub struct ProjectionSnapshot {
    /// `projection_offsets`: topic → partition → next offset.
    pub offsets: HashMap<String, HashMap<i32, i64>>,
    /// `tasks`, by id.
    pub tasks: HashMap<Uuid, StoredTask>,
    /// `task_events`, by task and seq.
    pub events: HashMap<(Uuid, i64), StoredEvent>,
    /// `rejected_events`: where, and the reason.
    pub rejected: HashMap<Coordinates, String>,
    /// `workers`: id → doc.
    pub workers: HashMap<String, Value>,
    /// `services`: name → doc.
    pub services: HashMap<String, Value>,
}

impl Store {
    /// Reads the whole projection in one repeatable-read, read-only transaction, so that
    /// its rows and its offsets belong together even while a projector writes.
    pub async fn snapshot(&self) -> Result<ProjectionSnapshot, StoreError> {
        self.snapshot_with(|_| {}).await
    }

    /// [`Store::snapshot`], handing `head` the snapshot's offsets and rejected records
    /// as soon as they are read, before the bulk of the rows: a replay starts folding
    /// the log up to those offsets while the rest is still being read.
    pub async fn snapshot_with(
        &self,
        head: impl FnOnce(&ProjectionSnapshot),
    ) -> Result<ProjectionSnapshot, StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(ctx("start the snapshot"))?;
        let mut snapshot = ProjectionSnapshot::default();
        for row in tx
            .query(
                "SELECT topic, partition, next_offset FROM projection_offsets",
                &[],
            )
            .await
            .map_err(ctx("read projection offsets"))?
        {
            snapshot
                .offsets
                .entry(row.get(0))
                .or_default()
                .insert(row.get(1), row.get(2));
        }
        for row in tx
            .query(
                "SELECT topic, partition, \"offset\", reason FROM rejected_events",
                &[],
            )
            .await
            .map_err(ctx("read rejected events"))?
        {
            snapshot
                .rejected
                .insert((row.get(0), row.get(1), row.get(2)), row.get(3));
        }
        head(&snapshot);
        for row in tx
            .query(
                "SELECT id, state, seq, event_partition, last_offset, doc::text FROM tasks",
                &[],
            )
            .await
            .map_err(ctx("read tasks"))?
        {
            snapshot.tasks.insert(
                row.get(0),
                StoredTask {
                    state: row.get(1),
                    seq: row.get(2),
                    partition: row.get(3),
                    last_offset: row.get(4),
                    doc: row.get(5),
                },
            );
        }
        for row in tx
            .query(
                "SELECT task_id, seq, ce_id, type, partition, \"offset\" FROM task_events",
                &[],
            )
            .await
            .map_err(ctx("read the event index"))?
        {
            snapshot.events.insert(
                (row.get(0), row.get(1)),
                StoredEvent {
                    ce_id: row.get(2),
                    event_type: row.get(3),
                    partition: row.get(4),
                    offset: row.get(5),
                },
            );
        }
        for (query, into) in [
            ("SELECT id, doc FROM workers", &mut snapshot.workers),
            ("SELECT name, doc FROM services", &mut snapshot.services),
        ] {
            for row in tx.query(query, &[]).await.map_err(ctx("read entities"))? {
                into.insert(row.get(0), row.get(1));
            }
        }
        tx.commit().await.map_err(ctx("end the snapshot"))?;
        Ok(snapshot)
    }
}
