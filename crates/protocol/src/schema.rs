//! JSON Schemas of every public message, generated from the Rust types (see `schemas/`).

use schemars::{JsonSchema, Schema, schema_for};

use crate::types::*;

/// Every public message type with the file name of its schema.
pub fn all() -> Vec<(&'static str, Schema)> {
    fn s<T: JsonSchema>() -> Schema {
        schema_for!(T)
    }
    let mut all = vec![
        ("task-submission", s::<TaskSubmission>()),
        ("task-record", s::<TaskRecord>()),
        ("task-event", s::<TaskEvent>()),
        ("assignment", s::<Assignment>()),
        ("agent-record", s::<AgentRecord>()),
        ("runner-record", s::<RunnerRecord>()),
        ("agent-event", s::<AgentEvent>()),
        ("capability-record", s::<CapabilityRecord>()),
        ("dead-letter", s::<DeadLetter>()),
        ("approval", s::<Approval>()),
        ("message-send", s::<MessageSend>()),
        ("send-reply", s::<SendReply>()),
        ("envelope", s::<Envelope>()),
        ("grant", s::<Grant>()),
        ("message-event", s::<MessageEvent>()),
        ("message-record", s::<MessageRecord>()),
        ("recollection", s::<Recollection>()),
        ("cancel-task", s::<CancelTask>()),
        ("operator-key", s::<OperatorKey>()),
        ("control-event", s::<ControlEvent>()),
        ("cancel-request", s::<CancelRequest>()),
        ("cancel-reply", s::<CancelReply>()),
        ("grant-request", s::<GrantRequest>()),
        ("grant-reply", s::<GrantReply>()),
        ("stats-request", s::<StatsRequest>()),
        ("stats-report", s::<StatsReport>()),
        ("alert-event", s::<AlertEvent>()),
        ("wait-event", s::<WaitEvent>()),
        ("transcript-entry", s::<TranscriptEntry>()),
        ("queue-request", s::<QueueRequest>()),
        ("queue-report", s::<QueueReport>()),
        ("scale-request", s::<ScaleRequest>()),
        ("stop-agent-request", s::<StopAgentRequest>()),
        ("fleet-change-reply", s::<FleetChangeReply>()),
        ("health-reply", s::<HealthReply>()),
        ("lease", s::<Lease>()),
        ("error-reply", s::<ErrorReply>()),
        ("budget-reply", s::<BudgetReply>()),
        ("ledger-entry", s::<LedgerEntry>()),
    ];
    all.extend(BudgetOp::ALL.iter().map(|op| budget_request(*op)));
    all
}

/// The request schema of one budget operation (`<p>.budget.<op>`).
fn budget_request(op: BudgetOp) -> (&'static str, Schema) {
    match op {
        BudgetOp::Reserve => ("budget-reserve-request", schema_for!(ReserveRequest)),
        BudgetOp::Commit => ("budget-commit-request", schema_for!(CommitRequest)),
        BudgetOp::Release => ("budget-release-request", schema_for!(ReleaseRequest)),
        BudgetOp::Set => ("budget-set-request", schema_for!(SetRequest)),
        BudgetOp::Show => ("budget-show-request", schema_for!(ShowRequest)),
        BudgetOp::Carve => ("budget-carve-request", schema_for!(CarveRequest)),
        BudgetOp::Close => ("budget-close-request", schema_for!(CloseRequest)),
        BudgetOp::Rate => ("budget-rate-request", schema_for!(RateRequest)),
        BudgetOp::Backoff => ("budget-backoff-request", schema_for!(BackoffRequest)),
        BudgetOp::Price => ("budget-price-request", schema_for!(PriceRequest)),
    }
}
