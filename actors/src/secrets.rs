//! Process secrets kept in the data directory: the key that turns buyer ids into opaque
//! buyer references, so that no buyer id (PII) is ever journaled or logged.

use domain::BuyerRef;
use std::io::Write;
use std::path::Path;

pub struct BuyerHasher {
    key: [u8; 32],
}

impl BuyerHasher {
    /// Loads the key from `<dir>/buyer-hash.key`, creating it (random, mode 0600) if missing.
    pub fn load_or_create(dir: &Path) -> std::io::Result<BuyerHasher> {
        let path = dir.join("buyer-hash.key");
        match std::fs::read(&path) {
            Ok(bytes) if bytes.len() == 32 => Ok(BuyerHasher {
                key: bytes.try_into().expect("32 bytes"),
            }),
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
                Ok(BuyerHasher { key })
            }
            Err(e) => Err(e),
        }
    }

    /// A hasher with a key from elsewhere (shared by the nodes of a cluster).
    pub fn from_key(key: [u8; 32]) -> BuyerHasher {
        BuyerHasher { key }
    }

    pub fn buyer_ref(&self, buyer_id: &str) -> BuyerRef {
        let hash = blake3::keyed_hash(&self.key, buyer_id.as_bytes());
        BuyerRef::from_hash_hex(hash.to_hex()[..32].to_string())
    }
}
