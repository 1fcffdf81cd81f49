//! Configuration of `dropline serve`: flags, then environment variables, then an optional
//! TOML file, then built-in defaults, in that order of precedence.

use crate::limits::{
    BUYER_RESERVES_PER_SEC_DEFAULT, BUYER_RESERVE_BURST_DEFAULT, JOURNAL_SEGMENT_BYTES_MAX, JOURNAL_SEGMENT_BYTES_MIN,
    LIVE_ACTORS_MAX_UPPER, PARTITIONS_MAX, SHUTDOWN_DELAY_MS_MAX, STOREFRONT_CALLS_PER_SEC_DEFAULT,
};
use crate::telemetry::logging::LogFormat;
use crate::telemetry::Telemetry;
use actors::cluster::placement::PARTITIONS_DEFAULT;
use actors::cluster::{ClusterConfig, LeaseTimings};
use actors::limits::{LIVE_ACTORS_MAX_DEFAULT, LOG_SEGMENT_BYTES};
use clap::Args;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

fn hostname() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::env::var("HOSTNAME"))
        .map_err(|_| anyhow::anyhow!("no --node given and the host name is unknown"))?;
    Ok(name.trim().replace('.', "-"))
}

/// The health service names `dropline serve` reports.
pub mod health_services {
    /// The whole platform: SERVING once it can take calls, NOT_SERVING from SIGTERM on, on a
    /// cluster node while its NATS connection is down or its heartbeat cannot be written for
    /// a lease TTL (NATS unreachable though connected), and while the journal refuses writes
    /// until a restart (its storage failed). A full disk leaves it SERVING: reads are still
    /// served, and writes resume by themselves once space is freed. What readiness checks
    /// ask.
    pub const READY: &str = "";
    /// Writes: NOT_SERVING while the journal refuses them, for want of disk space (until
    /// space is freed) or because its storage failed (until a restart). What an alert on a
    /// full disk asks.
    pub const WRITES: &str = "writes";
    /// The process: SERVING from start until it exits, draining included. What liveness
    /// checks ask, so that a draining or NATS-less node is not restarted for nothing.
    pub const LIVE: &str = "liveness";
}

#[derive(Debug, Args, Clone)]
pub struct ServeArgs {
    /// Address for gRPC [default: 127.0.0.1:50051].
    #[arg(long, env = "DROPLINE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for the journal and secrets [default: ./data].
    #[arg(long, env = "DROPLINE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address for the HTTP side: /metrics (no credential), /healthz, /readyz and the
    /// consoles [default: 127.0.0.1:8080]. Keep it on loopback or a pod network.
    #[arg(long, env = "DROPLINE_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// A TOML file with any of the keys `listen`, `http_listen`, `data_dir`, `log`,
    /// `log_format`, `otlp_endpoint`, `console_origin`, `shutdown_delay_ms`, `live_actors_max`,
    /// `storefront_calls_per_sec`, `buyer_reserves_per_sec`, `buyer_reserve_burst`,
    /// `tls_cert`, `tls_key`, `tls_client_ca`, `nats`, `node`, `partitions`, `replicas`,
    /// `lease_ttl_ms`, `lease_renew_ms`.
    #[arg(long, env = "DROPLINE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log filter (tracing's env-filter syntax) over targets `services` (the server;
    /// `services::rpc`: one debug line per gRPC call), `actors` (actors, journal, cluster)
    /// and `client`, e.g. `info`, `warn,services=info` or `info,services::rpc=debug`
    /// [default: info].
    #[arg(long, env = "DROPLINE_LOG")]
    pub log: Option<String>,
    /// Log line format on standard error: `text` (coloured only on a terminal) or `json`
    /// (one object per line) [default: text].
    #[arg(long, env = "DROPLINE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Export traces (a span per gRPC call, with the actor command and journal append under
    /// it) over OTLP/gRPC to this collector, e.g. `http://127.0.0.1:4317`.
    #[arg(long, env = "DROPLINE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// The origin browsers reach the consoles at when a proxy in front of the HTTP side
    /// terminates TLS or renames the host, e.g. `https://drops.example.com`: forms must come
    /// from it, and session cookies are `Secure` when it is https [default: the request's
    /// own host, https only with --tls-cert].
    #[arg(long, env = "DROPLINE_CONSOLE_ORIGIN")]
    pub console_origin: Option<String>,
    /// Count and trace calls (`on`), or not (`off`): only to measure what it costs.
    #[arg(long, env = "DROPLINE_TELEMETRY", value_enum, hide = true)]
    pub telemetry: Option<Telemetry>,
    /// The operator credential (at least 16 characters); only its hash is stored. Without
    /// it the stored one stays in force, or a new one is made and shown once.
    #[arg(long, env = "DROPLINE_OPERATOR_TOKEN", hide_env_values = true)]
    pub operator_token: Option<String>,
    /// On SIGTERM, report NOT_SERVING at once but keep serving this long before draining,
    /// so that load balancers (a Kubernetes Service) stop sending calls first [default: 0;
    /// at most 60000].
    #[arg(long, env = "DROPLINE_SHUTDOWN_DELAY_MS")]
    pub shutdown_delay_ms: Option<u64>,
    /// Running actors of each kind (SKUs, drops, hubs, creators) kept at most; starting one
    /// more asks the least recently used to stop early (they restart from the journal on
    /// next use). About 10 KiB per running SKU actor [default: 50000].
    #[arg(long, env = "DROPLINE_LIVE_ACTORS_MAX", value_parser = clap::value_parser!(u64).range(1..=LIVE_ACTORS_MAX_UPPER))]
    pub live_actors_max: Option<u64>,
    /// Checkout calls per second one storefront may make on this node (RESOURCE_EXHAUSTED
    /// with a retry hint past it) [default: 200000].
    #[arg(long, env = "DROPLINE_STOREFRONT_CALLS_PER_SEC", value_parser = clap::value_parser!(u32).range(1..))]
    pub storefront_calls_per_sec: Option<u32>,
    /// Reserves per second one buyer of one storefront may make on this node [default: 5].
    #[arg(long, env = "DROPLINE_BUYER_RESERVES_PER_SEC", value_parser = clap::value_parser!(u32).range(1..))]
    pub buyer_reserves_per_sec: Option<u32>,
    /// Reserves one buyer may make at once before that rate applies [default: 20].
    #[arg(long, env = "DROPLINE_BUYER_RESERVE_BURST", value_parser = clap::value_parser!(u32).range(1..))]
    pub buyer_reserve_burst: Option<u32>,
    /// Size of the embedded journal's log segments in bytes, each preallocated when it is
    /// started [default: 67108864]. Smaller ones suit a small disk (and the disk-full tests).
    #[arg(long, env = "DROPLINE_JOURNAL_SEGMENT_BYTES", hide = true,
        value_parser = clap::value_parser!(u64).range(JOURNAL_SEGMENT_BYTES_MIN..=JOURNAL_SEGMENT_BYTES_MAX))]
    pub journal_segment_bytes: Option<u64>,
    /// Check the settings (flags, environment, file) and print them, then exit without
    /// serving: 0 when they are valid.
    #[arg(long)]
    pub check_config: bool,
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// TLS: set `--tls-cert` and `--tls-key` to serve over TLS instead of plaintext.
#[derive(Debug, Args, Clone, Default)]
pub struct ServerTlsArgs {
    /// PEM certificate chain of the server (its own certificate first); with --tls-key,
    /// gRPC is served over TLS only.
    #[arg(long, env = "DROPLINE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "DROPLINE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA of partners' client certificates: a client may present one signed by it, and
    /// a partner call that does must carry the partner id as its subject CN or a DNS SAN
    /// (else PERMISSION_DENIED). Clients without a certificate are still accepted.
    #[arg(long, env = "DROPLINE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
}

/// Cluster mode: set `--nats` to run as one node of a cluster.
#[derive(Debug, Args, Clone, Default)]
pub struct ClusterArgs {
    /// NATS server URL(s), comma-separated: run as one node of a cluster (journals in
    /// JetStream, actors spread over the nodes). Without it, the embedded platform runs.
    #[arg(long, env = "DROPLINE_NATS")]
    pub nats: Option<String>,
    /// This node's name, unique in the cluster [default: the host name].
    #[arg(long, env = "DROPLINE_NODE")]
    pub node: Option<String>,
    /// Partitions of the actor keys; the same on every node for the life of the cluster
    /// [default: 32].
    #[arg(long, env = "DROPLINE_PARTITIONS")]
    pub partitions: Option<u32>,
    /// Replicas of the journal stream and buckets: 3 on a 3-server JetStream cluster
    /// [default: 1].
    #[arg(long, env = "DROPLINE_REPLICAS")]
    pub replicas: Option<usize>,
    /// A node's partition leases lapse this long after its last renewal (takeover time
    /// after a node dies is about this plus one renewal) [default: 5000].
    #[arg(long, env = "DROPLINE_LEASE_TTL_MS")]
    pub lease_ttl_ms: Option<u64>,
    /// How often a node renews its leases and rebalances; at most a third of the TTL
    /// [default: 1000].
    #[arg(long, env = "DROPLINE_LEASE_RENEW_MS")]
    pub lease_renew_ms: Option<u64>,
}

/// `--console-origin` as browsers send it in `Origin`: `http` or `https`, a host and maybe a
/// port, nothing else; lower case, no trailing slash.
fn console_origin(given: &str) -> anyhow::Result<String> {
    let bad = || anyhow::anyhow!("--console-origin {given:?}: give an origin such as https://drops.example.com");
    let trimmed = given.strip_suffix('/').unwrap_or(given);
    let uri: tonic::codegen::http::Uri = trimmed.parse().map_err(|_| bad())?;
    let (Some(scheme @ ("http" | "https")), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(bad());
    };
    if authority.as_str().contains('@')
        || uri
            .path_and_query()
            .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
    {
        return Err(bad());
    }
    Ok(format!("{scheme}://{}", authority.as_str().to_ascii_lowercase()))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    http_listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    log: Option<String>,
    log_format: Option<LogFormat>,
    otlp_endpoint: Option<String>,
    console_origin: Option<String>,
    shutdown_delay_ms: Option<u64>,
    live_actors_max: Option<u64>,
    storefront_calls_per_sec: Option<u32>,
    buyer_reserves_per_sec: Option<u32>,
    buyer_reserve_burst: Option<u32>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    nats: Option<String>,
    node: Option<String>,
    partitions: Option<u32>,
    replicas: Option<usize>,
    lease_ttl_ms: Option<u64>,
    lease_renew_ms: Option<u64>,
}

/// The settings `dropline serve` runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    /// The HTTP side's address (metrics, health, consoles).
    pub http_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub log: String,
    pub log_format: LogFormat,
    /// Where spans are exported over OTLP, if anywhere.
    pub otlp_endpoint: Option<String>,
    /// The consoles' public origin (`scheme://host[:port]`, lower case), if a proxy sets one.
    pub console_origin: Option<String>,
    pub telemetry: Telemetry,
    pub operator_token: Option<String>,
    /// How long the server keeps serving after SIGTERM before it drains.
    pub shutdown_delay: Duration,
    /// Running actors of each kind kept at most.
    pub live_actors_max: usize,
    /// The embedded journal's log segment size.
    pub journal_segment_bytes: u64,
    /// Checkout's call-rate bounds: per storefront, and per buyer (rate, burst).
    pub storefront_calls_per_sec: u32,
    pub buyer_reserves_per_sec: u32,
    pub buyer_reserve_burst: u32,
    /// Set to serve over TLS.
    pub tls: Option<crate::tls::TlsFiles>,
    /// Set when this process is one node of a cluster.
    pub cluster: Option<ClusterConfig>,
}

impl ServerTlsArgs {
    /// The TLS files from the flags (or environment), else the file; a certificate needs its
    /// key and the reverse, and client certificates need TLS.
    fn resolve(&self, file: &FileConfig) -> anyhow::Result<Option<crate::tls::TlsFiles>> {
        let cert = self.tls_cert.clone().or(file.tls_cert.clone());
        let key = self.tls_key.clone().or(file.tls_key.clone());
        let client_ca = self.tls_client_ca.clone().or(file.tls_client_ca.clone());
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(crate::tls::TlsFiles { cert, key, client_ca })),
            (None, None) if client_ca.is_some() => {
                anyhow::bail!("--tls-client-ca needs TLS: set --tls-cert and --tls-key too")
            }
            (None, None) => Ok(None),
            (Some(_), None) => anyhow::bail!("--tls-cert needs --tls-key"),
            (None, Some(_)) => anyhow::bail!("--tls-key needs --tls-cert"),
        }
    }
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
        let tls = self.tls.resolve(&file)?;
        Ok(ServeConfig {
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 50051))),
            http_listen: self
                .http_listen
                .or(file.http_listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            data_dir: self
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("./data")),
            log: self.log.clone().or(file.log.clone()).unwrap_or_else(|| "info".into()),
            log_format: self.log_format.or(file.log_format).unwrap_or_default(),
            otlp_endpoint: self.otlp_endpoint.clone().or(file.otlp_endpoint.clone()),
            console_origin: self
                .console_origin
                .clone()
                .or(file.console_origin.clone())
                .map(|origin| console_origin(&origin))
                .transpose()?,
            telemetry: self.telemetry.unwrap_or_default(),
            operator_token: self.operator_token.clone(),
            shutdown_delay: Duration::from_millis(self.shutdown_delay_ms.or(file.shutdown_delay_ms).unwrap_or(0)),
            live_actors_max: self
                .live_actors_max
                .or(file.live_actors_max)
                .map_or(LIVE_ACTORS_MAX_DEFAULT, |n| n as usize),
            journal_segment_bytes: self.journal_segment_bytes.unwrap_or(LOG_SEGMENT_BYTES),
            storefront_calls_per_sec: self
                .storefront_calls_per_sec
                .or(file.storefront_calls_per_sec)
                .unwrap_or(STOREFRONT_CALLS_PER_SEC_DEFAULT),
            buyer_reserves_per_sec: self
                .buyer_reserves_per_sec
                .or(file.buyer_reserves_per_sec)
                .unwrap_or(BUYER_RESERVES_PER_SEC_DEFAULT),
            buyer_reserve_burst: self
                .buyer_reserve_burst
                .or(file.buyer_reserve_burst)
                .unwrap_or(BUYER_RESERVE_BURST_DEFAULT),
            tls,
            cluster: None,
        })
        .and_then(|mut config| {
            if let Some(token) = &config.operator_token {
                crate::auth::OperatorCredential::check_token(token)?;
            }
            if config.http_listen == config.listen && config.listen.port() != 0 {
                anyhow::bail!(
                    "--http-listen and --listen are both {}: the HTTP side needs its own port",
                    config.listen
                );
            }
            tracing_subscriber::EnvFilter::try_new(&config.log)
                .map_err(|e| anyhow::anyhow!("log filter {:?}: {e}", config.log))?;
            if let Some(endpoint) = &config.otlp_endpoint {
                let uri: tonic::codegen::http::Uri = endpoint
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--otlp-endpoint {endpoint:?}: {e}"))?;
                if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                    anyhow::bail!("--otlp-endpoint {endpoint:?}: give a URL such as http://127.0.0.1:4317");
                }
            }
            if config.shutdown_delay > Duration::from_millis(SHUTDOWN_DELAY_MS_MAX) {
                anyhow::bail!("--shutdown-delay-ms must be at most {SHUTDOWN_DELAY_MS_MAX}");
            }
            if !(1..=LIVE_ACTORS_MAX_UPPER as usize).contains(&config.live_actors_max) {
                anyhow::bail!("live_actors_max must be between 1 and {LIVE_ACTORS_MAX_UPPER}");
            }
            for (name, value) in [
                ("storefront_calls_per_sec", config.storefront_calls_per_sec),
                ("buyer_reserves_per_sec", config.buyer_reserves_per_sec),
                ("buyer_reserve_burst", config.buyer_reserve_burst),
            ] {
                if value == 0 {
                    anyhow::bail!("{name} must be at least 1");
                }
            }
            let c = &self.cluster;
            let Some(nats) = c.nats.clone().or(file.nats) else {
                return Ok(config);
            };
            let node = match c.node.clone().or(file.node) {
                Some(node) => node,
                None => hostname()?,
            };
            if node.is_empty()
                || !node
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                anyhow::bail!("the node name {node:?} must be letters, digits, '-' or '_'");
            }
            let partitions = c.partitions.or(file.partitions).unwrap_or(PARTITIONS_DEFAULT);
            if !(1..=PARTITIONS_MAX).contains(&partitions) {
                anyhow::bail!("--partitions must be between 1 and {PARTITIONS_MAX}");
            }
            let replicas = c.replicas.or(file.replicas).unwrap_or(1);
            if !(1..=5).contains(&replicas) {
                anyhow::bail!("--replicas must be between 1 and 5");
            }
            let defaults = LeaseTimings::default();
            let timings = LeaseTimings {
                ttl: c
                    .lease_ttl_ms
                    .or(file.lease_ttl_ms)
                    .map_or(defaults.ttl, Duration::from_millis),
                renew: c
                    .lease_renew_ms
                    .or(file.lease_renew_ms)
                    .map_or(defaults.renew, Duration::from_millis),
            };
            timings.validate().map_err(anyhow::Error::msg)?;
            config.cluster = Some(ClusterConfig {
                nats_url: nats,
                node,
                partitions,
                replicas,
                timings,
                data_dir: config.data_dir.clone(),
                live_actors_max: config.live_actors_max,
            });
            Ok(config)
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
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:6000\"\ndata_dir = \"/var/lib/dropline\"\nlive_actors_max = 1000\nbuyer_reserve_burst = 7\n",
        )
        .unwrap();
        let args = ServeArgs {
            listen: Some("127.0.0.1:7000".parse().unwrap()),
            http_listen: None,
            data_dir: None,
            config: Some(path),
            log: None,
            log_format: None,
            otlp_endpoint: None,
            console_origin: None,
            telemetry: None,
            operator_token: None,
            shutdown_delay_ms: None,
            live_actors_max: None,
            journal_segment_bytes: None,
            storefront_calls_per_sec: None,
            buyer_reserves_per_sec: None,
            buyer_reserve_burst: None,
            check_config: false,
            tls: ServerTlsArgs::default(),
            cluster: ClusterArgs::default(),
        };
        let config = args.resolve().unwrap();
        assert_eq!(config.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(config.data_dir, PathBuf::from("/var/lib/dropline"));
        assert_eq!(config.log, "info");
        assert_eq!(config.live_actors_max, 1000);
        assert_eq!(
            (
                config.storefront_calls_per_sec,
                config.buyer_reserves_per_sec,
                config.buyer_reserve_burst
            ),
            (STOREFRONT_CALLS_PER_SEC_DEFAULT, BUYER_RESERVES_PER_SEC_DEFAULT, 7)
        );
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "listne = \"x\"\n").unwrap();
        assert!(ServeArgs {
            listen: None,
            http_listen: None,
            data_dir: None,
            config: Some(bad),
            log: None,
            log_format: None,
            otlp_endpoint: None,
            console_origin: None,
            telemetry: None,
            operator_token: None,
            shutdown_delay_ms: None,
            live_actors_max: None,
            journal_segment_bytes: None,
            storefront_calls_per_sec: None,
            buyer_reserves_per_sec: None,
            buyer_reserve_burst: None,
            check_config: false,
            tls: ServerTlsArgs::default(),
            cluster: ClusterArgs::default(),
        }
        .resolve()
        .is_err());
    }

    #[test]
    fn tls_files_come_from_flags_or_the_file_and_go_in_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dropline.toml");
        std::fs::write(
            &path,
            "tls_cert = \"/etc/dropline/tls/tls.crt\"\ntls_key = \"/etc/dropline/tls/tls.key\"\n",
        )
        .unwrap();
        let args = |config: Option<PathBuf>, tls: ServerTlsArgs| ServeArgs {
            listen: None,
            http_listen: None,
            data_dir: None,
            config,
            log: None,
            log_format: None,
            otlp_endpoint: None,
            console_origin: None,
            telemetry: None,
            operator_token: None,
            shutdown_delay_ms: None,
            live_actors_max: None,
            journal_segment_bytes: None,
            storefront_calls_per_sec: None,
            buyer_reserves_per_sec: None,
            buyer_reserve_burst: None,
            check_config: false,
            tls,
            cluster: ClusterArgs::default(),
        };
        let from_file = args(Some(path.clone()), ServerTlsArgs::default()).resolve().unwrap();
        assert_eq!(
            from_file.tls,
            Some(crate::tls::TlsFiles {
                cert: "/etc/dropline/tls/tls.crt".into(),
                key: "/etc/dropline/tls/tls.key".into(),
                client_ca: None,
            })
        );
        let flagged = args(
            Some(path),
            ServerTlsArgs {
                tls_cert: Some("/run/cert.pem".into()),
                tls_key: None,
                tls_client_ca: Some("/run/partners-ca.pem".into()),
            },
        )
        .resolve()
        .unwrap()
        .tls
        .unwrap();
        assert_eq!(flagged.cert, PathBuf::from("/run/cert.pem"), "the flag beats the file");
        assert_eq!(flagged.key, PathBuf::from("/etc/dropline/tls/tls.key"));
        assert_eq!(flagged.client_ca, Some(PathBuf::from("/run/partners-ca.pem")));
        let lone = |tls| args(None, tls).resolve().unwrap_err().to_string();
        assert!(lone(ServerTlsArgs {
            tls_cert: Some("c".into()),
            ..Default::default()
        })
        .contains("--tls-key"));
        assert!(lone(ServerTlsArgs {
            tls_client_ca: Some("ca".into()),
            ..Default::default()
        })
        .contains("needs TLS"));
        assert_eq!(args(None, ServerTlsArgs::default()).resolve().unwrap().tls, None);
    }

    #[test]
    fn shutdown_delay_and_credential_are_checked_before_serving() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dropline.toml");
        std::fs::write(&path, "shutdown_delay_ms = 5000\n").unwrap();
        let args = |delay: Option<u64>, token: Option<&str>| ServeArgs {
            listen: None,
            http_listen: None,
            data_dir: None,
            config: Some(path.clone()),
            log: None,
            log_format: None,
            otlp_endpoint: None,
            console_origin: None,
            telemetry: None,
            operator_token: token.map(str::to_string),
            shutdown_delay_ms: delay,
            live_actors_max: None,
            journal_segment_bytes: None,
            storefront_calls_per_sec: None,
            buyer_reserves_per_sec: None,
            buyer_reserve_burst: None,
            check_config: false,
            tls: ServerTlsArgs::default(),
            cluster: ClusterArgs::default(),
        };
        assert_eq!(
            args(None, None).resolve().unwrap().shutdown_delay,
            Duration::from_secs(5)
        );
        assert_eq!(args(Some(0), None).resolve().unwrap().shutdown_delay, Duration::ZERO);
        assert!(args(Some(SHUTDOWN_DELAY_MS_MAX + 1), None).resolve().is_err());
        assert!(args(None, Some("too-short")).resolve().is_err());
        assert!(args(None, Some("a-long-enough-operator-token")).resolve().is_ok());
    }

    #[test]
    fn the_http_side_logs_and_traces_are_configured_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dropline.toml");
        std::fs::write(
            &path,
            "http_listen = \"0.0.0.0:9090\"\nlog_format = \"json\"\notlp_endpoint = \"http://collector:4317\"\n",
        )
        .unwrap();
        let args = |listen: Option<&str>, log: Option<&str>, otlp: Option<&str>| ServeArgs {
            listen: listen.map(|l| l.parse().unwrap()),
            http_listen: None,
            data_dir: None,
            config: Some(path.clone()),
            log: log.map(str::to_string),
            log_format: None,
            otlp_endpoint: otlp.map(str::to_string),
            console_origin: None,
            telemetry: None,
            operator_token: None,
            shutdown_delay_ms: None,
            live_actors_max: None,
            journal_segment_bytes: None,
            storefront_calls_per_sec: None,
            buyer_reserves_per_sec: None,
            buyer_reserve_burst: None,
            check_config: false,
            tls: ServerTlsArgs::default(),
            cluster: ClusterArgs::default(),
        };
        let config = args(None, None, None).resolve().unwrap();
        assert_eq!(config.http_listen, "0.0.0.0:9090".parse().unwrap());
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.otlp_endpoint.as_deref(), Some("http://collector:4317"));
        assert_eq!(config.telemetry, Telemetry::On);
        let refused = |listen, log, otlp| format!("{:#}", args(listen, log, otlp).resolve().unwrap_err());
        assert!(refused(Some("0.0.0.0:9090"), None, None).contains("its own port"));
        assert!(refused(None, Some("info,services=loud"), None).contains("log filter"));
        assert!(refused(None, None, Some("collector:4317")).contains("--otlp-endpoint"));
        // The documented filters parse.
        for filter in [
            "info",
            "warn,services=info",
            "info,services::rpc=debug",
            "warn,actors=info",
        ] {
            assert!(args(None, Some(filter), None).resolve().is_ok(), "{filter}");
        }
        let defaults = ServeArgs {
            config: None,
            ..args(None, None, None)
        }
        .resolve()
        .unwrap();
        assert_eq!(defaults.http_listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(defaults.log_format, LogFormat::Text);
        assert_eq!(defaults.otlp_endpoint, None);
    }

    #[test]
    fn a_console_origin_is_an_origin_and_nothing_more() {
        assert_eq!(
            super::console_origin("https://Drops.Example.com/").unwrap(),
            "https://drops.example.com"
        );
        assert_eq!(
            super::console_origin("http://10.0.0.5:8080").unwrap(),
            "http://10.0.0.5:8080"
        );
        for bad in [
            "drops.example.com",
            "ftp://drops.example.com",
            "https://drops.example.com/console",
            "https://user@drops.example.com",
            "https://drops.example.com/?a=b",
            "",
        ] {
            assert!(super::console_origin(bad).is_err(), "{bad} accepted");
        }
    }
}
