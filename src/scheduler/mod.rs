//! The scheduler: places queued tasks onto workers by priority (with aging), resources
//! and labels; releases or cancels tasks waiting on dependencies; declares workers lost
//! and ends their attempts; fails tasks no worker could ever run.
//!
//! It is a loop around a pure core. [`Model`] is the scheduler's picture of unfinished
//! tasks, kept up to date from the projection: on every projector notification it
//! reads only the tasks whose last event sits past what it saw (per partition, offsets
//! only grow). [`decide`] turns the model, the workers and the time into actions, with
//! [`plan::plan`] doing placement. Every action is an event, appended with the task's
//! next `seq`: one that lost a race (the task was cancelled meanwhile, say) is rejected
//! by the fold, and nothing runs. After appending, the loop waits until the projection
//! has applied its events, so the next pass sees them.
//!
//! One scheduler acts at a time: the leader holds a Postgres advisory lock on its own
//! connection. A standby tries the lock every second; when the leader dies its session
//! ends, the lock is released, and the standby takes over.

pub mod plan;
pub mod services;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::consistency::{Projections, Targets, count_append};
use crate::events::worker::{LastKnown, WorkerEvent, WorkerPayload, WorkerState, WorkerStatus};
use crate::events::{CancelledData, Event, Payload, ReasonData, TaskSpec, TaskState, TaskStatus};
use crate::kafka::{Appended, Appender, Topics};
use crate::store::{
    PROJECTION_CHANNEL, SERVICES_CHANNEL, Store, StoreError, TaskRecord, WORKERS_CHANNEL,
};
use plan::{Capacity, PlanOptions, Queue, QueuedTask, WorkerView};

/// The advisory lock key that elects the leader ("tasklog" in ASCII).
pub const LEADER_LOCK_KEY: i64 = 0x0074_6173_6b6c_6f67;

/// Settings of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// Topics.
    pub topics: Topics,
    /// `ce_source` of the events it appends.
    pub source: String,
    /// Effective priority gained per minute waited in the queue.
    pub aging_per_minute: f64,
    /// A worker with no heartbeat for this long is lost.
    pub worker_timeout: Duration,
    /// How long a task that no live worker could ever fit waits before it fails with
    /// `no_capacity` (workers may still be starting).
    pub no_capacity_after: Duration,
    /// How often a standby tries to become the leader.
    pub standby_poll: Duration,
    /// Longest wait for the projection to apply the scheduler's own events.
    pub apply_wait: Duration,
}

impl SchedulerOptions {
    /// Defaults for the given topics.
    pub fn new(topics: Topics) -> SchedulerOptions {
        let host = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "localhost".into());
        SchedulerOptions {
            topics,
            source: format!("tasklog://{host}/scheduler"),
            aging_per_minute: 1.0,
            worker_timeout: Duration::from_secs(30),
            no_capacity_after: Duration::from_secs(10),
            standby_poll: Duration::from_secs(1),
            apply_wait: Duration::from_secs(10),
        }
    }
}

/// What a task needs from a worker. A spec without resources needs one core.
pub fn need_of(spec: &TaskSpec) -> Capacity {
    let resources = spec.resources.as_ref();
    let cpu = resources.and_then(|r| r.cpu).unwrap_or(1.0);
    Capacity {
        cpu_milli: (cpu * 1000.0).ceil().max(0.0) as u64,
        memory: spec.memory_bytes().ok().flatten().unwrap_or(0),
        gpu: resources.and_then(|r| r.gpu).unwrap_or(0),
    }
}

/// What a worker offers.
pub fn capacity_of(worker: &WorkerState) -> Capacity {
    Capacity {
        cpu_milli: (worker.info.capacity.cpu * 1000.0).floor().max(0.0) as u64,
        memory: worker.info.capacity.memory,
        gpu: worker.info.capacity.gpu,
    }
}

/// One thing the scheduler decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Append this event to the task (with seq = the task's seq + 1).
    Task {
        /// The task.
        task_id: Uuid,
        /// Its seq as the scheduler saw it.
        seq: u64,
        /// The event.
        payload: Payload,
    },
    /// Submit a new task (a service replica).
    Submit {
        /// Its id (deterministic for replicas).
        task_id: Uuid,
        /// Its spec.
        spec: std::sync::Arc<TaskSpec>,
        /// Its service's span: the submission is a span under it.
        service_trace: Option<crate::events::trace::TraceContext>,
    },
    /// Append this event to a service.
    Service {
        /// The service.
        name: String,
        /// The event.
        payload: crate::events::service::ServicePayload,
    },
    /// Declare this worker lost.
    WorkerLost {
        /// The worker.
        worker_id: String,
        /// What the projection knew of it (carried by the event, for compaction).
        last_known: Box<LastKnown>,
        /// Detail.
        message: String,
    },
}

/// The scheduler's picture of unfinished tasks.
pub struct Model {
    tasks: HashMap<Uuid, TaskState>,
    queue: Queue,
    /// Final states of finished tasks that unfinished ones may depend on.
    finished: HashMap<Uuid, TaskStatus>,
    /// Per partition, the next offset to look for changes from.
    from: HashMap<i32, i64>,
}

/// How many finished tasks' states the model remembers for dependency checks before
/// it starts over (then it asks Postgres again).
const FINISHED_MEMORY: usize = 1_000_000;

impl Model {
    /// An empty model that will look for changes from `from`.
    pub fn new(options: PlanOptions, from: HashMap<i32, i64>) -> Model {
        Model {
            tasks: HashMap::new(),
            queue: Queue::new(options),
            finished: HashMap::new(),
            from,
        }
    }

    /// Where to look for changes next, per partition.
    pub fn from(&self) -> &HashMap<i32, i64> {
        &self.from
    }

    /// Tasks waiting in the queue.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Unfinished tasks.
    pub fn tasks(&self) -> impl Iterator<Item = &TaskState> {
        self.tasks.values()
    }

    /// Takes in a task as projected. Older states than the one held are ignored.
    pub fn update(&mut self, record: TaskRecord) {
        let from = self.from.entry(record.partition).or_insert(0);
        *from = (*from).max(record.last_offset + 1);
        let task = record.task;
        if let Some(held) = self.tasks.get(&task.id)
            && held.seq >= task.seq
        {
            return;
        }
        self.queue.remove(&task.id);
        if task.state.is_terminal() {
            self.tasks.remove(&task.id);
            if self.finished.len() >= FINISHED_MEMORY {
                self.finished.clear();
            }
            self.finished.insert(task.id, task.state);
            return;
        }
        if task.state == TaskStatus::Queued && !task.spec.is_external() && !task.cancel_requested {
            self.queue.insert(queued_task(&task));
        }
        self.tasks.insert(task.id, task);
    }

    /// Records the final state of a task that finished before the model saw it.
    pub fn remember_finished(&mut self, id: Uuid, state: TaskStatus) {
        self.finished.insert(id, state);
    }

    /// Dependencies of pending tasks whose state the model does not know.
    pub fn unknown_dependencies(&self) -> Vec<Uuid> {
        let mut unknown: HashSet<Uuid> = HashSet::new();
        for t in self.tasks.values() {
            if t.state == TaskStatus::Pending {
                for d in &t.spec.after {
                    if !self.tasks.contains_key(d) && !self.finished.contains_key(d) {
                        unknown.insert(*d);
                    }
                }
            }
        }
        unknown.into_iter().collect()
    }

    fn status_of(&self, id: &Uuid) -> Option<TaskStatus> {
        self.tasks
            .get(id)
            .map(|t| t.state)
            .or_else(|| self.finished.get(id).copied())
    }
}

fn queued_task(task: &TaskState) -> QueuedTask {
    let queued_at = task.queued_at.unwrap_or(task.submitted_at);
    QueuedTask {
        id: task.id,
        priority: task.spec.priority(),
        queued_at_ms: queued_at.timestamp_millis(),
        submitted_at_ms: task.submitted_at.timestamp_millis(),
        need: need_of(&task.spec),
        labels: task.spec.required_labels(),
        project: task.spec.project().to_string(),
    }
}

/// The result of one pass: actions, and when the next pass is due even if nothing
/// changes (a heartbeat expiring, a grace period ending).
#[derive(Debug, Default)]
pub struct Pass {
    /// What to append.
    pub actions: Vec<Action>,
    /// When to look again at the latest.
    pub next_due: Option<DateTime<Utc>>,
    /// Queued tasks, and `no_capacity` retries waiting, that no accepting worker could
    /// run even when empty (`tasklog_tasks_unrunnable`).
    pub unrunnable: usize,
}

/// One scheduling pass. Pure: the same model, workers, options and time give the same
/// actions.
pub fn decide(
    model: &Model,
    workers: &[WorkerState],
    options: &SchedulerOptions,
    now: DateTime<Utc>,
) -> Pass {
    let mut pass = Pass::default();
    let due = |at: DateTime<Utc>, pass: &mut Pass| {
        pass.next_due = Some(pass.next_due.map_or(at, |d| d.min(at)));
    };
    let timeout = chrono::Duration::from_std(options.worker_timeout).unwrap_or_default();
    let grace = chrono::Duration::from_std(options.no_capacity_after).unwrap_or_default();

    // 1. Workers whose heartbeats stopped.
    let mut gone: HashSet<&str> = HashSet::new();
    for w in workers {
        match w.state {
            WorkerStatus::Lost => {
                gone.insert(&w.id);
            }
            _ if now - w.last_heartbeat_at >= timeout => {
                gone.insert(&w.id);
                pass.actions.push(Action::WorkerLost {
                    worker_id: w.id.clone(),
                    last_known: Box::new(LastKnown::of(w)),
                    message: format!(
                        "no heartbeat since {} (worker_timeout {}s)",
                        w.last_heartbeat_at.to_rfc3339(),
                        options.worker_timeout.as_secs()
                    ),
                });
            }
            _ => due(w.last_heartbeat_at + timeout, &mut pass),
        }
    }
    let known: HashSet<&str> = workers.iter().map(|w| w.id.as_str()).collect();

    // 2. Attempts on lost (or unknown) workers end: interruption, or cancelled when a
    //    cancel was asked for.
    let mut used: HashMap<&str, Capacity> = HashMap::new();
    // Queued tasks are the queue's business; the rest (few) are looked at in order.
    let mut ordered: Vec<&TaskState> = model
        .tasks
        .values()
        .filter(|t| t.state != TaskStatus::Queued)
        .collect();
    ordered.sort_by_key(|t| (t.submitted_at, t.id));
    for t in &ordered {
        if !matches!(t.state, TaskStatus::Assigned | TaskStatus::Running) || t.spec.is_external() {
            continue;
        }
        let Some(worker) = t.worker_id.as_deref() else {
            continue;
        };
        if gone.contains(worker) || !known.contains(worker) {
            let payload = if t.cancel_requested {
                Payload::Cancelled(CancelledData {
                    reason: t.reason.clone().or_else(|| Some("cancelled".into())),
                    message: Some(format!("worker {worker} was lost before it stopped")),
                    attempt: Some(t.attempt),
                    ..CancelledData::default()
                })
            } else {
                crate::events::retry::failure_event(
                    t,
                    Some(t.attempt),
                    "interruption",
                    None,
                    None,
                    None,
                    Some(format!("worker {worker} was lost")),
                    now,
                )
            };
            pass.actions.push(Action::Task {
                task_id: t.id,
                seq: t.seq,
                payload,
            });
        } else {
            let u = used.entry(worker).or_default();
            *u = u.saturating_add(need_of(&t.spec));
        }
    }

    // The workers as the planner sees them: what is free, who takes work.
    let views: Vec<WorkerView> = workers
        .iter()
        .map(|w| WorkerView {
            id: w.id.clone(),
            total: capacity_of(w),
            used: used.get(w.id.as_str()).copied().unwrap_or_default(),
            labels: w.info.labels.clone(),
            projects: w.info.projects.clone(),
            accepting: w.state == WorkerStatus::Active && !gone.contains(w.id.as_str()),
        })
        .collect();

    // 3. Pending tasks: retries whose wait is over (or, for no_capacity, that some
    //    worker could now fit), and tasks whose dependencies have settled.
    for t in &ordered {
        if t.state != TaskStatus::Pending {
            continue;
        }
        if t.cancel_requested {
            // Nothing runs: a requested cancel completes here.
            pass.actions.push(Action::Task {
                task_id: t.id,
                seq: t.seq,
                payload: Payload::Cancelled(CancelledData {
                    reason: t.reason.clone().or_else(|| Some("cancelled".into())),
                    ..CancelledData::default()
                }),
            });
            continue;
        }
        if let Some(at) = t.next_attempt_at {
            let fits_now = t.reason.as_deref() == Some("no_capacity") && {
                let (need, labels) = (need_of(&t.spec), t.spec.required_labels());
                views
                    .iter()
                    .any(|v| plan::fits_when_empty(need, &labels, t.spec.project(), v))
            };
            if t.reason.as_deref() == Some("no_capacity") && !fits_now {
                pass.unrunnable += 1;
            }
            if at <= now || fits_now {
                pass.actions.push(Action::Task {
                    task_id: t.id,
                    seq: t.seq,
                    payload: Payload::Queued(ReasonData {
                        reason: Some("retry".into()),
                        message: Some(format!(
                            "retry {} of reason {}",
                            t.retries,
                            t.reason.as_deref().unwrap_or("?")
                        )),
                    }),
                });
            } else {
                due(at, &mut pass);
            }
            continue;
        }
        if t.spec.after.is_empty() {
            continue;
        }
        let mut all_succeeded = true;
        let mut failed_dependency = None;
        for d in &t.spec.after {
            match model.status_of(d) {
                Some(TaskStatus::Succeeded) => {}
                Some(s @ (TaskStatus::Failed | TaskStatus::Cancelled)) => {
                    failed_dependency = Some((*d, s));
                    break;
                }
                _ => all_succeeded = false,
            }
        }
        let payload = match failed_dependency {
            Some((d, s)) => Payload::Cancelled(CancelledData {
                reason: Some("dependency_failed".into()),
                message: Some(format!("dependency {d} is {s}")),
                ..CancelledData::default()
            }),
            None if all_succeeded => Payload::Queued(ReasonData {
                reason: Some("dependencies_succeeded".into()),
                message: None,
            }),
            None => continue,
        };
        pass.actions.push(Action::Task {
            task_id: t.id,
            seq: t.seq,
            payload,
        });
    }

    // 4. Placement.
    let placed = plan::plan(&model.queue, &views);
    pass.unrunnable += placed.unfit.len();
    for (task_id, worker) in placed.assignments {
        if let Some(t) = model.tasks.get(&task_id) {
            pass.actions.push(Action::Task {
                task_id,
                seq: t.seq,
                payload: Payload::Assigned {
                    worker_id: worker,
                    attempt: t.attempt + 1,
                },
            });
        }
    }
    for task_id in placed.unfit {
        let Some(t) = model.tasks.get(&task_id) else {
            continue;
        };
        // A retried task keeps its original queued_at (its place in the queue); its
        // grace counts from when it re-entered the queue, its last change.
        let since = if t.retries > 0 {
            t.updated_at
        } else {
            t.queued_at.unwrap_or(t.submitted_at)
        };
        if now - since >= grace {
            pass.actions.push(Action::Task {
                task_id,
                seq: t.seq,
                payload: crate::events::retry::failure_event(
                    t,
                    None,
                    "no_capacity",
                    None,
                    None,
                    None,
                    Some(no_capacity_message(&t.spec, workers)),
                    now,
                ),
            });
        } else {
            due(since + grace, &mut pass);
        }
    }
    pass
}

fn no_capacity_message(spec: &TaskSpec, workers: &[WorkerState]) -> String {
    let need = need_of(spec);
    let labels: BTreeMap<String, String> = spec.required_labels();
    let live = workers
        .iter()
        .filter(|w| w.state == WorkerStatus::Active)
        .count();
    format!(
        "no live worker (of {live}) could ever fit cpu {}, memory {} bytes, gpu {}{}",
        need.cpu_milli as f64 / 1000.0,
        need.memory,
        need.gpu,
        if labels.is_empty() {
            String::new()
        } else {
            format!(", labels {labels:?}")
        }
    )
}

/// Errors that stop the scheduler.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// Postgres failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The leader lock could not be taken or held.
    #[error("leader election failed: {0}")]
    Leadership(String),
}

/// Runs the scheduler until `shutdown` resolves: waits to become the leader, then
/// schedules; goes back to standby if it loses its lock connection.
pub async fn run(
    options: SchedulerOptions,
    store: Store,
    appender: Appender,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SchedulerError> {
    let mut shutdown = std::pin::pin!(shutdown);
    let projections = Projections::follow(
        store.clone(),
        &[PROJECTION_CHANNEL, WORKERS_CHANNEL, SERVICES_CHANNEL],
    );
    let mut changes = projections.changes();
    loop {
        let leader = tokio::select! {
            leader = become_leader(store.url(), options.standby_poll) => leader,
            _ = &mut shutdown => return Ok(()),
        };
        tracing::info!("scheduler: leading");
        crate::metrics::metrics().scheduler_leader.set(1);
        let result = tokio::select! {
            r = lead(&options, &store, &appender, &leader, &projections, &mut changes) => r,
            _ = &mut shutdown => {
                crate::metrics::metrics().scheduler_leader.set(0);
                return Ok(());
            }
        };
        crate::metrics::metrics().scheduler_leader.set(0);
        // Only the leader's count is current.
        crate::metrics::metrics().tasks_unrunnable.set(0);
        match result {
            Ok(()) => tracing::warn!("scheduler: lost the leader lock; standing by"),
            Err(e) => tracing::warn!(error = %e, "scheduler: pass failed; standing by"),
        }
        drop(leader);
        tokio::time::sleep(options.standby_poll).await;
    }
}

/// The leader lock, held by one Postgres session for as long as it lives.
struct Leadership {
    _client: tokio_postgres::Client,
    connection: tokio::task::JoinHandle<()>,
}

impl Leadership {
    fn held(&self) -> bool {
        !self.connection.is_finished()
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

async fn become_leader(url: &str, poll: Duration) -> Leadership {
    loop {
        match try_lock(url).await {
            Ok(Some(l)) => return l,
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "scheduler: cannot try the leader lock"),
        }
        tokio::time::sleep(poll).await;
    }
}

async fn try_lock(url: &str) -> Result<Option<Leadership>, crate::store::tls::PgConnectError> {
    let (client, connection) = crate::store::tls::connect(url).await?;
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    let row = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK_KEY])
        .await?;
    let got: bool = row.get(0);
    if !got {
        connection.abort();
        return Ok(None);
    }
    Ok(Some(Leadership {
        _client: client,
        connection,
    }))
}

/// Safety net: look again this often even when nothing announces a change.
const IDLE_PASS: Duration = Duration::from_secs(30);

async fn lead(
    options: &SchedulerOptions,
    store: &Store,
    appender: &Appender,
    leader: &Leadership,
    projections: &Projections,
    changes: &mut tokio::sync::watch::Receiver<u64>,
) -> Result<(), SchedulerError> {
    let plan_options = PlanOptions {
        aging_per_minute: options.aging_per_minute,
    };
    // Offsets first, then the rows: anything committed in between is seen twice, never
    // missed (the model ignores states older than the one it holds).
    let from = store.projection_offsets(&options.topics.events).await?;
    let mut model = Model::new(plan_options, from);
    for record in store.unfinished_tasks().await? {
        model.update(record);
    }
    loop {
        if !leader.held() {
            return Ok(());
        }
        changes.borrow_and_update();
        // Partitions the projection started on after we looked: from their start.
        for p in store
            .projection_offsets(&options.topics.events)
            .await?
            .keys()
        {
            model.from.entry(*p).or_insert(0);
        }
        for record in store.tasks_changed_since(model.from()).await? {
            model.update(record);
        }
        let unknown = model.unknown_dependencies();
        if !unknown.is_empty() {
            // Only final states: an unfinished one comes with the next changes anyway,
            // and taking it here would move `from` past changes not read yet.
            for (id, record) in store.tasks(&unknown).await? {
                if record.task.state.is_terminal() {
                    model.remember_finished(id, record.task.state);
                }
            }
        }
        let workers = store.workers().await?;
        let started = std::time::Instant::now();
        let pass = decide(&model, &workers, options, Utc::now());
        crate::metrics::metrics()
            .scheduler_pass_duration
            .observe(started.elapsed().as_secs_f64());
        crate::metrics::metrics()
            .tasks_unrunnable
            .set(i64::try_from(pass.unrunnable).unwrap_or(i64::MAX));
        // The service controller's word on a replica (a cancel) wins this pass; the
        // planner decides on that task again from its next state.
        let service_actions = control_services(store).await?;
        let touched: HashSet<Uuid> = service_actions
            .iter()
            .filter_map(|a| match a {
                Action::Task { task_id, .. } => Some(*task_id),
                _ => None,
            })
            .collect();
        let mut actions: Vec<Action> = pass
            .actions
            .into_iter()
            .filter(|a| !matches!(a, Action::Task { task_id, .. } if touched.contains(task_id)))
            .collect();
        actions.extend(service_actions);
        let appended = append(options, appender, &model, actions).await;
        if !appended.is_empty() {
            // See our own decisions before deciding again.
            let mut targets = Targets::new();
            for (topic, a) in &appended {
                targets.past(topic, *a);
            }
            let deadline = tokio::time::Instant::now() + options.apply_wait;
            if !projections.wait(&targets, deadline).await?.caught_up() {
                tracing::warn!("scheduler: the projection has not applied its events yet");
            }
            continue;
        }
        let wait = pass
            .next_due
            .and_then(|d| (d - Utc::now()).to_std().ok())
            .unwrap_or(IDLE_PASS)
            .min(IDLE_PASS);
        let _ = tokio::time::timeout(wait, changes.changed()).await;
    }
}

/// The service controller's actions for every service that is not stopped.
async fn control_services(store: &Store) -> Result<Vec<Action>, SchedulerError> {
    let mut actions = Vec::new();
    let services: Vec<_> = store
        .services()
        .await?
        .into_iter()
        .filter(|s| s.lifecycle != crate::events::service::ServiceLifecycle::Stopped)
        .collect();
    let mut replicas = store.replicas_of(&services).await?;
    for service in services {
        let replicas: Vec<TaskState> = replicas
            .remove(&service.name)
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.task)
            .collect();
        let r = services::reconcile(&service, &replicas);
        actions.extend(r.tasks);
        actions.extend(r.submit.into_iter().map(|(task_id, spec)| Action::Submit {
            task_id,
            spec: std::sync::Arc::new(spec),
            service_trace: service.traceparent,
        }));
        actions.extend(r.service.into_iter().map(|payload| Action::Service {
            name: service.name.clone(),
            payload,
        }));
    }
    Ok(actions)
}

/// Appends the actions; returns where each event landed (topic, partition, offset).
async fn append(
    options: &SchedulerOptions,
    appender: &Appender,
    model: &Model,
    actions: Vec<Action>,
) -> Vec<(String, Appended)> {
    let m = crate::metrics::metrics();
    let mut task_events = Vec::new();
    let mut worker_events = Vec::new();
    let mut service_events = Vec::new();
    for action in actions {
        match action {
            Action::Submit {
                task_id,
                spec,
                service_trace,
            } => {
                let trace = service_trace.map(|parent| parent.child());
                if let (Some(span), Some(parent)) = (trace, service_trace) {
                    let now = std::time::SystemTime::now();
                    crate::otlp::export(
                        crate::otlp::Span::new("submit replica", span, Some(parent), now, now)
                            .attribute("tasklog.task_id", task_id.to_string()),
                    );
                }
                task_events.push(
                    Event::new(&options.source, task_id, 1, Payload::Submitted { spec })
                        .encode()
                        .with_traceparent(trace.as_ref()),
                );
            }
            Action::Service { name, payload } => {
                tracing::info!(service = %name, event = payload.event_type().as_str(), "scheduler: service event");
                service_events.push(
                    crate::events::service::ServiceEvent::new(&options.source, &name, payload)
                        .encode(),
                );
            }
            Action::Task {
                task_id,
                seq,
                payload,
            } => {
                let task = model.tasks.get(&task_id);
                let mut span = task.and_then(|t| t.traceparent);
                if let (Payload::Assigned { attempt, .. }, Some(t)) = (&payload, task) {
                    let queued = t.queued_at.unwrap_or(t.submitted_at);
                    let waited = Utc::now() - queued;
                    m.queue_wait
                        .observe(waited.num_milliseconds().max(0) as f64 / 1000.0);
                    // The assignment ends the queue wait: a span of its own under the task's.
                    if let Some(task_span) = t.traceparent {
                        let wait = task_span.child();
                        crate::otlp::export(
                            crate::otlp::Span::new(
                                "queue wait",
                                wait,
                                Some(task_span),
                                crate::otlp::system_time(queued),
                                std::time::SystemTime::now(),
                            )
                            .attribute("tasklog.task_id", task_id.to_string())
                            .attribute("tasklog.attempt", i64::from(*attempt)),
                        );
                        span = Some(wait);
                    }
                }
                task_events.push(
                    Event::new(&options.source, task_id, seq + 1, payload)
                        .encode()
                        .with_traceparent(span.as_ref()),
                );
            }
            Action::WorkerLost {
                worker_id,
                message,
                last_known,
            } => {
                tracing::warn!(worker = %worker_id, %message, "scheduler: worker lost");
                worker_events.push(
                    WorkerEvent::new(
                        &options.source,
                        &worker_id,
                        WorkerPayload::Lost {
                            reason: "heartbeat_timeout".into(),
                            message: Some(message),
                            last_known: Some(last_known),
                        },
                    )
                    .encode(),
                );
            }
        }
    }
    let mut appended = Vec::new();
    for (topic, events) in [
        (&options.topics.workers, &worker_events),
        (&options.topics.services, &service_events),
        (&options.topics.events, &task_events),
    ] {
        for (e, r) in events.iter().zip(appender.append_all(topic, events).await) {
            count_append(e.event_type, &r);
            match r {
                Ok(a) => {
                    appended.push((topic.clone(), a));
                }
                Err(err) => {
                    tracing::warn!(error = %err, event = e.event_type, "scheduler: append failed")
                }
            }
        }
    }
    appended
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::worker::{WorkerCapacity, WorkerInfo};
    use serde_json::json;

    fn options() -> SchedulerOptions {
        let mut o = SchedulerOptions::new(Topics::with_prefix("t"));
        o.worker_timeout = Duration::from_secs(30);
        o.no_capacity_after = Duration::from_secs(10);
        o
    }

    fn worker(id: &str, cpu: f64, heartbeat: DateTime<Utc>) -> WorkerState {
        WorkerState {
            id: id.into(),
            state: WorkerStatus::Active,
            info: WorkerInfo {
                capacity: WorkerCapacity {
                    cpu,
                    memory: 1 << 34,
                    gpu: 0,
                },
                ..WorkerInfo::default()
            },
            registered_at: heartbeat,
            last_heartbeat_at: heartbeat,
            updated_at: heartbeat,
            reason: None,
        }
    }

    /// A task folded from real events: submitted, then each payload in turn.
    fn task(spec: serde_json::Value, then: Vec<Payload>) -> TaskState {
        let spec: TaskSpec = serde_json::from_value(spec).unwrap();
        let id = Uuid::now_v7();
        let mut t = crate::events::apply(
            None,
            &Event::new(
                "t",
                id,
                1,
                Payload::Submitted {
                    spec: std::sync::Arc::new(spec),
                },
            ),
        )
        .unwrap();
        for p in then {
            t = crate::events::apply(Some(&t), &Event::new("t", id, t.seq + 1, p)).unwrap();
        }
        t
    }

    fn model(tasks: Vec<TaskState>) -> Model {
        let mut m = Model::new(
            PlanOptions {
                aging_per_minute: 1.0,
            },
            HashMap::new(),
        );
        for (i, t) in tasks.into_iter().enumerate() {
            m.update(TaskRecord {
                task: t,
                partition: 0,
                last_offset: i as i64,
            });
        }
        m
    }

    fn assigned(worker: &str) -> Payload {
        Payload::Assigned {
            worker_id: worker.into(),
            attempt: 1,
        }
    }

    #[test]
    fn a_silent_worker_is_lost_and_its_attempts_interrupted() {
        let now = Utc::now();
        let running = task(
            json!({"shell": "x"}),
            vec![
                assigned("w1"),
                Payload::Started {
                    attempt: 1,
                    worker_id: None,
                    pid: Some(9),
                },
            ],
        );
        let mut cancelling = task(json!({"shell": "x"}), vec![assigned("w1")]);
        cancelling = crate::events::apply(
            Some(&cancelling),
            &Event::new(
                "t",
                cancelling.id,
                3,
                Payload::CancelRequested(ReasonData {
                    reason: Some("user".into()),
                    message: None,
                }),
            ),
        )
        .unwrap();
        let m = model(vec![running.clone(), cancelling.clone()]);
        let stale = worker("w1", 4.0, now - chrono::Duration::seconds(31));
        let pass = decide(&m, &[stale], &options(), now);
        let lost: Vec<&Action> = pass
            .actions
            .iter()
            .filter(|a| matches!(a, Action::WorkerLost { .. }))
            .collect();
        assert!(
            matches!(lost.as_slice(), [Action::WorkerLost { worker_id, message, .. }]
                if worker_id == "w1" && !message.is_empty()),
            "{lost:?}"
        );
        let ends: Vec<(&Uuid, &Payload)> = pass
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Task {
                    task_id, payload, ..
                } => Some((task_id, payload)),
                _ => None,
            })
            .collect();
        assert!(ends.iter().any(|(id, p)| **id == running.id
            && matches!(p, Payload::Failed { reason, attempt: Some(1), .. } if reason == "interruption")));
        assert!(ends.iter().any(|(id, p)| **id == cancelling.id
            && matches!(p, Payload::Cancelled(c) if c.reason.as_deref() == Some("user"))));

        // A fresh heartbeat: nothing to do, and the next look is due at its expiry.
        let fresh = worker("w1", 4.0, now);
        let pass = decide(&m, &[fresh], &options(), now);
        assert!(pass.actions.is_empty(), "{:?}", pass.actions);
        assert_eq!(pass.next_due, Some(now + chrono::Duration::seconds(30)));
    }

    #[test]
    fn dependencies_release_or_cancel() {
        let now = Utc::now();
        let done = task(
            json!({"shell": "x"}),
            vec![
                assigned("w"),
                Payload::Started {
                    attempt: 1,
                    worker_id: None,
                    pid: None,
                },
                Payload::Succeeded {
                    attempt: Some(1),
                    exit_code: Some(0),
                    duration_ms: None,
                },
            ],
        );
        let failed = task(
            json!({"shell": "x"}),
            vec![Payload::Failed {
                attempt: None,
                exit_code: None,
                signal: None,
                duration_ms: None,
                reason: "no_capacity".into(),
                message: None,
            }],
        );
        let waiting = task(json!({"shell": "x"}), vec![]);
        let ready = task(json!({"shell": "x", "after": [done.id]}), vec![]);
        let doomed = task(json!({"shell": "x", "after": [done.id, failed.id]}), vec![]);
        let blocked = task(json!({"shell": "x", "after": [waiting.id]}), vec![]);
        let m = model(vec![
            done,
            failed,
            waiting,
            ready.clone(),
            doomed.clone(),
            blocked.clone(),
        ]);
        let pass = decide(&m, &[], &options(), now);
        let about = |id: Uuid| -> Vec<&Payload> {
            pass.actions
                .iter()
                .filter_map(|a| match a {
                    Action::Task {
                        task_id, payload, ..
                    } if *task_id == id => Some(payload),
                    _ => None,
                })
                .collect()
        };
        assert!(matches!(about(ready.id)[..], [Payload::Queued(_)]));
        assert!(
            matches!(about(doomed.id)[..], [Payload::Cancelled(c)] if c.reason.as_deref() == Some("dependency_failed"))
        );
        assert!(about(blocked.id).is_empty());
    }

    #[test]
    fn no_capacity_waits_out_its_grace_then_fails() {
        let now = Utc::now();
        let huge = task(json!({"shell": "x", "resources": {"cpu": 64}}), vec![]);
        let queued_at = huge.queued_at.unwrap();
        let m = model(vec![huge.clone()]);
        let workers = [worker("w", 4.0, now)];
        let early = decide(
            &m,
            &workers,
            &options(),
            queued_at + chrono::Duration::seconds(5),
        );
        assert!(early.actions.is_empty());
        assert_eq!(early.unrunnable, 1, "no worker could ever fit 64 cores");
        assert_eq!(
            early.next_due,
            Some(queued_at + chrono::Duration::seconds(10))
        );
        let late = decide(
            &m,
            &workers,
            &options(),
            queued_at + chrono::Duration::seconds(10),
        );
        assert!(matches!(
            &late.actions[..],
            [Action::Task { payload: Payload::Failed { reason, .. }, .. }] if reason == "no_capacity"
        ));
    }

    #[test]
    fn placement_counts_what_runs_and_skips_external_tasks() {
        let now = Utc::now();
        let busy = task(
            json!({"shell": "x", "resources": {"cpu": 3}}),
            vec![assigned("w")],
        );
        let fits = task(json!({"shell": "x", "resources": {"cpu": 1}}), vec![]);
        let too_big = task(json!({"shell": "x", "resources": {"cpu": 2}}), vec![]);
        let external = task(json!({"shell": "x", "executor": "external"}), vec![]);
        let m = model(vec![busy, fits.clone(), too_big, external]);
        assert_eq!(
            m.queue().len(),
            2,
            "external tasks never queue for placement"
        );
        let pass = decide(&m, &[worker("w", 4.0, now)], &options(), now);
        let assigned: Vec<Uuid> = pass
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Task {
                    task_id,
                    payload: Payload::Assigned { attempt: 1, .. },
                    ..
                } => Some(*task_id),
                _ => None,
            })
            .collect();
        assert_eq!(assigned, vec![fits.id]);
    }

    #[test]
    fn stale_states_never_replace_newer_ones() {
        let t = task(json!({"shell": "x"}), vec![assigned("w")]);
        let mut m = model(vec![t.clone()]);
        let mut older = t.clone();
        older.seq = 1;
        older.state = TaskStatus::Queued;
        m.update(TaskRecord {
            task: older,
            partition: 0,
            last_offset: 0,
        });
        assert!(m.queue().is_empty());
        assert_eq!(
            m.tasks().next().map(|t| t.state),
            Some(TaskStatus::Assigned)
        );
    }
}
