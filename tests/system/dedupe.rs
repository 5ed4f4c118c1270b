//! The same task submitted three times — twice inside the stream's duplicate window and once
//! after it — executes once. Also for a task identified only by its `Nats-Msg-Id`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use crate::support::*;
use flotilla_protocol::{TaskSubmission, WireFormat, headers};
use flotilla_service::StreamSettings;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_submitted_three_times_runs_once() {
    let settings = StreamSettings { duplicate_window: Duration::from_secs(1), ..Default::default() };
    let mut sys = System::start(settings, WireFormat::Msgpack).await;
    sys.start_dispatcher(dispatcher_config()).await;
    sys.start_runner("r1", &worker_fleet(1, 4)).await;
    sys.wait_for_agents("r1", 1).await;

    let sub = TaskSubmission {
        id: Some("same-task".into()),
        capability: "work".into(),
        input: serde_json::json!("once only"),
        ..Default::default()
    };
    let first = sys.submit(&sub).await;
    let second = sys.submit(&sub).await;
    assert!(!first.duplicate);
    assert!(second.duplicate, "inside the window the stream itself drops the copy");

    // The same work identified only by its Nats-Msg-Id.
    let raw = br#"{"capability": "work", "input": "by msg id"}"#.to_vec();
    let publish_with_msg_id = || async {
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::CONTENT_TYPE, headers::APPLICATION_JSON);
        h.insert(headers::NATS_MSG_ID, "client-msg-7");
        sys.js
            .publish_with_headers(sys.names.submit_subject(), h, raw.clone().into())
            .await
            .unwrap()
            .await
            .unwrap()
    };
    assert!(!publish_with_msg_id().await.duplicate);

    sys.wait_for_kind("completed", 2, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // the duplicate window passes
    let third = sys.submit(&sub).await;
    assert!(!third.duplicate, "after the window the stream stores the copy");
    assert!(!publish_with_msg_id().await.duplicate);

    // Wait until the dispatcher has seen both late copies.
    flotilla_testkit::eventually(Duration::from_secs(20), "late copies processed", || async {
        let h = sys.health("dispatcher", "dispatcher-1").await;
        (h.details["duplicates"].as_u64() == Some(2)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let events = sys.events().await;
    for id in ["same-task", "client-msg-7"] {
        assert_eq!(count_by_task(&events, "accepted").get(id), Some(&1), "{id} accepted once");
        assert_eq!(count_by_task(&events, "started").get(id), Some(&1), "{id} started once");
        assert_eq!(count_by_task(&events, "completed").get(id), Some(&1), "{id} completed once");
    }
    let runner = sys.health("agent-runner", "r1").await;
    assert_eq!(runner.details["executions"], 2, "two distinct tasks, each executed once");
    sys.stop().await;
}
