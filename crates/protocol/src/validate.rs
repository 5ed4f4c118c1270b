//! Validation of submissions: turns a decoded [`TaskSubmission`] into a queued [`TaskRecord`], or
//! into a rejection with a machine-readable reason.

use std::time::Duration;

use crate::names::is_token;
use crate::types::{
    DEFAULT_MAX_ATTEMPTS, DEFAULT_TENANT, DurationSpec, MAX_ATTEMPTS_LIMIT, RejectReason, TaskRecord,
    TaskState, TaskSubmission, TimeSpec,
};

/// Limits applied to submissions.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest accepted `input`, in bytes of its JSON form.
    pub max_input_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_input_bytes: 256 * 1024 }
    }
}

/// A refused submission.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason:?}: {message}")]
pub struct Rejection {
    pub reason: RejectReason,
    pub message: String,
}

fn reject(reason: RejectReason, message: impl Into<String>) -> Rejection {
    Rejection { reason, message: message.into() }
}

/// True when `s` is a valid capability name: 1–128 of `[A-Za-z0-9_.-]`, not starting or ending
/// with a dot.
pub fn is_capability(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && !s.ends_with('.')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// The task id a submission runs under: its `id`, else one derived from `Nats-Msg-Id` (so a
/// re-publish with the same message id is the same task even after the duplicate window), else
/// a fresh time-ordered UUID.
pub fn task_id_for(sub: &TaskSubmission, msg_id: Option<&str>) -> Result<String, Rejection> {
    if let Some(id) = &sub.id {
        return if is_token(id) {
            Ok(id.clone())
        } else {
            Err(reject(RejectReason::InvalidField, "id must be 1-128 characters of A-Z a-z 0-9 _ -"))
        };
    }
    Ok(match msg_id {
        Some(m) if is_token(m) => m.to_owned(),
        Some(m) => uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, m.as_bytes()).to_string(),
        None => uuid::Uuid::now_v7().to_string(),
    })
}

/// Parses a duration given as milliseconds or text.
pub fn parse_duration(spec: &DurationSpec) -> Result<Duration, String> {
    match spec {
        DurationSpec::Millis(ms) => Ok(Duration::from_millis(*ms)),
        DurationSpec::Text(t) => humantime::parse_duration(t).map_err(|e| format!("{t:?}: {e}")),
    }
}

/// Parses a point in time given as epoch milliseconds or RFC 3339 text.
pub fn parse_time_ms(spec: &TimeSpec) -> Result<u64, String> {
    match spec {
        TimeSpec::Millis(ms) => Ok(*ms),
        TimeSpec::Text(t) => {
            humantime::parse_rfc3339_weak(t).map_err(|e| format!("{t:?}: {e}")).and_then(|st| {
                st.duration_since(std::time::UNIX_EPOCH)
                    .map_err(|_| format!("{t:?} is before 1970"))
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            })
        }
    }
}

/// Validates a submission that arrived as `payload_len` bytes and builds its queued record.
pub fn validate(
    sub: TaskSubmission,
    task_id: String,
    payload_len: usize,
    limits: Limits,
    now_ms: u64,
) -> Result<TaskRecord, Rejection> {
    use RejectReason::*;
    if sub.capability.is_empty() {
        return Err(reject(MissingField, "capability must not be empty"));
    }
    if !is_capability(&sub.capability) {
        return Err(reject(InvalidField, "capability must be 1-128 characters of A-Z a-z 0-9 _ - ."));
    }
    // The payload length bounds the input's size; only measure when it could be over.
    if payload_len > limits.max_input_bytes {
        let size = serde_json::to_vec(&sub.input).map(|v| v.len()).unwrap_or(payload_len);
        if size > limits.max_input_bytes {
            return Err(reject(
                InputTooLarge,
                format!("input is {size} bytes; the limit is {} bytes", limits.max_input_bytes),
            ));
        }
    }
    let tenant = sub.tenant.unwrap_or_else(|| DEFAULT_TENANT.to_owned());
    if !is_token(&tenant) {
        return Err(reject(InvalidField, "tenant must be 1-128 characters of A-Z a-z 0-9 _ -"));
    }
    if let Some(p) = &sub.parent_id
        && !is_token(p)
    {
        return Err(reject(InvalidField, "parent_id must be 1-128 characters of A-Z a-z 0-9 _ -"));
    }
    if sub.context_key.as_ref().is_some_and(|k| k.is_empty() || k.len() > 256) {
        return Err(reject(InvalidField, "context_key must be 1-256 bytes"));
    }
    if sub.labels.iter().any(|(k, v)| k.is_empty() || k.len() > 128 || v.len() > 256) {
        return Err(reject(InvalidField, "label names must be 1-128 bytes and values at most 256"));
    }
    if sub.max_attempts.is_some_and(|n| n == 0 || n > MAX_ATTEMPTS_LIMIT) {
        return Err(reject(InvalidField, format!("max_attempts must be 1-{MAX_ATTEMPTS_LIMIT}")));
    }
    if sub.budget_tokens == Some(0) {
        return Err(reject(InvalidField, "budget_tokens must be positive"));
    }
    let mut deadline_ms = None;
    if let Some(t) = &sub.timeout {
        let d = parse_duration(t).map_err(|e| reject(InvalidField, format!("timeout {e}")))?;
        if d.is_zero() {
            return Err(reject(InvalidField, "timeout must be positive"));
        }
        deadline_ms = Some(now_ms.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)));
    }
    if let Some(t) = &sub.deadline {
        let at = parse_time_ms(t).map_err(|e| reject(InvalidField, format!("deadline {e}")))?;
        deadline_ms = Some(deadline_ms.map_or(at, |d: u64| d.min(at)));
    }
    if deadline_ms.is_some_and(|d| d <= now_ms) {
        return Err(reject(DeadlineExceeded, "the deadline had passed when the task arrived"));
    }
    Ok(TaskRecord {
        id: task_id,
        capability: sub.capability,
        input: sub.input,
        priority: sub.priority.unwrap_or_default(),
        tenant,
        budget_tokens: sub.budget_tokens,
        deadline_ms,
        context_key: sub.context_key,
        parent_id: sub.parent_id,
        labels: sub.labels,
        state: TaskState::Queued,
        attempt: 0,
        agent_id: None,
        runner_id: None,
        submitted_at_ms: now_ms,
        updated_at_ms: now_ms,
        started_at_ms: None,
        finished_at_ms: None,
        output: None,
        usage: None,
        error: None,
        warnings: Vec::new(),
        trace: None,
        children: Vec::new(),
        calls: Vec::new(),
        max_attempts: sub.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
        attempts: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Priority;

    fn sub(cap: &str) -> TaskSubmission {
        TaskSubmission { capability: cap.into(), ..Default::default() }
    }

    #[test]
    fn a_minimal_submission_is_queued_with_defaults() {
        let r = validate(sub("echo"), "t1".into(), 10, Limits::default(), 1000).unwrap();
        assert_eq!(r.state, TaskState::Queued);
        assert_eq!(r.priority, Priority::NORMAL);
        assert_eq!(r.tenant, "default");
    }

    #[test]
    fn bad_fields_are_rejected_with_reasons() {
        let l = Limits { max_input_bytes: 16 };
        let v = |s: TaskSubmission, len| validate(s, "t".into(), len, l, 1000).unwrap_err().reason;
        assert_eq!(v(sub(""), 1), RejectReason::MissingField);
        assert_eq!(v(sub("a b"), 1), RejectReason::InvalidField);
        let mut big = sub("echo");
        big.input = serde_json::json!("x".repeat(100));
        assert_eq!(v(big, 200), RejectReason::InputTooLarge);
        let mut late = sub("echo");
        late.deadline = Some(TimeSpec::Millis(10));
        assert_eq!(v(late, 1), RejectReason::DeadlineExceeded);
        let mut t = sub("echo");
        t.timeout = Some(DurationSpec::Text("soon".into()));
        assert_eq!(v(t, 1), RejectReason::InvalidField);
    }

    #[test]
    fn timeout_and_deadline_take_the_earlier() {
        let mut s = sub("echo");
        s.timeout = Some(DurationSpec::Text("30s".into()));
        s.deadline = Some(TimeSpec::Text("2100-01-01T00:00:00Z".into()));
        let r = validate(s, "t".into(), 1, Limits::default(), 1000).unwrap();
        assert_eq!(r.deadline_ms, Some(31_000));
    }

    #[test]
    fn ids_come_from_the_field_then_the_msg_id() {
        let mut s = sub("echo");
        assert_eq!(task_id_for(&s, Some("abc")).unwrap(), "abc");
        let derived = task_id_for(&s, Some("has.dots")).unwrap();
        assert_eq!(derived, task_id_for(&s, Some("has.dots")).unwrap());
        assert!(is_token(&derived));
        s.id = Some("mine".into());
        assert_eq!(task_id_for(&s, Some("abc")).unwrap(), "mine");
        s.id = Some("bad id".into());
        assert!(task_id_for(&s, None).is_err());
    }
}
