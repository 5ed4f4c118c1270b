//! The scheduler's projection of the tasks, agents and runners buckets: every non-terminal task
//! (a queued one kept encoded, as stored) and every registered agent, alive while its runner's
//! heartbeat is seen (or its own record is rewritten), fed into the run queue as the KV watches
//! deliver them. Any later revision of a task settles an assignment still waiting for its
//! claim; a finished task charges its tenant's fair share with what it used.

use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use flotilla_protocol::{AgentRecord, AgentStatus, RunnerRecord, TaskRecord, TaskState, WireFormat, codec};
use flotilla_service::nats::FleetError;

use super::Scheduler;
use crate::runqueue::{Id, Now, Queued};

/// A non-terminal task as the scheduler keeps it. A queued task's record is kept encoded (a few
/// hundred bytes instead of a decoded record's kilobyte): at a million queued tasks that is what
/// the dispatcher's memory is made of.
pub(super) struct TaskView {
    pub(super) rev: u64,
    pub(super) state: TaskState,
    pub(super) deadline_ms: Option<u64>,
    body: Body,
}

enum Body {
    Decoded(Box<TaskRecord>),
    Encoded(Box<[u8]>),
}

impl TaskView {
    fn new(rec: TaskRecord, rev: u64, raw: Option<&[u8]>) -> Self {
        let (state, deadline_ms) = (rec.state, rec.deadline_ms);
        let body = match (rec.state, raw) {
            (TaskState::Queued, Some(raw)) => Body::Encoded(raw.into()),
            (TaskState::Queued, None) => match codec::encode(WireFormat::Msgpack, &rec) {
                Ok(bytes) => Body::Encoded(bytes.into()),
                Err(_) => Body::Decoded(Box::new(rec)),
            },
            _ => Body::Decoded(Box::new(rec)),
        };
        Self { rev, state, deadline_ms, body }
    }

    /// The full record (decoded again when kept encoded).
    pub(super) fn record(&self) -> Option<TaskRecord> {
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

/// What the scheduler keeps of an agent besides the run queue's view.
pub(super) struct AgentInfo {
    pub(super) runner_id: String,
    /// The runner incarnation that wrote its record: that incarnation's heartbeat keeps it alive.
    pub(super) incarnation: String,
    pub(super) status: AgentStatus,
    pub(super) last_seen: Instant,
    pub(super) template: String,
    pub(super) capabilities: Vec<String>,
    pub(super) min_replicas: u32,
    pub(super) max_replicas: u32,
}

impl Scheduler {
    pub(super) fn forget_task(&mut self, id: &str) -> Option<TaskView> {
        self.pending.remove(id);
        self.queue.remove_task(id);
        self.tasks.remove(id)
    }

    /// When a queued task may run: at once, or after the backoff of its last failed attempt.
    fn eligible_ms(&self, rec: &TaskRecord) -> u64 {
        let Some(last) = rec.attempts.last() else { return 0 };
        let retry = u32::try_from(rec.attempts.len()).unwrap_or(u32::MAX).saturating_sub(1);
        let backoff = flotilla_protocol::time::backoff(
            self.config.retry_base_delay,
            retry,
            self.config.retry_max_delay,
        );
        last.finished_at_ms.saturating_add(u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn apply_task(&mut self, rec: TaskRecord, rev: u64) {
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
        self.track_children(&rec);
        match rec.state {
            TaskState::Completed | TaskState::Failed => {
                // What the attempt used is charged to its tenant's fair share.
                self.queue.finish(&rec.id, rec.usage.map(|u| u.total_tokens));
                if let Some(agent) = &rec.agent_id
                    && flotilla_protocol::time::now_ms().saturating_sub(rec.updated_at_ms) < 60_000
                {
                    self.recent_finals
                        .entry(agent.clone())
                        .or_default()
                        .push((rec.id.clone(), std::time::Instant::now()));
                }
                self.forget_task(&rec.id);
                return;
            }
            TaskState::Queued => {
                if self.queue.is_running(&rec.id) {
                    // Back from a failed attempt (or requeued): charge what it used.
                    let used = rec.attempts.last().filter(|a| a.attempt == rec.attempt).and_then(|a| a.usage);
                    self.queue.finish(&rec.id, used.map(|u| u.total_tokens));
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
                self.queue.enqueue(q, Now::current());
            }
            TaskState::Running => {
                if let Some(agent) = &rec.agent_id {
                    self.queue.observe_running(&rec.id, &rec.tenant, agent, rec.context_key.as_deref());
                }
            }
        }
        self.tasks.insert(rec.id.clone(), TaskView::new(rec, rev, raw));
    }

    /// Keeps the index of unfinished children; a parent that failed (or was cancelled) has its
    /// unfinished children cancelled, and theirs in turn as they fail.
    fn track_children(&mut self, rec: &TaskRecord) {
        let finished = matches!(rec.state, TaskState::Completed | TaskState::Failed);
        if let Some(parent) = &rec.parent_id {
            if finished {
                if let Some(set) = self.children.get_mut(parent) {
                    set.remove(&rec.id);
                    if set.is_empty() {
                        self.children.remove(parent);
                    }
                }
            } else {
                self.children.entry(parent.clone()).or_default().insert(rec.id.clone());
            }
        }
        if !finished {
            return;
        }
        let Some(children) = self.children.remove(&rec.id) else { return };
        if rec.state != TaskState::Failed {
            return;
        }
        let how = match rec.error.as_ref().map(|e| e.code.as_str()) {
            Some(flotilla_protocol::failure::CANCELLED) => "was cancelled",
            _ => "failed",
        };
        for child in children {
            tracing::info!(parent = %rec.id, child = %child, "parent {how}: cancelling its child");
            let (fleet, topology) = (self.fleet.clone(), self.topology.clone());
            let reason = format!("cancelled: its parent task {} {how}", rec.id);
            tokio::spawn(super::requests::cancel_child(fleet, topology, child, reason));
        }
    }

    pub(super) fn on_task_entry(&mut self, entry: kv::Entry) {
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

    pub(super) fn on_agent_entry(&mut self, entry: kv::Entry) {
        match entry.operation {
            kv::Operation::Put => match codec::decode::<AgentRecord>(None, &entry.value) {
                Ok(rec) => {
                    // An agent in a snapshot (start-up or re-watch) counts as seen now: judging it
                    // by its own clock would let clock skew requeue healthy work. A dead one is
                    // found out one liveness window later.
                    let now = Instant::now();
                    self.queue.upsert_agent(&rec, now + self.liveness(rec.heartbeat_interval_ms));
                    self.agents.insert(
                        rec.agent_id.clone(),
                        AgentInfo {
                            runner_id: rec.runner_id.clone(),
                            incarnation: rec.incarnation.clone(),
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
                self.queue.remove_agent(&entry.key);
            }
        }
    }

    /// A runner's heartbeat: every agent its incarnation registered is alive for another
    /// liveness window. (One write per runner per beat keeps all of its agents alive.)
    pub(super) fn on_runner_entry(&mut self, entry: kv::Entry) {
        if entry.operation != kv::Operation::Put {
            return;
        }
        let rec = match codec::decode::<RunnerRecord>(None, &entry.value) {
            Ok(rec) => rec,
            Err(e) => {
                tracing::error!(key = %entry.key, error = %e, "unreadable runner record ignored");
                return;
            }
        };
        let now = Instant::now();
        let until = now + self.liveness(rec.heartbeat_interval_ms);
        for (id, a) in &mut self.agents {
            if a.runner_id == rec.runner_id && !a.incarnation.is_empty() && a.incarnation == rec.incarnation {
                a.last_seen = now;
                self.queue.touch_agent(id, until);
            }
        }
    }

    /// How long an agent counts as alive after a heartbeat of period `interval_ms`.
    fn liveness(&self, interval_ms: u64) -> Duration {
        let interval = Duration::from_millis(interval_ms.max(100));
        interval * self.config.missed_heartbeats.max(1) + Duration::from_millis(500)
    }

    /// Reads a task again after a lost revision race.
    pub(super) async fn refresh(&mut self, task_id: &str) {
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
            Err(e) => tracing::warn!(task_id, error = %e, "failed to re-read task"),
        }
    }
}
