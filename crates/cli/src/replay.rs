//! `flotilla replay <task>`: a task's whole story from the streams (or an export) — events,
//! assignment reasons, transcripts, messages, budget ledger entries, approvals, children with
//! `--tree` — as text, `--json` or `--jsonl`; `--follow` for a live task; `--rerun` to execute the
//! agent loop again against the recorded answers (or `--model URL`, a live model) and report the
//! first step where the decisions differ.

use std::path::PathBuf;

use anyhow::Context as _;
use flotilla_audit::history::{Stored, TaskHistory, is_final};
use flotilla_audit::rerun::{Report, RerunOptions};
use flotilla_audit::{Loader, Source, story};
use flotilla_protocol::{MessageEvent, TaskEvent, TranscriptEntry};
use futures::StreamExt as _;
use serde_json::json;

use crate::{Cli, Failure, exit};

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Task id.
    pub id: String,
    /// The delegation tree: the task's children (and theirs), each told under its parent.
    #[arg(long)]
    pub tree: bool,
    /// Keep telling a task that has not finished as it goes on, until it ends (or Ctrl-C).
    #[arg(long, conflicts_with_all = ["from", "rerun"])]
    pub follow: bool,
    /// One JSON object per record (JSON lines) instead of text.
    #[arg(long)]
    pub jsonl: bool,
    /// Read an export (`flotilla audit export`) instead of the live streams.
    #[arg(long)]
    pub from: Option<PathBuf>,
    /// Execute the task's agent loop again against its recorded model answers and tool results
    /// (no model call, no side effect) and compare every step's decisions.
    #[arg(long)]
    pub rerun: bool,
    /// With --rerun: ask this OpenAI-compatible server (its `…/v1` base URL) each step instead
    /// of taking the recorded answer, and report where its decisions differ.
    #[arg(long, requires = "rerun")]
    pub model: Option<String>,
    /// With --model: the model to ask (default: the recorded one).
    #[arg(long, requires = "model")]
    pub model_name: Option<String>,
    /// With --rerun: take the template from this fleet file instead of rebuilding it from the
    /// recording (to test a changed prompt or tool list against what was recorded).
    #[arg(long, requires = "rerun")]
    pub fleet: Option<PathBuf>,
    /// With --fleet: the template to use (default: the recorded one).
    #[arg(long, requires = "fleet")]
    pub template: Option<String>,
}

/// The source named by the flags: an export file, or the fleet.
pub async fn source(cli: &Cli, from: Option<&PathBuf>) -> Result<Source, Failure> {
    match from {
        Some(path) => flotilla_audit::export::load(path).map_err(|e| Failure::new(2, anyhow::anyhow!(e))),
        None => Ok(Source::Live(Box::new(crate::client::connect(cli).await?))),
    }
}

pub async fn run(cli: &Cli, args: &ReplayArgs) -> Result<(), Failure> {
    let source = source(cli, args.from.as_ref()).await?;
    let mut loader = Loader::new(source.clone());
    let history = loader.load(&args.id, args.tree).await.map_err(|e| Failure::new(exit::UNAVAILABLE, e))?;
    if history.is_empty() {
        let r#where = if args.from.is_some() { "in the export" } else { "in the streams" };
        return Err(Failure::new(
            exit::NOT_FOUND,
            anyhow::anyhow!("task {} has no record {where} (unknown, or past retention)", args.id),
        ));
    }
    let reports = if args.rerun { Some(rerun_tree(args, &history).await?) } else { None };
    if cli.json {
        let mut out = serde_json::to_value(&history).context("failed to render")?;
        if let (Some(o), Some(r)) = (out.as_object_mut(), &reports) {
            o.insert("reruns".into(), serde_json::to_value(r).context("failed to render")?);
        }
        println!("{out}");
    } else if args.jsonl {
        let mut out = String::new();
        story::jsonl(&history, &mut out);
        for r in reports.iter().flatten() {
            let mut v = serde_json::to_value(r).context("failed to render")?;
            if let Some(o) = v.as_object_mut() {
                o.insert("record_type".into(), json!("rerun"));
            }
            out.push_str(&v.to_string());
            out.push('\n');
        }
        print!("{out}");
    } else {
        let mut out = String::new();
        story::text(&history, &mut out);
        print!("{out}");
        if let Some(reports) = &reports {
            println!();
            for r in reports {
                print!("{}", rerun_text(r));
            }
        }
    }
    if args.follow && history.final_event().is_none() {
        follow(cli, &source, &history, args).await?;
    }
    match reports {
        Some(r) if r.iter().any(|r| !r.identical) => Err(Failure::new(
            exit::TASK_FAILED,
            anyhow::anyhow!(
                "{} of {} re-run(s) diverged",
                r.iter().filter(|r| !r.identical).count(),
                r.len()
            ),
        )),
        _ => Ok(()),
    }
}

async fn rerun_tree(args: &ReplayArgs, h: &TaskHistory) -> Result<Vec<Report>, Failure> {
    let opts = RerunOptions {
        model_url: args.model.clone(),
        model_name: args.model_name.clone(),
        fleet_file: args.fleet.clone(),
        template: args.template.clone(),
    };
    let (reports, skipped) =
        flotilla_audit::rerun::rerun_tree(h, &opts).await.map_err(|e| Failure::new(2, e))?;
    for id in skipped {
        eprintln!(
            "task {id}: nothing recorded to re-run (its template records no transcript, or retention removed it)"
        );
    }
    Ok(reports)
}

/// A re-run's report as text.
pub fn rerun_text(r: &Report) -> String {
    let mut s = format!(
        "re-run of {} (attempt {}, template {}): {} step(s) recorded, {} re-run, {} model call(s), {} tool result(s) from the recording, {} tool(s) run again\n",
        r.task_id,
        r.attempt,
        r.template,
        r.steps_recorded,
        r.steps_rerun,
        r.model_calls,
        r.tools_recorded,
        r.tools_executed
    );
    for n in &r.notes {
        s.push_str(&format!("  note: {n}\n"));
    }
    match &r.divergence {
        None => s.push_str("  identical: every step's decisions and the outcome are the recorded ones\n"),
        Some(d) => {
            let at = d.seq.map(|q| format!(" (transcripts#{q})")).unwrap_or_default();
            s.push_str(&format!("  DIVERGED at step {} in the {}{at}\n", d.step, d.what.replace('_', " ")));
            s.push_str(&format!("    recorded: {}\n", d.recorded));
            s.push_str(&format!("    re-run:   {}\n", d.rerun));
        }
    }
    s
}

/// Tells what the streams store for a live task from now on, until it ends.
async fn follow(cli: &Cli, source: &Source, h: &TaskHistory, args: &ReplayArgs) -> Result<(), Failure> {
    let Some(fleet) = source.fleet() else { return Ok(()) };
    let names = &fleet.names;
    let events_after =
        h.events.iter().map(|e| e.seq).chain(h.messages.iter().map(|m| m.seq)).max().unwrap_or(0);
    let transcripts_after = h.transcript.iter().map(|t| t.seq).max().unwrap_or(0);
    let events_stream = names.events_stream();
    let transcripts_stream = names.transcripts_stream();
    let mut events = flotilla_audit::source::follow(
        &fleet.js,
        &events_stream,
        &[names.task_events_of(&h.task_id), names.message_events_of(&h.task_id)],
        events_after,
    )
    .await
    .map_err(|e| Failure::new(exit::UNAVAILABLE, e))?;
    let mut transcripts = flotilla_audit::source::follow(
        &fleet.js,
        &transcripts_stream,
        &[names.task_transcripts(&h.task_id)],
        transcripts_after,
    )
    .await
    .map_err(|e| Failure::new(exit::UNAVAILABLE, e))?;
    let stop = flotilla_service::shutdown::wait_for_signal();
    tokio::pin!(stop);
    let message_prefix = format!("{}.events.message.", names.prefix());
    loop {
        let (stream, m) = tokio::select! {
            _ = &mut stop => return Ok(()),
            m = events.next() => (&events_stream, m),
            m = transcripts.next() => (&transcripts_stream, m),
        };
        let Some(m) = m else { return Ok(()) };
        let m = m.context("stream error while following")?;
        let (record, _) =
            flotilla_audit::source::record_of(stream, &m).map_err(|e| Failure::new(exit::UNAVAILABLE, e))?;
        let mut done = false;
        let line = if stream == &transcripts_stream {
            Stored::<TranscriptEntry>::of(&record).map(|t| {
                (story::Item::Transcript(&t).json(&h.task_id), story::line(&story::Item::Transcript(&t)))
            })
        } else if record.subject.starts_with(&message_prefix) {
            Stored::<MessageEvent>::of(&record)
                .map(|x| (story::Item::Message(&x).json(&h.task_id), story::line(&story::Item::Message(&x))))
        } else {
            Stored::<TaskEvent>::of(&record).map(|e| {
                done = is_final(&e.item.kind);
                (story::Item::Event(&e).json(&h.task_id), story::line(&story::Item::Event(&e)))
            })
        };
        if let Some((json, text)) = line {
            if cli.json || args.jsonl {
                println!("{json}");
            } else {
                let short = if stream == &transcripts_stream { "transcripts" } else { "events" };
                println!(
                    "  {}  {:<15} {text}",
                    story::clock(record.time_ms),
                    format!("{short}#{}", record.seq)
                );
            }
        }
        if done {
            return Ok(());
        }
    }
}
