//! Logs and traces: what `orderflow` writes to stderr, and what it exports over OTLP.
//!
//! Logs go to stderr, filtered by `RUST_LOG` (default `info,sqlx=warn`), as text or,
//! with `ORDERFLOW_LOG_FORMAT=json`, as JSON lines whose `spans` carry the
//! `correlation_id` and `trace_id` of the request or message being handled.
//!
//! Traces are exported over OTLP/HTTP (protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT`
//! or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set; the exporter and the SDK read the
//! standard `OTEL_*` variables themselves (`OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`,
//! `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_HEADERS`). Only spans that declare an `otel.kind`
//! field are exported (the hops of a request: see [`eventstore::trace`]); long-lived
//! worker spans are not, so no trace lasts as long as the process. Without an
//! endpoint no OpenTelemetry layer is installed at all.

use eventstore::metrics::{HistogramFamily, latency_histogram};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// The log filter when `RUST_LOG` is not set.
pub const DEFAULT_LOG_FILTER: &str = "info,sqlx=warn";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    /// `ORDERFLOW_LOG_FORMAT`: `json`, or text (the default).
    pub fn from_env() -> Result<LogFormat, String> {
        match std::env::var("ORDERFLOW_LOG_FORMAT").as_deref() {
            Err(_) | Ok("" | "text") => Ok(LogFormat::Text),
            Ok("json") => Ok(LogFormat::Json),
            Ok(other) => Err(format!(
                "ORDERFLOW_LOG_FORMAT must be text or json, not {other:?}"
            )),
        }
    }
}

/// Where traces go: the OTLP endpoint, if one is configured.
pub fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var(name).is_ok_and(|value| !value.trim().is_empty()))
}

/// What is installed; dropping it (or [`shutdown`](Self::shutdown)) sends the spans
/// still buffered.
#[must_use = "dropping it stops exporting traces"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// What to install.
pub struct Options {
    pub format: LogFormat,
    /// A `RUST_LOG`-style filter for the log lines.
    pub filter: EnvFilter,
    pub writer: BoxMakeWriter,
    pub ansi: bool,
    pub export: Export,
}

/// Whether and where traces are exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Export {
    /// No OpenTelemetry layer at all.
    Off,
    /// Over OTLP/HTTP to the endpoint the `OTEL_*` variables name.
    FromEnv,
    /// Over OTLP/HTTP to this traces URL (`http://host:4318/v1/traces`).
    To(String),
}

impl Options {
    /// As the `orderflow` binary runs: its environment, logs to stderr.
    pub fn from_env() -> Result<Options, String> {
        Ok(Options {
            format: LogFormat::from_env()?,
            filter: EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER)),
            writer: BoxMakeWriter::new(std::io::stderr),
            ansi: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            export: if otlp_configured() {
                Export::FromEnv
            } else {
                Export::Off
            },
        })
    }
}

impl Telemetry {
    /// Installs the process's global subscriber. Call it outside the async runtime:
    /// the OTLP exporter's HTTP client runs a runtime of its own.
    pub fn install(options: Options) -> Result<Telemetry, String> {
        let logs = match options.format {
            LogFormat::Text => tracing_subscriber::fmt::layer()
                .with_writer(options.writer)
                .with_ansi(options.ansi)
                .boxed(),
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(true)
                .with_writer(options.writer)
                .boxed(),
        };
        let provider = match options.export {
            Export::Off => None,
            Export::FromEnv => Some(provider(None)),
            Export::To(url) => Some(provider(Some(url))),
        }
        .transpose()
        .map_err(|error| format!("cannot export traces: {error}"))?;
        let traces = provider.as_ref().map(|provider| {
            TraceSpansOnly(tracing_opentelemetry::layer().with_tracer(provider.tracer("orderflow")))
        });
        // One global filter, no per-layer filters (whose shared per-thread state left
        // trace spans disabled at random when combined with `EnvFilter`).
        Registry::default()
            .with(Select(options.filter))
            .with(logs)
            .with(traces)
            .try_init()
            .map_err(|error| format!("cannot install logging: {error}"))?;
        Ok(Telemetry { provider })
    }

    /// Sends every finished span now. Blocks: call it outside the async runtime (or
    /// in `spawn_blocking`).
    pub fn flush(&self) {
        if let Some(provider) = &self.provider
            && let Err(error) = provider.force_flush()
        {
            eprintln!("orderflow: cannot export traces: {error}");
        }
    }

    /// Sends what is buffered and stops exporting.
    pub fn shutdown(mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("orderflow: cannot export traces: {error}");
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// The tracer provider: OTLP over HTTP, spans batched, the resource and the sampler
/// from the standard variables (the service name defaults to `orderflow`).
fn provider(
    url: Option<String>,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_http();
    if let Some(url) = url {
        exporter = exporter.with_endpoint(url);
    }
    let exporter = exporter.build()?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name("orderflow");
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// The `orderflow_provider_call_seconds` family: calls to outside providers (payment,
/// e-mail, SMS, push) by provider, operation and outcome.
pub fn provider_calls(metrics: &eventstore::Metrics) -> HistogramFamily {
    metrics.family(
        "provider_call_seconds",
        "Calls to outside providers (payment, e-mail, SMS, push), by provider, operation and outcome",
        || HistogramFamily::new_with_constructor(latency_histogram),
    )
}

/// Records one provider call.
pub fn provider_call(
    calls: &HistogramFamily,
    provider: &str,
    operation: &str,
    succeeded: bool,
    took: std::time::Duration,
) {
    let labels = vec![
        ("provider", provider.to_owned()),
        ("operation", operation.to_owned()),
        (
            "outcome",
            if succeeded { "ok" } else { "failed" }.to_owned(),
        ),
    ];
    calls.get_or_create(&labels).observe(took.as_secs_f64());
}

/// Whether a span is a hop of a trace: it declares `otel.kind`.
fn is_trace_span(metadata: &Metadata<'_>) -> bool {
    metadata.is_span() && metadata.fields().field("otel.kind").is_some()
}

/// The global filter: what `RUST_LOG` enables, and every trace span whatever the
/// level, so that log lines carry their request's ids and traces are whole.
struct Select(EnvFilter);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Select {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        if is_trace_span(metadata) {
            Interest::always()
        } else {
            Layer::<S>::register_callsite(&self.0, metadata)
        }
    }

    fn enabled(&self, metadata: &Metadata<'_>, ctx: Context<'_, S>) -> bool {
        is_trace_span(metadata) || Layer::<S>::enabled(&self.0, metadata, ctx)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        let logs = Layer::<S>::max_level_hint(&self.0)?;
        Some(logs.max(LevelFilter::INFO))
    }

    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        self.0.on_new_span(attrs, id, ctx);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        self.0.on_record(id, values, ctx);
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        self.0.on_enter(id, ctx);
    }

    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        self.0.on_exit(id, ctx);
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        self.0.on_close(id, ctx);
    }
}

/// The OpenTelemetry layer, shown only trace spans (and warnings and errors, which
/// become events on them): long-lived worker spans stay out of every trace.
struct TraceSpansOnly<L>(L);

impl<L, S> Layer<S> for TraceSpansOnly<L>
where
    L: Layer<S>,
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.0.on_register_dispatch(subscriber);
    }

    fn on_layer(&mut self, subscriber: &mut S) {
        self.0.on_layer(subscriber);
    }

    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if is_trace_span(attrs.metadata()) {
            self.0.on_new_span(attrs, id, ctx);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if traced(id, &ctx) {
            self.0.on_record(id, values, ctx);
        }
    }

    fn on_follows_from(&self, id: &Id, follows: &Id, ctx: Context<'_, S>) {
        if traced(id, &ctx) {
            self.0.on_follows_from(id, follows, ctx);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if *event.metadata().level() <= Level::WARN {
            self.0.on_event(event, ctx);
        }
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        if traced(id, &ctx) {
            self.0.on_enter(id, ctx);
        }
    }

    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        if traced(id, &ctx) {
            self.0.on_exit(id, ctx);
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if traced(&id, &ctx) {
            self.0.on_close(id, ctx);
        }
    }

    fn on_id_change(&self, old: &Id, new: &Id, ctx: Context<'_, S>) {
        self.0.on_id_change(old, new, ctx);
    }

    unsafe fn downcast_raw(&self, id: std::any::TypeId) -> Option<*const ()> {
        if id == std::any::TypeId::of::<Self>() {
            Some(self as *const Self as *const ())
        } else {
            // SAFETY: forwarded to the inner layer, which answers for its own types
            // (`WithContext`, what `OpenTelemetrySpanExt` looks for).
            unsafe { self.0.downcast_raw(id) }
        }
    }
}

fn traced<S: Subscriber + for<'a> LookupSpan<'a>>(id: &Id, ctx: &Context<'_, S>) -> bool {
    ctx.metadata(id).is_some_and(is_trace_span)
}
