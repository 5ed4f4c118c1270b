//! `flotilla-budget-keeper`: loads config, connects, and runs the budget-keeper until SIGINT or
//! SIGTERM.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use flotilla_budget_keeper::Config;
use flotilla_service::{CommonConfig, Fleet, Mode, Topology, config};

#[derive(Debug, Parser)]
#[command(name = "flotilla-budget-keeper", version, about = "Flotilla token budgets")]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, env = "FLOTILLA_CONFIG")]
    config: Option<PathBuf>,
    /// NATS URL.
    #[arg(long, env = "FLOTILLA_NATS_URL")]
    nats_url: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = flotilla_service::telemetry::init("flotilla-budget-keeper", "info");
    let args = Args::parse();
    let fig = config::figment(args.config.as_deref());
    let common: CommonConfig = config::extract(&fig, None, serde_json::json!({ "nats_url": args.nats_url }))?;
    let cfg: Config = config::extract(&fig, Some("budget_keeper"), serde_json::json!({}))?;
    let names = common.names()?;
    let instance = common.instance.clone().unwrap_or_else(config::random_instance_id);
    let client =
        flotilla_service::nats::connect(&common.nats_url_or_default(), "flotilla-budget-keeper").await?;
    let fleet = Fleet::new(client.clone(), names, common.wire_format, instance);
    Topology::ensure(&fleet.js, &fleet.names, &common.streams, Mode::Join).await?;
    let shutdown = flotilla_service::shutdown::on_signal();
    flotilla_budget_keeper::run(cfg, fleet, common.streams.replicas, shutdown).await?;
    client.drain().await.context("failed to drain the NATS connection")?;
    Ok(())
}
