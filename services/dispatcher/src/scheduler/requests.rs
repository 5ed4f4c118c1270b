//! The requests only the active dispatcher answers: the queue report (`<p>.dispatcher.queue`,
//! `flotilla queue`) and cancelling a task (`<p>.dispatcher.cancel`, `flotilla cancel`, or one
//! JSON request from any NATS client). Cancelling writes the record `failed` with code
//! `cancelled` ([`flotilla_protocol::TaskRecord::cancel`], revision-checked, so it never
//! overwrites an outcome that lands first), publishes `failed` with the id a runner would give
//! it, and tells the runner of a running attempt to stop it. Answers go out in the request's own
//! format.

use std::sync::Arc;

use flotilla_protocol::names::event_kind;
use flotilla_protocol::{
    CancelReply, CancelRequest, ErrorInfo, QueueRequest, TaskEvent, TaskRecord, TaskState,
    cancel_code as code, codec, failure, time::now_ms,
};
use flotilla_service::Fleet;
use flotilla_service::nats::{FleetError, content_type, decode_request};
use flotilla_service::topology::Topology;
use tokio::sync::Semaphore;
use tracing::Instrument as _;

use super::Scheduler;
use super::housekeeping::tell_runner_to_stop;
use crate::runqueue::Now;

/// Cancels worked on at once; more are answered `unavailable`.
pub(super) const CANCELS_AT_ONCE: usize = 64;

/// Lost revision races after which a cancel gives up (and says so).
const TRIES: usize = 5;

impl Scheduler {
    /// Answers `flotilla queue`: a [`QueueRequest`] (an empty body: the defaults) → a
    /// `QueueReport`.
    #[tracing::instrument(skip_all)]
    pub(super) async fn answer_queue_request(&mut self, req: &async_nats::Message) {
        let asked = if req.payload.is_empty() {
            QueueRequest::default()
        } else {
            match decode_request::<QueueRequest>(req.headers.as_ref(), &req.payload) {
                Ok(q) => q,
                Err(e) => {
                    tracing::info!(error = %e, "unreadable queue request; answering with the defaults");
                    QueueRequest::default()
                }
            }
        };
        let limit = asked.limit.map_or(20, |n| usize::try_from(n).unwrap_or(20).min(1000));
        let mut report = self.queue.report(limit, Now::current());
        report.dispatcher.clone_from(&self.fleet.instance);
        self.fleet.respond(req, &report).await;
    }

    /// Answers a cancel request, beside the loop (its writes are revision-checked like every
    /// other; the watch brings the result back into the schedule), at most [`CANCELS_AT_ONCE`]
    /// at a time.
    pub(super) async fn answer_cancel_request(&self, req: async_nats::Message, cancels: &Arc<Semaphore>) {
        let Ok(permit) = cancels.clone().try_acquire_owned() else {
            let busy = refused(code::UNAVAILABLE, "too many cancels at once; ask again");
            return self.fleet.respond(&req, &busy).await;
        };
        let (fleet, topology) = (self.fleet.clone(), self.topology.clone());
        let span = tracing::info_span!("cancel", task_id = tracing::field::Empty);
        flotilla_service::trace::continue_from(&span, req.headers.as_ref());
        tokio::spawn(
            async move {
                let ct = content_type(req.headers.as_ref());
                let reply = match codec::decode_strict::<CancelRequest>(ct, &req.payload) {
                    Ok(r) => {
                        tracing::Span::current().record("task_id", r.task_id.as_str());
                        // Who asked: an operator's verified signature, or the refusal.
                        match flotilla_service::attest::request_actor(&fleet, &topology.operators, &req).await
                        {
                            Ok(actor) => cancel(&fleet, &topology, &r, &actor).await,
                            Err(why) => {
                                let by = format!("dispatcher {}", fleet.instance);
                                flotilla_service::attest::publish_refusal(
                                    &fleet,
                                    "cancel",
                                    Some(&r.task_id),
                                    &why,
                                    &by,
                                )
                                .await;
                                refused(code::UNAUTHORIZED, format!("{}: {}", why.reason, why.message))
                            }
                        }
                    }
                    Err(e) => refused(e.reason.code(), e.message),
                };
                fleet.respond(&req, &reply).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
}

fn refused(code: &str, message: impl Into<String>) -> CancelReply {
    CancelReply { error: Some(ErrorInfo::new(code, message)), ..Default::default() }
}

/// Cancels a child task whose parent failed or was cancelled (attributed to the dispatcher).
#[tracing::instrument(skip(fleet, topology))]
pub(super) async fn cancel_child(fleet: Fleet, topology: Topology, task_id: String, reason: String) {
    let req = CancelRequest { task_id, reason: Some(reason) };
    let reply = cancel(&fleet, &topology, &req, "dispatcher").await;
    if let Some(e) = reply.error.filter(|e| e.code != code::ALREADY_FINISHED) {
        tracing::warn!(code = %e.code, error = %e.message, "failed to cancel a child task");
    }
}

/// Breaks a deadlock the monitor raised (`<p>.events.alert.deadlock`, firing, with a victim):
/// fails the victim with code `deadlock`, as a cancel does (its children are cancelled in turn,
/// and its runner told to stop). A repeated alert finds the task failed already.
#[tracing::instrument(skip_all, fields(victim = tracing::field::Empty, key = tracing::field::Empty))]
pub(super) async fn break_deadlock(fleet: Fleet, topology: Topology, msg: async_nats::Message) {
    let ct = content_type(msg.headers.as_ref());
    let alert = match codec::decode::<flotilla_protocol::AlertEvent>(ct, &msg.payload) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "unreadable deadlock alert ignored");
            return;
        }
    };
    let Some(d) = alert.deadlock.filter(|_| alert.state == "firing") else { return };
    let Some(victim) = d.victim.clone() else { return };
    let span = tracing::Span::current();
    span.record("victim", victim.as_str());
    span.record("key", alert.key.as_str());
    let reason = format!(
        "failed to break a deadlock (the youngest waiter of {} tasks: {})",
        d.tasks.len(),
        d.tasks.join(", ")
    );
    let error = ErrorInfo::new(failure::DEADLOCK, reason);
    let reply = end_task(&fleet, &topology, &victim, error, "monitor").await;
    match reply.error {
        None => tracing::warn!("deadlock broken: its youngest waiter failed"),
        Some(e) if e.code == code::ALREADY_FINISHED => {}
        Some(e) => tracing::warn!(code = %e.code, error = %e.message, "failed to break a deadlock"),
    }
}

/// Cancels the task `req` names, if it has not finished.
async fn cancel(fleet: &Fleet, topology: &Topology, req: &CancelRequest, actor: &str) -> CancelReply {
    let default_reason = format!("cancelled by {actor}");
    let error = ErrorInfo::new(failure::CANCELLED, req.reason.as_deref().unwrap_or(&default_reason));
    end_task(fleet, topology, &req.task_id, error, actor).await
}

/// Fails task `id` with `error` (a cancel, or a deadlock broken), if it has not finished.
async fn end_task(
    fleet: &Fleet,
    topology: &Topology,
    id: &str,
    error: ErrorInfo,
    actor: &str,
) -> CancelReply {
    let unavailable = |e: FleetError| refused(code::UNAVAILABLE, format!("failed to cancel task {id}: {e}"));
    for _ in 0..TRIES {
        let (mut rec, rev) = match fleet.kv_get::<TaskRecord>(&topology.tasks, id).await {
            Ok(Some(found)) => found,
            Ok(None) => return refused(code::NOT_FOUND, format!("no task {id}")),
            Err(e) => return unavailable(e),
        };
        let was = match rec.cancel(&error, now_ms()) {
            Ok(was) => was,
            // Cancelled already (this request asked again, or another answer came first):
            // what the asker wanted holds.
            Err(_) if rec.error.as_ref().is_some_and(|e| e.code == error.code) => {
                return CancelReply {
                    record: Some(Box::new(rec)),
                    was: Some(TaskState::Failed),
                    error: None,
                };
            }
            Err(_) => {
                let detail =
                    rec.error.as_ref().map(|e| format!(" ({}: {})", e.code, e.message)).unwrap_or_default();
                let message = format!("task {id} is already {}{detail}; nothing to cancel", rec.state);
                return refused(code::ALREADY_FINISHED, message);
            }
        };
        match fleet.kv_update(&topology.tasks, id, &rec, rev).await {
            Ok(_) => {}
            Err(e) if e.is_conflict() => continue,
            Err(e) => return unavailable(e),
        }
        tracing::info!(task_id = id, was = %was, "task cancelled");
        // The same event (and id) a runner would publish for this attempt, so copies de-duplicate.
        let mut ev = TaskEvent::for_task(&rec, event_kind::FAILED);
        ev.error = rec.error.clone();
        ev.actor = Some(actor.to_owned());
        if let Err(e) = fleet.publish_event(&ev).await {
            // The record is final either way; a reader of the stream misses the event.
            tracing::warn!(task_id = id, error = %e, "failed to publish the failed event of a cancelled task");
        }
        if was == TaskState::Running
            && let Some(runner) = rec.runner_id.as_deref()
        {
            tell_runner_to_stop(fleet, runner, id, rec.attempt, error.clone()).await;
        }
        return CancelReply { record: Some(Box::new(rec)), was: Some(was), error: None };
    }
    refused(code::UNAVAILABLE, format!("task {id} kept changing; try again"))
}
