//! Retries and endings: an attempt that fails with a retryable error runs again (its failure kept
//! in the record's history), the last one dead-letters the task with every attempt, a
//! non-retryable failure ends it at once; `flotilla cancel` ends a queued or a running task (the
//! runner stops the attempt and its agent takes new work), and a deadline stops a running task.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use crate::support::*;
use flotilla_protocol::{DeadLetter, DurationSpec, TaskEvent, TaskRecord, TaskState, TaskSubmission, codec};
use flotilla_testkit::{bin, eventually};

/// Builds the CLI before the clock starts (the first `bin` call of a test process runs cargo).
async fn cli_built() {
    tokio::task::spawn_blocking(|| bin("flotilla")).await.unwrap();
}

fn task(id: &str, offline: serde_json::Value, max_attempts: Option<u32>) -> TaskSubmission {
    TaskSubmission {
        id: Some(id.into()),
        capability: "work".into(),
        input: serde_json::json!({ "text": id, "_offline": offline }),
        max_attempts,
        ..Default::default()
    }
}

/// A fleet with a dispatcher and one runner `runner` hosting one agent that runs one task at a
/// time.
async fn fleet(runner: &str) -> System {
    let mut sys = System::with_dispatcher().await;
    sys.start_runner(runner, &worker_fleet(1, 1)).await;
    sys.wait_for_agents(runner, 1).await;
    sys
}

fn of<'a>(events: &'a [TaskEvent], task: &str, kind: &str) -> Vec<&'a TaskEvent> {
    events.iter().filter(|e| e.task_id == task && e.kind == kind).collect()
}

/// Waits for the first event of `kind` of `task`.
async fn event(sys: &System, task: &str, kind: &str, timeout: Duration) -> TaskEvent {
    eventually(timeout, &format!("{kind} of {task}"), || async {
        sys.events().await.into_iter().find(|e| e.task_id == task && e.kind == kind)
    })
    .await
}

async fn dead_letters(sys: &System) -> Vec<DeadLetter> {
    sys.read_stream(&sys.names.deadletter_stream(), &sys.names.deadletter_all())
        .await
        .into_iter()
        .map(|(_, p)| codec::decode(None, &p).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retryable_failure_runs_the_task_again() {
    let sys = fleet("rr").await;
    sys.submit(&task("flaky", serde_json::json!({ "fail_attempts": 1 }), Some(3))).await;

    let done = event(&sys, "flaky", "completed", Duration::from_secs(60)).await;
    assert_eq!(done.attempt, Some(2), "completed on the second attempt");
    let events = sys.events().await;
    let retrying = of(&events, "flaky", "retrying");
    assert_eq!(retrying.len(), 1, "{retrying:?}");
    assert_eq!(retrying[0].attempt, Some(1));
    assert_eq!(retrying[0].agent_id.as_deref(), Some("rr-worker-0"));
    assert_eq!(retrying[0].error.as_ref().unwrap().code, "model_error");
    assert_eq!(of(&events, "flaky", "completed").len(), 1, "completed exactly once");
    assert!(of(&events, "flaky", "failed").is_empty());

    let rec = sys.task("flaky").await.unwrap();
    assert_eq!(rec.state, TaskState::Completed);
    assert_eq!((rec.attempt, rec.max_attempts), (2, 3));
    assert_eq!(rec.error, None, "the error of the first attempt stays in the history only");
    assert_eq!(rec.attempts.len(), 1, "{:?}", rec.attempts);
    let first = &rec.attempts[0];
    assert_eq!(first.attempt, 1);
    assert_eq!(first.error.code, "model_error");
    assert_eq!(first.runner_id.as_deref(), Some("rr"));
    assert!(first.started_at_ms.is_some_and(|s| s <= first.finished_at_ms));
    assert!(dead_letters(&sys).await.is_empty());
    assert_eq!(sys.health("agent-runner", "rr").await.details["retried"], 1);
    // The dispatcher held the retry for its backoff (retry_base_delay, 1 s) before assigning it.
    let second = of(&events, "flaky", "assigned").into_iter().find(|e| e.attempt == Some(2)).unwrap();
    assert!(
        second.at_ms >= first.finished_at_ms + 1000,
        "re-assigned {} ms after the failure",
        second.at_ms - first.finished_at_ms
    );
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deadline_fails_a_queued_task() {
    let sys = fleet("rq").await;
    // The only agent is busy for 5 s; the second task's 1 s deadline passes while it waits.
    sys.submit(&task("busy", serde_json::json!({ "sleep_ms": 5000 }), None)).await;
    event(&sys, "busy", "started", Duration::from_secs(10)).await;
    let t0 = Instant::now();
    sys.submit(&TaskSubmission {
        timeout: Some(DurationSpec::Text("1s".into())),
        ..task("late", serde_json::json!({}), None)
    })
    .await;
    let failed = event(&sys, "late", "failed", Duration::from_secs(10)).await;
    assert!(t0.elapsed() < Duration::from_secs(3), "failed promptly ({:?})", t0.elapsed());
    let error = failed.error.unwrap();
    assert_eq!(error.code, "deadline_exceeded");
    assert!(error.message.contains("queued"), "{}", error.message);
    let events = sys.events().await;
    assert!(of(&events, "late", "assigned").is_empty(), "it never started");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_retries_run_out_the_task_fails_with_a_dead_letter_of_every_attempt() {
    let sys = fleet("rx").await;
    sys.submit(&task("doomed", serde_json::json!({ "fail_attempts": 5 }), Some(2))).await;

    let failed = event(&sys, "doomed", "failed", Duration::from_secs(60)).await;
    assert_eq!(failed.attempt, Some(2));
    assert_eq!(failed.error.as_ref().unwrap().code, "model_error");
    let dead = eventually(Duration::from_secs(10), "the dead letter", || async {
        let dead = dead_letters(&sys).await;
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let dl = &dead[0];
    assert_eq!(dl.source, "agent-runner.retries");
    assert_eq!(dl.reason, "retries_exhausted");
    assert_eq!(dl.task_id.as_deref(), Some("doomed"));
    assert!(dl.message.contains("model_error"), "{}", dl.message);
    assert_eq!(dl.attempts.iter().map(|a| a.attempt).collect::<Vec<_>>(), [1, 2]);
    assert!(dl.attempts.iter().all(|a| a.error.code == "model_error"));
    assert_eq!(dl.subject, sys.names.task_event_subject("default", "doomed", "failed"));
    assert!(dl.payload_len > 0 && !dl.payload_base64.is_empty(), "the task record is the payload");

    // No third attempt, ever.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let events = sys.events().await;
    assert_eq!(of(&events, "doomed", "retrying").len(), 1);
    assert_eq!(of(&events, "doomed", "failed").len(), 1);
    assert!(of(&events, "doomed", "started").iter().all(|e| e.attempt <= Some(2)));
    let rec = sys.task("doomed").await.unwrap();
    assert_eq!((rec.state, rec.attempt), (TaskState::Failed, 2));
    assert_eq!(rec.attempts.len(), 2);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_non_retryable_failure_fails_the_task_at_once() {
    let sys = fleet("rn").await;
    let refused = serde_json::json!({ "fail_attempts": 1, "fail_code": "provider_refused" });
    sys.submit(&task("refused", refused, Some(3))).await;

    let failed = event(&sys, "refused", "failed", Duration::from_secs(30)).await;
    assert_eq!(failed.attempt, Some(1));
    assert_eq!(failed.error.as_ref().unwrap().code, "provider_refused");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = sys.events().await;
    assert!(of(&events, "refused", "retrying").is_empty());
    assert!(of(&events, "refused", "completed").is_empty());
    let rec = sys.task("refused").await.unwrap();
    assert_eq!((rec.state, rec.attempt), (TaskState::Failed, 1));
    assert_eq!(rec.attempts.len(), 1, "the failed attempt is in the history");
    assert_eq!(rec.attempts[0].error.code, "provider_refused");
    assert!(dead_letters(&sys).await.is_empty(), "no dead letter: nothing was retried");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queued_task_is_cancelled_before_it_starts() {
    cli_built().await;
    let sys = fleet("rq").await;
    let url = sys.server.url().to_owned();
    // The only agent is busy for a while, so the next task waits in the queue.
    sys.submit(&task("busy", serde_json::json!({ "sleep_ms": 3000 }), None)).await;
    event(&sys, "busy", "started", Duration::from_secs(30)).await;
    sys.submit(&task("waiting", serde_json::json!({}), None)).await;
    event(&sys, "waiting", "accepted", Duration::from_secs(30)).await;
    assert_eq!(sys.task("waiting").await.unwrap().state, TaskState::Queued);

    let (code, out, err) = cli(&url, &["--json", "cancel", "waiting", "--reason", "not needed"]).await;
    assert_eq!(code, 0, "cancel failed: {out}{err}");
    let rec: TaskRecord = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(rec.state, TaskState::Failed);
    let error = rec.error.unwrap();
    assert_eq!((error.code.as_str(), error.message.as_str()), ("cancelled", "not needed"));

    let failed = event(&sys, "waiting", "failed", Duration::from_secs(10)).await;
    assert_eq!(failed.error.unwrap().code, "cancelled");
    // The busy task finishes; the cancelled one never starts.
    event(&sys, "busy", "completed", Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = sys.events().await;
    assert!(of(&events, "waiting", "assigned").is_empty(), "the cancelled task was never assigned");
    assert!(of(&events, "waiting", "started").is_empty());
    assert_eq!(of(&events, "waiting", "failed").len(), 1);
    assert_eq!(sys.task("waiting").await.unwrap().error.unwrap().code, "cancelled");

    // A finished task cannot be cancelled (exit 1); an unknown one is not found (exit 3).
    let (code, _, err) = cli(&url, &["cancel", "busy"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("already completed"), "{err}");
    let (code, _, err) = cli(&url, &["cancel", "no-such-task"]).await;
    assert_eq!(code, 3, "{err}");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_running_task_is_cancelled_and_its_agent_takes_new_work() {
    cli_built().await;
    let sys = fleet("rk").await;
    let url = sys.server.url().to_owned();
    sys.submit(&task("long", serde_json::json!({ "sleep_ms": 20_000 }), None)).await;
    event(&sys, "long", "started", Duration::from_secs(30)).await;

    let t0 = Instant::now();
    let (code, out, err) = cli(&url, &["cancel", "long"]).await;
    assert_eq!(code, 0, "cancel failed: {out}{err}");
    assert!(out.contains("cancelled long (it was running)"), "{out}");
    let failed = event(&sys, "long", "failed", Duration::from_secs(5)).await;
    assert_eq!(failed.error.as_ref().unwrap().code, "cancelled");
    // Attributed to the operator whose signature the request carried.
    assert_eq!(failed.error.unwrap().message, "cancelled by test");
    assert_eq!(failed.actor.as_deref(), Some("test"));
    // The runner stopped the attempt (it counts it) ...
    eventually(Duration::from_secs(5), "the runner to stop the attempt", || async {
        (sys.health("agent-runner", "rk").await.details["cancelled"] == 1).then_some(())
    })
    .await;
    // ... and its only agent, which runs one task at a time, takes the next task at once.
    sys.submit(&task("next", serde_json::json!({}), None)).await;
    event(&sys, "next", "completed", Duration::from_secs(10)).await;
    assert!(t0.elapsed() < Duration::from_secs(15), "the agent waited for the cancelled work");

    let events = sys.events().await;
    assert!(of(&events, "long", "completed").is_empty(), "the cancelled attempt never completes");
    assert_eq!(of(&events, "long", "failed").len(), 1);
    let rec = sys.task("long").await.unwrap();
    assert_eq!(rec.state, TaskState::Failed);
    assert_eq!(rec.error.unwrap().code, "cancelled");
    assert_eq!(rec.attempts.len(), 1, "the cut-off attempt is in the history");
    assert_eq!(rec.attempts[0].agent_id.as_deref(), Some("rk-worker-0"));
    let details = sys.health("agent-runner", "rk").await.details;
    assert_eq!(details["completed"], 1, "{details}");
    assert_eq!(details["failed"], 0, "the runner wrote nothing for the cancelled attempt: {details}");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deadline_stops_a_running_task() {
    let sys = fleet("rd").await;
    let t0 = Instant::now();
    let mut late = task("late", serde_json::json!({ "sleep_ms": 10_000 }), None);
    late.timeout = Some(DurationSpec::Millis(1000));
    sys.submit(&late).await;

    let failed = event(&sys, "late", "failed", Duration::from_secs(8)).await;
    let took = t0.elapsed();
    assert_eq!(failed.error.as_ref().unwrap().code, "deadline_exceeded");
    assert!(took < Duration::from_secs(4), "failed after {took:?}");
    let events = sys.events().await;
    assert_eq!(of(&events, "late", "started").len(), 1, "it was running when the deadline passed");
    assert!(of(&events, "late", "retrying").is_empty(), "a deadline is not retried");
    let rec = sys.task("late").await.unwrap();
    assert_eq!(rec.state, TaskState::Failed);
    assert_eq!(rec.error.unwrap().code, "deadline_exceeded");
    // The agent is free again.
    sys.submit(&task("after", serde_json::json!({}), None)).await;
    event(&sys, "after", "completed", Duration::from_secs(10)).await;
    assert!(of(&sys.events().await, "late", "completed").is_empty());
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_a_parent_cancels_its_running_children_and_theirs() {
    let mut sys = System::with_dispatcher().await;
    sys.start_runner("r1", &worker_fleet(1, 4)).await;
    sys.wait_for_agents("r1", 1).await;
    sys.submit(&sleeping("p", 30_000)).await;
    sys.submit(&TaskSubmission { parent_id: Some("p".into()), ..sleeping("c1", 30_000) }).await;
    sys.submit(&TaskSubmission { parent_id: Some("c1".into()), ..sleeping("g1", 30_000) }).await;
    sys.wait_for_kind("started", 3, Duration::from_secs(20)).await;
    let (code, _, err) = cli(sys.server.url(), &["cancel", "p"]).await;
    assert_eq!(code, 0, "{err}");
    let events = sys.wait_for_kind("failed", 3, Duration::from_secs(15)).await;
    for (id, parent) in [("c1", "p"), ("g1", "c1")] {
        let failed = of(&events, id, "failed");
        assert_eq!(failed.len(), 1, "{id}: {events:?}");
        let e = failed[0].error.as_ref().unwrap();
        assert_eq!(e.code, "cancelled", "{id}");
        assert!(e.message.contains(&format!("parent task {parent}")), "{id}: {}", e.message);
    }
    sys.stop().await;
}
