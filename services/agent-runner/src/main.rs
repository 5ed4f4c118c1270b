//! `flotilla-agent-runner`: loads config and the fleet file, connects, and runs the runner until
//! SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use flotilla_agent_runner::{Config, FleetFile};
use flotilla_service::Mode;
use flotilla_service::bootstrap::{CommonArgs, Loaded, run_binary};

#[derive(Debug, Parser)]
#[command(name = "flotilla-agent-runner", version, about = "Hosts Flotilla agents and runs their tasks")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Fleet file declaring the agents to host.
    #[arg(long, env = "FLOTILLA_FLEET")]
    fleet: Option<PathBuf>,
    /// Stable runner id (default: the host name).
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
    let args = Args::parse();
    run_binary(&args.common, Mode::Join, async |loaded: &Loaded| {
        let config: Config = loaded.section(
            "agent_runner",
            serde_json::json!({ "fleet": args.fleet, "runner_id": args.runner_id }),
        )?;
        let fleet_path = config.fleet.clone().context("no fleet file: pass --fleet or set FLOTILLA_FLEET")?;
        let fleet_file = FleetFile::load(&fleet_path)?;
        // Default runner id: the host name (stable across restarts of one container or machine).
        let runner_id =
            config.runner_id.clone().or_else(|| loaded.common.instance.clone()).or_else(host_name);
        Ok((flotilla_agent_runner::Runner::new(config, fleet_file)?, runner_id))
    })
    .await
}
