//! A small file system a test can fill: [`Tmpfs`] mounts a tmpfs of a given size (root
//! only) and unmounts it when dropped; [`fill`] writes a file until the file system is full.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted on a temporary directory; unmounted (lazily, so a process still holding
/// a file in it cannot keep it mounted) and removed when dropped.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_bytes`; `Err` says why it cannot (not root, no `mount`, a
    /// sandbox without the capability), for the test to report as skipped.
    pub fn mount(size_bytes: u64) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("a directory to mount on: {e}"))?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_bytes}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "mount -t tmpfs: {} ({})",
                String::from_utf8_lossy(&output.stderr).trim(),
                output.status
            ));
        }
        Ok(Tmpfs { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes free in it.
    pub fn free_bytes(&self) -> u64 {
        rustix::fs::statvfs(self.path()).map_or(0, |s| s.f_bavail.saturating_mul(s.f_frsize))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// Writes `path` until the file system holding it is full (`ENOSPC`), and returns the
/// path; removing the file gives the space back.
pub fn fill(path: &Path) -> std::io::Result<PathBuf> {
    let mut file = std::fs::File::create(path)?;
    let chunk = vec![0x5a_u8; 64 * 1024];
    let mut small = false;
    loop {
        let piece = if small { &chunk[..512] } else { &chunk[..] };
        match file.write_all(piece) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) && !small => small = true,
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) => break,
            Err(e) => return Err(e),
        }
    }
    // Whatever the page cache held is on the file system: the space is taken now.
    let _ = file.sync_all();
    Ok(path.to_path_buf())
}
