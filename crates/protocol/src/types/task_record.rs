//! The task record and its transitions: every change of a task's state is a method here, called
//! by whichever service makes it (the runner's claim and outcome, the dispatcher's requeue, expiry
//! and cancel), so all writers agree on what each transition does to the record. Each write of
//! the result is a revision-checked KV update by the caller: that is the fence, these are the
//! rules.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::*;

/// The current record of a task, kept in the tasks KV bucket under its id. Every change to it is
/// a revision-checked update, which is what fences claims and completions.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TaskRecord {
    pub id: String,
    pub capability: String,
    #[serde(default)]
    pub input: Value,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default = "default_tenant")]
    pub tenant: String,
    pub budget_tokens: Option<u64>,
    /// Epoch ms after which the task fails with `deadline_exceeded`.
    pub deadline_ms: Option<u64>,
    pub context_key: Option<String>,
    pub parent_id: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    pub state: TaskState,
    /// Attempt number, starting at 1 with the first assignment. Every reassignment increments it,
    /// and a runner may only act on the attempt it was given.
    #[serde(default)]
    pub attempt: u32,
    /// Agent holding the current attempt.
    pub agent_id: Option<String>,
    /// Runner hosting that agent.
    pub runner_id: Option<String>,
    pub submitted_at_ms: u64,
    pub updated_at_ms: u64,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    pub output: Option<Value>,
    pub usage: Option<Usage>,
    pub error: Option<ErrorInfo>,
    /// Warnings about the submission (e.g. fields this version does not know).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// W3C `traceparent` of the submission, so that all work on the task joins one trace.
    pub trace: Option<String>,
    /// Sub-tasks this task delegated, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<String>,
    /// Token usage of every model call of the finishing attempt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calls: Vec<CallUsage>,
    /// Most attempts; a retryable failure before the last one queues the task again.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Every failed attempt, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<AttemptRecord>,
}

/// Why a transition was refused: the record is not where the transition starts from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// The task has finished; nothing changes it any more.
    #[error("task {task} is already {state}")]
    Finished { task: String, state: TaskState },
    /// The task is in another state than the transition needs.
    #[error("task {task} is {state}: it cannot be {action}")]
    WrongState { task: String, state: TaskState, action: &'static str },
    /// The record is at another attempt, or the attempt is another agent's.
    #[error("task {task} is at attempt {current}, not at attempt {attempt} of agent {agent}")]
    OtherAttempt { task: String, current: u32, attempt: u32, agent: String },
}

impl TaskRecord {
    /// True when the record's current attempt is `attempt` and held by `agent`.
    pub fn is_attempt(&self, attempt: u32, agent: &str) -> bool {
        self.attempt == attempt && self.agent_id.as_deref() == Some(agent)
    }

    /// True when `attempt` of `agent` failed and queued the task again (the record moved on to
    /// wait for the next attempt).
    pub fn retried_after(&self, attempt: u32, agent: &str) -> bool {
        self.state == TaskState::Queued
            && self.attempt == attempt
            && self
                .attempts
                .last()
                .is_some_and(|l| l.attempt == attempt && l.agent_id.as_deref() == Some(agent))
    }

    /// `queued → running`: `agent` on `runner` claims `attempt`, the next one. A `running` record
    /// whose current attempt is already `agent`'s is claimed again (a crashed run of that runner,
    /// restarted under the same id): only one of the claims' writes can land.
    pub fn claim(
        &mut self,
        attempt: u32,
        agent: &str,
        runner: &str,
        now_ms: u64,
    ) -> Result<(), TransitionError> {
        match self.state {
            TaskState::Queued if self.attempt.saturating_add(1) == attempt => {
                self.attempt = attempt;
                self.agent_id = Some(agent.to_owned());
            }
            TaskState::Running if self.is_attempt(attempt, agent) => {}
            TaskState::Queued | TaskState::Running => return Err(self.other_attempt(attempt, agent)),
            _ => return Err(self.finished()),
        }
        self.state = TaskState::Running;
        self.runner_id = Some(runner.to_owned());
        self.started_at_ms = Some(now_ms);
        self.updated_at_ms = now_ms;
        Ok(())
    }

    /// `running → queued`: the attempt is taken back (its agent was lost) without counting as a
    /// failure; the next attempt is given out at once. Returns the agent that held it.
    pub fn requeue(&mut self, now_ms: u64) -> Result<Option<String>, TransitionError> {
        if self.state != TaskState::Running {
            return Err(self.wrong_state("requeued"));
        }
        self.state = TaskState::Queued;
        self.runner_id = None;
        self.started_at_ms = None;
        self.updated_at_ms = now_ms;
        Ok(self.agent_id.take())
    }

    /// `running → completed` with the attempt's output, usage and model calls.
    pub fn complete(
        &mut self,
        output: Value,
        usage: Usage,
        calls: Vec<CallUsage>,
        now_ms: u64,
    ) -> Result<(), TransitionError> {
        if self.state != TaskState::Running {
            return Err(self.wrong_state("completed"));
        }
        self.state = TaskState::Completed;
        self.output = Some(output);
        self.usage = Some(usage);
        self.calls = calls;
        self.finished_at_ms = Some(now_ms);
        self.updated_at_ms = now_ms;
        // An earlier attempt's error stays in `attempts` only.
        self.error = None;
        Ok(())
    }

    /// `running → queued` (retry) or `running → failed`: the attempt failed with `error`. It goes
    /// into `attempts` either way; the task is queued for the next attempt when `may_retry`, the
    /// error is retryable ([`is_retryable`]) and attempts are left, and fails otherwise. Returns
    /// the state the record is in now.
    pub fn fail_attempt(
        &mut self,
        error: &ErrorInfo,
        usage: Usage,
        calls: Vec<CallUsage>,
        may_retry: bool,
        now_ms: u64,
    ) -> Result<TaskState, TransitionError> {
        if self.state != TaskState::Running {
            return Err(self.wrong_state("failed"));
        }
        self.record_attempt(error, Some(usage), calls.clone(), now_ms);
        self.error = Some(error.clone());
        self.updated_at_ms = now_ms;
        if may_retry && is_retryable(&error.code) && self.attempt < self.max_attempts {
            // Queued for the next attempt; the dispatcher gives it out after a backoff.
            self.state = TaskState::Queued;
            self.agent_id = None;
            self.runner_id = None;
            self.started_at_ms = None;
            self.finished_at_ms = None;
            self.output = None;
            self.usage = None;
            self.calls = Vec::new();
        } else {
            self.state = TaskState::Failed;
            self.usage = Some(usage);
            self.calls = calls;
            self.finished_at_ms = Some(now_ms);
        }
        Ok(self.state)
    }

    /// `queued | running → failed` with `error` (code `cancelled`): a running attempt goes into
    /// `attempts` like any failed attempt. Returns the state the task was in.
    pub fn cancel(&mut self, error: &ErrorInfo, now_ms: u64) -> Result<TaskState, TransitionError> {
        self.end(error, now_ms)
    }

    /// `queued | running → failed` with `deadline_exceeded`, recorded exactly as a cancel is.
    /// Returns the state the task was in.
    pub fn expire(&mut self, now_ms: u64) -> Result<TaskState, TransitionError> {
        let message = match self.state {
            TaskState::Queued => "the deadline passed while the task was queued",
            _ => "the deadline passed while the task was running",
        };
        self.end(&ErrorInfo::new(failure::DEADLINE_EXCEEDED, message), now_ms)
    }

    /// Links a sub-task this task delegated; false when it was linked already.
    pub fn link_child(&mut self, child: &str) -> bool {
        if self.children.iter().any(|c| c == child) {
            return false;
        }
        self.children.push(child.to_owned());
        true
    }

    /// Ends a task that has not finished, from outside its attempt.
    fn end(&mut self, error: &ErrorInfo, now_ms: u64) -> Result<TaskState, TransitionError> {
        let was = self.state;
        if was.is_terminal() {
            return Err(self.finished());
        }
        if was == TaskState::Running {
            // The running attempt ends here: it goes into the history like any failed attempt.
            self.record_attempt(error, None, Vec::new(), now_ms);
        }
        self.state = TaskState::Failed;
        self.error = Some(error.clone());
        self.finished_at_ms = Some(now_ms);
        self.updated_at_ms = now_ms;
        Ok(was)
    }

    /// Puts the current attempt into `attempts` as failed with `error` (replacing an earlier
    /// entry for the same attempt, so a redelivered outcome writes it once).
    fn record_attempt(
        &mut self,
        error: &ErrorInfo,
        usage: Option<Usage>,
        calls: Vec<CallUsage>,
        now_ms: u64,
    ) {
        let attempt = self.attempt;
        self.attempts.retain(|a| a.attempt != attempt);
        self.attempts.push(AttemptRecord {
            attempt,
            agent_id: self.agent_id.clone(),
            runner_id: self.runner_id.clone(),
            error: error.clone(),
            usage,
            calls,
            started_at_ms: self.started_at_ms,
            finished_at_ms: now_ms,
        });
    }

    fn finished(&self) -> TransitionError {
        TransitionError::Finished { task: self.id.clone(), state: self.state }
    }

    fn wrong_state(&self, action: &'static str) -> TransitionError {
        if self.state.is_terminal() {
            return self.finished();
        }
        TransitionError::WrongState { task: self.id.clone(), state: self.state, action }
    }

    fn other_attempt(&self, attempt: u32, agent: &str) -> TransitionError {
        TransitionError::OtherAttempt {
            task: self.id.clone(),
            current: self.attempt,
            attempt,
            agent: agent.to_owned(),
        }
    }
}

/// One failed attempt of a task, kept in its record and in its dead letter.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AttemptRecord {
    pub attempt: u32,
    pub agent_id: Option<String>,
    pub runner_id: Option<String>,
    pub error: ErrorInfo,
    pub usage: Option<Usage>,
    /// The model calls the attempt made that answered (what it spent), when it reported them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calls: Vec<CallUsage>,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: u64,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

    use super::*;

    fn queued() -> TaskRecord {
        let sub = TaskSubmission { id: Some("t".into()), capability: "work".into(), ..Default::default() };
        crate::validate::validate(sub, "t".into(), 64, crate::validate::Limits::default(), 1_000).unwrap()
    }

    fn running() -> TaskRecord {
        let mut r = queued();
        r.claim(1, "a1", "r1", 2_000).unwrap();
        r
    }

    #[test]
    fn claim_takes_the_next_attempt_once() {
        let mut r = queued();
        r.claim(1, "a1", "r1", 2_000).unwrap();
        assert_eq!((r.state, r.attempt), (TaskState::Running, 1));
        assert_eq!((r.agent_id.as_deref(), r.runner_id.as_deref()), (Some("a1"), Some("r1")));
        assert_eq!((r.started_at_ms, r.updated_at_ms), (Some(2_000), 2_000));
        // The same runner claims its own attempt again (restarted): allowed.
        r.claim(1, "a1", "r1", 3_000).unwrap();
        assert_eq!(r.started_at_ms, Some(3_000));
        // Another agent's claim of this attempt, or a claim of a later one, is not.
        assert!(matches!(r.claim(1, "a2", "r2", 3_000), Err(TransitionError::OtherAttempt { .. })));
        assert!(matches!(r.claim(2, "a1", "r1", 3_000), Err(TransitionError::OtherAttempt { .. })));
        // A queued task is only claimed for its next attempt.
        let mut q = queued();
        assert!(q.claim(2, "a1", "r1", 2_000).is_err());
        assert_eq!(q, queued());
    }

    #[test]
    fn requeue_takes_the_attempt_back_without_a_failure() {
        let mut r = running();
        assert_eq!(r.requeue(5_000).unwrap().as_deref(), Some("a1"));
        assert_eq!((r.state, r.attempt), (TaskState::Queued, 1));
        assert_eq!((r.agent_id.as_deref(), r.runner_id.as_deref(), r.started_at_ms), (None, None, None));
        assert!(r.attempts.is_empty(), "a lost agent is not a failed attempt");
        assert!(matches!(r.requeue(6_000), Err(TransitionError::WrongState { .. })));
        // The next attempt follows.
        r.claim(2, "a2", "r2", 7_000).unwrap();
    }

    #[test]
    fn complete_sets_the_output_and_clears_an_earlier_error() {
        let mut r = running();
        r.error = Some(ErrorInfo::new("model_error", "an earlier attempt"));
        r.complete(serde_json::json!({"answer": "hi"}), Usage::new(3, 4), vec![], 9_000).unwrap();
        assert_eq!(r.state, TaskState::Completed);
        assert_eq!((r.usage, r.finished_at_ms, r.error.clone()), (Some(Usage::new(3, 4)), Some(9_000), None));
        assert!(matches!(
            r.complete(Value::Null, Usage::default(), vec![], 9_500),
            Err(TransitionError::Finished { .. })
        ));
    }

    #[test]
    fn a_retryable_failure_queues_the_next_attempt_until_none_are_left() {
        let mut r = running();
        r.max_attempts = 2;
        let e = ErrorInfo::new("model_error", "boom");
        assert_eq!(r.fail_attempt(&e, Usage::new(1, 1), vec![], true, 3_000).unwrap(), TaskState::Queued);
        assert_eq!(
            (r.attempt, r.agent_id.clone(), r.usage, r.error.clone()),
            (1, None, None, Some(e.clone()))
        );
        assert_eq!(r.attempts.len(), 1);
        assert_eq!((r.attempts[0].attempt, r.attempts[0].agent_id.as_deref()), (1, Some("a1")));
        assert!(r.retried_after(1, "a1"));
        r.claim(2, "a2", "r2", 4_000).unwrap();
        assert_eq!(r.fail_attempt(&e, Usage::new(2, 2), vec![], true, 5_000).unwrap(), TaskState::Failed);
        assert_eq!((r.usage, r.finished_at_ms), (Some(Usage::new(2, 2)), Some(5_000)));
        let tried: Vec<(u32, Option<&str>)> =
            r.attempts.iter().map(|a| (a.attempt, a.agent_id.as_deref())).collect();
        assert_eq!(tried, [(1, Some("a1")), (2, Some("a2"))]);
    }

    #[test]
    fn a_refusal_or_a_failure_that_may_not_retry_fails_at_once() {
        let mut r = running();
        let refused = ErrorInfo::new("provider_refused", "no");
        assert_eq!(
            r.fail_attempt(&refused, Usage::default(), vec![], true, 3_000).unwrap(),
            TaskState::Failed
        );
        let mut r = running();
        let e = ErrorInfo::new("model_error", "boom");
        assert_eq!(r.fail_attempt(&e, Usage::default(), vec![], false, 3_000).unwrap(), TaskState::Failed);
        assert_eq!(r.attempts.len(), 1);
        assert!(queued().fail_attempt(&e, Usage::default(), vec![], true, 3_000).is_err());
    }

    #[test]
    fn cancel_and_expire_record_a_running_attempt_the_same_way() {
        let cancelled_error = ErrorInfo::new(failure::CANCELLED, "not needed");
        let mut cancelled = running();
        assert_eq!(cancelled.cancel(&cancelled_error, 8_000).unwrap(), TaskState::Running);
        let mut expired = running();
        assert_eq!(expired.expire(8_000).unwrap(), TaskState::Running);
        for (r, code) in [(&cancelled, failure::CANCELLED), (&expired, failure::DEADLINE_EXCEEDED)] {
            assert_eq!(r.state, TaskState::Failed);
            assert_eq!(r.finished_at_ms, Some(8_000));
            assert_eq!(r.error.as_ref().unwrap().code, code);
            assert_eq!(r.attempts.len(), 1, "{code}: the cut-off attempt is in the history");
            let a = &r.attempts[0];
            assert_eq!(
                (a.attempt, a.agent_id.as_deref(), a.runner_id.as_deref()),
                (1, Some("a1"), Some("r1"))
            );
            assert_eq!((a.started_at_ms, a.finished_at_ms, &a.error.code[..]), (Some(2_000), 8_000, code));
        }
        assert_eq!(expired.error.unwrap().message, "the deadline passed while the task was running");
    }

    #[test]
    fn cancel_and_expire_of_a_queued_task_record_no_attempt_and_a_finished_task_stays() {
        let mut r = queued();
        assert_eq!(r.cancel(&ErrorInfo::new(failure::CANCELLED, "x"), 3_000).unwrap(), TaskState::Queued);
        assert!(r.attempts.is_empty());
        let mut q = queued();
        assert_eq!(q.expire(3_000).unwrap(), TaskState::Queued);
        assert_eq!(q.error.as_ref().unwrap().message, "the deadline passed while the task was queued");
        assert!(q.attempts.is_empty());
        let before = q.clone();
        assert_eq!(
            q.cancel(&ErrorInfo::new(failure::CANCELLED, "y"), 4_000),
            Err(TransitionError::Finished { task: "t".into(), state: TaskState::Failed })
        );
        assert!(q.expire(4_000).is_err());
        assert_eq!(q, before, "a refused transition changes nothing");
    }

    #[test]
    fn children_are_linked_once() {
        let mut r = running();
        assert!(r.link_child("c1"));
        assert!(!r.link_child("c1"));
        assert!(r.link_child("c2"));
        assert_eq!(r.children, ["c1", "c2"]);
    }

    #[test]
    fn a_record_an_older_dispatcher_left_assigned_reads_as_queued() {
        let mut v = serde_json::to_value(running()).unwrap();
        v["state"] = "assigned".into();
        let r: TaskRecord = serde_json::from_value(v).unwrap();
        assert_eq!(r.state, TaskState::Queued);
    }
}
