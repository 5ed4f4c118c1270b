//! Tasks: submissions, priorities, the task record and its attempts, assignments and task
//! lifecycle events.

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use super::*;

/// A task as submitted by any NATS client on `<prefix>.tasks.submit.<tenant>` (or, trusted, on
/// `<prefix>.tasks.submit`), in JSON or MessagePack.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TaskSubmission {
    /// Task id: 1–128 of `[A-Za-z0-9_-]`. Generated when absent (or taken from `Nats-Msg-Id`).
    /// Submitting the same id again never runs the task twice.
    pub id: Option<String>,
    /// The capability an agent must declare to run this task. Required.
    pub capability: String,
    /// Anything: the task's input, handed to the agent as is.
    #[serde(default)]
    pub input: Value,
    /// 0 (most urgent) to 9, or one of `critical` (0), `interactive` (2), `normal` (5, default),
    /// `batch` (8).
    pub priority: Option<Priority>,
    /// Tenant the task is accounted to: the submit subject's tenant, else this field, else
    /// `default`. On a tenant's subject, naming another tenant is rejected (`tenant_mismatch`).
    pub tenant: Option<String>,
    /// Token budget for the whole task.
    pub budget_tokens: Option<u64>,
    /// Time allowed from submission: milliseconds, or text such as `"30s"` or `"5m"`.
    pub timeout: Option<DurationSpec>,
    /// Absolute deadline: epoch milliseconds or RFC 3339 text. The earlier of `timeout` and
    /// `deadline` applies.
    pub deadline: Option<TimeSpec>,
    /// Affinity key: tasks sharing it prefer the agent that served the key last.
    pub context_key: Option<String>,
    /// The task that spawned this one, if any.
    pub parent_id: Option<String>,
    /// Labels an agent must carry (e.g. `model`, `region`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Most attempts, 1–20 (default: the dispatcher's `default_max_attempts`, 3). An attempt
    /// that fails with a retryable error runs again after an exponential backoff.
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
    /// Recorded, waiting for an agent. (Older dispatchers wrote `assigned` for an attempt given
    /// out but not yet claimed; such a record reads as queued and is given out again, and a claim
    /// of the old assignment is fenced off.)
    #[serde(alias = "assigned")]
    Queued,
    /// Claimed and running on an agent.
    Running,
    /// Finished with an output.
    Completed,
    /// Finished without an output.
    Failed,
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CallUsage {
    /// Step of the agent loop (1-based).
    pub step: u32,
    pub model: String,
    pub usage: Usage,
    /// What the call cost in US dollars, by the budget-keeper's price table (absent when the
    /// model has no price or budgets are off).
    pub cost_usd: Option<f64>,
    /// The provider (`openai`, `anthropic`, `offline`), for the GenAI metrics.
    #[serde(default)]
    pub provider: Option<String>,
    /// How long the call took (the try that answered), in milliseconds.
    #[serde(default)]
    pub duration_ms: Option<u64>,
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
    /// The submission names a tenant other than the one whose subject it was published on.
    TenantMismatch,
    /// The message is larger than the limit of the way it came in ([`crate::limits`]).
    TooLarge,
    /// Objects and arrays are nested deeper than the limit.
    TooDeep,
    /// An object has more fields, or an array more items, than the limit.
    TooManyFields,
    /// A string (or binary value) is longer than the limit.
    StringTooLong,
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
            Self::TenantMismatch => "tenant_mismatch",
            Self::TooLarge => "too_large",
            Self::TooDeep => "too_deep",
            Self::TooManyFields => "too_many_fields",
            Self::StringTooLong => "string_too_long",
        }
    }
}

/// Default of [`TaskRecord::max_attempts`] for records written before it existed.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// Largest `max_attempts` a submission may ask for.
pub const MAX_ATTEMPTS_LIMIT: u32 = 20;

pub(crate) fn default_max_attempts() -> u32 {
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
    /// The task was the youngest waiter of a deadlock the monitor found, failed to break it.
    pub const DEADLOCK: &str = "deadlock";
}

/// An assignment of one attempt of a task to one agent, published to its runner. It carries the
/// queued record it was decided from (the input and everything else about the task is there,
/// once) and that record's revision: the runner claims the attempt with one revision-checked
/// write from there ([`TaskRecord::claim`]), so a stale or duplicate assignment can never run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Assignment {
    pub task_id: String,
    /// The attempt given out: one more than `record.attempt`.
    pub attempt: u32,
    pub agent_id: String,
    /// The task's capability, as in `record` (older runners read it here).
    pub capability: String,
    /// When the dispatcher decided.
    pub assigned_at_ms: u64,
    /// The KV revision of `record` in the tasks bucket.
    pub revision: u64,
    /// The task record as stored at `revision`.
    pub record: Box<TaskRecord>,
}

impl Assignment {
    /// The next attempt of the queued `record` (stored at `revision`) for `agent_id`.
    pub fn next_attempt(record: TaskRecord, revision: u64, agent_id: &str, at_ms: u64) -> Self {
        Self {
            task_id: record.id.clone(),
            attempt: record.attempt.saturating_add(1),
            agent_id: agent_id.to_owned(),
            capability: record.capability.clone(),
            assigned_at_ms: at_ms,
            revision,
            record: Box::new(record),
        }
    }
}

/// A task lifecycle event, published on `<prefix>.events.task.<tenant>.<id>.<kind>`. Which optional fields
/// are present depends on `kind`: `completed` carries `output`, `usage` and `agent_id`; `failed`
/// and `rejected` carry `error`; `progress` carries either a finished step (`step`, `usage`,
/// `detail`) or, while a streaming model writes, a piece of its text (`step`, `text_delta`,
/// `text_seq`).
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TaskEvent {
    pub task_id: String,
    /// `accepted`, `rejected`, `assigned`, `started`, `progress`, `approval_requested`,
    /// `completed`, `failed` or `requeued`.
    pub kind: String,
    pub at_ms: u64,
    pub capability: Option<String>,
    pub tenant: Option<String>,
    pub priority: Option<Priority>,
    pub attempt: Option<u32>,
    pub agent_id: Option<String>,
    pub runner_id: Option<String>,
    pub output: Option<Value>,
    pub usage: Option<Usage>,
    pub error: Option<ErrorInfo>,
    /// Why the scheduler made the decision this event reports (e.g. `least_loaded`).
    pub reason: Option<String>,
    /// Step of the agent loop a `progress` event reports.
    pub step: Option<u32>,
    /// What a `progress` event reports: the step's text, tool calls and results.
    pub detail: Option<Value>,
    /// Partial text of a `progress` event sent while the model is still writing its answer to
    /// `step`: the text produced since the previous such event. Concatenated in `text_seq` order,
    /// the deltas of a step are its answer text. Absent on the event that closes the step.
    pub text_delta: Option<String>,
    /// Position (from 1) of a `text_delta` among the partial-text events of its step.
    pub text_seq: Option<u32>,
    /// Usage of every model call that answered: of the attempt that ended the task (on
    /// `completed` and `failed`), or of the attempt that failed (on `retrying`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calls: Vec<CallUsage>,
    /// What the task's model calls cost in US dollars (on `completed` and `failed`, when the
    /// budget-keeper has prices for the models used).
    pub cost_usd: Option<f64>,
    /// The operator who caused this event (`failed` of a cancel, `approval_decided`), as its
    /// verified signature names it; `anonymous` for an unsigned action where none is required.
    pub actor: Option<String>,
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
            actor: None,
        }
    }

    /// The `assigned` event of an assignment to an agent of `runner_id`.
    pub fn assigned(a: &Assignment, runner_id: &str) -> Self {
        let mut e = Self::for_task(&a.record, crate::names::event_kind::ASSIGNED);
        e.attempt = Some(a.attempt);
        e.agent_id = Some(a.agent_id.clone());
        e.runner_id = Some(runner_id.to_owned());
        e
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

    /// The final event (`completed` or `failed`) a finished record announces: its output, usage,
    /// error, calls and their cost. `None` for a record that has not finished. Whoever publishes
    /// it (the runner that wrote the outcome, or the dispatcher repairing a runner that died in
    /// between) publishes the same event under the same message id.
    pub fn outcome_of(record: &TaskRecord) -> Option<Self> {
        let kind = match record.state {
            crate::TaskState::Completed => crate::names::event_kind::COMPLETED,
            crate::TaskState::Failed => crate::names::event_kind::FAILED,
            _ => return None,
        };
        let mut ev = Self::for_task(record, kind);
        ev.output = record.output.clone();
        ev.usage = record.usage;
        ev.error = record.error.clone();
        ev.calls = record.calls.clone();
        ev.cost_usd = record.calls.iter().filter_map(|c| c.cost_usd).reduce(|a, b| a + b);
        Some(ev)
    }
}
