//! `flotilla audit`: `verify` the fleet's history (records, ledger, lifecycle rules, streams) or
//! an export's hash chain, and `export` the audited streams as tamper-evident JSON lines.

use std::path::PathBuf;

use anyhow::Context as _;
use flotilla_audit::export::{self, Selection};
use flotilla_audit::verify::{self, Options, Summary};
use flotilla_audit::{Source, Window};

use crate::{Cli, Failure, exit};

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: AuditCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Rebuild every task from the events and check it against its record, the lifecycle rules
    /// and the ledger; replay the ledger and compare the budgets with the live keeper's; check
    /// the streams for gaps and deletes. With --export, check an export's hash chain instead.
    /// Exits 1 on any discrepancy.
    Verify(VerifyArgs),
    /// Write the audited streams (events, transcripts, ledger, dead letters) as JSON lines with a
    /// hash chain, signed when a key is given.
    Export(ExportArgs),
    /// The fleet as it was at a time, from the streams: agents, queued and running tasks,
    /// budgets (and a warning when retention no longer reaches back that far).
    State(StateArgs),
}

#[derive(Debug, clap::Args)]
pub struct StateArgs {
    /// The time (RFC 3339, ms since the epoch, or a duration ago such as `10m`).
    #[arg(long, value_parser = parse_time)]
    pub at: u64,
    /// Read an export instead of the live streams.
    #[arg(long)]
    pub from: Option<PathBuf>,
}

/// Which part of the history: a time window and a tenant.
#[derive(Debug, clap::Args)]
pub struct Scope {
    /// Since this time (RFC 3339, ms since the epoch, or a duration ago such as `2h`): tasks
    /// accepted then (verify), records stored then (export).
    #[arg(long, value_parser = parse_time)]
    pub since: Option<u64>,
    /// Until this time.
    #[arg(long, value_parser = parse_time)]
    pub until: Option<u64>,
    /// Only this tenant's tasks (their events, transcripts and ledger entries).
    #[arg(long)]
    pub tenant: Option<String>,
}

impl Scope {
    fn window(&self) -> Window {
        Window { since_ms: self.since, until_ms: self.until }
    }
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub scope: Scope,
    /// Check this export file: its hash chain and signature, and (unless --chain-only) the
    /// history it holds.
    #[arg(long)]
    pub export: Option<PathBuf>,
    /// With --export: the public key (nkey) that must have signed it.
    #[arg(long, requires = "export")]
    pub signer: Option<String>,
    /// With --export: check the chain only.
    #[arg(long, requires = "export")]
    pub chain_only: bool,
    /// Tasks with anything stored this recently are in flight and not compared with their
    /// records yet.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub settle: std::time::Duration,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub scope: Scope,
    /// The file to write (`-`: standard output).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Sign the chain with this seed file's key (an operator's or auditor's, as `flotilla auth`
    /// writes them).
    #[arg(long)]
    pub sign_with: Option<PathBuf>,
}

/// A time as ms since the epoch: RFC 3339, ms since the epoch, or a duration before now.
pub fn parse_time(s: &str) -> Result<u64, String> {
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .map_err(|e| e.to_string());
    }
    match humantime::parse_duration(s) {
        Ok(d) => Ok(flotilla_protocol::time::now_ms()
            .saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))),
        Err(_) => Err(format!("{s:?} is neither a time (2026-12-03T14:00:00Z) nor a duration ago (2h)")),
    }
}

pub async fn run(cli: &Cli, args: &AuditArgs) -> Result<(), Failure> {
    match &args.command {
        AuditCommand::Verify(v) => verify_cmd(cli, v).await,
        AuditCommand::Export(e) => export_cmd(cli, e).await,
        AuditCommand::State(a) => state_cmd(cli, a).await,
    }
}

async fn state_cmd(cli: &Cli, args: &StateArgs) -> Result<(), Failure> {
    let source = crate::replay::source(cli, args.from.as_ref()).await?;
    let state = flotilla_audit::state::state_at(&source, args.at)
        .await
        .map_err(|e| Failure::new(exit::UNAVAILABLE, e))?;
    if cli.json {
        println!("{}", serde_json::to_string(&state).context("failed to render")?);
    } else {
        print!("{}", flotilla_audit::state::text(&state));
    }
    Ok(())
}

async fn verify_cmd(cli: &Cli, args: &VerifyArgs) -> Result<(), Failure> {
    let mut partial_ledger = false;
    let source = match &args.export {
        Some(path) => {
            let checked = export::verify(path, args.signer.as_deref()).map_err(|e| Failure::new(2, e))?;
            match checked {
                Err(broken) => {
                    if cli.json {
                        println!("{}", serde_json::json!({ "verified": false, "broken": broken }));
                    } else {
                        println!("{}: does NOT verify at {broken}", path.display());
                    }
                    return Err(Failure::new(
                        exit::TASK_FAILED,
                        anyhow::anyhow!("the export does not verify"),
                    ));
                }
                Ok(v) => {
                    if !cli.json {
                        let signed = v
                            .signer
                            .as_ref()
                            .map(|s| format!(", signed by {s}"))
                            .unwrap_or_else(|| {
                            ", unsigned (whoever could write the file could have rebuilt the chain: sign exports with --sign-with and check them with --signer)".into()
                        });
                        println!("{}: hash chain verifies: {} records{signed}", path.display(), v.records);
                    }
                    // An export of a window or a tenant holds part of the ledger.
                    partial_ledger = v.header.since_ms.is_some() || v.header.tenant.is_some();
                    if args.chain_only {
                        if cli.json {
                            println!(
                                "{}",
                                serde_json::json!({ "verified": true, "records": v.records, "signer": v.signer })
                            );
                        }
                        return Ok(());
                    }
                }
            }
            flotilla_audit::export::load(path).map_err(|e| Failure::new(2, e))?
        }
        None => Source::Live(Box::new(crate::client::connect(cli).await?)),
    };
    let opts = Options {
        window: args.scope.window(),
        tenant: args.scope.tenant.clone(),
        settle_ms: u64::try_from(args.settle.as_millis()).unwrap_or(u64::MAX),
        compare_keeper: source.fleet().is_some(),
        partial_ledger,
    };
    let summary = verify::verify(&source, &opts).await.map_err(|e| Failure::new(exit::UNAVAILABLE, e))?;
    if cli.json {
        println!("{}", serde_json::to_string(&summary).context("failed to render")?);
    } else {
        print!("{}", summary_text(&summary));
    }
    if summary.discrepancies.is_empty() {
        Ok(())
    } else {
        Err(Failure::new(exit::TASK_FAILED, anyhow::anyhow!("{} discrepancies", summary.discrepancies.len())))
    }
}

/// A verification's summary and findings as text.
pub fn summary_text(s: &Summary) -> String {
    let mut out = format!(
        "verified {} task(s) ({} finished, {} in flight, {} whose record has expired) from {} events, {} transcript entries and {} ledger entries; {} budget scope(s) compared with the keeper; in {:.2} s\n",
        s.tasks,
        s.finished,
        s.in_flight,
        s.records_gone,
        s.events,
        s.transcript_entries,
        s.ledger_entries,
        s.scopes_compared,
        s.took_ms as f64 / 1000.0
    );
    if s.interrupted_charges > 0 {
        out.push_str(&format!(
            "note: {} tokens were charged for interrupted calls (cancels, deadlines, lost runners) that no task reports\n",
            s.interrupted_charges
        ));
    }
    if s.discrepancies.is_empty() {
        out.push_str("0 discrepancies\n");
    } else {
        out.push_str(&format!("{} discrepancies:\n", s.discrepancies.len()));
        for d in &s.discrepancies {
            let task = d.task.as_ref().map(|t| format!(" task {t}")).unwrap_or_default();
            let at = d.at.as_ref().map(|a| format!(" at {a}")).unwrap_or_default();
            out.push_str(&format!("  [{}]{task}{at}: {}\n", d.kind, d.detail));
        }
    }
    out
}

async fn export_cmd(cli: &Cli, args: &ExportArgs) -> Result<(), Failure> {
    let source = Source::Live(Box::new(crate::client::connect(cli).await?));
    let key = match &args.sign_with {
        Some(p) => Some(
            flotilla_service::auth::Credentials::load(p)
                .and_then(|c| c.key_pair())
                .map_err(|e| Failure::new(2, anyhow::anyhow!("{}: {e}", p.display())))?,
        ),
        None => None,
    };
    let sel = Selection { window: args.scope.window(), tenant: args.scope.tenant.clone() };
    let to_stdout = args.out.as_os_str() == "-";
    let progress = |stream: &str, n: usize| {
        if !to_stdout {
            eprintln!("  {stream}: {n} records");
        }
    };
    let n = if to_stdout {
        let out = std::io::BufWriter::new(std::io::stdout().lock());
        export::export(&source, &sel, out, key.as_ref(), progress).await
    } else {
        // Written next to the target and renamed, so a failed export leaves no half file.
        let dir =
            args.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        let tmp = tempfile::NamedTempFile::new_in(dir).context("failed to create the export file")?;
        let out =
            std::io::BufWriter::new(tmp.as_file().try_clone().context("failed to open the export file")?);
        let n = export::export(&source, &sel, out, key.as_ref(), progress).await;
        if n.is_ok() {
            tmp.persist(&args.out).with_context(|| format!("failed to write {}", args.out.display()))?;
        }
        n
    }
    .map_err(|e| Failure::new(exit::UNAVAILABLE, e))?;
    if !to_stdout {
        if cli.json {
            println!("{}", serde_json::json!({ "records": n, "file": args.out }));
        } else {
            println!("wrote {n} records to {}", args.out.display());
        }
    }
    Ok(())
}
