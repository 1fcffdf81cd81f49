//! An append-only, segmented log with one `fdatasync` per group commit: where the journal
//! puts what must survive a power cut before its reply leaves.
//!
//! **Records.** Each record is framed as `[length: u32][crc: u32][kind: u8][payload]` (little
//! endian). The CRC32C covers the length, kind and payload and is *chained*: it starts from
//! the previous record's CRC, so a record is valid only right after the record it was written
//! after. Every opening of the log first appends an *open* record holding a random nonce, so
//! records written after a recovery chain differently from any stale bytes an earlier life
//! left beyond the cut point: a torn tail can never be resurrected by a later append that
//! happens to end where an old record began.
//!
//! **Segments.** Files `<index as 16 hex digits>.log` of `segment_bytes`, preallocated, each
//! starting with a 32-byte header (magic, index, the chain value it continues from, its own
//! CRC). Appends are buffered and written with one `pwrite` per segment per commit; `sync`
//! then `fdatasync`s every segment written since the last sync, in order, and the directory
//! when a segment was created, before it returns.
//!
//! **Recovery.** Records are read in order while each is whole and chains; the first that is
//! not (a zero length, a short or torn record, a CRC mismatch) is the end of the log. A
//! segment is followed into the next only if the next one's header is valid and continues the
//! chain exactly; otherwise the later segments held nothing that was synced (a segment is
//! synced before the next one's records can be), and they are removed. Nothing acknowledged
//! is lost, nothing torn is returned, and whatever unsynced records survived whole are
//! returned in order (like any database, a record may survive without its acknowledgement).
//!
//! **Checkpoints.** A caller that has made everything before the log's current end durable
//! elsewhere takes a [`Checkpoint`] (segment, offset, chain value) and stores it there; the
//! next opening scans from it instead of from the first segment. The earlier segments stay,
//! sealed (each was synced before any later one was written), and their records can still
//! be read at their positions ([`LogReader`]).
//!
//! **Failed writes.** A write or a sync that fails leaves the log's in-memory end where the
//! last successful sync left it only after [`Log::rewind`]: the caller rewinds after an
//! out-of-space error and appends again later. What the failed attempt wrote (whole, torn or
//! not at all, in the page cache or on the disk) is then overwritten by the next records,
//! which start with a fresh open record: they chain differently from those stale bytes, so
//! no stale byte can be read as a record, and the next successful sync covers everything
//! written since the last one, rewritten. Nothing that a failed sync covered is ever taken
//! as durable because a later sync succeeded ("fsyncgate": after a failed `fsync` the page
//! cache may have dropped the dirty pages and marked them clean).
//!
//! **Compaction** is the caller's: `remove_segments_before` drops whole segments once what
//! replaces them is itself durable.

pub mod faulty;
pub mod sim;
pub mod storage;

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, RwLock};
use storage::{Storage, StorageFile};

const MAGIC: &[u8; 8] = b"DLLOG\0\0\x01";
const HEADER_BYTES: u64 = 32;
/// length + crc + kind: a record's payload starts this many bytes after its position.
pub const FRAME_BYTES: u64 = 9;
const KIND_USER: u8 = 0;
const KIND_OPEN: u8 = 1;

/// Where a record is: its segment, and the offset and length of its frame there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
}

impl Position {
    /// Where the record's payload starts in its segment.
    pub fn payload_offset(&self) -> u64 {
        self.offset + FRAME_BYTES
    }
}

/// A point in the log up to which a caller holds every record elsewhere, durably: the next
/// opening scans only what follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub segment: u64,
    pub offset: u64,
    /// The chain value of the record that ends at `offset`.
    pub chain: u32,
}

impl Checkpoint {
    pub const BYTES: usize = 20;

    pub fn encode(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        out[..8].copy_from_slice(&self.segment.to_le_bytes());
        out[8..16].copy_from_slice(&self.offset.to_le_bytes());
        out[16..].copy_from_slice(&self.chain.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Checkpoint> {
        let bytes: &[u8; Self::BYTES] = bytes.try_into().ok()?;
        Some(Checkpoint {
            segment: u64::from_le_bytes(bytes[..8].try_into().ok()?),
            offset: u64::from_le_bytes(bytes[8..16].try_into().ok()?),
            chain: u32::from_le_bytes(bytes[16..].try_into().ok()?),
        })
    }
}

struct Segment {
    index: u64,
    file: Arc<dyn StorageFile>,
}

/// The log as its last successful sync left it: where [`Log::rewind`] goes back to.
#[derive(Debug, Clone, Copy)]
struct Synced {
    /// The segment appended to then (older ones may be removed since: counting them would
    /// not do).
    segment: u64,
    tail: u64,
    chain: u32,
}

/// Reads bytes of the log's segments from any thread, while the writer appends: what a
/// caller reads is what it was told was written (after the `sync` that covered it).
#[derive(Clone, Default)]
pub struct LogReader {
    files: Arc<RwLock<BTreeMap<u64, Arc<dyn StorageFile>>>>,
}

impl LogReader {
    /// `len` bytes at `offset` of segment `segment`.
    pub fn read_at(&self, segment: u64, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let file = self
            .files
            .read()
            .expect("log files lock")
            .get(&segment)
            .cloned()
            .ok_or_else(|| corrupt(format!("log segment {} is gone", segment_name(segment))))?;
        // Where to read comes from stored pointers: one past the segment's end is refused
        // before a buffer of the length it claims is allocated.
        let size = file.size()?;
        if (len as u64).checked_add(offset).is_none_or(|end| end > size) {
            return Err(corrupt(format!(
                "{len} bytes at {offset} are past the end of log segment {}",
                segment_name(segment)
            )));
        }
        let mut bytes = vec![0u8; len];
        file.read_exact_at(offset, &mut bytes)?;
        Ok(bytes)
    }

    /// Segments and their total size in bytes (preallocated).
    pub fn bytes_on_disk(&self) -> u64 {
        let files = self.files.read().expect("log files lock");
        files.values().filter_map(|f| f.size().ok()).sum()
    }
}

/// The log. Not thread-safe by itself: the journal's writer thread owns it.
pub struct Log {
    storage: Arc<dyn Storage>,
    /// Prepended to segment names, so several logs can share a storage.
    prefix: &'static str,
    segment_bytes: u64,
    /// Oldest first; the last is the one appended to.
    segments: Vec<Segment>,
    /// End of the last durable-or-buffered record in the last segment.
    tail: u64,
    /// The chain value after the last record appended.
    chain: u32,
    /// Frames appended since the last write, for the last segment, starting at `buffered_at`.
    buffer: Vec<u8>,
    buffered_at: u64,
    /// Segments written since the last sync (their indexes), and whether one was created.
    dirty: Vec<u64>,
    created: bool,
    reader: LogReader,
    synced: Synced,
    /// The highest segment index a creation was attempted for (a rewind removes those
    /// after the synced ones).
    highest_created: u64,
    /// Rewound: the next record appended is a fresh open record first.
    reseal: bool,
}

fn segment_name(index: u64) -> String {
    format!("{index:016x}.log")
}

fn parse_segment_name(prefix: &str, name: &str) -> Option<u64> {
    let hex = name.strip_prefix(prefix)?.strip_suffix(".log")?;
    (hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| u64::from_str_radix(hex, 16).ok())?
}

fn header(index: u64, chain: u32) -> [u8; HEADER_BYTES as usize] {
    let mut h = [0u8; HEADER_BYTES as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&index.to_le_bytes());
    h[16..20].copy_from_slice(&chain.to_le_bytes());
    let crc = crc32c::crc32c(&h[..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The chain value a valid header continues from.
fn parse_header(h: &[u8], index: u64) -> Option<u32> {
    let crc = u32::from_le_bytes(h[20..24].try_into().ok()?);
    (h[..8] == MAGIC[..] && u64::from_le_bytes(h[8..16].try_into().ok()?) == index && crc32c::crc32c(&h[..20]) == crc)
        .then(|| u32::from_le_bytes(h[16..20].try_into().expect("4 bytes")))
}

fn frame_crc(chain: u32, len: u32, kind: u8, payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c_append(chain, &len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc, &[kind]);
    crc32c::crc32c_append(crc, payload)
}

fn corrupt(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

impl Log {
    /// Opens the log in `storage` (creating it when empty), hands every record found to
    /// `each` in order, cuts a torn tail, and makes a fresh open record durable.
    pub fn open(storage: Arc<dyn Storage>, segment_bytes: u64, each: impl FnMut(Position, &[u8])) -> io::Result<Log> {
        Log::open_from(storage, segment_bytes, None, each)
    }

    /// Opens the log like [`Log::open`], but from `from` on: the records before it are not
    /// scanned (their segments are kept and readable). A checkpoint whose segment is gone, or
    /// beyond the log's end, is refused: the caller's state and the log disagree.
    pub fn open_from(
        storage: Arc<dyn Storage>,
        segment_bytes: u64,
        from: Option<Checkpoint>,
        each: impl FnMut(Position, &[u8]),
    ) -> io::Result<Log> {
        Log::open_named(storage, "", segment_bytes, from, each)
    }

    /// Opens the log whose segment names start with `prefix` (another log may share the
    /// storage under another prefix), like [`Log::open_from`].
    pub fn open_named(
        storage: Arc<dyn Storage>,
        prefix: &'static str,
        segment_bytes: u64,
        from: Option<Checkpoint>,
        mut each: impl FnMut(Position, &[u8]),
    ) -> io::Result<Log> {
        assert!(segment_bytes > HEADER_BYTES + FRAME_BYTES + 16, "segments too small");
        let mut indexes: Vec<u64> = storage
            .list()?
            .iter()
            .filter_map(|n| parse_segment_name(prefix, n))
            .collect();
        indexes.sort_unstable();
        let mut log = Log {
            storage,
            prefix,
            segment_bytes,
            segments: Vec::new(),
            tail: HEADER_BYTES,
            chain: 0,
            buffer: Vec::new(),
            buffered_at: HEADER_BYTES,
            dirty: Vec::new(),
            created: false,
            reader: LogReader::default(),
            synced: Synced {
                segment: 0,
                tail: HEADER_BYTES,
                chain: 0,
            },
            highest_created: 0,
            reseal: false,
        };
        if let Some(from) = from {
            // Its offset is checked against its segment's own size below: segments written
            // with a larger `segment_bytes` (a setting an operator may lower between starts)
            // hold records beyond the new size.
            if !indexes.contains(&from.segment) || from.offset < HEADER_BYTES {
                return Err(corrupt(format!(
                    "the checkpoint at {}:{} is not in the log",
                    segment_name(from.segment),
                    from.offset
                )));
            }
        }
        let mut stale = Vec::new();
        for (n, &index) in indexes.iter().enumerate() {
            if !stale.is_empty() {
                stale.push(index);
                continue;
            }
            let file = log.storage.open(&log.name(index), false)?;
            let contiguous = log.segments.last().is_none_or(|s| s.index + 1 == index);
            if let Some(from) = from.filter(|f| index < f.segment) {
                // Sealed before the checkpoint: kept to be read, not scanned.
                if !contiguous {
                    return Err(corrupt(format!(
                        "log segment {} is missing before the checkpoint in {}",
                        segment_name(index - 1),
                        segment_name(from.segment)
                    )));
                }
                log.push_segment(index, file);
                continue;
            }
            let mut h = [0u8; HEADER_BYTES as usize];
            if let Some(from) = from.filter(|f| index == f.segment) {
                if !contiguous || file.read_exact_at(0, &mut h).is_err() || parse_header(&h, index).is_none() {
                    return Err(corrupt(format!(
                        "log segment {} of the checkpoint has a corrupt header or a gap before it",
                        segment_name(index)
                    )));
                }
                if from.offset > file.size()? {
                    return Err(corrupt(format!(
                        "the checkpoint at {}:{} is not in the log",
                        segment_name(from.segment),
                        from.offset
                    )));
                }
                log.chain = from.chain;
                let end = log.scan(index, &file, from.offset, &mut each)?;
                log.push_segment(index, file);
                log.tail = end;
                continue;
            }
            let valid = file.size()? >= HEADER_BYTES
                && file.read_exact_at(0, &mut h).is_ok()
                && match parse_header(&h, index) {
                    // The first segment starts the chain; each later one must continue it.
                    Some(chain) if n == 0 => {
                        log.chain = chain;
                        true
                    }
                    Some(chain) => chain == log.chain && Some(index) == log.segments.last().map(|s| s.index + 1),
                    None => false,
                };
            if !valid {
                if n == 0 && indexes.len() > 1 {
                    return Err(corrupt(format!(
                        "log segment {} has a corrupt header and later segments exist",
                        segment_name(index)
                    )));
                }
                stale.push(index);
                continue;
            }
            let end = log.scan(index, &file, HEADER_BYTES, &mut each)?;
            log.push_segment(index, file);
            log.tail = end;
        }
        // Segments after the end held nothing synced: gone before anything is appended.
        for index in &stale {
            log.storage.remove(&log.name(*index))?;
        }
        if log.segments.is_empty() {
            let index = indexes.first().copied().filter(|_| !stale.is_empty()).unwrap_or(0);
            log.create_segment(index)?;
        } else if !stale.is_empty() {
            log.storage.sync_dir()?;
        }
        log.buffered_at = log.tail;
        log.highest_created = log.segments.last().map_or(0, |s| s.index);
        log.reseal = true;
        log.sync()?;
        Ok(log)
    }

    fn name(&self, index: u64) -> String {
        format!("{}{}", self.prefix, segment_name(index))
    }

    fn push_segment(&mut self, index: u64, file: Arc<dyn StorageFile>) {
        self.reader
            .files
            .write()
            .expect("log files lock")
            .insert(index, file.clone());
        self.segments.push(Segment { index, file });
    }

    /// Reads the records of one segment from `start` (its header's end, or a checkpoint) on,
    /// handing user records to `each`; returns where the valid records end.
    fn scan(
        &mut self,
        index: u64,
        file: &Arc<dyn StorageFile>,
        start: u64,
        each: &mut impl FnMut(Position, &[u8]),
    ) -> io::Result<u64> {
        let size = file.size()?;
        scan_records(index, file, start, size, &mut self.chain, each)
    }

    /// Hands every synced user record from `from` (the log's first record without it) to
    /// `each`, in order, reading the segments again: what a store rebuilt while the log is
    /// open (sled, reopened after it failed) must apply again. Records appended since the
    /// last successful sync are not read.
    pub fn replay_synced(&self, from: Option<Checkpoint>, mut each: impl FnMut(Position, &[u8])) -> io::Result<()> {
        let kept = self
            .segments
            .iter()
            .take_while(|s| s.index <= self.synced.segment)
            .count();
        let segments = &self.segments[..kept];
        let Some(first) = segments.first() else {
            return Ok(());
        };
        let (mut chain, start_segment, start_offset) = match from {
            Some(from) => (from.chain, from.segment, from.offset),
            None => {
                let mut h = [0u8; HEADER_BYTES as usize];
                first.file.read_exact_at(0, &mut h)?;
                let chain = parse_header(&h, first.index).ok_or_else(|| {
                    corrupt(format!(
                        "log segment {} has a corrupt header",
                        segment_name(first.index)
                    ))
                })?;
                (chain, first.index, HEADER_BYTES)
            }
        };
        if !segments.iter().any(|s| s.index == start_segment) {
            return Err(corrupt(format!(
                "the checkpoint's log segment {} is not in the log",
                segment_name(start_segment)
            )));
        }
        let last = segments.len() - 1;
        for (n, segment) in segments.iter().enumerate() {
            if segment.index < start_segment {
                continue;
            }
            let start = if segment.index == start_segment {
                start_offset
            } else {
                HEADER_BYTES
            };
            let limit = if n == last {
                self.synced.tail
            } else {
                segment.file.size()?
            };
            let end = scan_records(segment.index, &segment.file, start, limit, &mut chain, &mut each)?;
            if n == last && end != self.synced.tail {
                return Err(corrupt(format!(
                    "log segment {}: synced records end at {}, read back to {end}",
                    segment_name(segment.index),
                    self.synced.tail
                )));
            }
        }
        Ok(())
    }
}

/// Reads the records of segment `index` from `start` up to `limit` (the file's size, or a
/// known end), chaining from `chain`, handing user records to `each`; returns where the
/// valid records end, with `chain` the value after the last of them.
fn scan_records(
    index: u64,
    file: &Arc<dyn StorageFile>,
    start: u64,
    limit: u64,
    chain: &mut u32,
    each: &mut impl FnMut(Position, &[u8]),
) -> io::Result<u64> {
    let size = limit;
    let mut offset = start;
    let mut head = [0u8; FRAME_BYTES as usize];
    let mut payload = Vec::new();
    while offset + FRAME_BYTES <= size {
        file.read_exact_at(offset, &mut head)?;
        let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
        let kind = head[8];
        if len == 0 || offset + FRAME_BYTES + u64::from(len) > size {
            break;
        }
        payload.resize(len as usize, 0);
        file.read_exact_at(offset + FRAME_BYTES, &mut payload)?;
        if frame_crc(*chain, len, kind, &payload) != crc {
            break;
        }
        *chain = crc;
        let frame_len = FRAME_BYTES as u32 + len;
        if kind == KIND_USER {
            each(
                Position {
                    segment: index,
                    offset,
                    len: frame_len,
                },
                &payload,
            );
        }
        offset += u64::from(frame_len);
    }
    Ok(offset)
}

impl Log {
    /// Creates segment `index`, continuing the chain, and makes it the one appended to. Its
    /// entry and header become durable with the next `sync`.
    fn create_segment(&mut self, index: u64) -> io::Result<()> {
        self.highest_created = self.highest_created.max(index);
        let file = self.storage.open(&self.name(index), true)?;
        file.allocate(self.segment_bytes)?;
        file.write_all_at(0, &header(index, self.chain))?;
        self.push_segment(index, file);
        self.tail = HEADER_BYTES;
        self.buffered_at = HEADER_BYTES;
        self.dirty.push(index);
        self.created = true;
        Ok(())
    }

    /// The largest payload a record may carry.
    pub fn payload_max(&self) -> usize {
        (self.segment_bytes - HEADER_BYTES - FRAME_BYTES) as usize
    }

    /// Appends a record; it is durable once `sync` returns.
    pub fn append(&mut self, payload: &[u8]) -> io::Result<Position> {
        self.reseal()?;
        self.frame(KIND_USER, payload)
    }

    /// After a rewind, a fresh open record before anything else: what follows chains
    /// differently from whatever the failed attempt left beyond the synced end.
    fn reseal(&mut self) -> io::Result<()> {
        if self.reseal {
            let nonce: u64 = rand::random();
            self.frame(KIND_OPEN, &nonce.to_le_bytes())?;
            self.reseal = false;
        }
        Ok(())
    }

    /// Room for a record of `payload_bytes` at the end of the log: a new segment now if the
    /// current one cannot hold it (where a full disk shows first: its space is reserved when
    /// it is created), written at the next `sync`.
    pub fn make_room(&mut self, payload_bytes: usize) -> io::Result<()> {
        self.reseal()?;
        if self.tail + FRAME_BYTES + payload_bytes as u64 > self.segment_bytes {
            self.roll()?;
        }
        Ok(())
    }

    /// Forgets everything appended since the last successful `sync` (after a failed append,
    /// write or sync: the caller reports those records as not written): the end goes back to
    /// where that sync left it, segments created since are dropped (and their files removed
    /// if the storage lets us: a later opening ignores them anyway, their header continuing
    /// a chain that the records after the rewind change), and the next record is preceded by
    /// a fresh open record. Nothing is written here; the next `sync` writes and syncs it all
    /// again, never relying on what the failed attempt wrote.
    pub fn rewind(&mut self) {
        let synced = self.synced;
        let last_synced = synced.segment;
        let kept = self.segments.iter().take_while(|s| s.index <= last_synced).count();
        for segment in self.segments.drain(kept..) {
            self.reader
                .files
                .write()
                .expect("log files lock")
                .remove(&segment.index);
        }
        for index in last_synced + 1..=self.highest_created {
            // Best effort: a file left behind is a stale segment to the next opening.
            let _ = self.storage.remove(&self.name(index));
        }
        self.highest_created = last_synced;
        self.tail = synced.tail;
        self.chain = synced.chain;
        self.buffer.clear();
        self.buffered_at = synced.tail;
        self.dirty.clear();
        self.created = false;
        self.reseal = true;
    }

    fn frame(&mut self, kind: u8, payload: &[u8]) -> io::Result<Position> {
        if payload.is_empty() || payload.len() > self.payload_max() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a log record holds 1 to {} bytes, not {}",
                    self.payload_max(),
                    payload.len()
                ),
            ));
        }
        let len = payload.len() as u32;
        let frame_len = FRAME_BYTES + u64::from(len);
        if self.tail + frame_len > self.segment_bytes {
            // The rest of this segment stays zeros: the end of its records.
            self.write_buffer()?;
            let next = self.segments.last().map_or(0, |s| s.index + 1);
            self.create_segment(next)?;
        }
        let crc = frame_crc(self.chain, len, kind, payload);
        self.buffer.extend_from_slice(&len.to_le_bytes());
        self.buffer.extend_from_slice(&crc.to_le_bytes());
        self.buffer.push(kind);
        self.buffer.extend_from_slice(payload);
        let position = Position {
            segment: self.segments.last().expect("a segment").index,
            offset: self.tail,
            len: frame_len as u32,
        };
        self.chain = crc;
        self.tail += frame_len;
        Ok(position)
    }

    /// Writes what is buffered to the last segment (one `pwrite`).
    fn write_buffer(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let segment = self.segments.last().expect("a segment");
        segment.file.write_all_at(self.buffered_at, &self.buffer)?;
        if self.dirty.last() != Some(&segment.index) {
            self.dirty.push(segment.index);
        }
        self.buffered_at += self.buffer.len() as u64;
        self.buffer.clear();
        Ok(())
    }

    /// Makes every record appended so far durable: writes what is buffered, `fdatasync`s
    /// each segment written since the last sync, oldest first, and the directory if a
    /// segment was created. After a failure, the caller either rewinds ([`Log::rewind`])
    /// or stops using the log (recovery at the next opening decides what survived).
    pub fn sync(&mut self) -> io::Result<()> {
        self.reseal()?;
        self.write_buffer()?;
        for index in std::mem::take(&mut self.dirty) {
            if let Some(segment) = self.segments.iter().find(|s| s.index == index) {
                segment.file.sync_data()?;
            }
        }
        if std::mem::take(&mut self.created) {
            self.storage.sync_dir()?;
        }
        self.synced = Synced {
            segment: self.segments.last().expect("a segment").index,
            tail: self.tail,
            chain: self.chain,
        };
        Ok(())
    }

    /// The payload of the record at `position` (appended, or found at opening).
    pub fn read(&self, position: Position) -> io::Result<Vec<u8>> {
        let segment = self
            .segments
            .iter()
            .find(|s| s.index == position.segment)
            .ok_or_else(|| corrupt(format!("log segment {} is gone", position.segment)))?;
        let mut frame = vec![0u8; position.len as usize];
        let last = self.segments.last().map(|s| s.index) == Some(position.segment);
        if last && position.offset >= self.buffered_at {
            let start = (position.offset - self.buffered_at) as usize;
            frame.copy_from_slice(&self.buffer[start..start + position.len as usize]);
        } else {
            segment.file.read_exact_at(position.offset, &mut frame)?;
        }
        let len = u32::from_le_bytes(frame[..4].try_into().expect("4 bytes"));
        if u64::from(len) + FRAME_BYTES != u64::from(position.len) || frame[8] != KIND_USER {
            return Err(corrupt(format!("no record at {position:?}")));
        }
        Ok(frame.split_off(FRAME_BYTES as usize))
    }

    /// Starts a new segment if the current one holds records (it is written, not synced:
    /// `sync` makes the new one durable), so a checkpoint can then remove the older ones.
    pub fn roll(&mut self) -> io::Result<bool> {
        if self.tail == HEADER_BYTES {
            return Ok(false);
        }
        self.write_buffer()?;
        let next = self.segments.last().map_or(0, |s| s.index + 1);
        self.create_segment(next)?;
        Ok(true)
    }

    /// Indexes of the segments, oldest first.
    pub fn segments(&self) -> Vec<u64> {
        self.segments.iter().map(|s| s.index).collect()
    }

    /// Removes the segments older than `index` (never the one appended to), durably. The
    /// caller makes sure whatever replaces their records is durable first.
    pub fn remove_segments_before(&mut self, index: u64) -> io::Result<usize> {
        let last = self.segments.last().expect("a segment").index;
        let doomed: Vec<u64> = self
            .segments
            .iter()
            .map(|s| s.index)
            .filter(|&i| i < index && i != last)
            .collect();
        if doomed.is_empty() {
            return Ok(0);
        }
        // Oldest first, each removal durable before the next: whatever a power cut undoes,
        // the segments left start with a contiguous run (recovery treats a gap as the end).
        for i in &doomed {
            self.storage.remove(&self.name(*i))?;
            self.storage.sync_dir()?;
            self.segments.retain(|s| s.index != *i);
            self.reader.files.write().expect("log files lock").remove(i);
        }
        Ok(doomed.len())
    }

    /// The point after the last record appended: once `sync` has returned, everything
    /// before it is durable.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            segment: self.segments.last().expect("a segment").index,
            offset: self.tail,
            chain: self.chain,
        }
    }

    /// A reader of the segments, for other threads.
    pub fn reader(&self) -> LogReader {
        self.reader.clone()
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
}
