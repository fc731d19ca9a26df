//! Spans exported over OTLP, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set.
//!
//! tasklog's spans are facts it already records, told after the fact with the ids the
//! events carry (`ce_traceparent`), so a trace viewer and the log agree:
//!
//! | span | process | parent | from → to |
//! |---|---|---|---|
//! | `submit` | API | the request's `traceparent` | request → acknowledged append |
//! | `queue wait` | scheduler | `submit` | queued → assigned |
//! | `attempt N` | worker | `submit` | process start → end (its `TRACEPARENT`) |
//! | `project <type>` | projector | the event's span | event time → commit |
//!
//! Export runs on the OpenTelemetry SDK's batch processor (a thread of its own); the
//! protocol is OTLP/HTTP with JSON bodies, which every OTLP/HTTP receiver accepts.
//! The standard `OTEL_*` variables apply (`OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_BSP_SCHEDULE_DELAY`,
//! …). Without an endpoint nothing is built, and [`export`] costs one atomic load.

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::SystemTime;

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer, TracerProvider,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;

use crate::events::trace::TraceContext;

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Why the exporter could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// The OTLP exporter refused its configuration.
    #[error("cannot build the OTLP exporter: {0}")]
    Build(#[from] opentelemetry_otlp::ExporterBuildError),
    /// `OTEL_EXPORTER_OTLP_PROTOCOL` names a protocol this build does not speak.
    #[error("OTEL_EXPORTER_OTLP_PROTOCOL={0:?}: tasklog exports OTLP/HTTP with JSON (http/json)")]
    Protocol(String),
}

/// Whether spans are exported (the exporter was set up).
pub fn enabled() -> bool {
    PROVIDER.get().is_some()
}

/// Sets up export for this process (`service` names it, unless `OTEL_SERVICE_NAME`
/// does) when an OTLP endpoint is configured; does nothing otherwise. Returns whether
/// spans will be exported.
pub fn init(service: &str) -> Result<bool, OtlpError> {
    let configured = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    if !configured("OTEL_EXPORTER_OTLP_ENDPOINT")
        && !configured("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    {
        return Ok(false);
    }
    if PROVIDER.get().is_some() {
        return Ok(true);
    }
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Ok(protocol) = std::env::var(name)
            && !protocol.is_empty()
            && protocol != "http/json"
        {
            return Err(OtlpError::Protocol(protocol));
        }
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .build()?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if !configured("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name(service.to_string());
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let _ = PROVIDER.set(provider);
    Ok(true)
}

/// Sends what is still buffered and stops the exporter (at a role's exit).
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get()
        && let Err(e) = provider.shutdown()
    {
        tracing::debug!(error = %e, "otlp: shutdown");
    }
}

/// One finished span, told after the fact.
#[derive(Debug, Clone)]
pub struct Span {
    /// Its name.
    pub name: Cow<'static, str>,
    /// Its own trace and span id.
    pub context: TraceContext,
    /// The span it belongs under (its trace id must be `context`'s).
    pub parent: Option<TraceContext>,
    /// Server (`submit`), consumer (`project`) or internal.
    pub kind: SpanKind,
    /// Start.
    pub start: SystemTime,
    /// End.
    pub end: SystemTime,
    /// Attributes (`tasklog.task_id`, …).
    pub attributes: Vec<KeyValue>,
    /// Set when what the span covers failed: the error's description.
    pub error: Option<String>,
}

impl Span {
    /// An internal span without attributes.
    pub fn new(
        name: impl Into<Cow<'static, str>>,
        context: TraceContext,
        parent: Option<TraceContext>,
        start: SystemTime,
        end: SystemTime,
    ) -> Span {
        Span {
            name: name.into(),
            context,
            parent,
            kind: SpanKind::Internal,
            start,
            end,
            attributes: Vec::new(),
            error: None,
        }
    }

    /// The same span with another kind.
    pub fn kind(mut self, kind: SpanKind) -> Span {
        self.kind = kind;
        self
    }

    /// The same span with one more attribute.
    pub fn attribute(mut self, key: &'static str, value: impl Into<opentelemetry::Value>) -> Span {
        self.attributes.push(KeyValue::new(key, value));
        self
    }
}

fn span_context(context: &TraceContext, remote: bool) -> SpanContext {
    SpanContext::new(
        TraceId::from_bytes(context.trace_id),
        SpanId::from_bytes(context.span_id),
        TraceFlags::new(context.flags),
        remote,
        TraceState::default(),
    )
}

/// Exports `span` (when export is on and its trace is sampled).
pub fn export(span: Span) {
    let Some(provider) = PROVIDER.get() else {
        return;
    };
    if !span.context.sampled() {
        return;
    }
    let tracer = provider.tracer("tasklog");
    let parent = match &span.parent {
        Some(p) => Context::new().with_remote_span_context(span_context(p, true)),
        None => Context::new(),
    };
    let builder = tracer
        .span_builder(span.name)
        .with_kind(span.kind)
        .with_trace_id(TraceId::from_bytes(span.context.trace_id))
        .with_span_id(SpanId::from_bytes(span.context.span_id))
        .with_start_time(span.start)
        .with_attributes(span.attributes);
    let mut built = tracer.build_with_context(builder, &parent);
    if let Some(error) = span.error {
        built.set_status(Status::error(error));
    }
    built.end_with_timestamp(span.end);
}

/// A chrono time as the `SystemTime` spans take.
pub fn system_time(time: chrono::DateTime<chrono::Utc>) -> SystemTime {
    SystemTime::from(time)
}
