//! A scripted fleet run with known outcomes — successes, a retry, failures (one after spending),
//! approvals and a rejection, a delegation, a direct message, a crash, a cancel and a rejected
//! submission, every model call on the stub LLM with known token usage at a known price — and
//! every family of the monitor's figures equals what the script says, the cost-adjusted
//! completion rate included; the dispatcher hands over once mid-run (a leader change). Three
//! monitors see it: one that ran throughout, one stopped and restarted mid-run, and one started
//! after the run; all three report the same.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_agent_runner::tools::Registry;
use flotilla_protocol::{StatsGroup, StatsReport, TaskState, TaskSubmission};
use flotilla_testkit::stub_llm::{Reply, StubLlm};
use flotilla_testkit::{eventually, http_get};
use serde_json::json;

use crate::support::*;

/// Every model call of the run: this many tokens in and out, at these prices (USD per million).
const IN: u64 = 1000;
const OUT: u64 = 100;
const USD_IN: f64 = 2.0;
const USD_OUT: f64 = 10.0;
const CALL_USD: f64 = (IN as f64 * USD_IN + OUT as f64 * USD_OUT) / 1e6;

fn text() -> Reply {
    Reply::openai_text("done", IN, OUT)
}

fn tools(name: &str, args: serde_json::Value) -> Reply {
    Reply::openai_tools(&[(name, args)], IN, OUT)
}

/// A template on its own stub model (so each template's answers come in the script's order).
fn template(stub: &StubLlm, name: &str, tools: &str, concurrency: u32, extra: &str) -> String {
    format!(
        "[[agent]]\nname = \"{name}\"\ncapabilities = [\"{name}\"]\nprovider = \"openai\"\nmodel = \"stub-model\"\n\
         base_url = \"{}\"\nstream = false\ntools = [{tools}]\nconcurrency = {concurrency}\n{extra}\n",
        stub.openai_base()
    )
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum End {
    Completed,
    Failed,
    Cancelled,
}

/// What the script says about one task.
#[derive(Debug, Clone)]
struct Want {
    id: String,
    template: &'static str,
    tenant: &'static str,
    end: End,
    /// Model calls that answered (each IN + OUT tokens at CALL_USD).
    calls: u64,
    tool_calls: u64,
    retries: u64,
    escalated: bool,
    approved: u64,
    decided: u64,
    messages: u64,
}

fn want(id: &str, template: &'static str, tenant: &'static str, end: End, calls: u64) -> Want {
    Want {
        id: id.to_owned(),
        template,
        tenant,
        end,
        calls,
        tool_calls: 0,
        retries: 0,
        escalated: false,
        approved: 0,
        decided: 0,
        messages: 0,
    }
}

fn close(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * b.abs().max(1.0),
        (None, None) => true,
        _ => false,
    }
}

/// The figures of one group, from the script.
fn expected(tasks: &[&Want], rejected: u64) -> StatsGroup {
    let n = |f: &dyn Fn(&Want) -> u64| tasks.iter().map(|w| f(w)).sum::<u64>();
    let completed = n(&|w| u64::from(w.end == End::Completed));
    let finished = tasks.len() as u64;
    let per = |x: u64| (finished > 0).then(|| x as f64 / finished as f64);
    let calls = n(&|w| w.calls);
    let cost = calls as f64 * CALL_USD;
    let decided = n(&|w| w.decided);
    StatsGroup {
        key: String::new(),
        submitted: 0,
        completed,
        failed: finished - completed,
        rejected,
        cancelled: n(&|w| u64::from(w.end == End::Cancelled)),
        success_rate: per(completed),
        error_rate: per(finished - completed),
        queue_wait_p50_ms: None,
        queue_wait_p95_ms: None,
        duration_p50_ms: None,
        duration_p95_ms: None,
        input_tokens_per_task: per(calls * IN),
        output_tokens_per_task: per(calls * OUT),
        model_calls_per_task: per(calls),
        tool_calls_per_task: per(n(&|w| w.tool_calls)),
        retries_per_task: per(n(&|w| w.retries)),
        cost_usd: cost,
        cost_per_task_usd: per(1).map(|x| x * cost),
        escalation_rate: per(n(&|w| u64::from(w.escalated))),
        approval_rate: (decided > 0).then(|| n(&|w| w.approved) as f64 / decided as f64),
        successes_per_usd: (cost > 0.0).then(|| completed as f64 / cost),
        usd_per_success: (completed > 0).then(|| cost / completed as f64),
        requeues: 0,
        recovery_p95_ms: None,
        messages_per_task: per(n(&|w| w.messages)),
    }
}

/// Asserts a reported group against the script's, figure by figure.
fn check(got: &StatsGroup, want: &StatsGroup) {
    let key = &got.key;
    assert_eq!(
        (got.completed, got.failed, got.cancelled, got.rejected),
        (want.completed, want.failed, want.cancelled, want.rejected),
        "{key}: completed, failed, cancelled, rejected"
    );
    for (name, g, w) in [
        ("success_rate", got.success_rate, want.success_rate),
        ("error_rate", got.error_rate, want.error_rate),
        ("input_tokens_per_task", got.input_tokens_per_task, want.input_tokens_per_task),
        ("output_tokens_per_task", got.output_tokens_per_task, want.output_tokens_per_task),
        ("model_calls_per_task", got.model_calls_per_task, want.model_calls_per_task),
        ("tool_calls_per_task", got.tool_calls_per_task, want.tool_calls_per_task),
        ("retries_per_task", got.retries_per_task, want.retries_per_task),
        ("cost_usd", Some(got.cost_usd), Some(want.cost_usd)),
        ("cost_per_task_usd", got.cost_per_task_usd, want.cost_per_task_usd),
        ("escalation_rate", got.escalation_rate, want.escalation_rate),
        ("approval_rate", got.approval_rate, want.approval_rate),
        ("successes_per_usd", got.successes_per_usd, want.successes_per_usd),
        ("usd_per_success", got.usd_per_success, want.usd_per_success),
        ("messages_per_task", got.messages_per_task, want.messages_per_task),
    ] {
        assert!(close(g, w), "{key}: {name} is {g:?}, the script says {w:?}\n{got:#?}");
    }
    assert!(got.queue_wait_p50_ms.is_some() || got.completed + got.failed == 0, "{got:?}");
}

async fn stats(addr: std::net::SocketAddr, by: &str) -> StatsReport {
    let body = http_get(addr, &format!("/stats?window=1h&by={by}")).await;
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The counters and histograms of `/metrics` (what must not depend on when a monitor started).
async fn counters(addr: std::net::SocketAddr) -> Vec<String> {
    let text = http_get(addr, "/metrics").await;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let name = l.split(['{', ' ']).next().unwrap_or_default();
            // Sampled or live figures: consumer lag, alerts, agents now, waits now, uptime so
            // far; and budget ledger entries, counted from when a monitor starts.
            let live = [
                "flotilla_consumer_",
                "flotilla_alerts_",
                "flotilla_agent_uptime",
                "flotilla_agents",
                "flotilla_agent_crashes_per",
                "flotilla_waits_open",
                "flotilla_queue_",
                "flotilla_budget_ledger",
                "flotilla_dead_letters",
            ];
            name.starts_with("flotilla_") && !live.iter().any(|p| name.starts_with(p))
                || name.starts_with("gen_ai_")
        })
        .map(str::to_owned)
        .collect()
}

async fn ended(sys: &System, id: &str) -> flotilla_protocol::TaskRecord {
    eventually(Duration::from_secs(60), &format!("{id} to end"), || async {
        sys.task(id).await.filter(|r| matches!(r.state, TaskState::Completed | TaskState::Failed))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scripted_run_yields_the_figures_the_script_says_on_every_monitor() {
    let mut sys = System::with_dispatcher().await;
    sys.start_budget_keeper().await;
    let url = sys.server.url().to_owned();
    eventually(Duration::from_secs(20), "the price to be set", || async {
        let (code, _, _) = cli(
            &url,
            &[
                "budget",
                "price",
                "stub-model",
                "--input",
                &USD_IN.to_string(),
                "--output",
                &USD_OUT.to_string(),
            ],
        )
        .await;
        (code == 0).then_some(())
    })
    .await;
    let names = ["writer", "tooler", "flaky", "asker", "lead", "helper", "fragile", "slow"];
    let mut stubs = BTreeMap::new();
    for n in names {
        stubs.insert(n, StubLlm::start(Vec::new()).await);
    }
    stubs["writer"].set_fallback(text());
    stubs["helper"].set_fallback(text());
    stubs["slow"].set_fallback(text().delayed(Duration::from_secs(120)));
    let fleet = [
        template(&stubs["writer"], "writer", "", 4, ""),
        template(&stubs["tooler"], "tooler", "\"memory_put\"", 1, ""),
        template(&stubs["flaky"], "flaky", "\"memory_put\"", 1, "[agent.retry]\nmax_attempts = 1\n"),
        template(&stubs["asker"], "asker", "\"ask_human\"", 2, ""),
        template(&stubs["lead"], "lead", "\"delegate\", \"send_message\"", 1, ""),
        template(&stubs["helper"], "helper", "", 2, ""),
        template(&stubs["fragile"], "fragile", "\"flaky\"", 1, ""),
        template(&stubs["slow"], "slow", "", 1, ""),
    ]
    .concat();
    let mut registry = Registry::with_builtins().unwrap();
    registry.add(Arc::new(crate::agent_loop::Flaky::default())).unwrap();
    sys.start_runner_with_tools("rs", &fleet, registry).await;
    sys.wait_for_agents("rs", names.len()).await;
    let (_, throughout) = sys.start_monitor_stoppable("m-throughout").await;
    let (restarted_handle, _) = sys.start_monitor_stoppable("m-restarted").await;

    let submit = |id: &str, template: &str, tenant: &str, max_attempts: Option<u32>| TaskSubmission {
        id: Some(id.to_owned()),
        capability: template.to_owned(),
        tenant: Some(tenant.to_owned()),
        input: json!(format!("task {id}")),
        max_attempts,
        ..Default::default()
    };
    let mut script: Vec<Want> = Vec::new();

    // Six plain successes in two tenants.
    for i in 0..6 {
        let tenant = if i < 4 { "acme" } else { "globex" };
        sys.submit(&submit(&format!("w{i}"), "writer", tenant, None)).await;
        script.push(want(&format!("w{i}"), "writer", tenant, End::Completed, 1));
    }
    // Two tasks that call a tool, then answer.
    for i in 0..2 {
        let id = format!("t{i}");
        stubs["tooler"].push([tools("memory_put", json!({ "key": id, "value": "v" })), text()]);
        sys.submit(&submit(&id, "tooler", "acme", None)).await;
        assert_eq!(ended(&sys, &id).await.state, TaskState::Completed);
        script.push(Want { tool_calls: 1, ..want(&id, "tooler", "acme", End::Completed, 2) });
    }
    // A retry: the first attempt pays for a tool step, then its call fails (a server error);
    // the second answers. The task's figures count both attempts' spend.
    stubs["flaky"].push([
        tools("memory_put", json!({ "key": "first", "value": "v" })),
        Reply::raw(500, "{\"error\":\"overloaded\"}"),
        text(),
    ]);
    sys.submit(&submit("retry-ok", "flaky", "acme", Some(2))).await;
    assert_eq!(ended(&sys, "retry-ok").await.state, TaskState::Completed);
    script.push(Want { retries: 1, tool_calls: 1, ..want("retry-ok", "flaky", "acme", End::Completed, 2) });
    // A failure after spending: a tool step answered and paid, then the model refuses.
    stubs["flaky"].push([
        tools("memory_put", json!({ "key": "spent", "value": "v" })),
        Reply::raw(400, "{\"error\":\"refused\"}"),
    ]);
    sys.submit(&submit("spent-fail", "flaky", "acme", Some(1))).await;
    assert_eq!(ended(&sys, "spent-fail").await.state, TaskState::Failed);
    script.push(Want { tool_calls: 1, ..want("spent-fail", "flaky", "acme", End::Failed, 1) });

    // Mid-run: one monitor stops, to start again later under the same name; and the dispatcher
    // hands over to a second one (a leader change).
    sys.stop_service(&restarted_handle).await;
    sys.start_dispatcher(dispatcher_config()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    sys.stop_first_dispatcher().await;

    // Two tasks ask a human: one approved, one rejected.
    stubs["asker"].push([
        tools("ask_human", json!({ "question": "ship it?" })),
        tools("ask_human", json!({ "question": "drop it?" })),
    ]);
    sys.submit(&submit("appr-yes", "asker", "acme", None)).await;
    sys.wait_for_kind("approval_requested", 1, Duration::from_secs(30)).await;
    sys.submit(&submit("appr-no", "asker", "acme", None)).await;
    sys.wait_for_kind("approval_requested", 2, Duration::from_secs(30)).await;
    stubs["asker"].push([text()]);
    let (code, _, err) = cli(&url, &["approve", "appr-yes"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(ended(&sys, "appr-yes").await.state, TaskState::Completed);
    let (code, _, err) = cli(&url, &["reject", "appr-no", "--comment", "no"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(ended(&sys, "appr-no").await.state, TaskState::Failed);
    let asked =
        Want { tool_calls: 1, escalated: true, decided: 1, ..want("", "asker", "acme", End::Completed, 2) };
    script.push(Want { id: "appr-yes".into(), approved: 1, ..asked.clone() });
    script.push(Want { id: "appr-no".into(), end: End::Failed, calls: 1, ..asked });

    // A delegation and a direct message answered, in the other tenant.
    stubs["lead"].push([
        tools("delegate", json!({ "capability": "helper", "input": "a detail" })),
        tools("send_message", json!({ "agent": "rs-helper-0", "message": "all good?", "wait_reply": true })),
        text(),
    ]);
    sys.submit(&submit("lead-1", "lead", "globex", None)).await;
    let lead = ended(&sys, "lead-1").await;
    assert_eq!(lead.state, TaskState::Completed, "{lead:?}");
    let child = lead.children[0].clone();
    script.push(Want { tool_calls: 2, messages: 1, ..want("lead-1", "lead", "globex", End::Completed, 3) });
    script.push(want(&child, "helper", "globex", End::Completed, 1));

    // The restarted monitor is back, rebuilding from the streams.
    let (_, restarted) = sys.start_monitor_stoppable("m-restarted").await;

    // A crash: the tool panics, the attempt runs again and completes.
    stubs["fragile"].push([tools("flaky", json!({})), tools("flaky", json!({})), text()]);
    sys.submit(&submit("crashy", "fragile", "acme", None)).await;
    assert_eq!(ended(&sys, "crashy").await.state, TaskState::Completed);
    // The task's figures hold the calls of the run that completed; the crashed run's call is
    // charged in the budget ledger only (its record was never written).
    script.push(Want { tool_calls: 1, ..want("crashy", "fragile", "acme", End::Completed, 2) });

    // A cancel while the model thinks.
    sys.submit(&submit("cancel-me", "slow", "acme", None)).await;
    eventually(Duration::from_secs(20), "cancel-me to run", || async {
        sys.events().await.into_iter().find(|e| e.task_id == "cancel-me" && e.kind == "started")
    })
    .await;
    let (code, _, err) = cli(&url, &["cancel", "cancel-me"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(ended(&sys, "cancel-me").await.state, TaskState::Failed);
    // The call in flight never answered: no usage (its reservation is settled in the ledger).
    script.push(want("cancel-me", "slow", "acme", End::Cancelled, 0));

    // A submission the intake rejects.
    sys.submit(&TaskSubmission { budget_tokens: Some(0), ..submit("bad", "writer", "acme", None) }).await;
    sys.wait_for_kind("rejected", 1, Duration::from_secs(20)).await;
    for w in script.iter().filter(|w| w.template == "writer") {
        assert_eq!(ended(&sys, &w.id).await.state, TaskState::Completed);
    }

    let late = sys.start_monitor_named("m-late").await;
    let monitors = [("throughout", throughout), ("restarted", restarted), ("late", late)];
    let total = script.len() as u64 + 1;
    for (name, addr) in monitors {
        eventually(Duration::from_secs(30), &format!("monitor {name} to see every task"), || async {
            let r = stats(addr, "tenant").await;
            let seen: u64 = r.groups.iter().map(|g| g.completed + g.failed + g.rejected).sum();
            (seen == total).then_some(())
        })
        .await;
    }

    // Every family, by template and by tenant, as the script says.
    for (by, key_of) in
        [("template", (|w: &Want| w.template) as fn(&Want) -> &str), ("tenant", |w: &Want| w.tenant)]
    {
        let report = stats(throughout, by).await;
        let mut keys: Vec<&str> = script.iter().map(key_of).collect();
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            let tasks: Vec<&Want> = script.iter().filter(|w| key_of(w) == key).collect();
            // The rejected submission counts for its tenant (it never reached a template).
            let rejected = u64::from(by == "tenant" && key == "acme");
            let got = report
                .groups
                .iter()
                .find(|g| g.key == key)
                .unwrap_or_else(|| panic!("{by} {key}: {report:?}"));
            check(got, &expected(&tasks, rejected));
        }
    }
    let all = stats(throughout, "all").await;
    let everything: Vec<&Want> = script.iter().collect();
    check(&all.groups[0], &expected(&everything, 1));
    assert_eq!(all.groups[0].submitted, total, "{:?}", all.groups[0]);

    // The Prometheus families say the same.
    let text = http_get(throughout, "/metrics").await;
    let successes = script.iter().filter(|w| w.end == End::Completed).count();
    let cost: f64 = script.iter().map(|w| w.calls as f64 * CALL_USD).sum();
    for line in [
        "flotilla_tasks_completed_total{capability=\"writer\",template=\"writer\",tenant=\"acme\"} 4"
            .to_owned(),
        "flotilla_tasks_completed_total{capability=\"writer\",template=\"writer\",tenant=\"globex\"} 2"
            .to_owned(),
        "flotilla_tasks_failed_total{capability=\"flaky\",template=\"flaky\",tenant=\"acme\"} 1".to_owned(),
        "flotilla_tasks_cancelled_total{capability=\"slow\",template=\"slow\",tenant=\"acme\"} 1".to_owned(),
        "flotilla_tasks_rejected_total{tenant=\"acme\"} 1".to_owned(),
        "flotilla_task_retries_total{capability=\"flaky\"} 1".to_owned(),
        "flotilla_approvals_total{decision=\"approved\"} 1".to_owned(),
        "flotilla_approvals_total{decision=\"rejected\"} 1".to_owned(),
        "flotilla_approval_ratio 0.5".to_owned(),
        "flotilla_tasks_escalated_total{template=\"asker\",tenant=\"acme\"} 2".to_owned(),
        "flotilla_task_escalation_ratio{template=\"asker\",tenant=\"acme\"} 1.0".to_owned(),
        // The message and its reply.
        "flotilla_messages_total{kind=\"sent\"} 2".to_owned(),
        "flotilla_messages_total{kind=\"answered\"} 1".to_owned(),
        "flotilla_handoff_success_ratio 1.0".to_owned(),
        "flotilla_agent_crashes_total{template=\"fragile\"} 1".to_owned(),
        "flotilla_leader_changes_total{service=\"dispatcher\"} 1".to_owned(),
        format!(
            "flotilla_model_calls_total{{model=\"stub-model\"}} {}",
            script.iter().map(|w| w.calls).sum::<u64>()
        ),
        format!(
            "flotilla_model_tokens_total{{model=\"stub-model\",direction=\"input\"}} {}",
            script.iter().map(|w| w.calls * IN).sum::<u64>()
        ),
    ] {
        assert!(text.contains(&line), "missing {line} in\n{text}");
    }
    let gauge = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    let cost_total: f64 = text
        .lines()
        .filter(|l| l.starts_with("flotilla_cost_usd_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!((cost_total - cost).abs() < 1e-9, "cost {cost_total} vs the script's {cost}");
    // The cost-adjusted completion rate of acme's writers: 4 successes, 4 calls.
    let per_usd =
        gauge("flotilla_successful_tasks_per_usd{template=\"writer\",tenant=\"acme\",window=\"1h\"}");
    assert!((per_usd - 1.0 / CALL_USD).abs() < 1e-6, "{per_usd}");
    let usd_per = gauge("flotilla_usd_per_successful_task{template=\"flaky\",tenant=\"acme\",window=\"1h\"}");
    assert!(
        (usd_per - 3.0 * CALL_USD).abs() < 1e-12,
        "flaky: one success paying for its failed attempt and a failed task too: {usd_per}"
    );
    assert_eq!(successes, 13);

    // The three monitors agree: figures and counters.
    for by in ["template", "tenant", "all"] {
        let a = stats(throughout, by).await;
        for (name, addr) in [("restarted", restarted), ("late", late)] {
            let b = stats(addr, by).await;
            assert_eq!(a.groups, b.groups, "by {by}: the {name} monitor differs");
        }
    }
    let a = counters(throughout).await;
    for (name, addr) in [("restarted", restarted), ("late", late)] {
        let b = counters(addr).await;
        let (only_a, only_b): (Vec<&String>, Vec<&String>) =
            (a.iter().filter(|l| !b.contains(l)).collect(), b.iter().filter(|l| !a.contains(l)).collect());
        assert!(
            only_a.is_empty() && only_b.is_empty(),
            "the {name} monitor differs:\n{only_a:#?}\nvs\n{only_b:#?}"
        );
    }
    sys.stop().await;
}
