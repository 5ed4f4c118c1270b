//! The budget ledger: token budgets, reservations and commits as an IO-free state machine. The
//! budget-keeper feeds it requests (and, on start, the ledger stream to rebuild it); everything
//! it decides follows from the operations it was given and their times, so a replay reaches the
//! same state.
//!
//! A budget is a limit on one scope (a task, an agent, a tenant, a model) over a window: the
//! whole life of the scope, or a rolling period (an agent's hour, a tenant's day). A reservation
//! holds tokens in every scope it names at once, or in none; a commit turns what a call really
//! used into usage and gives the rest back; a release gives everything back; a reservation whose
//! lease runs out is released. At every moment, in every scope, usage in the window plus what is
//! held is at most the limit. Every operation carries an idempotency key: repeating one returns
//! the first answer and changes nothing.

use std::collections::{HashMap, VecDeque};

/// A budget's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// A limit on one scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub tokens: u64,
    pub window: Window,
}

/// One scope's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    pub limit: Limit,
    /// Tokens held by open reservations.
    pub held: u64,
    /// Tokens used in the window (all of them for [`Window::Total`]).
    pub used: u64,
    /// Used tokens per slice start (rolling windows only), oldest first.
    slices: VecDeque<(u64, u64)>,
}

impl Budget {
    fn new(limit: Limit) -> Self {
        Self { limit, held: 0, used: 0, slices: VecDeque::new() }
    }

    /// Tokens that may still be reserved.
    pub fn available(&self) -> u64 {
        self.limit.tokens.saturating_sub(self.used.saturating_add(self.held))
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
}

/// A request to hold tokens for one model call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserve {
    /// Idempotency key.
    pub id: String,
    /// Every scope the call counts against; each must have a budget.
    pub scopes: Vec<String>,
    /// Tokens wanted (the call's upper bound).
    pub want: u64,
    /// Fewest tokens the call can do with; less available is a refusal.
    pub min: u64,
    /// How long the reservation lives unless committed or released.
    pub lease_ms: u64,
}

/// What a granted reservation holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub tokens: u64,
    pub expires_ms: u64,
}

/// Why an operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("budget {scope:?} has {available} tokens left, the call needs at least {min}")]
    Exhausted { scope: String, available: u64, min: u64 },
    #[error("no budget is set for scope {0:?}")]
    UnknownScope(String),
    #[error("no reservation {0:?}")]
    UnknownReservation(String),
    #[error("reservation {0:?} has ended ({1})")]
    Ended(String, &'static str),
    #[error("reservation {0:?} already exists with other scopes or sizes")]
    Mismatch(String),
    #[error("a reservation must name at least one scope and want at least its minimum")]
    Invalid,
}

/// How a reservation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Committed: `charged` tokens became usage; `over` is what the call used beyond its
    /// reservation (not charged: the limit holds; reported so the caller can tighten its bounds).
    Committed {
        charged: u64,
        over: u64,
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

#[derive(Debug, Clone, PartialEq, Eq)]
struct Reservation {
    request: Reserve,
    grant: Grant,
    end: Option<(End, u64)>,
}

/// The ledger. See the module documentation.
#[derive(Debug, Default)]
pub struct Ledger {
    budgets: HashMap<String, Budget>,
    reservations: HashMap<String, Reservation>,
    /// How long an ended reservation is remembered, so a repeated operation still gets its first
    /// answer.
    pub remember_ms: u64,
}

impl Ledger {
    pub fn new(remember_ms: u64) -> Self {
        Self { remember_ms, ..Default::default() }
    }

    /// Sets or changes a scope's limit. Usage and holds stay; a limit below them only stops new
    /// reservations.
    pub fn set_limit(&mut self, scope: &str, limit: Limit, now_ms: u64) {
        let b = self.budgets.entry(scope.to_owned()).or_insert_with(|| Budget::new(limit));
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

    /// A scope's budget as of `now_ms`.
    pub fn budget(&mut self, scope: &str, now_ms: u64) -> Option<&Budget> {
        let b = self.budgets.get_mut(scope)?;
        b.roll(now_ms);
        Some(b)
    }

    /// Every scope with a budget.
    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        self.budgets.keys().map(String::as_str)
    }

    /// Holds tokens in every scope of the request, as many as wanted or as are available in the
    /// tightest scope, at least `min`; or refuses and holds nothing. A repeated request (same id)
    /// gets the first grant while the reservation is open, and [`Refusal::Ended`] after.
    pub fn reserve(&mut self, req: Reserve, now_ms: u64) -> Result<Grant, Refusal> {
        self.forget_if_old(&req.id, now_ms);
        if let Some(r) = self.reservations.get(&req.id) {
            if r.request.scopes != req.scopes || r.request.want != req.want || r.request.min != req.min {
                return Err(Refusal::Mismatch(req.id));
            }
            // An ended reservation holds nothing: its key cannot be used for another call.
            return match r.end {
                None => Ok(r.grant),
                Some((end, _)) => Err(Refusal::Ended(req.id, end.name())),
            };
        }
        if req.scopes.is_empty() || req.want < req.min || req.want == 0 {
            return Err(Refusal::Invalid);
        }
        let mut grant = req.want;
        for scope in &req.scopes {
            let b = self.budgets.get_mut(scope).ok_or_else(|| Refusal::UnknownScope(scope.clone()))?;
            b.roll(now_ms);
            let available = b.available();
            if available < req.min {
                return Err(Refusal::Exhausted { scope: scope.clone(), available, min: req.min });
            }
            grant = grant.min(available);
        }
        for scope in &req.scopes {
            if let Some(b) = self.budgets.get_mut(scope) {
                b.held = b.held.saturating_add(grant);
            }
        }
        let g = Grant { tokens: grant, expires_ms: now_ms.saturating_add(req.lease_ms) };
        self.reservations.insert(req.id.clone(), Reservation { request: req, grant: g, end: None });
        Ok(g)
    }

    /// Turns what the call used into usage in every scope and gives the rest back. A repeated
    /// commit gets the first answer.
    pub fn commit(&mut self, id: &str, used: u64, now_ms: u64) -> Result<End, Refusal> {
        self.end(id, Some(used), now_ms)
    }

    /// Gives everything held back (the call was not made, or failed before using anything).
    pub fn release(&mut self, id: &str, now_ms: u64) -> Result<End, Refusal> {
        self.end(id, None, now_ms)
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

    fn end(&mut self, id: &str, used: Option<u64>, now_ms: u64) -> Result<End, Refusal> {
        self.forget_if_old(id, now_ms);
        let r = self.reservations.get_mut(id).ok_or_else(|| Refusal::UnknownReservation(id.to_owned()))?;
        if let Some((end, _)) = r.end {
            let same = matches!((end, used), (End::Committed { .. }, Some(_)) | (End::Released, None));
            return if same { Ok(end) } else { Err(Refusal::Ended(id.to_owned(), end.name())) };
        }
        let end = match used {
            Some(u) => {
                End::Committed { charged: u.min(r.grant.tokens), over: u.saturating_sub(r.grant.tokens) }
            }
            None => End::Released,
        };
        r.end = Some((end, now_ms));
        let (scopes, held) = (r.request.scopes.clone(), r.grant.tokens);
        for scope in &scopes {
            if let Some(b) = self.budgets.get_mut(scope) {
                b.held = b.held.saturating_sub(held);
                b.roll(now_ms);
                if let End::Committed { charged, .. } = end {
                    b.charge(charged, now_ms);
                }
            }
        }
        Ok(end)
    }

    /// Releases the reservations whose lease ran out (a dead runner's), and forgets ended ones
    /// older than [`Self::remember_ms`]. Returns the ids it released.
    pub fn expire(&mut self, now_ms: u64) -> Vec<String> {
        let due: Vec<String> = self
            .reservations
            .iter()
            .filter(|(_, r)| r.end.is_none() && r.grant.expires_ms <= now_ms)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &due {
            if self.end(id, None, now_ms).is_ok()
                && let Some(r) = self.reservations.get_mut(id)
            {
                r.end = Some((End::Expired, now_ms));
            }
        }
        let keep = self.remember_ms;
        self.reservations.retain(|_, r| r.end.is_none_or(|(_, at)| at.saturating_add(keep) > now_ms));
        due
    }

    /// True while the reservation `id` holds tokens.
    pub fn is_open(&self, id: &str) -> bool {
        self.reservations.get(id).is_some_and(|r| r.end.is_none())
    }

    /// Open reservations.
    pub fn open(&self) -> usize {
        self.reservations.values().filter(|r| r.end.is_none()).count()
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
        assert_eq!(l.commit("c1", 300, 1).unwrap(), End::Committed { charged: 300, over: 0 });
        let t = l.budget("task.t", 1).unwrap();
        assert_eq!((t.used, t.held, t.available()), (300, 200, 500));
        // Repeated operations change nothing and answer as the first time.
        assert_eq!(l.commit("c1", 999, 2).unwrap(), End::Committed { charged: 300, over: 0 });
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
        assert_eq!(
            l.reserve(req("u", &["agent.a", "nobody"], 5, 1), 0),
            Err(Refusal::UnknownScope("nobody".into()))
        );
        assert_eq!(l.budget("agent.a", 0).unwrap().held, 0);
    }

    #[test]
    fn usage_beyond_the_reservation_is_reported_not_charged() {
        let mut l = ledger();
        l.reserve(req("c", &["task.t"], 100, 100), 0).unwrap();
        assert_eq!(l.commit("c", 130, 0).unwrap(), End::Committed { charged: 100, over: 30 });
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
        let carved = l.reserve(req("child:c", &["task.parent"], 4_000, 4_000), 0).unwrap();
        l.set_limit("task.c", Limit { tokens: carved.tokens, window: Window::Total }, 0);
        assert_eq!(l.budget("task.parent", 0).unwrap().available(), 6_000);
        l.reserve(req("c-call", &["task.c"], 4_000, 1), 0).unwrap();
        l.commit("c-call", 1_500, 0).unwrap();
        // The child ends: what it used is charged to the parent, the rest comes back.
        let used = l.budget("task.c", 0).unwrap().used;
        l.commit("child:c", used, 0).unwrap();
        assert_eq!(l.budget("task.parent", 0).unwrap().available(), 8_500);
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
