//! The embedded journal's own decoders never panic or hang on bad bytes: the changes a log
//! record holds (`decode_ops`, replayed into sled at every opening), event pointers
//! (`EventPointer::decode`), chunks of events (`decode_chunk`), and reading a stream whose
//! keys and values in sled are damaged (`read_events`). Arbitrary bytes and mutations of
//! valid encodings (see `crate::fuzz`). Allocation bounds, and the regressions found
//! through the journal's public reads, are in the `decoders` integration test.

use super::*;
use crate::fuzz;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

fn chunk(events: &[&[u8]]) -> Vec<u8> {
    events
        .iter()
        .flat_map(|e| [&(e.len() as u32).to_le_bytes()[..], e].concat())
        .collect()
}

fn pointer() -> EventPointer {
    EventPointer {
        segment: 3,
        offset: 1_000,
        len: 120,
        crc: 0xdead_beef,
    }
}

/// Log records as the writer builds them: a deadline, a removal, a chunk of events, an
/// audit entry, vault changes.
fn records() -> Vec<Vec<u8>> {
    let mut records = Vec::new();
    let mut out = Vec::new();
    let mut record = Record::new(&mut out);
    record.change(TREE_STREAMS, &wakeup_key("sku/d/s"), Some(&5_000i64.to_be_bytes()));
    record.change(TREE_STREAMS, &wakeup_key("sku/d/t"), None);
    let start = record.open_value(TREE_EVENTS, &event_key("sku/d/s", 1));
    record.out.extend_from_slice(&chunk(&[b"first", b"second", &[7; 50]]));
    record.close_value(start);
    record.change(
        TREE_AUDIT,
        &audit_key(b'o', "d1.s1.0000000000000001", 9),
        Some(b"entry"),
    );
    record.finish();
    records.push(out.clone());
    let mut record = Record::new(&mut out);
    record.change(TREE_ADDRESS_KEYS, b"o1", Some(&[1; 40]));
    record.change(TREE_ADDRESSES, b"o1", Some(&[2; 30]));
    record.change(TREE_ADDRESS_SHRED, &SledJournal::shred_key(77, "o1"), Some(&[]));
    record.finish();
    records.push(out.clone());
    Record::new(&mut out).finish();
    records.push(out);
    records
}

#[test]
fn log_records() {
    let position = Position {
        segment: 2,
        offset: 4_096,
        len: 300,
    };
    for record in records() {
        assert!(decode_ops(&record, position).is_ok());
    }
    let mut runner = TestRunner::new(fuzz::config());
    runner
        .run(&fuzz::corrupt(records()), |record| {
            fuzz::within_time(move || drop(decode_ops(&record, position)));
            Ok(())
        })
        .unwrap();
}

#[test]
fn event_pointers() {
    let valid = pointer().encode().to_vec();
    assert_eq!(EventPointer::decode(&valid), Some(pointer()));
    let mut runner = TestRunner::new(fuzz::config());
    runner
        .run(&fuzz::corrupt(vec![valid]), |bytes| {
            match EventPointer::decode(&bytes) {
                Some(at) => prop_assert_eq!(&at.encode()[..], &bytes[..]),
                None => prop_assert!(bytes.len() != EventPointer::BYTES || bytes[..4] != EventPointer::MARK),
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn chunks_of_events() {
    let valid = vec![chunk(&[b"one"]), chunk(&[b"", b"two", &[9; 70]]), Vec::new()];
    let mut runner = TestRunner::new(fuzz::config());
    runner
        .run(&fuzz::corrupt(valid), |bytes| {
            let decoded = fuzz::within_time({
                let bytes = bytes.clone();
                move || decode_chunk(&bytes).map(|events| chunk(&events))
            });
            // A chunk that decodes is exactly its events, framed.
            if let Ok(again) = decoded {
                prop_assert_eq!(again, bytes);
            }
            Ok(())
        })
        .unwrap();
}

/// A damage to a stream's entries in sled: a value mutated, or a key's version (its last
/// 8 bytes) mutated, or an entry added under a version of its own choosing.
#[derive(Debug, Clone)]
enum Damage {
    Value(usize, fuzz::Mutation),
    Version(usize, fuzz::Mutation),
    Extra(u64, Vec<u8>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        3 => (any::<usize>(), fuzz::mutation()).prop_map(|(i, m)| Damage::Value(i, m)),
        1 => (any::<usize>(), fuzz::mutation()).prop_map(|(i, m)| Damage::Version(i, m)),
        1 => (
            prop_oneof![0..10u64, Just(u64::MAX), Just(u64::MAX - 1), any::<u64>()],
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..40),
                Just(pointer().encode().to_vec()),
                Just(chunk(&[b"x", b"y"])),
            ]
        )
            .prop_map(|(v, value)| Damage::Extra(v, value)),
    ]
}

/// Reading a stream whose entries (pointers into the log, whole chunks) are damaged gives
/// back consecutive events after the version asked for, or an error.
#[test]
fn streams_with_damaged_entries() {
    let dir = tempfile::tempdir().unwrap();
    let journal = SledJournal::open(dir.path()).unwrap();
    // A stream of six events in three commits (three pointers into the log), then its
    // entries as the base every case damages under a stream name of its own; one chunk is
    // stored whole, as earlier versions did.
    for first in [1u64, 3, 5] {
        let (tx, rx) = std::sync::mpsc::channel();
        journal.try_reserve().unwrap().append(
            AppendBatch {
                stream: "sku/d/base".into(),
                first_version: first,
                events: vec![vec![first as u8; 10], vec![first as u8 + 1; 20]],
                ..AppendBatch::default()
            },
            Box::new(move |r| drop(tx.send(r))),
        );
        rx.recv().unwrap().unwrap();
    }
    let base: Vec<(u64, Vec<u8>)> = merged_range(
        &journal.overlay,
        &journal.shared.store().unwrap().tree,
        &event_key("sku/d/base", 0),
        &event_key("sku/d/base", u64::MAX),
    )
    .unwrap()
    .into_iter()
    .map(|(k, v)| (u64::from_be_bytes(k[k.len() - 8..].try_into().unwrap()), v))
    .chain([(7, chunk(&[b"seven", b"eight"]))])
    .collect();
    assert_eq!(base.len(), 4);
    let journal = Arc::new(journal);
    let streams = std::sync::atomic::AtomicU64::new(0);
    let mut runner = TestRunner::new(fuzz::config());
    runner
        .run(&(prop::collection::vec(damage(), 1..4), 0..9u64), |(damages, after)| {
            let stream = format!("sku/d/c{}", streams.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            let mut entries: Vec<(Vec<u8>, Vec<u8>)> = base
                .iter()
                .map(|(v, value)| (event_key(&stream, *v), value.clone()))
                .collect();
            for damage in &damages {
                match damage {
                    Damage::Value(i, mutation) => {
                        let i = i % entries.len();
                        mutation.apply(&mut entries[i].1);
                    }
                    Damage::Version(i, mutation) => {
                        let i = i % entries.len();
                        let key = &mut entries[i].0;
                        let mut version = key.split_off(key.len() - 8);
                        mutation.apply(&mut version);
                        key.extend_from_slice(&version);
                    }
                    Damage::Extra(v, value) => entries.push((event_key(&stream, *v), value.clone())),
                }
            }
            for (key, value) in &entries {
                journal
                    .shared
                    .store()
                    .unwrap()
                    .tree
                    .insert(key.as_slice(), value.as_slice())
                    .unwrap();
            }
            let read = fuzz::within_time({
                let journal = journal.clone();
                move || journal.read_events(&stream, after)
            });
            if let Ok(events) = read {
                for (i, (version, _)) in events.iter().enumerate() {
                    prop_assert_eq!(*version, after + 1 + i as u64);
                }
            }
            Ok(())
        })
        .unwrap();
}
