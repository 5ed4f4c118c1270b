//! `flotilla-bench runner`, `dispatcher`, `budget` and `messages` run end to
//! end on a small scale and report their figures (the real numbers come from release builds, on
//! demand).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::process::Command;

use flotilla_testkit::bin;

/// Runs `flotilla-bench <args>` (a bench with `--json`) on its own local nats-server; its report.
fn bench(args: &[&str]) -> serde_json::Value {
    let out =
        Command::new(bin("flotilla-bench")).args(args).env_remove("FLOTILLA_NATS_URL").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Asserts the figure at `path` of a report is a positive number.
fn positive(report: &serde_json::Value, path: &str) {
    let v = report.pointer(path).unwrap_or_else(|| panic!("{path} missing in {report}"));
    let x = v.as_f64().unwrap_or_else(|| panic!("{path} is not a number: {v}"));
    assert!(x > 0.0, "{path} = {x}");
}

/// Asserts every figure of each (section, names) is a positive number: `/<section>/<name>`.
fn positive_figures(report: &serde_json::Value, figures: &[(&str, &[&str])]) {
    for (section, names) in figures {
        for name in *names {
            positive(report, &format!("/{section}/{name}"));
        }
    }
}

#[test]
fn bench_runner_reports_memory_and_step_overhead() {
    let _runner = bin("flotilla-agent-runner"); // the bench starts it from next to `flotilla-bench`
    let report = bench(&["runner", "--agents", "50", "--tasks", "20", "--json"]);
    assert_eq!(report["runner"]["idle_agents"], 50);
    assert!(report["runner"]["rss_mib"].as_f64().unwrap() > 1.0);
    assert!(report["raw_nats_us"]["kv_get"].as_f64().unwrap() > 0.0);
    assert!(report["step"]["p50_us"].as_f64().unwrap() > 0.0);
    assert_eq!(report["step"]["tasks"], 20);
}

#[test]
fn bench_dispatcher_reports_every_figure() {
    let _runner = bin("flotilla-agent-runner"); // the bench starts two from next to `flotilla-bench`
    let started = std::time::Instant::now();
    let report = bench(&["dispatcher", "--quick", "--json"]);
    positive_figures(
        &report,
        &[
            ("raw", &["publish/per_s", "publish/in_flight", "pipeline/per_s", "pipeline/in_flight"]),
            ("throughput", &["per_s", "vs_pipeline", "server_msgs_in_per_task", "stored_per_task/total"]),
            ("latency", &["rate_per_s", "started_p50_ms", "started_p99_ms", "completed_p50_ms"]),
            (
                "latency",
                &[
                    "completed_p99_ms",
                    "stages_p50_ms/submit_to_started",
                    "stages_p50_ms/started_to_completed",
                ],
            ),
            ("scheduler", &["decision_p50_us", "decision_p99_us", "decision_max_us", "enqueue_per_s"]),
            (
                "scheduler",
                &["core_bytes_per_task", "record_cache_bytes_per_task", "core_and_cache_bytes_per_task"],
            ),
            (
                "profile/throughput",
                &["submission/wall_p50_us", "assign/wall_p50_us", "assign/open_on_average"],
            ),
            ("round_trips", &["total"]),
        ],
    );
    assert_eq!(report["throughput"]["tasks"], 100);
    assert_eq!(report["scheduler"]["queued"], 20_000);
    // (e) The cost of tracing: rounds off and on, spans really exported.
    let e = &report["tracing"];
    assert_eq!(e["rounds"].as_array().map(Vec::len), Some(4), "{e}");
    assert_eq!(e["rounds"][1]["tracing"], true);
    assert_eq!(e["rounds"][0]["tracing"], false);
    assert!(e["spans_exported"].as_u64().unwrap() >= 2 * 10 * 4, "every traced task exports its spans: {e}");
    for k in ["off_completed_p50_ms", "on_completed_p50_ms", "p50_ratio", "off_off_ratio"] {
        assert!(e[k].as_f64().unwrap() > 0.0, "{k}: {e}");
    }
    assert!(report["goals"]["tracing_p50"].is_boolean());
    assert_eq!(report["setup"]["runner_mode"], "processes");
    assert_eq!(report["setup"]["budgets"], false);
    assert!(report["throughput"]["ledger_entries_per_task"].is_null());
    for goal in ["throughput_vs_pipeline", "completed_p50", "completed_p99", "decision_p99", "memory_core"] {
        assert!(report["goals"][goal].is_boolean(), "goal {goal} missing");
    }
    // Latency is measured at half the measured throughput.
    let (rate, per_s) =
        (report["latency"]["rate_per_s"].as_f64().unwrap(), report["throughput"]["per_s"].as_f64().unwrap());
    assert!((rate - per_s / 2.0).abs() <= 1.0, "latency rate {rate} vs throughput {per_s}");
    eprintln!("bench dispatcher --quick took {:?}", started.elapsed());
}

#[test]
fn bench_dispatcher_with_budgets_reports_ledger_entries() {
    let _runner = bin("flotilla-agent-runner");
    let started = std::time::Instant::now();
    let report = bench(&["dispatcher", "--quick", "--budgets", "--json"]);
    assert_eq!(report["setup"]["budgets"], true, "{report}");
    assert_eq!(report["setup"]["runner_mode"], "processes");
    assert!(report["throughput"]["per_s"].as_f64().unwrap() > 0.0);
    assert!(report["latency"]["completed_p50_ms"].as_f64().unwrap() > 0.0);
    // Every task: one reservation and one commit (one model call), and its budget's close.
    for phase in ["throughput", "latency"] {
        let n = report[phase]["ledger_entries_per_task"].as_f64().unwrap();
        assert!((2.9..=3.2).contains(&n), "{phase}: {n} ledger entries per task");
    }
    assert!(report["throughput"]["stored_per_task"]["FLOTILLA_LEDGER"].as_f64().unwrap() > 0.0);
    eprintln!("bench dispatcher --quick --budgets took {:?}", started.elapsed());
}

#[test]
fn bench_budget_reports_reservations_next_to_raw_compare_and_swap() {
    let started = std::time::Instant::now();
    let report = bench(&["budget", "--quick", "--json"]);
    positive_figures(
        &report,
        &[
            (
                "raw",
                &[
                    "sequential_cas/per_s",
                    "sequential_read_cas/per_s",
                    "concurrent_cas/per_s",
                    "concurrent_cas/p50_ms",
                ],
            ),
            ("hot/reserve", &["per_s", "p99_ms", "keeper_rounds", "requests_per_round"]),
            ("hot", &["reserve_commit/per_s", "vs_sequential_cas"]),
            ("spread", &["reserve/per_s", "reserve_commit/per_s", "vs_concurrent_cas"]),
        ],
    );
    assert_eq!(report["setup"]["budgets"], 1000);
    assert_eq!(report["hot"]["reserve"]["ops"], 1000);
    assert_eq!(report["spread"]["reserve_commit"]["ops"], 500);
    // One ledger entry per reservation, two per reserve + commit cycle.
    assert_eq!(report["hot"]["reserve"]["ledger_writes_per_op"], 1.0);
    assert_eq!(report["spread"]["reserve_commit"]["ledger_writes_per_op"], 2.0);
    for goal in ["hot_vs_sequential_cas", "spread_vs_concurrent_cas"] {
        assert!(report["goals"][goal].is_boolean(), "goal {goal} missing");
    }
    eprintln!("bench budget --quick took {:?}", started.elapsed());
}

#[test]
fn bench_messages_reports_rates_next_to_raw_jetstream() {
    let report = bench(&["messages", "--quick", "--json"]);
    assert_eq!(report["messages"], 300);
    positive_figures(
        &report,
        &[("raw", &["per_s", "p50_ms", "p99_ms"]), ("flotilla", &["per_s", "p50_ms", "p99_ms"])],
    );
    positive(&report, "/rate_vs_raw");
    // Four consumers for the runner's agents, four for their template, whatever the agents.
    assert_eq!(report["message_consumers"], 8, "{report}");
}

#[test]
fn bench_recall_reports_latency_and_memory_per_vector() {
    let report = bench(&["recall", "--quick", "--json"]);
    assert_eq!(report["vectors"], 6000);
    assert_eq!(report["search"], "HNSW graph (usearch, f16)", "{report}");
    assert!(report["recall_at_5_vs_exact"].as_f64().unwrap() >= 0.9, "{report}");
    for f in ["/search_p50_ms", "/search_p99_ms", "/stream_end_round_trip_p50_ms", "/index_bytes_per_vector"]
    {
        positive(&report, f);
    }
    // At least the vector at half precision.
    assert!(report["index_bytes_per_vector"].as_f64().unwrap() >= 384.0 * 2.0, "{report}");
}

#[test]
fn bench_audit_reports_verification_and_export_rates_next_to_a_raw_read() {
    let report = bench(&["audit", "--quick", "--json"]);
    assert_eq!(report["events"], 2000);
    positive_figures(
        &report,
        &[
            ("raw_read", &["per_s", "records"]),
            ("verify", &["per_s", "records"]),
            ("export", &["per_s", "records"]),
        ],
    );
    // Events and ledger entries verified; every stream exported (with the records' own lines).
    assert_eq!(report["verify"]["records"], 2000 + 800, "{report}");
    positive(&report, "/replay_one_task_ms");
    positive(&report, "/verify_rate_vs_raw");
}

#[test]
fn bench_registry_reports_the_idle_fleets_cost_and_the_loss_of_a_runner() {
    let _runner = bin("flotilla-agent-runner"); // the bench starts them from next to `flotilla-bench`
    let report = bench(&["registry", "--quick", "--json"]);
    assert_eq!(report["idle_fleet"]["agents"], 400);
    positive_figures(
        &report,
        &[
            ("idle_fleet", &["registry_writes_per_s", "runner_record_writes_per_s", "raw_kv_puts_per_s"]),
            ("runner_killed", &["tasks_held", "all_requeued_after_s", "bound_s"]),
        ],
    );
    // One write per runner per heartbeat, not one per agent: 4 runners beat once a second.
    let writes = report["idle_fleet"]["registry_writes_per_s"].as_f64().unwrap();
    assert!(writes < 20.0, "{report}");
}
