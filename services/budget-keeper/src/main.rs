//! `flotilla-budget-keeper`: loads config, connects, and runs the budget-keeper until SIGINT or
//! SIGTERM.

use clap::Parser;
use flotilla_service::bootstrap::{CommonArgs, Loaded, drain};
use flotilla_service::{Mode, Service as _};

#[derive(Debug, Parser)]
#[command(name = "flotilla-budget-keeper", version, about = "Flotilla token budgets")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = flotilla_service::telemetry::init("flotilla-budget-keeper", "info");
    let args = Args::parse();
    let loaded = Loaded::load(&args.common)?;
    let cfg: flotilla_budget_keeper::Config = loaded.section("budget_keeper", serde_json::json!({}))?;
    let (fleet, topology) = loaded.connect("budget-keeper", None, Mode::Join).await?;
    let shutdown = flotilla_service::shutdown::on_signal();
    flotilla_budget_keeper::BudgetKeeper::new(cfg).run(fleet.clone(), topology, shutdown).await?;
    drain(&fleet).await
}
