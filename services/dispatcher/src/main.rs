//! `flotilla-dispatcher`: loads config, connects, ensures the topology (which it owns) and runs
//! the dispatcher until SIGINT or SIGTERM.

use clap::Parser;
use flotilla_service::Mode;
use flotilla_service::bootstrap::{CommonArgs, Loaded, run_binary};

#[derive(Debug, Parser)]
#[command(name = "flotilla-dispatcher", version, about = "Assigns Flotilla tasks to agents")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    run_binary(&args.common, Mode::Own, async |loaded: &Loaded| {
        let config = loaded.section("dispatcher", serde_json::json!({}))?;
        Ok((flotilla_dispatcher::Dispatcher::new(config), None))
    })
    .await
}
