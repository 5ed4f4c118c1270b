//! `flotilla-bench dispatcher`: the dispatcher's throughput, latency, decision time and memory,
//! next to raw JetStream on the same server in the same run. (a) raw baselines (see [`crate::raw`]);
//! (b) submit → `completed` throughput of the dispatcher (in this process) and two runners with
//! the zero-latency offline model; (c) submit → `started` / `completed` latency at half the
//! throughput of (b); (d) the scheduling core alone (see [`crate::scheduler`]). It also prints the
//! JetStream round trips on a task's path and where the dispatcher's time goes. With `--budgets`
//! a budget-keeper runs in this process too and the runners enforce budgets, so (b) and (c)
//! measure the path with every model call reserved and committed, and count the ledger entries
//! per task.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::context::PublishAckFuture;
use bytes::Bytes;
use flotilla_local::{FleetFile, LocalFleet, ServerConfig, ServiceHandle};
use flotilla_protocol::names::event_kind;
use flotilla_protocol::validate::{Limits, validate};
use flotilla_protocol::{TaskSubmission, WireFormat, codec, headers};
use flotilla_service::local_server::LocalServer;
use flotilla_service::{Fleet, Mode, Topology};
use futures::StreamExt as _;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::figures::{goal, percentile, progress, round, thousands};
use crate::raw::Window;
use crate::{Cli, Usage, profile, raw, scheduler};

/// Sizes of one run.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub tasks: usize,
    pub agents: u32,
    pub queued: usize,
    /// Rounds of (e), the cost of tracing (0: skipped).
    pub tracing_rounds: usize,
    /// The bench template records transcripts (its default).
    pub transcripts: bool,
}

/// The project's goals for the dispatcher.
const GOAL_VS_PIPELINE: f64 = 0.35;
const GOAL_P50_MS: f64 = 2.0;
const GOAL_P99_MS: f64 = 10.0;
const GOAL_DECISION_P99_US: f64 = 100.0;
const GOAL_BYTES_PER_TASK: f64 = 1024.0;
/// Tracing (spans exported) may add at most this share to the submit → completed p50.
const GOAL_TRACING_P50_RATIO: f64 = 1.02;

/// Publishes in flight when submitting (and in the raw publish test).
const WINDOW: usize = 256;
/// Items the raw pipeline works on at once: the dispatcher's default intake concurrency.
const PIPELINE_IN_FLIGHT: usize = 64;
/// Messages the raw pipeline stores per item: on A, the KV update, on B.
const RAW_STORED_PER_ITEM: u32 = 3;
/// The bench fleet: two runners, each with this many agents of this concurrency.
const RUNNERS: [&str; 2] = ["bench-r1", "bench-r2"];
const AGENTS_PER_RUNNER: u32 = 4;
const AGENT_CONCURRENCY: u32 = 8;
const CAPABILITY: &str = "bench";
/// With `--budgets`: each task's token cap (`max_tokens_per_task`), so that every task has a
/// budget of its own (`task.<id>`, reserved in with the agent's, tenant's and model's scopes, and
/// closed when the task ends). No run comes near it.
const TASK_CAP_TOKENS: u64 = 1_000_000;
const TEXT: &str = "Summarise the attached release notes in two sentences.";

/// JetStream round trips (a request and its awaited reply, or a publish and its awaited ack) on
/// a task's path from submission to `completed`, one model step, no tools; from the code. Writes
/// sent together on one connection and then awaited together count once.
const ROUND_TRIPS: [(&str, &str); 6] = [
    ("client", "submission publish, stream ack"),
    ("intake", "`accepted` event (first on its subject) and KV create of the record, sent together"),
    ("scheduler", "`assigned` event and the assignment (the queued record and its revision), sent together"),
    ("runner", "KV update, revision-checked from the assignment's revision: running (the claim)"),
    ("runner", "KV update, revision-checked: completed"),
    ("runner", "`completed` event publish, ack"),
];
/// One-way deliveries on the same path (no reply awaited).
const HOPS: &str = "plus four one-way deliveries: submission to intake (pull consumer), task record to \
the scheduler (KV watch), assignment to the runner (pull consumer), `completed` to the client";
const OFF_PATH: &str = "off the critical path: the `started` event (sent after the claim, its ack \
awaited only before the outcome is written, while the model runs); the capability check (cached \
after a capability's first task); the acks of the submission and of the assignment (no reply \
awaited); two agent lifecycle events per task (planning, idle), up to 128 in flight per runner, \
and registry rewrites of the runner's agents at most every 100 ms after them (KV puts the \
dispatcher's agent watch then applies); and three KV watch deliveries of the task record to the dispatcher (created, \
running, completed), each waking its scheduler loop. A one-step answer has no `progress` \
event: `completed` carries its text and usage";

/// When the bench's event reader saw each event of a task.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    started: Option<Instant>,
    completed: Option<Instant>,
    failed: Option<Instant>,
}

/// What one submission phase observed.
struct Phase {
    wall: Duration,
    submitted: HashMap<String, Instant>,
    /// Wall-clock milliseconds of each submission, to compare with the task records' times.
    submitted_ms: HashMap<String, u64>,
    seen: HashMap<String, Seen>,
}

impl Phase {
    /// From the task records (millisecond clocks of the services): submit → started and
    /// submit → finished of up to `sample` tasks, sorted. A cross-check of what the event reader
    /// saw.
    async fn recorded(
        &self,
        fleet: &Fleet,
        tasks: &async_nats::jetstream::kv::Store,
        sample: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let (mut started, mut finished) = (Vec::new(), Vec::new());
        for (id, at) in self.submitted_ms.iter().take(sample) {
            if let Ok(Some((rec, _))) = fleet.kv_get::<flotilla_protocol::TaskRecord>(tasks, id).await {
                if let Some(s) = rec.started_at_ms {
                    started.push(s.saturating_sub(*at) as f64);
                }
                if let Some(f) = rec.finished_at_ms {
                    finished.push(f.saturating_sub(*at) as f64);
                }
            }
        }
        started.sort_by(f64::total_cmp);
        finished.sort_by(f64::total_cmp);
        (started, finished)
    }

    /// Submit → completed rate: tasks over the time from the first submission to the last
    /// `completed`.
    fn throughput(&self) -> f64 {
        self.submitted.len() as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    /// Milliseconds between two points of each task, sorted.
    fn spans(
        &self,
        from: impl Fn(&str, &Seen) -> Option<Instant>,
        to: impl Fn(&Seen) -> Option<Instant>,
    ) -> Vec<f64> {
        let mut v: Vec<f64> = self
            .seen
            .iter()
            .filter_map(|(id, s)| Some(to(s)?.saturating_duration_since(from(id, s)?).as_secs_f64() * 1000.0))
            .collect();
        v.sort_by(f64::total_cmp);
        v
    }
}

struct Bench {
    fleet: Fleet,
    submit_subject: String,
    events_prefix: String,
}

/// A short tag unique to one run, to tell its task ids from earlier runs' on the same server.
fn run_tag() -> String {
    let run = uuid::Uuid::now_v7().simple().to_string();
    run.get(run.len().saturating_sub(8)..).unwrap_or("run").to_owned()
}

impl Bench {
    fn new(fleet: &Fleet) -> Self {
        Self {
            fleet: fleet.clone(),
            submit_subject: fleet.names.submit_subject(),
            events_prefix: format!("{}.events.task.", fleet.names.prefix().as_str()),
        }
    }

    fn payload(id: &str) -> anyhow::Result<Bytes> {
        let sub = TaskSubmission {
            id: Some(id.to_owned()),
            capability: CAPABILITY.to_owned(),
            input: json!({ "text": TEXT }),
            ..Default::default()
        };
        Ok(Bytes::from(codec::encode(WireFormat::Msgpack, &sub).context("failed to encode a submission")?))
    }

    /// Sends a submission as any client would (MessagePack, `Nats-Msg-Id` = task id).
    async fn submit(&self, id: &str, payload: Bytes) -> anyhow::Result<PublishAckFuture> {
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::CONTENT_TYPE, WireFormat::Msgpack.content_type());
        h.insert(headers::NATS_MSG_ID, id);
        self.fleet
            .js
            .publish_with_headers(self.submit_subject.clone(), h, payload)
            .await
            .context("failed to submit")
    }

    /// An ordered consumer on the lifecycle events the bench times (subjects only): the ends of
    /// tasks, and with `started` also their starts. Only what is timed is delivered, as a client
    /// waiting for its results would ask for it.
    async fn follow(&self, started: bool) -> anyhow::Result<pull::Ordered> {
        let mut kinds = vec![event_kind::COMPLETED, event_kind::FAILED, event_kind::REJECTED];
        if started {
            kinds.push(event_kind::STARTED);
        }
        let names = &self.fleet.names;
        crate::events::follow(&self.fleet, kinds.iter().map(|k| names.task_events_kind(k)).collect(), true)
            .await
    }

    /// Submits `n` tasks with ids `<tag><i>`, as fast as the window allows or paced at `rate`
    /// per second, and waits until every one has ended.
    async fn phase(&self, tag: &str, n: usize, rate: Option<f64>) -> anyhow::Result<Phase> {
        // Starts are timed at half load only.
        let events = self.follow(rate.is_some()).await?;
        let reader = tokio::spawn(collect(events, self.events_prefix.clone(), tag.to_owned(), n));
        let mut submitted = HashMap::with_capacity(n);
        let mut submitted_ms = HashMap::with_capacity(n);
        let mut window = Window::new(WINDOW);
        let t0 = Instant::now();
        for i in 0..n {
            let id = format!("{tag}{i}");
            let payload = Self::payload(&id)?;
            if let Some(rate) = rate {
                let due = t0 + Duration::from_secs_f64(i as f64 / rate);
                if due > Instant::now() {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
                }
            }
            submitted.insert(id.clone(), Instant::now());
            submitted_ms.insert(id.clone(), flotilla_protocol::time::now_ms());
            window.push(self.submit(&id, payload).await?).await?;
        }
        window.finish().await?;
        let seen = reader.await.context("the event reader panicked")??;
        let failed = seen.values().filter(|s| s.failed.is_some()).count();
        anyhow::ensure!(failed == 0, "{failed} of {n} bench tasks failed or were rejected");
        let last = seen.values().filter_map(|s| s.completed).max().unwrap_or(t0);
        Ok(Phase { wall: last.saturating_duration_since(t0), submitted, submitted_ms, seen })
    }
}

/// Reads events until `n` tasks whose id starts with `tag` have ended.
async fn collect(
    mut events: pull::Ordered,
    subject_prefix: String,
    tag: String,
    n: usize,
) -> anyhow::Result<HashMap<String, Seen>> {
    let mut seen: HashMap<String, Seen> = HashMap::with_capacity(n);
    let mut ended = 0;
    while ended < n {
        let msg = match tokio::time::timeout(Duration::from_secs(60), events.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => return Err(anyhow::anyhow!(e).context("event stream failed")),
            _ => anyhow::bail!("tasks stopped ending: {ended} of {n} ended"),
        };
        let at = Instant::now();
        let Some((id, kind)) = msg
            .subject
            .as_str()
            .strip_prefix(&subject_prefix)
            .and_then(|r| r.split_once('.'))
            .and_then(|(_tenant, r)| r.rsplit_once('.'))
        else {
            continue;
        };
        if !id.starts_with(&tag) {
            continue;
        }
        let s = seen.entry(id.to_owned()).or_default();
        let was_over = s.completed.is_some() || s.failed.is_some();
        let slot = match kind {
            event_kind::STARTED => &mut s.started,
            event_kind::COMPLETED => &mut s.completed,
            event_kind::FAILED | event_kind::REJECTED => &mut s.failed,
            _ => continue,
        };
        slot.get_or_insert(at);
        if !was_over && (s.completed.is_some() || s.failed.is_some()) {
            ended += 1;
        }
    }
    Ok(seen)
}

/// The runners under test: processes when `flotilla-agent-runner` is next to this binary (as
/// after `cargo build --release --bins`), otherwise in this process.
enum Runners {
    Processes(Vec<tokio::process::Child>),
    InProcess(Vec<ServiceHandle>),
}

impl Runners {
    fn describe(&self) -> &'static str {
        match self {
            Self::Processes(_) => "processes",
            Self::InProcess(_) => "in process",
        }
    }

    /// The bench fleet file.
    fn fleet_toml(budgets: bool, transcripts: bool) -> String {
        let mut fleet_toml = format!(
            "[[agent]]\nname = \"{CAPABILITY}\"\ncapabilities = [\"{CAPABILITY}\"]\nprovider = \"offline\"\n\
             concurrency = {AGENT_CONCURRENCY}\nreplicas = {AGENTS_PER_RUNNER}\n"
        );
        if budgets {
            fleet_toml.push_str(&format!("max_tokens_per_task = {TASK_CAP_TOKENS}\n"));
        }
        if !transcripts {
            fleet_toml.push_str("transcripts = false\n");
        }
        fleet_toml
    }

    async fn start(
        local: &mut LocalFleet,
        dir: &std::path::Path,
        budgets: bool,
        transcripts: bool,
    ) -> anyhow::Result<Self> {
        let fleet_toml = Self::fleet_toml(budgets, transcripts);
        let runner_bin: Option<PathBuf> = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("flotilla-agent-runner")))
            .filter(|p| p.exists());
        if let Some(bin) = runner_bin {
            let fleet_path = dir.join("bench-fleet.toml");
            std::fs::write(&fleet_path, &fleet_toml).context("failed to write the bench fleet")?;
            let mut children = Vec::new();
            for id in RUNNERS {
                let child = tokio::process::Command::new(&bin)
                    .env("FLOTILLA_NATS_URL", local.url())
                    .env("FLOTILLA_PREFIX", local.fleet().names.prefix().as_str())
                    .env("FLOTILLA_FLEET", &fleet_path)
                    .env("FLOTILLA_RUNNER_ID", id)
                    // Without --budgets no budget-keeper runs: the path is measured without them.
                    .env("FLOTILLA_AGENT_RUNNER__BUDGETS", if budgets { "true" } else { "false" })
                    .env("RUST_LOG", "warn")
                    .kill_on_drop(true)
                    .spawn()
                    .context("failed to start a runner")?;
                children.push(child);
            }
            return Ok(Self::Processes(children));
        }
        Self::start_in_process(local, budgets, transcripts).await
    }

    /// The runners in this process.
    async fn start_in_process(
        local: &mut LocalFleet,
        budgets: bool,
        transcripts: bool,
    ) -> anyhow::Result<Self> {
        let fleet_toml = Self::fleet_toml(budgets, transcripts);
        let mut handles = Vec::new();
        for id in RUNNERS {
            // Without --budgets no budget-keeper runs, so budgets are off.
            let config = flotilla_agent_runner::Config {
                runner_id: Some(id.to_owned()),
                budgets,
                ..Default::default()
            };
            let file = FleetFile::parse(&fleet_toml)?;
            handles.push(local.spawn(id, flotilla_agent_runner::Runner::new(config, file)?).await?);
        }
        Ok(Self::InProcess(handles))
    }

    /// Stops the runners: SIGTERM (they drain and deregister), or their stop tokens in process.
    async fn stop(self, local: &mut LocalFleet) {
        match self {
            Self::Processes(children) => {
                for mut child in children {
                    if let Some(pid) = child.id() {
                        let _ = tokio::process::Command::new("kill")
                            .args(["-TERM", &pid.to_string()])
                            .status()
                            .await;
                    }
                    if tokio::time::timeout(Duration::from_secs(15), child.wait()).await.is_err() {
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                    }
                }
            }
            Self::InProcess(handles) => {
                for h in handles {
                    if let Err(e) = local.stop_service(&h).await {
                        tracing::warn!(error = format!("{e:#}"), "a runner did not stop cleanly");
                    }
                }
            }
        }
    }
}

/// Last sequence of each of the fleet's streams (its KV buckets and object stores included).
async fn stream_sequences(fleet: &Fleet) -> anyhow::Result<HashMap<String, u64>> {
    let lower = fleet.names.prefix().as_str().replace('.', "_");
    let prefixes =
        [format!("{}_", lower.to_ascii_uppercase()), format!("KV_{lower}_"), format!("OBJ_{lower}_")];
    let mut out = HashMap::new();
    let mut streams = fleet.js.streams();
    while let Some(info) = streams.next().await {
        let info = info.context("failed to list streams")?;
        if prefixes.iter().any(|p| info.config.name.starts_with(p.as_str())) {
            out.insert(info.config.name.clone(), info.state.last_sequence);
        }
    }
    Ok(out)
}

/// Entries written to the budget ledger so far (the `<P>_LEDGER` stream's last sequence).
async fn ledger_entries(fleet: &Fleet) -> anyhow::Result<u64> {
    let mut stream =
        fleet.js.get_stream(fleet.names.ledger_stream()).await.context("no budget ledger stream")?;
    let info = stream.info().await.context("failed to read the budget ledger stream")?;
    Ok(info.state.last_sequence)
}

/// Waits until the budget ledger stops growing (up to 5 s): the runners close a task's budget in
/// the background after its `completed` event, so the last closes of a phase come after it.
async fn settle_ledger(fleet: &Fleet) -> anyhow::Result<()> {
    let t = Instant::now();
    let mut last = ledger_entries(fleet).await?;
    while t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = ledger_entries(fleet).await?;
        if now == last {
            break;
        }
        last = now;
    }
    Ok(())
}

/// Waits until the budget-keeper answers a request (any answer, `unknown_scope` included; the
/// client asks again while no keeper answers or it says it is unavailable).
async fn keeper_answers(fleet: &Fleet) -> anyhow::Result<()> {
    let mut client = flotilla_service::budget::Client::new(fleet.clone());
    client.patience = Duration::from_secs(30);
    let req = flotilla_protocol::ShowRequest { scope: Some("bench.ready".to_owned()), ..Default::default() };
    match client.call(&req).await {
        Ok(_) | Err(flotilla_service::budget::BudgetError::Refused { .. }) => Ok(()),
        Err(e) => Err(anyhow::anyhow!(e).context("the budget-keeper did not answer")),
    }
}

/// Deliveries made again (NAKs, ack timeouts) so far: of submissions, of assignments; and the
/// tasks requeued so far (`requeued` events).
async fn redeliveries(fleet: &Fleet) -> anyhow::Result<(usize, usize, u64)> {
    let names = &fleet.names;
    let mut counts = [0usize; 2];
    for (n, stream) in counts.iter_mut().zip([names.submissions_stream(), names.assignments_stream()]) {
        let stream = fleet.js.get_stream(&stream).await.context("no stream")?;
        let mut consumers = stream.consumers();
        while let Some(info) = consumers.next().await {
            *n += info.context("failed to list consumers")?.num_redelivered;
        }
    }
    let reply = fleet
        .client
        .request(names.instance_health_subject("dispatcher", "bench-dispatcher"), Bytes::new())
        .await
        .context("the dispatcher did not answer its health request")?;
    let health: flotilla_protocol::HealthReply = codec::decode(None, &reply.payload)?;
    let requeued = health.details.get("requeued").and_then(serde_json::Value::as_u64).unwrap_or(0);
    Ok((counts[0], counts[1], requeued))
}

/// In/out message counters of a local server (`/varz` on its monitoring port).
async fn varz(monitoring: Option<&str>) -> Option<(u64, u64)> {
    let addr = monitoring?.strip_prefix("http://")?;
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /varz HTTP/1.0\r\nHost: localhost\r\n\r\n").await.ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let start = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let v: serde_json::Value = serde_json::from_slice(buf.get(start..)?).ok()?;
    Some((v.get("in_msgs")?.as_u64()?, v.get("out_msgs")?.as_u64()?))
}

fn monitoring_url(server: &LocalServer) -> Option<String> {
    let dir = server.options().store_dir.join("ports");
    let entry = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "ports"))?;
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(entry.path()).ok()?).ok()?;
    v.get("monitoring")?.get(0)?.as_str().map(str::to_owned)
}

/// Span timings of the services in this process during one phase.
fn span_summary(timings: &profile::ByName) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for name in profile::TIMED {
        let Some(v) = timings.get(name).filter(|v| !v.is_empty()) else { continue };
        let mut walls: Vec<f64> = v.iter().map(|c| c.wall.as_secs_f64() * 1e6).collect();
        let mut busy: Vec<f64> = v.iter().map(|c| c.busy.as_secs_f64() * 1e6).collect();
        walls.sort_by(f64::total_cmp);
        busy.sort_by(f64::total_cmp);
        let total: f64 = walls.iter().sum::<f64>() / 1e6;
        // From the first span's creation to the last one's close.
        let first = v.iter().map(|c| c.created).min();
        let last = v.iter().map(|c| c.created + c.wall).max();
        let active = first.zip(last).map_or(Duration::ZERO, |(f, l)| l.saturating_duration_since(f));
        out.insert(
            name.to_owned(),
            json!({
                "count": v.len(),
                "wall_p50_us": round(percentile(&walls, 0.5), 0),
                "wall_p99_us": round(percentile(&walls, 0.99), 0),
                "busy_p50_us": round(percentile(&busy, 0.5), 0),
                "busy_p99_us": round(percentile(&busy, 0.99), 0),
                "active_ms": round(active.as_secs_f64() * 1000.0, 1),
                // Average number open at once while active: for the one-at-a-time scheduler,
                // the share of that time it spent assigning.
                "open_on_average": round(total / active.as_secs_f64().max(1e-9), 2),
            }),
        );
    }
    serde_json::Value::Object(out)
}

pub async fn run(cli: &Cli, sizes: Sizes, server_config: ServerConfig, budgets: bool) -> anyhow::Result<()> {
    let Sizes { tasks, agents, queued, tracing_rounds, transcripts } = sizes;
    if tasks < 10 || agents == 0 || queued < 2 {
        return Err(Usage("--tasks must be at least 10, --agents and --queued at least 2".to_owned()).into());
    }
    let started = Instant::now();
    // For (e): spans exported as a service exports them, to a receiver here; off until then.
    let receiver = crate::otlp::Receiver::start().await?;
    flotilla_service::telemetry::install_propagator();
    let provider = flotilla_service::telemetry::tracer_provider("flotilla-bench", Some(receiver.url()));
    let timings = profile::install(Some(&provider));
    let dir = tempfile::Builder::new()
        .prefix("flotilla-bench-")
        .tempdir()
        .context("failed to create a temp dir")?;
    let (mut local, server_desc) = cli.fleet(dir.path(), server_config, Mode::Own).await?;
    let monitoring = local.server().and_then(monitoring_url);
    let (fleet, topology) = (local.fleet().clone(), local.topology().clone());
    let names = fleet.names.clone();
    let build = if cfg!(debug_assertions) { "debug" } else { "release" };

    // (a) Raw JetStream.
    let sample_id = "0190b2c4-1c5e-7f00-8000-000000000000";
    let record = validate(
        TaskSubmission {
            capability: CAPABILITY.to_owned(),
            input: json!({ "text": TEXT }),
            ..Default::default()
        },
        sample_id.to_owned(),
        200,
        Limits::default(),
        flotilla_protocol::time::now_ms(),
    )
    .map_err(|r| anyhow::anyhow!("bench record rejected: {}", r.message))?;
    progress(started, "(a) raw JetStream baselines");
    let a = raw::run(
        &fleet.js,
        &names,
        raw::Params {
            publish_messages: tasks * 5,
            pipeline_items: tasks * 5,
            window: WINDOW,
            in_flight: PIPELINE_IN_FLIGHT,
            payload: Bench::payload(sample_id)?,
            record: Bytes::from(
                codec::encode(WireFormat::Msgpack, &record).context("failed to encode a record")?,
            ),
        },
    )
    .await?;

    // (b) and (c): the dispatcher here, two runners.
    let dispatcher = flotilla_dispatcher::Dispatcher::new(flotilla_dispatcher::Config::default());
    local.spawn("bench-dispatcher", dispatcher).await?;
    // With --budgets, the budget-keeper here too, stopped only after the runners (they close
    // budgets as they drain).
    if budgets {
        progress(started, "starting the budget-keeper");
        local.spawn("bench-budget-keeper", flotilla_budget_keeper::BudgetKeeper::default()).await?;
    }
    let runners = Runners::start(&mut local, dir.path(), budgets, transcripts).await?;
    let result = async {
        if budgets {
            keeper_answers(&fleet).await?;
        }
        measure(&fleet, &topology, tasks, monitoring.as_deref(), timings.as_ref(), started, budgets).await
    }
    .await;
    let runner_mode = runners.describe();
    progress(started, "stopping the runners");
    runners.stop(&mut local).await;
    // (e) The cost of tracing, with every service of the path in this process.
    let e = match (&result, tracing_rounds) {
        (Ok(m), 1..) => {
            let run = TracingRun { rounds: tracing_rounds, tasks: (tasks / 20).max(10), rate: m.rate / 2.0 };
            Some(
                tracing_cost(
                    &mut local,
                    &topology,
                    (budgets, transcripts),
                    run,
                    &provider,
                    &receiver,
                    started,
                )
                .await,
            )
        }
        _ => None,
    };
    progress(started, "stopping the dispatcher and the server");
    crate::stop(local).await;
    let mut m = result?;
    m.runner_mode = runner_mode;
    let e = e.transpose()?;

    // (d) The scheduling core alone, with nothing else running.
    progress(started, &format!("(d) scheduling core: {agents} agents, {queued} queued tasks"));
    let decisions = (queued / 2).min(200_000);
    let d = tokio::task::spawn_blocking(move || scheduler::run(agents, queued, decisions))
        .await
        .context("the scheduler bench panicked")??;

    let vs_pipeline = m.throughput / a.pipeline_per_s.max(1e-9);
    let total_bytes = d.core_bytes_per_task + d.cache_bytes_per_task;
    let goals = json!({
        "throughput_vs_pipeline": vs_pipeline >= GOAL_VS_PIPELINE,
        "completed_p50": m.completed_p50 <= GOAL_P50_MS,
        "completed_p99": m.completed_p99 <= GOAL_P99_MS,
        "decision_p99": d.decision_p99_us < GOAL_DECISION_P99_US,
        "memory_core": d.core_bytes_per_task < GOAL_BYTES_PER_TASK,
        "memory_core_and_cache": total_bytes < GOAL_BYTES_PER_TASK,
        "tracing_p50": e.as_ref().map(|e| e.ratio <= GOAL_TRACING_P50_RATIO),
    });
    let stored_total: f64 = m.stored.iter().map(|(_, n)| n).sum();
    let mut stored_json: serde_json::Map<String, serde_json::Value> =
        m.stored.iter().map(|(s, n)| (s.clone(), json!(round(*n, 2)))).collect();
    stored_json.insert("total".to_owned(), json!(round(stored_total, 2)));
    let mut round_trips = serde_json::Map::new();
    for (stage, _) in ROUND_TRIPS {
        let n = round_trips.get(stage).and_then(serde_json::Value::as_u64).unwrap_or(0);
        round_trips.insert(stage.to_owned(), json!(n + 1));
    }
    round_trips.insert("total".to_owned(), json!(ROUND_TRIPS.len()));
    let report = json!({
        "setup": {
            "build": build,
            "server": server_desc,
            "runners": RUNNERS.len(),
            "runner_mode": m.runner_mode,
            "agents": RUNNERS.len() as u32 * AGENTS_PER_RUNNER,
            "slots": RUNNERS.len() as u32 * AGENTS_PER_RUNNER * AGENT_CONCURRENCY,
            "model": "offline, zero latency, one step",
            "budgets": budgets,
            "transcripts": transcripts,
            "budget_keeper": budgets.then_some("in process, own connection"),
            "task_cap_tokens": budgets.then_some(TASK_CAP_TOKENS),
        },
        "raw": {
            "publish": { "messages": a.publish_messages, "in_flight": a.publish_window, "per_s": round(a.publish_per_s, 0) },
            "pipeline": {
                "items": a.pipeline_items,
                "in_flight": a.pipeline_in_flight,
                "per_s": round(a.pipeline_per_s, 0),
                "stored_per_item": RAW_STORED_PER_ITEM,
            },
        },
        "throughput": {
            "tasks": tasks,
            "per_s": round(m.throughput, 0),
            "vs_pipeline": round(vs_pipeline, 3),
            "goal_vs_pipeline": GOAL_VS_PIPELINE,
            "server_msgs_in_per_task": m.msgs_per_task.map(|(i, _)| round(i, 1)),
            "server_msgs_out_per_task": m.msgs_per_task.map(|(_, o)| round(o, 1)),
            "stored_per_task": stored_json,
            "redelivered_submissions": m.redelivered[0].0,
            "redelivered_assignments": m.redelivered[0].1,
            "requeued": m.redelivered[0].2,
            "ledger_entries_per_task": m.ledger_per_task[0].map(|x| round(x, 2)),
        },
        "latency": {
            "tasks": tasks,
            "rate_per_s": round(m.rate, 0),
            "started_p50_ms": round(m.started_p50, 2),
            "started_p99_ms": round(m.started_p99, 2),
            "completed_p50_ms": round(m.completed_p50, 2),
            "completed_p99_ms": round(m.completed_p99, 2),
            "goal_completed_p50_ms": GOAL_P50_MS,
            "goal_completed_p99_ms": GOAL_P99_MS,
            "recorded_started_p50_ms": m.recorded[0],
            "recorded_started_p99_ms": m.recorded[1],
            "recorded_completed_p50_ms": m.recorded[2],
            "recorded_completed_p99_ms": m.recorded[3],
            "redelivered_submissions": m.redelivered[1].0,
            "redelivered_assignments": m.redelivered[1].1,
            "requeued": m.redelivered[1].2,
            "ledger_entries_per_task": m.ledger_per_task[1].map(|x| round(x, 2)),
            "stages_p50_ms": m.stages.iter().map(|(k, v)| ((*k).to_owned(), json!(round(*v, 2)))).collect::<serde_json::Map<_, _>>(),
        },
        "scheduler": {
            "agents": d.agents,
            "queued": d.queued,
            "decisions": d.decisions,
            "running_while_deciding": d.running,
            "enqueue_per_s": round(d.enqueue_per_s, 0),
            "decision_p50_us": round(d.decision_p50_us, 2),
            "decision_p99_us": round(d.decision_p99_us, 2),
            "decision_p999_us": round(d.decision_p999_us, 2),
            "decision_max_us": round(d.decision_max_us, 1),
            "decisions_over_1ms": d.decisions_over_1ms,
            "preempted_while_deciding": d.preempted,
            "finish_p50_us": round(d.finish_p50_us, 2),
            "goal_decision_p99_us": GOAL_DECISION_P99_US,
            "core_bytes_per_task": round(d.core_bytes_per_task, 0),
            "record_cache_bytes_per_task": round(d.cache_bytes_per_task, 0),
            "record_cache_entry_inline_bytes": d.cache_entry_inline_bytes,
            "core_and_cache_bytes_per_task": round(total_bytes, 0),
            "rss_growth_bytes_per_task": round(d.rss_bytes_per_task, 0),
            "goal_bytes_per_task": GOAL_BYTES_PER_TASK,
        },
        "tracing": e.as_ref().map(|e| json!({
            "runners": "in process",
            "rounds": e.rounds.iter().map(|(on, p50)| json!({ "tracing": on, "completed_p50_ms": round(*p50, 3) })).collect::<Vec<_>>(),
            "tasks_per_round": e.tasks,
            "rate_per_s": round(e.rate, 0),
            "off_completed_p50_ms": round(e.off_p50, 3),
            "on_completed_p50_ms": round(e.on_p50, 3),
            "off_completed_p99_ms": round(e.off_p99, 3),
            "on_completed_p99_ms": round(e.on_p99, 3),
            "p50_ratio": round(e.ratio, 4),
            "blocks_median_ratio": round(e.block_median, 4),
            "cpu_us_per_task_off": round(e.cpu_us_per_task[0], 1),
            "cpu_us_per_task_on": round(e.cpu_us_per_task[1], 1),
            "off_off_ratio": round(e.off_off, 4),
            "goal_p50_ratio": GOAL_TRACING_P50_RATIO,
            "spans_exported": e.spans,
            "spans_per_task": round(e.spans as f64 / e.on_tasks.max(1) as f64, 1),
        })),
        "profile": { "throughput": m.profile_b, "half_load": m.profile_c },
        "round_trips": round_trips,
        "goals": goals,
    });
    if cli.json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "flotilla-bench dispatcher: {build} build; {server_desc}; {} runners ({}) × {AGENTS_PER_RUNNER} agents × concurrency {AGENT_CONCURRENCY}, offline model, zero latency",
        RUNNERS.len(),
        m.runner_mode,
    );
    if budgets {
        println!(
            "budgets ON: a budget-keeper in this process (own connection); every model call reserves and commits \
             with it (task, agent, tenant and model scopes; each task capped at {} tokens, its budget closed when it ends)",
            thousands(TASK_CAP_TOKENS as f64),
        );
    }
    println!(
        "(a) raw JetStream: async publish {} msg/s ({} messages, {WINDOW} in flight); one-hop pipeline \
         (pull A → KV revision-checked update → publish B → consume B) {} items/s ({} items, {PIPELINE_IN_FLIGHT} in flight)",
        thousands(a.publish_per_s),
        thousands(a.publish_messages as f64),
        thousands(a.pipeline_per_s),
        thousands(a.pipeline_items as f64),
    );
    println!(
        "(b) Flotilla submit → completed: {} tasks/s ({tasks} tasks, submitted {WINDOW} in flight) = {vs_pipeline:.2} × the pipeline \
         [goal ≥ {GOAL_VS_PIPELINE}: {}]",
        thousands(m.throughput),
        goal(vs_pipeline >= GOAL_VS_PIPELINE),
    );
    println!(
        "    messages stored per task (stream writes): {stored_total:.1} = {} (the pipeline stores {} per item: A, the KV key, B)",
        m.stored.iter().map(|(s, n)| format!("{s} {n:.1}")).collect::<Vec<_>>().join(", "),
        RAW_STORED_PER_ITEM,
    );
    if let Some((i, o)) = m.msgs_per_task {
        println!(
            "    server messages per task (varz, all clients, heartbeats included): {i:.1} in, {o:.1} out"
        );
    }
    if let Some(n) = m.ledger_per_task[0] {
        println!("    budget ledger entries per task: {n:.2}");
    }
    let [rb, rc] = m.redelivered;
    println!(
        "    redelivered: {} submissions, {} assignments; {} tasks requeued (in (c): {}, {}, {})",
        rb.0, rb.1, rb.2, rc.0, rc.1, rc.2
    );
    println!(
        "(c) at half that rate ({:.0} tasks/s, {tasks} tasks): submit → started p50 {:.2} ms, p99 {:.2} ms; \
         submit → completed p50 {:.2} ms [goal ≤ {GOAL_P50_MS} ms: {}], p99 {:.2} ms [goal ≤ {GOAL_P99_MS} ms: {}]",
        m.rate,
        m.started_p50,
        m.started_p99,
        m.completed_p50,
        goal(m.completed_p50 <= GOAL_P50_MS),
        m.completed_p99,
        goal(m.completed_p99 <= GOAL_P99_MS),
    );
    println!(
        "    as the task records have it (ms clocks, 1,000 tasks): submit → started p50 {:.0} ms, p99 {:.0} ms; submit → finished p50 {:.0} ms, p99 {:.0} ms",
        m.recorded[0], m.recorded[1], m.recorded[2], m.recorded[3]
    );
    if let Some(n) = m.ledger_per_task[1] {
        println!("    budget ledger entries per task: {n:.2}");
    }
    println!(
        "    p50 between event arrivals: {}",
        m.stages
            .iter()
            .map(|(k, v)| format!("{} {v:.2} ms", k.replace("_to_", " → ")))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "(d) scheduling core, {} agents × {} slots, {} queued, {} decisions with {} running: decision p50 {:.2} µs, \
         p99 {:.2} µs [goal < {GOAL_DECISION_P99_US} µs: {}], p99.9 {:.1} µs, max {:.0} µs ({} over 1 ms; the thread was \
         preempted {} times meanwhile); finish p50 {:.2} µs; {} enqueues/s",
        thousands(f64::from(d.agents)),
        scheduler::CONCURRENCY,
        thousands(d.queued as f64),
        thousands(d.decisions as f64),
        thousands(d.running as f64),
        d.decision_p50_us,
        d.decision_p99_us,
        goal(d.decision_p99_us < GOAL_DECISION_P99_US),
        d.decision_p999_us,
        d.decision_max_us,
        d.decisions_over_1ms,
        d.preempted,
        d.finish_p50_us,
        thousands(d.enqueue_per_s),
    );
    println!(
        "    heap per queued task: core {:.0} B [goal < 1 KB: {}], record cache (TaskView, {} B inline per map entry) {:.0} B, \
         together {:.0} B [{}]; process RSS grew {:.0} B per task",
        d.core_bytes_per_task,
        goal(d.core_bytes_per_task < GOAL_BYTES_PER_TASK),
        d.cache_entry_inline_bytes,
        d.cache_bytes_per_task,
        total_bytes,
        goal(total_bytes < GOAL_BYTES_PER_TASK),
        d.rss_bytes_per_task,
    );
    if let Some(e) = &e {
        println!(
            "(e) tracing: {} rounds of {} tasks at {:.0}/s, off and on in turns (ABBA), dispatcher and two runners in this \
             process; on = every Flotilla span an OpenTelemetry span, trace context on every message, {} spans \
             ({:.1} per task) exported over OTLP/HTTP to a receiver here",
            e.rounds.len(),
            e.tasks,
            e.rate,
            thousands(e.spans as f64),
            e.spans as f64 / e.on_tasks.max(1) as f64,
        );
        println!(
            "    submit → completed p50: off {:.3} ms, on {:.3} ms = {:.3} × [goal ≤ {GOAL_TRACING_P50_RATIO}: {}]; \
             p99 off {:.2} ms, on {:.2} ms",
            e.off_p50,
            e.on_p50,
            e.ratio,
            goal(e.ratio <= GOAL_TRACING_P50_RATIO),
            e.off_p99,
            e.on_p99,
        );
        println!(
            "    median of the {} blocks' own ratios (off, on, on, off) {:.3} ×; noise: the first off rounds' p50 over \
             the last ones' (off against off) {:.3} ×",
            e.rounds.len() / 4,
            e.block_median,
            e.off_off,
        );
        println!(
            "    CPU of the dispatcher and runners (this process) per task: off {:.0} µs, on {:.0} µs (+{:.0} µs = {:.3} ×)",
            e.cpu_us_per_task[0],
            e.cpu_us_per_task[1],
            e.cpu_us_per_task[1] - e.cpu_us_per_task[0],
            e.cpu_us_per_task[1] / e.cpu_us_per_task[0].max(1e-9),
        );
        println!(
            "    rounds: {}",
            e.rounds
                .iter()
                .map(|(on, p50)| format!("{} {p50:.3} ms", if *on { "on" } else { "off" }))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!(
        "where the dispatcher's time goes (spans in this process; busy = being polled, the rest is waiting for NATS):"
    );
    for (phase, p) in [("(b) full load", &m.profile_b), ("(c) half load", &m.profile_c)] {
        for name in profile::TIMED {
            let Some(s) = p.get(name) else { continue };
            let f = |k: &str| s.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
            println!(
                "    {phase}: `{name}` ×{}: wall p50 {:.0} µs, p99 {:.0} µs; busy p50 {:.0} µs; {:.2} open on average",
                f("count"),
                f("wall_p50_us"),
                f("wall_p99_us"),
                f("busy_p50_us"),
                f("open_on_average"),
            );
        }
    }
    println!(
        "    (`submission` = the intake of one submission, up to 64 at once; `assign` = the publishes of one assignment; \
         open on average = how many were under way at once, which for a scheduler that assigns one task at a \
         time is the share of the time it spent assigning)"
    );
    if budgets {
        println!(
            "    (`round` = one round of the budget-keeper: a batch of requests decided, their ledger entries written \
             together and the acks awaited, the answers sent)"
        );
    }
    println!("JetStream round trips per task on the critical path (from the code): {}", ROUND_TRIPS.len());
    for (stage, what) in ROUND_TRIPS {
        println!("    {stage:<9} {what}");
    }
    println!("    {HOPS}");
    println!("    {OFF_PATH}");
    Ok(())
}

/// What (b) and (c) measured.
struct Measured {
    /// With budgets on, budget ledger entries per task in (b) and (c).
    ledger_per_task: [Option<f64>; 2],
    /// In (c), from the task records (ms clocks): submit → started p50, p99, submit → finished
    /// p50, p99.
    recorded: [f64; 4],
    /// In (b) and (c): submissions and assignments delivered again, tasks requeued.
    redelivered: [(usize, usize, u64); 2],
    runner_mode: &'static str,
    throughput: f64,
    msgs_per_task: Option<(f64, f64)>,
    /// Messages stored per task, by stream (each one a disk write, synced with
    /// `sync_interval: always`), largest first.
    stored: Vec<(String, f64)>,
    rate: f64,
    started_p50: f64,
    started_p99: f64,
    completed_p50: f64,
    completed_p99: f64,
    stages: Vec<(&'static str, f64)>,
    profile_b: serde_json::Value,
    profile_c: serde_json::Value,
}

async fn measure(
    fleet: &Fleet,
    topology: &Topology,
    tasks: usize,
    monitoring: Option<&str>,
    timings: Option<&profile::Timings>,
    started: Instant,
    budgets: bool,
) -> anyhow::Result<Measured> {
    agents_registered(topology).await?;
    let bench = Bench::new(fleet);
    let run = run_tag();
    progress(started, "(b) agents registered; warming up");
    bench.phase(&format!("{run}-w-"), (tasks / 10).clamp(10, 100), None).await?;
    if let Some(t) = timings {
        t.take();
    }
    progress(started, &format!("(b) {tasks} tasks as fast as possible"));
    let ledger = |on: bool| async move { if on { ledger_entries(fleet).await.map(Some) } else { Ok(None) } };
    let before = varz(monitoring).await;
    let r0 = redeliveries(fleet).await?;
    let seqs_before = stream_sequences(fleet).await?;
    let ledger_b0 = ledger(budgets).await?;
    let b = bench.phase(&format!("{run}-b-"), tasks, None).await?;
    if budgets {
        settle_ledger(fleet).await?;
    }
    let after = varz(monitoring).await;
    let r1 = redeliveries(fleet).await?;
    let seqs_after = stream_sequences(fleet).await?;
    let ledger_b1 = ledger(budgets).await?;
    let mut stored: Vec<(String, f64)> = seqs_after
        .iter()
        .map(|(name, seq)| {
            let grew = seq.saturating_sub(seqs_before.get(name).copied().unwrap_or(0));
            (name.clone(), grew as f64 / tasks as f64)
        })
        .filter(|(_, per_task)| *per_task > 0.0)
        .collect();
    stored.sort_by(|a, b| b.1.total_cmp(&a.1));
    let profile_b = timings.map(|t| span_summary(&t.take())).unwrap_or_default();
    let msgs_per_task = before.zip(after).map(|((i0, o0), (i1, o1))| {
        (i1.saturating_sub(i0) as f64 / tasks as f64, o1.saturating_sub(o0) as f64 / tasks as f64)
    });
    let throughput = b.throughput();
    let rate = throughput / 2.0;
    progress(started, &format!("(c) {tasks} tasks at {rate:.0}/s"));
    let ledger_c0 = ledger(budgets).await?;
    let c = bench.phase(&format!("{run}-c-"), tasks, Some(rate)).await?;
    if budgets {
        settle_ledger(fleet).await?;
    }
    let ledger_c1 = ledger(budgets).await?;
    let per_task =
        |a: Option<u64>, b: Option<u64>| a.zip(b).map(|(a, b)| b.saturating_sub(a) as f64 / tasks as f64);
    // Entries written while a phase ran (and settled), per task of the phase.
    let ledger_per_task = [per_task(ledger_b0, ledger_b1), per_task(ledger_c0, ledger_c1)];
    let profile_c = timings.map(|t| span_summary(&t.take())).unwrap_or_default();
    let r2 = redeliveries(fleet).await?;
    let (rec_started, rec_finished) = c.recorded(fleet, &topology.tasks, 1000).await;
    let recorded = [
        percentile(&rec_started, 0.5),
        percentile(&rec_started, 0.99),
        percentile(&rec_finished, 0.5),
        percentile(&rec_finished, 0.99),
    ];
    let delta = |a: (usize, usize, u64), b: (usize, usize, u64)| {
        (b.0.saturating_sub(a.0), b.1.saturating_sub(a.1), b.2.saturating_sub(a.2))
    };
    let submitted = |id: &str, _: &Seen| c.submitted.get(id).copied();
    let started = c.spans(submitted, |s| s.started);
    let completed = c.spans(submitted, |s| s.completed);
    let stage = |v: Vec<f64>| percentile(&v, 0.5);
    let stages = vec![
        ("submit_to_started", stage(c.spans(submitted, |s| s.started))),
        ("started_to_completed", stage(c.spans(|_, s| s.started, |s| s.completed))),
    ];
    Ok(Measured {
        ledger_per_task,
        recorded,
        redelivered: [delta(r0, r1), delta(r1, r2)],
        runner_mode: "",
        throughput,
        msgs_per_task,
        stored,
        rate,
        started_p50: percentile(&started, 0.5),
        started_p99: percentile(&started, 0.99),
        completed_p50: percentile(&completed, 0.5),
        completed_p99: percentile(&completed, 0.99),
        stages,
        profile_b,
        profile_c,
    })
}

/// Waits (up to 60 s) until every bench agent is registered.
async fn agents_registered(topology: &Topology) -> anyhow::Result<()> {
    let expected = RUNNERS.len() * usize::try_from(AGENTS_PER_RUNNER).unwrap_or(0);
    let t = Instant::now();
    loop {
        let keys: Vec<String> = topology
            .agents
            .keys()
            .await
            .context("failed to list agents")?
            .filter_map(|k| async move { k.ok() })
            .collect()
            .await;
        let n = keys.iter().filter(|k| RUNNERS.iter().any(|r| k.starts_with(&format!("{r}-")))).count();
        if n >= expected {
            return Ok(());
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(60),
            "only {n} of {expected} bench agents registered in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What (e) runs: rounds of `tasks` tasks at `rate` per second.
struct TracingRun {
    rounds: usize,
    tasks: usize,
    rate: f64,
}

/// What (e) measured.
struct TracingCost {
    /// Each round: tracing on, its submit → completed p50 (ms).
    rounds: Vec<(bool, f64)>,
    tasks: usize,
    rate: f64,
    off_p50: f64,
    on_p50: f64,
    off_p99: f64,
    on_p99: f64,
    /// `on_p50 / off_p50`.
    ratio: f64,
    /// The noise the ratio stands against: the same ratio between the two off rounds of each
    /// block of four (off, on, on, off), the first ones' p50 over the last ones' (an A/A test).
    off_off: f64,
    /// The median of the blocks' own ratios (each block's on p50 over its off p50).
    block_median: f64,
    /// CPU time of this process per task, tracing off and on (µs).
    cpu_us_per_task: [f64; 2],
    /// Spans the receiver got, and tasks run with tracing on.
    spans: u64,
    on_tasks: usize,
}

/// (e) Submit → completed latency with tracing off and on in turns (off, on, on, off, …, so
/// that drift over the run falls on both alike), the dispatcher and two runners in this process
/// so that one switch covers every span of the path. Off: no span is created at all. On: what a
/// service does with an OTLP endpoint set — every Flotilla span at INFO an OpenTelemetry span,
/// W3C trace context on every message, spans batched to an OTLP/HTTP receiver.
async fn tracing_cost(
    local: &mut LocalFleet,
    topology: &Topology,
    (budgets, transcripts): (bool, bool),
    run: TracingRun,
    provider: &opentelemetry_sdk::trace::SdkTracerProvider,
    receiver: &crate::otlp::Receiver,
    started: Instant,
) -> anyhow::Result<TracingCost> {
    let TracingRun { rounds, tasks, rate } = run;
    progress(started, &format!("(e) tracing off and on: {rounds} rounds of {tasks} tasks at {rate:.0}/s"));
    let runners = Runners::start_in_process(local, budgets, transcripts).await?;
    let fleet = local.fleet().clone();
    let result = async {
        agents_registered(topology).await?;
        let bench = Bench::new(&fleet);
        let tag = run_tag();
        profile::Tracing::on();
        bench.phase(&format!("{tag}-ew-"), (tasks / 5).clamp(10, 200), Some(rate)).await?;
        let _ = provider.force_flush();
        let spans_before = receiver.spans()?;
        let (mut off, mut on, mut per_round, mut on_tasks) = (Vec::new(), Vec::new(), Vec::new(), 0);
        let mut latencies: Vec<Vec<f64>> = Vec::new();
        // CPU time of this process (the dispatcher and the runners) in the off and on rounds.
        let mut cpu_by_mode = [Duration::ZERO; 2];
        for r in 0..rounds {
            let tracing = matches!(r % 4, 1 | 2);
            if tracing {
                profile::Tracing::on();
            } else {
                profile::Tracing::off();
            }
            let cpu0 = crate::figures::cpu_time();
            let p = bench.phase(&format!("{tag}-e{r}-"), tasks, Some(rate)).await?;
            let cpu = crate::figures::cpu_time().zip(cpu0).map(|(b, a)| b.saturating_sub(a));
            if let Some(total) = cpu_by_mode.get_mut(usize::from(tracing)) {
                *total += cpu.unwrap_or_default();
            }
            let completed = p.spans(|id, _| p.submitted.get(id).copied(), |s| s.completed);
            per_round.push((tracing, percentile(&completed, 0.5)));
            latencies.push(completed.clone());
            if tracing {
                on_tasks += tasks;
                on.extend(completed);
            } else {
                off.extend(completed);
            }
        }
        profile::Tracing::off();
        let _ = provider.force_flush();
        let spans = receiver.spans()?.saturating_sub(spans_before);
        anyhow::ensure!(on_tasks == 0 || spans > 0, "no span reached the OTLP receiver with tracing on");
        off.sort_by(f64::total_cmp);
        on.sort_by(f64::total_cmp);
        let (off_p50, on_p50) = (percentile(&off, 0.5), percentile(&on, 0.5));
        let sorted = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v
        };
        let (mut first_off, mut last_off, mut blocks) = (Vec::new(), Vec::new(), Vec::new());
        for block in latencies.chunks_exact(4) {
            let [a, b, c, d] = block else { continue };
            first_off.extend_from_slice(a);
            last_off.extend_from_slice(d);
            let on = sorted([b.as_slice(), c.as_slice()].concat());
            let off = sorted([a.as_slice(), d.as_slice()].concat());
            blocks.push(percentile(&on, 0.5) / percentile(&off, 0.5).max(1e-9));
        }
        let off_off = percentile(&sorted(first_off), 0.5) / percentile(&sorted(last_off), 0.5).max(1e-9);
        let block_median = percentile(&sorted(blocks), 0.5);
        Ok(TracingCost {
            rounds: per_round,
            tasks,
            rate,
            off_p50,
            on_p50,
            off_p99: percentile(&off, 0.99),
            on_p99: percentile(&on, 0.99),
            ratio: on_p50 / off_p50.max(1e-9),
            off_off,
            block_median,
            cpu_us_per_task: cpu_by_mode.map(|d| {
                let n = (rounds / 2).max(1) * tasks;
                d.as_secs_f64() * 1e6 / n as f64
            }),
            spans,
            on_tasks,
        })
    }
    .await;
    profile::Tracing::timing();
    runners.stop(local).await;
    result
}
