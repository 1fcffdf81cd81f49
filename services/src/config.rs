//! Configuration of `dropline`: flags, then environment variables, then an optional TOML
//! file, then built-in defaults, in that order of precedence.

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "dropline",
    version,
    about = "Live drops: limited stock, thousands of buyers in the same second, same-day fulfilment"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the platform: gRPC checkout and operator services with durable local storage.
    Serve(ServeArgs),
    /// Run a scripted multi-city drop against an embedded platform and print a report.
    Demo(DemoArgs),
    /// Creators' settlement against a running server: statements and reconciliation.
    Settlement(SettlementArgs),
}

#[derive(Debug, Args, Clone)]
pub struct SettlementArgs {
    /// The server's gRPC address.
    #[arg(
        long,
        env = "DROPLINE_SERVER",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub server: String,
    /// A creator credential, or the operator credential [default: $DROPLINE_OPERATOR_TOKEN].
    #[arg(long, env = "DROPLINE_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    #[command(subcommand)]
    pub command: SettlementCommand,
}

#[derive(Debug, Subcommand, Clone)]
pub enum SettlementCommand {
    /// Print a creator's statement for a period, or write it as CSV.
    Statement {
        /// The creator (a creator's own credential may leave it out).
        #[arg(long)]
        creator: Option<String>,
        /// First day (YYYY-MM-DD, UTC) or instant (RFC 3339) of the period [default: the first line].
        #[arg(long)]
        from: Option<String>,
        /// Last day, included (YYYY-MM-DD, UTC), or end instant, excluded (RFC 3339) [default: now].
        #[arg(long)]
        to: Option<String>,
        /// Write CSV (amounts in minor units) instead of a table.
        #[arg(long)]
        csv: bool,
        /// Write to this file instead of standard output.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Compare every confirmed order with the creators' ledgers; book what is missing and
    /// refund what cannot be reconciled (operator credential).
    Reconcile {
        /// Only list the differences.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Args, Clone)]
pub struct ServeArgs {
    /// Address for gRPC [default: 127.0.0.1:50051].
    #[arg(long, env = "DROPLINE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for the journal and secrets [default: ./data].
    #[arg(long, env = "DROPLINE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// A TOML file with `listen` and `data_dir` keys.
    #[arg(long, env = "DROPLINE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log filter, e.g. `info` or `dropline=debug` [default: info].
    #[arg(long, env = "DROPLINE_LOG")]
    pub log: Option<String>,
    /// The operator credential (at least 16 characters); only its hash is stored. Without
    /// it the stored one stays in force, or a new one is made and shown once.
    #[arg(long, env = "DROPLINE_OPERATOR_TOKEN", hide_env_values = true)]
    pub operator_token: Option<String>,
}

#[derive(Debug, Args, Clone)]
pub struct DemoArgs {
    /// Simulated buyers bursting in at open.
    #[arg(long, default_value_t = 3_000)]
    pub buyers: usize,
    /// Buyers acting at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Reservation window of the demo drop, in seconds.
    #[arg(long, default_value_t = 3)]
    pub hold_ttl_seconds: u32,
    /// Keep the demo's data here instead of a temporary directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Seed of the buyers' random choices, for a repeatable run.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    log: Option<String>,
}

/// The settings `dropline serve` runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub log: String,
    pub operator_token: Option<String>,
}

impl ServeArgs {
    pub fn resolve(&self) -> anyhow::Result<ServeConfig> {
        let file: FileConfig = match &self.config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
                toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            }
            None => FileConfig::default(),
        };
        Ok(ServeConfig {
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 50051))),
            data_dir: self
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("./data")),
            log: self.log.clone().or(file.log).unwrap_or_else(|| "info".into()),
            operator_token: self.operator_token.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dropline.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:6000\"\ndata_dir = \"/var/lib/dropline\"\n").unwrap();
        let args = ServeArgs {
            listen: Some("127.0.0.1:7000".parse().unwrap()),
            data_dir: None,
            config: Some(path),
            log: None,
            operator_token: None,
        };
        let config = args.resolve().unwrap();
        assert_eq!(config.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(config.data_dir, PathBuf::from("/var/lib/dropline"));
        assert_eq!(config.log, "info");
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "listne = \"x\"\n").unwrap();
        assert!(ServeArgs {
            listen: None,
            data_dir: None,
            config: Some(bad),
            log: None,
            operator_token: None,
        }
        .resolve()
        .is_err());
    }
}
