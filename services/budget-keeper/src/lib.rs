//! The budget-keeper: owns the budgets bucket (the active keeper's lease, [`leader`]) and the
//! ledger stream (both ensured at start), answers health requests and, while active, serves
//! token budgets, rate limits and prices ([`service`] on `<p>.budget.<op>`) from its [`ledger`],
//! every change recorded in the ledger stream first. What each operation does is [`apply`]; a
//! keeper taking over rebuilds the ledger by [`replay`]; requests are taken in and decided in
//! rounds by the private `request` and `batch` modules.

pub mod apply;
mod batch;
pub mod leader;
pub mod ledger;
pub mod replay;
mod request;
pub mod service;
pub mod snapshot;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{kv, stream};
use flotilla_service::{Fleet, Topology};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Budget-keeper settings (`[budget_keeper]`, `FLOTILLA_BUDGET_KEEPER__*`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Replicas of the budgets bucket and the ledger stream.
    pub replicas: Option<usize>,
    /// Length of the active keeper's lease: a standby takes over this long after the active
    /// keeper died.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Ledger entries between two snapshots of the state (0: none; a keeper taking over then
    /// replays the whole ledger).
    pub snapshot_every: u64,
}

impl Default for Config {
    fn default() -> Self {
        let s = service::Settings::default();
        Self { replicas: None, lease: s.lease, snapshot_every: s.snapshot_every }
    }
}

/// The budget-keeper, ready to run ([`flotilla_service::Service`]).
#[derive(Debug, Clone, Default)]
pub struct BudgetKeeper {
    config: Config,
}

impl BudgetKeeper {
    pub fn new(config: Config) -> Self {
        Self { config }
    }
}

impl flotilla_service::Service for BudgetKeeper {
    const NAME: &'static str = flotilla_protocol::names::service::BUDGET_KEEPER;

    /// Ensures the budgets bucket, the ledger stream and the snapshot store, answers health
    /// requests, and serves budgets while this keeper holds the lease, until `shutdown`.
    async fn run(self, fleet: Fleet, topology: Topology, shutdown: CancellationToken) -> anyhow::Result<()> {
        let config = self.config;
        let replicas = config.replicas.unwrap_or(topology.replicas);
        let bucket = fleet.names.budgets_bucket();
        let store = flotilla_service::topology::ensure_bucket(
            &fleet.js,
            flotilla_service::Mode::Own,
            kv::Config {
                bucket: bucket.clone(),
                description: "Flotilla: token budgets and their usage".to_owned(),
                history: 1,
                max_age: Duration::ZERO,
                num_replicas: replicas,
                storage: stream::StorageType::File,
                ..Default::default()
            },
        )
        .await?;
        let lease_store = store.clone();
        let store = Arc::new(store);
        let health = flotilla_service::health::serve(
            fleet.clone(),
            Self::NAME,
            Arc::new(move || serde_json::json!({ "bucket": store.name })),
            shutdown.clone(),
        )
        .await?;
        // The ledger stream is the budget-keeper's own: ensured here too, so it serves even where
        // nothing else ensured the fleet's streams.
        let settings = flotilla_service::StreamSettings { replicas, ..Default::default() };
        let ledger = flotilla_service::topology::stream_configs(&fleet.names, &settings)
            .into_iter()
            .find(|c| c.name == fleet.names.ledger_stream())
            .ok_or_else(|| anyhow::anyhow!("no ledger stream configuration"))?;
        fleet
            .js
            .get_or_create_stream(ledger)
            .await
            .map_err(|e| anyhow::anyhow!("failed to ensure the ledger stream: {e}"))?;
        tracing::info!(bucket = %bucket, "budget-keeper ready");
        let snapshots = snapshot::ensure(&fleet, replicas).await?;
        let settings = service::Settings { lease: config.lease, snapshot_every: config.snapshot_every };
        let served = service::serve(fleet, lease_store, snapshots, settings, shutdown.clone()).await;
        shutdown.cancel();
        let _ = health.await;
        served
    }
}
