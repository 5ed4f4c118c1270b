//! `flotilla-agent-runner`: loads config and the fleet file, connects, and runs the runner until
//! SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use flotilla_agent_runner::{Config, FleetFile};
use flotilla_service::{CommonConfig, Fleet, Mode, Topology, config};

#[derive(Debug, Parser)]
#[command(name = "flotilla-agent-runner", version, about = "Hosts Flotilla agents and runs their tasks")]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, env = "FLOTILLA_CONFIG")]
    config: Option<PathBuf>,
    /// NATS URL.
    #[arg(long, env = "FLOTILLA_NATS_URL")]
    nats_url: Option<String>,
    /// Fleet file declaring the agents to host.
    #[arg(long, env = "FLOTILLA_FLEET")]
    fleet: Option<PathBuf>,
    /// Stable runner id.
    #[arg(long, env = "FLOTILLA_RUNNER_ID")]
    runner_id: Option<String>,
}

/// The host name as a runner id (`[A-Za-z0-9_-]`, at most 48 characters), if there is one.
fn host_name() -> Option<String> {
    let raw = std::env::var("HOSTNAME").ok().or_else(|| std::fs::read_to_string("/etc/hostname").ok())?;
    let id: String = raw
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' })
        .take(48)
        .collect();
    (!id.is_empty()).then_some(id)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = flotilla_service::telemetry::init("flotilla-agent-runner", "info");
    let args = Args::parse();
    let fig = config::figment(args.config.as_deref());
    let common: CommonConfig = config::extract(&fig, None, serde_json::json!({ "nats_url": args.nats_url }))?;
    let mut cfg: Config = config::extract(&fig, Some("agent_runner"), serde_json::json!({}))?;
    if args.fleet.is_some() {
        cfg.fleet = args.fleet;
    }
    if args.runner_id.is_some() {
        cfg.runner_id = args.runner_id;
    }
    let fleet_path = cfg.fleet.clone().context("no fleet file: pass --fleet or set FLOTILLA_FLEET")?;
    let fleet_file = FleetFile::load(&fleet_path)?;
    let names = common.names()?;
    // Default runner id: the host name (stable across restarts of one container or machine),
    // else a random id.
    let instance = cfg
        .runner_id
        .clone()
        .or(common.instance.clone())
        .or_else(host_name)
        .unwrap_or_else(config::random_instance_id);
    cfg.runner_id = Some(instance.clone());
    let client =
        flotilla_service::nats::connect(&common.nats_url_or_default(), "flotilla-agent-runner").await?;
    let fleet = Fleet::new(client.clone(), names, common.wire_format, instance);
    let topology = Topology::ensure(&fleet.js, &fleet.names, &common.streams, Mode::Join).await?;
    let shutdown = flotilla_service::shutdown::on_signal();
    flotilla_agent_runner::run(cfg, fleet_file, fleet, topology, shutdown).await?;
    client.drain().await.context("failed to drain the NATS connection")?;
    Ok(())
}
