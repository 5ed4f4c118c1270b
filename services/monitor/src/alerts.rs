//! Alert rules: evaluated every second by every monitor from what it follows (the leases, the
//! agent registry, the budget ledger, the dead letters), so that whichever holds the `monitor`
//! lease publishes the same alerts — `firing` when a rule starts to hold and `resolved` when it
//! stops, on `<p>.events.alert.<kind>`. Thresholds come from `[monitor.alerts]`.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_protocol::{AlertEvent, Lease, alert_kind};
use serde::{Deserialize, Serialize};

/// Alert thresholds (`[monitor.alerts]`, `FLOTILLA_MONITOR__ALERTS__*`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Thresholds {
    /// No active dispatcher (or budget-keeper) for longer than this: `no_dispatcher`
    /// (`no_budget_keeper`).
    #[serde(with = "humantime_serde")]
    pub no_leader_after: Duration,
    /// Dead letters arrived within this long: `dead_letters` (resolved once none arrived for as
    /// long).
    #[serde(with = "humantime_serde")]
    pub dead_letter_window: Duration,
    /// Whether a budget-keeper is expected (off: no `no_budget_keeper` alert).
    pub expect_budget_keeper: bool,
    /// A durable consumer whose pending count grew over its last four samples (every 5 s) to at
    /// least this: `consumer_lag`.
    pub consumer_lag: u64,
    /// Break each deadlock found by failing its youngest waiting task with `deadlock` (off:
    /// only report it; waits on replies and memory still end at their timeouts).
    pub break_deadlocks: bool,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            no_leader_after: Duration::from_secs(10),
            dead_letter_window: Duration::from_secs(60),
            expect_budget_keeper: true,
            consumer_lag: 100,
            break_deadlocks: true,
        }
    }
}

/// What the rules look at.
#[derive(Debug, Default)]
pub struct Inputs {
    /// The leases by key, as last seen.
    pub leases: BTreeMap<String, Lease>,
    /// When this monitor started watching (a lease never seen counts as missing from then).
    pub started_ms: u64,
    /// Agents in ERROR or in a crash loop now (with a live heartbeat), with what to say of each.
    pub agents_in_error: BTreeMap<String, String>,
    /// Budget scopes exhausted and not refilled since, with when.
    pub exhausted: BTreeMap<String, u64>,
    /// When the latest dead letter arrived, and how many arrived.
    pub last_dead_letter_ms: Option<u64>,
    pub dead_letters: u64,
    /// The last samples (oldest first) of each durable consumer's pending count, by
    /// `<stream>/<consumer>`.
    pub pending: BTreeMap<String, Vec<u64>>,
    /// The deadlocks in the wait-for graph now.
    pub deadlocks: Vec<crate::deadlock::Found>,
}

/// The alerts firing now, by (kind, key), with when each began.
#[derive(Debug, Default)]
pub struct Alerts {
    firing: BTreeMap<(String, String), (u64, String)>,
    /// What each firing deadlock alert is about.
    deadlocks: BTreeMap<String, flotilla_protocol::Deadlock>,
}

impl Alerts {
    /// Evaluates every rule at `now_ms`; returns the alerts that started or stopped.
    pub fn evaluate(&mut self, i: &Inputs, t: &Thresholds, now_ms: u64, monitor: &str) -> Vec<AlertEvent> {
        let mut holds: BTreeMap<(String, String), (u64, String)> = BTreeMap::new();
        let after = u64::try_from(t.no_leader_after.as_millis()).unwrap_or(u64::MAX);
        let mut leaders = vec![(flotilla_protocol::names::lease_key::DISPATCHER, alert_kind::NO_DISPATCHER)];
        if t.expect_budget_keeper {
            leaders.push((flotilla_protocol::names::lease_key::BUDGET_KEEPER, alert_kind::NO_BUDGET_KEEPER));
        }
        for (key, kind) in leaders {
            // Without a live lease since: its expiry, or when this monitor started looking.
            let since = match i.leases.get(key) {
                Some(l) if l.renewed_at_ms.saturating_add(l.ttl_ms) >= now_ms => None,
                Some(l) => Some(l.renewed_at_ms.saturating_add(l.ttl_ms)),
                None => Some(i.started_ms),
            };
            if let Some(since) = since.filter(|s| now_ms.saturating_sub(*s) > after) {
                let what = format!("no active {key} for {} s", now_ms.saturating_sub(since) / 1000);
                holds.insert((kind.to_owned(), key.to_owned()), (since, what));
            }
        }
        for (agent, what) in &i.agents_in_error {
            holds.insert((alert_kind::AGENT_ERROR.to_owned(), agent.clone()), (now_ms, what.clone()));
        }
        for (scope, at) in &i.exhausted {
            let what = format!("budget {scope} is exhausted");
            holds.insert((alert_kind::BUDGET_EXHAUSTED.to_owned(), scope.clone()), (*at, what));
        }
        let window = u64::try_from(t.dead_letter_window.as_millis()).unwrap_or(u64::MAX);
        if let Some(last) = i.last_dead_letter_ms.filter(|l| now_ms.saturating_sub(*l) <= window) {
            let what = format!("dead letters are arriving ({} so far)", i.dead_letters);
            holds.insert((alert_kind::DEAD_LETTERS.to_owned(), "fleet".to_owned()), (last, what));
        }
        for (consumer, samples) in &i.pending {
            let growing = samples.len() >= 4 && samples.windows(2).all(|w| matches!(w, [a, b] if b > a));
            if let Some(last) = samples.last().filter(|l| growing && **l >= t.consumer_lag) {
                let what = format!("consumer {consumer} falls behind: {last} pending and growing");
                holds.insert((alert_kind::CONSUMER_LAG.to_owned(), consumer.clone()), (now_ms, what));
            }
        }
        let mut found = BTreeMap::new();
        for f in &i.deadlocks {
            let mut d = f.deadlock.clone();
            if t.break_deadlocks {
                d.victim.clone_from(&f.youngest);
            }
            // The message stays readable; every wait is in the alert's `deadlock`.
            let mut waits: Vec<&str> = d.waits.iter().take(4).map(String::as_str).collect();
            let more = format!("and {} more waits", d.waits.len().saturating_sub(4));
            if d.waits.len() > 4 {
                waits.push(&more);
            }
            let what = format!(
                "deadlock of {} tasks, {} messages, {} agents: {}",
                d.tasks.len(),
                d.messages.len(),
                d.agents.len(),
                waits.join("; ")
            );
            holds.insert((alert_kind::DEADLOCK.to_owned(), f.key.clone()), (d.formed_at_ms, what));
            found.insert(f.key.clone(), d);
        }
        let mut changes = Vec::new();
        let details = &mut self.deadlocks;
        let mut event = |k: &(String, String), state: &str, since_ms: u64, message: String| {
            let mut ev = alert(k, state, since_ms, message, now_ms, monitor);
            if k.0 == alert_kind::DEADLOCK {
                if state == "firing" {
                    ev.deadlock = found.get(&k.1).cloned();
                    if let Some(d) = &ev.deadlock {
                        details.insert(k.1.clone(), d.clone());
                    }
                } else {
                    ev.deadlock = details.remove(&k.1);
                }
            }
            ev
        };
        for (k, (since, what)) in &holds {
            if !self.firing.contains_key(k) {
                changes.push(event(k, "firing", *since, what.clone()));
            }
        }
        let mut kept = BTreeMap::new();
        for (k, (since, what)) in std::mem::take(&mut self.firing) {
            if holds.contains_key(&k) {
                kept.insert(k, (since, what));
            } else {
                changes.push(event(&k, "resolved", since, format!("resolved: {what}")));
            }
        }
        for (k, v) in holds {
            kept.entry(k).or_insert(v);
        }
        self.firing = kept;
        changes
    }

    /// The alerts firing now, as events.
    pub fn firing(&self, now_ms: u64, monitor: &str) -> Vec<AlertEvent> {
        self.firing
            .iter()
            .map(|(k, (since, what))| {
                let mut ev = alert(k, "firing", *since, what.clone(), now_ms, monitor);
                if k.0 == alert_kind::DEADLOCK {
                    ev.deadlock = self.deadlocks.get(&k.1).cloned();
                }
                ev
            })
            .collect()
    }

    /// How many alerts of every kind fire now (0 for kinds not firing).
    pub fn counts_all(&self) -> BTreeMap<&'static str, i64> {
        let counts = self.counts();
        [
            alert_kind::NO_DISPATCHER,
            alert_kind::NO_BUDGET_KEEPER,
            alert_kind::AGENT_ERROR,
            alert_kind::BUDGET_EXHAUSTED,
            alert_kind::DEAD_LETTERS,
            alert_kind::CONSUMER_LAG,
            alert_kind::DEADLOCK,
        ]
        .into_iter()
        .map(|k| (k, counts.get(k).copied().unwrap_or(0)))
        .collect()
    }

    /// How many alerts of each kind fire now.
    pub fn counts(&self) -> BTreeMap<&str, i64> {
        let mut out = BTreeMap::new();
        for (kind, _) in self.firing.keys() {
            *out.entry(kind.as_str()).or_insert(0) += 1;
        }
        out
    }
}

/// The event of alert `(kind, key)` in `state`.
fn alert(
    (kind, key): &(String, String),
    state: &str,
    since_ms: u64,
    message: String,
    at_ms: u64,
    monitor: &str,
) -> AlertEvent {
    AlertEvent {
        kind: kind.clone(),
        key: key.clone(),
        state: state.to_owned(),
        message,
        since_ms,
        at_ms,
        monitor: monitor.to_owned(),
        deadlock: None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn lease(renewed_at_ms: u64) -> Lease {
        Lease { holder: "d1".into(), epoch: 1, acquired_at_ms: 0, renewed_at_ms, ttl_ms: 3000 }
    }

    #[test]
    fn rules_fire_once_and_resolve_once() {
        let t = Thresholds { no_leader_after: Duration::from_secs(5), ..Thresholds::default() };
        let mut a = Alerts::default();
        let mut i = Inputs { started_ms: 0, ..Inputs::default() };
        i.leases.insert("dispatcher".into(), lease(10_000));
        i.leases.insert("budget-keeper".into(), lease(10_000));
        assert!(a.evaluate(&i, &t, 11_000, "m").is_empty());
        // The dispatcher's lease ran out at 13 s; 5 s later it is an alert, once.
        assert!(a.evaluate(&i, &t, 17_000, "m").iter().all(|e| e.kind != "no_dispatcher"));
        i.leases.insert("budget-keeper".into(), lease(17_000));
        let fired = a.evaluate(&i, &t, 18_500, "m");
        assert_eq!(fired.len(), 1, "{fired:?}");
        assert_eq!(
            (fired[0].kind.as_str(), fired[0].state.as_str(), fired[0].since_ms),
            ("no_dispatcher", "firing", 13_000)
        );
        i.leases.insert("budget-keeper".into(), lease(19_000));
        assert!(a.evaluate(&i, &t, 19_000, "m").is_empty(), "firing is reported once");
        i.leases.insert("dispatcher".into(), lease(20_000));
        i.leases.insert("budget-keeper".into(), lease(20_000));
        let resolved = a.evaluate(&i, &t, 20_000, "m");
        assert_eq!((resolved.len(), resolved[0].state.as_str()), (1, "resolved"));
        // Agents, budgets and dead letters.
        i.agents_in_error.insert("r1-w-0".into(), "agent r1-w-0 is in ERROR".into());
        i.exhausted.insert("tenant.acme".into(), 20_000);
        i.last_dead_letter_ms = Some(19_500);
        i.dead_letters = 1;
        let kinds: Vec<String> = a.evaluate(&i, &t, 20_100, "m").into_iter().map(|e| e.kind).collect();
        assert_eq!(kinds, ["agent_error", "budget_exhausted", "dead_letters"]);
        assert_eq!(a.counts().get("agent_error"), Some(&1));
        i.agents_in_error.clear();
        i.exhausted.clear();
        let later = 19_500 + 61_000;
        for l in ["dispatcher", "budget-keeper"] {
            i.leases.insert(l.into(), lease(later));
        }
        let resolved: Vec<String> = a.evaluate(&i, &t, later, "m").into_iter().map(|e| e.kind).collect();
        assert_eq!(resolved, ["agent_error", "budget_exhausted", "dead_letters"]);
        // A consumer falling behind: four growing samples ending at the threshold or more.
        i.pending.insert("S/c".into(), vec![10, 50, 90, 120]);
        let fired: Vec<String> = a.evaluate(&i, &t, later + 1, "m").into_iter().map(|e| e.kind).collect();
        assert_eq!(fired, ["consumer_lag"]);
        i.pending.insert("S/c".into(), vec![50, 90, 120, 120]);
        let resolved: Vec<String> = a.evaluate(&i, &t, later + 2, "m").into_iter().map(|e| e.state).collect();
        assert_eq!(resolved, ["resolved"]);
    }
}
