//! Tools agents can call: a registry of built-in (and embedder-supplied) tools, each with a JSON
//! Schema its arguments are validated against before anything runs, allow-listed per template.

mod builtin;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_nats::jetstream::kv;
use flotilla_protocol::TaskRecord;
use flotilla_service::Fleet;
use futures::future::BoxFuture;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::llm::ToolSpec;

pub use builtin::builtins;

/// What a tool call can see.
#[derive(Debug, Clone)]
pub struct ToolCtx {
    pub fleet: Fleet,
    pub memory: kv::Store,
    pub tasks: kv::Store,
    pub approvals: kv::Store,
    /// The operators' signing keys: an approval decision counts only when one of them signed it.
    pub operators: kv::Store,
    /// The task being worked on (as claimed).
    pub task: TaskRecord,
    pub agent_id: String,
    /// The runner hosting the agent (the router checks it hosts `agent_id`).
    pub runner_id: String,
    /// Where replies to the agent's messages arrive.
    pub mailbox: Arc<crate::mailbox::Mailbox>,
    /// The agent as grants see it, and the grants (shared memory's namespaces are granted).
    pub party: flotilla_protocol::Party,
    pub grants: flotilla_service::follow::Grants,
    /// The recall index and the template's embedder (`remember`, `recall`).
    pub recall: Arc<crate::recall::Index>,
    pub embedder: crate::recall::Embedder,
    /// Loop step and index of the call within it, for idempotent side effects.
    pub step: u32,
    pub index: usize,
    /// Cancelled when the task's work must stop.
    pub cancel: CancellationToken,
    /// The agent's state for this task (a tool that waits moves it to `waiting`).
    pub states: crate::lifecycle::TaskStates,
    /// The budget-keeper, when budgets are enforced, and the task's token cap.
    pub budgets: Option<flotilla_service::budget::Client>,
    pub task_cap: Option<u64>,
    /// Set when the work is the handling of a direct message (its id), not a task.
    pub message_id: Option<String>,
}

/// A wait of the work a tool call belongs to, told to the fleet (`<p>.events.wait.*`): begun by
/// [`ToolCtx::begin_wait`], ended by [`Wait::end`]. Both are stored before the work goes on, so
/// the monitor's wait-for graph never holds a wait that ended before something it caused.
#[derive(Debug)]
pub struct Wait {
    event: flotilla_protocol::WaitEvent,
}

/// Waits begun by this process (with the runner id, unique to a wait).
static WAITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl ToolCtx {
    /// Tells the fleet this work now waits `on` (`task`, `reply`, `memory`, `approval`)
    /// `target`, and moves the agent to `waiting`. A failure to tell it is logged, not fatal:
    /// the wait goes on, unseen by deadlock detection.
    pub async fn begin_wait(&self, on: &str, target: &str, until_ms: Option<u64>) -> Wait {
        let (task_id, message_id) = match &self.message_id {
            Some(m) => (None, Some(m.clone())),
            None => (Some(self.task.id.clone()), None),
        };
        let event = flotilla_protocol::WaitEvent {
            kind: flotilla_protocol::wait_kind::WAITING.to_owned(),
            wait_id: format!(
                "{}:{}:{}:{}:{}:{}.{}",
                self.task.id,
                self.task.attempt,
                self.step,
                self.index,
                self.runner_id,
                flotilla_protocol::time::now_ms(),
                WAITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
            at_ms: flotilla_protocol::time::now_ms(),
            agent_id: self.agent_id.clone(),
            runner_id: self.runner_id.clone(),
            tenant: self.task.tenant.clone(),
            task_id,
            message_id,
            on: on.to_owned(),
            target: target.to_owned(),
            until_ms,
        };
        self.tell_wait(&event).await;
        self.states.set(flotilla_protocol::AgentState::Waiting);
        Wait { event }
    }

    async fn tell_wait(&self, event: &flotilla_protocol::WaitEvent) {
        let subject = self.fleet.names.wait_event_subject(&event.kind);
        let id = format!("{}:{}", event.wait_id, event.kind);
        let sent = match self.fleet.send_durable(subject, event, Some(&id)).await {
            Ok(pending) => pending.confirmed().await,
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, wait = %event.wait_id, "failed to tell the fleet about a wait");
        }
    }
}

impl Wait {
    /// Tells the fleet the wait is over and moves the agent back to `executing`.
    pub async fn end(mut self, ctx: &ToolCtx) {
        self.event.kind = flotilla_protocol::wait_kind::RESUMED.to_owned();
        self.event.at_ms = flotilla_protocol::time::now_ms();
        ctx.tell_wait(&self.event).await;
        ctx.states.set(flotilla_protocol::AgentState::Executing);
    }
}

/// A tool failure: shown to the model as an error result so it can correct itself, unless it
/// ends the whole task (`fails_task`, e.g. a human rejected it).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ToolError {
    pub message: String,
    /// When set, the task fails with this error code and the message as its reason.
    pub fails_task: Option<&'static str>,
}

impl ToolError {
    pub fn new(msg: impl Into<String>) -> Self {
        Self { message: msg.into(), fails_task: None }
    }

    /// An error that ends the task with `code`.
    pub fn fail_task(code: &'static str, msg: impl Into<String>) -> Self {
        Self { message: msg.into(), fails_task: Some(code) }
    }
}

/// A callable tool.
pub trait Tool: Send + Sync + std::fmt::Debug {
    /// Name, description and argument schema, as shown to the model.
    fn spec(&self) -> ToolSpec;
    /// Runs the tool with validated arguments.
    fn call<'a>(&'a self, ctx: &'a ToolCtx, args: Value) -> BoxFuture<'a, Result<Value, ToolError>>;
    /// For a tool whose result depends on its arguments alone (it reads no fleet state and has
    /// no side effect): its result, computed without a context, so that `flotilla replay
    /// --rerun` runs it again and compares. `None` (the default): a re-run takes the recorded
    /// result instead of calling the tool.
    fn replay(&self, _args: &Value) -> Option<Result<Value, ToolError>> {
        None
    }
    /// True when [`Tool::replay`] computes the result.
    fn is_pure(&self) -> bool {
        false
    }
}

/// A tool whose result depends on its arguments alone (see [`Tool::replay`]): re-runs execute
/// it again and report a result that differs from the recorded one.
pub struct Pure<F> {
    spec: ToolSpec,
    f: F,
}

impl<F> std::fmt::Debug for Pure<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pure").field("name", &self.spec.name).finish_non_exhaustive()
    }
}

/// A [`Pure`] tool of `spec` computed by `f`.
pub fn pure<F>(spec: ToolSpec, f: F) -> Arc<dyn Tool>
where
    F: Fn(&Value) -> Result<Value, ToolError> + Send + Sync + 'static,
{
    Arc::new(Pure { spec, f })
}

impl<F> Tool for Pure<F>
where
    F: Fn(&Value) -> Result<Value, ToolError> + Send + Sync + 'static,
{
    fn spec(&self) -> ToolSpec {
        self.spec.clone()
    }

    fn call<'a>(&'a self, _ctx: &'a ToolCtx, args: Value) -> BoxFuture<'a, Result<Value, ToolError>> {
        let r = (self.f)(&args);
        Box::pin(async move { r })
    }

    fn replay(&self, args: &Value) -> Option<Result<Value, ToolError>> {
        Some((self.f)(args))
    }

    fn is_pure(&self) -> bool {
        true
    }
}

struct Entry {
    tool: Arc<dyn Tool>,
    spec: ToolSpec,
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry").field("tool", &self.spec.name).finish()
    }
}

/// Every tool a runner knows, by name.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    tools: BTreeMap<String, Arc<Entry>>,
}

impl Registry {
    /// The built-in tools.
    pub fn with_builtins() -> anyhow::Result<Self> {
        let mut r = Self::default();
        for t in builtins() {
            r.add(t)?;
        }
        Ok(r)
    }

    /// Adds (or replaces) a tool; its schema must compile.
    pub fn add(&mut self, tool: Arc<dyn Tool>) -> anyhow::Result<()> {
        let spec = tool.spec();
        let validator = jsonschema::validator_for(&spec.parameters)
            .map_err(|e| anyhow::anyhow!("tool {}: invalid argument schema: {e}", spec.name))?;
        self.tools.insert(spec.name.clone(), Arc::new(Entry { tool, spec, validator }));
        Ok(())
    }

    /// True when a tool of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tools.contains_key(name)
    }

    /// Specs of the named tools (for a template's allow-list).
    pub fn specs(&self, names: &[String]) -> Vec<ToolSpec> {
        names.iter().filter_map(|n| self.tools.get(n)).map(|e| e.spec.clone()).collect()
    }

    /// What a re-run gets for a call: the tool's result computed again when it is pure (its
    /// arguments validated as for a call), `None` when the recorded result stands.
    pub fn replay(&self, name: &str, args: &Result<Value, String>) -> Option<Result<Value, ToolError>> {
        let entry = self.tools.get(name).filter(|e| e.tool.is_pure())?;
        let args = match args {
            Ok(a) => a,
            Err(raw) => return Some(Err(ToolError::new(format!("arguments are not a JSON object: {raw}")))),
        };
        let problems: Vec<String> = entry.validator.iter_errors(args).map(|e| e.to_string()).collect();
        if !problems.is_empty() {
            return Some(Err(ToolError::new(format!(
                "invalid arguments for {name}: {}",
                problems.join("; ")
            ))));
        }
        entry.tool.replay(args)
    }

    /// Validates the arguments and runs the tool. A tool not in `allowed` is refused.
    pub async fn call(
        &self,
        allowed: &[String],
        name: &str,
        args: Result<Value, String>,
        ctx: &ToolCtx,
    ) -> Result<Value, ToolError> {
        if !allowed.iter().any(|a| a == name) {
            return Err(ToolError::new(format!("tool {name:?} is not available to this agent")));
        }
        let entry = self.tools.get(name).ok_or_else(|| ToolError::new(format!("unknown tool {name:?}")))?;
        let args = args.map_err(|raw| ToolError::new(format!("arguments are not a JSON object: {raw}")))?;
        let problems: Vec<String> = entry.validator.iter_errors(&args).map(|e| e.to_string()).collect();
        if !problems.is_empty() {
            return Err(ToolError::new(format!("invalid arguments for {name}: {}", problems.join("; "))));
        }
        entry.tool.call(ctx, args).await
    }
}
