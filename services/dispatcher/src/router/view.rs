//! The router's view of the fleet: every registered agent, kept current by a watch of the
//! registry, and every grant ([`flotilla_service::follow::Grants`]).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_nats::jetstream::kv;
use flotilla_protocol::{AgentRecord, codec};
use flotilla_service::follow::{Grants, follow};
use tokio_util::sync::CancellationToken;

/// What the router knows, shared by its request handlers.
#[derive(Debug, Default)]
pub struct View {
    agents: RwLock<HashMap<String, AgentRecord>>,
    pub grants: Grants,
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

    /// Adds what a registry read found before the watch did.
    pub fn learn_agent(&self, r: AgentRecord) {
        if let Ok(mut a) = self.agents.write() {
            a.insert(r.agent_id.clone(), r);
        }
    }
}

/// Keeps `view` current until `shutdown`.
pub async fn maintain(view: Arc<View>, agents: kv::Store, grants: kv::Store, shutdown: CancellationToken) {
    let g = view.grants.clone().maintain(grants, shutdown.clone());
    let a = follow(agents, "agents", shutdown, move |key, value| {
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
    });
    tokio::join!(a, g);
}
