//! Bad input — undecodable bytes, a missing or unknown capability, wrong types, an oversized
//! input — each gets a `rejected` event with a machine-readable reason and a dead-letter record,
//! and the services keep serving.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use crate::support::*;
use flotilla_protocol::{DeadLetter, TaskSubmission, WireFormat, codec, headers};
use flotilla_service::StreamSettings;

/// A dispatcher whose inputs may be at most 1 KiB and one runner with an agent for `work`.
async fn intake_system() -> System {
    let mut sys = System::start(StreamSettings::default(), WireFormat::Msgpack).await;
    sys.start_dispatcher(flotilla_dispatcher::Config { max_input_bytes: 1024, ..dispatcher_config() }).await;
    sys.start_runner("r1", &worker_fleet(1, 2)).await;
    sys.wait_for_agents("r1", 1).await;
    sys
}

/// Publishes raw bytes to the intake, as any client could, and waits for the stream's ack.
async fn publish(sys: &System, payload: Vec<u8>, content_type: Option<&str>, msg_id: Option<&str>) {
    let mut h = async_nats::HeaderMap::new();
    if let Some(ct) = content_type {
        h.insert(headers::CONTENT_TYPE, ct);
    }
    if let Some(id) = msg_id {
        h.insert(headers::NATS_MSG_ID, id);
    }
    sys.js.publish_with_headers(sys.names.submit_subject(), h, payload.into()).await.unwrap().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_bad_input_is_rejected_and_dead_lettered() {
    let sys = intake_system().await;

    let json = Some(headers::APPLICATION_JSON);
    // Nested far deeper than any decoder's stack should be asked to go.
    let deep_json =
        format!(r#"{{"capability": "work", "input": {}1{}}}"#, "[".repeat(5000), "]".repeat(5000))
            .into_bytes();
    let mut deep_msgpack = vec![0x82];
    deep_msgpack.extend(rmp_serde::to_vec(&"capability").unwrap());
    deep_msgpack.extend(rmp_serde::to_vec(&"work").unwrap());
    deep_msgpack.extend(rmp_serde::to_vec(&"input").unwrap());
    deep_msgpack.extend(std::iter::repeat_n(0x91u8, 5000));
    deep_msgpack.push(0x01);
    let big = format!(r#"{{"capability": "work", "input": "{}"}}"#, "x".repeat(4096));
    let mp_wrong =
        rmp_serde::to_vec_named(&serde_json::json!({"capability": "work", "budget_tokens": "lots"})).unwrap();
    let fields: Vec<String> = (0..2000).map(|i| format!(r#""k{i}": {i}"#)).collect();
    let many_fields =
        format!(r#"{{"capability": "work", "labels": {{{}}}}}"#, fields.join(", ")).into_bytes();
    let long_string =
        format!(r#"{{"capability": "work", "note": "{}"}}"#, "y".repeat(300 * 1024)).into_bytes();
    let cases: Vec<(&str, Vec<u8>, Option<&str>, &str)> = vec![
        ("bad-undecodable", b"\xc1\xff\x00 not a message".to_vec(), None, "malformed"),
        ("bad-json-syntax", b"{\"capability\": ".to_vec(), json, "malformed"),
        ("bad-missing-cap", br#"{"input": 1}"#.to_vec(), json, "missing_field"),
        ("bad-empty-cap", br#"{"capability": ""}"#.to_vec(), json, "missing_field"),
        ("bad-unknown-cap", br#"{"capability": "translate.klingon"}"#.to_vec(), json, "unknown_capability"),
        ("bad-wrong-type", br#"{"capability": 42}"#.to_vec(), json, "wrong_type"),
        ("bad-msgpack-type", mp_wrong, Some(headers::APPLICATION_MSGPACK), "wrong_type"),
        ("bad-priority", br#"{"capability": "work", "priority": "urgent!"}"#.to_vec(), json, "invalid_field"),
        ("bad-too-large", big.into_bytes(), json, "input_too_large"),
        (
            "bad-past-deadline",
            br#"{"capability": "work", "deadline": 1000}"#.to_vec(),
            json,
            "deadline_exceeded",
        ),
        ("bad-deep-json", deep_json, json, "too_deep"),
        ("bad-deep-msgpack", deep_msgpack, None, "too_deep"),
        ("bad-many-fields", many_fields, json, "too_many_fields"),
        ("bad-long-string", long_string, json, "string_too_long"),
    ];
    for (msg_id, payload, ct, _) in &cases {
        publish(&sys, payload.clone(), *ct, Some(msg_id)).await;
    }
    // The services keep serving: a good task after all that completes.
    let good =
        TaskSubmission { id: Some("good-after".into()), capability: "work".into(), ..Default::default() };
    sys.submit(&good).await;

    let events = sys.wait_for_kind("rejected", cases.len(), Duration::from_secs(20)).await;
    let events = if events.iter().any(|e| e.kind == "completed" && e.task_id == "good-after") {
        events
    } else {
        sys.wait_for_kind("completed", 1, Duration::from_secs(20)).await
    };
    let dead: Vec<DeadLetter> = sys
        .read_stream(&sys.names.deadletter_stream(), &sys.names.deadletter_all())
        .await
        .into_iter()
        .map(|(_, p)| codec::decode(None, &p).unwrap())
        .collect();
    for (msg_id, payload, _, reason) in &cases {
        let ev = events
            .iter()
            .find(|e| e.kind == "rejected" && e.task_id == *msg_id)
            .unwrap_or_else(|| panic!("no rejected event for {msg_id}"));
        assert_eq!(ev.error.as_ref().unwrap().code, *reason, "reason for {msg_id}");
        let dl = dead.iter().find(|d| d.task_id.as_deref() == Some(*msg_id)).expect("dead letter");
        assert_eq!(dl.reason, *reason);
        assert_eq!(dl.source, "dispatcher.intake");
        assert_eq!(dl.payload_len as usize, payload.len());
        assert!(dl.stream_sequence.is_some());
        assert!(!dl.message.is_empty());
    }
    assert!(events.iter().any(|e| e.kind == "completed" && e.task_id == "good-after"));
    // None of the rejected ids became a task.
    for (msg_id, ..) in &cases {
        assert!(sys.task(msg_id).await.is_none(), "{msg_id} must not be recorded");
    }
    let h = sys.health("dispatcher", "dispatcher-1").await;
    assert_eq!(h.details["rejected"], cases.len());
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_copy_of_an_existing_task_is_a_duplicate_not_a_rejection() {
    let mut sys = System::with_dispatcher().await;
    sys.start_runner("r1", &worker_fleet(1, 2)).await;
    sys.wait_for_agents("r1", 1).await;
    let good = TaskSubmission { id: Some("keep-me".into()), capability: "work".into(), ..Default::default() };
    sys.submit(&good).await;
    sys.wait_for_kind("completed", 1, Duration::from_secs(20)).await;
    // A retry of the same id whose deadline has since passed, and one with a bad priority.
    for bad in [
        &br#"{"id": "keep-me", "capability": "work", "deadline": 1000}"#[..],
        &br#"{"id": "keep-me", "capability": "work", "priority": 99}"#[..],
    ] {
        sys.submit_raw(bad.to_vec(), Some(headers::APPLICATION_JSON)).await;
    }
    // The first decodes and is a duplicate; the second does not decode, but its id can be read:
    // a duplicate too, never a rejection in the existing task's history.
    flotilla_testkit::eventually(Duration::from_secs(10), "both copies seen", || async {
        let h = sys.health("dispatcher", "dispatcher-1").await;
        (h.details["duplicates"] == 2 && h.details["rejected"] == 0).then_some(())
    })
    .await;
    let events = sys.events().await;
    assert!(!events.iter().any(|e| e.task_id == "keep-me" && e.kind == "rejected"), "history untouched");
    assert_eq!(sys.task("keep-me").await.unwrap().state, flotilla_protocol::TaskState::Completed);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_fields_are_accepted_with_a_warning() {
    let mut sys = System::with_dispatcher().await;
    sys.start_runner("r1", &worker_fleet(1, 2)).await;
    sys.wait_for_agents("r1", 1).await;
    sys.submit_raw(
        br#"{"id": "extra", "capability": "work", "colour": "red"}"#.to_vec(),
        Some(headers::APPLICATION_JSON),
    )
    .await;
    sys.wait_for_kind("completed", 1, Duration::from_secs(20)).await;
    let rec = sys.task("extra").await.unwrap();
    assert_eq!(rec.warnings, vec!["unknown field ignored: colour".to_string()]);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_submission_with_a_readable_id_is_rejected_under_that_id() {
    let mut sys = System::start(StreamSettings::default(), WireFormat::Msgpack).await;
    sys.start_dispatcher(dispatcher_config()).await;
    let json = headers::APPLICATION_JSON;
    let mp = |v: serde_json::Value| rmp_serde::to_vec_named(&v).unwrap();
    // No Nats-Msg-Id: the id is only in the body, next to what is wrong.
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        ("own-wrong-type", br#"{"id": "own-wrong-type", "capability": 42}"#.to_vec(), json, "wrong_type"),
        (
            "own-msgpack-type",
            mp(serde_json::json!({"id": "own-msgpack-type", "capability": "work", "budget_tokens": "lots"})),
            headers::APPLICATION_MSGPACK,
            "wrong_type",
        ),
        (
            "own-bad-priority",
            br#"{"id": "own-bad-priority", "capability": "work", "priority": "urgent!"}"#.to_vec(),
            json,
            "invalid_field",
        ),
    ];
    for (_, payload, ct, _) in &cases {
        publish(&sys, payload.clone(), Some(ct), None).await;
    }
    // An id that is itself wrong cannot be used: a generated one.
    publish(&sys, br#"{"id": "not a token!", "capability": 7}"#.to_vec(), Some(json), None).await;
    let events = sys.wait_for_kind("rejected", cases.len() + 1, Duration::from_secs(20)).await;
    for (id, _, _, reason) in &cases {
        let ev = events
            .iter()
            .find(|e| e.kind == "rejected" && e.task_id == *id)
            .unwrap_or_else(|| panic!("no rejected event under {id}: {events:?}"));
        assert_eq!(ev.error.as_ref().unwrap().code, *reason, "reason for {id}");
    }
    assert!(events.iter().any(|e| e.kind == "rejected" && e.task_id.starts_with("rejected-")), "{events:?}");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_thousand_hostile_submissions_are_each_rejected_and_the_fleet_keeps_serving() {
    let sys = intake_system().await;
    let json = Some(headers::APPLICATION_JSON);
    let mp = Some(headers::APPLICATION_MSGPACK);
    // (kind, body for id, content type, reason); an id of None: none can be read.
    type Case = (Option<String>, Vec<u8>, Option<&'static str>, &'static str);
    let kinds: Vec<Box<dyn Fn(usize) -> Case>> = vec![
        Box::new(|_| (None, b"\xc1\xff\x00 not a message".to_vec(), None, "malformed")),
        Box::new(|_| (None, b"{\"capability\": ".to_vec(), json, "malformed")),
        Box::new(move |n| {
            let id = format!("h-missing-{n}");
            (Some(id.clone()), format!(r#"{{"id": "{id}", "input": 1}}"#).into_bytes(), json, "missing_field")
        }),
        Box::new(move |n| {
            let id = format!("h-unknown-cap-{n}");
            let body = format!(r#"{{"id": "{id}", "capability": "translate.klingon"}}"#);
            (Some(id), body.into_bytes(), json, "unknown_capability")
        }),
        Box::new(move |n| {
            let id = format!("h-wrong-type-{n}");
            (
                Some(id.clone()),
                format!(r#"{{"id": "{id}", "capability": 42}}"#).into_bytes(),
                json,
                "wrong_type",
            )
        }),
        Box::new(move |n| {
            let id = format!("h-mp-type-{n}");
            let body = rmp_serde::to_vec_named(
                &serde_json::json!({"id": id, "capability": "work", "budget_tokens": "lots"}),
            )
            .unwrap();
            (Some(id), body, mp, "wrong_type")
        }),
        Box::new(move |n| {
            let id = format!("h-priority-{n}");
            let body = format!(r#"{{"id": "{id}", "capability": "work", "priority": 99}}"#);
            (Some(id), body.into_bytes(), json, "invalid_field")
        }),
        Box::new(move |n| {
            let id = format!("h-large-{n}");
            let body = format!(r#"{{"id": "{id}", "capability": "work", "input": "{}"}}"#, "x".repeat(2048));
            (Some(id), body.into_bytes(), json, "input_too_large")
        }),
        Box::new(move |n| {
            let id = format!("h-deadline-{n}");
            let body = format!(r#"{{"id": "{id}", "capability": "work", "deadline": 1000}}"#);
            (Some(id), body.into_bytes(), json, "deadline_exceeded")
        }),
        // Nested too deep to decode: its id is still read (JSON's top level, scanned).
        Box::new(move |n| {
            let id = format!("h-deep-{n}");
            let body = format!(
                r#"{{"input": {}1{}, "id": "{id}", "capability": "work"}}"#,
                "[".repeat(300),
                "]".repeat(300)
            );
            (Some(id), body.into_bytes(), json, "too_deep")
        }),
        Box::new(move |n| {
            let id = format!("h-fields-{n}");
            let fields: Vec<String> = (0..1100).map(|i| format!(r#""k{i}": 1"#)).collect();
            let body =
                format!(r#"{{"id": "{id}", "capability": "work", "input": {{{}}}}}"#, fields.join(","));
            (Some(id), body.into_bytes(), json, "too_many_fields")
        }),
        Box::new(move |n| {
            let id = format!("h-long-{n}");
            let body =
                format!(r#"{{"id": "{id}", "capability": "work", "x": "{}"}}"#, "z".repeat(257 * 1024));
            (Some(id), body.into_bytes(), json, "string_too_long")
        }),
        Box::new(move |n| {
            let id = format!("h-encoding-{n}");
            let body = format!(r#"{{"id": "{id}", "capability": 7}}"#);
            (Some(id), body.into_bytes(), Some("application/xml"), "malformed")
        }),
        Box::new(move |n| {
            let body = format!(r#"{{"id": "bad id {n}!", "capability": "work"}}"#);
            (None, body.into_bytes(), json, "invalid_field")
        }),
    ];
    let per_kind = 2_000usize.div_ceil(kinds.len());
    let mut sent: Vec<(Option<String>, &str)> = Vec::new();
    let mut acks = Vec::new();
    for n in 0..per_kind {
        for kind in &kinds {
            let (id, body, ct, reason) = kind(n);
            let mut h = async_nats::HeaderMap::new();
            if let Some(ct) = ct {
                h.insert(headers::CONTENT_TYPE, ct);
            }
            acks.push(sys.js.publish_with_headers(sys.names.submit_subject(), h, body.into()).await.unwrap());
            sent.push((id, reason));
        }
    }
    for a in acks {
        a.await.unwrap();
    }
    let good =
        TaskSubmission { id: Some("good-after".into()), capability: "work".into(), ..Default::default() };
    sys.submit(&good).await;
    let events = sys.wait_for_kind("rejected", sent.len(), Duration::from_secs(120)).await;
    let rejected: std::collections::HashMap<&str, &str> = events
        .iter()
        .filter(|e| e.kind == "rejected")
        .map(|e| (e.task_id.as_str(), e.error.as_ref().map_or("", |x| x.code.as_str())))
        .collect();
    let mut generated = 0;
    for (id, reason) in &sent {
        match id {
            Some(id) => assert_eq!(rejected.get(id.as_str()).copied(), Some(*reason), "{id}"),
            None => generated += 1,
        }
    }
    let under_generated = rejected.keys().filter(|k| k.starts_with("rejected-")).count();
    assert_eq!(under_generated, generated, "only submissions with no readable id get a generated id");
    assert!(sent.len() >= 2_000 && kinds.len() >= 10);
    // Every service kept serving: the good task completes.
    sys.wait_for_kind("completed", 1, Duration::from_secs(30)).await;
    assert_eq!(sys.task("good-after").await.unwrap().state, flotilla_protocol::TaskState::Completed);
    sys.stop().await;
}

/// A tenant's submit subject names the task's tenant: a task on it belongs to that tenant, its
/// events carry the tenant token, and a submission there naming another tenant is rejected
/// under that tenant's events, where its client looks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_subject_names_the_tenant_and_a_body_naming_another_is_rejected() {
    let sys = intake_system().await;
    let json = |body: &str| body.as_bytes().to_vec();
    let green = sys.names.tenant_submit_subject("green");
    let ok = json(r#"{"id": "green-1", "capability": "work"}"#);
    let wrong = json(r#"{"id": "green-2", "capability": "work", "tenant": "blue"}"#);
    for body in [ok, wrong] {
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::CONTENT_TYPE, headers::APPLICATION_JSON);
        sys.js.publish_with_headers(green.clone(), h, body.into()).await.unwrap().await.unwrap();
    }
    sys.wait_for_kind("completed", 1, Duration::from_secs(20)).await;
    sys.wait_for_kind("rejected", 1, Duration::from_secs(20)).await;
    let stored = sys.read_stream(&sys.names.events_stream(), &sys.names.tenant_task_events("green")).await;
    let kinds: Vec<(String, String)> = stored
        .iter()
        .map(|(subject, _)| {
            let (tenant, id, kind) = sys.names.parse_task_event_subject(subject).unwrap();
            assert_eq!(tenant, "green");
            (id.to_owned(), kind.to_owned())
        })
        .collect();
    assert!(kinds.contains(&("green-1".into(), "completed".into())), "{kinds:?}");
    assert!(kinds.contains(&("green-2".into(), "rejected".into())), "{kinds:?}");
    assert_eq!(sys.task("green-1").await.unwrap().tenant, "green");
    let rejected = sys.events().await.into_iter().find(|e| e.task_id == "green-2").unwrap();
    assert_eq!(rejected.error.unwrap().code, "tenant_mismatch");
    assert!(sys.task("green-2").await.is_none());
    sys.stop().await;
}

/// Sends `body` as JSON to `subject` and decodes the answer as `T`.
async fn ask<T: serde::de::DeserializeOwned>(sys: &System, subject: String, body: String) -> T {
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::CONTENT_TYPE, headers::APPLICATION_JSON);
    let reply = sys.client.request_with_headers(subject, h, body.into()).await.unwrap();
    codec::decode(None, &reply.payload).unwrap()
}

/// Every other way in — requests to each service, topic messages, shared memory — holds the
/// limits of `flotilla_protocol::limits` and answers (or dead-letters) with the limit's reason
/// code; the services keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_way_in_holds_its_limits_and_says_which() {
    let mut sys = System::with_dispatcher().await;
    sys.start_budget_keeper().await;
    sys.start_runner(
        "ra",
        "[[agent]]\nname = \"reader\"\ncapabilities = [\"read\"]\ntopics = [\"news.*\"]\n",
    )
    .await;
    sys.wait_for_agents("ra", 1).await;
    let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
    let fields = |n: usize| (0..n).map(|i| format!(r#""k{i}": {i}"#)).collect::<Vec<_>>().join(", ");

    let cancel: flotilla_protocol::CancelReply =
        ask(&sys, sys.names.dispatcher_cancel(), format!(r#"{{"task_id": "t", "reason": {}}}"#, deep(40)))
            .await;
    assert_eq!(cancel.error.unwrap().code, "too_deep");

    let to = sys.names.msg_send_client("limits");
    let sent: flotilla_protocol::SendReply =
        ask(&sys, to, format!(r#"{{"to": "template:reader", "body": {{{}}}}}"#, fields(1100))).await;
    assert_eq!(sent.error.unwrap().code, "too_many_fields");

    let set = format!(r#"{{"key": "tenant.acme", "tokens": 10, "note": "{}"}}"#, "n".repeat(70 * 1024));
    let budget: flotilla_protocol::BudgetReply = ask(&sys, sys.names.budget_subject("set"), set).await;
    assert_eq!(budget.error.unwrap().code, "string_too_long");

    let scale = format!(r#"{{"template": "reader", "replicas": 1, "x": "{}"}}"#, "s".repeat(300 * 1024));
    let changed: flotilla_protocol::FleetChangeReply =
        ask(&sys, sys.names.runner_control("ra", "scale"), scale).await;
    assert_eq!(changed.error.unwrap().code, "too_large");

    // Shared memory: the bucket itself refuses an oversized value, whoever writes it.
    let memory = sys.js.get_key_value(sys.names.memory_bucket()).await.unwrap();
    let huge = vec![b'm'; flotilla_protocol::limits::MAX_MEMORY_VALUE_BYTES + 1];
    assert!(
        memory.put("default.huge", huge.into()).await.is_err(),
        "the memory bucket took an oversized value"
    );
    memory.put("default.small", "1".into()).await.unwrap();

    // A topic message over the limits wakes no agent and is dead-lettered with its reason; the
    // next one is handled.
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::CONTENT_TYPE, headers::APPLICATION_JSON);
    let big = format!("{{{}}}", fields(2000));
    let refused = sys.js.publish_with_headers(sys.names.topic_subject("news.big"), h.clone(), big.into());
    let refused = refused.await.unwrap().await.unwrap().sequence;
    let fine = sys.js.publish_with_headers(sys.names.topic_subject("news.ok"), h, r#"{"text": "hi"}"#.into());
    let fine = fine.await.unwrap().await.unwrap().sequence;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let handled = loop {
        let events: Vec<flotilla_protocol::MessageEvent> = sys
            .read_stream(&sys.names.events_stream(), &sys.names.message_events_all())
            .await
            .into_iter()
            .map(|(_, p)| codec::decode(None, &p).unwrap())
            .collect();
        let ids: Vec<String> = events.into_iter().map(|e| e.message_id).collect();
        if ids.contains(&format!("topic-reader-{fine}")) {
            break ids;
        }
        assert!(tokio::time::Instant::now() < deadline, "the valid topic message was not handled: {ids:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        !handled.contains(&format!("topic-reader-{refused}")),
        "the oversized topic message woke an agent"
    );
    let letters: Vec<DeadLetter> = sys
        .read_stream(&sys.names.deadletter_stream(), &sys.names.deadletter_all())
        .await
        .into_iter()
        .map(|(_, p)| codec::decode(None, &p).unwrap())
        .collect();
    assert!(
        letters.iter().any(|d| d.source == "agent-runner.topics"
            && d.reason == "too_many_fields"
            && d.stream_sequence == Some(refused)),
        "{letters:?}"
    );

    // Every service kept serving.
    sys.submit(&TaskSubmission { id: Some("after".into()), capability: "read".into(), ..Default::default() })
        .await;
    sys.wait_for_kind("completed", 1, Duration::from_secs(30)).await;
    sys.stop().await;
}
