//! Tamper-evident export: the audited streams' records as JSON lines, each line
//! `{"hash":"<sha256>","prev":"<sha256>","record":{…}}` where `hash` is SHA-256 over `prev`
//! (hex) followed by the record's exact bytes, and `prev` the previous line's `hash` (zeros for
//! the first, the header). The last line ends the chain with the number of records and, when a
//! key signed it, the signer's public key and its signature over the last record's hash. A
//! changed byte breaks that line's hash; a removed line breaks the next line's `prev`; a cut
//! file has no end line. [`verify`] checks all of it offline and names the first line that does
//! not verify; [`load`] reads an export as a [`Source`].

use std::path::Path;

use base64::Engine as _;
use flotilla_protocol::Names;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::AuditError;
use crate::source::{Kind, Record, Source, Window};

/// The export format's version.
pub const VERSION: u32 = 1;
const ZERO: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const HEAD: &str = "{\"hash\":\"";
const MID: &str = "\",\"prev\":\"";
const TAIL: &str = "\",\"record\":";

/// What an export holds, written as its first record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub flotilla_export: u32,
    pub prefix: String,
    pub created_ms: u64,
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
    pub tenant: Option<String>,
    pub streams: Vec<String>,
}

/// The last record: how many records came before it, and who signed the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct End {
    pub end: bool,
    pub records: u64,
    pub signer: Option<String>,
    /// The signer's signature (base64url) over the hash of the record before this one.
    pub signature: Option<String>,
}

/// Writes an export line by line.
#[derive(Debug)]
pub struct Writer<W: std::io::Write> {
    out: W,
    prev: String,
    records: u64,
}

fn hash(prev: &str, record: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(record);
    let digest = h.finalize();
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

impl<W: std::io::Write> Writer<W> {
    /// Starts an export with its header.
    pub fn new(out: W, header: &Header) -> Result<Self, AuditError> {
        let mut w = Self { out, prev: ZERO.to_owned(), records: 0 };
        w.line(header)?;
        Ok(w)
    }

    fn line<T: Serialize>(&mut self, record: &T) -> Result<(), AuditError> {
        let body = serde_json::to_string(record).map_err(|e| AuditError::Invalid(e.to_string()))?;
        let h = hash(&self.prev, body.as_bytes());
        writeln!(self.out, "{HEAD}{h}{MID}{}{TAIL}{body}}}", self.prev)
            .map_err(|e| AuditError::Io(e.to_string()))?;
        self.prev = h;
        Ok(())
    }

    /// Adds one stored record.
    pub fn record(&mut self, r: &Record) -> Result<(), AuditError> {
        self.line(r)?;
        self.records += 1;
        Ok(())
    }

    /// Ends the chain (signed with `key` when given) and returns the writer.
    pub fn finish(mut self, key: Option<&nkeys::KeyPair>) -> Result<(W, u64), AuditError> {
        let (signer, signature) = match key {
            Some(k) => {
                let sig = k.sign(self.prev.as_bytes()).map_err(|e| AuditError::Invalid(e.to_string()))?;
                (Some(k.public_key()), Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig)))
            }
            None => (None, None),
        };
        let records = self.records;
        self.line(&End { end: true, records, signer, signature })?;
        self.out.flush().map_err(|e| AuditError::Io(e.to_string()))?;
        Ok((self.out, records))
    }
}

/// What to export.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub window: Window,
    pub tenant: Option<String>,
}

/// Writes every audited stream's records in `sel` from `source` to `out`, signed with `key`.
/// Returns how many records were written. `progress` hears of each stream as it is read.
pub async fn export<W: std::io::Write>(
    source: &Source,
    sel: &Selection,
    out: W,
    key: Option<&nkeys::KeyPair>,
    mut progress: impl FnMut(&str, usize),
) -> Result<u64, AuditError> {
    let names = source.names().clone();
    let kinds = match sel.tenant {
        Some(_) => vec![Kind::Events, Kind::Transcripts, Kind::Ledger],
        None => Kind::ALL.to_vec(),
    };
    let header = Header {
        flotilla_export: VERSION,
        prefix: names.prefix().to_string(),
        created_ms: flotilla_protocol::time::now_ms(),
        since_ms: sel.window.since_ms,
        until_ms: sel.window.until_ms,
        tenant: sel.tenant.clone(),
        streams: kinds.iter().map(|k| k.stream(&names)).collect(),
    };
    let mut w = Writer::new(out, &header)?;
    let mut tenant_tasks = std::collections::BTreeSet::new();
    for kind in kinds {
        let filters = match (&sel.tenant, kind) {
            (Some(t), Kind::Events) => vec![names.tenant_task_events(t), names.message_events_all()],
            (Some(t), Kind::Transcripts) => vec![format!("{}.transcripts.{t}.>", names.prefix())],
            _ => Vec::new(),
        };
        let records = source.read(kind, &filters, sel.window).await?;
        // For a tenant's export, the ledger entries of its tasks and scope.
        let linked =
            (sel.tenant.is_some() && kind == Kind::Ledger).then(|| crate::history::Ledger::of(&records));
        let mut kept = 0;
        for (i, r) in records.iter().enumerate() {
            if let Some(t) = &sel.tenant {
                let keep = match &linked {
                    Some(l) => {
                        l.tasks.get(i).is_some_and(|ts| ts.iter().any(|x| tenant_tasks.contains(x)))
                            || r.data.to_string().contains(&format!("\"tenant.{t}\""))
                    }
                    None => belongs(&names, kind, r, &mut tenant_tasks),
                };
                if !keep {
                    continue;
                }
            }
            w.record(r)?;
            kept += 1;
        }
        progress(&kind.stream(&names), kept);
    }
    let (_, n) = w.finish(key)?;
    Ok(n)
}

/// Whether a record of a tenant-wide read of the events is the tenant's (its task events, and the
/// message events of its tasks).
fn belongs(names: &Names, kind: Kind, r: &Record, tasks: &mut std::collections::BTreeSet<String>) -> bool {
    match kind {
        Kind::Events => {
            if let Some((_, task, _)) = names.parse_task_event_subject(&r.subject) {
                tasks.insert(task.to_owned());
                true
            } else {
                r.data.get("task_id").and_then(|t| t.as_str()).is_some_and(|t| tasks.contains(t))
            }
        }
        _ => true,
    }
}

/// What verifying an export found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verified {
    pub header: Header,
    pub records: u64,
    pub signer: Option<String>,
}

/// Why an export does not verify: the line (from 1) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct Broken {
    pub line: u64,
    pub problem: String,
}

/// Splits a line into its hash, prev and record bytes.
fn parts(line: &str) -> Option<(&str, &str, &str)> {
    let rest = line.strip_prefix(HEAD)?;
    let (h, rest) = rest.split_at_checked(64)?;
    let rest = rest.strip_prefix(MID)?;
    let (p, rest) = rest.split_at_checked(64)?;
    let rest = rest.strip_prefix(TAIL)?;
    let body = rest.strip_suffix('}')?;
    Some((h, p, body))
}

/// Checks an export's chain, end record and signature (`signer`: the key that must have
/// signed it, when one must). Calls `each` with every stored record that verified.
pub fn verify_lines(
    reader: impl std::io::BufRead,
    signer: Option<&str>,
    mut each: impl FnMut(Record),
) -> Result<Result<Verified, Broken>, AuditError> {
    let mut prev = ZERO.to_owned();
    let mut header: Option<Header> = None;
    let mut records = 0u64;
    let mut n = 0u64;
    let broken = |line: u64, problem: String| Ok(Err(Broken { line, problem }));
    let mut lines = reader.lines();
    while let Some(line) = lines.next() {
        let line = line.map_err(|e| AuditError::Io(e.to_string()))?;
        n += 1;
        let Some((h, p, body)) = parts(&line) else {
            return broken(n, "not a line of a Flotilla export".into());
        };
        if p != prev {
            return broken(n, "the chain is broken: a line before it was removed, added or reordered".into());
        }
        if hash(p, body.as_bytes()) != h {
            return broken(n, "its hash does not match its content: the line was changed".into());
        }
        prev = h.to_owned();
        if header.is_none() {
            match serde_json::from_str::<Header>(body) {
                Ok(hd) if hd.flotilla_export == VERSION => header = Some(hd),
                Ok(hd) => {
                    return broken(n, format!("export version {} is not {VERSION}", hd.flotilla_export));
                }
                Err(e) => return broken(n, format!("the header does not decode: {e}")),
            }
            continue;
        }
        if let Ok(end) = serde_json::from_str::<End>(body) {
            if end.records != records {
                return broken(n, format!("the end says {} records, {records} came before it", end.records));
            }
            let signed = match (&end.signer, &end.signature) {
                (Some(s), Some(sig)) => {
                    let ok = nkeys::KeyPair::from_public_key(s)
                        .ok()
                        .zip(base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig).ok());
                    let valid = ok.is_some_and(|(k, sig)| k.verify(p.as_bytes(), &sig).is_ok());
                    if !valid {
                        return broken(n, format!("the signature of {s} does not verify"));
                    }
                    Some(s.clone())
                }
                _ => None,
            };
            if let Some(want) = signer
                && signed.as_deref() != Some(want)
            {
                return broken(n, format!("the export is not signed by {want}"));
            }
            let Some(header) = header else { return broken(n, "no header".into()) };
            // Nothing may follow the end.
            if let Some(more) = lines.next() {
                let more = more.map_err(|e| AuditError::Io(e.to_string()))?;
                if !more.trim().is_empty() {
                    return broken(n + 1, "something follows the end line: it was added".into());
                }
            }
            return Ok(Ok(Verified { header, records, signer: signed }));
        }
        match serde_json::from_str::<Record>(body) {
            Ok(r) => each(r),
            Err(e) => return broken(n, format!("the record does not decode: {e}")),
        }
        records += 1;
    }
    broken(n + 1, format!("the export ends without its end line after line {n}: it was cut short"))
}

/// Checks an export file (see [`verify_lines`]).
pub fn verify(path: &Path, signer: Option<&str>) -> Result<Result<Verified, Broken>, AuditError> {
    let f =
        std::fs::File::open(path).map_err(|e| AuditError::Io(format!("opening {}: {e}", path.display())))?;
    verify_lines(std::io::BufReader::new(f), signer, |_| {})
}

/// Reads an export as a source; it must verify first.
pub fn load(path: &Path) -> Result<Source, AuditError> {
    let f =
        std::fs::File::open(path).map_err(|e| AuditError::Io(format!("opening {}: {e}", path.display())))?;
    let mut records = Vec::new();
    let verified = verify_lines(std::io::BufReader::new(f), None, |r| records.push(r))?
        .map_err(|b| AuditError::Invalid(format!("{} does not verify: {b}", path.display())))?;
    let prefix = flotilla_protocol::Prefix::new(verified.header.prefix.clone())
        .map_err(|e| AuditError::Invalid(format!("the export's prefix: {e}")))?;
    Ok(Source::Export { names: Names::new(prefix), records: std::sync::Arc::new(records) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(key: Option<&nkeys::KeyPair>) -> String {
        let header = Header {
            flotilla_export: VERSION,
            prefix: "flotilla".into(),
            created_ms: 1,
            since_ms: None,
            until_ms: None,
            tenant: None,
            streams: vec!["FLOTILLA_EVENTS".into()],
        };
        let mut w = Writer::new(Vec::new(), &header).unwrap();
        for seq in 1..=5 {
            w.record(&Record {
                stream: "FLOTILLA_EVENTS".into(),
                seq,
                subject: format!("flotilla.events.task.default.t{seq}.accepted"),
                time_ms: seq * 10,
                data: serde_json::json!({ "task_id": format!("t{seq}"), "kind": "accepted" }),
            })
            .unwrap();
        }
        String::from_utf8(w.finish(key).unwrap().0).unwrap()
    }

    fn check(text: &str, signer: Option<&str>) -> Result<Verified, Broken> {
        verify_lines(std::io::Cursor::new(text), signer, |_| {}).unwrap()
    }

    #[test]
    fn an_export_verifies_and_names_the_first_bad_line() {
        let text = sample(None);
        assert_eq!(check(&text, None).unwrap().records, 5);
        // One byte changed in line 4.
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        lines[3] = lines[3].replace("t3", "t9");
        let changed = lines.join("\n") + "\n";
        assert_eq!(check(&changed, None).unwrap_err().line, 4);
        // Line 3 removed: line 4 (now the third) breaks the chain.
        let mut lines: Vec<&str> = text.lines().collect();
        lines.remove(2);
        let removed = lines.join("\n") + "\n";
        let b = check(&removed, None).unwrap_err();
        assert_eq!(b.line, 3, "{b}");
        assert!(b.problem.contains("chain"), "{b}");
        // A line added after the end.
        let added = format!("{text}{}\n", lines[3]);
        assert!(check(&added, None).unwrap_err().problem.contains("follows the end"));
        // The end removed.
        let cut: Vec<&str> = text.lines().take(6).collect();
        assert!(check(&(cut.join("\n") + "\n"), None).unwrap_err().problem.contains("cut short"));
    }

    #[test]
    fn a_signed_export_names_its_signer() {
        let key = nkeys::KeyPair::new_user();
        let text = sample(Some(&key));
        let v = check(&text, Some(&key.public_key())).unwrap();
        assert_eq!(v.signer.as_deref(), Some(key.public_key().as_str()));
        let other = nkeys::KeyPair::new_user();
        assert!(check(&text, Some(&other.public_key())).is_err());
        assert!(check(&sample(None), Some(&key.public_key())).is_err());
    }
}
