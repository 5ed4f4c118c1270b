//! The agent loop end to end: a task that needs tools runs through the OpenAI-compatible provider
//! (a local stub server), a slow streamed answer is followed live through partial-text events, a
//! parent delegates to two children that call tools themselves, and a panicking tool fails only
//! its attempt, which is retried.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::support::*;
use flotilla_agent_runner::llm::ToolSpec;
use flotilla_agent_runner::tools::{Registry, Tool, ToolCtx, ToolError};
use flotilla_protocol::{TaskState, TaskSubmission};
use flotilla_testkit::stub_llm::{Reply, StubLlm};
use futures::future::BoxFuture;
use serde_json::{Value, json};

/// A fleet file of one `openai` agent `name` serving `chat` on the stub, with `more` settings.
fn stub_agent(name: &str, stub: &StubLlm, more: &str) -> String {
    format!(
        "[[agent]]\nname = \"{name}\"\ncapabilities = [\"chat\"]\nprovider = \"openai\"\nmodel = \"stub-model\"\n\
         base_url = \"{}\"\n{more}",
        stub.openai_base()
    )
}

/// A `chat` task.
fn chat(id: &str, input: Value) -> TaskSubmission {
    TaskSubmission { id: Some(id.into()), capability: "chat".into(), input, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tool_using_task_runs_through_an_openai_compatible_provider() {
    let stub = StubLlm::start(vec![
        Reply::openai_tools(&[("memory_put", json!({"key": "greeting", "value": "hello"}))], 40, 10),
        // One valid call and one with invalid arguments: the error goes back to the model.
        Reply::openai_tools(
            &[("memory_get", json!({"key": "greeting"})), ("memory_put", json!({"key": 5}))],
            50,
            12,
        ),
        Reply::openai_text("done: hello", 60, 5),
    ])
    .await;
    let tools = "system_prompt = \"Use the memory.\"\ntools = [\"memory_get\", \"memory_put\"]\n";
    let sys = System::with_runner("r1", &stub_agent("assistant", &stub, tools), 1).await;
    sys.submit(&chat("remember", json!("remember hello"))).await;
    let events = sys.wait_for_kind("completed", 1, Duration::from_secs(20)).await;
    let done = events.iter().find(|e| e.kind == "completed").unwrap();
    assert_eq!(done.output.as_ref().unwrap()["answer"], "done: hello");
    assert_eq!(done.output.as_ref().unwrap()["steps"], 3);
    assert_eq!(
        done.usage.unwrap().total_tokens,
        40 + 10 + 50 + 12 + 60 + 5,
        "usage as the server reported it"
    );
    assert_eq!(done.calls.len(), 3);
    assert_eq!(done.calls[1].usage.prompt_tokens, 50);
    let steps: Vec<u32> = events.iter().filter(|e| e.kind == "progress").filter_map(|e| e.step).collect();
    assert_eq!(steps, [1, 2, 3]);

    // The tool really wrote shared memory, in the tenant's namespace.
    let v = sys.topology.memory.get("default.greeting").await.unwrap().unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&v).unwrap(), json!("hello"));
    // What the model saw: the system prompt and tools, then the tool results, including the
    // validation error for the bad arguments (nothing ran for that call).
    let requests = stub.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[0]["messages"][0]["content"], "Use the memory.");
    assert_eq!(requests[0]["tools"].as_array().unwrap().len(), 2);
    let last: Vec<&Value> =
        requests[2]["messages"].as_array().unwrap().iter().filter(|m| m["role"] == "tool").collect();
    assert_eq!(last.len(), 3);
    // memory_get answers the value with its revision (for a compare-and-swap).
    assert_eq!(last[1]["content"], r#"{"revision":1,"value":"hello"}"#);
    assert!(last[2]["content"].as_str().unwrap().contains("invalid arguments"), "{}", last[2]);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_streamed_answer_is_published_as_partial_text_before_completion() {
    // A tool step (streamed, arguments in fragments), then an answer of 16 chunks 120 ms apart.
    let chunks: Vec<String> = (0..16).map(|i| format!("word{i} ")).collect();
    let chunk_refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
    let stub = StubLlm::start(vec![
        Reply::openai_stream_tools(
            &[("memory_put", json!({"key": "k", "value": "line 1\nline 2"}))],
            5,
            30,
            9,
        ),
        Reply::openai_stream_text(&chunk_refs, 70, 16).paced(Duration::from_millis(120)),
    ])
    .await;
    let more = "tools = [\"memory_put\"]\nstream_interval = \"300ms\"\n";
    let sys = System::with_runner("r1", &stub_agent("streamer", &stub, more), 1).await;
    sys.submit(&chat("live", json!("tell a long story"))).await;
    let events = sys.wait_for_kind("completed", 1, Duration::from_secs(30)).await;
    let done_at = events.iter().position(|e| e.kind == "completed").unwrap();
    let done = &events[done_at];
    let answer = done.output.as_ref().unwrap()["answer"].as_str().unwrap().to_owned();
    assert_eq!(answer, chunks.concat());
    assert_eq!(done.usage.unwrap().total_tokens, 30 + 9 + 70 + 16, "usage as the stub reported it");
    assert_eq!(done.calls[1].usage.prompt_tokens, 70);
    assert_eq!(done.calls[1].usage.completion_tokens, 16);

    // Partial text of step 2, in order, all before the step's own event and the completion;
    // none for the tool step, whose content was empty.
    let partial: Vec<(usize, &flotilla_protocol::TaskEvent)> =
        events.iter().enumerate().filter(|(_, e)| e.kind == "progress" && e.text_delta.is_some()).collect();
    assert!(partial.iter().all(|(_, e)| e.step == Some(2)), "{partial:?}");
    let seqs: Vec<u32> = partial.iter().filter_map(|(_, e)| e.text_seq).collect();
    assert_eq!(seqs, (1..=u32::try_from(partial.len()).unwrap()).collect::<Vec<_>>());
    assert!(partial.len() >= 3, "several partial events while the answer came: {}", partial.len());
    assert!(partial.len() < chunks.len(), "throttled: {} events for {} chunks", partial.len(), chunks.len());
    let text: String = partial.iter().filter_map(|(_, e)| e.text_delta.as_deref()).collect();
    assert_eq!(text, answer, "the partial text adds up to the answer");
    let step2_at = events
        .iter()
        .position(|e| e.kind == "progress" && e.step == Some(2) && e.text_delta.is_none())
        .unwrap();
    assert!(partial.iter().all(|(i, _)| *i < step2_at && *i < done_at));
    // At most one partial event per interval (the last one, the flush, may come sooner).
    for pair in partial.windows(2).take(partial.len().saturating_sub(2)) {
        let gap = pair[1].1.at_ms.saturating_sub(pair[0].1.at_ms);
        assert!(gap >= 250, "partial events {gap} ms apart");
    }
    let steps: Vec<u32> = events
        .iter()
        .filter(|e| e.kind == "progress" && e.text_delta.is_none())
        .filter_map(|e| e.step)
        .collect();
    assert_eq!(steps, [1, 2]);

    // The model was asked to stream, and the tool's arguments arrived whole.
    let requests = stub.requests();
    assert_eq!(requests[0]["stream"], true);
    assert_eq!(requests[1]["stream_options"]["include_usage"], true);
    let v = sys.topology.memory.get("default.k").await.unwrap().unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&v).unwrap(), json!("line 1\nline 2"));
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_parent_delegates_to_two_children_that_use_tools() {
    let fleet = "[[agent]]\nname = \"lead\"\ncapabilities = [\"plan\"]\ntools = [\"delegate\"]\nconcurrency = 1\n\n\
                 [[agent]]\nname = \"researcher\"\ncapabilities = [\"research\"]\ntools = [\"memory_put\", \"memory_get\"]\n\
                 concurrency = 2\nreplicas = 2\n";
    let child = |topic: &str| {
        json!({
            "capability": "research",
            "input": { "text": topic, "_offline": { "tool_calls": [
                { "name": "memory_put", "arguments": { "key": format!("notes/{topic}"), "value": topic } },
                { "name": "memory_get", "arguments": { "key": format!("notes/{topic}") } }
            ] } }
        })
    };
    let sys = System::with_runner("r1", fleet, 3).await;
    sys.submit(&TaskSubmission {
        id: Some("parent".into()),
        capability: "plan".into(),
        input: json!({ "text": "plan the trip", "_offline": { "tool_calls": [
            { "name": "delegate", "arguments": child("trains") },
            { "name": "delegate", "arguments": child("hotels") }
        ] } }),
        ..Default::default()
    })
    .await;
    let events = sys.wait_for_kind("completed", 3, Duration::from_secs(30)).await;
    let parent = sys.task("parent").await.unwrap();
    assert_eq!(parent.state, TaskState::Completed);
    assert_eq!(parent.children, ["parent-s1c0", "parent-s1c1"]);
    let answer = parent.output.unwrap()["answer"].as_str().unwrap().to_owned();
    assert!(answer.contains("[researcher] research: trains"), "{answer}");
    assert!(answer.contains("[researcher] research: hotels"), "{answer}");
    for (id, topic) in [("parent-s1c0", "trains"), ("parent-s1c1", "hotels")] {
        let c = sys.task(id).await.unwrap();
        assert_eq!(c.state, TaskState::Completed);
        assert_eq!(c.parent_id.as_deref(), Some("parent"));
        assert!(c.agent_id.unwrap().starts_with("r1-researcher-"));
        assert_eq!(c.calls.len(), 2, "a tool step and an answer");
        let stored = sys.topology.memory.get(format!("default.notes/{topic}")).await.unwrap().unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&stored).unwrap(), json!(topic));
    }
    // In the stream: the parent started before its children and completed after both.
    let pos = |id: &str, kind: &str| events.iter().position(|e| e.task_id == id && e.kind == kind).unwrap();
    for c in ["parent-s1c0", "parent-s1c1"] {
        assert!(pos("parent", "started") < pos(c, "accepted"));
        assert!(pos(c, "completed") < pos("parent", "completed"));
    }
    // The lead agent's lifecycle for the parent task, in order, waiting once per child; and the
    // children's tasks run (planning) while the lead is waiting.
    let everything = sys.read_stream(&sys.names.events_stream(), &sys.names.events_all()).await;
    let mut lead_states = Vec::new();
    let mut waiting = false;
    let mut child_planned_while_waiting = 0;
    for (subject, payload) in &everything {
        if !subject.contains(".events.agent.") {
            continue;
        }
        let ev: flotilla_protocol::AgentEvent = flotilla_protocol::decode(None, payload).unwrap();
        if ev.task_id.as_deref() == Some("parent") {
            lead_states.push(ev.to.as_str());
            waiting = ev.to == flotilla_protocol::AgentState::Waiting;
        } else if waiting && ev.to == flotilla_protocol::AgentState::Planning {
            child_planned_while_waiting += 1;
        }
    }
    assert_eq!(
        lead_states,
        ["planning", "executing", "waiting", "executing", "waiting", "executing", "planning", "idle"]
    );
    assert!(child_planned_while_waiting >= 2, "children ran while the parent waited");
    // The registry showed the lead back at idle with no activity.
    let lead: flotilla_protocol::AgentRecord =
        flotilla_protocol::decode(None, &sys.topology.agents.get("r1-lead-0").await.unwrap().unwrap())
            .unwrap();
    assert_eq!(lead.state, flotilla_protocol::AgentState::Idle);
    assert!(lead.activities.is_empty());
    sys.stop().await;
}

/// A tool that panics the first time it is called.
#[derive(Debug, Default)]
pub struct Flaky {
    panicked: AtomicBool,
}

impl Tool for Flaky {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "flaky".into(),
            description: "panics once".into(),
            parameters: json!({"type": "object"}),
        }
    }

    fn call<'a>(&'a self, _ctx: &'a ToolCtx, _args: Value) -> BoxFuture<'a, Result<Value, ToolError>> {
        Box::pin(async move {
            if !self.panicked.swap(true, Ordering::SeqCst) {
                panic!("injected tool panic");
            }
            Ok(json!("fine now"))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panicking_tool_fails_only_its_attempt_which_is_retried() {
    let fleet = "[[agent]]\nname = \"fragile\"\ncapabilities = [\"fragile\"]\ntools = [\"flaky\"]\n\n\
                 [[agent]]\nname = \"steady\"\ncapabilities = [\"work\"]\nconcurrency = 2\n";
    let mut registry = Registry::with_builtins().unwrap();
    registry.add(Arc::new(Flaky::default())).unwrap();
    let mut sys = System::with_dispatcher().await;
    sys.start_runner_with_tools("r1", fleet, registry).await;
    sys.wait_for_agents("r1", 2).await;
    sys.submit(&TaskSubmission {
        id: Some("bumpy".into()),
        capability: "fragile".into(),
        input: json!({ "text": "try", "_offline": { "tool_calls": [{ "name": "flaky", "arguments": {} }] } }),
        ..Default::default()
    })
    .await;
    // Other agents of the same runner keep serving meanwhile.
    for i in 0..5 {
        sys.submit(&TaskSubmission {
            id: Some(format!("steady-{i}")),
            capability: "work".into(),
            ..Default::default()
        })
        .await;
    }
    let events = sys.wait_for_kind("completed", 6, Duration::from_secs(30)).await;
    let bumpy = events.iter().find(|e| e.kind == "completed" && e.task_id == "bumpy").unwrap();
    assert!(bumpy.output.as_ref().unwrap()["answer"].as_str().unwrap().contains("flaky -> \"fine now\""));
    let h = sys.health("agent-runner", "r1").await;
    assert_eq!(h.details["executions"], 7, "the crashed attempt ran again once: {}", h.details);
    assert_eq!(h.details["completed"], 6);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_message_each_other_directly() {
    let fleet = "[[agent]]\nname = \"asker\"\ncapabilities = [\"ask\"]\ntools = [\"send_message\"]\n\n\
                 [[agent]]\nname = \"helper\"\ncapabilities = [\"help\"]\n";
    let sys = System::with_runner("r1", fleet, 2).await;
    sys.submit(&TaskSubmission {
        id: Some("chatty".into()),
        capability: "ask".into(),
        input: json!({ "text": "ask around", "_offline": { "tool_calls": [
            { "name": "send_message", "arguments": { "agent": "r1-helper-0", "message": "what is 2+2?", "wait_reply": true } },
            { "name": "send_message", "arguments": { "agent": "r1-helper-0", "message": "fyi: done" } },
            { "name": "send_message", "arguments": { "agent": "nobody-here", "message": "hello?" } }
        ] } }),
        ..Default::default()
    })
    .await;
    let events = sys.wait_for_kind("completed", 1, Duration::from_secs(20)).await;
    let done = events.iter().find(|e| e.kind == "completed").unwrap();
    let answer = done.output.as_ref().unwrap()["answer"].as_str().unwrap().to_owned();
    // The helper's model saw the question and its answer came back to the waiting call.
    assert!(answer.contains("[helper] message: what is 2+2?"), "{answer}");
    assert!(answer.contains(r#""delivered":["agent:r1-helper-0"]"#), "{answer}");
    assert!(answer.contains("unknown_agent: agent nobody-here is not registered"), "{answer}");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_api_key_that_the_provider_quotes_back_is_stored_nowhere() {
    const KEY: &str = "sk-flotilla-test-7f3c9a1e5b42";
    // A provider that quotes the key it was sent in its error, as some do.
    let stub = StubLlm::start(vec![
        Reply::raw(401, &format!(r#"{{"error":{{"message":"Incorrect API key provided: {KEY}"}}}}"#)),
        Reply::openai_text("done", 10, 2),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets.toml");
    std::fs::write(&secrets, format!("STUB_KEY = \"{KEY}\"\n")).unwrap();
    let mut sys = System::with_dispatcher().await;
    let config = flotilla_agent_runner::Config { secrets_file: Some(secrets), ..runner_config("r1") };
    let fleet = stub_agent("assistant", &stub, "api_key_env = \"STUB_KEY\"\n");
    sys.start_runner_configured("r1", &fleet, config, Registry::with_builtins().unwrap()).await;
    sys.wait_for_agents("r1", 1).await;
    sys.submit(&TaskSubmission { max_attempts: Some(1), ..chat("refused", json!("hello")) }).await;
    sys.wait_for_kind("failed", 1, Duration::from_secs(20)).await;
    sys.submit(&chat("answered", json!("hello again"))).await;
    let events = sys.wait_for_kind("completed", 1, Duration::from_secs(20)).await;
    let failed = events.iter().find(|e| e.kind == "failed").unwrap();
    let why = &failed.error.as_ref().unwrap().message;
    assert!(why.contains("<redacted>"), "the provider's message, redacted: {why}");
    // Nothing any service stored holds the key: events, records, registry, ledger, dead letters.
    let stored = sys.everything_stored().await;
    assert!(stored.len() > 10, "{} messages", stored.len());
    for (stream, subject, payload) in &stored {
        assert!(
            !payload.windows(KEY.len()).any(|w| w == KEY.as_bytes()),
            "the key is stored in {stream} on {subject}"
        );
    }
    sys.stop().await;
}
