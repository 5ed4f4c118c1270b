//! The pull loop every durable consumer of the fleet runs (the dispatcher's intake, each runner's
//! assignments): messages are pulled in batches and each is handed to its handler as a task of
//! the caller's tracker, at most so many at once, until shutdown. The handler owns the message
//! and decides it (through an [`crate::AckGuard`]); the caller waits for its tracker after this
//! returns, so that intake stops before in-flight work is finished or handed back.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::Message;
use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How a consumer is pulled from.
#[derive(Debug, Clone, Copy)]
pub struct Pull {
    /// What the messages are, for logs (`submission`, `assignment`).
    pub what: &'static str,
    /// Messages asked for per pull request (1 to 256).
    pub batch: usize,
    /// Most handlers running at once (`None`: bounded only by the consumer's `max_ack_pending`).
    pub concurrency: Option<usize>,
}

/// Pulls from `consumer` until `shutdown` is cancelled or the consumer goes away, spawning
/// `handle(message)` on `tracker` for each message. Returns once nothing more is pulled; the
/// handlers may still be running.
pub async fn consume<F, Fut>(
    consumer: &PullConsumer,
    pull: Pull,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
    mut handle: F,
) -> anyhow::Result<()>
where
    F: FnMut(Message) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(pull.batch.clamp(1, 256))
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .with_context(|| format!("failed to start consuming {}s", pull.what))?;
    let permits = pull.concurrency.map(|n| Arc::new(Semaphore::new(n.max(1))));
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = messages.next() => m,
        };
        match next {
            Some(Ok(msg)) => {
                let permit = match &permits {
                    None => None,
                    Some(p) => {
                        let acquired = tokio::select! {
                            _ = shutdown.cancelled() => None,
                            permit = p.clone().acquire_owned() => permit.ok(),
                        };
                        let Some(permit) = acquired else {
                            // Stopping while it waited for a free handler: back it goes.
                            crate::AckGuard::new(msg).nak(None).await;
                            break;
                        };
                        Some(permit)
                    }
                };
                let work = handle(msg);
                tracker.spawn(async move {
                    work.await;
                    drop(permit);
                });
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, what = pull.what, "error while pulling messages; continuing");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            None => break,
        }
    }
    Ok(())
}
