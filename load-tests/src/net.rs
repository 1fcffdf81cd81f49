//! Connections and child processes shared by the scenarios.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use proto::operator::v1::operator_service_client::OperatorServiceClient;
use proto::operator::v1::GetDropRequest;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Child;
use tonic::transport::{Channel, Endpoint};

/// How long to wait for a TCP connection to a server that should already be listening.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between readiness probes of a starting server.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// Largest response the load clients accept: the server's own cap (16 MiB) with room to
/// spare, since a GetDrop of a 10,000-SKU drop outgrows tonic's 4 MiB default.
pub const MAX_DECODING_BYTES: usize = 32 * 1024 * 1024;

/// Opens `count` channels to `target`, each its own HTTP/2 connection: calls are spread over
/// them round-robin, as a fleet of storefront servers would spread over the platform.
pub async fn connect_channels(target: &str, count: usize) -> anyhow::Result<Vec<Channel>> {
    ensure!(count > 0, "connections must be at least 1");
    let endpoint = endpoint(target)?;
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count {
        // `Endpoint::connect` dials a new connection each time, even for the same endpoint.
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot connect to {target}: is the server running?"))?;
        channels.push(channel);
    }
    Ok(channels)
}

pub(crate) fn endpoint(target: &str) -> anyhow::Result<Endpoint> {
    Ok(Endpoint::from_shared(target.to_owned())
        .with_context(|| format!("invalid target URI {target:?}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true))
}

/// Waits until the Dropline server at `target` (one this run did not start) answers gRPC
/// calls.
///
/// Any answer to a GetDrop of a drop that does not exist (normally NOT_FOUND) proves the
/// server is serving; UNAVAILABLE, a refused connection or no answer within the probe's
/// deadline mean "not yet" (`dropline serve` binds its port before the platform opens, so
/// a call can be accepted and wait).
pub async fn wait_until_answering(target: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let last_error = match probe(target).await {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        if Instant::now() >= deadline {
            return Err(last_error.context(format!(
                "the server at {target} did not answer within {} s: is it running?",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

async fn probe(target: &str) -> anyhow::Result<()> {
    let channel = endpoint(target)?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(2))
        .connect()
        .await?;
    let request = GetDropRequest {
        drop_id: "dropline-load-readiness-probe".to_owned(),
    };
    match OperatorServiceClient::new(channel).get_drop(request).await {
        Err(status)
            if matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ) =>
        {
            Err(status.into())
        }
        // Any other answer, NOT_FOUND included, comes from a server that is serving.
        Ok(_) | Err(_) => Ok(()),
    }
}

/// Reads the child's stdout until its `listening on <addr>` line and returns the address.
pub async fn read_listening_addr(child: &mut Child, timeout: Duration) -> anyhow::Result<SocketAddr> {
    let stdout = child.stdout.take().context("the child's stdout is not piped")?;
    let mut lines = BufReader::new(stdout).lines();
    let wait_for_line = async {
        while let Some(line) = lines.next_line().await? {
            if let Some(addr) = line.trim().strip_prefix("listening on ") {
                return addr
                    .parse::<SocketAddr>()
                    .with_context(|| format!("bad address in {line:?}"));
            }
        }
        bail!("the child closed its stdout without printing `listening on <addr>`")
    };
    tokio::time::timeout(timeout, wait_for_line)
        .await
        .with_context(|| format!("no `listening on` line within {timeout:?}"))?
}

/// Kills a child process and reaps it, so it neither outlives the run nor lingers as a zombie.
pub async fn stop(child: &mut Child) {
    // A child that already exited cannot be killed; that is fine, the goal is that it is gone.
    let _ = child.kill().await;
}
