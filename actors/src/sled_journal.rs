//! The embedded journal: every actor's stream in one sled tree, written by one writer thread
//! that group-commits. The writer takes whatever is queued (up to `JOURNAL_BATCH_MAX`
//! appends, from any number of actors), writes it as one atomic sled batch, flushes once
//! (fsync), then runs the completions in order. One fsync per batch, not per buyer.
//!
//! Keys: `e/<stream>\0<version, 8 bytes big-endian>` for events, `s/<stream>` for the
//! snapshot (8-byte version, then the state). Streams never contain a NUL byte.

use crate::journal::*;
use domain::limits::{JOURNAL_BATCH_MAX, JOURNAL_CACHE_BYTES, JOURNAL_QUEUE_MAX};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::{error, info};

struct Request {
    batch: AppendBatch,
    done: Completion,
}

pub struct SledJournal {
    db: sled::Db,
    tree: sled::Tree,
    addresses: sled::Tree,
    tx: mpsc::Sender<Request>,
    stats: Arc<WriterStats>,
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

fn snapshot_key(stream: &str) -> Vec<u8> {
    [b"s/".as_slice(), stream.as_bytes()].concat()
}

impl SledJournal {
    /// Opens (or creates) the journal under `dir` and starts its writer thread. sled locks
    /// the directory, so two processes can never own one journal.
    pub fn open(dir: &Path) -> Result<Arc<SledJournal>, JournalError> {
        let db = sled::Config::new()
            .path(dir.join("journal"))
            .mode(sled::Mode::HighThroughput)
            // sled's page cache defaults to 1 GiB; actors keep their own state in memory,
            // so the journal needs little cache (recovery reads are sequential).
            .cache_capacity(JOURNAL_CACHE_BYTES)
            .open()
            .map_err(|e| JournalError::Io(e.to_string()))?;
        let tree = db.open_tree("streams").map_err(|e| JournalError::Io(e.to_string()))?;
        let addresses = db.open_tree("addresses").map_err(|e| JournalError::Io(e.to_string()))?;
        let (tx, rx) = mpsc::channel(JOURNAL_QUEUE_MAX);
        let stats = Arc::new(WriterStats::default());
        let writer = Writer {
            db: db.clone(),
            tree: tree.clone(),
            rx,
            stats: stats.clone(),
        };
        std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| JournalError::Io(e.to_string()))?;
        info!(dir = %dir.display(), "journal opened");
        Ok(Arc::new(SledJournal {
            db,
            tree,
            addresses,
            tx,
            stats,
        }))
    }

    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// Bytes used on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    fn read_events(&self, stream: &str, after: u64) -> Result<Vec<(u64, Vec<u8>)>, JournalError> {
        let start = event_key(stream, after.saturating_add(1));
        let end = event_key(stream, u64::MAX);
        let mut events = Vec::new();
        for item in self.tree.range(start..=end) {
            let (key, value) = item.map_err(|e| JournalError::Io(e.to_string()))?;
            let version = u64::from_be_bytes(key[key.len() - 8..].try_into().expect("8-byte suffix"));
            if let Some((last, _)) = events.last() {
                if version != last + 1 {
                    return Err(JournalError::Corrupt(format!(
                        "{stream}: version {version} follows {last}"
                    )));
                }
            }
            events.push((version, value.to_vec()));
        }
        Ok(events)
    }
}

struct SledPermit {
    permit: mpsc::OwnedPermit<Request>,
}

impl AppendPermit for SledPermit {
    fn append(self: Box<Self>, batch: AppendBatch, done: Completion) {
        self.permit.send(Request { batch, done });
    }
}

impl Journal for SledJournal {
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
            let snapshot = match self
                .tree
                .get(snapshot_key(&stream))
                .map_err(|e| JournalError::Io(e.to_string()))?
            {
                Some(value) if value.len() >= 8 => Some((
                    u64::from_be_bytes(value[..8].try_into().expect("8 bytes")),
                    value[8..].to_vec(),
                )),
                Some(_) => return Err(JournalError::Corrupt(format!("{stream}: short snapshot"))),
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

    fn load_all(&self, stream: &str) -> BoxFuture<'_, Result<Vec<(u64, Vec<u8>)>, JournalError>> {
        let stream = stream.to_string();
        Box::pin(async move { self.read_events(&stream, 0) })
    }
}

struct Writer {
    db: sled::Db,
    tree: sled::Tree,
    rx: mpsc::Receiver<Request>,
    stats: Arc<WriterStats>,
}

impl Writer {
    fn run(mut self) {
        let mut pending = Vec::with_capacity(JOURNAL_BATCH_MAX);
        while let Some(first) = self.rx.blocking_recv() {
            pending.push(first);
            while pending.len() < JOURNAL_BATCH_MAX {
                match self.rx.try_recv() {
                    Ok(request) => pending.push(request),
                    Err(_) => break,
                }
            }
            let result = self.write(&pending);
            if let Err(e) = &result {
                error!(error = %e, appends = pending.len(), "journal write failed");
            }
            for request in pending.drain(..) {
                (request.done)(result.clone());
            }
        }
        let _ = self.db.flush();
    }

    fn write(&self, pending: &[Request]) -> Result<(), JournalError> {
        let mut batch = sled::Batch::default();
        let mut writes = 0usize;
        for Request { batch: append, .. } in pending {
            for (i, event) in append.events.iter().enumerate() {
                batch.insert(
                    event_key(&append.stream, append.first_version + i as u64),
                    event.as_slice(),
                );
                writes += 1;
            }
            if let Some((version, state)) = &append.snapshot {
                let mut value = Vec::with_capacity(8 + state.len());
                value.extend_from_slice(&version.to_be_bytes());
                value.extend_from_slice(state);
                batch.insert(snapshot_key(&append.stream), value);
                writes += 1;
            }
        }
        self.stats
            .appends
            .fetch_add(pending.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if writes == 0 {
            // Only barriers: nothing to make durable, earlier batches already are.
            return Ok(());
        }
        self.tree
            .apply_batch(batch)
            .map_err(|e| JournalError::Io(e.to_string()))?;
        self.db.flush().map_err(|e| JournalError::Io(e.to_string()))?;
        self.stats.flushes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

impl AddressVault for SledJournal {
    fn put(&self, order_id: &str, address: &[u8]) -> Result<(), JournalError> {
        // Not flushed here: the confirm that follows is acknowledged only after the journal
        // writer's flush, which covers every tree of this database.
        self.addresses
            .insert(order_id.as_bytes(), address)
            .map(|_| ())
            .map_err(|e| JournalError::Io(e.to_string()))
    }

    fn get(&self, order_id: &str) -> Result<Option<Vec<u8>>, JournalError> {
        self.addresses
            .get(order_id.as_bytes())
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| JournalError::Io(e.to_string()))
    }
}
