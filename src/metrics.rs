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
        registry,
    })
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    // Registration only fails on duplicate or malformed names, which are constants.
    METRICS.get_or_init(|| build().expect("metric definitions are valid"))
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
    static SEEN: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<String>>> =
        std::sync::OnceLock::new();
    let mut seen = SEEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if seen.contains(project) {
        return project.to_string();
    }
    if seen.len() < PROJECT_LABEL_BUDGET {
        seen.insert(project.to_string());
        return project.to_string();
    }
    "other".to_string()
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
