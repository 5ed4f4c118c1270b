//! Wire types: task submissions, task records, assignments, lifecycle events, agent registry
//! records, dead-letter records, leases and health replies. Fields are only ever added, with defaults.

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// A task as submitted by any NATS client on `<prefix>.tasks.submit` (JSON or MessagePack).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TaskSubmission {
    /// Task id: 1–128 of `[A-Za-z0-9_-]`. Generated when absent (or taken from `Nats-Msg-Id`).
    /// Submitting the same id again never runs the task twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The capability an agent must declare to run this task. Required.
    pub capability: String,
    /// Anything: the task's input, handed to the agent as is.
    #[serde(default)]
    pub input: Value,
    /// 0 (most urgent) to 9, or one of `critical` (0), `interactive` (2), `normal` (5, default),
    /// `batch` (8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// Tenant the task is accounted to. Defaults to `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Token budget for the whole task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_tokens: Option<u64>,
    /// Time allowed from submission: milliseconds, or text such as `"30s"` or `"5m"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<DurationSpec>,
    /// Absolute deadline: epoch milliseconds or RFC 3339 text. The earlier of `timeout` and
    /// `deadline` applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<TimeSpec>,
    /// Affinity key: tasks sharing it prefer the agent that served the key last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_key: Option<String>,
    /// The task that spawned this one, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// Labels an agent must carry (e.g. `model`, `region`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Most attempts, 1–20 (default: the dispatcher's `default_max_attempts`, 3). An attempt
    /// that fails with a retryable error runs again after an exponential backoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
}

/// A duration given as milliseconds or as text (`"1500ms"`, `"30s"`, `"2m"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum DurationSpec {
    /// Milliseconds.
    Millis(u64),
    /// Human-readable duration.
    Text(String),
}

/// A point in time given as epoch milliseconds or RFC 3339 text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum TimeSpec {
    /// Milliseconds since the Unix epoch.
    Millis(u64),
    /// RFC 3339, e.g. `2026-11-25T18:00:00Z`.
    Text(String),
}

/// Task priority: 0 is the most urgent, 9 the least. Serialized as a number; named classes are
/// accepted on input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Priority(u8);

impl Priority {
    pub const CRITICAL: Priority = Priority(0);
    pub const INTERACTIVE: Priority = Priority(2);
    pub const NORMAL: Priority = Priority(5);
    pub const BATCH: Priority = Priority(8);
    pub const LOWEST: Priority = Priority(9);

    /// A priority from a number, if it is 0–9.
    pub fn new(level: u8) -> Option<Self> {
        (level <= 9).then_some(Self(level))
    }

    /// A priority from a class name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "critical" => Some(Self::CRITICAL),
            "interactive" | "high" => Some(Self::INTERACTIVE),
            "normal" | "default" => Some(Self::NORMAL),
            "batch" | "low" => Some(Self::BATCH),
            _ => name.parse::<u8>().ok().and_then(Self::new),
        }
    }

    /// The level, 0–9.
    pub fn level(self) -> u8 {
        self.0
    }
}

impl Default for Priority {
    fn default() -> Self {
        Self::NORMAL
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for Priority {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.0)
    }
}

impl<'de> Deserialize<'de> for Priority {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(i64),
            Name(String),
        }
        let expected = "a priority 0-9 or one of critical, interactive, normal, batch";
        match Raw::deserialize(d)? {
            Raw::Num(n) => u8::try_from(n)
                .ok()
                .and_then(Priority::new)
                .ok_or_else(|| serde::de::Error::invalid_value(serde::de::Unexpected::Signed(n), &expected)),
            Raw::Name(s) => Priority::from_name(&s)
                .ok_or_else(|| serde::de::Error::invalid_value(serde::de::Unexpected::Str(&s), &expected)),
        }
    }
}

impl JsonSchema for Priority {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Priority".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "0 (most urgent) to 9, or a class name",
            "oneOf": [
                { "type": "integer", "minimum": 0, "maximum": 9 },
                { "type": "string", "enum": ["critical", "interactive", "normal", "batch"] }
            ]
        })
    }
}

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Recorded, waiting for an agent.
    Queued,
    /// Given to an agent, not yet claimed by it.
    Assigned,
    /// Claimed and running on an agent.
    Running,
    /// Finished with an output.
    Completed,
    /// Finished without an output.
    Failed,
}

impl TaskState {
    /// True for states a task never leaves.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed)
    }

    /// Lower-case name, as in events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Assigned => "assigned",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
        }
    }
}

/// Token usage of one LLM call or of a whole task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl Usage {
    /// Usage from prompt and completion counts.
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        }
    }

    /// Adds another usage to this one.
    pub fn add(&mut self, other: Usage) {
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(other.completion_tokens);
        self.total_tokens = self.total_tokens.saturating_add(other.total_tokens);
    }
}

/// Token usage of one model call of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CallUsage {
    /// Step of the agent loop (1-based).
    pub step: u32,
    pub model: String,
    pub usage: Usage,
    /// What the call cost in US dollars, by the budget-keeper's price table (absent when the
    /// model has no price or budgets are off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
}

/// A machine-readable error: a stable `code` and a human `message`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorInfo {
    /// Stable, snake_case code (see [`RejectReason`] and the failure codes in the README).
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

impl ErrorInfo {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self { code: code.into(), message: message.into() }
    }
}

/// Why a submission was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The bytes are not valid MessagePack or JSON.
    Malformed,
    /// A required field is absent (e.g. `capability`).
    MissingField,
    /// A field has the wrong type.
    WrongType,
    /// A field has a value outside its allowed range or form.
    InvalidField,
    /// No agent in this fleet has ever declared the capability.
    UnknownCapability,
    /// The input is larger than the configured limit.
    InputTooLarge,
    /// The deadline had already passed when the task arrived.
    DeadlineExceeded,
}

impl RejectReason {
    /// The snake_case code.
    pub fn code(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::MissingField => "missing_field",
            Self::WrongType => "wrong_type",
            Self::InvalidField => "invalid_field",
            Self::UnknownCapability => "unknown_capability",
            Self::InputTooLarge => "input_too_large",
            Self::DeadlineExceeded => "deadline_exceeded",
        }
    }
}

/// The current record of a task, kept in the tasks KV bucket under its id. Every change to it is
/// a revision-checked update, which is what fences claims and completions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TaskRecord {
    pub id: String,
    pub capability: String,
    #[serde(default)]
    pub input: Value,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default = "default_tenant")]
    pub tenant: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_tokens: Option<u64>,
    /// Epoch ms after which the task fails with `deadline_exceeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    pub state: TaskState,
    /// Attempt number, starting at 1 with the first assignment. Every reassignment increments it,
    /// and a runner may only act on the attempt it was given.
    #[serde(default)]
    pub attempt: u32,
    /// Agent holding the current attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// Runner hosting that agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_id: Option<String>,
    pub submitted_at_ms: u64,
    pub updated_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// Warnings about the submission (e.g. fields this version does not know).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// W3C `traceparent` of the submission, so that all work on the task joins one trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
    /// Sub-tasks this task delegated, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<String>,
    /// Token usage of every model call of the finishing attempt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calls: Vec<CallUsage>,
    /// Most attempts; a retryable failure before the last one queues the task again.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Every failed attempt, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<AttemptRecord>,
}

impl TaskRecord {
    /// Puts the current attempt into `attempts` as failed with `error` (replacing an earlier
    /// entry for the same attempt, so a redelivered outcome writes it once).
    pub fn record_failed_attempt(&mut self, error: &ErrorInfo, usage: Option<Usage>, now_ms: u64) {
        let attempt = self.attempt;
        self.attempts.retain(|a| a.attempt != attempt);
        self.attempts.push(AttemptRecord {
            attempt,
            agent_id: self.agent_id.clone(),
            runner_id: self.runner_id.clone(),
            error: error.clone(),
            usage,
            started_at_ms: self.started_at_ms,
            finished_at_ms: now_ms,
        });
    }
}

/// One failed attempt of a task, kept in its record and in its dead letter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AttemptRecord {
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_id: Option<String>,
    pub error: ErrorInfo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: u64,
}

/// Default of [`TaskRecord::max_attempts`] for records written before it existed.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// Largest `max_attempts` a submission may ask for.
pub const MAX_ATTEMPTS_LIMIT: u32 = 20;

fn default_max_attempts() -> u32 {
    DEFAULT_MAX_ATTEMPTS
}

/// Whether a failure with this code may succeed if the attempt runs again: provider trouble and
/// model errors are, and so is a budget-keeper that did not answer; refusals, exhausted budgets or steps, deadlines, cancellations and human
/// rejections are not.
pub fn is_retryable(code: &str) -> bool {
    matches!(
        code,
        "provider_rate_limited"
            | "provider_server_error"
            | "provider_timeout"
            | "provider_unreachable"
            | "provider_malformed_response"
            | "model_error"
            | "agent_crashed"
            | "budget_unavailable"
    )
}

/// Failure codes the dispatcher and the CLI write themselves.
pub mod failure {
    /// The deadline passed, queued or running.
    pub const DEADLINE_EXCEEDED: &str = "deadline_exceeded";
    /// `flotilla cancel`.
    pub const CANCELLED: &str = "cancelled";
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

fn default_tenant() -> String {
    "default".to_owned()
}

fn initializing() -> AgentState {
    AgentState::Initializing
}

/// The default tenant name.
pub const DEFAULT_TENANT: &str = "default";

/// An assignment of one attempt of a task to one agent, published to its runner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Assignment {
    pub task_id: String,
    pub attempt: u32,
    pub agent_id: String,
    pub capability: String,
    #[serde(default)]
    pub input: Value,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default = "default_tenant")]
    pub tenant: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_key: Option<String>,
    pub assigned_at_ms: u64,
    /// The KV revision at which the dispatcher wrote the task record for this attempt. With
    /// `record`, the runner claims the attempt with one revision-checked write instead of reading
    /// the record back first; when the record has moved on since, the write fails and the runner
    /// reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// The task record as written at `revision`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<Box<TaskRecord>>,
}

impl Assignment {
    /// The assignment of attempt `rec.attempt` of a task to `rec.agent_id`, from its record
    /// (without the record itself or its revision).
    pub fn for_record(rec: &TaskRecord) -> Self {
        Self {
            task_id: rec.id.clone(),
            attempt: rec.attempt,
            agent_id: rec.agent_id.clone().unwrap_or_default(),
            capability: rec.capability.clone(),
            input: rec.input.clone(),
            priority: rec.priority,
            tenant: rec.tenant.clone(),
            deadline_ms: rec.deadline_ms,
            budget_tokens: rec.budget_tokens,
            context_key: rec.context_key.clone(),
            assigned_at_ms: rec.updated_at_ms,
            revision: None,
            record: None,
        }
    }
}

/// A task lifecycle event, published on `<prefix>.events.task.<id>.<kind>`. Which optional fields
/// are present depends on `kind`: `completed` carries `output`, `usage` and `agent_id`; `failed`
/// and `rejected` carry `error`; `progress` carries either a finished step (`step`, `usage`,
/// `detail`) or, while a streaming model writes, a piece of its text (`step`, `text_delta`,
/// `text_seq`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TaskEvent {
    pub task_id: String,
    /// `accepted`, `rejected`, `assigned`, `started`, `progress`, `approval_requested`,
    /// `completed`, `failed` or `requeued`.
    pub kind: String,
    pub at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capability: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// Why the scheduler made the decision this event reports (e.g. `least_loaded`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Step of the agent loop a `progress` event reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    /// What a `progress` event reports: the step's text, tool calls and results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Value>,
    /// Partial text of a `progress` event sent while the model is still writing its answer to
    /// `step`: the text produced since the previous such event. Concatenated in `text_seq` order,
    /// the deltas of a step are its answer text. Absent on the event that closes the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_delta: Option<String>,
    /// Position (from 1) of a `text_delta` among the partial-text events of its step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_seq: Option<u32>,
    /// Usage of every model call (on `completed` and `failed`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calls: Vec<CallUsage>,
    /// What the task's model calls cost in US dollars (on `completed` and `failed`, when the
    /// budget-keeper has prices for the models used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
}

impl TaskEvent {
    /// A bare event of `kind` for `task_id`, stamped now.
    pub fn new(task_id: impl Into<String>, kind: &str) -> Self {
        Self {
            task_id: task_id.into(),
            kind: kind.to_owned(),
            at_ms: crate::time::now_ms(),
            capability: None,
            tenant: None,
            priority: None,
            attempt: None,
            agent_id: None,
            runner_id: None,
            output: None,
            usage: None,
            error: None,
            reason: None,
            step: None,
            detail: None,
            text_delta: None,
            text_seq: None,
            calls: Vec::new(),
            cost_usd: None,
        }
    }

    /// The same event filled with a task record's identity fields.
    pub fn for_task(record: &TaskRecord, kind: &str) -> Self {
        let mut e = Self::new(record.id.clone(), kind);
        e.capability = Some(record.capability.clone());
        e.tenant = Some(record.tenant.clone());
        e.priority = Some(record.priority);
        e.attempt = (record.attempt > 0).then_some(record.attempt);
        e.agent_id = record.agent_id.clone();
        e.runner_id = record.runner_id.clone();
        e
    }
}

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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentEvent {
    pub agent_id: String,
    pub runner_id: String,
    pub from: AgentState,
    pub to: AgentState,
    /// The task the transition concerns, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    /// Crashed repeatedly; takes no work until its runner restarts it.
    Error,
}

/// An agent's entry in the registry bucket, rewritten on every heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentRecord {
    pub agent_id: String,
    /// Template name from the fleet file.
    pub name: String,
    pub runner_id: String,
    pub capabilities: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    pub provider: String,
    #[serde(default)]
    pub model: String,
    pub concurrency: u32,
    pub in_flight: u32,
    pub status: AgentStatus,
    pub started_at_ms: u64,
    pub heartbeat_at_ms: u64,
    /// Heartbeat period; the dispatcher treats the agent as dead after a few missed beats.
    pub heartbeat_interval_ms: u64,
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

/// A message that could not be processed, with the reason and the original bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeadLetter {
    /// Component that gave up on the message, e.g. `dispatcher.intake`.
    pub source: String,
    /// Machine-readable reason code.
    pub reason: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// Subject the original message arrived on.
    pub subject: String,
    /// Stream sequence of the original message, when it came from a stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_sequence: Option<u64>,
    /// The original payload, base64 (standard alphabet), cut to the first 64 KiB.
    pub payload_base64: String,
    pub payload_len: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    pub at_ms: u64,
    /// For a task that failed after retries: every attempt, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<AttemptRecord>,
}

/// A direct message to an agent, sent as a request to its inbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DirectMessage {
    /// Sending agent (or any client).
    pub from: String,
    /// The task the sender works on, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    pub message: Value,
    /// When true the receiving agent answers with its model; otherwise the runner only confirms
    /// receipt.
    #[serde(default)]
    pub wants_reply: bool,
}

/// The answer to a [`DirectMessage`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DirectReply {
    pub agent_id: String,
    /// The agent's answer, when one was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Approval {
    pub task_id: String,
    /// Which request of the task this is (step and call), so a retried attempt finds its answer.
    pub request_id: String,
    pub agent_id: String,
    pub question: String,
    pub status: ApprovalStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    pub asked_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at_ms: Option<u64>,
}

/// A lease on an exclusive role, in the leases bucket under the role's key (`dispatcher`: the
/// dispatcher that schedules). Taken with a KV `create`, renewed with revision-checked updates,
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

/// An error answer to a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorReply {
    pub error: ErrorInfo,
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
