//! The budget-keeper. In this version it owns the budgets bucket (ensured at start) and answers
//! health requests; the reservation ledger ([`ledger`]) is its first piece of issue 5, not yet
//! served over NATS.

pub mod ledger;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{kv, stream};
use flotilla_service::Fleet;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Budget-keeper settings (`[budget_keeper]`, `FLOTILLA_BUDGET_KEEPER__*`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Replicas of the budgets bucket.
    pub replicas: Option<usize>,
}

/// Ensures the budgets bucket and serves health until `shutdown`.
pub async fn run(
    config: Config,
    fleet: Fleet,
    replicas: usize,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let bucket = fleet.names.budgets_bucket();
    let store = flotilla_service::topology::ensure_bucket(
        &fleet.js,
        flotilla_service::Mode::Own,
        kv::Config {
            bucket: bucket.clone(),
            description: "Flotilla: token budgets and their usage".to_owned(),
            history: 1,
            max_age: Duration::ZERO,
            num_replicas: config.replicas.unwrap_or(replicas),
            storage: stream::StorageType::File,
            ..Default::default()
        },
    )
    .await?;
    let store = Arc::new(store);
    let health = flotilla_service::health::serve(
        fleet.clone(),
        flotilla_protocol::names::service::BUDGET_KEEPER,
        Arc::new(move || serde_json::json!({ "bucket": store.name })),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(bucket = %bucket, "budget-keeper ready");
    shutdown.cancelled().await;
    let _ = health.await;
    Ok(())
}
