//! `flotilla budget set|show|rate|price|ledger`: token budgets, shared rate limits and model
//! prices at runtime, through the budget-keeper's `<p>.budget.<op>`; and the ledger for audit.

use std::time::Duration;

use anyhow::Context as _;
use flotilla_protocol::{
    BudgetOperation, BudgetReply, BudgetStatus, CloseRequest, LedgerChange, LedgerEntry, PriceRequest,
    RateRequest, RateStatus, SetRequest, ShowRequest, codec,
};

use crate::client::{connect, request};
use crate::{Cli, Failure, exit};
use flotilla_service::Fleet;

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
    let ms = |d: &Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let reply = match &args.command {
        BudgetCommand::Set { scope, tokens, window, policy, warn_at } => {
            let req = SetRequest {
                scope: scope.clone(),
                limit_tokens: *tokens,
                window_ms: window.as_ref().map(ms),
                policy: Some(policy.clone()),
                warn_at: (!warn_at.is_empty()).then(|| warn_at.clone()),
            };
            ask(&fleet, &req).await?
        }
        BudgetCommand::Show { scope } => {
            ask(&fleet, &ShowRequest { scope: Some(scope.clone()), rate: None }).await?
        }
        BudgetCommand::Rate { key, rpm: None, tpm: None, window: None } => {
            ask(&fleet, &ShowRequest { scope: None, rate: Some(key.clone()) }).await?
        }
        BudgetCommand::Rate { key, rpm, tpm, window } => {
            let req =
                RateRequest { window_ms: window.as_ref().map(ms), rate: key.clone(), rpm: *rpm, tpm: *tpm };
            ask(&fleet, &req).await?
        }
        BudgetCommand::Ledger { .. } => return Ok(()),
        BudgetCommand::Price { model, input, output } => {
            let req = PriceRequest {
                model: model.clone(),
                input_usd_per_mtok: *input,
                output_usd_per_mtok: *output,
            };
            ask(&fleet, &req).await?
        }
    };
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

/// One request to the budget-keeper, on its operation's subject, waiting 10 s for the answer.
async fn ask<R: BudgetOperation>(fleet: &Fleet, req: &R) -> Result<BudgetReply, Failure> {
    request(fleet, fleet.names.budget_subject(R::OP.as_str()), "budget-keeper", req).await
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
        .create_consumer(pull::OrderedConfig {
            name: Some(flotilla_service::nats::ordered_name()),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
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

/// True when the entry is about `scope` (a budget or a rate limit key).
fn concerns(e: &LedgerEntry, scope: &str) -> bool {
    let is = |s: &String| s == scope;
    match &e.change {
        LedgerChange::Reserve(r) => r.scopes.iter().any(is) || r.rates.iter().any(is),
        LedgerChange::Carve(r) => is(&r.scope) || r.scopes.iter().any(is),
        LedgerChange::Set(SetRequest { scope: s, .. }) | LedgerChange::Close(CloseRequest { scope: s }) => {
            is(s)
        }
        LedgerChange::Rate(r) => is(&r.rate),
        LedgerChange::Backoff(r) => r.rates.iter().any(is),
        LedgerChange::Warning(ev) | LedgerChange::Exhausted(ev) | LedgerChange::Refilled(ev) => is(&ev.scope),
        LedgerChange::Commit(_)
        | LedgerChange::Release(_)
        | LedgerChange::Price(_)
        | LedgerChange::Expire(_) => false,
    }
}

/// What a change names, for its line.
#[derive(Default)]
struct Named<'a> {
    id: Option<&'a str>,
    /// The budget, rate limit or model it is about.
    about: Option<&'a str>,
    scopes: &'a [String],
    want: Option<u64>,
    used: Option<u64>,
    limit: Option<u64>,
    rpm: Option<u64>,
    tpm: Option<u64>,
    pause_ms: Option<u64>,
    /// The threshold a warning crossed.
    threshold: Option<u8>,
}

fn named(change: &LedgerChange) -> Named<'_> {
    match change {
        LedgerChange::Reserve(r) => {
            Named { id: Some(&r.id), scopes: &r.scopes, want: Some(r.want), ..Default::default() }
        }
        LedgerChange::Commit(r) => Named { id: Some(&r.id), used: Some(r.used), ..Default::default() },
        LedgerChange::Release(r) => Named { id: Some(&r.id), ..Default::default() },
        LedgerChange::Set(r) => {
            Named { about: Some(&r.scope), limit: Some(r.limit_tokens), ..Default::default() }
        }
        LedgerChange::Carve(r) => Named {
            id: Some(&r.id),
            about: Some(&r.scope),
            scopes: &r.scopes,
            want: Some(r.want),
            ..Default::default()
        },
        LedgerChange::Close(r) => Named { about: Some(&r.scope), ..Default::default() },
        LedgerChange::Rate(r) => Named { about: Some(&r.rate), rpm: r.rpm, tpm: r.tpm, ..Default::default() },
        LedgerChange::Backoff(r) => Named { pause_ms: Some(r.retry_after_ms), ..Default::default() },
        LedgerChange::Price(r) => Named { about: Some(&r.model), ..Default::default() },
        LedgerChange::Expire(r) => Named { id: Some(&r.id), ..Default::default() },
        LedgerChange::Warning(ev) => Named {
            about: Some(&ev.scope),
            threshold: ev.warn_at.as_ref().map(|w| w.first().copied().unwrap_or(0)),
            ..Default::default()
        },
        LedgerChange::Exhausted(ev) | LedgerChange::Refilled(ev) => {
            Named { about: Some(&ev.scope), ..Default::default() }
        }
    }
}

/// One line per entry: time, operation, what it concerns, what it came to.
fn ledger_line(e: &LedgerEntry) -> String {
    let n = named(&e.change);
    let a = &e.reply;
    let mut parts = vec![crate::output::clock(e.at_ms), format!("{:<9}", e.op().as_str())];
    parts.extend(n.id.map(str::to_owned));
    parts.extend(n.about.map(str::to_owned));
    if !n.scopes.is_empty() {
        parts.push(format!("[{}]", n.scopes.join(" ")));
    }
    let mut num = |k: &str, v: Option<u64>| {
        if let Some(v) = v {
            parts.push(format!("{k}={v}"));
        }
    };
    num("want", n.want);
    num("granted", a.tokens);
    num("used", n.used);
    num("charged", a.charged);
    num("over", a.over.filter(|o| *o > 0));
    num("limit", n.limit);
    num("rpm", n.rpm);
    num("tpm", n.tpm);
    num("pause_ms", n.pause_ms);
    if let Some(c) = a.cost_usd {
        parts.push(format!("cost=${c:.6}"));
    }
    if let Some(b) = &a.budget
        && matches!(
            e.change,
            LedgerChange::Warning(_) | LedgerChange::Exhausted(_) | LedgerChange::Refilled(_)
        )
    {
        parts.push(format!("used {} + held {} of {}", b.used, b.held, b.limit_tokens.unwrap_or(0)));
    }
    if let Some(t) = n.threshold {
        parts.push(format!("threshold {t}%"));
    }
    if let Some(actor) = &e.actor {
        parts.push(format!("by={actor}"));
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use flotilla_protocol::{
        BackoffRequest, BudgetEvent, CarveRequest, CommitRequest, Expiry, Priority, ReleaseRequest,
        ReserveRequest,
    };

    use super::*;

    const AT: u64 = 1_764_000_000_123;

    fn entry(change: LedgerChange, reply: BudgetReply) -> LedgerEntry {
        LedgerEntry { change, at_ms: AT, reply, actor: None }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    /// Entries of every kind with the lines (after the clock) and the scopes they concern, as the
    /// printer gave them when the ledger's requests were one flat type.
    fn cases() -> Vec<(LedgerEntry, &'static str, Vec<&'static str>)> {
        let grant = BudgetReply { tokens: Some(2300), expires_ms: Some(AT + 90_000), ..Default::default() };
        let status = BudgetStatus {
            scope: "tenant.acme".into(),
            limit_tokens: Some(5000),
            used: 4100,
            held: 300,
            ..Default::default()
        };
        let budget = BudgetReply { budget: Some(status), ..Default::default() };
        let acme = || BudgetEvent { scope: "tenant.acme".into(), warn_at: None };
        vec![
            (
                entry(
                    LedgerChange::Reserve(ReserveRequest {
                        id: "t1:1:7:0:0.0".into(),
                        scopes: strings(&["task.t1", "agent.r1-w-0", "tenant.acme", "model.m"]),
                        want: 2300,
                        min: Some(400),
                        lease_ms: Some(90_000),
                        limits: [("task.t1".to_owned(), 5000)].into(),
                        model: Some("m".into()),
                        rates: strings(&["openai/m", "key/OPENAI_API_KEY"]),
                        priority: Some(Priority::INTERACTIVE),
                    }),
                    grant.clone(),
                ),
                "reserve   t1:1:7:0:0.0 [task.t1 agent.r1-w-0 tenant.acme model.m] want=2300 granted=2300",
                vec!["tenant.acme", "openai/m", "task.t1"],
            ),
            (
                entry(
                    LedgerChange::Commit(CommitRequest {
                        id: "t1:1:7:0:0.0".into(),
                        used: 120,
                        prompt_tokens: Some(100),
                    }),
                    BudgetReply {
                        charged: Some(120),
                        over: Some(0),
                        cost_usd: Some(0.00018),
                        ..Default::default()
                    },
                ),
                "commit    t1:1:7:0:0.0 used=120 charged=120 cost=$0.000180",
                vec![],
            ),
            (
                entry(
                    LedgerChange::Release(ReleaseRequest { id: "t1:1:7:0:0.0".into() }),
                    BudgetReply::default(),
                ),
                "release   t1:1:7:0:0.0",
                vec![],
            ),
            (
                entry(
                    LedgerChange::Set(SetRequest {
                        scope: "agent.*".into(),
                        limit_tokens: 600,
                        window_ms: Some(6000),
                        policy: Some("wait".into()),
                        warn_at: Some(vec![50, 80]),
                    }),
                    budget.clone(),
                ),
                "set       agent.* limit=600",
                vec!["agent.*"],
            ),
            (
                entry(
                    LedgerChange::Carve(CarveRequest {
                        id: "carve:p-s1c0".into(),
                        scopes: strings(&["task.p"]),
                        want: 4000,
                        scope: "task.p-s1c0".into(),
                        ..Default::default()
                    }),
                    grant,
                ),
                "carve     carve:p-s1c0 task.p-s1c0 [task.p] want=4000 granted=2300",
                vec!["task.p", "task.p-s1c0"],
            ),
            (
                entry(LedgerChange::Close(CloseRequest { scope: "task.p-s1c0".into() }), budget.clone()),
                "close     task.p-s1c0",
                vec!["task.p-s1c0"],
            ),
            (
                entry(
                    LedgerChange::Rate(RateRequest {
                        window_ms: Some(60_000),
                        rate: "openai/m".into(),
                        rpm: Some(60),
                        tpm: Some(100_000),
                    }),
                    BudgetReply::default(),
                ),
                "rate      openai/m rpm=60 tpm=100000",
                vec!["openai/m"],
            ),
            (
                entry(
                    LedgerChange::Backoff(BackoffRequest {
                        rates: strings(&["openai/m", "key/OPENAI_API_KEY"]),
                        retry_after_ms: 2000,
                    }),
                    BudgetReply::default(),
                ),
                "backoff   pause_ms=2000",
                vec!["openai/m"],
            ),
            (
                entry(
                    LedgerChange::Price(PriceRequest {
                        model: "m".into(),
                        input_usd_per_mtok: 0.15,
                        output_usd_per_mtok: 0.6,
                    }),
                    BudgetReply::default(),
                ),
                "price     m",
                vec![],
            ),
            (
                entry(LedgerChange::Expire(Expiry { id: "w1-c0".into() }), BudgetReply::default()),
                "expire    w1-c0",
                vec![],
            ),
            (
                entry(
                    LedgerChange::Warning(BudgetEvent { warn_at: Some(vec![80]), ..acme() }),
                    budget.clone(),
                ),
                "warning   tenant.acme used 4100 + held 300 of 5000 threshold 80%",
                vec!["tenant.acme"],
            ),
            (
                entry(LedgerChange::Exhausted(acme()), budget.clone()),
                "exhausted tenant.acme used 4100 + held 300 of 5000",
                vec!["tenant.acme"],
            ),
            (
                entry(LedgerChange::Refilled(acme()), budget),
                "refilled  tenant.acme used 4100 + held 300 of 5000",
                vec!["tenant.acme"],
            ),
        ]
    }

    #[test]
    fn ledger_lines_and_scope_filters_read_as_they_always_have() {
        let scopes = ["tenant.acme", "task.p", "task.p-s1c0", "openai/m", "agent.*", "m", "task.t1"];
        for (e, line, concerned) in cases() {
            assert_eq!(ledger_line(&e), format!("{} {line}", crate::output::clock(AT)));
            let found: Vec<&str> = scopes.into_iter().filter(|s| concerns(&e, s)).collect();
            assert_eq!(found, concerned, "{line}");
        }
    }
}
