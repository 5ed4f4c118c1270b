//! `flotilla budget set|show|rate|price|ledger`: token budgets, shared rate limits and model
//! prices at runtime, through the budget-keeper's `<p>.budget.<op>`; and the ledger for audit.

use std::time::Duration;

use anyhow::Context as _;
use flotilla_protocol::{
    BudgetReply, BudgetRequest, BudgetStatus, LedgerEntry, RateStatus, WireFormat, codec,
};

use crate::client::connect;
use crate::{Cli, Failure, exit};

#[derive(Debug, clap::Args)]
pub struct BudgetArgs {
    #[command(subcommand)]
    pub command: BudgetCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum BudgetCommand {
    /// Set (or change) a scope's limit, e.g. `flotilla budget set tenant.acme 1000000 --window 24h`,
    /// or the default of a whole class: `flotilla budget set 'agent.*' 50000 --window 1h --policy wait`.
    Set {
        /// Scope: `task.<id>`, `agent.<id>`, `tenant.<name>`, `model.<name>`, or `<class>.*`.
        scope: String,
        /// Limit in tokens.
        tokens: u64,
        /// Rolling window (e.g. `1h`, `24h`); without it the limit is over the scope's whole life.
        #[arg(long, value_parser = humantime::parse_duration)]
        window: Option<Duration>,
        /// What a call the budget cannot take does: `fail` (the task fails with
        /// `budget_exceeded`) or `wait` (until the window has rolled far enough).
        #[arg(long, default_value = "fail", value_parser = ["fail", "wait"])]
        policy: String,
        /// Percentages of the limit at which a `warning` is recorded (repeatable; default 80).
        #[arg(long = "warn-at", value_parser = clap::value_parser!(u8).range(1..=100))]
        warn_at: Vec<u8>,
    },
    /// Show a scope's limit, usage, held tokens, what is left and what it cost.
    Show {
        /// Scope.
        scope: String,
    },
    /// Set a shared rate limit, e.g. `flotilla budget rate openai/gpt-4o-mini --rpm 500 --tpm 200000`
    /// (keys: `<provider>/<model>` and `key/<api key env>` by default, see the fleet file's
    /// `rate_limits`); without limits, show it.
    Rate {
        /// Rate limit key.
        key: String,
        /// Requests per window.
        #[arg(long)]
        rpm: Option<u64>,
        /// Tokens per window.
        #[arg(long)]
        tpm: Option<u64>,
        /// The window (default one minute).
        #[arg(long, value_parser = humantime::parse_duration)]
        window: Option<Duration>,
    },
    /// The budget ledger, for audit: every change (reservations, commits, releases, expiries,
    /// limits, carves, rates, prices) and every budget event (warnings, exhaustion, refills), in
    /// the order the budget-keeper decided them, from the start to now (`--follow`: and on).
    Ledger {
        /// Only entries about this scope (or this rate limit key).
        #[arg(long)]
        scope: Option<String>,
        /// Keep printing new entries.
        #[arg(long)]
        follow: bool,
    },
    /// Set a model's price in US dollars per million tokens, e.g.
    /// `flotilla budget price gpt-4o-mini --input 0.15 --output 0.60`.
    Price {
        model: String,
        #[arg(long)]
        input: f64,
        #[arg(long)]
        output: f64,
    },
}

pub async fn run(cli: &Cli, args: &BudgetArgs) -> Result<(), Failure> {
    if let BudgetCommand::Ledger { scope, follow } = &args.command {
        return ledger(cli, scope.as_deref(), *follow).await;
    }
    let fleet = connect(cli).await?;
    let (client, names) = (&fleet.client, &fleet.names);
    let ms = |d: &Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let (op, req) = match &args.command {
        BudgetCommand::Set { scope, tokens, window, policy, warn_at } => (
            "set",
            BudgetRequest {
                scope: Some(scope.clone()),
                limit_tokens: Some(*tokens),
                window_ms: window.as_ref().map(ms),
                policy: Some(policy.clone()),
                warn_at: (!warn_at.is_empty()).then(|| warn_at.clone()),
                ..Default::default()
            },
        ),
        BudgetCommand::Show { scope } => {
            ("show", BudgetRequest { scope: Some(scope.clone()), ..Default::default() })
        }
        BudgetCommand::Rate { key, rpm: None, tpm: None, window: None } => {
            ("show", BudgetRequest { rate: Some(key.clone()), ..Default::default() })
        }
        BudgetCommand::Rate { key, rpm, tpm, window } => (
            "rate",
            BudgetRequest {
                rate: Some(key.clone()),
                rpm: *rpm,
                tpm: *tpm,
                window_ms: window.as_ref().map(ms),
                ..Default::default()
            },
        ),
        BudgetCommand::Ledger { .. } => return Ok(()),
        BudgetCommand::Price { model, input, output } => (
            "price",
            BudgetRequest {
                model: Some(model.clone()),
                input_usd_per_mtok: Some(*input),
                output_usd_per_mtok: Some(*output),
                ..Default::default()
            },
        ),
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
    if cli.json {
        let v = match (&reply.budget, &reply.rate) {
            (Some(b), _) => serde_json::to_value(b),
            (None, Some(r)) => serde_json::to_value(r),
            (None, None) => Ok(serde_json::json!({ "ok": true })),
        };
        println!("{}", serde_json::to_string(&v.context("failed to render")?).context("failed to render")?);
        return Ok(());
    }
    match (&reply.budget, &reply.rate, &args.command) {
        (Some(b), _, _) => print_budget(b),
        (None, Some(r), _) => print_rate(r),
        (None, None, BudgetCommand::Price { model, input, output }) => {
            println!("{model}: ${input} per million input tokens, ${output} per million output tokens");
        }
        _ => println!("ok"),
    }
    Ok(())
}

fn print_budget(b: &BudgetStatus) {
    let window = b.window_ms.map_or_else(
        || "over the scope's life".to_owned(),
        |ms| format!("per rolling {}", humantime::format_duration(Duration::from_millis(ms))),
    );
    match b.limit_tokens {
        Some(limit) => println!("{}: limit {limit} tokens {window}, policy {}", b.scope, b.policy),
        None => println!("{}: no limit (counted only)", b.scope),
    }
    let available = b.available.map_or_else(|| "unlimited".to_owned(), |a| a.to_string());
    println!("  used {}, held by open reservations {}, available {available}", b.used, b.held);
    println!("  cost ${:.6}", b.cost_usd);
    if !b.warn_at.is_empty() {
        let w: Vec<String> = b.warn_at.iter().map(|p| format!("{p} %")).collect();
        println!("  warnings at {}", w.join(", "));
    }
    if let Some(at) = b.closed_at_ms {
        println!("  closed at {at} (epoch ms)");
    }
    if let Some(c) = &b.carved_by {
        println!("  carved out of its parent by {c}");
    }
}

fn print_rate(r: &RateStatus) {
    let per = humantime::format_duration(Duration::from_millis(r.window_ms));
    let lim = |v: Option<u64>| v.map_or_else(|| "no limit".to_owned(), |v| v.to_string());
    println!("{}: {} requests and {} tokens per {per}", r.rate, lim(r.rpm), lim(r.tpm));
    println!("  in the window: {} requests, {} tokens; {} waiting", r.requests, r.tokens, r.waiting);
    if let Some(until) = r.blocked_until_ms {
        println!("  held back by a provider's 429 until {until} (epoch ms)");
    }
}

/// Prints the ledger stream's entries (see [`BudgetCommand::Ledger`]).
async fn ledger(cli: &Cli, scope: Option<&str>, follow: bool) -> Result<(), Failure> {
    use async_nats::jetstream::consumer::{DeliverPolicy, pull};
    use futures::StreamExt as _;
    let fleet = connect(cli).await?;
    let (js, names) = (&fleet.js, &fleet.names);
    let mut stream = js.get_stream(names.ledger_stream()).await.map_err(|e| {
        Failure::new(exit::NOT_FOUND, anyhow::anyhow!("no ledger stream {}: {e}", names.ledger_stream()))
    })?;
    let last = stream.info().await.context("failed to read the ledger stream")?.state.last_sequence;
    if last == 0 && !follow {
        return Ok(());
    }
    let mut msgs = stream
        .create_consumer(pull::OrderedConfig { deliver_policy: DeliverPolicy::All, ..Default::default() })
        .await
        .context("failed to read the ledger")?
        .messages()
        .await
        .context("failed to read the ledger")?;
    let stop = flotilla_service::shutdown::wait_for_signal();
    tokio::pin!(stop);
    loop {
        let msg = tokio::select! {
            _ = &mut stop => return Ok(()),
            m = msgs.next() => match m {
                None => return Ok(()),
                Some(m) => m.context("ledger stream error")?,
            },
        };
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        match codec::decode::<LedgerEntry>(None, &msg.payload) {
            Ok(e) if scope.is_none_or(|s| concerns(&e, s)) => {
                if cli.json {
                    println!("{}", serde_json::to_string(&e).context("failed to render")?);
                } else {
                    println!("{:>8} {}", seq, ledger_line(&e));
                }
            }
            Ok(_) => {}
            Err(e) => eprintln!("entry {seq} is unreadable: {e}"),
        }
        if !follow && seq >= last {
            return Ok(());
        }
    }
}

fn concerns(e: &LedgerEntry, scope: &str) -> bool {
    let r = &e.request;
    r.scope.as_deref() == Some(scope)
        || r.rate.as_deref() == Some(scope)
        || r.scopes.iter().any(|s| s == scope)
        || r.rates.iter().any(|s| s == scope)
}

/// One line per entry: time, operation, what it concerns, what it came to.
fn ledger_line(e: &LedgerEntry) -> String {
    let r = &e.request;
    let a = &e.reply;
    let mut parts = vec![crate::output::clock(e.at_ms), format!("{:<9}", e.op)];
    if let Some(id) = &r.id {
        parts.push(id.clone());
    }
    if let Some(s) = r.scope.as_ref().or(r.rate.as_ref()).or(r.model.as_ref().filter(|_| e.op == "price")) {
        parts.push(s.clone());
    }
    if !r.scopes.is_empty() {
        parts.push(format!("[{}]", r.scopes.join(" ")));
    }
    let mut num = |k: &str, v: Option<u64>| {
        if let Some(v) = v {
            parts.push(format!("{k}={v}"));
        }
    };
    num("want", r.want);
    num("granted", a.tokens);
    num("used", r.used);
    num("charged", a.charged);
    num("over", a.over.filter(|o| *o > 0));
    num("limit", r.limit_tokens);
    num("rpm", r.rpm);
    num("tpm", r.tpm);
    num("pause_ms", r.retry_after_ms);
    if let Some(c) = a.cost_usd {
        parts.push(format!("cost=${c:.6}"));
    }
    if let Some(b) = &a.budget
        && matches!(e.op.as_str(), "warning" | "exhausted" | "refilled")
    {
        parts.push(format!("used {} + held {} of {}", b.used, b.held, b.limit_tokens.unwrap_or(0)));
    }
    if let Some(w) = r.warn_at.as_ref().filter(|_| e.op == "warning") {
        parts.push(format!("threshold {}%", w.first().copied().unwrap_or(0)));
    }
    parts.join(" ")
}
