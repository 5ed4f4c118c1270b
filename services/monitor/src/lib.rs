//! The monitor: follows the event stream and the agent registry, and serves what it sees as
//! Prometheus text on `/metrics` (plus `/healthz`) and in health replies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::kv;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use flotilla_protocol::{AgentRecord, LedgerOp, codec, time::now_ms};
use flotilla_service::{Fleet, Topology};
use futures::StreamExt as _;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Monitor settings (`[monitor]`, `FLOTILLA_MONITOR__*`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Address of the HTTP endpoint (`/metrics`, `/healthz`); port 0 picks a free one.
    pub http_addr: SocketAddr,
}

impl Default for Config {
    fn default() -> Self {
        Self { http_addr: SocketAddr::from(([127, 0, 0, 1], 9464)) }
    }
}

/// Task event kinds counted under their own label.
const KINDS: [&str; 8] =
    ["accepted", "rejected", "assigned", "started", "progress", "completed", "failed", "requeued"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: String,
}

/// The label of ledger entries on subjects that name no ledger change of this version (the
/// others are counted under their change's name, [`LedgerOp`]: the label set stays bounded).
const OTHER_LEDGER_OP: &str = "other";

/// Most distinct model labels (models come from fleet files, but a bound keeps a bad publisher
/// from growing the label set).
const MAX_MODELS: usize = 64;

#[derive(Debug)]
struct Metrics {
    registry: Registry,
    task_events: Family<KindLabel, Counter>,
    agents: Family<StatusLabel, Gauge>,
    tokens: Counter,
    cost: Family<ModelLabel, Counter<f64, std::sync::atomic::AtomicU64>>,
    /// Models with a cost label so far (bounded by [`MAX_MODELS`]).
    models: std::sync::Mutex<std::collections::HashSet<String>>,
    ledger: Family<OpLabel, Counter>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let task_events = Family::<KindLabel, Counter>::default();
        let agents = Family::<StatusLabel, Gauge>::default();
        let tokens = Counter::default();
        registry.register("flotilla_task_events", "Task lifecycle events seen, by kind", task_events.clone());
        registry.register(
            "flotilla_agents",
            "Registered agents by status (dead: no recent heartbeat)",
            agents.clone(),
        );
        registry.register("flotilla_tokens", "Tokens used by completed tasks", tokens.clone());
        let cost = Family::<ModelLabel, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "flotilla_cost_usd",
            "What the model calls of finished tasks cost in US dollars, by model (the budget-keeper's prices)",
            cost.clone(),
        );
        let ledger = Family::<OpLabel, Counter>::default();
        registry.register(
            "flotilla_budget_ledger_entries",
            "Budget ledger entries since the monitor started, by operation or budget event",
            ledger.clone(),
        );
        Self { registry, task_events, agents, tokens, cost, models: Default::default(), ledger }
    }

    fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "failed to render metrics");
        }
        out
    }
}

/// The monitor, its HTTP listener bound (so that callers learn the port before it runs), ready to
/// run ([`flotilla_service::Service`]).
#[derive(Debug)]
pub struct Monitor {
    listener: TcpListener,
}

impl Monitor {
    /// Binds the HTTP listener of `config`.
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("failed to bind {}", config.http_addr))?;
        Ok(Self { listener })
    }

    /// Where `/metrics` is served.
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.listener.local_addr().context("listener has no address")
    }
}

impl flotilla_service::Service for Monitor {
    const NAME: &'static str = flotilla_protocol::names::service::MONITOR;

    /// Serves `/metrics` and health until `shutdown`.
    async fn run(self, fleet: Fleet, topology: Topology, shutdown: CancellationToken) -> anyhow::Result<()> {
        serve(self.listener, fleet, topology, shutdown).await
    }
}

async fn serve(
    listener: TcpListener,
    fleet: Fleet,
    topology: Topology,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let addr = listener.local_addr().context("listener has no address")?;
    let health = {
        let m = metrics.clone();
        flotilla_service::health::serve(
            fleet.clone(),
            flotilla_protocol::names::service::MONITOR,
            Arc::new(move || {
                let by_kind: serde_json::Map<String, serde_json::Value> = KINDS
                    .iter()
                    .map(|k| {
                        (
                            (*k).to_owned(),
                            m.task_events.get_or_create(&KindLabel { kind: (*k).to_owned() }).get().into(),
                        )
                    })
                    .collect();
                serde_json::json!({ "http_addr": addr.to_string(), "task_events": by_kind })
            }),
            shutdown.clone(),
        )
        .await?
    };
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(metrics.clone());
    let http_shutdown = shutdown.clone();
    let http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { http_shutdown.cancelled().await })
            .await
    });
    tracing::info!(%addr, "monitor serving /metrics");
    let m = metrics.clone();
    let events = tokio::spawn(follow(
        fleet.clone(),
        fleet.names.events_stream(),
        Some(fleet.names.task_events_all()),
        From::Start,
        shutdown.clone(),
        move |msg| count_event(&m, msg),
    ));
    let agents = tokio::spawn(follow_agents(topology.agents.clone(), metrics.clone(), shutdown.clone()));
    // The budget-keeper creates the ledger stream; until it has, the follower retries.
    let m = metrics.clone();
    let ledger = tokio::spawn(follow(
        fleet.clone(),
        fleet.names.ledger_stream(),
        None,
        From::Now,
        shutdown.clone(),
        move |msg| count_ledger_entry(&m, msg),
    ));
    shutdown.cancelled().await;
    let _ = events.await;
    let _ = ledger.await;
    let _ = agents.await;
    let _ = health.await;
    http.await.context("http task panicked")?.context("http server failed")?;
    Ok(())
}

#[tracing::instrument(skip_all)]
async fn metrics_handler(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], m.render())
}

/// Where a follower starts: the stream's first message, or what arrives from now on.
#[derive(Debug, Clone, Copy)]
enum From {
    Start,
    Now,
}

/// Follows `stream` (optionally only `filter`) with an ordered consumer from `from`, passing each
/// message to `count`; after an error (the stream missing, the connection lost) it starts again
/// after the last message it counted, until `shutdown`.
async fn follow(
    fleet: Fleet,
    stream: String,
    filter: Option<String>,
    from: From,
    shutdown: CancellationToken,
    mut count: impl FnMut(&async_nats::jetstream::Message),
) {
    let mut last_seq = 0u64;
    loop {
        if let Err(e) =
            follow_once(&fleet, &stream, filter.as_deref(), from, &shutdown, &mut last_seq, &mut count).await
        {
            // Quiet until the stream has been read (the ledger exists only once a budget-keeper
            // has run).
            if last_seq > 0 || matches!(from, From::Start) {
                tracing::warn!(%stream, error = %e, "stream follower stopped; restarting");
            } else {
                tracing::debug!(%stream, error = %e, "stream follower stopped; restarting");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn follow_once(
    fleet: &Fleet,
    stream: &str,
    filter: Option<&str>,
    from: From,
    shutdown: &CancellationToken,
    last_seq: &mut u64,
    count: &mut impl FnMut(&async_nats::jetstream::Message),
) -> anyhow::Result<()> {
    let s = fleet.js.get_stream(stream).await.with_context(|| format!("failed to open stream {stream}"))?;
    let deliver_policy = match (*last_seq, from) {
        (0, From::Start) => DeliverPolicy::All,
        (0, From::Now) => DeliverPolicy::New,
        (seq, _) => DeliverPolicy::ByStartSequence { start_sequence: seq.saturating_add(1) },
    };
    let consumer = s
        .create_consumer(pull::OrderedConfig {
            name: Some(flotilla_service::nats::ordered_name()),
            filter_subject: filter.unwrap_or_default().to_owned(),
            deliver_policy,
            ..Default::default()
        })
        .await
        .with_context(|| format!("failed to create a consumer on {stream}"))?;
    let mut messages = consumer.messages().await.with_context(|| format!("failed to follow {stream}"))?;
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = messages.next() => match m {
                Some(m) => m.with_context(|| format!("error on stream {stream}"))?,
                None => return Ok(()),
            },
        };
        if let Ok(info) = msg.info() {
            *last_seq = info.stream_sequence;
        }
        count(&msg);
    }
}

/// Counts one task event (the stream is followed from the beginning).
fn count_event(metrics: &Metrics, msg: &async_nats::jetstream::Message) {
    // Subject: <prefix>.events.task.<tenant>.<id>.<kind>; unknown kinds share one label, so that no
    // publisher can grow the label set without bound.
    let kind = msg.subject.rsplit('.').next().unwrap_or_default();
    let kind = if KINDS.contains(&kind) { kind } else { "other" };
    metrics.task_events.get_or_create(&KindLabel { kind: kind.to_owned() }).inc();
    if kind == "completed" || kind == "failed" {
        let ct = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(flotilla_protocol::headers::CONTENT_TYPE))
            .map(|v| v.as_str().to_owned());
        if let Ok(ev) = codec::decode::<flotilla_protocol::TaskEvent>(ct.as_deref(), &msg.payload) {
            if kind == "completed"
                && let Some(u) = ev.usage
            {
                metrics.tokens.inc_by(u.total_tokens);
            }
            count_cost(metrics, &ev.calls);
        }
    }
}

/// Counts one budget ledger entry by operation, from the subject alone. The ledger is followed
/// from when the monitor started (it only grows; a counter restarting at zero is what Prometheus
/// expects of a restarted process).
fn count_ledger_entry(metrics: &Metrics, msg: &async_nats::jetstream::Message) {
    let op = msg.subject.rsplit('.').next().unwrap_or_default();
    let op = op.parse::<LedgerOp>().map_or(OTHER_LEDGER_OP, LedgerOp::as_str);
    metrics.ledger.get_or_create(&OpLabel { op: op.to_owned() }).inc();
}

/// Keeps the agent gauges current from a watch of the registry.
fn count_cost(metrics: &Metrics, calls: &[flotilla_protocol::CallUsage]) {
    for c in calls {
        let Some(cost) = c.cost_usd.filter(|c| c.is_finite() && *c > 0.0) else { continue };
        let model = match metrics.models.lock() {
            Ok(mut seen) if seen.contains(&c.model) || seen.len() < MAX_MODELS => {
                seen.insert(c.model.clone());
                c.model.clone()
            }
            _ => "other".to_owned(),
        };
        metrics.cost.get_or_create(&ModelLabel { model }).inc_by(cost);
    }
}

async fn follow_agents(store: kv::Store, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let mut agents: std::collections::HashMap<String, AgentRecord> = Default::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let mut watch = match store.watch_with_history(">").await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "failed to watch the agent registry; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                entry = watch.next() => match entry {
                    Some(Ok(e)) if e.operation == kv::Operation::Put => {
                        if let Ok(rec) = codec::decode::<AgentRecord>(None, &e.value) {
                            agents.insert(e.key, rec);
                        }
                    }
                    Some(Ok(e)) => {
                        agents.remove(&e.key);
                    }
                    Some(Err(_)) | None => break,
                },
                _ = tick.tick() => set_agent_gauges(&metrics, &agents),
            }
        }
    }
}

fn set_agent_gauges(metrics: &Metrics, agents: &std::collections::HashMap<String, AgentRecord>) {
    let mut counts: std::collections::HashMap<&'static str, i64> = Default::default();
    let now = now_ms();
    for rec in agents.values() {
        let stale =
            now.saturating_sub(rec.heartbeat_at_ms) > rec.heartbeat_interval_ms.saturating_mul(3) + 500;
        let status = match (stale, rec.status) {
            (true, _) => "dead",
            (false, flotilla_protocol::AgentStatus::Idle) => "idle",
            (false, flotilla_protocol::AgentStatus::Busy) => "busy",
            (false, flotilla_protocol::AgentStatus::Draining) => "draining",
            (false, flotilla_protocol::AgentStatus::Error) => "error",
        };
        *counts.entry(status).or_default() += 1;
    }
    for status in ["idle", "busy", "draining", "error", "dead"] {
        metrics
            .agents
            .get_or_create(&StatusLabel { status: status.to_owned() })
            .set(counts.get(status).copied().unwrap_or(0));
    }
}
