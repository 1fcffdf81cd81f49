//! A storage that fails or stalls on demand, around another one (the simulated disk in
//! tests): the disk filling up (`ENOSPC` on writes, on the allocation of a new segment, on
//! syncs), a sync failing with `EIO`, syncs that take seconds. Switches can be flipped while
//! the journal runs; cloning shares them.
//!
//! A write refused for space writes the first half of its bytes before it fails, as a
//! `pwrite` that ran out of room part way does: whatever the log does next must not let
//! those bytes count. A failed sync tells the storage underneath (`sync_failed`): the
//! simulated disk then never makes the writes it should have synced durable unless they
//! are written again, as Linux may do after a failed `fsync`.

use super::storage::{out_of_space, Storage, StorageFile, StorageStats};
use std::io;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The operations a fault can hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `write_all_at`.
    Write,
    /// `allocate` (reserving a new segment's blocks).
    Allocate,
    /// `sync_data` and `sync_dir`.
    Sync,
}

impl Op {
    fn bit(self) -> u8 {
        match self {
            Op::Write => 1,
            Op::Allocate => 2,
            Op::Sync => 4,
        }
    }
}

struct Faults {
    /// Operations answered with `ENOSPC` (bits of [`Op::bit`]).
    no_space: AtomicU8,
    /// An errno every sync fails with (0: none).
    sync_errno: AtomicI32,
    /// How long each sync takes first, in milliseconds.
    sync_stall_ms: AtomicU64,
    /// Operations that failed because of a switch.
    injected: AtomicU64,
    /// Writes left before the disk fills by itself (negative: no countdown).
    writes_left: std::sync::atomic::AtomicI64,
}

/// A [`Storage`] whose operations fail or stall while a switch says so.
#[derive(Clone)]
pub struct FaultyStorage {
    inner: Arc<dyn Storage>,
    faults: Arc<Faults>,
}

impl FaultyStorage {
    pub fn new(inner: Arc<dyn Storage>) -> FaultyStorage {
        FaultyStorage {
            inner,
            faults: Arc::default(),
        }
    }

    /// The disk is full: writes, allocations and syncs fail with `ENOSPC`.
    pub fn fill(&self) {
        self.no_space_on(&[Op::Write, Op::Allocate, Op::Sync]);
    }

    /// Exactly `ops` fail with `ENOSPC` from now on (none: space is back).
    pub fn no_space_on(&self, ops: &[Op]) {
        let bits = ops.iter().fold(0, |bits, op| bits | op.bit());
        self.faults.no_space.store(bits, Ordering::SeqCst);
    }

    /// The disk fills by itself after `writes` more writes succeed (the one after them,
    /// and everything after it, fails as [`FaultyStorage::fill`] makes it): full in the
    /// middle of whatever is being written then.
    pub fn fill_after_writes(&self, writes: u64) {
        self.faults.writes_left.store(writes as i64, Ordering::SeqCst);
    }

    /// Space is back: nothing fails for want of it any more.
    pub fn free(&self) {
        self.faults.writes_left.store(-1, Ordering::SeqCst);
        self.no_space_on(&[]);
    }

    /// Every sync fails with `errno` (`None`: syncs succeed again).
    pub fn fail_syncs_with(&self, errno: Option<i32>) {
        self.faults.sync_errno.store(errno.unwrap_or(0), Ordering::SeqCst);
    }

    /// Each sync first stalls for `stall` (zero: no stall).
    pub fn stall_syncs(&self, stall: Duration) {
        self.faults
            .sync_stall_ms
            .store(stall.as_millis() as u64, Ordering::SeqCst);
    }

    /// How many operations failed because of a switch so far.
    pub fn injected(&self) -> u64 {
        self.faults.injected.load(Ordering::SeqCst)
    }
}

impl Default for Faults {
    fn default() -> Faults {
        Faults {
            no_space: AtomicU8::new(0),
            sync_errno: AtomicI32::new(0),
            sync_stall_ms: AtomicU64::new(0),
            injected: AtomicU64::new(0),
            writes_left: std::sync::atomic::AtomicI64::new(-1),
        }
    }
}

impl Faults {
    /// Counts a write down; the one that finds none left fills the disk.
    fn count_write(&self) {
        if self.writes_left.load(Ordering::SeqCst) < 0 {
            return;
        }
        if self.writes_left.fetch_sub(1, Ordering::SeqCst) == 0 {
            self.writes_left.store(-1, Ordering::SeqCst);
            self.no_space
                .store(Op::Write.bit() | Op::Allocate.bit() | Op::Sync.bit(), Ordering::SeqCst);
        }
    }

    fn no_space(&self, op: Op) -> io::Result<()> {
        if self.no_space.load(Ordering::SeqCst) & op.bit() != 0 {
            self.injected.fetch_add(1, Ordering::SeqCst);
            return Err(out_of_space());
        }
        Ok(())
    }

    /// Before a sync: the stall, then the switches.
    fn sync(&self) -> io::Result<()> {
        let stall = self.sync_stall_ms.load(Ordering::SeqCst);
        if stall > 0 {
            std::thread::sleep(Duration::from_millis(stall));
        }
        let errno = self.sync_errno.load(Ordering::SeqCst);
        if errno != 0 {
            self.injected.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(errno));
        }
        self.no_space(Op::Sync)
    }
}

impl Storage for FaultyStorage {
    fn list(&self) -> io::Result<Vec<String>> {
        self.inner.list()
    }

    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        Ok(Arc::new(FaultyFile {
            inner: self.inner.open(name, create)?,
            faults: self.faults.clone(),
        }))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.inner.remove(name)
    }

    fn sync_dir(&self) -> io::Result<()> {
        self.faults.sync()?;
        self.inner.sync_dir()
    }

    fn stats(&self) -> &StorageStats {
        self.inner.stats()
    }
}

struct FaultyFile {
    inner: Arc<dyn StorageFile>,
    faults: Arc<Faults>,
}

impl StorageFile for FaultyFile {
    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_exact_at(offset, buf)
    }

    fn write_all_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.faults.count_write();
        if let Err(e) = self.faults.no_space(Op::Write) {
            // Short: the first half reached the file before the space ran out.
            let half = &data[..data.len() / 2];
            if !half.is_empty() {
                self.inner.write_all_at(offset, half)?;
            }
            return Err(e);
        }
        self.inner.write_all_at(offset, data)
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        // Blocks reserved already need no space (a segment created again after a rewind).
        if self.inner.size()? >= len {
            return Ok(());
        }
        self.faults.no_space(Op::Allocate)?;
        self.inner.allocate(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        if let Err(e) = self.faults.sync() {
            self.inner.sync_failed();
            return Err(e);
        }
        self.inner.sync_data()
    }

    fn sync_failed(&self) {
        self.inner.sync_failed()
    }
}
