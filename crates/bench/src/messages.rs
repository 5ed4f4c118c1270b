//! `flotilla-bench messages`: direct messages, send → handled, next to raw JetStream on the same
//! server in the same run. (a) Raw: publishes into a stream (a window in flight) and one pull
//! consumer that acks each: its rate and publish → consumed latency. (b) Flotilla: a client sends
//! messages through the router to agents of one runner (round robin, offline model, a window of
//! sends in flight); each counts as handled when its `answered` event arrives: the rate and the
//! send → handled latency. Also: how many consumers the runner's messages cost at this many agents.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::stream;
use flotilla_agent_runner::FleetFile;
use flotilla_local::ServerConfig;
use flotilla_protocol::{Address, MessageEvent, MessageSend, SendReply, WireFormat, codec};
use flotilla_service::Mode;
use futures::StreamExt as _;
use serde_json::json;

use crate::Cli;
use crate::figures::{goal, percentile, progress, round, thousands};
use crate::raw::Window;

/// What to measure.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub messages: usize,
    pub agents: u32,
    pub in_flight: usize,
}

struct Rate {
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn rate(n: usize, elapsed: Duration, mut latencies: Vec<f64>) -> Rate {
    latencies.sort_by(f64::total_cmp);
    Rate {
        per_s: n as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
    }
}

/// Raw JetStream: publish (window `in_flight`) → one pull consumer → ack.
async fn raw(js: &async_nats::jetstream::Context, prefix: &str, sizes: Sizes) -> anyhow::Result<Rate> {
    let name = format!("{}_BENCH_RAW_MESSAGES", prefix.replace('.', "_").to_ascii_uppercase());
    let subject = format!("{prefix}.bench.raw.messages");
    let _ = js.delete_stream(&name).await;
    let s = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("failed to create the raw stream")?;
    let consumer = s
        .create_consumer(pull::Config {
            durable_name: Some("bench".into()),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await
        .context("failed to create the raw consumer")?;
    let sent: Arc<Mutex<HashMap<usize, Instant>>> = Arc::default();
    let reader = {
        let sent = sent.clone();
        let n = sizes.messages;
        tokio::spawn(async move {
            let mut msgs = consumer.messages().await.context("raw consume")?;
            let mut latencies = Vec::with_capacity(n);
            while latencies.len() < n {
                let Some(m) = msgs.next().await else { break };
                let m = m.map_err(|e| anyhow::anyhow!("raw consume: {e}"))?;
                let k: usize = std::str::from_utf8(&m.payload).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
                m.ack().await.map_err(|e| anyhow::anyhow!("raw ack: {e}"))?;
                if let Some(t) = sent.lock().ok().and_then(|s| s.get(&k).copied()) {
                    latencies.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            anyhow::Ok(latencies)
        })
    };
    let started = Instant::now();
    let mut window = Window::new(sizes.in_flight);
    for k in 0..sizes.messages {
        if let Ok(mut s) = sent.lock() {
            s.insert(k, Instant::now());
        }
        window.push(js.publish(subject.clone(), k.to_string().into()).await.context("raw publish")?).await?;
    }
    window.finish().await?;
    let latencies = reader.await.context("raw reader panicked")??;
    let elapsed = started.elapsed();
    let _ = js.delete_stream(&name).await;
    Ok(rate(sizes.messages, elapsed, latencies))
}

pub async fn run(cli: &Cli, sizes: Sizes, config: ServerConfig) -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = tempfile::Builder::new().prefix("flotilla-bench-").tempdir().context("temp dir")?;
    let (mut local, server) = cli.fleet(dir.path(), config, Mode::Own).await?;
    let fleet = local.fleet().clone();
    let names = fleet.names.clone();
    local.spawn("bench-dispatcher", flotilla_dispatcher::Dispatcher::new(Default::default())).await?;
    let fleet_toml = format!(
        "[[agent]]\nname = \"sink\"\ncapabilities = [\"sink\"]\nreplicas = {}\nconcurrency = 2\n",
        sizes.agents
    );
    let config = flotilla_agent_runner::Config {
        runner_id: Some("bench".to_owned()),
        budgets: false,
        ..Default::default()
    };
    let runner = flotilla_agent_runner::Runner::new(config, FleetFile::parse(&fleet_toml)?)?;
    local.spawn("bench", runner).await?;
    progress(started, &format!("waiting for {} agents", sizes.agents));
    let want = usize::try_from(sizes.agents).unwrap_or(usize::MAX);
    let t0 = Instant::now();
    while fleet.kv_keys(&local.topology().agents).await.map(|k| k.len()).unwrap_or(0) < want {
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(120), "the agents did not register in 120 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    progress(started, "raw JetStream publish → consume");
    let raw = raw(&fleet.js, names.prefix().as_str(), sizes).await?;

    progress(started, "Flotilla send → handled");
    let answered = fleet
        .client
        .subscribe(names.message_event_subject("*", flotilla_protocol::message_event::ANSWERED))
        .await
        .context("failed to follow the answered events")?;
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let n = sizes.messages;
    let reader = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut answered = answered;
            let mut latencies = Vec::with_capacity(n);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
            while latencies.len() < n {
                let Ok(Some(m)) = tokio::time::timeout_at(deadline, answered.next()).await else { break };
                let Ok(ev) = codec::decode::<MessageEvent>(None, &m.payload) else { continue };
                if let Some(t) = sent.lock().ok().and_then(|mut s| s.remove(&ev.message_id)) {
                    latencies.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            latencies
        })
    };
    let subject = names.msg_send_client("bench");
    let send_started = Instant::now();
    let sends = futures::stream::iter(0..n).map(|k| {
        let (fleet, subject, sent) = (fleet.clone(), subject.clone(), sent.clone());
        async move {
            let id = format!("bench-{k}");
            let agent = format!("bench-sink-{}", k % want.max(1));
            let m = MessageSend {
                id: Some(id.clone()),
                to: Address::agent(&agent),
                body: json!({ "text": format!("message {k}") }),
                ..Default::default()
            };
            let body = codec::encode(WireFormat::Msgpack, &m)?;
            if let Ok(mut s) = sent.lock() {
                s.insert(id, Instant::now());
            }
            let reply = fleet.client.request(subject, body.into()).await.context("send")?;
            let reply: SendReply = codec::decode(None, &reply.payload)?;
            anyhow::ensure!(reply.error.is_none(), "a send was refused: {:?}", reply.error);
            anyhow::Ok(())
        }
    });
    let results: Vec<anyhow::Result<()>> = sends.buffer_unordered(sizes.in_flight).collect().await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    // Every send answered (stored by the router): where the sender's side ends.
    let accepted_per_s = n as f64 / send_started.elapsed().as_secs_f64().max(1e-9);
    let latencies = reader.await.context("the reader panicked")?;
    anyhow::ensure!(latencies.len() == n, "only {} of {n} messages were handled", latencies.len());
    let flotilla = rate(n, send_started.elapsed(), latencies);

    let mut consumers = 0usize;
    let messages_stream = fleet.js.get_stream(names.messages_stream()).await.context("messages stream")?;
    let mut listed = messages_stream.consumers();
    while let Some(c) = listed.next().await {
        c.context("failed to list consumers")?;
        consumers += 1;
    }
    let ratio = flotilla.per_s / raw.per_s.max(1e-9);
    let report = json!({
        "bench": "messages",
        "server": server,
        "agents": sizes.agents,
        "messages": n,
        "in_flight": sizes.in_flight,
        "raw": { "per_s": round(raw.per_s, 0), "p50_ms": round(raw.p50_ms, 2), "p99_ms": round(raw.p99_ms, 2) },
        "flotilla": { "per_s": round(flotilla.per_s, 0), "p50_ms": round(flotilla.p50_ms, 2), "p99_ms": round(flotilla.p99_ms, 2) },
        "sends_accepted_per_s": round(accepted_per_s, 0),
        "rate_vs_raw": round(ratio, 3),
        "goal_half_the_raw_rate": ratio >= 0.5,
        "message_consumers": consumers,
    });
    local.stop().await.ok();
    if cli.json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "messages: {n} to {} agents of one runner, {} in flight, {server}",
        sizes.agents, sizes.in_flight
    );
    println!(
        "  raw JetStream publish → consume:  {:>8}/s   p50 {:.2} ms   p99 {:.2} ms",
        thousands(raw.per_s),
        raw.p50_ms,
        raw.p99_ms
    );
    println!(
        "  Flotilla send → handled:          {:>8}/s   p50 {:.2} ms   p99 {:.2} ms",
        thousands(flotilla.per_s),
        flotilla.p50_ms,
        flotilla.p99_ms
    );
    println!(
        "  of which the sends alone (stored by the router, answered): {:>8}/s",
        thousands(accepted_per_s)
    );
    println!("  rate ÷ raw: {ratio:.3} (goal ≥ 0.5: {})", goal(ratio >= 0.5));
    println!("  consumers on the messages stream at {} agents: {consumers}", sizes.agents);
    Ok(())
}
