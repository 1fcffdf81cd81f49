//! The `dropline` command line and the clients in it: `serve` hands over to the server
//! (`services`); `demo` drives a scripted drop through the real gRPC API, on an embedded
//! platform or a local cluster (`testkit`); `settlement` and `health` talk to a running
//! server. Nothing here is part of the server library.

pub mod cli;
pub mod demo;
pub mod health;
pub mod lease_cli;
pub mod settlement_cli;
pub mod tls;

use cli::{Cli, Command};

/// Runs the command line's command on the runtime `main` built with `scheduler`.
pub async fn run(cli: Cli, scheduler: actors::runtime::Scheduler) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => services::serve(*args, scheduler).await,
        Command::Demo(args) => {
            // The pop-up's edge says when it goes offline: the demo's report says it too.
            services::init_tracing("warn,services::popup=error");
            demo::run(args).await
        }
        Command::Settlement(args) => {
            services::init_tracing("warn");
            settlement_cli::run(args).await
        }
        Command::Lease(args) => {
            services::init_tracing("warn");
            lease_cli::run(args).await
        }
        Command::Edge(args) => {
            services::init_tracing(&args.log);
            services::popup::run(edge_config(*args)?).await
        }
        Command::Health(args) => match health::check(&args).await {
            Ok(true) => Ok(()),
            Ok(false) => std::process::exit(1),
            Err(e) => {
                // A probe's answer, not a crash: one line, no backtrace.
                eprintln!("dropline health: {e:#}");
                std::process::exit(1)
            }
        },
    }
}

/// The edge's settings from its flags.
fn edge_config(args: cli::EdgeArgs) -> anyhow::Result<services::popup::EdgeConfig> {
    use std::time::Duration;
    let drop_id =
        domain::DropId::parse(&args.drop_id).map_err(|e| anyhow::anyhow!("--drop {:?}: {e}", args.drop_id))?;
    if args.token.trim().is_empty() {
        anyhow::bail!("--token (DROPLINE_EDGE_TOKEN) must be the edge's storefront credential");
    }
    Ok(services::popup::EdgeConfig {
        upstream: tls::endpoint(&args.upstream, &args.tls)?,
        upstream_url: args.upstream,
        token: args.token,
        drop_id,
        data_dir: args.data_dir,
        listen: args.listen,
        timings: services::popup::EdgeTimings {
            offline_after: Duration::from_millis(args.offline_after_ms),
            sync_every: Duration::from_secs(args.sync_secs),
            availability_every: Duration::from_secs(args.availability_secs),
            hold_ttl: Duration::from_secs(args.hold_secs),
            ..services::popup::EdgeTimings::default()
        },
        top_up_below: args.top_up_below,
        top_up_units: args.top_up_units,
    })
}
