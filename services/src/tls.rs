//! TLS for `dropline serve`: rustls (on ring) through tonic's TLS support.
//!
//! The server takes a certificate chain and key (`--tls-cert`, `--tls-key`) and, with
//! `--tls-client-ca`, lets clients present a certificate signed by that CA. Presenting one
//! is optional, and only partners' calls look at it: a partner call that comes with a
//! client certificate must carry the partner's id as the certificate's subject CN or as
//! one of its DNS SANs, else it is PERMISSION_DENIED. The credential still decides who
//! calls; the certificate can only narrow it (a stolen credential is useless from a
//! machine holding another partner's certificate). Other callers' certificates are not
//! read.
//!
//! The clients' side (`--tls-ca`, `--tls-server-name`) is the `client` crate's `tls`.

use crate::limits::TLS_HANDSHAKE_TIMEOUT_MS;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// The server's TLS files, as configured (flags > environment > TOML).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, the server's own certificate first.
    pub cert: PathBuf,
    /// PEM private key of that certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA whose client certificates are accepted (optional ones; see the module doc).
    pub client_ca: Option<PathBuf>,
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("reading the TLS {what} {}: {e}", path.display()))
}

impl TlsFiles {
    /// Reads the files and checks them now (the chain and key parse and belong together, the
    /// client CA parses), so a bad file stops `serve` and `--check-config` with a message
    /// instead of failing every handshake later.
    pub fn load(&self) -> anyhow::Result<ServerTlsConfig> {
        let mut config = ServerTlsConfig::new()
            .identity(Identity::from_pem(
                read(&self.cert, "certificate")?,
                read(&self.key, "key")?,
            ))
            .timeout(Duration::from_millis(TLS_HANDSHAKE_TIMEOUT_MS));
        if let Some(ca) = &self.client_ca {
            config = config
                .client_ca_root(Certificate::from_pem(read(ca, "client CA")?))
                .client_auth_optional(true);
        }
        // tonic parses the PEM only when it builds its acceptor: build one to check them.
        tonic::transport::Server::builder()
            .tls_config(config.clone())
            .map_err(|e| {
                let source = std::error::Error::source(&e).map_or_else(String::new, |s| format!(": {s}"));
                anyhow::anyhow!(
                    "TLS certificate {}, key {}{}: {e}{source}",
                    self.cert.display(),
                    self.key.display(),
                    self.client_ca
                        .as_ref()
                        .map_or_else(String::new, |ca| format!(", client CA {}", ca.display()))
                )
            })?;
        Ok(config)
    }
}

impl TlsFiles {
    /// The HTTP side's TLS: the same certificate and key, HTTP/1.1 only, no client
    /// certificates (partners do not use the HTTP side).
    pub fn http_config(&self) -> anyhow::Result<std::sync::Arc<tokio_rustls::rustls::ServerConfig>> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| anyhow::anyhow!("TLS certificate {}: {e}", self.cert.display()))?;
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| anyhow::anyhow!("TLS key {}: {e}", self.key.display()))?;
        let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| {
                anyhow::anyhow!(
                    "TLS certificate {}, key {}: {e}",
                    self.cert.display(),
                    self.key.display()
                )
            })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(std::sync::Arc::new(config))
    }
}

/// PERMISSION_DENIED when the call came with a client certificate that is not `partner_id`'s
/// (neither its subject CN nor a DNS SAN is the id). Calls without one pass.
pub fn check_partner_certificate<T>(request: &Request<T>, partner_id: &str) -> Result<(), Status> {
    let Some(certificates) = request.peer_certs() else {
        return Ok(());
    };
    // rustls hands the chain over leaf first.
    let Some(leaf) = certificates.first() else {
        return Ok(());
    };
    let names = certificate_names(leaf.as_ref())
        .map_err(|e| Status::permission_denied(format!("the client certificate does not parse: {e}")))?;
    if names.iter().any(|name| name == partner_id) {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "the client certificate is issued to {names:?}, not to partner {partner_id}"
        )))
    }
}

/// The subject CNs and DNS SANs of a DER certificate.
pub fn certificate_names(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let mut names: Vec<String> = certificate
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(str::to_owned)
        .collect();
    if let Some(san) = certificate.subject_alternative_name().map_err(|e| e.to_string())? {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push((*dns).to_owned());
            }
        }
    }
    Ok(names)
}
