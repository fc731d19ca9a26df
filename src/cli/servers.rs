//! The long-running roles.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Json;
use axum::extract::State;
use axum::routing::{get, post};

use super::{
    DbArgs, DevBrokerArgs, HttpArgs, ProjectorArgs, SchedulerArgs, SchedulingArgs, ServerArgs,
    Signals, UpArgs, WorkerArgs, WorkerResourceArgs, shutdown_signal,
};
use crate::api::auth::AuthMode;
use crate::api::{self, ApiOptions, AppState};
use crate::kafka::dev_broker::{DevBroker, DevBrokerOptions};
use crate::kafka::{self, Appender, AppenderOptions, Topics};
use crate::projector::{self, ProjectorOptions};
use crate::scheduler::{self, SchedulerOptions};
use crate::store::{self, Store};
use crate::worker::{self, WorkerOptions};

/// Connects to Postgres (creating the database when missing) and applies migrations.
pub(crate) async fn open_store(db: &DbArgs) -> anyhow::Result<Store> {
    store::ensure_database(&db.database_url)
        .await
        .with_context(|| format!("preparing database {}", redact(&db.database_url)))?;
    let store = Store::connect(&db.database_url, db.database_pool)?;
    store.migrate().await.context("applying migrations")?;
    Ok(store)
}

/// The URL without its password, for messages.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// Topic names for `prefix`, with the settings tasklog creates them with, from the
/// environment: `TASKLOG_LOGS_RETENTION` (e.g. `7d`, `36h`) for the logs topic,
/// `TASKLOG_REPLICATION_FACTOR` and `TASKLOG_MIN_INSYNC_REPLICAS` for every topic (unset:
/// the broker's defaults). A value that does not parse is an error, not a silent default.
pub(crate) fn topics_for(prefix: &str) -> anyhow::Result<Topics> {
    let mut topics = Topics::with_prefix(prefix);
    if let Ok(value) = std::env::var("TASKLOG_LOGS_RETENTION") {
        match crate::events::spec::parse_duration_ms(&value) {
            Some(ms) if ms > 0 => topics.logs_retention_ms = ms as i64,
            _ => anyhow::bail!("TASKLOG_LOGS_RETENTION={value:?} is not a duration such as 7d"),
        }
    }
    let count = |name: &str| -> anyhow::Result<Option<i32>> {
        match std::env::var(name) {
            Err(_) => Ok(None),
            Ok(value) => match value.parse::<i32>() {
                Ok(n) if (1..=32).contains(&n) => Ok(Some(n)),
                _ => anyhow::bail!("{name}={value:?} is not a whole number from 1 to 32"),
            },
        }
    };
    if let Some(n) = count("TASKLOG_REPLICATION_FACTOR")? {
        topics.replication_factor = n;
    }
    topics.min_insync_replicas = count("TASKLOG_MIN_INSYNC_REPLICAS")?;
    Ok(topics)
}

/// The API's state over topics its caller has made sure of (`kafka::ensure_topics`),
/// with the partition counts the broker reports.
pub(crate) async fn build_api(
    brokers: &str,
    topics: Topics,
    store: Store,
    http: &HttpArgs,
) -> anyhow::Result<Arc<AppState>> {
    let listed = kafka::list_topics(brokers).await?;
    let partitions_of = |name: &str| listed.iter().find(|(n, _)| n == name).map(|(_, p)| *p);
    let partitions = partitions_of(&topics.events)
        .with_context(|| format!("topic {} not found", topics.events))?;
    let log_partitions = partitions_of(&topics.logs).unwrap_or(partitions);
    let mut appender_options = AppenderOptions::new(brokers);
    appender_options.timeout = Duration::from_millis(http.append_timeout_ms.max(1));
    let appender = Appender::new(&appender_options)?;
    let cursor_key = crate::logs::CursorKey::new(store.cursor_key().await?);
    let mut options = ApiOptions::new(brokers, topics, partitions);
    options.log_partitions = log_partitions;
    options.read_wait = Duration::from_millis(http.read_wait_ms);
    options.max_wait = Duration::from_millis(http.max_wait_ms);
    options.max_followers = http.max_followers;
    options.service_partitions = partitions_of(&options.topics.services).unwrap_or(partitions);
    options.worker_partitions = partitions_of(&options.topics.workers).unwrap_or(partitions);
    options.auth = auth_mode(http)?;
    options.metrics_open = match http.metrics_auth.as_str() {
        "open" => true,
        "token" => false,
        _ => http.http_addr.ip().is_loopback(),
    };
    Ok(AppState::new(store, appender, options, cursor_key)?)
}

/// The API's auth mode; `off` is refused on anything but loopback, and said loudly.
fn auth_mode(http: &HttpArgs) -> anyhow::Result<AuthMode> {
    if http.auth != "off" {
        return Ok(AuthMode::Tokens);
    }
    anyhow::ensure!(
        http.http_addr.ip().is_loopback(),
        "--auth off on {}: an API without authentication listens on loopback only \
         (anyone who reaches it could submit, cancel and read everything)",
        http.http_addr
    );
    eprintln!(
        "tasklog: WARNING: authentication is OFF (--auth off): anyone who reaches {} may do \
         anything, as `anonymous`. For local experiments only.",
        http.http_addr
    );
    Ok(AuthMode::Off)
}

pub(super) async fn up(args: UpArgs) -> anyhow::Result<()> {
    let topics = topics_for(&args.topic_prefix)?;
    let mut embedded = None;
    let brokers = match args.dev_broker {
        false => args.brokers.clone(),
        true => {
            let broker = DevBroker::start(&DevBrokerOptions {
                listen: args.dev_broker_addr,
                partitions: args.partitions,
                topics: topics.all().into_iter().map(|t| t.name).collect(),
            })
            .await
            .context(
                "starting the embedded broker (is another tasklog up or dev-broker running?)",
            )?;
            let addr = broker.addr().to_string();
            embedded = Some(broker);
            addr
        }
    };
    let store = open_store(&args.db).await?;
    if embedded.is_some() {
        store.reset_projection().await?;
        eprintln!(
            "tasklog: embedded broker on {brokers} (librdkafka mock cluster, in memory): \
             the log starts empty, so the projection in Postgres was reset to match it. \
             Without --dev-broker, tasklog uses Apache Kafka (scripts/kafka start runs one)."
        );
    }
    kafka::ensure_topics(&brokers, &topics.all(), args.partitions)
        .await
        .with_context(|| {
            format!(
                "no Kafka broker answers at {brokers}: start the local one with \
                 `scripts/kafka start` (scripts/up does), point --kafka-brokers at a cluster, \
                 or pass --dev-broker for the in-memory mock"
            )
        })?;
    let state = build_api(&brokers, topics.clone(), store.clone(), &args.http).await?;
    let mut desk = state.tokens.clone();
    // A first start waits for its own projector to apply the admin token.
    desk.wait = Duration::from_secs(30);
    let auth = state.options.auth;
    let listener = api::bind(args.http.http_addr)
        .await
        .with_context(|| format!("listening on {}", args.http.http_addr))?;
    let addr = listener.local_addr()?;

    // From here on the signals are counted (until now, Ctrl-C ends the start-up at once).
    let signals = Signals::listen().context("listening for signals")?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The worker stops first (it drains through the API), then everything else.
    let (worker_stop_tx, worker_stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut scheduler_task = tokio::spawn(scheduler::run(
        scheduler_options(topics.clone(), &args.scheduling),
        store.clone(),
        Appender::new(&AppenderOptions::new(&brokers))?,
        stopped(stop_rx.clone()),
    ));
    let mut projector = tokio::spawn(projector::run_all(
        ProjectorOptions::new(&brokers, topics.clone()),
        store.clone(),
        stopped(stop_rx.clone()),
    ));
    // The admin token of this machine (made on the first start, once the projector
    // runs to apply it), which the local CLI and worker use.
    let local_token = match auth {
        AuthMode::Off => None,
        AuthMode::Tokens => {
            let dir = args
                .worker
                .state_dir
                .clone()
                .unwrap_or_else(super::tokens::state_dir);
            let made = super::tokens::ensure_local_admin(&desk, &dir).await?;
            Some(made)
        }
    };
    // Its Kafka producer must not outlive the embedded broker.
    drop(desk);
    let drain_timeout = args.worker.drain_timeout;
    let worker_task = if args.no_worker {
        None
    } else {
        // Named `local` unless told otherwise (and its ledger file with it).
        let mut resources = args.worker.clone();
        resources.name.get_or_insert_with(|| "local".into());
        let mut options = worker_options(&format!("http://{addr}"), topics.clone(), &resources)?;
        options.token = local_token.as_ref().map(|(t, _, _)| t.clone());
        let appender = Appender::new(&AppenderOptions::new(&brokers))?;
        Some((
            options.name.clone(),
            tokio::spawn(worker::run_until(
                options,
                appender,
                stopped(worker_stop_rx),
                signals.nth(2),
            )),
        ))
    };
    // Its own task: it must go on accepting connections while the worker drains
    // through it.
    let mut server = tokio::spawn(api::serve(listener, state, stopped(stop_rx)));
    println!("tasklog is up");
    println!("  API:      http://{addr}/v1/tasks");
    println!("  metrics:  http://{addr}/metrics");
    println!("  health:   http://{addr}/readyz");
    println!(
        "  kafka:    {brokers} (topics {}, {}, {}, {}, {})",
        topics.events, topics.workers, topics.services, topics.logs, topics.dlq
    );
    println!("  postgres: {}", redact(&args.db.database_url));
    match &local_token {
        Some((_, path, created)) => println!(
            "  token:    {} ({}; an admin token, mode 0600: the CLI on this machine uses it, \
             TASKLOG_TOKEN overrides; `tasklog token create` makes others)",
            path.display(),
            if *created {
                "created now"
            } else {
                "kept from an earlier start"
            }
        ),
        None => println!("  token:    none needed: authentication is OFF (--auth off)"),
    }
    match &worker_task {
        Some((name, _)) => {
            println!("  worker:   {name} (this process; `tasklog workers` lists all)")
        }
        None => println!("  worker:   none in this process (--no-worker); run `tasklog worker`"),
    }
    println!(
        "Try: tasklog run -f examples/hello.yaml, or tasklog submit -f examples/train.yaml && tasklog ls     (Ctrl-C stops)"
    );

    let failure = tokio::select! {
        _ = signals.nth(1) => None,
        result = &mut projector => Some(match result {
            Ok(Ok(())) => anyhow::anyhow!("the projector stopped"),
            Ok(Err(e)) => anyhow::Error::from(e).context("projector"),
            Err(e) => anyhow::Error::from(e).context("projector task"),
        }),
        result = &mut server => Some(match result {
            Ok(Ok(())) => anyhow::anyhow!("the HTTP server stopped"),
            Ok(Err(e)) => anyhow::Error::from(e).context("HTTP server"),
            Err(e) => anyhow::Error::from(e).context("HTTP server task"),
        }),
    };
    if failure.is_none() {
        match worker_task {
            Some(_) => eprintln!(
                "tasklog: shutting down; the worker drains for up to {} (running attempts may \
                 finish, then they are stopped and end as interruption; Ctrl-C again stops \
                 them at once)",
                humantime(drain_timeout)
            ),
            None => eprintln!("tasklog: shutting down"),
        }
    }
    let _ = worker_stop_tx.send(true);
    if let Some((_, worker)) = worker_task {
        match worker.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "worker stopped with an error"),
            Err(e) => tracing::warn!(error = %e, "worker task"),
        }
    }
    let _ = stop_tx.send(true);
    // Every Kafka client (in the scheduler, the API, the projections) is closed before
    // the embedded broker goes: a client that outlived it would log AllBrokersDown
    // until the process exits.
    let deadline = tokio::time::Instant::now() + ROLE_STOP_TIMEOUT;
    stop_role("scheduler", &mut scheduler_task, deadline).await;
    stop_role("HTTP server", &mut server, deadline).await;
    stop_role("projector", &mut projector, deadline).await;
    drop(embedded);
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Longest `tasklog up` waits for its scheduler, API and projections to stop once the
/// worker has drained; then they are ended.
const ROLE_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits until `deadline` for a role's task to end, then aborts it; either way, once
/// this returns the task is gone, and every client it held with it.
async fn stop_role<T, E: std::fmt::Display>(
    name: &str,
    task: &mut tokio::task::JoinHandle<Result<T, E>>,
    deadline: tokio::time::Instant,
) {
    match tokio::time::timeout_at(deadline, &mut *task).await {
        Ok(Ok(Ok(_))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(role = name, error = %e, "stopped with an error"),
        Ok(Err(e)) if e.is_cancelled() => {}
        Ok(Err(e)) => tracing::warn!(role = name, error = %e, "task failed"),
        Err(_) => {
            tracing::warn!(role = name, "did not stop in time; ending it");
            task.abort();
            let _ = (&mut *task).await;
        }
    }
}

/// A duration as people write it: `30s`, `2m`, `1.5s`.
fn humantime(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 60_000 == 0 && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{}ms", ms)
    }
}

pub(super) async fn dev_broker(args: DevBrokerArgs) -> anyhow::Result<()> {
    let topics = topics_for(&args.topic_prefix)?;
    let broker = Arc::new(
        DevBroker::start(&DevBrokerOptions {
            listen: args.listen,
            partitions: args.partitions,
            topics: topics.all().into_iter().map(|t| t.name).collect(),
        })
        .await?,
    );
    let admin_addr = match args.admin_listen {
        None => None,
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("admin listener on {addr}"))?;
            let local = listener.local_addr()?;
            let app = axum::Router::new()
                .route(
                    "/broker/down",
                    post(|State(b): State<Arc<DevBroker>>| async move {
                        b.set_reachable(false);
                        Json(serde_json::json!({"reachable": false}))
                    }),
                )
                .route(
                    "/broker/up",
                    post(|State(b): State<Arc<DevBroker>>| async move {
                        b.set_reachable(true);
                        Json(serde_json::json!({"reachable": true}))
                    }),
                )
                .route("/topics", post(create_topic))
                .with_state(broker.clone());
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            Some(local)
        }
    };
    // One parseable line for scripts and tests, then a human one.
    match admin_addr {
        Some(a) => println!(
            "tasklog dev-broker listening on {} admin {a}",
            broker.addr()
        ),
        None => println!("tasklog dev-broker listening on {}", broker.addr()),
    }
    println!(
        "librdkafka mock cluster, in memory; topics {} and {} with {} partitions. Ctrl-C stops (and forgets everything).",
        topics.events, topics.dlq, args.partitions
    );
    shutdown_signal().await;
    Ok(())
}

#[derive(serde::Deserialize)]
struct NewTopicBody {
    name: String,
    partitions: i32,
}

async fn create_topic(
    State(broker): State<Arc<DevBroker>>,
    Json(body): Json<NewTopicBody>,
) -> Result<Json<serde_json::Value>, api::ApiError> {
    if body.name.is_empty() || !(1..=1000).contains(&body.partitions) {
        return Err(api::ApiError::bad_request(
            "invalid_topic",
            "name must be non-empty and partitions 1..=1000",
        ));
    }
    broker
        .create_topic(&body.name, body.partitions)
        .map_err(|e| api::ApiError::bad_request("invalid_topic", e.to_string()))?;
    Ok(Json(
        serde_json::json!({"name": body.name, "partitions": body.partitions}),
    ))
}

pub(super) async fn server(args: ServerArgs) -> anyhow::Result<()> {
    let store = open_store(&args.db).await?;
    let topics = topics_for(&args.kafka.topic_prefix)?;
    kafka::ensure_topics(&args.kafka.brokers, &topics.all(), args.kafka.partitions).await?;
    let state = build_api(&args.kafka.brokers, topics, store, &args.http).await?;
    let listener = api::bind(args.http.http_addr)
        .await
        .with_context(|| format!("listening on {}", args.http.http_addr))?;
    println!(
        "tasklog server listening on http://{}",
        listener.local_addr()?
    );
    api::serve(listener, state, shutdown_signal()).await?;
    Ok(())
}

pub(super) async fn projector(args: ProjectorArgs) -> anyhow::Result<()> {
    let store = open_store(&args.db).await?;
    let topics = topics_for(&args.kafka.topic_prefix)?;
    kafka::ensure_topics(&args.kafka.brokers, &topics.all(), args.kafka.partitions).await?;
    if args.rebuild {
        store.reset_projection().await?;
        eprintln!("tasklog projector: projection deleted; rebuilding from offset 0");
    }
    serve_metrics(args.metrics_addr).await?;
    let mut options = ProjectorOptions::new(&args.kafka.brokers, topics);
    if let Some(group) = args.group {
        options.group_id = group;
    }
    options.session_timeout = Duration::from_millis(args.session_timeout_ms);
    println!("tasklog projector started");
    projector::run_all(options, store, shutdown_signal()).await?;
    Ok(())
}

/// Serves `/metrics` and `/healthz` on `addr`, if given (roles without the API).
async fn serve_metrics(addr: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    let Some(addr) = addr else {
        return Ok(());
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("metrics listener on {addr}"))?;
    let app = axum::Router::new()
        .route("/metrics", get(|| async { crate::metrics::render() }))
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(())
}

fn scheduler_options(topics: Topics, args: &SchedulingArgs) -> SchedulerOptions {
    let mut options = SchedulerOptions::new(topics);
    options.aging_per_minute = args.aging_per_minute.max(0.0);
    options.worker_timeout = args.worker_timeout;
    options.no_capacity_after = args.no_capacity_after;
    options
}

fn worker_options(
    api_url: &str,
    topics: Topics,
    args: &WorkerResourceArgs,
) -> anyhow::Result<WorkerOptions> {
    let mut options = WorkerOptions::new(api_url, topics);
    if let Some(name) = &args.name {
        options.name = name.clone();
    }
    if let Some(dir) = &args.state_dir {
        options.ledger = Some(dir.join(format!("worker-{}.attempts", options.name)));
    }
    options.watchdog = match std::env::current_exe() {
        Ok(exe) => Some(exe),
        Err(e) => {
            tracing::warn!(error = %e, "worker: cannot locate the tasklog binary for its watchdog");
            None
        }
    };
    if let Some(cpu) = args.cpu {
        anyhow::ensure!(
            cpu > 0.0 && cpu.is_finite(),
            "--cpu must be a positive number of cores"
        );
        options.capacity.cpu = cpu;
    }
    if let Some(memory) = &args.memory {
        options.capacity.memory =
            crate::events::spec::parse_size(&serde_json::Value::String(memory.clone()))
                .map_err(|e| anyhow::anyhow!("--memory: {e}"))?;
    }
    // What the registered event's schema allows: more would be refused on the log, and
    // the worker would never become active.
    anyhow::ensure!(args.gpu <= 1024, "--gpu must be at most 1024");
    options.capacity.gpu = args.gpu;
    for label in &args.labels {
        let (k, v) = label
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .with_context(|| format!("--label {label:?} is not k=v"))?;
        options.labels.insert(k.to_string(), v.to_string());
    }
    for p in &args.projects {
        anyhow::ensure!(
            crate::events::auth::valid_grant_project(p),
            "--project {p:?} is not a project (lowercase letters, digits, - and _; or *)"
        );
    }
    options.projects = args.projects.clone();
    options.heartbeat = args.heartbeat;
    options.kill_grace = args.kill_grace;
    options.drain_timeout = args.drain_timeout;
    Ok(options)
}

pub(super) async fn scheduler(args: SchedulerArgs) -> anyhow::Result<()> {
    let store = open_store(&args.db).await?;
    let topics = topics_for(&args.kafka.topic_prefix)?;
    kafka::ensure_topics(&args.kafka.brokers, &topics.all(), args.kafka.partitions).await?;
    serve_metrics(args.metrics_addr).await?;
    let appender = Appender::new(&AppenderOptions::new(&args.kafka.brokers))?;
    println!("tasklog scheduler started (standing by until it holds the leader lock)");
    scheduler::run(
        scheduler_options(topics, &args.scheduling),
        store,
        appender,
        shutdown_signal(),
    )
    .await?;
    Ok(())
}

pub(super) async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let topics = topics_for(&args.kafka.topic_prefix)?;
    let mut options = worker_options(&args.api.url, topics, &args.resources)?;
    options.token = super::tokens::client_token(&args.api);
    if let Some(token) = &options.token {
        options.projects =
            worker::projects_for_token(&args.api.url, token, &options.projects).await?;
    }
    serve_metrics(args.metrics_addr).await?;
    let appender = Appender::new(&AppenderOptions::new(&args.kafka.brokers))?;
    let signals = Signals::listen().context("listening for signals")?;
    println!(
        "tasklog worker {} started: cpu {}, memory {} bytes, gpu {}, labels {:?}",
        options.name,
        options.capacity.cpu,
        options.capacity.memory,
        options.capacity.gpu,
        options.labels
    );
    worker::run_until(options, appender, signals.nth(1), signals.nth(2)).await
}
