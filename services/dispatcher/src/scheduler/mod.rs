//! The scheduler: the loop of the active dispatcher. One task owns the projection of the tasks,
//! agents and runners buckets ([`projection`], fed by KV watches) and carries out the decisions of the
//! run queue ([`crate::runqueue`]): it sends assignments ([`assign`]); takes back the work of
//! agents that stopped heartbeating and assignments nobody claimed, and fails tasks past their
//! deadline ([`housekeeping`]); scales templates with the workload ([`autoscale`]); and answers
//! the requests only the active dispatcher can ([`requests`]: the queue report, cancelling a
//! task).

mod assign;
mod autoscale;
mod grants;
mod housekeeping;
mod projection;
mod requests;

pub use autoscale::Settings as AutoscaleSettings;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use flotilla_protocol::names::queue_group;
use flotilla_service::{Fleet, Topology};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

use crate::runqueue::RunQueue;
use crate::{Config, Stats};

struct Scheduler {
    config: Config,
    fleet: Fleet,
    topology: Topology,
    stats: Arc<Stats>,
    queue: RunQueue,
    /// Non-terminal tasks.
    tasks: HashMap<String, projection::TaskView>,
    agents: HashMap<String, projection::AgentInfo>,
    /// No agent is declared lost before this: its heartbeats may not have been seen yet.
    requeue_after: Instant,
    autoscaler: autoscale::Autoscaler,
    /// Tasks assigned whose claim has not shown up yet (their records still say queued).
    pending: HashMap<String, assign::Proposal>,
    /// The latest revision of the tasks bucket the watch has delivered.
    seen_revision: u64,
    /// Assignments whose writes are in flight, and where their outcomes come back.
    in_flight: usize,
    /// The unfinished children of each parent task: cancelled when their parent fails or is
    /// cancelled.
    children: HashMap<String, std::collections::HashSet<String>>,
    /// Tasks that finished in the last minute, by the agent that finished them: if that agent is
    /// lost, its runner may have died between writing the outcome and announcing it.
    recent_finals: HashMap<String, Vec<(String, Instant)>>,
    done_tx: tokio::sync::mpsc::UnboundedSender<assign::Written>,
}

/// Runs the scheduler until `shutdown`: rebuilds its whole view from the buckets, then keeps it
/// current and acts on it.
pub async fn run(
    config: Config,
    fleet: Fleet,
    topology: Topology,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let requeue_after = Instant::now() + liveness_window(&config);
    let mut s = Scheduler {
        queue: RunQueue::new(config.policy()),
        autoscaler: autoscale::Autoscaler::new(config.autoscale_settings()),
        config,
        fleet,
        topology,
        stats,
        tasks: HashMap::new(),
        agents: HashMap::new(),
        requeue_after,
        pending: HashMap::new(),
        children: HashMap::new(),
        recent_finals: HashMap::new(),
        seen_revision: 0,
        in_flight: 0,
        done_tx,
    };
    let mut task_watch = watch(&s.topology.tasks).await?;
    let mut agent_watch = watch(&s.topology.agents).await?;
    let mut runner_watch = watch(&s.topology.runners).await?;
    // Only the scheduling dispatcher answers these: it alone has the queue, and cancels are
    // written by the one writer that also requeues and expires.
    let mut queue_requests = subscribe(&s.fleet, s.fleet.names.dispatcher_queue()).await?;
    let mut cancel_requests = subscribe(&s.fleet, s.fleet.names.dispatcher_cancel()).await?;
    let mut grant_requests = subscribe(&s.fleet, s.fleet.names.dispatcher_grants()).await?;
    let deadlock_subject = s.fleet.names.alert_event_subject(flotilla_protocol::alert_kind::DEADLOCK);
    let mut deadlocks = subscribe(&s.fleet, deadlock_subject).await?;
    let cancels = Arc::new(tokio::sync::Semaphore::new(requests::CANCELS_AT_ONCE));
    let mut tick = tokio::time::interval(s.config.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            e = task_watch.next() => match e {
                Some(Ok(entry)) => {
                    s.on_task_entry(entry);
                    // Drain what is already buffered before scheduling, for batching.
                    while let Some(Some(Ok(entry))) = futures::FutureExt::now_or_never(task_watch.next()) {
                        s.on_task_entry(entry);
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "task watch failed; re-watching");
                    task_watch = watch(&s.topology.tasks).await?;
                }
                None => task_watch = watch(&s.topology.tasks).await?,
            },
            e = agent_watch.next() => match e {
                Some(Ok(entry)) => s.on_agent_entry(entry),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "agent watch failed; re-watching");
                    agent_watch = watch(&s.topology.agents).await?;
                    s.requeue_after = Instant::now() + liveness_window(&s.config);
                }
                None => {
                    agent_watch = watch(&s.topology.agents).await?;
                    s.requeue_after = Instant::now() + liveness_window(&s.config);
                }
            },
            e = runner_watch.next() => match e {
                Some(Ok(entry)) => {
                    s.on_runner_entry(entry);
                    // A runner's beat changes no decision: nothing to schedule for it.
                    continue;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "runner watch failed; re-watching");
                    runner_watch = watch(&s.topology.runners).await?;
                    s.requeue_after = Instant::now() + liveness_window(&s.config);
                }
                None => {
                    runner_watch = watch(&s.topology.runners).await?;
                    s.requeue_after = Instant::now() + liveness_window(&s.config);
                }
            },
            _ = tick.tick() => s.on_tick().await,
            Some(req) = queue_requests.next() => s.answer_queue_request(&req).await,
            Some(req) = cancel_requests.next() => s.answer_cancel_request(req, &cancels).await,
            Some(req) = grant_requests.next() => {
                let (fleet, topology) = (s.fleet.clone(), s.topology.clone());
                tokio::spawn(grants::answer(fleet, topology, req));
            }
            Some(alert) = deadlocks.next() => {
                let (fleet, topology) = (s.fleet.clone(), s.topology.clone());
                tokio::spawn(requests::break_deadlock(fleet, topology, alert));
            }
            Some(w) = done_rx.recv() => {
                s.on_written(w).await;
                while let Ok(w) = done_rx.try_recv() {
                    s.on_written(w).await;
                }
            }
        }
        s.schedule().await;
    }
    Ok(())
}

/// Every key's latest value first (the state to rebuild), then every change. (`watch_all` would
/// deliver only changes made after it starts.)
async fn watch(store: &kv::Store) -> anyhow::Result<kv::Watch> {
    store.watch_with_history(">").await.map_err(|e| anyhow::anyhow!("failed to watch bucket: {e}"))
}

/// Subscribes in the dispatchers' queue group (see [`queue_group::DISPATCHER`]).
async fn subscribe(fleet: &Fleet, subject: String) -> anyhow::Result<async_nats::Subscriber> {
    fleet
        .client
        .queue_subscribe(subject.clone(), queue_group::DISPATCHER.to_owned())
        .await
        .map_err(|e| anyhow::anyhow!("failed to subscribe to {subject}: {e}"))
}

/// How long agents get to show a heartbeat after the registry is (re)loaded.
fn liveness_window(config: &Config) -> Duration {
    Duration::from_secs(u64::from(config.missed_heartbeats.max(1))) + Duration::from_millis(500)
}
