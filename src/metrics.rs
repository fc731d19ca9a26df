//! Prometheus metrics, registered once per process and served at `/metrics`.
//!
//! Names are stable: `grafana/dashboards/tasklog.json` is built on them.

use std::sync::OnceLock;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric tasklog exports.
pub struct Metrics {
    registry: Registry,
    /// `tasklog_events_appended_total{type}`: events acknowledged by the broker.
    pub events_appended: IntCounterVec,
    /// `tasklog_append_failures_total{reason}`: appends that were not acknowledged.
    pub append_failures: IntCounterVec,
    /// `tasklog_http_request_duration_seconds{route,method,status}`.
    pub http_duration: HistogramVec,
    /// `tasklog_projector_lag_events{topic,partition}`: high watermark minus next offset.
    pub projector_lag: IntGaugeVec,
    /// `tasklog_projector_rebalances_total{topic,change}`: partitions assigned to or
    /// revoked from this process's consumer-group member.
    pub projector_rebalances: IntCounterVec,
    /// `tasklog_projector_partition_assigned{topic,partition}`: 1 for every partition
    /// this process's projection currently owns (absent otherwise).
    pub projector_partition_assigned: IntGaugeVec,
    /// `tasklog_projector_events_applied_total{type}`.
    pub events_applied: IntCounterVec,
    /// `tasklog_projector_events_rejected_total{reason}`.
    pub events_rejected: IntCounterVec,
    /// `tasklog_dead_letters_total{reason}`: records copied to the DLQ topic.
    pub dead_letters: IntCounterVec,
    /// `tasklog_projector_batches_isolated_total{topic}`: batches Postgres refused in
    /// part, split to find the records it refuses.
    pub batches_isolated: IntCounterVec,
    /// `tasklog_projector_batch_duration_seconds`: one batch, decode to commit.
    pub batch_duration: Histogram,
    /// `tasklog_projector_batch_size`: records per batch.
    pub batch_size: Histogram,
    /// `tasklog_tasks{state}`: tasks per state, from the projection.
    pub tasks: IntGaugeVec,
    /// `tasklog_log_lines_written_total`: log lines appended.
    pub log_lines_written: IntCounter,
    /// `tasklog_log_lines_dropped_total`: log lines dropped by the per-attempt quota.
    pub log_lines_dropped: IntCounter,
    /// `tasklog_log_lines_indexed_total`: log records indexed.
    pub log_lines_indexed: IntCounter,
    /// `tasklog_queue_depth{band}`: queued tasks by priority band (0-24, 25-49, 50-74, 75-100).
    pub queue_depth: IntGaugeVec,
    /// `tasklog_queue_wait_seconds`: time from entering the queue to assignment.
    pub queue_wait: Histogram,
    /// `tasklog_submit_to_running_seconds`: submission to the first attempt running.
    pub submit_to_running: Histogram,
    /// `tasklog_attempts_total{outcome,reason}`: attempts that ended.
    pub attempts: IntCounterVec,
    /// `tasklog_workers{state}`: workers by state.
    pub workers: IntGaugeVec,
    /// `tasklog_capacity{resource,kind}`: capacity of active workers, `used` and `free`
    /// (cpu in cores, memory in bytes, gpu in devices).
    pub capacity: GaugeVec,
    /// `tasklog_scheduler_leader`: 1 in the process whose scheduler leads.
    pub scheduler_leader: IntGauge,
    /// `tasklog_scheduler_pass_duration_seconds`: one scheduling decision pass.
    pub scheduler_pass_duration: Histogram,
    /// `tasklog_worker_attempts_running`: attempts this worker agent runs now.
    pub worker_attempts_running: IntGauge,
    /// `tasklog_log_followers`: log followers (SSE streams, follow long-polls) waiting
    /// on this API server's shared tail now.
    pub log_followers: IntGauge,
    /// `tasklog_log_follow_partitions`: partitions of the logs topic its tail reads now.
    pub log_follow_partitions: IntGauge,
    /// `tasklog_log_followers_lagged_total`: followers the tail cut off for not keeping
    /// up (they are told, and resume from their cursor).
    pub log_followers_lagged: IntCounter,
    /// `tasklog_service_replicas{service,state}`: replicas ready, starting, waiting
    /// (pending or queued, e.g. between retries) and ended.
    pub service_replicas: IntGaugeVec,
    /// `tasklog_service_status{service,status}`: 1 for the service's current status.
    pub service_status: IntGaugeVec,
    /// `tasklog_replay_records_total{topic}`: records folded by replay and audit tools.
    pub replay_records: IntCounterVec,
    /// `tasklog_replay_differences`: differences the last `replay verify` found.
    pub replay_differences: IntGauge,
    /// `tasklog_replay_runs_total{outcome}`: verifications, by outcome (`consistent`,
    /// `differences`, `error`).
    pub replay_runs: IntCounterVec,
    /// `tasklog_tasks_failed_total{task_type,project}`: tasks that ended `failed` for
    /// good (no retry left), counted by the projection as it applies the transition.
    pub tasks_failed: IntCounterVec,
    /// `tasklog_task_retries_total{reason,project}`: failed attempts (or `no_capacity`
    /// failures) whose task went back to `pending` to be retried.
    pub task_retries: IntCounterVec,
    /// `tasklog_projector_lag_seconds{topic,partition}`: how far behind the log the
    /// projection is, in seconds; 0 when caught up (see [`lag_seconds`]).
    pub projector_lag_seconds: GaugeVec,
    /// `tasklog_tasks_unrunnable`: queued tasks (and `no_capacity` retries waiting) that
    /// no live worker could ever run, by labels, project and total capacity; set by the
    /// leading scheduler at each pass.
    pub tasks_unrunnable: IntGauge,
}

fn build() -> Result<Metrics, prometheus::Error> {
    let registry = Registry::new();
    let counter =
        |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
    let gauge =
        |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, prometheus::Error> {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
    let histogram = |name: &str,
                     help: &str,
                     labels: &[&str],
                     buckets: Vec<f64>|
     -> Result<HistogramVec, prometheus::Error> {
        let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
        registry.register(Box::new(h.clone()))?;
        Ok(h)
    };
    let plain_histogram =
        |name: &str, help: &str, buckets: Vec<f64>| -> Result<Histogram, prometheus::Error> {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
    let plain_counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
        let c = IntCounter::new(name, help)?;
        registry.register(Box::new(c.clone()))?;
        Ok(c)
    };
    let plain_gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
        let g = IntGauge::new(name, help)?;
        registry.register(Box::new(g.clone()))?;
        Ok(g)
    };
    let float_gauge =
        |name: &str, help: &str, labels: &[&str]| -> Result<GaugeVec, prometheus::Error> {
            let g = GaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
    let waits = vec![
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
        3600.0,
    ];
    let latency = vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    Ok(Metrics {
        events_appended: counter(
            "tasklog_events_appended_total",
            "Events appended to Kafka and acknowledged, by type.",
            &["type"],
        )?,
        append_failures: counter(
            "tasklog_append_failures_total",
            "Appends the broker did not acknowledge, by reason.",
            &["reason"],
        )?,
        http_duration: histogram(
            "tasklog_http_request_duration_seconds",
            "HTTP request duration, by route, method and status.",
            &["route", "method", "status"],
            latency.clone(),
        )?,
        projector_lag: gauge(
            "tasklog_projector_lag_events",
            "Records on the topic not yet applied by the projector, per partition.",
            &["topic", "partition"],
        )?,
        projector_rebalances: counter(
            "tasklog_projector_rebalances_total",
            "Consumer-group rebalances of the projections, by topic and change (assigned, revoked).",
            &["topic", "change"],
        )?,
        projector_partition_assigned: gauge(
            "tasklog_projector_partition_assigned",
            "1 for each partition this process's projection owns in its consumer group.",
            &["topic", "partition"],
        )?,
        events_applied: counter(
            "tasklog_projector_events_applied_total",
            "Events applied to the projection, by type.",
            &["type"],
        )?,
        events_rejected: counter(
            "tasklog_projector_events_rejected_total",
            "Records the projector rejected, by reason.",
            &["reason"],
        )?,
        dead_letters: counter(
            "tasklog_dead_letters_total",
            "Records copied to the dead-letter topic, by reason.",
            &["reason"],
        )?,
        batches_isolated: counter(
            "tasklog_projector_batches_isolated_total",
            "Batches Postgres refused in part, split to find the records it refuses.",
            &["topic"],
        )?,
        batch_duration: plain_histogram(
            "tasklog_projector_batch_duration_seconds",
            "Time to apply one projector batch, from decode to commit.",
            latency,
        )?,
        batch_size: plain_histogram(
            "tasklog_projector_batch_size",
            "Records per projector batch.",
            vec![
                1.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
            ],
        )?,
        tasks: gauge(
            "tasklog_tasks",
            "Tasks per state, from the projection.",
            &["state"],
        )?,
        log_lines_written: plain_counter(
            "tasklog_log_lines_written_total",
            "Log lines appended to the logs topic.",
        )?,
        log_lines_dropped: plain_counter(
            "tasklog_log_lines_dropped_total",
            "Log lines dropped because their attempt's quota was used up.",
        )?,
        log_lines_indexed: plain_counter(
            "tasklog_log_lines_indexed_total",
            "Log records indexed.",
        )?,
        queue_depth: gauge(
            "tasklog_queue_depth",
            "Queued tasks by priority band.",
            &["band"],
        )?,
        queue_wait: plain_histogram(
            "tasklog_queue_wait_seconds",
            "Time from entering the queue to being assigned a worker.",
            waits.clone(),
        )?,
        submit_to_running: plain_histogram(
            "tasklog_submit_to_running_seconds",
            "Time from submission to the first attempt running.",
            waits,
        )?,
        attempts: counter(
            "tasklog_attempts_total",
            "Attempts that ended, by outcome, reason and project (at most PROJECT_LABEL_BUDGET projects; the rest as `other`).",
            &["outcome", "reason", "project"],
        )?,
        workers: gauge("tasklog_workers", "Workers by state.", &["state"])?,
        capacity: float_gauge(
            "tasklog_capacity",
            "Capacity of active workers: used and free, per resource (cpu cores, memory bytes, gpu devices).",
            &["resource", "kind"],
        )?,
        scheduler_leader: plain_gauge(
            "tasklog_scheduler_leader",
            "1 when this process's scheduler holds the leader lock.",
        )?,
        scheduler_pass_duration: plain_histogram(
            "tasklog_scheduler_pass_duration_seconds",
            "Time of one scheduling decision pass.",
            vec![
                0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ],
        )?,
        worker_attempts_running: plain_gauge(
            "tasklog_worker_attempts_running",
            "Attempts this worker agent is running.",
        )?,
        log_followers: plain_gauge(
            "tasklog_log_followers",
            "Log followers waiting on this API server's shared tail.",
        )?,
        log_follow_partitions: plain_gauge(
            "tasklog_log_follow_partitions",
            "Partitions of the logs topic this API server's shared tail reads.",
        )?,
        log_followers_lagged: plain_counter(
            "tasklog_log_followers_lagged_total",
            "Log followers cut off for not keeping up (told, and resumed from their cursor).",
        )?,
        service_replicas: gauge(
            "tasklog_service_replicas",
            "Replicas of each service by state: ready, starting, waiting, ended.",
            &["service", "state"],
        )?,
        service_status: gauge(
            "tasklog_service_status",
            "1 for each service's current status (provisioning, running, degraded, down, failed, stopped).",
            &["service", "status"],
        )?,
        replay_records: counter(
            "tasklog_replay_records_total",
            "Records folded by the replay and audit tools, by topic.",
            &["topic"],
        )?,
        replay_differences: plain_gauge(
            "tasklog_replay_differences",
            "Differences between the log and the projection the last verification found.",
        )?,
        replay_runs: counter(
            "tasklog_replay_runs_total",
            "Verifications of the projection against the log, by outcome.",
            &["outcome"],
        )?,
        tasks_failed: counter(
            "tasklog_tasks_failed_total",
            "Tasks that ended failed for good, by task type and project (each label within a budget of distinct values; the rest as `other`).",
            &["task_type", "project"],
        )?,
        task_retries: counter(
            "tasklog_task_retries_total",
            "Failures that sent their task back to pending to be retried, by reason and project.",
            &["reason", "project"],
        )?,
        projector_lag_seconds: float_gauge(
            "tasklog_projector_lag_seconds",
            "Seconds the projection is behind the log per partition: an upper bound on the age of the oldest record not yet applied; 0 when caught up.",
            &["topic", "partition"],
        )?,
        tasks_unrunnable: plain_gauge(
            "tasklog_tasks_unrunnable",
            "Queued tasks (and no_capacity retries waiting) that no live worker could ever run.",
        )?,
        registry,
    })
}

/// Reasons the projections reject (and dead-letter) a record with: every
/// `Rejection::code` of the task fold, plus those of the other projections. Their
/// counters start at zero, so that an error panel shows 0 rather than nothing.
pub const REJECTION_REASONS: &[&str] = &[
    "invalid_json",
    "invalid_envelope",
    "unknown_type",
    "schema_violation",
    "subject_mismatch",
    "seq_conflict",
    "illegal_transition",
    "unknown_task",
    "duplicate_ce_id",
    "duplicate_submission",
    "idempotency_conflict",
    "attempt_mismatch",
    "unknown_worker",
    "retry_not_allowed",
    "unknown_service",
    "unknown_token",
    "stale_incarnation",
    "storage_rejected",
    "invalid_log_record",
];

/// The `reason` label values of `tasklog_attempts_total` and
/// `tasklog_task_retries_total` (anything else is `other`).
pub const ATTEMPT_REASONS: &[&str] = &[
    "none",
    "error",
    "timeout",
    "interruption",
    "cancelled",
    "user_requested",
    "spawn_error",
    "unhealthy",
    "no_capacity",
    "other",
];

/// The `reason` label of an attempt that ended (or a retry) with `reason`: one of
/// [`ATTEMPT_REASONS`].
pub fn attempt_reason(reason: Option<&str>) -> &'static str {
    match reason {
        None => "none",
        Some(r) => ATTEMPT_REASONS
            .iter()
            .find(|known| **known == r && r != "none")
            .copied()
            .unwrap_or("other"),
    }
}

/// Creates, at zero, the series whose label values are known in advance, so that they
/// exist (and rates and increases over them work) before the first error.
fn start_at_zero(m: &Metrics) {
    for reason in ["unavailable", "refused"] {
        m.append_failures.with_label_values(&[reason]);
    }
    for reason in REJECTION_REASONS {
        m.events_rejected.with_label_values(&[reason]);
        m.dead_letters.with_label_values(&[reason]);
    }
    let project = crate::events::auth::DEFAULT_PROJECT;
    let outcomes: [(&str, &[&str]); 3] = [
        ("succeeded", &["none"]),
        (
            "failed",
            &[
                "error",
                "timeout",
                "interruption",
                "spawn_error",
                "unhealthy",
                "other",
            ],
        ),
        ("cancelled", &["cancelled", "user_requested", "other"]),
    ];
    for (outcome, reasons) in outcomes {
        for reason in reasons {
            m.attempts.with_label_values(&[outcome, reason, project]);
        }
    }
    for reason in ATTEMPT_REASONS {
        m.task_retries.with_label_values(&[reason, project]);
    }
    m.tasks_failed
        .with_label_values(&[crate::events::spec::DEFAULT_TYPE, project]);
    for outcome in ["consistent", "differences", "error"] {
        m.replay_runs.with_label_values(&[outcome]);
    }
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    // Registration only fails on duplicate or malformed names, which are constants.
    METRICS.get_or_init(|| {
        let m = build().expect("metric definitions are valid");
        start_at_zero(&m);
        m
    })
}

/// Renders every metric in the Prometheus text format.
pub fn render() -> String {
    let mut buffer = Vec::new();
    let families = metrics().registry.gather();
    if TextEncoder::new().encode(&families, &mut buffer).is_err() {
        return String::new();
    }
    String::from_utf8(buffer).unwrap_or_default()
}

/// Most distinct `project` label values one process gives its metrics: past them a
/// project is counted as `other`, so that the series stay bounded however many
/// projects there are.
pub const PROJECT_LABEL_BUDGET: usize = 50;

/// The `project` label value for `project`: itself while the budget lasts (and for
/// every project that already has one), `other` after.
pub fn project_label(project: &str) -> String {
    static SEEN: Budget = Budget::new();
    SEEN.label(project, PROJECT_LABEL_BUDGET)
}

/// Most distinct `task_type` label values one process gives its metrics (task types
/// are free strings); past them a type is counted as `other`.
pub const TASK_TYPE_LABEL_BUDGET: usize = 20;

/// The `task_type` label value for `task_type`: itself while the budget lasts (and for
/// every type that already has one), `other` after.
pub fn task_type_label(task_type: &str) -> String {
    static SEEN: Budget = Budget::new();
    SEEN.label(task_type, TASK_TYPE_LABEL_BUDGET)
}

/// The label values one label has handed out, up to a budget.
struct Budget(std::sync::Mutex<Option<std::collections::HashSet<String>>>);

impl Budget {
    const fn new() -> Budget {
        Budget(std::sync::Mutex::new(None))
    }

    fn label(&self, value: &str, budget: usize) -> String {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let seen = seen.get_or_insert_with(Default::default);
        if seen.contains(value) {
            return value.to_string();
        }
        if seen.len() < budget {
            seen.insert(value.to_string());
            return value.to_string();
        }
        "other".to_string()
    }
}

/// `tasklog_projector_lag_seconds` of one partition, all times in milliseconds since
/// the epoch: 0 when nothing is left to apply (`lag_events` 0); otherwise the smaller of
/// `now` minus the append time of the last record applied and `now` minus the last time
/// the partition was seen caught up. Both bound the age of the oldest record not yet
/// applied from above (it was appended after the one applied before it, and after the
/// moment nothing was left), so the smaller is the tighter bound. `None` while neither
/// is known (a partition just assigned, nothing applied yet).
pub fn lag_seconds(
    lag_events: i64,
    now_ms: i64,
    last_applied_ms: Option<i64>,
    caught_up_ms: Option<i64>,
) -> Option<f64> {
    if lag_events <= 0 {
        return Some(0.0);
    }
    let behind = [last_applied_ms, caught_up_ms]
        .into_iter()
        .flatten()
        .map(|t| (now_ms - t).max(0))
        .min()?;
    Some(behind as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_labels_stay_within_the_budget() {
        let labels: Vec<String> = (0..PROJECT_LABEL_BUDGET + 10)
            .map(|i| project_label(&format!("budget-{i}")))
            .collect();
        assert!(labels.iter().filter(|l| *l == "other").count() >= 10);
        assert!(labels.iter().filter(|l| *l != "other").count() <= PROJECT_LABEL_BUDGET);
        // A project that has a label keeps it.
        let first = labels.iter().find(|l| *l != "other").cloned();
        if let Some(first) = first {
            assert_eq!(project_label(&first), first);
        }
    }

    #[test]
    fn lag_seconds_is_the_tighter_bound_and_zero_when_caught_up() {
        assert_eq!(lag_seconds(0, 10_000, Some(1_000), None), Some(0.0));
        assert_eq!(lag_seconds(5, 10_000, None, None), None);
        // Idle for long, then one new record: caught up a second ago.
        assert_eq!(lag_seconds(1, 100_000, Some(0), Some(99_000)), Some(1.0));
        // Always a little behind under load: the last applied record is recent.
        assert_eq!(lag_seconds(3, 100_000, Some(99_500), Some(0)), Some(0.5));
        // A clock ahead of ours never gives a negative lag.
        assert_eq!(lag_seconds(3, 100_000, Some(200_000), None), Some(0.0));
    }

    #[test]
    fn attempt_reasons_are_bounded() {
        assert_eq!(attempt_reason(None), "none");
        assert_eq!(attempt_reason(Some("timeout")), "timeout");
        assert_eq!(attempt_reason(Some("no_capacity")), "no_capacity");
        assert_eq!(attempt_reason(Some("none")), "other");
        assert_eq!(attempt_reason(Some("scaled_down")), "other");
    }

    #[test]
    fn known_series_start_at_zero() {
        let text = render();
        for line in [
            "tasklog_append_failures_total{reason=\"unavailable\"} 0",
            "tasklog_dead_letters_total{reason=\"invalid_json\"} 0",
            "tasklog_projector_events_rejected_total{reason=\"unknown_type\"} 0",
            "tasklog_task_retries_total{project=\"default\",reason=\"error\"} 0",
            "tasklog_tasks_failed_total{project=\"default\",task_type=\"batch\"} 0",
            "tasklog_tasks_unrunnable 0",
        ] {
            assert!(text.contains(line), "no {line:?} in:\n{text}");
        }
    }

    #[test]
    fn metrics_register_and_render() {
        metrics()
            .events_appended
            .with_label_values(&["dev.tasklog.task.submitted.v1"])
            .inc();
        let text = render();
        assert!(
            text.contains("tasklog_events_appended_total{type=\"dev.tasklog.task.submitted.v1\"}")
        );
    }
}
