//! High availability of the dispatcher: two `flotilla-dispatcher` processes, of which exactly one
//! (the holder of the lease) schedules. `kill -9` of the active one under load: the standby takes
//! over within 5 s and every task still completes exactly once. A clean stop hands over at once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::support::*;
use async_nats::jetstream::kv;
use flotilla_protocol::names::lease_key;
use flotilla_protocol::{HealthReply, Lease, TaskState, TaskSubmission, WireFormat, codec, headers};
use flotilla_service::StreamSettings;
use flotilla_testkit::{ChildProcess, bin, eventually};
use futures::StreamExt as _;

/// A dispatcher as a separate process, named `instance`, with lease TTL `ttl` (e.g. `"3s"`).
pub(crate) fn spawn_dispatcher(sys: &System, instance: &str, ttl: &str) -> ChildProcess {
    let format = if sys.format == WireFormat::Json { "json" } else { "msgpack" };
    let prefix = sys.names.prefix().to_string();
    let creds = sys.server.creds(&prefix, "dispatcher").map(|p| p.display().to_string()).unwrap_or_default();
    ChildProcess::spawn(
        &bin("flotilla-dispatcher"),
        &[],
        &[
            ("FLOTILLA_CREDS", &creds),
            ("FLOTILLA_NATS_URL", sys.server.url()),
            ("FLOTILLA_INSTANCE", instance),
            ("FLOTILLA_PREFIX", &prefix),
            ("FLOTILLA_WIRE_FORMAT", format),
            ("FLOTILLA_DISPATCHER__TICK", "100ms"),
            ("FLOTILLA_DISPATCHER__LEASE_TTL", ttl),
            ("RUST_LOG", "warn,flotilla_dispatcher::lease=info"),
        ],
    )
    .unwrap()
}

/// The dispatcher lease as it stands (`None` when free).
pub(crate) async fn lease(sys: &System) -> Option<Lease> {
    let entry = sys.topology.leases.entry(lease_key::DISPATCHER).await.unwrap()?;
    (entry.operation == kv::Operation::Put).then(|| codec::decode(None, &entry.value).unwrap())
}

/// Health of one dispatcher instance, or `None` when it does not answer.
async fn health(sys: &System, instance: &str) -> Option<HealthReply> {
    let subject = sys.names.instance_health_subject("dispatcher", instance);
    let request = sys.client.request(subject, bytes::Bytes::new());
    let reply = tokio::time::timeout(Duration::from_secs(2), request).await.ok()?.ok()?;
    codec::decode(None, &reply.payload).ok()
}

/// Starts `d1` and, once it holds the lease, `d2`; waits until `d2` answers as a standby.
pub(crate) async fn two_dispatchers(sys: &System, ttl: &str) -> HashMap<String, ChildProcess> {
    let d1 = spawn_dispatcher(sys, "d1", ttl);
    eventually(Duration::from_secs(60), "d1 to hold the lease", || async {
        lease(sys).await.filter(|l| l.holder == "d1").map(drop)
    })
    .await;
    let d2 = spawn_dispatcher(sys, "d2", ttl);
    eventually(Duration::from_secs(30), "d2 to stand by", || async {
        health(sys, "d2").await.filter(|h| h.details["role"] == "standby").map(drop)
    })
    .await;
    HashMap::from([("d1".to_owned(), d1), ("d2".to_owned(), d2)])
}

/// Publishes all submissions, then collects the acks.
async fn submit_all(sys: &System, subs: &[TaskSubmission]) {
    let mut acks = Vec::with_capacity(subs.len());
    for sub in subs {
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::CONTENT_TYPE, headers::APPLICATION_MSGPACK);
        let payload = codec::encode(WireFormat::Msgpack, sub).unwrap();
        acks.push(sys.js.publish_with_headers(sys.names.submit_subject(), h, payload.into()).await.unwrap());
    }
    for ack in acks {
        ack.await.unwrap();
    }
}

/// How many tasks have a `completed` event in the events stream: the number of distinct
/// `<p>.events.task.<tenant>.<id>.completed` subjects, counted by the server.
async fn completed_tasks(sys: &System) -> usize {
    let stream = sys.js.get_stream(sys.names.events_stream()).await.unwrap();
    let subjects = stream.info_with_subjects(sys.names.task_events_kind("completed")).await.unwrap();
    subjects.count().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_the_active_dispatcher_under_load_hands_over_within_5s_and_runs_every_task_once() {
    const N: usize = 2000;
    let sys = System::start(StreamSettings::default(), WireFormat::Msgpack).await;
    // The default lease TTL (3 s): the acceptance asks for a standby within 5 s.
    let mut dispatchers = two_dispatchers(&sys, "3s").await;
    let fleet = worker_fleet(2, 8);
    let _runners = sys.two_runner_processes(&fleet, 2).await;

    let subs: Vec<TaskSubmission> = (0..N).map(|i| sleeping(format!("f{i:04}"), 20)).collect();
    submit_all(&sys, &subs).await;

    // Kill the active dispatcher while tasks are in flight.
    eventually(Duration::from_secs(120), "some tasks to complete", || async {
        (completed_tasks(&sys).await >= N / 5).then_some(())
    })
    .await;
    let before = lease(&sys).await.expect("a dispatcher holds the lease");
    let standby = if before.holder == "d1" { "d2" } else { "d1" };
    dispatchers.get_mut(&before.holder).unwrap().kill9();
    let killed_at = Instant::now();
    let completed_at_kill = completed_tasks(&sys).await;
    assert!(completed_at_kill < N, "the kill came while tasks were in flight");

    let after = eventually(Duration::from_secs(10), "the standby to take the lease", || async {
        lease(&sys).await.filter(|l| l.holder == standby)
    })
    .await;
    let takeover = killed_at.elapsed();
    eprintln!(
        "take-over after kill -9 of {}: {takeover:?} ({completed_at_kill} of {N} tasks done at the kill)",
        before.holder
    );
    assert!(takeover < Duration::from_secs(5), "standby active after {takeover:?}");
    assert!(after.epoch > before.epoch, "a new epoch: {} then {}", before.epoch, after.epoch);
    eventually(Duration::from_secs(5), "the survivor to report itself active", || async {
        health(&sys, standby).await.filter(|h| h.details["role"] == "active").map(drop)
    })
    .await;

    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let n = completed_tasks(&sys).await;
        if n >= N {
            break;
        }
        if Instant::now() > deadline {
            let mut states: HashMap<String, usize> = HashMap::new();
            for i in 0..N {
                let st = sys.task(&format!("f{i:04}")).await.map(|t| format!("{:?}", t.state));
                *states.entry(st.unwrap_or_else(|| "missing".into())).or_default() += 1;
            }
            eprintln!("{n} completed; task states {states:?}");
            eprintln!("{standby}: {:?}", health(&sys, standby).await.map(|h| h.details));
            for r in ["ra", "rb"] {
                eprintln!("{r}: {}", sys.health("agent-runner", r).await.details);
            }
            panic!("not every task completed");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let events = sys.wait_for_kind("completed", N, Duration::from_secs(30)).await;
    let completed = count_by_task(&events, "completed");
    assert_eq!(completed.len(), N);
    let twice: Vec<_> = completed.iter().filter(|&(_, &n)| n != 1).collect();
    assert!(twice.is_empty(), "tasks completed more than once: {twice:?}");
    let mut outputs: HashMap<&str, HashSet<String>> = HashMap::new();
    for e in events.iter().filter(|e| e.kind == "completed") {
        outputs.entry(e.task_id.as_str()).or_default().insert(format!("{:?}", e.output));
    }
    assert!(outputs.values().all(|o| o.len() == 1), "no task has two different outputs");
    // Nobody was lost, so the new active dispatcher took no work back after the take-over.
    let requeued: Vec<_> = events.iter().filter(|e| e.kind == "requeued").collect();
    assert!(requeued.is_empty(), "healthy work was requeued after the take-over: {requeued:?}");
    // Executions, as the runners count them: one per task.
    let mut executions = 0;
    for r in ["ra", "rb"] {
        executions += sys.health("agent-runner", r).await.details["executions"].as_u64().unwrap();
    }
    assert_eq!(executions, N as u64, "every task ran once");
    for i in (0..N).step_by(101) {
        assert_eq!(sys.task(&format!("f{i:04}")).await.unwrap().state, TaskState::Completed);
    }
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_two_dispatchers_exactly_one_schedules() {
    const N: usize = 40;
    let mut sys = System::start(StreamSettings::default(), WireFormat::Msgpack).await;
    let _dispatchers = two_dispatchers(&sys, "1s").await;
    sys.start_runner("r1", &worker_fleet(2, 4)).await;
    sys.wait_for_agents("r1", 2).await;
    let subs: Vec<TaskSubmission> = (0..N).map(|i| sleeping(format!("one-{i:02}"), 10)).collect();
    submit_all(&sys, &subs).await;
    let events = sys.wait_for_kind("completed", N, Duration::from_secs(60)).await;
    assert!(count_by_task(&events, "completed").values().all(|&n| n == 1));

    let holder = lease(&sys).await.unwrap().holder;
    let mut replies = Vec::new();
    for d in ["d1", "d2"] {
        replies.push(health(&sys, d).await.unwrap());
    }
    let active: Vec<&HealthReply> = replies.iter().filter(|h| h.details["role"] == "active").collect();
    assert_eq!(active.len(), 1, "exactly one active: {replies:?}");
    assert_eq!(active[0].instance, holder, "the active one holds the lease");
    for h in &replies {
        assert_eq!(h.details["holder"], holder.as_str(), "{} agrees on the holder", h.instance);
        // Only the active dispatcher assigned anything; intake ran on both.
        let expect = if h.instance == holder { N as u64 } else { 0 };
        assert_eq!(h.details["assigned"], expect, "assignments by {}: {}", h.instance, h.details);
    }
    let accepted: u64 = replies.iter().map(|h| h.details["accepted"].as_u64().unwrap()).sum();
    assert_eq!(accepted, N as u64);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_of_the_active_dispatcher_hands_over_at_once() {
    let mut sys = System::start(StreamSettings::default(), WireFormat::Msgpack).await;
    // The default TTL: a take-over well inside it shows the lease was released, not left to run out.
    let mut dispatchers = two_dispatchers(&sys, "3s").await;
    sys.start_runner("r1", &worker_fleet(1, 4)).await;
    sys.wait_for_agents("r1", 1).await;

    let before = lease(&sys).await.unwrap();
    let standby = if before.holder == "d1" { "d2" } else { "d1" };
    let mut active = dispatchers.remove(&before.holder).unwrap();
    active.signal("TERM");
    let signalled = Instant::now();
    let after = eventually(Duration::from_secs(10), "the standby to take the lease", || async {
        lease(&sys).await.filter(|l| l.holder == standby)
    })
    .await;
    let handover = signalled.elapsed();
    eprintln!("hand-over after SIGTERM of {}: {handover:?}", before.holder);
    assert!(handover < Duration::from_millis(1500), "hand-over took {handover:?}");
    assert!(after.epoch > before.epoch);
    let code =
        tokio::task::spawn_blocking(move || active.wait_timeout(Duration::from_secs(30))).await.unwrap();
    assert_eq!(code, Some(0), "the stopped dispatcher exits 0");

    // The new active dispatcher schedules.
    let subs: Vec<TaskSubmission> = (0..5).map(|i| sleeping(format!("after-{i}"), 10)).collect();
    submit_all(&sys, &subs).await;
    let events = sys.wait_for_kind("completed", 5, Duration::from_secs(30)).await;
    assert!(events.iter().filter(|e| e.kind == "assigned").count() >= 5);
    let h = health(&sys, standby).await.unwrap();
    assert_eq!(h.details["role"], "active");
    assert_eq!(h.details["assigned"], 5);
    sys.stop().await;
}
