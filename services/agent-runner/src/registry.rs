//! The runner's agents and their registry entries: registration, the runner's heartbeat (one
//! record per runner, in the runners bucket, which keeps every agent it hosts alive), agent
//! records written only when an agent's state, status or load changes, capability declarations,
//! agents started and stopped at runtime, and deregistration.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use flotilla_protocol::{
    AgentEvent, AgentRecord, AgentStatus, CapabilityRecord, ErrorInfo, PROTOCOL_VERSION, RunnerRecord,
    time::now_ms,
};
use flotilla_service::{Fleet, Topology, nats::FleetError};
use futures::StreamExt as _;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::fleet::{AgentTemplate, FleetFile};
use crate::lifecycle::Lifecycle;

/// One hosted agent.
#[derive(Debug)]
pub struct Slot {
    pub agent_id: String,
    pub template: Arc<AgentTemplate>,
    /// One permit per concurrent task.
    pub permits: Arc<Semaphore>,
    pub in_flight: AtomicU32,
    /// (task, attempt) pairs this process is running now, to ignore redeliveries of live work.
    pub running: Mutex<HashSet<(String, u32)>>,
    /// Crashes since the last success; at [`MAX_CRASHES`] the agent goes to `error`.
    pub crashes: AtomicU32,
    /// In ERROR: when it takes work again (epoch ms); [`NO_RECOVERY`] when it stays; 0 when not
    /// in ERROR.
    error_until_ms: AtomicU64,
    /// Times it came back from ERROR since its last task that ended without a crash.
    recoveries: AtomicU32,
    pub lifecycle: Arc<Lifecycle>,
    /// Told to stop: takes no new work (the registry shows it draining) and leaves once idle.
    pub stopping: AtomicBool,
    /// Set (under the `running` lock) when the agent has left: no assignment may start here.
    pub removed: AtomicBool,
    /// Cancelled when the agent leaves; ends its inbox.
    pub stop: CancellationToken,
    /// Instance number within its template (`<runner>-<template>-<n>`).
    pub index: u32,
    /// Its record as last written (heartbeat time left out), and when: a record that would say
    /// the same is not written again until [`AGENT_REFRESH`].
    written: Mutex<Option<(AgentRecord, tokio::time::Instant)>>,
}

pub use flotilla_service::topology::AGENT_REFRESH;

/// Most unchanged agent records refreshed per heartbeat (their refresh spread out, not a burst
/// of every agent at once).
const REFRESH_PER_BEAT: usize = 8;

/// Consecutive crashes after which an agent stops taking work.
pub const MAX_CRASHES: u32 = 3;

/// `error_until_ms` of an agent that stays in ERROR until its runner restarts.
const NO_RECOVERY: u64 = u64::MAX;

/// How an agent in ERROR comes back: after a cool-down that doubles with each return in one
/// crash loop (from `cooldown` up to `cooldown_max`), at most `limit` times; then it stays in
/// ERROR until its runner restarts. Coming back, it has one attempt: a crash sends it back to
/// ERROR, a task that ends without one ends the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    pub cooldown: Duration,
    pub cooldown_max: Duration,
    pub limit: u32,
}

impl Default for Recovery {
    fn default() -> Self {
        Self { cooldown: Duration::from_secs(30), cooldown_max: Duration::from_secs(600), limit: 5 }
    }
}

impl Recovery {
    /// The cool-down before return number `recoveries + 1`, or `None` when there is none.
    pub fn cooldown(&self, recoveries: u32) -> Option<Duration> {
        (recoveries < self.limit)
            .then(|| flotilla_protocol::time::backoff(self.cooldown, recoveries, self.cooldown_max))
    }
}

impl Slot {
    fn new(
        runner_id: &str,
        template: Arc<AgentTemplate>,
        index: u32,
        events: &mpsc::UnboundedSender<AgentEvent>,
    ) -> Self {
        let agent_id = format!("{runner_id}-{}-{index}", template.name);
        let permits = usize::try_from(template.concurrency).unwrap_or(1);
        Self {
            lifecycle: Arc::new(Lifecycle::new(agent_id.clone(), runner_id.to_owned(), events.clone())),
            agent_id,
            template,
            permits: Arc::new(Semaphore::new(permits)),
            in_flight: AtomicU32::new(0),
            running: Mutex::new(HashSet::new()),
            crashes: AtomicU32::new(0),
            error_until_ms: AtomicU64::new(0),
            recoveries: AtomicU32::new(0),
            stopping: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            stop: CancellationToken::new(),
            index,
            written: Mutex::new(None),
        }
    }

    /// True when the agent holds no work: nothing running and nothing waiting for a permit.
    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0
            && self.running.lock().map(|r| r.is_empty()).unwrap_or(false)
    }

    /// The agent as grants see it.
    pub fn party(&self, runner_id: &str) -> flotilla_protocol::Party {
        flotilla_protocol::Party {
            agent: Some(self.agent_id.clone()),
            runner: Some(runner_id.to_owned()),
            template: Some(self.template.name.clone()),
            capabilities: self.template.capabilities.clone(),
            tenant: self.template.tenant.clone(),
            ..Default::default()
        }
    }

    /// True when the agent crashed too often and takes no more work.
    pub fn in_error(&self) -> bool {
        self.crashes.load(Ordering::Relaxed) >= MAX_CRASHES
    }

    /// Counts a crash; at [`MAX_CRASHES`] in a row the agent goes to ERROR, with its cool-down
    /// per `recovery` (returned; `None`: it stays). Returns the crashes counted so far and, when
    /// the agent went to ERROR, its cool-down.
    pub fn crashed(&self, recovery: &Recovery, why: &str) -> (u32, Option<Option<Duration>>) {
        let crashes = self.crashes.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if crashes < MAX_CRASHES {
            return (crashes, None);
        }
        let cooldown = recovery.cooldown(self.recoveries.load(Ordering::Relaxed));
        let until = match cooldown {
            Some(c) => now_ms().saturating_add(u64::try_from(c.as_millis()).unwrap_or(u64::MAX)),
            None => NO_RECOVERY,
        };
        self.error_until_ms.store(until, Ordering::Relaxed);
        if let Err(e) = self.lifecycle.transition(None, flotilla_protocol::AgentState::Error, Some(why)) {
            tracing::debug!(error = %e, "agent already in error");
        }
        (crashes, Some(cooldown))
    }

    /// A task ended without a crash: the crash count and any crash loop are over.
    pub fn succeeded(&self) {
        self.crashes.store(0, Ordering::Relaxed);
        self.recoveries.store(0, Ordering::Relaxed);
    }

    /// Takes the agent out of ERROR when its cool-down is over at `now`: it gets one attempt
    /// (a crash sends it back). Returns the number of this return.
    fn recover_if_due(&self, now: u64) -> Option<u32> {
        let until = self.error_until_ms.load(Ordering::Relaxed);
        if !self.in_error() || until == 0 || until == NO_RECOVERY || now < until {
            return None;
        }
        self.error_until_ms.store(0, Ordering::Relaxed);
        let n = self.recoveries.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        self.crashes.store(MAX_CRASHES.saturating_sub(1), Ordering::Relaxed);
        if let Err(e) = self.lifecycle.transition(None, flotilla_protocol::AgentState::Idle, None) {
            tracing::debug!(error = %e, "agent left error already");
        }
        Some(n)
    }
}

/// All agents of this runner, plus counters for health replies.
#[derive(Debug)]
pub struct Agents {
    pub runner_id: String,
    /// This process of the runner (a new one each start, also under the same id).
    pub incarnation: String,
    interval: Duration,
    started_at_ms: u64,
    slots: RwLock<BTreeMap<String, Arc<Slot>>>,
    /// Every template of the fleet file, by name: what this runner can start more of.
    templates: BTreeMap<String, Arc<AgentTemplate>>,
    events: mpsc::UnboundedSender<AgentEvent>,
    /// Serialises registry writes with removals, so a heartbeat never re-registers an agent that
    /// has just left.
    registry_lock: tokio::sync::Mutex<()>,
    pub draining: AtomicBool,
    /// Model executions started (a re-run after a crash counts again).
    pub executions: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    /// Assignments dropped because the task had moved on (reassigned, finished, unknown).
    pub fenced: AtomicU64,
    /// Attempts that failed with a retryable error and were queued again.
    pub retried: AtomicU64,
    /// Attempts stopped by a `CancelTask`.
    pub cancelled: AtomicU64,
    /// Signalled when the registry should be written now (a lifecycle change).
    pub dirty: Arc<Notify>,
    /// The attempts this process holds, by (task, attempt, agent), so a `CancelTask` can stop them.
    attempts: Mutex<HashMap<(String, u32, String), Cancel>>,
    /// How agents in ERROR come back.
    pub recovery: Recovery,
}

/// How one held attempt is stopped: its token, and the reason given by whoever cancelled it.
#[derive(Debug, Clone)]
pub struct Cancel {
    pub token: CancellationToken,
    pub reason: Arc<OnceLock<ErrorInfo>>,
}

/// Keeps an attempt cancellable for as long as it lives.
#[derive(Debug)]
pub struct HeldAttempt<'a> {
    agents: &'a Agents,
    key: (String, u32, String),
    pub cancel: Cancel,
}

impl Drop for HeldAttempt<'_> {
    fn drop(&mut self) {
        self.agents.attempts_lock().remove(&self.key);
    }
}

impl Agents {
    /// Builds the agents of a fleet file: `<runner>-<template>-<n>`.
    pub fn new(
        runner_id: &str,
        fleet: &FleetFile,
        interval: Duration,
        events: &mpsc::UnboundedSender<AgentEvent>,
    ) -> Self {
        let mut slots = BTreeMap::new();
        let mut templates = BTreeMap::new();
        for t in &fleet.agents {
            let template = Arc::new(t.clone());
            templates.insert(t.name.clone(), template.clone());
            for n in 0..t.replicas {
                let slot = Slot::new(runner_id, template.clone(), n, events);
                slots.insert(slot.agent_id.clone(), Arc::new(slot));
            }
        }
        Self {
            runner_id: runner_id.to_owned(),
            incarnation: uuid::Uuid::now_v7().to_string(),
            interval,
            started_at_ms: now_ms(),
            slots: RwLock::new(slots),
            templates,
            events: events.clone(),
            registry_lock: tokio::sync::Mutex::new(()),
            draining: AtomicBool::new(false),
            executions: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            fenced: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            dirty: Arc::new(Notify::new()),
            attempts: Mutex::new(HashMap::new()),
            recovery: Recovery::default(),
        }
    }

    /// These agents, coming back from ERROR per `recovery`.
    pub fn with_recovery(mut self, recovery: Recovery) -> Self {
        self.recovery = recovery;
        self
    }

    /// Takes every agent whose cool-down is over out of ERROR.
    pub fn recover_due(&self) {
        let now = now_ms();
        let mut any = false;
        for slot in self.slots() {
            if let Some(n) = slot.recover_if_due(now) {
                any = true;
                tracing::warn!(
                    agent_id = %slot.agent_id,
                    recovery = n,
                    limit = self.recovery.limit,
                    "agent back from ERROR after its cool-down: it takes work again (one crash sends it back)"
                );
            }
        }
        if any {
            self.dirty.notify_one();
        }
    }

    fn attempts_lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u32, String), Cancel>> {
        self.attempts.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers attempt `attempt` of `task_id` on `agent_id` as held here until the returned
    /// guard drops; `token` is cancelled by [`Agents::cancel`].
    pub fn hold(
        &self,
        task_id: &str,
        attempt: u32,
        agent_id: &str,
        token: CancellationToken,
    ) -> HeldAttempt<'_> {
        let key = (task_id.to_owned(), attempt, agent_id.to_owned());
        let cancel = Cancel { token, reason: Arc::new(OnceLock::new()) };
        self.attempts_lock().insert(key.clone(), cancel.clone());
        HeldAttempt { agents: self, key, cancel }
    }

    /// Stops attempt `attempt` of `task_id` wherever this process holds it; returns how many
    /// holders were told (0 when it is not held here).
    pub fn cancel(&self, task_id: &str, attempt: u32, reason: &ErrorInfo) -> usize {
        let held: Vec<Cancel> = self
            .attempts_lock()
            .iter()
            .filter(|((t, a, _), _)| t == task_id && *a == attempt)
            .map(|(_, c)| c.clone())
            .collect();
        for c in &held {
            // The first reason wins; a repeated cancel changes nothing.
            let _ = c.reason.set(reason.clone());
            c.token.cancel();
        }
        held.len()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Slot>>> {
        self.slots.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Slot>>> {
        self.slots.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every agent (a snapshot).
    pub fn slots(&self) -> Vec<Arc<Slot>> {
        self.read().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    pub fn get(&self, agent_id: &str) -> Option<Arc<Slot>> {
        self.read().get(agent_id).cloned()
    }

    /// The fleet file's template `name`.
    pub fn template(&self, name: &str) -> Option<Arc<AgentTemplate>> {
        self.templates.get(name).cloned()
    }

    /// Concurrency of all agents that take work.
    pub fn total_capacity(&self) -> u32 {
        self.read()
            .values()
            .filter(|s| !s.stopping.load(Ordering::Relaxed))
            .map(|s| s.template.concurrency)
            .fold(0, u32::saturating_add)
    }

    pub fn in_flight_total(&self) -> u32 {
        self.read().values().map(|s| s.in_flight.load(Ordering::Relaxed)).fold(0, u32::saturating_add)
    }

    /// The names of every template this runner can host.
    pub fn template_names(&self) -> Vec<String> {
        self.templates.keys().cloned().collect()
    }

    /// Agents of `template` that take work, and those finishing before they leave, by index.
    pub fn of_template(&self, template: &str) -> (Vec<Arc<Slot>>, Vec<Arc<Slot>>) {
        let mut all: Vec<Arc<Slot>> =
            self.read().values().filter(|s| s.template.name == template).cloned().collect();
        all.sort_by_key(|s| s.index);
        all.into_iter().partition(|s| !s.stopping.load(Ordering::Relaxed))
    }

    /// Brings template `name` to `replicas` agents that take work: starts new ones (returned, for
    /// the caller to start their inboxes) or tells the surplus to stop, idle and newest first.
    /// Declarative, so repeating a request changes nothing.
    pub fn scale(&self, name: &str, replicas: u32) -> Result<Vec<Arc<Slot>>, ScaleError> {
        let template = self.template(name).ok_or_else(|| ScaleError::UnknownTemplate(name.to_owned()))?;
        if self.draining.load(Ordering::SeqCst) {
            return Err(ScaleError::Draining);
        }
        let mut slots = self.write();
        let mut active: Vec<Arc<Slot>> = slots
            .values()
            .filter(|s| s.template.name == name && !s.stopping.load(Ordering::SeqCst))
            .cloned()
            .collect();
        let want = usize::try_from(replicas).unwrap_or(usize::MAX);
        let mut started = Vec::new();
        if active.len() < want {
            let used: HashSet<u32> =
                slots.values().filter(|s| s.template.name == name).map(|s| s.index).collect();
            let mut next = 0u32;
            while active.len() < want {
                while used.contains(&next) {
                    next = next.checked_add(1).ok_or(ScaleError::TooMany)?;
                }
                let slot = Arc::new(Slot::new(&self.runner_id, template.clone(), next, &self.events));
                slots.insert(slot.agent_id.clone(), slot.clone());
                active.push(slot.clone());
                started.push(slot);
                next = next.checked_add(1).ok_or(ScaleError::TooMany)?;
            }
        } else if active.len() > want {
            // Idle ones first, then the newest.
            active.sort_by_key(|s| (s.in_flight.load(Ordering::SeqCst) == 0, s.index));
            for s in active.iter().rev().take(active.len().saturating_sub(want)) {
                s.stopping.store(true, Ordering::SeqCst);
                tracing::info!(agent_id = %s.agent_id, "agent told to stop");
            }
        }
        drop(slots);
        self.dirty.notify_one();
        Ok(started)
    }

    /// Tells one agent to stop (finish its work, then leave). Returns its template's name.
    pub fn stop_agent(&self, agent_id: &str) -> Result<String, ScaleError> {
        let slot = self.get(agent_id).ok_or_else(|| ScaleError::UnknownAgent(agent_id.to_owned()))?;
        if !slot.stopping.swap(true, Ordering::SeqCst) {
            tracing::info!(agent_id, "agent told to stop");
        }
        self.dirty.notify_one();
        Ok(slot.template.name.clone())
    }

    /// Removes the stopping agents that hold no more work: their entry leaves the registry and
    /// their lifecycle ends in `terminated`.
    pub async fn reap(&self, topology: &Topology) {
        let _registry = self.registry_lock.lock().await;
        let candidates: Vec<Arc<Slot>> =
            self.read().values().filter(|s| s.stopping.load(Ordering::SeqCst) && s.idle()).cloned().collect();
        for slot in candidates {
            {
                // Under the reservation lock, so no assignment can start on it after this.
                let Ok(running) = slot.running.lock() else { continue };
                if !running.is_empty() || slot.in_flight.load(Ordering::SeqCst) != 0 {
                    continue;
                }
                slot.removed.store(true, Ordering::SeqCst);
            }
            self.write().remove(&slot.agent_id);
            slot.stop.cancel();
            slot.lifecycle.set(None, flotilla_protocol::AgentState::Terminated);
            if let Err(e) = topology.agents.delete(&slot.agent_id).await {
                tracing::warn!(agent_id = %slot.agent_id, error = %e, "failed to deregister a stopped agent");
            }
            tracing::info!(agent_id = %slot.agent_id, "agent stopped and deregistered");
        }
    }

    fn record(&self, slot: &Slot) -> AgentRecord {
        let (state, activities) = slot.lifecycle.snapshot();
        let in_flight = slot.in_flight.load(Ordering::Relaxed);
        let status = if slot.in_error() {
            AgentStatus::Error
        } else if self.draining.load(Ordering::Relaxed) || slot.stopping.load(Ordering::Relaxed) {
            AgentStatus::Draining
        } else if in_flight > 0 {
            AgentStatus::Busy
        } else {
            AgentStatus::Idle
        };
        AgentRecord {
            agent_id: slot.agent_id.clone(),
            name: slot.template.name.clone(),
            runner_id: self.runner_id.clone(),
            tenant: slot.template.tenant.clone(),
            capabilities: slot.template.capabilities.clone(),
            labels: slot.template.labels.clone(),
            provider: slot.template.provider.clone(),
            model: slot.template.model.clone(),
            concurrency: slot.template.concurrency,
            in_flight,
            status,
            started_at_ms: self.started_at_ms,
            heartbeat_at_ms: now_ms(),
            heartbeat_interval_ms: u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX),
            incarnation: self.incarnation.clone(),
            state,
            activities,
            protocol_version: PROTOCOL_VERSION,
            min_replicas: slot.template.replica_limits().0,
            max_replicas: slot.template.replica_limits().1,
            error_until_ms: match slot.error_until_ms.load(Ordering::Relaxed) {
                0 | NO_RECOVERY => None,
                until => slot.in_error().then_some(until),
            },
            recoveries: slot.recoveries.load(Ordering::Relaxed),
        }
    }

    /// This runner's heartbeat record.
    fn runner_record(&self, fleet: &Fleet) -> RunnerRecord {
        RunnerRecord {
            runner_id: self.runner_id.clone(),
            incarnation: self.incarnation.clone(),
            instance: fleet.instance.clone(),
            started_at_ms: self.started_at_ms,
            heartbeat_at_ms: now_ms(),
            heartbeat_interval_ms: u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX),
            agents: u32::try_from(self.len()).unwrap_or(u32::MAX),
            in_flight: self.in_flight_total(),
            draining: self.draining.load(Ordering::Relaxed),
            protocol_version: PROTOCOL_VERSION,
        }
    }

    /// Writes the runner's heartbeat (with `heartbeat`) and the record of every agent whose
    /// state, status or load changed since its last write (or that is due for a refresh).
    /// Returns how many agent records were written.
    pub async fn beat(
        &self,
        fleet: &Fleet,
        topology: &Topology,
        heartbeat: bool,
    ) -> Result<usize, FleetError> {
        let _registry = self.registry_lock.lock().await;
        if heartbeat {
            let rec = self.runner_record(fleet);
            fleet.kv_put(&topology.runners, &self.runner_id, &rec).await?;
        }
        let now = tokio::time::Instant::now();
        let mut refreshes = REFRESH_PER_BEAT;
        let mut due: Vec<(Arc<Slot>, AgentRecord)> = Vec::new();
        for slot in self.slots() {
            let rec = self.record(&slot);
            let same = AgentRecord { heartbeat_at_ms: 0, ..rec.clone() };
            let written = slot.written.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let write = match &*written {
                Some((last, at)) if *last == same => {
                    let refresh = now.duration_since(*at) >= AGENT_REFRESH && refreshes > 0;
                    refreshes = refreshes.saturating_sub(usize::from(refresh));
                    refresh
                }
                _ => true,
            };
            drop(written);
            if write {
                due.push((slot, rec));
            }
        }
        let count = due.len();
        let results: Vec<Result<u64, FleetError>> = futures::stream::iter(due)
            .map(|(slot, rec)| {
                let (fleet, store) = (fleet.clone(), topology.agents.clone());
                async move {
                    let r = fleet.kv_put(&store, &rec.agent_id, &rec).await;
                    if r.is_ok() {
                        let same = AgentRecord { heartbeat_at_ms: 0, ..rec };
                        *slot.written.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                            Some((same, tokio::time::Instant::now()));
                    }
                    r
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<_>, _>>().map(|_| count)
    }

    /// Removes every agent's registry entry, then the runner's.
    pub async fn deregister(&self, topology: &Topology) {
        let _registry = self.registry_lock.lock().await;
        let ids: Vec<String> = self.read().keys().cloned().collect();
        for id in &ids {
            if let Err(e) = topology.agents.delete(id).await {
                tracing::warn!(agent = %id, error = %e, "failed to deregister agent");
            }
        }
        if let Err(e) = topology.runners.delete(&self.runner_id).await {
            tracing::warn!(runner = %self.runner_id, error = %e, "failed to deregister the runner");
        }
    }

    /// Figures for health replies.
    pub fn health_details(&self) -> serde_json::Value {
        let mut templates: BTreeMap<&str, u32> = self.templates.keys().map(|k| (k.as_str(), 0)).collect();
        let slots = self.read();
        for s in slots.values().filter(|s| !s.stopping.load(Ordering::Relaxed)) {
            if let Some(n) = templates.get_mut(s.template.name.as_str()) {
                *n = n.saturating_add(1);
            }
        }
        serde_json::json!({
            "runner_id": self.runner_id,
            "agents": slots.len(),
            "templates": templates,
            "in_flight": self.in_flight_total(),
            "executions": self.executions.load(Ordering::Relaxed),
            "completed": self.completed.load(Ordering::Relaxed),
            "failed": self.failed.load(Ordering::Relaxed),
            "fenced": self.fenced.load(Ordering::Relaxed),
            "retried": self.retried.load(Ordering::Relaxed),
            "cancelled": self.cancelled.load(Ordering::Relaxed),
            "draining": self.draining.load(Ordering::Relaxed),
        })
    }
}

/// Records every capability of the fleet file in the capabilities bucket (first writer wins).
pub async fn declare_capabilities(
    fleet: &Fleet,
    topology: &Topology,
    file: &FleetFile,
) -> anyhow::Result<()> {
    let mut caps: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for t in &file.agents {
        for c in &t.capabilities {
            caps.entry(c.as_str()).or_default().push(t.name.clone());
        }
    }
    for (cap, templates) in caps {
        let rec = CapabilityRecord { capability: cap.to_owned(), templates, declared_at_ms: now_ms() };
        match fleet.kv_create(&topology.capabilities, cap, &rec).await {
            Ok(_) => {}
            Err(e) if e.is_conflict() => {}
            Err(e) => return Err(anyhow::anyhow!(e).context(format!("failed to declare capability {cap}"))),
        }
    }
    Ok(())
}

/// Least time between two registry writes asked for by lifecycle changes.
const DIRTY_GAP: Duration = Duration::from_millis(100);

/// Writes the runner's heartbeat every `interval` until shutdown, and the records of agents that
/// changed at those beats and soon after lifecycle changes.
pub async fn heartbeat_loop(
    agents: Arc<Agents>,
    fleet: Fleet,
    topology: Topology,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = tokio::time::Instant::now();
    loop {
        let heartbeat = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => true,
            _ = agents.dirty.notified() => {
                // Lifecycle changes are written within DIRTY_GAP of each other at most often,
                // however fast the transitions come: a busy agent changes state per task.
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(last + DIRTY_GAP) => {}
                }
                false
            }
        };
        last = tokio::time::Instant::now();
        agents.recover_due();
        if let Err(e) = agents.beat(&fleet, &topology, heartbeat).await {
            tracing::warn!(error = %e, "heartbeat failed");
        }
        agents.reap(&topology).await;
    }
}

/// Why a fleet change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    #[error("this runner's fleet file has no template {0:?}")]
    UnknownTemplate(String),
    #[error("this runner hosts no agent {0:?}")]
    UnknownAgent(String),
    #[error("the runner is draining and starts no agents")]
    Draining,
    #[error("too many agents")]
    TooMany,
}

impl ScaleError {
    /// Stable error code for replies.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownTemplate(_) => "unknown_template",
            Self::UnknownAgent(_) => "unknown_agent",
            Self::Draining => "unavailable",
            Self::TooMany => "limit_exceeded",
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    fn slot() -> (Slot, mpsc::UnboundedReceiver<AgentEvent>) {
        let file = FleetFile::parse("[[agent]]\nname = \"w\"\ncapabilities = [\"work\"]\n").unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        (Slot::new("r1", Arc::new(file.agents[0].clone()), 0, &tx), rx)
    }

    #[test]
    fn cool_downs_double_up_to_their_bound_and_end_after_the_limit() {
        let r =
            Recovery { cooldown: Duration::from_secs(30), cooldown_max: Duration::from_secs(100), limit: 3 };
        let c: Vec<Option<Duration>> = (0..4).map(|n| r.cooldown(n)).collect();
        assert_eq!(c, [Some(30), Some(60), Some(100), None].map(|s| s.map(Duration::from_secs)));
        assert_eq!(Recovery { limit: 0, ..r }.cooldown(0), None);
    }

    #[test]
    fn an_agent_in_error_comes_back_on_trial_and_a_success_ends_the_loop() {
        let (s, _events) = slot();
        let r = Recovery { cooldown: Duration::ZERO, cooldown_max: Duration::ZERO, limit: 2 };
        assert_eq!(s.crashed(&r, "x"), (1, None));
        assert_eq!(s.crashed(&r, "x"), (2, None));
        assert_eq!(s.crashed(&r, "x"), (3, Some(Some(Duration::ZERO))));
        assert!(s.in_error());
        assert_eq!(s.recover_if_due(now_ms()), Some(1));
        assert!(!s.in_error());
        // On trial: one crash sends it back.
        assert_eq!(s.crashed(&r, "x").1, Some(Some(Duration::ZERO)));
        assert_eq!(s.recover_if_due(now_ms()), Some(2));
        // The limit reached: it stays in ERROR.
        assert_eq!(s.crashed(&r, "x").1, Some(None));
        assert_eq!(s.recover_if_due(u64::MAX - 1), None);
        assert!(s.in_error());
        s.succeeded();
        assert_eq!(s.recoveries.load(Ordering::Relaxed), 0);
    }
}
