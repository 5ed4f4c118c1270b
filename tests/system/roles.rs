//! Protection: every role's credential tried against every operation of `nats/permissions.md`
//! on a real nats-server running the generated authorization; refused attempts change nothing;
//! connections without a valid credential, or with a revoked one, are refused; a permission
//! change by reload applies to a live connection.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::*;
use flotilla_protocol::WireFormat;
use flotilla_service::StreamSettings;
use flotilla_testkit::{NatsServer, workspace_root};

/// The columns of the matrix, with the identity each is tried as.
const ROLES: [(&str, &str); 7] = [
    ("dispatcher", "dispatcher"),
    ("budget-keeper", "budget-keeper"),
    ("monitor", "monitor"),
    ("runner", "runner-r1"),
    ("submitter", "submitter-default"),
    ("operator", "operator-test"),
    ("auditor", "auditor"),
];

/// One row of the matrix: an operation, what it does on the wire, and who may.
#[derive(Debug, Clone)]
struct Row {
    op: String,
    probe: Probe,
    allowed: BTreeMap<String, bool>,
}

#[derive(Debug, Clone)]
enum Probe {
    Publish(String),
    Subscribe(String),
    QueueSubscribe(String, String),
}

/// Reads the table of `nats/permissions.md` (placeholders filled in for the default prefix).
fn matrix() -> Vec<Row> {
    let text = std::fs::read_to_string(workspace_root().join("nats/permissions.md")).unwrap();
    let mut rows = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(cells.len(), 2 + ROLES.len(), "malformed row: {line}");
        let op = cells[0].trim_matches('`').to_owned();
        let what = cells[1]
            .replace("<p>", "flotilla")
            .replace("<P>", "FLOTILLA")
            .replace("<b>", "flotilla")
            .replace('`', "");
        let probe = if let Some(rest) = what.strip_prefix("pub ") {
            Probe::Publish(rest.to_owned())
        } else if let Some(rest) = what.strip_prefix("sub ") {
            match rest.split_once(" in queue group ") {
                Some((s, q)) => Probe::QueueSubscribe(s.to_owned(), q.to_owned()),
                None => Probe::Subscribe(rest.to_owned()),
            }
        } else {
            panic!("unknown probe {what:?} in row {op}");
        };
        let allowed = ROLES
            .iter()
            .zip(&cells[2..])
            .map(|((role, _), cell)| {
                let ok = match *cell {
                    "✓" => true,
                    "✗" => false,
                    other => panic!("cell {other:?} of {op} is neither ✓ nor ✗"),
                };
                ((*role).to_owned(), ok)
            })
            .collect();
        rows.push(Row { op, probe, allowed });
    }
    assert!(rows.len() >= 50, "the matrix has {} rows", rows.len());
    rows
}

/// A connection as one identity that records what the server refused it.
struct Prober {
    client: async_nats::Client,
    inbox: String,
    refused: Arc<Mutex<Vec<String>>>,
    subs: Vec<async_nats::Subscriber>,
}

impl Prober {
    async fn connect(server: &NatsServer, identity: &str) -> Self {
        let creds = server.creds("flotilla", identity).unwrap();
        let inbox = flotilla_service::auth::Credentials::load(&creds).unwrap().inbox_prefix();
        let (client, refused) = connect_recording(server, identity).await.unwrap();
        Self { client, inbox, refused, subs: Vec::new() }
    }

    /// Tries `probes` and returns, for each, whether the server let it through.
    async fn try_all(&mut self, probes: &[&Row]) -> Vec<bool> {
        self.refused.lock().unwrap().clear();
        for row in probes {
            match &row.probe {
                Probe::Publish(subject) => {
                    let reply = format!("{}.probe", self.inbox);
                    self.client.publish_with_reply(subject.clone(), reply, "{}".into()).await.unwrap();
                }
                Probe::Subscribe(subject) => {
                    let subject = subject.replace("<own inbox prefix>", &self.inbox);
                    self.subs.push(self.client.subscribe(subject).await.unwrap());
                }
                Probe::QueueSubscribe(subject, queue) => {
                    self.subs
                        .push(self.client.queue_subscribe(subject.clone(), queue.clone()).await.unwrap());
                }
            }
        }
        self.client.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let refused = self.refused.lock().unwrap().clone();
        probes
            .iter()
            .map(|row| {
                let (kind, subject) = match &row.probe {
                    Probe::Publish(s) => ("Publish", s.clone()),
                    Probe::Subscribe(s) => ("Subscription", s.replace("<own inbox prefix>", &self.inbox)),
                    Probe::QueueSubscribe(s, _) => ("Subscription", s.clone()),
                };
                let needle = format!("Permissions Violation for {kind} to \"{subject}\"");
                !refused.iter().any(|r| r.contains(&needle))
            })
            .collect()
    }
}

/// Every stream's (name, messages, last sequence), and every consumer's name: what a refused
/// attempt must leave as it was.
async fn state(sys: &System) -> Vec<(String, u64, u64, Vec<String>)> {
    use futures::StreamExt as _;
    let names: Vec<String> = sys.js.stream_names().filter_map(|n| async { n.ok() }).collect().await;
    let mut out = Vec::new();
    for name in names {
        let mut s = sys.js.get_stream(&name).await.unwrap();
        let info = s.info().await.unwrap().clone();
        let consumers: Vec<String> = s.consumer_names().filter_map(|n| async { n.ok() }).collect().await;
        out.push((name, info.state.messages, info.state.last_sequence, consumers));
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_role_may_do_what_the_matrix_says_and_nothing_else() {
    let server = Arc::new(NatsServer::start());
    // The topology, made by the harness's admin; no service runs, so nothing else writes.
    let sys =
        System::start_on(server.clone(), "flotilla", StreamSettings::default(), WireFormat::Msgpack).await;
    server.runner_creds("flotilla", "r1", &["w".to_owned()]).unwrap();
    server.runner_creds("flotilla", "r2", &["w".to_owned()]).unwrap();
    let rows = matrix();
    let mut probers = Vec::new();
    for (role, identity) in ROLES {
        probers.push((role, Prober::connect(&server, identity).await));
    }

    // Refused attempts first: the streams, buckets and consumers must not change.
    let before = state(&sys).await;
    let mut unexpected = Vec::new();
    for (role, prober) in &mut probers {
        let denied: Vec<&Row> = rows.iter().filter(|r| !r.allowed[*role]).collect();
        for (row, through) in denied.iter().zip(prober.try_all(&denied).await) {
            if through {
                unexpected.push(format!("{role} may {} ({:?}) but must not", row.op, row.probe));
            }
        }
    }
    let after = state(&sys).await;
    assert_eq!(
        before, after,
        "a refused attempt changed a stream or its consumers; unexpected so far: {unexpected:#?}"
    );
    // Then what each role may do.
    for (role, prober) in &mut probers {
        let allowed: Vec<&Row> = rows.iter().filter(|r| r.allowed[*role]).collect();
        for (row, through) in allowed.iter().zip(prober.try_all(&allowed).await) {
            if !through {
                unexpected.push(format!("{role} may not {} ({:?}) but should", row.op, row.probe));
            }
        }
    }
    let tried = rows.len() * ROLES.len();
    assert!(
        unexpected.is_empty(),
        "{} unexpected outcomes of {tried}:\n{}",
        unexpected.len(),
        unexpected.join("\n")
    );
    sys.stop().await;
}

/// What each identity connects with when the credential is wrong.
async fn connect_with(
    server: &NatsServer,
    seed_file: &std::path::Path,
) -> Result<async_nats::Client, String> {
    flotilla_service::ClientAuth::creds(seed_file)
        .options(async_nats::ConnectOptions::new())
        .map_err(|e| e.to_string())?
        .connection_timeout(Duration::from_secs(3))
        .connect(server.url())
        .await
        .map_err(|e| e.to_string())
}

/// A CONNECT with a known user's public key and a signature that is not its: the server's nonce
/// signed by a key that is not the user's.
async fn connect_with_wrong_signature(server: &NatsServer, public_key: &str) -> String {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", server.port())).await.unwrap();
    let mut reader = tokio::io::BufReader::new(stream);
    let mut info = String::new();
    reader.read_line(&mut info).await.unwrap();
    let info: serde_json::Value = serde_json::from_str(info.trim_start_matches("INFO ").trim()).unwrap();
    let nonce = info["nonce"].as_str().unwrap();
    let impostor = nkeys::KeyPair::new_user();
    let sig = impostor.sign(nonce.as_bytes()).unwrap();
    use base64::Engine as _;
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig);
    let connect = serde_json::json!({ "nkey": public_key, "sig": sig, "verbose": false, "pedantic": false, "protocol": 1 });
    reader.get_mut().write_all(format!("CONNECT {connect}\r\nPING\r\n").as_bytes()).await.unwrap();
    let mut answer = String::new();
    reader.read_line(&mut answer).await.unwrap();
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_without_a_valid_credential_are_refused_and_reloads_apply_at_once() {
    let server = Arc::new(NatsServer::start());
    let sys =
        System::start_on(server.clone(), "flotilla", StreamSettings::default(), WireFormat::Msgpack).await;
    let r1 = server.runner_creds("flotilla", "r1", &["w".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();

    // No credentials at all.
    let anonymous = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(3))
        .connect(server.url())
        .await;
    assert!(anonymous.is_err(), "a client without credentials connected");
    // An unknown key: a well-formed seed the server has never heard of.
    let stranger = dir.path().join("stranger.nk");
    std::fs::write(&stranger, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    let err = connect_with(&server, &stranger).await.unwrap_err();
    assert!(err.to_lowercase().contains("authoriz"), "{err}");
    // A known user's key with a signature made by another key (a wrong secret).
    let known = flotilla_service::auth::Credentials::load(&r1).unwrap().public_key;
    let answer = connect_with_wrong_signature(&server, &known).await;
    assert!(answer.contains("Authorization Violation"), "{answer}");
    // A seed file that holds no seed.
    let garbage = dir.path().join("garbage.nk");
    std::fs::write(&garbage, "not a seed\n").unwrap();
    let err = connect_with(&server, &garbage).await.unwrap_err();
    assert!(err.contains("no nkey user seed"), "{err}");

    // A live runner connection: allowed its own control subject, not a template it does not host.
    let live = connect_with(&server, &r1).await.unwrap();
    let mut doorbell = live.subscribe("flotilla.inbox.template.x.normal").await.unwrap();
    live.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The subscription was refused: a message there never reaches it.
    sys.client.publish("flotilla.inbox.template.x.normal", "before".into()).await.unwrap();
    sys.client.flush().await.unwrap();
    let early =
        tokio::time::timeout(Duration::from_millis(300), futures::StreamExt::next(&mut doorbell)).await;
    assert!(early.is_err(), "a runner received a template's messages it does not host");
    // Its credential now names template x too: after the reload, within a second, it may.
    let started = std::time::Instant::now();
    server.runner_creds("flotilla", "r1", &["w".to_owned(), "x".to_owned()]).unwrap();
    let mut doorbell = live.subscribe("flotilla.inbox.template.x.normal").await.unwrap();
    live.flush().await.unwrap();
    sys.client.publish("flotilla.inbox.template.x.normal", "after".into()).await.unwrap();
    sys.client.flush().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(1), futures::StreamExt::next(&mut doorbell)).await;
    assert!(got.is_ok_and(|m| m.is_some()), "the widened permission did not apply within a second");
    assert!(started.elapsed() < Duration::from_secs(2), "reload took {:?}", started.elapsed());

    // Revoked by reload: the live connection is closed and the credential no longer connects
    // (a copy of the seed its holder kept does not help).
    let revoked_copy = dir.path().join("revoked.nk");
    std::fs::copy(&r1, &revoked_copy).unwrap();
    server.change_auth("flotilla", |a| a.revoke("runner-r1").unwrap());
    flotilla_testkit::eventually(Duration::from_secs(5), "the revoked connection to close", || async {
        (live.connection_state() != async_nats::connection::State::Connected).then_some(())
    })
    .await;
    assert!(!r1.exists(), "the revoked seed file was removed");
    assert!(connect_with(&server, &revoked_copy).await.is_err());
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_tenants_see_only_their_own_events_and_memory() {
    use flotilla_service::auth::RoleSpec;
    use futures::StreamExt as _;
    let mut sys = System::with_dispatcher().await;
    sys.start_runner("r1", &worker_fleet(4, 8)).await;
    sys.wait_for_agents("r1", 4).await;
    let tenants = ["acme", "globex"];
    for t in tenants {
        sys.server.change_auth("flotilla", |a| {
            a.add(&format!("submitter-{t}"), RoleSpec::Submitter { tenant: t.into() }).unwrap();
        });
        // What the tenant's agents remembered.
        sys.fleet().kv_put(&sys.topology.memory, &format!("{t}.motto"), &format!("{t} rules")).await.unwrap();
    }
    let n = 100;
    let mut results = Vec::new();
    for t in tenants {
        let server = sys.server.clone();
        let names = sys.names.clone();
        results.push(tokio::spawn(async move {
            let client = connect_with(&server, &server.creds("flotilla", &format!("submitter-{t}")).unwrap())
                .await
                .unwrap();
            // A tenant's account reaches the fleet's JetStream under the tenant API prefix.
            let js = async_nats::jetstream::with_prefix(client.clone(), &names.tenant_js_api());
            let mut live = client.subscribe(names.tenant_task_events(t)).await.unwrap();
            client.flush().await.unwrap();
            for i in 0..n {
                let body = serde_json::json!({ "id": format!("{t}-{i}"), "capability": "work" }).to_string();
                js.publish(names.tenant_submit_subject(t), body.into()).await.unwrap().await.unwrap();
            }
            let mut completed = 0;
            while completed < n {
                let m = tokio::time::timeout(Duration::from_secs(60), live.next()).await.unwrap().unwrap();
                assert!(
                    m.subject.starts_with(&format!("flotilla.events.task.{t}.")),
                    "{t} saw {}",
                    m.subject
                );
                completed += usize::from(m.subject.ends_with(".completed"));
            }
            // The stored results, each task's by subject.
            let events = js.get_stream_no_info(names.events_stream()).await.unwrap();
            for i in 0..n {
                let subject = names.task_event_subject(t, &format!("{t}-{i}"), "completed");
                let stored = events.direct_get_last_for_subject(subject).await.unwrap();
                let ev: flotilla_protocol::TaskEvent =
                    flotilla_protocol::codec::decode(None, &stored.payload).unwrap();
                assert_eq!(ev.task_id, format!("{t}-{i}"));
            }
            // Its own memory, by key.
            let memory = js.get_stream_no_info(format!("KV_{}", names.memory_bucket())).await.unwrap();
            let own = memory
                .direct_get_last_for_subject(format!("$KV.{}.{t}.motto", names.memory_bucket()))
                .await
                .unwrap();
            assert!(String::from_utf8_lossy(&own.payload).contains(&format!("{t} rules")));
            completed
        }));
    }
    for r in results {
        assert_eq!(r.await.unwrap(), n);
    }
    // Every way into the other tenant's tasks, events and memory, both directions: refused.
    for (me, other) in [("acme", "globex"), ("globex", "acme")] {
        let b = sys.names.memory_bucket();
        let ways = [
            (format!("$JS.API.DIRECT.GET.KV_{b}.$KV.{b}.{other}.motto"), "get of its memory"),
            (format!("flotilla.jsapi.DIRECT.GET.KV_{b}.$KV.{b}.{other}.motto"), "imported get of its memory"),
            (
                format!(
                    "flotilla.jsapi.DIRECT.GET.FLOTILLA_EVENTS.flotilla.events.task.{other}.{other}-1.completed"
                ),
                "imported get of its task's event",
            ),
            (
                format!("flotilla.jsapi.CONSUMER.CREATE.FLOTILLA_EVENTS.x.flotilla.events.task.{me}.>"),
                "a consumer even on its own events",
            ),
            ("flotilla.jsapi.CONSUMER.CREATE.FLOTILLA_EVENTS".to_owned(), "imported unfiltered consumer"),
            ("flotilla.jsapi.STREAM.INFO.FLOTILLA_EVENTS".to_owned(), "imported stream info"),
            (format!("$JS.API.DIRECT.GET.KV_{b}"), "direct get by sequence"),
            (format!("$JS.API.STREAM.MSG.GET.KV_{b}"), "message get of memory"),
            ("$JS.API.STREAM.MSG.GET.FLOTILLA_EVENTS".to_owned(), "message get of events"),
            (format!("$JS.API.DIRECT.GET.KV_flotilla_tasks.$KV.flotilla_tasks.{other}-1"), "get of its task"),
            (
                format!("$JS.API.CONSUMER.CREATE.FLOTILLA_EVENTS.x.flotilla.events.task.{other}.>"),
                "consumer on its events",
            ),
            ("$JS.API.CONSUMER.CREATE.FLOTILLA_EVENTS".to_owned(), "unfiltered consumer on events"),
            (format!("$JS.API.CONSUMER.CREATE.KV_{b}"), "watch of memory"),
            (format!("$JS.API.STREAM.INFO.KV_{b}"), "key listing of memory"),
            ("$JS.API.STREAM.INFO.FLOTILLA_EVENTS".to_owned(), "subject listing of events"),
            (format!("$KV.{b}.{other}.motto"), "put into its memory"),
            (format!("flotilla.tasks.submit.{other}"), "submit as it"),
        ];
        let mut prober = Prober::connect(&sys.server, &format!("submitter-{me}")).await;
        let rows: Vec<Row> = ways
            .iter()
            .map(|(s, what)| Row {
                op: (*what).to_owned(),
                probe: Probe::Publish(s.clone()),
                allowed: BTreeMap::new(),
            })
            .chain(std::iter::once(Row {
                op: "live events".into(),
                probe: Probe::Subscribe(format!("flotilla.events.task.{other}.>")),
                allowed: BTreeMap::new(),
            }))
            .collect();
        let refs: Vec<&Row> = rows.iter().collect();
        for (row, through) in refs.iter().zip(prober.try_all(&refs).await) {
            assert!(!through, "{me} got through to {other}: {} ({:?})", row.op, row.probe);
        }
    }
    let memory_value: Option<(String, u64)> =
        sys.fleet().kv_get(&sys.topology.memory, "acme.motto").await.unwrap();
    assert_eq!(memory_value.unwrap().0, "acme rules", "refused puts changed nothing");
    sys.stop().await;
}

/// Runs the CLI against `url` with `creds` (none: no credential at all).
fn flotilla_as(url: &str, creds: Option<&std::path::Path>, args: &[&str]) -> (i32, String) {
    let mut cmd = std::process::Command::new(flotilla_testkit::bin("flotilla"));
    cmd.args(args).env("FLOTILLA_NATS_URL", url).env_remove("FLOTILLA_CREDS");
    if let Some(c) = creds {
        cmd.env("FLOTILLA_CREDS", c);
    }
    let out = cmd.output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cli_command_without_the_permission_says_which_one_is_missing() {
    let sys = System::with_dispatcher().await;
    let url = sys.server.url().to_owned();
    let submitter = sys.server.creds("flotilla", "submitter-default").unwrap();
    let operator = sys.server.creds("flotilla", "operator-test").unwrap();
    let (code, err) = tokio::task::spawn_blocking({
        let url = url.clone();
        move || flotilla_as(&url, None, &["queue"])
    })
    .await
    .unwrap();
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("without credentials") && err.contains("--creds"), "{err}");
    let started = std::time::Instant::now();
    let (code, err) = tokio::task::spawn_blocking({
        let (url, s) = (url.clone(), submitter.clone());
        move || flotilla_as(&url, Some(&s), &["cancel", "someone-elses-task"])
    })
    .await
    .unwrap();
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("Permissions Violation for Publish to \"flotilla.dispatcher.cancel\""), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "the refusal took {:?}", started.elapsed());
    let (code, err) = tokio::task::spawn_blocking({
        let (url, s) = (url.clone(), submitter.clone());
        move || flotilla_as(&url, Some(&s), &["budget", "set", "tenant.default", "1000"])
    })
    .await
    .unwrap();
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("Permissions Violation") && err.contains("flotilla.budget.set"), "{err}");
    // The same commands as an operator go through to the service.
    let (code, err) =
        tokio::task::spawn_blocking(move || flotilla_as(&url, Some(&operator), &["cancel", "nothing"]))
            .await
            .unwrap();
    assert_eq!(code, 3, "not found, from the dispatcher itself: {err}");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_runner_is_cut_off_and_its_work_is_done_once_elsewhere() {
    let sys = System::with_dispatcher().await;
    let fleet = worker_fleet(1, 4);
    let _ra = sys.spawn_runner_process("ra", &fleet);
    let _rb = sys.spawn_runner_process("rb", &fleet);
    sys.wait_for_agents("ra", 1).await;
    sys.wait_for_agents("rb", 1).await;
    let n = 16;
    for i in 0..n {
        sys.submit(&sleeping(format!("rv-{i}"), 1500)).await;
    }
    // Once rb runs some of them, its credential is revoked.
    let on_rb = flotilla_testkit::eventually(Duration::from_secs(20), "rb to start tasks", || async {
        let started: Vec<String> = sys
            .events()
            .await
            .into_iter()
            .filter(|e| e.kind == "started" && e.runner_id.as_deref() == Some("rb"))
            .map(|e| e.task_id)
            .collect();
        (!started.is_empty()).then_some(started)
    })
    .await;
    let rb_creds = sys.server.creds("flotilla", "runner-rb").unwrap();
    let kept = tempfile::NamedTempFile::new().unwrap();
    std::fs::copy(&rb_creds, kept.path()).unwrap();
    sys.server.change_auth("flotilla", |a| a.revoke("runner-rb").unwrap());
    assert!(connect_with(&sys.server, kept.path()).await.is_err(), "a revoked credential connected");

    let events = sys.wait_for_kind("completed", n, Duration::from_secs(60)).await;
    let completed = count_by_task(&events, "completed");
    assert_eq!(completed.len(), n, "every task completed");
    assert!(completed.values().all(|c| *c == 1), "a task completed twice: {completed:?}");
    for id in &on_rb {
        let done = events.iter().find(|e| e.kind == "completed" && &e.task_id == id).unwrap();
        // rb may have finished one before the revocation took effect; any later is ra's.
        if done.runner_id.as_deref() != Some("ra") {
            assert!(
                events.iter().all(|e| !(e.task_id == *id && e.kind == "requeued")),
                "{id} was requeued yet completed on {:?}",
                done.runner_id
            );
        }
    }
    assert!(
        events.iter().any(|e| e.kind == "requeued" && on_rb.contains(&e.task_id)),
        "none of rb's tasks was requeued after the revocation"
    );
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn control_actions_are_attributed_and_unsigned_or_revoked_ones_refused_with_an_event() {
    use flotilla_service::auth::{Credentials, RoleSpec};
    let mut sys = System::with_dispatcher().await;
    sys.start_runner("r1", &worker_fleet(1, 2)).await;
    sys.wait_for_agents("r1", 1).await;
    sys.server.change_auth("flotilla", |a| {
        a.add("operator-bob", RoleSpec::Operator { name: "bob".into() }).unwrap();
    });
    sys.sync_operators().await;
    let bob_seed = sys.server.creds("flotilla", "operator-bob").unwrap();
    let kept = tempfile::NamedTempFile::new().unwrap();
    std::fs::copy(&bob_seed, kept.path()).unwrap();
    let bob = Credentials::load(kept.path()).unwrap();
    let conn =
        connect_with(&sys.server, &sys.server.creds("flotilla", "operator-test").unwrap()).await.unwrap();
    let subject = sys.names.dispatcher_cancel();
    let ask = |task: &str, signer: Option<&Credentials>| {
        let (conn, subject) = (conn.clone(), subject.clone());
        let body = bytes::Bytes::from(serde_json::json!({ "task_id": task }).to_string());
        let mut h = async_nats::HeaderMap::new();
        h.insert("Content-Type", "application/json");
        if let Some(s) = signer {
            s.sign_request(&mut h, &subject, &body).unwrap();
        }
        async move {
            let m = conn.request_with_headers(subject, h, body).await.unwrap();
            serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap()
        }
    };
    for i in 0..3 {
        sys.submit(&sleeping(format!("c-{i}"), 4_000)).await;
    }
    sys.wait_for_kind("accepted", 3, Duration::from_secs(10)).await;
    // Signed by bob: cancelled, and the event says so.
    let done = ask("c-0", Some(&bob)).await;
    assert!(done["error"].is_null(), "{done}");
    // Unsigned, where authentication is on: refused.
    let unsigned = ask("c-1", None).await;
    assert_eq!(unsigned["error"]["code"], "unauthorized", "{unsigned}");
    assert!(unsigned["error"]["message"].as_str().unwrap().starts_with("unsigned"), "{unsigned}");
    // Bob revoked (and the revocation published): his kept key no longer counts.
    sys.server.change_auth("flotilla", |a| a.revoke("operator-bob").unwrap());
    sys.sync_operators().await;
    let revoked = ask("c-2", Some(&bob)).await;
    assert_eq!(revoked["error"]["code"], "unauthorized", "{revoked}");
    assert!(revoked["error"]["message"].as_str().unwrap().starts_with("revoked_operator"), "{revoked}");
    // A signature over something else: refused.
    let mut h = async_nats::HeaderMap::new();
    let other = Credentials::load(&sys.server.creds("flotilla", "operator-test").unwrap()).unwrap();
    other.sign_request(&mut h, &subject, b"{\"task_id\": \"c-9\"}").unwrap();
    let body = bytes::Bytes::from(serde_json::json!({ "task_id": "c-1" }).to_string());
    let m = conn.request_with_headers(subject.clone(), h, body).await.unwrap();
    let tampered: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    assert!(tampered["error"]["message"].as_str().unwrap().starts_with("bad_signature"), "{tampered}");

    let events = sys.events().await;
    let failed = events.iter().find(|e| e.task_id == "c-0" && e.kind == "failed").unwrap();
    assert_eq!(failed.actor.as_deref(), Some("bob"));
    for id in ["c-1", "c-2"] {
        assert!(!events.iter().any(|e| e.task_id == id && e.kind == "failed"), "{id} was cancelled");
    }
    let refusals: Vec<flotilla_protocol::ControlEvent> = sys
        .read_stream(&sys.names.events_stream(), &sys.names.control_event_subject("refused"))
        .await
        .into_iter()
        .map(|(_, p)| flotilla_protocol::codec::decode(None, &p).unwrap())
        .collect();
    let reasons: Vec<(&str, &str)> =
        refusals.iter().map(|r| (r.task_id.as_deref().unwrap_or(""), r.reason.as_str())).collect();
    assert_eq!(reasons, [("c-1", "unsigned"), ("c-2", "revoked_operator"), ("c-1", "bad_signature")]);
    assert_eq!(refusals[1].operator.as_deref(), Some("bob"));
    sys.stop().await;
}

/// Everything a run wrote — every stream and bucket, the runner's debug log, the server's log,
/// the CLI's output — holds no API key and no credential seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_api_key_or_credential_appears_in_anything_a_run_wrote() {
    use flotilla_testkit::stub_llm::{Reply, StubLlm};
    const KEY: &str = "sk-flotilla-scan-91c2e7d04b";
    let stub = StubLlm::start(vec![
        Reply::raw(401, &format!(r#"{{"error":{{"message":"Incorrect API key provided: {KEY}"}}}}"#)),
        Reply::openai_text("done", 10, 2),
        Reply::openai_text("done again", 10, 2),
    ])
    .await;
    let mut sys = System::with_dispatcher().await;
    // With budgets: the ledger is scanned too.
    sys.start_budget_keeper().await;
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets.toml");
    std::fs::write(&secrets, format!("STUB_KEY = \"{KEY}\"\n")).unwrap();
    let fleet = format!(
        "[[agent]]\nname = \"assistant\"\ncapabilities = [\"chat\"]\nprovider = \"openai\"\nmodel = \"stub\"\n\
         base_url = \"{}\"\napi_key_env = \"STUB_KEY\"\n",
        stub.openai_base()
    );
    let fleet_path = dir.path().join("fleet.toml");
    std::fs::write(&fleet_path, &fleet).unwrap();
    let creds = sys.runner_identity("rs", &fleet).unwrap();
    let log_path = dir.path().join("runner.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = std::process::Command::new(flotilla_testkit::bin("flotilla-agent-runner"));
    cmd.env("FLOTILLA_NATS_URL", sys.server.url())
        .env("FLOTILLA_CREDS", &creds)
        .env("FLOTILLA_FLEET", &fleet_path)
        .env("FLOTILLA_RUNNER_ID", "rs")
        .env("FLOTILLA_AGENT_RUNNER__SECRETS_FILE", &secrets)
        .env("FLOTILLA_AGENT_RUNNER__HEARTBEAT_INTERVAL", "300ms")
        .env("RUST_LOG", "debug")
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let runner = flotilla_testkit::ChildProcess::spawn_command(cmd, "agent-runner").unwrap();
    sys.wait_for_agents("rs", 1).await;
    let chat = |id: &str| flotilla_protocol::TaskSubmission {
        id: Some(id.into()),
        capability: "chat".into(),
        input: serde_json::json!("hello"),
        max_attempts: Some(1),
        ..Default::default()
    };
    sys.submit(&chat("refused")).await;
    sys.wait_for_kind("failed", 1, Duration::from_secs(20)).await;
    sys.submit(&chat("answered")).await;
    sys.wait_for_kind("completed", 1, Duration::from_secs(20)).await;
    // Operator commands (signed with the operator's seed) and their output.
    let url = sys.server.url().to_owned();
    let mut cli_output = String::new();
    for args in [&["status", "answered"][..], &["cancel", "refused"], &["--json", "agents"]] {
        let (_, o, e) = cli(&url, args).await;
        cli_output.push_str(&o);
        cli_output.push_str(&e);
    }
    assert!(cli_output.contains("answered"), "{cli_output}");
    drop(runner);

    let mut secrets_to_find: Vec<(String, String)> = vec![("the API key".into(), KEY.into())];
    let auth = sys.server.auth_dir("flotilla").unwrap();
    for entry in std::fs::read_dir(auth.join("creds")).unwrap().flatten() {
        let seed = std::fs::read_to_string(entry.path()).unwrap().trim().to_owned();
        secrets_to_find.push((format!("the seed of {}", entry.file_name().to_string_lossy()), seed));
    }
    let mut places: Vec<(String, Vec<u8>)> = sys
        .everything_stored()
        .await
        .into_iter()
        .map(|(stream, subject, payload)| (format!("{stream} {subject}"), payload.to_vec()))
        .collect();
    let runner_log = std::fs::read(&log_path).unwrap();
    assert!(runner_log.len() > 1000, "the runner logged at debug level");
    places.push(("the runner's log".into(), runner_log));
    places.push(("the nats-server log".into(), std::fs::read(sys.server.log_path()).unwrap()));
    places.push(("the CLI's output".into(), cli_output.into_bytes()));
    assert!(places.len() > 20, "{} places scanned", places.len());
    for (what, secret) in &secrets_to_find {
        for (place, bytes) in &places {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{what} appears in {place}"
            );
        }
    }
    sys.stop().await;
}

/// Connects as `identity`, recording every error the server sends.
async fn connect_recording(
    server: &NatsServer,
    identity: &str,
) -> Result<(async_nats::Client, Arc<Mutex<Vec<String>>>), String> {
    let creds = server.creds("flotilla", identity).unwrap();
    let errors = Arc::new(Mutex::new(Vec::new()));
    let log = errors.clone();
    let client = flotilla_service::ClientAuth::creds(&creds)
        .options(async_nats::ConnectOptions::new())
        .map_err(|e| e.to_string())?
        .connection_timeout(Duration::from_secs(3))
        .event_callback(move |event| {
            let log = log.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    log.lock().unwrap().push(e.to_string());
                }
            }
        })
        .connect(server.url())
        .await
        .map_err(|e| e.to_string())?;
    Ok((client, errors))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_at_its_account_limits_cannot_exhaust_the_server_for_others() {
    use flotilla_service::accounts::AccountLimits;
    use flotilla_service::auth::RoleSpec;
    let mut sys = System::with_dispatcher().await;
    sys.start_runner("r1", &worker_fleet(1, 4)).await;
    sys.wait_for_agents("r1", 1).await;
    sys.server.change_auth("flotilla", |a| {
        for t in ["acme", "globex"] {
            a.add(&format!("submitter-{t}"), RoleSpec::Submitter { tenant: t.into() }).unwrap();
        }
        let mut limits = a.limits().clone();
        let tight = AccountLimits {
            max_connections: Some(2),
            max_subscriptions: Some(8),
            max_payload: Some(64 * 1024),
            ..Default::default()
        };
        limits.tenants.insert("acme".into(), tight);
        a.set_limits(limits).unwrap();
    });

    // Connections: acme's third is refused; globex, and the fleet, still connect.
    let (a1, a1_errors) = connect_recording(&sys.server, "submitter-acme").await.unwrap();
    let (a2, _) = connect_recording(&sys.server, "submitter-acme").await.unwrap();
    let third = connect_recording(&sys.server, "submitter-acme").await;
    assert!(third.is_err(), "acme's third connection was let in");
    let mut others = Vec::new();
    for _ in 0..4 {
        others.push(connect_recording(&sys.server, "submitter-globex").await.unwrap());
    }
    connect_recording(&sys.server, "operator-test").await.unwrap();

    // Subscriptions: acme runs out at 8; globex subscribes as often as it likes.
    let mut subs = Vec::new();
    for _ in 0..12 {
        subs.push(a1.subscribe(sys.names.tenant_task_events("acme")).await.unwrap());
    }
    a1.flush().await.unwrap();
    let (g, g_errors) = &others[0];
    for _ in 0..50 {
        subs.push(g.subscribe(sys.names.tenant_task_events("globex")).await.unwrap());
    }
    g.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = a1_errors.lock().unwrap().clone();
    assert!(refused.iter().any(|e| e.to_lowercase().contains("maximum subscriptions")), "{refused:?}");
    assert!(g_errors.lock().unwrap().is_empty(), "{:?}", g_errors.lock().unwrap());

    // Payload: a message over acme's 64 KiB never reaches the fleet; globex's larger one does.
    let big = |t: &str| {
        let input = "x".repeat(100 * 1024);
        serde_json::json!({ "id": format!("{t}-big"), "capability": "work", "input": input }).to_string()
    };
    let acme = async_nats::jetstream::new(a2.clone());
    let sent = acme.publish(sys.names.tenant_submit_subject("acme"), big("acme").into());
    let acme_stored = match sent.await {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    assert!(!acme_stored, "acme's oversized message was stored");
    let globex = async_nats::jetstream::new(others[1].0.clone());
    globex
        .publish(sys.names.tenant_submit_subject("globex"), big("globex").into())
        .await
        .unwrap()
        .await
        .unwrap();
    sys.wait_for_kind("completed", 1, Duration::from_secs(30)).await;
    assert!(sys.task("globex-big").await.is_some());
    assert!(sys.task("acme-big").await.is_none());
    drop((a1, a2, subs));
    sys.stop().await;
}
