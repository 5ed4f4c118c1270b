//! Housekeeping, every tick: the work of agents that stopped heartbeating (or went to `error`)
//! is requeued, assignments nobody claimed within `assign_timeout` are taken back, tasks past
//! their deadline are failed (a runner still working on one is told to stop), and agents silent
//! for an hour are forgotten. Then the autoscaler has its say.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use flotilla_protocol::names::{event_kind, runner_op};
use flotilla_protocol::{AgentStatus, CancelTask, ErrorInfo, TaskEvent, TaskState, time::now_ms};

use super::Scheduler;

/// Agents silent this long are forgotten.
const FORGET_SILENT_AGENTS: Duration = Duration::from_secs(3600);

impl Scheduler {
    pub(super) async fn on_tick(&mut self) {
        let now = Instant::now();
        self.stats
            .live_agents
            .store(u64::try_from(self.queue.live_agents(now)).unwrap_or(0), Ordering::Relaxed);
        let silent: Vec<String> = self
            .agents
            .iter()
            .filter(|(_, a)| a.last_seen.elapsed() > FORGET_SILENT_AGENTS)
            .map(|(id, _)| id.clone())
            .collect();
        for id in silent {
            self.agents.remove(&id);
            self.queue.remove_agent(&id);
        }

        let wall = now_ms();
        let mut requeue: Vec<(String, &'static str)> = Vec::new();
        if now >= self.requeue_after {
            for (agent_id, held) in self.queue.holders() {
                let lost = self.queue.agent_alive(&agent_id, now) != Some(true)
                    || self.agents.get(&*agent_id).is_some_and(|a| a.status == AgentStatus::Error);
                if lost {
                    requeue.extend(held.iter().map(|t| (t.to_string(), "agent_lost")));
                }
            }
        }
        let timeout = self.config.assign_timeout;
        requeue.extend(
            self.pending
                .iter()
                .filter(|(_, p)| p.sent_at.elapsed() > timeout)
                .map(|(id, _)| (id.clone(), "assign_timeout")),
        );
        let expired: Vec<String> = self
            .tasks
            .iter()
            .filter(|(_, v)| v.deadline_ms.is_some_and(|d| d <= wall))
            .map(|(id, _)| id.clone())
            .collect();
        for (id, why) in requeue {
            self.requeue(&id, why).await;
        }
        if now >= self.requeue_after {
            self.announce_lost_outcomes(now);
        }
        for id in expired {
            self.expire(&id).await;
        }
        if self.config.autoscale {
            self.autoscale(now);
        }
    }

    /// Takes an attempt back: an unclaimed assignment is simply decided again; a running attempt
    /// whose agent was lost is requeued in the record ([`flotilla_protocol::TaskRecord::requeue`]).
    #[tracing::instrument(skip(self))]
    async fn requeue(&mut self, task_id: &str, why: &'static str) {
        if self.pending.contains_key(task_id) {
            self.take_back(task_id, why).await;
            return;
        }
        let Some(view) = self.tasks.get(task_id) else { return };
        let Some(mut rec) = view.record() else { return };
        let Ok(lost_agent) = rec.requeue(now_ms()) else { return };
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
            Err(e) if e.is_conflict() => self.refresh(task_id).await,
            Err(e) => tracing::warn!(task_id, error = %e, "requeue failed; will retry"),
        }
    }

    /// For each agent that was lost soon after finishing tasks: announces their outcomes again
    /// from their records, in the background. A runner that dies between writing a task's outcome
    /// and publishing its final event leaves a finished record nobody announced (and clients
    /// waiting on the event); the event's message id makes one that was published a duplicate.
    fn announce_lost_outcomes(&mut self, now: Instant) {
        let window = Duration::from_secs(60);
        self.recent_finals.retain(|_, v| {
            v.retain(|(_, at)| now.duration_since(*at) < window);
            !v.is_empty()
        });
        let lost: Vec<String> = self
            .recent_finals
            .keys()
            .filter(|a| self.queue.agent_alive(a, now) != Some(true))
            .cloned()
            .collect();
        let tasks: Vec<String> =
            lost.iter().filter_map(|a| self.recent_finals.remove(a)).flatten().map(|(t, _)| t).collect();
        if tasks.is_empty() {
            return;
        }
        let (fleet, store) = (self.fleet.clone(), self.topology.tasks.clone());
        tokio::spawn(async move {
            for id in tasks {
                let rec = match fleet.kv_get::<flotilla_protocol::TaskRecord>(&store, &id).await {
                    Ok(Some((rec, _))) => rec,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(task_id = %id, error = %e, "cannot read a lost agent's finished task");
                        continue;
                    }
                };
                if let Some(ev) = TaskEvent::outcome_of(&rec)
                    && let Err(e) = fleet.publish_event(&ev).await
                {
                    tracing::warn!(task_id = %id, error = %e, "failed to announce a lost agent's outcome");
                }
            }
        });
    }

    /// Fails a task whose deadline passed, queued or running
    /// ([`flotilla_protocol::TaskRecord::expire`]); a runner still working on it is told to stop.
    #[tracing::instrument(skip(self))]
    async fn expire(&mut self, task_id: &str) {
        let Some(view) = self.tasks.get(task_id) else { return };
        let Some(mut rec) = view.record() else { return };
        let Ok(was) = rec.expire(now_ms()) else { return };
        match self.fleet.kv_update(&self.topology.tasks, task_id, &rec, view.rev).await {
            Ok(rev) => {
                let mut ev = TaskEvent::for_task(&rec, event_kind::FAILED);
                ev.error = rec.error.clone();
                let (runner, attempt, error) = (rec.runner_id.clone(), rec.attempt, rec.error.clone());
                self.apply_task(rec, rev);
                if let Err(e) = self.fleet.publish_event(&ev).await {
                    tracing::warn!(error = %e, "failed to publish failed event");
                }
                if was == TaskState::Running
                    && let (Some(runner), Some(error)) = (runner, error)
                {
                    tell_runner_to_stop(&self.fleet, &runner, task_id, attempt, error).await;
                }
            }
            Err(e) if e.is_conflict() => self.refresh(task_id).await,
            Err(e) => tracing::warn!(task_id, error = %e, "expiry failed; will retry"),
        }
    }
}

/// Tells a runner to stop an attempt whose record is final. Best effort (core NATS): the
/// attempt's result would be fenced off anyway.
pub(super) async fn tell_runner_to_stop(
    fleet: &flotilla_service::Fleet,
    runner: &str,
    task_id: &str,
    attempt: u32,
    error: ErrorInfo,
) {
    let msg = CancelTask { task_id: task_id.to_owned(), attempt, error };
    match fleet.encode(&msg) {
        Ok(body) => {
            let subject = fleet.names.runner_control(runner, runner_op::CANCEL);
            if let Err(e) = fleet.client.publish(subject, body).await {
                tracing::warn!(task_id, error = %e, "failed to tell the runner to stop");
            }
        }
        Err(e) => tracing::warn!(task_id, error = %e, "failed to encode a cancel message"),
    }
}
