//! Idempotent creation of every stream and bucket a fleet uses, from the names in `protocol`.
//! Every service calls [`Topology::ensure`] at start-up; repeated or concurrent calls converge.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, kv, stream};
use flotilla_protocol::Names;

use crate::config::StreamSettings;

/// `max_age` of the leases bucket: a lease nobody renews is removed this long after its last
/// write. It is a fixed constant, not a setting, so that services with different settings never
/// flip the bucket's configuration back and forth, and it is only a clean-up: contenders judge
/// whether a lease ran out by the holder's own TTL (in the lease). It must stay well above the
/// longest lease TTL, or the server could remove a lease its holder still counts on.
pub const LEASES_MAX_AGE: Duration = Duration::from_secs(60);

/// `max_age` of the agent registry: an agent record is written when the agent's state changes
/// and refreshed by its runner well within this ([`AGENT_REFRESH`]); the records of agents whose
/// runner is long gone are removed this long after their last write.
pub const AGENTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// How often a runner rewrites the record of an agent whose state did not change.
pub const AGENT_REFRESH: Duration = Duration::from_secs(6 * 3600);
/// `max_age` of the runners bucket: a runner record is rewritten every heartbeat; a dead
/// runner's is removed an hour after its last beat.
pub const RUNNERS_MAX_AGE: Duration = Duration::from_secs(3600);

/// Whether a service owns the task topology (applies configuration changes to existing streams
/// and buckets) or joins it (creates what is missing, leaves existing ones as they are, so that
/// services with different settings never fight over a stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Create or update: the dispatcher, the owner of the task topology.
    Own,
    /// Create if missing: every other service.
    Join,
}

/// Handles to a fleet's buckets, after they were ensured.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Current record of every task.
    pub tasks: kv::Store,
    /// Agent registry with heartbeats.
    pub agents: kv::Store,
    /// Every capability a fleet ever declared.
    pub capabilities: kv::Store,
    /// Agents' shared memory.
    pub memory: kv::Store,
    /// Requests for human approval.
    pub approvals: kv::Store,
    /// Leases of exclusive roles (the active dispatcher).
    pub leases: kv::Store,
    /// Who may message whom.
    pub grants: kv::Store,
    /// How the handling of each message stands (fences redeliveries).
    pub messages: kv::Store,
    /// The operators' signing keys (written by the admin only).
    pub operators: kv::Store,
    /// Every runner's heartbeat and incarnation (its agents' liveness).
    pub runners: kv::Store,
    /// Replicas of every stream and bucket, as they were ensured (services that own further
    /// buckets create them with as many).
    pub replicas: usize,
}

impl Topology {
    /// Creates (and in [`Mode::Own`] updates) the fleet's streams and buckets.
    pub async fn ensure(
        js: &jetstream::Context,
        names: &Names,
        s: &StreamSettings,
        mode: Mode,
    ) -> anyhow::Result<Self> {
        for cfg in stream_configs(names, s) {
            let name = cfg.name.clone();
            let result = match mode {
                Mode::Own => js.create_or_update_stream(cfg).await.map(drop).map_err(anyhow::Error::from),
                Mode::Join => js.get_or_create_stream(cfg).await.map(drop).map_err(anyhow::Error::from),
            };
            result.with_context(|| format!("failed to ensure stream {name}"))?;
        }
        let mut stores = Vec::new();
        for cfg in bucket_configs(names, s) {
            stores.push(ensure_bucket(js, mode, cfg).await?);
        }
        Self::from_stores(stores, s.replicas)
    }
}

impl Topology {
    /// Opens the fleet's buckets without creating anything, as a service with a least-privilege
    /// credential must (only the dispatcher may create the topology): waits up to `patience` for
    /// a bucket the dispatcher has not created yet.
    pub async fn open(js: &jetstream::Context, names: &Names, patience: Duration) -> anyhow::Result<Self> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut stores = Vec::with_capacity(10);
        for bucket in bucket_configs(names, &StreamSettings::default()).into_iter().map(|c| c.bucket) {
            let mut logged = false;
            let store = loop {
                match js.get_key_value(&bucket).await {
                    Ok(store) => break store,
                    Err(e) if tokio::time::Instant::now() < deadline => {
                        if !logged {
                            tracing::info!(%bucket, error = %e, "waiting for the dispatcher to create the fleet's buckets");
                            logged = true;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => {
                        return Err(anyhow::Error::from(e).context(format!(
                            "bucket {bucket} cannot be opened (has a dispatcher created the fleet's topology? \
                             does this credential allow $JS.API.STREAM.INFO.KV_{bucket}?)"
                        )));
                    }
                }
            };
            stores.push(store);
        }
        let replicas = stores.first().map_or(1, |t| t.stream.cached_info().config.num_replicas);
        Self::from_stores(stores, replicas)
    }
}

impl Topology {
    /// The handles, from the stores of the buckets in the order [`Topology::ensure`] and
    /// [`Topology::open`] list them.
    fn from_stores(stores: Vec<kv::Store>, replicas: usize) -> anyhow::Result<Self> {
        let Ok(
            [tasks, agents, capabilities, memory, approvals, leases, grants, messages, operators, runners],
        ) = <[kv::Store; 10]>::try_from(stores)
        else {
            anyhow::bail!("a bucket of the topology was not opened");
        };
        Ok(Self {
            tasks,
            agents,
            capabilities,
            memory,
            approvals,
            leases,
            grants,
            messages,
            operators,
            runners,
            replicas,
        })
    }
}

/// The configuration of every bucket of a fleet, in the order of [`Topology`]'s fields.
pub fn bucket_configs(names: &Names, s: &StreamSettings) -> Vec<kv::Config> {
    // (bucket, description, history, max age)
    let buckets = [
        (names.tasks_bucket(), "Flotilla: current record of every task", 5, s.tasks_max_age),
        (names.agents_bucket(), "Flotilla: agent registry", 1, AGENTS_MAX_AGE),
        (names.capabilities_bucket(), "Flotilla: capabilities declared by fleets", 1, Duration::ZERO),
        (names.memory_bucket(), "Flotilla: agents' shared memory", 10, Duration::ZERO),
        (names.approvals_bucket(), "Flotilla: requests for human approval", 5, s.tasks_max_age),
        (names.leases_bucket(), "Flotilla: leases of exclusive roles", 1, LEASES_MAX_AGE),
        (names.grants_bucket(), "Flotilla: who may message whom", 5, Duration::ZERO),
        (names.messages_bucket(), "Flotilla: handling of direct messages", 1, s.messages_max_age),
        (names.operators_bucket(), "Flotilla: operators' signing keys", 5, Duration::ZERO),
        (names.runners_bucket(), "Flotilla: runners' heartbeats", 1, RUNNERS_MAX_AGE),
    ];
    buckets
        .into_iter()
        .map(|(bucket, description, history, max_age)| kv::Config {
            // Shared memory is written by agents and operators: its values are bounded here, by
            // the server, whoever writes them.
            max_value_size: if bucket == names.memory_bucket() {
                i32::try_from(flotilla_protocol::limits::MAX_MEMORY_VALUE_BYTES).unwrap_or(i32::MAX)
            } else {
                kv::Config::default().max_value_size
            },
            bucket,
            description: description.to_owned(),
            history,
            max_age,
            num_replicas: s.replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .collect()
}

/// Creates (and in [`Mode::Own`] updates) one bucket.
async fn ensure_bucket(js: &jetstream::Context, mode: Mode, cfg: kv::Config) -> anyhow::Result<kv::Store> {
    let name = cfg.bucket.clone();
    let result = match mode {
        Mode::Own => js.create_or_update_key_value(cfg).await.map_err(anyhow::Error::from),
        Mode::Join => match js.get_key_value(&name).await {
            Ok(store) => Ok(store),
            // Missing: create it; if another service won that race, open theirs.
            Err(_) => match js.create_key_value(cfg).await {
                Ok(store) => Ok(store),
                Err(_) => js.get_key_value(&name).await.map_err(anyhow::Error::from),
            },
        },
    };
    result.with_context(|| format!("failed to ensure bucket {name}"))
}

/// The configuration of every stream of a fleet.
pub fn stream_configs(names: &Names, s: &StreamSettings) -> Vec<stream::Config> {
    let base = |name: String, subjects: Vec<String>, description: &str| stream::Config {
        name,
        subjects,
        description: Some(description.to_owned()),
        storage: stream::StorageType::File,
        num_replicas: s.replicas,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    };
    vec![
        stream::Config {
            retention: stream::RetentionPolicy::Limits,
            max_age: s.submissions_max_age,
            duplicate_window: s.duplicate_window,
            max_message_size: s.max_msg_size,
            ..base(
                names.submissions_stream(),
                vec![names.submit_subject(), names.tenant_submit_all()],
                "Flotilla: task submissions",
            )
        },
        stream::Config {
            retention: stream::RetentionPolicy::Limits,
            max_age: s.events_max_age,
            max_bytes: s.events_max_bytes,
            duplicate_window: Duration::from_secs(120),
            deny_delete: true,
            // A task's last event of a kind, by subject: how a tenant's client reads its results
            // (`<p>.jsapi.DIRECT.GET…`, imported into its account) without a consumer.
            allow_direct: true,
            ..base(
                names.events_stream(),
                vec![names.events_all()],
                "Flotilla: lifecycle events (audit trail)",
            )
        },
        stream::Config {
            retention: stream::RetentionPolicy::WorkQueue,
            max_age: Duration::from_secs(24 * 3600),
            duplicate_window: Duration::from_secs(120),
            ..base(names.assignments_stream(), vec![names.assign_all()], "Flotilla: assignments to runners")
        },
        stream::Config {
            retention: stream::RetentionPolicy::Limits,
            max_age: Duration::from_secs(30 * 24 * 3600),
            ..base(names.deadletter_stream(), vec![names.deadletter_all()], "Flotilla: dead-letter records")
        },
        stream::Config {
            // Kept whole: the budget-keeper rebuilds its state from it.
            retention: stream::RetentionPolicy::Limits,
            duplicate_window: Duration::from_secs(120),
            deny_delete: true,
            deny_purge: true,
            ..base(names.ledger_stream(), vec![names.ledger_all()], "Flotilla: ledger of budget changes")
        },
        stream::Config {
            // Limits, not work queue: a task's conversation can be read back after it was handled.
            retention: stream::RetentionPolicy::Limits,
            max_age: s.messages_max_age,
            duplicate_window: Duration::from_secs(120),
            max_message_size: 256 * 1024,
            ..base(
                names.messages_stream(),
                vec![names.inbox_all()],
                "Flotilla: direct messages between agents",
            )
        },
        stream::Config {
            retention: stream::RetentionPolicy::Limits,
            max_age: s.topics_max_age,
            duplicate_window: Duration::from_secs(120),
            max_message_size: 256 * 1024,
            ..base(names.topics_stream(), vec![names.topics_all()], "Flotilla: topic events")
        },
        stream::Config {
            // Kept whole: the recall index of every runner is rebuilt from it.
            retention: stream::RetentionPolicy::Limits,
            duplicate_window: Duration::from_secs(120),
            max_message_size: 1024 * 1024,
            ..base(names.recall_stream(), vec![names.recall_all()], "Flotilla: what agents remembered")
        },
        stream::Config {
            // Audit: kept for the longest retention, each tenant's entries for its own (a TTL on
            // every message), and never deleted by hand.
            retention: stream::RetentionPolicy::Limits,
            max_age: s.transcripts_max_age,
            allow_message_ttl: true,
            deny_delete: true,
            duplicate_window: Duration::from_secs(120),
            max_message_size: 1024 * 1024,
            ..base(
                names.transcripts_stream(),
                vec![names.transcripts_all()],
                "Flotilla: transcripts of model and tool calls",
            )
        },
    ]
}
