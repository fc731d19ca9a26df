//! Log routes: `GET /v1/tasks/{id}/logs` (pages, follow, Server-Sent Events) and
//! `POST /v1/tasks/{id}/logs` (outside producers).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;
use uuid::Uuid;

use super::auth::Caller;
use super::tasks::{eventual, parse_id, parse_number, query_pairs, single, wait_param};
use super::{ApiError, AppState};
use crate::kafka::partition_for_key;
use crate::logs::follow::{FollowError, Follower};
use crate::logs::reader::{LineFilter, LogRecord, ReadError, ScanRange};
use crate::logs::{Cursor, CursorError, Direction, Stream};

/// Longest page.
pub const MAX_LIMIT: i64 = 5000;

/// Everything a log read needs to know about where the task's lines are.
struct Located {
    partition: i32,
    range: ScanRange,
    low_watermark: i64,
    terminal: bool,
    checkpoint_attempt: Option<i32>,
}

fn read_error(e: ReadError, state: &AppState, task_id: Uuid, partition: i32) -> ApiError {
    match e {
        ReadError::Expired { earliest, .. } => {
            let cursor = state.cursor_key.encode(&Cursor {
                task_id,
                partition,
                offset: earliest.max(0),
                direction: Direction::Forward,
            });
            ApiError::new(StatusCode::GONE, "cursor_expired", format!("the lines at that cursor were deleted by retention; the earliest valid cursor is {cursor}"))
                .with_detail("earliest_cursor", Value::String(cursor))
        }
        ReadError::Kafka(m) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable", m)
        }
    }
}

async fn locate(
    state: &Arc<AppState>,
    task_id: Uuid,
    attempt: Option<i32>,
) -> Result<Located, ApiError> {
    // The task's state first: lines are delivered before a terminal event is appended,
    // so every line of a terminal task is below the watermark read after it.
    let task = state
        .store
        .task(task_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("task {task_id} is not on the log")))?;
    // The indexer's progress before its rows: rows read afterwards can only be newer,
    // so nothing falls between "indexed" and "not yet indexed".
    // The watermarks (after the task's state) and the index go out together.
    let expected = partition_for_key(task_id.to_string().as_bytes(), state.options.log_partitions);
    let reader = &state.log_reader;
    let index = async {
        let offsets = state
            .store
            .projection_offsets(&state.options.topics.logs)
            .await?;
        let rows = state.store.log_index(task_id).await?;
        Ok::<_, ApiError>((offsets, rows))
    };
    let (index, marks) = tokio::join!(index, reader.watermarks(expected));
    let (indexed_by_partition, rows) = index?;
    let rows: Vec<_> = rows
        .into_iter()
        .filter(|r| attempt.is_none_or(|a| a == r.attempt))
        .collect();
    // Lines published with another partitioner live where the index says.
    let partition = rows.first().map(|r| r.partition).unwrap_or(expected);
    let marks = if partition == expected {
        marks
    } else {
        reader.watermarks(partition).await
    };
    let (low, high) = marks.map_err(|e| read_error(e, state, task_id, partition))?;
    let indexed = indexed_by_partition
        .get(&partition)
        .copied()
        .unwrap_or(0)
        .min(high);
    // Lines can only be where the index says, or in the tail the indexer has not reached.
    let (first, last) = rows.iter().fold((i64::MAX, -1i64), |(f, l), r| {
        (f.min(r.first_offset), l.max(r.last_offset))
    });
    let range = if rows.is_empty() {
        ScanRange {
            low: indexed.max(low),
            high,
            skip: None,
        }
    } else {
        ScanRange {
            low: first.max(low),
            high,
            skip: (last + 1 < indexed).then_some((last + 1, indexed)),
        }
    };
    Ok(Located {
        partition,
        range,
        low_watermark: low,
        terminal: task.task.state.is_terminal(),
        checkpoint_attempt: attempt.or(rows.last().map(|r| r.attempt)),
    })
}

/// One line as the API returns it.
#[derive(serde::Serialize)]
struct LineOut<'a> {
    offset: i64,
    attempt: Option<i32>,
    line: Option<i64>,
    stream: Option<Stream>,
    time: Option<DateTime<Utc>>,
    /// The text (U+FFFD where the bytes are not UTF-8).
    text: std::borrow::Cow<'a, str>,
    /// The exact bytes, base64, only when they are not UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    part: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    continued: Option<bool>,
}

fn line_out(record: &LogRecord) -> LineOut<'_> {
    let meta = record.meta.as_ref();
    let (text, bytes) = match std::str::from_utf8(&record.value) {
        Ok(text) => (std::borrow::Cow::Borrowed(text), None),
        Err(_) => (
            String::from_utf8_lossy(&record.value),
            Some(STANDARD.encode(&record.value)),
        ),
    };
    LineOut {
        offset: record.offset,
        attempt: meta.map(|m| m.attempt),
        line: meta.map(|m| m.line),
        stream: meta.map(|m| m.stream),
        time: meta.and_then(|m| m.time),
        text,
        bytes,
        part: meta.and_then(|m| m.part),
        continued: meta.and_then(|m| m.part.map(|_| m.continued)),
    }
}

#[cfg(test)]
fn line_json(record: &LogRecord) -> Value {
    serde_json::to_value(line_out(record)).unwrap_or_default()
}

struct Query {
    cursor: Option<Cursor>,
    limit: usize,
    direction: Direction,
    tail: Option<usize>,
    attempt: Option<i32>,
    stream: Option<Stream>,
    from_line: Option<i64>,
    follow: bool,
    wait: Duration,
    /// `consistency=eventual`: skip the read-your-writes wait.
    eventual: bool,
}

fn parse_query(
    state: &AppState,
    task_id: Uuid,
    raw: &Option<String>,
    headers: &HeaderMap,
) -> Result<Query, ApiError> {
    let pairs = query_pairs(
        raw,
        &[
            "cursor",
            "limit",
            "direction",
            "tail",
            "attempt",
            "stream",
            "from_line",
            "follow",
            "wait_ms",
            "consistency",
        ],
    )?;
    let cursor_text = single(&pairs, "cursor")?.map(str::to_string).or_else(|| {
        headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    });
    let cursor = match cursor_text {
        None => None,
        Some(text) => Some(
            state
                .cursor_key
                .decode(&text, task_id)
                .map_err(|e| match e {
                    CursorError::Invalid => ApiError::bad_request("invalid_cursor", e.to_string()),
                    CursorError::TaskMismatch(_) => ApiError::bad_request(
                        "cursor_task_mismatch",
                        format!("{e}, not to task {task_id}"),
                    ),
                })?,
        ),
    };
    let direction = match single(&pairs, "direction")? {
        None => cursor.map(|c| c.direction).unwrap_or(Direction::Forward),
        Some("forward") => Direction::Forward,
        Some("backward") => Direction::Backward,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("direction {other:?} is not forward or backward"),
            ));
        }
    };
    if let Some(c) = cursor
        && c.direction != direction
    {
        return Err(ApiError::bad_request(
            "invalid_cursor",
            "the cursor pages the other direction",
        ));
    }
    let limit = single(&pairs, "limit")?
        .map(|v| parse_number("limit", v, 1, MAX_LIMIT))
        .transpose()?
        .unwrap_or(1000) as usize;
    let tail = single(&pairs, "tail")?
        .map(|v| parse_number("tail", v, 1, MAX_LIMIT))
        .transpose()?
        .map(|n| n as usize);
    let attempt = single(&pairs, "attempt")?
        .map(|v| parse_number("attempt", v, 1, i32::MAX as i64))
        .transpose()?
        .map(|n| n as i32);
    let stream = stream_param(&pairs)?;
    let from_line = single(&pairs, "from_line")?
        .map(|v| parse_number("from_line", v, 1, i64::MAX))
        .transpose()?;
    let follow = match single(&pairs, "follow")? {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("follow {other:?} is not true or false"),
            ));
        }
    };
    let wait = wait_param(
        state,
        &pairs,
        // The default follow wait, within the server's longest.
        Duration::from_millis(if follow { 10_000 } else { 0 }).min(state.options.max_wait),
    )?;
    if tail.is_some() && (cursor.is_some() || from_line.is_some()) {
        return Err(ApiError::bad_request(
            "invalid_query",
            "tail cannot be combined with cursor or from_line",
        ));
    }
    if from_line.is_some() && direction == Direction::Backward {
        return Err(ApiError::bad_request(
            "invalid_query",
            "from_line reads forward",
        ));
    }
    Ok(Query {
        cursor,
        limit,
        direction,
        tail,
        attempt,
        stream,
        from_line,
        follow,
        wait,
        eventual: eventual(&pairs)?,
    })
}

/// What is wrong with a well-formed cursor of the right task.
#[derive(Debug, PartialEq, Eq)]
enum CursorProblem {
    /// It points into another partition than the task's log.
    WrongPartition,
    /// Its lines were deleted by retention; `earliest` is the first offset kept.
    Expired { earliest: i64 },
}

/// Checks a cursor against where the task's log is now. Pure.
fn check_cursor(cursor: &Cursor, partition: i32, low_watermark: i64) -> Result<(), CursorProblem> {
    if cursor.partition != partition {
        return Err(CursorProblem::WrongPartition);
    }
    if cursor.offset < low_watermark {
        return Err(CursorProblem::Expired {
            earliest: low_watermark,
        });
    }
    Ok(())
}

/// One page of lines.
struct Page {
    lines: Vec<LogRecord>,
    next: Option<Cursor>,
    prev: Option<Cursor>,
    complete: bool,
    /// Reading forward, it reached the end of the log as it was when read.
    at_end: bool,
}

async fn read_page(
    state: &Arc<AppState>,
    task_id: Uuid,
    q: &Query,
) -> Result<(Page, Located), ApiError> {
    let at = locate(state, task_id, q.attempt).await?;
    let reader = &state.log_reader;
    let filter = LineFilter {
        task_id,
        attempt: q.attempt,
        stream: q.stream,
        from_line: q.from_line,
    };
    let cursor_at = |offset: i64, direction: Direction| Cursor {
        task_id,
        partition: at.partition,
        offset,
        direction,
    };
    if let Some(c) = q.cursor {
        match check_cursor(&c, at.partition, at.low_watermark) {
            Ok(()) => {}
            Err(CursorProblem::WrongPartition) => {
                return Err(ApiError::bad_request(
                    "invalid_cursor",
                    "the cursor does not point into this task's log",
                ));
            }
            Err(CursorProblem::Expired { earliest }) => {
                return Err(read_error(
                    ReadError::Expired {
                        offset: c.offset,
                        earliest,
                    },
                    state,
                    task_id,
                    at.partition,
                ));
            }
        }
    }
    let err = |e| read_error(e, state, task_id, at.partition);
    if let Some(n) = q.tail {
        let (lines, before) = reader
            .backward(
                at.partition,
                at.range.high,
                at.range,
                &filter,
                n,
                at.low_watermark,
            )
            .await
            .map_err(err)?;
        let page = Page {
            next: Some(cursor_at(at.range.high, Direction::Forward)),
            prev: (before > at.range.low).then(|| cursor_at(before, Direction::Backward)),
            complete: at.terminal,
            at_end: true,
            lines,
        };
        return Ok((page, at));
    }
    match q.direction {
        Direction::Forward => {
            let mut start = q.cursor.map(|c| c.offset).unwrap_or(at.range.low);
            if q.cursor.is_none()
                && let (Some(k), Some(attempt)) = (q.from_line, at.checkpoint_attempt)
                && let Some((_, offset)) = state.store.log_checkpoint(task_id, attempt, k).await?
            {
                start = start.max(offset);
            }
            let (lines, next) = reader
                .forward(
                    at.partition,
                    start,
                    at.range,
                    &filter,
                    q.limit,
                    at.low_watermark,
                )
                .await
                .map_err(err)?;
            let at_end = next >= at.range.high;
            let page = Page {
                prev: lines
                    .first()
                    .map(|l| cursor_at(l.offset, Direction::Backward)),
                next: Some(cursor_at(next, Direction::Forward)),
                complete: at.terminal && at_end,
                at_end,
                lines,
            };
            Ok((page, at))
        }
        Direction::Backward => {
            let before = q.cursor.map(|c| c.offset).unwrap_or(at.range.high);
            let (lines, next) = reader
                .backward(
                    at.partition,
                    before,
                    at.range,
                    &filter,
                    q.limit,
                    at.low_watermark,
                )
                .await
                .map_err(err)?;
            let at_start = next <= at.range.low;
            let page = Page {
                next: (!at_start).then(|| cursor_at(next, Direction::Backward)),
                prev: Some(cursor_at(
                    lines.last().map(|l| l.offset + 1).unwrap_or(before),
                    Direction::Forward,
                )),
                complete: at_start,
                at_end: false,
                lines,
            };
            Ok((page, at))
        }
    }
}

/// A page as the API returns it.
#[derive(serde::Serialize)]
struct PageOut<'a> {
    lines: Vec<LineOut<'a>>,
    next_cursor: Option<String>,
    prev_cursor: Option<String>,
    complete: bool,
}

fn page_out<'a>(state: &AppState, page: &'a Page) -> PageOut<'a> {
    PageOut {
        lines: page.lines.iter().map(line_out).collect(),
        next_cursor: page.next.map(|c| state.cursor_key.encode(&c)),
        prev_cursor: page.prev.map(|c| state.cursor_key.encode(&c)),
        complete: page.complete,
    }
}

/// `GET /v1/tasks/{id}/logs`
pub async fn get_logs(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let task_id = parse_id(&id)?;
    state.reach_task(&caller, task_id).await?;
    let q = parse_query(&state, task_id, &raw, &headers)?;
    if !q.eventual {
        state.read_task_waiting(task_id, q.wait).await?;
    }
    let wants_sse = wants_event_stream(&headers);
    // Watched before the first read, so that an end after that read is not missed.
    let mut end = (wants_sse || q.follow).then(|| state.task_ends.watch(task_id));
    if let Some(end) = end.take_if(|_| wants_sse) {
        if q.direction == Direction::Backward {
            return Err(ApiError::bad_request(
                "invalid_query",
                "an event stream reads forward",
            ));
        }
        if state.follows.followers() >= state.follows.max_followers() {
            return Err(too_many_followers(state.follows.max_followers()));
        }
        // Validate before streaming, so errors are plain JSON responses.
        let (first, at) = read_page(&state, task_id, &q).await?;
        return Ok(sse(state, task_id, q, first, at.partition, end).into_response());
    }
    let deadline = Instant::now() + q.wait;
    loop {
        let (page, at) = read_page(&state, task_id, &q).await?;
        let waiting = q.follow
            && q.direction == Direction::Forward
            && page.lines.is_empty()
            && !page.complete;
        if !waiting || Instant::now() >= deadline {
            return Ok(Json(page_out(&state, &page)).into_response());
        }
        let from = page.next.map(|c| c.offset).unwrap_or(at.range.high);
        // Wake on a new line of the task (from the process's shared tail), on its end,
        // or at the deadline; then read again.
        let mut follower =
            state
                .follows
                .follow(at.partition, task_id, from)
                .map_err(|e| match e {
                    FollowError::TooMany { limit } => too_many_followers(limit),
                })?;
        if follower.from() > from {
            continue; // lines were appended meanwhile: read them
        }
        let filter = line_filter(task_id, &q);
        if let Some(end) = end.as_mut() {
            tokio::select! {
                _ = next_line(&mut follower, from, &filter) => {}
                _ = end.ended() => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }
}

/// The `stream` query value, when there is one.
fn stream_param(pairs: &[(String, String)]) -> Result<Option<Stream>, ApiError> {
    single(pairs, "stream")?
        .map(|s| {
            Stream::parse(s).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_query",
                    format!("stream {s:?} is not stdout, stderr or system"),
                )
            })
        })
        .transpose()
}

/// Whether the client asks for Server-Sent Events.
fn wants_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"))
}

/// `503 too_many_followers`: the process follows as many logs as it allows.
fn too_many_followers(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too_many_followers",
        format!(
            "this API server already has {limit} log followers (TASKLOG_MAX_FOLLOWERS); \
             try again later or page without following"
        ),
    )
}

fn line_filter(task_id: Uuid, q: &Query) -> LineFilter {
    LineFilter {
        task_id,
        attempt: q.attempt,
        stream: q.stream,
        from_line: q.from_line,
    }
}

/// The next line the follower is handed at or after `from` that `filter` keeps, or
/// `None` when it was cut off (it then reads from its cursor again).
async fn next_line(follower: &mut Follower, from: i64, filter: &LineFilter) -> Option<LogRecord> {
    loop {
        let record = follower.next().await?;
        if record.offset >= from && filter.matches(&record) {
            return Some(record);
        }
    }
}

/// The tasks this process's log followers wait on, and which of them have ended: one
/// query per change of the task projection (at most every [`ENDS_MIN_INTERVAL`]), for
/// all of them together — not a read per follower.
pub struct TaskEnds {
    watched: std::sync::Mutex<HashMap<Uuid, (usize, watch::Sender<bool>)>>,
}

/// Shortest time between two checks of which followed tasks ended.
pub const ENDS_MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Longest time between two checks while a task is followed (a missed notification).
pub const ENDS_MAX_INTERVAL: Duration = Duration::from_secs(5);

/// A follower's view of whether its task has ended. Dropping it stops watching.
pub struct EndWatch {
    ends: Arc<TaskEnds>,
    task_id: Uuid,
    rx: watch::Receiver<bool>,
}

impl EndWatch {
    /// Returns once the task has ended (the projection has its terminal event).
    pub async fn ended(&mut self) {
        if self.rx.wait_for(|ended| *ended).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for EndWatch {
    fn drop(&mut self) {
        let mut watched = self.ends.watched.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((n, _)) = watched.get_mut(&self.task_id) {
            *n -= 1;
            if *n == 0 {
                watched.remove(&self.task_id);
            }
        }
    }
}

impl TaskEnds {
    /// Starts checking, on every change of the task projection, which watched tasks
    /// ended.
    pub fn start(store: crate::store::Store) -> Arc<TaskEnds> {
        let ends = Arc::new(TaskEnds {
            watched: std::sync::Mutex::new(HashMap::new()),
        });
        let changes = store.follow(&[crate::store::PROJECTION_CHANNEL]);
        tokio::spawn(check_ends(Arc::downgrade(&ends), store, changes));
        ends
    }

    /// Watches `task_id`.
    pub fn watch(self: &Arc<Self>, task_id: Uuid) -> EndWatch {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        let (n, tx) = watched
            .entry(task_id)
            .or_insert_with(|| (0, watch::channel(false).0));
        *n += 1;
        let rx = tx.subscribe();
        EndWatch {
            ends: self.clone(),
            task_id,
            rx,
        }
    }
}

async fn check_ends(
    ends: std::sync::Weak<TaskEnds>,
    store: crate::store::Store,
    mut changes: watch::Receiver<u64>,
) {
    loop {
        let Some(this) = ends.upgrade() else { return };
        let ids: Vec<Uuid> = this
            .watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        if !ids.is_empty() {
            match store.ended_tasks(&ids).await {
                Ok(ended) => {
                    let watched = this.watched.lock().unwrap_or_else(|e| e.into_inner());
                    for id in ended {
                        if let Some((_, tx)) = watched.get(&id) {
                            tx.send_replace(true);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "log follow: which tasks ended"),
            }
        }
        let busy = !ids.is_empty();
        drop(this);
        tokio::time::sleep(ENDS_MIN_INTERVAL).await;
        if busy {
            let _ = tokio::time::timeout(ENDS_MAX_INTERVAL, changes.changed()).await;
        } else if changes.changed().await.is_err() {
            return;
        }
    }
}

/// How a live stretch of an event stream ended.
enum Live {
    /// The client went away.
    Gone,
    /// The task ended, or the follower was cut off, or lines are to be read first: read
    /// pages from the cursor again.
    ReadAgain { lagging: bool },
    /// Everything up to the task's end went out.
    Complete,
    /// The process follows as many logs as it allows, or a read failed.
    Failed(ApiError),
}

/// One task's lines going out on an event stream: the task's own stream, or its part
/// of a stream of many tasks (then every event's data names the task).
struct TaskStream {
    state: Arc<AppState>,
    tx: tokio::sync::mpsc::Sender<SseEvent>,
    task_id: Uuid,
    partition: i32,
    /// Fields added to every event's data (`task_id`, `name`) on a stream of many tasks.
    tag: Option<serde_json::Map<String, Value>>,
    /// The offset after the last line sent: a line below it (a page and the shared
    /// tail overlapping) is not sent again.
    sent_to: std::sync::atomic::AtomicI64,
}

impl TaskStream {
    fn cursor(&self, offset: i64) -> Cursor {
        Cursor {
            task_id: self.task_id,
            partition: self.partition,
            offset,
            direction: Direction::Forward,
        }
    }

    /// Sends `event` with `data` (and the tag); false when the client went away.
    async fn send(&self, event: &str, data: Value, id: Option<String>) -> bool {
        let mut data = data;
        if let (Some(tag), Value::Object(fields)) = (&self.tag, &mut data) {
            fields.extend(tag.clone());
        }
        let mut e = SseEvent::default().event(event).data(data.to_string());
        if let Some(id) = id {
            e = e.id(id);
        }
        self.tx.send(e).await.is_ok()
    }

    /// Sends one line as a `line` event whose id is the cursor after it.
    async fn send_line(&self, line: &LogRecord) -> bool {
        use std::sync::atomic::Ordering;
        if line.offset < self.sent_to.load(Ordering::Acquire) {
            return true;
        }
        self.sent_to.store(line.offset + 1, Ordering::Release);
        let cursor = self.state.cursor_key.encode(&self.cursor(line.offset + 1));
        let data = match serde_json::to_value(line_out(line)) {
            Ok(data) => data,
            Err(e) => {
                tracing::warn!(error = %e, "log follow: cannot encode a line");
                return true;
            }
        };
        self.send("line", data, Some(cursor)).await
    }

    async fn send_end(&self) {
        let name = if self.tag.is_some() {
            "task_end"
        } else {
            "end"
        };
        self.send(name, json!({"complete": true}), None).await;
    }

    async fn send_error(&self, e: &ApiError) {
        self.send("error", e.body(), None).await;
    }

    /// Follows the task's new lines from the shared tail, from `next` (updated as lines
    /// go out), until the task ends, the client leaves, or the follower is cut off.
    async fn live(
        &self,
        q: &mut Query,
        filter: &LineFilter,
        next: &mut i64,
        end: &mut EndWatch,
    ) -> Live {
        let mut follower = match self
            .state
            .follows
            .follow(self.partition, self.task_id, *next)
        {
            Ok(f) => f,
            Err(FollowError::TooMany { limit }) => {
                return Live::Failed(too_many_followers(limit));
            }
        };
        // Lines appended since the last read: read them through the cache while the
        // follower stays registered (what arrives meanwhile waits in its buffer, and
        // what comes twice is dropped by offset).
        while follower.from() > *next {
            q.cursor = Some(self.cursor(*next));
            let page = match read_page(&self.state, self.task_id, q).await {
                Ok((page, _)) => page,
                Err(e) => return Live::Failed(e),
            };
            for line in &page.lines {
                if !self.send_line(line).await {
                    return Live::Gone;
                }
            }
            let before = *next;
            if let Some(c) = page.next {
                *next = c.offset;
            }
            if page.complete {
                return Live::Complete;
            }
            if *next <= before {
                break;
            }
        }
        loop {
            tokio::select! {
                line = next_line(&mut follower, *next, filter) => match line {
                    Some(line) => {
                        if !self.send_line(&line).await {
                            return Live::Gone;
                        }
                        *next = line.offset + 1;
                    }
                    None => return Live::ReadAgain { lagging: follower.overflowed() },
                },
                // A follower cut off before the end still hears that it lagged.
                _ = end.ended() => return Live::ReadAgain { lagging: follower.overflowed() },
                _ = self.tx.closed() => return Live::Gone,
            }
        }
    }

    /// Sends `first`, then pages and live lines, until the task is complete (an `end`
    /// or `task_end` event), the client leaves or a read fails (an `error` event).
    async fn run(self, mut q: Query, first: Page, mut end: EndWatch) {
        let filter = line_filter(self.task_id, &q);
        let mut page = first;
        let mut next = page.next.map(|c| c.offset).unwrap_or(0);
        loop {
            for line in &page.lines {
                if !self.send_line(line).await {
                    return;
                }
            }
            if let Some(c) = page.next {
                next = c.offset;
            }
            if page.complete {
                self.send_end().await;
                return;
            }
            if page.at_end {
                match self.live(&mut q, &filter, &mut next, &mut end).await {
                    Live::Gone => return,
                    Live::Complete => {
                        self.send_end().await;
                        return;
                    }
                    Live::Failed(e) => {
                        self.send_error(&e).await;
                        return;
                    }
                    Live::ReadAgain { lagging: true } => {
                        // Cut off for being slow: said, then resumed from the cursor.
                        let cursor = self.state.cursor_key.encode(&self.cursor(next));
                        let notice = json!({"lagging": true, "resume_cursor": cursor});
                        if !self.send("lagging", notice, None).await {
                            return;
                        }
                    }
                    Live::ReadAgain { lagging: false } => {}
                }
            }
            q.cursor = Some(self.cursor(next));
            page = match read_page(&self.state, self.task_id, &q).await {
                Ok((p, _)) => p,
                Err(e) => {
                    self.send_error(&e).await;
                    return;
                }
            };
        }
    }
}

/// The response side of an event stream fed through `rx`.
fn event_stream(rx: tokio::sync::mpsc::Receiver<SseEvent>) -> impl IntoResponse {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|event| (Ok::<_, Infallible>(event), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

fn sse(
    state: Arc<AppState>,
    task_id: Uuid,
    q: Query,
    first: Page,
    partition: i32,
    end: EndWatch,
) -> impl IntoResponse {
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(256);
    let stream = TaskStream {
        state,
        tx,
        task_id,
        partition,
        tag: None,
        sent_to: Default::default(),
    };
    tokio::spawn(stream.run(q, first, end));
    event_stream(rx)
}

/// Shortest time between two looks for newly matching tasks on a stream of many.
pub const MATCH_MIN_INTERVAL: Duration = Duration::from_millis(500);
/// Most tasks one stream of many follows at once.
pub const MAX_MATCHED_TASKS: i64 = 500;

/// `GET /v1/logs?label=k=v&service=NAME&project=P` with `Accept: text/event-stream`:
/// the lines of every unfinished task that matches, and of every matching task
/// submitted later, on one stream (like `kubectl logs -l`). Every event's data has
/// `task_id` and `name`; `event: task` when a task joins, `event: task_end` when one
/// is complete. It lasts until the client leaves.
pub async fn follow_many(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(&raw, &["label", "service", "project", "stream"])?;
    let mut filter = crate::store::TaskFilter {
        limit: MAX_MATCHED_TASKS,
        unfinished: true,
        projects: super::tasks::projects_param(&caller, &pairs)?,
        ..Default::default()
    };
    filter.labels = super::tasks::label_params(&pairs)?;
    filter.service = single(&pairs, "service")?.map(str::to_string);
    if let Some(name) = &filter.service
        && !crate::events::service::valid_service_name(name)
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!(
                "service {:?} is not a service name",
                name.chars().take(64).collect::<String>()
            ),
        ));
    }
    if filter
        .labels
        .iter()
        .flat_map(|(k, v)| [k, v])
        .chain(filter.service.iter())
        .any(|s| s.contains('\0'))
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            "label and service may not contain NUL (U+0000)",
        ));
    }
    let stream = stream_param(&pairs)?;
    let wants_sse = wants_event_stream(&headers);
    // Without a stream: which tasks a stream would follow now.
    let matching = state.store.list_tasks(&filter).await?;
    if !wants_sse {
        let tasks: Vec<Value> = matching
            .iter()
            .rev()
            .map(|r| json!({"task_id": r.task.id, "name": r.task.spec.name, "state": r.task.state}))
            .collect();
        return Ok(Json(json!({"tasks": tasks})).into_response());
    }
    if state.follows.followers() >= state.follows.max_followers() {
        return Err(too_many_followers(state.follows.max_followers()));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(256);
    tokio::spawn(match_and_follow(state, filter, stream, tx));
    Ok(event_stream(rx).into_response())
}

/// Looks for matching tasks (now, and after each change of the task projection) and
/// streams each new one's lines into `tx`, until the client leaves.
async fn match_and_follow(
    state: Arc<AppState>,
    filter: crate::store::TaskFilter,
    stream: Option<Stream>,
    tx: tokio::sync::mpsc::Sender<SseEvent>,
) {
    let mut changes = state.projection.clone();
    let mut followed: std::collections::HashSet<Uuid> = std::collections::HashSet::new();
    let mut running = tokio::task::JoinSet::new();
    loop {
        match state.store.list_tasks(&filter).await {
            Ok(tasks) => {
                // Oldest first, so that their streams start in submission order.
                for record in tasks.into_iter().rev() {
                    let task = &record.task;
                    if !followed.insert(task.id) {
                        continue;
                    }
                    let mut tag = serde_json::Map::new();
                    tag.insert("task_id".into(), Value::from(task.id.to_string()));
                    tag.insert("name".into(), json!(task.spec.name));
                    if tx
                        .send(
                            SseEvent::default()
                                .event("task")
                                .data(Value::Object(tag.clone()).to_string()),
                        )
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let (state, tx) = (state.clone(), tx.clone());
                    let task_id = task.id;
                    running.spawn(async move {
                        let q = Query {
                            cursor: None,
                            limit: 1000,
                            direction: Direction::Forward,
                            tail: None,
                            attempt: None,
                            stream,
                            from_line: None,
                            follow: true,
                            wait: Duration::ZERO,
                            eventual: true,
                        };
                        let end = state.task_ends.watch(task_id);
                        let target = TaskStream {
                            state: state.clone(),
                            tx,
                            task_id,
                            partition: 0,
                            tag: Some(tag),
                            sent_to: Default::default(),
                        };
                        match read_page(&state, task_id, &q).await {
                            Ok((first, at)) => {
                                TaskStream {
                                    partition: at.partition,
                                    ..target
                                }
                                .run(q, first, end)
                                .await
                            }
                            Err(e) => target.send_error(&e).await,
                        }
                    });
                }
            }
            Err(e) => {
                let e = ApiError::from(e);
                let _ = tx
                    .send(
                        SseEvent::default()
                            .event("error")
                            .data(e.body().to_string()),
                    )
                    .await;
                return;
            }
        }
        // Reap the streams that ended, without waiting on them.
        while running.try_join_next().is_some() {}
        tokio::time::sleep(MATCH_MIN_INTERVAL).await;
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = tx.closed() => return,
        }
    }
}

/// One line posted by an outside producer.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PostedLine {
    stream: Stream,
    text: String,
    #[serde(default)]
    time: Option<DateTime<Utc>>,
}

/// `POST /v1/tasks/{id}/logs?attempt=N` with NDJSON or a JSON array of
/// `{stream, text, time?}`: appended in order; 202 after every delivery report.
pub async fn post_logs(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    trace: super::traces::RequestTrace,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    let task_id = parse_id(&id)?;
    state.reach_task(&caller, task_id).await?;
    let pairs = query_pairs(&raw, &["attempt"])?;
    let attempt = single(&pairs, "attempt")?
        .map(|v| parse_number("attempt", v, 1, i32::MAX as i64))
        .transpose()?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::bad_request("invalid_body", "the body is not UTF-8"))?;
    let trimmed = text.trim_start();
    let lines: Vec<PostedLine> = if trimmed.starts_with('[') {
        serde_json::from_str(trimmed).map_err(|e| {
            ApiError::bad_request(
                "invalid_body",
                format!("expected a JSON array of {{stream, text, time?}}: {e}"),
            )
        })?
    } else {
        trimmed
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| {
                    ApiError::bad_request(
                        "invalid_body",
                        format!("line {} of the NDJSON body: {e}", i + 1),
                    )
                })
            })
            .collect::<Result<_, _>>()?
    };
    if lines.is_empty() {
        return Err(ApiError::bad_request("invalid_body", "no lines"));
    }
    if lines.iter().any(|l| l.stream == Stream::System) {
        return Err(ApiError::bad_request(
            "invalid_body",
            "stream must be stdout or stderr",
        ));
    }
    state.read_task(task_id).await?;
    let task = state
        .store
        .task(task_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("task {task_id} is not on the log")))?;
    let attempt = attempt
        .map(|a| a as i32)
        .unwrap_or((task.task.attempt as i32).max(1));
    // Continue the attempt's numbering where the log (as indexed) and this server left it.
    if let Some(row) = state
        .store
        .log_index(task_id)
        .await?
        .into_iter()
        .find(|r| r.attempt == attempt)
    {
        state
            .log_writer
            .resume(task_id, attempt, row.last_line, row.bytes as u64);
    }
    if let Some(quota) = task.task.spec.log_quota_bytes().ok().flatten() {
        state.log_writer.set_quota(task_id, attempt, quota);
    }
    // The lines carry the caller's span, or the task's trace.
    let traceparent = trace
        .parent
        .or(task.task.traceparent)
        .map(|t| t.to_string());
    let mut pending = Vec::with_capacity(lines.len());
    let mut appended = 0usize;
    let mut dropped = 0usize;
    let (mut first, mut last) = (None, None);
    for l in &lines {
        let (written, p) = state.log_writer.write(
            task_id,
            attempt,
            l.stream,
            l.text.as_bytes(),
            l.time,
            traceparent.as_deref(),
        );
        match written {
            crate::logs::writer::Written::Line(n) => {
                appended += 1;
                first.get_or_insert(n);
                last = Some(n);
            }
            crate::logs::writer::Written::Dropped => dropped += 1,
        }
        pending.push(p);
    }
    for p in pending {
        p.await?;
    }
    Ok((StatusCode::ACCEPTED, Json(json!({"task_id": task_id, "attempt": attempt, "appended": appended, "dropped": dropped, "first_line": first, "last_line": last}))).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor(partition: i32, offset: i64) -> Cursor {
        Cursor {
            task_id: Uuid::nil(),
            partition,
            offset,
            direction: Direction::Forward,
        }
    }

    #[test]
    fn cursors_below_the_retained_log_are_expired() {
        assert_eq!(check_cursor(&cursor(3, 100), 3, 0), Ok(()));
        assert_eq!(check_cursor(&cursor(3, 100), 3, 100), Ok(()));
        assert_eq!(
            check_cursor(&cursor(3, 99), 3, 100),
            Err(CursorProblem::Expired { earliest: 100 })
        );
        assert_eq!(
            check_cursor(&cursor(2, 100), 3, 0),
            Err(CursorProblem::WrongPartition)
        );
    }

    #[test]
    fn an_expired_cursor_error_carries_the_earliest_valid_cursor() {
        let e = ApiError::new(StatusCode::GONE, "cursor_expired", "gone")
            .with_detail("earliest_cursor", json!("abc"));
        let body = e.body();
        assert_eq!(body["error"]["code"], "cursor_expired");
        assert_eq!(body["error"]["earliest_cursor"], "abc");
    }

    #[test]
    fn non_utf8_lines_come_back_with_their_exact_bytes() {
        let record = LogRecord {
            offset: 1,
            meta: None,
            value: vec![0xff, b'a', 0xfe],
        };
        let v = line_json(&record);
        assert_eq!(
            STANDARD.decode(v["bytes"].as_str().unwrap()).unwrap(),
            vec![0xff, b'a', 0xfe]
        );
        assert!(v["text"].as_str().unwrap().contains('a'));
        let record = LogRecord {
            offset: 1,
            meta: None,
            value: b"plain".to_vec(),
        };
        assert!(line_json(&record).get("bytes").is_none());
    }
}
