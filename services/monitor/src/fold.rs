//! The monitor's figures, folded from the event stream read from its start, so that a restarted
//! monitor loses nothing and two monitors agree: each task is followed from `accepted` to its
//! end, the Prometheus families ([`Families`]) are updated as it goes, and every finished task is
//! kept (the last [`KEPT`]) for the figures over a rolling window ([`Fold::stats`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use flotilla_protocol::names::event_kind;
use flotilla_protocol::{
    AgentEvent, AgentState, MessageEvent, PriorityClass, StatsGroup, StatsReport, TaskEvent, message_event,
};

use crate::metrics::{
    CapabilityLabel, DecisionLabel, Families, KindLabel, ModelLabel, SubmitLabels, TaskLabels, TemplateLabel,
    TemplateTenant, TenantLabel, TokenLabels, WaitLabels, WindowLabels,
};

/// Finished tasks kept for windowed figures.
pub const KEPT: usize = 200_000;
/// Completed task ids remembered for a delegation wait stored after its sub-task ended.
const COMPLETED_RECENT: usize = 10_000;

/// Most distinct values of one label (capabilities, templates and models come from fleet files
/// and tenants from credentials, but a bound keeps a bad publisher from growing the label set).
pub const MAX_LABEL_VALUES: usize = 64;

/// The label value of values past the bound, and of what an event does not name.
pub const OTHER: &str = "other";

/// Task event kinds counted under their own label.
pub const KINDS: [&str; 11] = [
    "accepted",
    "rejected",
    "assigned",
    "started",
    "progress",
    "approval_requested",
    "approval_decided",
    "retrying",
    "completed",
    "failed",
    "requeued",
];

/// The windows of the cost-adjusted completion rate on `/metrics`.
pub const WINDOWS: [(&str, u64); 2] = [("1h", 3_600_000), ("24h", 86_400_000)];

/// Label values seen so far, each kind bounded by [`MAX_LABEL_VALUES`].
#[derive(Debug, Default)]
struct Bounded(HashMap<&'static str, HashSet<String>>);

impl Bounded {
    fn label(&mut self, kind: &'static str, value: Option<&str>) -> String {
        let Some(v) = value.filter(|v| !v.is_empty()) else { return OTHER.to_owned() };
        let seen = self.0.entry(kind).or_default();
        if seen.contains(v) || seen.len() < MAX_LABEL_VALUES {
            seen.insert(v.to_owned());
            v.to_owned()
        } else {
            OTHER.to_owned()
        }
    }
}

/// A task between `accepted` and its end.
#[derive(Debug, Clone, Default)]
struct Track {
    capability: String,
    tenant: String,
    class: String,
    template: Option<String>,
    accepted_ms: Option<u64>,
    started_ms: Option<u64>,
    /// Since when it waits for an agent (accepted, requeued or retrying, and not yet assigned).
    queued_since: Option<u64>,
    retries: u32,
    steps: u32,
    tool_calls: u32,
    escalated: bool,
    approved: u32,
    decided: u32,
    /// When it was requeued, until it runs again (its recovery).
    requeued_ms: Option<u64>,
    requeues: u32,
    recovery_ms: Option<u64>,
    /// Attempts that have started.
    started_attempts: HashSet<u32>,
    messages: u32,
    /// What failed attempts spent (their `retrying` events): tokens in and out, model calls,
    /// dollars; added to the task's own when it ends.
    spent_before: (u64, u64, u32, f64),
    /// Models the failed attempts called.
    models_before: Vec<String>,
}

/// An agent's life as its lifecycle events tell it.
#[derive(Debug, Clone, Default)]
struct Life {
    template: String,
    first_ms: u64,
    ended_ms: Option<u64>,
    error_since: Option<u64>,
    error_ms: u64,
    crashes: u64,
}

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Failed,
    Cancelled,
    Rejected,
}

/// A finished task, as the windowed figures need it.
#[derive(Debug, Clone)]
pub struct Finished {
    pub at_ms: u64,
    pub capability: String,
    pub template: String,
    pub tenant: String,
    pub models: Vec<String>,
    pub outcome: Outcome,
    pub queue_wait_ms: Option<u64>,
    pub duration_ms: Option<u64>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub model_calls: u32,
    pub tool_calls: u32,
    pub retries: u32,
    pub cost_usd: f64,
    pub escalated: bool,
    pub approved: u32,
    pub decided: u32,
    pub requeues: u32,
    /// The longest requeue → running again.
    pub recovery_ms: Option<u64>,
    pub messages: u32,
}

/// The template of agent `<runner>-<template>-<n>` on `runner`.
fn template_of(agent: &str, runner: Option<&str>) -> Option<String> {
    let rest = match runner {
        Some(r) => agent.strip_prefix(r)?.strip_prefix('-')?,
        None => agent.split_once('-')?.1,
    };
    rest.rsplit_once('-').map(|(t, _)| t.to_owned())
}

/// The figures of the fleet's task events.
#[derive(Debug, Default)]
pub struct Fold {
    pub metrics: Families,
    tracks: HashMap<String, Track>,
    finished: VecDeque<Finished>,
    /// When each task was submitted, with its labels (capability, tenant), for windowed counts.
    submitted: VecDeque<(u64, String, String)>,
    labels: Bounded,
    /// Stream sequence of the last event folded.
    pub events_seen: u64,
    /// Cumulative (completed, finished, escalated) per (template, tenant), for the ratios.
    outcomes: BTreeMap<(String, String), (u64, u64, u64)>,
    approvals: (u64, u64),
    lives: HashMap<String, Life>,
    lost: HashSet<String>,
    /// Handoffs: direct messages sent (replies aside) and delegations, and those answered (a
    /// reply, the sub-task completed).
    handoffs: (u64, u64),
    /// Sub-tasks a delegating agent waits for, not ended yet.
    awaited: HashSet<String>,
    /// The last tasks that completed (a wait may be stored after its sub-task ended).
    completed_recent: (VecDeque<String>, HashSet<String>),
    /// What the alert rules look at, kept current by the followers.
    pub inputs: crate::alerts::Inputs,
    /// The alerts firing now.
    pub alerts: crate::alerts::Alerts,
    /// The durable consumers as last sampled (for health replies).
    pub consumers: Vec<serde_json::Value>,
    /// The wait-for graph, for deadlock detection.
    pub graph: crate::deadlock::Graph,
    /// When each deadlock alert fired (from the stream), for windowed counts.
    deadlocks: VecDeque<u64>,
    /// Whether the events have been read to the end of the stream once.
    pub caught_up: bool,
    /// What the dashboard shows beyond the metrics.
    pub views: crate::dashboard::Views,
}

impl Fold {
    pub fn new() -> Self {
        let mut f = Self::default();
        f.inputs.started_ms = flotilla_protocol::time::now_ms();
        f
    }

    /// Folds one alert event (stream sequence `seq`): deadlocks are counted from these, so that
    /// every monitor counts the ones the alerting monitor raised, once each.
    pub fn alert_event(&mut self, ev: &flotilla_protocol::AlertEvent, seq: u64) {
        self.events_seen = self.events_seen.max(seq);
        if ev.kind == flotilla_protocol::alert_kind::DEADLOCK && ev.state == "firing" {
            self.metrics.deadlocks.inc();
            self.deadlocks.push_back(ev.at_ms);
            while self.deadlocks.len() > KEPT {
                self.deadlocks.pop_front();
            }
        }
    }

    /// Folds one wait event: a delegation (a wait on a sub-task) is a handoff, answered when the
    /// sub-task completes.
    pub fn wait_event(&mut self, ev: &flotilla_protocol::WaitEvent) {
        if ev.kind != flotilla_protocol::wait_kind::WAITING || ev.on != flotilla_protocol::wait_kind::ON_TASK
        {
            return;
        }
        self.handoffs.0 += 1;
        if self.completed_recent.1.contains(&ev.target) {
            self.handoffs.1 += 1;
        } else {
            self.awaited.insert(ev.target.clone());
        }
    }

    /// Deadlocks raised since `since_ms`.
    pub fn deadlocks_since(&self, since_ms: u64) -> usize {
        self.deadlocks.iter().filter(|at| **at >= since_ms).count()
    }

    /// Folds one task event (stream sequence `seq`).
    pub fn task_event(&mut self, ev: &TaskEvent, seq: u64) {
        self.events_seen = self.events_seen.max(seq);
        self.graph.task_event(ev);
        let m = &self.metrics;
        let kind = if KINDS.contains(&ev.kind.as_str()) { ev.kind.as_str() } else { OTHER };
        m.task_events.get_or_create(&KindLabel { kind: kind.to_owned() }).inc();
        let capability = self.labels.label("capability", ev.capability.as_deref());
        let tenant = self
            .labels
            .label("tenant", Some(ev.tenant.as_deref().unwrap_or(flotilla_protocol::DEFAULT_TENANT)));
        let class = ev.priority.map_or(OTHER, |p| PriorityClass::of(p).as_str()).to_owned();
        let template = ev
            .agent_id
            .as_deref()
            .and_then(|a| template_of(a, ev.runner_id.as_deref()))
            .map(|t| self.labels.label("template", Some(&t)));
        match ev.kind.as_str() {
            event_kind::ACCEPTED => {
                let track = self.tracks.entry(ev.task_id.clone()).or_default();
                track.capability.clone_from(&capability);
                track.tenant.clone_from(&tenant);
                track.class.clone_from(&class);
                track.accepted_ms = Some(ev.at_ms);
                track.queued_since = Some(ev.at_ms);
                let labels =
                    SubmitLabels { capability: capability.clone(), tenant: tenant.clone(), priority: class };
                self.metrics.submitted.get_or_create(&labels).inc();
                self.submitted.push_back((ev.at_ms, capability, tenant));
                while self.submitted.len() > KEPT {
                    self.submitted.pop_front();
                }
            }
            event_kind::REJECTED => {
                let labels =
                    SubmitLabels { capability: capability.clone(), tenant: tenant.clone(), priority: class };
                self.metrics.submitted.get_or_create(&labels).inc();
                self.metrics.rejected.get_or_create(&TenantLabel { tenant: tenant.clone() }).inc();
                self.submitted.push_back((ev.at_ms, capability.clone(), tenant.clone()));
                self.keep(Finished {
                    at_ms: ev.at_ms,
                    capability,
                    template: OTHER.to_owned(),
                    tenant,
                    models: Vec::new(),
                    outcome: Outcome::Rejected,
                    queue_wait_ms: None,
                    duration_ms: None,
                    input_tokens: 0,
                    output_tokens: 0,
                    model_calls: 0,
                    tool_calls: 0,
                    retries: 0,
                    cost_usd: 0.0,
                    escalated: false,
                    approved: 0,
                    decided: 0,
                    requeues: 0,
                    recovery_ms: None,
                    messages: 0,
                });
            }
            event_kind::ASSIGNED => {
                let track = self.tracks.entry(ev.task_id.clone()).or_default();
                track.queued_since = None;
                if template.is_some() {
                    track.template = template;
                }
            }
            event_kind::STARTED => {
                let track = self.tracks.entry(ev.task_id.clone()).or_default();
                track.queued_since = None;
                if template.is_some() {
                    track.template = template;
                }
                let capability = CapabilityLabel { capability: track.capability.clone() };
                if let Some(since) = track.requeued_ms.take() {
                    let took = ev.at_ms.saturating_sub(since);
                    track.recovery_ms = Some(track.recovery_ms.map_or(took, |r| r.max(took)));
                    self.metrics.recovery.get_or_create(&capability).observe(took as f64 / 1000.0);
                }
                if let Some(a) = ev.attempt
                    && !track.started_attempts.insert(a)
                {
                    self.metrics.redeliveries.get_or_create(&capability).inc();
                }
                if track.started_ms.is_none() {
                    track.started_ms = Some(ev.at_ms);
                    if let Some(a) = track.accepted_ms {
                        let wait = ev.at_ms.saturating_sub(a) as f64 / 1000.0;
                        let labels = WaitLabels {
                            capability: track.capability.clone(),
                            priority: track.class.clone(),
                        };
                        self.metrics.queue_wait.get_or_create(&labels).observe(wait);
                    }
                }
            }
            event_kind::REQUEUED | event_kind::RETRYING => {
                let track = self.tracks.entry(ev.task_id.clone()).or_default();
                track.queued_since = Some(ev.at_ms);
                let labels = CapabilityLabel { capability: track.capability.clone() };
                if ev.kind == event_kind::RETRYING {
                    track.retries += 1;
                    self.metrics.retries.get_or_create(&labels).inc();
                    let usage = ev.usage.unwrap_or_default();
                    let (cost, models) = self.calls(&ev.calls);
                    if let Some(track) = self.tracks.get_mut(&ev.task_id) {
                        track.spent_before.0 += usage.prompt_tokens;
                        track.spent_before.1 += usage.completion_tokens;
                        track.spent_before.2 += u32::try_from(ev.calls.len()).unwrap_or(u32::MAX);
                        track.spent_before.3 += cost;
                        for m in models {
                            if !track.models_before.contains(&m) {
                                track.models_before.push(m);
                            }
                        }
                    }
                } else {
                    track.requeues += 1;
                    track.requeued_ms = Some(ev.at_ms);
                    self.metrics.requeues.get_or_create(&labels).inc();
                    if ev.reason.as_deref() == Some("agent_lost")
                        && let Some(agent) = &ev.agent_id
                        && self.lost.insert(agent.clone())
                    {
                        let template = template_of(agent, ev.runner_id.as_deref());
                        let template = self.labels.label("template", template.as_deref());
                        self.metrics.agents_lost.get_or_create(&TemplateLabel { template }).inc();
                    }
                }
            }
            event_kind::PROGRESS => {
                // The event that closes a step (not a partial-text one) is one model call.
                if ev.text_delta.is_none()
                    && ev.step.is_some()
                    && let Some(track) = self.tracks.get_mut(&ev.task_id)
                {
                    track.steps += 1;
                    let tools = ev
                        .detail
                        .as_ref()
                        .and_then(|d| d.get("tool_calls"))
                        .and_then(|t| t.as_array())
                        .map_or(0, Vec::len);
                    track.tool_calls += u32::try_from(tools).unwrap_or(u32::MAX);
                }
            }
            event_kind::APPROVAL_REQUESTED => {
                if let Some(track) = self.tracks.get_mut(&ev.task_id) {
                    track.escalated = true;
                }
            }
            event_kind::APPROVAL_DECIDED => {
                let decision = ev.detail.as_ref().and_then(|d| d.get("decision")).and_then(|d| d.as_str());
                let approved = decision == Some("approved");
                let decision = if approved { "approved" } else { "rejected" };
                self.metrics.approvals.get_or_create(&DecisionLabel { decision: decision.to_owned() }).inc();
                self.approvals.1 += 1;
                self.approvals.0 += u64::from(approved);
                if let Some(track) = self.tracks.get_mut(&ev.task_id) {
                    track.decided += 1;
                    track.approved += u32::from(approved);
                }
            }
            event_kind::COMPLETED | event_kind::FAILED => self.finish(ev, template),
            _ => {}
        }
    }

    /// Counts model calls into the per-model families; returns what they cost and the models.
    fn calls(&mut self, calls: &[flotilla_protocol::CallUsage]) -> (f64, Vec<String>) {
        let mut cost = 0.0;
        let mut models = Vec::new();
        for c in calls {
            let model = self.labels.label("model", Some(&c.model));
            let m = &self.metrics;
            m.model_calls.get_or_create(&ModelLabel { model: model.clone() }).inc();
            let provider = self.labels.label("provider", c.provider.as_deref());
            for (kind, n) in [("input", c.usage.prompt_tokens), ("output", c.usage.completion_tokens)] {
                let labels = crate::metrics::GenAiTokenLabels {
                    gen_ai_operation_name: "chat".to_owned(),
                    gen_ai_provider_name: provider.clone(),
                    gen_ai_request_model: model.clone(),
                    gen_ai_token_type: kind.to_owned(),
                };
                m.genai_tokens.get_or_create(&labels).observe(n as f64);
            }
            if let Some(ms) = c.duration_ms {
                let labels = crate::metrics::GenAiLabels {
                    gen_ai_operation_name: "chat".to_owned(),
                    gen_ai_provider_name: provider,
                    gen_ai_request_model: model.clone(),
                };
                m.genai_duration.get_or_create(&labels).observe(ms as f64 / 1000.0);
            }
            for (direction, n) in [("input", c.usage.prompt_tokens), ("output", c.usage.completion_tokens)] {
                let labels = TokenLabels { model: model.clone(), direction: direction.to_owned() };
                m.model_tokens.get_or_create(&labels).inc_by(n);
            }
            if let Some(usd) = c.cost_usd.filter(|c| c.is_finite() && *c > 0.0) {
                cost += usd;
                m.cost.get_or_create(&ModelLabel { model: model.clone() }).inc_by(usd);
            }
            if !models.contains(&model) {
                models.push(model);
            }
        }
        (cost, models)
    }

    fn finish(&mut self, ev: &TaskEvent, template: Option<String>) {
        let mut track = self.tracks.remove(&ev.task_id).unwrap_or_else(|| Track {
            capability: self.labels.label("capability", ev.capability.as_deref()),
            tenant: self
                .labels
                .label("tenant", Some(ev.tenant.as_deref().unwrap_or(flotilla_protocol::DEFAULT_TENANT))),
            ..Track::default()
        });
        if template.is_some() {
            track.template = template;
        }
        let template = track.template.clone().unwrap_or_else(|| OTHER.to_owned());
        if self.awaited.remove(&ev.task_id) && ev.kind == event_kind::COMPLETED {
            self.handoffs.1 += 1;
        }
        if ev.kind == event_kind::COMPLETED && self.completed_recent.1.insert(ev.task_id.clone()) {
            self.completed_recent.0.push_back(ev.task_id.clone());
            while self.completed_recent.0.len() > COMPLETED_RECENT {
                if let Some(old) = self.completed_recent.0.pop_front() {
                    self.completed_recent.1.remove(&old);
                }
            }
        }
        let cancelled = ev.error.as_ref().is_some_and(|e| e.code == flotilla_protocol::failure::CANCELLED);
        let outcome = match (ev.kind.as_str(), cancelled) {
            (event_kind::COMPLETED, _) => Outcome::Completed,
            (_, true) => Outcome::Cancelled,
            _ => Outcome::Failed,
        };
        let m = &self.metrics;
        let labels = TaskLabels {
            capability: track.capability.clone(),
            template: template.clone(),
            tenant: track.tenant.clone(),
        };
        match outcome {
            Outcome::Completed => m.completed.get_or_create(&labels).inc(),
            Outcome::Cancelled => {
                m.failed.get_or_create(&labels).inc();
                m.cancelled.get_or_create(&labels).inc()
            }
            _ => m.failed.get_or_create(&labels).inc(),
        };
        let tt = TemplateTenant { template: template.clone(), tenant: track.tenant.clone() };
        let usage = ev.usage.unwrap_or_default();
        if outcome == Outcome::Completed {
            m.tokens.inc_by(usage.total_tokens);
        }
        // Every attempt's spend: the failed ones' (from their `retrying` events) and this one's.
        let (input_tokens, output_tokens) =
            (usage.prompt_tokens + track.spent_before.0, usage.completion_tokens + track.spent_before.1);
        let duration_ms = track.accepted_ms.map(|a| ev.at_ms.saturating_sub(a));
        if let (Some(d), Outcome::Completed) = (duration_ms, outcome) {
            let capability = CapabilityLabel { capability: track.capability.clone() };
            m.duration.get_or_create(&capability).observe(d as f64 / 1000.0);
        }
        let model_calls = if ev.calls.is_empty() && track.spent_before.2 == 0 {
            track.steps
        } else {
            u32::try_from(ev.calls.len()).unwrap_or(u32::MAX).saturating_add(track.spent_before.2)
        };
        m.input_tokens.get_or_create(&tt).observe(input_tokens as f64);
        m.output_tokens.get_or_create(&tt).observe(output_tokens as f64);
        m.model_calls_per_task.get_or_create(&tt).observe(f64::from(model_calls));
        m.tool_calls_per_task.get_or_create(&tt).observe(f64::from(track.tool_calls));
        m.retries_per_task.get_or_create(&tt).observe(f64::from(track.retries));
        m.messages_per_task.get_or_create(&tt).observe(f64::from(track.messages));
        let (mut cost, mut models) = self.calls(&ev.calls);
        if ev.calls.is_empty() {
            cost = ev.cost_usd.filter(|c| c.is_finite() && *c > 0.0).unwrap_or(0.0);
        }
        cost += track.spent_before.3;
        for model in std::mem::take(&mut track.models_before) {
            if !models.contains(&model) {
                models.push(model);
            }
        }
        let m = &self.metrics;
        m.cost_per_task.get_or_create(&tt).observe(cost);
        if track.escalated {
            m.escalated.get_or_create(&tt).inc();
        }
        let o = self.outcomes.entry((template.clone(), track.tenant.clone())).or_default();
        o.0 += u64::from(outcome == Outcome::Completed);
        o.1 += 1;
        o.2 += u64::from(track.escalated);
        self.keep(Finished {
            at_ms: ev.at_ms,
            capability: track.capability,
            template,
            tenant: track.tenant,
            models,
            outcome,
            queue_wait_ms: track.started_ms.zip(track.accepted_ms).map(|(s, a)| s.saturating_sub(a)),
            duration_ms: duration_ms.filter(|_| outcome == Outcome::Completed),
            input_tokens,
            output_tokens,
            model_calls,
            tool_calls: track.tool_calls,
            retries: track.retries,
            cost_usd: cost,
            escalated: track.escalated,
            approved: track.approved,
            decided: track.decided,
            requeues: track.requeues,
            recovery_ms: track.recovery_ms,
            messages: track.messages,
        });
    }

    /// Folds one agent lifecycle event (stream sequence `seq`).
    pub fn agent_event(&mut self, ev: &AgentEvent, seq: u64) {
        self.events_seen = self.events_seen.max(seq);
        let template = template_of(&ev.agent_id, Some(&ev.runner_id));
        let template = self.labels.label("template", template.as_deref());
        let life = self.lives.entry(ev.agent_id.clone()).or_insert_with(|| Life {
            template: template.clone(),
            first_ms: ev.at_ms,
            ..Life::default()
        });
        if life.ended_ms.is_some() && ev.to != AgentState::Terminated {
            // The same agent id started again (its runner restarted).
            life.ended_ms = None;
        }
        // A crash ends the agent's work on a task with reason `crashed: …`; after a few the agent
        // goes to ERROR (that transition is not a crash of its own).
        let crashed = ev.task_id.is_some()
            && ev.reason.as_deref().is_some_and(|r| {
                r.strip_prefix(flotilla_protocol::names::CRASHED_REASON).is_some_and(|t| t.starts_with(':'))
            });
        if crashed {
            life.crashes += 1;
            self.metrics.agent_crashes.get_or_create(&TemplateLabel { template }).inc();
        }
        if ev.to == AgentState::Error && ev.from != AgentState::Error {
            life.error_since = Some(ev.at_ms);
        } else if ev.from == AgentState::Error
            && ev.to != AgentState::Error
            && let Some(since) = life.error_since.take()
        {
            life.error_ms += ev.at_ms.saturating_sub(since);
        }
        if ev.to == AgentState::Terminated {
            if let Some(since) = life.error_since.take() {
                life.error_ms += ev.at_ms.saturating_sub(since);
            }
            life.ended_ms = Some(ev.at_ms);
        }
    }

    /// Folds one direct-message event (stream sequence `seq`).
    pub fn message_event(&mut self, ev: &MessageEvent, seq: u64) {
        self.events_seen = self.events_seen.max(seq);
        self.graph.message_event(ev);
        let kind = match ev.kind.as_str() {
            k @ (message_event::SENT
            | message_event::REFUSED
            | message_event::DELIVERED
            | message_event::ANSWERED
            | message_event::EXPIRED) => k,
            _ => OTHER,
        };
        self.metrics.messages.get_or_create(&KindLabel { kind: kind.to_owned() }).inc();
        match kind {
            // A reply is sent too, but it answers a handoff rather than making one.
            message_event::SENT if ev.in_reply_to.is_none() => {
                self.handoffs.0 += 1;
                if let Some(track) = ev.task_id.as_ref().and_then(|t| self.tracks.get_mut(t)) {
                    track.messages += 1;
                }
            }
            message_event::ANSWERED => self.handoffs.1 += 1,
            _ => {}
        }
    }

    fn keep(&mut self, f: Finished) {
        self.finished.push_back(f);
        while self.finished.len() > KEPT {
            self.finished.pop_front();
        }
    }

    /// The dashboard's overview at `now_ms`: the figures are the metrics' own (the same
    /// counters and gauges `/metrics` shows), with the queue by priority and tenant, charts of
    /// the last five minutes, cost and burn rate, and the alerts and deadlocks.
    pub fn overview(&mut self, now_ms: u64) -> serde_json::Value {
        use serde_json::json;
        self.refresh(now_ms);
        let m = &self.metrics;
        let kind = |k: &str| m.task_events.get_or_create(&KindLabel { kind: k.to_owned() }).get();
        let mut agents_by_status = serde_json::Map::new();
        for status in ["idle", "busy", "draining", "error", "dead"] {
            let n = m.agents.get_or_create(&crate::metrics::StatusLabel { status: status.to_owned() }).get();
            agents_by_status.insert(status.to_owned(), json!(n));
        }
        let mut by_class: BTreeMap<&str, u64> = BTreeMap::new();
        let mut by_tenant: BTreeMap<&str, u64> = BTreeMap::new();
        let mut by_capability: BTreeMap<&str, u64> = BTreeMap::new();
        for t in self.tracks.values().filter(|t| t.queued_since.is_some()) {
            *by_class.entry(t.class.as_str()).or_default() += 1;
            *by_tenant.entry(t.tenant.as_str()).or_default() += 1;
            *by_capability.entry(t.capability.as_str()).or_default() += 1;
        }
        // Ten-second buckets over the last five minutes.
        const BUCKET: u64 = 10_000;
        const BUCKETS: u64 = 30;
        let start = (now_ms / BUCKET).saturating_sub(BUCKETS - 1) * BUCKET;
        let mut done = vec![0u64; BUCKETS as usize];
        let mut failed = vec![0u64; BUCKETS as usize];
        let mut durations: Vec<Vec<u64>> = vec![Vec::new(); BUCKETS as usize];
        let (mut tokens_5m, mut cost_1h) = (0u64, 0.0f64);
        for f in self.finished.iter().rev() {
            if f.at_ms + 3_600_000 < now_ms {
                break;
            }
            cost_1h += f.cost_usd;
            if f.at_ms + 300_000 >= now_ms {
                tokens_5m += f.input_tokens + f.output_tokens;
            }
            if f.at_ms < start {
                continue;
            }
            let i = usize::try_from((f.at_ms - start) / BUCKET).unwrap_or(usize::MAX);
            match f.outcome {
                Outcome::Completed => {
                    if let Some(b) = done.get_mut(i) {
                        *b += 1;
                    }
                    if let (Some(d), Some(ms)) = (durations.get_mut(i), f.duration_ms) {
                        d.push(ms);
                    }
                }
                _ => {
                    if let Some(b) = failed.get_mut(i) {
                        *b += 1;
                    }
                }
            }
        }
        let p50: Vec<Option<u64>> = durations.iter_mut().map(|d| percentile(d, 0.5)).collect();
        let firing = self.alerts.firing(now_ms, "");
        let deadlocks: Vec<&flotilla_protocol::AlertEvent> =
            firing.iter().filter(|a| a.kind == flotilla_protocol::alert_kind::DEADLOCK).collect();
        let runners: BTreeSet<&str> = self
            .views
            .agents
            .iter()
            .filter_map(|a| a.get("runner_id").and_then(serde_json::Value::as_str))
            .collect();
        json!({
            "at_ms": now_ms,
            "events_seen": self.events_seen,
            "tasks": {
                "submitted": kind(event_kind::ACCEPTED) + kind(event_kind::REJECTED),
                "completed": kind(event_kind::COMPLETED),
                "failed": kind(event_kind::FAILED),
                "rejected": kind(event_kind::REJECTED),
                "running": self.tracks.values().filter(|t| t.queued_since.is_none() && t.started_ms.is_some()).count(),
            },
            "queue": {
                "total": by_class.values().sum::<u64>(),
                "by_priority": by_class,
                "by_tenant": by_tenant,
                "by_capability": by_capability,
            },
            "agents": { "by_status": agents_by_status, "list": self.views.agents },
            "runners": runners,
            "charts": {
                "bucket_ms": BUCKET, "start_ms": start,
                "completed": done, "failed": failed, "duration_p50_ms": p50,
            },
            "cost": { "usd_last_hour": cost_1h },
            "burn": { "tokens_per_minute": tokens_5m / 5, "tokens_total": m.tokens.get() },
            "budgets": { "exhausted": self.inputs.exhausted.keys().collect::<Vec<_>>() },
            "alerts": firing,
            "deadlocks": { "total": m.deadlocks.get(), "firing": deadlocks },
            "waits_open": self.graph.open_waits(),
            "approvals": self.views.pending.values().collect::<Vec<_>>(),
        })
    }

    /// Sets the families derived from the state at `now_ms` (backlog, ratios, windowed cost) so
    /// that a render shows them current.
    pub fn refresh(&self, now_ms: u64) {
        let m = &self.metrics;
        let mut backlog: BTreeMap<&str, (i64, u64)> = BTreeMap::new();
        for t in self.tracks.values() {
            if let Some(since) = t.queued_since {
                let e = backlog.entry(t.capability.as_str()).or_insert((0, u64::MAX));
                e.0 += 1;
                e.1 = e.1.min(since);
            }
        }
        // Capabilities seen before keep a series, at zero when nothing waits.
        for cap in self.labels.0.get("capability").into_iter().flatten() {
            let (n, oldest) = backlog.get(cap.as_str()).copied().unwrap_or((0, now_ms));
            let labels = CapabilityLabel { capability: cap.clone() };
            m.backlog.get_or_create(&labels).set(n);
            m.oldest_queued.get_or_create(&labels).set(now_ms.saturating_sub(oldest) as f64 / 1000.0);
        }
        for ((template, tenant), (completed, finished, escalated)) in &self.outcomes {
            let tt = TemplateTenant { template: template.clone(), tenant: tenant.clone() };
            if *finished > 0 {
                let f = *finished as f64;
                m.success_ratio.get_or_create(&tt).set(*completed as f64 / f);
                m.error_ratio.get_or_create(&tt).set((finished - completed) as f64 / f);
                m.escalation_ratio.get_or_create(&tt).set(*escalated as f64 / f);
            }
        }
        if self.approvals.1 > 0 {
            m.approval_ratio.set(self.approvals.0 as f64 / self.approvals.1 as f64);
        }
        if self.handoffs.0 > 0 {
            m.handoff_ratio.set(self.handoffs.1 as f64 / self.handoffs.0 as f64);
        }
        let mut per: BTreeMap<&str, (u64, u64, u64)> = BTreeMap::new();
        for life in self.lives.values() {
            let end = life.ended_ms.unwrap_or(now_ms).max(life.first_ms);
            let in_error = life.error_ms + life.error_since.map_or(0, |s| end.saturating_sub(s));
            let e = per.entry(life.template.as_str()).or_default();
            e.0 += end - life.first_ms;
            e.1 += in_error;
            e.2 += life.crashes;
        }
        for (template, (lived, in_error, crashes)) in per {
            let labels = TemplateLabel { template: template.to_owned() };
            if lived > 0 {
                m.agent_uptime_ratio
                    .get_or_create(&labels)
                    .set(1.0 - in_error.min(lived) as f64 / lived as f64);
                m.agent_crashes_per_hour
                    .get_or_create(&labels)
                    .set(crashes as f64 / (lived as f64 / 3_600_000.0));
            }
        }
        for (window, ms) in WINDOWS {
            let since = now_ms.saturating_sub(ms);
            let mut per: BTreeMap<(&str, &str), (u64, f64)> = BTreeMap::new();
            for f in self.finished.iter().filter(|f| f.at_ms >= since) {
                if f.outcome == Outcome::Rejected {
                    continue;
                }
                let e = per.entry((f.template.as_str(), f.tenant.as_str())).or_default();
                e.0 += u64::from(f.outcome == Outcome::Completed);
                e.1 += f.cost_usd;
            }
            for ((template, tenant), (successes, usd)) in per {
                let labels = WindowLabels {
                    template: template.to_owned(),
                    tenant: tenant.to_owned(),
                    window: window.to_owned(),
                };
                if usd > 0.0 {
                    m.successes_per_usd.get_or_create(&labels).set(successes as f64 / usd);
                }
                if successes > 0 {
                    m.usd_per_success.get_or_create(&labels).set(usd / successes as f64);
                }
            }
        }
    }

    /// The figures of the last `window_ms` before `now_ms`, grouped `by` `tenant`, `template`,
    /// `capability` or `model` (anything else: one group, `all`).
    pub fn stats(&self, window_ms: u64, by: &str, now_ms: u64) -> StatsReport {
        let since = now_ms.saturating_sub(window_ms);
        let mut groups: BTreeMap<String, Acc> = BTreeMap::new();
        let keys = |f: &Finished| -> Vec<String> {
            match by {
                "tenant" => vec![f.tenant.clone()],
                "template" => vec![f.template.clone()],
                "capability" => vec![f.capability.clone()],
                "model" if !f.models.is_empty() => f.models.clone(),
                "model" => vec![OTHER.to_owned()],
                _ => vec!["all".to_owned()],
            }
        };
        for f in self.finished.iter().filter(|f| f.at_ms >= since) {
            for k in keys(f) {
                groups.entry(k).or_default().add(f);
            }
        }
        for (at, capability, tenant) in self.submitted.iter().filter(|s| s.0 >= since) {
            let _ = at;
            let key = match by {
                "tenant" => tenant.clone(),
                "capability" => capability.clone(),
                "template" | "model" => continue,
                _ => "all".to_owned(),
            };
            groups.entry(key).or_default().submitted += 1;
        }
        let mut groups: Vec<StatsGroup> = groups.into_iter().map(|(k, a)| a.group(k)).collect();
        groups.sort_by(|a, b| {
            (b.completed + b.failed + b.rejected)
                .cmp(&(a.completed + a.failed + a.rejected))
                .then(a.key.cmp(&b.key))
        });
        let by = if ["tenant", "template", "capability", "model"].contains(&by) { by } else { "all" };
        StatsReport {
            window_ms,
            by: by.to_owned(),
            groups,
            events_seen: self.events_seen,
            monitor: String::new(),
            error: None,
        }
    }
}

/// One group's sums over the window.
#[derive(Debug, Default)]
struct Acc {
    submitted: u64,
    completed: u64,
    failed: u64,
    rejected: u64,
    cancelled: u64,
    waits: Vec<u64>,
    durations: Vec<u64>,
    input_tokens: u64,
    output_tokens: u64,
    model_calls: u64,
    tool_calls: u64,
    retries: u64,
    cost: f64,
    escalated: u64,
    approved: u64,
    decided: u64,
    requeues: u64,
    recoveries: Vec<u64>,
    messages: u64,
}

fn percentile(v: &mut [u64], p: f64) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let rank = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(rank.min(v.len() - 1)).copied()
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

impl Acc {
    fn add(&mut self, f: &Finished) {
        match f.outcome {
            Outcome::Completed => self.completed += 1,
            Outcome::Failed => self.failed += 1,
            Outcome::Cancelled => {
                self.failed += 1;
                self.cancelled += 1;
            }
            Outcome::Rejected => {
                self.rejected += 1;
                return;
            }
        }
        self.waits.extend(f.queue_wait_ms);
        self.durations.extend(f.duration_ms);
        self.input_tokens += f.input_tokens;
        self.output_tokens += f.output_tokens;
        self.model_calls += u64::from(f.model_calls);
        self.tool_calls += u64::from(f.tool_calls);
        self.retries += u64::from(f.retries);
        self.cost += f.cost_usd;
        self.escalated += u64::from(f.escalated);
        self.approved += u64::from(f.approved);
        self.decided += u64::from(f.decided);
        self.requeues += u64::from(f.requeues);
        self.recoveries.extend(f.recovery_ms);
        self.messages += u64::from(f.messages);
    }

    fn group(mut self, key: String) -> StatsGroup {
        let finished = (self.completed + self.failed) as f64;
        let per = |n: u64| ratio(n as f64, finished);
        StatsGroup {
            key,
            submitted: self.submitted,
            completed: self.completed,
            failed: self.failed,
            rejected: self.rejected,
            cancelled: self.cancelled,
            success_rate: ratio(self.completed as f64, finished),
            error_rate: ratio(self.failed as f64, finished),
            queue_wait_p50_ms: percentile(&mut self.waits, 0.5),
            queue_wait_p95_ms: percentile(&mut self.waits, 0.95),
            duration_p50_ms: percentile(&mut self.durations, 0.5),
            duration_p95_ms: percentile(&mut self.durations, 0.95),
            input_tokens_per_task: per(self.input_tokens),
            output_tokens_per_task: per(self.output_tokens),
            model_calls_per_task: per(self.model_calls),
            tool_calls_per_task: per(self.tool_calls),
            retries_per_task: per(self.retries),
            cost_usd: self.cost,
            cost_per_task_usd: ratio(self.cost, finished),
            escalation_rate: per(self.escalated),
            approval_rate: ratio(self.approved as f64, self.decided as f64),
            successes_per_usd: ratio(self.completed as f64, self.cost),
            usd_per_success: ratio(self.cost, self.completed as f64),
            requeues: self.requeues,
            recovery_p95_ms: percentile(&mut self.recoveries, 0.95),
            messages_per_task: per(self.messages),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;
    use flotilla_protocol::{CallUsage, ErrorInfo, Priority, Usage};

    fn ev(task: &str, kind: &str, at_ms: u64) -> TaskEvent {
        let mut e = TaskEvent::new(task, kind);
        e.at_ms = at_ms;
        e.capability = Some("write".into());
        e.tenant = Some(if task.starts_with('a') { "acme" } else { "globex" }.into());
        e.priority = Some(Priority::NORMAL);
        e.runner_id = Some("r1".into());
        e.agent_id = Some("r1-writer-0".into());
        e
    }

    fn run(fold: &mut Fold, task: &str, t0: u64, outcome: &str, cost: f64, asked: Option<&str>) {
        let mut seq = fold.events_seen;
        let mut push = |fold: &mut Fold, e: TaskEvent| {
            seq += 1;
            fold.task_event(&e, seq);
        };
        push(fold, ev(task, "accepted", t0));
        push(fold, ev(task, "assigned", t0 + 10));
        push(fold, ev(task, "started", t0 + 100));
        let mut step = ev(task, "progress", t0 + 200);
        step.step = Some(1);
        step.detail = Some(serde_json::json!({ "tool_calls": [{ "name": "search" }, { "name": "read" }] }));
        push(fold, step);
        if let Some(decision) = asked {
            push(fold, ev(task, "approval_requested", t0 + 300));
            let mut d = ev(task, "approval_decided", t0 + 400);
            d.detail = Some(serde_json::json!({ "decision": decision }));
            push(fold, d);
        }
        let mut end = ev(task, outcome, t0 + 1000);
        end.usage = Some(Usage::new(100, 20));
        end.calls = vec![CallUsage {
            step: 1,
            model: "m1".into(),
            usage: Usage::new(100, 20),
            cost_usd: Some(cost),
            provider: Some("offline".into()),
            duration_ms: Some(40),
        }];
        if outcome == "failed" && task.contains("cancel") {
            end.error = Some(ErrorInfo::new("cancelled", "by test"));
        }
        push(fold, end);
    }

    #[test]
    fn tasks_fold_into_the_five_families_and_the_windowed_figures() {
        let mut f = Fold::new();
        let now = 10_000_000;
        run(&mut f, "a1", now - 5_000, "completed", 0.01, Some("approved"));
        run(&mut f, "a2", now - 4_000, "completed", 0.01, None);
        run(&mut f, "a3", now - 3_000, "failed", 0.02, Some("rejected"));
        run(&mut f, "b1-cancel", now - 2_000, "failed", 0.0, None);
        // Long ago: outside a one-hour window.
        run(&mut f, "a-old", now - 7_200_000, "completed", 1.0, None);
        let mut waiting = ev("a-queued", "accepted", now - 60_000);
        waiting.capability = Some("write".into());
        f.task_event(&waiting, 1000);

        let r = f.stats(3_600_000, "tenant", now);
        assert_eq!(r.by, "tenant");
        let acme = r.groups.iter().find(|g| g.key == "acme").unwrap();
        assert_eq!((acme.submitted, acme.completed, acme.failed, acme.cancelled), (4, 2, 1, 0));
        assert_eq!(acme.success_rate, Some(2.0 / 3.0));
        assert_eq!(acme.queue_wait_p50_ms, Some(100));
        assert_eq!(acme.duration_p50_ms, Some(1000));
        assert_eq!(acme.tool_calls_per_task, Some(2.0));
        assert_eq!(acme.model_calls_per_task, Some(1.0));
        assert_eq!(acme.escalation_rate, Some(2.0 / 3.0));
        assert_eq!(acme.approval_rate, Some(0.5));
        assert!((acme.cost_usd - 0.04).abs() < 1e-9);
        assert!((acme.usd_per_success.unwrap() - 0.02).abs() < 1e-9, "failed tasks' spend counts");
        let globex = r.groups.iter().find(|g| g.key == "globex").unwrap();
        assert_eq!((globex.failed, globex.cancelled), (1, 1));
        assert_eq!(f.stats(3_600_000, "all", now).groups[0].completed, 2);
        assert_eq!(f.stats(86_400_000, "all", now).groups[0].completed, 3);
        assert_eq!(f.stats(3_600_000, "model", now).groups[0].key, "m1");

        f.refresh(now);
        let text = f.metrics.render();
        for line in [
            "flotilla_tasks_completed_total{capability=\"write\",template=\"writer\",tenant=\"acme\"} 3",
            "flotilla_tasks_cancelled_total{capability=\"write\",template=\"writer\",tenant=\"globex\"} 1",
            "flotilla_queue_backlog{capability=\"write\"} 1",
            "flotilla_queue_oldest_age_seconds{capability=\"write\"} 60.0",
            "flotilla_approvals_total{decision=\"approved\"} 1",
            "flotilla_model_tokens_total{model=\"m1\",direction=\"input\"} 500",
            "flotilla_task_queue_wait_seconds_count{capability=\"write\",priority=\"normal\"} 5",
            "flotilla_usd_per_successful_task{template=\"writer\",tenant=\"acme\",window=\"1h\"} 0.02",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn reliability_and_communication_come_from_agent_message_and_requeue_events() {
        let mut f = Fold::new();
        let agent = |from: AgentState, to: AgentState, at_ms: u64| AgentEvent {
            agent_id: "r1-writer-0".into(),
            runner_id: "r1".into(),
            from,
            to,
            task_id: None,
            reason: None,
            at_ms,
        };
        use AgentState::*;
        // An hour of life, a quarter of it in ERROR after one crash.
        f.agent_event(&agent(Initializing, Idle, 0), 1);
        let crash = AgentEvent {
            task_id: Some("t0".into()),
            reason: Some("crashed: tool flaky panicked".into()),
            ..agent(Executing, Idle, 1_799_000)
        };
        f.agent_event(&crash, 2);
        f.agent_event(&agent(Planning, Error, 1_800_000), 2);
        f.agent_event(&agent(Error, Idle, 2_700_000), 3);
        f.agent_event(&agent(Idle, Terminated, 3_600_000), 4);
        // A task whose agent was lost: requeued, then running again 2 s later.
        f.task_event(&ev("a1", "accepted", 1_000), 5);
        let mut started = ev("a1", "started", 1_100);
        started.attempt = Some(1);
        f.task_event(&started, 6);
        let mut requeued = ev("a1", "requeued", 5_000);
        requeued.reason = Some("agent_lost".into());
        f.task_event(&requeued, 7);
        let mut again = ev("a1", "started", 7_000);
        again.attempt = Some(2);
        f.task_event(&again, 8);
        for (kind, seq) in [("sent", 9), ("sent", 10), ("answered", 11), ("refused", 12)] {
            let m = MessageEvent {
                message_id: format!("m{seq}"),
                kind: kind.into(),
                at_ms: 7_500,
                from: "agent:r1-writer-0".into(),
                to: "agent:r2-x-0".into(),
                task_id: Some("a1".into()),
                priority: None,
                agent_id: None,
                seq: None,
                in_reply_to: None,
                error: None,
                rule: None,
            };
            f.message_event(&m, seq);
        }
        f.task_event(&ev("a1", "completed", 9_000), 13);
        let g = &f.stats(u64::MAX, "all", 10_000).groups[0];
        assert_eq!((g.requeues, g.recovery_p95_ms, g.messages_per_task), (1, Some(2000), Some(2.0)));
        f.refresh(3_600_000);
        let text = f.metrics.render();
        for line in [
            "flotilla_agent_crashes_total{template=\"writer\"} 1",
            "flotilla_agent_uptime_ratio{template=\"writer\"} 0.75",
            "flotilla_agent_crashes_per_agent_hour{template=\"writer\"} 1.0",
            "flotilla_agents_lost_total{template=\"writer\"} 1",
            "flotilla_task_recovery_seconds_sum{capability=\"write\"} 2.0",
            "flotilla_messages_total{kind=\"refused\"} 1",
            "flotilla_handoff_success_ratio 0.5",
            "flotilla_task_messages_sum{template=\"writer\",tenant=\"acme\"} 2.0",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn label_sets_stay_bounded() {
        let mut f = Fold::new();
        for i in 0..(MAX_LABEL_VALUES + 10) {
            let mut e = ev(&format!("t{i}"), "accepted", 1);
            e.capability = Some(format!("cap{i}"));
            f.task_event(&e, i as u64);
        }
        let caps = f.labels.0.get("capability").unwrap();
        assert_eq!(caps.len(), MAX_LABEL_VALUES);
        f.refresh(2);
        assert!(f.metrics.render().contains("capability=\"other\""));
    }

    #[test]
    fn templates_come_from_agent_ids() {
        assert_eq!(template_of("r1-writer-0", Some("r1")).as_deref(), Some("writer"));
        assert_eq!(template_of("r-1-code-review-12", Some("r-1")).as_deref(), Some("code-review"));
        assert_eq!(template_of("x", Some("r1")), None);
    }
}
