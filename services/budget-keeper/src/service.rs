//! The budget service: `reserve`, `commit`, `release`, `set` and `show` on `<p>.budget.<op>`
//! (a NATS micro service, `flotilla-budget`), answered from the [`Ledger`]. Every change is
//! recorded in the ledger stream and stored before it is answered; on start the ledger is
//! rebuilt by replaying that stream. Requests that arrive together are decided together and
//! their entries written together (one round trip for the batch), which is what lets one hot
//! budget take more reservations per second than there are round trips.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::service::ServiceExt as _;
use async_nats::service::endpoint::Endpoint;
use bytes::Bytes;
use flotilla_protocol::{
    BudgetReply, BudgetRequest, BudgetStatus, ErrorInfo, LedgerEntry, WireFormat, codec, headers,
    time::now_ms,
};
use flotilla_service::Fleet;
use flotilla_service::nats::Pending;
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

use crate::ledger::{End, Grant, Ledger, Limit, Refusal, Reserve, Window};

/// Operations the service answers.
pub const OPS: [&str; 5] = ["reserve", "commit", "release", "set", "show"];
/// Most requests decided in one batch.
const BATCH: usize = 256;
/// How long an ended reservation is remembered for repeated operations.
const REMEMBER_MS: u64 = 15 * 60 * 1000;
/// Lease of a reservation whose request names none.
const DEFAULT_LEASE_MS: u64 = 5 * 60 * 1000;

/// Replays the ledger stream into a fresh ledger.
pub async fn rebuild(fleet: &Fleet) -> anyhow::Result<(Ledger, u64)> {
    let mut ledger = Ledger::new(REMEMBER_MS);
    let mut stream =
        fleet.js.get_stream(fleet.names.ledger_stream()).await.context("failed to open the ledger stream")?;
    let last = stream.info().await.context("failed to read the ledger stream")?.state.last_sequence;
    if last == 0 {
        return Ok((ledger, 0));
    }
    let mut msgs = stream
        .create_consumer(pull::OrderedConfig { deliver_policy: DeliverPolicy::All, ..Default::default() })
        .await
        .context("failed to replay the ledger")?
        .messages()
        .await
        .context("failed to replay the ledger")?;
    let mut n = 0;
    while let Some(msg) = msgs.next().await {
        let msg = msg.context("ledger replay failed")?;
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(last);
        match codec::decode::<LedgerEntry>(None, &msg.payload) {
            Ok(e) => {
                apply(&mut ledger, &e.op, &e.request, e.at_ms);
                n += 1;
            }
            Err(e) => tracing::error!(seq, error = %e, "unreadable ledger entry skipped"),
        }
        if seq >= last {
            break;
        }
    }
    Ok((ledger, n))
}

/// Serves budget requests until `shutdown`.
pub async fn serve(fleet: Fleet, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (mut ledger, replayed) = rebuild(&fleet).await?;
    tracing::info!(replayed, scopes = ledger.scopes().count(), "budget ledger rebuilt");
    let svc = fleet
        .client
        .service_builder()
        .description("Flotilla budgets: reserve, commit, release, set, show")
        .start("flotilla-budget", env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| anyhow::anyhow!("failed to start the budget micro service: {e}"))?;
    let mut endpoints: Vec<
        futures::stream::BoxStream<'static, (&'static str, async_nats::service::Request)>,
    > = Vec::new();
    for op in OPS {
        let ep: Endpoint = svc
            .endpoint_builder()
            .name(op)
            .add(fleet.names.budget_subject(op))
            .await
            .map_err(|e| anyhow::anyhow!("failed to add the {op} endpoint: {e}"))?;
        endpoints.push(ep.map(move |r| (op, r)).boxed());
    }
    let mut requests = futures::stream::select_all(endpoints);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                expire(&fleet, &mut ledger).await;
                continue;
            }
            r = requests.next() => match r { Some(r) => r, None => break },
        };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match futures::FutureExt::now_or_never(requests.next()) {
                Some(Some(r)) => batch.push(r),
                _ => break,
            }
        }
        handle_batch(&fleet, &mut ledger, batch).await;
    }
    let _ = svc.stop().await;
    Ok(())
}

/// Decides a batch, writes its ledger entries (all sent, then all acks awaited), then answers.
/// If an entry could not be stored, that request and every later one of the batch are answered
/// `unavailable` (the caller retries with the same key) and the ledger is rebuilt from the
/// stream.
#[tracing::instrument(skip_all, fields(n = batch.len()))]
async fn handle_batch(
    fleet: &Fleet,
    ledger: &mut Ledger,
    batch: Vec<(&'static str, async_nats::service::Request)>,
) {
    let mut answers: Vec<(async_nats::service::Request, BudgetReply, Option<Pending>, WireFormat)> =
        Vec::with_capacity(batch.len());
    let mut lost = false;
    // Index of the first request whose change could not be sent.
    let mut lost_at: Option<usize> = None;
    for (op, req) in batch {
        if lost {
            // Decisions after a change that was not recorded could depend on it: answered
            // unavailable (the caller retries with the same key, after the rebuild).
            answers.push((
                req,
                refused("unavailable", "the ledger could not be written"),
                None,
                WireFormat::Json,
            ));
            continue;
        }
        let ct = req
            .message
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::CONTENT_TYPE))
            .map(|v| v.as_str().to_owned());
        let format = if codec::is_json(ct.as_deref(), &req.message.payload) {
            WireFormat::Json
        } else {
            WireFormat::Msgpack
        };
        let now = now_ms();
        let (reply, entry) = match codec::decode::<BudgetRequest>(ct.as_deref(), &req.message.payload) {
            Err(e) => (refused(e.reason.code(), e.message), None),
            Ok(r) => {
                let (reply, changed) = apply(ledger, op, &r, now);
                let entry = changed.then(|| LedgerEntry {
                    op: op.to_owned(),
                    at_ms: now,
                    request: r.clone(),
                    reply: reply.clone(),
                });
                (reply, entry)
            }
        };
        let pending = match entry {
            None => None,
            Some(e) => {
                let msg_id = e.request.id.as_ref().map(|id| format!("{op}:{id}"));
                match fleet.send_durable(fleet.names.ledger_subject(op), &e, msg_id.as_deref()).await {
                    Ok(p) => Some(p),
                    Err(err) => {
                        // Decided in memory but not recorded: rebuilt away after the batch (not
                        // now, while other entries of the batch are on their way).
                        tracing::error!(error = %err, "failed to record a budget change");
                        lost_at.get_or_insert(answers.len());
                        answers.push((
                            req,
                            refused("unavailable", "the ledger could not be written"),
                            None,
                            format,
                        ));
                        lost = true;
                        continue;
                    }
                }
            }
        };
        answers.push((req, reply, pending, format));
    }
    // Answers go out in order; from the first change that was not stored on, every answer is
    // `unavailable` (what came after may have depended on it). The stream then holds exactly the
    // changes whose answers went out, plus perhaps some whose callers were told to retry: the
    // rebuild below takes them in, and a retry with the same key gets their answer.
    let mut failed = false;
    for (i, (req, mut reply, pending, format)) in answers.into_iter().enumerate() {
        if lost_at.is_some_and(|at| i >= at) {
            failed = true;
        }
        if let Some(p) = pending
            && let Err(e) = p.confirmed().await
        {
            tracing::error!(error = %e, "a budget change was not stored");
            failed = true;
            lost = true;
        }
        if failed {
            reply = refused("unavailable", "the ledger could not be written");
        }
        let body = codec::encode(format, &reply)
            .map(Bytes::from)
            .map_err(|e| async_nats::service::error::Error { status: e.to_string(), code: 500 });
        if let Err(e) = req.respond(body).await {
            tracing::debug!(error = %e, "failed to answer a budget request");
        }
    }
    if lost {
        // What was decided but not stored must not count: the stream is the truth.
        *ledger = rebuild_or_keep(fleet, ledger).await;
    }
}

async fn rebuild_or_keep(fleet: &Fleet, ledger: &mut Ledger) -> Ledger {
    match rebuild(fleet).await {
        Ok((l, _)) => l,
        Err(e) => {
            tracing::error!(error = %e, "failed to rebuild the budget ledger; keeping the one in memory");
            std::mem::take(ledger)
        }
    }
}

/// Releases reservations whose lease ran out, recording each.
async fn expire(fleet: &Fleet, ledger: &mut Ledger) {
    let now = now_ms();
    let due = ledger.expire(now);
    let mut pending = Vec::new();
    for id in due {
        tracing::info!(reservation = %id, "reservation lease ran out; tokens released");
        let e = LedgerEntry {
            op: "expire".to_owned(),
            at_ms: now,
            request: BudgetRequest { id: Some(id.clone()), ..Default::default() },
            reply: BudgetReply::default(),
        };
        match fleet
            .send_durable(fleet.names.ledger_subject("expire"), &e, Some(&format!("expire:{id}")))
            .await
        {
            Ok(p) => pending.push(Some(p)),
            Err(e) => {
                tracing::warn!(error = %e, "failed to record an expiry");
                pending.push(None);
            }
        }
    }
    let mut lost = pending.iter().any(Option::is_none);
    for p in pending.into_iter().flatten() {
        if let Err(e) = p.confirmed().await {
            tracing::warn!(error = %e, "failed to record an expiry");
            lost = true;
        }
    }
    if lost {
        // Released here but not in the stream: later decisions must not count on it.
        *ledger = rebuild_or_keep(fleet, ledger).await;
    }
}

fn refused(code: &str, message: impl Into<String>) -> BudgetReply {
    BudgetReply { error: Some(ErrorInfo::new(code, message)), ..Default::default() }
}

fn refusal(r: Refusal) -> BudgetReply {
    let code = match &r {
        Refusal::Exhausted { .. } => "budget_exceeded",
        Refusal::UnknownScope(_) => "unknown_scope",
        Refusal::UnknownReservation(_) => "unknown_reservation",
        Refusal::Ended(..) => "reservation_ended",
        Refusal::Mismatch(_) => "reservation_mismatch",
        Refusal::Invalid => "invalid_request",
    };
    refused(code, r.to_string())
}

fn status(ledger: &mut Ledger, scope: &str, now: u64) -> Option<BudgetStatus> {
    let b = ledger.budget(scope, now)?;
    Some(BudgetStatus {
        scope: scope.to_owned(),
        limit_tokens: b.limit.tokens,
        window_ms: match b.limit.window {
            Window::Total => None,
            Window::Rolling { ms } => Some(ms),
        },
        used: b.used,
        held: b.held,
        available: b.available(),
    })
}

/// Applies one operation at `now`; returns the answer and whether the ledger changed (then it is
/// recorded). The replay calls this too, with each entry's time.
pub fn apply(ledger: &mut Ledger, op: &str, r: &BudgetRequest, now: u64) -> (BudgetReply, bool) {
    let need_id = || r.id.clone().filter(|id| !id.is_empty());
    match op {
        "reserve" => {
            let (Some(id), Some(want)) = (need_id(), r.want) else {
                return (refused("invalid_request", "reserve needs id and want"), false);
            };
            let open_before = ledger.is_open(&id);
            let req = Reserve {
                id,
                scopes: r.scopes.clone(),
                want,
                min: r.min.unwrap_or(1).min(want),
                lease_ms: r.lease_ms.unwrap_or(DEFAULT_LEASE_MS),
            };
            match ledger.reserve(req, now) {
                Ok(Grant { tokens, expires_ms }) => (
                    BudgetReply { tokens: Some(tokens), expires_ms: Some(expires_ms), ..Default::default() },
                    !open_before,
                ),
                Err(e) => (refusal(e), false),
            }
        }
        "commit" | "release" | "expire" => {
            let Some(id) = need_id() else {
                return (refused("invalid_request", format!("{op} needs id")), false);
            };
            let open_before = ledger.is_open(&id);
            let result = match op {
                "commit" => match r.used {
                    Some(used) => ledger.commit(&id, used, now),
                    None => return (refused("invalid_request", "commit needs used"), false),
                },
                "release" => ledger.release(&id, now),
                _ => {
                    ledger.expire(now);
                    return (BudgetReply::default(), false);
                }
            };
            match result {
                Ok(End::Committed { charged, over }) => (
                    BudgetReply { charged: Some(charged), over: Some(over), ..Default::default() },
                    open_before,
                ),
                Ok(_) => (BudgetReply::default(), open_before),
                Err(e) => (refusal(e), false),
            }
        }
        "set" => {
            let (Some(scope), Some(tokens)) = (r.scope.clone().filter(|s| !s.is_empty()), r.limit_tokens)
            else {
                return (refused("invalid_request", "set needs scope and limit_tokens"), false);
            };
            let window = match r.window_ms {
                Some(0) => return (refused("invalid_request", "window_ms must be positive"), false),
                Some(ms) => Window::Rolling { ms },
                None => Window::Total,
            };
            ledger.set_limit(&scope, Limit { tokens, window }, now);
            (BudgetReply { budget: status(ledger, &scope, now), ..Default::default() }, true)
        }
        "show" => {
            let Some(scope) = r.scope.clone() else {
                return (refused("invalid_request", "show needs scope"), false);
            };
            match status(ledger, &scope, now) {
                Some(b) => (BudgetReply { budget: Some(b), ..Default::default() }, false),
                None => (refused("unknown_scope", format!("no budget is set for scope {scope:?}")), false),
            }
        }
        other => (refused("invalid_request", format!("no operation {other:?}")), false),
    }
}
