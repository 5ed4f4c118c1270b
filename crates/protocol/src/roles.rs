//! The NATS permissions of every role of a fleet, generated from [`Names`]: the one place where
//! what a dispatcher, budget-keeper, monitor, runner, submitter, operator or auditor may publish
//! and subscribe to is written. `flotilla auth` renders them into the server's configuration.
//!
//! Rules every role follows: no `$JS.>` or `$JS.API.>` grant (they amount to admin and
//! read-everything); replies arrive on a private inbox prefix per identity ([`inbox_prefix`]),
//! never `_INBOX.>`; `allow_responses` is bounded; a consumer that is not an identity's own is
//! never granted by a `*` name on a stream that holds durables (create means create-or-update,
//! so a `*` name would let one identity rewrite or drain another's); stream contents are read
//! through consumers whose filter is pinned by the permission subject
//! (`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`), never through the bare create.
//!
//! What NATS cannot narrow, and how Flotilla lives with it: a KV watch, key listing or
//! `STREAM.INFO` (which takes a subjects filter in its body) covers a whole bucket or stream, so
//! they are granted only to services that are trusted with that whole bucket; a consumer's
//! `deliver_subject` is not checked against its creator's permissions, so only trusted roles and
//! readers of their own data may create consumers; acks (`$JS.ACK.<stream>.<consumer>.>`) are
//! granted per consumer because progress acks would use up a bounded `allow_responses`.

use crate::BudgetOp;
use crate::names::{Names, service};

/// Priority classes of stored messages: a runner has one mailbox consumer per class.
pub const MESSAGE_CLASSES: [&str; 4] = ["critical", "interactive", "normal", "batch"];

/// A role, with what its grants depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Owns the topology; schedules, routes messages.
    Dispatcher,
    /// Serves budgets from the ledger.
    BudgetKeeper,
    /// Reads events and the ledger; serves metrics.
    Monitor,
    /// Hosts agents of the given templates.
    Runner { id: String, templates: Vec<String> },
    /// Submits tasks as one tenant and reads that tenant's events.
    Submitter { tenant: String },
    /// The CLI's control commands, under a name that shows in what it causes.
    Operator { name: String },
    /// Reads every stream and bucket; writes nothing.
    Auditor,
}

impl Role {
    /// The role's kind as written in credentials and tables.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Dispatcher => "dispatcher",
            Self::BudgetKeeper => "budget-keeper",
            Self::Monitor => "monitor",
            Self::Runner { .. } => "runner",
            Self::Submitter { .. } => "submitter",
            Self::Operator { .. } => "operator",
            Self::Auditor => "auditor",
        }
    }
}

/// How many replies to requests it received a role may send, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Responses {
    pub max: u32,
    pub expires_secs: u32,
}

/// A role's permissions, as nats-server's `permissions` block has them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    pub publish: Vec<String>,
    pub publish_deny: Vec<String>,
    pub subscribe: Vec<String>,
    pub subscribe_deny: Vec<String>,
    pub responses: Option<Responses>,
}

/// The inbox prefix of an identity: `_INBOX_<public key>`. Its replies arrive under it, and no
/// other identity may subscribe there.
pub fn inbox_prefix(public_key: &str) -> String {
    format!("_INBOX_{public_key}")
}

fn api(s: impl AsRef<str>) -> String {
    format!("$JS.API.{}", s.as_ref())
}

fn kv_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// Builder of one role's grants.
struct G<'n> {
    n: &'n Names,
    g: Grants,
}

impl G<'_> {
    fn publish(&mut self, s: impl Into<String>) -> &mut Self {
        self.g.publish.push(s.into());
        self
    }
    fn subscribe(&mut self, s: impl Into<String>) -> &mut Self {
        self.g.subscribe.push(s.into());
        self
    }
    fn deny(&mut self, s: impl Into<String>) -> &mut Self {
        self.g.publish_deny.push(s.into());
        self
    }

    /// Opening a stream's handle (its info: config and counts).
    fn info(&mut self, stream: &str) -> &mut Self {
        self.publish(api(format!("STREAM.INFO.{stream}")))
    }

    /// A durable consumer of the identity's own, by exact name: create/update, info, pull, acks.
    fn durable(&mut self, stream: &str, name: &str, filter: Option<&str>) -> &mut Self {
        match filter {
            Some(f) => self.publish(api(format!("CONSUMER.CREATE.{stream}.{name}.{f}"))),
            None => self.publish(api(format!("CONSUMER.CREATE.{stream}.{name}"))),
        };
        self.publish(api(format!("CONSUMER.INFO.{stream}.{name}")))
            .publish(api(format!("CONSUMER.MSG.NEXT.{stream}.{name}")))
            .publish(format!("$JS.ACK.{stream}.{name}.>"))
    }

    /// Ordered (ephemeral) consumers of any name on a stream that holds no durables, filtered to
    /// `filter` (which may end in wildcards), or to anything when `None`.
    fn ordered(&mut self, stream: &str, filter: Option<&str>) -> &mut Self {
        match filter {
            Some(f) => self.publish(api(format!("CONSUMER.CREATE.{stream}.*.{f}"))),
            None => self
                .publish(api(format!("CONSUMER.CREATE.{stream}")))
                .publish(api(format!("CONSUMER.CREATE.{stream}.>"))),
        };
        self.publish(api(format!("CONSUMER.INFO.{stream}.*")))
            .publish(api(format!("CONSUMER.MSG.NEXT.{stream}.*")))
            .publish(format!("$JS.FC.{stream}.>"))
    }

    /// A KV bucket opened (info), read by key (`keys` is a subject pattern of keys), written.
    fn kv_read(&mut self, bucket: &str, keys: &str) -> &mut Self {
        let s = kv_stream(bucket);
        self.info(&s).publish(api(format!("DIRECT.GET.{s}.$KV.{bucket}.{keys}")))
    }
    fn kv_write(&mut self, bucket: &str, keys: &str) -> &mut Self {
        self.kv_read(bucket, keys).publish(format!("$KV.{bucket}.{keys}"))
    }
    /// Watching, listing keys or reading history of a whole bucket (NATS cannot narrow these to
    /// some keys: the library creates them without a filter in the subject).
    fn kv_watch(&mut self, bucket: &str) -> &mut Self {
        let s = kv_stream(bucket);
        self.info(&s).ordered(&s, None)
    }

    /// The health endpoint and micro-service discovery of a service, and the handles of the
    /// topology's buckets every service opens at start (their info only: config and counts).
    fn health(&mut self, svc: &str, micro: &str) -> &mut Self {
        let n = self.n;
        for b in buckets(n) {
            self.info(&kv_stream(&b));
        }
        self.subscribe(n.health_subject(svc))
            .subscribe(n.instance_health_subject(svc, "*"))
            .subscribe("$SRV.PING")
            .subscribe("$SRV.INFO")
            .subscribe("$SRV.STATS")
            .subscribe(format!("$SRV.*.{micro}"))
            .subscribe(format!("$SRV.*.{micro}.*"))
    }

    fn responses(&mut self, max: u32, expires_secs: u32) -> &mut Self {
        self.g.responses = Some(Responses { max, expires_secs });
        self
    }
}

/// The buckets of the topology, with the stream of each.
fn buckets(n: &Names) -> Vec<String> {
    vec![
        n.tasks_bucket(),
        n.agents_bucket(),
        n.capabilities_bucket(),
        n.memory_bucket(),
        n.approvals_bucket(),
        n.leases_bucket(),
        n.grants_bucket(),
        n.messages_bucket(),
        n.operators_bucket(),
        n.runners_bucket(),
    ]
}

/// Every stream of the topology (the KV buckets' included).
pub fn topology_streams(n: &Names) -> Vec<String> {
    let mut s = vec![
        n.submissions_stream(),
        n.events_stream(),
        n.assignments_stream(),
        n.deadletter_stream(),
        n.ledger_stream(),
        n.messages_stream(),
        n.topics_stream(),
        n.recall_stream(),
        n.transcripts_stream(),
    ];
    s.extend(buckets(n).iter().map(|b| kv_stream(b)));
    s
}

/// The grants of `role` for an identity whose inbox prefix is `inbox`.
pub fn grants(n: &Names, role: &Role, inbox: &str) -> Grants {
    let mut g = G { n, g: Grants::default() };
    g.subscribe(format!("{inbox}.>"));
    // The JetStream API reply subjects of everyone's requests are inboxes; nobody but the
    // server answers there. Writes to the fleet's streams are denied where a role must not make
    // them, whatever its allows say.
    match role {
        Role::Dispatcher => dispatcher(&mut g),
        Role::BudgetKeeper => budget_keeper(&mut g),
        Role::Monitor => monitor(&mut g),
        Role::Runner { id, templates } => runner(&mut g, id, templates),
        Role::Submitter { tenant } => submitter(&mut g, tenant),
        Role::Operator { name } => operator(&mut g, name),
        Role::Auditor => auditor(&mut g),
    }
    let mut out = g.g;
    for v in [&mut out.publish, &mut out.publish_deny, &mut out.subscribe, &mut out.subscribe_deny] {
        let mut seen = std::collections::HashSet::new();
        v.retain(|s| seen.insert(s.clone()));
    }
    out
}

fn dispatcher(g: &mut G<'_>) {
    let n = g.n;
    // The owner of the topology: creates and updates every stream and bucket.
    g.publish(api("INFO"));
    for s in topology_streams(n) {
        g.info(&s).publish(api(format!("STREAM.CREATE.{s}"))).publish(api(format!("STREAM.UPDATE.{s}")));
    }
    g.durable(&n.submissions_stream(), &n.dispatcher_intake_consumer(), None);
    g.publish(n.task_events_all())
        .publish(n.message_events_all())
        .publish(n.assign_all())
        .publish(n.deadletter_subject(service::DISPATCHER))
        .publish(n.inbox_all())
        .publish(n.runner_control("*", crate::names::runner_op::CANCEL))
        .publish(n.runner_control("*", crate::names::runner_op::SCALE));
    g.kv_write(&n.tasks_bucket(), ">")
        .kv_write(&n.leases_bucket(), crate::names::lease_key::DISPATCHER)
        .kv_read(&n.messages_bucket(), ">")
        .kv_read(&n.capabilities_bucket(), ">")
        .kv_read(&n.agents_bucket(), ">")
        .kv_write(&n.grants_bucket(), ">")
        .kv_read(&n.operators_bucket(), "*");
    g.publish(n.control_event_subject("*"));
    for b in [n.tasks_bucket(), n.agents_bucket(), n.grants_bucket(), n.leases_bucket(), n.runners_bucket()] {
        g.kv_watch(&b);
    }
    g.subscribe(format!("{} {}", n.dispatcher_queue(), crate::names::queue_group::DISPATCHER))
        .subscribe(format!("{} {}", n.dispatcher_cancel(), crate::names::queue_group::DISPATCHER))
        .subscribe(format!("{} {}", n.dispatcher_grants(), crate::names::queue_group::DISPATCHER))
        // Deadlocks the monitor asks to break (it fails the victim, as a cancel does).
        .subscribe(format!(
            "{} {}",
            n.alert_event_subject(crate::alert_kind::DEADLOCK),
            crate::names::queue_group::DISPATCHER
        ))
        .subscribe(format!("{} {}", n.msg_send_all(), crate::names::ROUTER_QUEUE_GROUP));
    g.health(service::DISPATCHER, "flotilla-dispatcher").responses(1, 10);
}

fn budget_keeper(g: &mut G<'_>) {
    let n = g.n;
    let ledger = n.ledger_stream();
    g.info(&ledger).publish(n.ledger_all()).ordered(&ledger, None);
    g.kv_write(&n.leases_bucket(), crate::names::lease_key::BUDGET_KEEPER).kv_watch(&n.leases_bucket());
    // Its own object store of ledger snapshots: created, read and rewritten by it alone.
    let snap = n.budget_snapshots_bucket();
    let obj = format!("OBJ_{snap}");
    g.info(&obj)
        .publish(api("INFO"))
        .publish(api(format!("STREAM.CREATE.{obj}")))
        .publish(api(format!("STREAM.PURGE.{obj}")))
        .publish(api(format!("DIRECT.GET.{obj}.>")))
        .publish(format!("$O.{snap}.>"))
        .ordered(&obj, None);
    g.subscribe(format!("{} q", n.budget_subject("*")));
    // Who asked for a control operation (set, rate, price): the operators' keys, and the control
    // events recording what it did or refused.
    g.kv_read(&n.operators_bucket(), "*").publish(n.control_event_subject("*"));
    g.health(service::BUDGET_KEEPER, "flotilla-budget-keeper")
        .subscribe("$SRV.*.flotilla-budget")
        .subscribe("$SRV.*.flotilla-budget.*")
        .responses(1, 20);
}

fn monitor(g: &mut G<'_>) {
    let n = g.n;
    let (events, ledger) = (n.events_stream(), n.ledger_stream());
    // Every event: tasks', agents' and messages' (the five families), and control events.
    g.info(&events).ordered(&events, Some(&n.events_all()));
    g.info(&ledger).ordered(&ledger, None);
    g.kv_watch(&n.agents_bucket()).kv_watch(&n.runners_bucket());
    g.subscribe(format!("{} {}", n.monitor_stats(), crate::names::queue_group::MONITOR));
    // Alerts: the dead letters as they arrive, the leases (and its own, which decides which
    // monitor publishes), and the alert events.
    let dl = n.deadletter_stream();
    g.info(&dl).ordered(&dl, None);
    g.kv_write(&n.leases_bucket(), crate::names::lease_key::MONITOR).kv_watch(&n.leases_bucket());
    g.publish(n.alert_event_subject("*"));
    // The dashboard's approve/reject: a decision signed with an operator's key (what the agent
    // checks); the write itself proves nothing, so the monitor may make it.
    g.kv_write(&n.approvals_bucket(), ">");
    // The lag of the work queues' durable consumers.
    for s in [n.submissions_stream(), n.assignments_stream(), n.messages_stream(), n.topics_stream()] {
        g.publish(api(format!("CONSUMER.LIST.{s}")));
    }
    g.health(service::MONITOR, "flotilla-monitor").responses(1, 5);
}

fn runner(g: &mut G<'_>, id: &str, templates: &[String]) {
    let n = g.n;
    let (asg, msgs, topics, recall, events) = (
        n.assignments_stream(),
        n.messages_stream(),
        n.topics_stream(),
        n.recall_stream(),
        n.events_stream(),
    );
    g.durable(&asg, &n.runner_consumer(id), Some(&n.assign_subject(id)));
    // A restarted runner takes back what its previous incarnation held (recreates its consumer).
    g.publish(api(format!("CONSUMER.DELETE.{asg}.{}", n.runner_consumer(id))));
    for class in MESSAGE_CLASSES {
        g.durable(&msgs, &n.runner_mailbox_consumer(id, class), Some(&n.inbox_runner(id, class)));
    }
    for t in templates {
        for class in MESSAGE_CLASSES {
            g.durable(&msgs, &n.template_mailbox_consumer(t, class), Some(&n.inbox_template(t, class)));
        }
        // Several filters: the create subject cannot carry them, only the exact name.
        g.durable(&topics, &n.topic_consumer(t), None);
        g.subscribe(n.inbox_template(t, "*"));
    }
    // Doorbells of its templates' topic subscriptions (topics are the fleet's broadcast).
    g.subscribe(n.topics_all());
    // Every runner hosts tasks of every tenant, so it reads what any of them remembered and
    // follows any child task it delegated.
    g.info(&recall).ordered(&recall, Some(&n.recall_all())).ordered(&events, Some(&n.task_events_all()));
    g.publish(n.task_events_all())
        .publish(n.agent_event_subject("*", "*"))
        .publish(n.message_events_all())
        .publish(n.wait_events_all())
        .publish(n.deadletter_subject(service::AGENT_RUNNER))
        .publish(n.topics_all())
        .publish(n.recall_subject("*"))
        .publish(n.transcripts_all())
        .publish(n.tenant_submit_all())
        .publish(n.msg_send_runner(id));
    for op in BudgetOp::ALL.iter().filter(|op| !op.is_control()) {
        g.publish(n.budget_subject(op.as_str()));
    }
    // Buckets it works with. Task records of any task it is assigned are fenced by revision.
    g.kv_write(&n.tasks_bucket(), "*")
        .kv_write(&n.agents_bucket(), "*")
        // Its own heartbeat: no other runner's.
        .kv_write(&n.runners_bucket(), id)
        .kv_write(&n.capabilities_bucket(), ">")
        .kv_write(&n.messages_bucket(), ">")
        .kv_write(&n.approvals_bucket(), "*")
        .kv_write(&n.memory_bucket(), ">")
        .kv_read(&n.grants_bucket(), ">")
        .kv_read(&n.operators_bucket(), "*")
        .kv_read(&n.leases_bucket(), crate::names::lease_key::BUDGET_KEEPER);
    g.publish(n.control_event_subject("*"));
    // The leases: which budget-keeper serves (a request in flight at one that died is asked
    // again of its successor at once).
    for b in [n.approvals_bucket(), n.memory_bucket(), n.grants_bucket(), n.leases_bucket()] {
        g.kv_watch(&b);
    }
    g.subscribe(n.runner_control(id, "*"));
    g.health(service::AGENT_RUNNER, "flotilla-agent-runner").responses(1, 10);
    g.deny(n.inbox_all()).deny(n.assign_all()).deny(n.ledger_all());
}

fn submitter(g: &mut G<'_>, tenant: &str) {
    let n = g.n;
    let events = n.events_stream();
    // A submitter is in its tenant's own account, which imports from the fleet's what follows;
    // the JetStream API parts under the tenant API prefix (`<p>.jsapi`, see `service::accounts`).
    let tenant_api = |s: String| format!("{}.{s}", n.tenant_js_api());
    g.publish(n.tenant_submit_subject(tenant));
    // Its tenant's events: live, and a task's last event of each kind by subject. No consumers:
    // their creator picks the deliver subject, which NATS does not check.
    let own = n.tenant_task_events(tenant);
    g.subscribe(own.clone()).publish(tenant_api(format!("DIRECT.GET.{events}.{own}")));
    // Its tenant's shared memory, by key (memory keys are `<tenant>.<key>`); no listing or
    // watch, which would show every tenant's keys.
    let memory = n.memory_bucket();
    g.publish(tenant_api(format!("DIRECT.GET.{}.$KV.{memory}.{tenant}.>", kv_stream(&memory))));
}

fn operator(g: &mut G<'_>, name: &str) {
    let n = g.n;
    let (events, ledger, topics) = (n.events_stream(), n.ledger_stream(), n.topics_stream());
    g.publish(n.dispatcher_queue())
        .publish(n.dispatcher_cancel())
        .publish(n.dispatcher_grants())
        .publish(n.monitor_stats())
        .publish(n.runner_control("*", "*"))
        .publish(n.msg_send_client(name))
        .publish(n.health_subject("*"))
        .publish(n.instance_health_subject("*", "*"))
        .publish("$SRV.>");
    for op in BudgetOp::ALL {
        g.publish(n.budget_subject(op.as_str()));
    }
    g.publish(n.topics_all()).publish(n.submit_subject()).publish(n.tenant_submit_all());
    g.info(&events).ordered(&events, Some(&n.task_events_all()));
    g.info(&ledger).ordered(&ledger, None);
    g.info(&topics).publish(api(format!("CONSUMER.LIST.{topics}"))).ordered(&topics, Some(&n.topics_all()));
    for b in [n.memory_bucket(), n.approvals_bucket()] {
        g.kv_write(&b, ">").kv_watch(&b);
    }
    // Grants are changed through the dispatcher (signed requests), which alone writes them.
    for b in
        [n.grants_bucket(), n.tasks_bucket(), n.agents_bucket(), n.capabilities_bucket(), n.runners_bucket()]
    {
        g.kv_read(&b, ">").kv_watch(&b);
    }
    // Which budget-keeper serves (see the runner's).
    g.kv_read(&n.leases_bucket(), ">").kv_watch(&n.leases_bucket());
    // Whether an existing approval decision is an operator's.
    g.kv_read(&n.operators_bucket(), "*");
    g.subscribe(n.inbox_client(name));
}

fn auditor(g: &mut G<'_>) {
    let n = g.n;
    g.publish(api("INFO"))
        .publish(api("STREAM.NAMES"))
        .publish(api("STREAM.LIST"))
        .publish(api("CONSUMER.NAMES.*"))
        .publish(api("CONSUMER.LIST.*"))
        .publish(api("CONSUMER.INFO.*.*"));
    for s in topology_streams(n) {
        g.info(&s)
            .publish(api(format!("STREAM.MSG.GET.{s}")))
            .publish(api(format!("DIRECT.GET.{s}")))
            .publish(api(format!("DIRECT.GET.{s}.>")));
    }
    // Ordered reads of the streams that hold no durables.
    for s in [
        n.events_stream(),
        n.ledger_stream(),
        n.deadletter_stream(),
        n.recall_stream(),
        n.transcripts_stream(),
    ] {
        g.ordered(&s, None);
    }
    for b in buckets(n) {
        g.ordered(&kv_stream(&b), None);
    }
    g.subscribe(n.events_all()).subscribe(n.ledger_all()).subscribe(n.deadletter_all());
    // `audit verify` compares the ledger's budgets with the keeper's (a read): the one subject
    // of the fleet an auditor publishes to (the allow-list stops every other).
    g.publish(n.budget_subject(BudgetOp::Show.as_str()));
    g.deny("$KV.>").deny("$O.>");
}
