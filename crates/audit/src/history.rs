//! A task's whole story as the streams hold it ([`TaskHistory`]): its events (with the record it
//! was accepted as, each assignment's reason, approvals and who decided them), the transcript of
//! every attempt, the messages of its conversation, the budget ledger's entries of its
//! reservations, and (for a tree) its children's stories. Loaded by a [`Loader`], which reads each
//! stream in bulk once and serves every task of a tree from it.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_protocol::names::event_kind;
use flotilla_protocol::{LedgerChange, LedgerEntry, MessageEvent, TaskEvent, TaskRecord, TranscriptEntry};
use serde::Serialize;

use crate::AuditError;
use crate::source::{Kind, Record, Source, Window};

/// A decoded record with where it is stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stored<T> {
    pub stream: String,
    pub seq: u64,
    pub time_ms: u64,
    #[serde(flatten)]
    pub item: T,
}

impl<T: serde::de::DeserializeOwned> Stored<T> {
    /// Decodes a record (`None`, with a warning, when it is not a `T`).
    pub fn of(r: &Record) -> Option<Self> {
        match r.decode() {
            Ok(item) => Some(Self { stream: r.stream.clone(), seq: r.seq, time_ms: r.time_ms, item }),
            Err(e) => {
                tracing::warn!(error = %e, "skipping a record");
                None
            }
        }
    }
}

/// Everything the streams say about one task.
#[derive(Debug, Clone, Serialize)]
pub struct TaskHistory {
    pub task_id: String,
    /// The task as it was accepted (the `accepted` event's detail).
    pub accepted: Option<TaskRecord>,
    /// Its current record in the tasks bucket (live sources only).
    pub record: Option<TaskRecord>,
    pub events: Vec<Stored<TaskEvent>>,
    pub transcript: Vec<Stored<TranscriptEntry>>,
    pub messages: Vec<Stored<MessageEvent>>,
    pub ledger: Vec<Stored<LedgerEntry>>,
    /// Tasks it delegated (ids), in the order they were accepted.
    pub child_ids: Vec<String>,
    /// Their stories, for a tree.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<TaskHistory>,
}

impl TaskHistory {
    /// The task's last final event (`completed` or `failed`), if it ended.
    pub fn final_event(&self) -> Option<&Stored<TaskEvent>> {
        self.events.iter().rev().find(|e| is_final(&e.item.kind))
    }

    /// The record the task was accepted as, else its live one.
    pub fn task(&self) -> Option<&TaskRecord> {
        self.accepted.as_ref().or(self.record.as_ref())
    }

    /// The transcript entries of the run that ended the task's last attempt (a crashed run's
    /// entries are superseded by the run after it): the last run id seen in the last attempt.
    pub fn last_run(&self) -> Vec<&Stored<TranscriptEntry>> {
        let Some(last) = self.transcript.iter().map(|t| t.item.attempt).max() else { return Vec::new() };
        // Of that attempt's runs, the one of the agent that ended the task when there is one (a
        // fenced-off run may still have written after it), else the last to write.
        let ender = self.final_event().and_then(|f| f.item.agent_id.clone());
        let of_attempt = || self.transcript.iter().rev().filter(|t| t.item.attempt == last);
        let run = of_attempt()
            .find(|t| ender.as_deref() == Some(t.item.agent_id.as_str()))
            .or_else(|| of_attempt().next())
            .map(|t| t.item.run_id.clone());
        self.transcript
            .iter()
            .filter(|t| t.item.attempt == last && Some(&t.item.run_id) == run.as_ref())
            .collect()
    }

    /// Whether no event of it is stored: the task is unknown (or past retention).
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.transcript.is_empty()
    }
}

/// True for the kinds that end a task.
pub fn is_final(kind: &str) -> bool {
    kind == event_kind::COMPLETED || kind == event_kind::FAILED
}

/// The tasks a ledger entry concerns (by its scopes, and by the reservation it names).
pub fn ledger_tasks(
    entry: &LedgerEntry,
    reservations: &BTreeMap<String, BTreeSet<String>>,
) -> BTreeSet<String> {
    let of_scope = |s: &str| s.strip_prefix("task.").map(str::to_owned);
    match &entry.change {
        LedgerChange::Reserve(r) => r.scopes.iter().filter_map(|s| of_scope(s)).collect(),
        LedgerChange::Carve(r) => {
            r.scopes.iter().filter_map(|s| of_scope(s)).chain(of_scope(&r.scope)).collect()
        }
        LedgerChange::Commit(r) => reservations.get(&r.id).cloned().unwrap_or_default(),
        LedgerChange::Release(r) => reservations.get(&r.id).cloned().unwrap_or_default(),
        LedgerChange::Expire(e) => reservations.get(&e.id).cloned().unwrap_or_default(),
        LedgerChange::Close(r) => of_scope(&r.scope).into_iter().collect(),
        LedgerChange::Set(r) => of_scope(&r.scope).into_iter().collect(),
        LedgerChange::Warning(b) | LedgerChange::Exhausted(b) | LedgerChange::Refilled(b) => {
            of_scope(&b.scope).into_iter().collect()
        }
        LedgerChange::Rate(_) | LedgerChange::Backoff(_) | LedgerChange::Price(_) => BTreeSet::new(),
    }
}

/// The ledger, decoded, with the tasks each entry concerns.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    pub entries: Vec<Stored<LedgerEntry>>,
    /// For each entry (same index), the tasks it concerns.
    pub tasks: Vec<BTreeSet<String>>,
}

impl Ledger {
    /// Decodes the ledger's records and links each entry to its tasks.
    pub fn of(records: &[Record]) -> Self {
        let mut reservations: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut out = Self::default();
        for r in records {
            let Some(e) = Stored::<LedgerEntry>::of(r) else { continue };
            let tasks = ledger_tasks(&e.item, &reservations);
            match &e.item.change {
                LedgerChange::Reserve(r) => {
                    reservations.insert(r.id.clone(), tasks.clone());
                }
                LedgerChange::Carve(r) => {
                    reservations.insert(r.id.clone(), tasks.clone());
                }
                _ => {}
            }
            out.entries.push(e);
            out.tasks.push(tasks);
        }
        out
    }

    /// The entries concerning `task`.
    pub fn of_task(&self, task: &str) -> Vec<Stored<LedgerEntry>> {
        self.entries
            .iter()
            .zip(&self.tasks)
            .filter(|(_, t)| t.contains(task))
            .map(|(e, _)| e.clone())
            .collect()
    }
}

/// Loads task histories from a source, reading the ledger and the accepted events once.
#[derive(Debug)]
pub struct Loader {
    source: Source,
    ledger: Option<Ledger>,
    /// Children by parent, from every `accepted` event.
    children: Option<BTreeMap<String, Vec<String>>>,
}

impl Loader {
    pub fn new(source: Source) -> Self {
        Self { source, ledger: None, children: None }
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    async fn ledger(&mut self) -> Result<&Ledger, AuditError> {
        if self.ledger.is_none() {
            let records = self.source.read(Kind::Ledger, &[], Window::default()).await?;
            self.ledger = Some(Ledger::of(&records));
        }
        Ok(self.ledger.get_or_insert_with(Ledger::default))
    }

    async fn children_of(&mut self, id: &str) -> Result<Vec<String>, AuditError> {
        if self.children.is_none() {
            let names = self.source.names().clone();
            let filter = vec![names.task_events_kind(event_kind::ACCEPTED)];
            let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for r in self.source.read(Kind::Events, &filter, Window::default()).await? {
                let Some(e) = Stored::<TaskEvent>::of(&r) else { continue };
                let parent = e.item.detail.as_ref().and_then(|d| d.get("parent_id")).and_then(|p| p.as_str());
                if let Some(p) = parent {
                    map.entry(p.to_owned()).or_default().push(e.item.task_id.clone());
                }
            }
            self.children = Some(map);
        }
        Ok(self.children.as_ref().and_then(|m| m.get(id)).cloned().unwrap_or_default())
    }

    /// One task's history (`tree`: with its children's, recursively).
    pub async fn load(&mut self, id: &str, tree: bool) -> Result<TaskHistory, AuditError> {
        let mut seen = BTreeSet::new();
        self.load_inner(id, tree, &mut seen).await
    }

    async fn load_inner(
        &mut self,
        id: &str,
        tree: bool,
        seen: &mut BTreeSet<String>,
    ) -> Result<TaskHistory, AuditError> {
        seen.insert(id.to_owned());
        let names = self.source.names().clone();
        let filters = vec![names.task_events_of(id), names.message_events_of(id)];
        let records = self.source.read(Kind::Events, &filters, Window::default()).await?;
        let message_prefix = format!("{}.events.message.", names.prefix());
        let (mut events, mut messages) = (Vec::new(), Vec::new());
        for r in &records {
            if r.subject.starts_with(&message_prefix) {
                messages.extend(Stored::<MessageEvent>::of(r));
            } else {
                events.extend(Stored::<TaskEvent>::of(r));
            }
        }
        let transcript = self
            .source
            .read(Kind::Transcripts, &[names.task_transcripts(id)], Window::default())
            .await?
            .iter()
            .filter_map(Stored::<TranscriptEntry>::of)
            .collect();
        let accepted = events
            .iter()
            .find(|e: &&Stored<TaskEvent>| e.item.kind == event_kind::ACCEPTED)
            .and_then(|e| e.item.detail.clone())
            .and_then(|d| serde_json::from_value::<TaskRecord>(d).ok());
        let record = match self.source.fleet() {
            Some(f) => current_record(f, id).await?,
            None => None,
        };
        let ledger = self.ledger().await?.of_task(id);
        let mut child_ids = self.children_of(id).await?;
        if let Some(r) = &record {
            for c in &r.children {
                if !child_ids.contains(c) {
                    child_ids.push(c.clone());
                }
            }
        }
        let mut children = Vec::new();
        if tree {
            for c in &child_ids {
                if !seen.contains(c) {
                    children.push(Box::pin(self.load_inner(c, true, seen)).await?);
                }
            }
        }
        Ok(TaskHistory {
            task_id: id.to_owned(),
            accepted,
            record,
            events,
            transcript,
            messages,
            ledger,
            child_ids,
            children,
        })
    }
}

/// The task's record in the tasks bucket, if it has one.
pub async fn current_record(
    fleet: &flotilla_service::Fleet,
    id: &str,
) -> Result<Option<TaskRecord>, AuditError> {
    let store = fleet
        .js
        .get_key_value(fleet.names.tasks_bucket())
        .await
        .map_err(|e| AuditError::Nats(format!("opening the tasks bucket: {e}")))?;
    let got = fleet
        .kv_get::<TaskRecord>(&store, id)
        .await
        .map_err(|e| AuditError::Nats(format!("reading task {id}'s record: {e}")))?;
    Ok(got.map(|(r, _)| r))
}
