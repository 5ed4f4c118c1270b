//! `flotilla`: run a local fleet (`up`, `demo`) and talk to any fleet (`submit`, `status`,
//! `cancel`, `agents`, `tail`, `approve`). Human-readable output by default, `--json` for scripts.
//!
//! Exit codes: 0 success; 1 the task failed or was rejected; 2 bad usage; 3 not found;
//! 4 timed out; 5 NATS or the fleet could not be reached or used.

mod audit;
mod auth;
mod bench;
mod budget;
mod cancel;
mod client;
mod fleet;
mod grants;
mod health;
mod local;
mod memory;
mod output;
mod queue;
mod replay;
mod stats;
mod top;
mod topics;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn new(code: u8, error: impl Into<anyhow::Error>) -> Self {
        Self { code, error: error.into() }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Self { code: exit::UNAVAILABLE, error }
    }
}

/// Exit codes.
pub mod exit {
    pub const TASK_FAILED: u8 = 1;
    pub const NOT_FOUND: u8 = 3;
    pub const TIMEOUT: u8 = 4;
    pub const UNAVAILABLE: u8 = 5;
}

#[derive(Debug, Parser)]
#[command(name = "flotilla", version, about = "Flotilla: an operating system for fleets of AI agents")]
pub struct Cli {
    /// NATS URL. `up` and `demo` start their own nats-server when it is not given.
    #[arg(long, global = true, env = "FLOTILLA_NATS_URL")]
    pub nats_url: Option<String>,
    /// Subject prefix of the fleet.
    #[arg(long, global = true, env = "FLOTILLA_PREFIX", default_value = "flotilla")]
    pub prefix: String,
    /// Configuration file (TOML) for the services `up` runs.
    #[arg(long, global = true, env = "FLOTILLA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Seed file of the identity to connect as (`flotilla auth` writes them).
    #[arg(long, global = true, env = "FLOTILLA_CREDS")]
    pub creds: Option<PathBuf>,
    /// CA certificate (PEM) to verify the server with; turns TLS on.
    #[arg(long, global = true, env = "FLOTILLA_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), for a server that verifies clients.
    #[arg(long, global = true, env = "FLOTILLA_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Key of the client certificate (PEM).
    #[arg(long, global = true, env = "FLOTILLA_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The operator name of the credential, when its seed file is named as `flotilla auth` names
    /// an operator's (`operator-<name>.nk`).
    pub fn operator_name(&self) -> Option<String> {
        let stem = self.creds.as_ref()?.file_stem()?.to_str()?;
        stem.strip_prefix("operator-").map(str::to_owned)
    }

    /// How the CLI authenticates, from its flags.
    pub fn client_auth(&self) -> flotilla_service::ClientAuth {
        flotilla_service::ClientAuth {
            creds: self.creds.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the four services (and, without --nats-url, a local nats-server) until Ctrl-C.
    Up(local::UpArgs),
    /// Start a local fleet, push demo tasks through it end to end, print the results, stop.
    Demo(local::DemoArgs),
    /// Submit a task.
    Submit(client::SubmitArgs),
    /// Show a task's current record.
    Status {
        /// Task id.
        id: String,
    },
    /// Cancel a task that has not finished: it fails with code `cancelled`, and a running attempt
    /// is stopped.
    Cancel {
        /// Task id.
        id: String,
        /// Why; becomes the task's failure message (default "cancelled by an operator").
        #[arg(long)]
        reason: Option<String>,
    },
    /// List registered agents, or start and stop agents at runtime (spawn, scale, stop).
    Agents(fleet::AgentsArgs),
    /// The active dispatcher's queue: by capability, priority and tenant, with waiting times.
    Queue(queue::QueueArgs),
    /// The fleet's figures over a rolling window (from the monitor): tasks, quality, times,
    /// resources, and what a successful task costs.
    Stats(stats::StatsArgs),
    /// Every service instance (active or standby), agent (state, heartbeat age), stream against
    /// its limits, and the NATS server.
    Health,
    /// A live terminal view of the fleet: agents, queue, throughput, alerts (s sorts, / filters,
    /// q quits); `--once` prints one frame.
    Top(top::TopArgs),
    /// Token budgets: set a scope's limit, show its usage.
    Budget(budget::BudgetArgs),
    /// Who may message whom: allow, deny, list, remove.
    Grants(grants::GrantsArgs),
    /// Send a message to an agent, a template, a capability or a broadcast, as a client identity.
    Send(grants::SendArgs),
    /// The agents' shared memory: get, put (with --expect for compare-and-swap), ls, watch, history.
    Memory(memory::MemoryArgs),
    /// Topic events: publish, tail, list (with the templates subscribed).
    Topics(topics::TopicsArgs),
    /// Follow lifecycle events live.
    Tail(client::TailArgs),
    /// Measure a component against raw NATS in the same run: runs `flotilla-bench` (from next
    /// to this executable) with the same arguments.
    Bench(bench::BenchArgs),
    /// Identities and credentials: init, add-runner, add-submitter, add-operator, add-auditor,
    /// revoke, list.
    Auth(auth::AuthArgs),
    /// A task's whole story from the streams (events, assignment reasons, transcripts,
    /// messages, budget ledger, approvals; `--tree` its children), `--follow` a live one, or
    /// `--rerun` its agent loop against the recorded answers and compare every decision.
    Replay(replay::ReplayArgs),
    /// Audit the fleet's history: `verify` it (or an export), `export` it with a hash chain.
    Audit(audit::AuditArgs),
    /// Approve the pending human-approval request of a task.
    Approve {
        /// Task id.
        id: String,
        /// A note for the agent.
        #[arg(long)]
        comment: Option<String>,
    },
    /// Reject the pending human-approval request of a task: the task fails with the comment.
    Reject {
        /// Task id.
        id: String,
        /// The reason, which becomes the task's failure message.
        #[arg(long)]
        comment: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: failed to start the async runtime: {e}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    let result = runtime.block_on(async {
        match &cli.command {
            Command::Up(args) => local::up(&cli, args).await,
            Command::Demo(args) => local::demo(&cli, args).await,
            Command::Submit(args) => client::submit(&cli, args).await,
            Command::Status { id } => client::status(&cli, id).await,
            Command::Cancel { id, reason } => cancel::cancel(&cli, id, reason.as_deref()).await,
            Command::Agents(args) => fleet::run(&cli, args).await,
            Command::Tail(args) => client::tail(&cli, args).await,
            Command::Grants(args) => grants::run(&cli, args).await,
            Command::Topics(args) => topics::run(&cli, args).await,
            Command::Memory(args) => memory::run(&cli, args).await,
            Command::Send(args) => grants::send(&cli, args).await,
            Command::Queue(args) => queue::run(&cli, args).await,
            Command::Stats(args) => stats::run(&cli, args).await,
            Command::Health => health::run(&cli).await,
            Command::Top(args) => top::run(&cli, args).await,
            Command::Budget(args) => budget::run(&cli, args).await,
            Command::Bench(args) => bench::exec(&cli, args),
            Command::Auth(args) => auth::run(&cli, args).await,
            Command::Replay(args) => replay::run(&cli, args).await,
            Command::Audit(args) => audit::run(&cli, args).await,
            Command::Approve { id, comment } => client::decide(&cli, id, true, comment.clone()).await,
            Command::Reject { id, comment } => client::decide(&cli, id, false, comment.clone()).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(mut f) => {
            // Whatever failed, say so when the server refused something on the way.
            if let Some(why) = client::refused::explain()
                && !format!("{:#}", f.error).contains("the server refused")
            {
                f.error = f.error.context(why);
            }
            if cli.json {
                let out = serde_json::json!({ "error": format!("{:#}", f.error), "exit_code": f.code });
                println!("{out}");
            } else {
                eprintln!("error: {:#}", f.error);
            }
            ExitCode::from(f.code)
        }
    }
}
