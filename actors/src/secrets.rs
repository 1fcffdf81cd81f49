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
//! - address digests: a keyed hash binds a confirmation to its address without storing it;
//! - edge receipts: each pop-up edge's lease names a key id; the edge's receipt key is a
//!   keyed hash of the edge and that id, handed to the edge with its lease and never
//!   stored; a receipt's MAC (keyed BLAKE3, see [`receipt_mac`]) proves the edge made the
//!   sale, with that content, under that lease.

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
    edge_receipt_key: [u8; 32],
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
            edge_receipt_key: blake3::derive_key("dropline 2026-12 edge receipt keys", &key),
        }
    }

    /// The key an edge signs the receipts of its lease `key_id` with: the same for the same
    /// edge and key id, unguessable for any other, derivable again (never stored).
    pub fn edge_receipt_key(&self, edge: &str, key_id: &str) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_keyed(&self.edge_receipt_key);
        hasher.update(&(edge.len() as u64).to_le_bytes());
        hasher.update(edge.as_bytes());
        hasher.update(key_id.as_bytes());
        *hasher.finalize().as_bytes()
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

/// What a receipt's MAC covers: everything the upstream books of an edge sale.
#[derive(Debug, Clone, Copy)]
pub struct ReceiptFields<'a> {
    pub drop_id: &'a str,
    pub sku_id: &'a str,
    pub order_id: &'a str,
    pub quantity: u32,
    pub amount_minor: i64,
    pub currency: &'a str,
    /// `true`: delivered; `false`: picked up at the stall or a hub.
    pub delivery: bool,
    pub payment_reference: &'a str,
    pub pickup_code: &'a str,
    pub key_id: &'a str,
    pub sold_at_ms: i64,
}

/// A receipt's MAC under an edge's receipt key: keyed BLAKE3 (a PRF, so a MAC) over the
/// fields, each length-prefixed so that no two receipts share an encoding; 64 hex digits.
pub fn receipt_mac(key: &[u8; 32], fields: &ReceiptFields<'_>) -> String {
    let mut hasher = blake3::Hasher::new_keyed(key);
    hasher.update(b"dropline receipt v1");
    for text in [
        fields.drop_id,
        fields.sku_id,
        fields.order_id,
        fields.currency,
        fields.payment_reference,
        fields.pickup_code,
        fields.key_id,
    ] {
        hasher.update(&(text.len() as u64).to_le_bytes());
        hasher.update(text.as_bytes());
    }
    hasher.update(&fields.quantity.to_le_bytes());
    hasher.update(&fields.amount_minor.to_le_bytes());
    hasher.update(&[u8::from(fields.delivery)]);
    hasher.update(&fields.sold_at_ms.to_le_bytes());
    hasher.finalize().to_hex().to_string()
}

/// Whether `mac` is the receipt MAC of `fields` under `key`, compared in constant time.
pub fn receipt_mac_matches(key: &[u8; 32], fields: &ReceiptFields<'_>, mac: &str) -> bool {
    let Ok(presented) = blake3::Hash::from_hex(mac) else {
        return false;
    };
    // blake3::Hash's equality is constant time.
    blake3::Hash::from_hex(receipt_mac(key, fields)).is_ok_and(|expected| expected == presented)
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

    #[test]
    fn a_receipt_mac_binds_every_field_to_its_edge_and_lease() {
        let keys = keys();
        let key = keys.edge_receipt_key("popup-porto", "porto-2026-12");
        let fields = ReceiptFields {
            drop_id: "d1",
            sku_id: "tee",
            order_id: "d1.tee.abc",
            quantity: 2,
            amount_minor: 5000,
            currency: "EUR",
            delivery: false,
            payment_reference: "card-1",
            pickup_code: "123456",
            key_id: "porto-2026-12",
            sold_at_ms: 1_700_000_000_000,
        };
        let mac = receipt_mac(&key, &fields);
        assert_eq!(mac.len(), 64);
        assert!(receipt_mac_matches(&key, &fields, &mac));
        assert!(!receipt_mac_matches(&key, &fields, &mac[..63]));
        assert!(!receipt_mac_matches(&key, &fields, "not hex"));
        // Another edge, another key id, another platform: other keys.
        for other in [
            keys.edge_receipt_key("popup-lisbon", "porto-2026-12"),
            keys.edge_receipt_key("popup-porto", "porto-2026-13"),
            PlatformKeys::from_key([8; 32]).edge_receipt_key("popup-porto", "porto-2026-12"),
        ] {
            assert!(!receipt_mac_matches(&other, &fields, &mac));
        }
        // Any field changed: another MAC.
        let changed = [
            ReceiptFields { quantity: 3, ..fields },
            ReceiptFields {
                amount_minor: 4999,
                ..fields
            },
            ReceiptFields {
                delivery: true,
                ..fields
            },
            ReceiptFields {
                sold_at_ms: fields.sold_at_ms + 1,
                ..fields
            },
            ReceiptFields {
                order_id: "d1.tee.abd",
                ..fields
            },
            ReceiptFields {
                pickup_code: "123457",
                ..fields
            },
            // Length prefixes: moving a character between fields changes the MAC.
            ReceiptFields {
                drop_id: "d1t",
                sku_id: "ee",
                ..fields
            },
        ];
        for c in changed {
            assert!(!receipt_mac_matches(&key, &c, &mac), "{c:?}");
        }
    }
}
