//! The dispatcher lease against a real nats-server, with one dispatcher in this process and the
//! test playing the other contenders (writing the lease key itself) and a fake agent.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use flotilla_protocol::names::lease_key;
use flotilla_protocol::{
    CapabilityRecord, HealthReply, Lease, TaskState, TaskSubmission, codec, time::now_ms,
};
use flotilla_service::Service as _;
use flotilla_service::{Fleet, Topology};
use flotilla_testkit::{NatsServer, eventually};
use tokio_util::sync::CancellationToken;

const TTL: Duration = Duration::from_secs(1);

struct Harness {
    _server: NatsServer,
    fleet: Fleet,
    topology: Topology,
    shutdown: CancellationToken,
    dispatcher: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

async fn server() -> Harness {
    let server = NatsServer::start();
    let (fleet, topology) = server.fleet("test").await;
    let cap = CapabilityRecord { capability: "work".into(), templates: vec![], declared_at_ms: now_ms() };
    fleet.kv_put(&topology.capabilities, "work", &cap).await.unwrap();
    Harness { _server: server, fleet, topology, shutdown: CancellationToken::new(), dispatcher: None }
}

fn lease_of(holder: &str, epoch: u64, ttl: Duration) -> Lease {
    Lease {
        holder: holder.into(),
        epoch,
        acquired_at_ms: now_ms(),
        renewed_at_ms: now_ms(),
        ttl_ms: u64::try_from(ttl.as_millis()).unwrap(),
    }
}

impl Harness {
    async fn start_dispatcher(&mut self) {
        let config = flotilla_dispatcher::Config {
            tick: Duration::from_millis(50),
            lease_ttl: TTL,
            ..Default::default()
        };
        let (fleet, _) = self._server.fleet("d1").await;
        let dispatcher = flotilla_dispatcher::Dispatcher::new(config);
        self.dispatcher =
            Some(tokio::spawn(dispatcher.run(fleet, self.topology.clone(), self.shutdown.clone())));
    }

    async fn lease(&self) -> Option<kv::Entry> {
        self.topology.leases.entry(lease_key::DISPATCHER).await.unwrap()
    }

    async fn holder(&self) -> Option<Lease> {
        let e = self.lease().await?;
        (e.operation == kv::Operation::Put).then(|| codec::decode(None, &e.value).unwrap())
    }

    /// The dispatcher's health reply, once it answers.
    async fn health(&self) -> Option<HealthReply> {
        let subject = self.fleet.names.instance_health_subject("dispatcher", "d1");
        let reply = self.fleet.client.request(subject, bytes::Bytes::new()).await.ok()?;
        Some(codec::decode(None, &reply.payload).unwrap())
    }

    async fn wait_role(&self, role: &str) -> HealthReply {
        eventually(Duration::from_secs(10), role, || async {
            self.health().await.filter(|h| h.details["role"] == role)
        })
        .await
    }

    /// A fake agent heartbeating every 100 ms until the token is cancelled.
    fn agent(&self) -> CancellationToken {
        flotilla_testkit::fake_agent(&self.fleet, &self.topology.agents, "fake-a", "rfa", 10)
    }

    async fn submit(&self, id: &str) {
        let sub = TaskSubmission { id: Some(id.into()), capability: "work".into(), ..Default::default() };
        self.fleet.publish_durable(self.fleet.names.submit_subject(), &sub, Some(id)).await.unwrap();
    }

    async fn state(&self, id: &str) -> Option<TaskState> {
        self.fleet
            .kv_get::<flotilla_protocol::TaskRecord>(&self.topology.tasks, id)
            .await
            .unwrap()
            .map(|r| r.0.state)
    }

    /// True once the task's `assigned` event is in the events stream. (The record stays queued
    /// until a runner claims the assignment; these tests have no runner.)
    async fn assigned(&self, id: &str) -> bool {
        let names = &self.fleet.names;
        let stream = self.fleet.js.get_stream(names.events_stream()).await.unwrap();
        stream
            .get_last_raw_message_by_subject(&names.task_event_subject("default", id, "assigned"))
            .await
            .is_ok()
    }

    async fn wait_assigned(&self, id: &str) {
        eventually(Duration::from_secs(10), &format!("{id} to be assigned"), || async {
            self.assigned(id).await.then_some(())
        })
        .await;
    }

    async fn wait_state(&self, id: &str, state: TaskState) {
        eventually(Duration::from_secs(10), &format!("{id} to be {state:?}"), || async {
            (self.state(id).await == Some(state)).then_some(())
        })
        .await;
    }

    async fn stop_dispatcher(&mut self) {
        self.shutdown.cancel();
        if let Some(d) = self.dispatcher.take() {
            d.await.unwrap().unwrap();
        }
    }

    async fn stop(mut self) {
        self.stop_dispatcher().await;
    }
}

#[test]
fn lease_ttls_out_of_bounds_are_refused() {
    for (ttl, ok) in [(100, false), (300, true), (3000, true), (20_000, true), (60_000, false)] {
        let c = flotilla_dispatcher::Config { lease_ttl: Duration::from_millis(ttl), ..Default::default() };
        assert_eq!(c.validate().is_ok(), ok, "lease_ttl {ttl} ms");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_left_by_a_dead_dispatcher_is_taken_over_after_its_ttl_and_not_before() {
    let mut h = server().await;
    let ghost_ttl = Duration::from_millis(1500);
    h.fleet
        .kv_create(&h.topology.leases, lease_key::DISPATCHER, &lease_of("ghost", 7, ghost_ttl))
        .await
        .unwrap();
    let started = Instant::now();
    h.start_dispatcher().await;
    // Before its first look at the key a dispatcher reports `standby` with no holder.
    let standby = eventually(Duration::from_secs(10), "d1 to see the ghost's lease", || async {
        h.health().await.filter(|r| r.details["holder"] == "ghost")
    })
    .await;
    assert_eq!(standby.details["role"], "standby");
    assert_eq!(standby.details["epoch"], 7);
    let lease = eventually(Duration::from_secs(10), "d1 to take the lease", || async {
        h.holder().await.filter(|l| l.holder == "d1")
    })
    .await;
    let waited = started.elapsed();
    // The ghost's TTL counts from when d1 first saw its lease, which is after d1 started.
    assert!(waited >= ghost_ttl, "took over after {waited:?}, before the ghost's TTL ran out");
    assert!(waited < ghost_ttl + Duration::from_secs(1), "took over only after {waited:?}");
    assert_eq!(lease.epoch, 8);
    assert_eq!(lease.ttl_ms, 1000);
    let active = h.wait_role("active").await;
    assert_eq!(active.details["holder"], "d1");
    assert_eq!(active.details["epoch"], 8);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_whose_lease_was_taken_stops_scheduling_and_takes_it_back_when_released() {
    let mut h = server().await;
    h.start_dispatcher().await;
    h.wait_role("active").await;
    let agent = h.agent();
    h.submit("t1").await;
    h.wait_assigned("t1").await;

    // Another contender overwrites the lease (as after a partition): d1's next renewal conflicts.
    let taken = Instant::now();
    // (With a TTL long enough that d1 does not take the unrenewed lease back during the test.)
    let thief = lease_of("thief", 50, Duration::from_secs(20));
    h.fleet.kv_put(&h.topology.leases, lease_key::DISPATCHER, &thief).await.unwrap();
    h.wait_role("standby").await;
    assert!(taken.elapsed() < TTL, "d1 stood down {:?} after the lease was taken", taken.elapsed());
    eventually(Duration::from_secs(5), "d1 to see the thief's lease", || async {
        h.health().await.filter(|r| r.details["holder"] == "thief" && r.details["role"] == "standby")
    })
    .await;

    // A standby still takes in submissions, but does not assign them.
    h.submit("t2").await;
    h.wait_state("t2", TaskState::Queued).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!h.assigned("t2").await, "a standby assigns nothing");

    // The thief releases the lease: d1 takes it at once, with a higher epoch, and schedules.
    let rev = h.lease().await.unwrap().revision;
    let released = Instant::now();
    h.topology.leases.delete_expect_revision(lease_key::DISPATCHER, Some(rev)).await.unwrap();
    let lease = eventually(Duration::from_secs(10), "d1 to take the lease back", || async {
        h.holder().await.filter(|l| l.holder == "d1")
    })
    .await;
    assert!(released.elapsed() < TTL / 2, "took {:?}", released.elapsed());
    assert_eq!(lease.epoch, 51);
    h.wait_role("active").await;
    h.submit("t3").await;
    h.wait_assigned("t3").await;

    // A clean stop deletes the lease.
    agent.cancel();
    h.stop_dispatcher().await;
    let entry = h.lease().await.unwrap();
    assert_eq!(entry.operation, kv::Operation::Delete, "the lease was released on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_holder_renews_every_third_of_its_ttl() {
    let mut h = server().await;
    h.start_dispatcher().await;
    h.wait_role("active").await;
    let first = h.lease().await.unwrap().revision;
    tokio::time::sleep(TTL * 2).await;
    let later = h.lease().await.unwrap();
    let lease: Lease = codec::decode(None, &later.value).unwrap();
    assert_eq!(lease.holder, "d1");
    let renewals = later.revision - first;
    assert!((4..=8).contains(&renewals), "{renewals} renewals in two TTLs");
    assert!(lease.renewed_at_ms > lease.acquired_at_ms);
    h.stop().await;
}

/// The scheduler must rebuild its view from the buckets when it starts: a task recorded while
/// this dispatcher stood by is assigned once it takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_take_over_tasks_queued_before_it_are_assigned() {
    let mut h = server().await;
    let ghost_ttl = Duration::from_millis(800);
    h.fleet
        .kv_create(&h.topology.leases, lease_key::DISPATCHER, &lease_of("ghost", 1, ghost_ttl))
        .await
        .unwrap();
    h.start_dispatcher().await;
    h.wait_role("standby").await;
    let agent = h.agent();
    h.submit("waiting").await;
    h.wait_state("waiting", TaskState::Queued).await;
    h.wait_role("active").await;
    h.wait_assigned("waiting").await;
    agent.cancel();
    h.stop().await;
}

/// A renewal whose ack was lost still landed: the next renewal conflicts, but the key shows the
/// holder's own acquisition, so it stays active (simulated by writing a copy of its lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_that_landed_without_an_ack_does_not_lose_the_lease() {
    let mut h = server().await;
    h.start_dispatcher().await;
    h.wait_role("active").await;
    let mut copy = h.holder().await.unwrap();
    copy.renewed_at_ms = now_ms();
    let rev = h.fleet.kv_put(&h.topology.leases, lease_key::DISPATCHER, &copy).await.unwrap();
    // Later renewals go on from the copy's revision.
    eventually(Duration::from_secs(5), "a renewal after the copy", || async {
        let e = h.lease().await.unwrap();
        (e.revision > rev).then_some(())
    })
    .await;
    let lease = h.holder().await.unwrap();
    assert_eq!((lease.holder.as_str(), lease.epoch), ("d1", copy.epoch));
    assert_eq!(h.health().await.unwrap().details["role"], "active");
    h.stop().await;
}
