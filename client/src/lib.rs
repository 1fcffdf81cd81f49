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
            services::init_tracing("warn");
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
