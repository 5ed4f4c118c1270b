//! The wait-for graph and its deadlocks: built from the task, message and wait events and the
//! agent registry, it says which work can still make progress, and names the cycles and knots of
//! work that cannot.
//!
//! Work is a task or the handling of a direct message. Work is either *running* on an agent
//! (holding one of its slots) or *queued* for a slot of the agents that may take it (a capability,
//! a template, one agent). Running work waits (`<p>.events.wait.*`) on a sub-task, on the reply to
//! a message, on a memory change or on a human; every wait must end before it goes on (AND).
//! Queued work goes on once any of its agents has a free slot, or once any work holding one of
//! their slots goes on (OR). Progress is the least fixed point of those rules, from what surely
//! goes on: running work that waits on nothing, or on something outside the graph (a memory key,
//! a human, work not seen yet), work on a dead agent (it is requeued), and queued work that some
//! agent could take now or that no live agent could take at all (the fleet may still grow).
//! Whatever is left cannot go on: a deadlock. Its core (the strongly connected part, a cycle or
//! a knot) is what is reported, with the youngest waiting task in it as the one to fail.
//!
//! Every change that ends a wait is stored before the work it frees does anything (a runner
//! stores `resumed` before its tool returns, a child's final event before its parent reads it,
//! an answer's `answered` after the reply), so the graph, read in stream order, never holds a
//! wait that a later event depends on having ended: no false report from an edge that a race
//! has already cut.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use flotilla_protocol::names::event_kind;
use flotilla_protocol::{
    AgentRecord, AgentStatus, Deadlock, MessageEvent, TaskEvent, WaitEvent, message_event, wait_kind,
};

/// Finished work remembered, so that late events about it do not bring it back.
const FINISHED_KEPT: usize = 200_000;

/// Who may take queued work.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Need {
    Capability(String),
    Template(String),
    Agent(String),
}

impl std::fmt::Display for Need {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Capability(c) => write!(f, "capability {c}"),
            Self::Template(t) => write!(f, "template {t}"),
            Self::Agent(a) => write!(f, "agent {a}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Place {
    Queued(Need),
    Running(String),
}

#[derive(Debug, Clone)]
struct Item {
    place: Place,
    since_ms: u64,
    /// A task's capability (queued again at a requeue).
    capability: Option<String>,
}

#[derive(Debug, Clone)]
struct Wait {
    item: String,
    /// The awaited work (`task:<id>`, `message:<id>`), or none when the wait is on something
    /// outside the graph (memory, a human).
    target: Option<String>,
    since_ms: u64,
    on: String,
}

#[derive(Debug, Clone)]
struct Agent {
    runner_id: String,
    incarnation: String,
    template: String,
    capabilities: Vec<String>,
    concurrency: u32,
    status: AgentStatus,
    heartbeat_at_ms: u64,
    heartbeat_interval_ms: u64,
}

impl Agent {
    fn live(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.heartbeat_at_ms) <= self.heartbeat_interval_ms.saturating_mul(3) + 500
    }

    /// Whether it takes new work at all.
    fn takes_work(&self, now_ms: u64) -> bool {
        self.live(now_ms) && !matches!(self.status, AgentStatus::Error | AgentStatus::Draining)
    }

    fn serves(&self, id: &str, need: &Need) -> bool {
        match need {
            Need::Capability(c) => self.capabilities.iter().any(|x| x == c),
            Need::Template(t) => &self.template == t,
            Need::Agent(a) => a == id,
        }
    }
}

/// A deadlock found, before the alert rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Stable while the same work is in it.
    pub key: String,
    pub deadlock: Deadlock,
    /// The youngest waiting task in it, if any task waits in it.
    pub youngest: Option<String>,
}

/// The wait-for graph (see the module's documentation).
#[derive(Debug, Default)]
pub struct Graph {
    agents: HashMap<String, Agent>,
    items: HashMap<String, Item>,
    waits: HashMap<String, Wait>,
    /// Wait ids by waiting work and by awaited work.
    waits_of: HashMap<String, HashSet<String>>,
    waits_on: HashMap<String, HashSet<String>>,
    finished: HashSet<String>,
    finished_order: VecDeque<String>,
    /// Messages taken by an agent before their `sent` event was folded (different publishers).
    early: HashMap<String, (String, u64)>,
}

fn task_node(id: &str) -> String {
    format!("task:{id}")
}

fn message_node(id: &str) -> String {
    format!("message:{id}")
}

impl Graph {
    /// Folds a task event.
    pub fn task_event(&mut self, ev: &TaskEvent) {
        let node = task_node(&ev.task_id);
        if self.finished.contains(&node) {
            return;
        }
        match ev.kind.as_str() {
            event_kind::ACCEPTED => {
                let Some(cap) = ev.capability.clone() else { return };
                self.items.entry(node).or_insert(Item {
                    place: Place::Queued(Need::Capability(cap.clone())),
                    since_ms: ev.at_ms,
                    capability: Some(cap),
                });
            }
            event_kind::ASSIGNED | event_kind::STARTED => {
                let Some(agent) = ev.agent_id.clone() else { return };
                let capability = ev
                    .capability
                    .clone()
                    .or_else(|| self.items.get(&node).and_then(|i| i.capability.clone()));
                let item = self.items.entry(node).or_insert(Item {
                    place: Place::Running(agent.clone()),
                    since_ms: ev.at_ms,
                    capability: capability.clone(),
                });
                if item.place != Place::Running(agent.clone()) {
                    item.place = Place::Running(agent);
                    item.since_ms = ev.at_ms;
                }
                if item.capability.is_none() {
                    item.capability = capability;
                }
            }
            event_kind::REQUEUED | event_kind::RETRYING => {
                let cap = ev
                    .capability
                    .clone()
                    .or_else(|| self.items.get(&node).and_then(|i| i.capability.clone()));
                let Some(cap) = cap else { return };
                // Its waits ended with the attempt that made them.
                self.drop_waits_of(&node);
                self.items.insert(
                    node,
                    Item {
                        place: Place::Queued(Need::Capability(cap.clone())),
                        since_ms: ev.at_ms,
                        capability: Some(cap),
                    },
                );
            }
            event_kind::COMPLETED | event_kind::FAILED | event_kind::REJECTED => self.finish(node),
            _ => {}
        }
    }

    /// Folds a direct-message event.
    pub fn message_event(&mut self, ev: &MessageEvent) {
        let node = message_node(&ev.message_id);
        if self.finished.contains(&node) {
            return;
        }
        match ev.kind.as_str() {
            // A reply goes to the wait for it, not to a slot: it is not work.
            message_event::SENT if ev.in_reply_to.is_none() => {
                let need = match ev.to.split_once(':') {
                    Some(("agent", a)) => Need::Agent(a.to_owned()),
                    Some(("template", t)) => Need::Template(t.to_owned()),
                    Some(("capability", c)) => Need::Capability(c.to_owned()),
                    // Broadcasts and clients: not one slot's work.
                    _ => return,
                };
                let place = match self.early.remove(&ev.message_id) {
                    Some((agent, _)) => Place::Running(agent),
                    None => Place::Queued(need),
                };
                self.items.entry(node).or_insert(Item { place, since_ms: ev.at_ms, capability: None });
            }
            message_event::DELIVERED => {
                let Some(agent) = ev.agent_id.clone() else { return };
                match self.items.get_mut(&node) {
                    Some(item) => {
                        item.place = Place::Running(agent);
                        item.since_ms = ev.at_ms;
                    }
                    None => {
                        self.early.insert(ev.message_id.clone(), (agent, ev.at_ms));
                    }
                }
            }
            message_event::ANSWERED | message_event::EXPIRED | message_event::REFUSED => {
                self.early.remove(&ev.message_id);
                self.finish(node);
            }
            _ => {}
        }
    }

    /// Folds a wait event.
    pub fn wait_event(&mut self, ev: &WaitEvent) {
        if ev.kind == wait_kind::RESUMED {
            self.drop_wait(&ev.wait_id);
            return;
        }
        if ev.kind != wait_kind::WAITING {
            return;
        }
        let item = match (&ev.task_id, &ev.message_id) {
            (_, Some(m)) => message_node(m),
            (Some(t), None) => task_node(t),
            (None, None) => return,
        };
        if self.finished.contains(&item) {
            return;
        }
        let target = match ev.on.as_str() {
            wait_kind::ON_TASK => Some(task_node(&ev.target)),
            wait_kind::ON_REPLY => Some(message_node(&ev.target)),
            _ => None,
        };
        // Awaited work that has ended already: the wait is over as it begins.
        if target.as_ref().is_some_and(|t| self.finished.contains(t)) {
            return;
        }
        // A wait shows where its work runs, should that event not be folded yet.
        let running = Place::Running(ev.agent_id.clone());
        let entry = self.items.entry(item.clone()).or_insert(Item {
            place: running.clone(),
            since_ms: ev.at_ms,
            capability: None,
        });
        if entry.place != running {
            entry.place = running;
        }
        if let Some(t) = &target {
            self.waits_on.entry(t.clone()).or_default().insert(ev.wait_id.clone());
        }
        self.waits_of.entry(item.clone()).or_default().insert(ev.wait_id.clone());
        self.waits.insert(ev.wait_id.clone(), Wait { item, target, since_ms: ev.at_ms, on: ev.on.clone() });
    }

    /// An agent's record, as the registry holds it now.
    pub fn agent(&mut self, rec: &AgentRecord) {
        self.agents.insert(
            rec.agent_id.clone(),
            Agent {
                runner_id: rec.runner_id.clone(),
                incarnation: rec.incarnation.clone(),
                template: rec.name.clone(),
                capabilities: rec.capabilities.clone(),
                concurrency: rec.concurrency.max(1),
                status: rec.status,
                heartbeat_at_ms: rec.heartbeat_at_ms,
                heartbeat_interval_ms: rec.heartbeat_interval_ms,
            },
        );
    }

    /// A runner's heartbeat: the agents its incarnation registered are seen alive with it.
    pub fn runner(&mut self, rec: &flotilla_protocol::RunnerRecord) {
        for a in self.agents.values_mut() {
            if a.runner_id == rec.runner_id && !a.incarnation.is_empty() && a.incarnation == rec.incarnation {
                a.heartbeat_at_ms = a.heartbeat_at_ms.max(rec.heartbeat_at_ms);
                a.heartbeat_interval_ms = rec.heartbeat_interval_ms;
            }
        }
    }

    /// An agent left the registry.
    pub fn agent_gone(&mut self, agent_id: &str) {
        self.agents.remove(agent_id);
    }

    /// How many waits are open, by what they are on.
    pub fn open_waits(&self) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        for w in self.waits.values() {
            *out.entry(w.on.clone()).or_insert(0) += 1;
        }
        out
    }

    /// [`Self::open_waits`] with 0 for every kind of wait not open.
    pub fn open_waits_all(&self) -> Vec<(String, i64)> {
        let open = self.open_waits();
        [wait_kind::ON_TASK, wait_kind::ON_REPLY, wait_kind::ON_MEMORY, wait_kind::ON_APPROVAL]
            .into_iter()
            .map(|k| (k.to_owned(), open.get(k).copied().unwrap_or(0)))
            .collect()
    }

    fn finish(&mut self, node: String) {
        self.items.remove(&node);
        self.drop_waits_of(&node);
        // Waits on it are over.
        if let Some(ids) = self.waits_on.remove(&node) {
            for id in ids {
                self.drop_wait(&id);
            }
        }
        if self.finished.insert(node.clone()) {
            self.finished_order.push_back(node);
            while self.finished_order.len() > FINISHED_KEPT {
                if let Some(old) = self.finished_order.pop_front() {
                    self.finished.remove(&old);
                }
            }
        }
    }

    fn drop_waits_of(&mut self, node: &str) {
        if let Some(ids) = self.waits_of.remove(node) {
            for id in ids {
                self.drop_wait(&id);
            }
        }
    }

    fn drop_wait(&mut self, id: &str) {
        let Some(w) = self.waits.remove(id) else { return };
        if let Some(set) = self.waits_of.get_mut(&w.item) {
            set.remove(id);
            if set.is_empty() {
                self.waits_of.remove(&w.item);
            }
        }
        if let Some(t) = &w.target
            && let Some(set) = self.waits_on.get_mut(t)
        {
            set.remove(id);
            if set.is_empty() {
                self.waits_on.remove(t);
            }
        }
    }

    /// The deadlocks at `now_ms`: every core of work that cannot go on.
    pub fn find(&mut self, now_ms: u64) -> Vec<Found> {
        self.early.retain(|_, (_, at)| now_ms.saturating_sub(*at) < 120_000);
        if self.waits.is_empty() {
            return Vec::new();
        }
        // Work running on each agent.
        let mut on_agent: HashMap<&str, Vec<&str>> = HashMap::new();
        for (id, item) in &self.items {
            if let Place::Running(a) = &item.place {
                on_agent.entry(a.as_str()).or_default().push(id.as_str());
            }
        }
        // The agents that may take each need, and whether one has a free slot.
        let mut needs: HashMap<&Need, (Vec<&str>, bool)> = HashMap::new();
        for item in self.items.values() {
            let Place::Queued(need) = &item.place else { continue };
            needs.entry(need).or_insert_with(|| {
                let agents: Vec<&str> = self
                    .agents
                    .iter()
                    .filter(|(id, a)| a.takes_work(now_ms) && a.serves(id, need))
                    .map(|(id, _)| id.as_str())
                    .collect();
                let free = agents.iter().any(|a| {
                    let busy = on_agent.get(a).map_or(0, Vec::len);
                    let cap = self.agents.get(*a).map_or(1, |x| x.concurrency as usize);
                    busy < cap
                });
                (agents, free)
            });
        }
        let mut progress: HashSet<&str> = HashSet::new();
        let mut need_done: HashSet<&Need> = HashSet::new();
        let mut work: Vec<&str> = Vec::new();
        // What each running item still waits on (distinct awaited work in the graph).
        let mut remaining: HashMap<&str, usize> = HashMap::new();
        let mut awaited_by: HashMap<&str, Vec<&str>> = HashMap::new();
        for (id, item) in &self.items {
            let goes_on = match &item.place {
                Place::Running(a) => {
                    if !self.agents.get(a).is_some_and(|x| x.live(now_ms)) {
                        true
                    } else {
                        let mut targets: BTreeSet<&str> = BTreeSet::new();
                        let mut outside = false;
                        for wid in self.waits_of.get(id).into_iter().flatten() {
                            let Some(w) = self.waits.get(wid) else { continue };
                            match &w.target {
                                Some(t) if self.items.contains_key(t) && t != id => {
                                    targets.insert(t.as_str());
                                }
                                _ => outside = true,
                            }
                        }
                        if outside || targets.is_empty() {
                            true
                        } else {
                            remaining.insert(id.as_str(), targets.len());
                            for t in targets {
                                awaited_by.entry(t).or_default().push(id.as_str());
                            }
                            false
                        }
                    }
                }
                Place::Queued(need) => {
                    needs.get(need).is_none_or(|(agents, free)| agents.is_empty() || *free)
                }
            };
            if goes_on && progress.insert(id.as_str()) {
                work.push(id.as_str());
            }
        }
        let queued_by_need = {
            let mut m: HashMap<&Need, Vec<&str>> = HashMap::new();
            for (id, item) in &self.items {
                if let Place::Queued(need) = &item.place {
                    m.entry(need).or_default().push(id.as_str());
                }
            }
            m
        };
        while let Some(x) = work.pop() {
            for &w in awaited_by.get(x).into_iter().flatten() {
                if let Some(n) = remaining.get_mut(w) {
                    *n = n.saturating_sub(1);
                    if *n == 0 && progress.insert(w) {
                        work.push(w);
                    }
                }
            }
            let Some(Place::Running(agent)) = self.items.get(x).map(|i| &i.place) else { continue };
            for (need, (agents, _)) in &needs {
                if need_done.contains(need) || !agents.contains(&agent.as_str()) {
                    continue;
                }
                need_done.insert(need);
                for &q in queued_by_need.get(need).into_iter().flatten() {
                    if progress.insert(q) {
                        work.push(q);
                    }
                }
            }
        }
        if progress.len() == self.items.len() {
            return Vec::new();
        }
        // The stuck work and its edges (to stuck work only).
        let stuck: BTreeSet<&str> =
            self.items.keys().map(String::as_str).filter(|id| !progress.contains(id)).collect();
        let mut edges: BTreeMap<&str, Vec<(&str, String)>> = BTreeMap::new();
        for &id in &stuck {
            let Some(item) = self.items.get(id) else { continue };
            let out = edges.entry(id).or_default();
            match &item.place {
                Place::Running(_) => {
                    for wid in self.waits_of.get(id).into_iter().flatten() {
                        if let Some(w) = self.waits.get(wid)
                            && let Some(t) = w.target.as_deref().filter(|t| stuck.contains(t))
                        {
                            out.push((t, format!("{id} waits for {t}")));
                        }
                    }
                }
                Place::Queued(need) => {
                    for a in needs.get(need).map(|(a, _)| a.as_slice()).unwrap_or_default() {
                        for &holder in on_agent.get(a).into_iter().flatten() {
                            if stuck.contains(holder) {
                                out.push((
                                    holder,
                                    format!("{id} is queued for {need}, whose agent {a} {holder} holds"),
                                ));
                            }
                        }
                    }
                }
            }
            out.sort();
            out.dedup();
        }
        let mut found = Vec::new();
        for core in strongly_connected(&stuck, &edges) {
            let in_core: BTreeSet<&str> = core.iter().copied().collect();
            let mut d = Deadlock::default();
            let mut agents = BTreeSet::new();
            let mut youngest: Option<(u64, &str)> = None;
            for &id in &core {
                let Some(item) = self.items.get(id) else { continue };
                d.formed_at_ms = d.formed_at_ms.max(item.since_ms);
                if let Place::Running(a) = &item.place {
                    agents.insert(a.clone());
                }
                if let Some(t) = id.strip_prefix("task:") {
                    d.tasks.push(t.to_owned());
                } else if let Some(m) = id.strip_prefix("message:") {
                    d.messages.push(m.to_owned());
                }
                for wid in self.waits_of.get(id).into_iter().flatten() {
                    let Some(w) = self.waits.get(wid) else { continue };
                    if w.target.as_deref().is_some_and(|t| in_core.contains(t)) {
                        d.formed_at_ms = d.formed_at_ms.max(w.since_ms);
                        if id.starts_with("task:") && youngest.is_none_or(|(at, _)| w.since_ms >= at) {
                            youngest = Some((w.since_ms, id));
                        }
                    }
                }
                for (to, what) in edges.get(id).into_iter().flatten() {
                    if in_core.contains(to) {
                        d.waits.push(what.clone());
                    }
                }
            }
            d.agents = agents.into_iter().collect();
            let key = core_key(&core);
            found.push(Found {
                key,
                youngest: youngest.and_then(|(_, id)| id.strip_prefix("task:")).map(str::to_owned),
                deadlock: d,
            });
        }
        found
    }
}

/// A short key for a core: a hash of its members (sorted).
fn core_key(core: &[&str]) -> String {
    // FNV-1a, 64 bits: stable across processes (monitors agree on the key).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for id in core {
        for b in id.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// The strongly connected components of more than one node, or of one node with an edge to
/// itself (Tarjan's algorithm, iterative), each sorted.
fn strongly_connected<'a>(
    nodes: &BTreeSet<&'a str>,
    edges: &BTreeMap<&'a str, Vec<(&'a str, String)>>,
) -> Vec<Vec<&'a str>> {
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut low: HashMap<&str, usize> = HashMap::new();
    let mut on_stack: HashSet<&str> = HashSet::new();
    let mut stack: Vec<&str> = Vec::new();
    let mut next = 0usize;
    let mut out = Vec::new();
    let succ = |n: &str| -> Vec<&'a str> {
        edges.get(n).map(|v| v.iter().map(|(t, _)| *t).collect()).unwrap_or_default()
    };
    for &root in nodes {
        if index.contains_key(root) {
            continue;
        }
        // (node, successors, position in them)
        let mut call: Vec<(&'a str, Vec<&'a str>, usize)> = vec![(root, succ(root), 0)];
        index.insert(root, next);
        low.insert(root, next);
        next += 1;
        stack.push(root);
        on_stack.insert(root);
        while let Some((v, succs, pos)) = call.last_mut() {
            let v = *v;
            if let Some(&w) = succs.get(*pos) {
                *pos += 1;
                if !index.contains_key(w) {
                    index.insert(w, next);
                    low.insert(w, next);
                    next += 1;
                    stack.push(w);
                    on_stack.insert(w);
                    call.push((w, succ(w), 0));
                } else if on_stack.contains(w) {
                    let lw = index.get(w).copied().unwrap_or(usize::MAX);
                    if let Some(lv) = low.get_mut(v) {
                        *lv = (*lv).min(lw);
                    }
                }
                continue;
            }
            call.pop();
            let lv = low.get(v).copied().unwrap_or_default();
            if let Some((parent, _, _)) = call.last()
                && let Some(lp) = low.get_mut(parent)
            {
                *lp = (*lp).min(lv);
            }
            if Some(&lv) == index.get(v) {
                let mut comp = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack.remove(w);
                    comp.push(w);
                    if w == v {
                        break;
                    }
                }
                let self_loop = comp.len() == 1 && succ(v).contains(&v);
                if comp.len() > 1 || self_loop {
                    comp.sort_unstable();
                    out.push(comp);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::too_many_arguments)]
    use super::*;

    fn agent(id: &str, template: &str, caps: &[&str], concurrency: u32) -> AgentRecord {
        let mut r: AgentRecord = serde_json::from_value(serde_json::json!({
            "agent_id": id, "name": template, "runner_id": "r1", "tenant": "default",
            "capabilities": caps, "labels": {}, "provider": "offline", "model": "m",
            "concurrency": concurrency, "in_flight": 0, "status": "idle", "started_at_ms": 0,
            "heartbeat_at_ms": 0, "heartbeat_interval_ms": 1000, "state": "idle",
            "protocol_version": 1
        }))
        .unwrap();
        r.heartbeat_at_ms = 1_000_000;
        r
    }

    fn task(g: &mut Graph, id: &str, kind: &str, cap: &str, agent: Option<&str>, at: u64) {
        let mut ev = TaskEvent::new(id, kind);
        ev.at_ms = at;
        ev.capability = Some(cap.to_owned());
        ev.agent_id = agent.map(str::to_owned);
        g.task_event(&ev);
    }

    fn wait(
        g: &mut Graph,
        wid: &str,
        kind: &str,
        waiter: (&str, &str),
        agent: &str,
        on: &str,
        target: &str,
        at: u64,
    ) {
        let (task_id, message_id) = match waiter {
            ("task", t) => (Some(t.to_owned()), None),
            (_, m) => (None, Some(m.to_owned())),
        };
        g.wait_event(&WaitEvent {
            kind: kind.to_owned(),
            wait_id: wid.to_owned(),
            at_ms: at,
            agent_id: agent.to_owned(),
            runner_id: "r1".into(),
            tenant: "default".into(),
            task_id,
            message_id,
            on: on.to_owned(),
            target: target.to_owned(),
            until_ms: None,
        });
    }

    fn msg(
        g: &mut Graph,
        id: &str,
        kind: &str,
        to: &str,
        agent: Option<&str>,
        reply_to: Option<&str>,
        at: u64,
    ) {
        g.message_event(&MessageEvent {
            message_id: id.to_owned(),
            kind: kind.to_owned(),
            at_ms: at,
            from: "agent:x".into(),
            to: to.to_owned(),
            task_id: None,
            priority: None,
            agent_id: agent.map(str::to_owned),
            seq: None,
            in_reply_to: reply_to.map(str::to_owned),
            error: None,
            rule: None,
        });
    }

    const NOW: u64 = 1_000_500;

    #[test]
    fn a_delegation_cycle_is_found_and_its_youngest_waiter_named() {
        let mut g = Graph::default();
        for (a, c) in [("a1", "a"), ("b1", "b"), ("c1", "c")] {
            g.agent(&agent(a, a, &[c], 1));
        }
        task(&mut g, "t1", "accepted", "a", None, 1);
        task(&mut g, "t1", "started", "a", Some("a1"), 2);
        task(&mut g, "t2", "accepted", "b", None, 3);
        wait(&mut g, "w1", "waiting", ("task", "t1"), "a1", "task", "t2", 3);
        task(&mut g, "t2", "started", "b", Some("b1"), 4);
        task(&mut g, "t3", "accepted", "c", None, 5);
        wait(&mut g, "w2", "waiting", ("task", "t2"), "b1", "task", "t3", 5);
        task(&mut g, "t3", "started", "c", Some("c1"), 6);
        assert!(g.find(NOW).is_empty(), "a chain is not a deadlock");
        // t3 delegates to capability a, whose only agent is held by t1.
        task(&mut g, "t4", "accepted", "a", None, 7);
        assert!(g.find(NOW).is_empty(), "t3 does not wait yet");
        wait(&mut g, "w3", "waiting", ("task", "t3"), "c1", "task", "t4", 8);
        let found = g.find(NOW);
        assert_eq!(found.len(), 1, "{found:?}");
        let d = &found[0].deadlock;
        assert_eq!(d.tasks, ["t1", "t2", "t3", "t4"]);
        assert_eq!(d.agents, ["a1", "b1", "c1"]);
        assert_eq!(d.formed_at_ms, 8);
        assert_eq!(found[0].youngest.as_deref(), Some("t3"));
        assert_eq!(g.find(NOW)[0].key, found[0].key, "the key is stable");
        // Broken: the victim fails, and everything goes on.
        task(&mut g, "t3", "failed", "c", None, 9);
        assert!(g.find(NOW).is_empty());
    }

    #[test]
    fn a_message_cycle_and_a_starvation_knot_are_found() {
        let mut g = Graph::default();
        g.agent(&agent("A", "ta", &["x"], 1));
        g.agent(&agent("B", "tb", &["y"], 1));
        task(&mut g, "p1", "started", "x", Some("A"), 1);
        task(&mut g, "p2", "started", "y", Some("B"), 1);
        msg(&mut g, "m1", "sent", "agent:B", None, None, 2);
        wait(&mut g, "w1", "waiting", ("task", "p1"), "A", "reply", "m1", 2);
        assert!(g.find(NOW).is_empty());
        msg(&mut g, "m2", "sent", "agent:A", None, None, 3);
        wait(&mut g, "w2", "waiting", ("task", "p2"), "B", "reply", "m2", 3);
        let found = g.find(NOW);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].deadlock.tasks, ["p1", "p2"]);
        assert_eq!(found[0].deadlock.messages, ["m1", "m2"]);
        assert_eq!(found[0].youngest.as_deref(), Some("p2"));
        // A second slot on A: m2 can be handled, so nothing is stuck.
        g.agent(&agent("A", "ta", &["x"], 2));
        assert!(g.find(NOW).is_empty());

        // Every agent of `plan` is a parent waiting on a child that needs `plan`.
        let mut g = Graph::default();
        g.agent(&agent("P1", "planner", &["plan"], 1));
        g.agent(&agent("P2", "planner", &["plan"], 1));
        for (p, a, c) in [("q1", "P1", "c1"), ("q2", "P2", "c2")] {
            task(&mut g, p, "started", "plan", Some(a), 1);
            task(&mut g, c, "accepted", "plan", None, 2);
            wait(&mut g, &format!("w{p}"), "waiting", ("task", p), a, "task", c, 2);
        }
        let found = g.find(NOW);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].deadlock.tasks, ["c1", "c2", "q1", "q2"]);
        // A third planner, free: the knot is no deadlock.
        g.agent(&agent("P3", "planner", &["plan"], 1));
        assert!(g.find(NOW).is_empty());
        // ... unless it is in ERROR, or dead.
        let mut bad = agent("P3", "planner", &["plan"], 1);
        bad.status = AgentStatus::Error;
        g.agent(&bad);
        assert_eq!(g.find(NOW).len(), 1);
    }

    #[test]
    fn waits_on_the_world_outside_and_on_dead_agents_are_no_deadlock() {
        let mut g = Graph::default();
        g.agent(&agent("A", "ta", &["x"], 1));
        g.agent(&agent("B", "tb", &["y"], 1));
        task(&mut g, "p1", "started", "x", Some("A"), 1);
        task(&mut g, "p2", "started", "y", Some("B"), 1);
        msg(&mut g, "m1", "sent", "agent:B", None, None, 2);
        wait(&mut g, "w1", "waiting", ("task", "p1"), "A", "reply", "m1", 2);
        wait(&mut g, "w2", "waiting", ("task", "p2"), "B", "memory", "default.k", 3);
        assert!(g.find(NOW).is_empty(), "a memory wait may end by any writer");
        wait(&mut g, "w2", "resumed", ("task", "p2"), "B", "memory", "default.k", 4);
        msg(&mut g, "m2", "sent", "agent:A", None, None, 5);
        wait(&mut g, "w3", "waiting", ("task", "p2"), "B", "reply", "m2", 5);
        assert_eq!(g.find(NOW).len(), 1);
        // B's heartbeat stops: its work is requeued, so nothing waits for good.
        let mut dead = agent("B", "tb", &["y"], 1);
        dead.heartbeat_at_ms = 0;
        g.agent(&dead);
        assert!(g.find(NOW).is_empty());
    }

    #[test]
    fn a_reply_that_races_the_next_request_is_no_deadlock() {
        // A asks B and waits; B answers (the edge ends when the reply is sent: `answered`), and
        // A, woken, at once asks again while B's work on the first message... is over.
        let mut g = Graph::default();
        g.agent(&agent("A", "ta", &["x"], 1));
        g.agent(&agent("B", "tb", &["y"], 1));
        task(&mut g, "p1", "started", "x", Some("A"), 1);
        msg(&mut g, "m1", "sent", "agent:B", None, None, 2);
        wait(&mut g, "w1", "waiting", ("task", "p1"), "A", "reply", "m1", 2);
        msg(&mut g, "m1", "delivered", "agent:B", Some("B"), None, 3);
        // B's handling asks A back (A is busy waiting): that is a real cycle while it lasts...
        msg(&mut g, "m2", "sent", "agent:A", None, None, 4);
        wait(&mut g, "w2", "waiting", ("message", "m1"), "B", "reply", "m2", 4);
        assert_eq!(g.find(NOW).len(), 1);
        // ... and B's wait times out, it answers, the reply reaches A before A's own resumed.
        wait(&mut g, "w2", "resumed", ("message", "m1"), "B", "reply", "m2", 5);
        msg(&mut g, "r1", "sent", "agent:A", None, Some("m1"), 6);
        msg(&mut g, "m1", "answered", "agent:B", Some("B"), None, 7);
        // A asks B again before its first wait's resumed is folded.
        msg(&mut g, "m3", "sent", "agent:B", None, None, 8);
        wait(&mut g, "w3", "waiting", ("task", "p1"), "A", "reply", "m3", 8);
        assert!(g.find(NOW).is_empty(), "{:?}", g.find(NOW));
        wait(&mut g, "w1", "resumed", ("task", "p1"), "A", "reply", "m1", 9);
        assert!(g.find(NOW).is_empty());
    }

    /// Random waits that never form a cycle: work `i` only ever waits on work of higher
    /// numbers, on agents that hold only it, with replies racing requests; no deadlock is ever
    /// reported.
    #[test]
    fn ten_thousand_random_acyclic_waits_report_nothing() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n.max(1)
        };
        let mut g = Graph::default();
        let agents = 40u64;
        for a in 0..agents {
            g.agent(&agent(&format!("a{a}"), &format!("t{a}"), &[&format!("c{a}")], 1 + (a % 2) as u32));
        }
        let mut open: Vec<(String, String, u64)> = Vec::new(); // (wait id, waiter task, agent index)
        let mut at = 1;
        let mut waits = 0;
        let mut n = 0u64;
        while waits < 10_000 {
            at += 1;
            n += 1;
            // A task on agent i waits on work for an agent j > i (a strict order: no cycle).
            let i = rand(agents - 1);
            let j = i + 1 + rand(agents - 1 - i);
            let parent = format!("p{n}");
            task(&mut g, &parent, "started", &format!("c{i}"), Some(&format!("a{i}")), at);
            let wid = format!("w{n}");
            if rand(2) == 0 {
                let child = format!("k{n}");
                task(&mut g, &child, "accepted", &format!("c{j}"), None, at);
                wait(&mut g, &wid, "waiting", ("task", &parent), &format!("a{i}"), "task", &child, at);
                if rand(3) > 0 {
                    task(&mut g, &child, "started", &format!("c{j}"), Some(&format!("a{j}")), at);
                }
            } else {
                let m = format!("m{n}");
                msg(&mut g, &m, "sent", &format!("agent:a{j}"), None, None, at);
                wait(&mut g, &wid, "waiting", ("task", &parent), &format!("a{i}"), "reply", &m, at);
                if rand(2) == 0 {
                    msg(&mut g, &m, "delivered", "", Some(&format!("a{j}")), None, at);
                }
            }
            open.push((wid, parent, i));
            waits += 1;
            let found = g.find(NOW);
            assert!(found.is_empty(), "false deadlock after {waits} waits: {found:?}");
            // End some waits the way they end: the awaited work finishes (the reply is sent),
            // then the waiter resumes and finishes.
            while open.len() > 30 || (!open.is_empty() && rand(3) == 0) {
                let k = usize::try_from(rand(open.len() as u64)).unwrap_or(0);
                let (wid, parent, i) = open.swap_remove(k);
                let m = wid.replacen('w', "m", 1);
                let child = wid.replacen('w', "k", 1);
                msg(&mut g, &m, "answered", "", None, None, at);
                task(&mut g, &child, "completed", "", None, at);
                assert!(g.find(NOW).is_empty());
                wait(&mut g, &wid, "resumed", ("task", &parent), &format!("a{i}"), "", "", at);
                task(&mut g, &parent, "completed", "", None, at);
            }
        }
        assert!(g.find(NOW).is_empty());
    }
}
