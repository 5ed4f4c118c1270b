//! Types every domain shares: machine-readable errors, error replies and dead letters.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::*;

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

pub(crate) fn default_tenant() -> String {
    "default".to_owned()
}

/// The default tenant name.
pub const DEFAULT_TENANT: &str = "default";

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

/// An error answer to a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorReply {
    pub error: ErrorInfo,
}
