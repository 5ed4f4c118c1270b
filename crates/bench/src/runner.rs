//! `flotilla-bench runner`: the agent-runner's footprint and overhead, measured against raw NATS
//! in the same run. It starts a local nats-server (unless given a URL), the dispatcher in this
//! process and one `flotilla-agent-runner` process (from next to this executable), then reports
//! (1) the runner's resident memory while hosting N idle agents and (2) its own time per
//! agent-loop step with the zero-latency offline model, next to a raw KV read and a raw JetStream
//! publish on the same server.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use flotilla_local::ServerConfig;
use flotilla_protocol::names::event_kind;
use flotilla_protocol::{TaskEvent, TaskSubmission, codec};
use flotilla_service::Mode;
use futures::StreamExt as _;

use crate::Cli;
use crate::figures::{percentile, rss_kib};

pub async fn run(cli: &Cli, agents: u32, tasks: usize) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("flotilla-bench-").tempdir().context("temp dir")?;
    let (mut local, _) = cli.fleet(dir.path(), ServerConfig::Defaults, Mode::Own).await?;
    let (fleet, topology) = (local.fleet().clone(), local.topology().clone());
    let names = fleet.names.clone();
    let dispatcher = flotilla_dispatcher::Dispatcher::new(flotilla_dispatcher::Config::default());
    local.spawn("bench-d", dispatcher).await?;

    // The runner under test, as its own process.
    let fleet_toml = format!(
        "[[agent]]\nname = \"idle\"\ncapabilities = [\"idle\"]\nreplicas = {agents}\n\n\
         [[agent]]\nname = \"stepper\"\ncapabilities = [\"step\"]\ntools = [\"memory_get\"]\nconcurrency = 8\nreplicas = 1\n"
    );
    let fleet_path = dir.path().join("fleet.toml");
    std::fs::write(&fleet_path, fleet_toml).context("failed to write the bench fleet")?;
    let runner_bin: PathBuf = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("flotilla-agent-runner")))
        .filter(|p| p.exists())
        .context("flotilla-agent-runner is not next to flotilla-bench (cargo build --release --bins)")?;
    let mut runner = tokio::process::Command::new(&runner_bin)
        .env("FLOTILLA_NATS_URL", local.url())
        .env("FLOTILLA_PREFIX", &cli.prefix)
        .env("FLOTILLA_FLEET", &fleet_path)
        .env("FLOTILLA_RUNNER_ID", "bench")
        // No budget-keeper runs here: what is measured is the path without budgets.
        .env("FLOTILLA_AGENT_RUNNER__BUDGETS", "false")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .context("failed to start the runner")?;
    let pid = runner.id().context("runner has no pid")?;
    let total = agents + 1;
    eprintln!("waiting for {total} agents to register…");
    let t0 = Instant::now();
    loop {
        let n = topology.agents.keys().await.context("list agents")?.count().await;
        if n >= usize::try_from(total).unwrap_or(usize::MAX) {
            break;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            anyhow::bail!("only {n} of {total} agents registered in 120 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let registered_in = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await; // a few heartbeats
    let (rss, hwm) = rss_kib(pid).context("cannot read the runner's memory")?;

    // Raw NATS on the same server: a KV read and a JetStream publish with its ack, sequentially.
    let raw_kv = {
        topology.memory.put("bench.key", "v".into()).await.context("kv put")?;
        let n = 2000;
        let t = Instant::now();
        for _ in 0..n {
            topology.memory.get("bench.key").await.context("kv get")?;
        }
        t.elapsed().as_secs_f64() * 1e6 / f64::from(n)
    };
    let raw_pub = {
        let n = 2000;
        let t = Instant::now();
        for i in 0..n {
            fleet
                .js
                .publish(names.agent_event_subject("bench", "raw"), format!("{i}").into())
                .await
                .context("publish")?
                .await
                .context("publish ack")?;
        }
        t.elapsed().as_secs_f64() * 1e6 / f64::from(n)
    };

    // Steps: each task is a tool step (memory_get) then an answer step; time between the
    // progress events of one task is the runner's own cost of a step.
    let mut events = crate::events::follow(&fleet, vec![names.task_events_all()], false).await?;
    let input = serde_json::json!({"text": "x", "_offline": {"tool_calls": [{"name": "memory_get", "arguments": {"key": "k"}}]}});
    let t = Instant::now();
    for i in 0..tasks {
        let sub = TaskSubmission {
            id: Some(format!("bench-{i}")),
            capability: "step".into(),
            input: input.clone(),
            ..Default::default()
        };
        fleet.publish_durable(names.submit_subject(), &sub, sub.id.as_deref()).await.context("submit")?;
    }
    let mut first_progress: std::collections::HashMap<String, Instant> = Default::default();
    let mut step_ms = Vec::new();
    let mut done = 0;
    while done < tasks {
        let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(60), events.next()).await else {
            anyhow::bail!("tasks stopped completing ({done} of {tasks})");
        };
        let msg = msg.context("event stream")?;
        let Ok(ev) = codec::decode::<TaskEvent>(None, &msg.payload) else { continue };
        match ev.kind.as_str() {
            // Partial text of a streaming model is not a step.
            event_kind::PROGRESS if ev.text_delta.is_some() => {}
            // Arrival times: both events travel the same path, so their difference is the step.
            event_kind::PROGRESS if ev.step == Some(1) => {
                first_progress.insert(ev.task_id.clone(), Instant::now());
            }
            event_kind::PROGRESS => {
                if let Some(t1) = first_progress.get(&ev.task_id) {
                    step_ms.push(t1.elapsed().as_secs_f64() * 1000.0);
                }
            }
            event_kind::COMPLETED | event_kind::FAILED => done += 1,
            _ => {}
        }
    }
    let wall = t.elapsed();
    step_ms.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&step_ms, 0.5) * 1000.0, percentile(&step_ms, 0.99) * 1000.0);

    let report = serde_json::json!({
        "runner": {
            "idle_agents": agents,
            "registered_in_s": (registered_in.as_secs_f64() * 100.0).round() / 100.0,
            "rss_mib": (rss as f64 / 1024.0 * 10.0).round() / 10.0,
            "peak_rss_mib": (hwm as f64 / 1024.0 * 10.0).round() / 10.0,
            "goal_rss_mib": 200,
        },
        "raw_nats_us": { "kv_get": raw_kv.round(), "js_publish_acked": raw_pub.round() },
        "step": {
            "tasks": tasks,
            "p50_us": p50.round(),
            "p99_us": p99.round(),
            "p50_vs_raw_kv_get": (p50 / raw_kv * 10.0).round() / 10.0,
            "p50_vs_raw_publish": (p50 / raw_pub * 10.0).round() / 10.0,
            "tasks_per_s": (tasks as f64 / wall.as_secs_f64()).round(),
        },
    });
    if cli.json {
        println!("{report}");
    } else {
        println!(
            "runner hosting {agents} idle agents: RSS {:.1} MiB (peak {:.1} MiB; goal < 200 MiB), registered in {:.2} s",
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0,
            registered_in.as_secs_f64()
        );
        println!("raw NATS on this server: KV get {raw_kv:.0} µs, acked JetStream publish {raw_pub:.0} µs");
        println!(
            "agent-loop step (tool call + progress event), measured between progress events: p50 {p50:.0} µs \
             ({:.1}× a raw KV get, {:.1}× a raw acked publish), p99 {p99:.0} µs; {} tasks in {:.2} s",
            p50 / raw_kv,
            p50 / raw_pub,
            tasks,
            wall.as_secs_f64()
        );
        println!("(steps run 8 at a time on one agent; run a release build for meaningful figures)");
    }
    if let Err(e) = runner.start_kill() {
        tracing::warn!(error = %e, "failed to kill the runner");
    }
    if let Err(e) = runner.wait().await {
        tracing::warn!(error = %e, "failed to wait for the runner");
    }
    crate::stop(local).await;
    Ok(())
}
