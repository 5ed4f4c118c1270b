//! `flotilla health`: every service instance (active or standby, version, uptime), every agent
//! (state, heartbeat age), the streams and buckets this credential may look at against their
//! limits, and the NATS server — what an operator checks first.

use std::time::Duration;

use anyhow::Context as _;
use flotilla_protocol::{AgentRecord, HealthReply, codec, time::now_ms};
use flotilla_service::Fleet;
use futures::StreamExt as _;
use serde_json::{Value, json};

use crate::client::connect;
use crate::{Cli, Failure};

/// The services that answer health requests.
const SERVICES: [&str; 4] = ["dispatcher", "budget-keeper", "monitor", "agent-runner"];

/// Every instance's health reply: discovered through the NATS micro protocol (`$SRV.INFO`, each
/// instance answers), then asked on its own `<p>.health.<service>.<instance>`.
pub(crate) async fn instances(fleet: &Fleet) -> anyhow::Result<Vec<HealthReply>> {
    let inbox = fleet.client.new_inbox();
    let mut answers = fleet.client.subscribe(inbox.clone()).await.context("failed to listen for services")?;
    for s in SERVICES {
        fleet
            .client
            .publish_with_reply(format!("$SRV.INFO.flotilla-{s}"), inbox.clone(), "".into())
            .await
            .context("failed to ask for services")?;
    }
    fleet.client.flush().await.context("failed to ask for services")?;
    let own = format!("{}.health.", fleet.names.prefix());
    let mut subjects = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_millis(750);
    while let Ok(Some(m)) = tokio::time::timeout_at(until, answers.next()).await {
        let Ok(info) = serde_json::from_slice::<Value>(&m.payload) else { continue };
        for e in info.get("endpoints").and_then(Value::as_array).into_iter().flatten() {
            if e.get("name").and_then(Value::as_str) == Some("health-instance")
                && let Some(subject) =
                    e.get("subject").and_then(Value::as_str).filter(|s| s.starts_with(&own))
            {
                subjects.push(subject.to_owned());
            }
        }
    }
    subjects.sort();
    subjects.dedup();
    let mut out = Vec::new();
    for subject in subjects {
        let asked =
            tokio::time::timeout(Duration::from_secs(2), fleet.client.request(subject, "".into())).await;
        if let Ok(Ok(m)) = asked
            && let Ok(h) = codec::decode::<HealthReply>(None, &m.payload)
        {
            out.push(h);
        }
    }
    Ok(out)
}

/// Every registered agent with its heartbeat's age.
async fn agents(fleet: &Fleet) -> Result<Vec<(AgentRecord, u64)>, Failure> {
    let now = now_ms();
    Ok(crate::fleet::registered(fleet)
        .await?
        .into_iter()
        .map(|rec| {
            let age = now.saturating_sub(rec.heartbeat_at_ms);
            (rec, age)
        })
        .collect())
}

/// The streams (buckets' included) this credential may read the info of, with their limits.
async fn streams(fleet: &Fleet) -> Vec<Value> {
    // All at once: those this credential may not see only time out.
    let asks = flotilla_protocol::roles::topology_streams(&fleet.names).into_iter().map(|name| async move {
        let info = tokio::time::timeout(Duration::from_secs(2), async {
            let mut s = fleet.js.get_stream(&name).await.ok()?;
            s.info().await.ok().cloned()
        })
        .await;
        match info {
            Ok(Some(i)) => json!({
                "stream": name,
                "messages": i.state.messages,
                "bytes": i.state.bytes,
                "max_bytes": i.config.max_bytes,
                "max_messages": i.config.max_messages,
                "max_age_ms": u64::try_from(i.config.max_age.as_millis()).unwrap_or(u64::MAX),
                "consumers": i.state.consumer_count,
            }),
            _ => json!({ "stream": name, "visible": false }),
        }
    });
    futures::future::join_all(asks).await
}

fn age(ms: u64) -> String {
    if ms >= 120_000 { format!("{}m", ms / 60_000) } else { format!("{:.1}s", ms as f64 / 1000.0) }
}

pub async fn run(cli: &Cli) -> Result<(), Failure> {
    let fleet = connect(cli).await?;
    let services = instances(&fleet).await?;
    let agents = agents(&fleet).await?;
    let streams = streams(&fleet).await;
    let server = fleet.client.server_info();
    if cli.json {
        let agents: Vec<Value> = agents
            .iter()
            .map(|(r, age)| {
                json!({ "agent_id": r.agent_id, "runner_id": r.runner_id, "status": r.status, "state": r.state,
                        "heartbeat_age_ms": age, "stale": *age > r.heartbeat_interval_ms.saturating_mul(3) + 500 })
            })
            .collect();
        let report = json!({
            "services": services,
            "agents": agents,
            "streams": streams,
            "server": { "name": server.server_name, "version": server.version, "jetstream": server.jetstream },
        });
        println!("{report}");
        return Ok(());
    }
    println!("nats-server {} ({}), JetStream {}", server.server_name, server.version, server.jetstream);
    println!("\n{:<14} {:<28} {:<8} {:<9} {:>9}", "SERVICE", "INSTANCE", "VERSION", "ROLE", "UPTIME");
    for h in &services {
        let role = h.details.get("role").and_then(Value::as_str).unwrap_or("-");
        println!("{:<14} {:<28} {:<8} {:<9} {:>9}", h.service, h.instance, h.version, role, age(h.uptime_ms));
    }
    if services.is_empty() {
        println!("(no service answered)");
    }
    // The work queues' durable consumers, as a monitor last sampled them.
    let consumers = services
        .iter()
        .filter(|h| h.service == "monitor")
        .find_map(|h| h.details.get("consumers").and_then(Value::as_array).cloned())
        .unwrap_or_default();
    if !consumers.is_empty() {
        println!(
            "\n{:<24} {:<36} {:>9} {:>11} {:>11}",
            "STREAM", "CONSUMER", "PENDING", "ACK PENDING", "REDELIVERED"
        );
        for c in &consumers {
            // As text: a JSON value's Display ignores the column width.
            let f = |k: &str| match c.get(k) {
                Some(Value::String(v)) => v.clone(),
                Some(v) => v.to_string(),
                None => String::new(),
            };
            println!(
                "{:<24} {:<36} {:>9} {:>11} {:>11}",
                f("stream"),
                f("consumer"),
                f("pending"),
                f("ack_pending"),
                f("redelivered")
            );
        }
    }
    println!("\n{:<28} {:<12} {:<10} {:<13} {:>9}", "AGENT", "RUNNER", "STATUS", "STATE", "HEARTBEAT");
    for (r, a) in &agents {
        let stale = if *a > r.heartbeat_interval_ms.saturating_mul(3) + 500 { " (lost?)" } else { "" };
        println!(
            "{:<28} {:<12} {:<10} {:<13} {:>9}{stale}",
            r.agent_id,
            r.runner_id,
            format!("{:?}", r.status).to_lowercase(),
            format!("{:?}", r.state).to_lowercase(),
            age(*a)
        );
    }
    println!("\n{:<28} {:>10} {:>12} {:>12}", "STREAM", "MESSAGES", "BYTES", "MAX BYTES");
    for s in &streams {
        let field = |k: &str| s.get(k).cloned().unwrap_or(Value::Null);
        let name = field("stream").as_str().unwrap_or_default().to_owned();
        if field("visible") == Value::Bool(false) {
            println!("{name:<28} (not visible to this credential)");
            continue;
        }
        let max =
            field("max_bytes").as_i64().filter(|m| *m > 0).map_or_else(|| "-".to_owned(), |m| m.to_string());
        let (messages, bytes) = (field("messages").to_string(), field("bytes").to_string());
        println!("{name:<28} {messages:>10} {bytes:>12} {max:>12}");
    }
    Ok(())
}
