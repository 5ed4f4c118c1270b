//! Workload-based scaling. The decision is a pure function of what the scheduler sees
//! ([`Autoscaler::decide`]): one more agent of a matching template while a capability stays
//! starved (tasks ready, no free agent) for `scale_up_after`, on the runner with the most room;
//! one fewer when an agent has idled for `scale_down_after` with nothing queued for its
//! capabilities; always within the template's `min_replicas..max_replicas` on that runner, and one
//! step per (runner, template) per `scale_cooldown`. The scheduler sends the steps as
//! `ScaleRequest`s with `autoscale: true` ([`Scheduler::autoscale`]).

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use flotilla_protocol::AgentStatus;
use flotilla_protocol::names::runner_op;

use super::Scheduler;
use crate::runqueue::{Id, Now};

/// When to scale.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// How long a capability must be starved before one more agent is started.
    pub scale_up_after: Duration,
    /// How long an agent must idle before it is stopped.
    pub scale_down_after: Duration,
    /// Least time between two steps of one template on one runner.
    pub cooldown: Duration,
}

/// One live agent, as the autoscaler needs it.
#[derive(Debug, Clone, Copy)]
pub struct AgentView<'a> {
    pub id: &'a str,
    pub runner: &'a str,
    pub template: &'a str,
    pub capabilities: &'a [String],
    /// The template's limits on that runner.
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Alive, and neither draining nor in error: it takes work.
    pub takes_work: bool,
    /// Holds no task.
    pub idle: bool,
}

/// One scaling step: run `replicas` agents of `template` on `runner`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub runner: String,
    pub template: String,
    pub replicas: u32,
    /// `queue_deep` or `idle`.
    pub why: &'static str,
}

/// What the autoscaler remembers between two decisions: since when each capability is starved,
/// each agent idle, and when each (runner, template) was last scaled.
#[derive(Debug)]
pub struct Autoscaler {
    settings: Settings,
    starved_since: HashMap<Id, Instant>,
    idle_since: HashMap<String, Instant>,
    last_step: HashMap<(String, String), Instant>,
}

/// The agents of one template on one runner that take work.
struct Group<'a> {
    active: u32,
    min: u32,
    max: u32,
    capabilities: &'a [String],
    idle_long: bool,
}

impl Autoscaler {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            starved_since: HashMap::new(),
            idle_since: HashMap::new(),
            last_step: HashMap::new(),
        }
    }

    /// The steps due at `now`, given the capabilities that are starved now, every registered
    /// agent, and which capabilities have tasks queued (or backing off).
    pub fn decide<'a>(
        &mut self,
        now: Instant,
        starved: &[Id],
        agents: impl IntoIterator<Item = AgentView<'a>>,
        has_queued: impl Fn(&str) -> bool,
    ) -> Vec<Step> {
        let s = self.settings;
        self.starved_since.retain(|c, _| starved.contains(c));
        for c in starved {
            self.starved_since.entry(c.clone()).or_insert(now);
        }
        let mut seen: HashSet<&str> = HashSet::new();
        let mut groups: HashMap<(&'a str, &'a str), Group<'a>> = HashMap::new();
        for a in agents {
            seen.insert(a.id);
            if !a.takes_work {
                self.idle_since.remove(a.id);
                continue;
            }
            let idle_long = if a.idle {
                let since = *self.idle_since.entry(a.id.to_owned()).or_insert(now);
                now.saturating_duration_since(since) >= s.scale_down_after
            } else {
                self.idle_since.remove(a.id);
                false
            };
            let g = groups.entry((a.runner, a.template)).or_insert(Group {
                active: 0,
                min: a.min_replicas,
                max: a.max_replicas,
                capabilities: a.capabilities,
                idle_long: false,
            });
            g.active += 1;
            g.idle_long |= idle_long;
        }
        self.idle_since.retain(|id, _| seen.contains(id.as_str()));
        let last_step = &self.last_step;
        let cooled = |key: &(&str, &str)| {
            last_step
                .get(&(key.0.to_owned(), key.1.to_owned()))
                .is_none_or(|t| now.saturating_duration_since(*t) >= s.cooldown)
        };
        let mut steps: Vec<((&'a str, &'a str), u32, &'static str)> = Vec::new();
        let due: Vec<Id> = self
            .starved_since
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= s.scale_up_after)
            .map(|(c, _)| c.clone())
            .collect();
        for cap in due {
            let best = groups
                .iter()
                .filter(|(k, g)| g.active < g.max && g.capabilities.iter().any(|c| **c == *cap) && cooled(k))
                .max_by_key(|(k, g)| (g.max - g.active, Reverse(**k)))
                .map(|(k, g)| (*k, g.active + 1));
            if let Some((key, replicas)) = best {
                if let Some(g) = groups.get_mut(&key) {
                    g.active = replicas;
                }
                // Starved again from now: the next step waits for the new agent to make a
                // difference.
                self.starved_since.insert(cap, now);
                steps.push((key, replicas, "queue_deep"));
            }
        }
        for (key, g) in &groups {
            if g.idle_long
                && g.active > g.min
                && cooled(key)
                && !steps.iter().any(|(k, _, _)| k == key)
                && !g.capabilities.iter().any(|c| has_queued(c))
            {
                steps.push((*key, g.active - 1, "idle"));
            }
        }
        steps
            .into_iter()
            .map(|((runner, template), replicas, why)| {
                self.last_step.insert((runner.to_owned(), template.to_owned()), now);
                Step { runner: runner.to_owned(), template: template.to_owned(), replicas, why }
            })
            .collect()
    }
}

impl Scheduler {
    /// Decides the scaling steps due now and sends them to the runners.
    pub(super) fn autoscale(&mut self, now: Instant) {
        let starved = self.queue.starved_capabilities(Now::current());
        let queue = &self.queue;
        let agents = self.agents.iter().map(|(id, a)| AgentView {
            id,
            runner: &a.runner_id,
            template: &a.template,
            capabilities: &a.capabilities,
            min_replicas: a.min_replicas,
            max_replicas: a.max_replicas,
            takes_work: queue.agent_alive(id, now) == Some(true)
                && !matches!(a.status, AgentStatus::Draining | AgentStatus::Error),
            idle: queue.held(id) == 0,
        });
        for step in self.autoscaler.decide(now, &starved, agents, |c| queue.has_queued(c)) {
            send(&self.fleet, step);
        }
    }
}

/// Sends a step to its runner, without waiting: the registry shows the result, and scheduling goes
/// on meanwhile.
fn send(fleet: &flotilla_service::Fleet, step: Step) {
    tracing::info!(runner = %step.runner, template = %step.template, replicas = step.replicas, why = step.why, "autoscaling");
    let subject = fleet.names.runner_control(&step.runner, runner_op::SCALE);
    let req =
        flotilla_protocol::ScaleRequest { template: step.template, replicas: step.replicas, autoscale: true };
    let fleet = fleet.clone();
    let runner = step.runner;
    tokio::spawn(async move {
        let body = match fleet.encode(&req) {
            Ok(b) => b,
            Err(e) => return tracing::warn!(error = %e, "failed to encode a scale request"),
        };
        match tokio::time::timeout(Duration::from_secs(5), fleet.client.request(subject, body)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(%runner, error = %e, "scale request failed"),
            Err(_) => tracing::warn!(%runner, "scale request timed out"),
        }
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

    use super::*;

    const SETTINGS: Settings = Settings {
        scale_up_after: Duration::from_secs(2),
        scale_down_after: Duration::from_secs(60),
        cooldown: Duration::from_secs(2),
    };

    struct Fleet {
        /// (id, runner, min, max, idle)
        agents: Vec<(String, String, u32, u32, bool)>,
        caps: Vec<String>,
    }

    impl Fleet {
        fn new(agents: &[(&str, &str, u32, u32, bool)]) -> Self {
            let agents = agents
                .iter()
                .map(|(i, r, lo, hi, idle)| ((*i).into(), (*r).into(), *lo, *hi, *idle))
                .collect();
            Self { agents, caps: vec!["work".into()] }
        }

        fn views(&self) -> Vec<AgentView<'_>> {
            self.agents
                .iter()
                .map(|(id, runner, min, max, idle)| AgentView {
                    id,
                    runner,
                    template: "worker",
                    capabilities: &self.caps,
                    min_replicas: *min,
                    max_replicas: *max,
                    takes_work: true,
                    idle: *idle,
                })
                .collect()
        }
    }

    fn starved() -> Vec<Id> {
        vec![Id::from("work")]
    }

    fn step(runner: &str, replicas: u32, why: &'static str) -> Step {
        Step { runner: runner.into(), template: "worker".into(), replicas, why }
    }

    #[test]
    fn a_starved_capability_gets_one_more_agent_on_the_runner_with_most_room() {
        let mut a = Autoscaler::new(SETTINGS);
        let fleet = Fleet::new(&[("a1", "r1", 1, 3, false), ("b1", "r2", 1, 5, false)]);
        let t0 = Instant::now();
        assert!(a.decide(t0, &starved(), fleet.views(), |_| true).is_empty(), "not starved for long yet");
        assert!(a.decide(t0 + Duration::from_secs(1), &starved(), fleet.views(), |_| true).is_empty());
        let steps = a.decide(t0 + Duration::from_secs(2), &starved(), fleet.views(), |_| true);
        assert_eq!(steps, [step("r2", 2, "queue_deep")]);
        // The clock of the starvation starts again: no second step at once.
        assert!(a.decide(t0 + Duration::from_secs(3), &starved(), fleet.views(), |_| true).is_empty());
    }

    #[test]
    fn starvation_that_ends_resets_its_clock() {
        let mut a = Autoscaler::new(SETTINGS);
        let fleet = Fleet::new(&[("a1", "r1", 1, 3, false)]);
        let t0 = Instant::now();
        a.decide(t0, &starved(), fleet.views(), |_| true);
        a.decide(t0 + Duration::from_secs(1), &[], fleet.views(), |_| true);
        assert!(a.decide(t0 + Duration::from_secs(2), &starved(), fleet.views(), |_| true).is_empty());
        let steps = a.decide(t0 + Duration::from_secs(4), &starved(), fleet.views(), |_| true);
        assert_eq!(steps, [step("r1", 2, "queue_deep")]);
    }

    #[test]
    fn never_above_the_maximum_and_one_step_per_cooldown() {
        let mut a = Autoscaler::new(Settings { scale_up_after: Duration::ZERO, ..SETTINGS });
        let full = Fleet::new(&[("a1", "r1", 1, 2, false), ("a2", "r1", 1, 2, false)]);
        let t0 = Instant::now();
        assert!(a.decide(t0, &starved(), full.views(), |_| true).is_empty(), "r1 is at its maximum");
        let room = Fleet::new(&[("a1", "r1", 1, 3, false)]);
        assert_eq!(a.decide(t0, &starved(), room.views(), |_| true), [step("r1", 2, "queue_deep")]);
        let grown = Fleet::new(&[("a1", "r1", 1, 3, false), ("a2", "r1", 1, 3, false)]);
        assert!(
            a.decide(t0 + Duration::from_secs(1), &starved(), grown.views(), |_| true).is_empty(),
            "cooling down"
        );
        assert_eq!(
            a.decide(t0 + Duration::from_secs(2), &starved(), grown.views(), |_| true),
            [step("r1", 3, "queue_deep")]
        );
    }

    #[test]
    fn an_agent_idle_for_long_with_nothing_queued_is_scaled_away_but_not_below_the_minimum() {
        let mut a = Autoscaler::new(SETTINGS);
        let fleet = Fleet::new(&[("a1", "r1", 1, 3, true), ("a2", "r1", 1, 3, true)]);
        let t0 = Instant::now();
        assert!(a.decide(t0, &[], fleet.views(), |_| false).is_empty());
        let later = t0 + Duration::from_secs(60);
        assert!(a.decide(later, &[], fleet.views(), |_| true).is_empty(), "its capability has queued tasks");
        assert_eq!(a.decide(later, &[], fleet.views(), |_| false), [step("r1", 1, "idle")]);
        let one = Fleet::new(&[("a1", "r1", 1, 3, true)]);
        assert!(
            a.decide(later + Duration::from_secs(10), &[], one.views(), |_| false).is_empty(),
            "at the minimum"
        );
    }

    #[test]
    fn a_busy_or_unusable_agent_is_not_idle() {
        let mut a = Autoscaler::new(SETTINGS);
        let t0 = Instant::now();
        let busy = Fleet::new(&[("a1", "r1", 0, 3, false), ("a2", "r1", 0, 3, true)]);
        a.decide(t0, &[], busy.views(), |_| false);
        // a1 becomes idle only now: its idle time starts now, a2's when it was first seen.
        let idle = Fleet::new(&[("a1", "r1", 0, 3, true), ("a2", "r1", 0, 3, true)]);
        let steps = a.decide(t0 + Duration::from_secs(60), &[], idle.views(), |_| false);
        assert_eq!(steps, [step("r1", 1, "idle")], "one step for the group, from 2 to 1");
        let mut draining = busy.views();
        for v in &mut draining {
            v.takes_work = false;
        }
        let mut b = Autoscaler::new(SETTINGS);
        b.decide(t0, &[], draining.clone(), |_| false);
        assert!(b.decide(t0 + Duration::from_secs(120), &[], draining, |_| false).is_empty());
    }
}
