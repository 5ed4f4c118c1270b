//! `flotilla budget set|show`: token budgets at runtime, through the budget-keeper's
//! `<p>.budget.set` and `<p>.budget.show`.

use std::time::Duration;

use anyhow::Context as _;
use flotilla_protocol::{BudgetReply, BudgetRequest, BudgetStatus, WireFormat, codec};

use crate::client::connect;
use crate::{Cli, Failure, exit};

#[derive(Debug, clap::Args)]
pub struct BudgetArgs {
    #[command(subcommand)]
    pub command: BudgetCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum BudgetCommand {
    /// Set (or change) a scope's limit, e.g. `flotilla budget set tenant.acme 1000000 --window 24h`.
    Set {
        /// Scope: `task.<id>`, `agent.<id>`, `tenant.<name>`, `model.<name>`.
        scope: String,
        /// Limit in tokens.
        tokens: u64,
        /// Rolling window (e.g. `1h`, `24h`); without it the limit is over the scope's whole life.
        #[arg(long, value_parser = humantime::parse_duration)]
        window: Option<Duration>,
    },
    /// Show a scope's limit, usage, held tokens and what is left.
    Show {
        /// Scope.
        scope: String,
    },
}

pub async fn run(cli: &Cli, args: &BudgetArgs) -> Result<(), Failure> {
    let (client, _js, names) = connect(cli).await?;
    let (op, req) = match &args.command {
        BudgetCommand::Set { scope, tokens, window } => (
            "set",
            BudgetRequest {
                scope: Some(scope.clone()),
                limit_tokens: Some(*tokens),
                window_ms: window.map(|w| u64::try_from(w.as_millis()).unwrap_or(u64::MAX)),
                ..Default::default()
            },
        ),
        BudgetCommand::Show { scope } => {
            ("show", BudgetRequest { scope: Some(scope.clone()), ..Default::default() })
        }
    };
    let subject = names.budget_subject(op);
    let body = codec::encode(WireFormat::Msgpack, &req).context("failed to encode the request")?;
    let msg = tokio::time::timeout(Duration::from_secs(10), client.request(subject.clone(), body.into()))
        .await
        .map_err(|_| {
            Failure::new(exit::TIMEOUT, anyhow::anyhow!("the budget-keeper did not answer within 10 s"))
        })?
        .map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => {
                Failure::new(exit::UNAVAILABLE, anyhow::anyhow!("no budget-keeper answers on {subject}"))
            }
            _ => Failure::new(exit::UNAVAILABLE, anyhow::anyhow!("budget request failed: {e}")),
        })?;
    let reply: BudgetReply = codec::decode(None, &msg.payload).context("unreadable budget reply")?;
    if let Some(e) = reply.error {
        let code = if e.code == "unknown_scope" { exit::NOT_FOUND } else { exit::UNAVAILABLE };
        return Err(Failure::new(code, anyhow::anyhow!("{}: {}", e.code, e.message)));
    }
    let b = reply.budget.context("the budget-keeper sent no budget")?;
    if cli.json {
        println!("{}", serde_json::to_string(&b).context("failed to render")?);
    } else {
        print_budget(&b);
    }
    Ok(())
}

fn print_budget(b: &BudgetStatus) {
    let window = b.window_ms.map_or_else(
        || "over the scope's life".to_owned(),
        |ms| format!("per rolling {}", humantime::format_duration(Duration::from_millis(ms))),
    );
    println!("{}: limit {} tokens {window}", b.scope, b.limit_tokens);
    println!("  used {}, held by open reservations {}, available {}", b.used, b.held, b.available);
}
