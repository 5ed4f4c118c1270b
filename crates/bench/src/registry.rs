//! `flotilla-bench registry`: what an idle fleet costs. It starts a local nats-server (with
//! `nats/server.conf` unless told otherwise), the dispatcher in this process and N
//! `flotilla-agent-runner` processes hosting M idle agents between them, then reports over a
//! window (1) the registry writes per second (agents' and runners' buckets: every write is a
//! stored, fsync'd message) next to the fsync'd KV puts per second the same server takes in the
//! same run, and (2) the nats-server's CPU share, next to its share with the fleet's services
//! connected and no runner. Then it kills one runner with `kill -9` while its agents hold work
//! and reports how long the dispatcher took to declare them lost and requeue their work, next
//! to the liveness bound.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use flotilla_protocol::names::event_kind;
use flotilla_protocol::{TaskEvent, TaskSubmission, codec};
use flotilla_service::Mode;
use futures::StreamExt as _;

use crate::Cli;
use crate::figures::{goal, progress, round, thousands};

/// What to measure.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub agents: u32,
    pub runners: u32,
    pub seconds: u64,
}

/// Tasks that hold agents of the runner that is killed.
const HELD: usize = 8;

/// CPU time (user and system) of process `pid`, from `/proc/<pid>/stat` (clock ticks of 10 ms).
fn cpu_of(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// The server's CPU share over `window` (1.0: one core).
async fn cpu_share(pid: u32, window: Duration) -> anyhow::Result<f64> {
    let c0 = cpu_of(pid).context("cannot read the nats-server's CPU time")?;
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let c1 = cpu_of(pid).context("cannot read the nats-server's CPU time")?;
    Ok(c1.saturating_sub(c0).as_secs_f64() / t0.elapsed().as_secs_f64())
}

/// The last sequence of a bucket's stream: every write, kept or not, moves it by one.
async fn writes(fleet: &flotilla_service::Fleet, bucket: &str) -> anyhow::Result<u64> {
    let mut s = fleet.js.get_stream(format!("KV_{bucket}")).await.context("no bucket stream")?;
    Ok(s.info().await.context("bucket stream info")?.state.last_sequence)
}

fn runner_bin() -> anyhow::Result<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("flotilla-agent-runner")))
        .filter(|p| p.exists())
        .context("flotilla-agent-runner is not next to flotilla-bench (cargo build --release --bins)")
}

fn spawn_runner(
    bin: &Path,
    url: &str,
    prefix: &str,
    fleet: &Path,
    id: &str,
) -> anyhow::Result<tokio::process::Child> {
    tokio::process::Command::new(bin)
        .env("FLOTILLA_NATS_URL", url)
        .env("FLOTILLA_PREFIX", prefix)
        .env("FLOTILLA_FLEET", fleet)
        .env("FLOTILLA_RUNNER_ID", id)
        .env("FLOTILLA_AGENT_RUNNER__BUDGETS", "false")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("failed to start runner {id}"))
}

pub async fn run(cli: &Cli, sizes: Sizes, server_config: flotilla_local::ServerConfig) -> anyhow::Result<()> {
    let started = Instant::now();
    let runners = sizes.runners.max(1);
    let per_runner = sizes.agents.div_ceil(runners).max(1);
    let total = per_runner * runners;
    let dir = tempfile::Builder::new().prefix("flotilla-bench-").tempdir().context("temp dir")?;
    let (mut local, server_desc) = cli.fleet(dir.path(), server_config, Mode::Own).await?;
    let (fleet, topology) = (local.fleet().clone(), local.topology().clone());
    let names = fleet.names.clone();
    let dispatcher_config = flotilla_dispatcher::Config::default();
    let bound = Duration::from_secs(u64::from(dispatcher_config.missed_heartbeats))
        + Duration::from_millis(500)
        + dispatcher_config.tick;
    local.spawn("bench-d", flotilla_dispatcher::Dispatcher::new(dispatcher_config)).await?;
    let server_pid = local.server().map(flotilla_service::local_server::LocalServer::pid);
    let window = Duration::from_secs(sizes.seconds.max(5));

    // Raw NATS on the same server: fsync'd KV puts, 64 in flight, for two seconds.
    progress(started, "raw KV puts on this server");
    let raw_puts = {
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed() < Duration::from_secs(2) {
            let puts = (0..64).map(|i| topology.memory.put(format!("bench.raw{i}"), "v".into()));
            for r in futures::future::join_all(puts).await {
                r.context("raw kv put")?;
                n += 1;
            }
        }
        n as f64 / t.elapsed().as_secs_f64()
    };
    let idle_cpu = match server_pid {
        Some(pid) => {
            progress(started, "the nats-server's CPU with no runner");
            Some(cpu_share(pid, Duration::from_secs(5)).await?)
        }
        None => None,
    };

    let fleet_path = dir.path().join("fleet.toml");
    std::fs::write(
        &fleet_path,
        format!("[[agent]]\nname = \"idle\"\ncapabilities = [\"idle\"]\nreplicas = {per_runner}\n"),
    )
    .context("failed to write the bench fleet")?;
    let bin = runner_bin()?;
    let mut children = Vec::new();
    for r in 0..runners {
        children.push(spawn_runner(&bin, local.url(), &cli.prefix, &fleet_path, &format!("bench-r{r}"))?);
    }
    progress(started, &format!("waiting for {total} agents on {runners} runners to register"));
    let t0 = Instant::now();
    loop {
        let n = topology.agents.keys().await.context("list agents")?.count().await;
        if n >= usize::try_from(total).unwrap_or(usize::MAX) {
            break;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            anyhow::bail!("only {n} of {total} agents registered in 300 s");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let registered_in = t0.elapsed();
    // Past registration and the agents' first state changes.
    tokio::time::sleep(Duration::from_secs(5)).await;

    progress(started, &format!("measuring the idle fleet for {} s", window.as_secs()));
    let (agents_bucket, runners_bucket) = (names.agents_bucket(), names.runners_bucket());
    let (a0, r0) = (writes(&fleet, &agents_bucket).await?, writes(&fleet, &runners_bucket).await?);
    let t = Instant::now();
    let fleet_cpu = match server_pid {
        Some(pid) => Some(cpu_share(pid, window).await?),
        None => {
            tokio::time::sleep(window).await;
            None
        }
    };
    let secs = t.elapsed().as_secs_f64();
    let (a1, r1) = (writes(&fleet, &agents_bucket).await?, writes(&fleet, &runners_bucket).await?);
    let agent_writes = a1.saturating_sub(a0) as f64 / secs;
    let runner_writes = r1.saturating_sub(r0) as f64 / secs;
    let per_s = agent_writes + runner_writes;

    // Loss: tasks held by agents of one runner, that runner killed with kill -9.
    progress(started, "killing a runner whose agents hold work");
    let mut events = crate::events::follow(&fleet, vec![names.task_events_all()], false).await?;
    for i in 0..HELD {
        let sub = TaskSubmission {
            id: Some(format!("held-{i}")),
            capability: "idle".into(),
            input: serde_json::json!({ "text": "hold", "_offline": { "sleep_ms": 600_000 } }),
            ..Default::default()
        };
        fleet.publish_durable(names.submit_subject(), &sub, sub.id.as_deref()).await.context("submit")?;
    }
    let mut runner_of: std::collections::HashMap<String, String> = Default::default();
    while runner_of.len() < HELD {
        let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(60), events.next()).await else {
            anyhow::bail!("only {} of {HELD} held tasks started", runner_of.len());
        };
        let Ok(ev) = codec::decode::<TaskEvent>(None, &msg.context("event stream")?.payload) else {
            continue;
        };
        if ev.kind == event_kind::STARTED
            && let Some(r) = ev.runner_id
        {
            runner_of.insert(ev.task_id, r);
        }
    }
    let victim = runner_of.values().next().cloned().context("no held task")?;
    let index: usize = victim.trim_start_matches("bench-r").parse().context("runner index")?;
    let held: std::collections::HashSet<String> =
        runner_of.iter().filter(|(_, r)| **r == victim).map(|(t, _)| t.clone()).collect();
    let child = children.get_mut(index).context("no such runner")?;
    child.start_kill().context("failed to kill the runner")?;
    let killed = Instant::now();
    let mut requeued = std::collections::HashSet::new();
    let mut last = Duration::ZERO;
    while requeued.len() < held.len() {
        let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(60), events.next()).await else {
            anyhow::bail!(
                "{} of {} tasks of the killed runner were requeued within 60 s",
                requeued.len(),
                held.len()
            );
        };
        let Ok(ev) = codec::decode::<TaskEvent>(None, &msg.context("event stream")?.payload) else {
            continue;
        };
        if ev.kind == event_kind::REQUEUED && held.contains(&ev.task_id) && requeued.insert(ev.task_id) {
            last = killed.elapsed();
        }
    }

    for mut c in children {
        let _ = c.start_kill();
        let _ = c.wait().await;
    }
    crate::stop(local).await;

    let cpu_goal = 0.05;
    let report = serde_json::json!({
        "server": server_desc,
        "idle_fleet": {
            "agents": total, "runners": runners, "registered_in_s": round(registered_in.as_secs_f64(), 2),
            "window_s": round(secs, 1),
            "registry_writes_per_s": round(per_s, 2),
            "agent_record_writes_per_s": round(agent_writes, 2),
            "runner_record_writes_per_s": round(runner_writes, 2),
            "goal_writes_per_s": 20,
            "raw_kv_puts_per_s": round(raw_puts, 0),
            "writes_vs_raw_capacity": round(per_s / raw_puts.max(1.0), 4),
            "server_cpu_share": fleet_cpu.map(|c| round(c, 4)),
            "server_cpu_share_without_runners": idle_cpu.map(|c| round(c, 4)),
            "goal_server_cpu_share": cpu_goal,
        },
        "runner_killed": {
            "tasks_held": held.len(),
            "all_requeued_after_s": round(last.as_secs_f64(), 2),
            "bound_s": round(bound.as_secs_f64(), 2),
        },
    });
    if cli.json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "{server_desc}; {total} idle agents on {runners} runner processes (registered in {:.1} s)",
        registered_in.as_secs_f64()
    );
    println!(
        "registry writes: {per_s:.2}/s ({agent_writes:.2} agent records, {runner_writes:.2} runner heartbeats) \
         = {:.3} % of the {} fsync'd KV puts/s this server took in the same run; goal ≤ 20/s: {}",
        per_s / raw_puts.max(1.0) * 100.0,
        thousands(raw_puts),
        goal(per_s <= 20.0)
    );
    if let (Some(c), Some(i)) = (fleet_cpu, idle_cpu) {
        println!(
            "nats-server CPU: {:.2} % of a core with the idle fleet ({:.2} % with no runner); goal < 5 %: {}",
            c * 100.0,
            i * 100.0,
            goal(c < cpu_goal)
        );
    }
    println!(
        "runner {victim} killed with kill -9: its {} held tasks requeued {:.2} s later (bound {:.2} s: \
         missed heartbeats × interval + 0.5 s + a dispatcher tick): {}",
        held.len(),
        last.as_secs_f64(),
        bound.as_secs_f64(),
        goal(last <= bound + Duration::from_millis(500))
    );
    Ok(())
}
