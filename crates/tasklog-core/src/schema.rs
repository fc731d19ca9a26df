//! JSON Schemas for event data, compiled once and shared by the API and the projector.
//!
//! The schema files live in `schemas/` at the repository root and are embedded into the
//! binary, so what producers read is exactly what tasklog enforces.

use std::collections::HashMap;
use std::sync::OnceLock;

use jsonschema::{Registry, Validator};
use serde_json::Value;

use super::EventType;
use super::auth::TokenEventType;
use super::service::ServiceEventType;
use super::worker::WorkerEventType;

/// The task spec schema, as published in `schemas/task-spec.v1.json`.
pub const TASK_SPEC_SCHEMA: &str = include_str!("../../../schemas/task-spec.v1.json");

const TASK_SPEC_URI: &str = "https://tasklog.dev/schemas/task-spec.v1.json";

/// One schema file per event type, embedded at build time.
fn event_schema_source(event_type: EventType) -> &'static str {
    match event_type {
        EventType::Submitted => {
            include_str!("../../../schemas/events/dev.tasklog.task.submitted.v1.json")
        }
        EventType::CancelRequested => {
            include_str!("../../../schemas/events/dev.tasklog.task.cancel_requested.v1.json")
        }
        EventType::Cancelled => {
            include_str!("../../../schemas/events/dev.tasklog.task.cancelled.v1.json")
        }
        EventType::Queued => {
            include_str!("../../../schemas/events/dev.tasklog.task.queued.v1.json")
        }
        EventType::Assigned => {
            include_str!("../../../schemas/events/dev.tasklog.task.assigned.v1.json")
        }
        EventType::Started => {
            include_str!("../../../schemas/events/dev.tasklog.task.started.v1.json")
        }
        EventType::Succeeded => {
            include_str!("../../../schemas/events/dev.tasklog.task.succeeded.v1.json")
        }
        EventType::Failed => {
            include_str!("../../../schemas/events/dev.tasklog.task.failed.v1.json")
        }
        EventType::RetryScheduled => {
            include_str!("../../../schemas/events/dev.tasklog.task.retry_scheduled.v1.json")
        }
        EventType::Ready => include_str!("../../../schemas/events/dev.tasklog.task.ready.v1.json"),
    }
}

/// The schema of each worker event type.
fn worker_schema_source(event_type: WorkerEventType) -> &'static str {
    match event_type {
        WorkerEventType::Registered => {
            include_str!("../../../schemas/events/dev.tasklog.worker.registered.v1.json")
        }
        WorkerEventType::Heartbeat => {
            include_str!("../../../schemas/events/dev.tasklog.worker.heartbeat.v1.json")
        }
        WorkerEventType::Draining => {
            include_str!("../../../schemas/events/dev.tasklog.worker.draining.v1.json")
        }
        WorkerEventType::Lost => {
            include_str!("../../../schemas/events/dev.tasklog.worker.lost.v1.json")
        }
    }
}

/// The schema of each service event type.
fn service_schema_source(event_type: ServiceEventType) -> &'static str {
    match event_type {
        ServiceEventType::Created => {
            include_str!("../../../schemas/events/dev.tasklog.service.created.v1.json")
        }
        ServiceEventType::Scaled => {
            include_str!("../../../schemas/events/dev.tasklog.service.scaled.v1.json")
        }
        ServiceEventType::StopRequested => {
            include_str!("../../../schemas/events/dev.tasklog.service.stop_requested.v1.json")
        }
        ServiceEventType::Stopped => {
            include_str!("../../../schemas/events/dev.tasklog.service.stopped.v1.json")
        }
        ServiceEventType::Failed => {
            include_str!("../../../schemas/events/dev.tasklog.service.failed.v1.json")
        }
    }
}

/// The schema of each auth event type.
fn token_schema_source(event_type: TokenEventType) -> &'static str {
    match event_type {
        TokenEventType::Created => {
            include_str!("../../../schemas/events/dev.tasklog.auth.token_created.v1.json")
        }
        TokenEventType::Revoked => {
            include_str!("../../../schemas/events/dev.tasklog.auth.token_revoked.v1.json")
        }
    }
}

struct Compiled {
    task_spec: Validator,
    events: HashMap<EventType, Validator>,
    workers: HashMap<WorkerEventType, Validator>,
    services: HashMap<ServiceEventType, Validator>,
    tokens: HashMap<TokenEventType, Validator>,
}

fn compiled() -> &'static Compiled {
    static COMPILED: OnceLock<Compiled> = OnceLock::new();
    COMPILED.get_or_init(|| {
        // The schemas are part of the binary: failing to parse them is a build defect,
        // caught by the unit tests below, never by user input.
        let spec: Value = serde_json::from_str(TASK_SPEC_SCHEMA).expect("task spec schema is JSON");
        let registry = Registry::new()
            .add(TASK_SPEC_URI, spec.clone())
            .expect("task spec schema registers")
            .prepare()
            .expect("schema registry prepares");
        let build = |schema: &Value| {
            jsonschema::options()
                .with_registry(&registry)
                .build(schema)
                .expect("embedded schema compiles")
        };
        let events = EventType::ALL
            .iter()
            .map(|t| {
                let schema: Value =
                    serde_json::from_str(event_schema_source(*t)).expect("event schema is JSON");
                (*t, build(&schema))
            })
            .collect();
        let workers = WorkerEventType::ALL
            .iter()
            .map(|t| {
                let schema: Value =
                    serde_json::from_str(worker_schema_source(*t)).expect("event schema is JSON");
                (*t, build(&schema))
            })
            .collect();
        let services = ServiceEventType::ALL
            .iter()
            .map(|t| {
                let schema: Value =
                    serde_json::from_str(service_schema_source(*t)).expect("event schema is JSON");
                (*t, build(&schema))
            })
            .collect();
        let tokens = TokenEventType::ALL
            .iter()
            .map(|t| {
                let schema: Value =
                    serde_json::from_str(token_schema_source(*t)).expect("event schema is JSON");
                (*t, build(&schema))
            })
            .collect();
        Compiled {
            task_spec: build(&spec),
            events,
            workers,
            services,
            tokens,
        }
    })
}

/// The published schema of one event type's data.
pub fn event_schema(event_type: EventType) -> &'static str {
    event_schema_source(event_type)
}

/// Validates a task spec; the error names the first offending field.
pub fn validate_task_spec(spec: &Value) -> Result<(), String> {
    first_error(&compiled().task_spec, spec)
}

/// Validates the data of an event against its type's schema.
pub fn validate_event_data(event_type: EventType, data: &Value) -> Result<(), String> {
    first_error(&compiled().events[&event_type], data)
}

/// Validates the data of a worker event against its type's schema.
pub fn validate_worker_event_data(event_type: WorkerEventType, data: &Value) -> Result<(), String> {
    first_error(&compiled().workers[&event_type], data)
}

/// Validates the data of a service event against its type's schema.
pub fn validate_service_event_data(
    event_type: ServiceEventType,
    data: &Value,
) -> Result<(), String> {
    first_error(&compiled().services[&event_type], data)
}

/// Validates the data of an auth event against its type's schema.
pub fn validate_token_event_data(event_type: TokenEventType, data: &Value) -> Result<(), String> {
    first_error(&compiled().tokens[&event_type], data)
}

fn first_error(validator: &Validator, instance: &Value) -> Result<(), String> {
    match validator.iter_errors(instance).next() {
        None => Ok(()),
        Some(error) => {
            let path = error.instance_path().to_string();
            let field = path.trim_start_matches('/').replace('/', ".");
            if field.is_empty() {
                Err(error.to_string())
            } else {
                Err(format!("{field}: {error}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_embedded_schema_compiles() {
        for t in EventType::ALL {
            let _ = validate_event_data(*t, &json!({}));
        }
        for t in WorkerEventType::ALL {
            let _ = validate_worker_event_data(*t, &json!({}));
        }
        for t in ServiceEventType::ALL {
            let _ = validate_service_event_data(*t, &json!({}));
        }
        for t in TokenEventType::ALL {
            let _ = validate_token_event_data(*t, &json!({}));
        }
        assert!(validate_task_spec(&json!({"shell": "true"})).is_ok());
    }

    #[test]
    fn spec_errors_name_the_field() {
        let err = validate_task_spec(&json!({"shell": "x", "priority": 150})).unwrap_err();
        assert!(err.starts_with("priority:"), "{err}");
        let err = validate_task_spec(&json!({"shell": "x", "colour": "red"})).unwrap_err();
        assert!(err.contains("colour"), "{err}");
        let err = validate_task_spec(&json!({"shell": "x", "resources": {"cpu": -1}})).unwrap_err();
        assert!(err.starts_with("resources.cpu:"), "{err}");
        assert!(validate_task_spec(&json!({"command": ["a"], "shell": "b"})).is_err());
        assert!(validate_task_spec(&json!({"name": "no command"})).is_err());
    }

    #[test]
    fn submitted_data_validates_the_embedded_spec() {
        let ok = json!({"task_id": "0190d5a8-7bf8-7c3a-9a4e-0c8d2f3b4a5c", "seq": 1, "spec": {"shell": "true"}});
        assert!(validate_event_data(EventType::Submitted, &ok).is_ok());
        let bad = json!({"task_id": "0190d5a8-7bf8-7c3a-9a4e-0c8d2f3b4a5c", "seq": 1, "spec": {"shell": "true", "priority": "high"}});
        let err = validate_event_data(EventType::Submitted, &bad).unwrap_err();
        assert!(err.starts_with("spec.priority:"), "{err}");
        let missing = json!({"task_id": "0190d5a8-7bf8-7c3a-9a4e-0c8d2f3b4a5c", "seq": 1});
        assert!(validate_event_data(EventType::Submitted, &missing).is_err());
    }
}
