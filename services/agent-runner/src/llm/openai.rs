//! OpenAI-compatible chat completions (`POST {base}/chat/completions`): OpenAI itself, vLLM,
//! Ollama, llama.cpp's server and TGI. Tolerates local-server quirks: `content` may be `""` or
//! `null` beside tool calls, `arguments` is text that may hold newlines, extra fields are ignored.
//!
//! A streaming client asks for `"stream": true` with usage in the last chunk and reads the
//! Server-Sent Events as they come: text deltas go to the caller's [`TextSink`] at once, tool-call
//! fragments are joined by `index`. The request timeout bounds the whole call, and a stream that
//! goes quiet for the idle timeout between two chunks fails as stalled. A stream that ends before
//! `[DONE]`, carries a chunk that is not JSON, or never reports usage is a malformed response.
//! Failures are retried as without streaming, but only while no text has reached the sink: the
//! watcher has seen that text already, and a second try would neither continue it nor be sure to
//! repeat it, so from then on a failure is final for the call.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use super::retry::{send, send_for_body, transport};
use super::{ChatRequest, ChatResponse, Finish, HttpSettings, ProviderError, TextSink, ToolCall, Turn, sse};
use flotilla_protocol::Usage;

/// A client for one OpenAI-compatible endpoint.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    settings: HttpSettings,
    /// Stream answers, giving up on a stream silent for this long between two chunks.
    stream_idle_timeout: Option<Duration>,
}

impl Client {
    /// A client that asks for whole answers (`"stream": false`).
    pub fn new(http: reqwest::Client, settings: HttpSettings) -> Self {
        Self { http, settings, stream_idle_timeout: None }
    }

    /// The same client, streaming its answers; a stream that goes quiet for `idle_timeout`
    /// between two chunks fails as [`ProviderError::Stalled`].
    pub fn streaming(mut self, idle_timeout: Duration) -> Self {
        self.stream_idle_timeout = Some(idle_timeout);
        self
    }

    /// True when answers are streamed.
    pub fn streams(&self) -> bool {
        self.stream_idle_timeout.is_some()
    }

    /// One chat completion, retried per the policy.
    pub async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        self.chat_with_sink(req, None).await
    }

    /// One chat completion, retried per the policy while no text has reached `sink`; a streaming
    /// client sends the answer's text there as it arrives.
    pub async fn chat_with_sink(
        &self,
        req: &ChatRequest,
        sink: Option<&TextSink>,
    ) -> Result<ChatResponse, ProviderError> {
        let mut body = request_body(req);
        let retry = if req.single_try { self.settings.retry.once() } else { self.settings.retry };
        let key = &self.settings.api_key;
        let Some(idle) = self.stream_idle_timeout else {
            return retry.run(|| self.once(&body)).await.map_err(|e| e.redacted(key));
        };
        if let Some(obj) = body.as_object_mut() {
            obj.insert("stream".into(), json!(true));
            obj.insert("stream_options".into(), json!({ "include_usage": true }));
        }
        let forwarded = AtomicBool::new(false);
        retry
            .run_while(
                || self.once_streamed(&body, idle, sink, &forwarded),
                || !forwarded.load(Ordering::SeqCst),
            )
            .await
            .map_err(|e| e.redacted(key))
    }

    fn post(&self, body: &Value) -> reqwest::RequestBuilder {
        let url = format!("{}/chat/completions", self.settings.base_url.trim_end_matches('/'));
        let rb = self.http.post(&url).json(body);
        if self.settings.api_key.is_empty() { rb } else { rb.bearer_auth(self.settings.api_key.expose()) }
    }

    async fn once(&self, body: &Value) -> Result<ChatResponse, ProviderError> {
        parse_response(&send(self.post(body), self.settings.timeout).await?)
    }

    async fn once_streamed(
        &self,
        body: &Value,
        idle: Duration,
        sink: Option<&TextSink>,
        forwarded: &AtomicBool,
    ) -> Result<ChatResponse, ProviderError> {
        let timeout = self.settings.timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let rb = self.post(body).header(reqwest::header::ACCEPT, "text/event-stream");
        let mut resp = send_for_body(rb, timeout).await?;
        let json_body = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.trim_start().to_ascii_lowercase().starts_with("application/json"));
        if json_body {
            // The server ignored `"stream": true` and answered in one piece.
            return parse_response(&resp.text().await.map_err(|e| transport(e, timeout))?);
        }
        let mut parser = sse::Parser::new();
        let mut answer = Assembler::default();
        let mut started = false;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            // Before the first chunk the model may still be reading a long prompt: only the
            // request timeout applies. Between chunks, the idle timeout does too.
            let wait = if started { idle.min(left) } else { left };
            let chunk = match tokio::time::timeout(wait, resp.chunk()).await {
                Err(_) if wait < idle || !started => return Err(ProviderError::Timeout(timeout)),
                Err(_) => return Err(ProviderError::Stalled(idle)),
                Ok(Err(e)) => return Err(transport(e, timeout)),
                Ok(Ok(None)) => return Err(malformed("the stream ended before [DONE]")),
                Ok(Ok(Some(bytes))) => bytes,
            };
            started = true;
            let events = parser.feed(&chunk).map_err(|e| ProviderError::Malformed(e.to_string()))?;
            for data in events {
                if data.trim() == "[DONE]" {
                    return answer.finish();
                }
                let delta = answer.push(&data)?;
                if let Some(sink) = sink
                    && !delta.is_empty()
                {
                    forwarded.store(true, Ordering::SeqCst);
                    sink.send(&delta);
                }
            }
        }
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
                Some(Value::String(raw)) => parse_arguments(raw),
                Some(v @ Value::Object(_)) => Ok(v.clone()),
                None | Some(Value::Null) => Ok(json!({})),
                Some(other) => Err(other.to_string()),
            };
            let id = c.get("id").and_then(Value::as_str).map_or_else(|| format!("call_{i}"), str::to_owned);
            tool_calls.push(ToolCall { id, name: name.to_owned(), arguments });
        }
    }
    let finish = finish_of(choice.get("finish_reason").and_then(Value::as_str), !tool_calls.is_empty());
    let usage = match v.get("usage").filter(|u| !u.is_null()) {
        Some(u) => parse_usage(u)?,
        None => return Err(malformed("the response reports no token usage")),
    };
    Ok(ChatResponse { text: content, tool_calls, usage, finish })
}

/// Tool-call arguments as the model wrote them: a JSON object (empty text counts as `{}`), or
/// the raw text when it is not one.
fn parse_arguments(raw: &str) -> Result<Value, String> {
    match serde_json::from_str::<Value>(raw) {
        Ok(v @ Value::Object(_)) => Ok(v),
        _ if raw.trim().is_empty() => Ok(json!({})),
        _ => Err(raw.to_owned()),
    }
}

fn finish_of(reason: Option<&str>, has_tool_calls: bool) -> Finish {
    match reason {
        Some("tool_calls" | "function_call") => Finish::ToolCalls,
        Some("length") => Finish::Length,
        Some("stop") | None if has_tool_calls => Finish::ToolCalls,
        Some("stop") | None => Finish::Stop,
        Some(_) => Finish::Other,
    }
}

fn parse_usage(u: &Value) -> Result<Usage, ProviderError> {
    let n = |k: &str| u.get(k).and_then(Value::as_u64);
    let prompt = n("prompt_tokens").ok_or_else(|| malformed("usage has no prompt_tokens"))?;
    let completion = n("completion_tokens").unwrap_or(0);
    Ok(Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: n("total_tokens").unwrap_or(prompt.saturating_add(completion)),
    })
}

/// A tool call being streamed.
#[derive(Debug, Default)]
struct PartialCall {
    id: String,
    name: String,
    arguments: String,
}

/// The answer of a stream, assembled chunk by chunk.
#[derive(Debug, Default)]
struct Assembler {
    text: String,
    /// By the `index` the chunks give each call.
    calls: BTreeMap<u64, PartialCall>,
    finish_reason: Option<String>,
    usage: Option<Usage>,
}

impl Assembler {
    /// Takes in one chunk (the data of one event); returns the text it adds.
    fn push(&mut self, data: &str) -> Result<String, ProviderError> {
        let v: Value = serde_json::from_str(data)
            .map_err(|e| ProviderError::Malformed(format!("a stream chunk is not JSON: {e}")))?;
        if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
            let message =
                e.get("message").and_then(Value::as_str).map_or_else(|| e.to_string(), str::to_owned);
            return Err(ProviderError::Failed(format!(
                "the provider reported an error mid-stream: {message}"
            )));
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(parse_usage(u)?);
        }
        let choices = match v.get("choices") {
            None | Some(Value::Null) => return Ok(String::new()),
            Some(Value::Array(c)) => c,
            Some(_) => return Err(malformed("choices of a stream chunk is not a list")),
        };
        let mut added = String::new();
        // Only the first choice is asked for (no `n`); others are ignored.
        for choice in choices.iter().filter(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0) {
            if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                self.finish_reason = Some(reason.to_owned());
            }
            let Some(delta) = choice.get("delta").filter(|d| !d.is_null()) else { continue };
            match delta.get("content") {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) => added.push_str(s),
                Some(_) => return Err(malformed("delta content is neither text nor null")),
            }
            let Some(calls) = delta.get("tool_calls").filter(|c| !c.is_null()) else { continue };
            let calls = calls.as_array().ok_or_else(|| malformed("delta tool_calls is not a list"))?;
            for (pos, c) in calls.iter().enumerate() {
                let index = c
                    .get("index")
                    .and_then(Value::as_u64)
                    .unwrap_or_else(|| u64::try_from(pos).unwrap_or(u64::MAX));
                let call = self.calls.entry(index).or_default();
                // Ids come whole, once; a server repeating one on every fragment is tolerated.
                if let Some(id) = c.get("id").and_then(Value::as_str)
                    && call.id.is_empty()
                {
                    call.id = id.to_owned();
                }
                let Some(f) = c.get("function").filter(|f| !f.is_null()) else { continue };
                if let Some(name) = f.get("name").and_then(Value::as_str) {
                    call.name.push_str(name);
                }
                match f.get("arguments") {
                    None | Some(Value::Null) => {}
                    Some(Value::String(s)) => call.arguments.push_str(s),
                    Some(v @ Value::Object(_)) => call.arguments.push_str(&v.to_string()),
                    Some(_) => return Err(malformed("tool-call arguments are neither text nor an object")),
                }
            }
        }
        self.text.push_str(&added);
        Ok(added)
    }

    /// The whole answer, once `[DONE]` arrived.
    fn finish(self) -> Result<ChatResponse, ProviderError> {
        let usage = self.usage.ok_or_else(|| {
            malformed(
                "the stream reported no token usage (does the server support stream_options.include_usage?)",
            )
        })?;
        let mut tool_calls = Vec::with_capacity(self.calls.len());
        for (i, c) in self.calls {
            if c.name.is_empty() {
                return Err(malformed("a streamed tool call has no name"));
            }
            let id = if c.id.is_empty() { format!("call_{i}") } else { c.id };
            tool_calls.push(ToolCall { id, name: c.name, arguments: parse_arguments(&c.arguments) });
        }
        let finish = finish_of(self.finish_reason.as_deref(), !tool_calls.is_empty());
        Ok(ChatResponse { text: self.text, tool_calls, usage, finish })
    }
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
    fn assembles_streamed_text_and_tool_calls() {
        let mut a = Assembler::default();
        let chunks = [
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"Let me "}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"look."}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c1","type":"function","function":{"name":"memory_get","arguments":""}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\n  \"ke"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"c2","function":{"name":"memory_","arguments":"{}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"name":"list"}},{"index":0,"function":{"arguments":"y\": \"k\"\n}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}],"usage":null}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":20,"completion_tokens":9,"total_tokens":29}}"#,
        ];
        let added: Vec<String> = chunks.iter().map(|c| a.push(c).unwrap()).collect();
        assert_eq!(added.concat(), "Let me look.");
        let r = a.finish().unwrap();
        assert_eq!(r.text, "Let me look.");
        assert_eq!(r.finish, Finish::ToolCalls);
        assert_eq!(r.usage, Usage::new(20, 9));
        assert_eq!(r.tool_calls.len(), 2);
        assert_eq!(r.tool_calls[0].id, "c1");
        assert_eq!(r.tool_calls[0].arguments, Ok(json!({"key": "k"})));
        assert_eq!(r.tool_calls[1].name, "memory_list");
        assert_eq!(r.tool_calls[1].arguments, Ok(json!({})));
    }

    #[test]
    fn bad_streams_are_malformed() {
        let mut a = Assembler::default();
        a.push(r#"{"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}"#).unwrap();
        assert!(matches!(a.finish(), Err(ProviderError::Malformed(_))), "no usage");
        assert!(matches!(Assembler::default().push("{\"choices\": ["), Err(ProviderError::Malformed(_))));
        let e = Assembler::default().push(r#"{"error":{"message":"context too long"}}"#).unwrap_err();
        assert!(matches!(e, ProviderError::Failed(_)), "{e:?}");
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
            attempt: 1,
            single_try: false,
        };
        let b = request_body(&req);
        assert_eq!(b["messages"][0]["role"], "system");
        assert_eq!(b["messages"][2]["tool_calls"][0]["function"]["arguments"], r#"{"a":1}"#);
        assert_eq!(b["messages"][3]["role"], "tool");
        assert_eq!(b["tools"][0]["function"]["name"], "t");
        assert_eq!(b["max_tokens"], 100);
    }
}
