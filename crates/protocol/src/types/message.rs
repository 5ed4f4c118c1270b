//! Agent communication: direct messages (what a sender asks for, the envelope the router stores,
//! the answer it gives), their priority classes, the grants that say who may message whom, the
//! message events of the audit trail and the record that fences a message's handling.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::*;

/// The four priority classes of messages (and tasks): each is one subject and one consumer, drained
/// most urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PriorityClass {
    /// Levels 0–1.
    Critical,
    /// Levels 2–4.
    Interactive,
    /// Levels 5–7.
    Normal,
    /// Levels 8–9.
    Batch,
}

impl PriorityClass {
    /// Every class, most urgent first.
    pub const ALL: [PriorityClass; 4] = [Self::Critical, Self::Interactive, Self::Normal, Self::Batch];

    /// The class of a priority level.
    pub fn of(p: Priority) -> Self {
        match p.level() {
            0..=1 => Self::Critical,
            2..=4 => Self::Interactive,
            5..=7 => Self::Normal,
            _ => Self::Batch,
        }
    }

    /// Lower-case name, as in subjects and consumer names.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Critical => "critical",
            Self::Interactive => "interactive",
            Self::Normal => "normal",
            Self::Batch => "batch",
        }
    }

    /// 0 (critical) to 3 (batch).
    pub fn rank(self) -> usize {
        match self {
            Self::Critical => 0,
            Self::Interactive => 1,
            Self::Normal => 2,
            Self::Batch => 3,
        }
    }
}

/// Who a grant speaks of: every field that is set must match (an empty selector matches anyone).
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct Selector {
    /// One agent, by id.
    pub agent: Option<String>,
    /// Agents of one template (fleet-file name).
    pub template: Option<String>,
    /// Agents with one capability.
    pub capability: Option<String>,
    /// Agents (and clients) of one tenant.
    pub tenant: Option<String>,
    /// One client or operator identity (what a plain NATS client sends as).
    pub client: Option<String>,
    /// A namespace of shared memory (memory grants).
    pub namespace: Option<String>,
}

impl Selector {
    /// True when every field that is set matches `party`.
    pub fn matches(&self, party: &Party) -> bool {
        let eq = |want: &Option<String>, have: &Option<String>| {
            want.as_ref().is_none_or(|w| have.as_ref() == Some(w))
        };
        eq(&self.agent, &party.agent)
            && eq(&self.template, &party.template)
            && eq(&self.client, &party.client)
            && eq(&self.namespace, &party.namespace)
            && self.tenant.as_ref().is_none_or(|t| *t == party.tenant)
            && self.capability.as_ref().is_none_or(|c| party.capabilities.contains(c))
    }

    /// How specific the selector is: an agent or client counts most, then a template, a
    /// capability, a tenant.
    pub fn specificity(&self) -> u32 {
        let n = |o: &Option<String>, w: u32| if o.is_some() { w } else { 0 };
        n(&self.agent, 8)
            + n(&self.client, 8)
            + n(&self.template, 4)
            + n(&self.namespace, 4)
            + n(&self.capability, 2)
            + n(&self.tenant, 1)
    }

    /// Parses the CLI's form: `*`, or comma-separated `agent:ID`, `template:NAME`,
    /// `capability:CAP`, `tenant:T`, `client:NAME`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut s = Self::default();
        if text.trim() == "*" {
            return Ok(s);
        }
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (kind, value) = part.split_once(':').ok_or_else(|| {
                format!("{part:?}: write kind:value (agent, template, capability, tenant, client) or *")
            })?;
            if !crate::names::is_token(value) {
                return Err(format!("{part:?}: the value must be 1-128 characters of A-Z a-z 0-9 _ -"));
            }
            let slot = match kind {
                "agent" => &mut s.agent,
                "template" => &mut s.template,
                "capability" => &mut s.capability,
                "tenant" => &mut s.tenant,
                "client" => &mut s.client,
                "namespace" => &mut s.namespace,
                other => {
                    return Err(format!(
                        "{other:?}: kind must be agent, template, capability, tenant, client or namespace"
                    ));
                }
            };
            *slot = Some(value.to_owned());
        }
        Ok(s)
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = [
            ("agent", &self.agent),
            ("client", &self.client),
            ("template", &self.template),
            ("capability", &self.capability),
            ("namespace", &self.namespace),
            ("tenant", &self.tenant),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}:{v}")))
        .collect();
        if parts.is_empty() { f.write_str("*") } else { f.write_str(&parts.join(",")) }
    }
}

/// One side of a message as the router knows it: an agent (from the registry) or a client
/// (from the subject it sent on).
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Party {
    pub agent: Option<String>,
    /// The runner hosting the agent.
    pub runner: Option<String>,
    pub template: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    pub client: Option<String>,
    /// The topic (its subject) of a topic event.
    pub topic: Option<String>,
    /// A namespace of shared memory (what a memory grant's `to` speaks of).
    pub namespace: Option<String>,
    #[serde(default = "default_tenant")]
    pub tenant: String,
}

impl Party {
    /// An agent as its registry record describes it.
    pub fn of_agent(r: &AgentRecord) -> Self {
        Self {
            agent: Some(r.agent_id.clone()),
            runner: Some(r.runner_id.clone()),
            template: Some(r.name.clone()),
            capabilities: r.capabilities.clone(),
            client: None,
            topic: None,
            namespace: None,
            tenant: r.tenant.clone(),
        }
    }

    /// Namespace `ns` of `tenant`'s shared memory.
    pub fn namespace(ns: &str, tenant: &str) -> Self {
        Self { namespace: Some(ns.to_owned()), tenant: tenant.to_owned(), ..Default::default() }
    }

    /// A client identity of `tenant`.
    pub fn client(name: &str, tenant: &str) -> Self {
        Self { client: Some(name.to_owned()), tenant: tenant.to_owned(), ..Default::default() }
    }
}

impl std::fmt::Display for Party {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(t) = &self.topic {
            return write!(f, "topic:{t}");
        }
        if let Some(n) = &self.namespace {
            return write!(f, "namespace:{n}");
        }
        match (&self.agent, &self.client, &self.template) {
            (Some(a), _, _) => write!(f, "agent:{a}"),
            (None, Some(c), _) => write!(f, "client:{c}"),
            (None, None, Some(t)) => write!(f, "template:{t}"),
            _ => write!(f, "tenant:{}", self.tenant),
        }
    }
}

/// Where a message goes: exactly one of the four.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct Address {
    /// One agent, by id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Any agent of a template: the first with a free slot takes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Any agent with a capability: the least loaded of the templates that have it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capability: Option<String>,
    /// Every agent the selector matches, one copy each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broadcast: Option<Selector>,
    /// A client identity (replies to a client's message go here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
}

impl Address {
    /// One agent.
    pub fn agent(id: &str) -> Self {
        Self { agent: Some(id.to_owned()), ..Default::default() }
    }

    /// Any agent of a template.
    pub fn template(name: &str) -> Self {
        Self { template: Some(name.to_owned()), ..Default::default() }
    }

    /// How many of the alternatives are set (a valid address sets one).
    pub fn alternatives(&self) -> usize {
        [
            self.agent.is_some(),
            self.template.is_some(),
            self.capability.is_some(),
            self.broadcast.is_some(),
            self.client.is_some(),
        ]
        .into_iter()
        .filter(|b| *b)
        .count()
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(a) = &self.agent {
            write!(f, "agent:{a}")
        } else if let Some(t) = &self.template {
            write!(f, "template:{t}")
        } else if let Some(c) = &self.capability {
            write!(f, "capability:{c}")
        } else if let Some(c) = &self.client {
            write!(f, "client:{c}")
        } else if let Some(s) = &self.broadcast {
            write!(f, "broadcast:{s}")
        } else {
            f.write_str("nowhere")
        }
    }
}

/// Largest message body (bytes of its JSON form).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Longest a message may wait for its receiver, and the default.
pub const MAX_MESSAGE_TTL_MS: u64 = 24 * 3600 * 1000;
pub const DEFAULT_MESSAGE_TTL_MS: u64 = 3600 * 1000;

/// What a sender asks the router for, on `<p>.msg.send.runner.<runner>` (a runner, for one of
/// its agents) or `<p>.msg.send.client.<name>` (any NATS client). The answer is a [`SendReply`]
/// once the message is stored.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct MessageSend {
    /// Idempotency key (`[A-Za-z0-9_-]`, at most 96): sent again, the message is stored once.
    /// Generated when absent.
    pub id: Option<String>,
    /// The sending agent (runners only: one the runner hosts).
    pub from: Option<String>,
    pub to: Address,
    /// The task the conversation belongs to.
    pub task_id: Option<String>,
    /// A client's tenant (agents' tenant is their template's); default `default`.
    pub tenant: Option<String>,
    /// 0–9 or a class name; default the normal class.
    pub priority: Option<Priority>,
    /// How long the message may wait for its receiver (default one hour, at most a day).
    pub ttl_ms: Option<u64>,
    /// The receiver's answer is sent back to the sender as a message `in_reply_to` this one.
    #[serde(default)]
    pub wants_reply: bool,
    /// The message this one answers (the router checks that the sender received it).
    pub in_reply_to: Option<String>,
    /// The message: text or any JSON.
    pub body: Value,
}

/// A stored message, as the receiving agent's runner reads it from `<p>.inbox.…`.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Envelope {
    pub id: String,
    /// Who really sent it (established by the router, never taken from the payload).
    pub from: Party,
    /// Where it went (as addressed).
    pub to: Address,
    /// The agent a broadcast copy is for.
    pub for_agent: Option<String>,
    pub task_id: Option<String>,
    pub priority: Priority,
    #[serde(default)]
    pub wants_reply: bool,
    pub in_reply_to: Option<String>,
    pub body: Value,
    pub sent_at_ms: u64,
    /// Not handled by then, the message expires (an `expired` event; the sender is told when it
    /// wanted a reply).
    pub expires_at_ms: u64,
}

/// One stored copy of a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Delivery {
    /// `agent:<id>`, `template:<name>` or `client:<name>`.
    pub to: String,
    /// Its sequence in the messages stream.
    pub seq: u64,
}

/// A receiver a message was refused for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Refusal {
    pub to: String,
    /// `permission_denied` (with `rule`), `unknown_agent`, ...
    pub code: String,
    /// The grant that refused it (`default:cross-tenant` when no grant spoke).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    pub message: String,
}

/// The router's answer to a [`MessageSend`]: stored (`delivered`), refused, or an error.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SendReply {
    pub id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delivered: Vec<Delivery>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<Refusal>,
    /// Set when nothing was stored: `permission_denied`, `unknown_agent`, `invalid_request`, ...
    pub error: Option<ErrorInfo>,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    Allow,
    Deny,
}

/// What a grant covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum GrantScope {
    /// Direct messages.
    #[default]
    Message,
    /// Reading a namespace of shared memory (get, list, history, wait).
    MemoryRead,
    /// Writing a namespace of shared memory (put, delete).
    MemoryWrite,
}

impl GrantScope {
    /// The CLI's name of the scope.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "message" => Some(Self::Message),
            "memory-read" | "memory_read" => Some(Self::MemoryRead),
            "memory-write" | "memory_write" => Some(Self::MemoryWrite),
            _ => None,
        }
    }
}

/// A rule of who may message whom, in the grants bucket under its name.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct Grant {
    /// The rule's name (its key): `[A-Za-z0-9_-]`.
    pub name: String,
    pub effect: Effect,
    #[serde(default)]
    pub scope: GrantScope,
    /// Senders it speaks of.
    #[serde(default)]
    pub from: Selector,
    /// Receivers it speaks of.
    #[serde(default)]
    pub to: Selector,
    pub created_at_ms: Option<u64>,
    /// Who made it: the operator whose signed request the dispatcher stored it for
    /// (`<p>.dispatcher.grants`), or `anonymous` without authentication. Set by the dispatcher.
    pub created_by: Option<String>,
}

/// A change of the grants (`<p>.dispatcher.grants`, signed by an operator): store `grant` (under
/// its name, replacing one of that name), or `remove` the grant of that name.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct GrantRequest {
    pub grant: Option<Grant>,
    pub remove: Option<String>,
}

/// The dispatcher's answer to a [`GrantRequest`]: the grant as stored (with `created_by`), the
/// name removed, or an `error` (`unauthorized`, `not_found`, `invalid_request`, `unavailable`, or
/// the code of a request that does not decode).
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GrantReply {
    pub grant: Option<Grant>,
    pub removed: Option<String>,
    pub error: Option<ErrorInfo>,
}

/// Whether a message may go, and the rule that said so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// A grant's name, or `default:same-tenant` / `default:cross-tenant`.
    pub rule: String,
}

/// Decides whether `from` may message `to` under `grants`: of the grants whose selectors both
/// match, the most specific wins (specificity of `from` plus `to`), a deny over an allow of the
/// same specificity. Across tenants only grants that name something count (an empty `* → *`
/// grant never opens tenants to each other). With no grant, agents of one tenant may message
/// each other and messages across tenants are denied.
pub fn decide(grants: &[Grant], scope: GrantScope, from: &Party, to: &Party) -> Decision {
    let cross = from.tenant != to.tenant;
    let best = grants
        .iter()
        .filter(|g| g.scope == scope && g.from.matches(from) && g.to.matches(to))
        .map(|g| (g.from.specificity() + g.to.specificity(), g))
        .filter(|(score, _)| !cross || *score > 0)
        .max_by(|(a, ga), (b, gb)| {
            a.cmp(b)
                .then_with(|| (ga.effect == Effect::Deny).cmp(&(gb.effect == Effect::Deny)))
                // Same weight and effect: the name decides, so every router picks the same rule.
                .then_with(|| gb.name.cmp(&ga.name))
        });
    match best {
        Some((_, g)) => Decision { allowed: g.effect == Effect::Allow, rule: g.name.clone() },
        None if cross => Decision { allowed: false, rule: "default:cross-tenant".to_owned() },
        None => Decision { allowed: true, rule: "default:same-tenant".to_owned() },
    }
}

/// A message event, on `<p>.events.message.<task>.<kind>` (`_` for a message of no task):
/// `sent`, `refused`, `delivered` (handed to the receiving agent), `answered`, `expired`.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MessageEvent {
    pub message_id: String,
    pub kind: String,
    pub at_ms: u64,
    /// The sender (`agent:<id>` or `client:<name>`).
    pub from: String,
    /// The address (`agent:<id>`, `template:<name>`, ...).
    pub to: String,
    pub task_id: Option<String>,
    pub priority: Option<Priority>,
    /// The agent that handled it (`delivered`, `answered`).
    pub agent_id: Option<String>,
    /// Sequence in the messages stream.
    pub seq: Option<u64>,
    /// The message this one answers.
    pub in_reply_to: Option<String>,
    /// Why it was refused or expired.
    pub error: Option<ErrorInfo>,
    /// The grant that refused it.
    pub rule: Option<String>,
}

/// Kinds of message events; the last token of `<p>.events.message.<task>.<kind>`.
pub mod message_event {
    pub const SENT: &str = "sent";
    pub const REFUSED: &str = "refused";
    pub const DELIVERED: &str = "delivered";
    pub const ANSWERED: &str = "answered";
    pub const EXPIRED: &str = "expired";
}

/// Where the handling of one stored message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MessageState {
    /// An agent took it; a crash before `handled` lets it be taken again.
    Handling,
    Handled,
    Expired,
}

/// The record of one message's handling, in the messages bucket under the message id: created
/// by the runner that takes the message (a second delivery finds it and does not act again).
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MessageRecord {
    pub id: String,
    pub state: MessageState,
    pub agent_id: String,
    pub runner_id: String,
    /// Who sent it, and whether it wanted a reply (the router checks replies against this).
    pub from: Party,
    #[serde(default)]
    pub wants_reply: bool,
    pub task_id: Option<String>,
    pub at_ms: u64,
    /// The id of the reply sent, once sent.
    pub reply_id: Option<String>,
}

impl Envelope {
    /// The id of the work an agent does on this message, as its tools see it: `msg-<id>`, in
    /// task-id characters.
    pub fn work_id(&self) -> String {
        let clean: String = self
            .id
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .collect();
        let mut id = format!("msg-{clean}");
        id.truncate(128);
        id
    }

    /// The record the receiving agent's loop and tools work from: a running piece of work of
    /// `tenant` whose input is the message body (capability `message`).
    pub fn work_record(&self, tenant: &str, agent_id: &str, runner_id: &str, now_ms: u64) -> TaskRecord {
        TaskRecord {
            id: self.work_id(),
            capability: "message".to_owned(),
            input: self.body.clone(),
            priority: self.priority,
            tenant: tenant.to_owned(),
            budget_tokens: None,
            deadline_ms: None,
            context_key: None,
            parent_id: self.task_id.clone(),
            labels: Default::default(),
            state: TaskState::Running,
            attempt: 1,
            agent_id: Some(agent_id.to_owned()),
            runner_id: Some(runner_id.to_owned()),
            submitted_at_ms: self.sent_at_ms,
            updated_at_ms: now_ms,
            started_at_ms: Some(now_ms),
            finished_at_ms: None,
            output: None,
            usage: None,
            error: None,
            warnings: Vec::new(),
            trace: None,
            children: Vec::new(),
            calls: Vec::new(),
            max_attempts: 1,
            attempts: Vec::new(),
        }
    }
}

/// Something an agent remembered (`remember`), on `<p>.recall.<tenant>`: its text, metadata and
/// embedding. Every runner's recall index is built from these, so any runner answers the same.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Recollection {
    pub id: String,
    pub tenant: String,
    pub text: String,
    #[serde(default)]
    pub metadata: serde_json::Map<String, Value>,
    /// The embedding model; only vectors of one model are compared.
    pub model: String,
    pub vector: Vec<f32>,
    pub agent_id: Option<String>,
    pub task_id: Option<String>,
    pub at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str, template: &str, tenant: &str) -> Party {
        Party {
            agent: Some(id.into()),
            runner: Some("r1".into()),
            template: Some(template.into()),
            capabilities: vec![format!("{template}-work")],
            client: None,
            topic: None,
            namespace: None,
            tenant: tenant.into(),
        }
    }

    fn grant(name: &str, effect: Effect, from: &str, to: &str) -> Grant {
        Grant {
            name: name.into(),
            effect,
            scope: GrantScope::Message,
            from: Selector::parse(from).unwrap(),
            to: Selector::parse(to).unwrap(),
            created_at_ms: None,
            created_by: None,
        }
    }

    #[test]
    fn without_grants_a_tenant_talks_to_itself_only() {
        let (a, b, c) = (agent("a", "w", "t1"), agent("b", "w", "t1"), agent("c", "w", "t2"));
        assert_eq!(
            decide(&[], GrantScope::Message, &a, &b),
            Decision { allowed: true, rule: "default:same-tenant".into() }
        );
        assert_eq!(
            decide(&[], GrantScope::Message, &a, &c),
            Decision { allowed: false, rule: "default:cross-tenant".into() }
        );
    }

    #[test]
    fn the_most_specific_grant_wins_and_deny_breaks_ties() {
        let (a, b) = (agent("a", "writer", "t1"), agent("b", "critic", "t1"));
        let grants = vec![
            grant("no-writers", Effect::Deny, "template:writer", "*"),
            grant("a-to-critics", Effect::Allow, "agent:a", "template:critic"),
        ];
        assert_eq!(decide(&grants, GrantScope::Message, &a, &b).rule, "a-to-critics");
        assert!(decide(&grants, GrantScope::Message, &a, &b).allowed);
        let other = agent("x", "writer", "t1");
        let d = decide(&grants, GrantScope::Message, &other, &b);
        assert_eq!((d.allowed, d.rule.as_str()), (false, "no-writers"));
        let tie = vec![
            grant("allow", Effect::Allow, "template:writer", "*"),
            grant("deny", Effect::Deny, "template:writer", "*"),
        ];
        assert!(!decide(&tie, GrantScope::Message, &a, &b).allowed);
    }

    #[test]
    fn tenants_open_only_to_grants_that_name_something() {
        let (a, c) = (agent("a", "w", "t1"), agent("c", "w", "t2"));
        let everything = vec![grant("all", Effect::Allow, "*", "*")];
        assert!(!decide(&everything, GrantScope::Message, &a, &c).allowed);
        let named = vec![grant("t1-to-t2", Effect::Allow, "tenant:t1", "tenant:t2")];
        assert_eq!(decide(&named, GrantScope::Message, &a, &c).rule, "t1-to-t2");
        assert!(decide(&named, GrantScope::Message, &a, &c).allowed);
        // A capability selector matches any agent that has it.
        let by_cap = vec![grant("cap", Effect::Deny, "*", "capability:w-work")];
        assert!(!decide(&by_cap, GrantScope::Message, &a, &agent("b", "w", "t1")).allowed);
    }

    #[test]
    fn selectors_parse_and_print() {
        let s = Selector::parse("template:writer,tenant:acme").unwrap();
        assert_eq!(s.to_string(), "template:writer,tenant:acme");
        assert_eq!(Selector::parse("*").unwrap(), Selector::default());
        assert!(Selector::parse("team:x").is_err());
        assert!(Selector::parse("agent:a.b").is_err());
    }

    #[test]
    fn classes_of_levels() {
        let class = |l| PriorityClass::of(Priority::new(l).unwrap());
        assert_eq!(
            [class(0), class(2), class(5), class(8), class(9)],
            [
                PriorityClass::Critical,
                PriorityClass::Interactive,
                PriorityClass::Normal,
                PriorityClass::Batch,
                PriorityClass::Batch
            ]
        );
    }
}
