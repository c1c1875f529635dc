//! Logging (human-readable or JSON lines on stderr) and tracing: spans continue the W3C trace context of
//! each call and event, and are exported over OTLP/gRPC when an endpoint is configured.

use std::{io::IsTerminal, sync::OnceLock, time::Duration};

use opentelemetry::{
    Context,
    trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
    },
};
use opentelemetry_sdk::{
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
        // the server's own spans, whatever the log filter: a quieter log must not end the export
        let spans = tracing_subscriber::filter::Targets::new()
            .with_target(env!("CARGO_CRATE_NAME"), tracing::Level::INFO);
        Some(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(spans),
        )
    };
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init();
    Ok(())
}

/// Longest the last spans' export may hold the exit: the batch exporter waits for an export under
/// way and a final one, each up to the OTLP timeout (10 s), and a collector that does not answer
/// must not keep the process past its `shutdown_timeout` (and a pod past its grace period).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Flushes and stops span export, waiting at most [`FLUSH_TIMEOUT`] (on a thread of its own, since
/// the exporter's shutdown blocks until the collector answers). Call it while the runtime still runs.
pub fn shutdown() {
    if let Some(provider) = EXPORTING.get().cloned() {
        let (done, flushed) = std::sync::mpsc::channel();
        let flushing = std::thread::Builder::new()
            .name("nerve-span-flush".into())
            .spawn(move || {
                let _ = provider.shutdown();
                let _ = done.send(());
            });
        if flushing.is_ok() && flushed.recv_timeout(FLUSH_TIMEOUT).is_err() {
            tracing::warn!(
                timeout = ?FLUSH_TIMEOUT,
                "the trace collector did not take the last spans in time; exiting without them"
            );
        }
    }
}

/// Whether spans are exported (so per-delivery spans are worth making).
pub fn exporting() -> bool {
    EXPORTING.get().is_some()
}

/// The trace flags W3C Trace Context defines (level 2): sampled (01) and random trace id (02). The
/// other bits are reserved, written as zero.
const KNOWN_TRACE_FLAGS: u8 = 0x03;

/// Parses a W3C traceparent; None when absent or malformed. Read here rather than by the SDK's
/// propagator, which refuses version 00 with both defined flags set (`-03`, what level-2 tracers
/// send) and drops the random flag, which must travel with its trace id. The shape (lowercase hex, as
/// W3C writes it) is checked first.
pub fn parse_traceparent(traceparent: Option<&str>) -> Option<Context> {
    let header = traceparent.filter(|t| crate::event::traceparent_header_shape(t))?;
    let fields: Vec<&str> = header.split('-').take(4).collect();
    let flags = u8::from_str_radix(fields[3], 16).ok()? & KNOWN_TRACE_FLAGS;
    let parent = SpanContext::new(
        TraceId::from_hex(fields[1]).ok()?,
        SpanId::from_hex(fields[2]).ok()?,
        TraceFlags::new(flags),
        true,
        TraceState::NONE,
    );
    parent
        .is_valid()
        .then(|| Context::new().with_remote_span_context(parent))
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
/// traceparent must be. Both defined flags are kept (a span keeps its parent's random flag).
pub fn traceparent_of(span: &tracing::Span, fallback: Option<&str>) -> Option<String> {
    let cx = match exporting().then(|| span.context()) {
        Some(cx) if cx.span().span_context().is_valid() => cx,
        _ => parse_traceparent(fallback)?,
    };
    let span = cx.span();
    let context = span.span_context();
    Some(format!(
        "00-{}-{}-{:02x}",
        context.trace_id(),
        context.span_id(),
        context.trace_flags().to_u8() & KNOWN_TRACE_FLAGS
    ))
}
