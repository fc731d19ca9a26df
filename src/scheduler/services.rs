//! The service controller: keeps each service at its replica count, fails it fast when
//! a replica fails with no retry left, scales and stops it. Pure: [`reconcile`] turns a
//! service and its replica tasks into actions; the scheduler's loop appends them.
//!
//! Replicas are ordinary tasks whose spec carries `service` and `replica`. With a retry
//! policy a failing replica retries by itself (it stays unfinished, `pending` between
//! attempts) and the others are untouched; without one its failure is final and the
//! whole service fails (fail-fast, as in dstack): the other replicas are cancelled with
//! reason `replica_failed`.

use serde_json::Value;
use uuid::Uuid;

use super::Action;
use crate::events::service::{
    ServiceLifecycle, ServicePayload, ServiceState, latest_replicas, replica_task_id,
};
use crate::events::{ReasonData, TaskSpec, TaskState, TaskStatus};

/// What the controller decided for one service.
#[derive(Debug, Default)]
pub struct Reconciled {
    /// Task events (submissions of replicas, cancels).
    pub tasks: Vec<Action>,
    /// New replica tasks to submit: id and spec.
    pub submit: Vec<(Uuid, TaskSpec)>,
    /// Service events.
    pub service: Vec<ServicePayload>,
}

/// The spec of replica `index` of `service`.
pub fn replica_spec(service: &ServiceState, index: u32) -> Result<TaskSpec, String> {
    let mut template = service.spec.template_with_policies();
    if let Value::Object(fields) = &mut template {
        fields.insert("service".into(), Value::from(service.name.clone()));
        fields.insert("replica".into(), Value::from(index));
        fields
            .entry("type")
            .or_insert_with(|| Value::from("service"));
        fields
            .entry("name")
            .or_insert_with(|| Value::from(format!("{}-{index}", service.name)));
    }
    serde_json::from_value(template).map_err(|e| e.to_string())
}

/// Cancels one unfinished replica: at once when nothing runs, through its worker
/// otherwise.
fn cancel(task: &TaskState, reason: &str, out: &mut Vec<Action>) {
    if task.state.is_terminal() || task.cancel_requested {
        return;
    }
    let why = ReasonData {
        reason: Some(reason.into()),
        message: None,
    };
    for (i, payload) in task.cancel_events(why).into_iter().enumerate() {
        out.push(Action::Task {
            task_id: task.id,
            seq: task.seq + i as u64,
            payload,
        });
    }
}

/// Decides what one service needs, given its replica tasks of this incarnation
/// (oldest first). Pure.
pub fn reconcile(service: &ServiceState, replicas: &[TaskState]) -> Reconciled {
    let mut out = Reconciled::default();
    let current = latest_replicas(replicas, |t| t);
    let unfinished = || current.values().filter(|t| !t.state.is_terminal());
    match service.lifecycle {
        ServiceLifecycle::Failed => {
            for t in unfinished() {
                cancel(t, "replica_failed", &mut out.tasks);
            }
        }
        ServiceLifecycle::Stopping | ServiceLifecycle::Stopped => {
            let mut any = false;
            for t in unfinished() {
                any = true;
                cancel(t, "service_stopped", &mut out.tasks);
            }
            if !any && service.lifecycle == ServiceLifecycle::Stopping {
                out.service.push(ServicePayload::Stopped);
            }
        }
        ServiceLifecycle::Active => {
            let wanted = service.spec.replicas;
            // A replica that ended other than by scale-down: fail-fast.
            let failed = current.iter().find(|(i, t)| {
                **i < wanted
                    && t.state.is_terminal()
                    && !(t.state == TaskStatus::Cancelled
                        && t.reason.as_deref() == Some("scaled_down"))
            });
            if let Some((index, t)) = failed {
                out.service.push(ServicePayload::Failed {
                    reason: "replica_failed".into(),
                    message: Some(format!(
                        "replica {index} ({}) ended {}{}",
                        t.id,
                        t.state,
                        t.reason
                            .as_deref()
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    )),
                });
                for other in unfinished() {
                    cancel(other, "replica_failed", &mut out.tasks);
                }
                return out;
            }
            for index in 0..wanted {
                let needs_one = match current.get(&index) {
                    None => true,
                    Some(t) => t.state.is_terminal(),
                };
                if needs_one {
                    match replica_spec(service, index) {
                        Ok(spec) => out.submit.push((
                            replica_task_id(
                                &service.name,
                                service.created_at,
                                service.generation,
                                index,
                            ),
                            spec,
                        )),
                        Err(e) => {
                            tracing::warn!(service = %service.name, error = %e, "bad replica spec")
                        }
                    }
                }
            }
            for (index, t) in &current {
                if *index >= wanted {
                    cancel(t, "scaled_down", &mut out.tasks);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::service::ServiceSpec;
    use crate::events::{Event, Payload, apply};
    use chrono::Utc;
    use serde_json::json;

    fn service(replicas: u32, lifecycle: ServiceLifecycle) -> ServiceState {
        let now = Utc::now();
        ServiceState {
            name: "web".into(),
            lifecycle,
            spec: ServiceSpec {
                replicas,
                template: json!({"shell": "sleep 100"}),
                retry: None,
                probe: None,
            },
            generation: 1,
            created_at: now,
            updated_at: now,
            reason: None,
            message: None,
            traceparent: None,
        }
    }

    fn replica(s: &ServiceState, index: u32, then: Vec<Payload>) -> TaskState {
        let spec = replica_spec(s, index).unwrap();
        let id = Uuid::now_v7();
        let mut t = apply(
            None,
            &Event::new(
                "t",
                id,
                1,
                Payload::Submitted {
                    spec: std::sync::Arc::new(spec),
                },
            ),
        )
        .unwrap();
        for p in then {
            t = apply(Some(&t), &Event::new("t", id, t.seq + 1, p)).unwrap();
        }
        t
    }

    fn failed() -> Payload {
        Payload::Failed {
            attempt: None,
            exit_code: None,
            signal: None,
            duration_ms: None,
            reason: "error".into(),
            message: None,
        }
    }

    #[test]
    fn missing_replicas_are_submitted_with_their_index() {
        let s = service(3, ServiceLifecycle::Active);
        let have = vec![replica(&s, 0, vec![])];
        let r = reconcile(&s, &have);
        let indexes: Vec<Option<u32>> = r.submit.iter().map(|(_, spec)| spec.replica).collect();
        assert_eq!(indexes, [Some(1), Some(2)]);
        assert_eq!(r.submit[0].1.service.as_deref(), Some("web"));
        assert!(r.service.is_empty() && r.tasks.is_empty());
    }

    #[test]
    fn a_failed_replica_fails_the_service_and_cancels_the_others() {
        let s = service(3, ServiceLifecycle::Active);
        let have = vec![
            replica(&s, 0, vec![]),
            replica(&s, 1, vec![failed()]),
            replica(&s, 2, vec![]),
        ];
        let r = reconcile(&s, &have);
        assert!(
            matches!(&r.service[..], [ServicePayload::Failed { reason, .. }] if reason == "replica_failed")
        );
        assert!(r.submit.is_empty());
        let cancelled = r
            .tasks
            .iter()
            .filter(|a| matches!(a, Action::Task { payload: Payload::Cancelled(c), .. } if c.reason.as_deref() == Some("replica_failed")))
            .count();
        assert_eq!(cancelled, 2);
    }

    #[test]
    fn scale_down_cancels_the_highest_indexes_and_stop_ends_everything() {
        let s = service(1, ServiceLifecycle::Active);
        let have = vec![
            replica(&s, 0, vec![]),
            replica(&s, 1, vec![]),
            replica(&s, 2, vec![]),
        ];
        let r = reconcile(&s, &have);
        let ids: Vec<Uuid> = r
            .tasks
            .iter()
            .filter_map(|a| match a {
                Action::Task {
                    task_id,
                    payload: Payload::CancelRequested(r),
                    ..
                } if r.reason.as_deref() == Some("scaled_down") => Some(*task_id),
                _ => None,
            })
            .collect();
        assert_eq!(ids, [have[1].id, have[2].id]);
        let stopping = service(3, ServiceLifecycle::Stopping);
        assert_eq!(reconcile(&stopping, &have).tasks.len(), 6);
        assert!(matches!(
            &reconcile(&stopping, &[]).service[..],
            [ServicePayload::Stopped]
        ));
    }
}
