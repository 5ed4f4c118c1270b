//! JSON Schemas of every public message, generated from the Rust types (see `schemas/`).

use schemars::{JsonSchema, Schema, schema_for};

use crate::types::*;

/// Every public message type with the file name of its schema.
pub fn all() -> Vec<(&'static str, Schema)> {
    fn s<T: JsonSchema>() -> Schema {
        schema_for!(T)
    }
    vec![
        ("task-submission", s::<TaskSubmission>()),
        ("task-record", s::<TaskRecord>()),
        ("task-event", s::<TaskEvent>()),
        ("assignment", s::<Assignment>()),
        ("agent-record", s::<AgentRecord>()),
        ("agent-event", s::<AgentEvent>()),
        ("capability-record", s::<CapabilityRecord>()),
        ("dead-letter", s::<DeadLetter>()),
        ("approval", s::<Approval>()),
        ("direct-message", s::<DirectMessage>()),
        ("direct-reply", s::<DirectReply>()),
        ("cancel-task", s::<CancelTask>()),
        ("cancel-request", s::<CancelRequest>()),
        ("cancel-reply", s::<CancelReply>()),
        ("queue-request", s::<QueueRequest>()),
        ("queue-report", s::<QueueReport>()),
        ("scale-request", s::<ScaleRequest>()),
        ("stop-agent-request", s::<StopAgentRequest>()),
        ("fleet-change-reply", s::<FleetChangeReply>()),
        ("health-reply", s::<HealthReply>()),
        ("lease", s::<Lease>()),
        ("error-reply", s::<ErrorReply>()),
        ("budget-request", s::<BudgetRequest>()),
        ("budget-reply", s::<BudgetReply>()),
        ("ledger-entry", s::<LedgerEntry>()),
    ]
}
