//! Recall: what agents `remember` is stored in the recall stream with its embedding, and every
//! runner keeps an index of it, built from the stream from its start and followed after, so any
//! runner answers a `recall` the same and a restart loses nothing. The search is exact (cosine
//! over every vector of the tenant and model): the same stream gives the same answer everywhere.
//! A `recall` first waits until the index has applied everything the stream held when it was
//! asked (read your writes, across runners).
//!
//! Embeddings come from the template's provider (`POST <base_url>/embeddings`, OpenAI-compatible)
//! or, for the offline provider, from a deterministic embedder: hashed words, so texts that
//! share words are near.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use flotilla_protocol::{Recollection, codec};
use flotilla_service::Fleet;
use futures::StreamExt as _;
use serde_json::Value;
use tokio::sync::watch;
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
                    return Err(format!("embeddings endpoint answered {status}: {body}"));
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

/// One remembered text in the index (its vector is in its space's contiguous array).
#[derive(Debug, Clone)]
struct Entry {
    id: String,
    text: String,
    metadata: serde_json::Map<String, Value>,
    seq: u64,
}

/// Every vector of one tenant and model, stored back to back so a search streams through them.
#[derive(Debug, Default)]
struct Space {
    dims: usize,
    entries: Vec<Entry>,
    vectors: Vec<f32>,
    by_id: HashMap<String, usize>,
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
}

impl Default for Index {
    fn default() -> Self {
        Self { spaces: RwLock::default(), applied: watch::channel(0).0 }
    }
}

/// A dot product in eight independent lanes, which the compiler turns into SIMD.
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

impl Index {
    /// Applies stream entry `seq` (what following the stream does; public for benchmarks).
    pub fn apply(&self, r: Recollection, seq: u64) {
        if let Ok(mut spaces) = self.spaces.write() {
            let space = spaces.entry((r.tenant, r.model)).or_default();
            if space.dims == 0 {
                space.dims = r.vector.len();
            }
            if r.vector.len() != space.dims || space.dims == 0 {
                tracing::warn!(id = %r.id, dims = r.vector.len(), want = space.dims, "a vector of another size for this model; not indexed");
            } else {
                let entry = Entry { id: r.id.clone(), text: r.text, metadata: r.metadata, seq };
                match space.by_id.get(&r.id).copied() {
                    // The same id remembered again replaces the older entry.
                    Some(at) => {
                        let start = at.saturating_mul(space.dims);
                        if let (Some(e), Some(v)) =
                            (space.entries.get_mut(at), space.vectors.get_mut(start..start + space.dims))
                        {
                            *e = entry;
                            v.copy_from_slice(&r.vector);
                        }
                    }
                    None => {
                        space.by_id.insert(r.id, space.entries.len());
                        space.entries.push(entry);
                        space.vectors.extend_from_slice(&r.vector);
                    }
                }
            }
        }
        self.applied.send_replace(seq);
    }

    /// Waits until the index has applied the stream up to `seq` (at most `timeout`).
    pub async fn caught_up(&self, seq: u64, timeout: Duration) -> bool {
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|s| *s >= seq)).await.is_ok_and(|r| r.is_ok())
    }

    /// The `k` nearest entries of `tenant` and `model` to `query` whose metadata holds every
    /// field of `filter`, nearest first (ties: the older first).
    pub fn search(
        &self,
        tenant: &str,
        model: &str,
        query: &[f32],
        k: usize,
        filter: &serde_json::Map<String, Value>,
    ) -> Vec<Hit> {
        let Ok(spaces) = self.spaces.read() else { return Vec::new() };
        let Some(space) = spaces.get(&(tenant.to_owned(), model.to_owned())) else { return Vec::new() };
        if query.len() != space.dims || k == 0 {
            return Vec::new();
        }
        // The best k so far, best first: (score, seq, position).
        let mut best: Vec<(f32, u64, usize)> = Vec::with_capacity(k + 1);
        for (at, (entry, v)) in space.entries.iter().zip(space.vectors.chunks_exact(space.dims)).enumerate() {
            if !filter.iter().all(|(key, want)| entry.metadata.get(key) == Some(want)) {
                continue;
            }
            let score = dot(v, query);
            let beats = |(s, q, _): &(f32, u64, usize)| score > *s || (score == *s && entry.seq < *q);
            if best.len() == k && !best.last().is_some_and(beats) {
                continue;
            }
            let pos = best.iter().position(beats).unwrap_or(best.len());
            best.insert(pos, (score, entry.seq, at));
            best.truncate(k);
        }
        best.into_iter()
            .filter_map(|(score, _, at)| space.entries.get(at).map(|e| (score, e)))
            .map(|(score, e)| Hit {
                id: e.id.clone(),
                text: e.text.clone(),
                metadata: e.metadata.clone(),
                score,
            })
            .collect()
    }

    /// Builds the index from the recall stream and follows it until `shutdown`.
    pub async fn maintain(self: Arc<Self>, fleet: Fleet, shutdown: CancellationToken) {
        let mut from = 1u64;
        while !shutdown.is_cancelled() {
            let consumer = match fleet.js.get_stream(fleet.names.recall_stream()).await {
                Ok(s) => {
                    s.create_consumer(pull::OrderedConfig {
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
    let mut s = fleet.js.get_stream(fleet.names.recall_stream()).await.map_err(|e| e.to_string())?;
    s.info().await.map(|i| i.state.last_sequence).map_err(|e| e.to_string())
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
        let hits = index.search("t", OFFLINE_MODEL, &q, 2, &serde_json::Map::new());
        assert_eq!(hits.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(), ["m0", "m1"]);
        let mut filter = serde_json::Map::new();
        filter.insert("kind".into(), Value::from("tart"));
        let hits = index.search("t", OFFLINE_MODEL, &q, 3, &filter);
        assert_eq!(hits.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(), ["m1"]);
        assert!(index.search("other-tenant", OFFLINE_MODEL, &q, 3, &serde_json::Map::new()).is_empty());
    }
}
