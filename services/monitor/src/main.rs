//! `flotilla-monitor`: loads config, connects, and runs the monitor until SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use flotilla_monitor::Config;
use flotilla_service::{CommonConfig, Fleet, Mode, Topology, config};

#[derive(Debug, Parser)]
#[command(name = "flotilla-monitor", version, about = "Flotilla metrics and health")]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, env = "FLOTILLA_CONFIG")]
    config: Option<PathBuf>,
    /// NATS URL.
    #[arg(long, env = "FLOTILLA_NATS_URL")]
    nats_url: Option<String>,
    /// HTTP address for /metrics.
    #[arg(long, env = "FLOTILLA_MONITOR_HTTP_ADDR")]
    http_addr: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = flotilla_service::telemetry::init("flotilla-monitor", "info");
    let args = Args::parse();
    let fig = config::figment(args.config.as_deref());
    let common: CommonConfig = config::extract(&fig, None, serde_json::json!({ "nats_url": args.nats_url }))?;
    let cfg: Config =
        config::extract(&fig, Some("monitor"), serde_json::json!({ "http_addr": args.http_addr }))?;
    let names = common.names()?;
    let instance = common.instance.clone().unwrap_or_else(config::random_instance_id);
    let client = flotilla_service::nats::connect(&common.nats_url_or_default(), "flotilla-monitor").await?;
    let fleet = Fleet::new(client.clone(), names, common.wire_format, instance);
    let topology = Topology::ensure(&fleet.js, &fleet.names, &common.streams, Mode::Join).await?;
    let listener = flotilla_monitor::bind(&cfg).await?;
    let shutdown = flotilla_service::shutdown::on_signal();
    flotilla_monitor::run(listener, fleet, topology, shutdown).await?;
    client.drain().await.context("failed to drain the NATS connection")?;
    Ok(())
}
