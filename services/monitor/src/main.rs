//! `flotilla-monitor`: loads config, connects, and runs the monitor until SIGINT or SIGTERM.

use clap::Parser;
use flotilla_service::Mode;
use flotilla_service::bootstrap::{CommonArgs, Loaded, run_binary};

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
    let args = Args::parse();
    run_binary(&args.common, Mode::Join, async |loaded: &Loaded| {
        let config: flotilla_monitor::Config =
            loaded.section("monitor", serde_json::json!({ "http_addr": args.http_addr }))?;
        Ok((flotilla_monitor::Monitor::bind(&config).await?, None))
    })
    .await
}
