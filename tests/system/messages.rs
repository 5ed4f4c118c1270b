//! Direct messages between agents: the permission matrix, priority under a flood, durability
//! across a runner's `kill -9`, and a template's messages moving to another runner.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use flotilla_protocol::{
    Effect, Grant, GrantScope, MessageEvent, MessageSend, Selector, SendReply, TaskSubmission, WireFormat,
    codec, message_event,
};
use flotilla_service::StreamSettings;
use serde_json::json;

use crate::support::*;

/// Every message event so far.
async fn message_events(sys: &System) -> Vec<MessageEvent> {
    sys.read_stream(&sys.names.events_stream(), &sys.names.message_events_all())
        .await
        .into_iter()
        .map(|(_, p)| codec::decode(None, &p).unwrap())
        .collect()
}

/// Waits until `done` holds for the message events, then returns them.
async fn wait_for_messages(
    sys: &System,
    what: &str,
    timeout: Duration,
    done: impl Fn(&[MessageEvent]) -> bool,
) -> Vec<MessageEvent> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let events = message_events(sys).await;
        if done(&events) {
            return events;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what} not seen after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn of_kind<'a>(events: &'a [MessageEvent], kind: &'a str) -> impl Iterator<Item = &'a MessageEvent> + 'a {
    events.iter().filter(move |e| e.kind == kind)
}

/// Sends as client `client` with one JSON request, as any NATS client can.
async fn client_send(sys: &System, client: &str, m: &MessageSend) -> SendReply {
    let body = codec::encode(WireFormat::Json, m).unwrap();
    let reply = sys.client.request(sys.names.msg_send_client(client), body.into()).await.unwrap();
    codec::decode(None, &reply.payload).unwrap()
}

fn grant(name: &str, effect: Effect, from: &str, to: &str) -> Grant {
    Grant {
        name: name.into(),
        effect,
        scope: GrantScope::Message,
        from: Selector::parse(from).unwrap(),
        to: Selector::parse(to).unwrap(),
        created_at_ms: None,
        created_by: None,
    }
}

// The matrix: ten agents, one per template t0..t9, t0-t4 on r1 and t5-t9 on r2; t0-t6 of
// tenant a, t7-t9 of tenant b.
fn runner_of(i: usize) -> &'static str {
    if i < 5 { "r1" } else { "r2" }
}
fn agent_of(i: usize) -> String {
    format!("{}-t{i}-0", runner_of(i))
}
fn tenant_of(i: usize) -> &'static str {
    if i < 7 { "a" } else { "b" }
}

/// What the grants below must decide for `i → j`, written out by hand: (allowed, rule).
fn expected(i: usize, j: usize) -> (bool, &'static str) {
    if tenant_of(i) == "a" && j == 8 {
        (true, "a-to-t8")
    } else if i == 0 && j == 2 {
        (false, "t0-not-t2")
    } else if i == 1 {
        (false, "quiet-t1")
    } else if tenant_of(i) != tenant_of(j) {
        (false, "default:cross-tenant")
    } else {
        (true, "default:same-tenant")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_ordered_pair_of_ten_agents_is_delivered_once_or_refused_with_its_rule() {
    let mut sys = System::with_dispatcher().await;
    for g in [
        grant("quiet-t1", Effect::Deny, "template:t1", "*"),
        grant("a-to-t8", Effect::Allow, "tenant:a", "agent:r2-t8-0"),
        grant("t0-not-t2", Effect::Deny, "agent:r1-t0-0", "template:t2"),
    ] {
        // As a plain client would: JSON into the grants bucket.
        sys.topology.grants.put(&g.name, serde_json::to_vec(&g).unwrap().into()).await.unwrap();
    }
    for runner in ["r1", "r2"] {
        let fleet: String = (0..10)
            .filter(|i| runner_of(*i) == runner)
            .map(|i| {
                format!(
                    "[[agent]]\nname = \"t{i}\"\ncapabilities = [\"c{i}\"]\ntenant = \"{}\"\ntools = [\"send_message\"]\n\n",
                    tenant_of(i)
                )
            })
            .collect();
        sys.start_runner(runner, &fleet).await;
    }
    sys.wait_for_agents("r1", 5).await;
    sys.wait_for_agents("r2", 5).await;
    for i in 0..10 {
        let calls: Vec<serde_json::Value> = (0..10)
            .filter(|j| *j != i)
            .map(|j| json!({ "name": "send_message", "arguments": { "agent": agent_of(j), "message": { "text": format!("hello from {i}") } } }))
            .collect();
        sys.submit(&TaskSubmission {
            id: Some(format!("sender-{i}")),
            capability: format!("c{i}"),
            input: json!({ "text": "greet everyone", "_offline": { "tool_calls": calls } }),
            ..Default::default()
        })
        .await;
    }
    let pairs: Vec<(usize, usize)> =
        (0..10).flat_map(|i| (0..10).filter(move |j| *j != i).map(move |j| (i, j))).collect();
    assert_eq!(pairs.len(), 90);
    let allowed: BTreeSet<(String, String)> = pairs
        .iter()
        .filter(|(i, j)| expected(*i, *j).0)
        .map(|(i, j)| (format!("agent:{}", agent_of(*i)), agent_of(*j)))
        .collect();
    let denied: BTreeMap<(String, String), &str> = pairs
        .iter()
        .filter(|(i, j)| !expected(*i, *j).0)
        .map(|(i, j)| {
            ((format!("agent:{}", agent_of(*i)), format!("agent:{}", agent_of(*j))), expected(*i, *j).1)
        })
        .collect();
    assert!(!allowed.is_empty() && !denied.is_empty());
    let (n_allowed, n_denied) = (allowed.len(), denied.len());
    wait_for_messages(&sys, "every message handled or refused", Duration::from_secs(60), |ev| {
        of_kind(ev, message_event::ANSWERED).count() >= n_allowed
            && of_kind(ev, message_event::REFUSED).count() >= n_denied
    })
    .await;
    // Time for a duplicate to show, if there were one.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let events = message_events(&sys).await;
    let mut handled: HashMap<(String, String), usize> = HashMap::new();
    for e in of_kind(&events, message_event::ANSWERED) {
        *handled.entry((e.from.clone(), e.agent_id.clone().unwrap())).or_default() += 1;
    }
    let handled_pairs: BTreeSet<(String, String)> = handled.keys().cloned().collect();
    assert_eq!(handled_pairs, allowed, "the allowed pairs, and only they, were handled");
    assert!(handled.values().all(|n| *n == 1), "each handled once: {handled:?}");
    let refused: BTreeMap<(String, String), String> = of_kind(&events, message_event::REFUSED)
        .map(|e| ((e.from.clone(), e.to.clone()), e.rule.clone().unwrap()))
        .collect();
    assert_eq!(of_kind(&events, message_event::REFUSED).count(), n_denied, "each refusal recorded once");
    let want: BTreeMap<(String, String), String> =
        denied.iter().map(|(k, v)| (k.clone(), (*v).to_owned())).collect();
    assert_eq!(refused, want, "every denial with the rule that refused it");
    // Each sender's model was told of each denial, with the rule.
    let tasks = sys.wait_for_kind("completed", 10, Duration::from_secs(30)).await;
    for (i, j) in pairs.iter().filter(|(i, j)| !expected(*i, *j).0) {
        let done =
            tasks.iter().find(|e| e.kind == "completed" && e.task_id == format!("sender-{i}")).unwrap();
        let answer = done.output.as_ref().unwrap()["answer"].as_str().unwrap();
        let told = format!(
            "agent:{} may not message agent:{} (rule {})",
            agent_of(*i),
            agent_of(*j),
            expected(*i, *j).1
        );
        assert!(answer.contains(&told), "sender {i} was not told {told:?}: {answer}");
    }
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_critical_message_overtakes_two_hundred_batch_messages() {
    let fleet = "[[agent]]\nname = \"slow\"\ncapabilities = [\"slow\"]\n";
    let sys = System::with_runner("r1", fleet, 1).await;
    let send = |id: String, priority: &str, sleep_ms: u64| MessageSend {
        id: Some(id.clone()),
        to: flotilla_protocol::Address::agent("r1-slow-0"),
        priority: Some(flotilla_protocol::Priority::from_name(priority).unwrap()),
        body: json!({ "text": id, "_offline": { "sleep_ms": sleep_ms } }),
        ..Default::default()
    };
    for k in 0..200 {
        let r = client_send(&sys, "loader", &send(format!("batch-{k}"), "batch", 15)).await;
        assert!(r.error.is_none(), "{r:?}");
    }
    let started_before = of_kind(&message_events(&sys).await, message_event::DELIVERED).count();
    let r = client_send(&sys, "loader", &send("urgent".into(), "critical", 0)).await;
    assert!(r.error.is_none(), "{r:?}");
    assert_eq!(r.delivered.len(), 1);
    let events = wait_for_messages(&sys, "201 handled messages", Duration::from_secs(60), |ev| {
        of_kind(ev, message_event::ANSWERED).count() >= 201
    })
    .await;
    let order: Vec<&str> =
        of_kind(&events, message_event::DELIVERED).map(|e| e.message_id.as_str()).collect();
    let at = order.iter().position(|id| *id == "urgent").unwrap();
    assert!(
        at <= started_before + 1,
        "the critical message was taken as number {at}, but only {started_before} batch messages had been taken when it was sent"
    );
    assert!(
        at < 200,
        "the critical message did not overtake the batch backlog: taken at {at} of {}",
        order.len()
    );
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_survive_a_runner_kill_and_each_is_acted_on_once() {
    let sys = System::start(StreamSettings::default(), WireFormat::Msgpack).await;
    let mut sys = sys;
    sys.start_dispatcher(dispatcher_config()).await;
    let fleet = "[[agent]]\nname = \"keeper\"\ncapabilities = [\"keep\"]\nconcurrency = 2\ntools = [\"memory_put\"]\n";
    let mut runner = sys.spawn_runner_process("rk", fleet);
    sys.wait_for_agents("rk", 1).await;
    let n = 30;
    for k in 0..n {
        // Fire and forget: the receiving agent's model acts on it (stores the key).
        let m = MessageSend {
            id: Some(format!("keep-{k}")),
            to: flotilla_protocol::Address::agent("rk-keeper-0"),
            body: json!({ "text": format!("remember {k}"), "_offline": {
                "sleep_ms": 100,
                "tool_calls": [{ "name": "memory_put", "arguments": { "key": format!("seen-{k}"), "value": k } }]
            } }),
            ..Default::default()
        };
        let r = client_send(&sys, "writer", &m).await;
        assert!(r.error.is_none(), "{r:?}");
    }
    wait_for_messages(&sys, "a few handled messages", Duration::from_secs(30), |ev| {
        of_kind(ev, message_event::ANSWERED).count() >= 4
    })
    .await;
    runner.kill9();
    let handled_before = of_kind(&message_events(&sys).await, message_event::ANSWERED).count();
    assert!(handled_before < n, "all were handled before the kill; the test proves nothing");
    let _runner = sys.spawn_runner_process("rk", fleet);
    let events = wait_for_messages(&sys, "every message handled", Duration::from_secs(60), |ev| {
        of_kind(ev, message_event::ANSWERED).map(|e| e.message_id.clone()).collect::<BTreeSet<_>>().len() >= n
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let events = if events.is_empty() { events } else { message_events(&sys).await };
    let mut answered: HashMap<String, usize> = HashMap::new();
    for e in of_kind(&events, message_event::ANSWERED) {
        *answered.entry(e.message_id.clone()).or_default() += 1;
    }
    assert_eq!(answered.len(), n);
    assert!(answered.values().all(|c| *c == 1), "a message was handled twice: {answered:?}");
    for k in 0..n {
        let v = sys.topology.memory.get(format!("default.seen-{k}")).await.unwrap();
        assert!(v.is_some(), "the agent's model did not act on message {k}");
    }
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_to_a_template_move_with_it_to_another_runner() {
    let mut sys = System::with_dispatcher().await;
    let template = |replicas: u32| {
        format!("[[agent]]\nname = \"mover\"\ncapabilities = [\"move\"]\nreplicas = {replicas}\n")
    };
    sys.start_runner("r1", &template(1)).await;
    sys.start_runner("r2", &template(0)).await;
    sys.wait_for_agents("r1", 1).await;
    // The only agent of the template is busy, so it takes none of the messages...
    let mut busy = sleeping("busy", 8_000);
    busy.capability = "move".into();
    sys.submit(&busy).await;
    sys.wait_for_kind("started", 1, Duration::from_secs(20)).await;
    for k in 0..100 {
        let m = MessageSend {
            id: Some(format!("move-{k}")),
            to: flotilla_protocol::Address::template("mover"),
            body: json!({ "text": format!("job {k}"), "_offline": { "sleep_ms": 5 } }),
            ..Default::default()
        };
        let r = client_send(&sys, "mover-client", &m).await;
        assert_eq!(r.delivered.len(), 1, "{r:?}");
    }
    // ...and is then stopped, while the template starts on the other runner.
    let ask = |subject: String, body: serde_json::Value| {
        let sys = &sys;
        async move {
            let m = sys.signed_request(subject, serde_json::to_vec(&body).unwrap()).await;
            serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap_or_default()
        }
    };
    ask(sys.names.runner_control("r1", "stop"), json!({ "agent_id": "r1-mover-0" })).await;
    ask(sys.names.runner_control("r2", "scale"), json!({ "template": "mover", "replicas": 1 })).await;
    let events = wait_for_messages(&sys, "100 handled messages", Duration::from_secs(60), |ev| {
        of_kind(ev, message_event::ANSWERED).count() >= 100
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = if events.is_empty() { events } else { message_events(&sys).await };
    let answered: Vec<&MessageEvent> = of_kind(&events, message_event::ANSWERED).collect();
    assert_eq!(answered.len(), 100, "each handled once");
    let ids: BTreeSet<&str> = answered.iter().map(|e| e.message_id.as_str()).collect();
    assert_eq!(ids.len(), 100);
    assert!(
        answered.iter().all(|e| e.agent_id.as_deref() == Some("r2-mover-0")),
        "handled by the stopped agent: {:?}",
        answered
            .iter()
            .filter(|e| e.agent_id.as_deref() != Some("r2-mover-0"))
            .map(|e| &e.message_id)
            .collect::<Vec<_>>()
    );
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_py_messages_an_agent_and_cannot_forge_a_sender() {
    let mut sys = System::start(StreamSettings::default(), WireFormat::Json).await;
    sys.start_dispatcher(dispatcher_config()).await;
    sys.start_runner("r1", "[[agent]]\nname = \"helper\"\ncapabilities = [\"help\"]\n").await;
    sys.start_runner("r2", "[[agent]]\nname = \"other\"\ncapabilities = [\"other\"]\n").await;
    sys.wait_for_agents("r1", 1).await;
    sys.wait_for_agents("r2", 1).await;
    // As client identity "py": an operator of that name may send as "py" and nothing else.
    let py = ("operator-py", flotilla_service::auth::RoleSpec::Operator { name: "py".into() });
    let out = sys.python("message_client.py", &[sys.server.url(), "flotilla", "r1-helper-0", "r2"], py).await;
    assert!(out.status.success(), "python client failed: {}", String::from_utf8_lossy(&out.stderr));
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["sent"]["delivered"][0]["to"], "agent:r1-helper-0", "{seen}");
    assert_eq!(seen["reply"]["in_reply_to"], "py-question", "{seen}");
    assert_eq!(seen["reply"]["from"]["agent"], "r1-helper-0", "{seen}");
    assert_eq!(seen["reply"]["body"]["text"], "[helper] message: hello from python", "{seen}");
    assert_eq!(seen["as_agent"]["error"]["code"], "forbidden_sender", "{seen}");
    if sys.server.auth_enabled() {
        // Publishing as a runner is not even let through by the server.
        assert_eq!(seen["wrong_runner"]["denied"], true, "{seen}");
    } else {
        assert_eq!(seen["wrong_runner"]["error"]["code"], "forbidden_sender", "{seen}");
    }
    assert_eq!(seen["unknown_field"]["error"]["code"], "malformed", "{seen}");
    assert!(seen["unknown_field"]["error"]["message"].as_str().unwrap().contains("colour"), "{seen}");
    assert!(seen["bad_priority"]["error"]["code"].is_string(), "{seen}");
    // None of the forged messages reached the agent: it handled exactly one message.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = message_events(&sys).await;
    let handled: Vec<&str> =
        of_kind(&events, message_event::ANSWERED).map(|e| e.message_id.as_str()).collect();
    assert_eq!(handled, vec!["py-question"]);

    // A send request whose reply subject points into the fleet's own subjects is not answered
    // there (nor acted on twice: the message is stored once by its id).
    let body = serde_json::to_vec(&json!({ "id": "bounce", "to": { "agent": "r1-helper-0" }, "body": "x" }))
        .unwrap();
    let mut spy = sys.client.subscribe(sys.names.runner_control("r2", "cancel")).await.unwrap();
    sys.client
        .publish_with_reply(
            sys.names.msg_send_client("py"),
            sys.names.runner_control("r2", "cancel"),
            body.into(),
        )
        .await
        .unwrap();
    sys.client.flush().await.unwrap();
    let bounced = tokio::time::timeout(Duration::from_secs(1), futures::StreamExt::next(&mut spy)).await;
    assert!(bounced.is_err(), "the router answered into another runner's subject");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn topic_events_wake_each_subscribed_template_once_across_a_runner_kill() {
    let mut sys = System::with_dispatcher().await;
    let template = |name: &str, from: &str| {
        format!(
            "[[agent]]\nname = \"{name}\"\ncapabilities = [\"{name}\"]\ntopics = [\"orders.*\"]\ntopics_from = \"{from}\"\n\n"
        )
    };
    let fleet: String = ["audit", "billing", "shipping"].iter().map(|t| template(t, "new")).collect();
    let _ra = sys.spawn_runner_process("ra", &fleet);
    let mut rb = sys.spawn_runner_process("rb", &fleet);
    sys.wait_for_agents("ra", 3).await;
    sys.wait_for_agents("rb", 3).await;
    let n = 500;
    let count = n.to_string();
    let operator = ("operator-test", flotilla_service::auth::RoleSpec::Operator { name: "test".into() });
    let args = [sys.server.url(), "flotilla", "orders.created", &count];
    let publisher = sys.python("topic_publisher.py", &args, operator);
    let killer = async {
        wait_for_messages(&sys, "some topic events handled", Duration::from_secs(60), |ev| {
            of_kind(ev, message_event::ANSWERED).count() >= 150
        })
        .await;
        rb.kill9();
    };
    let (out, ()) = tokio::join!(publisher, killer);
    assert!(out.status.success(), "publisher failed: {}", String::from_utf8_lossy(&out.stderr));
    let _rb = sys.spawn_runner_process("rb", &fleet);
    let per_template = |events: &[MessageEvent], t: &str| {
        of_kind(events, message_event::ANSWERED)
            .filter(|e| e.message_id.starts_with(&format!("topic-{t}-")))
            .map(|e| e.message_id.clone())
            .collect::<Vec<_>>()
    };
    let events =
        wait_for_messages(&sys, "every event handled by every template", Duration::from_secs(120), |ev| {
            ["audit", "billing", "shipping"].iter().all(|t| per_template(ev, t).len() >= n)
        })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let events = if events.is_empty() { events } else { message_events(&sys).await };
    for t in ["audit", "billing", "shipping"] {
        let ids = per_template(&events, t);
        let distinct: BTreeSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), n, "template {t} missed events");
        assert_eq!(ids.len(), n, "template {t} handled an event twice");
    }
    // Both runners took part (queue semantics inside a template, across runners).
    let by: BTreeSet<String> =
        of_kind(&events, message_event::ANSWERED).filter_map(|e| e.agent_id.clone()).collect();
    assert!(by.iter().any(|a| a.starts_with("ra-")) && by.iter().any(|a| a.starts_with("rb-")), "{by:?}");

    // A template subscribing later from the start gets every earlier event.
    sys.start_runner("rc", &template("late", "all")).await;
    let events = wait_for_messages(&sys, "the late template caught up", Duration::from_secs(60), |ev| {
        per_template(ev, "late").len() >= n
    })
    .await;
    assert_eq!(per_template(&events, "late").len(), n);
    sys.stop().await;
}

fn memory_grant(name: &str, effect: Effect, from: &str, to: &str) -> Grant {
    Grant { scope: GrantScope::MemoryWrite, ..grant(name, effect, from, to) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_agents_count_exactly_through_compare_and_swap_and_others_are_refused() {
    let mut sys = System::with_dispatcher().await;
    for g in [
        memory_grant("counters-closed", Effect::Deny, "*", "namespace:counters"),
        memory_grant("counters-for-counters", Effect::Allow, "template:counter", "namespace:counters"),
    ] {
        sys.topology.grants.put(&g.name, serde_json::to_vec(&g).unwrap().into()).await.unwrap();
    }
    let counter = "[[agent]]\nname = \"counter\"\ncapabilities = [\"count\"]\nreplicas = 25\nmax_steps = 400\n\
                   tools = [\"memory_get\", \"memory_put\"]\n\n";
    let intruder = "[[agent]]\nname = \"intruder\"\ncapabilities = [\"intrude\"]\ntools = [\"memory_put\"]\n";
    sys.start_runner("r1", &format!("{counter}{intruder}")).await;
    sys.start_runner("r2", counter).await;
    sys.wait_for_agents("r1", 26).await;
    sys.wait_for_agents("r2", 25).await;
    let n = 100;
    for k in 0..n {
        sys.submit(&TaskSubmission {
            id: Some(format!("count-{k}")),
            capability: "count".into(),
            input: json!({ "text": "count", "_offline": { "increment": { "namespace": "counters", "key": "hits" } } }),
            ..Default::default()
        })
        .await;
    }
    let events = sys.wait_for_kind("completed", n, Duration::from_secs(120)).await;
    let agents: BTreeSet<String> =
        events.iter().filter(|e| e.kind == "completed").filter_map(|e| e.agent_id.clone()).collect();
    assert!(agents.len() >= 40, "only {} agents took part", agents.len());
    let hits = sys.topology.memory.get("default.counters.hits").await.unwrap().unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&hits).unwrap(),
        json!(n),
        "lost or doubled increments"
    );
    // Some increments really raced (and were retried after a conflict).
    let conflicts = events
        .iter()
        .filter(|e| e.kind == "completed")
        .filter(|e| e.output.as_ref().unwrap()["answer"].as_str().unwrap().contains("conflict"))
        .count();
    assert!(conflicts > 0, "no increment ever conflicted: the test did not race");

    // A template without the grant is refused, with the rule.
    sys.submit(&TaskSubmission {
        id: Some("intrusion".into()),
        capability: "intrude".into(),
        input: json!({ "text": "reset", "_offline": { "tool_calls": [
            { "name": "memory_put", "arguments": { "namespace": "counters", "key": "hits", "value": 0 } }
        ] } }),
        ..Default::default()
    })
    .await;
    let events = sys.wait_for_kind("completed", n + 1, Duration::from_secs(30)).await;
    let done = events.iter().find(|e| e.kind == "completed" && e.task_id == "intrusion").unwrap();
    let answer = done.output.as_ref().unwrap()["answer"].as_str().unwrap();
    assert!(
        answer.contains(
            "permission_denied: agent:r1-intruder-0 may not write namespace:counters (rule counters-closed)"
        ),
        "{answer}"
    );
    let hits = sys.topology.memory.get("default.counters.hits").await.unwrap().unwrap();
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&hits).unwrap(), json!(n));
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_waiting_for_a_memory_change_wakes_within_100_ms() {
    let fleet = "[[agent]]\nname = \"waiter\"\ncapabilities = [\"wait\"]\ntools = [\"memory_wait\"]\n";
    let sys = System::with_runner("r1", fleet, 1).await;
    sys.submit(&TaskSubmission {
        id: Some("waiting".into()),
        capability: "wait".into(),
        input: json!({ "text": "wait", "_offline": { "tool_calls": [
            { "name": "memory_wait", "arguments": { "key": "signal", "timeout_s": 30 } }
        ] } }),
        ..Default::default()
    })
    .await;
    // Until the agent is waiting.
    let waiting = sys.names.agent_event_subject("r1-waiter-0", "waiting");
    flotilla_testkit::eventually(Duration::from_secs(20), "the agent to wait", || {
        let (sys, waiting) = (&sys, waiting.clone());
        async move { (!sys.read_stream(&sys.names.events_stream(), &waiting).await.is_empty()).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let put_at = flotilla_protocol::time::now_ms();
    sys.topology.memory.put("default.signal", b"\"go\"".to_vec().into()).await.unwrap();
    let events = sys.wait_for_kind("completed", 1, Duration::from_secs(20)).await;
    let done = events.iter().find(|e| e.kind == "completed").unwrap();
    let answer = done.output.as_ref().unwrap()["answer"].as_str().unwrap();
    let woken: u64 = answer
        .split("\"woken_at_ms\":")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no woken_at_ms in {answer}"));
    assert!(answer.contains("\"value\":\"go\""), "{answer}");
    let after = woken.saturating_sub(put_at);
    assert!(after <= 100, "woke {after} ms after the put");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_manages_grants_memory_topics_and_sends() {
    let fleet =
        "[[agent]]\nname = \"helper\"\ncapabilities = [\"help\"]\ntenant = \"acme\"\ntopics = [\"news.*\"]\n";
    let sys = System::with_runner("r1", fleet, 1).await;
    let url = sys.server.url().to_owned();
    // Grants: across tenants, the operator `test` (tenant default) is refused until granted.
    let (code, _, err) = cli(&url, &["send", "--to", "agent:r1-helper-0", "hi"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("permission_denied") && err.contains("default:cross-tenant"), "{err}");
    let (code, out, err) =
        cli(&url, &["grants", "allow", "ops-to-acme", "--from", "client:test", "--to", "tenant:acme"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ops-to-acme") && out.contains("client:test -> tenant:acme"), "{out}");
    let (_, out, _) = cli(&url, &["grants", "list"]).await;
    assert!(out.contains("ops-to-acme") && out.contains("(by test)"), "who made it: {out}");
    let started = std::time::Instant::now();
    let answer = loop {
        let (code, out, err) =
            cli(&url, &["send", "--to", "agent:r1-helper-0", "--wait", "what's up?"]).await;
        if code == 0 {
            break out;
        }
        assert!(started.elapsed() < Duration::from_secs(1), "the grant did not apply within a second: {err}");
    };
    assert!(answer.contains("agent:r1-helper-0: [helper] message: what's up?"), "{answer}");
    let (code, _, _) = cli(&url, &["grants", "remove", "ops-to-acme"]).await;
    assert_eq!(code, 0);
    let (code, _, _) = cli(&url, &["grants", "remove", "ops-to-acme"]).await;
    assert_eq!(code, 3, "removing a grant that is not there");
    // Each change is recorded with who made it (the CLI signs as operator `test`).
    let changes: Vec<(String, Option<String>)> = sys
        .read_stream(&sys.names.events_stream(), &sys.names.control_event_subject("*"))
        .await
        .into_iter()
        .map(|(_, p)| codec::decode::<flotilla_protocol::ControlEvent>(None, &p).unwrap())
        .filter(|e| e.kind == "applied")
        .map(|e| (e.action, e.actor))
        .collect();
    let by_test = Some("test".to_owned());
    assert_eq!(changes, [("grant".to_owned(), by_test.clone()), ("grant_remove".to_owned(), by_test)]);

    // Memory: put, compare-and-swap, history.
    let (code, out, _) = cli(&url, &["memory", "put", "notes.today", "\"sunny\""]).await;
    assert_eq!(code, 0);
    assert!(out.contains("revision"), "{out}");
    let (_, out, _) = cli(&url, &["--json", "memory", "get", "notes.today"]).await;
    let got: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let rev = got["revision"].as_u64().unwrap();
    let (code, _, err) =
        cli(&url, &["memory", "put", "notes.today", "\"rain\"", "--expect", &(rev + 5).to_string()]).await;
    assert_eq!(code, 1, "a stale compare-and-swap must fail: {err}");
    assert!(err.contains("conflict"), "{err}");
    let (code, _, _) =
        cli(&url, &["memory", "put", "notes.today", "\"rain\"", "--expect", &rev.to_string()]).await;
    assert_eq!(code, 0);
    let (_, out, _) = cli(&url, &["memory", "history", "notes.today"]).await;
    assert!(out.contains("sunny") && out.contains("rain"), "{out}");
    let (code, out, err) = cli(&url, &["memory", "ls", "notes."]).await;
    assert_eq!((code, out.trim()), (0, "notes.today"), "{err}");

    // Topics: publish, the template acts on it, list shows the subscription.
    let (code, out, err) = cli(&url, &["topics", "publish", "news.today", "{\"text\": \"extra\"}"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("published on news.today"), "{out}");
    wait_for_messages(&sys, "the topic event handled", Duration::from_secs(20), |ev| {
        of_kind(ev, message_event::ANSWERED).any(|e| e.from == "topic:news.today")
    })
    .await;
    let (_, out, _) = cli(&url, &["--json", "topics", "list"]).await;
    let listed: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(listed["topics"][0]["topic"], "news.today", "{listed}");
    assert_eq!(listed["subscriptions"][0]["template"], "helper", "{listed}");
    assert_eq!(listed["subscriptions"][0]["topics"][0], "news.*", "{listed}");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recall_finds_the_planted_neighbour_identically_from_two_runners() {
    let mut sys = System::with_dispatcher().await;
    let tpl = |name: &str| {
        format!(
            "[[agent]]\nname = \"{name}\"\ncapabilities = [\"{name}\"]\ntools = [\"remember\", \"recall\"]\n\n"
        )
    };
    sys.start_runner("r1", &format!("{}{}", tpl("writer"), tpl("reader_a"))).await;
    sys.start_runner("r2", &tpl("reader_b")).await;
    sys.wait_for_agents("r1", 2).await;
    sys.wait_for_agents("r2", 1).await;
    // 1,000 texts of words from a vocabulary the query does not use, one planted among them.
    let mut seed = 7u64;
    let mut next = || {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        seed >> 33
    };
    let planted = "the blue heron fishes at dawn by the river";
    let texts: Vec<String> = (0..1000)
        .map(|k| {
            if k == 500 {
                planted.to_owned()
            } else {
                (0..8).map(|_| format!("w{}", next() % 300)).collect::<Vec<_>>().join(" ")
            }
        })
        .collect();
    for (batch, chunk) in texts.chunks(100).enumerate() {
        let calls: Vec<serde_json::Value> = chunk
            .iter()
            .map(
                |t| json!({ "name": "remember", "arguments": { "text": t, "metadata": { "batch": batch } } }),
            )
            .collect();
        sys.submit(&TaskSubmission {
            id: Some(format!("remember-{batch}")),
            capability: "writer".into(),
            input: json!({ "text": "remember these", "_offline": { "tool_calls": calls } }),
            ..Default::default()
        })
        .await;
    }
    sys.wait_for_kind("completed", 10, Duration::from_secs(120)).await;
    for reader in ["reader_a", "reader_b"] {
        sys.submit(&TaskSubmission {
            id: Some(format!("ask-{reader}")),
            capability: reader.into(),
            input: json!({ "text": "what fishes at dawn?", "_offline": { "tool_calls": [
                { "name": "recall", "arguments": { "query": "a blue heron fishing at dawn", "k": 3 } }
            ] } }),
            ..Default::default()
        })
        .await;
    }
    let events = sys.wait_for_kind("completed", 12, Duration::from_secs(30)).await;
    let hits = |reader: &str| {
        let done =
            events.iter().find(|e| e.kind == "completed" && e.task_id == format!("ask-{reader}")).unwrap();
        let answer = done.output.as_ref().unwrap()["answer"].as_str().unwrap().to_owned();
        let json = answer.split("recall -> ").nth(1).unwrap().trim_end_matches(')').to_owned();
        serde_json::from_str::<serde_json::Value>(&json).unwrap_or_else(|e| panic!("{e}: {answer}"))
    };
    let (a, b) = (hits("reader_a"), hits("reader_b"));
    assert_eq!(a, b, "two runners answered differently");
    let top: Vec<&str> = a.as_array().unwrap().iter().map(|h| h["text"].as_str().unwrap()).collect();
    assert_eq!(top.len(), 3);
    assert!(top.contains(&planted), "the planted text is not in the top 3: {top:?}");
    assert_eq!(a[0]["metadata"]["batch"], 5, "{a}");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_that_outlives_its_ttl_expires_and_its_waiting_sender_is_told() {
    let fleet = "[[agent]]\nname = \"busy\"\ncapabilities = [\"busy\"]\n";
    let sys = System::with_runner("r1", fleet, 1).await;
    // Long enough for the harness to see it start (its event reads take up to a second or so).
    let mut busy = sleeping("long-task", 4_000);
    busy.capability = "busy".into();
    sys.submit(&busy).await;
    sys.wait_for_kind("started", 1, Duration::from_secs(20)).await;
    let mut answers = sys.client.subscribe(sys.names.inbox_client("impatient")).await.unwrap();
    let m = MessageSend {
        id: Some("short-lived".into()),
        to: flotilla_protocol::Address::agent("r1-busy-0"),
        ttl_ms: Some(300),
        wants_reply: true,
        body: json!("are you there?"),
        ..Default::default()
    };
    let r = client_send(&sys, "impatient", &m).await;
    assert_eq!(r.delivered.len(), 1, "{r:?}");
    let answer = tokio::time::timeout(Duration::from_secs(20), futures::StreamExt::next(&mut answers))
        .await
        .expect("the sender was not told")
        .unwrap();
    let e: flotilla_protocol::Envelope = codec::decode(None, &answer.payload).unwrap();
    assert_eq!(e.in_reply_to.as_deref(), Some("short-lived"));
    assert_eq!(e.body["error"]["code"], "expired", "{:?}", e.body);
    let events = message_events(&sys).await;
    assert_eq!(of_kind(&events, message_event::EXPIRED).count(), 1);
    assert_eq!(
        of_kind(&events, message_event::ANSWERED).filter(|e| e.message_id == "short-lived").count(),
        0
    );
    sys.stop().await;
}
