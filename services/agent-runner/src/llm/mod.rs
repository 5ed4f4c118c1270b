//! Language-model providers behind one interface: OpenAI-compatible chat completions (OpenAI,
//! vLLM, Ollama, llama.cpp's server, TGI), the Anthropic Messages API, and the built-in offline
//! model. HTTP calls time out, retry 429 and 5xx with backoff (honouring `Retry-After`), and turn
//! a malformed response into a clear error. The OpenAI-compatible provider can stream: it hands
//! the answer's text to a [`TextSink`] piece by piece while the model writes it.
//!
//! The clients are written here on reqwest rather than taken from a crate: the two wire shapes
//! are small, and we need exact control of retries, `Retry-After`, `max_tokens` caps and the
//! quirks of local servers (empty `content` next to tool calls, arguments as text with newlines).

pub mod anthropic;
pub mod offline;
pub mod openai;
mod retry;
mod sse;

use std::fmt;
use std::time::Duration;

use flotilla_protocol::Usage;
use serde_json::Value;

pub use retry::RetryPolicy;

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments object.
    pub parameters: Value,
}

impl ToolSpec {
    /// A tool whose arguments are an object of `properties` (a JSON Schema each, by name), of
    /// which `required` must be given, and no other keys.
    pub fn object(name: &str, description: &str, properties: Value, required: &[&str]) -> Self {
        Self {
            name: name.to_owned(),
            description: description.to_owned(),
            parameters: serde_json::json!({
                "type": "object",
                "properties": properties,
                "required": required,
                "additionalProperties": false
            }),
        }
    }
}

/// A tool call the model made.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments, or the text that failed to parse as a JSON object.
    pub arguments: Result<Value, String>,
}

/// One turn of the conversation, in a provider-neutral form.
#[derive(Debug, Clone, PartialEq)]
pub enum Turn {
    User(String),
    Assistant { text: String, tool_calls: Vec<ToolCall> },
    ToolResult { call_id: String, name: String, content: String, is_error: bool },
}

/// One model call.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    pub system: String,
    pub turns: Vec<Turn>,
    pub tools: Vec<ToolSpec>,
    /// Upper bound on completion tokens.
    pub max_tokens: u32,
    /// What the call is for (the task's capability); only the offline model uses it.
    pub purpose: String,
    /// The task's attempt this call belongs to (from 1; 0 outside a task); only the offline model
    /// uses it, for its `fail_attempts` directive.
    pub attempt: u32,
    /// Make one try only, no retries: the caller retries itself (a call under a budget
    /// reservation must end within its lease, and a 429 is fed to the shared rate limiter).
    pub single_try: bool,
}

/// Why the model stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A final answer.
    Stop,
    /// It wants tool results.
    ToolCalls,
    /// It ran out of `max_tokens`.
    Length,
    Other,
}

/// The model's answer to one call.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatResponse {
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    pub usage: Usage,
    pub finish: Finish,
}

/// Why a model call failed. [`ProviderError::is_retryable`] tells the retry loop what to do.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("rate limited by the provider (HTTP 429){}", .retry_after.map(|d| format!(", retry after {d:?}")).unwrap_or_default())]
    RateLimited { retry_after: Option<Duration> },
    #[error("provider server error (HTTP {status}): {message}")]
    Server { status: u16, message: String, retry_after: Option<Duration> },
    #[error("the provider did not answer within {0:?}")]
    Timeout(Duration),
    /// A streamed answer stopped arriving: nothing for this long between two chunks.
    #[error("the provider's stream stalled: nothing arrived for {0:?}")]
    Stalled(Duration),
    #[error("could not reach the provider: {0}")]
    Transport(String),
    #[error("the provider refused the request (HTTP {status}): {message}")]
    Refused { status: u16, message: String },
    #[error("malformed response from the provider: {0}")]
    Malformed(String),
    #[error("{0}")]
    Failed(String),
    #[error("provider configuration: {0}")]
    Config(String),
}

impl ProviderError {
    /// True for failures that another try may fix.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::RateLimited { .. }
                | Self::Server { .. }
                | Self::Timeout(_)
                | Self::Stalled(_)
                | Self::Transport(_)
        )
    }

    /// The error with every occurrence of `secret` in its text replaced: a provider may quote
    /// the key it was sent in its error body, and that text ends up in task events.
    #[must_use]
    pub fn redacted(self, secret: &Secret) -> Self {
        let r = |m: String| secret.redact(&m);
        match self {
            Self::Server { status, message, retry_after } => {
                Self::Server { status, message: r(message), retry_after }
            }
            Self::Refused { status, message } => Self::Refused { status, message: r(message) },
            Self::Transport(m) => Self::Transport(r(m)),
            Self::Malformed(m) => Self::Malformed(r(m)),
            Self::Failed(m) => Self::Failed(r(m)),
            Self::Config(m) => Self::Config(r(m)),
            other => other,
        }
    }

    /// A stable, snake_case code for task errors.
    pub fn code(&self) -> &'static str {
        match self {
            Self::RateLimited { .. } => "provider_rate_limited",
            Self::Server { .. } => "provider_server_error",
            Self::Timeout(_) | Self::Stalled(_) => "provider_timeout",
            Self::Transport(_) => "provider_unreachable",
            Self::Refused { .. } => "provider_refused",
            Self::Malformed(_) => "provider_malformed_response",
            Self::Failed(_) => "model_error",
            Self::Config(_) => "provider_config",
        }
    }
}

/// An API key: never shown by `Debug` or `Display`.
#[derive(Clone, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The key itself, for the request header only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `text` with the key replaced by `<redacted>` wherever it occurs.
    pub fn redact(&self, text: &str) -> String {
        if self.0.is_empty() { text.to_owned() } else { text.replace(&self.0, "<redacted>") }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "Secret(<empty>)" } else { "Secret(<redacted>)" })
    }
}

/// Connection settings of an HTTP provider.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Base URL, e.g. `https://api.openai.com/v1` or `http://127.0.0.1:8080/v1`.
    pub base_url: String,
    pub api_key: Secret,
    /// Limit on one HTTP request.
    pub timeout: Duration,
    pub retry: RetryPolicy,
}

/// Where a streaming provider sends the text of an answer while the model writes it: each piece
/// once, in order. Concatenated, the pieces are the answer's text. Sending never blocks the
/// provider (the channel is unbounded; what it holds is bounded by the call's `max_tokens`), and
/// a receiver that has gone away is ignored.
#[derive(Debug, Clone)]
pub struct TextSink {
    tx: tokio::sync::mpsc::UnboundedSender<String>,
}

impl TextSink {
    /// A sink and the receiving end of its pieces.
    pub fn channel() -> (Self, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (Self { tx }, rx)
    }

    /// Passes on a piece of text (empty pieces are dropped).
    pub fn send(&self, piece: &str) {
        if !piece.is_empty() {
            let _ = self.tx.send(piece.to_owned());
        }
    }
}

/// A configured model provider.
#[derive(Debug, Clone)]
pub enum Provider {
    /// The built-in deterministic model.
    Offline {
        agent: String,
    },
    OpenAi(openai::Client),
    Anthropic(anthropic::Client),
}

impl Provider {
    /// Provider name as written in fleet files.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Offline { .. } => "offline",
            Self::OpenAi(_) => "openai",
            Self::Anthropic(_) => "anthropic",
        }
    }

    /// True when calls stream, i.e. a sink given to [`Provider::chat_with_sink`] receives text.
    pub fn streams(&self) -> bool {
        match self {
            Self::OpenAi(c) => c.streams(),
            Self::Offline { .. } | Self::Anthropic(_) => false,
        }
    }

    /// One model call, with the provider's retries.
    pub async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        self.chat_with_sink(req, None).await
    }

    /// One model call, with the provider's retries; a streaming provider sends the answer's text
    /// to `sink` as it arrives. Providers that do not stream never use the sink.
    pub async fn chat_with_sink(
        &self,
        req: &ChatRequest,
        sink: Option<&TextSink>,
    ) -> Result<ChatResponse, ProviderError> {
        match self {
            Self::Offline { agent } => offline::chat(agent, req).await,
            Self::OpenAi(c) => c.chat_with_sink(req, sink).await,
            Self::Anthropic(c) => c.chat(req).await,
        }
    }
}

/// The HTTP client every provider of a runner shares (TLS by rustls with the ring provider, the
/// same one the NATS client uses).
pub fn http_client() -> Result<reqwest::Client, ProviderError> {
    // Fails only when a provider is already installed, which is just as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .user_agent(concat!("flotilla/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ProviderError::Config(format!("failed to build the HTTP client: {e}")))
}

/// Renders a task input as the user's message.
pub fn input_text(input: &Value) -> String {
    match input {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Object(m) => match m.get("text") {
            Some(Value::String(s)) if m.len() == 1 => s.clone(),
            _ => input.to_string(),
        },
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_stay_secret() {
        let s = Secret::new("sk-very-secret");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        let h = HttpSettings {
            base_url: "http://x".into(),
            api_key: s,
            timeout: Duration::from_secs(1),
            retry: RetryPolicy::default(),
        };
        assert!(!format!("{h:?}").contains("very-secret"));
    }
}
