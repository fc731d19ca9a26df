//! Services: long-running tasks with replicas, kept at their replica count by the
//! scheduler's service controller. Service events live on `tasklog.services`, keyed by
//! the service name; the replicas are ordinary tasks (with `service` and `replica` set
//! in their spec) on `tasklog.events`.
//!
//! ```text
//!   created ──► active ──stop_requested──► stopping ──(all replicas ended)──► stopped
//!                 │  ▲ scaled                   
//!                 └──┴──── failed (a replica failed and no retry applies: fail-fast)
//! ```

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::{
    EncodedEvent, KeyedRecord, RawRecord, ReasonMessage, Rejection, TaskState, TaskStatus,
    read_keyed, schema, typed,
};

/// Every service event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceEventType {
    /// `dev.tasklog.service.created.v1`
    Created,
    /// `dev.tasklog.service.scaled.v1`
    Scaled,
    /// `dev.tasklog.service.stop_requested.v1`
    StopRequested,
    /// `dev.tasklog.service.stopped.v1`
    Stopped,
    /// `dev.tasklog.service.failed.v1`
    Failed,
}

impl ServiceEventType {
    /// All service event types.
    pub const ALL: &'static [ServiceEventType] = &[
        ServiceEventType::Created,
        ServiceEventType::Scaled,
        ServiceEventType::StopRequested,
        ServiceEventType::Stopped,
        ServiceEventType::Failed,
    ];

    /// The `ce_type` string.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceEventType::Created => "dev.tasklog.service.created.v1",
            ServiceEventType::Scaled => "dev.tasklog.service.scaled.v1",
            ServiceEventType::StopRequested => "dev.tasklog.service.stop_requested.v1",
            ServiceEventType::Stopped => "dev.tasklog.service.stopped.v1",
            ServiceEventType::Failed => "dev.tasklog.service.failed.v1",
        }
    }

    /// Parses a `ce_type` string.
    pub fn parse(s: &str) -> Option<ServiceEventType> {
        ServiceEventType::ALL
            .iter()
            .copied()
            .find(|t| t.as_str() == s)
    }
}

/// What a service runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Replica count.
    pub replicas: u32,
    /// The task spec every replica runs (its `retry` and `probe` may be given here or
    /// beside it).
    pub template: Value,
    /// Retry policy of each replica (overrides the template's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Value>,
    /// Health probe of each replica (overrides the template's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<Value>,
}

impl ServiceSpec {
    /// The project of the service and its replicas: its template's (default
    /// [`crate::auth::DEFAULT_PROJECT`]).
    pub fn project(&self) -> &str {
        self.template
            .get("project")
            .and_then(Value::as_str)
            .unwrap_or(crate::auth::DEFAULT_PROJECT)
    }

    /// The template with the service's `retry` and `probe` put in (they override the
    /// template's own): what every replica's spec starts from.
    pub fn template_with_policies(&self) -> Value {
        let mut template = self.template.clone();
        if let Value::Object(fields) = &mut template {
            if let Some(r) = &self.retry {
                fields.insert("retry".into(), r.clone());
            }
            if let Some(p) = &self.probe {
                fields.insert("probe".into(), p.clone());
            }
        }
        template
    }
}

/// Most replicas a service may ask for.
pub const MAX_REPLICAS: u32 = 1000;

/// The latest of `items` (replica tasks, oldest first; `task` reads one's state) for
/// each replica index.
pub fn latest_replicas<T>(items: &[T], task: impl Fn(&T) -> &TaskState) -> BTreeMap<u32, &T> {
    let mut latest = BTreeMap::new();
    for item in items {
        if let Some(i) = task(item).spec.replica {
            latest.insert(i, item);
        }
    }
    latest
}

/// Whether a replica is ready: running, and its probe passed (without a probe,
/// running is enough).
pub fn replica_ready(task: &TaskState) -> bool {
    task.state == TaskStatus::Running && (task.ready || task.spec.probe.is_none())
}

/// Type-specific data of a service event.
#[derive(Debug, Clone, PartialEq)]
pub enum ServicePayload {
    /// A new service (or a new incarnation of a stopped or failed one).
    Created(Box<ServiceSpec>),
    /// A new replica count.
    Scaled {
        /// Replicas wanted.
        replicas: u32,
    },
    /// Stop every replica.
    StopRequested,
    /// Every replica has ended after a stop.
    Stopped,
    /// A replica failed with no retry left: the service failed (fail-fast).
    Failed {
        /// Why (`replica_failed`).
        reason: String,
        /// Detail.
        message: Option<String>,
    },
}

impl ServicePayload {
    /// The event type of this payload.
    pub fn event_type(&self) -> ServiceEventType {
        match self {
            ServicePayload::Created(_) => ServiceEventType::Created,
            ServicePayload::Scaled { .. } => ServiceEventType::Scaled,
            ServicePayload::StopRequested => ServiceEventType::StopRequested,
            ServicePayload::Stopped => ServiceEventType::Stopped,
            ServicePayload::Failed { .. } => ServiceEventType::Failed,
        }
    }
}

/// A decoded, schema-valid service event.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceEvent {
    /// `ce_id`.
    pub id: String,
    /// `ce_source`.
    pub source: String,
    /// `ce_time`.
    pub time: DateTime<Utc>,
    /// The service name (key, subject and `data.service`).
    pub service: String,
    /// Typed data.
    pub payload: ServicePayload,
    /// `ce_traceparent`: the span that caused it, when known.
    pub traceparent: Option<crate::trace::TraceContext>,
}

#[derive(Deserialize)]
struct ScaledData {
    replicas: u32,
}

#[derive(Deserialize)]
struct CreatedData {
    spec: ServiceSpec,
}

impl ServiceEvent {
    /// A new event with a fresh `ce_id` and the current time.
    pub fn new(source: &str, service: &str, payload: ServicePayload) -> ServiceEvent {
        ServiceEvent {
            id: Uuid::now_v7().to_string(),
            source: source.to_string(),
            time: Utc::now(),
            service: service.to_string(),
            payload,
            traceparent: None,
        }
    }

    /// The event's data as JSON.
    pub fn data(&self) -> Value {
        let mut data = match &self.payload {
            ServicePayload::Created(spec) => serde_json::json!({ "spec": spec }),
            ServicePayload::Scaled { replicas } => serde_json::json!({ "replicas": replicas }),
            ServicePayload::StopRequested | ServicePayload::Stopped => serde_json::json!({}),
            ServicePayload::Failed { reason, message } => serde_json::to_value(ReasonMessage {
                reason: reason.clone(),
                message: message.clone(),
            })
            .unwrap_or_else(|_| Value::Object(Default::default())),
        };
        data["service"] = Value::from(self.service.clone());
        data
    }

    /// Encodes the event for Kafka (CloudEvents binary mode, key = service name).
    pub fn encode(&self) -> EncodedEvent {
        EncodedEvent::keyed(
            &self.id,
            &self.source,
            self.payload.event_type().as_str(),
            self.time,
            &self.service,
            &self.data(),
        )
        .with_traceparent(self.traceparent.as_ref())
    }

    /// Decodes and validates a record of the services topic.
    pub fn decode(record: &RawRecord<'_>) -> Result<ServiceEvent, Rejection> {
        let KeyedRecord {
            attributes,
            event_type,
            data,
            key,
        } = read_keyed(
            record,
            ServiceEventType::parse,
            schema::validate_service_event_data,
            "service",
        )?;
        let payload = match event_type {
            ServiceEventType::Created => {
                ServicePayload::Created(Box::new(typed::<CreatedData>(&data)?.spec))
            }
            ServiceEventType::Scaled => ServicePayload::Scaled {
                replicas: typed::<ScaledData>(&data)?.replicas,
            },
            ServiceEventType::StopRequested => ServicePayload::StopRequested,
            ServiceEventType::Stopped => ServicePayload::Stopped,
            ServiceEventType::Failed => {
                let d: ReasonMessage = typed(&data)?;
                ServicePayload::Failed {
                    reason: d.reason,
                    message: d.message,
                }
            }
        };
        Ok(ServiceEvent {
            id: attributes.id,
            source: attributes.source,
            time: attributes.time,
            service: key,
            payload,
            traceparent: attributes.traceparent,
        })
    }
}

/// Lifecycle state of a service (what was asked for; the status users see is derived
/// from this and the replicas: see [`derive_status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceLifecycle {
    /// Kept at its replica count.
    Active,
    /// Replicas are being stopped.
    Stopping,
    /// Stopped (terminal until created again).
    Stopped,
    /// Failed (terminal until created again).
    Failed,
}

impl ServiceLifecycle {
    /// Whether the service has ended.
    pub fn is_terminal(self) -> bool {
        matches!(self, ServiceLifecycle::Stopped | ServiceLifecycle::Failed)
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceLifecycle::Active => "active",
            ServiceLifecycle::Stopping => "stopping",
            ServiceLifecycle::Stopped => "stopped",
            ServiceLifecycle::Failed => "failed",
        }
    }
}

/// Everything known about a service, folded from its events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceState {
    /// Name.
    pub name: String,
    /// Lifecycle.
    pub lifecycle: ServiceLifecycle,
    /// The current spec (replicas as last scaled).
    pub spec: ServiceSpec,
    /// Counts `created` and `scaled` events: replica task ids derive from it, so a
    /// replica index reused after a scale-down gets a new task.
    pub generation: u32,
    /// When the current incarnation was created.
    pub created_at: DateTime<Utc>,
    /// Last applied event.
    pub updated_at: DateTime<Utc>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The trace the current incarnation was created in: its replicas join it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<crate::trace::TraceContext>,
}

/// Folds one service event. Pure.
pub fn apply_service(
    state: Option<&ServiceState>,
    event: &ServiceEvent,
) -> Result<ServiceState, Rejection> {
    let time = event.time;
    let illegal = |from: &str| {
        Rejection::IllegalServiceTransition(format!(
            "{} is not allowed for a service that is {from}",
            event.payload.event_type().as_str()
        ))
    };
    match (&event.payload, state) {
        (ServicePayload::Created(spec), current) => {
            if let Some(c) = current
                && !c.lifecycle.is_terminal()
            {
                return Err(illegal(c.lifecycle.as_str()));
            }
            Ok(ServiceState {
                name: event.service.clone(),
                lifecycle: ServiceLifecycle::Active,
                spec: (**spec).clone(),
                generation: current.map_or(1, |c| c.generation + 1),
                created_at: time,
                updated_at: time,
                reason: None,
                message: None,
                traceparent: event.traceparent,
            })
        }
        (_, None) => Err(Rejection::UnknownService(event.service.clone())),
        (ServicePayload::Scaled { replicas }, Some(c)) => {
            if c.lifecycle != ServiceLifecycle::Active {
                return Err(illegal(c.lifecycle.as_str()));
            }
            let mut next = c.clone();
            next.spec.replicas = *replicas;
            next.generation += 1;
            next.updated_at = time;
            Ok(next)
        }
        (ServicePayload::StopRequested, Some(c)) => {
            if c.lifecycle != ServiceLifecycle::Active {
                return Err(illegal(c.lifecycle.as_str()));
            }
            let mut next = c.clone();
            next.lifecycle = ServiceLifecycle::Stopping;
            next.updated_at = time;
            Ok(next)
        }
        (ServicePayload::Stopped, Some(c)) => {
            if c.lifecycle != ServiceLifecycle::Stopping {
                return Err(illegal(c.lifecycle.as_str()));
            }
            let mut next = c.clone();
            next.lifecycle = ServiceLifecycle::Stopped;
            next.updated_at = time;
            Ok(next)
        }
        (ServicePayload::Failed { reason, message }, Some(c)) => {
            if c.lifecycle != ServiceLifecycle::Active {
                return Err(illegal(c.lifecycle.as_str()));
            }
            let mut next = c.clone();
            next.lifecycle = ServiceLifecycle::Failed;
            next.reason = Some(reason.clone());
            next.message = message.clone();
            next.updated_at = time;
            Ok(next)
        }
    }
}

/// The status users see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceStatus {
    /// Replicas are starting; none has failed and not all are ready yet, and none was
    /// ready before.
    Provisioning,
    /// Every wanted replica is ready.
    Running,
    /// Some ready, some not.
    Degraded,
    /// None ready, still retrying.
    Down,
    /// Failed.
    Failed,
    /// Stopped (or stopping).
    Stopped,
}

impl ServiceStatus {
    /// All statuses.
    pub const ALL: &'static [ServiceStatus] = &[
        ServiceStatus::Provisioning,
        ServiceStatus::Running,
        ServiceStatus::Degraded,
        ServiceStatus::Down,
        ServiceStatus::Failed,
        ServiceStatus::Stopped,
    ];

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceStatus::Provisioning => "provisioning",
            ServiceStatus::Running => "running",
            ServiceStatus::Degraded => "degraded",
            ServiceStatus::Down => "down",
            ServiceStatus::Failed => "failed",
            ServiceStatus::Stopped => "stopped",
        }
    }
}

/// Derives the status from the lifecycle, the wanted count, how many replicas are
/// ready, and whether any replica has ever failed an attempt (a service that was never
/// complete and never failed is still provisioning). Pure.
pub fn derive_status(
    lifecycle: ServiceLifecycle,
    wanted: u32,
    ready: u32,
    any_failure: bool,
) -> ServiceStatus {
    match lifecycle {
        ServiceLifecycle::Failed => ServiceStatus::Failed,
        ServiceLifecycle::Stopping | ServiceLifecycle::Stopped => ServiceStatus::Stopped,
        ServiceLifecycle::Active if wanted > 0 && ready >= wanted => ServiceStatus::Running,
        ServiceLifecycle::Active if wanted == 0 => ServiceStatus::Running,
        ServiceLifecycle::Active if !any_failure => ServiceStatus::Provisioning,
        ServiceLifecycle::Active if ready > 0 => ServiceStatus::Degraded,
        ServiceLifecycle::Active => ServiceStatus::Down,
    }
}

/// The task id of replica `index` in generation `generation` of service `name`:
/// deterministic, so a controller that submits it twice (a failover) submits one task.
pub fn replica_task_id(name: &str, created_at: DateTime<Utc>, generation: u32, index: u32) -> Uuid {
    let key = format!(
        "tasklog/service/{name}/{}/{generation}/{index}",
        created_at.timestamp_micros()
    );
    Uuid::new_v5(&Uuid::NAMESPACE_URL, key.as_bytes())
}

/// Whether `name` can be a service name (letters, digits, `._-`, up to 128).
pub fn valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(replicas: u32) -> ServiceSpec {
        ServiceSpec {
            replicas,
            template: serde_json::json!({"shell": "sleep 100"}),
            retry: None,
            probe: None,
        }
    }

    #[test]
    fn service_events_round_trip_and_fold() {
        let at = |p| ServiceEvent::new("t", "web", p);
        for p in [
            ServicePayload::Created(Box::new(spec(2))),
            ServicePayload::Scaled { replicas: 3 },
            ServicePayload::StopRequested,
            ServicePayload::Stopped,
            ServicePayload::Failed {
                reason: "replica_failed".into(),
                message: None,
            },
        ] {
            let e = at(p.clone());
            assert_eq!(
                ServiceEvent::decode(&e.encode().as_record())
                    .unwrap()
                    .payload,
                p
            );
        }
        let s = apply_service(None, &at(ServicePayload::Created(Box::new(spec(2))))).unwrap();
        assert_eq!((s.lifecycle, s.generation), (ServiceLifecycle::Active, 1));
        let s = apply_service(Some(&s), &at(ServicePayload::Scaled { replicas: 4 })).unwrap();
        assert_eq!((s.spec.replicas, s.generation), (4, 2));
        assert!(apply_service(Some(&s), &at(ServicePayload::Created(Box::new(spec(1))))).is_err());
        let s = apply_service(Some(&s), &at(ServicePayload::StopRequested)).unwrap();
        assert!(apply_service(Some(&s), &at(ServicePayload::Scaled { replicas: 1 })).is_err());
        let s = apply_service(Some(&s), &at(ServicePayload::Stopped)).unwrap();
        let again =
            apply_service(Some(&s), &at(ServicePayload::Created(Box::new(spec(1))))).unwrap();
        assert_eq!(
            (again.lifecycle, again.generation),
            (ServiceLifecycle::Active, 3)
        );
    }

    #[test]
    fn status_is_derived() {
        use ServiceLifecycle as L;
        use ServiceStatus as S;
        assert_eq!(derive_status(L::Active, 3, 0, false), S::Provisioning);
        assert_eq!(derive_status(L::Active, 3, 2, false), S::Provisioning);
        assert_eq!(derive_status(L::Active, 3, 3, true), S::Running);
        assert_eq!(derive_status(L::Active, 3, 2, true), S::Degraded);
        assert_eq!(derive_status(L::Active, 3, 0, true), S::Down);
        assert_eq!(derive_status(L::Failed, 3, 3, true), S::Failed);
        assert_eq!(derive_status(L::Stopping, 3, 3, false), S::Stopped);
    }

    #[test]
    fn replica_ids_are_stable_per_generation() {
        let t = Utc::now();
        assert_eq!(replica_task_id("a", t, 1, 0), replica_task_id("a", t, 1, 0));
        assert_ne!(replica_task_id("a", t, 1, 0), replica_task_id("a", t, 2, 0));
        assert_ne!(replica_task_id("a", t, 1, 0), replica_task_id("a", t, 1, 1));
    }
}
