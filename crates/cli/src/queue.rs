//! `flotilla queue`: the active dispatcher's queue by capability, priority and tenant, with
//! waiting times, the tenants' fair-share figures, and the longest-waiting tasks.

use anyhow::Context as _;
use flotilla_protocol::{QueueReport, QueueRequest};

use crate::client::{connect, request};
use crate::{Cli, Failure};

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
    let fleet = connect(cli).await?;
    let req = QueueRequest { limit: Some(args.limit) };
    let report: QueueReport =
        request(&fleet, fleet.names.dispatcher_queue(), "active dispatcher", &req).await?;
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
