//! Budgets: the budget-keeper's operations ([`BudgetOp`], one request type each, decoded once
//! into a [`BudgetCommand`]), its answers, and the ledger entries that record every change
//! ([`LedgerEntry`], [`LedgerChange`]).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::*;

/// Declares a fieldless enum of operation names from one list: the enum (serde names as given),
/// `ALL` (every variant, in order), `as_str`, `Display`, `FromStr` and comparison with a name.
/// A name cannot be added without being in `ALL`, so whatever is built from `ALL` (endpoints,
/// metric labels) follows.
macro_rules! op_names {
    ($(#[$meta:meta])* $vis:vis enum $name:ident {
        $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
        $vis enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant,)+
        }

        impl $name {
            /// Every one, in order.
            pub const ALL: &'static [Self] = &[$(Self::$variant,)+];

            /// The name, as in subjects and on the wire.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownOp;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::ALL.iter().copied().find(|op| op.as_str() == s).ok_or_else(|| UnknownOp(s.to_owned()))
            }
        }
    };
}

/// The two name sets of the budgets from one list of the operations that change the budgets
/// (each is both a request and a ledger entry): [`BudgetOp`] adds the queries, [`LedgerOp`] what
/// the keeper records on its own.
macro_rules! budget_names {
    (
        changes { $($change:ident = $change_text:literal,)+ }
        $(#[$op_meta:meta])* BudgetOp also { $($query:ident = $query_text:literal,)+ }
        $(#[$ledger_meta:meta])* LedgerOp also { $($own:ident = $own_text:literal,)+ }
    ) => {
        op_names! {
            $(#[$op_meta])*
            pub enum BudgetOp { $($change = $change_text,)+ $($query = $query_text,)+ }
        }
        op_names! {
            $(#[$ledger_meta])*
            pub enum LedgerOp { $($change = $change_text,)+ $($own = $own_text,)+ }
        }
    };
}

budget_names! {
    changes {
        Reserve = "reserve",
        Commit = "commit",
        Release = "release",
        Set = "set",
        Carve = "carve",
        Close = "close",
        Rate = "rate",
        Backoff = "backoff",
        Price = "price",
    }
    /// An operation of the budget-keeper: the last token of its subject `<p>.budget.<op>`.
    BudgetOp also { Show = "show", }
    /// What a ledger entry records: the last token of its subject `<p>.ledger.<op>` (the changes,
    /// a lease that ran out, and the budget events).
    LedgerOp also {
        Expire = "expire",
        Warning = "warning",
        Exhausted = "exhausted",
        Refilled = "refilled",
    }
}

mod ledger;
mod ops;
mod requests;
#[cfg(test)]
mod tests;

pub use ledger::*;
pub use ops::*;
pub use requests::*;

impl BudgetOp {
    /// An operator's change of the rules (limits, rates, prices), as opposed to the reservations
    /// and accounting agents make: only operators may ask for it.
    pub fn is_control(self) -> bool {
        matches!(self, Self::Set | Self::Rate | Self::Price)
    }
}

/// A name that is not an operation (or ledger change) of this version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no operation {0:?}")]
pub struct UnknownOp(pub String);

/// A budget as the budget-keeper reports it.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BudgetStatus {
    pub scope: String,
    /// Absent for a scope that is only counted (no limit).
    pub limit_tokens: Option<u64>,
    /// Absent for a limit over the scope's whole life.
    pub window_ms: Option<u64>,
    /// Used in the window.
    pub used: u64,
    /// Held by open reservations.
    pub held: u64,
    /// Absent without a limit.
    pub available: Option<u64>,
    /// What the scope's usage cost in the window, in US dollars (by the price table).
    #[serde(default)]
    pub cost_usd: f64,
    /// `fail` or `wait`.
    #[serde(default)]
    pub policy: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warn_at: Vec<u8>,
    /// Set for a task's budget that has ended.
    pub closed_at_ms: Option<u64>,
    /// Set for a budget carved out of another (the carve reservation).
    pub carved_by: Option<String>,
}

/// A shared rate limit as the budget-keeper reports it.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RateStatus {
    pub rate: String,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub window_ms: u64,
    /// Permits granted in the current window.
    pub requests: u64,
    /// Tokens of those permits.
    pub tokens: u64,
    /// Permits waiting.
    pub waiting: u64,
    /// Set while a provider's 429 holds the permits back.
    pub blocked_until_ms: Option<u64>,
}

/// The budget-keeper's answer. `error` is set when the operation was refused (codes:
/// `budget_exceeded`, `budget_wait` (the budget's policy is to wait: try again after
/// `retry_after_ms`), `rate_limited` (no permit in time: try again after `retry_after_ms`),
/// `budget_closed`, `unknown_scope`, `unknown_reservation`, `reservation_ended`,
/// `reservation_mismatch`, `invalid_request`, `malformed`, `unavailable`).
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BudgetReply {
    /// Tokens the reservation holds (`reserve`, `carve`).
    pub tokens: Option<u64>,
    /// When the reservation's lease runs out (`reserve`).
    pub expires_ms: Option<u64>,
    /// How long the lease lasts from the answer on (`reserve`): compare with the caller's own
    /// clock, not `expires_ms`.
    pub lease_left_ms: Option<u64>,
    /// Tokens charged (`commit`).
    pub charged: Option<u64>,
    /// Tokens used beyond the reservation, not charged (`commit`).
    pub over: Option<u64>,
    /// What the call cost in US dollars (`commit`, when the model has a price).
    pub cost_usd: Option<f64>,
    /// With `budget_wait` and `rate_limited`: when to try again.
    pub retry_after_ms: Option<u64>,
    pub budget: Option<BudgetStatus>,
    pub rate: Option<RateStatus>,
    pub error: Option<ErrorInfo>,
}
