//! Compatibility with what the budget-keeper wrote before the operations had types of their own:
//! ledger entries `{op, at_ms, request, reply}` whose `request` was one flat map of optional
//! fields. The old shapes are built here by hand, key by key in the order the old types wrote
//! them (checked against the old code's own encoding when the types changed), and must decode
//! into the new types and encode back to the same bytes, in MessagePack and in JSON.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::*;
use crate::codec::{self, WireFormat};
use crate::headers::APPLICATION_JSON;

/// A value as the old types encoded it: maps keep their keys in the order given (a
/// `serde_json::Value` would sort them).
#[derive(Debug)]
enum Old {
    Map(Vec<(&'static str, Old)>),
    Leaf(Value),
}

impl From<Value> for Old {
    fn from(v: Value) -> Self {
        Self::Leaf(v)
    }
}

fn map<const N: usize>(pairs: [(&'static str, Old); N]) -> Old {
    Old::Map(pairs.into_iter().collect())
}

fn msgpack(o: &Old) -> Vec<u8> {
    let mut out = Vec::new();
    write_msgpack(o, &mut out);
    out
}

fn write_msgpack(o: &Old, out: &mut Vec<u8>) {
    match o {
        Old::Leaf(v) => out.extend(rmp_serde::to_vec_named(v).unwrap()),
        Old::Map(pairs) => {
            rmp::encode::write_map_len(out, u32::try_from(pairs.len()).unwrap()).unwrap();
            for (k, v) in pairs {
                rmp::encode::write_str(out, k).unwrap();
                write_msgpack(v, out);
            }
        }
    }
}

fn json_text(o: &Old) -> String {
    match o {
        Old::Leaf(v) => serde_json::to_string(v).unwrap(),
        Old::Map(pairs) => {
            let fields: Vec<String> = pairs
                .iter()
                .map(|(k, v)| format!("{}:{}", serde_json::to_string(k).unwrap(), json_text(v)))
                .collect();
            format!("{{{}}}", fields.join(","))
        }
    }
}

fn entry(op: &str, request: Old, reply: Old) -> Old {
    map([
        ("op", json!(op).into()),
        ("at_ms", json!(1_764_000_000_123u64).into()),
        ("request", request),
        ("reply", reply),
    ])
}

fn budget_status() -> Old {
    map([
        ("scope", json!("tenant.acme").into()),
        ("limit_tokens", json!(5000).into()),
        ("window_ms", json!(3_600_000).into()),
        ("used", json!(4100).into()),
        ("held", json!(300).into()),
        ("available", json!(600).into()),
        ("cost_usd", json!(0.0123).into()),
        ("policy", json!("fail").into()),
        ("warn_at", json!([80]).into()),
    ])
}

fn grant() -> Old {
    map([
        ("tokens", json!(2300).into()),
        ("expires_ms", json!(1_764_000_090_123u64).into()),
        ("lease_left_ms", json!(90_000).into()),
    ])
}

fn budget() -> Old {
    map([("budget", budget_status())])
}

fn nothing() -> Old {
    map([])
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

/// Every kind of entry the old keeper wrote, with every field it could carry for that kind (and
/// for the commands also with only the fields they need): the old entry and the change it is.
fn old_entries() -> Vec<(Old, LedgerChange)> {
    let acme = || BudgetEvent { scope: "tenant.acme".into(), warn_at: None };
    vec![
        (
            entry(
                "reserve",
                map([
                    ("id", json!("t1:1:7:0:0.0").into()),
                    ("scopes", json!(["task.t1", "agent.r1-w-0", "tenant.acme", "model.m"]).into()),
                    ("want", json!(2300).into()),
                    ("min", json!(400).into()),
                    ("lease_ms", json!(90_000).into()),
                    ("limits", json!({"task.t1": 5000}).into()),
                    ("model", json!("m").into()),
                    ("rates", json!(["openai/m", "key/OPENAI_API_KEY"]).into()),
                    ("priority", json!(2).into()),
                ]),
                grant(),
            ),
            LedgerChange::Reserve(ReserveRequest {
                id: "t1:1:7:0:0.0".into(),
                scopes: strings(&["task.t1", "agent.r1-w-0", "tenant.acme", "model.m"]),
                want: 2300,
                min: Some(400),
                lease_ms: Some(90_000),
                limits: BTreeMap::from([("task.t1".to_owned(), 5000)]),
                model: Some("m".into()),
                rates: strings(&["openai/m", "key/OPENAI_API_KEY"]),
                priority: Some(Priority::INTERACTIVE),
            }),
        ),
        (
            entry("reserve", map([("id", json!("bare").into()), ("want", json!(10).into())]), grant()),
            LedgerChange::Reserve(ReserveRequest { id: "bare".into(), want: 10, ..Default::default() }),
        ),
        (
            entry(
                "commit",
                map([
                    ("id", json!("t1:1:7:0:0.0").into()),
                    ("used", json!(120).into()),
                    ("prompt_tokens", json!(100).into()),
                ]),
                map([
                    ("charged", json!(120).into()),
                    ("over", json!(0).into()),
                    ("cost_usd", json!(0.00018).into()),
                ]),
            ),
            LedgerChange::Commit(CommitRequest {
                id: "t1:1:7:0:0.0".into(),
                used: 120,
                prompt_tokens: Some(100),
            }),
        ),
        (
            entry(
                "commit",
                map([("id", json!("bare").into()), ("used", json!(0).into())]),
                map([("charged", json!(0).into()), ("over", json!(0).into())]),
            ),
            LedgerChange::Commit(CommitRequest { id: "bare".into(), used: 0, prompt_tokens: None }),
        ),
        (
            entry("release", map([("id", json!("t1:1:7:0:0.0").into())]), nothing()),
            LedgerChange::Release(ReleaseRequest { id: "t1:1:7:0:0.0".into() }),
        ),
        (
            entry(
                "set",
                map([
                    ("scope", json!("agent.*").into()),
                    ("limit_tokens", json!(600).into()),
                    ("window_ms", json!(6000).into()),
                    ("policy", json!("wait").into()),
                    ("warn_at", json!([50, 80]).into()),
                ]),
                budget(),
            ),
            LedgerChange::Set(SetRequest {
                scope: "agent.*".into(),
                limit_tokens: 600,
                window_ms: Some(6000),
                policy: Some("wait".into()),
                warn_at: Some(vec![50, 80]),
            }),
        ),
        (
            entry(
                "set",
                map([("scope", json!("tenant.acme").into()), ("limit_tokens", json!(5000).into())]),
                budget(),
            ),
            LedgerChange::Set(SetRequest {
                scope: "tenant.acme".into(),
                limit_tokens: 5000,
                ..Default::default()
            }),
        ),
        (
            entry(
                "carve",
                map([
                    ("id", json!("carve:p-s1c0").into()),
                    ("scopes", json!(["task.p"]).into()),
                    ("want", json!(4000).into()),
                    ("min", json!(1).into()),
                    ("lease_ms", json!(86_400_000).into()),
                    ("limits", json!({"task.p": 10_000}).into()),
                    ("model", json!("m").into()),
                    ("scope", json!("task.p-s1c0").into()),
                ]),
                grant(),
            ),
            LedgerChange::Carve(CarveRequest {
                id: "carve:p-s1c0".into(),
                scopes: strings(&["task.p"]),
                want: 4000,
                min: Some(1),
                lease_ms: Some(86_400_000),
                limits: BTreeMap::from([("task.p".to_owned(), 10_000)]),
                model: Some("m".into()),
                scope: "task.p-s1c0".into(),
            }),
        ),
        (
            entry(
                "carve",
                map([
                    ("id", json!("carve:c").into()),
                    ("want", json!(5).into()),
                    ("scope", json!("task.c").into()),
                ]),
                grant(),
            ),
            LedgerChange::Carve(CarveRequest {
                id: "carve:c".into(),
                want: 5,
                scope: "task.c".into(),
                ..Default::default()
            }),
        ),
        (
            entry("close", map([("scope", json!("task.p-s1c0").into())]), budget()),
            LedgerChange::Close(CloseRequest { scope: "task.p-s1c0".into() }),
        ),
        (
            entry(
                "rate",
                map([
                    ("window_ms", json!(60_000).into()),
                    ("rate", json!("openai/m").into()),
                    ("rpm", json!(60).into()),
                    ("tpm", json!(100_000).into()),
                ]),
                map([(
                    "rate",
                    map([
                        ("rate", json!("openai/m").into()),
                        ("rpm", json!(60).into()),
                        ("tpm", json!(100_000).into()),
                        ("window_ms", json!(60_000).into()),
                        ("requests", json!(0).into()),
                        ("tokens", json!(0).into()),
                        ("waiting", json!(0).into()),
                    ]),
                )]),
            ),
            LedgerChange::Rate(RateRequest {
                window_ms: Some(60_000),
                rate: "openai/m".into(),
                rpm: Some(60),
                tpm: Some(100_000),
            }),
        ),
        (
            entry("rate", map([("rate", json!("openai/m").into()), ("rpm", json!(60).into())]), nothing()),
            LedgerChange::Rate(RateRequest { rate: "openai/m".into(), rpm: Some(60), ..Default::default() }),
        ),
        (
            entry(
                "backoff",
                map([
                    ("rates", json!(["openai/m", "key/OPENAI_API_KEY"]).into()),
                    ("retry_after_ms", json!(2000).into()),
                ]),
                nothing(),
            ),
            LedgerChange::Backoff(BackoffRequest {
                rates: strings(&["openai/m", "key/OPENAI_API_KEY"]),
                retry_after_ms: 2000,
            }),
        ),
        (
            entry(
                "price",
                map([
                    ("model", json!("m").into()),
                    ("input_usd_per_mtok", json!(0.15).into()),
                    ("output_usd_per_mtok", json!(0.6).into()),
                ]),
                nothing(),
            ),
            LedgerChange::Price(PriceRequest {
                model: "m".into(),
                input_usd_per_mtok: 0.15,
                output_usd_per_mtok: 0.6,
            }),
        ),
        (
            entry("expire", map([("id", json!("w1-c0").into())]), nothing()),
            LedgerChange::Expire(Expiry { id: "w1-c0".into() }),
        ),
        (
            entry(
                "warning",
                map([("scope", json!("tenant.acme").into()), ("warn_at", json!([80]).into())]),
                budget(),
            ),
            LedgerChange::Warning(BudgetEvent { warn_at: Some(vec![80]), ..acme() }),
        ),
        (
            entry("exhausted", map([("scope", json!("tenant.acme").into())]), budget()),
            LedgerChange::Exhausted(acme()),
        ),
        (
            entry("refilled", map([("scope", json!("tenant.acme").into())]), budget()),
            LedgerChange::Refilled(acme()),
        ),
    ]
}

#[test]
fn old_ledger_entries_decode_into_the_typed_changes_and_encode_to_the_same_bytes() {
    let cases = old_entries();
    for op in LedgerOp::ALL {
        assert!(cases.iter().any(|(_, c)| c.op() == *op), "no old {op} entry is tested");
    }
    for (old, change) in &cases {
        let op = change.op();
        for (format, bytes) in
            [(WireFormat::Msgpack, msgpack(old)), (WireFormat::Json, json_text(old).into_bytes())]
        {
            let e: LedgerEntry = codec::decode(Some(format.content_type()), &bytes)
                .unwrap_or_else(|e| panic!("an old {op} entry in {format:?} does not decode: {e}"));
            assert_eq!(&e.change, change, "{op} in {format:?}");
            assert_eq!((e.op(), e.at_ms), (op, 1_764_000_000_123), "{op} in {format:?}");
            assert_eq!(codec::encode(format, &e).unwrap(), bytes, "{op} in {format:?} encodes as before");
            // Also read the way every other message is, without a content type.
            assert_eq!(codec::decode::<LedgerEntry>(None, &bytes).unwrap(), e);
        }
        let json_bytes = json_text(old).into_bytes();
        assert_eq!(
            rmp_serde::to_vec_named(&codec::decode::<LedgerEntry>(None, &json_bytes).unwrap()).unwrap(),
            msgpack(old)
        );
    }
}

#[test]
fn old_ledger_entries_with_fields_their_operation_ignored_still_decode() {
    // The old flat request took any of its fields for any operation and the keeper stored them.
    let old = entry(
        "release",
        map([("id", json!("x").into()), ("want", json!(5).into()), ("scope", json!("tenant.acme").into())]),
        nothing(),
    );
    for bytes in [msgpack(&old), json_text(&old).into_bytes()] {
        let e: LedgerEntry = codec::decode(None, &bytes).unwrap();
        assert_eq!(e.change, LedgerChange::Release(ReleaseRequest { id: "x".into() }));
    }
}

#[test]
fn ledger_entries_that_are_not_changes_are_refused() {
    let request = || map([("id", json!("x").into())]);
    for (old, why) in [
        (entry("show", map([("scope", json!("tenant.acme").into())]), nothing()), "show changes nothing"),
        (entry("borrow", request(), nothing()), "no such change"),
        (entry("commit", request(), nothing()), "a commit needs used"),
        (
            map([("op", json!("release").into()), ("at_ms", json!(1).into()), ("reply", nothing())]),
            "no request",
        ),
        (map([("at_ms", json!(1).into()), ("request", request()), ("reply", nothing())]), "no op"),
    ] {
        for bytes in [msgpack(&old), json_text(&old).into_bytes()] {
            assert!(codec::decode::<LedgerEntry>(None, &bytes).is_err(), "{why}");
        }
    }
}

#[test]
fn the_ledger_tag_is_the_change_s_op() {
    for (_, change) in old_entries() {
        let v = serde_json::to_value(&change).unwrap();
        assert_eq!(v["op"], change.op().as_str());
        assert_eq!(serde_json::to_value(change.op()).unwrap(), change.op().as_str());
    }
    for op in BudgetOp::ALL {
        assert_eq!(serde_json::to_value(op).unwrap(), op.as_str());
        assert_eq!(op.as_str().parse::<BudgetOp>(), Ok(*op));
    }
    assert!("expire".parse::<BudgetOp>().is_err());
    assert_eq!("expire".parse::<LedgerOp>(), Ok(LedgerOp::Expire));
}

/// The flat request of the old shape of a change (the same map the ledger stored).
fn old_request(old: &Old) -> &Old {
    let Old::Map(pairs) = old else { panic!("an entry is a map") };
    &pairs.iter().find(|(k, _)| *k == "request").unwrap().1
}

#[test]
fn old_requests_decode_into_their_commands() {
    let mut seen = Vec::new();
    for (old, change) in old_entries() {
        let Ok(op) = change.op().as_str().parse::<BudgetOp>() else { continue };
        seen.push(op);
        let request = old_request(&old);
        for (ct, bytes) in
            [(None, msgpack(request)), (Some(APPLICATION_JSON), json_text(request).into_bytes())]
        {
            let cmd = BudgetCommand::decode(op, ct, &bytes).unwrap();
            assert_eq!(cmd.op(), op);
            assert_eq!(cmd.into_change().as_ref(), Some(&change), "{op}");
        }
    }
    let show = BudgetCommand::decode(BudgetOp::Show, None, br#"{"rate": "openai/m"}"#).unwrap();
    assert_eq!(show, BudgetCommand::Show(ShowRequest { scope: None, rate: Some("openai/m".into()) }));
    assert_eq!(show.into_change(), None, "show changes nothing");
    seen.push(BudgetOp::Show);
    for op in BudgetOp::ALL {
        assert!(seen.contains(op), "no old {op} request is tested");
    }
}

#[test]
fn requests_are_refused_with_the_code_the_keeper_answers() {
    let code = |op: BudgetOp, body: &[u8]| BudgetCommand::decode(op, None, body).unwrap_err();
    // A field the operation needs is missing: as the keeper answered before it had types.
    let e = code(BudgetOp::Reserve, br#"{"id": "x", "scopes": ["tenant.acme"]}"#);
    assert_eq!((e.code.as_str(), e.message.as_str()), ("invalid_request", "reserve needs id and want"));
    let needs = [
        (BudgetOp::Commit, "commit needs id and used"),
        (BudgetOp::Release, "release needs id"),
        (BudgetOp::Set, "set needs scope and limit_tokens"),
        (BudgetOp::Carve, "carve needs id, want and scope (the child's)"),
        (BudgetOp::Close, "close needs scope"),
        (BudgetOp::Rate, "rate needs rate (the key)"),
        (BudgetOp::Backoff, "backoff needs rates and retry_after_ms"),
        (BudgetOp::Price, "price needs model, input_usd_per_mtok and output_usd_per_mtok"),
    ];
    for (op, message) in needs {
        for body in [&b"{}"[..], &rmp_serde::to_vec_named(&json!({})).unwrap()] {
            let e = code(op, body);
            assert_eq!((e.code.as_str(), e.message.as_str()), ("invalid_request", message));
        }
    }
    // Unknown fields (a typo, or a field of another operation) are refused, not ignored.
    assert_eq!(code(BudgetOp::Show, br#"{"scope": "x", "colour": "red"}"#).code, "malformed");
    assert_eq!(code(BudgetOp::Show, br#"{"scope": "x", "want": 5}"#).code, "malformed");
    let mp = rmp_serde::to_vec_named(&json!({"id": "x", "used": 1, "usde": 2})).unwrap();
    assert_eq!(code(BudgetOp::Commit, &mp).code, "malformed");
    // Wrong types and bytes that are no request get the codec's code.
    assert_eq!(code(BudgetOp::Show, br#"{"scope": 42}"#).code, "wrong_type");
    assert_eq!(code(BudgetOp::Reserve, br#"{"id": "x", "want": "lots"}"#).code, "wrong_type");
    assert_eq!(code(BudgetOp::Show, b"\xc1").code, "malformed");
    assert_eq!(code(BudgetOp::Show, b"").code, "malformed");
    assert_eq!(code(BudgetOp::Show, b"{not json").code, "malformed");
}
