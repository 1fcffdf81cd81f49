//! The `dropline` binary: parses the command line and hands over to `services::run`.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = services::config::Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(services::run(cli))
}
