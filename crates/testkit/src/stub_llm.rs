//! A local OpenAI-compatible (and Anthropic-compatible) HTTP stub for tests: it answers from a
//! script of canned responses, in order, and records every request it received.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Wait this long before answering.
    pub delay: Duration,
}

impl Reply {
    /// HTTP 200 with a JSON body.
    pub fn ok(body: Value) -> Self {
        Self { status: 200, headers: vec![], body: body.to_string(), delay: Duration::ZERO }
    }

    /// Any status with a raw body.
    pub fn raw(status: u16, body: &str) -> Self {
        Self { status, headers: vec![], body: body.to_owned(), delay: Duration::ZERO }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn delayed(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }

    /// An OpenAI chat completion with a final text answer.
    pub fn openai_text(text: &str, prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self::ok(json!({
            "id": "chatcmpl-stub", "object": "chat.completion", "model": "stub",
            "choices": [{ "index": 0, "finish_reason": "stop", "message": { "role": "assistant", "content": text } }],
            "usage": { "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                       "total_tokens": prompt_tokens + completion_tokens }
        }))
    }

    /// An OpenAI chat completion that calls tools: `(name, arguments)` pairs.
    pub fn openai_tools(calls: &[(&str, Value)], prompt_tokens: u64, completion_tokens: u64) -> Self {
        let calls: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(i, (name, args))| {
                json!({ "id": format!("call_{i}"), "type": "function",
                        "function": { "name": name, "arguments": args.to_string() } })
            })
            .collect();
        Self::ok(json!({
            "id": "chatcmpl-stub", "object": "chat.completion", "model": "stub",
            "choices": [{ "index": 0, "finish_reason": "tool_calls",
                          "message": { "role": "assistant", "content": "", "tool_calls": calls } }],
            "usage": { "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                       "total_tokens": prompt_tokens + completion_tokens }
        }))
    }
}

#[derive(Debug, Default)]
struct Inner {
    script: VecDeque<Reply>,
    /// Answer when the script is empty.
    fallback: Option<Reply>,
    requests: Vec<(HeaderMap, Value)>,
}

/// A running stub; stops with the test's runtime.
#[derive(Debug, Clone)]
pub struct StubLlm {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

impl StubLlm {
    /// Starts the stub on a free loopback port with `script`.
    pub async fn start(script: Vec<Reply>) -> Self {
        let inner = Arc::new(Mutex::new(Inner { script: script.into(), ..Default::default() }));
        let app = Router::new()
            .route("/v1/chat/completions", post(answer))
            .route("/v1/messages", post(answer))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind stub");
        let addr = listener.local_addr().expect("stub addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, inner }
    }

    /// Base URL for OpenAI-compatible clients (`…/v1`).
    pub fn openai_base(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Base URL for the Anthropic client.
    pub fn anthropic_base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Appends replies to the script.
    pub fn push(&self, replies: impl IntoIterator<Item = Reply>) {
        self.inner.lock().expect("stub lock").script.extend(replies);
    }

    /// The reply given whenever the script has run out.
    pub fn set_fallback(&self, reply: Reply) {
        self.inner.lock().expect("stub lock").fallback = Some(reply);
    }

    /// Bodies of every request so far.
    pub fn requests(&self) -> Vec<Value> {
        self.inner.lock().expect("stub lock").requests.iter().map(|(_, b)| b.clone()).collect()
    }

    /// Headers of every request so far.
    pub fn request_headers(&self) -> Vec<HeaderMap> {
        self.inner.lock().expect("stub lock").requests.iter().map(|(h, _)| h.clone()).collect()
    }
}

async fn answer(State(inner): State<Arc<Mutex<Inner>>>, headers: HeaderMap, body: Bytes) -> Response {
    let reply = {
        let mut g = inner.lock().expect("stub lock");
        g.requests.push((headers, serde_json::from_slice(&body).unwrap_or(Value::Null)));
        g.script.pop_front().or_else(|| g.fallback.clone())
    };
    let Some(reply) = reply else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "stub script exhausted").into_response();
    };
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut resp =
        (StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), reply.body)
            .into_response();
    resp.headers_mut().insert("content-type", "application/json".parse().expect("header"));
    for (k, v) in reply.headers {
        if let (Ok(k), Ok(v)) = (k.parse::<axum::http::HeaderName>(), v.parse()) {
            resp.headers_mut().insert(k, v);
        }
    }
    resp
}
