//! `flotilla bench runner` runs end to end on a small scale and reports its figures (the real
//! numbers come from release builds, on demand).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::process::Command;

use flotilla_testkit::bin;

#[test]
fn bench_runner_reports_memory_and_step_overhead() {
    let _runner = bin("flotilla-agent-runner"); // the bench starts it from next to `flotilla`
    let out = Command::new(bin("flotilla"))
        .args(["bench", "runner", "--agents", "50", "--tasks", "20", "--json"])
        .env_remove("FLOTILLA_NATS_URL")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["runner"]["idle_agents"], 50);
    assert!(report["runner"]["rss_mib"].as_f64().unwrap() > 1.0);
    assert!(report["raw_nats_us"]["kv_get"].as_f64().unwrap() > 0.0);
    assert!(report["step"]["p50_us"].as_f64().unwrap() > 0.0);
    assert_eq!(report["step"]["tasks"], 20);
}
