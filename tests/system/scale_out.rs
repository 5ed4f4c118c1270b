//! 1,000 tasks submitted concurrently across two agent-runner processes all complete exactly
//! once, and both runners did some of them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::HashMap;
use std::time::Duration;

use crate::support::*;
use flotilla_protocol::{TaskState, TaskSubmission, WireFormat, codec, headers};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_tasks_across_two_runner_processes_complete_exactly_once() {
    const N: usize = 1000;
    let sys = System::with_dispatcher().await;
    let fleet = worker_fleet(2, 8);
    let _runners = sys.two_runner_processes(&fleet, 2).await;

    // Publish all submissions at once, then collect the acks.
    let mut acks = Vec::with_capacity(N);
    for i in 0..N {
        let sub = TaskSubmission {
            id: Some(format!("t{i:04}")),
            capability: "work".into(),
            input: serde_json::json!({ "text": format!("task {i}") }),
            ..Default::default()
        };
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::CONTENT_TYPE, headers::APPLICATION_MSGPACK);
        let payload = codec::encode(WireFormat::Msgpack, &sub).unwrap();
        acks.push(sys.js.publish_with_headers(sys.names.submit_subject(), h, payload.into()).await.unwrap());
    }
    for ack in acks {
        ack.await.unwrap();
    }

    let events = sys.wait_for_kind("completed", N, Duration::from_secs(180)).await;
    let completed = count_by_task(&events, "completed");
    assert_eq!(completed.len(), N);
    assert!(completed.values().all(|&n| n == 1), "every task completes exactly once");
    // The stream tells each task's story in causal order.
    let mut story: HashMap<&str, Vec<&str>> = HashMap::new();
    for e in &events {
        story.entry(e.task_id.as_str()).or_default().push(e.kind.as_str());
    }
    for (id, kinds) in &story {
        assert_eq!(kinds, &["accepted", "assigned", "started", "completed"], "events of {id}");
    }
    let mut per_runner: HashMap<String, usize> = HashMap::new();
    for e in events.iter().filter(|e| e.kind == "completed") {
        *per_runner.entry(e.runner_id.clone().unwrap()).or_default() += 1;
    }
    assert!(per_runner.get("ra").copied().unwrap_or(0) > 0, "ra did some: {per_runner:?}");
    assert!(per_runner.get("rb").copied().unwrap_or(0) > 0, "rb did some: {per_runner:?}");

    // Executions, as counted by the runners themselves: exactly one per task.
    let ra = sys.health("agent-runner", "ra").await;
    let rb = sys.health("agent-runner", "rb").await;
    let executions = ra.details["executions"].as_u64().unwrap() + rb.details["executions"].as_u64().unwrap();
    assert_eq!(executions, N as u64, "ra: {}, rb: {}", ra.details, rb.details);
    for i in (0..N).step_by(97) {
        assert_eq!(sys.task(&format!("t{i:04}")).await.unwrap().state, TaskState::Completed);
    }
    eprintln!("completed per runner: {per_runner:?}");
    sys.stop().await;
}
