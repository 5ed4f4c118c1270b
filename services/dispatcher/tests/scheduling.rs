//! The dispatcher alone against a real nats-server. The test plays the agent-runner: it writes
//! registry entries, heartbeats, and reads assignments from the stream.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, pull};
use flotilla_protocol::{
    Assignment, CapabilityRecord, TaskRecord, TaskState, TaskSubmission, codec, time::now_ms,
};
use flotilla_service::Service as _;
use flotilla_service::{Fleet, Topology};
use flotilla_testkit::NatsServer;
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

struct Harness {
    _server: NatsServer,
    fleet: Fleet,
    topology: Topology,
    shutdown: CancellationToken,
    dispatcher: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start() -> Harness {
    let server = NatsServer::start();
    let (fleet, topology) = server.fleet("test").await;
    let cap = CapabilityRecord {
        capability: "work".into(),
        templates: vec!["fake".into()],
        declared_at_ms: now_ms(),
    };
    fleet.kv_put(&topology.capabilities, "work", &cap).await.unwrap();
    let shutdown = CancellationToken::new();
    let config = flotilla_dispatcher::Config { tick: Duration::from_millis(50), ..Default::default() };
    let (dfleet, _) = server.fleet("d1").await;
    let dispatcher = tokio::spawn(flotilla_dispatcher::Dispatcher::new(config).run(
        dfleet,
        topology.clone(),
        shutdown.clone(),
    ));
    Harness { _server: server, fleet, topology, shutdown, dispatcher }
}

impl Harness {
    /// Registers a fake agent and heartbeats it every 100 ms until the returned token is cancelled.
    fn agent(&self, agent_id: &str, runner_id: &str, concurrency: u32) -> CancellationToken {
        flotilla_testkit::fake_agent(&self.fleet, &self.topology.agents, agent_id, runner_id, concurrency)
    }

    async fn assignments(&self, runner_id: &str) -> async_nats::jetstream::consumer::pull::Stream {
        let stream = self.fleet.js.get_stream(self.fleet.names.assignments_stream()).await.unwrap();
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(format!("test-{runner_id}")),
                filter_subject: self.fleet.names.assign_subject(runner_id),
                ack_policy: AckPolicy::Explicit,
                ..Default::default()
            })
            .await
            .unwrap();
        consumer.messages().await.unwrap()
    }

    async fn submit(&self, id: &str) {
        let sub = TaskSubmission { id: Some(id.into()), capability: "work".into(), ..Default::default() };
        self.fleet.publish_durable(self.fleet.names.submit_subject(), &sub, Some(id)).await.unwrap();
    }

    async fn task(&self, id: &str) -> Option<TaskRecord> {
        self.fleet.kv_get(&self.topology.tasks, id).await.unwrap().map(|(r, _)| r)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.dispatcher.await.unwrap().unwrap();
    }
}

async fn next_assignment(s: &mut async_nats::jetstream::consumer::pull::Stream) -> Assignment {
    let m = tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("an assignment")
        .unwrap()
        .unwrap();
    m.ack().await.unwrap();
    codec::decode(None, &m.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assigns_then_requeues_when_the_agent_goes_silent() {
    let h = start().await;
    let stop_a = h.agent("fake-a", "rfa", 1);
    let mut to_a = h.assignments("rfa").await;
    h.submit("t1").await;
    let a = next_assignment(&mut to_a).await;
    assert_eq!((a.task_id.as_str(), a.attempt, a.agent_id.as_str()), ("t1", 1, "fake-a"));
    // The dispatcher does not write the record: the assignment carries it with its revision, and
    // only the runner's claim (a revision-checked write from there) books the task.
    let (rec, rev) = h.fleet.kv_get::<TaskRecord>(&h.topology.tasks, "t1").await.unwrap().unwrap();
    assert_eq!(rec.state, TaskState::Queued);
    assert_eq!(a.revision, rev);
    assert_eq!((a.record.state, a.record.attempt), (TaskState::Queued, 0));

    // Agent a stops heartbeating without having claimed it; agent b arrives: the assignment is
    // taken back and the same attempt, from the same revision, goes to b.
    stop_a.cancel();
    let _b = h.agent("fake-b", "rfb", 1);
    let mut to_b = h.assignments("rfb").await;
    let b = next_assignment(&mut to_b).await;
    assert_eq!((b.task_id.as_str(), b.attempt, b.agent_id.as_str()), ("t1", 1, "fake-b"));
    assert_eq!(b.revision, rev);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_waits_for_an_agent_with_its_capability() {
    let h = start().await;
    h.submit("waiting").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h.task("waiting").await.unwrap().state, TaskState::Queued);
    let mut to_a = h.assignments("rlate").await;
    let _a = h.agent("late-agent", "rlate", 1);
    let a = next_assignment(&mut to_a).await;
    assert_eq!(a.task_id, "waiting");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_is_respected_and_load_is_balanced() {
    let h = start().await;
    let _a = h.agent("ag-a", "rx", 2);
    let _b = h.agent("ag-b", "rx", 2);
    let mut to_x = h.assignments("rx").await;
    for i in 0..5 {
        h.submit(&format!("c{i}")).await;
    }
    let mut per_agent = std::collections::HashMap::<String, usize>::new();
    for _ in 0..4 {
        *per_agent.entry(next_assignment(&mut to_x).await.agent_id).or_default() += 1;
    }
    assert_eq!(per_agent.get("ag-a"), Some(&2));
    assert_eq!(per_agent.get("ag-b"), Some(&2));
    // Both agents are full: the fifth task is not assigned.
    let fifth = tokio::time::timeout(Duration::from_millis(700), to_x.next()).await;
    assert!(fifth.is_err(), "a fifth assignment went out while both agents were full: {fifth:?}");
    h.stop().await;
}
