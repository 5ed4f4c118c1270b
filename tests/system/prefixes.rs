//! Two fleets with different subject prefixes share one nats-server without seeing each other's
//! tasks, agents or events.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use flotilla_protocol::{TaskSubmission, WireFormat};
use flotilla_service::StreamSettings;
use flotilla_testkit::NatsServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_prefixes_are_two_independent_fleets() {
    let server = Arc::new(NatsServer::start());
    let mut blue =
        System::start_on(server.clone(), "blue", StreamSettings::default(), WireFormat::Msgpack).await;
    let mut green =
        System::start_on(server.clone(), "acme.green", StreamSettings::default(), WireFormat::Json).await;
    blue.start_dispatcher(dispatcher_config()).await;
    green.start_dispatcher(dispatcher_config()).await;
    blue.start_runner("rblue", &worker_fleet(1, 2)).await;
    // The green fleet's runner is a separate process: the prefix travels through its environment.
    let _green_runner = green.spawn_runner_process("rgreen", &worker_fleet(1, 2));
    blue.wait_for_agents("rblue", 1).await;
    green.wait_for_agents("rgreen", 1).await;

    for (sys, id) in [(&blue, "same-id"), (&green, "same-id"), (&green, "green-only")] {
        sys.submit(&TaskSubmission { id: Some(id.into()), capability: "work".into(), ..Default::default() })
            .await;
    }
    let blue_events = blue.wait_for_kind("completed", 1, Duration::from_secs(20)).await;
    let green_events = green.wait_for_kind("completed", 2, Duration::from_secs(20)).await;
    let blue_done: Vec<_> = blue_events.iter().filter(|e| e.kind == "completed").collect();
    let green_done: Vec<_> = green_events.iter().filter(|e| e.kind == "completed").collect();
    assert_eq!(blue_done.len(), 1);
    assert_eq!(green_done.len(), 2);
    assert!(blue_done.iter().all(|e| e.runner_id.as_deref() == Some("rblue")));
    assert!(green_done.iter().all(|e| e.runner_id.as_deref() == Some("rgreen")));
    assert!(blue.task("green-only").await.is_none());
    assert_eq!(green.names.submit_subject(), "acme.green.tasks.submit");
    blue.stop().await;
    green.stop().await;
}
