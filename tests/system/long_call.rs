//! A 90-second LLM call with a 30-second ack wait completes once, with no redelivery: the runner
//! keeps the assignment alive with in-progress acks, and its heartbeats keep the agent alive.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use crate::support::*;
use flotilla_protocol::TaskSubmission;
use flotilla_testkit::stub_llm::{Reply, StubLlm};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ninety_second_call_completes_once_without_redelivery() {
    let stub =
        StubLlm::start(vec![Reply::openai_text("worth the wait", 100, 20).delayed(Duration::from_secs(90))])
            .await;
    let fleet = format!(
        "[[agent]]\nname = \"slowpoke\"\ncapabilities = [\"think\"]\nprovider = \"openai\"\nmodel = \"m\"\n\
         base_url = \"{}\"\nrequest_timeout = \"120s\"\n",
        stub.openai_base()
    );
    let mut sys = System::with_dispatcher().await;
    sys.start_runner("r1", &fleet).await; // ack wait 30 s, the default
    sys.wait_for_agents("r1", 1).await;
    sys.submit(&TaskSubmission {
        id: Some("deep-thought".into()),
        capability: "think".into(),
        ..Default::default()
    })
    .await;
    let events = sys.wait_for_kind("completed", 1, Duration::from_secs(150)).await;
    let done = events.iter().find(|e| e.kind == "completed").unwrap();
    assert_eq!(done.output.as_ref().unwrap()["answer"], "worth the wait");
    assert_eq!(stub.requests().len(), 1, "the provider was called once");
    assert_eq!(count_by_task(&events, "started").get("deep-thought"), Some(&1));
    assert!(!events.iter().any(|e| e.kind == "requeued"), "the agent stayed alive throughout");
    let mut stream = sys.js.get_stream(sys.names.assignments_stream()).await.unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer(&sys.names.runner_consumer("r1")).await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(info.config.ack_wait, Duration::from_secs(30));
    assert_eq!(info.num_redelivered, 0, "no redelivery: {info:?}");
    assert_eq!(info.num_ack_pending, 0);
    let _ = stream.info().await.unwrap();
    let h = sys.health("agent-runner", "r1").await;
    assert_eq!(h.details["executions"], 1);
    sys.stop().await;
}
