//! Replay: the ledger rebuilt from the last usable snapshot of its state and the ledger stream's
//! entries after it, each applied at its recorded time, as a keeper taking the lease (or one
//! whose write failed) does before it answers anything. An entry that cannot be read stops the
//! rebuild: a ledger missing a change could overspend, so the keeper does not serve from it.

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::object_store::ObjectStore;
use flotilla_protocol::{BudgetReply, DecodeError, LedgerChange, LedgerEntry, codec, time::now_ms};
use flotilla_service::Fleet;
use futures::StreamExt as _;

use crate::apply;
use crate::ledger::Ledger;
use crate::snapshot::Snapshot;

/// How long an ended reservation is remembered for repeated operations.
/// How long a rebuilt ledger remembers ended reservations and closed budgets.
pub const REMEMBER_MS: u64 = 15 * 60 * 1000;

type Source = Box<dyn std::error::Error + Send + Sync>;

/// Why the ledger could not be rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// The ledger stream could not be read.
    #[error("failed to {what}: {source}")]
    Stream {
        what: &'static str,
        #[source]
        source: Source,
    },
    /// The stream no longer holds every entry after the state the replay starts from.
    #[error(
        "the ledger stream starts at entry {first} but the state is only known up to entry {known}: \
         entries are missing (was the stream given an age limit?)"
    )]
    Missing { first: u64, known: u64 },
    /// An entry is not a ledger entry this version can read.
    #[error("ledger entry {seq} cannot be read, so the budgets cannot be rebuilt past it: {source}")]
    Unreadable {
        seq: u64,
        #[source]
        source: DecodeError,
    },
}

fn stream_failed(what: &'static str, source: impl Into<Source>) -> RebuildError {
    RebuildError::Stream { what, source: source.into() }
}

/// Rebuilds the ledger: the last snapshot (if any, and usable), then the ledger stream's entries
/// after it, in order. Returns the ledger with the stream's last sequence. An entry whose replayed
/// answer differs from the recorded one is logged (it would mean the replay is not faithful).
#[tracing::instrument(skip_all)]
pub async fn rebuild(fleet: &Fleet, snapshots: Option<&ObjectStore>) -> Result<(Ledger, u64), RebuildError> {
    let mut stream = fleet
        .js
        .get_stream(fleet.names.ledger_stream())
        .await
        .map_err(|e| stream_failed("open the ledger stream", e))?;
    let state = stream.info().await.map_err(|e| stream_failed("read the ledger stream", e))?.state.clone();
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
    if first > from + 1 && state.messages > 0 {
        return Err(RebuildError::Missing { first, known: from });
    }
    let mut msgs = stream
        .create_consumer(pull::OrderedConfig {
            name: Some(flotilla_service::nats::ordered_name()),
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: from + 1 },
            ..Default::default()
        })
        .await
        .map_err(|e| stream_failed("replay the ledger", e))?
        .messages()
        .await
        .map_err(|e| stream_failed("replay the ledger", e))?;
    let mut differ = 0u64;
    while let Some(msg) = msgs.next().await {
        let msg = msg.map_err(|e| stream_failed("read the ledger", e))?;
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(last);
        let entry = match codec::decode::<LedgerEntry>(None, &msg.payload) {
            Ok(entry) => entry,
            // A keeper wrote it and it cannot be read: the state past it is unknown.
            Err(source) if written_by_a_keeper(&msg) => return Err(RebuildError::Unreadable { seq, source }),
            // Not a ledger entry at all (something else published on the ledger's subjects,
            // e.g. an answer sent to a reply subject there): it changed no budget.
            Err(e) => {
                tracing::error!(seq, subject = %msg.subject, error = %e, "a message on the ledger that no budget-keeper wrote skipped");
                if seq >= last {
                    break;
                }
                continue;
            }
        };
        if let Some(reply) = apply_entry(&mut ledger, &entry)
            && reply != entry.reply
        {
            differ += 1;
            if differ <= 10 {
                tracing::error!(seq, op = %entry.op(), recorded = ?entry.reply, replayed = ?reply, "replayed answer differs");
            }
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

/// Whether a budget-keeper wrote the message (every ledger write is marked so; an entry from
/// before the marks decodes, so it never gets here).
fn written_by_a_keeper(msg: &async_nats::jetstream::Message) -> bool {
    msg.headers
        .as_ref()
        .and_then(|h| h.get(flotilla_protocol::headers::FLOTILLA_SOURCE))
        .is_some_and(|v| v.as_str() == flotilla_protocol::names::service::BUDGET_KEEPER)
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
        LedgerChange::Reserve(r) => apply::reserve(ledger, r, at),
        LedgerChange::Commit(r) => apply::commit(ledger, r, at),
        LedgerChange::Release(r) => apply::release(ledger, r, at),
        LedgerChange::Set(r) => apply::set(ledger, r, at),
        LedgerChange::Carve(r) => apply::carve(ledger, r, at),
        LedgerChange::Close(r) => apply::close(ledger, r, at),
        LedgerChange::Rate(r) => apply::rate(ledger, r, at),
        LedgerChange::Backoff(r) => apply::backoff(ledger, r, at),
        LedgerChange::Price(r) => apply::price(ledger, r),
        LedgerChange::Expire(e) => {
            apply::expire(ledger, e, at);
            return None;
        }
        LedgerChange::Warning(_) | LedgerChange::Exhausted(_) | LedgerChange::Refilled(_) => return None,
    };
    Some(reply)
}
