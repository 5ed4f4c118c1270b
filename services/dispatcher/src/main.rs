//! `flotilla-dispatcher`: loads config, connects, ensures the topology (which it owns) and runs
//! the dispatcher until SIGINT or SIGTERM.

use flotilla_service::Mode;
use flotilla_service::bootstrap::run_plain;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    run_plain(
        ("flotilla-dispatcher", "Assigns Flotilla tasks to agents"),
        "dispatcher",
        Mode::Own,
        flotilla_dispatcher::Dispatcher::new,
    )
    .await
}
