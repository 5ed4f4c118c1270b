//! Budgets of model calls: before each call the agent loop reserves an upper bound of its tokens
//! with the budget-keeper (in the task's, the agent's, the tenant's and the model's scopes, with
//! a permit of the template's shared rate limits), caps the provider's `max_tokens` at what was
//! granted, and afterwards commits what the call used (or releases it all when the call failed).
//! Every reservation's key names the task, attempt, claim revision, step and try, so an operation
//! asked again (a keeper fail-over, a lost answer) never charges twice, and a re-run attempt gets
//! fresh keys.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_protocol::{
    BackoffRequest, CloseRequest, CommitRequest, ErrorInfo, Priority, ReleaseRequest, ReserveRequest,
    TaskRecord, time::now_ms,
};
use flotilla_service::budget::{BudgetError, Client};
use tokio_util::sync::CancellationToken;

use crate::fleet::AgentTemplate;
use crate::llm::{ChatRequest, Turn};

/// A reservation's lease beyond the longest the call may take (the answers and the commit).
const LEASE_MARGIN: Duration = Duration::from_secs(30);

/// Tokens a message costs beyond its text (role markers, separators), bounded generously.
const PER_MESSAGE: u64 = 16;

/// An upper bound of the prompt's tokens: every token of a byte-level tokenizer covers at least
/// one byte, so the bytes of everything sent (system prompt, turns, tool schemas) plus a margin
/// per message bound it from above without a tokenizer.
pub fn prompt_bound(req: &ChatRequest) -> u64 {
    let mut bytes = req.system.len() as u64 + PER_MESSAGE * 2;
    for t in &req.turns {
        bytes += PER_MESSAGE
            + match t {
                Turn::User(text) => text.len() as u64,
                Turn::Assistant { text, tool_calls } => {
                    text.len() as u64
                        + tool_calls
                            .iter()
                            .map(|c| {
                                (c.id.len() + c.name.len()) as u64
                                    + c.arguments.as_ref().map_or(0, |a| a.to_string().len() as u64)
                                    + PER_MESSAGE
                            })
                            .sum::<u64>()
                }
                Turn::ToolResult { call_id, name, content, .. } => {
                    (call_id.len() + name.len() + content.len()) as u64
                }
            };
    }
    for tool in &req.tools {
        bytes += PER_MESSAGE
            + (tool.name.len() + tool.description.len() + tool.parameters.to_string().len()) as u64;
    }
    bytes
}

/// The scope of a task's budget.
pub fn task_scope(task_id: &str) -> String {
    format!("task.{task_id}")
}

/// A task's token cap: the submission's, else the template's.
pub fn task_cap(rec: &TaskRecord, t: &AgentTemplate) -> Option<u64> {
    rec.budget_tokens.or(t.max_tokens_per_task)
}

/// Held tokens of one call.
#[derive(Debug, Clone)]
pub struct Held {
    pub id: String,
    pub tokens: u64,
}

/// Why a call cannot be made.
#[derive(Debug)]
pub enum Denied {
    /// The task fails with this error (`budget_exceeded`, `budget_unavailable`, ...).
    Fail(ErrorInfo),
    /// The attempt was cancelled while waiting.
    Cancelled,
}

/// Budgets of one claimed attempt (or of one direct message).
#[derive(Debug, Clone)]
pub struct Budgets {
    pub client: Client,
    /// Prefix of every key of this run: `<task>:<attempt>:<claim revision>` for an attempt
    /// (unique to this claim), `msg:<agent>:<uuid>` for a direct message.
    pub key: String,
    pub agent_id: String,
    /// The task's id and token cap, when the calls count against a task's budget.
    pub task: Option<(String, u64)>,
    pub tenant: Option<String>,
    pub priority: Priority,
    pub deadline_ms: Option<u64>,
}

impl Budgets {
    /// Budgets of a claimed attempt.
    pub fn for_attempt(
        client: Client,
        rec: &TaskRecord,
        claim_rev: u64,
        agent_id: &str,
        t: &AgentTemplate,
    ) -> Self {
        Self {
            client,
            key: format!("{}:{}:{claim_rev}", rec.id, rec.attempt),
            agent_id: agent_id.to_owned(),
            task: task_cap(rec, t).map(|cap| (rec.id.clone(), cap)),
            tenant: Some(rec.tenant.clone()),
            priority: rec.priority,
            deadline_ms: rec.deadline_ms,
        }
    }

    /// Reserves tokens for `req` (step `step`, try `try_n`): waits while a budget's policy is to
    /// wait or a rate permit is scarce (until the deadline), and makes sure the lease outlasts
    /// the call. Returns the grant and the `max_tokens` to send.
    #[tracing::instrument(skip_all, fields(step = step, try_n = try_n))]
    pub async fn reserve(
        &self,
        t: &AgentTemplate,
        req: &ChatRequest,
        step: u32,
        try_n: u32,
        cancel: &CancellationToken,
    ) -> Result<(Held, u32), Denied> {
        let prompt = prompt_bound(req);
        let mut scopes = Vec::with_capacity(4);
        let mut limits = BTreeMap::new();
        if let Some((id, cap)) = &self.task {
            scopes.push(task_scope(id));
            limits.insert(task_scope(id), *cap);
        }
        scopes.push(format!("agent.{}", self.agent_id));
        if let Some(tenant) = &self.tenant {
            scopes.push(format!("tenant.{tenant}"));
        }
        scopes.push(format!("model.{}", t.model));
        let lease = t.request_timeout + LEASE_MARGIN;
        let mut lease_try = 0u32;
        loop {
            let id = format!("{}:{step}:{try_n}.{lease_try}", self.key);
            let body = ReserveRequest {
                id: id.clone(),
                scopes: scopes.clone(),
                want: prompt + u64::from(t.max_tokens_per_call),
                min: Some(prompt + u64::from(t.min_tokens_per_call.min(t.max_tokens_per_call))),
                lease_ms: Some(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX)),
                limits: limits.clone(),
                model: Some(t.model.clone()),
                rates: t.rate_keys(),
                priority: Some(self.priority),
            };
            // Dropped while the keeper has not answered (the attempt was cancelled while its call
            // waited for a permit), the reservation is released: the keeper then refuses it
            // when its turn comes instead of granting it to nobody.
            let asking = Asking(Some((self.client.clone(), id.clone())));
            let answer = self.client.call(&body).await;
            asking.answered();
            let refusal = match answer {
                Ok(reply) => {
                    let tokens = reply.tokens.unwrap_or(0);
                    let held = Held { id, tokens };
                    // A call must not start unless it can end within the lease (an answer given
                    // again after a fail-over may have little left).
                    let left = reply.lease_left_ms.unwrap_or(0);
                    if left
                        < u64::try_from((t.request_timeout + Duration::from_secs(2)).as_millis()).unwrap_or(0)
                    {
                        tracing::info!(left_ms = left, "reservation has too little lease left for the call");
                        self.release(&held).await;
                        lease_try += 1;
                        continue;
                    }
                    let completion = tokens.saturating_sub(prompt).min(u64::from(t.max_tokens_per_call));
                    return Ok((held, u32::try_from(completion).unwrap_or(u32::MAX)));
                }
                Err(BudgetError::Refused { error, retry_after_ms }) => (error, retry_after_ms),
                Err(e @ BudgetError::Unavailable { .. }) => {
                    return Err(Denied::Fail(ErrorInfo::new("budget_unavailable", e.to_string())));
                }
            };
            let (error, retry_after_ms) = refusal;
            let wait = match error.code.as_str() {
                "budget_wait" => Duration::from_millis(retry_after_ms.unwrap_or(1_000).max(10)),
                // The keeper held the request as long as it holds any and kept its place in
                // line: ask again at once, so it waits there in priority order rather than here.
                "rate_limited" => Duration::ZERO,
                "reservation_ended" => {
                    lease_try += 1;
                    continue;
                }
                "budget_closed" => {
                    return Err(Denied::Fail(ErrorInfo::new(
                        "budget_exceeded",
                        format!("the task's budget is closed: {}", error.message),
                    )));
                }
                "budget_exceeded" => return Err(Denied::Fail(error)),
                _ => {
                    let message = format!("{}: {}", error.code, error.message);
                    return Err(Denied::Fail(ErrorInfo::new("budget_error", message)));
                }
            };
            if let Some(d) = self.deadline_ms
                && now_ms().saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)) >= d
            {
                return Err(Denied::Fail(ErrorInfo::new(
                    "budget_exceeded",
                    format!("{} (the deadline passes before the budget allows the call)", error.message),
                )));
            }
            tracing::info!(code = %error.code, wait_ms = wait.as_millis(), "waiting for the budget");
            tokio::select! {
                _ = cancel.cancelled() => return Err(Denied::Cancelled),
                _ = tokio::time::sleep(wait.min(Duration::from_secs(60))) => {}
            }
        }
    }

    /// Commits what a call used; returns its cost in US dollars when the model has a price.
    pub async fn commit(&self, held: &Held, used: u64, prompt_tokens: u64) -> Result<Option<f64>, ErrorInfo> {
        let body = CommitRequest { id: held.id.clone(), used, prompt_tokens: Some(prompt_tokens) };
        match self.client.call(&body).await {
            Ok(r) => {
                if r.over.is_some_and(|o| o > 0) {
                    tracing::warn!(over = r.over, "the call used more tokens than it held");
                }
                Ok(r.cost_usd)
            }
            Err(e) => {
                Err(ErrorInfo::new("budget_unavailable", format!("the call's usage was not recorded: {e}")))
            }
        }
    }

    /// Gives a reservation back whole (the call failed or was not made).
    pub async fn release(&self, held: &Held) {
        let body = ReleaseRequest { id: held.id.clone() };
        if let Err(e) = self.client.call(&body).await {
            tracing::warn!(error = %e, "failed to release a reservation; its lease will");
        }
    }

    /// Tells the shared rate limiter that the provider answered 429.
    pub async fn backoff(&self, t: &AgentTemplate, retry_after: Option<Duration>) {
        let ms = retry_after.map_or(1_000, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).max(1);
        let body = BackoffRequest { rates: t.rate_keys(), retry_after_ms: ms };
        if let Err(e) = self.client.call(&body).await {
            tracing::warn!(error = %e, "failed to report a 429 to the rate limiter");
        }
    }
}

/// A reserve request waiting for its answer (see [`Budgets::reserve`]).
struct Asking(Option<(Client, String)>);

impl Asking {
    fn answered(mut self) {
        self.0 = None;
    }
}

impl Drop for Asking {
    fn drop(&mut self) {
        let Some((client, id)) = self.0.take() else { return };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let body = ReleaseRequest { id };
                if let Err(e) = client.call(&body).await {
                    tracing::warn!(error = %e, "failed to withdraw an unanswered reservation; its lease will end it");
                }
            });
        }
    }
}

/// A reservation whose call is under way. Ended explicitly (commit, release, charge); dropped
/// without that (the attempt was cancelled, ran past its deadline or was aborted mid-call), the
/// call may have been billed, so its whole grant is charged, in the background.
#[derive(Debug)]
pub struct InFlight {
    budgets: Budgets,
    held: Option<Held>,
}

impl InFlight {
    pub fn new(budgets: &Budgets, held: Held) -> Self {
        Self { budgets: budgets.clone(), held: Some(held) }
    }

    /// Commits what the call used (see [`Budgets::commit`]).
    pub async fn commit(mut self, used: u64, prompt_tokens: u64) -> Result<Option<f64>, ErrorInfo> {
        match self.held.take() {
            Some(h) => self.budgets.commit(&h, used, prompt_tokens).await,
            None => Ok(None),
        }
    }

    /// The call failed before anything was billed: everything goes back.
    pub async fn release(mut self) {
        if let Some(h) = self.held.take() {
            self.budgets.release(&h).await;
        }
    }

    /// The call failed in a way that may have been billed (a timeout, a stream cut short): the
    /// whole grant is charged, so that no budget is ever overspent.
    pub async fn charge_all(mut self) {
        if let Some(h) = self.held.take()
            && let Err(e) = self.budgets.commit(&h, h.tokens, 0).await
        {
            tracing::warn!(error = %e.message, "failed to charge an interrupted call");
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let Some(h) = self.held.take() else { return };
        let budgets = self.budgets.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                tracing::info!(reservation = %h.id, "call interrupted; charging its whole grant");
                if let Err(e) = budgets.commit(&h, h.tokens, 0).await {
                    tracing::warn!(error = %e.message, "failed to charge an interrupted call");
                }
            });
        }
    }
}

/// Whether a failed call may have been billed by the provider (and is charged in full).
pub fn may_have_been_billed(e: &crate::llm::ProviderError) -> bool {
    use crate::llm::ProviderError as P;
    matches!(e, P::Timeout(_) | P::Stalled(_) | P::Malformed(_))
}

/// Closes a task's budget (it ended): a carved one is settled with its parent.
pub async fn close_task(client: &Client, task_id: &str) {
    let body = CloseRequest { scope: task_scope(task_id) };
    match client.call(&body).await {
        Ok(_) => {}
        Err(e) if e.code() == "unknown_scope" => {}
        Err(e) => tracing::warn!(error = %e, "failed to close the task's budget"),
    }
}
