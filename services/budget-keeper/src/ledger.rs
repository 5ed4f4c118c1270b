//! The budget ledger: token budgets, reservations, commits, shared rate limits and prices as an
//! IO-free state machine. The budget-keeper feeds it requests (and, on start, the ledger stream
//! to rebuild it); everything it decides follows from the operations it was given and their
//! times, so a replay reaches the same state.
//!
//! A budget is a limit on one scope (a task, an agent, a tenant, a model) over a window: the
//! whole life of the scope, or a rolling period (an agent's hour, a tenant's day). A scope
//! without a limit of its own takes its class's default (`agent.*`) or is only counted (usage
//! and cost, no limit). A reservation holds tokens in every scope it names at once, or in none,
//! and takes a permit of every rate limit it names; a commit turns what a call really used into
//! usage (and cost, by the price table) and gives the rest back; a release gives everything
//! back; a reservation whose lease runs out is released. At every moment, in every scope, usage
//! in the window plus what is held is at most the limit. Every operation carries an idempotency
//! key: repeating one returns the first answer and changes nothing. A child task's budget is
//! carved out of its parent's (a reservation on the parent) and settled when the child's budget
//! closes: what the child used is charged to the parent, the rest refunded.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// A budget's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Window {
    /// The scope's whole life (a task's budget).
    Total,
    /// The last `ms` milliseconds (an agent's hour, a tenant's day).
    Rolling { ms: u64 },
}

/// How many slices a rolling window's usage is kept in. Usage leaves the window a whole slice at
/// a time, once the slice's end is older than the window: never earlier than exactly, so the
/// limit is never exceeded, and at most one slice later.
pub const SLICES: u64 = 60;

/// Tokens of a scope that is only counted.
pub const UNLIMITED: u64 = u64::MAX;

/// A rate permit stays in its window this much longer than the window, so that calls made
/// shortly after their permit still fall in it as the provider counts them.
pub const RATE_MARGIN_MS: u64 = 2_000;

/// How soon a caller waiting for a budget that only a new limit can refill asks again.
const WAIT_RETRY_MS: u64 = 5_000;

/// A limit on one scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limit {
    pub tokens: u64,
    pub window: Window,
}

impl Limit {
    /// A scope that is only counted.
    pub const COUNTED: Limit = Limit { tokens: UNLIMITED, window: Window::Total };
}

/// What happens to a call its budget cannot take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Policy {
    /// The task fails with `budget_exceeded`.
    #[default]
    Fail,
    /// The call waits until the window has rolled far enough (or the limit rose).
    Wait,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Self::Fail => "fail",
            Self::Wait => "wait",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "fail" => Some(Self::Fail),
            "wait" => Some(Self::Wait),
            _ => None,
        }
    }
}

/// Policy and warning thresholds of a budget.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rules {
    pub policy: Policy,
    /// Percentages of the limit whose crossing is reported.
    pub warn_at: Vec<u8>,
}

impl Default for Rules {
    fn default() -> Self {
        Self { policy: Policy::Fail, warn_at: vec![80] }
    }
}

/// One scope's state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Budget {
    pub limit: Limit,
    pub rules: Rules,
    /// Tokens held by open reservations.
    pub held: u64,
    /// Tokens used in the window (all of them for [`Window::Total`]).
    pub used: u64,
    /// Cost of everything used since the scope was created, in billionths of a US dollar.
    pub cost_nusd: u64,
    /// When a task's budget was closed (no more reservations).
    pub closed_ms: Option<u64>,
    /// The reservation on the parent this budget was carved out of.
    pub carved_by: Option<String>,
    /// Took its limit from its class's default (and follows changes to it).
    inherited: bool,
    /// Used tokens per slice start (rolling windows only), oldest first.
    slices: VecDeque<(u64, u64)>,
    /// Highest threshold reported (percent), and whether exhaustion was reported.
    alerted: u8,
    exhausted: bool,
    exhausted_reported: bool,
}

impl Budget {
    fn new(limit: Limit, rules: Rules) -> Self {
        Self {
            limit,
            rules,
            held: 0,
            used: 0,
            cost_nusd: 0,
            closed_ms: None,
            carved_by: None,
            inherited: false,
            slices: VecDeque::new(),
            alerted: 0,
            exhausted: false,
            exhausted_reported: false,
        }
    }

    /// Tokens that may still be reserved.
    pub fn available(&self) -> u64 {
        self.limit.tokens.saturating_sub(self.used.saturating_add(self.held))
    }

    /// True when the scope has a limit (it is not only counted).
    pub fn is_limited(&self) -> bool {
        self.limit.tokens != UNLIMITED
    }

    /// Drops the usage of slices that ended before the window.
    fn roll(&mut self, now_ms: u64) {
        let Window::Rolling { ms } = self.limit.window else { return };
        let slice = (ms / SLICES).max(1);
        while let Some(&(start, tokens)) = self.slices.front() {
            if start.saturating_add(slice).saturating_add(ms) > now_ms {
                break;
            }
            self.slices.pop_front();
            self.used = self.used.saturating_sub(tokens);
        }
    }

    /// How long until `need` tokens are available, if the window rolling can bring them (holds
    /// are assumed to stay).
    fn frees_in(&self, need: u64, now_ms: u64) -> Option<u64> {
        let Window::Rolling { ms } = self.limit.window else { return None };
        let slice = (ms / SLICES).max(1);
        let mut available = self.available();
        for &(start, tokens) in &self.slices {
            available = available.saturating_add(tokens);
            if available >= need {
                return Some(start.saturating_add(slice).saturating_add(ms).saturating_sub(now_ms).max(1));
            }
        }
        None
    }

    fn charge(&mut self, tokens: u64, now_ms: u64) {
        self.used = self.used.saturating_add(tokens);
        if let Window::Rolling { ms } = self.limit.window {
            let slice = (ms / SLICES).max(1);
            let start = now_ms - now_ms % slice;
            match self.slices.back_mut() {
                Some((s, t)) if *s == start => *t = t.saturating_add(tokens),
                _ => self.slices.push_back((start, tokens)),
            }
        }
    }

    /// Percent of the limit used (0 without a limit).
    fn percent(&self) -> u64 {
        if !self.is_limited() || self.limit.tokens == 0 {
            return if self.is_limited() { 100 } else { 0 };
        }
        u64::try_from(u128::from(self.used) * 100 / u128::from(self.limit.tokens)).unwrap_or(u64::MAX)
    }
}

/// A shared rate limit: requests and tokens per window, over every caller in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rate {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub window_ms: u64,
    /// No permits before this (a provider answered 429).
    pub blocked_until: u64,
    /// Permits in the window: when, how many tokens, which reservation.
    log: VecDeque<(u64, u64, String)>,
    /// The tokens of `log`, kept as it changes.
    #[serde(default)]
    log_tokens: u64,
}

impl Rate {
    fn new(rpm: Option<u64>, tpm: Option<u64>, window_ms: u64) -> Self {
        Self { rpm, tpm, window_ms: window_ms.max(1), blocked_until: 0, log: VecDeque::new(), log_tokens: 0 }
    }

    fn roll(&mut self, now_ms: u64) {
        let keep = self.window_ms.saturating_add(RATE_MARGIN_MS);
        while let Some(&(at, tokens, _)) = self.log.front() {
            if at.saturating_add(keep) > now_ms {
                break;
            }
            self.log.pop_front();
            self.log_tokens = self.log_tokens.saturating_sub(tokens);
        }
    }

    fn push(&mut self, at: u64, tokens: u64, id: String) {
        self.log.push_back((at, tokens, id));
        self.log_tokens = self.log_tokens.saturating_add(tokens);
    }

    /// A permit's tokens become what its call used.
    fn settle(&mut self, id: &str, tokens: u64) {
        if let Some(entry) = self.log.iter_mut().rev().find(|(_, _, rid)| rid == id) {
            self.log_tokens = self.log_tokens.saturating_sub(entry.1).saturating_add(tokens);
            entry.1 = tokens;
        }
    }

    /// Permits granted in the window.
    pub fn requests(&self) -> u64 {
        u64::try_from(self.log.len()).unwrap_or(u64::MAX)
    }

    /// Tokens of the permits in the window.
    pub fn tokens(&self) -> u64 {
        self.log_tokens
    }

    /// Tokens a permit may take now (`Ok`), or how long until one is possible (`Err`), or that
    /// none is ever possible for `min` (`Err(None)`).
    fn check(&mut self, min: u64, now_ms: u64) -> Result<u64, Option<u64>> {
        self.roll(now_ms);
        if self.blocked_until > now_ms {
            return Err(Some(self.blocked_until - now_ms));
        }
        let keep = self.window_ms.saturating_add(RATE_MARGIN_MS);
        let leaves = |at: u64| at.saturating_add(keep).saturating_sub(now_ms).max(1);
        if let Some(rpm) = self.rpm
            && self.requests() >= rpm
        {
            let n = usize::try_from(self.requests() - rpm).unwrap_or(0);
            return Err(self.log.get(n).map(|(at, _, _)| leaves(*at)).or(Some(1)));
        }
        let Some(tpm) = self.tpm else { return Ok(UNLIMITED) };
        if tpm < min {
            return Err(None);
        }
        let available = tpm.saturating_sub(self.tokens());
        if available >= min {
            return Ok(available);
        }
        let mut freed = available;
        for (at, t, _) in &self.log {
            freed = freed.saturating_add(*t);
            if freed >= min {
                return Err(Some(leaves(*at)));
            }
        }
        Err(Some(1))
    }
}

/// A request to hold tokens for one model call.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reserve {
    /// Idempotency key.
    pub id: String,
    /// Every scope the call counts against.
    pub scopes: Vec<String>,
    /// Tokens wanted (the call's upper bound).
    pub want: u64,
    /// Fewest tokens the call can do with; less available is a refusal.
    pub min: u64,
    /// How long the reservation lives unless committed or released.
    pub lease_ms: u64,
    /// Limits (over the scope's life) of scopes to create if they have none.
    pub limits: BTreeMap<String, u64>,
    /// Model whose price the commit uses.
    pub model: Option<String>,
    /// Rate limits the call needs a permit of.
    pub rates: Vec<String>,
}

/// What a granted reservation holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Grant {
    pub tokens: u64,
    pub expires_ms: u64,
}

/// Why an operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("budget {scope:?} has {available} tokens left, the call needs at least {min}")]
    Exhausted { scope: String, available: u64, min: u64 },
    #[error(
        "budget {scope:?} has {available} tokens left, the call needs at least {min}; its policy is to wait"
    )]
    Wait { scope: String, available: u64, min: u64, retry_after_ms: u64 },
    #[error("no permit of rate limit {rate:?} now")]
    RateLimited { rate: String, retry_after_ms: u64 },
    #[error("budget {0:?} is closed")]
    Closed(String),
    #[error("no budget is set for scope {0:?}")]
    UnknownScope(String),
    #[error("no reservation {0:?}")]
    UnknownReservation(String),
    #[error("reservation {0:?} has ended ({1})")]
    Ended(String, &'static str),
    #[error("reservation {0:?} already exists with other scopes or sizes")]
    Mismatch(String),
    #[error("a reservation must name at least one scope, each once, and want at least its minimum")]
    Invalid,
}

/// How a reservation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum End {
    /// Committed: `charged` tokens became usage; `over` is what the call used beyond its
    /// reservation (not charged: the limit holds; reported so the caller can tighten its bounds);
    /// `cost_nusd` what it cost, when its model has a price.
    Committed {
        charged: u64,
        over: u64,
        cost_nusd: Option<u64>,
    },
    Released,
    Expired,
}

impl End {
    fn name(self) -> &'static str {
        match self {
            Self::Committed { .. } => "committed",
            Self::Released => "released",
            Self::Expired => "expired",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Reservation {
    request: Reserve,
    grant: Grant,
    end: Option<(End, u64)>,
    /// The child budget a carve reservation made.
    child: Option<String>,
}

/// A price: US dollars per million input and output tokens.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
}

impl Price {
    /// Cost in billionths of a dollar (a dollar per million tokens is a thousand per token).
    fn cost_nusd(self, prompt: u64, completion: u64) -> u64 {
        #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let n = (prompt as f64 * self.input_per_mtok + completion as f64 * self.output_per_mtok) * 1_000.0;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let n = n.round().max(0.0) as u64;
        n
    }
}

/// A budget event to report (see [`Ledger::alerts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub kind: AlertKind,
    pub scope: String,
    /// The threshold crossed (`warning`).
    pub threshold: Option<u8>,
}

/// What a budget event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertKind {
    /// A warning threshold was crossed.
    Warning,
    /// A reservation was refused for want of tokens.
    Exhausted,
    /// Below the thresholds again after one of those.
    Refilled,
}

impl AlertKind {
    /// The ledger entry the event is recorded as.
    pub fn op(self) -> flotilla_protocol::LedgerOp {
        use flotilla_protocol::LedgerOp;
        match self {
            Self::Warning => LedgerOp::Warning,
            Self::Exhausted => LedgerOp::Exhausted,
            Self::Refilled => LedgerOp::Refilled,
        }
    }
}

/// The ledger. See the module documentation.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Ledger {
    budgets: HashMap<String, Budget>,
    /// Class defaults (`agent.*` → limit and rules).
    defaults: HashMap<String, (Limit, Rules)>,
    reservations: HashMap<String, Reservation>,
    rates: HashMap<String, Rate>,
    prices: HashMap<String, Price>,
    /// Scopes whose numbers changed since [`Self::alerts`] last looked.
    touched: BTreeSet<String>,
    /// Open reservations by when their lease runs out; ended ones by when they ended; closed
    /// budgets by when they closed: so that [`Self::expire`] looks only at what is due.
    #[serde(default)]
    due: BTreeSet<(u64, String)>,
    #[serde(default)]
    ended: BTreeSet<(u64, String)>,
    #[serde(default)]
    closed: BTreeSet<(u64, String)>,
    /// How long an ended reservation (and a closed budget) is remembered, so a repeated
    /// operation still gets its first answer.
    pub remember_ms: u64,
}

/// The class of a scope: what comes before its first dot (`agent` of `agent.a7`).
pub fn class_of(scope: &str) -> &str {
    scope.split_once('.').map_or(scope, |(c, _)| c)
}

/// True for a class default's name (`agent.*`).
pub fn is_default(scope: &str) -> bool {
    scope.ends_with(".*")
}

impl Ledger {
    pub fn new(remember_ms: u64) -> Self {
        Self { remember_ms, ..Default::default() }
    }

    /// Sets or changes a scope's limit (or, for `<class>.*`, the default of every scope of the
    /// class without a limit of its own). Usage and holds stay; a limit below them only stops new
    /// reservations.
    pub fn set_limit(&mut self, scope: &str, limit: Limit, now_ms: u64) {
        let rules = self.budgets.get(scope).map(|b| b.rules.clone()).unwrap_or_default();
        self.set(scope, limit, rules, now_ms);
    }

    /// [`Self::set_limit`] with a policy and warning thresholds.
    pub fn set(&mut self, scope: &str, limit: Limit, rules: Rules, now_ms: u64) {
        if is_default(scope) {
            let class = scope.trim_end_matches(".*").to_owned();
            self.defaults.insert(class.clone(), (limit, rules.clone()));
            let inheriting: Vec<String> = self
                .budgets
                .iter()
                .filter(|(s, b)| b.inherited && class_of(s) == class)
                .map(|(s, _)| s.clone())
                .collect();
            for s in inheriting {
                self.change(&s, limit, rules.clone(), true, now_ms);
            }
            return;
        }
        self.change(scope, limit, rules, false, now_ms);
    }

    fn change(&mut self, scope: &str, limit: Limit, rules: Rules, inherited: bool, now_ms: u64) {
        // As everywhere, a closed budget past remembering is gone whether or not `expire` ran.
        self.forget_scope_if_old(scope, now_ms);
        self.touched.insert(scope.to_owned());
        let b = self.budgets.entry(scope.to_owned()).or_insert_with(|| Budget::new(limit, rules.clone()));
        b.rules = rules;
        b.inherited = inherited;
        // Usage that has left the old window stays gone, whenever this is called.
        b.roll(now_ms);
        if b.limit.window != limit.window {
            // Usage kept per slice only for rolling windows: start the new window afresh from
            // what is known.
            b.slices.clear();
            if matches!(limit.window, Window::Rolling { .. }) && b.used > 0 {
                let used = std::mem::take(&mut b.used);
                b.limit = limit;
                b.charge(used, now_ms);
                return;
            }
        }
        b.limit = limit;
    }

    /// A class default (`agent.*`).
    pub fn default_of(&self, scope: &str) -> Option<&(Limit, Rules)> {
        self.defaults.get(scope.trim_end_matches(".*"))
    }

    /// A scope's budget as of `now_ms`.
    pub fn budget(&mut self, scope: &str, now_ms: u64) -> Option<&Budget> {
        self.forget_scope_if_old(scope, now_ms);
        let b = self.budgets.get_mut(scope)?;
        b.roll(now_ms);
        Some(b)
    }

    /// Every scope with a budget.
    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        self.budgets.keys().map(String::as_str)
    }

    /// Sets a shared rate limit.
    pub fn set_rate(&mut self, key: &str, rpm: Option<u64>, tpm: Option<u64>, window_ms: u64) {
        let r = self.rates.entry(key.to_owned()).or_insert_with(|| Rate::new(rpm, tpm, window_ms));
        r.rpm = rpm;
        r.tpm = tpm;
        r.window_ms = window_ms.max(1);
    }

    /// Holds back every permit of `key` until `until_ms` (a provider answered 429). Creates a
    /// rate entry without limits if there was none, so the pause holds for callers of any limit.
    pub fn backoff(&mut self, key: &str, until_ms: u64) {
        let r = self.rates.entry(key.to_owned()).or_insert_with(|| Rate::new(None, None, 60_000));
        r.blocked_until = r.blocked_until.max(until_ms);
    }

    /// A rate limit as of `now_ms`.
    pub fn rate(&mut self, key: &str, now_ms: u64) -> Option<&Rate> {
        let r = self.rates.get_mut(key)?;
        r.roll(now_ms);
        Some(r)
    }

    /// Sets a model's price.
    pub fn set_price(&mut self, model: &str, price: Price) {
        self.prices.insert(model.to_owned(), price);
    }

    /// A model's price.
    pub fn price(&self, model: &str) -> Option<Price> {
        self.prices.get(model).copied()
    }

    /// Forgets a closed budget once [`Self::remember_ms`] has passed since it closed (by its own
    /// time, so a replay agrees).
    fn forget_scope_if_old(&mut self, scope: &str, now_ms: u64) {
        let keep = self.remember_ms;
        if self
            .budgets
            .get(scope)
            .and_then(|b| b.closed_ms)
            .is_some_and(|at| at.saturating_add(keep) <= now_ms)
        {
            self.budgets.remove(scope);
        }
    }

    /// What a scope would offer a reservation now: its own budget, or the one it would be created
    /// with (from `limits`, its class default, or only counted).
    fn offer(&mut self, scope: &str, limits: &BTreeMap<String, u64>, now_ms: u64) -> Result<Budget, Refusal> {
        self.forget_scope_if_old(scope, now_ms);
        if let Some(b) = self.budgets.get_mut(scope) {
            if b.closed_ms.is_some() {
                return Err(Refusal::Closed(scope.to_owned()));
            }
            b.roll(now_ms);
            return Ok(b.clone());
        }
        Ok(self.fresh(scope, limits))
    }

    fn fresh(&self, scope: &str, limits: &BTreeMap<String, u64>) -> Budget {
        if let Some(&tokens) = limits.get(scope) {
            return Budget::new(Limit { tokens, window: Window::Total }, Rules::default());
        }
        match self.defaults.get(class_of(scope)) {
            Some((limit, rules)) => {
                let mut b = Budget::new(*limit, rules.clone());
                b.inherited = true;
                b
            }
            None => Budget::new(Limit::COUNTED, Rules::default()),
        }
    }

    /// Holds tokens in every scope of the request, as many as wanted or as are available in the
    /// tightest scope (and rate limit), at least `min`; or refuses and holds nothing. A repeated
    /// request (same id) gets the first grant while the reservation is open, and
    /// [`Refusal::Ended`] after.
    pub fn reserve(&mut self, req: Reserve, now_ms: u64) -> Result<Grant, Refusal> {
        self.forget_if_old(&req.id, now_ms);
        if let Some(r) = self.reservations.get(&req.id) {
            // An ended reservation holds nothing: its key cannot be used for another call.
            if let Some((end, _)) = r.end {
                return Err(Refusal::Ended(req.id, end.name()));
            }
            if r.request.scopes != req.scopes || r.request.want != req.want || r.request.min != req.min {
                return Err(Refusal::Mismatch(req.id));
            }
            return Ok(r.grant);
        }
        let distinct = |v: &[String]| v.iter().collect::<BTreeSet<_>>().len() == v.len();
        if req.scopes.is_empty()
            || req.want < req.min
            || req.want == 0
            || !distinct(&req.scopes)
            || !distinct(&req.rates)
        {
            return Err(Refusal::Invalid);
        }
        let mut grant = req.want;
        let mut fresh: Vec<(String, Budget)> = Vec::new();
        for scope in &req.scopes {
            let b = self.offer(scope, &req.limits, now_ms)?;
            let available = b.available();
            if available < req.min {
                if let Some(own) = self.budgets.get_mut(scope)
                    && !own.exhausted
                {
                    own.exhausted = true;
                    self.touched.insert(scope.clone());
                }
                let scope = scope.clone();
                return Err(match (b.rules.policy, b.limit.tokens >= req.min) {
                    (Policy::Wait, true) => {
                        let retry_after_ms = b.frees_in(req.min, now_ms).unwrap_or(WAIT_RETRY_MS);
                        Refusal::Wait { scope, available, min: req.min, retry_after_ms }
                    }
                    _ => Refusal::Exhausted { scope, available, min: req.min },
                });
            }
            grant = grant.min(available);
            if !self.budgets.contains_key(scope) {
                fresh.push((scope.clone(), b));
            }
        }
        for key in &req.rates {
            if let Some(rate) = self.rates.get_mut(key) {
                match rate.check(req.min, now_ms) {
                    Ok(available) => grant = grant.min(available),
                    Err(Some(retry_after_ms)) => {
                        return Err(Refusal::RateLimited { rate: key.clone(), retry_after_ms });
                    }
                    Err(None) => {
                        return Err(Refusal::Exhausted {
                            scope: format!("rate.{key}"),
                            available: rate.tpm.unwrap_or_default(),
                            min: req.min,
                        });
                    }
                }
            }
        }
        for (scope, b) in fresh {
            self.budgets.insert(scope, b);
        }
        for scope in &req.scopes {
            if let Some(b) = self.budgets.get_mut(scope) {
                b.held = b.held.saturating_add(grant);
            }
            self.touched.insert(scope.clone());
        }
        for key in &req.rates {
            if let Some(rate) = self.rates.get_mut(key) {
                rate.push(now_ms, grant, req.id.clone());
            }
        }
        let g = Grant { tokens: grant, expires_ms: now_ms.saturating_add(req.lease_ms) };
        self.due.insert((g.expires_ms, req.id.clone()));
        self.reservations
            .insert(req.id.clone(), Reservation { request: req, grant: g, end: None, child: None });
        Ok(g)
    }

    /// Carves a child budget out of its parent's: holds exactly `tokens` in the parent scopes
    /// (a reservation `id` that lives as long as `lease_ms`) and creates `child` with that limit.
    /// Repeated, it answers the first grant.
    pub fn carve(&mut self, mut req: Reserve, child: &str, now_ms: u64) -> Result<Grant, Refusal> {
        req.min = req.want;
        self.forget_if_old(&req.id, now_ms);
        self.forget_scope_if_old(child, now_ms);
        if let Some(r) = self.reservations.get(&req.id) {
            // Asked again (a re-run parent): the first carve stands, open or settled, whatever
            // amount is asked now.
            return match r.child.as_deref() {
                Some(c) if c == child => Ok(r.grant),
                _ => Err(Refusal::Mismatch(req.id)),
            };
        }
        let open_before = self.is_open(&req.id);
        let id = req.id.clone();
        let g = self.reserve(req, now_ms)?;
        if !open_before {
            if let Some(r) = self.reservations.get_mut(&id) {
                r.child = Some(child.to_owned());
            }
            let mut b = Budget::new(Limit { tokens: g.tokens, window: Window::Total }, Rules::default());
            b.carved_by = Some(id);
            if let Some(old) = self.budgets.get(child) {
                // Usage the child already had (it ran before being carved) stays its own.
                b.used = old.used;
                b.held = old.held;
                b.cost_nusd = old.cost_nusd;
            }
            self.budgets.insert(child.to_owned(), b);
            self.touched.insert(child.to_owned());
        }
        Ok(g)
    }

    /// Closes a task's budget: no more reservations; a carved one is settled with its parent
    /// (what it used and still holds charged there, the rest refunded). Returns false if it was
    /// closed already (nothing changed).
    pub fn close(&mut self, scope: &str, now_ms: u64) -> Result<bool, Refusal> {
        self.forget_scope_if_old(scope, now_ms);
        let b = self.budgets.get_mut(scope).ok_or_else(|| Refusal::UnknownScope(scope.to_owned()))?;
        if b.closed_ms.is_some() {
            return Ok(false);
        }
        b.closed_ms = Some(now_ms);
        self.closed.insert((now_ms, scope.to_owned()));
        let (carve, spent) = (b.carved_by.clone(), b.used.saturating_add(b.held));
        if let Some(id) = carve
            && self.is_open(&id)
        {
            // Settled: what the child spent is charged to the parent, the rest refunded.
            let _ = self.commit(&id, spent, now_ms);
        }
        Ok(true)
    }

    /// Turns what the call used into usage in every scope and gives the rest back. A repeated
    /// commit gets the first answer. `prompt` is how many of `used` were input tokens (for the
    /// price; without it all are priced as output).
    pub fn commit(&mut self, id: &str, used: u64, now_ms: u64) -> Result<End, Refusal> {
        self.end(id, Some((used, None)), now_ms)
    }

    /// [`Self::commit`] with the input tokens known.
    pub fn commit_priced(
        &mut self,
        id: &str,
        used: u64,
        prompt: Option<u64>,
        now_ms: u64,
    ) -> Result<End, Refusal> {
        self.end(id, Some((used, prompt)), now_ms)
    }

    /// Gives everything held back (the call was not made, or failed before using anything).
    pub fn release(&mut self, id: &str, now_ms: u64) -> Result<End, Refusal> {
        self.end(id, None, now_ms)
    }

    /// [`Self::release`], and for a key not (yet) reserved, ends it before it is used: a reserve
    /// still on its way whose caller gave up (the attempt was cancelled while it waited for a
    /// permit) is then refused when it comes rather than granted to nobody. Returns whether such
    /// a mark was made (a change to record).
    pub fn release_or_forbid(&mut self, id: &str, now_ms: u64) -> Result<(End, bool), Refusal> {
        self.forget_if_old(id, now_ms);
        if self.reservations.contains_key(id) {
            return self.release(id, now_ms).map(|e| (e, false));
        }
        self.reservations.insert(
            id.to_owned(),
            Reservation {
                request: Reserve { id: id.to_owned(), ..Default::default() },
                grant: Grant { tokens: 0, expires_ms: now_ms },
                end: Some((End::Released, now_ms)),
                child: None,
            },
        );
        self.ended.insert((now_ms, id.to_owned()));
        Ok((End::Released, true))
    }

    /// Forgets an ended reservation once [`Self::remember_ms`] has passed since it ended, by its
    /// own times only: so the answer does not depend on when [`Self::expire`] last ran, and a
    /// replay of the ledger answers as the live ledger did.
    fn forget_if_old(&mut self, id: &str, now_ms: u64) {
        let keep = self.remember_ms;
        if self
            .reservations
            .get(id)
            .and_then(|r| r.end)
            .is_some_and(|(_, at)| at.saturating_add(keep) <= now_ms)
        {
            self.reservations.remove(id);
        }
    }

    fn end(&mut self, id: &str, used: Option<(u64, Option<u64>)>, now_ms: u64) -> Result<End, Refusal> {
        self.forget_if_old(id, now_ms);
        let r = self.reservations.get_mut(id).ok_or_else(|| Refusal::UnknownReservation(id.to_owned()))?;
        if let Some((end, _)) = r.end {
            let same = matches!((end, used), (End::Committed { .. }, Some(_)) | (End::Released, None));
            return if same { Ok(end) } else { Err(Refusal::Ended(id.to_owned(), end.name())) };
        }
        let cost = match (used, r.request.model.as_ref().and_then(|m| self.prices.get(m))) {
            (Some((u, prompt)), Some(p)) => {
                let prompt = prompt.unwrap_or(0).min(u);
                Some(p.cost_nusd(prompt, u - prompt))
            }
            _ => None,
        };
        let end = match used {
            Some((u, _)) => End::Committed {
                charged: u.min(r.grant.tokens),
                over: u.saturating_sub(r.grant.tokens),
                cost_nusd: cost,
            },
            None => End::Released,
        };
        r.end = Some((end, now_ms));
        let (scopes, rates, held, expires) =
            (r.request.scopes.clone(), r.request.rates.clone(), r.grant.tokens, r.grant.expires_ms);
        for scope in &scopes {
            if let Some(b) = self.budgets.get_mut(scope) {
                b.held = b.held.saturating_sub(held);
                b.roll(now_ms);
                if let End::Committed { charged, cost_nusd, .. } = end {
                    b.charge(charged, now_ms);
                    b.cost_nusd = b.cost_nusd.saturating_add(cost_nusd.unwrap_or(0));
                }
                self.touched.insert(scope.clone());
            }
        }
        // The permit's tokens become what the call really used.
        if let End::Committed { charged, .. } = end {
            for key in &rates {
                if let Some(rate) = self.rates.get_mut(key) {
                    rate.settle(id, charged);
                }
            }
        }
        self.due.remove(&(expires, id.to_owned()));
        self.ended.insert((now_ms, id.to_owned()));
        Ok(end)
    }

    /// Releases the reservations whose lease ran out (a dead runner's), and forgets ended ones
    /// older than [`Self::remember_ms`]. A carve reservation that runs out is settled like a
    /// closed child (its usage charged, its budget closed). Returns the ids it ended.
    pub fn expire(&mut self, now_ms: u64) -> Vec<String> {
        let mut due: Vec<(bool, String)> = self
            .due
            .range(..(now_ms.saturating_add(1), String::new()))
            .filter_map(|(_, id)| {
                let r = self.reservations.get(id)?;
                (r.end.is_none() && r.grant.expires_ms <= now_ms).then(|| (r.child.is_some(), id.clone()))
            })
            .collect();
        // In an order of their own (not the map's, which differs between processes): calls
        // first, then carves, so a carve settles what its child's expired calls left.
        due.sort();
        let due: Vec<String> = due.into_iter().map(|(_, id)| id).collect();
        for id in &due {
            let child = self.reservations.get(id).and_then(|r| r.child.clone());
            let spent =
                child.as_ref().and_then(|c| self.budgets.get(c)).map(|b| b.used.saturating_add(b.held));
            let ended = match spent {
                Some(spent) => self.commit(id, spent, now_ms).is_ok(),
                None => self.end(id, None, now_ms).is_ok(),
            };
            if let Some(c) = child
                && let Some(b) = self.budgets.get_mut(&c)
                && b.closed_ms.is_none()
            {
                b.closed_ms = Some(now_ms);
                self.closed.insert((now_ms, c));
            }
            if ended && let Some(r) = self.reservations.get_mut(id) {
                r.end = Some((End::Expired, now_ms));
            }
        }
        // Forget what is past remembering (by its own times, as the lazy forgetting does).
        let keep = self.remember_ms;
        while let Some((at, id)) = self.ended.first().cloned() {
            if at.saturating_add(keep) > now_ms {
                break;
            }
            self.ended.pop_first();
            // The key may have been forgotten and used again since: only this ending goes.
            if self.reservations.get(&id).and_then(|r| r.end).is_some_and(|(_, end)| end == at) {
                self.reservations.remove(&id);
            }
        }
        while let Some((at, scope)) = self.closed.first().cloned() {
            if at.saturating_add(keep) > now_ms {
                break;
            }
            self.closed.pop_first();
            if self.budgets.get(&scope).is_some_and(|b| b.closed_ms == Some(at)) {
                self.budgets.remove(&scope);
            }
        }
        // Rolling windows may have freed usage: look again at the scopes that reported.
        let rolling: Vec<String> = self
            .budgets
            .iter()
            .filter(|(_, b)| {
                (b.alerted > 0 || b.exhausted) && matches!(b.limit.window, Window::Rolling { .. })
            })
            .map(|(s, _)| s.clone())
            .collect();
        self.touched.extend(rolling);
        due
    }

    /// Budget events since the last call: a warning threshold crossed, a budget exhausted (a
    /// reservation refused for want of tokens), a budget refilled (below its thresholds again
    /// after one of those).
    pub fn alerts(&mut self, now_ms: u64) -> Vec<Alert> {
        let mut out = Vec::new();
        for scope in std::mem::take(&mut self.touched) {
            let Some(b) = self.budgets.get_mut(&scope) else { continue };
            if !b.is_limited() {
                continue;
            }
            b.roll(now_ms);
            let pct = b.percent();
            let level = b.rules.warn_at.iter().copied().filter(|w| u64::from(*w) <= pct).max().unwrap_or(0);
            if b.exhausted && !b.exhausted_reported {
                b.exhausted_reported = true;
                out.push(Alert { kind: AlertKind::Exhausted, scope: scope.clone(), threshold: None });
            }
            if level > b.alerted {
                b.alerted = level;
                out.push(Alert { kind: AlertKind::Warning, scope: scope.clone(), threshold: Some(level) });
            } else if level < b.alerted {
                b.alerted = level;
                b.exhausted = false;
                b.exhausted_reported = false;
                out.push(Alert { kind: AlertKind::Refilled, scope: scope.clone(), threshold: None });
            }
        }
        out
    }

    /// True while the reservation `id` holds tokens.
    pub fn is_open(&self, id: &str) -> bool {
        self.reservations.get(id).is_some_and(|r| r.end.is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000;

    fn req(id: &str, scopes: &[&str], want: u64, min: u64) -> Reserve {
        Reserve {
            id: id.into(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            want,
            min,
            lease_ms: 30_000,
            ..Default::default()
        }
    }

    fn ledger() -> Ledger {
        let mut l = Ledger::new(600_000);
        l.set_limit("task.t", Limit { tokens: 1_000, window: Window::Total }, 0);
        l.set_limit("agent.a", Limit { tokens: 5_000, window: Window::Rolling { ms: HOUR } }, 0);
        l
    }

    #[test]
    fn a_reservation_holds_in_every_scope_and_a_commit_charges_what_was_used() {
        let mut l = ledger();
        let g = l.reserve(req("c1", &["task.t", "agent.a"], 800, 100), 0).unwrap();
        assert_eq!(g.tokens, 800);
        assert_eq!(l.budget("task.t", 0).unwrap().available(), 200);
        assert_eq!(l.budget("agent.a", 0).unwrap().available(), 4_200);
        // Only 200 left in the task: the next call gets that much, at least its minimum.
        assert_eq!(l.reserve(req("c2", &["task.t", "agent.a"], 800, 100), 0).unwrap().tokens, 200);
        assert_eq!(
            l.reserve(req("c3", &["task.t", "agent.a"], 800, 100), 0),
            Err(Refusal::Exhausted { scope: "task.t".into(), available: 0, min: 100 })
        );
        // Used 300 of 800: the rest comes back.
        assert_eq!(
            l.commit("c1", 300, 1).unwrap(),
            End::Committed { charged: 300, over: 0, cost_nusd: None }
        );
        let t = l.budget("task.t", 1).unwrap();
        assert_eq!((t.used, t.held, t.available()), (300, 200, 500));
        // Repeated operations change nothing and answer as the first time.
        assert_eq!(
            l.commit("c1", 999, 2).unwrap(),
            End::Committed { charged: 300, over: 0, cost_nusd: None }
        );
        assert_eq!(l.reserve(req("c2", &["task.t", "agent.a"], 800, 100), 2).unwrap().tokens, 200);
        // An ended reservation's key cannot hold again (a re-run call needs a new key).
        assert!(matches!(
            l.reserve(req("c1", &["task.t", "agent.a"], 800, 100), 2),
            Err(Refusal::Ended(_, "committed"))
        ));
        let _ = g;
        assert_eq!(l.budget("task.t", 2).unwrap().used, 300);
        assert!(matches!(l.release("c1", 2), Err(Refusal::Ended(_, "committed"))));
    }

    #[test]
    fn a_refusal_holds_nothing_anywhere() {
        let mut l = ledger();
        l.set_limit("tenant.x", Limit { tokens: 50, window: Window::Rolling { ms: HOUR } }, 0);
        assert!(matches!(
            l.reserve(req("r", &["agent.a", "tenant.x"], 500, 100), 0),
            Err(Refusal::Exhausted { .. })
        ));
        assert_eq!(l.budget("agent.a", 0).unwrap().held, 0);
        // A scope with no limit anywhere is only counted; a refused reservation creates none.
        assert!(l.budget("tenant.y", 0).is_none());
        let mut r = req("u", &["agent.a", "tenant.y", "tenant.x"], 500, 100);
        r.limits.insert("tenant.y".into(), 10);
        assert!(l.reserve(r, 0).is_err());
        assert!(l.budget("tenant.y", 0).is_none());
        assert_eq!(l.budget("agent.a", 0).unwrap().held, 0);
    }

    #[test]
    fn usage_beyond_the_reservation_is_reported_not_charged() {
        let mut l = ledger();
        l.reserve(req("c", &["task.t"], 100, 100), 0).unwrap();
        assert_eq!(
            l.commit("c", 130, 0).unwrap(),
            End::Committed { charged: 100, over: 30, cost_nusd: None }
        );
        assert_eq!(l.budget("task.t", 0).unwrap().used, 100);
    }

    #[test]
    fn a_lease_that_runs_out_gives_the_tokens_back() {
        let mut l = ledger();
        l.reserve(req("dead-runner", &["task.t"], 900, 1), 0).unwrap();
        assert!(l.expire(29_999).is_empty());
        assert_eq!(l.expire(30_000), ["dead-runner"]);
        assert_eq!(l.budget("task.t", 30_000).unwrap().available(), 1_000);
        assert!(matches!(l.commit("dead-runner", 10, 30_001), Err(Refusal::Ended(_, "expired"))));
        // Forgotten after `remember_ms`.
        l.expire(30_000 + 600_000);
        assert_eq!(
            l.commit("dead-runner", 10, 700_000),
            Err(Refusal::UnknownReservation("dead-runner".into()))
        );
    }

    #[test]
    fn a_rolling_window_frees_usage_once_it_has_passed_and_not_before() {
        let mut l = ledger();
        l.reserve(req("c", &["agent.a"], 5_000, 1), 0).unwrap();
        l.commit("c", 5_000, 0).unwrap();
        assert_eq!(l.budget("agent.a", HOUR - 1).unwrap().available(), 0);
        assert_eq!(l.budget("agent.a", HOUR).unwrap().available(), 0, "not before a whole slice has passed");
        assert_eq!(l.budget("agent.a", HOUR + HOUR / SLICES).unwrap().available(), 5_000);
    }

    #[test]
    fn a_child_budget_is_carved_out_of_its_parent_and_the_rest_refunded() {
        // The parent has 10,000; the child gets 4,000 of them and uses 1,500.
        let mut l = Ledger::new(600_000);
        l.set_limit("task.parent", Limit { tokens: 10_000, window: Window::Total }, 0);
        let carved = l.carve(req("carve:c", &["task.parent"], 4_000, 1), "task.c", 0).unwrap();
        assert_eq!(carved.tokens, 4_000);
        // Repeated (a re-run parent), nothing more is carved.
        assert_eq!(l.carve(req("carve:c", &["task.parent"], 4_000, 1), "task.c", 1).unwrap(), carved);
        assert_eq!(l.budget("task.parent", 0).unwrap().available(), 6_000);
        assert_eq!(l.budget("task.c", 0).unwrap().limit.tokens, 4_000);
        l.reserve(req("c-call", &["task.c"], 4_000, 1), 0).unwrap();
        assert!(matches!(l.reserve(req("c-call2", &["task.c"], 10, 1), 0), Err(Refusal::Exhausted { .. })));
        l.commit("c-call", 1_500, 0).unwrap();
        // The child ends: what it used is charged to the parent, the rest comes back.
        assert!(l.close("task.c", 1).unwrap());
        assert!(!l.close("task.c", 2).unwrap(), "closing again changes nothing");
        let p = l.budget("task.parent", 2).unwrap();
        assert_eq!((p.used, p.held, p.available()), (1_500, 0, 8_500));
        assert!(matches!(l.reserve(req("late", &["task.c"], 10, 1), 3), Err(Refusal::Closed(_))));
        // More than the parent has left cannot be carved.
        assert!(matches!(
            l.carve(req("carve:d", &["task.parent"], 9_000, 1), "task.d", 3),
            Err(Refusal::Exhausted { .. })
        ));
    }

    #[test]
    fn a_carve_whose_lease_runs_out_charges_what_the_child_used() {
        let mut l = Ledger::new(600_000);
        l.set_limit("task.p", Limit { tokens: 1_000, window: Window::Total }, 0);
        l.carve(req("carve:c", &["task.p"], 600, 1), "task.c", 0).unwrap();
        l.reserve(req("x", &["task.c"], 200, 1), 0).unwrap();
        l.commit("x", 200, 0).unwrap();
        assert_eq!(l.expire(30_000), ["carve:c"]);
        let p = l.budget("task.p", 30_000).unwrap();
        assert_eq!((p.used, p.held), (200, 0));
        assert!(l.budget("task.c", 30_000).unwrap().closed_ms.is_some());
    }

    #[test]
    fn scopes_take_their_class_default_follow_its_changes_or_are_only_counted() {
        let mut l = Ledger::new(600_000);
        let hour = Limit { tokens: 100, window: Window::Rolling { ms: HOUR } };
        l.set("agent.*", hour, Rules { policy: Policy::Wait, warn_at: vec![50] }, 0);
        l.reserve(req("a", &["agent.x", "tenant.t", "model.m"], 80, 1), 0).unwrap();
        assert_eq!(l.budget("agent.x", 0).unwrap().limit, hour);
        assert!(!l.budget("tenant.t", 0).unwrap().is_limited());
        l.commit("a", 80, 0).unwrap();
        assert_eq!(l.budget("tenant.t", 0).unwrap().used, 80);
        // The agent's policy is to wait: the refusal says for how long.
        match l.reserve(req("b", &["agent.x"], 50, 50), 1_000) {
            Err(Refusal::Wait { retry_after_ms, .. }) => {
                assert_eq!(retry_after_ms, HOUR + HOUR / SLICES - 1_000);
            }
            other => panic!("expected a wait, got {other:?}"),
        }
        // Raising the default raises every agent that inherits it.
        l.set("agent.*", Limit { tokens: 200, ..hour }, Rules::default(), 2_000);
        assert_eq!(l.reserve(req("b", &["agent.x"], 50, 50), 2_000).unwrap().tokens, 50);
    }

    #[test]
    fn rate_limits_count_requests_and_tokens_in_their_window() {
        let mut l = Ledger::new(600_000);
        l.set_rate("openai/m", Some(2), Some(1_000), 60_000);
        let with_rate = |id: &str, want: u64| Reserve {
            rates: vec!["openai/m".into()],
            ..req(id, &["tenant.t"], want, 10)
        };
        assert_eq!(l.reserve(with_rate("1", 600), 0).unwrap().tokens, 600);
        // Only 400 tokens of the minute are left: the grant is capped there.
        assert_eq!(l.reserve(with_rate("2", 600), 10).unwrap().tokens, 400);
        match l.reserve(with_rate("3", 100), 20) {
            Err(Refusal::RateLimited { retry_after_ms, .. }) => assert_eq!(retry_after_ms, 62_000 - 20),
            other => panic!("expected a rate refusal, got {other:?}"),
        }
        // A commit turns the permit's tokens into what was used; the requests still count.
        l.commit("1", 100, 30).unwrap();
        assert_eq!(l.rate("openai/m", 30).unwrap().tokens(), 500);
        assert!(matches!(l.reserve(with_rate("3", 100), 40), Err(Refusal::RateLimited { .. })));
        assert_eq!(l.reserve(with_rate("3", 100), 62_000).unwrap().tokens, 100);
        // A 429 holds every permit back until its time.
        l.backoff("openai/m", 200_000);
        assert!(matches!(
            l.reserve(with_rate("4", 100), 190_000),
            Err(Refusal::RateLimited { retry_after_ms: 10_000, .. })
        ));
        assert!(l.reserve(with_rate("4", 100), 200_000).is_ok());
    }

    #[test]
    fn commits_are_priced_per_model_in_every_scope() {
        let mut l = Ledger::new(600_000);
        l.set_price("m", Price { input_per_mtok: 0.15, output_per_mtok: 0.60 });
        let r = Reserve { model: Some("m".into()), ..req("c", &["task.t", "agent.a"], 3_000, 1) };
        l.reserve(r, 0).unwrap();
        // 1,000 input tokens at $0.15/M and 2,000 output tokens at $0.60/M: $0.00135.
        match l.commit_priced("c", 3_000, Some(1_000), 0).unwrap() {
            End::Committed { cost_nusd, .. } => assert_eq!(cost_nusd, Some(1_350_000)),
            other => panic!("{other:?}"),
        }
        assert_eq!(l.budget("agent.a", 0).unwrap().cost_nusd, 1_350_000);
    }

    #[test]
    fn thresholds_exhaustion_and_refills_are_reported_once_each() {
        let mut l = Ledger::new(600_000);
        let limit = Limit { tokens: 100, window: Window::Rolling { ms: 60_000 } };
        l.set("agent.a", limit, Rules { policy: Policy::Fail, warn_at: vec![50, 80] }, 0);
        assert!(l.alerts(0).is_empty());
        l.reserve(req("1", &["agent.a"], 60, 1), 0).unwrap();
        l.commit("1", 60, 0).unwrap();
        let kinds =
            |a: Vec<Alert>| a.into_iter().map(|a| (a.kind.op().as_str(), a.threshold)).collect::<Vec<_>>();
        assert_eq!(kinds(l.alerts(0)), [("warning", Some(50))]);
        l.reserve(req("2", &["agent.a"], 40, 1), 0).unwrap();
        l.commit("2", 40, 0).unwrap();
        assert!(l.reserve(req("3", &["agent.a"], 10, 10), 0).is_err());
        assert_eq!(kinds(l.alerts(0)), [("exhausted", None), ("warning", Some(80))]);
        assert!(l.reserve(req("4", &["agent.a"], 10, 10), 0).is_err());
        assert!(l.alerts(0).is_empty(), "reported once");
        l.expire(62_000);
        assert_eq!(kinds(l.alerts(62_000)), [("refilled", None)]);
    }

    #[test]
    fn changing_a_window_does_not_bring_back_usage_that_had_left_the_old_one() {
        let mut l = ledger();
        l.reserve(req("c", &["agent.a"], 5_000, 1), 0).unwrap();
        l.commit("c", 5_000, 0).unwrap();
        // Two hours later, with nothing read in between, the window becomes two hours long.
        l.set_limit(
            "agent.a",
            Limit { tokens: 5_000, window: Window::Rolling { ms: 2 * HOUR } },
            2 * HOUR + 1,
        );
        assert_eq!(l.budget("agent.a", 2 * HOUR + 1).unwrap().used, 0);
    }

    #[test]
    fn an_old_key_is_forgotten_by_its_own_time_not_by_when_expire_ran() {
        let mut l = ledger();
        l.reserve(req("k", &["task.t"], 100, 1), 0).unwrap();
        l.commit("k", 10, 1_000).unwrap();
        // Before `remember_ms` has passed the key is known; after, it is new again, whether or
        // not `expire` ran in between (a replay may not run it at the same moments).
        assert!(matches!(l.reserve(req("k", &["task.t"], 100, 1), 600_999), Err(Refusal::Ended(..))));
        assert_eq!(l.reserve(req("k", &["task.t"], 100, 1), 601_000).unwrap().tokens, 100);
    }

    #[test]
    fn a_snapshot_answers_as_the_ledger_it_was_taken_from() {
        use flotilla_protocol::{WireFormat, codec};
        let mut l = ledger();
        l.set("agent.*", Limit { tokens: 900, window: Window::Rolling { ms: HOUR } }, Rules::default(), 0);
        l.set_rate("openai/m", Some(3), None, 60_000);
        l.set_price("m", Price { input_per_mtok: 1.0, output_per_mtok: 2.0 });
        let r = |id: &str| Reserve {
            rates: vec!["openai/m".into()],
            model: Some("m".into()),
            ..req(id, &["task.t", "agent.b"], 300, 1)
        };
        l.reserve(r("1"), 10).unwrap();
        l.commit_priced("1", 200, Some(50), 20).unwrap();
        l.reserve(r("2"), 30).unwrap();
        let bytes = codec::encode(WireFormat::Msgpack, &l).unwrap();
        let mut copy: Ledger = codec::decode(None, &bytes).unwrap();
        for (id, at) in [("2", 40), ("3", 50), ("4", 60), ("1", 70)] {
            assert_eq!(l.reserve(r(id), at), copy.reserve(r(id), at), "reserve {id}");
        }
        assert_eq!(l.commit_priced("3", 120, Some(20), 80), copy.commit_priced("3", 120, Some(20), 80));
        assert_eq!(l.expire(HOUR), copy.expire(HOUR));
        for s in ["task.t", "agent.b"] {
            assert_eq!(l.budget(s, HOUR), copy.budget(s, HOUR), "{s}");
        }
    }

    #[test]
    fn a_scope_named_twice_is_refused() {
        let mut l = ledger();
        assert_eq!(l.reserve(req("d", &["task.t", "task.t"], 800, 1), 0), Err(Refusal::Invalid));
        assert_eq!(l.budget("task.t", 0).unwrap().held, 0);
    }

    #[test]
    fn a_carve_asked_again_answers_the_first_grant_even_after_it_settled() {
        let mut l = ledger();
        let g = l.carve(req("carve:c", &["task.t"], 400, 1), "task.c", 0).unwrap();
        // A re-run parent asks "all that remains", a different amount: the first carve stands.
        assert_eq!(l.carve(req("carve:c", &["task.t"], 600, 1), "task.c", 1).unwrap(), g);
        l.close("task.c", 2).unwrap();
        assert_eq!(l.carve(req("carve:c", &["task.t"], 600, 1), "task.c", 3).unwrap(), g);
        assert_eq!(l.budget("task.t", 3).unwrap().available(), 1_000, "nothing carved again");
        assert!(matches!(
            l.carve(req("carve:c", &["task.t"], 400, 1), "task.other", 4),
            Err(Refusal::Mismatch(_))
        ));
    }

    #[test]
    fn a_closed_budget_past_remembering_is_forgotten_by_set_too() {
        let mut l = ledger();
        l.close("task.t", 0).unwrap();
        // Whether or not `expire` ran in between, a limit set later starts afresh.
        l.set_limit("task.t", Limit { tokens: 5_000, window: Window::Total }, 600_000);
        let b = l.budget("task.t", 600_000).unwrap();
        assert_eq!((b.limit.tokens, b.closed_ms), (5_000, None));
    }

    #[test]
    fn a_release_before_the_reserve_forbids_the_key() {
        let mut l = ledger();
        assert_eq!(l.release_or_forbid("late", 0), Ok((End::Released, true)));
        assert!(matches!(l.reserve(req("late", &["task.t"], 100, 1), 1), Err(Refusal::Ended(_, "released"))));
        assert_eq!(l.budget("task.t", 1).unwrap().held, 0);
        // An existing reservation is simply released.
        l.reserve(req("r", &["task.t"], 100, 1), 2).unwrap();
        assert_eq!(l.release_or_forbid("r", 3), Ok((End::Released, false)));
        assert_eq!(l.budget("task.t", 3).unwrap().held, 0);
    }

    /// A small deterministic generator, so the random schedules below repeat exactly.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n.max(1)
        }
    }

    #[test]
    fn never_overspent_under_random_interleavings() {
        for seed in 1..=200u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut l = Ledger::new(60_000);
            let scopes = ["task.a", "task.b", "agent.x", "tenant.t"];
            l.set_limit("task.a", Limit { tokens: 2_000, window: Window::Total }, 0);
            l.set_limit("task.b", Limit { tokens: 3_000, window: Window::Total }, 0);
            l.set_limit("agent.x", Limit { tokens: 4_000, window: Window::Rolling { ms: 10_000 } }, 0);
            l.set_limit("tenant.t", Limit { tokens: 6_000, window: Window::Rolling { ms: 60_000 } }, 0);
            let mut now = 0;
            let mut ids: Vec<String> = Vec::new();
            for step in 0..400 {
                now += rng.next(500);
                match rng.next(10) {
                    0..=3 => {
                        let task = scopes[rng.next(2) as usize];
                        let mut s = vec![task, "agent.x"];
                        if rng.next(2) == 0 {
                            s.push("tenant.t");
                        }
                        let want = 1 + rng.next(900);
                        let id = format!("r{step}");
                        let _ = l.reserve(req(&id, &s, want, 1 + rng.next(want)), now);
                        ids.push(id);
                    }
                    4..=6 if !ids.is_empty() => {
                        let id = ids[rng.next(ids.len() as u64) as usize].clone();
                        let _ = l.commit(&id, rng.next(1_000), now);
                    }
                    7 if !ids.is_empty() => {
                        let id = ids[rng.next(ids.len() as u64) as usize].clone();
                        let _ = l.release(&id, now);
                    }
                    8 => {
                        l.expire(now);
                        // The indexes found everything due: nothing open has run out, nothing
                        // ended is kept past remembering.
                        for (id, r) in &l.reservations {
                            assert!(
                                r.end.is_some() || r.grant.expires_ms > now,
                                "seed {seed}: {id} not expired"
                            );
                            assert!(
                                r.end.is_none_or(|(_, at)| at + l.remember_ms > now),
                                "seed {seed}: {id} kept past remembering"
                            );
                        }
                    }
                    _ if !ids.is_empty() => {
                        // A redelivered operation: the same reserve again.
                        let id = ids[rng.next(ids.len() as u64) as usize].clone();
                        let before: Vec<(u64, u64)> = scopes
                            .iter()
                            .map(|s| l.budget(s, now).map_or((0, 0), |b| (b.used, b.held)))
                            .collect();
                        // (Only while the key is remembered: an older one is a new reservation.)
                        let remembered = l
                            .reservations
                            .get(&id)
                            .filter(|r| r.end.is_none_or(|(_, at)| at + l.remember_ms > now))
                            .map(|r| r.request.clone());
                        if let Some(r) = remembered {
                            let open = l.reservations.get(&id).is_some_and(|r| r.end.is_none());
                            assert_eq!(
                                l.reserve(r, now).is_ok(),
                                open,
                                "seed {seed}: open reservations answer again"
                            );
                        }
                        let after: Vec<(u64, u64)> = scopes
                            .iter()
                            .map(|s| l.budget(s, now).map_or((0, 0), |b| (b.used, b.held)))
                            .collect();
                        assert_eq!(before, after, "seed {seed}: a repeated reserve changed the ledger");
                    }
                    _ => {}
                }
                for s in scopes {
                    let b = l.budget(s, now).unwrap();
                    assert!(
                        b.used + b.held <= b.limit.tokens,
                        "seed {seed} step {step}: {s} overspent: used {} + held {} > {}",
                        b.used,
                        b.held,
                        b.limit.tokens
                    );
                }
            }
            // Everything open ends: nothing stays held.
            l.expire(now + 60_000);
            for s in scopes {
                assert_eq!(l.budget(s, now + 60_000).unwrap().held, 0, "seed {seed}: {s} still holds tokens");
            }
        }
    }
}
