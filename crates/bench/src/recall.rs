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

/// `v` moved a little in every dimension.
fn near(v: &[f32], by: f32, next: &mut impl FnMut() -> f32) -> Vec<f32> {
    let w: Vec<f32> = v.iter().map(|x| x + next() * by).collect();
    let norm = w.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-9);
    w.into_iter().map(|x| x / norm).collect()
}

/// Subjects the stored texts are about: embeddings of real texts are clustered, not uniform.
const SUBJECTS: usize = 1_000;

pub async fn run(cli: &Cli, sizes: Sizes) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut seed = 42u64;
    let mut next = move || {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    progress(
        started,
        &format!(
            "storing {} vectors of {} dimensions about {} subjects",
            thousands(sizes.vectors as f64),
            sizes.dimensions,
            thousands(SUBJECTS as f64)
        ),
    );
    let subjects: Vec<Vec<f32>> = (0..SUBJECTS).map(|_| random_unit(&mut next, sizes.dimensions)).collect();
    let before = crate::heap::live_bytes();
    let index = Index::default();
    let mut kept = Vec::new();
    for i in 0..sizes.vectors {
        let mut metadata = serde_json::Map::new();
        // A tenth of each subject's texts in each class of `n`.
        metadata.insert("n".into(), serde_json::Value::from((i / SUBJECTS) % 10));
        let subject = subjects.get(i % SUBJECTS).context("no subject")?;
        let vector = near(subject, 0.1, &mut next);
        // Every 97th is kept to ask near it.
        if i % 97 == 0 {
            kept.push(vector.clone());
        }
        index.apply(
            Recollection {
                id: format!("v{i}"),
                tenant: "bench".into(),
                text: format!("text {i}"),
                metadata,
                model: "bench".into(),
                vector,
                agent_id: None,
                task_id: None,
                at_ms: 0,
            },
            u64::try_from(i).unwrap_or(u64::MAX).saturating_add(1),
        );
    }
    let empty = serde_json::Map::new();
    let queries: Vec<Vec<f32>> = (0..sizes.queries)
        .filter_map(|j| kept.get(j % kept.len().max(1)).map(|v| near(v, 0.05, &mut next)))
        .collect();
    // The exact answers (before the graph), for the graph's recall.
    let exact_of = queries.len().min(100);
    let mut exact = Vec::new();
    for q in queries.iter().take(exact_of) {
        exact.push(index.search("bench", "bench", q, 5, &empty).map_err(anyhow::Error::msg)?);
    }
    progress(started, "building the graph (a fresh runner does this in the background)");
    let t = Instant::now();
    while index.move_to_graph() {}
    let build_s = t.elapsed().as_secs_f64();
    let held = crate::heap::live_bytes().saturating_sub(before).saturating_add(index.graph_bytes());
    let per_vector = held as f64 / sizes.vectors.max(1) as f64;

    progress(started, &format!("{} searches, k = 5", queries.len()));
    let mut latencies = Vec::with_capacity(queries.len());
    let mut found = 0usize;
    for (j, q) in queries.iter().enumerate() {
        let t = Instant::now();
        let hits = index.search("bench", "bench", q, 5, &empty).map_err(anyhow::Error::msg)?;
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(hits.len() == 5, "a search found {} hits", hits.len());
        if let Some(want) = exact.get(j) {
            found += want.iter().filter(|w| hits.iter().any(|h| h.id == w.id)).count();
        }
    }
    latencies.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    let recall_at_5 = found as f64 / (exact_of * 5).max(1) as f64;
    let filter = serde_json::Map::from_iter([("n".to_owned(), serde_json::Value::from(3))]);
    let mut filtered = Vec::new();
    for q in &queries {
        let t = Instant::now();
        let hits = index.search("bench", "bench", q, 5, &filter).map_err(anyhow::Error::msg)?;
        filtered.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(hits.len() == 5, "a filtered search found {} hits", hits.len());
    }
    filtered.sort_by(f64::total_cmp);
    let filtered_p99 = percentile(&filtered, 0.99);

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
    let search = if sizes.vectors > flotilla_agent_runner::recall::EXACT_UP_TO {
        "HNSW graph (usearch, f16)"
    } else {
        "exact"
    };
    let report = serde_json::json!({
        "bench": "recall",
        "server": server,
        "vectors": sizes.vectors,
        "dimensions": sizes.dimensions,
        "queries": queries.len(),
        "search": search,
        "search_p50_ms": round(p50, 3),
        "search_p99_ms": round(p99, 3),
        "filtered_search_p99_ms": round(filtered_p99, 3),
        "recall_at_5_vs_exact": round(recall_at_5, 3),
        "graph_build_s": round(build_s, 2),
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
        "recall: {} vectors of {} dimensions, {search}, k = 5",
        thousands(sizes.vectors as f64),
        sizes.dimensions
    );
    println!(
        "  search:   p50 {p50:.2} ms   p99 {p99:.2} ms   (+ {rtt_p50:.2} ms NATS round trip per recall); \
         filtered to a tenth p99 {filtered_p99:.2} ms"
    );
    println!("  quality:  {:.1} % of the exact top 5 found", recall_at_5 * 100.0);
    println!("  graph:    built in {build_s:.1} s from the stream's vectors");
    println!(
        "  memory:   {per_vector:.0} B per vector in the index, text and metadata included (a raw f32 vector is {} B)",
        sizes.dimensions * 4
    );
    println!("  goal p99 ≤ 10 ms (search + round trip): {}", goal(met));
    Ok(())
}
