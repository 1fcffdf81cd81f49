//! The embedded journal: every actor's stream in an append-only event log, indexed and
//! completed by sled, written by one writer thread that group-commits. The writer takes
//! whatever is queued (up to `JOURNAL_BATCH_MAX` appends, from any number of actors), writes
//! it as one record of the event log ([`crate::log`]) — each stream's events as one chunk,
//! its new deadline, and the audit entries the events cause — and `fdatasync`s it, then runs
//! the completions in order: one `fdatasync` per batch, not per buyer, and no reply before
//! it. The events stay in the log; sled gets, per stream and commit, a pointer to the chunk
//! ([`EventPointer`]), through an in-memory overlay applied in bulk ([`Overlay`]).
//!
//! sled's own flush is not an fsync (it uses `sync_file_range`), so sled is not trusted with
//! durability: a **checkpoint** (sled flushed, its files `fsync`ed) records the point of the
//! log sled holds everything before, and at opening the records after it are applied to sled
//! again (each is a set of key writes, so applying one twice changes nothing). Snapshots are
//! written after the batch holding the events they cover, a slice at a time between batches
//! (see [`crate::sled_parts`]); they need no sync of their own: a reply never waits for one,
//! and until a checkpoint covers them the log still holds every event they summarize.
//!
//! **Faults.** Out of space (`ENOSPC`, `EDQUOT`) anywhere, in the log or in sled, makes
//! the journal refuse writes (`NoSpace`) while it serves reads; the writer retries with a
//! bounded back-off (rewinding the log to its last sync, reopening sled if one of its
//! writes failed, then a checkpoint) and writes resume by themselves. Any other storage
//! error, a failed `fdatasync` above all, refuses writes until a restart: after a failed
//! sync, what is on the disk is known only to a recovery (ARCHITECTURE.md, *Faults*).
//!
//! The address vault's changes go to a log of their own (`vault-*.log`), emptied at each
//! checkpoint: the event log is kept, and a sealed address or its salt must not outlive its
//! shredding there.
//!
//! Keys: `e/<stream>\0<first version, 8 bytes big-endian>` for a pointer to a chunk of
//! consecutive events (or, written by earlier versions, the chunk itself); `S/<stream>` for
//! the snapshot's header and `s/<stream>\0<version><part>` for its parts, the version being
//! the generation (`s/<stream>` alone: a whole snapshot written by an earlier version);
//! `w/<stream>` for the stream's next deadline (8-byte big-endian Unix ms). Streams never
//! contain a NUL byte.

use crate::audit_log::{AuditEntry, AuditLog, AuditPage, AuditSubject};
use crate::journal::*;
use crate::limits::{
    JOURNAL_BATCH_MAX, JOURNAL_CACHE_BYTES, JOURNAL_QUEUE_MAX, JOURNAL_RETRY_FIRST_MS, JOURNAL_RETRY_MAX_MS,
    JOURNAL_SLOW_SYNC_MS, LOG_CHECKPOINT_INTERVAL_MS, LOG_SEGMENT_BYTES, SLED_REOPEN_FREE_BYTES_MIN,
    SNAPSHOT_QUEUE_BYTES_MAX, SNAPSHOT_SLICE_PARTS, VAULT_LOG_SEGMENT_BYTES,
};
use crate::log::storage::{is_out_of_space, FsStorage, Storage, StorageStats};
use crate::log::{Checkpoint, Log, LogReader, Position};
use crate::secrets::SealedAddress;
use crate::sled_parts::{self, PartsWrite};
use crate::telemetry::{JournalFigures, JournalStats};
use domain::UnixMillis;
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

struct Request {
    batch: AppendBatch,
    /// Changes the address vault already made in sled, to make durable in the log (with an
    /// empty `batch`: a barrier).
    vault: Vec<Change>,
    /// The sled they were made in (applied again if sled was reopened since).
    vault_store: Option<std::sync::Weak<Store>>,
    done: Completion,
}

/// What a request gets when an earlier append of its stream failed for `why`.
fn earlier_failed(stream: &str, why: &JournalError) -> JournalError {
    match why {
        JournalError::NoSpace(cause) => {
            JournalError::NoSpace(format!("{stream}: an earlier append was refused: {cause}"))
        }
        _ => JournalError::Io(format!("{stream}: an earlier append failed")),
    }
}

/// One change a log record holds: the tree (by tag), the key, and the new value (`None`:
/// removed).
type Change = (u8, Vec<u8>, Option<Vec<u8>>);

/// The trees a log record changes, by the tag its changes carry.
const TREE_STREAMS: u8 = 0;
const TREE_ADDRESSES: u8 = 1;
const TREE_ADDRESS_KEYS: u8 = 2;
const TREE_ADDRESS_SHRED: u8 = 3;
/// A chunk of a stream's events (key: its event key). The events stay in the log: the
/// streams tree gets a pointer to them (see [`EventPointer`]).
const TREE_EVENTS: u8 = 4;
/// An entry of the audit trail (key: `audit_key`).
const TREE_AUDIT: u8 = 5;

/// Where the log's records stop being needed to rebuild sled: sled holds every record
/// before this [`Checkpoint`] (in the default tree).
const LOG_CHECKPOINT_KEY: &[u8] = b"log-checkpoint";

/// Names of the vault log's segments, beside the event log's in the same directory.
const VAULT_LOG_PREFIX: &str = "vault-";

/// Where a chunk of events is in the write-ahead log, as the streams tree keeps it under the
/// chunk's event key: `[0xff; 4]`, segment, offset (u64 LE), length and CRC32C (u32 LE) of
/// the chunk's bytes. A chunk stored whole in sled (written before the events moved to the
/// log) starts with its first event's length, which is never `0xffff_ffff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EventPointer {
    segment: u64,
    offset: u64,
    len: u32,
    crc: u32,
}

impl EventPointer {
    const BYTES: usize = 28;
    const MARK: [u8; 4] = [0xff; 4];

    fn encode(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        out[..4].copy_from_slice(&Self::MARK);
        out[4..12].copy_from_slice(&self.segment.to_le_bytes());
        out[12..20].copy_from_slice(&self.offset.to_le_bytes());
        out[20..24].copy_from_slice(&self.len.to_le_bytes());
        out[24..].copy_from_slice(&self.crc.to_le_bytes());
        out
    }

    /// The pointer a value holds, or `None` for a chunk stored whole.
    fn decode(value: &[u8]) -> Option<EventPointer> {
        if value.len() != Self::BYTES || value[..4] != Self::MARK {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(value[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(value[i..i + 4].try_into().expect("4 bytes"));
        Some(EventPointer {
            segment: u64_at(4),
            offset: u64_at(12),
            len: u32_at(20),
            crc: u32_at(24),
        })
    }

    /// The pointer to `payload[start..start + len]` of the record at `position`.
    fn into_record(position: Position, payload: &[u8], start: usize, len: usize) -> EventPointer {
        EventPointer {
            segment: position.segment,
            offset: position.payload_offset() + start as u64,
            len: len as u32,
            crc: crc32c::crc32c(&payload[start..start + len]),
        }
    }
}

pub struct SledJournal {
    shared: Arc<Shared>,
    /// Held from a vault transaction until its changes are queued for the log, so the log
    /// holds them in the order sled applied them.
    vault_order: std::sync::Mutex<()>,
    tx: mpsc::Sender<Request>,
    /// The queue's bound, from which its depth is read.
    queue_max: usize,
    stats: Arc<WriterStats>,
    /// For the server's metrics (group commits' sizes and sync latency).
    telemetry: Arc<JournalStats>,
    log_storage: Arc<dyn Storage>,
    /// Reads the events the streams tree points at.
    log_reader: LogReader,
    /// Changes to the streams tree that are durable in the log and not applied to sled yet.
    overlay: Arc<Overlay>,
    /// The writer thread, joined by [`SledJournal::close`].
    writer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Options of [`SledJournal::open_with`].
#[derive(Debug, Clone, Copy)]
pub struct JournalOptions {
    /// Size of the write-ahead log's segments ([`LOG_SEGMENT_BYTES`]).
    pub segment_bytes: u64,
    /// Appends queued for the writer at most ([`JOURNAL_QUEUE_MAX`]); beyond it, `Full`.
    pub queue_max: usize,
}

impl Default for JournalOptions {
    fn default() -> JournalOptions {
        JournalOptions {
            segment_bytes: LOG_SEGMENT_BYTES,
            queue_max: JOURNAL_QUEUE_MAX,
        }
    }
}

/// sled's database and trees: replaced whole when sled is reopened after a failed write
/// (its errors are sticky: once a write of its own failed, it refuses every later one).
struct Store {
    db: sled::Db,
    tree: sled::Tree,
    addresses: sled::Tree,
    address_keys: sled::Tree,
    address_shred: sled::Tree,
    audit: sled::Tree,
}

impl Store {
    fn open(dir: &Path) -> Result<Store, JournalError> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            // sled's page cache defaults to 1 GiB; actors keep their own state in memory,
            // so the journal needs little cache (recovery reads are sequential).
            .cache_capacity(JOURNAL_CACHE_BYTES)
            .open()
            .map_err(sled_error)?;
        Ok(Store {
            tree: db.open_tree("streams").map_err(sled_error)?,
            addresses: db.open_tree("addresses").map_err(sled_error)?,
            address_keys: db.open_tree("address_keys").map_err(sled_error)?,
            address_shred: db.open_tree("address_shred").map_err(sled_error)?,
            audit: db.open_tree("audit").map_err(sled_error)?,
            db,
        })
    }

    /// The log checkpoint sled holds everything before (none: replay from the start).
    fn checkpoint(&self) -> Result<Option<Checkpoint>, JournalError> {
        match self.db.get(LOG_CHECKPOINT_KEY).map_err(sled_error)? {
            Some(bytes) => Ok(Some(Checkpoint::decode(&bytes).ok_or_else(|| {
                JournalError::Corrupt(format!(
                    "the log checkpoint is {} bytes, not {}",
                    bytes.len(),
                    Checkpoint::BYTES
                ))
            })?)),
            None => Ok(None),
        }
    }

    /// Applies a log record's changes to sled again (each is a key write: twice is once).
    /// The vault's log records carry no events.
    fn apply_record(&self, record: &[u8], position: Position, what: &str) -> Result<(), JournalError> {
        let [streams_batch, addresses_batch, keys_batch, shred_batch, _, audit_batch] =
            decode_ops(record, position).map_err(|e| JournalError::Corrupt(format!("{what}: {e}")))?;
        let trees = [
            (&self.tree, streams_batch),
            (&self.addresses, addresses_batch),
            (&self.address_keys, keys_batch),
            (&self.address_shred, shred_batch),
            (&self.audit, audit_batch),
        ];
        for (target, batch) in trees {
            target.apply_batch(batch).map_err(sled_error)?;
        }
        Ok(())
    }

    /// Applies every synced record of `log` from `from` on; answers how many.
    fn replay(&self, log: &Log, from: Option<Checkpoint>, what: &str) -> Result<usize, JournalError> {
        let mut replayed = 0;
        let mut failed = None;
        log.replay_synced(from, |position, record| {
            if failed.is_none() {
                match self.apply_record(record, position, what) {
                    Ok(()) => replayed += 1,
                    Err(e) => failed = Some(e),
                }
            }
        })
        .map_err(|e| JournalError::Io(format!("{what}: {e}")))?;
        failed.map_or(Ok(replayed), Err)
    }
}

/// A sled error as a journal error: out of space (its writes fail until it is reopened
/// with space freed) or anything else.
fn sled_error(e: sled::Error) -> JournalError {
    match &e {
        sled::Error::Io(io) if is_out_of_space(io) => JournalError::NoSpace(format!("sled: {e}")),
        _ => JournalError::Io(format!("sled: {e}")),
    }
}

/// Whether the journal takes writes.
#[derive(Debug, Clone)]
enum Condition {
    Writing,
    /// Out of space since then: writes are refused, reads served, and the writer tries
    /// again with a bounded back-off until they go through.
    Full {
        cause: String,
        since: std::time::Instant,
    },
    /// The storage failed otherwise (a failed `fdatasync` above all): what reached the disk
    /// is known only after a recovery, so writes are refused until a restart.
    Broken(String),
}

/// What the journal's handles and its writer thread share.
struct Shared {
    /// sled's handles; `None` (and write-locked) while the writer reopens it.
    store: std::sync::RwLock<Option<Arc<Store>>>,
    condition: std::sync::Mutex<Condition>,
    /// Whether `condition` is not `Writing` (read on every command that changes state).
    refusing: std::sync::atomic::AtomicBool,
    /// Set by a vault or audit write that found sled out of space: the writer reopens it.
    sled_out_of_space: std::sync::atomic::AtomicBool,
    /// Set by [`SledJournal::close`]: the writer finishes what it has and stops.
    closing: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn refusing(&self) -> bool {
        self.refusing.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn condition(&self) -> Condition {
        self.condition.lock().expect("condition lock").clone()
    }

    fn set_condition(&self, condition: Condition) {
        let refusing = !matches!(condition, Condition::Writing);
        *self.condition.lock().expect("condition lock") = condition;
        self.refusing.store(refusing, std::sync::atomic::Ordering::SeqCst);
    }

    /// Why writes are refused, as the error a refused write gets.
    fn refusal(&self) -> Option<JournalError> {
        if !self.refusing() {
            return None;
        }
        match self.condition() {
            Condition::Writing => None,
            Condition::Full { cause, .. } => Some(JournalError::NoSpace(cause)),
            Condition::Broken(why) => Some(JournalError::Io(format!(
                "the journal's storage failed ({why}); writes are refused: restart to recover"
            ))),
        }
    }

    /// sled's handles for a read; while the writer reopens sled, an error to retry.
    fn store(&self) -> Result<Arc<Store>, JournalError> {
        let closed = || {
            JournalError::NoSpace(
                "the journal's index is being reopened after its disk filled up; retry shortly".into(),
            )
        };
        match self.store.try_read() {
            Ok(store) => store.clone().ok_or_else(closed),
            Err(std::sync::TryLockError::WouldBlock) => Err(closed()),
            Err(std::sync::TryLockError::Poisoned(_)) => panic!("journal store lock poisoned"),
        }
    }

    /// A vault or audit write's sled error: out of space, the writer is told to reopen sled.
    fn sled_error(&self, e: sled::Error) -> JournalError {
        let error = sled_error(e);
        if matches!(error, JournalError::NoSpace(_)) {
            self.sled_out_of_space.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        error
    }
}

/// Changes to the streams tree (event pointers, deadlines; `None`: removed) that the log
/// holds durably and sled does not yet: the writer applies them to sled in bulk, when
/// `OVERLAY_MAX` are waiting and at each checkpoint, instead of once per group commit (a sled
/// batch per commit woke sled's I/O threads every time). Readers look here first, then in
/// sled: the writer applies a bulk to sled before it clears it from here, so a reader never
/// misses an entry that moves.
#[derive(Default)]
struct Overlay {
    changes: std::sync::RwLock<std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
}

impl Overlay {
    fn range(&self, from: &[u8], to: &[u8]) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let changes = self.changes.read().expect("overlay lock");
        changes
            .range::<[u8], _>((std::ops::Bound::Included(from), std::ops::Bound::Excluded(to)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn len(&self) -> usize {
        self.changes.read().expect("overlay lock").len()
    }
}

/// Entries of the streams tree waiting in the overlay before the writer applies them.
const OVERLAY_MAX: usize = 4_096;

/// The entries of `tree` in `[from, to)`, with the overlay's changes on top (read first).
fn merged_range(
    overlay: &Overlay,
    tree: &sled::Tree,
    from: &[u8],
    to: &[u8],
) -> Result<std::collections::BTreeMap<Vec<u8>, Vec<u8>>, JournalError> {
    let on_top = overlay.range(from, to);
    let mut merged = std::collections::BTreeMap::new();
    for item in tree.range(from..to) {
        let (key, value) = item.map_err(|e| JournalError::Io(e.to_string()))?;
        merged.insert(key.to_vec(), value.to_vec());
    }
    for (key, value) in on_top {
        match value {
            Some(value) => merged.insert(key, value),
            None => merged.remove(&key),
        };
    }
    Ok(merged)
}

/// Counters of the writer, for logs and benchmarks.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub flushes: std::sync::atomic::AtomicU64,
    pub appends: std::sync::atomic::AtomicU64,
}

fn event_key(stream: &str, version: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(stream.len() + 11);
    key.extend_from_slice(b"e/");
    key.extend_from_slice(stream.as_bytes());
    key.push(0);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

/// Where a stream's snapshot lives: header `S/<stream>`, parts `s/<stream>\0…`, and the
/// whole value earlier versions kept at `s/<stream>` (8-byte version, then the state).
fn snapshot_keys(stream: &str) -> sled_parts::Keys {
    sled_parts::Keys {
        header: [b"S/".as_slice(), stream.as_bytes()].concat(),
        parts: [b"s/".as_slice(), stream.as_bytes(), &[0]].concat(),
        legacy: [b"s/".as_slice(), stream.as_bytes()].concat(),
    }
}

fn wakeup_key(stream: &str) -> Vec<u8> {
    [b"w/".as_slice(), stream.as_bytes()].concat()
}

impl SledJournal {
    /// Opens (or creates) the journal under `dir` and starts its writer thread. sled locks
    /// the directory, so two processes can never own one journal.
    pub fn open(dir: &Path) -> Result<Arc<SledJournal>, JournalError> {
        SledJournal::open_with(dir, JournalOptions::default())
    }

    /// [`SledJournal::open`] with `options` (a smaller log segment: `dropline serve
    /// --journal-segment-bytes`).
    pub fn open_with(dir: &Path, options: JournalOptions) -> Result<Arc<SledJournal>, JournalError> {
        let log_storage: Arc<dyn Storage> =
            Arc::new(FsStorage::open(&dir.join("log")).map_err(|e| JournalError::Io(format!("write-ahead log: {e}")))?);
        SledJournal::open_on(dir, log_storage, options)
    }

    /// Opens the journal with its write-ahead log on `log_storage`, in segments of
    /// `segment_bytes` (a simulated disk and small segments in fault tests; `open` uses the
    /// file system under `dir` and [`LOG_SEGMENT_BYTES`]).
    pub fn open_with_log(
        dir: &Path,
        log_storage: Arc<dyn Storage>,
        segment_bytes: u64,
    ) -> Result<Arc<SledJournal>, JournalError> {
        SledJournal::open_on(
            dir,
            log_storage,
            JournalOptions {
                segment_bytes,
                ..JournalOptions::default()
            },
        )
    }

    /// Opens the journal with its write-ahead log on `log_storage` and `options`.
    pub fn open_on(
        dir: &Path,
        log_storage: Arc<dyn Storage>,
        options: JournalOptions,
    ) -> Result<Arc<SledJournal>, JournalError> {
        let JournalOptions {
            segment_bytes,
            queue_max,
        } = options;
        let store = Store::open(&dir.join("journal"))?;
        // What sled may have lost since its last checkpoint comes back from the log.
        let from = store.checkpoint()?;
        info!(dir = %dir.display(), "journal recovering: replaying the write-ahead log into sled");
        let mut replayed = 0usize;
        let mut replay_error = None;
        let log = Log::open_from(log_storage.clone(), segment_bytes, from, |position, record| {
            if replay_error.is_none() {
                match store.apply_record(record, position, "write-ahead log") {
                    Ok(()) => replayed += 1,
                    Err(e) => replay_error = Some(e),
                }
            }
        })
        .map_err(|e| JournalError::Io(format!("write-ahead log: {e}")))?;
        if let Some(e) = replay_error {
            return Err(e);
        }
        let log_reader = log.reader();
        let overlay = Arc::new(Overlay::default());
        // The vault's own log: small, and emptied at each checkpoint, so a salt or a sealed
        // address does not outlive its shredding in the event log, which is kept.
        let mut vault_replayed = 0usize;
        let vault_log = Log::open_named(
            log_storage.clone(),
            VAULT_LOG_PREFIX,
            segment_bytes.min(VAULT_LOG_SEGMENT_BYTES),
            None,
            |position, record| {
                if replay_error.is_none() {
                    match store.apply_record(record, position, "address vault log") {
                        Ok(()) => vault_replayed += 1,
                        Err(e) => replay_error = Some(e),
                    }
                }
            },
        )
        .map_err(|e| JournalError::Io(format!("address vault log: {e}")))?;
        if let Some(e) = replay_error {
            return Err(e);
        }
        let replayed = replayed + vault_replayed;
        let (tx, rx) = mpsc::channel(queue_max.max(1));
        let stats = Arc::new(WriterStats::default());
        let telemetry = Arc::new(JournalStats::new("log"));
        let store = Arc::new(store);
        let shared = Arc::new(Shared {
            store: std::sync::RwLock::new(Some(store.clone())),
            condition: std::sync::Mutex::new(Condition::Writing),
            refusing: Default::default(),
            sled_out_of_space: Default::default(),
            closing: Default::default(),
        });
        let mut writer = Writer {
            store: Some(store),
            shared: shared.clone(),
            rx,
            stats: stats.clone(),
            telemetry: telemetry.clone(),
            log,
            sled_dir: dir.join("journal"),
            checkpointed: std::time::Instant::now(),
            checkpointed_segment: from.map_or(0, |c| c.segment),
            written: false,
            vault_log,
            vault_written: vault_replayed > 0,
            payload: Vec::new(),
            vault_payload: Vec::new(),
            chunks: Vec::new(),
            overlay: overlay.clone(),
            recovery: Recovery::default(),
        };
        // Everything replayed is in sled now: make that durable, and the log can start over.
        // With nothing replayed there is nothing to make durable (a clean shutdown already
        // checkpointed): no fsync of every sled file at each start.
        if replayed > 0 {
            match writer.checkpoint() {
                Ok(()) => {}
                // Started on a full disk: reads are served, writes refused until space is
                // freed (the writer retries as it would after any write).
                Err(JournalError::NoSpace(cause)) => warn!(%cause, "journal opened on a full disk"),
                Err(e) => return Err(e),
            }
        }
        let writer = std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| JournalError::Io(e.to_string()))?;
        // An idle writer waits for appends: a barrier now and then lets it checkpoint on
        // time, and, while writes are refused, try again on time. The ticker ends with the
        // journal.
        let ticks = tx.downgrade();
        // Weak: a dropped journal's sled is closed (its lock released) without waiting for
        // the ticker.
        let ticker_shared = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("journal-ticker".into())
            .spawn(move || {
                let mut last = std::time::Instant::now();
                loop {
                    std::thread::sleep(std::time::Duration::from_millis(JOURNAL_RETRY_FIRST_MS));
                    let Some(shared) = ticker_shared.upgrade() else { return };
                    let due = last.elapsed() >= std::time::Duration::from_millis(LOG_CHECKPOINT_INTERVAL_MS / 4);
                    let refusing = shared.refusing();
                    drop(shared);
                    if !due && !refusing {
                        continue;
                    }
                    last = std::time::Instant::now();
                    let Some(tx) = ticks.upgrade() else { return };
                    let _ = tx.try_send(Request {
                        batch: AppendBatch::default(),
                        vault: Vec::new(),
                        vault_store: None,
                        done: Box::new(|_| {}),
                    });
                }
            })
            .map_err(|e| JournalError::Io(e.to_string()))?;
        info!(dir = %dir.display(), replayed, "journal opened");
        Ok(Arc::new(SledJournal {
            shared,
            vault_order: std::sync::Mutex::new(()),
            tx,
            queue_max: queue_max.max(1),
            stats,
            telemetry,
            log_storage,
            log_reader,
            overlay,
            writer: std::sync::Mutex::new(Some(writer)),
        }))
    }

    /// Stops the journal: appends queued before this call are written and answered, the
    /// log is checkpointed into sled, and the writer thread has ended when this returns;
    /// later appends fail (`Closed`). For a clean shutdown, and before a temporary data
    /// directory is removed. Blocks: call it off the async workers.
    pub fn close(&self) {
        let Some(writer) = self.writer.lock().expect("writer lock").take() else {
            return;
        };
        self.shared.closing.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes an idle writer; with a full queue it wakes anyway once a slot frees.
        let _ = self.tx.blocking_send(Request {
            batch: AppendBatch::default(),
            vault: Vec::new(),
            vault_store: None,
            done: Box::new(|_| {}),
        });
        if writer.join().is_err() {
            error!("the journal writer panicked");
        }
    }

    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// What the write-ahead log's storage did (its `fdatasync`s above all).
    pub fn log_stats(&self) -> &StorageStats {
        self.log_storage.stats()
    }

    /// Bytes used on disk: sled's and the log's (its segments are preallocated).
    pub fn size_on_disk(&self) -> u64 {
        let sled = self
            .shared
            .store()
            .map_or(0, |store| store.db.size_on_disk().unwrap_or(0));
        sled + self.log_reader.bytes_on_disk()
    }

    fn read_events(&self, stream: &str, after: u64) -> Result<Vec<(u64, Vec<u8>)>, JournalError> {
        let io = |e: sled::Error| JournalError::Io(e.to_string());
        let store = self.shared.store()?;
        let prefix = event_key(stream, 0);
        let prefix = &prefix[..prefix.len() - 8];
        let end = [prefix, &[0xff; 9]].concat();
        let wanted = after.saturating_add(1);
        // The chunk holding `wanted` starts at or before it: begin there (in the overlay or
        // in sled, whichever has the later one).
        let upto = event_key(stream, wanted);
        let in_overlay = self
            .overlay
            .range(&event_key(stream, 0), &end)
            .into_iter()
            .map(|(k, _)| k)
            .take_while(|k| *k <= upto)
            .last();
        let in_sled = match store.tree.range(event_key(stream, 0)..=upto.clone()).next_back() {
            Some(item) => Some(item.map_err(io)?.0.to_vec()),
            None => None,
        };
        let start = in_overlay.max(in_sled).unwrap_or(upto);
        let mut events: Vec<(u64, Vec<u8>)> = Vec::new();
        for (key, value) in merged_range(&self.overlay, &store.tree, &start, &end)? {
            if !key.starts_with(prefix) || key.len() != prefix.len() + 8 {
                break;
            }
            let first = u64::from_be_bytes(key[key.len() - 8..].try_into().expect("8-byte suffix"));
            let in_log;
            let chunk: &[u8] = match EventPointer::decode(&value) {
                Some(at) => {
                    in_log = self
                        .log_reader
                        .read_at(at.segment, at.offset, at.len as usize)
                        .map_err(|e| JournalError::Io(format!("{stream}: chunk at {first}: {e}")))?;
                    if crc32c::crc32c(&in_log) != at.crc {
                        return Err(JournalError::Corrupt(format!(
                            "{stream}: chunk at {first}: its bytes in the log fail their CRC"
                        )));
                    }
                    &in_log
                }
                None => &value,
            };
            for (offset, event) in decode_chunk(chunk)
                .map_err(|e| JournalError::Corrupt(format!("{stream}: chunk at {first}: {e}")))?
                .into_iter()
                .enumerate()
            {
                // Versions come from stored keys: past `u64::MAX` is corruption, not a wrap.
                let past_the_last =
                    || JournalError::Corrupt(format!("{stream}: chunk at {first}: versions past the last one"));
                let version = first.checked_add(offset as u64).ok_or_else(past_the_last)?;
                if version <= after {
                    continue;
                }
                let expected = match events.last() {
                    Some((last, _)) => last.checked_add(1).ok_or_else(past_the_last)?,
                    None => wanted,
                };
                if version != expected {
                    return Err(JournalError::Corrupt(format!(
                        "{stream}: version {version} where {expected} was expected"
                    )));
                }
                events.push((version, event.to_vec()));
            }
        }
        Ok(events)
    }
}

/// A chunk is consecutive events of one stream, each as a 4-byte little-endian length and
/// its bytes. The writer packs everything one stream appended in a group commit into one
/// chunk of the log record: one pointer in sled per stream per commit instead of one key per
/// event.
fn decode_chunk(mut bytes: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut events = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 4 {
            return Err("truncated length".into());
        }
        let len = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
        let end = 4 + len;
        if bytes.len() < end {
            return Err("truncated event".into());
        }
        events.push(&bytes[4..end]);
        bytes = &bytes[end..];
    }
    Ok(events)
}

struct SledPermit {
    permit: mpsc::OwnedPermit<Request>,
}

impl AppendPermit for SledPermit {
    fn append(self: Box<Self>, batch: AppendBatch, done: Completion) {
        self.permit.send(Request {
            batch,
            vault: Vec::new(),
            vault_store: None,
            done,
        });
    }
}

impl Journal for SledJournal {
    fn keeps_audit(&self) -> bool {
        true
    }

    fn close(&self) {
        SledJournal::close(self);
    }

    fn figures(&self) -> Option<JournalFigures> {
        let storage = self.log_storage.stats();
        Some(JournalFigures {
            kind: self.telemetry.kind,
            appends_per_write: self.telemetry.appends_per_write.snapshot(),
            write_latency_us: self.telemetry.write_latency_us.snapshot(),
            queue_depth: self.queue_max.saturating_sub(self.tx.capacity()) as u64,
            queue_capacity: self.queue_max as u64,
            syncs: Some(storage.syncs()),
            bytes_written: Some(storage.bytes_written.load(std::sync::atomic::Ordering::Relaxed)),
        })
    }

    fn try_reserve(&self) -> Result<Box<dyn AppendPermit>, JournalError> {
        match self.tx.clone().try_reserve_owned() {
            Ok(permit) => Ok(Box::new(SledPermit { permit })),
            Err(mpsc::error::TrySendError::Full(_)) => Err(JournalError::Full),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(JournalError::Closed),
        }
    }

    fn load(&self, stream: &str) -> BoxFuture<'_, Result<Recovered, JournalError>> {
        let stream = stream.to_string();
        Box::pin(async move {
            // A snapshot in parts is tagged with its version; a legacy whole value (tag 0)
            // starts with it.
            let store = self.shared.store()?;
            let snapshot = match sled_parts::get(&store.tree, &snapshot_keys(&stream))
                .map_err(|e| JournalError::Corrupt(format!("{stream}: snapshot: {e}")))?
            {
                Some((0, mut value)) if value.len() >= 8 => {
                    let version = u64::from_be_bytes(value[..8].try_into().expect("8 bytes"));
                    value.drain(..8);
                    Some((version, value))
                }
                Some((0, _)) => return Err(JournalError::Corrupt(format!("{stream}: short snapshot"))),
                Some((version, state)) => Some((version, state)),
                None => None,
            };
            let after = snapshot.as_ref().map_or(0, |(v, _)| *v);
            let events = self.read_events(&stream, after)?;
            if let Some((first, _)) = events.first() {
                if *first != after + 1 {
                    return Err(JournalError::Corrupt(format!(
                        "{stream}: events start at {first}, snapshot at {after}"
                    )));
                }
            }
            Ok(Recovered { snapshot, events })
        })
    }

    fn failure(&self) -> Option<String> {
        match self.shared.condition() {
            Condition::Broken(why) => Some(why),
            _ => None,
        }
    }

    fn write_refusal(&self) -> Option<JournalError> {
        self.shared.refusal()
    }

    fn wakeups(&self) -> Result<Vec<(String, i64)>, JournalError> {
        let store = self.shared.store()?;
        let mut wakeups = Vec::new();
        for (key, value) in merged_range(&self.overlay, &store.tree, b"w/", b"w0")? {
            let stream = String::from_utf8(key[2..].to_vec())
                .map_err(|_| JournalError::Corrupt("wake-up key is not UTF-8".into()))?;
            let at = <[u8; 8]>::try_from(value.as_slice())
                .map_err(|_| JournalError::Corrupt(format!("{stream}: wake-up is not 8 bytes")))?;
            wakeups.push((stream, i64::from_be_bytes(at)));
        }
        Ok(wakeups)
    }

    fn load_all(&self, stream: &str) -> BoxFuture<'_, Result<Vec<(u64, Vec<u8>)>, JournalError>> {
        let stream = stream.to_string();
        Box::pin(async move { self.read_events(&stream, 0) })
    }

    fn streams<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<String>, JournalError>> {
        Box::pin(async move { self.streams_now(prefix, after, limit) })
    }
}

impl SledJournal {
    fn streams_now(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<String>, JournalError> {
        let io = |e: sled::Error| JournalError::Io(e.to_string());
        let store = self.shared.store()?;
        let key_prefix = [b"e/".as_slice(), prefix.as_bytes()].concat();
        // Event keys are `e/<stream>\0<version>`: after a stream's first key, skip past all
        // of its keys (`e/<stream>\x01`) instead of reading them.
        let skip = |stream: &str| [b"e/".as_slice(), stream.as_bytes(), &[1u8]].concat();
        let mut from = match after {
            Some(after) => skip(after),
            None => key_prefix.clone(),
        };
        let mut out = Vec::new();
        while out.len() < limit {
            // Event keys are never removed: the first in the overlay or in sled.
            let in_overlay = {
                let changes = self.overlay.changes.read().expect("overlay lock");
                changes.range(from.clone()..).next().map(|(k, _)| k.clone())
            };
            let in_sled = match store.tree.range(from.clone()..).next() {
                Some(item) => Some(item.map_err(io)?.0.to_vec()),
                None => None,
            };
            let Some(key) = [in_overlay, in_sled].into_iter().flatten().min() else {
                break;
            };
            if !key.starts_with(&key_prefix) {
                break;
            }
            let end = key[2..]
                .iter()
                .position(|b| *b == 0)
                .ok_or_else(|| JournalError::Corrupt("event key without a version".into()))?;
            let stream = String::from_utf8(key[2..2 + end].to_vec())
                .map_err(|_| JournalError::Corrupt("stream name is not UTF-8".into()))?;
            from = skip(&stream);
            out.push(stream);
        }
        Ok(out)
    }
}

struct Writer {
    /// sled's handles (shared with readers through `shared`); `None` while reopening sled
    /// failed.
    store: Option<Arc<Store>>,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Request>,
    stats: Arc<WriterStats>,
    telemetry: Arc<JournalStats>,
    log: Log,
    /// sled's directory, whose files a checkpoint `fsync`s.
    sled_dir: std::path::PathBuf,
    /// When the last checkpoint was, in which segment, and whether anything was logged since.
    checkpointed: std::time::Instant,
    checkpointed_segment: u64,
    written: bool,
    /// The address vault's changes: a log of their own, whose segments a checkpoint removes
    /// (the event log's are kept); whether it holds records since its last checkpoint.
    vault_log: Log,
    vault_written: bool,
    vault_payload: Vec<u8>,
    /// The streams tree's changes not applied to sled yet (shared with readers).
    overlay: Arc<Overlay>,
    /// The record being built, and where its chunks of events are in it (event key, start,
    /// length): kept from one group commit to the next, so a commit allocates nothing.
    payload: Vec<u8>,
    chunks: Vec<(Vec<u8>, usize, usize)>,
    /// What must succeed again before writes resume, while the disk is full.
    recovery: Recovery,
}

/// While the journal is out of space: what failed, and when to try again.
#[derive(Default)]
struct Recovery {
    /// sled failed a write: it is reopened (its errors are sticky) and the log replayed
    /// into it.
    sled: bool,
    /// The largest record that found no room in the event log and in the vault's log: the
    /// retry makes room for it (a new segment, where a full disk shows first).
    log_room: usize,
    vault_room: usize,
    /// The next attempt, and the wait after it if it fails too.
    next_at: Option<std::time::Instant>,
    backoff_ms: u64,
}

/// A log record holds changes: `count: u32`, then per change `tree: u8, len: u32, key, tag:
/// u8` (1: insert, followed by `len: u32, value`; 0: remove). `Record` writes one into a
/// reused buffer.
struct Record<'a> {
    out: &'a mut Vec<u8>,
    count: u32,
}

impl<'a> Record<'a> {
    fn new(out: &'a mut Vec<u8>) -> Record<'a> {
        out.clear();
        out.extend_from_slice(&0u32.to_le_bytes());
        Record { out, count: 0 }
    }

    fn key(&mut self, tree: u8, key: &[u8]) {
        self.count += 1;
        self.out.push(tree);
        self.out.extend_from_slice(&(key.len() as u32).to_le_bytes());
        self.out.extend_from_slice(key);
    }

    fn change(&mut self, tree: u8, key: &[u8], value: Option<&[u8]>) {
        self.key(tree, key);
        match value {
            Some(value) => {
                self.out.push(1);
                self.out.extend_from_slice(&(value.len() as u32).to_le_bytes());
                self.out.extend_from_slice(value);
            }
            None => self.out.push(0),
        }
    }

    /// Starts an insert whose value the caller appends; returns where the value starts.
    fn open_value(&mut self, tree: u8, key: &[u8]) -> usize {
        self.key(tree, key);
        self.out.push(1);
        self.out.extend_from_slice(&0u32.to_le_bytes());
        self.out.len()
    }

    /// Ends the value started at `start`; returns its length.
    fn close_value(&mut self, start: usize) -> usize {
        let len = self.out.len() - start;
        self.out[start - 4..start].copy_from_slice(&(len as u32).to_le_bytes());
        len
    }

    fn finish(self) -> u32 {
        self.out[..4].copy_from_slice(&self.count.to_le_bytes());
        self.count
    }
}

/// A record's changes as one sled batch per tree tag; a chunk of events becomes a pointer
/// to where it is in the record at `position`. Never panics on bad bytes: they are an error.
fn decode_ops(record: &[u8], position: Position) -> Result<[sled::Batch; 6], String> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if bytes.len() < n {
            return Err("record ends early".into());
        }
        let (head, rest) = bytes.split_at(n);
        *bytes = rest;
        Ok(head)
    }
    fn len(bytes: &mut &[u8]) -> Result<usize, String> {
        Ok(u32::from_le_bytes(take(bytes, 4)?.try_into().expect("4 bytes")) as usize)
    }
    let mut bytes = record;
    let mut batches: [sled::Batch; 6] = Default::default();
    let count = len(&mut bytes)?;
    for _ in 0..count {
        let tree = take(&mut bytes, 1)?[0];
        let key_len = len(&mut bytes)?;
        let key = take(&mut bytes, key_len)?.to_vec();
        let value = match take(&mut bytes, 1)?[0] {
            1 => {
                let value_len = len(&mut bytes)?;
                let start = record.len() - bytes.len();
                let value = take(&mut bytes, value_len)?;
                Some((start, value))
            }
            0 => None,
            tag => return Err(format!("unknown change tag {tag}")),
        };
        match (tree, value) {
            (TREE_EVENTS, Some((start, value))) => {
                let at = EventPointer::into_record(position, record, start, value.len());
                batches[TREE_STREAMS as usize].insert(key, at.encode().as_slice());
            }
            (TREE_EVENTS, None) => return Err("a chunk of events removed".into()),
            (tree, value) => {
                let batch = batches
                    .get_mut(tree as usize)
                    .filter(|_| tree != TREE_EVENTS)
                    .ok_or_else(|| format!("unknown tree tag {tree}"))?;
                match value {
                    Some((_, value)) => batch.insert(key, value),
                    None => batch.remove(key),
                }
            }
        }
    }
    if !bytes.is_empty() {
        return Err("bytes after the last change".into());
    }
    Ok(batches)
}

/// `fsync`s every file sled keeps under `dir` (its segments, snapshot and configuration,
/// blobs) and the directories: after `flush`, what sled holds is then durable.
fn fsync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            fsync_tree(&entry.path())?;
        } else if kind.is_file() {
            std::fs::File::open(entry.path())?.sync_all()?;
        }
    }
    std::fs::File::open(dir)?.sync_all()
}

/// Snapshots being written, oldest first: a slice of the first is applied between batches of
/// appends, so no buyer waits behind a big snapshot. A newer snapshot of a stream replaces
/// its queued one if that has not started, else waits behind it.
#[derive(Default)]
struct SnapshotWrites {
    queue: VecDeque<(String, PartsWrite)>,
    /// Queued writes per stream.
    streams: HashMap<String, usize>,
    bytes: usize,
}

impl SnapshotWrites {
    /// Queues a snapshot whose events are written.
    fn push(&mut self, stream: String, write: PartsWrite) {
        if self.streams.contains_key(&stream) {
            if let Some(slot) = self.queue.iter_mut().find(|(s, w)| *s == stream && !w.started()) {
                self.bytes = self.bytes - slot.1.bytes() + write.bytes();
                slot.1 = write;
                return;
            }
        }
        if !self.queue.is_empty() && self.bytes + write.bytes() > SNAPSHOT_QUEUE_BYTES_MAX {
            // Only the replay after a restart gets longer; the actor snapshots again later.
            warn!(%stream, bytes = write.bytes(), "snapshot dropped: the snapshot queue is full");
            return;
        }
        self.bytes += write.bytes();
        *self.streams.entry(stream.clone()).or_default() += 1;
        self.queue.push_back((stream, write));
    }

    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Drops every queued write (sled is being reopened, or writes are refused): the streams
    /// replay from their previous snapshots, and their actors snapshot again later.
    fn clear(&mut self) {
        *self = SnapshotWrites::default();
    }

    /// Applies one slice of the oldest snapshot write; a failed one is dropped, and its
    /// error returned.
    fn step(&mut self, tree: &sled::Tree) -> Result<(), sled::Error> {
        let Some((stream, write)) = self.queue.front_mut() else {
            return Ok(());
        };
        let before = write.bytes();
        let mut failed = None;
        let finished = match write.step(tree, SNAPSHOT_SLICE_PARTS) {
            Ok(finished) => finished,
            Err(e) => {
                error!(%stream, error = %e, "snapshot write failed; the stream replays from its previous snapshot");
                failed = Some(e);
                true
            }
        };
        self.bytes -= before - write.bytes();
        if finished {
            if let Some((stream, write)) = self.queue.pop_front() {
                self.bytes -= write.bytes();
                if let Some(count) = self.streams.get_mut(&stream) {
                    *count -= 1;
                    if *count == 0 {
                        self.streams.remove(&stream);
                    }
                }
            }
            // The byte and per-stream counts follow the queue exactly (the byte bound is
            // checked against them): nothing queued, nothing counted.
            debug_assert!(!self.queue.is_empty() || (self.bytes == 0 && self.streams.is_empty()));
        }
        failed.map_or(Ok(()), Err)
    }
}

/// Which of the writer's two logs.
#[derive(Debug, Clone, Copy)]
enum Which {
    Events,
    Vault,
}

/// Free bytes for an unprivileged writer in the file system holding `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(dir)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// What needs sled while reopening it failed.
fn sled_closed() -> JournalError {
    JournalError::NoSpace("sled is closed until the disk has space again".into())
}

/// Whether a request changes anything (a barrier does not).
fn changes(request: &Request) -> bool {
    let batch = &request.batch;
    !batch.events.is_empty()
        || batch.wakeup.is_some()
        || batch.snapshot.is_some()
        || !batch.audit.is_empty()
        || !request.vault.is_empty()
}

impl Writer {
    fn run(mut self) {
        let mut pending = Vec::with_capacity(JOURNAL_BATCH_MAX);
        let mut snapshots = SnapshotWrites::default();
        let mut failed = HashMap::new();
        let mut open = true;
        while open || !snapshots.is_empty() {
            // Wait for appends only with no snapshot to write meanwhile.
            if open && snapshots.is_empty() {
                match self.rx.blocking_recv() {
                    Some(request) => pending.push(request),
                    None => open = false,
                }
            }
            while open && pending.len() < JOURNAL_BATCH_MAX {
                match self.rx.try_recv() {
                    Ok(request) => pending.push(request),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            // Closing: once what was queued before the close is taken, take nothing more.
            if open && self.shared.closing.load(std::sync::atomic::Ordering::SeqCst) && self.rx.is_empty() {
                open = false;
            }
            if self
                .shared
                .sled_out_of_space
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                self.sled_failed(JournalError::NoSpace(
                    "sled: an address vault or audit trail write found no space".into(),
                ));
            }
            // Before this batch: should space be back, it is written.
            if self.recovery.next_at.is_some_and(|at| std::time::Instant::now() >= at) {
                self.try_resume(&mut snapshots);
            }
            if !pending.is_empty() {
                self.write_pending(&mut pending, &mut snapshots, &mut failed);
            }
            if self.shared.refusing() {
                // Nothing more goes to sled until writes resume.
                snapshots.clear();
                continue;
            }
            if let Some(store) = self.store.clone() {
                if let Err(e) = snapshots.step(&store.tree) {
                    self.sled_failed(sled_error(e));
                    continue;
                }
            }
            // A new segment since the last checkpoint, or a record older than the interval:
            // sled takes over what the log holds, and a restart replays less.
            let due = self.written
                && self.checkpointed.elapsed() >= std::time::Duration::from_millis(LOG_CHECKPOINT_INTERVAL_MS);
            if self.log.checkpoint().segment > self.checkpointed_segment || due {
                if let Err(e) = self.checkpoint() {
                    error!(error = %e, "journal checkpoint failed; the next start replays more of the log");
                }
            }
        }
        if !self.shared.refusing() {
            match self.checkpoint() {
                Ok(()) => {}
                // A temporary data directory (the demo's, a test's) removed as the journal closed.
                Err(_) if !self.sled_dir.exists() => {}
                Err(e) => {
                    warn!(error = %e, "journal checkpoint at shutdown failed; the log is replayed at the next start")
                }
            }
        }
    }

    /// Stops acknowledging anything until a restart: what the failed write left on the disk
    /// is known only after a recovery. Reads are still served.
    fn break_down(&mut self, why: String) {
        if !matches!(self.shared.condition(), Condition::Broken(_)) {
            error!(error = %why, "journal storage failed: every write is refused until a restart (reads are served)");
            self.shared.set_condition(Condition::Broken(why));
        }
        self.recovery = Recovery::default();
    }

    /// Refuses writes until space is back; the writer tries again after a bounded back-off.
    fn out_of_space(&mut self, cause: String) {
        let now = std::time::Instant::now();
        match self.shared.condition() {
            Condition::Broken(_) => {}
            Condition::Full { since, .. } => self.shared.set_condition(Condition::Full { cause, since }),
            Condition::Writing => {
                error!(
                    error = %cause,
                    retry_ms_max = JOURNAL_RETRY_MAX_MS,
                    "journal disk is full: writes are refused and reads served until space is freed"
                );
                self.shared.set_condition(Condition::Full { cause, since: now });
                self.recovery.backoff_ms = JOURNAL_RETRY_FIRST_MS;
                self.recovery.next_at = Some(now + std::time::Duration::from_millis(JOURNAL_RETRY_FIRST_MS));
            }
        }
    }

    /// A failed append, write or sync of one of the logs: out of space, the log forgets what
    /// was not synced (it is written again, whole, when writes resume) and writes are
    /// refused until then; any other error breaks the journal.
    fn log_failed(&mut self, which: Which, error: std::io::Error, room: usize) -> JournalError {
        let what = match which {
            Which::Events => "write-ahead log",
            Which::Vault => "address vault log",
        };
        let cause = format!("{what}: {error}");
        if !is_out_of_space(&error) {
            // After a failed `fdatasync` the kernel may have dropped the pages it could not
            // write and marked them clean: a later sync would succeed without them. Only a
            // recovery, reading what is on the disk, knows what survived.
            self.break_down(cause.clone());
            return JournalError::Io(cause);
        }
        match which {
            Which::Events => {
                self.log.rewind();
                self.recovery.log_room = self.recovery.log_room.max(room);
            }
            Which::Vault => {
                self.vault_log.rewind();
                self.recovery.vault_room = self.recovery.vault_room.max(room);
            }
        }
        self.out_of_space(cause.clone());
        JournalError::NoSpace(cause)
    }

    /// A failed sled write: out of space, sled is reopened once space is back (its errors
    /// are sticky) and writes are refused until then; any other error breaks the journal.
    fn sled_failed(&mut self, error: JournalError) -> JournalError {
        match &error {
            JournalError::NoSpace(cause) => {
                self.recovery.sled = true;
                self.out_of_space(cause.clone());
            }
            other => self.break_down(other.to_string()),
        }
        error
    }

    /// Tries what failed again; on success, writes resume.
    fn try_resume(&mut self, snapshots: &mut SnapshotWrites) {
        match self.resume(snapshots) {
            Ok(()) => {
                if let Condition::Full { since, .. } = self.shared.condition() {
                    info!(
                        refused_ms = since.elapsed().as_millis() as u64,
                        "journal disk has space again: writes resumed"
                    );
                }
                self.recovery = Recovery::default();
                self.shared.set_condition(Condition::Writing);
            }
            Err(JournalError::NoSpace(cause)) => {
                self.recovery.backoff_ms =
                    (self.recovery.backoff_ms * 2).clamp(JOURNAL_RETRY_FIRST_MS, JOURNAL_RETRY_MAX_MS);
                self.recovery.next_at =
                    Some(std::time::Instant::now() + std::time::Duration::from_millis(self.recovery.backoff_ms));
                debug!(cause = %cause, retry_ms = self.recovery.backoff_ms, "journal disk still full");
            }
            Err(e) => self.break_down(e.to_string()),
        }
    }

    /// sled reopened if it failed, room made in both logs for what found none, their
    /// records written and synced, and a checkpoint (sled flushed, its files synced): each
    /// step writes, so each proves there is space again.
    fn resume(&mut self, snapshots: &mut SnapshotWrites) -> Result<(), JournalError> {
        if self.recovery.sled || self.store.is_none() {
            snapshots.clear();
            self.reopen_sled()?;
        }
        let room = self.recovery.log_room;
        if let Err(e) = self.log.make_room(room).and_then(|_| self.log.sync()) {
            return Err(self.log_failed(Which::Events, e, room));
        }
        let room = self.recovery.vault_room;
        if let Err(e) = self.vault_log.make_room(room).and_then(|_| self.vault_log.sync()) {
            return Err(self.log_failed(Which::Vault, e, room));
        }
        self.checkpoint()
    }

    /// Closes sled and opens it again, then applies every synced record of both logs since
    /// the checkpoint it holds (what it lost with the failed write comes back from there),
    /// and empties the overlay, which those records cover. Readers get a retryable error
    /// meanwhile. Only with space free: closing gives up the reads sled still serves.
    fn reopen_sled(&mut self) -> Result<(), JournalError> {
        let free = free_bytes(&self.sled_dir).map_err(|e| JournalError::NoSpace(format!("sled: free space: {e}")))?;
        if free < SLED_REOPEN_FREE_BYTES_MIN {
            return Err(JournalError::NoSpace(format!(
                "sled: {free} bytes free, {SLED_REOPEN_FREE_BYTES_MIN} needed to reopen it"
            )));
        }
        warn!(free_bytes = free, "reopening sled after it ran out of space");
        let mut shared = self.shared.store.write().expect("journal store lock");
        *shared = None;
        self.store = None;
        // A reader that took the old handles just before lets go of sled's lock within
        // moments.
        let mut attempts = 0;
        let store = loop {
            match Store::open(&self.sled_dir) {
                Err(JournalError::Io(e)) if e.contains("lock") && attempts < 100 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                // Still held: tried again at the next retry (reads wait for sled meanwhile).
                Err(JournalError::Io(e)) if e.contains("lock") => return Err(JournalError::NoSpace(e)),
                other => break other?,
            }
        };
        let from = store.checkpoint()?;
        let replayed = store.replay(&self.log, from, "write-ahead log")?
            + store.replay(&self.vault_log, None, "address vault log")?;
        self.overlay.changes.write().expect("overlay lock").clear();
        let store = Arc::new(store);
        *shared = Some(store.clone());
        self.store = Some(store);
        drop(shared);
        self.recovery.sled = false;
        info!(replayed, "sled reopened");
        Ok(())
    }

    fn store(&self) -> Result<Arc<Store>, JournalError> {
        self.store.clone().ok_or_else(sled_closed)
    }

    /// Applies the overlay to sled as one batch, then empties it (in that order: readers look
    /// in the overlay first).
    fn apply_overlay(&mut self) -> Result<(), JournalError> {
        let changes = self.overlay.changes.read().expect("overlay lock").clone();
        if changes.is_empty() {
            return Ok(());
        }
        let store = self.store()?;
        let mut batch = sled::Batch::default();
        for (key, value) in &changes {
            match value {
                Some(value) => batch.insert(key.as_slice(), value.as_slice()),
                None => batch.remove(key.as_slice()),
            }
        }
        if let Err(e) = store.tree.apply_batch(batch) {
            // The records are durable but sled lacks them: a checkpoint now would skip them.
            // Reopening sled (when space is back) or a restart replays them from the log.
            return Err(self.sled_failed(sled_error(e)));
        }
        // Only this thread writes the overlay: what was applied is all there is.
        self.overlay.changes.write().expect("overlay lock").clear();
        Ok(())
    }

    /// Makes everything sled holds durable (its flush, then `fsync` of its files) with the
    /// point of the log it holds everything before: the next start replays only what
    /// follows. Every record appended is synced and applied by now (`write` does both before
    /// it returns), so the log's end is that point.
    fn checkpoint(&mut self) -> Result<(), JournalError> {
        self.apply_overlay()?;
        // The vault's records move to a fresh segment first, so the older ones can go once
        // sled holds what they changed.
        if self.vault_written {
            if let Err(e) = self.vault_log.roll().and_then(|_| self.vault_log.sync()) {
                return Err(self.log_failed(Which::Vault, e, 0));
            }
        }
        let store = self.store()?;
        let at = self.log.checkpoint();
        let flushed = store
            .db
            .insert(LOG_CHECKPOINT_KEY, at.encode().as_slice())
            .and_then(|_| store.db.flush());
        if let Err(e) = flushed {
            return Err(self.sled_failed(sled_error(e)));
        }
        if let Err(e) = fsync_tree(&self.sled_dir) {
            if is_out_of_space(&e) {
                return Err(self.sled_failed(JournalError::NoSpace(format!("checkpoint: {e}"))));
            }
            return Err(JournalError::Io(format!("checkpoint: {e}")));
        }
        let last = *self.vault_log.segments().last().expect("the vault log has a segment");
        self.vault_log
            .remove_segments_before(last)
            .map_err(|e| JournalError::Io(format!("checkpoint: {e}")))?;
        self.checkpointed = std::time::Instant::now();
        self.checkpointed_segment = at.segment;
        self.written = false;
        self.vault_written = false;
        Ok(())
    }

    /// Writes a batch of appends, runs their completions, and queues their snapshots.
    ///
    /// `failed` keeps, for each stream whose write failed or was refused, the first version
    /// that is not durable and why: the actor is being killed, and whatever it sent
    /// meanwhile (events or a snapshot covering lost events) fails too, until its restart
    /// appends at that version. While writes are refused, requests that change anything are
    /// refused without any IO; barriers (reads, rejections) still complete.
    fn write_pending(
        &mut self,
        pending: &mut Vec<Request>,
        snapshots: &mut SnapshotWrites,
        failed: &mut HashMap<String, (u64, JournalError)>,
    ) {
        let refusal = self.shared.refusal();
        let mut items: Vec<(Request, Option<JournalError>)> = Vec::with_capacity(pending.len());
        for request in pending.drain(..) {
            let stream = &request.batch.stream;
            let first = request.batch.first_version;
            let mut verdict = match failed.get(stream) {
                Some((lost, why)) if first > *lost => Some(earlier_failed(stream, why)),
                Some(_) => {
                    failed.remove(stream);
                    None
                }
                None => None,
            };
            if verdict.is_none() && changes(&request) {
                if let Some(refusal) = &refusal {
                    failed.insert(stream.clone(), (first, refusal.clone()));
                    verdict = Some(refusal.clone());
                }
            }
            items.push((request, verdict));
        }
        // Snapshots are written after the batch holding the events they cover.
        let taken: Vec<(String, u64, Vec<u8>)> = items
            .iter_mut()
            .filter(|(_, verdict)| verdict.is_none())
            .filter_map(|(r, _)| {
                let (version, state) = r.batch.snapshot.take()?;
                Some((r.batch.stream.clone(), version, state))
            })
            .collect();
        let to_write: Vec<&Request> = items.iter().filter(|(_, v)| v.is_none()).map(|(r, _)| r).collect();
        let result = if to_write.is_empty() {
            Ok(())
        } else {
            self.write(&to_write)
        };
        match &result {
            Ok(()) => {
                for (stream, version, state) in taken {
                    match self
                        .store()
                        .and_then(|store| store.db.generate_id().map_err(sled_error))
                    {
                        Ok(generation) => snapshots.push(
                            stream.clone(),
                            PartsWrite::new(snapshot_keys(&stream), generation, version, state),
                        ),
                        Err(e) => error!(%stream, error = %e, "snapshot not written: no generation"),
                    }
                }
            }
            Err(e) => {
                error!(error = %e, appends = to_write.len(), "journal write failed");
                for request in &to_write {
                    let lost = failed
                        .entry(request.batch.stream.clone())
                        .or_insert((u64::MAX, e.clone()));
                    lost.0 = lost.0.min(request.batch.first_version);
                }
            }
        }
        drop(to_write);
        for (request, verdict) in items {
            (request.done)(verdict.map_or_else(|| result.clone(), Err));
        }
    }

    fn write(&mut self, pending: &[&Request]) -> Result<(), JournalError> {
        // `None` only while writes are refused, when requests that need sled are refused
        // before they get here.
        let store = self.store.clone();
        // Each stream's appends together, streams in first-seen order: a stream's events of
        // this commit are then one contiguous chunk of the record.
        let mut streams: Vec<(&str, Vec<&AppendBatch>)> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut vault = Record::new(&mut self.vault_payload);
        // Vault changes made in a sled that was reopened since: applied again below.
        let mut reapply = false;
        for request in pending {
            for (tree, key, value) in &request.vault {
                vault.change(*tree, key, value.as_deref());
            }
            if let Some(made_in) = &request.vault_store {
                reapply |= store
                    .as_ref()
                    .is_none_or(|store| !std::ptr::eq(made_in.as_ptr(), Arc::as_ptr(store)));
            }
        }
        if vault.finish() > 0 {
            // The vault's changes are in sled already; durable here before anything waits on
            // them (a put or a shred returns after this batch's completions).
            let room = self.vault_payload.len();
            let synced = self
                .vault_log
                .append(&self.vault_payload)
                .and_then(|at| self.vault_log.sync().map(|_| at));
            match synced {
                Ok(at) if reapply => {
                    // Made in the sled closed since (and possibly lost with it).
                    let applied = self
                        .store()
                        .and_then(|store| store.apply_record(&self.vault_payload, at, "address vault log"));
                    if let Err(e) = applied {
                        self.sled_failed(e);
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(self.log_failed(Which::Vault, e, room)),
            }
            self.vault_written = true;
            self.written = true;
        }
        let mut record = Record::new(&mut self.payload);
        let mut audit = sled::Batch::default();
        let mut audited = false;
        self.chunks.clear();
        for request in pending {
            let append = &request.batch;
            for write in &append.audit {
                let seq = match store.as_ref().map(|store| store.db.generate_id()) {
                    Some(Ok(seq)) => seq,
                    Some(Err(e)) => return Err(self.sled_failed(sled_error(e))),
                    None => return Err(sled_closed()),
                };
                for (kind, subject) in &write.subjects {
                    let key = audit_key(*kind, subject, seq);
                    record.change(TREE_AUDIT, &key, Some(&write.entry));
                    audit.insert(key, write.entry.as_slice());
                    audited = true;
                }
            }
            if append.events.is_empty() && append.wakeup.is_none() {
                // A barrier (the vault's changes, if any, are written above).
                continue;
            }
            let slot = *index.entry(append.stream.as_str()).or_insert_with(|| {
                streams.push((append.stream.as_str(), Vec::new()));
                streams.len() - 1
            });
            streams[slot].1.push(append);
        }
        for (stream, appends) in &streams {
            let mut next = appends[0].first_version;
            let mut chunk = None;
            for append in appends {
                // An actor hands over its batches in version order, each right after the
                // last (`Entity`), and a killed actor's later ones were refused above: a gap
                // or an overlap here would be written as a stream no reader can load again.
                assert_eq!(
                    append.first_version,
                    next,
                    "{stream}: an append at version {} follows version {} in one batch",
                    append.first_version,
                    next.wrapping_sub(1)
                );
                if !append.events.is_empty() && chunk.is_none() {
                    let key = event_key(stream, append.first_version);
                    chunk = Some((record.open_value(TREE_EVENTS, &key), key));
                }
                for event in &append.events {
                    record.out.extend_from_slice(&(event.len() as u32).to_le_bytes());
                    record.out.extend_from_slice(event);
                }
                next += append.events.len() as u64;
            }
            if let Some((start, key)) = chunk {
                let len = record.close_value(start);
                self.chunks.push((key, start, len));
            }
            // The stream's deadline as its last append left it.
            if let Some(wakeup) = appends.iter().rev().find_map(|a| a.wakeup) {
                let at = wakeup.map(i64::to_be_bytes);
                record.change(TREE_STREAMS, &wakeup_key(stream), at.as_ref().map(|a| a.as_slice()));
            }
        }
        let changes = record.finish();
        self.stats
            .appends
            .fetch_add(pending.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if changes == 0 {
            // Only barriers (reads, rejections): earlier batches are durable already.
            return Ok(());
        }
        // Durable first, in the log; then sled, which a restart brings up to date from it.
        let room = self.payload.len();
        let started = std::time::Instant::now();
        let synced = self
            .log
            .append(&self.payload)
            .and_then(|at| self.log.sync().map(|_| at));
        let elapsed = started.elapsed();
        let sync_ms = elapsed.as_millis() as u64;
        if sync_ms >= JOURNAL_SLOW_SYNC_MS {
            warn!(
                sync_ms,
                appends = pending.len(),
                "journal sync was slow; replies waited for it"
            );
        }
        let position = match synced {
            Ok(position) => position,
            Err(e) => return Err(self.log_failed(Which::Events, e, room)),
        };
        self.written = true;
        // The batch is durable from here on, and acknowledged whatever sled does: sled
        // failing to take it only means it gets it again from the log (reopened, or at the
        // next start).
        if audited {
            if let Err(e) = self
                .store()
                .and_then(|store| store.audit.apply_batch(audit).map_err(sled_error))
            {
                self.sled_failed(e);
            }
        }
        {
            let mut overlay = self.overlay.changes.write().expect("overlay lock");
            for (key, start, len) in self.chunks.drain(..) {
                let at = EventPointer::into_record(position, &self.payload, start, len);
                overlay.insert(key, Some(at.encode().to_vec()));
            }
            for (stream, appends) in &streams {
                if let Some(wakeup) = appends.iter().rev().find_map(|a| a.wakeup) {
                    overlay.insert(wakeup_key(stream), wakeup.map(|at| at.to_be_bytes().to_vec()));
                }
            }
        }
        if self.overlay.len() >= OVERLAY_MAX && !self.shared.refusing() {
            // A failure is sled's: the overlay keeps the changes meanwhile.
            let _ = self.apply_overlay();
        }
        self.stats.flushes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.telemetry.appends_per_write.observe(pending.len() as u64);
        self.telemetry.write_latency_us.observe_duration(elapsed);
        Ok(())
    }
}

/// Address vault trees: `addresses` holds each order's ciphertext, `address_keys` its salt
/// and shred time (40 bytes), and `address_shred` the same orders by shred time
/// (`<shred_at BE><order id>`), so the due ones are a range scan.
impl SledJournal {
    fn shred_key(at: i64, order_id: &str) -> Vec<u8> {
        [(at.max(0) as u64).to_be_bytes().as_slice(), order_id.as_bytes()].concat()
    }

    /// Queues changes the vault made in sled (`made_in`) for the log's next group commit;
    /// the receiver gets the result once they are `fdatasync`ed. Called with `vault_order`
    /// held.
    fn vault_log(
        &self,
        ops: Vec<Change>,
        made_in: &Arc<Store>,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<(), JournalError>>, JournalError> {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let permit = self.tx.clone().try_reserve_owned().map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => JournalError::Full,
            mpsc::error::TrySendError::Closed(_) => JournalError::Closed,
        })?;
        permit.send(Request {
            batch: AppendBatch::default(),
            vault: ops,
            vault_store: Some(Arc::downgrade(made_in)),
            done: Box::new(move |result| {
                let _ = done_tx.send(result);
            }),
        });
        Ok(done_rx)
    }

    /// The vault's changes for an order's stored address, as its records hold them.
    fn address_changes(order_id: &str, key_record: Vec<u8>, ciphertext: Vec<u8>, shred_at: i64) -> Vec<Change> {
        vec![
            (TREE_ADDRESS_KEYS, order_id.as_bytes().to_vec(), Some(key_record)),
            (TREE_ADDRESSES, order_id.as_bytes().to_vec(), Some(ciphertext)),
            (
                TREE_ADDRESS_SHRED,
                SledJournal::shred_key(shred_at, order_id),
                Some(Vec::new()),
            ),
        ]
    }
}

fn vault_tx_error(shared: &Shared, e: sled::transaction::TransactionError<()>) -> JournalError {
    match e {
        sled::transaction::TransactionError::Storage(e) => shared.sled_error(e),
        sled::transaction::TransactionError::Abort(()) => JournalError::Io("address vault: aborted".into()),
    }
}

impl AddressVault for SledJournal {
    fn put_new<'a>(
        &'a self,
        order_id: &'a str,
        sealed: &'a SealedAddress,
        shred_at: UnixMillis,
    ) -> BoxFuture<'a, Result<bool, JournalError>> {
        use sled::Transactional;
        Box::pin(async move {
            let mut key_record = sealed.salt.to_vec();
            key_record.extend_from_slice(&shred_at.0.to_be_bytes());
            let store = self.shared.store()?;
            let order = self.vault_order.lock().expect("vault order lock");
            // The stored address (a retry's), or ours, now stored.
            let stored = (&store.address_keys, &store.addresses, &store.address_shred)
                .transaction(|(keys, addresses, shred)| {
                    if let Some(existing) = keys.get(order_id.as_bytes())? {
                        let ciphertext = addresses.get(order_id.as_bytes())?;
                        return Ok(Some((existing.to_vec(), ciphertext.map(|c| c.to_vec()))));
                    }
                    keys.insert(order_id.as_bytes(), key_record.as_slice())?;
                    addresses.insert(order_id.as_bytes(), sealed.ciphertext.as_slice())?;
                    shred.insert(SledJournal::shred_key(shred_at.0, order_id), &[])?;
                    Ok(None)
                })
                .map_err(|e| vault_tx_error(&self.shared, e))?;
            let (ops, new) = match stored {
                None => (
                    SledJournal::address_changes(order_id, key_record.clone(), sealed.ciphertext.clone(), shred_at.0),
                    true,
                ),
                // Stored by an earlier call whose write to the log may have failed (its
                // caller was told so, and retries): logged again, so that what this call
                // answers is durable.
                Some((existing, Some(ciphertext))) if existing.len() == 40 => {
                    let at = i64::from_be_bytes(existing[32..40].try_into().expect("8 bytes"));
                    (SledJournal::address_changes(order_id, existing, ciphertext, at), false)
                }
                Some(_) => {
                    return Err(JournalError::Corrupt(format!(
                        "address of {order_id}: a key record without its ciphertext"
                    )))
                }
            };
            let durable = self.vault_log(ops, &store);
            drop(order);
            // Not held while waiting: the writer may be reopening sled meanwhile.
            drop(store);
            let written = match durable {
                Ok(done) => done.await.map_err(|_| JournalError::Closed).and_then(|r| r),
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                if let (true, Ok(store)) = (new, self.shared.store()) {
                    // Not durable: taken back, so a retry stores it again and waits for the
                    // log (best effort; should sled refuse, it is reopened from the logs,
                    // which do not hold it).
                    let _ = (&store.address_keys, &store.addresses, &store.address_shred).transaction(
                        |(keys, addresses, shred)| {
                            if keys.get(order_id.as_bytes())?.as_deref() == Some(key_record.as_slice()) {
                                keys.remove(order_id.as_bytes())?;
                                addresses.remove(order_id.as_bytes())?;
                                shred.remove(SledJournal::shred_key(shred_at.0, order_id))?;
                            }
                            Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
                        },
                    );
                }
                return Err(e);
            }
            Ok(new)
        })
    }

    fn get<'a>(&'a self, order_id: &'a str) -> BoxFuture<'a, Result<Option<SealedAddress>, JournalError>> {
        let io = |e: sled::Error| JournalError::Io(e.to_string());
        let read = (|| {
            let store = self.shared.store()?;
            let Some(key_record) = store.address_keys.get(order_id.as_bytes()).map_err(io)? else {
                return Ok(None);
            };
            let Some(ciphertext) = store.addresses.get(order_id.as_bytes()).map_err(io)? else {
                return Ok(None);
            };
            let salt = key_record
                .get(..32)
                .and_then(|s| <[u8; 32]>::try_from(s).ok())
                .ok_or_else(|| JournalError::Corrupt(format!("address key of {order_id} is too short")))?;
            Ok(Some(SealedAddress {
                salt,
                ciphertext: ciphertext.to_vec(),
            }))
        })();
        Box::pin(async move { read })
    }

    fn shred_by<'a>(&'a self, order_id: &'a str, at: UnixMillis) -> BoxFuture<'a, Result<(), JournalError>> {
        use sled::Transactional;
        Box::pin(async move {
            let store = self.shared.store()?;
            let order = self.vault_order.lock().expect("vault order lock");
            let changed = (&store.address_keys, &store.address_shred)
                .transaction(|(keys, shred)| {
                    let Some(record) = keys.get(order_id.as_bytes())? else {
                        return Ok(None);
                    };
                    if record.len() != 40 {
                        return Ok(None);
                    }
                    let current = i64::from_be_bytes(record[32..40].try_into().expect("8 bytes"));
                    if current <= at.0 {
                        return Ok(None);
                    }
                    let mut updated = record[..32].to_vec();
                    updated.extend_from_slice(&at.0.to_be_bytes());
                    keys.insert(order_id.as_bytes(), updated.clone())?;
                    shred.remove(SledJournal::shred_key(current, order_id))?;
                    shred.insert(SledJournal::shred_key(at.0, order_id), &[])?;
                    Ok(Some((updated, current)))
                })
                .map_err(|e| vault_tx_error(&self.shared, e))?;
            // Logged, not waited for: a shred time lost in a crash falls back to the
            // retention bound.
            if let Some((updated, current)) = changed {
                let queued = self.vault_log(
                    vec![
                        (TREE_ADDRESS_KEYS, order_id.as_bytes().to_vec(), Some(updated)),
                        (TREE_ADDRESS_SHRED, SledJournal::shred_key(current, order_id), None),
                        (
                            TREE_ADDRESS_SHRED,
                            SledJournal::shred_key(at.0, order_id),
                            Some(Vec::new()),
                        ),
                    ],
                    &store,
                );
                if let Err(e) = queued {
                    warn!(error = %e, "a shred time is not logged; it is made durable by the next checkpoint");
                }
            }
            drop(order);
            Ok(())
        })
    }

    fn shred_due(&self, now: UnixMillis, limit: usize) -> BoxFuture<'_, Result<usize, JournalError>> {
        use sled::Transactional;
        Box::pin(async move {
            let io = |e: sled::Error| JournalError::Io(e.to_string());
            let store = self.shared.store()?;
            let end = SledJournal::shred_key(now.0.saturating_add(1), "");
            let mut due = Vec::new();
            for item in store.address_shred.range(..end).take(limit) {
                due.push(item.map_err(io)?.0);
            }
            if due.is_empty() {
                return Ok(0);
            }
            let order = self.vault_order.lock().expect("vault order lock");
            let mut ops = Vec::with_capacity(3 * due.len());
            for index_key in &due {
                // A key too short to hold its time names no order: removing it is all there
                // is to do (it would otherwise come first in every pass).
                let order_id = index_key.get(8..).unwrap_or_default();
                (&store.address_keys, &store.addresses, &store.address_shred)
                    .transaction(|(keys, addresses, shred)| {
                        keys.remove(order_id)?;
                        addresses.remove(order_id)?;
                        shred.remove(index_key.as_ref())?;
                        Ok(())
                    })
                    .map_err(|e| vault_tx_error(&self.shared, e))?;
                ops.push((TREE_ADDRESS_KEYS, order_id.to_vec(), None));
                ops.push((TREE_ADDRESSES, order_id.to_vec(), None));
                ops.push((TREE_ADDRESS_SHRED, index_key.to_vec(), None));
            }
            let durable = self.vault_log(ops, &store);
            drop(order);
            // Not held while waiting: the writer may be reopening sled meanwhile.
            drop(store);
            durable?.await.map_err(|_| JournalError::Closed)??;
            Ok(due.len())
        })
    }
}

/// Audit keys: `<o|p>/<subject>\0<sequence BE>`, so one subject's entries are contiguous
/// and ordered; the sequence is sled's monotonic id generator (unique across restarts).
fn audit_key(kind: u8, subject: &str, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(subject.len() + 11);
    key.push(kind);
    key.push(b'/');
    key.extend_from_slice(subject.as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// Entries the actors cause are written with their events (`AppendBatch::audit`); this is
/// for the services' own (credential use): written to sled at once, and to the vault's log
/// with the next group commit, which the caller does not wait for.
impl AuditLog for SledJournal {
    fn append(&self, entry: &AuditEntry) -> Result<(), JournalError> {
        let store = self.shared.store()?;
        let seq = store.db.generate_id().map_err(|e| self.shared.sled_error(e))?;
        let write = entry.to_write();
        let mut ops = Vec::with_capacity(write.subjects.len());
        for (kind, subject) in &write.subjects {
            let key = audit_key(*kind, subject, seq);
            store
                .audit
                .insert(key.as_slice(), write.entry.as_slice())
                .map_err(|e| self.shared.sled_error(e))?;
            ops.push((TREE_AUDIT, key, Some(write.entry.clone())));
        }
        let _durable_later = self.vault_log(ops, &store)?;
        Ok(())
    }

    fn list(&self, subject: &AuditSubject, before: Option<u64>, limit: usize) -> Result<AuditPage, JournalError> {
        let (kind, id) = match subject {
            AuditSubject::Order(id) => (b'o', id),
            AuditSubject::Partner(id) => (b'p', id),
        };
        let store = self.shared.store()?;
        let start = audit_key(kind, id, 0);
        let end = audit_key(kind, id, before.unwrap_or(u64::MAX));
        let mut page = AuditPage::default();
        for item in store.audit.range(start.as_slice()..end.as_slice()).rev() {
            let (key, value) = item.map_err(|e| JournalError::Io(e.to_string()))?;
            // The subject's prefix, then exactly 8 bytes of sequence (as `start` has).
            let seq = <[u8; 8]>::try_from(key.get(start.len() - 8..).unwrap_or_default())
                .map(u64::from_be_bytes)
                .map_err(|_| JournalError::Corrupt("an audit key without its sequence".into()))?;
            if page.entries.len() == limit {
                page.next = Some(seq + 1);
                break;
            }
            page.entries
                .push(crate::codec::decode(&value).map_err(|e| JournalError::Corrupt(e.to_string()))?);
        }
        Ok(page)
    }
}

#[cfg(test)]
mod decoders;

#[cfg(test)]
mod tests {
    use super::*;

    async fn append(
        journal: &SledJournal,
        stream: &str,
        first_version: u64,
        events: Vec<Vec<u8>>,
        snapshot: Option<(u64, Vec<u8>)>,
    ) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let batch = AppendBatch {
            stream: stream.into(),
            first_version,
            events,
            snapshot,
            wakeup: None,
            audit: Vec::new(),
        };
        journal
            .try_reserve()
            .expect("queue has room")
            .append(batch, Box::new(move |r| drop(tx.send(r))));
        rx.await.expect("completion runs").expect("write succeeds");
    }

    /// The stream once its snapshot of `version` is written: snapshots are written after
    /// their append completes, between later batches.
    async fn load_with_snapshot(journal: &SledJournal, stream: &str, version: u64) -> Recovered {
        for _ in 0..3_000 {
            let recovered = journal.load(stream).await.unwrap();
            if recovered.snapshot.as_ref().is_some_and(|(v, _)| *v == version) {
                return recovered;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("{stream}: snapshot {version} not written within 30 s");
    }

    fn event(version: u64, len: usize) -> Vec<u8> {
        let mut bytes = version.to_le_bytes().to_vec();
        bytes.resize(len.max(8), 0xab);
        bytes
    }

    /// Pointers and deadlines wait in the overlay, move to sled in bulk past `OVERLAY_MAX`
    /// and at a checkpoint, and readers see every one of them at each stage: events,
    /// stream listings (interleaved in both places) and deadlines, then again after a
    /// reopening.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_see_the_overlay_and_sled_as_one() {
        let dir = tempfile::tempdir().unwrap();
        let streams = OVERLAY_MAX + 100;
        let check = |journal: Arc<SledJournal>, upto: usize| async move {
            for i in (0..upto).step_by(97).chain([upto - 1]) {
                let stream = format!("sku/d/{i:05}");
                let versions: Vec<u64> = journal
                    .load(&stream)
                    .await
                    .unwrap()
                    .events
                    .iter()
                    .map(|(v, _)| *v)
                    .collect();
                assert_eq!(versions, vec![1, 2], "{stream}");
            }
            let mut listed = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let page = journal.streams_now("sku/d/", after.as_deref(), 1_000).unwrap();
                if page.is_empty() {
                    break;
                }
                after = page.last().cloned();
                listed.extend(page);
            }
            assert_eq!(listed.len(), upto, "every stream listed once");
            assert!(listed.windows(2).all(|w| w[0] < w[1]), "in order");
            let wakeups = journal.wakeups().unwrap();
            assert_eq!(
                wakeups.len(),
                upto.div_ceil(2),
                "deadlines of even streams, odd ones cleared"
            );
        };
        {
            let journal = SledJournal::open(dir.path()).unwrap();
            for round in 0..2u64 {
                // Every stream gets version 1, then version 2; even ones keep a deadline.
                for i in 0..streams {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    journal.try_reserve().unwrap().append(
                        AppendBatch {
                            stream: format!("sku/d/{i:05}"),
                            first_version: round + 1,
                            events: vec![event(round + 1, 12)],
                            snapshot: None,
                            wakeup: Some((i % 2 == 0 || round == 0).then_some(1_000 + i as i64)),
                            audit: Vec::new(),
                        },
                        Box::new(move |r| drop(tx.send(r))),
                    );
                    if i % 512 == 511 || i == streams - 1 {
                        rx.await.unwrap().unwrap();
                    }
                }
            }
            assert!(
                journal.overlay.len() < OVERLAY_MAX,
                "the overlay was applied to sled past its bound"
            );
            check(journal.clone(), streams).await;
        }
        let journal = loop {
            match SledJournal::open(dir.path()) {
                Ok(journal) => break journal,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        };
        assert_eq!(journal.overlay.len(), 0);
        check(journal, streams).await;
    }

    #[tokio::test]
    async fn chunks_reload_in_order_from_any_snapshot_version() {
        let dir = tempfile::tempdir().unwrap();
        let journal = SledJournal::open(dir.path()).unwrap();
        // 1..=10 in small batches, then 11..=40 with events big enough to span chunks.
        for v in 1..=10u64 {
            append(&journal, "sku/a/b", v, vec![event(v, 16)], None).await;
        }
        append(
            &journal,
            "sku/a/b",
            11,
            (11..=40).map(|v| event(v, 3_000)).collect(),
            None,
        )
        .await;
        // Another stream with a name that extends the first must not leak into it.
        append(&journal, "sku/a/bc", 1, vec![event(1, 16)], None).await;
        let all = journal.load_all("sku/a/b").await.unwrap();
        assert_eq!(
            all.iter().map(|(v, _)| *v).collect::<Vec<_>>(),
            (1..=40).collect::<Vec<_>>()
        );
        for (version, bytes) in &all {
            assert_eq!(&bytes[..8], &version.to_le_bytes());
        }
        // A snapshot whose version falls inside a chunk: only later events come back.
        append(&journal, "sku/a/b", 41, Vec::new(), Some((25, b"state".to_vec()))).await;
        let recovered = load_with_snapshot(&journal, "sku/a/b", 25).await;
        assert_eq!(recovered.snapshot, Some((25, b"state".to_vec())));
        assert_eq!(
            recovered.events.iter().map(|(v, _)| *v).collect::<Vec<_>>(),
            (26..=40).collect::<Vec<_>>()
        );
        drop(journal);
        // Reopened (once the writer thread has let go of the database), the same.
        let mut reopened = SledJournal::open(dir.path());
        for _ in 0..100 {
            if reopened.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            reopened = SledJournal::open(dir.path());
        }
        let journal = reopened.unwrap();
        assert_eq!(journal.load_all("sku/a/b").await.unwrap(), all);
        assert_eq!(journal.load("sku/a/bc").await.unwrap().events.len(), 1);
    }

    #[tokio::test]
    async fn big_snapshots_and_hot_streams_never_make_sled_write_blob_files() {
        // sled writes any page (a leaf of up to 16 keys, rewritten whole every 10 changes)
        // above a quarter segment as a blob file: with whole multi-megabyte snapshots, one
        // append next to them rewrote hundreds of megabytes.
        let dir = tempfile::tempdir().unwrap();
        let journal = SledJournal::open(dir.path()).unwrap();
        for s in 0..20u8 {
            let state = vec![s; 1 << 20];
            append(
                &journal,
                &format!("sku/d/{s:02}"),
                1,
                vec![event(1, 16)],
                Some((1, state)),
            )
            .await;
        }
        for i in 0..200 {
            let v = 2 + 2 * i;
            append(
                &journal,
                "sku/d/05",
                v,
                vec![event(v, 3_000), event(v + 1, 3_000)],
                None,
            )
            .await;
        }
        for s in 0..20u8 {
            let recovered = load_with_snapshot(&journal, &format!("sku/d/{s:02}"), 1).await;
            assert_eq!(recovered.snapshot, Some((1, vec![s; 1 << 20])));
        }
        // (The directory may not exist: sled creates it at open in some versions.)
        let blobs = std::fs::read_dir(dir.path().join("journal").join("blobs")).map_or(0, |d| d.count());
        assert_eq!(blobs, 0, "sled wrote {blobs} blob files");
        assert_eq!(journal.load_all("sku/d/05").await.unwrap().len(), 1 + 2 * 200);
    }

    #[tokio::test]
    async fn the_vault_and_the_audit_trail_keep_the_ports_contract() {
        let dir = tempfile::tempdir().unwrap();
        let journal = SledJournal::open(dir.path()).unwrap();
        crate::journal::contract::vault_and_audit_trail(journal.as_ref()).await;
    }

    #[tokio::test]
    async fn a_gap_in_versions_is_reported_as_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let journal = SledJournal::open(dir.path()).unwrap();
        append(&journal, "s", 1, vec![event(1, 8), event(2, 8)], None).await;
        append(&journal, "s", 4, vec![event(4, 8)], None).await;
        let err = journal.load_all("s").await.unwrap_err();
        assert!(matches!(err, JournalError::Corrupt(_)), "{err:?}");
    }
}
