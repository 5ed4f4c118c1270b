//! What a re-run needs from a task's history: the recording of its last run
//! ([`flotilla_agent_runner::rerun::Recording`]), built from the streams or an export.

use flotilla_agent_runner::rerun::{Outcome, Recording};
use flotilla_protocol::TranscriptEntry;
use flotilla_protocol::names::event_kind;
use serde_json::Value;

use crate::TaskHistory;

/// The recording of a history's last run: the task as it was given to the loop, the run's
/// entries and how the task ended. `None` when nothing was recorded.
pub fn recording(h: &TaskHistory) -> Option<Recording> {
    let entries: Vec<(u64, TranscriptEntry)> =
        h.last_run().into_iter().map(|s| (s.seq, s.item.clone())).collect();
    let attempt = entries.first().map(|(_, e)| e.attempt)?;
    let mut task = h.task()?.clone();
    task.attempt = attempt;
    let outcome = h.final_event().map(|f| match f.item.kind.as_str() {
        event_kind::COMPLETED => {
            let out = f.item.output.clone().unwrap_or(Value::Null);
            Outcome::Completed {
                answer: out.get("answer").and_then(Value::as_str).unwrap_or_default().to_owned(),
                steps: out
                    .get("steps")
                    .and_then(Value::as_u64)
                    .and_then(|s| u32::try_from(s).ok())
                    .unwrap_or(0),
            }
        }
        _ => {
            let e = f.item.error.clone();
            Outcome::Failed {
                code: e.as_ref().map(|e| e.code.clone()).unwrap_or_default(),
                message: e.map(|e| e.message).unwrap_or_default(),
            }
        }
    });
    Some(Recording { task, entries, outcome })
}
