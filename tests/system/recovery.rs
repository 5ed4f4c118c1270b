//! Recovery in seconds: a runner killed and restarted under the same id (as a supervisor does)
//! takes back at once the assignments its previous incarnation held, instead of leaving them to
//! the ack wait; nothing completes twice.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use flotilla_protocol::WireFormat;
use flotilla_service::StreamSettings;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runner_restarted_under_its_id_takes_its_work_back_at_once() {
    let mut sys = System::start(StreamSettings::default(), WireFormat::Msgpack).await;
    // The dispatcher would notice the lost agents only after 30 missed heartbeats (9 s): the
    // restart comes long before, as a supervisor's does.
    sys.start_dispatcher(flotilla_dispatcher::Config { missed_heartbeats: 30, ..dispatcher_config() }).await;
    let fleet = worker_fleet(1, 4);
    let mut first = sys.spawn_runner_process("ra", &fleet);
    sys.wait_for_agents("ra", 1).await;
    let ids: Vec<String> = (0..4).map(|i| format!("held-{i}")).collect();
    for id in &ids {
        sys.submit(&sleeping(id.clone(), 1_500)).await;
    }
    sys.wait_for_kind("started", 4, Duration::from_secs(20)).await;
    first.kill9();
    let killed = Instant::now();
    let _second = sys.spawn_runner_process("ra", &fleet);
    let events = sys.wait_for_kind("completed", 4, Duration::from_secs(25)).await;
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "the restarted runner took its work back in {took:?}, not at the ack wait"
    );
    let completed = count_by_task(&events, "completed");
    assert!(ids.iter().all(|id| completed.get(id) == Some(&1)), "each completes once: {completed:?}");
    // Taken back by the new incarnation: the same attempt claimed again, not requeued.
    let all = sys.events().await;
    assert!(!all.iter().any(|e| e.kind == "requeued"), "nothing waited for the loss to be noticed");
    for id in &ids {
        assert_eq!(sys.task(id).await.unwrap().attempt, 1, "{id}: the same attempt, claimed again");
    }
    eprintln!(
        "recovery after a runner restart: {took:?} from the kill to the last completion (bound 8 s, ack wait 30 s)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submissions_held_by_a_killed_dispatcher_are_taken_in_within_seconds() {
    const N: usize = 3000;
    let mut sys = System::start(StreamSettings::default(), WireFormat::Msgpack).await;
    let mut dispatchers = crate::failover::two_dispatchers(&sys, "3s").await;
    sys.start_runner("r1", &worker_fleet(1, 8)).await;
    sys.wait_for_agents("r1", 1).await;
    // Both instances take submissions in (the standby too); the standby dies with kill -9 in the
    // middle of a burst, holding some it had not acknowledged.
    let mut published = std::collections::HashMap::new();
    let mut acks = Vec::with_capacity(N);
    let mut held = 0;
    for i in 0..N {
        let sub = sleeping(format!("in-{i:04}"), 1);
        let mut h = async_nats::HeaderMap::new();
        h.insert(flotilla_protocol::headers::CONTENT_TYPE, flotilla_protocol::headers::APPLICATION_MSGPACK);
        let payload = flotilla_protocol::codec::encode(WireFormat::Msgpack, &sub).unwrap();
        published.insert(sub.id.clone().unwrap(), flotilla_protocol::time::now_ms());
        acks.push(sys.js.publish_with_headers(sys.names.submit_subject(), h, payload.into()).await.unwrap());
        if i == N / 2 {
            dispatchers.get_mut("d2").unwrap().kill9();
            // Unacknowledged a moment later: mostly the dead instance's (the survivor acknowledges
            // within milliseconds). With the old 30 s ack wait this test fails about every other
            // run (the slowest 30.1 s); the instance killed mid-burst does not always hold some.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let stream = sys.js.get_stream(sys.names.submissions_stream()).await.unwrap();
            let mut c = stream
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
                    &sys.names.dispatcher_intake_consumer(),
                )
                .await
                .unwrap();
            held = c.info().await.unwrap().num_ack_pending;
        }
    }

    for ack in acks {
        ack.await.unwrap();
    }
    let events = sys.wait_for_kind("accepted", N, Duration::from_secs(60)).await;
    let slowest = events
        .iter()
        .filter(|e| e.kind == "accepted")
        .filter_map(|e| published.get(&e.task_id).map(|p| e.at_ms.saturating_sub(*p)))
        .max()
        .unwrap();
    eprintln!(
        "submissions with a dispatcher killed ({held} unacknowledged just after): the slowest taken in {slowest} ms after it was published (bound 5 s)"
    );
    assert!(slowest < 5_000, "a submission waited {slowest} ms for a dead dispatcher");
    assert_eq!(count_by_task(&events, "accepted").len(), N);
    assert!(count_by_task(&events, "accepted").values().all(|&n| n == 1));
}

/// A tool that panics its first `crashes` calls, then answers.
#[derive(Debug)]
struct Crashy {
    calls: std::sync::atomic::AtomicU32,
    crashes: u32,
}

impl flotilla_agent_runner::tools::Tool for Crashy {
    fn spec(&self) -> flotilla_agent_runner::llm::ToolSpec {
        flotilla_agent_runner::llm::ToolSpec {
            name: "crashy".into(),
            description: "panics a few times".into(),
            parameters: serde_json::json!({"type": "object"}),
        }
    }

    fn call<'a>(
        &'a self,
        _ctx: &'a flotilla_agent_runner::tools::ToolCtx,
        _args: serde_json::Value,
    ) -> futures::future::BoxFuture<'a, Result<serde_json::Value, flotilla_agent_runner::tools::ToolError>>
    {
        Box::pin(async move {
            if self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < self.crashes {
                panic!("injected crash");
            }
            Ok(serde_json::json!("fine now"))
        })
    }
}

/// The agent's registry record.
async fn record(sys: &System, agent: &str) -> Option<flotilla_protocol::AgentRecord> {
    sys.fleet()
        .kv_get::<flotilla_protocol::AgentRecord>(&sys.topology.agents, agent)
        .await
        .ok()?
        .map(|(r, _)| r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_crashed_into_error_takes_work_again_after_its_cool_down() {
    let mut sys = System::with_dispatcher().await;
    // Four crashes: three in a row send the agent to ERROR; back after 1 s, its trial attempt
    // crashes again (ERROR for 2 s, the cool-down doubled); back again, the next attempt ends
    // the crash loop.
    let mut registry = flotilla_agent_runner::tools::Registry::with_builtins().unwrap();
    registry.add(std::sync::Arc::new(Crashy { calls: Default::default(), crashes: 4 })).unwrap();
    let config = flotilla_agent_runner::Config {
        error_cooldown: Duration::from_secs(1),
        error_recoveries: 3,
        ..runner_config("r1")
    };
    let fleet = "[[agent]]\nname = \"fragile\"\ncapabilities = [\"fragile\"]\ntools = [\"crashy\"]\n";
    sys.start_runner_configured("r1", fleet, config, registry).await;
    sys.wait_for_agents("r1", 1).await;
    let submitted = Instant::now();
    sys.submit(&flotilla_protocol::TaskSubmission {
        id: Some("bumpy".into()),
        capability: "fragile".into(),
        max_attempts: Some(10),
        input: serde_json::json!({ "text": "try", "_offline": { "tool_calls": [{ "name": "crashy", "arguments": {} }] } }),
        ..Default::default()
    })
    .await;
    // The registry shows ERROR with when it ends, then the crash loop while on trial.
    let (mut saw_error, mut saw_second_error, mut saw_loop) = (None, false, false);
    let deadline = Instant::now() + Duration::from_secs(40);
    while Instant::now() < deadline {
        if let Some(r) = record(&sys, "r1-fragile-0").await {
            if r.status == flotilla_protocol::AgentStatus::Error {
                assert!(r.error_until_ms.is_some(), "a cool-down is shown: {r:?}");
                saw_error.get_or_insert(Instant::now());
                saw_second_error |= r.recoveries >= 1;
            } else if r.recoveries > 0 {
                saw_loop = true;
            }
        }
        if sys.task("bumpy").await.is_some_and(|t| t.state == flotilla_protocol::TaskState::Completed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rec = sys.task("bumpy").await.unwrap();
    assert_eq!(rec.state, flotilla_protocol::TaskState::Completed, "{rec:?}");
    assert!(saw_error.is_some() && saw_second_error && saw_loop, "ERROR, trial, ERROR again, trial");
    eprintln!(
        "agent driven into ERROR twice by 4 crashes: completed {:.1} s after submission \
         (cool-downs 1 s then 2 s; ERROR first seen {:.1} s after submission)",
        submitted.elapsed().as_secs_f64(),
        saw_error.map(|t| (t - submitted).as_secs_f64()).unwrap_or_default(),
    );
    // The loop is over: a clean record again.
    let r = flotilla_testkit::eventually(Duration::from_secs(5), "the crash loop to end", || async {
        record(&sys, "r1-fragile-0")
            .await
            .filter(|r| r.recoveries == 0 && r.status == flotilla_protocol::AgentStatus::Idle)
    })
    .await;
    assert_eq!(r.error_until_ms, None);
    sys.stop().await;
}

// ---- kill loops ----------------------------------------------------------------------------

/// The kill loops load the machine: one at a time.
static ONE_LOOP_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Tasks of a kill loop, and the rate they are submitted at.
const LOOP_TASKS: usize = 5_000;
const LOOP_RATE: u64 = 150;
/// No task's submit → completed may exceed this, kills or not.
const LOOP_BOUND: Duration = Duration::from_secs(5);

/// A kill: when, and of what.
type Kill = (Instant, String);

/// Submits the loop's tasks at its rate (each a 20 ms offline model call) while the returned
/// flag says so, and collects how long each took from its publication to its `completed` event
/// (as this client saw both), until every task completed or two minutes after the last
/// submission. Prints and asserts the bounds: nothing lost, nothing completed twice (counted
/// from the events stream), no task slower than [`LOOP_BOUND`].
async fn kill_loop(sys: &System, what: &str, chaos: impl std::future::Future<Output = Vec<Kill>>) {
    use futures::StreamExt as _;
    let mut completions = sys.client.subscribe(sys.names.task_events_all()).await.unwrap();
    let started = Instant::now();
    let submitting = async {
        let mut published: std::collections::HashMap<String, Instant> = Default::default();
        let mut acks = Vec::with_capacity(LOOP_TASKS);
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / LOOP_RATE));
        for i in 0..LOOP_TASKS {
            tick.tick().await;
            let sub = sleeping(format!("kl-{i:04}"), 20);
            let mut h = async_nats::HeaderMap::new();
            h.insert(
                flotilla_protocol::headers::CONTENT_TYPE,
                flotilla_protocol::headers::APPLICATION_MSGPACK,
            );
            h.insert(flotilla_protocol::headers::NATS_MSG_ID, sub.id.clone().unwrap().as_str());
            let payload = flotilla_protocol::codec::encode(WireFormat::Msgpack, &sub).unwrap();
            published.insert(sub.id.clone().unwrap(), Instant::now());
            acks.push(
                sys.js.publish_with_headers(sys.names.submit_subject(), h, payload.into()).await.unwrap(),
            );
        }
        for a in acks {
            a.await.unwrap();
        }
        published
    };
    let mut done: std::collections::HashMap<String, Instant> = Default::default();
    let collecting = async {
        while done.len() < LOOP_TASKS {
            let Some(m) = completions.next().await else { break };
            if let Some((_, task, kind)) = sys.names.parse_task_event_subject(&m.subject)
                && kind == "completed"
            {
                done.entry(task.to_owned()).or_insert_with(Instant::now);
            }
        }
    };
    let (published, kills, ()) = tokio::join!(submitting, chaos, async {
        let _ =
            tokio::time::timeout(Duration::from_secs(40 + LOOP_TASKS as u64 / LOOP_RATE + 120), collecting)
                .await;
    });
    let latency: std::collections::HashMap<&String, Duration> = published
        .iter()
        .filter_map(|(id, at)| done.get(id).map(|d| (id, d.saturating_duration_since(*at))))
        .collect();
    let missing: Vec<&String> = published.keys().filter(|id| !done.contains_key(*id)).collect();
    let events = sys.events().await;
    let twice: Vec<(String, usize)> =
        count_by_task(&events, "completed").into_iter().filter(|(_, n)| *n != 1).collect();
    let mut all: Vec<Duration> = latency.values().copied().collect();
    all.sort();
    let p = |q: f64| all.get(((all.len().max(1) - 1) as f64 * q) as usize).copied().unwrap_or_default();
    let (slowest_id, slowest) =
        latency.iter().max_by_key(|(_, d)| **d).map(|(id, d)| ((*id).clone(), *d)).unwrap_or_default();
    let requeued = events.iter().filter(|e| e.kind == "requeued").count();
    eprintln!(
        "{what}: {} kills in {:.0} s; {LOOP_TASKS} tasks at {LOOP_RATE}/s on nats/server.conf: {} lost, {} \
         completed twice, {requeued} attempts requeued; submit → completed p50 {:.0} ms, p99 {:.0} ms, \
         longest {:.2} s ({slowest_id}; bound {:.0} s)",
        kills.len(),
        started.elapsed().as_secs_f64(),
        missing.len(),
        twice.len(),
        p(0.5).as_secs_f64() * 1000.0,
        p(0.99).as_secs_f64() * 1000.0,
        slowest.as_secs_f64(),
        LOOP_BOUND.as_secs_f64(),
    );
    for (at, who) in &kills {
        // The slowest task submitted around each kill: the recovery time of that kind of kill.
        let around = latency
            .iter()
            .filter(|(id, _)| {
                published
                    .get(**id)
                    .is_some_and(|p| *p + Duration::from_secs(4) >= *at && *p <= *at + Duration::from_secs(2))
            })
            .map(|(_, d)| *d)
            .max()
            .unwrap_or_default();
        eprintln!(
            "  +{:>5.1} s kill -9 of {who}: the slowest task submitted around it took {:.2} s (bound {:.0} s)",
            (*at - started).as_secs_f64(),
            around.as_secs_f64(),
            LOOP_BOUND.as_secs_f64()
        );
    }
    assert!(missing.is_empty(), "{} tasks never completed, e.g. {:?}", missing.len(), missing.first());
    assert!(twice.is_empty(), "tasks completed more than once: {twice:?}");
    assert!(slowest <= LOOP_BOUND, "{slowest_id} took {slowest:?} from submission to completion");
}

/// A budget-keeper process named `instance` with the default 3 s lease.
fn spawn_keeper(sys: &System, instance: &str) -> flotilla_testkit::ChildProcess {
    let prefix = sys.names.prefix().to_string();
    let creds =
        sys.server.creds(&prefix, "budget-keeper").map(|p| p.display().to_string()).unwrap_or_default();
    flotilla_testkit::ChildProcess::spawn(
        &flotilla_testkit::bin("flotilla-budget-keeper"),
        &[],
        &[
            ("FLOTILLA_CREDS", &creds),
            ("FLOTILLA_NATS_URL", sys.server.url()),
            ("FLOTILLA_INSTANCE", instance),
            ("FLOTILLA_PREFIX", &prefix),
            ("RUST_LOG", "warn"),
        ],
    )
    .unwrap()
}

/// The holder of lease `key`.
async fn holder(sys: &System, key: &str) -> Option<String> {
    let (l, _) = sys.fleet().kv_get::<flotilla_protocol::Lease>(&sys.topology.leases, key).await.ok()??;
    Some(l.holder)
}

/// Three runner processes `k0`..`k2` with the production heartbeat (1 s).
async fn three_runners(sys: &System) -> Vec<flotilla_testkit::ChildProcess> {
    let fleet = worker_fleet(4, 4);
    let runners: Vec<_> = (0..3)
        .map(|i| {
            sys.spawn_runner_process_with_env(
                &format!("k{i}"),
                &fleet,
                &[("FLOTILLA_AGENT_RUNNER__HEARTBEAT_INTERVAL", "1s")],
            )
        })
        .collect();
    for i in 0..3 {
        sys.wait_for_agents(&format!("k{i}"), 4).await;
    }
    runners
}

#[ignore = "issue 15 kill loop: written, not yet run to a pass (cargo test -- --ignored recovery::)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runners_killed_every_5s_and_restarted_lose_nothing_and_delay_no_task_over_5s() {
    let _one = ONE_LOOP_AT_A_TIME.lock().await;
    let server = std::sync::Arc::new(flotilla_testkit::NatsServer::start_durable());
    let mut sys = System::start_on(server, "flotilla", StreamSettings::default(), WireFormat::Msgpack).await;
    sys.start_dispatcher(dispatcher_config()).await;
    let runners = std::sync::Mutex::new(three_runners(&sys).await);
    let fleet = worker_fleet(4, 4);
    let chaos = async {
        let mut kills = Vec::new();
        let end = Instant::now() + Duration::from_secs(LOOP_TASKS as u64 / LOOP_RATE);
        let mut n = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            if Instant::now() + Duration::from_secs(2) > end {
                break kills;
            }
            let i = n % 3;
            n += 1;
            runners.lock().unwrap()[i].kill9();
            kills.push((Instant::now(), format!("runner k{i}")));
            // A supervisor restarts it under the same id.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let fresh = sys.spawn_runner_process_with_env(
                &format!("k{i}"),
                &fleet,
                &[("FLOTILLA_AGENT_RUNNER__HEARTBEAT_INTERVAL", "1s")],
            );
            runners.lock().unwrap()[i] = fresh;
        }
    };
    kill_loop(&sys, "runner kill loop (3 runners, one killed every 5 s, restarted 2 s later)", chaos).await;
    sys.stop().await;
}

#[ignore = "issue 15 kill loop: written, not yet run to a pass (cargo test -- --ignored recovery::)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dispatchers_and_keepers_killed_in_turn_every_8s_lose_nothing_and_delay_no_task_over_5s() {
    let _one = ONE_LOOP_AT_A_TIME.lock().await;
    let server = std::sync::Arc::new(flotilla_testkit::NatsServer::start_durable());
    let mut sys = System::start_on(server, "flotilla", StreamSettings::default(), WireFormat::Msgpack).await;
    // Every model call reserved and committed with the keepers.
    sys.budgets = true;
    let dispatchers = std::sync::Mutex::new(crate::failover::two_dispatchers(&sys, "3s").await);
    let keepers = std::sync::Mutex::new(std::collections::HashMap::from([
        ("bk-a".to_owned(), spawn_keeper(&sys, "bk-a")),
        ("bk-b".to_owned(), spawn_keeper(&sys, "bk-b")),
    ]));
    let _runners = three_runners(&sys).await;
    let chaos = async {
        let mut kills = Vec::new();
        let end = Instant::now() + Duration::from_secs(LOOP_TASKS as u64 / LOOP_RATE);
        let mut n = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(8)).await;
            if Instant::now() + Duration::from_secs(3) > end {
                break kills;
            }
            // The active one of each, in turn; a supervisor restarts it a second later.
            let dispatcher = n % 2 == 0;
            n += 1;
            let key = if dispatcher {
                flotilla_protocol::names::lease_key::DISPATCHER
            } else {
                flotilla_protocol::names::lease_key::BUDGET_KEEPER
            };
            let Some(active) = holder(&sys, key).await else { continue };
            let killed = if dispatcher {
                dispatchers.lock().unwrap().get_mut(&active).map(|p| p.kill9()).is_some()
            } else {
                keepers.lock().unwrap().get_mut(&active).map(|p| p.kill9()).is_some()
            };
            if !killed {
                continue;
            }
            kills.push((
                Instant::now(),
                format!("the active {} {active}", if dispatcher { "dispatcher" } else { "budget-keeper" }),
            ));
            tokio::time::sleep(Duration::from_secs(1)).await;
            if dispatcher {
                let fresh = crate::failover::spawn_dispatcher(&sys, &active, "3s");
                dispatchers.lock().unwrap().insert(active, fresh);
            } else {
                let fresh = spawn_keeper(&sys, &active);
                keepers.lock().unwrap().insert(active, fresh);
            }
        }
    };
    kill_loop(
        &sys,
        "dispatcher and keeper kill loop (two of each, the active one killed every 8 s in turn)",
        chaos,
    )
    .await;
    sys.stop().await;
}
