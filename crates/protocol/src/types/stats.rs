//! The monitor's figures as a client asks for them (`<p>.monitor.stats`, `flotilla stats`): task,
//! resource and quality figures and the cost-adjusted completion rate over a rolling window,
//! grouped by one label.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A request for the figures of the last `window_ms` (default one hour), grouped `by` one of
/// `tenant`, `template`, `capability`, `model` (default: one group, `all`).
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct StatsRequest {
    pub window_ms: Option<u64>,
    pub by: Option<String>,
}

/// The figures of one group over the window. Rates are `None` when nothing they divide by
/// happened; times in milliseconds, money in US dollars.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StatsGroup {
    /// The group's label value (`all` when not grouped).
    pub key: String,
    pub submitted: u64,
    pub completed: u64,
    pub failed: u64,
    pub rejected: u64,
    pub cancelled: u64,
    /// completed ÷ (completed + failed).
    pub success_rate: Option<f64>,
    /// failed ÷ (completed + failed).
    pub error_rate: Option<f64>,
    pub queue_wait_p50_ms: Option<u64>,
    pub queue_wait_p95_ms: Option<u64>,
    pub duration_p50_ms: Option<u64>,
    pub duration_p95_ms: Option<u64>,
    pub input_tokens_per_task: Option<f64>,
    pub output_tokens_per_task: Option<f64>,
    pub model_calls_per_task: Option<f64>,
    pub tool_calls_per_task: Option<f64>,
    pub retries_per_task: Option<f64>,
    pub cost_usd: f64,
    pub cost_per_task_usd: Option<f64>,
    /// Tasks that asked a human ÷ finished tasks.
    pub escalation_rate: Option<f64>,
    /// Approved ÷ decided approvals.
    pub approval_rate: Option<f64>,
    /// Successful tasks per dollar spent (failed attempts' spend included).
    pub successes_per_usd: Option<f64>,
    /// Dollars spent per successful task (failed attempts' spend included).
    pub usd_per_success: Option<f64>,
    /// Times finished tasks were put back in the queue (their agent lost or crashed).
    #[serde(default)]
    pub requeues: u64,
    /// The 95th percentile of requeue → running again.
    pub recovery_p95_ms: Option<u64>,
    /// Direct messages sent per finished task.
    pub messages_per_task: Option<f64>,
}

/// The answer to a [`StatsRequest`]: one [`StatsGroup`] per label value, largest first.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StatsReport {
    pub window_ms: u64,
    pub by: String,
    pub groups: Vec<StatsGroup>,
    /// The last event the figures include (its stream sequence), for comparing monitors.
    pub events_seen: u64,
    /// Which monitor instance answered.
    pub monitor: String,
    pub error: Option<crate::ErrorInfo>,
}

/// An alert (`<p>.events.alert.<kind>`), raised by the monitor holding the `monitor` lease:
/// `firing` when a rule starts to hold, `resolved` when it stops. `key` says what it is about
/// (a service, an agent, a budget scope); one alert per kind and key at a time.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AlertEvent {
    /// `no_dispatcher`, `no_budget_keeper`, `agent_error`, `budget_exhausted`, `dead_letters`,
    /// `consumer_lag`, `deadlock`.
    pub kind: String,
    pub key: String,
    /// `firing` or `resolved`.
    pub state: String,
    pub message: String,
    /// When the condition began.
    pub since_ms: u64,
    pub at_ms: u64,
    /// The monitor instance that raised it.
    pub monitor: String,
    /// What a `deadlock` alert is about: the waits in the cycle or knot.
    pub deadlock: Option<Deadlock>,
}

/// A deadlock the monitor found in the wait-for graph: a cycle, or a knot in which every agent
/// that could make progress is itself waiting.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Deadlock {
    /// The tasks in it (waiting, or queued for a slot that only waiting work holds).
    pub tasks: Vec<String>,
    /// The direct messages in it (awaited replies, or handlings that wait themselves).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<String>,
    /// The agents whose slots it holds.
    pub agents: Vec<String>,
    /// Every wait in it, readable: `task:a waits for task:b`, `task:b queued for a slot of
    /// capability x held by task:a`.
    pub waits: Vec<String>,
    /// When the last of its waits began (the moment it formed, as the events tell).
    pub formed_at_ms: u64,
    /// The task failed to break it (the youngest waiter), when the monitor breaks deadlocks.
    pub victim: Option<String>,
}

/// A wait of an agent's work (`<p>.events.wait.<kind>`, `kind` `waiting` or `resumed`),
/// published by the runner before the wait begins and as soon as it ends. The monitor builds its
/// wait-for graph from these and from the task and message events.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WaitEvent {
    /// `waiting` or `resumed`.
    pub kind: String,
    /// Unique to this wait (the same on its `waiting` and `resumed`).
    pub wait_id: String,
    pub at_ms: u64,
    pub agent_id: String,
    pub runner_id: String,
    pub tenant: String,
    /// The waiting work: a task, or (`message_id`) the handling of a direct message.
    pub task_id: Option<String>,
    pub message_id: Option<String>,
    /// What is awaited: `task` (a sub-task's end), `reply` (the answer to a direct message),
    /// `memory` (a change of a shared-memory key) or `approval` (a human's decision).
    pub on: String,
    /// The awaited sub-task, message, memory key or approval request.
    pub target: String,
    /// When the wait gives up on its own, if it does.
    pub until_ms: Option<u64>,
}

/// Kinds of [`WaitEvent`] and what a wait is on.
pub mod wait_kind {
    pub const WAITING: &str = "waiting";
    pub const RESUMED: &str = "resumed";
    pub const ON_TASK: &str = "task";
    pub const ON_REPLY: &str = "reply";
    pub const ON_MEMORY: &str = "memory";
    pub const ON_APPROVAL: &str = "approval";
}

/// Kinds of [`AlertEvent`].
pub mod alert_kind {
    pub const NO_DISPATCHER: &str = "no_dispatcher";
    pub const NO_BUDGET_KEEPER: &str = "no_budget_keeper";
    pub const AGENT_ERROR: &str = "agent_error";
    pub const BUDGET_EXHAUSTED: &str = "budget_exhausted";
    pub const DEAD_LETTERS: &str = "dead_letters";
    pub const CONSUMER_LAG: &str = "consumer_lag";
    pub const DEADLOCK: &str = "deadlock";
}
