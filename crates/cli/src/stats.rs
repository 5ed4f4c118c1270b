//! `flotilla stats [--window 1h] [--by tenant|template|capability|model]`: the monitor's figures
//! over a rolling window — tasks, success and error rates, queue wait and time to completion,
//! tokens, model and tool calls, retries, escalations and approvals per task, and what a
//! successful task costs (failed attempts' spend included).

use anyhow::Context as _;
use flotilla_protocol::{StatsGroup, StatsReport, StatsRequest};

use crate::client::{connect, request};
use crate::{Cli, Failure};

#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// The rolling window, e.g. 15m, 1h, 24h.
    #[arg(long, default_value = "1h")]
    pub window: String,
    /// Group by tenant, template, capability or model (default: the whole fleet).
    #[arg(long, value_parser = ["tenant", "template", "capability", "model"])]
    pub by: Option<String>,
}

fn ms(v: Option<u64>) -> String {
    v.map_or_else(
        || "-".to_owned(),
        |ms| if ms >= 10_000 { format!("{:.0}s", ms as f64 / 1000.0) } else { format!("{ms}ms") },
    )
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |r| format!("{:.1}%", r * 100.0))
}

fn num(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |x| format!("{x:.1}"))
}

fn usd(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |x| format!("${x:.4}"))
}

fn block(g: &StatsGroup) -> String {
    format!(
        "{key}\n  tasks       submitted {} · completed {} · failed {} (cancelled {}) · rejected {}\n  \
         quality     success {} · errors {} · escalated {} · approved {} · retries/task {}\n  \
         time        queue wait p50 {} p95 {} · to completion p50 {} p95 {}\n  \
         resources   tokens/task in {} out {} · model calls/task {} · tool calls/task {}\n  \
         cost        ${:.4} total · {} per task · {} per successful task · {} successes per dollar\n",
        g.submitted,
        g.completed,
        g.failed,
        g.cancelled,
        g.rejected,
        pct(g.success_rate),
        pct(g.error_rate),
        pct(g.escalation_rate),
        pct(g.approval_rate),
        num(g.retries_per_task),
        ms(g.queue_wait_p50_ms),
        ms(g.queue_wait_p95_ms),
        ms(g.duration_p50_ms),
        ms(g.duration_p95_ms),
        num(g.input_tokens_per_task),
        num(g.output_tokens_per_task),
        num(g.model_calls_per_task),
        num(g.tool_calls_per_task),
        g.cost_usd,
        usd(g.cost_per_task_usd),
        usd(g.usd_per_success),
        g.successes_per_usd.map_or_else(|| "-".to_owned(), |x| format!("{x:.1}")),
        key = g.key,
    )
}

pub async fn run(cli: &Cli, args: &StatsArgs) -> Result<(), Failure> {
    let window = humantime::parse_duration(&args.window)
        .map_err(|e| Failure::new(2, anyhow::anyhow!("--window {:?}: {e}", args.window)))?;
    let fleet = connect(cli).await?;
    let req = StatsRequest {
        window_ms: Some(u64::try_from(window.as_millis()).unwrap_or(u64::MAX)),
        by: args.by.clone(),
    };
    let report: StatsReport = request(&fleet, fleet.names.monitor_stats(), "monitor", &req).await?;
    if let Some(e) = &report.error {
        return Err(Failure::new(crate::exit::UNAVAILABLE, anyhow::anyhow!("{} ({})", e.message, e.code)));
    }
    if cli.json {
        println!("{}", serde_json::to_string(&report).context("failed to render")?);
        return Ok(());
    }
    println!(
        "last {} by {} — monitor {}, {} events folded",
        args.window, report.by, report.monitor, report.events_seen
    );
    if report.groups.is_empty() {
        println!("no tasks in the window");
    }
    for g in &report.groups {
        println!("\n{}", block(g));
    }
    Ok(())
}
