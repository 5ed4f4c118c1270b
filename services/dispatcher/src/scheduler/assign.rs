//! Assignment: carrying out the run queue's decisions. Each is an `assigned` event that says why
//! and an assignment to the agent's runner, sent together; the task record is not written — the
//! runner's claim is. Until the claim shows up the booking lives here ([`Proposal`]); an
//! assignment that could not be sent, or that nobody claims, is taken back and decided again.

use std::sync::atomic::Ordering;
use std::time::Instant;

use flotilla_protocol::names::event_kind;
use flotilla_protocol::{Assignment, TaskEvent, TaskState, time::now_ms};
use flotilla_service::nats::FleetError;
use tracing::Instrument as _;

use super::Scheduler;
use crate::runqueue::{Decision, Now};

/// Most assignments sent concurrently (each is two publishes whose acks are awaited together).
const MAX_IN_FLIGHT: usize = 256;

/// An assignment the runner has not claimed yet.
pub(super) struct Proposal {
    pub(super) agent: String,
    pub(super) attempt: u32,
    /// The revision of the queued record the assignment was decided from.
    pub(super) base_rev: u64,
    decided_ms: u64,
    pub(super) sent_at: Instant,
}

/// The outcome of an assignment's publishes.
pub(super) struct Written {
    task_id: String,
    attempt: u32,
    base_rev: u64,
    decided_ms: u64,
    result: Result<(), FleetError>,
}

impl Scheduler {
    /// Makes every decision the run queue has now (as many as may be in flight).
    pub(super) async fn schedule(&mut self) {
        let now = Now::current();
        self.queue.release_due(now);
        self.stats
            .queued
            .store(u64::try_from(self.queue.queued_len()).unwrap_or(u64::MAX), Ordering::Relaxed);
        while self.in_flight < MAX_IN_FLIGHT {
            let Some(d) = self.queue.next(now) else { break };
            self.assign(d).await;
        }
    }

    /// Carries out one decision: the `assigned` event that says why, then the assignment to the
    /// agent's runner, both sent at once (one round trip). The assignment carries the queued
    /// record and its revision, and the runner's claim (a revision-checked write from that
    /// revision, which names the attempt and the agent) is what books the task, so a stale or
    /// duplicate assignment can never run. The outcome of the publishes comes back to
    /// [`Self::on_written`].
    async fn assign(&mut self, d: Decision) {
        let task_id = d.task.to_string();
        let Some(view) = self.tasks.get(&task_id) else {
            self.queue.remove_task(&task_id);
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
            self.queue.remove_task(&task_id);
            self.apply_task(record, base_rev);
            return;
        };
        let span = tracing::info_span!("assign", task_id = %d.task, agent_id = %d.agent, reason = d.reason);
        flotilla_service::trace::continue_from_traceparent(&span, record.trace.as_deref());
        let decided_ms = now_ms();
        let assignment = Assignment::next_attempt(record, base_rev, &d.agent, decided_ms);
        let attempt = assignment.attempt;
        let mut ev = TaskEvent::assigned(&assignment, &runner_id);
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
                if done.send(Written { task_id, attempt, base_rev, decided_ms, result }).is_err() {
                    tracing::debug!("scheduler stopped before an assignment's outcome came back");
                }
            }
            .instrument(span),
        );
    }

    /// Takes in the outcome of an assignment's publishes.
    pub(super) async fn on_written(&mut self, w: Written) {
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
    pub(super) async fn take_back(&mut self, task_id: &str, why: &'static str) {
        let Some(p) = self.pending.remove(task_id) else { return };
        let Some(view) = self.tasks.get(task_id) else { return };
        if view.rev != p.base_rev || view.state != TaskState::Queued {
            return;
        }
        let Some(rec) = view.record() else { return };
        self.queue.remove_task(task_id);
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
    pub(super) async fn publish_requeued(&self, ev: &TaskEvent) {
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
}
