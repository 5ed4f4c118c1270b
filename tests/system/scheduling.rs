//! Scheduling policy end to end: strict priority over a saturated fleet, token-fair shares between
//! weighted tenants, and affinity that is a preference, never a stall.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::HashMap;
use std::time::Duration;

use crate::support::*;
use flotilla_protocol::{Priority, TaskEvent, TaskSubmission, WireFormat};
use flotilla_service::StreamSettings;

fn task(id: String, tenant: &str, priority: Priority, text: String, sleep_ms: u64) -> TaskSubmission {
    TaskSubmission {
        id: Some(id),
        capability: "work".into(),
        tenant: Some(tenant.into()),
        priority: Some(priority),
        input: serde_json::json!({ "text": text, "_offline": { "sleep_ms": sleep_ms } }),
        ..Default::default()
    }
}

fn position(events: &[TaskEvent], task: &str, kind: &str) -> usize {
    events
        .iter()
        .position(|e| e.task_id == task && e.kind == kind)
        .unwrap_or_else(|| panic!("no {kind} for {task}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_interactive_task_overtakes_a_saturating_batch_flood() {
    let mut sys = System::with_dispatcher().await;
    sys.start_runner("rp", &worker_fleet(2, 2)).await;
    sys.wait_for_agents("rp", 2).await;
    for i in 0..500 {
        sys.submit(&task(format!("batch-{i:03}"), "t", Priority::BATCH, format!("b{i}"), 40)).await;
    }
    // Saturated: every slot busy and a deep queue behind them.
    flotilla_testkit::eventually(Duration::from_secs(30), "the fleet to saturate", || async {
        let started = sys.events().await.iter().filter(|e| e.kind == "started").count();
        (started >= 8).then_some(())
    })
    .await;
    sys.submit(&task("urgent".into(), "t", Priority::INTERACTIVE, "now".into(), 0)).await;
    flotilla_testkit::eventually(Duration::from_secs(30), "the interactive task to complete", || async {
        sys.task("urgent").await.filter(|r| r.state == flotilla_protocol::TaskState::Completed)
    })
    .await;
    let events = sys.events().await;
    let accepted = position(&events, "urgent", "accepted");
    let assigned = position(&events, "urgent", "assigned");
    // "Next" in the order of decisions, once the dispatcher knew of the interactive task: every
    // `assigned` event says how far into the tasks bucket the dispatcher had read when it decided
    // (`seen_revision`). A batch task decided after the interactive task's record was known and
    // before the interactive task itself overtook it; none may (one is tolerated, as before).
    let created = {
        use futures::StreamExt as _;
        let mut h = sys.topology.tasks.history("urgent").await.unwrap();
        h.next().await.unwrap().unwrap().revision
    };
    let overtaken_by: Vec<String> = events[accepted..assigned]
        .iter()
        .filter(|e| e.kind == "assigned")
        .filter(|e| e.detail.as_ref().and_then(|d| d["seen_revision"].as_u64()).unwrap() >= created)
        .map(|e| e.task_id.clone())
        .collect();
    assert!(
        overtaken_by.len() <= 1,
        "batch tasks assigned after the interactive one arrived: {overtaken_by:?}"
    );
    let queued_batch = 500 - events[..assigned].iter().filter(|e| e.kind == "assigned").count();
    assert!(queued_batch > 100, "the batch queue was still deep ({queued_batch})");
    let reason = events[assigned].reason.clone().unwrap();
    assert!(reason == "idle_agent" || reason == "least_loaded", "{reason}");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn weighted_tenants_get_token_shares_by_weight() {
    let mut sys = System::start(StreamSettings::default(), WireFormat::Msgpack).await;
    let mut config = dispatcher_config();
    config.tenant_weights = [("light".to_owned(), 1.0), ("heavy".to_owned(), 3.0)].into();
    // No agent has declared the capability yet when the tasks arrive.
    config.unknown_capability = flotilla_dispatcher::UnknownCapability::Wait;
    sys.start_dispatcher(config).await;
    // Tasks of "light" use about twice the tokens of "heavy": shares by task count would be 1:6.
    for i in 0..150 {
        sys.submit(&task(format!("light-{i:03}"), "light", Priority::NORMAL, "x".repeat(800), 5)).await;
    }
    for i in 0..400 {
        sys.submit(&task(format!("heavy-{i:03}"), "heavy", Priority::NORMAL, "y".repeat(360), 5)).await;
    }
    // `flotilla queue` shows them, by capability, priority and tenant.
    let (code, out, err) = cli(sys.server.url(), &["--json", "queue", "--limit", "3"]).await;
    assert_eq!(code, 0, "{err}");
    let report: flotilla_protocol::QueueReport = serde_json::from_str(&out).unwrap();
    assert_eq!((report.queued, report.running), (550, 0));
    let group = |t: &str| {
        report.groups.iter().find(|g| g.tenant == t).map(|g| (g.capability.clone(), g.priority, g.tasks))
    };
    assert_eq!(group("light"), Some(("work".to_owned(), 5, 150)));
    assert_eq!(group("heavy"), Some(("work".to_owned(), 5, 400)));
    assert_eq!(report.oldest.len(), 3);
    assert!(report.oldest[0].task_id.starts_with("light-"), "{:?}", report.oldest);

    // The fleet starts after the queues are full, so every decision is under contention.
    sys.start_runner("rf", &worker_fleet(1, 2)).await;
    let events = sys.wait_for_kind("completed", 300, Duration::from_secs(120)).await;
    let completed: Vec<&TaskEvent> = events.iter().filter(|e| e.kind == "completed").take(300).collect();
    let mut tokens: HashMap<String, u64> = HashMap::new();
    for e in &completed {
        let tenant = e.task_id.split('-').next().unwrap().to_owned();
        *tokens.entry(tenant).or_default() += e.usage.unwrap().total_tokens;
    }
    let (light, heavy) = (tokens["light"] as f64, tokens["heavy"] as f64);
    let share = heavy / (light + heavy);
    eprintln!("token shares over the first 300 completions: heavy {share:.3}, light {:.3}", 1.0 - share);
    assert!((share - 0.75).abs() <= 0.075, "heavy's token share {share:.3} is not within 10 % of 3:1");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_context_stays_on_its_agent_while_it_keeps_up_and_moves_when_it_is_busy() {
    let mut sys = System::with_dispatcher().await;
    sys.start_runner("ra", &worker_fleet(3, 2)).await;
    sys.wait_for_agents("ra", 3).await;
    let keyed = |id: String, sleep_ms: u64| TaskSubmission {
        context_key: Some("conversation-7".into()),
        ..task(id, "t", Priority::NORMAL, "hello".into(), sleep_ms)
    };
    for i in 0..100 {
        sys.submit(&keyed(format!("ctx-{i:03}"), 0)).await;
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let events = sys.wait_for_kind("completed", 100, Duration::from_secs(60)).await;
    let agents: std::collections::HashSet<String> =
        events.iter().filter(|e| e.kind == "assigned").filter_map(|e| e.agent_id.clone()).collect();
    assert_eq!(agents.len(), 1, "all 100 tasks on one agent: {agents:?}");
    let home = agents.into_iter().next().unwrap();
    let hits =
        events.iter().filter(|e| e.kind == "assigned" && e.reason.as_deref() == Some("affinity_hit")).count();
    assert_eq!(hits, 99, "every task after the first is an affinity hit");

    // Hold the home agent busy beyond the affinity wait: the next tasks go elsewhere. (First let
    // the scheduler see the last of the 100 finish: on a loaded machine a slot it still counts
    // busy would send a hold elsewhere after its affinity wait, and the context with it.)
    tokio::time::sleep(Duration::from_millis(500)).await;
    sys.submit(&keyed("hold-1".into(), 4000)).await;
    sys.submit(&keyed("hold-2".into(), 4000)).await;
    flotilla_testkit::eventually(Duration::from_secs(10), "the home agent to be busy", || async {
        let ev = sys.events().await;
        let busy =
            ["hold-1", "hold-2"].iter().all(|t| ev.iter().any(|e| e.task_id == *t && e.kind == "started"));
        busy.then_some(())
    })
    .await;
    let t0 = std::time::Instant::now();
    for i in 0..4 {
        sys.submit(&keyed(format!("moved-{i}"), 0)).await;
    }
    let events = sys.wait_for_kind("completed", 104, Duration::from_secs(10)).await;
    assert!(t0.elapsed() < Duration::from_secs(3), "affinity is a preference, never a stall");
    for i in 0..4 {
        let a = events.iter().find(|e| e.task_id == format!("moved-{i}") && e.kind == "assigned").unwrap();
        assert_ne!(a.agent_id.as_deref(), Some(home.as_str()), "moved-{i} went to the busy agent");
    }
    // The first waited for the home agent, then took another; the context follows it there.
    let first = events.iter().find(|e| e.task_id == "moved-0" && e.kind == "assigned").unwrap();
    assert_eq!(first.reason.as_deref(), Some("affinity_timeout"));
    let waited = first.detail.as_ref().unwrap()["waited_ms"].as_u64().unwrap();
    assert!(waited >= 200, "it waited for its agent first ({waited} ms)");
    sys.stop().await;
}
