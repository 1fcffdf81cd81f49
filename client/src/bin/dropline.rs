//! The `dropline` binary: parses the command line and hands over to `client::run`.

use clap::Parser;

/// mimalloc: glibc malloc cost ~20 % of the reserve path under load (arena lock contention
/// and fragmentation across tokio workers); see ARCHITECTURE.md. The `mimalloc` feature is on
/// by default; without it the system allocator runs, for heap profiling.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = client::cli::Cli::parse();
    let (runtime, scheduler) = actors::runtime::multi_thread(cli.tokio_lifo_slot)?;
    runtime.block_on(client::run(cli, scheduler))
}
