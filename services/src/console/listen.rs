//! A minimal HTTP listener for the consoles on `--http-listen`.
//!
//! MERGE NOTE: this stands in for `http::serve` of the telemetry work (the HTTP side with
//! `/metrics` and its own graceful shutdown, on the same flag and default), which mounts
//! extra routes. At the merge, hand `console::routes(platform, settings)` (or
//! `Console::router`) to it and delete this file and its call in `run_serve`. It must keep
//! `into_make_service_with_connect_info::<SocketAddr>()`: the sign-in bound is per peer.

use crate::limits::HTTP_DRAIN_MS;
use axum::Router;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;

/// Serves `router` on `listener` until `shutdown` resolves, then lets requests in flight
/// finish for at most `HTTP_DRAIN_MS` (live streams end with the platform's shutdown).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = stopping_tx.send(());
    };
    let server = axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown);
    let server = std::pin::pin!(std::future::IntoFuture::into_future(server));
    let drained = async {
        if stopping_rx.await.is_ok() {
            tokio::time::sleep(Duration::from_millis(HTTP_DRAIN_MS)).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        served = server => served.map_err(|e| anyhow::anyhow!("the HTTP listener failed: {e}")),
        () = drained => {
            tracing::warn!("HTTP drain took longer than {HTTP_DRAIN_MS} ms; stopping anyway");
            Ok(())
        }
    }
}
