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
         [[agent]]\nname = \"helper\"\ncapabilities = [\"help\"]\nprovider = \"offline\"\nsystem_prompt = \"You help.\"\nconcurrency = 4\n\
         transcripts = false\n",
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
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut left: Vec<String> = ids.to_vec();
    while !left.is_empty() {
        let mut still = Vec::new();
        for id in left {
            let done = sys
                .task(&id)
                .await
                .is_some_and(|r| matches!(r.state, TaskState::Completed | TaskState::Failed));
            if !done {
                still.push(id);
            }
        }
        left = still;
        if left.is_empty() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let mut why = String::new();
            for id in &left {
                let r = sys.task(id).await;
                let kinds: Vec<String> = sys
                    .events()
                    .await
                    .iter()
                    .filter(|e| &e.task_id == id)
                    .map(|e| format!("{}@{:?}", e.kind, e.attempt))
                    .collect();
                why.push_str(&format!(
                    "\n{id}: {:?} attempt {:?} agent {:?}; events {kinds:?}",
                    r.as_ref().map(|r| r.state),
                    r.as_ref().map(|r| r.attempt),
                    r.as_ref().and_then(|r| r.agent_id.clone())
                ));
            }
            panic!("tasks did not finish in 60 s:{why}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
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
    // The helper's template records no transcript: its story says so, and a re-run has nothing
    // to take.
    assert!(tree.contains("transcript: not recorded (its template records none"), "{tree}");
    let (code, out, err) = as_auditor(&sys, &["replay", "cl-25-s1c0", "--rerun"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("nothing recorded to re-run"), "{out}{err}");
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

fn offline(id: &str, capability: &str, input: Value) -> TaskSubmission {
    TaskSubmission { id: Some(id.to_owned()), capability: capability.into(), input, ..Default::default() }
}

/// 200 tasks of every kind on two runner processes, one killed with `kill -9` mid-run.
async fn mixed_run(sys: &mut System) -> Vec<String> {
    sys.start_budget_keeper().await;
    let fleet = "[[agent]]\nname = \"worker\"\ncapabilities = [\"work\"]\nprovider = \"offline\"\n\
                 tools = [\"memory_put\", \"delegate\", \"send_message\", \"ask_human\"]\nconcurrency = 8\nreplicas = 2\n\n\
                 [[agent]]\nname = \"helper\"\ncapabilities = [\"help\"]\nprovider = \"offline\"\nconcurrency = 8\n";
    let (mut a, _b) = sys.two_runner_processes(fleet, 3).await;
    let call = |name: &str, arguments: Value| json!([{ "name": name, "arguments": arguments }]);
    let mut ids = Vec::new();
    for i in 0..196 {
        let id = format!("mx-{i}");
        let mut sub = match i % 7 {
            0 => offline(
                &id,
                "work",
                json!({ "text": id, "_offline": { "tool_calls": call("memory_put", json!({ "key": format!("mx.{i}"), "value": i })) } }),
            ),
            1 => offline(
                &id,
                "work",
                json!({ "text": id, "_offline": { "tool_calls": call("delegate", json!({ "capability": "help", "input": format!("sub {i}") })) } }),
            ),
            2 => offline(
                &id,
                "work",
                json!({ "text": id, "_offline": { "tool_calls": call("send_message", json!({ "template": "helper", "message": format!("note {i}") })) } }),
            ),
            3 => offline(&id, "work", json!({ "text": id, "_offline": { "fail_attempts": 1 } })),
            _ => offline(&id, "work", json!({ "text": id, "_offline": { "sleep_ms": 150 } })),
        };
        if i % 5 == 0 {
            sub.budget_tokens = Some(5_000);
        }
        sys.submit(&sub).await;
        ids.push(id);
        if i == 80 {
            // Runner ra dies with work in hand; rb takes its agents' tasks over.
            tokio::time::sleep(Duration::from_millis(100)).await;
            a.kill9();
        }
    }
    // A task cancelled while its model thinks, one a human approves, one rejected.
    sys.submit(&offline("mx-cancel", "work", json!({ "text": "slow", "_offline": { "sleep_ms": 20_000 } })))
        .await;
    let ask = |q: &str| json!({ "text": q, "_offline": { "tool_calls": [{ "name": "ask_human", "arguments": { "question": q } }] } });
    sys.submit(&offline("mx-approve", "work", ask("ship it?"))).await;
    sys.submit(&offline("mx-reject", "work", ask("drop it?"))).await;
    sys.submit(&TaskSubmission {
        id: Some("mx-bad".into()),
        capability: "nothing-serves-this".into(),
        ..Default::default()
    })
    .await;
    ids.extend(["mx-cancel", "mx-approve", "mx-reject"].map(str::to_owned));
    eventually(Duration::from_secs(30), "mx-cancel to run", || async {
        sys.task("mx-cancel").await.filter(|r| r.state == TaskState::Running)
    })
    .await;
    let url = sys.server.url().to_owned();
    assert_eq!(cli(&url, &["cancel", "mx-cancel"]).await.0, 0);
    for (id, verb) in [("mx-approve", "approve"), ("mx-reject", "reject")] {
        let (code, out, err) = eventually(Duration::from_secs(30), "the approval request", || async {
            let r = cli(&url, &[verb, id]).await;
            (r.0 == 0).then_some(r)
        })
        .await;
        assert_eq!(code, 0, "{out}{err}");
    }
    wait_finished(sys, &ids).await;
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mixed_run_verifies_clean_and_tampering_is_named_exactly() {
    let mut sys = System::with_dispatcher().await;
    let ids = mixed_run(&mut sys).await;
    let requeued = sys.events().await.iter().filter(|e| e.kind == "requeued").count();
    assert!(requeued > 0, "the kill cut some tasks off");
    // Let the settle time pass and every interrupted reservation be charged.
    tokio::time::sleep(Duration::from_secs(4)).await;

    let (code, out, err) = as_auditor(&sys, &["audit", "verify"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("0 discrepancies"), "{out}");
    let (_, json_out, _) = as_auditor(&sys, &["--json", "audit", "verify"]).await;
    let summary: Value = serde_json::from_str(json_out.trim()).unwrap();
    assert_eq!(
        summary["tasks"].as_u64().unwrap(),
        ids.len() as u64 + 1 + 28,
        "every task, the rejected one and the children: {summary}"
    );
    assert!(summary["scopes_compared"].as_u64().unwrap() > 0, "{summary}");

    // The export verifies, and a changed byte or a removed line is found at its line.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit.jsonl");
    let file_s = file.to_str().unwrap();
    let (code, out, err) = as_auditor(&sys, &["audit", "export", "--out", file_s]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = as_auditor(&sys, &["audit", "verify", "--export", file_s]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("hash chain verifies") && out.contains("0 discrepancies"), "{out}");
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let k = lines
        .iter()
        .position(|l| l.contains("\"subject\":\"flotilla.events.task.default.mx-9.completed\""))
        .unwrap();
    let changed: Vec<String> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| if i == k { l.replacen("mx-9", "mx-8", 1) } else { (*l).to_owned() })
        .collect();
    let bad = dir.path().join("changed.jsonl");
    std::fs::write(&bad, changed.join("\n") + "\n").unwrap();
    let (code, out, _) = as_auditor(&sys, &["audit", "verify", "--export", bad.to_str().unwrap()]).await;
    assert_eq!(code, 1);
    assert!(out.contains(&format!("line {}: its hash does not match", k + 1)), "{out}");
    let mut removed = lines.clone();
    removed.remove(k);
    std::fs::write(&bad, removed.join("\n") + "\n").unwrap();
    let (code, out, _) = as_auditor(&sys, &["audit", "verify", "--export", bad.to_str().unwrap()]).await;
    assert_eq!(code, 1);
    assert!(out.contains(&format!("line {}: the chain is broken", k + 1)), "{out}");

    // From the export alone, on a server that has none of this fleet's streams: the same story,
    // and a re-run that is identical.
    let scratch = flotilla_testkit::NatsServer::start();
    let (code, live, _) = as_auditor(&sys, &["--json", "replay", "mx-1", "--tree"]).await;
    assert_eq!(code, 0);
    let (code, exported, err) =
        cli(scratch.url(), &["--json", "replay", "mx-1", "--tree", "--from", file_s]).await;
    assert_eq!(code, 0, "{exported}{err}");
    let (live, exported): (Value, Value) =
        (serde_json::from_str(live.trim()).unwrap(), serde_json::from_str(exported.trim()).unwrap());
    for part in ["events", "transcript", "messages", "ledger", "child_ids"] {
        assert_eq!(live[part], exported[part], "{part}");
    }
    assert_eq!(live["children"][0]["events"], exported["children"][0]["events"]);
    let (code, out, err) =
        cli(scratch.url(), &["replay", "mx-1", "--tree", "--rerun", "--from", file_s]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.matches("identical: every step").count(), 2, "{out}");

    // One record edited in the bucket, one entry written into the ledger that does not do what
    // it says: verify names exactly those two.
    let tasks = sys.js.get_key_value(sys.names.tasks_bucket()).await.unwrap();
    let (mut rec, _) =
        sys.fleet().kv_get::<flotilla_protocol::TaskRecord>(&tasks, "mx-12").await.unwrap().unwrap();
    rec.output = Some(json!({ "answer": "something else", "model": "", "steps": 1 }));
    sys.fleet().kv_put(&tasks, "mx-12", &rec).await.unwrap();
    let ledger = sys.read_stream(&sys.names.ledger_stream(), &sys.names.ledger_subject("commit")).await;
    // A copy of a real call's commit (not an interrupted call's), claiming another charge.
    let mut forged: Value = ledger
        .iter()
        .rev()
        .map(|(_, p)| flotilla_protocol::codec::decode::<Value>(None, p).unwrap())
        .find(|e| e["request"]["prompt_tokens"].as_u64().is_some_and(|p| p > 0))
        .unwrap();
    forged["reply"]["charged"] = json!(99_999);
    let ack = sys
        .js
        .publish(
            sys.names.ledger_subject("commit"),
            flotilla_protocol::codec::encode(flotilla_protocol::WireFormat::Msgpack, &forged).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let (code, out, err) = as_auditor(&sys, &["--json", "audit", "verify"]).await;
    assert_eq!(code, 1, "{out}{err}");
    let found: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let found = found["discrepancies"].as_array().unwrap();
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(found.iter().any(|d| d["kind"] == "record" && d["task"] == "mx-12"), "{found:#?}");
    let at = format!("{}#{}", sys.names.ledger_stream(), ack.sequence);
    assert!(found.iter().any(|d| d["kind"] == "ledger" && d["at"] == at.as_str()), "{found:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fleet_at_a_time_is_rebuilt_as_it_was() {
    let mut sys = System::with_dispatcher().await;
    sys.start_budget_keeper().await;
    let fleet = "[[agent]]\nname = \"slow\"\ncapabilities = [\"slow\"]\nprovider = \"offline\"\nconcurrency = 2\n\n\
                 [[agent]]\nname = \"idle\"\ncapabilities = [\"idle\"]\nprovider = \"offline\"\n";
    sys.start_runner_configured(
        "rs",
        fleet,
        flotilla_agent_runner::Config { budgets: true, ..runner_config("rs") },
        Registry::with_builtins().unwrap(),
    )
    .await;
    sys.wait_for_agents("rs", 2).await;
    let quick: Vec<String> = (0..3).map(|i| format!("q-{i}")).collect();
    for id in &quick {
        sys.submit(&offline(id, "slow", json!({ "text": id }))).await;
    }
    wait_finished(&sys, &quick).await;
    let ids: Vec<String> = (0..5).map(|i| format!("st-{i}")).collect();
    for id in &ids {
        let mut sub = offline(id, "slow", json!({ "text": id, "_offline": { "sleep_ms": 4_000 } }));
        sub.budget_tokens = Some(2_000);
        sys.submit(&sub).await;
    }
    eventually(Duration::from_secs(20), "two running", || async {
        let mut running = 0;
        for id in &ids {
            running += usize::from(sys.task(id).await.is_some_and(|r| r.state == TaskState::Running));
        }
        (running == 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The snapshot at T: records, registry, budgets, as a client sees them.
    let at = flotilla_protocol::time::now_ms();
    let mut running = Vec::new();
    let mut queued = Vec::new();
    for id in &ids {
        let r = sys.task(id).await.unwrap();
        match r.state {
            TaskState::Running => running.push((id.clone(), r.agent_id.clone().unwrap())),
            TaskState::Queued => queued.push(id.clone()),
            other => panic!("{id} is {other}"),
        }
    }
    let agents = sys.js.get_key_value(sys.names.agents_bucket()).await.unwrap();
    let mut in_flight = std::collections::BTreeMap::new();
    for agent in ["rs-slow-0", "rs-idle-0"] {
        let (a, _) =
            sys.fleet().kv_get::<flotilla_protocol::AgentRecord>(&agents, agent).await.unwrap().unwrap();
        in_flight.insert(agent.to_owned(), a.in_flight as usize);
    }
    let client = flotilla_service::budget::Client::new(sys.fleet().clone());
    let mut budgets = std::collections::BTreeMap::new();
    for scope in ["tenant.default", "agent.rs-slow-0"]
        .iter()
        .map(|s| (*s).to_owned())
        .chain(ids.iter().map(|i| format!("task.{i}")))
    {
        let show = flotilla_protocol::ShowRequest { scope: Some(scope.clone()), ..Default::default() };
        if let Ok(r) = client.call(&show).await {
            let b = r.budget.unwrap();
            budgets.insert(scope, (b.used, b.held, b.limit_tokens));
        }
    }
    // A queued task followed live: the story so far, then each record as it is stored, until
    // it ends.
    let last = queued.last().unwrap().clone();
    let follow = {
        let url = sys.server.url().to_owned();
        let creds = sys.server.auth_dir(sys.names.prefix().as_str()).map(|d| {
            flotilla_service::auth::AuthDir::open(&d).unwrap().creds_path("auditor").display().to_string()
        });
        tokio::spawn(async move {
            let mut args = vec!["replay".to_owned(), last, "--follow".to_owned()];
            if let Some(c) = creds {
                args.extend(["--creds".to_owned(), c]);
            }
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            cli(&url, &refs).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    wait_finished(&sys, &ids).await;
    let (code, followed, err) = tokio::time::timeout(Duration::from_secs(20), follow).await.unwrap().unwrap();
    assert_eq!(code, 0, "{followed}{err}");
    let (before, after) =
        followed.split_once("  not finished: last event").unwrap_or_else(|| panic!("{followed}"));
    assert!(before.contains("task st-"), "{followed}");
    assert!(after.contains("started attempt 1"), "{followed}");
    assert!(
        after.lines().last().unwrap().contains("completed attempt 1"),
        "it ends with the task: {followed}"
    );

    let (code, out, err) = as_auditor(&sys, &["--json", "audit", "state", "--at", &at.to_string()]).await;
    assert_eq!(code, 0, "{out}{err}");
    let state: Value = serde_json::from_str(out.trim()).unwrap();
    let mut rebuilt_running: Vec<(String, String)> = state["running"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["task_id"].as_str().unwrap().to_owned(), t["agent_id"].as_str().unwrap().to_owned()))
        .collect();
    rebuilt_running.sort();
    running.sort();
    assert_eq!(rebuilt_running, running);
    let mut rebuilt_queued: Vec<String> = state["queued"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task_id"].as_str().unwrap().to_owned())
        .collect();
    rebuilt_queued.sort();
    assert_eq!(rebuilt_queued, queued);
    assert_eq!(state["completed"], 3);
    for (agent, n) in &in_flight {
        assert_eq!(state["agents"][agent]["running"].as_array().unwrap().len(), *n, "{agent}: {state}");
    }
    let rebuilt: std::collections::BTreeMap<String, (u64, u64, Option<u64>)> = state["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["scope"].as_str().unwrap().to_owned(),
                (b["used"].as_u64().unwrap(), b["held"].as_u64().unwrap(), b["limit_tokens"].as_u64()),
            )
        })
        .collect();
    assert!(!budgets.is_empty());
    for (scope, want) in &budgets {
        assert_eq!(rebuilt.get(scope), Some(want), "{scope}");
    }
    // Before anything was stored: said so.
    let (code, out, _) = as_auditor(&sys, &["audit", "state", "--at", "1000"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("is older than the oldest event the streams keep"), "{out}");
}
