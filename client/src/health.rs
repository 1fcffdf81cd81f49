//! `dropline health`: one grpc.health.v1 Check of a running server, for exec probes,
//! container health checks and scripts.

use crate::cli::HealthArgs;
use crate::tls::ClientTlsArgs;
use std::time::Duration;
use tonic_health::pb::health_check_response::ServingStatus;

/// The health of `service` ("": readiness, `liveness`) at `server` (http://… or https://…).
pub async fn status(
    server: &str,
    tls: &ClientTlsArgs,
    service: &str,
    timeout: Duration,
) -> anyhow::Result<ServingStatus> {
    services::server::health_status(server, crate::tls::endpoint(server, tls)?, service, timeout).await
}

/// Prints the status; true for SERVING.
pub async fn check(args: &HealthArgs) -> anyhow::Result<bool> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let status = status(&args.server, &args.tls, &args.service, timeout).await?;
    println!("{}", status.as_str_name());
    Ok(status == ServingStatus::Serving)
}
