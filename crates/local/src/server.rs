//! Where a local fleet's NATS comes from: an existing server's URL, or a nats-server the fleet
//! starts in a data directory of its own (store in `jetstream/`, configuration beside it).

use std::path::PathBuf;

use anyhow::Context as _;
use flotilla_service::local_server::{LocalServer, LocalServerOptions, default_search_roots, locate};

/// nats-server settings for a local server whose acknowledged writes must survive a power loss
/// (`sync_interval: always`): the project's `nats/server.conf`.
pub const SERVER_CONF: &str = include_str!("../../../nats/server.conf");

/// The NATS a local fleet runs on.
#[derive(Debug, Clone)]
pub enum Nats {
    /// An existing server, by URL(s); the fleet leaves it running when it stops.
    Url(String),
    /// A nats-server the fleet starts, and stops when it stops.
    Local(LocalNats),
}

/// A nats-server to start for a fleet.
#[derive(Debug, Clone)]
pub struct LocalNats {
    /// Holds the server's store (`jetstream/`, with its ports file and log) and, for
    /// [`ServerConfig::Durable`], its configuration file.
    pub data_dir: PathBuf,
    /// Client port; `None` picks a free one.
    pub port: Option<u16>,
    /// The server's configuration.
    pub config: ServerConfig,
    /// An auth directory whose `auth.conf` the server includes (authentication on).
    pub auth: Option<PathBuf>,
}

/// Configuration of a local nats-server.
#[derive(Debug, Clone)]
pub enum ServerConfig {
    /// [`SERVER_CONF`], written into the data directory.
    Durable,
    /// A configuration file of the caller's (e.g. `nats/test.conf`).
    File(PathBuf),
    /// nats-server's own defaults (JetStream on, flushed on its default interval).
    Defaults,
}

impl LocalNats {
    /// Locates nats-server (see [`locate`]) and starts it; it accepts clients when this returns.
    pub(crate) fn start(&self) -> anyhow::Result<LocalServer> {
        let binary = locate(&default_search_roots())?;
        std::fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("failed to create {}", self.data_dir.display()))?;
        let config_file = match &self.config {
            ServerConfig::Durable => {
                let conf = self.data_dir.join("nats-server.conf");
                let mut text = SERVER_CONF.to_owned();
                if let Some(dir) = &self.auth {
                    // nats-server reads an include relative to the including file's directory.
                    let auth_conf = dir
                        .join("auth.conf")
                        .strip_prefix(&self.data_dir)
                        .map(std::path::Path::to_path_buf)
                        .context("the auth directory must be inside the data directory")?;
                    text.push_str(&format!(
                        "# Authentication: every client connects as an identity of the auth directory.\ninclude \"{}\"\n",
                        auth_conf.display()
                    ));
                }
                std::fs::write(&conf, text).context("failed to write nats-server.conf")?;
                Some(conf)
            }
            ServerConfig::File(path) => Some(path.clone()),
            ServerConfig::Defaults => None,
        };
        LocalServer::start(LocalServerOptions {
            binary,
            store_dir: self.data_dir.join("jetstream"),
            port: self.port,
            config_file,
        })
    }
}
