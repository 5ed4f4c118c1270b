//! Following a KV bucket: every key's latest value, then every change, applied to an in-memory
//! view (reopened when the watch ends), and the grants view every router and runner keeps.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use flotilla_protocol::{Decision, Grant, GrantScope, Party, codec, decide};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

/// Applies every key's latest value, then every change, of `store` through `apply` (`None` for a
/// deleted key) until `shutdown`; opens the watch again when it ends.
pub async fn follow(
    store: kv::Store,
    what: &'static str,
    shutdown: CancellationToken,
    apply: impl Fn(&str, Option<&[u8]>),
) {
    while !shutdown.is_cancelled() {
        let mut watch = match store.watch_with_history(">").await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(what, error = %e, "failed to watch; trying again");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        loop {
            let entry = tokio::select! {
                _ = shutdown.cancelled() => return,
                e = watch.next() => e,
            };
            match entry {
                Some(Ok(e)) => match e.operation {
                    kv::Operation::Put => apply(&e.key, Some(&e.value)),
                    kv::Operation::Delete | kv::Operation::Purge => apply(&e.key, None),
                },
                Some(Err(e)) => {
                    tracing::warn!(what, error = %e, "watch failed; watching again");
                    break;
                }
                None => break,
            }
        }
    }
}

/// Every grant of the fleet, kept current from the grants bucket (a change applies as soon as
/// the watch brings it, well within a second).
#[derive(Debug, Default, Clone)]
pub struct Grants {
    map: Arc<RwLock<HashMap<String, Grant>>>,
}

impl Grants {
    /// Every grant now.
    pub fn all(&self) -> Vec<Grant> {
        self.map.read().map(|g| g.values().cloned().collect()).unwrap_or_default()
    }

    /// Whether `from` may do `scope` to `to`, by the grants now.
    pub fn decide(&self, scope: GrantScope, from: &Party, to: &Party) -> Decision {
        decide(&self.all(), scope, from, to)
    }

    /// Keeps the view current from `store` until `shutdown`.
    pub async fn maintain(self, store: kv::Store, shutdown: CancellationToken) {
        follow(store, "grants", shutdown, move |key, value| {
            let Ok(mut map) = self.map.write() else { return };
            match value.map(|v| codec::decode::<Grant>(None, v)) {
                Some(Ok(g)) => {
                    map.insert(key.to_owned(), g);
                }
                Some(Err(e)) => {
                    // A grant that cannot be read must not leave an older version of it in force.
                    map.remove(key);
                    tracing::error!(key, error = %e, "unreadable grant; it is not applied");
                }
                None => {
                    map.remove(key);
                }
            }
        })
        .await;
    }
}
