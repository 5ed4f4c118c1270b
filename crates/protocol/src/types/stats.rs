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
    /// `consumer_lag`.
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
}

/// Kinds of [`AlertEvent`].
pub mod alert_kind {
    pub const NO_DISPATCHER: &str = "no_dispatcher";
    pub const NO_BUDGET_KEEPER: &str = "no_budget_keeper";
    pub const AGENT_ERROR: &str = "agent_error";
    pub const BUDGET_EXHAUSTED: &str = "budget_exhausted";
    pub const DEAD_LETTERS: &str = "dead_letters";
    pub const CONSUMER_LAG: &str = "consumer_lag";
}
