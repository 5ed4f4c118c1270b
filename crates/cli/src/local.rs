//! `flotilla up` and `flotilla demo`: the four services in one process (a
//! [`flotilla_local::LocalFleet`]) against a given NATS, or against a nats-server this command
//! starts in a data directory and stops on exit.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use flotilla_local::{FleetConfig, FleetFile, LocalFleet, LocalNats, ServerConfig};
use flotilla_protocol::names::event_kind;
use flotilla_protocol::{TaskSubmission, headers};
use flotilla_service::Fleet;
use futures::StreamExt as _;

use crate::{Cli, Failure, client, exit, output};

/// The demo fleet, also the default fleet of `up`.
const DEMO_FLEET: &str = include_str!("../../../examples/demo-fleet.toml");
/// The demo fleet on a real model (`demo --llm-url`).
const LLM_DEMO_FLEET: &str = include_str!("../../../examples/local-llm-fleet.toml");

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Fleet file for the agent-runner (default: the built-in demo fleet).
    #[arg(long, env = "FLOTILLA_FLEET")]
    pub fleet: Option<PathBuf>,
    /// Where a local nats-server keeps its data.
    #[arg(long, env = "FLOTILLA_DATA_DIR", default_value = ".flotilla")]
    pub data_dir: PathBuf,
    /// Client port of a local nats-server.
    #[arg(long, env = "FLOTILLA_PORT", default_value_t = 4222)]
    pub port: u16,
    /// Monitor's HTTP address (/metrics).
    #[arg(long, env = "FLOTILLA_MONITOR_HTTP_ADDR", default_value = "127.0.0.1:9464")]
    pub monitor_addr: SocketAddr,
    /// Start the local nats-server without authentication (for experiments: any client may
    /// then do anything).
    #[arg(long)]
    pub no_auth: bool,
    /// What goes into the log file, `<data dir>/flotilla.log` (`RUST_LOG`, when set, wins).
    #[arg(long, default_value = "info")]
    pub log_level: String,
}

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Number of demo tasks (default: 24 on the offline model, 4 on a real one).
    #[arg(long)]
    pub tasks: Option<usize>,
    /// OpenAI-compatible base URL of a model server (e.g. the one `scripts/demo` starts): runs
    /// the real-model demo fleet, and points every `openai` template without a `base_url` at it.
    /// Without it the demo runs on the built-in offline model.
    #[arg(long, env = "FLOTILLA_LLM_URL")]
    pub llm_url: Option<String>,
    /// OpenAI-compatible base URL of an embedding server (e.g. the one `scripts/demo` starts):
    /// every template without an `embedding_url` embeds what it remembers and recalls there.
    #[arg(long, env = "FLOTILLA_EMBEDDING_URL")]
    pub embedding_url: Option<String>,
    /// How long to wait for all tasks (default: 60s offline, 600s on a real model).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// Fleet file (default: the built-in demo fleet).
    #[arg(long, env = "FLOTILLA_FLEET")]
    pub fleet: Option<PathBuf>,
    /// Data directory of the local nats-server (default: a temporary directory).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Start the local nats-server without authentication.
    #[arg(long)]
    pub no_auth: bool,
    /// What goes into the log file (`RUST_LOG`, when set, wins).
    #[arg(long, default_value = "info")]
    pub log_level: String,
}

/// A local fleet as `up` and `demo` run it: the four services from the configuration (and the
/// command's flags), on the given NATS or on a nats-server started in `data_dir`.
async fn start(
    cli: &Cli,
    fleet_file: FleetFile,
    data_dir: PathBuf,
    port: Option<u16>,
    monitor_addr: SocketAddr,
    no_auth: bool,
) -> anyhow::Result<(LocalFleet, SocketAddr)> {
    let mut config = FleetConfig::load(
        cli.config.as_deref(),
        serde_json::json!({ "nats_url": cli.nats_url, "prefix": cli.prefix, "creds": cli.creds, "tls_ca": cli.tls_ca,
            "tls_cert": cli.tls_cert, "tls_key": cli.tls_key }),
    )?;
    // The embedded server runs with authentication unless asked not to: each service as its
    // own identity, from an auth directory kept with the server's data.
    let auth_dir = (!no_auth && config.common.nats_url().is_none()).then(|| data_dir.join("auth"));
    if let Some(dir) = &auth_dir {
        let runner_id = config.agent_runner.runner_id.get_or_insert_with(|| "local".to_owned()).clone();
        prepare_auth(dir, &config.common.names()?, &runner_id, &fleet_file)?;
    }
    let local =
        LocalNats { data_dir: data_dir.clone(), port, config: ServerConfig::Durable, auth: auth_dir.clone() };
    let mut options = config.options(local)?;
    options.auth = config.common.auth.clone();
    if let Some(dir) = &auth_dir {
        options.auth = flotilla_service::ClientAuth::creds(dir.join("creds/admin.nk"));
        options.identities = Some(dir.clone());
    }
    let mut fleet = LocalFleet::start(options).await?;
    if let Some(dir) = &auth_dir {
        // The operators' keys, which the services check control actions against.
        let auth = flotilla_service::auth::AuthDir::open(dir)?;
        auth.publish_operators(fleet.fleet(), &fleet.topology().operators).await?;
    }
    if let Some(s) = fleet.server() {
        eprintln!("nats-server {} started (pid {}, data in {})", s.url(), s.pid(), data_dir.display());
        match &auth_dir {
            Some(dir) => print_auth_help(dir, s.url()),
            None => eprintln!("authentication is off (--no-auth): any client may do anything"),
        }
    }
    let monitor_addr = fleet.start_all(&config, fleet_file, monitor_addr).await?;
    Ok((fleet, monitor_addr))
}

/// The identities a local fleet needs: created on first use, the runner's brought up to date
/// with the fleet file's templates.
fn prepare_auth(
    dir: &std::path::Path,
    names: &flotilla_protocol::Names,
    runner_id: &str,
    fleet_file: &FleetFile,
) -> anyhow::Result<()> {
    use flotilla_service::auth::{AuthDir, RoleSpec};
    let mut auth = match AuthDir::open(dir) {
        Ok(a) => a,
        Err(flotilla_service::auth::AuthError::NotInitialized(_)) => AuthDir::init(dir, names.prefix())?,
        Err(e) => return Err(e.into()),
    };
    let templates: Vec<String> = fleet_file.agents.iter().map(|t| t.name.clone()).collect();
    auth.ensure_runner(runner_id, &templates)?;
    if auth.get("operator-local").is_none() {
        auth.add("operator-local", RoleSpec::Operator { name: "local".to_owned() })?;
    }
    if auth.get("submitter-default").is_none() {
        auth.add(
            "submitter-default",
            RoleSpec::Submitter { tenant: flotilla_protocol::DEFAULT_TENANT.to_owned() },
        )?;
    }
    Ok(())
}

fn print_auth_help(dir: &std::path::Path, url: &str) {
    let creds = dir.join("creds");
    let pk = flotilla_service::auth::Credentials::load(&creds.join("submitter-default.nk"))
        .map(|c| c.inbox_prefix())
        .unwrap_or_default();
    eprintln!(
        "authentication is on (identities in {}; `flotilla auth --dir {} list`):\n  \
         operator CLI:  flotilla --nats-url {url} --creds {} status <task>\n  \
         plain client:  nkey seed {} with inbox prefix {pk},\n                 \
         submit on flotilla.tasks.submit.default, read flotilla.events.task.default.>\n                 \
         (stored events and memory by subject: JetStream API prefix flotilla.jsapi)",
        dir.display(),
        dir.display(),
        creds.join("operator-local.nk").display(),
        creds.join("submitter-default.nk").display(),
    );
}

/// Stops the fleet (services in order, connections, the local server).
async fn stop(fleet: LocalFleet) -> anyhow::Result<()> {
    let had_server = fleet.server().is_some();
    let result = fleet.stop().await;
    if had_server {
        eprintln!("nats-server stopped");
    }
    result
}

fn load_fleet(path: Option<&PathBuf>) -> anyhow::Result<FleetFile> {
    match path {
        Some(p) => FleetFile::load(p),
        None => FleetFile::parse(DEMO_FLEET),
    }
}

pub async fn up(cli: &Cli, args: &UpArgs) -> Result<(), Failure> {
    // The libraries' logs go to a file; the terminal gets a short live status.
    let log = args.data_dir.join("flotilla.log");
    let _telemetry = flotilla_service::telemetry::init_logging_to("flotilla", &args.log_level, Some(&log));
    let fleet_file = load_fleet(args.fleet.as_ref())?;
    let (mut fleet, monitor_addr) =
        start(cli, fleet_file, args.data_dir.clone(), Some(args.port), args.monitor_addr, args.no_auth)
            .await?;
    eprintln!(
        "flotilla is up: NATS {}  prefix {}\n  dashboard http://{monitor_addr}/   metrics http://{monitor_addr}/metrics\n  \
         logs {}   (Ctrl-C to stop)",
        fleet.url(),
        cli.prefix,
        log.display(),
    );
    let ended = tokio::select! {
        _ = flotilla_service::shutdown::wait_for_signal() => None,
        service = fleet.exited() => Some(service.service()),
        () = status_lines(monitor_addr) => None,
    };
    eprintln!("stopping…");
    let result = stop(fleet).await;
    match (ended, result) {
        (_, Err(e)) => Err(Failure::new(exit::UNAVAILABLE, e)),
        (Some(name), Ok(())) => {
            Err(Failure::new(exit::UNAVAILABLE, anyhow::anyhow!("{name} stopped unexpectedly")))
        }
        (None, Ok(())) => {
            eprintln!("stopped");
            Ok(())
        }
    }
}

/// The fleet's status in one line, from the monitor's overview: services, agents, queue,
/// throughput, alerts.
fn status_line(o: &serde_json::Value) -> String {
    let n = |path: &[&str]| {
        let mut v = o;
        for p in path {
            v = v.get(p).unwrap_or(&serde_json::Value::Null);
        }
        v.as_u64().unwrap_or(0)
    };
    let agents =
        o.get("agents").and_then(|a| a.get("list")).and_then(serde_json::Value::as_array).map_or(0, Vec::len);
    let done: u64 = o
        .get("charts")
        .and_then(|c| c.get("completed"))
        .and_then(serde_json::Value::as_array)
        .map(|a| a.iter().rev().take(6).filter_map(serde_json::Value::as_u64).sum())
        .unwrap_or(0);
    let alerts: Vec<String> = o
        .get("alerts")
        .and_then(serde_json::Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.get("kind").and_then(serde_json::Value::as_str))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    format!(
        "agents {agents} ({} busy, {} idle)  queued {}  running {}  completed {}  failed {}  {done}/min  alerts: {}",
        n(&["agents", "by_status", "busy"]),
        n(&["agents", "by_status", "idle"]),
        n(&["queue", "total"]),
        n(&["tasks", "running"]),
        n(&["tasks", "completed"]),
        n(&["tasks", "failed"]),
        if alerts.is_empty() { "none".to_owned() } else { alerts.join(", ") },
    )
}

/// Prints the status line whenever it changes (at most every two seconds); never returns.
async fn status_lines(monitor_addr: SocketAddr) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let url = format!("http://{monitor_addr}/api/overview");
    let mut last = String::new();
    loop {
        if let Ok(r) = http.get(&url).timeout(Duration::from_secs(2)).send().await
            && let Ok(o) = r.json::<serde_json::Value>().await
        {
            let line = status_line(&o);
            if line != last {
                eprintln!("{line}");
                last = line;
            }
        }
        // Quickly until the first line, then every two seconds.
        tokio::time::sleep(if last.is_empty() { Duration::from_millis(250) } else { Duration::from_secs(2) })
            .await;
    }
}

/// Tasks of the real-model demo: (capability, request).
const LLM_DEMO_TASKS: [(&str, &str); 6] = [
    ("notes", "Call memory_put with key release_day and value \"the release ships on Friday\"."),
    ("library", "Call the remember tool with the text \"The kitten sleeps upon the sofa.\""),
    ("explain", "In two sentences: why does a message broker help a fleet of AI agents?"),
    ("code.review", "Review this Rust code and name the bug: let v: Vec<u8> = vec![]; let x = v[0];"),
    ("library", "Call the recall tool with the query \"a cat napping on a couch\" and say what you found."),
    ("notes", "Call memory_put with key oncall and value \"Dana is on call this week\"."),
];

const DEMO_TEXTS: [&str; 8] = [
    "JetStream keeps every submission until the dispatcher has recorded it",
    "Agents share token budgets and rate limits across the fleet",
    "A crashed runner's tasks are requeued and never complete twice",
    "Any NATS client can submit a task as plain JSON",
    "Events form an audit trail that can be replayed",
    "Scale out by starting more agent-runners",
    "fn main() { println!(\"hello\"); }",
    "let x: Vec<u8> = vec![]; x[0]",
];

pub async fn demo(cli: &Cli, args: &DemoArgs) -> Result<(), Failure> {
    // The libraries' logs go to a file (kept after a demo in a temporary directory).
    let log = match &args.data_dir {
        Some(d) => d.join("flotilla.log"),
        None => std::env::temp_dir().join(format!("flotilla-demo-{}.log", std::process::id())),
    };
    let _telemetry = flotilla_service::telemetry::init_logging_to("flotilla", &args.log_level, Some(&log));
    eprintln!("logs go to {}", log.display());
    let mut fleet_file = match (&args.fleet, &args.llm_url) {
        (None, Some(_)) => FleetFile::parse(LLM_DEMO_FLEET)?,
        (path, _) => load_fleet(path.as_ref())?,
    };
    if let Some(url) = &args.llm_url {
        for t in fleet_file.agents.iter_mut().filter(|t| t.provider == "openai" && t.base_url.is_none()) {
            t.base_url = Some(url.clone());
        }
    }
    if let Some(url) = &args.embedding_url {
        for t in fleet_file.agents.iter_mut().filter(|t| t.embedding_url.is_none()) {
            t.embedding_url = Some(url.clone());
            t.embedding_model.get_or_insert_with(|| "all-minilm-l6-v2".to_owned());
        }
    }
    let temp =
        tempfile::Builder::new().prefix("flotilla-demo-").tempdir().context("failed to create a temp dir")?;
    let data_dir = args.data_dir.clone().unwrap_or_else(|| temp.path().to_path_buf());
    let (local, monitor_addr) =
        start(cli, fleet_file.clone(), data_dir, None, SocketAddr::from(([127, 0, 0, 1], 0)), args.no_auth)
            .await?;
    let result = run_demo(cli, args, local.fleet(), monitor_addr, &fleet_file).await;
    let stopped = stop(local).await;
    result?;
    stopped.map_err(|e| Failure::new(exit::UNAVAILABLE, e))
}

async fn run_demo(
    cli: &Cli,
    args: &DemoArgs,
    fleet: &Fleet,
    monitor_addr: SocketAddr,
    fleet_file: &FleetFile,
) -> Result<(), Failure> {
    let agents_bucket = client::bucket(fleet, fleet.names.agents_bucket()).await?;
    let expected_agents: u32 = fleet_file.agents.iter().map(|a| a.replicas).sum();
    // Wait until the runner has registered its agents.
    let t0 = Instant::now();
    loop {
        let n = agents_bucket.keys().await.context("failed to list agents")?.count().await;
        if n >= usize::try_from(expected_agents).unwrap_or(0) {
            break;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            return Err(Failure::new(exit::TIMEOUT, anyhow::anyhow!("agents did not register within 20 s")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let caps: Vec<String> = fleet_file.agents.iter().flat_map(|a| a.capabilities.clone()).collect();
    let real_model = args.llm_url.is_some();
    let n_tasks = args.tasks.unwrap_or(if real_model { LLM_DEMO_TASKS.len() } else { 24 });
    let timeout = args.timeout.unwrap_or(Duration::from_secs(if real_model { 600 } else { 60 }));
    eprintln!(
        "{} agents registered{}; submitting {} tasks plus 2 bad submissions",
        expected_agents,
        args.llm_url.as_ref().map(|u| format!(" (model server {u})")).unwrap_or_default(),
        n_tasks
    );
    let mut events = client::follow(fleet, None, None, false).await?;
    let started = Instant::now();
    for i in 0..n_tasks {
        let (cap, text) = match LLM_DEMO_TASKS.get(i % LLM_DEMO_TASKS.len()) {
            Some((cap, text)) if real_model && caps.iter().any(|c| c == cap) => ((*cap).to_owned(), *text),
            _ => (
                caps.get(i % caps.len().max(1)).cloned().unwrap_or_default(),
                DEMO_TEXTS.get(i % DEMO_TEXTS.len()).copied().unwrap_or_default(),
            ),
        };
        let sub = TaskSubmission {
            id: Some(format!("demo-{i:04}")),
            capability: cap,
            input: serde_json::json!({ "text": text }),
            ..Default::default()
        };
        fleet.publish_durable(fleet.names.submit_subject(), &sub, None).await.context("failed to submit")?;
    }
    // Two bad submissions, to show that they are rejected with a reason and nothing stalls.
    let mut json = fleet.headers(None);
    json.insert(headers::CONTENT_TYPE, headers::APPLICATION_JSON);
    for bad in
        [&br#"{"capability": "translate.klingon", "id": "demo-bad-capability"}"#[..], &b"{not json"[..]]
    {
        fleet
            .js
            .publish_with_headers(fleet.names.submit_subject(), json.clone(), bad.to_vec().into())
            .await
            .context("failed to submit")?
            .await
            .context("submission not stored")?;
    }
    let expected = n_tasks + 2;
    let (mut done, mut completed, mut failed, mut rejected, mut tokens) =
        (0usize, 0usize, 0usize, 0usize, 0u64);
    let deadline = tokio::time::Instant::now() + timeout;
    while done < expected {
        let msg = match tokio::time::timeout_at(deadline, events.next()).await {
            Err(_) => {
                return Err(Failure::new(
                    exit::TIMEOUT,
                    anyhow::anyhow!("only {done} of {expected} tasks finished within {timeout:?}"),
                ));
            }
            Ok(None) => break,
            Ok(Some(m)) => m.context("event stream error")?,
        };
        let Some(ev) = client::decode_event(&msg) else { continue };
        if real_model
            && !cli.json
            && let Some(line) = output::tool_calls_line(&ev)
        {
            println!("          {line}");
        }
        let terminal = match ev.kind.as_str() {
            event_kind::COMPLETED => {
                completed += 1;
                tokens += ev.usage.map_or(0, |u| u.total_tokens);
                true
            }
            event_kind::FAILED => {
                failed += 1;
                true
            }
            event_kind::REJECTED => {
                rejected += 1;
                true
            }
            _ => false,
        };
        if terminal {
            done += 1;
            if cli.json {
                println!("{}", serde_json::to_string(&ev).context("render")?);
            } else {
                println!("[{done:>3}/{expected}] {}", output::event_line(&ev));
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let summary = serde_json::json!({
        "completed": completed, "failed": failed, "rejected": rejected,
        "tokens": tokens, "seconds": (secs * 1000.0).round() / 1000.0,
    });
    if cli.json {
        println!("{summary}");
    } else {
        println!(
            "\ndemo finished in {secs:.2}s: {completed} completed, {failed} failed, {rejected} rejected (expected 2), {tokens} tokens used"
        );
        println!("metrics were at http://{monitor_addr}/metrics while it ran");
    }
    if completed == n_tasks && rejected == 2 {
        Ok(())
    } else {
        Err(Failure::new(
            exit::TASK_FAILED,
            anyhow::anyhow!("the demo did not complete every task: {summary}"),
        ))
    }
}
