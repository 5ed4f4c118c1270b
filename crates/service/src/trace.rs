//! W3C trace context across NATS: `traceparent` is injected into the headers of every message a
//! service publishes and extracted from those it receives; a task record keeps its submission's
//! context so that work triggered through KV watches joins the same trace.

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

struct Inject<'a>(&'a mut HeaderMap);

impl Injector for Inject<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct Extract<'a>(&'a HeaderMap);

impl Extractor for Extract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Adds the current span's trace context to `headers`.
pub fn inject(headers: &mut HeaderMap) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut Inject(headers)));
}

/// Makes `span` a child of the trace context in `headers`, if there is one.
pub fn continue_from(span: &tracing::Span, headers: Option<&HeaderMap>) {
    let Some(h) = headers else { return };
    if h.get(flotilla_protocol::headers::TRACEPARENT).is_none() {
        return;
    }
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Extract(h)));
    let _ = span.set_parent(cx);
}

/// The current span's `traceparent`, to store next to state that later work picks up.
pub fn current_traceparent() -> Option<String> {
    let mut h = HeaderMap::new();
    inject(&mut h);
    h.get(flotilla_protocol::headers::TRACEPARENT).map(|v| v.as_str().to_owned())
}

/// Makes `span` a child of a stored `traceparent`.
pub fn continue_from_traceparent(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(tp) = traceparent {
        let mut h = HeaderMap::new();
        h.insert(flotilla_protocol::headers::TRACEPARENT, tp);
        continue_from(span, Some(&h));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_round_trips_through_headers() {
        let _t = crate::telemetry::init("trace-test", "off");
        let parent = tracing::info_span!("parent");
        let tp = parent.in_scope(current_traceparent).expect("a traceparent");
        assert!(tp.starts_with("00-") && tp.len() == 55, "{tp}");
        let trace_id = tp.get(3..35).unwrap().to_owned();
        let child = tracing::info_span!("child");
        continue_from_traceparent(&child, Some(&tp));
        let child_tp = child.in_scope(current_traceparent).unwrap();
        assert_eq!(child_tp.get(3..35).unwrap(), trace_id, "the child joins the parent's trace");
        assert_ne!(child_tp, tp, "with a span id of its own");
    }
}
