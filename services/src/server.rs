//! The gRPC server: checkout, operator, partner registry, dispatch and settlement services,
//! grpc.health.v1 and server reflection, in plaintext or over TLS (`tls`), with bounded
//! concurrency and request metadata (`metadata_bounds`), and a graceful shutdown that turns health to NOT_SERVING first and
//! then drains in-flight calls for at most `SHUTDOWN_DRAIN_MS`. Health service "" is
//! readiness (NOT_SERVING when stopping or, on a cluster node, without NATS); `liveness`
//! stays SERVING until the process exits.

use crate::auth::Authenticator;
use crate::checkout::Checkout;
use crate::config::health_services;
use crate::dispatch::Couriers;
use crate::edge::Edges;
use crate::limits::{
    CHECKOUT_MESSAGE_BYTES_MAX, GRPC_CONCURRENT_STREAMS_MAX, GRPC_MESSAGE_BYTES_MAX, GRPC_REQUESTS_IN_FLIGHT_MAX,
    HTTP2_HEADER_LIST_BYTES_MAX, HTTP2_LOCAL_ERROR_RESETS_MAX, NATS_CONNECTION_CHECK_MS, SHUTDOWN_DRAIN_MS,
    TCP_KEEPALIVE_SECS,
};
use crate::operator::Operator;
use crate::platform::Platform;
use crate::registry::Registry;
use crate::settlement::Settlement;
use crate::telemetry::rpc::RpcLayer;
use proto::checkout::v1::checkout_service_server::CheckoutServiceServer;
use proto::dispatch::v1::dispatch_service_server::DispatchServiceServer;
use proto::edge::v1::edge_service_server::EdgeServiceServer;
use proto::operator::v1::operator_service_server::OperatorServiceServer;
use proto::registry::v1::partner_registry_service_server::PartnerRegistryServiceServer;
use proto::settlement::v1::settlement_service_server::SettlementServiceServer;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Endpoint, Server, ServerTlsConfig};
use tonic_health::pb::health_check_response::ServingStatus as HealthStatus;
use tracing::{info, warn};

/// Serves the platform on `listener` until `shutdown` resolves, then drains.
pub async fn serve(
    platform: Platform,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with(platform, listener, shutdown, Duration::ZERO).await
}

/// [`serve`], and when `shutdown` resolves, keeps serving for `shutdown_delay` with health
/// NOT_SERVING before it drains (load balancers stop routing here during the delay).
pub async fn serve_with(
    platform: Platform,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    shutdown_delay: Duration,
) -> anyhow::Result<()> {
    let options = ServeOptions {
        shutdown_delay,
        ..ServeOptions::default()
    };
    serve_with_options(platform, listener, shutdown, options).await
}

/// How [`serve_with_options`] serves, beyond the platform and the port.
#[derive(Default)]
pub struct ServeOptions {
    /// See [`serve_with`].
    pub shutdown_delay: Duration,
    /// TLS (from `tls::TlsFiles::load`); plaintext without it.
    pub tls: Option<ServerTlsConfig>,
    /// The health services the server reports to (the HTTP side reads them too); a fresh
    /// one without it.
    pub health: Option<Health>,
}

/// The server's grpc.health.v1 statuses: reported through tonic-health and kept here for
/// the HTTP side's `/healthz` and `/readyz`, which mirror them.
#[derive(Clone)]
pub struct Health {
    reporter: tonic_health::server::HealthReporter,
    service: tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
    statuses: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<&'static str, tonic_health::ServingStatus>>>,
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

impl Health {
    pub fn new() -> Health {
        let reporter = tonic_health::server::HealthReporter::new();
        let service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
        );
        Health {
            reporter,
            service,
            statuses: Default::default(),
        }
    }

    /// Reports `status` for one of `health_services`.
    pub async fn set(&self, service: &'static str, status: tonic_health::ServingStatus) {
        self.statuses.lock().expect("health lock").insert(service, status);
        self.reporter.set_service_status(service, status).await;
    }

    /// The status last reported for `service` (UNKNOWN before any).
    pub fn status(&self, service: &str) -> tonic_health::ServingStatus {
        self.statuses
            .lock()
            .expect("health lock")
            .get(service)
            .copied()
            .unwrap_or(tonic_health::ServingStatus::Unknown)
    }
}

/// [`serve_with`], over TLS when `options.tls` is set.
pub async fn serve_with_options(
    platform: Platform,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    options: ServeOptions,
) -> anyhow::Result<()> {
    let ServeOptions {
        shutdown_delay,
        tls,
        health: states,
    } = options;
    let states = states.unwrap_or_default();
    let (health, health_service) = (states.reporter.clone(), states.service.clone());
    // The process is alive until it exits, draining included.
    states
        .set(health_services::LIVE, tonic_health::ServingStatus::Serving)
        .await;
    // Every call but health, reflection and availability levels carries a credential,
    // resolved by one interceptor.
    let auth = Authenticator {
        operator: platform.operator.clone(),
        projections: platform.projections.clone(),
    };
    // Checkout resolves its callers itself (the same Authenticator), off the interceptor.
    let checkout = CheckoutServiceServer::new(Checkout::new(platform.clone()))
        .max_decoding_message_size(CHECKOUT_MESSAGE_BYTES_MAX);
    let operator = tonic::service::interceptor::InterceptedService::new(
        OperatorServiceServer::new(Operator::new(platform.clone())).max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        auth.clone(),
    );
    let registry = PartnerRegistryServiceServer::with_interceptor(Registry::new(platform.clone()), auth.clone());
    let dispatch = DispatchServiceServer::with_interceptor(Couriers::new(platform.clone()), auth.clone());
    let settlement = SettlementServiceServer::with_interceptor(Settlement::new(platform.clone()), auth.clone());
    let edges = tonic::service::interceptor::InterceptedService::new(
        EdgeServiceServer::new(Edges::new(platform.clone())).max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        auth,
    );
    health.set_serving::<CheckoutServiceServer<Checkout>>().await;
    health.set_serving::<OperatorServiceServer<Operator>>().await;
    health.set_serving::<PartnerRegistryServiceServer<Registry>>().await;
    health.set_serving::<DispatchServiceServer<Couriers>>().await;
    health.set_serving::<SettlementServiceServer<Settlement>>().await;
    health.set_serving::<EdgeServiceServer<Edges>>().await;
    states
        .set(health_services::READY, tonic_health::ServingStatus::Serving)
        .await;
    states
        .set(health_services::WRITES, tonic_health::ServingStatus::Serving)
        .await;
    let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
    {
        // Not ready while a cluster node is cut off from NATS (it can neither journal nor
        // route) or while the journal refuses writes until a restart (its storage failed).
        // A full disk only turns `writes` NOT_SERVING: reads go on, writes resume by
        // themselves.
        let health = states.clone();
        let mut stopping_rx = stopping_rx.clone();
        let node = platform.cluster.clone();
        let journal = platform.journal.clone();
        tokio::spawn(async move {
            let mut was_ready = true;
            let mut took_writes = true;
            loop {
                tokio::select! {
                    _ = stopping_rx.changed() => return,
                    _ = tokio::time::sleep(Duration::from_millis(NATS_CONNECTION_CHECK_MS)) => {}
                }
                // Writes refused (a full disk, or a failed storage): reads are still served.
                let refusal = journal.write_refusal();
                if refusal.is_none() != took_writes {
                    let status = match &refusal {
                        None => {
                            info!("the journal takes writes again: writes SERVING");
                            tonic_health::ServingStatus::Serving
                        }
                        Some(refusal) => {
                            warn!(%refusal, "the journal refuses writes: writes NOT_SERVING, reads still served");
                            tonic_health::ServingStatus::NotServing
                        }
                    };
                    health.set(health_services::WRITES, status).await;
                    took_writes = refusal.is_none();
                }
                let problem = match &node {
                    Some(node) if node.unreachable().is_some() => node.unreachable(),
                    _ => journal
                        .failure()
                        .map(|why| format!("the journal refuses writes ({why})")),
                };
                if problem.is_none() != was_ready && !*stopping_rx.borrow() {
                    let status = match &problem {
                        None => {
                            info!("ready again: SERVING");
                            tonic_health::ServingStatus::Serving
                        }
                        Some(problem) => {
                            warn!(%problem, "NOT_SERVING until it is resolved");
                            tonic_health::ServingStatus::NotServing
                        }
                    };
                    health.set(health_services::READY, status).await;
                    was_ready = problem.is_none();
                }
            }
        });
    }
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
        let states = states.clone();
        async move {
            shutdown.await;
            let _ = stopping_tx.send(true);
            info!("shutting down: health NOT_SERVING, draining in-flight calls");
            states
                .set(health_services::READY, tonic_health::ServingStatus::NotServing)
                .await;
            health.set_not_serving::<CheckoutServiceServer<Checkout>>().await;
            health.set_not_serving::<OperatorServiceServer<Operator>>().await;
            health.set_not_serving::<PartnerRegistryServiceServer<Registry>>().await;
            health.set_not_serving::<DispatchServiceServer<Couriers>>().await;
            health.set_not_serving::<SettlementServiceServer<Settlement>>().await;
            if !shutdown_delay.is_zero() {
                info!(
                    delay_ms = shutdown_delay.as_millis() as u64,
                    "still serving while load balancers catch up"
                );
                tokio::time::sleep(shutdown_delay).await;
            }
            platform.begin_shutdown();
            let _ = drained_tx.send(());
        }
    };
    // `Server::tcp_nodelay` does not apply to a listener handed over with
    // `serve_with_incoming*`: set it on the incoming stream itself. Without it, Nagle's
    // algorithm meeting the client's delayed ACK held the last replies of a burst ~40 ms.
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(TCP_KEEPALIVE_SECS)));
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    // Outermost, so that calls refused by the bounds inside it are counted and traced too
    // (it only passes calls through when the platform's metrics are off).
    let server = builder
        .layer(RpcLayer::new(platform.metrics.clone()))
        .max_concurrent_streams(GRPC_CONCURRENT_STREAMS_MAX)
        .concurrency_limit_per_connection(GRPC_REQUESTS_IN_FLIGHT_MAX)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // Metadata up to 1 MiB reaches `metadata_bounds`, which fails that call alone;
        // beyond, h2 answers 431 or closes the connection (see the limit's comment).
        .http2_max_header_list_size(HTTP2_HEADER_LIST_BYTES_MAX)
        // tonic passes "no limit" to h2 unless this is set.
        .http2_max_local_error_reset_streams(Some(HTTP2_LOCAL_ERROR_RESETS_MAX))
        .layer(crate::metadata_bounds::layer())
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(checkout)
        .add_service(operator)
        .add_service(registry)
        .add_service(dispatch)
        .add_service(settlement)
        .add_service(edges)
        .serve_with_incoming_shutdown(incoming, stopping);
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

/// Asks the grpc.health.v1 service of `server` (named so in errors) at `endpoint` about
/// `service` ("": readiness, `liveness`), connection and call each bounded by `timeout`. A
/// server still opening has its port bound and holds the call in its backlog: that is a
/// timeout here.
pub async fn health_status(
    server: &str,
    endpoint: Endpoint,
    service: &str,
    timeout: Duration,
) -> anyhow::Result<HealthStatus> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let endpoint = endpoint.connect_timeout(timeout).timeout(timeout);
    let channel = tokio::time::timeout(timeout, endpoint.connect())
        .await
        .map_err(|_| anyhow::anyhow!("{server}: no connection within {} ms", timeout.as_millis()))?
        .map_err(|e| anyhow::Error::new(e).context(server.to_owned()))?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{server}: {} ({:?})", s.message(), s.code()))?;
    Ok(HealthStatus::try_from(reply.into_inner().status).unwrap_or(HealthStatus::Unknown))
}

/// Whether the server at `addr` (plaintext) reports SERVING (readiness) within `timeout`.
pub async fn is_serving(addr: std::net::SocketAddr, timeout: Duration) -> bool {
    let server = format!("http://{addr}");
    let Ok(endpoint) = Endpoint::from_shared(server.clone()) else {
        return false;
    };
    health_status(&server, endpoint, "", timeout)
        .await
        .is_ok_and(|status| status == HealthStatus::Serving)
}
