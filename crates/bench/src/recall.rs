//! `flotilla-bench recall`: the recall index of a runner at N stored vectors — the latency of one
//! search (p50/p99 over random queries) and the heap the index holds per vector — next to the one
//! NATS round trip every recall adds (the stream's end, so the answer includes everything stored
//! when it was asked), measured on a local nats-server in the same run.

use std::time::Instant;

use anyhow::Context as _;
use flotilla_agent_runner::recall::Index;
use flotilla_local::ServerConfig;
use flotilla_protocol::Recollection;
use flotilla_service::Mode;

use crate::Cli;
use crate::figures::{goal, percentile, progress, round, thousands};

/// What to measure.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub vectors: usize,
    pub dimensions: usize,
    pub queries: usize,
}

fn random_unit(next: &mut impl FnMut() -> f32, dims: usize) -> Vec<f32> {
    let v: Vec<f32> = (0..dims).map(|_| next()).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-9);
    v.into_iter().map(|x| x / norm).collect()
}

pub async fn run(cli: &Cli, sizes: Sizes) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut seed = 42u64;
    let mut next = move || {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    progress(
        started,
        &format!("indexing {} vectors of {} dimensions", thousands(sizes.vectors as f64), sizes.dimensions),
    );
    let before = crate::heap::live_bytes();
    let index = Index::default();
    for i in 0..sizes.vectors {
        let mut metadata = serde_json::Map::new();
        metadata.insert("n".into(), serde_json::Value::from(i % 10));
        index.apply(
            Recollection {
                id: format!("v{i}"),
                tenant: "bench".into(),
                text: format!("text {i}"),
                metadata,
                model: "bench".into(),
                vector: random_unit(&mut next, sizes.dimensions),
                agent_id: None,
                task_id: None,
                at_ms: 0,
            },
            u64::try_from(i).unwrap_or(u64::MAX).saturating_add(1),
        );
    }
    let held = crate::heap::live_bytes().saturating_sub(before);
    let per_vector = held as f64 / sizes.vectors.max(1) as f64;

    progress(started, &format!("{} searches, k = 5", sizes.queries));
    let empty = serde_json::Map::new();
    let mut latencies = Vec::with_capacity(sizes.queries);
    for _ in 0..sizes.queries {
        let q = random_unit(&mut next, sizes.dimensions);
        let t = Instant::now();
        let hits = index.search("bench", "bench", &q, 5, &empty);
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(hits.len() == 5, "a search found {} hits", hits.len());
    }
    latencies.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));

    progress(started, "the NATS round trip a recall adds");
    let dir = tempfile::Builder::new().prefix("flotilla-bench-").tempdir().context("temp dir")?;
    let (local, server) = cli.fleet(dir.path(), ServerConfig::Defaults, Mode::Own).await?;
    let mut rtts = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        flotilla_agent_runner::recall::stream_end(local.fleet()).await.map_err(|e| anyhow::anyhow!(e))?;
        rtts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    rtts.sort_by(f64::total_cmp);
    let rtt_p50 = percentile(&rtts, 0.5);
    local.stop().await.ok();
    let met = p99 + rtt_p50 <= 10.0;
    let report = serde_json::json!({
        "bench": "recall",
        "server": server,
        "vectors": sizes.vectors,
        "dimensions": sizes.dimensions,
        "queries": sizes.queries,
        "search_p50_ms": round(p50, 3),
        "search_p99_ms": round(p99, 3),
        "stream_end_round_trip_p50_ms": round(rtt_p50, 3),
        "index_bytes_per_vector": round(per_vector, 0),
        "raw_vector_bytes": sizes.dimensions * 4,
        "goal_p99_at_most_10_ms": met,
    });
    if cli.json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "recall: {} vectors of {} dimensions, exact search, k = 5",
        thousands(sizes.vectors as f64),
        sizes.dimensions
    );
    println!(
        "  search:   p50 {p50:.2} ms   p99 {p99:.2} ms   (+ {rtt_p50:.2} ms NATS round trip per recall)"
    );
    println!(
        "  memory:   {per_vector:.0} B per vector in the index ({} B of it the vector itself)",
        sizes.dimensions * 4
    );
    println!("  goal p99 ≤ 10 ms (search + round trip): {}", goal(met));
    Ok(())
}
