//! The NATS connection and the [`Fleet`] handle every service works through: encoded publishes
//! with content-type and de-duplication headers, awaited JetStream acks, and typed KV access with
//! revision checks.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use flotilla_protocol::{DeadLetter, Names, TaskEvent, WireFormat, codec, headers};
use serde::{Serialize, de::DeserializeOwned};

use crate::config::ClientAuth;

/// Errors of the fleet handle's operations.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Encode(#[from] codec::EncodeError),
    #[error("stored value under {key:?} is unreadable: {source}")]
    Decode { key: String, source: codec::DecodeError },
    #[error("failed to publish to {subject}: {source}")]
    Publish { subject: String, source: async_nats::Error },
    #[error("key-value operation on {key:?} failed: {source}")]
    Kv { key: String, source: async_nats::Error },
    /// A revision-checked write lost to a concurrent writer.
    #[error("key {key:?} changed concurrently (revision check failed)")]
    Conflict { key: String },
    /// `create` found the key already present, or a message that must be the first on its
    /// subject found the subject taken.
    #[error("key {key:?} already exists")]
    Exists { key: String },
}

impl FleetError {
    /// True for a lost revision race or an existing key: re-read and decide again.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Self::Conflict { .. } | Self::Exists { .. })
    }
}

/// The `Nats-Msg-Id` of a task event: `task:kind:attempt[:step[:text_seq]]`, the same for every
/// publish of the same event, so a re-announcement is dropped by the stream's de-duplication.
pub fn event_msg_id(event: &TaskEvent) -> String {
    let mut msg_id = format!("{}:{}:{}", event.task_id, event.kind, event.attempt.unwrap_or(0));
    if let Some(step) = event.step {
        msg_id.push_str(&format!(":{step}"));
        if let Some(seq) = event.text_seq {
            msg_id.push_str(&format!(":{seq}"));
        }
    }
    msg_id
}

/// The tenant whose subjects carry a task event: its `tenant`, else the default tenant (an
/// event with no tenant, or with one that is no subject token, can only be the rejection of a
/// submission that named none readable).
pub fn event_tenant(event: &TaskEvent) -> &str {
    event
        .tenant
        .as_deref()
        .filter(|t| flotilla_protocol::names::is_token(t))
        .unwrap_or(flotilla_protocol::DEFAULT_TENANT)
}

/// A fresh name for an ordered consumer. Named, its create request carries its filter in the
/// subject (`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`), which NATS permissions can pin
/// to what the identity may read; an unnamed one could ask for anything.
pub fn ordered_name() -> String {
    format!("o{}", uuid::Uuid::now_v7().simple())
}

/// The content type a message names, if any.
pub fn content_type(h: Option<&HeaderMap>) -> Option<&str> {
    h.and_then(|h| h.get(headers::CONTENT_TYPE)).map(|v| v.as_str())
}

/// Decodes a message's payload in the format its content type names (MessagePack, or JSON when
/// it says so or, without one, when the payload looks like JSON).
pub fn decode_payload<T: DeserializeOwned>(
    h: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<T, codec::DecodeError> {
    codec::decode(content_type(h), payload)
}

/// Decodes a request to a service like [`decode_payload`], first holding it to the limits of a
/// request ([`flotilla_protocol::limits::REQUEST`]: `too_large`, `too_deep`, `too_many_fields`,
/// `string_too_long`).
pub fn decode_request<T: DeserializeOwned>(
    h: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<T, codec::DecodeError> {
    flotilla_protocol::limits::check(content_type(h), payload, &flotilla_protocol::limits::REQUEST)?;
    codec::decode(content_type(h), payload)
}

/// How long a service's start-up asks JetStream again ([`patiently`]).
pub const STARTUP_PATIENCE: std::time::Duration = std::time::Duration::from_secs(15);

/// Runs `step` until it succeeds, asking again (100 ms, doubling to 1 s) for up to `patience`
/// after a failure: for the JetStream calls of a service's start-up, which fail for a moment
/// when the server reloads a changed accounts configuration (a runner or tenant added answers
/// 503 or "stream not found" briefly), and must not take the service down with them.
pub async fn patiently<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    patience: std::time::Duration,
    mut step: impl FnMut() -> F,
) -> Result<T, E> {
    let started = tokio::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(100);
    loop {
        match step().await {
            Ok(v) => return Ok(v),
            Err(e) if started.elapsed() < patience => {
                tracing::info!(what, error = %e, "not ready yet; asking again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(1));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The format to answer a request in: the request's own.
pub fn format_of(h: Option<&HeaderMap>, payload: &[u8]) -> WireFormat {
    if codec::is_json(content_type(h), payload) { WireFormat::Json } else { WireFormat::Msgpack }
}

/// Whether a service may answer on `reply`. Never where the answer would be stored or acted on:
/// the fleet's own subjects (its streams and buckets among them) or the server's (`$JS`, `$KV`,
/// `$O`, `$SRV`, `$SYS`): the server does not check a reply subject against the responder's
/// permissions, so answering there would let any client write into a stream of the fleet.
pub fn reply_allowed(reply: &str, names: &Names) -> bool {
    let own = format!("{}.", names.prefix());
    !reply.is_empty()
        && !reply.starts_with(&own)
        && !["$JS.", "$KV.", "$O.", "$SRV.", "$SYS.", "$JSC."].iter().any(|p| reply.starts_with(p))
}

/// A dead letter of a stream message: its subject, stream sequence, headers and payload.
pub fn dead_letter_of(msg: &jetstream::Message, source: &str, reason: &str, message: &str) -> DeadLetter {
    let mut hdrs = std::collections::BTreeMap::new();
    if let Some(h) = &msg.headers {
        for (k, vs) in h.iter() {
            if let Some(v) = vs.first() {
                hdrs.insert(k.to_string(), v.as_str().to_owned());
            }
        }
    }
    DeadLetter::new(source, reason, message, msg.subject.as_str(), &msg.payload)
        .sequence(msg.info().ok().map(|i| i.stream_sequence))
        .headers(hdrs)
}

/// Connects to NATS, retrying the first connection so services can start before the server.
pub async fn connect(url: &str, name: &str, auth: &ClientAuth) -> anyhow::Result<async_nats::Client> {
    use anyhow::Context as _;
    auth.options(async_nats::ConnectOptions::new())?
        .name(name)
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(10)))
        .connect(url)
        .await
        .with_context(|| format!("failed to connect to NATS at {url}"))
}

impl ClientAuth {
    /// Credentials from a seed file only.
    pub fn creds(path: impl Into<std::path::PathBuf>) -> Self {
        Self { creds: Some(path.into()), ..Self::default() }
    }

    /// `options` with this identity's seed and inbox prefix, and TLS when a CA is given.
    pub fn options(
        &self,
        mut options: async_nats::ConnectOptions,
    ) -> anyhow::Result<async_nats::ConnectOptions> {
        // An empty setting (`FLOTILLA_CREDS=`) is none.
        if let Some(path) = self.creds.as_ref().filter(|p| !p.as_os_str().is_empty()) {
            options = crate::auth::Credentials::load(path)?.apply(options);
        }
        if let Some(ca) = self.tls_ca.as_ref().filter(|p| !p.as_os_str().is_empty()) {
            options = options.require_tls(true).add_root_certificates(ca.clone());
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => options = options.add_client_certificate(cert.clone(), key.clone()),
            (None, None) => {}
            _ => anyhow::bail!("a client certificate needs both tls_cert and tls_key"),
        }
        Ok(options)
    }
}

/// A message sent to a stream whose ack has not been awaited yet.
#[must_use = "a sent message is durable only once confirmed"]
pub struct Pending {
    subject: String,
    ack: PublishAckFuture,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").field("subject", &self.subject).finish_non_exhaustive()
    }
}

impl Pending {
    /// Waits until the stream has stored the message. A message refused because its subject
    /// already holds one (`Nats-Expected-Last-Subject-Sequence`) is [`FleetError::Exists`].
    pub async fn confirmed(self) -> Result<(), FleetError> {
        self.acked().await.map(drop)
    }

    /// Like [`Self::confirmed`], with the stream's ack (stream, sequence, whether it was a
    /// duplicate).
    pub async fn acked(self) -> Result<jetstream::publish::PublishAck, FleetError> {
        match self.ack.await {
            Ok(ack) => Ok(ack),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                Err(FleetError::Exists { key: self.subject })
            }
            Err(e) => Err(FleetError::Publish { subject: self.subject, source: e.into() }),
        }
    }
}

/// One fleet on one connection: names, output format and JetStream context.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub names: Names,
    pub format: WireFormat,
    /// This process's instance id (logs, health, registry).
    pub instance: String,
    /// Whether this connection authenticated with a credential: authentication is on, so
    /// control actions must carry an operator's signature.
    pub authenticated: bool,
}

impl Fleet {
    /// A fleet handle on an existing connection.
    pub fn new(client: async_nats::Client, names: Names, format: WireFormat, instance: String) -> Self {
        let js = jetstream::new(client.clone());
        Self { client, js, names, format, instance, authenticated: false }
    }

    /// The same handle, marked as connected with a credential (see [`Self::authenticated`]).
    pub fn authenticated(mut self, yes: bool) -> Self {
        self.authenticated = yes;
        self
    }

    /// Headers every published message carries.
    pub fn headers(&self, msg_id: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(headers::CONTENT_TYPE, self.format.content_type());
        if let Some(id) = msg_id {
            h.insert(headers::NATS_MSG_ID, id);
        }
        crate::trace::inject(&mut h);
        h
    }

    /// Encodes a value in the fleet's output format.
    pub fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes, FleetError> {
        Ok(Bytes::from(codec::encode(self.format, value)?))
    }

    /// Publishes to a stream and waits until the stream has stored it.
    pub async fn publish_durable<T: Serialize + ?Sized>(
        &self,
        subject: String,
        value: &T,
        msg_id: Option<&str>,
    ) -> Result<(), FleetError> {
        self.send_durable(subject, value, msg_id).await?.confirmed().await
    }

    /// Sends a message to a stream without waiting for the stream's ack: the returned [`Pending`]
    /// is awaited later, so several writes overlap instead of taking one round trip each. Messages
    /// sent on one connection reach a stream in the order they were sent.
    pub async fn send_durable<T: Serialize + ?Sized>(
        &self,
        subject: String,
        value: &T,
        msg_id: Option<&str>,
    ) -> Result<Pending, FleetError> {
        let payload = self.encode(value)?;
        self.send_with_headers(subject, self.headers(msg_id), payload).await
    }

    /// Sends `payload` with `headers` (see [`Self::headers`]) to a stream; awaited as
    /// [`Self::send_durable`]'s.
    pub async fn send_with_headers(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<Pending, FleetError> {
        match self.js.publish_with_headers(subject.clone(), headers, payload).await {
            Ok(ack) => Ok(Pending { subject, ack }),
            Err(e) => Err(FleetError::Publish { subject, source: e.into() }),
        }
    }

    /// Publishes a task event, de-duplicated per task, kind, attempt (and step, and the sequence
    /// number of a partial-text event).
    pub async fn publish_event(&self, event: &TaskEvent) -> Result<(), FleetError> {
        self.send_event(event).await?.confirmed().await
    }

    /// Publishes a message event on `<p>.events.message.<task>.<kind>`, de-duplicated per
    /// message and kind.
    pub async fn publish_message_event(
        &self,
        event: &flotilla_protocol::MessageEvent,
    ) -> Result<(), FleetError> {
        self.send_message_event(event).await?.confirmed().await
    }

    /// Sends a message event without waiting for its ack (see [`Self::send_durable`]).
    pub async fn send_message_event(
        &self,
        event: &flotilla_protocol::MessageEvent,
    ) -> Result<Pending, FleetError> {
        let task = event.task_id.as_deref().unwrap_or("_");
        let subject = self.names.message_event_subject(task, &event.kind);
        let msg_id = format!("msg:{}:{}", event.message_id, event.kind);
        self.send_durable(subject, event, Some(&msg_id)).await
    }

    /// Sends a task event without waiting for its ack (see [`Self::send_durable`]).
    pub async fn send_event(&self, event: &TaskEvent) -> Result<Pending, FleetError> {
        let subject = self.names.task_event_subject(event_tenant(event), &event.task_id, &event.kind);
        self.send_durable(subject, event, Some(&event_msg_id(event))).await
    }

    /// Sends a task event under a de-duplication id of the caller's (for events that may rightly
    /// happen more than once per attempt, such as an assignment taken back and made again).
    pub async fn send_event_with_id(&self, event: &TaskEvent, msg_id: &str) -> Result<Pending, FleetError> {
        let subject = self.names.task_event_subject(event_tenant(event), &event.task_id, &event.kind);
        self.send_durable(subject, event, Some(msg_id)).await
    }

    /// Sends a task event that may only ever be stored once on its subject (e.g. `accepted`):
    /// besides the de-duplication id it carries `Nats-Expected-Last-Subject-Sequence: 0`, so the
    /// stream refuses it, at any age, when the subject already holds a message. The refusal
    /// comes back from [`Pending::confirmed`] as [`FleetError::Exists`].
    pub async fn send_first_event(&self, event: &TaskEvent) -> Result<Pending, FleetError> {
        let subject = self.names.task_event_subject(event_tenant(event), &event.task_id, &event.kind);
        let mut h = self.headers(Some(&event_msg_id(event)));
        h.insert(async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
        let payload = self.encode(event)?;
        self.send_with_headers(subject, h, payload).await
    }

    /// Sends a message to a stream only if the stream's last sequence is `expected` (the fence of
    /// a single writer: a writer that is not the only one finds out at its next write), marked as
    /// written by `source` (`Flotilla-Source`), so a reader tells the writer's messages from
    /// anything else that landed on the stream's subjects. Refused, its [`Pending::confirmed`] is
    /// [`FleetError::Exists`].
    pub async fn send_fenced<T: Serialize + ?Sized>(
        &self,
        subject: String,
        value: &T,
        expected: u64,
        source: &str,
    ) -> Result<Pending, FleetError> {
        let mut h = self.headers(None);
        h.insert(async_nats::header::NATS_EXPECTED_LAST_SEQUENCE, expected.to_string().as_str());
        h.insert(headers::FLOTILLA_SOURCE, source);
        let payload = self.encode(value)?;
        self.send_with_headers(subject, h, payload).await
    }

    /// Stores a dead letter under `<p>.deadletter.<service>`, de-duplicated by `msg_id` if given.
    pub async fn dead_letter(
        &self,
        service: &str,
        dl: &DeadLetter,
        msg_id: Option<&str>,
    ) -> Result<(), FleetError> {
        self.publish_durable(self.names.deadletter_subject(service), dl, msg_id).await
    }

    /// Answers a core NATS request with `value`, in the request's own format, if it has a reply
    /// subject a service may answer on ([`reply_allowed`]). Failures are logged: the requester
    /// times out and may ask again.
    pub async fn respond<T: Serialize + ?Sized>(&self, req: &async_nats::Message, value: &T) {
        let Some(reply) = req.reply.clone() else { return };
        if !reply_allowed(&reply, &self.names) {
            tracing::warn!(subject = %req.subject, %reply, "request with a reply subject into the fleet's own or the server's subjects: not answered");
            return;
        }
        let format = format_of(req.headers.as_ref(), &req.payload);
        let body = match codec::encode(format, value) {
            Ok(b) => Bytes::from(b),
            Err(e) => return tracing::warn!(error = %e, subject = %req.subject, "failed to encode an answer"),
        };
        let mut h = HeaderMap::new();
        h.insert(headers::CONTENT_TYPE, format.content_type());
        if let Err(e) = self.client.publish_with_headers(reply, h, body).await {
            tracing::warn!(error = %e, subject = %req.subject, "failed to answer a request");
        }
    }

    /// Reads and decodes a KV value with its revision.
    pub async fn kv_get<T: DeserializeOwned>(
        &self,
        store: &kv::Store,
        key: &str,
    ) -> Result<Option<(T, u64)>, FleetError> {
        let entry =
            store.entry(key).await.map_err(|e| FleetError::Kv { key: key.to_owned(), source: e.into() })?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let v = codec::decode(None, &e.value)
                    .map_err(|source| FleetError::Decode { key: key.to_owned(), source })?;
                Ok(Some((v, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Every key of a bucket that holds or held a value (a deleted key may be among them: read
    /// it to know), sorted. Taken from the stream's own subject counts, one consistent answer:
    /// a listing through a consumer (`Store::keys`) can end early while keys are being rewritten,
    /// as heartbeats are all the time.
    pub async fn kv_keys(&self, store: &kv::Store) -> Result<Vec<String>, FleetError> {
        use futures::TryStreamExt as _;
        let failed = |e: async_nats::Error| FleetError::Kv { key: ">".to_owned(), source: e };
        let subjects: Vec<(String, usize)> = store
            .stream
            .info_with_subjects(format!("{}>", store.prefix))
            .await
            .map_err(|e| failed(e.into()))?
            .try_collect()
            .await
            .map_err(|e| failed(e.into()))?;
        let mut keys: Vec<String> = subjects
            .into_iter()
            .filter_map(|(s, _)| s.strip_prefix(&store.prefix).map(str::to_owned))
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// True when the key holds a value (not deleted or purged).
    pub async fn kv_exists(&self, store: &kv::Store, key: &str) -> Result<bool, FleetError> {
        let entry =
            store.entry(key).await.map_err(|e| FleetError::Kv { key: key.to_owned(), source: e.into() })?;
        Ok(entry.is_some_and(|e| e.operation == kv::Operation::Put))
    }

    /// Creates a KV key; fails with [`FleetError::Exists`] when it is already there.
    pub async fn kv_create<T: Serialize>(
        &self,
        store: &kv::Store,
        key: &str,
        value: &T,
    ) -> Result<u64, FleetError> {
        let payload = self.encode(value)?;
        store.create(key, payload).await.map_err(|e| {
            if e.kind() == kv::CreateErrorKind::AlreadyExists {
                FleetError::Exists { key: key.to_owned() }
            } else {
                FleetError::Kv { key: key.to_owned(), source: e.into() }
            }
        })
    }

    /// Writes a KV key only if it is still at `revision`; [`FleetError::Conflict`] otherwise.
    pub async fn kv_update<T: Serialize>(
        &self,
        store: &kv::Store,
        key: &str,
        value: &T,
        revision: u64,
    ) -> Result<u64, FleetError> {
        let payload = self.encode(value)?;
        store.update(key, payload, revision).await.map_err(|e| {
            if e.kind() == kv::UpdateErrorKind::WrongLastRevision {
                FleetError::Conflict { key: key.to_owned() }
            } else {
                FleetError::Kv { key: key.to_owned(), source: e.into() }
            }
        })
    }

    /// Writes a KV key unconditionally (for values with a single writer, such as heartbeats).
    pub async fn kv_put<T: Serialize>(
        &self,
        store: &kv::Store,
        key: &str,
        value: &T,
    ) -> Result<u64, FleetError> {
        let payload = self.encode(value)?;
        store.put(key, payload).await.map_err(|e| FleetError::Kv { key: key.to_owned(), source: e.into() })
    }

    /// Reads, changes and writes back a KV value with a revision check, retrying lost races up to
    /// `attempts` times. `change` returns `None` to leave the value alone.
    pub async fn kv_modify<T, F>(
        &self,
        store: &kv::Store,
        key: &str,
        attempts: u32,
        mut change: F,
    ) -> Result<Option<(T, u64)>, FleetError>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(T) -> Option<T>,
    {
        for _ in 0..attempts.max(1) {
            let Some((current, rev)) = self.kv_get::<T>(store, key).await? else {
                return Ok(None);
            };
            let Some(next) = change(current) else {
                return Ok(None);
            };
            match self.kv_update(store, key, &next, rev).await {
                Ok(new_rev) => return Ok(Some((next, new_rev))),
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e),
            }
        }
        Err(FleetError::Conflict { key: key.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_go_only_outside_the_fleet_s_and_the_server_s_subjects() {
        let names = Names::default();
        assert!(reply_allowed("_INBOX.abc.1", &names));
        assert!(!reply_allowed("", &names));
        assert!(!reply_allowed("flotilla.ledger.reserve", &names));
        assert!(reply_allowed("flotillas.x", &names), "only the prefix's own subjects");
        for system in ["$JS.API.x", "$KV.b.k", "$O.s", "$SRV.PING", "$SYS.REQ", "$JSC.R"] {
            assert!(!reply_allowed(system, &names), "{system}");
        }
    }

    #[test]
    fn event_msg_ids_tell_steps_and_partial_text_apart() {
        let mut e = TaskEvent::new("t1", "progress");
        e.attempt = Some(2);
        assert_eq!(event_msg_id(&e), "t1:progress:2");
        e.step = Some(3);
        assert_eq!(event_msg_id(&e), "t1:progress:2:3");
        e.text_seq = Some(7);
        assert_eq!(event_msg_id(&e), "t1:progress:2:3:7");
    }
}
