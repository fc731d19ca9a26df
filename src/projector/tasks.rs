//! The task projection: folds task events into `tasks`, `task_events` and the per-state
//! counts, with the pure state machine of [`crate::events`].

use std::collections::{HashMap, HashSet};

use rdkafka::message::{Message, OwnedMessage};
use tokio_postgres::Transaction;
use uuid::Uuid;

use super::{Projection, Record, Refusal};
use crate::events::fold::TaskFold;
use crate::events::{self, Event, Rejection};
use crate::metrics::metrics;
use crate::store::projection::{self, AppliedEvent, TaskBatchWrite, TaskRow};
use crate::store::{PROJECTION_CHANNEL, StoreError};

/// Folds `tasklog.events` into the task tables.
pub struct TaskProjection;

impl Projection for TaskProjection {
    type Decoded = Result<Event, Rejection>;

    fn decode(message: &OwnedMessage) -> Self::Decoded {
        Event::decode(&super::raw_record(message))
    }

    fn channel(&self) -> &'static str {
        PROJECTION_CHANNEL
    }

    async fn apply(
        &self,
        tx: &Transaction<'_>,
        records: &[&Record<Self::Decoded>],
    ) -> Result<Vec<Refusal>, StoreError> {
        let ids: Vec<Uuid> = records
            .iter()
            .filter_map(|r| r.decoded.as_ref().ok().map(|e| e.task_id))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let ce_ids: Vec<String> = records
            .iter()
            .filter_map(|r| r.decoded.as_ref().ok().map(|e| e.envelope.id.clone()))
            .collect();
        // Both lookups go out together on the one connection (pipelined).
        let (states, seen) = tokio::try_join!(
            projection::load_tasks(tx, &ids),
            projection::applied_ce_ids(tx, &ce_ids)
        )?;
        let existed: HashSet<Uuid> = states.keys().copied().collect();
        let mut fold = TaskFold { states, seen };

        let mut write = TaskBatchWrite::default();
        let mut refusals = Vec::new();
        let mut touched: HashMap<Uuid, (i32, i64)> = HashMap::new();
        for (index, record) in records.iter().enumerate() {
            let (partition, offset) = (record.message.partition(), record.message.offset());
            let outcome = record
                .decoded
                .as_ref()
                .map_err(Clone::clone)
                .and_then(|event| Ok((event, fold.apply(event)?)));
            match outcome {
                Ok((event, before)) => {
                    let after = &fold.states[&event.task_id];
                    observe_attempt(before, after);
                    if let Some(b) = before {
                        *write.state_deltas.entry(b.as_str()).or_default() -= 1;
                    }
                    *write.state_deltas.entry(after.state.as_str()).or_default() += 1;
                    touched.insert(event.task_id, (partition, offset));
                    write.events.push(AppliedEvent::new(
                        event,
                        partition,
                        offset,
                        record.message.payload().unwrap_or_default().to_vec(),
                    ));
                }
                Err(rejection) => refusals.push(Refusal {
                    index,
                    reason: rejection.code(),
                    message: rejection.to_string(),
                }),
            }
        }
        for (id, (partition, last_offset)) in &touched {
            if let Some(state) = fold.states.remove(id) {
                write.tasks.push(TaskRow {
                    state,
                    partition: *partition,
                    last_offset: *last_offset,
                    is_new: !existed.contains(id),
                });
            }
        }
        projection::write_task_batch(tx, &write).await?;
        let m = metrics();
        for e in &write.events {
            m.events_applied.with_label_values(&[e.event_type]).inc();
        }
        if crate::otlp::enabled() {
            export_spans(&write.events);
        }
        Ok(refusals)
    }
}

/// One span per applied event that names its trace: from the event's time to its
/// application, under the span that caused it.
fn export_spans(events: &[AppliedEvent]) {
    let now = std::time::SystemTime::now();
    for e in events {
        let Some(cause) = e.traceparent else {
            continue;
        };
        let short = e.event_type.trim_start_matches("dev.tasklog.task.");
        crate::otlp::export(
            crate::otlp::Span::new(
                format!("project {short}"),
                cause.child(),
                Some(cause),
                crate::otlp::system_time(e.time).min(now),
                now,
            )
            .kind(opentelemetry::trace::SpanKind::Consumer)
            .attribute("tasklog.task_id", e.task_id.to_string())
            .attribute("messaging.kafka.partition", i64::from(e.partition))
            .attribute("messaging.kafka.offset", e.offset),
        );
    }
}

/// Scheduling metrics from one applied transition: submit→running for first attempts,
/// every attempt that ended, retries, and tasks that failed for good.
fn observe_attempt(before: Option<events::TaskStatus>, after: &events::TaskState) {
    use events::TaskStatus as S;
    let m = metrics();
    if after.state == S::Running && before != Some(S::Running) && after.attempt == 1 {
        let waited = after.updated_at - after.submitted_at;
        m.submit_to_running
            .observe(waited.num_microseconds().unwrap_or(0).max(0) as f64 / 1e6);
    }
    let ended_attempt = matches!(before, Some(S::Assigned | S::Running));
    let retried = after.state == S::Pending;
    if ended_attempt && (after.state.is_terminal() || retried) {
        let outcome = if retried {
            "failed"
        } else {
            after.state.as_str()
        };
        let reason = crate::metrics::attempt_reason(after.reason.as_deref());
        let project = crate::metrics::project_label(after.spec.project());
        m.attempts
            .with_label_values(&[outcome, reason, &project])
            .inc();
    }
    // Retries: a failure (of an attempt, or no_capacity while queued) that sent the
    // task back to pending. Failures for good: the task's last word is `failed`.
    let was = |s: S| before == Some(s);
    if retried && (ended_attempt || was(S::Queued)) {
        let reason = crate::metrics::attempt_reason(after.reason.as_deref());
        let project = crate::metrics::project_label(after.spec.project());
        m.task_retries.with_label_values(&[reason, &project]).inc();
    }
    if after.state == S::Failed && before.is_some() && !was(S::Failed) {
        let task_type = crate::metrics::task_type_label(after.spec.task_type());
        let project = crate::metrics::project_label(after.spec.project());
        m.tasks_failed
            .with_label_values(&[&task_type, &project])
            .inc();
    }
}
