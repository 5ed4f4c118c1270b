//! A local OpenAI-compatible (and Anthropic-compatible) HTTP stub for tests: it answers from a
//! script of canned responses, in order, and records every request it received. A reply is a
//! whole body or a stream of Server-Sent Events, optionally paced, cut short, stalled or broken
//! off.

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

/// How a streamed reply ends after its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ending {
    /// The body ends normally (the events themselves decide whether `[DONE]` was among them).
    #[default]
    Close,
    /// The connection stays open and nothing more is sent.
    Stall,
    /// The connection breaks off mid-body.
    Abort,
}

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Wait this long before answering.
    pub delay: Duration,
    /// Server-Sent Events sent instead of `body` (`text/event-stream`): the data of each event.
    pub events: Option<Vec<String>>,
    /// Pause before each event.
    pub event_delay: Duration,
    /// What happens after the last event.
    pub ending: Ending,
}

impl Reply {
    /// HTTP 200 with a JSON body.
    pub fn ok(body: Value) -> Self {
        Self::raw(200, &body.to_string())
    }

    /// Any status with a raw body.
    pub fn raw(status: u16, body: &str) -> Self {
        Self {
            status,
            headers: vec![],
            body: body.to_owned(),
            delay: Duration::ZERO,
            events: None,
            event_delay: Duration::ZERO,
            ending: Ending::Close,
        }
    }

    /// HTTP 200 streaming these events (the data of each; nothing is added, not even `[DONE]`).
    pub fn sse<S: Into<String>>(events: impl IntoIterator<Item = S>) -> Self {
        let mut r = Self::raw(200, "");
        r.events = Some(events.into_iter().map(Into::into).collect());
        r
    }

    /// A streamed OpenAI chat completion writing `chunks` of text, then `finish_reason: stop`, a
    /// usage chunk and `[DONE]`.
    pub fn openai_stream_text(chunks: &[&str], prompt_tokens: u64, completion_tokens: u64) -> Self {
        let mut events = vec![chunk(json!({ "role": "assistant", "content": "" }), None)];
        events.extend(chunks.iter().map(|c| chunk(json!({ "content": c }), None)));
        events.push(chunk(json!({}), Some("stop")));
        Self::sse(finish_stream(events, prompt_tokens, completion_tokens))
    }

    /// A streamed OpenAI chat completion calling tools, `(name, arguments)` pairs: `content: ""`,
    /// then each call's id and name, then its arguments (pretty-printed, so with newlines) in
    /// `pieces` fragments, then `finish_reason: tool_calls`, a usage chunk and `[DONE]`.
    pub fn openai_stream_tools(
        calls: &[(&str, Value)],
        pieces: usize,
        prompt_tokens: u64,
        completion_tokens: u64,
    ) -> Self {
        let mut events = vec![chunk(json!({ "role": "assistant", "content": "" }), None)];
        for (i, (name, args)) in calls.iter().enumerate() {
            let call = json!({ "index": i, "id": format!("call_{i}"), "type": "function",
                               "function": { "name": name, "arguments": "" } });
            events.push(chunk(json!({ "tool_calls": [call] }), None));
            let text: Vec<char> = serde_json::to_string_pretty(args).expect("arguments").chars().collect();
            for piece in text.chunks(text.len().div_ceil(pieces.max(1)).max(1)) {
                let piece: String = piece.iter().collect();
                let frag = json!({ "index": i, "function": { "arguments": piece } });
                events.push(chunk(json!({ "tool_calls": [frag] }), None));
            }
        }
        events.push(chunk(json!({}), Some("tool_calls")));
        Self::sse(finish_stream(events, prompt_tokens, completion_tokens))
    }

    /// Pauses `d` before each event of a streamed reply.
    pub fn paced(mut self, d: Duration) -> Self {
        self.event_delay = d;
        self
    }

    /// Keeps only the first `n` events of a streamed reply, then ends as `ending` says.
    pub fn cut_after(mut self, n: usize, ending: Ending) -> Self {
        if let Some(events) = &mut self.events {
            events.truncate(n);
        }
        self.ending = ending;
        self
    }

    /// Drops the usage chunk of a streamed reply (as a server ignoring `include_usage` would).
    pub fn without_usage(mut self) -> Self {
        if let Some(events) = &mut self.events {
            events.retain(|e| !e.contains("\"usage\""));
        }
        self
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

/// The data of one `chat.completion.chunk` with one choice.
fn chunk(delta: Value, finish_reason: Option<&str>) -> String {
    json!({
        "id": "chatcmpl-stub", "object": "chat.completion.chunk", "model": "stub",
        "choices": [{ "index": 0, "delta": delta, "finish_reason": finish_reason }]
    })
    .to_string()
}

/// Appends the usage chunk (`choices: []`) and `[DONE]`.
fn finish_stream(mut events: Vec<String>, prompt_tokens: u64, completion_tokens: u64) -> Vec<String> {
    events.push(
        json!({
            "id": "chatcmpl-stub", "object": "chat.completion.chunk", "model": "stub", "choices": [],
            "usage": { "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                       "total_tokens": prompt_tokens + completion_tokens }
        })
        .to_string(),
    );
    events.push("[DONE]".to_owned());
    events
}

/// The body of a streamed reply.
fn sse_body(events: Vec<String>, pause: Duration, ending: Ending) -> axum::body::Body {
    let stream =
        futures::stream::unfold((VecDeque::from(events), false), move |(mut queue, over)| async move {
            if over {
                return None;
            }
            match queue.pop_front() {
                Some(data) => {
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                    Some((Ok(Bytes::from(format!("data: {data}\n\n"))), (queue, false)))
                }
                None => match ending {
                    Ending::Close => None,
                    Ending::Stall => {
                        std::future::pending::<()>().await;
                        None
                    }
                    Ending::Abort => {
                        // Let what was sent reach the client first: the server drops unsent data.
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        Some((Err(std::io::Error::other("the stub broke the stream off")), (queue, true)))
                    }
                },
            }
        });
    axum::body::Body::from_stream(stream)
}

#[derive(Debug, Default)]
struct Inner {
    script: VecDeque<Reply>,
    /// Answer when the script is empty.
    fallback: Option<Reply>,
    requests: Vec<(HeaderMap, Value)>,
    /// When each request arrived.
    arrivals: Vec<std::time::Instant>,
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

    /// When every request so far arrived, in order.
    pub fn arrivals(&self) -> Vec<std::time::Instant> {
        self.inner.lock().expect("stub lock").arrivals.clone()
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
        g.arrivals.push(std::time::Instant::now());
        g.script.pop_front().or_else(|| g.fallback.clone())
    };
    let Some(reply) = reply else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "stub script exhausted").into_response();
    };
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = match reply.events {
        Some(events) => {
            let mut r = (status, sse_body(events, reply.event_delay, reply.ending)).into_response();
            r.headers_mut().insert("content-type", "text/event-stream".parse().expect("header"));
            r
        }
        None => {
            let mut r = (status, reply.body).into_response();
            r.headers_mut().insert("content-type", "application/json".parse().expect("header"));
            r
        }
    };
    for (k, v) in reply.headers {
        if let (Ok(k), Ok(v)) = (k.parse::<axum::http::HeaderName>(), v.parse()) {
            resp.headers_mut().insert(k, v);
        }
    }
    resp
}
