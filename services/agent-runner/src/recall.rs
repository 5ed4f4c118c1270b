//! Recall: what agents `remember` is stored in the recall stream with its embedding, and every
//! runner keeps an index of it, built from the stream from its start and followed after, so any
//! runner answers a `recall` the same and a restart loses nothing. Small spaces (one tenant and
//! model) are searched exactly; big ones through an HNSW graph (usearch, half precision), built
//! in the background in stream order, so runners that read the same stream hold the same graph
//! and answer the same. A `recall` first waits until the index has applied everything the stream held when it was
//! asked (read your writes, across runners).
//!
//! Embeddings come from the template's provider (`POST <base_url>/embeddings`, OpenAI-compatible)
//! or, for the offline provider, from a deterministic embedder: hashed words, so texts that
//! share words are near.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use flotilla_protocol::{Recollection, codec};
use flotilla_service::Fleet;
use futures::StreamExt as _;
use serde_json::Value;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

/// Dimensions of the offline embedder's vectors.
pub const OFFLINE_DIMENSIONS: usize = 256;

/// Name of the offline embedder's model.
pub const OFFLINE_MODEL: &str = "offline-hash-256";

/// Where a template's embeddings come from.
#[derive(Debug, Clone)]
pub enum Embedder {
    /// Deterministic, no network.
    Offline,
    /// An OpenAI-compatible `/embeddings` endpoint.
    OpenAi {
        http: reqwest::Client,
        base_url: String,
        api_key: crate::llm::Secret,
        model: String,
        timeout: Duration,
    },
}

impl Embedder {
    /// The model the vectors are of.
    pub fn model(&self) -> &str {
        match self {
            Self::Offline => OFFLINE_MODEL,
            Self::OpenAi { model, .. } => model,
        }
    }

    /// The embedding of `text`, L2-normalised.
    pub async fn embed(&self, text: &str) -> Result<Vec<f32>, String> {
        let v = match self {
            Self::Offline => offline_embedding(text),
            Self::OpenAi { http, base_url, api_key, model, timeout } => {
                let url = format!("{}/embeddings", base_url.trim_end_matches('/'));
                let mut req = http
                    .post(&url)
                    .timeout(*timeout)
                    .json(&serde_json::json!({ "model": model, "input": text }));
                if !api_key.is_empty() {
                    req = req.bearer_auth(api_key.expose());
                }
                let resp = req.send().await.map_err(|e| format!("embeddings request failed: {e}"))?;
                let status = resp.status();
                let body: Value =
                    resp.json().await.map_err(|e| format!("embeddings answer unreadable: {e}"))?;
                if !status.is_success() {
                    // The endpoint may quote the key it was sent.
                    return Err(api_key.redact(&format!("embeddings endpoint answered {status}: {body}")));
                }
                body.pointer("/data/0/embedding")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_f64).map(|x| x as f32).collect::<Vec<f32>>())
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| "embeddings answer has no data[0].embedding".to_owned())?
            }
        };
        Ok(normalised(v))
    }
}

fn normalised(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for x in &mut v {
            *x /= norm;
        }
    }
    v
}

/// FNV-1a: a hash that is the same in every process (the standard library's is seeded).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// Hashed bag of words: each lower-cased word adds ±1 in a dimension chosen by its hash.
pub fn offline_embedding(text: &str) -> Vec<f32> {
    let mut v = vec![0f32; OFFLINE_DIMENSIONS];
    for word in text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
        let h = fnv1a(word.to_lowercase().as_bytes());
        let dim = usize::try_from(h % OFFLINE_DIMENSIONS as u64).unwrap_or(0);
        let sign = if (h >> 32) & 1 == 0 { 1.0 } else { -1.0 };
        if let Some(x) = v.get_mut(dim) {
            *x += sign;
        }
    }
    v
}

/// One remembered text in the index.
#[derive(Debug, Clone)]
struct Entry {
    id: String,
    text: String,
    metadata: serde_json::Map<String, Value>,
}

/// Spaces of at most this many entries are searched exactly, by a scan; bigger ones through an
/// HNSW graph (usearch), which then takes every entry of the space.
pub const EXACT_UP_TO: usize = 4_096;

/// The largest candidate pool asked of a graph before a filtered search scans instead.
const MAX_POOL: usize = 4_096;

/// How many entries the graph builder moves in one go (the write lock is held only to take them
/// off the flat part, not while the graph grows).
const MOVE_BATCH: usize = 1_024;

/// Every vector of one tenant and model. An entry is in the flat part (scanned exactly) until
/// the space outgrows [`EXACT_UP_TO`], then the builder moves it into the graph; a search looks
/// at both, so an entry is found the moment it is applied. Vectors are kept at half precision
/// in both (the graph's own storage), and scores are computed here from those values in a fixed
/// order: every runner computes the same score for the same entry, wherever it is held.
#[derive(Default)]
struct Space {
    dims: usize,
    /// By stream sequence (the graph's key).
    entries: HashMap<u64, Entry>,
    by_id: HashMap<String, u64>,
    flat: VecDeque<(u64, Box<[f32]>)>,
    graph: Option<usearch::Index>,
}

impl std::fmt::Debug for Space {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Space")
            .field("dims", &self.dims)
            .field("entries", &self.entries.len())
            .field("flat", &self.flat.len())
            .field("graph", &self.graph.as_ref().map(usearch::Index::size))
            .finish()
    }
}

impl Space {
    fn wants_graph(&self) -> bool {
        self.entries.len() > EXACT_UP_TO && !self.flat.is_empty()
    }
}

/// A recall hit.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub id: String,
    pub text: String,
    pub metadata: serde_json::Map<String, Value>,
    pub score: f32,
}

/// The runner's recall index: by (tenant, model), every entry of the stream applied so far.
#[derive(Debug)]
pub struct Index {
    spaces: RwLock<HashMap<(String, String), Space>>,
    applied: watch::Sender<u64>,
    /// Rung when a space has entries for its graph.
    to_move: Notify,
}

impl Default for Index {
    fn default() -> Self {
        Self { spaces: RwLock::default(), applied: watch::channel(0).0, to_move: Notify::new() }
    }
}

/// A dot product in eight independent lanes, which the compiler turns into SIMD; the same sum
/// in the same order on every machine.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((l, p), q) in lanes.iter_mut().zip(x).zip(y) {
            *l += p * q;
        }
    }
    lanes.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

/// `v` at the half precision the index stores (round to nearest even, as the graph does).
fn half_precision(v: &[f32]) -> Box<[f32]> {
    v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect()
}

/// Threads that may use one graph at once (usearch keeps a search context per thread): every
/// worker of the runtime, and the builder.
fn graph_threads() -> usize {
    std::thread::available_parallelism().map_or(8, usize::from).saturating_add(4)
}

fn new_graph(dims: usize) -> Result<usearch::Index, String> {
    let options = usearch::IndexOptions {
        dimensions: dims,
        metric: usearch::MetricKind::IP,
        quantization: usearch::ScalarKind::F16,
        connectivity: 16,
        expansion_add: 64,
        expansion_search: 128,
        multi: false,
    };
    let graph = usearch::Index::new(&options).map_err(|e| e.to_string())?;
    graph.reserve_capacity_and_threads(EXACT_UP_TO * 2, graph_threads()).map_err(|e| e.to_string())?;
    Ok(graph)
}

impl Index {
    /// Applies stream entry `seq` (what following the stream does; public for benchmarks).
    pub fn apply(&self, r: Recollection, seq: u64) {
        let mut ring = false;
        if let Ok(mut spaces) = self.spaces.write() {
            let space = spaces.entry((r.tenant, r.model)).or_default();
            if space.dims == 0 {
                space.dims = r.vector.len();
            }
            if r.vector.len() != space.dims || space.dims == 0 {
                tracing::warn!(id = %r.id, dims = r.vector.len(), want = space.dims, "a vector of another size for this model; not indexed");
            } else {
                // The same id remembered again replaces the older entry.
                if let Some(old) = space.by_id.insert(r.id.clone(), seq) {
                    space.entries.remove(&old);
                    // A small space drops it from its scan at once; a big one as it moves.
                    if space.flat.len() <= EXACT_UP_TO {
                        space.flat.retain(|(s, _)| *s != old);
                    }
                    if let Some(graph) = &space.graph
                        && let Err(e) = graph.remove(old)
                    {
                        tracing::warn!(error = %e, "could not drop a replaced entry from the graph");
                    }
                }
                space.entries.insert(seq, Entry { id: r.id, text: r.text, metadata: r.metadata });
                space.flat.push_back((seq, half_precision(&r.vector)));
                ring = space.wants_graph();
            }
        }
        self.applied.send_replace(seq);
        if ring {
            self.to_move.notify_one();
        }
    }

    /// Waits until the index has applied the stream up to `seq` (at most `timeout`).
    pub async fn caught_up(&self, seq: u64, timeout: Duration) -> bool {
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|s| *s >= seq)).await.is_ok_and(|r| r.is_ok())
    }

    /// The `k` nearest entries of `tenant` and `model` to `query` whose metadata holds every
    /// field of `filter`, nearest first (ties: the older first). Exact up to [`EXACT_UP_TO`]
    /// entries; above, the graph's candidates (several times `k`) are scored exactly.
    pub fn search(
        &self,
        tenant: &str,
        model: &str,
        query: &[f32],
        k: usize,
        filter: &serde_json::Map<String, Value>,
    ) -> Result<Vec<Hit>, String> {
        let spaces = self.spaces.read().map_err(|_| "the recall index is unusable".to_owned())?;
        let Some(space) = spaces.get(&(tenant.to_owned(), model.to_owned())) else { return Ok(Vec::new()) };
        if query.len() != space.dims || k == 0 {
            return Ok(Vec::new());
        }
        let query = half_precision(query);
        let wanted = |seq: u64| {
            space
                .entries
                .get(&seq)
                .is_some_and(|e| filter.iter().all(|(key, want)| e.metadata.get(key) == Some(want)))
        };
        // (score, seq): from the flat part, then the graph's candidates.
        let mut scored: Vec<(f32, u64)> = space
            .flat
            .iter()
            .filter(|(seq, _)| wanted(*seq))
            .map(|(seq, v)| (dot(v, &query), *seq))
            .collect();
        if let Some(graph) = &space.graph
            && graph.size() > 0
        {
            // The graph's nearest, filtered after: a pool several times k, doubled while it holds
            // fewer than k that pass the filter (a filter inside the graph walk visits most of
            // the graph when few entries pass). A filter that even a large pool cannot fill is
            // answered by a scan of the entries that pass it.
            let mut pool = k.saturating_mul(8).max(64);
            let mut v = vec![0f32; space.dims];
            loop {
                let found = graph.search(&query, pool).map_err(|e| format!("recall search failed: {e}"))?;
                let passing: Vec<u64> = found.keys.iter().copied().filter(|seq| wanted(*seq)).collect();
                let whole = found.keys.len() < pool;
                if passing.len() >= k || whole {
                    for seq in passing {
                        if graph.get(seq, &mut v).map_err(|e| e.to_string())? > 0 {
                            scored.push((dot(&v, &query), seq));
                        }
                    }
                    break;
                }
                if pool >= MAX_POOL {
                    for seq in space.entries.keys().copied().filter(|seq| wanted(*seq)) {
                        if graph.get(seq, &mut v).map_err(|e| e.to_string())? > 0 {
                            scored.push((dot(&v, &query), seq));
                        }
                    }
                    break;
                }
                pool = pool.saturating_mul(4).min(MAX_POOL);
            }
        }
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        // An entry being moved is in both parts, with the same score.
        scored.dedup_by_key(|(_, seq)| *seq);
        Ok(scored
            .into_iter()
            .take(k)
            .filter_map(|(score, seq)| space.entries.get(&seq).map(|e| (score, e)))
            .map(|(score, e)| Hit {
                id: e.id.clone(),
                text: e.text.clone(),
                metadata: e.metadata.clone(),
                score,
            })
            .collect())
    }

    /// Moves up to one batch of a big space's flat entries into its graph; false when there was
    /// nothing to move. Blocking (the graph's inserts are CPU work).
    pub fn move_to_graph(&self) -> bool {
        // Taken off under the read lock, copied: searches go on meanwhile and still find them
        // in the flat part.
        let (key, batch, last) = {
            let Ok(mut spaces) = self.spaces.write() else { return false };
            let Some((key, space)) = spaces.iter_mut().find(|(_, s)| s.wants_graph()) else { return false };
            if space.graph.is_none() {
                match new_graph(space.dims) {
                    Ok(g) => space.graph = Some(g),
                    Err(e) => {
                        tracing::error!(error = %e, "could not make a recall graph; the space stays exact");
                        return false;
                    }
                }
            }
            let n = space.flat.len().min(MOVE_BATCH);
            if let Some(graph) = &space.graph {
                let need = graph.size().saturating_add(n);
                if need > graph.capacity()
                    && let Err(e) = graph.reserve_capacity_and_threads(
                        need.max(graph.capacity().saturating_mul(2)),
                        graph_threads(),
                    )
                {
                    tracing::error!(error = %e, "could not grow the recall graph");
                    return false;
                }
            }
            // Entries replaced since they were applied are only dropped.
            let batch: Vec<(u64, Box<[f32]>)> = space
                .flat
                .iter()
                .take(n)
                .filter(|(seq, _)| space.entries.contains_key(seq))
                .cloned()
                .collect();
            let last = space.flat.get(n.saturating_sub(1)).map_or(0, |(seq, _)| *seq);
            (key.clone(), batch, last)
        };
        let Ok(spaces) = self.spaces.read() else { return false };
        let Some(graph) = spaces.get(&key).and_then(|s| s.graph.as_ref()) else { return false };
        let mut added = Vec::with_capacity(batch.len());
        for (seq, v) in &batch {
            match graph.add(*seq, v) {
                Ok(()) => added.push(*seq),
                Err(e) => tracing::warn!(seq, error = %e, "could not add to the recall graph"),
            }
        }
        drop(spaces);
        let Ok(mut spaces) = self.spaces.write() else { return false };
        let Some(space) = spaces.get_mut(&key) else { return false };
        // The flat part is in stream order and apply appends at the back: what was taken is
        // the front up to `last`. An entry replaced meanwhile leaves the graph again.
        while space.flat.front().is_some_and(|(seq, _)| *seq <= last) {
            space.flat.pop_front();
        }
        for (seq, _) in &batch {
            if !space.entries.contains_key(seq)
                && let Some(graph) = &space.graph
            {
                let _ = graph.remove(*seq);
            }
        }
        !added.is_empty() || space.wants_graph()
    }

    /// Moves big spaces' entries into their graphs as they come, until `shutdown`.
    pub async fn build_graphs(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let me = self.clone();
            let more = tokio::task::spawn_blocking(move || me.move_to_graph()).await.unwrap_or(false);
            if more {
                if shutdown.is_cancelled() {
                    return;
                }
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.to_move.notified() => {},
            }
        }
    }

    /// Bytes the graphs hold outside the Rust heap (for the benchmark).
    pub fn graph_bytes(&self) -> usize {
        self.spaces.read().map_or(0, |s| {
            s.values().filter_map(|s| s.graph.as_ref()).map(usearch::Index::memory_usage).sum()
        })
    }

    /// Entries still in flat parts that are waiting for their graph.
    pub fn waiting_for_graph(&self) -> usize {
        self.spaces
            .read()
            .map_or(0, |s| s.values().filter(|s| s.entries.len() > EXACT_UP_TO).map(|s| s.flat.len()).sum())
    }

    /// Builds the index from the recall stream and follows it until `shutdown`.
    pub async fn maintain(self: Arc<Self>, fleet: Fleet, shutdown: CancellationToken) {
        let mut from = 1u64;
        while !shutdown.is_cancelled() {
            let consumer = match fleet.js.get_stream_no_info(fleet.names.recall_stream()).await {
                Ok(s) => {
                    s.create_consumer(pull::OrderedConfig {
                        name: Some(flotilla_service::nats::ordered_name()),
                        filter_subject: fleet.names.recall_all(),
                        deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: from },
                        ..Default::default()
                    })
                    .await
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no recall stream yet; trying again");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            let mut messages = match consumer {
                Ok(c) => match c.messages().await {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, "failed to read the recall stream; trying again");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "failed to follow the recall stream; trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            loop {
                let m = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    m = messages.next() => m,
                };
                let Some(Ok(m)) = m else { break };
                let seq = m.info().map(|i| i.stream_sequence).unwrap_or(from);
                match codec::decode::<Recollection>(None, &m.payload) {
                    Ok(r) => self.apply(r, seq),
                    Err(e) => {
                        tracing::warn!(seq, error = %e, "unreadable recollection; skipped");
                        self.applied.send_replace(seq);
                    }
                }
                from = seq.saturating_add(1);
            }
        }
    }
}

/// The recall stream's last sequence now: what a recall waits for the index to have applied.
pub async fn stream_end(fleet: &Fleet) -> Result<u64, String> {
    let s = fleet.js.get_stream_no_info(fleet.names.recall_stream()).await.map_err(|e| e.to_string())?;
    s.get_info().await.map(|i| i.state.last_sequence).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_that_share_words_are_near() {
        let q = normalised(offline_embedding("the blue heron fishes at dawn"));
        let near = normalised(offline_embedding("a heron, blue and grey, fishes at dawn"));
        let far = normalised(offline_embedding("quarterly revenue grew by nine percent"));
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        assert!(dot(&q, &near) > 0.6, "{}", dot(&q, &near));
        assert!(dot(&q, &far) < 0.3, "{}", dot(&q, &far));
        assert_eq!(offline_embedding("Heron"), offline_embedding("heron"));
    }

    #[test]
    fn search_is_exact_filtered_and_stable() {
        let index = Index::default();
        for (i, text) in ["red apple pie", "green apple tart", "blue whale song"].iter().enumerate() {
            let mut metadata = serde_json::Map::new();
            metadata.insert("kind".into(), Value::from(if i == 1 { "tart" } else { "other" }));
            index.apply(
                Recollection {
                    id: format!("m{i}"),
                    tenant: "t".into(),
                    text: (*text).into(),
                    metadata,
                    model: OFFLINE_MODEL.into(),
                    vector: normalised(offline_embedding(text)),
                    agent_id: None,
                    task_id: None,
                    at_ms: 0,
                },
                u64::try_from(i).unwrap() + 1,
            );
        }
        let q = normalised(offline_embedding("apple pie"));
        let hits = index.search("t", OFFLINE_MODEL, &q, 2, &serde_json::Map::new()).unwrap();
        assert_eq!(hits.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(), ["m0", "m1"]);
        let mut filter = serde_json::Map::new();
        filter.insert("kind".into(), Value::from("tart"));
        let hits = index.search("t", OFFLINE_MODEL, &q, 3, &filter).unwrap();
        assert_eq!(hits.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(), ["m1"]);
        assert!(
            index.search("other-tenant", OFFLINE_MODEL, &q, 3, &serde_json::Map::new()).unwrap().is_empty()
        );
    }

    /// A pseudo-random number in [-0.5, 0.5) (a fixed sequence).
    fn next(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    /// A pseudo-random unit vector of the offline model's size.
    fn unit(seed: &mut u64) -> Vec<f32> {
        normalised((0..OFFLINE_DIMENSIONS).map(|_| next(seed)).collect())
    }

    /// `v` moved a little in every dimension: texts on one subject embed like this, in clusters.
    fn near(v: &[f32], by: f32, seed: &mut u64) -> Vec<f32> {
        normalised(v.iter().map(|x| x + next(seed) * by).collect())
    }

    fn apply_vector(index: &Index, seq: u64, id: &str, vector: Vec<f32>) {
        let mut metadata = serde_json::Map::new();
        metadata.insert("kind".into(), Value::from(if seq.is_multiple_of(2) { "even" } else { "odd" }));
        let r = Recollection {
            id: id.into(),
            tenant: "t".into(),
            text: id.into(),
            metadata,
            model: OFFLINE_MODEL.into(),
            vector,
            agent_id: None,
            task_id: None,
            at_ms: 0,
        };
        index.apply(r, seq);
    }

    #[test]
    fn a_big_space_moves_into_its_graph_and_two_runners_answer_the_same() {
        let n = EXACT_UP_TO as u64 + 4_000;
        let mut seed = 7u64;
        let subjects: Vec<Vec<f32>> = (0..200).map(|_| unit(&mut seed)).collect();
        let stored: Vec<Vec<f32>> =
            (0..n as usize).map(|i| near(&subjects[i % subjects.len()], 0.1, &mut seed)).collect();
        let queries: Vec<Vec<f32>> = (0..40).map(|j| near(&stored[j * 97], 0.05, &mut seed)).collect();
        let build = || {
            let index = Index::default();
            for (i, v) in stored.iter().enumerate() {
                let seq = i as u64 + 1;
                apply_vector(&index, seq, &format!("m{seq}"), v.clone());
            }
            index
        };
        let (a, b) = (build(), build());
        let none = serde_json::Map::new();
        let mut even = serde_json::Map::new();
        even.insert("kind".into(), Value::from("even"));
        let ask = |index: &Index, filter: &serde_json::Map<String, Value>| {
            queries
                .iter()
                .map(|q| index.search("t", OFFLINE_MODEL, q, 5, filter).unwrap())
                .collect::<Vec<_>>()
        };
        // Before the graph: the exact answers.
        let exact = ask(&a, &none);
        assert!(a.waiting_for_graph() > 0);
        while a.move_to_graph() {}
        while b.move_to_graph() {}
        assert_eq!(a.waiting_for_graph(), 0);
        assert!(a.graph_bytes() > 0);
        // Through the graph: the same on both, and nearly all of the exact top 5.
        let (graph, graph_b) = (ask(&a, &none), ask(&b, &none));
        assert_eq!(graph, graph_b);
        let found: usize = exact
            .iter()
            .zip(&graph)
            .map(|(e, g)| e.iter().filter(|h| g.iter().any(|x| x.id == h.id)).count())
            .sum();
        assert!(found * 100 >= exact.len() * 5 * 95, "graph recall {found} of {}", exact.len() * 5);
        let filtered = ask(&a, &even);
        assert_eq!(filtered, ask(&b, &even));
        assert!(filtered.iter().flatten().all(|h| h.metadata.get("kind") == Some(&Value::from("even"))));
        assert!(filtered.iter().all(|hits| hits.len() == 5));
        // A stored vector is its own nearest; replaced, only the new one is found.
        let planted = stored.get(1_000).cloned().unwrap();
        let hits = a.search("t", OFFLINE_MODEL, &planted, 1, &none).unwrap();
        assert_eq!(hits.first().map(|h| h.id.as_str()), Some("m1001"));
        apply_vector(&a, n + 1, "m1001", unit(&mut seed));
        while a.move_to_graph() {}
        let hits = a.search("t", OFFLINE_MODEL, &planted, 3, &none).unwrap();
        assert!(hits.iter().all(|h| h.id != "m1001"), "{hits:?}");
    }
}
