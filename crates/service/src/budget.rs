//! The budget-keeper's client: one call per operation, the subject `<p>.budget.<op>` taken from
//! the request's type ([`BudgetOperation::OP`]), asked again (with the same idempotency key, so
//! nothing is charged twice) while no keeper answers or the active one says it is unavailable,
//! for up to [`Client::patience`]. Used by the agent-runner before and after every model call, by
//! the CLI's benchmarks and by tests.

use std::time::{Duration, Instant};

use flotilla_protocol::{BudgetOp, BudgetOperation, BudgetReply, ErrorInfo, codec};

use crate::Fleet;

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
}

impl Client {
    pub fn new(fleet: Fleet) -> Self {
        Self {
            fleet,
            request_timeout: Duration::from_secs(15),
            patience: Duration::from_secs(60),
            signer: None,
        }
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
        loop {
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
            let last = match tokio::time::timeout(
                self.request_timeout + Duration::from_secs(1),
                self.fleet.client.send_request(subject.clone(), request),
            )
            .await
            {
                Err(_) => "timed out".to_owned(),
                Ok(Err(e)) => e.to_string(),
                Ok(Ok(msg)) => match codec::decode::<BudgetReply>(None, &msg.payload) {
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
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }
}
