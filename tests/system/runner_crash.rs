//! `kill -9` one agent-runner process while it holds tasks: every task still completes exactly
//! once, those it held on the other runner, and the restarted runner registers again.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::HashSet;
use std::time::Duration;

use crate::support::*;
use flotilla_protocol::TaskSubmission;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_of_a_killed_runner_complete_once_on_the_other() {
    const N: usize = 60;
    let sys = System::with_dispatcher().await;
    let fleet = worker_fleet(2, 3);
    let (mut a, _b) = sys.two_runner_processes(&fleet, 2).await;

    for i in 0..N {
        sys.submit(&sleeping(format!("slow-{i:03}"), 400)).await;
    }

    // Kill ra while it is running tasks.
    let held: HashSet<String> =
        flotilla_testkit::eventually(Duration::from_secs(30), "ra to hold tasks", || async {
            let events = sys.events().await;
            let done: HashSet<&str> =
                events.iter().filter(|e| e.kind == "completed").map(|e| e.task_id.as_str()).collect();
            let held: HashSet<String> = events
                .iter()
                .filter(|e| {
                    e.kind == "started"
                        && e.runner_id.as_deref() == Some("ra")
                        && !done.contains(e.task_id.as_str())
                })
                .map(|e| e.task_id.clone())
                .collect();
            (held.len() >= 3).then_some(held)
        })
        .await;
    a.kill9();

    let events = sys.wait_for_kind("completed", N, Duration::from_secs(120)).await;
    let completed = count_by_task(&events, "completed");
    assert_eq!(completed.len(), N);
    assert!(completed.values().all(|&n| n == 1), "every task completes exactly once");
    let killed_mid_run: Vec<&String> = held
        .iter()
        .filter(|id| {
            !events
                .iter()
                .any(|e| e.kind == "completed" && &e.task_id == *id && e.runner_id.as_deref() == Some("ra"))
        })
        .collect();
    assert!(!killed_mid_run.is_empty(), "some tasks were cut off by the kill");
    for id in &killed_mid_run {
        let done = events.iter().find(|e| e.kind == "completed" && &e.task_id == *id).unwrap();
        assert_eq!(done.runner_id.as_deref(), Some("rb"), "{id} finished on the surviving runner");
        assert!(done.attempt.unwrap() >= 2, "{id} was reassigned");
        assert!(
            events.iter().any(|e| e.kind == "requeued"
                && &e.task_id == *id
                && e.reason.as_deref() == Some("agent_lost"))
        );
    }

    // The restarted runner registers again and serves new work.
    let _a2 = sys.spawn_runner_process("ra", &fleet);
    sys.wait_for_agents("ra", 2).await;
    let after =
        TaskSubmission { id: Some("after-restart".into()), capability: "work".into(), ..Default::default() };
    sys.submit(&after).await;
    sys.wait_for_kind("completed", N + 1, Duration::from_secs(30)).await;
    sys.stop().await;
}
