//! The agent loop: plan (a model call with the system prompt, the task input and the tool
//! results so far), execute the tool calls the model chose, repeat until a final answer or the
//! step limit. Every step is published as a `progress` event; with a streaming provider, the text
//! of each model call is also published while it arrives (throttled `progress` events with
//! `text_delta`), before the step's own event. Usage is counted per call. Tool calls run on their
//! own tokio task, so a panicking tool fails the attempt, not the runner.

use std::sync::Arc;
use std::time::Duration;

use flotilla_protocol::names::event_kind;
use flotilla_protocol::{AgentState, CallUsage, ErrorInfo, TaskEvent, TaskRecord, Usage};
use serde_json::{Value, json};

use crate::fleet::AgentTemplate;
use crate::lifecycle::TaskStates;
use crate::llm::{ChatRequest, Provider, TextSink, Turn, input_text};
use crate::tools::{Registry, ToolCtx};

/// What the loop needs.
#[derive(Debug, Clone)]
pub struct Env {
    pub provider: Provider,
    pub template: Arc<AgentTemplate>,
    pub registry: Arc<Registry>,
    /// Base context of tool calls (step and index are filled in per call).
    pub tool_ctx: ToolCtx,
    /// Where the agent's state for this task is moved.
    pub states: TaskStates,
    /// Budgets of the calls (absent when the runner does not enforce budgets).
    pub budgets: Option<crate::budget::Budgets>,
    /// Publish each step as a task `progress` event (off for work on a direct message, which
    /// belongs to no task of its own).
    pub report_steps: bool,
    /// Where the task's transcript is recorded (absent: not recorded).
    pub transcript: Option<crate::transcript::Recorder>,
}

/// A finished loop.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub text: String,
    pub steps: u32,
    pub usage: Usage,
    pub calls: Vec<CallUsage>,
}

/// Why the loop did not produce an answer.
#[derive(Debug)]
pub enum LoopError {
    /// The task fails with this error (usage so far attached).
    Failed { error: ErrorInfo, usage: Usage, calls: Vec<CallUsage> },
    /// A tool panicked: the attempt is retried (supervision decides how).
    Crashed(String),
    /// Publishing progress failed: retry the attempt later.
    Infrastructure(flotilla_service::nats::FleetError),
}

/// What one step's model call came to.
#[derive(Debug)]
pub(crate) struct Called {
    pub resp: crate::llm::ChatResponse,
    /// What it cost (priced by the budget-keeper).
    pub cost: Option<f64>,
    pub took_ms: Option<u64>,
}

/// Why a step ends the loop.
#[derive(Debug)]
pub(crate) enum Halt {
    /// The task fails with `code`; `extra` is a call that ran and is counted although the loop
    /// did not get its answer.
    Fail { code: String, message: String, extra: Option<CallUsage> },
    /// The loop stops without a verdict.
    Stop(LoopError),
}

impl Halt {
    pub(crate) fn fail(code: &str, message: impl Into<String>) -> Self {
        Self::Fail { code: code.to_owned(), message: message.into(), extra: None }
    }
}

/// What the loop does outside itself: the model calls, the tool calls, the reports of a step
/// and the agent's state. The live loop ([`Live`]) calls the provider under budgets and runs the
/// tools; a re-run (`crate::rerun`) answers from a recorded transcript.
pub(crate) trait Io {
    fn set_state(&self, to: AgentState);
    /// The model call of `step`; `req.max_tokens` may be lowered by the call's budget.
    async fn chat(&self, step: u32, req: &mut ChatRequest) -> Result<Called, Halt>;
    /// The call of `step` answered (what it answered is stored before anything acts on it).
    async fn answered(
        &self,
        step: u32,
        req: &ChatRequest,
        called: &Called,
        previous_results: &[Value],
    ) -> Result<(), LoopError>;
    /// Tool call `index` of `step`: its result and whether it is an error.
    async fn tool(
        &self,
        step: u32,
        index: usize,
        call: &crate::llm::ToolCall,
    ) -> Result<(String, bool), Halt>;
}

/// Runs the loop for one claimed task: an `invoke_agent {template}` span (OpenTelemetry GenAI
/// conventions) holding a `chat {model}` span per model call and an `execute_tool {tool}` span
/// per tool call.
#[tracing::instrument(
    name = "invoke_agent",
    skip_all,
    fields(
        otel.name = %format!("invoke_agent {}", env.template.name),
        gen_ai.operation.name = "invoke_agent",
        gen_ai.agent.name = %env.template.name,
        gen_ai.agent.id = %env.tool_ctx.agent_id,
        task_id = %rec.id,
    )
)]
pub async fn run(env: &Env, rec: &TaskRecord) -> Result<Answer, LoopError> {
    let tools = env.registry.specs(&env.template.tools);
    drive(&Live { env, rec }, &env.template, tools, rec).await
}

/// The loop itself: plan, act, repeat, with every effect through `io`.
pub(crate) async fn drive(
    io: &impl Io,
    t: &AgentTemplate,
    tools: Vec<crate::llm::ToolSpec>,
    rec: &TaskRecord,
) -> Result<Answer, LoopError> {
    let cap = rec.budget_tokens.or(t.max_tokens_per_task);
    let mut turns = vec![Turn::User(input_text(&rec.input))];
    let mut usage = Usage::default();
    let mut calls: Vec<CallUsage> = Vec::new();
    let mut previous_results: Vec<Value> = Vec::new();
    let fail = |code: &str, message: String, usage: Usage, calls: Vec<CallUsage>| LoopError::Failed {
        error: ErrorInfo::new(code, message),
        usage,
        calls,
    };
    for step in 1..=t.max_steps {
        io.set_state(AgentState::Planning);
        let remaining = cap.map(|c| c.saturating_sub(usage.total_tokens));
        if remaining == Some(0) {
            let msg = format!("the task's token cap of {} is used up", cap.unwrap_or_default());
            return Err(fail("budget_exceeded", msg, usage, calls));
        }
        let max_tokens = remaining.map_or(t.max_tokens_per_call, |r| {
            u32::try_from(r).unwrap_or(u32::MAX).min(t.max_tokens_per_call)
        });
        let mut req = ChatRequest {
            model: t.model.clone(),
            system: t.system_prompt.clone(),
            turns: turns.clone(),
            tools: tools.clone(),
            max_tokens,
            purpose: rec.capability.clone(),
            attempt: rec.attempt,
            single_try: false,
        };
        let called = match io.chat(step, &mut req).await {
            Ok(c) => c,
            Err(Halt::Stop(e)) => return Err(e),
            Err(Halt::Fail { code, message, extra }) => {
                if let Some(c) = extra {
                    usage.add(c.usage);
                    calls.push(c);
                }
                return Err(fail(&code, message, usage, calls));
            }
        };
        usage.add(called.resp.usage);
        calls.push(CallUsage {
            step,
            model: t.model.clone(),
            usage: called.resp.usage,
            cost_usd: called.cost,
            provider: Some(t.provider.to_string()),
            duration_ms: called.took_ms,
        });
        io.answered(step, &req, &called, &previous_results).await?;
        let resp = called.resp;
        if resp.tool_calls.is_empty() {
            io.set_state(AgentState::Idle);
            return Ok(Answer { text: resp.text, steps: step, usage, calls });
        }
        io.set_state(AgentState::Executing);
        turns.push(Turn::Assistant { text: resp.text.clone(), tool_calls: resp.tool_calls.clone() });
        previous_results = Vec::new();
        for (index, call) in resp.tool_calls.into_iter().enumerate() {
            let (content, is_error) = match io.tool(step, index, &call).await {
                Ok(r) => r,
                Err(Halt::Stop(e)) => return Err(e),
                Err(Halt::Fail { code, message, .. }) => {
                    io.set_state(AgentState::Idle);
                    return Err(fail(&code, message, usage, calls));
                }
            };
            previous_results.push(json!({ "name": call.name, "content": content, "is_error": is_error }));
            turns.push(Turn::ToolResult { call_id: call.id, name: call.name, content, is_error });
        }
    }
    let msg = format!("no final answer within {} steps", t.max_steps);
    Err(fail("max_steps_exceeded", msg, usage, calls))
}

/// The loop's effects on a live fleet: the provider under the task's budgets, the tools of the
/// registry, the transcript and the task's `progress` events.
struct Live<'a> {
    env: &'a Env,
    rec: &'a TaskRecord,
}

impl Io for Live<'_> {
    fn set_state(&self, to: AgentState) {
        self.env.states.set(to);
    }

    async fn chat(&self, step: u32, req: &mut ChatRequest) -> Result<Called, Halt> {
        let (env, rec) = (self.env, self.rec);
        let t = &env.template;
        req.single_try = env.budgets.is_some();
        let max_tokens = req.max_tokens;
        let mut try_n = 0u32;
        loop {
            try_n += 1;
            let held = match &env.budgets {
                None => None,
                Some(b) => match b.reserve(t, req, step, try_n, &env.tool_ctx.cancel).await {
                    Ok((held, completion)) => {
                        req.max_tokens = max_tokens.min(completion);
                        Some(held)
                    }
                    Err(crate::budget::Denied::Fail(e)) => {
                        env.states.set(AgentState::Idle);
                        return Err(Halt::fail(&e.code, e.message));
                    }
                    Err(crate::budget::Denied::Cancelled) => {
                        return Err(Halt::fail("cancelled", "cancelled while waiting for the budget"));
                    }
                },
            };
            // Dropped mid-call (cancel, deadline, abort), the reservation charges its grant.
            let in_flight = match (&env.budgets, held) {
                (Some(b), Some(h)) => Some(crate::budget::InFlight::new(b, h)),
                _ => None,
            };
            // The offline provider has one model, named after it.
            let model = if t.model.is_empty() { t.provider.as_str() } else { t.model.as_str() };
            let span = tracing::info_span!(
                "chat",
                otel.name = %format!("chat {model}"),
                gen_ai.operation.name = "chat",
                gen_ai.provider.name = %t.provider,
                gen_ai.request.model = %model,
                gen_ai.request.max_tokens = req.max_tokens,
                gen_ai.usage.input_tokens = tracing::field::Empty,
                gen_ai.usage.output_tokens = tracing::field::Empty,
                error.type = tracing::field::Empty,
                step,
            );
            let started = std::time::Instant::now();
            let result = tracing::Instrument::instrument(call(env, rec, step, req), span.clone()).await;
            let took_ms = Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
            match &result {
                Ok(r) => {
                    span.record("gen_ai.usage.input_tokens", r.usage.prompt_tokens);
                    span.record("gen_ai.usage.output_tokens", r.usage.completion_tokens);
                }
                Err(e) => {
                    span.record("error.type", e.code());
                }
            }
            let (Some(b), Some(in_flight)) = (&env.budgets, in_flight) else {
                return match result {
                    Ok(resp) => Ok(Called { resp, cost: None, took_ms }),
                    Err(e) => Err(Halt::fail(e.code(), e.to_string())),
                };
            };
            match result {
                Ok(resp) => match in_flight.commit(resp.usage.total_tokens, resp.usage.prompt_tokens).await {
                    Ok(cost) => return Ok(Called { resp, cost, took_ms }),
                    Err(e) => {
                        // The call ran: its usage is reported even though the keeper did not
                        // record it.
                        let extra = CallUsage {
                            step,
                            model: t.model.clone(),
                            usage: resp.usage,
                            cost_usd: None,
                            provider: Some(t.provider.to_string()),
                            duration_ms: took_ms,
                        };
                        return Err(Halt::Fail { code: e.code, message: e.message, extra: Some(extra) });
                    }
                },
                Err(e) => {
                    let hint = match &e {
                        crate::llm::ProviderError::RateLimited { retry_after } => {
                            // Every runner sharing the limit holds back, not just this one (told
                            // before this reservation's permit goes back); the next reservation
                            // waits at the keeper until the pause is over.
                            b.backoff(t, *retry_after).await;
                            Some(Duration::ZERO)
                        }
                        _ => None,
                    };
                    if crate::budget::may_have_been_billed(&e) {
                        in_flight.charge_all().await;
                    } else {
                        in_flight.release().await;
                    }
                    if !e.is_retryable() || try_n >= t.retry.max_attempts.max(1) {
                        return Err(Halt::fail(e.code(), e.to_string()));
                    }
                    let wait = hint.unwrap_or_else(|| t.retry.backoff(try_n, None));
                    tracing::warn!(error = %e, try_n, wait = ?wait, "provider call failed; trying again");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn answered(
        &self,
        step: u32,
        req: &ChatRequest,
        called: &Called,
        previous_results: &[Value],
    ) -> Result<(), LoopError> {
        let (env, resp) = (self.env, &called.resp);
        // What the model answered is stored before anything acts on it.
        if let Some(r) = &env.transcript {
            r.model(step, &env.template.provider.to_string(), req, resp, called.took_ms)
                .await
                .map_err(LoopError::Infrastructure)?;
        }
        // A first step that is already the answer has nothing to report that `completed` does
        // not carry (the text, this call's usage): it gets no `progress` event of its own.
        let answered_at_once = step == 1 && resp.tool_calls.is_empty();
        if !answered_at_once && env.report_steps {
            publish_step(env, self.rec, step, resp, previous_results).await?;
        }
        Ok(())
    }

    async fn tool(
        &self,
        step: u32,
        index: usize,
        call: &crate::llm::ToolCall,
    ) -> Result<(String, bool), Halt> {
        let env = self.env;
        let mut ctx = env.tool_ctx.clone();
        ctx.step = step;
        ctx.index = index;
        let registry = env.registry.clone();
        let allowed = env.template.tools.clone();
        let (name, args) = (call.name.clone(), call.arguments.clone());
        let span = tracing::info_span!(
            "execute_tool",
            otel.name = %format!("execute_tool {name}"),
            gen_ai.operation.name = "execute_tool",
            gen_ai.tool.name = %name,
            step,
            index,
        );
        let joined = tokio::spawn(tracing::Instrument::instrument(
            async move { registry.call(&allowed, &name, args, &ctx).await },
            span,
        ))
        .await;
        let (content, is_error) = match joined {
            Ok(Ok(v)) => (v.to_string(), false),
            Ok(Err(e)) if e.fails_task.is_some() => {
                // Recorded too: the tool's answer is what ended the task (a tool with side
                // effects is not run again because the entry could not be stored).
                if let Some(r) = &env.transcript
                    && let Err(err) = r.tool(step, index, call, &format!("error: {e}"), true).await
                {
                    tracing::warn!(error = %err, "the transcript entry of a tool that ended the task was not stored");
                }
                let code = e.fails_task.unwrap_or("tool_failed");
                return Err(Halt::fail(code, e.message));
            }
            Ok(Err(e)) => (format!("error: {e}"), true),
            Err(e) if e.is_panic() => {
                return Err(Halt::Stop(LoopError::Crashed(format!("tool {} panicked", call.name))));
            }
            Err(e) => {
                return Err(Halt::Stop(LoopError::Crashed(format!("tool {} was aborted: {e}", call.name))));
            }
        };
        if let Some(r) = &env.transcript {
            r.tool(step, index, call, &content, is_error)
                .await
                .map_err(|e| Halt::Stop(LoopError::Infrastructure(e)))?;
        }
        Ok((content, is_error))
    }
}

/// One model call (its text published while it streams, with a streaming provider).
async fn call(
    env: &Env,
    rec: &TaskRecord,
    step: u32,
    req: &ChatRequest,
) -> Result<crate::llm::ChatResponse, crate::llm::ProviderError> {
    if !env.provider.streams() || !env.report_steps {
        return env.provider.chat(req).await;
    }
    let (sink, pieces) = TextSink::channel();
    let call = async {
        let r = env.provider.chat_with_sink(req, Some(&sink)).await;
        // The publisher flushes and ends once the sink is gone.
        drop(sink);
        r
    };
    let fleet = &env.tool_ctx.fleet;
    let (r, _) = tokio::join!(
        call,
        crate::partial_text::publish(fleet, rec, step, env.template.stream_interval, pieces)
    );
    r
}

/// Publishes the `progress` event of a finished step: its text, tool calls and usage, and the
/// results of the previous step's tools.
async fn publish_step(
    env: &Env,
    rec: &TaskRecord,
    step: u32,
    resp: &crate::llm::ChatResponse,
    previous_results: &[Value],
) -> Result<(), LoopError> {
    let mut ev = TaskEvent::for_task(rec, event_kind::PROGRESS);
    ev.step = Some(step);
    ev.usage = Some(resp.usage);
    ev.detail = Some(json!({
        "text": resp.text,
        "tool_calls": resp.tool_calls.iter().map(|c| json!({
            "name": c.name,
            "arguments": c.arguments.clone().unwrap_or_else(Value::String),
        })).collect::<Vec<_>>(),
        "previous_tool_results": previous_results,
    }));
    env.tool_ctx.fleet.publish_event(&ev).await.map_err(LoopError::Infrastructure)
}
