//! Worker events and their pure fold into [`WorkerState`].
//!
//! Workers live on their own topic (`tasklog.workers`, keyed by worker id). Each
//! `registered` and `heartbeat` carries the worker's whole description, so the latest
//! record of a worker is enough to know it: the topic can be compacted.
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

/// Type-specific data of a worker event.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerPayload {
    /// The agent started (or restarted).
    Registered(WorkerInfo),
    /// The agent is alive.
    Heartbeat(WorkerInfo),
    /// The agent takes no new work and is finishing what it runs.
    Draining,
    /// The scheduler gave up on the worker: no heartbeat for too long.
    Lost {
        /// Why (`heartbeat_timeout`).
        reason: String,
        /// Detail.
        message: Option<String>,
    },
}

impl WorkerPayload {
    /// The event type of this payload.
    pub fn event_type(&self) -> WorkerEventType {
        match self {
            WorkerPayload::Registered(_) => WorkerEventType::Registered,
            WorkerPayload::Heartbeat(_) => WorkerEventType::Heartbeat,
            WorkerPayload::Draining => WorkerEventType::Draining,
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
            WorkerPayload::Draining => Value::Object(Default::default()),
            WorkerPayload::Lost { reason, message } => serde_json::to_value(ReasonMessage {
                reason: reason.clone(),
                message: message.clone(),
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
            WorkerEventType::Draining => WorkerPayload::Draining,
            WorkerEventType::Lost => {
                let d: ReasonMessage = typed(&data)?;
                WorkerPayload::Lost {
                    reason: d.reason,
                    message: d.message,
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
        (WorkerPayload::Draining, Some(current)) => {
            if current.state != WorkerStatus::Active {
                return Err(illegal(current.state));
            }
            let mut next = current.clone();
            next.state = WorkerStatus::Draining;
            next.updated_at = time;
            Ok(next)
        }
        (WorkerPayload::Lost { reason, .. }, Some(current)) => {
            if current.state == WorkerStatus::Lost {
                return Err(illegal(current.state));
            }
            let mut next = current.clone();
            next.state = WorkerStatus::Lost;
            next.reason = Some(reason.clone());
            next.updated_at = time;
            Ok(next)
        }
    }
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
            WorkerPayload::Draining,
            WorkerPayload::Lost {
                reason: "heartbeat_timeout".into(),
                message: Some("no heartbeat for 30s".into()),
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
        let w = apply_worker(Some(&w), &at(WorkerPayload::Draining)).unwrap();
        assert_eq!(w.state, WorkerStatus::Draining);
        assert_eq!(
            apply_worker(None, &at(WorkerPayload::Draining))
                .unwrap_err()
                .code(),
            "unknown_worker"
        );
    }
}
