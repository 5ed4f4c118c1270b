//! The budget-keeper: owns the ledger stream and the snapshot store (both ensured at start),
//! answers health requests and, while it holds the `budget-keeper` lease
//! ([`flotilla_service::lease`]), serves token budgets, rate limits and prices ([`service`] on
//! `<p>.budget.<op>`) from its [`ledger`], every change recorded in the ledger stream first. What each operation does is [`apply`]; a
//! keeper taking over rebuilds the ledger by [`replay`]; requests are taken in and decided in
//! rounds by the private `request` and `batch` modules.

pub mod apply;
mod batch;
pub mod ledger;
pub mod replay;
mod request;
pub mod service;
pub mod snapshot;

use std::sync::Arc;
use std::time::Duration;

use flotilla_protocol::names::lease_key;
use flotilla_service::{Fleet, Topology, lease};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Budget-keeper settings (`[budget_keeper]`, `FLOTILLA_BUDGET_KEEPER__*`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Replicas of the snapshot store (default: the fleet's, `streams.replicas`, which the ledger
    /// stream has with the rest of the topology).
    pub replicas: Option<usize>,
    /// Length of the active keeper's lease: a standby takes over this long after the active
    /// keeper died (300 ms to 20 s).
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Ledger entries between two snapshots of the state (0: none; a keeper taking over then
    /// replays the whole ledger).
    pub snapshot_every: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            replicas: None,
            lease: Duration::from_secs(3),
            snapshot_every: service::Settings::default().snapshot_every,
        }
    }
}

/// The budget-keeper, ready to run ([`flotilla_service::Service`]).
#[derive(Debug, Clone, Default)]
pub struct BudgetKeeper {
    config: Config,
}

impl Config {
    /// Refuses settings that cannot work.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (lease::MIN_TTL..=lease::MAX_TTL).contains(&self.lease),
            "budget_keeper.lease must be between {:?} and {:?}",
            lease::MIN_TTL,
            lease::MAX_TTL
        );
        Ok(())
    }
}

impl BudgetKeeper {
    pub fn new(config: Config) -> Self {
        Self { config }
    }
}

impl flotilla_service::Service for BudgetKeeper {
    const NAME: &'static str = flotilla_protocol::names::service::BUDGET_KEEPER;

    /// Ensures the snapshot store, answers health requests, and serves
    /// budgets while this keeper holds the lease, until `shutdown`.
    async fn run(self, fleet: Fleet, topology: Topology, shutdown: CancellationToken) -> anyhow::Result<()> {
        let config = self.config;
        config.validate()?;
        let replicas = config.replicas.unwrap_or(topology.replicas);
        let lease_status = Arc::new(lease::LeaseStatus::default());
        let details = lease_status.details_with(|| serde_json::json!({}));
        // The ledger stream came with the topology the keeper was given; the snapshot store is
        // its own, and ensured before health says "ok".
        let snapshots = snapshot::ensure(&fleet, replicas).await?;
        let health =
            flotilla_service::health::serve(fleet.clone(), Self::NAME, details, shutdown.clone()).await?;
        tracing::info!(ledger = %fleet.names.ledger_stream(), "budget-keeper ready");
        let settings = service::Settings { snapshot_every: config.snapshot_every };
        let role = lease::Role { key: lease_key::BUDGET_KEEPER, ttl: config.lease, status: lease_status };
        let served = service::serve(
            fleet,
            topology.leases.clone(),
            topology.operators.clone(),
            role,
            snapshots,
            settings,
            shutdown.clone(),
        )
        .await;
        shutdown.cancel();
        let _ = health.await;
        served
    }
}
