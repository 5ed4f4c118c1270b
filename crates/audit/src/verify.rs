//! `flotilla audit verify`: rebuilds every task from the event stream and checks it — against
//! the lifecycle rules (one `accepted`, attempts that only increase, at most one final event and
//! one for a finished record, children ended before their parent completed, budget commits equal
//! to the usage the task reported), against its record in the tasks bucket, and its reservations
//! against the ledger — then replays the whole ledger with the budget-keeper's own fold, checking
//! every recorded answer and comparing the resulting budgets with the live keeper's, and checks
//! that the audited streams have no gaps and still deny deletes. Each finding is a
//! [`Discrepancy`] naming the task, scope or stream record it concerns.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_protocol::names::event_kind;
use flotilla_protocol::{LedgerChange, TaskEvent, TaskRecord, TaskState, TranscriptEntry};
use futures::StreamExt as _;
use serde::Serialize;

use crate::AuditError;
use crate::history::{Ledger, Stored, is_final};
use crate::source::{Kind, Source, Window};

/// Failure codes of a task stopped from outside its loop.
const STOPPED: [&str; 3] = ["cancelled", "deadline_exceeded", "deadlock"];

/// One thing that does not hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Discrepancy {
    /// `lifecycle`, `record`, `usage`, `ledger`, `budget`, `stream`.
    pub kind: String,
    pub task: Option<String>,
    /// The stream record it concerns, as `<stream>#<seq>`.
    pub at: Option<String>,
    pub detail: String,
}

/// What verifying found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub tasks: u64,
    pub finished: u64,
    pub in_flight: u64,
    /// Tasks whose record is no longer in the bucket (expired): checked from the events only.
    pub records_gone: u64,
    pub events: u64,
    pub transcript_entries: u64,
    pub ledger_entries: u64,
    pub scopes_compared: u64,
    /// Tokens charged for calls that were interrupted (a cancel, a deadline, a crash) and that
    /// no task reports as usage.
    pub interrupted_charges: u64,
    pub discrepancies: Vec<Discrepancy>,
    pub took_ms: u64,
}

/// What to verify.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Tasks accepted in this window.
    pub window: Window,
    pub tenant: Option<String>,
    /// Tasks with anything stored in the last `settle_ms` are in flight: not compared with
    /// their records yet.
    pub settle_ms: u64,
    /// Compare the replayed budgets with the live budget-keeper's.
    pub compare_keeper: bool,
    /// The history holds part of the ledger only (an export of a window or a tenant): the
    /// ledger's replay, its holes and the tasks' charges cannot be checked.
    pub partial_ledger: bool,
}

struct Task {
    events: Vec<Stored<TaskEvent>>,
    transcript: Vec<Stored<TranscriptEntry>>,
}

fn d(kind: &str, task: Option<&str>, at: Option<String>, detail: String) -> Discrepancy {
    Discrepancy { kind: kind.to_owned(), task: task.map(str::to_owned), at, detail }
}

/// Verifies the fleet's history from `source` (live: also the records, the keeper and the
/// streams' settings).
#[tracing::instrument(skip_all)]
pub async fn verify(source: &Source, opts: &Options) -> Result<Summary, AuditError> {
    let started = std::time::Instant::now();
    let names = source.names().clone();
    let mut s = Summary::default();
    let filters = match &opts.tenant {
        Some(t) => vec![names.tenant_task_events(t)],
        None => vec![names.task_events_all()],
    };
    let events = source.read(Kind::Events, &filters, Window::default()).await?;
    let transcripts = source.read(Kind::Transcripts, &[], Window::default()).await?;
    let ledger_records = source.read(Kind::Ledger, &[], Window::default()).await?;
    s.events = events.len() as u64;
    s.transcript_entries = transcripts.len() as u64;
    s.ledger_entries = ledger_records.len() as u64;

    let mut tasks: BTreeMap<String, Task> = BTreeMap::new();
    for r in &events {
        if let Some(e) = Stored::<TaskEvent>::of(r) {
            tasks
                .entry(e.item.task_id.clone())
                .or_insert_with(|| Task { events: Vec::new(), transcript: Vec::new() })
                .events
                .push(e);
        }
    }
    for r in &transcripts {
        if let Some(t) = Stored::<TranscriptEntry>::of(r)
            && let Some(task) = tasks.get_mut(&t.item.task_id)
        {
            task.transcript.push(t);
        }
    }
    // Tasks in scope: accepted in the window.
    let in_scope: BTreeSet<String> = tasks
        .iter()
        .filter(|(_, t)| {
            t.events.iter().any(|e| {
                (e.item.kind == event_kind::ACCEPTED || e.item.kind == event_kind::REJECTED)
                    && opts.window.contains(e.time_ms)
            })
        })
        .map(|(id, _)| id.clone())
        .collect();
    let ledger = Ledger::of(&ledger_records);
    let now = flotilla_protocol::time::now_ms();

    let records = match source.fleet() {
        Some(f) => Some(
            f.js.get_key_value(names.tasks_bucket())
                .await
                .map_err(|e| AuditError::Nats(format!("opening the tasks bucket: {e}")))?,
        ),
        None => None,
    };
    // The ledger's answers as the fold gives them, and the budgets after it.
    let (replayed_ok, keeper_ledger) = if opts.partial_ledger {
        (vec![true; ledger.entries.len()], flotilla_budget_keeper::ledger::Ledger::new(0))
    } else {
        replay_ledger(&ledger, &mut s)
    };
    let charged = committed_by_task(&ledger, &replayed_ok, &mut s);

    // Children by parent, from the accepted events.
    let mut children: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (cid, c) in &tasks {
        let parent = c
            .events
            .iter()
            .find(|e| e.item.kind == event_kind::ACCEPTED)
            .and_then(|e| e.item.detail.as_ref())
            .and_then(|d| d.get("parent_id"))
            .and_then(|p| p.as_str());
        if let Some(p) = parent {
            children.entry(p).or_default().push(cid);
        }
    }
    let mut to_compare: Vec<&str> = Vec::new();
    for id in &in_scope {
        let Some(t) = tasks.get(id) else { continue };
        s.tasks += 1;
        let last_activity = t
            .events
            .iter()
            .map(|e| e.time_ms)
            .chain(t.transcript.iter().map(|e| e.time_ms))
            .max()
            .unwrap_or(0);
        let settled = now.saturating_sub(last_activity) >= opts.settle_ms;
        let kids = children.get(id.as_str()).map(Vec::as_slice).unwrap_or_default();
        check_lifecycle(id, t, kids, &tasks, &mut s.discrepancies);
        let final_event = t.events.iter().find(|e| is_final(&e.item.kind));
        if final_event.is_some() {
            s.finished += 1;
        }
        if !settled {
            s.in_flight += 1;
            continue;
        }
        if final_event.is_some() && !opts.partial_ledger {
            check_usage(id, t, charged.get(id), &mut s.discrepancies);
        }
        to_compare.push(id);
    }
    // The records, read many at a time.
    if let (Some(store), Some(fleet)) = (&records, source.fleet()) {
        let mut read = futures::stream::iter(to_compare)
            .map(|id| async move { (id, fleet.kv_get::<TaskRecord>(store, id).await) })
            .buffered(64);
        while let Some((id, got)) = read.next().await {
            let Some(t) = tasks.get(id) else { continue };
            let rejected = t.events.iter().any(|e| e.item.kind == event_kind::REJECTED);
            match got {
                Ok(Some((rec, _))) => check_record(id, t, &rec, &mut s.discrepancies),
                Ok(None) if rejected => {}
                Ok(None) => s.records_gone += 1,
                Err(e) => s.discrepancies.push(d(
                    "record",
                    Some(id),
                    None,
                    format!("the record cannot be read: {e}"),
                )),
            }
        }
    }
    if let Some(fleet) = source.fleet() {
        if opts.compare_keeper {
            compare_keeper(fleet, keeper_ledger, &mut s).await;
        }
        check_streams(fleet, &mut s).await;
    }
    if !opts.partial_ledger {
        check_ledger_gaps(&ledger, &mut s);
    }
    s.took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok(s)
}

/// The lifecycle rules of one task's events.
fn check_lifecycle(
    id: &str,
    t: &Task,
    kids: &[&str],
    tasks: &BTreeMap<String, Task>,
    out: &mut Vec<Discrepancy>,
) {
    let at = |e: &Stored<TaskEvent>| Some(format!("{}#{}", e.stream, e.seq));
    let accepted: Vec<_> = t.events.iter().filter(|e| e.item.kind == event_kind::ACCEPTED).collect();
    let rejected = t.events.iter().filter(|e| e.item.kind == event_kind::REJECTED).count();
    if accepted.len() != 1 && rejected == 0 {
        out.push(d(
            "lifecycle",
            Some(id),
            t.events.first().and_then(at),
            format!("{} `accepted` events (one expected)", accepted.len()),
        ));
    }
    if let (Some(a), Some(first)) = (accepted.first(), t.events.first())
        && first.seq != a.seq
    {
        out.push(d(
            "lifecycle",
            Some(id),
            at(first),
            format!("`{}` stored before the task's `accepted`", first.item.kind),
        ));
    }
    let finals: Vec<_> = t.events.iter().filter(|e| is_final(&e.item.kind)).collect();
    if finals.len() > 1 {
        let list: Vec<String> = finals.iter().map(|e| format!("{} #{}", e.item.kind, e.seq)).collect();
        out.push(d(
            "lifecycle",
            Some(id),
            finals.get(1).and_then(|e| at(e)),
            format!("{} final events: {}", finals.len(), list.join(", ")),
        ));
    }
    // Attempts only increase: each `assigned` names a later attempt than any assigned before,
    // and a `started` is of the latest assigned attempt or an earlier one being finished.
    let mut assigned = 0u32;
    for e in &t.events {
        let Some(n) = e.item.attempt else { continue };
        match e.item.kind.as_str() {
            event_kind::ASSIGNED => {
                if n < assigned {
                    out.push(d(
                        "lifecycle",
                        Some(id),
                        at(e),
                        format!("attempt {n} assigned after attempt {assigned}"),
                    ));
                }
                assigned = assigned.max(n);
            }
            event_kind::STARTED if n > assigned && assigned > 0 => {
                out.push(d(
                    "lifecycle",
                    Some(id),
                    at(e),
                    format!("attempt {n} started, but only attempt {assigned} was assigned"),
                ));
            }
            _ => {}
        }
    }
    // Children ended before their parent completed.
    if let Some(done) = t.events.iter().find(|e| e.item.kind == event_kind::COMPLETED) {
        for cid in kids {
            let Some(c) = tasks.get(*cid) else { continue };
            match c.events.iter().find(|e| is_final(&e.item.kind)) {
                Some(f) if f.seq < done.seq => {}
                Some(f) => out.push(d(
                    "lifecycle",
                    Some(id),
                    at(done),
                    format!("completed before its child {cid} ended (#{})", f.seq),
                )),
                None => out.push(d(
                    "lifecycle",
                    Some(id),
                    at(done),
                    format!("completed while its child {cid} never ended"),
                )),
            }
        }
    }
}

/// The record against what the events say.
fn check_record(id: &str, t: &Task, rec: &TaskRecord, out: &mut Vec<Discrepancy>) {
    let final_event = t.events.iter().rev().find(|e| is_final(&e.item.kind));
    let at = final_event.map(|e| format!("{}#{}", e.stream, e.seq));
    let mut say = |what: String| out.push(d("record", Some(id), at.clone(), what));
    match final_event {
        Some(f) if f.item.kind == event_kind::COMPLETED => {
            if rec.state != TaskState::Completed {
                say(format!("the events say completed, the record says {}", rec.state));
            } else if rec.output != f.item.output {
                say(format!(
                    "the record's output {} is not the completed event's {}",
                    crate::story::short(&rec.output.clone().unwrap_or_default().to_string(), 120),
                    crate::story::short(&f.item.output.clone().unwrap_or_default().to_string(), 120)
                ));
            }
            if rec.state == TaskState::Completed && f.item.usage.is_some() && rec.usage != f.item.usage {
                say(format!(
                    "the record's usage {:?} is not the completed event's {:?}",
                    rec.usage, f.item.usage
                ));
            }
            if rec.state == TaskState::Completed && f.item.attempt.is_some_and(|a| a != rec.attempt) {
                say(format!(
                    "the record ended at attempt {}, the events at {:?}",
                    rec.attempt, f.item.attempt
                ));
            }
        }
        Some(f) => {
            let code = f.item.error.as_ref().map(|e| e.code.as_str());
            if rec.state != TaskState::Failed {
                say(format!("the events say failed, the record says {}", rec.state));
            } else if rec.error.as_ref().map(|e| e.code.as_str()) != code {
                say(format!(
                    "the record failed with {:?}, the events with {code:?}",
                    rec.error.as_ref().map(|e| &e.code)
                ));
            }
        }
        None => {
            if matches!(rec.state, TaskState::Completed | TaskState::Failed) {
                say(format!("the record says {}, but no final event is stored", rec.state));
            }
        }
    }
}

/// The usage a task reported: its final attempt's calls, every failed attempt's (`retrying`),
/// and the model calls of runs that crashed before they could report (recorded in the
/// transcript, superseded by a later run of the same attempt).
fn reported_usage(t: &Task) -> (u64, bool) {
    let mut total = 0u64;
    for e in &t.events {
        if is_final(&e.item.kind) || e.item.kind == event_kind::RETRYING {
            total += e.item.calls.iter().map(|c| c.usage.total_tokens).sum::<u64>();
        }
    }
    // Runs per attempt, in order; all but the last of an attempt crashed.
    let mut runs: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    for x in &t.transcript {
        let v = runs.entry(x.item.attempt).or_default();
        if !v.contains(&x.item.run_id.as_str()) {
            v.push(&x.item.run_id);
        }
    }
    let mut crashed = false;
    for (attempt, list) in &runs {
        for run in list.iter().take(list.len().saturating_sub(1)) {
            crashed = true;
            total += t
                .transcript
                .iter()
                .filter(|x| x.item.attempt == *attempt && x.item.run_id == *run)
                .filter_map(|x| x.item.model.as_ref())
                .map(|m| m.usage.total_tokens)
                .sum::<u64>();
        }
    }
    // A lost runner's attempt (requeued) may have made calls nothing reported; so may an attempt
    // stopped from outside (a cancel, a deadline, a deadlock's victim), whose `failed` carries no
    // calls.
    crashed |= t.events.iter().any(|e| {
        e.item.kind == event_kind::REQUEUED
            || (e.item.kind == event_kind::FAILED
                && e.item.error.as_ref().is_some_and(|x| STOPPED.contains(&x.code.as_str())))
    });
    (total, crashed)
}

/// Budget commits against reported usage.
fn check_usage(id: &str, t: &Task, committed: Option<&(u64, u64)>, out: &mut Vec<Discrepancy>) {
    let Some(&(committed, commits)) = committed else { return };
    if commits == 0 {
        return;
    }
    let (reported, crashed) = reported_usage(t);
    // A run that was lost may have been charged for a call before its transcript entry was
    // stored: more charged than reported is then expected, less never.
    let ok = if crashed { committed >= reported } else { committed == reported };
    if !ok {
        out.push(d(
            "usage",
            Some(id),
            None,
            format!(
                "the ledger charged {committed} tokens in {commits} commit(s), the task reported {reported}"
            ),
        ));
    }
}

/// Replays the whole ledger with the keeper's fold: every recorded answer must be the one the
/// fold gives. Returns which entries' replayed answers succeeded, and the ledger after them.
fn replay_ledger(ledger: &Ledger, s: &mut Summary) -> (Vec<bool>, flotilla_budget_keeper::ledger::Ledger) {
    let mut fold = flotilla_budget_keeper::ledger::Ledger::new(flotilla_budget_keeper::replay::REMEMBER_MS);
    let mut ok = Vec::with_capacity(ledger.entries.len());
    for e in &ledger.entries {
        match flotilla_budget_keeper::replay::apply_entry(&mut fold, &e.item) {
            Some(reply) => {
                ok.push(reply.error.is_none());
                if reply != e.item.reply {
                    let recorded = serde_json::to_string(&e.item.reply).unwrap_or_default();
                    let replayed = serde_json::to_string(&reply).unwrap_or_default();
                    s.discrepancies.push(d(
                        "ledger",
                        None,
                        Some(format!("{}#{}", e.stream, e.seq)),
                        format!(
                            "{} entry's recorded answer {} is not what replaying the ledger gives: {}",
                            e.item.op().as_str(),
                            crate::story::short(&recorded, 160),
                            crate::story::short(&replayed, 160)
                        ),
                    ));
                }
            }
            None => ok.push(true),
        }
    }
    (ok, fold)
}

/// Tokens committed per task (by successful commits, interrupted charges left out) and the number
/// of commits.
fn committed_by_task(ledger: &Ledger, ok: &[bool], s: &mut Summary) -> BTreeMap<String, (u64, u64)> {
    let mut grants: BTreeMap<&str, u64> = BTreeMap::new();
    let mut committed: BTreeSet<&str> = BTreeSet::new();
    let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for ((e, tasks), ok) in ledger.entries.iter().zip(&ledger.tasks).zip(ok) {
        match &e.item.change {
            LedgerChange::Reserve(r) => {
                if let Some(t) = e.item.reply.tokens {
                    grants.insert(&r.id, t);
                }
            }
            // A reservation is charged once: a commit asked again gets the first answer and
            // charges nothing more.
            LedgerChange::Commit(c) if *ok && committed.insert(c.id.as_str()) => {
                // A call interrupted mid-way is charged its whole grant with no prompt tokens.
                if c.prompt_tokens == Some(0) && grants.get(c.id.as_str()) == Some(&c.used) {
                    s.interrupted_charges += c.used;
                    continue;
                }
                for t in tasks {
                    let v = out.entry(t.clone()).or_default();
                    v.0 += c.used;
                    v.1 += 1;
                }
            }
            _ => {}
        }
    }
    out
}

/// The replayed budgets against the live keeper's (`budget.show` of each scope).
async fn compare_keeper(
    fleet: &flotilla_service::Fleet,
    mut fold: flotilla_budget_keeper::ledger::Ledger,
    s: &mut Summary,
) {
    let client = flotilla_service::budget::Client::new(fleet.clone());
    let mut scopes: Vec<String> = fold.scopes().map(str::to_owned).collect();
    scopes.sort();
    for scope in scopes {
        let now = flotilla_protocol::time::now_ms();
        let Some(mine) = flotilla_budget_keeper::apply::status(&mut fold, &scope, now) else { continue };
        let req = flotilla_protocol::ShowRequest { scope: Some(scope.clone()), ..Default::default() };
        match client.call(&req).await {
            Ok(reply) => {
                s.scopes_compared += 1;
                let Some(live) = reply.budget else { continue };
                let same = live.used == mine.used
                    && live.held == mine.held
                    && live.limit_tokens == mine.limit_tokens
                    && (live.cost_usd - mine.cost_usd).abs() < 1e-9;
                if !same {
                    s.discrepancies.push(d(
                        "budget",
                        scope.strip_prefix("task.").map(str::to_owned).as_deref(),
                        None,
                        format!(
                            "scope {scope}: the keeper has used {} held {} limit {:?} ${:.6}, the ledger gives used {} held {} limit {:?} ${:.6}",
                            live.used, live.held, live.limit_tokens, live.cost_usd, mine.used, mine.held, mine.limit_tokens, mine.cost_usd
                        ),
                    ));
                }
            }
            // Forgotten by the keeper (closed long enough ago) while the fold still has it.
            Err(e) if e.code() == "unknown_scope" => {}
            Err(e) => {
                s.discrepancies.push(d(
                    "budget",
                    None,
                    None,
                    format!("the budget-keeper cannot be asked about {scope}: {e}"),
                ));
                return;
            }
        }
    }
}

/// Sequences of the ledger (kept whole) follow one another.
fn check_ledger_gaps(ledger: &Ledger, s: &mut Summary) {
    let mut prev: Option<u64> = None;
    for e in &ledger.entries {
        if let Some(p) = prev
            && e.seq != p.saturating_add(1)
        {
            s.discrepancies.push(d(
                "stream",
                None,
                Some(format!("{}#{}", e.stream, e.seq)),
                format!(
                    "entries {}–{} of the ledger are missing",
                    p.saturating_add(1),
                    e.seq.saturating_sub(1)
                ),
            ));
        }
        prev = Some(e.seq);
    }
}

/// The audited streams deny deletes and have no holes.
async fn check_streams(fleet: &flotilla_service::Fleet, s: &mut Summary) {
    let n = &fleet.names;
    for (stream, purge_too, holes_matter) in [
        (n.events_stream(), false, true),
        (n.ledger_stream(), true, true),
        // Transcripts expire per message (each tenant's retention): holes are expected.
        (n.transcripts_stream(), false, false),
    ] {
        let info = match fleet.js.get_stream(&stream).await {
            Ok(mut st) => match st.info().await {
                Ok(i) => i.clone(),
                Err(e) => {
                    s.discrepancies.push(d(
                        "stream",
                        None,
                        None,
                        format!("{stream}: cannot read its state: {e}"),
                    ));
                    continue;
                }
            },
            Err(e) => {
                s.discrepancies.push(d("stream", None, None, format!("{stream}: cannot open it: {e}")));
                continue;
            }
        };
        if !info.config.deny_delete {
            s.discrepancies.push(d("stream", None, None, format!("{stream} allows deleting messages")));
        }
        if purge_too && !info.config.deny_purge {
            s.discrepancies.push(d("stream", None, None, format!("{stream} allows purging")));
        }
        if holes_matter && info.state.deleted_count.unwrap_or(0) > 0 {
            s.discrepancies.push(d(
                "stream",
                None,
                None,
                format!(
                    "{stream} has {} deleted message(s) inside it",
                    info.state.deleted_count.unwrap_or(0)
                ),
            ));
        }
    }
}
