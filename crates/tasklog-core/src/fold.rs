//! The task fold over many tasks at once: what the projector applies a batch with and
//! what replay applies a whole topic with, so that the two can never disagree.

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

use crate::{Event, Rejection, TaskState, TaskStatus, apply};

/// Task states by id, and every `ce_id` applied so far (an event is applied once: a
/// second record with the same `ce_id` is refused as a duplicate).
#[derive(Debug, Clone, Default)]
pub struct TaskFold {
    /// The folded state of every task seen.
    pub states: HashMap<Uuid, TaskState>,
    /// The `ce_id` of every applied event.
    pub seen: HashSet<String>,
}

impl TaskFold {
    /// An empty fold (nothing applied yet).
    pub fn new() -> TaskFold {
        TaskFold::default()
    }

    /// Folds one event; on success returns the task's state before it (`None`: the task
    /// is new). A rejection changes nothing.
    pub fn apply(&mut self, event: &Event) -> Result<Option<TaskStatus>, Rejection> {
        if self.seen.contains(&event.envelope.id) {
            return Err(Rejection::DuplicateCeId(event.envelope.id.clone()));
        }
        let before = self.states.get(&event.task_id);
        let after = apply(before, event)?;
        let before = before.map(|b| b.state);
        self.seen.insert(event.envelope.id.clone());
        self.states.insert(after.id, after);
        Ok(before)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Payload, TaskSpec};

    #[test]
    fn applies_in_order_and_refuses_duplicates() {
        let id = Uuid::now_v7();
        let spec = TaskSpec::from_json(serde_json::json!({"shell": "true"})).expect("spec");
        let submitted = Event::new(
            "test",
            id,
            1,
            Payload::Submitted {
                spec: std::sync::Arc::new(spec),
            },
        );
        let mut fold = TaskFold::new();
        assert_eq!(fold.apply(&submitted), Ok(None));
        assert_eq!(fold.states[&id].state, TaskStatus::Queued);
        assert!(matches!(
            fold.apply(&submitted),
            Err(Rejection::DuplicateCeId(_))
        ));
        assert_eq!(fold.states.len(), 1);
    }
}
