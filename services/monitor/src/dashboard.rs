//! The live dashboard the monitor serves: the page and its assets (compiled in, so it works with
//! no internet), the views the fold keeps for it (each recent task's timeline, the approvals
//! waiting for a human, the agents), the JSON it reads (`/api/overview`, `/api/task/<id>`,
//! `/api/approvals`), the server-sent events that keep it live (`/api/live`, an overview twice a
//! second) and the approve/reject actions, signed with the operator credential the monitor was
//! given (`[monitor] operator_creds`), as `flotilla approve` signs them.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use flotilla_protocol::names::event_kind;
use flotilla_protocol::{Approval, ApprovalStatus, MessageEvent, TaskEvent, WaitEvent, time::now_ms};
use serde_json::{Value, json};

use crate::Http;

/// Tasks whose timelines are kept (the most recently seen).
const TIMELINES_KEPT: usize = 5_000;
/// Entries of one kind kept per task.
const ENTRIES_KEPT: usize = 500;

const INDEX_HTML: &str = include_str!("../assets/index.html");
const DASHBOARD_JS: &str = include_str!("../assets/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("../assets/dashboard.css");

/// One task's story, for its page.
#[derive(Debug, Default)]
pub struct Timeline {
    events: Vec<Value>,
    messages: Vec<Value>,
    budget: Vec<Value>,
    children: BTreeSet<String>,
    trace_id: Option<String>,
}

/// What the dashboard shows beyond the metrics.
#[derive(Debug, Default)]
pub struct Views {
    timelines: HashMap<String, Timeline>,
    order: VecDeque<String>,
    /// Approval requests not yet decided, by task.
    pub pending: BTreeMap<String, Value>,
    /// The agents, as the registry holds them (for the overview).
    pub agents: Vec<Value>,
}

fn push(v: &mut Vec<Value>, x: Value) {
    if v.len() < ENTRIES_KEPT {
        v.push(x);
    }
}

impl Views {
    fn timeline(&mut self, task: &str) -> &mut Timeline {
        if !self.timelines.contains_key(task) {
            self.order.push_back(task.to_owned());
            while self.order.len() > TIMELINES_KEPT {
                if let Some(old) = self.order.pop_front() {
                    self.timelines.remove(&old);
                }
            }
        }
        self.timelines.entry(task.to_owned()).or_default()
    }

    /// A task event, with the trace id of the message that carried it.
    pub fn task_event(&mut self, ev: &TaskEvent, seq: u64, trace_id: Option<String>) {
        // The partial text of a step is shown by the step's closing event.
        if ev.text_delta.is_some() {
            return;
        }
        let t = self.timeline(&ev.task_id);
        if t.trace_id.is_none() {
            t.trace_id = trace_id;
        }
        push(
            &mut t.events,
            json!({
                "seq": seq, "kind": ev.kind, "at_ms": ev.at_ms, "attempt": ev.attempt,
                "agent_id": ev.agent_id, "runner_id": ev.runner_id, "step": ev.step,
                "detail": ev.detail, "error": ev.error, "reason": ev.reason, "usage": ev.usage,
                "cost_usd": ev.cost_usd, "actor": ev.actor, "output": ev.output,
            }),
        );
        match ev.kind.as_str() {
            event_kind::APPROVAL_REQUESTED => {
                let detail = ev.detail.clone().unwrap_or(Value::Null);
                self.pending.insert(
                    ev.task_id.clone(),
                    json!({
                        "task_id": ev.task_id, "agent_id": ev.agent_id, "asked_at_ms": ev.at_ms,
                        "question": detail.get("question"), "request_id": detail.get("request_id"),
                    }),
                );
            }
            event_kind::APPROVAL_DECIDED
            | event_kind::COMPLETED
            | event_kind::FAILED
            | event_kind::REJECTED => {
                self.pending.remove(&ev.task_id);
            }
            _ => {}
        }
    }

    /// A direct-message event of a task's conversation.
    pub fn message_event(&mut self, ev: &MessageEvent) {
        let Some(task) = &ev.task_id else { return };
        let t = self.timeline(task);
        push(
            &mut t.messages,
            json!({
                "id": ev.message_id, "kind": ev.kind, "at_ms": ev.at_ms, "from": ev.from, "to": ev.to,
                "agent_id": ev.agent_id, "in_reply_to": ev.in_reply_to, "error": ev.error,
            }),
        );
    }

    /// A wait: a delegation names the child.
    pub fn wait_event(&mut self, ev: &WaitEvent) {
        if ev.on == flotilla_protocol::wait_kind::ON_TASK
            && ev.kind == flotilla_protocol::wait_kind::WAITING
            && let Some(parent) = &ev.task_id
        {
            self.timeline(parent).children.insert(ev.target.clone());
        }
    }

    /// A budget ledger entry: kept with the task its request names (a reservation's id begins
    /// with its task's, a scope `task.<id>` is the task's).
    pub fn ledger_entry(&mut self, entry: &Value, seq: u64) {
        let req = entry.get("request");
        let field = |k: &str| req.and_then(|r| r.get(k)).and_then(Value::as_str);
        let mut tasks: BTreeSet<String> = BTreeSet::new();
        if let Some(id) = field("id") {
            let task = id.strip_prefix("carve:").unwrap_or(id);
            tasks.insert(task.split(':').next().unwrap_or(task).to_owned());
        }
        let scopes = req.and_then(|r| r.get("scopes")).and_then(Value::as_array).cloned().unwrap_or_default();
        for s in scopes.iter().filter_map(Value::as_str).chain(field("scope")) {
            if let Some(t) = s.strip_prefix("task.") {
                tasks.insert(t.to_owned());
            }
        }
        for task in tasks {
            if let Some(t) = self.timelines.get_mut(&task) {
                push(
                    &mut t.budget,
                    json!({
                        "seq": seq, "op": entry.get("op"), "at_ms": entry.get("at_ms"),
                        "request": req, "reply": entry.get("reply"),
                    }),
                );
            }
        }
    }

    /// A task's page, if its timeline is kept.
    pub fn task(&self, id: &str) -> Option<Value> {
        let t = self.timelines.get(id)?;
        let attempts: BTreeSet<u32> = t
            .events
            .iter()
            .filter(|e| e.get("kind").and_then(Value::as_str) == Some(event_kind::STARTED))
            .filter_map(|e| e.get("attempt").and_then(Value::as_u64))
            .filter_map(|a| u32::try_from(a).ok())
            .collect();
        let tool_calls: Vec<Value> = t
            .events
            .iter()
            .filter_map(|e| e.get("detail").and_then(|d| d.get("tool_calls")))
            .filter_map(Value::as_array)
            .flatten()
            .cloned()
            .collect();
        let state = t.events.iter().rev().find_map(|e| {
            let k = e.get("kind").and_then(Value::as_str)?;
            matches!(
                k,
                "completed"
                    | "failed"
                    | "rejected"
                    | "started"
                    | "accepted"
                    | "assigned"
                    | "requeued"
                    | "retrying"
            )
            .then(|| k.to_owned())
        });
        Some(json!({
            "task_id": id,
            "state": state,
            "trace_id": t.trace_id,
            "attempts": attempts,
            "events": t.events,
            "tool_calls": tool_calls,
            "messages": t.messages,
            "children": t.children,
            "budget": t.budget,
            "approval": self.pending.get(id),
        }))
    }
}

/// The trace id of a `traceparent` header (`00-<trace id>-<span id>-<flags>`).
pub fn trace_id_of(headers: Option<&async_nats::HeaderMap>) -> Option<String> {
    let tp = headers?.get(flotilla_protocol::headers::TRACEPARENT)?.as_str();
    tp.split('-').nth(1).filter(|t| t.len() == 32).map(str::to_owned)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

pub(crate) async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

pub(crate) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", DASHBOARD_JS)
}

pub(crate) async fn style() -> Response {
    asset("text/css; charset=utf-8", DASHBOARD_CSS)
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

fn overview_of(h: &Http) -> Value {
    match h.fold.lock() {
        Ok(mut f) => {
            let mut v = f.overview(now_ms());
            if let Some(o) = v.as_object_mut() {
                o.insert("monitor".into(), json!(h.instance));
                o.insert("can_decide".into(), json!(h.operator.is_some()));
            }
            v
        }
        Err(_) => json!({ "error": "the monitor's figures are unreadable" }),
    }
}

#[tracing::instrument(skip_all)]
pub(crate) async fn overview(State(h): State<Http>) -> Response {
    json_response(StatusCode::OK, &overview_of(&h))
}

#[tracing::instrument(skip_all, fields(task_id = %id))]
pub(crate) async fn task(State(h): State<Http>, Path(id): Path<String>) -> Response {
    let found = h.fold.lock().ok().and_then(|f| f.views.task(&id));
    match found {
        Some(v) => json_response(StatusCode::OK, &v),
        None => json_response(
            StatusCode::NOT_FOUND,
            &json!({ "error": format!("no task {id} among the {TIMELINES_KEPT} this monitor keeps") }),
        ),
    }
}

#[tracing::instrument(skip_all)]
pub(crate) async fn approvals(State(h): State<Http>) -> Response {
    let pending: Vec<Value> =
        h.fold.lock().map(|f| f.views.pending.values().cloned().collect()).unwrap_or_default();
    json_response(StatusCode::OK, &json!({ "pending": pending, "can_decide": h.operator.is_some() }))
}

/// The overview, twice a second, as server-sent events.
pub(crate) async fn live(State(h): State<Http>) -> impl IntoResponse {
    let stream = futures::stream::unfold((h, true), |(h, first)| async move {
        if !first {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let ev = Event::default().event("overview").data(overview_of(&h).to_string());
        Some((Ok::<_, Infallible>(ev), (h, false)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Approves or rejects the pending request of a task, signed with the monitor's operator
/// credential (the agent acts only on an operator's signature).
#[tracing::instrument(skip_all, fields(task_id = %id, decision = %decision))]
pub(crate) async fn decide(State(h): State<Http>, Path((id, decision)): Path<(String, String)>) -> Response {
    let approve = match decision.as_str() {
        "approve" => true,
        "reject" => false,
        _ => return json_response(StatusCode::NOT_FOUND, &json!({ "error": "approve or reject" })),
    };
    let Some(op) = h.operator.clone() else {
        return json_response(
            StatusCode::FORBIDDEN,
            &json!({ "error": "this monitor has no operator credential (set [monitor] operator_creds) to sign decisions with" }),
        );
    };
    match sign_decision(&h, &op, &id, approve).await {
        Ok(a) => json_response(StatusCode::OK, &json!({ "decided": a.status, "task_id": id })),
        Err((status, e)) => json_response(status, &json!({ "error": e })),
    }
}

async fn sign_decision(
    h: &Http,
    op: &flotilla_service::auth::Credentials,
    id: &str,
    approve: bool,
) -> Result<Approval, (StatusCode, String)> {
    let unavailable =
        |e: flotilla_service::nats::FleetError| (StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    for _ in 0..5 {
        let Some((mut a, rev)) = h.fleet.kv_get::<Approval>(&h.approvals, id).await.map_err(unavailable)?
        else {
            return Err((StatusCode::NOT_FOUND, format!("task {id} has no approval request")));
        };
        if a.status != ApprovalStatus::Pending {
            return Err((
                StatusCode::CONFLICT,
                format!("the request of task {id} was already {:?}", a.status),
            ));
        }
        a.status = if approve { ApprovalStatus::Approved } else { ApprovalStatus::Rejected };
        a.comment = Some("decided on the dashboard".to_owned());
        a.decided_at_ms = Some(now_ms());
        a.signer = Some(op.public_key.clone());
        a.signature = Some(
            op.sign(&a.signed_content()).map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
        );
        match h.fleet.kv_update(&h.approvals, id, &a, rev).await {
            Ok(_) => {
                tracing::info!("decided on the dashboard");
                return Ok(a);
            }
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(unavailable(e)),
        }
    }
    Err((StatusCode::CONFLICT, format!("the request of task {id} kept changing; try again")))
}
