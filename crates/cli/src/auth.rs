//! `flotilla auth`: the fleet's identities and credentials (init, add-runner, add-submitter,
//! add-operator, add-auditor, revoke, list) and its accounts' resource limits (limits), kept in an auth directory whose `auth.conf` the
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
    /// Show or set the accounts' resource limits: every tenant's (each tenant's submitters are
    /// an account of their own), one tenant's (`--tenant`), or the fleet account's (`--fleet`,
    /// where the JetStream limits apply). No limit flag: print them.
    Limits(LimitsArgs),
    /// Publish every operator's signing key (and every revocation) into the fleet, where the
    /// services check control actions against them. Run as the admin
    /// (`--creds <dir>/creds/admin.nk`) after adding or revoking an operator.
    Sync,
}

#[derive(Debug, Args)]
pub struct LimitsArgs {
    /// One tenant's limits (what differs from every tenant's).
    #[arg(long, conflicts_with = "fleet")]
    pub tenant: Option<String>,
    /// The fleet account's limits (services, runners, operators, auditors; every stream).
    #[arg(long)]
    pub fleet: bool,
    /// Concurrent connections of the account.
    #[arg(long)]
    pub max_connections: Option<u64>,
    /// Concurrent subscriptions of the account.
    #[arg(long)]
    pub max_subscriptions: Option<u64>,
    /// Largest message a client of the account may publish (bytes, or e.g. 256KiB).
    #[arg(long, value_parser = parse_bytes)]
    pub max_payload: Option<u64>,
    /// JetStream file storage (`--fleet` only).
    #[arg(long, value_parser = parse_bytes, requires = "fleet")]
    pub max_file: Option<u64>,
    /// JetStream memory storage (`--fleet` only).
    #[arg(long, value_parser = parse_bytes, requires = "fleet")]
    pub max_mem: Option<u64>,
    /// JetStream streams (`--fleet` only).
    #[arg(long, requires = "fleet")]
    pub max_streams: Option<u64>,
    /// JetStream consumers (`--fleet` only).
    #[arg(long, requires = "fleet")]
    pub max_consumers: Option<u64>,
}

impl LimitsArgs {
    fn given(&self) -> flotilla_service::accounts::AccountLimits {
        flotilla_service::accounts::AccountLimits {
            max_connections: self.max_connections,
            max_subscriptions: self.max_subscriptions,
            max_payload: self.max_payload,
            max_mem: self.max_mem,
            max_file: self.max_file,
            max_streams: self.max_streams,
            max_consumers: self.max_consumers,
        }
    }
}

/// Bytes as a number or with a unit (`64KiB`, `1MiB`, `10GB`).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size (e.g. 65536, 64KiB, 1GiB)"))?;
    let k: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} (use KiB, MiB, GiB, KB, MB, GB)")),
    };
    n.checked_mul(k).ok_or_else(|| format!("{s:?} is too large"))
}

fn limits(dir: &Path, args: &LimitsArgs, json: bool) -> Result<bool, Failure> {
    let mut auth = AuthDir::open(dir).map_err(|e| Failure::new(2, e))?;
    let given = args.given();
    let changed = given != flotilla_service::accounts::AccountLimits::default();
    if changed {
        let mut l = auth.limits().clone();
        match (&args.tenant, args.fleet) {
            (_, true) => l.fleet = l.fleet.merged(&given),
            (Some(t), false) => {
                let own = l.tenants.get(t).cloned().unwrap_or_default().merged(&given);
                l.tenants.insert(t.clone(), own);
            }
            (None, false) => l.tenant = l.tenant.merged(&given),
        }
        auth.set_limits(l).map_err(|e| Failure::new(2, e))?;
    }
    let l = auth.limits();
    let shown = match (&args.tenant, args.fleet) {
        (_, true) => {
            serde_json::json!({ "account": flotilla_service::accounts::FLEET_ACCOUNT, "limits": l.fleet })
        }
        (Some(t), false) => serde_json::json!({ "tenant": t, "limits": l.of_tenant(t) }),
        (None, false) => serde_json::json!(l),
    };
    if json {
        println!("{shown}");
    } else {
        println!("{}", serde_json::to_string_pretty(&shown).unwrap_or_default());
    }
    Ok(changed)
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
        AuthCommand::Limits(l) => limits(dir, l, cli.json)?,
        AuthCommand::Sync => false,
    };
    if changed {
        match &args.reload_pid_file {
            Some(pid_file) => reload(pid_file).map_err(Failure::from)?,
            None if !matches!(args.command, AuthCommand::Init { .. }) => {
                eprintln!(
                    "reload the server to apply it: nats-server --signal reload[=<pid>] (twice when a tenant was added)"
                );
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
    // Twice, a moment apart: nats-server (2.15) binds the service imports of an account that a
    // reload added (a new tenant's) only at the next reload.
    for n in 0..2 {
        if n > 0 {
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        let status =
            std::process::Command::new("kill").args(["-HUP", pid]).status().context("failed to run kill")?;
        anyhow::ensure!(status.success(), "could not signal nats-server {pid}");
    }
    eprintln!("nats-server {pid} reloaded");
    Ok(())
}
