//! Part (a) of `flotilla-bench dispatcher`: what JetStream itself does on the same server, as
//! the yardstick for Flotilla's figures. An async publish rate (a window of publishes in flight,
//! acks awaited as the window slides), and a one-hop pipeline: a pull consumer on stream A, one
//! revision-checked KV update per item, a publish to stream B, and a consumer on B.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use flotilla_protocol::Names;
use futures::{StreamExt as _, TryStreamExt as _};

/// Publishes in flight at most, each acked before the window moves past it.
#[derive(Debug)]
pub struct Window {
    pending: VecDeque<PublishAckFuture>,
    size: usize,
}

impl Window {
    pub fn new(size: usize) -> Self {
        Self { pending: VecDeque::with_capacity(size + 1), size: size.max(1) }
    }

    /// Adds a publish; waits for the oldest acks while more than `size` are outstanding.
    pub async fn push(&mut self, ack: PublishAckFuture) -> anyhow::Result<()> {
        self.pending.push_back(ack);
        while self.pending.len() > self.size {
            if let Some(oldest) = self.pending.pop_front() {
                oldest.await.context("a publish was not acknowledged")?;
            }
        }
        Ok(())
    }

    /// Waits for every outstanding ack.
    pub async fn finish(&mut self) -> anyhow::Result<()> {
        while let Some(oldest) = self.pending.pop_front() {
            oldest.await.context("a publish was not acknowledged")?;
        }
        Ok(())
    }
}

/// Names of the bench's own streams and bucket, under the fleet's prefix.
struct RawNames {
    publish_stream: String,
    publish_subject: String,
    a_stream: String,
    a_subjects: String,
    b_stream: String,
    b_subject: String,
    bucket: String,
}

impl RawNames {
    fn new(names: &Names) -> Self {
        let p = names.prefix().as_str();
        let lower = p.replace('.', "_");
        let upper = lower.to_ascii_uppercase();
        Self {
            publish_stream: format!("{upper}_BENCH_PUBLISH"),
            publish_subject: format!("{p}.bench.publish"),
            a_stream: format!("{upper}_BENCH_A"),
            a_subjects: format!("{p}.bench.a.*"),
            b_stream: format!("{upper}_BENCH_B"),
            b_subject: format!("{p}.bench.b"),
            bucket: format!("{lower}_bench"),
        }
    }

    async fn remove_all(&self, js: &jetstream::Context) {
        for s in [&self.publish_stream, &self.a_stream, &self.b_stream] {
            let _ = js.delete_stream(s).await;
        }
        let _ = js.delete_key_value(&self.bucket).await;
    }
}

fn stream_config(name: &str, subject: &str) -> stream::Config {
    // As the fleet's own streams: file storage, limits retention.
    stream::Config {
        name: name.to_owned(),
        subjects: vec![subject.to_owned()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        ..Default::default()
    }
}

/// What part (a) measured.
#[derive(Debug, Clone)]
pub struct Figures {
    pub publish_messages: usize,
    pub publish_window: usize,
    pub publish_per_s: f64,
    pub pipeline_items: usize,
    pub pipeline_in_flight: usize,
    pub pipeline_per_s: f64,
}

/// Sizes and contents of part (a).
#[derive(Debug, Clone)]
pub struct Params {
    pub publish_messages: usize,
    pub pipeline_items: usize,
    /// Publishes in flight.
    pub window: usize,
    /// Items the pipeline's consumer works on at once.
    pub in_flight: usize,
    /// Message body.
    pub payload: Bytes,
    /// KV value.
    pub record: Bytes,
}

/// Runs part (a), then removes its streams and bucket.
pub async fn run(js: &jetstream::Context, names: &Names, p: Params) -> anyhow::Result<Figures> {
    let Params { publish_messages, pipeline_items, window, in_flight, payload, record } = p;
    let raw = RawNames::new(names);
    raw.remove_all(js).await;
    let result = async {
        let publish_per_s = publish_rate(js, &raw, publish_messages, window, payload.clone()).await?;
        let pipeline_per_s =
            pipeline(js, &raw, pipeline_items, window, in_flight, payload.clone(), record.clone()).await?;
        anyhow::Ok(Figures {
            publish_messages,
            publish_window: window,
            publish_per_s,
            pipeline_items,
            pipeline_in_flight: in_flight,
            pipeline_per_s,
        })
    }
    .await;
    raw.remove_all(js).await;
    result
}

async fn publish_rate(
    js: &jetstream::Context,
    raw: &RawNames,
    n: usize,
    window: usize,
    payload: Bytes,
) -> anyhow::Result<f64> {
    js.create_stream(stream_config(&raw.publish_stream, &raw.publish_subject))
        .await
        .context("failed to create the publish bench stream")?;
    let mut w = Window::new(window);
    let t = Instant::now();
    for _ in 0..n {
        let ack =
            js.publish(raw.publish_subject.clone(), payload.clone()).await.context("failed to publish")?;
        w.push(ack).await?;
    }
    w.finish().await?;
    Ok(n as f64 / t.elapsed().as_secs_f64().max(1e-9))
}

async fn pipeline(
    js: &jetstream::Context,
    raw: &RawNames,
    n: usize,
    window: usize,
    in_flight: usize,
    payload: Bytes,
    record: Bytes,
) -> anyhow::Result<f64> {
    let a = js
        .create_stream(stream_config(&raw.a_stream, &raw.a_subjects))
        .await
        .context("failed to create bench stream A")?;
    let b = js
        .create_stream(stream_config(&raw.b_stream, &raw.b_subject))
        .await
        .context("failed to create bench stream B")?;
    // Like the tasks bucket.
    let store = js
        .create_key_value(kv::Config {
            bucket: raw.bucket.clone(),
            history: 5,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("failed to create the bench bucket")?;
    // One key per item, created beforehand (not timed); each item updates its key once, checked
    // against the revision it was created with.
    let revisions: Vec<u64> = futures::stream::iter(0..n)
        .map(|i| {
            let (store, record) = (store.clone(), record.clone());
            async move { store.create(format!("k{i}"), record).await.context("failed to create a bench key") }
        })
        .buffered(64)
        .try_collect()
        .await?;
    let revisions = Arc::new(revisions);
    let worker = a
        .create_consumer(pull::Config {
            durable_name: Some("bench-pipeline".to_owned()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: i64::try_from(in_flight * 4).unwrap_or(256),
            ..Default::default()
        })
        .await
        .context("failed to create the pipeline consumer")?;
    let mut sink = b
        .create_consumer(pull::OrderedConfig::default())
        .await
        .context("failed to create the consumer on B")?
        .messages()
        .await
        .context("failed to consume B")?;
    let messages =
        worker.stream().max_messages_per_batch(in_flight).messages().await.context("failed to consume A")?;

    let t0 = Instant::now();
    let sink = tokio::spawn(async move {
        for got in 0..n {
            match tokio::time::timeout(Duration::from_secs(60), sink.next()).await {
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => return Err(anyhow::anyhow!(e).context("consumer on B failed")),
                _ => anyhow::bail!("stream B stopped after {got} of {n} items"),
            }
        }
        Ok(Instant::now())
    });
    let hop = {
        let (js, store, b_subject) = (js.clone(), store.clone(), raw.b_subject.clone());
        tokio::spawn(async move {
            messages
                .take(n)
                .map_err(|e| anyhow::anyhow!(e).context("consumer on A failed"))
                .try_for_each_concurrent(in_flight, |msg| {
                    let (js, store, revisions, record, b_subject) =
                        (js.clone(), store.clone(), revisions.clone(), record.clone(), b_subject.clone());
                    async move {
                        let i: usize = msg
                            .subject
                            .rsplit('.')
                            .next()
                            .and_then(|s| s.parse().ok())
                            .context("unexpected subject on A")?;
                        let rev = revisions.get(i).copied().context("no key for an item")?;
                        store
                            .update(format!("k{i}"), record, rev)
                            .await
                            .context("revision-checked update")?;
                        js.publish(b_subject, msg.payload.clone())
                            .await
                            .context("publish to B")?
                            .await
                            .context("ack from B")?;
                        msg.ack().await.map_err(|e| anyhow::anyhow!(e).context("ack on A"))?;
                        anyhow::Ok(())
                    }
                })
                .await
        })
    };
    let mut w = Window::new(window);
    for i in 0..n {
        let ack = js
            .publish(format!("{}.{i}", raw.a_subjects.trim_end_matches(".*")), payload.clone())
            .await
            .context("publish to A")?;
        w.push(ack).await?;
    }
    w.finish().await?;
    hop.await.context("pipeline worker panicked")??;
    let end = sink.await.context("consumer on B panicked")??;
    Ok(n as f64 / end.duration_since(t0).as_secs_f64().max(1e-9))
}
