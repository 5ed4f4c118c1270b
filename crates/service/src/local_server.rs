//! A local `nats-server` child process with JetStream: located (env, the project's `.tools`
//! install, or PATH), started on a loopback port with its own store directory, and killed when
//! dropped. Used by `flotilla up` without a URL and by the test kit.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Oldest nats-server Flotilla runs on.
pub const MIN_VERSION: (u32, u32) = (2, 11);

/// Finds a nats-server ≥ 2.11: `$FLOTILLA_NATS_SERVER`, then `.tools/nats-server/bin/nats-server`
/// under `search_from` or any of its ancestors, then `nats-server` on PATH.
pub fn locate(search_from: &[PathBuf]) -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("FLOTILLA_NATS_SERVER") {
        let p = PathBuf::from(p);
        check_version(&p)?;
        return Ok(p);
    }
    for start in search_from {
        for dir in start.ancestors() {
            let candidate = dir.join(".tools/nats-server/bin/nats-server");
            if candidate.is_file() && check_version(&candidate).is_ok() {
                return Ok(candidate);
            }
        }
    }
    let on_path = PathBuf::from("nats-server");
    match check_version(&on_path) {
        Ok(()) => Ok(on_path),
        Err(e) => bail!(
            "no usable nats-server found ({e:#}); run scripts/install-nats-server, put nats-server \
             >= 2.11 on PATH, or set FLOTILLA_NATS_SERVER"
        ),
    }
}

/// Places to look for the project's `.tools` directory: the working directory and the running
/// executable's directory (both with their ancestors).
pub fn default_search_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd);
    }
    if let Some(dir) = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)) {
        roots.push(dir);
    }
    roots
}

fn check_version(bin: &Path) -> anyhow::Result<()> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .with_context(|| format!("failed to run {}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "nats-server: v2.15.1"
    let v = text.trim().rsplit('v').next().unwrap_or_default();
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) >= MIN_VERSION {
        Ok(())
    } else {
        bail!("{} is version {:?}; need >= 2.11", bin.display(), text.trim())
    }
}

/// Options for a local server.
#[derive(Debug, Clone)]
pub struct LocalServerOptions {
    /// The binary (see [`locate`]).
    pub binary: PathBuf,
    /// JetStream store directory; also holds the ports file and log.
    pub store_dir: PathBuf,
    /// Client port; `None` picks a free one.
    pub port: Option<u16>,
    /// Extra configuration file, if any.
    pub config_file: Option<PathBuf>,
}

/// A running nats-server child; killed on drop.
#[derive(Debug)]
pub struct LocalServer {
    child: Child,
    url: String,
    options: LocalServerOptions,
}

impl LocalServer {
    /// Starts the server and waits until it accepts clients (at most 10 s).
    pub fn start(options: LocalServerOptions) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&options.store_dir)
            .with_context(|| format!("failed to create {}", options.store_dir.display()))?;
        let ports_dir = options.store_dir.join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).context("failed to create ports directory")?;
        let mut cmd = Command::new(&options.binary);
        if let Some(conf) = &options.config_file {
            cmd.arg("-c").arg(conf);
        }
        let port = options.port.map_or_else(|| "-1".to_owned(), |p| p.to_string());
        cmd.args(["-js", "-a", "127.0.0.1", "-p", &port, "--http_port", "-1"])
            .arg("-sd")
            .arg(&options.store_dir)
            .arg("-P")
            .arg(options.store_dir.join("nats-server.pid"))
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .arg("-l")
            .arg(options.store_dir.join("nats-server.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        detach_from_terminal(&mut cmd);
        let mut child =
            cmd.spawn().with_context(|| format!("failed to start {}", options.binary.display()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let url = loop {
            if let Some(url) = read_ports_file(&ports_dir) {
                break url;
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "nats-server exited at start ({status}); see {}",
                    options.store_dir.join("nats-server.log").display()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("nats-server did not start within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(Self { child, url, options })
    }

    /// The client URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The options it was started with.
    pub fn options(&self) -> &LocalServerOptions {
        &self.options
    }

    /// Process id of the server.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Asks the server to reload its configuration (SIGHUP): changed users and permissions apply
    /// to new and live connections.
    pub fn reload(&self) -> anyhow::Result<()> {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-HUP", &pid]).status().context("failed to run kill")?;
        anyhow::ensure!(status.success(), "could not signal nats-server {pid} to reload");
        Ok(())
    }

    /// Asks the server to stop (SIGTERM, so it flushes and closes its store), waits up to
    /// `grace`, then kills it.
    pub fn terminate(&mut self, grace: Duration) {
        let pid = self.child.id().to_string();
        let _ =
            Command::new("kill").args(["-TERM", &pid]).stdout(Stdio::null()).stderr(Stdio::null()).status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
    }

    /// Stops the server (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The server gets its own process group, so a terminal's Ctrl-C reaches only its parent, which
/// then stops services and server in order; and on Linux it receives SIGTERM if the thread that
/// started it dies (the parent was killed), so it is never left behind.
fn detach_from_terminal(cmd: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    cmd.process_group(0);
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl(2), which
    // is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn read_ports_file(dir: &Path) -> Option<String> {
    let entry = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "ports"))?;
    let text = std::fs::read_to_string(entry.path()).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("nats")?.get(0)?.as_str().map(str::to_owned)
}
