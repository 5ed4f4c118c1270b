//! The budget service: the operations of [`BudgetOp`] on `<p>.budget.<op>` (a NATS micro
//! service, `flotilla-budget`), answered by the keeper that holds the lease
//! ([`flotilla_service::lease`], key `budget-keeper`).
//! On taking the lease the ledger is rebuilt from the ledger stream ([`crate::replay`]); then
//! requests are taken in (`request`) and decided in rounds (`batch`), every change recorded in
//! the ledger stream, fenced by the stream's last sequence, and stored before it is answered.

use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use async_nats::jetstream::object_store::ObjectStore;
use async_nats::service::ServiceExt as _;
use async_nats::service::endpoint::Endpoint;
use flotilla_protocol::BudgetOp;
use flotilla_service::{Fleet, lease};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

use crate::batch::Keeper;
pub use crate::batch::MAX_WAIT;
use crate::replay::rebuild;

/// Most requests decided in one batch.
const BATCH: usize = 512;
/// How often waiting reservations are looked at again.
const WAIT_POLL: Duration = Duration::from_millis(25);

/// What the active keeper needs besides NATS.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Ledger entries between two snapshots of the state (0: none).
    pub snapshot_every: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self { snapshot_every: 10_000 }
    }
}

/// Serves budget requests while this keeper holds the lease (`role` in `leases`), until
/// `shutdown`. A keeper whose serving fails (a rebuild that cannot be trusted, a fenced write)
/// releases the lease and competes again only after a backoff.
pub async fn serve(
    fleet: Fleet,
    leases: kv::Store,
    operators: kv::Store,
    role: lease::Role,
    snapshots: ObjectStore,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let work = {
        let fleet = fleet.clone();
        move |lost: CancellationToken| {
            let (fleet, snapshots, settings) = (fleet.clone(), snapshots.clone(), settings.clone());
            let operators = operators.clone();
            async move { serve_as_leader(&fleet, &operators, &snapshots, &settings, &lost).await }
        }
    };
    lease::hold(fleet, leases, role, shutdown, work).await;
    Ok(())
}

async fn serve_as_leader(
    fleet: &Fleet,
    operators: &kv::Store,
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
    let svc = Serving(Some(svc));
    let mut endpoints: Vec<futures::stream::BoxStream<'static, (BudgetOp, async_nats::service::Request)>> =
        Vec::new();
    for &op in BudgetOp::ALL {
        let ep: Endpoint = svc
            .service()?
            .endpoint_builder()
            .name(op.as_str())
            .add(fleet.names.budget_subject(op.as_str()))
            .await
            .map_err(|e| anyhow::anyhow!("failed to add the {op} endpoint: {e}"))?;
        endpoints.push(ep.map(move |r| (op, r)).boxed());
    }
    let mut requests = futures::stream::select_all(endpoints);
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
        let mut items = Vec::with_capacity(batch.len());
        for (op, req) in batch {
            if let Some(mut incoming) = crate::request::receive(op, req, &fleet.names) {
                crate::request::attribute(op, &mut incoming, fleet, operators).await;
                items.push(incoming);
            }
        }
        if let Err(e) = keeper.round(items, false).await {
            break Err(e);
        }
    };
    // Stop taking requests before anything else: a standby answers them from now on.
    svc.stop().await;
    keeper.hand_over().await;
    result.map_err(anyhow::Error::from)
}

/// The budget micro service while this keeper serves. It is stopped however serving ends, also
/// when the lease's holder aborts the work: a service left running would linger in `nats micro`
/// discovery and answer its verbs for a keeper that no longer serves.
struct Serving(Option<async_nats::service::Service>);

impl Serving {
    fn service(&self) -> anyhow::Result<&async_nats::service::Service> {
        self.0.as_ref().ok_or_else(|| anyhow::anyhow!("the budget micro service has stopped"))
    }

    async fn stop(mut self) {
        if let Some(svc) = self.0.take()
            && let Err(e) = svc.stop().await
        {
            tracing::warn!(error = %e, "failed to stop the budget micro service");
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some(svc) = self.0.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                if let Err(e) = svc.stop().await {
                    tracing::warn!(error = %e, "failed to stop the budget micro service");
                }
            });
        }
    }
}
