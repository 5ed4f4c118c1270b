//! `flotilla auth`: the fleet's identities and credentials (init, add-runner, add-submitter,
//! add-operator, add-auditor, revoke, list), kept in an auth directory whose `auth.conf` the
//! nats-server includes.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use flotilla_protocol::Prefix;
use flotilla_service::auth::{AuthDir, RoleSpec};

use crate::{Cli, Failure};

#[derive(Debug, Args)]
pub struct AuthArgs {
    /// The auth directory.
    #[arg(long, global = true, env = "FLOTILLA_AUTH_DIR", default_value = "flotilla-auth")]
    pub dir: PathBuf,
    /// After a change, send the nats-server whose pid is in this file a reload signal (SIGHUP),
    /// so the change applies to new and live connections at once.
    #[arg(long, global = true)]
    pub reload_pid_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: AuthCommand,
}

#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Create the auth directory: one identity per service (dispatcher, budget-keeper, monitor),
    /// an admin, and those asked for; writes `auth.conf` for the server.
    Init {
        /// Runners to create credentials for: `ID=TEMPLATE,TEMPLATE…` (the templates its fleet
        /// file hosts).
        #[arg(long = "runner", value_name = "ID=TEMPLATES")]
        runners: Vec<String>,
        /// Operators (names).
        #[arg(long = "operator", value_name = "NAME")]
        operators: Vec<String>,
        /// Submitters, one per tenant.
        #[arg(long = "submitter", value_name = "TENANT")]
        submitters: Vec<String>,
        /// Also an auditor (read-only) credential.
        #[arg(long)]
        auditor: bool,
        /// Do nothing when the directory already holds identities (for a deployment's start-up).
        #[arg(long)]
        if_missing: bool,
    },
    /// A runner's credential: it may consume only its own assignments and mailboxes.
    AddRunner {
        /// Runner id.
        id: String,
        /// Templates its fleet file hosts (their shared mailboxes and topic subscriptions).
        #[arg(long = "template", required = true)]
        templates: Vec<String>,
    },
    /// A submitter's credential: it may submit as the tenant and read that tenant's events.
    AddSubmitter {
        #[arg(long)]
        tenant: String,
        /// Identity name (default `submitter-<tenant>`).
        #[arg(long)]
        name: Option<String>,
    },
    /// An operator's credential: the CLI's control commands, attributed to NAME.
    AddOperator { name: String },
    /// An auditor's credential: read-only on every stream and bucket.
    AddAuditor { name: String },
    /// Revoke an identity: it is removed from the server's configuration (reload the server).
    Revoke { name: String },
    /// List the identities.
    List,
    /// Publish every operator's signing key (and every revocation) into the fleet, where the
    /// services check control actions against them. Run as the admin
    /// (`--creds <dir>/creds/admin.nk`) after adding or revoking an operator.
    Sync,
}

pub async fn run(cli: &Cli, args: &AuthArgs) -> Result<(), Failure> {
    if let AuthCommand::Sync = args.command {
        let auth = AuthDir::open(&args.dir).map_err(|e| Failure::new(2, e))?;
        let fleet = crate::client::connect(cli).await?;
        let store = crate::client::bucket(&fleet, fleet.names.operators_bucket()).await?;
        let n =
            auth.publish_operators(&fleet, &store).await.context("failed to publish the operators' keys")?;
        println!("published {n} operator key(s) to {}", fleet.names.operators_bucket());
        return Ok(());
    }
    run_offline(cli, args)
}

fn run_offline(cli: &Cli, args: &AuthArgs) -> Result<(), Failure> {
    let dir = &args.dir;
    let changed = match &args.command {
        AuthCommand::Init { if_missing: true, .. } if dir.join("identities.json").exists() => {
            eprintln!("{} already holds identities; nothing to do", dir.display());
            false
        }
        AuthCommand::Init { runners, operators, submitters, auditor, .. } => {
            let prefix = Prefix::new(cli.prefix.clone()).map_err(|e| Failure::new(2, e))?;
            let mut auth = AuthDir::init(dir, &prefix).map_err(|e| Failure::new(2, e))?;
            for r in runners {
                let (id, templates) = parse_runner(r).map_err(|e| Failure::new(2, e))?;
                add(&mut auth, &format!("runner-{id}"), RoleSpec::Runner { id, templates })?;
            }
            for name in operators {
                add(&mut auth, &format!("operator-{name}"), RoleSpec::Operator { name: name.clone() })?;
            }
            for tenant in submitters {
                add(
                    &mut auth,
                    &format!("submitter-{tenant}"),
                    RoleSpec::Submitter { tenant: tenant.clone() },
                )?;
            }
            if *auditor {
                add(&mut auth, "auditor", RoleSpec::Auditor)?;
            }
            print_summary(&auth, cli.json);
            println!(
                "server: include \"{}\" in the nats-server configuration",
                auth.server_conf_path().display()
            );
            true
        }
        AuthCommand::AddRunner { id, templates } => {
            let role = RoleSpec::Runner { id: id.clone(), templates: templates.clone() };
            change(dir, |a| add(a, &format!("runner-{id}"), role))?
        }
        AuthCommand::AddSubmitter { tenant, name } => {
            let name = name.clone().unwrap_or_else(|| format!("submitter-{tenant}"));
            change(dir, |a| add(a, &name, RoleSpec::Submitter { tenant: tenant.clone() }))?
        }
        AuthCommand::AddOperator { name } => {
            let changed = change(dir, |a| {
                add(a, &format!("operator-{name}"), RoleSpec::Operator { name: name.clone() })
            })?;
            eprintln!(
                "publish its key to the fleet: flotilla --creds <admin.nk> auth --dir {} sync",
                dir.display()
            );
            changed
        }
        AuthCommand::AddAuditor { name } => change(dir, |a| add(a, name, RoleSpec::Auditor))?,
        AuthCommand::Revoke { name } => change(dir, |a| {
            a.revoke(name).map_err(|e| Failure::new(crate::exit::NOT_FOUND, e))?;
            println!("revoked {name}");
            Ok(())
        })?,
        AuthCommand::List => {
            let auth = AuthDir::open(dir).map_err(|e| Failure::new(2, e))?;
            print_summary(&auth, cli.json);
            false
        }
        AuthCommand::Sync => false,
    };
    if changed {
        match &args.reload_pid_file {
            Some(pid_file) => reload(pid_file).map_err(Failure::from)?,
            None if !matches!(args.command, AuthCommand::Init { .. }) => {
                eprintln!("reload the server to apply it: nats-server --signal reload[=<pid>]");
            }
            None => {}
        }
    }
    Ok(())
}

fn change(dir: &Path, f: impl FnOnce(&mut AuthDir) -> Result<(), Failure>) -> Result<bool, Failure> {
    let mut auth = AuthDir::open(dir).map_err(|e| Failure::new(2, e))?;
    f(&mut auth)?;
    Ok(true)
}

fn add(auth: &mut AuthDir, name: &str, role: RoleSpec) -> Result<(), Failure> {
    let kind = role.kind();
    let path = auth.add(name, role).map_err(|e| Failure::new(2, e))?;
    println!("{kind} {name}: {}", path.display());
    Ok(())
}

fn parse_runner(s: &str) -> anyhow::Result<(String, Vec<String>)> {
    let (id, templates) =
        s.split_once('=').with_context(|| format!("expected ID=TEMPLATE[,TEMPLATE…], got {s:?}"))?;
    let templates: Vec<String> =
        templates.split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned).collect();
    anyhow::ensure!(!templates.is_empty(), "runner {id} needs at least one template");
    Ok((id.to_owned(), templates))
}

fn print_summary(auth: &AuthDir, json: bool) {
    if json {
        let list: Vec<_> = auth
            .identities()
            .iter()
            .map(|i| {
                serde_json::json!({
                    "name": i.name, "role": i.role, "public_key": i.public_key,
                    "inbox_prefix": i.inbox_prefix(), "revoked_ms": i.revoked_ms,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(list));
        return;
    }
    for i in auth.identities() {
        let state = if i.revoked_ms.is_some() { "revoked" } else { "active" };
        println!("{:<24} {:<14} {:<8} inbox {}", i.name, i.role.kind(), state, i.inbox_prefix());
    }
}

/// Sends SIGHUP (reload) to the process whose pid is in `pid_file`.
pub fn reload(pid_file: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(pid_file).with_context(|| format!("cannot read {}", pid_file.display()))?;
    let pid = text.trim();
    anyhow::ensure!(
        pid.chars().all(|c| c.is_ascii_digit()) && !pid.is_empty(),
        "no pid in {}",
        pid_file.display()
    );
    let status =
        std::process::Command::new("kill").args(["-HUP", pid]).status().context("failed to run kill")?;
    anyhow::ensure!(status.success(), "could not signal nats-server {pid}");
    eprintln!("nats-server {pid} reloaded");
    Ok(())
}
