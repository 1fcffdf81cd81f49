//! The event log's recovery (`log::Log::open`, `open_from`: segment headers, record framing,
//! chained CRCs) and its checkpoints (`Checkpoint::decode`), on a simulated disk whose
//! segments are then damaged: a damaged log gives back a prefix of what was written, or an
//! error, never a torn record, a panic or an allocation the size a length field claims.

use crate::{fuzz, guarded};
use actors::log::sim::SimDisk;
use actors::log::storage::Storage;
use actors::log::{Checkpoint, Log, Position};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use std::sync::Arc;

/// Small segments, so a few records cross several of them.
const SEGMENT_BYTES: u64 = 256;

/// The most the log's recovery may allocate at once here: its segments are 256 bytes.
const RECOVERY_ALLOCATION_MAX: usize = 64 * 1024;

fn segment_name(index: u64) -> String {
    format!("{index:016x}.log")
}

/// A log of `payloads` on a fresh disk, synced after every `sync_every` records; where each
/// record is, and the indexes of its segments.
fn written(payloads: &[Vec<u8>], sync_every: usize) -> (SimDisk, Vec<Position>, Vec<u64>) {
    let disk = SimDisk::new();
    let storage: Arc<dyn Storage> = Arc::new(disk.clone());
    let mut log = Log::open(storage, SEGMENT_BYTES, |_, _| panic!("a new log has no records")).unwrap();
    let mut positions = Vec::new();
    for (i, payload) in payloads.iter().enumerate() {
        positions.push(log.append(payload).unwrap());
        if (i + 1) % sync_every == 0 {
            log.sync().unwrap();
        }
    }
    log.sync().unwrap();
    let segments = log.segments();
    (disk, positions, segments)
}

/// Opens the log on `disk` (from `from`, if given) and returns the payloads it found, under
/// the time guard, with the largest allocation the opening made.
fn recover(disk: &SimDisk, from: Option<Checkpoint>) -> (std::io::Result<Vec<Vec<u8>>>, usize) {
    let storage: Arc<dyn Storage> = Arc::new(disk.clone());
    guarded(move || {
        let mut found = Vec::new();
        Log::open_from(storage, SEGMENT_BYTES, from, |_, payload| found.push(payload.to_vec())).map(|_| found)
    })
}

/// A damage to one segment: bytes written over it at an offset, anywhere in (or just past)
/// the segment, or over the length or CRC field of one of the records.
#[derive(Debug, Clone)]
enum Damage {
    Bytes {
        segment: usize,
        offset: u64,
        bytes: Vec<u8>,
    },
    /// A record's length set to one of the huge patterns (`u32::MAX` first).
    Length {
        record: usize,
        length: u32,
    },
    Crc {
        record: usize,
        bit: u8,
    },
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (
            any::<usize>(),
            0..SEGMENT_BYTES + 16,
            prop::collection::vec(any::<u8>(), 1..9)
        )
            .prop_map(|(segment, offset, bytes)| Damage::Bytes { segment, offset, bytes }),
        (
            any::<usize>(),
            prop_oneof![
                Just(u32::MAX),
                Just(u32::MAX / 2 + 1),
                Just(SEGMENT_BYTES as u32),
                any::<u32>()
            ]
        )
            .prop_map(|(record, length)| Damage::Length { record, length }),
        (any::<usize>(), any::<u8>()).prop_map(|(record, bit)| Damage::Crc { record, bit }),
    ]
}

fn apply(disk: &SimDisk, positions: &[Position], segments: &[u64], damage: &Damage) {
    match damage {
        Damage::Bytes { segment, offset, bytes } => {
            disk.corrupt(&segment_name(segments[segment % segments.len()]), *offset, bytes)
        }
        Damage::Length { record, length } => {
            let at = positions[record % positions.len()];
            disk.corrupt(&segment_name(at.segment), at.offset, &length.to_le_bytes());
        }
        Damage::Crc { record, bit } => {
            let at = positions[record % positions.len()];
            // The CRC's first byte, one bit flipped: read it back from a scan of the log.
            let mut crc = [0u8; 1];
            let storage: &dyn Storage = disk;
            storage
                .open(&segment_name(at.segment), false)
                .unwrap()
                .read_exact_at(at.offset + 4, &mut crc)
                .unwrap();
            disk.corrupt(&segment_name(at.segment), at.offset + 4, &[crc[0] ^ (1 << (bit % 8))]);
        }
    }
}

fn payloads() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(prop::collection::vec(any::<u8>(), 1..60), 1..30)
}

#[test]
fn a_damaged_log_recovers_a_prefix_of_its_records() {
    let mut runner = TestRunner::new(fuzz::config());
    runner
        .run(
            &(payloads(), 1..5usize, prop::collection::vec(damage(), 1..4)),
            |(payloads, sync_every, damages)| {
                let (disk, positions, segments) = written(&payloads, sync_every);
                for damage in &damages {
                    apply(&disk, &positions, &segments, damage);
                }
                let (found, largest) = recover(&disk, None);
                prop_assert!(largest <= RECOVERY_ALLOCATION_MAX, "recovery allocated {largest} bytes");
                if let Ok(found) = found {
                    prop_assert!(found.len() <= payloads.len());
                    prop_assert_eq!(&found[..], &payloads[..found.len()], "not a prefix of what was written");
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn a_log_opens_from_any_checkpoint_or_refuses_it() {
    let mut runner = TestRunner::new(fuzz::config());
    let checkpoint = (
        prop_oneof![0..4u64, any::<u64>()],
        prop_oneof![0..SEGMENT_BYTES + 16, any::<u64>()],
        any::<u32>(),
    )
        .prop_map(|(segment, offset, chain)| Checkpoint { segment, offset, chain });
    runner
        .run(&(payloads(), checkpoint), |(payloads, checkpoint)| {
            let (disk, _, _) = written(&payloads, 3);
            let (found, largest) = recover(&disk, Some(checkpoint));
            prop_assert!(largest <= RECOVERY_ALLOCATION_MAX, "recovery allocated {largest} bytes");
            if let Ok(found) = found {
                prop_assert!(found.len() <= payloads.len());
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn checkpoints_decode_from_exactly_their_own_bytes() {
    let mut runner = TestRunner::new(fuzz::config());
    runner
        .run(&prop::collection::vec(any::<u8>(), 0..48), |bytes| {
            match Checkpoint::decode(&bytes) {
                Some(checkpoint) => prop_assert_eq!(&checkpoint.encode()[..], &bytes[..]),
                None => prop_assert_ne!(bytes.len(), Checkpoint::BYTES),
            }
            Ok(())
        })
        .unwrap();
}

/// A record whose length field claims 4 GiB ends the log there: nothing is allocated for
/// it, and the records before it come back.
#[test]
fn a_record_length_of_u32_max_ends_the_log_without_allocating() {
    let payloads: Vec<Vec<u8>> = (0..6u8).map(|i| vec![i; 20]).collect();
    let (disk, positions, segments) = written(&payloads, 1);
    apply(
        &disk,
        &positions,
        &segments,
        &Damage::Length {
            record: 3,
            length: u32::MAX,
        },
    );
    let (found, largest) = recover(&disk, None);
    assert_eq!(found.unwrap(), payloads[..3].to_vec());
    assert!(largest <= RECOVERY_ALLOCATION_MAX, "recovery allocated {largest} bytes");
}
