//! The whole fleet as `flotilla up` and `flotilla demo` run it: the four services' settings,
//! layered as the service binaries layer theirs, and [`LocalFleet::start_all`], which starts the
//! dispatcher, the budget-keeper, the monitor and an agent-runner from them.

use std::net::SocketAddr;
use std::path::Path;

use flotilla_service::{CommonConfig, config};
use serde::Serialize;

use crate::{FleetFile, LocalFleet, LocalNats, Nats, Options};

/// Settings of a whole fleet in one process: defaults, then the configuration file, then
/// `FLOTILLA_*` variables; the common settings also take the caller's overrides (its flags).
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub common: CommonConfig,
    /// `[dispatcher]`.
    pub dispatcher: flotilla_dispatcher::Config,
    /// `[budget_keeper]`.
    pub budget_keeper: flotilla_budget_keeper::Config,
    /// `[agent_runner]`.
    pub agent_runner: flotilla_agent_runner::Config,
}

impl FleetConfig {
    /// Loads the layers; `overrides` go over the common settings (flags not given serialize as
    /// null and mask nothing).
    pub fn load(file: Option<&Path>, overrides: impl Serialize) -> anyhow::Result<Self> {
        let fig = config::figment(file);
        let none = || serde_json::json!({});
        Ok(Self {
            common: config::extract(&fig, None, overrides)?,
            dispatcher: config::extract(&fig, Some("dispatcher"), none())?,
            budget_keeper: config::extract(&fig, Some("budget_keeper"), none())?,
            agent_runner: config::extract(&fig, Some("agent_runner"), none())?,
        })
    }

    /// Options of a [`LocalFleet`] for these settings: on the configured NATS URL, or else on a
    /// nats-server started as `local` says.
    pub fn options(&self, local: LocalNats) -> anyhow::Result<Options> {
        let nats = self.common.nats_url().map_or(Nats::Local(local), |url| Nats::Url(url.to_owned()));
        Ok(Options {
            format: self.common.wire_format,
            streams: self.common.streams.clone(),
            ..Options::new(nats, self.common.names()?)
        })
    }
}

impl LocalFleet {
    /// Starts the four services as `flotilla up` runs them: each as `<instance>-<service>`
    /// (`instance`: the configured one, else a random id), the agent-runner hosting `fleet_file`
    /// (runner id: the configured one, else `local-<instance>`), the monitor serving `/metrics` on
    /// `monitor_addr`. Returns the monitor's address.
    pub async fn start_all(
        &mut self,
        config: &FleetConfig,
        fleet_file: FleetFile,
        monitor_addr: SocketAddr,
    ) -> anyhow::Result<SocketAddr> {
        let instance = config.common.instance.clone().unwrap_or_else(config::random_instance_id);
        let name = |service: &str| format!("{instance}-{service}");
        let dispatcher = flotilla_dispatcher::Dispatcher::new(config.dispatcher.clone());
        self.spawn(&name("dispatcher"), dispatcher).await?;
        let keeper = flotilla_budget_keeper::BudgetKeeper::new(config.budget_keeper.clone());
        self.spawn(&name("budget-keeper"), keeper).await?;
        let (_, monitor_addr) = self.spawn_monitor(&name("monitor"), monitor_addr).await?;
        let mut runner_config = config.agent_runner.clone();
        runner_config.runner_id.get_or_insert_with(|| format!("local-{instance}"));
        let identity = format!("runner-{}", runner_config.runner_id.as_deref().unwrap_or_default());
        let runner = flotilla_agent_runner::Runner::new(runner_config, fleet_file)?;
        self.spawn_as(&identity, &name("agent-runner"), runner).await?;
        Ok(monitor_addr)
    }
}
