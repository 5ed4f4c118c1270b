//! `flotilla agents [list|spawn|scale|stop]`: list the registered agents and change the running
//! fleet through the runners' `<p>.runners.<runner>.scale|stop` request subjects.

use std::time::Duration;

use anyhow::Context as _;
use flotilla_protocol::names::runner_op;
use flotilla_protocol::{AgentRecord, AgentStatus, FleetChangeReply, ScaleRequest, StopAgentRequest};
use flotilla_service::Fleet;
use flotilla_service::nats::FleetError;

use crate::client::{bucket, connect, request};
use crate::{Cli, Failure, exit, output};

#[derive(Debug, clap::Args)]
pub struct AgentsArgs {
    #[command(subcommand)]
    pub action: Option<AgentsAction>,
}

#[derive(Debug, clap::Subcommand)]
pub enum AgentsAction {
    /// List the registered agents (the default).
    List,
    /// Start N more agents of a template, on a runner that hosts it.
    Spawn {
        /// Template name from the runner's fleet file.
        template: String,
        /// How many more.
        #[arg(short = 'n', long = "count", default_value_t = 1)]
        n: u32,
        /// Runner to start them on (default: the runner with the fewest agents of the template).
        #[arg(long)]
        runner: Option<String>,
    },
    /// Run exactly N agents of a template on one runner (0 stops them all).
    Scale {
        template: String,
        replicas: u32,
        /// Runner (default: the only runner hosting the template).
        #[arg(long)]
        runner: Option<String>,
    },
    /// Stop an agent: it takes no new work, finishes what it holds, then leaves the registry.
    Stop {
        /// Agent id, as `flotilla agents` lists it.
        agent: String,
        /// Wait until it has left.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        wait_timeout: Duration,
    },
}

pub async fn run(cli: &Cli, args: &AgentsArgs) -> Result<(), Failure> {
    match &args.action {
        None | Some(AgentsAction::List) => list(cli).await,
        Some(AgentsAction::Spawn { template, n, runner }) => {
            spawn(cli, template, *n, runner.as_deref()).await
        }
        Some(AgentsAction::Scale { template, replicas, runner }) => {
            scale(cli, template, *replicas, runner.as_deref()).await
        }
        Some(AgentsAction::Stop { agent, wait, wait_timeout }) => {
            stop(cli, agent, *wait, *wait_timeout).await
        }
    }
}

/// Every registered agent, its heartbeat as last seen through its runner's
/// ([`AgentRecord::as_seen`]).
pub(crate) async fn registered(fleet: &Fleet) -> Result<Vec<AgentRecord>, Failure> {
    let store = bucket(fleet, fleet.names.agents_bucket()).await?;
    let runners = runners(fleet).await?;
    let mut list: Vec<AgentRecord> = Vec::new();
    for key in fleet.kv_keys(&store).await.context("failed to list agents")? {
        match fleet.kv_get::<AgentRecord>(&store, &key).await {
            Ok(Some((rec, _))) => {
                let runner = runners.get(&rec.runner_id);
                list.push(rec.as_seen(runner));
            }
            // Gone since (deregistered) or unreadable: not listed.
            Ok(None) | Err(FleetError::Decode { .. }) => {}
            Err(e) => return Err(anyhow::Error::from(e).context("failed to read an agent").into()),
        }
    }
    list.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
    Ok(list)
}

/// Every runner's heartbeat record, by runner id.
async fn runners(
    fleet: &Fleet,
) -> Result<std::collections::HashMap<String, flotilla_protocol::RunnerRecord>, Failure> {
    let store = bucket(fleet, fleet.names.runners_bucket()).await?;
    let mut out = std::collections::HashMap::new();
    for key in fleet.kv_keys(&store).await.context("failed to list runners")? {
        if let Ok(Some((rec, _))) = fleet.kv_get::<flotilla_protocol::RunnerRecord>(&store, &key).await {
            out.insert(key, rec);
        }
    }
    Ok(out)
}

async fn list(cli: &Cli) -> Result<(), Failure> {
    let fleet = connect(cli).await?;
    let list = registered(&fleet).await?;
    if cli.json {
        println!("{}", serde_json::to_string(&list).context("failed to render")?);
    } else if list.is_empty() {
        println!("no agents registered");
    } else {
        print!("{}", output::agents_table(&list));
    }
    Ok(())
}

/// Agents of `template` that take work, per runner.
fn active_by_runner(list: &[AgentRecord], template: &str) -> std::collections::BTreeMap<String, u32> {
    let mut m = std::collections::BTreeMap::new();
    for a in list.iter().filter(|a| a.name == template) {
        let n: &mut u32 = m.entry(a.runner_id.clone()).or_default();
        if a.status != AgentStatus::Draining {
            *n = n.saturating_add(1);
        }
    }
    m
}

async fn spawn(cli: &Cli, template: &str, n: u32, runner: Option<&str>) -> Result<(), Failure> {
    let fleet = connect(cli).await?;
    let list = registered(&fleet).await?;
    let counts = active_by_runner(&list, template);
    let (runner, current) = match runner {
        Some(r) => (r.to_owned(), counts.get(r).copied().unwrap_or(0)),
        None => counts
            .iter()
            .min_by_key(|(r, n)| (**n, (*r).clone()))
            .map(|(r, n)| (r.clone(), *n))
            .ok_or_else(|| {
                Failure::new(
                    exit::NOT_FOUND,
                    anyhow::anyhow!(
                        "no registered agent is of template {template:?}, so no runner is known to host it; name one with --runner"
                    ),
                )
            })?,
    };
    let req =
        ScaleRequest { template: template.to_owned(), replicas: current.saturating_add(n), autoscale: false };
    let reply = change(&fleet, &runner, runner_op::SCALE, &req).await?;
    show(cli, &reply)
}

async fn scale(cli: &Cli, template: &str, replicas: u32, runner: Option<&str>) -> Result<(), Failure> {
    let fleet = connect(cli).await?;
    let runner = match runner {
        Some(r) => r.to_owned(),
        None => {
            let counts = active_by_runner(&registered(&fleet).await?, template);
            let mut runners = counts.keys();
            match (runners.next(), runners.next()) {
                (Some(r), None) => r.clone(),
                (None, _) => {
                    return Err(Failure::new(
                        exit::NOT_FOUND,
                        anyhow::anyhow!(
                            "no runner is known to host template {template:?}; name one with --runner"
                        ),
                    ));
                }
                (Some(_), Some(_)) => {
                    return Err(Failure::new(
                        2,
                        anyhow::anyhow!(
                            "several runners host template {template:?} ({}); name one with --runner",
                            counts.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    ));
                }
            }
        }
    };
    let req = ScaleRequest { template: template.to_owned(), replicas, autoscale: false };
    let reply = change(&fleet, &runner, runner_op::SCALE, &req).await?;
    show(cli, &reply)
}

async fn stop(cli: &Cli, agent: &str, wait: bool, wait_timeout: Duration) -> Result<(), Failure> {
    let fleet = connect(cli).await?;
    let store = bucket(&fleet, fleet.names.agents_bucket()).await?;
    let Some((rec, _)) =
        fleet.kv_get::<AgentRecord>(&store, agent).await.context("failed to read the agent")?
    else {
        return Err(Failure::new(exit::NOT_FOUND, anyhow::anyhow!("no registered agent {agent:?}")));
    };
    let req = StopAgentRequest { agent_id: agent.to_owned() };
    let reply = change(&fleet, &rec.runner_id, runner_op::STOP, &req).await?;
    show(cli, &reply)?;
    if wait {
        let t0 = std::time::Instant::now();
        while store.get(agent).await.context("failed to read the agent")?.is_some() {
            if t0.elapsed() > wait_timeout {
                return Err(Failure::new(
                    exit::TIMEOUT,
                    anyhow::anyhow!("agent {agent} is still finishing its work after {wait_timeout:?}"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if !cli.json {
            println!("agent {agent} has stopped and left the registry");
        }
    }
    Ok(())
}

/// Asks `runner` to change its fleet (`op`: scale or stop); its error answers map to exit codes.
async fn change<T: serde::Serialize>(
    fleet: &Fleet,
    runner: &str,
    op: &str,
    body: &T,
) -> Result<FleetChangeReply, Failure> {
    let subject = fleet.names.runner_control(runner, op);
    let reply: FleetChangeReply = request(fleet, subject, &format!("runner {runner}"), body).await?;
    if let Some(e) = &reply.error {
        let code = match e.code.as_str() {
            "unknown_template" | "unknown_agent" => exit::NOT_FOUND,
            "malformed" | "limit_exceeded" => 2,
            _ => exit::UNAVAILABLE,
        };
        return Err(Failure::new(code, anyhow::anyhow!("runner {runner}: {} ({})", e.message, e.code)));
    }
    Ok(reply)
}

fn show(cli: &Cli, reply: &FleetChangeReply) -> Result<(), Failure> {
    if cli.json {
        println!("{}", serde_json::to_string(reply).context("failed to render")?);
        return Ok(());
    }
    println!(
        "runner {}: template {} runs {} agent{}{}",
        reply.runner_id,
        reply.template,
        reply.agents.len(),
        if reply.agents.len() == 1 { "" } else { "s" },
        if reply.agents.is_empty() { String::new() } else { format!(": {}", reply.agents.join(", ")) }
    );
    if !reply.started.is_empty() {
        println!("  started: {}", reply.started.join(", "));
    }
    if !reply.stopping.is_empty() {
        println!("  stopping (finishing their tasks, then leaving): {}", reply.stopping.join(", "));
    }
    Ok(())
}
