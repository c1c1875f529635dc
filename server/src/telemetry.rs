//! Logging (human-readable or JSON lines on stderr) and tracing: spans continue the W3C trace context of
//! each call and event, and are exported over OTLP/gRPC when an endpoint is configured.

use std::{io::IsTerminal, sync::OnceLock};

use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{
    propagation::TraceContextPropagator,
    runtime,
    trace::{SdkTracerProvider, span_processor_with_async_runtime::BatchSpanProcessor},
};
use serde::{Deserialize, Serialize};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

use crate::config::{Config, LogFormat};

/// Trace export settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// OTLP/gRPC collector, e.g. "http://otel-collector:4317"; empty turns export off.
    pub otlp_endpoint: String,
}

static EXPORTING: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Installs the global subscriber (a second call, as in tests, is a no-op). With an OTLP endpoint it must
/// run inside a Tokio runtime; call [`shutdown`] before exit to flush spans.
pub fn init(config: &Config) -> Result<(), String> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(config.log_level.clone()));
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let fmt = match config.log_format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    let otel = if config.tracing.otlp_endpoint.is_empty() {
        None
    } else {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(config.tracing.otlp_endpoint.clone())
            .build()
            .map_err(|e| format!("OTLP exporter for {}: {e}", config.tracing.otlp_endpoint))?;
        let provider = SdkTracerProvider::builder()
            .with_span_processor(BatchSpanProcessor::builder(exporter, runtime::Tokio).build())
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name("nerve")
                    .build(),
            )
            .build();
        let tracer = provider.tracer("nerve");
        let _ = EXPORTING.set(provider);
        Some(tracing_opentelemetry::layer().with_tracer(tracer))
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    Ok(())
}

/// Flushes and stops span export.
pub fn shutdown() {
    if let Some(provider) = EXPORTING.get() {
        let _ = provider.shutdown();
    }
}

/// Whether spans are exported (so per-delivery spans are worth making).
pub fn exporting() -> bool {
    EXPORTING.get().is_some()
}

struct One<'a>(Option<&'a str>);

impl Extractor for One<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0).flatten()
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

struct Out(Option<String>);

impl Injector for Out {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            self.0 = Some(value);
        }
    }
}

/// Parses a W3C traceparent; None when absent or malformed. The shape is checked first: the
/// propagator alone reads ids of any length, and would make up a trace out of `00-1-1-01`.
pub fn parse_traceparent(traceparent: Option<&str>) -> Option<Context> {
    let traceparent = traceparent.filter(|t| crate::event::traceparent_header_shape(t))?;
    let cx = TraceContextPropagator::new().extract(&One(Some(traceparent)));
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes `span` a child of the given traceparent, when it is valid.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(cx) = parse_traceparent(traceparent) {
        let _ = span.set_parent(cx);
    }
}

/// The traceparent of `span` while spans are exported; otherwise the caller's own trace context,
/// written again as version 00 writes it: the header as sent may be of a later version, with more
/// fields and of any length, and it is stored on every event of the call, as an event's own
/// traceparent must be.
pub fn traceparent_of(span: &tracing::Span, fallback: Option<&str>) -> Option<String> {
    let cx = match exporting().then(|| span.context()) {
        Some(cx) if cx.span().span_context().is_valid() => cx,
        _ => parse_traceparent(fallback)?,
    };
    let mut out = Out(None);
    TraceContextPropagator::new().inject_context(&cx, &mut out);
    out.0
}
