//! Observability, proven against a real Prometheus: the shipped alerting rules
//! (`docker/alerts.yml`) and their promtool unit tests (`docker/alerts.test.yml`), the
//! Grafana dashboards and provisioning (`grafana/`), and a live run in which every
//! dashboard query returns series and shipped alerts fire.
//!
//! Needs Prometheus and promtool: `TASKLOG_TEST_PROMETHEUS` (scripts/test installs
//! Debian's `prometheus` package and sets it) or `prometheus`/`promtool` on `PATH`; a
//! missing one fails these tests, and only `TASKLOG_TEST_PROMETHEUS=skip` skips them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Cluster, Prometheus, Stack, free_port, prometheus_tool};
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every alerting rule of `docker/alerts.yml`, by name.
fn shipped_alerts() -> BTreeMap<String, Value> {
    let rules = yaml("docker/alerts.yml");
    let mut alerts = BTreeMap::new();
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            if let Some(name) = rule["alert"].as_str() {
                assert!(
                    alerts.insert(name.to_string(), rule.clone()).is_none(),
                    "alert {name} defined twice"
                );
            }
        }
    }
    alerts
}

/// Every panel of a dashboard, those inside (collapsed) rows too.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The dashboards under `grafana/dashboards/`, by file name.
fn dashboards() -> Vec<(String, Value)> {
    let mut all: Vec<(String, Value)> = std::fs::read_dir(repo("grafana/dashboards"))
        .expect("grafana/dashboards")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read dashboard");
            let name = p.file_name().unwrap_or_default().to_string_lossy().into();
            let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, json)
        })
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!all.is_empty(), "no dashboard in grafana/dashboards");
    all
}

/// Grafana's built-in variables with the concrete values a query runs with here.
fn substitute(expr: &str) -> String {
    let mut out = expr.to_string();
    for (var, value) in [
        ("__rate_interval", "1m"),
        ("__interval_ms", "15000"),
        ("__interval", "15s"),
        ("__range_ms", "3600000"),
        ("__range_s", "3600"),
        ("__range", "1h"),
    ] {
        out = out
            .replace(&format!("${{{var}}}"), value)
            .replace(&format!("${var}"), value);
    }
    out
}

/// Every target expression of every dashboard panel, Grafana variables substituted:
/// (where, expression).
fn dashboard_queries() -> Vec<(String, String)> {
    let mut queries = Vec::new();
    for (file, dashboard) in dashboards() {
        for panel in panels(&dashboard) {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap_or_else(|| {
                    panic!("{file}: panel {} has a target without expr", panel["id"])
                });
                let expr = substitute(expr);
                assert!(
                    !expr.contains('$'),
                    "{file}: panel {} uses a variable the tests do not know: {expr}",
                    panel["id"]
                );
                let at = format!(
                    "{file} panel {} {:?} target {}",
                    panel["id"], panel["title"], target["refId"]
                );
                queries.push((at, expr));
            }
        }
    }
    queries
}

/// Each alert names its severity, says what happened and what to do, has a promtool
/// case that expects it to fire, and a runbook line in the README.
#[test]
fn every_rule_is_labelled_documented_and_unit_tested() {
    let alerts = shipped_alerts();
    assert!(alerts.len() >= 10, "{} alerts", alerts.len());
    let tests = yaml("docker/alerts.test.yml");
    assert!(
        tests["rule_files"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "alerts.yml")),
        "docker/alerts.test.yml tests docker/alerts.yml"
    );
    let mut fired: BTreeSet<String> = BTreeSet::new();
    let mut quiet: BTreeSet<String> = BTreeSet::new();
    for test in tests["tests"].as_array().expect("tests") {
        for case in test["alert_rule_test"].as_array().into_iter().flatten() {
            let name = case["alertname"].as_str().expect("alertname").to_string();
            assert!(alerts.contains_key(&name), "a test of no rule: {name}");
            match case["exp_alerts"].as_array().map(Vec::len) {
                Some(n) if n > 0 => fired.insert(name),
                _ => quiet.insert(name),
            };
        }
    }
    let readme = std::fs::read_to_string(repo("README.md")).expect("README.md");
    let runbook = readme
        .split_once("\n## Runbook")
        .map(|(_, rest)| rest)
        .expect("README.md has a Runbook section");
    for (name, rule) in &alerts {
        assert!(
            fired.contains(name),
            "no promtool case expects {name} to fire"
        );
        assert!(
            quiet.contains(name),
            "no promtool case expects {name} quiet"
        );
        let severity = rule["labels"]["severity"].as_str();
        assert!(
            matches!(severity, Some("critical" | "warning")),
            "{name}: severity {severity:?}"
        );
        for annotation in ["summary", "description", "runbook"] {
            assert!(
                rule["annotations"][annotation]
                    .as_str()
                    .is_some_and(|s| !s.trim().is_empty()),
                "{name} has no {annotation} annotation"
            );
        }
        assert!(
            runbook.contains(&format!("\n| `{name}` |")),
            "README.md's runbook has no line for {name}"
        );
    }
}

/// `promtool check rules` and `promtool test rules` pass on the shipped rules, and the
/// shipped Prometheus configuration loads them.
#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    let Some(promtool) = prometheus_tool("promtool") else {
        return;
    };
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts.test.yml"],
        vec!["check", "config", "prometheus.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(&args)
            .current_dir(repo("docker"))
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The dashboards are well formed (unique panel ids, the provisioned datasource on every
/// panel and target, every expression accepted by Prometheus' parser), and `grafana/`
/// provisioning agrees with `docker/`.
#[test]
fn dashboards_and_provisioning_are_consistent() {
    let datasources = yaml("grafana/provisioning/datasources/prometheus.yml");
    let source = &datasources["datasources"][0];
    let uid = source["uid"].as_str().expect("the datasource has a uid");
    assert_eq!(source["type"], "prometheus");
    // Grafana lists the rules Prometheus evaluates (docker/alerts.yml) under Alerting.
    assert_eq!(source["jsonData"]["manageAlerts"], true, "{source:?}");
    for (file, dashboard) in dashboards() {
        let mut ids = BTreeSet::new();
        for panel in panels(&dashboard) {
            let id = &panel["id"];
            assert!(id.is_u64(), "{file}: a panel without a numeric id");
            assert!(ids.insert(id.to_string()), "{file}: panel id {id} twice");
            if panel["type"] == "row" {
                continue;
            }
            assert_eq!(
                panel["datasource"]["uid"], uid,
                "{file}: panel {id} datasource"
            );
            let targets = panel["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{file}: panel {id} has no target");
            for t in targets {
                assert_eq!(t["datasource"]["uid"], uid, "{file}: panel {id} target");
            }
        }
    }

    // Prometheus' parser, through promtool: every expression as a recording rule.
    if let Some(promtool) = prometheus_tool("promtool") {
        let queries = dashboard_queries();
        let rules = json!({"groups": [{
            "name": "dashboard",
            "rules": queries.iter().enumerate().map(|(i, (_, expr))| {
                json!({"record": format!("dashboard:query_{i}"), "expr": expr})
            }).collect::<Vec<_>>(),
        }]});
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("dashboard-queries.yml");
        std::fs::write(&file, rules.to_string()).expect("write rules");
        let out = Command::new(&promtool)
            .args(["check", "rules"])
            .arg(&file)
            .output()
            .expect("run promtool");
        let list: Vec<String> = queries
            .iter()
            .enumerate()
            .map(|(i, (at, expr))| format!("query_{i}: {at}: {expr}"))
            .collect();
        assert!(
            out.status.success(),
            "Prometheus refuses a dashboard expression:\n{}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            list.join("\n")
        );
    }

    // Prometheus loads the shipped rules, in docker/ as in the compose stack.
    let config = yaml("docker/prometheus.yml");
    assert!(
        config["rule_files"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "alerts.yml")),
        "docker/prometheus.yml loads alerts.yml"
    );
    let compose = yaml("docker/docker-compose.yml");
    let mounts = compose["services"]["prometheus"]["volumes"]
        .as_array()
        .expect("prometheus volumes");
    assert!(
        mounts
            .iter()
            .any(|m| m == "./alerts.yml:/etc/prometheus/alerts.yml:ro"),
        "the compose stack mounts alerts.yml next to prometheus.yml: {mounts:?}"
    );
    assert_eq!(
        source["url"], "http://prometheus:9090",
        "the datasource points at the compose stack's Prometheus"
    );

    // Grafana-managed alert rules, if any are provisioned, mirror the Prometheus ones.
    let alerting = repo("grafana/provisioning/alerting");
    if alerting.exists() {
        let alerts = shipped_alerts();
        for entry in std::fs::read_dir(&alerting)
            .expect("read alerting")
            .flatten()
        {
            let text = std::fs::read_to_string(entry.path()).expect("read");
            let doc: Value = serde_yaml_ng::from_str(&text).expect("YAML");
            for group in doc["groups"].as_array().into_iter().flatten() {
                for rule in group["rules"].as_array().into_iter().flatten() {
                    let title = rule["title"].as_str().unwrap_or_default();
                    assert!(
                        alerts.contains_key(title),
                        "Grafana rule {title:?} is not in docker/alerts.yml"
                    );
                }
            }
        }
    }
}

/// Every service replica shell: replica 1 fails at once, the others stay up.
const ONE_BAD_REPLICA: &str = "if [ \"$TASKLOG_REPLICA\" = 1 ]; then exit 3; fi; exec sleep 1000";

/// tasklog's roles (API, projector, scheduler, two workers) and a Prometheus scraping
/// each, with the shipped rules. A workload touches every panel: a success, a task
/// retried then failed for good, a cancel, a dead letter, a degraded and a failed
/// service, a worker SIGKILLed (lost). Then every dashboard query returns series, and
/// shipped alerts fire.
#[tokio::test(flavor = "multi_thread")]
async fn a_live_prometheus_sees_every_panel_and_fires_the_alerts() {
    let Some(bin) = prometheus_tool("prometheus") else {
        return;
    };
    let started = Instant::now();
    let metrics_addr = || format!("127.0.0.1:{}", free_port());
    let (projector_at, scheduler_at, worker_at, doomed_at) = (
        metrics_addr(),
        metrics_addr(),
        metrics_addr(),
        metrics_addr(),
    );
    let stack = Stack::start_on_with(
        common::Broker::start(),
        &[("TASKLOG_PROJECTOR_METRICS_ADDR", &projector_at)],
    )
    .await;
    let mut c = Cluster::start_on(
        stack,
        &["--worker-timeout", "3s", "--metrics-addr", &scheduler_at],
    );
    c.add_worker(
        "steady",
        &["--metrics-addr", &worker_at, "--kill-grace", "1s"],
    )
    .await;
    c.add_worker(
        "doomed",
        &["--metrics-addr", &doomed_at, "--label", "pool=doomed"],
    )
    .await;
    let api_at = c.stack.url.trim_start_matches("http://").to_string();
    let targets = vec![api_at, projector_at, scheduler_at, worker_at, doomed_at];
    let prometheus = Prometheus::start(&bin, &targets, &[repo("docker/alerts.yml")]).await;
    // Every process has been scraped once with its counters at zero, before any error.
    prometheus.wait_targets_up(targets.len()).await;

    // A lost worker: SIGKILL one while it runs a task (only it has the label), before
    // anything else runs, so that the rest runs on the steady one.
    let stranded = c
        .submit(json!({"shell": "sleep 100", "selector": {"pool": "doomed"}}))
        .await;
    let t = c.wait_state(&stranded, "running", MINUTE).await;
    assert_eq!(t["worker_id"], "doomed", "{t}");
    c.worker("doomed").kill();
    c.wait_worker("doomed", "lost").await;

    // A success; a task retried once, then failed for good; a cancel.
    let ok = c.submit(json!({"shell": "true"})).await;
    let flaky = c
        .submit(
            json!({"shell": "exit 3", "type": "train", "retry": {"max_attempts": 2,
            "backoff": {"initial": "200ms", "multiplier": 1}}}),
        )
        .await;
    let cancelled = c.submit(json!({"shell": "sleep 100"})).await;
    c.wait_state(&ok, "succeeded", MINUTE).await;
    c.wait_state(&cancelled, "running", MINUTE).await;
    let (status, body) = c
        .stack
        .post(&format!("/v1/tasks/{cancelled}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202, "{body}");
    // A 4xx for the API panel.
    let (status, _) = c
        .stack
        .get(&format!("/v1/tasks/{}", uuid::Uuid::new_v4()))
        .await;
    assert_eq!(status, 404);

    // A dead letter: garbage on the events topic (no CloudEvents headers at all).
    let topic = c.stack.broker.events_topic();
    c.stack
        .broker
        .produce(&topic, Some("garbage"), &[], b"{not an event")
        .await;

    // A service with one replica failing and waiting long for its retry (degraded),
    // and one without retry whose replica fails (failed).
    for (name, retry) in [
        (
            "half",
            json!({"duration": "off", "backoff": {"initial": "10m"}}),
        ),
        ("doomed-svc", Value::Null),
    ] {
        let mut body = json!({
            "name": name,
            "replicas": 2,
            "template": {"shell": ONE_BAD_REPLICA, "resources": {"cpu": 0.1}},
        });
        if !retry.is_null() {
            body["retry"] = retry;
        }
        let (status, s) = c.stack.post("/v1/services", &body).await;
        assert_eq!(status, 201, "{s}");
    }

    c.wait_state(&stranded, "failed", MINUTE).await;
    c.wait_state(&flaky, "failed", MINUTE).await;
    c.wait_state(&cancelled, "cancelled", MINUTE).await;
    for (name, status) in [("half", "degraded"), ("doomed-svc", "failed")] {
        common::eventually(&format!("service {name} {status}"), MINUTE, || async {
            let (_, s) = c.stack.get(&format!("/v1/services/{name}")).await;
            (s["status"] == status).then_some(())
        })
        .await;
    }
    let workload_done = started.elapsed();

    // Every query of every panel returns series.
    let queries = dashboard_queries();
    let mut empty: Vec<String> = Vec::new();
    let bound = Duration::from_secs(90);
    let deadline = Instant::now() + bound;
    loop {
        empty.clear();
        for (at, expr) in &queries {
            match prometheus.query(expr).await {
                Ok(series) if !series.is_empty() => {}
                Ok(_) => empty.push(format!("{at}: no series: {expr}")),
                Err(e) => panic!("{at}: Prometheus refuses {expr}: {e}"),
            }
        }
        if empty.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        empty.is_empty(),
        "{} of {} dashboard queries return nothing after {bound:?}:\n{}",
        empty.len(),
        queries.len(),
        empty.join("\n")
    );

    // Shipped alerts fire: a task failed for good, a dead letter, a failed service.
    let shipped = shipped_alerts();
    let must_fire = [
        "TasklogTaskFailed",
        "TasklogDeadLetters",
        "TasklogServiceFailed",
    ];
    let firing = common::eventually("the alerts to fire", MINUTE, || async {
        let firing: BTreeSet<String> = prometheus
            .alerts()
            .await
            .iter()
            .filter(|a| a["state"] == "firing")
            .filter_map(|a| a["labels"]["alertname"].as_str().map(str::to_string))
            .collect();
        must_fire
            .iter()
            .all(|name| firing.contains(*name))
            .then_some(firing)
    })
    .await;
    assert!(firing.iter().filter(|a| shipped.contains_key(*a)).count() >= 3);
    let alerts = prometheus.alerts().await;
    let failed_for_good = alerts
        .iter()
        .find(|a| {
            a["labels"]["alertname"] == "TasklogTaskFailed" && a["labels"]["task_type"] == "train"
        })
        .unwrap_or_else(|| panic!("no TasklogTaskFailed for the train task: {alerts:?}"));
    assert_eq!(failed_for_good["labels"]["project"], "default");
    assert!(
        alerts
            .iter()
            .any(|a| a["labels"]["alertname"] == "TasklogDeadLetters"
                && a["labels"]["reason"] == "invalid_envelope"),
        "{alerts:?}"
    );
    assert!(
        alerts
            .iter()
            .any(|a| a["labels"]["alertname"] == "TasklogServiceFailed"
                && a["labels"]["service"] == "doomed-svc"),
        "{alerts:?}"
    );
    // The retry and the lost worker's interrupted attempt are counted.
    let retries = prometheus
        .query("sum(tasklog_task_retries_total{reason=\"error\"})")
        .await
        .expect("query");
    assert!(
        retries[0]["value"][1].as_str().unwrap_or("0") != "0",
        "{retries:?}"
    );
    eprintln!(
        "observability: workload {workload_done:.1?}, all {} queries answered and {firing:?} firing at {:.1?}",
        queries.len(),
        started.elapsed()
    );
}
