//! The cluster journal: every actor's stream is a subject of one JetStream stream
//! (`dl.j.<kind>.<id>…`), appended with `Nats-Expected-Last-Subject-Sequence`, so an owner
//! that lost its partition (paused, partitioned away) and still believes in it cannot
//! append after the new owner: its write fails and its actor is stopped (fencing).
//!
//! Group commit carries over, per actor: while one append of a stream is in flight, the
//! batches its actor hands over queue, and go as one message when the first is acknowledged.
//! Different actors' appends are in flight at once (up to `JOURNAL_STREAMS_IN_FLIGHT_MAX`). The
//! servers run with `sync_interval: always`, so an acknowledged append is on disk.
//!
//! Snapshots stay local, in sled, with the sequence they follow: a node that owned the
//! partition before replays only what came after; a node taking it for the first time
//! replays the subject from its start. Next deadlines go to a key-value bucket under the
//! stream's partition, so the node taking a partition schedules its wake-ups.

use super::placement::{self, JOURNAL_STREAM};
use crate::journal::*;
use crate::limits::{
    JOURNAL_APPEND_TIMEOUT, JOURNAL_CACHE_BYTES, JOURNAL_MESSAGE_BYTES_MAX, JOURNAL_QUEUE_MAX, JOURNAL_READ_TIMEOUT,
    JOURNAL_STREAMS_IN_FLIGHT_MAX, SNAPSHOT_SLICE_PARTS,
};
use crate::sled_parts::{self, PartsWrite};
use crate::telemetry::{JournalFigures, JournalStats};
use async_nats::jetstream::{self, consumer::pull, consumer::DeliverPolicy, kv, stream::LastRawMessageErrorKind};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// One message of a journal subject: consecutive events from `first` on.
#[derive(Serialize, Deserialize)]
struct Chunk {
    first: u64,
    events: Vec<Vec<u8>>,
}

/// A local snapshot: the state at `version`, and the subject sequence every event up to
/// `version` is at or before (events after it are read from the subject past `seq`).
#[derive(Serialize, Deserialize)]
struct LocalSnapshot {
    version: u64,
    seq: u64,
    state: Vec<u8>,
}

struct Request {
    batch: AppendBatch,
    done: Completion,
}

/// What this node knows of a stream's subject: the version of its last event and the
/// sequence of the message holding it (0 when it has none), as last loaded or appended.
///
/// An append expects that sequence (`Nats-Expected-Last-Subject-Sequence`, which fences off
/// a node that lost the partition) and must carry the events that follow that version:
/// a batch decided on an older state (an actor instance stopped when its partition left the
/// node, still finishing a command while a new instance loaded the subject again) would
/// otherwise pass the sequence check with the new instance's tail and write versions the
/// subject already has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tail {
    version: u64,
    seq: u64,
}

pub struct JetStreamJournal {
    stream: jetstream::stream::Stream,
    wakeups: kv::Store,
    snapshots: sled::Tree,
    /// Each stream's [`Tail`] as this node last read or wrote it.
    tails: Arc<Mutex<HashMap<String, Tail>>>,
    tx: mpsc::Sender<Request>,
    partitions: u32,
    /// For the server's metrics (appends per JetStream message, append latency).
    telemetry: Arc<JournalStats>,
}

fn io(e: impl std::fmt::Display) -> JournalError {
    JournalError::Io(e.to_string())
}

impl JetStreamJournal {
    /// Uses the journal stream and the wake-up bucket (both made by
    /// [`super::node::ensure_storage`]) and keeps snapshots in a sled database under `dir`.
    pub async fn open(js: &jetstream::Context, dir: &Path, partitions: u32) -> Result<Arc<Self>, JournalError> {
        let stream = js.get_stream(JOURNAL_STREAM).await.map_err(io)?;
        let wakeups = js.get_key_value(placement::WAKEUPS_BUCKET).await.map_err(io)?;
        std::fs::create_dir_all(dir).map_err(io)?;
        let db = sled::Config::new()
            .path(dir.join("snapshots"))
            .cache_capacity(JOURNAL_CACHE_BYTES)
            .open()
            .map_err(io)?;
        let snapshots = db.open_tree("snapshots").map_err(io)?;
        let tails = Arc::new(Mutex::new(HashMap::new()));
        let (tx, rx) = mpsc::channel(JOURNAL_QUEUE_MAX);
        let telemetry = Arc::new(JournalStats::new("jetstream"));
        let writer = Writer {
            telemetry: telemetry.clone(),
            js: js.clone(),
            wakeups: wakeups.clone(),
            snapshots: snapshots.clone(),
            snapshot_db: db.clone(),
            tails: tails.clone(),
            partitions,
            queues: HashMap::new(),
        };
        tokio::spawn(writer.run(rx));
        info!(dir = %dir.display(), "cluster journal opened (JetStream, local snapshots)");
        Ok(Arc::new(JetStreamJournal {
            stream,
            wakeups,
            snapshots,
            tails,
            tx,
            partitions,
            telemetry,
        }))
    }

    /// The last sequence of a subject, 0 when it has none.
    async fn last_seq(&self, subject: &str) -> Result<u64, JournalError> {
        match self.stream.get_last_raw_message_by_subject(subject).await {
            Ok(message) => Ok(message.sequence),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Err(e) => Err(io(e)),
        }
    }

    /// Events of a subject in messages with sequence in `from..=last`, checked to be
    /// consecutive versions, skipping versions up to `after_version`.
    async fn read(
        &self,
        stream: &str,
        subject: &str,
        from: u64,
        last: u64,
        after_version: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, JournalError> {
        let mut events: Vec<(u64, Vec<u8>)> = Vec::new();
        if last < from {
            return Ok(events);
        }
        let reading = async {
            let consumer = self
                .stream
                .create_consumer(pull::OrderedConfig {
                    filter_subject: subject.to_string(),
                    deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: from },
                    ..Default::default()
                })
                .await
                .map_err(io)?;
            let mut messages = consumer.messages().await.map_err(io)?;
            while let Some(message) = messages.next().await {
                let message = message.map_err(io)?;
                let seq = message.info().map_err(|e| io(e.to_string()))?.stream_sequence;
                take_chunk(stream, seq, &message.payload, after_version, &mut events)?;
                if seq >= last {
                    break;
                }
            }
            Ok::<_, JournalError>(())
        };
        tokio::time::timeout(JOURNAL_READ_TIMEOUT, reading)
            .await
            .map_err(|_| JournalError::Io(format!("{stream}: reading the journal timed out")))??;
        Ok(events)
    }

    fn local_snapshot(&self, stream: &str) -> Result<Option<LocalSnapshot>, JournalError> {
        match sled_parts::get(&self.snapshots, &local_snapshot_keys(stream))
            .map_err(|e| JournalError::Corrupt(format!("{stream}: local snapshot: {e}")))?
        {
            Some((_, bytes)) => postcard::from_bytes(&bytes)
                .map(Some)
                .map_err(|e| JournalError::Corrupt(format!("{stream}: local snapshot: {e}"))),
            None => Ok(None),
        }
    }

    /// Every deadline recorded for the streams of `partition` (a node taking the partition
    /// schedules them).
    pub async fn wakeups_of(&self, partition: u32) -> Result<Vec<(String, i64)>, JournalError> {
        let prefix = format!("p{partition}.");
        let mut keys = self.wakeups.keys().await.map_err(io)?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(io)?;
            if !key.starts_with(&prefix) {
                continue;
            }
            let Some(stream) = placement::stream_of_wakeup_key(&key) else {
                continue;
            };
            if let Some(value) = self.wakeups.get(&key).await.map_err(io)? {
                if let Ok(bytes) = <[u8; 8]>::try_from(value.as_ref()) {
                    out.push((stream, i64::from_be_bytes(bytes)));
                }
            }
        }
        Ok(out)
    }

    /// Forgets what this node knew of the streams of a partition it no longer owns: the
    /// next owner appends to them, so a later recovery here must read again.
    pub fn forget_partition(&self, partition: u32) {
        self.tails
            .lock()
            .expect("tails lock")
            .retain(|stream, _| placement::partition_of(stream, self.partitions) != partition);
    }
}

/// Decodes message `seq` of `stream`'s subject (a [`Chunk`]) and adds its events after
/// `after_version` to `events`, checking that they continue the versions before them. The
/// message comes from the server as it was stored: a corrupt one is an error, and versions
/// past `u64::MAX` are corruption, not an overflow.
fn take_chunk(
    stream: &str,
    seq: u64,
    payload: &[u8],
    after_version: u64,
    events: &mut Vec<(u64, Vec<u8>)>,
) -> Result<(), JournalError> {
    let corrupt = |what: String| JournalError::Corrupt(format!("{stream}: message {seq}: {what}"));
    let chunk: Chunk = postcard::from_bytes(payload).map_err(|e| corrupt(e.to_string()))?;
    for (offset, event) in chunk.events.into_iter().enumerate() {
        let version = chunk
            .first
            .checked_add(offset as u64)
            .ok_or_else(|| corrupt("versions past the last one".into()))?;
        if version <= after_version {
            continue;
        }
        let expected = events
            .last()
            .map_or(after_version, |(v, _)| *v)
            .checked_add(1)
            .ok_or_else(|| corrupt("versions past the last one".into()))?;
        if version != expected {
            return Err(corrupt(format!("version {version} where {expected} was expected")));
        }
        events.push((version, event));
    }
    Ok(())
}

impl Journal for JetStreamJournal {
    fn figures(&self) -> Option<JournalFigures> {
        Some(JournalFigures {
            kind: self.telemetry.kind,
            appends_per_write: self.telemetry.appends_per_write.snapshot(),
            write_latency_us: self.telemetry.write_latency_us.snapshot(),
            queue_depth: JOURNAL_QUEUE_MAX.saturating_sub(self.tx.capacity()) as u64,
            queue_capacity: JOURNAL_QUEUE_MAX as u64,
            syncs: None,
            bytes_written: None,
        })
    }

    fn try_reserve(&self) -> Result<Box<dyn AppendPermit>, JournalError> {
        match self.tx.clone().try_reserve_owned() {
            Ok(permit) => Ok(Box::new(Permit { permit })),
            Err(mpsc::error::TrySendError::Full(_)) => Err(JournalError::Full),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(JournalError::Closed),
        }
    }

    fn load(&self, stream: &str) -> BoxFuture<'_, Result<Recovered, JournalError>> {
        let stream = stream.to_string();
        Box::pin(async move {
            let subject = placement::journal_subject(&stream);
            let last = self.last_seq(&subject).await?;
            // The local snapshot is a cache of the journal: unreadable, it is skipped.
            let mut snapshot = self.local_snapshot(&stream).unwrap_or_else(|e| {
                warn!(%stream, error = %e, "local snapshot unreadable; replaying from the start");
                None
            });
            if snapshot.as_ref().is_some_and(|s| s.seq > last) {
                // Taken against another journal (the stream was recreated): useless here.
                warn!(%stream, "local snapshot is ahead of the journal; replaying from the start");
                snapshot = None;
            }
            let (from, after_version) = snapshot.as_ref().map_or((1, 0), |s| (s.seq + 1, s.version));
            let events = self.read(&stream, &subject, from, last, after_version).await?;
            let version = events.last().map_or(after_version, |(v, _)| *v);
            self.tails
                .lock()
                .expect("tails lock")
                .insert(stream, Tail { version, seq: last });
            Ok(Recovered {
                snapshot: snapshot.map(|s| (s.version, s.state)),
                events,
            })
        })
    }

    fn wakeups(&self) -> Result<Vec<(String, i64)>, JournalError> {
        // In a cluster, deadlines are scheduled per partition as the node takes it
        // (`wakeups_of`), not all at start-up.
        Ok(Vec::new())
    }

    fn load_all(&self, stream: &str) -> BoxFuture<'_, Result<Vec<(u64, Vec<u8>)>, JournalError>> {
        let stream = stream.to_string();
        Box::pin(async move {
            let subject = placement::journal_subject(&stream);
            let last = self.last_seq(&subject).await?;
            self.read(&stream, &subject, 1, last, 0).await
        })
    }

    fn streams<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<String>, JournalError>> {
        Box::pin(async move {
            // Kinds are whole subject tokens: `sku/` lists `dl.j.sku.>`.
            let filter = match prefix.strip_suffix('/') {
                Some(kind) if !kind.is_empty() && !kind.contains('/') => format!("dl.j.{kind}.>"),
                _ => placement::JOURNAL_SUBJECTS.to_string(),
            };
            let mut info = self.stream.info_with_subjects(filter).await.map_err(io)?;
            let mut streams = Vec::new();
            while let Some(item) = info.next().await {
                let (subject, _count) = item.map_err(io)?;
                if let Some(stream) = placement::stream_of_journal_subject(&subject) {
                    if stream.starts_with(prefix) && after.is_none_or(|a| stream.as_str() > a) {
                        streams.push(stream);
                    }
                }
            }
            streams.sort();
            streams.truncate(limit);
            Ok(streams)
        })
    }
}

struct Permit {
    permit: mpsc::OwnedPermit<Request>,
}

impl AppendPermit for Permit {
    fn append(self: Box<Self>, batch: AppendBatch, done: Completion) {
        self.permit.send(Request { batch, done });
    }
}

/// Where a stream's local snapshot lives in the snapshot tree: header `h/<stream>`, parts
/// `p/<stream>\0…`, and the whole value earlier versions kept under the stream's name.
fn local_snapshot_keys(stream: &str) -> sled_parts::Keys {
    sled_parts::Keys {
        header: [b"h/".as_slice(), stream.as_bytes()].concat(),
        parts: [b"p/".as_slice(), stream.as_bytes(), &[0]].concat(),
        legacy: stream.as_bytes().to_vec(),
    }
}

/// Batches of one stream waiting behind its append in flight.
#[derive(Default)]
struct StreamQueue {
    in_flight: bool,
    waiting: VecDeque<Request>,
}

/// What one append carried, to complete when it is acknowledged.
struct Group {
    stream: String,
    requests: Vec<Request>,
    /// The subject's sequence before this append (the expected last sequence).
    before: u64,
    /// The stream's version once this append is in.
    version: u64,
    snapshot: Option<(u64, Vec<u8>)>,
}

struct Writer {
    js: jetstream::Context,
    wakeups: kv::Store,
    snapshots: sled::Tree,
    /// For generations of snapshot writes (`generate_id`).
    snapshot_db: sled::Db,
    tails: Arc<Mutex<HashMap<String, Tail>>>,
    partitions: u32,
    queues: HashMap<String, StreamQueue>,
    telemetry: Arc<JournalStats>,
}

type Appended = (Group, Result<Option<u64>, JournalError>);

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut in_flight: FuturesUnordered<futures::future::BoxFuture<'static, Appended>> = FuturesUnordered::new();
        loop {
            tokio::select! {
                request = rx.recv(), if in_flight.len() < JOURNAL_STREAMS_IN_FLIGHT_MAX => {
                    let Some(request) = request else { break };
                    let stream = request.batch.stream.clone();
                    let queue = self.queues.entry(stream.clone()).or_default();
                    queue.waiting.push_back(request);
                    if !queue.in_flight {
                        if let Some(append) = self.start(&stream) {
                            in_flight.push(append);
                        }
                    }
                }
                Some((group, result)) = in_flight.next(), if !in_flight.is_empty() => {
                    let stream = group.stream.clone();
                    let failed = result.is_err();
                    self.finish(group, result);
                    if failed {
                        // The actor is stopped by its failed completion; what it queued
                        // behind was decided on the same, now doubtful, state.
                        if let Some(queue) = self.queues.remove(&stream) {
                            for request in queue.waiting {
                                (request.done)(Err(JournalError::Io(format!("{stream}: an earlier append failed"))));
                            }
                        }
                        continue;
                    }
                    let queue = self.queues.get_mut(&stream).expect("queue of a stream in flight");
                    queue.in_flight = false;
                    if queue.waiting.is_empty() {
                        self.queues.remove(&stream);
                    } else if let Some(append) = self.start(&stream) {
                        in_flight.push(append);
                    }
                }
            }
        }
        while let Some((group, result)) = in_flight.next().await {
            self.finish(group, result);
        }
    }

    /// Takes the waiting batches of a stream (up to the message size) and starts their
    /// append; `None` when they completed at once (nothing to write).
    fn start(&mut self, stream: &str) -> Option<futures::future::BoxFuture<'static, Appended>> {
        let queue = self.queues.get_mut(stream)?;
        let mut requests = Vec::new();
        let mut events: Vec<Vec<u8>> = Vec::new();
        let mut first = None;
        let mut bytes = 0;
        let mut snapshot = None;
        let mut wakeup = None;
        while let Some(request) = queue.waiting.front() {
            let size: usize = request.batch.events.iter().map(Vec::len).sum();
            if !requests.is_empty() && bytes + size > JOURNAL_MESSAGE_BYTES_MAX {
                break;
            }
            let mut request = queue.waiting.pop_front().expect("front exists");
            if !request.batch.events.is_empty() {
                let next = first.map(|f: u64| f + events.len() as u64);
                if next.is_some_and(|n| n != request.batch.first_version) {
                    // Not consecutive: a bug in the caller; fail this batch alone.
                    (request.done)(Err(JournalError::Corrupt(format!(
                        "{stream}: batch at version {} does not follow {}",
                        request.batch.first_version,
                        next.unwrap_or_default()
                    ))));
                    continue;
                }
                first.get_or_insert(request.batch.first_version);
                bytes += size;
                events.append(&mut request.batch.events);
            }
            if let Some(s) = request.batch.snapshot.take() {
                snapshot = Some(s);
            }
            if let Some(w) = request.batch.wakeup {
                wakeup = Some(w);
            }
            requests.push(request);
        }
        if requests.is_empty() {
            return None;
        }
        queue.in_flight = true;
        let tail = self.tails.lock().expect("tails lock").get(stream).copied();
        let count = events.len() as u64;
        // A batch must follow the version this node last loaded or appended, and a snapshot
        // be of the state at that version or within this batch.
        let stale = tail.and_then(|tail| {
            let follows = first.is_none_or(|f| f == tail.version + 1);
            let snapshot_fits = snapshot
                .as_ref()
                .is_none_or(|(v, _)| *v >= tail.version && *v <= tail.version + count);
            (!follows || !snapshot_fits).then(|| {
                JournalError::Io(format!(
                    "{stream}: fenced: decided on version {} while the journal is at {} \
                     (another instance of this actor appended since)",
                    first.map_or_else(|| snapshot.as_ref().map_or(0, |(v, _)| *v), |f| f - 1),
                    tail.version
                ))
            })
        });
        let group = Group {
            stream: stream.to_string(),
            requests,
            before: tail.map_or(0, |t| t.seq),
            version: tail.map_or(0, |t| t.version) + count,
            snapshot,
        };
        let js = self.js.clone();
        let wakeups = self.wakeups.clone();
        let partitions = self.partitions;
        let telemetry = self.telemetry.clone();
        let appends = group.requests.len() as u64;
        Some(Box::pin(async move {
            let stream = group.stream.clone();
            if let Some(stale) = stale {
                return (group, Err(stale));
            }
            let publish = async {
                let Some(first) = first else { return Ok(None) };
                let Some(Tail { seq: before, .. }) = tail else {
                    return Err(JournalError::Io(format!(
                        "{stream}: appended before being loaded on this node"
                    )));
                };
                let payload = postcard::to_stdvec(&Chunk { first, events })
                    .map_err(|e| JournalError::Io(format!("{stream}: encoding: {e}")))?;
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(
                    async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                    before.to_string().as_str(),
                );
                let ack = js
                    .publish_with_headers(placement::journal_subject(&stream), headers, payload.into())
                    .await
                    .map_err(io)?
                    .await
                    .map_err(|e| match e.kind() {
                        jetstream::context::PublishErrorKind::WrongLastSequence => JournalError::Io(format!(
                            "{stream}: fenced: another node appended to this stream (this node lost its partition)"
                        )),
                        _ => io(e),
                    })?;
                Ok(Some(ack.sequence))
            };
            let deadline = async {
                let Some(change) = wakeup else { return Ok(()) };
                let key = placement::wakeup_key(placement::partition_of(&stream, partitions), &stream);
                match change {
                    Some(at) => wakeups
                        .put(key, bytes::Bytes::copy_from_slice(&at.to_be_bytes()))
                        .await
                        .map(|_| ())
                        .map_err(io),
                    None => wakeups.purge(key).await.map_err(io),
                }
            };
            let both = async { futures::try_join!(publish, deadline).map(|(seq, ())| seq) };
            let started = std::time::Instant::now();
            let result = match tokio::time::timeout(JOURNAL_APPEND_TIMEOUT, both).await {
                Ok(result) => result,
                Err(_) => Err(JournalError::Io(format!("{stream}: append timed out"))),
            };
            if matches!(result, Ok(Some(_))) {
                telemetry.appends_per_write.observe(appends);
                telemetry.write_latency_us.observe_duration(started.elapsed());
            }
            (group, result)
        }))
    }

    fn finish(&mut self, group: Group, result: Result<Option<u64>, JournalError>) {
        let Group {
            stream,
            requests,
            before,
            version,
            snapshot,
        } = group;
        match result {
            Ok(seq) => {
                if let Some(seq) = seq {
                    self.tails
                        .lock()
                        .expect("tails lock")
                        .insert(stream.clone(), Tail { version, seq });
                }
                // The replies first: the local snapshot is a cache, nobody waits for it.
                for request in requests {
                    (request.done)(Ok(()));
                }
                if let Some((version, state)) = snapshot {
                    // Every event up to `version` is at or before the sequence this append
                    // followed, or in this append (read again and skipped by version).
                    let record = LocalSnapshot {
                        version,
                        seq: before,
                        state,
                    };
                    match postcard::to_stdvec(&record) {
                        Ok(bytes) => {
                            // In parts and slices: see `sled_parts` for what whole values
                            // cost sled.
                            let written =
                                self.snapshot_db
                                    .generate_id()
                                    .map_err(|e| e.to_string())
                                    .and_then(|generation| {
                                        PartsWrite::new(local_snapshot_keys(&stream), generation, version, bytes)
                                            .finish(&self.snapshots, SNAPSHOT_SLICE_PARTS)
                                    });
                            if let Err(e) = written {
                                warn!(%stream, error = %e, "local snapshot not written");
                            }
                        }
                        Err(e) => warn!(%stream, error = %e, "local snapshot not encoded"),
                    }
                }
            }
            Err(e) => {
                warn!(%stream, error = %e, "journal append failed");
                self.tails.lock().expect("tails lock").remove(&stream);
                for request in requests {
                    (request.done)(Err(e.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod decoders;
