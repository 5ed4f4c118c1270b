//! "Any NATS client": a task published by nats-py as plain JSON, with no Flotilla code on the
//! client side, completes, and nats-py reads its `completed` event back; nats-py cancels a
//! running task with one JSON request to the dispatcher.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use crate::support::*;
use flotilla_protocol::WireFormat;
use flotilla_service::StreamSettings;
use flotilla_service::auth::RoleSpec;
use flotilla_testkit::workspace_root;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plain_json_task_from_nats_py_completes() {
    let mut sys = System::start(StreamSettings::default(), WireFormat::Json).await;
    sys.start_dispatcher(dispatcher_config()).await;
    sys.start_runner("r1", &worker_fleet(1, 2)).await;
    sys.wait_for_agents("r1", 1).await;

    let pythonpath = workspace_root().join(".tools/python");
    assert!(pythonpath.join("nats").is_dir(), "nats-py missing: run scripts/install-nats-server");
    // As tenant python's submitter: all it may do is submit as python and read python's events.
    let submitter = ("submitter-python", RoleSpec::Submitter { tenant: "python".into() });
    let out = sys.python("json_client.py", &[sys.server.url()], submitter).await;
    assert!(out.status.success(), "python client failed: {}", String::from_utf8_lossy(&out.stderr));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let event = &reply["event"];
    assert_eq!(event["kind"], "completed");
    assert_eq!(event["task_id"], reply["id"]);
    assert_eq!(event["tenant"], "python");
    assert_eq!(event["priority"], 2);
    assert!(event["agent_id"].as_str().unwrap().starts_with("r1-worker-"));
    assert!(event["usage"]["total_tokens"].as_u64().unwrap() > 0);
    assert_eq!(event["output"]["answer"], "[worker] work: hello from python");

    // The task record agrees.
    let rec = sys.task(reply["id"].as_str().unwrap()).await.unwrap();
    assert_eq!(rec.state, flotilla_protocol::TaskState::Completed);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_without_a_content_type_header_is_understood() {
    let mut sys = System::with_dispatcher().await;
    sys.start_runner("r1", &worker_fleet(1, 2)).await;
    sys.wait_for_agents("r1", 1).await;
    sys.submit_raw(br#"{"id": "no-header", "capability": "work", "input": "plain"}"#.to_vec(), None).await;
    let events = sys.wait_for_kind("completed", 1, std::time::Duration::from_secs(20)).await;
    let done = events.iter().find(|e| e.kind == "completed").unwrap();
    assert_eq!(done.task_id, "no-header");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_py_cancels_a_running_task_with_one_json_request() {
    let mut sys = System::with_dispatcher().await;
    sys.start_runner("rpy", &worker_fleet(1, 1)).await;
    sys.wait_for_agents("rpy", 1).await;
    let long = flotilla_protocol::TaskSubmission {
        id: Some("py-long".into()),
        capability: "work".into(),
        input: serde_json::json!({ "text": "x", "_offline": { "sleep_ms": 20_000 } }),
        ..Default::default()
    };
    sys.submit(&long).await;
    sys.wait_for_kind("started", 1, std::time::Duration::from_secs(30)).await;

    let args = [sys.server.url(), "flotilla", "py-long", "no-such-task"];
    let operator = ("operator-test", RoleSpec::Operator { name: "test".into() });
    let out = sys.python("cancel_client.py", &args, operator).await;
    assert!(out.status.success(), "python client failed: {}", String::from_utf8_lossy(&out.stderr));
    let answers: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cancelled = &answers[0];
    assert_eq!(cancelled["was"], "running", "{cancelled}");
    assert_eq!(cancelled["record"]["state"], "failed");
    assert_eq!(cancelled["record"]["error"]["code"], "cancelled");
    assert_eq!(cancelled["record"]["error"]["message"], "cancelled from python");
    assert_eq!(cancelled["record"]["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(answers[1]["error"]["code"], "not_found", "{answers}");

    // The record is final, the event is out, and the runner stopped the attempt.
    let events = sys.wait_for_kind("failed", 1, std::time::Duration::from_secs(10)).await;
    let failed = events.iter().find(|e| e.kind == "failed").unwrap();
    assert_eq!(failed.error.as_ref().unwrap().code, "cancelled");
    assert_eq!(sys.task("py-long").await.unwrap().state, flotilla_protocol::TaskState::Failed);
    flotilla_testkit::eventually(
        std::time::Duration::from_secs(10),
        "the runner to stop the attempt",
        || async { (sys.health("agent-runner", "rpy").await.details["cancelled"] == 1).then_some(()) },
    )
    .await;
    sys.stop().await;
}
