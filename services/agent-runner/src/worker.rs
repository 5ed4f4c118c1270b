//! Handling of one assignment: decode, fence (claim the attempt with a revision-checked update),
//! run the model with in-progress acks, record the outcome with another revision-checked update,
//! publish the lifecycle events, and only then ack. A retryable failure before the last attempt
//! queues the task again (with the attempt in its history); one on the last attempt fails it and
//! writes a dead letter. An attempt stops early when it is cancelled (`CancelTask`) or its
//! deadline passes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::Message;
use flotilla_protocol::names::{event_kind, service};
use flotilla_protocol::{
    Assignment, CallUsage, DeadLetter, ErrorInfo, TaskEvent, TaskRecord, TaskState, TransitionError, Usage,
    failure, headers, is_retryable, time::now_ms,
};
use flotilla_service::nats::{FleetError, dead_letter_of, decode_payload};
use flotilla_service::{AckGuard, Fleet, Topology};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::agent_loop::{self, LoopError};
use crate::llm::Provider;
use crate::registry::{Agents, Cancel, Slot};
use crate::tools::{Registry, ToolCtx};

/// What every handler shares.
#[derive(Debug)]
pub struct Context {
    pub fleet: Fleet,
    pub topology: Topology,
    pub agents: Arc<Agents>,
    pub runner_id: String,
    pub progress_every: Duration,
    pub max_task_time: Duration,
    /// Cancelled when the drain grace is over: give unfinished work back.
    pub abort: CancellationToken,
    /// Model provider of each template.
    pub providers: std::collections::HashMap<String, Provider>,
    pub registry: Arc<Registry>,
    /// The budget-keeper, when budgets are enforced.
    pub budgets: Option<flotilla_service::budget::Client>,
    /// The agents' direct messages.
    pub mailbox: Arc<crate::mailbox::Mailbox>,
    /// Every grant, kept current.
    pub grants: flotilla_service::follow::Grants,
    /// What agents remembered, and each template's embedder.
    pub recall: Arc<crate::recall::Index>,
    pub embedders: std::collections::HashMap<String, crate::recall::Embedder>,
    /// Each tenant's transcript retention, when set.
    pub transcript_retention: std::collections::BTreeMap<String, Duration>,
}

impl Context {
    /// What the tools of `slot`'s work on `rec` see.
    pub fn tool_ctx(
        &self,
        slot: &Slot,
        rec: &TaskRecord,
        cancel: CancellationToken,
        states: crate::lifecycle::TaskStates,
        task_cap: Option<u64>,
    ) -> ToolCtx {
        ToolCtx {
            fleet: self.fleet.clone(),
            memory: self.topology.memory.clone(),
            tasks: self.topology.tasks.clone(),
            approvals: self.topology.approvals.clone(),
            operators: self.topology.operators.clone(),
            task: rec.clone(),
            agent_id: slot.agent_id.clone(),
            runner_id: self.runner_id.clone(),
            mailbox: self.mailbox.clone(),
            party: slot.party(&self.runner_id),
            grants: self.grants.clone(),
            recall: self.recall.clone(),
            embedder: self
                .embedders
                .get(&slot.template.name)
                .cloned()
                .unwrap_or(crate::recall::Embedder::Offline),
            step: 0,
            index: 0,
            cancel,
            states,
            budgets: self.budgets.clone(),
            task_cap,
            message_id: None,
        }
    }
}

/// Handles one assignment message; never panics, never returns an error: every outcome is an
/// ack, a NAK (retry) or a TERM with a dead letter.
pub async fn handle(ctx: Arc<Context>, msg: Message) {
    let guard = AckGuard::new(msg);
    let Some(m) = guard.message() else { return };
    let a: Assignment = match decode_payload(m.headers.as_ref(), &m.payload) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "undecodable assignment");
            dead_letter(&ctx.fleet, m, e.reason.code(), &e.message).await;
            guard.term().await;
            return;
        }
    };
    let span =
        tracing::info_span!("assignment", task_id = %a.task_id, agent_id = %a.agent_id, attempt = a.attempt);
    flotilla_service::trace::continue_from(&span, m.headers.as_ref());
    handle_assignment(ctx, guard, a).instrument(span).await;
}

/// Records an assignment that cannot be worked on, with the reason and the original bytes.
async fn dead_letter(fleet: &Fleet, m: &Message, reason: &str, message: &str) {
    let dl = dead_letter_of(m, "agent-runner.assignments", reason, message);
    if let Err(e) = fleet.dead_letter(service::AGENT_RUNNER, &dl, None).await {
        tracing::error!(error = %e, "failed to write dead letter");
    }
}

/// How a claim attempt ended.
enum Claim {
    /// We own the attempt: run it from this record/revision.
    Run(TaskRecord, u64),
    /// This attempt already finished here: re-announce the outcome, then ack.
    Finished(TaskRecord),
    /// The task moved on (reassigned, finished elsewhere, unknown): ack and forget.
    Stale(&'static str),
    /// The task record cannot be read: dead-letter the assignment.
    Unreadable(String),
}

/// Marks (task, attempt) as running in this process for as long as it lives (also on panic).
struct Reservation<'a> {
    slot: &'a Slot,
    key: (String, u32),
}

impl<'a> Reservation<'a> {
    /// Reserves the attempt, or `None` if this process already works on it or the agent has left.
    fn take(slot: &'a Slot, task_id: &str, attempt: u32) -> Option<Self> {
        let key = (task_id.to_owned(), attempt);
        let inserted = slot
            .running
            .lock()
            .map(|mut r| !slot.removed.load(Ordering::SeqCst) && r.insert(key.clone()))
            .unwrap_or(false);
        inserted.then_some(Self { slot, key })
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Ok(mut r) = self.slot.running.lock() {
            r.remove(&self.key);
        }
    }
}

async fn claim(ctx: &Context, a: &Assignment) -> Result<Claim, FleetError> {
    // The assignment carries the record it was decided from and that record's revision: the
    // claim is one revision-checked write from there, naming this attempt and agent. If anything
    // wrote the record since (a cancel, an expiry, another assignment's claim), the write fails
    // and the record is read below.
    let mut rec = (*a.record).clone();
    if rec.id == a.task_id && rec.claim(a.attempt, &a.agent_id, &ctx.runner_id, now_ms()).is_ok() {
        match ctx.fleet.kv_update(&ctx.topology.tasks, &rec.id, &rec, a.revision).await {
            Ok(new_rev) => return Ok(Claim::Run(rec, new_rev)),
            Err(e) if e.is_conflict() => {}
            Err(e) => return Err(e),
        }
    }
    for _ in 0..5 {
        let (mut rec, rev) = match ctx.fleet.kv_get::<TaskRecord>(&ctx.topology.tasks, &a.task_id).await {
            Ok(Some(found)) => found,
            Ok(None) => return Ok(Claim::Stale("unknown task")),
            Err(FleetError::Decode { source, .. }) => return Ok(Claim::Unreadable(source.to_string())),
            Err(e) => return Err(e),
        };
        // Queued again by this attempt's retryable failure (the record no longer names an agent).
        if rec.retried_after(a.attempt, &a.agent_id) {
            return Ok(Claim::Finished(rec));
        }
        if !rec.is_attempt(a.attempt, &a.agent_id) {
            return Ok(Claim::Stale("task was reassigned"));
        }
        match rec.state {
            // Running but not in this process: a crashed run of ours (or another process with
            // our runner id); claim it again, so only one copy wins.
            TaskState::Running => {
                if rec.claim(a.attempt, &a.agent_id, &ctx.runner_id, now_ms()).is_err() {
                    return Ok(Claim::Stale("task was reassigned"));
                }
                match ctx.fleet.kv_update(&ctx.topology.tasks, &rec.id, &rec, rev).await {
                    Ok(new_rev) => return Ok(Claim::Run(rec, new_rev)),
                    Err(e) if e.is_conflict() => continue,
                    Err(e) => return Err(e),
                }
            }
            TaskState::Completed | TaskState::Failed => return Ok(Claim::Finished(rec)),
            TaskState::Queued => return Ok(Claim::Stale("task was requeued")),
        }
    }
    Err(FleetError::Conflict { key: a.task_id.clone() })
}

async fn handle_assignment(ctx: Arc<Context>, guard: AckGuard, a: Assignment) {
    let Some(slot) = ctx.agents.get(&a.agent_id) else {
        // Not an agent of this runner (the fleet changed): the dispatcher times the task out and
        // reassigns it.
        tracing::warn!("assignment for an agent this runner does not host");
        ctx.agents.fenced.fetch_add(1, Ordering::Relaxed);
        guard.ack().await;
        return;
    };
    if slot.in_error() {
        // The dispatcher requeues the work of an agent in error; until then, hand it back.
        guard.nak(Some(Duration::from_secs(1))).await;
        return;
    }
    let Some(_reservation) = Reservation::take(&slot, &a.task_id, a.attempt) else {
        if slot.removed.load(Ordering::SeqCst) {
            // The agent was stopped and has left the registry: the dispatcher requeues its work.
            tracing::info!("assignment for an agent that has stopped");
            ctx.agents.fenced.fetch_add(1, Ordering::Relaxed);
            guard.ack().await;
            return;
        }
        // Another delivery of this attempt is being worked on here; it will decide.
        guard.release();
        return;
    };
    // From here a `CancelTask` for this attempt stops it. The drain's abort cancels the same
    // token, but then the work is handed back rather than dropped.
    let held = ctx.agents.hold(&a.task_id, a.attempt, &a.agent_id, ctx.abort.child_token());
    // Dropped after the permit: the mailbox hears that the slot is free again.
    let _freed = ctx.mailbox.freed_on_drop();
    // Wait for a free slot while keeping the assignment alive.
    let permit = tokio::select! {
        p = guard.with_progress(ctx.progress_every, ctx.max_task_time, slot.permits.clone().acquire_owned()) => p,
        _ = held.cancel.token.cancelled() => {
            if ctx.abort.is_cancelled() {
                return; // guard drops: NAK
            }
            // The canceller has written the record final: there is nothing to run.
            tracing::info!("attempt cancelled before it started");
            ctx.agents.cancelled.fetch_add(1, Ordering::Relaxed);
            guard.ack().await;
            return;
        }
    };
    let Ok(_permit) = permit else { return };

    let (rec, rev) = match claim(&ctx, &a).await {
        Ok(Claim::Run(rec, rev)) => (rec, rev),
        Ok(Claim::Finished(rec)) => {
            if let Err(e) = announce_outcome(&ctx, &rec).await {
                tracing::warn!(error = %e, "failed to re-announce outcome; will retry");
                guard.nak(Some(Duration::from_millis(500))).await;
                return;
            }
            guard.ack().await;
            return;
        }
        Ok(Claim::Stale(why)) => {
            tracing::info!(why, "assignment fenced");
            ctx.agents.fenced.fetch_add(1, Ordering::Relaxed);
            guard.ack().await;
            return;
        }
        Ok(Claim::Unreadable(why)) => {
            tracing::error!(%why, "task record unreadable; dead-lettering the assignment");
            if let Some(m) = guard.message() {
                dead_letter(&ctx.fleet, m, "unreadable_task_record", &why).await;
            }
            guard.term().await;
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "claim failed; retrying later");
            guard.nak_with_backoff().await;
            return;
        }
    };

    slot.in_flight.fetch_add(1, Ordering::Relaxed);
    let task_id = rec.id.clone();
    let outcome = run_claimed(&ctx, &slot, &guard, rec, rev, &held.cancel).await;
    let crashed = match &outcome {
        Outcome::Crashed(why) => Some(format!("{}: {why}", flotilla_protocol::names::CRASHED_REASON)),
        _ => None,
    };
    slot.lifecycle.finish(&task_id, crashed.as_deref());
    slot.in_flight.fetch_sub(1, Ordering::Relaxed);
    match outcome {
        Outcome::Done => {
            slot.succeeded();
            // A redelivery after a lost ack is fenced.
            guard.ack().await;
        }
        Outcome::Retry(e) => {
            tracing::warn!(error = %e, "task handling failed; handing the assignment back");
            guard.nak_with_backoff().await;
        }
        Outcome::Crashed(why) => {
            let (crashes, error) = slot.crashed(&ctx.agents.recovery, &why);
            let backoff = flotilla_protocol::time::backoff(
                Duration::from_secs(1),
                crashes.saturating_sub(1),
                Duration::from_secs(32),
            );
            match error {
                Some(Some(cooldown)) => tracing::error!(
                    %why, crashes, ?cooldown,
                    "agent crashed repeatedly; it goes to ERROR and takes work again after its cool-down"
                ),
                Some(None) => tracing::error!(
                    %why, crashes, recoveries = ctx.agents.recovery.limit,
                    "agent crashed repeatedly and came back from ERROR too often; it stays in ERROR until its runner restarts"
                ),
                None => {
                    tracing::warn!(%why, crashes, ?backoff, "agent crashed; the attempt is retried after a backoff")
                }
            }
            guard.nak(Some(backoff)).await;
        }
        Outcome::Cancelled => guard.ack().await,
        Outcome::Abandoned => {
            tracing::info!("drain grace over; assignment handed back");
            guard.nak(None).await;
        }
    }
}

enum Outcome {
    Done,
    Retry(FleetError),
    Crashed(String),
    /// Stopped by a `CancelTask`: ack, the record is final.
    Cancelled,
    Abandoned,
}

/// What an attempt came to, to be written into the task record.
enum Verdict {
    Completed(agent_loop::Answer),
    /// Failed with `error`. A retryable error queues the task again while attempts remain,
    /// unless `may_retry` is false (a cancelled attempt never runs again).
    Failed {
        error: ErrorInfo,
        usage: Usage,
        calls: Vec<CallUsage>,
        may_retry: bool,
    },
}

impl Verdict {
    fn failed(code: &str, message: &str) -> Self {
        Self::Failed {
            error: ErrorInfo::new(code, message),
            usage: Usage::default(),
            calls: vec![],
            may_retry: true,
        }
    }

    /// Applies the verdict to the current record of the attempt; refused when the record no
    /// longer shows the attempt running.
    fn apply(&self, r: &mut TaskRecord, model: &str, now: u64) -> Result<(), TransitionError> {
        match self {
            Self::Completed(answer) => {
                let output =
                    serde_json::json!({ "answer": answer.text, "model": model, "steps": answer.steps });
                r.complete(output, answer.usage, answer.calls.clone(), now)
            }
            Self::Failed { error, usage, calls, may_retry } => {
                r.fail_attempt(error, *usage, calls.clone(), *may_retry, now).map(drop)
            }
        }
    }
}

/// Resolves when the deadline passes; never without one.
async fn deadline_passes(deadline_ms: Option<u64>) {
    match deadline_ms {
        Some(d) => tokio::time::sleep(Duration::from_millis(d.saturating_sub(now_ms()))).await,
        None => std::future::pending().await,
    }
}

async fn run_claimed(
    ctx: &Context,
    slot: &Slot,
    guard: &AckGuard,
    rec: TaskRecord,
    rev: u64,
    cancel: &Cancel,
) -> Outcome {
    let mut started = TaskEvent::for_task(&rec, event_kind::STARTED);
    started.runner_id = Some(ctx.runner_id.clone());
    // Its ack is awaited only before the outcome is written: the model runs meanwhile. Every
    // later event of the attempt is sent on this connection after it, so it stays first.
    let started_ack = match ctx.fleet.send_event(&started).await {
        Ok(pending) => pending,
        Err(e) => return Outcome::Retry(e),
    };
    let Some(provider) = ctx.providers.get(&slot.template.name).cloned() else {
        return Outcome::Crashed(format!("no provider for template {}", slot.template.name));
    };
    // However the attempt ends, tools still waiting (on a sub-task, a human) stop with it.
    let _stop_tools = cancel.token.clone().drop_guard();
    let states = crate::lifecycle::TaskStates::new(slot.lifecycle.clone(), rec.id.clone());
    let env = agent_loop::Env {
        states: states.clone(),
        provider,
        template: slot.template.clone(),
        registry: ctx.registry.clone(),
        tool_ctx: ctx.tool_ctx(
            slot,
            &rec,
            cancel.token.clone(),
            states,
            crate::budget::task_cap(&rec, &slot.template),
        ),
        budgets: ctx.budgets.clone().map(|client| {
            crate::budget::Budgets::for_attempt(client, &rec, rev, &slot.agent_id, &slot.template)
        }),
        report_steps: true,
        transcript: slot.template.transcripts.then(|| {
            crate::transcript::Recorder::new(
                ctx.fleet.clone(),
                &rec,
                &slot.agent_id,
                &slot.template.name,
                ctx.transcript_retention.get(&rec.tenant).copied(),
            )
        }),
    };

    let mut cancelled = false;
    let verdict = if rec.deadline_ms.is_some_and(|d| d <= now_ms()) {
        Verdict::failed(failure::DEADLINE_EXCEEDED, "the deadline passed before the task started")
    } else {
        ctx.agents.executions.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            r = guard.with_progress(ctx.progress_every, ctx.max_task_time, agent_loop::run(&env, &rec)) => match r {
                Ok(answer) => Verdict::Completed(answer),
                Err(LoopError::Failed { error, usage, calls }) => {
                    Verdict::Failed { error, usage, calls, may_retry: true }
                }
                Err(LoopError::Crashed(why)) => return Outcome::Crashed(why),
                Err(LoopError::Infrastructure(e)) => return Outcome::Retry(e),
            },
            _ = cancel.token.cancelled() => {
                if ctx.abort.is_cancelled() {
                    return Outcome::Abandoned;
                }
                cancelled = true;
                ctx.agents.cancelled.fetch_add(1, Ordering::Relaxed);
                let error = cancel.reason.get().cloned().unwrap_or_else(|| {
                    ErrorInfo::new(failure::CANCELLED, "the attempt was cancelled")
                });
                tracing::info!(code = %error.code, "attempt cancelled; stopping its work");
                // The canceller has normally written the record final already, so the write
                // below is fenced off and changes nothing; were the record still showing this
                // attempt running, the cancel's error ends it rather than leaving it stuck.
                Verdict::Failed { error, usage: Usage::default(), calls: vec![], may_retry: false }
            }
            _ = deadline_passes(rec.deadline_ms) => {
                tracing::info!("the deadline passed while the task was running; stopping its work");
                Verdict::failed(failure::DEADLINE_EXCEEDED, "the deadline passed while the task was running")
            }
        }
    };

    // The work is done by now: a lost ack of `started` must not make it run again. Publish it
    // once more (de-duplicated if it was stored) before the outcome, which follows it.
    if let Err(e) = started_ack.confirmed().await {
        tracing::warn!(error = %e, "no ack for the started event; publishing it again");
        if let Err(e) = ctx.fleet.publish_event(&started).await {
            tracing::warn!(error = %e, "the started event may be missing from the stream");
        }
    }
    let now = now_ms();
    let model = slot.template.model.clone();
    let done = if cancelled { Outcome::Cancelled } else { Outcome::Done };
    let current = match record_outcome(ctx, rec, rev, |r| verdict.apply(r, &model, now)).await {
        Ok(Some(written)) => written,
        Ok(None) => {
            if !cancelled {
                tracing::info!("result fenced: the task moved on while it ran");
                ctx.agents.fenced.fetch_add(1, Ordering::Relaxed);
            }
            return done;
        }
        Err(e) => return Outcome::Retry(e),
    };
    let counter = match current.state {
        TaskState::Completed => &ctx.agents.completed,
        TaskState::Queued => {
            tracing::info!(
                attempt = current.attempt,
                max_attempts = current.max_attempts,
                "attempt failed; the task is queued for a retry"
            );
            &ctx.agents.retried
        }
        _ => &ctx.agents.failed,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    match announce_outcome(ctx, &current).await {
        Ok(()) => done,
        Err(e) => Outcome::Retry(e),
    }
}

/// Writes the outcome of a claimed attempt, fenced by the revision of the claim. Someone else may
/// have written the record meanwhile (a delegated child is linked into it): if it still shows our
/// running attempt, the outcome is applied to the current record; otherwise it is fenced off
/// (`None`).
async fn record_outcome(
    ctx: &Context,
    rec: TaskRecord,
    rev: u64,
    apply: impl Fn(&mut TaskRecord) -> Result<(), TransitionError>,
) -> Result<Option<TaskRecord>, FleetError> {
    let (mut current, mut rev) = (rec, rev);
    loop {
        let mut next = current.clone();
        if let Err(e) = apply(&mut next) {
            tracing::info!(error = %e, "the outcome no longer applies");
            return Ok(None);
        }
        match ctx.fleet.kv_update(&ctx.topology.tasks, &next.id, &next, rev).await {
            Ok(_) => return Ok(Some(next)),
            Err(e) if e.is_conflict() => {
                match ctx.fleet.kv_get::<TaskRecord>(&ctx.topology.tasks, &current.id).await? {
                    Some((cur, cur_rev))
                        if cur.state == TaskState::Running
                            && current
                                .agent_id
                                .as_deref()
                                .is_some_and(|a| cur.is_attempt(current.attempt, a)) =>
                    {
                        current = cur;
                        rev = cur_rev;
                    }
                    _ => return Ok(None),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Publishes what a written outcome announces (idempotent: every publish is de-duplicated by id):
/// `completed`, or `failed` plus a dead letter when retries ran out, or `retrying` when the
/// attempt's failure queued the task again.
async fn announce_outcome(ctx: &Context, rec: &TaskRecord) -> Result<(), FleetError> {
    let fleet = &ctx.fleet;
    match rec.state {
        TaskState::Completed | TaskState::Failed => {
            if let Some(ev) = TaskEvent::outcome_of(rec) {
                fleet.publish_event(&ev).await?;
            }
            // The task ended: its budget closes (a carved one refunds its parent). In the
            // background: the ack must not wait on the budget-keeper (a close that is lost is
            // made by the parent's delegate tool, or by the carve's lease).
            // Only a task that had a budget of its own has one to close (a carved child always
            // has: its `budget_tokens`).
            let template =
                rec.agent_id.as_deref().and_then(|a| ctx.agents.get(a)).map(|s| s.template.clone());
            let had_budget =
                rec.budget_tokens.is_some() || template.is_none_or(|t| t.max_tokens_per_task.is_some());
            if let Some(client) = ctx.budgets.clone().filter(|_| had_budget) {
                let id = rec.id.clone();
                tokio::spawn(async move { crate::budget::close_task(&client, &id).await });
            }
            if retries_exhausted(rec) {
                dead_letter_retries(fleet, rec).await?;
            }
            Ok(())
        }
        TaskState::Queued => {
            let Some(last) = rec.attempts.last() else { return Ok(()) };
            let mut ev = TaskEvent::for_task(rec, event_kind::RETRYING);
            ev.attempt = Some(last.attempt);
            ev.agent_id = last.agent_id.clone();
            ev.runner_id = last.runner_id.clone();
            ev.error = Some(last.error.clone());
            ev.usage = last.usage;
            // What the failed attempt spent, so that a task's cost counts every attempt.
            ev.calls = last.calls.clone();
            ev.cost_usd = last.calls.iter().filter_map(|c| c.cost_usd).reduce(|a, b| a + b);
            fleet.publish_event(&ev).await
        }
        TaskState::Running => Ok(()),
    }
}

/// True when the task failed because its last attempt failed with a retryable error and no
/// attempts were left.
fn retries_exhausted(rec: &TaskRecord) -> bool {
    rec.state == TaskState::Failed
        && rec.attempt >= rec.max_attempts
        && rec.error.as_ref().is_some_and(|e| is_retryable(&e.code))
        && rec.attempts.last().is_some_and(|l| l.attempt == rec.attempt)
}

/// Dead-letters a task whose retries ran out: the record (encoded, as the payload) and every
/// attempt. De-duplicated per task.
async fn dead_letter_retries(fleet: &Fleet, rec: &TaskRecord) -> Result<(), FleetError> {
    let payload = fleet.encode(rec)?;
    let last = rec.error.as_ref().map(|e| format!("{}: {}", e.code, e.message)).unwrap_or_default();
    let dl = DeadLetter::new(
        "agent-runner.retries",
        "retries_exhausted",
        format!("all {} attempts failed; the last with {last}", rec.attempt),
        fleet.names.task_event_subject(&rec.tenant, &rec.id, event_kind::FAILED),
        &payload,
    )
    .task(rec.id.clone())
    .headers([(headers::CONTENT_TYPE.to_owned(), fleet.format.content_type().to_owned())].into())
    .attempts(rec.attempts.clone());
    tracing::warn!(attempts = rec.attempts.len(), error = %last, "retries exhausted; task dead-lettered");
    fleet.dead_letter(service::AGENT_RUNNER, &dl, Some(&format!("retries:{}", rec.id))).await
}
