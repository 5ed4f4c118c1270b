//! Health requests: each service runs a NATS micro service (discoverable with `nats micro ls`)
//! whose `health` endpoint answers on `<prefix>.health.<service>`.

use std::sync::Arc;
use std::time::Instant;

use async_nats::service::ServiceExt as _;
use flotilla_protocol::{HealthReply, PROTOCOL_VERSION};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

use crate::Fleet;

/// Produces the service-specific `details` of a health reply.
pub type Details = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Starts the micro service for `service` and answers health requests until `shutdown`.
pub async fn serve(
    fleet: Fleet,
    service: &'static str,
    details: Details,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let svc = fleet
        .client
        .service_builder()
        .description(format!("Flotilla {service}"))
        .start(format!("flotilla-{service}"), env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| anyhow::anyhow!("failed to start micro service for {service}: {e}"))?;
    let shared = svc
        .endpoint_builder()
        .name("health")
        .add(fleet.names.health_subject(service))
        .await
        .map_err(|e| anyhow::anyhow!("failed to add health endpoint for {service}: {e}"))?;
    // The same answer from this instance only: <prefix>.health.<service>.<instance>.
    let own = svc
        .endpoint_builder()
        .name("health-instance")
        .add(fleet.names.instance_health_subject(service, &fleet.instance))
        .await
        .map_err(|e| anyhow::anyhow!("failed to add instance health endpoint for {service}: {e}"))?;
    let mut endpoint = futures::stream::select(shared, own);
    let started = Instant::now();
    Ok(tokio::spawn(async move {
        loop {
            let req = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = endpoint.next() => match r { Some(r) => r, None => break },
            };
            if !crate::nats::reply_allowed(req.message.reply.as_deref().unwrap_or_default(), &fleet.names) {
                tracing::warn!(reply = ?req.message.reply, "health request with a reply subject into the fleet's own or the server's subjects: not answered");
                continue;
            }
            let reply = HealthReply {
                service: service.to_owned(),
                instance: fleet.instance.clone(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                protocol_version: PROTOCOL_VERSION,
                status: "ok".to_owned(),
                uptime_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                details: details(),
            };
            let body = fleet
                .encode(&reply)
                .map_err(|e| async_nats::service::error::Error { status: e.to_string(), code: 500 });
            if let Err(e) = req.respond(body).await {
                tracing::debug!(error = %e, "failed to answer health request");
            }
        }
        drop(endpoint);
        let _ = svc.stop().await;
    }))
}
