//! `flotilla audit state --at T`: the fleet as it was at a moment, rebuilt from the streams alone —
//! the agents (from their lifecycle events), the tasks queued and running and what was finished
//! (from the task events), and every budget (the ledger replayed with the budget-keeper's fold up
//! to T). When T is older than the oldest event the streams keep, the answer says so.

use std::collections::BTreeMap;

use flotilla_protocol::names::event_kind;
use flotilla_protocol::{AgentEvent, AgentState, BudgetStatus, LedgerEntry, TaskEvent};
use serde::Serialize;

use crate::AuditError;
use crate::history::Stored;
use crate::source::{Kind, Source, Window};

/// An agent at T.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AgentAt {
    pub runner_id: String,
    /// Its last lifecycle state before T.
    pub state: String,
    /// Tasks it was running at T.
    pub running: Vec<String>,
}

/// A task at T.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TaskAt {
    pub task_id: String,
    pub capability: String,
    pub tenant: String,
    pub priority: Option<u8>,
    pub attempt: Option<u32>,
    pub agent_id: Option<String>,
    /// Since when it was in this state.
    pub since_ms: u64,
}

/// The fleet at T.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FleetState {
    pub at_ms: u64,
    /// The oldest event the streams still keep (a T before it cannot be rebuilt whole).
    pub oldest_event_ms: Option<u64>,
    /// Set when T is older than what retention keeps.
    pub warning: Option<String>,
    pub agents: BTreeMap<String, AgentAt>,
    pub queued: Vec<TaskAt>,
    pub running: Vec<TaskAt>,
    pub completed: u64,
    pub failed: u64,
    pub rejected: u64,
    pub budgets: Vec<BudgetStatus>,
}

/// Rebuilds the fleet at `at_ms`.
#[tracing::instrument(skip(source))]
pub async fn state_at(source: &Source, at_ms: u64) -> Result<FleetState, AuditError> {
    let names = source.names().clone();
    let until = Window { since_ms: None, until_ms: Some(at_ms) };
    let filters = vec![names.task_events_all(), format!("{}.events.agent.>", names.prefix())];
    let records = source.read(Kind::Events, &filters, until).await?;
    let mut s = FleetState { at_ms, ..Default::default() };
    let oldest = source.oldest(Kind::Events).await?;
    s.oldest_event_ms = oldest;
    if oldest.is_some_and(|o| at_ms < o) {
        s.warning = Some(format!(
            "{} is older than the oldest event the streams keep ({}): what happened before that is not in them",
            crate::story::date_time(at_ms),
            crate::story::date_time(oldest.unwrap_or(0))
        ));
    }
    let agent_prefix = format!("{}.events.agent.", names.prefix());
    let mut tasks: BTreeMap<String, (String, TaskAt)> = BTreeMap::new();
    for r in records.iter().filter(|r| r.time_ms <= at_ms) {
        if r.subject.starts_with(&agent_prefix) {
            let Some(e) = Stored::<AgentEvent>::of(r) else { continue };
            let e = e.item;
            if e.to == AgentState::Terminated {
                s.agents.remove(&e.agent_id);
                continue;
            }
            let a = s.agents.entry(e.agent_id.clone()).or_default();
            a.runner_id = e.runner_id;
            a.state = serde_json::to_value(e.to)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            continue;
        }
        let Some(e) = Stored::<TaskEvent>::of(r) else { continue };
        let (time, e) = (e.time_ms, e.item);
        let entry = tasks.entry(e.task_id.clone()).or_insert_with(|| {
            (String::new(), TaskAt { task_id: e.task_id.clone(), since_ms: time, ..Default::default() })
        });
        let t = &mut entry.1;
        if let Some(c) = &e.capability {
            t.capability = c.clone();
        }
        if let Some(x) = &e.tenant {
            t.tenant = x.clone();
        }
        if let Some(p) = e.priority {
            t.priority = Some(p.level());
        }
        let state = match e.kind.as_str() {
            event_kind::ACCEPTED | event_kind::RETRYING | event_kind::REQUEUED => "queued",
            // Decided but not claimed yet: its record still says queued.
            event_kind::ASSIGNED => "queued",
            event_kind::STARTED => {
                t.attempt = e.attempt;
                t.agent_id = e.agent_id.clone();
                "running"
            }
            event_kind::COMPLETED => "completed",
            event_kind::FAILED => "failed",
            event_kind::REJECTED => "rejected",
            _ => continue,
        };
        // Once finished, nothing later changes a task (a late copy of an event included).
        if matches!(entry.0.as_str(), "completed" | "failed" | "rejected") {
            continue;
        }
        if entry.0 != state {
            entry.0 = state.to_owned();
            entry.1.since_ms = time;
        }
        if state == "queued" {
            entry.1.agent_id = None;
        }
    }
    for (state, t) in tasks.into_values() {
        match state.as_str() {
            "queued" => s.queued.push(t),
            "running" => {
                if let Some(a) = t.agent_id.as_ref().and_then(|a| s.agents.get_mut(a)) {
                    a.running.push(t.task_id.clone());
                }
                s.running.push(t);
            }
            "completed" => s.completed += 1,
            "failed" => s.failed += 1,
            "rejected" => s.rejected += 1,
            _ => {}
        }
    }
    // The budgets: the ledger's entries up to T through the keeper's own fold.
    let mut fold = flotilla_budget_keeper::ledger::Ledger::new(flotilla_budget_keeper::replay::REMEMBER_MS);
    for r in source.read(Kind::Ledger, &[], Window::default()).await? {
        let Some(e) = Stored::<LedgerEntry>::of(&r) else { continue };
        if e.item.at_ms > at_ms {
            break;
        }
        flotilla_budget_keeper::replay::apply_entry(&mut fold, &e.item);
    }
    let mut scopes: Vec<String> = fold.scopes().map(str::to_owned).collect();
    scopes.sort();
    for scope in scopes {
        if let Some(b) = flotilla_budget_keeper::apply::status(&mut fold, &scope, at_ms) {
            s.budgets.push(b);
        }
    }
    Ok(s)
}

/// The state as text.
pub fn text(s: &FleetState) -> String {
    let mut out = format!("the fleet at {}\n", crate::story::date_time(s.at_ms));
    if let Some(w) = &s.warning {
        out.push_str(&format!("warning: {w}\n"));
    }
    out.push_str(&format!(
        "tasks: {} queued, {} running; {} completed, {} failed, {} rejected before then\n",
        s.queued.len(),
        s.running.len(),
        s.completed,
        s.failed,
        s.rejected
    ));
    out.push_str(&format!("agents ({}):\n", s.agents.len()));
    for (id, a) in &s.agents {
        let running =
            if a.running.is_empty() { String::new() } else { format!(" running {}", a.running.join(", ")) };
        out.push_str(&format!("  {id} (runner {}) {}{running}\n", a.runner_id, a.state));
    }
    if !s.queued.is_empty() {
        out.push_str("queued:\n");
        for t in &s.queued {
            out.push_str(&format!(
                "  {} {} tenant {} priority {} since {}\n",
                t.task_id,
                t.capability,
                t.tenant,
                t.priority.unwrap_or(5),
                crate::story::clock(t.since_ms)
            ));
        }
    }
    if !s.running.is_empty() {
        out.push_str("running:\n");
        for t in &s.running {
            out.push_str(&format!(
                "  {} {} on {} attempt {} since {}\n",
                t.task_id,
                t.capability,
                t.agent_id.as_deref().unwrap_or("?"),
                t.attempt.unwrap_or(0),
                crate::story::clock(t.since_ms)
            ));
        }
    }
    if !s.budgets.is_empty() {
        out.push_str("budgets:\n");
        for b in &s.budgets {
            let limit = b.limit_tokens.map_or_else(|| "no limit".to_owned(), |l| format!("limit {l}"));
            out.push_str(&format!("  {} used {} held {} {limit}\n", b.scope, b.used, b.held));
        }
    }
    out
}
