//! Retry policies: parsing the spec's `retry`, and the pure decision of whether a
//! failure is retried and when.
//!
//! ```yaml
//! retry: false        # the default: a failure is final
//! retry: true         # every kind of failure, for up to 1 hour
//! retry:
//!   on_events: [error, interruption, no_capacity, timeout]   # default: all
//!   duration: 1h      # how long retrying may go on; "off" = no limit
//!   max_attempts: 5   # optional cap on attempts that ran (all of them, the first too)
//!   backoff: {initial: 1s, multiplier: 2.0, max: 5m, jitter: 0.1}
//!   non_retryable_exit_codes: [2, 64]
//! ```
//!
//! The **window** (`duration`) starts at the task's first failure; for `no_capacity` it
//! starts at submission. A failure at or after the window's end is final, with reason
//! `retry_limit_exceeded`; so is one that would start attempt `max_attempts + 1`. The
//! delay before retry *n* (from 1) is `min(max, initial × multiplier^(n−1))`, shortened
//! by up to `jitter` × itself; the jitter is derived from the task id and *n* (spread,
//! not randomness: a writer that decides twice gets the same time).
//!
//! Every writer that ends an attempt (the API for worker reports, the scheduler for
//! lost workers and no capacity) asks [`decide`], and the fold accepts a
//! `retry_scheduled` event only when [`decide`], at the event's time, allows a retry at
//! all; it does not check `next_attempt_at`, which is the writer's. A writer's clock
//! and the event's time differ slightly, so at the very end of a window the fold may
//! refuse a retry the writer chose (`retry_not_allowed`): the API then decides again
//! on the task as it is, and the scheduler does on its next pass.

use std::hash::{Hash, Hasher};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;

use super::spec::{SpecError, parse_duration_ms};
use super::state::TaskState;

/// The kinds of failure a policy can retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    /// The process exited non-zero (or could not start).
    Error,
    /// Its worker was lost.
    Interruption,
    /// No live worker could fit it.
    NoCapacity,
    /// It ran past its `timeout`.
    Timeout,
}

impl RetryOn {
    /// Every kind.
    pub const ALL: [RetryOn; 4] = [
        RetryOn::Error,
        RetryOn::Interruption,
        RetryOn::NoCapacity,
        RetryOn::Timeout,
    ];

    /// The kind of a failure reason (`error`, `spawn_error` and `unhealthy` are errors),
    /// or `None` for reasons no policy retries.
    pub fn of_reason(reason: &str) -> Option<RetryOn> {
        match reason {
            "error" | "spawn_error" | "unhealthy" => Some(RetryOn::Error),
            "interruption" => Some(RetryOn::Interruption),
            "no_capacity" => Some(RetryOn::NoCapacity),
            "timeout" => Some(RetryOn::Timeout),
            _ => None,
        }
    }
}

/// Delays between attempts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// First delay, in milliseconds.
    pub initial_ms: u64,
    /// Factor between consecutive delays.
    pub multiplier: f64,
    /// Longest delay, in milliseconds.
    pub max_ms: u64,
    /// 0..=1: each delay is shortened by up to this fraction of itself.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            initial_ms: 1_000,
            multiplier: 2.0,
            max_ms: 300_000,
            jitter: 0.0,
        }
    }
}

/// A parsed retry policy.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Which failures are retried.
    pub on: Vec<RetryOn>,
    /// How long retrying may go on, in milliseconds; `None` is "off" (no limit).
    pub duration_ms: Option<u64>,
    /// Cap on attempts that ran.
    pub max_attempts: Option<u32>,
    /// Delays.
    pub backoff: Backoff,
    /// Exit codes that end the task at once.
    pub non_retryable_exit_codes: Vec<i32>,
}

/// Default window: one hour.
pub const DEFAULT_DURATION_MS: u64 = 3_600_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFields {
    #[serde(default)]
    on_events: Option<Vec<RetryOn>>,
    #[serde(default)]
    duration: Option<Value>,
    #[serde(default)]
    max_attempts: Option<u32>,
    #[serde(default)]
    backoff: Option<BackoffFields>,
    #[serde(default)]
    non_retryable_exit_codes: Vec<i32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackoffFields {
    #[serde(default)]
    initial: Option<Value>,
    #[serde(default)]
    multiplier: Option<f64>,
    #[serde(default)]
    max: Option<Value>,
    #[serde(default)]
    jitter: Option<f64>,
}

/// Longest retry `duration`, backoff `initial` or `max`: 100 years (`duration: off`
/// is the way to say "no limit"). Anything longer would put the next attempt past
/// the dates the log and Postgres can hold.
pub const MAX_DURATION_MS: u64 = 100 * 365 * 86_400_000;

/// A duration given as seconds (integer) or a string (`90s`, `1h30m`), at most
/// [`MAX_DURATION_MS`].
fn parse_ms(field: &str, v: &Value) -> Result<u64, SpecError> {
    let ms = parse_any_ms(field, v)?;
    if ms > MAX_DURATION_MS {
        return Err(SpecError::new(
            field,
            format!("{v} is longer than 100 years"),
        ));
    }
    Ok(ms)
}

fn parse_any_ms(field: &str, v: &Value) -> Result<u64, SpecError> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .map(|s| s.saturating_mul(1000))
            .ok_or_else(|| SpecError::new(field, format!("{n} is not a whole number of seconds"))),
        Value::String(s) => parse_duration_ms(s).ok_or_else(|| {
            SpecError::new(
                field,
                format!("{s:?} is not a duration such as 30s, 5m, 1h"),
            )
        }),
        other => Err(SpecError::new(field, format!("{other} is not a duration"))),
    }
}

impl RetryPolicy {
    /// The policy of a spec's `retry` value; `None` when failures are final.
    pub fn from_spec(retry: Option<&Value>) -> Result<Option<RetryPolicy>, SpecError> {
        let fields = match retry {
            None | Some(Value::Null) | Some(Value::Bool(false)) => return Ok(None),
            Some(Value::Bool(true)) => PolicyFields {
                on_events: None,
                duration: None,
                max_attempts: None,
                backoff: None,
                non_retryable_exit_codes: Vec::new(),
            },
            Some(v @ Value::Object(_)) => {
                PolicyFields::deserialize(v).map_err(|e| SpecError::new("retry", e.to_string()))?
            }
            Some(other) => {
                return Err(SpecError::new(
                    "retry",
                    format!("{other} is not true, false or an object"),
                ));
            }
        };
        let duration_ms = match &fields.duration {
            None => Some(DEFAULT_DURATION_MS),
            Some(Value::String(s)) if s.trim().eq_ignore_ascii_case("off") => None,
            Some(v) => Some(parse_ms("retry.duration", v)?),
        };
        if fields.max_attempts == Some(0) {
            return Err(SpecError::new("retry.max_attempts", "must be at least 1"));
        }
        let mut backoff = Backoff::default();
        if let Some(b) = fields.backoff {
            if let Some(v) = &b.initial {
                backoff.initial_ms = parse_ms("retry.backoff.initial", v)?;
            }
            if let Some(v) = &b.max {
                backoff.max_ms = parse_ms("retry.backoff.max", v)?;
            }
            if let Some(m) = b.multiplier {
                if !(m.is_finite() && m >= 1.0) {
                    return Err(SpecError::new(
                        "retry.backoff.multiplier",
                        format!("{m} is not a number ≥ 1"),
                    ));
                }
                backoff.multiplier = m;
            }
            if let Some(j) = b.jitter {
                if !(0.0..=1.0).contains(&j) {
                    return Err(SpecError::new(
                        "retry.backoff.jitter",
                        format!("{j} is not within 0..=1"),
                    ));
                }
                backoff.jitter = j;
            }
        }
        let mut on = fields.on_events.unwrap_or_else(|| RetryOn::ALL.to_vec());
        on.dedup();
        Ok(Some(RetryPolicy {
            on,
            duration_ms,
            max_attempts: fields.max_attempts,
            backoff,
            non_retryable_exit_codes: fields.non_retryable_exit_codes,
        }))
    }

    /// The delay before retry number `n` (from 1) of task `seed`, jitter included.
    pub fn delay_ms(&self, n: u32, seed: &uuid::Uuid) -> u64 {
        let b = &self.backoff;
        let exponent = n.saturating_sub(1).min(64) as i32;
        let raw = (b.initial_ms as f64) * b.multiplier.powi(exponent);
        let capped = raw.min(b.max_ms as f64).max(0.0);
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (seed, n).hash(&mut hasher);
        let unit = (hasher.finish() % 10_000) as f64 / 10_000.0;
        (capped * (1.0 - b.jitter * unit)).round() as u64
    }
}

/// What becomes of a failure.
#[derive(Debug, Clone, PartialEq)]
pub enum RetryDecision {
    /// Retry: the task waits (pending) until `at`.
    Retry {
        /// When the next attempt may be queued.
        at: DateTime<Utc>,
    },
    /// Final: the task fails with this reason.
    Fail {
        /// The reason to record: the failure's own, or `retry_limit_exceeded`.
        reason: String,
        /// Why no retry, for people.
        message: Option<String>,
    },
}

/// Decides whether a failure of `task` with `reason` (and `exit_code`) at `now` is
/// retried. Pure.
pub fn decide(
    task: &TaskState,
    reason: &str,
    exit_code: Option<i32>,
    now: DateTime<Utc>,
) -> RetryDecision {
    let fail = |reason: &str, message: Option<String>| RetryDecision::Fail {
        reason: reason.to_string(),
        message,
    };
    let Ok(Some(policy)) = RetryPolicy::from_spec(task.spec.retry.as_ref()) else {
        return fail(reason, None);
    };
    if task.cancel_requested {
        return fail(reason, Some("a cancel was requested".into()));
    }
    let Some(kind) = RetryOn::of_reason(reason).filter(|k| policy.on.contains(k)) else {
        return fail(reason, None);
    };
    if let Some(code) = exit_code.filter(|c| policy.non_retryable_exit_codes.contains(c)) {
        return fail(reason, Some(format!("exit code {code} is not retryable")));
    }
    if let Some(max) = policy.max_attempts
        && kind != RetryOn::NoCapacity
        && task.attempt >= max
    {
        return fail(
            "retry_limit_exceeded",
            Some(format!(
                "{} of max_attempts {max} used; last failure: {reason}",
                task.attempt
            )),
        );
    }
    let window_start = if kind == RetryOn::NoCapacity {
        task.submitted_at
    } else {
        task.first_failure_at.unwrap_or(now)
    };
    if let Some(d) = policy.duration_ms
        && (now - window_start).num_milliseconds() >= i64::try_from(d).unwrap_or(i64::MAX)
    {
        return fail(
            "retry_limit_exceeded",
            Some(format!(
                "the retry duration of {} ms has passed; last failure: {reason}",
                d
            )),
        );
    }
    // At most MAX_DURATION_MS (the policy's bound); saturating all the same, as a
    // panic here would stop the API, the scheduler or the projection.
    let delay = policy
        .delay_ms(task.retries + 1, &task.id)
        .min(MAX_DURATION_MS);
    let at = chrono::TimeDelta::try_milliseconds(i64::try_from(delay).unwrap_or(i64::MAX))
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    RetryDecision::Retry { at }
}

/// The event that ends a failed attempt (or records that nothing could fit the task):
/// `retry_scheduled` when the policy retries it, otherwise `failed`.
#[allow(clippy::too_many_arguments)]
pub fn failure_event(
    task: &TaskState,
    attempt: Option<u32>,
    reason: &str,
    exit_code: Option<i32>,
    signal: Option<i32>,
    duration_ms: Option<u64>,
    message: Option<String>,
    now: DateTime<Utc>,
) -> super::Payload {
    match decide(task, reason, exit_code, now) {
        RetryDecision::Retry { at } => super::Payload::RetryScheduled {
            attempt,
            exit_code,
            signal,
            duration_ms,
            reason: reason.to_string(),
            message,
            next_attempt_at: at,
        },
        RetryDecision::Fail {
            reason: final_reason,
            message: why,
        } => super::Payload::Failed {
            attempt,
            exit_code,
            signal,
            duration_ms,
            reason: final_reason,
            message: match (message, why) {
                (Some(m), Some(w)) => Some(format!("{m}; {w}")),
                (m, w) => m.or(w),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Event, Payload, TaskSpec};
    use serde_json::json;

    fn task(retry: Value) -> TaskState {
        let spec = TaskSpec {
            shell: Some("false".into()),
            retry: Some(retry),
            ..Default::default()
        };
        let e = Event::new(
            "t",
            uuid::Uuid::now_v7(),
            1,
            Payload::Submitted {
                spec: std::sync::Arc::new(spec),
            },
        );
        crate::apply(None, &e).unwrap()
    }

    #[test]
    fn durations_past_a_century_are_refused_and_the_longest_still_decides() {
        let e = RetryPolicy::from_spec(Some(
            &json!({"backoff": {"initial": "100000000000d", "max": "100000000000d"}}),
        ))
        .unwrap_err();
        assert_eq!(e.field, "retry.backoff.initial");
        let longest = format!("{}ms", MAX_DURATION_MS);
        let t = task(json!({"backoff": {"initial": longest, "max": longest}}));
        let now = Utc::now();
        assert!(matches!(
            decide(&t, "error", None, now),
            RetryDecision::Retry { at } if at > now
        ));
    }

    #[test]
    fn policies_parse_with_defaults_and_off() {
        assert_eq!(RetryPolicy::from_spec(None).unwrap(), None);
        assert_eq!(RetryPolicy::from_spec(Some(&json!(false))).unwrap(), None);
        let p = RetryPolicy::from_spec(Some(&json!(true))).unwrap().unwrap();
        assert_eq!(p.on, RetryOn::ALL.to_vec());
        assert_eq!(p.duration_ms, Some(DEFAULT_DURATION_MS));
        assert_eq!(p.backoff, Backoff::default());
        let p = RetryPolicy::from_spec(Some(&json!({"duration": "off", "on_events": ["error"],
            "backoff": {"initial": "250ms", "multiplier": 3, "max": 10, "jitter": 0.5}})))
        .unwrap()
        .unwrap();
        assert_eq!(p.duration_ms, None);
        assert_eq!(p.on, vec![RetryOn::Error]);
        assert_eq!((p.backoff.initial_ms, p.backoff.max_ms), (250, 10_000));
        for bad in [
            json!({"duration": "forever"}),
            json!({"on_events": ["meteor"]}),
            json!({"max_attempts": 0}),
            json!({"backoff": {"jitter": 2}}),
            json!({"backoff": {"multiplier": 0.5}}),
            json!({"colour": 1}),
            json!(3),
        ] {
            assert!(RetryPolicy::from_spec(Some(&bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn delays_grow_cap_and_jitter_stays_in_bounds() {
        let p = RetryPolicy::from_spec(Some(
            &json!({"backoff": {"initial": 1, "multiplier": 2, "max": 5}}),
        ))
        .unwrap()
        .unwrap();
        let id = uuid::Uuid::now_v7();
        let delays: Vec<u64> = (1..=5).map(|n| p.delay_ms(n, &id)).collect();
        assert_eq!(delays, [1000, 2000, 4000, 5000, 5000]);
        let j = RetryPolicy::from_spec(Some(&json!({"backoff": {"initial": 10, "jitter": 0.3}})))
            .unwrap()
            .unwrap();
        for n in 1..50 {
            let d = j.delay_ms(n, &id);
            let full = (10_000f64 * 2f64.powi(n as i32 - 1)).min(300_000.0);
            assert!(d as f64 <= full && d as f64 >= full * 0.7, "{n}: {d}");
            assert_eq!(d, j.delay_ms(n, &id), "deterministic");
        }
    }

    #[test]
    fn decisions_follow_the_policy() {
        let now = Utc::now();
        // No policy: final, with the failure's own reason.
        let t = task(json!(false));
        assert!(
            matches!(decide(&t, "error", Some(1), now), RetryDecision::Fail { reason, .. } if reason == "error")
        );
        // Not among on_events.
        let t = task(json!({"on_events": ["interruption"]}));
        assert!(
            matches!(decide(&t, "timeout", None, now), RetryDecision::Fail { reason, .. } if reason == "timeout")
        );
        assert!(matches!(
            decide(&t, "interruption", None, now),
            RetryDecision::Retry { .. }
        ));
        // Non-retryable exit code.
        let t = task(json!({"non_retryable_exit_codes": [42]}));
        assert!(
            matches!(decide(&t, "error", Some(42), now), RetryDecision::Fail { reason, .. } if reason == "error")
        );
        assert!(
            matches!(decide(&t, "error", Some(1), now), RetryDecision::Retry { at } if at == now + chrono::Duration::seconds(1))
        );
        // max_attempts counts attempts that ran.
        let mut t = task(json!({"max_attempts": 3}));
        t.attempt = 3;
        assert!(
            matches!(decide(&t, "error", Some(1), now), RetryDecision::Fail { reason, .. } if reason == "retry_limit_exceeded")
        );
        t.attempt = 2;
        assert!(matches!(
            decide(&t, "error", Some(1), now),
            RetryDecision::Retry { .. }
        ));
        // The window starts at the first failure; "off" never closes.
        let mut t = task(json!({"duration": "3s"}));
        t.first_failure_at = Some(now - chrono::Duration::seconds(3));
        assert!(
            matches!(decide(&t, "error", Some(1), now), RetryDecision::Fail { reason, .. } if reason == "retry_limit_exceeded")
        );
        let mut t = task(json!({"duration": "off"}));
        t.first_failure_at = Some(now - chrono::Duration::days(365));
        t.attempt = 10_000;
        assert!(matches!(
            decide(&t, "error", Some(1), now),
            RetryDecision::Retry { .. }
        ));
        // no_capacity: the window starts at submission.
        let mut t = task(json!({"duration": "10s"}));
        t.submitted_at = now - chrono::Duration::seconds(11);
        assert!(matches!(
            decide(&t, "no_capacity", None, now),
            RetryDecision::Fail { .. }
        ));
    }
}
