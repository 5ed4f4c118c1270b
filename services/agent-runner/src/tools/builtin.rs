//! The built-in tools, each a spec and an async function ([`builtins`]): shared memory
//! (`memory_get`, `memory_put`, `memory_list`, in a KV bucket namespaced by tenant), `publish` to
//! a topic, `delegate` a sub-task and wait for it, `ask_human` for approval, and `send_message` to
//! another agent.

use std::sync::Arc;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use flotilla_protocol::names::event_kind;
use flotilla_protocol::{
    Approval, ApprovalStatus, TaskEvent, TaskRecord, TaskSubmission, codec, headers, time::now_ms,
};
use futures::StreamExt as _;
use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::{Tool, ToolCtx, ToolError};
use crate::llm::ToolSpec;

/// A built-in tool: its spec and the function that runs it.
struct Builtin {
    spec: ToolSpec,
    run: for<'a> fn(&'a ToolCtx, Value) -> BoxFuture<'a, Result<Value, ToolError>>,
}

impl Builtin {
    fn tool(
        spec: ToolSpec,
        run: for<'a> fn(&'a ToolCtx, Value) -> BoxFuture<'a, Result<Value, ToolError>>,
    ) -> Arc<dyn Tool> {
        Arc::new(Self { spec, run })
    }
}

impl std::fmt::Debug for Builtin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builtin").field("name", &self.spec.name).finish_non_exhaustive()
    }
}

impl Tool for Builtin {
    fn spec(&self) -> ToolSpec {
        self.spec.clone()
    }

    fn call<'a>(&'a self, ctx: &'a ToolCtx, args: Value) -> BoxFuture<'a, Result<Value, ToolError>> {
        (self.run)(ctx, args)
    }
}

/// Every built-in tool.
pub fn builtins() -> Vec<Arc<dyn Tool>> {
    vec![
        Builtin::tool(memory_get_spec(), |ctx, args| Box::pin(memory_get(ctx, args))),
        Builtin::tool(memory_put_spec(), |ctx, args| Box::pin(memory_put(ctx, args))),
        Builtin::tool(memory_list_spec(), |ctx, args| Box::pin(memory_list(ctx, args))),
        Builtin::tool(memory_delete_spec(), |ctx, args| Box::pin(memory_delete(ctx, args))),
        Builtin::tool(memory_history_spec(), |ctx, args| Box::pin(memory_history(ctx, args))),
        Builtin::tool(memory_wait_spec(), |ctx, args| Box::pin(memory_wait(ctx, args))),
        Builtin::tool(publish_spec(), |ctx, args| Box::pin(publish(ctx, args))),
        Builtin::tool(remember_spec(), |ctx, args| Box::pin(remember(ctx, args))),
        Builtin::tool(recall_spec(), |ctx, args| Box::pin(recall(ctx, args))),
        Builtin::tool(delegate_spec(), |ctx, args| Box::pin(delegate(ctx, args))),
        Builtin::tool(ask_human_spec(), |ctx, args| Box::pin(ask_human(ctx, args))),
        Builtin::tool(send_message_spec(), |ctx, args| Box::pin(send_message(ctx, args))),
    ]
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= flotilla_protocol::limits::MAX_MEMORY_KEY_BYTES
        && !key.starts_with('.')
        && !key.ends_with('.')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '/' | '=' | '.'))
}

/// A memory key as stored (`<tenant>.<key>`) and its namespace (the key's first dot-separated
/// part, or `default` for a key without a dot), from a tool call's `key` and `namespace`.
struct MemoryKey {
    stored: String,
    namespace: String,
}

fn memory_key(ctx: &ToolCtx, args: &Value) -> Result<MemoryKey, ToolError> {
    let key = str_arg(args, "key")?;
    let key = match args.get("namespace").and_then(Value::as_str) {
        Some(ns) => format!("{ns}.{key}"),
        None => key.to_owned(),
    };
    if !valid_key(&key) {
        return Err(ToolError::new("key must be 1-200 characters of A-Z a-z 0-9 _ - / = ."));
    }
    let namespace = key.split_once('.').map_or("default", |(ns, _)| ns).to_owned();
    Ok(MemoryKey { stored: format!("{}.{key}", ctx.task.tenant), namespace })
}

/// Refuses a memory access the grants do not allow (`permission_denied` with the rule).
fn memory_allowed(
    ctx: &ToolCtx,
    scope: flotilla_protocol::GrantScope,
    namespace: &str,
) -> Result<(), ToolError> {
    let to = flotilla_protocol::Party::namespace(namespace, &ctx.task.tenant);
    let d = ctx.grants.decide(scope, &ctx.party, &to);
    if d.allowed {
        return Ok(());
    }
    let what = if scope == flotilla_protocol::GrantScope::MemoryWrite { "write" } else { "read" };
    Err(ToolError::new(format!(
        "permission_denied: {} may not {what} namespace:{namespace} (rule {})",
        ctx.party, d.rule
    )))
}

fn str_arg<'a>(args: &'a Value, name: &str) -> Result<&'a str, ToolError> {
    args.get(name).and_then(Value::as_str).ok_or_else(|| ToolError::new(format!("missing {name}")))
}

fn nats_err(e: impl std::fmt::Display) -> ToolError {
    ToolError::new(format!("shared state unavailable: {e}"))
}

/// The `key` and optional `namespace` arguments every memory tool takes.
fn key_args(extra: Value) -> Value {
    let mut props = json!({
        "key": { "type": "string", "description": "memory key (its first dot-separated part is its namespace)" },
        "namespace": { "type": "string", "description": "namespace; the key is then <namespace>.<key>" }
    });
    if let (Some(p), Some(e)) = (props.as_object_mut(), extra.as_object()) {
        p.extend(e.clone());
    }
    props
}

fn memory_get_spec() -> ToolSpec {
    ToolSpec::object(
        "memory_get",
        "Read a value from the fleet's shared memory, with its revision (0 when the key is not set).",
        key_args(json!({})),
        &["key"],
    )
}

fn decoded(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or(Value::Null)
}

async fn memory_get(ctx: &ToolCtx, args: Value) -> Result<Value, ToolError> {
    let k = memory_key(ctx, &args)?;
    memory_allowed(ctx, flotilla_protocol::GrantScope::MemoryRead, &k.namespace)?;
    let entry = ctx.memory.entry(&k.stored).await.map_err(nats_err)?;
    Ok(match entry {
        Some(e) if e.operation == async_nats::jetstream::kv::Operation::Put => {
            json!({ "value": decoded(&e.value), "revision": e.revision })
        }
        _ => json!({ "value": null, "revision": 0 }),
    })
}

fn memory_put_spec() -> ToolSpec {
    ToolSpec::object(
        "memory_put",
        "Store a JSON value in the fleet's shared memory under a key.",
        key_args(json!({
            "value": { "description": "any JSON value" },
            "expected_revision": {
                "type": "integer",
                "minimum": 0,
                "description": "store only if the key is still at this revision (0: only if it is not set); otherwise a conflict is reported: read again and retry"
            }
        })),
        &["key", "value"],
    )
}

async fn memory_put(ctx: &ToolCtx, args: Value) -> Result<Value, ToolError> {
    let k = memory_key(ctx, &args)?;
    memory_allowed(ctx, flotilla_protocol::GrantScope::MemoryWrite, &k.namespace)?;
    let value = args.get("value").cloned().unwrap_or(Value::Null);
    let bytes = serde_json::to_vec(&value).map_err(|e| ToolError::new(e.to_string()))?;
    if let Err(e) = flotilla_protocol::limits::check(
        Some(headers::APPLICATION_JSON),
        &bytes,
        &flotilla_protocol::limits::MEMORY,
    ) {
        return Err(ToolError::new(format!("{}: the value is refused: {e}", e.code())));
    }
    let revision = match args.get("expected_revision").and_then(Value::as_u64) {
        None => ctx.memory.put(&k.stored, bytes.into()).await.map_err(nats_err)?,
        Some(0) => match ctx.memory.create(&k.stored, bytes.into()).await {
            Ok(r) => r,
            Err(e) if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {
                return Err(conflict(ctx, &k, 0).await);
            }
            Err(e) => return Err(nats_err(e)),
        },
        Some(rev) => match ctx.memory.update(&k.stored, bytes.into(), rev).await {
            Ok(r) => r,
            Err(e) if e.kind() == async_nats::jetstream::kv::UpdateErrorKind::WrongLastRevision => {
                return Err(conflict(ctx, &k, rev).await);
            }
            Err(e) => return Err(nats_err(e)),
        },
    };
    Ok(json!({ "stored": true, "revision": revision }))
}

/// A compare-and-swap that lost: what the key holds now, for the model to retry from.
async fn conflict(ctx: &ToolCtx, k: &MemoryKey, expected: u64) -> ToolError {
    let now = match ctx.memory.entry(&k.stored).await {
        Ok(Some(e)) if e.operation == async_nats::jetstream::kv::Operation::Put => {
            json!({ "value": decoded(&e.value), "revision": e.revision })
        }
        _ => json!({ "value": null, "revision": 0 }),
    };
    ToolError::new(format!(
        "conflict: the key is no longer at revision {expected}; it now holds {now}. Read it again and retry."
    ))
}

fn memory_delete_spec() -> ToolSpec {
    ToolSpec::object(
        "memory_delete",
        "Delete a key from the fleet's shared memory (with expected_revision: only if it is still at that revision).",
        key_args(json!({ "expected_revision": { "type": "integer", "minimum": 1 } })),
        &["key"],
    )
}

async fn memory_delete(ctx: &ToolCtx, args: Value) -> Result<Value, ToolError> {
    let k = memory_key(ctx, &args)?;
    memory_allowed(ctx, flotilla_protocol::GrantScope::MemoryWrite, &k.namespace)?;
    let expected = args.get("expected_revision").and_then(Value::as_u64);
    match ctx.memory.delete_expect_revision(&k.stored, expected).await {
        Ok(()) => Ok(json!({ "deleted": true })),
        Err(e) if expected.is_some() && e.to_string().contains("wrong last sequence") => {
            Err(conflict(ctx, &k, expected.unwrap_or_default()).await)
        }
        Err(e) => Err(nats_err(e)),
    }
}

fn memory_history_spec() -> ToolSpec {
    ToolSpec::object(
        "memory_history",
        "The recent values of a key in the fleet's shared memory, oldest first, with their revisions.",
        key_args(json!({})),
        &["key"],
    )
}

async fn memory_history(ctx: &ToolCtx, args: Value) -> Result<Value, ToolError> {
    let k = memory_key(ctx, &args)?;
    memory_allowed(ctx, flotilla_protocol::GrantScope::MemoryRead, &k.namespace)?;
    let mut history = match ctx.memory.history(&k.stored).await {
        Ok(h) => h,
        // No value ever: an empty history.
        Err(e) if e.to_string().contains("no key") || e.to_string().contains("not found") => {
            return Ok(json!([]));
        }
        Err(e) => return Err(nats_err(e)),
    };
    let mut out = Vec::new();
    while let Some(e) = history.next().await {
        let e = e.map_err(nats_err)?;
        let deleted = e.operation != async_nats::jetstream::kv::Operation::Put;
        out.push(json!({
            "revision": e.revision,
            "value": if deleted { Value::Null } else { decoded(&e.value) },
            "deleted": deleted,
            "at": e.created.unix_timestamp(),
        }));
    }
    Ok(json!(out))
}

fn memory_wait_spec() -> ToolSpec {
    ToolSpec::object(
        "memory_wait",
        "Wait until a key of the fleet's shared memory changes (past after_revision, or from now), \
         up to timeout_s; returns the new value and revision, or timed_out.",
        key_args(json!({
            "after_revision": { "type": "integer", "minimum": 0 },
            "timeout_s": { "type": "integer", "minimum": 1, "maximum": 3600, "default": 60 }
        })),
        &["key"],
    )
}

async fn memory_wait(ctx: &ToolCtx, args: Value) -> Result<Value, ToolError> {
    let k = memory_key(ctx, &args)?;
    memory_allowed(ctx, flotilla_protocol::GrantScope::MemoryRead, &k.namespace)?;
    let timeout = std::time::Duration::from_secs(
        args.get("timeout_s").and_then(Value::as_u64).unwrap_or(60).clamp(1, 3600),
    );
    // Watching first, then reading, so a change in between is not missed.
    let mut watch = ctx.memory.watch_with_history(&k.stored).await.map_err(nats_err)?;
    let after = match args.get("after_revision").and_then(Value::as_u64) {
        Some(r) => r,
        None => match ctx.memory.entry(&k.stored).await.map_err(nats_err)? {
            Some(e) => e.revision,
            None => 0,
        },
    };
    let until = now_ms().saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
    let wait = ctx.begin_wait(flotilla_protocol::wait_kind::ON_MEMORY, &k.stored, Some(until)).await;
    let changed = async {
        while let Some(e) = watch.next().await {
            let e = e.map_err(nats_err)?;
            if e.revision > after {
                return Ok(Some(e));
            }
        }
        Ok::<_, ToolError>(None)
    };
    let result = tokio::select! {
        r = changed => r,
        _ = tokio::time::sleep(timeout) => Ok(None),
        _ = ctx.cancel.cancelled() => Err(ToolError::new("cancelled while waiting for a change")),
    };
    wait.end(ctx).await;
    Ok(match result? {
        Some(e) => {
            let deleted = e.operation != async_nats::jetstream::kv::Operation::Put;
            json!({
                "value": if deleted { Value::Null } else { decoded(&e.value) },
                "revision": e.revision,
                "deleted": deleted,
                "woken_at_ms": now_ms(),
            })
        }
        None => json!({ "timed_out": true, "revision": after }),
    })
}

fn memory_list_spec() -> ToolSpec {
    ToolSpec::object(
        "memory_list",
        "List keys in the fleet's shared memory, optionally only those of a namespace or starting with a prefix.",
        json!({ "prefix": { "type": "string" }, "namespace": { "type": "string" } }),
        &[],
    )
}

async fn memory_list(ctx: &ToolCtx, args: Value) -> Result<Value, ToolError> {
    let own = format!("{}.", ctx.task.tenant);
    let prefix = args.get("prefix").and_then(Value::as_str).unwrap_or_default();
    let prefix = match args.get("namespace").and_then(Value::as_str) {
        Some(ns) => format!("{ns}.{prefix}"),
        None => prefix.to_owned(),
    };
    let mut keys = ctx.memory.keys().await.map_err(nats_err)?;
    let mut out = Vec::new();
    while let Some(k) = keys.next().await {
        let k = k.map_err(nats_err)?;
        if let Some(key) = k.strip_prefix(&own)
            && key.starts_with(&prefix)
        {
            let ns = key.split_once('.').map_or("default", |(ns, _)| ns);
            if memory_allowed(ctx, flotilla_protocol::GrantScope::MemoryRead, ns).is_ok() {
                out.push(key.to_owned());
            }
        }
    }
    out.sort();
    out.truncate(200);
    Ok(json!(out))
}

fn publish_spec() -> ToolSpec {
    ToolSpec::object(
        "publish",
        "Publish an event to a topic: it is stored, and every template subscribed to the topic acts on it once.",
        json!({
            "topic": { "type": "string", "description": "topic name, e.g. alerts or build.status" },
            "message": { "description": "any JSON value" }
        }),
        &["topic", "message"],
    )
}

async fn publish(ctx: &ToolCtx, args: Value) -> Result<Value, ToolError> {
    let topic = str_arg(&args, "topic")?;
    if !topic.split('.').all(flotilla_protocol::names::is_token) {
        return Err(ToolError::new("topic must be dot-separated words of A-Z a-z 0-9 _ -"));
    }
    let body = json!({
        "from_agent": ctx.agent_id,
        "task_id": ctx.task.id,
        "message": args.get("message").cloned().unwrap_or(Value::Null),
    });
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::CONTENT_TYPE, headers::APPLICATION_JSON);
    // The same call of the same step publishes once, however often the step is re-run.
    let msg_id = format!("pub:{}:{}:{}:{}", ctx.task.id, ctx.task.attempt, ctx.step, ctx.index);
    h.insert(headers::NATS_MSG_ID, msg_id.as_str());
    let payload = body.to_string();
    if let Err(e) = flotilla_protocol::limits::check(
        Some(headers::APPLICATION_JSON),
        payload.as_bytes(),
        &flotilla_protocol::limits::TOPIC,
    ) {
        return Err(ToolError::new(format!("{}: the message is refused: {e}", e.code())));
    }
    let subject = ctx.fleet.names.topic_subject(topic);
    let ack = ctx
        .fleet
        .js
        .publish_with_headers(subject.clone(), h, payload.into())
        .await
        .map_err(nats_err)?
        .await
        .map_err(nats_err)?;
    Ok(json!({ "published": subject, "seq": ack.sequence }))
}

fn remember_spec() -> ToolSpec {
    ToolSpec::object(
        "remember",
        "Remember a text (with optional metadata) in the fleet's shared recall, for any agent of the tenant to recall by meaning.",
        json!({
            "text": { "type": "string" },
            "metadata": { "type": "object", "description": "fields recall can filter on" }
        }),
        &["text"],
    )
}

/// Longest text `remember` keeps.
const MAX_REMEMBERED: usize = 16 * 1024;

async fn remember(ctx: &ToolCtx, args: Value) -> Result<Value, ToolError> {
    let text = str_arg(&args, "text")?;
    if text.is_empty() || text.len() > MAX_REMEMBERED {
        return Err(ToolError::new(format!("text must be 1-{MAX_REMEMBERED} bytes")));
    }
    let metadata = match args.get("metadata") {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(ToolError::new("metadata must be an object")),
    };
    let vector = ctx.embedder.embed(text).await.map_err(ToolError::new)?;
    // The same call of the same step remembers once, however often the step runs.
    let seed = format!("{}:{}:{}:{}", ctx.task.id, ctx.task.attempt, ctx.step, ctx.index);
    let id = format!("r{}", uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, seed.as_bytes()).simple());
    let r = flotilla_protocol::Recollection {
        id: id.clone(),
        tenant: ctx.task.tenant.clone(),
        text: text.to_owned(),
        metadata,
        model: ctx.embedder.model().to_owned(),
        vector,
        agent_id: Some(ctx.agent_id.clone()),
        task_id: Some(ctx.task.id.clone()),
        at_ms: now_ms(),
    };
    let subject = ctx.fleet.names.recall_subject(&ctx.task.tenant);
    let ack = ctx
        .fleet
        .send_durable(subject, &r, Some(&id))
        .await
        .map_err(nats_err)?
        .acked()
        .await
        .map_err(nats_err)?;
    Ok(json!({ "remembered": id, "seq": ack.sequence }))
}

fn recall_spec() -> ToolSpec {
    ToolSpec::object(
        "recall",
        "Recall the texts of the fleet's shared recall nearest in meaning to a query, nearest first.",
        json!({
            "query": { "type": "string" },
            "k": { "type": "integer", "minimum": 1, "maximum": 50, "default": 5 },
            "filter": { "type": "object", "description": "metadata fields the texts must have" }
        }),
        &["query"],
    )
}

async fn recall(ctx: &ToolCtx, args: Value) -> Result<Value, ToolError> {
    let query = str_arg(&args, "query")?;
    let k = usize::try_from(args.get("k").and_then(Value::as_u64).unwrap_or(5).clamp(1, 50)).unwrap_or(5);
    let filter = match args.get("filter") {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(ToolError::new("filter must be an object")),
    };
    let vector = ctx.embedder.embed(query).await.map_err(ToolError::new)?;
    // Everything stored when the question was asked is in the answer, on every runner.
    let end = crate::recall::stream_end(&ctx.fleet).await.map_err(nats_err)?;
    if !ctx.recall.caught_up(end, std::time::Duration::from_secs(5)).await {
        return Err(ToolError::new("the recall index is still loading; try again"));
    }
    let hits = ctx
        .recall
        .search(&ctx.task.tenant, ctx.embedder.model(), &vector, k, &filter)
        .map_err(ToolError::new)?;
    Ok(json!(hits
        .iter()
        .map(|h| json!({ "id": h.id, "text": h.text, "metadata": h.metadata, "score": (f64::from(h.score) * 1e4).round() / 1e4 }))
        .collect::<Vec<_>>()))
}

/// Id of a child task: stable across retries of the parent, so a re-run finds its children.
fn child_id(parent: &str, step: u32, index: usize) -> String {
    let id = format!("{parent}-s{step}c{index}");
    if id.len() <= 128 {
        id
    } else {
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, id.as_bytes()).to_string()
    }
}

fn delegate_spec() -> ToolSpec {
    ToolSpec::object(
        "delegate",
        "Hand a sub-task to another agent with the given capability and wait for its result.",
        json!({
            "capability": { "type": "string" },
            "input": { "description": "the sub-task's input" },
            "budget_tokens": { "type": "integer", "minimum": 1 }
        }),
        &["capability", "input"],
    )
}

async fn delegate(ctx: &ToolCtx, args: Value) -> Result<Value, ToolError> {
    let capability = str_arg(&args, "capability")?.to_owned();
    let id = child_id(&ctx.task.id, ctx.step, ctx.index);
    let fleet = &ctx.fleet;
    // Follow the child's events from the start, before submitting, so nothing is missed.
    let stream = fleet.js.get_stream_no_info(fleet.names.events_stream()).await.map_err(nats_err)?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            name: Some(flotilla_service::nats::ordered_name()),
            filter_subject: fleet.names.tenant_task_events_of(&ctx.task.tenant, &id),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(nats_err)?;
    let mut events = consumer.messages().await.map_err(nats_err)?;
    let asked = args.get("budget_tokens").and_then(Value::as_u64);
    let budget_tokens = carve(ctx, &id, asked).await?;
    let sub = TaskSubmission {
        id: Some(id.clone()),
        capability,
        input: args.get("input").cloned().unwrap_or(Value::Null),
        priority: Some(ctx.task.priority),
        tenant: Some(ctx.task.tenant.clone()),
        budget_tokens,
        deadline: ctx.task.deadline_ms.map(flotilla_protocol::TimeSpec::Millis),
        parent_id: Some(ctx.task.id.clone()),
        ..Default::default()
    };
    if let Err(e) =
        fleet.publish_durable(fleet.names.tenant_submit_subject(&ctx.task.tenant), &sub, Some(&id)).await
    {
        // Nothing was submitted: what was carved for the child goes back at once.
        if let Some(client) = &ctx.budgets {
            crate::budget::close_task(client, &id).await;
        }
        return Err(nats_err(e));
    }
    // Link the child in the parent's record.
    let parent = ctx.task.id.clone();
    let child = id.clone();
    fleet
        .kv_modify::<TaskRecord, _>(&ctx.tasks, &parent, 10, |mut r| r.link_child(&child).then_some(r))
        .await
        .map_err(nats_err)?;
    tracing::info!(child = %id, "delegated; waiting for the sub-task");
    let wait = ctx.begin_wait(flotilla_protocol::wait_kind::ON_TASK, &id, ctx.task.deadline_ms).await;
    let result = wait_for_child(ctx, &id, &mut events).await;
    wait.end(ctx).await;
    if result.is_ok()
        && let Some(client) = &ctx.budgets
    {
        // The child ended: what it did not use goes back to this task (its runner closes
        // it too; closing twice changes nothing).
        crate::budget::close_task(client, &id).await;
    }
    result
}

/// A child's budget: carved out of this task's remaining budget when this task has one (all of
/// what remains unless the call asks for less), else what the call asked for.
async fn carve(ctx: &ToolCtx, child: &str, asked: Option<u64>) -> Result<Option<u64>, ToolError> {
    let (Some(client), Some(cap)) = (&ctx.budgets, ctx.task_cap) else { return Ok(asked) };
    let parent = crate::budget::task_scope(&ctx.task.id);
    let want = match asked {
        Some(n) => n,
        None => {
            let show = flotilla_protocol::ShowRequest { scope: Some(parent.clone()), ..Default::default() };
            match client.call(&show).await {
                Ok(r) => r.budget.and_then(|b| b.available).unwrap_or(cap),
                Err(e) if e.code() == "unknown_scope" => cap,
                Err(e) => return Err(ToolError::new(format!("cannot read this task's budget: {e}"))),
            }
        }
    };
    if want == 0 {
        return Err(ToolError::new("this task's budget is used up: nothing left to delegate"));
    }
    // The carve lives as long as this task may: its deadline, else a day.
    let lease_ms = ctx
        .task
        .deadline_ms
        .map_or(24 * 3600 * 1000, |d| d.saturating_sub(flotilla_protocol::time::now_ms()))
        .max(60_000);
    let req = flotilla_protocol::CarveRequest {
        id: format!("carve:{child}"),
        scopes: vec![parent.clone()],
        want,
        lease_ms: Some(lease_ms),
        scope: crate::budget::task_scope(child),
        limits: [(parent, cap)].into_iter().collect(),
        ..Default::default()
    };
    match client.call(&req).await {
        Ok(r) => {
            tracing::info!(child, tokens = r.tokens, "carved the sub-task's budget out of this task's");
            Ok(r.tokens)
        }
        Err(e) if e.code() == "budget_exceeded" => {
            Err(ToolError::new(format!("this task's budget cannot give the sub-task {want} tokens: {e}")))
        }
        Err(e) => Err(ToolError::new(format!("cannot carve the sub-task's budget: {e}"))),
    }
}

async fn wait_for_child(
    ctx: &ToolCtx,
    id: &str,
    events: &mut async_nats::jetstream::consumer::pull::Ordered,
) -> Result<Value, ToolError> {
    // The wait ends at this task's deadline: past it, the sub-task's answer is no use to it.
    let deadline = ctx
        .task
        .deadline_ms
        .map(|d| tokio::time::Instant::now() + std::time::Duration::from_millis(d.saturating_sub(now_ms())));
    let past_deadline = async {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(past_deadline);
    loop {
        let msg = tokio::select! {
            _ = ctx.cancel.cancelled() => return Err(ToolError::new("cancelled while waiting for the sub-task")),
            () = &mut past_deadline => {
                return Err(ToolError::fail_task(
                    flotilla_protocol::failure::DEADLINE_EXCEEDED,
                    format!("the deadline passed while waiting for sub-task {id}"),
                ));
            }
            m = events.next() => match m {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(nats_err(e)),
                None => return Err(ToolError::new("event stream ended")),
            },
        };
        let ct =
            msg.headers.as_ref().and_then(|h| h.get(headers::CONTENT_TYPE)).map(|v| v.as_str().to_owned());
        let Ok(ev) = codec::decode::<TaskEvent>(ct.as_deref(), &msg.payload) else { continue };
        match ev.kind.as_str() {
            event_kind::COMPLETED => {
                return Ok(
                    json!({ "task_id": id, "status": "completed", "output": ev.output, "usage": ev.usage }),
                );
            }
            event_kind::FAILED | event_kind::REJECTED => {
                return Ok(json!({ "task_id": id, "status": ev.kind, "error": ev.error }));
            }
            _ => {}
        }
    }
}

fn ask_human_spec() -> ToolSpec {
    ToolSpec::object(
        "ask_human",
        "Ask a human operator to approve the next action and wait for the answer. \
         A rejection ends the task.",
        json!({ "question": { "type": "string", "description": "what to approve" } }),
        &["question"],
    )
}

async fn ask_human(ctx: &ToolCtx, args: Value) -> Result<Value, ToolError> {
    let question = str_arg(&args, "question")?.to_owned();
    let request_id = format!("s{}c{}", ctx.step, ctx.index);
    let key = ctx.task.id.as_str();
    // Watch first, so a decision made right after the request is not missed.
    let mut watch = ctx.approvals.watch(key).await.map_err(nats_err)?;
    let existing = ctx.fleet.kv_get::<Approval>(&ctx.approvals, key).await.map_err(nats_err)?;
    let decided = match existing {
        // A retried attempt finds the answer its request already got.
        Some((a, _)) if a.request_id == request_id && a.status != ApprovalStatus::Pending => Some(a),
        Some((a, _)) if a.request_id == request_id => None,
        _ => {
            let a = Approval {
                task_id: ctx.task.id.clone(),
                request_id: request_id.clone(),
                agent_id: ctx.agent_id.clone(),
                question: question.clone(),
                status: ApprovalStatus::Pending,
                comment: None,
                asked_at_ms: now_ms(),
                decided_at_ms: None,
                signer: None,
                signature: None,
            };
            ctx.fleet.kv_put(&ctx.approvals, key, &a).await.map_err(nats_err)?;
            let mut ev =
                TaskEvent::for_task(&ctx.task, flotilla_protocol::names::event_kind::APPROVAL_REQUESTED);
            ev.step = Some(ctx.step);
            ev.agent_id = Some(ctx.agent_id.clone());
            ev.detail = Some(json!({ "question": question, "request_id": request_id }));
            ctx.fleet.publish_event(&ev).await.map_err(nats_err)?;
            None
        }
    };
    let decided = match decided {
        Some(a) => match flotilla_service::attest::approval_actor(&ctx.fleet, &ctx.operators, &a).await {
            Ok(by) => Some((a, by)),
            Err(_) => None,
        },
        None => None,
    };
    let (decision, by) = match decided {
        Some(found) => found,
        None => {
            let wait = ctx.begin_wait(flotilla_protocol::wait_kind::ON_APPROVAL, &request_id, None).await;
            let waited = async {
                loop {
                    let entry = tokio::select! {
                        _ = ctx.cancel.cancelled() => return Err(ToolError::new("cancelled while waiting for approval")),
                        e = watch.next() => match e {
                            Some(Ok(e)) => e,
                            Some(Err(e)) => return Err(nats_err(e)),
                            None => return Err(ToolError::new("approval watch ended")),
                        },
                    };
                    if let Ok(a) = codec::decode::<Approval>(None, &entry.value)
                        && a.request_id == request_id
                        && a.status != ApprovalStatus::Pending
                    {
                        match flotilla_service::attest::approval_actor(&ctx.fleet, &ctx.operators, &a).await {
                            Ok(by) => return Ok((a, by)),
                            // Not an operator's decision: the request stays open.
                            Err(r) => {
                                let action = if a.status == ApprovalStatus::Approved { "approve" } else { "reject" };
                                let by = format!("agent-runner {}", ctx.runner_id);
                                flotilla_service::attest::publish_refusal(&ctx.fleet, action, Some(&a.task_id), &r, &by).await;
                            }
                        }
                    }
                }
            }
            .await;
            wait.end(ctx).await;
            waited?
        }
    };
    // Who decided goes into the task's history (once per request: the event id is fixed).
    let mut ev = TaskEvent::for_task(&ctx.task, flotilla_protocol::names::event_kind::APPROVAL_DECIDED);
    ev.step = Some(ctx.step);
    ev.agent_id = Some(ctx.agent_id.clone());
    ev.actor = Some(by.clone());
    ev.detail = Some(json!({
        "request_id": request_id,
        "decision": decision.status,
        "comment": decision.comment,
        "by": by,
    }));
    let msg_id = format!("{}:approval_decided:{request_id}", ctx.task.id);
    ctx.fleet
        .send_event_with_id(&ev, &msg_id)
        .await
        .map_err(nats_err)?
        .confirmed()
        .await
        .map_err(nats_err)?;
    match decision.status {
        ApprovalStatus::Rejected => Err(ToolError::fail_task(
            "rejected",
            decision.comment.unwrap_or_else(|| "rejected by a human".to_owned()),
        )),
        _ => Ok(json!({ "approved": true, "comment": decision.comment })),
    }
}

fn send_message_spec() -> ToolSpec {
    ToolSpec::object(
        "send_message",
        "Send a message to another agent (by id), to any agent of a template or with a capability, or to \
         every agent a selector matches (broadcast, e.g. \"template:critic\"). It is stored before this \
         returns; the receiver's model acts on it. Optionally wait for the receiver's answer.",
        json!({
            "agent": { "type": "string", "description": "the receiving agent's id" },
            "template": { "type": "string", "description": "any agent of this template" },
            "capability": { "type": "string", "description": "any agent with this capability" },
            "broadcast": { "type": "string", "description": "every agent matching: agent:ID, template:NAME, capability:CAP, tenant:T (comma-separated), or *" },
            "message": { "description": "the message (text or JSON)" },
            "wait_reply": { "type": "boolean", "default": false },
            "timeout_s": { "type": "integer", "minimum": 1, "maximum": 3600, "default": 60 },
            "priority": { "description": "0-9 or critical, interactive, normal, batch; default the task's" },
            "ttl_s": { "type": "integer", "minimum": 1, "maximum": 86400, "description": "how long the message may wait for its receiver (default 3600)" }
        }),
        &["message"],
    )
}

async fn send_message(ctx: &ToolCtx, args: Value) -> Result<Value, ToolError> {
    let text = |name: &str| args.get(name).and_then(Value::as_str).map(str::to_owned);
    let broadcast = match text("broadcast") {
        Some(s) => Some(flotilla_protocol::Selector::parse(&s).map_err(ToolError::new)?),
        None => None,
    };
    let to = flotilla_protocol::Address {
        agent: text("agent"),
        template: text("template"),
        capability: text("capability"),
        broadcast,
        client: None,
    };
    if to.alternatives() != 1 {
        return Err(ToolError::new("give exactly one of agent, template, capability, broadcast"));
    }
    let priority = match args.get("priority") {
        None | Some(Value::Null) => ctx.task.priority,
        Some(p) => serde_json::from_value(p.clone())
            .map_err(|_| ToolError::new("priority must be 0-9 or critical, interactive, normal, batch"))?,
    };
    let wants_reply =
        args.get("wait_reply").and_then(Value::as_bool).unwrap_or(false) && to.broadcast.is_none();
    let timeout = std::time::Duration::from_secs(
        args.get("timeout_s").and_then(Value::as_u64).unwrap_or(60).clamp(1, 3600),
    );
    // The same call of the same step sends the same message: a re-run is stored once.
    let seed = format!("{}:{}:{}:{}", ctx.task.id, ctx.task.attempt, ctx.step, ctx.index);
    let id = format!("m{}", uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, seed.as_bytes()).simple());
    let m = flotilla_protocol::MessageSend {
        id: Some(id.clone()),
        from: Some(ctx.agent_id.clone()),
        to,
        // Work on a message carries the conversation's task on.
        task_id: Some(
            ctx.task
                .parent_id
                .clone()
                .filter(|_| ctx.task.capability == "message")
                .unwrap_or_else(|| ctx.task.id.clone()),
        ),
        tenant: None,
        priority: Some(priority),
        ttl_ms: args.get("ttl_s").and_then(Value::as_u64).map(|s| s.clamp(1, 86_400) * 1000),
        wants_reply,
        in_reply_to: None,
        body: args.get("message").cloned().unwrap_or(Value::Null),
    };
    let waiting = wants_reply.then(|| ctx.mailbox.wait_for_reply(&id));
    let answer = crate::mailbox::send(&ctx.fleet, &ctx.runner_id, &m)
        .await
        .map_err(|e| ToolError::new(format!("{}: {}", e.code, e.message)))?;
    if let Some(err) = answer.error {
        return Err(ToolError::new(format!("{}: {}", err.code, err.message)));
    }
    let delivered: Vec<Value> = answer.delivered.iter().map(|d| json!(d.to)).collect();
    let refused: Vec<Value> = answer
        .refused
        .iter()
        .map(|r| json!({ "to": r.to, "code": r.code, "rule": r.rule, "message": r.message }))
        .collect();
    let Some(mut waiting) = waiting else {
        return Ok(json!({ "delivered": delivered, "refused": refused, "id": id }));
    };
    let until = now_ms().saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
    let wait = ctx.begin_wait(flotilla_protocol::wait_kind::ON_REPLY, &id, Some(until)).await;
    let reply = tokio::select! {
        r = &mut waiting.reply => r.ok(),
        _ = tokio::time::sleep(timeout) => None,
        _ = ctx.cancel.cancelled() => None,
    };
    wait.end(ctx).await;
    let Some(reply) = reply else {
        return Err(ToolError::new(format!("no reply within {timeout:?} (message {id} stays delivered)")));
    };
    if let Some(err) = reply.body.get("error") {
        return Err(ToolError::new(format!("the receiver failed: {err}")));
    }
    let text = reply.body.get("text").cloned().unwrap_or(reply.body.clone());
    Ok(json!({ "delivered": delivered, "id": id, "reply": text, "from": reply.from.to_string() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_child_ids() {
        assert!(valid_key("notes/today"));
        assert!(!valid_key("a b"));
        assert!(!valid_key(".x"));
        assert_eq!(child_id("t1", 2, 0), "t1-s2c0");
        assert!(child_id(&"x".repeat(128), 1, 0).len() <= 128);
    }
}
