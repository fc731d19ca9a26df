//! The `tasklog` command line: servers (`up`, `dev-broker`, `server`, `projector`,
//! `scheduler`, `worker`), client commands (`submit`, `run`, `get`, `ls`, `events`,
//! `cancel`, `logs`, `workers`) and benchmarks.

mod audit;
mod client;
mod replay;
mod servers;
mod tokens;

pub use client::parse_spec_text;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::kafka::{DEFAULT_BROKERS, DEFAULT_PARTITIONS};
use crate::store::DEFAULT_DATABASE_URL;

/// tasklog: event-sourced job orchestration and tracking on Kafka and Postgres.
#[derive(Debug, Parser)]
#[command(name = "tasklog", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run everything in one process: the API, the projections, the scheduler and a
    /// worker, against Kafka (`scripts/kafka start` runs one locally; --dev-broker runs
    /// the in-memory mock instead).
    Up(UpArgs),
    /// Run the embedded development broker (librdkafka's in-memory mock cluster).
    DevBroker(DevBrokerArgs),
    /// Run the HTTP API.
    Server(ServerArgs),
    /// Run the projector (events topic -> Postgres, exactly once).
    Projector(ProjectorArgs),
    /// Run the scheduler (one leader at a time; others stand by).
    Scheduler(SchedulerArgs),
    /// Run a worker agent: registers, takes assignments, runs them as processes.
    Worker(WorkerArgs),
    /// The worker's companion that stops its attempts if it dies (started by the
    /// worker itself, reading its stdin).
    #[command(name = crate::worker::watchdog::SUBCOMMAND, hide = true)]
    WorkerWatchdog(WorkerWatchdogArgs),
    /// List workers with their state, capacity and what they run.
    Workers(WorkersArgs),
    /// Submit a task, follow its logs, and exit with its exit code.
    Run(RunArgs),
    /// Services: replicas of a task kept at their count, with probes.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Submit a task from a YAML or JSON file; prints its id.
    Submit(SubmitArgs),
    /// Show one task.
    Get(GetArgs),
    /// List tasks, newest first.
    Ls(LsArgs),
    /// Show a task's event history.
    Events(EventsArgs),
    /// Show every event of a trace across tasks, with each task's timing (a trace id,
    /// or a task id for the trace it was submitted in).
    Trace(TraceArgs),
    /// Cancel a task.
    Cancel(CancelArgs),
    /// Print a task's log lines (from Kafka, paged by offset cursors).
    Logs(LogsArgs),
    /// Benchmarks that print their figures beside raw Kafka and Postgres baselines.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Replay the log: verify the projection against it.
    #[command(subcommand)]
    Replay(replay::ReplayCommand),
    /// Audit the log: tamper-evident exports and their verification.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// API tokens: create (the bootstrap, on a host with the database and broker
    /// settings and no token), list, revoke.
    #[command(subcommand)]
    Token(tokens::TokenCommand),
}

/// Kafka settings shared by the server roles.
#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers.
    #[arg(long = "kafka-brokers", env = "TASKLOG_KAFKA_BROKERS", default_value = DEFAULT_BROKERS)]
    pub brokers: String,
    /// Prefix of the topic names (<prefix>.events, <prefix>.dlq).
    #[arg(long, env = "TASKLOG_TOPIC_PREFIX", default_value = "tasklog")]
    pub topic_prefix: String,
    /// Partitions of topics tasklog creates.
    #[arg(long, env = "TASKLOG_PARTITIONS", default_value_t = DEFAULT_PARTITIONS)]
    pub partitions: i32,
}

/// Postgres settings shared by the server roles.
#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// Postgres URL.
    #[arg(long, env = "TASKLOG_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,
    /// Connections in the pool.
    #[arg(long, env = "TASKLOG_DATABASE_POOL", default_value_t = 16)]
    pub database_pool: usize,
}

/// API settings.
#[derive(Debug, Clone, Args)]
pub struct HttpArgs {
    /// Address of the HTTP API.
    #[arg(long, env = "TASKLOG_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// How long an append may wait for the broker before the API answers 503.
    #[arg(long, env = "TASKLOG_APPEND_TIMEOUT_MS", default_value_t = 10_000)]
    pub append_timeout_ms: u64,
    /// How long a read about one task, service or worker waits for the projection to
    /// catch up with the log before the API answers 503 `projection_lagging`.
    #[arg(long, env = "TASKLOG_READ_WAIT_MS", default_value_t = 5_000)]
    pub read_wait_ms: u64,
    /// Longest `wait_ms` a reader may ask for (long-polls, read-your-writes waits).
    #[arg(long, env = "TASKLOG_MAX_WAIT_MS", default_value_t = 60_000)]
    pub max_wait_ms: u64,
    /// Most log followers (SSE streams and follow long-polls) at once; past it, a new
    /// one is answered 503 `too_many_followers`.
    #[arg(long, env = "TASKLOG_MAX_FOLLOWERS", default_value_t = crate::logs::follow::DEFAULT_MAX_FOLLOWERS)]
    pub max_followers: usize,
    /// `tokens`: every request needs a bearer token. `off`: none does (local
    /// experiments only; refused on anything but loopback).
    #[arg(long, env = "TASKLOG_AUTH", default_value = "tokens", value_parser = ["tokens", "off"])]
    pub auth: String,
    /// Whether /metrics needs a token: `open` (default on loopback), `token`, or
    /// `auto` (open on loopback, token otherwise).
    #[arg(long, env = "TASKLOG_METRICS_AUTH", default_value = "auto", value_parser = ["auto", "open", "token"])]
    pub metrics_auth: String,
}

#[derive(Debug, Args)]
struct UpArgs {
    /// Kafka bootstrap servers (default: the local Apache Kafka of `scripts/kafka start`).
    #[arg(long = "kafka-brokers", env = "TASKLOG_KAFKA_BROKERS", default_value = DEFAULT_BROKERS)]
    brokers: String,
    /// Run librdkafka's in-memory mock cluster in this process instead of using Kafka: a
    /// JVM-free look. Nothing survives a restart, it keeps only the last 5 MiB of each
    /// partition, and the projection in Postgres is reset at start to match its empty log.
    #[arg(long)]
    dev_broker: bool,
    /// Where the in-memory mock listens (with --dev-broker).
    #[arg(long, env = "TASKLOG_DEV_BROKER_ADDR", default_value = DEFAULT_BROKERS)]
    dev_broker_addr: SocketAddr,
    /// Prefix of the topic names.
    #[arg(long, env = "TASKLOG_TOPIC_PREFIX", default_value = "tasklog")]
    topic_prefix: String,
    /// Partitions of topics tasklog creates.
    #[arg(long, env = "TASKLOG_PARTITIONS", default_value_t = DEFAULT_PARTITIONS)]
    partitions: i32,
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    http: HttpArgs,
    #[command(flatten)]
    scheduling: SchedulingArgs,
    /// Do not run a worker in this process (run `tasklog worker` elsewhere).
    #[arg(long)]
    no_worker: bool,
    #[command(flatten)]
    worker: WorkerResourceArgs,
}

/// How the scheduler orders and gives up.
#[derive(Debug, Clone, Args)]
pub struct SchedulingArgs {
    /// Effective priority a queued task gains per minute waited (0: strict priority).
    #[arg(long, env = "TASKLOG_AGING_PER_MINUTE", default_value_t = 1.0)]
    pub aging_per_minute: f64,
    /// A worker with no heartbeat for this long is lost (e.g. 30s).
    #[arg(long, env = "TASKLOG_WORKER_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub worker_timeout: std::time::Duration,
    /// How long a task no live worker could ever fit waits before failing with no_capacity.
    #[arg(long, env = "TASKLOG_NO_CAPACITY_AFTER", default_value = "10s", value_parser = parse_duration)]
    pub no_capacity_after: std::time::Duration,
}

/// What a worker offers and how it behaves.
#[derive(Debug, Clone, Args)]
pub struct WorkerResourceArgs {
    /// Worker id (default: the hostname). Letters, digits and ._:@-.
    #[arg(long, env = "TASKLOG_WORKER_NAME")]
    pub name: Option<String>,
    /// Cores offered (default: all of this machine's).
    #[arg(long, env = "TASKLOG_WORKER_CPU")]
    pub cpu: Option<f64>,
    /// Memory offered, e.g. 8GiB (default: this machine's).
    #[arg(long, env = "TASKLOG_WORKER_MEMORY")]
    pub memory: Option<String>,
    /// GPUs offered.
    #[arg(long, env = "TASKLOG_WORKER_GPU", default_value_t = 0)]
    pub gpu: u32,
    /// A label tasks can require (k=v); repeatable.
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// A project whose tasks it runs (repeatable; `*` for all). Default: the projects
    /// its token reaches (every project without authentication, or in `tasklog up`).
    #[arg(long = "project")]
    pub projects: Vec<String>,
    /// Interval between heartbeats.
    #[arg(long, env = "TASKLOG_HEARTBEAT", default_value = "5s", value_parser = parse_duration)]
    pub heartbeat: std::time::Duration,
    /// Where the worker records its running attempts, so that after a crash the next
    /// run stops the ones left behind (default: $XDG_STATE_HOME/tasklog or
    /// ~/.local/state/tasklog).
    #[arg(long, env = "TASKLOG_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Time between SIGTERM and SIGKILL when stopping an attempt.
    #[arg(long, env = "TASKLOG_KILL_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub kill_grace: std::time::Duration,
    /// On SIGTERM or Ctrl-C, how long running attempts may go on finishing by
    /// themselves; then they are stopped (SIGTERM, SIGKILL after --kill-grace) and end
    /// as `interruption`, so their retry policies place them elsewhere. A second
    /// signal stops them at once.
    #[arg(long, env = "TASKLOG_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: std::time::Duration,
}

/// Parses a duration such as `500ms`, `30s`, `2m`.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    crate::events::spec::parse_duration_ms(s)
        .map(std::time::Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is not a duration such as 500ms, 30s, 5m"))
}

#[derive(Debug, Args)]
struct SchedulerArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    scheduling: SchedulingArgs,
    /// Where to serve /metrics and /healthz (none: not served).
    #[arg(long, env = "TASKLOG_SCHEDULER_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
}

#[derive(Debug, Args)]
struct WorkerArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    api: ApiArgs,
    #[command(flatten)]
    resources: WorkerResourceArgs,
    /// Where to serve /metrics and /healthz (none: not served).
    #[arg(long, env = "TASKLOG_WORKER_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
}

#[derive(Debug, Args)]
struct WorkersArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Task spec file (YAML or JSON); `-` reads standard input.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Idempotency key: rerunning with the same key follows the same task.
    #[arg(long)]
    key: Option<String>,
    #[command(flatten)]
    api: ApiArgs,
}

/// `tasklog service ...`
#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Create a service from a YAML or JSON file ({name, replicas, template, retry, probe}).
    Up {
        /// The service file; `-` reads standard input.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List services with their status.
    Ls {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one service with its replicas.
    Get {
        /// Service name.
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Change the replica count.
    Scale {
        /// Service name.
        name: String,
        /// Replicas wanted.
        replicas: u32,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Stop every replica.
    Stop {
        /// Service name.
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Debug, Args)]
struct WorkerWatchdogArgs {
    /// Time between SIGTERM and SIGKILL for the attempts it stops.
    #[arg(long, default_value_t = 10_000)]
    grace_ms: u64,
}

#[derive(Debug, Args)]
struct DevBrokerArgs {
    /// Address to serve the Kafka API on (port 0: any free port).
    #[arg(long, default_value = DEFAULT_BROKERS)]
    listen: SocketAddr,
    /// Partitions of the topics created at start.
    #[arg(long, env = "TASKLOG_PARTITIONS", default_value_t = DEFAULT_PARTITIONS)]
    partitions: i32,
    /// Prefix of the topics created at start.
    #[arg(long, env = "TASKLOG_TOPIC_PREFIX", default_value = "tasklog")]
    topic_prefix: String,
    /// Optional control API (POST /broker/down, /broker/up, /topics) for tests.
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
}

#[derive(Debug, Args)]
struct ServerArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    http: HttpArgs,
}

#[derive(Debug, Args)]
struct ProjectorArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    db: DbArgs,
    /// Consumer group (default: tasklog-projector, or <prefix>-projector with another topic prefix;
    /// the other projections' groups derive from it).
    #[arg(long, env = "TASKLOG_PROJECTOR_GROUP")]
    group: Option<String>,
    /// Where to serve /metrics and /healthz (none: not served).
    #[arg(long, env = "TASKLOG_PROJECTOR_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Delete the projection and rebuild it from offset 0.
    #[arg(long)]
    rebuild: bool,
    /// Consumer group session timeout: how soon a dead projector's partitions move.
    #[arg(long, default_value_t = 10_000)]
    session_timeout_ms: u64,
}

/// Where the API is, for client commands.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// Base URL of the tasklog API.
    #[arg(
        long = "api",
        env = "TASKLOG_API_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    /// Bearer token (default: the one `tasklog up` keeps in the state directory).
    #[arg(long, env = "TASKLOG_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Debug, Args)]
struct SubmitArgs {
    /// Task spec file (YAML or JSON); `-` reads standard input.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Idempotency key: resubmitting with the same key returns the same task.
    #[arg(long)]
    key: Option<String>,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Debug, Args)]
struct GetArgs {
    /// Task id.
    id: String,
    /// Wait up to this long for the task to appear.
    #[arg(long, default_value_t = 0)]
    wait_ms: u64,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Debug, Args)]
struct LsArgs {
    /// Only tasks in this state.
    #[arg(long)]
    state: Option<String>,
    /// Only tasks of this type.
    #[arg(long = "type")]
    task_type: Option<String>,
    /// Only tasks with this label (k=v); repeatable.
    #[arg(long)]
    label: Vec<String>,
    /// Most tasks to show.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Debug, Args)]
struct EventsArgs {
    /// Task id.
    id: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Debug, Args)]
struct TraceArgs {
    /// Trace id (32 hex characters), or a task id.
    id: String,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Debug, Args)]
struct CancelArgs {
    /// Task id.
    id: String,
    /// Reason recorded on the event.
    #[arg(long)]
    reason: Option<String>,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Debug, Args)]
struct LogsArgs {
    /// Task id (or, with --label or --service, none: every matching task).
    #[arg(required_unless_present_any = ["label", "service"])]
    id: Option<String>,
    /// Keep printing new lines until the task ends.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Follow every unfinished task with this label (`key=value`; repeat for several),
    /// and every matching task submitted later, each line prefixed with its task
    /// (like `kubectl logs -l`), until interrupted.
    #[arg(short = 'l', long = "label", conflicts_with = "id")]
    label: Vec<String>,
    /// Follow every replica of this service (current and later ones), prefixed.
    #[arg(long, conflicts_with = "id")]
    service: Option<String>,
    /// Start with the last N lines.
    #[arg(long)]
    tail: Option<usize>,
    /// Only this attempt.
    #[arg(long)]
    attempt: Option<u32>,
    /// Only this stream (stdout, stderr).
    #[arg(long)]
    stream: Option<String>,
    /// Print JSON lines (with offsets and line numbers) instead of the text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Submission and projection throughput and latency.
    Submit(crate::bench::SubmitBenchArgs),
    /// Log ingest, page latency and full-read time.
    Logs(crate::bench::LogsBenchArgs),
    /// Submit-to-running latency and the time of one scheduling pass.
    Schedule(crate::bench::ScheduleBenchArgs),
    /// `replay verify`'s rate beside the raw consume rate of the same topic.
    Replay(crate::bench::ReplayBenchArgs),
    /// Many log followers on one API server: delivery latency, its threads and CPU,
    /// submission latency while they follow.
    Follow(crate::bench::follow::FollowBenchArgs),
}

/// Parses the command line and runs it. Returns the process exit code.
pub async fn run() -> i32 {
    let cli = Cli::parse();
    // The roles export spans when an OTLP endpoint is configured.
    let role = match &cli.command {
        Command::Up(_) => Some("tasklog"),
        Command::Server(_) => Some("tasklog-api"),
        Command::Projector(_) => Some("tasklog-projector"),
        Command::Scheduler(_) => Some("tasklog-scheduler"),
        Command::Worker(_) => Some("tasklog-worker"),
        _ => None,
    };
    if let Some(role) = role {
        match crate::otlp::init(role) {
            Ok(true) => tracing::info!(service = role, "exporting spans over OTLP"),
            Ok(false) => {}
            Err(e) => {
                eprintln!("error: {e}");
                return 1;
            }
        }
    }
    let result = match cli.command {
        Command::Up(a) => servers::up(a).await,
        Command::DevBroker(a) => servers::dev_broker(a).await,
        Command::Server(a) => servers::server(a).await,
        Command::Projector(a) => servers::projector(a).await,
        Command::Scheduler(a) => servers::scheduler(a).await,
        Command::Worker(a) => servers::worker(a).await,
        Command::WorkerWatchdog(a) => {
            let grace = std::time::Duration::from_millis(a.grace_ms);
            tokio::task::spawn_blocking(move || {
                crate::worker::watchdog::watch(std::io::stdin().lock(), grace)
            })
            .await
            .map(|_| ())
            .map_err(anyhow::Error::from)
        }
        Command::Workers(a) => client::workers(a).await,
        Command::Service(c) => client::service(c).await,
        Command::Run(a) => match client::run(a).await {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
        Command::Submit(a) => client::submit(a).await,
        Command::Get(a) => client::get(a).await,
        Command::Ls(a) => client::ls(a).await,
        Command::Events(a) => client::events(a).await,
        Command::Trace(a) => client::trace(a).await,
        Command::Cancel(a) => client::cancel(a).await,
        Command::Logs(a) => client::logs(a).await,
        Command::Replay(c) => replay::run(c).await,
        Command::Audit(c) => audit::run(c).await,
        Command::Token(c) => tokens::run(c).await,
        Command::Bench(BenchCommand::Submit(a)) => crate::bench::submit(a).await,
        Command::Bench(BenchCommand::Logs(a)) => crate::bench::logs(a).await,
        Command::Bench(BenchCommand::Schedule(a)) => crate::bench::schedule(a).await,
        Command::Bench(BenchCommand::Replay(a)) => crate::bench::replay(a).await,
        Command::Bench(BenchCommand::Follow(a)) => crate::bench::follow::run(a).await,
    };
    crate::otlp::shutdown();
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

/// Counts the SIGINT (Ctrl-C) and SIGTERM signals the process gets, from the moment
/// it is made: the first asks a role to stop gracefully, a second to hurry, and a
/// third ends the process at once.
#[derive(Clone)]
pub struct Signals {
    count: tokio::sync::watch::Receiver<u32>,
}

/// Exit status of a process ended at once by a third signal (128 + SIGINT).
const FORCED_EXIT: i32 = 130;

impl Signals {
    /// Starts counting. Must be called inside a Tokio runtime.
    pub fn listen() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let (tx, count) = tokio::sync::watch::channel(0u32);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(()) = interrupt.recv() => {}
                    Some(()) = terminate.recv() => {}
                    else => return,
                }
                let n = *tx.borrow() + 1;
                tx.send_replace(n);
                if n >= 3 {
                    eprintln!("tasklog: third signal; exiting at once");
                    std::process::exit(FORCED_EXIT);
                }
            }
        });
        Ok(Signals { count })
    }

    /// Resolves once `n` signals have arrived (at once if they already have).
    pub fn nth(&self, n: u32) -> impl Future<Output = ()> + Send + 'static {
        let mut count = self.count.clone();
        async move {
            if count.wait_for(|c| *c >= n).await.is_err() {
                // The counter is gone (cannot happen while the runtime runs): never.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Resolves when the process gets Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
