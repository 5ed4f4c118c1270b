//! Direct messages, on the receiving side: the runner's durable consumers on the messages stream
//! (one per priority class for its own agents, and one per class and template shared with every
//! runner hosting the template), a queue per agent and class held here until the agent has a free
//! slot, and the handling of one message: fenced by a record in the messages bucket (a
//! redelivery never acts twice), run through the agent's loop with the message as its input, the
//! answer sent back through the router, and only then acked. A reply to a message an agent is
//! waiting for goes to that wait instead.
//!
//! Most urgent first: an agent takes the message of the most urgent class it has, aged by one
//! class per `aging` of waiting so the batch class never starves; within a class, oldest first.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::{Message, stream};
use flotilla_protocol::{
    Address, Envelope, ErrorInfo, MessageEvent, MessageRecord, MessageSend, MessageState, PriorityClass,
    SendReply, codec, message_event, time::now_ms,
};
use flotilla_service::nats::{FleetError, decode_payload};
use flotilla_service::{AckGuard, Fleet};
use futures::StreamExt as _;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::agent_loop;
use crate::registry::Slot;
use crate::worker::Context;

/// How long a message waits, at most, before it counts one class more urgent.
pub const DEFAULT_AGING: Duration = Duration::from_secs(30);

/// Messages of one class a runner holds unacked at once (per consumer).
const MAX_HELD: i64 = 10_000;

/// A stored message held here until an agent takes it.
struct Held {
    guard: AckGuard,
    envelope: Envelope,
    class: PriorityClass,
    held_at: tokio::time::Instant,
}

/// Where a held message waits: one agent's queue, or a template's (any of its agents here).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Queue {
    Agent(String),
    Template(String),
}

/// The runner's messages: what is held, who waits for a reply, and what wakes the dispatch.
pub struct Mailbox {
    queues: Mutex<HashMap<Queue, [VecDeque<Held>; 4]>>,
    /// Replies awaited by a `send_message` call, by the id of the message they answer.
    waiters: Mutex<HashMap<String, oneshot::Sender<Envelope>>>,
    wake: Notify,
    /// Told whenever an agent's slot frees up (a task or a message ended).
    freed: Notify,
    aging: Duration,
}

/// Tells the mailbox, when dropped, that a slot has freed up: declare it before the slot's
/// permit, so that it drops after it.
#[derive(Debug)]
pub struct Freed<'a>(&'a Mailbox);

impl Drop for Freed<'_> {
    fn drop(&mut self) {
        self.0.freed.notify_waiters();
        self.0.wake.notify_one();
    }
}

impl std::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailbox").field("aging", &self.aging).finish_non_exhaustive()
    }
}

/// Removes a reply wait when the waiting call ends, however it ends.
#[derive(Debug)]
pub struct Waiting<'a> {
    mailbox: &'a Mailbox,
    id: String,
    pub reply: oneshot::Receiver<Envelope>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Ok(mut w) = self.mailbox.waiters.lock() {
            w.remove(&self.id);
        }
    }
}

impl Mailbox {
    pub fn new(aging: Duration) -> Self {
        Self {
            queues: Mutex::new(HashMap::new()),
            waiters: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            freed: Notify::new(),
            aging,
        }
    }

    /// A guard that reports a freed slot when dropped.
    pub fn freed_on_drop(&self) -> Freed<'_> {
        Freed(self)
    }

    /// Waits for the reply to message `id` (register before sending it).
    pub fn wait_for_reply(&self, id: &str) -> Waiting<'_> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiters.lock() {
            w.insert(id.to_owned(), tx);
        }
        Waiting { mailbox: self, id: id.to_owned(), reply: rx }
    }

    fn hold(&self, queue: Queue, held: Held) {
        if let Ok(mut q) = self.queues.lock() {
            let slot = q.entry(queue).or_default();
            if let Some(class_queue) = slot.get_mut(held.class.rank()) {
                class_queue.push_back(held);
            }
        }
        self.wake.notify_one();
    }

    /// The queues that hold a message now.
    fn waiting(&self) -> Vec<Queue> {
        self.queues
            .lock()
            .map(|q| {
                q.iter().filter(|(_, c)| c.iter().any(|d| !d.is_empty())).map(|(k, _)| k.clone()).collect()
            })
            .unwrap_or_default()
    }

    /// How many messages wait in `queue`.
    fn held_in(&self, queue: &Queue) -> usize {
        self.queues.lock().map(|q| q.get(queue).map_or(0, |c| c.iter().map(VecDeque::len).sum())).unwrap_or(0)
    }

    /// Takes the most urgent message (aged) of the agent's own queue and its template's.
    fn take_for(&self, agent_id: &str, template: &str) -> Option<Held> {
        let mut q = self.queues.lock().ok()?;
        let queues = [Queue::Agent(agent_id.to_owned()), Queue::Template(template.to_owned())];
        let mut fronts = Vec::new();
        for (i, queue) in queues.iter().enumerate() {
            let Some(classes) = q.get(queue) else { continue };
            for (rank, class_queue) in classes.iter().enumerate() {
                if let Some(front) = class_queue.front() {
                    fronts.push((i, rank, front.held_at));
                }
            }
        }
        let (i, rank) = most_urgent(&fronts, tokio::time::Instant::now(), self.aging)?;
        q.get_mut(queues.get(i)?).and_then(|c| c.get_mut(rank)).and_then(VecDeque::pop_front)
    }

    /// Every held message's guard, for in-progress acks.
    async fn keep_alive(&self) {
        let guards: Vec<async_nats::jetstream::Message> = match self.queues.lock() {
            Ok(q) => q.values().flatten().flatten().filter_map(|h| h.guard.message().cloned()).collect(),
            Err(_) => return,
        };
        for m in guards {
            if let Err(e) = m.ack_with(async_nats::jetstream::AckKind::Progress).await {
                tracing::debug!(error = %e, "in-progress ack of a held message failed");
            }
        }
    }

    /// Hands back (for another runner, or a later start) what waits in the queues `drop` selects.
    async fn release(&self, drop: impl Fn(&Queue) -> bool) {
        let released: Vec<Held> = match self.queues.lock() {
            Ok(mut q) => {
                let keys: Vec<Queue> = q.keys().filter(|k| drop(k)).cloned().collect();
                keys.into_iter().filter_map(|k| q.remove(&k)).flatten().flatten().collect()
            }
            Err(_) => return,
        };
        for h in released {
            h.guard.nak(None).await;
        }
    }
}

/// Of the oldest message of each (queue, class rank) — `(queue, rank, held since)` — the one to
/// take: the most urgent class after aging (one class more urgent per `aging` waited, past
/// critical if need be, so nothing starves), then the more urgent class as sent, then the oldest.
fn most_urgent(
    fronts: &[(usize, usize, tokio::time::Instant)],
    now: tokio::time::Instant,
    aging: Duration,
) -> Option<(usize, usize)> {
    // Signed: a message that waited long enough beats even a fresh critical one.
    let aged = |since: tokio::time::Instant| -> i64 {
        if aging.is_zero() {
            0
        } else {
            i64::try_from(now.duration_since(since).as_millis() / aging.as_millis().max(1))
                .unwrap_or(i64::MAX)
        }
    };
    fronts
        .iter()
        .min_by_key(|(_, rank, since)| {
            (i64::try_from(*rank).unwrap_or(i64::MAX).saturating_sub(aged(*since)), *rank, *since)
        })
        .map(|(queue, rank, _)| (*queue, *rank))
}

/// What the mailbox's tasks share.
#[derive(Debug)]
pub struct Env {
    pub ctx: Arc<Context>,
    pub mailbox: Arc<Mailbox>,
    pub ack_wait: Duration,
}

/// Consumes this runner's messages and hands them to its agents until `shutdown`; then gives back
/// what was not taken.
pub async fn run(
    env: Arc<Env>,
    stream: stream::Stream<()>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let ctx = &env.ctx;
    let runner = ctx.runner_id.clone();
    let tracker = TaskTracker::new();
    let names = &ctx.fleet.names;
    for class in PriorityClass::ALL {
        let c = class.as_str();
        let consumer = inbox_consumer(
            &stream,
            env.ack_wait,
            names.runner_mailbox_consumer(&runner, c),
            format!("Flotilla runner {runner}: its agents' {c} messages"),
            names.inbox_runner(&runner, c),
        )
        .await?;
        tracker.spawn(prefetch(env.clone(), consumer, class, shutdown.clone()));
    }
    // Every template of the fleet file, also those with no agent here yet (a scale-up may start
    // one at any time).
    for template in ctx.agents.template_names() {
        let mut sources = Vec::new();
        let mut bells = vec![names.inbox_template(&template, "*")];
        for class in PriorityClass::ALL {
            let c = class.as_str();
            let consumer = inbox_consumer(
                &stream,
                env.ack_wait,
                names.template_mailbox_consumer(&template, c),
                format!("Flotilla template {template}: its {c} messages"),
                names.inbox_template(&template, c),
            )
            .await?;
            sources.push((Source::Inbox, consumer));
        }
        if let Some(t) = ctx.agents.template(&template)
            && !t.topics.is_empty()
        {
            let subjects: Vec<String> = t.topics.iter().map(|p| ctx.fleet.names.topic_subject(p)).collect();
            bells.extend(subjects.iter().cloned());
            let consumer = flotilla_service::nats::patiently(
                "the topic subscription",
                flotilla_service::nats::STARTUP_PATIENCE,
                || topic_consumer(env.ack_wait, &ctx.fleet, &t, subjects.clone()),
            )
            .await?;
            sources.push((Source::Topics, consumer));
        }
        tracker.spawn(take_for_template(env.clone(), template, sources, bells, shutdown.clone()));
    }
    let keep_alive = {
        let (mailbox, every, stop) = (env.mailbox.clone(), env.ack_wait / 3, shutdown.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => mailbox.keep_alive().await,
                }
            }
        })
    };
    dispatch(env.clone(), &tracker, shutdown.clone()).await;
    env.mailbox.release(|_| true).await;
    tracker.close();
    tracker.wait().await;
    keep_alive.abort();
    env.mailbox.release(|_| true).await;
    Ok(())
}

/// Where a template's taker reads: its messages (one consumer per class, most urgent first),
/// then its topic subscriptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Inbox,
    Topics,
}

/// The template's durable subscription to its topics: created where `topics_from` says the
/// first time, its patterns brought up to date after (it continues where it left off).
async fn topic_consumer(
    ack_wait: Duration,
    fleet: &Fleet,
    t: &crate::fleet::AgentTemplate,
    subjects: Vec<String>,
) -> anyhow::Result<PullConsumer> {
    use anyhow::Context as _;
    let stream = fleet
        .js
        .get_stream_no_info(fleet.names.topics_stream())
        .await
        .context("failed to open the topics stream")?;
    let name = fleet.names.topic_consumer(&t.name);
    if let Ok(mut existing) = stream.get_consumer::<pull::Config>(&name).await {
        let info = existing.info().await.context("failed to read the topic subscription")?;
        if info.config.filter_subjects == subjects {
            return Ok(existing);
        }
        let mut cfg: pull::Config = pull::Config {
            durable_name: Some(name.clone()),
            filter_subjects: subjects,
            deliver_policy: info.config.deliver_policy,
            description: info.config.description.clone(),
            ..consumer_config(ack_wait)
        };
        cfg.filter_subject = String::new();
        return stream.update_consumer(cfg).await.context("failed to update the topic subscription");
    }
    let deliver_policy = match t.topics_from.as_deref() {
        None | Some("new") => DeliverPolicy::New,
        Some("all") => DeliverPolicy::All,
        Some(time) => DeliverPolicy::ByStartTime {
            start_time: async_nats::datetime::parse_rfc3339(time)
                .map_err(|e| anyhow::anyhow!("topics_from {time:?}: {e}"))?,
        },
    };
    let cfg = pull::Config {
        durable_name: Some(name),
        description: Some(format!("Flotilla template {}: its topic subscriptions", t.name)),
        filter_subjects: subjects,
        deliver_policy,
        ..consumer_config(ack_wait)
    };
    stream.create_consumer(cfg).await.context("failed to create the topic subscription")
}

/// A durable consumer of one inbox subject (one class of a runner's or a template's messages).
async fn inbox_consumer(
    stream: &stream::Stream<()>,
    ack_wait: Duration,
    name: String,
    description: String,
    filter_subject: String,
) -> anyhow::Result<PullConsumer> {
    let cfg = pull::Config {
        durable_name: Some(name),
        description: Some(description),
        filter_subject,
        ..consumer_config(ack_wait)
    };
    Ok(flotilla_service::nats::patiently(
        "a mailbox consumer",
        flotilla_service::nats::STARTUP_PATIENCE,
        || stream.create_consumer(cfg.clone()),
    )
    .await?)
}

fn consumer_config(ack_wait: Duration) -> pull::Config {
    pull::Config {
        ack_policy: AckPolicy::Explicit,
        ack_wait,
        max_deliver: -1,
        max_ack_pending: MAX_HELD,
        deliver_policy: DeliverPolicy::All,
        inactive_threshold: Duration::from_secs(24 * 3600),
        ..Default::default()
    }
}

/// Reads one class of the runner's own agents' messages as they come and holds each for its agent.
async fn prefetch(env: Arc<Env>, consumer: PullConsumer, class: PriorityClass, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        let mut messages = match consumer.messages().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, class = class.as_str(), "failed to read messages; trying again");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        loop {
            let m = tokio::select! {
                _ = shutdown.cancelled() => return,
                m = messages.next() => m,
            };
            match m {
                Some(Ok(m)) => {
                    let Some(held) = open(&env, m).await else { continue };
                    // A reply that a call waits for goes to it at once: the waiting agent holds
                    // its slot, so it must not queue for one.
                    let Some(held) = to_waiter(&env, held).await else { continue };
                    let agent = held.envelope.for_agent.clone().or_else(|| held.envelope.to.agent.clone());
                    match agent {
                        Some(a) if env.ctx.agents.get(&a).is_some() => {
                            env.mailbox.hold(Queue::Agent(a), held)
                        }
                        _ => gone(&env, held).await,
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "reading messages failed; reading again");
                    break;
                }
                None => break,
            }
        }
    }
}

/// Takes a template's messages, most urgent class first, one at a time whenever an agent of it
/// here has a free slot and nothing of the template waits here already: so a busy runner leaves
/// them to another.
async fn take_for_template(
    env: Arc<Env>,
    template: String,
    consumers: Vec<(Source, PullConsumer)>,
    bells: Vec<String>,
    shutdown: CancellationToken,
) {
    let queue = Queue::Template(template.clone());
    // Core subscriptions on the same subjects ring when something arrives.
    let mut subscriptions = Vec::new();
    for subject in bells {
        match env.ctx.fleet.client.subscribe(subject).await {
            Ok(s) => subscriptions.push(s),
            Err(e) => tracing::warn!(error = %e, "no doorbell for template messages; polling"),
        }
    }
    let mut doorbell = (!subscriptions.is_empty()).then(|| futures::stream::select_all(subscriptions));
    while !shutdown.is_cancelled() {
        // Listening before looking, so a slot freed meanwhile is not missed.
        let freed = env.mailbox.freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        let free = env.ctx.agents.of_template(&template).0.iter().any(|s| s.permits.available_permits() > 0);
        let mut took = false;
        if free && env.mailbox.held_in(&queue) == 0 {
            for (source, consumer) in &consumers {
                let batch = match consumer.fetch().max_messages(1).messages().await {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::debug!(error = %e, "fetching template messages failed");
                        continue;
                    }
                };
                let got: Vec<Message> = batch.filter_map(|m| async { m.ok() }).collect().await;
                for m in got {
                    let opened = match source {
                        Source::Inbox => open(&env, m).await,
                        Source::Topics => open_topic(&env, &template, m).await,
                    };
                    if let Some(held) = opened {
                        env.mailbox.hold(queue.clone(), held);
                        took = true;
                    }
                }
                if took {
                    break;
                }
            }
        }
        if took {
            continue;
        }
        let rung = async {
            match doorbell.as_mut() {
                Some(d) => {
                    d.next().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = rung => {},
            _ = freed => {},
            _ = tokio::time::sleep(Duration::from_millis(250)) => {},
        }
    }
}

/// A topic event as a message for the template: its id names the template and the event's
/// sequence (so each template acts on each event once), its body is the payload (JSON, else
/// text), its sender the topic.
async fn open_topic(env: &Env, template: &str, m: Message) -> Option<Held> {
    // Over the limits of a topic message: it wakes no agent, and a dead letter says why.
    let ct = flotilla_service::nats::content_type(m.headers.as_ref()).map(str::to_owned);
    if let Err(e) =
        flotilla_protocol::limits::check(ct.as_deref(), &m.payload, &flotilla_protocol::limits::TOPIC)
    {
        refuse(env, AckGuard::new(m), "agent-runner.topics", e.code(), &e.message).await;
        return None;
    }
    let seq = m.info().map(|i| i.stream_sequence).unwrap_or_default();
    let topic = m
        .subject
        .as_str()
        .strip_prefix(&format!("{}.topics.", env.ctx.fleet.names.prefix()))
        .unwrap_or(m.subject.as_str())
        .to_owned();
    let msgpack = flotilla_service::nats::content_type(m.headers.as_ref())
        == Some(flotilla_protocol::headers::APPLICATION_MSGPACK);
    let body = serde_json::from_slice::<serde_json::Value>(&m.payload)
        .ok()
        .or_else(|| {
            msgpack
                .then(|| {
                    codec::decode::<serde_json::Value>(
                        Some(flotilla_protocol::headers::APPLICATION_MSGPACK),
                        &m.payload,
                    )
                    .ok()
                })
                .flatten()
        })
        .unwrap_or_else(|| serde_json::Value::String(String::from_utf8_lossy(&m.payload).into_owned()));
    let now = now_ms();
    let envelope = Envelope {
        id: format!("topic-{template}-{seq}"),
        from: flotilla_protocol::Party { topic: Some(topic), ..Default::default() },
        to: Address::template(template),
        for_agent: None,
        task_id: None,
        priority: flotilla_protocol::Priority::NORMAL,
        wants_reply: false,
        in_reply_to: None,
        body,
        sent_at_ms: now,
        expires_at_ms: u64::MAX,
    };
    Some(Held {
        guard: AckGuard::new(m),
        envelope,
        class: PriorityClass::Normal,
        held_at: tokio::time::Instant::now(),
    })
}

/// Decodes a stored message; an unreadable one is acked away with a dead letter.
async fn open(env: &Env, m: Message) -> Option<Held> {
    let guard = AckGuard::new(m);
    let msg = guard.message()?;
    match decode_payload::<Envelope>(msg.headers.as_ref(), &msg.payload) {
        Ok(envelope) => {
            let class = PriorityClass::of(envelope.priority);
            Some(Held { guard, envelope, class, held_at: tokio::time::Instant::now() })
        }
        Err(e) => {
            refuse(env, guard, "agent-runner.messages", e.reason.code(), &e.message).await;
            None
        }
    }
}

/// Acks away a stored message no agent may act on, with a dead letter saying why (given back
/// instead when the dead letter cannot be written).
async fn refuse(env: &Env, guard: AckGuard, source: &str, reason: &str, message: &str) {
    let Some(msg) = guard.message() else { return };
    tracing::warn!(subject = %msg.subject, reason, message, "stored message refused");
    let dl = flotilla_service::nats::dead_letter_of(msg, source, reason, message);
    if let Err(e) =
        env.ctx.fleet.dead_letter(flotilla_protocol::names::service::AGENT_RUNNER, &dl, None).await
    {
        tracing::error!(error = %e, "failed to write a dead letter");
        guard.nak(None).await;
        return;
    }
    guard.term().await;
}

/// Hands a reply to the call waiting for it (`None`: done), or gives the message back.
async fn to_waiter(env: &Env, held: Held) -> Option<Held> {
    let Some(original) = &held.envelope.in_reply_to else { return Some(held) };
    let waiter = env.mailbox.waiters.lock().ok().and_then(|mut w| w.remove(original));
    let Some(tx) = waiter else { return Some(held) };
    let e = held.envelope.clone();
    if tx.send(held.envelope.clone()).is_err() {
        // The wait ended a moment ago: the agent gets the reply as a message of its own.
        return Some(held);
    }
    let agent = e.for_agent.clone().or_else(|| e.to.agent.clone());
    event(env, &e, message_event::DELIVERED, agent.as_deref(), None).await;
    held.guard.ack().await;
    None
}

/// A message for an agent that has left this runner: it expires (the sender hears of it).
async fn gone(env: &Env, held: Held) {
    let why = ErrorInfo::new("agent_gone", "the agent left before it handled the message");
    if expire(env, &held.envelope, why).await {
        held.guard.ack().await;
    } else {
        held.guard.nak(Some(Duration::from_secs(1))).await;
    }
}

/// Hands held messages to agents with a free slot, until `shutdown`.
async fn dispatch(env: Arc<Env>, tracker: &TaskTracker, shutdown: CancellationToken) {
    loop {
        // Only the agents that have something waiting: their own queue, or their template's.
        let mut candidates: Vec<Arc<Slot>> = Vec::new();
        for queue in env.mailbox.waiting() {
            match queue {
                Queue::Agent(a) => candidates.extend(env.ctx.agents.get(&a)),
                Queue::Template(t) => candidates.extend(env.ctx.agents.of_template(&t).0),
            }
        }
        candidates.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        candidates.dedup_by(|a, b| a.agent_id == b.agent_id);
        for slot in candidates {
            if slot.in_error() || slot.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                continue;
            }
            while let Ok(permit) = slot.permits.clone().try_acquire_owned() {
                let Some(held) = env.mailbox.take_for(&slot.agent_id, &slot.template.name) else {
                    drop(permit);
                    break;
                };
                let (env, slot) = (env.clone(), slot.clone());
                let span = tracing::info_span!(
                    "message",
                    message_id = %held.envelope.id,
                    agent_id = %slot.agent_id,
                    from = %held.envelope.from,
                );
                // The sender's trace, carried in the stored message's headers.
                flotilla_service::trace::continue_from(
                    &span,
                    held.guard.message().and_then(|m| m.headers.as_ref()),
                );
                tracker.spawn(
                    async move {
                        let freed = env.mailbox.freed_on_drop();
                        handle(&env, &slot, held).await;
                        drop(permit);
                        drop(freed);
                    }
                    .instrument(span),
                );
            }
        }
        // Held messages of a template with no agent here taking work any more (the last one is
        // leaving) go back for the other runners.
        for queue in env.mailbox.waiting() {
            if let Queue::Template(t) = &queue
                && env.ctx.agents.of_template(t).0.is_empty()
            {
                env.mailbox.release(|q| q == &queue).await;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = env.mailbox.wake.notified() => {},
            // Slots also free up when tasks end.
            _ = tokio::time::sleep(Duration::from_millis(50)) => {},
        }
    }
}

/// How taking a message ended.
enum Taken {
    /// Ours to act on: from this record revision (a message that wants a reply), or with no
    /// record until it is handled (one that does not).
    Act(Option<u64>),
    /// Already handled (or expired): ack it again, once what the record says is told.
    Done(Box<MessageRecord>),
}

/// Takes the message for `slot`. One that wants a reply is recorded as handling first, so only
/// the run holding the record's revision sends the reply and records it handled. One that does
/// not is only looked up: its one record is written when it is handled, which is one stored
/// write less on its way (a second, concurrent run would act on it either way: a taken-over
/// record does not stop the first run's agent either).
async fn take(env: &Env, slot: &Slot, e: &Envelope) -> Result<Taken, FleetError> {
    let fleet = &env.ctx.fleet;
    let store = &env.ctx.topology.messages;
    let record = MessageRecord {
        id: e.id.clone(),
        state: MessageState::Handling,
        agent_id: slot.agent_id.clone(),
        runner_id: env.ctx.runner_id.clone(),
        from: e.from.clone(),
        wants_reply: e.wants_reply,
        task_id: e.task_id.clone(),
        at_ms: now_ms(),
        reply_id: None,
    };
    if !e.wants_reply {
        return match fleet.kv_get::<MessageRecord>(store, &e.id).await? {
            None => Ok(Taken::Act(None)),
            Some((found, rev)) => match found.state {
                MessageState::Handling => {
                    Ok(Taken::Act(Some(fleet.kv_update(store, &e.id, &record, rev).await?)))
                }
                MessageState::Handled | MessageState::Expired => Ok(Taken::Done(Box::new(found))),
            },
        };
    }
    match fleet.kv_create(store, &e.id, &record).await {
        Ok(rev) => return Ok(Taken::Act(Some(rev))),
        Err(err) if err.is_conflict() => {}
        Err(err) => return Err(err),
    }
    let Some((found, rev)) = fleet.kv_get::<MessageRecord>(store, &e.id).await? else {
        return Err(FleetError::Conflict { key: e.id.clone() });
    };
    match found.state {
        // Taken before by a run that did not finish (a crash): take it again, fenced.
        MessageState::Handling => Ok(Taken::Act(Some(fleet.kv_update(store, &e.id, &record, rev).await?))),
        MessageState::Handled | MessageState::Expired => Ok(Taken::Done(Box::new(found))),
    }
}

/// Handles one message on `slot` (a slot permit is held).
async fn handle(env: &Env, slot: &Arc<Slot>, held: Held) {
    // A reply whose wait began after it was held here still goes to the wait.
    let Some(held) = to_waiter(env, held).await else { return };
    let Held { guard, envelope: e, .. } = held;
    if e.expires_at_ms <= now_ms() {
        let why = ErrorInfo::new("expired", "the message waited longer than its TTL");
        if !expire(env, &e, why.clone()).await || (e.wants_reply && !tell_expired(env, slot, &e, why).await) {
            guard.nak(Some(Duration::from_secs(1))).await;
            return;
        }
        guard.ack().await;
        return;
    }
    let rev = match take(env, slot, &e).await {
        Ok(Taken::Act(rev)) => rev,
        Ok(Taken::Done(found)) => {
            // An earlier run recorded the answer and may have died before its event was
            // stored: the event goes again (the same de-duplication id, so it is stored once).
            if found.state == MessageState::Handled
                && !event(env, &e, message_event::ANSWERED, Some(&found.agent_id), found.reply_id.as_deref())
                    .await
            {
                guard.nak(Some(Duration::from_secs(1))).await;
                return;
            }
            guard.ack().await;
            return;
        }
        Err(err) => {
            tracing::warn!(error = %err, "could not record taking the message; it comes again");
            guard.nak(Some(Duration::from_secs(1))).await;
            return;
        }
    };
    event(env, &e, message_event::DELIVERED, Some(&slot.agent_id), None).await;
    let every = env.ack_wait / 3;
    // Unique to this take, like an attempt's claim: the record's revision, else the delivery.
    let take_key = rev.map_or_else(|| format!("d{}", guard.delivered()), |r| r.to_string());
    let answer = guard.with_progress(every, env.ctx.max_task_time, act(env, slot, &e, &take_key)).await;
    let reply_id = if e.wants_reply {
        let body = match &answer {
            Ok(text) => serde_json::json!({ "text": text }),
            Err(err) => serde_json::json!({ "error": err }),
        };
        match reply(env, slot, &e, body).await {
            Ok(id) => Some(id),
            Err(err) => {
                tracing::warn!(error = %err.message, "the reply was not sent; the message comes again");
                guard.nak(Some(Duration::from_secs(1))).await;
                return;
            }
        }
    } else {
        None
    };
    if let Err(err) = &answer {
        tracing::info!(code = %err.code, error = %err.message, "the agent's work on a message failed");
    }
    let done = MessageRecord {
        id: e.id.clone(),
        state: MessageState::Handled,
        agent_id: slot.agent_id.clone(),
        runner_id: env.ctx.runner_id.clone(),
        from: e.from.clone(),
        wants_reply: e.wants_reply,
        task_id: e.task_id.clone(),
        at_ms: now_ms(),
        reply_id: reply_id.clone(),
    };
    let store = &env.ctx.topology.messages;
    let recorded = match rev {
        Some(rev) => env.ctx.fleet.kv_update(store, &e.id, &done, rev).await,
        None => env.ctx.fleet.kv_create(store, &e.id, &done).await,
    };
    if let Err(err) = recorded {
        // Another delivery recorded it or took it over meanwhile (this run was thought dead):
        // it decides; or the store failed, and the message comes again.
        tracing::warn!(error = %err, "the message's record moved on; leaving it to the other run");
        guard.release();
        return;
    }
    // Acked only once the event is stored: a redelivery finds the record and tells it again.
    if !event(env, &e, message_event::ANSWERED, Some(&slot.agent_id), reply_id.as_deref()).await {
        guard.nak(Some(Duration::from_secs(1))).await;
        return;
    }
    guard.ack().await;
}

/// Runs the agent's loop on the message; the answer's text, or why there is none.
async fn act(env: &Env, slot: &Arc<Slot>, e: &Envelope, take_key: &str) -> Result<String, ErrorInfo> {
    let ctx = &env.ctx;
    let Some(provider) = ctx.providers.get(&slot.template.name).cloned() else {
        return Err(ErrorInfo::new("crashed", format!("no provider for template {}", slot.template.name)));
    };
    let rec = e.work_record(&slot.template.tenant, &slot.agent_id, &ctx.runner_id, now_ms());
    let cancel = ctx.abort.child_token();
    let _stop_tools = cancel.clone().drop_guard();
    let mut template = (*slot.template).clone();
    let about = match (&e.in_reply_to, &e.task_id) {
        _ if e.from.topic.is_some() => format!("This is an event on {}.", e.from),
        (Some(orig), _) => format!("This is {}'s reply to your message {orig}.", e.from),
        (None, Some(task)) => format!("This is a message from {} about task {task}.", e.from),
        (None, None) => format!("This is a message from {}.", e.from),
    };
    let ask = if e.wants_reply { " Your final answer is sent back to the sender." } else { "" };
    template.system_prompt = format!("{}\n\n{about}{ask}", template.system_prompt).trim_start().to_owned();
    let template = Arc::new(template);
    let states = crate::lifecycle::TaskStates::new(slot.lifecycle.clone(), rec.id.clone());
    let loop_env = agent_loop::Env {
        states: states.clone(),
        provider,
        template: template.clone(),
        registry: ctx.registry.clone(),
        tool_ctx: crate::tools::ToolCtx {
            message_id: Some(e.id.clone()),
            ..ctx.tool_ctx(slot, &rec, cancel.clone(), states, template.max_tokens_per_task)
        },
        budgets: ctx.budgets.clone().map(|client| crate::budget::Budgets {
            client,
            // Unique to this take of the message, like an attempt's claim.
            key: format!("{}:{take_key}", rec.id),
            agent_id: slot.agent_id.clone(),
            task: None,
            tenant: Some(rec.tenant.clone()),
            priority: rec.priority,
            deadline_ms: Some(e.expires_at_ms.max(now_ms().saturating_add(60_000))),
        }),
        report_steps: false,
        // A message's handling belongs to no task: it has no transcript of its own.
        transcript: None,
    };
    slot.in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let result = agent_loop::run(&loop_env, &rec).await;
    slot.in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    let crashed = match &result {
        Err(agent_loop::LoopError::Crashed(why)) => {
            Some(format!("{}: {why}", flotilla_protocol::names::CRASHED_REASON))
        }
        _ => None,
    };
    slot.lifecycle.finish(&rec.id, crashed.as_deref());
    match result {
        Ok(answer) => Ok(answer.text),
        Err(agent_loop::LoopError::Failed { error, .. }) => Err(error),
        Err(agent_loop::LoopError::Crashed(why)) => Err(ErrorInfo::new("crashed", why)),
        Err(agent_loop::LoopError::Infrastructure(err)) => {
            Err(ErrorInfo::new("unavailable", err.to_string()))
        }
    }
}

/// Sends the answer to `e` back to its sender through the router; its id.
async fn reply(env: &Env, slot: &Slot, e: &Envelope, body: serde_json::Value) -> Result<String, ErrorInfo> {
    let id = reply_id(&e.id);
    let to = match (&e.from.agent, &e.from.client) {
        (Some(a), _) => Address::agent(a),
        (None, Some(c)) => Address { client: Some(c.clone()), ..Default::default() },
        _ => return Err(ErrorInfo::new("invalid_request", "the sender cannot be answered")),
    };
    let m = MessageSend {
        id: Some(id.clone()),
        from: Some(slot.agent_id.clone()),
        to,
        task_id: e.task_id.clone(),
        priority: Some(e.priority),
        in_reply_to: Some(e.id.clone()),
        body,
        ..Default::default()
    };
    let answer = send(&env.ctx.fleet, &env.ctx.runner_id, &m).await?;
    match answer.error {
        // The sender has gone: nobody to tell, the message is still handled.
        Some(err) if err.code == "unknown_agent" => {
            tracing::info!(error = %err.message, "the sender has gone; the reply is dropped");
            Ok(id)
        }
        Some(err) => Err(err),
        None => Ok(id),
    }
}

/// The id of the reply to message `id`: the same for every run, so a reply sent twice is stored
/// once.
pub fn reply_id(id: &str) -> String {
    format!("re{}", uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, id.as_bytes()).simple())
}

/// Asks the router to send `m` for one of this runner's agents.
pub async fn send(fleet: &Fleet, runner_id: &str, m: &MessageSend) -> Result<SendReply, ErrorInfo> {
    let body = fleet.encode(m).map_err(|e| ErrorInfo::new("unavailable", e.to_string()))?;
    let mut last = None;
    // The router may be starting (no responders): ask again for a few seconds.
    for _ in 0..20 {
        let request = async_nats::Request::new()
            .payload(body.clone())
            .headers(fleet.headers(None))
            .timeout(Some(Duration::from_secs(10)));
        match fleet.client.send_request(fleet.names.msg_send_runner(runner_id), request).await {
            Ok(msg) => {
                return codec::decode::<SendReply>(None, &msg.payload).map_err(|e| {
                    ErrorInfo::new("unavailable", format!("unreadable answer of the router: {e}"))
                });
            }
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(ErrorInfo::new("unavailable", format!("the router did not answer: {e}"))),
        }
    }
    Err(ErrorInfo::new(
        "unavailable",
        format!("no message router is running: {}", last.map(|e| e.to_string()).unwrap_or_default()),
    ))
}

/// Tells a sender waiting for the answer to `e` that it expired: the record says so (which is
/// what lets this agent answer it), then an answer with the error goes back. False when that
/// could not be done (the message comes again).
async fn tell_expired(env: &Env, slot: &Slot, e: &Envelope, why: ErrorInfo) -> bool {
    let record = MessageRecord {
        id: e.id.clone(),
        state: MessageState::Expired,
        agent_id: slot.agent_id.clone(),
        runner_id: env.ctx.runner_id.clone(),
        from: e.from.clone(),
        wants_reply: true,
        task_id: e.task_id.clone(),
        at_ms: now_ms(),
        reply_id: Some(reply_id(&e.id)),
    };
    match env.ctx.fleet.kv_create(&env.ctx.topology.messages, &e.id, &record).await {
        Ok(_) => {}
        // Already recorded (handled, or expired by an earlier delivery): nothing more to say.
        Err(err) if err.is_conflict() => return true,
        Err(err) => {
            tracing::warn!(error = %err, "could not record the expiry");
            return false;
        }
    }
    match reply(env, slot, e, serde_json::json!({ "error": why })).await {
        Ok(_) => true,
        Err(err) => {
            tracing::warn!(error = %err.message, "could not tell the sender of the expiry");
            // The record says expired: a redelivery finds it and only acks.
            true
        }
    }
}

/// Records that `e` expired unhandled (a sender waiting for its reply times out); false when the
/// event could not be stored (the message comes again).
async fn expire(env: &Env, e: &Envelope, why: ErrorInfo) -> bool {
    tracing::info!(code = %why.code, "message expired: {}", why.message);
    event(env, e, message_event::EXPIRED, None, None).await
}

/// Publishes a message event of `e`; false when it could not be stored.
async fn event(env: &Env, e: &Envelope, kind: &str, agent: Option<&str>, reply: Option<&str>) -> bool {
    match env.ctx.fleet.publish_message_event(&event_of(e, kind, agent, reply)).await {
        Ok(()) => true,
        Err(err) => {
            tracing::warn!(error = %err, kind, "failed to publish a message event");
            false
        }
    }
}

/// The message event `kind` of `e`.
fn event_of(e: &Envelope, kind: &str, agent: Option<&str>, reply: Option<&str>) -> MessageEvent {
    MessageEvent {
        message_id: e.id.clone(),
        kind: kind.to_owned(),
        at_ms: now_ms(),
        from: e.from.to_string(),
        to: e.to.to_string(),
        task_id: e.task_id.clone(),
        priority: Some(e.priority),
        agent_id: agent.map(str::to_owned),
        seq: None,
        in_reply_to: e.in_reply_to.clone().or_else(|| reply.map(str::to_owned)),
        error: None,
        rule: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_urgent_class_goes_first_and_aging_lifts_the_old() {
        let now = tokio::time::Instant::now();
        let ago = |s: u64| now.checked_sub(Duration::from_secs(s)).unwrap();
        let aging = Duration::from_secs(30);
        // A fresh critical message beats a batch one that has waited a little.
        assert_eq!(most_urgent(&[(0, 3, ago(10)), (0, 0, ago(0))], now, aging), Some((0, 0)));
        // A batch message that waited three agings counts as critical: the class as sent breaks
        // the tie; one aging more and it goes before any fresh critical message.
        assert_eq!(most_urgent(&[(0, 3, ago(95)), (0, 0, ago(0))], now, aging), Some((0, 0)));
        assert_eq!(most_urgent(&[(0, 3, ago(125)), (0, 0, ago(0))], now, aging), Some((0, 3)));
        // Equal after aging: the class as sent decides.
        assert_eq!(most_urgent(&[(0, 2, ago(31)), (1, 1, ago(0))], now, aging), Some((1, 1)));
        // Strict precedence without aging; the template's queue competes like the agent's own.
        assert_eq!(most_urgent(&[(0, 3, ago(10_000)), (1, 2, ago(0))], now, Duration::ZERO), Some((1, 2)));
        assert_eq!(most_urgent(&[], now, aging), None);
    }
}
