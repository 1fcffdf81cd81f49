//! TLS for the clients of the `dropline` command line: plaintext to `http://` servers, rustls
//! (on ring) to `https://` ones, trusting the CA of `--tls-ca`, else the system's roots.

use clap::Args;
use std::path::PathBuf;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// How a client of the command line reaches an https:// server.
#[derive(Debug, Args, Clone, Default)]
pub struct ClientTlsArgs {
    /// PEM file of the CA that signed the server's certificate, for an https:// server
    /// [default: the system's trusted roots].
    #[arg(long, env = "DROPLINE_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// The name the server's certificate must carry, when it is not the host of --server
    /// (e.g. `--server https://127.0.0.1:50051 --tls-server-name dropline.example.com`).
    #[arg(long, env = "DROPLINE_TLS_SERVER_NAME", global = true)]
    pub tls_server_name: Option<String>,
}

/// The endpoint of `server` (`http://` or `https://`), with TLS set up for `https://`.
pub fn endpoint(server: &str, tls: &ClientTlsArgs) -> anyhow::Result<Endpoint> {
    let endpoint = Endpoint::from_shared(server.to_owned()).map_err(|e| anyhow::anyhow!("{server}: {e}"))?;
    let https = endpoint.uri().scheme_str() == Some("https");
    if !https {
        if tls.tls_ca.is_some() || tls.tls_server_name.is_some() {
            anyhow::bail!("{server}: --tls-ca and --tls-server-name need an https:// server");
        }
        return Ok(endpoint);
    }
    let mut config = ClientTlsConfig::new();
    config = match &tls.tls_ca {
        Some(ca) => {
            let pem = std::fs::read(ca).map_err(|e| anyhow::anyhow!("reading the TLS CA {}: {e}", ca.display()))?;
            config.ca_certificate(Certificate::from_pem(pem))
        }
        None => config.with_native_roots(),
    };
    if let Some(name) = &tls.tls_server_name {
        config = config.domain_name(name.clone());
    }
    endpoint
        .tls_config(config)
        .map_err(|e| anyhow::anyhow!("{server}: TLS: {e}"))
}
