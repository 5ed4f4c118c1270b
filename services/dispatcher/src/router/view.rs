//! The router's view of the fleet: every registered agent and every grant, each kept current by a
//! watch of its bucket (a grant changed with `flotilla grants` applies as soon as the watch brings
//! it, well within a second). A watch that ends is opened again.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use flotilla_protocol::{AgentRecord, Grant, codec};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

/// What the router knows, shared by its request handlers.
#[derive(Debug, Default)]
pub struct View {
    agents: RwLock<HashMap<String, AgentRecord>>,
    grants: RwLock<HashMap<String, Grant>>,
}

impl View {
    /// The agent's record, if it is registered.
    pub fn agent(&self, id: &str) -> Option<AgentRecord> {
        self.agents.read().ok().and_then(|a| a.get(id).cloned())
    }

    /// Every registered agent that `keep` selects.
    pub fn agents_where(&self, keep: impl Fn(&AgentRecord) -> bool) -> Vec<AgentRecord> {
        let Ok(agents) = self.agents.read() else { return Vec::new() };
        let mut out: Vec<AgentRecord> = agents.values().filter(|r| keep(r)).cloned().collect();
        out.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        out
    }

    /// Every grant.
    pub fn grants(&self) -> Vec<Grant> {
        self.grants.read().map(|g| g.values().cloned().collect()).unwrap_or_default()
    }

    /// Adds what a registry read found before the watch did.
    pub fn learn_agent(&self, r: AgentRecord) {
        if let Ok(mut a) = self.agents.write() {
            a.insert(r.agent_id.clone(), r);
        }
    }
}

/// Keeps `view` current until `shutdown`.
pub async fn maintain(view: Arc<View>, agents: kv::Store, grants: kv::Store, shutdown: CancellationToken) {
    let a = follow(agents, "agents", shutdown.clone(), {
        let view = view.clone();
        move |key, value| {
            let Ok(mut map) = view.agents.write() else { return };
            match value.map(|v| codec::decode::<AgentRecord>(None, v)) {
                Some(Ok(r)) => {
                    map.insert(key.to_owned(), r);
                }
                Some(Err(e)) => tracing::warn!(key, error = %e, "unreadable agent record; ignored"),
                None => {
                    map.remove(key);
                }
            }
        }
    });
    let g = follow(grants, "grants", shutdown, move |key, value| {
        let Ok(mut map) = view.grants.write() else { return };
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
    });
    tokio::join!(a, g);
}

/// Applies every key's latest value, then every change, of `store` through `apply` (`None` for a
/// deleted key); opens the watch again when it ends.
async fn follow(
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
