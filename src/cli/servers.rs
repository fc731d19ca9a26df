//! The long-running roles.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Json;
use axum::extract::State;
use axum::routing::{get, post};

use super::{DbArgs, DevBrokerArgs, HttpArgs, ProjectorArgs, ServerArgs, UpArgs, shutdown_signal};
use crate::api::{self, ApiOptions, AppState};
use crate::kafka::dev_broker::{DevBroker, DevBrokerOptions};
use crate::kafka::{self, Appender, AppenderOptions, Topics};
use crate::projector::{self, ProjectorOptions};
use crate::store::{self, Store};

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
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// Topic names for `prefix`; `TASKLOG_LOGS_RETENTION` (e.g. `7d`, `36h`) sets the logs
/// topic's retention when tasklog creates it.
pub(crate) fn topics_for(prefix: &str) -> Topics {
    let mut topics = Topics::with_prefix(prefix);
    if let Ok(value) = std::env::var("TASKLOG_LOGS_RETENTION") {
        match crate::events::spec::parse_duration_ms(&value) {
            Some(ms) if ms > 0 => topics.logs_retention_ms = ms as i64,
            _ => {
                tracing::warn!(%value, "TASKLOG_LOGS_RETENTION is not a duration such as 7d; keeping 7 days")
            }
        }
    }
    topics
}

async fn events_partitions(brokers: &str, topics: &Topics) -> anyhow::Result<i32> {
    kafka::list_topics(brokers)
        .await?
        .into_iter()
        .find(|(name, _)| *name == topics.events)
        .map(|(_, n)| n)
        .with_context(|| format!("topic {} not found", topics.events))
}

pub(crate) async fn build_api(
    brokers: &str,
    topics: Topics,
    store: Store,
    http: &HttpArgs,
) -> anyhow::Result<Arc<AppState>> {
    kafka::ensure_topics(brokers, &topics.all(), kafka::DEFAULT_PARTITIONS).await?;
    let partitions = events_partitions(brokers, &topics).await?;
    let mut appender_options = AppenderOptions::new(brokers);
    appender_options.timeout = Duration::from_millis(http.append_timeout_ms.max(1));
    let appender = Appender::new(&appender_options)?;
    let log_partitions = kafka::list_topics(brokers)
        .await?
        .into_iter()
        .find(|(name, _)| *name == topics.logs)
        .map(|(_, n)| n)
        .unwrap_or(partitions);
    let cursor_key = crate::logs::CursorKey::new(store.cursor_key().await?);
    let mut options = ApiOptions::new(brokers, topics, partitions);
    options.log_partitions = log_partitions;
    Ok(AppState::new(store, appender, options, cursor_key))
}

pub(super) async fn up(args: UpArgs) -> anyhow::Result<()> {
    let topics = topics_for(&args.topic_prefix);
    let mut _embedded = None;
    let brokers = match &args.brokers {
        Some(b) => b.clone(),
        None => {
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
            _embedded = Some(broker);
            addr
        }
    };
    let store = open_store(&args.db).await?;
    if _embedded.is_some() {
        store.reset_projection().await?;
        eprintln!(
            "tasklog: embedded broker on {brokers} (librdkafka mock cluster, in memory): \
             the log starts empty, so the projection in Postgres was reset to match it. \
             Use --kafka-brokers (or TASKLOG_KAFKA_BROKERS) for a durable Kafka cluster."
        );
    }
    kafka::ensure_topics(&brokers, &topics.all(), args.partitions).await?;
    let state = build_api(&brokers, topics.clone(), store.clone(), &args.http).await?;
    let listener = api::bind(args.http.http_addr)
        .await
        .with_context(|| format!("listening on {}", args.http.http_addr))?;
    let addr = listener.local_addr()?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut projector_stop = stop_rx.clone();
    let projector = tokio::spawn(projector::run_all(
        ProjectorOptions::new(&brokers, topics.clone()),
        store,
        async move {
            let _ = projector_stop.wait_for(|s| *s).await;
        },
    ));
    println!("tasklog is up");
    println!("  API:      http://{addr}/v1/tasks");
    println!("  metrics:  http://{addr}/metrics");
    println!("  health:   http://{addr}/readyz");
    println!(
        "  kafka:    {brokers} (topics {}, {}, {})",
        topics.events, topics.logs, topics.dlq
    );
    println!("  postgres: {}", redact(&args.db.database_url));
    println!(
        "Try: tasklog submit -f examples/hello.yaml && tasklog ls && tasklog logs <id> -f     (Ctrl-C stops)"
    );

    let mut server_stop = stop_rx;
    let server = api::serve(listener, state, async move {
        let _ = server_stop.wait_for(|s| *s).await;
    });
    let mut projector = std::pin::pin!(projector);
    let mut server = std::pin::pin!(server);
    tokio::select! {
        _ = shutdown_signal() => {}
        result = &mut projector => {
            result.context("projector task")??;
            anyhow::bail!("the projector stopped");
        }
        result = &mut server => {
            result.context("HTTP server")?;
        }
    }
    eprintln!("tasklog: shutting down");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let _ = (&mut server).await;
        let _ = (&mut projector).await;
    })
    .await;
    Ok(())
}

pub(super) async fn dev_broker(args: DevBrokerArgs) -> anyhow::Result<()> {
    let topics = topics_for(&args.topic_prefix);
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
    let topics = topics_for(&args.kafka.topic_prefix);
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
    let topics = topics_for(&args.kafka.topic_prefix);
    kafka::ensure_topics(&args.kafka.brokers, &topics.all(), args.kafka.partitions).await?;
    if args.rebuild {
        store.reset_projection().await?;
        eprintln!("tasklog projector: projection deleted; rebuilding from offset 0");
    }
    if let Some(addr) = args.metrics_addr {
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
    }
    let mut options = ProjectorOptions::new(&args.kafka.brokers, topics);
    options.group_id = args.group;
    options.session_timeout = Duration::from_millis(args.session_timeout_ms);
    println!("tasklog projector started");
    projector::run_all(options, store, shutdown_signal()).await?;
    Ok(())
}
