//! The running fleet changes without restarting a runner: `flotilla agents spawn|scale|stop` and
//! raw scale requests on `<p>.runners.<runner>.scale`. New agents take work at once; a stopped
//! agent finishes what it holds, then leaves; nothing is lost or run twice.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::HashSet;
use std::time::Duration;

use crate::support::*;
use flotilla_protocol::{AgentEvent, AgentRecord, FleetChangeReply, TaskSubmission, WireFormat, codec};
use flotilla_service::StreamSettings;

async fn agent_ids(sys: &System) -> HashSet<String> {
    use futures::StreamExt as _;
    sys.topology.agents.keys().await.unwrap().filter_map(|k| async { k.ok() }).collect().await
}

fn slow(i: usize) -> TaskSubmission {
    sleeping(format!("fc-{i:03}"), 300)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_are_spawned_and_stopped_at_runtime_without_losing_work() {
    const N: usize = 40;
    let mut sys = System::with_dispatcher().await;
    sys.start_runner("ra", &worker_fleet(1, 2)).await;
    sys.wait_for_agents("ra", 1).await;
    let url = sys.server.url().to_owned();

    // spawn: two more agents of the template on the runner that hosts it.
    let (code, out, err) = cli(&url, &["agents", "spawn", "worker", "-n", "2"]).await;
    assert_eq!(code, 0, "spawn failed: {out}{err}");
    assert!(out.contains("runs 3 agents"), "{out}");
    assert!(out.contains("started: ra-worker-1, ra-worker-2"), "{out}");
    // Registered by the time the command returns.
    let ids = agent_ids(&sys).await;
    assert!(ids.contains("ra-worker-1") && ids.contains("ra-worker-2"), "{ids:?}");

    for i in 0..N {
        sys.submit(&slow(i)).await;
    }
    // The new agents take work.
    flotilla_testkit::eventually(Duration::from_secs(30), "spawned agents to start tasks", || async {
        let started: HashSet<String> = sys
            .events()
            .await
            .into_iter()
            .filter(|e| e.kind == "started")
            .filter_map(|e| e.agent_id)
            .collect();
        (started.contains("ra-worker-1") && started.contains("ra-worker-2")).then_some(())
    })
    .await;

    // stop: ra-worker-1 finishes what it holds, then leaves the registry.
    let (code, out, err) = cli(&url, &["agents", "stop", "ra-worker-1", "--wait"]).await;
    assert_eq!(code, 0, "stop failed: {out}{err}");
    assert!(out.contains("stopping (finishing their tasks, then leaving): ra-worker-1"), "{out}");
    assert!(out.contains("has stopped and left the registry"), "{out}");
    assert!(!agent_ids(&sys).await.contains("ra-worker-1"));
    let stopped_at = sys.events().await.len();

    // Every task completes exactly once, none of them on the stopped agent after it left.
    let events = sys.wait_for_kind("completed", N, Duration::from_secs(120)).await;
    let completed = count_by_task(&events, "completed");
    assert_eq!(completed.len(), N);
    assert!(completed.values().all(|&n| n == 1), "every task completes exactly once");
    assert!(
        events[stopped_at..].iter().all(|e| e.agent_id.as_deref() != Some("ra-worker-1")),
        "the stopped agent did no work after it left"
    );
    // Its lifecycle ended in `terminated`.
    let terminated = sys
        .read_stream(&sys.names.events_stream(), &sys.names.agent_event_subject("ra-worker-1", "terminated"))
        .await;
    assert_eq!(terminated.len(), 1);
    let ev: AgentEvent = codec::decode(None, &terminated[0].1).unwrap();
    assert_eq!(ev.agent_id, "ra-worker-1");

    // Stopping it again: not found (exit 3), and nothing else changes.
    let (code, _, err) = cli(&url, &["agents", "stop", "ra-worker-1"]).await;
    assert_eq!(code, 3, "{err}");

    // scale to 1 with the CLI: the surplus stops; the runner keeps one agent that still works.
    let (code, out, err) = cli(&url, &["--json", "agents", "scale", "worker", "1"]).await;
    assert_eq!(code, 0, "scale failed: {out}{err}");
    let reply: FleetChangeReply = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(reply.agents.len(), 1);
    flotilla_testkit::eventually(Duration::from_secs(10), "surplus agents to leave", || async {
        (agent_ids(&sys).await.len() == 1).then_some(())
    })
    .await;
    sys.submit(&slow(N)).await;
    sys.wait_for_kind("completed", N + 1, Duration::from_secs(30)).await;
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scale_requests_from_any_client_are_declarative_and_bad_ones_get_a_reason() {
    let mut sys = System::start(StreamSettings::default(), WireFormat::Msgpack).await;
    sys.start_runner("rb", &worker_fleet(1, 1)).await;
    sys.wait_for_agents("rb", 1).await;
    let subject = sys.names.runner_control("rb", "scale");
    let ask = |body: &'static str| {
        let (sys, subject) = (&sys, subject.clone());
        async move {
            let m = sys.signed_request(subject, body.as_bytes().to_vec()).await;
            serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap_or_else(|_| {
                serde_json::to_value(codec::decode::<FleetChangeReply>(None, &m.payload).unwrap()).unwrap()
            })
        }
    };
    // Plain JSON, twice: the second changes nothing.
    let first = ask(r#"{"template": "worker", "replicas": 3}"#).await;
    assert_eq!(first["agents"].as_array().unwrap().len(), 3, "{first}");
    assert_eq!(first["started"].as_array().unwrap().len(), 2, "{first}");
    let again = ask(r#"{"template": "worker", "replicas": 3}"#).await;
    assert_eq!(again["agents"], first["agents"], "{again}");
    assert!(again.get("started").is_none(), "{again}");
    sys.wait_for_agents("rb", 3).await;
    let store = sys.topology.agents.clone();
    let rec: AgentRecord = codec::decode(None, &store.get("rb-worker-2").await.unwrap().unwrap()).unwrap();
    assert_eq!(rec.name, "worker");

    for (body, code) in [
        (r#"{"template": "nope", "replicas": 1}"#, "unknown_template"),
        (r#"{"template": "worker"}"#, "missing_field"),
        (r#"{"template": "worker", "replicas": "many"}"#, "wrong_type"),
        (r#"{"template": "worker", "replicas": 1, "extra": true}"#, "*"),
        (r#"{not json"#, "malformed"),
        (r#"{"template": "worker", "replicas": 1000000}"#, "limit_exceeded"),
    ] {
        let reply = ask(body).await;
        let got = reply["error"]["code"].as_str().unwrap_or_default().to_owned();
        assert!(!got.is_empty(), "{body}: no error in {reply}");
        if code != "*" {
            assert_eq!(got, code, "{body}: {reply}");
        }
        eprintln!("{body} -> {reply}");
    }
    // Still serving, and still three agents.
    let reply = ask(r#"{"template": "worker", "replicas": 3}"#).await;
    assert_eq!(reply["agents"].as_array().unwrap().len(), 3, "{reply}");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scale_and_stop_record_who_asked_and_unsigned_ones_are_refused() {
    use flotilla_protocol::ControlEvent;
    let mut sys = System::start(StreamSettings::default(), WireFormat::Msgpack).await;
    sys.start_runner("rs", &worker_fleet(1, 1)).await;
    sys.wait_for_agents("rs", 1).await;
    let scale = sys.names.runner_control("rs", "scale");
    let body = br#"{"template": "worker", "replicas": 2}"#.to_vec();
    // Signed by operator test: done, and recorded as its.
    let m = sys.signed_request(scale.clone(), body.clone()).await;
    let reply: FleetChangeReply = codec::decode(None, &m.payload).unwrap();
    assert!(reply.error.is_none(), "{reply:?}");
    let stop = sys.names.runner_control("rs", "stop");
    let m = sys.signed_request(stop.clone(), br#"{"agent_id": "rs-worker-1"}"#.to_vec()).await;
    assert!(codec::decode::<FleetChangeReply>(None, &m.payload).unwrap().error.is_none());
    // Unsigned (the harness's admin connection): refused, with an event.
    let mut h = async_nats::HeaderMap::new();
    h.insert("Content-Type", "application/json");
    let m = sys.client.request_with_headers(
        scale,
        h,
        br#"{"template": "worker", "replicas": 5}"#.to_vec().into(),
    );
    let refused: FleetChangeReply = codec::decode(None, &m.await.unwrap().payload).unwrap();
    assert_eq!(refused.error.unwrap().code, "unauthorized");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let events = loop {
        let events: Vec<ControlEvent> = sys
            .read_stream(&sys.names.events_stream(), &sys.names.control_event_subject("*"))
            .await
            .into_iter()
            .map(|(_, p)| codec::decode(None, &p).unwrap())
            .collect();
        if events.len() >= 3 {
            break events;
        }
        assert!(tokio::time::Instant::now() < deadline, "control events missing: {events:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let of = |action: &str, kind: &str| events.iter().find(|e| e.action == action && e.kind == kind).cloned();
    let scaled = of("scale", "applied").unwrap();
    assert_eq!(scaled.actor.as_deref(), Some("test"), "{scaled:?}");
    let detail = scaled.detail.unwrap();
    assert_eq!(
        (detail["template"].as_str(), detail["replicas"].as_u64()),
        (Some("worker"), Some(2)),
        "{detail}"
    );
    assert_eq!(detail["runner_id"], "rs");
    let stopped = of("stop", "applied").unwrap();
    assert_eq!(
        (stopped.actor.as_deref(), stopped.detail.unwrap()["agent_id"].as_str()),
        (Some("test"), Some("rs-worker-1"))
    );
    assert_eq!(of("scale", "refused").unwrap().reason, "unsigned");
    // The refused request changed nothing: still one agent running after the stop.
    sys.stop().await;
}
