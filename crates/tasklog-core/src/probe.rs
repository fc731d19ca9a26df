//! Health probes of service replicas, as a task spec gives them: parsed and checked
//! here (pure, so the API, the fold and the worker agree); run by the worker
//! (`worker::probe`).
//!
//! ```json
//! {"http": {"url": "http://127.0.0.1:${PORT}/health", "expect_status": 200},
//!  "interval": "1s", "timeout": "2s", "failure_threshold": 3, "ready_after": 1}
//! {"command": {"argv": ["pg_isready"]}}
//! ```
//!
//! The first check runs `initial_delay` (default 0) after the replica starts. From then
//! on failures count toward `failure_threshold`, also while the replica is still
//! starting (before it was ever ready), so a replica that never comes up becomes
//! unhealthy; a service that needs a while to start sets `initial_delay` (like
//! Kubernetes' `initialDelaySeconds`) or a `failure_threshold × interval` that covers
//! its start-up time.

use std::time::Duration;

use serde_json::{Map, Value};

use super::spec::{SpecError, parse_duration_ms};

/// Interval between checks when the spec gives none.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);

/// Time one check may take when the spec gives none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// Consecutive failed checks that make a replica unhealthy when the spec gives none.
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;

/// Consecutive successful checks that make a replica ready when the spec gives none.
pub const DEFAULT_READY_AFTER: u32 = 1;

/// Status an HTTP check expects when the spec gives none.
pub const DEFAULT_EXPECT_STATUS: u16 = 200;

/// Longest `interval` or `timeout` a probe may have.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// A probe as given in a task spec's `probe` field (JSON), e.g.
/// `{"http": {"url": "http://127.0.0.1:${PORT}/health", "expect_status": 200}, "interval": "1s",
/// "timeout": "2s", "failure_threshold": 3, "ready_after": 1}`
/// or `{"command": {"argv": ["pg_isready"]}, ...}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    /// What one check does.
    pub check: Check,
    /// Time from the start of one check to the start of the next (default 2s, positive).
    pub interval: Duration,
    /// Time one check may take before it counts as failed (default 1s, positive).
    pub timeout: Duration,
    /// Consecutive failed checks that make the replica unhealthy (default 3, at least 1).
    pub failure_threshold: u32,
    /// Consecutive successful checks that make the replica ready (default 1, at least 1).
    pub ready_after: u32,
    /// Time from the replica's start to its first check (default 0, at most 24h).
    pub initial_delay: Duration,
}

/// What one check of a [`Probe`] does.
#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    /// `GET url`; succeeds iff the response status is `expect_status`. `${VAR}` in the url
    /// is expanded from the replica's environment (see `worker::probe::expand`).
    Http {
        /// The url template, e.g. `http://127.0.0.1:${PORT}/health`.
        url: String,
        /// The status that counts as healthy (default 200).
        expect_status: u16,
    },
    /// Runs `argv` (not through a shell) with the replica's environment added; succeeds
    /// iff it exits 0.
    Command {
        /// Program and arguments; never empty.
        argv: Vec<String>,
    },
}

impl Probe {
    /// A command probe with every default.
    pub fn command(argv: &[&str]) -> Probe {
        Probe {
            check: Check::Command {
                argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            },
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            ready_after: DEFAULT_READY_AFTER,
            initial_delay: Duration::ZERO,
        }
    }

    /// Parses the spec's JSON value; errors name the field (`probe.interval: ...`).
    ///
    /// Exactly one of `http` and `command` must be given. Unknown fields are refused, at the
    /// top level and inside `http`/`command`. Durations are integer seconds or strings of
    /// `<n><unit>` parts with units `ms`, `s`, `m`, `h` (e.g. `"500ms"`, `"1m30s"`); they
    /// must be at most [`MAX_DURATION`], and positive but for `initial_delay`.
    pub fn from_json(v: &Value) -> Result<Probe, SpecError> {
        let obj = as_object(v, "probe")?;
        reject_unknown(
            obj,
            "probe",
            &[
                "http",
                "command",
                "interval",
                "timeout",
                "failure_threshold",
                "ready_after",
                "initial_delay",
            ],
        )?;
        let check = match (obj.get("http"), obj.get("command")) {
            (Some(http), None) => parse_http(http)?,
            (None, Some(command)) => parse_command(command)?,
            (Some(_), Some(_)) => {
                return Err(SpecError::new(
                    "probe",
                    "give exactly one of `http` and `command`, not both",
                ));
            }
            (None, None) => {
                return Err(SpecError::new(
                    "probe",
                    "give exactly one of `http` and `command`",
                ));
            }
        };
        Ok(Probe {
            check,
            interval: opt_duration(obj, "interval", DEFAULT_INTERVAL, Positive::Required)?,
            timeout: opt_duration(obj, "timeout", DEFAULT_TIMEOUT, Positive::Required)?,
            failure_threshold: opt_count(obj, "failure_threshold", DEFAULT_FAILURE_THRESHOLD)?,
            ready_after: opt_count(obj, "ready_after", DEFAULT_READY_AFTER)?,
            initial_delay: opt_duration(
                obj,
                "initial_delay",
                Duration::ZERO,
                Positive::NotRequired,
            )?,
        })
    }
}

fn as_object<'a>(v: &'a Value, field: &str) -> Result<&'a Map<String, Value>, SpecError> {
    v.as_object()
        .ok_or_else(|| SpecError::new(field, "expected an object"))
}

fn reject_unknown(obj: &Map<String, Value>, field: &str, known: &[&str]) -> Result<(), SpecError> {
    match obj.keys().find(|k| !known.contains(&k.as_str())) {
        Some(unknown) => Err(SpecError::new(
            &format!("{field}.{unknown}"),
            format!("unknown field (expected one of: {})", known.join(", ")),
        )),
        None => Ok(()),
    }
}

fn parse_http(v: &Value) -> Result<Check, SpecError> {
    let obj = as_object(v, "probe.http")?;
    reject_unknown(obj, "probe.http", &["url", "expect_status"])?;
    let url = match obj.get("url") {
        None => return Err(SpecError::new("probe.http.url", "missing")),
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::String(_)) => return Err(SpecError::new("probe.http.url", "empty")),
        Some(_) => return Err(SpecError::new("probe.http.url", "expected a string")),
    };
    let expect_status = match obj.get("expect_status") {
        None => DEFAULT_EXPECT_STATUS,
        Some(v) => v
            .as_u64()
            .filter(|n| (100..=599).contains(n))
            .and_then(|n| u16::try_from(n).ok())
            .ok_or_else(|| {
                SpecError::new(
                    "probe.http.expect_status",
                    "expected an HTTP status between 100 and 599",
                )
            })?,
    };
    Ok(Check::Http { url, expect_status })
}

fn parse_command(v: &Value) -> Result<Check, SpecError> {
    let obj = as_object(v, "probe.command")?;
    reject_unknown(obj, "probe.command", &["argv"])?;
    let items = match obj.get("argv") {
        None => return Err(SpecError::new("probe.command.argv", "missing")),
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(SpecError::new(
                "probe.command.argv",
                "expected an array of strings",
            ));
        }
    };
    let argv = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            item.as_str().map(str::to_owned).ok_or_else(|| {
                SpecError::new(&format!("probe.command.argv[{i}]"), "expected a string")
            })
        })
        .collect::<Result<Vec<String>, SpecError>>()?;
    match argv.first() {
        None => Err(SpecError::new("probe.command.argv", "empty")),
        Some(program) if program.is_empty() => Err(SpecError::new(
            "probe.command.argv[0]",
            "empty program name",
        )),
        Some(_) => Ok(Check::Command { argv }),
    }
}

/// Whether a probe duration may be zero.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Positive {
    Required,
    NotRequired,
}

fn opt_duration(
    obj: &Map<String, Value>,
    key: &str,
    default: Duration,
    positive: Positive,
) -> Result<Duration, SpecError> {
    let field = format!("probe.{key}");
    let duration = match obj.get(key) {
        None => return Ok(default),
        Some(Value::String(s)) => {
            parse_duration_ms(s)
                .map(Duration::from_millis)
                .ok_or_else(|| {
                    SpecError::new(
                        &field,
                        format!("{s:?} is not a duration such as 500ms, 2s, 1m30s"),
                    )
                })?
        }
        Some(Value::Number(n)) => n.as_u64().map(Duration::from_secs).ok_or_else(|| {
            SpecError::new(&field, "expected whole seconds or a string like \"500ms\"")
        })?,
        Some(_) => {
            return Err(SpecError::new(
                &field,
                "expected whole seconds or a string like \"500ms\"",
            ));
        }
    };
    if duration.is_zero() && positive == Positive::Required {
        return Err(SpecError::new(&field, "must be positive"));
    }
    if duration > MAX_DURATION {
        return Err(SpecError::new(&field, "must be at most 24h"));
    }
    Ok(duration)
}

fn opt_count(obj: &Map<String, Value>, key: &str, default: u32) -> Result<u32, SpecError> {
    match obj.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_u64()
            .filter(|&n| n >= 1)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                SpecError::new(
                    &format!("probe.{key}"),
                    "expected a whole number of at least 1",
                )
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err_field(v: Value) -> String {
        Probe::from_json(&v).expect_err("should be refused").field
    }

    #[test]
    fn from_json_defaults() {
        let probe = Probe::from_json(&json!({"command": {"argv": ["pg_isready"]}})).unwrap();
        assert_eq!(probe, Probe::command(&["pg_isready"]));
        let probe = Probe::from_json(&json!({"http": {"url": "http://x/health"}})).unwrap();
        assert_eq!(
            probe.check,
            Check::Http {
                url: "http://x/health".to_owned(),
                expect_status: 200
            }
        );
        assert_eq!(probe.interval, Duration::from_secs(2));
        assert_eq!(probe.timeout, Duration::from_secs(1));
        assert_eq!(probe.failure_threshold, 3);
        assert_eq!(probe.ready_after, 1);
        assert_eq!(probe.initial_delay, Duration::ZERO);
    }

    #[test]
    fn from_json_http_full() {
        let probe = Probe::from_json(&json!({
            "http": {"url": "http://127.0.0.1:${PORT}/health", "expect_status": 204},
            "interval": "1s", "timeout": "2s", "failure_threshold": 5, "ready_after": 2,
            "initial_delay": "30s"
        }))
        .unwrap();
        assert_eq!(
            probe,
            Probe {
                check: Check::Http {
                    url: "http://127.0.0.1:${PORT}/health".to_owned(),
                    expect_status: 204
                },
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(2),
                failure_threshold: 5,
                ready_after: 2,
                initial_delay: Duration::from_secs(30),
            }
        );
    }

    #[test]
    fn from_json_command_and_duration_forms() {
        let probe = Probe::from_json(&json!({
            "command": {"argv": ["sh", "-c", "true"]},
            "interval": 5, "timeout": "1m30s"
        }))
        .unwrap();
        assert_eq!(
            probe.check,
            Check::Command {
                argv: vec!["sh".into(), "-c".into(), "true".into()]
            }
        );
        assert_eq!(probe.interval, Duration::from_secs(5));
        assert_eq!(probe.timeout, Duration::from_secs(90));
    }

    #[test]
    fn from_json_errors() {
        let cmd = json!({"argv": ["true"]});
        let http = json!({"url": "http://x/"});
        assert_eq!(err_field(json!({})), "probe");
        assert_eq!(err_field(json!({"interval": "1s"})), "probe");
        assert_eq!(err_field(json!({"http": http, "command": cmd})), "probe");
        assert_eq!(err_field(json!("probe")), "probe");
        assert_eq!(
            err_field(json!({"command": cmd, "interval": "fast"})),
            "probe.interval"
        );
        assert_eq!(
            err_field(json!({"command": cmd, "interval": "0s"})),
            "probe.interval"
        );
        assert_eq!(
            err_field(json!({"command": cmd, "initial_delay": "25h"})),
            "probe.initial_delay"
        );
        assert_eq!(
            Probe::from_json(&json!({"command": cmd, "initial_delay": 0}))
                .unwrap()
                .initial_delay,
            Duration::ZERO
        );
        assert_eq!(
            err_field(json!({"command": cmd, "timeout": 1.5})),
            "probe.timeout"
        );
        assert_eq!(
            err_field(json!({"command": cmd, "timeout": "25h"})),
            "probe.timeout"
        );
        assert_eq!(
            err_field(json!({"command": cmd, "failure_threshold": 0})),
            "probe.failure_threshold"
        );
        assert_eq!(
            err_field(json!({"command": cmd, "ready_after": -1})),
            "probe.ready_after"
        );
        assert_eq!(
            err_field(json!({"command": cmd, "failure_threshold": 5_000_000_000u64})),
            "probe.failure_threshold"
        );
        assert_eq!(
            err_field(json!({"command": cmd, "period": "1s"})),
            "probe.period"
        );
        assert_eq!(
            err_field(json!({"http": {"url": "http://x/", "method": "HEAD"}})),
            "probe.http.method"
        );
        assert_eq!(
            err_field(json!({"http": {"url": "http://x/", "expect_status": 99}})),
            "probe.http.expect_status"
        );
        assert_eq!(err_field(json!({"http": {}})), "probe.http.url");
        assert_eq!(
            err_field(json!({"command": {"argv": []}})),
            "probe.command.argv"
        );
        assert_eq!(
            err_field(json!({"command": {"argv": ["a", 1]}})),
            "probe.command.argv[1]"
        );
        assert_eq!(
            err_field(json!({"command": {"argv": ["true"], "shell": true}})),
            "probe.command.shell"
        );
        let msg = Probe::from_json(&json!({"command": cmd, "interval": "2x"}))
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("probe.interval: "), "{msg}");
    }
}
