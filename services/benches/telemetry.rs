//! `cargo bench -p services --bench telemetry`: what the per-call instrumentation costs on
//! its own, free of the noise a whole server under load brings. One thread drives the gRPC
//! layer (`telemetry::rpc::RpcLayer`) around a stand-in handler that does what the server
//! adds per reserve besides it (the caller's span carried into the actor, the `command`
//! and `journal_append` spans asked for and, at the default filter, not made, the reserve
//! counted), under the log layer `dropline serve` installs at `--log info` writing nowhere.
//! Rounds alternate instrumentation on and off (`Metrics::new(false)`, what `--telemetry off`
//! runs); the report is nanoseconds per call for each and the difference, which
//! `scripts/bench-telemetry.sh`'s per-reserve CPU puts in proportion.
//!
//! Environment: TELEMETRY_BENCH_CALLS (per round, default 200000), TELEMETRY_BENCH_ROUNDS
//! (per mode, default 7), TELEMETRY_BENCH_LOG (the filter, default info).

use bytes::Bytes;
use http_body::{Body, Frame};
use services::telemetry::logging::{log_layer, LogFormat};
use services::telemetry::rpc::RpcLayer;
use services::telemetry::Metrics;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A unary answer as tonic sends it: one message, then trailers with `grpc-status: 0`.
struct Reply {
    data: Option<Bytes>,
    trailers: bool,
}

impl Body for Reply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if self.trailers {
            self.trailers = false;
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        Poll::Ready(None)
    }
}

/// What the server does per reserve for the instrumentation, outside the layer.
fn in_the_shell(metrics: &Metrics) {
    // The bus: the command carries the caller's span (`entity::Cmd`).
    let caller = tracing::Span::current();
    // The actor: a `command` child at debug, decided inside it (`Entity::command_span`).
    let append = || {
        // The append: a `journal_append` child of the current span when traced.
        let current = tracing::Span::current();
        if !current.is_none() {
            drop(
                tracing::debug_span!(target: "actors::entity", parent: &current, "journal_append", stream = %"sku/d/s", events = 1usize),
            );
        }
    };
    if !caller.is_none() {
        let span = tracing::debug_span!(target: "actors::entity", parent: &caller, "command", kind = "sku", stream = %"sku/d/s", commands = 1usize);
        if span.is_disabled() {
            append();
        } else {
            span.in_scope(append);
        }
    }
    drop(caller);
    metrics.reserve(Some(domain::sku::ReserveOutcome::Held));
}

async fn round(metrics: &Arc<Metrics>, calls: usize) -> f64 {
    let handler_metrics = metrics.clone();
    let mut service = RpcLayer::new(metrics.clone()).layer(tower::service_fn(move |_: http::Request<()>| {
        in_the_shell(&handler_metrics);
        std::future::ready(Ok::<_, Infallible>(http::Response::new(Reply {
            data: Some(Bytes::from_static(&[0u8; 64])),
            trailers: true,
        })))
    }));
    let started = Instant::now();
    for _ in 0..calls {
        let request = http::Request::builder()
            .uri("/dropline.checkout.v1.CheckoutService/Reserve")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .expect("a request");
        let response = service
            .ready()
            .await
            .expect("ready")
            .call(request)
            .await
            .expect("answered");
        let mut body = std::pin::pin!(response.into_body());
        while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            std::hint::black_box(frame.expect("a frame"));
        }
    }
    started.elapsed().as_nanos() as f64 / calls as f64
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let calls = env("TELEMETRY_BENCH_CALLS", 200_000);
    let rounds = env("TELEMETRY_BENCH_ROUNDS", 7);
    let filter = std::env::var("TELEMETRY_BENCH_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::registry()
        .with(log_layer(
            services::telemetry::logging::parse_filter(&filter).expect("a log filter"),
            LogFormat::Text,
            std::io::sink,
            false,
        ))
        .init();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let on = Arc::new(Metrics::new(true));
    let off = Arc::new(Metrics::new(false));
    let (mut with, mut without) = (Vec::new(), Vec::new());
    runtime.block_on(async {
        // Warm up both paths (allocator, caches, the subscriber's callsite interest).
        round(&on, calls / 10).await;
        round(&off, calls / 10).await;
        for _ in 0..rounds {
            with.push(round(&on, calls).await);
            without.push(round(&off, calls).await);
        }
    });
    let (on_ns, off_ns) = (median(with.clone()), median(without.clone()));
    let fastest = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    println!("telemetry per gRPC call, log filter {filter:?}, {calls} calls x {rounds} rounds each, one thread");
    println!(
        "  on:  median {on_ns:.0} ns per call (fastest round {:.0})",
        fastest(&with)
    );
    println!(
        "  off: median {off_ns:.0} ns per call (fastest round {:.0})",
        fastest(&without)
    );
    println!(
        "  instrumentation: {:.0} ns per call (medians), {:.0} ns (fastest rounds)",
        on_ns - off_ns,
        fastest(&with) - fastest(&without)
    );
    let counted = on.reserves()[0];
    assert!(counted >= (calls * rounds) as u64, "the reserves were counted");
    assert_eq!(off.reserves()[0], 0, "nothing counted with the instrumentation off");
}
