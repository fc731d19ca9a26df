//! Pure placement planner: decides, in one pass, which queued tasks start on
//! which workers.
//!
//! The planner does no I/O, never reads the clock and never blocks; the caller
//! hands it the [`Queue`] and a snapshot of the workers ([`WorkerView`]) and
//! applies the returned [`Plan`].
//!
//! # Order: priority with aging
//!
//! A task's *effective priority* at time `t` is
//! `priority + r × (t − queued_at)`, with times in minutes and `r` the
//! [`PlanOptions::aging_per_minute`] rate. The aging term `r × t` is the same
//! for every task, so the order by effective priority is the same at every `t`
//! and equals the order by the static key `priority − r × queued_at` (highest
//! first), ties broken by submission time (earliest first) and then task id.
//! The [`Queue`] is kept sorted by that key, so insertions and removals are
//! `O(log n)` and a pass never re-sorts.
//!
//! With `r = 0` the order is strict priority, then FIFO by submission.
//! Negative or non-finite rates are treated as `0`.
//!
//! **Starvation bound.** Priorities range over `0..=100`. With `r > 0`, a task
//! of priority `p` can only be overtaken by tasks that entered the queue less
//! than `(100 − p) / r` minutes after it. Its wait is therefore bounded by the
//! work queued ahead of it plus the work that arrives in that window; after
//! that, nothing new can pass it.
//!
//! # Placement
//!
//! Tasks are visited in queue order. Each one is assigned to a worker, reserves
//! a worker, waits, or is reported unfit:
//!
//! 1. **Fit.** A task fits a worker when the worker is accepting, the task's
//!    need fits in the worker's free capacity (`total − used`) in cpu, memory
//!    and gpu, and every label the task requires is on the worker with the
//!    same value. Workers that are not accepting (draining or lost) are never
//!    used and never count as able to run a task.
//! 2. **Best fit → assignment.** Among the unreserved workers the task fits, it
//!    goes to the one that leaves the least free capacity: leftover gpu is
//!    compared first, then cpu, then memory; ties go to the smallest worker id.
//!    The need is added to that worker's usage before the next task is
//!    considered.
//! 3. **Reservation.** A task that fits no worker now, but would fit some
//!    accepting worker if that worker were empty (by total capacity and
//!    labels), reserves one such worker that no earlier task has reserved: the
//!    one closest to fitting it, i.e. with the most free capacity compared
//!    lexicographically over the dimensions the task needs (gpu, then cpu, then
//!    memory); ties go to the smallest worker id. Nothing else is placed on a
//!    reserved worker in this pass, so the blocked task starts as soon as that
//!    worker's running attempts finish. If every worker that could run the task
//!    is already reserved, the task simply waits. Reservations hold for one
//!    pass: the planner keeps no state, and the next pass recomputes them.
//! 4. **Backfill.** Later, smaller tasks keep being placed on unreserved
//!    workers. Backfill never touches a reserved worker, so it can never delay
//!    the task that holds the reservation.
//! 5. **Unfit.** A task that no accepting worker could run even when empty (its
//!    need exceeds every matching worker's total, or no accepting worker has
//!    its labels) is reported as unfit and reserves nothing; the caller fails
//!    it after a grace period.
//!
//! A pass walks the queue once, without sorting, and does work proportional to
//! the number of workers per task. Once every worker that could take a task is
//! reserved, the remaining tasks are only checked for being unfit.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};

use uuid::Uuid;

const MS_PER_MINUTE: f64 = 60_000.0;

/// Resources; cpu in millicores so arithmetic is exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Capacity {
    /// CPU in millicores (1000 = one core).
    pub cpu_milli: u64,
    /// Memory in bytes.
    pub memory: u64,
    /// Number of GPUs.
    pub gpu: u32,
}

impl Capacity {
    /// No resources at all.
    pub const ZERO: Capacity = Capacity {
        cpu_milli: 0,
        memory: 0,
        gpu: 0,
    };

    /// True when every dimension of `self` is at most the same dimension of
    /// `available`.
    pub fn fits_in(&self, available: Capacity) -> bool {
        self.cpu_milli <= available.cpu_milli
            && self.memory <= available.memory
            && self.gpu <= available.gpu
    }

    /// Dimension-wise sum, clamped at the maximum of each dimension.
    pub fn saturating_add(self, other: Capacity) -> Capacity {
        Capacity {
            cpu_milli: self.cpu_milli.saturating_add(other.cpu_milli),
            memory: self.memory.saturating_add(other.memory),
            gpu: self.gpu.saturating_add(other.gpu),
        }
    }

    /// Dimension-wise difference, clamped at zero.
    pub fn saturating_sub(self, other: Capacity) -> Capacity {
        Capacity {
            cpu_milli: self.cpu_milli.saturating_sub(other.cpu_milli),
            memory: self.memory.saturating_sub(other.memory),
            gpu: self.gpu.saturating_sub(other.gpu),
        }
    }

    /// True when every dimension is zero.
    #[cfg(test)]
    pub fn is_zero(&self) -> bool {
        *self == Capacity::ZERO
    }

    /// Dimension-wise maximum (an upper bound, not a real capacity).
    fn max_each(self, other: Capacity) -> Capacity {
        Capacity {
            cpu_milli: self.cpu_milli.max(other.cpu_milli),
            memory: self.memory.max(other.memory),
            gpu: self.gpu.max(other.gpu),
        }
    }

    /// The tuple compared for best fit and reservations: gpu, cpu, memory.
    fn gpu_cpu_memory(self) -> (u32, u64, u64) {
        (self.gpu, self.cpu_milli, self.memory)
    }
}

/// What the planner needs to know about one worker.
#[derive(Debug, Clone)]
pub struct WorkerView {
    /// Worker id; also the final tie-breaker between equally good workers.
    pub id: String,
    /// Total capacity of the worker.
    pub total: Capacity,
    /// Sum of the needs of attempts currently assigned to or running on it.
    /// Usage above `total` counts as no free capacity.
    pub used: Capacity,
    /// Labels the worker offers.
    pub labels: BTreeMap<String, String>,
    /// Projects whose tasks it runs; empty (or holding `*`) for every project.
    pub projects: Vec<String>,
    /// False when draining or lost: never placed on, and never counts as able
    /// to run a task.
    pub accepting: bool,
}

/// A task waiting in the queue.
#[derive(Debug, Clone)]
pub struct QueuedTask {
    /// Task id.
    pub id: Uuid,
    /// Base priority, `0..=100`; higher runs first.
    pub priority: i64,
    /// Unix time in ms at which the task entered the queue (aging starts here).
    pub queued_at_ms: i64,
    /// Unix time in ms of submission; breaks ties between equal priorities.
    pub submitted_at_ms: i64,
    /// Resources one attempt needs.
    pub need: Capacity,
    /// Required worker labels: all must be present with equal values.
    pub labels: BTreeMap<String, String>,
    /// Its project: only workers that serve it may run the task.
    pub project: String,
}

/// Tunables of the planner.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanOptions {
    /// Effective priority gained per minute spent in the queue; `0` disables
    /// aging (strict priority, then FIFO).
    pub aging_per_minute: f64,
}

/// Static sort key of a queued task; ascending order is scheduling order.
#[derive(Debug, Clone, Copy)]
struct OrderKey {
    /// `priority × 60 000 − rate × queued_at_ms`: the static key of the module
    /// docs scaled to milliseconds (avoids a division). Higher runs first.
    score: f64,
    submitted_at_ms: i64,
    id: Uuid,
}

impl OrderKey {
    fn new(task: &QueuedTask, aging_per_minute: f64) -> OrderKey {
        let score =
            task.priority as f64 * MS_PER_MINUTE - aging_per_minute * task.queued_at_ms as f64;
        OrderKey {
            // `+ 0.0` turns a possible -0.0 into +0.0 so `total_cmp` sees one zero.
            score: score + 0.0,
            submitted_at_ms: task.submitted_at_ms,
            id: task.id,
        }
    }
}

impl Ord for OrderKey {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .score
            .total_cmp(&self.score)
            .then_with(|| self.submitted_at_ms.cmp(&other.submitted_at_ms))
            .then_with(|| self.id.cmp(&other.id))
    }
}

impl PartialOrd for OrderKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for OrderKey {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for OrderKey {}

/// The queue, kept ordered by a static key so no pass re-sorts.
#[derive(Debug, Clone)]
pub struct Queue {
    aging_per_minute: f64,
    by_order: BTreeMap<OrderKey, QueuedTask>,
    key_by_id: HashMap<Uuid, OrderKey>,
}

impl Queue {
    /// An empty queue; a negative or non-finite aging rate is treated as `0`.
    pub fn new(options: PlanOptions) -> Queue {
        let rate = options.aging_per_minute;
        Queue {
            aging_per_minute: if rate.is_finite() && rate > 0.0 {
                rate
            } else {
                0.0
            },
            by_order: BTreeMap::new(),
            key_by_id: HashMap::new(),
        }
    }

    /// The options in effect (after sanitising the aging rate).
    #[cfg(test)]
    pub fn options(&self) -> PlanOptions {
        PlanOptions {
            aging_per_minute: self.aging_per_minute,
        }
    }

    /// Adds a task, replacing any existing entry with the same id.
    pub fn insert(&mut self, task: QueuedTask) {
        let key = OrderKey::new(&task, self.aging_per_minute);
        if let Some(old_key) = self.key_by_id.insert(task.id, key) {
            self.by_order.remove(&old_key);
        }
        self.by_order.insert(key, task);
    }

    /// Removes and returns the task with this id, if queued.
    pub fn remove(&mut self, id: &Uuid) -> Option<QueuedTask> {
        let key = self.key_by_id.remove(id)?;
        self.by_order.remove(&key)
    }

    /// The queued task with this id, if any.
    pub fn get(&self, id: &Uuid) -> Option<&QueuedTask> {
        self.key_by_id
            .get(id)
            .and_then(|key| self.by_order.get(key))
    }

    /// Number of queued tasks.
    pub fn len(&self) -> usize {
        self.by_order.len()
    }

    /// True when no task is queued.
    pub fn is_empty(&self) -> bool {
        self.by_order.is_empty()
    }

    /// The queued tasks in scheduling order (first = next to run).
    pub fn iter(&self) -> impl Iterator<Item = &QueuedTask> {
        self.by_order.values()
    }

    /// `priority + aging_per_minute × minutes waited` at `now_ms`. Linear in
    /// time (not clamped), so it always agrees with the queue order.
    pub fn effective_priority(&self, task: &QueuedTask, now_ms: i64) -> f64 {
        let waited_minutes = (now_ms as f64 - task.queued_at_ms as f64) / MS_PER_MINUTE;
        task.priority as f64 + self.aging_per_minute * waited_minutes
    }
}

/// The outcome of one planning pass. Every list is in queue order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Tasks to start now: task id → worker id.
    pub assignments: Vec<(Uuid, String)>,
    /// Blocked tasks → the worker held for them.
    pub reservations: Vec<(Uuid, String)>,
    /// Tasks that no accepting worker could run even when empty (by total
    /// capacity and labels).
    pub unfit: Vec<Uuid>,
}

/// Decides which queued tasks start where, in one pass over the queue.
///
/// See the module documentation for the rules.
pub fn plan(queue: &Queue, workers: &[WorkerView]) -> Plan {
    let mut planner = Planner::new(workers);
    let mut result = Plan::default();
    for task in queue.iter() {
        match planner.place(task) {
            Outcome::Assigned(slot) => result
                .assignments
                .push((task.id, planner.worker_id(slot).to_owned())),
            Outcome::Reserved(slot) => result
                .reservations
                .push((task.id, planner.worker_id(slot).to_owned())),
            Outcome::Unfit => result.unfit.push(task.id),
            Outcome::Waiting => {}
        }
    }
    result
}

/// What happened to one task in a pass; slots index `Planner::slots`.
enum Outcome {
    Assigned(usize),
    Reserved(usize),
    Unfit,
    Waiting,
}

/// An accepting worker as seen during one pass.
struct Slot<'a> {
    worker: &'a WorkerView,
    free: Capacity,
    reserved: bool,
}

/// The accepting workers that carry one required label set.
struct LabelGroup {
    /// Slot indices, in worker id order.
    members: Vec<usize>,
    /// Dimension-wise maximum of the members' totals: a quick unfit test.
    max_total: Capacity,
    /// Set once every member is reserved (this only ever becomes true).
    all_reserved: bool,
}

/// Working state of one pass; a local copy, the inputs are not modified.
struct Planner<'a> {
    /// Accepting workers, sorted by id.
    slots: Vec<Slot<'a>>,
    /// Groups of the workers that can run tasks of one (labels, project) requirement.
    groups: Vec<LabelGroup>,
    group_by_labels: HashMap<(&'a BTreeMap<String, String>, &'a str), usize>,
    /// The group of the last task that required no labels, by its project: most tasks
    /// require none and share a project, so most lookups end here without hashing.
    last_unlabelled: Option<(&'a str, usize)>,
    /// Dimension-wise maximum free capacity over unreserved slots.
    max_unreserved_free: Capacity,
    unreserved_count: usize,
}

impl<'a> Planner<'a> {
    fn new(workers: &'a [WorkerView]) -> Planner<'a> {
        let mut accepting: Vec<&WorkerView> =
            workers.iter().filter(|worker| worker.accepting).collect();
        accepting.sort_by(|a, b| a.id.cmp(&b.id));
        let slots: Vec<Slot<'a>> = accepting
            .into_iter()
            .map(|worker| Slot {
                worker,
                free: worker.total.saturating_sub(worker.used),
                reserved: false,
            })
            .collect();
        let mut planner = Planner {
            unreserved_count: slots.len(),
            slots,
            groups: Vec::new(),
            group_by_labels: HashMap::new(),
            last_unlabelled: None,
            max_unreserved_free: Capacity::ZERO,
        };
        planner.refresh_max_unreserved_free();
        planner
    }

    fn worker_id(&self, slot: usize) -> &'a str {
        &self.slots[slot].worker.id
    }

    fn build_group(&self, required: &BTreeMap<String, String>, project: &str) -> LabelGroup {
        let members: Vec<usize> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| runs(slot.worker, required, project))
            .map(|(index, _)| index)
            .collect();
        let max_total = members.iter().fold(Capacity::ZERO, |acc, &index| {
            acc.max_each(self.slots[index].worker.total)
        });
        let all_reserved = members.iter().all(|&index| self.slots[index].reserved);
        LabelGroup {
            members,
            max_total,
            all_reserved,
        }
    }

    fn group_for(&mut self, required: &'a BTreeMap<String, String>, project: &'a str) -> usize {
        if required.is_empty()
            && let Some((last, index)) = self.last_unlabelled
            && last == project
        {
            return index;
        }
        let index = match self.group_by_labels.get(&(required, project)) {
            Some(&index) => index,
            None => {
                let group = self.build_group(required, project);
                self.groups.push(group);
                let index = self.groups.len() - 1;
                self.group_by_labels.insert((required, project), index);
                index
            }
        };
        if required.is_empty() {
            self.last_unlabelled = Some((project, index));
        }
        index
    }

    fn refresh_max_unreserved_free(&mut self) {
        self.max_unreserved_free = self
            .slots
            .iter()
            .filter(|slot| !slot.reserved)
            .fold(Capacity::ZERO, |acc, slot| acc.max_each(slot.free));
    }

    fn place(&mut self, task: &'a QueuedTask) -> Outcome {
        let group_index = self.group_for(&task.labels, &task.project);
        let need = task.need;
        if !self.could_ever_fit(group_index, need) {
            return Outcome::Unfit;
        }
        if self.unreserved_count == 0 || self.groups[group_index].all_reserved {
            return Outcome::Waiting;
        }
        if need.fits_in(self.max_unreserved_free)
            && let Some(slot) = self.best_fit(group_index, need)
        {
            self.slots[slot].free = self.slots[slot].free.saturating_sub(need);
            self.refresh_max_unreserved_free();
            return Outcome::Assigned(slot);
        }
        match self.reservation_target(group_index, need) {
            Some(slot) => {
                self.slots[slot].reserved = true;
                self.unreserved_count -= 1;
                self.refresh_max_unreserved_free();
                Outcome::Reserved(slot)
            }
            None => Outcome::Waiting,
        }
    }

    /// Some member of the group could run `need` when empty.
    fn could_ever_fit(&self, group_index: usize, need: Capacity) -> bool {
        let group = &self.groups[group_index];
        need.fits_in(group.max_total)
            && group
                .members
                .iter()
                .any(|&index| need.fits_in(self.slots[index].worker.total))
    }

    /// The unreserved member that fits `need` now with the least leftover
    /// (gpu, cpu, memory); the first in id order wins ties.
    fn best_fit(&mut self, group_index: usize, need: Capacity) -> Option<usize> {
        let mut best: Option<(usize, (u32, u64, u64))> = None;
        let mut any_unreserved = false;
        for &index in &self.groups[group_index].members {
            let slot = &self.slots[index];
            if slot.reserved {
                continue;
            }
            any_unreserved = true;
            if !need.fits_in(slot.free) {
                continue;
            }
            let leftover = slot.free.saturating_sub(need).gpu_cpu_memory();
            if best.is_none_or(|(_, best_leftover)| leftover < best_leftover) {
                best = Some((index, leftover));
            }
        }
        if !any_unreserved {
            self.groups[group_index].all_reserved = true;
        }
        best.map(|(index, _)| index)
    }

    /// The unreserved member that could run `need` when empty and is closest
    /// to fitting it: most free capacity over the dimensions the task needs,
    /// compared gpu, cpu, memory; the first in id order wins ties.
    fn reservation_target(&mut self, group_index: usize, need: Capacity) -> Option<usize> {
        let mut best: Option<(usize, (u32, u64, u64))> = None;
        let mut any_unreserved = false;
        for &index in &self.groups[group_index].members {
            let slot = &self.slots[index];
            if slot.reserved {
                continue;
            }
            any_unreserved = true;
            if !need.fits_in(slot.worker.total) {
                continue;
            }
            let closeness = free_in_needed_dimensions(slot.free, need);
            if best.is_none_or(|(_, best_closeness)| closeness > best_closeness) {
                best = Some((index, closeness));
            }
        }
        if !any_unreserved {
            self.groups[group_index].all_reserved = true;
        }
        best.map(|(index, _)| index)
    }
}

/// Whether an accepting `worker` could run a task of `project` needing `need` and
/// carrying `labels` when it is empty (its total capacity, not what is free now).
pub fn fits_when_empty(
    need: Capacity,
    labels: &BTreeMap<String, String>,
    project: &str,
    worker: &WorkerView,
) -> bool {
    worker.accepting && need.fits_in(worker.total) && runs(worker, labels, project)
}

/// The worker serves `project` and has every required label with the same value.
fn runs(worker: &WorkerView, required: &BTreeMap<String, String>, project: &str) -> bool {
    serves(worker, project)
        && required
            .iter()
            .all(|(key, value)| worker.labels.get(key) == Some(value))
}

/// The worker runs tasks of `project`.
fn serves(worker: &WorkerView, project: &str) -> bool {
    worker.projects.is_empty() || worker.projects.iter().any(|p| p == "*" || p == project)
}

/// Free capacity as (gpu, cpu, memory), with dimensions the task does not
/// need zeroed so they never decide.
fn free_in_needed_dimensions(free: Capacity, need: Capacity) -> (u32, u64, u64) {
    (
        if need.gpu > 0 { free.gpu } else { 0 },
        if need.cpu_milli > 0 {
            free.cpu_milli
        } else {
            0
        },
        if need.memory > 0 { free.memory } else { 0 },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const T0: i64 = 1_700_000_000_000;

    fn capacity(cpu_milli: u64, memory: u64, gpu: u32) -> Capacity {
        Capacity {
            cpu_milli,
            memory,
            gpu,
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    fn worker(id: &str, total: Capacity) -> WorkerView {
        WorkerView {
            id: id.to_string(),
            total,
            used: Capacity::ZERO,
            labels: BTreeMap::new(),
            projects: Vec::new(),
            accepting: true,
        }
    }

    fn task(n: u128, priority: i64, need: Capacity) -> QueuedTask {
        QueuedTask {
            id: Uuid::from_u128(n),
            priority,
            queued_at_ms: T0,
            submitted_at_ms: T0 + n as i64,
            need,
            labels: BTreeMap::new(),
            project: "default".into(),
        }
    }

    fn queue_of(aging_per_minute: f64, tasks: Vec<QueuedTask>) -> Queue {
        let mut queue = Queue::new(PlanOptions { aging_per_minute });
        for task in tasks {
            queue.insert(task);
        }
        queue
    }

    fn ids(queue: &Queue) -> Vec<Uuid> {
        queue.iter().map(|task| task.id).collect()
    }

    fn assignment(n: u128, worker_id: &str) -> (Uuid, String) {
        (Uuid::from_u128(n), worker_id.to_string())
    }

    #[test]
    fn higher_priority_takes_the_only_slot() {
        let one_core = capacity(1000, 0, 0);
        let queue = queue_of(
            0.0,
            vec![
                task(1, 10, one_core),
                task(2, 90, one_core),
                task(3, 50, one_core),
            ],
        );
        let result = plan(&queue, &[worker("w1", one_core)]);
        assert_eq!(result.assignments, vec![assignment(2, "w1")]);
        // The next in line holds the now-busy worker; the last one waits.
        assert_eq!(result.reservations, vec![assignment(3, "w1")]);
        assert!(result.unfit.is_empty());
    }

    #[test]
    fn equal_priority_runs_in_submission_order() {
        let one_core = capacity(1000, 0, 0);
        let mut early = task(7, 50, one_core);
        early.submitted_at_ms = T0 - 5;
        let late = task(3, 50, one_core);
        let queue = queue_of(0.0, vec![late, early]);
        assert_eq!(ids(&queue), vec![Uuid::from_u128(7), Uuid::from_u128(3)]);
        let result = plan(&queue, &[worker("w1", one_core)]);
        assert_eq!(result.assignments, vec![assignment(7, "w1")]);
    }

    #[test]
    fn aging_lets_an_old_low_priority_task_pass_newer_high_priority_ones() {
        let rate = 2.0;
        let window_ms = (100.0 / rate * MS_PER_MINUTE) as i64;
        let epsilon_ms = 1_000;
        let old_low = task(1, 0, Capacity::ZERO);
        let mut slightly_later_high = task(2, 100, Capacity::ZERO);
        slightly_later_high.queued_at_ms = T0 + window_ms - epsilon_ms;
        let mut much_later_high = task(3, 100, Capacity::ZERO);
        much_later_high.queued_at_ms = T0 + window_ms + epsilon_ms;
        let queue = queue_of(
            rate,
            vec![
                much_later_high.clone(),
                old_low.clone(),
                slightly_later_high.clone(),
            ],
        );
        assert_eq!(
            ids(&queue),
            vec![Uuid::from_u128(2), Uuid::from_u128(1), Uuid::from_u128(3)]
        );

        let now = T0 + 2 * window_ms;
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(queue.effective_priority(&old_low, now), 200.0));
        assert!(close(
            queue.effective_priority(&slightly_later_high, now),
            200.0 + rate / 60.0
        ));
        assert!(close(
            queue.effective_priority(&much_later_high, now),
            200.0 - rate / 60.0
        ));
        assert!(close(queue.effective_priority(&old_low, T0), 0.0));
    }

    #[test]
    fn zero_aging_is_strict_priority_regardless_of_wait() {
        let old_low = task(1, 0, Capacity::ZERO);
        let mut new_high = task(2, 1, Capacity::ZERO);
        new_high.queued_at_ms = T0 + 365 * 24 * 3_600_000;
        let queue = queue_of(0.0, vec![old_low.clone(), new_high]);
        assert_eq!(ids(&queue), vec![Uuid::from_u128(2), Uuid::from_u128(1)]);
        assert_eq!(queue.effective_priority(&old_low, T0 + 3_600_000), 0.0);
    }

    #[test]
    fn invalid_aging_rates_are_treated_as_zero() {
        for rate in [-1.0, f64::NAN, f64::INFINITY] {
            let queue = Queue::new(PlanOptions {
                aging_per_minute: rate,
            });
            assert_eq!(queue.options().aging_per_minute, 0.0);
        }
    }

    #[test]
    fn best_fit_picks_the_tighter_worker() {
        let need = capacity(2000, 2 * GIB, 0);
        let queue = queue_of(0.0, vec![task(1, 50, need)]);
        let workers = [
            worker("a-roomy", capacity(16_000, 64 * GIB, 0)),
            worker("b-tight", capacity(4000, 8 * GIB, 0)),
        ];
        assert_eq!(
            plan(&queue, &workers).assignments,
            vec![assignment(1, "b-tight")]
        );
    }

    #[test]
    fn best_fit_compares_gpu_before_cpu() {
        // The cpu-only worker is roomier in cpu but leaves no gpu idle.
        let need = capacity(1000, GIB, 0);
        let queue = queue_of(0.0, vec![task(1, 50, need)]);
        let workers = [
            worker("gpu", capacity(2000, 4 * GIB, 1)),
            worker("plain", capacity(32_000, 64 * GIB, 0)),
        ];
        assert_eq!(
            plan(&queue, &workers).assignments,
            vec![assignment(1, "plain")]
        );
    }

    #[test]
    fn gpu_task_never_lands_on_a_gpu_less_worker() {
        let queue = queue_of(0.0, vec![task(1, 50, capacity(1000, GIB, 1))]);
        let mut gpu_worker = worker("z-gpu", capacity(8000, 32 * GIB, 1));
        gpu_worker.used = capacity(0, 0, 1);
        let workers = [
            worker("a-plain", capacity(64_000, 256 * GIB, 0)),
            gpu_worker,
        ];
        let result = plan(&queue, &workers);
        assert!(result.assignments.is_empty());
        assert_eq!(result.reservations, vec![assignment(1, "z-gpu")]);
    }

    #[test]
    fn every_required_label_must_match() {
        let need = capacity(1000, GIB, 0);
        let mut wanted = task(1, 50, need);
        wanted.labels = labels(&[("zone", "eu"), ("disk", "ssd")]);
        let queue = queue_of(0.0, vec![wanted]);
        let mut only_zone = worker("a", capacity(8000, 8 * GIB, 0));
        only_zone.labels = labels(&[("zone", "eu")]);
        let mut wrong_disk = worker("b", capacity(8000, 8 * GIB, 0));
        wrong_disk.labels = labels(&[("zone", "eu"), ("disk", "hdd")]);
        let mut both = worker("c", capacity(64_000, 64 * GIB, 0));
        both.labels = labels(&[("zone", "eu"), ("disk", "ssd"), ("extra", "x")]);
        let result = plan(&queue, &[only_zone.clone(), wrong_disk.clone(), both]);
        assert_eq!(result.assignments, vec![assignment(1, "c")]);

        let result = plan(&queue, &[only_zone, wrong_disk]);
        assert_eq!(result.unfit, vec![Uuid::from_u128(1)]);
    }

    #[test]
    fn a_task_runs_only_on_a_worker_of_its_project() {
        let need = capacity(1000, GIB, 0);
        let mut ml = task(1, 90, need);
        ml.project = "ml".into();
        let plain = task(2, 50, need);
        let queue = queue_of(0.0, vec![ml, plain]);
        let mut web_only = worker("a-web", capacity(64_000, 64 * GIB, 0));
        web_only.projects = vec!["web".into()];
        let mut ml_only = worker("b-ml", capacity(8000, 8 * GIB, 0));
        ml_only.projects = vec!["ml".into()];
        let result = plan(&queue, &[web_only.clone(), ml_only]);
        assert_eq!(result.assignments, vec![assignment(1, "b-ml")]);
        // No worker serves `default`: the plain task could never run there.
        assert_eq!(result.unfit, vec![Uuid::from_u128(2)]);
        let mut every = worker("c-all", capacity(8000, 8 * GIB, 0));
        every.projects = vec!["*".into()];
        let result = plan(&queue, &[web_only, every]);
        assert_eq!(
            result.assignments,
            vec![assignment(1, "c-all"), assignment(2, "c-all")]
        );
    }

    #[test]
    fn blocked_head_reserves_and_smaller_tasks_backfill_elsewhere() {
        let mut gpu_worker = worker("gpu", capacity(16_000, 64 * GIB, 2));
        gpu_worker.used = capacity(4000, 8 * GIB, 1);
        let cpu_worker = worker("cpu", capacity(8000, 16 * GIB, 0));
        let queue = queue_of(
            0.0,
            vec![
                task(1, 90, capacity(1000, GIB, 2)),
                task(2, 50, capacity(1000, GIB, 1)),
                task(3, 10, capacity(2000, 2 * GIB, 0)),
            ],
        );
        let result = plan(&queue, &[gpu_worker, cpu_worker]);
        assert_eq!(result.reservations, vec![assignment(1, "gpu")]);
        // Task 2 would fit on the gpu worker now, but it is held for task 1.
        assert_eq!(result.assignments, vec![assignment(3, "cpu")]);
        assert!(result.unfit.is_empty());
    }

    #[test]
    fn a_reserved_worker_is_not_reserved_twice() {
        let mut gpu_worker = worker("gpu", capacity(16_000, 64 * GIB, 2));
        gpu_worker.used = capacity(0, 0, 2);
        let queue = queue_of(
            0.0,
            vec![
                task(1, 90, capacity(1000, GIB, 1)),
                task(2, 80, capacity(1000, GIB, 1)),
            ],
        );
        let result = plan(&queue, &[gpu_worker]);
        assert_eq!(result.reservations, vec![assignment(1, "gpu")]);
        assert!(result.assignments.is_empty());
        assert!(result.unfit.is_empty());
    }

    #[test]
    fn reservation_prefers_the_worker_closest_to_fitting() {
        let mut busy = worker("a-busy", capacity(8000, 16 * GIB, 0));
        busy.used = capacity(7000, 0, 0);
        let mut half = worker("b-half", capacity(8000, 16 * GIB, 0));
        half.used = capacity(4000, 0, 0);
        let queue = queue_of(0.0, vec![task(1, 50, capacity(6000, GIB, 0))]);
        let result = plan(&queue, &[busy, half]);
        assert_eq!(result.reservations, vec![assignment(1, "b-half")]);
    }

    #[test]
    fn tasks_no_accepting_worker_can_ever_run_are_unfit() {
        let workers = [
            worker("a", capacity(8000, 16 * GIB, 0)),
            worker("b", capacity(16_000, 8 * GIB, 1)),
        ];
        let mut needs_missing_label = task(2, 50, capacity(1000, GIB, 0));
        needs_missing_label.labels = labels(&[("arch", "arm64")]);
        let queue = queue_of(
            0.0,
            vec![
                // Each dimension fits some worker, but no single worker fits all.
                task(1, 50, capacity(12_000, 12 * GIB, 0)),
                needs_missing_label,
                task(3, 50, capacity(1000, GIB, 0)),
            ],
        );
        let result = plan(&queue, &workers);
        assert_eq!(result.unfit, vec![Uuid::from_u128(1), Uuid::from_u128(2)]);
        assert_eq!(result.assignments, vec![assignment(3, "a")]);
        assert!(result.reservations.is_empty());

        let draining: Vec<WorkerView> = workers
            .iter()
            .cloned()
            .map(|mut worker| {
                worker.accepting = false;
                worker
            })
            .collect();
        let result = plan(&queue, &draining);
        assert_eq!(result.unfit.len(), 3);
        assert!(result.assignments.is_empty());
        assert!(result.reservations.is_empty());
    }

    #[test]
    fn a_draining_worker_is_never_used() {
        let mut draining = worker("a-draining", capacity(4000, 4 * GIB, 0));
        draining.accepting = false;
        let mut full = worker("b-full", capacity(8000, 8 * GIB, 0));
        full.used = full.total;
        let queue = queue_of(0.0, vec![task(1, 50, capacity(1000, GIB, 0))]);
        let result = plan(&queue, &[draining, full]);
        assert!(result.assignments.is_empty());
        assert_eq!(result.reservations, vec![assignment(1, "b-full")]);
    }

    #[test]
    fn queue_insert_replace_and_remove_keep_order_and_len() {
        let mut queue = queue_of(
            0.0,
            vec![
                task(1, 10, Capacity::ZERO),
                task(2, 20, Capacity::ZERO),
                task(3, 30, Capacity::ZERO),
            ],
        );
        assert_eq!(queue.len(), 3);
        let order =
            |queue: &Queue| -> Vec<u128> { queue.iter().map(|task| task.id.as_u128()).collect() };
        assert_eq!(order(&queue), vec![3, 2, 1]);

        queue.insert(task(1, 99, capacity(5, 5, 0)));
        assert_eq!(queue.len(), 3);
        assert_eq!(order(&queue), vec![1, 3, 2]);
        let replaced = queue
            .get(&Uuid::from_u128(1))
            .map(|task| (task.priority, task.need));
        assert_eq!(replaced, Some((99, capacity(5, 5, 0))));

        let removed = queue.remove(&Uuid::from_u128(3)).map(|task| task.priority);
        assert_eq!(removed, Some(30));
        assert_eq!(queue.remove(&Uuid::from_u128(3)).map(|task| task.id), None);
        assert!(queue.get(&Uuid::from_u128(3)).is_none());
        assert_eq!(queue.len(), 2);
        assert_eq!(order(&queue), vec![1, 2]);

        queue.remove(&Uuid::from_u128(1));
        queue.remove(&Uuid::from_u128(2));
        assert!(queue.is_empty());
        assert_eq!(queue.iter().count(), 0);
    }

    #[test]
    fn capacity_helpers() {
        let small = capacity(1000, 10, 1);
        let big = capacity(2000, 10, 1);
        assert!(small.fits_in(big));
        assert!(!big.fits_in(small));
        assert_eq!(big.saturating_sub(small), capacity(1000, 0, 0));
        assert_eq!(small.saturating_sub(big), Capacity::ZERO);
        assert_eq!(
            capacity(u64::MAX, 1, 2).saturating_add(small),
            capacity(u64::MAX, 11, 3)
        );
        assert!(Capacity::ZERO.is_zero());
        assert!(!small.is_zero());
    }

    /// Straightforward implementation of the documented rules, used as an
    /// oracle: sorts by effective priority and scans every worker per task.
    fn reference_plan(queue: &Queue, workers: &[WorkerView], now_ms: i64) -> Plan {
        let mut tasks: Vec<&QueuedTask> = queue.iter().collect();
        tasks.sort_by(|a, b| {
            queue
                .effective_priority(b, now_ms)
                .total_cmp(&queue.effective_priority(a, now_ms))
                .then(a.submitted_at_ms.cmp(&b.submitted_at_ms))
                .then(a.id.cmp(&b.id))
        });
        let mut state: Vec<(&WorkerView, Capacity, bool)> = workers
            .iter()
            .map(|worker| (worker, worker.total.saturating_sub(worker.used), false))
            .collect();
        state.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        let mut result = Plan::default();
        for task in tasks {
            let runs_on =
                |worker: &WorkerView| worker.accepting && runs(worker, &task.labels, &task.project);
            if !state
                .iter()
                .any(|(worker, _, _)| runs_on(worker) && task.need.fits_in(worker.total))
            {
                result.unfit.push(task.id);
                continue;
            }
            let best = state
                .iter()
                .enumerate()
                .filter(|(_, (worker, free, reserved))| {
                    !reserved && runs_on(worker) && task.need.fits_in(*free)
                })
                .min_by_key(|(_, (worker, free, _))| {
                    (free.saturating_sub(task.need).gpu_cpu_memory(), &worker.id)
                })
                .map(|(index, _)| index);
            if let Some(index) = best {
                state[index].1 = state[index].1.saturating_sub(task.need);
                result
                    .assignments
                    .push((task.id, state[index].0.id.clone()));
                continue;
            }
            let target = state
                .iter()
                .enumerate()
                .filter(|(_, (worker, _, reserved))| {
                    !reserved && runs_on(worker) && task.need.fits_in(worker.total)
                })
                .min_by_key(|(_, (worker, free, _))| {
                    (
                        std::cmp::Reverse((
                            free.gpu * u32::from(task.need.gpu > 0),
                            free.cpu_milli * u64::from(task.need.cpu_milli > 0),
                            free.memory * u64::from(task.need.memory > 0),
                        )),
                        &worker.id,
                    )
                })
                .map(|(index, _)| index);
            if let Some(index) = target {
                state[index].2 = true;
                result
                    .reservations
                    .push((task.id, state[index].0.id.clone()));
            }
        }
        result
    }

    /// Tiny deterministic generator (xorshift64*) so tests need no extra crate.
    struct Random(u64);

    impl Random {
        fn below(&mut self, bound: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % bound
        }

        fn pick<T: Copy>(&mut self, choices: &[T]) -> T {
            choices[self.below(choices.len() as u64) as usize]
        }
    }

    #[test]
    fn matches_the_reference_on_random_inputs() {
        let mut random = Random(0x9e37_79b9_7f4a_7c15);
        let label_sets = [
            labels(&[]),
            labels(&[("zone", "a")]),
            labels(&[("zone", "b")]),
            labels(&[("zone", "a"), ("disk", "ssd")]),
        ];
        let project_sets: [Vec<String>; 4] = [
            vec![],
            vec!["ml".into()],
            vec!["default".into()],
            vec!["*".into()],
        ];
        let mut totals = [0usize; 3];
        for case in 0..2_000 {
            let workers: Vec<WorkerView> = (0..random.below(6))
                .map(|index| {
                    let total = capacity(
                        random.pick(&[0, 2000, 4000, 8000]),
                        random.pick(&[0, 4, 8, 16]),
                        random.pick(&[0, 0, 1, 2, 4]),
                    );
                    let used = capacity(
                        random.below(total.cpu_milli + 2000),
                        random.below(total.memory + 1),
                        random.below(u64::from(total.gpu) + 1) as u32,
                    );
                    WorkerView {
                        id: format!("w{}", random.below(100) * 10 + index),
                        total,
                        used,
                        labels: label_sets[random.pick(&[0, 1, 2, 3])].clone(),
                        projects: project_sets[random.pick(&[0, 0, 1, 2, 3])].clone(),
                        accepting: random.below(5) > 0,
                    }
                })
                .collect();
            let aging = random.pick(&[0.0, 1.0, 3.0]);
            let tasks: Vec<QueuedTask> = (0..random.below(40))
                .map(|index| QueuedTask {
                    id: Uuid::from_u128(u128::from(random.below(1_000_000))),
                    priority: random.below(101) as i64,
                    queued_at_ms: T0 + random.below(120) as i64 * 60_000,
                    submitted_at_ms: T0 + random.below(10) as i64,
                    need: capacity(
                        random.pick(&[0, 500, 1000, 3000, 9000]),
                        random.pick(&[0, 1, 4, 8, 20]),
                        random.pick(&[0, 0, 0, 1, 2, 3]),
                    ),
                    labels: label_sets[random.pick(&[0, 0, 1, 2, 3])]
                        .clone()
                        .into_iter()
                        .chain((index % 7 == 6).then(|| ("rare".to_string(), "x".to_string())))
                        .collect(),
                    project: random.pick(&["default", "default", "ml"]).to_string(),
                })
                .collect();
            let queue = queue_of(aging, tasks);
            let expected = reference_plan(&queue, &workers, T0 + 500 * 60_000);
            assert_eq!(plan(&queue, &workers), expected, "case {case}");
            totals[0] += expected.assignments.len();
            totals[1] += expected.reservations.len();
            totals[2] += expected.unfit.len();
        }
        // Every kind of outcome was exercised many times.
        assert!(totals.iter().all(|&total| total > 1_000), "{totals:?}");
    }

    /// 10 workers (8 cpu-only, 2 with gpus) and 100 000 queued tasks: ~10 %
    /// need a gpu, ~1 % can never fit, the rest need one core.
    fn large_fixture(workers_start_full: bool) -> (Queue, Vec<WorkerView>) {
        let workers: Vec<WorkerView> = (0..10)
            .map(|index| {
                let total = if index < 8 {
                    capacity(16_000, 64 * GIB, 0)
                } else {
                    capacity(32_000, 128 * GIB, 4)
                };
                let mut view = worker(&format!("w{index:02}"), total);
                if workers_start_full {
                    view.used = total;
                }
                view
            })
            .collect();
        let mut random = Random(42);
        let tasks = (0..100_000u128).map(|n| {
            let need = if n % 97 == 0 {
                capacity(1_000_000, GIB, 0)
            } else if n % 10 == 0 {
                capacity(2000, 8 * GIB, 1)
            } else {
                capacity(1000, 2 * GIB, 0)
            };
            QueuedTask {
                id: Uuid::from_u128(n),
                priority: random.below(101) as i64,
                queued_at_ms: T0 + random.below(600) as i64 * 60_000,
                submitted_at_ms: T0 + n as i64,
                need,
                labels: BTreeMap::new(),
                project: "default".into(),
            }
        });
        (queue_of(1.0, tasks.collect()), workers)
    }

    #[test]
    fn plan_over_100k_tasks_matches_the_reference() {
        let unfit_count = (0..100_000).filter(|n| n % 97 == 0).count();

        let (queue, workers) = large_fixture(false);
        let result = plan(&queue, &workers);
        assert_eq!(result.unfit.len(), unfit_count);
        // 8 × 16 cores + 2 × 32 cores = 192 cores; gpu tasks need two.
        let cores_used: u64 = result
            .assignments
            .iter()
            .filter_map(|(id, _)| queue.get(id))
            .map(|task| task.need.cpu_milli / 1000)
            .sum();
        assert!(cores_used <= 192);
        assert!(result.assignments.len() > 96);
        let gpus_used = result
            .assignments
            .iter()
            .filter_map(|(id, _)| queue.get(id))
            .filter(|task| task.need.gpu > 0)
            .count();
        assert!(gpus_used <= 8);
        assert_eq!(result, reference_plan(&queue, &workers, T0));

        let (queue, workers) = large_fixture(true);
        let result = plan(&queue, &workers);
        assert!(result.assignments.is_empty());
        assert_eq!(result.reservations.len(), workers.len());
        assert_eq!(result.unfit.len(), unfit_count);
        assert_eq!(result, reference_plan(&queue, &workers, T0));
    }
}
