//! One task, one trace, in OpenTelemetry's GenAI conventions: a runner exporting over OTLP/HTTP
//! to a receiver the test starts sends an `invoke_agent {agent}` span with a `chat {model}` span
//! per model call (operation, provider, model, token usage) and an `execute_tool {tool}` span per
//! tool call, all in the client's trace. And one task is one trace across services: with the
//! dispatcher, the budget-keeper and the runner each a process exporting to the same receiver, a
//! task that calls a tool, delegates and messages another agent yields one tree of spans from all
//! three, rooted at the client's span.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_protocol::{TaskSubmission, WireFormat, codec, headers};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;

use crate::support::*;
use flotilla_testkit::{ChildProcess, bin};

/// An OTLP/HTTP receiver: every span posted to `/v1/traces`, with its resource's `service.name`.
async fn receiver() -> (std::net::SocketAddr, Arc<Mutex<Vec<(String, Span)>>>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let kept = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let kept = kept.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body.as_ref()).unwrap();
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .as_ref()
                        .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                        .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                            Any::StringValue(v) => Some(v.clone()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        kept.lock().unwrap().extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
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
        let got: Vec<Span> = spans.lock().unwrap().iter().map(|(_, s)| s.clone()).collect();
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

/// A service as its own process exporting spans to `endpoint`.
fn spawn_service(sys: &System, bin_name: &str, role: &str, endpoint: &str) -> ChildProcess {
    let prefix = sys.names.prefix().to_string();
    let creds = sys.server.creds(&prefix, role).map(|p| p.display().to_string()).unwrap_or_default();
    ChildProcess::spawn(
        &bin(bin_name),
        &[],
        &[
            ("FLOTILLA_CREDS", &creds),
            ("FLOTILLA_NATS_URL", sys.server.url()),
            ("FLOTILLA_INSTANCE", &format!("{role}-traced")),
            ("FLOTILLA_PREFIX", &prefix),
            ("FLOTILLA_WIRE_FORMAT", "msgpack"),
            ("FLOTILLA_DISPATCHER__TICK", "100ms"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
            ("RUST_LOG", "warn"),
        ],
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_task_is_one_trace_across_every_service_it_touches() {
    let (addr, spans) = receiver().await;
    let endpoint = format!("http://{addr}");
    // Nothing in this process schedules or budgets: the dispatcher, the budget-keeper and the
    // runner are processes of their own, each exporting to the receiver.
    let mut sys = System::start(flotilla_service::StreamSettings::default(), WireFormat::Msgpack).await;
    sys.budgets = true;
    let fleet = "[[agent]]\nname = \"lead\"\ncapabilities = [\"lead\"]\ntools = [\"delegate\", \"send_message\", \"memory_put\"]\n\n\
                 [[agent]]\nname = \"helper\"\ncapabilities = [\"help\"]\nconcurrency = 2\n";
    // The runner first: its identity is added to the server (a reload) before the others connect.
    let mut runner =
        sys.spawn_runner_process_with_env("rt", fleet, &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)]);
    sys.wait_for_agents("rt", 2).await;
    let mut dispatcher = spawn_service(&sys, "flotilla-dispatcher", "dispatcher", &endpoint);
    let mut keeper = spawn_service(&sys, "flotilla-budget-keeper", "budget-keeper", &endpoint);

    let trace_id = "6cf92f3577b34da6a3ce929d0e0e4738";
    let root_span = "00f067aa0ba902b7";
    let sub = TaskSubmission {
        id: Some("whole".into()),
        capability: "lead".into(),
        budget_tokens: Some(100_000),
        input: serde_json::json!({ "text": "plan", "_offline": { "tool_calls": [
            { "name": "memory_put", "arguments": { "key": "plan", "value": "draft" } },
            { "name": "delegate", "arguments": { "capability": "help", "input": { "text": "a detail" } } },
            { "name": "send_message", "arguments": { "agent": "rt-helper-0", "message": "anything else?", "wait_reply": true } }
        ] } }),
        ..Default::default()
    };
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::CONTENT_TYPE, headers::APPLICATION_MSGPACK);
    h.insert(headers::TRACEPARENT, format!("00-{trace_id}-{root_span}-01").as_str());
    let payload = codec::encode(WireFormat::Msgpack, &sub).unwrap();
    // The keeper may still be starting: the submission waits in the intake until a dispatcher
    // takes it, and the runner asks the keeper again until it answers.
    sys.js.publish_with_headers(sys.names.submit_subject(), h, payload.into()).await.unwrap().await.unwrap();
    let events = sys.wait_for_kind("completed", 2, Duration::from_secs(60)).await;
    assert!(events.iter().any(|e| e.task_id == "whole"), "{events:?}");
    let rec = sys.task("whole").await.unwrap();
    assert_eq!(rec.children.len(), 1, "{rec:?}");

    // Graceful stops flush every exporter.
    for p in [&mut runner, &mut dispatcher, &mut keeper] {
        p.signal("TERM");
    }
    for p in [&mut runner, &mut dispatcher, &mut keeper] {
        tokio::task::block_in_place(|| p.wait_timeout(Duration::from_secs(20)));
    }
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let got: Vec<(String, Span)> = spans.lock().unwrap().clone();
    let ours: Vec<&(String, Span)> = got.iter().filter(|(_, s)| hex(&s.trace_id) == trace_id).collect();
    let described: Vec<String> = ours.iter().map(|(svc, s)| format!("{svc}: {}", s.name)).collect();
    let services: std::collections::BTreeSet<&str> = ours.iter().map(|(svc, _)| svc.as_str()).collect();
    for want in ["flotilla-dispatcher", "flotilla-budget-keeper", "flotilla-agent-runner"] {
        assert!(services.contains(want), "no span of {want} in the trace: {described:#?}");
    }
    let named = |svc: &str, name: &str| {
        ours.iter().filter(|(s, sp)| s == svc && sp.name == name).map(|(_, sp)| sp).collect::<Vec<_>>()
    };
    // The dispatcher took the submission, and the child's too (a delegation is a submission).
    assert_eq!(named("flotilla-dispatcher", "submission").len(), 2, "{described:#?}");
    assert!(!named("flotilla-budget-keeper", "budget").is_empty(), "{described:#?}");
    let runner_spans = |name: &str| named("flotilla-agent-runner", name);
    assert_eq!(runner_spans("invoke_agent lead").len(), 1, "{described:#?}");
    assert!(!runner_spans("invoke_agent helper").is_empty(), "the child's agent: {described:#?}");
    for tool in ["memory_put", "delegate", "send_message"] {
        assert_eq!(runner_spans(&format!("execute_tool {tool}")).len(), 1, "{tool}: {described:#?}");
    }
    let chats: Vec<&Span> =
        ours.iter().filter(|(_, s)| s.name.starts_with("chat ")).map(|(_, s)| s).collect();
    // The lead asks twice (its tool calls, then the answer), the helper once per handling: the
    // child task and the message.
    assert_eq!(chats.len(), 4, "{described:#?}");
    for c in &chats {
        assert_eq!(c.name, "chat offline");
        assert_eq!(attr(c, "gen_ai.operation.name").as_deref(), Some("chat"));
        assert_eq!(attr(c, "gen_ai.provider.name").as_deref(), Some("offline"));
        assert_eq!(attr(c, "gen_ai.request.model").as_deref(), Some("offline"));
        assert!(
            attr(c, "gen_ai.usage.input_tokens").is_some() && attr(c, "gen_ai.usage.output_tokens").is_some()
        );
    }
    // One tree: every span's parent is the client's span or another span of the trace.
    let ids: std::collections::HashSet<String> = ours.iter().map(|(_, s)| hex(&s.span_id)).collect();
    for (svc, s) in &ours {
        let parent = hex(&s.parent_span_id);
        assert!(
            parent == root_span || ids.contains(&parent),
            "{svc}: {} has parent {parent}, not in the trace: {described:#?}",
            s.name
        );
    }
    // The direct message's handling is below the lead's `send_message` call, in the runner.
    let send = runner_spans("execute_tool send_message")[0];
    let below_send = |s: &Span| {
        let mut at = hex(&s.parent_span_id);
        for _ in 0..32 {
            if at == hex(&send.span_id) {
                return true;
            }
            match ours.iter().find(|(_, p)| hex(&p.span_id) == at) {
                Some((_, p)) => at = hex(&p.parent_span_id),
                None => return false,
            }
        }
        false
    };
    assert!(
        ours.iter().any(|(svc, s)| svc == "flotilla-agent-runner"
            && s.name.starts_with("invoke_agent helper")
            && below_send(s)),
        "the message's handling joins the sender's trace: {described:#?}"
    );
    sys.stop().await;
}
