//! The `dropline` binary: parses the command line and hands over to `client::run`.

use clap::Parser;
use std::process::ExitCode;

/// mimalloc: glibc malloc cost ~20 % of the reserve path under load (arena lock contention
/// and fragmentation across tokio workers); see ARCHITECTURE.md. The `mimalloc` feature is on
/// by default; without it the system allocator runs, for heap profiling.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = client::cli::Cli::parse();
    let result = actors::runtime::multi_thread(cli.tokio_lifo_slot)
        .map_err(anyhow::Error::from)
        .and_then(|(runtime, scheduler)| runtime.block_on(client::run(cli, scheduler)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line with the cause chain: `main` returning the error would print its Debug
            // form, with a backtrace whenever RUST_BACKTRACE is set.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
