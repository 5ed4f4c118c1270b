//! Workload-based scaling: a deep queue makes the runner start more agents of the matching
//! template, never beyond its `max_replicas`, and they are stopped again once idle.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::HashSet;
use std::time::Duration;

use crate::support::*;
use flotilla_protocol::{TaskSubmission, WireFormat};
use flotilla_service::StreamSettings;
use futures::StreamExt as _;

async fn registered(sys: &System) -> HashSet<String> {
    sys.topology.agents.keys().await.unwrap().filter_map(|k| async { k.ok() }).collect().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deep_queue_scales_a_template_up_within_its_limit_and_idle_agents_go_away() {
    let mut sys = System::start(StreamSettings::default(), WireFormat::Msgpack).await;
    let mut config = dispatcher_config();
    config.scale_up_after = Duration::from_millis(300);
    config.scale_down_after = Duration::from_millis(1500);
    config.scale_cooldown = Duration::from_millis(200);
    sys.start_dispatcher(config).await;
    let fleet = "[[agent]]\nname = \"worker\"\ncapabilities = [\"work\"]\nprovider = \"offline\"\n\
                 concurrency = 1\nreplicas = 1\nmin_replicas = 1\nmax_replicas = 3\n";
    sys.start_runner("rs", fleet).await;
    sys.wait_for_agents("rs", 1).await;

    for i in 0..40 {
        sys.submit(&TaskSubmission {
            id: Some(format!("deep-{i:02}")),
            capability: "work".into(),
            input: serde_json::json!({ "text": "x", "_offline": { "sleep_ms": 250 } }),
            ..Default::default()
        })
        .await;
    }
    // It grows to its limit of three, and no further.
    let mut most = 0;
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(60) {
        let n = registered(&sys).await.len();
        most = most.max(n);
        let done = sys.events().await.iter().filter(|e| e.kind == "completed").count();
        if done == 40 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(most, 3, "scaled up to max_replicas");
    let events = sys.wait_for_kind("completed", 40, Duration::from_secs(60)).await;
    let completed = count_by_task(&events, "completed");
    assert!(completed.values().all(|&n| n == 1), "every task completes exactly once");
    let workers: HashSet<String> =
        events.iter().filter(|e| e.kind == "started").filter_map(|e| e.agent_id.clone()).collect();
    assert_eq!(workers.len(), 3, "the new agents took work: {workers:?}");

    // Idle: back down to min_replicas.
    flotilla_testkit::eventually(Duration::from_secs(20), "idle agents to be stopped", || async {
        (registered(&sys).await.len() == 1).then_some(())
    })
    .await;
    sys.stop().await;
}
