//! Control of a running fleet: cancelling attempts, scaling and stopping agents, the
//! dispatcher's queue report, leases of exclusive roles and health replies.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::*;

/// Asks the active dispatcher to cancel a task that has not finished (`<p>.dispatcher.cancel`,
/// request/reply, MessagePack or JSON; `flotilla cancel`). Answered with a [`CancelReply`].
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct CancelRequest {
    pub task_id: String,
    /// Why; becomes the task's failure message (default "cancelled by an operator").
    pub reason: Option<String>,
}

/// The dispatcher's answer to a [`CancelRequest`]: the task's record as cancelled and the state
/// it was in (`failed` when it had been cancelled already: asking again is no error), or an
/// `error` (codes: `not_found`, `already_finished`, `malformed` and the other codes of a bad
/// request, `unavailable`).
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CancelReply {
    pub record: Option<Box<TaskRecord>>,
    /// The state the task was in before the cancel.
    pub was: Option<TaskState>,
    pub error: Option<ErrorInfo>,
}

/// Error codes of a [`CancelReply`] (besides those of a request that does not decode).
pub mod cancel_code {
    /// No task has the id.
    pub const NOT_FOUND: &str = "not_found";
    /// The task has finished: there is nothing to cancel.
    pub const ALREADY_FINISHED: &str = "already_finished";
    /// NATS failed, or the record kept changing: ask again.
    pub const UNAVAILABLE: &str = "unavailable";
    /// Not signed by a known operator's key where signatures are required (the message says
    /// why: `unsigned`, `bad_signature`, `stale_signature`, `unknown_operator`,
    /// `revoked_operator`); a `<p>.events.control.refused` event records it.
    pub const UNAUTHORIZED: &str = "unauthorized";
}

/// Tells a runner to stop an attempt that no longer counts (cancelled, past its deadline):
/// `<p>.runners.<runner>.cancel`, core NATS. The task record is already final; the runner only
/// stops wasting work (its result would be fenced off anyway).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CancelTask {
    pub task_id: String,
    pub attempt: u32,
    pub error: ErrorInfo,
}

/// Request to one runner: host `replicas` agents of template `template`
/// (`<p>.runners.<runner>.scale`). Declarative, so a retried request changes nothing more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleRequest {
    pub template: String,
    pub replicas: u32,
    /// Set by the dispatcher's autoscaler: the runner keeps the count within the template's
    /// `min_replicas`..`max_replicas` (an operator's request is taken as given).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub autoscale: bool,
}

/// Request to one runner: stop agent `agent_id` (`<p>.runners.<runner>.stop`). The agent takes no
/// new work, finishes what it holds, then deregisters. Stopping a stopped agent is not an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StopAgentRequest {
    pub agent_id: String,
}

/// A runner's answer to a [`ScaleRequest`] or [`StopAgentRequest`]: the template's agents on that
/// runner after the change, or an error.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FleetChangeReply {
    pub runner_id: String,
    pub template: String,
    /// Agents of the template that take work.
    pub agents: Vec<String>,
    /// Agents started by this request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub started: Vec<String>,
    /// Agents that are finishing their tasks before they deregister.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stopping: Vec<String>,
    pub error: Option<ErrorInfo>,
}

/// Asks the active dispatcher for its queue (`<p>.dispatcher.queue`, request/reply, MessagePack
/// or JSON; an empty body asks with the defaults). Answered with a [`QueueReport`].
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct QueueRequest {
    /// How many of the longest-waiting tasks to list (default 20, at most 1000).
    pub limit: Option<u32>,
}

/// The active dispatcher's queue (`<p>.dispatcher.queue`, request/reply; `flotilla queue`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct QueueReport {
    /// The dispatcher instance that answered (the active one).
    pub dispatcher: String,
    pub queued: u64,
    /// Of the queued tasks, those waiting out a retry backoff.
    pub backing_off: u64,
    pub running: u64,
    /// Queued tasks grouped by capability, priority and tenant, most urgent first.
    pub groups: Vec<QueueGroup>,
    /// The longest-waiting queued tasks.
    pub oldest: Vec<QueuedTaskInfo>,
    /// Fair share: each tenant's virtual runtime (tokens / weight) and weight.
    pub tenants: Vec<TenantShare>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct QueueGroup {
    pub capability: String,
    pub priority: u8,
    pub tenant: String,
    pub tasks: u64,
    /// Waiting time of the oldest task in the group.
    pub oldest_wait_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct QueuedTaskInfo {
    pub task_id: String,
    pub capability: String,
    pub priority: u8,
    pub tenant: String,
    pub wait_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TenantShare {
    pub tenant: String,
    pub weight: f64,
    pub vruntime: f64,
    pub queued: u64,
    pub running: u64,
}

/// A lease on an exclusive role, in the leases bucket under the role's key
/// ([`crate::names::lease_key`]: `dispatcher`, the dispatcher that schedules; `budget-keeper`,
/// the keeper that serves). Taken with a KV `create`, renewed with revision-checked updates,
/// deleted (revision-checked) by a holder that stops cleanly.
///
/// Whether an unrenewed lease has run out is judged by each contender on its own monotonic
/// clock, from the moment it saw the lease's current revision, with the holder's `ttl_ms`; the
/// timestamps are for people and never compared across machines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Lease {
    /// Instance id of the holder.
    pub holder: String,
    /// Counts acquisitions: a new holder writes one more than the highest epoch it saw.
    pub epoch: u64,
    /// When the holder acquired the lease (epoch milliseconds, the holder's clock).
    pub acquired_at_ms: u64,
    /// When the holder last renewed it (epoch milliseconds, the holder's clock).
    pub renewed_at_ms: u64,
    /// How long the lease stays valid after a renewal. The holder renews every third of it and
    /// stops working before it runs out unless a renewal succeeded.
    pub ttl_ms: u64,
}

/// Reply to a health request on `<prefix>.health.<service>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HealthReply {
    pub service: String,
    pub instance: String,
    pub version: String,
    pub protocol_version: u32,
    /// `ok` or `degraded`.
    pub status: String,
    pub uptime_ms: u64,
    /// Service-specific figures.
    #[serde(default)]
    pub details: Value,
}

/// An operator's signing key, as the services know it: the record under its public key in the
/// `<p>_operators` bucket, which only the admin writes (`flotilla auth sync`). A control request
/// signed by a key that is not here, or is revoked, is refused.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct OperatorKey {
    /// The operator's name: what its actions are attributed to.
    pub name: String,
    pub public_key: String,
    /// When it was revoked.
    pub revoked_ms: Option<u64>,
}

/// A control action, done or refused because of who asked. Done (`applied`, on
/// `<p>.events.control.<action>`): who did it (`actor`, a verified operator, `autoscaler` for the
/// dispatcher's bounded autoscaling, `anonymous` without authentication) and what changed
/// (`detail`). Refused (`refused`, on `<p>.events.control.refused`): not signed where signatures
/// are required, a bad or stale signature, an unknown or revoked key.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ControlEvent {
    /// `applied` or `refused`.
    pub kind: String,
    /// What was asked: `cancel`, `approve`, `reject`, `scale`, `stop`, `budget_set`, …
    pub action: String,
    /// Who did it (an applied action).
    #[serde(default)]
    pub actor: Option<String>,
    /// What it changed (an applied action), e.g. `{"runner_id", "template", "replicas"}`.
    #[serde(default)]
    pub detail: Option<serde_json::Value>,
    /// The task it concerned, if any.
    pub task_id: Option<String>,
    /// The public key that signed it, if any.
    pub signer: Option<String>,
    /// The operator that key belongs to, if it is known.
    pub operator: Option<String>,
    /// Why it was refused: `unsigned`, `bad_signature`, `stale_signature`, `unknown_operator`,
    /// `revoked_operator` (empty for an applied action).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Which service carried it out or refused it.
    pub by: String,
    pub at_ms: u64,
}
