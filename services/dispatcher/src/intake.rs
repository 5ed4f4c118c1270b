//! Intake: the durable consumer on the submissions stream. Each submission is decoded, validated
//! and recorded with a KV `create` (which also de-duplicates ids beyond the stream's duplicate
//! window), announced with an `accepted` event, and only then acked. Bad input becomes a
//! `rejected` event plus a dead-letter record.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::Message;
use async_nats::jetstream::consumer::{AckPolicy, pull};
use flotilla_protocol::names::{event_kind, service};
use flotilla_protocol::validate::{Limits, task_id_for, validate};
use flotilla_protocol::{
    CapabilityRecord, ErrorInfo, RejectReason, TaskEvent, TaskRecord, TaskSubmission, codec, headers,
    time::now_ms,
};
use flotilla_service::consume::{Pull, consume};
use flotilla_service::nats::{FleetError, dead_letter_of};
use flotilla_service::{AckGuard, Fleet, Topology};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::{Config, Stats, UnknownCapability};

/// The `accepted` event of a task record (with the warnings about its submission). Its `detail`
/// is the record as accepted (input, parent, budget, labels, attempts allowed), so the event
/// stream alone tells an auditor what was asked, after the record itself has expired.
fn accepted_event(rec: &TaskRecord) -> TaskEvent {
    let mut ev = TaskEvent::for_task(rec, event_kind::ACCEPTED);
    ev.detail = serde_json::to_value(rec).ok();
    if !rec.warnings.is_empty() {
        ev.reason = Some(rec.warnings.join("; "));
    }
    ev
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
    let intake_config = pull::Config {
        durable_name: Some(fleet.names.dispatcher_intake_consumer()),
        description: Some("Flotilla dispatcher: intake of submissions".to_owned()),
        ack_policy: AckPolicy::Explicit,
        // Short, so a submission held by an instance that died is taken in by another within
        // seconds; the instance working on one keeps it with in-progress acks.
        ack_wait: config.intake_ack_wait,
        max_deliver: -1,
        max_ack_pending: i64::try_from(concurrency * 4).unwrap_or(256),
        ..Default::default()
    };
    let consumer = flotilla_service::nats::patiently(
        "the intake consumer",
        flotilla_service::nats::STARTUP_PATIENCE,
        || stream.create_consumer(intake_config.clone()),
    )
    .await
    .context("failed to ensure the intake consumer")?;
    let intake =
        Arc::new(Intake { config, fleet, topology, stats, known_capabilities: RwLock::new(HashSet::new()) });
    let tracker = TaskTracker::new();
    let pull = Pull { what: "submission", batch: concurrency, concurrency: Some(concurrency) };
    let consumed = consume(&consumer, pull, &tracker, &shutdown, |msg| {
        let intake = intake.clone();
        async move { intake.handle(msg).await }
    })
    .await;
    tracker.close();
    tracker.wait().await;
    consumed
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
        let every = self.config.intake_ack_wait / 3;
        async {
            match guard.with_progress(every, Duration::from_secs(300), self.process(&guard)).await {
                // A redelivery after a lost ack is de-duplicated.
                Ok(()) => guard.ack().await,
                Err(e) => {
                    // NATS itself is failing (e.g. a KV leader election): the submission was
                    // acknowledged to its publisher, so it is retried, never dropped, with a
                    // backoff that grows with the delivery count.
                    tracing::warn!(error = %e, delivered = guard.delivered(), "submission not recorded; will retry");
                    guard.nak_with_backoff().await;
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
        // A tenant's own subject names the tenant; its rejections go to that tenant's events,
        // where its clients (and only they) may look.
        let subject_tenant = self.fleet.names.tenant_of_submit_subject(&m.subject).map(str::to_owned);
        // Over the limits of a submission (size, depth, fields, string length): refused before
        // it is decoded, still under its own id when that can be read.
        if let Err(e) = flotilla_protocol::limits::check(
            ct.as_deref(),
            &m.payload,
            &flotilla_protocol::limits::SUBMISSION,
        ) {
            let id = readable_id(ct.as_deref(), &m.payload);
            return self.reject(m, id, subject_tenant.as_deref(), e.reason, &e.message).await;
        }
        let (mut sub, unknown) = match codec::decode_reporting::<TaskSubmission>(ct.as_deref(), &m.payload) {
            Ok(v) => v,
            // The rejection goes under the submission's own id when that much can be read, so
            // the client finds it where it looks, whatever else is wrong.
            Err(e) => {
                let id = readable_id(ct.as_deref(), &m.payload);
                return self.reject(m, id, subject_tenant.as_deref(), e.reason, &e.message).await;
            }
        };
        let id = match task_id_for(&sub, msg_id.as_deref()) {
            Ok(id) => id,
            Err(r) => return self.reject(m, None, subject_tenant.as_deref(), r.reason, &r.message).await,
        };
        let tenant = match (&subject_tenant, &sub.tenant) {
            (Some(on), Some(named)) if on != named => {
                let why = format!("submitted on tenant {on:?}'s subject but names tenant {named:?}");
                return self.reject(m, Some(id), Some(on), RejectReason::TenantMismatch, &why).await;
            }
            (Some(on), _) => Some(on.clone()),
            (None, named) => named.clone().filter(|t| flotilla_protocol::names::is_token(t)),
        };
        if subject_tenant.is_some() {
            sub.tenant = subject_tenant.clone();
        }
        tracing::Span::current().record("task_id", id.as_str());
        let limits = Limits { max_input_bytes: self.config.max_input_bytes };
        let asked_attempts = sub.max_attempts;
        let mut rec = match validate(sub, id.clone(), m.payload.len(), limits, now_ms()) {
            Ok(r) => r,
            // A bad copy of an existing task never puts a rejection into that task's history:
            // `reject` counts it as a duplicate.
            Err(r) => return self.reject(m, Some(id), tenant.as_deref(), r.reason, &r.message).await,
        };
        if self.config.unknown_capability == UnknownCapability::Reject
            && !self.capability_known(&rec.capability).await?
        {
            let why = format!("no agent in this fleet declares capability {:?}", rec.capability);
            let tenant = Some(rec.tenant.as_str());
            return self.reject(m, Some(id), tenant, RejectReason::UnknownCapability, &why).await;
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
        tenant: Option<&str>,
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
        ev.tenant = tenant.map(str::to_owned);
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
        let mut dl = dead_letter_of(m, "dispatcher.intake", reason, message);
        dl.task_id = task_id;
        let dl_id = format!("intake:{}", dl.stream_sequence.unwrap_or(0));
        self.fleet.dead_letter(service::DISPATCHER, &dl, Some(&dl_id)).await
    }
}

/// The `id` of a submission that does not decode as a whole (a field of the wrong type, nesting
/// too deep, a wrong content type), when it is a string that is a valid task id.
fn readable_id(content_type: Option<&str>, payload: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        #[serde(default)]
        id: Option<serde_json::Value>,
    }
    // As declared, else as the bytes look (a wrong or unknown content type).
    let decoded =
        codec::decode::<IdOnly>(content_type, payload).or_else(|_| codec::decode::<IdOnly>(None, payload));
    let id = match decoded {
        Ok(d) => d.id?.as_str().map(str::to_owned)?,
        // Too deep to decode at all: JSON's top level is still read, without a stack.
        Err(_) => codec::json_top_level_string(payload, "id")?,
    };
    flotilla_protocol::names::is_token(&id).then_some(id)
}
