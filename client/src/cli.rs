//! The `dropline` command line: its commands and their flags. `serve`'s own flags are the
//! server's (`services::config::ServeArgs`).

use crate::tls::ClientTlsArgs;
use clap::{Args, Parser, Subcommand};
use services::config::ServeArgs;
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
    /// Keep tokio's LIFO slot (a woken task runs next). Off by default: woken tasks run in
    /// order, so bursts batch (see ARCHITECTURE.md, *Scheduler*). Read before the runtime
    /// starts, so it is a flag or environment variable, not a setting of the TOML file.
    #[arg(
        long,
        global = true,
        env = "DROPLINE_TOKIO_LIFO_SLOT",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub tokio_lifo_slot: bool,
}

// Parsed once per process: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the platform: gRPC checkout and operator services with durable local storage.
    // Boxed: its flags outweigh every other command's.
    Serve(Box<ServeArgs>),
    /// Run a scripted multi-city drop (embedded, or on a local cluster with --cluster) and print a report.
    Demo(DemoArgs),
    /// Creators' settlement against a running server: statements and reconciliation.
    Settlement(SettlementArgs),
    /// Lease stock to pop-up edges (operator): lease, top up, close, list with refused sales.
    Lease(LeaseArgs),
    /// Run a pop-up edge: a till server at a stall that sells the stock leased to it, online
    /// or offline, and uploads its sales to the platform.
    Edge(Box<EdgeArgs>),
    /// Ask a running server's grpc.health.v1 service; exit 0 when it answers SERVING (for
    /// exec probes, container health checks and scripts).
    Health(HealthArgs),
}

#[derive(Debug, Args, Clone)]
pub struct HealthArgs {
    /// The server's gRPC address: http://… in plaintext, https://… over TLS.
    #[arg(long, env = "DROPLINE_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    /// The health service to ask: "" (the platform, readiness) or `liveness` (the process).
    #[arg(long, default_value = "")]
    pub service: String,
    /// Give up after this long.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub timeout_ms: u64,
}

#[derive(Debug, Args, Clone)]
pub struct SettlementArgs {
    /// The server's gRPC address: http://… in plaintext, https://… over TLS.
    #[arg(
        long,
        env = "DROPLINE_SERVER",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub server: String,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
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
pub struct LeaseArgs {
    /// The server's gRPC address: http://… in plaintext, https://… over TLS.
    #[arg(
        long,
        env = "DROPLINE_SERVER",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub server: String,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    /// The operator credential.
    #[arg(long, env = "DROPLINE_OPERATOR_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    #[command(subcommand)]
    pub command: LeaseCommand,
}

#[derive(Debug, Subcommand, Clone)]
pub enum LeaseCommand {
    /// Lease units of one hub's pool of a SKU to an edge (a registered storefront): they leave
    /// the pool's available stock now; the edge sells them, online or offline, until --expires.
    Stock {
        #[arg(long = "drop")]
        drop_id: String,
        #[arg(long)]
        sku: String,
        /// The hub whose pool the units come from.
        #[arg(long)]
        hub: String,
        /// The edge's storefront id.
        #[arg(long)]
        edge: String,
        #[arg(long)]
        quantity: u32,
        /// The edge may top itself up until this many units are leased in all (0: never).
        #[arg(long, default_value_t = 0)]
        top_up_max: u32,
        /// Names the key the edge signs its receipts with: a new one per event.
        #[arg(long)]
        key_id: String,
        /// When the edge stops selling: YYYY-MM-DD (UTC midnight) or an RFC 3339 instant.
        #[arg(long)]
        expires: String,
        /// How long after a sale its upload is still booked (60 to 86400; 0: one hour).
        #[arg(long, default_value_t = 0)]
        window_seconds: u32,
    },
    /// Top a live lease up until this many units are leased in all.
    TopUp {
        #[arg(long = "drop")]
        drop_id: String,
        #[arg(long)]
        sku: String,
        #[arg(long)]
        edge: String,
        #[arg(long)]
        granted_total: u32,
    },
    /// Return what a lease still holds to its pool and end it (later uploads are refunded).
    Close {
        #[arg(long = "drop")]
        drop_id: String,
        #[arg(long)]
        sku: String,
        #[arg(long)]
        edge: String,
    },
    /// Every lease of a drop, and the edge sales refused (to refund).
    List {
        #[arg(long = "drop")]
        drop_id: String,
    },
}

#[derive(Debug, Args, Clone)]
pub struct DemoArgs {
    /// Run the drop across a local cluster of this many NATS servers and Dropline nodes
    /// (2 to 5) and kill -9 one node in the middle of it, instead of the embedded platform.
    #[arg(long, value_parser = clap::value_parser!(u8).range(2..=5))]
    pub cluster: Option<u8>,
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
    /// Where the demo serves the operator and creator consoles (embedded platform only).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http_listen: std::net::SocketAddr,
    /// Keep the platform and its consoles serving this many seconds after the report, to
    /// look around (Ctrl-C ends it sooner).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub linger: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lifo_slot_flag_is_global_and_off_unless_given() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).expect("parses").tokio_lifo_slot;
        // Tests of this binary never set DROPLINE_TOKIO_LIFO_SLOT, so the default shows.
        if std::env::var_os("DROPLINE_TOKIO_LIFO_SLOT").is_none() {
            assert!(!parse(&["dropline", "serve"]));
        }
        assert!(parse(&["dropline", "serve", "--tokio-lifo-slot"]));
        assert!(parse(&["dropline", "--tokio-lifo-slot", "demo"]));
        assert!(parse(&["dropline", "health", "--tokio-lifo-slot"]));
    }
}

/// `dropline edge`: see `services::popup`.
#[derive(Debug, Args, Clone)]
#[command(after_help = "\
The edge sells only what the operator leased it (`dropline lease stock`), so the drop is \
never oversold whatever happens to the network. Each sale is answered once it is synced \
in the edge's own journal under --data-dir, queued in a durable outbox and uploaded; the \
platform books it once by its order id. Sales not uploaded within the lease's \
reconciliation window, or made after the lease ended, are refunded and listed by \
PopupService.GetStatus. Tills call the edge's CheckoutService (Reserve, Confirm for \
pickup, Cancel, GetOrder, GetAvailability) with the edge's storefront credential.")]
pub struct EdgeArgs {
    /// The platform's gRPC address (`dropline serve` or a cluster's): http://… in plaintext,
    /// https://… over TLS.
    #[arg(long, env = "DROPLINE_UPSTREAM")]
    pub upstream: String,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    /// The edge's storefront credential (OperatorService.RegisterStorefront): it calls the
    /// platform with it, and tills present it to the edge.
    #[arg(long, env = "DROPLINE_EDGE_TOKEN", hide_env_values = true)]
    pub token: String,
    /// The drop whose leases this edge sells.
    #[arg(long = "drop", env = "DROPLINE_EDGE_DROP")]
    pub drop_id: String,
    /// The edge's own journal, receipt keys and tills.
    #[arg(long, env = "DROPLINE_EDGE_DATA_DIR", default_value = "dropline-edge-data")]
    pub data_dir: PathBuf,
    /// Where the tills reach the edge (gRPC, plaintext: keep it on the stall's network).
    #[arg(long, env = "DROPLINE_EDGE_LISTEN", default_value = "127.0.0.1:50061")]
    pub listen: std::net::SocketAddr,
    /// The edge is offline while the platform fails to answer, or answers slower than this.
    #[arg(long, env = "DROPLINE_EDGE_OFFLINE_AFTER_MS", default_value_t = 1_500,
          value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub offline_after_ms: u64,
    /// How often the leases are read again while online (offline: the platform is probed
    /// every second).
    #[arg(long, env = "DROPLINE_EDGE_SYNC_SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub sync_secs: u64,
    /// How often the drop's availability levels are fetched for the stall's screens.
    #[arg(long, env = "DROPLINE_EDGE_AVAILABILITY_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=180))]
    pub availability_secs: u64,
    /// Top a lease up when the stall has fewer units than this free, within what the
    /// operator allowed (the lease's top-up maximum); 0: never.
    #[arg(long, env = "DROPLINE_EDGE_TOP_UP_BELOW", default_value_t = 5)]
    pub top_up_below: u32,
    /// Units asked for per top-up.
    #[arg(long, env = "DROPLINE_EDGE_TOP_UP_UNITS", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub top_up_units: u32,
    /// How long a till's hold waits for its payment.
    #[arg(long, env = "DROPLINE_EDGE_HOLD_SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub hold_secs: u64,
    /// Log filter (tracing's env-filter syntax over `services`, `actors`).
    #[arg(long, env = "DROPLINE_LOG", default_value = "info")]
    pub log: String,
}
