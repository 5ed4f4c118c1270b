//! The budget service against a real nats-server: concurrent reservations on one budget never
//! overspend at any point of the ledger, abandoned reservations expire, repeated operations
//! charge once, and a restarted budget-keeper rebuilds the same state from the ledger stream.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::time::Duration;

use flotilla_budget_keeper::ledger::Ledger;
use flotilla_protocol::{
    BudgetOperation, BudgetReply, CommitRequest, LedgerChange, RateRequest, ReserveRequest, SetRequest,
    ShowRequest, WireFormat, codec, headers,
};
use flotilla_service::Fleet;
use flotilla_service::Service as _;
use flotilla_testkit::{NatsServer, eventually};
use tokio_util::sync::CancellationToken;

const LIMIT: u64 = 20_000;

struct Keeper {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(server: &NatsServer, instance: &str) -> Keeper {
    let (fleet, topology) = server.fleet(instance).await;
    let shutdown = CancellationToken::new();
    let keeper = flotilla_budget_keeper::BudgetKeeper::default();
    let task = tokio::spawn(keeper.run(fleet, topology, shutdown.clone()));
    Keeper { shutdown, task }
}

impl Keeper {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

async fn call<R: BudgetOperation>(fleet: &Fleet, req: &R) -> BudgetReply {
    let body = codec::encode(WireFormat::Msgpack, req).unwrap();
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        fleet.client.request(fleet.names.budget_subject(R::OP.as_str()), body.into()),
    )
    .await
    .expect("the budget-keeper answers")
    .unwrap();
    codec::decode(None, &reply.payload).unwrap()
}

fn reserve(id: &str, want: u64, lease_ms: u64) -> ReserveRequest {
    ReserveRequest {
        id: id.into(),
        scopes: vec!["tenant.acme".into()],
        want,
        min: Some(1),
        lease_ms: Some(lease_ms),
        ..Default::default()
    }
}

fn show() -> ShowRequest {
    ShowRequest { scope: Some("tenant.acme".into()), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reservations_never_overspend_and_survive_a_restart() {
    let server = NatsServer::start();
    let (fleet, _) = server.fleet("t").await;
    let keeper = start(&server, "bk-1").await;
    let set = SetRequest {
        scope: "tenant.acme".into(),
        limit_tokens: LIMIT,
        window_ms: Some(24 * 3600 * 1000),
        ..Default::default()
    };
    let r = eventually(Duration::from_secs(10), "the budget-keeper to answer", || async {
        let body = codec::encode(WireFormat::Msgpack, &set).unwrap();
        let reply = fleet.client.request(fleet.names.budget_subject("set"), body.into()).await.ok()?;
        codec::decode::<BudgetReply>(None, &reply.payload).ok()
    })
    .await;
    assert_eq!(r.budget.unwrap().available, Some(LIMIT));

    // 20 reservers × 10 cycles of up to 300 tokens: 60,000 wanted of 20,000. One cycle in ten
    // abandons its reservation (a short lease, never committed).
    let mut workers = Vec::new();
    for w in 0..20u64 {
        let fleet = fleet.clone();
        workers.push(tokio::spawn(async move {
            let mut charged = 0;
            let mut refused = 0;
            for c in 0..10u64 {
                let id = format!("w{w}-c{c}");
                let abandon = (w + c) % 10 == 0;
                let r = call(&fleet, &reserve(&id, 300, if abandon { 800 } else { 60_000 })).await;
                let Some(tokens) = r.tokens else {
                    assert_eq!(r.error.unwrap().code, "budget_exceeded");
                    refused += 1;
                    continue;
                };
                if abandon {
                    continue;
                }
                // The call used part of what it held; the commit is delivered twice.
                let used = tokens.min(100 + (w * 7 + c * 13) % 200);
                let commit = CommitRequest { id: id.clone(), used, ..Default::default() };
                let first = call(&fleet, &commit).await;
                let again = call(&fleet, &commit).await;
                assert_eq!(first, again, "a repeated commit answers as the first");
                charged += first.charged.unwrap();
            }
            (charged, refused)
        }));
    }
    let mut charged = 0;
    let mut refused = 0;
    for w in workers {
        let (c, r) = w.await.unwrap();
        charged += c;
        refused += r;
    }
    assert!(refused > 0, "the budget ran out under contention");

    // Abandoned reservations expire and give their tokens back.
    let status = eventually(Duration::from_secs(10), "abandoned reservations to expire", || async {
        let b = call(&fleet, &show()).await.budget.unwrap();
        (b.held == 0).then_some(b)
    })
    .await;
    assert_eq!(status.used, charged, "usage is exactly what the commits charged");
    assert!(status.used <= LIMIT);

    // Over the whole ledger: replayed entry by entry, used + held never exceeded the limit.
    let entries = common::ledger_entries(&fleet).await;
    let mut replay = Ledger::new(u64::MAX);
    let mut max_committed_and_held = 0;
    for e in &entries {
        flotilla_budget_keeper::replay::apply_entry(&mut replay, e);
        if let Some(b) = replay.budget("tenant.acme", e.at_ms) {
            assert!(b.used + b.held <= LIMIT, "overspent after {e:?}");
            max_committed_and_held = max_committed_and_held.max(b.used + b.held);
        }
    }
    assert!(max_committed_and_held > LIMIT / 2);
    assert!(entries.iter().any(|e| e.op() == "expire"), "expiries are in the ledger");

    // A restarted budget-keeper rebuilds the same state from the ledger.
    keeper.stop().await;
    let keeper = start(&server, "bk-2").await;
    let after = eventually(Duration::from_secs(10), "the restarted budget-keeper to answer", || async {
        let body = codec::encode(WireFormat::Msgpack, &show()).unwrap();
        let reply = fleet.client.request(fleet.names.budget_subject("show"), body.into()).await.ok()?;
        codec::decode::<BudgetReply>(None, &reply.payload).ok()?.budget
    })
    .await;
    assert_eq!((after.used, after.held), (status.used, status.held));
    // Keys used before the restart are still known: a repeated commit charges nothing new, an
    // ended key cannot hold again.
    let commit = CommitRequest { id: "w1-c1".into(), used: 5, ..Default::default() };
    assert!(call(&fleet, &commit).await.error.is_none());
    assert_eq!(call(&fleet, &reserve("w1-c1", 300, 60_000)).await.error.unwrap().code, "reservation_ended");
    assert_eq!(call(&fleet, &show()).await.budget.unwrap().used, status.used);

    // Any client: JSON in, JSON out; bad input gets a coded error.
    let json = fleet
        .client
        .request(fleet.names.budget_subject("show"), br#"{"scope": "tenant.acme"}"#.to_vec().into())
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json.payload).unwrap();
    assert_eq!(v["budget"]["used"], status.used);
    for (bad, code) in [
        (&br#"{"scope": 42}"#[..], "wrong_type"),
        (&br#"{"scope": "x", "colour": "red"}"#[..], "malformed"),
        (&b"\xc1"[..], "malformed"),
        (&br#"{"scope": "tenant.nobody"}"#[..], "unknown_scope"),
    ] {
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::CONTENT_TYPE, headers::APPLICATION_JSON);
        let reply = fleet
            .client
            .request_with_headers(fleet.names.budget_subject("show"), h, bad.to_vec().into())
            .await
            .unwrap();
        let r: BudgetReply = codec::decode(None, &reply.payload).unwrap();
        assert_eq!(r.error.map(|e| e.code).as_deref(), Some(code), "{}", String::from_utf8_lossy(bad));
    }

    // Standard tooling discovers the service (NATS micro protocol) and its endpoints.
    let info = fleet.client.request("$SRV.INFO.flotilla-budget", "".into()).await.unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.payload).unwrap();
    let endpoints: Vec<&str> =
        info["endpoints"].as_array().unwrap().iter().map(|e| e["subject"].as_str().unwrap()).collect();
    assert!(
        endpoints.contains(&"flotilla.budget.reserve") && endpoints.contains(&"flotilla.budget.commit"),
        "{info}"
    );

    // A request whose reply subject points into the ledger is not answered there: nothing is
    // written to the ledger, and the keeper keeps its fence and keeps answering.
    let before = common::ledger_entries(&fleet).await.len();
    fleet
        .client
        .publish_with_reply(
            fleet.names.budget_subject("show"),
            fleet.names.ledger_subject("forged"),
            br#"{"scope": "tenant.acme"}"#.to_vec().into(),
        )
        .await
        .unwrap();
    fleet.client.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(common::ledger_entries(&fleet).await.len(), before, "no answer was stored in the ledger");
    let r = call(&fleet, &reserve("after-forgery", 10, 60_000)).await;
    assert_eq!(r.tokens, Some(10), "the keeper still writes to its ledger");
    keeper.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scarce_rate_permits_go_to_the_most_urgent_waiter_first() {
    let server = NatsServer::start();
    let (fleet, _) = server.fleet("t").await;
    let keeper = start(&server, "bk-1").await;
    let rate = RateRequest { rate: "p/m".into(), rpm: Some(2), window_ms: Some(500), ..Default::default() };
    eventually(Duration::from_secs(10), "the budget-keeper to answer", || async {
        let body = codec::encode(WireFormat::Msgpack, &rate).unwrap();
        let reply = fleet.client.request(fleet.names.budget_subject("rate"), body.into()).await.ok()?;
        codec::decode::<BudgetReply>(None, &reply.payload).ok()?.rate
    })
    .await;
    let ask = |id: &str, priority: flotilla_protocol::Priority| ReserveRequest {
        rates: vec!["p/m".into()],
        priority: Some(priority),
        ..reserve(id, 10, 60_000)
    };
    use flotilla_protocol::Priority;
    // Two permits go at once; the next ones wait for the window (plus its margin) to pass.
    for id in ["first", "second"] {
        assert_eq!(call(&fleet, &ask(id, Priority::NORMAL)).await.tokens, Some(10));
    }
    let started = std::time::Instant::now();
    let batch = {
        let fleet = fleet.clone();
        let r = ask("batch", Priority::BATCH);
        tokio::spawn(async move { call(&fleet, &r).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let urgent = {
        let fleet = fleet.clone();
        let r = ask("urgent", Priority::INTERACTIVE);
        tokio::spawn(async move { call(&fleet, &r).await })
    };
    assert_eq!(urgent.await.unwrap().tokens, Some(10));
    assert_eq!(batch.await.unwrap().tokens, Some(10));
    assert!(started.elapsed() >= Duration::from_millis(2_000), "the permits waited for the window");
    // The ledger records the grants in the order they were made: the urgent one first.
    let order: Vec<String> = common::ledger_entries(&fleet)
        .await
        .into_iter()
        .filter_map(|e| match e.change {
            LedgerChange::Reserve(r) => Some(r.id),
            _ => None,
        })
        .collect();
    assert_eq!(order, ["first", "second", "urgent", "batch"]);
    keeper.stop().await;
}
