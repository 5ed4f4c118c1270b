//! Agent lifecycle: the state of each agent, and of each task it works on, moves only along the
//! transition table of [`AgentState::can_become`]; an illegal move is refused. Every transition
//! becomes an event on `<p>.events.agent.<agent>.<state>` (published in order by one task) and is
//! written to the registry right away.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use flotilla_protocol::{Activity, AgentEvent, AgentState, time::now_ms};
use flotilla_service::Fleet;
use tokio::sync::{Notify, mpsc};

/// A refused transition.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("illegal agent transition {from:?} -> {to:?}")]
pub struct IllegalTransition {
    pub from: AgentState,
    pub to: AgentState,
}

/// The lifecycle of one agent: its own state and one per task it works on.
#[derive(Debug)]
pub struct Lifecycle {
    agent_id: String,
    runner_id: String,
    inner: Mutex<(AgentState, BTreeMap<String, AgentState>)>,
    events: mpsc::UnboundedSender<AgentEvent>,
}

impl Lifecycle {
    pub fn new(agent_id: String, runner_id: String, events: mpsc::UnboundedSender<AgentEvent>) -> Self {
        Self { agent_id, runner_id, inner: Mutex::new((AgentState::Initializing, BTreeMap::new())), events }
    }

    /// Moves the agent (`task: None`) or its work on `task` to `to`. Work on a task starts from
    /// `idle` and ends when it returns to `idle`.
    pub fn transition(
        &self,
        task: Option<&str>,
        to: AgentState,
        reason: Option<&str>,
    ) -> Result<(), IllegalTransition> {
        let from = {
            let mut g = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let (agent, tasks) = &mut *g;
            let from = match task {
                Some(t) => tasks.get(t).copied().unwrap_or(AgentState::Idle),
                None => *agent,
            };
            if !from.can_become(to) {
                return Err(IllegalTransition { from, to });
            }
            match task {
                Some(t) if to == AgentState::Idle => {
                    tasks.remove(t);
                }
                Some(t) => {
                    tasks.insert(t.to_owned(), to);
                }
                None => *agent = to,
            }
            from
        };
        let _ = self.events.send(AgentEvent {
            agent_id: self.agent_id.clone(),
            runner_id: self.runner_id.clone(),
            from,
            to,
            task_id: task.map(str::to_owned),
            reason: reason.map(str::to_owned),
            at_ms: now_ms(),
        });
        Ok(())
    }

    /// Like [`Lifecycle::transition`], logging a refused move instead of returning it.
    pub fn set(&self, task: Option<&str>, to: AgentState) {
        if let Err(e) = self.transition(task, to, None) {
            tracing::warn!(agent_id = %self.agent_id, task_id = ?task, error = %e, "transition refused");
        }
    }

    /// Ends the work on `task`, whatever state it was in; `reason` says why when it did not end
    /// normally (`crashed: …` when the attempt crashed, which the monitor counts).
    pub fn finish(&self, task: &str, reason: Option<&str>) {
        let active = {
            let g = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            g.1.contains_key(task)
        };
        if active && let Err(e) = self.transition(Some(task), AgentState::Idle, reason) {
            tracing::warn!(agent_id = %self.agent_id, task_id = task, error = %e, "transition refused");
        }
    }

    /// The agent's own state and its activities, for the registry.
    pub fn snapshot(&self) -> (AgentState, Vec<Activity>) {
        let g = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        (g.0, g.1.iter().map(|(t, s)| Activity { task_id: t.clone(), state: *s }).collect())
    }
}

/// A handle that moves one agent's work on one task; what the loop and the tools hold.
#[derive(Debug, Clone)]
pub struct TaskStates {
    lifecycle: Arc<Lifecycle>,
    task: String,
}

impl TaskStates {
    pub fn new(lifecycle: Arc<Lifecycle>, task: String) -> Self {
        Self { lifecycle, task }
    }

    /// Moves the work on the task to `to`.
    pub fn set(&self, to: AgentState) {
        self.lifecycle.set(Some(&self.task), to);
    }
}

/// Lifecycle events sent whose acks are awaited later, at most.
const EVENTS_IN_FLIGHT: usize = 128;

/// Publishes lifecycle events in order and asks for a registry write after each batch; when
/// `stop` fires it publishes what is still queued and returns. Up to [`EVENTS_IN_FLIGHT`] are
/// under way at once (sent in order on one connection, so stored in order), so the events keep
/// up with the transitions instead of queueing behind one round trip each.
pub async fn publish_events(
    fleet: Fleet,
    mut events: mpsc::UnboundedReceiver<AgentEvent>,
    registry_dirty: Arc<Notify>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut pending: std::collections::VecDeque<(String, flotilla_service::nats::Pending)> =
        std::collections::VecDeque::new();
    loop {
        let ev = if pending.is_empty() || !events.is_empty() {
            tokio::select! {
                ev = events.recv() => ev,
                _ = stop.cancelled(), if !events.is_closed() => {
                    events.close();
                    events.recv().await
                }
            }
        } else {
            // Nothing more queued: settle what is under way, then update the registry.
            settle(&mut pending, 0).await;
            registry_dirty.notify_one();
            continue;
        };
        let Some(ev) = ev else {
            settle(&mut pending, 0).await;
            return;
        };
        let subject = fleet.names.agent_event_subject(&ev.agent_id, ev.to.as_str());
        match fleet.send_durable(subject, &ev, None).await {
            Ok(p) => pending.push_back((ev.agent_id, p)),
            Err(e) => tracing::warn!(agent_id = %ev.agent_id, error = %e, "failed to publish an agent event"),
        }
        settle(&mut pending, EVENTS_IN_FLIGHT).await;
    }
}

/// Awaits the oldest acks until at most `keep` are outstanding.
async fn settle(
    pending: &mut std::collections::VecDeque<(String, flotilla_service::nats::Pending)>,
    keep: usize,
) {
    while pending.len() > keep {
        let Some((agent_id, p)) = pending.pop_front() else { return };
        if let Err(e) = p.confirmed().await {
            tracing::warn!(%agent_id, error = %e, "failed to publish an agent event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_move_along_the_table_and_illegal_moves_are_refused() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let l = Lifecycle::new("a".into(), "r".into(), tx);
        assert!(l.transition(Some("t"), AgentState::Executing, None).is_err(), "work starts with planning");
        l.transition(None, AgentState::Idle, None).unwrap();
        l.transition(Some("t"), AgentState::Planning, None).unwrap();
        l.transition(Some("t"), AgentState::Executing, None).unwrap();
        l.transition(Some("t"), AgentState::Waiting, Some("sub-task")).unwrap();
        assert_eq!(l.snapshot().1, vec![Activity { task_id: "t".into(), state: AgentState::Waiting }]);
        assert_eq!(
            l.transition(Some("t"), AgentState::Planning, None),
            Err(IllegalTransition { from: AgentState::Waiting, to: AgentState::Planning })
        );
        l.transition(Some("t"), AgentState::Executing, None).unwrap();
        l.transition(Some("t"), AgentState::Idle, None).unwrap();
        assert!(l.snapshot().1.is_empty());
        let kinds: Vec<AgentState> = std::iter::from_fn(|| rx.try_recv().ok()).map(|e| e.to).collect();
        use AgentState::*;
        assert_eq!(kinds, [Idle, Planning, Executing, Waiting, Executing, Idle]);
    }
}
