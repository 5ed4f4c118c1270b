//! Where audited records come from: the live streams, read in bulk with ordered consumers (each
//! message decoded once into a [`Record`] with its stream, sequence and time), or an export file
//! written by [`crate::export`], which holds the same records. Everything above reads through
//! [`Source`], so a task can be replayed and verified after the streams' retention removed it.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull};
use flotilla_protocol::Names;
use flotilla_service::Fleet;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::AuditError;

/// One stored message: where it is and what it says (decoded from MessagePack or JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub stream: String,
    pub seq: u64,
    pub subject: String,
    /// When the stream stored it (ms since the epoch).
    pub time_ms: u64,
    pub data: Value,
}

impl Record {
    /// The record's data as `T`, or why not.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, AuditError> {
        serde_json::from_value(self.data.clone()).map_err(|e| AuditError::Undecodable {
            stream: self.stream.clone(),
            seq: self.seq,
            reason: e.to_string(),
        })
    }
}

/// The streams an audit reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Events,
    Transcripts,
    Ledger,
    DeadLetters,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Events, Kind::Transcripts, Kind::Ledger, Kind::DeadLetters];

    /// The stream's name.
    pub fn stream(self, names: &Names) -> String {
        match self {
            Kind::Events => names.events_stream(),
            Kind::Transcripts => names.transcripts_stream(),
            Kind::Ledger => names.ledger_stream(),
            Kind::DeadLetters => names.deadletter_stream(),
        }
    }
}

/// A time window (ms since the epoch, both ends included when given).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
}

impl Window {
    pub fn contains(&self, t: u64) -> bool {
        self.since_ms.is_none_or(|s| t >= s) && self.until_ms.is_none_or(|u| t <= u)
    }
}

/// Where records are read from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A fleet's live streams.
    Live(Box<Fleet>),
    /// An export file's records (loaded whole), of the fleet named by `names`.
    Export { names: Names, records: std::sync::Arc<Vec<Record>> },
}

impl Source {
    /// The fleet's names.
    pub fn names(&self) -> &Names {
        match self {
            Source::Live(f) => &f.names,
            Source::Export { names, .. } => names,
        }
    }

    /// The fleet, when reading live.
    pub fn fleet(&self) -> Option<&Fleet> {
        match self {
            Source::Live(f) => Some(f),
            Source::Export { .. } => None,
        }
    }

    /// When the oldest record of `kind` still kept was stored (`None`: the stream is empty).
    pub async fn oldest(&self, kind: Kind) -> Result<Option<u64>, AuditError> {
        let stream = kind.stream(self.names());
        match self {
            Source::Live(f) => {
                let mut s =
                    f.js.get_stream(&stream)
                        .await
                        .map_err(|e| AuditError::Nats(format!("opening stream {stream}: {e}")))?;
                let info =
                    s.info().await.map_err(|e| AuditError::Nats(format!("reading stream {stream}: {e}")))?;
                Ok((info.state.messages > 0).then(|| millis(info.state.first_timestamp)))
            }
            Source::Export { records, .. } => {
                Ok(records.iter().filter(|r| r.stream == stream).map(|r| r.time_ms).min())
            }
        }
    }

    /// Every record of `kind` on one of `filters` (NATS subject patterns; none: all) within
    /// `window`, in stream order.
    pub async fn read(
        &self,
        kind: Kind,
        filters: &[String],
        window: Window,
    ) -> Result<Vec<Record>, AuditError> {
        let stream = kind.stream(self.names());
        match self {
            Source::Live(f) => read_stream(&f.js, &stream, filters, window).await,
            Source::Export { records, .. } => Ok(records
                .iter()
                .filter(|r| {
                    r.stream == stream
                        && window.contains(r.time_ms)
                        && (filters.is_empty() || filters.iter().any(|p| subject_matches(p, &r.subject)))
                })
                .cloned()
                .collect()),
        }
    }
}

/// The time of a stream message in ms since the epoch.
fn millis(t: time::OffsetDateTime) -> u64 {
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// Reads a stream's messages on `filters` in `window` with an ordered consumer, until none is
/// left (or past `window.until_ms`).
#[tracing::instrument(skip(js, filters), fields(filters = filters.len()))]
pub async fn read_stream(
    js: &jetstream::Context,
    stream: &str,
    filters: &[String],
    window: Window,
) -> Result<Vec<Record>, AuditError> {
    let mut out = Vec::new();
    let Some(mut messages) = open(js, stream, filters, window).await? else {
        return Ok(out);
    };
    while let Some(m) = tokio::time::timeout(Duration::from_secs(30), messages.next())
        .await
        .map_err(|_| AuditError::Nats(format!("reading {stream}: nothing arrived for 30 s")))?
    {
        let m = m.map_err(|e| AuditError::Nats(format!("reading {stream}: {e}")))?;
        let (record, pending) = record_of(stream, &m)?;
        if window.until_ms.is_some_and(|u| record.time_ms > u) {
            break;
        }
        out.push(record);
        if pending == 0 {
            break;
        }
    }
    Ok(out)
}

/// An ordered consumer of `stream` from the window's start, or none when nothing matches.
pub async fn open(
    js: &jetstream::Context,
    stream: &str,
    filters: &[String],
    window: Window,
) -> Result<Option<pull::Ordered>, AuditError> {
    let s = js
        .get_stream_no_info(stream)
        .await
        .map_err(|e| AuditError::Nats(format!("opening stream {stream}: {e}")))?;
    let deliver_policy = match window.since_ms {
        Some(ms) => DeliverPolicy::ByStartTime {
            start_time: time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
        },
        None => DeliverPolicy::All,
    };
    let mut consumer = s
        .create_consumer(pull::OrderedConfig {
            name: Some(flotilla_service::nats::ordered_name()),
            filter_subjects: filters.to_vec(),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| {
            AuditError::Nats(format!(
                "reading stream {stream}: {e} (does it exist, and may this credential read it? an auditor's may)"
            ))
        })?;
    let pending = consumer
        .info()
        .await
        .map_err(|e| AuditError::Nats(format!("reading stream {stream}: {e}")))?
        .num_pending;
    if pending == 0 {
        return Ok(None);
    }
    let messages =
        consumer.messages().await.map_err(|e| AuditError::Nats(format!("reading {stream}: {e}")))?;
    Ok(Some(messages))
}

/// An ordered consumer of `stream` on `filters` from sequence `after + 1` on: new records as
/// they are stored (`flotilla replay --follow`).
pub async fn follow(
    js: &jetstream::Context,
    stream: &str,
    filters: &[String],
    after: u64,
) -> Result<pull::Ordered, AuditError> {
    let s = js
        .get_stream_no_info(stream)
        .await
        .map_err(|e| AuditError::Nats(format!("opening stream {stream}: {e}")))?;
    let consumer = s
        .create_consumer(pull::OrderedConfig {
            name: Some(flotilla_service::nats::ordered_name()),
            filter_subjects: filters.to_vec(),
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: after + 1 },
            ..Default::default()
        })
        .await
        .map_err(|e| AuditError::Nats(format!("following stream {stream}: {e}")))?;
    consumer.messages().await.map_err(|e| AuditError::Nats(format!("following {stream}: {e}")))
}

/// A stream message as a record, with how many matching messages follow it.
pub fn record_of(stream: &str, m: &jetstream::Message) -> Result<(Record, u64), AuditError> {
    let info = m.info().map_err(|e| AuditError::Nats(format!("reading {stream}: {e}")))?;
    let (seq, pending, time_ms) = (info.stream_sequence, info.pending, millis(info.published));
    let data = flotilla_service::nats::decode_payload::<Value>(m.headers.as_ref(), &m.payload)
        .unwrap_or_else(|e| serde_json::json!({ "undecodable": e.to_string(), "bytes": m.payload.len() }));
    Ok((Record { stream: stream.to_owned(), seq, subject: m.subject.to_string(), time_ms, data }, pending))
}

/// True when `subject` matches the NATS pattern `pattern` (`*` one token, `>` the rest).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(subject_matches("a.*.c", "a.b.c"));
        assert!(subject_matches("a.>", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(!subject_matches("a.*", "a.b.c"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.c"));
    }
}
