//! The budget-keeper's client: one call per operation, the subject `<p>.budget.<op>` taken from
//! the request's type ([`BudgetOperation::OP`]), asked again (with the same idempotency key, so
//! nothing is charged twice) while no keeper answers or the active one says it is unavailable,
//! for up to [`Client::patience`]. A request in flight at a keeper that dies is asked again as
//! soon as another keeper takes the `budget-keeper` lease (the client follows the lease key), not
//! after its timeout. Used by the agent-runner before and after every model call, by the CLI's
//! benchmarks and by tests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_protocol::names::lease_key;
use flotilla_protocol::{BudgetOp, BudgetOperation, BudgetReply, ErrorInfo, Lease, codec};
use futures::StreamExt as _;
use tokio::sync::{OnceCell, watch};

use crate::Fleet;

/// Who serves budgets as the lease says: `(holder, epoch)`, `None` while nobody holds it.
type Holder = Option<(String, u64)>;

/// The longest pause between two tries while no keeper answers.
const MAX_PAUSE: Duration = Duration::from_millis(500);

/// Why a budget call got no answer to act on.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    /// The keeper refused the operation (`budget_exceeded`, `budget_wait`, `rate_limited`, ...).
    #[error("{}: {}", .error.code, .error.message)]
    Refused { error: ErrorInfo, retry_after_ms: Option<u64> },
    /// No budget-keeper answered in time.
    #[error("no budget-keeper answered {op} within {waited:?}: {last}")]
    Unavailable { op: BudgetOp, waited: Duration, last: String },
}

impl BudgetError {
    /// The refusal's code, if it was one.
    pub fn code(&self) -> &str {
        match self {
            Self::Refused { error, .. } => &error.code,
            Self::Unavailable { .. } => "budget_unavailable",
        }
    }
}

/// A budget-keeper client.
#[derive(Debug, Clone)]
pub struct Client {
    fleet: Fleet,
    /// How long one request waits for its answer (a reservation may wait at the keeper for a
    /// rate permit, up to ten seconds).
    pub request_timeout: Duration,
    /// How long an operation is asked again while no keeper answers (a keeper fail-over takes
    /// the lease length plus the ledger replay).
    pub patience: Duration,
    /// An operator's credentials to sign every request with: control operations (`set`,
    /// `rate`, `price`) are refused unsigned where authentication is on.
    pub signer: Option<crate::auth::Credentials>,
    /// The `budget-keeper` lease as last seen, followed from the first call on (shared by the
    /// clones of this client); `None` inside when the lease cannot be followed (no permission).
    holder: Arc<OnceCell<Option<watch::Receiver<Holder>>>>,
}

impl Client {
    pub fn new(fleet: Fleet) -> Self {
        Self {
            fleet,
            request_timeout: Duration::from_secs(15),
            patience: Duration::from_secs(60),
            signer: None,
            holder: Arc::default(),
        }
    }

    /// The lease's holder, followed by a task that ends with the last clone of this client.
    async fn holder(&self) -> Option<watch::Receiver<Holder>> {
        self.holder.get_or_init(|| follow_lease(self.fleet.clone())).await.clone()
    }

    /// This client, signing its requests as the operator whose seed is `creds`.
    pub fn signed_by(mut self, creds: crate::auth::Credentials) -> Self {
        self.signer = Some(creds);
        self
    }

    /// One operation, on the subject of the request's type: the answer, or why there is none.
    /// `unavailable`, timeouts and "no responders" are asked again with the same request until
    /// [`Self::patience`] runs out.
    #[tracing::instrument(skip_all, fields(op = %R::OP, id = req.id().unwrap_or_default()))]
    pub async fn call<R: BudgetOperation>(&self, req: &R) -> Result<BudgetReply, BudgetError> {
        let op = R::OP;
        let body: bytes::Bytes = codec::encode(self.fleet.format, req)
            .map_err(|e| BudgetError::Unavailable { op, waited: Duration::ZERO, last: e.to_string() })?
            .into();
        let subject = self.fleet.names.budget_subject(op.as_str());
        let started = Instant::now();
        let mut pause = Duration::from_millis(50);
        let mut holder = self.holder().await;
        loop {
            let asked_of = holder.as_mut().map(|h| h.borrow_and_update().clone());
            // The request's own timeout (the connection's default is shorter than a reservation
            // may wait at the keeper for a rate permit), with a margin for the answer to arrive.
            let mut request =
                async_nats::Request::new().payload(body.clone()).timeout(Some(self.request_timeout));
            // The caller's trace goes with the request (the keeper's span joins it).
            let mut h = async_nats::HeaderMap::new();
            crate::trace::inject(&mut h);
            if let Some(signer) = &self.signer
                && let Err(e) = signer.sign_request(&mut h, &subject, &body)
            {
                return Err(BudgetError::Unavailable { op, waited: Duration::ZERO, last: e.to_string() });
            }
            request = request.headers(h);
            let answer = tokio::time::timeout(
                self.request_timeout + Duration::from_secs(1),
                self.fleet.client.send_request(subject.clone(), request),
            );
            let answer = tokio::select! {
                a = answer => Some(a),
                // The keeper asked died: its successor is asked at once (the same request, so a
                // call the dead one had stored is answered from the ledger, not made again).
                () = taken_over(holder.as_mut(), asked_of.flatten()) => None,
            };
            let last = match answer {
                None => {
                    tracing::info!(
                        "the budget-keeper changed while a request was in flight; asking the new one"
                    );
                    pause = Duration::from_millis(50);
                    continue;
                }
                Some(Err(_)) => "timed out".to_owned(),
                Some(Ok(Err(e))) => e.to_string(),
                Some(Ok(Ok(msg))) => match codec::decode::<BudgetReply>(None, &msg.payload) {
                    Err(e) => format!("unreadable answer: {e}"),
                    Ok(reply) => match reply.error.clone() {
                        None => return Ok(reply),
                        Some(e) if e.code == "unavailable" => e.message,
                        Some(error) => {
                            return Err(BudgetError::Refused { error, retry_after_ms: reply.retry_after_ms });
                        }
                    },
                },
            };
            if started.elapsed() >= self.patience {
                return Err(BudgetError::Unavailable { op, waited: started.elapsed(), last });
            }
            tracing::debug!(last = %last, "budget-keeper not answering; asking again");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }
}

/// Resolves once the lease is held by another keeper (or another epoch) than `asked`; never when
/// the lease is not followed.
async fn taken_over(holder: Option<&mut watch::Receiver<Holder>>, asked: Option<(String, u64)>) {
    let Some(rx) = holder else { return std::future::pending().await };
    let moved = |h: &Holder| h.as_ref().is_some_and(|h| Some(h) != asked.as_ref());
    if rx.wait_for(moved).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Follows the `budget-keeper` lease key: its holder and epoch as they change.
async fn follow_lease(fleet: Fleet) -> Option<watch::Receiver<Holder>> {
    let bucket = fleet.names.leases_bucket();
    let kv = match fleet.js.get_key_value(&bucket).await {
        Ok(kv) => kv,
        Err(e) => {
            tracing::debug!(error = %e, "cannot open the leases bucket: budget requests wait out their timeout");
            return None;
        }
    };
    let mut entries = match kv.watch_with_history(lease_key::BUDGET_KEEPER).await {
        Ok(w) => w,
        Err(e) => {
            tracing::debug!(error = %e, "cannot follow the budget-keeper lease: budget requests wait out their timeout");
            return None;
        }
    };
    // The lease as it is now, so that the first request is not taken for one asked of a keeper
    // that has since gone (the watch's first entry is the same one).
    let now = match fleet.kv_get::<Lease>(&kv, lease_key::BUDGET_KEEPER).await {
        Ok(l) => l.map(|(l, _)| (l.holder, l.epoch)),
        Err(_) => None,
    };
    let (tx, rx) = watch::channel(now);
    tokio::spawn(async move {
        loop {
            let entry = tokio::select! {
                () = tx.closed() => return,
                e = entries.next() => e,
            };
            let holder = match entry {
                None => return,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "the budget-keeper lease watch failed");
                    return;
                }
                Some(Ok(e)) if e.operation == async_nats::jetstream::kv::Operation::Put => {
                    codec::decode::<Lease>(None, &e.value).ok().map(|l| (l.holder, l.epoch))
                }
                Some(Ok(_)) => None,
            };
            tx.send_if_modified(|h| {
                let changed = *h != holder;
                *h = holder;
                changed
            });
        }
    });
    Some(rx)
}
