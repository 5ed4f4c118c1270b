//! The budget-keeper's operations: their names ([`BudgetOp`], one subject `<p>.budget.<op>`
//! each), the trait tying each request type to its operation ([`BudgetOperation`]) and the
//! command a request decodes to ([`BudgetCommand`]), once, by subject and payload. Every site
//! that handles operations matches [`BudgetCommand`] exhaustively, so a new operation does not
//! compile until each of them handles it.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::*;
use crate::codec;

/// A request type of one operation: the client sends it to `<p>.budget.<OP>`, the keeper decodes
/// it from there.
pub trait BudgetOperation: Serialize + DeserializeOwned + Into<BudgetCommand> {
    /// The operation (and so the subject) the request goes to.
    const OP: BudgetOp;
    /// The `invalid_request` answer to a request without a field the operation needs.
    const NEEDS: &'static str;

    /// The reservation key the request names, if it names one.
    fn id(&self) -> Option<&str> {
        None
    }
}

/// A request to the budget-keeper, decoded: one variant per operation.
#[derive(Debug, Clone, PartialEq)]
pub enum BudgetCommand {
    Reserve(ReserveRequest),
    Commit(CommitRequest),
    Release(ReleaseRequest),
    Set(SetRequest),
    Show(ShowRequest),
    Carve(CarveRequest),
    Close(CloseRequest),
    Rate(RateRequest),
    Backoff(BackoffRequest),
    Price(PriceRequest),
}

impl BudgetCommand {
    /// Decodes the payload of a request on `<p>.budget.<op>` (the format chosen from the content
    /// type, see [`codec::decode`]). Refused, the error is the answer to give: the codec's code
    /// for bytes that are not a request or a field that is unknown or of the wrong type, and
    /// `invalid_request` for a request without a field the operation needs.
    pub fn decode(op: BudgetOp, content_type: Option<&str>, payload: &[u8]) -> Result<Self, ErrorInfo> {
        fn decode_as<R: BudgetOperation>(
            ct: Option<&str>,
            payload: &[u8],
        ) -> Result<BudgetCommand, ErrorInfo> {
            match codec::decode_strict::<R>(ct, payload) {
                Ok(r) => Ok(r.into()),
                Err(e) if e.reason == RejectReason::MissingField => {
                    Err(ErrorInfo::new("invalid_request", R::NEEDS))
                }
                Err(e) => Err(ErrorInfo::new(e.reason.code(), e.message)),
            }
        }
        let ct = content_type;
        match op {
            BudgetOp::Reserve => decode_as::<ReserveRequest>(ct, payload),
            BudgetOp::Commit => decode_as::<CommitRequest>(ct, payload),
            BudgetOp::Release => decode_as::<ReleaseRequest>(ct, payload),
            BudgetOp::Set => decode_as::<SetRequest>(ct, payload),
            BudgetOp::Show => decode_as::<ShowRequest>(ct, payload),
            BudgetOp::Carve => decode_as::<CarveRequest>(ct, payload),
            BudgetOp::Close => decode_as::<CloseRequest>(ct, payload),
            BudgetOp::Rate => decode_as::<RateRequest>(ct, payload),
            BudgetOp::Backoff => decode_as::<BackoffRequest>(ct, payload),
            BudgetOp::Price => decode_as::<PriceRequest>(ct, payload),
        }
    }

    /// The operation.
    pub fn op(&self) -> BudgetOp {
        match self {
            Self::Reserve(_) => BudgetOp::Reserve,
            Self::Commit(_) => BudgetOp::Commit,
            Self::Release(_) => BudgetOp::Release,
            Self::Set(_) => BudgetOp::Set,
            Self::Show(_) => BudgetOp::Show,
            Self::Carve(_) => BudgetOp::Carve,
            Self::Close(_) => BudgetOp::Close,
            Self::Rate(_) => BudgetOp::Rate,
            Self::Backoff(_) => BudgetOp::Backoff,
            Self::Price(_) => BudgetOp::Price,
        }
    }

    /// The ledger's record of the command, for the commands that change state (all but `show`).
    pub fn into_change(self) -> Option<LedgerChange> {
        Some(match self {
            Self::Reserve(r) => LedgerChange::Reserve(r),
            Self::Commit(r) => LedgerChange::Commit(r),
            Self::Release(r) => LedgerChange::Release(r),
            Self::Set(r) => LedgerChange::Set(r),
            Self::Show(_) => return None,
            Self::Carve(r) => LedgerChange::Carve(r),
            Self::Close(r) => LedgerChange::Close(r),
            Self::Rate(r) => LedgerChange::Rate(r),
            Self::Backoff(r) => LedgerChange::Backoff(r),
            Self::Price(r) => LedgerChange::Price(r),
        })
    }
}
