//! What a re-run needs from a task's history: the recording of its last run
//! ([`flotilla_agent_runner::rerun::Recording`]), built from the streams or an export, and the
//! re-run of a task and its children with the agent runner's own loop.

use std::path::PathBuf;
use std::time::Duration;

use flotilla_agent_runner::rerun::{Against, Outcome, Recording};
use flotilla_agent_runner::{FleetFile, llm, tools::Registry};
use flotilla_protocol::TranscriptEntry;
use flotilla_protocol::names::event_kind;
use serde_json::Value;

use crate::{AuditError, TaskHistory};

pub use flotilla_agent_runner::rerun::{Divergence, Report};

/// The recording of a history's last run: the task as it was given to the loop, the run's
/// entries and how the task ended. `None` when nothing was recorded.
pub fn recording(h: &TaskHistory) -> Option<Recording> {
    let entries: Vec<(u64, TranscriptEntry)> =
        h.last_run().into_iter().map(|s| (s.seq, s.item.clone())).collect();
    let attempt = entries.first().map(|(_, e)| e.attempt)?;
    let mut task = h.task()?.clone();
    task.attempt = attempt;
    // How this attempt ended: its final event, or the `retrying` that closed it.
    let of_attempt = |kinds: &[&str]| {
        h.events
            .iter()
            .rev()
            .find(|e| e.item.attempt == Some(attempt) && kinds.contains(&e.item.kind.as_str()))
    };
    let ended = of_attempt(&[event_kind::COMPLETED, event_kind::FAILED])
        .or_else(|| of_attempt(&[event_kind::RETRYING]))
        .or_else(|| h.final_event().filter(|f| f.item.attempt.is_none()));
    let outcome = ended.map(|f| match f.item.kind.as_str() {
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

/// How to re-run.
#[derive(Debug, Clone, Default)]
pub struct RerunOptions {
    /// Ask this OpenAI-compatible server (`…/v1`) instead of taking the recorded answers.
    pub model_url: Option<String>,
    /// The model to ask there (default: the recorded one).
    pub model_name: Option<String>,
    /// Take the template from this fleet file instead of rebuilding it from the recording.
    pub fleet_file: Option<PathBuf>,
    /// The template's name in it (default: the recorded one).
    pub template: Option<String>,
}

/// Re-runs a task and its children (those loaded with it), with the built-in tools. Returns the
/// reports and the tasks that had nothing recorded.
pub async fn rerun_tree(
    h: &TaskHistory,
    opts: &RerunOptions,
) -> Result<(Vec<Report>, Vec<String>), AuditError> {
    let registry = Registry::with_builtins().map_err(|e| AuditError::Invalid(e.to_string()))?;
    let fleet = match &opts.fleet_file {
        Some(p) => Some(FleetFile::load(p).map_err(|e| AuditError::Invalid(format!("{e:#}")))?),
        None => None,
    };
    let against = match &opts.model_url {
        Some(url) => {
            let http = llm::http_client().map_err(|e| AuditError::Invalid(e.to_string()))?;
            let settings = llm::HttpSettings {
                base_url: url.clone(),
                api_key: llm::Secret::new(std::env::var("OPENAI_API_KEY").unwrap_or_default()),
                timeout: Duration::from_secs(120),
                retry: llm::RetryPolicy::default(),
            };
            Against::Model(llm::Provider::OpenAi(llm::openai::Client::new(http, settings)))
        }
        None => Against::Recorded,
    };
    let (mut out, mut skipped) = (Vec::new(), Vec::new());
    let mut todo = vec![h];
    while let Some(t) = todo.pop() {
        todo.extend(t.children.iter().rev());
        let Some(rec) = recording(t) else {
            skipped.push(t.task_id.clone());
            continue;
        };
        let recorded = flotilla_agent_runner::rerun::template_of(&rec)
            .map_err(|e| AuditError::Invalid(format!("task {}: {e}", t.task_id)))?;
        let mut template = match &fleet {
            Some(f) => {
                let name = opts.template.clone().unwrap_or_else(|| recorded.name.clone());
                let mut chosen =
                    f.agents.iter().find(|a| a.name == name).cloned().ok_or_else(|| {
                        AuditError::Invalid(format!("the fleet file has no template {name:?}"))
                    })?;
                chosen.max_steps = chosen.max_steps.max(recorded.max_steps);
                chosen
            }
            None => recorded,
        };
        if let Some(m) = &opts.model_name {
            template.model = m.clone();
        }
        out.push(flotilla_agent_runner::rerun::rerun(&template, &registry, &rec, &against).await);
    }
    Ok((out, skipped))
}
