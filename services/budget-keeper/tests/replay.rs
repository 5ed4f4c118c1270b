//! A ledger entry the replay cannot read stops the rebuild with an error naming its sequence, and
//! a budget-keeper taking the lease over such a ledger does not serve from it: it steps down
//! (and tries again later) rather than answer from a ledger missing a change. A message on the
//! ledger's subjects that no keeper wrote (an answer reflected there, say) is no entry: the
//! replay skips it, loudly, and the keeper serves on.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use flotilla_budget_keeper::replay::{RebuildError, rebuild};
use flotilla_protocol::{BudgetReply, SetRequest, WireFormat, codec};
use flotilla_service::Service as _;
use flotilla_testkit::{NatsServer, eventually};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_ledger_entry_stops_the_rebuild_and_the_keeper_does_not_serve() {
    let server = NatsServer::start();
    let (fleet, topology) = server.fleet("t").await;
    let shutdown = CancellationToken::new();
    let keeper = tokio::spawn(flotilla_budget_keeper::BudgetKeeper::default().run(
        fleet.clone(),
        topology.clone(),
        shutdown.clone(),
    ));
    let set = SetRequest { scope: "tenant.acme".into(), limit_tokens: 1000, ..Default::default() };
    eventually(Duration::from_secs(10), "the budget-keeper to answer", || async {
        let body = codec::encode(WireFormat::Msgpack, &set).unwrap();
        let reply = fleet.client.request(fleet.names.budget_subject("set"), body.into()).await.ok()?;
        codec::decode::<BudgetReply>(None, &reply.payload).ok()?.budget
    })
    .await;
    shutdown.cancel();
    keeper.await.unwrap().unwrap();
    let (_, last) = rebuild(&fleet, None).await.unwrap();
    assert_eq!(last, 1, "the set is the only entry");

    // Something that is no ledger entry, published by something else than a keeper: skipped.
    let subject = fleet.names.ledger_subject("reserve");
    let ping = br#"{"type":"io.nats.micro.v1.ping_response","name":"flotilla-budget"}"#.to_vec();
    fleet.js.publish(subject.clone(), ping.into()).await.unwrap().await.unwrap();
    let (_, last) = rebuild(&fleet, None).await.unwrap();
    assert_eq!(last, 2, "the foreign message is passed over, the rebuild reaches the end");

    // Bytes that are no ledger entry, marked as a keeper's write.
    let garbage = b"\xc1 not an entry".to_vec();
    let mut marked = async_nats::HeaderMap::new();
    marked.insert(flotilla_protocol::headers::FLOTILLA_SOURCE, "budget-keeper");
    fleet.js.publish_with_headers(subject, marked, garbage.into()).await.unwrap().await.unwrap();
    match rebuild(&fleet, None).await {
        Err(e @ RebuildError::Unreadable { seq: 3, .. }) => {
            assert!(e.to_string().contains("ledger entry 3"), "{e}");
        }
        other => panic!("the rebuild went past an unreadable entry: {:?}", other.map(|(_, seq)| seq)),
    }

    // A keeper over that ledger takes the lease, fails to rebuild and does not answer.
    let shutdown = CancellationToken::new();
    let keeper = tokio::spawn(flotilla_budget_keeper::BudgetKeeper::default().run(
        fleet.clone(),
        topology,
        shutdown.clone(),
    ));
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let body = codec::encode(WireFormat::Msgpack, &set).unwrap();
        let asked = tokio::time::timeout(
            Duration::from_secs(1),
            fleet.client.request(fleet.names.budget_subject("set"), body.into()),
        )
        .await;
        assert!(!matches!(asked, Ok(Ok(_))), "a keeper answered from a ledger it could not rebuild");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!keeper.is_finished(), "the keeper stands by to try again, it does not exit");
    shutdown.cancel();
    keeper.await.unwrap().unwrap();
}
