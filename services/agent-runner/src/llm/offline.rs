//! The built-in offline model: deterministic, no network. Its answer and token counts depend only
//! on the request, so tests can assert on them. The task input may carry `_offline` directives:
//! `sleep_ms` (think that long on every call), `fail` (fail every attempt with that text),
//! `fail_attempts` (fail attempts 1 to N, succeed from N + 1), `fail_code` (the error code of those
//! failures: `model_error` by default, or a `provider_*` code such as `provider_refused`), and
//! `tool_calls` (a list of `{"name", "arguments"}` the model calls on its first turn before
//! answering), and `increment` (`{"key", "namespace"}`: add one to a number in shared memory by
//! compare-and-swap, as a model would: `memory_get`, then `memory_put` with the revision read,
//! reading again after a conflict).

use std::time::Duration;

use flotilla_protocol::Usage;
use serde_json::Value;

use super::{ChatRequest, ChatResponse, Finish, ProviderError, ToolCall, Turn};

fn tokens(text_len: usize) -> u64 {
    u64::try_from(text_len.div_ceil(4)).unwrap_or(u64::MAX).max(1)
}

/// The task input, as the first user turn carries it.
fn input(req: &ChatRequest) -> (String, Value) {
    let first = req.turns.iter().find_map(|t| match t {
        Turn::User(text) => Some(text.clone()),
        _ => None,
    });
    let raw = first.unwrap_or_default();
    let parsed = serde_json::from_str::<Value>(&raw).unwrap_or(Value::Null);
    let text = match parsed.get("text") {
        Some(Value::String(s)) => s.clone(),
        _ => raw.clone(),
    };
    (text, parsed.get("_offline").cloned().unwrap_or(Value::Null))
}

/// The failure the directives ask for on this attempt, if any.
fn simulated_failure(directives: &Value, attempt: u32) -> Option<ProviderError> {
    let fail = directives.get("fail").and_then(Value::as_str);
    let fail_attempts = directives.get("fail_attempts").and_then(Value::as_u64);
    let failing = fail.is_some() || fail_attempts.is_some_and(|n| u64::from(attempt) <= n);
    if !failing {
        return None;
    }
    let message =
        fail.map_or_else(|| format!("offline model: simulated failure of attempt {attempt}"), str::to_owned);
    let code = directives.get("fail_code").and_then(Value::as_str).unwrap_or("model_error");
    Some(error_with_code(code, message))
}

/// A provider error whose [`ProviderError::code`] is `code` (`model_error` for unknown codes).
fn error_with_code(code: &str, message: String) -> ProviderError {
    match code {
        "provider_rate_limited" => ProviderError::RateLimited { retry_after: None },
        "provider_server_error" => ProviderError::Server { status: 500, message, retry_after: None },
        "provider_timeout" => ProviderError::Timeout(Duration::ZERO),
        "provider_unreachable" => ProviderError::Transport(message),
        "provider_refused" => ProviderError::Refused { status: 400, message },
        "provider_malformed_response" => ProviderError::Malformed(message),
        "provider_config" => ProviderError::Config(message),
        _ => ProviderError::Failed(message),
    }
}

/// Answers one call.
pub async fn chat(agent: &str, req: &ChatRequest) -> Result<ChatResponse, ProviderError> {
    let (text, directives) = input(req);
    if let Some(ms) = directives.get("sleep_ms").and_then(Value::as_u64) {
        tokio::time::sleep(Duration::from_millis(ms.min(3_600_000))).await;
    }
    if let Some(e) = simulated_failure(&directives, req.attempt) {
        return Err(e);
    }
    let prompt_len = req.system.len()
        + req
            .turns
            .iter()
            .map(|t| match t {
                Turn::User(s) => s.len(),
                Turn::Assistant { text, tool_calls } => text.len() + tool_calls.len() * 16,
                Turn::ToolResult { content, .. } => content.len(),
            })
            .sum::<usize>();
    let results: Vec<String> = req
        .turns
        .iter()
        .filter_map(|t| match t {
            Turn::ToolResult { name, content, .. } => Some(format!("{name} -> {content}")),
            _ => None,
        })
        .collect();
    if let Some(target) = directives.get("increment")
        && let Some(call) = next_increment_step(target, req)
    {
        let completion = tokens(call.name.len() + 16);
        return Ok(ChatResponse {
            text: String::new(),
            tool_calls: vec![call],
            usage: Usage::new(tokens(prompt_len), completion),
            finish: Finish::ToolCalls,
        });
    }
    let planned = directives.get("tool_calls").and_then(Value::as_array).cloned().unwrap_or_default();
    if results.is_empty() && !planned.is_empty() {
        let calls: Vec<ToolCall> = planned
            .iter()
            .enumerate()
            .map(|(i, c)| ToolCall {
                id: format!("offline-{i}"),
                name: c.get("name").and_then(Value::as_str).unwrap_or_default().to_owned(),
                arguments: Ok(c.get("arguments").cloned().unwrap_or_else(|| serde_json::json!({}))),
            })
            .collect();
        let completion = tokens(calls.iter().map(|c| c.name.len() + 16).sum());
        return Ok(ChatResponse {
            text: String::new(),
            tool_calls: calls,
            usage: Usage::new(tokens(prompt_len), completion),
            finish: Finish::ToolCalls,
        });
    }
    let mut shown: String = text.chars().take(200).collect();
    if shown.len() < text.len() {
        shown.push('…');
    }
    let mut answer = format!("[{agent}] {}: {shown}", req.purpose);
    if !results.is_empty() {
        answer.push_str(&format!(" (tools: {})", results.join("; ")));
    }
    let usage = Usage::new(tokens(prompt_len), tokens(answer.len()));
    Ok(ChatResponse { text: answer, tool_calls: vec![], usage, finish: Finish::Stop })
}

/// The next call of a compare-and-swap increment of `target`, or `None` when it is done (stored,
/// or refused other than by a conflict).
fn next_increment_step(target: &Value, req: &ChatRequest) -> Option<ToolCall> {
    let mut args = serde_json::Map::new();
    for field in ["key", "namespace"] {
        if let Some(v) = target.get(field) {
            args.insert(field.to_owned(), v.clone());
        }
    }
    let last = req.turns.iter().rev().find_map(|t| match t {
        Turn::ToolResult { name, content, is_error, .. } => {
            Some((name.as_str(), content.as_str(), *is_error))
        }
        _ => None,
    });
    let n = req.turns.iter().filter(|t| matches!(t, Turn::ToolResult { .. })).count();
    let get = |args: serde_json::Map<String, Value>| ToolCall {
        id: format!("offline-inc-{n}"),
        name: "memory_get".to_owned(),
        arguments: Ok(Value::Object(args)),
    };
    match last {
        None => Some(get(args)),
        Some(("memory_put", content, true)) if content.contains("conflict") => Some(get(args)),
        Some(("memory_get", content, false)) => {
            let read: Value = serde_json::from_str(content).unwrap_or(Value::Null);
            let value = read.get("value").and_then(Value::as_i64).unwrap_or(0);
            args.insert("value".to_owned(), Value::from(value.saturating_add(1)));
            args.insert(
                "expected_revision".to_owned(),
                read.get("revision").cloned().unwrap_or(Value::from(0)),
            );
            Some(ToolCall {
                id: format!("offline-inc-{n}"),
                name: "memory_put".to_owned(),
                arguments: Ok(Value::Object(args)),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(input: &Value) -> ChatRequest {
        ChatRequest {
            model: "offline".into(),
            system: "sys".into(),
            turns: vec![Turn::User(crate::llm::input_text(input))],
            tools: vec![],
            max_tokens: 100,
            purpose: "summarize".into(),
            attempt: 1,
            single_try: false,
        }
    }

    #[tokio::test]
    async fn is_deterministic() {
        let a = chat("w", &req(&json!({"text": "hello"}))).await.unwrap();
        let b = chat("w", &req(&json!({"text": "hello"}))).await.unwrap();
        assert_eq!(a, b);
        assert_eq!(a.text, "[w] summarize: hello");
        assert_eq!(a.usage.total_tokens, a.usage.prompt_tokens + a.usage.completion_tokens);
    }

    #[tokio::test]
    async fn fail_attempts_fails_the_first_attempts_with_the_code_asked_for() {
        let mut r = req(&json!({"text": "t", "_offline": {"fail_attempts": 2}}));
        for attempt in [1, 2] {
            r.attempt = attempt;
            let e = chat("w", &r).await.unwrap_err();
            assert_eq!(e.code(), "model_error");
            assert!(flotilla_protocol::is_retryable(e.code()));
        }
        r.attempt = 3;
        assert_eq!(chat("w", &r).await.unwrap().text, "[w] summarize: t");

        let mut r = req(&json!({"_offline": {"fail_attempts": 1, "fail_code": "provider_refused"}}));
        let e = chat("w", &r).await.unwrap_err();
        assert_eq!(e.code(), "provider_refused");
        assert!(!flotilla_protocol::is_retryable(e.code()));
        r.attempt = 2;
        assert!(chat("w", &r).await.is_ok());

        // `fail` fails every attempt; `fail_code` sets its code too.
        let mut r = req(&json!({"_offline": {"fail": "no", "fail_code": "provider_server_error"}}));
        r.attempt = 9;
        assert_eq!(chat("w", &r).await.unwrap_err().code(), "provider_server_error");
    }

    #[tokio::test]
    async fn directives_fail_and_call_tools() {
        let e = chat("w", &req(&json!({"_offline": {"fail": "boom"}}))).await.unwrap_err();
        assert_eq!(e.to_string(), "boom");
        let input = json!({"text": "t", "_offline": {"tool_calls": [{"name": "memory_get", "arguments": {"key": "k"}}]}});
        let mut r = req(&input);
        let first = chat("w", &r).await.unwrap();
        assert_eq!(first.finish, Finish::ToolCalls);
        assert_eq!(first.tool_calls[0].name, "memory_get");
        r.turns.push(Turn::Assistant { text: String::new(), tool_calls: first.tool_calls });
        r.turns.push(Turn::ToolResult {
            call_id: "offline-0".into(),
            name: "memory_get".into(),
            content: "42".into(),
            is_error: false,
        });
        let second = chat("w", &r).await.unwrap();
        assert_eq!(second.finish, Finish::Stop);
        assert_eq!(second.text, "[w] summarize: t (tools: memory_get -> 42)");
    }
}
