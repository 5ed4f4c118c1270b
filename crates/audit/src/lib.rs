//! Audit and replay of a fleet from its streams: [`source`] reads the live streams (or an export)
//! in bulk, [`history`] gathers a task's whole story, [`story`] tells it, [`verify`] checks the
//! records, the ledger and the lifecycle rules against the events, and [`export`] writes and
//! checks a tamper-evident copy.

pub mod export;
pub mod history;
pub mod rerun;
pub mod source;
pub mod state;
pub mod story;
pub mod verify;

pub use history::{Loader, Stored, TaskHistory};
pub use source::{Kind, Record, Source, Window};

/// Why an audit could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{0}")]
    Nats(String),
    #[error("record {stream}#{seq} does not decode: {reason}")]
    Undecodable { stream: String, seq: u64, reason: String },
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Invalid(String),
}
