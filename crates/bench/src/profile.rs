//! A tracing layer that times a few named spans of the services running in this process (the
//! dispatcher's `submission` and `assign`, a runner's `assignment` when it runs here, the
//! budget-keeper's `round`): wall time from creation to close, and busy time (while
//! the span was entered, i.e. its future was being polled). Their difference is time spent
//! waiting, mostly for NATS replies.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{Level, span};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;

/// Spans timed.
pub const TIMED: [&str; 4] = ["submission", "assign", "assignment", "round"];

/// A closed span: when it was created, how long it stayed open, how long it was being polled.
#[derive(Debug, Clone, Copy)]
pub struct Closed {
    pub created: Instant,
    pub wall: Duration,
    pub busy: Duration,
}

/// Closed spans by name.
pub type ByName = HashMap<&'static str, Vec<Closed>>;

/// What the layer recorded, shared with the bench.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    by_name: Arc<Mutex<ByName>>,
}

impl Timings {
    /// Takes what was recorded so far and starts afresh.
    pub fn take(&self) -> ByName {
        self.by_name.lock().map(|mut m| std::mem::take(&mut *m)).unwrap_or_default()
    }
}

struct Open {
    created: Instant,
    entered: Option<Instant>,
    busy: Duration,
}

struct SpanTimer {
    timings: Timings,
}

impl<S> Layer<S> for SpanTimer
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, _attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Open {
                created: Instant::now(),
                entered: None,
                busy: Duration::ZERO,
            });
        }
    }

    fn on_enter(&self, id: &span::Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(open) = span.extensions_mut().get_mut::<Open>()
        {
            open.entered = Some(Instant::now());
        }
    }

    fn on_exit(&self, id: &span::Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(open) = span.extensions_mut().get_mut::<Open>()
            && let Some(at) = open.entered.take()
        {
            open.busy += at.elapsed();
        }
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(open) = span.extensions_mut().remove::<Open>() else { return };
        if let Ok(mut m) = self.timings.by_name.lock() {
            let closed = Closed { created: open.created, wall: open.created.elapsed(), busy: open.busy };
            m.entry(span.name()).or_default().push(closed);
        }
    }
}

/// Whether the timing layer sees spans (on unless [`Tracing::off`]).
static TIMING: AtomicBool = AtomicBool::new(true);
/// Whether Flotilla's spans reach OpenTelemetry (off until [`Tracing::on`]).
static OTEL: AtomicBool = AtomicBool::new(false);

/// Switches what this process traces, for measuring what tracing costs. The filters are dynamic
/// (asked at each span), so a switch takes effect at the next span.
pub struct Tracing;

impl Tracing {
    /// No span at all: no timing, no OpenTelemetry, no trace context on messages.
    pub fn off() {
        TIMING.store(false, Ordering::Relaxed);
        OTEL.store(false, Ordering::Relaxed);
    }

    /// Flotilla's spans as a service traces them (see `flotilla_service::telemetry`): every span
    /// of its crates at INFO an OpenTelemetry span, exported when the provider exports; and the
    /// timing layer off.
    pub fn on() {
        TIMING.store(false, Ordering::Relaxed);
        OTEL.store(true, Ordering::Relaxed);
    }

    /// As after [`install`]: the timing layer only.
    pub fn timing() {
        TIMING.store(true, Ordering::Relaxed);
        OTEL.store(false, Ordering::Relaxed);
    }
}

/// Installs the timing layer (plus warnings to stderr) as the process's subscriber, and, given a
/// tracer provider, an OpenTelemetry layer switched by [`Tracing`] (off at first). `None` if a
/// subscriber was installed already.
pub fn install(otel: Option<&SdkTracerProvider>) -> Option<Timings> {
    let timings = Timings::default();
    let timer =
        SpanTimer { timings: timings.clone() }.with_filter(tracing_subscriber::filter::filter_fn(|m| {
            TIMING.load(Ordering::Relaxed) && m.is_span() && TIMED.contains(&m.name())
        }));
    let otel = otel.map(|p| {
        flotilla_service::telemetry::otel_layer(p.tracer("flotilla-bench")).with_filter(
            tracing_subscriber::filter::filter_fn(|m| {
                OTEL.load(Ordering::Relaxed)
                    && m.target().starts_with("flotilla")
                    && *m.level() <= Level::INFO
            }),
        )
    });
    let warnings =
        tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(LevelFilter::WARN);
    let subscriber = tracing_subscriber::registry().with(timer).with(otel).with(warnings);
    tracing::subscriber::set_global_default(subscriber).ok().map(|()| timings)
}
