//! Budgets: requests to the budget-keeper, its answers and the ledger entries that record them.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::*;

/// A request to the budget-keeper, on `<p>.budget.<op>`. Which fields an operation needs:
/// - `reserve`: `id` (idempotency key, one per model call), `scopes`, `want`, `min`, `lease_ms`;
///   optionally `limits` (limits of scopes to create if they have none yet, e.g. the task's own),
///   `model` (priced at commit), `rates` (rate limits the call needs a permit of) and `priority`
///   (who gets scarce permits first);
/// - `commit`: `id`, `used` (and `prompt_tokens`, for the price); `release`: `id`;
/// - `set`: `scope` (or `<class>.*`, the default of every scope of that class without a limit of
///   its own), `limit_tokens`, `window_ms` (absent for a limit over the scope's whole life),
///   `policy` (`fail` or `wait`), `warn_at` (percentages, default 80);
/// - `show`: `scope` (a budget) or `rate` (a rate limit);
/// - `carve`: `id`, `scopes` (the parent's), `want` (tokens), `scope` (the child's, created with
///   what was carved), `lease_ms`; `close`: `scope` (ends a task's budget; a carved one gives
///   what it did not use back to its parent);
/// - `rate`: `rate` (key), `rpm`, `tpm`, `window_ms` (default one minute);
/// - `backoff`: `rates`, `retry_after_ms` (a provider answered 429: no permits until then);
/// - `price`: `model`, `input_usd_per_mtok`, `output_usd_per_mtok`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Scopes a reservation counts against, e.g. `task.<id>`, `agent.<id>`, `tenant.<name>`,
    /// `model.<name>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub want: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    /// Limits (tokens, over the scope's life) of scopes to create if they have none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Rate limits (keys) a reservation needs a permit of.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rates: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<u64>,
    /// Of `used`, how many were prompt (input) tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_ms: Option<u64>,
    /// `fail` (default) or `wait` (for the window to roll).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn_at: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_usd_per_mtok: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_usd_per_mtok: Option<f64>,
}

/// A budget as the budget-keeper reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BudgetStatus {
    pub scope: String,
    /// Absent for a scope that is only counted (no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_tokens: Option<u64>,
    /// Absent for a limit over the scope's whole life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_ms: Option<u64>,
    /// Used in the window.
    pub used: u64,
    /// Held by open reservations.
    pub held: u64,
    /// Absent without a limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available: Option<u64>,
    /// What the scope's usage cost in the window, in US dollars (by the price table).
    #[serde(default)]
    pub cost_usd: f64,
    /// `fail` or `wait`.
    #[serde(default)]
    pub policy: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warn_at: Vec<u8>,
    /// Set for a task's budget that has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_at_ms: Option<u64>,
    /// Set for a budget carved out of another (the carve reservation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carved_by: Option<String>,
}

/// A shared rate limit as the budget-keeper reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RateStatus {
    pub rate: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    pub window_ms: u64,
    /// Permits granted in the current window.
    pub requests: u64,
    /// Tokens of those permits.
    pub tokens: u64,
    /// Permits waiting.
    pub waiting: u64,
    /// Set while a provider's 429 holds the permits back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_until_ms: Option<u64>,
}

/// The budget-keeper's answer. `error` is set when the operation was refused (codes:
/// `budget_exceeded`, `budget_wait` (the budget's policy is to wait: try again after
/// `retry_after_ms`), `rate_limited` (no permit in time: try again after `retry_after_ms`),
/// `budget_closed`, `unknown_scope`, `unknown_reservation`, `reservation_ended`,
/// `reservation_mismatch`, `invalid_request`, `malformed`, `unavailable`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BudgetReply {
    /// Tokens the reservation holds (`reserve`, `carve`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    /// When the reservation's lease runs out (`reserve`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    /// How long the lease lasts from the answer on (`reserve`): compare with the caller's own
    /// clock, not `expires_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_left_ms: Option<u64>,
    /// Tokens charged (`commit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charged: Option<u64>,
    /// Tokens used beyond the reservation, not charged (`commit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub over: Option<u64>,
    /// What the call cost in US dollars (`commit`, when the model has a price).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// With `budget_wait` and `rate_limited`: when to try again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<RateStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
}

/// One change of the budgets, as recorded in the ledger stream (`<p>.ledger.<op>`) before it is
/// answered; replaying the stream in order, each at its `at_ms`, rebuilds the budget-keeper's
/// state. `op` is one of the operations that change state (`reserve`, `commit`, `release`,
/// `set`, `carve`, `close`, `rate`, `backoff`, `price`), `expire` (a lease that ran out), or a
/// budget event that the replay skips: `warning` (a threshold of `request.scope` was crossed;
/// `reply.budget` has the numbers), `exhausted` (a reservation was refused for want of tokens) or
/// `refilled` (the window rolled or the limit rose: the scope is below its thresholds again).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LedgerEntry {
    pub op: String,
    pub at_ms: u64,
    pub request: BudgetRequest,
    /// What the operation came to, for auditors (the replay recomputes it).
    pub reply: BudgetReply,
}
