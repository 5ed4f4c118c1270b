//! Part (d) of `flotilla-bench dispatcher`: the scheduling core alone, without NATS. It registers
//! many agents, queues many tasks the way the scheduler does (one `Queued` per task record), then
//! times `next()` decisions; and it measures the heap the core holds per queued task, and what the
//! scheduler's per-task record cache (`TaskView` in `scheduler/projection.rs`) adds on top.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use flotilla_dispatcher::runqueue::{Id, Now, Policy, Queued, RunQueue};
use flotilla_protocol::validate::{Limits, validate};
use flotilla_protocol::{AgentRecord, Priority, TaskRecord, TaskSubmission};

use crate::figures::{percentile, rss_kib};
use crate::heap;

const CAPABILITIES: [&str; 4] = ["summarize", "draft", "code.review", "translate"];
const TENANTS: usize = 8;
const PRIORITIES: [u8; 6] = [2, 5, 5, 5, 8, 9];
/// Agent concurrency.
pub const CONCURRENCY: u32 = 4;

/// What part (d) measured.
#[derive(Debug, Clone)]
pub struct Figures {
    pub agents: u32,
    pub queued: usize,
    pub decisions: usize,
    /// Tasks kept running while deciding (finished in FIFO order after that many decisions).
    pub running: usize,
    pub enqueue_per_s: f64,
    pub decision_p50_us: f64,
    pub decision_p99_us: f64,
    pub decision_max_us: f64,
    pub decision_p999_us: f64,
    pub decisions_over_1ms: usize,
    /// Times this thread was preempted (involuntary context switches) while deciding: on a busy
    /// machine the slowest decisions are those the kernel interrupted.
    pub preempted: u64,
    pub finish_p50_us: f64,
    pub core_bytes_per_task: f64,
    pub cache_bytes_per_task: f64,
    /// Bytes of one cache entry (key and value) stored inline in the map's table.
    pub cache_entry_inline_bytes: usize,
    /// Resident memory growth of the process while both were built, per task.
    pub rss_bytes_per_task: f64,
}

/// Agent `i`'s registry record, decoded as the scheduler's watch decodes it (fields this bench
/// does not set take their defaults).
fn agent(i: u32) -> anyhow::Result<AgentRecord> {
    let n = CAPABILITIES.len();
    let idx = usize::try_from(i).unwrap_or(0);
    let caps: Vec<&str> =
        [idx % n, (idx + 1) % n].into_iter().filter_map(|c| CAPABILITIES.get(c)).copied().collect();
    let runner = format!("runner-{}", i / 100);
    let rec = serde_json::json!({
        "agent_id": format!("{runner}-worker-{i}"),
        "name": "worker",
        "runner_id": runner,
        "capabilities": caps,
        "provider": "offline",
        "model": "offline-1",
        "concurrency": CONCURRENCY,
        "in_flight": 0,
        "status": "idle",
        "state": "idle",
        "started_at_ms": 0,
        "heartbeat_at_ms": 0,
        "heartbeat_interval_ms": 1000,
        "protocol_version": flotilla_protocol::PROTOCOL_VERSION,
    });
    serde_json::from_value(rec).context("failed to build a bench agent record")
}

/// The submission of task `i`: ids as the CLI generates them (UUIDs), one in ten with a context
/// key, spread over capabilities, tenants and priorities.
fn submission(i: usize) -> TaskSubmission {
    TaskSubmission {
        id: Some(uuid::Uuid::now_v7().to_string()),
        capability: CAPABILITIES.get(i % CAPABILITIES.len()).copied().unwrap_or("summarize").to_owned(),
        input: serde_json::json!({ "text": "Summarise the attached release notes in two sentences." }),
        priority: PRIORITIES.get(i % PRIORITIES.len()).copied().and_then(Priority::new),
        tenant: Some(format!("tenant-{}", (i / 7) % TENANTS)),
        context_key: i.is_multiple_of(10).then(|| format!("conversation-{}", i % 1000)),
        ..Default::default()
    }
}

/// What the scheduler's `apply_task` builds from a queued record.
fn queued(rec: &TaskRecord) -> Queued {
    Queued {
        id: Id::from(rec.id.as_str()),
        capability: Id::from(rec.capability.as_str()),
        priority: rec.priority.level(),
        tenant: Id::from(rec.tenant.as_str()),
        submitted_ms: rec.submitted_at_ms,
        eligible_ms: 0,
        context_key: rec.context_key.as_deref().map(Into::into),
        labels: (!rec.labels.is_empty()).then(|| Box::new(rec.labels.clone())),
    }
}

/// Involuntary context switches of the calling thread so far (Linux).
fn involuntary_switches() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/thread-self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("nonvoluntary_ctxt_switches:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn per_task(bytes: isize, n: usize) -> f64 {
    bytes as f64 / n.max(1) as f64
}

fn delta(after: usize, before: usize) -> isize {
    isize::try_from(after).unwrap_or(isize::MAX).saturating_sub(isize::try_from(before).unwrap_or(0))
}

/// Runs part (d). Blocking and CPU-bound: call it off the async runtime.
/// The shape of the scheduler's `TaskView` (`scheduler/projection.rs`) for a queued task:
/// revision, state, deadline, and the record kept encoded as stored.
type CachedView = (u64, flotilla_protocol::TaskState, Option<u64>, Box<[u8]>);

pub fn run(agents: u32, queued_tasks: usize, decisions: usize) -> anyhow::Result<Figures> {
    let mut core = RunQueue::new(Policy::default());
    let alive_until = Instant::now() + Duration::from_secs(24 * 3600);
    for i in 0..agents {
        core.upsert_agent(&agent(i)?, alive_until);
    }
    let now_ms = flotilla_protocol::time::now_ms();
    // The records are built first (they are the scheduler's cache), so that the core's growth can
    // be measured on its own.
    let rss0 = rss_kib(std::process::id()).map_or(0, |(rss, _)| rss);
    let cache_before = heap::live_bytes();
    let mut cache: HashMap<String, CachedView> = HashMap::new();
    for i in 0..queued_tasks {
        let sub = submission(i);
        let id = sub.id.clone().unwrap_or_default();
        // Submitted over the last ten minutes, oldest first.
        let age =
            u64::try_from(queued_tasks - i).unwrap_or(0) * 600_000 / u64::try_from(queued_tasks).unwrap_or(1);
        let rec = validate(sub, id.clone(), 200, Limits::default(), now_ms.saturating_sub(age))
            .map_err(|r| anyhow::anyhow!("bench submission rejected: {}", r.message))?;
        let encoded = flotilla_protocol::codec::encode(flotilla_protocol::WireFormat::Msgpack, &rec)
            .context("failed to encode a bench record")?;
        let view = (u64::try_from(i).unwrap_or(0), rec.state, rec.deadline_ms, Box::<[u8]>::from(encoded));
        cache.insert(id, view);
    }
    let cache_bytes = delta(heap::live_bytes(), cache_before);

    let core_before = heap::live_bytes();
    let t = Instant::now();
    for view in cache.values() {
        // As the scheduler does when it needs the record: decode the kept bytes.
        let rec: TaskRecord =
            flotilla_protocol::codec::decode(None, &view.3).context("failed to decode a bench record")?;
        core.enqueue(queued(&rec), Now::current());
    }
    let enqueue_s = t.elapsed().as_secs_f64();
    let core_bytes = delta(heap::live_bytes(), core_before);
    let rss1 = rss_kib(std::process::id()).map_or(0, |(rss, _)| rss);
    anyhow::ensure!(
        core.queued_len() == queued_tasks,
        "the core holds {} of {queued_tasks} tasks",
        core.queued_len()
    );

    // Decisions: half of all slots stay busy; each decision is followed by the end of the oldest
    // running task, so agents keep freeing up with uneven loads.
    let running = usize::try_from(agents.saturating_mul(CONCURRENCY) / 2).unwrap_or(0).max(1);
    let mut in_flight: VecDeque<Id> = VecDeque::with_capacity(running + 1);
    let mut decide_ns: Vec<f64> = Vec::with_capacity(decisions);
    let mut finish_ns: Vec<f64> = Vec::with_capacity(decisions);
    let switches_before = involuntary_switches();
    for _ in 0..decisions {
        let now = Now::current();
        let t = Instant::now();
        let d = core.next(now);
        decide_ns.push(t.elapsed().as_nanos() as f64);
        let Some(d) = d else { anyhow::bail!("the core made no decision with free agents and queued tasks") };
        in_flight.push_back(d.task);
        if in_flight.len() > running
            && let Some(done) = in_flight.pop_front()
        {
            let t = Instant::now();
            core.finish(&done, Some(1200));
            finish_ns.push(t.elapsed().as_nanos() as f64);
        }
    }
    let preempted = involuntary_switches().zip(switches_before).map_or(0, |(a, b)| a.saturating_sub(b));
    let over_1ms = decide_ns.iter().filter(|ns| **ns > 1e6).count();
    decide_ns.sort_by(f64::total_cmp);
    finish_ns.sort_by(f64::total_cmp);
    let figures = Figures {
        agents,
        queued: queued_tasks,
        decisions,
        running,
        enqueue_per_s: queued_tasks as f64 / enqueue_s.max(1e-9),
        decision_p50_us: percentile(&decide_ns, 0.5) / 1000.0,
        decision_p99_us: percentile(&decide_ns, 0.99) / 1000.0,
        decision_p999_us: percentile(&decide_ns, 0.999) / 1000.0,
        decisions_over_1ms: over_1ms,
        preempted,
        decision_max_us: decide_ns.last().copied().unwrap_or(0.0) / 1000.0,
        finish_p50_us: percentile(&finish_ns, 0.5) / 1000.0,
        core_bytes_per_task: per_task(core_bytes, queued_tasks),
        cache_bytes_per_task: per_task(cache_bytes, queued_tasks),
        cache_entry_inline_bytes: std::mem::size_of::<(String, CachedView)>(),
        rss_bytes_per_task: per_task(
            isize::try_from(rss1.saturating_sub(rss0).saturating_mul(1024)).unwrap_or(0),
            queued_tasks,
        ),
    };
    drop(core);
    drop(cache);
    Ok(figures)
}
