//! Handling of one assignment: decode, fence (claim the attempt with a revision-checked update),
//! run the model with in-progress acks, record the outcome with another revision-checked update,
//! publish the lifecycle events, and only then ack.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::Message;
use flotilla_protocol::names::event_kind;
use flotilla_protocol::{
    Assignment, DeadLetter, ErrorInfo, TaskEvent, TaskRecord, TaskState, codec, headers, time::now_ms,
};
use flotilla_service::{AckGuard, Fleet, Topology, nats::FleetError};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::model;
use crate::registry::{Agents, Slot};

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
}

/// Handles one assignment message; never panics, never returns an error: every outcome is an
/// ack, a NAK (retry) or a TERM with a dead letter.
pub async fn handle(ctx: Arc<Context>, msg: Message) {
    let guard = AckGuard::new(msg);
    let Some(m) = guard.message() else { return };
    let ct = m.headers.as_ref().and_then(|h| h.get(headers::CONTENT_TYPE)).map(|v| v.as_str().to_owned());
    let a: Assignment = match codec::decode(ct.as_deref(), &m.payload) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "undecodable assignment");
            dead_letter(&ctx.fleet, m, e.reason.code(), &e.message).await;
            let _ = guard.term().await;
            return;
        }
    };
    let span =
        tracing::info_span!("assignment", task_id = %a.task_id, agent_id = %a.agent_id, attempt = a.attempt);
    flotilla_service::trace::continue_from(&span, m.headers.as_ref());
    handle_assignment(ctx, guard, a).instrument(span).await;
}

async fn dead_letter(fleet: &Fleet, m: &Message, reason: &str, message: &str) {
    use base64::Engine as _;
    let cut = m.payload.get(..m.payload.len().min(64 * 1024)).unwrap_or_default();
    let dl = DeadLetter {
        source: "agent-runner.assignments".to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        task_id: None,
        subject: m.subject.to_string(),
        stream_sequence: m.info().ok().map(|i| i.stream_sequence),
        payload_base64: base64::engine::general_purpose::STANDARD.encode(cut),
        payload_len: u64::try_from(m.payload.len()).unwrap_or(u64::MAX),
        headers: Default::default(),
        at_ms: now_ms(),
    };
    if let Err(e) = fleet.publish_durable(fleet.names.deadletter_subject("agent-runner"), &dl, None).await {
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
    /// This process is running the attempt now; the redelivery is ignored.
    AlreadyRunning,
}

async fn claim(ctx: &Context, slot: &Slot, a: &Assignment) -> Result<Claim, FleetError> {
    let ours = |r: &TaskRecord| r.attempt == a.attempt && r.agent_id.as_deref() == Some(a.agent_id.as_str());
    for _ in 0..5 {
        let Some((mut rec, rev)) = ctx.fleet.kv_get::<TaskRecord>(&ctx.topology.tasks, &a.task_id).await?
        else {
            return Ok(Claim::Stale("unknown task"));
        };
        if !ours(&rec) {
            return Ok(Claim::Stale("task was reassigned"));
        }
        match rec.state {
            TaskState::Assigned => {
                rec.state = TaskState::Running;
                rec.runner_id = Some(ctx.runner_id.clone());
                rec.started_at_ms = Some(now_ms());
                rec.updated_at_ms = now_ms();
                match ctx.fleet.kv_update(&ctx.topology.tasks, &rec.id, &rec, rev).await {
                    Ok(new_rev) => return Ok(Claim::Run(rec, new_rev)),
                    Err(e) if e.is_conflict() => continue,
                    Err(e) => return Err(e),
                }
            }
            TaskState::Running => {
                let live =
                    slot.running.lock().map(|r| r.contains(&(a.task_id.clone(), a.attempt))).unwrap_or(false);
                // Running our attempt but not in this process: we crashed mid-run. Run it again.
                return Ok(if live { Claim::AlreadyRunning } else { Claim::Run(rec, rev) });
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
        let _ = guard.ack().await;
        return;
    };
    let permit = tokio::select! {
        p = slot.permits.clone().acquire_owned() => p,
        _ = ctx.abort.cancelled() => return, // guard drops: NAK
    };
    let Ok(_permit) = permit else { return };

    let (rec, rev) = match claim(&ctx, &slot, &a).await {
        Ok(Claim::Run(rec, rev)) => (rec, rev),
        Ok(Claim::Finished(rec)) => {
            if let Err(e) = announce_outcome(&ctx.fleet, &rec).await {
                tracing::warn!(error = %e, "failed to re-announce outcome; will retry");
                let _ = guard.nak(Some(Duration::from_millis(500))).await;
                return;
            }
            let _ = guard.ack().await;
            return;
        }
        Ok(Claim::Stale(why)) => {
            tracing::info!(why, "assignment fenced");
            ctx.agents.fenced.fetch_add(1, Ordering::Relaxed);
            let _ = guard.ack().await;
            return;
        }
        Ok(Claim::AlreadyRunning) => {
            // Leave the message to the handler that runs it; it acks when done.
            guard.release();
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "claim failed; retrying later");
            let _ = guard.nak(Some(Duration::from_millis(500))).await;
            return;
        }
    };

    let key = (a.task_id.clone(), a.attempt);
    if let Ok(mut r) = slot.running.lock() {
        r.insert(key.clone());
    }
    slot.in_flight.fetch_add(1, Ordering::Relaxed);
    let outcome = run_claimed(&ctx, &slot, &guard, rec, rev).await;
    slot.in_flight.fetch_sub(1, Ordering::Relaxed);
    if let Ok(mut r) = slot.running.lock() {
        r.remove(&key);
    }
    match outcome {
        Outcome::Done => {
            if let Err(e) = guard.ack().await {
                tracing::warn!(error = %e, "ack failed; a redelivery will be fenced");
            }
        }
        Outcome::Retry(e) => {
            tracing::warn!(error = %e, "task handling failed; handing the assignment back");
            let _ = guard.nak(Some(Duration::from_millis(500))).await;
        }
        Outcome::Abandoned => {
            tracing::info!("drain grace over; assignment handed back");
            let _ = guard.nak(None).await;
        }
    }
}

enum Outcome {
    Done,
    Retry(FleetError),
    Abandoned,
}

async fn run_claimed(
    ctx: &Context,
    slot: &Slot,
    guard: &AckGuard,
    mut rec: TaskRecord,
    mut rev: u64,
) -> Outcome {
    let mut started = TaskEvent::for_task(&rec, event_kind::STARTED);
    started.runner_id = Some(ctx.runner_id.clone());
    if let Err(e) = ctx.fleet.publish_event(&started).await {
        return Outcome::Retry(e);
    }

    let result = if rec.deadline_ms.is_some_and(|d| d <= now_ms()) {
        Err(ErrorInfo::new("deadline_exceeded", "the deadline passed before the task started"))
    } else {
        ctx.agents.executions.fetch_add(1, Ordering::Relaxed);
        let t = &slot.template;
        let work = model::offline(&t.name, &t.system_prompt, &rec.capability, &rec.input);
        let work = guard.with_progress(ctx.progress_every, ctx.max_task_time, work);
        tokio::select! {
            r = work => r.map_err(|e| ErrorInfo::new("model_error", e.to_string())),
            _ = ctx.abort.cancelled() => return Outcome::Abandoned,
        }
    };

    let now = now_ms();
    match result {
        Ok(answer) => {
            rec.state = TaskState::Completed;
            rec.output = Some(answer.output);
            rec.usage = Some(answer.usage);
        }
        Err(err) => {
            rec.state = TaskState::Failed;
            rec.error = Some(err);
        }
    }
    rec.finished_at_ms = Some(now);
    rec.updated_at_ms = now;

    // Record the outcome, fenced by the revision of our claim.
    loop {
        match ctx.fleet.kv_update(&ctx.topology.tasks, &rec.id, &rec, rev).await {
            Ok(_) => break,
            Err(e) if e.is_conflict() => {
                // Someone else wrote the task. Only if it is still our running attempt may we
                // try again; otherwise our result is fenced off.
                match ctx.fleet.kv_get::<TaskRecord>(&ctx.topology.tasks, &rec.id).await {
                    Ok(Some((cur, cur_rev)))
                        if cur.state == TaskState::Running
                            && cur.attempt == rec.attempt
                            && cur.agent_id == rec.agent_id =>
                    {
                        rev = cur_rev;
                    }
                    Ok(_) => {
                        tracing::info!("result fenced: the task moved on while it ran");
                        ctx.agents.fenced.fetch_add(1, Ordering::Relaxed);
                        return Outcome::Done;
                    }
                    Err(e) => return Outcome::Retry(e),
                }
            }
            Err(e) => return Outcome::Retry(e),
        }
    }
    if rec.state == TaskState::Completed {
        ctx.agents.completed.fetch_add(1, Ordering::Relaxed);
    } else {
        ctx.agents.failed.fetch_add(1, Ordering::Relaxed);
    }
    match announce_outcome(&ctx.fleet, &rec).await {
        Ok(()) => Outcome::Done,
        Err(e) => Outcome::Retry(e),
    }
}

/// Publishes the terminal event of a finished task (idempotent: de-duplicated by id).
async fn announce_outcome(fleet: &Fleet, rec: &TaskRecord) -> Result<(), FleetError> {
    let kind = if rec.state == TaskState::Completed { event_kind::COMPLETED } else { event_kind::FAILED };
    let mut ev = TaskEvent::for_task(rec, kind);
    ev.output = rec.output.clone();
    ev.usage = rec.usage;
    ev.error = rec.error.clone();
    fleet.publish_event(&ev).await
}
