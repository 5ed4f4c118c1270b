//! What the budget-keeper's integration tests share.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing, dead_code)]

use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use flotilla_protocol::{LedgerEntry, codec};
use flotilla_service::Fleet;
use futures::StreamExt as _;

/// Every entry of the ledger stream, in order, up to its last one now.
pub async fn ledger_entries(fleet: &Fleet) -> Vec<LedgerEntry> {
    let mut stream = fleet.js.get_stream(fleet.names.ledger_stream()).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut msgs = stream
        .create_consumer(pull::OrderedConfig { deliver_policy: DeliverPolicy::All, ..Default::default() })
        .await
        .unwrap()
        .messages()
        .await
        .unwrap();
    let mut out = Vec::new();
    while out.len() < usize::try_from(last).unwrap() {
        let m = tokio::time::timeout(Duration::from_secs(30), msgs.next()).await.unwrap().unwrap().unwrap();
        out.push(codec::decode(None, &m.payload).unwrap());
    }
    out
}
