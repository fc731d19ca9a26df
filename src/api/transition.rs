//! Appending an event to a task that others may be changing at the same time.
//!
//! Every task event carries the task's next `seq`, and the fold rejects an event whose
//! seq was taken by someone else (the scheduler, a worker, another API process). A
//! command therefore reads the task, decides what to append, appends it, waits until
//! the projection has applied or rejected it, and — if it lost the race for the seq —
//! reads the task again and decides afresh.

use std::sync::Arc;

use tokio::time::Instant;
use uuid::Uuid;

use super::AppState;
use super::error::ApiError;
use crate::consistency::append_and_wait;
use crate::events::auth::Principal;
use crate::events::trace::TraceContext;
use crate::events::{EncodedEvent, Event, Payload, TaskState};
use crate::kafka::Appended;
use crate::store::{EventOutcome, TaskRecord};

/// How many times a command re-reads and retries after losing a seq race.
const ATTEMPTS: usize = 8;

/// What a command decided, given the task as it stands.
pub enum Decision {
    /// Append these events, in order, with the next seqs.
    Append(Vec<Payload>),
    /// Nothing to append: the task is already where the command would take it.
    AlreadyDone,
}

/// What became of a command.
pub enum Outcome {
    /// Applied (or already done): the task after it.
    Applied(Box<TaskRecord>),
    /// On the log, but the projection had not applied it within the wait.
    NotYetApplied {
        /// Partition of the last appended event.
        partition: i32,
        /// Its offset.
        offset: i64,
    },
}

/// Runs a command of `caller` (recorded on every event it appends) on task `id`:
/// `decide` sees the current state and says what to append (or refuses with an error). Retries when the append loses a seq race.
///
/// The events carry `span` as their `ce_traceparent` — the span that caused them (a
/// request's, a worker's attempt) — or, without one, the task's own trace.
pub async fn transition(
    state: &Arc<AppState>,
    caller: &Principal,
    id: Uuid,
    span: Option<TraceContext>,
    mut decide: impl FnMut(&TaskState) -> Result<Decision, ApiError>,
) -> Result<Outcome, ApiError> {
    // Decide on everything the log holds about the task, not on a projection a few
    // records behind (and refuse an unknown task only when it is not on the log).
    state.read_task(id).await?;
    let mut last_rejection = String::new();
    for _ in 0..ATTEMPTS {
        let Some(record) = state.store.task(id).await? else {
            return Err(ApiError::not_found(format!("task {id} is not on the log")));
        };
        let payloads = match decide(&record.task)? {
            Decision::AlreadyDone => return Ok(Outcome::Applied(Box::new(record))),
            Decision::Append(p) => p,
        };
        let source = &state.options.source;
        let span = span.or(record.task.traceparent);
        let to_append: Vec<_> = payloads
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                Event::new(source, id, record.task.seq + 1 + i as u64, p)
                    .encode()
                    .with_principal(&caller.name)
                    .with_traceparent(span.as_ref())
            })
            .collect();
        if to_append.is_empty() {
            return Ok(Outcome::Applied(Box::new(record)));
        }
        let outcome =
            match append_and_confirm(state, &state.options.topics.events, &to_append).await? {
                Confirmation::Pending(last) => {
                    return Ok(Outcome::NotYetApplied {
                        partition: last.partition,
                        offset: last.offset,
                    });
                }
                Confirmation::Projected(outcome) => outcome,
            };
        match outcome {
            Some(EventOutcome::Applied) => {
                let record = state
                    .store
                    .task(id)
                    .await?
                    .ok_or_else(|| ApiError::not_found(format!("task {id} does not exist")))?;
                return Ok(Outcome::Applied(Box::new(record)));
            }
            // Lost a race for the seq, or a retry window closed between deciding and
            // appending: decide again on the task as it now is.
            Some(EventOutcome::Rejected { reason, message })
                if reason == "seq_conflict" || reason == "retry_not_allowed" =>
            {
                last_rejection = message;
            }
            Some(EventOutcome::Rejected { reason, message }) => {
                return Err(ApiError::conflict(
                    "event_rejected",
                    format!("the event was not applied ({reason}): {message}"),
                ));
            }
            None => {}
        }
    }
    Err(ApiError::conflict(
        "task_contended",
        format!(
            "task {id} kept changing; the command lost the race {ATTEMPTS} times ({last_rejection})"
        ),
    ))
}

/// Where appended events stand after [`append_and_confirm`].
pub(super) enum Confirmation {
    /// The projection has passed them: what became of the first (`None`: no record of
    /// it, e.g. it was below the projection's start).
    Projected(Option<EventOutcome>),
    /// On the log, but the projection had not passed the last one within the wait.
    Pending(Appended),
}

/// Appends `events` (non-empty) to `topic`, in order, counting each append; waits up to
/// `cancel_wait` until `topic`'s projection has passed the last, and reads what became
/// of the first.
pub(super) async fn append_and_confirm(
    state: &AppState,
    topic: &str,
    events: &[EncodedEvent],
) -> Result<Confirmation, ApiError> {
    let deadline = Instant::now() + state.options.cancel_wait;
    let Some((last, lag)) =
        append_and_wait(&state.appender, &state.projections, topic, events, deadline).await?
    else {
        return Ok(Confirmation::Projected(None));
    };
    if !lag.caught_up() {
        return Ok(Confirmation::Pending(last));
    }
    let first = events.first().map(|e| e.ce_id.as_str()).unwrap_or_default();
    Ok(Confirmation::Projected(
        state.store.event_outcome(first).await?,
    ))
}
