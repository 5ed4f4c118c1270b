//! Records a task's transcript ([`flotilla_protocol::TranscriptEntry`]): each model call's
//! request and response and each tool call's arguments and result, stored in the transcripts
//! stream before the agent loop acts on them, so a run can be replayed and re-run from the
//! streams. Texts are cut to [`flotilla_protocol::MAX_FIELD_BYTES`] with a marker and secrets are
//! redacted before anything leaves the runner; a template with `transcripts = false` records
//! nothing; each tenant's entries carry its retention as a per-message TTL.

use std::time::Duration;

use flotilla_protocol::{
    ModelExchange, TaskRecord, ToolExchange, TranscriptEntry, redact, redact_text, time::now_ms,
    transcript_kind, truncate, truncate_value,
};
use flotilla_service::Fleet;
use flotilla_service::nats::FleetError;
use serde_json::{Value, json};

use crate::llm::{ChatRequest, ChatResponse, Finish, ToolCall, Turn};

/// The header that gives a message its own time to live (nats-server 2.11+).
const TTL_HEADER: &str = "Nats-TTL";

/// Writes one run's transcript entries.
#[derive(Debug, Clone)]
pub struct Recorder {
    fleet: Fleet,
    /// The tenant's retention, when it is shorter than the stream's.
    ttl: Option<Duration>,
    base: TranscriptEntry,
    /// The conversation's turns as recorded so far (redacted and cut once each).
    turns: std::sync::Arc<std::sync::Mutex<Vec<(Value, bool)>>>,
}

impl Recorder {
    /// A recorder of the run `run_id` of `rec`'s current attempt on `agent_id` (template
    /// `template`), keeping entries for `ttl` when given.
    pub fn new(
        fleet: Fleet,
        rec: &TaskRecord,
        agent_id: &str,
        template: &str,
        ttl: Option<Duration>,
    ) -> Self {
        let base = TranscriptEntry {
            task_id: rec.id.clone(),
            tenant: rec.tenant.clone(),
            attempt: rec.attempt,
            run_id: uuid::Uuid::now_v7().simple().to_string(),
            agent_id: agent_id.to_owned(),
            template: template.to_owned(),
            ..Default::default()
        };
        Self { fleet, ttl, base, turns: Default::default() }
    }

    /// Records a model call of `step` that answered.
    pub async fn model(
        &self,
        step: u32,
        provider: &str,
        req: &ChatRequest,
        resp: &ChatResponse,
        duration_ms: Option<u64>,
    ) -> Result<(), FleetError> {
        let (exchange, cut) = match self.turns.lock() {
            Ok(mut turns) => exchange_with(provider, req, resp, duration_ms, &mut turns),
            Err(_) => exchange(provider, req, resp, duration_ms),
        };
        let entry = TranscriptEntry {
            step,
            kind: transcript_kind::MODEL.to_owned(),
            model: Some(exchange),
            truncated: cut,
            ..self.base.clone()
        };
        self.record(entry, transcript_kind::MODEL.to_owned()).await
    }

    /// Records tool call `index` of `step` and what it returned.
    pub async fn tool(
        &self,
        step: u32,
        index: usize,
        call: &ToolCall,
        result: &str,
        is_error: bool,
    ) -> Result<(), FleetError> {
        let (exchange, cut) = tool_exchange(index, call, result, is_error);
        let entry = TranscriptEntry {
            step,
            kind: transcript_kind::TOOL.to_owned(),
            tool: Some(exchange),
            truncated: cut,
            ..self.base.clone()
        };
        self.record(entry, format!("{}-{index}", transcript_kind::TOOL)).await
    }

    #[tracing::instrument(name = "transcript", skip_all, fields(step = entry.step, kind = %kind))]
    async fn record(&self, mut entry: TranscriptEntry, kind: String) -> Result<(), FleetError> {
        entry.at_ms = now_ms();
        let b = &self.base;
        let subject = self.fleet.names.transcript_subject(
            &b.tenant,
            &b.task_id,
            &b.attempt.to_string(),
            &entry.step.to_string(),
            &kind,
        );
        // A publish sent again (its ack lost) is stored once; another run writes its own.
        let id = format!("{}.{}.{}.{}.{kind}", b.task_id, b.attempt, b.run_id, entry.step);
        let mut headers = self.fleet.headers(Some(&id));
        if let Some(ttl) = self.ttl {
            headers.insert(TTL_HEADER, format!("{}s", ttl.as_secs().max(1)).as_str());
        }
        let payload = self.fleet.encode(&entry)?;
        self.fleet.send_with_headers(subject, headers, payload).await?.confirmed().await
    }
}

/// A model call as its transcript entry holds it (redacted and cut), and whether anything was cut.
pub(crate) fn exchange(
    provider: &str,
    req: &ChatRequest,
    resp: &ChatResponse,
    duration_ms: Option<u64>,
) -> (ModelExchange, bool) {
    exchange_with(provider, req, resp, duration_ms, &mut Vec::new())
}

/// [`exchange`], with the turns already made recordable by an earlier call of the same
/// conversation in `turns` (each turn is redacted and cut once, when it is added).
fn exchange_with(
    provider: &str,
    req: &ChatRequest,
    resp: &ChatResponse,
    duration_ms: Option<u64>,
    turns: &mut Vec<(Value, bool)>,
) -> (ModelExchange, bool) {
    let mut cut = false;
    let mut system = req.system.clone();
    cut |= truncate(&mut system);
    if turns.len() > req.turns.len() {
        turns.clear();
    }
    for t in req.turns.iter().skip(turns.len()) {
        let mut v = turn_json(t);
        redact(&mut v);
        let c = truncate_value(&mut v);
        turns.push((v, c));
    }
    cut |= turns.iter().any(|(_, c)| *c);
    let messages: Vec<Value> = turns.iter().map(|(v, _)| v.clone()).collect();
    let mut text = resp.text.clone();
    cut |= truncate(&mut text);
    let mut tool_calls: Vec<Value> = resp.tool_calls.iter().map(call_json).collect();
    for v in tool_calls.iter_mut() {
        redact(v);
        cut |= truncate_value(v);
    }
    let exchange = ModelExchange {
        provider: provider.to_owned(),
        model: req.model.clone(),
        system,
        messages,
        tools: req.tools.iter().map(|t| t.name.clone()).collect(),
        max_tokens: req.max_tokens,
        text,
        tool_calls,
        usage: resp.usage,
        finish: finish_name(&resp.finish).to_owned(),
        duration_ms,
    };
    (exchange, cut)
}

/// A tool call as its transcript entry holds it (redacted and cut), and whether anything was cut.
pub(crate) fn tool_exchange(
    index: usize,
    call: &ToolCall,
    result: &str,
    is_error: bool,
) -> (ToolExchange, bool) {
    let mut arguments = arguments_json(call);
    redact(&mut arguments);
    let mut cut = truncate_value(&mut arguments);
    let mut result = result.to_owned();
    redact_text(&mut result);
    cut |= truncate(&mut result);
    let exchange = ToolExchange {
        index: u32::try_from(index).unwrap_or(u32::MAX),
        call_id: call.id.clone(),
        name: call.name.clone(),
        arguments,
        result,
        is_error,
    };
    (exchange, cut)
}

/// A tool call's arguments as JSON: the object, or the text that did not parse as one.
fn arguments_json(c: &ToolCall) -> Value {
    match &c.arguments {
        Ok(v) => v.clone(),
        Err(raw) => Value::String(raw.clone()),
    }
}

/// A recorded tool call back as the model's (`{"id", "name", "arguments"}`; arguments that are
/// a string were text that did not parse as a JSON object).
pub(crate) fn call_of(v: &Value) -> ToolCall {
    let text = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
    let arguments = match v.get("arguments") {
        Some(Value::String(raw)) => Err(raw.clone()),
        Some(a) => Ok(a.clone()),
        None => Ok(Value::Object(Default::default())),
    };
    ToolCall { id: text("id"), name: text("name"), arguments }
}

/// A recorded finish reason back as the provider's.
pub(crate) fn finish_of(name: &str) -> Finish {
    match name {
        "stop" => Finish::Stop,
        "tool_calls" => Finish::ToolCalls,
        "length" => Finish::Length,
        _ => Finish::Other,
    }
}

fn finish_name(f: &Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::ToolCalls => "tool_calls",
        Finish::Length => "length",
        Finish::Other => "other",
    }
}

fn call_json(c: &ToolCall) -> Value {
    json!({ "id": c.id, "name": c.name, "arguments": arguments_json(c) })
}

/// One turn as a provider-neutral message.
fn turn_json(t: &Turn) -> Value {
    match t {
        Turn::User(text) => {
            let mut text = text.clone();
            redact_text(&mut text);
            json!({ "role": "user", "content": text })
        }
        Turn::Assistant { text, tool_calls } => json!({
            "role": "assistant",
            "content": text,
            "tool_calls": tool_calls.iter().map(call_json).collect::<Vec<_>>(),
        }),
        Turn::ToolResult { call_id, name, content, is_error } => {
            let mut content = content.clone();
            redact_text(&mut content);
            json!({ "role": "tool", "tool_call_id": call_id, "name": name, "content": content, "is_error": is_error })
        }
    }
}
