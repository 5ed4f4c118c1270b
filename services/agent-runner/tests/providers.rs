//! The HTTP providers against a local stub server: 429 with `Retry-After`, 500, a timeout, and
//! malformed JSON are each retried or fail with a clear reason, and never hang.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use flotilla_agent_runner::llm::{
    ChatRequest, Finish, HttpSettings, ProviderError, RetryPolicy, Secret, ToolSpec, Turn, anthropic, openai,
};
use flotilla_testkit::stub_llm::{Reply, StubLlm};
use serde_json::json;

fn settings(base: String, timeout: Duration, attempts: u32) -> HttpSettings {
    HttpSettings {
        base_url: base,
        api_key: Secret::new("sk-test-key"),
        timeout,
        retry: RetryPolicy {
            max_attempts: attempts,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(5),
        },
    }
}

fn request() -> ChatRequest {
    ChatRequest {
        model: "stub-model".into(),
        system: "You are terse.".into(),
        turns: vec![Turn::User("hello".into())],
        tools: vec![ToolSpec {
            name: "memory_get".into(),
            description: "read".into(),
            parameters: json!({"type": "object", "properties": {"key": {"type": "string"}}}),
        }],
        max_tokens: 64,
        purpose: "test".into(),
    }
}

fn openai(stub: &StubLlm, timeout: Duration, attempts: u32) -> openai::Client {
    openai::Client::new(
        flotilla_agent_runner::llm::http_client().unwrap(),
        settings(stub.openai_base(), timeout, attempts),
    )
}

#[tokio::test]
async fn rate_limit_honours_retry_after_then_succeeds() {
    let stub = StubLlm::start(vec![
        Reply::raw(429, r#"{"error":{"message":"slow down"}}"#).header("retry-after", "1"),
        Reply::openai_text("hi there", 12, 3),
    ])
    .await;
    let t0 = Instant::now();
    let r = openai(&stub, Duration::from_secs(5), 3).chat(&request()).await.unwrap();
    assert!(t0.elapsed() >= Duration::from_secs(1), "waited for Retry-After");
    assert_eq!(r.text, "hi there");
    assert_eq!(r.usage.total_tokens, 15);
    assert_eq!(stub.requests().len(), 2);
    let body = &stub.requests()[0];
    assert_eq!(body["model"], "stub-model");
    assert_eq!(body["max_tokens"], 64);
    assert_eq!(body["tools"][0]["function"]["name"], "memory_get");
    let auth = stub.request_headers()[0].get("authorization").unwrap().to_str().unwrap().to_owned();
    assert_eq!(auth, "Bearer sk-test-key");
}

#[tokio::test]
async fn server_errors_are_retried_then_reported() {
    let stub = StubLlm::start(vec![Reply::raw(500, "oops"), Reply::openai_text("fine", 1, 1)]).await;
    assert_eq!(openai(&stub, Duration::from_secs(5), 3).chat(&request()).await.unwrap().text, "fine");

    let stub = StubLlm::start(vec![]).await;
    stub.set_fallback(Reply::raw(503, r#"{"error":{"message":"overloaded"}}"#));
    let e = openai(&stub, Duration::from_secs(5), 3).chat(&request()).await.unwrap_err();
    assert!(matches!(e, ProviderError::Server { status: 503, .. }), "{e:?}");
    assert_eq!(e.code(), "provider_server_error");
    assert!(e.to_string().contains("overloaded"));
    assert_eq!(stub.requests().len(), 3, "gave up after max_attempts");
}

#[tokio::test]
async fn a_hung_provider_times_out_instead_of_hanging() {
    let stub = StubLlm::start(vec![]).await;
    stub.set_fallback(Reply::openai_text("too late", 1, 1).delayed(Duration::from_secs(30)));
    let t0 = Instant::now();
    let e = openai(&stub, Duration::from_millis(300), 2).chat(&request()).await.unwrap_err();
    assert!(matches!(e, ProviderError::Timeout(_)), "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(stub.requests().len(), 2);
}

#[tokio::test]
async fn malformed_json_fails_at_once_with_a_reason() {
    let stub = StubLlm::start(vec![Reply::raw(200, "{\"choices\": [ oops")]).await;
    let e = openai(&stub, Duration::from_secs(5), 3).chat(&request()).await.unwrap_err();
    assert!(matches!(e, ProviderError::Malformed(_)), "{e:?}");
    assert_eq!(e.code(), "provider_malformed_response");
    assert_eq!(stub.requests().len(), 1, "a malformed answer is not retried");

    let stub = StubLlm::start(vec![Reply::raw(400, r#"{"error":{"message":"bad model"}}"#)]).await;
    let e = openai(&stub, Duration::from_secs(5), 3).chat(&request()).await.unwrap_err();
    assert!(matches!(e, ProviderError::Refused { status: 400, .. }));
    assert!(e.to_string().contains("bad model"));
    assert_eq!(stub.requests().len(), 1);
}

#[tokio::test]
async fn openai_tool_calls_round_trip() {
    let stub = StubLlm::start(vec![Reply::openai_tools(&[("memory_get", json!({"key": "k"}))], 30, 8)]).await;
    let r = openai(&stub, Duration::from_secs(5), 1).chat(&request()).await.unwrap();
    assert_eq!(r.finish, Finish::ToolCalls);
    assert_eq!(r.tool_calls[0].name, "memory_get");
    assert_eq!(r.tool_calls[0].arguments.as_ref().unwrap()["key"], "k");
}

#[tokio::test]
async fn anthropic_messages() {
    let stub = StubLlm::start(vec![
        Reply::raw(529, r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#),
        Reply::ok(json!({
            "id": "msg_1", "type": "message", "role": "assistant", "stop_reason": "end_turn",
            "content": [{"type": "text", "text": "Bonjour"}],
            "usage": {"input_tokens": 11, "output_tokens": 2}
        })),
    ])
    .await;
    let c = anthropic::Client::new(
        flotilla_agent_runner::llm::http_client().unwrap(),
        settings(stub.anthropic_base(), Duration::from_secs(5), 3),
    );
    let r = c.chat(&request()).await.unwrap();
    assert_eq!(r.text, "Bonjour");
    assert_eq!(r.usage.total_tokens, 13);
    let h = &stub.request_headers()[1];
    assert_eq!(h.get("x-api-key").unwrap(), "sk-test-key");
    assert_eq!(h.get("anthropic-version").unwrap(), anthropic::VERSION);
    assert_eq!(stub.requests()[1]["system"], "You are terse.");
    assert_eq!(stub.requests()[1]["tools"][0]["input_schema"]["type"], "object");
}
