//! OpenAI-compatible chat completions (`POST {base}/chat/completions`): OpenAI itself, vLLM,
//! Ollama, llama.cpp's server and TGI. Tolerates local-server quirks: `content` may be `""` or
//! `null` beside tool calls, `arguments` is text that may hold newlines, extra fields are ignored.

use serde_json::{Value, json};

use super::retry::send;
use super::{ChatRequest, ChatResponse, Finish, HttpSettings, ProviderError, ToolCall, Turn};
use flotilla_protocol::Usage;

/// A client for one OpenAI-compatible endpoint.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    settings: HttpSettings,
}

impl Client {
    pub fn new(http: reqwest::Client, settings: HttpSettings) -> Self {
        Self { http, settings }
    }

    /// One chat completion, retried per the policy.
    pub async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let body = request_body(req);
        self.settings.retry.run(|| self.once(&body)).await
    }

    async fn once(&self, body: &Value) -> Result<ChatResponse, ProviderError> {
        let url = format!("{}/chat/completions", self.settings.base_url.trim_end_matches('/'));
        let mut rb = self.http.post(&url).json(body);
        if !self.settings.api_key.is_empty() {
            rb = rb.bearer_auth(self.settings.api_key.expose());
        }
        parse_response(&send(rb, self.settings.timeout).await?)
    }
}

/// The JSON body of a request.
pub fn request_body(req: &ChatRequest) -> Value {
    let mut messages = Vec::with_capacity(req.turns.len() + 1);
    if !req.system.is_empty() {
        messages.push(json!({ "role": "system", "content": req.system }));
    }
    for t in &req.turns {
        messages.push(match t {
            Turn::User(text) => json!({ "role": "user", "content": text }),
            Turn::Assistant { text, tool_calls } if tool_calls.is_empty() => {
                json!({ "role": "assistant", "content": text })
            }
            Turn::Assistant { text, tool_calls } => json!({
                "role": "assistant",
                "content": text,
                "tool_calls": tool_calls.iter().map(|c| json!({
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.name,
                        "arguments": match &c.arguments { Ok(v) => v.to_string(), Err(raw) => raw.clone() },
                    },
                })).collect::<Vec<_>>(),
            }),
            Turn::ToolResult { call_id, content, .. } => {
                json!({ "role": "tool", "tool_call_id": call_id, "content": content })
            }
        });
    }
    let mut body = json!({
        "model": req.model,
        "messages": messages,
        "max_tokens": req.max_tokens,
        "stream": false,
    });
    if !req.tools.is_empty()
        && let Some(obj) = body.as_object_mut()
    {
        obj.insert(
            "tools".into(),
            req.tools
                .iter()
                .map(|t| {
                    json!({
                        "type": "function",
                        "function": { "name": t.name, "description": t.description, "parameters": t.parameters },
                    })
                })
                .collect(),
        );
    }
    body
}

fn malformed(what: &str) -> ProviderError {
    ProviderError::Malformed(what.to_owned())
}

/// Parses a chat-completion response body.
pub fn parse_response(text: &str) -> Result<ChatResponse, ProviderError> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| ProviderError::Malformed(format!("not JSON: {e}")))?;
    let choice = v
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .ok_or_else(|| malformed("no choices in the response"))?;
    let message = choice.get("message").ok_or_else(|| malformed("the choice has no message"))?;
    let content = match message.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(malformed("message content is neither text nor null")),
    };
    let mut tool_calls = Vec::new();
    if let Some(calls) = message.get("tool_calls").filter(|c| !c.is_null()) {
        let calls = calls.as_array().ok_or_else(|| malformed("tool_calls is not a list"))?;
        for (i, c) in calls.iter().enumerate() {
            let f = c.get("function").ok_or_else(|| malformed("a tool call has no function"))?;
            let name =
                f.get("name").and_then(Value::as_str).ok_or_else(|| malformed("a tool call has no name"))?;
            let arguments = match f.get("arguments") {
                Some(Value::String(raw)) => match serde_json::from_str::<Value>(raw) {
                    Ok(v @ Value::Object(_)) => Ok(v),
                    _ if raw.trim().is_empty() => Ok(json!({})),
                    _ => Err(raw.clone()),
                },
                Some(v @ Value::Object(_)) => Ok(v.clone()),
                None | Some(Value::Null) => Ok(json!({})),
                Some(other) => Err(other.to_string()),
            };
            let id = c.get("id").and_then(Value::as_str).map_or_else(|| format!("call_{i}"), str::to_owned);
            tool_calls.push(ToolCall { id, name: name.to_owned(), arguments });
        }
    }
    let finish = match choice.get("finish_reason").and_then(Value::as_str) {
        Some("tool_calls" | "function_call") => Finish::ToolCalls,
        Some("length") => Finish::Length,
        Some("stop") | None => {
            if tool_calls.is_empty() {
                Finish::Stop
            } else {
                Finish::ToolCalls
            }
        }
        Some(_) => Finish::Other,
    };
    let usage = match v.get("usage").filter(|u| !u.is_null()) {
        Some(u) => {
            let n = |k: &str| u.get(k).and_then(Value::as_u64);
            let prompt = n("prompt_tokens").ok_or_else(|| malformed("usage has no prompt_tokens"))?;
            let completion = n("completion_tokens").unwrap_or(0);
            Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
                total_tokens: n("total_tokens").unwrap_or(prompt + completion),
            }
        }
        None => return Err(malformed("the response reports no token usage")),
    };
    Ok(ChatResponse { text: content, tool_calls, usage, finish })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::ToolSpec;

    #[test]
    fn parses_tool_calls_with_local_server_quirks() {
        let body = r#"{"choices":[{"index":0,"finish_reason":"tool_calls","message":{"role":"assistant","content":"",
            "tool_calls":[{"id":"c1","type":"function","function":{"name":"memory_put","arguments":"{\n  \"key\": \"a\",\n  \"value\": 1\n}"}}]}}],
            "usage":{"prompt_tokens":50,"completion_tokens":9,"total_tokens":59},"timings":{"x":1}}"#;
        let r = parse_response(body).unwrap();
        assert_eq!(r.finish, Finish::ToolCalls);
        assert_eq!(r.tool_calls[0].name, "memory_put");
        assert_eq!(r.tool_calls[0].arguments.as_ref().unwrap()["value"], 1);
        assert_eq!(r.usage.total_tokens, 59);
    }

    #[test]
    fn malformed_bodies_are_reported() {
        for body in ["not json", "{}", r#"{"choices":[]}"#, r#"{"choices":[{"message":{"content":"x"}}]}"#] {
            assert!(matches!(parse_response(body), Err(ProviderError::Malformed(_))), "{body}");
        }
    }

    #[test]
    fn builds_requests_with_tools_and_history() {
        let req = ChatRequest {
            model: "m".into(),
            system: "sys".into(),
            turns: vec![
                Turn::User("hi".into()),
                Turn::Assistant {
                    text: String::new(),
                    tool_calls: vec![ToolCall {
                        id: "c1".into(),
                        name: "t".into(),
                        arguments: Ok(json!({"a": 1})),
                    }],
                },
                Turn::ToolResult {
                    call_id: "c1".into(),
                    name: "t".into(),
                    content: "ok".into(),
                    is_error: false,
                },
            ],
            tools: vec![ToolSpec {
                name: "t".into(),
                description: "d".into(),
                parameters: json!({"type": "object"}),
            }],
            max_tokens: 100,
            purpose: "test".into(),
        };
        let b = request_body(&req);
        assert_eq!(b["messages"][0]["role"], "system");
        assert_eq!(b["messages"][2]["tool_calls"][0]["function"]["arguments"], r#"{"a":1}"#);
        assert_eq!(b["messages"][3]["role"], "tool");
        assert_eq!(b["tools"][0]["function"]["name"], "t");
        assert_eq!(b["max_tokens"], 100);
    }
}
