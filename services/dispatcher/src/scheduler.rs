//! The scheduler: one task owns the projection of the tasks and agents buckets (fed by KV
//! watches) and makes every assignment. An assignment is a revision-checked update of the task
//! record (the fence), then a publish to the agent's runner. It also requeues the tasks of agents
//! that stopped heartbeating, re-sends assignments nobody claimed, and fails queued tasks past
//! their deadline.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use flotilla_protocol::names::event_kind;
use flotilla_protocol::{
    AgentRecord, AgentStatus, Assignment, ErrorInfo, TaskEvent, TaskRecord, TaskState, codec, time::now_ms,
};
use flotilla_service::{Fleet, Topology, nats::FleetError};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{Config, Stats};

/// Queue order: priority (0 first), then submission time, then id.
type QueueKey = (u8, u64, String);

struct TaskView {
    rec: TaskRecord,
    rev: u64,
}

struct AgentView {
    rec: AgentRecord,
    last_seen: Instant,
    last_assigned: Option<Instant>,
}

struct Scheduler {
    config: Config,
    fleet: Fleet,
    topology: Topology,
    stats: Arc<Stats>,
    /// Non-terminal tasks.
    tasks: HashMap<String, TaskView>,
    /// Queued tasks per capability.
    queues: HashMap<String, BTreeSet<QueueKey>>,
    /// Assigned or running tasks per agent.
    by_agent: HashMap<String, HashSet<String>>,
    agents: HashMap<String, AgentView>,
    /// Assignments re-sent after a restart already.
    resent: HashSet<(String, u32)>,
    /// No agent is declared lost before this: its heartbeats may not have been seen yet.
    requeue_after: Instant,
}

pub async fn run(
    config: Config,
    fleet: Fleet,
    topology: Topology,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut s = Scheduler {
        config,
        fleet,
        topology,
        stats,
        tasks: HashMap::new(),
        queues: HashMap::new(),
        by_agent: HashMap::new(),
        agents: HashMap::new(),
        resent: HashSet::new(),
        requeue_after: Instant::now(),
    };
    s.requeue_after = Instant::now() + liveness_window(&s.config);
    let mut task_watch = watch(&s.topology.tasks).await?;
    let mut agent_watch = watch(&s.topology.agents).await?;
    let mut tick = tokio::time::interval(s.config.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            e = task_watch.next() => match e {
                Some(Ok(entry)) => {
                    s.on_task_entry(entry);
                    // Drain what is already buffered before scheduling, for batching.
                    while let Some(Some(Ok(entry))) = futures::FutureExt::now_or_never(task_watch.next()) {
                        s.on_task_entry(entry);
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "task watch failed; re-watching");
                    task_watch = watch(&s.topology.tasks).await?;
                }
                None => { task_watch = watch(&s.topology.tasks).await?; }
            },
            e = agent_watch.next() => match e {
                Some(Ok(entry)) => {
                    s.on_agent_entry(entry);
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "agent watch failed; re-watching");
                    agent_watch = watch(&s.topology.agents).await?;
                    s.requeue_after = Instant::now() + liveness_window(&s.config);
                }
                None => {
                    agent_watch = watch(&s.topology.agents).await?;
                    s.requeue_after = Instant::now() + liveness_window(&s.config);
                }
            },
            _ = tick.tick() => s.on_tick().await,
        }
        s.schedule().await;
    }
    Ok(())
}

async fn watch(store: &kv::Store) -> anyhow::Result<kv::Watch> {
    store.watch_all().await.map_err(|e| anyhow::anyhow!("failed to watch bucket: {e}"))
}

impl Scheduler {
    // ---- projection --------------------------------------------------------------------------

    fn forget_task(&mut self, id: &str) -> Option<TaskView> {
        let old = self.tasks.remove(id)?;
        if let Some(q) = self.queues.get_mut(&old.rec.capability) {
            q.remove(&queue_key(&old.rec));
        }
        if let Some(agent) = &old.rec.agent_id
            && let Some(set) = self.by_agent.get_mut(agent)
        {
            set.remove(id);
            if set.is_empty() {
                self.by_agent.remove(agent);
            }
        }
        Some(old)
    }

    fn apply_task(&mut self, rec: TaskRecord, rev: u64) {
        if self.tasks.get(&rec.id).is_some_and(|v| v.rev >= rev) {
            return;
        }
        self.forget_task(&rec.id);
        match rec.state {
            TaskState::Completed | TaskState::Failed => return,
            TaskState::Queued => {
                self.queues.entry(rec.capability.clone()).or_default().insert(queue_key(&rec));
            }
            TaskState::Assigned | TaskState::Running => {
                if let Some(agent) = &rec.agent_id {
                    self.by_agent.entry(agent.clone()).or_default().insert(rec.id.clone());
                }
            }
        }
        self.tasks.insert(rec.id.clone(), TaskView { rec, rev });
    }

    fn on_task_entry(&mut self, entry: kv::Entry) {
        match entry.operation {
            kv::Operation::Put => match codec::decode::<TaskRecord>(None, &entry.value) {
                Ok(rec) => self.apply_task(rec, entry.revision),
                Err(e) => tracing::error!(key = %entry.key, error = %e, "unreadable task record ignored"),
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                self.forget_task(&entry.key);
            }
        }
    }

    fn on_agent_entry(&mut self, entry: kv::Entry) {
        match entry.operation {
            kv::Operation::Put => match codec::decode::<AgentRecord>(None, &entry.value) {
                Ok(rec) => {
                    // An agent in a snapshot (start-up or re-watch) counts as seen now: judging it
                    // by its own clock would let clock skew requeue healthy work. A dead one is
                    // found out one liveness window later.
                    let last_seen = Instant::now();
                    let last_assigned = self.agents.get(&rec.agent_id).and_then(|a| a.last_assigned);
                    self.agents.insert(rec.agent_id.clone(), AgentView { rec, last_seen, last_assigned });
                }
                Err(e) => tracing::error!(key = %entry.key, error = %e, "unreadable agent record ignored"),
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                tracing::info!(agent_id = %entry.key, "agent deregistered");
                self.agents.remove(&entry.key);
            }
        }
    }

    fn alive(&self, a: &AgentView) -> bool {
        let interval = Duration::from_millis(a.rec.heartbeat_interval_ms.max(100));
        a.last_seen.elapsed() <= interval * self.config.missed_heartbeats.max(1) + Duration::from_millis(500)
    }

    // ---- scheduling --------------------------------------------------------------------------

    /// The best free agent for a task: alive, not draining, with the capability and labels, and
    /// the lowest load; ties go to the agent that was given work least recently.
    fn pick_agent(&self, rec: &TaskRecord) -> Option<(String, &'static str)> {
        let mut best: Option<(&AgentView, u64, usize)> = None;
        for a in self.agents.values() {
            if matches!(a.rec.status, AgentStatus::Draining | AgentStatus::Error)
                || !a.rec.capabilities.iter().any(|c| c == &rec.capability)
                || !rec.labels.iter().all(|(k, v)| a.rec.labels.get(k) == Some(v))
                || !self.alive(a)
            {
                continue;
            }
            let held = self.by_agent.get(&a.rec.agent_id).map_or(0, HashSet::len);
            let cap = usize::try_from(a.rec.concurrency).unwrap_or(1).max(1);
            if held >= cap {
                continue;
            }
            // Load as a fraction of capacity, in millionths, for exact comparison.
            let load = u64::try_from(held * 1_000_000 / cap).unwrap_or(u64::MAX);
            let better = match &best {
                None => true,
                Some((b, bl, _)) => {
                    (load, a.last_assigned.map(Reverse)) < (*bl, b.last_assigned.map(Reverse))
                }
            };
            if better {
                best = Some((a, load, held));
            }
        }
        best.map(|(a, _, held)| {
            (a.rec.agent_id.clone(), if held == 0 { "idle_agent" } else { "least_loaded" })
        })
    }

    async fn schedule(&mut self) {
        let queued: usize = self.queues.values().map(BTreeSet::len).sum();
        self.stats.queued.store(u64::try_from(queued).unwrap_or(u64::MAX), Ordering::Relaxed);
        if queued == 0 || self.agents.is_empty() {
            return;
        }
        // Capabilities with work, most urgent head first.
        let mut heads: Vec<(QueueKey, String)> =
            self.queues.iter().filter_map(|(cap, q)| q.first().map(|k| (k.clone(), cap.clone()))).collect();
        heads.sort();
        for (_, cap) in heads {
            while let Some(key) = self.queues.get(&cap).and_then(|q| q.first().cloned()) {
                let Some(view) = self.tasks.get(&key.2) else {
                    if let Some(q) = self.queues.get_mut(&cap) {
                        q.remove(&key);
                    }
                    continue;
                };
                let Some((agent_id, reason)) = self.pick_agent(&view.rec) else { break };
                if let Err(e) = self.assign(&key.2, &agent_id, reason).await {
                    tracing::warn!(task_id = %key.2, error = %e, "assignment failed; will retry");
                    return;
                }
            }
        }
    }

    async fn assign(&mut self, task_id: &str, agent_id: &str, reason: &str) -> Result<(), FleetError> {
        let span = tracing::info_span!("assign", task_id = %task_id, agent_id = %agent_id, reason);
        let trace = self.tasks.get(task_id).and_then(|v| v.rec.trace.clone());
        flotilla_service::trace::continue_from_traceparent(&span, trace.as_deref());
        self.assign_in_span(task_id, agent_id, reason).instrument(span).await
    }

    async fn assign_in_span(
        &mut self,
        task_id: &str,
        agent_id: &str,
        reason: &str,
    ) -> Result<(), FleetError> {
        let Some(view) = self.tasks.get(task_id) else { return Ok(()) };
        let Some(agent) = self.agents.get_mut(agent_id) else { return Ok(()) };
        let mut rec = view.rec.clone();
        rec.state = TaskState::Assigned;
        rec.attempt = rec.attempt.saturating_add(1);
        rec.agent_id = Some(agent_id.to_owned());
        rec.runner_id = Some(agent.rec.runner_id.clone());
        rec.updated_at_ms = now_ms();
        let runner_id = agent.rec.runner_id.clone();
        agent.last_assigned = Some(Instant::now());
        match self.fleet.kv_update(&self.topology.tasks, task_id, &rec, view.rev).await {
            Ok(rev) => {
                self.apply_task(rec.clone(), rev);
                self.stats.assigned.fetch_add(1, Ordering::Relaxed);
                self.resent.insert((rec.id.clone(), rec.attempt));
                // The event goes first, so `assigned` precedes the runner's `started`.
                let mut ev = TaskEvent::for_task(&rec, event_kind::ASSIGNED);
                ev.reason = Some(reason.to_owned());
                if let Err(e) = self.fleet.publish_event(&ev).await {
                    tracing::warn!(error = %e, "failed to publish assigned event");
                }
                self.send_assignment(&rec, &runner_id).await;
                Ok(())
            }
            Err(e) if e.is_conflict() => self.refresh(task_id).await,
            Err(e) => Err(e),
        }
    }

    /// Publishes the assignment to the agent's runner; de-duplicated per task and attempt.
    async fn send_assignment(&self, rec: &TaskRecord, runner_id: &str) {
        let Some(agent_id) = rec.agent_id.clone() else { return };
        let a = Assignment {
            task_id: rec.id.clone(),
            attempt: rec.attempt,
            agent_id,
            capability: rec.capability.clone(),
            input: rec.input.clone(),
            priority: rec.priority,
            tenant: rec.tenant.clone(),
            deadline_ms: rec.deadline_ms,
            budget_tokens: rec.budget_tokens,
            context_key: rec.context_key.clone(),
            assigned_at_ms: rec.updated_at_ms,
        };
        let msg_id = format!("{}:{}", rec.id, rec.attempt);
        if let Err(e) =
            self.fleet.publish_durable(self.fleet.names.assign_subject(runner_id), &a, Some(&msg_id)).await
        {
            // The task stays assigned; the assign timeout gives it to someone else.
            tracing::warn!(task_id = %rec.id, error = %e, "failed to publish assignment");
        }
    }

    async fn refresh(&mut self, task_id: &str) -> Result<(), FleetError> {
        match self.fleet.kv_get::<TaskRecord>(&self.topology.tasks, task_id).await {
            Ok(Some((rec, rev))) => self.apply_task(rec, rev),
            Ok(None) => {
                self.forget_task(task_id);
            }
            Err(FleetError::Decode { source, .. }) => {
                // An unreadable record is left alone rather than retried in a loop.
                tracing::error!(task_id, error = %source, "task record unreadable; dropping it from the schedule");
                self.forget_task(task_id);
            }
            Err(e) => {
                tracing::warn!(task_id, error = %e, "failed to re-read task");
                return Err(e);
            }
        }
        Ok(())
    }

    // ---- housekeeping ------------------------------------------------------------------------

    async fn on_tick(&mut self) {
        let live = self.agents.values().filter(|a| self.alive(a)).count();
        self.stats.live_agents.store(u64::try_from(live).unwrap_or(0), Ordering::Relaxed);
        // Forget agents that have been silent for long.
        self.agents.retain(|_, a| a.last_seen.elapsed() < Duration::from_secs(3600));

        let now = now_ms();
        let assign_timeout = u64::try_from(self.config.assign_timeout.as_millis()).unwrap_or(u64::MAX);
        let mut requeue: Vec<(String, &'static str)> = Vec::new();
        let mut resend: Vec<String> = Vec::new();
        let mut expired: Vec<String> = Vec::new();
        let may_requeue = Instant::now() >= self.requeue_after;
        for (agent_id, held) in self.by_agent.iter().filter(|_| may_requeue) {
            let lost = self
                .agents
                .get(agent_id)
                .is_none_or(|a| !self.alive(a) || a.rec.status == AgentStatus::Error);
            if lost {
                requeue.extend(held.iter().map(|t| (t.clone(), "agent_lost")));
            }
        }
        for (id, v) in &self.tasks {
            match v.rec.state {
                TaskState::Assigned if now.saturating_sub(v.rec.updated_at_ms) > assign_timeout => {
                    requeue.push((id.clone(), "assign_timeout"));
                }
                TaskState::Assigned if !self.resent.contains(&(id.clone(), v.rec.attempt)) => {
                    resend.push(id.clone());
                }
                TaskState::Queued if v.rec.deadline_ms.is_some_and(|d| d <= now) => expired.push(id.clone()),
                _ => {}
            }
        }
        // After a restart the assignment of an `assigned` task may never have been sent: send it
        // again once (the runner's claim fences duplicates).
        for id in resend {
            if let Some(v) = self.tasks.get(&id) {
                let key = (id.clone(), v.rec.attempt);
                if let Some(runner) = v.rec.runner_id.clone() {
                    let rec = v.rec.clone();
                    self.send_assignment(&rec, &runner).await;
                }
                self.resent.insert(key);
            }
        }
        self.resent.retain(|(id, attempt)| self.tasks.get(id).is_some_and(|v| v.rec.attempt == *attempt));
        for (id, why) in requeue {
            self.requeue(&id, why).await;
        }
        for id in expired {
            self.expire(&id).await;
        }
    }

    #[tracing::instrument(skip(self))]
    async fn requeue(&mut self, task_id: &str, why: &'static str) {
        let Some(view) = self.tasks.get(task_id) else { return };
        let mut rec = view.rec.clone();
        if !matches!(rec.state, TaskState::Assigned | TaskState::Running) {
            return;
        }
        let lost_agent = rec.agent_id.take();
        rec.state = TaskState::Queued;
        rec.runner_id = None;
        rec.updated_at_ms = now_ms();
        match self.fleet.kv_update(&self.topology.tasks, task_id, &rec, view.rev).await {
            Ok(rev) => {
                tracing::info!(task_id, agent_id = ?lost_agent, why, "task requeued");
                self.stats.requeued.fetch_add(1, Ordering::Relaxed);
                let mut ev = TaskEvent::for_task(&rec, event_kind::REQUEUED);
                ev.agent_id = lost_agent;
                ev.reason = Some(why.to_owned());
                self.apply_task(rec, rev);
                if let Err(e) = self.fleet.publish_event(&ev).await {
                    tracing::warn!(error = %e, "failed to publish requeued event");
                }
            }
            Err(e) if e.is_conflict() => {
                let _ = self.refresh(task_id).await;
            }
            Err(e) => tracing::warn!(task_id, error = %e, "requeue failed; will retry"),
        }
    }

    #[tracing::instrument(skip(self))]
    async fn expire(&mut self, task_id: &str) {
        let Some(view) = self.tasks.get(task_id) else { return };
        let mut rec = view.rec.clone();
        rec.state = TaskState::Failed;
        rec.error =
            Some(ErrorInfo::new("deadline_exceeded", "the deadline passed while the task was queued"));
        rec.finished_at_ms = Some(now_ms());
        rec.updated_at_ms = now_ms();
        match self.fleet.kv_update(&self.topology.tasks, task_id, &rec, view.rev).await {
            Ok(rev) => {
                let mut ev = TaskEvent::for_task(&rec, event_kind::FAILED);
                ev.error = rec.error.clone();
                self.apply_task(rec, rev);
                if let Err(e) = self.fleet.publish_event(&ev).await {
                    tracing::warn!(error = %e, "failed to publish failed event");
                }
            }
            Err(e) if e.is_conflict() => {
                let _ = self.refresh(task_id).await;
            }
            Err(e) => tracing::warn!(task_id, error = %e, "expiry failed; will retry"),
        }
    }
}

/// How long agents get to show a heartbeat after the registry is (re)loaded.
fn liveness_window(config: &Config) -> Duration {
    Duration::from_secs(u64::from(config.missed_heartbeats.max(1))) + Duration::from_millis(500)
}

fn queue_key(rec: &TaskRecord) -> QueueKey {
    (rec.priority.level(), rec.submitted_at_ms, rec.id.clone())
}
