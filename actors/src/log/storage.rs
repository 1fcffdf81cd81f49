//! The storage layer under the event log: a directory of files that can be written at an
//! offset, read back, preallocated, and made durable (`fdatasync` of a file, `fsync` of the
//! directory for its entries). The log does its IO only through this port, so tests replace
//! the real file system with a simulated disk that loses what was not synced at a power cut
//! (`sim::SimDisk`), and count what the real one did (`StorageStats`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What a storage did, for tests and metrics: a reply may leave only after the sync that
/// covers its write, and these counters let a test check that from the outside.
#[derive(Debug, Default)]
pub struct StorageStats {
    pub writes: AtomicU64,
    pub bytes_written: AtomicU64,
    /// `fdatasync`s of files.
    pub syncs: AtomicU64,
    /// `fsync`s of the directory (after a file was created or removed).
    pub dir_syncs: AtomicU64,
}

impl StorageStats {
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::SeqCst)
    }

    fn wrote(&self, bytes: usize) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.bytes_written.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// Whether `error` says the storage is out of space (`ENOSPC`, or `EDQUOT`: a quota full):
/// nothing is wrong with what it holds, and writes can succeed again once space is freed.
/// Every other error of a write or a sync (`EIO` above all) is taken as a failure of the
/// storage itself.
pub fn is_out_of_space(error: &io::Error) -> bool {
    let raw = error.raw_os_error();
    // By kind too: sled hands on a copy of an I/O error it met earlier (its flusher's) made
    // from the kind and a message, without the OS code — a full disk seen that way was taken
    // for a failed one (refusing writes until a restart) in the full-tmpfs test.
    matches!(error.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded)
        || (raw.is_some()
            && (raw == Some(rustix::io::Errno::NOSPC.raw_os_error())
                || raw == Some(rustix::io::Errno::DQUOT.raw_os_error())))
}

/// An `ENOSPC` error, as the file system answers a write it has no room for.
pub fn out_of_space() -> io::Error {
    io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error())
}

/// A directory of files.
pub trait Storage: Send + Sync + 'static {
    /// The names of the files in the directory.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Opens a file; with `create`, creates it (empty) if it is missing. A created file's
    /// entry is durable only after [`Storage::sync_dir`].
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn StorageFile>>;
    /// Removes a file; durable only after [`Storage::sync_dir`].
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes the directory's entries durable (`fsync` of the directory).
    fn sync_dir(&self) -> io::Result<()>;
    fn stats(&self) -> &StorageStats;
}

/// One file of a [`Storage`].
pub trait StorageFile: Send + Sync {
    fn size(&self) -> io::Result<u64>;
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `data` at `offset`; durable only after [`StorageFile::sync_data`].
    fn write_all_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Reserves the file's blocks up to `len` bytes (reading as zeros), so later writes
    /// within it change no metadata and `fdatasync` writes data alone.
    fn allocate(&self, len: u64) -> io::Result<()>;
    /// `fdatasync`: the file's data written so far, and the metadata needed to read it, are
    /// on stable storage when it returns.
    fn sync_data(&self) -> io::Result<()>;
    /// What a failed `fdatasync` did to the writes it should have made durable, for a
    /// storage that simulates it (a test seam; a real file does nothing here): Linux may mark
    /// the pages it could not write clean, so reads still see them and no later sync writes
    /// them ("fsyncgate"). Called by a storage that fails syncs on purpose.
    fn sync_failed(&self) {}
}

/// The real file system: one directory.
pub struct FsStorage {
    dir: PathBuf,
    stats: Arc<StorageStats>,
}

impl FsStorage {
    /// The directory `dir`, created if missing (and its own entry made durable).
    pub fn open(dir: &Path) -> io::Result<FsStorage> {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            if let Some(parent) = dir.parent() {
                File::open(parent)?.sync_all()?;
            }
        }
        Ok(FsStorage {
            dir: dir.to_path_buf(),
            stats: Arc::default(),
        })
    }
}

impl Storage for FsStorage {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                if let Ok(name) = entry.file_name().into_string() {
                    names.push(name);
                }
            }
        }
        Ok(names)
    }

    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(self.dir.join(name))?;
        Ok(Arc::new(FsFile {
            file,
            stats: self.stats.clone(),
        }))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.dir.join(name))
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()?;
        self.stats.dir_syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn stats(&self) -> &StorageStats {
        &self.stats
    }
}

struct FsFile {
    file: File,
    stats: Arc<StorageStats>,
}

impl StorageFile for FsFile {
    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        FileExt::read_exact_at(&self.file, buf, offset)
    }

    fn write_all_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        FileExt::write_all_at(&self.file, data, offset)?;
        self.stats.wrote(data.len());
        Ok(())
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        if self.size()? >= len {
            return Ok(());
        }
        // fallocate reserves the blocks; a file system without it gets a sparse file, whose
        // blocks are then allocated by the writes (and recorded by fdatasync).
        match rustix::fs::fallocate(&self.file, rustix::fs::FallocateFlags::empty(), 0, len) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) => self.file.set_len(len),
            Err(e) => Err(e.into()),
        }
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()?;
        self.stats.syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod out_of_space_tests {
    use super::*;

    #[test]
    fn a_full_disk_is_known_by_its_code_or_by_its_kind_alone() {
        assert!(is_out_of_space(&out_of_space()));
        // As sled copies an error: the kind and a message, no OS code.
        let copied = io::Error::new(io::ErrorKind::StorageFull, format!("{:?}", out_of_space()));
        assert!(copied.raw_os_error().is_none());
        assert!(is_out_of_space(&copied));
        assert!(!is_out_of_space(&io::Error::from_raw_os_error(5)));
        assert!(!is_out_of_space(&io::Error::other("disk on fire")));
    }
}
