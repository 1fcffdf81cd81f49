//! The event log under power cuts: for each seed, a few lives of appends, group syncs and
//! compactions on a simulated disk whose power goes at an operation the seed picks; after
//! each cut the disk keeps what was synced plus what the seed lets through of the rest
//! (nothing, a torn prefix, or a scrambled subset). Each recovery must find every
//! acknowledged record, byte for byte and in order, followed by nothing but a prefix of the
//! records appended after the last acknowledgement; a torn record is never returned, and a
//! stale one never comes back after a later life appended over the cut.

use actors::log::sim::{CutMode, SimDisk};
use actors::log::storage::{FsStorage, Storage};
use actors::log::{Log, Position};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

/// Small segments, so every life crosses several of them.
const SEGMENT_BYTES: u64 = 256;

/// The payload of record `seq`: the same in every life, and after a recovery the workload
/// appends from the last sequence found, as the journal appends from the last version: a
/// record appended after a cut equals, byte for byte, the one the cut lost there. With
/// `fixed`, every record (the log's own open record too) has the same size, so records
/// written after a recovery end exactly where stale records of the earlier life begin: only
/// the chained checksums keep those from coming back.
fn payload_of(seq: u64, fixed: bool) -> Vec<u8> {
    let len = if fixed { 8 } else { 1 + (seq * 37 % 60) as usize };
    let mut bytes = seq.to_le_bytes().to_vec();
    bytes.resize(len.max(8), (seq % 251) as u8);
    bytes
}

fn payload(seq: u64) -> Vec<u8> {
    payload_of(seq, false)
}

fn seq_of(bytes: &[u8]) -> u64 {
    let seq = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    assert!(
        bytes == payload_of(seq, false) || bytes == payload_of(seq, true),
        "record {seq} returned torn or altered"
    );
    seq
}

/// What the log must hold.
#[derive(Default)]
struct Model {
    /// Acknowledged records still in the log, with where they are.
    acked: Vec<(u64, Position)>,
    /// Appended since the last acknowledgement: any prefix of them may survive.
    unacked: Vec<(u64, Position)>,
    /// Records of a segment whose removal may have been undone by the cut.
    limbo: Vec<u64>,
}

impl Model {
    fn check(&mut self, seed: u64, life: usize, found: &[(Position, Vec<u8>)]) {
        let found: Vec<(u64, Position)> = found.iter().map(|(p, b)| (seq_of(b), *p)).collect();
        let seqs: Vec<u64> = found.iter().map(|(s, _)| *s).collect();
        let acked: Vec<u64> = self.acked.iter().map(|(s, _)| *s).collect();
        // Records of an undone removal may come first.
        let start = seqs.iter().position(|s| !self.limbo.contains(s)).unwrap_or(seqs.len());
        let rest = &seqs[start..];
        assert!(
            rest.len() >= acked.len() && rest[..acked.len()] == acked[..],
            "seed {seed} life {life}: acknowledged records missing or out of order: found {seqs:?}, acknowledged {acked:?}"
        );
        let extra = &rest[acked.len()..];
        let unacked: Vec<u64> = self.unacked.iter().map(|(s, _)| *s).collect();
        assert!(
            extra.len() <= unacked.len() && extra[..] == unacked[..extra.len()],
            "seed {seed} life {life}: found {extra:?} beyond the acknowledged records, appended unacknowledged {unacked:?}"
        );
        // What was found is what the log holds from now on.
        self.acked = found;
        self.unacked.clear();
        self.limbo.clear();
    }
}

fn run_seed(seed: u64) -> (usize, u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let fixed = seed % 2 == 1;
    let payload = |seq| payload_of(seq, fixed);
    let mode = [CutMode::DropUnsynced, CutMode::TornPrefix, CutMode::Scrambled][(seed % 3) as usize];
    let mut disk = SimDisk::new();
    let mut model = Model::default();
    let mut next = 0u64;
    let mut checked = 0;
    for life in 0..4 {
        // The last life has no cut: it only checks what the last cut left.
        if life < 3 {
            disk.cut_power_after(rng.random_range(1..120));
        }
        let storage: Arc<dyn Storage> = Arc::new(disk.clone());
        let mut found = Vec::new();
        let opened = Log::open(storage, SEGMENT_BYTES, |position, bytes| {
            found.push((position, bytes.to_vec()))
        });
        let Ok(mut log) = opened else {
            disk = disk.after_power_cut(mode, rng.random());
            continue;
        };
        model.check(seed, life, &found);
        checked += model.acked.len();
        // Appends go on from the last record found (the records after it were lost).
        next = model.acked.last().map_or(next, |(seq, _)| seq + 1);
        // Every record found reads back the same through its position.
        for (seq, position) in &model.acked {
            assert_eq!(
                log.read(*position).unwrap(),
                payload(*seq),
                "seed {seed}: read back {seq}"
            );
        }
        if life == 3 {
            break;
        }
        loop {
            let batch = rng.random_range(1..6);
            let mut failed = false;
            for _ in 0..batch {
                match log.append(&payload(next)) {
                    Ok(position) => model.unacked.push((next, position)),
                    Err(_) => failed = true,
                }
                next += 1;
                if failed {
                    break;
                }
            }
            if failed || log.sync().is_err() {
                break;
            }
            model.acked.append(&mut model.unacked);
            // Now and then, compaction: the oldest segments go.
            if rng.random_ratio(1, 8) {
                let segments = log.segments();
                if segments.len() > 2 {
                    let before = segments[rng.random_range(1..segments.len() - 1)];
                    let removing: Vec<u64> = segments.iter().copied().filter(|&s| s < before).collect();
                    match log.remove_segments_before(before) {
                        Ok(_) => model.acked.retain(|(_, p)| p.segment >= before),
                        Err(_) => {
                            // Removals before the failing one are durable, that one may or
                            // may not have happened, and the later ones were not tried.
                            let kept = log.segments();
                            let undone = removing.iter().copied().find(|s| kept.contains(s));
                            model.limbo = model
                                .acked
                                .iter()
                                .filter(|(_, p)| Some(p.segment) == undone)
                                .map(|(s, _)| *s)
                                .collect();
                            model
                                .acked
                                .retain(|(_, p)| kept.contains(&p.segment) && Some(p.segment) != undone);
                            break;
                        }
                    }
                }
            }
        }
        disk = disk.after_power_cut(mode, rng.random());
    }
    (checked, next)
}

/// CI-sized: 1,200 seeds (each 3 power cuts and 4 recoveries) in well under a minute;
/// `DROPLINE_LOG_SEEDS` runs more.
#[test]
fn every_acknowledged_record_survives_power_cuts_and_nothing_torn_comes_back() {
    let seeds: u64 = std::env::var("DROPLINE_LOG_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_200);
    let (mut checked, mut appended) = (0, 0);
    for seed in 0..seeds {
        let (c, a) = run_seed(seed);
        checked += c;
        appended += a;
    }
    println!("{seeds} seeds: {appended} records appended, {checked} found and checked after recoveries");
    assert!(
        checked > seeds as usize,
        "the workload acknowledged too little to test anything"
    );
}

/// On the real file system: records survive a reopen; a record altered on disk ends the log
/// there (the rest is cut and written over); the log's own counters show one `fdatasync`
/// per sync however many records it covers.
#[test]
fn on_the_file_system_a_corrupt_record_ends_the_log_and_syncs_are_one_per_commit() {
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(FsStorage::open(&dir.path().join("log")).unwrap());
    let mut log = Log::open(storage.clone(), 2_048, |_, _| panic!("a new log is empty")).unwrap();
    let syncs = storage.stats().syncs();
    let positions: Vec<Position> = (0..100).map(|seq| log.append(&payload(seq)).unwrap()).collect();
    assert_eq!(storage.stats().syncs(), syncs, "appending alone syncs nothing");
    log.sync().unwrap();
    let segments = log.segments().len() as u64;
    assert!(segments > 1, "100 records cross a 2 KiB segment");
    assert_eq!(
        storage.stats().syncs(),
        syncs + segments,
        "one fdatasync per segment written in the commit"
    );
    drop(log);

    let mut found = Vec::new();
    let log = Log::open(storage.clone(), 2_048, |_, bytes| found.push(seq_of(bytes))).unwrap();
    assert_eq!(found, (0..100).collect::<Vec<_>>());
    drop(log);

    // Flip a byte inside record 60's payload, on disk.
    let victim = positions[60];
    let name = format!("{:016x}.log", victim.segment);
    let file = storage.open(&name, false).unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(victim.offset + 12, &mut byte).unwrap();
    file.write_all_at(victim.offset + 12, &[byte[0] ^ 0xff]).unwrap();
    file.sync_data().unwrap();
    let mut found = Vec::new();
    let mut log = Log::open(storage.clone(), 2_048, |_, bytes| found.push(seq_of(bytes))).unwrap();
    assert_eq!(found, (0..60).collect::<Vec<_>>(), "the log ends at the corrupt record");
    // Appends go on from there, and later segments (now stale) were removed.
    log.append(&payload(1_000)).unwrap();
    log.sync().unwrap();
    drop(log);
    let mut found = Vec::new();
    Log::open(storage, 2_048, |_, bytes| found.push(seq_of(bytes))).unwrap();
    let mut expected: Vec<u64> = (0..60).collect();
    expected.push(1_000);
    assert_eq!(found, expected);
}

/// A torn header of a segment created in the commit that the cut interrupted, and a bare
/// new log cut before its first sync, both recover to what was synced.
#[test]
fn a_cut_while_creating_segments_loses_nothing_synced() {
    for seed in 0..200 {
        let disk = SimDisk::new();
        let storage: Arc<dyn Storage> = Arc::new(disk.clone());
        let mut log = Log::open(storage, SEGMENT_BYTES, |_, _| {}).unwrap();
        for seq in 0..5 {
            log.append(&payload(seq)).unwrap();
        }
        log.sync().unwrap();
        // A commit larger than a segment: new segments are created inside it.
        disk.cut_power_after(1 + seed % 12);
        for seq in 5..30 {
            if log.append(&payload(seq)).is_err() {
                break;
            }
        }
        let _ = log.sync();
        let after = disk.after_power_cut(CutMode::Scrambled, seed);
        let mut found = Vec::new();
        Log::open(Arc::new(after), SEGMENT_BYTES, |_, bytes| found.push(seq_of(bytes))).unwrap();
        assert!(
            found.len() >= 5 && found[..5] == [0, 1, 2, 3, 4],
            "seed {seed}: {found:?}"
        );
        assert!(found.windows(2).all(|w| w[1] == w[0] + 1), "seed {seed}: {found:?}");
    }
}

/// A checkpoint moves where an opening starts scanning: the records before it are not
/// handed over again but stay readable at their positions, from another thread's reader;
/// power cuts after the checkpoint keep what was synced; a checkpoint the log does not hold
/// is refused rather than read as an empty log.
#[test]
fn an_opening_from_a_checkpoint_scans_only_what_follows_and_reads_the_rest() {
    use actors::log::Checkpoint;
    let disk = SimDisk::new();
    let storage: Arc<dyn Storage> = Arc::new(disk.clone());
    let mut log = Log::open(storage.clone(), 512, |_, _| panic!("a new log is empty")).unwrap();
    let early: Vec<Position> = (0..40).map(|seq| log.append(&payload(seq)).unwrap()).collect();
    log.sync().unwrap();
    let checkpoint = log.checkpoint();
    assert!(checkpoint.segment > 0, "40 records cross 512-byte segments");
    assert_eq!(Checkpoint::decode(&checkpoint.encode()), Some(checkpoint));
    for seq in 40..60 {
        log.append(&payload(seq)).unwrap();
    }
    log.sync().unwrap();
    // Unsynced when the power goes: may come back in part, never torn.
    for seq in 60..70 {
        log.append(&payload(seq)).unwrap();
    }
    drop(log);

    for (i, mode) in [CutMode::DropUnsynced, CutMode::TornPrefix, CutMode::Scrambled]
        .into_iter()
        .enumerate()
    {
        let after: Arc<dyn Storage> = Arc::new(disk.after_power_cut(mode, i as u64));
        let mut found = Vec::new();
        let log = Log::open_from(after.clone(), 512, Some(checkpoint), |_, bytes| {
            found.push(seq_of(bytes))
        })
        .unwrap();
        assert!(
            found.len() >= 20 && found[..20] == (40..60).collect::<Vec<_>>()[..],
            "{mode:?}: {found:?}"
        );
        assert!(found[20..].iter().enumerate().all(|(k, seq)| *seq == 60 + k as u64));
        // The records before the checkpoint, read from another thread at their positions.
        let reader = log.reader();
        let early = early.clone();
        std::thread::spawn(move || {
            for (seq, p) in early.iter().enumerate() {
                let expected = payload(seq as u64);
                assert_eq!(
                    reader.read_at(p.segment, p.payload_offset(), expected.len()).unwrap(),
                    expected
                );
            }
        })
        .join()
        .unwrap();
    }

    // Exact payloads through the reader, and refusals.
    let log = Log::open_from(storage.clone(), 512, Some(checkpoint), |_, _| {}).unwrap();
    let reader = log.reader();
    drop(log);
    let mut positions = Vec::new();
    Log::open(storage.clone(), 512, |p, bytes| positions.push((p, bytes.to_vec()))).unwrap();
    for (p, bytes) in positions.iter().take(40) {
        assert_eq!(
            &reader.read_at(p.segment, p.payload_offset(), bytes.len()).unwrap(),
            bytes
        );
    }
    let beyond = Checkpoint {
        segment: checkpoint.segment + 1_000,
        ..checkpoint
    };
    assert!(Log::open_from(storage.clone(), 512, Some(beyond), |_, _| {}).is_err());
    let past_its_end = Checkpoint {
        offset: 100_000,
        ..checkpoint
    };
    assert!(Log::open_from(storage, 512, Some(past_its_end), |_, _| {}).is_err());
}

/// `segment_bytes` may be lowered between starts (`--journal-segment-bytes`): a log written
/// in 4 KiB segments, checkpointed past 512 bytes into one, opens with 512-byte segments
/// from that checkpoint, hands over what follows it, and goes on in new small segments.
/// (Found when the journal's slow-sync test, which reopens with a smaller size, met a
/// checkpoint taken at shutdown: "the checkpoint … is not in the log".)
#[test]
fn a_log_opens_from_a_checkpoint_beyond_a_smaller_segment_size() {
    let disk = SimDisk::new();
    let storage: Arc<dyn Storage> = Arc::new(disk.clone());
    let mut log = Log::open(storage.clone(), 4_096, |_, _| panic!("a new log is empty")).unwrap();
    for seq in 0..20 {
        log.append(&payload(seq)).unwrap();
    }
    log.sync().unwrap();
    let checkpoint = log.checkpoint();
    assert_eq!(checkpoint.segment, 0);
    assert!(checkpoint.offset > 512, "{checkpoint:?}");
    for seq in 20..25 {
        log.append(&payload(seq)).unwrap();
    }
    log.sync().unwrap();
    drop(log);
    let mut found = Vec::new();
    let mut log = Log::open_from(storage.clone(), 512, Some(checkpoint), |_, bytes| {
        found.push(seq_of(bytes))
    })
    .unwrap();
    assert_eq!(found, (20..25).collect::<Vec<_>>());
    for seq in 25..60 {
        log.append(&payload(seq)).unwrap();
    }
    log.sync().unwrap();
    drop(log);
    let mut all = Vec::new();
    Log::open(storage, 512, |_, bytes| all.push(seq_of(bytes))).unwrap();
    assert_eq!(all, (0..60).collect::<Vec<_>>());
}
