//! `flotilla-bench`: Flotilla's components measured against raw NATS on the same server in the
//! same run. `runner` (an agent-runner's memory and step overhead, [`runner`]), `dispatcher`
//! (throughput, latency, decision time and memory, [`dispatcher`]), `budget` (budget-keeper
//! reservations, [`budget`]), `messages` (direct messages send → handled, [`messages`]) and
//! `recall` (the recall index at many vectors, [`recall`]) and `audit` (verification and replay over
//! a long history, [`audit`]). Each starts a local nats-server
//! unless given `--nats-url`, and the services it measures in this process through a
//! [`LocalFleet`]; `--json` prints one report.
//!
//! Exit codes: 0 success; 2 bad usage; 5 the bench could not run (NATS, a service, a failed task).

mod audit;
mod budget;
mod dispatcher;
mod events;
mod figures;
mod heap;
mod messages;
mod otlp;
mod profile;
mod raw;
mod recall;
mod registry;
mod runner;
mod scheduler;

/// Counts live heap bytes, for the scheduling core's memory per queued task (`dispatcher`, (d)).
#[global_allocator]
static ALLOCATOR: heap::Counting = heap::Counting;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use flotilla_local::{LocalFleet, LocalNats, Nats, Options, ServerConfig};
use flotilla_protocol::{Names, Prefix};
use flotilla_service::Mode;

#[derive(Debug, Parser)]
#[command(
    name = "flotilla-bench",
    version,
    about = "Measures Flotilla's components against raw NATS on the same server in the same run"
)]
pub struct Cli {
    /// NATS URL of an idle server to measure on (use your own --prefix there). Without it, each
    /// bench starts a local nats-server.
    #[arg(long, global = true, env = "FLOTILLA_NATS_URL")]
    pub nats_url: Option<String>,
    /// Subject prefix of the bench's fleet.
    #[arg(long, global = true, env = "FLOTILLA_PREFIX", default_value = "flotilla")]
    pub prefix: String,
    /// One machine-readable JSON report.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Debug, Subcommand)]
pub enum BenchWhat {
    /// Memory of one runner hosting many idle agents, and its overhead per agent-loop step.
    Runner {
        /// Idle agents the runner hosts.
        #[arg(long, default_value_t = 1000)]
        agents: u32,
        /// Tasks for the step measurement (each takes 2 steps: a tool call, then an answer).
        #[arg(long, default_value_t = 300)]
        tasks: usize,
    },
    /// Dispatcher throughput and latency next to raw JetStream on the same server, and the
    /// scheduling core's decision time and memory per queued task.
    Dispatcher {
        /// Tasks submitted as fast as possible for throughput, then as many again at half that
        /// rate for latency; the raw baselines use five times as many messages [default: 2000;
        /// 100 with --quick].
        #[arg(long)]
        tasks: Option<usize>,
        /// Agents registered in the scheduling core alone [default: 10000; 500 with --quick].
        #[arg(long)]
        agents: Option<u32>,
        /// Tasks queued in the scheduling core alone [default: 1000000; 20000 with --quick].
        #[arg(long)]
        queued: Option<usize>,
        /// Rounds of part (e), the cost of tracing: submit → completed latency with tracing off
        /// and on (spans exported over OTLP), in turns (off, on, on, off, …), each round a
        /// twentieth of --tasks (at least 10); 0 skips it [default: 40; 4 with --quick].
        #[arg(long)]
        tracing_rounds: Option<usize>,
        /// Small sizes, for tests and a first look.
        #[arg(long)]
        quick: bool,
        /// Configuration file of the local nats-server [default: the project's nats/server.conf,
        /// with `sync_interval: always`]; e.g. nats/test.conf to flush on the default interval.
        #[arg(long)]
        server_config: Option<PathBuf>,
        /// Enforce budgets: a budget-keeper runs in this process and the runners reserve and
        /// commit every model call with it, each task with its own capped budget, closed when it
        /// ends. Reports the ledger entries per task too.
        #[arg(long)]
        budgets: bool,
        /// Run the bench template with `transcripts = false`: no transcript entry is stored
        /// before the model's answer is acted on (to see what recording costs).
        #[arg(long)]
        no_transcripts: bool,
    },
    /// Direct messages send → handled (through the router, offline model) next to raw JetStream
    /// publish → consume on the same server, and the consumers they cost at that many agents.
    Messages {
        /// Messages sent [default: 5000; 300 with --quick].
        #[arg(long)]
        messages: Option<usize>,
        /// Agents of the one runner [default: 1000; 20 with --quick].
        #[arg(long)]
        agents: Option<u32>,
        /// Sends in flight at once.
        #[arg(long, default_value_t = 64)]
        in_flight: usize,
        /// Small sizes, for tests and a first look.
        #[arg(long)]
        quick: bool,
        /// Configuration file of the local nats-server [default: the project's nats/server.conf,
        /// with `sync_interval: always`]; e.g. nats/test.conf to flush on the default interval.
        #[arg(long)]
        server_config: Option<PathBuf>,
    },
    /// The recall index at many stored vectors: search latency and memory per vector.
    Recall {
        /// Vectors stored [default: 100000; 6000 with --quick, enough for the graph].
        #[arg(long)]
        vectors: Option<usize>,
        /// Dimensions of each vector (384 for a small sentence-embedding model).
        #[arg(long, default_value_t = 384)]
        dimensions: usize,
        /// Searches timed [default: 500; 50 with --quick].
        #[arg(long)]
        queries: Option<usize>,
        /// Small sizes, for tests and a first look.
        #[arg(long)]
        quick: bool,
    },
    /// Replay and verification over a long history: `audit verify`, an export and one task's
    /// replay next to a raw ordered read of the same stream.
    Audit {
        /// Events in the synthetic history (five per task, plus each task's record and two ledger
        /// entries) [default: 100000; 2000 with --quick].
        #[arg(long)]
        events: Option<usize>,
        /// Small sizes, for tests and a first look.
        #[arg(long)]
        quick: bool,
        /// Configuration file of the local nats-server [default: the project's nats/server.conf,
        /// with `sync_interval: always`]; e.g. nats/test.conf to write the history faster.
        #[arg(long)]
        server_config: Option<PathBuf>,
    },
    /// Budget-keeper reservations per second on one hot budget and on 1,000 budgets, next to raw
    /// KV compare-and-swap (sequential and concurrent) on the same server.
    Budget {
        /// Reservations of each reserve-only phase and updates of the concurrent
        /// compare-and-swap; the reserve + commit phases run half as many, the sequential
        /// compare-and-swap a quarter [default: 20000; 1000 with --quick].
        #[arg(long)]
        reservations: Option<usize>,
        /// Requests (and raw updates) in flight, over 4 connections [default: 256; 64 with
        /// --quick].
        #[arg(long)]
        in_flight: Option<usize>,
        /// Small sizes, for tests and a first look.
        #[arg(long)]
        quick: bool,
        /// Configuration file of the local nats-server [default: the project's nats/server.conf,
        /// with `sync_interval: always`]; e.g. nats/test.conf to flush on the default interval.
        #[arg(long)]
        server_config: Option<PathBuf>,
    },
    /// What an idle fleet costs: registry writes per second and the nats-server's CPU share with
    /// many idle agents on a few runner processes (next to the fsync'd KV puts the same server
    /// takes), then how fast a killed runner's agents are declared lost and their work requeued.
    Registry {
        /// Idle agents, spread over the runners [default: 10000; 400 with --quick].
        #[arg(long)]
        agents: Option<u32>,
        /// Runner processes.
        #[arg(long, default_value_t = 4)]
        runners: u32,
        /// Seconds the idle fleet is measured [default: 30; 6 with --quick].
        #[arg(long)]
        seconds: Option<u64>,
        /// Small sizes, for tests and a first look.
        #[arg(long)]
        quick: bool,
        /// Configuration file of the local nats-server [default: the project's nats/server.conf,
        /// with `sync_interval: always`]; e.g. nats/test.conf to flush on the default interval.
        #[arg(long)]
        server_config: Option<PathBuf>,
    },
}

/// Bad usage (exit code 2), as opposed to a bench that could not run.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// Exit codes.
mod exit {
    pub const USAGE: u8 = 2;
    pub const FAILED: u8 = 5;
}

impl Cli {
    /// The bench's fleet: on `--nats-url`, or on a nats-server started in `dir` with `config`;
    /// with a description of the server for the report.
    async fn fleet(
        &self,
        dir: &Path,
        config: ServerConfig,
        mode: Mode,
    ) -> anyhow::Result<(LocalFleet, String)> {
        let names = Names::new(Prefix::new(self.prefix.clone()).map_err(|e| Usage(e.to_string()))?);
        let (nats, desc) = match self.nats_url.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
            Some(url) => (Nats::Url(url.to_owned()), "external (--nats-url)".to_owned()),
            None => {
                let desc = match &config {
                    ServerConfig::Durable => {
                        "local nats-server with nats/server.conf (sync_interval: always)".to_owned()
                    }
                    ServerConfig::File(p) => format!("local nats-server with {}", p.display()),
                    ServerConfig::Defaults => "local nats-server with its defaults".to_owned(),
                };
                (Nats::Local(LocalNats { data_dir: dir.to_path_buf(), port: None, config, auth: None }), desc)
            }
        };
        let options =
            Options { mode, connection_name: "flotilla-bench".to_owned(), ..Options::new(nats, names) };
        Ok((LocalFleet::start(options).await?, desc))
    }
}

/// Stops the bench's fleet after the measurements: a service that fails to stop cleanly is
/// logged, the figures stand.
async fn stop(local: LocalFleet) {
    if let Err(e) = local.stop().await {
        tracing::warn!(error = format!("{e:#}"), "the bench's fleet did not stop cleanly");
    }
}

/// The server configuration a `--server-config` flag asks for.
fn server_config(flag: Option<&Path>) -> ServerConfig {
    flag.map_or(ServerConfig::Durable, |p| ServerConfig::File(p.to_path_buf()))
}

async fn run(cli: &Cli) -> anyhow::Result<()> {
    match &cli.what {
        BenchWhat::Runner { agents, tasks } => runner::run(cli, *agents, *tasks).await,
        BenchWhat::Dispatcher {
            tasks,
            agents,
            queued,
            tracing_rounds,
            quick,
            server_config: conf,
            budgets,
            no_transcripts,
        } => {
            let sizes = dispatcher::Sizes {
                tasks: tasks.unwrap_or(if *quick { 100 } else { 2000 }),
                agents: agents.unwrap_or(if *quick { 500 } else { 10_000 }),
                queued: queued.unwrap_or(if *quick { 20_000 } else { 1_000_000 }),
                tracing_rounds: tracing_rounds.unwrap_or(if *quick { 4 } else { 40 }),
                transcripts: !*no_transcripts,
            };
            dispatcher::run(cli, sizes, server_config(conf.as_deref()), *budgets).await
        }
        BenchWhat::Messages { messages, agents, in_flight, quick, server_config: conf } => {
            let sizes = messages::Sizes {
                messages: messages.unwrap_or(if *quick { 300 } else { 5000 }),
                agents: agents.unwrap_or(if *quick { 20 } else { 1000 }),
                in_flight: *in_flight,
            };
            messages::run(cli, sizes, server_config(conf.as_deref())).await
        }
        BenchWhat::Recall { vectors, dimensions, queries, quick } => {
            let sizes = recall::Sizes {
                vectors: vectors.unwrap_or(if *quick { 6000 } else { 100_000 }),
                dimensions: *dimensions,
                queries: queries.unwrap_or(if *quick { 50 } else { 500 }),
            };
            recall::run(cli, sizes).await
        }
        BenchWhat::Audit { events, quick, server_config: conf } => {
            let sizes = audit::Sizes { events: events.unwrap_or(if *quick { 2000 } else { 100_000 }) };
            audit::run(cli, sizes, server_config(conf.as_deref())).await
        }
        BenchWhat::Registry { agents, runners, seconds, quick, server_config: conf } => {
            let sizes = registry::Sizes {
                agents: agents.unwrap_or(if *quick { 400 } else { 10_000 }),
                runners: *runners,
                seconds: seconds.unwrap_or(if *quick { 6 } else { 30 }),
            };
            registry::run(cli, sizes, server_config(conf.as_deref())).await
        }
        BenchWhat::Budget { reservations, in_flight, quick, server_config: conf } => {
            let sizes = budget::Sizes {
                reservations: reservations.unwrap_or(if *quick { 1000 } else { 20_000 }),
                in_flight: in_flight.unwrap_or(if *quick { 64 } else { 256 }),
            };
            budget::run(cli, sizes, server_config(conf.as_deref())).await
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(run(&cli)),
        Err(e) => Err(anyhow::Error::new(e).context("failed to start the async runtime")),
    };
    let Err(error) = result else { return ExitCode::SUCCESS };
    let code = if error.is::<Usage>() { exit::USAGE } else { exit::FAILED };
    if cli.json {
        println!("{}", serde_json::json!({ "error": format!("{error:#}"), "exit_code": code }));
    } else {
        eprintln!("error: {error:#}");
    }
    ExitCode::from(code)
}
