//! Shared harness of the system tests: a fresh nats-server, the services in this process (a
//! [`LocalFleet`]; or the agent-runner as real child processes), and helpers to submit tasks and
//! read events back.

#![allow(dead_code)]
// Test support: a broken environment should fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull};
use flotilla_local::{FleetFile, LocalFleet, ServiceHandle};
use flotilla_protocol::{
    HealthReply, Names, Prefix, TaskEvent, TaskRecord, TaskSubmission, WireFormat, codec, headers,
};
use flotilla_service::{StreamSettings, Topology};
use flotilla_testkit::{ChildProcess, NatsServer, bin};
use futures::StreamExt as _;

/// With `FLOTILLA_TEST_LOG` set (an env filter such as `info`), the services' logs go to the
/// test's output.
pub fn init_logging() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("FLOTILLA_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
    });
}

pub const HEARTBEAT: Duration = Duration::from_millis(300);

/// A fleet under test.
pub struct System {
    pub server: Arc<NatsServer>,
    pub names: Names,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub topology: Topology,
    pub format: WireFormat,
    /// The services in this process.
    local: LocalFleet,
    runners: HashMap<String, ServiceHandle>,
    dispatchers: Vec<ServiceHandle>,
    dir: tempfile::TempDir,
    /// Runners started from now on enforce budgets (a budget-keeper was started).
    pub budgets: bool,
}

pub fn dispatcher_config() -> flotilla_dispatcher::Config {
    flotilla_dispatcher::Config { tick: Duration::from_millis(100), ..Default::default() }
}

pub fn runner_config(id: &str) -> flotilla_agent_runner::Config {
    flotilla_agent_runner::Config {
        runner_id: Some(id.to_owned()),
        heartbeat_interval: HEARTBEAT,
        budgets: false,
        ..Default::default()
    }
}

/// A task of capability `work` whose offline model takes `sleep_ms` to answer.
pub fn sleeping(id: impl Into<String>, sleep_ms: u64) -> TaskSubmission {
    let id = id.into();
    TaskSubmission {
        input: serde_json::json!({ "text": id, "_offline": { "sleep_ms": sleep_ms } }),
        id: Some(id),
        capability: "work".into(),
        ..Default::default()
    }
}

/// One template `worker` serving `work`, `replicas` agents of `concurrency` each.
pub fn worker_fleet(replicas: u32, concurrency: u32) -> String {
    format!(
        "[[agent]]\nname = \"worker\"\ncapabilities = [\"work\"]\nprovider = \"offline\"\n\
         system_prompt = \"You work.\"\nconcurrency = {concurrency}\nreplicas = {replicas}\n"
    )
}

impl System {
    pub async fn start(settings: StreamSettings, format: WireFormat) -> Self {
        Self::start_on(Arc::new(NatsServer::start()), "flotilla", settings, format).await
    }

    /// A fleet (MessagePack, default settings) with a dispatcher.
    pub async fn with_dispatcher() -> Self {
        let mut sys = Self::start(StreamSettings::default(), WireFormat::Msgpack).await;
        sys.start_dispatcher(dispatcher_config()).await;
        sys
    }

    /// A fleet (MessagePack, default settings) with a dispatcher and one in-process runner `id`
    /// hosting `fleet_toml`, once `agents` of its agents heartbeat.
    pub async fn with_runner(id: &str, fleet_toml: &str, agents: usize) -> Self {
        let mut sys = Self::with_dispatcher().await;
        sys.start_runner(id, fleet_toml).await;
        sys.wait_for_agents(id, agents).await;
        sys
    }

    /// A fleet under `prefix` on an existing server (several fleets may share one).
    pub async fn start_on(
        server: Arc<NatsServer>,
        prefix: &str,
        settings: StreamSettings,
        format: WireFormat,
    ) -> Self {
        init_logging();
        let names = Names::new(Prefix::new(prefix).unwrap());
        let options = flotilla_local::Options {
            format,
            streams: settings,
            auth: server.client_auth(prefix, "admin"),
            identities: server.auth_dir(prefix),
            ..flotilla_local::Options::new(flotilla_local::Nats::Url(server.url().to_owned()), names.clone())
        };
        let local = LocalFleet::start(options).await.unwrap();
        server.publish_operators(prefix, local.fleet(), &local.topology().operators).await;
        Self {
            server,
            names,
            client: local.fleet().client.clone(),
            js: local.fleet().js.clone(),
            topology: local.topology().clone(),
            format,
            local,
            runners: HashMap::new(),
            dispatchers: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
            budgets: false,
        }
    }

    pub async fn start_dispatcher(&mut self, config: flotilla_dispatcher::Config) {
        let dispatcher = flotilla_dispatcher::Dispatcher::new(config);
        self.dispatchers.push(self.local.spawn("dispatcher-1", dispatcher).await.unwrap());
    }

    /// Stops the first dispatcher started of those running, and waits for it to end.
    pub async fn stop_first_dispatcher(&mut self) {
        if !self.dispatchers.is_empty() {
            let h = self.dispatchers.remove(0);
            self.local.stop_service(&h).await.unwrap();
        }
    }

    /// Stops every dispatcher (all its state lives in NATS) and waits for them to end.
    pub async fn stop_dispatchers(&mut self) {
        for h in std::mem::take(&mut self.dispatchers) {
            self.local.stop_service(&h).await.unwrap();
        }
    }

    pub async fn start_budget_keeper(&mut self) {
        let keeper = flotilla_budget_keeper::BudgetKeeper::default();
        self.local.spawn("budget-keeper-1", keeper).await.unwrap();
        self.budgets = true;
    }

    pub async fn start_monitor(&mut self) -> std::net::SocketAddr {
        self.start_monitor_named("monitor-1").await
    }

    /// A monitor instance named `instance` with `config` (its HTTP address: a free port).
    pub async fn start_monitor_configured(
        &mut self,
        instance: &str,
        config: flotilla_monitor::Config,
    ) -> std::net::SocketAddr {
        let config = flotilla_monitor::Config { http_addr: "127.0.0.1:0".parse().unwrap(), ..config };
        let (_, addr) = self.local.spawn_monitor_with(instance, config).await.unwrap();
        addr
    }

    /// A monitor instance named `instance` on a free port, with the handle to stop it by.
    pub async fn start_monitor_stoppable(&mut self, instance: &str) -> (ServiceHandle, std::net::SocketAddr) {
        self.local.spawn_monitor(instance, "127.0.0.1:0".parse().unwrap()).await.unwrap()
    }

    /// Stops a service started in this process and waits for it to end.
    pub async fn stop_service(&mut self, handle: &ServiceHandle) {
        self.local.stop_service(handle).await.unwrap();
    }

    /// A monitor instance named `instance`, serving HTTP on a free port.
    pub async fn start_monitor_named(&mut self, instance: &str) -> std::net::SocketAddr {
        let (_, addr) = self.local.spawn_monitor(instance, "127.0.0.1:0".parse().unwrap()).await.unwrap();
        addr
    }

    /// A runner in this process.
    pub async fn start_runner(&mut self, id: &str, fleet_toml: &str) {
        let registry = flotilla_agent_runner::tools::Registry::with_builtins().unwrap();
        self.start_runner_with_tools(id, fleet_toml, registry).await;
    }

    /// A runner in this process with a tool registry of the test's.
    pub async fn start_runner_with_tools(
        &mut self,
        id: &str,
        fleet_toml: &str,
        registry: flotilla_agent_runner::tools::Registry,
    ) {
        let config = flotilla_agent_runner::Config { budgets: self.budgets, ..runner_config(id) };
        self.start_runner_configured(id, fleet_toml, config, registry).await;
    }

    /// A runner in this process with a configuration and tool registry of the test's.
    pub async fn start_runner_configured(
        &mut self,
        id: &str,
        fleet_toml: &str,
        config: flotilla_agent_runner::Config,
        registry: flotilla_agent_runner::tools::Registry,
    ) {
        let file = FleetFile::parse(fleet_toml).unwrap();
        self.runner_identity(id, fleet_toml);
        let runner = flotilla_agent_runner::Runner::new(config, file).unwrap().with_tools(registry);
        let handle = self.local.spawn(id, runner).await.unwrap();
        self.runners.insert(id.to_owned(), handle);
    }

    /// Makes sure runner `id` hosting `fleet_toml` has an identity (with authentication on);
    /// returns its seed file.
    pub fn runner_identity(&self, id: &str, fleet_toml: &str) -> Option<PathBuf> {
        let file = FleetFile::parse(fleet_toml).unwrap();
        let templates: Vec<String> = file.agents.iter().map(|t| t.name.clone()).collect();
        self.server.runner_creds(self.names.prefix().as_str(), id, &templates)
    }

    /// Runs one of `tests/py/`'s nats-py clients with `args`, connected as `identity` of this
    /// fleet when the server runs with authentication (created by `role` if it does not exist).
    pub async fn python(
        &self,
        script: &str,
        args: &[&str],
        identity: (&str, flotilla_service::auth::RoleSpec),
    ) -> std::process::Output {
        let root = flotilla_testkit::workspace_root();
        let mut cmd = tokio::process::Command::new("python3");
        cmd.arg(root.join("tests/py").join(script)).args(args).env("PYTHONPATH", root.join(".tools/python"));
        let prefix = self.names.prefix().as_str();
        if self.server.auth_enabled() {
            let (name, role) = identity;
            self.server.change_auth(prefix, |a| {
                if a.get(name).is_none() {
                    a.add(name, role).unwrap();
                }
            });
            cmd.env("FLOTILLA_CREDS", self.server.creds(prefix, name).unwrap());
            self.sync_operators().await;
        }
        cmd.output().await.unwrap()
    }

    /// Publishes the operators' keys (after adding or revoking an operator), as
    /// `flotilla auth sync` does.
    pub async fn sync_operators(&self) {
        let prefix = self.names.prefix().as_str();
        self.server.publish_operators(prefix, self.local.fleet(), &self.topology.operators).await;
    }

    /// A request as the test server's operator (`operator-test`) would send it: signed with its
    /// key when the server runs with authentication, so the service attributes it.
    pub async fn signed_request(&self, subject: String, body: Vec<u8>) -> async_nats::Message {
        let mut h = async_nats::HeaderMap::new();
        h.insert(flotilla_protocol::headers::CONTENT_TYPE, flotilla_protocol::headers::APPLICATION_JSON);
        if let Some(creds) = flotilla_testkit::operator_creds(self.server.url()) {
            let signer = flotilla_service::auth::Credentials::load(&creds).unwrap();
            signer.sign_request(&mut h, &subject, &body).unwrap();
        }
        self.client.request_with_headers(subject, h, body.into()).await.unwrap()
    }

    /// The harness's own fleet handle (the admin's connection).
    pub fn fleet(&self) -> &flotilla_service::Fleet {
        self.local.fleet()
    }

    /// Every stream's messages: (stream, subject, payload).
    pub async fn everything_stored(&self) -> Vec<(String, String, bytes::Bytes)> {
        let names: Vec<String> = self.js.stream_names().filter_map(|n| async { n.ok() }).collect().await;
        let mut out = Vec::new();
        for name in names {
            // By sequence: work-queue streams (the intake) take no ordered consumer.
            let mut stream = self.js.get_stream(&name).await.unwrap();
            let (first, last) = {
                let info = stream.info().await.unwrap();
                (info.state.first_sequence, info.state.last_sequence)
            };
            for seq in first..=last {
                if let Ok(m) = stream.get_raw_message(seq).await {
                    out.push((name.clone(), m.subject.to_string(), m.payload));
                }
            }
        }
        out
    }

    /// Two runners `ra` and `rb` as separate processes hosting `fleet_toml`, once `agents` agents
    /// of each heartbeat.
    pub async fn two_runner_processes(
        &self,
        fleet_toml: &str,
        agents: usize,
    ) -> (ChildProcess, ChildProcess) {
        let (a, b) =
            (self.spawn_runner_process("ra", fleet_toml), self.spawn_runner_process("rb", fleet_toml));
        self.wait_for_agents("ra", agents).await;
        self.wait_for_agents("rb", agents).await;
        (a, b)
    }

    /// A runner as a separate `flotilla-agent-runner` process.
    pub fn spawn_runner_process(&self, id: &str, fleet_toml: &str) -> ChildProcess {
        self.spawn_runner_process_with_env(id, fleet_toml, &[])
    }

    /// A runner process with `extra` environment variables as well.
    pub fn spawn_runner_process_with_env(
        &self,
        id: &str,
        fleet_toml: &str,
        extra: &[(&str, &str)],
    ) -> ChildProcess {
        let path: PathBuf = self.dir.path().join(format!("{id}-fleet.toml"));
        std::fs::write(&path, fleet_toml).unwrap();
        let hb = format!("{}ms", HEARTBEAT.as_millis());
        let format = if self.format == WireFormat::Json { "json" } else { "msgpack" };
        let prefix = self.names.prefix().to_string();
        let creds = self.runner_identity(id, fleet_toml).map(|p| p.display().to_string());
        let mut env = vec![
            ("FLOTILLA_NATS_URL", self.server.url()),
            ("FLOTILLA_FLEET", path.to_str().unwrap()),
            ("FLOTILLA_RUNNER_ID", id),
            ("FLOTILLA_WIRE_FORMAT", format),
            ("FLOTILLA_PREFIX", &prefix),
            ("FLOTILLA_AGENT_RUNNER__HEARTBEAT_INTERVAL", &hb),
            ("FLOTILLA_AGENT_RUNNER__BUDGETS", if self.budgets { "true" } else { "false" }),
            ("RUST_LOG", "warn"),
        ];
        if let Some(creds) = &creds {
            env.push(("FLOTILLA_CREDS", creds));
        }
        let tls = self.server.tls_auth();
        let tls_env: Vec<(&str, String)> = [
            ("FLOTILLA_TLS_CA", &tls.tls_ca),
            ("FLOTILLA_TLS_CERT", &tls.tls_cert),
            ("FLOTILLA_TLS_KEY", &tls.tls_key),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|p| (k, p.display().to_string())))
        .collect();
        env.extend(tls_env.iter().map(|(k, v)| (*k, v.as_str())));
        env.extend(extra.iter().copied());
        ChildProcess::spawn(&bin("flotilla-agent-runner"), &[], &env).unwrap()
    }

    /// Waits until `n` agents of runner `id` are registered by its running incarnation, whose
    /// heartbeat is fresh.
    pub async fn wait_for_agents(&self, runner: &str, n: usize) {
        let (store, runners) = (self.topology.agents.clone(), self.topology.runners.clone());
        let prefix = format!("{runner}-");
        flotilla_testkit::eventually(Duration::from_secs(30), "agents to register", || {
            let (store, runners) = (store.clone(), runners.clone());
            let prefix = prefix.clone();
            async move {
                let beat = runners.get(runner).await.ok()??;
                let beat: flotilla_protocol::RunnerRecord = codec::decode(None, &beat).ok()?;
                let now = flotilla_protocol::time::now_ms();
                if now.saturating_sub(beat.heartbeat_at_ms) >= 1000 {
                    return None;
                }
                let keys: Vec<String> =
                    store.keys().await.ok()?.filter_map(|k| async { k.ok() }).collect().await;
                let mut fresh = 0;
                for k in keys.iter().filter(|k| k.starts_with(&prefix)) {
                    let v = store.get(k).await.ok()??;
                    let rec: flotilla_protocol::AgentRecord = codec::decode(None, &v).ok()?;
                    if beat.vouches_for(&rec) {
                        fresh += 1;
                    }
                }
                (fresh >= n).then_some(())
            }
        })
        .await;
    }

    /// Publishes a submission (MessagePack) and waits for the stream's ack.
    pub async fn submit(&self, sub: &TaskSubmission) -> jetstream::publish::PublishAck {
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::CONTENT_TYPE, headers::APPLICATION_MSGPACK);
        if let Some(id) = &sub.id {
            h.insert(headers::NATS_MSG_ID, id.as_str());
        }
        let bytes = codec::encode(WireFormat::Msgpack, sub).unwrap();
        self.js
            .publish_with_headers(self.names.submit_subject(), h, bytes.into())
            .await
            .unwrap()
            .await
            .unwrap()
    }

    /// Publishes raw bytes as a submission with an optional content type.
    pub async fn submit_raw(&self, bytes: Vec<u8>, content_type: Option<&str>) {
        let mut h = async_nats::HeaderMap::new();
        if let Some(ct) = content_type {
            h.insert(headers::CONTENT_TYPE, ct);
        }
        self.js
            .publish_with_headers(self.names.submit_subject(), h, bytes.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Every message of a stream whose subject matches `filter`, from the start to its current end.
    pub async fn read_stream(&self, stream: &str, filter: &str) -> Vec<(String, bytes::Bytes)> {
        let mut s = self.js.get_stream(stream).await.unwrap();
        let last = s.info().await.unwrap().state.last_sequence;
        let consumer = s
            .create_consumer(pull::OrderedConfig {
                filter_subject: filter.to_owned(),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut out = Vec::new();
        if last == 0 {
            return out;
        }
        // As many as matched the filter when the consumer was made (waiting for sequence `last`
        // would wait out the timeout whenever the stream's last message does not match).
        let matching = consumer.cached_info().num_pending;
        let mut msgs = consumer.messages().await.unwrap();
        while (out.len() as u64) < matching {
            let next = tokio::time::timeout(Duration::from_secs(2), msgs.next()).await;
            let Ok(Some(Ok(m))) = next else { break };
            let seq = m.info().unwrap().stream_sequence;
            out.push((m.subject.to_string(), m.payload.clone()));
            if seq >= last {
                break;
            }
        }
        out
    }

    /// Every task event so far.
    pub async fn events(&self) -> Vec<TaskEvent> {
        self.read_stream(&self.names.events_stream(), &self.names.task_events_all())
            .await
            .into_iter()
            .map(|(_, p)| codec::decode(None, &p).unwrap())
            .collect()
    }

    /// Waits until at least `n` events of `kind` exist, then returns all events.
    pub async fn wait_for_kind(&self, kind: &str, n: usize, timeout: Duration) -> Vec<TaskEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let events = self.events().await;
            let have = events.iter().filter(|e| e.kind == kind).count();
            if have >= n {
                return events;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {have} of {n} {kind} events after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn task(&self, id: &str) -> Option<TaskRecord> {
        let v = self.topology.tasks.get(id).await.unwrap()?;
        Some(codec::decode(None, &v).unwrap())
    }

    /// Health reply of one instance of a service.
    pub async fn health(&self, service: &str, instance: &str) -> HealthReply {
        let subject = self.names.instance_health_subject(service, instance);
        let reply = self.client.request(subject, bytes::Bytes::new()).await.unwrap();
        codec::decode(None, &reply.payload).unwrap()
    }

    /// Stops one in-process runner (graceful drain).
    pub fn stop_runner(&self, id: &str) {
        if let Some(h) = self.runners.get(id) {
            h.stop();
        }
    }

    /// Stops every in-process service and checks that each ended cleanly.
    pub async fn stop(mut self) {
        self.stop_dispatchers().await;
        self.local.stop().await.unwrap();
    }
}

/// Counts events of `kind` per task id.
pub fn count_by_task(events: &[TaskEvent], kind: &str) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for e in events.iter().filter(|e| e.kind == kind) {
        *m.entry(e.task_id.clone()).or_insert(0) += 1;
    }
    m
}

/// Runs the `flotilla` CLI against `url` (off the async workers): exit code, stdout, stderr.
pub async fn cli(url: &str, args: &[&str]) -> (i32, String, String) {
    let url = url.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new(flotilla_testkit::bin("flotilla"));
        cmd.args(&args).env("FLOTILLA_NATS_URL", &url);
        // As an operator: the test server's own, when it runs with authentication.
        if let Some(creds) = flotilla_testkit::operator_creds(&url) {
            cmd.env("FLOTILLA_CREDS", creds);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        )
    })
    .await
    .unwrap()
}
