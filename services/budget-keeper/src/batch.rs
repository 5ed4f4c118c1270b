//! Batching: the active keeper's rounds. Requests that arrive together are decided together and
//! their entries written together (one round trip for the batch), which is what lets one hot
//! budget take more reservations per second than there are round trips. A reservation that
//! needs a permit of a rate limit with none free waits here, in priority order, until one is (or
//! answers `rate_limited` after [`MAX_WAIT`], keeping its place in line for a moment). Every
//! change is recorded, fenced by the ledger stream's last sequence, before it is answered.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use async_nats::jetstream::object_store::ObjectStore;
use flotilla_protocol::names::service;
use flotilla_protocol::{
    BudgetCommand, BudgetEvent, BudgetReply, ErrorInfo, Expiry, LedgerChange, LedgerEntry, Priority,
    ReserveRequest, time::now_ms,
};
use flotilla_service::Fleet;
use flotilla_service::nats::{FleetError, Pending};

use crate::apply::{self, apply, is_code, refused};
use crate::ledger::{Alert, AlertKind, Ledger};
use crate::request::{Caller, Incoming};

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
pub(crate) enum Stop {
    #[error("another budget-keeper wrote to the ledger")]
    Fenced,
    #[error("the ledger could not be rebuilt after a failed write: {0}")]
    Rebuild(#[source] crate::replay::RebuildError),
}

/// The active keeper's state.
pub(crate) struct Keeper<'a> {
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

/// The entry recording a decided command, if it changed the ledger.
fn entry_of(command: BudgetCommand, changed: bool, at_ms: u64, reply: &BudgetReply) -> Option<LedgerEntry> {
    let change = command.into_change().filter(|_| changed)?;
    Some(LedgerEntry { change, at_ms, reply: reply.clone(), actor: None })
}

impl<'a> Keeper<'a> {
    /// A keeper with the `ledger` rebuilt up to the ledger stream's entry `last_seq`.
    pub(crate) fn new(
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
    pub(crate) fn has_waiting(&self) -> bool {
        !self.waiters.is_empty() || !self.places.is_empty()
    }

    /// One round: decides the new requests (a reservation that must wait for a rate permit
    /// joins the waiters), then the waiters in priority order, expires leases when `expire`,
    /// writes every change (and budget event) in one go, and answers.
    #[tracing::instrument(skip_all, fields(new = items.len(), waiting = self.waiters.len()))]
    pub(crate) async fn round(&mut self, items: Vec<Incoming>, expire: bool) -> Result<(), Stop> {
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
        for Incoming { caller, command, actor } in items {
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
            let mut entry = entry_of(command, changed, now, &reply);
            if let Some(e) = entry.as_mut() {
                e.actor = actor;
            }
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
                    actor: None,
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
    pub(crate) async fn hand_over(&mut self) {
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
                apply::reserve(&mut self.ledger, &w.request, now)
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
        let budget = apply::status(&mut self.ledger, &alert.scope, now);
        let event = BudgetEvent { scope: alert.scope.clone(), warn_at: alert.threshold.map(|t| vec![t]) };
        let change = match alert.kind {
            AlertKind::Warning => LedgerChange::Warning(event),
            AlertKind::Exhausted => LedgerChange::Exhausted(event),
            AlertKind::Refilled => LedgerChange::Refilled(event),
        };
        let pct = alert.threshold.map(|t| format!(" ({t} %)")).unwrap_or_default();
        tracing::warn!(scope = %alert.scope, kind = %change.op(), "budget {}{pct}", change.op());
        LedgerEntry { change, at_ms: now, reply: BudgetReply { budget, ..Default::default() }, actor: None }
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
            match self.fleet.send_fenced(subject, e, expected, service::BUDGET_KEEPER).await {
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
            match crate::replay::rebuild(self.fleet, Some(self.snapshots)).await {
                Ok((l, seq)) => {
                    self.ledger = l;
                    self.last_seq = seq;
                }
                Err(e) => {
                    tracing::error!(error = %e, "failed to rebuild the budget ledger");
                    return Err(Stop::Rebuild(e));
                }
            }
        }
        Ok(())
    }
}
