//! The message router, on every dispatcher instance (queue group `router`): takes send requests
//! on `<p>.msg.send.runner.<runner>` and `<p>.msg.send.client.<name>`, establishes the sender from
//! the subject (a runner may speak only for an agent the registry places on it; a client only as
//! itself), resolves the address, checks the grants, stores one envelope per receiver in the
//! messages stream and only then answers "delivered". Every send and refusal is an event.

mod view;

use std::sync::Arc;

use flotilla_protocol::names::ROUTER_QUEUE_GROUP;
use flotilla_protocol::{
    Address, AgentRecord, DEFAULT_MESSAGE_TTL_MS, Decision, Delivery, Envelope, ErrorInfo, GrantScope,
    MAX_MESSAGE_BYTES, MAX_MESSAGE_TTL_MS, MessageEvent, MessageRecord, MessageSend, Party, PriorityClass,
    Refusal, SendReply, codec, decide, message_event, names::is_token, time::now_ms,
};
use flotilla_service::nats::{FleetError, content_type};
use flotilla_service::{Fleet, Topology};
use futures::StreamExt as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

pub use view::View;

/// Send requests worked on at once; more wait for the NATS subscription's buffer.
const SENDS_AT_ONCE: usize = 256;

/// Refusal codes of the router.
pub mod code {
    pub const PERMISSION_DENIED: &str = "permission_denied";
    pub const FORBIDDEN_SENDER: &str = "forbidden_sender";
    pub const UNKNOWN_AGENT: &str = "unknown_agent";
    pub const UNKNOWN_TEMPLATE: &str = "unknown_template";
    pub const UNKNOWN_CAPABILITY: &str = "unknown_capability";
    pub const NO_RECEIVERS: &str = "no_receivers";
    pub const INVALID_REQUEST: &str = "invalid_request";
    pub const UNAVAILABLE: &str = "unavailable";
}

/// Routes messages until `shutdown`.
pub async fn run(fleet: Fleet, topology: Topology, shutdown: CancellationToken) -> anyhow::Result<()> {
    let view = Arc::new(View::default());
    let maintained = tokio::spawn(view::maintain(
        view.clone(),
        topology.agents.clone(),
        topology.grants.clone(),
        shutdown.clone(),
    ));
    let mut sub = fleet
        .client
        .queue_subscribe(fleet.names.msg_send_all(), ROUTER_QUEUE_GROUP.to_owned())
        .await
        .map_err(|e| anyhow::anyhow!("failed to subscribe to send requests: {e}"))?;
    let at_once = Arc::new(Semaphore::new(SENDS_AT_ONCE));
    let router = Arc::new(Router { fleet, topology, view });
    loop {
        let req = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = sub.next() => match m { Some(m) => m, None => break },
        };
        let Ok(permit) = at_once.clone().acquire_owned().await else { break };
        let router = router.clone();
        let span = tracing::info_span!("route", subject = %req.subject, message_id = tracing::field::Empty);
        flotilla_service::trace::continue_from(&span, req.headers.as_ref());
        tokio::spawn(
            async move {
                let (reply, events) = router.handle(&req).await;
                router.fleet.respond(&req, &reply).await;
                for e in events {
                    if let Err(e) = e.confirmed().await {
                        tracing::warn!(error = %e, "a message event was not stored");
                    }
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
    let _ = sub.unsubscribe().await;
    let _ = maintained.await;
    Ok(())
}

/// Who sent a request, by the subject it came on.
enum Sender<'a> {
    Runner(&'a str),
    Client(&'a str),
}

fn refusal(to: String, code: &str, rule: Option<String>, message: String) -> Refusal {
    Refusal { to, code: code.to_owned(), rule, message }
}

fn error_reply(id: &str, code: &str, message: impl Into<String>) -> SendReply {
    SendReply { id: id.to_owned(), error: Some(ErrorInfo::new(code, message)), ..Default::default() }
}

struct Router {
    fleet: Fleet,
    topology: Topology,
    view: Arc<View>,
}

impl Router {
    /// The sender named by the subject, if it is one of ours.
    fn sender<'a>(&self, subject: &'a str) -> Option<Sender<'a>> {
        let rest = subject.strip_prefix(&format!("{}.msg.send.", self.fleet.names.prefix()))?;
        let (kind, name) = rest.split_once('.')?;
        if !is_token(name) {
            return None;
        }
        match kind {
            "runner" => Some(Sender::Runner(name)),
            "client" => Some(Sender::Client(name)),
            _ => None,
        }
    }

    /// The registry record of `id`: from the view, or read at once for an agent that registered
    /// a moment ago.
    async fn agent(&self, id: &str) -> Option<AgentRecord> {
        if let Some(r) = self.view.agent(id) {
            return Some(r);
        }
        match self.fleet.kv_get::<AgentRecord>(&self.topology.agents, id).await {
            Ok(Some((r, _))) => {
                self.view.learn_agent(r.clone());
                Some(r)
            }
            _ => None,
        }
    }

    /// Answers a send request; the events it sent, whose acks the caller awaits after answering.
    async fn handle(&self, req: &async_nats::Message) -> (SendReply, Vec<flotilla_service::nats::Pending>) {
        let mut events = Vec::new();
        let reply = self.route(req, &mut events).await;
        (reply, events)
    }

    async fn route(
        &self,
        req: &async_nats::Message,
        events: &mut Vec<flotilla_service::nats::Pending>,
    ) -> SendReply {
        let m: MessageSend = match codec::decode_strict(content_type(req.headers.as_ref()), &req.payload) {
            Ok(m) => m,
            Err(e) => return error_reply("", e.reason.code(), e.message),
        };
        let id = match &m.id {
            Some(id) if is_token(id) && id.len() <= 96 => id.clone(),
            Some(_) => {
                return error_reply(
                    "",
                    code::INVALID_REQUEST,
                    "id must be 1-96 characters of A-Z a-z 0-9 _ -",
                );
            }
            None => uuid::Uuid::now_v7().simple().to_string(),
        };
        tracing::Span::current().record("message_id", id.as_str());
        if let Err(why) = check(&m) {
            return error_reply(&id, code::INVALID_REQUEST, why);
        }
        let from = match self.sender(req.subject.as_str()) {
            Some(Sender::Runner(runner)) => {
                let Some(agent) = m.from.as_deref() else {
                    return error_reply(
                        &id,
                        code::INVALID_REQUEST,
                        "a runner's message names its agent in from",
                    );
                };
                match self.agent(agent).await {
                    Some(r) if r.runner_id == runner => Party::of_agent(&r),
                    _ => {
                        tracing::warn!(runner, agent, "a runner tried to send as an agent it does not host");
                        return error_reply(
                            &id,
                            code::FORBIDDEN_SENDER,
                            format!("runner {runner} does not host agent {agent}"),
                        );
                    }
                }
            }
            Some(Sender::Client(client)) => {
                if let Some(claimed) = &m.from {
                    return error_reply(
                        &id,
                        code::FORBIDDEN_SENDER,
                        format!("a client sends as itself (client:{client}), not as {claimed}"),
                    );
                }
                Party::client(client, m.tenant.as_deref().unwrap_or(flotilla_protocol::DEFAULT_TENANT))
            }
            None => return error_reply(&id, code::INVALID_REQUEST, "send on <p>.msg.send.client.<name>"),
        };
        let priority = m.priority.unwrap_or_default();
        let now = now_ms();
        let envelope = Envelope {
            id: id.clone(),
            from: from.clone(),
            to: m.to.clone(),
            for_agent: None,
            task_id: m.task_id.clone(),
            priority,
            wants_reply: m.wants_reply,
            in_reply_to: m.in_reply_to.clone(),
            body: m.body.clone(),
            sent_at_ms: now,
            expires_at_ms: now.saturating_add(m.ttl_ms.unwrap_or(DEFAULT_MESSAGE_TTL_MS)),
        };
        let class = PriorityClass::of(priority);
        let (targets, refused) = match self.resolve(&m, &from).await {
            Ok(r) => r,
            Err(e) => return SendReply { id, error: Some(e), ..Default::default() },
        };
        for r in &refused {
            self.event(events, &envelope, message_event::REFUSED, |ev| {
                ev.to.clone_from(&r.to);
                ev.rule.clone_from(&r.rule);
                ev.error = Some(ErrorInfo::new(r.code.clone(), r.message.clone()));
            })
            .await;
        }
        let mut reply = SendReply { id: id.clone(), refused, ..Default::default() };
        for target in targets {
            let (subject, to, copy) = match &target {
                Target::Agent(r) if m.to.broadcast.is_some() => (
                    self.fleet.names.inbox_agent(&r.runner_id, &r.agent_id, class.as_str()),
                    format!("agent:{}", r.agent_id),
                    Some(r.agent_id.clone()),
                ),
                Target::Agent(r) => (
                    self.fleet.names.inbox_agent(&r.runner_id, &r.agent_id, class.as_str()),
                    format!("agent:{}", r.agent_id),
                    None,
                ),
                Target::Template(t) => {
                    (self.fleet.names.inbox_template(t, class.as_str()), format!("template:{t}"), None)
                }
                Target::Client(c) => (self.fleet.names.inbox_client(c), format!("client:{c}"), None),
            };
            let mut env = envelope.clone();
            if let Some(agent) = &copy {
                env.id = format!("{id}.{agent}");
                env.for_agent = Some(agent.clone());
            }
            let stored = match self.fleet.send_durable(subject, &env, Some(&env.id)).await {
                Ok(p) => p.acked().await,
                Err(e) => Err(e),
            };
            match stored {
                Ok(ack) => {
                    if !ack.duplicate {
                        self.event(events, &env, message_event::SENT, |ev| {
                            ev.to.clone_from(&to);
                            ev.seq = Some(ack.sequence);
                        })
                        .await;
                    }
                    reply.delivered.push(Delivery { to, seq: ack.sequence });
                }
                Err(e) => {
                    tracing::warn!(error = %e, %to, "failed to store a message");
                    reply.refused.push(refusal(to, code::UNAVAILABLE, None, format!("not stored: {e}")));
                }
            }
        }
        if reply.delivered.is_empty() {
            let first = reply.refused.first();
            let (c, msg) = match first {
                Some(r) => {
                    let rule = r.rule.as_ref().map(|r| format!(" (rule {r})")).unwrap_or_default();
                    (r.code.clone(), format!("{}{rule}", r.message))
                }
                None => (code::NO_RECEIVERS.to_owned(), "no agent matches the address".to_owned()),
            };
            reply.error = Some(ErrorInfo::new(c, msg));
        }
        reply
    }

    /// The receivers of `m` from `from`, and the ones refused; an error when the address names
    /// nothing that exists.
    async fn resolve(&self, m: &MessageSend, from: &Party) -> Result<(Vec<Target>, Vec<Refusal>), ErrorInfo> {
        let grants = self.view.grants.all();
        let judge = |to: &Party| decide(&grants, GrantScope::Message, from, to);
        let denied = |to: String, d: Decision| {
            refusal(
                to.clone(),
                code::PERMISSION_DENIED,
                Some(d.rule.clone()),
                format!("{from} may not message {to}"),
            )
        };
        if let Some(original) = &m.in_reply_to {
            return self.resolve_reply(m, from, original).await;
        }
        let to = &m.to;
        if let Some(agent) = &to.agent {
            let Some(r) = self.agent(agent).await else {
                return Err(ErrorInfo::new(
                    code::UNKNOWN_AGENT,
                    format!("agent {agent} is not registered (unknown, or terminated)"),
                ));
            };
            let d = judge(&Party::of_agent(&r));
            return Ok(if d.allowed {
                (vec![Target::Agent(Box::new(r))], vec![])
            } else {
                (vec![], vec![denied(format!("agent:{agent}"), d)])
            });
        }
        if let Some(template) = &to.template {
            let members = self.view.agents_where(|r| &r.name == template);
            let Some(party) = group_party(&members) else {
                return Err(ErrorInfo::new(
                    code::UNKNOWN_TEMPLATE,
                    format!("no agent of template {template} is registered"),
                ));
            };
            let d = judge(&party);
            return Ok(if d.allowed {
                (vec![Target::Template(template.clone())], vec![])
            } else {
                (vec![], vec![denied(format!("template:{template}"), d)])
            });
        }
        if let Some(capability) = &to.capability {
            let members = self.view.agents_where(|r| r.capabilities.contains(capability));
            if members.is_empty() {
                return Err(ErrorInfo::new(
                    code::UNKNOWN_CAPABILITY,
                    format!("no registered agent has capability {capability}"),
                ));
            }
            // The least loaded template of those the sender may reach.
            let mut templates: Vec<String> = members.iter().map(|r| r.name.clone()).collect();
            templates.sort();
            templates.dedup();
            let mut best: Option<(f64, String)> = None;
            let mut refused = Vec::new();
            for t in templates {
                let of_t: Vec<AgentRecord> = members.iter().filter(|r| r.name == t).cloned().collect();
                let Some(party) = group_party(&of_t) else { continue };
                let d = judge(&party);
                if !d.allowed {
                    refused.push(denied(format!("template:{t}"), d));
                    continue;
                }
                let load = load_of(&of_t);
                if best.as_ref().is_none_or(|(l, _)| load < *l) {
                    best = Some((load, t));
                }
            }
            return Ok(match best {
                Some((_, t)) => (vec![Target::Template(t)], vec![]),
                None => (vec![], refused),
            });
        }
        if let Some(selector) = &to.broadcast {
            let members = self.view.agents_where(|r| selector.matches(&Party::of_agent(r)));
            if members.is_empty() {
                return Err(ErrorInfo::new(
                    code::NO_RECEIVERS,
                    format!("no registered agent matches {selector}"),
                ));
            }
            let (mut targets, mut refused) = (Vec::new(), Vec::new());
            for r in members {
                if from.agent.as_ref() == Some(&r.agent_id) {
                    continue;
                }
                let d = judge(&Party::of_agent(&r));
                if d.allowed {
                    targets.push(Target::Agent(Box::new(r)));
                } else {
                    refused.push(denied(format!("agent:{}", r.agent_id), d));
                }
            }
            return Ok((targets, refused));
        }
        Err(ErrorInfo::new(code::INVALID_REQUEST, "a client is addressed only by a reply (in_reply_to)"))
    }

    /// A reply goes back to whoever sent the original, and only from the agent that received it
    /// (no grant is needed: the original was allowed).
    async fn resolve_reply(
        &self,
        m: &MessageSend,
        from: &Party,
        original: &str,
    ) -> Result<(Vec<Target>, Vec<Refusal>), ErrorInfo> {
        let record = match self.fleet.kv_get::<MessageRecord>(&self.topology.messages, original).await {
            Ok(Some((r, _))) => r,
            Ok(None) => {
                return Err(ErrorInfo::new(
                    code::INVALID_REQUEST,
                    format!("message {original} was not received"),
                ));
            }
            Err(FleetError::Decode { .. }) => {
                return Err(ErrorInfo::new(
                    code::INVALID_REQUEST,
                    format!("message {original} is unreadable"),
                ));
            }
            Err(e) => return Err(ErrorInfo::new(code::UNAVAILABLE, e.to_string())),
        };
        if from.agent.is_none() || from.agent.as_ref() != Some(&record.agent_id) {
            return Err(ErrorInfo::new(
                code::FORBIDDEN_SENDER,
                format!("only the agent that received message {original} answers it"),
            ));
        }
        let expected = match (&record.from.agent, &record.from.client) {
            (Some(a), _) => Address::agent(a),
            (None, Some(c)) => Address { client: Some(c.clone()), ..Default::default() },
            _ => return Err(ErrorInfo::new(code::INVALID_REQUEST, "the original sender cannot be answered")),
        };
        if m.to != expected {
            return Err(ErrorInfo::new(
                code::INVALID_REQUEST,
                format!("a reply to {original} goes to its sender ({expected})"),
            ));
        }
        match (&expected.agent, &expected.client) {
            (Some(a), _) => match self.agent(a).await {
                Some(r) => Ok((vec![Target::Agent(Box::new(r))], vec![])),
                None => {
                    Err(ErrorInfo::new(code::UNKNOWN_AGENT, format!("agent {a} is no longer registered")))
                }
            },
            (None, Some(c)) => Ok((vec![Target::Client(c.clone())], vec![])),
            _ => Err(ErrorInfo::new(code::INVALID_REQUEST, "nobody to answer")),
        }
    }

    /// Sends a message event about `env`; its ack is awaited after the sender has its answer
    /// (failures are logged: the message itself is stored).
    async fn event(
        &self,
        events: &mut Vec<flotilla_service::nats::Pending>,
        env: &Envelope,
        kind: &str,
        fill: impl FnOnce(&mut MessageEvent),
    ) {
        let mut ev = MessageEvent {
            message_id: env.id.clone(),
            kind: kind.to_owned(),
            at_ms: now_ms(),
            from: env.from.to_string(),
            to: env.to.to_string(),
            task_id: env.task_id.clone(),
            priority: Some(env.priority),
            agent_id: None,
            seq: None,
            in_reply_to: env.in_reply_to.clone(),
            error: None,
            rule: None,
        };
        fill(&mut ev);
        match self.fleet.send_message_event(&ev).await {
            Ok(p) => events.push(p),
            Err(e) => tracing::warn!(error = %e, kind, "failed to publish a message event"),
        }
    }
}

/// Where one copy of a message goes.
enum Target {
    Agent(Box<AgentRecord>),
    Template(String),
    Client(String),
}

/// A template's agents as one receiver, for the grants: its template, capabilities and tenant.
fn group_party(members: &[AgentRecord]) -> Option<Party> {
    let first = members.first()?;
    let mut p = Party::of_agent(first);
    p.agent = None;
    p.runner = None;
    Some(p)
}

/// Work in flight per slot of a group of agents.
fn load_of(members: &[AgentRecord]) -> f64 {
    let in_flight: u32 = members.iter().map(|r| r.in_flight).sum();
    let slots: u32 = members.iter().map(|r| r.concurrency.max(1)).sum();
    f64::from(in_flight) / f64::from(slots.max(1))
}

/// The request's own checks: one address, sizes, ids and the TTL.
fn check(m: &MessageSend) -> Result<(), String> {
    if m.to.alternatives() != 1 {
        return Err("to names exactly one of agent, template, capability, broadcast, client".to_owned());
    }
    let tokens =
        [m.to.agent.as_deref(), m.to.template.as_deref(), m.to.capability.as_deref(), m.to.client.as_deref()];
    if tokens.into_iter().flatten().any(|t| !is_token(t)) {
        return Err("names in to must be 1-128 characters of A-Z a-z 0-9 _ -".to_owned());
    }
    if let Some(t) = &m.task_id
        && !is_token(t)
    {
        return Err("task_id must be a task id".to_owned());
    }
    if m.ttl_ms.is_some_and(|t| t == 0 || t > MAX_MESSAGE_TTL_MS) {
        return Err(format!("ttl_ms must be 1-{MAX_MESSAGE_TTL_MS}"));
    }
    let size = serde_json::to_vec(&m.body).map(|b| b.len()).unwrap_or(usize::MAX);
    if size > MAX_MESSAGE_BYTES {
        return Err(format!("the body is {size} bytes; at most {MAX_MESSAGE_BYTES}"));
    }
    if m.in_reply_to.as_deref().is_some_and(|r| r.is_empty() || r.len() > 256) {
        return Err("in_reply_to must be a message id".to_owned());
    }
    Ok(())
}
