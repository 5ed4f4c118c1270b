//! Observability: the monitor's figures are folded from the streams, so two monitors — one of
//! them started after the work, rebuilding from the stream — report the same, over HTTP, on
//! `/metrics` and through `flotilla stats`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use flotilla_protocol::{StatsReport, TaskSubmission};
use flotilla_testkit::{eventually, http_get};

use crate::support::*;

fn stats_of(body: &str) -> StatsReport {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_monitors_one_started_late_report_the_same_figures() {
    let mut sys = System::with_dispatcher().await;
    sys.start_runner("r1", &worker_fleet(2, 4)).await;
    sys.wait_for_agents("r1", 2).await;
    let early = sys.start_monitor_named("monitor-early").await;
    // 30 tasks in two tenants; every fifth fails for good.
    for i in 0..30 {
        let fail = i % 5 == 0;
        let offline = if fail { serde_json::json!({ "fail": "boom" }) } else { serde_json::json!({}) };
        sys.submit(&TaskSubmission {
            id: Some(format!("obs-{i:02}")),
            capability: "work".into(),
            tenant: Some(if i % 2 == 0 { "acme" } else { "globex" }.into()),
            input: serde_json::json!({ "text": i, "_offline": offline }),
            max_attempts: Some(1),
            ..Default::default()
        })
        .await;
    }
    sys.wait_for_kind("completed", 24, Duration::from_secs(60)).await;
    sys.wait_for_kind("failed", 6, Duration::from_secs(60)).await;
    let late = sys.start_monitor_named("monitor-late").await;

    let path = "/stats?window=1h&by=tenant";
    let (a, b) = eventually(Duration::from_secs(20), "both monitors to fold every event", || async {
        let (a, b) = (stats_of(&http_get(early, path).await), stats_of(&http_get(late, path).await));
        let done = |r: &StatsReport| r.groups.iter().map(|g| g.completed + g.failed).sum::<u64>() == 30;
        (done(&a) && done(&b) && a.events_seen == b.events_seen).then_some((a, b))
    })
    .await;
    assert_eq!(a.groups, b.groups, "the late monitor rebuilt the same figures from the stream");
    assert_eq!((a.monitor.as_str(), b.monitor.as_str()), ("monitor-early", "monitor-late"));
    for g in &a.groups {
        assert_eq!((g.submitted, g.completed, g.failed), (15, 12, 3), "{g:?}");
        assert_eq!(g.success_rate, Some(0.8), "{g:?}");
        assert!(g.queue_wait_p50_ms.is_some() && g.duration_p95_ms.is_some(), "{g:?}");
        // One call per completed task; a failed one's call failed and used nothing.
        assert_eq!(g.model_calls_per_task, Some(0.8), "{g:?}");
    }

    // The same figures through NATS, from whichever monitor answers.
    let (code, out, err) =
        cli(sys.server.url(), &["--json", "stats", "--window", "1h", "--by", "tenant"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(stats_of(out.trim()).groups, a.groups);
    let (code, out, _) = cli(sys.server.url(), &["stats"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("completed 24") && out.contains("success 80.0%"), "{out}");

    // Health: every service instance, every agent, the streams an operator may see.
    let (code, out, err) = cli(sys.server.url(), &["--json", "health"]).await;
    assert_eq!(code, 0, "{err}");
    let health: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let services: Vec<(String, String)> = health["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["service"].as_str().unwrap().to_owned(),
                s["details"]["role"].as_str().unwrap_or("-").to_owned(),
            )
        })
        .collect();
    for want in [("dispatcher", "active"), ("monitor", "-"), ("agent-runner", "-")] {
        assert!(
            services.iter().any(|(s, r)| s == want.0 && (want.1 == "-" || r == want.1)),
            "{want:?} in {services:?}"
        );
    }
    assert_eq!(services.iter().filter(|(s, _)| s == "monitor").count(), 2, "{services:?}");
    let agents: Vec<&str> =
        health["agents"].as_array().unwrap().iter().map(|a| a["agent_id"].as_str().unwrap()).collect();
    assert_eq!(agents, ["r1-worker-0", "r1-worker-1"]);
    assert!(
        health["streams"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["stream"] == "FLOTILLA_EVENTS" && s["messages"].as_u64() > Some(100)),
        "{}",
        health["streams"]
    );
    // The work queues' consumers and their lag, as the monitors sample them.
    let monitor = health["services"].as_array().unwrap().iter().find(|s| s["service"] == "monitor").unwrap();
    let consumers: Vec<&str> = monitor["details"]["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["consumer"].as_str().unwrap())
        .collect();
    assert!(consumers.contains(&"dispatcher-intake") && consumers.contains(&"runner-r1"), "{consumers:?}");
    let (code, out, _) = cli(sys.server.url(), &["health"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("SERVICE") && out.contains("r1-worker-0") && out.contains("runner-r1"), "{out}");

    // The Prometheus families, the same on both.
    let text = http_get(late, "/metrics").await;
    for line in [
        "flotilla_tasks_completed_total{capability=\"work\",template=\"worker\",tenant=\"acme\"} 12",
        "flotilla_tasks_failed_total{capability=\"work\",template=\"worker\",tenant=\"globex\"} 3",
        "flotilla_tasks_submitted_total{capability=\"work\",tenant=\"acme\",priority=\"normal\"} 15",
        "flotilla_task_queue_wait_seconds_count{capability=\"work\",priority=\"normal\"} 30",
        "flotilla_task_success_ratio{template=\"worker\",tenant=\"acme\"} 0.8",
        "flotilla_queue_backlog{capability=\"work\"} 0",
        // Reliability, from the agents' lifecycle events: no crash, so all of their time up.
        "flotilla_agent_uptime_ratio{template=\"worker\"} 1.0",
        "flotilla_agent_crashes_per_agent_hour{template=\"worker\"} 0.0",
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    sys.stop().await;
}

/// Every alert event so far.
async fn alerts(sys: &System) -> Vec<flotilla_protocol::AlertEvent> {
    sys.read_stream(&sys.names.events_stream(), &format!("{}.events.alert.>", sys.names.prefix()))
        .await
        .into_iter()
        .map(|(_, p)| flotilla_protocol::codec::decode(None, &p).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn alerts_fire_once_from_one_of_two_monitors_and_resolve() {
    let mut sys = System::with_dispatcher().await;
    let config = || flotilla_monitor::Config {
        lease: Duration::from_secs(1),
        alerts: flotilla_monitor::alerts::Thresholds {
            no_leader_after: Duration::from_secs(2),
            dead_letter_window: Duration::from_secs(60),
            expect_budget_keeper: false,
            ..Default::default()
        },
        ..Default::default()
    };
    sys.start_monitor_configured("monitor-a", config()).await;
    sys.start_monitor_configured("monitor-b", config()).await;
    // A dead letter: an undecodable submission.
    sys.submit_raw(b"\xc1 not a task".to_vec(), None).await;
    let fired = |kind: &'static str, state: &'static str| {
        move |a: &[flotilla_protocol::AlertEvent]| {
            a.iter().filter(|e| e.kind == kind && e.state == state).count()
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while fired("dead_letters", "firing")(&alerts(&sys).await) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no dead_letters alert: {:?}", alerts(&sys).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // No dispatcher: an alert after the threshold; back: resolved.
    sys.stop_dispatchers().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while fired("no_dispatcher", "firing")(&alerts(&sys).await) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no no_dispatcher alert: {:?}", alerts(&sys).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sys.start_dispatcher(dispatcher_config()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while fired("no_dispatcher", "resolved")(&alerts(&sys).await) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "not resolved: {:?}", alerts(&sys).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = alerts(&sys).await;
    assert_eq!(fired("no_dispatcher", "firing")(&all), 1, "two monitors, one alert: {all:?}");
    assert_eq!(fired("dead_letters", "firing")(&all), 1, "{all:?}");
    sys.stop().await;
}

/// Every metric name a PromQL expression of the Grafana dashboard uses.
fn dashboard_metrics() -> std::collections::BTreeSet<String> {
    let path = flotilla_testkit::workspace_root().join("docs/grafana/flotilla-fleet.json");
    let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut names = std::collections::BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("flotilla_") {
                let tail = &rest[i..];
                let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
                names.insert(tail[..end].to_owned());
                rest = &tail[end..];
            }
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_prometheus_scrapes_the_monitor_and_the_grafana_dashboard_asks_only_for_what_it_exports() {
    let mut sys = System::with_dispatcher().await;
    let monitor = sys.start_monitor().await;
    sys.start_runner("r1", &worker_fleet(1, 4)).await;
    sys.wait_for_agents("r1", 1).await;
    for i in 0..5 {
        sys.submit(&TaskSubmission {
            id: Some(format!("prom-{i}")),
            capability: "work".into(),
            ..Default::default()
        })
        .await;
    }
    sys.wait_for_kind("completed", 5, Duration::from_secs(30)).await;

    let prometheus = std::env::var("FLOTILLA_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: flotilla\n    static_configs:\n      - targets: ['{monitor}']\n"
        ),
    )
    .unwrap();
    let port = flotilla_testkit::free_port();
    let mut prom = flotilla_testkit::ChildProcess::spawn(
        std::path::Path::new(&prometheus),
        &[
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", dir.path().join("data").display()),
            &format!("--web.listen-address=127.0.0.1:{port}"),
        ],
        &[],
    )
    .unwrap_or_else(|e| panic!("{prometheus} (scripts/install-browser installs Debian's): {e}"));
    let http = flotilla_testkit::http_client();
    let query = "flotilla_tasks_completed_total";
    let value = eventually(Duration::from_secs(60), "Prometheus to scrape the monitor", || async {
        let url = format!("http://127.0.0.1:{port}/api/v1/query?query={query}");
        let v: serde_json::Value = http.get(url).send().await.ok()?.json().await.ok()?;
        let result = v["data"]["result"].as_array()?.first()?.clone();
        let n: f64 = result["value"][1].as_str()?.parse().ok()?;
        (n >= 5.0).then_some((n, result))
    })
    .await;
    assert_eq!(value.0, 5.0, "{:?}", value.1);
    assert_eq!(value.1["metric"]["job"], "flotilla");
    assert_eq!(value.1["metric"]["capability"], "work");

    // The Grafana dashboard in the repo queries only families the monitor exports: those on
    // /metrics now, or registered by the monitor (a family with no sample yet is not written).
    let text = http_get(monitor, "/metrics").await;
    let mut exported: std::collections::BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect();
    let source =
        std::fs::read_to_string(flotilla_testkit::workspace_root().join("services/monitor/src/metrics.rs"))
            .unwrap();
    let registered: Vec<String> = source
        .split("reg!(")
        .skip(1)
        .filter_map(|r| r.trim_start().strip_prefix('"')?.split('"').next().map(str::to_owned))
        .collect();
    assert!(
        registered.iter().all(|r| r.starts_with("flotilla_") || r.starts_with("gen_ai_")),
        "{registered:?}"
    );
    assert!(
        exported
            .iter()
            .filter(|e| e.starts_with("flotilla_"))
            .all(|e| registered.contains(e) || registered.iter().any(|r| e.starts_with(r.as_str()))),
        "{exported:?}"
    );
    exported.extend(registered);
    let names = dashboard_metrics();
    assert!(names.len() > 20, "{names:?}");
    for name in &names {
        let base =
            ["_total", "_bucket", "_count", "_sum"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        let known = exported.contains(base)
            || exported.contains(name.as_str())
            || exported.iter().any(|e| base.starts_with(e.as_str()) && base.len() - e.len() <= 8);
        assert!(known, "{name} is not on /metrics: {exported:?}");
    }
    prom.kill9();
    sys.stop().await;
}
