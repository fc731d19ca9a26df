//! The task spec: what to run and with what resources.
//!
//! Specs travel on the log exactly as submitted (a JSON object validated against
//! `schemas/task-spec.v1.json`); [`TaskSpec`] is the typed view of one, with
//! helpers that normalise the human-friendly forms (`"2GiB"`, `"1h30m"`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Lowest allowed priority.
pub const MIN_PRIORITY: i64 = 0;
/// Highest allowed priority.
pub const MAX_PRIORITY: i64 = 100;
/// Priority of a task whose spec does not name one.
pub const DEFAULT_PRIORITY: i64 = 50;
/// Type of a task whose spec does not name one.
pub const DEFAULT_TYPE: &str = "batch";

/// A task spec, as submitted. Unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Human-readable name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The project it belongs to (default [`crate::auth::DEFAULT_PROJECT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// Free-form kind: train, infer, evaluate, batch, service, ...
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub task_type: Option<String>,
    /// argv to execute (exclusive with `shell`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// A shell script to execute with `sh -c` (exclusive with `command`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory of the process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Resources the task needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// 0..=100, higher runs first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    /// Free-form labels for filtering.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Labels the worker must carry (merged with `resources.labels`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    /// Set on a service's replicas: the service's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Set on a service's replicas: the replica's index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<u32>,
    /// Health probe, run by the worker (see `worker::probe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<serde_json::Value>,
    /// Who runs the task: `tasklog` (default) or `external` (never scheduled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<String>,
    /// Tasks that must succeed before this one may run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<Uuid>,
    /// Seconds (integer) or a duration string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<serde_json::Value>,
    /// Retry policy: `true`, `false` or an object (see [`super::retry`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<serde_json::Value>,
    /// Per-attempt log quota: bytes or a size string (default 100 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_quota: Option<serde_json::Value>,
    /// Client-chosen key that makes resubmission safe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// Resources a task asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Cores, fractional allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    /// Bytes (integer) or a size string such as `"2GiB"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<serde_json::Value>,
    /// GPU count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<u32>,
    /// Labels the worker must carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A spec field whose value the JSON Schema accepted but that does not make sense.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// Dotted path of the offending field, e.g. `resources.memory`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl SpecError {
    /// An error about `field`.
    pub fn new(field: &str, message: impl Into<String>) -> SpecError {
        SpecError {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

impl TaskSpec {
    /// The project, defaulting to [`crate::auth::DEFAULT_PROJECT`].
    pub fn project(&self) -> &str {
        self.project
            .as_deref()
            .unwrap_or(crate::auth::DEFAULT_PROJECT)
    }

    /// The task type, defaulting to [`DEFAULT_TYPE`].
    pub fn task_type(&self) -> &str {
        self.task_type.as_deref().unwrap_or(DEFAULT_TYPE)
    }

    /// The priority, defaulting to [`DEFAULT_PRIORITY`].
    pub fn priority(&self) -> i64 {
        self.priority.unwrap_or(DEFAULT_PRIORITY)
    }

    /// Whether an outside system runs the task (`executor: external`).
    pub fn is_external(&self) -> bool {
        self.executor.as_deref() == Some("external")
    }

    /// Every label a worker must carry: `resources.labels` and `selector` together.
    pub fn required_labels(&self) -> BTreeMap<String, String> {
        let mut labels = self
            .resources
            .as_ref()
            .map(|r| r.labels.clone())
            .unwrap_or_default();
        labels.extend(self.selector.iter().map(|(k, v)| (k.clone(), v.clone())));
        labels
    }

    /// Memory in bytes, if given.
    pub fn memory_bytes(&self) -> Result<Option<u64>, SpecError> {
        match self.resources.as_ref().and_then(|r| r.memory.as_ref()) {
            None => Ok(None),
            Some(value) => parse_size(value).map(Some).map_err(|message| SpecError {
                field: "resources.memory".into(),
                message,
            }),
        }
    }

    /// Log quota in bytes, if given.
    pub fn log_quota_bytes(&self) -> Result<Option<u64>, SpecError> {
        match &self.log_quota {
            None => Ok(None),
            Some(value) => parse_size(value).map(Some).map_err(|message| SpecError {
                field: "log_quota".into(),
                message,
            }),
        }
    }

    /// Timeout in milliseconds, if given.
    pub fn timeout_ms(&self) -> Result<Option<u64>, SpecError> {
        match &self.timeout {
            None => Ok(None),
            Some(serde_json::Value::Number(n)) => n
                .as_u64()
                .filter(|s| *s > 0)
                .map(|s| Some(s.saturating_mul(1000)))
                .ok_or_else(|| SpecError {
                    field: "timeout".into(),
                    message: format!("{n} is not a positive whole number of seconds"),
                }),
            Some(serde_json::Value::String(s)) => parse_duration_ms(s)
                .filter(|ms| *ms > 0)
                .map(Some)
                .ok_or_else(|| SpecError {
                    field: "timeout".into(),
                    message: format!("{s:?} is not a duration such as 90s, 30m, 1h30m"),
                }),
            Some(other) => Err(SpecError {
                field: "timeout".into(),
                message: format!("{other} is not a duration"),
            }),
        }
    }

    /// Parses a spec given as JSON: schema, types, then [`TaskSpec::check`]. The error
    /// names the offending field.
    pub fn from_json(value: serde_json::Value) -> Result<TaskSpec, String> {
        super::schema::validate_task_spec(&value)?;
        let spec: TaskSpec = serde_json::from_value(value).map_err(|e| e.to_string())?;
        spec.check().map_err(|e| e.to_string())?;
        Ok(spec)
    }

    /// Checks what the JSON Schema cannot express. Call after schema validation.
    pub fn check(&self) -> Result<(), SpecError> {
        match (&self.command, &self.shell) {
            (Some(_), Some(_)) => {
                return Err(SpecError {
                    field: "command".into(),
                    message: "give either command or shell, not both".into(),
                });
            }
            (None, None) => {
                return Err(SpecError {
                    field: "command".into(),
                    message: "one of command or shell is required".into(),
                });
            }
            _ => {}
        }
        if let Some(p) = self.priority
            && !(MIN_PRIORITY..=MAX_PRIORITY).contains(&p)
        {
            return Err(SpecError {
                field: "priority".into(),
                message: format!("{p} is outside {MIN_PRIORITY}..={MAX_PRIORITY}"),
            });
        }
        if let Some(cpu) = self.resources.as_ref().and_then(|r| r.cpu)
            && !(cpu.is_finite() && cpu > 0.0)
        {
            return Err(SpecError {
                field: "resources.cpu".into(),
                message: format!("{cpu} is not a positive number of cores"),
            });
        }
        self.memory_bytes()?;
        self.timeout_ms()?;
        self.log_quota_bytes()?;
        super::retry::RetryPolicy::from_spec(self.retry.as_ref())?;
        if let Some(probe) = &self.probe {
            super::probe::Probe::from_json(probe)?;
        }
        Ok(())
    }
}

/// Parses a byte size: an integer, or a string like `512MiB`, `2GiB`, `1.5GB`, `1000`.
/// Binary units (KiB, MiB, ...) are powers of 1024; decimal ones (KB, MB, ...) powers of 1000;
/// a bare `K`/`M`/`G` is binary, as in Kubernetes' `Ki` shorthand used by most job specs.
pub fn parse_size(value: &serde_json::Value) -> Result<u64, String> {
    match value {
        serde_json::Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| format!("{n} is not a whole number of bytes")),
        serde_json::Value::String(s) => parse_size_str(s),
        other => Err(format!("{other} is not a size")),
    }
}

fn parse_size_str(input: &str) -> Result<u64, String> {
    let s = input.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{input:?} is not a size such as 512MiB or 2GiB"))?;
    let unit = unit.trim().to_ascii_lowercase();
    let multiplier: f64 = match unit.as_str() {
        "" | "b" => 1.0,
        "k" | "ki" | "kib" => 1024.0,
        "m" | "mi" | "mib" => 1024.0f64.powi(2),
        "g" | "gi" | "gib" => 1024.0f64.powi(3),
        "t" | "ti" | "tib" => 1024.0f64.powi(4),
        "p" | "pi" | "pib" => 1024.0f64.powi(5),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "pb" => 1e15,
        _ => return Err(format!("{input:?} has an unknown unit {unit:?}")),
    };
    let bytes = number * multiplier;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(format!("{input:?} is too large"));
    }
    Ok(bytes.round() as u64)
}

/// Parses a duration such as `90s`, `30m`, `1h30m`, `1d`, `250ms` into milliseconds.
/// Returns `None` when the text is not a duration.
pub fn parse_duration_ms(input: &str) -> Option<u64> {
    let mut total: u64 = 0;
    let mut rest = input.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let value: u64 = rest[..digits].parse().ok()?;
        rest = rest[digits..].trim_start();
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let unit_ms: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return None,
        };
        total = total.checked_add(value.checked_mul(unit_ms)?)?;
        rest = rest[unit_len..].trim_start();
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sizes_parse_in_binary_and_decimal_units() {
        assert_eq!(parse_size(&json!(1000)), Ok(1000));
        assert_eq!(parse_size(&json!("512MiB")), Ok(512 * 1024 * 1024));
        assert_eq!(parse_size(&json!("2GiB")), Ok(2 << 30));
        assert_eq!(parse_size(&json!("2G")), Ok(2 << 30));
        assert_eq!(parse_size(&json!("1.5GB")), Ok(1_500_000_000));
        assert_eq!(parse_size(&json!(" 10 kb ")), Ok(10_000));
        assert!(parse_size(&json!("2 bananas")).is_err());
        assert!(parse_size(&json!(-1)).is_err());
        assert!(parse_size(&json!(true)).is_err());
    }

    #[test]
    fn durations_parse_compound_forms() {
        assert_eq!(parse_duration_ms("90s"), Some(90_000));
        assert_eq!(parse_duration_ms("1h30m"), Some(5_400_000));
        assert_eq!(parse_duration_ms("1d"), Some(86_400_000));
        assert_eq!(parse_duration_ms("250ms"), Some(250));
        assert_eq!(parse_duration_ms("2 h 5 s"), Some(7_205_000));
        assert_eq!(parse_duration_ms(""), None);
        assert_eq!(parse_duration_ms("5"), None);
        assert_eq!(parse_duration_ms("5y"), None);
        assert_eq!(parse_duration_ms("h"), None);
    }

    #[test]
    fn check_refuses_command_and_shell_together_and_neither() {
        let both = TaskSpec {
            command: Some(vec!["true".into()]),
            shell: Some("true".into()),
            ..Default::default()
        };
        assert_eq!(both.check().unwrap_err().field, "command");
        assert_eq!(TaskSpec::default().check().unwrap_err().field, "command");
    }

    #[test]
    fn check_names_the_bad_field() {
        let spec = TaskSpec {
            shell: Some("true".into()),
            priority: Some(101),
            ..Default::default()
        };
        assert_eq!(spec.check().unwrap_err().field, "priority");
        let spec = TaskSpec {
            shell: Some("true".into()),
            timeout: Some(json!("soon")),
            ..Default::default()
        };
        assert_eq!(spec.check().unwrap_err().field, "timeout");
        let spec = TaskSpec {
            shell: Some("true".into()),
            resources: Some(Resources {
                memory: Some(json!("lots")),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(spec.check().unwrap_err().field, "resources.memory");
        let spec = TaskSpec {
            shell: Some("x".into()),
            probe: Some(json!({"command": {"argv": ["true"]}, "interval": "soon"})),
            ..Default::default()
        };
        assert_eq!(spec.check().unwrap_err().field, "probe.interval");
        let spec = TaskSpec {
            shell: Some("x".into()),
            retry: Some(json!({"max_attempts": 0})),
            ..Default::default()
        };
        assert_eq!(spec.check().unwrap_err().field, "retry.max_attempts");
    }

    #[test]
    fn defaults_apply() {
        let spec = TaskSpec::default();
        assert_eq!(spec.priority(), 50);
        assert_eq!(spec.task_type(), "batch");
    }
}
