//! The gRPC server: checkout, operator, partner registry, dispatch and settlement services,
//! grpc.health.v1 and server reflection,
//! bounded concurrency, and a graceful shutdown that turns health to NOT_SERVING first and
//! then drains in-flight calls for at most `SHUTDOWN_DRAIN_MS`.

use crate::auth::Authenticator;
use crate::checkout::Checkout;
use crate::dispatch::Couriers;
use crate::operator::Operator;
use crate::platform::Platform;
use crate::registry::Registry;
use crate::settlement::Settlement;
use domain::limits::{
    GRPC_CONCURRENT_STREAMS_MAX, GRPC_MESSAGE_BYTES_MAX, GRPC_REQUESTS_IN_FLIGHT_MAX, SHUTDOWN_DRAIN_MS,
};
use proto::checkout::v1::checkout_service_server::CheckoutServiceServer;
use proto::dispatch::v1::dispatch_service_server::DispatchServiceServer;
use proto::operator::v1::operator_service_server::OperatorServiceServer;
use proto::registry::v1::partner_registry_service_server::PartnerRegistryServiceServer;
use proto::settlement::v1::settlement_service_server::SettlementServiceServer;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tracing::{info, warn};

/// Serves the platform on `listener` until `shutdown` resolves, then drains.
pub async fn serve(
    platform: Platform,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let checkout =
        CheckoutServiceServer::new(Checkout::new(platform.clone())).max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX);
    // Operator, registry and courier calls carry credentials, resolved by one interceptor.
    let auth = Authenticator {
        operator: platform.operator.clone(),
        projections: platform.projections.clone(),
    };
    let operator = tonic::service::interceptor::InterceptedService::new(
        OperatorServiceServer::new(Operator::new(platform.clone())).max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        auth.clone(),
    );
    let registry = PartnerRegistryServiceServer::with_interceptor(Registry::new(platform.clone()), auth.clone());
    let dispatch = DispatchServiceServer::with_interceptor(Couriers::new(platform.clone()), auth.clone());
    let settlement = SettlementServiceServer::with_interceptor(Settlement::new(platform.clone()), auth);
    health.set_serving::<CheckoutServiceServer<Checkout>>().await;
    health.set_serving::<OperatorServiceServer<Operator>>().await;
    health.set_serving::<PartnerRegistryServiceServer<Registry>>().await;
    health.set_serving::<DispatchServiceServer<Couriers>>().await;
    health.set_serving::<SettlementServiceServer<Settlement>>().await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // grpcurl and many tools still ask the v1alpha reflection service.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let local = listener.local_addr()?;
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let stopping = {
        let platform = platform.clone();
        let health = health.clone();
        async move {
            shutdown.await;
            info!("shutting down: health NOT_SERVING, draining in-flight calls");
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            health.set_not_serving::<CheckoutServiceServer<Checkout>>().await;
            health.set_not_serving::<OperatorServiceServer<Operator>>().await;
            health.set_not_serving::<PartnerRegistryServiceServer<Registry>>().await;
            health.set_not_serving::<DispatchServiceServer<Couriers>>().await;
            health.set_not_serving::<SettlementServiceServer<Settlement>>().await;
            platform.begin_shutdown();
            let _ = drained_tx.send(());
        }
    };
    let server = Server::builder()
        .max_concurrent_streams(GRPC_CONCURRENT_STREAMS_MAX)
        .concurrency_limit_per_connection(GRPC_REQUESTS_IN_FLIGHT_MAX)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(checkout)
        .add_service(operator)
        .add_service(registry)
        .add_service(dispatch)
        .add_service(settlement)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopping);
    info!(addr = %local, "listening on {local}");
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result?,
        _ = async {
            let _ = drained_rx.await;
            tokio::time::sleep(Duration::from_millis(SHUTDOWN_DRAIN_MS)).await;
        } => warn!("drain took longer than {SHUTDOWN_DRAIN_MS} ms; stopping anyway"),
    }
    info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
