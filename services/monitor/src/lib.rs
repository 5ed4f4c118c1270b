//! The monitor: follows the event stream (from its start: a restarted monitor loses nothing, and
//! every monitor shows the same) and the agent registry, folds them into the fleet's figures
//! ([`fold`]), and serves them as Prometheus text on `/metrics` ([`metrics`]), as JSON on
//! `/stats` and `<p>.monitor.stats` (`flotilla stats`), and in health replies.

pub mod alerts;
pub mod dashboard;
pub mod deadlock;
pub mod fold;
pub mod metrics;

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
use flotilla_protocol::{AgentRecord, LedgerOp, RunnerRecord, codec, time::now_ms};
use flotilla_service::{Fleet, Topology};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

use crate::fold::{Fold, KINDS};
use crate::metrics::{KindLabel, OpLabel, ServiceLabel, StatusLabel};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Monitor settings (`[monitor]`, `FLOTILLA_MONITOR__*`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Address of the HTTP endpoint (`/metrics`, `/healthz`); port 0 picks a free one.
    pub http_addr: SocketAddr,
    /// Length of the `monitor` lease: the monitor holding it publishes the alerts.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Alert thresholds.
    pub alerts: alerts::Thresholds,
    /// An operator's seed file (`flotilla auth add-operator`): approvals decided on the
    /// dashboard are signed with it, as that operator's (unset: the dashboard only shows them).
    pub operator_creds: Option<std::path::PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 9464)),
            lease: Duration::from_secs(3),
            alerts: alerts::Thresholds::default(),
            operator_creds: None,
        }
    }
}

/// The label of ledger entries on subjects that name no ledger change of this version (the
/// others are counted under their change's name, [`LedgerOp`]: the label set stays bounded).
const OTHER_LEDGER_OP: &str = "other";

/// What the monitor knows: the fold of the task events and the agent registry's gauges.
type Shared = Arc<Mutex<Fold>>;

/// The monitor, its HTTP listener bound (so that callers learn the port before it runs), ready to
/// run ([`flotilla_service::Service`]).
#[derive(Debug)]
pub struct Monitor {
    listener: TcpListener,
    config: Config,
}

impl Monitor {
    /// Binds the HTTP listener of `config`.
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("failed to bind {}", config.http_addr))?;
        Ok(Self { listener, config: config.clone() })
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
        serve(self.listener, self.config, fleet, topology, shutdown).await
    }
}

async fn serve(
    listener: TcpListener,
    config: Config,
    fleet: Fleet,
    topology: Topology,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let fold: Shared = Arc::new(Mutex::new(Fold::new()));
    let operator = match &config.operator_creds {
        Some(path) => Some(Arc::new(
            flotilla_service::auth::Credentials::load(path)
                .with_context(|| format!("failed to read the operator credential {}", path.display()))?,
        )),
        None => None,
    };
    let addr = listener.local_addr().context("listener has no address")?;
    let health = {
        let f = fold.clone();
        flotilla_service::health::serve(
            fleet.clone(),
            flotilla_protocol::names::service::MONITOR,
            Arc::new(move || {
                let Ok(f) = f.lock() else { return serde_json::json!({ "http_addr": addr.to_string() }) };
                let by_kind: serde_json::Map<String, serde_json::Value> = KINDS
                    .iter()
                    .map(|k| {
                        let n =
                            f.metrics.task_events.get_or_create(&KindLabel { kind: (*k).to_owned() }).get();
                        ((*k).to_owned(), n.into())
                    })
                    .collect();
                serde_json::json!({
                    "http_addr": addr.to_string(),
                    "task_events": by_kind,
                    "events_seen": f.events_seen,
                    "consumers": f.consumers,
                    "alerts_firing": f.alerts.firing(now_ms(), ""),
                })
            }),
            shutdown.clone(),
        )
        .await?
    };
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/stats", get(stats_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/", get(dashboard::index))
        .route("/assets/dashboard.js", get(dashboard::script))
        .route("/assets/dashboard.css", get(dashboard::style))
        .route("/api/overview", get(dashboard::overview))
        .route("/api/live", get(dashboard::live))
        .route("/api/task/{id}", get(dashboard::task))
        .route("/api/approvals", get(dashboard::approvals))
        .route("/api/approvals/{id}/{decision}", axum::routing::post(dashboard::decide))
        .with_state(Http {
            fold: fold.clone(),
            instance: fleet.instance.clone(),
            fleet: fleet.clone(),
            approvals: topology.approvals.clone(),
            operator,
        });
    let http_shutdown = shutdown.clone();
    let http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { http_shutdown.cancelled().await })
            .await
    });
    tracing::info!(%addr, "monitor serving /metrics");
    let f = fold.clone();
    let events = tokio::spawn(follow(
        fleet.clone(),
        fleet.names.events_stream(),
        Some(fleet.names.events_all()),
        shutdown.clone(),
        move |msg| count_event(&f, msg),
    ));
    let agents = tokio::spawn(follow_agents(
        topology.agents.clone(),
        topology.runners.clone(),
        fold.clone(),
        shutdown.clone(),
    ));
    // The budget-keeper creates the ledger stream; until it has, the follower retries.
    let f = fold.clone();
    let ledger = tokio::spawn(follow(
        fleet.clone(),
        fleet.names.ledger_stream(),
        None,
        shutdown.clone(),
        move |msg| count_ledger_entry(&f, msg),
    ));
    let stats = tokio::spawn(answer_stats(fleet.clone(), fold.clone(), shutdown.clone()));
    let f = fold.clone();
    let dead_letters = tokio::spawn(follow(
        fleet.clone(),
        fleet.names.deadletter_stream(),
        None,
        shutdown.clone(),
        move |msg| count_dead_letter(&f, msg),
    ));
    let leases = tokio::spawn(follow_leases(topology.leases.clone(), fold.clone(), shutdown.clone()));
    let consumers = tokio::spawn(sample_consumers(fleet.clone(), fold.clone(), shutdown.clone()));
    let raising = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let lease_role = flotilla_service::lease::Role {
        key: flotilla_protocol::names::lease_key::MONITOR,
        ttl: config.lease,
        status: Arc::new(flotilla_service::lease::LeaseStatus::default()),
    };
    let holding = {
        let raising = raising.clone();
        tokio::spawn(flotilla_service::lease::hold(
            fleet.clone(),
            topology.leases.clone(),
            lease_role,
            shutdown.clone(),
            move |lost: CancellationToken| {
                let raising = raising.clone();
                async move {
                    raising.store(true, std::sync::atomic::Ordering::SeqCst);
                    lost.cancelled().await;
                    raising.store(false, std::sync::atomic::Ordering::SeqCst);
                    Ok(())
                }
            },
        ))
    };
    let alerting = tokio::spawn(raise_alerts(
        fleet.clone(),
        fold.clone(),
        config.alerts.clone(),
        raising,
        shutdown.clone(),
    ));
    shutdown.cancelled().await;
    let _ = dead_letters.await;
    let _ = leases.await;
    let _ = consumers.await;
    let _ = holding.await;
    let _ = alerting.await;
    let _ = events.await;
    let _ = ledger.await;
    let _ = agents.await;
    let _ = stats.await;
    let _ = health.await;
    http.await.context("http task panicked")?.context("http server failed")?;
    Ok(())
}

/// What the HTTP handlers share.
#[derive(Clone)]
pub(crate) struct Http {
    fold: Shared,
    instance: String,
    fleet: Fleet,
    approvals: kv::Store,
    /// The operator credential the dashboard signs approval decisions with, if given.
    operator: Option<Arc<flotilla_service::auth::Credentials>>,
}

/// The figures of a [`flotilla_protocol::StatsRequest`] from this monitor's fold.
fn stats_of(
    fold: &Shared,
    instance: &str,
    req: &flotilla_protocol::StatsRequest,
) -> flotilla_protocol::StatsReport {
    let window = req.window_ms.unwrap_or(3_600_000);
    let by = req.by.as_deref().unwrap_or("all");
    let mut report = match fold.lock() {
        Ok(f) => f.stats(window, by, now_ms()),
        Err(_) => flotilla_protocol::StatsReport {
            error: Some(flotilla_protocol::ErrorInfo::new(
                "unavailable",
                "the monitor's figures are unreadable",
            )),
            ..Default::default()
        },
    };
    report.monitor = instance.to_owned();
    report
}

/// Answers `<p>.monitor.stats` (any monitor: they all fold the same streams) until `shutdown`.
async fn answer_stats(fleet: Fleet, fold: Shared, shutdown: CancellationToken) {
    let subject = fleet.names.monitor_stats();
    let mut requests = match fleet
        .client
        .queue_subscribe(subject.clone(), flotilla_protocol::names::queue_group::MONITOR.to_owned())
        .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(%subject, error = %e, "cannot answer stats requests");
            return;
        }
    };
    loop {
        let req = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = requests.next() => match r { Some(r) => r, None => return },
        };
        let span = tracing::info_span!("stats_request");
        let _enter = span.enter();
        let asked = if req.payload.is_empty() {
            Ok(flotilla_protocol::StatsRequest::default())
        } else {
            flotilla_service::nats::decode_request::<flotilla_protocol::StatsRequest>(
                req.headers.as_ref(),
                &req.payload,
            )
        };
        let report = match asked {
            Ok(r) => stats_of(&fold, &fleet.instance, &r),
            Err(e) => flotilla_protocol::StatsReport {
                error: Some(flotilla_protocol::ErrorInfo::new(e.reason.code(), e.message)),
                ..Default::default()
            },
        };
        drop(_enter);
        fleet.respond(&req, &report).await;
    }
}

/// `/stats?window=1h&by=tenant`: the figures as JSON.
#[tracing::instrument(skip_all)]
async fn stats_handler(State(h): State<Http>, uri: axum::http::Uri) -> axum::response::Response {
    let (mut window_ms, mut by) = (None, None);
    for pair in uri.query().unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "window" => match humantime::parse_duration(v) {
                Ok(d) => window_ms = Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                Err(e) => return (StatusCode::BAD_REQUEST, format!("window {v:?}: {e}\n")).into_response(),
            },
            "by" => by = Some(v.to_owned()),
            _ => return (StatusCode::BAD_REQUEST, format!("unknown parameter {k:?}\n")).into_response(),
        }
    }
    let report = stats_of(&h.fold, &h.instance, &flotilla_protocol::StatsRequest { window_ms, by });
    match serde_json::to_string(&report) {
        Ok(body) => (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[tracing::instrument(skip_all)]
async fn metrics_handler(State(h): State<Http>) -> impl IntoResponse {
    let text = match h.fold.lock() {
        Ok(f) => {
            f.refresh(now_ms());
            f.metrics.render()
        }
        Err(_) => String::new(),
    };
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
}

/// Follows `stream` (optionally only `filter`) with an ordered consumer from its start, passing each
/// message to `count`; after an error (the stream missing, the connection lost) it starts again
/// after the last message it counted, until `shutdown`.
async fn follow(
    fleet: Fleet,
    stream: String,
    filter: Option<String>,
    shutdown: CancellationToken,
    mut count: impl FnMut(&async_nats::jetstream::Message),
) {
    let mut last_seq = 0u64;
    loop {
        if let Err(e) =
            follow_once(&fleet, &stream, filter.as_deref(), &shutdown, &mut last_seq, &mut count).await
        {
            // Quiet until the stream has been read (the ledger exists only once a budget-keeper
            // has run).
            if last_seq > 0 {
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
    shutdown: &CancellationToken,
    last_seq: &mut u64,
    count: &mut impl FnMut(&async_nats::jetstream::Message),
) -> anyhow::Result<()> {
    let s = fleet.js.get_stream(stream).await.with_context(|| format!("failed to open stream {stream}"))?;
    let deliver_policy = match *last_seq {
        0 => DeliverPolicy::All,
        seq => DeliverPolicy::ByStartSequence { start_sequence: seq.saturating_add(1) },
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

/// The prefix of an event's subject (`<p>` of `<p>.events.…`).
fn f_prefix(msg: &async_nats::jetstream::Message) -> &str {
    msg.subject.as_str().split(".events.").next().unwrap_or_default()
}

/// Folds one event: a task's, an agent's or a direct message's (the stream is followed from the
/// beginning).
fn count_event(fold: &Shared, msg: &async_nats::jetstream::Message) {
    let ct = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(flotilla_protocol::headers::CONTENT_TYPE))
        .map(|v| v.as_str().to_owned());
    let (seq, pending) = msg.info().map(|i| (i.stream_sequence, i.pending)).unwrap_or_default();
    if pending == 0
        && let Ok(mut f) = fold.lock()
    {
        f.caught_up = true;
    }
    // Decoded before the fold is locked: the HTTP handlers share the lock.
    let events = format!("{}.events.", f_prefix(msg));
    let rest = msg.subject.as_str().strip_prefix(&events).unwrap_or_default();
    if rest.starts_with("agent.") {
        if let Ok(ev) = codec::decode::<flotilla_protocol::AgentEvent>(ct.as_deref(), &msg.payload)
            && let Ok(mut f) = fold.lock()
        {
            f.agent_event(&ev, seq);
        }
        return;
    }
    if rest.starts_with("message.") {
        if let Ok(ev) = codec::decode::<flotilla_protocol::MessageEvent>(ct.as_deref(), &msg.payload)
            && let Ok(mut f) = fold.lock()
        {
            f.message_event(&ev, seq);
            f.views.message_event(&ev);
        }
        return;
    }
    if rest.starts_with("wait.") {
        if let Ok(ev) = codec::decode::<flotilla_protocol::WaitEvent>(ct.as_deref(), &msg.payload)
            && let Ok(mut f) = fold.lock()
        {
            f.events_seen = f.events_seen.max(seq);
            f.graph.wait_event(&ev);
            f.wait_event(&ev);
            f.views.wait_event(&ev);
        }
        return;
    }
    if rest.starts_with("alert.") {
        if let Ok(ev) = codec::decode::<flotilla_protocol::AlertEvent>(ct.as_deref(), &msg.payload)
            && let Ok(mut f) = fold.lock()
        {
            f.alert_event(&ev, seq);
        }
        return;
    }
    if !rest.starts_with("task.") {
        return;
    }
    let decoded = codec::decode::<flotilla_protocol::TaskEvent>(ct.as_deref(), &msg.payload);
    let trace_id = dashboard::trace_id_of(msg.headers.as_ref());
    let Ok(mut f) = fold.lock() else { return };
    match decoded {
        Ok(ev) => {
            f.task_event(&ev, seq);
            f.views.task_event(&ev, seq, trace_id);
        }
        // Unreadable: counted by the kind its subject names, so nothing is silently dropped.
        Err(_) => {
            let kind = msg.subject.rsplit('.').next().unwrap_or_default();
            let kind = if KINDS.contains(&kind) { kind } else { fold::OTHER };
            f.metrics.task_events.get_or_create(&KindLabel { kind: kind.to_owned() }).inc();
        }
    }
}

/// Counts one budget ledger entry by operation, from the subject alone (the ledger is followed
/// from its start, like the events).
fn count_ledger_entry(fold: &Shared, msg: &async_nats::jetstream::Message) {
    let op = msg.subject.rsplit('.').next().unwrap_or_default();
    let op = op.parse::<LedgerOp>().map_or(OTHER_LEDGER_OP, LedgerOp::as_str);
    let ct = flotilla_service::nats::content_type(msg.headers.as_ref());
    let entry = codec::decode::<serde_json::Value>(ct, &msg.payload).ok();
    let seq = msg.info().map(|i| i.stream_sequence).unwrap_or_default();
    let Ok(mut f) = fold.lock() else { return };
    if let Some(entry) = &entry {
        f.views.ledger_entry(entry, seq);
    }
    f.metrics.ledger.get_or_create(&OpLabel { op: op.to_owned() }).inc();
    if matches!(op, "exhausted" | "refilled")
        && let Ok(e) = codec::decode::<flotilla_protocol::LedgerEntry>(None, &msg.payload)
    {
        match e.change {
            flotilla_protocol::LedgerChange::Exhausted(ev) => {
                f.inputs.exhausted.insert(ev.scope, e.at_ms);
            }
            flotilla_protocol::LedgerChange::Refilled(ev) => {
                f.inputs.exhausted.remove(&ev.scope);
            }
            _ => {}
        }
    }
}

/// Counts one dead letter, with when the server stored it (the stream is followed from its
/// start: old dead letters count, but only recent ones make an alert).
fn count_dead_letter(fold: &Shared, msg: &async_nats::jetstream::Message) {
    let at = msg
        .info()
        .ok()
        .map(|i| u64::try_from(i.published.unix_timestamp_nanos() / 1_000_000).unwrap_or_default());
    if let Ok(mut f) = fold.lock() {
        f.inputs.dead_letters += 1;
        f.inputs.last_dead_letter_ms = f.inputs.last_dead_letter_ms.max(at);
        f.metrics.dead_letters.inc();
    }
}

/// Most durable consumers sampled (one per runner and class, so a bound keeps the label set finite).
const MAX_CONSUMERS: usize = 512;

/// Every 5 s: the pending, ack-pending and redelivered counts of every durable consumer of the
/// streams that have them (the fleet's work queues), for `/metrics`, health and the
/// `consumer_lag` rule.
async fn sample_consumers(fleet: Fleet, fold: Shared, shutdown: CancellationToken) {
    let streams = [
        fleet.names.submissions_stream(),
        fleet.names.assignments_stream(),
        fleet.names.messages_stream(),
        fleet.names.topics_stream(),
    ];
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut seen = Vec::new();
        for name in &streams {
            let Ok(stream) = fleet.js.get_stream_no_info(name).await else { continue };
            let mut list = stream.consumers();
            while let Some(Ok(info)) = list.next().await {
                if info.config.durable_name.is_some() && seen.len() < MAX_CONSUMERS {
                    seen.push(info);
                }
            }
        }
        let Ok(mut f) = fold.lock() else { return };
        let mut pending = std::collections::BTreeMap::new();
        for info in &seen {
            let key = format!("{}/{}", info.stream_name, info.name);
            let mut samples = f.inputs.pending.remove(&key).unwrap_or_default();
            samples.push(info.num_pending);
            if samples.len() > 4 {
                samples.remove(0);
            }
            pending.insert(key, samples);
            let labels =
                metrics::ConsumerLabels { stream: info.stream_name.clone(), consumer: info.name.clone() };
            f.metrics
                .consumer_pending
                .get_or_create(&labels)
                .set(i64::try_from(info.num_pending).unwrap_or(i64::MAX));
            f.metrics
                .consumer_ack_pending
                .get_or_create(&labels)
                .set(i64::try_from(info.num_ack_pending).unwrap_or(i64::MAX));
            f.metrics
                .consumer_redelivered
                .get_or_create(&labels)
                .set(i64::try_from(info.num_redelivered).unwrap_or(i64::MAX));
        }
        // Consumers gone since are dropped.
        f.inputs.pending = pending;
        f.consumers = seen
            .iter()
            .map(|i| {
                serde_json::json!({
                    "stream": i.stream_name, "consumer": i.name, "pending": i.num_pending,
                    "ack_pending": i.num_ack_pending, "redelivered": i.num_redelivered,
                })
            })
            .collect();
    }
}

/// Keeps the last seen lease of every key (the active dispatcher's, budget-keeper's, monitor's).
async fn follow_leases(store: kv::Store, fold: Shared, shutdown: CancellationToken) {
    let f = fold.clone();
    flotilla_service::follow::follow(store, "leases", shutdown, move |key, value| {
        let Ok(mut fold) = f.lock() else { return };
        match value.map(|v| codec::decode::<flotilla_protocol::Lease>(None, v)) {
            Some(Ok(lease)) => {
                let label = ServiceLabel { service: key.to_owned() };
                fold.metrics
                    .leader_epoch
                    .get_or_create(&label)
                    .set(i64::try_from(lease.epoch).unwrap_or(i64::MAX));
                // Epoch 1 is the first holder; every later epoch a change, counted once however
                // late this monitor started.
                let before = fold.inputs.leases.get(key).map_or(1, |l| l.epoch.max(1));
                if lease.epoch > before {
                    fold.metrics.leader_changes.get_or_create(&label).inc_by(lease.epoch - before);
                }
                fold.inputs.leases.insert(key.to_owned(), lease);
            }
            // Released (or unreadable): no holder from now on.
            _ => {
                let now = now_ms();
                if let Some(l) = fold.inputs.leases.get_mut(key) {
                    l.ttl_ms = now.saturating_sub(l.renewed_at_ms).min(l.ttl_ms);
                }
            }
        }
    })
    .await;
}

/// Every second: evaluates the alert rules; while this monitor holds the `monitor` lease,
/// publishes what started or stopped (and, on taking the lease, what fires), each event with a
/// message id so that a hand-over between monitors does not repeat one.
async fn raise_alerts(
    fleet: Fleet,
    fold: Shared,
    thresholds: alerts::Thresholds,
    raising: Arc<std::sync::atomic::AtomicBool>,
    shutdown: CancellationToken,
) {
    // Four times a second, so a deadlock is raised well within a second of forming.
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_raising = false;
    let mut last_resend = now_ms();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = now_ms();
        let raising_now = raising.load(std::sync::atomic::Ordering::SeqCst);
        let resend = now.saturating_sub(last_resend) >= DEADLOCK_RESEND_MS;
        if resend {
            last_resend = now;
        }
        let out = {
            let Ok(mut f) = fold.lock() else { return };
            let fold = &mut *f;
            // Only once the events are read to their end: a graph half-way through the history
            // holds deadlocks that were broken since.
            if fold.caught_up {
                fold.inputs.deadlocks = fold.graph.find(now);
            }
            for (on, n) in fold.graph.open_waits_all() {
                fold.metrics.waits_open.get_or_create(&KindLabel { kind: on }).set(n);
            }
            let mut changes = fold.alerts.evaluate(&fold.inputs, &thresholds, now, &fleet.instance);
            for (kind, n) in fold.alerts.counts_all() {
                fold.metrics.alerts_firing.get_or_create(&KindLabel { kind: kind.to_owned() }).set(n);
            }
            if raising_now && !was_raising {
                fold.alerts.firing(now, &fleet.instance)
            } else {
                // A deadlock still there: its alert again (stored once, by its id), so that a
                // dispatcher that missed it (changing hands) still breaks it.
                if resend {
                    let again: Vec<_> = fold
                        .alerts
                        .firing(now, &fleet.instance)
                        .into_iter()
                        .filter(|a| {
                            a.kind == flotilla_protocol::alert_kind::DEADLOCK
                                && now.saturating_sub(a.since_ms) < DEADLOCK_RESEND_FOR_MS
                                && !changes_has(&changes, a)
                        })
                        .collect();
                    changes.extend(again);
                }
                changes
            }
        };
        was_raising = raising_now;
        if !raising_now {
            continue;
        }
        for ev in out {
            let span = tracing::info_span!("alert", kind = %ev.kind, key = %ev.key, state = %ev.state);
            let _enter = span.enter();
            tracing::warn!(message = %ev.message, "alert {}", ev.state);
            let id = format!("alert:{}:{}:{}:{}", ev.kind, ev.key, ev.state, ev.since_ms);
            drop(_enter);
            if let Err(e) =
                fleet.publish_durable(fleet.names.alert_event_subject(&ev.kind), &ev, Some(&id)).await
            {
                tracing::warn!(error = %e, "failed to publish an alert");
            }
        }
    }
}

/// How often a firing deadlock alert is published again, and for how long after it formed
/// (inside the stream's de-duplication window, so it is stored once).
const DEADLOCK_RESEND_MS: u64 = 5_000;
const DEADLOCK_RESEND_FOR_MS: u64 = 60_000;

fn changes_has(changes: &[flotilla_protocol::AlertEvent], a: &flotilla_protocol::AlertEvent) -> bool {
    changes.iter().any(|c| c.kind == a.kind && c.key == a.key)
}

/// Keeps the agent gauges current from watches of the registry: the agents' records and their
/// runners' heartbeats (an agent is alive while its runner beats).
async fn follow_agents(
    agents_store: kv::Store,
    runners_store: kv::Store,
    fold: Shared,
    shutdown: CancellationToken,
) {
    let mut agents: Registry = Default::default();
    let mut runners: Runners = Default::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let watches = futures::future::try_join(
            agents_store.watch_with_history(">"),
            runners_store.watch_with_history(">"),
        );
        let (mut watch, mut beats) = match watches.await {
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
                            if let Ok(mut f) = fold.lock() {
                                f.graph.agent(&rec);
                                if let Some(r) = runners.get(&rec.runner_id) {
                                    f.graph.runner(r);
                                }
                            }
                            agents.insert(e.key, rec);
                        }
                    }
                    Some(Ok(e)) => {
                        if let Some(rec) = agents.remove(&e.key)
                            && let Ok(mut f) = fold.lock()
                        {
                            f.graph.agent_gone(&rec.agent_id);
                        }
                    }
                    Some(Err(_)) | None => break,
                },
                entry = beats.next() => match entry {
                    Some(Ok(e)) if e.operation == kv::Operation::Put => {
                        if let Ok(rec) = codec::decode::<RunnerRecord>(None, &e.value) {
                            if let Ok(mut f) = fold.lock() {
                                f.graph.runner(&rec);
                            }
                            runners.insert(e.key, rec);
                        }
                    }
                    Some(Ok(e)) => {
                        runners.remove(&e.key);
                    }
                    Some(Err(_)) | None => break,
                },
                _ = tick.tick() => set_agent_gauges(&fold, &agents, &runners),
            }
        }
    }
}

type Registry = std::collections::HashMap<String, AgentRecord>;
type Runners = std::collections::HashMap<String, RunnerRecord>;

/// What the `agent_error` alert says of an agent in ERROR or in a crash loop.
fn error_text(r: &AgentRecord, now: u64) -> String {
    let looped = match r.recoveries {
        0 => String::new(),
        n => format!(", back from it {n} time{} in this crash loop", if n == 1 { "" } else { "s" }),
    };
    match (r.status, r.error_until_ms) {
        (flotilla_protocol::AgentStatus::Error, Some(until)) => format!(
            "agent {} is in ERROR{looped}; it takes work again in {} s",
            r.agent_id,
            until.saturating_sub(now).div_ceil(1000)
        ),
        (flotilla_protocol::AgentStatus::Error, None) if r.recoveries > 0 => {
            format!("agent {} is in ERROR{looped}; it stays there until its runner restarts", r.agent_id)
        }
        (flotilla_protocol::AgentStatus::Error, None) => format!("agent {} is in ERROR", r.agent_id),
        _ => format!(
            "agent {} is crash-looping{looped}: on trial until a task of it ends without a crash",
            r.agent_id
        ),
    }
}

fn set_agent_gauges(fold: &Shared, agents: &Registry, runners: &Runners) {
    let Ok(mut f) = fold.lock() else { return };
    let now = now_ms();
    let alive = |r: &AgentRecord| r.alive_at(runners.get(&r.runner_id), now);
    let mut rows: Vec<serde_json::Value> = agents
        .values()
        .map(|r| {
            let age = r.age_ms(runners.get(&r.runner_id), now);
            let dead = !alive(r);
            serde_json::json!({
                "agent_id": r.agent_id, "runner_id": r.runner_id, "template": r.name,
                "tenant": r.tenant, "capabilities": r.capabilities, "model": r.model,
                "status": if dead { serde_json::json!("dead") } else { serde_json::json!(r.status) },
                "state": r.state, "in_flight": r.in_flight, "concurrency": r.concurrency,
                "heartbeat_age_ms": age,
            })
        })
        .collect();
    rows.sort_by(|a, b| {
        a.get("agent_id").map(ToString::to_string).cmp(&b.get("agent_id").map(ToString::to_string))
    });
    f.views.agents = rows;
    // An agent back from ERROR stays alerted until a task of it ends without a crash.
    f.inputs.agents_in_error = agents
        .iter()
        .filter(|(_, r)| (r.status == flotilla_protocol::AgentStatus::Error || r.recoveries > 0) && alive(r))
        .map(|(k, r)| (k.clone(), error_text(r, now)))
        .collect();
    let metrics = &f.metrics;
    let mut counts: std::collections::HashMap<&'static str, i64> = Default::default();
    for rec in agents.values() {
        let stale = !alive(rec);
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
