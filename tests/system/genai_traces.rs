//! One task, one trace, in OpenTelemetry's GenAI conventions: a runner exporting over OTLP/HTTP
//! to a receiver the test starts sends an `invoke_agent {agent}` span with a `chat {model}` span
//! per model call (operation, provider, model, token usage) and an `execute_tool {tool}` span per
//! tool call, all in the client's trace.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_protocol::{TaskSubmission, WireFormat, codec, headers};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;

use crate::support::*;

/// An OTLP/HTTP receiver: every span posted to `/v1/traces`.
async fn receiver() -> (std::net::SocketAddr, Arc<Mutex<Vec<Span>>>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let kept = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let kept = kept.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body.as_ref()).unwrap();
                for rs in req.resource_spans {
                    for ss in rs.scope_spans {
                        kept.lock().unwrap().extend(ss.spans);
                    }
                }
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, spans)
}

fn attr(s: &Span, key: &str) -> Option<String> {
    s.attributes.iter().find(|a| a.key == key).and_then(|a| match a.value.as_ref()?.value.as_ref()? {
        Any::StringValue(v) => Some(v.clone()),
        Any::IntValue(v) => Some(v.to_string()),
        other => Some(format!("{other:?}")),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runner_exports_genai_spans_of_the_clients_trace() {
    let (addr, spans) = receiver().await;
    let sys = System::with_dispatcher().await;
    let fleet = "[[agent]]\nname = \"worker\"\ncapabilities = [\"work\"]\ntools = [\"memory_get\"]\n";
    let endpoint = format!("http://{addr}");
    let mut runner =
        sys.spawn_runner_process_with_env("rt", fleet, &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)]);
    sys.wait_for_agents("rt", 1).await;
    let trace_id = "5bf92f3577b34da6a3ce929d0e0e4737";
    let sub = TaskSubmission {
        id: Some("genai".into()),
        capability: "work".into(),
        // The offline model calls a tool first, then answers.
        input: serde_json::json!({ "text": "hi", "_offline": { "tool_calls": [{ "name": "memory_get", "arguments": { "key": "k" } }] } }),
        ..Default::default()
    };
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::CONTENT_TYPE, headers::APPLICATION_MSGPACK);
    h.insert(headers::TRACEPARENT, format!("00-{trace_id}-00f067aa0ba902b7-01").as_str());
    let payload = codec::encode(WireFormat::Msgpack, &sub).unwrap();
    sys.js.publish_with_headers(sys.names.submit_subject(), h, payload.into()).await.unwrap().await.unwrap();
    sys.wait_for_kind("completed", 1, Duration::from_secs(30)).await;
    // A graceful stop flushes the exporter.
    runner.signal("TERM");
    tokio::task::block_in_place(|| runner.wait_timeout(Duration::from_secs(20)));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let got = loop {
        let got = spans.lock().unwrap().clone();
        if got.iter().any(|s| s.name.starts_with("invoke_agent")) || tokio::time::Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let names: Vec<&str> = got.iter().map(|s| s.name.as_str()).collect();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let agent = got.iter().find(|s| s.name == "invoke_agent worker").unwrap_or_else(|| panic!("{names:?}"));
    assert_eq!(hex(&agent.trace_id), trace_id, "the agent's span is in the client's trace");
    assert_eq!(attr(agent, "gen_ai.operation.name").as_deref(), Some("invoke_agent"));
    let chats: Vec<&Span> = got.iter().filter(|s| s.name.starts_with("chat ")).collect();
    assert_eq!(chats.len(), 2, "two model calls: {names:?}");
    for c in &chats {
        assert_eq!(c.parent_span_id, agent.span_id, "{names:?}");
        assert_eq!(attr(c, "gen_ai.operation.name").as_deref(), Some("chat"));
        assert!(attr(c, "gen_ai.provider.name").is_some() && attr(c, "gen_ai.request.model").is_some());
        assert!(attr(c, "gen_ai.usage.input_tokens").is_some_and(|n| n.parse::<u64>().unwrap() > 0), "{c:?}");
        assert!(attr(c, "gen_ai.usage.output_tokens").is_some());
    }
    let tool =
        got.iter().find(|s| s.name == "execute_tool memory_get").unwrap_or_else(|| panic!("{names:?}"));
    assert_eq!(tool.parent_span_id, agent.span_id);
    assert_eq!(attr(tool, "gen_ai.tool.name").as_deref(), Some("memory_get"));
    sys.stop().await;
}
