//! The ledger's entries: every change of the budgets as the budget-keeper recorded it in the
//! ledger stream (`<p>.ledger.<op>`), stored before it is answered. An entry is
//! `{op, at_ms, request, reply}` in MessagePack or JSON; `op` decides what `request` holds
//! ([`LedgerChange`]).

use serde::ser::SerializeStruct as _;
use serde::{Serializer, ser};

use super::*;

/// A reservation whose lease ran out (`expire`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Expiry {
    /// The reservation.
    pub id: String,
}

/// What a budget event (`warning`, `exhausted`, `refilled`) concerns.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BudgetEvent {
    pub scope: String,
    /// With a `warning`: the threshold crossed (one percentage).
    pub warn_at: Option<Vec<u8>>,
}

/// One change of the budgets: a command that changed state (with its request), a lease that ran
/// out, or a budget event (recorded for auditors; the replay skips them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "op", content = "request", rename_all = "snake_case")]
pub enum LedgerChange {
    Reserve(ReserveRequest),
    Commit(CommitRequest),
    Release(ReleaseRequest),
    Set(SetRequest),
    Carve(CarveRequest),
    Close(CloseRequest),
    Rate(RateRequest),
    Backoff(BackoffRequest),
    Price(PriceRequest),
    /// A lease ran out.
    Expire(Expiry),
    /// A threshold of `scope` was crossed (`reply.budget` has the numbers).
    Warning(BudgetEvent),
    /// A reservation was refused for want of tokens.
    Exhausted(BudgetEvent),
    /// The window rolled or the limit rose: the scope is below its thresholds again.
    Refilled(BudgetEvent),
}

impl LedgerChange {
    /// What the change is (its `op`).
    pub fn op(&self) -> LedgerOp {
        match self {
            Self::Reserve(_) => LedgerOp::Reserve,
            Self::Commit(_) => LedgerOp::Commit,
            Self::Release(_) => LedgerOp::Release,
            Self::Set(_) => LedgerOp::Set,
            Self::Carve(_) => LedgerOp::Carve,
            Self::Close(_) => LedgerOp::Close,
            Self::Rate(_) => LedgerOp::Rate,
            Self::Backoff(_) => LedgerOp::Backoff,
            Self::Price(_) => LedgerOp::Price,
            Self::Expire(_) => LedgerOp::Expire,
            Self::Warning(_) => LedgerOp::Warning,
            Self::Exhausted(_) => LedgerOp::Exhausted,
            Self::Refilled(_) => LedgerOp::Refilled,
        }
    }

    /// Writes the change's `request` field.
    fn serialize_request<S: ser::SerializeStruct>(&self, s: &mut S) -> Result<(), S::Error> {
        const KEY: &str = "request";
        match self {
            Self::Reserve(r) => s.serialize_field(KEY, r),
            Self::Commit(r) => s.serialize_field(KEY, r),
            Self::Release(r) => s.serialize_field(KEY, r),
            Self::Set(r) => s.serialize_field(KEY, r),
            Self::Carve(r) => s.serialize_field(KEY, r),
            Self::Close(r) => s.serialize_field(KEY, r),
            Self::Rate(r) => s.serialize_field(KEY, r),
            Self::Backoff(r) => s.serialize_field(KEY, r),
            Self::Price(r) => s.serialize_field(KEY, r),
            Self::Expire(r) => s.serialize_field(KEY, r),
            Self::Warning(r) | Self::Exhausted(r) | Self::Refilled(r) => s.serialize_field(KEY, r),
        }
    }
}

/// One change of the budgets, as recorded in the ledger stream (`<p>.ledger.<op>`) before it is
/// answered; replaying the stream in order, each at its `at_ms`, rebuilds the budget-keeper's
/// state. On the wire `{op, at_ms, request, reply}`: `op` and `request` are the [`LedgerChange`].
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
pub struct LedgerEntry {
    #[serde(flatten)]
    pub change: LedgerChange,
    pub at_ms: u64,
    /// What the operation came to, for auditors (the replay recomputes it).
    pub reply: BudgetReply,
    /// Who asked, for a control operation (`set`, `rate`, `price`): the verified operator, or
    /// `anonymous` without authentication.
    #[serde(default)]
    pub actor: Option<String>,
}

impl LedgerEntry {
    /// What the entry records (its `op`).
    pub fn op(&self) -> LedgerOp {
        self.change.op()
    }
}

/// Written field by field, in the order entries have always had: `op`, `at_ms`, `request`,
/// `reply`, then `actor` when there is one (a derived `Serialize` would put `at_ms` after
/// `request`).
impl Serialize for LedgerEntry {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("LedgerEntry", 4 + usize::from(self.actor.is_some()))?;
        s.serialize_field("op", self.op().as_str())?;
        s.serialize_field("at_ms", &self.at_ms)?;
        self.change.serialize_request(&mut s)?;
        s.serialize_field("reply", &self.reply)?;
        if let Some(actor) = &self.actor {
            s.serialize_field("actor", actor)?;
        }
        s.end()
    }
}
