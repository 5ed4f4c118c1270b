//! Telemetry: `tracing` to stderr, filtered by `RUST_LOG` (default `info`), as text or JSON
//! (`FLOTILLA_LOG_FORMAT=json`), with every span also an OpenTelemetry span. Spans are exported
//! over OTLP/HTTP when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or `…_TRACES_ENDPOINT`) is set;
//! either way W3C trace context travels in NATS headers (see [`crate::trace`]), so one task is one
//! trace across services.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// Keeps the tracer provider alive; flushes pending spans when dropped.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("failed to flush traces: {e}");
        }
    }
}

fn otlp_configured() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The layer that makes `tracing` spans OpenTelemetry spans, as every service installs it. It
/// leaves out what tracing-opentelemetry does by default and Flotilla does not use, to keep
/// tracing cheap on the task path (`flotilla-bench dispatcher`, part (e), measures it): making
/// each span's OpenTelemetry context the current one whenever it is entered (a lock and a context
/// attach on every poll of an instrumented future; only other OpenTelemetry instrumentation would
/// read it — Flotilla's propagation reads the `tracing` span's own context), busy/idle times (two
/// clock reads per poll) and the thread of each span. The code location stays.
pub fn otel_layer<S>(
    tracer: opentelemetry_sdk::trace::SdkTracer,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_context_activation(false)
        .with_tracked_inactivity(false)
        .with_threads(false)
}

/// W3C trace context as the process's propagator (what [`crate::trace`] injects and extracts).
pub fn install_propagator() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
}

/// The tracer provider of `service`: spans batched over OTLP/HTTP to `endpoint` (e.g.
/// `http://127.0.0.1:4318`) when given, else where the standard `OTEL_EXPORTER_OTLP_*`
/// environment variables say, else nowhere (spans still carry trace context).
pub fn tracer_provider(service: &str, endpoint: Option<&str>) -> SdkTracerProvider {
    use opentelemetry_otlp::WithExportConfig as _;
    let mut builder = SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name(service.to_owned()).build());
    if endpoint.is_some() || otlp_configured() {
        // The exporter's HTTP client uses rustls with the ring provider, as the NATS client does.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let exporter = opentelemetry_otlp::SpanExporter::builder().with_http();
        let exporter = match endpoint {
            Some(e) => exporter.with_endpoint(format!("{}/v1/traces", e.trim_end_matches('/'))).build(),
            None => exporter.build(),
        };
        match exporter {
            Ok(exporter) => builder = builder.with_batch_exporter(exporter),
            Err(e) => eprintln!("OTLP export disabled: {e}"),
        }
    }
    builder.build()
}

/// Installs the global subscriber once for `service`; later calls (several services in one
/// process) keep the first and return an inert handle.
pub fn init(service: &str, default_filter: &str) -> Telemetry {
    init_logging_to(service, default_filter, None)
}

/// [`init`], with the log lines going to `log_file` (appended, no colours) instead of stderr,
/// for commands that keep the terminal for a short status of their own (`flotilla up`,
/// `flotilla demo`). A file that cannot be opened leaves the logs on stderr, and says so.
pub fn init_logging_to(service: &str, default_filter: &str, log_file: Option<&std::path::Path>) -> Telemetry {
    let file = log_file.and_then(|p| {
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        match std::fs::OpenOptions::new().create(true).append(true).open(p) {
            Ok(f) => Some(std::sync::Mutex::new(f)),
            Err(e) => {
                eprintln!("cannot write the log file {}: {e}; logging to stderr", p.display());
                None
            }
        }
    });
    install_propagator();
    let provider = tracer_provider(service, None);
    let tracer = provider.tracer(service.to_owned());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = std::env::var("FLOTILLA_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    // Flotilla's own spans always reach OpenTelemetry (trace context must propagate even when
    // logging is quiet); other crates' spans only when they are logged.
    let otel = otel_layer(tracer).with_filter(Targets::new().with_target("flotilla", LevelFilter::INFO));
    let registry = tracing_subscriber::registry().with(otel);
    let installed = match (file, json) {
        (Some(f), true) => registry
            .with(tracing_subscriber::fmt::layer().json().with_writer(f).with_filter(filter))
            .try_init(),
        (Some(f), false) => registry
            .with(tracing_subscriber::fmt::layer().with_ansi(false).with_writer(f).with_filter(filter))
            .try_init(),
        (None, true) => registry
            .with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).with_filter(filter))
            .try_init(),
        (None, false) => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter))
            .try_init(),
    };
    if installed.is_ok() {
        opentelemetry::global::set_tracer_provider(provider.clone());
        Telemetry { provider: Some(provider) }
    } else {
        Telemetry { provider: None }
    }
}
