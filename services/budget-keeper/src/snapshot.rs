//! Snapshots of the ledger's state, so that a keeper taking over replays only what came after
//! the last one rather than the whole ledger stream (which only grows). A snapshot is the
//! [`Ledger`] as it was right after the stream's entry `seq`, saved as the object `ledger` of
//! the `<p>_budget_snapshots` object store by the active keeper every so many entries. Nothing
//! depends on it for correctness: without one (or with one that cannot be read) the whole stream
//! is replayed.

use anyhow::Context as _;
use async_nats::jetstream::object_store::{self, ObjectStore};
use async_nats::jetstream::stream::StorageType;
use flotilla_protocol::{WireFormat, codec, time::now_ms};
use flotilla_service::Fleet;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt as _;

use crate::ledger::Ledger;

/// The object's name.
pub const OBJECT: &str = "ledger";

/// What is saved.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    /// The ledger stream's entry the state is right after.
    pub seq: u64,
    pub at_ms: u64,
    pub ledger: Ledger,
}

/// Opens (or creates) the snapshot store.
pub async fn ensure(fleet: &Fleet, replicas: usize) -> anyhow::Result<ObjectStore> {
    let bucket = fleet.names.budget_snapshots_bucket();
    if let Ok(store) = fleet.js.get_object_store(&bucket).await {
        return Ok(store);
    }
    fleet
        .js
        .create_object_store(object_store::Config {
            bucket: bucket.clone(),
            description: Some("Flotilla: snapshots of the budget ledger's state".to_owned()),
            storage: StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .with_context(|| format!("failed to create the object store {bucket}"))
}

/// The last snapshot, if there is one.
#[tracing::instrument(skip_all)]
pub async fn load(store: &ObjectStore) -> anyhow::Result<Option<Snapshot>> {
    let mut object = match store.get(OBJECT).await {
        Ok(o) => o,
        Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context("failed to open the ledger snapshot"),
    };
    let mut bytes = Vec::new();
    object.read_to_end(&mut bytes).await.context("failed to read the ledger snapshot")?;
    let snap: Snapshot = codec::decode(None, &bytes).context("unreadable ledger snapshot")?;
    Ok(Some(snap))
}

/// Saves the ledger as it is right after entry `seq`.
#[tracing::instrument(skip_all, fields(seq))]
pub async fn save(store: &ObjectStore, ledger: Ledger, seq: u64) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let snap = Snapshot { seq, at_ms: now_ms(), ledger };
    let bytes = codec::encode(WireFormat::Msgpack, &snap).context("failed to encode the ledger snapshot")?;
    let size = bytes.len();
    store.put(OBJECT, &mut bytes.as_slice()).await.context("failed to save the ledger snapshot")?;
    tracing::info!(seq, bytes = size, took_ms = started.elapsed().as_millis(), "ledger snapshot saved");
    Ok(())
}
