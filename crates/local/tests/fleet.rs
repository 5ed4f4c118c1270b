//! A [`LocalFleet`] runs the whole fleet in one process: all four services from the configuration
//! complete a task; its own nats-server is started and stopped with it; services stop in order,
//! one alone on request, and one that fails is reported.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_local::{FleetConfig, FleetFile, LocalFleet, LocalNats, Nats, Options, ServerConfig};
use flotilla_protocol::names::service;
use flotilla_protocol::{Names, Prefix, TaskRecord, TaskState, TaskSubmission};
use flotilla_service::{Fleet, Service, Topology};
use flotilla_testkit::{NatsServer, eventually, http_get};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

fn names() -> Names {
    Names::new(Prefix::default())
}

const FLEET: &str = "[[agent]]\nname = \"writer\"\ncapabilities = [\"summarize\"]\nprovider = \"offline\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_four_services_complete_a_task_and_stop_cleanly() {
    let server = NatsServer::start();
    let config = FleetConfig::load(None, serde_json::json!({ "instance": "t" })).unwrap();
    // Each service as its own identity; the runner `local-t` hosts template `writer`.
    server.runner_creds("flotilla", "local-t", &["writer".to_owned()]);
    let options = Options {
        auth: server.admin_auth(),
        identities: server.auth_dir("flotilla"),
        ..Options::new(Nats::Url(server.url().to_owned()), names())
    };
    let mut local = LocalFleet::start(options).await.unwrap();
    let fleet_file = FleetFile::parse(FLEET).unwrap();
    let monitor = local.start_all(&config, fleet_file, "127.0.0.1:0".parse().unwrap()).await.unwrap();

    let fleet = local.fleet().clone();
    let agents = local.topology().agents.clone();
    eventually(Duration::from_secs(30), "the runner's agent to register", || {
        let agents = agents.clone();
        async move { (agents.keys().await.ok()?.count().await > 0).then_some(()) }
    })
    .await;
    let sub = TaskSubmission {
        id: Some("t-1".into()),
        capability: "summarize".into(),
        input: serde_json::json!({ "text": "hello" }),
        ..Default::default()
    };
    fleet.publish_durable(fleet.names.submit_subject(), &sub, sub.id.as_deref()).await.unwrap();
    let tasks = local.topology().tasks.clone();
    eventually(Duration::from_secs(30), "the task to complete", || {
        let (fleet, tasks) = (fleet.clone(), tasks.clone());
        async move {
            let (rec, _) = fleet.kv_get::<TaskRecord>(&tasks, "t-1").await.ok()??;
            (rec.state == TaskState::Completed).then_some(())
        }
    })
    .await;
    // The runner's id defaults to `local-<instance>`.
    let (rec, _) = fleet.kv_get::<TaskRecord>(&tasks, "t-1").await.unwrap().unwrap();
    assert!(rec.agent_id.unwrap_or_default().starts_with("local-t-"));
    assert!(http_get(monitor, "/metrics").await.contains("flotilla_task_events_total"));
    local.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_without_a_url_starts_its_own_server_and_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::Local(LocalNats {
        data_dir: dir.path().into(),
        port: None,
        config: ServerConfig::Durable,
        auth: None,
    });
    let local = LocalFleet::start(Options::new(nats, names())).await.unwrap();
    let pid = local.server().expect("a server was started").pid();
    assert!(dir.path().join("nats-server.conf").is_file());
    assert!(dir.path().join("jetstream").is_dir());
    // The topology is there.
    local.fleet().js.get_stream(local.fleet().names.events_stream()).await.unwrap();
    local.stop().await.unwrap();
    let gone = !std::path::Path::new(&format!("/proc/{pid}")).exists()
        || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "));
    assert!(gone, "nats-server {pid} is still running");
}

/// Services of each name in [`flotilla_protocol::names::service`] (by index) that note when they
/// were asked to stop, or one that fails at once.
struct Probe<const I: usize> {
    stopped: Arc<Mutex<Vec<&'static str>>>,
    fail: bool,
}

impl<const I: usize> Service for Probe<I> {
    const NAME: &'static str = service::ALL[I];

    async fn run(self, _: Fleet, _: Topology, shutdown: CancellationToken) -> anyhow::Result<()> {
        anyhow::ensure!(!self.fail, "{} failed", Self::NAME);
        shutdown.cancelled().await;
        self.stopped.lock().unwrap().push(Self::NAME);
        // Long enough that a later stage starting early would show.
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(())
    }
}

fn probe<const I: usize>(stopped: &Arc<Mutex<Vec<&'static str>>>, fail: bool) -> Probe<I> {
    Probe { stopped: stopped.clone(), fail }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_stop_in_order_alone_on_request_and_failures_are_reported() {
    let server = NatsServer::start();
    // The probes are not real services: they share the harness's (admin) connection's topology.
    let options =
        Options { auth: server.admin_auth(), ..Options::new(Nats::Url(server.url().to_owned()), names()) };
    let mut local = LocalFleet::start(options).await.unwrap();
    let stopped = Arc::new(Mutex::new(Vec::new()));
    // Started in the reverse of the stop order: monitor, agent-runner, budget-keeper, dispatcher.
    local.spawn("m", probe::<2>(&stopped, false)).await.unwrap();
    local.spawn("r1", probe::<3>(&stopped, false)).await.unwrap();
    let r2 = local.spawn("r2", probe::<3>(&stopped, false)).await.unwrap();
    local.spawn("k", probe::<1>(&stopped, false)).await.unwrap();
    local.spawn("d", probe::<0>(&stopped, false)).await.unwrap();
    assert_eq!((r2.service(), r2.instance()), (service::AGENT_RUNNER, "r2"));

    // One runner alone: it stops, the fleet does not take it for a failure.
    local.stop_service(&r2).await.unwrap();
    assert_eq!(*stopped.lock().unwrap(), [service::AGENT_RUNNER]);
    local.stop_service(&r2).await.unwrap();

    // A service that fails on its own is reported.
    let failing = local.spawn("k2", probe::<1>(&stopped, true)).await.unwrap();
    let exited = tokio::time::timeout(Duration::from_secs(10), local.exited()).await.unwrap();
    assert_eq!(exited.instance(), failing.instance());

    stopped.lock().unwrap().clear();
    let result = local.stop().await;
    assert!(result.is_err(), "the failed budget-keeper is reported");
    assert_eq!(
        *stopped.lock().unwrap(),
        [service::DISPATCHER, service::AGENT_RUNNER, service::BUDGET_KEEPER, service::MONITOR]
    );
}
