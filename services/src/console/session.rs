//! The consoles' sessions, sign-in bounds and one-time sign-in links.
//!
//! A session is a random 256-bit id in an HttpOnly, SameSite=Strict cookie (Secure when the
//! console is served over TLS); the server keeps only the id's blake3 hash, the role, the
//! hash of the credential it was opened with, and its own CSRF token. Every request checks
//! the credential again through the same [`Authenticator`] gRPC uses, so a credential
//! reset ends its sessions at once. Sessions end after `SESSION_IDLE_MS` without a request
//! or `SESSION_LIFETIME_MS` in all; the store is bounded in total and per principal.

use crate::auth::{Authenticator, Caller};
use crate::limits::{
    ONE_TIME_LINKS_MAX, ONE_TIME_LINK_TTL_MS, SESSIONS_MAX, SESSIONS_PER_PRINCIPAL_MAX, SESSION_IDLE_MS,
    SESSION_LIFETIME_MS, SIGN_IN_BURST, SIGN_IN_GLOBAL_BURST, SIGN_IN_GLOBAL_PER_SEC, SIGN_IN_PEERS_MAX,
    SIGN_IN_PER_SEC,
};
use domain::CreatorId;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Who a session is for. Partners and storefronts have no console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Operator,
    Creator(CreatorId),
}

impl Role {
    /// The role of a caller, if it has a console.
    pub fn of(caller: &Caller) -> Option<Role> {
        match caller {
            Caller::Operator => Some(Role::Operator),
            Caller::Creator(record) => Some(Role::Creator(record.creator_id.clone())),
            _ => None,
        }
    }

    /// The page a session of this role starts on.
    pub fn home(&self) -> String {
        match self {
            Role::Operator => "/operator".into(),
            Role::Creator(id) => format!("/creators/{id}"),
        }
    }
}

/// A session as a request sees it.
#[derive(Debug, Clone)]
pub struct Session {
    pub role: Role,
    /// The caller the credential stands for now (the gRPC handlers' `Caller`).
    pub caller: Caller,
    /// The token every state-changing form of this session carries.
    pub csrf: String,
    /// When the session ends at the latest (its absolute lifetime).
    pub ends_at: Instant,
}

impl Session {
    /// Whether `token` is this session's CSRF token (compared in constant time).
    pub fn csrf_matches(&self, token: &str) -> bool {
        blake3::hash(self.csrf.as_bytes()) == blake3::hash(token.as_bytes())
    }
}

struct Stored {
    role: Role,
    credential_hash: blake3::Hash,
    csrf: String,
    created: Instant,
    last_seen: Instant,
}

impl Stored {
    fn live(&self, now: Instant) -> bool {
        now.duration_since(self.created) < Duration::from_millis(SESSION_LIFETIME_MS)
            && now.duration_since(self.last_seen) < Duration::from_millis(SESSION_IDLE_MS)
    }
}

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    #[error("too many console sessions are open; try again later")]
    Full,
}

/// Sessions by the blake3 hash of their id.
#[derive(Default)]
pub struct Sessions {
    stored: Mutex<HashMap<[u8; 32], Stored>>,
}

fn random_hex() -> String {
    rand::random::<[u8; 32]>().iter().map(|b| format!("{b:02x}")).collect()
}

fn key(id: &str) -> [u8; 32] {
    *blake3::hash(id.as_bytes()).as_bytes()
}

impl Sessions {
    /// Opens a session for `role`, signed in with the credential whose hash this is;
    /// returns its id (for the cookie only). A principal's oldest session makes room for
    /// its newest; a full store first forgets ended sessions, then refuses.
    pub fn open(&self, role: Role, credential_hash: blake3::Hash) -> Result<String, OpenError> {
        let now = Instant::now();
        let mut stored = self.stored.lock().expect("sessions lock");
        let mine: Vec<([u8; 32], Instant)> = stored
            .iter()
            .filter(|(_, s)| s.credential_hash == credential_hash)
            .map(|(k, s)| (*k, s.created))
            .collect();
        if mine.len() >= SESSIONS_PER_PRINCIPAL_MAX {
            if let Some((oldest, _)) = mine.iter().min_by_key(|(_, created)| *created) {
                stored.remove(oldest);
            }
        }
        if stored.len() >= SESSIONS_MAX {
            stored.retain(|_, s| s.live(now));
            if stored.len() >= SESSIONS_MAX {
                return Err(OpenError::Full);
            }
        }
        let id = random_hex();
        stored.insert(
            key(&id),
            Stored {
                role,
                credential_hash,
                csrf: random_hex(),
                created: now,
                last_seen: now,
            },
        );
        Ok(id)
    }

    /// The live session with this id, its credential still valid for its role; the request
    /// counts as activity. An ended or invalid session is forgotten.
    pub fn get(&self, id: &str, auth: &Authenticator) -> Option<Session> {
        self.lookup(id, auth, true)
    }

    /// [`Sessions::get`] without counting as activity (a live stream checking it is still
    /// allowed to go on).
    pub fn peek(&self, id: &str, auth: &Authenticator) -> Option<Session> {
        self.lookup(id, auth, false)
    }

    fn lookup(&self, id: &str, auth: &Authenticator, touch: bool) -> Option<Session> {
        let now = Instant::now();
        let k = key(id);
        let mut stored = self.stored.lock().expect("sessions lock");
        let entry = stored.get_mut(&k)?;
        let caller = auth.resolve_hash(&entry.credential_hash);
        let valid = entry.live(now) && caller.as_ref().and_then(Role::of).as_ref() == Some(&entry.role);
        if !valid {
            stored.remove(&k);
            return None;
        }
        if touch {
            entry.last_seen = now;
        }
        Some(Session {
            role: entry.role.clone(),
            caller: caller?,
            csrf: entry.csrf.clone(),
            ends_at: entry.created + Duration::from_millis(SESSION_LIFETIME_MS),
        })
    }

    /// Ends a session (sign-out).
    pub fn close(&self, id: &str) {
        self.stored.lock().expect("sessions lock").remove(&key(id));
    }

    pub fn len(&self) -> usize {
        self.stored.lock().expect("sessions lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A token bucket.
#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: u32, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(burst),
            at: now,
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, per_sec: u32, burst: u32, now: Instant) -> Result<(), Duration> {
        let refill = now.duration_since(self.at).as_secs_f64() * f64::from(per_sec);
        self.tokens = (self.tokens + refill).min(f64::from(burst));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / f64::from(per_sec)))
        }
    }
}

/// Sign-in attempts: a bucket per peer address and one for everyone, so that guessing
/// credentials costs time whoever tries (credentials are 256-bit random values, the
/// operator's at least 16 characters; this bounds the work a guesser gets from the server).
pub struct SignInLimiter {
    inner: Mutex<(HashMap<IpAddr, Bucket>, Bucket)>,
}

impl Default for SignInLimiter {
    fn default() -> Self {
        SignInLimiter {
            inner: Mutex::new((HashMap::new(), Bucket::full(SIGN_IN_GLOBAL_BURST, Instant::now()))),
        }
    }
}

impl SignInLimiter {
    /// Takes one attempt for `peer` (unknown: only the global bucket), or says how long
    /// to wait.
    pub fn attempt(&self, peer: Option<IpAddr>) -> Result<(), Duration> {
        let now = Instant::now();
        let mut guard = self.inner.lock().expect("sign-in limiter lock");
        let (peers, global) = &mut *guard;
        if let Some(ip) = peer {
            if peers.len() >= SIGN_IN_PEERS_MAX && !peers.contains_key(&ip) {
                // Forget peers whose bucket has refilled: they are as if never seen.
                let full_after = Duration::from_secs_f64(f64::from(SIGN_IN_BURST) / f64::from(SIGN_IN_PER_SEC));
                peers.retain(|_, b| now.duration_since(b.at) < full_after);
                if peers.len() >= SIGN_IN_PEERS_MAX {
                    return Err(Duration::from_secs(1));
                }
            }
            let bucket = peers.entry(ip).or_insert_with(|| Bucket::full(SIGN_IN_BURST, now));
            bucket.take(SIGN_IN_PER_SEC, SIGN_IN_BURST, now)?;
        }
        global.take(SIGN_IN_GLOBAL_PER_SEC, SIGN_IN_GLOBAL_BURST, now)
    }
}

struct Link {
    role: Role,
    credential_hash: blake3::Hash,
    expires: Instant,
}

/// One-time sign-in links (`dropline demo` prints one): a random token standing for a
/// credential, used once, within `ONE_TIME_LINK_TTL_MS`. The token travels in the URL's
/// fragment, which browsers never send to a server, so it reaches no access log; the page
/// posts it.
#[derive(Default)]
pub struct OneTimeLinks {
    links: Mutex<HashMap<[u8; 32], Link>>,
}

impl OneTimeLinks {
    /// A token that signs in once as `role`, with the credential whose hash this is.
    pub fn issue(&self, role: Role, credential_hash: blake3::Hash) -> String {
        let now = Instant::now();
        let mut links = self.links.lock().expect("links lock");
        links.retain(|_, l| l.expires > now);
        if links.len() >= ONE_TIME_LINKS_MAX {
            // The oldest link gives way: links are made by the operator's own tools.
            if let Some(oldest) = links.iter().min_by_key(|(_, l)| l.expires).map(|(k, _)| *k) {
                links.remove(&oldest);
            }
        }
        let token = random_hex();
        links.insert(
            key(&token),
            Link {
                role,
                credential_hash,
                expires: now + Duration::from_millis(ONE_TIME_LINK_TTL_MS),
            },
        );
        token
    }

    /// Uses up the link: its role and credential hash if it was still valid.
    pub fn redeem(&self, token: &str) -> Option<(Role, blake3::Hash)> {
        let link = self.links.lock().expect("links lock").remove(&key(token))?;
        (link.expires > Instant::now()).then_some((link.role, link.credential_hash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refuses_past_its_burst_and_refills_at_its_rate() {
        let start = Instant::now();
        let mut bucket = Bucket::full(3, start);
        for _ in 0..3 {
            assert!(bucket.take(1, 3, start).is_ok());
        }
        let wait = bucket.take(1, 3, start).unwrap_err();
        assert!(wait <= Duration::from_secs(1) && wait > Duration::ZERO);
        assert!(bucket.take(1, 3, start + Duration::from_millis(1_001)).is_ok());
    }

    #[test]
    fn the_sign_in_limiter_bounds_one_peer_before_everyone() {
        let limiter = SignInLimiter::default();
        let peer: IpAddr = "127.0.0.9".parse().unwrap();
        let mut allowed = 0;
        while limiter.attempt(Some(peer)).is_ok() {
            allowed += 1;
            assert!(allowed <= SIGN_IN_BURST + 1, "the peer's burst is its bound");
        }
        assert!(allowed >= SIGN_IN_BURST);
        // Another peer still gets in.
        assert!(limiter.attempt(Some("127.0.0.10".parse().unwrap())).is_ok());
    }

    #[test]
    fn a_one_time_link_signs_in_once() {
        let links = OneTimeLinks::default();
        let token = links.issue(Role::Operator, blake3::hash(b"x"));
        assert_eq!(links.redeem(&token).map(|(r, _)| r), Some(Role::Operator));
        assert!(links.redeem(&token).is_none());
        assert!(links.redeem("not-a-token").is_none());
    }
}
