//! Recovery in seconds: a runner killed and restarted under the same id (as a supervisor does)
//! takes back at once the assignments its previous incarnation held, instead of leaving them to
//! the ack wait; nothing completes twice.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use flotilla_protocol::WireFormat;
use flotilla_service::StreamSettings;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runner_restarted_under_its_id_takes_its_work_back_at_once() {
    let mut sys = System::start(StreamSettings::default(), WireFormat::Msgpack).await;
    // The dispatcher would notice the lost agents only after 30 missed heartbeats (9 s): the
    // restart comes long before, as a supervisor's does.
    sys.start_dispatcher(flotilla_dispatcher::Config { missed_heartbeats: 30, ..dispatcher_config() }).await;
    let fleet = worker_fleet(1, 4);
    let mut first = sys.spawn_runner_process("ra", &fleet);
    sys.wait_for_agents("ra", 1).await;
    let ids: Vec<String> = (0..4).map(|i| format!("held-{i}")).collect();
    for id in &ids {
        sys.submit(&sleeping(id.clone(), 1_500)).await;
    }
    sys.wait_for_kind("started", 4, Duration::from_secs(20)).await;
    first.kill9();
    let killed = Instant::now();
    let _second = sys.spawn_runner_process("ra", &fleet);
    let events = sys.wait_for_kind("completed", 4, Duration::from_secs(25)).await;
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "the restarted runner took its work back in {took:?}, not at the ack wait"
    );
    let completed = count_by_task(&events, "completed");
    assert!(ids.iter().all(|id| completed.get(id) == Some(&1)), "each completes once: {completed:?}");
    // Taken back by the new incarnation: the same attempt claimed again, not requeued.
    let all = sys.events().await;
    assert!(!all.iter().any(|e| e.kind == "requeued"), "nothing waited for the loss to be noticed");
    for id in &ids {
        assert_eq!(sys.task(id).await.unwrap().attempt, 1, "{id}: the same attempt, claimed again");
    }
    eprintln!(
        "recovery after a runner restart: {took:?} from the kill to the last completion (bound 8 s, ack wait 30 s)"
    );
}
