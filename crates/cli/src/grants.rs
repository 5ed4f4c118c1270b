//! `flotilla grants allow|deny|list|remove` and `flotilla send`: who may message whom (the grants
//! bucket, which every router watches: a change applies within a second), and a message sent as a
//! client identity through the router, as any NATS client can.

use anyhow::Context as _;
use flotilla_protocol::{
    Address, Effect, Grant, GrantReply, GrantRequest, GrantScope, MessageSend, Priority, Selector, SendReply,
    codec, names::is_token, time::now_ms,
};
use futures::StreamExt as _;

use crate::client::{bucket, connect, request};
use crate::{Cli, Failure, exit};

#[derive(Debug, clap::Args)]
pub struct GrantsArgs {
    #[command(subcommand)]
    pub op: GrantsOp,
}

/// A selector: `*`, or comma-separated `agent:ID`, `template:NAME`, `capability:CAP`,
/// `tenant:T`, `client:NAME`.
#[derive(Debug, clap::Args)]
pub struct Rule {
    /// The rule's name (its key; `allow`/`deny` with an existing name replaces it).
    pub name: String,
    /// Senders it speaks of (a selector; default `*`).
    #[arg(long, default_value = "*")]
    pub from: String,
    /// Receivers it speaks of (a selector; default `*`); for memory, `namespace:NS`.
    #[arg(long, default_value = "*")]
    pub to: String,
    /// What it covers: `message`, `memory-read` or `memory-write`.
    #[arg(long, default_value = "message")]
    pub scope: String,
}

#[derive(Debug, clap::Subcommand)]
pub enum GrantsOp {
    /// Allow messages from `--from` to `--to`.
    Allow(Rule),
    /// Deny messages from `--from` to `--to`.
    Deny(Rule),
    /// List every grant.
    List,
    /// Remove a grant.
    Remove {
        /// The rule's name.
        name: String,
    },
}

fn usage(e: impl std::fmt::Display) -> Failure {
    Failure::new(2, anyhow::anyhow!("{e}"))
}

pub async fn run(cli: &Cli, args: &GrantsArgs) -> Result<(), Failure> {
    let fleet = connect(cli).await?;
    let store = bucket(&fleet, fleet.names.grants_bucket()).await?;
    match &args.op {
        GrantsOp::Allow(rule) | GrantsOp::Deny(rule) => {
            let effect = if matches!(args.op, GrantsOp::Allow(_)) { Effect::Allow } else { Effect::Deny };
            if !is_token(&rule.name) {
                return Err(usage("the rule's name must be 1-128 characters of A-Z a-z 0-9 _ -"));
            }
            let grant = Grant {
                name: rule.name.clone(),
                effect,
                scope: GrantScope::parse(&rule.scope)
                    .ok_or_else(|| usage("--scope is message, memory-read or memory-write"))?,
                from: Selector::parse(&rule.from).map_err(usage)?,
                to: Selector::parse(&rule.to).map_err(usage)?,
                created_at_ms: Some(now_ms()),
                created_by: None,
            };
            // Through the dispatcher, signed: it alone writes the grants, with who made them.
            let asked = GrantRequest { grant: Some(grant), remove: None };
            let grant = changed(&fleet, &asked).await?.grant.ok_or_else(|| {
                Failure::new(exit::UNAVAILABLE, anyhow::anyhow!("the dispatcher stored no grant"))
            })?;
            if cli.json {
                println!("{}", serde_json::to_string(&grant).context("failed to render")?);
            } else {
                println!("{}", line(&grant));
            }
        }
        GrantsOp::List => {
            let mut grants = Vec::new();
            for key in fleet.kv_keys(&store).await.context("failed to list the grants")? {
                if let Some(v) = store.get(&key).await.context("failed to read a grant")? {
                    match codec::decode::<Grant>(None, &v) {
                        Ok(g) => grants.push(g),
                        Err(e) => eprintln!("warning: grant {key} is unreadable (and not applied): {e}"),
                    }
                }
            }
            grants.sort_by(|a, b| a.name.cmp(&b.name));
            if cli.json {
                println!("{}", serde_json::to_string(&grants).context("failed to render")?);
            } else if grants.is_empty() {
                println!(
                    "no grants: agents of one tenant may message each other, messages across tenants are denied"
                );
            } else {
                for g in &grants {
                    println!("{}", line(g));
                }
            }
        }
        GrantsOp::Remove { name } => {
            changed(&fleet, &GrantRequest { grant: None, remove: Some(name.clone()) }).await?;
            if !cli.json {
                println!("removed {name}");
            }
        }
    }
    Ok(())
}

/// Asks the dispatcher for a grant change; its refusals map to exit codes.
async fn changed(fleet: &flotilla_service::Fleet, asked: &GrantRequest) -> Result<GrantReply, Failure> {
    let reply: GrantReply = request(fleet, fleet.names.dispatcher_grants(), "dispatcher", asked).await?;
    match &reply.error {
        None => Ok(reply),
        Some(e) => {
            let code = match e.code.as_str() {
                "not_found" => exit::NOT_FOUND,
                "invalid_request" | "malformed" => 2,
                _ => exit::UNAVAILABLE,
            };
            Err(Failure::new(code, anyhow::anyhow!("{} ({})", e.message, e.code)))
        }
    }
}

fn line(g: &Grant) -> String {
    let effect = match g.effect {
        Effect::Allow => "allow",
        Effect::Deny => "deny",
    };
    let scope = match g.scope {
        GrantScope::Message => "message",
        GrantScope::MemoryRead => "memory-read",
        GrantScope::MemoryWrite => "memory-write",
    };
    let by = g.created_by.as_deref().map(|b| format!(" (by {b})")).unwrap_or_default();
    format!("{:<24} {effect:<5} {scope:<12} {} -> {}{by}", g.name, g.from, g.to)
}

#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// Where: `agent:ID`, `template:NAME`, `capability:CAP`, or `broadcast:SELECTOR`.
    #[arg(long)]
    pub to: String,
    /// The message: JSON, or else text.
    pub body: String,
    /// The client identity to send as (default: the operator's name of a credential
    /// `operator-<name>.nk`, else `operator`). With authentication on, an operator may send as
    /// its own name only.
    #[arg(long = "as")]
    pub identity: Option<String>,
    /// The sender's tenant.
    #[arg(long)]
    pub tenant: Option<String>,
    /// 0-9 or critical, interactive, normal, batch.
    #[arg(long)]
    pub priority: Option<String>,
    /// How long it may wait for its receiver, e.g. `10m`.
    #[arg(long)]
    pub ttl: Option<humantime::Duration>,
    /// The task the message belongs to.
    #[arg(long)]
    pub task: Option<String>,
    /// Wait for the receiver's answer (for one agent, template or capability).
    #[arg(long)]
    pub wait: bool,
    /// How long `--wait` waits.
    #[arg(long, default_value = "60s")]
    pub timeout: humantime::Duration,
}

fn address(to: &str) -> Result<Address, Failure> {
    let (kind, rest) =
        to.split_once(':').ok_or_else(|| usage("--to is kind:value, e.g. agent:r1-writer-0"))?;
    let mut a = Address::default();
    match kind {
        "agent" => a.agent = Some(rest.to_owned()),
        "template" => a.template = Some(rest.to_owned()),
        "capability" => a.capability = Some(rest.to_owned()),
        "broadcast" => a.broadcast = Some(Selector::parse(rest).map_err(usage)?),
        other => {
            return Err(usage(format!("{other:?}: --to is agent:, template:, capability: or broadcast:")));
        }
    }
    Ok(a)
}

pub async fn send(cli: &Cli, args: &SendArgs) -> Result<(), Failure> {
    let identity =
        args.identity.clone().unwrap_or_else(|| cli.operator_name().unwrap_or_else(|| "operator".to_owned()));
    if !is_token(&identity) {
        return Err(usage("--as must be 1-128 characters of A-Z a-z 0-9 _ -"));
    }
    let priority = match &args.priority {
        Some(p) => Some(Priority::from_name(p).ok_or_else(|| usage("--priority is 0-9 or a class name"))?),
        None => None,
    };
    let to = address(&args.to)?;
    let wants_reply = args.wait && to.broadcast.is_none();
    let id = format!("cli{}", uuid::Uuid::now_v7().simple());
    let m = MessageSend {
        id: Some(id.clone()),
        from: None,
        to,
        task_id: args.task.clone(),
        tenant: args.tenant.clone(),
        priority,
        ttl_ms: args.ttl.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        wants_reply,
        in_reply_to: None,
        body: serde_json::from_str(&args.body)
            .unwrap_or_else(|_| serde_json::Value::String(args.body.clone())),
    };
    let fleet = connect(cli).await?;
    // Replies to this identity are stored on <p>.inbox.client.<name>, and published there live.
    let mut replies = if wants_reply {
        Some(
            fleet
                .client
                .subscribe(fleet.names.inbox_client(&identity))
                .await
                .context("failed to listen for the reply")?,
        )
    } else {
        None
    };
    let reply: SendReply =
        request(&fleet, fleet.names.msg_send_client(&identity), "message router", &m).await?;
    if let Some(e) = &reply.error {
        let code = match e.code.as_str() {
            "invalid_request" | "malformed" | "unknown_fields" => 2,
            c if c.starts_with("unknown_") || c == "no_receivers" => exit::NOT_FOUND,
            "unavailable" => exit::UNAVAILABLE,
            _ => exit::TASK_FAILED,
        };
        return Err(Failure::new(code, anyhow::anyhow!("{}: {}", e.code, e.message)));
    }
    if cli.json && replies.is_none() {
        println!("{}", serde_json::to_string(&reply).context("failed to render")?);
        return Ok(());
    }
    if !cli.json {
        for d in &reply.delivered {
            println!("delivered {} to {} (seq {})", reply.id, d.to, d.seq);
        }
        for r in &reply.refused {
            println!("refused for {}: {} {}", r.to, r.code, r.rule.as_deref().unwrap_or(""));
        }
    }
    let Some(replies) = replies.as_mut() else { return Ok(()) };
    let wait = async {
        while let Some(msg) = replies.next().await {
            if let Ok(e) = codec::decode::<flotilla_protocol::Envelope>(None, &msg.payload)
                && e.in_reply_to.as_deref() == Some(id.as_str())
            {
                return Some(e);
            }
        }
        None
    };
    match tokio::time::timeout(*args.timeout, wait).await {
        Ok(Some(e)) => {
            if cli.json {
                println!("{}", serde_json::to_string(&e).context("failed to render")?);
            } else {
                let text = e.body.get("text").cloned().unwrap_or(e.body.clone());
                println!(
                    "{}: {}",
                    e.from,
                    text.as_str().map(str::to_owned).unwrap_or_else(|| text.to_string())
                );
            }
            Ok(())
        }
        _ => Err(Failure::new(exit::TIMEOUT, anyhow::anyhow!("no reply within {}", args.timeout))),
    }
}
