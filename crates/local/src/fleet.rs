//! [`LocalFleet`]: one fleet's services running in this process, each on its own connection and
//! with its own stop token, stopped in order (intake first, the workers next, what they depend on
//! after them), then their connections drained and the local server, if any, stopped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use flotilla_protocol::names::service;
use flotilla_protocol::{Names, WireFormat};
use flotilla_service::local_server::LocalServer;
use flotilla_service::{ClientAuth, Fleet, Mode, Service, StreamSettings, Topology};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::server::Nats;

/// How long a service gets to stop once asked.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a local server gets to flush and close its store.
const SERVER_GRACE: Duration = Duration::from_secs(10);
/// The order in which [`LocalFleet::stop`] stops services: the dispatcher (intake) first, then the
/// runners (they finish or hand back their work, closing budgets as they go), then the
/// budget-keeper they needed for that, then the monitor that watched it all. Services of other
/// names stop last. Services of one kind stop together.
const STOP_ORDER: [&str; 4] =
    [service::DISPATCHER, service::AGENT_RUNNER, service::BUDGET_KEEPER, service::MONITOR];

/// How a [`LocalFleet`] is set up.
#[derive(Debug, Clone)]
pub struct Options {
    /// The server: an existing one, or one to start.
    pub nats: Nats,
    /// The fleet's subject prefix and the names derived from it.
    pub names: Names,
    /// Format of what the services publish.
    pub format: WireFormat,
    /// Stream and bucket settings of the topology.
    pub streams: StreamSettings,
    /// How the topology is ensured: [`Mode::Own`] (create or update, as the dispatcher does) or
    /// [`Mode::Join`] (create what is missing).
    pub mode: Mode,
    /// Name of the fleet's own connection; a service's connection is `<name>-<service>` (what
    /// the server's connection list shows).
    pub connection_name: String,
    /// How the fleet's own connection authenticates.
    pub auth: ClientAuth,
    /// An auth directory (`flotilla auth init`): every service then connects as its own
    /// identity (`dispatcher`, `budget-keeper`, `monitor`, `runner-<id>`) and opens the topology
    /// on its own connection, so it can do only what its role allows.
    pub identities: Option<PathBuf>,
}

impl Options {
    /// A fleet on `nats` under `names`: MessagePack, default stream settings, the topology owned.
    pub fn new(nats: Nats, names: Names) -> Self {
        Self {
            nats,
            names,
            format: WireFormat::Msgpack,
            streams: StreamSettings::default(),
            mode: Mode::Own,
            connection_name: "flotilla".to_owned(),
            auth: ClientAuth::default(),
            identities: None,
        }
    }
}

/// A service started by a [`LocalFleet`]: which one, and its stop token.
#[derive(Debug, Clone)]
pub struct ServiceHandle {
    id: u64,
    service: &'static str,
    instance: String,
    stop: CancellationToken,
}

impl ServiceHandle {
    /// The service's name ([`Service::NAME`]).
    pub fn service(&self) -> &'static str {
        self.service
    }

    /// The instance id it runs under (logs, health subjects; a runner's id).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Asks the service to stop, without waiting; it stops in its own order (intake first,
    /// in-flight work finished or handed back). [`LocalFleet::stop_service`] also waits for it.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// One service's task and connection.
#[derive(Debug)]
struct Running {
    handle: ServiceHandle,
    task: JoinHandle<anyhow::Result<()>>,
    client: async_nats::Client,
}

impl Running {
    /// Waits (until `deadline`) for the service, asked to stop before, to end; then drains its
    /// connection. A service that ends with an error, panics or outlives the deadline (it is then
    /// aborted) is an error.
    async fn finish(mut self, deadline: Instant) -> anyhow::Result<()> {
        let (name, instance) = (self.handle.service, self.handle.instance.clone());
        let result = match tokio::time::timeout_at(deadline, &mut self.task).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(e.context(format!("{name} {instance} stopped with an error"))),
            Ok(Err(e)) => Err(anyhow::anyhow!("{name} {instance} panicked: {e}")),
            Err(_) => {
                self.task.abort();
                Err(anyhow::anyhow!("{name} {instance} did not stop within {STOP_TIMEOUT:?}"))
            }
        };
        drain(&self.client, name).await;
        result
    }
}

/// Drains a connection (pending publishes and acks go out); a failure is only logged, since the
/// connection is not used again.
async fn drain(client: &async_nats::Client, of: &str) {
    if let Err(e) = client.drain().await {
        tracing::warn!(error = %e, connection = of, "failed to drain a NATS connection");
    }
}

/// Tells the fleet that a service's task ended, however it ended (returned, failed, panicked).
struct Exit {
    id: u64,
    exits: mpsc::UnboundedSender<u64>,
}

impl Drop for Exit {
    fn drop(&mut self) {
        // The fleet holds the receiver for as long as it lives; after it is gone nobody asks.
        self.exits.send(self.id).ok();
    }
}

/// A fleet whose services run in this process. Dropping it without [`LocalFleet::stop`] asks every
/// service to stop and kills a local server at once.
#[derive(Debug)]
pub struct LocalFleet {
    server: Option<LocalServer>,
    url: String,
    connection_name: String,
    identities: Option<PathBuf>,
    /// The TLS settings every service's connection shares (the fleet's own, without its
    /// credential).
    tls: ClientAuth,
    /// The fleet's own connection: the topology was ensured on it; callers read and publish on it.
    control: Fleet,
    topology: Topology,
    /// Parent of every service's stop token.
    root: CancellationToken,
    /// In start order.
    services: Vec<Running>,
    next_id: u64,
    exits: mpsc::UnboundedSender<u64>,
    exited: mpsc::UnboundedReceiver<u64>,
}

impl LocalFleet {
    /// Starts a local nats-server if `options` asks for one, connects, and ensures the topology.
    pub async fn start(options: Options) -> anyhow::Result<Self> {
        let Options { nats, names, format, streams, mode, connection_name, auth, identities } = options;
        let (server, url) = match nats {
            Nats::Url(url) => (None, url),
            Nats::Local(local) => {
                let server = local.start()?;
                let url = server.url().to_owned();
                (Some(server), url)
            }
        };
        let client = flotilla_service::nats::connect(&url, &connection_name, &auth).await?;
        let tls = ClientAuth { creds: None, ..auth };
        let control = Fleet::new(client, names, format, connection_name.clone());
        let topology = Topology::ensure(&control.js, &control.names, &streams, mode).await?;
        let (exits, exited) = mpsc::unbounded_channel();
        Ok(Self {
            server,
            url,
            connection_name,
            identities,
            tls,
            control,
            topology,
            root: CancellationToken::new(),
            services: Vec::new(),
            next_id: 0,
            exits,
            exited,
        })
    }

    /// A fleet on an existing server, its topology owned (created or updated).
    pub async fn on_server(
        url: &str,
        names: Names,
        format: WireFormat,
        streams: StreamSettings,
    ) -> anyhow::Result<Self> {
        Self::start(Options { format, streams, ..Options::new(Nats::Url(url.to_owned()), names) }).await
    }

    /// The auth directory the services take their identities from, if any.
    pub fn identities(&self) -> Option<&std::path::Path> {
        self.identities.as_deref()
    }

    /// The server's client URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The nats-server this fleet started, if it started one.
    pub fn server(&self) -> Option<&LocalServer> {
        self.server.as_ref()
    }

    /// The fleet's own connection (names, format, JetStream context), for the caller's reads and
    /// publishes; drained by [`LocalFleet::stop`].
    pub fn fleet(&self) -> &Fleet {
        &self.control
    }

    /// The fleet's buckets, as ensured at the start.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Runs `svc` as `instance` on a connection of its own until it is stopped, with a stop token
    /// of its own.
    pub async fn spawn<S: Service>(&mut self, instance: &str, svc: S) -> anyhow::Result<ServiceHandle> {
        self.spawn_as(&identity_of(S::NAME, instance), instance, svc).await
    }

    /// [`Self::spawn`] as the identity `identity` of the fleet's auth directory, if it has one.
    pub async fn spawn_as<S: Service>(
        &mut self,
        identity: &str,
        instance: &str,
        svc: S,
    ) -> anyhow::Result<ServiceHandle> {
        let auth = match &self.identities {
            Some(dir) => ClientAuth {
                creds: Some(dir.join("creds").join(format!("{identity}.nk"))),
                ..self.tls.clone()
            },
            None => self.tls.clone(),
        };
        let client = flotilla_service::nats::connect(
            &self.url,
            &format!("{}-{}", self.connection_name, S::NAME),
            &auth,
        )
        .await?;
        let fleet =
            Fleet::new(client.clone(), self.control.names.clone(), self.control.format, instance.into())
                .authenticated(self.identities.is_some());
        // With its own identity, a service sees the buckets through its own connection.
        let topology = match &self.identities {
            Some(_) => Topology::open(&fleet.js, &fleet.names, Duration::from_secs(30)).await?,
            None => self.topology.clone(),
        };
        let handle = ServiceHandle {
            id: self.next_id,
            service: S::NAME,
            instance: instance.to_owned(),
            stop: self.root.child_token(),
        };
        self.next_id += 1;
        let exit = Exit { id: handle.id, exits: self.exits.clone() };
        let stop = handle.stop.clone();
        let task = tokio::spawn(async move {
            let _exit = exit;
            svc.run(fleet, topology, stop).await
        });
        self.services.push(Running { handle: handle.clone(), task, client });
        Ok(handle)
    }

    /// Runs the monitor as `instance`, serving `/metrics` on `http_addr` (port 0 picks a free
    /// one); returns where it listens.
    pub async fn spawn_monitor(
        &mut self,
        instance: &str,
        http_addr: SocketAddr,
    ) -> anyhow::Result<(ServiceHandle, SocketAddr)> {
        self.spawn_monitor_with(instance, flotilla_monitor::Config { http_addr, ..Default::default() }).await
    }

    /// Runs the monitor as `instance` with `config`; returns where it listens.
    pub async fn spawn_monitor_with(
        &mut self,
        instance: &str,
        config: flotilla_monitor::Config,
    ) -> anyhow::Result<(ServiceHandle, SocketAddr)> {
        let monitor = flotilla_monitor::Monitor::bind(&config).await?;
        let addr = monitor.local_addr()?;
        Ok((self.spawn(instance, monitor).await?, addr))
    }

    /// Stops one service and waits for it to end (its connection drained); a service that had
    /// already been stopped this way is no error.
    pub async fn stop_service(&mut self, handle: &ServiceHandle) -> anyhow::Result<()> {
        let Some(at) = self.services.iter().position(|r| r.handle.id == handle.id) else {
            return Ok(());
        };
        let running = self.services.remove(at);
        running.handle.stop();
        running.finish(Instant::now() + STOP_TIMEOUT).await
    }

    /// Resolves when a service ends without having been asked to stop (it failed or panicked),
    /// with that service's handle.
    pub async fn exited(&mut self) -> ServiceHandle {
        loop {
            let Some(id) = self.exited.recv().await else {
                // The fleet holds a sender: this does not happen; never resolve if it did.
                return std::future::pending().await;
            };
            if let Some(r) = self.services.iter().find(|r| r.handle.id == id && !r.handle.stop.is_cancelled())
            {
                return r.handle.clone();
            }
        }
    }

    /// Stops every service in order ([`STOP_ORDER`]; those of one kind together, each given 30 s),
    /// drains every connection, then stops the local server. Every service is stopped even when
    /// one fails; the first failure is returned, every one is logged.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        let mut rest = std::mem::take(&mut self.services);
        for rank in 0..=STOP_ORDER.len() {
            let (stage, later): (Vec<Running>, Vec<Running>) =
                rest.into_iter().partition(|r| stop_rank(r.handle.service) == rank);
            rest = later;
            for r in &stage {
                r.handle.stop();
            }
            let deadline = Instant::now() + STOP_TIMEOUT;
            for r in stage {
                if let Err(e) = r.finish(deadline).await {
                    tracing::error!(error = format!("{e:#}"), "a service of the local fleet failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        drain(&self.control.client, &self.connection_name).await;
        if let Some(mut server) = self.server.take() {
            server.terminate(SERVER_GRACE);
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The identity a service of the fleet connects as (see `flotilla auth init`): a runner as
/// `runner-<id>`, every other service by its name.
pub fn identity_of(service: &str, instance: &str) -> String {
    if service == service::AGENT_RUNNER { format!("runner-{instance}") } else { service.to_owned() }
}

/// A service's place in [`STOP_ORDER`].
fn stop_rank(name: &str) -> usize {
    STOP_ORDER.iter().position(|s| *s == name).unwrap_or(STOP_ORDER.len())
}

impl Drop for LocalFleet {
    fn drop(&mut self) {
        self.root.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intake_stops_first_and_observers_last() {
        let ranks: Vec<usize> = [
            service::DISPATCHER,
            service::AGENT_RUNNER,
            service::BUDGET_KEEPER,
            service::MONITOR,
            "something-else",
        ]
        .iter()
        .map(|s| stop_rank(s))
        .collect();
        assert_eq!(ranks, [0, 1, 2, 3, 4]);
    }
}
