//! What every service binary does around its real work: read the common flags, load the layered
//! configuration, start telemetry, connect to NATS and ensure the topology, run the service until
//! SIGINT or SIGTERM, then drain the connection ([`run_binary`]).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use figment::Figment;
use serde::{Serialize, de::DeserializeOwned};

use crate::{CommonConfig, Fleet, Mode, Service, Topology, config};

/// Flags every service binary takes (each with its environment twin).
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Configuration file (TOML).
    #[arg(long, env = "FLOTILLA_CONFIG")]
    pub config: Option<PathBuf>,
    /// NATS URL(s), comma-separated.
    #[arg(long, env = "FLOTILLA_NATS_URL")]
    pub nats_url: Option<String>,
    /// Seed file of this process's identity (`flotilla auth` writes them).
    #[arg(long, env = "FLOTILLA_CREDS")]
    pub creds: Option<PathBuf>,
    /// CA certificate (PEM) to verify the server with; turns TLS on.
    #[arg(long, env = "FLOTILLA_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), for a server that verifies clients.
    #[arg(long, env = "FLOTILLA_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Key of the client certificate (PEM).
    #[arg(long, env = "FLOTILLA_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

/// Loaded configuration of a service binary.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub figment: Figment,
    pub common: CommonConfig,
}

impl Loaded {
    /// Loads defaults, the file, the environment, then the common flags.
    pub fn load(args: &CommonArgs) -> anyhow::Result<Self> {
        let figment = config::figment(args.config.as_deref());
        let common = config::extract(
            &figment,
            None,
            serde_json::json!({
                "nats_url": args.nats_url,
                "creds": args.creds,
                "tls_ca": args.tls_ca,
            "tls_cert": args.tls_cert,
            "tls_key": args.tls_key,
            }),
        )?;
        Ok(Self { figment, common })
    }

    /// The service's own section (e.g. `dispatcher`) with `overrides` (its flags) on top.
    pub fn section<T: DeserializeOwned + Serialize + Default>(
        &self,
        name: &str,
        overrides: impl Serialize,
    ) -> anyhow::Result<T> {
        config::extract(&self.figment, Some(name), overrides)
    }

    /// Connects as `service` with `instance` (default: the configured or a random id) and
    /// ensures the topology.
    pub async fn connect(
        &self,
        service: &str,
        instance: Option<String>,
        mode: Mode,
    ) -> anyhow::Result<(Fleet, Topology)> {
        let names = self.common.names()?;
        let instance =
            instance.or_else(|| self.common.instance.clone()).unwrap_or_else(config::random_instance_id);
        let client = crate::nats::connect(
            &self.common.nats_url_or_default(),
            &format!("flotilla-{service}"),
            &self.common.auth,
        )
        .await?;
        let has_creds = self.common.auth.creds.as_ref().is_some_and(|p| !p.as_os_str().is_empty());
        let fleet = Fleet::new(client, names, self.common.wire_format, instance).authenticated(has_creds);
        let topology = if mode == Mode::Join && has_creds {
            // A least-privilege credential creates nothing: the dispatcher owns the topology.
            Topology::open(&fleet.js, &fleet.names, Duration::from_secs(60)).await?
        } else {
            crate::nats::patiently("the fleet's streams and buckets", crate::nats::STARTUP_PATIENCE, || {
                Topology::ensure(&fleet.js, &fleet.names, &self.common.streams, mode)
            })
            .await?
        };
        Ok((fleet, topology))
    }
}

/// Drains the fleet's connection (pending publishes and acks go out) at the end of `main`.
pub async fn drain(fleet: &Fleet) -> anyhow::Result<()> {
    fleet.client.drain().await.context("failed to drain the NATS connection")
}

/// The whole life of a service binary: telemetry (flushed when this returns), the layered
/// configuration, the service `build` makes from it (with the instance id to connect as, if it
/// has its own), the connection with the topology ensured in `mode`, the service running until
/// SIGINT or SIGTERM, then the drained connection.
pub async fn run_binary<S, F>(common: &CommonArgs, mode: Mode, build: F) -> anyhow::Result<()>
where
    S: Service,
    F: AsyncFnOnce(&Loaded) -> anyhow::Result<(S, Option<String>)>,
{
    let _telemetry = crate::telemetry::init(&format!("flotilla-{}", S::NAME), "info");
    let loaded = Loaded::load(common)?;
    let (service, instance) = build(&loaded).await?;
    let (fleet, topology) = loaded.connect(S::NAME, instance, mode).await?;
    let shutdown = crate::shutdown::on_signal();
    service.run(fleet.clone(), topology, shutdown).await?;
    drain(&fleet).await
}

/// The flags of a service binary that takes only the common ones.
#[derive(Debug, clap::Parser)]
struct CommonOnly {
    #[command(flatten)]
    common: CommonArgs,
}

/// `main` of a service binary with no flags of its own (`--help` shows its `name` and what it
/// does, `about`): its settings are the `[section]` of the configuration, from which `make` builds
/// the service.
pub async fn run_plain<S, C>(
    (name, about): (&'static str, &'static str),
    section: &str,
    mode: Mode,
    make: impl FnOnce(C) -> S,
) -> anyhow::Result<()>
where
    S: Service,
    C: DeserializeOwned + Serialize + Default,
{
    use clap::{CommandFactory as _, FromArgMatches as _};
    let command = CommonOnly::command().name(name).about(about).version(env!("CARGO_PKG_VERSION"));
    let args = CommonOnly::from_arg_matches(&command.get_matches()).map_err(|e| e.exit())?;
    run_binary(&args.common, mode, async |loaded: &Loaded| {
        Ok((make(loaded.section(section, serde_json::json!({}))?), None))
    })
    .await
}
