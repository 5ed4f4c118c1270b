//! `flotilla-budget-keeper`: loads config, connects, and runs the budget-keeper until SIGINT or
//! SIGTERM.

use flotilla_service::Mode;
use flotilla_service::bootstrap::run_plain;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    run_plain(
        ("flotilla-budget-keeper", "Flotilla token budgets"),
        "budget_keeper",
        Mode::Join,
        flotilla_budget_keeper::BudgetKeeper::new,
    )
    .await
}
