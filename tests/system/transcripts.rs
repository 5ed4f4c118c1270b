//! Transcripts: every model call's request and response and every tool call's arguments and
//! result land in the transcripts stream, keyed by task, attempt and step, before the loop acts
//! on them; secrets are redacted, long texts cut with a marker; a template can turn recording
//! off; a tenant's entries expire after its retention.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use flotilla_agent_runner::llm::ToolSpec;
use flotilla_agent_runner::tools::{Registry, Tool, ToolCtx, ToolError};
use flotilla_protocol::{
    MAX_FIELD_BYTES, REDACTED, TRUNCATED_MARK, TaskState, TaskSubmission, TranscriptEntry, codec,
};
use flotilla_testkit::eventually;
use flotilla_testkit::stub_llm::{Reply, StubLlm};
use futures::future::BoxFuture;
use serde_json::{Value, json};

use crate::support::*;

/// A tool whose answer is far longer than a transcript keeps.
#[derive(Debug)]
struct Lookup;

impl Tool for Lookup {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "lookup".into(),
            description: "looks up a lot".into(),
            parameters: json!({"type": "object"}),
        }
    }

    fn call<'a>(&'a self, _ctx: &'a ToolCtx, args: Value) -> BoxFuture<'a, Result<Value, ToolError>> {
        Box::pin(async move { Ok(json!(format!("{}: {}", args["query"], "x".repeat(3 * MAX_FIELD_BYTES)))) })
    }
}

fn template(stub: &StubLlm, name: &str, extra: &str) -> String {
    format!(
        "[[agent]]\nname = \"{name}\"\ncapabilities = [\"{name}\"]\nprovider = \"openai\"\nmodel = \"stub-model\"\n\
         base_url = \"{}\"\nstream = false\ntools = [\"lookup\"]\nsystem_prompt = \"Be brief.\"\n{extra}\n",
        stub.openai_base()
    )
}

async fn transcript(sys: &System, tenant: &str, task: &str) -> Vec<(String, TranscriptEntry)> {
    sys.read_stream(&sys.names.transcripts_stream(), &sys.names.transcripts_of(tenant, task))
        .await
        .into_iter()
        .map(|(subject, p)| (subject, codec::decode(None, &p).unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_model_and_tool_call_is_recorded_before_it_is_acted_on_without_secrets() {
    let stub = StubLlm::start(Vec::new()).await;
    let quiet = StubLlm::start(Vec::new()).await;
    quiet.set_fallback(Reply::openai_text("unrecorded", 10, 5));
    let fleet = [template(&stub, "scribe", ""), template(&quiet, "quiet", "transcripts = false\n")].concat();
    let mut registry = Registry::with_builtins().unwrap();
    registry.add(std::sync::Arc::new(Lookup)).unwrap();
    let mut sys = System::with_dispatcher().await;
    let config = flotilla_agent_runner::Config {
        transcript_retention: [("acme".to_owned(), Duration::from_secs(2).into())].into_iter().collect(),
        ..runner_config("rt")
    };
    sys.start_runner_configured("rt", &fleet, config, registry).await;
    sys.wait_for_agents("rt", 2).await;

    stub.push([
        Reply::openai_tools(
            &[("lookup", json!({ "query": "Oslo", "api_key": "sk-live-0123456789abcdef" }))],
            40,
            8,
        ),
        Reply::openai_text("Oslo is sunny.", 60, 6),
    ]);
    sys.submit(&TaskSubmission {
        id: Some("tx-1".into()),
        capability: "scribe".into(),
        input: json!({ "text": "weather?", "password": "hunter2" }),
        ..Default::default()
    })
    .await;
    let done = eventually(Duration::from_secs(30), "tx-1 to end", || async {
        sys.task("tx-1").await.filter(|r| r.state == TaskState::Completed)
    })
    .await;
    assert_eq!(done.output.unwrap()["answer"], "Oslo is sunny.");
    // Recorded cut and redacted, the run still re-runs identically: a cut text is not cut again.
    let source = flotilla_audit::Source::Live(Box::new(sys.fleet().clone()));
    let h = flotilla_audit::Loader::new(source).load("tx-1", false).await.unwrap();
    let recording = flotilla_audit::rerun::recording(&h).unwrap();
    let mut tools = Registry::with_builtins().unwrap();
    tools.add(std::sync::Arc::new(Lookup)).unwrap();
    let template = flotilla_agent_runner::rerun::template_of(&recording).unwrap();
    let report = flotilla_agent_runner::rerun::rerun(
        &template,
        &tools,
        &recording,
        &flotilla_agent_runner::rerun::Against::Recorded,
    )
    .await;
    assert!(report.identical, "{report:?}");

    let entries = transcript(&sys, "default", "tx-1").await;
    let subjects: Vec<&str> = entries.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        subjects,
        [
            "flotilla.transcripts.default.tx-1.1.1.model",
            "flotilla.transcripts.default.tx-1.1.1.tool-0",
            "flotilla.transcripts.default.tx-1.1.2.model",
        ],
        "in the order they happened"
    );
    let (first, tool, second) = (&entries[0].1, &entries[1].1, &entries[2].1);
    assert!(entries.iter().all(|(_, e)| e.task_id == "tx-1" && e.attempt == 1 && e.template == "scribe"));
    assert!(entries.iter().all(|(_, e)| e.run_id == first.run_id && e.agent_id == "rt-scribe-0"));
    // The first call: the request as the model saw it (input's secret redacted), its answer.
    let m = first.model.as_ref().unwrap();
    assert_eq!(
        (m.provider.as_str(), m.model.as_str(), m.system.as_str()),
        ("openai", "stub-model", "Be brief.")
    );
    assert_eq!(m.tools, ["lookup"]);
    let asked: Value = serde_json::from_str(m.messages[0]["content"].as_str().unwrap()).unwrap();
    assert_eq!(asked, json!({ "text": "weather?", "password": REDACTED }));
    assert_eq!((m.usage.prompt_tokens, m.usage.completion_tokens, m.finish.as_str()), (40, 8, "tool_calls"));
    assert_eq!(m.tool_calls[0]["name"], "lookup");
    assert_eq!(m.tool_calls[0]["arguments"], json!({ "query": "Oslo", "api_key": REDACTED }));
    // The tool call: its arguments (redacted) and its result, cut with a marker.
    let t = tool.tool.as_ref().unwrap();
    assert_eq!((t.name.as_str(), t.index, t.is_error), ("lookup", 0, false));
    assert_eq!(t.arguments, json!({ "query": "Oslo", "api_key": REDACTED }));
    assert!(tool.truncated, "{tool:?}");
    let (kept, cut) = t.result.split_once(TRUNCATED_MARK).unwrap();
    assert!(kept.starts_with("\"\\\"Oslo\\\": xxx") && kept.len() <= MAX_FIELD_BYTES, "{}", &kept[..40]);
    assert!(cut.ends_with(" bytes]"), "{cut}");
    // The second call saw the tool's result, and answered.
    let m2 = second.model.as_ref().unwrap();
    assert_eq!(m2.messages.len(), 3, "user, assistant with the tool call, the tool's result");
    assert_eq!(m2.messages[2]["role"], "tool");
    assert_eq!((m2.text.as_str(), m2.finish.as_str()), ("Oslo is sunny.", "stop"));
    // Nothing secret anywhere in what was stored.
    let raw = sys.read_stream(&sys.names.transcripts_stream(), &sys.names.transcripts_all()).await;
    for (_, p) in &raw {
        let text = String::from_utf8_lossy(p);
        assert!(!text.contains("sk-live") && !text.contains("hunter2"), "a secret was recorded: {text}");
    }
    // Recorded before the loop went on: the step's progress event came after its model entry.
    let progress =
        sys.events().await.into_iter().find(|e| e.task_id == "tx-1" && e.kind == "progress").unwrap();
    assert!(first.at_ms <= progress.at_ms && tool.at_ms <= second.at_ms);

    // A template that records nothing.
    sys.submit(&TaskSubmission { id: Some("tx-2".into()), capability: "quiet".into(), ..Default::default() })
        .await;
    eventually(Duration::from_secs(30), "tx-2 to end", || async {
        sys.task("tx-2").await.filter(|r| r.state == TaskState::Completed)
    })
    .await;
    assert!(transcript(&sys, "default", "tx-2").await.is_empty());

    // A tenant with a short retention: its entries carry it as their TTL and go.
    stub.push([Reply::openai_text("brief", 10, 2)]);
    sys.submit(&TaskSubmission {
        id: Some("tx-3".into()),
        capability: "scribe".into(),
        tenant: Some("acme".into()),
        ..Default::default()
    })
    .await;
    eventually(Duration::from_secs(30), "tx-3 to end", || async {
        sys.task("tx-3").await.filter(|r| r.state == TaskState::Completed)
    })
    .await;
    let stream = sys.js.get_stream(sys.names.transcripts_stream()).await.unwrap();
    let subject = "flotilla.transcripts.acme.tx-3.1.1.model";
    let stored = stream.get_last_raw_message_by_subject(subject).await.unwrap();
    assert_eq!(stored.headers.get("Nats-TTL").map(|v| v.as_str()), Some("2s"));
    eventually(Duration::from_secs(10), "tx-3's transcript to expire", || async {
        stream.get_last_raw_message_by_subject(subject).await.is_err().then_some(())
    })
    .await;
    assert_eq!(transcript(&sys, "default", "tx-1").await.len(), 3, "the default tenant's stay");
    sys.stop().await;
}
