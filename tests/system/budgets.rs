//! Budgets end to end: `flotilla budget set|show` against a running budget-keeper next to a
//! reservation made by a plain JSON client; runners that reserve before every model call (a task
//! whose budget cannot pay its first call fails before the model is asked; an agent that used up
//! its rolling budget fails or waits per policy; three runners share one rate limit, interactive
//! tasks first; a child's budget is carved out of its parent's and the rest refunded).

use std::time::Duration;

use flotilla_budget_keeper::ledger::Ledger;
use flotilla_protocol::{
    CloseRequest, LedgerChange, LedgerEntry, PriceRequest, Priority, RateRequest, SetRequest, ShowRequest,
    TaskEvent, TaskSubmission, WireFormat, codec,
};
use flotilla_service::budget::Client;
use flotilla_service::{Fleet, StreamSettings};
use flotilla_testkit::stub_llm::{Reply, StubLlm};
use serde_json::json;

use crate::support::{System, cli, dispatcher_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn budgets_are_set_and_shown_from_the_cli() {
    let mut sys = System::start(StreamSettings::default(), WireFormat::Msgpack).await;
    sys.start_budget_keeper().await;
    let url = sys.server.url().to_owned();
    let set =
        flotilla_testkit::eventually(Duration::from_secs(10), "the budget-keeper to answer", || async {
            let (code, out, _) = cli(&url, &["budget", "set", "tenant.acme", "5000", "--window", "1h"]).await;
            (code == 0).then_some(out)
        })
        .await;
    assert!(set.contains("tenant.acme: limit 5000 tokens per rolling 1h"), "{set}");

    // Any client holds tokens with a JSON request.
    let reply = sys
        .client
        .request(
            sys.names.budget_subject("reserve"),
            br#"{"id": "call-1", "scopes": ["tenant.acme"], "want": 1200, "min": 100}"#.to_vec().into(),
        )
        .await
        .unwrap();
    let r: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(r["tokens"], 1200, "{r}");

    let (code, out, err) = cli(&url, &["--json", "budget", "show", "tenant.acme"]).await;
    assert_eq!(code, 0, "{err}");
    let b: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!((b["limit_tokens"].as_u64(), b["window_ms"].as_u64()), (Some(5000), Some(3_600_000)));
    assert_eq!(
        (b["used"].as_u64(), b["held"].as_u64(), b["available"].as_u64()),
        (Some(0), Some(1200), Some(3800))
    );

    let (code, _, err) = cli(&url, &["budget", "show", "tenant.nobody"]).await;
    assert_eq!(code, 3, "an unknown scope exits 3: {err}");
    assert!(err.contains("unknown_scope"), "{err}");

    // A class default, a rate limit and a price.
    let (code, out, err) = cli(
        &url,
        &["budget", "set", "agent.*", "500", "--window", "1h", "--policy", "wait", "--warn-at", "50"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("agent.*: limit 500 tokens per rolling 1h, policy wait"), "{out}");
    assert!(out.contains("warnings at 50 %"), "{out}");
    let (code, out, err) = cli(&url, &["budget", "rate", "openai/m", "--rpm", "10", "--tpm", "5000"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("openai/m: 10 requests and 5000 tokens per 1m"), "{out}");
    let (code, out, _) = cli(&url, &["--json", "budget", "rate", "openai/m"]).await;
    assert_eq!(code, 0);
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!((r["rpm"].as_u64(), r["requests"].as_u64()), (Some(10), Some(0)), "{r}");
    let (code, out, err) = cli(&url, &["budget", "price", "m", "--input", "0.15", "--output", "0.6"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("m: $0.15 per million input tokens, $0.6 per million output tokens"), "{out}");
    let (code, _, err) = cli(&url, &["budget", "set", "tenant.acme", "10", "--policy", "sometimes"]).await;
    assert_eq!(code, 2, "a bad policy is a usage error: {err}");

    // The ledger, for audit: every change in order, filtered by scope on request.
    let (code, out, err) = cli(&url, &["budget", "ledger", "--scope", "tenant.acme"]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].contains("set") && lines[0].contains("limit=5000"), "{out}");
    assert!(
        lines[1].contains("reserve") && lines[1].contains("call-1") && lines[1].contains("granted=1200"),
        "{out}"
    );
    let (code, out, _) = cli(&url, &["--json", "budget", "ledger"]).await;
    assert_eq!(code, 0);
    let ops: Vec<String> =
        out.lines().map(|l| serde_json::from_str::<LedgerEntry>(l).unwrap().op().to_string()).collect();
    assert_eq!(ops, ["set", "reserve", "set", "rate", "price"], "{out}");
    // Who changed what: the operator who signed each control operation (the CLI runs as
    // operator `test`); a runner's reservation is no control operation.
    let actors: Vec<Option<String>> =
        out.lines().map(|l| serde_json::from_str::<LedgerEntry>(l).unwrap().actor).collect();
    let test = Some("test".to_owned());
    assert_eq!(actors, [test.clone(), None, test.clone(), test.clone(), test], "{out}");
    assert!(lines[0].contains("by=test"), "{}", lines[0]);
    // An unsigned control operation is refused, and changes nothing.
    let unsigned = sys
        .client
        .request(
            sys.names.budget_subject("set"),
            br#"{"scope": "tenant.acme", "limit_tokens": 1}"#.to_vec().into(),
        )
        .await
        .unwrap();
    let r: serde_json::Value = serde_json::from_slice(&unsigned.payload).unwrap();
    assert_eq!(r["error"]["code"], "unauthorized", "{r}");
    let (_, out, _) = cli(&url, &["--json", "budget", "show", "tenant.acme"]).await;
    let b: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_ne!(b["limit_tokens"].as_u64(), Some(1), "{b}");
    sys.stop().await;
}

/// A client of the budget-keeper on the test's connection.
fn keeper(sys: &System) -> Client {
    let fleet = Fleet::new(sys.client.clone(), sys.names.clone(), WireFormat::Msgpack, "test".into());
    // As the test server's operator: control operations are signed.
    match flotilla_testkit::operator_creds(sys.server.url()) {
        Some(creds) => {
            Client::new(fleet).signed_by(flotilla_service::auth::Credentials::load(&creds).unwrap())
        }
        None => Client::new(fleet),
    }
}

/// An `openai` template on the stub.
fn stub_fleet(stub: &StubLlm, name: &str, caps: &str, extra: &str) -> String {
    format!(
        "[[agent]]\nname = \"{name}\"\ncapabilities = [{caps}]\nprovider = \"openai\"\nmodel = \"stub-model\"\n\
         base_url = \"{}\"\nsystem_prompt = \"Be brief.\"\nstream = false\n{extra}\n",
        stub.openai_base()
    )
}

/// The task's terminal event (waits for it).
async fn outcome(sys: &System, id: &str) -> TaskEvent {
    flotilla_testkit::eventually(Duration::from_secs(30), "the task to end", || async {
        sys.events()
            .await
            .into_iter()
            .find(|e| e.task_id == id && (e.kind == "completed" || e.kind == "failed"))
    })
    .await
}

async fn submit(sys: &System, id: &str, cap: &str, priority: Option<Priority>, budget: Option<u64>) {
    sys.submit(&TaskSubmission {
        id: Some(id.into()),
        capability: cap.into(),
        input: json!(format!("task {id}")),
        priority,
        budget_tokens: budget,
        ..Default::default()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_whose_budget_cannot_pay_the_first_call_fails_before_the_model_is_asked() {
    let stub = StubLlm::start(Vec::new()).await;
    stub.set_fallback(Reply::openai_text("hi", 10, 2));
    let mut sys = System::start(StreamSettings::default(), WireFormat::Msgpack).await;
    sys.start_budget_keeper().await;
    sys.start_dispatcher(dispatcher_config()).await;
    sys.start_runner("r1", &stub_fleet(&stub, "w", "\"work\"", "")).await;
    sys.wait_for_agents("r1", 1).await;
    // 20 tokens cannot hold the prompt and the least completion worth asking for.
    submit(&sys, "tiny", "work", None, Some(20)).await;
    let e = outcome(&sys, "tiny").await;
    assert_eq!(e.kind, "failed");
    assert_eq!(e.error.as_ref().unwrap().code, "budget_exceeded", "{e:?}");
    assert!(stub.requests().is_empty(), "no request reached the model");
    // The same task with enough budget runs, priced.
    let price =
        PriceRequest { model: "stub-model".into(), input_usd_per_mtok: 1.0, output_usd_per_mtok: 4.0 };
    keeper(&sys).call(&price).await.unwrap();
    submit(&sys, "enough", "work", None, Some(5_000)).await;
    let e = outcome(&sys, "enough").await;
    assert_eq!(e.kind, "completed", "{e:?}");
    // 10 input tokens at $1/M and 2 output tokens at $4/M.
    assert!((e.cost_usd.unwrap() - 18e-6).abs() < 1e-12, "{e:?}");
    assert!((e.calls[0].cost_usd.unwrap() - 18e-6).abs() < 1e-12);
    let b = keeper(&sys).call(&show("tenant.default")).await.unwrap().budget.unwrap();
    assert_eq!(b.used, 12, "the tenant's usage is counted");
    assert!((b.cost_usd - 18e-6).abs() < 1e-12);
    // The task's own budget closed when it ended.
    let t = keeper(&sys).call(&show("task.enough")).await.unwrap().budget.unwrap();
    assert!(t.closed_at_ms.is_some());
    sys.stop().await;
}

fn show(scope: &str) -> ShowRequest {
    ShowRequest { scope: Some(scope.into()), ..Default::default() }
}

/// Runs tasks one after another until one fails; returns how many completed first.
async fn exhaust(sys: &System, prefix: &str) -> (usize, TaskEvent) {
    for i in 0..20 {
        let id = format!("{prefix}{i}");
        submit(sys, &id, "work", None, None).await;
        let e = outcome(sys, &id).await;
        if e.kind == "failed" {
            return (i, e);
        }
    }
    panic!("the agent's budget never ran out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_that_used_up_its_hourly_budget_fails_or_waits_per_policy_until_the_window_rolls() {
    let stub = StubLlm::start(Vec::new()).await;
    stub.set_fallback(Reply::openai_text("done", 150, 50));
    let mut sys = System::start(StreamSettings::default(), WireFormat::Msgpack).await;
    sys.start_budget_keeper().await;
    let k = keeper(&sys);
    // Every agent: 600 tokens per rolling 6 s ("hourly", shortened), failing when out.
    let window = 6_000;
    let set = |policy: &str| SetRequest {
        scope: "agent.*".into(),
        limit_tokens: 600,
        window_ms: Some(window),
        policy: Some(policy.into()),
        ..Default::default()
    };
    k.call(&set("fail")).await.unwrap();
    sys.start_dispatcher(dispatcher_config()).await;
    sys.start_runner("r1", &stub_fleet(&stub, "w", "\"work\"", "")).await;
    sys.wait_for_agents("r1", 1).await;

    let calls_before = stub.requests().len();
    let (done, failed) = exhaust(&sys, "f").await;
    assert!(done >= 2, "some tasks ran first ({done})");
    assert_eq!(failed.error.as_ref().unwrap().code, "budget_exceeded", "{failed:?}");
    assert!(failed.error.as_ref().unwrap().message.contains("agent.r1-w-"), "{failed:?}");
    assert_eq!(stub.requests().len() - calls_before, done, "the refused call never reached the model");
    // Once the window has rolled the agent works again.
    tokio::time::sleep(Duration::from_millis(window + window / 60 + 200)).await;
    submit(&sys, "after-roll", "work", None, None).await;
    assert_eq!(outcome(&sys, "after-roll").await.kind, "completed");

    // With the policy `wait`, a task the budget cannot take waits for the window instead: after
    // a fresh window, `done` tasks fit, and the next one waits for the first of them to roll out.
    k.call(&set("wait")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(window + window / 60 + 200)).await;
    let start = std::time::Instant::now();
    for i in 0..done {
        submit(&sys, &format!("w{i}"), "work", None, None).await;
        assert_eq!(outcome(&sys, &format!("w{i}")).await.kind, "completed");
    }
    let filled = start.elapsed();
    let submitted = std::time::Instant::now();
    submit(&sys, "waiter", "work", None, None).await;
    let e = outcome(&sys, "waiter").await;
    assert_eq!(e.kind, "completed", "with policy wait nothing fails: {e:?}");
    let waited = submitted.elapsed();
    // It could run only once the first task's usage had left the window: about `window` after
    // filling it began, less the time filling it took.
    let due = Duration::from_millis(window).saturating_sub(filled);
    assert!(
        waited + Duration::from_millis(300) >= due,
        "it ran before the window rolled: {waited:?} < {due:?}"
    );
    assert!(
        waited < Duration::from_millis(window) + Duration::from_secs(5),
        "it waited too long: {waited:?}"
    );
    let entries = sys.read_stream(&sys.names.ledger_stream(), &sys.names.ledger_all()).await;
    let ops: Vec<String> = entries
        .iter()
        .map(|(_, p)| codec::decode::<LedgerEntry>(None, p).unwrap().op().to_string())
        .collect();
    for kind in ["warning", "exhausted", "refilled"] {
        assert!(ops.iter().any(|o| o == kind), "a {kind} entry is in the ledger: {ops:?}");
    }
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_runners_share_sixty_requests_a_minute_and_interactive_tasks_go_first() {
    let stub = StubLlm::start(Vec::new()).await;
    stub.set_fallback(Reply::openai_text("ok", 5, 1));
    let mut sys = System::start(StreamSettings::default(), WireFormat::Msgpack).await;
    sys.start_budget_keeper().await;
    let rate = RateRequest { rate: "openai/stub-model".into(), rpm: Some(60), ..Default::default() };
    keeper(&sys).call(&rate).await.unwrap();
    // A loaded machine may delay heartbeats: agents must not be declared lost (their tasks would
    // run again as new attempts and reach the keeper in another order) during this long test.
    sys.start_dispatcher(flotilla_dispatcher::Config { missed_heartbeats: 30, ..dispatcher_config() }).await;
    let fleet = stub_fleet(&stub, "w", "\"work\"", "concurrency = 40\nreplicas = 1");
    for r in ["r1", "r2", "r3"] {
        sys.start_runner(r, &fleet).await;
    }
    for r in ["r1", "r2", "r3"] {
        sys.wait_for_agents(r, 1).await;
    }
    // 75 batch tasks: 60 get permits now, 15 wait for the minute to roll.
    for i in 0..75 {
        submit(&sys, &format!("b{i}"), "work", Some(Priority::BATCH), None).await;
    }
    flotilla_testkit::eventually(Duration::from_secs(30), "60 calls", || async {
        (stub.requests().len() >= 60).then_some(())
    })
    .await;
    // Then 10 interactive tasks: they wait too, and go first when permits free up.
    for i in 0..10 {
        submit(&sys, &format!("i{i}"), "work", Some(Priority::INTERACTIVE), None).await;
    }
    sys.wait_for_kind("completed", 85, Duration::from_secs(150)).await;

    // At most 60 calls reached the model in any one-minute window.
    let at = stub.arrivals();
    assert_eq!(at.len(), 85);
    for (i, start) in at.iter().enumerate() {
        let n = at[i..].iter().take_while(|t| t.duration_since(*start) < Duration::from_secs(60)).count();
        assert!(n <= 60, "{n} calls within a minute from call {i}");
    }
    // Permits in the ledger's order: after the first 60, every interactive task before the
    // batch tasks that had been waiting longer.
    let entries = sys.read_stream(&sys.names.ledger_stream(), &sys.names.ledger_subject("reserve")).await;
    let order: Vec<String> = entries
        .iter()
        .map(|(_, p)| match codec::decode::<LedgerEntry>(None, p).unwrap().change {
            LedgerChange::Reserve(r) => r.id,
            other => panic!("not a reservation on the reserve subject: {other:?}"),
        })
        .collect();
    assert_eq!(order.len(), 85, "{order:?}");
    // Waiting for a permit is not a failure: every task ran once.
    for id in ["i0", "b70"] {
        assert!(sys.task(id).await.unwrap().attempts.is_empty(), "{id} needed a second attempt");
    }
    let late: Vec<char> = order[60..].iter().map(|id| id.chars().next().unwrap()).collect();
    assert_eq!(late.iter().collect::<String>(), format!("{}{}", "i".repeat(10), "b".repeat(15)), "{order:?}");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_child_budget_is_carved_from_the_parent_and_what_it_did_not_use_is_refunded() {
    let stub = StubLlm::start(vec![
        Reply::openai_tools(
            &[("delegate", json!({"capability": "child", "input": "sub-task", "budget_tokens": 4000}))],
            100,
            20,
        ),
        Reply::openai_text("child done", 1_000, 500),
        Reply::openai_text("parent done", 200, 30),
    ])
    .await;
    let mut sys = System::start(StreamSettings::default(), WireFormat::Msgpack).await;
    sys.start_budget_keeper().await;
    sys.start_dispatcher(dispatcher_config()).await;
    let fleet = stub_fleet(
        &stub,
        "w",
        "\"parent\", \"child\"",
        "tools = [\"delegate\"]\nconcurrency = 2\nmax_tokens_per_call = 2000",
    );
    sys.start_runner("r1", &fleet).await;
    sys.wait_for_agents("r1", 1).await;
    submit(&sys, "p", "parent", None, Some(10_000)).await;
    let e = outcome(&sys, "p").await;
    assert_eq!(e.kind, "completed", "{e:?}");

    // Replay the ledger: while the child ran the parent had 10,000 − 120 − 4,000 left; once the
    // child's budget closed, 2,500 of the 4,000 came back.
    let entries: Vec<LedgerEntry> = sys
        .read_stream(&sys.names.ledger_stream(), &sys.names.ledger_all())
        .await
        .into_iter()
        .map(|(_, p)| codec::decode(None, &p).unwrap())
        .collect();
    let mut l = Ledger::new(u64::MAX);
    let mut seen = Vec::new();
    for e in &entries {
        flotilla_budget_keeper::replay::apply_entry(&mut l, e);
        let child_closed =
            matches!(&e.change, LedgerChange::Close(CloseRequest { scope }) if scope == "task.p-s1c0");
        if matches!(e.change, LedgerChange::Carve(_)) || child_closed {
            seen.push((e.op().to_string(), l.budget("task.p", e.at_ms).unwrap().available()));
        }
    }
    assert_eq!(seen, [("carve".to_owned(), 5_880), ("close".to_owned(), 8_380)], "{entries:?}");
    let p = keeper(&sys).call(&show("task.p")).await.unwrap().budget.unwrap();
    assert_eq!((p.used, p.available), (120 + 1_500 + 230, Some(10_000 - 1_850)));
    let c = keeper(&sys).call(&show("task.p-s1c0")).await.unwrap().budget.unwrap();
    assert_eq!((c.limit_tokens, c.used), (Some(4_000), 1_500));
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_providers_429_holds_back_every_runner_sharing_the_limit() {
    let stub = StubLlm::start(vec![
        Reply::raw(429, r#"{"error": {"message": "slow down"}}"#).header("retry-after", "2"),
    ])
    .await;
    stub.set_fallback(Reply::openai_text("ok", 5, 1));
    let mut sys = System::start(StreamSettings::default(), WireFormat::Msgpack).await;
    sys.start_budget_keeper().await;
    sys.start_dispatcher(dispatcher_config()).await;
    let fleet = stub_fleet(&stub, "w", "\"work\"", "");
    sys.start_runner("r1", &fleet).await;
    sys.start_runner("r2", &fleet).await;
    sys.wait_for_agents("r1", 1).await;
    sys.wait_for_agents("r2", 1).await;
    submit(&sys, "first", "work", None, None).await;
    flotilla_testkit::eventually(Duration::from_secs(20), "the first call", || async {
        (!stub.requests().is_empty()).then_some(())
    })
    .await;
    // Every later call waits for the provider's two seconds, on whichever runner it is.
    for i in 0..4 {
        submit(&sys, &format!("next{i}"), "work", None, None).await;
    }
    sys.wait_for_kind("completed", 5, Duration::from_secs(30)).await;
    let at = stub.arrivals();
    assert_eq!(at.len(), 6, "one 429, then five calls");
    for t in &at[1..] {
        assert!(t.duration_since(at[0]) >= Duration::from_millis(1_950), "a call went out during the pause");
    }
    let entries = sys.read_stream(&sys.names.ledger_stream(), &sys.names.ledger_subject("backoff")).await;
    assert_eq!(entries.len(), 1, "the 429 reached the shared limiter");
    sys.stop().await;
}
