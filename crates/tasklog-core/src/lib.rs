//! tasklog's domain: the CloudEvents envelope, the event types and their data, task
//! specs, and the pure folds of tasks ([`state::apply`]), workers ([`worker`]) and
//! services ([`service`]), with retry decisions ([`retry`]).
//!
//! A crate of its own so that the compiler, not a comment, keeps it pure: it depends on
//! no async runtime, no Kafka client and no Postgres driver. The projector, the API and
//! the replay and audit tools all decode, validate and fold events through it, so they
//! can never disagree — and an auditor can build a verifier from it alone.
//! (`tasklog` re-exports it as `tasklog::events`.)
//!
//! Wire format: CloudEvents 1.0 in Kafka *binary* mode. The attributes travel as
//! `ce_*` record headers, the data is the record value (JSON), the record key is the
//! task id. See `README.md` for a worked example with `kcat`.

pub mod audit;
pub mod auth;
pub mod fold;
pub mod idempotency;
pub mod probe;
pub mod retry;
pub mod schema;
pub mod service;
pub mod spec;
pub mod state;
pub mod text;
pub mod trace;
pub mod worker;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

pub use spec::TaskSpec;
pub use state::{Attempt, Rejection, TaskState, TaskStatus, apply};

/// CloudEvents spec version tasklog writes and accepts.
pub const SPEC_VERSION: &str = "1.0";
/// The only content type tasklog accepts for event data.
pub const CONTENT_TYPE: &str = "application/json";

/// Names of the Kafka headers that carry the CloudEvents attributes (binary mode).
pub mod header {
    /// `ce_specversion`: always `1.0`.
    pub const SPEC_VERSION: &str = "ce_specversion";
    /// `ce_id`: unique id of the event (a UUID for events tasklog writes).
    pub const ID: &str = "ce_id";
    /// `ce_source`: URI of whoever produced the event.
    pub const SOURCE: &str = "ce_source";
    /// `ce_type`: the event type, e.g. `dev.tasklog.task.submitted.v1`.
    pub const TYPE: &str = "ce_type";
    /// `ce_time`: RFC 3339 timestamp.
    pub const TIME: &str = "ce_time";
    /// `ce_subject`: the task id.
    pub const SUBJECT: &str = "ce_subject";
    /// `content-type`: `application/json`.
    pub const CONTENT_TYPE: &str = "content-type";
    /// `ce_tasklogprincipal`: who caused the event (the API token's name), a
    /// CloudEvents extension attribute. Optional: events from the scheduler, or from
    /// producers writing to Kafka directly, may carry none.
    pub const PRINCIPAL: &str = "ce_tasklogprincipal";
    /// `ce_traceparent`: the W3C trace context of the span that caused the event (the
    /// CloudEvents distributed-tracing extension). Optional; an unreadable one is no
    /// context (see [`crate::trace`]).
    pub const TRACEPARENT: &str = "ce_traceparent";
}

/// Every event type tasklog understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    /// `dev.tasklog.task.submitted.v1`
    Submitted,
    /// `dev.tasklog.task.cancel_requested.v1`
    CancelRequested,
    /// `dev.tasklog.task.cancelled.v1`
    Cancelled,
    /// `dev.tasklog.task.queued.v1`
    Queued,
    /// `dev.tasklog.task.assigned.v1`
    Assigned,
    /// `dev.tasklog.task.started.v1`
    Started,
    /// `dev.tasklog.task.succeeded.v1`
    Succeeded,
    /// `dev.tasklog.task.failed.v1`
    Failed,
    /// `dev.tasklog.task.retry_scheduled.v1`
    RetryScheduled,
    /// `dev.tasklog.task.ready.v1`
    Ready,
}

impl EventType {
    /// All event types, in a fixed order.
    pub const ALL: &'static [EventType] = &[
        EventType::Submitted,
        EventType::CancelRequested,
        EventType::Cancelled,
        EventType::Queued,
        EventType::Assigned,
        EventType::Started,
        EventType::Succeeded,
        EventType::Failed,
        EventType::RetryScheduled,
        EventType::Ready,
    ];

    /// The `ce_type` string.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Submitted => "dev.tasklog.task.submitted.v1",
            EventType::CancelRequested => "dev.tasklog.task.cancel_requested.v1",
            EventType::Cancelled => "dev.tasklog.task.cancelled.v1",
            EventType::Queued => "dev.tasklog.task.queued.v1",
            EventType::Assigned => "dev.tasklog.task.assigned.v1",
            EventType::Started => "dev.tasklog.task.started.v1",
            EventType::Succeeded => "dev.tasklog.task.succeeded.v1",
            EventType::Failed => "dev.tasklog.task.failed.v1",
            EventType::RetryScheduled => "dev.tasklog.task.retry_scheduled.v1",
            EventType::Ready => "dev.tasklog.task.ready.v1",
        }
    }

    /// Parses a `ce_type` string.
    pub fn parse(s: &str) -> Option<EventType> {
        EventType::ALL.iter().copied().find(|t| t.as_str() == s)
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The CloudEvents attributes of one event.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// `ce_id`.
    pub id: String,
    /// `ce_source`.
    pub source: String,
    /// `ce_type`.
    pub event_type: EventType,
    /// `ce_time`.
    pub time: DateTime<Utc>,
    /// `ce_subject`: the task id.
    pub subject: Uuid,
    /// `ce_tasklogprincipal`: who caused it, when known.
    pub principal: Option<String>,
    /// `ce_traceparent`: the span that caused it, when known.
    pub traceparent: Option<trace::TraceContext>,
}

/// Reason and free-text message carried by cancel and queue events.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ReasonData {
    /// Machine-readable reason code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Data of `cancelled`: why, and how the attempt it stopped ended (when one ran).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CancelledData {
    /// Machine-readable reason code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The attempt that was stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Its exit code, when it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The signal that ended it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// How long it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

impl From<ReasonData> for CancelledData {
    fn from(r: ReasonData) -> CancelledData {
        CancelledData {
            reason: r.reason,
            message: r.message,
            ..CancelledData::default()
        }
    }
}

/// Type-specific part of an event's data.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// A new task.
    Submitted {
        /// The spec as submitted.
        spec: std::sync::Arc<TaskSpec>,
    },
    /// A request to cancel.
    CancelRequested(ReasonData),
    /// The task was cancelled (with the attempt it ended, if one was running).
    Cancelled(CancelledData),
    /// Dependencies satisfied.
    Queued(ReasonData),
    /// Placed on a worker.
    Assigned {
        /// The worker.
        worker_id: String,
        /// Attempt number, from 1.
        attempt: u32,
    },
    /// The attempt started.
    Started {
        /// Attempt number, from 1.
        attempt: u32,
        /// The worker running it.
        worker_id: Option<String>,
        /// OS process id.
        pid: Option<u32>,
    },
    /// The attempt succeeded.
    Succeeded {
        /// Attempt number.
        attempt: Option<u32>,
        /// Process exit code.
        exit_code: Option<i32>,
        /// Attempt duration.
        duration_ms: Option<u64>,
    },
    /// The attempt failed (or nothing could fit the task) and the policy retries it.
    RetryScheduled {
        /// The attempt that failed (`None` for no_capacity).
        attempt: Option<u32>,
        /// Process exit code.
        exit_code: Option<i32>,
        /// Signal that ended the process.
        signal: Option<i32>,
        /// Attempt duration.
        duration_ms: Option<u64>,
        /// Why: error, timeout, interruption, no_capacity.
        reason: String,
        /// Detail.
        message: Option<String>,
        /// When the task may be queued again.
        next_attempt_at: DateTime<Utc>,
    },
    /// The running attempt passed its probe: ready.
    Ready {
        /// The attempt.
        attempt: u32,
    },
    /// The task failed.
    Failed {
        /// Attempt number.
        attempt: Option<u32>,
        /// Process exit code.
        exit_code: Option<i32>,
        /// Signal that ended the process.
        signal: Option<i32>,
        /// Attempt duration.
        duration_ms: Option<u64>,
        /// Why: error, timeout, interruption, no_capacity, ...
        reason: String,
        /// Detail.
        message: Option<String>,
    },
}

impl Payload {
    /// The event type this payload belongs to.
    pub fn event_type(&self) -> EventType {
        match self {
            Payload::Submitted { .. } => EventType::Submitted,
            Payload::CancelRequested(_) => EventType::CancelRequested,
            Payload::Cancelled(_) => EventType::Cancelled,
            Payload::Queued(_) => EventType::Queued,
            Payload::Assigned { .. } => EventType::Assigned,
            Payload::Started { .. } => EventType::Started,
            Payload::Succeeded { .. } => EventType::Succeeded,
            Payload::Failed { .. } => EventType::Failed,
            Payload::RetryScheduled { .. } => EventType::RetryScheduled,
            Payload::Ready { .. } => EventType::Ready,
        }
    }
}

/// A decoded, schema-valid event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// CloudEvents attributes.
    pub envelope: Envelope,
    /// Task id (equals `envelope.subject` and the record key).
    pub task_id: Uuid,
    /// Per-task sequence number.
    pub seq: u64,
    /// Typed data.
    pub payload: Payload,
    /// The data exactly as it was on the log.
    pub data: Value,
}

/// A record as read from (or about to be written to) Kafka, without any Kafka types.
#[derive(Debug, Clone, Default)]
pub struct RawRecord<'a> {
    /// Record key.
    pub key: Option<&'a [u8]>,
    /// Record headers in order; a header may have no value.
    pub headers: Vec<(&'a str, Option<&'a [u8]>)>,
    /// Record value.
    pub payload: Option<&'a [u8]>,
}

impl RawRecord<'_> {
    /// The last value of header `name` as UTF-8, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.and_then(|b| std::str::from_utf8(b).ok()))
    }
}

/// An event ready to append: key, headers and value.
#[derive(Debug, Clone)]
pub struct EncodedEvent {
    /// Record key: the task id.
    pub key: String,
    /// Record headers (CloudEvents binary mode).
    pub headers: Vec<(&'static str, String)>,
    /// Record value: the JSON data.
    pub payload: Vec<u8>,
    /// `ce_id`, for finding the event again.
    pub ce_id: String,
    /// `ce_type`.
    pub event_type: &'static str,
}

impl EncodedEvent {
    /// The same event, recording who caused it (`ce_tasklogprincipal`).
    pub fn with_principal(mut self, principal: &str) -> EncodedEvent {
        self.headers.retain(|(name, _)| *name != header::PRINCIPAL);
        self.headers
            .push((header::PRINCIPAL, principal.to_string()));
        self
    }

    /// The same event, in the trace of `context` (`ce_traceparent`); `None` leaves it
    /// as it is.
    pub fn with_traceparent(mut self, context: Option<&trace::TraceContext>) -> EncodedEvent {
        if let Some(context) = context {
            self.headers
                .retain(|(name, _)| *name != header::TRACEPARENT);
            self.headers
                .push((header::TRACEPARENT, context.to_string()));
        }
        self
    }

    /// Its `ce_traceparent`, when it has one.
    pub fn traceparent(&self) -> Option<trace::TraceContext> {
        self.headers
            .iter()
            .rev()
            .find(|(name, _)| *name == header::TRACEPARENT)
            .and_then(|(_, v)| trace::TraceContext::parse(v).ok())
    }

    /// The record as a consumer would read it back.
    pub fn as_record(&self) -> RawRecord<'_> {
        RawRecord {
            key: Some(self.key.as_bytes()),
            headers: self
                .headers
                .iter()
                .map(|(k, v)| (*k, Some(v.as_bytes())))
                .collect(),
            payload: Some(&self.payload),
        }
    }

    /// An event about an entity keyed by name (a worker, a service): the name is the
    /// record key and `ce_subject`.
    pub(crate) fn keyed(
        id: &str,
        source: &str,
        event_type: &'static str,
        time: DateTime<Utc>,
        key: &str,
        data: &Value,
    ) -> EncodedEvent {
        EncodedEvent {
            key: key.to_string(),
            headers: headers_for(id, source, event_type, time, key),
            payload: serde_json::to_vec(data).unwrap_or_default(),
            ce_id: id.to_string(),
            event_type,
        }
    }
}

/// A keyed entity's record (a worker or service event), read up to its typed data.
pub(crate) struct KeyedRecord<T> {
    /// Its CloudEvents attributes.
    pub attributes: Attributes,
    /// Its type.
    pub event_type: T,
    /// Its data, valid against the type's schema.
    pub data: Value,
    /// The entity's name (`data.<key field>`, equal to the record key and `ce_subject`).
    pub key: String,
}

/// Reads a keyed entity's record: attributes, type (`parse`), data valid against the
/// type's schema (`validate`), and the name in `data.<key_field>`.
pub(crate) fn read_keyed<T: Copy>(
    record: &RawRecord<'_>,
    parse: fn(&str) -> Option<T>,
    validate: fn(T, &Value) -> Result<(), String>,
    key_field: &str,
) -> Result<KeyedRecord<T>, Rejection> {
    let attributes = Attributes::read(record)?;
    let event_type = parse(&attributes.type_name)
        .ok_or_else(|| Rejection::UnknownType(attributes.type_name.clone()))?;
    let data = json_value(record)?;
    validate(event_type, &data).map_err(Rejection::SchemaViolation)?;
    let key = keyed_subject(record, &attributes, &data, key_field)?;
    Ok(KeyedRecord {
        attributes,
        event_type,
        data,
        key,
    })
}

/// `{reason, message?}`: the data of an event that ends something for a reason (a
/// worker lost, a service failed).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ReasonMessage {
    /// Reason code.
    pub reason: String,
    /// Detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The name in `data.<field>` of a keyed entity's event, checked against `ce_subject`
/// and the record key.
fn keyed_subject(
    record: &RawRecord<'_>,
    attributes: &Attributes,
    data: &Value,
    field: &str,
) -> Result<String, Rejection> {
    let name = data
        .get(field)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if name != attributes.subject || record.key.is_some_and(|k| k != name.as_bytes()) {
        return Err(Rejection::SubjectMismatch(format!(
            "data.{field} {name:?} differs from the record key or ce_subject {:?}",
            attributes.subject
        )));
    }
    Ok(name)
}

impl Event {
    /// Builds a new event with a fresh `ce_id` and the current time.
    pub fn new(source: &str, task_id: Uuid, seq: u64, payload: Payload) -> Event {
        let data = payload_to_data(task_id, seq, &payload);
        Event {
            envelope: Envelope {
                id: Uuid::now_v7().to_string(),
                source: source.to_string(),
                event_type: payload.event_type(),
                time: Utc::now(),
                subject: task_id,
                principal: None,
                traceparent: None,
            },
            task_id,
            seq,
            payload,
            data,
        }
    }

    /// Encodes the event for Kafka in CloudEvents binary mode.
    pub fn encode(&self) -> EncodedEvent {
        let encoded = EncodedEvent {
            key: self.task_id.to_string(),
            headers: headers_for(
                &self.envelope.id,
                &self.envelope.source,
                self.envelope.event_type.as_str(),
                self.envelope.time,
                &self.task_id.to_string(),
            ),
            payload: serde_json::to_vec(&self.data).unwrap_or_default(),
            ce_id: self.envelope.id.clone(),
            event_type: self.envelope.event_type.as_str(),
        };
        let encoded = match &self.envelope.principal {
            Some(p) => encoded.with_principal(p),
            None => encoded,
        };
        encoded.with_traceparent(self.envelope.traceparent.as_ref())
    }

    /// Decodes and validates a record. Any problem is a [`Rejection`] naming it.
    pub fn decode(record: &RawRecord<'_>) -> Result<Event, Rejection> {
        let attributes = Attributes::read(record)?;
        let event_type = EventType::parse(&attributes.type_name)
            .ok_or_else(|| Rejection::UnknownType(attributes.type_name.clone()))?;
        let subject = Uuid::parse_str(&attributes.subject).map_err(|_| {
            Rejection::InvalidEnvelope(format!(
                "{} {:?} is not a UUID",
                header::SUBJECT,
                attributes.subject
            ))
        })?;
        let (id, source, time, principal, traceparent) = (
            attributes.id,
            attributes.source,
            attributes.time,
            attributes.principal,
            attributes.traceparent,
        );
        let data = json_value(record)?;
        schema::validate_event_data(event_type, &data).map_err(Rejection::SchemaViolation)?;
        let (task_id, seq, payload) = data_to_payload(event_type, &data)?;
        if task_id != subject {
            return Err(Rejection::SubjectMismatch(format!(
                "data.task_id {task_id} differs from {} {subject}",
                header::SUBJECT
            )));
        }
        if let Some(key) = record.key {
            let matches = std::str::from_utf8(key)
                .ok()
                .and_then(|k| Uuid::parse_str(k).ok())
                == Some(task_id);
            if !matches {
                return Err(Rejection::SubjectMismatch(format!(
                    "record key {:?} differs from task id {task_id}",
                    String::from_utf8_lossy(key)
                )));
            }
        }
        Ok(Event {
            envelope: Envelope {
                id,
                source,
                event_type,
                time,
                subject,
                principal,
                traceparent,
            },
            task_id,
            seq,
            payload,
            data,
        })
    }
}

/// The CloudEvents attributes of a record, checked for presence and form but not yet
/// for meaning (type and subject are parsed by the decoder of each kind of event).
pub(crate) struct Attributes {
    pub(crate) id: String,
    pub(crate) source: String,
    pub(crate) type_name: String,
    pub(crate) time: DateTime<Utc>,
    pub(crate) subject: String,
    pub(crate) principal: Option<String>,
    pub(crate) traceparent: Option<trace::TraceContext>,
}

impl Attributes {
    /// Reads and checks the `ce_*` headers and the content type.
    pub(crate) fn read(record: &RawRecord<'_>) -> Result<Attributes, Rejection> {
        let envelope_error = |m: String| Rejection::InvalidEnvelope(m);
        let required = |name: &str| {
            record
                .header(name)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| envelope_error(format!("header {name} is missing or not UTF-8")))
        };
        let spec_version = required(header::SPEC_VERSION)?;
        if spec_version != SPEC_VERSION {
            return Err(envelope_error(format!(
                "{} is {spec_version:?}, expected {SPEC_VERSION:?}",
                header::SPEC_VERSION
            )));
        }
        let type_name = required(header::TYPE)?.to_string();
        let id = required(header::ID)?.to_string();
        let source = required(header::SOURCE)?.to_string();
        let time = required(header::TIME)?;
        let time = DateTime::parse_from_rfc3339(time)
            .map_err(|e| envelope_error(format!("{} {time:?} is not RFC 3339: {e}", header::TIME)))?
            .with_timezone(&Utc);
        let subject = required(header::SUBJECT)?.to_string();
        if let Some(content_type) = record.header(header::CONTENT_TYPE) {
            let media_type = content_type.split(';').next().unwrap_or("").trim();
            if !media_type.eq_ignore_ascii_case(CONTENT_TYPE) {
                return Err(envelope_error(format!(
                    "content-type {content_type:?} is not {CONTENT_TYPE}"
                )));
            }
        }
        // A principal is a claim, checked only for form: whoever may write to the
        // topic directly may claim any (the broker's ACLs decide who that is).
        let principal = match record.header(header::PRINCIPAL) {
            None => None,
            Some(p) if !p.is_empty() && p.len() <= 256 && !p.chars().any(char::is_control) => {
                Some(p.to_string())
            }
            Some(p) => {
                return Err(envelope_error(format!(
                    "{} {p:?} is empty, longer than 256 or holds control characters",
                    header::PRINCIPAL
                )));
            }
        };
        // Tracing is advisory: an unreadable ce_traceparent is no context, not a reason
        // to refuse the event (it stays on the log as it was written).
        let traceparent = trace::TraceContext::read(record.header(header::TRACEPARENT));
        Ok(Attributes {
            id,
            source,
            type_name,
            time,
            subject,
            principal,
            traceparent,
        })
    }
}

/// The record value parsed as JSON.
pub(crate) fn json_value(record: &RawRecord<'_>) -> Result<Value, Rejection> {
    let bytes = record
        .payload
        .ok_or_else(|| Rejection::InvalidJson("the record has no value".into()))?;
    serde_json::from_slice(bytes).map_err(|e| Rejection::InvalidJson(e.to_string()))
}

/// The CloudEvents headers of an event tasklog writes.
pub(crate) fn headers_for(
    id: &str,
    source: &str,
    type_name: &str,
    time: DateTime<Utc>,
    subject: &str,
) -> Vec<(&'static str, String)> {
    vec![
        (header::SPEC_VERSION, SPEC_VERSION.to_string()),
        (header::ID, id.to_string()),
        (header::SOURCE, source.to_string()),
        (header::TYPE, type_name.to_string()),
        (
            header::TIME,
            time.to_rfc3339_opts(SecondsFormat::Micros, true),
        ),
        (header::SUBJECT, subject.to_string()),
        (header::CONTENT_TYPE, CONTENT_TYPE.to_string()),
    ]
}

#[derive(Deserialize)]
struct Common {
    task_id: Uuid,
    seq: u64,
}

#[derive(Deserialize)]
struct SubmittedData {
    spec: TaskSpec,
}

#[derive(Deserialize)]
struct AssignedData {
    worker_id: String,
    attempt: u32,
}

#[derive(Deserialize)]
struct StartedData {
    attempt: u32,
    worker_id: Option<String>,
    pid: Option<u32>,
}

#[derive(Deserialize)]
struct SucceededData {
    attempt: Option<u32>,
    exit_code: Option<i32>,
    duration_ms: Option<u64>,
}

#[derive(Deserialize)]
struct AssignedAttempt {
    attempt: u32,
}

#[derive(Deserialize)]
struct RetryScheduledData {
    attempt: Option<u32>,
    exit_code: Option<i32>,
    signal: Option<i32>,
    duration_ms: Option<u64>,
    reason: String,
    message: Option<String>,
    next_attempt_at: DateTime<Utc>,
}

#[derive(Deserialize)]
struct FailedData {
    attempt: Option<u32>,
    exit_code: Option<i32>,
    signal: Option<i32>,
    duration_ms: Option<u64>,
    reason: String,
    message: Option<String>,
}

/// `data` as a `T`; a mismatch is a schema violation.
pub(crate) fn typed<T: for<'de> Deserialize<'de>>(data: &Value) -> Result<T, Rejection> {
    T::deserialize(data).map_err(|e| Rejection::SchemaViolation(e.to_string()))
}

fn data_to_payload(event_type: EventType, data: &Value) -> Result<(Uuid, u64, Payload), Rejection> {
    let common: Common = typed(data)?;
    let payload = match event_type {
        EventType::Submitted => {
            let d: SubmittedData = typed(data)?;
            d.spec
                .check()
                .map_err(|e| Rejection::SchemaViolation(format!("spec.{e}")))?;
            Payload::Submitted {
                spec: std::sync::Arc::new(d.spec),
            }
        }
        EventType::CancelRequested => Payload::CancelRequested(typed(data)?),
        EventType::Cancelled => Payload::Cancelled(typed(data)?),
        EventType::Queued => Payload::Queued(typed(data)?),
        EventType::Assigned => {
            let d: AssignedData = typed(data)?;
            Payload::Assigned {
                worker_id: d.worker_id,
                attempt: d.attempt,
            }
        }
        EventType::Started => {
            let d: StartedData = typed(data)?;
            Payload::Started {
                attempt: d.attempt,
                worker_id: d.worker_id,
                pid: d.pid,
            }
        }
        EventType::Succeeded => {
            let d: SucceededData = typed(data)?;
            Payload::Succeeded {
                attempt: d.attempt,
                exit_code: d.exit_code,
                duration_ms: d.duration_ms,
            }
        }
        EventType::Ready => {
            let d: AssignedAttempt = typed(data)?;
            Payload::Ready { attempt: d.attempt }
        }
        EventType::RetryScheduled => {
            let d: RetryScheduledData = typed(data)?;
            Payload::RetryScheduled {
                attempt: d.attempt,
                exit_code: d.exit_code,
                signal: d.signal,
                duration_ms: d.duration_ms,
                reason: d.reason,
                message: d.message,
                next_attempt_at: d.next_attempt_at,
            }
        }
        EventType::Failed => {
            let d: FailedData = typed(data)?;
            Payload::Failed {
                attempt: d.attempt,
                exit_code: d.exit_code,
                signal: d.signal,
                duration_ms: d.duration_ms,
                reason: d.reason,
                message: d.message,
            }
        }
    };
    Ok((common.task_id, common.seq, payload))
}

fn payload_to_data(task_id: Uuid, seq: u64, payload: &Payload) -> Value {
    let mut data = serde_json::Map::new();
    data.insert("task_id".into(), Value::String(task_id.to_string()));
    data.insert("seq".into(), Value::from(seq));
    let mut put = |k: &str, v: Value| {
        if !v.is_null() {
            data.insert(k.to_string(), v);
        }
    };
    match payload {
        Payload::Submitted { spec } => {
            put("spec", serde_json::to_value(spec).unwrap_or(Value::Null));
        }
        Payload::Cancelled(c) => {
            if let Value::Object(fields) = serde_json::to_value(c).unwrap_or_default() {
                for (k, v) in fields {
                    put(&k, v);
                }
            }
        }
        Payload::CancelRequested(r) | Payload::Queued(r) => {
            put(
                "reason",
                serde_json::to_value(&r.reason).unwrap_or_default(),
            );
            put(
                "message",
                serde_json::to_value(&r.message).unwrap_or_default(),
            );
        }
        Payload::Assigned { worker_id, attempt } => {
            put("worker_id", Value::from(worker_id.clone()));
            put("attempt", Value::from(*attempt));
        }
        Payload::Started {
            attempt,
            worker_id,
            pid,
        } => {
            put("attempt", Value::from(*attempt));
            put(
                "worker_id",
                serde_json::to_value(worker_id).unwrap_or_default(),
            );
            put("pid", serde_json::to_value(pid).unwrap_or_default());
        }
        Payload::Succeeded {
            attempt,
            exit_code,
            duration_ms,
        } => {
            put("attempt", serde_json::to_value(attempt).unwrap_or_default());
            put(
                "exit_code",
                serde_json::to_value(exit_code).unwrap_or_default(),
            );
            put(
                "duration_ms",
                serde_json::to_value(duration_ms).unwrap_or_default(),
            );
        }
        Payload::Ready { attempt } => put("attempt", Value::from(*attempt)),
        Payload::Failed {
            attempt,
            exit_code,
            signal,
            duration_ms,
            reason,
            message,
        }
        | Payload::RetryScheduled {
            attempt,
            exit_code,
            signal,
            duration_ms,
            reason,
            message,
            ..
        } => {
            put("attempt", serde_json::to_value(attempt).unwrap_or_default());
            put(
                "exit_code",
                serde_json::to_value(exit_code).unwrap_or_default(),
            );
            put("signal", serde_json::to_value(signal).unwrap_or_default());
            put(
                "duration_ms",
                serde_json::to_value(duration_ms).unwrap_or_default(),
            );
            put("reason", Value::from(reason.clone()));
            put("message", serde_json::to_value(message).unwrap_or_default());
            if let Payload::RetryScheduled {
                next_attempt_at, ..
            } = payload
            {
                put(
                    "next_attempt_at",
                    Value::from(next_attempt_at.to_rfc3339_opts(SecondsFormat::Micros, true)),
                );
            }
        }
    }
    Value::Object(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submitted() -> Event {
        let spec = TaskSpec {
            shell: Some("echo hi".into()),
            ..Default::default()
        };
        Event::new(
            "tasklog://test",
            Uuid::now_v7(),
            1,
            Payload::Submitted {
                spec: std::sync::Arc::new(spec),
            },
        )
    }

    #[test]
    fn encode_then_decode_round_trips() {
        let event = submitted();
        let encoded = event.encode();
        let decoded = Event::decode(&encoded.as_record()).expect("decodes");
        assert_eq!(decoded.task_id, event.task_id);
        assert_eq!(decoded.seq, 1);
        assert_eq!(decoded.payload, event.payload);
        assert_eq!(decoded.envelope.id, event.envelope.id);
        // Microsecond precision survives the trip.
        assert_eq!(
            decoded.envelope.time.timestamp_micros(),
            event.envelope.time.timestamp_micros()
        );
    }

    #[test]
    fn every_payload_round_trips_and_validates() {
        let id = Uuid::now_v7();
        let reason = ReasonData {
            reason: Some("user".into()),
            message: None,
        };
        let payloads = vec![
            Payload::CancelRequested(reason.clone()),
            Payload::Cancelled(reason.clone().into()),
            Payload::Queued(ReasonData::default()),
            Payload::Assigned {
                worker_id: "w1".into(),
                attempt: 1,
            },
            Payload::Started {
                attempt: 1,
                worker_id: Some("w1".into()),
                pid: Some(42),
            },
            Payload::Succeeded {
                attempt: Some(1),
                exit_code: Some(0),
                duration_ms: Some(5),
            },
            Payload::Failed {
                attempt: Some(1),
                exit_code: Some(3),
                signal: None,
                duration_ms: None,
                reason: "error".into(),
                message: Some("boom".into()),
            },
            Payload::RetryScheduled {
                attempt: Some(1),
                exit_code: Some(3),
                signal: None,
                duration_ms: Some(10),
                reason: "error".into(),
                message: None,
                next_attempt_at: DateTime::from_timestamp_micros(1_800_000_000_123_456).unwrap(),
            },
            Payload::Ready { attempt: 2 },
        ];
        // Every type but `submitted` (tested on its own) is here.
        let covered: Vec<EventType> = payloads.iter().map(Payload::event_type).collect();
        assert_eq!(covered, EventType::ALL[1..]);
        for p in payloads {
            let e = Event::new("s", id, 2, p.clone());
            let encoded = e.encode();
            let decoded = Event::decode(&encoded.as_record()).expect("decodes");
            assert_eq!(decoded.payload, p);
        }
    }

    fn rejection_code(
        mutate: impl FnOnce(&mut Vec<(&'static str, String)>, &mut Vec<u8>),
    ) -> String {
        let mut encoded = submitted().encode();
        mutate(&mut encoded.headers, &mut encoded.payload);
        Event::decode(&encoded.as_record())
            .unwrap_err()
            .code()
            .to_string()
    }

    #[test]
    fn malformed_records_are_rejected_with_their_reason() {
        assert_eq!(
            rejection_code(|_, p| *p = b"{not json".to_vec()),
            "invalid_json"
        );
        assert_eq!(
            rejection_code(|h, _| h.retain(|(k, _)| *k != header::ID)),
            "invalid_envelope"
        );
        assert_eq!(
            rejection_code(|h, _| h[0].1 = "0.3".into()),
            "invalid_envelope"
        );
        assert_eq!(
            rejection_code(|h, _| h[3].1 = "dev.tasklog.task.exploded.v1".into()),
            "unknown_type"
        );
        assert_eq!(
            rejection_code(|h, _| h[4].1 = "yesterday".into()),
            "invalid_envelope"
        );
        assert_eq!(
            rejection_code(|h, _| h[5].1 = Uuid::now_v7().to_string()),
            "subject_mismatch"
        );
        assert_eq!(
            rejection_code(|h, _| h[6].1 = "text/plain".into()),
            "invalid_envelope"
        );
        assert_eq!(
            rejection_code(|_, p| {
                let mut v: Value = serde_json::from_slice(p).unwrap();
                v["spec"]["priority"] = Value::from(1000);
                *p = serde_json::to_vec(&v).unwrap();
            }),
            "schema_violation"
        );
    }

    #[test]
    fn the_key_must_be_the_task() {
        let encoded = submitted().encode();
        let mut record = encoded.as_record();
        record.key = Some(b"someone-else");
        assert_eq!(
            Event::decode(&record).unwrap_err().code(),
            "subject_mismatch"
        );
        record.key = None;
        assert!(Event::decode(&record).is_ok(), "a missing key is tolerated");
    }

    #[test]
    fn content_type_parameters_are_allowed() {
        let mut encoded = submitted().encode();
        encoded.headers[6].1 = "application/json; charset=utf-8".into();
        assert!(Event::decode(&encoded.as_record()).is_ok());
    }
}
