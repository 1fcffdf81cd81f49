//! The edge's receipt keys, one file per lease key id under `<data-dir>/receipt-keys/`
//! (mode 0600, written durably before the first receipt is signed with it), so that the
//! edge signs receipts offline and after a restart. Kept out of the journal and out of
//! every log line.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

pub struct ReceiptKeys {
    dir: PathBuf,
    keys: RwLock<HashMap<String, [u8; 32]>>,
}

impl ReceiptKeys {
    pub fn open(dir: PathBuf) -> anyhow::Result<ReceiptKeys> {
        std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
        restrict(&dir, 0o700)?;
        let mut keys = HashMap::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| anyhow::anyhow!("reading {}: {e}", dir.display()))? {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            // Left behind by a write cut short: never used.
            if name.ends_with(".tmp") {
                continue;
            }
            let key_id = from_hex(name)
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or_else(|| anyhow::anyhow!("{}: not a receipt key's file name", path.display()))?;
            let text =
                std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            let key: [u8; 32] = from_hex(text.trim())
                .and_then(|bytes| bytes.try_into().ok())
                .ok_or_else(|| anyhow::anyhow!("{}: not a 32-byte key in hex", path.display()))?;
            keys.insert(key_id, key);
        }
        Ok(ReceiptKeys {
            dir,
            keys: RwLock::new(keys),
        })
    }

    pub fn get(&self, key_id: &str) -> Option<[u8; 32]> {
        self.keys.read().expect("keys lock").get(key_id).copied()
    }

    /// Keeps `key` for `key_id` (durably, before it returns); the same key again is a no-op.
    pub fn put(&self, key_id: &str, key: [u8; 32]) -> anyhow::Result<()> {
        if self.get(key_id) == Some(key) {
            return Ok(());
        }
        let path = self.dir.join(to_hex(key_id.as_bytes()));
        write_durably(&path, to_hex(&key).as_bytes())?;
        self.keys.write().expect("keys lock").insert(key_id.to_owned(), key);
        Ok(())
    }
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

#[cfg(unix)]
fn restrict(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| anyhow::anyhow!("restricting {}: {e}", path.display()))
}

#[cfg(not(unix))]
fn restrict(_: &Path, _: u32) -> anyhow::Result<()> {
    Ok(())
}

/// Replaces `path` with `bytes` so that a crash leaves the old or the new file, never a
/// part: a temporary file (owner-only), fsync, rename, fsync of the directory.
pub(crate) fn write_durably(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let context = |e: std::io::Error| anyhow::anyhow!("writing {}: {e}", path.display());
    let tmp = path.with_extension("tmp");
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp).map_err(context)?;
        file.write_all(bytes).map_err(context)?;
        file.sync_all().map_err(context)?;
    }
    std::fs::rename(&tmp, path).map_err(context)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(context)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_survive_a_reopen_and_are_readable_by_the_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let keys = ReceiptKeys::open(dir.path().join("k")).unwrap();
        keys.put("lease/1 ü", [7; 32]).unwrap();
        let again = ReceiptKeys::open(dir.path().join("k")).unwrap();
        assert_eq!(again.get("lease/1 ü"), Some([7; 32]));
        assert_eq!(again.get("other"), None);
        #[cfg(unix)]
        for entry in std::fs::read_dir(dir.path().join("k")).unwrap() {
            use std::os::unix::fs::PermissionsExt;
            let mode = entry.unwrap().metadata().unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "readable by others: {mode:o}");
        }
    }
}
