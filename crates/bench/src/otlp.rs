//! An OTLP/HTTP trace receiver for part (e) of `flotilla-bench dispatcher`: it takes what an
//! OpenTelemetry exporter posts to `/v1/traces` and counts the spans, so the cost of tracing is
//! measured with spans really exported, not dropped in the process. It keeps the bodies and
//! decodes them only when asked for the count (between measurements): a collector runs elsewhere,
//! and decoding here would charge its work to the traced services.

use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message as _;

/// A receiver on a free loopback port, serving until the process ends.
pub struct Receiver {
    url: String,
    bodies: Arc<Mutex<Vec<axum::body::Bytes>>>,
    spans: Mutex<u64>,
}

impl Receiver {
    pub async fn start() -> anyhow::Result<Self> {
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let kept = bodies.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let kept = kept.clone();
                async move {
                    if let Ok(mut k) = kept.lock() {
                        k.push(body);
                    }
                    ""
                }
            }),
        );
        let listener =
            tokio::net::TcpListener::bind("127.0.0.1:0").await.context("failed to bind the OTLP receiver")?;
        let url = format!("http://{}", listener.local_addr().context("no local address")?);
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "the OTLP receiver stopped");
            }
        });
        Ok(Self { url, bodies, spans: Mutex::new(0) })
    }

    /// The base URL an exporter is given (`/v1/traces` is appended).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Spans received so far (decoding what came since the last count).
    pub fn spans(&self) -> anyhow::Result<u64> {
        let bodies = self.bodies.lock().map(|mut b| std::mem::take(&mut *b)).unwrap_or_default();
        let mut spans = self.spans.lock().map_err(|_| anyhow::anyhow!("span count poisoned"))?;
        for body in bodies {
            let req = ExportTraceServiceRequest::decode(body.as_ref())
                .context("the exporter posted something that is not an OTLP trace export")?;
            let n: usize =
                req.resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
            *spans = spans.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        }
        Ok(*spans)
    }
}
