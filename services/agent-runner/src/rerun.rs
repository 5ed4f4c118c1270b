//! Re-running a recorded task (`flotilla replay --rerun`): the agent loop itself
//! ([`crate::agent_loop`]) runs again with its effects answered from the task's transcript — each
//! model call by the recorded answer, each tool call by the recorded result (a [pure] tool is run
//! again and its result compared) — so nothing is called and nothing happens outside. Every step
//! is checked as it comes: the request the loop builds against the recorded request, each tool
//! call and its arguments against the recorded ones, and at the end the outcome against the
//! task's final event. The first difference stops the re-run and is reported with the stream
//! sequence of the entry it concerns. Against a live model instead, each step's request goes to
//! the model and its decisions (tool calls and arguments, or the final text) are compared with
//! the recorded ones.
//!
//! [pure]: crate::tools::Tool::replay

use std::collections::BTreeMap;
use std::sync::Mutex;

use flotilla_protocol::{AgentState, TaskRecord, TranscriptEntry, redact};
use serde::Serialize;
use serde_json::{Value, json};

use crate::agent_loop::{Called, Halt, Io, LoopError};
use crate::fleet::AgentTemplate;
use crate::llm::{ChatRequest, ChatResponse, Provider, ToolCall};
use crate::tools::Registry;

/// How a recorded task ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Completed { answer: String, steps: u32 },
    Failed { code: String, message: String },
}

/// One recorded run of a task: the task as it was given to the loop, the run's transcript
/// entries with their stream sequences, and how the task ended.
#[derive(Debug, Clone)]
pub struct Recording {
    pub task: TaskRecord,
    pub entries: Vec<(u64, TranscriptEntry)>,
    pub outcome: Option<Outcome>,
}

/// What to answer the loop's model calls with.
#[derive(Debug, Clone)]
pub enum Against {
    /// The recorded answers: no model is called.
    Recorded,
    /// A live model: each request goes to it, and its decisions are compared.
    Model(Provider),
}

/// The first difference between the recording and the re-run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Divergence {
    pub step: u32,
    /// `request` (what the loop asked the model), `decision` (what a live model answered),
    /// `tool_call`, `tool_result`, `steps`, `outcome`.
    pub what: String,
    /// The transcript entry it concerns (`<P>_TRANSCRIPTS` sequence), when there is one.
    pub seq: Option<u64>,
    pub recorded: Value,
    pub rerun: Value,
}

/// What a re-run found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub task_id: String,
    pub attempt: u32,
    pub run_id: String,
    pub template: String,
    pub steps_recorded: u32,
    pub steps_rerun: u32,
    /// Calls made to a live model (0 against the recording).
    pub model_calls: u32,
    /// Pure tools executed again.
    pub tools_executed: u32,
    /// Tool results taken from the recording.
    pub tools_recorded: u32,
    pub identical: bool,
    pub divergence: Option<Divergence>,
    /// How the re-run ended.
    pub outcome: Option<Outcome>,
    /// Why the comparison may not be exact (a truncated entry).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Debug, Default)]
struct State {
    divergence: Option<Divergence>,
    model_calls: u32,
    tools_executed: u32,
    tools_recorded: u32,
    steps: u32,
}

struct Rerun<'a> {
    recording: &'a Recording,
    models: BTreeMap<u32, (u64, &'a TranscriptEntry)>,
    tools: BTreeMap<(u32, u32), (u64, &'a TranscriptEntry)>,
    /// The last entry's key: `(step, None)` for a model call, `(step, Some(index))` for a tool.
    last: Option<(u32, Option<u32>)>,
    registry: &'a Registry,
    against: &'a Against,
    state: Mutex<State>,
}

const DIVERGED: &str = "rerun_diverged";

impl Rerun<'_> {
    fn diverge(&self, step: u32, what: &str, seq: Option<u64>, recorded: Value, rerun: Value) -> Halt {
        if let Ok(mut s) = self.state.lock()
            && s.divergence.is_none()
        {
            s.divergence = Some(Divergence { step, what: what.to_owned(), seq, recorded, rerun });
        }
        Halt::fail(DIVERGED, format!("the re-run diverged at step {step} ({what})"))
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> Option<R> {
        self.state.lock().ok().map(|mut s| f(&mut s))
    }

    /// A failure of the recorded task that came from outside the loop where the recording
    /// stops (a budget refused, a provider error, a cancel, a tool that ended the task).
    fn recorded_failure(&self) -> Option<Halt> {
        match &self.recording.outcome {
            Some(Outcome::Failed { code, message }) => Some(Halt::fail(code, message.clone())),
            _ => None,
        }
    }
}

/// Tool calls as compared: name and (redacted) arguments, in order.
fn decisions(calls: &[Value]) -> Vec<Value> {
    calls.iter().map(|c| json!({ "name": c.get("name"), "arguments": c.get("arguments") })).collect()
}

/// The first of two lists' items that differ, side by side.
fn first_difference(recorded: &[Value], rerun: &[Value]) -> (Value, Value) {
    let n = recorded.len().max(rerun.len());
    for i in 0..n {
        let (a, b) = (recorded.get(i), rerun.get(i));
        if a != b {
            return (
                json!({ "index": i, "item": a.cloned().unwrap_or(Value::Null) }),
                json!({ "index": i, "item": b.cloned().unwrap_or(Value::Null) }),
            );
        }
    }
    (Value::Null, Value::Null)
}

impl Io for Rerun<'_> {
    fn set_state(&self, _to: AgentState) {}

    async fn chat(&self, step: u32, req: &mut ChatRequest) -> Result<Called, Halt> {
        self.with(|s| s.steps = step);
        let Some(&(seq, entry)) = self.models.get(&step) else {
            let last_step = self.models.keys().next_back().copied().unwrap_or(0);
            // The recording stops here because something outside the loop ended the task.
            if step == last_step + 1
                && let Some(h) = self.recorded_failure()
            {
                return Err(h);
            }
            return Err(self.diverge(
                step,
                "steps",
                None,
                json!(format!("no model call at step {step}: the recording ends at step {last_step}")),
                json!(format!("a model call at step {step}")),
            ));
        };
        let Some(m) = &entry.model else {
            return Err(self.diverge(
                step,
                "steps",
                Some(seq),
                json!("an entry without its call"),
                Value::Null,
            ));
        };
        // The budget's cap on the answer came from the fleet: the recorded one applies.
        req.max_tokens = m.max_tokens;
        let recorded = ChatResponse {
            text: m.text.clone(),
            tool_calls: m.tool_calls.iter().map(crate::transcript::call_of).collect(),
            usage: m.usage,
            finish: crate::transcript::finish_of(&m.finish),
        };
        match self.against {
            Against::Recorded => {
                let (asked, _) = crate::transcript::exchange(&m.provider, req, &recorded, None);
                if asked.system != m.system {
                    return Err(self.diverge(
                        step,
                        "request",
                        Some(seq),
                        json!({ "system": m.system }),
                        json!({ "system": asked.system }),
                    ));
                }
                if asked.tools != m.tools {
                    return Err(self.diverge(
                        step,
                        "request",
                        Some(seq),
                        json!({ "tools": m.tools }),
                        json!({ "tools": asked.tools }),
                    ));
                }
                if asked.messages != m.messages {
                    let (a, b) = first_difference(&m.messages, &asked.messages);
                    return Err(self.diverge(
                        step,
                        "request",
                        Some(seq),
                        json!({ "message": a }),
                        json!({ "message": b }),
                    ));
                }
            }
            Against::Model(provider) => {
                let live = provider.chat(req).await.map_err(|e| Halt::fail(e.code(), e.to_string()))?;
                self.with(|s| s.model_calls += 1);
                let (answered, _) = crate::transcript::exchange(&m.provider, req, &live, None);
                let (was, now) = (decisions(&m.tool_calls), decisions(&answered.tool_calls));
                let differs = was != now || (now.is_empty() && answered.text != m.text);
                if differs {
                    return Err(self.diverge(
                        step,
                        "decision",
                        Some(seq),
                        json!({ "text": m.text, "tool_calls": was }),
                        json!({ "text": answered.text, "tool_calls": now }),
                    ));
                }
            }
        }
        Ok(Called { resp: recorded, cost: None, took_ms: m.duration_ms })
    }

    async fn answered(&self, _: u32, _: &ChatRequest, _: &Called, _: &[Value]) -> Result<(), LoopError> {
        Ok(())
    }

    async fn tool(&self, step: u32, index: usize, call: &ToolCall) -> Result<(String, bool), Halt> {
        let i = u32::try_from(index).unwrap_or(u32::MAX);
        let Some(&(seq, entry)) = self.tools.get(&(step, i)) else {
            // The recording stops inside this step's tools: the task was stopped from outside
            // (a cancel, a deadline) while its tools ran.
            let after_last =
                self.last.is_some_and(|(s, _)| s == step) && self.models.keys().next_back() == Some(&step);
            if after_last && let Some(h) = self.recorded_failure() {
                return Err(h);
            }
            let (asked, _) = crate::transcript::tool_exchange(index, call, "", false);
            return Err(self.diverge(
                step,
                "tool_call",
                None,
                json!(format!("no tool call #{index} at step {step}")),
                json!({ "name": asked.name, "arguments": asked.arguments }),
            ));
        };
        let Some(t) = &entry.tool else {
            return Err(self.diverge(
                step,
                "tool_call",
                Some(seq),
                json!("an entry without its call"),
                Value::Null,
            ));
        };
        let (asked, _) = crate::transcript::tool_exchange(index, call, "", false);
        if asked.name != t.name || asked.arguments != t.arguments {
            return Err(self.diverge(
                step,
                "tool_call",
                Some(seq),
                json!({ "name": t.name, "arguments": t.arguments }),
                json!({ "name": asked.name, "arguments": asked.arguments }),
            ));
        }
        // Arguments with a secret were recorded redacted: the recorded result stands for them.
        let redacted = t.arguments.to_string().contains(flotilla_protocol::REDACTED);
        match self.registry.replay(&call.name, &call.arguments).filter(|_| !redacted) {
            Some(result) => {
                self.with(|s| s.tools_executed += 1);
                let (content, is_error) = match result {
                    Ok(v) => (v.to_string(), false),
                    Err(e) => (format!("error: {e}"), true),
                };
                let (got, _) = crate::transcript::tool_exchange(index, call, &content, is_error);
                if got.result != t.result || got.is_error != t.is_error {
                    return Err(self.diverge(
                        step,
                        "tool_result",
                        Some(seq),
                        json!({ "tool": t.name, "result": t.result, "is_error": t.is_error }),
                        json!({ "tool": t.name, "result": got.result, "is_error": got.is_error }),
                    ));
                }
            }
            None => {
                self.with(|s| s.tools_recorded += 1);
            }
        }
        // The last entry of a run that failed: the tool's answer ended the task.
        if self.last == Some((step, Some(i)))
            && t.is_error
            && let Some(h) = self.recorded_failure()
        {
            return Err(h);
        }
        Ok((t.result.clone(), t.is_error))
    }
}

/// The template a recording was made with, as far as its entries tell: name, provider, model,
/// system prompt and tools of its first model call, as many steps as it recorded (the task
/// itself gives the token cap).
pub fn template_of(recording: &Recording) -> Result<AgentTemplate, String> {
    let first = recording
        .entries
        .iter()
        .find_map(|(_, e)| e.model.as_ref().map(|m| (e, m)))
        .ok_or_else(|| "the recording has no model call".to_owned())?;
    let (e, m) = first;
    let steps = recording.entries.iter().map(|(_, e)| e.step).max().unwrap_or(1);
    let max_call = recording.entries.iter().filter_map(|(_, e)| e.model.as_ref().map(|m| m.max_tokens)).max();
    let extra_step =
        matches!(&recording.outcome, Some(Outcome::Failed { code, .. }) if code != "max_steps_exceeded");
    serde_json::from_value(json!({
        "name": e.template,
        "capabilities": [recording.task.capability],
        "provider": m.provider,
        "model": m.model,
        "system_prompt": m.system,
        "tools": m.tools,
        "max_steps": steps + u32::from(extra_step),
        "max_tokens_per_call": max_call.unwrap_or(1024),
    }))
    .map_err(|e| format!("cannot rebuild the template: {e}"))
}

/// Re-runs a recording with `template` and the tools of `registry`, against `against`.
#[tracing::instrument(skip_all, fields(task_id = %recording.task.id))]
pub async fn rerun(
    template: &AgentTemplate,
    registry: &Registry,
    recording: &Recording,
    against: &Against,
) -> Report {
    let mut models = BTreeMap::new();
    let mut tools = BTreeMap::new();
    let mut notes = Vec::new();
    let mut last = None;
    for (seq, e) in &recording.entries {
        if e.truncated {
            notes.push(format!(
                "entry #{seq} (step {}) was cut to the size limit: it may not compare exactly",
                e.step
            ));
        }
        if e.model.is_some() {
            models.insert(e.step, (*seq, e));
            last = Some((e.step, None));
        } else if let Some(t) = &e.tool {
            tools.insert((e.step, t.index), (*seq, e));
            last = Some((e.step, Some(t.index)));
        }
    }
    let first = recording.entries.first().map(|(_, e)| e);
    let io = Rerun { recording, models, tools, last, registry, against, state: Mutex::new(State::default()) };
    // A tool this registry does not know (an embedder's own) is offered by name: requests are
    // compared by the names of the tools offered, and its results come from the recording.
    let specs = template
        .tools
        .iter()
        .map(|name| {
            registry.specs(std::slice::from_ref(name)).pop().unwrap_or_else(|| crate::llm::ToolSpec {
                name: name.clone(),
                description: String::new(),
                parameters: json!({ "type": "object" }),
            })
        })
        .collect();
    let result = crate::agent_loop::drive(&io, template, specs, &recording.task).await;
    let state = io.state.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    let outcome = match &result {
        Ok(a) => Some(Outcome::Completed { answer: a.text.clone(), steps: a.steps }),
        Err(LoopError::Failed { error, .. }) if error.code == DIVERGED => None,
        Err(LoopError::Failed { error, .. }) => {
            Some(Outcome::Failed { code: error.code.clone(), message: error.message.clone() })
        }
        Err(e) => Some(Outcome::Failed { code: "rerun_error".into(), message: format!("{e:?}") }),
    };
    let mut divergence = state.divergence;
    if divergence.is_none() {
        let steps_recorded = io.models.keys().next_back().copied().unwrap_or(0);
        let same = match (&recording.outcome, &outcome) {
            (Some(Outcome::Completed { answer: a, .. }), Some(Outcome::Completed { answer: b, steps })) => {
                a == b && *steps == steps_recorded
            }
            (Some(Outcome::Failed { code: a, .. }), Some(Outcome::Failed { code: b, .. })) => a == b,
            (None, _) => true,
            _ => false,
        };
        if !same {
            divergence = Some(Divergence {
                step: state.steps,
                what: "outcome".into(),
                seq: None,
                recorded: serde_json::to_value(&recording.outcome).unwrap_or(Value::Null),
                rerun: serde_json::to_value(&outcome).unwrap_or(Value::Null),
            });
        }
    }
    let mut redacted_divergence = divergence;
    if let Some(d) = &mut redacted_divergence {
        redact(&mut d.rerun);
    }
    Report {
        task_id: recording.task.id.clone(),
        attempt: recording.task.attempt,
        run_id: first.map(|e| e.run_id.clone()).unwrap_or_default(),
        template: template.name.clone(),
        steps_recorded: io.models.keys().next_back().copied().unwrap_or(0),
        steps_rerun: state.steps,
        model_calls: state.model_calls,
        tools_executed: state.tools_executed,
        tools_recorded: state.tools_recorded,
        identical: redacted_divergence.is_none(),
        divergence: redacted_divergence,
        outcome,
        notes,
    }
}
