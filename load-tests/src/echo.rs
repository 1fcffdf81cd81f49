//! The baseline: a bare tonic server for `dropline.bench.v1.EchoService`.
//!
//! It does nothing but return the payload, so running the same load against it shows what
//! tonic, HTTP/2 and the loopback cost on this machine, the ceiling Dropline is compared to.
//! It runs in its own process, like Dropline, so it does not share a runtime with the load
//! generator.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use proto::bench::v1::echo_service_server::{EchoService, EchoServiceServer};
use proto::bench::v1::{EchoRequest, EchoResponse};
use tokio::process::{Child, Command};
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

use crate::net;

/// How long a freshly spawned echo server may take to print its address.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Arguments of `dropline-load echo-server`.
#[derive(Debug, clap::Args)]
pub struct EchoServerArgs {
    /// Address to listen on; port 0 picks a free port (printed once bound).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Keep tokio's LIFO slot (`true`, tokio's default: a bare tonic server) or turn it off
    /// as `dropline serve` does (`false`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub lifo_slot: bool,
}

struct Echo;

#[tonic::async_trait]
impl EchoService for Echo {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        Ok(Response::new(EchoResponse {
            payload: request.into_inner().payload,
        }))
    }
}

/// Binds, prints `listening on <addr>` (the only line on stdout, which the parent waits for),
/// then serves until the process is killed.
pub async fn serve(args: EchoServerArgs) -> anyhow::Result<()> {
    let incoming = TcpIncoming::bind(args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?
        // Small unary messages: without TCP_NODELAY, Nagle would add delay to replies.
        .with_nodelay(Some(true));
    let addr = incoming.local_addr()?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on {addr}")?;
    stdout.flush()?;
    drop(stdout);

    Server::builder()
        .add_service(EchoServiceServer::new(Echo))
        .serve_with_incoming(incoming)
        .await
        .context("echo server failed")
}

/// Starts `dropline-load echo-server` (this same binary) on a free port and returns the
/// child with its address. The child is killed when the handle is dropped, so an error in
/// the caller cannot leave it running.
/// `lifo_slot`: see [`EchoServerArgs::lifo_slot`].
pub async fn spawn_child(lifo_slot: bool) -> anyhow::Result<(Child, SocketAddr)> {
    let exe = std::env::current_exe().context("cannot locate the dropline-load binary")?;
    let mut child = Command::new(&exe)
        .args([
            "echo-server",
            "--listen",
            "127.0.0.1:0",
            "--lifo-slot",
            &lifo_slot.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {} echo-server", exe.display()))?;
    let addr = net::read_listening_addr(&mut child, STARTUP_TIMEOUT)
        .await
        .context("the echo server did not start")?;
    Ok((child, addr))
}
