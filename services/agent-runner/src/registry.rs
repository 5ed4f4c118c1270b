//! The runner's agents and their registry entries: registration, heartbeats that carry load and
//! status, capability declarations, and deregistration on shutdown.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_protocol::{
    AgentEvent, AgentRecord, AgentStatus, CapabilityRecord, PROTOCOL_VERSION, time::now_ms,
};
use flotilla_service::{Fleet, Topology, nats::FleetError};
use futures::StreamExt as _;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::fleet::{AgentTemplate, FleetFile};
use crate::lifecycle::Lifecycle;

/// One hosted agent.
#[derive(Debug)]
pub struct Slot {
    pub agent_id: String,
    pub template: Arc<AgentTemplate>,
    /// One permit per concurrent task.
    pub permits: Arc<Semaphore>,
    pub in_flight: AtomicU32,
    /// (task, attempt) pairs this process is running now, to ignore redeliveries of live work.
    pub running: Mutex<HashSet<(String, u32)>>,
    /// Crashes since the last success; at [`MAX_CRASHES`] the agent goes to `error`.
    pub crashes: AtomicU32,
    pub lifecycle: Arc<Lifecycle>,
}

/// Consecutive crashes after which an agent stops taking work.
pub const MAX_CRASHES: u32 = 3;

impl Slot {
    /// True when the agent crashed too often and takes no more work.
    pub fn in_error(&self) -> bool {
        self.crashes.load(Ordering::Relaxed) >= MAX_CRASHES
    }
}

/// All agents of this runner, plus counters for health replies.
#[derive(Debug)]
pub struct Agents {
    pub runner_id: String,
    interval: Duration,
    started_at_ms: u64,
    slots: BTreeMap<String, Arc<Slot>>,
    pub draining: AtomicBool,
    /// Model executions started (a re-run after a crash counts again).
    pub executions: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    /// Assignments dropped because the task had moved on (reassigned, finished, unknown).
    pub fenced: AtomicU64,
    /// Signalled when the registry should be written now (a lifecycle change).
    pub dirty: Arc<Notify>,
}

impl Agents {
    /// Builds the agents of a fleet file: `<runner>-<template>-<n>`.
    pub fn new(
        runner_id: &str,
        fleet: &FleetFile,
        interval: Duration,
        events: &mpsc::UnboundedSender<AgentEvent>,
    ) -> Self {
        let mut slots = BTreeMap::new();
        for t in &fleet.agents {
            let template = Arc::new(t.clone());
            for n in 0..t.replicas {
                let agent_id = format!("{runner_id}-{}-{n}", t.name);
                let permits = usize::try_from(t.concurrency).unwrap_or(1);
                slots.insert(
                    agent_id.clone(),
                    Arc::new(Slot {
                        agent_id: agent_id.clone(),
                        template: template.clone(),
                        permits: Arc::new(Semaphore::new(permits)),
                        in_flight: AtomicU32::new(0),
                        running: Mutex::new(HashSet::new()),
                        crashes: AtomicU32::new(0),
                        lifecycle: Arc::new(Lifecycle::new(
                            agent_id.clone(),
                            runner_id.to_owned(),
                            events.clone(),
                        )),
                    }),
                );
            }
        }
        Self {
            runner_id: runner_id.to_owned(),
            interval,
            started_at_ms: now_ms(),
            slots,
            draining: AtomicBool::new(false),
            executions: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            fenced: AtomicU64::new(0),
            dirty: Arc::new(Notify::new()),
        }
    }

    /// Every agent.
    pub fn slots(&self) -> impl Iterator<Item = &Arc<Slot>> {
        self.slots.values()
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn get(&self, agent_id: &str) -> Option<Arc<Slot>> {
        self.slots.get(agent_id).cloned()
    }

    pub fn total_capacity(&self) -> u32 {
        self.slots.values().map(|s| s.template.concurrency).fold(0, u32::saturating_add)
    }

    pub fn in_flight_total(&self) -> u32 {
        self.slots.values().map(|s| s.in_flight.load(Ordering::Relaxed)).fold(0, u32::saturating_add)
    }

    fn record(&self, slot: &Slot) -> AgentRecord {
        let (state, activities) = slot.lifecycle.snapshot();
        let in_flight = slot.in_flight.load(Ordering::Relaxed);
        let status = if slot.in_error() {
            AgentStatus::Error
        } else if self.draining.load(Ordering::Relaxed) {
            AgentStatus::Draining
        } else if in_flight > 0 {
            AgentStatus::Busy
        } else {
            AgentStatus::Idle
        };
        AgentRecord {
            agent_id: slot.agent_id.clone(),
            name: slot.template.name.clone(),
            runner_id: self.runner_id.clone(),
            capabilities: slot.template.capabilities.clone(),
            labels: slot.template.labels.clone(),
            provider: slot.template.provider.clone(),
            model: slot.template.model.clone(),
            concurrency: slot.template.concurrency,
            in_flight,
            status,
            started_at_ms: self.started_at_ms,
            heartbeat_at_ms: now_ms(),
            heartbeat_interval_ms: u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX),
            state,
            activities,
            protocol_version: PROTOCOL_VERSION,
        }
    }

    /// Writes every agent's registry entry once (registration and heartbeat).
    pub async fn beat(&self, fleet: &Fleet, topology: &Topology) -> Result<(), FleetError> {
        let records: Vec<AgentRecord> = self.slots.values().map(|s| self.record(s)).collect();
        let results: Vec<Result<u64, FleetError>> = futures::stream::iter(records)
            .map(|rec| {
                let (fleet, store) = (fleet.clone(), topology.agents.clone());
                async move { fleet.kv_put(&store, &rec.agent_id, &rec).await }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<_>, _>>().map(|_| ())
    }

    /// Removes every agent's registry entry.
    pub async fn deregister(&self, fleet: &Fleet, topology: &Topology) {
        for id in self.slots.keys() {
            if let Err(e) = topology.agents.delete(id).await {
                tracing::warn!(agent = %id, error = %e, "failed to deregister agent");
            }
        }
        let _ = fleet;
    }

    /// Figures for health replies.
    pub fn health_details(&self) -> serde_json::Value {
        serde_json::json!({
            "runner_id": self.runner_id,
            "agents": self.slots.len(),
            "in_flight": self.in_flight_total(),
            "executions": self.executions.load(Ordering::Relaxed),
            "completed": self.completed.load(Ordering::Relaxed),
            "failed": self.failed.load(Ordering::Relaxed),
            "fenced": self.fenced.load(Ordering::Relaxed),
            "draining": self.draining.load(Ordering::Relaxed),
        })
    }
}

/// Records every capability of the fleet file in the capabilities bucket (first writer wins).
pub async fn declare_capabilities(
    fleet: &Fleet,
    topology: &Topology,
    file: &FleetFile,
) -> anyhow::Result<()> {
    let mut caps: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for t in &file.agents {
        for c in &t.capabilities {
            caps.entry(c.as_str()).or_default().push(t.name.clone());
        }
    }
    for (cap, templates) in caps {
        let rec = CapabilityRecord { capability: cap.to_owned(), templates, declared_at_ms: now_ms() };
        match fleet.kv_create(&topology.capabilities, cap, &rec).await {
            Ok(_) => {}
            Err(e) if e.is_conflict() => {}
            Err(e) => return Err(anyhow::anyhow!(e).context(format!("failed to declare capability {cap}"))),
        }
    }
    Ok(())
}

/// Rewrites the registry entries every `interval` until shutdown.
pub async fn heartbeat_loop(
    agents: Arc<Agents>,
    fleet: Fleet,
    topology: Topology,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            _ = agents.dirty.notified() => {}
        }
        if let Err(e) = agents.beat(&fleet, &topology).await {
            tracing::warn!(error = %e, "heartbeat failed");
        }
    }
}
