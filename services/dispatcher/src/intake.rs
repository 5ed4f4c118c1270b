//! Intake: the durable consumer on the submissions stream. Each submission is decoded, validated
//! and recorded with a KV `create` (which also de-duplicates ids beyond the stream's duplicate
//! window), announced with an `accepted` event, and only then acked. Bad input becomes a
//! `rejected` event plus a dead-letter record.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::Message;
use async_nats::jetstream::consumer::{AckPolicy, pull};
use flotilla_protocol::names::event_kind;
use flotilla_protocol::validate::{Limits, task_id_for, validate};
use flotilla_protocol::{
    CapabilityRecord, DeadLetter, ErrorInfo, RejectReason, TaskEvent, TaskRecord, TaskSubmission, codec,
    headers, time::now_ms,
};
use flotilla_service::{AckGuard, Fleet, Topology, nats::FleetError};
use futures::StreamExt as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::{Config, Stats, UnknownCapability};

/// The `accepted` event of a task record (with the warnings about its submission).
fn accepted_event(rec: &TaskRecord) -> TaskEvent {
    let mut ev = TaskEvent::for_task(rec, event_kind::ACCEPTED);
    if !rec.warnings.is_empty() {
        ev.reason = Some(rec.warnings.join("; "));
    }
    ev
}

/// Backoff for a submission that failed for infrastructure reasons: 0.5 s doubling to 30 s.
fn retry_delay(delivered: u64) -> Duration {
    let exp = u32::try_from(delivered.saturating_sub(1).min(6)).unwrap_or(6);
    Duration::from_millis(500).saturating_mul(2u32.saturating_pow(exp)).min(Duration::from_secs(30))
}

struct Intake {
    config: Config,
    fleet: Fleet,
    topology: Topology,
    stats: Arc<Stats>,
    known_capabilities: RwLock<HashSet<String>>,
}

pub async fn run(
    config: Config,
    fleet: Fleet,
    topology: Topology,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let stream = fleet
        .js
        .get_stream(fleet.names.submissions_stream())
        .await
        .context("failed to open the submissions stream")?;
    let concurrency = config.intake_concurrency.max(1);
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(fleet.names.dispatcher_intake_consumer()),
            description: Some("Flotilla dispatcher: intake of submissions".to_owned()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_deliver: -1,
            max_ack_pending: i64::try_from(concurrency * 4).unwrap_or(256),
            ..Default::default()
        })
        .await
        .context("failed to ensure the intake consumer")?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(concurrency.min(256))
        .heartbeat(Duration::from_secs(5))
        .messages()
        .await
        .context("failed to start consuming submissions")?;
    let intake =
        Arc::new(Intake { config, fleet, topology, stats, known_capabilities: RwLock::new(HashSet::new()) });
    let permits = Arc::new(Semaphore::new(concurrency));
    let tracker = TaskTracker::new();
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = messages.next() => m,
        };
        match next {
            Some(Ok(msg)) => {
                let Ok(permit) = permits.clone().acquire_owned().await else { break };
                let intake = intake.clone();
                tracker.spawn(async move {
                    intake.handle(msg).await;
                    drop(permit);
                });
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "submission stream error; continuing");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            None => break,
        }
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}

fn header(m: &Message, name: &str) -> Option<String> {
    m.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_owned())
}

impl Intake {
    async fn handle(&self, msg: Message) {
        let seq = msg.info().ok().map(|i| i.stream_sequence).unwrap_or(0);
        let span =
            tracing::info_span!("submission", subject = %msg.subject, seq, task_id = tracing::field::Empty);
        flotilla_service::trace::continue_from(&span, msg.headers.as_ref());
        let guard = AckGuard::new(msg);
        async {
            match self.process(&guard).await {
                Ok(()) => {
                    if let Err(e) = guard.ack().await {
                        tracing::warn!(error = %e, "ack failed; the redelivery will be de-duplicated");
                    }
                }
                Err(e) => {
                    // NATS itself is failing (e.g. a KV leader election): the submission was
                    // acknowledged to its publisher, so it is retried, never dropped, with a
                    // backoff that grows with the delivery count.
                    let delay = retry_delay(guard.delivered());
                    tracing::warn!(error = %e, ?delay, "submission not recorded; will retry");
                    let _ = guard.nak(Some(delay)).await;
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn process(&self, guard: &AckGuard) -> Result<(), FleetError> {
        let Some(m) = guard.message() else { return Ok(()) };
        let msg_id = header(m, headers::NATS_MSG_ID);
        let ct = header(m, headers::CONTENT_TYPE);
        let (sub, unknown) = match codec::decode_reporting::<TaskSubmission>(ct.as_deref(), &m.payload) {
            Ok(v) => v,
            Err(e) => return self.reject(m, None, e.reason, &e.message).await,
        };
        let id = match task_id_for(&sub, msg_id.as_deref()) {
            Ok(id) => id,
            Err(r) => return self.reject(m, None, r.reason, &r.message).await,
        };
        tracing::Span::current().record("task_id", id.as_str());
        let limits = Limits { max_input_bytes: self.config.max_input_bytes };
        let asked_attempts = sub.max_attempts;
        let mut rec = match validate(sub, id.clone(), m.payload.len(), limits, now_ms()) {
            Ok(r) => r,
            // A bad copy of an existing task never puts a rejection into that task's history:
            // `reject` counts it as a duplicate.
            Err(r) => return self.reject(m, Some(id), r.reason, &r.message).await,
        };
        if self.config.unknown_capability == UnknownCapability::Reject
            && !self.capability_known(&rec.capability).await?
        {
            let why = format!("no agent in this fleet declares capability {:?}", rec.capability);
            return self.reject(m, Some(id), RejectReason::UnknownCapability, &why).await;
        }
        if asked_attempts.is_none() {
            rec.max_attempts = self.config.default_max_attempts;
        }
        rec.warnings = unknown.into_iter().map(|f| format!("unknown field ignored: {f}")).collect();
        rec.trace = flotilla_service::trace::current_traceparent();
        // `accepted` is sent before the record is created, on the same connection, so it precedes
        // every later event of the task in the stream; both writes are in flight together (one
        // round trip). It can only be stored once per task (at any age, not only within the
        // stream's duplicate window), so a retry or a duplicate adds nothing; the record's
        // `create` de-duplicates ids for as long as task records are kept.
        let accepted = self.fleet.send_first_event(&accepted_event(&rec)).await?;
        let created = self.fleet.kv_create(&self.topology.tasks, &id, &rec).await;
        let announced = accepted.confirmed().await;
        match created {
            Ok(_) => {
                match announced {
                    // Stored now, or by an earlier delivery of this submission.
                    Ok(()) | Err(FleetError::Exists { .. }) => {}
                    // Recorded but not announced: the redelivery announces it (below).
                    Err(e) => return Err(e),
                }
                self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(FleetError::Exists { .. }) => {
                if matches!(announced, Err(ref e) if !matches!(e, FleetError::Exists { .. })) {
                    // This may be the redelivery of a submission whose record was created but
                    // whose `accepted` failed: announce the stored record (once, at most).
                    if let Some((stored, _)) =
                        self.fleet.kv_get::<TaskRecord>(&self.topology.tasks, &id).await?
                    {
                        match self.fleet.send_first_event(&accepted_event(&stored)).await?.confirmed().await {
                            Ok(()) | Err(FleetError::Exists { .. }) => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
                self.duplicate();
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn duplicate(&self) {
        self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
        tracing::info!("duplicate submission: the task already exists");
    }

    async fn capability_known(&self, capability: &str) -> Result<bool, FleetError> {
        if self.known_capabilities.read().map(|k| k.contains(capability)).unwrap_or(false) {
            return Ok(true);
        }
        let found =
            self.fleet.kv_get::<CapabilityRecord>(&self.topology.capabilities, capability).await?.is_some();
        if found && let Ok(mut k) = self.known_capabilities.write() {
            k.insert(capability.to_owned());
        }
        Ok(found)
    }

    /// Publishes a `rejected` event and a dead-letter record; the submission is then acked.
    async fn reject(
        &self,
        m: &Message,
        id: Option<String>,
        reason: RejectReason,
        message: &str,
    ) -> Result<(), FleetError> {
        // A copy of an existing task that no longer passes (its deadline has passed since, say)
        // is a duplicate: that task already ran, or will.
        if let Some(id) = &id
            && self.fleet.kv_exists(&self.topology.tasks, id).await?
        {
            self.duplicate();
            return Ok(());
        }
        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        let seq = m.info().ok().map(|i| i.stream_sequence);
        // An undecodable submission has no id of its own: use its message id or stream position.
        let fallback = format!("rejected-{}", seq.unwrap_or(0));
        let task_id = match id {
            // Checked above: no task has it.
            Some(id) => id,
            None => match header(m, headers::NATS_MSG_ID).filter(|i| flotilla_protocol::names::is_token(i)) {
                // Never file a rejection under the id of a task that exists.
                Some(h) if !self.fleet.kv_exists(&self.topology.tasks, &h).await? => h,
                _ => fallback,
            },
        };
        tracing::info!(task_id = %task_id, reason = reason.code(), %message, "submission rejected");
        let mut ev = TaskEvent::new(task_id.clone(), event_kind::REJECTED);
        ev.error = Some(ErrorInfo::new(reason.code(), message));
        self.fleet.publish_event(&ev).await?;
        self.dead_letter(m, Some(task_id), reason.code(), message).await
    }

    /// Records a submission that will not run, with the reason and the original bytes.
    async fn dead_letter(
        &self,
        m: &Message,
        task_id: Option<String>,
        reason: &str,
        message: &str,
    ) -> Result<(), FleetError> {
        use base64::Engine as _;
        let seq = m.info().ok().map(|i| i.stream_sequence);
        let mut hdrs = BTreeMap::new();
        if let Some(h) = &m.headers {
            for (k, vs) in h.iter() {
                if let Some(v) = vs.first() {
                    hdrs.insert(k.to_string(), v.as_str().to_owned());
                }
            }
        }
        let cut = m.payload.get(..m.payload.len().min(64 * 1024)).unwrap_or_default();
        let dl = DeadLetter {
            source: "dispatcher.intake".to_owned(),
            reason: reason.to_owned(),
            message: message.to_owned(),
            task_id,
            subject: m.subject.to_string(),
            stream_sequence: seq,
            payload_base64: base64::engine::general_purpose::STANDARD.encode(cut),
            payload_len: u64::try_from(m.payload.len()).unwrap_or(u64::MAX),
            headers: hdrs,
            at_ms: now_ms(),
            attempts: Vec::new(),
        };
        let dl_id = format!("intake:{}", seq.unwrap_or(0));
        self.fleet.publish_durable(self.fleet.names.deadletter_subject("dispatcher"), &dl, Some(&dl_id)).await
    }
}
