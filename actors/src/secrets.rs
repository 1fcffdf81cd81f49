//! Process secrets kept in the data directory (or, in a cluster, in the shared bucket): one
//! 32-byte platform key, from which every other key is derived with blake3's key
//! derivation, each for one purpose:
//! - buyer references: buyer ids (PII) become opaque keyed hashes before anything is
//!   journaled or logged (the platform key itself, as before keys were derived);
//! - order tokens: the secret a buyer's device holds for one order is a MAC of the order
//!   id, so a retried Reserve returns the same token and nothing readable is stored;
//! - delivery addresses: each order's address is sealed (ChaCha20-Poly1305) with its own
//!   key, derived from the address key, the order id and a random salt kept beside it;
//!   deleting the salt destroys the key (crypto-shredding);
//! - address digests: a keyed hash binds a confirmation to its address without storing it.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use domain::BuyerRef;
use std::io::Write;
use std::path::Path;

/// Order tokens start with this, so the authenticator tells them from other credentials.
pub const ORDER_TOKEN_PREFIX: &str = "dlt_";

/// A delivery address sealed with its order's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedAddress {
    /// Half of the order's key; deleting it shreds the address.
    pub salt: [u8; 32],
    /// Nonce (12 bytes) then ciphertext and tag.
    pub ciphertext: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
#[error("the delivery address could not be opened (wrong key or damaged data)")]
pub struct OpenError;

pub struct PlatformKeys {
    buyer_key: [u8; 32],
    order_token_key: [u8; 32],
    address_key: [u8; 32],
    address_digest_key: [u8; 32],
}

impl PlatformKeys {
    /// Loads the platform key from `<dir>/buyer-hash.key`, creating it (random, mode 0600)
    /// if missing.
    pub fn load_or_create(dir: &Path) -> std::io::Result<PlatformKeys> {
        let path = dir.join("buyer-hash.key");
        match std::fs::read(&path) {
            Ok(bytes) if bytes.len() == 32 => Ok(PlatformKeys::from_key(bytes.try_into().expect("32 bytes"))),
            Ok(_) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} must hold 32 bytes", path.display()),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir)?;
                let key: [u8; 32] = rand::random();
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                let mut file = options.open(&path)?;
                file.write_all(&key)?;
                file.sync_all()?;
                Ok(PlatformKeys::from_key(key))
            }
            Err(e) => Err(e),
        }
    }

    /// Keys from a platform key kept elsewhere (shared by the nodes of a cluster).
    pub fn from_key(key: [u8; 32]) -> PlatformKeys {
        PlatformKeys {
            buyer_key: key,
            order_token_key: blake3::derive_key("dropline 2026-12 order tokens", &key),
            address_key: blake3::derive_key("dropline 2026-12 delivery address keys", &key),
            address_digest_key: blake3::derive_key("dropline 2026-12 delivery address digests", &key),
        }
    }

    pub fn buyer_ref(&self, buyer_id: &str) -> BuyerRef {
        let hash = blake3::keyed_hash(&self.buyer_key, buyer_id.as_bytes());
        BuyerRef::from_hash_hex(hash.to_hex()[..32].to_string())
    }

    /// The token of one order (256 bits, shown to the buyer's side only).
    pub fn order_token(&self, order_id: &str) -> String {
        let mac = blake3::keyed_hash(&self.order_token_key, order_id.as_bytes());
        format!("{ORDER_TOKEN_PREFIX}{}", mac.to_hex())
    }

    /// Whether `token` is the token of `order_id`, compared in constant time.
    pub fn order_token_matches(&self, order_id: &str, token: &str) -> bool {
        let Some(presented) = token
            .strip_prefix(ORDER_TOKEN_PREFIX)
            .and_then(|hex| blake3::Hash::from_hex(hex).ok())
        else {
            return false;
        };
        // blake3::Hash's equality is constant time.
        presented == blake3::keyed_hash(&self.order_token_key, order_id.as_bytes())
    }

    /// A keyed digest of an order's encoded address: the same address gives the same digest
    /// for that order only (the order id is hashed too, so journals do not show which
    /// orders go to one address), and tells nothing about the address without the key.
    pub fn address_digest(&self, order_id: &str, address: &[u8]) -> String {
        let mut hasher = blake3::Hasher::new_keyed(&self.address_digest_key);
        hasher.update(&(order_id.len() as u64).to_le_bytes());
        hasher.update(order_id.as_bytes());
        hasher.update(address);
        hasher.finalize().to_hex()[..32].to_string()
    }

    /// Whether `token` has the shape of an order token (`dlt_` and 64 hex digits).
    pub fn is_order_token(token: &str) -> bool {
        token
            .strip_prefix(ORDER_TOKEN_PREFIX)
            .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
    }

    fn order_cipher(&self, order_id: &str, salt: &[u8; 32]) -> ChaCha20Poly1305 {
        let mut hasher = blake3::Hasher::new_keyed(&self.address_key);
        hasher.update(salt);
        hasher.update(order_id.as_bytes());
        ChaCha20Poly1305::new(Key::from_slice(hasher.finalize().as_bytes()))
    }

    /// Seals an address with a fresh key for `order_id`; the order id is authenticated too,
    /// so a sealed address moved to another order does not open.
    pub fn seal_address(&self, order_id: &str, address: &[u8]) -> SealedAddress {
        let salt: [u8; 32] = rand::random();
        let nonce: [u8; 12] = rand::random();
        let sealed = self
            .order_cipher(order_id, &salt)
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: address,
                    aad: order_id.as_bytes(),
                },
            )
            .expect("sealing a short message in memory cannot fail");
        let mut ciphertext = Vec::with_capacity(12 + sealed.len());
        ciphertext.extend_from_slice(&nonce);
        ciphertext.extend_from_slice(&sealed);
        SealedAddress { salt, ciphertext }
    }

    pub fn open_address(&self, order_id: &str, sealed: &SealedAddress) -> Result<Vec<u8>, OpenError> {
        if sealed.ciphertext.len() < 12 {
            return Err(OpenError);
        }
        let (nonce, body) = sealed.ciphertext.split_at(12);
        self.order_cipher(order_id, &sealed.salt)
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: order_id.as_bytes(),
                },
            )
            .map_err(|_| OpenError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> PlatformKeys {
        PlatformKeys::from_key([7; 32])
    }

    #[test]
    fn an_order_token_opens_its_own_order_only() {
        let keys = keys();
        let token = keys.order_token("d1/s1/abc");
        assert!(token.starts_with(ORDER_TOKEN_PREFIX));
        assert!(keys.order_token_matches("d1/s1/abc", &token));
        assert!(!keys.order_token_matches("d1/s1/abd", &token));
        assert!(!keys.order_token_matches("d1/s1/abc", &token[..token.len() - 1]));
        assert!(!keys.order_token_matches("d1/s1/abc", "dlt_not-hex"));
        assert!(!PlatformKeys::from_key([8; 32]).order_token_matches("d1/s1/abc", &token));
    }

    #[test]
    fn a_sealed_address_opens_for_its_order_with_its_salt_only() {
        let keys = keys();
        let sealed = keys.seal_address("o1", b"Ana, Rua A 1");
        assert!(!sealed.ciphertext.windows(3).any(|w| w == b"Rua"));
        assert_eq!(keys.open_address("o1", &sealed).unwrap(), b"Ana, Rua A 1");
        assert!(keys.open_address("o2", &sealed).is_err());
        let mut shredded = sealed.clone();
        shredded.salt = [0; 32];
        assert!(keys.open_address("o1", &shredded).is_err());
        let mut damaged = sealed;
        let last = damaged.ciphertext.len() - 1;
        damaged.ciphertext[last] ^= 1;
        assert!(keys.open_address("o1", &damaged).is_err());
    }
}
