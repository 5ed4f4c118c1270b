//! Graceful stops. SIGTERM to a runner under load: it takes no new work, keeps heartbeating as
//! `draining` while its in-flight tasks finish (so the dispatcher does not take them back), then
//! deregisters and exits 0; nothing is lost or run twice. A dispatcher restart rebuilds its
//! state from NATS and requeues no healthy work.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::HashSet;
use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_loses_nothing_and_runs_nothing_twice() {
    const N: usize = 24;
    let sys = System::with_dispatcher().await;
    let fleet = worker_fleet(2, 2);
    let (mut a, _b) = sys.two_runner_processes(&fleet, 2).await;
    for i in 0..N {
        sys.submit(&sleeping(format!("d{i:02}"), 4000)).await;
    }
    // Once ra is busy, ask it to stop. The tasks take 4 s, well inside the 10 s drain grace
    // but longer than the 1.4 s it takes the dispatcher to call a silent agent lost here.
    let held: HashSet<String> = flotilla_testkit::eventually(Duration::from_secs(30), "ra busy", || async {
        let started: HashSet<String> = sys
            .events()
            .await
            .into_iter()
            .filter(|e| e.kind == "started" && e.runner_id.as_deref() == Some("ra"))
            .map(|e| e.task_id)
            .collect();
        (started.len() >= 2).then_some(started)
    })
    .await;
    a.signal("TERM");
    let code = tokio::task::spawn_blocking(move || {
        let code = a.wait_timeout(Duration::from_secs(30));
        (code, a)
    })
    .await
    .unwrap()
    .0;
    assert_eq!(code, Some(0), "the runner exits 0 after draining");

    let events = sys.wait_for_kind("completed", N, Duration::from_secs(120)).await;
    let completed = count_by_task(&events, "completed");
    assert_eq!(completed.len(), N);
    assert!(completed.values().all(|&n| n == 1));
    for id in &held {
        let done = events.iter().find(|e| e.kind == "completed" && &e.task_id == id).unwrap();
        let story: Vec<String> = events
            .iter()
            .filter(|e| &e.task_id == id)
            .map(|e| {
                format!("{}@{}:{:?}/{:?}/{:?}", e.kind, e.at_ms % 100_000, e.runner_id, e.attempt, e.reason)
            })
            .collect();
        assert_eq!(
            done.runner_id.as_deref(),
            Some("ra"),
            "{id} was finished by the draining runner: {story:?}"
        );
    }
    let requeued: Vec<_> =
        events.iter().filter(|e| e.kind == "requeued" && held.contains(&e.task_id)).collect();
    assert!(requeued.is_empty(), "in-flight work of a draining runner is not taken back: {requeued:?}");
    let started = count_by_task(&events, "started");
    assert!(started.values().all(|&n| n == 1), "nothing ran twice");
    // ra deregistered its agents.
    let keys: Vec<String> = futures::StreamExt::collect::<Vec<_>>(sys.topology.agents.keys().await.unwrap())
        .await
        .into_iter()
        .filter_map(Result::ok)
        .collect();
    assert!(keys.iter().all(|k| !k.starts_with("ra-")), "{keys:?}");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dispatcher_restart_rebuilds_from_nats_and_requeues_nothing_healthy() {
    let mut sys = System::with_dispatcher().await;
    sys.start_runner("r1", &worker_fleet(2, 2)).await;
    sys.wait_for_agents("r1", 2).await;
    for i in 0..4 {
        sys.submit(&sleeping(format!("before-{i}"), 3000)).await;
    }
    sys.wait_for_kind("started", 4, Duration::from_secs(20)).await;
    sys.stop_dispatchers().await;
    // While no dispatcher runs, submissions wait in the stream.
    for i in 0..6 {
        sys.submit(&sleeping(format!("during-{i}"), 100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    sys.start_dispatcher(dispatcher_config()).await;
    let events = sys.wait_for_kind("completed", 10, Duration::from_secs(60)).await;
    let completed = count_by_task(&events, "completed");
    assert_eq!(completed.len(), 10);
    assert!(completed.values().all(|&n| n == 1));
    assert!(!events.iter().any(|e| e.kind == "requeued"), "healthy work was not taken back");
    let h = sys.health("agent-runner", "r1").await;
    assert_eq!(h.details["executions"], 10);
    sys.stop().await;
}
