//! `flotilla bench …` is an alias of the `flotilla-bench` binary next to `flotilla`: it runs it
//! with the same arguments, and says so clearly when it is not there.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::process::Command;

use flotilla_testkit::bin;

#[test]
fn flotilla_bench_runs_flotilla_bench() {
    let _bench = bin("flotilla-bench");
    let out = Command::new(bin("flotilla")).args(["bench", "dispatcher", "--help"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("flotilla-bench dispatcher") && help.contains("--budgets"), "{help}");
}

#[test]
fn flotilla_bench_without_the_binary_says_how_to_build_it() {
    let dir = tempfile::tempdir().unwrap();
    let alone = dir.path().join("flotilla");
    std::fs::copy(bin("flotilla"), &alone).unwrap();
    let out = Command::new(&alone).args(["--json", "bench", "runner"]).output().unwrap();
    assert_eq!(out.status.code(), Some(5));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let error = report["error"].as_str().unwrap();
    assert!(error.contains("flotilla-bench is not next to flotilla"), "{error}");
}
