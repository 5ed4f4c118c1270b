//! Deadlocks, formed for real and found by the monitor's wait-for graph: a two-agent message
//! cycle, delegation cycles of 3 and of 16 tasks (over three runner processes), and a starvation
//! knot. Each is raised within a second of forming (measured from the last wait that closed it to
//! the alert's time), named, counted on `/metrics`, and broken — the youngest waiter failed with
//! `deadlock` — or, with breaking off, only reported until its waits end at the deadline.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use flotilla_protocol::{AlertEvent, TaskState, TaskSubmission};
use flotilla_testkit::stub_llm::{Reply, StubLlm};
use flotilla_testkit::{eventually, http_get};
use serde_json::json;

use crate::support::*;

/// Every deadlock alert so far.
async fn deadlock_alerts(sys: &System) -> Vec<AlertEvent> {
    sys.read_stream(&sys.names.events_stream(), &sys.names.alert_event_subject("deadlock"))
        .await
        .iter()
        .map(|(_, p)| flotilla_protocol::decode(None, p).unwrap())
        .collect()
}

async fn wait_for_alert(sys: &System, state: &str, n: usize) -> Vec<AlertEvent> {
    eventually(Duration::from_secs(30), "the deadlock alert", || async {
        let found: Vec<AlertEvent> =
            deadlock_alerts(sys).await.into_iter().filter(|a| a.state == state).collect();
        (found.len() >= n).then_some(found)
    })
    .await
}

/// How long after the deadlock formed it was raised.
fn detection_ms(a: &AlertEvent) -> u64 {
    let d = a.deadlock.as_ref().unwrap();
    a.at_ms.saturating_sub(d.formed_at_ms)
}

async fn wait_final(sys: &System, id: &str) -> flotilla_protocol::TaskRecord {
    eventually(Duration::from_secs(60), &format!("task {id} to finish"), || async {
        sys.task(id).await.filter(|r| matches!(r.state, TaskState::Completed | TaskState::Failed))
    })
    .await
}

/// One agent of template `t<i>` serving `c<i>` on the stub model, delegating.
fn chain_template(i: usize, stub: &StubLlm) -> String {
    format!(
        "[[agent]]\nname = \"t{i}\"\ncapabilities = [\"c{i}\"]\ntools = [\"delegate\"]\nconcurrency = 1\n\
         provider = \"openai\"\nmodel = \"stub-model\"\nbase_url = \"{}\"\n\n",
        stub.openai_base()
    )
}

/// Runs a delegation cycle of `n` tasks from `root` (of `c0`): the stub model's next `n` answers
/// delegate along `c1`, `c2`, ... `c<n-1>` and back to `c0`, whose only agent the root holds (the
/// chain is strictly sequential, so the answers go in that order); every later answer is text.
/// Returns the alert that fired.
async fn delegation_cycle(
    sys: &System,
    stub: &StubLlm,
    metrics: std::net::SocketAddr,
    root: &str,
    n: usize,
    seen: usize,
) -> AlertEvent {
    stub.push((1..=n).map(|k| {
        let args = json!({ "capability": format!("c{}", k % n), "input": format!("level {k}") });
        Reply::openai_tools(&[("delegate", args)], 10, 5)
    }));
    sys.submit(&TaskSubmission {
        id: Some(root.into()),
        capability: "c0".into(),
        input: json!("start the chain"),
        ..Default::default()
    })
    .await;
    let alert = wait_for_alert(sys, "firing", seen + 1).await.pop().unwrap();
    let d = alert.deadlock.clone().unwrap();
    // The n delegating tasks and the child queued behind the root.
    assert_eq!(d.tasks.len(), n + 1, "{d:?}");
    assert!(d.tasks.iter().all(|t| t.starts_with(root)), "{d:?}");
    assert_eq!(d.agents.len(), n, "{d:?}");
    // The youngest waiter is the deepest delegating task.
    let deepest = (1..n).fold(root.to_owned(), |id, _| format!("{id}-s1c0"));
    assert_eq!(d.victim.as_deref(), Some(deepest.as_str()), "{d:?}");
    let victim = wait_final(sys, &deepest).await;
    assert_eq!(victim.state, TaskState::Failed);
    assert_eq!(victim.error.as_ref().unwrap().code, "deadlock", "{victim:?}");
    // Broken: the rest of the chain unwinds, and the root completes.
    let root_rec = wait_final(sys, root).await;
    assert_eq!(root_rec.state, TaskState::Completed, "{root_rec:?}");
    wait_for_alert(sys, "resolved", seen + 1).await;
    let want = format!("flotilla_deadlocks_total {}", seen + 1);
    eventually(Duration::from_secs(10), "the deadlock counted", || async {
        http_get(metrics, "/metrics").await.contains(&want).then_some(())
    })
    .await;
    alert
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delegation_cycles_of_3_and_of_16_tasks_over_three_runner_processes_are_found_and_broken() {
    let mut sys = System::with_dispatcher().await;
    let metrics = sys.start_monitor().await;
    let stub = StubLlm::start(Vec::new()).await;
    stub.set_fallback(Reply::openai_text("done", 10, 5));
    // Sixteen templates, one agent each, spread over three runner processes.
    let mut runners = Vec::new();
    for (r, range) in [("ra", 0..6), ("rb", 6..11), ("rc", 11..16)] {
        let fleet: String = range.clone().map(|i| chain_template(i, &stub)).collect();
        runners.push(sys.spawn_runner_process(r, &fleet));
        sys.wait_for_agents(r, range.len()).await;
    }
    let mut times = Vec::new();
    let three = delegation_cycle(&sys, &stub, metrics, "three", 3, 0).await;
    times.push(detection_ms(&three));
    let sixteen = delegation_cycle(&sys, &stub, metrics, "sixteen", 16, 1).await;
    times.push(detection_ms(&sixteen));
    let d = sixteen.deadlock.unwrap();
    assert!(
        ["ra-", "rb-", "rc-"].iter().all(|r| d.agents.iter().any(|a| a.starts_with(r))),
        "the cycle spans the three processes: {:?}",
        d.agents
    );
    println!("deadlock detection: {times:?} ms after forming");
    assert!(times.iter().all(|t| *t <= 1000), "detected within 1 s: {times:?}");
    for mut r in runners {
        r.kill9();
    }
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_two_agent_message_cycle_is_found_and_its_youngest_waiter_failed() {
    let mut sys = System::with_dispatcher().await;
    let metrics = sys.start_monitor().await;
    let fleet = "[[agent]]\nname = \"alpha\"\ncapabilities = [\"alpha\"]\ntools = [\"send_message\"]\nconcurrency = 1\n\n\
                 [[agent]]\nname = \"beta\"\ncapabilities = [\"beta\"]\ntools = [\"send_message\"]\nconcurrency = 1\n";
    sys.start_runner("r1", fleet).await;
    sys.wait_for_agents("r1", 2).await;
    // Each thinks for a moment (so both hold their agent), then asks the other and waits.
    let ask = |who: &str, to: &str, sleep_ms: u64| TaskSubmission {
        id: Some(format!("ask-{who}")),
        capability: who.into(),
        input: json!({ "text": format!("{who} asks"), "_offline": { "sleep_ms": sleep_ms, "tool_calls": [
            { "name": "send_message", "arguments": { "agent": to, "message": "what do you think?", "wait_reply": true, "timeout_s": 120 } }
        ] } }),
        ..Default::default()
    };
    sys.submit(&ask("alpha", "r1-beta-0", 400)).await;
    sys.submit(&ask("beta", "r1-alpha-0", 700)).await;
    let alert = wait_for_alert(&sys, "firing", 1).await.pop().unwrap();
    let d = alert.deadlock.clone().unwrap();
    assert_eq!(d.tasks, ["ask-alpha", "ask-beta"], "{d:?}");
    assert_eq!(d.messages.len(), 2, "{d:?}");
    assert_eq!(d.agents, ["r1-alpha-0", "r1-beta-0"], "{d:?}");
    // beta began to wait last.
    assert_eq!(d.victim.as_deref(), Some("ask-beta"));
    assert!(detection_ms(&alert) <= 1000, "{} ms", detection_ms(&alert));
    let beta = wait_final(&sys, "ask-beta").await;
    assert_eq!((beta.state, beta.error.unwrap().code.as_str()), (TaskState::Failed, "deadlock"));
    // beta's agent is free again: it answers alpha, whose task completes with the reply.
    let alpha = wait_final(&sys, "ask-alpha").await;
    assert_eq!(alpha.state, TaskState::Completed, "{alpha:?}");
    wait_for_alert(&sys, "resolved", 1).await;
    let text = http_get(metrics, "/metrics").await;
    assert!(text.contains("flotilla_deadlocks_total 1"), "{text}");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_starvation_knot_is_reported_and_with_breaking_off_ends_at_the_parents_deadline() {
    let mut sys = System::with_dispatcher().await;
    let config = flotilla_monitor::Config {
        alerts: flotilla_monitor::alerts::Thresholds { break_deadlocks: false, ..Default::default() },
        ..Default::default()
    };
    sys.start_monitor_configured("monitor-1", config).await;
    // Every agent of `plan` is a parent waiting on a child that needs `plan`.
    let fleet = "[[agent]]\nname = \"planner\"\ncapabilities = [\"plan\"]\ntools = [\"delegate\"]\nconcurrency = 1\nreplicas = 2\n";
    sys.start_runner("r1", fleet).await;
    sys.wait_for_agents("r1", 2).await;
    let deadline = flotilla_protocol::time::now_ms() + 8_000;
    for p in ["plan-a", "plan-b"] {
        sys.submit(&TaskSubmission {
            id: Some(p.into()),
            capability: "plan".into(),
            deadline: Some(flotilla_protocol::TimeSpec::Millis(deadline)),
            max_attempts: Some(1),
            input: json!({ "text": p, "_offline": { "sleep_ms": 300, "tool_calls": [
                { "name": "delegate", "arguments": { "capability": "plan", "input": { "text": "a detail" } } }
            ] } }),
            ..Default::default()
        })
        .await;
    }
    let alert = wait_for_alert(&sys, "firing", 1).await.pop().unwrap();
    let d = alert.deadlock.clone().unwrap();
    assert_eq!(d.tasks, ["plan-a", "plan-a-s1c0", "plan-b", "plan-b-s1c0"], "{d:?}");
    assert_eq!(d.victim, None, "breaking is off: only reported");
    assert!(detection_ms(&alert) <= 1000, "{} ms", detection_ms(&alert));
    // The delegation waits end at the parents' deadline; the knot with them.
    for p in ["plan-a", "plan-b"] {
        let r = wait_final(&sys, p).await;
        assert_eq!((r.state, r.error.unwrap().code.as_str()), (TaskState::Failed, "deadline_exceeded"));
    }
    wait_for_alert(&sys, "resolved", 1).await;
    assert_eq!(deadlock_alerts(&sys).await.iter().filter(|a| a.state == "firing").count(), 1);
    sys.stop().await;
}
