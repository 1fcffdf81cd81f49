//! The HTTP side of `dropline serve`, on its own port (`--http-listen`): `/metrics`
//! (Prometheus text, no credential: it binds to loopback by default, and in a cluster sits
//! behind the pod network), `/healthz` and `/readyz` (the gRPC health services `liveness`
//! and `""` as HTTP status codes), and whatever routes it is given (the consoles).
//!
//! Over TLS when the gRPC side is (the same certificate and key), plaintext otherwise.
//! Bounded like the gRPC side: HTTP/1.1 only, request headers at most
//! `HTTP_HEADER_BYTES_MAX` bytes and `HTTP_HEADERS_MAX` fields (431 beyond, from hyper,
//! before any handler), garbage answered 400 and the connection closed, request bodies at
//! most `HTTP_BODY_BYTES_MAX` (413), headers read within `HTTP_HEADER_READ_TIMEOUT_MS`
//! (which also closes idle keep-alive connections), a response head within
//! `HTTP_REQUEST_TIMEOUT_MS` (503), at most `HTTP_CONNECTIONS_MAX` connections (more wait in
//! the listen backlog). It stops accepting when the platform begins shutting down (after
//! gRPC readiness turned NOT_SERVING and the shutdown delay) and gives open connections
//! `SHUTDOWN_DRAIN_MS` to finish.

use crate::limits::{
    HTTP_BODY_BYTES_MAX, HTTP_CONNECTIONS_MAX, HTTP_HEADERS_MAX, HTTP_HEADER_BYTES_MAX, HTTP_HEADER_READ_TIMEOUT_MS,
    HTTP_READ_BUFFER_BYTES_MAX, HTTP_REQUEST_TIMEOUT_MS, SHUTDOWN_DRAIN_MS, TLS_HANDSHAKE_TIMEOUT_MS,
};
use crate::platform::Platform;
use crate::server::Health;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use tonic_health::ServingStatus;
use tracing::{debug, info, warn};

/// What the built-in routes read.
#[derive(Clone)]
struct HttpState {
    platform: Platform,
    health: Health,
}

/// The built-in routes (`/metrics`, `/healthz`, `/readyz`) merged with `extra`, inside the
/// request bounds. `extra` must not define those paths (axum panics on a duplicate route).
pub fn router(platform: Platform, health: Health, extra: Router) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(HttpState { platform, health })
        .merge(extra)
        .layer(axum::middleware::from_fn(bounded))
        .layer(DefaultBodyLimit::max(HTTP_BODY_BYTES_MAX))
}

async fn metrics(State(state): State<HttpState>) -> Response {
    // Reading the figures walks the projections and the running actors under their locks:
    // off the async workers.
    let platform = state.platform.clone();
    match tokio::task::spawn_blocking(move || crate::telemetry::metrics::render(&platform)).await {
        Ok(text) => ([(header::CONTENT_TYPE, crate::telemetry::metrics::CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            warn!(error = %e, "metrics not rendered");
            (StatusCode::INTERNAL_SERVER_ERROR, "metrics not rendered\n").into_response()
        }
    }
}

fn health_answer(status: ServingStatus, what: &str) -> Response {
    match status {
        ServingStatus::Serving => (StatusCode::OK, format!("{what}: SERVING\n")).into_response(),
        ServingStatus::NotServing => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("{what}: NOT_SERVING\n")).into_response()
        }
        ServingStatus::Unknown => (StatusCode::SERVICE_UNAVAILABLE, format!("{what}: UNKNOWN\n")).into_response(),
    }
}

/// The process: 200 until it exits (gRPC health `liveness`).
async fn healthz(State(state): State<HttpState>) -> Response {
    health_answer(state.health.status(crate::config::health_services::LIVE), "liveness")
}

/// The platform: 200 while it takes calls (gRPC health `""`), 503 while stopping, cut off
/// from NATS or with a failed journal.
async fn readyz(State(state): State<HttpState>) -> Response {
    health_answer(state.health.status(crate::config::health_services::READY), "readiness")
}

/// A response head within `HTTP_REQUEST_TIMEOUT_MS` (a stream's body may go on), and
/// headers no page on this port does without.
async fn bounded(request: Request, next: Next) -> Response {
    let mut response =
        match tokio::time::timeout(Duration::from_millis(HTTP_REQUEST_TIMEOUT_MS), next.run(request)).await {
            Ok(response) => response,
            Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "the request took too long; retry\n").into_response(),
        };
    let headers = response.headers_mut();
    headers
        .entry(header::X_CONTENT_TYPE_OPTIONS)
        .or_insert(HeaderValue::from_static("nosniff"));
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// One connection: TLS first when configured (a handshake not done within
/// `TLS_HANDSHAKE_TIMEOUT_MS` drops it), then HTTP/1.1 until the client closes it or the
/// server is closing.
async fn connection(
    stream: tokio::net::TcpStream,
    tls: Option<TlsAcceptor>,
    builder: hyper::server::conn::http1::Builder,
    router: Router,
    closing: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    // The peer's address for the handlers that bound something per client (the consoles'
    // sign-in attempts), as axum's `ConnectInfo` extractor reads it.
    if let Ok(peer) = stream.peer_addr() {
        use tower::ServiceExt;
        let router = router.map_request(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(axum::extract::ConnectInfo(peer));
            request
        });
        return connection_of(stream, tls, builder, router, closing).await;
    }
    connection_of(stream, tls, builder, router, closing).await
}

async fn connection_of<S>(
    stream: tokio::net::TcpStream,
    tls: Option<TlsAcceptor>,
    builder: hyper::server::conn::http1::Builder,
    router: S,
    closing: watch::Receiver<bool>,
) where
    S: tower::Service<hyper::Request<hyper::body::Incoming>, Response = Response, Error = std::convert::Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    match tls {
        None => serve_connection(TokioIo::new(stream), builder, router, closing).await,
        Some(acceptor) => {
            match tokio::time::timeout(Duration::from_millis(TLS_HANDSHAKE_TIMEOUT_MS), acceptor.accept(stream)).await {
                Ok(Ok(stream)) => serve_connection(TokioIo::new(stream), builder, router, closing).await,
                Ok(Err(e)) => debug!(target: "services::http", error = %e, "TLS handshake failed"),
                Err(_) => debug!(target: "services::http", "TLS handshake not done in time"),
            }
        }
    }
}

async fn serve_connection<IO, S>(
    io: TokioIo<IO>,
    builder: hyper::server::conn::http1::Builder,
    router: S,
    mut closing: watch::Receiver<bool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<hyper::Request<hyper::body::Incoming>, Response = Response, Error = std::convert::Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let connection = builder.serve_connection(io, TowerToHyperService::new(router));
    tokio::pin!(connection);
    let closed = async move {
        let _ = closing.wait_for(|closing| *closing).await;
    };
    let served = tokio::select! {
        served = connection.as_mut() => served,
        () = closed => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = served {
        // A client's mistake (bad request, too large, timeout): answered or closed.
        debug!(target: "services::http", error = %e, "HTTP connection ended");
    }
}

/// Serves `router` on `listener` (over TLS with `tls`) until `shutdown` resolves, then lets
/// open connections finish for at most `SHUTDOWN_DRAIN_MS`.
pub async fn serve_router(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<ServerConfig>>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let tls = tls.map(TlsAcceptor::from);
    let local = listener.local_addr()?;
    let connections = Arc::new(Semaphore::new(HTTP_CONNECTIONS_MAX));
    let (closing_tx, closing) = watch::channel(false);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(HTTP_HEADER_READ_TIMEOUT_MS))
        .max_header_size(HTTP_HEADER_BYTES_MAX)
        .max_headers(HTTP_HEADERS_MAX)
        .max_buf_size(HTTP_READ_BUFFER_BYTES_MAX);
    let scheme = if tls.is_some() { "https" } else { "http" };
    info!(target: "services::http", addr = %local, "HTTP listening on {scheme}://{local}");
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = connections.clone().acquire_owned() => permit?,
        };
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    warn!(target: "services::http", error = %e, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (tls, builder, router, closing) = (tls.clone(), builder.clone(), router.clone(), closing.clone());
        tokio::spawn(async move {
            connection(stream, tls, builder, router, closing).await;
            drop(permit);
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    let drained = tokio::time::timeout(
        Duration::from_millis(SHUTDOWN_DRAIN_MS),
        connections.acquire_many(HTTP_CONNECTIONS_MAX as u32),
    )
    .await;
    if drained.is_err() {
        warn!(target: "services::http", "HTTP connections still open after {SHUTDOWN_DRAIN_MS} ms; stopping anyway");
    }
    info!(target: "services::http", "HTTP stopped");
    Ok(())
}

/// Serves the built-in routes and `extra` (see [`router`]) for `platform` on `listener`,
/// over TLS with `tls` (`TlsFiles::http_config`: the gRPC side's certificate), until
/// `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    platform: Platform,
    health: Health,
    extra: Router,
    tls: Option<Arc<ServerConfig>>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    serve_router(listener, router(platform, health, extra), tls, shutdown).await
}
