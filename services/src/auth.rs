//! Credentials. Partners and creators authenticate with the credential shown once at
//! registration; operators with the operator credential. Both travel as `authorization: Bearer <token>`
//! and are stored only as blake3 hashes: the tokens are 256-bit random values (or, for the
//! operator, chosen by whoever deploys Dropline), so a fast hash is enough: there is nothing
//! to brute-force that a slow password hash would protect.
//!
//! An interceptor on every authenticated service resolves the caller once per call and
//! puts it in the request's extensions: a wrong or malformed credential is refused there
//! (UNAUTHENTICATED) before any handler runs; handlers then demand the role they need
//! (UNAUTHENTICATED without a credential, PERMISSION_DENIED with the wrong one).

use actors::audit_log::{AuditEntry, AuditLog};
use actors::projections::Projections;
use domain::registry::{CreatorRecord, PartnerRecord};
use domain::{CreatorId, UnixMillis};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use tonic::{Request, Status};

/// Shortest operator credential accepted.
pub const OPERATOR_TOKEN_LEN_MIN: usize = 16;

pub fn hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

/// A fresh partner credential: 256 random bits.
pub fn new_partner_credential() -> String {
    format!("dlp_{}", hex(&rand::random::<[u8; 32]>()))
}

/// A fresh creator credential: 256 random bits.
pub fn new_creator_credential() -> String {
    format!("dlc_{}", hex(&rand::random::<[u8; 32]>()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The operator credential's hash, kept in `<secrets>/operator-token.blake3`.
#[derive(Clone)]
pub struct OperatorCredential {
    hash: String,
}

impl OperatorCredential {
    /// Uses `token` if given (its hash replaces the stored one), else the stored hash, else
    /// makes a new token and returns it so it can be shown once.
    pub fn load(secrets: &Path, token: Option<&str>) -> anyhow::Result<(OperatorCredential, Option<String>)> {
        let path = secrets.join("operator-token.blake3");
        std::fs::create_dir_all(secrets)?;
        let (hash_hex, shown) = match token {
            Some(token) => {
                if token.len() < OPERATOR_TOKEN_LEN_MIN {
                    anyhow::bail!("the operator token must be at least {OPERATOR_TOKEN_LEN_MIN} characters");
                }
                (hash(token), None)
            }
            None => match std::fs::read_to_string(&path) {
                Ok(stored) if stored.trim().len() == 64 => {
                    return Ok((
                        OperatorCredential {
                            hash: stored.trim().to_string(),
                        },
                        None,
                    ))
                }
                Ok(_) => anyhow::bail!("{} is not a blake3 hash", path.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let token = format!("dlo_{}", hex(&rand::random::<[u8; 32]>()));
                    (hash(&token), Some(token))
                }
                Err(e) => return Err(e.into()),
            },
        };
        let tmp = path.with_extension("tmp");
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp)?;
        file.write_all(hash_hex.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok((OperatorCredential { hash: hash_hex }, shown))
    }

    /// A credential whose hash is kept elsewhere (a cluster's shared settings).
    pub fn from_hash(hash: String) -> anyhow::Result<OperatorCredential> {
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            anyhow::bail!("the stored operator credential is not a blake3 hash");
        }
        Ok(OperatorCredential { hash })
    }

    /// A new operator token (256 random bits) to show once.
    pub fn new_token() -> String {
        format!("dlo_{}", hex(&rand::random::<[u8; 32]>()))
    }

    pub fn check_token(token: &str) -> anyhow::Result<()> {
        if token.len() < OPERATOR_TOKEN_LEN_MIN {
            anyhow::bail!("the operator token must be at least {OPERATOR_TOKEN_LEN_MIN} characters");
        }
        Ok(())
    }

    fn matches(&self, token_hash: &str) -> bool {
        // Both sides are hashes of the token, so comparing them leaks nothing useful.
        self.hash == token_hash
    }
}

/// Who is calling, as the interceptor resolved it.
#[derive(Clone)]
pub enum Caller {
    Anonymous,
    Operator,
    Partner(Arc<PartnerRecord>),
    Creator(Arc<CreatorRecord>),
}

/// The interceptor of authenticated services.
#[derive(Clone)]
pub struct Authenticator {
    pub operator: OperatorCredential,
    pub projections: Arc<Projections>,
}

impl tonic::service::Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = match request.metadata().get("authorization") {
            None => Caller::Anonymous,
            Some(value) => {
                let token = value
                    .to_str()
                    .ok()
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <credential>`"))?;
                let token_hash = hash(token);
                if self.operator.matches(&token_hash) {
                    Caller::Operator
                } else if let Some(partner) = self.projections.directory.partner_by_credential(&token_hash) {
                    crate::tls::check_partner_certificate(&request, partner.spec.partner_id.as_str())?;
                    Caller::Partner(partner)
                } else if let Some(creator) = self.projections.directory.creator_by_credential(&token_hash) {
                    Caller::Creator(creator)
                } else {
                    return Err(Status::unauthenticated("unknown credential"));
                }
            }
        };
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

fn caller<T>(request: &Request<T>) -> Caller {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or(Caller::Anonymous)
}

pub fn require_operator<T>(request: &Request<T>) -> Result<(), Status> {
    match caller(request) {
        Caller::Operator => Ok(()),
        Caller::Anonymous => Err(Status::unauthenticated("this call needs the operator credential")),
        Caller::Partner(_) | Caller::Creator(_) => Err(Status::permission_denied("this call is for operators")),
    }
}

/// The refusal of a caller without the role a call needs: UNAUTHENTICATED only when no
/// credential came; a known credential of another kind authenticated fine, so it is
/// PERMISSION_DENIED (a client must not be told to fetch a new credential it does not need).
pub fn refuse<T>(request: &Request<T>, needed: &str) -> Status {
    match caller(request) {
        Caller::Anonymous => Status::unauthenticated(format!("this call needs {needed}")),
        _ => Status::permission_denied(format!("this call needs {needed}")),
    }
}

/// Whose ledger a settlement call may touch: an operator names the creator; a creator gets
/// its own (an empty `creator_id` means "mine", another creator's is PERMISSION_DENIED).
pub fn creator_scope<T>(request: &Request<T>, creator_id: &str) -> Result<CreatorId, Status> {
    let parse = |value: &str| {
        CreatorId::parse(value).map_err(|e| {
            crate::status::invalid_argument(vec![domain::FieldViolation::new("creator_id", e.to_string())])
        })
    };
    match caller(request) {
        Caller::Operator => parse(creator_id),
        Caller::Creator(c) if creator_id.is_empty() || creator_id == c.creator_id.as_str() => Ok(c.creator_id.clone()),
        Caller::Creator(_) => Err(Status::permission_denied("a creator may read only its own ledger")),
        Caller::Partner(_) => Err(Status::permission_denied("settlement is for creators and operators")),
        Caller::Anonymous => Err(Status::unauthenticated(
            "this call needs a creator or operator credential",
        )),
    }
}

/// Whether the caller is the operator (settlement handlers show some fields to it only).
pub fn is_operator<T>(request: &Request<T>) -> bool {
    matches!(caller(request), Caller::Operator)
}

/// The calling creator, if it is one.
pub fn calling_creator<T>(request: &Request<T>) -> Option<CreatorId> {
    match caller(request) {
        Caller::Creator(c) => Some(c.creator_id.clone()),
        _ => None,
    }
}

/// The calling partner; every use of a partner credential is recorded in its audit trail.
pub fn require_partner<T>(
    request: &Request<T>,
    audit: &dyn AuditLog,
    now: UnixMillis,
    call: &str,
) -> Result<Arc<PartnerRecord>, Status> {
    match caller(request) {
        Caller::Partner(partner) => {
            let entry = AuditEntry {
                at: now,
                action: "credential_used".into(),
                order_id: None,
                partner_id: Some(partner.spec.partner_id.to_string()),
                hub_id: None,
                detail: call.to_string(),
            };
            audit.record(&entry);
            Ok(partner)
        }
        Caller::Anonymous => Err(Status::unauthenticated("this call needs a partner credential")),
        Caller::Operator | Caller::Creator(_) => Err(Status::permission_denied("this call is for partners")),
    }
}

/// The operator, or the partner `partner_id` itself.
pub fn require_operator_or_partner<T>(request: &Request<T>, partner_id: &str) -> Result<(), Status> {
    match caller(request) {
        Caller::Operator => Ok(()),
        Caller::Partner(p) if p.spec.partner_id.as_str() == partner_id => Ok(()),
        Caller::Partner(_) | Caller::Creator(_) => {
            Err(Status::permission_denied("a partner may read only its own record"))
        }
        Caller::Anonymous => Err(Status::unauthenticated("this call needs a credential")),
    }
}

/// A client channel that sends a credential with every call.
pub type Authed = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

/// Client side: adds `authorization: Bearer <token>` to every call (demo, tests, tools).
#[derive(Clone)]
pub struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl Bearer {
    pub fn new(token: &str) -> anyhow::Result<Bearer> {
        Ok(Bearer(format!("Bearer {token}").parse()?))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}
