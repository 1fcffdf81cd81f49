//! What `dropline serve` tells about itself: Prometheus metrics (`metrics`, served on the
//! HTTP side's `/metrics`), a span and counters per gRPC call (`rpc`, a tower layer on the
//! tonic server), and where logs and traces go (`logging`: text or JSON on standard error,
//! OTLP export).

pub mod logging;
pub mod metrics;
pub mod rpc;

pub use metrics::Metrics;

/// Whether the server counts and traces its calls. `Off` exists only to measure what the
/// instrumentation costs (`--telemetry off`, hidden): `/metrics` still answers, with the
/// platform's own figures but no call or reserve counts, and calls get no span or request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Telemetry {
    #[default]
    On,
    Off,
}
