//! The dispatcher: takes submissions from the submissions stream, validates and records them, and
//! assigns each queued task to a live agent that has its capability and free capacity. Its whole
//! view of tasks and agents is a projection of two KV buckets, rebuilt from NATS on every start.
//! Several dispatchers may run: all take in submissions, one at a time schedules (the holder of
//! the `dispatcher` lease, [`flotilla_service::lease`]).

mod intake;
mod router;
pub mod runqueue;
mod scheduler;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use flotilla_protocol::names::lease_key;
use flotilla_service::{Fleet, Topology, lease};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// What to do with a task whose capability no fleet has ever declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UnknownCapability {
    /// Reject it with `unknown_capability` (default: catches typos at once).
    #[default]
    Reject,
    /// Queue it until an agent with the capability registers.
    Wait,
}

/// Dispatcher settings (`[dispatcher]` in the config file, `FLOTILLA_DISPATCHER__*`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Largest accepted task input (bytes of its JSON form).
    pub max_input_bytes: usize,
    /// Policy for capabilities no fleet has declared.
    pub unknown_capability: UnknownCapability,
    /// An agent is dead after this many missed heartbeats.
    pub missed_heartbeats: u32,
    /// A task assigned but not claimed for this long is given to another agent.
    #[serde(with = "humantime_serde")]
    pub assign_timeout: Duration,
    /// Submissions processed concurrently.
    pub intake_concurrency: usize,
    /// How long a submission an instance took in may stay unacknowledged: if that instance dies,
    /// another takes the submission in after this (an instance working on one tells the server
    /// it still is, every third of it).
    #[serde(with = "humantime_serde")]
    pub intake_ack_wait: Duration,
    /// How often liveness, timeouts and deadlines are checked.
    #[serde(with = "humantime_serde")]
    pub tick: Duration,
    /// A waiting task gains one priority level per this much waiting, so nothing starves
    /// (`0s` turns aging off: strict precedence).
    #[serde(with = "humantime_serde")]
    pub aging: Duration,
    /// How long a task with a `context_key` waits for the agent that served the key last before
    /// any agent may take it.
    #[serde(with = "humantime_serde")]
    pub affinity_wait: Duration,
    /// Tokens a task is charged to its tenant's fair share when assigned, until the tenant's own
    /// average is known; the real usage replaces it when the task ends.
    pub default_task_tokens: u64,
    /// Fair-share weight per tenant (default 1): under contention a tenant's share of the tokens
    /// converges to its weight's share.
    pub tenant_weights: HashMap<String, f64>,
    /// Attempts of a task that does not set `max_attempts`.
    pub default_max_attempts: u32,
    /// Backoff before the first retry; doubles with each further one.
    #[serde(with = "humantime_serde")]
    pub retry_base_delay: Duration,
    /// Longest backoff between two attempts.
    #[serde(with = "humantime_serde")]
    pub retry_max_delay: Duration,
    /// Ask runners for more agents of a template while its capability's queue stays deep, and
    /// for fewer once they idle, within each template's `min_replicas`..`max_replicas`.
    pub autoscale: bool,
    /// How long a capability must have ready tasks and no free agent before one more is started.
    #[serde(with = "humantime_serde")]
    pub scale_up_after: Duration,
    /// How long an agent must idle (with nothing queued for its capabilities) before it is
    /// stopped.
    #[serde(with = "humantime_serde")]
    pub scale_down_after: Duration,
    /// Least time between two scaling steps of one template on one runner.
    #[serde(with = "humantime_serde")]
    pub scale_cooldown: Duration,
    /// How long the dispatcher lease lasts without renewal: a standby takes over at most this
    /// long after the active dispatcher died (300 ms to 20 s).
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_input_bytes: 256 * 1024,
            unknown_capability: UnknownCapability::Reject,
            missed_heartbeats: 3,
            assign_timeout: Duration::from_secs(30),
            intake_concurrency: 64,
            intake_ack_wait: Duration::from_secs(2),
            tick: Duration::from_millis(100),
            aging: Duration::from_secs(60),
            affinity_wait: Duration::from_millis(250),
            default_task_tokens: 1000,
            tenant_weights: HashMap::new(),
            default_max_attempts: flotilla_protocol::DEFAULT_MAX_ATTEMPTS,
            retry_base_delay: Duration::from_secs(1),
            retry_max_delay: Duration::from_secs(60),
            autoscale: true,
            scale_up_after: Duration::from_secs(2),
            scale_down_after: Duration::from_secs(60),
            scale_cooldown: Duration::from_secs(2),
            lease_ttl: Duration::from_secs(3),
        }
    }
}

impl Config {
    /// Refuses settings that cannot work.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.tick.is_zero(), "dispatcher.tick must be positive");
        anyhow::ensure!(!self.assign_timeout.is_zero(), "dispatcher.assign_timeout must be positive");
        anyhow::ensure!(self.missed_heartbeats >= 1, "dispatcher.missed_heartbeats must be at least 1");
        anyhow::ensure!(self.intake_concurrency >= 1, "dispatcher.intake_concurrency must be at least 1");
        anyhow::ensure!(
            self.intake_ack_wait >= Duration::from_millis(300),
            "dispatcher.intake_ack_wait must be at least 300ms"
        );
        anyhow::ensure!(
            (1..=flotilla_protocol::MAX_ATTEMPTS_LIMIT).contains(&self.default_max_attempts),
            "dispatcher.default_max_attempts must be 1-{}",
            flotilla_protocol::MAX_ATTEMPTS_LIMIT
        );
        if let Some((t, w)) = self.tenant_weights.iter().find(|(_, w)| !(w.is_finite() && **w > 0.0)) {
            anyhow::bail!("dispatcher.tenant_weights.{t} must be a positive number, not {w}");
        }
        anyhow::ensure!(
            self.retry_base_delay <= self.retry_max_delay,
            "dispatcher.retry_base_delay must not exceed retry_max_delay"
        );
        anyhow::ensure!(
            (lease::MIN_TTL..=lease::MAX_TTL).contains(&self.lease_ttl),
            "dispatcher.lease_ttl must be between {:?} and {:?}",
            lease::MIN_TTL,
            lease::MAX_TTL
        );
        Ok(())
    }

    /// When the autoscaler scales, by these settings.
    pub fn autoscale_settings(&self) -> scheduler::AutoscaleSettings {
        scheduler::AutoscaleSettings {
            scale_up_after: self.scale_up_after,
            scale_down_after: self.scale_down_after,
            cooldown: self.scale_cooldown,
        }
    }

    /// The scheduling policy these settings describe.
    pub fn policy(&self) -> runqueue::Policy {
        runqueue::Policy {
            aging: self.aging,
            affinity_wait: self.affinity_wait,
            default_estimate: self.default_task_tokens,
            weights: self.tenant_weights.clone(),
        }
    }
}

/// Counters shown in health replies.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub duplicates: AtomicU64,
    pub assigned: AtomicU64,
    pub requeued: AtomicU64,
    pub queued: AtomicU64,
    pub live_agents: AtomicU64,
}

impl Stats {
    fn details(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "accepted": g(&self.accepted),
            "rejected": g(&self.rejected),
            "duplicates": g(&self.duplicates),
            "assigned": g(&self.assigned),
            "requeued": g(&self.requeued),
            "queued": g(&self.queued),
            "live_agents": g(&self.live_agents),
        })
    }
}

/// The dispatcher, ready to run ([`flotilla_service::Service`]).
#[derive(Debug, Clone)]
pub struct Dispatcher {
    config: Config,
}

impl Dispatcher {
    pub fn new(config: Config) -> Self {
        Self { config }
    }
}

impl flotilla_service::Service for Dispatcher {
    const NAME: &'static str = flotilla_protocol::names::service::DISPATCHER;

    /// Runs the dispatcher until `shutdown` is cancelled: intake on every instance, scheduling on
    /// the one that holds the lease.
    async fn run(self, fleet: Fleet, topology: Topology, shutdown: CancellationToken) -> anyhow::Result<()> {
        let config = self.config;
        config.validate()?;
        let stats = Arc::new(Stats::default());
        let lease_status = Arc::new(lease::LeaseStatus::default());
        let details = {
            let stats = stats.clone();
            lease_status.details_with(move || stats.details())
        };
        let health =
            flotilla_service::health::serve(fleet.clone(), Self::NAME, details, shutdown.clone()).await?;
        // Only the holder of the lease schedules; intake runs on every dispatcher.
        let role = lease::Role { key: lease_key::DISPATCHER, ttl: config.lease_ttl, status: lease_status };
        let scheduler = {
            let (config, fleet, topology, stats) =
                (config.clone(), fleet.clone(), topology.clone(), stats.clone());
            tokio::spawn(lease::hold(
                fleet.clone(),
                topology.leases.clone(),
                role,
                shutdown.clone(),
                move |token| {
                    scheduler::run(config.clone(), fleet.clone(), topology.clone(), stats.clone(), token)
                },
            ))
        };
        // Every instance routes messages (the router keeps no state of its own).
        let router = tokio::spawn(router::run(fleet.clone(), topology.clone(), shutdown.clone()));
        let intake = intake::run(config, fleet, topology, stats, shutdown.clone()).await;
        shutdown.cancel();
        scheduler.await.context("the lease contest panicked")?;
        match router.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = format!("{e:#}"), "the message router failed"),
            Err(e) => tracing::error!(error = %e, "the message router panicked"),
        }
        let _ = health.await;
        intake
    }
}
