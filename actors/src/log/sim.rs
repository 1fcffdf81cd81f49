//! A simulated disk for power-cut tests, in the manner of LazyFS: what was written but not
//! synced sits in a page cache; a power cut, at an operation a seed chooses, keeps only what
//! was synced, plus whatever of the cache the seed lets through: nothing, a prefix of the
//! unsynced writes in order with the next one torn, or any subset of their sectors (a page
//! cache writes back in its own order). File creations and removals not made
//! durable by a directory sync may be undone. A sync that a test makes fail drops the
//! writes it covered as Linux may (`StorageFile::sync_failed`): still read, never made
//! durable by a later sync unless written again.

use super::storage::{Storage, StorageFile, StorageStats};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// The unit in which a scrambling power cut keeps or loses unsynced data: small, so that a
/// record can be half on the disk (real disks tear at 512 bytes or 4 KiB; records here are
/// tens of bytes).
const SECTOR_BYTES: usize = 16;

#[derive(Debug, Clone, Default)]
struct SimFile {
    /// What survives a power cut for sure.
    durable: Vec<u8>,
    /// What reads see: `durable` with the unsynced writes applied.
    current: Vec<u8>,
    /// Writes since the last sync of this file, in order (a length change is a write of
    /// zeros at the end).
    unsynced: Vec<(u64, Vec<u8>)>,
    /// Byte ranges `[start, end)` whose writeback failed (a sync failed while they were
    /// unsynced): reads see them, but no later sync makes them durable until they are
    /// written again, and a power cut loses them (Linux marks such pages clean).
    dropped: Vec<(u64, u64)>,
}

impl SimFile {
    fn write(&mut self, offset: u64, data: &[u8]) {
        apply(&mut self.current, offset, data);
        self.unsynced.push((offset, data.to_vec()));
        let (start, end) = (offset, offset + data.len() as u64);
        self.dropped = self
            .dropped
            .iter()
            .flat_map(|&(a, b)| [(a, b.min(start)), (a.max(end), b)])
            .filter(|(a, b)| a < b)
            .collect();
    }

    fn sync(&mut self) {
        let mut durable = self.current.clone();
        for &(start, end) in &self.dropped {
            for offset in start..end.min(durable.len() as u64) {
                durable[offset as usize] = self.durable.get(offset as usize).copied().unwrap_or(0);
            }
        }
        self.durable = durable;
        self.unsynced.clear();
    }

    /// A sync failed: what it should have written is dropped (see `dropped`).
    fn sync_failed(&mut self) {
        for (offset, data) in std::mem::take(&mut self.unsynced) {
            self.dropped.push((offset, offset + data.len() as u64));
        }
    }
}

fn apply(bytes: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let end = offset as usize + data.len();
    if bytes.len() < end {
        bytes.resize(end, 0);
    }
    bytes[offset as usize..end].copy_from_slice(data);
}

#[derive(Debug, Default)]
struct Disk {
    files: BTreeMap<String, SimFile>,
    /// Names whose existence is durable.
    durable_names: BTreeSet<String>,
    /// Removed files whose removal is not durable yet (they may come back at a power cut).
    removed: BTreeMap<String, SimFile>,
    /// Operations so far, and the one at which the power goes (it and every later one fail).
    ops: u64,
    cut_at: Option<u64>,
}

impl Disk {
    fn step(&mut self) -> io::Result<()> {
        self.ops += 1;
        match self.cut_at {
            Some(at) if self.ops >= at => Err(io::Error::other("simulated power cut")),
            _ => Ok(()),
        }
    }
}

/// A disk in memory whose power can be cut. Cloning shares the disk.
#[derive(Clone, Default)]
pub struct SimDisk {
    disk: Arc<Mutex<Disk>>,
    stats: Arc<StorageStats>,
}

/// How much of the unsynced writes a power cut lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutMode {
    /// Nothing that was not synced.
    DropUnsynced,
    /// A prefix of each file's unsynced writes, in order, the next one torn.
    TornPrefix,
    /// Any subset of the sectors of each file's unsynced writes.
    Scrambled,
}

impl SimDisk {
    pub fn new() -> SimDisk {
        SimDisk::default()
    }

    /// The power goes at the `ops`-th operation from now (writes, syncs, creations,
    /// removals): that one and every later one fail.
    pub fn cut_power_after(&self, ops: u64) {
        let mut disk = self.lock();
        disk.cut_at = Some(disk.ops + ops.max(1));
    }

    /// The power comes back (what was written stays as it is): operations succeed again.
    pub fn restore_power(&self) {
        self.lock().cut_at = None;
    }

    /// Whether the power has gone.
    pub fn is_cut(&self) -> bool {
        let disk = self.lock();
        disk.cut_at.is_some_and(|at| disk.ops >= at)
    }

    /// Operations so far.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// The disk as it is found after a power cut now: what was synced, and what `mode`
    /// (with `seed` choosing the details) lets through of the rest.
    pub fn after_power_cut(&self, mode: CutMode, seed: u64) -> SimDisk {
        let mut rng = StdRng::seed_from_u64(seed);
        let disk = self.lock();
        let mut files = BTreeMap::new();
        let candidates = disk
            .files
            .iter()
            .chain(disk.removed.iter())
            .map(|(name, file)| (name.clone(), file.clone()));
        for (name, file) in candidates {
            let exists_now = disk.files.contains_key(&name);
            let durable_name = disk.durable_names.contains(&name);
            // An entry not made durable may or may not have reached the disk.
            let survives = if exists_now == durable_name {
                exists_now
            } else {
                rng.random_bool(0.5)
            };
            if !survives {
                continue;
            }
            let mut bytes = file.durable.clone();
            match mode {
                CutMode::DropUnsynced => {}
                CutMode::TornPrefix => {
                    let keep = rng.random_range(0..=file.unsynced.len());
                    for (offset, data) in &file.unsynced[..keep] {
                        apply(&mut bytes, *offset, data);
                    }
                    if let Some((offset, data)) = file.unsynced.get(keep) {
                        let torn = rng.random_range(0..=data.len());
                        apply(&mut bytes, *offset, &data[..torn]);
                    }
                }
                CutMode::Scrambled => {
                    // A page cache writes back in its own order and granularity: each
                    // sector of each unsynced write reaches the disk or not, independently.
                    for (offset, data) in &file.unsynced {
                        for (i, sector) in data.chunks(SECTOR_BYTES).enumerate() {
                            if rng.random_bool(0.5) {
                                apply(&mut bytes, offset + (i * SECTOR_BYTES) as u64, sector);
                            }
                        }
                    }
                    // A failed writeback may have written some of its sectors before it
                    // failed.
                    for &(start, end) in &file.dropped {
                        let end = end.min(file.current.len() as u64) as usize;
                        let data = &file.current[(start as usize).min(end)..end];
                        for (i, sector) in data.chunks(SECTOR_BYTES).enumerate() {
                            if rng.random_bool(0.5) {
                                apply(&mut bytes, start + (i * SECTOR_BYTES) as u64, sector);
                            }
                        }
                    }
                }
            }
            files.insert(
                name,
                SimFile {
                    durable: bytes.clone(),
                    current: bytes,
                    unsynced: Vec::new(),
                    dropped: Vec::new(),
                },
            );
        }
        let durable_names = files.keys().cloned().collect();
        SimDisk {
            disk: Arc::new(Mutex::new(Disk {
                files,
                durable_names,
                ..Disk::default()
            })),
            stats: Arc::default(),
        }
    }

    /// Overwrites bytes of a file as they are on the disk (for corruption tests).
    pub fn corrupt(&self, name: &str, offset: u64, data: &[u8]) {
        let mut disk = self.lock();
        if let Some(file) = disk.files.get_mut(name) {
            apply(&mut file.current, offset, data);
            apply(&mut file.durable, offset, data);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Disk> {
        self.disk.lock().expect("sim disk lock")
    }
}

impl Storage for SimDisk {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut disk = self.lock();
        disk.step()?;
        Ok(disk.files.keys().cloned().collect())
    }

    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        let mut disk = self.lock();
        disk.step()?;
        if !disk.files.contains_key(name) {
            if !create {
                return Err(io::Error::new(io::ErrorKind::NotFound, format!("{name} not found")));
            }
            let file = disk
                .removed
                .remove(name)
                .map(|_| SimFile::default())
                .unwrap_or_default();
            disk.files.insert(name.to_owned(), file);
        }
        Ok(Arc::new(SimHandle {
            disk: self.clone(),
            name: name.to_owned(),
        }))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut disk = self.lock();
        disk.step()?;
        let file = disk
            .files
            .remove(name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{name} not found")))?;
        if disk.durable_names.contains(name) {
            disk.removed.insert(name.to_owned(), file);
        }
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        let mut disk = self.lock();
        disk.step()?;
        disk.durable_names = disk.files.keys().cloned().collect();
        disk.removed.clear();
        self.stats.dir_syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn stats(&self) -> &StorageStats {
        &self.stats
    }
}

struct SimHandle {
    disk: SimDisk,
    name: String,
}

impl SimHandle {
    fn with<T>(&self, step: bool, f: impl FnOnce(&mut SimFile) -> io::Result<T>) -> io::Result<T> {
        let mut disk = self.disk.lock();
        if step {
            disk.step()?;
        }
        let file = disk
            .files
            .get_mut(&self.name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{} was removed", self.name)))?;
        f(file)
    }
}

impl StorageFile for SimHandle {
    fn size(&self) -> io::Result<u64> {
        self.with(false, |file| Ok(file.current.len() as u64))
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.with(false, |file| {
            let end = offset as usize + buf.len();
            if end > file.current.len() {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"));
            }
            buf.copy_from_slice(&file.current[offset as usize..end]);
            Ok(())
        })
    }

    fn write_all_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.with(true, |file| {
            file.write(offset, data);
            Ok(())
        })?;
        self.disk.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.disk
            .stats
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        self.with(true, |file| {
            let size = file.current.len() as u64;
            if size < len {
                file.write(size, &vec![0; (len - size) as usize]);
            }
            Ok(())
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.with(true, |file| {
            file.sync();
            Ok(())
        })?;
        self.disk.stats.syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn sync_failed(&self) {
        let _ = self.with(false, |file| {
            file.sync_failed();
            Ok(())
        });
    }
}
