//! `dropline-load`: load tests for Dropline.
//!
//! Each subcommand is one scenario; see the library crate for how they measure.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use load_tests::{catalog, cluster, echo, edge, hot_sku, nemesis, swaps};

/// mimalloc: glibc malloc cost ~20 % of the reserve path under load (arena lock contention
/// and fragmentation across tokio workers); see ARCHITECTURE.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "dropline-load", version, about = "Load tests for the Dropline platform")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve dropline.bench.v1.EchoService, the gRPC baseline; prints `listening on <addr>`.
    EchoServer(echo::EchoServerArgs),
    /// Burst of reserves on one hot SKU, compared with a bare tonic echo server, then an
    /// oversell check.
    HotSku(hot_sku::HotSkuArgs),
    /// Resident memory of a dropline server holding a large live catalog.
    Catalog(catalog::CatalogArgs),
    /// Fulfilment: offer latency to a subscribed courier and swap latency after missed
    /// accept deadlines with many open dispatches at one hub.
    Swaps(swaps::SwapsArgs),
    /// Cluster mode: the hot-SKU burst through N nodes over NATS against one embedded
    /// server, and the takeover time after kill -9 of the hot SKU's node, repeated.
    Cluster(cluster::ClusterArgs),
    /// Pop-up edge: offline sales at N tills against the same sale online on the platform,
    /// and the upload rate once the edge's link is back.
    Edge(edge::EdgeArgs),
    /// Fault schedules against a 3-node cluster on 3 NATS servers (partitions, pauses,
    /// kills), each checked for lost acknowledgements, oversell and double bookings.
    Nemesis(nemesis::NemesisArgs),
    /// Only the echo half of hot-sku: checks the generator without a Dropline server.
    #[command(hide = true)]
    EchoOnly(hot_sku::EchoOnlyArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The echo server keeps tokio's default scheduler unless told otherwise: it is the bare
    // tonic baseline.
    let lifo_slot = match &cli.command {
        Command::EchoServer(args) => args.lifo_slot,
        _ => load_tests::GENERATOR_LIFO_SLOT,
    };
    match actors::runtime::multi_thread(lifo_slot) {
        Ok((runtime, _)) => runtime.block_on(run(cli)),
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::EchoServer(args) => echo::serve(args).await,
        Command::HotSku(args) => hot_sku::run(args).await,
        Command::Catalog(args) => catalog::run(args).await,
        Command::Swaps(args) => swaps::run(args).await,
        Command::Cluster(args) => cluster::run(args).await,
        Command::Nemesis(args) => nemesis::run(args).await,
        Command::Edge(args) => edge::run(args).await,
        Command::EchoOnly(args) => hot_sku::run_echo_only(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line with the whole cause chain: a failed run should say why at a glance,
            // not print a backtrace (which anyhow's Debug adds whenever RUST_BACKTRACE is set).
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
