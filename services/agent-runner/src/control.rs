//! Fleet changes at runtime: a runner answers `<p>.runners.<runner>.scale` ("run N agents of
//! template T") and `<p>.runners.<runner>.stop` ("stop agent A") without restarting. Both are
//! declarative or idempotent, so a retried request changes nothing more. It also takes
//! `<p>.runners.<runner>.cancel` (a `CancelTask`, core NATS): stop an attempt it holds whose task
//! was already ended by someone else.

use std::sync::Arc;

use async_nats::jetstream::consumer::pull;
use flotilla_protocol::names::runner_op;
use flotilla_protocol::{
    AgentState, CancelTask, ErrorInfo, ErrorReply, FleetChangeReply, ScaleRequest, StopAgentRequest,
};
use flotilla_service::nats::decode_request;
use flotilla_service::{Fleet, Topology};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::registry::{Agents, Slot};

/// What a runner is asked on its control subjects.
#[derive(Debug, Clone, Copy)]
enum Ask {
    Scale,
    Stop,
    Cancel,
}

/// Most agents one runner hosts, whatever a scale request asks.
pub const MAX_AGENTS: u32 = 100_000;

/// What the control endpoint needs to start and stop agents.
pub struct Control {
    pub fleet: Fleet,
    pub topology: Topology,
    pub agents: Arc<Agents>,
    pub shutdown: CancellationToken,
    /// The assignment consumer, whose `max_ack_pending` grows with the agents' capacity.
    pub stream: async_nats::jetstream::stream::Stream<()>,
    pub consumer: pull::Config,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").field("runner_id", &self.agents.runner_id).finish_non_exhaustive()
    }
}

impl Control {
    /// Marks a new agent idle (registered at the next registry write); its messages come
    /// through the runner's mailbox.
    pub fn start_agent(&self, slot: &Arc<Slot>) {
        slot.lifecycle.set(None, AgentState::Idle);
    }

    /// Answers fleet-change requests and takes cancellations until `shutdown`.
    pub async fn serve(mut self) -> anyhow::Result<()> {
        let runner = self.agents.runner_id.clone();
        let mut subscriptions = Vec::new();
        for (op, ask) in
            [(runner_op::SCALE, Ask::Scale), (runner_op::STOP, Ask::Stop), (runner_op::CANCEL, Ask::Cancel)]
        {
            let sub = self.fleet.client.subscribe(self.fleet.names.runner_control(&runner, op)).await?;
            subscriptions.push(sub.map(move |m| (ask, m)).boxed());
        }
        let mut requests = futures::stream::select_all(subscriptions);
        loop {
            let (ask, msg) = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                m = requests.next() => match m { Some(m) => m, None => break },
            };
            let span = tracing::info_span!("fleet_change", runner_id = %runner, ask = ?ask);
            match ask {
                Ask::Cancel => self.cancel(&msg).instrument(span).await,
                Ask::Scale => {
                    let reply = self.change(&msg, Self::scale).instrument(span).await;
                    self.fleet.respond(&msg, &reply).await;
                }
                Ask::Stop => {
                    let reply = self.change(&msg, Self::stop).instrument(span).await;
                    self.fleet.respond(&msg, &reply).await;
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
        match decode_request::<CancelTask>(msg.headers.as_ref(), &msg.payload) {
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
                let answer = serde_json::json!({
                    "runner_id": self.agents.runner_id,
                    "task_id": req.task_id,
                    "attempt": req.attempt,
                    "stopped": stopped,
                });
                self.fleet.respond(msg, &answer).await;
            }
            Err(e) => {
                tracing::warn!(reason = e.reason.code(), error = %e, "undecodable cancel request ignored");
                self.fleet
                    .respond(msg, &ErrorReply { error: ErrorInfo::new(e.reason.code(), e.message) })
                    .await;
            }
        }
    }

    /// Carries out one fleet change: decodes its request, lets `apply` make the change (it names
    /// the template and returns the agents it started), and answers with the template's agents
    /// after it, registered before the answer goes out.
    async fn change<R: Change>(
        &mut self,
        msg: &async_nats::Message,
        apply: impl AsyncFnOnce(&mut Self, R, &mut FleetChangeReply) -> Result<Vec<String>, ErrorInfo>,
    ) -> FleetChangeReply {
        let mut reply = FleetChangeReply { runner_id: self.agents.runner_id.clone(), ..Default::default() };
        let by = format!("agent-runner {}", self.agents.runner_id);
        let mut done = None;
        let result = match decode_request::<R>(msg.headers.as_ref(), &msg.payload) {
            Ok(req) => match self.actor(msg, &req).await {
                Ok(actor) => {
                    let detail = req.detail();
                    let r = apply(self, req, &mut reply).await;
                    done = Some((actor, detail));
                    r
                }
                Err(why) => {
                    flotilla_service::attest::publish_refusal(&self.fleet, R::ACTION, None, &why, &by).await;
                    Err(ErrorInfo::new("unauthorized", format!("{}: {}", why.reason, why.message)))
                }
            },
            Err(e) => Err(ErrorInfo::new(e.reason.code(), e.message)),
        };
        match result {
            Ok(started) => {
                if let Some((actor, mut detail)) = done {
                    if let Some(d) = detail.as_object_mut() {
                        d.insert("runner_id".into(), self.agents.runner_id.clone().into());
                        d.insert("started".into(), started.clone().into());
                    }
                    flotilla_service::attest::publish_applied(&self.fleet, R::ACTION, &actor, detail, &by)
                        .await;
                }
                reply.started = started;
                let (active, stopping) = self.agents.of_template(&reply.template);
                reply.agents = active.iter().map(|s| s.agent_id.clone()).collect();
                reply.stopping = stopping.iter().map(|s| s.agent_id.clone()).collect();
                // Registered (and the stopped ones marked draining) before the answer goes out.
                if let Err(e) = self.agents.beat(&self.fleet, &self.topology, true).await {
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

    /// Who asked for a change: a verified operator; the dispatcher's unsigned autoscaling request
    /// (held to the template's limits) is the autoscaler's.
    async fn actor<R: Change>(
        &self,
        msg: &async_nats::Message,
        req: &R,
    ) -> Result<String, flotilla_service::attest::Refusal> {
        let signed = msg
            .headers
            .as_ref()
            .is_some_and(|h| h.get(flotilla_protocol::headers::FLOTILLA_SIGNER).is_some());
        if req.autoscale() && !signed {
            return Ok(flotilla_service::attest::AUTOSCALER.to_owned());
        }
        flotilla_service::attest::request_actor(&self.fleet, &self.topology.operators, msg).await
    }

    /// Stops an agent: it takes no new work, finishes what it holds, then deregisters.
    async fn stop(
        &mut self,
        req: StopAgentRequest,
        reply: &mut FleetChangeReply,
    ) -> Result<Vec<String>, ErrorInfo> {
        let template =
            self.agents.stop_agent(&req.agent_id).map_err(|e| ErrorInfo::new(e.code(), e.to_string()))?;
        tracing::info!(agent_id = %req.agent_id, "stop requested");
        reply.template = template;
        Ok(Vec::new())
    }

    /// Runs the requested number of agents of a template (an autoscaler's request within the
    /// template's limits).
    async fn scale(
        &mut self,
        req: ScaleRequest,
        reply: &mut FleetChangeReply,
    ) -> Result<Vec<String>, ErrorInfo> {
        reply.template.clone_from(&req.template);
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

/// A fleet change request: what it is called in control events and what it asks.
trait Change: serde::de::DeserializeOwned {
    const ACTION: &'static str;
    /// The dispatcher's autoscaling (bounded by the template's limits).
    fn autoscale(&self) -> bool {
        false
    }
    fn detail(&self) -> serde_json::Value;
}

impl Change for ScaleRequest {
    const ACTION: &'static str = "scale";
    fn autoscale(&self) -> bool {
        self.autoscale
    }
    fn detail(&self) -> serde_json::Value {
        serde_json::json!({ "template": self.template, "replicas": self.replicas, "autoscale": self.autoscale })
    }
}

impl Change for StopAgentRequest {
    const ACTION: &'static str = "stop";
    fn detail(&self) -> serde_json::Value {
        serde_json::json!({ "agent_id": self.agent_id })
    }
}
