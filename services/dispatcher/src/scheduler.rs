//! The scheduler: one task owns the projection of the tasks and agents buckets (fed by KV
//! watches) and carries out the decisions of the scheduling core ([`crate::runqueue`]). An
//! assignment is a revision-checked update of the task record (the fence), an `assigned` event
//! that says why, then a publish to the agent's runner. It also requeues the tasks of agents that
//! stopped heartbeating, re-sends assignments nobody claimed, holds retries for their backoff,
//! and fails tasks past their deadline, queued or running (telling the runner to stop).

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use flotilla_protocol::names::{event_kind, runner_op};
use flotilla_protocol::{
    AgentRecord, AgentStatus, Assignment, CancelTask, ErrorInfo, TaskEvent, TaskRecord, TaskState, codec,
    failure, time::now_ms,
};
use flotilla_service::{Fleet, Topology, nats::FleetError};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::runqueue::{Decision, Id, Now, Queued, RunQueue};
use crate::{Config, Stats};

/// A non-terminal task as the scheduler keeps it. A queued task's record is kept encoded (a few
/// hundred bytes instead of a decoded record's kilobyte): at a million queued tasks that is what
/// the dispatcher's memory is made of.
struct TaskView {
    rev: u64,
    state: TaskState,
    attempt: u32,
    deadline_ms: Option<u64>,
    updated_at_ms: u64,
    runner_id: Option<String>,
    body: Body,
}

enum Body {
    Decoded(Box<TaskRecord>),
    Encoded(Box<[u8]>),
}

impl TaskView {
    fn new(rec: TaskRecord, rev: u64, raw: Option<&[u8]>) -> Self {
        let (state, attempt, deadline_ms, updated_at_ms) =
            (rec.state, rec.attempt, rec.deadline_ms, rec.updated_at_ms);
        let runner_id = rec.runner_id.clone();
        let body = match (rec.state, raw) {
            (TaskState::Queued, Some(raw)) => Body::Encoded(raw.into()),
            (TaskState::Queued, None) => match codec::encode(flotilla_protocol::WireFormat::Msgpack, &rec) {
                Ok(bytes) => Body::Encoded(bytes.into()),
                Err(_) => Body::Decoded(Box::new(rec)),
            },
            _ => Body::Decoded(Box::new(rec)),
        };
        Self { rev, state, attempt, deadline_ms, updated_at_ms, runner_id, body }
    }

    /// The full record (decoded again when kept encoded).
    fn record(&self) -> Option<TaskRecord> {
        match &self.body {
            Body::Decoded(rec) => Some((**rec).clone()),
            Body::Encoded(raw) => match codec::decode(None, raw) {
                Ok(rec) => Some(rec),
                Err(e) => {
                    tracing::error!(error = %e, "a kept task record no longer decodes");
                    None
                }
            },
        }
    }
}

/// What the scheduler keeps of an agent besides the core's view.
struct AgentInfo {
    runner_id: String,
    status: AgentStatus,
    last_seen: Instant,
    template: String,
    capabilities: Vec<String>,
    min_replicas: u32,
    max_replicas: u32,
}

/// Autoscaling state: since when each capability is starved, each agent idle, and when each
/// (runner, template) was last scaled.
#[derive(Default)]
struct Autoscale {
    starved_since: HashMap<Id, Instant>,
    idle_since: HashMap<String, Instant>,
    last_step: HashMap<(String, String), Instant>,
}

struct Scheduler {
    config: Config,
    fleet: Fleet,
    topology: Topology,
    stats: Arc<Stats>,
    core: RunQueue,
    /// Non-terminal tasks.
    tasks: HashMap<String, TaskView>,
    agents: HashMap<String, AgentInfo>,
    /// Assignments re-sent after a restart already.
    resent: HashSet<(String, u32)>,
    /// No agent is declared lost before this: its heartbeats may not have been seen yet.
    requeue_after: Instant,
    autoscale: Autoscale,
    /// Tasks assigned whose claim has not shown up yet (their records still say queued): the
    /// agent, the attempt, the revision the assignment was based on and when it was sent.
    pending: HashMap<String, Proposal>,
    /// The latest revision of the tasks bucket the watch has delivered.
    seen_revision: u64,
    /// Assignments whose writes are in flight, and where their outcomes come back.
    in_flight: usize,
    done_tx: tokio::sync::mpsc::UnboundedSender<Written>,
}

/// Most assignments sent concurrently (each is two publishes whose acks are awaited together).
const MAX_IN_FLIGHT: usize = 256;

/// An assignment the runner has not claimed yet.
struct Proposal {
    agent: String,
    attempt: u32,
    base_rev: u64,
    decided_ms: u64,
    sent_at: Instant,
}

/// The outcome of an assignment's publishes.
struct Written {
    task_id: String,
    attempt: u32,
    base_rev: u64,
    decided_ms: u64,
    result: Result<(), FleetError>,
}

pub async fn run(
    config: Config,
    fleet: Fleet,
    topology: Topology,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut s = Scheduler {
        core: RunQueue::new(config.policy()),
        config,
        fleet,
        topology,
        stats,
        tasks: HashMap::new(),
        agents: HashMap::new(),
        resent: HashSet::new(),
        requeue_after: Instant::now(),
        autoscale: Autoscale::default(),
        pending: HashMap::new(),
        seen_revision: 0,
        in_flight: 0,
        done_tx,
    };
    s.requeue_after = Instant::now() + liveness_window(&s.config);
    let mut task_watch = watch(&s.topology.tasks).await?;
    let mut agent_watch = watch(&s.topology.agents).await?;
    // Only the scheduling dispatcher answers: it alone has the queue.
    let mut queue_requests = s
        .fleet
        .client
        .subscribe(s.fleet.names.dispatcher_queue())
        .await
        .map_err(|e| anyhow::anyhow!("failed to subscribe to queue requests: {e}"))?;
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
            Some(req) = queue_requests.next() => s.answer_queue_request(req).await,
            Some(w) = done_rx.recv() => {
                s.on_written(w).await;
                while let Ok(w) = done_rx.try_recv() {
                    s.on_written(w).await;
                }
            }
        }
        s.schedule().await;
    }
    Ok(())
}

/// Every key's latest value first (the state to rebuild), then every change. (`watch_all` would
/// deliver only changes made after it starts.)
async fn watch(store: &kv::Store) -> anyhow::Result<kv::Watch> {
    store.watch_with_history(">").await.map_err(|e| anyhow::anyhow!("failed to watch bucket: {e}"))
}

impl Scheduler {
    // ---- projection --------------------------------------------------------------------------

    fn forget_task(&mut self, id: &str) -> Option<TaskView> {
        self.pending.remove(id);
        self.core.remove_task(id);
        self.tasks.remove(id)
    }

    /// When a queued task may run: at once, or after the backoff of its last failed attempt.
    fn eligible_ms(&self, rec: &TaskRecord) -> u64 {
        let Some(last) = rec.attempts.last() else { return 0 };
        let n = u32::try_from(rec.attempts.len()).unwrap_or(u32::MAX).saturating_sub(1).min(16);
        let backoff = self
            .config
            .retry_base_delay
            .saturating_mul(2u32.saturating_pow(n))
            .min(self.config.retry_max_delay);
        last.finished_at_ms.saturating_add(u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX))
    }

    fn apply_task(&mut self, rec: TaskRecord, rev: u64) {
        self.apply_task_raw(rec, rev, None);
    }

    /// Like [`Self::apply_task`], with the record's bytes as stored when the caller has them.
    fn apply_task_raw(&mut self, rec: TaskRecord, rev: u64, raw: Option<&[u8]>) {
        if self.tasks.get(&rec.id).is_some_and(|v| v.rev >= rev) {
            return;
        }
        // Any later revision settles an assignment: claimed (running), or the task moved on.
        if self.pending.get(&rec.id).is_some_and(|p| rev > p.base_rev) {
            self.pending.remove(&rec.id);
        }
        match rec.state {
            TaskState::Completed | TaskState::Failed => {
                // What the attempt used is charged to its tenant's fair share.
                self.core.finish(&rec.id, rec.usage.map(|u| u.total_tokens));
                self.forget_task(&rec.id);
                return;
            }
            TaskState::Queued => {
                if self.core.is_running(&rec.id) {
                    // Back from a failed attempt (or requeued): charge what it used.
                    let used = rec.attempts.last().filter(|a| a.attempt == rec.attempt).and_then(|a| a.usage);
                    self.core.finish(&rec.id, used.map(|u| u.total_tokens));
                }
                let q = Queued {
                    id: Id::from(rec.id.as_str()),
                    capability: Id::from(rec.capability.as_str()),
                    priority: rec.priority.level(),
                    tenant: Id::from(rec.tenant.as_str()),
                    submitted_ms: rec.submitted_at_ms,
                    eligible_ms: self.eligible_ms(&rec),
                    context_key: rec.context_key.as_deref().map(Into::into),
                    labels: (!rec.labels.is_empty()).then(|| Box::new(rec.labels.clone())),
                };
                self.core.enqueue(q, Now::current());
            }
            TaskState::Assigned | TaskState::Running => {
                if let Some(agent) = &rec.agent_id {
                    self.core.observe_running(&rec.id, &rec.tenant, agent, rec.context_key.as_deref());
                }
            }
        }
        self.tasks.insert(rec.id.clone(), TaskView::new(rec, rev, raw));
    }

    fn on_task_entry(&mut self, entry: kv::Entry) {
        self.seen_revision = self.seen_revision.max(entry.revision);
        match entry.operation {
            kv::Operation::Put => match codec::decode::<TaskRecord>(None, &entry.value) {
                Ok(rec) => self.apply_task_raw(rec, entry.revision, Some(&entry.value)),
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
                    let now = Instant::now();
                    self.core.upsert_agent(&rec, now + self.liveness(&rec));
                    self.agents.insert(
                        rec.agent_id.clone(),
                        AgentInfo {
                            runner_id: rec.runner_id.clone(),
                            status: rec.status,
                            last_seen: now,
                            template: rec.name.clone(),
                            capabilities: rec.capabilities.clone(),
                            min_replicas: rec.min_replicas,
                            max_replicas: rec.max_replicas,
                        },
                    );
                }
                Err(e) => tracing::error!(key = %entry.key, error = %e, "unreadable agent record ignored"),
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                tracing::info!(agent_id = %entry.key, "agent deregistered");
                self.agents.remove(&entry.key);
                self.core.remove_agent(&entry.key);
            }
        }
    }

    /// How long an agent counts as alive after a heartbeat.
    fn liveness(&self, rec: &AgentRecord) -> Duration {
        let interval = Duration::from_millis(rec.heartbeat_interval_ms.max(100));
        interval * self.config.missed_heartbeats.max(1) + Duration::from_millis(500)
    }

    // ---- scheduling --------------------------------------------------------------------------

    async fn schedule(&mut self) {
        let now = Now::current();
        self.core.release_due(now);
        self.stats.queued.store(u64::try_from(self.core.queued_len()).unwrap_or(u64::MAX), Ordering::Relaxed);
        while self.in_flight < MAX_IN_FLIGHT {
            let Some(d) = self.core.next(now) else { break };
            self.assign(d).await;
        }
    }

    /// Carries out one decision: the `assigned` event that says why, then the assignment to the
    /// agent's runner, both sent at once (one round trip). The task record is not written here:
    /// the assignment carries the queued record and its revision, and the runner's claim (a
    /// revision-checked write from that revision, which names the attempt and the agent) is what
    /// books the task, so a stale or duplicate assignment can never run. Until the claim shows
    /// up the task is booked to the agent here only ([`Self::pending`]); an assignment nobody
    /// claims in time, or one whose agent is lost, is taken back and decided again. The
    /// outcome of the publishes comes back to [`Self::on_written`].
    async fn assign(&mut self, d: Decision) {
        let task_id = d.task.to_string();
        let Some(view) = self.tasks.get(&task_id) else {
            self.core.remove_task(&task_id);
            return;
        };
        let base_rev = view.rev;
        let Some(record) = view.record() else {
            self.forget_task(&task_id);
            return;
        };
        let Some(runner_id) = self.agents.get(&*d.agent).map(|a| a.runner_id.clone()) else {
            // The agent left between the decision and now: put the task back.
            self.tasks.remove(&task_id);
            self.core.remove_task(&task_id);
            self.apply_task(record, base_rev);
            return;
        };
        let span = tracing::info_span!("assign", task_id = %d.task, agent_id = %d.agent, reason = d.reason);
        flotilla_service::trace::continue_from_traceparent(&span, record.trace.as_deref());
        let attempt = record.attempt.saturating_add(1);
        let mut proposed = record.clone();
        proposed.state = TaskState::Assigned;
        proposed.attempt = attempt;
        proposed.agent_id = Some(d.agent.to_string());
        proposed.runner_id = Some(runner_id.clone());
        let decided_ms = now_ms();
        proposed.updated_at_ms = decided_ms;
        let mut ev = TaskEvent::for_task(&proposed, event_kind::ASSIGNED);
        ev.reason = Some(d.reason.to_owned());
        ev.detail = Some(serde_json::json!({
            "priority": d.priority,
            "effective_priority": d.effective_priority,
            "tenant": &*d.tenant,
            "tenant_vruntime": (d.vruntime * 1000.0).round() / 1000.0,
            "charged_tokens": d.charged,
            "agent_load": d.load_ppm as f64 / 1_000_000.0,
            "waited_ms": d.waited_ms,
            // How far into the tasks bucket the dispatcher had read when it decided: every task
            // created at or below this revision was known to it.
            "seen_revision": self.seen_revision,
        }));
        let assignment = Assignment {
            revision: Some(base_rev),
            record: Some(Box::new(record)),
            ..Assignment::for_record(&proposed)
        };
        self.pending.insert(
            task_id.clone(),
            Proposal { agent: d.agent.to_string(), attempt, base_rev, decided_ms, sent_at: Instant::now() },
        );
        // Both are sent here, in the order of the decisions (only their acks are awaited beside
        // further decisions): the stream shows the `assigned` events in the order the dispatcher
        // decided, and each before the runner's `started`. An attempt taken back is assigned
        // again: both ids name the decision, not only the attempt, so the second is not dropped
        // as a duplicate of the first.
        let msg_id = format!("{}:{}:{}:{}", assignment.task_id, attempt, assignment.agent_id, decided_ms);
        let subject = self.fleet.names.assign_subject(&runner_id);
        let (event, sent) = async {
            let event = self.fleet.send_event_with_id(&ev, &format!("{msg_id}:assigned")).await;
            (event, self.fleet.send_durable(subject, &assignment, Some(&msg_id)).await)
        }
        .instrument(span.clone())
        .await;
        let done = self.done_tx.clone();
        self.in_flight += 1;
        tokio::spawn(
            async move {
                if let Err(e) = match event {
                    Ok(p) => p.confirmed().await,
                    Err(e) => Err(e),
                } {
                    tracing::warn!(error = %e, "failed to publish assigned event");
                }
                let result = match sent {
                    Ok(p) => p.confirmed().await,
                    Err(e) => Err(e),
                };
                let _ = done.send(Written { task_id, attempt, base_rev, decided_ms, result });
            }
            .instrument(span),
        );
    }

    /// Takes in the outcome of an assignment's publishes.
    async fn on_written(&mut self, w: Written) {
        self.in_flight = self.in_flight.saturating_sub(1);
        match w.result {
            Ok(()) => {
                self.stats.assigned.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(task_id = %w.task_id, error = %e, "assignment not sent; the task is decided again");
                if self.pending.get(&w.task_id).is_some_and(|p| {
                    p.attempt == w.attempt && p.base_rev == w.base_rev && p.decided_ms == w.decided_ms
                }) {
                    self.take_back(&w.task_id, "assignment_not_sent").await;
                }
            }
        }
    }

    /// Takes back an assignment nobody claimed: the task is queued again here (its record never
    /// stopped saying queued) and a `requeued` event tells why. A claim that still arrives wins
    /// the race against the next assignment of the same attempt; the loser is fenced off.
    async fn take_back(&mut self, task_id: &str, why: &'static str) {
        let Some(p) = self.pending.remove(task_id) else { return };
        let Some(view) = self.tasks.get(task_id) else { return };
        if view.rev != p.base_rev || view.state != TaskState::Queued {
            return;
        }
        let Some(rec) = view.record() else { return };
        self.core.remove_task(task_id);
        self.tasks.remove(task_id);
        self.stats.requeued.fetch_add(1, Ordering::Relaxed);
        tracing::info!(task_id, agent_id = %p.agent, attempt = p.attempt, why, "assignment taken back");
        let mut ev = TaskEvent::for_task(&rec, event_kind::REQUEUED);
        ev.attempt = Some(p.attempt);
        ev.agent_id = Some(p.agent);
        ev.reason = Some(why.to_owned());
        self.apply_task(rec, p.base_rev);
        self.publish_requeued(&ev).await;
    }

    /// Publishes a `requeued` event. One attempt may be taken back more than once (unclaimed,
    /// then claimed and lost): the id names the agent, the reason and the time, not only the
    /// attempt, so no take-back is dropped as a duplicate of another.
    async fn publish_requeued(&self, ev: &TaskEvent) {
        let msg_id = format!(
            "{}:requeued:{}:{}:{}:{}",
            ev.task_id,
            ev.attempt.unwrap_or(0),
            ev.agent_id.as_deref().unwrap_or("-"),
            ev.reason.as_deref().unwrap_or("-"),
            ev.at_ms
        );
        let sent = match self.fleet.send_event_with_id(ev, &msg_id).await {
            Ok(p) => p.confirmed().await,
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "failed to publish requeued event");
        }
    }

    /// Publishes the assignment to the agent's runner; de-duplicated per task and attempt.
    async fn send_assignment(&self, rec: &TaskRecord, rev: u64, runner_id: &str) {
        if rec.agent_id.is_none() {
            return;
        }
        let a = Assignment {
            revision: Some(rev),
            record: Some(Box::new(rec.clone())),
            ..Assignment::for_record(rec)
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

    /// Answers `flotilla queue`: `{"limit": N}` (optional) → a `QueueReport`.
    #[tracing::instrument(skip_all)]
    async fn answer_queue_request(&mut self, req: async_nats::Message) {
        let Some(reply) = req.reply.clone() else { return };
        let limit = serde_json::from_slice::<serde_json::Value>(&req.payload)
            .ok()
            .and_then(|v| v.get("limit").and_then(serde_json::Value::as_u64))
            .map_or(20, |n| usize::try_from(n).unwrap_or(20).min(1000));
        let mut report = self.core.report(limit, Now::current());
        report.dispatcher.clone_from(&self.fleet.instance);
        match self.fleet.encode(&report) {
            Ok(body) => {
                if let Err(e) = self.fleet.client.publish(reply, body).await {
                    tracing::warn!(error = %e, "failed to answer a queue request");
                }
            }
            Err(e) => tracing::warn!(error = %e, "failed to encode the queue report"),
        }
    }

    // ---- housekeeping ------------------------------------------------------------------------

    async fn on_tick(&mut self) {
        let now = Instant::now();
        self.stats
            .live_agents
            .store(u64::try_from(self.core.live_agents(now)).unwrap_or(0), Ordering::Relaxed);
        // Forget agents that have been silent for long.
        let silent: Vec<String> = self
            .agents
            .iter()
            .filter(|(_, a)| a.last_seen.elapsed() > Duration::from_secs(3600))
            .map(|(id, _)| id.clone())
            .collect();
        for id in silent {
            self.agents.remove(&id);
            self.core.remove_agent(&id);
        }

        let wall = now_ms();
        let assign_timeout = u64::try_from(self.config.assign_timeout.as_millis()).unwrap_or(u64::MAX);
        let mut requeue: Vec<(String, &'static str)> = Vec::new();
        let mut resend: Vec<String> = Vec::new();
        let mut expired: Vec<String> = Vec::new();
        if now >= self.requeue_after {
            for (agent_id, held) in self.core.holders() {
                let lost = self.core.agent_alive(&agent_id, now) != Some(true)
                    || self.agents.get(&*agent_id).is_some_and(|a| a.status == AgentStatus::Error);
                if lost {
                    requeue.extend(held.iter().map(|t| (t.to_string(), "agent_lost")));
                }
            }
        }
        let timeout = self.config.assign_timeout;
        for (id, p) in &self.pending {
            if p.sent_at.elapsed() > timeout {
                requeue.push((id.clone(), "assign_timeout"));
            }
        }
        for (id, v) in &self.tasks {
            if v.deadline_ms.is_some_and(|d| d <= wall) {
                expired.push(id.clone());
                continue;
            }
            match v.state {
                TaskState::Assigned if wall.saturating_sub(v.updated_at_ms) > assign_timeout => {
                    requeue.push((id.clone(), "assign_timeout"));
                }
                TaskState::Assigned if !self.resent.contains(&(id.clone(), v.attempt)) => {
                    resend.push(id.clone());
                }
                _ => {}
            }
        }
        // After a restart the assignment of an `assigned` task may never have been sent: send it
        // again once (the runner's claim fences duplicates).
        for id in resend {
            if let Some(v) = self.tasks.get(&id) {
                let key = (id.clone(), v.attempt);
                if let (Some(runner), Some(rec)) = (v.runner_id.clone(), v.record()) {
                    self.send_assignment(&rec, v.rev, &runner).await;
                }
                self.resent.insert(key);
            }
        }
        self.resent.retain(|(id, attempt)| self.tasks.get(id).is_some_and(|v| v.attempt <= *attempt));
        for (id, why) in requeue {
            self.requeue(&id, why).await;
        }
        for id in expired {
            self.expire(&id).await;
        }
        if self.config.autoscale {
            self.autoscale(now);
        }
    }

    /// Workload-based scaling: one more agent of a matching template while a capability stays
    /// starved (ready tasks, no free agent), one fewer when an agent idles with nothing queued
    /// for it; always within the template's limits and one step per cooldown.
    fn autoscale(&mut self, now: Instant) {
        let starved = self.core.starved_capabilities(Now::current());
        let a = &mut self.autoscale;
        a.starved_since.retain(|c, _| starved.contains(c));
        for c in starved {
            a.starved_since.entry(c).or_insert(now);
        }
        // Live agents that take work, per (runner, template).
        struct Group {
            active: u32,
            min: u32,
            max: u32,
            capabilities: Vec<String>,
            idle_long: bool,
        }
        let mut groups: HashMap<(String, String), Group> = HashMap::new();
        for (id, info) in &self.agents {
            if self.core.agent_alive(id, now) != Some(true)
                || matches!(info.status, AgentStatus::Draining | AgentStatus::Error)
            {
                self.autoscale.idle_since.remove(id);
                continue;
            }
            let idle = self.core.held(id) == 0;
            let idle_long = if idle {
                let since = *self.autoscale.idle_since.entry(id.clone()).or_insert(now);
                now.saturating_duration_since(since) >= self.config.scale_down_after
            } else {
                self.autoscale.idle_since.remove(id);
                false
            };
            let g = groups.entry((info.runner_id.clone(), info.template.clone())).or_insert(Group {
                active: 0,
                min: info.min_replicas,
                max: info.max_replicas,
                capabilities: info.capabilities.clone(),
                idle_long: false,
            });
            g.active += 1;
            g.idle_long |= idle_long;
        }
        let agents = &self.agents;
        self.autoscale.idle_since.retain(|id, _| agents.contains_key(id));
        let cooled = |key: &(String, String), last: &HashMap<(String, String), Instant>| {
            last.get(key).is_none_or(|t| now.saturating_duration_since(*t) >= self.config.scale_cooldown)
        };
        let mut steps: Vec<((String, String), u32, &'static str)> = Vec::new();
        let due: Vec<Id> = self
            .autoscale
            .starved_since
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= self.config.scale_up_after)
            .map(|(c, _)| c.clone())
            .collect();
        for cap in due {
            let best = groups
                .iter()
                .filter(|(k, g)| {
                    g.active < g.max
                        && g.capabilities.iter().any(|c| **c == *cap)
                        && cooled(k, &self.autoscale.last_step)
                })
                .max_by_key(|(k, g)| (g.max - g.active, Reverse((*k).clone())))
                .map(|(k, g)| (k.clone(), g.active + 1));
            if let Some((key, replicas)) = best {
                if let Some(g) = groups.get_mut(&key) {
                    g.active = replicas;
                }
                self.autoscale.starved_since.insert(cap.clone(), now);
                steps.push((key, replicas, "queue_deep"));
            }
        }
        for (key, g) in &groups {
            if g.idle_long
                && g.active > g.min
                && cooled(key, &self.autoscale.last_step)
                && !steps.iter().any(|(k, _, _)| k == key)
                && !g.capabilities.iter().any(|c| self.core.has_queued(c))
            {
                steps.push((key.clone(), g.active - 1, "idle"));
            }
        }
        for ((runner, template), replicas, why) in steps {
            tracing::info!(%runner, %template, replicas, why, "autoscaling");
            self.autoscale.last_step.insert((runner.clone(), template.clone()), now);
            let req = flotilla_protocol::ScaleRequest { template, replicas, autoscale: true };
            let subject = self.fleet.names.runner_control(&runner, runner_op::SCALE);
            let fleet = self.fleet.clone();
            // Not awaited here: the registry shows the result, and scheduling goes on meanwhile.
            tokio::spawn(async move {
                let body = match fleet.encode(&req) {
                    Ok(b) => b,
                    Err(e) => return tracing::warn!(error = %e, "failed to encode a scale request"),
                };
                match tokio::time::timeout(Duration::from_secs(5), fleet.client.request(subject, body)).await
                {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(%runner, error = %e, "scale request failed"),
                    Err(_) => tracing::warn!(%runner, "scale request timed out"),
                }
            });
        }
    }

    #[tracing::instrument(skip(self))]
    async fn requeue(&mut self, task_id: &str, why: &'static str) {
        if self.pending.contains_key(task_id) {
            self.take_back(task_id, why).await;
            return;
        }
        let Some(view) = self.tasks.get(task_id) else { return };
        let Some(mut rec) = view.record() else { return };
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
                self.publish_requeued(&ev).await;
            }
            Err(e) if e.is_conflict() => {
                let _ = self.refresh(task_id).await;
            }
            Err(e) => tracing::warn!(task_id, error = %e, "requeue failed; will retry"),
        }
    }

    /// Fails a task whose deadline passed, queued or running; a runner still working on it is
    /// told to stop.
    #[tracing::instrument(skip(self))]
    async fn expire(&mut self, task_id: &str) {
        let Some(view) = self.tasks.get(task_id) else { return };
        let Some(mut rec) = view.record() else { return };
        let was = rec.state;
        let message = match was {
            TaskState::Queued => "the deadline passed while the task was queued",
            _ => "the deadline passed while the task was running",
        };
        let error = ErrorInfo::new(failure::DEADLINE_EXCEEDED, message);
        rec.state = TaskState::Failed;
        rec.error = Some(error.clone());
        rec.finished_at_ms = Some(now_ms());
        rec.updated_at_ms = now_ms();
        match self.fleet.kv_update(&self.topology.tasks, task_id, &rec, view.rev).await {
            Ok(rev) => {
                let mut ev = TaskEvent::for_task(&rec, event_kind::FAILED);
                ev.error = rec.error.clone();
                let runner = rec.runner_id.clone();
                let attempt = rec.attempt;
                self.apply_task(rec, rev);
                if let Err(e) = self.fleet.publish_event(&ev).await {
                    tracing::warn!(error = %e, "failed to publish failed event");
                }
                if matches!(was, TaskState::Assigned | TaskState::Running)
                    && let Some(runner) = runner
                {
                    self.tell_runner_to_stop(&runner, task_id, attempt, error).await;
                }
            }
            Err(e) if e.is_conflict() => {
                let _ = self.refresh(task_id).await;
            }
            Err(e) => tracing::warn!(task_id, error = %e, "expiry failed; will retry"),
        }
    }

    /// Best effort (core NATS): the attempt's result would be fenced off anyway.
    async fn tell_runner_to_stop(&self, runner: &str, task_id: &str, attempt: u32, error: ErrorInfo) {
        let msg = CancelTask { task_id: task_id.to_owned(), attempt, error };
        match self.fleet.encode(&msg) {
            Ok(body) => {
                let subject = self.fleet.names.runner_control(runner, runner_op::CANCEL);
                if let Err(e) = self.fleet.client.publish(subject, body).await {
                    tracing::warn!(task_id, error = %e, "failed to tell the runner to stop");
                }
            }
            Err(e) => tracing::warn!(task_id, error = %e, "failed to encode a cancel message"),
        }
    }
}

/// How long agents get to show a heartbeat after the registry is (re)loaded.
fn liveness_window(config: &Config) -> Duration {
    Duration::from_secs(u64::from(config.missed_heartbeats.max(1))) + Duration::from_millis(500)
}
