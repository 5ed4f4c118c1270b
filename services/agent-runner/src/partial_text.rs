//! Partial text of a streaming model call, published as `progress` events so a client can follow
//! a long answer live. Pieces are gathered and sent at most once per interval, plus a last event
//! when the call ends, so a fast model does not fill the events stream. The events are
//! informational: a failed publish is logged and the task goes on.

use std::time::Duration;

use flotilla_protocol::names::event_kind;
use flotilla_protocol::{TaskEvent, TaskRecord};
use flotilla_service::Fleet;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;

/// Publishes the pieces arriving on `pieces` as partial-text events of `step` until every sender
/// is gone, then the rest. Each event carries the text since the previous one (`text_delta`)
/// and its number from 1 (`text_seq`), which also makes its `Nats-Msg-Id` unique and the same
/// on a re-publish. Returns how many events it published.
#[tracing::instrument(skip_all, fields(task_id = %rec.id, attempt = rec.attempt, step = step))]
pub async fn publish(
    fleet: &Fleet,
    rec: &TaskRecord,
    step: u32,
    interval: Duration,
    mut pieces: UnboundedReceiver<String>,
) -> u32 {
    let mut pending = String::new();
    let mut seq = 0u32;
    // The first piece goes out at once; later ones wait for the interval.
    let mut next_at = Instant::now();
    loop {
        tokio::select! {
            piece = pieces.recv() => match piece {
                Some(p) => pending.push_str(&p),
                None => break,
            },
            () = tokio::time::sleep_until(next_at), if !pending.is_empty() => {
                seq = seq.saturating_add(1);
                emit(fleet, rec, step, seq, std::mem::take(&mut pending)).await;
                next_at = Instant::now() + interval;
            }
        }
    }
    if !pending.is_empty() {
        seq = seq.saturating_add(1);
        emit(fleet, rec, step, seq, pending).await;
    }
    seq
}

async fn emit(fleet: &Fleet, rec: &TaskRecord, step: u32, seq: u32, text: String) {
    let mut ev = TaskEvent::for_task(rec, event_kind::PROGRESS);
    ev.step = Some(step);
    ev.text_seq = Some(seq);
    ev.text_delta = Some(text);
    if let Err(e) = fleet.publish_event(&ev).await {
        // The step's own progress event still carries the whole text.
        tracing::warn!(seq, error = %e, "failed to publish partial text; continuing");
    }
}
