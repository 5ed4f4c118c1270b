//! `flotilla-bench audit`: how fast replay and verification read a long history, next to raw
//! NATS reading the same stream in the same run. The bench writes a synthetic history of
//! `events` task events (five per task: accepted, assigned, started, progress, completed), each
//! task's record in the tasks bucket, and a reservation and commit per task in the ledger (the
//! answers computed with the budget-keeper's own fold, so the history verifies clean), then
//! measures: (a) raw: an ordered consumer reading the events stream, nothing decoded; (b)
//! `audit verify` of everything (the events, the ledger replayed, every record compared); (c) an
//! export of the whole history to nowhere; (d) the replay of one task. Rates are records per second
//! of wall time and per second of this process's CPU time (per core); the goal is at least 1,000
//! events per second per core.

use std::time::Instant;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use flotilla_audit::verify::Options;
use flotilla_audit::{Loader, Source};
use flotilla_local::ServerConfig;
use flotilla_protocol::names::event_kind;
use flotilla_protocol::{
    CallUsage, CommitRequest, LedgerChange, LedgerEntry, ReserveRequest, TaskEvent, TaskRecord, TaskState,
    Usage,
};
use flotilla_service::Mode;
use futures::StreamExt as _;
use serde_json::json;

use crate::Cli;
use crate::figures::{cpu_time, goal, progress, round, thousands};
use crate::raw::Window;

/// What to measure.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub events: usize,
}

/// One measured pass: records, wall seconds, CPU seconds of this process.
struct Pass {
    records: u64,
    wall_s: f64,
    cpu_s: f64,
}

impl Pass {
    fn per_s(&self) -> f64 {
        self.records as f64 / self.wall_s.max(1e-9)
    }
    fn per_cpu_s(&self) -> f64 {
        self.records as f64 / self.cpu_s.max(0.01)
    }
    fn json(&self) -> serde_json::Value {
        json!({
            "records": self.records,
            "wall_s": round(self.wall_s, 3),
            "cpu_s": round(self.cpu_s, 3),
            "per_s": round(self.per_s(), 0),
            "per_cpu_s": round(self.per_cpu_s(), 0),
        })
    }
}

async fn timed<F: std::future::Future<Output = anyhow::Result<u64>>>(f: F) -> anyhow::Result<Pass> {
    let (t0, c0) = (Instant::now(), cpu_time().unwrap_or_default());
    let records = f.await?;
    let cpu_s = cpu_time().unwrap_or_default().saturating_sub(c0).as_secs_f64();
    Ok(Pass { records, wall_s: t0.elapsed().as_secs_f64(), cpu_s })
}

/// Writes the synthetic history: `tasks` tasks, five events each, their records, two ledger
/// entries each.
async fn fill(
    fleet: &flotilla_service::Fleet,
    tasks_bucket: &async_nats::jetstream::kv::Store,
    tasks: usize,
) -> anyhow::Result<()> {
    let mut fold = flotilla_budget_keeper::ledger::Ledger::new(flotilla_budget_keeper::replay::REMEMBER_MS);
    let mut window = Window::new(512);
    let base = flotilla_protocol::time::now_ms().saturating_sub(3_600_000);
    for i in 0..tasks {
        let id = format!("bench-{i}");
        let t = base + u64::try_from(i).unwrap_or(0);
        let usage = Usage { prompt_tokens: 100, completion_tokens: 20, total_tokens: 120 };
        let mut rec: TaskRecord = serde_json::from_value(json!({
            "id": id, "capability": "bench", "input": { "text": id }, "state": "queued",
            "submitted_at_ms": t, "updated_at_ms": t,
        }))
        .context("a bench record")?;
        let accepted = {
            let mut e = TaskEvent::for_task(&rec, event_kind::ACCEPTED);
            e.detail = serde_json::to_value(&rec).ok();
            e
        };
        rec.attempt = 1;
        rec.agent_id = Some("bench-agent-0".into());
        rec.runner_id = Some("bench".into());
        let mut assigned = TaskEvent::for_task(&rec, event_kind::ASSIGNED);
        assigned.reason = Some("least_loaded".into());
        let started = TaskEvent::for_task(&rec, event_kind::STARTED);
        let mut progress = TaskEvent::for_task(&rec, event_kind::PROGRESS);
        progress.step = Some(1);
        rec.state = TaskState::Completed;
        rec.output = Some(json!({ "answer": format!("done {i}"), "model": "", "steps": 1 }));
        rec.usage = Some(usage);
        rec.calls = vec![CallUsage {
            step: 1,
            model: String::new(),
            usage,
            cost_usd: None,
            provider: None,
            duration_ms: Some(1),
        }];
        rec.finished_at_ms = Some(t);
        rec.updated_at_ms = t;
        let completed = TaskEvent::outcome_of(&rec).context("a completed record announces an event")?;
        for e in [accepted, assigned, started, progress, completed] {
            let subject = fleet.names.task_event_subject(&rec.tenant, &id, &e.kind);
            window
                .push(fleet.js.publish(subject, fleet.encode(&e)?).await.context("publish an event")?)
                .await?;
        }
        // The task's call under a reservation, answered by the keeper's own fold.
        let reserve = ReserveRequest {
            id: format!("{id}:1:1:1:1.1"),
            scopes: vec![format!("task.{id}"), "tenant.default".into()],
            want: 500,
            ..Default::default()
        };
        let commit = CommitRequest { id: reserve.id.clone(), used: 120, prompt_tokens: Some(100) };
        for change in [LedgerChange::Reserve(reserve), LedgerChange::Commit(commit)] {
            let mut entry = LedgerEntry { change, at_ms: t, reply: Default::default(), actor: None };
            entry.reply = flotilla_budget_keeper::replay::apply_entry(&mut fold, &entry).unwrap_or_default();
            let subject = fleet.names.ledger_subject(entry.op().as_str());
            window
                .push(
                    fleet
                        .js
                        .publish(subject, fleet.encode(&entry)?)
                        .await
                        .context("publish a ledger entry")?,
                )
                .await?;
        }
        fleet.kv_put(tasks_bucket, &id, &rec).await.context("write a record")?;
    }
    window.finish().await
}

pub async fn run(cli: &Cli, sizes: Sizes, config: ServerConfig) -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = tempfile::Builder::new().prefix("flotilla-bench-").tempdir().context("temp dir")?;
    let (local, server) = cli.fleet(dir.path(), config, Mode::Own).await?;
    let fleet = local.fleet().clone();
    let names = fleet.names.clone();
    let tasks = sizes.events.div_ceil(5).max(1);
    progress(
        started,
        &format!("writing a history of {} events, {tasks} records, {} ledger entries", tasks * 5, tasks * 2),
    );
    fill(&fleet, &local.topology().tasks, tasks).await?;
    let events = u64::try_from(tasks * 5).unwrap_or(u64::MAX);

    progress(started, "(a) raw: an ordered consumer reads the events stream");
    let raw = timed(async {
        let stream = fleet.js.get_stream_no_info(names.events_stream()).await.context("events stream")?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                name: Some(flotilla_service::nats::ordered_name()),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .context("raw consumer")?;
        let mut msgs = consumer.messages().await.context("raw read")?;
        let mut n = 0u64;
        while n < events {
            let Some(m) = msgs.next().await else { break };
            m.map_err(|e| anyhow::anyhow!("raw read: {e}"))?;
            n += 1;
        }
        Ok(n)
    })
    .await?;

    progress(started, "(b) audit verify of the whole history");
    let source = Source::Live(Box::new(fleet.clone()));
    let mut summary = None;
    let verify = timed(async {
        let opts = Options { settle_ms: 0, compare_keeper: false, ..Default::default() };
        let s = flotilla_audit::verify::verify(&source, &opts).await.map_err(|e| anyhow::anyhow!(e))?;
        let n = s.events + s.ledger_entries;
        summary = Some(s);
        Ok(n)
    })
    .await?;
    let summary = summary.context("no summary")?;
    anyhow::ensure!(
        summary.discrepancies.is_empty(),
        "the synthetic history does not verify: {:?}",
        summary.discrepancies.iter().take(3).collect::<Vec<_>>()
    );

    progress(started, "(c) export of the whole history");
    let export = timed(async {
        let sel = flotilla_audit::export::Selection::default();
        let n = flotilla_audit::export::export(&source, &sel, std::io::sink(), None, |_, _| {})
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        Ok(n)
    })
    .await?;

    progress(started, "(d) replay of one task");
    let replay_t0 = Instant::now();
    let mut loader = Loader::new(source.clone());
    let h = loader.load(&format!("bench-{}", tasks / 2), false).await.map_err(|e| anyhow::anyhow!(e))?;
    let replay_ms = replay_t0.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(h.events.len() == 5, "the replayed task has {} events", h.events.len());

    let per_core = verify.per_cpu_s().min(export.per_cpu_s());
    let met = per_core >= 1000.0;
    let report = json!({
        "bench": "audit",
        "server": server,
        "events": events,
        "records": tasks,
        "ledger_entries": tasks * 2,
        "raw_read": raw.json(),
        "verify": verify.json(),
        "export": export.json(),
        "replay_one_task_ms": round(replay_ms, 1),
        "verify_rate_vs_raw": round(verify.per_s() / raw.per_s().max(1e-9), 3),
        "export_rate_vs_raw": round(export.per_s() / raw.per_s().max(1e-9), 3),
        "goal_1000_events_per_s_per_core": met,
    });
    local.stop().await.ok();
    if cli.json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "audit: a history of {} events, {} task records, {} ledger entries; {server}",
        thousands(events as f64),
        thousands(tasks as f64),
        thousands((tasks * 2) as f64)
    );
    let line = |what: &str, p: &Pass| {
        println!(
            "  {what:<34} {:>9} records/s   {:>9} per CPU-second   ({:.2} s, {:.2} s CPU)",
            thousands(p.per_s()),
            thousands(p.per_cpu_s()),
            p.wall_s,
            p.cpu_s
        );
    };
    line("(a) raw ordered read of the events", &raw);
    line("(b) audit verify (events + ledger)", &verify);
    line("(c) export (every stream)", &export);
    println!("  (d) replay of one task (the whole ledger read): {replay_ms:.1} ms");
    println!(
        "  verify ÷ raw: {:.3}, export ÷ raw: {:.3}; per core {} records/s (goal ≥ 1,000: {})",
        verify.per_s() / raw.per_s().max(1e-9),
        export.per_s() / raw.per_s().max(1e-9),
        thousands(per_core),
        goal(met)
    );
    Ok(())
}
