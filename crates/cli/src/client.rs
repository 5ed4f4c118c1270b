//! Client commands: submit (and wait), status, agents, tail. They talk to any fleet over NATS,
//! exactly as a non-Flotilla client would.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull, kv};
use flotilla_protocol::names::event_kind;
use flotilla_protocol::{
    Approval, ApprovalStatus, DurationSpec, Names, Prefix, Priority, TaskEvent, TaskRecord, TaskSubmission,
    WireFormat,
};
use flotilla_service::Fleet;
use flotilla_service::nats::decode_payload;
use futures::StreamExt as _;

use crate::{Cli, Failure, exit, output};

#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// Capability the task needs.
    pub capability: String,
    /// Input as JSON (a bare word is taken as a string).
    #[arg(long)]
    pub input: Option<String>,
    /// Task id (generated when absent).
    #[arg(long)]
    pub id: Option<String>,
    /// Priority: 0-9 or critical, interactive, normal, batch.
    #[arg(long)]
    pub priority: Option<String>,
    /// Tenant: the task goes to `<p>.tasks.submit.<tenant>` (default: `default`), which is all
    /// a submitter credential may publish to.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Timeout, e.g. 30s.
    #[arg(long)]
    pub timeout: Option<String>,
    /// Token budget.
    #[arg(long)]
    pub budget_tokens: Option<u64>,
    /// Affinity key.
    #[arg(long)]
    pub context_key: Option<String>,
    /// A label the agent must carry, `name=value` (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Most attempts (1-20) when attempts fail with retryable errors.
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Wait for the task to finish and print its result.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub wait_timeout: Duration,
}

#[derive(Debug, clap::Args)]
pub struct TailArgs {
    /// Only this task's events.
    #[arg(long)]
    pub task: Option<String>,
    /// Only this tenant's events (all a submitter credential may read).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Replay from the start of the stream instead of following new events only.
    #[arg(long)]
    pub from_start: bool,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected name=value, got {s:?}"))
}

/// Connects to the fleet named by the CLI flags, through the same [`Fleet`] handle the services
/// use (so what the CLI publishes carries trace context too). Fails at once (exit 5) when NATS
/// cannot be reached, rather than retrying as a service does.
pub async fn connect(cli: &Cli) -> Result<Fleet, Failure> {
    let names = Names::new(Prefix::new(cli.prefix.clone()).map_err(|e| Failure::new(2, e))?);
    let url = cli
        .nats_url
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .unwrap_or("nats://127.0.0.1:4222")
        .to_owned();
    let auth = cli.client_auth();
    if let Some(path) = auth.creds.as_ref().filter(|p| !p.as_os_str().is_empty()) {
        signer::set(flotilla_service::auth::Credentials::load(path).map_err(|e| Failure::new(2, e))?);
    }
    let client = auth
        .options(async_nats::ConnectOptions::new())
        .map_err(|e| Failure::new(2, e))?
        .name("flotilla-cli")
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(5)))
        .event_callback(|event| async move {
            if let async_nats::Event::ServerError(async_nats::ServerError::Other(e)) = event
                && e.contains("Permissions Violation")
            {
                refused::record(e);
            }
        })
        .connect(&url)
        .await
        .map_err(|e| {
            let text = e.to_string();
            let why = if text.to_lowercase().contains("authoriz") {
                match &cli.creds {
                    None => format!(
                        "NATS at {url} refused a connection without credentials: authentication is on \
                         (pass --creds or FLOTILLA_CREDS with a seed file `flotilla auth` wrote)"
                    ),
                    Some(c) => format!(
                        "NATS at {url} refused the credential {} (unknown or revoked identity)",
                        c.display()
                    ),
                }
            } else {
                format!("cannot reach NATS at {url} (is `flotilla up` running? set --nats-url): {text}")
            };
            Failure::new(exit::UNAVAILABLE, anyhow::anyhow!(why))
        })?;
    Ok(Fleet::new(client, names, WireFormat::Msgpack, "cli".to_owned()))
}

/// The credential this process signs its control actions with (set by [`connect`]).
pub mod signer {
    use flotilla_service::auth::Credentials;

    static SIGNER: std::sync::OnceLock<Credentials> = std::sync::OnceLock::new();

    pub fn set(c: Credentials) {
        let _ = SIGNER.set(c);
    }

    pub fn get() -> Option<&'static Credentials> {
        SIGNER.get()
    }
}

/// What the server refused this process, so that an error can say which permission is missing
/// instead of only that nothing answered.
pub mod refused {
    use std::sync::Mutex;

    static REFUSED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    static NOTIFY: tokio::sync::Notify = tokio::sync::Notify::const_new();

    /// Records the server's `Permissions Violation for … to "…"` error.
    pub fn record(error: String) {
        if let Ok(mut r) = REFUSED.lock() {
            r.push(error);
        }
        NOTIFY.notify_waiters();
    }

    /// Everything refused so far.
    pub fn all() -> Vec<String> {
        REFUSED.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Resolves at the next refusal.
    pub async fn next() {
        NOTIFY.notified().await;
    }

    /// The sentence an error ends with when the server refused something.
    pub fn explain() -> Option<String> {
        let all = all();
        let first = all.first()?;
        Some(format!(
            "the server refused it: {first} (this credential's role does not allow that; see nats/permissions.md)"
        ))
    }
}

/// A bucket of the fleet, or exit 5 saying that it does not exist (no Flotilla service has run
/// against this NATS).
pub async fn bucket(fleet: &Fleet, name: String) -> Result<kv::Store, Failure> {
    fleet
        .js
        .get_key_value(&name)
        .await
        .with_context(|| format!("the bucket {name} does not exist"))
        .map_err(Failure::from)
}

/// Asks `subject` (answered by `who`, e.g. "active dispatcher") with `req` and decodes the
/// answer: exit 4 when nobody answers within 10 s, 5 when nobody listens.
pub async fn request<Req: serde::Serialize, Rep: serde::de::DeserializeOwned>(
    fleet: &Fleet,
    subject: String,
    who: &str,
    req: &Req,
) -> Result<Rep, Failure> {
    let body = fleet.encode(req).context("failed to encode the request")?;
    let mut h = fleet.headers(None);
    // An operator's requests carry its signature: the service records who asked.
    if let Some(signer) = signer::get() {
        signer.sign_request(&mut h, &subject, &body).context("failed to sign the request")?;
    }
    let asked = fleet.client.request_with_headers(subject.clone(), h, body);
    let answered = tokio::select! {
        a = tokio::time::timeout(Duration::from_secs(10), asked) => a,
        () = refused::next() => {
            let why = refused::explain().unwrap_or_else(|| format!("the server refused a publish to {subject}"));
            return Err(Failure::new(exit::UNAVAILABLE, anyhow::anyhow!("cannot ask the {who}: {why}")));
        }
    };
    let msg = answered
        .map_err(|_| Failure::new(exit::TIMEOUT, anyhow::anyhow!("the {who} did not answer within 10 s")))?
        .map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => {
                Failure::new(exit::UNAVAILABLE, anyhow::anyhow!("no {who} answers on {subject}"))
            }
            _ => Failure::new(exit::UNAVAILABLE, anyhow::anyhow!("request to the {who} failed: {e}")),
        })?;
    Ok(decode_payload(msg.headers.as_ref(), &msg.payload)
        .with_context(|| format!("unreadable answer from the {who}"))?)
}

fn parse_input(raw: Option<&str>) -> serde_json::Value {
    match raw {
        None => serde_json::Value::Null,
        Some(s) => serde_json::from_str(s).unwrap_or_else(|_| serde_json::Value::String(s.to_owned())),
    }
}

/// Opens an ordered consumer on the events of one task (or all), of one tenant (or any), from
/// the start or from now. Its filter travels in the create request's subject, so a credential
/// confined to one tenant's events may open it for that tenant, and for no other.
pub async fn follow(
    fleet: &Fleet,
    task: Option<&str>,
    tenant: Option<&str>,
    from_start: bool,
) -> anyhow::Result<jetstream::consumer::pull::Ordered> {
    let names = &fleet.names;
    let stream = fleet.js.get_stream_no_info(names.events_stream()).await.context("bad stream name")?;
    let filter = match (task, tenant) {
        (Some(t), Some(tenant)) => names.tenant_task_events_of(tenant, t),
        (Some(t), None) => names.task_events_of(t),
        (None, Some(tenant)) => names.tenant_task_events(tenant),
        (None, None) => names.task_events_all(),
    };
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            name: Some(flotilla_service::nats::ordered_name()),
            filter_subject: filter,
            deliver_policy: if from_start { DeliverPolicy::All } else { DeliverPolicy::New },
            ..Default::default()
        })
        .await
        .context("failed to follow events (does the fleet's event stream exist, and may this credential read these events?)")?;
    consumer.messages().await.context("failed to follow events")
}

/// Decodes an event message.
pub fn decode_event(m: &async_nats::jetstream::Message) -> Option<TaskEvent> {
    decode_payload(m.headers.as_ref(), &m.payload).ok()
}

/// The events of one task as they come, each once, by whichever way this credential may read
/// them: a consumer of the event stream from the start (an operator's), and a live subscription
/// of the task's subject (a tenant's submitter's: its account has no consumers), subscribed
/// before this returns so that nothing published after it is missed.
async fn watch_task(
    fleet: &Fleet,
    id: &str,
    tenant: &str,
) -> anyhow::Result<(
    tokio::sync::mpsc::Receiver<async_nats::Message>,
    tokio::sync::mpsc::Sender<async_nats::Message>,
)> {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let mut live = fleet
        .client
        .subscribe(fleet.names.tenant_task_events_of(tenant, id))
        .await
        .context("failed to follow the task's events")?;
    fleet.client.flush().await.context("failed to follow the task's events")?;
    let to = tx.clone();
    tokio::spawn(async move {
        while let Some(m) = live.next().await {
            if to.send(m).await.is_err() {
                return;
            }
        }
    });
    let (f, to, id, tenant) = (fleet.clone(), tx.clone(), id.to_owned(), tenant.to_owned());
    tokio::spawn(async move {
        // Refused for a submitter; then the live subscription is the way.
        let Ok(mut stored) = follow(&f, Some(&id), Some(&tenant), true).await else { return };
        while let Some(Ok(m)) = stored.next().await {
            if to.send(m.message).await.is_err() {
                return;
            }
        }
    });
    Ok((rx, tx))
}

/// The stored final events of a task, read by subject under the tenant API prefix (a tenant's
/// submitter's way to a result that came before it listened), sent to `to`.
async fn stored_finals(
    fleet: &Fleet,
    id: &str,
    tenant: &str,
    to: &tokio::sync::mpsc::Sender<async_nats::Message>,
) {
    let js = jetstream::with_prefix(fleet.client.clone(), &fleet.names.tenant_js_api());
    let Ok(events) = js.get_stream_no_info(fleet.names.events_stream()).await else { return };
    for kind in [event_kind::COMPLETED, event_kind::FAILED, event_kind::REJECTED] {
        let subject = fleet.names.task_event_subject(tenant, id, kind);
        let got =
            tokio::time::timeout(Duration::from_secs(2), events.direct_get_last_for_subject(subject)).await;
        if let Ok(Ok(m)) = got {
            let msg = async_nats::Message {
                subject: m.subject.clone(),
                reply: None,
                payload: m.payload.clone(),
                headers: Some(m.headers.clone()),
                status: None,
                description: None,
                length: m.payload.len(),
            };
            let _ = to.send(msg).await;
        }
    }
}

pub async fn submit(cli: &Cli, args: &SubmitArgs) -> Result<(), Failure> {
    let priority = match &args.priority {
        Some(p) => Some(
            Priority::from_name(p).ok_or_else(|| Failure::new(2, anyhow::anyhow!("bad priority {p:?}")))?,
        ),
        None => None,
    };
    let id = args.id.clone().unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let sub = TaskSubmission {
        id: Some(id.clone()),
        capability: args.capability.clone(),
        input: parse_input(args.input.as_deref()),
        priority,
        tenant: args.tenant.clone(),
        budget_tokens: args.budget_tokens,
        timeout: args.timeout.clone().map(DurationSpec::Text),
        deadline: None,
        context_key: args.context_key.clone(),
        parent_id: None,
        labels: args.labels.iter().cloned().collect(),
        max_attempts: args.max_attempts,
    };
    let fleet = connect(cli).await?;
    let tenant = args.tenant.as_deref().unwrap_or(flotilla_protocol::DEFAULT_TENANT);
    let events = if args.wait { Some(watch_task(&fleet, &id, tenant).await?) } else { None };
    let ack = fleet
        .send_durable(fleet.names.tenant_submit_subject(tenant), &sub, Some(&id))
        .await
        .context("failed to submit")?
        .acked()
        .await
        .context("the submissions stream did not accept the task")?;
    let Some((mut events, to)) = events else {
        if cli.json {
            println!(
                "{}",
                serde_json::json!({ "id": id, "stream_sequence": ack.sequence, "duplicate": ack.duplicate })
            );
        } else {
            println!("{id}");
        }
        return Ok(());
    };
    if !cli.json {
        eprintln!("submitted {id}; waiting…");
    }
    if ack.duplicate {
        // Submitted before: its result may be stored already.
        let (f, id, tenant) = (fleet.clone(), id.clone(), tenant.to_owned());
        tokio::spawn(async move { stored_finals(&f, &id, &tenant, &to).await });
    } else {
        drop(to);
    }
    let deadline = tokio::time::Instant::now() + args.wait_timeout;
    let mut seen = std::collections::HashSet::new();
    loop {
        let next = tokio::time::timeout_at(deadline, events.recv()).await;
        let msg = match next {
            Err(_) => {
                return Err(Failure::new(
                    exit::TIMEOUT,
                    anyhow::anyhow!("task {id} did not finish within {:?}", args.wait_timeout),
                ));
            }
            Ok(None) => return Err(Failure::new(exit::UNAVAILABLE, anyhow::anyhow!("event stream ended"))),
            Ok(Some(m)) => m,
        };
        // The same event by both ways: once (events carry their message id).
        let key = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(flotilla_protocol::headers::NATS_MSG_ID))
            .map_or_else(|| format!("{}:{:?}", msg.subject, msg.payload), |v| v.as_str().to_owned());
        if !seen.insert(key) {
            continue;
        }
        let Some(ev) = decode_payload::<TaskEvent>(msg.headers.as_ref(), &msg.payload).ok() else { continue };
        if !cli.json {
            eprintln!("{}", output::event_line(&ev));
        }
        if [event_kind::COMPLETED, event_kind::FAILED, event_kind::REJECTED].contains(&ev.kind.as_str()) {
            if cli.json {
                println!("{}", serde_json::to_string(&ev).context("failed to render event")?);
            } else if let Some(o) = &ev.output {
                println!("{}", serde_json::to_string_pretty(o).context("failed to render output")?);
            }
            fleet.client.flush().await.ok();
            return if ev.kind == event_kind::COMPLETED {
                Ok(())
            } else {
                let err = ev.error.map(|e| format!("{}: {}", e.code, e.message)).unwrap_or_default();
                Err(Failure::new(exit::TASK_FAILED, anyhow::anyhow!("task {id} {}: {err}", ev.kind)))
            };
        }
    }
}

pub async fn status(cli: &Cli, id: &str) -> Result<(), Failure> {
    let fleet = connect(cli).await?;
    let store = bucket(&fleet, fleet.names.tasks_bucket()).await?;
    let Some((rec, _)) = fleet.kv_get::<TaskRecord>(&store, id).await.context("failed to read the task")?
    else {
        return Err(Failure::new(exit::NOT_FOUND, anyhow::anyhow!("no task {id}")));
    };
    if cli.json {
        println!("{}", serde_json::to_string(&rec).context("failed to render")?);
    } else {
        print!("{}", output::task_block(&rec));
    }
    Ok(())
}

pub async fn tail(cli: &Cli, args: &TailArgs) -> Result<(), Failure> {
    let fleet = connect(cli).await?;
    let mut events = follow(&fleet, args.task.as_deref(), args.tenant.as_deref(), args.from_start).await?;
    let stop = flotilla_service::shutdown::wait_for_signal();
    tokio::pin!(stop);
    loop {
        let msg = tokio::select! {
            _ = &mut stop => return Ok(()),
            m = events.next() => match m {
                None => return Ok(()),
                Some(m) => m.context("event stream error")?,
            },
        };
        let Some(ev) = decode_event(&msg) else { continue };
        if cli.json {
            println!("{}", serde_json::to_string(&ev).context("failed to render")?);
        } else {
            println!("{}", output::event_line(&ev));
        }
    }
}

/// Approves or rejects a task's pending approval request (a revision-checked update, so two
/// operators cannot both decide).
pub async fn decide(cli: &Cli, id: &str, approve: bool, comment: Option<String>) -> Result<(), Failure> {
    let fleet = connect(cli).await?;
    let store = bucket(&fleet, fleet.names.approvals_bucket()).await?;
    let operators = bucket(&fleet, fleet.names.operators_bucket()).await?;
    // With a credential, a decision counts only when an operator's key signed it (as the agent
    // checks); one that no operator signed is decided anew.
    let checker = fleet.clone().authenticated(signer::get().is_some());
    for _ in 0..5 {
        let Some((mut a, rev)) =
            fleet.kv_get::<Approval>(&store, id).await.context("failed to read the approval request")?
        else {
            return Err(Failure::new(exit::NOT_FOUND, anyhow::anyhow!("task {id} has no approval request")));
        };
        if a.status != ApprovalStatus::Pending {
            match flotilla_service::attest::approval_actor(&checker, &operators, &a).await {
                Ok(by) => {
                    return Err(Failure::new(
                        exit::TASK_FAILED,
                        anyhow::anyhow!("the request of task {id} was already {:?} by {by}", a.status),
                    ));
                }
                Err(r) => eprintln!("the decision on record is no operator's ({}); deciding anew", r.reason),
            }
        }
        a.status = if approve { ApprovalStatus::Approved } else { ApprovalStatus::Rejected };
        a.comment = comment.clone();
        a.decided_at_ms = Some(flotilla_protocol::time::now_ms());
        // Signed by the operator: the agent acts on it only if the signature is an operator's.
        a.signature = None;
        a.signer = signer::get().map(|s| s.public_key.clone());
        if let Some(s) = signer::get() {
            a.signature = Some(s.sign(&a.signed_content()).context("failed to sign the decision")?);
        }
        match fleet.kv_update(&store, id, &a, rev).await {
            Ok(_) => {
                if cli.json {
                    println!("{}", serde_json::to_string(&a).context("failed to render")?);
                } else {
                    println!("{} {id}: {}", if approve { "approved" } else { "rejected" }, a.question);
                }
                return Ok(());
            }
            Err(e) if e.is_conflict() => continue,
            Err(e) => {
                return Err(Failure::new(
                    exit::UNAVAILABLE,
                    anyhow::anyhow!("failed to record the decision: {e}"),
                ));
            }
        }
    }
    Err(Failure::new(exit::UNAVAILABLE, anyhow::anyhow!("the request of task {id} kept changing; try again")))
}
