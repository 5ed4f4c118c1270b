//! `flotilla-bench budget`: reservations per second of the budget-keeper (in this process, on
//! its own connection) on one hot budget and spread over 1,000 budgets, next to raw KV
//! compare-and-swap on the same server in the same run: sequential (one key, each update awaited
//! before the next) and concurrent (1,000 keys, as many updates in flight as reservations).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use flotilla_local::ServerConfig;
use flotilla_protocol::{
    BudgetReply, CommitRequest, LedgerChange, LedgerEntry, Names, ReserveRequest, SetRequest, ShowRequest,
    WireFormat, codec,
};
use flotilla_service::budget::Client;
use flotilla_service::{Fleet, Mode, nats};
use futures::{StreamExt as _, TryStreamExt as _};
use serde_json::json;
use tokio::task::JoinHandle;

use crate::figures::{goal, percentile, progress, round, thousands};
use crate::{Cli, Usage, profile};

/// The project's goals: the hot budget at least the raw sequential compare-and-swap rate, the
/// 1,000 budgets at least half the raw concurrent one.
const GOAL_HOT_VS_SEQUENTIAL: f64 = 1.0;
const GOAL_SPREAD_VS_CONCURRENT: f64 = 0.5;
/// Budgets of the spread measurement (and keys of the concurrent compare-and-swap).
const BUDGETS: usize = 1000;
/// Client connections the reservers (and the concurrent compare-and-swap) share.
const CONNECTIONS: usize = 4;
/// Tokens each reservation asks for, and what a cycle's commit says it used.
const WANT: u64 = 100;
const USED: u64 = 60;
/// Limits large enough that no reservation of a run is refused.
const LIMIT: u64 = 1_000_000_000_000;
/// Longer than any run, so that no lease runs out (and writes an `expire`) while measuring.
const LEASE_MS: u64 = 30 * 60 * 1000;
const HOT: &str = "tenant.hot";

/// Sizes of one run.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Reservations of each reserve-only phase (and compare-and-swaps of the concurrent
    /// baseline); the reserve + commit phases run half as many cycles, the sequential
    /// compare-and-swap a quarter as many updates.
    pub reservations: usize,
    /// Requests (or updates) in flight.
    pub in_flight: usize,
}

/// One measured phase: operations, their rate, and the latency of each.
#[derive(Debug, Clone, Copy, Default)]
struct Rate {
    ops: usize,
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

impl Rate {
    fn of(ops: usize, wall: Duration, mut latencies_ms: Vec<f64>) -> Self {
        latencies_ms.sort_by(f64::total_cmp);
        Self {
            ops,
            per_s: ops as f64 / wall.as_secs_f64().max(1e-9),
            p50_ms: percentile(&latencies_ms, 0.5),
            p99_ms: percentile(&latencies_ms, 0.99),
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "ops": self.ops,
            "per_s": round(self.per_s, 0),
            "p50_ms": round(self.p50_ms, 2),
            "p99_ms": round(self.p99_ms, 2),
        })
    }
}

/// A budget phase: its rate, and what the keeper did meanwhile.
#[derive(Debug, Clone, Default)]
struct Phase {
    rate: Rate,
    /// Entries the keeper wrote to the ledger stream per operation.
    ledger_writes_per_op: f64,
    /// The keeper's rounds (a batch decided, written in one go and answered) in the phase.
    rounds: usize,
    round_wall_p50_ms: f64,
    round_busy_p50_ms: f64,
}

impl Phase {
    fn batch(&self, requests_per_op: usize) -> f64 {
        (self.rate.ops * requests_per_op) as f64 / self.rounds.max(1) as f64
    }

    fn json(&self, requests_per_op: usize) -> serde_json::Value {
        let mut v = self.rate.json();
        if let Some(o) = v.as_object_mut() {
            o.insert("ledger_writes_per_op".into(), json!(round(self.ledger_writes_per_op, 2)));
            o.insert("keeper_rounds".into(), json!(self.rounds));
            o.insert("requests_per_round".into(), json!(round(self.batch(requests_per_op), 1)));
            o.insert("round_wall_p50_ms".into(), json!(round(self.round_wall_p50_ms, 2)));
            o.insert("round_busy_p50_ms".into(), json!(round(self.round_busy_p50_ms, 2)));
        }
        v
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
struct Figures {
    sequential_cas: Rate,
    sequential_read_cas: Rate,
    concurrent_cas: Rate,
    hot: Phase,
    spread: Phase,
    hot_cycles: Phase,
    spread_cycles: Phase,
}

/// Waits for every worker; the phase's rate from `t0` to the last worker's end.
async fn finish(
    workers: Vec<JoinHandle<anyhow::Result<Vec<f64>>>>,
    ops: usize,
    t0: Instant,
) -> anyhow::Result<Rate> {
    let mut latencies = Vec::with_capacity(ops);
    for w in workers {
        latencies.extend(w.await.context("a bench worker panicked")??);
    }
    Ok(Rate::of(ops, t0.elapsed(), latencies))
}

/// The value written by the raw compare-and-swaps: a reservation's ledger entry, as large as
/// what the keeper writes per reservation.
fn sample_value() -> anyhow::Result<Bytes> {
    let entry = LedgerEntry {
        change: LedgerChange::Reserve(reserve("0190b2c4-1c5e-7f00-8000-000000000000-h-12345", "tenant.b123")),
        at_ms: flotilla_protocol::time::now_ms(),
        reply: BudgetReply {
            tokens: Some(WANT),
            expires_ms: Some(flotilla_protocol::time::now_ms()),
            lease_left_ms: Some(LEASE_MS),
            ..Default::default()
        },
        actor: None,
    };
    Ok(Bytes::from(codec::encode(WireFormat::Msgpack, &entry).context("failed to encode a ledger entry")?))
}

fn reserve(id: &str, scope: &str) -> ReserveRequest {
    ReserveRequest {
        id: id.to_owned(),
        scopes: vec![scope.to_owned()],
        want: WANT,
        min: Some(1),
        lease_ms: Some(LEASE_MS),
        ..Default::default()
    }
}

fn commit(id: &str) -> CommitRequest {
    CommitRequest { id: id.to_owned(), used: USED, ..Default::default() }
}

/// The raw baselines on a bucket like the budgets bucket (file storage, history 1).
async fn raw_baselines(
    js: &[jetstream::Context],
    names: &Names,
    sizes: Sizes,
    started: Instant,
) -> anyhow::Result<(Rate, Rate, Rate)> {
    let first = js.first().context("no connection")?;
    let bucket = format!("{}_bench_cas", names.prefix().as_str().replace('.', "_"));
    let _ = first.delete_key_value(&bucket).await;
    let result = async {
        let store = first
            .create_key_value(kv::Config {
                bucket: bucket.clone(),
                history: 1,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .context("failed to create the bench bucket")?;
        let value = sample_value()?;
        let sequential_n = (sizes.reservations / 4).max(100);

        // Sequential: one key, each update checked against the revision the last one returned.
        progress(started, &format!("raw KV compare-and-swap, sequential: {sequential_n} updates of one key"));
        let mut revision = store.put("hot", value.clone()).await.context("failed to put the hot key")?;
        for _ in 0..sequential_n / 10 {
            revision = store.update("hot", value.clone(), revision).await.context("warm-up update")?;
        }
        let mut latencies = Vec::with_capacity(sequential_n);
        let t0 = Instant::now();
        for _ in 0..sequential_n {
            let t = Instant::now();
            revision = store
                .update("hot", value.clone(), revision)
                .await
                .context("sequential compare-and-swap failed")?;
            latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let sequential = Rate::of(sequential_n, t0.elapsed(), latencies);

        // Sequential read-modify-write: read the key, then update it from the revision read.
        progress(started, &format!("raw KV read + compare-and-swap, sequential: {sequential_n} of one key"));
        let mut latencies = Vec::with_capacity(sequential_n);
        let t0 = Instant::now();
        for _ in 0..sequential_n {
            let t = Instant::now();
            let entry = store.entry("hot").await.context("read failed")?.context("the hot key is gone")?;
            store
                .update("hot", value.clone(), entry.revision)
                .await
                .context("read + compare-and-swap failed")?;
            latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let read_cas = Rate::of(sequential_n, t0.elapsed(), latencies);

        // Concurrent: 1,000 keys created beforehand; worker w owns the keys k with
        // k % in_flight == w and updates them in turn, each from the revision it last wrote.
        let n = sizes.reservations;
        progress(
            started,
            &format!(
                "raw KV compare-and-swap, concurrent: {n} updates of {BUDGETS} keys, {} in flight",
                sizes.in_flight
            ),
        );
        let revisions: Vec<u64> = futures::stream::iter(0..BUDGETS)
            .map(|k| {
                let (store, value) = (store.clone(), value.clone());
                async move { store.put(format!("k{k}"), value).await.context("failed to put a bench key") }
            })
            .buffered(64)
            .try_collect()
            .await?;
        let revisions = Arc::new(revisions);
        let mut workers = Vec::with_capacity(sizes.in_flight);
        let t0 = Instant::now();
        for w in 0..sizes.in_flight {
            let conn = js.get(w % js.len()).context("no connection")?;
            let store = conn.get_key_value(&bucket).await.context("failed to open the bench bucket")?;
            let mut keys: Vec<(String, u64)> = (w..BUDGETS)
                .step_by(sizes.in_flight)
                .filter_map(|k| Some((format!("k{k}"), *revisions.get(k)?)))
                .collect();
            let value = value.clone();
            let ops = (w..n).step_by(sizes.in_flight).count();
            workers.push(tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(ops);
                for j in 0..ops {
                    let len = keys.len().max(1);
                    let Some((key, rev)) = keys.get_mut(j % len) else {
                        anyhow::bail!("a worker has no key")
                    };
                    let t = Instant::now();
                    *rev = store
                        .update(key.as_str(), value.clone(), *rev)
                        .await
                        .context("concurrent compare-and-swap failed")?;
                    latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                Ok(latencies)
            }));
        }
        let concurrent = finish(workers, n, t0).await?;
        anyhow::Ok((sequential, read_cas, concurrent))
    }
    .await;
    let _ = first.delete_key_value(&bucket).await;
    result
}

/// Where a phase's reservations go.
#[derive(Debug, Clone, Copy)]
enum Spread {
    Hot,
    Budgets,
}

impl Spread {
    fn scope(self, i: usize) -> String {
        match self {
            Self::Hot => HOT.to_owned(),
            Self::Budgets => format!("tenant.b{}", i % BUDGETS),
        }
    }
}

/// The budget phases' shared parts.
struct Bench {
    clients: Vec<Client>,
    fleet: Fleet,
    timings: Option<profile::Timings>,
    run: String,
    in_flight: usize,
}

impl Bench {
    fn client(&self, w: usize) -> anyhow::Result<Client> {
        self.clients.get(w % self.clients.len().max(1)).cloned().context("no budget client")
    }

    async fn ledger_seq(&self) -> anyhow::Result<u64> {
        let mut s = self
            .fleet
            .js
            .get_stream(self.fleet.names.ledger_stream())
            .await
            .context("failed to open the ledger stream")?;
        Ok(s.info().await.context("failed to read the ledger stream")?.state.last_sequence)
    }

    /// `n` reservations (with `cycle`, each followed by its commit) with ids `<run>-<tag>-<i>`,
    /// `in_flight` at a time.
    async fn phase(&self, tag: &str, n: usize, spread: Spread, cycle: bool) -> anyhow::Result<Phase> {
        let seq0 = self.ledger_seq().await?;
        if let Some(t) = &self.timings {
            t.take();
        }
        let mut workers = Vec::with_capacity(self.in_flight);
        let t0 = Instant::now();
        for w in 0..self.in_flight {
            let client = self.client(w)?;
            let prefix = format!("{}-{tag}-", self.run);
            let ops: Vec<usize> = (w..n).step_by(self.in_flight).collect();
            workers.push(tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(ops.len());
                for i in ops {
                    let id = format!("{prefix}{i}");
                    let t = Instant::now();
                    let granted = client
                        .call(&reserve(&id, &spread.scope(i)))
                        .await
                        .with_context(|| format!("reservation {id} was not granted"))?;
                    anyhow::ensure!(
                        granted.tokens == Some(WANT),
                        "reservation {id} got {:?}",
                        granted.tokens
                    );
                    if cycle {
                        client.call(&commit(&id)).await.with_context(|| format!("commit {id}"))?;
                    }
                    latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                Ok(latencies)
            }));
        }
        let rate = finish(workers, n, t0).await?;
        let rounds = self.timings.as_ref().map(profile::Timings::take).unwrap_or_default();
        let rounds = rounds.get("round").cloned().unwrap_or_default();
        let mut walls: Vec<f64> = rounds.iter().map(|c| c.wall.as_secs_f64() * 1000.0).collect();
        let mut busy: Vec<f64> = rounds.iter().map(|c| c.busy.as_secs_f64() * 1000.0).collect();
        walls.sort_by(f64::total_cmp);
        busy.sort_by(f64::total_cmp);
        let writes = self.ledger_seq().await?.saturating_sub(seq0);
        Ok(Phase {
            rate,
            ledger_writes_per_op: writes as f64 / n.max(1) as f64,
            rounds: rounds.len(),
            round_wall_p50_ms: percentile(&walls, 0.5),
            round_busy_p50_ms: percentile(&busy, 0.5),
        })
    }

    /// The hot budget's tokens held and used, as the keeper reports them.
    async fn hot(&self) -> anyhow::Result<(u64, u64)> {
        let req = ShowRequest { scope: Some(HOT.to_owned()), ..Default::default() };
        let reply =
            Client::new(self.fleet.clone()).call(&req).await.context("failed to show the hot budget")?;
        let b = reply.budget.context("the keeper showed no hot budget")?;
        Ok((b.held, b.used))
    }
}

async fn budgets(bench: &Bench, sizes: Sizes, started: Instant) -> anyhow::Result<[Phase; 4]> {
    progress(started, &format!("setting {BUDGETS} budgets and the hot one"));
    let client = bench.client(0)?;
    // The first answer also waits until the keeper serves.
    let set = |scope: String| {
        let client = client.clone();
        async move {
            let req = SetRequest { scope, limit_tokens: LIMIT, ..Default::default() };
            client.call(&req).await.context("failed to set a budget")
        }
    };
    set(HOT.to_owned()).await?;
    futures::stream::iter((0..BUDGETS).map(|b| set(format!("tenant.b{b}"))))
        .buffer_unordered(64)
        .try_collect::<Vec<_>>()
        .await?;
    let n = sizes.reservations;
    let cycles = (n / 2).max(1);
    progress(started, "warming up the keeper");
    bench.phase("w", (n / 10).max(sizes.in_flight), Spread::Budgets, false).await?;
    progress(started, &format!("reservations on one hot budget: {n}, {} in flight", sizes.in_flight));
    let hot = bench.phase("h", n, Spread::Hot, false).await?;
    let (held, _) = bench.hot().await?;
    anyhow::ensure!(held == n as u64 * WANT, "the hot budget holds {held} tokens, not {}", n as u64 * WANT);
    progress(started, &format!("reservations on {BUDGETS} budgets: {n}, {} in flight", sizes.in_flight));
    let spread = bench.phase("s", n, Spread::Budgets, false).await?;
    progress(started, &format!("reserve + commit cycles on the hot budget: {cycles}"));
    let hot_cycles = bench.phase("hc", cycles, Spread::Hot, true).await?;
    let (held_after, used) = bench.hot().await?;
    anyhow::ensure!(
        held_after == held && used == cycles as u64 * USED,
        "the hot budget holds {held_after} and used {used} after {cycles} cycles"
    );
    progress(started, &format!("reserve + commit cycles on {BUDGETS} budgets: {cycles}"));
    let spread_cycles = bench.phase("sc", cycles, Spread::Budgets, true).await?;
    Ok([hot, spread, hot_cycles, spread_cycles])
}

pub async fn run(cli: &Cli, sizes: Sizes, server_config: ServerConfig) -> anyhow::Result<()> {
    if sizes.reservations < 100 || sizes.in_flight == 0 || sizes.in_flight > BUDGETS {
        return Err(Usage(format!("--reservations must be at least 100, --in-flight 1 to {BUDGETS}")).into());
    }
    let started = Instant::now();
    let timings = profile::install(None);
    let dir = tempfile::Builder::new()
        .prefix("flotilla-bench-")
        .tempdir()
        .context("failed to create a temp dir")?;
    // The keeper's fleet joins the topology, as a budget-keeper does.
    let (mut local, server_desc) = cli.fleet(dir.path(), server_config, Mode::Join).await?;
    let names = local.fleet().names.clone();
    let mut fleets = Vec::with_capacity(CONNECTIONS);
    for c in 0..CONNECTIONS {
        let client = nats::connect(local.url(), &format!("flotilla-bench-{c}"), &Default::default()).await?;
        fleets.push(Fleet::new(client, names.clone(), WireFormat::Msgpack, "bench".into()));
    }
    let build = if cfg!(debug_assertions) { "debug" } else { "release" };

    progress(started, "raw KV compare-and-swap baselines");
    let js: Vec<jetstream::Context> = fleets.iter().map(|f| f.js.clone()).collect();
    let raw = raw_baselines(&js, &names, sizes, started).await;

    // The keeper in this process, on its own connection.
    local.spawn("bench-budget-keeper", flotilla_budget_keeper::BudgetKeeper::default()).await?;
    let run = uuid::Uuid::now_v7().simple().to_string();
    let bench = Bench {
        clients: fleets.iter().cloned().map(Client::new).collect(),
        // For the bench's own reads (the ledger stream's length, the hot budget).
        fleet: local.fleet().clone(),
        timings,
        run: run.get(run.len().saturating_sub(8)..).unwrap_or("run").to_owned(),
        in_flight: sizes.in_flight,
    };
    let result = match raw {
        Ok(raw) => {
            budgets(&bench, sizes, started).await.map(|[hot, spread, hot_cycles, spread_cycles]| Figures {
                sequential_cas: raw.0,
                sequential_read_cas: raw.1,
                concurrent_cas: raw.2,
                hot,
                spread,
                hot_cycles,
                spread_cycles,
            })
        }
        Err(e) => Err(e),
    };
    progress(started, "stopping the keeper and the server");
    for f in &fleets {
        if let Err(e) = f.client.drain().await {
            tracing::warn!(error = %e, "failed to drain a bench connection");
        }
    }
    crate::stop(local).await;
    report(cli, &result?, sizes, build, &server_desc);
    Ok(())
}

fn report(cli: &Cli, f: &Figures, sizes: Sizes, build: &str, server_desc: &str) {
    let hot_ratio = f.hot.rate.per_s / f.sequential_cas.per_s.max(1e-9);
    let spread_ratio = f.spread.rate.per_s / f.concurrent_cas.per_s.max(1e-9);
    let hot_met = hot_ratio >= GOAL_HOT_VS_SEQUENTIAL;
    let spread_met = spread_ratio >= GOAL_SPREAD_VS_CONCURRENT;
    if cli.json {
        let report = json!({
            "setup": {
                "build": build,
                "server": server_desc,
                "keeper": "in process, own connection",
                "in_flight": sizes.in_flight,
                "connections": CONNECTIONS,
                "budgets": BUDGETS,
                "want_tokens": WANT,
            },
            "raw": {
                "sequential_cas": f.sequential_cas.json(),
                "sequential_read_cas": f.sequential_read_cas.json(),
                "concurrent_cas": f.concurrent_cas.json(),
            },
            "hot": {
                "reserve": f.hot.json(1),
                "reserve_commit": f.hot_cycles.json(2),
                "vs_sequential_cas": round(hot_ratio, 3),
                "goal_vs_sequential_cas": GOAL_HOT_VS_SEQUENTIAL,
            },
            "spread": {
                "reserve": f.spread.json(1),
                "reserve_commit": f.spread_cycles.json(2),
                "vs_concurrent_cas": round(spread_ratio, 3),
                "goal_vs_concurrent_cas": GOAL_SPREAD_VS_CONCURRENT,
            },
            "goals": { "hot_vs_sequential_cas": hot_met, "spread_vs_concurrent_cas": spread_met },
        });
        println!("{report}");
        return;
    }
    let in_flight = sizes.in_flight;
    println!(
        "flotilla-bench budget: {build} build; {server_desc}; keeper in this process on its own connection; \
         {in_flight} requests in flight over {CONNECTIONS} connections; reservations of {WANT} tokens, one scope each"
    );
    let line = |what: &str, r: &Rate, vs: &str| {
        println!(
            "  {what:<52} {:>9}/s   p50 {:>6.2} ms   p99 {:>6.2} ms   ({} ops){vs}",
            thousands(r.per_s),
            r.p50_ms,
            r.p99_ms,
            thousands(r.ops as f64),
        );
    };
    println!("raw KV compare-and-swap (`update(key, value, revision)`, a bucket like the budgets bucket):");
    line("sequential, one key, each awaited", &f.sequential_cas, "");
    line("sequential read + update, one key", &f.sequential_read_cas, "");
    line(&format!("concurrent, {BUDGETS} keys, {in_flight} in flight"), &f.concurrent_cas, "");
    println!("budget-keeper reservations (each stored in the ledger stream before it is answered):");
    line(
        "reserve, one hot budget",
        &f.hot.rate,
        &format!(
            "\n  {:<52} = {hot_ratio:.2} × sequential CAS [goal ≥ {GOAL_HOT_VS_SEQUENTIAL}: {}]",
            "",
            goal(hot_met)
        ),
    );
    line(
        &format!("reserve, {BUDGETS} budgets"),
        &f.spread.rate,
        &format!(
            "\n  {:<52} = {spread_ratio:.2} × concurrent CAS [goal ≥ {GOAL_SPREAD_VS_CONCURRENT}: {}]",
            "",
            goal(spread_met)
        ),
    );
    line("reserve + commit cycles, one hot budget", &f.hot_cycles.rate, "");
    line(&format!("reserve + commit cycles, {BUDGETS} budgets"), &f.spread_cycles.rate, "");
    println!(
        "the keeper meanwhile (a round = one batch decided, its ledger entries written together, answered):"
    );
    for (what, k, per_op) in [
        ("reserve, hot", &f.hot, 1),
        ("reserve, spread", &f.spread, 1),
        ("cycles, hot", &f.hot_cycles, 2),
        ("cycles, spread", &f.spread_cycles, 2),
    ] {
        println!(
            "  {what:<16} {} rounds, {:.1} requests per round, round p50 {:.2} ms (busy {:.2} ms); {:.2} ledger writes per op",
            thousands(k.rounds as f64),
            k.batch(per_op),
            k.round_wall_p50_ms,
            k.round_busy_p50_ms,
            k.ledger_writes_per_op,
        );
    }
}
