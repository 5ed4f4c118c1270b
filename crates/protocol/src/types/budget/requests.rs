//! One request type per budget operation, as it travels on `<p>.budget.<op>` and as the ledger
//! records it. The fields an operation needs are plain fields (a request without one is answered
//! `invalid_request`), the others optional. Each type keeps the field names and the order of the
//! one flat request they replaced, so the bytes on the wire and in the ledger are the same as
//! before. The types themselves ignore fields they do not know (stored copies must always
//! decode); the keeper refuses them in requests ([`crate::codec::decode_strict`]), which the
//! schemas say with `additionalProperties: false`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{BudgetCommand, BudgetOp, BudgetOperation};
use crate::types::Priority;

/// Declares a request that holds tokens in a set of scopes until it is committed, released or
/// runs out (`reserve`, and `carve`, which is a reservation that becomes a child's budget): the
/// hold's fields first, in their wire order, then the operation's own.
macro_rules! hold_request {
    (
        $(#[$meta:meta])*
        pub struct $name:ident { $($(#[$field_meta:meta])* pub $field:ident: $ty:ty,)* }
    ) => {
        $(#[$meta])*
        pub struct $name {
            /// Idempotency key, one per hold: asked again, the first answer is given again.
            pub id: String,
            /// Scopes the tokens are held in, e.g. `task.<id>`, `agent.<id>`, `tenant.<name>`,
            /// `model.<name>` (for `carve`, the parent's).
            #[serde(default, skip_serializing_if = "Vec::is_empty")]
            pub scopes: Vec<String>,
            /// Tokens wanted.
            pub want: u64,
            /// Fewest tokens worth granting (default 1).
            pub min: Option<u64>,
            /// How long the hold lives unless committed or released (default five minutes).
            pub lease_ms: Option<u64>,
            /// Limits (tokens, over the scope's life) of scopes to create if they have none yet,
            /// e.g. the task's own.
            #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
            pub limits: BTreeMap<String, u64>,
            /// The model called, priced at commit.
            pub model: Option<String>,
            $($(#[$field_meta])* pub $field: $ty,)*
        }
    };
}

hold_request! {
    /// `reserve`: hold up to `want` tokens (at least `min`) in every one of `scopes` at once, for
    /// `lease_ms`, before a model call.
    #[serde_with::skip_serializing_none]
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
    #[schemars(deny_unknown_fields)]
    pub struct ReserveRequest {
        /// Rate limits (keys) the call needs a permit of.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub rates: Vec<String>,
        /// Who gets scarce permits first.
        pub priority: Option<Priority>,
    }
}

/// `commit`: what the call of reservation `id` used; the rest goes back.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct CommitRequest {
    pub id: String,
    /// Tokens the call used.
    pub used: u64,
    /// Of `used`, how many were prompt (input) tokens, for the price.
    pub prompt_tokens: Option<u64>,
}

/// `release`: gives reservation `id` back whole; a key not yet reserved is forbidden instead.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct ReleaseRequest {
    pub id: String,
}

/// `set`: a scope's limit, or with `<class>.*` the default of every scope of that class without a
/// limit of its own.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct SetRequest {
    pub scope: String,
    pub limit_tokens: u64,
    /// Absent for a limit over the scope's whole life.
    pub window_ms: Option<u64>,
    /// `fail` (default) or `wait` (for the window to roll).
    pub policy: Option<String>,
    /// Percentages of the limit at which a `warning` is recorded (default 80).
    pub warn_at: Option<Vec<u8>>,
}

/// `show`: a budget (`scope`) or a rate limit (`rate`); one of them is needed.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct ShowRequest {
    pub scope: Option<String>,
    /// A rate limit's key (asked for when set).
    pub rate: Option<String>,
}

hold_request! {
    /// `carve`: a child task's budget `scope`, created with what is reserved (key `id`) out of the
    /// parent's `scopes`; closing the child settles it.
    #[serde_with::skip_serializing_none]
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[schemars(deny_unknown_fields)]
    pub struct CarveRequest {
        /// The child's scope.
        pub scope: String,
    }
}

/// `close`: ends a task's budget; a carved one gives what it did not use back to its parent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct CloseRequest {
    pub scope: String,
}

/// `rate`: a shared rate limit: `rpm` requests and/or `tpm` tokens per window.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RateRequest {
    /// The window (default one minute).
    pub window_ms: Option<u64>,
    /// The rate limit's key.
    pub rate: String,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
}

/// `backoff`: a provider answered 429: no permits of `rates` until `retry_after_ms` from now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct BackoffRequest {
    pub rates: Vec<String>,
    pub retry_after_ms: u64,
}

/// `price`: a model's price in US dollars per million input and output tokens.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct PriceRequest {
    pub model: String,
    pub input_usd_per_mtok: f64,
    pub output_usd_per_mtok: f64,
}

/// Ties each request type to its operation (and so its subject) and its place in
/// [`BudgetCommand`]; `NEEDS` is the `invalid_request` answer to a request without a field the
/// operation needs.
macro_rules! operation {
    ($request:ident, $op:ident, $needs:literal $(, id = $id:ident)?) => {
        impl BudgetOperation for $request {
            const OP: BudgetOp = BudgetOp::$op;
            const NEEDS: &'static str = $needs;
            $(fn id(&self) -> Option<&str> {
                Some(&self.$id)
            })?
        }

        impl From<$request> for BudgetCommand {
            fn from(r: $request) -> Self {
                Self::$op(r)
            }
        }
    };
}

operation!(ReserveRequest, Reserve, "reserve needs id and want", id = id);
operation!(CommitRequest, Commit, "commit needs id and used", id = id);
operation!(ReleaseRequest, Release, "release needs id", id = id);
operation!(SetRequest, Set, "set needs scope and limit_tokens");
operation!(ShowRequest, Show, "show needs scope or rate");
operation!(CarveRequest, Carve, "carve needs id, want and scope (the child's)", id = id);
operation!(CloseRequest, Close, "close needs scope");
operation!(RateRequest, Rate, "rate needs rate (the key)");
operation!(BackoffRequest, Backoff, "backoff needs rates and retry_after_ms");
operation!(PriceRequest, Price, "price needs model, input_usd_per_mtok and output_usd_per_mtok");
