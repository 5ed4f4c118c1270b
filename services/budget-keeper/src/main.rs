//! `flotilla-budget-keeper`: loads config, connects, and runs the budget-keeper until SIGINT or
//! SIGTERM.

use clap::Parser;
use flotilla_service::Mode;
use flotilla_service::bootstrap::{CommonArgs, Loaded, run_binary};

#[derive(Debug, Parser)]
#[command(name = "flotilla-budget-keeper", version, about = "Flotilla token budgets")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    run_binary(&args.common, Mode::Join, async |loaded: &Loaded| {
        let config = loaded.section("budget_keeper", serde_json::json!({}))?;
        Ok((flotilla_budget_keeper::BudgetKeeper::new(config), None))
    })
    .await
}
