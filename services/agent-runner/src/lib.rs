//! The agent-runner: hosts the agents of a fleet file, keeps them registered with heartbeats,
//! takes the assignments the dispatcher sends them, runs each on its model and reports the
//! lifecycle. Claims and completions are revision-checked KV updates, so a redelivered or late
//! assignment never completes twice.

pub mod agent_loop;
pub mod budget;
mod control;
pub mod fleet;
pub mod lifecycle;
pub mod llm;
pub mod mailbox;
mod partial_text;
pub mod recall;
mod registry;
pub mod rerun;
pub mod tools;
pub mod transcript;
mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{AckPolicy, pull};
use flotilla_service::{Fleet, Topology};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use fleet::FleetFile;
pub use registry::Agents;

/// Agent-runner settings (`[agent_runner]` in the config file, `FLOTILLA_AGENT_RUNNER__*`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Fleet file to load.
    pub fleet: Option<PathBuf>,
    /// Stable id of this runner (`[A-Za-z0-9_-]`); a restarted runner with the same id picks up
    /// its durable consumer again. Defaults to a random id.
    pub runner_id: Option<String>,
    /// Heartbeat period of the registry entries.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Ack wait of the assignment consumer; in-progress acks go out every third of it.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Longest a single task may keep its assignment alive with in-progress acks.
    #[serde(with = "humantime_serde")]
    pub max_task_time: Duration,
    /// On shutdown, how long in-flight tasks get to finish before they are handed back.
    #[serde(with = "humantime_serde")]
    pub drain_grace: Duration,
    /// TOML file of API keys (`NAME = "value"`), consulted when the environment lacks a key.
    pub secrets_file: Option<PathBuf>,
    /// A direct message waiting this long counts one priority class more urgent (`0s`: strict
    /// precedence).
    #[serde(with = "humantime_serde")]
    pub message_aging: Duration,
    /// Reserve every model call's tokens with the budget-keeper first (and commit its usage
    /// after). With this off, only the task's own token cap is checked, by the runner alone.
    pub budgets: bool,
    /// How long each tenant's transcripts are kept (e.g. `acme = "7d"`), when shorter than the
    /// transcripts stream's `streams.transcripts_max_age`; a per-message TTL.
    pub transcript_retention: std::collections::BTreeMap<String, humantime_serde::Serde<Duration>>,
    /// How long an agent that crashed its way into ERROR (three crashes in a row) waits before
    /// it takes work again; doubled each time it comes back in one crash loop.
    #[serde(with = "humantime_serde")]
    pub error_cooldown: Duration,
    /// The longest cool-down.
    #[serde(with = "humantime_serde")]
    pub error_cooldown_max: Duration,
    /// How often an agent comes back from ERROR in one crash loop before it stays there until
    /// its runner restarts (0: never comes back).
    pub error_recoveries: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            fleet: None,
            runner_id: None,
            heartbeat_interval: Duration::from_secs(1),
            ack_wait: Duration::from_secs(30),
            max_task_time: Duration::from_secs(3600),
            drain_grace: Duration::from_secs(10),
            secrets_file: None,
            message_aging: mailbox::DEFAULT_AGING,
            budgets: true,
            transcript_retention: std::collections::BTreeMap::new(),
            error_cooldown: registry::Recovery::default().cooldown,
            error_cooldown_max: registry::Recovery::default().cooldown_max,
            error_recoveries: registry::Recovery::default().limit,
        }
    }
}

/// An agent-runner, ready to run ([`flotilla_service::Service`]): its settings, the fleet file of
/// the agents it hosts and the tools they may use.
#[derive(Debug)]
pub struct Runner {
    config: Config,
    fleet_file: FleetFile,
    tools: tools::Registry,
}

impl Runner {
    /// A runner of `fleet_file` with the built-in tools.
    pub fn new(config: Config, fleet_file: FleetFile) -> anyhow::Result<Self> {
        Ok(Self { config, fleet_file, tools: tools::Registry::with_builtins()? })
    }

    /// The same runner with a tool registry of the caller's (built-ins plus its own tools).
    pub fn with_tools(self, tools: tools::Registry) -> Self {
        Self { tools, ..self }
    }
}

impl flotilla_service::Service for Runner {
    const NAME: &'static str = flotilla_protocol::names::service::AGENT_RUNNER;

    /// Hosts the fleet file's agents until `shutdown` is cancelled, then drains.
    async fn run(self, fleet: Fleet, topology: Topology, shutdown: CancellationToken) -> anyhow::Result<()> {
        run(self.config, self.fleet_file, fleet, topology, self.tools, shutdown).await
    }
}

/// Each template's model provider and embedder.
type Providers =
    (std::collections::HashMap<String, llm::Provider>, std::collections::HashMap<String, recall::Embedder>);

/// Builds each template's provider and embedder, with its API key from the environment or the
/// secrets file.
fn providers(config: &Config, fleet_file: &FleetFile) -> anyhow::Result<Providers> {
    let secrets: std::collections::HashMap<String, String> = match &config.secrets_file {
        Some(p) => toml::from_str(
            &std::fs::read_to_string(p)
                .with_context(|| format!("failed to read secrets file {}", p.display()))?,
        )
        .with_context(|| format!("secrets file {} must hold NAME = \"value\" lines", p.display()))?,
        None => Default::default(),
    };
    let http = llm::http_client()?;
    let mut out = std::collections::HashMap::new();
    let mut embedders = std::collections::HashMap::new();
    for t in &fleet_file.agents {
        let key_name = t.api_key_env.clone().unwrap_or_else(|| match t.provider.as_str() {
            "anthropic" => "ANTHROPIC_API_KEY".to_owned(),
            _ => "OPENAI_API_KEY".to_owned(),
        });
        let key =
            std::env::var(&key_name).ok().or_else(|| secrets.get(&key_name).cloned()).unwrap_or_default();
        let settings = |default_base: &str| llm::HttpSettings {
            base_url: t.base_url.clone().unwrap_or_else(|| default_base.to_owned()),
            api_key: llm::Secret::new(key.clone()),
            timeout: t.request_timeout,
            retry: t.retry,
        };
        let provider = match t.provider.as_str() {
            "openai" => {
                anyhow::ensure!(
                    !key.is_empty() || t.base_url.is_some(),
                    "agent {:?}: no API key for OpenAI: set {key_name} (or base_url for a local server)",
                    t.name
                );
                let client = llm::openai::Client::new(http.clone(), settings("https://api.openai.com/v1"));
                llm::Provider::OpenAi(if t.streams() {
                    client.streaming(t.stream_idle_timeout)
                } else {
                    client
                })
            }
            "anthropic" => {
                anyhow::ensure!(
                    !key.is_empty(),
                    "agent {:?}: no API key for Anthropic: set {key_name}",
                    t.name
                );
                llm::Provider::Anthropic(llm::anthropic::Client::new(
                    http.clone(),
                    settings("https://api.anthropic.com"),
                ))
            }
            _ => llm::Provider::Offline { agent: t.name.clone() },
        };
        let openai = matches!(provider, llm::Provider::OpenAi(_));
        // `embedding_url`, else an OpenAI-compatible chat provider's own host, else offline.
        let embedder = match t.embedding_url.clone().or_else(|| {
            openai.then(|| t.base_url.clone().unwrap_or_else(|| "https://api.openai.com/v1".to_owned()))
        }) {
            Some(base_url) => recall::Embedder::OpenAi {
                http: http.clone(),
                // The chat provider's key goes only to the chat provider's own host.
                api_key: llm::Secret::new(
                    if openai && (t.embedding_url.is_none() || t.embedding_url == t.base_url) {
                        key.clone()
                    } else {
                        String::new()
                    },
                ),
                base_url,
                model: t
                    .embedding_model
                    .clone()
                    .unwrap_or_else(|| if openai { t.model.clone() } else { "embedding".to_owned() }),
                timeout: t.request_timeout,
            },
            None => recall::Embedder::Offline,
        };
        embedders.insert(t.name.clone(), embedder);
        out.insert(t.name.clone(), provider);
    }
    Ok((out, embedders))
}

async fn run(
    config: Config,
    fleet_file: FleetFile,
    fleet: Fleet,
    topology: Topology,
    registry: tools::Registry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    for t in &fleet_file.agents {
        if let Some(unknown) = t.tools.iter().find(|n| !registry.contains(n)) {
            anyhow::bail!("agent {:?}: unknown tool {unknown:?}", t.name);
        }
    }
    let (providers, embedders) = providers(&config, &fleet_file)?;
    anyhow::ensure!(
        config.heartbeat_interval >= Duration::from_millis(10),
        "agent_runner.heartbeat_interval must be at least 10ms"
    );
    anyhow::ensure!(
        config.ack_wait >= Duration::from_millis(30),
        "agent_runner.ack_wait must be at least 30ms"
    );
    let runner_id = config.runner_id.clone().unwrap_or_else(|| fleet.instance.clone());
    anyhow::ensure!(
        flotilla_protocol::names::is_token(&runner_id) && runner_id.len() <= 48,
        "runner id {runner_id:?} must be 1-48 characters of A-Z a-z 0-9 _ -"
    );
    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let recovery = registry::Recovery {
        cooldown: config.error_cooldown,
        cooldown_max: config.error_cooldown_max.max(config.error_cooldown),
        limit: config.error_recoveries,
    };
    let agents = Arc::new(
        Agents::new(&runner_id, &fleet_file, config.heartbeat_interval, &events_tx).with_recovery(recovery),
    );
    drop(events_tx);
    let events_stop = CancellationToken::new();
    let lifecycle_events = tokio::spawn(lifecycle::publish_events(
        fleet.clone(),
        events_rx,
        agents.dirty.clone(),
        events_stop.clone(),
    ));
    registry::declare_capabilities(&fleet, &topology, &fleet_file).await?;
    agents.beat(&fleet, &topology, true).await.context("failed to register agents")?;
    tracing::info!(runner = %runner_id, agents = agents.len(), "agents registered");

    let stream = fleet
        .js
        .get_stream_no_info(fleet.names.assignments_stream())
        .await
        .context("failed to open the assignments stream")?;
    let capacity = i64::from(agents.total_capacity());
    let consumer_config = pull::Config {
        durable_name: Some(fleet.names.runner_consumer(&runner_id)),
        description: Some(format!("Flotilla runner {runner_id}: its assignments")),
        filter_subject: fleet.names.assign_subject(&runner_id),
        ack_policy: AckPolicy::Explicit,
        ack_wait: config.ack_wait,
        max_deliver: -1,
        max_ack_pending: capacity.saturating_add(16),
        inactive_threshold: Duration::from_secs(24 * 3600),
        ..Default::default()
    };
    take_back_assignments(&stream, &fleet.names.runner_consumer(&runner_id)).await;
    let consumer = flotilla_service::nats::patiently(
        "the assignment consumer",
        flotilla_service::nats::STARTUP_PATIENCE,
        || stream.create_consumer(consumer_config.clone()),
    )
    .await
    .context("failed to ensure the runner's assignment consumer")?;

    // The budget-keeper, asked before and after every model call (tasks' and direct messages').
    let budgets = config.budgets.then(|| flotilla_service::budget::Client::new(fleet.clone()));
    // Agents started and stopped at runtime (`flotilla agents spawn|stop`, scale requests).
    let control = control::Control {
        fleet: fleet.clone(),
        topology: topology.clone(),
        agents: agents.clone(),
        shutdown: shutdown.clone(),
        stream: stream.clone(),
        consumer: consumer_config,
    };
    for slot in agents.slots() {
        control.start_agent(&slot);
    }
    let control = tokio::spawn(control.serve());
    let health = {
        let agents = agents.clone();
        flotilla_service::health::serve(
            fleet.clone(),
            flotilla_protocol::names::service::AGENT_RUNNER,
            Arc::new(move || agents.health_details()),
            shutdown.clone(),
        )
        .await?
    };

    // Heartbeats go on through the drain (as `draining`), so the dispatcher does not take back
    // tasks that are still finishing here; they stop only when the work has.
    let heartbeat_stop = CancellationToken::new();
    let heartbeat = tokio::spawn(registry::heartbeat_loop(
        agents.clone(),
        fleet.clone(),
        topology.clone(),
        config.heartbeat_interval,
        heartbeat_stop.clone(),
    ));

    // Who may read and write which namespace of shared memory.
    let grants = flotilla_service::follow::Grants::default();
    let grants_stop = CancellationToken::new();
    let grants_view = tokio::spawn(grants.clone().maintain(topology.grants.clone(), grants_stop.clone()));
    // What agents remembered, from the recall stream.
    let recall_index = Arc::new(recall::Index::default());
    let recall_view = tokio::spawn(recall_index.clone().maintain(fleet.clone(), grants_stop.clone()));
    let recall_graphs = tokio::spawn(recall_index.clone().build_graphs(grants_stop.clone()));
    let tracker = TaskTracker::new();
    // Cancelled after the drain grace: handlers still running give their work back.
    let abort = CancellationToken::new();
    let ctx = Arc::new(worker::Context {
        fleet: fleet.clone(),
        topology: topology.clone(),
        agents: agents.clone(),
        runner_id: runner_id.clone(),
        progress_every: config.ack_wait / 3,
        max_task_time: config.max_task_time,
        abort: abort.clone(),
        providers,
        registry: Arc::new(registry),
        budgets,
        mailbox: Arc::new(mailbox::Mailbox::new(config.message_aging)),
        grants: grants.clone(),
        recall: recall_index.clone(),
        embedders,
        transcript_retention: config.transcript_retention.iter().map(|(t, d)| (t.clone(), **d)).collect(),
    });
    let messages = fleet
        .js
        .get_stream_no_info(fleet.names.messages_stream())
        .await
        .context("failed to open the messages stream")?;
    let mailbox_stop = CancellationToken::new();
    let mailbox = tokio::spawn(mailbox::run(
        Arc::new(mailbox::Env { ctx: ctx.clone(), mailbox: ctx.mailbox.clone(), ack_wait: config.ack_wait }),
        messages,
        mailbox_stop.clone(),
    ));

    let pull = flotilla_service::consume::Pull {
        what: "assignment",
        batch: usize::try_from(capacity).unwrap_or(64),
        // Bounded by the consumer's max_ack_pending and each agent's permits.
        concurrency: None,
    };
    let consumed = flotilla_service::consume::consume(&consumer, pull, &tracker, &shutdown, |msg| {
        worker::handle(ctx.clone(), msg)
    })
    .await;
    if let Err(e) = &consumed {
        tracing::error!(error = format!("{e:#}"), "assignments could not be consumed; draining");
    }

    // Drain: no more intake; mark agents draining; let in-flight work finish within the grace.
    tracing::info!(in_flight = agents.in_flight_total(), "draining");
    agents.draining.store(true, Ordering::SeqCst);
    let _ = agents.beat(&fleet, &topology, true).await;
    tracker.close();
    if tokio::time::timeout(config.drain_grace, tracker.wait()).await.is_err() {
        tracing::warn!("drain grace over; handing unfinished tasks back for redelivery");
        abort.cancel();
        tracker.wait().await;
    }
    match control.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "the fleet-change endpoint failed"),
        Err(e) => tracing::warn!(error = %e, "the fleet-change endpoint panicked"),
    }
    // Messages not yet taken go back; those being handled finish (or are handed back at abort).
    mailbox_stop.cancel();
    match mailbox.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = format!("{e:#}"), "the mailbox failed"),
        Err(e) => tracing::warn!(error = %e, "the mailbox panicked"),
    }
    heartbeat_stop.cancel();
    let _ = heartbeat.await;
    for slot in agents.slots() {
        slot.lifecycle.set(None, flotilla_protocol::AgentState::Terminated);
    }
    events_stop.cancel();
    let _ = lifecycle_events.await;
    grants_stop.cancel();
    let _ = grants_view.await;
    let _ = recall_view.await;
    let _ = recall_graphs.await;
    agents.deregister(&topology).await;
    let _ = health.await;
    tracing::info!(runner = %runner_id, "runner stopped");
    consumed
}

/// A runner starting under an id whose previous incarnation died holding assignments (killed,
/// then restarted by its supervisor under the same name): those deliveries are still pending on
/// the runner's consumer and would come back only after the ack wait. Nothing of this
/// incarnation has pulled yet, so whatever is pending is the dead one's: the consumer is removed
/// and made again, and the assignments stream (a work queue, which keeps every unacknowledged
/// assignment) delivers them at once. Each is claimed again through its record, fenced as any
/// claim, so nothing runs twice.
#[tracing::instrument(skip(stream))]
async fn take_back_assignments(stream: &async_nats::jetstream::stream::Stream<()>, consumer: &str) {
    let pending = match stream.consumer_info(consumer).await {
        Ok(info) => info.num_ack_pending,
        // No consumer yet (a first start), or it cannot be read: nothing to take back here.
        Err(_) => return,
    };
    if pending == 0 {
        return;
    }
    match stream.delete_consumer(consumer).await {
        Ok(_) => tracing::info!(pending, "a previous incarnation held assignments: taking them back"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot take back the previous incarnation's assignments; they return after the ack wait")
        }
    }
}
