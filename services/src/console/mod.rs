//! The operator and creator web consoles: server-rendered HTML (maud), a little hand-written
//! JavaScript for live updates over server-sent events, CSS and JS embedded in the binary
//! (no build step, no CDN: it works offline at a pop-up). [`routes`] is the router the HTTP
//! listener mounts.
//!
//! The pages call the gRPC handlers in process, as the signed-in caller (`auth::Caller` in
//! the request's extensions, as the interceptor puts it), so a page shows exactly what the
//! API answers that caller and is refused what the API refuses it. Live pages follow the
//! same projections as WatchDrop and WatchSettlement, through those very handlers.
//!
//! Security (see `session`): a random session id in an HttpOnly, SameSite=Strict cookie
//! (Secure over TLS); a CSRF token in every state-changing form, which must be a POST whose
//! Origin (or Referer) is this console; credentials only in the sign-in form's body, never
//! in a URL or a log; a wrong credential is refused without saying why; sign-in attempts
//! are rate-bound; bodies are bounded; a creator reaches only its own pages.

mod assets;
mod creator;
mod operator;
pub mod session;
mod view;

use crate::auth::{Authenticator, Caller};
use crate::limits::{CONSOLE_BODY_BYTES_MAX, CONSOLE_STREAMS_MAX};
use crate::operator::Operator;
use crate::platform::Platform;
use crate::registry::Registry;
use crate::settlement::Settlement;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use session::{OneTimeLinks, Role, Session, Sessions, SignInLimiter};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// How the console is served.
#[derive(Debug, Clone, Default)]
pub struct ConsoleSettings {
    /// The console is reached over TLS (directly or through a proxy that terminates it):
    /// cookies are `Secure` (and `__Host-` prefixed) and the expected Origin is `https://`.
    pub tls: bool,
    /// The origin browsers reach the console at (`--console-origin`), when a proxy stands
    /// in front: state-changing requests must come from it. `None`: the request's own
    /// `Host` with this server's scheme.
    pub origin: Option<String>,
}

impl ConsoleSettings {
    /// Served over TLS by this server (`http_tls`), and reached at `origin` if a proxy
    /// stands in front: over TLS as far as the browser is concerned if either says so.
    pub fn new(http_tls: bool, origin: Option<String>) -> ConsoleSettings {
        let tls = http_tls || origin.as_deref().is_some_and(|o| o.starts_with("https://"));
        ConsoleSettings { tls, origin }
    }
}

/// The consoles' shared state: the platform, the handlers pages call, sessions.
#[derive(Clone)]
pub struct Console {
    inner: Arc<Inner>,
}

struct Inner {
    platform: Platform,
    settings: ConsoleSettings,
    auth: Authenticator,
    sessions: Sessions,
    sign_in: SignInLimiter,
    links: OneTimeLinks,
    /// Permits for live streams (server-sent events), bounded in all.
    streams: Arc<Semaphore>,
    operator: Operator,
    registry: Registry,
    settlement: Settlement,
}

/// The consoles' routes over `platform`, for the HTTP listener to mount.
pub fn routes(platform: Platform, settings: ConsoleSettings) -> Router {
    Console::new(platform, settings).router()
}

impl Console {
    pub fn new(platform: Platform, settings: ConsoleSettings) -> Console {
        let auth = Authenticator {
            operator: platform.operator.clone(),
            projections: platform.projections.clone(),
        };
        Console {
            inner: Arc::new(Inner {
                operator: Operator::new(platform.clone()),
                registry: Registry::new(platform.clone()),
                settlement: Settlement::new(platform.clone()),
                platform,
                settings,
                auth,
                sessions: Sessions::default(),
                sign_in: SignInLimiter::default(),
                links: OneTimeLinks::default(),
                streams: Arc::new(Semaphore::new(CONSOLE_STREAMS_MAX)),
            }),
        }
    }

    /// Every console route, with the console's bounds and headers.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/", get(home))
            .route("/sign-in", get(sign_in_page).post(sign_in))
            .route("/sign-in/once", post(sign_in_once))
            .route("/sign-out", post(sign_out))
            .route("/assets/{name}", get(assets::serve))
            .merge(operator::routes())
            .merge(creator::routes())
            .fallback(not_found)
            .layer(axum::middleware::from_fn_with_state(self.clone(), guard))
            .layer(axum::extract::DefaultBodyLimit::max(CONSOLE_BODY_BYTES_MAX))
            .with_state(self.clone())
    }

    /// A token for a one-time sign-in link as whoever `credential` stands for (operator or
    /// creator): `<console>/sign-in#once=<token>`, good once within 10 minutes. Errors if the
    /// credential has no console.
    pub fn one_time_sign_in(&self, credential: &str) -> anyhow::Result<String> {
        let caller = self
            .inner
            .auth
            .resolve_credential(credential)
            .ok_or_else(|| anyhow::anyhow!("unknown credential"))?;
        let role = Role::of(&caller).ok_or_else(|| anyhow::anyhow!("this credential has no console"))?;
        Ok(self.inner.links.issue(role, blake3::hash(credential.as_bytes())))
    }

    fn cookie_name(&self) -> &'static str {
        if self.inner.settings.tls {
            "__Host-dropline-session"
        } else {
            "dropline-session"
        }
    }

    fn session_cookie(&self, id: &str) -> HeaderValue {
        let secure = if self.inner.settings.tls { "; Secure" } else { "" };
        let max_age = crate::limits::SESSION_LIFETIME_MS / 1_000;
        HeaderValue::from_str(&format!(
            "{}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}",
            self.cookie_name()
        ))
        .expect("a cookie of hex digits")
    }

    fn cleared_cookie(&self) -> HeaderValue {
        let secure = if self.inner.settings.tls { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}",
            self.cookie_name()
        ))
        .expect("a constant cookie")
    }

    /// The session id the request's cookie carries, if any.
    fn session_id(&self, headers: &HeaderMap) -> Option<String> {
        let name = self.cookie_name();
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
            .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
    }
}

/// A console failure as the browser gets it: a status and a short page saying what to do.
#[derive(Debug)]
pub struct Failure {
    pub status: StatusCode,
    pub message: String,
}

impl Failure {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
        }
    }

    fn forbidden(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::FORBIDDEN, message)
    }
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Failure {
        use tonic::Code;
        let http = match status.code() {
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Failure::new(http, status.message().to_string())
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let title = self.status.canonical_reason().unwrap_or("Error");
        let page = view::page(title, None, view::failure(self.status, &self.message));
        (self.status, page).into_response()
    }
}

pub type PageResult = Result<Response, Failure>;

/// A gRPC request from the signed-in caller, as the interceptor would have made it.
fn as_caller<T>(caller: &Caller, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.extensions_mut().insert(caller.clone());
    request
}

/// The signed-in session of a request. Without one: a page request is sent to the
/// sign-in page, anything else is 401.
#[derive(Clone)]
pub struct Signed {
    pub session: Session,
    pub id: String,
}

impl FromRequestParts<Console> for Signed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, console: &Console) -> Result<Self, Response> {
        let session = console
            .session_id(&parts.headers)
            .and_then(|id| console.inner.sessions.get(&id, &console.inner.auth).map(|s| (s, id)));
        match session {
            Some((session, id)) => Ok(Signed { session, id }),
            None if parts.method == Method::GET => {
                let mut response = Redirect::to("/sign-in").into_response();
                if console.session_id(&parts.headers).is_some() {
                    // An ended session's cookie goes too.
                    response
                        .headers_mut()
                        .insert(header::SET_COOKIE, console.cleared_cookie());
                }
                Err(response)
            }
            None => Err(Failure::new(StatusCode::UNAUTHORIZED, "sign in first").into_response()),
        }
    }
}

/// Forms that change state carry the session's CSRF token.
pub trait CsrfForm {
    fn csrf(&self) -> &str;
}

/// A state-changing form from a signed-in session whose CSRF token matched.
pub struct Posted<T> {
    pub signed: Signed,
    pub form: T,
}

impl<T: CsrfForm + DeserializeOwned + Send> FromRequest<Console> for Posted<T> {
    type Rejection = Response;

    async fn from_request(request: Request, console: &Console) -> Result<Self, Response> {
        let (mut parts, body) = request.into_parts();
        let signed = Signed::from_request_parts(&mut parts, console).await?;
        let Form(form) = Form::<T>::from_request(Request::from_parts(parts, body), console)
            .await
            .map_err(|rejection| Failure::new(rejection.status(), rejection.body_text()).into_response())?;
        if !signed.session.csrf_matches(form.csrf()) {
            return Err(Failure::forbidden(
                "this form has expired or did not come from this console: reload the page and try again",
            )
            .into_response());
        }
        Ok(Posted { signed, form })
    }
}

/// The session of an operator page.
fn operator_only(signed: &Signed) -> Result<(), Failure> {
    match signed.session.role {
        Role::Operator => Ok(()),
        Role::Creator(_) => Err(Failure::forbidden("this page is for the operator")),
    }
}

/// The session of a creator's page: that creator's own session only.
fn creator_only(signed: &Signed, creator_id: &str) -> Result<domain::CreatorId, Failure> {
    match &signed.session.role {
        Role::Creator(id) if id.as_str() == creator_id => Ok(id.clone()),
        Role::Creator(_) => Err(Failure::forbidden("this page belongs to another creator")),
        Role::Operator => Err(Failure::forbidden("this page is for its creator")),
    }
}

/// Headers on every response, and the Origin check of every request that may change state.
async fn guard(State(console): State<Console>, request: Request, next: Next) -> Response {
    let safe = matches!(*request.method(), Method::GET | Method::HEAD);
    if !safe && !same_origin(&console, request.headers()) {
        return with_headers(
            Failure::forbidden("this request did not come from a page of this console").into_response(),
            false,
        );
    }
    let asset = request.uri().path().starts_with("/assets/");
    with_headers(next.run(request).await, asset)
}

/// Whether a state-changing request came from this console's own pages: its Origin (or,
/// without one, its Referer) is this console's origin.
fn same_origin(console: &Console, headers: &HeaderMap) -> bool {
    let expected = match &console.inner.settings.origin {
        Some(origin) => origin.clone(),
        None => {
            let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
                return false;
            };
            let scheme = if console.inner.settings.tls { "https" } else { "http" };
            format!("{scheme}://{host}")
        }
    };
    if let Some(origin) = headers.get(header::ORIGIN) {
        return origin.to_str().is_ok_and(|o| o == expected);
    }
    headers
        .get(header::REFERER)
        .and_then(|r| r.to_str().ok())
        .is_some_and(|r| r.strip_prefix(&expected).is_some_and(|rest| rest.starts_with('/')))
}

fn with_headers(mut response: Response, asset: bool) -> Response {
    let headers = response.headers_mut();
    let set = |headers: &mut HeaderMap, name: header::HeaderName, value: &'static str| {
        headers.insert(name, HeaderValue::from_static(value));
    };
    set(
        headers,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
         form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(headers, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(headers, header::X_FRAME_OPTIONS, "DENY");
    // A page's address never leaves for another site in a Referer. (Not `no-referrer`:
    // with it, browsers send `Origin: null` on the console's own form posts.)
    set(headers, header::REFERRER_POLICY, "same-origin");
    if !asset {
        set(headers, header::CACHE_CONTROL, "no-store");
    }
    response
}

async fn not_found() -> Failure {
    Failure::new(StatusCode::NOT_FOUND, "no such page")
}

async fn home(State(console): State<Console>, headers: HeaderMap) -> Redirect {
    let session = console
        .session_id(&headers)
        .and_then(|id| console.inner.sessions.get(&id, &console.inner.auth));
    match session {
        Some(session) => Redirect::to(&session.role.home()),
        None => Redirect::to("/sign-in"),
    }
}

async fn sign_in_page() -> Response {
    view::page("Sign in", None, view::sign_in(None)).into_response()
}

#[derive(Deserialize)]
struct SignInForm {
    credential: String,
}

#[derive(Deserialize)]
struct OnceForm {
    once: String,
}

/// The peer address of the connection, when the listener records it.
pub struct Peer(Option<std::net::IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(addr)| addr.ip()),
        ))
    }
}

/// Opens a session and sends the browser to its home page.
fn signed_in(console: &Console, role: Role, credential_hash: blake3::Hash) -> PageResult {
    let home = role.home();
    let id = console
        .inner
        .sessions
        .open(role, credential_hash)
        .map_err(|e| Failure::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let mut response = Redirect::to(&home).into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, console.session_cookie(&id));
    Ok(response)
}

fn too_many_attempts(wait: std::time::Duration) -> Response {
    let secs = wait.as_secs().max(1);
    let mut response = (
        StatusCode::TOO_MANY_REQUESTS,
        view::page(
            "Sign in",
            None,
            view::sign_in(Some(&format!(
                "Too many sign-in attempts: wait {secs} s and try again."
            ))),
        ),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    response
}

fn refused_sign_in() -> Response {
    // The same answer whatever was wrong: unknown, malformed, or a credential without a
    // console (a partner's, a storefront's).
    (
        StatusCode::UNAUTHORIZED,
        view::page(
            "Sign in",
            None,
            view::sign_in(Some("That credential was not accepted.")),
        ),
    )
        .into_response()
}

async fn sign_in(State(console): State<Console>, Peer(peer): Peer, Form(form): Form<SignInForm>) -> Response {
    if let Err(wait) = console.inner.sign_in.attempt(peer) {
        tracing::warn!("console sign-in attempts over their bound; refused");
        return too_many_attempts(wait);
    }
    let credential = form.credential.trim();
    let Some(role) = console
        .inner
        .auth
        .resolve_credential(credential)
        .as_ref()
        .and_then(Role::of)
    else {
        tracing::info!("console sign-in refused");
        return refused_sign_in();
    };
    tracing::info!(role = ?role, "console sign-in");
    signed_in(&console, role, blake3::hash(credential.as_bytes())).into_response()
}

async fn sign_in_once(State(console): State<Console>, Peer(peer): Peer, Form(form): Form<OnceForm>) -> Response {
    if let Err(wait) = console.inner.sign_in.attempt(peer) {
        return too_many_attempts(wait);
    }
    let Some((role, credential_hash)) = console.inner.links.redeem(form.once.trim()) else {
        return (
            StatusCode::UNAUTHORIZED,
            view::page(
                "Sign in",
                None,
                view::sign_in(Some(
                    "That sign-in link was used already or has expired: paste the credential instead.",
                )),
            ),
        )
            .into_response();
    };
    tracing::info!(role = ?role, "console sign-in by a one-time link");
    signed_in(&console, role, credential_hash).into_response()
}

#[derive(Deserialize)]
struct SignOutForm {
    csrf: String,
}

impl CsrfForm for SignOutForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

async fn sign_out(State(console): State<Console>, posted: Posted<SignOutForm>) -> Response {
    console.inner.sessions.close(&posted.signed.id);
    let mut response = Redirect::to("/sign-in").into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, console.cleared_cookie());
    response
}
