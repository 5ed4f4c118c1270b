//! `flotilla-dispatcher`: loads config, connects, ensures the topology (which it owns) and runs
//! the dispatcher until SIGINT or SIGTERM.

use clap::Parser;
use flotilla_service::bootstrap::{CommonArgs, Loaded, drain};
use flotilla_service::{Mode, Service as _};

#[derive(Debug, Parser)]
#[command(name = "flotilla-dispatcher", version, about = "Assigns Flotilla tasks to agents")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = flotilla_service::telemetry::init("flotilla-dispatcher", "info");
    let args = Args::parse();
    let loaded = Loaded::load(&args.common)?;
    let cfg: flotilla_dispatcher::Config = loaded.section("dispatcher", serde_json::json!({}))?;
    let (fleet, topology) = loaded.connect("dispatcher", None, Mode::Own).await?;
    let shutdown = flotilla_service::shutdown::on_signal();
    flotilla_dispatcher::Dispatcher::new(cfg).run(fleet.clone(), topology, shutdown).await?;
    drain(&fleet).await
}
