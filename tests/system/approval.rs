//! Human approval: a task that asks a human waits (its agent `waiting`) until `flotilla approve`,
//! then completes; `flotilla reject --comment` fails it with the comment as the reason.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::process::Command;
use std::time::Duration;

use crate::support::*;
use flotilla_protocol::{AgentRecord, AgentState, TaskState, TaskSubmission, decode};
use flotilla_testkit::bin;
use serde_json::json;

fn asking(id: &str, question: &str) -> TaskSubmission {
    TaskSubmission {
        id: Some(id.into()),
        capability: "ops".into(),
        input: json!({ "text": id, "_offline": { "tool_calls": [
            { "name": "ask_human", "arguments": { "question": question } }
        ] } }),
        ..Default::default()
    }
}

fn flotilla(url: &str, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(bin("flotilla"));
    cmd.args(args).env("FLOTILLA_NATS_URL", url);
    if let Some(creds) = flotilla_testkit::operator_creds(url) {
        cmd.env("FLOTILLA_CREDS", creds);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn approve_completes_and_reject_fails_with_the_comment() {
    let fleet = "[[agent]]\nname = \"operator\"\ncapabilities = [\"ops\"]\ntools = [\"ask_human\"]\nconcurrency = 2\n";
    let mut sys = System::with_dispatcher().await;
    sys.start_runner("r1", fleet).await;
    sys.wait_for_agents("r1", 1).await;
    let url = sys.server.url().to_owned();

    assert_eq!(flotilla(&url, &["approve", "nothing-asked"]).0, 3, "no request: not found");
    sys.submit(&asking("ship-it", "Deploy v2 to production?")).await;
    sys.submit(&asking("drop-db", "Drop the orders table?")).await;
    sys.wait_for_kind("approval_requested", 2, Duration::from_secs(20)).await;

    // Both wait: the agent's activities say so, and nothing completes.
    let waiting =
        flotilla_testkit::eventually(Duration::from_secs(10), "waiting in the registry", || async {
            let rec: AgentRecord =
                decode(None, &sys.topology.agents.get("r1-operator-0").await.unwrap()?).unwrap();
            (rec.activities.len() == 2 && rec.activities.iter().all(|a| a.state == AgentState::Waiting))
                .then_some(rec)
        })
        .await;
    assert_eq!(waiting.activities.len(), 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sys.task("ship-it").await.unwrap().state, TaskState::Running);

    let (code, out, err) = flotilla(&url, &["approve", "ship-it", "--comment", "go ahead"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Deploy v2"), "{out}");
    let (code, _, err) = flotilla(&url, &["reject", "drop-db", "--comment", "not on a Friday"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(flotilla(&url, &["approve", "drop-db"]).0, 1, "already decided");

    let events = sys.wait_for_kind("failed", 1, Duration::from_secs(20)).await;
    let events = if events.iter().any(|e| e.kind == "completed") {
        events
    } else {
        sys.wait_for_kind("completed", 1, Duration::from_secs(20)).await
    };
    let done = events.iter().find(|e| e.kind == "completed").unwrap();
    assert_eq!(done.task_id, "ship-it");
    assert!(done.output.as_ref().unwrap()["answer"].as_str().unwrap().contains("go ahead"));
    let failed = events.iter().find(|e| e.kind == "failed").unwrap();
    assert_eq!(failed.task_id, "drop-db");
    let err = failed.error.as_ref().unwrap();
    assert_eq!((err.code.as_str(), err.message.as_str()), ("rejected", "not on a Friday"));
    // Who decided is in each task's history, from the operator's verified signature.
    let all = sys.events().await;
    for (task, decision) in [("ship-it", "approved"), ("drop-db", "rejected")] {
        let d = all.iter().find(|e| e.task_id == task && e.kind == "approval_decided").unwrap();
        assert_eq!(d.actor.as_deref(), Some("test"), "{d:?}");
        assert_eq!(d.detail.as_ref().unwrap()["decision"], decision);
    }
    sys.stop().await;
}

/// A decision no operator signed (written straight into the bucket, as anyone able to write
/// there could) is not acted on: it is refused with an event, the agent keeps waiting, and a
/// real operator's decision then counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forged_approval_is_refused_and_a_signed_one_counts() {
    let fleet = "[[agent]]\nname = \"operator\"\ncapabilities = [\"ops\"]\ntools = [\"ask_human\"]\n";
    let mut sys = System::with_dispatcher().await;
    sys.start_runner("r1", fleet).await;
    sys.wait_for_agents("r1", 1).await;
    let url = sys.server.url().to_owned();
    sys.submit(&asking("guarded", "Transfer the funds?")).await;
    sys.wait_for_kind("approval_requested", 1, Duration::from_secs(20)).await;
    let (mut forged, rev) = sys
        .fleet()
        .kv_get::<flotilla_protocol::Approval>(&sys.topology.approvals, "guarded")
        .await
        .unwrap()
        .unwrap();
    forged.status = flotilla_protocol::ApprovalStatus::Approved;
    forged.comment = Some("trust me".into());
    let impostor = nkeys::KeyPair::new_user();
    forged.signer = Some(impostor.public_key());
    forged.signature = Some(base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        impostor.sign(&forged.signed_content()).unwrap(),
    ));
    sys.fleet().kv_update(&sys.topology.approvals, "guarded", &forged, rev).await.unwrap();
    let refused = flotilla_testkit::eventually(Duration::from_secs(10), "the refusal event", || async {
        let stored =
            sys.read_stream(&sys.names.events_stream(), &sys.names.control_event_subject("refused")).await;
        stored.into_iter().find_map(|(_, p)| {
            flotilla_protocol::codec::decode::<flotilla_protocol::ControlEvent>(None, &p).ok()
        })
    })
    .await;
    assert_eq!(
        (refused.action.as_str(), refused.reason.as_str()),
        ("approve", "unknown_operator"),
        "{refused:?}"
    );
    assert_eq!(refused.task_id.as_deref(), Some("guarded"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        sys.task("guarded").await.unwrap().state,
        TaskState::Running,
        "the forged approval was acted on"
    );
    // The operator decides anew; that one counts.
    let (code, _, err) = flotilla(&url, &["approve", "guarded", "--comment", "checked"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("no operator's"), "{err}");
    let done = sys.wait_for_kind("completed", 1, Duration::from_secs(20)).await;
    assert!(done.iter().any(|e| e.task_id == "guarded"));
    let d = sys
        .events()
        .await
        .into_iter()
        .find(|e| e.task_id == "guarded" && e.kind == "approval_decided")
        .unwrap();
    assert_eq!(d.actor.as_deref(), Some("test"));
    sys.stop().await;
}
