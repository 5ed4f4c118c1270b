//! Transcripts: what each model call of a task's attempt was asked and answered, and what each
//! tool call was given and returned (`<p>.transcripts.<tenant>.<task>.<attempt>.<step>.<kind>`,
//! stream `<P>_TRANSCRIPTS`), recorded by the runner before the step's outcome is acted on, so
//! that a run can be replayed and re-executed without calling the model again. Large texts are
//! cut with a marker ([`truncate`]) and secrets are never recorded ([`redact`]).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Usage;

/// Entry kinds.
pub mod transcript_kind {
    /// A model call: its request and its response.
    pub const MODEL: &str = "model";
    /// A tool call: its arguments and its result.
    pub const TOOL: &str = "tool";
}

/// The longest text kept in a field (bytes); what is cut is replaced by [`TRUNCATED_MARK`]
/// followed by how many bytes were left out.
pub const MAX_FIELD_BYTES: usize = 32 * 1024;
/// Begins what stands in for the cut tail of a text.
pub const TRUNCATED_MARK: &str = "…[truncated ";
/// What stands in for a secret.
pub const REDACTED: &str = "[redacted]";

/// One entry of a task's transcript.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TranscriptEntry {
    pub task_id: String,
    pub tenant: String,
    pub attempt: u32,
    /// The step of the agent loop (from 1): one model call and the tool calls it asked for.
    pub step: u32,
    /// [`transcript_kind::MODEL`] or [`transcript_kind::TOOL`].
    pub kind: String,
    /// Which run of the attempt wrote it (a redelivered attempt runs again under a new id).
    pub run_id: String,
    pub agent_id: String,
    pub template: String,
    pub at_ms: u64,
    pub model: Option<ModelExchange>,
    pub tool: Option<ToolExchange>,
    /// True when a field was cut to [`MAX_FIELD_BYTES`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// One model call: the request as the provider got it (without credentials) and its answer.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ModelExchange {
    pub provider: String,
    pub model: String,
    pub system: String,
    /// The conversation so far: `{"role": "user"|"assistant"|"tool", …}` turns.
    pub messages: Vec<Value>,
    /// Names of the tools offered.
    pub tools: Vec<String>,
    pub max_tokens: u32,
    pub text: String,
    /// `{"id", "name", "arguments"}` of each tool call the model asked for.
    pub tool_calls: Vec<Value>,
    pub usage: Usage,
    /// `stop`, `tool_calls`, `length`.
    pub finish: String,
    pub duration_ms: Option<u64>,
}

/// One tool call: what the model asked and what the tool answered.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ToolExchange {
    /// Position of the call among the step's tool calls (from 0).
    pub index: u32,
    pub call_id: String,
    pub name: String,
    pub arguments: Value,
    /// What the model was given back.
    pub result: String,
    pub is_error: bool,
}

/// Cuts `text` to at most [`MAX_FIELD_BYTES`] (on a character boundary), marking what was left
/// out; true when it cut.
/// A text cut before is left as it is (and counts as cut), so cutting is idempotent: a re-run
/// that feeds recorded texts back records them the same.
pub fn truncate(text: &mut String) -> bool {
    if text.len() <= MAX_FIELD_BYTES {
        return false;
    }
    if let Some(pos) = text.rfind(TRUNCATED_MARK)
        && pos <= MAX_FIELD_BYTES
        && text.ends_with(" bytes]")
        && text.len() - pos <= TRUNCATED_MARK.len() + 32
    {
        return true;
    }
    let mut at = MAX_FIELD_BYTES;
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let left_out = text.len() - at;
    text.truncate(at);
    text.push_str(&format!("{TRUNCATED_MARK}{left_out} bytes]"));
    true
}

/// Cuts every string in `v` as [`truncate`] does; true when any was cut.
pub fn truncate_value(v: &mut Value) -> bool {
    match v {
        Value::String(s) => truncate(s),
        Value::Array(items) => items.iter_mut().fold(false, |cut, i| truncate_value(i) | cut),
        Value::Object(map) => map.values_mut().fold(false, |cut, i| truncate_value(i) | cut),
        _ => false,
    }
}

/// True for an object key whose value is a secret by its name.
fn secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase().replace(['-', '_'], "");
    ["apikey", "secret", "password", "passwd", "token", "authorization", "credential", "privatekey", "seed"]
        .iter()
        .any(|s| k.contains(s))
}

/// True for a text that looks like a credential whatever it is called: a bearer token, an
/// OpenAI- or Anthropic-style API key, an NATS nkey seed, a JWT, a PEM private key.
fn secret_text(s: &str) -> bool {
    let t = s.trim();
    let word = |prefix: &str, min: usize| {
        t.strip_prefix(prefix).is_some_and(|r| r.len() >= min && !r.contains(char::is_whitespace))
    };
    t.starts_with("Bearer ")
        || word("sk-", 16)
        || word("sk_", 16)
        || (t.len() == 58
            && t.starts_with('S')
            && t.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit()))
        || (t.starts_with("eyJ") && t.matches('.').count() == 2 && !t.contains(char::is_whitespace))
        || t.contains("PRIVATE KEY-----")
}

/// Replaces secrets in `v` by [`REDACTED`]: the values of keys named like one (`api_key`,
/// `password`, `token`, `authorization`, …) and strings that look like a credential.
pub fn redact(v: &mut Value) {
    match v {
        Value::String(s) if secret_text(s) => *s = REDACTED.to_owned(),
        Value::Array(items) => items.iter_mut().for_each(redact),
        Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                if secret_key(k) && !val.is_null() {
                    *val = Value::String(REDACTED.to_owned());
                } else {
                    redact(val);
                }
            }
        }
        _ => {}
    }
}

/// [`redact`] for a text: a whole-text credential, or the secrets of a JSON text.
pub fn redact_text(s: &mut String) {
    if secret_text(s) {
        *s = REDACTED.to_owned();
    } else if let Ok(mut v) = serde_json::from_str::<Value>(s)
        && (v.is_object() || v.is_array())
    {
        let before = v.clone();
        redact(&mut v);
        if v != before {
            *s = v.to_string();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;
    use serde_json::json;

    #[test]
    fn secrets_are_redacted_by_name_and_by_shape() {
        let mut v = json!({
            "query": "weather in Oslo",
            "api_key": "abc",
            "headers": { "Authorization": "Bearer xyz", "X-Trace": "1" },
            "nested": [{ "Password": "hunter2" }, "sk-proj-0123456789abcdefghij"],
            "note": "a token of appreciation",
            "count": 3,
        });
        redact(&mut v);
        assert_eq!(v["query"], "weather in Oslo");
        assert_eq!(v["api_key"], REDACTED);
        assert_eq!(v["headers"]["Authorization"], REDACTED);
        assert_eq!(v["headers"]["X-Trace"], "1");
        assert_eq!(v["nested"][0]["Password"], REDACTED);
        assert_eq!(v["nested"][1], REDACTED);
        assert_eq!(v["note"], "a token of appreciation", "prose that mentions a secret stays");
        assert_eq!(v["count"], 3);
        let mut seed = format!("SU{}", "A".repeat(56));
        redact_text(&mut seed);
        assert_eq!(seed, REDACTED);
        let mut text = r#"{"token":"t-1","city":"Oslo"}"#.to_owned();
        redact_text(&mut text);
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), json!({"token": REDACTED, "city": "Oslo"}));
        let mut plain = "sunny, 12°C".to_owned();
        redact_text(&mut plain);
        assert_eq!(plain, "sunny, 12°C");
    }

    #[test]
    fn long_texts_are_cut_on_a_character_boundary_with_a_marker() {
        let mut s = "é".repeat(MAX_FIELD_BYTES);
        assert!(truncate(&mut s));
        let (kept, mark) = s.split_once(TRUNCATED_MARK).unwrap();
        assert!(kept.len() <= MAX_FIELD_BYTES && kept.chars().all(|c| c == 'é'));
        assert_eq!(mark, format!("{} bytes]", 2 * MAX_FIELD_BYTES - kept.len()));
        let mut short = "fine".to_owned();
        assert!(!truncate(&mut short));
        let mut v = json!({ "a": ["x".repeat(MAX_FIELD_BYTES + 1)], "b": 1 });
        assert!(truncate_value(&mut v));
        assert!(v["a"][0].as_str().unwrap().ends_with("…[truncated 1 bytes]"));
        // Cut again, a cut text stays as it is.
        let once = s.clone();
        assert!(truncate(&mut s));
        assert_eq!(s, once);
    }
}
