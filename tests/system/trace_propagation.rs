//! One task is one trace: a client's `traceparent` is continued by the dispatcher, kept on the
//! task record, and carried by every event and the assignment, across the KV-watch hop.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use crate::support::*;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use flotilla_protocol::{TaskSubmission, WireFormat, codec, headers};
use futures::StreamExt as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_of_a_task_carries_the_clients_trace() {
    let mut sys = System::with_dispatcher().await;
    sys.start_runner("r1", &worker_fleet(1, 2)).await;
    sys.wait_for_agents("r1", 1).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let sub = TaskSubmission { id: Some("traced".into()), capability: "work".into(), ..Default::default() };
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::CONTENT_TYPE, headers::APPLICATION_MSGPACK);
    h.insert(headers::TRACEPARENT, format!("00-{trace_id}-00f067aa0ba902b7-01").as_str());
    let payload = codec::encode(WireFormat::Msgpack, &sub).unwrap();
    sys.js.publish_with_headers(sys.names.submit_subject(), h, payload.into()).await.unwrap().await.unwrap();
    sys.wait_for_kind("completed", 1, Duration::from_secs(20)).await;

    let rec = sys.task("traced").await.unwrap();
    assert_eq!(rec.trace.as_deref().and_then(|t| t.get(3..35)), Some(trace_id));

    let stream = sys.js.get_stream(sys.names.events_stream()).await.unwrap();
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: sys.names.task_events_of("traced"),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut msgs = consumer.messages().await.unwrap();
    let mut seen = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(500), msgs.next()).await {
        let tp = m.headers.as_ref().and_then(|h| h.get(headers::TRACEPARENT)).map(|v| v.as_str().to_owned());
        let kind = m.subject.rsplit('.').next().unwrap().to_owned();
        assert_eq!(tp.as_deref().and_then(|t| t.get(3..35)), Some(trace_id), "{kind} event is in the trace");
        seen.push(kind);
    }
    assert_eq!(seen, ["accepted", "assigned", "started", "completed"]);
    sys.stop().await;
}
