//! What each budget operation does to the [`Ledger`] and what it answers: one function per
//! operation, and [`apply`] choosing among them by the command, exhaustively. Pure and IO-free:
//! the active keeper decides requests with it, the replay ([`crate::replay`]) rebuilds the
//! ledger with it from the recorded commands, each at its recorded time.

use std::collections::BTreeMap;

use flotilla_protocol::{
    BackoffRequest, BudgetCommand, BudgetOperation, BudgetReply, BudgetStatus, CarveRequest, CloseRequest,
    CommitRequest, ErrorInfo, Expiry, PriceRequest, RateRequest, RateStatus, ReleaseRequest, ReserveRequest,
    SetRequest, ShowRequest,
};

use crate::ledger::{
    End, Grant, Ledger, Limit, Policy, Price, Refusal, Reserve, Rules, UNLIMITED, Window, is_default,
};

/// Lease of a reservation whose request names none.
const DEFAULT_LEASE_MS: u64 = 5 * 60 * 1000;
/// Longest pause a provider's 429 may impose: a bogus hint must not stop the fleet for long.
const MAX_BACKOFF_MS: u64 = 10 * 60 * 1000;
/// Window of a rate limit whose request names none.
const DEFAULT_RATE_WINDOW_MS: u64 = 60_000;

/// Applies one command at `now`; returns the answer and whether the ledger changed (then it is
/// recorded).
pub fn apply(ledger: &mut Ledger, command: &BudgetCommand, now: u64) -> (BudgetReply, bool) {
    match command {
        BudgetCommand::Reserve(r) => reserve(ledger, r, now),
        BudgetCommand::Commit(r) => commit(ledger, r, now),
        BudgetCommand::Release(r) => release(ledger, r, now),
        BudgetCommand::Set(r) => set(ledger, r, now),
        BudgetCommand::Show(r) => (show(ledger, r, now), false),
        BudgetCommand::Carve(r) => carve(ledger, r, now),
        BudgetCommand::Close(r) => close(ledger, r, now),
        BudgetCommand::Rate(r) => rate(ledger, r, now),
        BudgetCommand::Backoff(r) => backoff(ledger, r, now),
        BudgetCommand::Price(r) => price(ledger, r),
    }
}

/// `reserve`: holds tokens in every scope at once (and a permit of every rate limit), or refuses.
pub fn reserve(ledger: &mut Ledger, r: &ReserveRequest, now: u64) -> (BudgetReply, bool) {
    if r.id.is_empty() {
        return needs::<ReserveRequest>();
    }
    let open_before = ledger.is_open(&r.id);
    let held = holding(&r.id, &r.scopes, r.want, r.min, r.lease_ms, &r.limits, r.model.as_deref());
    match ledger.reserve(Reserve { rates: r.rates.clone(), ..held }, now) {
        Ok(g) => (granted(g, now), !open_before),
        Err(e) => (refusal(e), false),
    }
}

/// `carve`: a child's budget, reserved out of its parent's (no rate permits).
pub fn carve(ledger: &mut Ledger, r: &CarveRequest, now: u64) -> (BudgetReply, bool) {
    if r.id.is_empty() || r.scope.is_empty() {
        return needs::<CarveRequest>();
    }
    let open_before = ledger.is_open(&r.id);
    let held = holding(&r.id, &r.scopes, r.want, r.min, r.lease_ms, &r.limits, r.model.as_deref());
    match ledger.carve(held, &r.scope, now) {
        Ok(g) => (granted(g, now), !open_before),
        Err(e) => (refusal(e), false),
    }
}

/// `close`: ends a task's budget (a carved one is settled with its parent).
pub fn close(ledger: &mut Ledger, r: &CloseRequest, now: u64) -> (BudgetReply, bool) {
    if r.scope.is_empty() {
        return needs::<CloseRequest>();
    }
    match ledger.close(&r.scope, now) {
        Ok(changed) => (BudgetReply { budget: status(ledger, &r.scope, now), ..Default::default() }, changed),
        Err(e) => (refusal(e), false),
    }
}

/// `commit`: what the call used becomes usage (priced), the rest goes back.
pub fn commit(ledger: &mut Ledger, r: &CommitRequest, now: u64) -> (BudgetReply, bool) {
    if r.id.is_empty() {
        return needs::<CommitRequest>();
    }
    let open_before = ledger.is_open(&r.id);
    ended(ledger.commit_priced(&r.id, r.used, r.prompt_tokens, now), open_before)
}

/// `release`: everything goes back; a key not yet reserved is forbidden (that changes the ledger
/// too).
pub fn release(ledger: &mut Ledger, r: &ReleaseRequest, now: u64) -> (BudgetReply, bool) {
    if r.id.is_empty() {
        return needs::<ReleaseRequest>();
    }
    let open_before = ledger.is_open(&r.id);
    match ledger.release_or_forbid(&r.id, now) {
        Ok((end, marked)) => ended(Ok(end), open_before || marked),
        Err(e) => ended(Err(e), false),
    }
}

/// `expire` (recorded by the keeper, never asked for): every lease due at `now` runs out, as it
/// did when the entry was recorded.
pub fn expire(ledger: &mut Ledger, e: &Expiry, now: u64) {
    if !e.id.is_empty() {
        ledger.expire(now);
    }
}

/// `set`: a scope's (or a class's default) limit, window, policy and warning thresholds.
pub fn set(ledger: &mut Ledger, r: &SetRequest, now: u64) -> (BudgetReply, bool) {
    if r.scope.is_empty() {
        return needs::<SetRequest>();
    }
    let window = match r.window_ms {
        Some(0) => return (refused("invalid_request", "window_ms must be positive"), false),
        Some(ms) => Window::Rolling { ms },
        None => Window::Total,
    };
    let policy = match r.policy.as_deref().map(Policy::parse) {
        None => Policy::Fail,
        Some(Some(p)) => p,
        Some(None) => return (refused("invalid_request", "policy must be fail or wait"), false),
    };
    let warn_at = match &r.warn_at {
        None => Rules::default().warn_at,
        Some(w) if w.iter().any(|p| *p == 0 || *p > 100) => {
            return (refused("invalid_request", "warn_at percentages must be 1 to 100"), false);
        }
        Some(w) => w.clone(),
    };
    if r.limit_tokens == UNLIMITED {
        return (refused("invalid_request", "limit_tokens is too large"), false);
    }
    ledger.set(&r.scope, Limit { tokens: r.limit_tokens, window }, Rules { policy, warn_at }, now);
    (BudgetReply { budget: status(ledger, &r.scope, now), ..Default::default() }, true)
}

/// `show`: a rate limit (when `rate` is given) or a budget, as it is at `now`.
pub fn show(ledger: &mut Ledger, r: &ShowRequest, now: u64) -> BudgetReply {
    if let Some(key) = &r.rate {
        return match rate_status(ledger, key, now) {
            Some(s) => BudgetReply { rate: Some(s), ..Default::default() },
            None => refused("unknown_scope", format!("no rate limit {key:?}")),
        };
    }
    let Some(scope) = &r.scope else {
        return refused("invalid_request", ShowRequest::NEEDS);
    };
    match status(ledger, scope, now) {
        Some(b) => BudgetReply { budget: Some(b), ..Default::default() },
        None => refused("unknown_scope", format!("no budget is set for scope {scope:?}")),
    }
}

/// `rate`: a shared rate limit's requests and tokens per window.
pub fn rate(ledger: &mut Ledger, r: &RateRequest, now: u64) -> (BudgetReply, bool) {
    if r.rate.is_empty() {
        return needs::<RateRequest>();
    }
    if r.rpm.is_none() && r.tpm.is_none() {
        return (refused("invalid_request", "rate needs rpm or tpm"), false);
    }
    if r.window_ms == Some(0) {
        return (refused("invalid_request", "window_ms must be positive"), false);
    }
    ledger.set_rate(&r.rate, r.rpm, r.tpm, r.window_ms.unwrap_or(DEFAULT_RATE_WINDOW_MS));
    (BudgetReply { rate: rate_status(ledger, &r.rate, now), ..Default::default() }, true)
}

/// `backoff`: no permits of the rate limits until the provider's pause (capped) has passed.
pub fn backoff(ledger: &mut Ledger, r: &BackoffRequest, now: u64) -> (BudgetReply, bool) {
    if r.rates.is_empty() {
        return needs::<BackoffRequest>();
    }
    let until = now.saturating_add(r.retry_after_ms.min(MAX_BACKOFF_MS));
    for key in &r.rates {
        ledger.backoff(key, until);
    }
    (BudgetReply::default(), true)
}

/// `price`: a model's price per million input and output tokens.
pub fn price(ledger: &mut Ledger, r: &PriceRequest) -> (BudgetReply, bool) {
    if r.model.is_empty() {
        return needs::<PriceRequest>();
    }
    let (input, output) = (r.input_usd_per_mtok, r.output_usd_per_mtok);
    if !(input.is_finite() && output.is_finite() && input >= 0.0 && output >= 0.0) {
        return (refused("invalid_request", "prices must be finite and not negative"), false);
    }
    ledger.set_price(&r.model, Price { input_per_mtok: input, output_per_mtok: output });
    (BudgetReply::default(), true)
}

/// A refusal with `code`.
pub fn refused(code: &str, message: impl Into<String>) -> BudgetReply {
    BudgetReply { error: Some(ErrorInfo::new(code, message)), ..Default::default() }
}

/// True when the answer is a refusal with `code`.
pub fn is_code(reply: &BudgetReply, code: &str) -> bool {
    reply.error.as_ref().is_some_and(|e| e.code == code)
}

/// The `invalid_request` answer to a request of `R` without a field its operation needs (the
/// same whether the field was absent, which the decoding refuses, or empty).
fn needs<R: BudgetOperation>() -> (BudgetReply, bool) {
    (refused("invalid_request", R::NEEDS), false)
}

/// What a reservation or carve holds in the ledger (without rate permits).
fn holding(
    id: &str,
    scopes: &[String],
    want: u64,
    min: Option<u64>,
    lease_ms: Option<u64>,
    limits: &BTreeMap<String, u64>,
    model: Option<&str>,
) -> Reserve {
    Reserve {
        id: id.to_owned(),
        scopes: scopes.to_vec(),
        want,
        min: min.unwrap_or(1).min(want),
        lease_ms: lease_ms.unwrap_or(DEFAULT_LEASE_MS),
        limits: limits.clone(),
        model: model.map(str::to_owned),
        rates: Vec::new(),
    }
}

/// The answer to a commit or release.
fn ended(result: Result<End, Refusal>, changed: bool) -> (BudgetReply, bool) {
    match result {
        Ok(End::Committed { charged, over, cost_nusd }) => (
            BudgetReply {
                charged: Some(charged),
                over: Some(over),
                cost_usd: cost_nusd.map(usd),
                ..Default::default()
            },
            changed,
        ),
        Ok(_) => (BudgetReply::default(), changed),
        Err(e) => (refusal(e), false),
    }
}

fn refusal(r: Refusal) -> BudgetReply {
    let (code, retry) = match &r {
        Refusal::Exhausted { .. } => ("budget_exceeded", None),
        Refusal::Wait { retry_after_ms, .. } => ("budget_wait", Some(*retry_after_ms)),
        Refusal::RateLimited { retry_after_ms, .. } => ("rate_limited", Some(*retry_after_ms)),
        Refusal::Closed(_) => ("budget_closed", None),
        Refusal::UnknownScope(_) => ("unknown_scope", None),
        Refusal::UnknownReservation(_) => ("unknown_reservation", None),
        Refusal::Ended(..) => ("reservation_ended", None),
        Refusal::Mismatch(_) => ("reservation_mismatch", None),
        Refusal::Invalid => ("invalid_request", None),
    };
    BudgetReply { retry_after_ms: retry, ..refused(code, r.to_string()) }
}

fn granted(g: Grant, now: u64) -> BudgetReply {
    BudgetReply {
        tokens: Some(g.tokens),
        expires_ms: Some(g.expires_ms),
        lease_left_ms: Some(g.expires_ms.saturating_sub(now)),
        ..Default::default()
    }
}

#[allow(clippy::cast_precision_loss)]
fn usd(nusd: u64) -> f64 {
    nusd as f64 / 1e9
}

/// A budget (or a class's default) as it is at `now`.
pub fn status(ledger: &mut Ledger, scope: &str, now: u64) -> Option<BudgetStatus> {
    if is_default(scope) {
        let (limit, rules) = ledger.default_of(scope)?.clone();
        return Some(BudgetStatus {
            scope: scope.to_owned(),
            limit_tokens: Some(limit.tokens),
            window_ms: window_ms(limit.window),
            policy: rules.policy.name().to_owned(),
            warn_at: rules.warn_at,
            ..Default::default()
        });
    }
    let b = ledger.budget(scope, now)?;
    Some(BudgetStatus {
        scope: scope.to_owned(),
        limit_tokens: b.is_limited().then_some(b.limit.tokens),
        window_ms: window_ms(b.limit.window),
        used: b.used,
        held: b.held,
        available: b.is_limited().then(|| b.available()),
        cost_usd: usd(b.cost_nusd),
        policy: b.rules.policy.name().to_owned(),
        warn_at: b.rules.warn_at.clone(),
        closed_at_ms: b.closed_ms,
        carved_by: b.carved_by.clone(),
    })
}

fn window_ms(w: Window) -> Option<u64> {
    match w {
        Window::Total => None,
        Window::Rolling { ms } => Some(ms),
    }
}

fn rate_status(ledger: &mut Ledger, key: &str, now: u64) -> Option<RateStatus> {
    let r = ledger.rate(key, now)?;
    Some(RateStatus {
        rate: key.to_owned(),
        rpm: r.rpm,
        tpm: r.tpm,
        window_ms: r.window_ms,
        requests: r.requests(),
        tokens: r.tokens(),
        waiting: 0,
        blocked_until_ms: (r.blocked_until > now).then_some(r.blocked_until),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal_of(ledger: &mut Ledger, command: BudgetCommand) -> (String, String) {
        let (reply, changed) = apply(ledger, &command, 0);
        assert!(!changed, "{command:?} changed the ledger");
        let e = reply.error.unwrap_or_else(|| panic!("{command:?} was not refused"));
        (e.code, e.message)
    }

    #[test]
    fn empty_keys_and_names_are_refused_as_missing_ones_are() {
        let mut l = Ledger::new(60_000);
        let needs = |m: &str| ("invalid_request".to_owned(), m.to_owned());
        let cases = [
            (BudgetCommand::Reserve(ReserveRequest { want: 5, ..Default::default() }), ReserveRequest::NEEDS),
            (BudgetCommand::Commit(CommitRequest::default()), CommitRequest::NEEDS),
            (BudgetCommand::Release(ReleaseRequest::default()), ReleaseRequest::NEEDS),
            (BudgetCommand::Set(SetRequest { limit_tokens: 5, ..Default::default() }), SetRequest::NEEDS),
            (BudgetCommand::Show(ShowRequest::default()), ShowRequest::NEEDS),
            (
                BudgetCommand::Carve(CarveRequest { id: "c".into(), want: 5, ..Default::default() }),
                CarveRequest::NEEDS,
            ),
            (BudgetCommand::Close(CloseRequest::default()), CloseRequest::NEEDS),
            (BudgetCommand::Rate(RateRequest { rpm: Some(1), ..Default::default() }), RateRequest::NEEDS),
            (
                BudgetCommand::Backoff(BackoffRequest { rates: Vec::new(), retry_after_ms: 5 }),
                BackoffRequest::NEEDS,
            ),
            (BudgetCommand::Price(PriceRequest::default()), PriceRequest::NEEDS),
        ];
        for (command, message) in cases {
            assert_eq!(refusal_of(&mut l, command), needs(message));
        }
    }

    #[test]
    fn commands_change_the_ledger_and_answer_as_the_ledger_decides() {
        let mut l = Ledger::new(60_000);
        let set = SetRequest { scope: "tenant.a".into(), limit_tokens: 100, ..Default::default() };
        let (reply, changed) = apply(&mut l, &BudgetCommand::Set(set), 0);
        assert!(changed);
        assert_eq!(reply.budget.and_then(|b| b.available), Some(100));
        let reserve = ReserveRequest {
            id: "r".into(),
            scopes: vec!["tenant.a".into()],
            want: 80,
            ..Default::default()
        };
        let (reply, changed) = apply(&mut l, &BudgetCommand::Reserve(reserve.clone()), 0);
        assert_eq!((reply.tokens, changed), (Some(80), true));
        // Asked again: the same answer, nothing recorded again.
        let (again, changed) = apply(&mut l, &BudgetCommand::Reserve(reserve), 0);
        assert_eq!((again.tokens, changed), (Some(80), false));
        let commit = CommitRequest { id: "r".into(), used: 30, prompt_tokens: None };
        let (reply, changed) = apply(&mut l, &BudgetCommand::Commit(commit), 0);
        assert_eq!((reply.charged, reply.over, changed), (Some(30), Some(0), true));
        let show = ShowRequest { scope: Some("tenant.a".into()), rate: None };
        let (reply, changed) = apply(&mut l, &BudgetCommand::Show(show), 0);
        assert_eq!((reply.budget.map(|b| (b.used, b.held)), changed), (Some((30, 0)), false));
        let unknown = ShowRequest { scope: None, rate: Some("p/m".into()) };
        assert_eq!(refusal_of(&mut l, BudgetCommand::Show(unknown)).0, "unknown_scope");
        let price = PriceRequest { model: "m".into(), input_usd_per_mtok: -1.0, output_usd_per_mtok: 1.0 };
        assert_eq!(refusal_of(&mut l, BudgetCommand::Price(price)).0, "invalid_request");
    }
}
