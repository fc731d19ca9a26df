//! Log cursors: opaque, versioned, bound to one task, and tamper-evident.
//!
//! A cursor is a position on the logs topic (partition and offset) plus a direction,
//! bound to a task id and signed with HMAC-SHA256 under a server key:
//! `base64url(version | direction | task id | partition | offset | mac[..16])`.
//! Offsets are unique; timestamps are not, which is why cursors never use them.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use uuid::Uuid;

const VERSION: u8 = 1;
const BODY_LEN: usize = 1 + 1 + 16 + 4 + 8;
const MAC_LEN: usize = 16;

/// Which way a cursor pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Toward newer lines: the cursor's offset is the next one to read.
    Forward,
    /// Toward older lines: the cursor's offset is an exclusive upper bound.
    Backward,
}

/// A decoded cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// The task it belongs to.
    pub task_id: Uuid,
    /// Partition of the task's log.
    pub partition: i32,
    /// Position (see [`Direction`]).
    pub offset: i64,
    /// Direction.
    pub direction: Direction,
}

/// Why a cursor was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    /// Not a cursor, or altered.
    #[error("the cursor is malformed or was altered")]
    Invalid,
    /// A valid cursor of another task.
    #[error("the cursor belongs to task {0}")]
    TaskMismatch(Uuid),
}

/// The server key cursors are signed with.
#[derive(Clone)]
pub struct CursorKey(Vec<u8>);

impl std::fmt::Debug for CursorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CursorKey(..)")
    }
}

impl CursorKey {
    /// A key from bytes (at least 16).
    pub fn new(bytes: Vec<u8>) -> CursorKey {
        CursorKey(bytes)
    }

    fn mac(&self, body: &[u8]) -> [u8; MAC_LEN] {
        // HMAC accepts keys of any length.
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(body);
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(&full[..MAC_LEN]);
        out
    }

    /// Encodes a cursor.
    pub fn encode(&self, cursor: &Cursor) -> String {
        let mut bytes = Vec::with_capacity(BODY_LEN + MAC_LEN);
        bytes.push(VERSION);
        bytes.push(match cursor.direction {
            Direction::Forward => b'f',
            Direction::Backward => b'b',
        });
        bytes.extend_from_slice(cursor.task_id.as_bytes());
        bytes.extend_from_slice(&cursor.partition.to_be_bytes());
        bytes.extend_from_slice(&cursor.offset.to_be_bytes());
        let mac = self.mac(&bytes);
        bytes.extend_from_slice(&mac);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Decodes a cursor and checks that it belongs to `task_id`.
    pub fn decode(&self, text: &str, task_id: Uuid) -> Result<Cursor, CursorError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(text.trim())
            .map_err(|_| CursorError::Invalid)?;
        if bytes.len() != BODY_LEN + MAC_LEN || bytes[0] != VERSION {
            return Err(CursorError::Invalid);
        }
        let (body, mac) = bytes.split_at(BODY_LEN);
        let expected = self.mac(body);
        // Constant-time comparison.
        let diff = expected
            .iter()
            .zip(mac)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Err(CursorError::Invalid);
        }
        let direction = match body[1] {
            b'f' => Direction::Forward,
            b'b' => Direction::Backward,
            _ => return Err(CursorError::Invalid),
        };
        let task = Uuid::from_slice(&body[2..18]).map_err(|_| CursorError::Invalid)?;
        let partition =
            i32::from_be_bytes(body[18..22].try_into().map_err(|_| CursorError::Invalid)?);
        let offset = i64::from_be_bytes(body[22..30].try_into().map_err(|_| CursorError::Invalid)?);
        if task != task_id {
            return Err(CursorError::TaskMismatch(task));
        }
        if partition < 0 || offset < 0 {
            return Err(CursorError::Invalid);
        }
        Ok(Cursor {
            task_id: task,
            partition,
            offset,
            direction,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> CursorKey {
        CursorKey::new(b"0123456789abcdef0123456789abcdef".to_vec())
    }

    #[test]
    fn round_trips() {
        let c = Cursor {
            task_id: Uuid::now_v7(),
            partition: 7,
            offset: 123_456_789,
            direction: Direction::Backward,
        };
        let text = key().encode(&c);
        assert_eq!(key().decode(&text, c.task_id), Ok(c));
    }

    #[test]
    fn refuses_tampering_other_tasks_and_other_keys() {
        let id = Uuid::now_v7();
        let c = Cursor {
            task_id: id,
            partition: 1,
            offset: 5,
            direction: Direction::Forward,
        };
        let text = key().encode(&c);
        let mut raw = URL_SAFE_NO_PAD.decode(&text).unwrap();
        raw[25] ^= 1; // change the offset
        assert_eq!(
            key().decode(&URL_SAFE_NO_PAD.encode(&raw), id),
            Err(CursorError::Invalid)
        );
        assert_eq!(key().decode("garbage!", id), Err(CursorError::Invalid));
        assert_eq!(key().decode("", id), Err(CursorError::Invalid));
        let other = Uuid::now_v7();
        assert_eq!(
            key().decode(&text, other),
            Err(CursorError::TaskMismatch(id))
        );
        let other_key = CursorKey::new(b"another key, another server......".to_vec());
        assert_eq!(other_key.decode(&text, id), Err(CursorError::Invalid));
    }
}
