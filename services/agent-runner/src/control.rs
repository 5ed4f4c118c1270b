//! Fleet changes at runtime: a runner answers `<p>.runners.<runner>.scale` ("run N agents of
//! template T") and `<p>.runners.<runner>.stop` ("stop agent A") without restarting. Both are
//! declarative or idempotent, so a retried request changes nothing more. It also takes
//! `<p>.runners.<runner>.cancel` (a `CancelTask`, core NATS): stop an attempt it holds whose task
//! was already ended by someone else.

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::jetstream::consumer::pull;
use flotilla_protocol::names::runner_op;
use flotilla_protocol::{
    AgentState, CancelTask, ErrorInfo, ErrorReply, FleetChangeReply, ScaleRequest, StopAgentRequest, codec,
};
use flotilla_service::{Fleet, Topology};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::llm::Provider;
use crate::registry::{Agents, Slot};

/// Most agents one runner hosts, whatever a scale request asks.
pub const MAX_AGENTS: u32 = 100_000;

/// What the control endpoint needs to start and stop agents.
pub struct Control {
    pub fleet: Fleet,
    pub topology: Topology,
    pub agents: Arc<Agents>,
    pub providers: HashMap<String, Provider>,
    /// The budget-keeper, when budgets are enforced (direct messages' model calls count too).
    pub budgets: Option<flotilla_service::budget::Client>,
    /// Where new agents' inboxes run.
    pub inboxes: TaskTracker,
    pub shutdown: CancellationToken,
    /// The assignment consumer, whose `max_ack_pending` grows with the agents' capacity.
    pub stream: async_nats::jetstream::stream::Stream,
    pub consumer: pull::Config,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").field("runner_id", &self.agents.runner_id).finish_non_exhaustive()
    }
}

impl Control {
    /// Starts an agent's inbox and marks it idle (registered at the next registry write).
    pub fn start_agent(&self, slot: &Arc<Slot>) {
        if let Some(provider) = self.providers.get(&slot.template.name) {
            self.inboxes.spawn(crate::inbox::serve(
                self.fleet.clone(),
                slot.clone(),
                provider.clone(),
                self.budgets.clone(),
                self.shutdown.clone(),
            ));
        }
        slot.lifecycle.set(None, AgentState::Idle);
    }

    /// Answers fleet-change requests and takes cancellations until `shutdown`.
    pub async fn serve(mut self) -> anyhow::Result<()> {
        let runner = self.agents.runner_id.clone();
        let scale =
            self.fleet.client.subscribe(self.fleet.names.runner_control(&runner, runner_op::SCALE)).await?;
        let stop =
            self.fleet.client.subscribe(self.fleet.names.runner_control(&runner, runner_op::STOP)).await?;
        let cancel =
            self.fleet.client.subscribe(self.fleet.names.runner_control(&runner, runner_op::CANCEL)).await?;
        let mut requests = futures::stream::select(futures::stream::select(scale, stop), cancel);
        loop {
            let msg = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                m = requests.next() => match m { Some(m) => m, None => break },
            };
            let op = msg.subject.as_str().rsplit('.').next().unwrap_or_default().to_owned();
            if op == runner_op::CANCEL {
                self.cancel(&msg).await;
                continue;
            }
            let span = tracing::info_span!("fleet_change", runner_id = %runner, op = %op);
            let reply = self.handle(&op, &msg).instrument(span).await;
            if let Some(to) = msg.reply.clone() {
                match self.fleet.encode(&reply) {
                    Ok(body) => {
                        if let Err(e) = self.fleet.client.publish(to, body).await {
                            tracing::warn!(error = %e, "failed to answer a fleet-change request");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "failed to encode a fleet-change reply"),
                }
            }
        }
        Ok(())
    }

    /// Stops the attempt a `CancelTask` names, if this runner holds it. Core NATS without a reply:
    /// bad input is logged and dropped; a request that does give a reply subject is answered
    /// (`{runner_id, task_id, attempt, stopped}` or an `ErrorReply`).
    #[tracing::instrument(skip_all, fields(runner_id = %self.agents.runner_id, subject = %msg.subject, task_id, attempt))]
    async fn cancel(&self, msg: &async_nats::Message) {
        let content_type = msg.headers.as_ref().and_then(|h| h.get(flotilla_protocol::headers::CONTENT_TYPE));
        let answer = match codec::decode::<CancelTask>(content_type.map(|v| v.as_str()), &msg.payload) {
            Ok(req) => {
                let span = tracing::Span::current();
                span.record("task_id", req.task_id.as_str());
                span.record("attempt", req.attempt);
                let stopped = self.agents.cancel(&req.task_id, req.attempt, &req.error);
                if stopped > 0 {
                    tracing::info!(code = %req.error.code, "cancelling the attempt");
                } else {
                    tracing::debug!("cancel for an attempt this runner does not hold");
                }
                self.fleet.encode(&serde_json::json!({
                    "runner_id": self.agents.runner_id,
                    "task_id": req.task_id,
                    "attempt": req.attempt,
                    "stopped": stopped,
                }))
            }
            Err(e) => {
                tracing::warn!(reason = e.reason.code(), error = %e, "undecodable cancel request ignored");
                self.fleet.encode(&ErrorReply { error: ErrorInfo::new(e.reason.code(), e.message) })
            }
        };
        let Some(to) = msg.reply.clone() else { return };
        match answer {
            Ok(body) => {
                if let Err(e) = self.fleet.client.publish(to, body).await {
                    tracing::warn!(error = %e, "failed to answer a cancel request");
                }
            }
            Err(e) => tracing::error!(error = %e, "failed to encode a cancel reply"),
        }
    }

    async fn handle(&mut self, op: &str, msg: &async_nats::Message) -> FleetChangeReply {
        let mut reply = FleetChangeReply { runner_id: self.agents.runner_id.clone(), ..Default::default() };
        let content_type = msg.headers.as_ref().and_then(|h| h.get(flotilla_protocol::headers::CONTENT_TYPE));
        let result = match op {
            runner_op::SCALE => {
                match codec::decode::<ScaleRequest>(content_type.map(|v| v.as_str()), &msg.payload) {
                    Ok(req) => {
                        reply.template.clone_from(&req.template);
                        self.scale(&req).await
                    }
                    Err(e) => Err(ErrorInfo::new(e.reason.code(), e.message)),
                }
            }
            runner_op::STOP => {
                match codec::decode::<StopAgentRequest>(content_type.map(|v| v.as_str()), &msg.payload) {
                    Ok(req) => match self.agents.stop_agent(&req.agent_id) {
                        Ok(template) => {
                            tracing::info!(agent_id = %req.agent_id, "stop requested");
                            reply.template = template;
                            Ok(Vec::new())
                        }
                        Err(e) => Err(ErrorInfo::new(e.code(), e.to_string())),
                    },
                    Err(e) => Err(ErrorInfo::new(e.reason.code(), e.message)),
                }
            }
            other => Err(ErrorInfo::new("unknown_operation", format!("no operation {other:?}"))),
        };
        match result {
            Ok(started) => {
                reply.started = started;
                let (active, stopping) = self.agents.of_template(&reply.template);
                reply.agents = active.iter().map(|s| s.agent_id.clone()).collect();
                reply.stopping = stopping.iter().map(|s| s.agent_id.clone()).collect();
                // Registered (and the stopped ones marked draining) before the answer goes out.
                if let Err(e) = self.agents.beat(&self.fleet, &self.topology).await {
                    tracing::warn!(error = %e, "registry write after a fleet change failed; the heartbeat retries");
                }
            }
            Err(e) => {
                tracing::warn!(code = %e.code, error = %e.message, "fleet change refused");
                reply.error = Some(e);
            }
        }
        reply
    }

    async fn scale(&mut self, req: &ScaleRequest) -> Result<Vec<String>, ErrorInfo> {
        if req.replicas > MAX_AGENTS {
            return Err(ErrorInfo::new(
                "limit_exceeded",
                format!("at most {MAX_AGENTS} agents per template and runner"),
            ));
        }
        let mut replicas = req.replicas;
        if req.autoscale
            && let Some(t) = self.agents.template(&req.template)
        {
            let (min, max) = t.replica_limits();
            replicas = replicas.clamp(min, max);
        }
        let started = self
            .agents
            .scale(&req.template, replicas)
            .map_err(|e| ErrorInfo::new(e.code(), e.to_string()))?;
        for slot in &started {
            self.start_agent(slot);
        }
        tracing::info!(template = %req.template, replicas, autoscale = req.autoscale, started = started.len(), "scaled");
        let want = i64::from(self.agents.total_capacity()).saturating_add(16);
        if want > self.consumer.max_ack_pending {
            let mut config = self.consumer.clone();
            config.max_ack_pending = want;
            match self.stream.update_consumer(config.clone()).await {
                Ok(_) => self.consumer = config,
                Err(e) => tracing::warn!(error = %e, "failed to raise the consumer's max_ack_pending"),
            }
        }
        Ok(started.iter().map(|s| s.agent_id.clone()).collect())
    }
}
