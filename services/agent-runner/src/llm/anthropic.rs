//! The Anthropic Messages API (`POST {base}/v1/messages`): system prompt apart, content blocks,
//! `tool_use` / `tool_result`, `input_tokens` / `output_tokens` usage.

use serde_json::{Value, json};

use super::retry::send;
use super::{ChatRequest, ChatResponse, Finish, HttpSettings, ProviderError, ToolCall, Turn};
use flotilla_protocol::Usage;

/// API version header value.
pub const VERSION: &str = "2023-06-01";

/// A client for the Anthropic Messages API.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    settings: HttpSettings,
}

impl Client {
    pub fn new(http: reqwest::Client, settings: HttpSettings) -> Self {
        Self { http, settings }
    }

    /// One message call, retried per the policy (529 "overloaded" counts as a server error).
    pub async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let body = request_body(req);
        let retry = if req.single_try { self.settings.retry.once() } else { self.settings.retry };
        retry.run(|| self.once(&body)).await.map_err(|e| e.redacted(&self.settings.api_key))
    }

    async fn once(&self, body: &Value) -> Result<ChatResponse, ProviderError> {
        let url = format!("{}/v1/messages", self.settings.base_url.trim_end_matches('/'));
        let rb = self
            .http
            .post(&url)
            .header("x-api-key", self.settings.api_key.expose())
            .header("anthropic-version", VERSION)
            .json(body);
        parse_response(&send(rb, self.settings.timeout).await?)
    }
}

/// The JSON body of a request.
pub fn request_body(req: &ChatRequest) -> Value {
    let mut messages: Vec<Value> = Vec::new();
    for t in &req.turns {
        let (role, block) = match t {
            Turn::User(text) => ("user", vec![json!({ "type": "text", "text": text })]),
            Turn::Assistant { text, tool_calls } => {
                let mut blocks = Vec::new();
                if !text.is_empty() {
                    blocks.push(json!({ "type": "text", "text": text }));
                }
                for c in tool_calls {
                    let input = c.arguments.clone().unwrap_or_else(|_| json!({}));
                    blocks.push(json!({ "type": "tool_use", "id": c.id, "name": c.name, "input": input }));
                }
                ("assistant", blocks)
            }
            Turn::ToolResult { call_id, content, is_error, .. } => (
                "user",
                vec![
                    json!({ "type": "tool_result", "tool_use_id": call_id, "content": content, "is_error": is_error }),
                ],
            ),
        };
        // Consecutive turns of one role are merged: the API wants them alternating.
        match messages.last_mut() {
            Some(last) if last["role"] == role => {
                if let Some(content) = last.get_mut("content").and_then(Value::as_array_mut) {
                    content.extend(block);
                }
            }
            _ => messages.push(json!({ "role": role, "content": block })),
        }
    }
    let mut body = json!({ "model": req.model, "max_tokens": req.max_tokens, "messages": messages });
    if let Some(obj) = body.as_object_mut() {
        if !req.system.is_empty() {
            obj.insert("system".into(), json!(req.system));
        }
        if !req.tools.is_empty() {
            obj.insert(
                "tools".into(),
                req.tools
                    .iter()
                    .map(|t| json!({ "name": t.name, "description": t.description, "input_schema": t.parameters }))
                    .collect(),
            );
        }
    }
    body
}

fn malformed(what: &str) -> ProviderError {
    ProviderError::Malformed(what.to_owned())
}

/// Parses a Messages API response body.
pub fn parse_response(text: &str) -> Result<ChatResponse, ProviderError> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| ProviderError::Malformed(format!("not JSON: {e}")))?;
    let blocks = v.get("content").and_then(Value::as_array).ok_or_else(|| malformed("no content blocks"))?;
    let mut out = String::new();
    let mut tool_calls = Vec::new();
    for b in blocks {
        match b.get("type").and_then(Value::as_str) {
            Some("text") => out.push_str(b.get("text").and_then(Value::as_str).unwrap_or_default()),
            Some("tool_use") => {
                let id =
                    b.get("id").and_then(Value::as_str).ok_or_else(|| malformed("tool_use without id"))?;
                let name = b
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| malformed("tool_use without name"))?;
                let arguments = match b.get("input") {
                    Some(v @ Value::Object(_)) => Ok(v.clone()),
                    other => Err(other.map(Value::to_string).unwrap_or_default()),
                };
                tool_calls.push(ToolCall { id: id.to_owned(), name: name.to_owned(), arguments });
            }
            _ => {}
        }
    }
    let u = v.get("usage").ok_or_else(|| malformed("the response reports no token usage"))?;
    let input = u
        .get("input_tokens")
        .and_then(Value::as_u64)
        .ok_or_else(|| malformed("usage has no input_tokens"))?;
    let output = u.get("output_tokens").and_then(Value::as_u64).unwrap_or(0);
    let finish = match v.get("stop_reason").and_then(Value::as_str) {
        Some("tool_use") => Finish::ToolCalls,
        Some("max_tokens") => Finish::Length,
        Some("end_turn" | "stop_sequence") => Finish::Stop,
        _ => Finish::Other,
    };
    Ok(ChatResponse { text: out, tool_calls, usage: Usage::new(input, output), finish })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tool_use() {
        let body = r#"{"id":"m","type":"message","role":"assistant","stop_reason":"tool_use",
            "content":[{"type":"text","text":"Let me look."},{"type":"tool_use","id":"tu1","name":"memory_get","input":{"key":"k"}}],
            "usage":{"input_tokens":20,"output_tokens":7}}"#;
        let r = parse_response(body).unwrap();
        assert_eq!(r.finish, Finish::ToolCalls);
        assert_eq!(r.text, "Let me look.");
        assert_eq!(r.tool_calls[0].arguments.as_ref().unwrap()["key"], "k");
        assert_eq!(r.usage, Usage::new(20, 7));
    }

    #[test]
    fn merges_tool_results_into_one_user_turn() {
        let req = ChatRequest {
            model: "claude".into(),
            system: "sys".into(),
            turns: vec![
                Turn::User("hi".into()),
                Turn::Assistant {
                    text: String::new(),
                    tool_calls: vec![
                        ToolCall { id: "a".into(), name: "t".into(), arguments: Ok(json!({})) },
                        ToolCall { id: "b".into(), name: "t".into(), arguments: Ok(json!({})) },
                    ],
                },
                Turn::ToolResult {
                    call_id: "a".into(),
                    name: "t".into(),
                    content: "1".into(),
                    is_error: false,
                },
                Turn::ToolResult {
                    call_id: "b".into(),
                    name: "t".into(),
                    content: "2".into(),
                    is_error: false,
                },
            ],
            tools: vec![],
            max_tokens: 10,
            purpose: String::new(),
            attempt: 1,
            single_try: false,
        };
        let b = request_body(&req);
        assert_eq!(b["system"], "sys");
        assert_eq!(b["messages"].as_array().unwrap().len(), 3);
        assert_eq!(b["messages"][2]["content"].as_array().unwrap().len(), 2);
    }
}
