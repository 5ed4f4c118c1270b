//! Audit and replay: `flotilla replay` tells a task's story from the streams, `--rerun` executes
//! its agent loop again against the recorded answers without calling the model (and reports the
//! first divergence when a tool or a model answers differently), `audit verify` finds nothing in
//! a clean run and names what was tampered with, and an export verifies, catches a changed or
//! removed line, and is enough to replay and re-run a task with no stream left.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use flotilla_agent_runner::llm::ToolSpec;
use flotilla_agent_runner::rerun::{Against, rerun, template_of};
use flotilla_agent_runner::tools::{Registry, ToolError, pure};
use flotilla_audit::{Loader, Source};
use flotilla_protocol::{TaskState, TaskSubmission};
use flotilla_testkit::eventually;
use flotilla_testkit::stub_llm::{Reply, StubLlm};
use serde_json::{Value, json};

use crate::support::*;

/// A tool that answers from its arguments alone: re-runs execute it again.
fn quote(price: u64) -> std::sync::Arc<dyn flotilla_agent_runner::tools::Tool> {
    pure(
        ToolSpec::object(
            "quote",
            "the price of a symbol",
            json!({ "symbol": { "type": "string" } }),
            &["symbol"],
        ),
        move |args: &Value| -> Result<Value, ToolError> {
            Ok(json!({ "symbol": args["symbol"], "price": price }))
        },
    )
}

fn registry(price: u64) -> Registry {
    let mut r = Registry::with_builtins().unwrap();
    r.add(quote(price)).unwrap();
    r
}

fn fleet(stub: &StubLlm) -> String {
    format!(
        "[[agent]]\nname = \"trader\"\ncapabilities = [\"trade\"]\nprovider = \"openai\"\nmodel = \"stub-model\"\n\
         base_url = \"{}\"\nstream = false\ntools = [\"quote\", \"memory_put\"]\nsystem_prompt = \"You trade.\"\nconcurrency = 4\n\n\
         [[agent]]\nname = \"clerk\"\ncapabilities = [\"file\"]\nprovider = \"offline\"\ntools = [\"memory_put\", \"delegate\"]\n\
         system_prompt = \"You file.\"\nconcurrency = 4\n\n\
         [[agent]]\nname = \"helper\"\ncapabilities = [\"help\"]\nprovider = \"offline\"\nsystem_prompt = \"You help.\"\nconcurrency = 4\n",
        stub.openai_base()
    )
}

/// The `flotilla` CLI as this fleet's auditor (read-only), when authentication is on.
async fn as_auditor(sys: &System, args: &[&str]) -> (i32, String, String) {
    let mut all: Vec<String> = Vec::new();
    if let Some(dir) = sys.server.auth_dir(sys.names.prefix().as_str()) {
        let d = flotilla_service::auth::AuthDir::open(&dir).unwrap();
        all.extend(["--creds".to_owned(), d.creds_path("auditor").display().to_string()]);
    }
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    cli(sys.server.url(), &refs).await
}

async fn wait_finished(sys: &System, ids: &[String]) {
    for id in ids {
        eventually(Duration::from_secs(60), "the task to finish", || async {
            sys.task(id).await.filter(|r| matches!(r.state, TaskState::Completed | TaskState::Failed))
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recorded_tasks_replay_and_rerun_identically_without_calling_the_model() {
    let stub = StubLlm::start(Vec::new()).await;
    stub.set_fallback(Reply::openai_text("no script left", 1, 1));
    let mut sys = System::with_dispatcher().await;
    sys.start_runner_configured("ra", &fleet(&stub), runner_config("ra"), registry(42)).await;
    sys.wait_for_agents("ra", 3).await;

    // 20 tasks on the stub (a pure tool, then a side effect, then the answer), 20 offline tasks
    // that write shared memory, 10 that delegate to a helper.
    let mut ids = Vec::new();
    for i in 0..20 {
        stub.push([
            Reply::openai_tools(&[("quote", json!({ "symbol": format!("S{i}") }))], 30, 5),
            Reply::openai_tools(
                &[("memory_put", json!({ "key": format!("trade.{i}"), "value": 42 }))],
                40,
                5,
            ),
            Reply::openai_text(&format!("S{i} bought at 42"), 50, 6),
        ]);
        let id = format!("tr-{i}");
        sys.submit(&TaskSubmission {
            id: Some(id.clone()),
            capability: "trade".into(),
            input: json!(format!("buy S{i}")),
            ..Default::default()
        })
        .await;
        // One at a time: the stub's script is one queue.
        wait_finished(&sys, std::slice::from_ref(&id)).await;
        ids.push(id);
    }
    for i in 0..30 {
        let call = if i < 20 {
            json!({ "name": "memory_put", "arguments": { "key": format!("filed.{i}"), "value": i } })
        } else {
            json!({ "name": "delegate", "arguments": { "capability": "help", "input": format!("part {i}") } })
        };
        let id = format!("cl-{i}");
        sys.submit(&TaskSubmission {
            id: Some(id.clone()),
            capability: "file".into(),
            input: json!({ "text": format!("file {i}"), "_offline": { "tool_calls": [call] } }),
            ..Default::default()
        })
        .await;
        ids.push(id);
    }
    wait_finished(&sys, &ids).await;
    for id in &ids {
        assert_eq!(sys.task(id).await.unwrap().state, TaskState::Completed, "{id}");
    }

    // The story of one task, as text.
    let (code, text, err) = as_auditor(&sys, &["replay", "tr-3"]).await;
    assert_eq!(code, 0, "{text}{err}");
    for expected in [
        "task tr-3",
        "accepted",
        "assigned attempt 1 → ra-trader-0 (because:",
        "started attempt 1",
        "transcripts#",
        "tool attempt 1 step 1 (run",
        "quote(",
        "memory_put(",
        "completed attempt 1",
        "S3 bought at 42",
        "transcript: 5 entries in 1 run(s)",
    ] {
        assert!(text.contains(expected), "{expected:?} missing from\n{text}");
    }
    // A delegation tree: the parent and its child, each told.
    let (code, tree, err) = as_auditor(&sys, &["replay", "cl-25", "--tree"]).await;
    assert_eq!(code, 0, "{tree}{err}");
    assert!(
        tree.contains("children: cl-25-s1c0")
            && tree.contains("task cl-25-s1c0")
            && tree.contains("child of cl-25"),
        "{tree}"
    );
    // JSON lines: one record per line, each with its stream and sequence.
    let (code, lines, _) = as_auditor(&sys, &["replay", "tr-3", "--jsonl"]).await;
    assert_eq!(code, 0);
    let records: Vec<Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(records.iter().all(|r| r["seq"].as_u64().is_some() && r["stream"].is_string()));
    assert_eq!(records.iter().filter(|r| r["record_type"] == "transcript").count(), 5);

    // Every task re-runs identically, and the model is not asked anything.
    let asked_before = stub.requests().len();
    let mut identical = 0;
    for id in &ids {
        let (code, out, err) = as_auditor(&sys, &["replay", id, "--rerun", "--json"]).await;
        assert_eq!(code, 0, "{id}: {out}{err}");
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        let r = &v["reruns"][0];
        assert_eq!(r["identical"], true, "{id}: {r}");
        assert_eq!(r["model_calls"], 0);
        identical += 1;
    }
    assert_eq!(identical, 50);
    assert_eq!(stub.requests().len(), asked_before, "the re-runs asked the model nothing");

    // The tool's code changed: the re-run finds the first step whose result differs.
    let mut loader = Loader::new(Source::Live(Box::new(sys.fleet().clone())));
    let h = loader.load("tr-5", false).await.unwrap();
    let recording = flotilla_audit::rerun::recording(&h).unwrap();
    let template = template_of(&recording).unwrap();
    let same = rerun(&template, &registry(42), &recording, &Against::Recorded).await;
    assert!(same.identical, "{same:?}");
    assert_eq!(same.tools_executed, 1, "the pure tool ran again");
    let changed = rerun(&template, &registry(43), &recording, &Against::Recorded).await;
    assert!(!changed.identical);
    let d = changed.divergence.unwrap();
    assert_eq!((d.step, d.what.as_str()), (1, "tool_result"), "{d:?}");
    assert!(
        d.recorded["result"].as_str().unwrap().contains("42")
            && d.rerun["result"].as_str().unwrap().contains("43"),
        "{d:?}"
    );
    let seq = d.seq.unwrap();
    assert_eq!(
        h.transcript.iter().find(|t| t.seq == seq).unwrap().item.kind,
        "tool",
        "the divergence names its entry"
    );

    // Against a live model that now answers differently: the divergence at its step.
    let other =
        StubLlm::start(vec![Reply::openai_tools(&[("quote", json!({ "symbol": "OTHER" }))], 30, 5)]).await;
    let (code, out, err) =
        as_auditor(&sys, &["replay", "tr-7", "--rerun", "--model", &other.openai_base()]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("DIVERGED at step 1 in the decision") && out.contains("OTHER") && out.contains("S7"),
        "{out}"
    );
    assert_eq!(other.requests().len(), 1);
}
