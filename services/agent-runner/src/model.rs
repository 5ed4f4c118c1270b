//! The built-in offline model: deterministic, no network. Its answer and token counts depend only
//! on the agent, the capability and the input, so tests can assert on them. An input object may
//! carry `_offline` directives: `sleep_ms` (think for that long) and `fail` (fail with that text).

use std::time::Duration;

use flotilla_protocol::Usage;
use serde_json::{Value, json};

/// Why a model call failed.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model (or a directive) reported a failure; not worth retrying.
    #[error("{0}")]
    Failed(String),
}

/// A model's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub output: Value,
    pub usage: Usage,
}

fn tokens(text_len: usize) -> u64 {
    u64::try_from(text_len.div_ceil(4)).unwrap_or(u64::MAX).max(1)
}

/// Runs the offline model for one task.
pub async fn offline(
    agent: &str,
    system_prompt: &str,
    capability: &str,
    input: &Value,
) -> Result<Answer, ModelError> {
    let directives = input.get("_offline");
    if let Some(ms) = directives.and_then(|d| d.get("sleep_ms")).and_then(Value::as_u64) {
        tokio::time::sleep(Duration::from_millis(ms.min(3_600_000))).await;
    }
    if let Some(reason) = directives.and_then(|d| d.get("fail")).and_then(Value::as_str) {
        return Err(ModelError::Failed(reason.to_owned()));
    }
    let text = match input {
        Value::String(s) => s.clone(),
        Value::Object(m) => match m.get("text") {
            Some(Value::String(s)) => s.clone(),
            _ => input.to_string(),
        },
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let mut shown: String = text.chars().take(200).collect();
    if shown.len() < text.len() {
        shown.push('…');
    }
    let answer = format!("[{agent}] {capability}: {shown}");
    let prompt_len = system_prompt.len() + capability.len() + input.to_string().len();
    let usage = Usage::new(tokens(prompt_len), tokens(answer.len()));
    Ok(Answer { output: json!({ "answer": answer, "model": "offline" }), usage })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn is_deterministic() {
        let a = offline("w", "sys", "summarize", &json!({"text": "hello"})).await.unwrap();
        let b = offline("w", "sys", "summarize", &json!({"text": "hello"})).await.unwrap();
        assert_eq!(a, b);
        assert_eq!(a.output["answer"], "[w] summarize: hello");
        assert_eq!(a.usage.total_tokens, a.usage.prompt_tokens + a.usage.completion_tokens);
    }

    #[tokio::test]
    async fn directives_fail() {
        let e = offline("w", "", "x", &json!({"_offline": {"fail": "boom"}})).await.unwrap_err();
        assert_eq!(e.to_string(), "boom");
    }
}
