//! Folding the log in memory and comparing the result with the projection, row by row.
//! Pure: records in, differences out; [`super::verify`] does the reading.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use serde_json::Value;
use uuid::Uuid;

use crate::events::fold::TaskFold;
use crate::events::service::{ServiceEvent, ServiceState, apply_service};
use crate::events::worker::{WorkerEvent, WorkerState, apply_worker};
use crate::events::{Event, RawRecord, Rejection};
use crate::store::snapshot::{Coordinates, ProjectionSnapshot, StoredEvent};

/// The projection's reason for a record Postgres itself refused: no fold can predict it,
/// so replay takes it from `rejected_events` (and lists every such record).
pub const STORAGE_REJECTED: &str = "storage_rejected";

/// What the log folds to, built record by record in log order per partition.
#[derive(Debug, Default)]
pub struct Replayed {
    /// Tasks, and the `ce_id`s applied.
    pub tasks: TaskFold,
    /// Per task, where its last applied event sits.
    pub last: HashMap<Uuid, (i32, i64)>,
    /// The event index: per task and seq, the applied event.
    pub events: HashMap<(Uuid, i64), StoredEvent>,
    /// Every record not applied, and why.
    pub rejected: HashMap<Coordinates, String>,
    /// Workers by id.
    pub workers: HashMap<String, WorkerState>,
    /// Services by name.
    pub services: HashMap<String, ServiceState>,
    /// Records folded.
    pub records: u64,
}

impl Replayed {
    /// An empty replay.
    pub fn new() -> Replayed {
        Replayed::default()
    }

    /// Whether `other` folded a task, `ce_id`, worker or service this one has too: the
    /// two cannot simply be merged (their order matters).
    pub fn shares_keys(&self, other: &Replayed) -> bool {
        fn overlap<K: Eq + std::hash::Hash, V>(a: &HashMap<K, V>, b: &HashMap<K, V>) -> bool {
            let (small, large) = if a.len() <= b.len() { (a, b) } else { (b, a) };
            small.keys().any(|k| large.contains_key(k))
        }
        let (seen_small, seen_large) = if self.tasks.seen.len() <= other.tasks.seen.len() {
            (&self.tasks.seen, &other.tasks.seen)
        } else {
            (&other.tasks.seen, &self.tasks.seen)
        };
        overlap(&self.tasks.states, &other.tasks.states)
            || seen_small.iter().any(|id| seen_large.contains(id))
            || overlap(&self.workers, &other.workers)
            || overlap(&self.services, &other.services)
    }

    /// Takes in everything `other` folded (which shares no key with this replay: see
    /// [`Replayed::shares_keys`]).
    pub fn absorb(&mut self, other: Replayed) {
        self.tasks.states.extend(other.tasks.states);
        self.tasks.seen.extend(other.tasks.seen);
        self.last.extend(other.last);
        self.events.extend(other.events);
        self.rejected.extend(other.rejected);
        self.workers.extend(other.workers);
        self.services.extend(other.services);
        self.records += other.records;
    }

    /// Folds one record of the events topic. `storage_refused` says the projection
    /// recorded it as refused by Postgres (it is then not applied here either).
    pub fn task_record(
        &mut self,
        at: (&str, i32, i64),
        record: &RawRecord<'_>,
        storage_refused: bool,
    ) -> Result<(), Rejection> {
        if storage_refused {
            self.storage_refused(at);
            return Ok(());
        }
        let (_, partition, offset) = at;
        self.records += 1;
        let outcome = Event::decode(record).and_then(|event| {
            self.tasks.apply(&event)?;
            Ok(event)
        });
        match outcome {
            Ok(event) => {
                self.last.insert(event.task_id, (partition, offset));
                self.events.insert(
                    (event.task_id, event.seq as i64),
                    StoredEvent {
                        ce_id: event.envelope.id.clone(),
                        event_type: event.envelope.event_type.as_str().to_string(),
                        partition,
                        offset,
                    },
                );
                Ok(())
            }
            Err(rejection) => {
                self.reject(at, rejection.code().to_string());
                Err(rejection)
            }
        }
    }

    /// Folds one record of the workers topic.
    pub fn worker_record(
        &mut self,
        at: (&str, i32, i64),
        record: &RawRecord<'_>,
        storage_refused: bool,
    ) -> Result<(), Rejection> {
        let decoded = WorkerEvent::decode(record);
        self.keyed(at, storage_refused, decoded, |r, event| {
            let next = apply_worker(r.workers.get(&event.worker_id), &event)?;
            r.workers.insert(event.worker_id.clone(), next);
            Ok(())
        })
    }

    /// Folds one record of the services topic.
    pub fn service_record(
        &mut self,
        at: (&str, i32, i64),
        record: &RawRecord<'_>,
        storage_refused: bool,
    ) -> Result<(), Rejection> {
        let decoded = ServiceEvent::decode(record);
        self.keyed(at, storage_refused, decoded, |r, event| {
            let next = apply_service(r.services.get(&event.service), &event)?;
            r.services.insert(event.service.clone(), next);
            Ok(())
        })
    }

    /// One record of an entity topic: refused by Postgres, or folded by `fold`.
    fn keyed<E>(
        &mut self,
        at: (&str, i32, i64),
        storage_refused: bool,
        decoded: Result<E, Rejection>,
        fold: impl FnOnce(&mut Replayed, E) -> Result<(), Rejection>,
    ) -> Result<(), Rejection> {
        if storage_refused {
            self.storage_refused(at);
            return Ok(());
        }
        self.records += 1;
        decoded
            .and_then(|event| fold(self, event))
            .inspect_err(|r| self.reject(at, r.code().to_string()))
    }

    /// Counts a record the projection recorded as refused by Postgres: not applied here
    /// either.
    fn storage_refused(&mut self, at: (&str, i32, i64)) {
        self.records += 1;
        self.reject(at, STORAGE_REJECTED.to_string());
    }

    fn reject(&mut self, (topic, partition, offset): (&str, i32, i64), reason: String) {
        self.rejected
            .insert((topic.to_string(), partition, offset), reason);
    }
}

/// One way the projection differs from what the log folds to.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "difference", rename_all = "snake_case")]
pub enum Difference {
    /// A task on the log that the projection lacks.
    MissingTask {
        /// The task.
        id: Uuid,
    },
    /// A task row no event on the log produced.
    ExtraTask {
        /// The task.
        id: Uuid,
    },
    /// A task row that differs: which column, the log's value, the projection's.
    TaskDiffers {
        /// The task.
        id: Uuid,
        /// The column (`state`, `seq`, `event_partition`, `last_offset`, `doc.attempts`...).
        field: String,
        /// What the log says.
        log: String,
        /// What the projection holds.
        projection: String,
    },
    /// An applied event missing from the event index.
    MissingEvent {
        /// The task.
        task: Uuid,
        /// Its seq.
        seq: i64,
        /// Where it is on the log.
        partition: i32,
        /// Where it is on the log.
        offset: i64,
    },
    /// An event index row no applied event produced.
    ExtraEvent {
        /// The task.
        task: Uuid,
        /// Its seq.
        seq: i64,
    },
    /// An event index row that differs from the log's record.
    EventDiffers {
        /// The task.
        task: Uuid,
        /// Its seq.
        seq: i64,
        /// `ce_id`, `type`, `partition` or `offset`.
        field: &'static str,
        /// What the log says.
        log: String,
        /// What the projection holds.
        projection: String,
    },
    /// A record the fold refuses that the projection does not list as rejected, one it
    /// lists that the fold applies, or a different reason.
    RejectionDiffers {
        /// Where the record is.
        at: Coordinates,
        /// The fold's reason (`None`: applied).
        log: Option<String>,
        /// The projection's (`None`: not listed).
        projection: Option<String>,
    },
    /// A worker or service whose row differs from the fold, or is missing or extra.
    EntityDiffers {
        /// `worker` or `service`.
        kind: &'static str,
        /// Its id or name.
        key: String,
        /// What differs.
        detail: String,
    },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Difference::MissingTask { id } => {
                write!(f, "task {id}: on the log, missing from the projection")
            }
            Difference::ExtraTask { id } => {
                write!(f, "task {id}: in the projection, not on the log")
            }
            Difference::TaskDiffers {
                id,
                field,
                log,
                projection,
            } => {
                write!(
                    f,
                    "task {id}: {field} is {projection} in the projection, {log} on the log"
                )
            }
            Difference::MissingEvent {
                task,
                seq,
                partition,
                offset,
            } => write!(
                f,
                "task {task} event {seq}: on the log at {partition}:{offset}, missing from the event index"
            ),
            Difference::ExtraEvent { task, seq } => {
                write!(
                    f,
                    "task {task} event {seq}: in the event index, not on the log"
                )
            }
            Difference::EventDiffers {
                task,
                seq,
                field,
                log,
                projection,
            } => write!(
                f,
                "task {task} event {seq}: {field} is {projection} in the event index, {log} on the log"
            ),
            Difference::RejectionDiffers {
                at: (t, p, o),
                log,
                projection,
            } => write!(
                f,
                "record {t} {p}:{o}: {} by the fold, {} in the projection",
                log.as_deref()
                    .map_or("applied".to_string(), |r| format!("rejected ({r})")),
                projection
                    .as_deref()
                    .map_or("not rejected".to_string(), |r| format!("rejected ({r})")),
            ),
            Difference::EntityDiffers { kind, key, detail } => write!(f, "{kind} {key}: {detail}"),
        }
    }
}

/// Every difference between `replayed` and `stored`, in a stable order.
///
/// A first pass only asks whether each task and event index row agrees, without
/// allocating, split over two threads (it serialises every folded task); the report is
/// then built, in key order, for the few that do not.
pub fn compare(replayed: &Replayed, stored: &ProjectionSnapshot) -> Vec<Difference> {
    let tasks: Vec<&Uuid> = replayed.tasks.states.keys().collect();
    let events: Vec<&(Uuid, i64)> = replayed.events.keys().collect();
    let (task_half, event_half) = (tasks.len().div_ceil(2), events.len().div_ceil(2));
    let check_tasks = |ids: &[&Uuid]| -> Vec<Uuid> {
        ids.iter()
            .filter(|id| !task_agrees(replayed, stored, id))
            .map(|id| **id)
            .collect()
    };
    let check_events = |keys: &[&(Uuid, i64)]| -> Vec<(Uuid, i64)> {
        keys.iter()
            .filter(|k| replayed.events.get(**k) != stored.events.get(**k))
            .map(|k| **k)
            .collect()
    };
    let ((mut bad_tasks, mut bad_events), (more_tasks, more_events)) = std::thread::scope(|s| {
        let other = s.spawn(|| {
            (
                check_tasks(&tasks[task_half..]),
                check_events(&events[event_half..]),
            )
        });
        let here = (
            check_tasks(&tasks[..task_half]),
            check_events(&events[..event_half]),
        );
        let there = other
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (here, there)
    });
    bad_tasks.extend(more_tasks);
    let bad_tasks = with_extra_keys(bad_tasks, &replayed.tasks.states, &stored.tasks);
    bad_events.extend(more_events);
    let bad_events = with_extra_keys(bad_events, &replayed.events, &stored.events);

    let mut out = Vec::new();
    for id in &bad_tasks {
        task_differences(replayed, stored, id, &mut out);
    }
    for key in &bad_events {
        event_differences(
            key,
            replayed.events.get(key),
            stored.events.get(key),
            &mut out,
        );
    }
    let differing: Vec<Coordinates> = replayed
        .rejected
        .iter()
        .filter(|(at, reason)| stored.rejected.get(*at) != Some(*reason))
        .map(|(at, _)| at.clone())
        .collect();
    for at in with_extra_keys(differing, &replayed.rejected, &stored.rejected) {
        out.push(Difference::RejectionDiffers {
            log: replayed.rejected.get(&at).cloned(),
            projection: stored.rejected.get(&at).cloned(),
            at,
        });
    }
    compare_entities("worker", &replayed.workers, &stored.workers, &mut out);
    compare_entities("service", &replayed.services, &stored.services, &mut out);
    out
}

/// `differing` (keys of the fold whose row disagrees) with the keys only the projection
/// has, in key order.
fn with_extra_keys<K: Ord + Clone + std::hash::Hash, A, B>(
    mut differing: Vec<K>,
    folded: &HashMap<K, A>,
    stored: &HashMap<K, B>,
) -> Vec<K> {
    differing.extend(stored.keys().filter(|k| !folded.contains_key(*k)).cloned());
    differing.sort();
    differing
}

/// Whether the task row says what the fold says (no allocation beyond the doc's text).
fn task_agrees(replayed: &Replayed, stored: &ProjectionSnapshot, id: &Uuid) -> bool {
    let (Some(state), Some(row)) = (replayed.tasks.states.get(id), stored.tasks.get(id)) else {
        return false;
    };
    let (partition, offset) = replayed.last.get(id).copied().unwrap_or((-1, -1));
    state.state.as_str() == row.state
        && state.seq as i64 == row.seq
        && partition == row.partition
        && offset == row.last_offset
        // The projector stores exactly this encoding: equal text is an equal doc (a doc
        // written otherwise is compared as JSON by `task_differences`).
        && serde_json::to_string(state).is_ok_and(|text| text == row.doc)
}

/// The differences of one task that [`task_agrees`] found differing.
fn task_differences(
    replayed: &Replayed,
    stored: &ProjectionSnapshot,
    id: &Uuid,
    out: &mut Vec<Difference>,
) {
    let (Some(state), Some(row)) = (replayed.tasks.states.get(id), stored.tasks.get(id)) else {
        out.push(if stored.tasks.contains_key(id) {
            Difference::ExtraTask { id: *id }
        } else {
            Difference::MissingTask { id: *id }
        });
        return;
    };
    let (partition, offset) = replayed.last.get(id).copied().unwrap_or((-1, -1));
    let mut differs = |field: &str, log: String, projection: String| {
        if log != projection {
            out.push(Difference::TaskDiffers {
                id: *id,
                field: field.to_string(),
                log,
                projection,
            });
        }
    };
    differs("state", state.state.as_str().into(), row.state.clone());
    differs("seq", state.seq.to_string(), row.seq.to_string());
    differs(
        "event_partition",
        partition.to_string(),
        row.partition.to_string(),
    );
    differs(
        "last_offset",
        offset.to_string(),
        row.last_offset.to_string(),
    );
    match serde_json::to_value(state) {
        Ok(doc) => match serde_json::from_str::<Value>(&row.doc) {
            Ok(stored) => compare_docs("doc", &doc, &stored, &mut differs),
            Err(e) => differs("doc", doc.to_string(), format!("not JSON ({e})")),
        },
        Err(e) => differs("doc", format!("unencodable ({e})"), row.doc.clone()),
    }
}

/// Reports the top-level fields of two documents that differ (`doc.attempts`, ...).
fn compare_docs(
    prefix: &str,
    log: &Value,
    projection: &Value,
    differs: &mut impl FnMut(&str, String, String),
) {
    match (log, projection) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                let (x, y) = (
                    a.get(key).unwrap_or(&Value::Null),
                    b.get(key).unwrap_or(&Value::Null),
                );
                if x != y {
                    differs(&format!("{prefix}.{key}"), x.to_string(), y.to_string());
                }
            }
        }
        _ => differs(prefix, log.to_string(), projection.to_string()),
    }
}

/// The differences of one event index key (`log`: the fold's, `row`: the projection's).
fn event_differences(
    &(task, seq): &(Uuid, i64),
    log: Option<&StoredEvent>,
    row: Option<&StoredEvent>,
    out: &mut Vec<Difference>,
) {
    match (log, row) {
        (Some(log), None) => out.push(Difference::MissingEvent {
            task,
            seq,
            partition: log.partition,
            offset: log.offset,
        }),
        (None, Some(_)) => out.push(Difference::ExtraEvent { task, seq }),
        (Some(log), Some(row)) => {
            for (field, a, b) in [
                ("ce_id", log.ce_id.clone(), row.ce_id.clone()),
                ("type", log.event_type.clone(), row.event_type.clone()),
                (
                    "partition",
                    log.partition.to_string(),
                    row.partition.to_string(),
                ),
                ("offset", log.offset.to_string(), row.offset.to_string()),
            ] {
                if a != b {
                    out.push(Difference::EventDiffers {
                        task,
                        seq,
                        field,
                        log: a,
                        projection: b,
                    });
                }
            }
        }
        (None, None) => {}
    }
}

fn compare_entities<S: serde::Serialize>(
    kind: &'static str,
    replayed: &HashMap<String, S>,
    stored: &HashMap<String, Value>,
    out: &mut Vec<Difference>,
) {
    let keys: BTreeSet<&String> = replayed.keys().chain(stored.keys()).collect();
    for key in keys {
        let detail = match (replayed.get(key), stored.get(key)) {
            (Some(_), None) => "on the log, missing from the projection".to_string(),
            (None, Some(_)) => "in the projection, not on the log".to_string(),
            (Some(state), Some(row)) => match serde_json::to_value(state) {
                Ok(doc) if &doc == row => continue,
                Ok(doc) => {
                    let mut fields = Vec::new();
                    compare_docs("doc", &doc, row, &mut |f, _, _| fields.push(f.to_string()));
                    format!("{} differ", fields.join(", "))
                }
                Err(e) => format!("the fold's state does not encode: {e}"),
            },
            (None, None) => continue,
        };
        out.push(Difference::EntityDiffers {
            kind,
            key: key.clone(),
            detail,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Payload, TaskSpec};
    use crate::store::snapshot::StoredTask;

    fn submitted(id: Uuid) -> crate::events::EncodedEvent {
        let spec = TaskSpec::from_json(serde_json::json!({"shell": "true"})).expect("spec");
        Event::new(
            "test",
            id,
            1,
            Payload::Submitted {
                spec: std::sync::Arc::new(spec),
            },
        )
        .encode()
    }

    fn fold(records: &[crate::events::EncodedEvent]) -> Replayed {
        let mut r = Replayed::new();
        for (offset, e) in records.iter().enumerate() {
            let _ = r.task_record(("t", 0, offset as i64), &e.as_record(), false);
        }
        r
    }

    /// The snapshot a faithful projection of `r` holds.
    fn faithful(r: &Replayed) -> ProjectionSnapshot {
        let mut s = ProjectionSnapshot::default();
        for (id, state) in &r.tasks.states {
            let (partition, last_offset) = r.last[id];
            s.tasks.insert(
                *id,
                StoredTask {
                    state: state.state.as_str().into(),
                    seq: state.seq as i64,
                    partition,
                    last_offset,
                    doc: serde_json::to_value(state).expect("doc").to_string(),
                },
            );
        }
        s.events = r.events.clone();
        s.rejected = r.rejected.clone();
        s
    }

    #[test]
    fn a_faithful_projection_has_no_difference_and_each_tamper_is_named() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let first = submitted(a);
        let r = fold(&[first.clone(), submitted(b), first]);
        assert_eq!(r.rejected.len(), 1, "the duplicate is refused");
        let good = faithful(&r);
        assert_eq!(compare(&r, &good), vec![]);

        let mut s = good.clone();
        s.tasks.get_mut(&a).expect("a").state = "succeeded".into();
        let d = compare(&r, &s);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(
            matches!(&d[0], Difference::TaskDiffers { id, field, .. } if *id == a && field == "state")
        );

        let mut s = good.clone();
        s.events.remove(&(b, 1));
        assert_eq!(
            compare(&r, &s),
            vec![Difference::MissingEvent {
                task: b,
                seq: 1,
                partition: 0,
                offset: 1
            }]
        );

        let mut s = good.clone();
        let extra = Uuid::now_v7();
        s.tasks.insert(extra, good.tasks[&a].clone());
        assert_eq!(compare(&r, &s), vec![Difference::ExtraTask { id: extra }]);

        let mut s = good.clone();
        s.tasks.get_mut(&b).expect("b").last_offset = 7;
        let d = compare(&r, &s);
        assert!(
            matches!(&d[..], [Difference::TaskDiffers { field, log, projection, .. }]
            if field == "last_offset" && log == "1" && projection == "7"),
            "{d:?}"
        );

        let mut s = good.clone();
        s.events.get_mut(&(a, 1)).expect("event").offset = 9;
        let d = compare(&r, &s);
        assert!(
            matches!(
                &d[..],
                [Difference::EventDiffers {
                    field: "offset",
                    ..
                }]
            ),
            "{d:?}"
        );

        let mut s = good.clone();
        s.rejected.clear();
        let d = compare(&r, &s);
        assert!(
            matches!(
                &d[..],
                [Difference::RejectionDiffers {
                    projection: None,
                    ..
                }]
            ),
            "{d:?}"
        );
        for d in compare(&r, &s) {
            assert!(!d.to_string().is_empty());
        }
    }
}
