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
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeadLetter {
    /// Component that gave up on the message, e.g. `dispatcher.intake`.
    pub source: String,
    /// Machine-readable reason code.
    pub reason: String,
    pub message: String,
    pub task_id: Option<String>,
    /// Subject the original message arrived on.
    pub subject: String,
    /// Stream sequence of the original message, when it came from a stream.
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

/// How much of a dead message's payload its dead letter keeps.
pub const DEAD_LETTER_PAYLOAD_LIMIT: usize = 64 * 1024;

impl DeadLetter {
    /// A dead letter from `source` (e.g. `dispatcher.intake`) for `reason`, of a message that
    /// arrived on `subject` with `payload` (kept in base64, cut to
    /// [`DEAD_LETTER_PAYLOAD_LIMIT`]), stamped now. The builder methods below add what is known.
    pub fn new(
        source: impl Into<String>,
        reason: impl Into<String>,
        message: impl Into<String>,
        subject: impl Into<String>,
        payload: &[u8],
    ) -> Self {
        use base64::Engine as _;
        let cut = payload.get(..payload.len().min(DEAD_LETTER_PAYLOAD_LIMIT)).unwrap_or_default();
        Self {
            source: source.into(),
            reason: reason.into(),
            message: message.into(),
            task_id: None,
            subject: subject.into(),
            stream_sequence: None,
            payload_base64: base64::engine::general_purpose::STANDARD.encode(cut),
            payload_len: u64::try_from(payload.len()).unwrap_or(u64::MAX),
            headers: BTreeMap::new(),
            at_ms: crate::time::now_ms(),
            attempts: Vec::new(),
        }
    }

    /// The task the message was about.
    pub fn task(self, task_id: impl Into<String>) -> Self {
        Self { task_id: Some(task_id.into()), ..self }
    }

    /// The message's stream sequence, when it came from a stream.
    pub fn sequence(self, stream_sequence: Option<u64>) -> Self {
        Self { stream_sequence, ..self }
    }

    /// The message's headers (the first value of each).
    pub fn headers(self, headers: BTreeMap<String, String>) -> Self {
        Self { headers, ..self }
    }

    /// Every attempt of a task that failed after retries.
    pub fn attempts(self, attempts: Vec<AttemptRecord>) -> Self {
        Self { attempts, ..self }
    }
}

/// An error answer to a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorReply {
    pub error: ErrorInfo,
}
