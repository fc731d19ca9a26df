//! The worker agent: registers, heartbeats, receives its assignments by long-polling
//! the API, and runs each attempt as a child process ([`process`]), streaming every
//! line to the logs topic through the [`LogWriter`].
//!
//! The agent posts its own worker events (`registered`, `heartbeat`, `draining`) to the
//! API, which checks that its token may act as this worker and appends them to the
//! workers topic (so a worker needs to write only the logs topic on Kafka). It reports
//! attempts to the API (`start`, `finish`), which appends
//! the task events with the task's next seq and retries a lost seq race; a report the
//! fold no longer accepts (the attempt was cancelled or reassigned meanwhile) answers
//! 409, and the agent stops the process.
//!
//! Ordering that matters: every log line of an attempt is acknowledged by the broker
//! before the attempt's outcome is reported, so a finished task's log is complete.

pub mod ledger;
pub mod probe;
pub mod process;
pub mod watchdog;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::events::trace::TraceContext;
use crate::events::worker::{LastKnown, WorkerCapacity, WorkerEvent, WorkerInfo, WorkerPayload};
use crate::events::{TaskSpec, TaskStatus};
use crate::kafka::{Appender, Topics};
use crate::logs::{LogWriter, LogWriterOptions, Stream};
use crate::metrics::metrics;
use process::{EndedBy, Launch, OutputStream};

/// Default of [`WorkerOptions::drain_timeout`].
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Once the attempts have been stopped (or the drain is over), how long the agent still
/// waits for their outcomes to be reported before it exits without them (the scheduler
/// then ends them as interrupted once it declares this worker lost).
const REPORT_GRACE: Duration = Duration::from_secs(5);

/// Settings of a worker agent.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Worker id: unique among workers, stable across restarts of the same machine.
    pub name: String,
    /// What it offers.
    pub capacity: WorkerCapacity,
    /// Labels tasks can require.
    pub labels: BTreeMap<String, String>,
    /// Base URL of the tasklog API.
    pub api_url: String,
    /// Topics.
    pub topics: Topics,
    /// Interval between heartbeats.
    pub heartbeat: Duration,
    /// Time between SIGTERM and SIGKILL when an attempt is cancelled, times out or is
    /// stopped at the end of a drain.
    pub kill_grace: Duration,
    /// After the shutdown signal, how long running attempts may go on finishing by
    /// themselves before they are stopped and end as `interruption`.
    pub drain_timeout: Duration,
    /// How long one assignments long-poll waits.
    pub poll_wait: Duration,
    /// `ce_source` of its events.
    pub source: String,
    /// Where it records running attempts, to stop leftovers after a crash (default:
    /// [`ledger::Ledger::default_path`] of its name).
    pub ledger: Option<std::path::PathBuf>,
    /// The tasklog binary, run as its [`watchdog`] (`tasklog worker-watchdog`), which
    /// stops the attempts if the worker dies without stopping them; `None`: no
    /// watchdog (then only a restart stops such leftovers).
    pub watchdog: Option<std::path::PathBuf>,
    /// Bearer token for the API (a worker token named after this worker, or an admin's).
    pub token: Option<String>,
    /// Projects whose tasks it runs (empty: every project).
    pub projects: Vec<String>,
}

impl WorkerOptions {
    /// Defaults: this machine's hostname, cores and memory, no gpu.
    pub fn new(api_url: &str, topics: Topics) -> WorkerOptions {
        let host = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "localhost".into());
        WorkerOptions {
            name: host.clone(),
            capacity: WorkerCapacity {
                cpu: std::thread::available_parallelism()
                    .map(|n| n.get() as f64)
                    .unwrap_or(1.0),
                memory: machine_memory().unwrap_or(1 << 30),
                gpu: 0,
            },
            labels: BTreeMap::new(),
            api_url: api_url.to_string(),
            topics,
            heartbeat: Duration::from_secs(5),
            kill_grace: Duration::from_secs(10),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            poll_wait: Duration::from_secs(20),
            source: format!("tasklog://{host}/worker"),
            ledger: None,
            watchdog: None,
            token: None,
            projects: Vec::new(),
        }
    }
}

/// The ledger `options` ask for, with its watchdog started (if one is asked for and it
/// starts).
fn attempt_ledger(options: &WorkerOptions) -> ledger::Ledger {
    let ledger = ledger::Ledger::new(
        options
            .ledger
            .clone()
            .unwrap_or_else(|| ledger::Ledger::default_path(&options.name)),
    );
    let Some(program) = &options.watchdog else {
        return ledger;
    };
    match watchdog::Watchdog::spawn(program, options.kill_grace) {
        Ok(watchdog) => {
            tracing::info!(pid = watchdog.pid(), "worker: watchdog started");
            ledger.with_watchdog(watchdog)
        }
        Err(e) => {
            tracing::warn!(program = %program.display(), error = %e, "worker: cannot start the watchdog; a crash of this worker would leave its attempts running until it restarts");
            ledger
        }
    }
}

/// Total memory of this machine, from `/proc/meminfo`.
pub fn machine_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub use crate::events::worker::valid_worker_id;

/// The projects a worker with `token` serves: `asked` (each of which the token must
/// reach), or when none are asked the token's own (none, meaning every project, for
/// a token that reaches them all). Asks the API who the token is, waiting up to a
/// minute for the API to answer.
pub async fn projects_for_token(
    api_url: &str,
    token: &str,
    asked: &[String],
) -> anyhow::Result<Vec<String>> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .default_headers(bearer_headers(Some(token))?)
        .build()?;
    let url = format!("{}/v1/whoami", api_url.trim_end_matches('/'));
    let deadline = Instant::now() + Duration::from_secs(60);
    let me: Value = loop {
        match http.get(&url).send().await {
            Ok(r) if r.status().is_success() => break r.json().await?,
            Ok(r) => {
                let status = r.status();
                let body: Value = r.json().await.unwrap_or(Value::Null);
                anyhow::bail!(
                    "the API refused the worker's token ({status}): {}",
                    body["error"]["message"]
                        .as_str()
                        .unwrap_or("no reason given")
                );
            }
            Err(e) if Instant::now() < deadline => {
                tracing::info!(error = %e, "worker: waiting for the API to say who its token is");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e).context(format!("asking {url} who the worker's token is")),
        }
    };
    let reach: Vec<String> = me["projects"]
        .as_array()
        .map(|p| {
            p.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let all = me["role"] == "admin" || reach.iter().any(|p| p == "*");
    for p in asked {
        anyhow::ensure!(
            all || reach.contains(p),
            "--project {p:?}: the worker's token {} does not reach it (it reaches {})",
            me["name"],
            reach.join(", ")
        );
    }
    Ok(match (asked.is_empty(), all) {
        (false, _) => asked.to_vec(),
        (true, true) => Vec::new(),
        (true, false) => reach,
    })
}

/// Whether `e` is a failure to reach the API (worth waiting out), not a refusal.
fn is_unreachable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<reqwest::Error>()
            .is_some_and(|r| r.is_connect() || r.is_timeout())
    })
}

/// The headers that carry a token to the API (none without one), marked sensitive so
/// that debug output leaves it out. The worker agent, the CLI and the benchmarks all
/// send their tokens with these.
pub fn bearer_headers(token: Option<&str>) -> anyhow::Result<reqwest::header::HeaderMap> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .context("the token holds characters a header cannot")?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    Ok(headers)
}

/// One entry of the assignments answer.
#[derive(Debug, Clone, Deserialize)]
struct Assignment {
    task_id: Uuid,
    attempt: u32,
    state: TaskStatus,
    cancel_requested: bool,
    #[serde(default)]
    reason: Option<String>,
    spec: TaskSpec,
    /// The task's trace: the attempt is a span under it.
    #[serde(default)]
    traceparent: Option<TraceContext>,
}

#[derive(Debug, Deserialize)]
struct AssignmentsAnswer {
    worker_state: Option<String>,
    incarnation: Option<String>,
    version: String,
    assignments: Vec<Assignment>,
}

/// An attempt this agent runs.
struct Running {
    cancel: Option<oneshot::Sender<()>>,
}

/// How far the agent's shutdown has gone, as its attempts see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stopping {
    /// Not stopping, or draining: attempts run on.
    No,
    /// The drain is over: stop the attempts (SIGTERM, SIGKILL after the grace).
    Stop,
    /// Stop them at once (SIGKILL).
    Kill,
}

type AttemptKey = (Uuid, u32);

/// What the agent shares between its loops.
struct Agent {
    options: WorkerOptions,
    writer: LogWriter,
    http: reqwest::Client,
    incarnation: Mutex<String>,
    running: Mutex<HashMap<AttemptKey, Running>>,
    /// Attempts reported without running (cancelled before start, orphans) whose
    /// report is in flight or done: never reported twice.
    reported: Mutex<HashSet<AttemptKey>>,
    ledger: ledger::Ledger,
    /// Set once the shutdown signal came: assignments are no longer started.
    draining: AtomicBool,
    /// Whether (and how hard) running attempts are to be stopped.
    stopping: watch::Sender<Stopping>,
    /// The attempts and reports in flight, so that the agent can wait for them (and
    /// end them) before it returns: none outlives it.
    tasks: Mutex<JoinSet<()>>,
}

/// Runs the agent until `shutdown` resolves, then drains (see [`run_until`]); it never
/// hurries.
pub async fn run(
    options: WorkerOptions,
    appender: Appender,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    run_until(options, appender, shutdown, std::future::pending()).await
}

/// What ended the drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DrainEnd {
    /// Nothing runs here any more.
    Drained,
    /// `drain_timeout` passed.
    Timeout,
    /// Asked to stop at once.
    Hurried,
}

/// Runs the agent until `shutdown` resolves, then drains: appends `draining`, starts
/// nothing new (what is assigned meanwhile ends as `interruption`), and lets the
/// running attempts finish for up to [`WorkerOptions::drain_timeout`]. Then it stops
/// what still runs (SIGTERM to each process group, SIGKILL after the kill grace) and
/// reports those attempts as failed with reason `interruption`, so their retry
/// policies place them elsewhere. `hurry` resolving during the drain skips the rest of
/// it and SIGKILLs the attempts at once (still reported as `interruption`). Returns
/// once every attempt has ended and its outcome is reported (or, past a short bound,
/// given up on: the scheduler then ends it when it declares this worker lost).
pub async fn run_until(
    options: WorkerOptions,
    appender: Appender,
    shutdown: impl Future<Output = ()>,
    hurry: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        valid_worker_id(&options.name),
        "worker name {:?} is not valid: use letters, digits and ._:@- (up to 256)",
        options.name
    );
    let writer = LogWriter::new(appender, LogWriterOptions::new(&options.topics.logs));
    let agent = Arc::new(Agent {
        writer,
        http: reqwest::Client::builder()
            .timeout(options.poll_wait + Duration::from_secs(15))
            .default_headers(bearer_headers(options.token.as_deref())?)
            .build()?,
        incarnation: Mutex::new(new_incarnation()),
        running: Mutex::new(HashMap::new()),
        reported: Mutex::new(HashSet::new()),
        ledger: attempt_ledger(&options),
        draining: AtomicBool::new(false),
        stopping: watch::Sender::new(Stopping::No),
        tasks: Mutex::new(JoinSet::new()),
        options,
    });
    let leftovers = agent.ledger.reap_leftovers();
    if leftovers > 0 {
        tracing::warn!(
            leftovers,
            "worker: stopped attempts left running by a previous run"
        );
    }
    agent.register().await?;
    // Heartbeats stop with this function, also when its future is dropped midway.
    let _heartbeats = AbortOnDrop(tokio::spawn(agent.clone().heartbeat_loop()));
    let mut shutdown = std::pin::pin!(shutdown);
    let mut hurry = std::pin::pin!(hurry);
    let mut poller = Poller {
        known: None,
        backoff: Duration::from_millis(200),
    };
    // Taking work until the shutdown signal.
    loop {
        tokio::select! {
            step = agent.step(&mut poller, false) => { step?; }
            _ = &mut shutdown => break,
        }
    }
    tracing::info!(
        running = agent.running_count(),
        timeout = ?agent.options.drain_timeout,
        "worker: draining"
    );
    agent.draining.store(true, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + agent.options.drain_timeout;
    let end = async {
        // A broker that does not take the event must not hold the drain.
        tokio::time::timeout_at(
            deadline,
            agent.append_worker_event(WorkerPayload::Draining {
                last_known: Some(Box::new(LastKnown {
                    info: agent.info(),
                    ..LastKnown::default()
                })),
            }),
        )
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")))
        .unwrap_or_else(|e| tracing::warn!(error = %e, "worker: draining not appended"));
        loop {
            if agent.step(&mut poller, true).await? == Step::Drained {
                return Ok::<_, anyhow::Error>(DrainEnd::Drained);
            }
        }
    };
    let end = tokio::select! {
        end = end => end?,
        _ = tokio::time::sleep_until(deadline) => DrainEnd::Timeout,
        _ = &mut hurry => DrainEnd::Hurried,
    };
    agent.stop_all(end, hurry).await;
    tracing::info!("worker: drained; exiting");
    Ok(())
}

/// What the assignments loop remembers between polls.
struct Poller {
    known: Option<String>,
    backoff: Duration,
}

/// What one step of the assignments loop found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Go on polling.
    Continue,
    /// Draining, and nothing is assigned to or runs here any more.
    Drained,
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn new_incarnation() -> String {
    Uuid::new_v4().simple().to_string()[..12].to_string()
}

impl Agent {
    /// One poll of the assignments, acted on; after a failure, the backoff pause.
    async fn step(self: &Arc<Self>, poller: &mut Poller, draining: bool) -> anyhow::Result<Step> {
        match self.poll(poller.known.as_deref(), draining).await {
            Ok(answer) => {
                poller.backoff = Duration::from_millis(200);
                let nothing_left = answer.assignments.is_empty();
                poller.known = Some(answer.version.clone());
                self.handle(answer).await?;
                if draining && nothing_left && self.running_count() == 0 {
                    return Ok(Step::Drained);
                }
            }
            Err(e) if draining && self.running_count() == 0 => {
                // Nothing runs here; attempts assigned meanwhile end as interrupted
                // once the heartbeats stop.
                tracing::warn!(error = %e, "worker: API unreachable while draining; exiting");
                return Ok(Step::Drained);
            }
            Err(e) => {
                tracing::warn!(error = %e, "worker: cannot get assignments");
                tokio::time::sleep(poller.backoff).await;
                poller.backoff = (poller.backoff * 2).min(Duration::from_secs(5));
                poller.known = None;
            }
        }
        Ok(Step::Continue)
    }

    /// Ends the drain: stops what still runs (at once when `end` is
    /// [`DrainEnd::Hurried`] or `hurry` resolves meanwhile), then waits for every
    /// attempt and report in flight, for a bounded time, and ends what is left.
    async fn stop_all(&self, end: DrainEnd, hurry: std::pin::Pin<&mut impl Future<Output = ()>>) {
        let running = self.running_count();
        let mut hurried = end == DrainEnd::Hurried;
        if running > 0 {
            match end {
                DrainEnd::Hurried => tracing::info!(
                    running,
                    "worker: stopping the running attempts at once; they end as interruption"
                ),
                _ => tracing::info!(
                    running,
                    timeout = ?self.options.drain_timeout,
                    "worker: drain timeout passed; stopping the running attempts; they end as interruption"
                ),
            }
        }
        self.stopping.send_replace(if hurried {
            Stopping::Kill
        } else {
            Stopping::Stop
        });
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        let bound = |hurried: bool| {
            tokio::time::Instant::now()
                + if hurried {
                    REPORT_GRACE
                } else {
                    self.options.kill_grace + REPORT_GRACE
                }
        };
        let mut deadline = bound(hurried);
        let mut hurry = hurry;
        loop {
            tokio::select! {
                next = tasks.join_next() => if next.is_none() { return },
                _ = tokio::time::sleep_until(deadline) => break,
                _ = &mut hurry, if !hurried => {
                    hurried = true;
                    tracing::info!("worker: stopping the running attempts at once");
                    self.stopping.send_replace(Stopping::Kill);
                    deadline = deadline.min(bound(true));
                }
            }
        }
        tracing::warn!(
            left = tasks.len(),
            "worker: exiting without reporting every outcome (the API does not answer); \
             the scheduler ends those attempts once it declares this worker lost"
        );
        tasks.shutdown().await;
    }

    /// Runs `task` in the background, as one of the tasks [`Agent::stop_all`] waits for.
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task);
    }

    /// Resolves once the agent's shutdown has reached `level`.
    async fn stopping(&self, level: Stopping) {
        let mut rx = self.stopping.subscribe();
        if rx.wait_for(|l| *l >= level).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    fn info(&self) -> WorkerInfo {
        WorkerInfo {
            capacity: self.options.capacity.clone(),
            labels: self.options.labels.clone(),
            projects: self.options.projects.clone(),
            hostname: hostname::get()
                .ok()
                .map(|h| h.to_string_lossy().into_owned()),
            pid: Some(std::process::id()),
            incarnation: Some(self.incarnation()),
        }
    }

    fn incarnation(&self) -> String {
        self.incarnation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn running_count(&self) -> usize {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Appends one of its own events through the API (`POST /v1/workers/{id}/events`),
    /// which checks that the agent's token may act as this worker and for its projects.
    async fn append_worker_event(&self, payload: WorkerPayload) -> anyhow::Result<()> {
        let event = WorkerEvent::new(&self.options.source, &self.options.name, payload);
        let url = format!(
            "{}/v1/workers/{}/events",
            self.options.api_url.trim_end_matches('/'),
            self.options.name
        );
        let body = json!({
            "type": event.payload.event_type().as_str(),
            "data": event.data(),
            "source": self.options.source,
        });
        let response = self
            .http
            .post(&url)
            .timeout(Duration::from_secs(15))
            .json(&body)
            .send()
            .await
            .with_context(|| format!("post {}", event.payload.event_type().as_str()))?;
        let status = response.status();
        if !status.is_success() {
            let answer: Value = response.json().await.unwrap_or(Value::Null);
            anyhow::bail!(
                "the API refused {} ({status}): {}",
                event.payload.event_type().as_str(),
                answer["error"]["message"]
                    .as_str()
                    .unwrap_or("no reason given")
            );
        }
        Ok(())
    }

    /// Registers, waiting (up to a minute) for the API to answer.
    async fn register(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self
                .append_worker_event(WorkerPayload::Registered(self.info()))
                .await
            {
                Ok(()) => break,
                Err(e) if Instant::now() < deadline && is_unreachable(&e) => {
                    tracing::info!(error = %format!("{e:#}"), "worker: waiting for the API to register");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
        tracing::info!(worker = %self.options.name, incarnation = %self.incarnation(), "worker: registered");
        Ok(())
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.options.heartbeat);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = self
                .append_worker_event(WorkerPayload::Heartbeat(self.info()))
                .await
            {
                tracing::warn!(error = %e, "worker: heartbeat not sent");
            }
        }
    }

    async fn poll(&self, known: Option<&str>, draining: bool) -> anyhow::Result<AssignmentsAnswer> {
        let wait = if draining {
            Duration::from_millis(500)
        } else {
            self.options.poll_wait
        };
        let mut query = vec![("wait_ms", wait.as_millis().to_string())];
        if let Some(k) = known {
            query.push(("known", k.to_string()));
        }
        let url = format!(
            "{}/v1/workers/{}/assignments",
            self.options.api_url.trim_end_matches('/'),
            self.options.name
        );
        let response = self.http.get(&url).query(&query).send().await?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            anyhow::bail!("HTTP {status}: {body}");
        }
        Ok(response.json().await?)
    }

    /// Acts on one assignments answer.
    async fn handle(self: &Arc<Self>, answer: AssignmentsAnswer) -> anyhow::Result<()> {
        let ours = answer.incarnation.as_deref() == Some(self.incarnation().as_str());
        if answer.worker_state.as_deref() == Some("lost") && ours {
            // Declared lost (a long pause, a partition): our attempts were ended by the
            // scheduler. Stop them and come back as a new incarnation.
            tracing::warn!("worker: declared lost; stopping attempts and registering again");
            self.cancel_all();
            *self.incarnation.lock().unwrap_or_else(|e| e.into_inner()) = new_incarnation();
            self.register().await?;
            return Ok(());
        }
        let current: HashSet<AttemptKey> = answer
            .assignments
            .iter()
            .map(|a| (a.task_id, a.attempt))
            .collect();
        self.reported
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k| current.contains(k));
        for a in answer.assignments {
            let key = (a.task_id, a.attempt);
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(r) = running.get_mut(&key) {
                if a.cancel_requested
                    && let Some(cancel) = r.cancel.take()
                {
                    let _ = cancel.send(());
                }
                continue;
            }
            if !self
                .reported
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key)
            {
                continue;
            }
            match (a.state, a.cancel_requested) {
                (TaskStatus::Assigned, false) if self.draining.load(Ordering::SeqCst) => self
                    .report_unrun(
                        &a,
                        json!({
                            "outcome": "failed",
                            "reason": "interruption",
                            "message": "the worker was shutting down; the attempt never started",
                        }),
                    ),
                (TaskStatus::Assigned, false) => {
                    let (cancel, cancelled) = oneshot::channel();
                    running.insert(
                        key,
                        Running {
                            cancel: Some(cancel),
                        },
                    );
                    metrics().worker_attempts_running.set(running.len() as i64);
                    let agent = self.clone();
                    self.spawn(async move {
                        agent.run_attempt(a, cancelled).await;
                        let mut running = agent.running.lock().unwrap_or_else(|e| e.into_inner());
                        running.remove(&key);
                        metrics().worker_attempts_running.set(running.len() as i64);
                    });
                }
                (TaskStatus::Assigned, true) => self.report_unrun(
                    &a,
                    json!({
                        "outcome": "cancelled",
                        "reason": a.reason.clone().unwrap_or_else(|| "cancelled".into()),
                        "message": "cancelled before it started",
                    }),
                ),
                // Running here according to the log, but not in this process: left over
                // from before a restart.
                (TaskStatus::Running, _) => self.report_unrun(
                    &a,
                    json!({
                        "outcome": if a.cancel_requested { "cancelled" } else { "failed" },
                        "reason": if a.cancel_requested { "cancelled" } else { "interruption" },
                        "message": "the worker restarted while the attempt ran",
                    }),
                ),
                _ => {}
            }
        }
        Ok(())
    }

    /// Reports, in the background, how an attempt this process does not run ended.
    fn report_unrun(self: &Arc<Self>, a: &Assignment, body: Value) {
        let (agent, task, attempt, trace) = (self.clone(), a.task_id, a.attempt, a.traceparent);
        self.spawn(async move {
            agent.report(task, attempt, "finish", body, trace).await;
        });
    }

    fn cancel_all(&self) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        for r in running.values_mut() {
            if let Some(cancel) = r.cancel.take() {
                let _ = cancel.send(());
            }
        }
    }

    /// Reports to the API, as span `trace` (the events it causes carry it); retries
    /// while the API is unreachable or failing (5xx), gives up on a 4xx. Returns the
    /// HTTP status of the last answer, if any.
    async fn report(
        &self,
        task: Uuid,
        attempt: u32,
        what: &str,
        body: Value,
        trace: Option<TraceContext>,
    ) -> Option<u16> {
        let url = format!(
            "{}/v1/tasks/{task}/attempts/{attempt}/{what}",
            self.options.api_url.trim_end_matches('/')
        );
        let mut backoff = Duration::from_millis(100);
        let started = Instant::now();
        loop {
            let mut request = self.http.post(&url).json(&body);
            if let Some(trace) = &trace {
                request = request.header("traceparent", trace.to_string());
            }
            match request.send().await {
                Ok(r) if r.status().is_success() => return Some(r.status().as_u16()),
                Ok(r) if r.status().is_client_error() => {
                    let status = r.status().as_u16();
                    let text = r.text().await.unwrap_or_default();
                    tracing::info!(%task, attempt, what, status, %text, "worker: report refused");
                    return Some(status);
                }
                Ok(r) => {
                    tracing::warn!(%task, attempt, what, status = %r.status(), "worker: report failed; retrying")
                }
                Err(e) => {
                    tracing::warn!(%task, attempt, what, error = %e, "worker: report failed; retrying")
                }
            }
            // An outcome must not be lost: keep trying (for a day at most).
            if started.elapsed() > Duration::from_secs(86_400) {
                return None;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Runs one attempt from spawn to reported outcome.
    async fn run_attempt(&self, a: Assignment, cancelled: oneshot::Receiver<()>) {
        let (task, attempt) = (a.task_id, a.attempt);
        // The attempt's span, under the task's: its process, its log records and its
        // reports carry it.
        let span = TraceContext::child_of(a.traceparent.as_ref());
        let traceparent = span.to_string();
        let span_started = std::time::SystemTime::now();
        if let Ok(Some(quota)) = a.spec.log_quota_bytes() {
            self.writer.set_quota(task, attempt as i32, quota);
        }
        let launch = self.launch(&a, &traceparent);
        let (lines_tx, mut lines_rx) = mpsc::channel(4096);
        let started = Instant::now();
        let child = match process::spawn(&launch, lines_tx) {
            Ok(child) => child,
            Err(e) => {
                let message = e.to_string();
                let (_, delivered) = self.writer.write(
                    task,
                    attempt as i32,
                    Stream::System,
                    format!("[tasklog] cannot start the process: {message}").as_bytes(),
                    None,
                    Some(&traceparent),
                );
                let _ = delivered.await;
                self.writer.finish(task, attempt as i32);
                let body =
                    json!({"outcome": "failed", "reason": "spawn_error", "message": message});
                self.report(task, attempt, "finish", body, Some(span)).await;
                return;
            }
        };
        let pid = child.pid();
        self.ledger.add(pid as i32, task, attempt);
        let start = self.report(
            task,
            attempt,
            "start",
            json!({"worker_id": self.options.name, "pid": pid}),
            Some(span),
        );
        // A refused start (the attempt was cancelled or taken away meanwhile) stops
        // the process at once; so does a cancel request.
        let start = futures::FutureExt::shared(start);
        let start_report = start.clone();
        // A service replica's probe: ready once it passes, stopped when it fails
        // failure_threshold times in a row (the attempt then fails as `unhealthy`).
        let probe = a
            .spec
            .probe
            .as_ref()
            .and_then(|p| probe::Probe::from_json(p).ok());
        let unhealthy = AtomicBool::new(false);
        let interrupted = AtomicBool::new(false);
        let (ready_tx, ready_rx) = oneshot::channel::<()>();
        let probe_env = launch.env.clone();
        let asked_to_stop = async {
            let accepted =
                matches!(start_report.await, Some(status) if (200..300).contains(&status));
            if !accepted {
                return;
            }
            let cancel = async {
                if cancelled.await.is_err() {
                    // The agent forgot the attempt without asking to stop it: never stop.
                    futures::future::pending::<()>().await;
                }
            };
            match &probe {
                None => cancel.await,
                Some(p) => {
                    let mut ready_tx = Some(ready_tx);
                    let watch = probe::run(p, &probe_env, move || {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    });
                    tokio::select! {
                        () = cancel => {}
                        _ = watch => {
                            unhealthy.store(true, Ordering::SeqCst);
                        }
                    }
                }
            }
        };
        // The end of the agent's drain stops the attempt whatever else goes on (a start
        // report still in flight included).
        let stop = async {
            tokio::select! {
                () = asked_to_stop => {}
                () = self.stopping(Stopping::Stop) => interrupted.store(true, Ordering::SeqCst),
            }
        };
        let kill = async {
            self.stopping(Stopping::Kill).await;
            interrupted.store(true, Ordering::SeqCst);
        };
        let ready_report = async {
            if ready_rx.await.is_ok() {
                self.report(task, attempt, "ready", json!({}), Some(span))
                    .await;
            }
        };
        let pump = async {
            let mut pending = FuturesUnordered::new();
            let mut failed = 0u64;
            while let Some(line) = lines_rx.recv().await {
                let stream = match line.stream {
                    OutputStream::Stdout => Stream::Stdout,
                    OutputStream::Stderr => Stream::Stderr,
                };
                let (_, delivered) = self.writer.write(
                    task,
                    attempt as i32,
                    stream,
                    &line.bytes,
                    None,
                    Some(&traceparent),
                );
                pending.push(delivered);
                while pending.len() > 20_000 {
                    if let Some(Err(_)) = pending.next().await {
                        failed += 1;
                    }
                }
            }
            while let Some(r) = pending.next().await {
                if r.is_err() {
                    failed += 1;
                }
            }
            failed
        };
        let (exit, undelivered, ()) =
            futures::future::join3(child.wait_or_kill(stop, kill), pump, ready_report).await;
        // The outcome follows the start on the log: a fast process may end before the
        // start report is through.
        let _ = start.await;
        self.writer.finish(task, attempt as i32);
        self.ledger.remove(pid as i32);
        let duration_ms = exit.duration.as_millis() as u64;
        let mut body = json!({
            "exit_code": exit.exit_code,
            "signal": exit.signal,
            "duration_ms": duration_ms,
        });
        let (outcome, reason) = match exit.ended_by {
            EndedBy::Exited if exit.exit_code == Some(0) => ("succeeded", None),
            EndedBy::Exited => ("failed", Some("error".to_string())),
            EndedBy::Timeout => ("failed", Some("timeout".to_string())),
            EndedBy::Cancelled if unhealthy.load(Ordering::SeqCst) => {
                ("failed", Some("unhealthy".to_string()))
            }
            // Stopped by the worker's shutdown: the retry policy places it elsewhere (a
            // cancel asked for meanwhile still wins, in the API).
            EndedBy::Cancelled if interrupted.load(Ordering::SeqCst) => {
                ("failed", Some("interruption".to_string()))
            }
            EndedBy::Cancelled => (
                "cancelled",
                Some(a.reason.clone().unwrap_or_else(|| "cancelled".into())),
            ),
        };
        body["outcome"] = Value::from(outcome);
        if let Some(r) = reason {
            body["reason"] = Value::from(r);
        }
        let mut messages = Vec::new();
        if outcome == "failed" && interrupted.load(Ordering::SeqCst) {
            messages.push(format!(
                "stopped by the shutdown of worker {} (drain timeout {:?})",
                self.options.name, self.options.drain_timeout
            ));
        }
        if undelivered > 0 {
            messages.push(format!(
                "{undelivered} log lines could not be delivered to the logs topic"
            ));
        }
        if !messages.is_empty() {
            body["message"] = Value::from(messages.join("; "));
        }
        tracing::info!(%task, attempt, outcome, ?exit, elapsed = ?started.elapsed(), "worker: attempt ended");
        if crate::otlp::enabled() {
            let mut exported = crate::otlp::Span::new(
                format!("attempt {attempt}"),
                span,
                a.traceparent,
                span_started,
                std::time::SystemTime::now(),
            )
            .attribute("tasklog.task_id", task.to_string())
            .attribute("tasklog.attempt", i64::from(attempt))
            .attribute("tasklog.worker", self.options.name.clone())
            .attribute("tasklog.outcome", outcome);
            if let Some(code) = exit.exit_code {
                exported = exported.attribute("process.exit.code", i64::from(code));
            }
            if outcome == "failed" {
                exported.error = body["reason"].as_str().map(str::to_string);
            }
            crate::otlp::export(exported);
        }
        self.report(task, attempt, "finish", body, Some(span)).await;
    }

    /// The process to start for an assignment.
    fn launch(&self, a: &Assignment, traceparent: &str) -> Launch {
        let argv = match (&a.spec.command, &a.spec.shell) {
            (Some(argv), _) => argv.clone(),
            (None, Some(script)) => vec!["sh".into(), "-c".into(), script.clone()],
            (None, None) => Vec::new(),
        };
        let mut env: Vec<(String, String)> = a
            .spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        env.push(("TASKLOG_TASK_ID".into(), a.task_id.to_string()));
        env.push(("TASKLOG_ATTEMPT".into(), a.attempt.to_string()));
        env.push(("TASKLOG_WORKER".into(), self.options.name.clone()));
        env.push(("TRACEPARENT".into(), traceparent.to_string()));
        if let Some(service) = &a.spec.service {
            env.push(("TASKLOG_SERVICE".into(), service.clone()));
            env.push((
                "TASKLOG_REPLICA".into(),
                a.spec.replica.unwrap_or(0).to_string(),
            ));
        }
        Launch {
            argv,
            env,
            working_dir: a.spec.working_dir.as_ref().map(Into::into),
            timeout: a
                .spec
                .timeout_ms()
                .ok()
                .flatten()
                .map(Duration::from_millis),
            kill_grace: self.options.kill_grace,
        }
    }
}
