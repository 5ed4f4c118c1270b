//! Telemetry: `tracing` to stderr, filtered by `RUST_LOG` (default `info`), as text or JSON
//! (`FLOTILLA_LOG_FORMAT=json`).

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber once; later calls (several services in one process) are no-ops.
pub fn init(default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = std::env::var("FLOTILLA_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}
