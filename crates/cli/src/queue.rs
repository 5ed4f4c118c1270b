//! `flotilla queue`: the active dispatcher's queue by capability, priority and tenant, with
//! waiting times, the tenants' fair-share figures, and the longest-waiting tasks.

use std::time::Duration;

use anyhow::Context as _;
use flotilla_protocol::{QueueReport, codec};

use crate::client::connect;
use crate::{Cli, Failure, exit};

#[derive(Debug, clap::Args)]
pub struct QueueArgs {
    /// How many of the longest-waiting tasks to list.
    #[arg(long, default_value_t = 10)]
    pub limit: u32,
}

fn secs(ms: u64) -> String {
    if ms >= 60_000 {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    } else {
        format!("{:.1}s", ms as f64 / 1000.0)
    }
}

pub async fn run(cli: &Cli, args: &QueueArgs) -> Result<(), Failure> {
    let (client, _js, names) = connect(cli).await?;
    let body = serde_json::json!({ "limit": args.limit }).to_string();
    let msg =
        tokio::time::timeout(Duration::from_secs(10), client.request(names.dispatcher_queue(), body.into()))
            .await
            .map_err(|_| {
                Failure::new(exit::TIMEOUT, anyhow::anyhow!("the dispatcher did not answer within 10 s"))
            })?
            .map_err(|e| match e.kind() {
                async_nats::RequestErrorKind::NoResponders => Failure::new(
                    exit::UNAVAILABLE,
                    anyhow::anyhow!("no active dispatcher answers on {}", names.dispatcher_queue()),
                ),
                _ => Failure::new(exit::UNAVAILABLE, anyhow::anyhow!("queue request failed: {e}")),
            })?;
    let report: QueueReport = codec::decode(None, &msg.payload).context("unreadable queue report")?;
    if cli.json {
        println!("{}", serde_json::to_string(&report).context("failed to render")?);
        return Ok(());
    }
    println!(
        "{} queued ({} backing off before a retry), {} running — dispatcher {}",
        report.queued, report.backing_off, report.running, report.dispatcher
    );
    if !report.groups.is_empty() {
        println!("\n{:<24} {:>4} {:<16} {:>7} {:>9}", "CAPABILITY", "PRIO", "TENANT", "TASKS", "OLDEST");
        for g in &report.groups {
            println!(
                "{:<24} {:>4} {:<16} {:>7} {:>9}",
                g.capability,
                g.priority,
                g.tenant,
                g.tasks,
                secs(g.oldest_wait_ms)
            );
        }
    }
    if !report.tenants.is_empty() {
        println!("\n{:<16} {:>7} {:>14} {:>7} {:>8}", "TENANT", "WEIGHT", "VRUNTIME", "QUEUED", "RUNNING");
        for t in &report.tenants {
            println!(
                "{:<16} {:>7} {:>14.1} {:>7} {:>8}",
                t.tenant, t.weight, t.vruntime, t.queued, t.running
            );
        }
    }
    if !report.oldest.is_empty() {
        println!(
            "\n{:<40} {:<24} {:>4} {:<16} {:>9}",
            "LONGEST WAITING", "CAPABILITY", "PRIO", "TENANT", "WAIT"
        );
        for t in &report.oldest {
            println!(
                "{:<40} {:<24} {:>4} {:<16} {:>9}",
                t.task_id,
                t.capability,
                t.priority,
                t.tenant,
                secs(t.wait_ms)
            );
        }
    }
    Ok(())
}
