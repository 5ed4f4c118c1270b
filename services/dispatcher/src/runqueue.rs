//! The run queue: the dispatcher's scheduling decisions as a state machine free of IO. It holds
//! the queued tasks by capability, priority class and tenant, the free agents indexed per
//! capability by load, and chooses the next (task, agent) pair with the reason for it. The
//! scheduler ([`crate::scheduler`]) feeds it from the KV watches and carries out its decisions.
//!
//! The policy, in order:
//! 1. **Capability and labels**: only agents declaring the task's capability and carrying its
//!    labels are candidates; only live, non-draining agents below their concurrency are free.
//! 2. **Priority**: classes 0–9 take strict precedence, aged by waiting time (one level per
//!    `aging`), so nothing starves.
//! 3. **Fair share**: within a class, the tenant with the least virtual runtime goes first. Its
//!    virtual runtime is tokens / weight: an estimate is charged when a task is assigned (the
//!    tenant's running average per task) and corrected by the tokens actually used when it ends.
//! 4. **Affinity**: a task with a `context_key` waits up to `affinity_wait` for the agent that
//!    last served the key, then takes any candidate. Other tasks are not held up meanwhile.
//! 5. **Load**: the least loaded free agent (in flight ÷ capacity) wins; ties go to the agent
//!    given work least recently.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_protocol::{AgentRecord, AgentStatus};

/// Task and agent ids, shared between the indexes without copying.
pub type Id = Arc<str>;

/// Tasks of one tenant looked at per decision before moving on (affinity waits, label misfits).
const SCAN_LIMIT: usize = 32;
/// Most context keys remembered for affinity.
const MAX_AFFINITY_KEYS: usize = 200_000;

/// Scheduling policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// A waiting task gains one priority level per this much waiting; zero disables aging.
    pub aging: Duration,
    /// How long a task with a context key waits for the agent that served the key last.
    pub affinity_wait: Duration,
    /// Tokens charged for a task at assignment before its tenant has finished any task.
    pub default_estimate: u64,
    /// Weight per tenant (default 1).
    pub weights: HashMap<String, f64>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            aging: Duration::from_secs(60),
            affinity_wait: Duration::from_millis(250),
            default_estimate: 1000,
            weights: HashMap::new(),
        }
    }
}

/// A queued task, as the core needs it.
#[derive(Debug, Clone)]
pub struct Queued {
    pub id: Id,
    pub capability: Id,
    pub priority: u8,
    pub tenant: Id,
    /// Wall-clock submission time (aging).
    pub submitted_ms: u64,
    /// Not to be assigned before this wall-clock time (retry backoff).
    pub eligible_ms: u64,
    pub context_key: Option<Box<str>>,
    pub labels: Option<Box<BTreeMap<String, String>>>,
}

/// The current time, wall clock and monotonic.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub wall_ms: u64,
    pub mono: Instant,
}

impl Now {
    pub fn current() -> Self {
        Self { wall_ms: flotilla_protocol::time::now_ms(), mono: Instant::now() }
    }
}

/// One scheduling decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub task: Id,
    pub agent: Id,
    /// `affinity_hit`, `affinity_timeout`, `affinity_lost`, `idle_agent` or `least_loaded`.
    pub reason: &'static str,
    pub priority: u8,
    /// Priority after aging (may be below 0).
    pub effective_priority: i64,
    pub tenant: Id,
    /// The tenant's virtual runtime before this task was charged.
    pub vruntime: f64,
    /// Tokens charged now (the estimate), corrected when the task ends.
    pub charged: u64,
    /// Agent load before this task, in millionths of its capacity.
    pub load_ppm: u64,
    pub waited_ms: u64,
}

#[derive(Debug)]
struct Task {
    q: Queued,
    /// When it entered the queue here (affinity wait).
    since: Instant,
    /// In `delayed` rather than in a class queue.
    delayed: bool,
}

#[derive(Debug, Default)]
struct ClassQueue {
    by_time: BTreeSet<(u64, Id)>,
    by_tenant: HashMap<Id, BTreeSet<(u64, Id)>>,
}

#[derive(Debug, Default)]
struct CapQueue {
    classes: BTreeMap<u8, ClassQueue>,
}

#[derive(Debug)]
struct Tenant {
    vruntime: f64,
    weight: f64,
    queued: usize,
    running: usize,
    /// Running average of tokens per finished task.
    avg_tokens: Option<f64>,
}

#[derive(Debug)]
struct Agent {
    id: Id,
    capabilities: Vec<Id>,
    labels: BTreeMap<String, String>,
    capacity: u32,
    held: u32,
    /// Live status allows work (not draining, not in error).
    usable: bool,
    alive_until: Instant,
    /// Order of the last assignment (smaller = longer ago).
    seq: u64,
    /// Its key in the free-agent indexes, when it is in them.
    indexed: Option<(u64, u64)>,
}

impl Agent {
    fn load_ppm(&self) -> u64 {
        u64::from(self.held).saturating_mul(1_000_000) / u64::from(self.capacity.max(1))
    }
    fn free(&self) -> bool {
        self.usable && self.held < self.capacity
    }
    fn fits(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        labels.is_none_or(|l| l.iter().all(|(k, v)| self.labels.get(k) == Some(v)))
    }
}

#[derive(Debug)]
struct Running {
    agent: Id,
    tenant: Id,
    charged: f64,
}

/// The scheduling state: what is queued, what runs where, which agents are free.
#[derive(Debug, Default)]
pub struct RunQueue {
    policy: Policy,
    tasks: HashMap<Id, Task>,
    queues: HashMap<Id, CapQueue>,
    delayed: BTreeSet<(u64, Id)>,
    /// Tasks backing off, per capability.
    delayed_per_cap: HashMap<Id, usize>,
    running: HashMap<Id, Running>,
    tenants: HashMap<Id, Tenant>,
    agents: HashMap<Id, Agent>,
    /// Free agents per capability, by (load, seq).
    free: HashMap<Id, BTreeSet<(u64, u64, Id)>>,
    affinity: HashMap<Box<str>, Id>,
    seq: u64,
    queued: usize,
}

impl RunQueue {
    pub fn new(policy: Policy) -> Self {
        Self { policy, ..Default::default() }
    }

    /// Tasks waiting (queued or in their retry backoff).
    pub fn queued_len(&self) -> usize {
        self.tasks.len()
    }

    /// Agents and the tasks they hold.
    pub fn holders(&self) -> HashMap<Id, Vec<Id>> {
        let mut m: HashMap<Id, Vec<Id>> = HashMap::new();
        for (t, r) in &self.running {
            m.entry(r.agent.clone()).or_default().push(t.clone());
        }
        m
    }

    pub fn is_running(&self, task: &str) -> bool {
        self.running.contains_key(task)
    }

    fn tenant(&mut self, name: &Id) -> &mut Tenant {
        let weight = self.policy.weights.get(&**name).copied().filter(|w| *w > 0.0).unwrap_or(1.0);
        self.tenants.entry(name.clone()).or_insert(Tenant {
            vruntime: 0.0,
            weight,
            queued: 0,
            running: 0,
            avg_tokens: None,
        })
    }

    /// A tenant becomes active: it may not bank the time it was idle (CFS's placement).
    fn activate(&mut self, name: &Id) {
        let idle = self.tenants.get(name).is_none_or(|t| t.queued == 0 && t.running == 0);
        if !idle {
            return;
        }
        let floor = self
            .tenants
            .iter()
            .filter(|(n, t)| *n != name && (t.queued > 0 || t.running > 0))
            .map(|(_, t)| t.vruntime)
            .fold(f64::INFINITY, f64::min);
        let t = self.tenant(name);
        if floor.is_finite() && t.vruntime < floor {
            t.vruntime = floor;
        }
    }

    /// The queue as `flotilla queue` shows it: groups by capability, priority and tenant, the
    /// `limit` longest-waiting tasks, and the tenants' fair-share figures.
    pub fn report(&self, limit: usize, now: Now) -> flotilla_protocol::QueueReport {
        use flotilla_protocol::{QueueGroup, QueuedTaskInfo, TenantShare};
        let wait = |submitted: u64| now.wall_ms.saturating_sub(submitted);
        let mut groups: BTreeMap<(u8, Id, Id), (u64, u64)> = BTreeMap::new();
        for t in self.tasks.values() {
            let g =
                groups.entry((t.q.priority, t.q.capability.clone(), t.q.tenant.clone())).or_insert((0, 0));
            g.0 += 1;
            g.1 = g.1.max(wait(t.q.submitted_ms));
        }
        let mut oldest: Vec<&Task> = self.tasks.values().collect();
        if oldest.len() > limit {
            oldest.select_nth_unstable_by_key(limit, |t| (t.q.submitted_ms, t.q.id.clone()));
            oldest.truncate(limit);
        }
        oldest.sort_by_key(|t| (t.q.submitted_ms, t.q.id.clone()));
        let mut tenants: Vec<TenantShare> = self
            .tenants
            .iter()
            .filter(|(_, t)| t.queued > 0 || t.running > 0 || t.vruntime > 0.0)
            .map(|(name, t)| TenantShare {
                tenant: name.to_string(),
                weight: t.weight,
                vruntime: (t.vruntime * 1000.0).round() / 1000.0,
                queued: t.queued as u64,
                running: t.running as u64,
            })
            .collect();
        tenants.sort_by(|a, b| a.vruntime.total_cmp(&b.vruntime).then_with(|| a.tenant.cmp(&b.tenant)));
        flotilla_protocol::QueueReport {
            dispatcher: String::new(),
            queued: self.tasks.len() as u64,
            backing_off: self.delayed.len() as u64,
            running: self.running.len() as u64,
            groups: groups
                .into_iter()
                .map(|((priority, capability, tenant), (tasks, oldest_wait_ms))| QueueGroup {
                    capability: capability.to_string(),
                    priority,
                    tenant: tenant.to_string(),
                    tasks,
                    oldest_wait_ms,
                })
                .collect(),
            oldest: oldest
                .into_iter()
                .take(limit)
                .map(|t| QueuedTaskInfo {
                    task_id: t.q.id.to_string(),
                    capability: t.q.capability.to_string(),
                    priority: t.q.priority,
                    tenant: t.q.tenant.to_string(),
                    wait_ms: wait(t.q.submitted_ms),
                })
                .collect(),
            tenants,
        }
    }

    // ---- agents ------------------------------------------------------------------------------

    fn unindex(&mut self, id: &Id) {
        let Some(a) = self.agents.get_mut(id) else { return };
        if let Some((load, seq)) = a.indexed.take() {
            for c in &a.capabilities {
                if let Some(set) = self.free.get_mut(c) {
                    set.remove(&(load, seq, id.clone()));
                }
            }
        }
    }

    fn reindex(&mut self, id: &Id) {
        self.unindex(id);
        let Some(a) = self.agents.get_mut(id) else { return };
        if !a.free() {
            return;
        }
        let key = (a.load_ppm(), a.seq);
        a.indexed = Some(key);
        for c in &a.capabilities {
            self.free.entry(c.clone()).or_default().insert((key.0, key.1, id.clone()));
        }
    }

    /// Adds or refreshes an agent from its registry record; it counts as alive until `alive_until`.
    pub fn upsert_agent(&mut self, rec: &AgentRecord, alive_until: Instant) {
        let usable = !matches!(rec.status, AgentStatus::Draining | AgentStatus::Error);
        if let Some(a) = self.agents.get_mut(rec.agent_id.as_str()) {
            a.alive_until = alive_until;
            let same = a.usable == usable
                && a.capacity == rec.concurrency
                && a.labels == rec.labels
                && a.capabilities.len() == rec.capabilities.len()
                && a.capabilities.iter().zip(&rec.capabilities).all(|(x, y)| **x == **y);
            if same {
                return;
            }
            let id = a.id.clone();
            self.unindex(&id);
            if let Some(a) = self.agents.get_mut(&id) {
                a.usable = usable;
                a.capacity = rec.concurrency;
                a.labels = rec.labels.clone();
                a.capabilities = rec.capabilities.iter().map(|c| Id::from(c.as_str())).collect();
            }
            self.reindex(&id);
            return;
        }
        let id: Id = Id::from(rec.agent_id.as_str());
        let held = u32::try_from(self.running.values().filter(|r| r.agent == id).count()).unwrap_or(u32::MAX);
        self.agents.insert(
            id.clone(),
            Agent {
                id: id.clone(),
                capabilities: rec.capabilities.iter().map(|c| Id::from(c.as_str())).collect(),
                labels: rec.labels.clone(),
                capacity: rec.concurrency,
                held,
                usable,
                alive_until,
                seq: 0,
                indexed: None,
            },
        );
        self.reindex(&id);
    }

    /// Extends an agent's life to `alive_until` (its runner's heartbeat), its record unchanged.
    pub fn touch_agent(&mut self, id: &str, alive_until: Instant) {
        if let Some(a) = self.agents.get_mut(id) {
            a.alive_until = a.alive_until.max(alive_until);
        }
    }

    /// Forgets an agent (deregistered or long dead). Its tasks stay running until requeued.
    pub fn remove_agent(&mut self, id: &str) {
        let Some(key) = self.agents.get_key_value(id).map(|(k, _)| k.clone()) else { return };
        self.unindex(&key);
        self.agents.remove(&key);
    }

    /// Tasks an agent holds, as the core sees it.
    pub fn held(&self, agent: &str) -> u32 {
        self.agents.get(agent).map_or(0, |a| a.held)
    }

    /// Capabilities with tasks ready to run and no free live agent to take them.
    pub fn starved_capabilities(&self, now: Now) -> Vec<Id> {
        self.queues
            .keys()
            .filter(|cap| {
                self.free.get(*cap).is_none_or(|set| {
                    set.iter().all(|(_, _, a)| self.agents.get(a).is_none_or(|a| a.alive_until < now.mono))
                })
            })
            .cloned()
            .collect()
    }

    /// Whether any task of the capability is queued or backing off.
    pub fn has_queued(&self, capability: &str) -> bool {
        self.queues.contains_key(capability)
            || self.tasks.values().any(|t| t.delayed && &*t.q.capability == capability)
    }

    /// Whether the agent is registered, alive at `now`, and not in error.
    pub fn agent_alive(&self, id: &str, now: Instant) -> Option<bool> {
        self.agents.get(id).map(|a| a.alive_until >= now)
    }

    pub fn live_agents(&self, now: Instant) -> usize {
        self.agents.values().filter(|a| a.alive_until >= now).count()
    }

    // ---- tasks -------------------------------------------------------------------------------

    /// Adds (or replaces) a queued task. It waits out its backoff first if `eligible_ms` is later
    /// than `now`.
    pub fn enqueue(&mut self, q: Queued, now: Now) {
        self.remove_task(&q.id);
        self.activate(&q.tenant);
        self.tenant(&q.tenant).queued += 1;
        let delayed = q.eligible_ms > now.wall_ms;
        if delayed {
            self.delayed.insert((q.eligible_ms, q.id.clone()));
            *self.delayed_per_cap.entry(q.capability.clone()).or_default() += 1;
        } else {
            self.insert_queued(&q);
        }
        self.tasks.insert(q.id.clone(), Task { q, since: now.mono, delayed });
    }

    fn insert_queued(&mut self, q: &Queued) {
        let class =
            self.queues.entry(q.capability.clone()).or_default().classes.entry(q.priority).or_default();
        class.by_time.insert((q.submitted_ms, q.id.clone()));
        class.by_tenant.entry(q.tenant.clone()).or_default().insert((q.submitted_ms, q.id.clone()));
        self.queued += 1;
    }

    fn unqueue(&mut self, q: &Queued) {
        let Some(cq) = self.queues.get_mut(&q.capability) else { return };
        let Some(class) = cq.classes.get_mut(&q.priority) else { return };
        let key = (q.submitted_ms, q.id.clone());
        if class.by_time.remove(&key) {
            self.queued = self.queued.saturating_sub(1);
        }
        if let Some(t) = class.by_tenant.get_mut(&q.tenant) {
            t.remove(&key);
            if t.is_empty() {
                class.by_tenant.remove(&q.tenant);
            }
        }
        if class.by_time.is_empty() {
            cq.classes.remove(&q.priority);
        }
        if cq.classes.is_empty() {
            self.queues.remove(&q.capability);
        }
    }

    fn undelay(counts: &mut HashMap<Id, usize>, cap: &Id) {
        if let Some(n) = counts.get_mut(cap) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(cap);
            }
        }
    }

    /// Moves tasks whose backoff is over into their queues.
    pub fn release_due(&mut self, now: Now) {
        while let Some((at, id)) = self.delayed.first().cloned() {
            if at > now.wall_ms {
                break;
            }
            self.delayed.remove(&(at, id.clone()));
            let Some(task) = self.tasks.get_mut(&id) else { continue };
            task.delayed = false;
            Self::undelay(&mut self.delayed_per_cap, &task.q.capability);
            task.since = now.mono;
            let q = task.q.clone();
            self.insert_queued(&q);
        }
    }

    /// Forgets a task wherever it is (queued, delayed or running). A running task's estimate is
    /// refunded: it ended without a usage report (requeued, expired, cancelled, deleted).
    pub fn remove_task(&mut self, id: &str) {
        if let Some((key, task)) = self.tasks.remove_entry(id) {
            if task.delayed {
                self.delayed.remove(&(task.q.eligible_ms, key));
                Self::undelay(&mut self.delayed_per_cap, &task.q.capability);
            } else {
                self.unqueue(&task.q);
            }
            let t = self.tenant(&task.q.tenant);
            t.queued = t.queued.saturating_sub(1);
        }
        if let Some((_, r)) = self.running.remove_entry(id) {
            self.release(&r, -r.charged);
        }
    }

    /// Ends a running attempt and charges what it used: `tokens` replaces the estimate.
    pub fn finish(&mut self, id: &str, tokens: Option<u64>) {
        let Some(r) = self.running.remove(id) else { return };
        let delta = tokens.map_or(-r.charged, |t| precise(t) - r.charged);
        if let Some(t) = tokens {
            let tenant = self.tenant(&r.tenant);
            tenant.avg_tokens = Some(tenant.avg_tokens.map_or(precise(t), |a| 0.8 * a + 0.2 * precise(t)));
        }
        self.release(&r, delta);
    }

    fn release(&mut self, r: &Running, delta_tokens: f64) {
        let t = self.tenant(&r.tenant);
        t.running = t.running.saturating_sub(1);
        t.vruntime += delta_tokens / t.weight;
        if let Some(a) = self.agents.get_mut(&r.agent) {
            a.held = a.held.saturating_sub(1);
            let id = a.id.clone();
            self.reindex(&id);
        }
    }

    /// Records a task as running on `agent` (observed in the tasks bucket: assigned by an
    /// earlier dispatcher, or our own assignment coming back). Idempotent.
    pub fn observe_running(&mut self, id: &str, tenant: &str, agent: &str, context_key: Option<&str>) {
        if let Some(r) = self.running.get(id) {
            if &*r.agent == agent {
                return;
            }
            self.remove_task(id);
        }
        if self.tasks.contains_key(id) {
            self.remove_task(id);
        }
        let tenant: Id = Id::from(tenant);
        let agent_id: Id =
            self.agents.get_key_value(agent).map_or_else(|| Id::from(agent), |(k, _)| k.clone());
        self.activate(&tenant);
        self.tenant(&tenant).running += 1;
        if let Some(a) = self.agents.get_mut(&agent_id) {
            a.held = a.held.saturating_add(1);
            let aid = a.id.clone();
            self.reindex(&aid);
        }
        if let Some(k) = context_key {
            self.remember(k, agent_id.clone());
        }
        self.running.insert(Id::from(id), Running { agent: agent_id, tenant, charged: 0.0 });
    }

    fn remember(&mut self, key: &str, agent: Id) {
        if self.affinity.len() >= MAX_AFFINITY_KEYS && !self.affinity.contains_key(key) {
            // Crude bound: forget everything; affinity is only a preference.
            self.affinity.clear();
        }
        self.affinity.insert(key.into(), agent);
    }

    // ---- decisions ---------------------------------------------------------------------------

    fn effective(&self, class: u8, oldest_ms: u64, now: Now) -> i64 {
        let aging = u64::try_from(self.policy.aging.as_millis()).unwrap_or(u64::MAX);
        let boost = now.wall_ms.saturating_sub(oldest_ms).checked_div(aging).unwrap_or(0);
        i64::from(class).saturating_sub(i64::try_from(boost).unwrap_or(i64::MAX))
    }

    /// Picks the next assignment and books it (the task runs on the agent from now on, as far as
    /// the core is concerned). `None` when nothing can be assigned now.
    pub fn next(&mut self, now: Now) -> Option<Decision> {
        // Capabilities with a free agent, most urgent (aged) class first.
        let mut order: Vec<(i64, u8, Id)> = Vec::new();
        for (cap, cq) in &self.queues {
            if self.free.get(cap).is_none_or(BTreeSet::is_empty) {
                continue;
            }
            for (class, q) in &cq.classes {
                if let Some((oldest, _)) = q.by_time.first() {
                    order.push((self.effective(*class, *oldest, now), *class, cap.clone()));
                }
            }
        }
        order.sort_unstable_by_key(|o| (o.0, o.1));
        for (effective, class, cap) in order {
            if let Some(d) = self.pick_in_class(&cap, class, effective, now) {
                return Some(d);
            }
        }
        None
    }

    fn pick_in_class(&mut self, cap: &Id, class: u8, effective: i64, now: Now) -> Option<Decision> {
        let mut tenants: Vec<(f64, Id)> = self
            .queues
            .get(cap)?
            .classes
            .get(&class)?
            .by_tenant
            .keys()
            .map(|t| (self.tenants.get(t).map_or(0.0, |x| x.vruntime), t.clone()))
            .collect();
        tenants.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        for (_, tenant) in tenants {
            let candidates: Vec<Id> = self
                .queues
                .get(cap)?
                .classes
                .get(&class)?
                .by_tenant
                .get(&tenant)
                .map(|s| s.iter().take(SCAN_LIMIT).map(|(_, id)| id.clone()).collect())
                .unwrap_or_default();
            for id in candidates {
                if let Some((agent, reason)) = self.choose_agent(&id, cap, now) {
                    return self.book(&id, agent, reason, effective, now);
                }
            }
        }
        None
    }

    /// The agent for a task, or `None` (no free candidate, or waiting for its affinity agent).
    fn choose_agent(&self, id: &Id, cap: &Id, now: Now) -> Option<(Id, &'static str)> {
        let task = self.tasks.get(id)?;
        let labels = task.q.labels.as_deref();
        let mut fallback_reason = None;
        if let Some(key) = task.q.context_key.as_deref()
            && let Some(agent_id) = self.affinity.get(key)
        {
            match self.agents.get(agent_id) {
                Some(a)
                    if a.alive_until >= now.mono
                        && a.usable
                        && a.capabilities.contains(cap)
                        && a.fits(labels) =>
                {
                    if a.free() {
                        return Some((a.id.clone(), "affinity_hit"));
                    }
                    if now.mono.saturating_duration_since(task.since) < self.policy.affinity_wait {
                        return None;
                    }
                    fallback_reason = Some("affinity_timeout");
                }
                _ => fallback_reason = Some("affinity_lost"),
            }
        }
        let set = self.free.get(cap)?;
        for (load, _, agent_id) in set {
            let Some(a) = self.agents.get(agent_id) else { continue };
            if a.alive_until < now.mono || !a.fits(labels) {
                continue;
            }
            let reason = fallback_reason.unwrap_or(if *load == 0 { "idle_agent" } else { "least_loaded" });
            return Some((a.id.clone(), reason));
        }
        None
    }

    fn book(
        &mut self,
        id: &Id,
        agent: Id,
        reason: &'static str,
        effective: i64,
        now: Now,
    ) -> Option<Decision> {
        let Task { q, since, .. } = self.tasks.remove(id)?;
        self.unqueue(&q);
        let estimate = {
            let t = self.tenant(&q.tenant);
            t.queued = t.queued.saturating_sub(1);
            t.avg_tokens
        }
        .unwrap_or(precise(self.policy.default_estimate));
        let vruntime = {
            let t = self.tenant(&q.tenant);
            let before = t.vruntime;
            t.running += 1;
            t.vruntime += estimate / t.weight;
            before
        };
        self.seq += 1;
        let seq = self.seq;
        let mut load_ppm = 0;
        if let Some(a) = self.agents.get_mut(&agent) {
            load_ppm = a.load_ppm();
            a.held = a.held.saturating_add(1);
            a.seq = seq;
        }
        self.reindex(&agent);
        if let Some(k) = q.context_key.as_deref() {
            self.remember(k, agent.clone());
        }
        self.running.insert(
            id.clone(),
            Running { agent: agent.clone(), tenant: q.tenant.clone(), charged: estimate },
        );
        Some(Decision {
            task: id.clone(),
            agent,
            reason,
            priority: q.priority,
            effective_priority: effective,
            tenant: q.tenant,
            vruntime,
            charged: estimate.round().max(0.0) as u64,
            load_ppm,
            waited_ms: u64::try_from(now.mono.saturating_duration_since(since).as_millis())
                .unwrap_or(u64::MAX),
        })
    }
}

/// Token counts as floating point for virtual runtimes (exact up to 2^53).
#[allow(clippy::cast_precision_loss)]
fn precise(t: u64) -> f64 {
    t as f64
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

    use super::*;

    fn agent(id: &str, caps: &[&str], capacity: u32) -> AgentRecord {
        AgentRecord {
            agent_id: id.into(),
            name: "t".into(),
            runner_id: "r".into(),
            tenant: "default".into(),
            capabilities: caps.iter().map(|c| (*c).to_owned()).collect(),
            labels: Default::default(),
            provider: "offline".into(),
            model: "m".into(),
            concurrency: capacity,
            in_flight: 0,
            status: AgentStatus::Idle,
            started_at_ms: 0,
            heartbeat_at_ms: 0,
            heartbeat_interval_ms: 1000,
            state: flotilla_protocol::AgentState::Idle,
            activities: vec![],
            protocol_version: 1,
            min_replicas: 1,
            max_replicas: 1,
            error_until_ms: None,
            recoveries: 0,
            incarnation: String::new(),
        }
    }

    fn task(id: &str, cap: &str, prio: u8, tenant: &str, at: u64) -> Queued {
        Queued {
            id: id.into(),
            capability: cap.into(),
            priority: prio,
            tenant: tenant.into(),
            submitted_ms: at,
            eligible_ms: 0,
            context_key: None,
            labels: None,
        }
    }

    fn now(wall_ms: u64) -> Now {
        Now { wall_ms, mono: Instant::now() }
    }

    fn live() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    #[test]
    fn priority_first_then_age_and_least_loaded_agents() {
        let mut c = RunQueue::new(Policy::default());
        c.upsert_agent(&agent("a", &["w"], 2), live());
        c.upsert_agent(&agent("b", &["w"], 2), live());
        c.enqueue(task("batch", "w", 8, "t", 1), now(10));
        c.enqueue(task("inter", "w", 2, "t", 5), now(10));
        let d1 = c.next(now(10)).unwrap();
        assert_eq!(&*d1.task, "inter");
        assert_eq!(d1.reason, "idle_agent");
        let d2 = c.next(now(10)).unwrap();
        assert_eq!(&*d2.task, "batch");
        assert_ne!(d1.agent, d2.agent, "the idle agent wins over the loaded one");
        assert!(c.next(now(10)).is_none());
    }

    #[test]
    fn aging_lifts_a_starving_class() {
        let mut c = RunQueue::new(Policy { aging: Duration::from_secs(1), ..Policy::default() });
        c.upsert_agent(&agent("a", &["w"], 1), live());
        c.enqueue(task("old-batch", "w", 8, "t", 0), now(0));
        c.enqueue(task("new-normal", "w", 5, "t", 9_000), now(9_000));
        // After 9 s the batch task ages to 8 - 9 = -1, ahead of the fresh normal one.
        assert_eq!(&*c.next(now(9_000)).unwrap().task, "old-batch");
    }

    #[test]
    fn the_tenant_with_the_least_weighted_tokens_goes_first() {
        let mut weights = HashMap::new();
        weights.insert("big".to_owned(), 3.0);
        let mut c = RunQueue::new(Policy { weights, default_estimate: 100, ..Policy::default() });
        c.upsert_agent(&agent("a", &["w"], 1), live());
        for i in 0..400u64 {
            c.enqueue(task(&format!("s{i}"), "w", 5, "small", i), now(0));
            c.enqueue(task(&format!("b{i}"), "w", 5, "big", i), now(0));
        }
        let mut tokens: HashMap<String, u64> = HashMap::new();
        for _ in 0..400 {
            let d = c.next(now(0)).unwrap();
            // Tasks of "small" cost twice the tokens of "big".
            let used = if &*d.tenant == "small" { 200 } else { 100 };
            *tokens.entry(d.tenant.to_string()).or_default() += used;
            c.finish(&d.task, Some(used));
        }
        let share = tokens["big"] as f64 / (tokens["big"] + tokens["small"]) as f64;
        assert!((share - 0.75).abs() < 0.02, "big got {share} of the tokens");
    }

    #[test]
    fn affinity_waits_briefly_for_its_agent_then_takes_any() {
        let mut c = RunQueue::new(Policy { affinity_wait: Duration::from_millis(50), ..Policy::default() });
        c.upsert_agent(&agent("a", &["w"], 1), live());
        c.upsert_agent(&agent("b", &["w"], 1), live());
        let mut t1 = task("t1", "w", 5, "t", 0);
        t1.context_key = Some("k".into());
        c.enqueue(t1, now(0));
        let first = c.next(now(0)).unwrap();
        let mut t2 = task("t2", "w", 5, "t", 1);
        t2.context_key = Some("k".into());
        c.enqueue(t2, now(0));
        // Its agent is busy: t2 waits, although the other agent is free.
        assert!(c.next(now(0)).is_none());
        c.finish(&first.task, Some(10));
        let second = c.next(now(0)).unwrap();
        assert_eq!((second.agent.clone(), second.reason), (first.agent.clone(), "affinity_hit"));
        // Busy again, and the wait runs out: any agent.
        let mut t3 = task("t3", "w", 5, "t", 2);
        t3.context_key = Some("k".into());
        c.enqueue(t3, Now { wall_ms: 0, mono: Instant::now() - Duration::from_millis(100) });
        let third = c.next(now(0)).unwrap();
        assert_eq!(third.reason, "affinity_timeout");
        assert_ne!(third.agent, first.agent);
    }

    #[test]
    fn labels_draining_dead_and_full_agents_are_skipped() {
        let mut c = RunQueue::new(Policy::default());
        let mut gpu = agent("gpu", &["w"], 1);
        gpu.labels.insert("model".into(), "big".into());
        c.upsert_agent(&gpu, live());
        let mut draining = agent("draining", &["w"], 5);
        draining.status = AgentStatus::Draining;
        c.upsert_agent(&draining, live());
        c.upsert_agent(&agent("dead", &["w"], 5), Instant::now() - Duration::from_secs(1));
        c.upsert_agent(&agent("plain", &["w"], 1), live());
        let mut t = task("needs-big", "w", 5, "t", 0);
        t.labels = Some(Box::new([("model".to_owned(), "big".to_owned())].into()));
        c.enqueue(t, now(0));
        c.enqueue(task("any", "w", 5, "t", 1), now(0));
        let d = c.next(now(0)).unwrap();
        assert_eq!((&*d.task, &*d.agent), ("needs-big", "gpu"));
        let d = c.next(now(0)).unwrap();
        assert_eq!((&*d.task, &*d.agent), ("any", "plain"));
        c.enqueue(task("more", "w", 5, "t", 2), now(0));
        assert!(c.next(now(0)).is_none(), "all usable agents are full");
    }

    #[test]
    fn retry_backoff_holds_a_task_until_it_is_due() {
        let mut c = RunQueue::new(Policy::default());
        c.upsert_agent(&agent("a", &["w"], 1), live());
        let mut t = task("r", "w", 5, "t", 0);
        t.eligible_ms = 1_000;
        c.enqueue(t, now(0));
        assert!(c.next(now(500)).is_none());
        c.release_due(now(1_000));
        assert_eq!(&*c.next(now(1_000)).unwrap().task, "r");
    }
}
