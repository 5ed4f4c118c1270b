//! Leases of exclusive roles: of all running instances of a service exactly one does the role's
//! work (the dispatcher's scheduling, the budget-keeper's serving), the holder of the role's key
//! in the `<p>_leases` bucket ([`flotilla_protocol::names::lease_key`], value
//! [`flotilla_protocol::Lease`]); the others stand by and take over when it stops renewing.
//! [`hold`] runs the contest and the role's work while this instance holds the lease.
//!
//! # Protocol
//!
//! - **Acquire**: a KV `create` of the key, which succeeds only when it is absent, deleted or
//!   removed by the bucket's `max_age`; or, when a lease is there but ran out (below), a
//!   revision-checked `update` against the very revision that ran out. Both writes fail when
//!   someone else wrote first, so of several contenders at most one wins. The winner writes an
//!   epoch one above the highest it saw, and starts the work, which rebuilds whatever state it
//!   needs from NATS.
//! - **Run out**: a contender notes, on its own monotonic clock, when it first saw the lease's
//!   current revision. The lease ran out when that revision is still the current one `ttl_ms`
//!   later (the holder's TTL, read from the lease).
//! - **Renew**: the holder rewrites the lease every third of its TTL with a revision-checked
//!   `update`; a failed renewal is retried every twelfth. The holder counts its lease valid until
//!   one TTL after it *sent* its last successful write; a contender counts from when it *saw*
//!   that write, which is later. At five sixths of the TTL without a successful renewal the
//!   holder cancels the work's token, and aborts the work if it has not ended a twelfth later: it
//!   has stopped before any contender may start. A renewal that finds the revision changed (a
//!   conflict) means another instance took over, and it stops at once, unless the key shows this
//!   very acquisition (an earlier renewal whose ack was lost had landed): then it renews against
//!   that revision. What the work writes must still be fenced on its own (revision-checked task
//!   records, the ledger's expected last sequence): the timing keeps two holders from
//!   overlapping, the fences make an overlap harmless.
//! - **Release**: on a clean shutdown the holder stops its work first, then deletes the key with a
//!   revision check; standbys watch the key and `create` it at once. Work that fails releases the
//!   lease too, and this instance competes again only after a backoff.
//!
//! # Why the TTL lives in the lease, not in the bucket's `max_age`
//!
//! Letting the server expire the key (`max_age` = TTL) looks simpler, but `max_age` is one setting
//! of a shared bucket while the TTL is each instance's own: instances started with different TTLs
//! (or a rolling change of the setting) would rewrite the bucket on every start, and a `max_age`
//! below a holder's TTL would let the server drop a lease its holder still counts on, so two
//! instances would hold the role. It would also make safety depend on the server's wall clock
//! against the holder's monotonic one, while here every judgement uses one clock (the one of the
//! instance that judges) and no timestamp is compared across machines. Per-key TTLs (`Nats-TTL`)
//! have a granularity of one second. So the bucket's `max_age` is a fixed constant
//! ([`LEASES_MAX_AGE`], 60 s) that only clears away leases of instances that are long gone, and
//! a TTL is validated to at most a third of it ([`MAX_TTL`]).
//!
//! # Timing
//!
//! After a `kill -9` of the holder a standby takes over one TTL after the holder's last renewal
//! (between two thirds of a TTL and one TTL after the kill: 2–3 s with a 3 s TTL). After a clean
//! stop it takes over as soon as it sees the delete. An instance that starts while a lease is
//! present waits one TTL of that lease even when its holder is gone.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::kv;
use flotilla_protocol::{Lease, codec, time::now_ms};
use futures::StreamExt as _;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::Fleet;
use crate::nats::FleetError;
pub use crate::topology::LEASES_MAX_AGE;

/// Shortest accepted lease TTL.
pub const MIN_TTL: Duration = Duration::from_millis(300);
/// Longest accepted lease TTL: a third of the bucket's `max_age`, so the server never removes a
/// lease that is being renewed.
pub const MAX_TTL: Duration = Duration::from_secs(LEASES_MAX_AGE.as_secs() / 3);

/// What this instance knows about the lease, for health replies.
#[derive(Debug, Default)]
pub struct LeaseStatus(Mutex<View>);

#[derive(Debug, Clone, Default)]
struct View {
    active: bool,
    holder: Option<String>,
    epoch: u64,
}

impl LeaseStatus {
    /// Adds `role` (`active` or `standby`), `holder` and `epoch` to a health reply's details.
    pub fn add_details(&self, details: &mut serde_json::Value) {
        let v = self.0.lock().unwrap_or_else(PoisonError::into_inner).clone();
        if let Some(map) = details.as_object_mut() {
            map.insert("role".to_owned(), (if v.active { "active" } else { "standby" }).into());
            map.insert("holder".to_owned(), v.holder.into());
            map.insert("epoch".to_owned(), v.epoch.into());
        }
    }

    /// The details of a health reply: `more()` (an object) with this view of the lease added.
    pub fn details_with(
        self: &Arc<Self>,
        more: impl Fn() -> serde_json::Value + Send + Sync + 'static,
    ) -> crate::health::Details {
        let status = self.clone();
        Arc::new(move || {
            let mut d = more();
            status.add_details(&mut d);
            d
        })
    }

    fn set(&self, view: View) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = view;
    }
}

/// The lease key as last seen.
#[derive(Debug)]
enum Seen {
    /// Absent, deleted, purged or removed by `max_age`: free to `create`.
    Free,
    /// Held at `revision`, first seen (on this clock) at `since`; `lease` is `None` when the value
    /// is unreadable.
    Held { revision: u64, since: Instant, lease: Option<Lease> },
}

/// A lease this instance holds.
#[derive(Debug)]
struct Held {
    revision: u64,
    lease: Lease,
    /// When the write that produced `revision` was sent: the lease is valid until `sent + ttl`.
    sent: Instant,
}

/// The outcome of a renewal.
enum Renewal {
    /// Written at this revision.
    Renewed(u64, Lease),
    /// The key holds an earlier write of ours (its ack was lost), at this revision.
    Adopted(u64),
}

/// How an active period ended.
enum Ended {
    Shutdown,
    Lost(&'static str),
    Work(Result<anyhow::Result<()>, tokio::task::JoinError>),
}

/// A role held under a lease: which key, for how long, and what to report.
#[derive(Debug, Clone)]
pub struct Role {
    /// The key in the leases bucket, one of [`flotilla_protocol::names::lease_key`].
    pub key: &'static str,
    /// How long the lease stays valid without a renewal (clamped to [`MIN_TTL`]..=[`MAX_TTL`]).
    pub ttl: Duration,
    /// Where health replies read this instance's view of the lease.
    pub status: Arc<LeaseStatus>,
}

/// Runs the contest for `role`'s lease in `leases` until `shutdown`, and while this instance
/// holds it, the role's work: `work(token)` is spawned on every acquisition, and `token` is
/// cancelled when the lease is lost (before any contender may take over) or on shutdown; work
/// that does not stop in time is aborted. Failures of NATS are retried. Returns when `shutdown`
/// is cancelled, after stopping the work and releasing a lease it holds.
pub async fn hold<F, Fut>(fleet: Fleet, leases: kv::Store, role: Role, shutdown: CancellationToken, work: F)
where
    F: FnMut(CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let span = tracing::info_span!("lease", role = role.key, instance = %fleet.instance);
    let ttl = role.ttl.clamp(MIN_TTL, MAX_TTL);
    let mut c = Contender {
        fleet,
        leases,
        key: role.key,
        status: role.status,
        ttl,
        seen: Seen::Free,
        last_revision: 0,
        max_epoch: 0,
        watch: None,
    };
    c.contend(shutdown, work).instrument(span).await;
}

struct Contender {
    fleet: Fleet,
    leases: kv::Store,
    key: &'static str,
    status: Arc<LeaseStatus>,
    ttl: Duration,
    seen: Seen,
    /// Revision of the newest entry seen; older ones (a poll racing the watch) are ignored.
    last_revision: u64,
    /// Highest epoch seen in the key.
    max_epoch: u64,
    /// The watch on the key while standing by. It is not `Sync`, so the methods that await
    /// take `&mut self`.
    watch: Option<kv::Watch>,
}

impl Contender {
    async fn contend<F, Fut>(&mut self, shutdown: CancellationToken, mut work: F)
    where
        F: FnMut(CancellationToken) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let mut not_before = Instant::now();
        let mut failures: u32 = 0;
        loop {
            let Some(held) = self.stand_by(not_before, &shutdown).await else { return };
            let held_since = Instant::now();
            let ended = self.hold(held, &shutdown, &mut work).await;
            // Work that ran well for a while before it failed starts its backoff afresh.
            if held_since.elapsed() >= self.ttl * 16 {
                failures = 0;
            }
            match ended {
                Ended::Shutdown => return,
                Ended::Lost(why) => {
                    tracing::info!(state = "standby", why, "lease lost: standing by");
                    failures = 0;
                }
                Ended::Work(result) => {
                    // Let another instance take over; compete again later, backing off while the
                    // work keeps failing.
                    let wait = flotilla_protocol::time::backoff(self.ttl * 2, failures, self.ttl * 16);
                    failures = failures.saturating_add(1);
                    match result {
                        Ok(Ok(())) => {
                            tracing::error!(?wait, "the role's work ended on its own; lease released")
                        }
                        Ok(Err(e)) => {
                            tracing::error!(
                                error = format!("{e:#}"),
                                ?wait,
                                "the role's work failed; lease released"
                            )
                        }
                        Err(e) => {
                            tracing::error!(error = %e, ?wait, "the role's work panicked; lease released")
                        }
                    }
                    tracing::info!(state = "standby", "standing by after a failure");
                    not_before = Instant::now() + wait;
                }
            }
            if shutdown.is_cancelled() {
                return;
            }
        }
    }

    // ---- standby -----------------------------------------------------------------------------

    /// Watches the lease until this instance acquired it (not before `not_before`), or returns
    /// `None` on shutdown.
    async fn stand_by(&mut self, not_before: Instant, shutdown: &CancellationToken) -> Option<Held> {
        // Whatever was seen before is old news: look again, and time a present lease from now.
        self.seen = Seen::Free;
        self.publish_view(false);
        self.poll().await;
        let poll_every = self.ttl / 4;
        let mut next_poll = Instant::now() + poll_every;
        // No attempt before this (after a failed one).
        let mut retry_at = not_before;
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            let (stale, attempt_at) = match &self.seen {
                Seen::Free => (None, retry_at),
                Seen::Held { revision, since, lease } => {
                    (Some(*revision), retry_at.max(*since + self.ttl_of(lease.as_ref())))
                }
            };
            if Instant::now() >= attempt_at {
                if let Some(held) = self.acquire(stale).await {
                    return Some(held);
                }
                // Someone else was faster (the key shows it), or NATS failed: look again, and
                // do not try before the next poll.
                self.poll().await;
                next_poll = Instant::now() + poll_every;
                retry_at = next_poll.max(not_before);
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                entry = next_entry(&mut self.watch) => match entry {
                    Some(Ok(entry)) => self.observe(Some(entry)),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "lease watch failed; watching again");
                        self.watch = None;
                    }
                    None => self.watch = None,
                },
                _ = sleep_until(next_poll.min(attempt_at)) => {
                    if Instant::now() >= next_poll {
                        self.poll().await;
                        next_poll = Instant::now() + poll_every;
                    }
                }
            }
        }
    }

    /// The TTL a lease was written with (our own when unreadable), within the accepted bounds.
    fn ttl_of(&self, lease: Option<&Lease>) -> Duration {
        lease.map_or(self.ttl, |l| Duration::from_millis(l.ttl_ms).clamp(MIN_TTL, LEASES_MAX_AGE))
    }

    /// Reads the key (a safety net for the watch, and the only way to notice that `max_age`
    /// removed it), and makes sure the watch runs.
    async fn poll(&mut self) {
        if self.watch.is_none() {
            match self.leases.watch_with_history(self.key).await {
                Ok(w) => self.watch = Some(w),
                Err(e) => tracing::warn!(error = %e, "failed to watch the lease; polling"),
            }
        }
        match self.leases.entry(self.key).await {
            Ok(entry) => self.observe(entry),
            Err(e) => tracing::warn!(error = %e, "failed to read the lease"),
        }
    }

    fn observe(&mut self, entry: Option<kv::Entry>) {
        match entry {
            Some(e) if e.revision < self.last_revision => return,
            Some(e) if e.operation == kv::Operation::Put => {
                self.last_revision = e.revision;
                if matches!(self.seen, Seen::Held { revision, .. } if revision == e.revision) {
                    return;
                }
                let lease = match codec::decode::<Lease>(None, &e.value) {
                    Ok(l) => Some(l),
                    Err(err) => {
                        tracing::warn!(revision = e.revision, error = %err, "unreadable lease; treated as held");
                        None
                    }
                };
                let before = match &self.seen {
                    Seen::Held { lease: Some(l), .. } => Some(l.holder.clone()),
                    _ => None,
                };
                if let Some(l) = &lease {
                    self.max_epoch = self.max_epoch.max(l.epoch);
                    if before.as_deref() != Some(l.holder.as_str()) {
                        tracing::info!(holder = %l.holder, epoch = l.epoch, "lease held by another instance");
                    }
                }
                self.seen = Seen::Held { revision: e.revision, since: Instant::now(), lease };
            }
            Some(e) => {
                self.last_revision = e.revision;
                tracing::debug!(revision = e.revision, "lease released by its holder");
                self.seen = Seen::Free;
            }
            None => self.seen = Seen::Free,
        }
        self.publish_view(false);
    }

    fn publish_view(&self, active: bool) {
        let view = match (&self.seen, active) {
            (_, true) => View { active, holder: Some(self.fleet.instance.clone()), epoch: self.max_epoch },
            (Seen::Held { lease: Some(l), .. }, false) => {
                View { active, holder: Some(l.holder.clone()), epoch: l.epoch }
            }
            (_, false) => View { active, holder: None, epoch: self.max_epoch },
        };
        self.status.set(view);
    }

    /// Tries to take the lease: `create` when it is free, or a revision-checked `update` of the
    /// revision `stale` that ran out.
    #[tracing::instrument(skip_all, fields(stale = ?stale))]
    async fn acquire(&mut self, stale: Option<u64>) -> Option<Held> {
        let now = now_ms();
        let lease = Lease {
            holder: self.fleet.instance.clone(),
            epoch: self.max_epoch.saturating_add(1),
            acquired_at_ms: now,
            renewed_at_ms: now,
            ttl_ms: u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX),
        };
        let sent = Instant::now();
        let result = match stale {
            None => self.fleet.kv_create(&self.leases, self.key, &lease).await,
            Some(rev) => self.fleet.kv_update(&self.leases, self.key, &lease, rev).await,
        };
        match result {
            Ok(revision) => {
                self.max_epoch = lease.epoch;
                self.last_revision = revision;
                Some(Held { revision, lease, sent })
            }
            Err(e) if e.is_conflict() => {
                tracing::debug!("another instance took the lease first");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "failed to take the lease");
                None
            }
        }
    }

    // ---- active ------------------------------------------------------------------------------

    /// Runs the work while the lease is renewed; stops it and says why when it is not.
    async fn hold<F, Fut>(&mut self, mut held: Held, shutdown: &CancellationToken, work: &mut F) -> Ended
    where
        F: FnMut(CancellationToken) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let previous = match &self.seen {
            Seen::Held { lease: Some(l), .. } => Some(l.holder.clone()),
            _ => None,
        };
        self.watch = None;
        let guard = self.ttl / 6;
        let renew_every = self.ttl / 3;
        let retry_every = self.ttl / 12;
        if Instant::now() + guard >= held.sent + self.ttl {
            // The acquiring write took so long that the lease is nearly over already.
            self.release(&held).await;
            return Ended::Lost("the lease was acquired too late to use");
        }
        tracing::info!(state = "active", epoch = held.lease.epoch, previous = ?previous, "lease acquired: now active");
        self.publish_view(true);
        let token = shutdown.child_token();
        let mut running = tokio::spawn(work(token.clone()));
        let mut next_renewal = held.sent + renew_every;
        let ended = loop {
            // The last moment to stop: a contender may start one TTL after the last renewal.
            let stop_at = held.sent + self.ttl - guard;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ended::Shutdown,
                r = &mut running => break Ended::Work(r),
                _ = sleep_until(stop_at) => break Ended::Lost("no renewal succeeded in time"),
                _ = sleep_until(next_renewal) => {
                    let sent = Instant::now();
                    match timeout_at(stop_at, self.renew(&held)).await {
                        Ok(Ok(Renewal::Renewed(revision, lease))) => {
                            held = Held { revision, lease, sent };
                            next_renewal = sent + renew_every;
                        }
                        Ok(Ok(Renewal::Adopted(revision))) => {
                            // Which write landed is unknown: keep counting from the last
                            // confirmed one, and renew against the revision found at once.
                            tracing::info!(revision, "a renewal whose ack was lost had landed");
                            held.revision = revision;
                            next_renewal = Instant::now();
                        }
                        Ok(Err(e)) if e.is_conflict() => break Ended::Lost("another instance took the lease"),
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "lease renewal failed; retrying");
                            next_renewal = Instant::now() + retry_every;
                        }
                        Err(_) => break Ended::Lost("no renewal succeeded in time"),
                    }
                }
            }
        };
        token.cancel();
        match ended {
            Ended::Work(r) => {
                self.release(&held).await;
                Ended::Work(r)
            }
            Ended::Shutdown => {
                // Give the work until the lease would need renewing, at most 5 s.
                let deadline = (held.sent + self.ttl - guard).min(Instant::now() + Duration::from_secs(5));
                stop(running, deadline).await;
                self.release(&held).await;
                Ended::Shutdown
            }
            Ended::Lost(why) => {
                tracing::warn!(why, epoch = held.lease.epoch, "lease lost; the role's work stops");
                self.seen = Seen::Free;
                self.publish_view(false);
                // Stop before a contender may start; soon in any case, as one may have started.
                let deadline = (held.sent + self.ttl - guard / 2).min(Instant::now() + retry_every);
                stop(running, deadline).await;
                Ended::Lost(why)
            }
        }
    }

    #[tracing::instrument(skip_all, fields(revision = held.revision, epoch = held.lease.epoch))]
    async fn renew(&mut self, held: &Held) -> Result<Renewal, FleetError> {
        let lease = Lease { renewed_at_ms: now_ms(), ..held.lease.clone() };
        match self.fleet.kv_update(&self.leases, self.key, &lease, held.revision).await {
            Ok(revision) => Ok(Renewal::Renewed(revision, lease)),
            Err(e) if e.is_conflict() => {
                // An earlier renewal whose ack was lost may have landed: the lease is still ours
                // when the key shows this very acquisition (holder, epoch and time).
                let ours = |l: &Lease| {
                    (l.holder.as_str(), l.epoch, l.acquired_at_ms)
                        == (held.lease.holder.as_str(), held.lease.epoch, held.lease.acquired_at_ms)
                };
                match self.fleet.kv_get::<Lease>(&self.leases, self.key).await {
                    Ok(Some((current, revision))) if ours(&current) => Ok(Renewal::Adopted(revision)),
                    _ => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes the lease if it is still ours, so that a standby takes over at once.
    #[tracing::instrument(skip_all, fields(revision = held.revision, epoch = held.lease.epoch))]
    async fn release(&mut self, held: &Held) {
        let delete = self.leases.delete_expect_revision(self.key, Some(held.revision));
        match tokio::time::timeout(Duration::from_secs(2), delete).await {
            Ok(Ok(())) => tracing::info!(state = "standby", "lease released"),
            Ok(Err(e)) => tracing::warn!(error = %e, "failed to release the lease; it runs out by itself"),
            Err(_) => tracing::warn!("releasing the lease timed out; it runs out by itself"),
        }
        self.publish_view(false);
    }
}

/// The next entry of the watch, or never when there is none.
async fn next_entry(watch: &mut Option<kv::Watch>) -> Option<Result<kv::Entry, kv::WatcherError>> {
    match watch {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

/// Waits for the (cancelled) work to end until `deadline`, then aborts it.
async fn stop(mut work: JoinHandle<anyhow::Result<()>>, deadline: Instant) {
    match timeout_at(deadline, &mut work).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = format!("{e:#}"), "the role's work ended with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "the role's work panicked"),
        Err(_) => {
            tracing::warn!("the role's work did not stop in time; aborting it");
            work.abort();
            if let Err(e) = work.await
                && !e.is_cancelled()
            {
                tracing::warn!(error = %e, "the role's work panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_bounds_leave_room_for_renewals_inside_max_age() {
        assert!(MAX_TTL * 3 <= LEASES_MAX_AGE);
        assert!(MIN_TTL < MAX_TTL);
    }

    #[test]
    fn health_details_show_role_holder_and_epoch() {
        let s = LeaseStatus::default();
        let mut d = serde_json::json!({ "assigned": 3 });
        s.add_details(&mut d);
        assert_eq!(d["role"], "standby");
        assert!(d["holder"].is_null());
        s.set(View { active: true, holder: Some("d1".into()), epoch: 4 });
        s.add_details(&mut d);
        assert_eq!(d["role"], "active");
        assert_eq!(d["holder"], "d1");
        assert_eq!(d["epoch"], 4);
        assert_eq!(d["assigned"], 3);
    }
}
