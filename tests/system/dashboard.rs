//! The dashboard as a person sees it: Debian's headless Chromium, driven through ChromeDriver's
//! WebDriver protocol, loads the monitor's pages during a live run; the figures shown equal the
//! metrics on `/metrics`, they follow the run within a second, a task's page tells its story,
//! and approving a task from the page completes it. Screenshots go to
//! `$CARGO_TARGET_TMPDIR/screenshots` (and, with `FLOTILLA_UPDATE_SCREENSHOTS=1`, to `docs/`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use flotilla_protocol::{TaskState, TaskSubmission};
use flotilla_testkit::{ChildProcess, eventually, free_port, http_get};
use serde_json::{Value, json};

use crate::support::*;

/// A WebDriver session of a headless Chromium.
struct Browser {
    http: reqwest::Client,
    base: String,
    _driver: ChildProcess,
}

impl Browser {
    async fn start() -> Self {
        let chromium = std::env::var("FLOTILLA_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let driver_bin =
            std::env::var("FLOTILLA_CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        assert!(
            std::path::Path::new(&driver_bin).exists() && std::path::Path::new(&chromium).exists(),
            "Chromium and ChromeDriver are needed (scripts/install-browser installs Debian's)"
        );
        let port = free_port();
        let driver =
            ChildProcess::spawn(std::path::Path::new(&driver_bin), &[&format!("--port={port}")], &[])
                .unwrap();
        let http = flotilla_testkit::http_client();
        let root = format!("http://127.0.0.1:{port}");
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"]
            }
        } } });
        let session = eventually(Duration::from_secs(30), "a WebDriver session", || async {
            let r = http.post(format!("{root}/session")).json(&caps).send().await.ok()?;
            let v: Value = r.json().await.ok()?;
            v["value"]["sessionId"].as_str().map(str::to_owned)
        })
        .await;
        Self { http, base: format!("{root}/session/{session}"), _driver: driver }
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        v["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({ "url": url }))).await;
    }

    /// The text of the first element `css` matches, if there is one.
    async fn text(&self, css: &str) -> Option<String> {
        let found = self
            .cmd(reqwest::Method::POST, "/element", Some(json!({ "using": "css selector", "value": css })))
            .await;
        let id = found.as_object()?.values().next()?.as_str()?.to_owned();
        let t = self.cmd(reqwest::Method::GET, &format!("/element/{id}/text"), None).await;
        t.as_str().map(str::to_owned)
    }

    async fn click(&self, css: &str) {
        let found = self
            .cmd(reqwest::Method::POST, "/element", Some(json!({ "using": "css selector", "value": css })))
            .await;
        let id = found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no {css}: {found}"));
        self.cmd(reqwest::Method::POST, &format!("/element/{id}/click"), Some(json!({}))).await;
    }

    async fn screenshot(&self, name: &str) {
        let png = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), &bytes).unwrap();
        if std::env::var("FLOTILLA_UPDATE_SCREENSHOTS").is_ok_and(|v| v == "1") {
            let docs = flotilla_testkit::workspace_root().join("docs");
            std::fs::write(docs.join(name), &bytes).unwrap();
        }
    }

    async fn close(self) {
        let _ = self.http.delete(&self.base).send().await;
    }
}

/// The value of the sample `series` on `/metrics` (0 when absent); for a name ending in `{`,
/// the sum over all its label values.
fn sample(metrics: &str, series: &str) -> u64 {
    let value = |v: &str| v.trim().parse::<f64>().unwrap_or(0.0) as u64;
    if series.ends_with('{') {
        return metrics
            .lines()
            .filter(|l| l.starts_with(series))
            .filter_map(|l| l.rsplit_once(' ').map(|(_, v)| value(v)))
            .sum();
    }
    metrics.lines().find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' '))).map_or(0, value)
}

/// Each figure on the page and the series it shows.
const FIGURES: [(&str, &str); 6] = [
    ("#tasks-completed", "flotilla_task_events_total{kind=\"completed\"}"),
    ("#tasks-failed", "flotilla_task_events_total{kind=\"failed\"}"),
    ("#agents-idle", "flotilla_agents{status=\"idle\"}"),
    ("#agents-busy", "flotilla_agents{status=\"busy\"}"),
    ("#deadlocks-total", "flotilla_deadlocks_total"),
    ("#alerts-firing", "flotilla_alerts_firing{"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chromium_shows_the_live_fleet_as_the_metrics_count_it_and_approves_a_task() {
    let mut sys = System::with_dispatcher().await;
    let config = flotilla_monitor::Config {
        operator_creds: flotilla_testkit::operator_creds(sys.server.url()),
        ..Default::default()
    };
    let can_decide = config.operator_creds.is_some();
    let monitor = sys.start_monitor_configured("monitor-1", config).await;
    let fleet = "[[agent]]\nname = \"worker\"\ncapabilities = [\"work\"]\nconcurrency = 2\nreplicas = 2\n\n\
                 [[agent]]\nname = \"operator\"\ncapabilities = [\"ops\"]\ntools = [\"ask_human\"]\n";
    sys.start_runner("r1", fleet).await;
    sys.wait_for_agents("r1", 3).await;
    for i in 0..12 {
        let offline = if i % 4 == 0 { json!({ "fail": "boom" }) } else { json!({ "sleep_ms": 50 }) };
        sys.submit(&TaskSubmission {
            id: Some(format!("dash-{i:02}")),
            capability: "work".into(),
            input: json!({ "text": i, "_offline": offline }),
            max_attempts: Some(1),
            ..Default::default()
        })
        .await;
    }
    sys.submit(&TaskSubmission {
        id: Some("ship-it".into()),
        capability: "ops".into(),
        input: json!({ "text": "ship", "_offline": { "tool_calls": [
            { "name": "ask_human", "arguments": { "question": "Deploy v2 to production?" } }
        ] } }),
        ..Default::default()
    })
    .await;
    sys.wait_for_kind("completed", 9, Duration::from_secs(60)).await;
    sys.wait_for_kind("approval_requested", 1, Duration::from_secs(30)).await;

    let browser = Browser::start().await;
    let base = format!("http://{monitor}");
    browser.go(&format!("{base}/")).await;
    // Every figure the page shows is the metric's value (read until the two agree: both move).
    let shown = eventually(Duration::from_secs(30), "the page to show what /metrics counts", || async {
        let metrics = http_get(monitor, "/metrics").await;
        if browser.text("#runners").await.as_deref() != Some("r1") {
            return None;
        }
        let mut all = Vec::new();
        for (css, series) in FIGURES {
            let text = browser.text(css).await;
            let on_page: Option<u64> = text.as_deref().and_then(|t| t.trim().parse().ok());
            if on_page != Some(sample(&metrics, series)) {
                return None;
            }
            let on_page = on_page.unwrap_or_default();
            all.push((css, on_page));
        }
        Some(all)
    })
    .await;
    assert!(shown.iter().any(|(css, n)| *css == "#tasks-completed" && *n == 9), "{shown:?}");
    assert!(shown.iter().any(|(css, n)| *css == "#tasks-failed" && *n == 3), "{shown:?}");
    browser.screenshot("dashboard-overview.png").await;

    // `flotilla top` draws the same fleet (one frame, ratatui's test backend), finding the
    // monitor through its health reply.
    let (code, frame, err) =
        cli(sys.server.url(), &["top", "--once", "--width", "150", "--height", "40"]).await;
    assert_eq!(code, 0, "{err}");
    for want in [
        "completed 9",
        "failed 3",
        "r1-worker-0",
        "r1-operator-0",
        "queue by priority",
        "dead_letters",
        "agents 3/3",
    ] {
        assert!(frame.contains(want), "{want} in\n{frame}");
    }

    // Live: one more task completes, and the open page shows it within a second of the metrics.
    sys.submit(&TaskSubmission {
        id: Some("dash-live".into()),
        capability: "work".into(),
        ..Default::default()
    })
    .await;
    let counted = eventually(Duration::from_secs(30), "the metrics to count it", || async {
        let m = http_get(monitor, "/metrics").await;
        (sample(&m, FIGURES[0].1) == 10).then(Instant::now)
    })
    .await;
    eventually(Duration::from_secs(10), "the page to follow", || async {
        (browser.text("#tasks-completed").await?.trim() == "10").then_some(())
    })
    .await;
    let lag = counted.elapsed();
    println!("the dashboard followed the metrics within {lag:?}");
    assert!(
        lag <= Duration::from_millis(1500),
        "live within a second (a render and a poll of slack): {lag:?}"
    );

    // Approvals: the pending request, approved from the page.
    browser.go(&format!("{base}/#/approvals")).await;
    eventually(Duration::from_secs(10), "the pending approval", || async {
        browser.text("#view table").await.filter(|t| t.contains("ship-it") && t.contains("Deploy v2"))
    })
    .await;
    assert!(can_decide, "the test's server has authentication on, so an operator credential");
    browser.screenshot("dashboard-approvals.png").await;
    browser.click("button.approve[data-task='ship-it']").await;
    let done = eventually(Duration::from_secs(30), "the approved task to complete", || async {
        sys.task("ship-it").await.filter(|r| r.state == TaskState::Completed)
    })
    .await;
    assert_eq!(done.state, TaskState::Completed);
    let events = sys.wait_for_kind("approval_decided", 1, Duration::from_secs(10)).await;
    let decided = events.iter().find(|e| e.kind == "approval_decided").unwrap();
    assert_eq!(decided.actor.as_deref(), Some("test"), "the operator whose key signed it: {decided:?}");

    // The task's page: its timeline, attempt and trace.
    browser.go(&format!("{base}/#/task/ship-it")).await;
    let events = eventually(Duration::from_secs(10), "the task page", || async {
        browser.text("#task-events").await.filter(|t| t.contains("completed"))
    })
    .await;
    for kind in ["accepted", "assigned", "started", "approval_requested", "approval_decided", "completed"] {
        assert!(events.contains(kind), "{kind} in {events}");
    }
    assert_eq!(browser.text("#task-state").await.as_deref(), Some("completed"));
    assert_eq!(browser.text("#task-attempts").await.as_deref(), Some("1"));
    let trace = browser.text("#task-trace").await.unwrap();
    assert_eq!(trace.len(), 32, "a trace id: {trace}");
    browser.screenshot("dashboard-task.png").await;
    browser.close().await;
    sys.stop().await;
}
