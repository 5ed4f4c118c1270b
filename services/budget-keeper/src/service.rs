//! The budget service: the operations of [`BudgetOp`] on `<p>.budget.<op>` (a NATS micro
//! service, `flotilla-budget`), each request decoded once into a [`BudgetCommand`] and answered
//! from the [`Ledger`] by the keeper that holds the lease ([`crate::leader`]). Every change is
//! recorded in the ledger stream, fenced by the stream's last sequence, and stored before it is
//! answered; on taking the lease the ledger is rebuilt by replaying that stream. Requests that
//! arrive together are decided together and their entries written together (one round trip for
//! the batch), which is what lets one hot budget take more reservations per second than there
//! are round trips. A reservation that needs a permit of a rate limit with none free waits here,
//! in priority order, until one is (or answers `rate_limited` after [`MAX_WAIT`]).

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::kv;
use async_nats::jetstream::object_store::ObjectStore;
use async_nats::service::ServiceExt as _;
use async_nats::service::endpoint::Endpoint;
use bytes::Bytes;
use flotilla_protocol::{
    BackoffRequest, BudgetCommand, BudgetEvent, BudgetOp, BudgetOperation, BudgetReply, BudgetStatus,
    CarveRequest, CloseRequest, CommitRequest, ErrorInfo, Expiry, LedgerChange, LedgerEntry, PriceRequest,
    Priority, RateRequest, RateStatus, ReleaseRequest, ReserveRequest, SetRequest, ShowRequest, WireFormat,
    codec, headers, time::now_ms,
};
use flotilla_service::Fleet;
use flotilla_service::nats::{FleetError, Pending};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::ledger::{
    Alert, AlertKind, End, Grant, Ledger, Limit, Policy, Price, Refusal, Reserve, Rules, UNLIMITED, Window,
    is_default,
};
use crate::snapshot::Snapshot;

/// Most requests decided in one batch.
const BATCH: usize = 512;
/// How often waiting reservations are looked at again.
const WAIT_POLL: Duration = Duration::from_millis(25);

/// What a keeper needs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Length of the leader lease.
    pub lease: Duration,
    /// Ledger entries between two snapshots of the state (0: none).
    pub snapshot_every: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self { lease: Duration::from_secs(3), snapshot_every: 10_000 }
    }
}

/// How long an ended reservation is remembered for repeated operations.
const REMEMBER_MS: u64 = 15 * 60 * 1000;

/// Lease of a reservation whose request names none.
const DEFAULT_LEASE_MS: u64 = 5 * 60 * 1000;
/// Longest pause a provider's 429 may impose: a bogus hint must not stop the fleet for long.
const MAX_BACKOFF_MS: u64 = 10 * 60 * 1000;
/// Window of a rate limit whose request names none.
const DEFAULT_RATE_WINDOW_MS: u64 = 60_000;

/// Rebuilds the ledger: the last snapshot (if any, and usable), then the ledger stream's entries
/// after it, in order. Returns the ledger with the stream's last sequence. An entry whose replayed
/// answer differs from the recorded one is logged (it would mean the replay is not faithful).
#[tracing::instrument(skip_all)]
pub async fn rebuild(fleet: &Fleet, snapshots: Option<&ObjectStore>) -> anyhow::Result<(Ledger, u64)> {
    let mut stream =
        fleet.js.get_stream(fleet.names.ledger_stream()).await.context("failed to open the ledger stream")?;
    let state = stream.info().await.context("failed to read the ledger stream")?.state.clone();
    let (first, last) = (state.first_sequence, state.last_sequence);
    let (mut ledger, from) = match load_snapshot(snapshots).await {
        // A snapshot from beyond the stream's end belongs to another stream: not used.
        Some(s) if s.seq <= last => (s.ledger, s.seq),
        _ => (Ledger::new(REMEMBER_MS), 0),
    };
    ledger.remember_ms = REMEMBER_MS;
    if last == from {
        return Ok((ledger, last));
    }
    anyhow::ensure!(
        first <= from + 1 || state.messages == 0,
        "the ledger stream starts at entry {first} but the state is only known up to entry {from}: \
         entries are missing (was the stream given an age limit?)"
    );
    let mut msgs = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: from + 1 },
            ..Default::default()
        })
        .await
        .context("failed to replay the ledger")?
        .messages()
        .await
        .context("failed to replay the ledger")?;
    let mut differ = 0u64;
    while let Some(msg) = msgs.next().await {
        let msg = msg.context("ledger replay failed")?;
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(last);
        match codec::decode::<LedgerEntry>(None, &msg.payload) {
            Ok(e) => {
                if let Some(reply) = apply_entry(&mut ledger, &e)
                    && reply != e.reply
                {
                    differ += 1;
                    if differ <= 10 {
                        tracing::error!(seq, op = %e.op(), recorded = ?e.reply, replayed = ?reply, "replayed answer differs");
                    }
                }
            }
            Err(e) => tracing::error!(seq, error = %e, "unreadable ledger entry skipped"),
        }
        if seq >= last {
            break;
        }
    }
    // Bring the reporting state up to date without reporting again what was reported before.
    let _ = ledger.alerts(now_ms());
    if from > 0 {
        tracing::info!(snapshot = from, replayed = last - from, "ledger rebuilt from a snapshot");
    }
    if differ > 0 {
        tracing::error!(differ, "the replay answered differently from the live keeper");
    }
    Ok((ledger, last))
}

/// The last snapshot, if there is one and it can be read (else the whole ledger is replayed).
async fn load_snapshot(snapshots: Option<&ObjectStore>) -> Option<Snapshot> {
    match crate::snapshot::load(snapshots?).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "ledger snapshot unusable; replaying the whole ledger");
            None
        }
    }
}

/// Applies one recorded change at its time. Returns the answer a command gets now, to compare
/// with the recorded one; `None` for an expiry and the budget events (recorded for auditors,
/// nothing to answer).
pub fn apply_entry(ledger: &mut Ledger, entry: &LedgerEntry) -> Option<BudgetReply> {
    let at = entry.at_ms;
    let (reply, _changed) = match &entry.change {
        LedgerChange::Reserve(r) => reserve(ledger, r, at),
        LedgerChange::Commit(r) => commit(ledger, r, at),
        LedgerChange::Release(r) => release(ledger, r, at),
        LedgerChange::Set(r) => set(ledger, r, at),
        LedgerChange::Carve(r) => carve(ledger, r, at),
        LedgerChange::Close(r) => close(ledger, r, at),
        LedgerChange::Rate(r) => rate(ledger, r, at),
        LedgerChange::Backoff(r) => backoff(ledger, r, at),
        LedgerChange::Price(r) => price(ledger, r),
        LedgerChange::Expire(e) => {
            expire(ledger, e, at);
            return None;
        }
        LedgerChange::Warning(_) | LedgerChange::Exhausted(_) | LedgerChange::Refilled(_) => return None,
    };
    Some(reply)
}

/// Serves budget requests while this keeper holds the lease, until `shutdown`.
pub async fn serve(
    fleet: Fleet,
    store: kv::Store,
    snapshots: ObjectStore,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let me = fleet.instance.clone();
    loop {
        let Some(held) = crate::leader::acquire(&store, &me, settings.lease, &shutdown).await else {
            return Ok(());
        };
        let lost = shutdown.child_token();
        let keeper =
            tokio::spawn(crate::leader::keep(store.clone(), me.clone(), settings.lease, held, lost.clone()));
        let result = serve_as_leader(&fleet, &snapshots, &settings, &lost).await;
        let resigning = shutdown.is_cancelled();
        lost.cancel();
        let _ = keeper.await;
        match result {
            Ok(()) if resigning => {
                crate::leader::resign(&store, &me).await;
                return Ok(());
            }
            Ok(()) => tracing::warn!("no longer the active budget-keeper"),
            Err(e) => {
                tracing::error!(error = %e, "budget-keeper stepped down");
                // Let another keeper try before this one does again.
                crate::leader::resign(&store, &me).await;
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(settings.lease) => {}
                }
            }
        }
    }
}

/// Longest a reservation waits here for a rate permit before it is answered `rate_limited` (the
/// caller asks again; a NATS request should not wait much longer).
pub const MAX_WAIT: Duration = Duration::from_secs(10);
/// How long a place in line waits for its caller to ask again.
const PLACE_KEPT: Duration = Duration::from_secs(1);

/// A reservation waiting for a rate permit.
struct Waiter {
    caller: Caller,
    request: ReserveRequest,
    priority: Priority,
    since: Instant,
    order: u64,
}

/// The place in line of a waiter that was answered `rate_limited` after [`MAX_WAIT`]: kept for
/// [`PLACE_KEPT`], so its caller asking again (same id) gets its place back, and nobody behind it
/// gets a permit in between.
struct Place {
    id: String,
    rates: Vec<String>,
    priority: Priority,
    order: u64,
    until: Instant,
}

/// A decided request, its answer and the entry that records it.
struct Decided {
    caller: Caller,
    reply: BudgetReply,
    entry: Option<LedgerEntry>,
}

/// Why serving stopped.
#[derive(Debug, thiserror::Error)]
enum Stop {
    #[error("another budget-keeper wrote to the ledger")]
    Fenced,
    #[error("the ledger could not be rebuilt after a failed write: {0}")]
    Rebuild(String),
}

/// The active keeper's state.
struct Keeper<'a> {
    fleet: &'a Fleet,
    snapshots: &'a ObjectStore,
    snapshot_every: u64,
    /// The entry of the last snapshot taken (or loaded), and the one being saved.
    snapshot_seq: u64,
    saving: Option<tokio::task::JoinHandle<()>>,
    ledger: Ledger,
    /// The ledger stream's last sequence as this keeper knows it (the fence of its next write).
    last_seq: u64,
    waiters: Vec<Waiter>,
    places: Vec<Place>,
    order: u64,
}

async fn serve_as_leader(
    fleet: &Fleet,
    snapshots: &ObjectStore,
    settings: &Settings,
    lost: &CancellationToken,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let (ledger, last_seq) = rebuild(fleet, Some(snapshots)).await?;
    tracing::info!(
        entries = last_seq,
        scopes = ledger.scopes().count(),
        took_ms = started.elapsed().as_millis(),
        "active budget-keeper: ledger rebuilt"
    );
    let mut keeper = Keeper::new(fleet, snapshots, settings.snapshot_every, ledger, last_seq);
    let svc = fleet
        .client
        .service_builder()
        .description(format!(
            "Flotilla budgets: {}",
            BudgetOp::ALL.iter().map(|op| op.as_str()).collect::<Vec<_>>().join(", ")
        ))
        .start("flotilla-budget", env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| anyhow::anyhow!("failed to start the budget micro service: {e}"))?;
    let mut endpoints: Vec<futures::stream::BoxStream<'static, (BudgetOp, async_nats::service::Request)>> =
        Vec::new();
    for &op in BudgetOp::ALL {
        let ep: Endpoint = svc
            .endpoint_builder()
            .name(op.as_str())
            .add(fleet.names.budget_subject(op.as_str()))
            .await
            .map_err(|e| anyhow::anyhow!("failed to add the {op} endpoint: {e}"))?;
        endpoints.push(ep.map(move |r| (op, r)).boxed());
    }
    let mut requests = futures::stream::select_all(endpoints);
    let own = format!("{}.", fleet.names.prefix());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut poll = tokio::time::interval(WAIT_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        let first = tokio::select! {
            _ = lost.cancelled() => break Ok(()),
            _ = tick.tick() => {
                if let Err(e) = keeper.round(Vec::new(), true).await {
                    break Err(e);
                }
                continue;
            }
            _ = poll.tick(), if keeper.has_waiting() => {
                if let Err(e) = keeper.round(Vec::new(), false).await {
                    break Err(e);
                }
                continue;
            }
            r = requests.next() => match r { Some(r) => r, None => break Ok(()) },
        };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match futures::FutureExt::now_or_never(requests.next()) {
                Some(Some(r)) => batch.push(r),
                _ => break,
            }
        }
        let items = batch.into_iter().filter_map(|(op, req)| receive(op, req, &own)).collect();
        if let Err(e) = keeper.round(items, false).await {
            break Err(e);
        }
    };
    // Stop taking requests before anything else: a standby answers them from now on.
    let _ = svc.stop().await;
    keeper.hand_over().await;
    result.map_err(anyhow::Error::from)
}

/// Who asked, and how to answer them.
struct Caller {
    request: async_nats::service::Request,
    format: WireFormat,
}

/// A request as received: who asked, and the command they asked for (or the refusal to answer
/// them with: the payload was no such request).
struct Incoming {
    pub caller: Caller,
    pub command: Result<BudgetCommand, BudgetReply>,
}

/// Takes a request of `op` in: `None` (dropped, with a warning) when its reply subject is one the
/// keeper must not write to (see [`reply_allowed`]), else the request decoded.
#[tracing::instrument(level = "debug", skip_all, fields(op = %op))]
fn receive(op: BudgetOp, request: async_nats::service::Request, own_prefix: &str) -> Option<Incoming> {
    if !reply_allowed(request.message.reply.as_deref().unwrap_or_default(), own_prefix) {
        tracing::warn!(
            op = %op,
            reply = ?request.message.reply,
            "request with a reply subject into the fleet's own or the system's subjects dropped"
        );
        return None;
    }
    let ct = request
        .message
        .headers
        .as_ref()
        .and_then(|h| h.get(headers::CONTENT_TYPE))
        .map(|v| v.as_str().to_owned());
    let format = if codec::is_json(ct.as_deref(), &request.message.payload) {
        WireFormat::Json
    } else {
        WireFormat::Msgpack
    };
    let command = BudgetCommand::decode(op, ct.as_deref(), &request.message.payload)
        .map_err(|error| BudgetReply { error: Some(error), ..Default::default() });
    if let Err(reply) = &command {
        tracing::debug!(error = ?reply.error, "budget request refused undecoded");
    }
    Some(Incoming { caller: Caller { request, format }, command })
}

/// A reply may not go where it would be stored or acted on: the fleet's own subjects (its
/// streams, the ledger among them) or the server's (`$JS`, `$KV`, `$O`, `$SRV`, `$SYS`). Answering
/// there would let any client write into the ledger and knock the keeper off its fence.
fn reply_allowed(reply: &str, own_prefix: &str) -> bool {
    !reply.is_empty()
        && !reply.starts_with(own_prefix)
        && !["$JS.", "$KV.", "$O.", "$SRV.", "$SYS.", "$JSC."].iter().any(|p| reply.starts_with(p))
}

impl Caller {
    /// Answers, in the format the request came in.
    async fn answer(self, reply: BudgetReply) {
        let body = codec::encode(self.format, &reply)
            .map(Bytes::from)
            .map_err(|e| async_nats::service::error::Error { status: e.to_string(), code: 500 });
        if let Err(e) = self.request.respond(body).instrument(tracing::debug_span!("respond")).await {
            tracing::debug!(error = %e, "failed to answer a budget request");
        }
    }
}

/// The entry recording a decided command, if it changed the ledger.
fn entry_of(command: BudgetCommand, changed: bool, at_ms: u64, reply: &BudgetReply) -> Option<LedgerEntry> {
    let change = command.into_change().filter(|_| changed)?;
    Some(LedgerEntry { change, at_ms, reply: reply.clone() })
}

impl<'a> Keeper<'a> {
    /// A keeper with the `ledger` rebuilt up to the ledger stream's entry `last_seq`.
    fn new(
        fleet: &'a Fleet,
        snapshots: &'a ObjectStore,
        snapshot_every: u64,
        ledger: Ledger,
        last_seq: u64,
    ) -> Self {
        Self {
            fleet,
            snapshots,
            snapshot_every,
            snapshot_seq: last_seq,
            saving: None,
            ledger,
            last_seq,
            waiters: Vec::new(),
            places: Vec::new(),
            order: 0,
        }
    }

    /// True while reservations wait for permits or places in line are kept (then the waiters
    /// are looked at often).
    fn has_waiting(&self) -> bool {
        !self.waiters.is_empty() || !self.places.is_empty()
    }

    /// One round: decides the new requests (a reservation that must wait for a rate permit
    /// joins the waiters), then the waiters in priority order, expires leases when `expire`,
    /// writes every change (and budget event) in one go, and answers.
    #[tracing::instrument(skip_all, fields(new = items.len(), waiting = self.waiters.len()))]
    async fn round(&mut self, items: Vec<Incoming>, expire: bool) -> Result<(), Stop> {
        let now = now_ms();
        let mut decided: Vec<Decided> = Vec::with_capacity(items.len());
        let mut entries_only: Vec<LedgerEntry> = Vec::new();
        // Rate limits with waiters: a newcomer queues behind them, whatever its priority (the
        // waiters are sorted below).
        let waiting: HashSet<String> = self
            .waiters
            .iter()
            .flat_map(|w| w.request.rates.clone())
            .chain(self.places.iter().filter(|p| p.until > Instant::now()).flat_map(|p| p.rates.clone()))
            .collect();
        for Incoming { caller, command } in items {
            let command = match command {
                Ok(c) => c,
                Err(reply) => {
                    decided.push(Decided { caller, reply, entry: None });
                    continue;
                }
            };
            let command = match command {
                // (A reservation asked again that already holds its permit is answered at once.)
                BudgetCommand::Reserve(r)
                    if !self.ledger.is_open(&r.id) && r.rates.iter().any(|k| waiting.contains(k)) =>
                {
                    self.wait(caller, r);
                    continue;
                }
                other => other,
            };
            let (mut reply, changed) = apply(&mut self.ledger, &command, now);
            if is_code(&reply, "rate_limited")
                && let BudgetCommand::Reserve(r) = command
            {
                self.wait(caller, r);
                continue;
            }
            if let Some(rate) = reply.rate.as_mut() {
                rate.waiting =
                    self.waiters.iter().filter(|w| w.request.rates.contains(&rate.rate)).count() as u64;
            }
            let entry = entry_of(command, changed, now, &reply);
            decided.push(Decided { caller, reply, entry });
        }
        self.decide_waiters(now, &mut decided);
        if expire {
            for id in self.ledger.expire(now) {
                tracing::info!(reservation = %id, "reservation lease ran out; tokens released");
                entries_only.push(LedgerEntry {
                    change: LedgerChange::Expire(Expiry { id }),
                    at_ms: now,
                    reply: BudgetReply::default(),
                });
            }
        }
        for alert in self.ledger.alerts(now) {
            entries_only.push(self.alert_entry(&alert, now));
        }
        self.record_and_answer(decided, entries_only).await?;
        self.snapshot_if_due();
        Ok(())
    }

    /// Answers every waiter `unavailable` (the keeper is handing over to another).
    async fn hand_over(&mut self) {
        for w in std::mem::take(&mut self.waiters) {
            w.caller.answer(refused("unavailable", "the budget-keeper is handing over")).await;
        }
    }

    /// Saves a snapshot (in the background, one at a time) once enough entries came after the
    /// last one.
    fn snapshot_if_due(&mut self) {
        if self.snapshot_every == 0 || self.last_seq < self.snapshot_seq.saturating_add(self.snapshot_every) {
            return;
        }
        if self.saving.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let (store, ledger, seq) = (self.snapshots.clone(), self.ledger.clone(), self.last_seq);
        self.snapshot_seq = seq;
        self.saving = Some(tokio::spawn(async move {
            if let Err(e) = crate::snapshot::save(&store, ledger, seq).await {
                tracing::warn!(error = %e, "failed to save a ledger snapshot; the next one will try again");
            }
        }));
    }

    fn wait(&mut self, caller: Caller, request: ReserveRequest) {
        let priority = request.priority.unwrap_or_default();
        // The same reservation asked again while it waits (its caller timed out): the newer
        // request takes the older one's place; the older one's caller is gone.
        if let Some(w) = self.waiters.iter_mut().find(|w| w.request.id == request.id) {
            w.caller = caller;
            w.request = request;
            w.since = Instant::now();
            return;
        }
        // A caller asking again after `rate_limited` gets its place in line back.
        let kept = self.places.iter().position(|p| p.id == request.id).map(|i| self.places.remove(i));
        let order = match kept {
            Some(p) => p.order,
            None => {
                self.order += 1;
                self.order
            }
        };
        self.waiters.push(Waiter { caller, request, priority, since: Instant::now(), order });
    }

    /// Gives waiting reservations their permits, most urgent first; once one waiter of a rate
    /// limit cannot have a permit, no later one of that limit gets one in this round.
    fn decide_waiters(&mut self, now: u64, decided: &mut Vec<Decided>) {
        self.places.retain(|p| p.until > Instant::now());
        if self.waiters.is_empty() {
            return;
        }
        self.waiters.sort_by_key(|w| (w.priority, w.order));
        // Places in line whose callers are about to ask again block their limits for everyone
        // behind them.
        let places: Vec<(Priority, u64, Vec<String>)> =
            self.places.iter().map(|p| (p.priority, p.order, p.rates.clone())).collect();
        let mut blocked: HashSet<String> = HashSet::new();
        let mut still = Vec::new();
        for w in std::mem::take(&mut self.waiters) {
            for (_, _, rates) in places.iter().filter(|(p, o, _)| (*p, *o) < (w.priority, w.order)) {
                blocked.extend(rates.iter().cloned());
            }
            let behind = w.request.rates.iter().any(|r| blocked.contains(r));
            let (mut reply, changed) = if behind {
                (refused("rate_limited", "waiting behind more urgent calls"), false)
            } else {
                reserve(&mut self.ledger, &w.request, now)
            };
            if is_code(&reply, "rate_limited") {
                blocked.extend(w.request.rates.iter().cloned());
                if w.since.elapsed() < MAX_WAIT {
                    still.push(w);
                    continue;
                }
                // Answered before the caller's request times out; its place in line is kept
                // for a moment, and it should ask again at once.
                reply.error = Some(ErrorInfo::new(
                    "rate_limited",
                    format!(
                        "no rate permit within {} s; ask again now to keep your place",
                        MAX_WAIT.as_secs()
                    ),
                ));
                reply.retry_after_ms = Some(0);
                self.places.push(Place {
                    id: w.request.id.clone(),
                    rates: w.request.rates.clone(),
                    priority: w.priority,
                    order: w.order,
                    until: Instant::now() + PLACE_KEPT,
                });
            }
            let entry = entry_of(BudgetCommand::Reserve(w.request), changed, now, &reply);
            decided.push(Decided { caller: w.caller, reply, entry });
        }
        self.waiters = still;
    }

    fn alert_entry(&mut self, alert: &Alert, now: u64) -> LedgerEntry {
        let budget = status(&mut self.ledger, &alert.scope, now);
        let event = BudgetEvent { scope: alert.scope.clone(), warn_at: alert.threshold.map(|t| vec![t]) };
        let change = match alert.kind {
            AlertKind::Warning => LedgerChange::Warning(event),
            AlertKind::Exhausted => LedgerChange::Exhausted(event),
            AlertKind::Refilled => LedgerChange::Refilled(event),
        };
        let pct = alert.threshold.map(|t| format!(" ({t} %)")).unwrap_or_default();
        tracing::warn!(scope = %alert.scope, kind = %change.op(), "budget {}{pct}", change.op());
        LedgerEntry { change, at_ms: now, reply: BudgetReply { budget, ..Default::default() } }
    }

    /// Writes the round's entries (all sent, each fenced by the sequence before it, then all
    /// acks awaited), then answers in order. From the first entry that was not stored on, every
    /// answer is `unavailable` (what came after may have depended on it) and the ledger is
    /// rebuilt from the stream; a fence that fails means another keeper wrote: this one stops.
    async fn record_and_answer(
        &mut self,
        decided: Vec<Decided>,
        extra: Vec<LedgerEntry>,
    ) -> Result<(), Stop> {
        let mut pending: Vec<Option<Pending>> = Vec::with_capacity(decided.len() + extra.len());
        let mut failed_at: Option<usize> = None;
        let entries = decided.iter().map(|d| d.entry.as_ref()).chain(extra.iter().map(Some));
        for (i, entry) in entries.enumerate() {
            let Some(e) = entry else {
                pending.push(None);
                continue;
            };
            if failed_at.is_some() {
                pending.push(None);
                continue;
            }
            let expected = self.last_seq;
            let subject = self.fleet.names.ledger_subject(e.op().as_str());
            match self.fleet.send_fenced(subject, e, expected).await {
                Ok(p) => {
                    self.last_seq += 1;
                    pending.push(Some(p));
                }
                Err(err) => {
                    tracing::error!(error = %err, "failed to record a budget change");
                    failed_at = Some(i);
                    pending.push(None);
                }
            }
        }
        let mut fenced = false;
        for (i, p) in pending.into_iter().enumerate() {
            let stored = match p {
                None => failed_at.is_none_or(|at| i < at),
                Some(p) => match p.confirmed().await {
                    Ok(()) => true,
                    Err(FleetError::Exists { .. }) => {
                        fenced = true;
                        false
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "a budget change was not stored");
                        false
                    }
                },
            };
            if !stored {
                failed_at = Some(failed_at.map_or(i, |a| a.min(i)));
            }
        }
        for (i, d) in decided.into_iter().enumerate() {
            let reply = if failed_at.is_some_and(|at| i >= at) {
                refused("unavailable", "the ledger could not be written; ask again with the same id")
            } else {
                d.reply
            };
            d.caller.answer(reply).await;
        }
        if fenced {
            return Err(Stop::Fenced);
        }
        if failed_at.is_some() {
            // What was decided but not stored must not count: the stream is the truth.
            match rebuild(self.fleet, Some(self.snapshots)).await {
                Ok((l, seq)) => {
                    self.ledger = l;
                    self.last_seq = seq;
                }
                Err(e) => {
                    tracing::error!(error = %e, "failed to rebuild the budget ledger");
                    return Err(Stop::Rebuild(e.to_string()));
                }
            }
        }
        Ok(())
    }
}

/// Applies one command at `now`; returns the answer and whether the ledger changed (then it is
/// recorded).
pub fn apply(ledger: &mut Ledger, command: &BudgetCommand, now: u64) -> (BudgetReply, bool) {
    match command {
        BudgetCommand::Reserve(r) => reserve(ledger, r, now),
        BudgetCommand::Commit(r) => commit(ledger, r, now),
        BudgetCommand::Release(r) => release(ledger, r, now),
        BudgetCommand::Set(r) => set(ledger, r, now),
        BudgetCommand::Show(r) => (show(ledger, r, now), false),
        BudgetCommand::Carve(r) => carve(ledger, r, now),
        BudgetCommand::Close(r) => close(ledger, r, now),
        BudgetCommand::Rate(r) => rate(ledger, r, now),
        BudgetCommand::Backoff(r) => backoff(ledger, r, now),
        BudgetCommand::Price(r) => price(ledger, r),
    }
}

/// `reserve`: holds tokens in every scope at once (and a permit of every rate limit), or refuses.
fn reserve(ledger: &mut Ledger, r: &ReserveRequest, now: u64) -> (BudgetReply, bool) {
    if r.id.is_empty() {
        return needs::<ReserveRequest>();
    }
    let open_before = ledger.is_open(&r.id);
    let held = holding(&r.id, &r.scopes, r.want, r.min, r.lease_ms, &r.limits, r.model.as_deref());
    match ledger.reserve(Reserve { rates: r.rates.clone(), ..held }, now) {
        Ok(g) => (granted(g, now), !open_before),
        Err(e) => (refusal(e), false),
    }
}

/// `carve`: a child's budget, reserved out of its parent's (no rate permits).
fn carve(ledger: &mut Ledger, r: &CarveRequest, now: u64) -> (BudgetReply, bool) {
    if r.id.is_empty() || r.scope.is_empty() {
        return needs::<CarveRequest>();
    }
    let open_before = ledger.is_open(&r.id);
    let held = holding(&r.id, &r.scopes, r.want, r.min, r.lease_ms, &r.limits, r.model.as_deref());
    match ledger.carve(held, &r.scope, now) {
        Ok(g) => (granted(g, now), !open_before),
        Err(e) => (refusal(e), false),
    }
}

/// `close`: ends a task's budget (a carved one is settled with its parent).
fn close(ledger: &mut Ledger, r: &CloseRequest, now: u64) -> (BudgetReply, bool) {
    if r.scope.is_empty() {
        return needs::<CloseRequest>();
    }
    match ledger.close(&r.scope, now) {
        Ok(changed) => (BudgetReply { budget: status(ledger, &r.scope, now), ..Default::default() }, changed),
        Err(e) => (refusal(e), false),
    }
}

/// `commit`: what the call used becomes usage (priced), the rest goes back.
fn commit(ledger: &mut Ledger, r: &CommitRequest, now: u64) -> (BudgetReply, bool) {
    if r.id.is_empty() {
        return needs::<CommitRequest>();
    }
    let open_before = ledger.is_open(&r.id);
    ended(ledger.commit_priced(&r.id, r.used, r.prompt_tokens, now), open_before)
}

/// `release`: everything goes back; a key not yet reserved is forbidden (that changes the ledger
/// too).
fn release(ledger: &mut Ledger, r: &ReleaseRequest, now: u64) -> (BudgetReply, bool) {
    if r.id.is_empty() {
        return needs::<ReleaseRequest>();
    }
    let open_before = ledger.is_open(&r.id);
    match ledger.release_or_forbid(&r.id, now) {
        Ok((end, marked)) => ended(Ok(end), open_before || marked),
        Err(e) => ended(Err(e), false),
    }
}

/// `expire` (recorded by the keeper, never asked for): every lease due at `now` runs out, as it
/// did when the entry was recorded.
fn expire(ledger: &mut Ledger, e: &Expiry, now: u64) {
    if !e.id.is_empty() {
        ledger.expire(now);
    }
}

/// `set`: a scope's (or a class's default) limit, window, policy and warning thresholds.
fn set(ledger: &mut Ledger, r: &SetRequest, now: u64) -> (BudgetReply, bool) {
    if r.scope.is_empty() {
        return needs::<SetRequest>();
    }
    let window = match r.window_ms {
        Some(0) => return (refused("invalid_request", "window_ms must be positive"), false),
        Some(ms) => Window::Rolling { ms },
        None => Window::Total,
    };
    let policy = match r.policy.as_deref().map(Policy::parse) {
        None => Policy::Fail,
        Some(Some(p)) => p,
        Some(None) => return (refused("invalid_request", "policy must be fail or wait"), false),
    };
    let warn_at = match &r.warn_at {
        None => Rules::default().warn_at,
        Some(w) if w.iter().any(|p| *p == 0 || *p > 100) => {
            return (refused("invalid_request", "warn_at percentages must be 1 to 100"), false);
        }
        Some(w) => w.clone(),
    };
    if r.limit_tokens == UNLIMITED {
        return (refused("invalid_request", "limit_tokens is too large"), false);
    }
    ledger.set(&r.scope, Limit { tokens: r.limit_tokens, window }, Rules { policy, warn_at }, now);
    (BudgetReply { budget: status(ledger, &r.scope, now), ..Default::default() }, true)
}

/// `show`: a rate limit (when `rate` is given) or a budget, as it is at `now`.
fn show(ledger: &mut Ledger, r: &ShowRequest, now: u64) -> BudgetReply {
    if let Some(key) = &r.rate {
        return match rate_status(ledger, key, now) {
            Some(s) => BudgetReply { rate: Some(s), ..Default::default() },
            None => refused("unknown_scope", format!("no rate limit {key:?}")),
        };
    }
    let Some(scope) = &r.scope else {
        return refused("invalid_request", ShowRequest::NEEDS);
    };
    match status(ledger, scope, now) {
        Some(b) => BudgetReply { budget: Some(b), ..Default::default() },
        None => refused("unknown_scope", format!("no budget is set for scope {scope:?}")),
    }
}

/// `rate`: a shared rate limit's requests and tokens per window.
fn rate(ledger: &mut Ledger, r: &RateRequest, now: u64) -> (BudgetReply, bool) {
    if r.rate.is_empty() {
        return needs::<RateRequest>();
    }
    if r.rpm.is_none() && r.tpm.is_none() {
        return (refused("invalid_request", "rate needs rpm or tpm"), false);
    }
    if r.window_ms == Some(0) {
        return (refused("invalid_request", "window_ms must be positive"), false);
    }
    ledger.set_rate(&r.rate, r.rpm, r.tpm, r.window_ms.unwrap_or(DEFAULT_RATE_WINDOW_MS));
    (BudgetReply { rate: rate_status(ledger, &r.rate, now), ..Default::default() }, true)
}

/// `backoff`: no permits of the rate limits until the provider's pause (capped) has passed.
fn backoff(ledger: &mut Ledger, r: &BackoffRequest, now: u64) -> (BudgetReply, bool) {
    if r.rates.is_empty() {
        return needs::<BackoffRequest>();
    }
    let until = now.saturating_add(r.retry_after_ms.min(MAX_BACKOFF_MS));
    for key in &r.rates {
        ledger.backoff(key, until);
    }
    (BudgetReply::default(), true)
}

/// `price`: a model's price per million input and output tokens.
fn price(ledger: &mut Ledger, r: &PriceRequest) -> (BudgetReply, bool) {
    if r.model.is_empty() {
        return needs::<PriceRequest>();
    }
    let (input, output) = (r.input_usd_per_mtok, r.output_usd_per_mtok);
    if !(input.is_finite() && output.is_finite() && input >= 0.0 && output >= 0.0) {
        return (refused("invalid_request", "prices must be finite and not negative"), false);
    }
    ledger.set_price(&r.model, Price { input_per_mtok: input, output_per_mtok: output });
    (BudgetReply::default(), true)
}

/// A refusal with `code`.
fn refused(code: &str, message: impl Into<String>) -> BudgetReply {
    BudgetReply { error: Some(ErrorInfo::new(code, message)), ..Default::default() }
}

/// True when the answer is a refusal with `code`.
fn is_code(reply: &BudgetReply, code: &str) -> bool {
    reply.error.as_ref().is_some_and(|e| e.code == code)
}

/// The `invalid_request` answer to a request of `R` without a field its operation needs (the
/// same whether the field was absent, which the decoding refuses, or empty).
fn needs<R: BudgetOperation>() -> (BudgetReply, bool) {
    (refused("invalid_request", R::NEEDS), false)
}

/// What a reservation or carve holds in the ledger (without rate permits).
fn holding(
    id: &str,
    scopes: &[String],
    want: u64,
    min: Option<u64>,
    lease_ms: Option<u64>,
    limits: &BTreeMap<String, u64>,
    model: Option<&str>,
) -> Reserve {
    Reserve {
        id: id.to_owned(),
        scopes: scopes.to_vec(),
        want,
        min: min.unwrap_or(1).min(want),
        lease_ms: lease_ms.unwrap_or(DEFAULT_LEASE_MS),
        limits: limits.clone(),
        model: model.map(str::to_owned),
        rates: Vec::new(),
    }
}

/// The answer to a commit or release.
fn ended(result: Result<End, Refusal>, changed: bool) -> (BudgetReply, bool) {
    match result {
        Ok(End::Committed { charged, over, cost_nusd }) => (
            BudgetReply {
                charged: Some(charged),
                over: Some(over),
                cost_usd: cost_nusd.map(usd),
                ..Default::default()
            },
            changed,
        ),
        Ok(_) => (BudgetReply::default(), changed),
        Err(e) => (refusal(e), false),
    }
}

fn refusal(r: Refusal) -> BudgetReply {
    let (code, retry) = match &r {
        Refusal::Exhausted { .. } => ("budget_exceeded", None),
        Refusal::Wait { retry_after_ms, .. } => ("budget_wait", Some(*retry_after_ms)),
        Refusal::RateLimited { retry_after_ms, .. } => ("rate_limited", Some(*retry_after_ms)),
        Refusal::Closed(_) => ("budget_closed", None),
        Refusal::UnknownScope(_) => ("unknown_scope", None),
        Refusal::UnknownReservation(_) => ("unknown_reservation", None),
        Refusal::Ended(..) => ("reservation_ended", None),
        Refusal::Mismatch(_) => ("reservation_mismatch", None),
        Refusal::Invalid => ("invalid_request", None),
    };
    BudgetReply { retry_after_ms: retry, ..refused(code, r.to_string()) }
}

fn granted(g: Grant, now: u64) -> BudgetReply {
    BudgetReply {
        tokens: Some(g.tokens),
        expires_ms: Some(g.expires_ms),
        lease_left_ms: Some(g.expires_ms.saturating_sub(now)),
        ..Default::default()
    }
}

#[allow(clippy::cast_precision_loss)]
fn usd(nusd: u64) -> f64 {
    nusd as f64 / 1e9
}

/// A budget (or a class's default) as it is at `now`.
fn status(ledger: &mut Ledger, scope: &str, now: u64) -> Option<BudgetStatus> {
    if is_default(scope) {
        let (limit, rules) = ledger.default_of(scope)?.clone();
        return Some(BudgetStatus {
            scope: scope.to_owned(),
            limit_tokens: Some(limit.tokens),
            window_ms: window_ms(limit.window),
            policy: rules.policy.name().to_owned(),
            warn_at: rules.warn_at,
            ..Default::default()
        });
    }
    let b = ledger.budget(scope, now)?;
    Some(BudgetStatus {
        scope: scope.to_owned(),
        limit_tokens: b.is_limited().then_some(b.limit.tokens),
        window_ms: window_ms(b.limit.window),
        used: b.used,
        held: b.held,
        available: b.is_limited().then(|| b.available()),
        cost_usd: usd(b.cost_nusd),
        policy: b.rules.policy.name().to_owned(),
        warn_at: b.rules.warn_at.clone(),
        closed_at_ms: b.closed_ms,
        carved_by: b.carved_by.clone(),
    })
}

fn window_ms(w: Window) -> Option<u64> {
    match w {
        Window::Total => None,
        Window::Rolling { ms } => Some(ms),
    }
}

fn rate_status(ledger: &mut Ledger, key: &str, now: u64) -> Option<RateStatus> {
    let r = ledger.rate(key, now)?;
    Some(RateStatus {
        rate: key.to_owned(),
        rpm: r.rpm,
        tpm: r.tpm,
        window_ms: r.window_ms,
        requests: r.requests(),
        tokens: r.tokens(),
        waiting: 0,
        blocked_until_ms: (r.blocked_until > now).then_some(r.blocked_until),
    })
}
