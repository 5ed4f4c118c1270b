//! The budget-keeper ensures its ledger stream and snapshot store and answers health requests,
//! also as a NATS micro service.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use flotilla_protocol::HealthReply;
use flotilla_service::Service as _;
use flotilla_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensures_its_ledger_and_answers_health() {
    let server = NatsServer::start();
    let (fleet, topology) = server.fleet("bk1").await;
    let shutdown = CancellationToken::new();
    let keeper = flotilla_budget_keeper::BudgetKeeper::default();
    let task = tokio::spawn(keeper.run(fleet.clone(), topology, shutdown.clone()));

    let subject = fleet.names.health_subject("budget-keeper");
    let reply = flotilla_testkit::eventually(std::time::Duration::from_secs(10), "health reply", || async {
        fleet.client.request(subject.clone(), "".into()).await.ok()
    })
    .await;
    let h: HealthReply = flotilla_protocol::decode(None, &reply.payload).unwrap();
    assert_eq!(h.service, "budget-keeper");
    assert_eq!(h.instance, "bk1");
    assert_eq!(h.status, "ok");
    assert!(fleet.js.get_stream(fleet.names.ledger_stream()).await.is_ok());
    assert!(fleet.js.get_object_store(fleet.names.budget_snapshots_bucket()).await.is_ok());

    // Discoverable through the micro service protocol.
    let ping = fleet.client.request("$SRV.PING.flotilla-budget-keeper", "".into()).await.unwrap();
    let ping: serde_json::Value = serde_json::from_slice(&ping.payload).unwrap();
    assert_eq!(ping["name"], "flotilla-budget-keeper");

    shutdown.cancel();
    task.await.unwrap().unwrap();
}
