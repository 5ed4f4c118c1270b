//! The agent-runner alone against a real nats-server. The test plays the dispatcher: it writes
//! task records and publishes assignments.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use flotilla_agent_runner::FleetFile;
use flotilla_protocol::{
    AgentRecord, Assignment, DeadLetter, HealthReply, TaskEvent, TaskRecord, TaskState, codec, time::now_ms,
};
use flotilla_service::Service as _;
use flotilla_service::{Fleet, Topology};
use flotilla_testkit::{NatsServer, eventually};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

const FLEET: &str = "[[agent]]\nname = \"echo\"\ncapabilities = [\"echo\"]\nconcurrency = 2\nreplicas = 2\n";

async fn setup()
-> (NatsServer, Fleet, Topology, CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let server = NatsServer::start();
    let (fleet, topology) = server.fleet("r1").await;
    let shutdown = CancellationToken::new();
    let config = flotilla_agent_runner::Config {
        runner_id: Some("r1".into()),
        heartbeat_interval: Duration::from_millis(200),
        budgets: false,
        ..Default::default()
    };
    let runner = flotilla_agent_runner::Runner::new(config, FleetFile::parse(FLEET).unwrap()).unwrap();
    let runner = tokio::spawn(runner.run(fleet.clone(), topology.clone(), shutdown.clone()));
    (server, fleet, topology, shutdown, runner)
}

fn record(id: &str, attempt: u32, agent: &str) -> TaskRecord {
    TaskRecord {
        id: id.into(),
        capability: "echo".into(),
        input: serde_json::json!("ping"),
        priority: Default::default(),
        tenant: "default".into(),
        budget_tokens: None,
        deadline_ms: None,
        context_key: None,
        parent_id: None,
        labels: Default::default(),
        state: TaskState::Queued,
        attempt,
        agent_id: Some(agent.into()),
        runner_id: Some("r1".into()),
        submitted_at_ms: now_ms(),
        updated_at_ms: now_ms(),
        started_at_ms: None,
        finished_at_ms: None,
        output: None,
        usage: None,
        error: None,
        warnings: vec![],
        trace: None,
        children: vec![],
        calls: vec![],
        max_attempts: 3,
        attempts: vec![],
    }
}

/// An assignment of attempt `rec.attempt` to `rec.agent_id` decided from a revision that is long
/// gone: its claim fails and the runner reads the record.
async fn assign_stale(fleet: &Fleet, rec: &TaskRecord, msg_id: &str) {
    let base = TaskRecord { attempt: rec.attempt - 1, ..rec.clone() };
    let a = Assignment::next_attempt(base, 1, rec.agent_id.as_deref().unwrap(), now_ms());
    fleet.publish_durable(fleet.names.assign_subject("r1"), &a, Some(msg_id)).await.unwrap();
}

/// A queued task record (no attempt made yet).
fn queued(id: &str) -> TaskRecord {
    TaskRecord { state: TaskState::Queued, agent_id: None, runner_id: None, ..record(id, 0, "none") }
}

/// An assignment as the dispatcher sends it: the next attempt of the queued record `base`
/// (stored at `rev`) for `agent`, claimed with one revision-checked write from `rev`.
async fn propose(fleet: &Fleet, base: &TaskRecord, rev: u64, agent: &str, msg_id: &str) {
    let a = Assignment::next_attempt(base.clone(), rev, agent, now_ms());
    fleet.publish_durable(fleet.names.assign_subject("r1"), &a, Some(msg_id)).await.unwrap();
}

async fn health(fleet: &Fleet) -> HealthReply {
    let reply = fleet
        .client
        .request(fleet.names.instance_health_subject("agent-runner", "r1"), "".into())
        .await
        .unwrap();
    codec::decode(None, &reply.payload).unwrap()
}

async fn dead_letters(fleet: &Fleet) -> Vec<DeadLetter> {
    let stream = fleet.js.get_stream(fleet.names.deadletter_stream()).await.unwrap();
    let c = stream
        .create_consumer(pull::OrderedConfig { deliver_policy: DeliverPolicy::All, ..Default::default() })
        .await
        .unwrap();
    let mut msgs = c.messages().await.unwrap();
    let mut out = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(300), msgs.next()).await {
        out.push(codec::decode(None, &m.payload).unwrap());
    }
    out
}

async fn events_of(fleet: &Fleet, id: &str) -> Vec<TaskEvent> {
    let stream = fleet.js.get_stream(fleet.names.events_stream()).await.unwrap();
    let c = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: fleet.names.task_events_of(id),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut msgs = c.messages().await.unwrap();
    let mut out = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(300), msgs.next()).await {
        out.push(codec::decode(None, &m.payload).unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_heartbeats_runs_and_fences() {
    let (_server, fleet, topo, shutdown, runner) = setup().await;

    // Registration and heartbeats.
    let first: AgentRecord = eventually(Duration::from_secs(10), "registration", || async {
        fleet.kv_get::<AgentRecord>(&topo.agents, "r1-echo-1").await.unwrap().map(|(r, _)| r)
    })
    .await;
    assert_eq!(first.capabilities, vec!["echo".to_string()]);
    assert_eq!(first.concurrency, 2);
    // The runner beats (its record, with the incarnation its agents' records carry); an idle
    // agent's record is not written again once it has settled (initializing → idle).
    eventually(Duration::from_secs(5), "the agent to settle", || async {
        let (r, _) = fleet.kv_get::<AgentRecord>(&topo.agents, "r1-echo-1").await.unwrap()?;
        (r.state == flotilla_protocol::AgentState::Idle).then_some(r)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (first, _) = fleet.kv_get::<AgentRecord>(&topo.agents, "r1-echo-1").await.unwrap().unwrap();
    let beat: flotilla_protocol::RunnerRecord =
        eventually(Duration::from_secs(5), "a later heartbeat", || async {
            let (r, _) =
                fleet.kv_get::<flotilla_protocol::RunnerRecord>(&topo.runners, "r1").await.unwrap()?;
            (r.heartbeat_at_ms > first.heartbeat_at_ms + 500).then_some(r)
        })
        .await;
    assert_eq!((beat.incarnation.as_str(), beat.agents), (first.incarnation.as_str(), 2));
    assert!(first.alive_at(Some(&beat), beat.heartbeat_at_ms + 1_000), "alive through its runner");
    let (again, _) = fleet.kv_get::<AgentRecord>(&topo.agents, "r1-echo-1").await.unwrap().unwrap();
    assert_eq!(again.heartbeat_at_ms, first.heartbeat_at_ms, "an idle agent's record is not rewritten");

    // An assignment runs and completes, with usage.
    let rec = queued("job-1");
    let rev = fleet.kv_create(&topo.tasks, "job-1", &rec).await.unwrap();
    propose(&fleet, &rec, rev, "r1-echo-0", "job-1:1").await;
    let done: TaskRecord = eventually(Duration::from_secs(10), "completion", || async {
        let (r, _) = fleet.kv_get::<TaskRecord>(&topo.tasks, "job-1").await.unwrap()?;
        (r.state == TaskState::Completed).then_some(r)
    })
    .await;
    assert_eq!(done.output.unwrap()["answer"], "[echo] echo: ping");
    assert!(done.usage.unwrap().total_tokens > 0);

    // The same assignment delivered again (another message id; its revision is stale now) does
    // not execute again.
    propose(&fleet, &rec, rev, "r1-echo-0", "job-1:1:again").await;
    // An assignment for an attempt that is not current is fenced.
    assign_stale(&fleet, &record("job-1", 7, "r1-echo-1"), "job-1:7").await;
    eventually(Duration::from_secs(10), "the stale assignment to be fenced", || async {
        (health(&fleet).await.details["fenced"] == 1).then_some(())
    })
    .await;
    let h = health(&fleet).await;
    assert_eq!(h.details["executions"], 1);
    assert_eq!(h.details["completed"], 1);
    let events = events_of(&fleet, "job-1").await;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    // A one-step answer has no `progress` event: `completed` carries its text and usage.
    assert_eq!(kinds, ["started", "completed"], "the re-announced completion was de-duplicated");

    // A failing model call (a retryable `model_error`) queues the task again while attempts are
    // left, with the attempt in its history, and fails it with a reason on the last one.
    let mut bad = queued("job-2");
    bad.input = serde_json::json!({"_offline": {"fail": "model exploded"}});
    bad.max_attempts = 2;
    let rev2 = fleet.kv_create(&topo.tasks, "job-2", &bad).await.unwrap();
    propose(&fleet, &bad, rev2, "r1-echo-0", "job-2:1").await;
    let (retry, rev): (TaskRecord, u64) = eventually(Duration::from_secs(10), "a retry", || async {
        let (r, rev) = fleet.kv_get::<TaskRecord>(&topo.tasks, "job-2").await.unwrap()?;
        (r.state == TaskState::Queued && !r.attempts.is_empty()).then_some((r, rev))
    })
    .await;
    assert_eq!(retry.attempt, 1);
    assert_eq!(retry.agent_id, None);
    assert_eq!(retry.error.as_ref().unwrap().code, "model_error");
    assert_eq!(retry.attempts.len(), 1);
    assert_eq!(retry.attempts[0].attempt, 1);
    assert_eq!(retry.attempts[0].agent_id.as_deref(), Some("r1-echo-0"));
    assert_eq!(retry.attempts[0].runner_id.as_deref(), Some("r1"));
    assert_eq!(retry.attempts[0].error.message, "model exploded");
    assert!(retry.attempts[0].started_at_ms.is_some());
    // The test plays the dispatcher: attempt 2 goes to the other agent.
    propose(&fleet, &retry, rev, "r1-echo-1", "job-2:2").await;
    let failed: TaskRecord = eventually(Duration::from_secs(10), "failure", || async {
        let (r, _) = fleet.kv_get::<TaskRecord>(&topo.tasks, "job-2").await.unwrap()?;
        (r.state == TaskState::Failed).then_some(r)
    })
    .await;
    assert_eq!(failed.error.unwrap().message, "model exploded");
    let attempts: Vec<(u32, Option<&str>)> =
        failed.attempts.iter().map(|a| (a.attempt, a.agent_id.as_deref())).collect();
    assert_eq!(attempts, [(1, Some("r1-echo-0")), (2, Some("r1-echo-1"))]);
    let kinds: Vec<(String, Option<u32>)> =
        events_of(&fleet, "job-2").await.into_iter().map(|e| (e.kind, e.attempt)).collect();
    assert!(kinds.contains(&("retrying".into(), Some(1))), "{kinds:?}");
    assert!(kinds.contains(&("failed".into(), Some(2))), "{kinds:?}");
    let dead = dead_letters(&fleet).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].reason, "retries_exhausted");
    assert_eq!(dead[0].task_id.as_deref(), Some("job-2"));
    assert_eq!(dead[0].attempts.len(), 2);
    let h = health(&fleet).await;
    assert_eq!(h.details["retried"], 1);
    assert_eq!(h.details["failed"], 1);

    // An assignment decided from a record that has moved on since (here: cancelled) never runs.
    let q3 = queued("job-3");
    let rev3 = fleet.kv_create(&topo.tasks, "job-3", &q3).await.unwrap();
    let cancelled = TaskRecord { state: TaskState::Failed, ..q3.clone() };
    fleet.kv_update(&topo.tasks, "job-3", &cancelled, rev3).await.unwrap();
    propose(&fleet, &q3, rev3, "r1-echo-0", "job-3:1").await;
    // Two assignments of the same attempt from the same record (as after a dispatcher
    // fail-over): one claim wins, the task runs once.
    let q4 = queued("job-4");
    let rev4 = fleet.kv_create(&topo.tasks, "job-4", &q4).await.unwrap();
    propose(&fleet, &q4, rev4, "r1-echo-0", "job-4:1:a").await;
    propose(&fleet, &q4, rev4, "r1-echo-1", "job-4:1:b").await;
    let done4: TaskRecord = eventually(Duration::from_secs(10), "job-4 to complete", || async {
        let (r, _) = fleet.kv_get::<TaskRecord>(&topo.tasks, "job-4").await.unwrap()?;
        (r.state == TaskState::Completed).then_some(r)
    })
    .await;
    assert_eq!(done4.attempt, 1);
    eventually(Duration::from_secs(10), "the losing and the stale assignments to be fenced", || async {
        (health(&fleet).await.details["fenced"] == 3).then_some(())
    })
    .await;
    let h = health(&fleet).await;
    assert_eq!(h.details["executions"], 4, "job-1, job-2 twice, job-4 once; job-3 never: {h:?}");
    let (r3, _) = fleet.kv_get::<TaskRecord>(&topo.tasks, "job-3").await.unwrap().unwrap();
    assert_eq!(r3.state, TaskState::Failed, "the cancelled task stays cancelled");

    // Shutdown deregisters the agents.
    shutdown.cancel();
    runner.await.unwrap().unwrap();
    assert!(fleet.kv_get::<AgentRecord>(&topo.agents, "r1-echo-0").await.unwrap().is_none());
}
