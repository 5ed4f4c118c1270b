//! The Prometheus families the monitor exports on `/metrics`: the five families of an agent
//! fleet (task, resource, quality, reliability, communication) and the cost-adjusted completion
//! rate, with bounded label sets (capability, template, tenant, model, priority class) and units
//! and `_total` suffixes as Prometheus names them.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubmitLabels {
    pub capability: String,
    pub tenant: String,
    pub priority: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub capability: String,
    pub template: String,
    pub tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabel {
    pub tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CapabilityLabel {
    pub capability: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WaitLabels {
    pub capability: String,
    pub priority: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TemplateTenant {
    pub template: String,
    pub tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabels {
    pub stream: String,
    pub consumer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TemplateLabel {
    pub template: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub model: String,
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabel {
    pub decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WindowLabels {
    pub template: String,
    pub tenant: String,
    pub window: String,
}

/// The attributes of the OpenTelemetry GenAI client metrics, as Prometheus labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GenAiLabels {
    pub gen_ai_operation_name: String,
    pub gen_ai_provider_name: String,
    pub gen_ai_request_model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GenAiTokenLabels {
    pub gen_ai_operation_name: String,
    pub gen_ai_provider_name: String,
    pub gen_ai_request_model: String,
    pub gen_ai_token_type: String,
}

pub type FloatGauge = Gauge<f64, AtomicU64>;
pub type FloatCounter = Counter<f64, AtomicU64>;
type Hist<L> = Family<L, Histogram, fn() -> Histogram>;

fn seconds() -> Histogram {
    // 5 ms to about 45 min.
    Histogram::new(exponential_buckets(0.005, 2.0, 20))
}

fn counts() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 16))
}

fn tokens() -> Histogram {
    Histogram::new(exponential_buckets(16.0, 2.0, 18))
}

fn dollars() -> Histogram {
    // A hundredth of a cent to about $100.
    Histogram::new(exponential_buckets(0.0001, 2.5, 18))
}

fn hist<L: Clone + std::hash::Hash + Eq>(f: fn() -> Histogram) -> Hist<L> {
    Family::new_with_constructor(f)
}

/// Every family, registered.
#[derive(Debug)]
pub struct Families {
    pub registry: Registry,
    // What the monitor has always exported.
    pub task_events: Family<KindLabel, Counter>,
    pub agents: Family<StatusLabel, Gauge>,
    pub tokens: Counter,
    pub cost: Family<ModelLabel, FloatCounter>,
    pub ledger: Family<OpLabel, Counter>,
    // Task.
    pub submitted: Family<SubmitLabels, Counter>,
    pub completed: Family<TaskLabels, Counter>,
    pub failed: Family<TaskLabels, Counter>,
    pub cancelled: Family<TaskLabels, Counter>,
    pub rejected: Family<TenantLabel, Counter>,
    pub success_ratio: Family<TemplateTenant, FloatGauge>,
    pub queue_wait: Hist<WaitLabels>,
    pub duration: Hist<CapabilityLabel>,
    pub backlog: Family<CapabilityLabel, Gauge>,
    pub oldest_queued: Family<CapabilityLabel, FloatGauge>,
    // Resource.
    pub input_tokens: Hist<TemplateTenant>,
    pub output_tokens: Hist<TemplateTenant>,
    pub model_calls_per_task: Hist<TemplateTenant>,
    pub tool_calls_per_task: Hist<TemplateTenant>,
    pub cost_per_task: Hist<TemplateTenant>,
    pub model_tokens: Family<TokenLabels, Counter>,
    pub model_calls: Family<ModelLabel, Counter>,
    // Quality.
    pub approvals: Family<DecisionLabel, Counter>,
    pub escalated: Family<TemplateTenant, Counter>,
    pub retries: Family<CapabilityLabel, Counter>,
    pub retries_per_task: Hist<TemplateTenant>,
    pub approval_ratio: FloatGauge,
    pub escalation_ratio: Family<TemplateTenant, FloatGauge>,
    pub error_ratio: Family<TemplateTenant, FloatGauge>,
    // Reliability.
    pub requeues: Family<CapabilityLabel, Counter>,
    pub redeliveries: Family<CapabilityLabel, Counter>,
    pub recovery: Hist<CapabilityLabel>,
    pub agents_lost: Family<TemplateLabel, Counter>,
    pub agent_crashes: Family<TemplateLabel, Counter>,
    pub agent_uptime_ratio: Family<TemplateLabel, FloatGauge>,
    pub agent_crashes_per_hour: Family<TemplateLabel, FloatGauge>,
    pub leader_epoch: Family<ServiceLabel, Gauge>,
    pub leader_changes: Family<ServiceLabel, Counter>,
    pub consumer_pending: Family<ConsumerLabels, Gauge>,
    pub consumer_ack_pending: Family<ConsumerLabels, Gauge>,
    pub consumer_redelivered: Family<ConsumerLabels, Gauge>,
    pub dead_letters: Counter,
    pub alerts_firing: Family<KindLabel, Gauge>,
    // Communication.
    pub messages: Family<KindLabel, Counter>,
    pub messages_per_task: Hist<TemplateTenant>,
    pub handoff_ratio: FloatGauge,
    pub deadlocks: Counter,
    // The OpenTelemetry GenAI client metrics, from the model calls the task events report.
    pub genai_tokens: Hist<GenAiTokenLabels>,
    pub genai_duration: Hist<GenAiLabels>,
    pub waits_open: Family<KindLabel, Gauge>,
    // Cost-adjusted completion.
    pub successes_per_usd: Family<WindowLabels, FloatGauge>,
    pub usd_per_success: Family<WindowLabels, FloatGauge>,
}

impl Families {
    pub fn new() -> Self {
        let mut r = Registry::default();
        macro_rules! reg {
            ($name:literal, $help:literal, $m:expr) => {{
                let m = $m;
                r.register($name, $help, m.clone());
                m
            }};
            ($name:literal, $help:literal, $unit:expr, $m:expr) => {{
                let m = $m;
                r.register_with_unit($name, $help, $unit, m.clone());
                m
            }};
        }
        Self {
            task_events: reg!(
                "flotilla_task_events",
                "Task lifecycle events seen, by kind",
                Family::default()
            ),
            agents: reg!(
                "flotilla_agents",
                "Registered agents by status (dead: no recent heartbeat)",
                Family::default()
            ),
            tokens: reg!("flotilla_tokens", "Tokens used by completed tasks", Counter::default()),
            cost: reg!(
                "flotilla_cost_usd",
                "What the model calls of finished tasks cost in US dollars, by model (the budget-keeper's prices)",
                Family::default()
            ),
            ledger: reg!(
                "flotilla_budget_ledger_entries",
                "Budget ledger entries, by operation or budget event",
                Family::default()
            ),
            submitted: reg!(
                "flotilla_tasks_submitted",
                "Tasks submitted (accepted or rejected), by capability, tenant and priority class",
                Family::default()
            ),
            completed: reg!("flotilla_tasks_completed", "Tasks completed", Family::default()),
            failed: reg!(
                "flotilla_tasks_failed",
                "Tasks failed (cancelled ones included)",
                Family::default()
            ),
            cancelled: reg!("flotilla_tasks_cancelled", "Tasks cancelled", Family::default()),
            rejected: reg!("flotilla_tasks_rejected", "Submissions rejected, by tenant", Family::default()),
            success_ratio: reg!(
                "flotilla_task_success_ratio",
                "Completed ÷ finished tasks since the stream began",
                Family::default()
            ),
            queue_wait: reg!(
                "flotilla_task_queue_wait",
                "Time from submission to the first start",
                Unit::Seconds,
                hist(seconds)
            ),
            duration: reg!(
                "flotilla_task_duration",
                "Time from submission to completion",
                Unit::Seconds,
                hist(seconds)
            ),
            backlog: reg!(
                "flotilla_queue_backlog",
                "Tasks waiting for an agent, by capability (what an autoscaler such as KEDA reads)",
                Family::default()
            ),
            oldest_queued: reg!(
                "flotilla_queue_oldest_age",
                "Age of the oldest task waiting for an agent, by capability",
                Unit::Seconds,
                Family::default()
            ),
            input_tokens: reg!("flotilla_task_input_tokens", "Input tokens per finished task", hist(tokens)),
            output_tokens: reg!(
                "flotilla_task_output_tokens",
                "Output tokens per finished task",
                hist(tokens)
            ),
            model_calls_per_task: reg!(
                "flotilla_task_model_calls",
                "Model calls per finished task",
                hist(counts)
            ),
            tool_calls_per_task: reg!(
                "flotilla_task_tool_calls",
                "Tool calls per finished task",
                hist(counts)
            ),
            cost_per_task: reg!(
                "flotilla_task_cost_usd",
                "What a finished task's model calls cost, in US dollars",
                hist(dollars)
            ),
            model_tokens: reg!(
                "flotilla_model_tokens",
                "Tokens of finished tasks' model calls, by model and direction",
                Family::default()
            ),
            model_calls: reg!(
                "flotilla_model_calls",
                "Model calls of finished tasks, by model",
                Family::default()
            ),
            approvals: reg!("flotilla_approvals", "Human approval decisions, by decision", Family::default()),
            escalated: reg!(
                "flotilla_tasks_escalated",
                "Finished tasks that asked a human",
                Family::default()
            ),
            retries: reg!("flotilla_task_retries", "Attempts retried after a failure", Family::default()),
            retries_per_task: reg!(
                "flotilla_task_retries_per_task",
                "Retries per finished task",
                hist(counts)
            ),
            approval_ratio: reg!(
                "flotilla_approval_ratio",
                "Approved ÷ decided human approvals",
                FloatGauge::default()
            ),
            escalation_ratio: reg!(
                "flotilla_task_escalation_ratio",
                "Finished tasks that asked a human ÷ finished tasks",
                Family::default()
            ),
            error_ratio: reg!("flotilla_task_error_ratio", "Failed ÷ finished tasks", Family::default()),
            requeues: reg!(
                "flotilla_task_requeues",
                "Tasks put back in the queue (their agent was lost, or handed them back)",
                Family::default()
            ),
            redeliveries: reg!(
                "flotilla_task_redeliveries",
                "Attempts started again without a new attempt number (an assignment delivered twice)",
                Family::default()
            ),
            recovery: reg!(
                "flotilla_task_recovery",
                "Time from a task's requeue (its agent lost or crashed) to running again",
                Unit::Seconds,
                hist(seconds)
            ),
            agents_lost: reg!(
                "flotilla_agents_lost",
                "Agents whose work was requeued because they were lost",
                Family::default()
            ),
            agent_crashes: reg!(
                "flotilla_agent_crashes",
                "Attempts that crashed their agent (a tool panicked or was aborted; three in a row put it in ERROR)",
                Family::default()
            ),
            agent_uptime_ratio: reg!(
                "flotilla_agent_uptime_ratio",
                "Share of the agents' lives not spent in ERROR",
                Family::default()
            ),
            agent_crashes_per_hour: reg!(
                "flotilla_agent_crashes_per_agent_hour",
                "Crashes per agent-hour",
                Family::default()
            ),
            leader_epoch: reg!(
                "flotilla_leader_epoch",
                "Acquisitions of each exclusive role's lease so far (leader changes = epoch - 1)",
                Family::default()
            ),
            leader_changes: reg!(
                "flotilla_leader_changes",
                "Times each exclusive role's lease went to a new holder or incarnation after the first (from the lease's epoch)",
                Family::default()
            ),
            dead_letters: reg!("flotilla_dead_letters", "Dead letters recorded", Counter::default()),
            consumer_pending: reg!(
                "flotilla_consumer_pending",
                "Messages a durable consumer has yet to deliver (its lag)",
                Family::default()
            ),
            consumer_ack_pending: reg!(
                "flotilla_consumer_ack_pending",
                "Messages a durable consumer delivered and waits to have acked",
                Family::default()
            ),
            consumer_redelivered: reg!(
                "flotilla_consumer_redelivered",
                "Messages a durable consumer is redelivering",
                Family::default()
            ),
            alerts_firing: reg!("flotilla_alerts_firing", "Alerts firing now, by kind", Family::default()),
            messages: reg!(
                "flotilla_messages",
                "Direct messages by what happened to them (sent, refused, delivered, answered, expired)",
                Family::default()
            ),
            messages_per_task: reg!(
                "flotilla_task_messages",
                "Direct messages sent for a finished task",
                hist(counts)
            ),
            handoff_ratio: reg!(
                "flotilla_handoff_success_ratio",
                "Handoffs answered ÷ made: direct messages replied to and delegations completed ÷ messages sent (replies aside) and delegations",
                FloatGauge::default()
            ),
            genai_tokens: reg!(
                "gen_ai_client_token_usage",
                "Tokens of a model call, by token type (OpenTelemetry gen_ai.client.token.usage)",
                hist(tokens)
            ),
            genai_duration: reg!(
                "gen_ai_client_operation_duration",
                "Duration of a model call (OpenTelemetry gen_ai.client.operation.duration)",
                Unit::Seconds,
                hist(seconds)
            ),
            deadlocks: reg!(
                "flotilla_deadlocks",
                "Deadlocks found in the wait-for graph (rate over 1h: deadlocks per hour)",
                Counter::default()
            ),
            waits_open: reg!(
                "flotilla_waits_open",
                "Waits of agents' work open now, by what they are on (task, reply, memory, approval)",
                Family::default()
            ),
            successes_per_usd: reg!(
                "flotilla_successful_tasks_per_usd",
                "Successful tasks per US dollar spent over the window (failed tasks' spend included)",
                Family::default()
            ),
            usd_per_success: reg!(
                "flotilla_usd_per_successful_task",
                "US dollars spent per successful task over the window (failed tasks' spend included)",
                Family::default()
            ),
            registry: r,
        }
    }

    /// The Prometheus text of every family.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "failed to render metrics");
        }
        out
    }
}

impl Default for Families {
    fn default() -> Self {
        Self::new()
    }
}
