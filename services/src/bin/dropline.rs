//! The `dropline` binary: parses the command line and hands over to `services::run`.

use clap::Parser;

/// mimalloc: glibc malloc cost ~20 % of the reserve path under load (arena lock contention
/// and fragmentation across tokio workers); see ARCHITECTURE.md. The `mimalloc` feature is on
/// by default; without it the system allocator runs, for heap profiling.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = services::config::Cli::parse();
    let (runtime, scheduler) = actors::runtime::multi_thread(cli.tokio_lifo_slot)?;
    runtime.block_on(services::run(cli, scheduler))
}
