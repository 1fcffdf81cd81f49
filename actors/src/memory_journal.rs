//! An in-memory journal for tests: the [`Journal`] port with the embedded journal's contract
//! (see `sled_journal`), plus the [`AuditLog`] and [`AddressVault`] the embedded platform
//! keeps beside it, so a whole platform can run without a disk and under paused tokio time
//! (the sled journal's writer is a thread of its own, whose waits tokio cannot see).
//!
//! The contract kept: `try_reserve` answers `Full` at once when the queue is full; one writer
//! task takes whatever is queued (group commit), commits it, then runs the completions in
//! append order; a snapshot replaces the stream's previous one once its batch is committed;
//! a failed append fails every later append of its stream until one starts again at the
//! version that was lost (the restarted actor's). Committed is durable: a test simulates a
//! restart by dropping the actors and starting new ones over the same journal.
//!
//! What a test controls: [`MemoryJournal::set_full`] (every `try_reserve` answers `Full`),
//! [`MemoryJournal::fail_next_appends`] (appends complete with an I/O error and commit
//! nothing), [`MemoryJournal::hold_writes`] (appends wait in the queue, uncommitted). What it
//! reads: the events, snapshots and deadlines committed, each with the time (by the clock
//! given) it was committed, and counters. Stricter than sled in one way: an append whose
//! first version does not follow the stream's last event is refused as corrupt, so a shell
//! that loses count fails loudly here.

use crate::audit_log::{AuditEntry, AuditLog, AuditPage, AuditSubject};
use crate::clock::Clock;
use crate::journal::*;
use crate::limits::{JOURNAL_BATCH_MAX, JOURNAL_QUEUE_MAX};
use crate::secrets::SealedAddress;
use domain::UnixMillis;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{mpsc, watch};

struct Request {
    batch: AppendBatch,
    done: Completion,
}

/// One stream as committed.
#[derive(Default)]
struct Stream {
    /// Event `i` has version `i + 1`, with the time it was committed.
    events: Vec<(Vec<u8>, UnixMillis)>,
    /// Version, state, time committed.
    snapshot: Option<(u64, Vec<u8>, UnixMillis)>,
    wakeup: Option<i64>,
}

#[derive(Default)]
struct Store {
    streams: BTreeMap<String, Stream>,
    /// Per stream whose append failed, the first version lost (see the module docs).
    failed: HashMap<String, u64>,
    fail_next: u64,
    /// Keyed by subject (`o`rder or `p`artner, and its id) and sequence.
    audit: BTreeMap<(u8, String, u64), AuditEntry>,
    audit_seq: u64,
    /// Order id → sealed address and its shred time.
    addresses: HashMap<String, (SealedAddress, UnixMillis)>,
}

/// Counters a test can read.
#[derive(Debug, Default)]
pub struct MemoryJournalStats {
    /// `try_reserve` calls answered `Full`.
    pub refused_full: AtomicU64,
    /// Appends completed (successfully or not).
    pub appends: AtomicU64,
    /// Appends completed with an error (injected, after an earlier failure of their
    /// stream, or out of order).
    pub failed: AtomicU64,
    /// Group commits (one per batch of queued appends the writer took).
    pub commits: AtomicU64,
}

pub struct MemoryJournal {
    store: Arc<Mutex<Store>>,
    tx: mpsc::Sender<Request>,
    full: AtomicBool,
    held: watch::Sender<bool>,
    committed: watch::Sender<u64>,
    stats: Arc<MemoryJournalStats>,
}

impl MemoryJournal {
    /// An empty journal whose queue holds `JOURNAL_QUEUE_MAX` appends, as the embedded
    /// one's does; commit times are read from `clock`. Starts its writer task on the current
    /// tokio runtime.
    pub fn new(clock: Arc<dyn Clock>) -> Arc<MemoryJournal> {
        MemoryJournal::with_capacity(clock, JOURNAL_QUEUE_MAX)
    }

    /// As [`MemoryJournal::new`], the queue holding `capacity` appends.
    pub fn with_capacity(clock: Arc<dyn Clock>, capacity: usize) -> Arc<MemoryJournal> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let store = Arc::new(Mutex::new(Store::default()));
        let (held, held_rx) = watch::channel(false);
        let (committed, _) = watch::channel(0);
        let stats = Arc::new(MemoryJournalStats::default());
        let journal = Arc::new(MemoryJournal {
            store: store.clone(),
            tx,
            full: AtomicBool::new(false),
            held,
            committed: committed.clone(),
            stats: stats.clone(),
        });
        tokio::spawn(write(rx, held_rx, store, clock, committed, stats));
        journal
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().expect("memory journal lock")
    }

    /// While `true`, every `try_reserve` answers `Full` (nothing queued is affected).
    pub fn set_full(&self, full: bool) {
        self.full.store(full, Ordering::SeqCst);
    }

    /// The next `count` appends (barriers included) commit nothing and complete with an
    /// I/O error, as a failed write of the embedded journal does.
    pub fn fail_next_appends(&self, count: u64) {
        self.store().fail_next = count;
    }

    /// While `true`, appends stay queued, uncommitted and uncompleted (a write that takes
    /// its time); set back to `false`, they are committed as one group.
    pub fn hold_writes(&self, held: bool) {
        self.held.send_replace(held);
    }

    pub fn stats(&self) -> &MemoryJournalStats {
        &self.stats
    }

    /// The events of `stream` with their versions and the time each was committed.
    pub fn events(&self, stream: &str) -> Vec<(u64, UnixMillis, Vec<u8>)> {
        self.store().streams.get(stream).map_or_else(Vec::new, |s| {
            s.events
                .iter()
                .enumerate()
                .map(|(i, (bytes, at))| (i as u64 + 1, *at, bytes.clone()))
                .collect()
        })
    }

    /// The version of `stream`'s snapshot and the time it was committed.
    pub fn snapshot(&self, stream: &str) -> Option<(u64, UnixMillis)> {
        let store = self.store();
        let (version, _, at) = store.streams.get(stream)?.snapshot.as_ref()?;
        Some((*version, *at))
    }

    /// `stream`'s next deadline as last appended (see [`AppendBatch::wakeup`]).
    pub fn wakeup(&self, stream: &str) -> Option<UnixMillis> {
        self.store().streams.get(stream)?.wakeup.map(UnixMillis)
    }

    /// Waits until `done` holds, looking again after every commit.
    pub async fn wait_until(&self, mut done: impl FnMut(&MemoryJournal) -> bool) {
        let mut commits = self.committed.subscribe();
        while !done(self) {
            // The sender lives in `self`: `changed` cannot fail while we borrow it.
            let _ = commits.changed().await;
        }
    }
}

struct MemoryPermit {
    permit: mpsc::OwnedPermit<Request>,
}

impl AppendPermit for MemoryPermit {
    fn append(self: Box<Self>, batch: AppendBatch, done: Completion) {
        self.permit.send(Request { batch, done });
    }
}

/// The writer: takes what is queued, commits it as one group, then completes it in order.
async fn write(
    mut rx: mpsc::Receiver<Request>,
    mut held: watch::Receiver<bool>,
    store: Arc<Mutex<Store>>,
    clock: Arc<dyn Clock>,
    committed: watch::Sender<u64>,
    stats: Arc<MemoryJournalStats>,
) {
    let mut pending = Vec::new();
    loop {
        if *held.borrow_and_update() {
            if held.changed().await.is_err() {
                return;
            }
            continue;
        }
        tokio::select! {
            // A hold set while waiting wins over an append queued at the same moment.
            biased;
            changed = held.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            request = rx.recv() => match request {
                Some(request) => pending.push(request),
                None => return,
            },
        }
        while pending.len() < JOURNAL_BATCH_MAX {
            match rx.try_recv() {
                Ok(request) => pending.push(request),
                Err(_) => break,
            }
        }
        let now = clock.now();
        let results: Vec<Result<(), JournalError>> = {
            let mut store = store.lock().expect("memory journal lock");
            pending.iter_mut().map(|r| store.commit(&mut r.batch, now)).collect()
        };
        stats.commits.fetch_add(1, Ordering::SeqCst);
        stats.appends.fetch_add(pending.len() as u64, Ordering::SeqCst);
        let failed = results.iter().filter(|r| r.is_err()).count();
        stats.failed.fetch_add(failed as u64, Ordering::SeqCst);
        for (request, result) in pending.drain(..).zip(results) {
            (request.done)(result);
        }
        committed.send_modify(|n| *n += 1);
    }
}

impl Store {
    fn commit(&mut self, batch: &mut AppendBatch, now: UnixMillis) -> Result<(), JournalError> {
        let name = batch.stream.clone();
        if self.fail_next > 0 {
            self.fail_next -= 1;
            let lost = self.failed.entry(name.clone()).or_insert(u64::MAX);
            *lost = (*lost).min(batch.first_version);
            return Err(JournalError::Io(format!("{name}: write failed (injected)")));
        }
        match self.failed.get(&name) {
            Some(&lost) if batch.first_version > lost => {
                return Err(JournalError::Io(format!("{name}: an earlier append failed")));
            }
            Some(_) => {
                self.failed.remove(&name);
            }
            None => {}
        }
        if batch.events.is_empty() && batch.snapshot.is_none() && batch.wakeup.is_none() {
            // A barrier: everything before it is committed already.
            return Ok(());
        }
        let stream = self.streams.entry(name.clone()).or_default();
        let next = stream.events.len() as u64 + 1;
        if !batch.events.is_empty() && batch.first_version != next {
            return Err(JournalError::Corrupt(format!(
                "{name}: append at version {} where {next} was expected",
                batch.first_version
            )));
        }
        let last = stream.events.len() as u64 + batch.events.len() as u64;
        if let Some((version, _)) = &batch.snapshot {
            if *version > last {
                return Err(JournalError::Corrupt(format!(
                    "{name}: snapshot at version {version} beyond the last event {last}"
                )));
            }
        }
        stream
            .events
            .extend(std::mem::take(&mut batch.events).into_iter().map(|e| (e, now)));
        if let Some((version, state)) = batch.snapshot.take() {
            stream.snapshot = Some((version, state, now));
        }
        if let Some(at) = batch.wakeup {
            stream.wakeup = at;
        }
        // The audit trail with the events that cause it.
        for write in std::mem::take(&mut batch.audit) {
            let entry: AuditEntry = crate::codec::decode(&write.entry).map_err(JournalError::Corrupt)?;
            self.audit_seq += 1;
            for (kind, subject) in write.subjects {
                self.audit.insert((kind, subject, self.audit_seq), entry.clone());
            }
        }
        Ok(())
    }
}

impl Journal for MemoryJournal {
    fn keeps_audit(&self) -> bool {
        true
    }

    fn try_reserve(&self) -> Result<Box<dyn AppendPermit>, JournalError> {
        if self.full.load(Ordering::SeqCst) {
            self.stats.refused_full.fetch_add(1, Ordering::SeqCst);
            return Err(JournalError::Full);
        }
        match self.tx.clone().try_reserve_owned() {
            Ok(permit) => Ok(Box::new(MemoryPermit { permit })),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.stats.refused_full.fetch_add(1, Ordering::SeqCst);
                Err(JournalError::Full)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(JournalError::Closed),
        }
    }

    fn load(&self, stream: &str) -> BoxFuture<'_, Result<Recovered, JournalError>> {
        let recovered = self.store().streams.get(stream).map_or_else(Recovered::default, |s| {
            let after = s.snapshot.as_ref().map_or(0, |(v, _, _)| *v);
            Recovered {
                snapshot: s.snapshot.as_ref().map(|(v, state, _)| (*v, state.clone())),
                events: s
                    .events
                    .iter()
                    .enumerate()
                    .skip(after as usize)
                    .map(|(i, (e, _))| (i as u64 + 1, e.clone()))
                    .collect(),
            }
        });
        Box::pin(async move { Ok(recovered) })
    }

    fn wakeups(&self) -> Result<Vec<(String, i64)>, JournalError> {
        Ok(self
            .store()
            .streams
            .iter()
            .filter_map(|(name, s)| Some((name.clone(), s.wakeup?)))
            .collect())
    }

    fn load_all(&self, stream: &str) -> BoxFuture<'_, Result<Vec<Versioned>, JournalError>> {
        let events = self
            .events(stream)
            .into_iter()
            .map(|(version, _, bytes)| (version, bytes))
            .collect();
        Box::pin(async move { Ok(events) })
    }

    fn streams<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<String>, JournalError>> {
        let names = self
            .store()
            .streams
            .iter()
            .filter(|(name, s)| !s.events.is_empty() && name.starts_with(prefix))
            .filter(|(name, _)| after.is_none_or(|after| name.as_str() > after))
            .take(limit)
            .map(|(name, _)| name.clone())
            .collect();
        Box::pin(async move { Ok(names) })
    }
}

/// Entries are kept per subject with a sequence number, newest first when listed; the
/// page token is a sequence number, as in the embedded journal's audit trail.
impl AuditLog for MemoryJournal {
    fn append(&self, entry: &AuditEntry) -> Result<(), JournalError> {
        let mut store = self.store();
        store.audit_seq += 1;
        let seq = store.audit_seq;
        if let Some(order) = &entry.order_id {
            store.audit.insert((b'o', order.clone(), seq), entry.clone());
        }
        if let Some(partner) = &entry.partner_id {
            store.audit.insert((b'p', partner.clone(), seq), entry.clone());
        }
        Ok(())
    }

    fn list(&self, subject: &AuditSubject, before: Option<u64>, limit: usize) -> Result<AuditPage, JournalError> {
        let store = self.store();
        let (kind, id) = match subject {
            AuditSubject::Order(id) => (b'o', id),
            AuditSubject::Partner(id) => (b'p', id),
        };
        let range = (kind, id.clone(), 0)..(kind, id.clone(), before.unwrap_or(u64::MAX));
        let mut page = AuditPage::default();
        for ((_, _, seq), entry) in store.audit.range(range).rev() {
            if page.entries.len() == limit {
                page.next = Some(seq + 1);
                break;
            }
            page.entries.push(entry.clone());
        }
        Ok(page)
    }
}

/// Committed is durable here, so every call is durable when it returns.
impl AddressVault for MemoryJournal {
    fn put_new<'a>(
        &'a self,
        order_id: &'a str,
        sealed: &'a SealedAddress,
        shred_at: UnixMillis,
    ) -> BoxFuture<'a, Result<bool, JournalError>> {
        let mut store = self.store();
        let stored = !store.addresses.contains_key(order_id);
        if stored {
            store.addresses.insert(order_id.to_string(), (sealed.clone(), shred_at));
        }
        Box::pin(async move { Ok(stored) })
    }

    fn get<'a>(&'a self, order_id: &'a str) -> BoxFuture<'a, Result<Option<SealedAddress>, JournalError>> {
        let sealed = self.store().addresses.get(order_id).map(|(sealed, _)| sealed.clone());
        Box::pin(async move { Ok(sealed) })
    }

    fn shred_by<'a>(&'a self, order_id: &'a str, at: UnixMillis) -> BoxFuture<'a, Result<(), JournalError>> {
        if let Some((_, shred_at)) = self.store().addresses.get_mut(order_id) {
            *shred_at = (*shred_at).min(at);
        }
        Box::pin(async { Ok(()) })
    }

    fn shred_due(&self, now: UnixMillis, limit: usize) -> BoxFuture<'_, Result<usize, JournalError>> {
        let mut store = self.store();
        let mut due: Vec<(UnixMillis, String)> = store
            .addresses
            .iter()
            .filter(|(_, (_, at))| *at <= now)
            .map(|(id, (_, at))| (*at, id.clone()))
            .collect();
        due.sort();
        due.truncate(limit);
        for (_, order_id) in &due {
            store.addresses.remove(order_id);
        }
        let shredded = due.len();
        Box::pin(async move { Ok(shredded) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::TokioClock;
    use std::time::Duration;

    async fn append(journal: &MemoryJournal, batch: AppendBatch) -> Result<(), JournalError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        journal
            .try_reserve()?
            .append(batch, Box::new(move |r| drop(tx.send(r))));
        rx.await.expect("completion runs")
    }

    fn batch(stream: &str, first_version: u64, events: &[&str]) -> AppendBatch {
        AppendBatch {
            stream: stream.into(),
            first_version,
            events: events.iter().map(|e| e.as_bytes().to_vec()).collect(),
            ..AppendBatch::default()
        }
    }

    fn clock() -> Arc<dyn Clock> {
        Arc::new(TokioClock::starting_at(UnixMillis(1_000)))
    }

    #[tokio::test(start_paused = true)]
    async fn queued_appends_commit_as_one_group_and_complete_in_order() {
        let journal = MemoryJournal::new(clock());
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waits = Vec::new();
        for (i, b) in [
            batch("a", 1, &["a1"]),
            batch("b", 1, &["b1"]),
            batch("a", 2, &["a2", "a3"]),
        ]
        .into_iter()
        .enumerate()
        {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let order = order.clone();
            journal.try_reserve().unwrap().append(
                b,
                Box::new(move |r| {
                    order.lock().unwrap().push(i);
                    let _ = tx.send(r);
                }),
            );
            waits.push(rx);
        }
        for rx in waits {
            rx.await.unwrap().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2]);
        assert_eq!(journal.stats().commits.load(Ordering::SeqCst), 1);
        let a = journal.load_all("a").await.unwrap();
        assert_eq!(a, vec![(1, b"a1".to_vec()), (2, b"a2".to_vec()), (3, b"a3".to_vec())]);
        assert_eq!(journal.streams("", None, 10).await.unwrap(), vec!["a", "b"]);
        assert_eq!(journal.streams("", Some("a"), 10).await.unwrap(), vec!["b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_snapshot_shortens_the_load_and_wakeups_are_kept_per_stream() {
        let journal = MemoryJournal::new(clock());
        append(&journal, batch("s", 1, &["1", "2", "3"])).await.unwrap();
        append(
            &journal,
            AppendBatch {
                snapshot: Some((2, b"state@2".to_vec())),
                wakeup: Some(Some(5_000)),
                ..batch("s", 4, &[])
            },
        )
        .await
        .unwrap();
        let recovered = journal.load("s").await.unwrap();
        assert_eq!(recovered.snapshot, Some((2, b"state@2".to_vec())));
        assert_eq!(recovered.events, vec![(3, b"3".to_vec())]);
        assert_eq!(journal.wakeups().unwrap(), vec![("s".to_string(), 5_000)]);
        append(
            &journal,
            AppendBatch {
                wakeup: Some(None),
                ..batch("s", 4, &[])
            },
        )
        .await
        .unwrap();
        assert!(journal.wakeups().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn full_failed_and_held_writes_behave_as_the_embedded_journal_does() {
        let journal = MemoryJournal::with_capacity(clock(), 2);
        journal.set_full(true);
        assert!(matches!(journal.try_reserve().err(), Some(JournalError::Full)));
        journal.set_full(false);

        // A failed append fails the stream's later ones until one starts at the lost version.
        journal.fail_next_appends(1);
        assert!(append(&journal, batch("s", 1, &["x"])).await.is_err());
        assert!(append(&journal, batch("s", 2, &["y"])).await.is_err());
        append(&journal, batch("s", 1, &["1"])).await.unwrap();
        assert_eq!(journal.load_all("s").await.unwrap(), vec![(1, b"1".to_vec())]);
        // A version that does not follow is refused.
        let gap = append(&journal, batch("s", 3, &["3"])).await.unwrap_err();
        assert!(matches!(gap, JournalError::Corrupt(_)), "{gap:?}");
        assert_eq!(journal.stats().failed.load(Ordering::SeqCst), 3);

        // Held writes wait, fill the queue (then `Full`), and commit when released.
        journal.hold_writes(true);
        let (tx, first) = tokio::sync::oneshot::channel();
        journal
            .try_reserve()
            .unwrap()
            .append(batch("s", 2, &["2"]), Box::new(move |r| drop(tx.send(r))));
        let _second = journal.try_reserve().unwrap();
        assert!(matches!(journal.try_reserve().err(), Some(JournalError::Full)));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            journal.load_all("s").await.unwrap().len(),
            1,
            "nothing committed while held"
        );
        journal.hold_writes(false);
        first.await.unwrap().unwrap();
        assert_eq!(journal.events("s")[1].1, UnixMillis(61_000), "committed when released");
    }

    #[tokio::test]
    async fn the_vault_and_the_audit_trail_keep_the_ports_contract() {
        crate::journal::contract::vault_and_audit_trail(MemoryJournal::new(clock()).as_ref()).await;
    }
}
