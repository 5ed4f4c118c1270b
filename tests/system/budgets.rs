//! `flotilla budget set|show` against a running budget-keeper, next to a reservation made by a
//! plain JSON client.

use std::time::Duration;

use flotilla_protocol::WireFormat;
use flotilla_service::StreamSettings;

use crate::support::{System, cli};

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
    sys.stop().await;
}
