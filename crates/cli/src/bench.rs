//! `flotilla bench …`: an alias of the `flotilla-bench` binary next to this one (the benchmarks
//! and their counting allocator live there, not in `flotilla`). It replaces this process with
//! `flotilla-bench`, passing the arguments and the global options on.

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;

use anyhow::Context as _;

use crate::{Cli, Failure};

#[derive(Debug, clap::Args)]
#[command(disable_help_flag = true)]
pub struct BenchArgs {
    /// `flotilla-bench` arguments: `runner`, `dispatcher` or `budget` with their flags (`--help`
    /// lists them).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// Runs `flotilla-bench` in this process's place; returns only if it could not be started.
pub fn exec(cli: &Cli, args: &BenchArgs) -> Result<(), Failure> {
    let bench: PathBuf = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("flotilla-bench")))
        .filter(|p| p.is_file())
        .context("flotilla-bench is not next to flotilla (build it: cargo build --release --bins)")?;
    let mut cmd = std::process::Command::new(&bench);
    cmd.env("FLOTILLA_PREFIX", &cli.prefix);
    if let Some(url) = &cli.nats_url {
        cmd.env("FLOTILLA_NATS_URL", url);
    }
    if cli.json && !args.args.iter().any(|a| a == "--json") {
        cmd.arg("--json");
    }
    let error = cmd.args(&args.args).exec();
    Err(anyhow::Error::new(error).context(format!("failed to run {}", bench.display())).into())
}
