//! Against a real model: Qwen2.5-Coder-0.5B served on loopback by `scripts/llm-serve.py`
//! (installed from PyPI by `scripts/llm-install`), behind a proxy that records the usage the model
//! server reported. Assertions are on structure, never on the model's wording.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use crate::support::*;
use flotilla_protocol::{TaskState, TaskSubmission, Usage};
use flotilla_testkit::local_llm::{LocalLlm, UsageProxy};
use futures::StreamExt as _;

fn keeper_fleet(base_url: &str) -> String {
    format!(
        r#"[[agent]]
name = "keeper"
capabilities = ["notes"]
provider = "openai"
model = "local"
base_url = "{base_url}"
system_prompt = "You keep notes for a team in shared memory. To store a note, call the memory_put tool."
tools = ["memory_put"]
concurrency = 1
replicas = 1
max_steps = 4
max_tokens_per_call = 200
request_timeout = "180s"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_model_calls_a_tool_and_its_usage_matches_what_the_server_reported() {
    let llm = tokio::task::spawn_blocking(LocalLlm::start).await.unwrap().expect("the local model starts");
    let proxy = UsageProxy::start(&llm.base_url).await.unwrap();

    let mut sys = System::with_dispatcher().await;
    sys.start_runner("rm", &keeper_fleet(&proxy.base_url())).await;
    sys.wait_for_agents("rm", 1).await;

    sys.submit(&TaskSubmission {
        id: Some("note-1".into()),
        capability: "notes".into(),
        input: serde_json::json!({
            "text": "Store this note with the memory_put tool, under the key release_day: the release ships on Friday."
        }),
        ..Default::default()
    })
    .await;

    let rec = flotilla_testkit::eventually(Duration::from_secs(300), "the task to finish", || async {
        sys.task("note-1").await.filter(|r| matches!(r.state, TaskState::Completed | TaskState::Failed))
    })
    .await;
    assert_eq!(rec.state, TaskState::Completed, "the task failed: {:?}", rec.error);
    let events = sys.events().await;
    let completed = events.iter().find(|e| e.task_id == "note-1" && e.kind == "completed").unwrap();

    // A tool was called, and it did its work.
    let tool_calls: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e.kind == "progress")
        .filter_map(|e| e.detail.as_ref()?.get("tool_calls")?.as_array())
        .flatten()
        .collect();
    assert!(tool_calls.iter().any(|c| c["name"] == "memory_put"), "no memory_put call: {tool_calls:?}");
    let memory = sys.js.get_key_value(sys.names.memory_bucket()).await.unwrap();
    let keys: Vec<String> = memory.keys().await.unwrap().filter_map(|k| async { k.ok() }).collect().await;
    assert!(!keys.is_empty(), "memory_put stored nothing");

    // An answer came back.
    let output = completed.output.as_ref().expect("an output");
    assert!(!output.to_string().trim_matches('"').trim().is_empty(), "empty answer");

    // The final answer was streamed: its partial-text events add up to the step's text.
    let last_step = events
        .iter()
        .rfind(|e| e.task_id == "note-1" && e.kind == "progress" && e.text_delta.is_none())
        .expect("a step event");
    let streamed: String = events
        .iter()
        .filter(|e| e.task_id == "note-1" && e.step == last_step.step)
        .filter_map(|e| e.text_delta.as_deref())
        .collect();
    let step_text = last_step.detail.as_ref().and_then(|d| d["text"].as_str()).unwrap_or_default();
    assert!(!streamed.is_empty(), "no partial text was published");
    assert_eq!(streamed, step_text, "partial text adds up to the answer");
    assert!(
        proxy.calls().iter().all(|c| c.request["stream"] == true),
        "the runner streams from openai servers"
    );

    // Usage: per call and in total, exactly what the model server reported.
    let served: Vec<Usage> = proxy
        .calls()
        .iter()
        .filter(|c| c.path.ends_with("/chat/completions") && c.status == 200)
        .map(|c| {
            let u = c.usage.as_ref().expect("the server reported usage");
            Usage::new(u["prompt_tokens"].as_u64().unwrap(), u["completion_tokens"].as_u64().unwrap())
        })
        .collect();
    assert!(served.len() >= 2, "a tool call and a final answer are two model calls: {served:?}");
    let recorded: Vec<Usage> = rec.calls.iter().map(|c| c.usage).collect();
    assert_eq!(recorded, served, "usage per call");
    let total = served.iter().fold(Usage::default(), |mut t, u| {
        t.add(*u);
        t
    });
    assert_eq!(completed.usage, Some(total), "usage in the completed event");
    assert!(total.total_tokens > 0);

    // The recorded task re-runs identically from its transcript, and the model is asked nothing.
    let asked = proxy.calls().len();
    let source = flotilla_audit::Source::Live(Box::new(sys.fleet().clone()));
    let history = flotilla_audit::Loader::new(source).load("note-1", false).await.unwrap();
    let (reports, skipped) = flotilla_audit::rerun::rerun_tree(&history, &Default::default()).await.unwrap();
    assert!(skipped.is_empty());
    assert!(reports[0].identical, "{:?}", reports[0]);
    assert_eq!((reports[0].model_calls, reports[0].steps_recorded), (0, served.len() as u32));
    assert_eq!(proxy.calls().len(), asked, "the re-run called the model");
    sys.stop().await;
    drop(llm);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_model_answers_a_direct_message_from_another_agent() {
    let llm = tokio::task::spawn_blocking(LocalLlm::start).await.unwrap().expect("the local model starts");
    let fleet = format!(
        r#"[[agent]]
name = "asker"
capabilities = ["ask"]
tools = ["send_message"]

[[agent]]
name = "expert"
capabilities = ["expert"]
provider = "openai"
model = "local"
base_url = "{}"
system_prompt = "You are a helpful expert. Answer questions in one short sentence."
max_steps = 2
max_tokens_per_call = 60
request_timeout = "180s"
"#,
        llm.base_url
    );
    let sys = System::with_runner("rm", &fleet, 2).await;
    sys.submit(&TaskSubmission {
        id: Some("ask-expert".into()),
        capability: "ask".into(),
        input: serde_json::json!({ "text": "ask", "_offline": { "tool_calls": [
            { "name": "send_message", "arguments": { "agent": "rm-expert-0", "message": "What colour is the sky on a clear day?", "wait_reply": true, "timeout_s": 240 } }
        ] } }),
        ..Default::default()
    })
    .await;
    let rec = flotilla_testkit::eventually(Duration::from_secs(300), "the asking task to finish", || async {
        sys.task("ask-expert").await.filter(|r| matches!(r.state, TaskState::Completed | TaskState::Failed))
    })
    .await;
    assert_eq!(rec.state, TaskState::Completed, "{:?}", rec.error);
    // The answer came back from the expert (through the router) and is the model's own text.
    let answer = rec.output.unwrap()["answer"].as_str().unwrap().to_owned();
    let result: serde_json::Value =
        serde_json::from_str(answer.split("send_message -> ").nth(1).unwrap().trim_end_matches(')')).unwrap();
    assert_eq!(result["from"], "agent:rm-expert-0", "{answer}");
    let reply = result["reply"].as_str().unwrap();
    assert!(!reply.trim().is_empty() && !reply.starts_with("[expert]"), "not the model's answer: {reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recall_through_a_real_embedding_model_finds_by_meaning_not_by_shared_words() {
    let embed =
        tokio::task::spawn_blocking(LocalLlm::start_embedding).await.unwrap().expect("the embedder starts");
    let proxy = UsageProxy::start(&embed.base_url).await.unwrap();
    let fleet = format!(
        "[[agent]]\nname = \"librarian\"\ncapabilities = [\"library\"]\ntools = [\"remember\", \"recall\"]\n\
         embedding_url = \"{}\"\nembedding_model = \"all-minilm-l6-v2\"\n",
        proxy.base_url()
    );
    let mut sys = System::with_dispatcher().await;
    sys.start_runner("re", &fleet).await;
    sys.wait_for_agents("re", 1).await;
    // The text that means the same as the question shares none of its words; one that shares
    // most of its words means something else (the offline hashed-words embedder picks that one).
    let meant = "The kitten sleeps upon the sofa.";
    let texts = [
        "Quarterly revenue rose by nine percent.",
        meant,
        "A cat food price list on a website.",
        "The train to Berlin leaves at noon.",
        "Ownership rules in Rust prevent data races.",
    ];
    let calls: Vec<serde_json::Value> =
        texts.iter().map(|t| serde_json::json!({ "name": "remember", "arguments": { "text": t } })).collect();
    sys.submit(&TaskSubmission {
        id: Some("shelve".into()),
        capability: "library".into(),
        input: serde_json::json!({ "text": "remember these", "_offline": { "tool_calls": calls } }),
        ..Default::default()
    })
    .await;
    sys.wait_for_kind("completed", 1, Duration::from_secs(120)).await;
    sys.submit(&TaskSubmission {
        id: Some("ask".into()),
        capability: "library".into(),
        input: serde_json::json!({ "text": "where is the cat?", "_offline": { "tool_calls": [
            { "name": "recall", "arguments": { "query": "a cat napping on a couch", "k": 2 } }
        ] } }),
        ..Default::default()
    })
    .await;
    let events = sys.wait_for_kind("completed", 2, Duration::from_secs(120)).await;
    let done = events.iter().find(|e| e.kind == "completed" && e.task_id == "ask").unwrap();
    let answer = done.output.as_ref().unwrap()["answer"].as_str().unwrap().to_owned();
    let json = answer.split("recall -> ").nth(1).unwrap().trim_end_matches(')').to_owned();
    let hits: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {answer}"));
    assert_eq!(hits[0]["text"], meant, "{hits}");
    // Every text and the query went to the real model.
    let calls = proxy.calls();
    let embeddings: Vec<_> =
        calls.iter().filter(|c| c.path.ends_with("/embeddings") && c.status == 200).collect();
    assert_eq!(embeddings.len(), texts.len() + 1, "{calls:?}");
    assert_eq!(embeddings[0].request["model"], "all-minilm-l6-v2");
    sys.stop().await;
}
