//! A task's history told: one time-ordered line per stored record (events, transcript entries,
//! messages, ledger entries), each with its stream sequence, under a summary of the task; or the
//! same records as JSON lines for scripts.

use std::fmt::Write as _;

use flotilla_protocol::names::event_kind;
use flotilla_protocol::{
    LedgerChange, LedgerEntry, MessageEvent, TaskEvent, TranscriptEntry, transcript_kind,
};
use serde_json::{Value, json};

use crate::history::{Stored, TaskHistory};

/// One line of the story.
#[derive(Debug, Clone, Copy)]
pub enum Item<'a> {
    Event(&'a Stored<TaskEvent>),
    Transcript(&'a Stored<TranscriptEntry>),
    Message(&'a Stored<MessageEvent>),
    Ledger(&'a Stored<LedgerEntry>),
}

impl Item<'_> {
    fn key(&self) -> (u64, u8, u64) {
        match self {
            Item::Event(e) => (e.time_ms, 0, e.seq),
            Item::Transcript(t) => (t.time_ms, 1, t.seq),
            Item::Message(m) => (m.time_ms, 0, m.seq),
            Item::Ledger(l) => (l.time_ms, 2, l.seq),
        }
    }

    /// The item as one JSON line's object.
    pub fn json(&self, task: &str) -> Value {
        let (kind, v) = match self {
            Item::Event(e) => ("event", serde_json::to_value(e)),
            Item::Transcript(t) => ("transcript", serde_json::to_value(t)),
            Item::Message(m) => ("message", serde_json::to_value(m)),
            Item::Ledger(l) => ("ledger", serde_json::to_value(l)),
        };
        let mut v = v.unwrap_or(Value::Null);
        if let Some(o) = v.as_object_mut() {
            o.insert("record_type".into(), json!(kind));
            o.insert("of_task".into(), json!(task));
        }
        v
    }
}

/// The items of a history (not its children's), in time order.
pub fn items(h: &TaskHistory) -> Vec<Item<'_>> {
    let mut items: Vec<Item<'_>> = h
        .events
        .iter()
        .map(Item::Event)
        .chain(h.transcript.iter().map(Item::Transcript))
        .chain(h.messages.iter().map(Item::Message))
        .chain(h.ledger.iter().map(Item::Ledger))
        .collect();
    items.sort_by_key(Item::key);
    items
}

/// The history as JSON lines (each task's items, then its children's).
pub fn jsonl(h: &TaskHistory, out: &mut String) {
    for i in items(h) {
        let _ = writeln!(out, "{}", i.json(&h.task_id));
    }
    for c in &h.children {
        jsonl(c, out);
    }
}

/// `HH:MM:SS.mmm` (UTC) of a time in ms.
pub fn clock(ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!("{:02}:{:02}:{:02}.{:03}", t.hour(), t.minute(), t.second(), t.millisecond())
}

/// A date and time (UTC) of a time in ms.
pub fn date_time(ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!("{}-{:02}-{:02} {} UTC", t.year(), u8::from(t.month()), t.day(), clock(ms))
}

/// At most `n` characters of `s` on one line.
pub fn short(s: &str, n: usize) -> String {
    let one: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one.chars().count() <= n {
        one
    } else {
        let mut cut: String = one.chars().take(n).collect();
        cut.push('…');
        cut
    }
}

fn compact(v: &Value, n: usize) -> String {
    match v {
        Value::String(s) => format!("{:?}", short(s, n)),
        other => short(&other.to_string(), n),
    }
}

/// The story as text (children indented under their parent with `tree`).
pub fn text(h: &TaskHistory, out: &mut String) {
    text_at(h, out, 0);
}

fn text_at(h: &TaskHistory, out: &mut String, depth: usize) {
    let pad = "  ".repeat(depth);
    summary(h, out, &pad);
    for i in items(h) {
        let (stream_seq, time) = match i {
            Item::Event(e) => (format!("events#{}", e.seq), e.time_ms),
            Item::Transcript(t) => (format!("transcripts#{}", t.seq), t.time_ms),
            Item::Message(m) => (format!("events#{}", m.seq), m.time_ms),
            Item::Ledger(l) => (format!("ledger#{}", l.seq), l.time_ms),
        };
        let _ = writeln!(out, "{pad}  {}  {stream_seq:<15} {}", clock(time), line(&i));
    }
    for c in &h.children {
        let _ = writeln!(out);
        let _ = writeln!(out, "{pad}  └─ child of {}:", h.task_id);
        text_at(c, out, depth + 2);
    }
}

fn summary(h: &TaskHistory, out: &mut String, pad: &str) {
    let _ = write!(out, "{pad}task {}", h.task_id);
    if let Some(t) = h.task() {
        let _ = write!(out, " · capability {} · tenant {} · priority {}", t.capability, t.tenant, t.priority);
        if let Some(p) = &t.parent_id {
            let _ = write!(out, " · child of {p}");
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "{pad}  input: {}", compact(&t.input, 160));
    } else {
        let _ = writeln!(out);
    }
    let attempts = h.events.iter().filter_map(|e| e.item.attempt).max().unwrap_or(0);
    match h.final_event() {
        Some(f) => {
            let tokens = f.item.usage.map(|u| u.total_tokens).unwrap_or(0);
            let cost = f.item.cost_usd.map(|c| format!(", ${c:.6}")).unwrap_or_default();
            let took = h.events.first().map(|a| f.time_ms.saturating_sub(a.time_ms)).unwrap_or(0);
            let _ = writeln!(
                out,
                "{pad}  outcome: {} after {attempts} attempt(s) in {:.3} s, {tokens} tokens{cost}",
                f.item.kind,
                took as f64 / 1000.0,
            );
            if let Some(o) = &f.item.output {
                let _ = writeln!(out, "{pad}  output: {}", compact(o, 160));
            }
            if let Some(e) = &f.item.error {
                let _ = writeln!(out, "{pad}  error: {} ({})", e.message, e.code);
            }
        }
        None if h.events.is_empty() => {
            let _ = writeln!(
                out,
                "{pad}  no event of this task is stored (unknown, or past the streams' retention)"
            );
        }
        None => {
            let _ = writeln!(
                out,
                "{pad}  not finished: last event {}",
                h.events.last().map_or("", |e| e.item.kind.as_str())
            );
        }
    }
    let calls: usize =
        h.events.iter().filter(|e| e.item.kind != event_kind::PROGRESS).map(|e| e.item.calls.len()).sum();
    if h.transcript.is_empty() {
        if calls > 0 {
            let _ = writeln!(
                out,
                "{pad}  transcript: not recorded (its template records none, or the tenant's retention removed it)"
            );
        }
    } else {
        let runs: std::collections::BTreeSet<&str> =
            h.transcript.iter().map(|t| t.item.run_id.as_str()).collect();
        let _ = writeln!(out, "{pad}  transcript: {} entries in {} run(s)", h.transcript.len(), runs.len());
    }
    if !h.child_ids.is_empty() {
        let _ = writeln!(out, "{pad}  children: {}", h.child_ids.join(", "));
    }
}

/// One item as a line of text.
pub fn line(i: &Item<'_>) -> String {
    match i {
        Item::Event(e) => event_line(&e.item),
        Item::Transcript(t) => transcript_line(&t.item),
        Item::Message(m) => {
            let m = &m.item;
            let mut s = format!("message {} {} {} → {}", m.message_id, m.kind, m.from, m.to);
            if let Some(a) = &m.agent_id {
                let _ = write!(s, " (agent {a})");
            }
            if let Some(r) = &m.in_reply_to {
                let _ = write!(s, " in reply to {r}");
            }
            if let Some(e) = &m.error {
                let _ = write!(s, ": {} ({})", e.message, e.code);
            }
            s
        }
        Item::Ledger(l) => ledger_line(&l.item),
    }
}

fn event_line(e: &TaskEvent) -> String {
    let mut s = e.kind.clone();
    if let Some(a) = e.attempt {
        let _ = write!(s, " attempt {a}");
    }
    match e.kind.as_str() {
        event_kind::ACCEPTED => {
            if let Some(r) = &e.reason {
                let _ = write!(s, " with warnings: {r}");
            }
        }
        event_kind::ASSIGNED => {
            if let Some(a) = &e.agent_id {
                let _ = write!(s, " → {a}");
            }
            if let Some(r) = &e.reason {
                let _ = write!(s, " (because: {r})");
            }
        }
        event_kind::STARTED => {
            if let (Some(a), Some(r)) = (&e.agent_id, &e.runner_id) {
                let _ = write!(s, " on {a} (runner {r})");
            }
        }
        event_kind::PROGRESS => {
            if let Some(step) = e.step {
                let _ = write!(s, " step {step}");
            }
            if let Some(d) = &e.text_delta {
                let _ = write!(s, " text {:?}", short(d, 60));
            } else if let Some(calls) =
                e.detail.as_ref().and_then(|d| d.get("tool_calls")).and_then(Value::as_array)
            {
                let names: Vec<&str> =
                    calls.iter().filter_map(|c| c.get("name").and_then(Value::as_str)).collect();
                if !names.is_empty() {
                    let _ = write!(s, " calls {}", names.join(", "));
                }
            }
        }
        event_kind::APPROVAL_REQUESTED | event_kind::APPROVAL_DECIDED => {
            if let Some(d) = &e.detail {
                let _ = write!(s, " {}", compact(d, 120));
            }
            if let Some(a) = &e.actor {
                let _ = write!(s, " by {a}");
            }
        }
        _ => {}
    }
    if let Some(u) = e.usage
        && e.kind != event_kind::PROGRESS
    {
        let _ = write!(s, " · {} tokens", u.total_tokens);
    }
    if let Some(c) = e.cost_usd {
        let _ = write!(s, " · ${c:.6}");
    }
    if let Some(err) = &e.error {
        let _ = write!(s, " · {}: {}", err.code, short(&err.message, 100));
    }
    if e.kind == event_kind::FAILED
        && let Some(a) = &e.actor
    {
        let _ = write!(s, " by {a}");
    }
    if e.kind == event_kind::COMPLETED
        && let Some(o) = &e.output
    {
        let _ = write!(s, " · output {}", compact(o, 80));
    }
    s
}

fn transcript_line(t: &TranscriptEntry) -> String {
    let run = t.run_id.get(t.run_id.len().saturating_sub(6)..).unwrap_or(&t.run_id);
    let head = format!("attempt {} step {} (run …{run})", t.attempt, t.step);
    let cut = if t.truncated { " [truncated]" } else { "" };
    if t.kind == transcript_kind::MODEL
        && let Some(m) = &t.model
    {
        let answer = if m.tool_calls.is_empty() {
            format!("answered {:?}", short(&m.text, 80))
        } else {
            let calls: Vec<String> = m
                .tool_calls
                .iter()
                .map(|c| {
                    let name = c.get("name").and_then(Value::as_str).unwrap_or("?");
                    format!("{name}({})", c.get("arguments").map(|a| compact(a, 60)).unwrap_or_default())
                })
                .collect();
            format!("asked for {}", calls.join(", "))
        };
        let took = m.duration_ms.map(|d| format!(", {d} ms")).unwrap_or_default();
        return format!(
            "model {head}: {} messages, {} tools → {answer} ({} in / {} out tokens{took}, {}){cut}",
            m.messages.len(),
            m.tools.len(),
            m.usage.prompt_tokens,
            m.usage.completion_tokens,
            m.finish,
        );
    }
    if let Some(x) = &t.tool {
        let err = if x.is_error { " (error)" } else { "" };
        return format!(
            "tool {head} #{}: {}({}) → {}{err}{cut}",
            x.index,
            x.name,
            compact(&x.arguments, 60),
            short(&x.result, 80)
        );
    }
    format!("{} {head}", t.kind)
}

fn ledger_line(l: &LedgerEntry) -> String {
    let op = l.op().as_str().to_owned();
    let detail = match &l.change {
        LedgerChange::Reserve(r) => format!(
            "{} want {} in {} → {}",
            r.id,
            r.want,
            r.scopes.join(", "),
            l.reply.tokens.map_or_else(|| "refused".to_owned(), |t| format!("held {t}"))
        ),
        LedgerChange::Commit(r) => format!(
            "{} used {} → charged {}{}",
            r.id,
            r.used,
            l.reply.charged.unwrap_or(0),
            l.reply.cost_usd.map(|c| format!(" (${c:.6})")).unwrap_or_default()
        ),
        LedgerChange::Release(r) => r.id.clone(),
        LedgerChange::Expire(e) => e.id.clone(),
        LedgerChange::Carve(r) => format!("{} for {} want {}", r.id, r.scope, r.want),
        LedgerChange::Close(r) => r.scope.clone(),
        LedgerChange::Set(r) => format!("{} limit {}", r.scope, r.limit_tokens),
        LedgerChange::Warning(b) | LedgerChange::Exhausted(b) | LedgerChange::Refilled(b) => b.scope.clone(),
        LedgerChange::Rate(_) | LedgerChange::Backoff(_) | LedgerChange::Price(_) => String::new(),
    };
    let err = l.reply.error.as_ref().map(|e| format!(" · {}", e.code)).unwrap_or_default();
    let actor = l.actor.as_ref().map(|a| format!(" by {a}")).unwrap_or_default();
    format!("budget {op} {detail}{err}{actor}")
}
