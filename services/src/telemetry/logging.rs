//! Where the process's `tracing` events and spans go: log lines on standard error (text,
//! coloured only when standard error is a terminal and `NO_COLOR` is unset, or one JSON
//! object per line) filtered by `--log`, and, with `--otlp-endpoint`, spans exported over
//! OTLP/gRPC with their own filter ([`OTLP_FILTER`]), so a quiet log still yields traces.
//!
//! Log targets are module paths: `services::…` (the server: `services::rpc` for calls,
//! `services::http` for the HTTP side), `actors::…` (actors, journals, cluster),
//! `client::…` (the command line and demo); `--log services=debug,actors=info` and the like.

use crate::limits::{OTLP_EXPORT_TIMEOUT_MS, OTLP_QUEUE_SPANS_MAX};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// What the OTLP exporter gets: the calls' `rpc` spans and, under them, the actor shell's
/// `command` and `journal_append` spans (debug level, off in the log by default).
pub const OTLP_FILTER: &str = "info,actors::entity=debug";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (fields, the current span and the spans it is in).
    Json,
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Flushes and stops the OTLP exporter when dropped (at the end of `dropline serve`).
#[must_use = "spans are exported until this is dropped"]
pub struct TracingGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("dropline: exporting the last spans failed: {e}");
            }
        }
    }
}

/// Set once spans are exported: only then does the gRPC layer record the attributes only a
/// trace shows (OpenTelemetry's span name and kind, the status and latency on the span), each
/// of which the log layer would otherwise format for nothing.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported over OTLP.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// A log filter from `--log`. Target and level directives only (`info,services::rpc=debug`)
/// become a static `Targets` filter, which costs nothing when a span is entered or left;
/// directives naming spans or fields need an `EnvFilter`, which tracks spans as they run.
pub fn parse_filter(
    filter: &str,
) -> anyhow::Result<Box<dyn tracing_subscriber::layer::Filter<Registry> + Send + Sync>> {
    if let Ok(targets) = filter.parse::<tracing_subscriber::filter::Targets>() {
        return Ok(Box::new(targets));
    }
    let env = EnvFilter::try_new(filter).map_err(|e| anyhow::anyhow!("--log {filter:?}: {e}"))?;
    Ok(Box::new(env))
}

/// Whether log lines may carry colour codes: only for a person at a terminal.
pub fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Installs the process's subscriber: logs on standard error filtered by `filter` (an
/// env-filter; an invalid one is an error, not a silent default), in `format`, and spans to
/// `otlp_endpoint` (`http://collector:4317`) when given. Must run inside the tokio runtime
/// when exporting (the exporter's channel lives there). Installing twice keeps the first.
pub fn init(filter: &str, format: LogFormat, otlp_endpoint: Option<&str>) -> anyhow::Result<TracingGuard> {
    let log = log_layer(parse_filter(filter)?, format, std::io::stderr, colour());
    let (otlp, provider) = match otlp_endpoint {
        None => (None, None),
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_timeout(Duration::from_millis(OTLP_EXPORT_TIMEOUT_MS))
                .build()
                .map_err(|e| anyhow::anyhow!("--otlp-endpoint {endpoint}: {e}"))?;
            // Bounded: spans beyond the queue are dropped, never held in memory.
            let batch = opentelemetry_sdk::trace::BatchSpanProcessor::builder(exporter)
                .with_batch_config(
                    opentelemetry_sdk::trace::BatchConfigBuilder::default()
                        .with_max_queue_size(OTLP_QUEUE_SPANS_MAX)
                        .build(),
                )
                .build();
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_span_processor(batch)
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name("dropline")
                        .build(),
                )
                .build();
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("dropline"))
                .with_filter(EnvFilter::new(OTLP_FILTER))
                .boxed();
            EXPORTING.store(true, Ordering::Relaxed);
            (Some(layer), Some(provider))
        }
    };
    // `try_init` fails only when a subscriber is installed already (tests in one process).
    let _ = tracing_subscriber::registry().with(log).with(otlp).try_init();
    Ok(TracingGuard { provider })
}

/// The log layer [`init`] installs, writing to `writer` (the telemetry benchmark measures
/// this one, writing nowhere).
pub fn log_layer<W>(
    filter: Box<dyn tracing_subscriber::layer::Filter<Registry> + Send + Sync>,
    format: LogFormat,
    writer: W,
    ansi: bool,
) -> Box<dyn Layer<Registry> + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(ansi);
    match format {
        LogFormat::Text => layer.with_filter(filter).boxed(),
        LogFormat::Json => layer.json().with_filter(filter).boxed(),
    }
}

/// [`init`] for the command line's clients (demo, settlement): text, no export; an invalid
/// filter falls back to `info`.
pub fn init_plain(filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour())
        .try_init();
}
