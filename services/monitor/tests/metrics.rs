//! The monitor counts task events from the stream and serves them as Prometheus text.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use flotilla_protocol::{Names, Prefix, TaskEvent, Usage, WireFormat};
use flotilla_service::Service as _;
use flotilla_service::{Fleet, Mode, StreamSettings, Topology};
use flotilla_testkit::{NatsServer, eventually, http_get};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_events_show_up_in_metrics() {
    let server = NatsServer::start();
    let fleet =
        Fleet::new(server.client().await, Names::new(Prefix::default()), WireFormat::Json, "m1".into());
    let topo =
        Topology::ensure(&fleet.js, &fleet.names, &StreamSettings::default(), Mode::Own).await.unwrap();
    // Events published before the monitor starts are counted too (it replays the stream).
    for (id, kind) in [("a", "accepted"), ("a", "completed"), ("b", "accepted")] {
        let mut e = TaskEvent::new(id, kind);
        if kind == "completed" {
            e.usage = Some(Usage::new(30, 12));
            e.calls = vec![flotilla_protocol::CallUsage {
                step: 1,
                model: "m".into(),
                usage: Usage::new(30, 12),
                cost_usd: Some(0.25),
                provider: Some("openai".into()),
                duration_ms: Some(1500),
            }];
        }
        fleet.publish_event(&e).await.unwrap();
    }
    let monitor = flotilla_monitor::Monitor::bind(&flotilla_monitor::Config {
        http_addr: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .await
    .unwrap();
    let addr = monitor.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let topo_agents = topo.agents.clone();
    let mon = tokio::spawn(monitor.run(fleet.clone(), topo, shutdown.clone()));

    let body = eventually(Duration::from_secs(10), "counts", || async {
        let body = http_get(addr, "/metrics").await;
        body.contains(r#"flotilla_task_events_total{kind="accepted"} 2"#).then_some(body)
    })
    .await;
    assert!(body.contains(r#"flotilla_task_events_total{kind="completed"} 1"#), "{body}");
    assert!(body.contains("flotilla_tokens_total 42"), "{body}");
    assert!(body.contains(r#"flotilla_cost_usd_total{model="m"} 0.25"#), "{body}");
    // The OpenTelemetry GenAI client histograms.
    assert!(
        body.contains(r#"gen_ai_client_token_usage_sum{gen_ai_operation_name="chat",gen_ai_provider_name="openai",gen_ai_request_model="m",gen_ai_token_type="input"} 30.0"#),
        "{body}"
    );
    assert!(
        body.contains(r#"gen_ai_client_operation_duration_seconds_sum{gen_ai_operation_name="chat",gen_ai_provider_name="openai",gen_ai_request_model="m"} 1.5"#),
        "{body}"
    );
    assert_eq!(http_get(addr, "/healthz").await, "ok\n");

    // Live events keep counting.
    fleet.publish_event(&TaskEvent::new("b", "failed")).await.unwrap();
    eventually(Duration::from_secs(10), "a live event", || async {
        http_get(addr, "/metrics")
            .await
            .contains(r#"flotilla_task_events_total{kind="failed"} 1"#)
            .then_some(())
    })
    .await;

    // Budget ledger entries are counted by operation (from when the monitor started).
    eventually(Duration::from_secs(10), "a ledger entry", || async {
        fleet.client.publish(fleet.names.ledger_subject("warning"), "{}".into()).await.unwrap();
        fleet.client.flush().await.unwrap();
        http_get(addr, "/metrics")
            .await
            .contains(r#"flotilla_budget_ledger_entries_total{op="warning"}"#)
            .then_some(())
    })
    .await;

    // Agents in the registry show up by status; one without recent heartbeats counts as dead.
    for (id, beat) in [("fresh", flotilla_protocol::time::now_ms()), ("silent", 1_000)] {
        let rec = flotilla_protocol::AgentRecord {
            agent_id: id.into(),
            name: "t".into(),
            runner_id: "r".into(),
            tenant: "default".into(),
            capabilities: vec!["x".into()],
            labels: Default::default(),
            provider: "offline".into(),
            model: String::new(),
            concurrency: 1,
            in_flight: 0,
            status: flotilla_protocol::AgentStatus::Idle,
            started_at_ms: beat,
            heartbeat_at_ms: beat,
            heartbeat_interval_ms: 60_000,
            state: flotilla_protocol::AgentState::Idle,
            activities: vec![],
            protocol_version: 1,
            min_replicas: 1,
            max_replicas: 1,
            error_until_ms: None,
            recoveries: 0,
            incarnation: String::new(),
        };
        fleet.kv_put(&topo_agents, id, &rec).await.unwrap();
    }
    eventually(Duration::from_secs(10), "agent gauges", || async {
        let body = http_get(addr, "/metrics").await;
        (body.contains(r#"flotilla_agents{status="idle"} 1"#)
            && body.contains(r#"flotilla_agents{status="dead"} 1"#))
        .then_some(())
    })
    .await;

    // Health over NATS.
    let reply = fleet.client.request(fleet.names.health_subject("monitor"), "".into()).await.unwrap();
    let h: flotilla_protocol::HealthReply = flotilla_protocol::decode(None, &reply.payload).unwrap();
    assert_eq!(h.service, "monitor");
    assert_eq!(h.details["task_events"]["accepted"], 2);

    shutdown.cancel();
    mon.await.unwrap().unwrap();
}
