//! The JSON Schemas in `schemas/` must match the Rust types, and the golden MessagePack fixtures
//! in `schemas/golden/` must keep decoding. Run with `FLOTILLA_UPDATE_SCHEMAS=1` to regenerate
//! after a deliberate (additive) change.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::PathBuf;

use flotilla_protocol::*;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
}

fn updating() -> bool {
    std::env::var("FLOTILLA_UPDATE_SCHEMAS").is_ok_and(|v| v == "1")
}

#[test]
fn schemas_have_not_drifted() {
    let mut drifted = Vec::new();
    for (name, schema) in schema::all() {
        let path = dir().join(format!("{name}.schema.json"));
        let text = serde_json::to_string_pretty(&schema).unwrap() + "\n";
        if updating() {
            std::fs::write(&path, &text).unwrap();
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            drifted.push(path.display().to_string());
        }
    }
    assert!(
        drifted.is_empty(),
        "schemas differ from the Rust types: {drifted:?}; run FLOTILLA_UPDATE_SCHEMAS=1 cargo test -p flotilla-protocol"
    );
}

fn golden_submission() -> TaskSubmission {
    TaskSubmission {
        id: Some("golden-1".into()),
        capability: "summarize".into(),
        input: serde_json::json!({"text": "hello", "n": [1, 2, 3]}),
        priority: Priority::new(2),
        tenant: Some("acme".into()),
        budget_tokens: Some(5000),
        timeout: Some(DurationSpec::Text("30s".into())),
        deadline: None,
        context_key: Some("thread-9".into()),
        parent_id: None,
        labels: [("model".to_string(), "small".to_string())].into(),
        max_attempts: None,
    }
}

fn golden_event() -> TaskEvent {
    let mut e = TaskEvent::new("golden-1", "completed");
    e.at_ms = 1_764_000_000_000;
    e.attempt = Some(1);
    e.agent_id = Some("r1-writer-0".into());
    e.runner_id = Some("r1".into());
    e.output = Some(serde_json::json!({"answer": "hi"}));
    e.usage = Some(Usage::new(12, 3));
    e
}

#[test]
fn golden_msgpack_fixtures_keep_decoding() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("task-submission.msgpack", rmp_serde::to_vec_named(&golden_submission()).unwrap()),
        ("task-event-completed.msgpack", rmp_serde::to_vec_named(&golden_event()).unwrap()),
    ];
    for (file, bytes) in &cases {
        let path = dir().join("golden").join(file);
        if updating() {
            std::fs::write(&path, bytes).unwrap();
        }
    }
    let sub: TaskSubmission =
        decode(None, &std::fs::read(dir().join("golden/task-submission.msgpack")).unwrap()).unwrap();
    assert_eq!(sub, golden_submission());
    let ev: TaskEvent =
        decode(None, &std::fs::read(dir().join("golden/task-event-completed.msgpack")).unwrap()).unwrap();
    assert_eq!(ev, golden_event());
}
