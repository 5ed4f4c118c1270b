//! Which budget-keeper answers: a lease in the budgets bucket (`keeper.leader`), taken with a
//! revision-checked write and renewed every third of its length. Only the holder serves
//! requests; another keeper waits and takes over once the lease has run out. The lease only
//! decides who serves: what makes two writers harmless is the ledger's own fence (every entry is
//! written with the stream's expected last sequence, so a keeper that lost the lease without
//! noticing cannot add a decision made on an old view).

use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use flotilla_protocol::time::now_ms;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// The key of the lease in the budgets bucket.
pub const KEY: &str = "keeper.leader";

/// The lease's value (`until_ms` is informational: standbys judge by their own clocks).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lease {
    pub holder: String,
    pub until_ms: u64,
}

/// A held lease.
#[derive(Debug)]
pub struct Held {
    revision: u64,
}

/// Waits until this keeper holds the lease (or `shutdown`); `None` on shutdown. A lease is taken
/// over once nobody renewed it for its length, judged on this keeper's own clock from when it
/// first saw the lease's current revision (so clocks that disagree between machines do not
/// matter).
#[tracing::instrument(skip_all, fields(me = %me))]
pub async fn acquire(
    store: &kv::Store,
    me: &str,
    length: Duration,
    shutdown: &CancellationToken,
) -> Option<Held> {
    let mut waited_for: Option<String> = None;
    let mut seen: Option<(u64, Instant)> = None;
    loop {
        match try_take(store, me, length, &mut seen).await {
            Ok(Ok(held)) => return Some(held),
            Ok(Err(holder)) => {
                if waited_for.as_deref() != Some(holder.as_str()) {
                    tracing::info!(holder = %holder, "another budget-keeper is active; standing by");
                    waited_for = Some(holder);
                }
            }
            Err(e) => tracing::warn!(error = %e, "failed to read the budget-keeper lease"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(length / 6) => {}
        }
    }
}

/// Takes the lease if it is free, ours or not renewed for its length: `Ok(Err(holder))` when
/// someone else holds it.
async fn try_take(
    store: &kv::Store,
    me: &str,
    length: Duration,
    seen: &mut Option<(u64, Instant)>,
) -> anyhow::Result<Result<Held, String>> {
    let until_ms = now_ms().saturating_add(u64::try_from(length.as_millis()).unwrap_or(u64::MAX));
    let value = serde_json::to_vec(&Lease { holder: me.to_owned(), until_ms })?;
    match store.entry(KEY).await? {
        None => match store.create(KEY, value.into()).await {
            Ok(revision) => Ok(Ok(Held { revision })),
            Err(_) => Ok(Err("(a keeper that just started)".to_owned())),
        },
        Some(e) => {
            let current: Option<Lease> =
                (e.operation == kv::Operation::Put).then(|| serde_json::from_slice(&e.value).ok()).flatten();
            let since = match *seen {
                Some((rev, at)) if rev == e.revision => at,
                _ => {
                    let now = Instant::now();
                    *seen = Some((e.revision, now));
                    now
                }
            };
            match current {
                Some(l) if l.holder != me && since.elapsed() < length => Ok(Err(l.holder)),
                _ => match store.update(KEY, value.into(), e.revision).await {
                    Ok(revision) => Ok(Ok(Held { revision })),
                    Err(_) => Ok(Err("(a keeper that just took over)".to_owned())),
                },
            }
        }
    }
}

/// Renews the lease every third of its length until `stop` or until it is lost (then `lost` is
/// cancelled).
#[tracing::instrument(skip_all, fields(me = %me))]
pub async fn keep(store: kv::Store, me: String, length: Duration, held: Held, lost: CancellationToken) {
    let mut revision = held.revision;
    loop {
        tokio::select! {
            _ = lost.cancelled() => return,
            _ = tokio::time::sleep(length / 3) => {}
        }
        let until_ms = now_ms().saturating_add(u64::try_from(length.as_millis()).unwrap_or(u64::MAX));
        let Ok(value) = serde_json::to_vec(&Lease { holder: me.clone(), until_ms }) else { continue };
        match store.update(KEY, value.into(), revision).await {
            Ok(r) => revision = r,
            Err(e) => {
                tracing::error!(error = %e, "lost the budget-keeper lease; stepping down");
                lost.cancel();
                return;
            }
        }
    }
}

/// Gives the lease up (on shutdown), so a standby takes over at once.
#[tracing::instrument(skip_all, fields(me = %me))]
pub async fn resign(store: &kv::Store, me: &str) {
    if let Ok(Some(e)) = store.entry(KEY).await
        && e.operation == kv::Operation::Put
        && serde_json::from_slice::<Lease>(&e.value).is_ok_and(|l| l.holder == me)
    {
        let _ = store.delete_expect_revision(KEY, Some(e.revision)).await;
    }
}
