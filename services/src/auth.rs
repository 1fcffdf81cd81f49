//! Credentials. Partners, creators and storefronts authenticate with the credential shown
//! once at registration; operators with the operator credential; a buyer's device with its
//! order's token. All travel as `authorization: Bearer <token>`. Registered credentials are
//! stored only as blake3 hashes: they are 256-bit random values (or, for the operator,
//! chosen by whoever deploys Dropline), so a fast hash is enough: there is nothing to
//! brute-force that a slow password hash would protect. Order tokens are not stored at all:
//! each is a MAC of its order id under a platform key (`actors::secrets`).
//!
//! An interceptor on every authenticated service resolves the caller once per call and
//! puts it in the request's extensions: a wrong or malformed credential is refused there
//! (UNAUTHENTICATED) before any handler runs; handlers then demand the role they need
//! (UNAUTHENTICATED without a credential, PERMISSION_DENIED with the wrong one).

use crate::limits::{CREDENTIAL_LEN_MAX, OPERATOR_TOKEN_LEN_MIN};
use actors::audit_log::{AuditEntry, AuditLog};
use actors::fulfilment::Principal;
use actors::projections::Projections;
use actors::secrets::{PlatformKeys, ORDER_TOKEN_PREFIX};
use domain::registry::{CreatorRecord, PartnerRecord, StorefrontRecord};
use domain::{CreatorId, OrderId, StorefrontId, UnixMillis};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use tonic::{Request, Status};

pub fn hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

/// A fresh partner credential: 256 random bits.
pub fn new_partner_credential() -> String {
    format!("dlp_{}", hex(&rand::random::<[u8; 32]>()))
}

/// A fresh storefront credential: 256 random bits.
pub fn new_storefront_credential() -> String {
    format!("dls_{}", hex(&rand::random::<[u8; 32]>()))
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
    hash: blake3::Hash,
}

impl OperatorCredential {
    /// Uses `token` if given (its hash replaces the stored one), else the stored hash, else
    /// makes a new token and returns it so it can be shown once.
    pub fn load(secrets: &Path, token: Option<&str>) -> anyhow::Result<(OperatorCredential, Option<String>)> {
        let path = secrets.join("operator-token.blake3");
        std::fs::create_dir_all(secrets)?;
        let (hash_hex, shown) = match token {
            Some(token) => {
                OperatorCredential::check_token(token)?;
                (hash(token), None)
            }
            None => match std::fs::read_to_string(&path) {
                Ok(stored) => match blake3::Hash::from_hex(stored.trim()) {
                    Ok(hash) => return Ok((OperatorCredential { hash }, None)),
                    Err(_) => anyhow::bail!("{} is not a blake3 hash", path.display()),
                },
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
        let hash = blake3::Hash::from_hex(&hash_hex).expect("a hash just made");
        Ok((OperatorCredential { hash }, shown))
    }

    /// A credential whose hash is kept elsewhere (a cluster's shared settings).
    pub fn from_hash(hash: String) -> anyhow::Result<OperatorCredential> {
        match blake3::Hash::from_hex(&hash) {
            Ok(hash) => Ok(OperatorCredential { hash }),
            Err(_) => anyhow::bail!("the stored operator credential is not a blake3 hash"),
        }
    }

    /// A new operator token (256 random bits) to show once.
    pub fn new_token() -> String {
        format!("dlo_{}", hex(&rand::random::<[u8; 32]>()))
    }

    pub fn check_token(token: &str) -> anyhow::Result<()> {
        if token.len() < OPERATOR_TOKEN_LEN_MIN {
            anyhow::bail!("the operator token must be at least {OPERATOR_TOKEN_LEN_MIN} characters");
        }
        if token.len() > CREDENTIAL_LEN_MAX {
            anyhow::bail!("the operator token must be at most {CREDENTIAL_LEN_MAX} characters");
        }
        if token.starts_with(ORDER_TOKEN_PREFIX) {
            anyhow::bail!("the operator token must not start with {ORDER_TOKEN_PREFIX} (the prefix of order tokens)");
        }
        Ok(())
    }

    fn matches(&self, token_hash: &blake3::Hash) -> bool {
        // Constant time (blake3::Hash's equality), though both sides are hashes anyway.
        &self.hash == token_hash
    }
}

/// Who is calling, as the interceptor resolved it.
#[derive(Clone)]
pub enum Caller {
    Anonymous,
    Operator,
    Partner(Arc<PartnerRecord>),
    Creator(Arc<CreatorRecord>),
    Storefront(Arc<StorefrontRecord>),
    /// A buyer's device, with the token of one order (checked against the order it names).
    OrderToken(String),
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never a credential: callers hold records, not secrets, but keep this short.
        match self {
            Caller::Anonymous => write!(f, "Anonymous"),
            Caller::Operator => write!(f, "Operator"),
            Caller::Partner(p) => write!(f, "Partner({})", p.spec.partner_id),
            Caller::Creator(c) => write!(f, "Creator({})", c.creator_id),
            Caller::Storefront(s) => write!(f, "Storefront({})", s.storefront_id),
            Caller::OrderToken(_) => write!(f, "OrderToken"),
        }
    }
}

/// The interceptor of authenticated services.
#[derive(Clone)]
pub struct Authenticator {
    pub operator: OperatorCredential,
    pub projections: Arc<Projections>,
}

impl tonic::service::Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.resolve(&request)?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

impl Authenticator {
    /// The caller of `request`, from its `authorization` metadata. Checkout calls this
    /// itself rather than through the interceptor: its hot path (Reserve) saves the
    /// request's extension map and the interceptor's request rebuilding.
    pub fn resolve<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        Ok(match request.metadata().get("authorization") {
            None => Caller::Anonymous,
            Some(value) => {
                let token = value
                    .to_str()
                    .ok()
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <credential>`"))?;
                if token.len() > CREDENTIAL_LEN_MAX {
                    return Err(Status::unauthenticated(format!(
                        "unknown credential (longer than {CREDENTIAL_LEN_MAX} characters)"
                    )));
                }
                if PlatformKeys::is_order_token(token) {
                    // Checked against the order it names by the handler.
                    return Ok(Caller::OrderToken(token.to_string()));
                }
                let token_hash = blake3::hash(token.as_bytes());
                if self.operator.matches(&token_hash) {
                    return Ok(Caller::Operator);
                }
                match self.projections.directory.by_credential(token_hash.as_bytes()) {
                    Some(Principal::Partner(partner)) => {
                        crate::tls::check_partner_certificate(request, partner.spec.partner_id.as_str())?;
                        Caller::Partner(partner)
                    }
                    Some(Principal::Creator(creator)) => Caller::Creator(creator),
                    Some(Principal::Storefront(storefront)) => Caller::Storefront(storefront),
                    None => return Err(Status::unauthenticated("unknown credential")),
                }
            }
        })
    }
}

impl Authenticator {
    /// The caller a bare credential stands for, as the web consoles' sign-in sees it: the
    /// same directory and operator hash as [`Authenticator::resolve`], but no request, so
    /// no client certificate (partners have no console). Order tokens are not sessions.
    pub fn resolve_credential(&self, credential: &str) -> Option<Caller> {
        if credential.is_empty() || credential.len() > CREDENTIAL_LEN_MAX || PlatformKeys::is_order_token(credential) {
            return None;
        }
        self.resolve_hash(&blake3::hash(credential.as_bytes()))
    }

    /// The caller whose credential hashes to `credential_hash` now (a console session checks
    /// its credential on every request, so a reset or a new operator token ends it).
    pub fn resolve_hash(&self, credential_hash: &blake3::Hash) -> Option<Caller> {
        if self.operator.matches(credential_hash) {
            return Some(Caller::Operator);
        }
        match self.projections.directory.by_credential(credential_hash.as_bytes())? {
            Principal::Partner(partner) => Some(Caller::Partner(partner)),
            Principal::Creator(creator) => Some(Caller::Creator(creator)),
            Principal::Storefront(storefront) => Some(Caller::Storefront(storefront)),
        }
    }
}

/// The blake3 hash of the bearer credential of `request`, if it carries one (for a stream
/// that looks its credential up again later: `Directory::by_credential`).
pub fn credential_hash<T>(request: &Request<T>) -> Option<blake3::Hash> {
    let value = request.metadata().get("authorization")?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ")?.trim();
    (!token.is_empty() && token.len() <= CREDENTIAL_LEN_MAX).then(|| blake3::hash(token.as_bytes()))
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
        _ => Err(Status::permission_denied("this call is for operators")),
    }
}

/// The calling storefront (Reserve: only storefronts reserve, for the buyers they vouch for).
pub fn require_storefront(caller: &Caller) -> Result<Arc<StorefrontRecord>, Status> {
    match caller {
        Caller::Storefront(storefront) => Ok(storefront.clone()),
        Caller::Anonymous => Err(Status::unauthenticated("this call needs a storefront credential")),
        _ => Err(Status::permission_denied("this call is for storefronts")),
    }
}

/// Who may act on one order, as far as the credential alone tells.
pub enum OrderAccess {
    /// The order's own token: everything the buyer may do with this order.
    Token,
    /// A storefront, still to be matched with the storefront that made the order.
    Storefront(StorefrontId),
    /// The operator: reads only, without the pickup code.
    Operator,
}

/// Checks the caller for a call on `order_id`: its token (a token for any other order is
/// PERMISSION_DENIED), a storefront (matched with the order's own by the caller), or, when
/// `operator_reads`, the operator.
pub fn order_access(
    caller: &Caller,
    keys: &PlatformKeys,
    order_id: &OrderId,
    operator_reads: bool,
) -> Result<OrderAccess, Status> {
    match caller {
        Caller::OrderToken(token) if keys.order_token_matches(order_id.as_str(), token) => Ok(OrderAccess::Token),
        Caller::OrderToken(_) => Err(Status::permission_denied(format!(
            "this order token is not the token of order {order_id}"
        ))),
        Caller::Storefront(storefront) => Ok(OrderAccess::Storefront(storefront.storefront_id.clone())),
        Caller::Operator if operator_reads => Ok(OrderAccess::Operator),
        Caller::Anonymous => Err(Status::unauthenticated(
            "this call needs the order's token or the storefront's credential",
        )),
        _ => Err(Status::permission_denied(
            "orders are for their buyer's storefront and the order's token",
        )),
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
        Caller::Partner(_) | Caller::Storefront(_) | Caller::OrderToken(_) => {
            Err(Status::permission_denied("settlement is for creators and operators"))
        }
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
        _ => Err(Status::permission_denied("this call is for partners")),
    }
}

/// The operator, or the partner `partner_id` itself.
pub fn require_operator_or_partner<T>(request: &Request<T>, partner_id: &str) -> Result<(), Status> {
    match caller(request) {
        Caller::Operator => Ok(()),
        Caller::Partner(p) if p.spec.partner_id.as_str() == partner_id => Ok(()),
        Caller::Partner(_) | Caller::Creator(_) | Caller::Storefront(_) | Caller::OrderToken(_) => {
            Err(Status::permission_denied("a partner may read only its own record"))
        }
        Caller::Anonymous => Err(Status::unauthenticated("this call needs a credential")),
    }
}

/// A client channel that sends a credential with every call.
pub type Authed = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

/// Client side: adds `authorization: Bearer <token>` to every call (the `client` crate's
/// commands and demo, the test kit, tools); the server's side of the same header is
/// [`Authenticator`].
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
