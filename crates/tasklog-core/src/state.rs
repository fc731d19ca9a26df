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

use super::{Event, EventType, Payload, ReasonData, TaskSpec};

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
    /// The spec as submitted (shared with the submission event: states are cloned on
    /// every event, the spec never changes).
    pub spec: std::sync::Arc<TaskSpec>,
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
    /// When the task last entered `queued` (the scheduler's aging counts from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_at: Option<DateTime<Utc>>,
    /// Every attempt so far, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<Attempt>,
    /// Retries scheduled so far.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: u32,
    /// When the first failure happened (the retry window starts here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_failure_at: Option<DateTime<Utc>>,
    /// While waiting to be retried: when the task may be queued again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Whether the running attempt passed its probe (`ready` event).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ready: bool,
    /// The span that submitted it (`ce_traceparent` of `submitted`): its scheduler and
    /// worker events, log records and attempts join this trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<crate::trace::TraceContext>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One attempt to run a task: where, when, and how it ended.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Attempt {
    /// Attempt number, from 1.
    pub attempt: u32,
    /// The worker it was placed on (absent for an external executor that named none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    /// When it was assigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_at: Option<DateTime<Utc>>,
    /// When its process started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// OS process id on the worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// `succeeded`, `failed` or `cancelled`, once it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<TaskStatus>,
    /// Why it ended that way (error, timeout, interruption, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Exit code, when the process exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The signal that ended the process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// How long the process ran, as its worker measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// How an attempt ended, as recorded on it.
struct AttemptEnd<'a> {
    outcome: TaskStatus,
    reason: Option<&'a str>,
    exit_code: Option<i32>,
    signal: Option<i32>,
    duration_ms: Option<u64>,
}

impl TaskState {
    /// The events that cancel this (unfinished) task for `why`, to append in order
    /// from the next seq: a cancel request and, when nothing runs yet (pending or
    /// queued), the cancellation itself. A running attempt is stopped by its worker,
    /// which then reports `cancelled`.
    pub fn cancel_events(&self, why: ReasonData) -> Vec<Payload> {
        let mut events = vec![Payload::CancelRequested(why.clone())];
        if matches!(self.state, TaskStatus::Pending | TaskStatus::Queued) {
            events.push(Payload::Cancelled(why.into()));
        }
        events
    }

    /// The current attempt's record, if there is one.
    pub fn current_attempt(&self) -> Option<&Attempt> {
        self.attempts.last().filter(|a| a.attempt == self.attempt)
    }

    /// Records the end of the current attempt, if one is open.
    fn end_attempt(&mut self, time: DateTime<Utc>, end: AttemptEnd<'_>) {
        let attempt = self.attempt;
        if let Some(a) = self
            .attempts
            .last_mut()
            .filter(|a| a.attempt == attempt && a.finished_at.is_none())
        {
            a.finished_at = Some(time);
            a.outcome = Some(end.outcome);
            a.reason = end.reason.map(str::to_string);
            a.exit_code = end.exit_code;
            a.signal = end.signal;
            a.duration_ms = end.duration_ms;
        }
    }
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
    /// A `retry_scheduled` the task's retry policy does not allow.
    #[error("no retry allowed: {0}")]
    RetryNotAllowed(String),
    /// A service event about a service that was never created.
    #[error("service {0:?} was never created")]
    UnknownService(String),
    /// The service event is not allowed in the service's state.
    #[error("{0}")]
    IllegalServiceTransition(String),
    /// A revocation of a token that was never created.
    #[error("token {0:?} was never created")]
    UnknownToken(String),
    /// The auth event is not allowed in the token's state.
    #[error("{0}")]
    IllegalTokenTransition(String),
    /// A worker event about a worker that never registered.
    #[error("worker {0:?} never registered")]
    UnknownWorker(String),
    /// The worker event is not allowed in the worker's state.
    #[error("{event} is not allowed for a worker that is {from}")]
    IllegalWorkerTransition {
        /// The worker's state.
        from: super::worker::WorkerStatus,
        /// The event type.
        event: &'static str,
    },
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
            Rejection::UnknownWorker(_) => "unknown_worker",
            Rejection::RetryNotAllowed(_) => "retry_not_allowed",
            Rejection::UnknownService(_) => "unknown_service",
            Rejection::IllegalServiceTransition(_) => "illegal_transition",
            Rejection::IllegalWorkerTransition { .. } => "illegal_transition",
            Rejection::UnknownToken(_) => "unknown_token",
            Rejection::IllegalTokenTransition(_) => "illegal_transition",
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
                queued_at: spec.after.is_empty().then_some(time),
                attempts: Vec::new(),
                retries: 0,
                first_failure_at: None,
                next_attempt_at: None,
                ready: false,
                seq: 1,
                spec: spec.clone(),
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
                traceparent: event.envelope.traceparent,
            }),
            Payload::Submitted { .. } => Err(Rejection::SeqConflict {
                current: 0,
                got: event.seq,
            }),
            _ => Err(Rejection::UnknownTask(event.task_id)),
        };
    };

    if let Payload::Submitted { spec } = &event.payload {
        return Err(if *spec == current.spec {
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
    // Readiness belongs to one running attempt.
    if !matches!(
        event.payload,
        Payload::Ready { .. } | Payload::CancelRequested(_)
    ) {
        next.ready = false;
    }
    match &event.payload {
        Payload::Submitted { .. } => return Err(illegal()),
        Payload::CancelRequested(r) => {
            next.cancel_requested = true;
            next.reason = r.reason.clone().or_else(|| Some("cancel_requested".into()));
            next.message = r.message.clone();
        }
        Payload::Cancelled(c) => {
            check_attempt(current, c.attempt)?;
            next.state = TaskStatus::Cancelled;
            next.reason = c.reason.clone().or_else(|| Some("cancelled".into()));
            next.message = c.message.clone();
            next.finished_at = Some(time);
            next.end_attempt(
                time,
                AttemptEnd {
                    outcome: TaskStatus::Cancelled,
                    reason: next.reason.clone().as_deref(),
                    exit_code: c.exit_code,
                    signal: c.signal,
                    duration_ms: c.duration_ms,
                },
            );
        }
        Payload::Queued(_) => {
            if current.state != TaskStatus::Pending {
                return Err(illegal());
            }
            next.state = TaskStatus::Queued;
            // A retried task keeps its place: aging counts from when it first queued.
            next.queued_at.get_or_insert(time);
            next.next_attempt_at = None;
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
            if current.spec.is_external() {
                return Err(illegal());
            }
            next.state = TaskStatus::Assigned;
            next.attempt = *attempt;
            next.worker_id = Some(worker_id.clone());
            next.attempts.push(Attempt {
                attempt: *attempt,
                worker_id: Some(worker_id.clone()),
                assigned_at: Some(time),
                ..Attempt::default()
            });
        }
        Payload::Started {
            attempt,
            worker_id,
            pid,
        } => {
            // Tasks run by an outside system skip assignment: queued -> running.
            let external = current.spec.is_external() && current.state == TaskStatus::Queued;
            if current.state != TaskStatus::Assigned && !external {
                return Err(illegal());
            }
            let expected = if external {
                current.attempt + 1
            } else {
                current.attempt
            };
            if *attempt != expected {
                return Err(Rejection::AttemptMismatch {
                    expected,
                    got: *attempt,
                });
            }
            if external {
                next.attempt = *attempt;
                next.attempts.push(Attempt {
                    attempt: *attempt,
                    ..Attempt::default()
                });
            }
            next.state = TaskStatus::Running;
            if worker_id.is_some() {
                next.worker_id = worker_id.clone();
            }
            next.started_at = Some(time);
            if let Some(a) = next.attempts.last_mut() {
                a.started_at = Some(time);
                a.pid = *pid;
                if worker_id.is_some() {
                    a.worker_id = worker_id.clone();
                }
            }
        }
        Payload::Succeeded {
            attempt,
            exit_code,
            duration_ms,
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
            next.end_attempt(
                time,
                AttemptEnd {
                    outcome: TaskStatus::Succeeded,
                    reason: None,
                    exit_code: next.exit_code,
                    signal: None,
                    duration_ms: *duration_ms,
                },
            );
        }
        Payload::Ready { attempt } => {
            if current.state != TaskStatus::Running {
                return Err(illegal());
            }
            check_attempt(current, Some(*attempt))?;
            next.ready = true;
        }
        Payload::RetryScheduled {
            attempt,
            exit_code,
            signal,
            duration_ms,
            reason,
            message,
            next_attempt_at,
        } => {
            let ran = matches!(current.state, TaskStatus::Assigned | TaskStatus::Running);
            let unplaced = current.state == TaskStatus::Queued && reason == "no_capacity";
            if !(ran || unplaced) {
                return Err(illegal());
            }
            check_attempt(current, *attempt)?;
            if let super::retry::RetryDecision::Fail { reason, message } =
                super::retry::decide(current, reason, *exit_code, time)
            {
                return Err(Rejection::RetryNotAllowed(
                    message.unwrap_or_else(|| format!("the policy makes {reason} final")),
                ));
            }
            next.state = TaskStatus::Pending;
            next.retries += 1;
            next.first_failure_at.get_or_insert(time);
            next.next_attempt_at = Some(*next_attempt_at);
            next.reason = Some(reason.clone());
            next.message = message.clone();
            next.worker_id = None;
            if ran {
                next.exit_code = *exit_code;
                next.end_attempt(
                    time,
                    AttemptEnd {
                        outcome: TaskStatus::Failed,
                        reason: Some(reason),
                        exit_code: *exit_code,
                        signal: *signal,
                        duration_ms: *duration_ms,
                    },
                );
            }
        }
        Payload::Failed {
            attempt,
            exit_code,
            signal,
            duration_ms,
            reason,
            message,
        } => {
            check_attempt(current, *attempt)?;
            next.first_failure_at.get_or_insert(time);
            next.state = TaskStatus::Failed;
            next.exit_code = *exit_code;
            next.reason = Some(reason.clone());
            next.message = message.clone();
            next.finished_at = Some(time);
            next.end_attempt(
                time,
                AttemptEnd {
                    outcome: TaskStatus::Failed,
                    reason: Some(reason),
                    exit_code: *exit_code,
                    signal: *signal,
                    duration_ms: *duration_ms,
                },
            );
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
    use crate::ReasonData;

    fn spec() -> TaskSpec {
        TaskSpec {
            shell: Some("true".into()),
            retry: Some(serde_json::json!(true)),
            ..Default::default()
        }
    }

    fn submitted(id: Uuid, spec: TaskSpec) -> Event {
        Event::new(
            "test",
            id,
            1,
            Payload::Submitted {
                spec: std::sync::Arc::new(spec),
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
                spec: std::sync::Arc::new(spec()),
            },
            EventType::CancelRequested => Payload::CancelRequested(ReasonData::default()),
            EventType::Cancelled => Payload::Cancelled(Default::default()),
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
            EventType::Ready => Payload::Ready { attempt },
            EventType::RetryScheduled => Payload::RetryScheduled {
                attempt: Some(attempt),
                exit_code: Some(1),
                signal: None,
                duration_ms: None,
                reason: "error".into(),
                message: None,
                next_attempt_at: Utc::now(),
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
            (S::Assigned | S::Running, E::RetryScheduled) => Some(S::Pending),
            (S::Running, E::Ready) => Some(S::Running),
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
        let e = Event::new("t", id, 1, Payload::Cancelled(Default::default()));
        assert_eq!(apply(None, &e).unwrap_err(), Rejection::UnknownTask(id));
        let e = Event::new(
            "t",
            id,
            2,
            Payload::Submitted {
                spec: std::sync::Arc::new(spec()),
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
    fn attempts_are_recorded_and_external_tasks_start_from_queued() {
        let id = Uuid::now_v7();
        let mut external = spec();
        external.executor = Some("external".into());
        let t = apply(None, &submitted(id, external)).unwrap();
        let assign = Event::new("s", id, 2, payload_of(EventType::Assigned, 0));
        assert_eq!(
            apply(Some(&t), &assign).unwrap_err().code(),
            "illegal_transition",
            "external tasks are never assigned"
        );
        let start = Event::new(
            "spark",
            id,
            2,
            Payload::Started {
                attempt: 1,
                worker_id: Some("driver".into()),
                pid: None,
            },
        );
        let t = apply(Some(&t), &start).unwrap();
        assert_eq!((t.state, t.attempt), (TaskStatus::Running, 1));
        let failed = Event::new("spark", id, 3, payload_of(EventType::Failed, 1));
        let t = apply(Some(&t), &failed).unwrap();
        let a = t.current_attempt().unwrap();
        assert_eq!(a.worker_id.as_deref(), Some("driver"));
        assert_eq!(
            (a.outcome, a.exit_code, a.reason.as_deref()),
            (Some(TaskStatus::Failed), Some(1), Some("error"))
        );

        // A normal task: assigned opens the attempt, started fills the pid, cancelled
        // closes it with how the process ended.
        let id = Uuid::now_v7();
        let mut t = apply(None, &submitted(id, spec())).unwrap();
        t = apply(
            Some(&t),
            &Event::new("s", id, 2, payload_of(EventType::Assigned, 0)),
        )
        .unwrap();
        t = apply(
            Some(&t),
            &Event::new("w", id, 3, payload_of(EventType::Started, 1)),
        )
        .unwrap();
        let cancelled = Payload::Cancelled(crate::CancelledData {
            reason: Some("user".into()),
            attempt: Some(1),
            signal: Some(9),
            duration_ms: Some(1200),
            ..Default::default()
        });
        t = apply(Some(&t), &Event::new("w", id, 4, cancelled)).unwrap();
        assert_eq!(t.attempts.len(), 1);
        let a = &t.attempts[0];
        assert_eq!(a.worker_id.as_deref(), Some("w"));
        assert_eq!(a.pid, Some(1));
        assert_eq!(
            (a.outcome, a.signal, a.duration_ms),
            (Some(TaskStatus::Cancelled), Some(9), Some(1200))
        );
        assert!(a.assigned_at.is_some() && a.started_at.is_some() && a.finished_at.is_some());
    }

    #[test]
    fn retries_need_a_policy_that_allows_them() {
        let retry = |t: &TaskState| {
            Event::new(
                "w",
                t.id,
                t.seq + 1,
                payload_of(EventType::RetryScheduled, t.attempt),
            )
        };
        let mut t = task_in(TaskStatus::Running);
        let next = apply(Some(&t), &retry(&t)).unwrap();
        assert_eq!((next.state, next.retries), (TaskStatus::Pending, 1));
        assert!(next.first_failure_at.is_some() && next.next_attempt_at.is_some());
        assert_eq!(next.attempts.len(), t.attempts.len());
        std::sync::Arc::make_mut(&mut t.spec).retry = None;
        assert_eq!(
            apply(Some(&t), &retry(&t)).unwrap_err().code(),
            "retry_not_allowed"
        );
        std::sync::Arc::make_mut(&mut t.spec).retry = Some(serde_json::json!({"max_attempts": 1}));
        assert_eq!(
            apply(Some(&t), &retry(&t)).unwrap_err().code(),
            "retry_not_allowed"
        );
        std::sync::Arc::make_mut(&mut t.spec).retry = Some(serde_json::json!(true));
        t.cancel_requested = true;
        assert_eq!(
            apply(Some(&t), &retry(&t)).unwrap_err().code(),
            "retry_not_allowed"
        );
        // Requeued, the task keeps its place in the queue.
        let mut p = task_in(TaskStatus::Pending);
        let first_queued = p.submitted_at;
        p.queued_at = Some(first_queued);
        let q = apply(
            Some(&p),
            &Event::new("s", p.id, 6, Payload::Queued(ReasonData::default())),
        )
        .unwrap();
        assert_eq!(q.queued_at, Some(first_queued));
    }

    #[test]
    fn state_round_trips_through_json() {
        let t = task_in(TaskStatus::Running);
        let json = serde_json::to_value(&t).unwrap();
        let back: TaskState = serde_json::from_value(json).unwrap();
        assert_eq!(back, t);
    }
}
