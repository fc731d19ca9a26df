//! What the projections have stored, as their `NOTIFY`s tell it: a lower bound of every
//! projection's stored offsets, kept in memory so that a read-your-writes check usually
//! needs no query.
//!
//! Each projection's commit notifies its channel with the next offsets it stored
//! ([`notify_payload`]); a follower ([`super::Store::follow_progress`]) folds them into
//! [`KnownOffsets`]. The bound is safe to act on because notifications are delivered
//! only at commit and stored offsets only grow — with two exceptions, both handled by
//! forgetting everything: a reset of the projection (`tasklog projector --rebuild`,
//! which notifies [`RESET_PAYLOAD`]), and a Postgres crash, which may take back commits
//! made with asynchronous commit (the follower forgets when its connection breaks).
//! Whatever the bound does not cover is read from `projection_offsets`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// The payload a reset of the projection notifies on every channel.
pub const RESET_PAYLOAD: &str = "reset";

/// Postgres refuses `NOTIFY` payloads of 8000 bytes or more; past this a commit notifies
/// without offsets (followers then read them from the table).
const MAX_PAYLOAD_BYTES: usize = 7900;

/// The `NOTIFY` payload of a commit that stored `next_offsets` for `topic`:
/// `topic p:o,p:o,...`, or empty when it would be too long.
pub fn notify_payload(topic: &str, next_offsets: &HashMap<i32, i64>) -> String {
    let mut payload = format!("{topic} ");
    let mut first = true;
    for (partition, next) in next_offsets {
        if !first {
            payload.push(',');
        }
        first = false;
        payload.push_str(&format!("{partition}:{next}"));
    }
    if payload.len() > MAX_PAYLOAD_BYTES {
        return String::new();
    }
    payload
}

/// What a notification's payload says.
#[derive(Debug, PartialEq, Eq)]
pub enum Notice {
    /// `topic`'s projection stored these next offsets.
    Stored(String, Vec<(i32, i64)>),
    /// The projections were deleted: forget everything known.
    Reset,
    /// A payload that says nothing usable (empty, or from an older tasklog).
    Unknown,
}

/// Reads a notification payload written by [`notify_payload`] (or [`RESET_PAYLOAD`]).
pub fn parse_payload(payload: &str) -> Notice {
    if payload == RESET_PAYLOAD {
        return Notice::Reset;
    }
    let Some((topic, offsets)) = payload.split_once(' ') else {
        return Notice::Unknown;
    };
    let parsed: Option<Vec<(i32, i64)>> = offsets
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|pair| {
            let (p, o) = pair.split_once(':')?;
            Some((p.parse().ok()?, o.parse().ok()?))
        })
        .collect();
    match parsed {
        Some(offsets) if !topic.is_empty() => Notice::Stored(topic.to_string(), offsets),
        _ => Notice::Unknown,
    }
}

/// A lower bound of the projections' stored next offsets, per topic and partition,
/// shared by every clone.
#[derive(Debug, Clone, Default)]
pub struct KnownOffsets(Arc<RwLock<HashMap<String, HashMap<i32, i64>>>>);

impl KnownOffsets {
    /// Nothing known.
    pub fn new() -> KnownOffsets {
        KnownOffsets::default()
    }

    /// Raises the bound of `topic` to `offsets` (never lowers it).
    pub fn raise(&self, topic: &str, offsets: impl IntoIterator<Item = (i32, i64)>) {
        let mut known = self.0.write().unwrap_or_else(|p| p.into_inner());
        let partitions = known.entry(topic.to_string()).or_default();
        for (partition, next) in offsets {
            let at = partitions.entry(partition).or_insert(next);
            *at = (*at).max(next);
        }
    }

    /// Forgets everything (the projections may have gone back).
    pub fn forget(&self) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Applies one notification.
    pub fn apply(&self, notice: Notice) {
        match notice {
            Notice::Stored(topic, offsets) => self.raise(&topic, offsets),
            Notice::Reset => self.forget(),
            Notice::Unknown => {}
        }
    }

    /// The known next offset of `topic`'s `partition` (0 when nothing is known).
    pub fn get(&self, topic: &str, partition: i32) -> i64 {
        let known = self.0.read().unwrap_or_else(|p| p.into_inner());
        known
            .get(topic)
            .and_then(|p| p.get(&partition))
            .copied()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        let offsets = HashMap::from([(0, 17), (11, 4)]);
        let Notice::Stored(topic, mut parsed) =
            parse_payload(&notify_payload("t.events", &offsets))
        else {
            panic!("not parsed");
        };
        parsed.sort();
        assert_eq!(topic, "t.events");
        assert_eq!(parsed, vec![(0, 17), (11, 4)]);
        assert_eq!(parse_payload(RESET_PAYLOAD), Notice::Reset);
        for junk in ["", "t", "t 1", "t 1:x", " 1:2", "t 1:2:3"] {
            assert_eq!(parse_payload(junk), Notice::Unknown, "{junk:?}");
        }
        let many: HashMap<i32, i64> = (0..2000).map(|p| (p, i64::MAX)).collect();
        assert_eq!(notify_payload("t", &many), "");
    }

    #[test]
    fn the_bound_only_rises_until_forgotten() {
        let known = KnownOffsets::new();
        assert_eq!(known.get("t", 0), 0);
        known.apply(Notice::Stored("t".into(), vec![(0, 10), (1, 3)]));
        known.raise("t", [(0, 4)]);
        assert_eq!(known.get("t", 0), 10);
        assert_eq!(known.get("t", 1), 3);
        assert_eq!(known.get("u", 0), 0);
        known.apply(Notice::Reset);
        assert_eq!(known.get("t", 0), 0);
    }
}
