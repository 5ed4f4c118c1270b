//! Every subject, stream, consumer and KV bucket name, derived from one subject prefix so that
//! several fleets can share a NATS account. A subject string is written here and nowhere else.

use std::fmt;

/// Default subject prefix.
pub const DEFAULT_PREFIX: &str = "flotilla";

/// A validated subject prefix: one or more dot-separated tokens of `[A-Za-z0-9_-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Prefix(String);

/// Why a prefix was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid subject prefix {0:?}: use dot-separated tokens of letters, digits, '_' and '-'")]
pub struct PrefixError(pub String);

impl Prefix {
    /// Validates and wraps a prefix.
    pub fn new(prefix: impl Into<String>) -> Result<Self, PrefixError> {
        let prefix = prefix.into();
        let ok = !prefix.is_empty()
            && prefix.split('.').all(|t| {
                !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            });
        if ok { Ok(Self(prefix)) } else { Err(PrefixError(prefix)) }
    }

    /// The prefix as written in subjects.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Prefix {
    fn default() -> Self {
        Self(DEFAULT_PREFIX.to_owned())
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// True when `s` can be used as one subject token and as a KV key: `[A-Za-z0-9_-]{1,128}`.
pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Kinds of task lifecycle events; the last token of `<prefix>.events.task.<id>.<kind>`.
pub mod event_kind {
    pub const ACCEPTED: &str = "accepted";
    pub const REJECTED: &str = "rejected";
    pub const ASSIGNED: &str = "assigned";
    pub const STARTED: &str = "started";
    pub const COMPLETED: &str = "completed";
    pub const FAILED: &str = "failed";
    pub const REQUEUED: &str = "requeued";
    pub const PROGRESS: &str = "progress";
    pub const APPROVAL_REQUESTED: &str = "approval_requested";
    /// An attempt failed with a retryable error; the task is queued again after a backoff.
    pub const RETRYING: &str = "retrying";
}

/// Fleet-change operations of a runner; the last token of `<prefix>.runners.<runner>.<op>`.
pub mod runner_op {
    pub const SCALE: &str = "scale";
    pub const STOP: &str = "stop";
    /// Stop an attempt that no longer counts (`CancelTask`, core NATS, no reply).
    pub const CANCEL: &str = "cancel";
}

/// Names of the services, used in health subjects, dead-letter sources and registry records.
pub mod service {
    pub const DISPATCHER: &str = "dispatcher";
    pub const BUDGET_KEEPER: &str = "budget-keeper";
    pub const MONITOR: &str = "monitor";
    pub const AGENT_RUNNER: &str = "agent-runner";
    pub const ALL: [&str; 4] = [DISPATCHER, BUDGET_KEEPER, MONITOR, AGENT_RUNNER];
}

/// Keys of the leases bucket: one per role that only one instance may hold at a time.
pub mod lease_key {
    /// The active dispatcher (the one that schedules).
    pub const DISPATCHER: &str = "dispatcher";
    /// The active budget-keeper (the one that serves budgets).
    pub const BUDGET_KEEPER: &str = "budget-keeper";
}

/// All names of one fleet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Names {
    prefix: Prefix,
    /// Upper-case form used in stream names, e.g. `FLOTILLA`.
    upper: String,
    /// Form used in bucket names, e.g. `flotilla`.
    lower: String,
}

impl Names {
    /// Names for a fleet under `prefix`.
    pub fn new(prefix: Prefix) -> Self {
        let lower = prefix.as_str().replace('.', "_");
        let upper = lower.to_ascii_uppercase();
        Self { prefix, upper, lower }
    }

    /// The subject prefix.
    pub fn prefix(&self) -> &Prefix {
        &self.prefix
    }

    // ---- subjects -------------------------------------------------------------------------

    /// Where anyone submits a task: `<p>.tasks.submit`.
    pub fn submit_subject(&self) -> String {
        format!("{}.tasks.submit", self.prefix)
    }

    /// One task event: `<p>.events.task.<id>.<kind>`.
    pub fn task_event_subject(&self, task_id: &str, kind: &str) -> String {
        format!("{}.events.task.{task_id}.{kind}", self.prefix)
    }

    /// Every event of one task: `<p>.events.task.<id>.*`.
    pub fn task_events_of(&self, task_id: &str) -> String {
        format!("{}.events.task.{task_id}.*", self.prefix)
    }

    /// Every task event of one kind: `<p>.events.task.*.<kind>`.
    pub fn task_events_kind(&self, kind: &str) -> String {
        format!("{}.events.task.*.{kind}", self.prefix)
    }

    /// Every task event: `<p>.events.task.>`.
    pub fn task_events_all(&self) -> String {
        format!("{}.events.task.>", self.prefix)
    }

    /// Agent lifecycle event: `<p>.events.agent.<agent>.<kind>`.
    pub fn agent_event_subject(&self, agent_id: &str, kind: &str) -> String {
        format!("{}.events.agent.{agent_id}.{kind}", self.prefix)
    }

    /// Every event: `<p>.events.>`.
    pub fn events_all(&self) -> String {
        format!("{}.events.>", self.prefix)
    }

    /// Assignments for one runner: `<p>.assign.<runner>`.
    pub fn assign_subject(&self, runner_id: &str) -> String {
        format!("{}.assign.{runner_id}", self.prefix)
    }

    /// Every assignment: `<p>.assign.*`.
    /// Budget-keeper requests: `<p>.budget.<op>`.
    pub fn budget_subject(&self, op: &str) -> String {
        format!("{}.budget.{op}", self.prefix)
    }

    /// The ledger of budget changes: `<p>.ledger.<op>`.
    pub fn ledger_subject(&self, op: &str) -> String {
        format!("{}.ledger.{op}", self.prefix)
    }

    /// Every ledger entry: `<p>.ledger.>`.
    pub fn ledger_all(&self) -> String {
        format!("{}.ledger.>", self.prefix)
    }

    /// Stream: the ledger of budget changes (the budget-keeper's state, replayable for audit).
    pub fn ledger_stream(&self) -> String {
        format!("{}_LEDGER", self.upper)
    }

    pub fn assign_all(&self) -> String {
        format!("{}.assign.*", self.prefix)
    }

    /// Dead-letter records from one source: `<p>.deadletter.<source>`.
    pub fn deadletter_subject(&self, source: &str) -> String {
        format!("{}.deadletter.{source}", self.prefix)
    }

    /// Every dead-letter record: `<p>.deadletter.>`.
    pub fn deadletter_all(&self) -> String {
        format!("{}.deadletter.>", self.prefix)
    }

    /// Health request subject of one service: `<p>.health.<service>`.
    pub fn health_subject(&self, service: &str) -> String {
        format!("{}.health.{service}", self.prefix)
    }

    /// Health request subject of one instance of a service: `<p>.health.<service>.<instance>`.
    pub fn instance_health_subject(&self, service: &str, instance: &str) -> String {
        format!("{}.health.{service}.{instance}", self.prefix)
    }

    // ---- streams ---------------------------------------------------------------------------

    /// Stream capturing submissions.
    pub fn submissions_stream(&self) -> String {
        format!("{}_SUBMISSIONS", self.upper)
    }

    /// Stream capturing every event (audit trail, limits retention).
    pub fn events_stream(&self) -> String {
        format!("{}_EVENTS", self.upper)
    }

    /// Work-queue stream of assignments to runners.
    pub fn assignments_stream(&self) -> String {
        format!("{}_ASSIGNMENTS", self.upper)
    }

    /// Stream of dead-letter records.
    pub fn deadletter_stream(&self) -> String {
        format!("{}_DEADLETTER", self.upper)
    }

    // ---- consumers -------------------------------------------------------------------------

    /// The dispatcher's durable consumer on submissions.
    pub fn dispatcher_intake_consumer(&self) -> String {
        "dispatcher-intake".to_owned()
    }

    /// A runner's durable consumer on its assignments.
    pub fn runner_consumer(&self, runner_id: &str) -> String {
        format!("runner-{runner_id}")
    }

    // ---- buckets ---------------------------------------------------------------------------

    /// KV bucket: current record of every task, keyed by task id.
    pub fn tasks_bucket(&self) -> String {
        format!("{}_tasks", self.lower)
    }

    /// KV bucket: agent registry with heartbeats, keyed by agent id.
    pub fn agents_bucket(&self) -> String {
        format!("{}_agents", self.lower)
    }

    /// KV bucket: agents' shared memory, keys `<namespace>.<key>`.
    pub fn memory_bucket(&self) -> String {
        format!("{}_memory", self.lower)
    }

    /// An agent's inbox for direct messages (request/reply): `<p>.agents.<agent>.inbox`.
    pub fn agent_inbox(&self, agent_id: &str) -> String {
        format!("{}.agents.{agent_id}.inbox", self.prefix)
    }

    /// The active dispatcher's queue report (request/reply): `<p>.dispatcher.queue`.
    pub fn dispatcher_queue(&self) -> String {
        format!("{}.dispatcher.queue", self.prefix)
    }

    /// Cancelling a task (request/reply, answered by the active dispatcher):
    /// `<p>.dispatcher.cancel` with a `CancelRequest`.
    pub fn dispatcher_cancel(&self) -> String {
        format!("{}.dispatcher.cancel", self.prefix)
    }

    /// A runner's fleet-change requests (request/reply): `<p>.runners.<runner>.scale` with a
    /// `ScaleRequest`, `<p>.runners.<runner>.stop` with a `StopAgentRequest`.
    pub fn runner_control(&self, runner_id: &str, op: &str) -> String {
        format!("{}.runners.{runner_id}.{op}", self.prefix)
    }

    /// Topic an agent's `publish` tool writes to: `<p>.topics.<topic>`.
    pub fn topic_subject(&self, topic: &str) -> String {
        format!("{}.topics.{topic}", self.prefix)
    }

    /// KV bucket: requests for human approval, keyed by task id.
    pub fn approvals_bucket(&self) -> String {
        format!("{}_approvals", self.lower)
    }

    /// Object store: snapshots of the budget ledger's state, owned by the budget-keeper.
    pub fn budget_snapshots_bucket(&self) -> String {
        format!("{}_budget_snapshots", self.lower)
    }

    /// KV bucket: every capability ever declared by a fleet, keyed by capability.
    pub fn capabilities_bucket(&self) -> String {
        format!("{}_capabilities", self.lower)
    }

    /// KV bucket: leases of exclusive roles, keyed by role (see [`lease_key`]).
    pub fn leases_bucket(&self) -> String {
        format!("{}_leases", self.lower)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_validated() {
        assert!(Prefix::new("flotilla").is_ok());
        assert!(Prefix::new("acme.fleet-2").is_ok());
        for bad in ["", "a..b", "a.*", "a.>", "a b", ".a", "a."] {
            assert!(Prefix::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn names_follow_the_prefix() {
        let n = Names::new(Prefix::new("acme.fleet").unwrap());
        assert_eq!(n.submit_subject(), "acme.fleet.tasks.submit");
        assert_eq!(n.task_event_subject("t1", "completed"), "acme.fleet.events.task.t1.completed");
        assert_eq!(n.submissions_stream(), "ACME_FLEET_SUBMISSIONS");
        assert_eq!(n.tasks_bucket(), "acme_fleet_tasks");
        assert_eq!(n.leases_bucket(), "acme_fleet_leases");
    }

    #[test]
    fn tokens() {
        assert!(is_token("abc-DEF_123"));
        assert!(!is_token("a.b"));
        assert!(!is_token(""));
        assert!(!is_token(&"x".repeat(129)));
    }
}
