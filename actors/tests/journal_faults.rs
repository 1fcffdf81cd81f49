//! The embedded journal when its disk misbehaves, on a simulated disk behind switches
//! (`FaultyStorage`): the disk filling up at each point a write can meet it (a short
//! `pwrite`, a new segment's allocation, `fdatasync`), a sync failing with `EIO`, syncs
//! stalling. What must hold:
//! - a write that met a full disk is never acknowledged, later writes are refused at once
//!   (`NoSpace`) while reads and barriers go on, and writes resume by themselves once space
//!   is back, with no reopening;
//! - after a power cut at any time, the log holds exactly the acknowledged batches: nothing
//!   the failed attempt wrote (whole, torn or half) comes back, since what follows the
//!   rewind overwrote it and chains differently;
//! - a failed `fdatasync` that is not for space breaks the journal until a restart, which
//!   recovers every acknowledged batch;
//! - a stalled sync delays completions (none runs before its sync) and fills the bounded
//!   queue, which then answers `Full` instead of growing.

use actors::journal::{AddressVault, AppendBatch, Journal, JournalError};
use actors::log::faulty::{FaultyStorage, Op};
use actors::log::sim::{CutMode, SimDisk};
use actors::secrets::SealedAddress;
use actors::sled_journal::{JournalOptions, SledJournal};
use domain::UnixMillis;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Small segments, so a workload crosses several and a full disk meets their allocation.
const SEGMENT_BYTES: u64 = 4_096;

fn options() -> JournalOptions {
    JournalOptions {
        segment_bytes: SEGMENT_BYTES,
        ..JournalOptions::default()
    }
}

/// Opens the journal on `storage`, waiting for a dropped one's writer to let go of sled.
async fn open(dir: &Path, storage: FaultyStorage, options: JournalOptions) -> Arc<SledJournal> {
    for _ in 0..1_000 {
        match SledJournal::open_on(dir, Arc::new(storage.clone()), options) {
            Err(JournalError::Io(e)) if e.contains("lock") => tokio::time::sleep(Duration::from_millis(5)).await,
            other => return other.unwrap(),
        }
    }
    panic!("sled's lock was never released");
}

fn event(stream: usize, version: u64) -> Vec<u8> {
    // Big enough that a few batches fill a segment.
    let mut bytes = format!("s{stream}v{version}:").into_bytes();
    bytes.resize(300, b'x');
    bytes
}

/// Appends `events` events to `stream` at `first` and waits for the outcome.
async fn append(journal: &SledJournal, stream: usize, first: u64, events: u64) -> Result<(), JournalError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let batch = AppendBatch {
        stream: format!("sku/d/{stream}"),
        first_version: first,
        events: (first..first + events).map(|v| event(stream, v)).collect(),
        wakeup: Some(Some(first as i64)),
        ..AppendBatch::default()
    };
    journal
        .try_reserve()?
        .append(batch, Box::new(move |r| drop(tx.send(r))));
    rx.await.expect("the completion runs")
}

async fn barrier(journal: &SledJournal) -> Result<(), JournalError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    journal
        .try_reserve()?
        .append(AppendBatch::default(), Box::new(move |r| drop(tx.send(r))));
    rx.await.expect("the completion runs")
}

/// Waits (bounded) until the journal takes writes again, by itself.
async fn until_writes_resume(journal: &SledJournal) -> Duration {
    let started = Instant::now();
    while journal.write_refusal().is_some() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "writes did not resume within 10 s of space coming back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

/// What the streams must hold: the events of acknowledged batches, in order.
#[derive(Default)]
struct Acked {
    versions: Vec<u64>,
}

async fn check(journal: &SledJournal, acked: &[Acked], context: &str) {
    for (stream, acked) in acked.iter().enumerate() {
        let found = journal.load_all(&format!("sku/d/{stream}")).await.unwrap();
        let versions: Vec<u64> = found.iter().map(|(v, _)| *v).collect();
        assert_eq!(
            versions, acked.versions,
            "{context}: stream {stream} holds other events"
        );
        for (version, bytes) in &found {
            assert_eq!(
                bytes,
                &event(stream, *version),
                "{context}: stream {stream} v{version} altered"
            );
        }
    }
}

fn sealed(byte: u8) -> SealedAddress {
    SealedAddress {
        salt: [byte; 32],
        ciphertext: vec![byte; 48],
    }
}

/// One run: a burst, the disk full at `ops` mid-burst, reads and refusals, space back,
/// more writes, then a power cut of each kind and a recovery that finds exactly the
/// acknowledged batches.
async fn full_disk_at(ops: &[Op]) {
    let context = format!("no space on {ops:?}");
    let dir = tempfile::tempdir().unwrap();
    let disk = SimDisk::new();
    let storage = FaultyStorage::new(Arc::new(disk.clone()));
    let journal = open(dir.path(), storage.clone(), options()).await;
    let mut acked: Vec<Acked> = (0..3).map(|_| Acked::default()).collect();
    let mut next = [1u64; 3];
    for round in 0..6 {
        let stream = round % 3;
        append(&journal, stream, next[stream], 2).await.unwrap();
        acked[stream].versions.extend([next[stream], next[stream] + 1]);
        next[stream] += 2;
    }
    journal
        .put_new("o-before", &sealed(1), UnixMillis(i64::MAX))
        .await
        .unwrap();

    // The disk fills: the next write that needs it fails, and is not acknowledged. An
    // allocation is met only when a segment fills, so keep writing until one fails.
    storage.no_space_on(ops);
    let mut refused_at = None;
    for attempt in 0..200 {
        let stream = attempt % 3;
        match append(&journal, stream, next[stream], 2).await {
            Ok(()) => {
                acked[stream].versions.extend([next[stream], next[stream] + 1]);
                next[stream] += 2;
            }
            Err(JournalError::NoSpace(_)) => {
                refused_at = Some(stream);
                break;
            }
            Err(e) => panic!("{context}: a full disk answered {e:?}, not NoSpace"),
        }
    }
    assert!(
        refused_at.is_some(),
        "{context}: 200 appends and none met the full disk"
    );
    assert!(storage.injected() > 0, "{context}: no fault was injected");
    assert!(
        matches!(journal.write_refusal(), Some(JournalError::NoSpace(_))),
        "{context}: the journal does not say it refuses writes for want of space"
    );
    assert_eq!(
        journal.failure(),
        None,
        "{context}: a full disk is not a broken journal"
    );

    // While full: writes refused at once, with no IO; reads and barriers served.
    let injected = storage.injected();
    for (stream, &version) in next.iter().enumerate() {
        let refused = append(&journal, stream, version, 1).await;
        assert!(
            matches!(refused, Err(JournalError::NoSpace(_))),
            "{context}: {refused:?}"
        );
    }
    assert!(matches!(
        journal.put_new("o-during", &sealed(2), UnixMillis(i64::MAX)).await,
        Err(JournalError::NoSpace(_))
    ));
    assert_eq!(
        storage.injected(),
        injected,
        "{context}: a refused write reached the disk"
    );
    barrier(&journal)
        .await
        .expect("a barrier completes while the disk is full");
    check(&journal, &acked, &format!("{context}, reading while full")).await;
    assert_eq!(journal.get("o-before").await.unwrap(), Some(sealed(1)));
    assert_eq!(
        journal.get("o-during").await.unwrap(),
        None,
        "a refused address was kept"
    );

    // Space is back: writes resume by themselves. The stream whose batch was refused is
    // left alone from here on: its lost batch must never show (a retry at the same versions
    // would hide it).
    storage.free();
    until_writes_resume(&journal).await;
    let abandoned = refused_at.expect("a refused stream");
    let others: Vec<usize> = (0..3).filter(|s| *s != abandoned).collect();
    for round in 0..9 {
        let stream = others[round % others.len()];
        append(&journal, stream, next[stream], 2).await.unwrap();
        acked[stream].versions.extend([next[stream], next[stream] + 1]);
        next[stream] += 2;
    }
    // The caller told to retry its address does, and is answered only once it is durable.
    assert!(journal
        .put_new("o-during", &sealed(2), UnixMillis(i64::MAX))
        .await
        .unwrap());
    check(&journal, &acked, &format!("{context}, after space came back")).await;
    drop(journal);

    // sled kept as it was (its checkpoint skips what it holds), or lost altogether (the
    // whole event log is replayed, through the place of the failed write).
    for sled_kept in [true, false] {
        for mode in [CutMode::DropUnsynced, CutMode::TornPrefix, CutMode::Scrambled] {
            for seed in 0..3 {
                let cut = disk.after_power_cut(mode, seed);
                let copy = tempfile::tempdir().unwrap();
                if sled_kept {
                    copy_dir(&dir.path().join("journal"), &copy.path().join("journal"));
                }
                let journal = open(copy.path(), FaultyStorage::new(Arc::new(cut)), options()).await;
                let context = format!("{context}, sled kept {sled_kept}, after a {mode:?} power cut, seed {seed}");
                check(&journal, &acked, &context).await;
                if sled_kept {
                    // (The vault's log is emptied at checkpoints: without sled, it is gone.)
                    assert_eq!(journal.get("o-before").await.unwrap(), Some(sealed(1)), "{context}");
                    assert_eq!(journal.get("o-during").await.unwrap(), Some(sealed(2)), "{context}");
                }
            }
        }
    }
}

/// sled's directory as it is, for a recovery of its own.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_write_for_want_of_space_is_never_acknowledged_nor_recovered() {
    full_disk_at(&[Op::Write]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_segment_without_space_refuses_writes_until_space_is_back() {
    full_disk_at(&[Op::Allocate]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_without_space_is_written_again_whole_once_space_is_back() {
    full_disk_at(&[Op::Sync]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_full_everywhere_refuses_writes_until_space_is_back() {
    full_disk_at(&[Op::Write, Op::Allocate, Op::Sync]).await;
}

/// `EIO` from `fdatasync`: the kernel may have dropped the pages it could not write, so a
/// later sync proves nothing about them. The journal refuses writes until a restart (even
/// once syncs succeed again), keeps serving reads, and the restart recovers every
/// acknowledged batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_breaks_the_journal_until_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let disk = SimDisk::new();
    let storage = FaultyStorage::new(Arc::new(disk.clone()));
    let journal = open(dir.path(), storage.clone(), options()).await;
    let mut acked = vec![Acked::default()];
    for v in (1..=9).step_by(2) {
        append(&journal, 0, v, 2).await.unwrap();
        acked[0].versions.extend([v, v + 1]);
    }
    storage.fail_syncs_with(Some(rustix::io::Errno::IO.raw_os_error()));
    let failed = append(&journal, 0, 11, 2).await;
    assert!(matches!(failed, Err(JournalError::Io(_))), "{failed:?}");
    let why = journal.failure().expect("the journal reports its failure");
    assert!(why.contains("write-ahead log"), "{why}");
    storage.fail_syncs_with(None);
    // Syncs work again, and still nothing is written: only a recovery knows the disk.
    let refused = append(&journal, 0, 11, 2).await;
    assert!(matches!(refused, Err(JournalError::Io(_))), "{refused:?}");
    assert!(journal.write_refusal().is_some());
    barrier(&journal).await.expect("reads are still served");
    check(&journal, &acked, "broken, reading").await;
    drop(journal);

    let journal = open(
        dir.path(),
        FaultyStorage::new(Arc::new(disk.after_power_cut(CutMode::DropUnsynced, 1))),
        options(),
    )
    .await;
    assert_eq!(journal.failure(), None);
    check(&journal, &acked, "restarted after the failed sync").await;
    append(&journal, 0, 11, 2)
        .await
        .expect("a restarted journal takes writes");
}

/// Syncs that take 400 ms: no completion runs before the sync covering it (the storage's
/// sync count moved, and the stall passed), and with a queue of 16 the next appends are
/// refused with `Full` at once rather than queued without bound. After a power cut, every
/// acknowledged batch is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_syncs_delay_completions_and_a_full_queue_refuses_at_once() {
    const QUEUE: usize = 16;
    const STALL: Duration = Duration::from_millis(400);
    let dir = tempfile::tempdir().unwrap();
    let disk = SimDisk::new();
    let storage = FaultyStorage::new(Arc::new(disk.clone()));
    let journal = open(
        dir.path(),
        storage.clone(),
        JournalOptions {
            segment_bytes: 64 * 1024,
            queue_max: QUEUE,
        },
    )
    .await;
    storage.stall_syncs(STALL);
    let started = Instant::now();
    let syncs_before = journal.log_stats().syncs();
    let mut waits = Vec::new();
    let mut full = 0;
    // Streams 0..: one append each; the writer takes the first and stalls in its sync.
    for stream in 0..200 {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let batch = AppendBatch {
            stream: format!("sku/d/{stream}"),
            first_version: 1,
            events: vec![event(stream, 1)],
            ..AppendBatch::default()
        };
        match journal.try_reserve() {
            Ok(permit) => {
                let stats = journal.clone();
                permit.append(
                    batch,
                    Box::new(move |r| drop(tx.send((r, stats.log_stats().syncs(), Instant::now())))),
                );
                waits.push((stream, rx));
            }
            Err(JournalError::Full) => full += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(full > 0, "a stalled writer's queue of {QUEUE} took 200 appends");
    assert!(
        waits.len() <= QUEUE + actors::limits::JOURNAL_BATCH_MAX,
        "{} appends queued",
        waits.len()
    );
    let mut acked = Vec::new();
    for (stream, rx) in waits {
        let (result, syncs, at) = rx.await.unwrap();
        result.unwrap();
        assert!(syncs > syncs_before, "stream {stream}: completed before any sync");
        assert!(
            at - started >= STALL,
            "stream {stream}: completed before the stalled sync ended"
        );
        acked.push(stream);
    }
    storage.stall_syncs(Duration::ZERO);
    // A clean stop (its checkpoint lies past the smaller segments the journal is opened
    // with again below), then a power cut.
    let closing = journal.clone();
    tokio::task::spawn_blocking(move || closing.close()).await.unwrap();
    drop(journal);
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&dir.path().join("journal"), &copy.path().join("journal"));
    let journal = open(
        copy.path(),
        FaultyStorage::new(Arc::new(disk.after_power_cut(CutMode::Scrambled, 7))),
        options(),
    )
    .await;
    for stream in acked {
        let found = journal.load_all(&format!("sku/d/{stream}")).await.unwrap();
        assert_eq!(
            found,
            vec![(1, event(stream, 1))],
            "stream {stream} lost an acknowledged event"
        );
    }
}
