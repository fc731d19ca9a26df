//! Property tests on what producers control: records on the events, workers and
//! services topics (anyone who may publish there), task specs (anyone who may submit),
//! and the cursors and log record headers clients and producers hand back. Whatever
//! the input, the decoders answer with a value or a typed error, never a panic (debug
//! builds also panic on integer overflow, so arithmetic on producer-controlled numbers
//! is covered); what tasklog encodes decodes back to itself.
//!
//! Inputs are either arbitrary or valid ones with one part replaced by something
//! arbitrary, so that the checks behind the first one are reached too.

use chrono::{DateTime, Utc};
use proptest::prelude::*;
use serde_json::{Value, json};
use tasklog::events::service::{ServiceEvent, ServicePayload, ServiceSpec};
use tasklog::events::worker::{LastKnown, WorkerCapacity, WorkerEvent, WorkerInfo, WorkerPayload};
use tasklog::events::{
    CancelledData, EncodedEvent, Event, Payload, RawRecord, ReasonData, TaskSpec, apply, header,
    retry,
};
use tasklog::logs::cursor::{Cursor, CursorKey, Direction};
use uuid::Uuid;

/// Cases per property: enough to find what the hand-written tests missed, few enough
/// that the file runs in seconds.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------
// Strategies

/// Whole numbers spread evenly over their magnitudes (as many below 1000 as between
/// 2^40 and 2^50), where uniform ones would nearly all be huge.
fn magnitude() -> impl Strategy<Value = u64> {
    (0u32..64).prop_flat_map(|bits| 0..=(1u64 << bits))
}

/// Numbers where arithmetic goes wrong: the edges of every integer width, and floats.
fn edgy_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        magnitude().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop::sample::select(vec![
            0i128,
            1,
            -1,
            i32::MAX as i128,
            i32::MIN as i128,
            u32::MAX as i128,
            u32::MAX as i128 + 1,
            i64::MAX as i128,
            i64::MIN as i128,
            u64::MAX as i128,
        ])
        .prop_map(|n| match u64::try_from(n) {
            Ok(u) => Value::from(u),
            Err(_) => Value::from(n as i64),
        }),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(Value::from),
    ]
}

/// Strings a producer might try: durations and sizes with huge numbers, times, ids,
/// and anything at all.
fn edgy_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        (
            magnitude(),
            prop::sample::select(vec!["ms", "s", "m", "h", "d", "", "x"])
        )
            .prop_map(|(n, u)| format!("{n}{u}")),
        (
            magnitude(),
            prop::sample::select(vec!["", "B", "KiB", "GiB", "PB", "pib", "kb"])
        )
            .prop_map(|(n, u)| format!("{n}{u}")),
        any::<f64>().prop_map(|f| format!("{f}GiB")),
        Just("off".to_string()),
        Just("9999-12-31T23:59:59Z".to_string()),
        Just("+262143-12-31T23:59:59Z".to_string()),
        any::<u128>().prop_map(|n| Uuid::from_u128(n).to_string()),
        Just("\u{0}".to_string()),
    ]
}

/// A duration as a spec gives one: whole seconds, or a number with a unit, of any
/// magnitude; or something else.
fn duration_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        2 => magnitude().prop_map(Value::from),
        2 => (magnitude(), prop::sample::select(vec!["ms", "s", "m", "h", "d"]))
            .prop_map(|(n, u)| Value::from(format!("{n}{u}"))),
        1 => edgy_number(),
        1 => edgy_string().prop_map(Value::from),
    ]
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        edgy_number(),
        edgy_string().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(field_name(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Field names of the specs and event data, and others.
fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "name", "type", "command", "shell", "env", "working_dir", "resources", "cpu",
            "memory", "gpu", "labels", "priority", "selector", "service", "replica", "probe",
            "executor", "after", "timeout", "retry", "log_quota", "idempotency_key",
            "on_events", "duration", "max_attempts", "backoff", "initial", "multiplier", "max",
            "jitter", "non_retryable_exit_codes", "http", "url", "expect_status", "interval",
            "failure_threshold", "ready_after", "argv", "task_id", "seq", "attempt",
            "worker_id", "pid", "exit_code", "signal", "duration_ms", "reason", "message",
            "next_attempt_at", "spec", "replicas", "template", "capacity", "last_known",
            "info", "incarnation", "hostname", "registered_at", "last_heartbeat_at",
        ])
        .prop_map(str::to_string),
        1 => any::<String>(),
    ]
}

/// `base` with the value at one path (existing or new) replaced by `value`.
fn replace_at(base: &Value, path: &[String], value: Value) -> Value {
    let mut out = base.clone();
    let mut at = &mut out;
    for (i, key) in path.iter().enumerate() {
        let last = i + 1 == path.len();
        match at {
            Value::Object(map) => {
                if last {
                    map.insert(key.clone(), value);
                    return out;
                }
                // Descend into an existing field, or stop here.
                let existing: Vec<String> = map.keys().cloned().collect();
                let next = existing
                    .iter()
                    .find(|k| *k == key)
                    .cloned()
                    .or_else(|| existing.first().cloned());
                match next {
                    Some(k) => at = map.get_mut(&k).expect("key exists"),
                    None => {
                        map.insert(key.clone(), value);
                        return out;
                    }
                }
            }
            _ => {
                *at = value;
                return out;
            }
        }
    }
    *at = value;
    out
}

/// `base`, or `base` with one part replaced by an arbitrary value, or anything.
fn mutated(base: Value) -> impl Strategy<Value = Value> {
    prop_oneof![
        1 => Just(base.clone()),
        6 => (prop::collection::vec(field_name(), 1..4), json_value())
            .prop_map(move |(path, v)| replace_at(&base, &path, v)),
        1 => json_value(),
    ]
}

/// A task spec that passes every check, with every kind of field.
fn valid_spec() -> Value {
    json!({
        "name": "n", "type": "batch", "shell": "true", "env": {"A": "b"},
        "working_dir": "/tmp", "resources": {"cpu": 0.5, "memory": "1GiB", "gpu": 0,
        "labels": {"zone": "a"}}, "priority": 10, "labels": {"team": "x"},
        "timeout": "1h", "log_quota": "10MiB", "idempotency_key": "k",
        "retry": {"on_events": ["error", "interruption"], "duration": "1h", "max_attempts": 3,
                  "backoff": {"initial": "1s", "multiplier": 2.0, "max": "5m", "jitter": 0.1},
                  "non_retryable_exit_codes": [2]},
        "probe": {"http": {"url": "http://127.0.0.1:1/", "expect_status": 200},
                  "interval": "1s", "timeout": "1s", "failure_threshold": 3, "ready_after": 1},
    })
}

/// One header of a record: a CloudEvents name (or another), with a value of any bytes,
/// a plausible value, or none.
fn header_value() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        1 => Just(None),
        2 => prop::collection::vec(any::<u8>(), 0..40).prop_map(Some),
        3 => edgy_string().prop_map(|s| Some(s.into_bytes())),
        2 => prop::sample::select(vec![
            "1.0", "application/json", "application/json; charset=utf-8", "text/plain",
            "dev.tasklog.task.submitted.v1", "dev.tasklog.task.failed.v1",
            "dev.tasklog.worker.heartbeat.v1", "dev.tasklog.service.created.v1",
            "2026-01-01T00:00:00Z", "stdout", "stderr", "system", "true", "0", "-1",
            "2147483648", "9223372036854775807", "18446744073709551616",
        ])
        .prop_map(|s| Some(s.as_bytes().to_vec())),
    ]
}

/// A record as read off a topic, owning its bytes.
#[derive(Debug, Clone)]
struct OwnedRecord {
    key: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
    payload: Option<Vec<u8>>,
}

impl OwnedRecord {
    fn of(e: &EncodedEvent) -> OwnedRecord {
        OwnedRecord {
            key: Some(e.key.as_bytes().to_vec()),
            headers: e
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), Some(v.as_bytes().to_vec())))
                .collect(),
            payload: Some(e.payload.clone()),
        }
    }

    fn raw(&self) -> RawRecord<'_> {
        RawRecord {
            key: self.key.as_deref(),
            headers: self
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_deref()))
                .collect(),
            payload: self.payload.as_deref(),
        }
    }
}

/// What may happen to a valid record on its way: nothing, a header replaced, added
/// or removed, the key or the value replaced.
#[derive(Debug, Clone)]
enum Change {
    Keep,
    SetHeader(usize, Option<Vec<u8>>),
    AddHeader(String, Option<Vec<u8>>),
    DropHeader(usize),
    Key(Option<Vec<u8>>),
    Value(Option<Vec<u8>>),
    Data(Vec<String>, Value),
}

fn change() -> impl Strategy<Value = Change> {
    let header_name = prop_oneof![
        prop::sample::select(vec![
            header::SPEC_VERSION,
            header::ID,
            header::SOURCE,
            header::TYPE,
            header::TIME,
            header::SUBJECT,
            header::CONTENT_TYPE,
        ])
        .prop_map(str::to_string),
        any::<String>(),
    ];
    prop_oneof![
        1 => Just(Change::Keep),
        3 => (0usize..8, header_value()).prop_map(|(i, v)| Change::SetHeader(i, v)),
        1 => (header_name, header_value()).prop_map(|(k, v)| Change::AddHeader(k, v)),
        1 => (0usize..8).prop_map(Change::DropHeader),
        1 => prop::option::of(prop::collection::vec(any::<u8>(), 0..40)).prop_map(Change::Key),
        1 => prop::option::of(prop::collection::vec(any::<u8>(), 0..200)).prop_map(Change::Value),
        6 => (prop::collection::vec(field_name(), 1..4), json_value())
            .prop_map(|(p, v)| Change::Data(p, v)),
    ]
}

fn apply_change(mut r: OwnedRecord, c: &Change) -> OwnedRecord {
    match c.clone() {
        Change::Keep => {}
        Change::SetHeader(i, v) => {
            let n = r.headers.len();
            if n > 0 {
                r.headers[i % n].1 = v;
            }
        }
        Change::AddHeader(k, v) => r.headers.push((k, v)),
        Change::DropHeader(i) => {
            let n = r.headers.len();
            if n > 0 {
                r.headers.remove(i % n);
            }
        }
        Change::Key(k) => r.key = k,
        Change::Value(v) => r.payload = v,
        Change::Data(path, v) => {
            let data: Value = r
                .payload
                .as_deref()
                .and_then(|p| serde_json::from_slice(p).ok())
                .unwrap_or(Value::Null);
            r.payload = Some(serde_json::to_vec(&replace_at(&data, &path, v)).expect("JSON"));
        }
    }
    r
}

/// A record of any bytes.
fn arbitrary_record() -> impl Strategy<Value = OwnedRecord> {
    (
        prop::option::of(prop::collection::vec(any::<u8>(), 0..40)),
        prop::collection::vec(
            (
                prop_oneof![
                    3 => prop::sample::select(vec![
                        header::SPEC_VERSION, header::ID, header::SOURCE, header::TYPE,
                        header::TIME, header::SUBJECT, header::CONTENT_TYPE,
                    ])
                    .prop_map(str::to_string),
                    1 => any::<String>(),
                ],
                header_value(),
            ),
            0..10,
        ),
        prop::option::of(prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            json_value().prop_map(|v| serde_json::to_vec(&v).expect("JSON")),
        ]),
    )
        .prop_map(|(key, headers, payload)| OwnedRecord {
            key,
            headers,
            payload,
        })
}

fn time() -> impl Strategy<Value = DateTime<Utc>> {
    // Microseconds from year 1 to year 9999: what RFC 3339 can carry.
    (-62_135_596_800_000_000i64..253_402_300_799_000_000)
        .prop_map(|us| DateTime::from_timestamp_micros(us).expect("in range"))
}

/// An optional message: any characters, within the schemas' lengths.
fn opt_string() -> impl Strategy<Value = Option<String>> {
    prop::option::of(prop::collection::vec(any::<char>(), 0..200).prop_map(String::from_iter))
}

/// An optional reason code.
fn opt_reason() -> impl Strategy<Value = Option<String>> {
    prop::option::of("[a-z_]{1,40}")
}

/// A task event payload tasklog itself could write (other than `submitted`).
fn payload() -> impl Strategy<Value = Payload> {
    let attempt = 1u32..=u32::MAX;
    let reason = "[a-z_]{1,20}";
    prop_oneof![
        (opt_reason(), opt_string())
            .prop_map(|(reason, message)| Payload::CancelRequested(ReasonData { reason, message })),
        (
            opt_reason(),
            opt_string(),
            prop::option::of(attempt.clone()),
            any::<Option<i32>>(),
            any::<Option<i32>>(),
            any::<Option<u64>>()
        )
            .prop_map(
                |(reason, message, attempt, exit_code, signal, duration_ms)| {
                    Payload::Cancelled(CancelledData {
                        reason,
                        message,
                        attempt,
                        exit_code,
                        signal,
                        duration_ms,
                    })
                }
            ),
        (opt_reason(), opt_string())
            .prop_map(|(reason, message)| Payload::Queued(ReasonData { reason, message })),
        ("[a-z0-9._:@-]{1,40}", attempt.clone())
            .prop_map(|(worker_id, attempt)| Payload::Assigned { worker_id, attempt }),
        (
            attempt.clone(),
            prop::option::of("[a-z0-9._:@-]{1,40}"),
            any::<Option<u32>>()
        )
            .prop_map(|(attempt, worker_id, pid)| Payload::Started {
                attempt,
                worker_id,
                pid
            }),
        (
            prop::option::of(attempt.clone()),
            any::<Option<i32>>(),
            any::<Option<u64>>()
        )
            .prop_map(|(attempt, exit_code, duration_ms)| Payload::Succeeded {
                attempt,
                exit_code,
                duration_ms
            }),
        (
            prop::option::of(attempt.clone()),
            any::<Option<i32>>(),
            any::<Option<i32>>(),
            any::<Option<u64>>(),
            reason,
            opt_string(),
            time()
        )
            .prop_map(
                |(attempt, exit_code, signal, duration_ms, reason, message, next_attempt_at)| {
                    Payload::RetryScheduled {
                        attempt,
                        exit_code,
                        signal,
                        duration_ms,
                        reason,
                        message,
                        next_attempt_at,
                    }
                }
            ),
        (
            prop::option::of(attempt.clone()),
            any::<Option<i32>>(),
            any::<Option<i32>>(),
            any::<Option<u64>>(),
            reason,
            opt_string()
        )
            .prop_map(
                |(attempt, exit_code, signal, duration_ms, reason, message)| {
                    Payload::Failed {
                        attempt,
                        exit_code,
                        signal,
                        duration_ms,
                        reason,
                        message,
                    }
                }
            ),
        attempt.prop_map(|attempt| Payload::Ready { attempt }),
    ]
}

fn submitted(spec: TaskSpec) -> Payload {
    Payload::Submitted {
        spec: std::sync::Arc::new(spec),
    }
}

/// The state of a task submitted with `spec` that has failed once on a worker.
fn failed_once(spec: TaskSpec) -> Option<tasklog::events::TaskState> {
    let id = Uuid::now_v7();
    let mut state = apply(None, &Event::new("t", id, 1, submitted(spec))).ok()?;
    for (seq, p) in [
        Payload::Assigned {
            worker_id: "w".into(),
            attempt: 1,
        },
        Payload::Started {
            attempt: 1,
            worker_id: Some("w".into()),
            pid: Some(1),
        },
    ]
    .into_iter()
    .enumerate()
    {
        state = apply(Some(&state), &Event::new("t", id, seq as u64 + 2, p)).ok()?;
    }
    Some(state)
}

/// Everything that reads a spec's numbers, the way the API, scheduler and worker do.
fn use_spec(spec: &TaskSpec) {
    let _ = spec.memory_bytes();
    let _ = spec.timeout_ms();
    let _ = spec.log_quota_bytes();
    let _ = spec.priority();
    let _ = spec.required_labels();
    let _ = tasklog::scheduler::need_of(spec);
    if let Some(probe) = &spec.probe {
        let _ = tasklog::events::probe::Probe::from_json(probe);
    }
    if let Ok(Some(policy)) = retry::RetryPolicy::from_spec(spec.retry.as_ref()) {
        for n in [1, 2, 30, 64, u32::MAX] {
            let _ = policy.delay_ms(n, &Uuid::nil());
        }
    }
    if let Some(state) = failed_once(spec.clone()) {
        let now = Utc::now();
        for reason in [
            "error",
            "timeout",
            "interruption",
            "no_capacity",
            "unhealthy",
        ] {
            for exit_code in [None, Some(0), Some(2), Some(i32::MIN)] {
                let _ = retry::decide(&state, reason, exit_code, now);
                let end = retry::failure_event(
                    &state,
                    Some(1),
                    reason,
                    exit_code,
                    None,
                    Some(u64::MAX),
                    None,
                    now,
                );
                // The end the API or the scheduler appends goes through the log and
                // the fold like any other event.
                let event = Event::new("t", state.id, state.seq + 1, end);
                let decoded = Event::decode(&event.encode().as_record());
                assert!(decoded.is_ok(), "{event:?} does not decode: {decoded:?}");
                let _ = apply(Some(&state), &event);
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Task events

proptest! {
    #![proptest_config(config())]

    /// Any record at all: a typed rejection or an event, never a panic.
    #[test]
    fn task_event_decoder_never_panics_on_any_record(r in arbitrary_record()) {
        let _ = Event::decode(&r.raw());
    }

    /// Valid task events with one thing changed on the way: the same. What decodes
    /// folds (onto nothing, or onto a submitted task) without a panic either.
    #[test]
    fn task_event_decoder_never_panics_on_altered_events(
        p in prop_oneof![payload(), Just(submitted(TaskSpec::from_json(valid_spec()).expect("valid")))],
        c in change(),
    ) {
        let id = Uuid::now_v7();
        let r = apply_change(OwnedRecord::of(&Event::new("s", id, 2, p).encode()), &c);
        if let Ok(event) = Event::decode(&r.raw()) {
            let _ = apply(None, &event);
            let base = Event::new("s", event.task_id, 1, submitted(TaskSpec {
                shell: Some("true".into()),
                ..TaskSpec::default()
            }));
            if let Ok(state) = apply(None, &base) {
                let _ = apply(Some(&state), &event);
            }
        }
    }

    /// What tasklog encodes decodes to the same event.
    #[test]
    fn task_events_round_trip(p in payload(), seq in 1u64..=i64::MAX as u64, source in "[ -~]{1,40}") {
        let id = Uuid::now_v7();
        let event = Event::new(&source, id, seq, p.clone());
        let decoded = Event::decode(&event.encode().as_record());
        prop_assert!(decoded.is_ok(), "{:?} did not decode: {:?}", event, decoded);
        let decoded = decoded.expect("checked");
        prop_assert_eq!(decoded.payload, p);
        prop_assert_eq!(decoded.task_id, id);
        prop_assert_eq!(decoded.seq, seq);
        prop_assert_eq!(decoded.envelope.source, source);
        prop_assert_eq!(
            decoded.envelope.time.timestamp_micros(),
            event.envelope.time.timestamp_micros()
        );
    }
}

// ---------------------------------------------------------------------------------
// Worker and service events

fn worker_info() -> impl Strategy<Value = WorkerInfo> {
    (
        (0.001f64..1e6, any::<u64>(), 0u32..=1024),
        prop::collection::btree_map("[a-z]{1,8}", "[a-z0-9]{0,8}", 0..3),
        prop::option::of("[a-z0-9.-]{1,64}"),
        any::<Option<u32>>(),
        (
            prop::option::of("[a-f0-9]{12}"),
            prop::collection::vec("[a-z][a-z0-9-]{0,8}|\\*", 0..3),
        ),
    )
        .prop_map(
            |((cpu, memory, gpu), labels, hostname, pid, (incarnation, projects))| WorkerInfo {
                capacity: WorkerCapacity { cpu, memory, gpu },
                labels,
                projects,
                hostname,
                pid,
                incarnation,
            },
        )
}

fn worker_payload() -> impl Strategy<Value = WorkerPayload> {
    let last_known = || {
        prop::option::of(worker_info().prop_map(|info| {
            Box::new(LastKnown {
                info,
                ..LastKnown::default()
            })
        }))
    };
    prop_oneof![
        worker_info().prop_map(WorkerPayload::Registered),
        worker_info().prop_map(WorkerPayload::Heartbeat),
        last_known().prop_map(|last_known| WorkerPayload::Draining { last_known }),
        ("[a-z_]{1,20}", opt_string(), last_known()).prop_map(|(reason, message, last_known)| {
            WorkerPayload::Lost {
                reason,
                message,
                last_known,
            }
        }),
    ]
}

fn service_payload() -> impl Strategy<Value = ServicePayload> {
    prop_oneof![
        (1u32..=1000).prop_map(|replicas| ServicePayload::Created(Box::new(ServiceSpec {
            replicas,
            template: json!({"shell": "true"}),
            retry: None,
            probe: None,
        }))),
        (0u32..=1000).prop_map(|replicas| ServicePayload::Scaled { replicas }),
        Just(ServicePayload::StopRequested),
        Just(ServicePayload::Stopped),
        ("[a-z_]{1,20}", opt_string())
            .prop_map(|(reason, message)| ServicePayload::Failed { reason, message }),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn worker_event_decoder_never_panics(r in arbitrary_record()) {
        let _ = WorkerEvent::decode(&r.raw());
    }

    #[test]
    fn worker_event_decoder_never_panics_on_altered_events(p in worker_payload(), c in change()) {
        let r = apply_change(OwnedRecord::of(&WorkerEvent::new("s", "w-1", p).encode()), &c);
        if let Ok(event) = WorkerEvent::decode(&r.raw()) {
            let _ = tasklog::events::worker::apply_worker(None, &event);
        }
    }

    #[test]
    fn worker_events_round_trip(p in worker_payload(), name in "[a-zA-Z0-9._:@-]{1,64}") {
        let event = WorkerEvent::new("s", &name, p.clone());
        let decoded = WorkerEvent::decode(&event.encode().as_record());
        prop_assert!(decoded.is_ok(), "{:?} did not decode: {:?}", event, decoded);
        let decoded = decoded.expect("checked");
        prop_assert_eq!(decoded.payload, p);
        prop_assert_eq!(decoded.worker_id, name);
    }

    #[test]
    fn service_event_decoder_never_panics(r in arbitrary_record()) {
        let _ = ServiceEvent::decode(&r.raw());
    }

    #[test]
    fn service_event_decoder_never_panics_on_altered_events(p in service_payload(), c in change()) {
        let r = apply_change(OwnedRecord::of(&ServiceEvent::new("s", "web", p).encode()), &c);
        let _ = ServiceEvent::decode(&r.raw());
    }

    #[test]
    fn service_events_round_trip(p in service_payload(), name in "[a-z][a-z0-9-]{0,40}") {
        let event = ServiceEvent::new("s", &name, p.clone());
        let decoded = ServiceEvent::decode(&event.encode().as_record());
        prop_assert!(decoded.is_ok(), "{:?} did not decode: {:?}", event, decoded);
        let decoded = decoded.expect("checked");
        prop_assert_eq!(decoded.payload, p);
        prop_assert_eq!(decoded.service, name);
    }
}

// ---------------------------------------------------------------------------------
// Task specs

proptest! {
    #![proptest_config(config())]

    /// Any JSON, and valid specs with one field replaced: a spec or an error; and
    /// every accepted spec's numbers can be used (sizes, durations, retry delays and
    /// decisions) without a panic.
    #[test]
    fn spec_parser_never_panics(v in prop_oneof![json_value(), mutated(valid_spec())]) {
        if let Ok(spec) = TaskSpec::from_json(v) {
            prop_assert!(spec.check().is_ok());
            use_spec(&spec);
            // What is accepted survives the trip through the log.
            let e = Event::new("s", Uuid::now_v7(), 1, submitted(spec.clone()));
            let decoded = Event::decode(&e.encode().as_record());
            prop_assert!(decoded.is_ok(), "{:?}", decoded);
        }
    }

    /// Retry policies with every field at an edge: accepted or refused, and what is
    /// accepted decides (when, whether) without a panic.
    #[test]
    fn retry_policies_never_panic(
        duration in duration_value(),
        initial in duration_value(),
        max in duration_value(),
        multiplier in prop_oneof![Just(1.0f64), Just(2.0), Just(1e300), 1.0f64..1e6],
        max_attempts in prop::option::of(any::<u32>()),
    ) {
        let mut retry = json!({"duration": duration,
                               "backoff": {"initial": initial, "max": max, "multiplier": multiplier}});
        if let Some(n) = max_attempts {
            retry["max_attempts"] = Value::from(n);
        }
        let mut spec = valid_spec();
        spec["retry"] = retry;
        if let Ok(spec) = TaskSpec::from_json(spec) {
            use_spec(&spec);
        }
    }

    /// Spec files: any text, and YAML with an arbitrary scalar in one place, read the
    /// way `tasklog submit -f` reads them (YAML, a superset of JSON).
    #[test]
    fn spec_files_never_panic(
        text in prop_oneof![
            any::<String>(),
            (prop::sample::select(vec!["timeout", "priority", "log_quota", "name"]), edgy_string())
                .prop_map(|(k, v)| format!("shell: 'true'\n{k}: {v}\n")),
            (prop::sample::select(vec!["memory", "cpu", "gpu"]), edgy_string())
                .prop_map(|(k, v)| format!("shell: x\nresources:\n  {k}: {v}\n")),
            (prop::sample::select(vec!["initial", "max", "multiplier", "jitter"]), edgy_string())
                .prop_map(|(k, v)| format!("shell: x\nretry:\n  backoff: {{{k}: {v}}}\n")),
            edgy_string().prop_map(|v| format!("shell: x\nretry: {{duration: {v}, max_attempts: {v}}}\n")),
        ]
    ) {
        if let Ok(value) = tasklog::cli::parse_spec_text(&text)
            && let Ok(spec) = TaskSpec::from_json(value)
        {
            use_spec(&spec);
        }
    }
}

// ---------------------------------------------------------------------------------
// Log cursors and log record headers

proptest! {
    #![proptest_config(config())]

    #[test]
    fn log_cursor_decoder_never_panics(
        text in prop_oneof![
            any::<String>(),
            prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| {
                use base64::Engine;
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
            }),
        ],
        task in any::<u128>(),
    ) {
        let key = CursorKey::new(vec![7; 32]);
        let _ = key.decode(&text, Uuid::from_u128(task));
    }

    /// Signed cursors decode to themselves for their task only; negative positions
    /// (never encoded by tasklog) are refused even when signed.
    #[test]
    fn log_cursors_round_trip(
        task in any::<u128>(),
        other in any::<u128>(),
        partition in any::<i32>(),
        offset in any::<i64>(),
        forward in any::<bool>(),
        key in prop::collection::vec(any::<u8>(), 16..64),
    ) {
        let key = CursorKey::new(key);
        let cursor = Cursor {
            task_id: Uuid::from_u128(task),
            partition,
            offset,
            direction: if forward { Direction::Forward } else { Direction::Backward },
        };
        let text = key.encode(&cursor);
        let decoded = key.decode(&text, cursor.task_id);
        if partition >= 0 && offset >= 0 {
            prop_assert_eq!(decoded, Ok(cursor));
        } else {
            prop_assert!(decoded.is_err());
        }
        if other != task {
            prop_assert!(key.decode(&text, Uuid::from_u128(other)).is_err());
        }
        // Another server key does not accept it.
        prop_assert!(CursorKey::new(vec![1; 32]).decode(&text, cursor.task_id).is_err());
    }

    #[test]
    fn log_record_meta_decoder_never_panics(r in arbitrary_log_record()) {
        let headers: Vec<(&str, Option<&[u8]>)> =
            r.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
        let _ = tasklog::logs::decode_meta(r.key.as_deref(), &headers);
    }

    /// The headers the log writer sets decode back to the same metadata.
    #[test]
    fn log_record_meta_round_trips(
        task in any::<u128>(),
        attempt in 1i32..=i32::MAX,
        line in 1i64..=i64::MAX,
        stream in prop::sample::select(vec!["stdout", "stderr", "system"]),
        at in time(),
        part in prop::option::of(0i32..=i32::MAX),
        continued in any::<bool>(),
    ) {
        use tasklog::logs::header as h;
        let id = Uuid::from_u128(task).to_string();
        let (attempt_s, line_s) = (attempt.to_string(), line.to_string());
        let time_s = at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let part_s = part.map(|p| p.to_string());
        let mut headers: Vec<(&str, Option<&[u8]>)> = vec![
            (h::TASK_ID, Some(id.as_bytes())),
            (h::ATTEMPT, Some(attempt_s.as_bytes())),
            (h::STREAM, Some(stream.as_bytes())),
            (h::LINE, Some(line_s.as_bytes())),
            (h::TIME, Some(time_s.as_bytes())),
        ];
        if let Some(p) = &part_s {
            headers.push((h::PART, Some(p.as_bytes())));
            if continued {
                headers.push((h::CONTINUED, Some(b"true")));
            }
        }
        let meta = tasklog::logs::decode_meta(Some(id.as_bytes()), &headers);
        prop_assert!(meta.is_ok(), "{:?}", meta);
        let meta = meta.expect("checked");
        prop_assert_eq!(meta.task_id, Uuid::from_u128(task));
        prop_assert_eq!(meta.attempt, attempt);
        prop_assert_eq!(meta.line, line);
        prop_assert_eq!(meta.stream.as_str(), stream);
        prop_assert_eq!(meta.time, Some(at));
        prop_assert_eq!(meta.part, part);
        prop_assert_eq!(meta.continued, part.is_some() && continued);
    }
}

/// A log record: a task id key (or anything), and headers of the log writer's names
/// (or others) with plausible or arbitrary values.
fn arbitrary_log_record() -> impl Strategy<Value = OwnedRecord> {
    use tasklog::logs::header as h;
    let id = any::<u128>().prop_map(|n| Uuid::from_u128(n).to_string().into_bytes());
    (
        prop::option::of(prop_oneof![
            id.clone(),
            prop::collection::vec(any::<u8>(), 0..40)
        ]),
        prop::collection::vec(
            (
                prop_oneof![
                    4 => prop::sample::select(vec![
                        h::TASK_ID, h::ATTEMPT, h::STREAM, h::LINE, h::TIME, h::TRACEPARENT,
                        h::PART, h::CONTINUED,
                    ])
                    .prop_map(str::to_string),
                    1 => any::<String>(),
                ],
                prop_oneof![header_value(), id.prop_map(Some)],
            ),
            0..10,
        ),
    )
        .prop_map(|(key, headers)| OwnedRecord {
            key,
            headers,
            payload: None,
        })
}
