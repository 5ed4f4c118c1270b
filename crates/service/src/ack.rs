//! Acknowledgement of JetStream messages: an [`AckGuard`] that NAKs a message dropped without a
//! decision, plus in-progress acks that keep a long piece of work from being redelivered.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};

/// The delay before a message that failed for infrastructure reasons is delivered again, after
/// `delivered` deliveries: 0.5 s doubling to 30 s.
pub fn redelivery_delay(delivered: u64) -> Duration {
    let retry = u32::try_from(delivered.saturating_sub(1)).unwrap_or(u32::MAX);
    flotilla_protocol::time::backoff(Duration::from_millis(500), retry, Duration::from_secs(30))
}

/// Owns a JetStream message until it is acked, NAKed or terminated. Dropping it undecided NAKs
/// the message so it is redelivered promptly instead of waiting for the ack timeout.
#[derive(Debug)]
pub struct AckGuard {
    msg: Option<Message>,
}

impl AckGuard {
    pub fn new(msg: Message) -> Self {
        Self { msg: Some(msg) }
    }

    /// The message.
    pub fn message(&self) -> Option<&Message> {
        self.msg.as_ref()
    }

    /// How many times the message has been delivered (1 on first delivery).
    pub fn delivered(&self) -> u64 {
        self.msg
            .as_ref()
            .and_then(|m| m.info().ok())
            .map(|i| u64::try_from(i.delivered).unwrap_or(0))
            .unwrap_or(0)
    }

    /// Stream sequence of the message.
    pub fn stream_sequence(&self) -> Option<u64> {
        self.msg.as_ref().and_then(|m| m.info().ok()).map(|i| i.stream_sequence)
    }

    /// Sends the decision. A decision that does not reach the server is logged, never dropped
    /// silently: the message is then redelivered after its ack wait, and the consumer's fences
    /// (revision-checked writes, de-duplicated publishes) make the redelivery harmless.
    async fn decide(mut self, kind: AckKind, what: &'static str) {
        let Some(m) = self.msg.take() else { return };
        if let Err(e) = m.ack_with(kind).await {
            tracing::warn!(error = %e, subject = %m.subject, "failed to {what} a message; it is redelivered after its ack wait");
        }
    }

    /// Work is durable: stop redelivering.
    pub async fn ack(self) {
        self.decide(AckKind::Ack, "ack").await;
    }

    /// Redeliver, after `delay` if given.
    pub async fn nak(self, delay: Option<Duration>) {
        self.decide(AckKind::Nak(delay), "NAK").await;
    }

    /// Redeliver after a backoff that grows with the deliveries so far (0.5 s doubling to 30 s):
    /// for work that failed because NATS itself did (a KV leader election, a lost connection).
    pub async fn nak_with_backoff(self) {
        let delay = redelivery_delay(self.delivered());
        self.decide(AckKind::Nak(Some(delay)), "NAK").await;
    }

    /// Never redeliver (poison); the caller records the reason in a dead letter.
    pub async fn term(self) {
        self.decide(AckKind::Term, "terminate").await;
    }

    /// Leaves the message undecided without NAKing it: another holder of the same delivery
    /// (a concurrent redelivery being worked on) will decide.
    pub fn release(mut self) {
        self.msg = None;
    }

    /// Resets the ack timer: the work is still going.
    pub async fn progress(&self) -> Result<(), async_nats::Error> {
        match &self.msg {
            Some(m) => m.ack_with(AckKind::Progress).await,
            None => Ok(()),
        }
    }

    /// Runs `work`, sending an in-progress ack every `every` while it runs, for at most `cap` in
    /// total (after which the ack timer is allowed to run out).
    pub async fn with_progress<F: Future>(&self, every: Duration, cap: Duration, work: F) -> F::Output {
        let started = tokio::time::Instant::now();
        let mut tick = tokio::time::interval_at(started + every, every);
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = tick.tick() => {
                    if started.elapsed() < cap
                        && let Err(e) = self.progress().await
                    {
                        tracing::warn!(error = %e, "failed to send in-progress ack");
                    }
                }
            }
        }
    }
}

impl Drop for AckGuard {
    fn drop(&mut self) {
        if let Some(m) = self.msg.take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(async move {
                if let Err(e) = m.ack_with(AckKind::Nak(None)).await {
                    tracing::debug!(error = %e, "failed to NAK a dropped message");
                }
            });
        }
    }
}
