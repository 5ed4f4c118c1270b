//! `flotilla bench runner`: the agent-runner's footprint and overhead, measured against raw NATS
//! in the same run. It starts a local nats-server (unless given a URL), the dispatcher in this
//! process and one `flotilla-agent-runner` process, then reports (1) the runner's resident
//! memory while hosting N idle agents and (2) its own time per agent-loop step with the
//! zero-latency offline model, next to a raw KV read and a raw JetStream publish on the same
//! server. `flotilla bench dispatcher` lives in [`dispatcher`], `flotilla bench budget` in
//! [`budget`].

mod budget;
mod dispatcher;
mod profile;
mod raw;
mod scheduler;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use flotilla_protocol::names::event_kind;
use flotilla_protocol::{TaskEvent, TaskSubmission, WireFormat, codec};
use flotilla_service::local_server::{LocalServer, LocalServerOptions, default_search_roots, locate};
use flotilla_service::{Fleet, Mode, Service as _, StreamSettings, Topology};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

use crate::{Cli, Failure, client};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Debug, clap::Subcommand)]
pub enum BenchWhat {
    /// Memory of one runner hosting many idle agents, and its overhead per agent-loop step.
    Runner {
        /// Idle agents the runner hosts.
        #[arg(long, default_value_t = 1000)]
        agents: u32,
        /// Tasks for the step measurement (each takes 2 steps: a tool call, then an answer).
        #[arg(long, default_value_t = 300)]
        tasks: usize,
    },
    /// Dispatcher throughput and latency next to raw JetStream on the same server, and the
    /// scheduling core's decision time and memory per queued task.
    Dispatcher {
        /// Tasks submitted as fast as possible for throughput, then as many again at half that
        /// rate for latency; the raw baselines use five times as many messages [default: 2000;
        /// 100 with --quick].
        #[arg(long)]
        tasks: Option<usize>,
        /// Agents registered in the scheduling core alone [default: 10000; 500 with --quick].
        #[arg(long)]
        agents: Option<u32>,
        /// Tasks queued in the scheduling core alone [default: 1000000; 20000 with --quick].
        #[arg(long)]
        queued: Option<usize>,
        /// Small sizes, for tests and a first look.
        #[arg(long)]
        quick: bool,
        /// Configuration file of the local nats-server [default: the project's nats/server.conf,
        /// with `sync_interval: always`]; e.g. nats/test.conf to flush on the default interval.
        #[arg(long)]
        server_config: Option<PathBuf>,
        /// Enforce budgets: a budget-keeper runs in this process and the runners reserve and
        /// commit every model call with it, each task with its own capped budget, closed when it
        /// ends. Reports the ledger entries per task too.
        #[arg(long)]
        budgets: bool,
    },
    /// Budget-keeper reservations per second on one hot budget and on 1,000 budgets, next to raw
    /// KV compare-and-swap (sequential and concurrent) on the same server.
    Budget {
        /// Reservations of each reserve-only phase and updates of the concurrent
        /// compare-and-swap; the reserve + commit phases run half as many, the sequential
        /// compare-and-swap a quarter [default: 20000; 1000 with --quick].
        #[arg(long)]
        reservations: Option<usize>,
        /// Requests (and raw updates) in flight, over 4 connections [default: 256; 64 with
        /// --quick].
        #[arg(long)]
        in_flight: Option<usize>,
        /// Small sizes, for tests and a first look.
        #[arg(long)]
        quick: bool,
        /// Configuration file of the local nats-server [default: the project's nats/server.conf,
        /// with `sync_interval: always`]; e.g. nats/test.conf to flush on the default interval.
        #[arg(long)]
        server_config: Option<PathBuf>,
    },
}

/// The dispatcher with default settings in this process, on its own connection.
async fn spawn_dispatcher(
    url: &str,
    names: &flotilla_protocol::Names,
    topology: &Topology,
    shutdown: &CancellationToken,
    instance: &str,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let fleet = Fleet::new(
        flotilla_service::nats::connect(url, "flotilla-bench-dispatcher").await?,
        names.clone(),
        WireFormat::Msgpack,
        instance.into(),
    );
    let dispatcher = flotilla_dispatcher::Dispatcher::new(flotilla_dispatcher::Config::default());
    Ok(tokio::spawn(dispatcher.run(fleet, topology.clone(), shutdown.clone())))
}

fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// A progress line on stderr, with the time since the bench started.
fn progress(started: Instant, what: &str) {
    eprintln!("[{:>6.1} s] {what}…", started.elapsed().as_secs_f64());
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

fn goal(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(idx.min(sorted.len() - 1)).copied().unwrap_or(0.0)
}

pub async fn run(cli: &Cli, args: &BenchArgs) -> Result<(), Failure> {
    match &args.what {
        BenchWhat::Runner { agents, tasks } => runner(cli, *agents, *tasks).await,
        BenchWhat::Dispatcher { tasks, agents, queued, quick, server_config, budgets } => {
            let sizes = dispatcher::Sizes {
                tasks: tasks.unwrap_or(if *quick { 100 } else { 2000 }),
                agents: agents.unwrap_or(if *quick { 500 } else { 10_000 }),
                queued: queued.unwrap_or(if *quick { 20_000 } else { 1_000_000 }),
            };
            dispatcher::run(cli, sizes, server_config.as_deref(), *budgets).await
        }
        BenchWhat::Budget { reservations, in_flight, quick, server_config } => {
            let sizes = budget::Sizes {
                reservations: reservations.unwrap_or(if *quick { 1000 } else { 20_000 }),
                in_flight: in_flight.unwrap_or(if *quick { 64 } else { 256 }),
            };
            budget::run(cli, sizes, server_config.as_deref()).await
        }
    }
}

async fn runner(cli: &Cli, agents: u32, tasks: usize) -> Result<(), Failure> {
    let dir = tempfile::Builder::new().prefix("flotilla-bench-").tempdir().context("temp dir")?;
    let mut server = None;
    let url = match cli.nats_url.as_deref().filter(|u| !u.trim().is_empty()) {
        Some(u) => u.to_owned(),
        None => {
            let s = LocalServer::start(LocalServerOptions {
                binary: locate(&default_search_roots())?,
                store_dir: dir.path().join("nats"),
                port: None,
                config_file: None,
            })?;
            let u = s.url().to_owned();
            server = Some(s);
            u
        }
    };
    let names = flotilla_protocol::Names::new(
        flotilla_protocol::Prefix::new(cli.prefix.clone()).map_err(|e| Failure::new(2, e))?,
    );
    let client = flotilla_service::nats::connect(&url, "flotilla-bench").await?;
    let fleet = Fleet::new(client.clone(), names.clone(), WireFormat::Msgpack, "bench".into());
    let topology = Topology::ensure(&fleet.js, &names, &StreamSettings::default(), Mode::Own).await?;
    let shutdown = CancellationToken::new();
    let dispatcher = spawn_dispatcher(&url, &names, &topology, &shutdown, "bench-d").await?;

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
        .context("flotilla-agent-runner is not next to flotilla (cargo build --release --bins)")?;
    let mut runner = tokio::process::Command::new(&runner_bin)
        .env("FLOTILLA_NATS_URL", &url)
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
            return Err(anyhow::anyhow!("only {n} of {total} agents registered in 120 s").into());
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
    let mut events = client::follow(&fleet.js, &names, None, false).await?;
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
            return Err(anyhow::anyhow!("tasks stopped completing ({done} of {tasks})").into());
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
    let _ = runner.start_kill();
    let _ = runner.wait().await;
    shutdown.cancel();
    let _ = dispatcher.await;
    let _ = client.drain().await;
    if let Some(mut s) = server.take() {
        s.terminate(Duration::from_secs(5));
    }
    Ok(())
}
