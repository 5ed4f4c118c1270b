//! Direct messages: every hosted agent answers requests on `<p>.agents.<agent>.inbox`. A message
//! that wants a reply is answered by the agent's model (taking one of its concurrency slots);
//! otherwise the runner confirms receipt at once and the message is logged.

use std::sync::Arc;

use flotilla_protocol::{DirectMessage, DirectReply, ErrorInfo, codec};
use flotilla_service::Fleet;
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::llm::{ChatRequest, Provider, Turn};
use crate::registry::Slot;

/// Serves one agent's inbox until `shutdown` or until the agent stops.
pub async fn serve(
    fleet: Fleet,
    slot: Arc<Slot>,
    provider: Provider,
    budgets: Option<flotilla_service::budget::Client>,
    shutdown: CancellationToken,
) {
    let subject = fleet.names.agent_inbox(&slot.agent_id);
    let mut sub = match fleet.client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(%subject, error = %e, "failed to subscribe to the agent's inbox");
            return;
        }
    };
    let tracker = TaskTracker::new();
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = slot.stop.cancelled() => break,
            m = sub.next() => match m { Some(m) => m, None => break },
        };
        let Some(reply_to) = msg.reply.clone() else { continue };
        let (fleet, slot, provider, budgets, stop) =
            (fleet.clone(), slot.clone(), provider.clone(), budgets.clone(), shutdown.clone());
        let span = tracing::info_span!("direct_message", agent_id = %slot.agent_id);
        tracker.spawn(
            async move {
                let answer = answer(&slot, &provider, budgets, &stop, &msg.payload).await;
                let body = match fleet.encode(&answer) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(error = %e, "failed to encode a reply");
                        return;
                    }
                };
                if let Err(e) = fleet.client.publish(reply_to, body).await {
                    tracing::warn!(error = %e, "failed to send a reply");
                }
            }
            .instrument(span),
        );
    }
    let _ = sub.unsubscribe().await;
    tracker.close();
    tracker.wait().await;
}

async fn answer(
    slot: &Slot,
    provider: &Provider,
    budgets: Option<flotilla_service::budget::Client>,
    shutdown: &CancellationToken,
    payload: &[u8],
) -> DirectReply {
    let mut reply = DirectReply { agent_id: slot.agent_id.clone(), reply: None, usage: None, error: None };
    let m: DirectMessage = match codec::decode(None, payload) {
        Ok(m) => m,
        Err(e) => {
            reply.error = Some(ErrorInfo::new(e.reason.code(), e.message));
            return reply;
        }
    };
    if !m.wants_reply {
        tracing::info!(from = %m.from, "direct message received");
        return reply;
    }
    let Ok(_permit) = slot.permits.clone().acquire_owned().await else {
        reply.error = Some(ErrorInfo::new("unavailable", "the agent is shutting down"));
        return reply;
    };
    let text = match &m.message {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut req = ChatRequest {
        model: slot.template.model.clone(),
        system: slot.template.system_prompt.clone(),
        turns: vec![Turn::User(format!("Message from agent {}: {text}", m.from))],
        tools: vec![],
        max_tokens: slot.template.max_tokens_per_call,
        purpose: "message".to_owned(),
        // A direct message belongs to no attempt of a task.
        attempt: 0,
        single_try: budgets.is_some(),
    };
    let Some(client) = budgets else {
        match provider.chat(&req).await {
            Ok(r) => {
                reply.reply = Some(r.text);
                reply.usage = Some(r.usage);
            }
            Err(e) => reply.error = Some(ErrorInfo::new(e.code(), e.to_string())),
        }
        return reply;
    };
    // Under budgets the call counts against the agent and its model (and shares the rate
    // limits), like a task's: reserved first, one try, committed or released after.
    let b = crate::budget::Budgets {
        client,
        key: format!(
            "msg:{}:{}:{}{}",
            slot.agent_id,
            flotilla_protocol::time::now_ms(),
            flotilla_service::config::random_instance_id(),
            flotilla_service::config::random_instance_id()
        ),
        agent_id: slot.agent_id.clone(),
        task: None,
        tenant: None,
        priority: flotilla_protocol::Priority::INTERACTIVE,
        // A sender waits about a minute for its answer: no longer for a budget.
        deadline_ms: Some(flotilla_protocol::time::now_ms().saturating_add(60_000)),
    };
    let held = match b.reserve(&slot.template, &req, 1, 1, shutdown).await {
        Ok((held, completion)) => {
            req.max_tokens = req.max_tokens.min(completion);
            held
        }
        Err(crate::budget::Denied::Fail(e)) => {
            reply.error = Some(e);
            return reply;
        }
        Err(crate::budget::Denied::Cancelled) => {
            reply.error = Some(ErrorInfo::new("cancelled", "cancelled while waiting for the budget"));
            return reply;
        }
    };
    let in_flight = crate::budget::InFlight::new(&b, held);
    match provider.chat(&req).await {
        Ok(r) => {
            if let Err(e) = in_flight.commit(r.usage.total_tokens, r.usage.prompt_tokens).await {
                tracing::warn!(error = %e.message, "a direct message's usage was not recorded");
            }
            reply.reply = Some(r.text);
            reply.usage = Some(r.usage);
        }
        Err(e) => {
            if let crate::llm::ProviderError::RateLimited { retry_after } = &e {
                b.backoff(&slot.template, *retry_after).await;
            }
            if crate::budget::may_have_been_billed(&e) {
                in_flight.charge_all().await;
            } else {
                in_flight.release().await;
            }
            reply.error = Some(ErrorInfo::new(e.code(), e.to_string()));
        }
    }
    reply
}
