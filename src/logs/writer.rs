//! The log writer: appends task output line by line through the idempotent producer.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, SecondsFormat, Utc};
use futures::future::{BoxFuture, FutureExt, join_all};
use rdkafka::message::{Header, OwnedHeaders};
use uuid::Uuid;

use super::{DEFAULT_MAX_RECORD_BYTES, DEFAULT_QUOTA_BYTES, Stream, header, split_line};
use crate::kafka::{AppendError, Appender};
use crate::metrics::metrics;

/// Settings of a [`LogWriter`].
#[derive(Debug, Clone)]
pub struct LogWriterOptions {
    /// The logs topic.
    pub topic: String,
    /// Longest record value; longer lines become continuation records.
    pub max_record_bytes: usize,
    /// Default per-attempt quota in bytes.
    pub quota_bytes: u64,
}

impl LogWriterOptions {
    /// Defaults (64 KiB records, 100 MiB per attempt) for `topic`.
    pub fn new(topic: &str) -> LogWriterOptions {
        LogWriterOptions {
            topic: topic.to_string(),
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            quota_bytes: DEFAULT_QUOTA_BYTES,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct AttemptState {
    last_line: i64,
    bytes: u64,
    quota: u64,
    over_quota: bool,
}

type Attempts = HashMap<(Uuid, i32), AttemptState>;

/// What became of one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Appended as line `n`.
    Line(i64),
    /// Dropped: the attempt's quota is used up.
    Dropped,
}

/// Writes lines of task attempts to the logs topic. Lines written through one writer
/// keep their order; `write` returns once the line is queued, and the returned future
/// resolves when the broker has acknowledged every record of it.
pub struct LogWriter {
    appender: Appender,
    options: LogWriterOptions,
    attempts: Mutex<Attempts>,
}

impl LogWriter {
    /// A writer on `appender`.
    pub fn new(appender: Appender, options: LogWriterOptions) -> LogWriter {
        LogWriter {
            appender,
            options,
            attempts: Mutex::new(HashMap::new()),
        }
    }

    /// The state of one attempt, created with the default quota on first use.
    fn state<'a>(
        &self,
        attempts: &'a mut Attempts,
        task_id: Uuid,
        attempt: i32,
    ) -> &'a mut AttemptState {
        attempts.entry((task_id, attempt)).or_insert(AttemptState {
            last_line: 0,
            bytes: 0,
            quota: self.options.quota_bytes,
            over_quota: false,
        })
    }

    /// Continues an attempt already written elsewhere: numbering resumes after
    /// `last_line`, and `bytes` count toward the quota. Never moves numbering back.
    pub fn resume(&self, task_id: Uuid, attempt: i32, last_line: i64, bytes: u64) {
        let mut attempts = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
        let state = self.state(&mut attempts, task_id, attempt);
        state.last_line = state.last_line.max(last_line);
        state.bytes = state.bytes.max(bytes);
    }

    /// Sets the quota of one attempt (a task's own `log_quota`).
    pub fn set_quota(&self, task_id: Uuid, attempt: i32, quota_bytes: u64) {
        let mut attempts = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
        self.state(&mut attempts, task_id, attempt).quota = quota_bytes;
    }

    /// Forgets an attempt (after it ended).
    pub fn finish(&self, task_id: Uuid, attempt: i32) {
        self.attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(task_id, attempt));
    }

    /// Queues one line. Returns what became of it and a future that resolves when its
    /// records are acknowledged.
    pub fn write(
        &self,
        task_id: Uuid,
        attempt: i32,
        stream: Stream,
        text: &[u8],
        time: Option<DateTime<Utc>>,
        traceparent: Option<&str>,
    ) -> (Written, BoxFuture<'static, Result<(), AppendError>>) {
        let time = time.unwrap_or_else(Utc::now);
        // Decide under the lock, and enqueue under it too, so that line numbers reach
        // the producer in order.
        let mut attempts = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
        let state = self.state(&mut attempts, task_id, attempt);
        if state.over_quota || state.bytes + text.len() as u64 > state.quota {
            metrics().log_lines_dropped.inc();
            if state.over_quota {
                return (Written::Dropped, futures::future::ready(Ok(())).boxed());
            }
            state.over_quota = true;
            state.last_line += 1;
            let marker = format!(
                "[tasklog] the log quota of {} bytes for attempt {attempt} is used up; further lines of this attempt are dropped",
                state.quota
            );
            let pending = self.enqueue(
                task_id,
                attempt,
                Stream::System,
                state.last_line,
                marker.as_bytes(),
                time,
                traceparent,
            );
            return (Written::Dropped, pending);
        }
        state.last_line += 1;
        state.bytes += text.len() as u64;
        let line = state.last_line;
        let pending = self.enqueue(task_id, attempt, stream, line, text, time, traceparent);
        metrics().log_lines_written.inc();
        (Written::Line(line), pending)
    }

    #[allow(clippy::too_many_arguments)]
    fn enqueue(
        &self,
        task_id: Uuid,
        attempt: i32,
        stream: Stream,
        line: i64,
        text: &[u8],
        time: DateTime<Utc>,
        traceparent: Option<&str>,
    ) -> BoxFuture<'static, Result<(), AppendError>> {
        let key = task_id.to_string();
        let attempt_s = attempt.to_string();
        let line_s = line.to_string();
        let time_s = time.to_rfc3339_opts(SecondsFormat::Micros, true);
        let parts = split_line(text, self.options.max_record_bytes);
        let split = parts.len() > 1;
        let mut pending = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let part_s = i.to_string();
            let mut fields: Vec<(&str, &[u8])> = vec![
                (header::TASK_ID, key.as_bytes()),
                (header::ATTEMPT, attempt_s.as_bytes()),
                (header::STREAM, stream.as_str().as_bytes()),
                (header::LINE, line_s.as_bytes()),
                (header::TIME, time_s.as_bytes()),
            ];
            if let Some(tp) = traceparent {
                fields.push((header::TRACEPARENT, tp.as_bytes()));
            }
            if split {
                fields.push((header::PART, part_s.as_bytes()));
                if i + 1 < parts.len() {
                    fields.push((header::CONTINUED, b"true"));
                }
            }
            let headers =
                fields
                    .into_iter()
                    .fold(OwnedHeaders::new_with_capacity(8), |h, (key, value)| {
                        h.insert(Header {
                            key,
                            value: Some(value),
                        })
                    });
            pending.push(self.appender.send(
                &self.options.topic,
                Some(key.as_bytes()),
                headers,
                part,
            ));
        }
        async move {
            for r in join_all(pending).await {
                r?;
            }
            Ok(())
        }
        .boxed()
    }
}
