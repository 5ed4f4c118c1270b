//! TLS: a fleet runs over TLS with client certificates (in-process services and a runner
//! process configured by its environment), and the server refuses plaintext, a client that
//! trusts the wrong CA, a server certificate for another name, and a client without a
//! certificate where one is required.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use flotilla_protocol::WireFormat;
use flotilla_service::{ClientAuth, StreamSettings};
use flotilla_testkit::NatsServer;

async fn connect(server: &NatsServer, auth: &ClientAuth) -> Result<async_nats::Client, String> {
    auth.options(async_nats::ConnectOptions::new())
        .map_err(|e| e.to_string())?
        .connection_timeout(Duration::from_secs(3))
        .connect(server.url())
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_runs_over_tls_with_client_certificates() {
    let server = Arc::new(NatsServer::start_tls(true));
    let mut sys =
        System::start_on(server.clone(), "flotilla", StreamSettings::default(), WireFormat::Msgpack).await;
    sys.start_dispatcher(dispatcher_config()).await;
    let _runner = sys.spawn_runner_process("rt", &worker_fleet(1, 2));
    sys.wait_for_agents("rt", 1).await;
    sys.submit(&sleeping("over-tls", 10)).await;
    let events = sys.wait_for_kind("completed", 1, Duration::from_secs(20)).await;
    assert!(events.iter().any(|e| e.task_id == "over-tls" && e.runner_id.as_deref() == Some("rt")));
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_refuses_plaintext_the_wrong_ca_the_wrong_name_and_no_certificate() {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
    let server = NatsServer::start_tls(true);
    let pki = server.pki().unwrap().clone();
    let good = server.client_auth("flotilla", "operator-test");
    assert!(connect(&server, &good).await.is_ok(), "the right CA, certificate and credential connect");

    // Plaintext to the TLS-only port: the server announces TLS and never answers a plain PING.
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", server.port())).await.unwrap();
    let mut reader = tokio::io::BufReader::new(stream);
    let mut info = String::new();
    reader.read_line(&mut info).await.unwrap();
    assert!(info.contains("\"tls_required\":true"), "{info}");
    reader.get_mut().write_all(b"CONNECT {\"verbose\":false}\r\nPING\r\n").await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), reader.read_to_end(&mut rest)).await;
    assert!(!String::from_utf8_lossy(&rest).contains("PONG"), "a plaintext client was served");
    // A client without TLS settings (it would trust only the public roots).
    let plain = ClientAuth { creds: good.creds.clone(), ..ClientAuth::default() };
    assert!(connect(&server, &plain).await.is_err(), "a client trusting the public roots connected");
    // The wrong CA.
    let wrong_ca = ClientAuth { tls_ca: Some(pki.other_ca.clone()), ..good.clone() };
    assert!(connect(&server, &wrong_ca).await.is_err(), "a client trusting another CA connected");
    // No client certificate where the server verifies clients.
    let no_cert = ClientAuth { tls_cert: None, tls_key: None, ..good.clone() };
    assert!(connect(&server, &no_cert).await.is_err(), "a client without a certificate connected");

    // A server whose certificate names another host.
    let elsewhere = NatsServer::start_tls_for(&["example.com"], false);
    let auth = elsewhere.client_auth("flotilla", "operator-test");
    let err = connect(&elsewhere, &auth).await.unwrap_err();
    assert!(err.contains("not valid for name"), "{err}");
    // The same client settings, right name: it connects (so the name was the only reason).
    let right = NatsServer::start_tls_for(&["127.0.0.1"], false);
    assert!(connect(&right, &right.client_auth("flotilla", "operator-test")).await.is_ok());
}
