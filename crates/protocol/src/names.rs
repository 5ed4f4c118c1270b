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

/// Kinds of task lifecycle events; the last token of `<prefix>.events.task.<tenant>.<id>.<kind>`.
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
    /// A human answered an approval request (`actor`: who; `detail`: the decision and comment).
    pub const APPROVAL_DECIDED: &str = "approval_decided";
    /// An attempt failed with a retryable error; the task is queued again after a backoff.
    pub const RETRYING: &str = "retrying";
}

/// Fleet-change operations of a runner; the last token of `<prefix>.runners.<runner>.<op>`.
/// How an agent event's `reason` begins when the agent's work on a task ended because the attempt
/// crashed (a tool panicked or was aborted, no provider): `crashed: <why>`.
pub const CRASHED_REASON: &str = "crashed";

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

/// Queue groups of request subjects that several instances may listen on at once.
pub mod queue_group {
    /// The active dispatcher's requests (`<p>.dispatcher.queue`, `<p>.dispatcher.cancel`): should
    /// two dispatchers be active for a moment, a request still gets one answer.
    pub const DISPATCHER: &str = "dispatcher";
    /// The monitors' figures (`<p>.monitor.stats`): every monitor folds the same streams, so any
    /// one answers.
    pub const MONITOR: &str = "monitor";
}

/// Queue group of the message router (`<p>.msg.send.>`): every dispatcher instance routes.
pub const ROUTER_QUEUE_GROUP: &str = "router";

/// Keys of the leases bucket: one per role that only one instance may hold at a time.
pub mod lease_key {
    /// The active dispatcher (the one that schedules).
    pub const DISPATCHER: &str = "dispatcher";
    /// The active budget-keeper (the one that serves budgets).
    pub const BUDGET_KEEPER: &str = "budget-keeper";
    /// The monitor that raises alerts (every monitor computes them; one publishes).
    pub const MONITOR: &str = "monitor";
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

/// Accessors of [`Names`], one line each: `name(args) = form "text";` is a method returning
/// `<form><text>` (`form`: the prefix as in subjects, its upper-case or its lower-case form),
/// where `{arg}` in the text stands for the argument of that name.
macro_rules! names {
    ($( $(#[$doc:meta])* $name:ident($($arg:ident),*) = $form:ident $text:literal; )*) => {
        $(
            $(#[$doc])*
            pub fn $name(&self, $($arg: &str),*) -> String {
                format!(concat!("{}", $text), self.$form, $($arg = $arg),*)
            }
        )*
    };
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

    /// The tenant, task id and kind of a task event's subject
    /// (`<prefix>.events.task.<tenant>.<id>.<kind>`), if it is one.
    pub fn parse_task_event_subject<'s>(&self, subject: &'s str) -> Option<(&'s str, &'s str, &'s str)> {
        let rest = subject.strip_prefix(self.prefix.as_str())?.strip_prefix(".events.task.")?;
        let mut parts = rest.split('.');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(tenant), Some(id), Some(kind), None) => Some((tenant, id, kind)),
            _ => None,
        }
    }

    /// The tenant a submission's subject names: `Some` for `<prefix>.tasks.submit.<tenant>`,
    /// `None` for the bare submit subject (or any other subject).
    pub fn tenant_of_submit_subject<'s>(&self, subject: &'s str) -> Option<&'s str> {
        subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".tasks.submit.")
            .filter(|t| !t.is_empty() && !t.contains('.'))
    }

    // ---- subjects of tasks and their events --------------------------------------------------
    names! {
        /// Where a trusted client (an operator, a test, any client while authentication is
        /// off) submits a task: the tenant is the submission's `tenant` field, else `default`.
        submit_subject() = prefix ".tasks.submit";
        /// Where a tenant's clients submit its tasks: the tenant is this subject's last token
        /// (a submission naming another tenant is rejected), and a submitter credential may
        /// publish here and nowhere else.
        tenant_submit_subject(tenant) = prefix ".tasks.submit.{tenant}";
        /// Every tenant's submit subject.
        tenant_submit_all() = prefix ".tasks.submit.*";
        /// One task event, under the task's tenant.
        task_event_subject(tenant, task_id, kind) = prefix ".events.task.{tenant}.{task_id}.{kind}";
        /// Every event of one task of a known tenant.
        tenant_task_events_of(tenant, task_id) = prefix ".events.task.{tenant}.{task_id}.*";
        /// Every event of one task (of whatever tenant).
        task_events_of(task_id) = prefix ".events.task.*.{task_id}.*";
        /// Every task event of one kind.
        task_events_kind(kind) = prefix ".events.task.*.*.{kind}";
        /// Every task event of one tenant (what its submitters may read).
        tenant_task_events(tenant) = prefix ".events.task.{tenant}.>";
        /// Every task event.
        task_events_all() = prefix ".events.task.>";
        /// An agent's lifecycle event.
        agent_event_subject(agent_id, kind) = prefix ".events.agent.{agent_id}.{kind}";
        /// A control action refused because of who asked (`kind`: `refused`).
        control_event_subject(kind) = prefix ".events.control.{kind}";
        alert_event_subject(kind) = prefix ".events.alert.{kind}";
        /// A wait of an agent's work beginning or ending (`kind`: `waiting`, `resumed`), which the
        /// monitor's wait-for graph is built from.
        wait_event_subject(kind) = prefix ".events.wait.{kind}";
        /// Every wait event.
        wait_events_all() = prefix ".events.wait.*";
        /// Every event (the events stream's subjects).
        events_all() = prefix ".events.>";
    }

    // ---- subjects of assignments, budgets and dead letters ---------------------------------
    names! {
        /// Assignments for one runner.
        assign_subject(runner_id) = prefix ".assign.{runner_id}";
        /// Every assignment.
        assign_all() = prefix ".assign.*";
        /// Requests to the budget-keeper, one subject per operation.
        budget_subject(op) = prefix ".budget.{op}";
        /// The ledger of budget changes, one subject per kind of change.
        ledger_subject(op) = prefix ".ledger.{op}";
        /// Every ledger entry.
        ledger_all() = prefix ".ledger.>";
        /// Dead-letter records from one source.
        deadletter_subject(source) = prefix ".deadletter.{source}";
        /// Every dead-letter record.
        deadletter_all() = prefix ".deadletter.>";
        /// One entry of a task's transcript: a model call (`kind` `model`) or a tool call
        /// (`tool-<index>`) of one step of one attempt, recorded before the step goes on.
        transcript_subject(tenant, task_id, attempt, step, kind) =
            prefix ".transcripts.{tenant}.{task_id}.{attempt}.{step}.{kind}";
        /// Every transcript entry of one task.
        transcripts_of(tenant, task_id) = prefix ".transcripts.{tenant}.{task_id}.>";
        /// Every transcript entry of one task (of whatever tenant).
        task_transcripts(task_id) = prefix ".transcripts.*.{task_id}.>";
        /// Every transcript entry.
        transcripts_all() = prefix ".transcripts.>";
    }

    // ---- request/reply subjects ------------------------------------------------------------
    names! {
        /// Health requests to one service (any instance answers).
        health_subject(service) = prefix ".health.{service}";
        /// Health requests to one instance of a service.
        instance_health_subject(service, instance) = prefix ".health.{service}.{instance}";
        /// The active dispatcher's queue report, for a `QueueRequest`.
        dispatcher_queue() = prefix ".dispatcher.queue";
        /// Cancelling a task, answered by the active dispatcher, for a `CancelRequest`.
        dispatcher_cancel() = prefix ".dispatcher.cancel";
        dispatcher_grants() = prefix ".dispatcher.grants";
        monitor_stats() = prefix ".monitor.stats";
        /// A runner's fleet changes: `scale` (a `ScaleRequest`), `stop` (a `StopAgentRequest`),
        /// `cancel` (a `CancelTask`, no reply).
        runner_control(runner_id, op) = prefix ".runners.{runner_id}.{op}";
        /// Where a runner asks the router to send a message for one of its agents.
        msg_send_runner(runner_id) = prefix ".msg.send.runner.{runner_id}";
        /// Where a client (any NATS client, an operator) asks the router to send a message.
        msg_send_client(client) = prefix ".msg.send.client.{client}";
        /// Every send request (the router listens here).
        msg_send_all() = prefix ".msg.send.>";
        /// A topic (stored in the topics stream): agents' `publish` tool, or any client.
        topic_subject(topic) = prefix ".topics.{topic}";
        /// Every topic (the topics stream's subjects).
        topics_all() = prefix ".topics.>";
        /// What agents of a tenant remembered (`remember`), for `recall`.
        recall_subject(tenant) = prefix ".recall.{tenant}";
        /// Everything remembered (the recall stream's subjects).
        recall_all() = prefix ".recall.>";
        /// The JetStream API prefix of a tenant's submitters (their account imports from the
        /// fleet's account the parts of `$JS.API` they may use under it): a client passes it as
        /// its JetStream API prefix.
        tenant_js_api() = prefix ".jsapi";
    }

    // ---- subjects of stored messages (only the router publishes here) -----------------------
    names! {
        /// A message for one agent, in one priority class.
        inbox_agent(runner_id, agent_id, class) = prefix ".inbox.agent.{runner_id}.{agent_id}.{class}";
        /// The messages of one class for every agent of a runner (a runner's consumer).
        inbox_runner(runner_id, class) = prefix ".inbox.agent.{runner_id}.*.{class}";
        /// A message for any agent of a template, in one priority class.
        inbox_template(template, class) = prefix ".inbox.template.{template}.{class}";
        /// A message (a reply) for a client identity.
        inbox_client(client) = prefix ".inbox.client.{client}";
        /// Every stored message (the messages stream's subjects).
        inbox_all() = prefix ".inbox.>";
        /// A message event of a task's conversation (`_` for no task).
        message_event_subject(task_id, kind) = prefix ".events.message.{task_id}.{kind}";
        /// Every message event of one task.
        message_events_of(task_id) = prefix ".events.message.{task_id}.*";
        /// Every message event.
        message_events_all() = prefix ".events.message.>";
    }

    // ---- streams ---------------------------------------------------------------------------
    names! {
        /// Submissions.
        submissions_stream() = upper "_SUBMISSIONS";
        /// Every event: the audit trail (limits retention).
        events_stream() = upper "_EVENTS";
        /// Assignments to runners (work queue).
        assignments_stream() = upper "_ASSIGNMENTS";
        /// Dead-letter records.
        deadletter_stream() = upper "_DEADLETTER";
        /// The ledger of budget changes: the budget-keeper's state, replayable for audit.
        ledger_stream() = upper "_LEDGER";
        /// Direct messages, stored before the sender is told they were delivered.
        messages_stream() = upper "_MESSAGES";
        /// Everything published on a topic, kept for subscribers that were away.
        topics_stream() = upper "_TOPICS";
        /// Texts agents remembered, with their embeddings: every runner's recall index is built
        /// from it.
        recall_stream() = upper "_RECALL";
        /// What every model call and tool call of a task asked and answered (per-message TTLs:
        /// each tenant's retention).
        transcripts_stream() = upper "_TRANSCRIPTS";
    }

    // ---- buckets ---------------------------------------------------------------------------
    names! {
        /// KV: the current record of every task, by task id.
        tasks_bucket() = lower "_tasks";
        /// KV: the agent registry, by agent id (written when an agent's state changes; its
        /// liveness is its runner's, in [`Self::runners_bucket`]).
        agents_bucket() = lower "_agents";
        /// KV: every runner's heartbeat and incarnation, by runner id.
        runners_bucket() = lower "_runners";
        /// KV: every capability a fleet ever declared, by capability.
        capabilities_bucket() = lower "_capabilities";
        /// KV: agents' shared memory, keys `<namespace>.<key>`.
        memory_bucket() = lower "_memory";
        /// KV: requests for human approval, by task id.
        approvals_bucket() = lower "_approvals";
        /// KV: leases of exclusive roles, by role (see [`lease_key`]).
        leases_bucket() = lower "_leases";
        /// KV: who may message whom, by grant name.
        grants_bucket() = lower "_grants";
        /// KV: how the handling of each message stands, by message id.
        messages_bucket() = lower "_messages";
        /// KV: the operators' signing keys, by public key (written by the admin only).
        operators_bucket() = lower "_operators";
        /// Object store: snapshots of the budget ledger's state.
        budget_snapshots_bucket() = lower "_budget_snapshots";
    }

    // ---- consumers -------------------------------------------------------------------------

    /// The dispatcher's durable consumer on submissions.
    pub fn dispatcher_intake_consumer(&self) -> String {
        "dispatcher-intake".to_owned()
    }

    /// A runner's durable consumer on its agents' messages of one class.
    pub fn runner_mailbox_consumer(&self, runner_id: &str, class: &str) -> String {
        format!("mailbox-{runner_id}-{class}")
    }

    /// The durable consumer, shared by every runner hosting the template, on a template's messages
    /// of one class.
    pub fn template_mailbox_consumer(&self, template: &str, class: &str) -> String {
        format!("group-{template}-{class}")
    }

    /// The durable consumer of a template's topic subscriptions, shared by its runners.
    pub fn topic_consumer(&self, template: &str) -> String {
        format!("topics-{template}")
    }

    /// A runner's durable consumer on its assignments.
    pub fn runner_consumer(&self, runner_id: &str) -> String {
        format!("runner-{runner_id}")
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
        assert_eq!(
            n.task_event_subject("default", "t1", "completed"),
            "acme.fleet.events.task.default.t1.completed"
        );
        assert_eq!(
            n.parse_task_event_subject("acme.fleet.events.task.t9.t1.completed"),
            Some(("t9", "t1", "completed"))
        );
        assert_eq!(n.parse_task_event_subject("acme.fleet.events.task.t1.completed"), None);
        assert_eq!(n.tenant_of_submit_subject("acme.fleet.tasks.submit.green"), Some("green"));
        assert_eq!(n.tenant_of_submit_subject("acme.fleet.tasks.submit"), None);
        assert_eq!(n.submissions_stream(), "ACME_FLEET_SUBMISSIONS");
        assert_eq!(n.tasks_bucket(), "acme_fleet_tasks");
        assert_eq!(n.leases_bucket(), "acme_fleet_leases");
        assert_eq!(n.runners_bucket(), "acme_fleet_runners");
        assert_eq!(n.instance_health_subject("monitor", "m1"), "acme.fleet.health.monitor.m1");
        assert_eq!(n.runner_control("r1", "scale"), "acme.fleet.runners.r1.scale");
        assert_eq!(n.ledger_stream(), "ACME_FLEET_LEDGER");
        assert_eq!(n.events_all(), "acme.fleet.events.>");
    }

    #[test]
    fn tokens() {
        assert!(is_token("abc-DEF_123"));
        assert!(!is_token("a.b"));
        assert!(!is_token(""));
        assert!(!is_token(&"x".repeat(129)));
    }
}
