//! `flotilla-monitor`: loads config, connects, and runs the monitor until SIGINT or SIGTERM.

use clap::Parser;
use flotilla_service::bootstrap::{CommonArgs, Loaded, drain};
use flotilla_service::{Mode, Service as _};

#[derive(Debug, Parser)]
#[command(name = "flotilla-monitor", version, about = "Flotilla metrics and health")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// HTTP address for /metrics and /healthz.
    #[arg(long, env = "FLOTILLA_MONITOR_HTTP_ADDR")]
    http_addr: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = flotilla_service::telemetry::init("flotilla-monitor", "info");
    let args = Args::parse();
    let loaded = Loaded::load(&args.common)?;
    let cfg: flotilla_monitor::Config =
        loaded.section("monitor", serde_json::json!({ "http_addr": args.http_addr }))?;
    let (fleet, topology) = loaded.connect("monitor", None, Mode::Join).await?;
    let monitor = flotilla_monitor::Monitor::bind(&cfg).await?;
    let shutdown = flotilla_service::shutdown::on_signal();
    monitor.run(fleet.clone(), topology, shutdown).await?;
    drain(&fleet).await
}
