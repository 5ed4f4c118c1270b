//! Agents: lifecycle states and events, registry records, declared capabilities and
//! requests for human approval.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::*;

/// Lifecycle state of an agent, or of one agent's work on one task.
///
/// `initializing → idle → planning ⇄ executing ⇄ waiting → idle`, and from anywhere `error` or
/// `terminated`; [`AgentState::can_become`] is the whole transition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    Initializing,
    Idle,
    /// Calling the model.
    Planning,
    /// Running the tool calls the model chose.
    Executing,
    /// Waiting on something outside: a sub-task, a reply, a human.
    Waiting,
    Error,
    Terminated,
}

impl AgentState {
    /// True when `self → next` is a legal transition.
    pub fn can_become(self, next: AgentState) -> bool {
        use AgentState::*;
        match (self, next) {
            (Terminated, _) => false,
            (_, Terminated) => true,
            (Error, Idle) => true,
            (Error, _) => false,
            (_, Error) => true,
            (Initializing, Idle) => true,
            (Idle, Planning) => true,
            (Planning, Executing | Idle) => true,
            (Executing, Planning | Waiting | Idle) => true,
            (Waiting, Executing | Idle) => true,
            _ => false,
        }
    }

    /// Lower-case name, as in event subjects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Initializing => "initializing",
            Self::Idle => "idle",
            Self::Planning => "planning",
            Self::Executing => "executing",
            Self::Waiting => "waiting",
            Self::Error => "error",
            Self::Terminated => "terminated",
        }
    }
}

/// A lifecycle transition, published on `<prefix>.events.agent.<agent_id>.<state>`.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentEvent {
    pub agent_id: String,
    pub runner_id: String,
    pub from: AgentState,
    pub to: AgentState,
    /// The task the transition concerns, if any.
    pub task_id: Option<String>,
    pub reason: Option<String>,
    pub at_ms: u64,
}

/// One task an agent is working on, and where it is with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Activity {
    pub task_id: String,
    pub state: AgentState,
}

/// What an agent is doing, as shown in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    Idle,
    Busy,
    Draining,
    /// Crashed repeatedly; takes no work until its cool-down ends (`error_until_ms`), or until
    /// its runner restarts when it has come back too often (`recoveries`).
    Error,
}

/// An agent's entry in the registry bucket, written when the agent registers and whenever its
/// state, status or load changes (and refreshed every few hours). Whether it is alive is its
/// runner's heartbeat ([`RunnerRecord`]): see [`AgentRecord::alive_at`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentRecord {
    pub agent_id: String,
    /// Template name from the fleet file.
    pub name: String,
    pub runner_id: String,
    /// The tenant its template belongs to (messages across tenants need a grant).
    #[serde(default = "default_tenant")]
    pub tenant: String,
    pub capabilities: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    pub provider: String,
    #[serde(default)]
    pub model: String,
    pub concurrency: u32,
    pub in_flight: u32,
    pub status: AgentStatus,
    /// When its runner's process started.
    pub started_at_ms: u64,
    /// When its runner wrote this record. The runner's own heartbeat, in its [`RunnerRecord`],
    /// is what says the agent is still alive (see [`AgentRecord::alive_at`]).
    pub heartbeat_at_ms: u64,
    /// Its runner's heartbeat period; the agent counts as dead after a few missed beats.
    pub heartbeat_interval_ms: u64,
    /// The incarnation of its runner that wrote this record ([`RunnerRecord::incarnation`]):
    /// that runner's heartbeat vouches for it only while it is the same incarnation.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub incarnation: String,
    /// Lifecycle state of the agent as a whole.
    #[serde(default = "initializing")]
    pub state: AgentState,
    /// The tasks it works on now, each with its own lifecycle state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub activities: Vec<Activity>,
    #[serde(default)]
    pub protocol_version: u32,
    /// Autoscaling limits of its template on its runner (agents that take work); equal to the
    /// template's replicas when it does not autoscale.
    #[serde(default)]
    pub min_replicas: u32,
    #[serde(default)]
    pub max_replicas: u32,
    /// In ERROR: when it takes work again, after its cool-down (epoch ms); absent when it stays
    /// in ERROR until its runner restarts (it came back too often in one crash loop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_until_ms: Option<u64>,
    /// How often it came back from ERROR since its last task that ended without a crash: a
    /// crash loop while above 0 (the monitor's `agent_error` alert stays raised).
    #[serde(default)]
    pub recoveries: u32,
}

/// A runner's entry in the runners bucket, rewritten on every heartbeat: one write per runner
/// per heartbeat however many agents it hosts. The agents it hosts (their records carry its
/// `incarnation`) are alive while it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunnerRecord {
    pub runner_id: String,
    /// This process of the runner: a new one each time it starts, also under the same id.
    pub incarnation: String,
    /// The NATS client instance it runs as.
    #[serde(default)]
    pub instance: String,
    pub started_at_ms: u64,
    pub heartbeat_at_ms: u64,
    /// Its heartbeat period; it (and every agent it hosts) counts as dead after a few missed
    /// beats.
    pub heartbeat_interval_ms: u64,
    /// Agents it hosts now.
    pub agents: u32,
    /// Tasks its agents hold now.
    #[serde(default)]
    pub in_flight: u32,
    /// Shutting down: finishing its work, taking none.
    #[serde(default)]
    pub draining: bool,
    #[serde(default)]
    pub protocol_version: u32,
}

/// Missed heartbeats after which clients of the registry (the monitor, the CLI) count an agent or
/// runner as dead; the dispatcher's own bound is its `missed_heartbeats` setting.
pub const MISSED_BEATS: u64 = 3;

impl RunnerRecord {
    /// Whether it still beats at `now_ms` (its clock against the reader's: allow for skew).
    pub fn alive_at(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.heartbeat_at_ms)
            <= self.heartbeat_interval_ms.saturating_mul(MISSED_BEATS) + 500
    }

    /// Whether `agent`'s record was written by this incarnation of this runner.
    pub fn vouches_for(&self, agent: &AgentRecord) -> bool {
        self.runner_id == agent.runner_id
            && !agent.incarnation.is_empty()
            && self.incarnation == agent.incarnation
    }
}

impl AgentRecord {
    /// When the agent was last known alive: the later of this record's write and the heartbeat
    /// of `runner` (its runner's record, if there is one) when that is the incarnation that
    /// wrote this record; with the heartbeat period that applies.
    pub fn seen_at_ms(&self, runner: Option<&RunnerRecord>) -> (u64, u64) {
        match runner.filter(|r| r.vouches_for(self)) {
            Some(r) if r.heartbeat_at_ms > self.heartbeat_at_ms => {
                (r.heartbeat_at_ms, r.heartbeat_interval_ms)
            }
            _ => (self.heartbeat_at_ms, self.heartbeat_interval_ms),
        }
    }

    /// Whether the agent is alive at `now_ms`: seen (itself or through its runner's heartbeat)
    /// within [`MISSED_BEATS`] heartbeat periods and half a second.
    pub fn alive_at(&self, runner: Option<&RunnerRecord>, now_ms: u64) -> bool {
        let (at, interval) = self.seen_at_ms(runner);
        now_ms.saturating_sub(at) <= interval.saturating_mul(MISSED_BEATS) + 500
    }

    /// This record with `heartbeat_at_ms` and `heartbeat_interval_ms` as last seen through
    /// `runner` ([`Self::seen_at_ms`]): what a reader that judges an agent by its own record's
    /// heartbeat should be shown.
    pub fn as_seen(mut self, runner: Option<&RunnerRecord>) -> Self {
        (self.heartbeat_at_ms, self.heartbeat_interval_ms) = self.seen_at_ms(runner);
        self
    }

    /// Milliseconds since the agent was last known alive.
    pub fn age_ms(&self, runner: Option<&RunnerRecord>, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.seen_at_ms(runner).0)
    }
}

/// A capability's entry in the capabilities bucket: some fleet declared it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CapabilityRecord {
    pub capability: String,
    /// Agent templates that declared it.
    #[serde(default)]
    pub templates: Vec<String>,
    pub declared_at_ms: u64,
}

fn initializing() -> AgentState {
    AgentState::Initializing
}

/// Where a request for human approval stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalStatus {
    Pending,
    Approved,
    Rejected,
}

/// A task's request for human approval, in the approvals bucket under the task id. The agent
/// waits until `status` is decided (`flotilla approve|reject <task>`).
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Approval {
    pub task_id: String,
    /// Which request of the task this is (step and call), so a retried attempt finds its answer.
    pub request_id: String,
    pub agent_id: String,
    pub question: String,
    pub status: ApprovalStatus,
    pub comment: Option<String>,
    pub asked_at_ms: u64,
    pub decided_at_ms: Option<u64>,
    /// The public key of the operator whose signature decided it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
    /// The signer's signature (base64url) over this record without it
    /// ([`Approval::signed_content`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl Approval {
    /// What an operator signs when it decides: this record's JSON with `signature` left out.
    pub fn signed_content(&self) -> Vec<u8> {
        let unsigned = Self { signature: None, ..self.clone() };
        serde_json::to_vec(&unsigned).unwrap_or_default()
    }
}

#[cfg(test)]
mod lifecycle_tests {
    use super::AgentState::*;

    #[test]
    fn the_transition_table() {
        for (from, to) in [
            (Initializing, Idle),
            (Idle, Planning),
            (Planning, Executing),
            (Executing, Waiting),
            (Waiting, Executing),
            (Executing, Planning),
            (Planning, Idle),
            (Idle, Error),
            (Error, Idle),
            (Waiting, Terminated),
        ] {
            assert!(from.can_become(to), "{from:?} -> {to:?}");
        }
        for (from, to) in [
            (Initializing, Planning),
            (Idle, Executing),
            (Planning, Waiting),
            (Error, Planning),
            (Terminated, Idle),
            (Idle, Idle),
            (Waiting, Planning),
        ] {
            assert!(!from.can_become(to), "{from:?} -> {to:?} must be refused");
        }
    }
}
