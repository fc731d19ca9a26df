//! Task logs on Kafka: one record per line on `tasklog.logs`, keyed by task id, paged
//! with cursors made of topic offsets — never timestamps, which many lines share.
//!
//! - [`LogWriter`] appends lines through the idempotent producer (used by workers and by
//!   `POST /v1/tasks/{id}/logs`), numbering them per attempt, splitting over-long lines
//!   into continuation records and enforcing the per-attempt quota.
//! - [`index::LogIndexProjection`] keeps, exactly once, per task and attempt the
//!   partition, first/last offset, line count, bytes and sparse line checkpoints.
//! - [`reader::LogReader`] pages through a task's lines straight from Kafka, bounded by
//!   the index.
//!
//! Record format (Kafka headers; the value is the line's bytes without the newline):
//!
//! | header | meaning |
//! |---|---|
//! | `task_id` | the task (also the record key) |
//! | `attempt` | 1, 2, ... |
//! | `stream` | `stdout`, `stderr` (or `system` for tasklog's own marker lines) |
//! | `line` | line number within the attempt, from 1 |
//! | `time` | RFC 3339 |
//! | `traceparent` | W3C trace context, when there is one |
//! | `part`, `continued` | on a line split into several records: part index from 0, and `continued: true` on every part but the last |

pub mod cursor;
pub mod follow;
pub mod index;
pub mod reader;
pub mod writer;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

pub use cursor::{Cursor, CursorError, CursorKey, Direction};
pub use writer::{LogWriter, LogWriterOptions};

/// Header names of a log record.
pub mod header {
    /// Task id.
    pub const TASK_ID: &str = "task_id";
    /// Attempt number.
    pub const ATTEMPT: &str = "attempt";
    /// Stream name.
    pub const STREAM: &str = "stream";
    /// Line number within the attempt.
    pub const LINE: &str = "line";
    /// RFC 3339 time.
    pub const TIME: &str = "time";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// Part index of a split line.
    pub const PART: &str = "part";
    /// `true` when the line continues in the next record.
    pub const CONTINUED: &str = "continued";
}

/// Default longest record value; longer lines are split into continuation records.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 64 * 1024;
/// Default per-attempt quota.
pub const DEFAULT_QUOTA_BYTES: u64 = 100 * 1024 * 1024;
/// A checkpoint (line -> offset) is kept every this many lines.
pub const CHECKPOINT_EVERY: i64 = 1000;

/// Which output a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// tasklog's own lines (quota markers).
    System,
}

impl Stream {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
            Stream::System => "system",
        }
    }

    /// Parses a header value.
    pub fn parse(s: &str) -> Option<Stream> {
        match s {
            "stdout" => Some(Stream::Stdout),
            "stderr" => Some(Stream::Stderr),
            "system" => Some(Stream::System),
            _ => None,
        }
    }
}

/// The metadata of one log record, decoded from its headers.
#[derive(Debug, Clone, PartialEq)]
pub struct LogMeta {
    /// Task id.
    pub task_id: Uuid,
    /// Attempt.
    pub attempt: i32,
    /// Stream.
    pub stream: Stream,
    /// Line number.
    pub line: i64,
    /// Time.
    pub time: Option<DateTime<Utc>>,
    /// Part index, for split lines.
    pub part: Option<i32>,
    /// Whether the line continues in the next record.
    pub continued: bool,
}

/// Why a record on the logs topic is not a log line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidLogRecord(pub String);

/// Decodes a log record's headers. `headers` are (name, value) in record order.
pub fn decode_meta(
    key: Option<&[u8]>,
    headers: &[(&str, Option<&[u8]>)],
) -> Result<LogMeta, InvalidLogRecord> {
    let get = |name: &str| {
        headers
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.and_then(|b| std::str::from_utf8(b).ok()))
    };
    let missing = |name: &str| InvalidLogRecord(format!("header {name} is missing or not UTF-8"));
    let task = get(header::TASK_ID).ok_or_else(|| missing(header::TASK_ID))?;
    let task_id = Uuid::parse_str(task)
        .map_err(|_| InvalidLogRecord(format!("task_id {task:?} is not a UUID")))?;
    if let Some(key) = key
        && std::str::from_utf8(key)
            .ok()
            .and_then(|k| Uuid::parse_str(k).ok())
            != Some(task_id)
    {
        return Err(InvalidLogRecord("the record key is not the task_id".into()));
    }
    let number = |name: &str| -> Result<i64, InvalidLogRecord> {
        let v = get(name).ok_or_else(|| missing(name))?;
        v.parse::<i64>()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| InvalidLogRecord(format!("{name} {v:?} is not a positive integer")))
    };
    let attempt = number(header::ATTEMPT)?;
    let attempt = i32::try_from(attempt)
        .map_err(|_| InvalidLogRecord(format!("attempt {attempt} is too large")))?;
    let line = number(header::LINE)?;
    let stream = get(header::STREAM).ok_or_else(|| missing(header::STREAM))?;
    let stream = Stream::parse(stream).ok_or_else(|| {
        InvalidLogRecord(format!("stream {stream:?} is not stdout, stderr or system"))
    })?;
    let time = match get(header::TIME) {
        None => None,
        Some(t) => Some(
            DateTime::parse_from_rfc3339(t)
                .map_err(|_| InvalidLogRecord(format!("time {t:?} is not RFC 3339")))?
                .with_timezone(&Utc),
        ),
    };
    let part = match get(header::PART) {
        None => None,
        Some(p) => Some(
            p.parse::<i32>()
                .ok()
                .filter(|p| *p >= 0)
                .ok_or_else(|| InvalidLogRecord(format!("part {p:?} is not an index")))?,
        ),
    };
    Ok(LogMeta {
        task_id,
        attempt,
        stream,
        line,
        time,
        part,
        continued: get(header::CONTINUED) == Some("true"),
    })
}

/// Splits a line into pieces of at most `max` bytes (at least one piece, possibly empty).
pub fn split_line(line: &[u8], max: usize) -> Vec<&[u8]> {
    if line.len() <= max || max == 0 {
        return vec![line];
    }
    line.chunks(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(
        pairs: &[(&'static str, &'static str)],
    ) -> Vec<(&'static str, Option<&'static [u8]>)> {
        pairs
            .iter()
            .map(|(k, v)| (*k, Some(v.as_bytes())))
            .collect()
    }

    const ID: &str = "0190d5a8-7bf8-7c3a-9a4e-0c8d2f3b4a5c";

    #[test]
    fn decodes_a_complete_record() {
        let h = headers(&[
            ("task_id", ID),
            ("attempt", "2"),
            ("stream", "stderr"),
            ("line", "17"),
            ("time", "2026-11-21T00:00:00Z"),
        ]);
        let m = decode_meta(Some(ID.as_bytes()), &h).unwrap();
        assert_eq!((m.attempt, m.line, m.stream), (2, 17, Stream::Stderr));
        assert!(m.time.is_some());
        assert_eq!((m.part, m.continued), (None, false));
    }

    #[test]
    fn refuses_malformed_records() {
        let base = [
            ("task_id", ID),
            ("attempt", "1"),
            ("stream", "stdout"),
            ("line", "1"),
        ];
        assert!(decode_meta(None, &headers(&base)).is_ok());
        for (name, bad) in [
            ("task_id", "x"),
            ("attempt", "0"),
            ("stream", "tty"),
            ("line", "-3"),
        ] {
            let mut h = base.to_vec();
            h.retain(|(k, _)| *k != name);
            h.push((name, bad));
            assert!(decode_meta(None, &headers(&h)).is_err(), "{name}={bad}");
        }
        assert!(decode_meta(Some(b"other"), &headers(&base)).is_err());
        assert!(decode_meta(None, &headers(&base[1..])).is_err());
    }

    #[test]
    fn splits_long_lines() {
        assert_eq!(split_line(b"abc", 2), vec![&b"ab"[..], &b"c"[..]]);
        assert_eq!(split_line(b"", 2), vec![&b""[..]]);
        assert_eq!(split_line(b"ab", 2).len(), 1);
    }
}
