//! The task state machine: a pure fold of events into [`TaskState`].
//!
//! ```text
//!   submitted ──► pending ──queued──► queued ──assigned──► assigned ──started──► running
//!                  │                    │                    │                     │
//!                  └──────── cancelled / failed (any non-terminal state) ──────────┤
//!                                                                      succeeded ◄─┘
//! ```
//!
//! `apply` checks the per-task sequence number first (optimistic concurrency: an event
//! must carry the task's current `seq + 1`), then the transition. A rejected event
//! changes nothing; the projector records it and dead-letters it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Event, EventType, Payload, TaskSpec};

/// Lifecycle state of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Waiting for dependencies (or, later, a retry backoff).
    Pending,
    /// Eligible to run.
    Queued,
    /// Placed on a worker, not started yet.
    Assigned,
    /// Running.
    Running,
    /// Finished successfully (terminal).
    Succeeded,
    /// Finished unsuccessfully (terminal).
    Failed,
    /// Cancelled (terminal).
    Cancelled,
}

impl TaskStatus {
    /// All states, in lifecycle order.
    pub const ALL: &'static [TaskStatus] = &[
        TaskStatus::Pending,
        TaskStatus::Queued,
        TaskStatus::Assigned,
        TaskStatus::Running,
        TaskStatus::Succeeded,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ];

    /// The lowercase name used in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Queued => "queued",
            TaskStatus::Assigned => "assigned",
            TaskStatus::Running => "running",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    /// Parses a state name.
    pub fn parse(s: &str) -> Option<TaskStatus> {
        TaskStatus::ALL.iter().copied().find(|t| t.as_str() == s)
    }

    /// Whether no further transition is possible.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Succeeded | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }
}

impl std::fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything known about a task, as folded from its events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskState {
    /// Task id.
    pub id: Uuid,
    /// Current state.
    pub state: TaskStatus,
    /// Sequence number of the last applied event.
    pub seq: u64,
    /// The spec as submitted.
    pub spec: TaskSpec,
    /// `ce_source` of the submission.
    pub submitted_by: String,
    /// `ce_time` of the submission.
    pub submitted_at: DateTime<Utc>,
    /// `ce_time` of the last applied event.
    pub updated_at: DateTime<Utc>,
    /// Whether a cancel was requested.
    #[serde(default)]
    pub cancel_requested: bool,
    /// Reason of the last reason-carrying event (cancel, failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Detail for `reason`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Current attempt number (0 before the first assignment).
    #[serde(default)]
    pub attempt: u32,
    /// Worker of the current attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    /// Exit code of the last finished attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// When the current attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When the task reached a terminal state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
}

/// Why an event was not applied. `code()` is the stable machine-readable reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    /// The record value is not JSON.
    #[error("the data is not valid JSON: {0}")]
    InvalidJson(String),
    /// A CloudEvents attribute is missing or malformed.
    #[error("invalid CloudEvents envelope: {0}")]
    InvalidEnvelope(String),
    /// `ce_type` names no known event type.
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    /// The data does not match its type's JSON Schema.
    #[error("schema violation: {0}")]
    SchemaViolation(String),
    /// Key, subject and `data.task_id` disagree.
    #[error("{0}")]
    SubjectMismatch(String),
    /// The event's `seq` is not the task's next one.
    #[error("seq {got} does not follow the task's seq {current} (expected {})", current + 1)]
    SeqConflict {
        /// The task's current seq.
        current: u64,
        /// The event's seq.
        got: u64,
    },
    /// The event is not allowed in the task's state.
    #[error("{event} is not allowed in state {from}")]
    IllegalTransition {
        /// The task's state.
        from: TaskStatus,
        /// The event type.
        event: EventType,
    },
    /// The event is about a task that was never submitted.
    #[error("task {0} was never submitted")]
    UnknownTask(Uuid),
    /// A `ce_id` that was already applied.
    #[error("ce_id {0:?} was already applied")]
    DuplicateCeId(String),
    /// The same task was submitted again with the same spec (an idempotent retry).
    #[error("task {0} was already submitted with the same spec")]
    DuplicateSubmission(Uuid),
    /// The same task id (idempotency key) was submitted with a different spec.
    #[error("task {0} was already submitted with a different spec")]
    IdempotencyConflict(Uuid),
    /// The attempt number does not match the task's attempt.
    #[error("attempt {got} does not match the task's attempt {expected}")]
    AttemptMismatch {
        /// The attempt the event should carry.
        expected: u32,
        /// The attempt it carries.
        got: u32,
    },
}

impl Rejection {
    /// The stable reason code recorded in `rejected_events` and on dead letters.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::InvalidJson(_) => "invalid_json",
            Rejection::InvalidEnvelope(_) => "invalid_envelope",
            Rejection::UnknownType(_) => "unknown_type",
            Rejection::SchemaViolation(_) => "schema_violation",
            Rejection::SubjectMismatch(_) => "subject_mismatch",
            Rejection::SeqConflict { .. } => "seq_conflict",
            Rejection::IllegalTransition { .. } => "illegal_transition",
            Rejection::UnknownTask(_) => "unknown_task",
            Rejection::DuplicateCeId(_) => "duplicate_ce_id",
            Rejection::DuplicateSubmission(_) => "duplicate_submission",
            Rejection::IdempotencyConflict(_) => "idempotency_conflict",
            Rejection::AttemptMismatch { .. } => "attempt_mismatch",
        }
    }
}

/// Folds one event into a task's state. `state` is `None` for a task not seen before.
///
/// Pure: the same inputs always give the same output, and a rejection changes nothing.
pub fn apply(state: Option<&TaskState>, event: &Event) -> Result<TaskState, Rejection> {
    let time = event.envelope.time;
    let Some(current) = state else {
        return match &event.payload {
            Payload::Submitted { spec } if event.seq == 1 => Ok(TaskState {
                id: event.task_id,
                state: if spec.after.is_empty() {
                    TaskStatus::Queued
                } else {
                    TaskStatus::Pending
                },
                seq: 1,
                spec: (**spec).clone(),
                submitted_by: event.envelope.source.clone(),
                submitted_at: time,
                updated_at: time,
                cancel_requested: false,
                reason: None,
                message: None,
                attempt: 0,
                worker_id: None,
                exit_code: None,
                started_at: None,
                finished_at: None,
            }),
            Payload::Submitted { .. } => Err(Rejection::SeqConflict {
                current: 0,
                got: event.seq,
            }),
            _ => Err(Rejection::UnknownTask(event.task_id)),
        };
    };

    if let Payload::Submitted { spec } = &event.payload {
        return Err(if **spec == current.spec {
            Rejection::DuplicateSubmission(current.id)
        } else {
            Rejection::IdempotencyConflict(current.id)
        });
    }
    if event.seq != current.seq + 1 {
        return Err(Rejection::SeqConflict {
            current: current.seq,
            got: event.seq,
        });
    }
    let illegal = || Rejection::IllegalTransition {
        from: current.state,
        event: event.envelope.event_type,
    };
    if current.state.is_terminal() {
        return Err(illegal());
    }

    let mut next = current.clone();
    next.seq = event.seq;
    next.updated_at = time;
    match &event.payload {
        Payload::Submitted { .. } => return Err(illegal()),
        Payload::CancelRequested(r) => {
            next.cancel_requested = true;
            next.reason = r.reason.clone().or_else(|| Some("cancel_requested".into()));
            next.message = r.message.clone();
        }
        Payload::Cancelled(r) => {
            next.state = TaskStatus::Cancelled;
            next.reason = r.reason.clone().or_else(|| Some("cancelled".into()));
            next.message = r.message.clone();
            next.finished_at = Some(time);
        }
        Payload::Queued(_) => {
            if current.state != TaskStatus::Pending {
                return Err(illegal());
            }
            next.state = TaskStatus::Queued;
        }
        Payload::Assigned { worker_id, attempt } => {
            if current.state != TaskStatus::Queued || current.cancel_requested {
                return Err(illegal());
            }
            if *attempt != current.attempt + 1 {
                return Err(Rejection::AttemptMismatch {
                    expected: current.attempt + 1,
                    got: *attempt,
                });
            }
            next.state = TaskStatus::Assigned;
            next.attempt = *attempt;
            next.worker_id = Some(worker_id.clone());
        }
        Payload::Started {
            attempt, worker_id, ..
        } => {
            if current.state != TaskStatus::Assigned {
                return Err(illegal());
            }
            if *attempt != current.attempt {
                return Err(Rejection::AttemptMismatch {
                    expected: current.attempt,
                    got: *attempt,
                });
            }
            next.state = TaskStatus::Running;
            if worker_id.is_some() {
                next.worker_id = worker_id.clone();
            }
            next.started_at = Some(time);
        }
        Payload::Succeeded {
            attempt, exit_code, ..
        } => {
            if current.state != TaskStatus::Running {
                return Err(illegal());
            }
            check_attempt(current, *attempt)?;
            next.state = TaskStatus::Succeeded;
            next.exit_code = exit_code.or(Some(0));
            next.reason = None;
            next.message = None;
            next.finished_at = Some(time);
        }
        Payload::Failed {
            attempt,
            exit_code,
            reason,
            message,
            ..
        } => {
            check_attempt(current, *attempt)?;
            next.state = TaskStatus::Failed;
            next.exit_code = *exit_code;
            next.reason = Some(reason.clone());
            next.message = message.clone();
            next.finished_at = Some(time);
        }
    }
    Ok(next)
}

fn check_attempt(current: &TaskState, attempt: Option<u32>) -> Result<(), Rejection> {
    match attempt {
        Some(got) if got != current.attempt => Err(Rejection::AttemptMismatch {
            expected: current.attempt,
            got,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::ReasonData;

    fn spec() -> TaskSpec {
        TaskSpec {
            shell: Some("true".into()),
            ..Default::default()
        }
    }

    fn submitted(id: Uuid, spec: TaskSpec) -> Event {
        Event::new(
            "test",
            id,
            1,
            Payload::Submitted {
                spec: Box::new(spec),
            },
        )
    }

    /// A task in `status` with seq 5 and attempt 1.
    fn task_in(status: TaskStatus) -> TaskState {
        let mut t = apply(None, &submitted(Uuid::now_v7(), spec())).unwrap();
        t.state = status;
        t.seq = 5;
        t.attempt = 1;
        t
    }

    fn payload_of(event_type: EventType, attempt: u32) -> Payload {
        match event_type {
            EventType::Submitted => Payload::Submitted {
                spec: Box::new(spec()),
            },
            EventType::CancelRequested => Payload::CancelRequested(ReasonData::default()),
            EventType::Cancelled => Payload::Cancelled(ReasonData::default()),
            EventType::Queued => Payload::Queued(ReasonData::default()),
            EventType::Assigned => Payload::Assigned {
                worker_id: "w".into(),
                attempt: attempt + 1,
            },
            EventType::Started => Payload::Started {
                attempt,
                worker_id: None,
                pid: Some(1),
            },
            EventType::Succeeded => Payload::Succeeded {
                attempt: Some(attempt),
                exit_code: Some(0),
                duration_ms: None,
            },
            EventType::Failed => Payload::Failed {
                attempt: Some(attempt),
                exit_code: Some(1),
                signal: None,
                duration_ms: None,
                reason: "error".into(),
                message: None,
            },
        }
    }

    /// The complete transition table: (from, event) -> Some(to) when legal.
    fn expected(from: TaskStatus, event: EventType) -> Option<TaskStatus> {
        use EventType as E;
        use TaskStatus as S;
        if from.is_terminal() {
            return None;
        }
        match (from, event) {
            (_, E::Submitted) => None,
            (s, E::CancelRequested) => Some(s),
            (_, E::Cancelled) => Some(S::Cancelled),
            (_, E::Failed) => Some(S::Failed),
            (S::Pending, E::Queued) => Some(S::Queued),
            (S::Queued, E::Assigned) => Some(S::Assigned),
            (S::Assigned, E::Started) => Some(S::Running),
            (S::Running, E::Succeeded) => Some(S::Succeeded),
            _ => None,
        }
    }

    #[test]
    fn every_transition_legal_and_illegal() {
        for &from in TaskStatus::ALL {
            for &event_type in EventType::ALL {
                let task = task_in(from);
                let event = Event::new("t", task.id, 6, payload_of(event_type, task.attempt));
                let result = apply(Some(&task), &event);
                match expected(from, event_type) {
                    Some(to) => {
                        let next = result.unwrap_or_else(|r| {
                            panic!("{from} + {event_type} should be legal, got {r}")
                        });
                        assert_eq!(next.state, to, "{from} + {event_type}");
                        assert_eq!(next.seq, 6);
                    }
                    None => {
                        let r = result.expect_err(&format!("{from} + {event_type} is illegal"));
                        let code = r.code();
                        assert!(
                            matches!(code, "illegal_transition" | "duplicate_submission"),
                            "{from} + {event_type}: {code}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_new_task_is_queued_or_pending_on_dependencies() {
        let t = apply(None, &submitted(Uuid::now_v7(), spec())).unwrap();
        assert_eq!((t.state, t.seq, t.attempt), (TaskStatus::Queued, 1, 0));
        let mut with_deps = spec();
        with_deps.after = vec![Uuid::now_v7()];
        let t = apply(None, &submitted(Uuid::now_v7(), with_deps)).unwrap();
        assert_eq!(t.state, TaskStatus::Pending);
    }

    #[test]
    fn first_event_must_be_submitted_with_seq_1() {
        let id = Uuid::now_v7();
        let e = Event::new("t", id, 1, Payload::Cancelled(ReasonData::default()));
        assert_eq!(apply(None, &e).unwrap_err(), Rejection::UnknownTask(id));
        let e = Event::new(
            "t",
            id,
            2,
            Payload::Submitted {
                spec: Box::new(spec()),
            },
        );
        assert_eq!(apply(None, &e).unwrap_err().code(), "seq_conflict");
    }

    #[test]
    fn seq_must_follow() {
        let task = task_in(TaskStatus::Queued);
        for seq in [5, 7, 100] {
            let e = Event::new(
                "t",
                task.id,
                seq,
                Payload::CancelRequested(ReasonData::default()),
            );
            assert_eq!(
                apply(Some(&task), &e).unwrap_err(),
                Rejection::SeqConflict {
                    current: 5,
                    got: seq
                }
            );
        }
    }

    #[test]
    fn resubmission_is_duplicate_or_conflict() {
        let id = Uuid::now_v7();
        let task = apply(None, &submitted(id, spec())).unwrap();
        assert_eq!(
            apply(Some(&task), &submitted(id, spec())).unwrap_err(),
            Rejection::DuplicateSubmission(id)
        );
        let mut other = spec();
        other.priority = Some(99);
        assert_eq!(
            apply(Some(&task), &submitted(id, other)).unwrap_err(),
            Rejection::IdempotencyConflict(id)
        );
    }

    #[test]
    fn assignment_after_cancel_request_loses() {
        let mut task = task_in(TaskStatus::Queued);
        task.cancel_requested = true;
        let e = Event::new("t", task.id, 6, payload_of(EventType::Assigned, 1));
        assert_eq!(
            apply(Some(&task), &e).unwrap_err().code(),
            "illegal_transition"
        );
    }

    #[test]
    fn attempts_must_match() {
        let task = task_in(TaskStatus::Queued);
        let e = Event::new(
            "t",
            task.id,
            6,
            Payload::Assigned {
                worker_id: "w".into(),
                attempt: 5,
            },
        );
        assert_eq!(
            apply(Some(&task), &e).unwrap_err(),
            Rejection::AttemptMismatch {
                expected: 2,
                got: 5
            }
        );
        let task = task_in(TaskStatus::Running);
        let e = Event::new("t", task.id, 6, payload_of(EventType::Succeeded, 3));
        assert_eq!(
            apply(Some(&task), &e).unwrap_err().code(),
            "attempt_mismatch"
        );
    }

    #[test]
    fn full_lifecycle_records_times_and_outcome() {
        let id = Uuid::now_v7();
        let mut t = apply(None, &submitted(id, spec())).unwrap();
        for (seq, et) in [
            (2, EventType::Assigned),
            (3, EventType::Started),
            (4, EventType::Succeeded),
        ] {
            let attempt = if et == EventType::Assigned { 0 } else { 1 };
            t = apply(Some(&t), &Event::new("w", id, seq, payload_of(et, attempt))).unwrap();
        }
        assert_eq!(t.state, TaskStatus::Succeeded);
        assert_eq!(t.attempt, 1);
        assert_eq!(t.worker_id.as_deref(), Some("w"));
        assert_eq!(t.exit_code, Some(0));
        assert!(t.started_at.is_some() && t.finished_at.is_some());
    }

    #[test]
    fn state_round_trips_through_json() {
        let t = task_in(TaskStatus::Running);
        let json = serde_json::to_value(&t).unwrap();
        let back: TaskState = serde_json::from_value(json).unwrap();
        assert_eq!(back, t);
    }
}
