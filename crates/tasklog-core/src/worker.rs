//! Worker events and their pure fold into [`WorkerState`].
//!
//! Workers live on their own topic (`tasklog.workers`, keyed by worker id). Each
//! `registered` and `heartbeat` carries the worker's whole description, and `draining`
//! and `lost` carry it as `last_known`, so the latest record of a worker is enough to
//! know it: the topic can be compacted.
//!
//! ```text
//!   registered ──► active ──draining──► draining
//!                    │  ▲                  │
//!                    │  └── registered ────┤ (a restarted worker registers again)
//!                    └──────── lost ───────┴──► lost ──registered──► active
//! ```

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::{
    EncodedEvent, KeyedRecord, RawRecord, ReasonMessage, Rejection, read_keyed, schema, typed,
};

/// Every worker event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkerEventType {
    /// `dev.tasklog.worker.registered.v1`
    Registered,
    /// `dev.tasklog.worker.heartbeat.v1`
    Heartbeat,
    /// `dev.tasklog.worker.draining.v1`
    Draining,
    /// `dev.tasklog.worker.lost.v1`
    Lost,
}

impl WorkerEventType {
    /// All worker event types.
    pub const ALL: &'static [WorkerEventType] = &[
        WorkerEventType::Registered,
        WorkerEventType::Heartbeat,
        WorkerEventType::Draining,
        WorkerEventType::Lost,
    ];

    /// The `ce_type` string.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerEventType::Registered => "dev.tasklog.worker.registered.v1",
            WorkerEventType::Heartbeat => "dev.tasklog.worker.heartbeat.v1",
            WorkerEventType::Draining => "dev.tasklog.worker.draining.v1",
            WorkerEventType::Lost => "dev.tasklog.worker.lost.v1",
        }
    }

    /// Parses a `ce_type` string.
    pub fn parse(s: &str) -> Option<WorkerEventType> {
        WorkerEventType::ALL
            .iter()
            .copied()
            .find(|t| t.as_str() == s)
    }
}

/// What a worker offers.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct WorkerCapacity {
    /// Cores (fractional allowed).
    pub cpu: f64,
    /// Memory in bytes.
    pub memory: u64,
    /// GPUs.
    #[serde(default)]
    pub gpu: u32,
}

/// A worker's description, carried by `registered` and every `heartbeat`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Capacity offered to tasks.
    pub capacity: WorkerCapacity,
    /// Labels tasks can require.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Projects whose tasks it runs; none (or `*`) for every project.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub projects: Vec<String>,
    /// Host the agent runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The agent's process id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Identifies one run of the agent: a restarted agent registers with a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<String>,
}

impl WorkerInfo {
    /// Whether it runs tasks of `project`.
    pub fn serves(&self, project: &str) -> bool {
        self.projects.is_empty()
            || self
                .projects
                .iter()
                .any(|p| p == crate::auth::ALL_PROJECTS || p == project)
    }
}

/// What `draining` and `lost` carry of the worker, so that after compaction (which
/// keeps only a worker's latest record) a rebuild still knows it. Optional: records
/// written before it existed lack it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LastKnown {
    /// The latest description.
    #[serde(flatten)]
    pub info: WorkerInfo,
    /// When the current incarnation registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_at: Option<DateTime<Utc>>,
    /// Time of the latest `registered` or `heartbeat`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_at: Option<DateTime<Utc>>,
}

impl LastKnown {
    /// Everything a fold knows of a worker.
    pub fn of(state: &WorkerState) -> LastKnown {
        LastKnown {
            info: state.info.clone(),
            registered_at: Some(state.registered_at),
            last_heartbeat_at: Some(state.last_heartbeat_at),
        }
    }
}

/// Type-specific data of a worker event.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerPayload {
    /// The agent started (or restarted).
    Registered(WorkerInfo),
    /// The agent is alive.
    Heartbeat(WorkerInfo),
    /// The agent takes no new work and is finishing what it runs.
    Draining {
        /// The worker as its agent knows itself.
        last_known: Option<Box<LastKnown>>,
    },
    /// The scheduler gave up on the worker: no heartbeat for too long.
    Lost {
        /// Why (`heartbeat_timeout`).
        reason: String,
        /// Detail.
        message: Option<String>,
        /// The worker as the scheduler last knew it.
        last_known: Option<Box<LastKnown>>,
    },
}

impl WorkerPayload {
    /// The worker's description it carries, if any.
    pub fn info(&self) -> Option<&WorkerInfo> {
        match self {
            WorkerPayload::Registered(info) | WorkerPayload::Heartbeat(info) => Some(info),
            WorkerPayload::Draining { last_known } | WorkerPayload::Lost { last_known, .. } => {
                last_known.as_deref().map(|l| &l.info)
            }
        }
    }
}

/// The data of `draining` and `lost`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct EndingData {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_known: Option<Box<LastKnown>>,
}

impl WorkerPayload {
    /// The event type of this payload.
    pub fn event_type(&self) -> WorkerEventType {
        match self {
            WorkerPayload::Registered(_) => WorkerEventType::Registered,
            WorkerPayload::Heartbeat(_) => WorkerEventType::Heartbeat,
            WorkerPayload::Draining { .. } => WorkerEventType::Draining,
            WorkerPayload::Lost { .. } => WorkerEventType::Lost,
        }
    }
}

/// A decoded, schema-valid worker event.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerEvent {
    /// `ce_id`.
    pub id: String,
    /// `ce_source`.
    pub source: String,
    /// `ce_time`.
    pub time: DateTime<Utc>,
    /// The worker (record key, `ce_subject` and `data.worker_id`).
    pub worker_id: String,
    /// Typed data.
    pub payload: WorkerPayload,
}

impl WorkerEvent {
    /// A new event with a fresh `ce_id` and the current time.
    pub fn new(source: &str, worker_id: &str, payload: WorkerPayload) -> WorkerEvent {
        WorkerEvent {
            id: Uuid::now_v7().to_string(),
            source: source.to_string(),
            time: Utc::now(),
            worker_id: worker_id.to_string(),
            payload,
        }
    }

    /// The event's data as JSON.
    pub fn data(&self) -> Value {
        let mut data = match &self.payload {
            WorkerPayload::Registered(info) | WorkerPayload::Heartbeat(info) => {
                serde_json::to_value(info).unwrap_or_else(|_| Value::Object(Default::default()))
            }
            WorkerPayload::Draining { last_known } => serde_json::to_value(EndingData {
                last_known: last_known.clone(),
                ..EndingData::default()
            })
            .unwrap_or_else(|_| Value::Object(Default::default())),
            WorkerPayload::Lost {
                reason,
                message,
                last_known,
            } => serde_json::to_value(EndingData {
                reason: Some(reason.clone()),
                message: message.clone(),
                last_known: last_known.clone(),
            })
            .unwrap_or_else(|_| Value::Object(Default::default())),
        };
        data["worker_id"] = Value::from(self.worker_id.clone());
        data
    }

    /// Encodes the event for Kafka (CloudEvents binary mode, key = worker id).
    pub fn encode(&self) -> EncodedEvent {
        EncodedEvent::keyed(
            &self.id,
            &self.source,
            self.payload.event_type().as_str(),
            self.time,
            &self.worker_id,
            &self.data(),
        )
    }

    /// A new event (fresh `ce_id`, the current time) of type `type_name` with `data`,
    /// checked as the projector would check it on the log (schema, `data.worker_id`).
    pub fn from_data(
        source: &str,
        worker_id: &str,
        type_name: &str,
        data: &Value,
    ) -> Result<WorkerEvent, Rejection> {
        let event_type = WorkerEventType::parse(type_name)
            .ok_or_else(|| Rejection::UnknownType(type_name.to_string()))?;
        let encoded = EncodedEvent::keyed(
            &Uuid::now_v7().to_string(),
            source,
            event_type.as_str(),
            Utc::now(),
            worker_id,
            data,
        );
        WorkerEvent::decode(&encoded.as_record())
    }

    /// Decodes and validates a record of the workers topic.
    pub fn decode(record: &RawRecord<'_>) -> Result<WorkerEvent, Rejection> {
        let KeyedRecord {
            attributes,
            event_type,
            data,
            key,
        } = read_keyed(
            record,
            WorkerEventType::parse,
            schema::validate_worker_event_data,
            "worker_id",
        )?;
        let payload = match event_type {
            WorkerEventType::Registered => WorkerPayload::Registered(typed(&data)?),
            WorkerEventType::Heartbeat => WorkerPayload::Heartbeat(typed(&data)?),
            WorkerEventType::Draining => {
                let d: EndingData = typed(&data)?;
                WorkerPayload::Draining {
                    last_known: d.last_known,
                }
            }
            WorkerEventType::Lost => {
                let d: EndingData = typed(&data)?;
                let ReasonMessage { reason, message } = typed(&data)?;
                WorkerPayload::Lost {
                    reason,
                    message,
                    last_known: d.last_known,
                }
            }
        };
        Ok(WorkerEvent {
            id: attributes.id,
            source: attributes.source,
            time: attributes.time,
            worker_id: key,
            payload,
        })
    }
}

/// Lifecycle state of a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerStatus {
    /// Taking work.
    Active,
    /// Finishing its work, taking no more.
    Draining,
    /// Gone: no heartbeat for too long.
    Lost,
}

impl WorkerStatus {
    /// All states.
    pub const ALL: &'static [WorkerStatus] = &[
        WorkerStatus::Active,
        WorkerStatus::Draining,
        WorkerStatus::Lost,
    ];

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerStatus::Active => "active",
            WorkerStatus::Draining => "draining",
            WorkerStatus::Lost => "lost",
        }
    }
}

impl std::fmt::Display for WorkerStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything known about a worker, folded from its events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerState {
    /// Worker id (its name).
    pub id: String,
    /// Current state.
    pub state: WorkerStatus,
    /// The latest description.
    #[serde(flatten)]
    pub info: WorkerInfo,
    /// When the current incarnation registered.
    pub registered_at: DateTime<Utc>,
    /// Time of the latest `registered` or `heartbeat`.
    pub last_heartbeat_at: DateTime<Utc>,
    /// Time of the last applied event.
    pub updated_at: DateTime<Utc>,
    /// Why it was lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Folds one worker event. Pure; a rejection changes nothing.
///
/// A heartbeat from a worker that was declared lost is refused: its attempts have been
/// ended already, and it must register again (which it does when it learns it was lost).
pub fn apply_worker(
    state: Option<&WorkerState>,
    event: &WorkerEvent,
) -> Result<WorkerState, Rejection> {
    let time = event.time;
    let illegal = |from: WorkerStatus| Rejection::IllegalWorkerTransition {
        from,
        event: event.payload.event_type().as_str(),
    };
    match (&event.payload, state) {
        (WorkerPayload::Registered(info), _) => Ok(WorkerState {
            id: event.worker_id.clone(),
            state: WorkerStatus::Active,
            info: info.clone(),
            registered_at: time,
            last_heartbeat_at: time,
            updated_at: time,
            reason: None,
        }),
        // A worker known only by its last record (the rest compacted away).
        (
            WorkerPayload::Draining {
                last_known: Some(known),
            }
            | WorkerPayload::Lost {
                last_known: Some(known),
                ..
            },
            None,
        ) => {
            let (state, reason) = match &event.payload {
                WorkerPayload::Lost { reason, .. } => (WorkerStatus::Lost, Some(reason.clone())),
                _ => (WorkerStatus::Draining, None),
            };
            Ok(WorkerState {
                id: event.worker_id.clone(),
                state,
                info: known.info.clone(),
                registered_at: known.registered_at.unwrap_or(time),
                last_heartbeat_at: known.last_heartbeat_at.unwrap_or(time),
                updated_at: time,
                reason,
            })
        }
        (_, None) => Err(Rejection::UnknownWorker(event.worker_id.clone())),
        (WorkerPayload::Heartbeat(info), Some(current)) => {
            if current.state == WorkerStatus::Lost {
                return Err(illegal(current.state));
            }
            if info.incarnation.is_some() && info.incarnation != current.info.incarnation {
                return Err(Rejection::IllegalWorkerTransition {
                    from: current.state,
                    event: "dev.tasklog.worker.heartbeat.v1 (from an earlier incarnation)",
                });
            }
            let mut next = current.clone();
            next.info = info.clone();
            next.last_heartbeat_at = next.last_heartbeat_at.max(time);
            next.updated_at = time;
            Ok(next)
        }
        (WorkerPayload::Draining { last_known }, Some(current)) => {
            if current.state != WorkerStatus::Active {
                return Err(illegal(current.state));
            }
            let mut next = current.with_last_known(last_known.as_deref());
            next.state = WorkerStatus::Draining;
            next.updated_at = time;
            Ok(next)
        }
        (
            WorkerPayload::Lost {
                reason, last_known, ..
            },
            Some(current),
        ) => {
            if current.state == WorkerStatus::Lost {
                return Err(illegal(current.state));
            }
            // Decided on an earlier incarnation's heartbeats: the worker registered again
            // since (a restart), so that decision is stale.
            if let Some(seen) = last_known
                .as_ref()
                .and_then(|k| k.info.incarnation.as_ref())
                && current.info.incarnation.as_ref() != Some(seen)
            {
                return Err(Rejection::IllegalWorkerTransition {
                    from: current.state,
                    event: "dev.tasklog.worker.lost.v1 (for an earlier incarnation)",
                });
            }
            let mut next = current.with_last_known(last_known.as_deref());
            next.state = WorkerStatus::Lost;
            next.reason = Some(reason.clone());
            next.updated_at = time;
            Ok(next)
        }
    }
}

impl WorkerState {
    /// This state with what an event's `last_known` says. After a full history the two
    /// agree; after compaction the state may have been built from a `draining` that did
    /// not know the registration time, and the later record knows better.
    fn with_last_known(&self, known: Option<&LastKnown>) -> WorkerState {
        let mut next = self.clone();
        if let Some(known) = known {
            next.info = known.info.clone();
            if let Some(at) = known.registered_at {
                next.registered_at = at;
            }
            if let Some(at) = known.last_heartbeat_at {
                next.last_heartbeat_at = at;
            }
        }
        next
    }
}

/// Whether `name` can be a worker id (letters, digits and `._:@-`, up to 256).
pub fn valid_worker_id(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(incarnation: &str) -> WorkerInfo {
        WorkerInfo {
            capacity: WorkerCapacity {
                cpu: 2.0,
                memory: 1 << 30,
                gpu: 1,
            },
            labels: [("zone".to_string(), "a".to_string())].into(),
            projects: vec!["ml".into()],
            hostname: Some("h".into()),
            pid: Some(7),
            incarnation: Some(incarnation.into()),
        }
    }

    #[test]
    fn every_worker_event_round_trips() {
        for payload in [
            WorkerPayload::Registered(info("a")),
            WorkerPayload::Heartbeat(info("a")),
            WorkerPayload::Draining { last_known: None },
            WorkerPayload::Draining {
                last_known: Some(Box::new(LastKnown {
                    info: info("a"),
                    ..LastKnown::default()
                })),
            },
            WorkerPayload::Lost {
                reason: "heartbeat_timeout".into(),
                message: Some("no heartbeat for 30s".into()),
                last_known: None,
            },
            WorkerPayload::Lost {
                reason: "heartbeat_timeout".into(),
                message: None,
                last_known: Some(Box::new(LastKnown {
                    info: info("a"),
                    registered_at: Some(Utc::now()),
                    last_heartbeat_at: Some(Utc::now()),
                })),
            },
        ] {
            let e = WorkerEvent::new("test", "gpu-1", payload.clone());
            let encoded = e.encode();
            let back = WorkerEvent::decode(&encoded.as_record()).expect("decodes");
            assert_eq!(back.payload, payload);
            assert_eq!(back.worker_id, "gpu-1");
        }
    }

    #[test]
    fn malformed_worker_events_are_rejected() {
        let e = WorkerEvent::new("t", "w1", WorkerPayload::Heartbeat(info("a")));
        let mut encoded = e.encode();
        encoded.key = "w2".into();
        assert_eq!(
            WorkerEvent::decode(&encoded.as_record())
                .unwrap_err()
                .code(),
            "subject_mismatch"
        );
        let mut encoded = e.encode();
        encoded.payload = br#"{"worker_id":"w1","capacity":{"cpu":-1,"memory":1}}"#.to_vec();
        assert_eq!(
            WorkerEvent::decode(&encoded.as_record())
                .unwrap_err()
                .code(),
            "schema_violation"
        );
    }

    #[test]
    fn the_worker_lifecycle() {
        let at = |p| WorkerEvent::new("t", "w", p);
        let w = apply_worker(None, &at(WorkerPayload::Registered(info("a")))).unwrap();
        assert_eq!(w.state, WorkerStatus::Active);
        let w = apply_worker(Some(&w), &at(WorkerPayload::Heartbeat(info("a")))).unwrap();
        assert_eq!(
            apply_worker(Some(&w), &at(WorkerPayload::Heartbeat(info("old"))))
                .unwrap_err()
                .code(),
            "illegal_transition"
        );
        let lost = at(WorkerPayload::Lost {
            reason: "heartbeat_timeout".into(),
            message: None,
            last_known: None,
        });
        let w = apply_worker(Some(&w), &lost).unwrap();
        assert_eq!(w.state, WorkerStatus::Lost);
        assert_eq!(
            apply_worker(Some(&w), &at(WorkerPayload::Heartbeat(info("a"))))
                .unwrap_err()
                .code(),
            "illegal_transition"
        );
        let w = apply_worker(Some(&w), &at(WorkerPayload::Registered(info("b")))).unwrap();
        assert_eq!((w.state, w.reason.as_deref()), (WorkerStatus::Active, None));
        let w = apply_worker(Some(&w), &at(WorkerPayload::Draining { last_known: None })).unwrap();
        assert_eq!(w.state, WorkerStatus::Draining);
        assert_eq!(
            apply_worker(None, &at(WorkerPayload::Draining { last_known: None }))
                .unwrap_err()
                .code(),
            "unknown_worker"
        );
    }

    /// A `lost` decided on an earlier incarnation's heartbeats loses to the worker's
    /// new registration (a restart while the scheduler still saw the old one).
    #[test]
    fn a_lost_for_an_earlier_incarnation_is_refused() {
        let at = |p| WorkerEvent::new("t", "w", p);
        let old = apply_worker(None, &at(WorkerPayload::Registered(info("a")))).unwrap();
        let restarted =
            apply_worker(Some(&old), &at(WorkerPayload::Registered(info("b")))).unwrap();
        let stale = at(WorkerPayload::Lost {
            reason: "heartbeat_timeout".into(),
            message: None,
            last_known: Some(Box::new(LastKnown::of(&old))),
        });
        assert_eq!(
            apply_worker(Some(&restarted), &stale).unwrap_err().code(),
            "illegal_transition"
        );
        assert_eq!(
            apply_worker(Some(&old), &stale).unwrap().state,
            WorkerStatus::Lost
        );
    }

    /// After compaction a worker's only record may be its `lost` or `draining`: with
    /// `last_known` the fold rebuilds the same state the full history gave.
    #[test]
    fn the_last_record_alone_rebuilds_a_compacted_worker() {
        let at = |p| WorkerEvent::new("t", "w", p);
        let registered = apply_worker(None, &at(WorkerPayload::Registered(info("a")))).unwrap();
        let beat =
            apply_worker(Some(&registered), &at(WorkerPayload::Heartbeat(info("a")))).unwrap();
        let lost = at(WorkerPayload::Lost {
            reason: "heartbeat_timeout".into(),
            message: None,
            last_known: Some(Box::new(LastKnown::of(&beat))),
        });
        let full = apply_worker(Some(&beat), &lost).unwrap();
        let compacted = apply_worker(None, &lost).unwrap();
        assert_eq!(compacted, full);
        assert_eq!(compacted.state, WorkerStatus::Lost);

        let draining = at(WorkerPayload::Draining {
            last_known: Some(Box::new(LastKnown::of(&beat))),
        });
        assert_eq!(
            apply_worker(None, &draining).unwrap(),
            apply_worker(Some(&beat), &draining).unwrap()
        );
    }
}
