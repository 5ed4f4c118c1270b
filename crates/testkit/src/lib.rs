//! Dev-only test kit: a fresh `nats-server` per test (free loopback port, temporary store, killed
//! on drop), the project's service binaries as child processes, and small async helpers.

// The test kit is dev-only: failing loudly on a broken test environment is the right behaviour.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use flotilla_service::local_server::{LocalServer, LocalServerOptions, locate};

pub mod local_llm;
pub mod stub_llm;

/// Root of the workspace (where `nats/`, `scripts/` and `.tools/` live).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap_or_else(|_| PathBuf::from("."))
}

/// Turns on telemetry once, as the services do (`RUST_LOG` picks the log level; default
/// warnings only), so that trace context propagates in tests too.
pub fn init_tracing() {
    static TELEMETRY: std::sync::OnceLock<flotilla_service::telemetry::Telemetry> =
        std::sync::OnceLock::new();
    TELEMETRY.get_or_init(|| flotilla_service::telemetry::init("flotilla-tests", "warn"));
}

/// A nats-server started for one test.
#[derive(Debug)]
pub struct NatsServer {
    server: LocalServer,
    _dir: Option<tempfile::TempDir>,
}

impl NatsServer {
    /// Starts a fresh server with JetStream in a new temporary directory.
    pub fn start() -> Self {
        init_tracing();
        let dir = tempfile::Builder::new().prefix("flotilla-nats-").tempdir().expect("temp dir");
        let store = dir.path().to_path_buf();
        Self::start_in(store, None, Some(dir))
    }

    fn start_in(store: PathBuf, port: Option<u16>, dir: Option<tempfile::TempDir>) -> Self {
        let root = workspace_root();
        let binary =
            locate(std::slice::from_ref(&root)).expect("nats-server (run scripts/install-nats-server)");
        let server = LocalServer::start(LocalServerOptions {
            binary,
            store_dir: store,
            port,
            config_file: Some(root.join("nats/test.conf")),
        })
        .expect("nats-server starts");
        Self { server, _dir: dir }
    }

    /// Client URL.
    pub fn url(&self) -> &str {
        self.server.url()
    }

    /// Port the server listens on.
    pub fn port(&self) -> u16 {
        self.url().rsplit(':').next().and_then(|p| p.parse().ok()).expect("port in url")
    }

    /// Connects a client.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url()).await.expect("connect to test nats-server")
    }

    /// A fleet handle under the default prefix on a new connection, with the fleet's streams and
    /// buckets ensured (as the dispatcher does).
    pub async fn fleet(&self, instance: &str) -> (flotilla_service::Fleet, flotilla_service::Topology) {
        let names = flotilla_protocol::Names::new(flotilla_protocol::Prefix::default());
        let fleet = flotilla_service::Fleet::new(
            self.client().await,
            names,
            flotilla_protocol::WireFormat::Msgpack,
            instance.to_owned(),
        );
        let topology = flotilla_service::Topology::ensure(
            &fleet.js,
            &fleet.names,
            &flotilla_service::StreamSettings::default(),
            flotilla_service::Mode::Own,
        )
        .await
        .expect("the fleet's topology is ensured");
        (fleet, topology)
    }

    /// Kills the server and starts it again on the same port and store.
    pub fn restart(&mut self) {
        let port = self.port();
        let store = self.server.options().store_dir.clone();
        self.server.stop();
        let dir = self._dir.take();
        *self = Self::start_in(store, Some(port), dir);
    }
}

/// Prefixes of the variables Cargo sets for the package of a running test.
const CARGO_PACKAGE_VARS: [&str; 7] = [
    "CARGO_MANIFEST_",
    "CARGO_PKG_",
    "CARGO_CRATE_",
    "CARGO_BIN_",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "CARGO_RUSTC_CURRENT_DIR",
];

/// Path of one of the workspace's binaries (`flotilla-agent-runner`, `flotilla`, …). Every binary
/// of the workspace is built (or brought up to date) once per test process, so a test never runs
/// a stale binary. They are built together, for the whole workspace, and without the variables
/// Cargo set for the test's package: otherwise Cargo would resolve features for one package
/// alone, or see a build script's inputs changed, and rebuild dependencies away from what
/// `cargo test --workspace` built, in the middle of the suite.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir").to_path_buf();
    BUILT.call_once(|| {
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args(["build", "--quiet", "--workspace", "--bins"]).current_dir(workspace_root());
        // What Cargo set for this test's own package: build scripts that read such a variable
        // (ring's does) would see it changed and rebuild, for every package that calls this.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if CARGO_PACKAGE_VARS.iter().any(|p| key.starts_with(p)) {
                cargo.env_remove(key.as_ref());
            }
        }
        let status = cargo.status().expect("run cargo build");
        assert!(status.success(), "cargo build --workspace --bins failed");
    });
    dir.join(name)
}

/// A child process in its own process group; the whole group is killed (SIGKILL) on drop, so
/// nothing it started outlives the test.
#[derive(Debug)]
pub struct ChildProcess {
    child: Option<Child>,
    pub name: String,
}

impl ChildProcess {
    /// Spawns `program` with `args` and `env`; stdout and stderr go to the test's output.
    pub fn spawn(program: &Path, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt as _;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).process_group(0);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| format!("failed to spawn {}", program.display()))?;
        Ok(Self { child: Some(child), name: program.display().to_string() })
    }

    /// Spawns a prepared command in its own process group.
    pub fn spawn_command(mut cmd: Command, name: &str) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt as _;
        cmd.process_group(0);
        let child = cmd.spawn().with_context(|| format!("failed to spawn {name}"))?;
        Ok(Self { child: Some(child), name: name.to_owned() })
    }

    /// The child's stdout, if it was piped.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.as_mut().and_then(|c| c.stdout.take())
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// `kill -9` of the process (not its group).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal by name to the whole process group, as a terminal's Ctrl-C does.
    pub fn signal_group(&self, sig: &str) {
        let _ =
            Command::new("kill").arg(format!("-{sig}")).arg("--").arg(format!("-{}", self.pid())).status();
    }

    /// Sends a signal by name (`TERM`, `INT`) with the `kill` command.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status();
    }

    /// Waits for exit up to `timeout`; returns the exit code, or `None` on timeout.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal_group("KILL");
        }
        self.kill9();
    }
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A unique subject prefix for tests that share a server.
pub fn unique_prefix(base: &str) -> String {
    format!(
        "{base}{}",
        std::process::id()
            ^ (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0))
    )
}

/// A plain HTTP/1.0 GET on loopback, returning the body (enough for `/metrics` and `/healthz`).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await.expect("write");
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.expect("read");
    let (head, body) = buf.split_once("\r\n\r\n").expect("http response");
    assert!(head.starts_with("HTTP/1.") && head.contains(" 200 "), "unexpected response: {head}");
    body.to_owned()
}

/// A free loopback TCP port (bound and released: fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Registers a fake agent (capability `work`, template `fake`) and heartbeats it every 100 ms
/// until the returned token is cancelled: a registry entry without a runner behind it.
pub fn fake_agent(
    fleet: &flotilla_service::Fleet,
    agents: &async_nats::jetstream::kv::Store,
    agent_id: &str,
    runner_id: &str,
    concurrency: u32,
) -> tokio_util::sync::CancellationToken {
    use flotilla_protocol::time::now_ms;
    let stop = tokio_util::sync::CancellationToken::new();
    let (fleet, store, stop2) = (fleet.clone(), agents.clone(), stop.clone());
    let mut rec = flotilla_protocol::AgentRecord {
        agent_id: agent_id.into(),
        name: "fake".into(),
        runner_id: runner_id.into(),
        tenant: flotilla_protocol::DEFAULT_TENANT.into(),
        capabilities: vec!["work".into()],
        labels: Default::default(),
        provider: "offline".into(),
        model: String::new(),
        concurrency,
        in_flight: 0,
        status: flotilla_protocol::AgentStatus::Idle,
        started_at_ms: now_ms(),
        heartbeat_at_ms: now_ms(),
        heartbeat_interval_ms: 100,
        state: flotilla_protocol::AgentState::Idle,
        activities: vec![],
        protocol_version: 1,
        min_replicas: 1,
        max_replicas: 1,
    };
    tokio::spawn(async move {
        while !stop2.is_cancelled() {
            rec.heartbeat_at_ms = now_ms();
            if let Err(e) = fleet.kv_put(&store, &rec.agent_id, &rec).await {
                tracing::warn!(error = %e, "fake agent heartbeat failed");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    stop
}

/// A plain HTTP client for tests (reqwest is built without a default TLS provider: the
/// workspace installs ring first).
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}
