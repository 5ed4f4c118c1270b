//! `flotilla memory get|put|ls|watch|history`: the agents' shared memory (`<p>_memory`, keys
//! `<tenant>.<namespace>.<key>`), as an operator sees and changes it. `put --expect REV` is the
//! same compare-and-swap the agents' `memory_put` does.

use anyhow::Context as _;
use async_nats::jetstream::kv;
use futures::StreamExt as _;

use crate::client::{bucket, connect};
use crate::{Cli, Failure, exit};

#[derive(Debug, clap::Args)]
pub struct MemoryArgs {
    /// The tenant whose memory it is.
    #[arg(long, global = true, default_value = flotilla_protocol::DEFAULT_TENANT)]
    pub tenant: String,
    #[command(subcommand)]
    pub op: MemoryOp,
}

#[derive(Debug, clap::Subcommand)]
pub enum MemoryOp {
    /// A key's value and revision.
    Get { key: String },
    /// Store a value (JSON, or else text); with `--expect REV` only if the key is at that revision
    /// (0: only if it is not set).
    Put {
        key: String,
        value: String,
        #[arg(long)]
        expect: Option<u64>,
    },
    /// Keys, optionally under a prefix (e.g. a namespace `counters.`).
    Ls {
        #[arg(default_value = "", value_name = "PREFIX")]
        starts_with: String,
    },
    /// Follow changes of a key, or of every key under a prefix ending in `>` (e.g. `counters.>`).
    Watch { key: String },
    /// The recent values of a key, oldest first.
    History { key: String },
}

fn shown(e: &kv::Entry) -> String {
    match e.operation {
        kv::Operation::Put => String::from_utf8_lossy(&e.value).into_owned(),
        _ => "(deleted)".to_owned(),
    }
}

fn valid(key: &str) -> Result<(), Failure> {
    let ok = !key.is_empty()
        && key.len() <= flotilla_protocol::limits::MAX_MEMORY_KEY_BYTES
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '/' | '=' | '.' | '>' | '*'));
    if ok {
        Ok(())
    } else {
        Err(Failure::new(2, anyhow::anyhow!("key must be characters of A-Z a-z 0-9 _ - / = .")))
    }
}

pub async fn run(cli: &Cli, args: &MemoryArgs) -> Result<(), Failure> {
    let fleet = connect(cli).await?;
    let store = bucket(&fleet, fleet.names.memory_bucket()).await?;
    let full = |key: &str| format!("{}.{key}", args.tenant);
    match &args.op {
        MemoryOp::Get { key } => {
            valid(key)?;
            match store.entry(full(key)).await.context("failed to read")? {
                Some(e) if e.operation == kv::Operation::Put => {
                    if cli.json {
                        let value: serde_json::Value = serde_json::from_slice(&e.value).unwrap_or_default();
                        println!(
                            "{}",
                            serde_json::json!({ "key": key, "value": value, "revision": e.revision })
                        );
                    } else {
                        println!("{} (revision {})", shown(&e), e.revision);
                    }
                }
                _ => return Err(Failure::new(exit::NOT_FOUND, anyhow::anyhow!("{key} is not set"))),
            }
        }
        MemoryOp::Put { key, value, expect } => {
            valid(key)?;
            let v: serde_json::Value =
                serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.clone()));
            let bytes: bytes::Bytes = serde_json::to_vec(&v).context("failed to encode")?.into();
            let json = Some(flotilla_protocol::headers::APPLICATION_JSON);
            if let Err(e) = flotilla_protocol::limits::check(json, &bytes, &flotilla_protocol::limits::MEMORY)
            {
                return Err(Failure::new(2, anyhow::anyhow!("{}: the value is refused: {e}", e.code())));
            }
            let rev = match expect {
                None => store.put(full(key), bytes).await.context("failed to store")?,
                Some(0) => store.create(full(key), bytes).await.map_err(|e| {
                    Failure::new(exit::TASK_FAILED, anyhow::anyhow!("conflict: {key} is already set ({e})"))
                })?,
                Some(r) => store.update(full(key), bytes, *r).await.map_err(|e| {
                    Failure::new(
                        exit::TASK_FAILED,
                        anyhow::anyhow!("conflict: {key} is not at revision {r} ({e})"),
                    )
                })?,
            };
            if cli.json {
                println!("{}", serde_json::json!({ "key": key, "revision": rev }));
            } else {
                println!("stored {key} (revision {rev})");
            }
        }
        MemoryOp::Ls { starts_with } => {
            let own = format!("{}.", args.tenant);
            let mut keys: Vec<String> = fleet
                .kv_keys(&store)
                .await
                .context("failed to list")?
                .into_iter()
                .filter_map(|k| k.strip_prefix(&own).map(str::to_owned))
                .filter(|k| k.starts_with(starts_with.as_str()))
                .collect();
            keys.sort();
            if cli.json {
                println!("{}", serde_json::to_string(&keys).context("failed to render")?);
            } else {
                for k in keys {
                    println!("{k}");
                }
            }
        }
        MemoryOp::Watch { key } => {
            valid(key)?;
            let mut watch = store.watch(full(key)).await.context("failed to watch")?;
            let stop = flotilla_service::shutdown::wait_for_signal();
            tokio::pin!(stop);
            let own = format!("{}.", args.tenant);
            loop {
                let e = tokio::select! {
                    _ = &mut stop => return Ok(()),
                    e = watch.next() => match e { None => return Ok(()), Some(e) => e.context("watch failed")? },
                };
                let k = e.key.strip_prefix(&own).unwrap_or(&e.key);
                if cli.json {
                    let value: serde_json::Value = serde_json::from_slice(&e.value).unwrap_or_default();
                    println!("{}", serde_json::json!({ "key": k, "value": value, "revision": e.revision }));
                } else {
                    println!("{k} = {} (revision {})", shown(&e), e.revision);
                }
            }
        }
        MemoryOp::History { key } => {
            valid(key)?;
            let mut history = store
                .history(full(key))
                .await
                .map_err(|e| Failure::new(exit::NOT_FOUND, anyhow::anyhow!("no history of {key}: {e}")))?;
            while let Some(e) = history.next().await {
                let e = e.context("failed to read the history")?;
                if cli.json {
                    let value: serde_json::Value = serde_json::from_slice(&e.value).unwrap_or_default();
                    println!(
                        "{}",
                        serde_json::json!({ "revision": e.revision, "value": value, "deleted": e.operation != kv::Operation::Put })
                    );
                } else {
                    println!("{:>8} {}", e.revision, shown(&e));
                }
            }
        }
    }
    Ok(())
}
