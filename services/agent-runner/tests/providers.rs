//! The HTTP providers against a local stub server: 429 with `Retry-After`, 500, a timeout, and
//! malformed JSON are each retried or fail with a clear reason, and never hang. Streamed answers
//! are assembled (text, tool calls in fragments, usage) while their text reaches the sink, and a
//! stream without usage, with a bad chunk, cut off, broken off or stalled fails clearly.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use flotilla_agent_runner::llm::{
    ChatRequest, ChatResponse, Finish, HttpSettings, ProviderError, RetryPolicy, Secret, TextSink, ToolSpec,
    Turn, anthropic, openai,
};
use flotilla_testkit::stub_llm::{Ending, Reply, StubLlm};
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
        attempt: 1,
        single_try: false,
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

fn streaming(stub: &StubLlm, timeout: Duration, attempts: u32, idle: Duration) -> openai::Client {
    openai(stub, timeout, attempts).streaming(idle)
}

/// One streamed call; returns its outcome and the pieces of text the sink received.
async fn streamed_call(client: &openai::Client) -> (Result<ChatResponse, ProviderError>, Vec<String>) {
    let (sink, mut rx) = TextSink::channel();
    let r = client.chat_with_sink(&request(), Some(&sink)).await;
    drop(sink);
    let mut pieces = Vec::new();
    while let Some(p) = rx.recv().await {
        pieces.push(p);
    }
    (r, pieces)
}

#[tokio::test]
async fn streamed_text_is_assembled_and_passed_on_as_it_arrives() {
    let chunks = ["Once ", "upon ", "a time,\n", "the end."];
    let stub = StubLlm::start(vec![Reply::openai_stream_text(&chunks, 21, 7)]).await;
    let client = streaming(&stub, Duration::from_secs(5), 3, Duration::from_secs(5));
    assert!(client.streams());
    let (r, pieces) = streamed_call(&client).await;
    let r = r.unwrap();
    assert_eq!(r.text, chunks.concat());
    assert_eq!(pieces, chunks, "each delta once, in order");
    assert_eq!(r.finish, Finish::Stop);
    assert!(r.tool_calls.is_empty());
    assert_eq!(r.usage.prompt_tokens, 21);
    assert_eq!(r.usage.completion_tokens, 7);
    assert_eq!(r.usage.total_tokens, 28);
    let body = &stub.requests()[0];
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert_eq!(body["max_tokens"], 64);
    let accept = stub.request_headers()[0].get("accept").unwrap().to_str().unwrap().to_owned();
    assert_eq!(accept, "text/event-stream");

    // Without a sink, or from a server that ignores `stream` and answers in one piece, the
    // answer is the same.
    let stub =
        StubLlm::start(vec![Reply::openai_stream_text(&chunks, 21, 7), Reply::openai_text("whole", 3, 1)])
            .await;
    let client = streaming(&stub, Duration::from_secs(5), 1, Duration::from_secs(5));
    assert_eq!(client.chat(&request()).await.unwrap().text, chunks.concat());
    let (r, pieces) = streamed_call(&client).await;
    assert_eq!(r.unwrap().text, "whole");
    assert!(pieces.is_empty());
}

#[tokio::test]
async fn streamed_tool_calls_are_joined_from_many_fragments() {
    let put = json!({"key": "notes/today", "value": {"lines": ["a", "b"], "n": 3}});
    let reply = Reply::openai_stream_tools(
        &[("memory_put", put.clone()), ("memory_get", json!({"key": "notes/today"}))],
        9,
        40,
        12,
    );
    let events = reply.events.as_ref().unwrap().len();
    let stub = StubLlm::start(vec![reply]).await;
    let client = streaming(&stub, Duration::from_secs(5), 1, Duration::from_secs(5));
    let (r, pieces) = streamed_call(&client).await;
    let r = r.unwrap();
    assert!(events > 20, "the arguments came in many chunks");
    assert!(pieces.is_empty(), "empty content is not passed on");
    assert_eq!(r.text, "");
    assert_eq!(r.finish, Finish::ToolCalls);
    assert_eq!(r.tool_calls.len(), 2);
    assert_eq!(r.tool_calls[0].id, "call_0");
    assert_eq!(r.tool_calls[0].name, "memory_put");
    assert_eq!(r.tool_calls[0].arguments.as_ref().unwrap(), &put, "arguments with newlines, joined");
    assert_eq!(r.tool_calls[1].name, "memory_get");
    assert_eq!(r.tool_calls[1].arguments.as_ref().unwrap()["key"], "notes/today");
    assert_eq!(r.usage.total_tokens, 52);
}

#[tokio::test]
async fn broken_streams_fail_with_a_reason_and_do_not_hang() {
    let text = || Reply::openai_stream_text(&["partial ", "answer"], 10, 2);
    let t0 = Instant::now();

    // No usage chunk: the call cannot be accounted for.
    let stub = StubLlm::start(vec![text().without_usage()]).await;
    let (r, pieces) =
        streamed_call(&streaming(&stub, Duration::from_secs(5), 3, Duration::from_secs(5))).await;
    let e = r.unwrap_err();
    assert!(matches!(e, ProviderError::Malformed(_)), "{e:?}");
    assert_eq!(e.code(), "provider_malformed_response");
    assert!(e.to_string().contains("usage"), "{e}");
    assert_eq!(pieces, ["partial ", "answer"]);
    assert_eq!(stub.requests().len(), 1, "a malformed answer is not retried");

    // A chunk that is not JSON.
    let stub = StubLlm::start(vec![Reply::sse([
        r#"{"choices":[{"index":0,"delta":{"content":"ok"}}]}"#,
        r#"{"choices":[{"index":0,"delta":{"content":"#,
        "[DONE]",
    ])])
    .await;
    let (r, _) = streamed_call(&streaming(&stub, Duration::from_secs(5), 3, Duration::from_secs(5))).await;
    assert!(matches!(r, Err(ProviderError::Malformed(_))), "{r:?}");
    assert_eq!(stub.requests().len(), 1);

    // Cut off: the body ends cleanly, but before [DONE] (here right after the text).
    let stub = StubLlm::start(vec![text().cut_after(3, Ending::Close)]).await;
    let (r, pieces) =
        streamed_call(&streaming(&stub, Duration::from_secs(5), 3, Duration::from_secs(5))).await;
    let e = r.unwrap_err();
    assert!(matches!(e, ProviderError::Malformed(_)), "{e:?}");
    assert!(e.to_string().contains("[DONE]"), "{e}");
    assert_eq!(pieces, ["partial ", "answer"]);
    assert_eq!(stub.requests().len(), 1);

    // Broken off mid-body after text was passed on: a transport failure, not retried, since
    // the text has been seen.
    let stub = StubLlm::start(vec![text().cut_after(2, Ending::Abort)]).await;
    let (r, pieces) =
        streamed_call(&streaming(&stub, Duration::from_secs(5), 3, Duration::from_secs(5))).await;
    assert!(matches!(r, Err(ProviderError::Transport(_))), "{r:?}");
    assert_eq!(pieces, ["partial "]);
    assert_eq!(stub.requests().len(), 1, "no retry after text was passed on");

    // Stalled after some text: the idle timeout ends it, without a retry.
    let stub = StubLlm::start(vec![text().cut_after(2, Ending::Stall)]).await;
    let t1 = Instant::now();
    let (r, pieces) =
        streamed_call(&streaming(&stub, Duration::from_secs(30), 3, Duration::from_millis(300))).await;
    let e = r.unwrap_err();
    assert!(matches!(e, ProviderError::Stalled(_)), "{e:?}");
    assert_eq!(e.code(), "provider_timeout");
    assert!(t1.elapsed() < Duration::from_secs(3));
    assert_eq!(pieces, ["partial "]);
    assert_eq!(stub.requests().len(), 1);

    assert!(t0.elapsed() < Duration::from_secs(10), "nothing hung");
}

#[tokio::test]
async fn streams_are_retried_only_before_text_was_passed_on() {
    // A 503, then a stream that stalls before any text (only the role chunk), then a good one.
    let stub = StubLlm::start(vec![
        Reply::raw(503, r#"{"error":{"message":"overloaded"}}"#),
        Reply::openai_stream_text(&["never"], 1, 1).cut_after(1, Ending::Stall),
        Reply::openai_stream_text(&["third ", "time"], 5, 2),
    ])
    .await;
    let client = streaming(&stub, Duration::from_secs(30), 3, Duration::from_millis(300));
    let (r, pieces) = streamed_call(&client).await;
    assert_eq!(r.unwrap().text, "third time");
    assert_eq!(pieces, ["third ", "time"], "nothing of the failed tries reached the sink");
    assert_eq!(stub.requests().len(), 3);
}

#[tokio::test]
async fn a_slow_stream_is_bounded_by_the_request_timeout() {
    // Every chunk comes within the idle timeout, but the whole takes longer than the request
    // timeout allows.
    let chunks = ["a"; 20];
    let stub =
        StubLlm::start(vec![Reply::openai_stream_text(&chunks, 1, 1).paced(Duration::from_millis(100))])
            .await;
    let t0 = Instant::now();
    let (r, pieces) =
        streamed_call(&streaming(&stub, Duration::from_millis(700), 1, Duration::from_secs(5))).await;
    assert!(matches!(r, Err(ProviderError::Timeout(_))), "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert!(!pieces.is_empty() && pieces.len() < chunks.len(), "{pieces:?}");
}
