//! What the embedded journal reads back from sled: values in parts (`sled_parts::get`:
//! snapshot headers and parts, legacy whole values), and through `SledJournal`'s port the
//! event keys, event pointers and legacy chunks, wake-up records, audit keys and the vault's
//! shred index, each damaged as a corrupt disk or an earlier bug could leave it.

use crate::{allocation_bound, fuzz, guarded};
use actors::audit_log::{AuditLog, AuditSubject};
use actors::journal::{AddressVault, Journal, JournalError};
use actors::sled_journal::SledJournal;
use actors::sled_parts::{self, Keys, PartsWrite, PART_MAX_BYTES};
use domain::UnixMillis;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

fn keys(name: &str) -> Keys {
    Keys {
        header: [b"H/", name.as_bytes()].concat(),
        parts: [b"P/", name.as_bytes(), &[0]].concat(),
        legacy: [b"P/", name.as_bytes()].concat(),
    }
}

/// A header as `sled_parts` writes it (generation, length, parts, tag; big-endian).
fn header(generation: u64, len: u64, parts: u32, tag: u64) -> Vec<u8> {
    [
        &generation.to_be_bytes()[..],
        &len.to_be_bytes(),
        &parts.to_be_bytes(),
        &tag.to_be_bytes(),
    ]
    .concat()
}

/// A damage to a value stored in parts.
#[derive(Debug, Clone)]
enum Damage {
    Header(fuzz::Mutation),
    /// Part `part` (modulo their number) changed, or removed (`None`).
    Part(usize, Option<fuzz::Mutation>),
    /// A key in the parts' range that no write makes: the parts prefix, then these bytes.
    StrayKey(Vec<u8>, Vec<u8>),
    /// The header gone and a legacy whole value in its place.
    Legacy(Vec<u8>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        3 => fuzz::mutation().prop_map(Damage::Header),
        2 => (any::<usize>(), prop::option::of(fuzz::mutation())).prop_map(|(i, m)| Damage::Part(i, m)),
        1 => (prop::collection::vec(any::<u8>(), 0..16), prop::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(k, v)| Damage::StrayKey(k, v)),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Damage::Legacy),
    ]
}

fn damage_value(tree: &sled::Tree, keys: &Keys, damage: &Damage) {
    match damage {
        Damage::Header(mutation) => {
            if let Some(head) = tree.get(&keys.header).unwrap() {
                let mut head = head.to_vec();
                mutation.apply(&mut head);
                tree.insert(&keys.header, head).unwrap();
            }
        }
        Damage::Part(i, mutation) => {
            let parts: Vec<_> = tree.scan_prefix(&keys.parts).map(|item| item.unwrap()).collect();
            if parts.is_empty() {
                return;
            }
            let (key, value) = &parts[i % parts.len()];
            match mutation {
                Some(mutation) => {
                    let mut value = value.to_vec();
                    mutation.apply(&mut value);
                    tree.insert(key, value).unwrap();
                }
                None => {
                    tree.remove(key).unwrap();
                }
            }
        }
        Damage::StrayKey(suffix, value) => {
            tree.insert([&keys.parts[..], suffix].concat(), value.as_slice())
                .unwrap();
        }
        Damage::Legacy(value) => {
            tree.remove(&keys.header).unwrap();
            tree.insert(&keys.legacy, value.as_slice()).unwrap();
        }
    }
}

#[test]
fn values_in_damaged_parts_are_an_error_or_a_value_never_a_panic() {
    let db = sled::Config::new().temporary(true).open().unwrap();
    let tree = db.open_tree("values").unwrap();
    let names = AtomicU64::new(0);
    let mut runner = TestRunner::new(fuzz::config());
    runner
        .run(
            &(
                0..5 * PART_MAX_BYTES,
                any::<u64>(),
                prop::collection::vec(damage(), 1..4),
            ),
            |(len, tag, damages)| {
                let keys = keys(&names.fetch_add(1, Ordering::Relaxed).to_string());
                let value: Vec<u8> = (0..len).map(|i| i as u8).collect();
                PartsWrite::new(keys.clone(), db.generate_id().unwrap(), tag, value.clone())
                    .finish(&tree, 4)
                    .unwrap();
                for damage in &damages {
                    damage_value(&tree, &keys, damage);
                }
                let stored: usize = tree
                    .scan_prefix(&keys.parts)
                    .chain(tree.scan_prefix(&keys.legacy))
                    .map(|item| item.unwrap().1.len())
                    .sum();
                let (tree, keys) = (tree.clone(), keys.clone());
                let (read, largest) = guarded(move || sled_parts::get(&tree, &keys));
                prop_assert!(
                    largest <= allocation_bound(stored),
                    "{stored} stored bytes made an allocation of {largest} bytes"
                );
                if let Ok(Some((_, read))) = read {
                    prop_assert!(read.len() <= stored, "{} bytes read of {stored} stored", read.len());
                }
                Ok(())
            },
        )
        .unwrap();
}

/// Regression: a header claiming `u64::MAX` bytes made the reader ask for a buffer of that
/// capacity (a panic); one claiming a terabyte in parts that exist only in the header asked
/// the allocator for a terabyte. Both are refused before anything is allocated for them.
#[test]
fn a_header_claiming_huge_lengths_is_refused_before_allocating() {
    let db = sled::Config::new().temporary(true).open().unwrap();
    let tree = db.open_tree("values").unwrap();
    let keys = keys("huge");
    PartsWrite::new(keys.clone(), 7, 1, vec![5; 3 * PART_MAX_BYTES])
        .finish(&tree, 4)
        .unwrap();
    let terabyte = 1u64 << 40;
    let terabyte_parts = terabyte.div_ceil(PART_MAX_BYTES as u64) as u32;
    for (len, parts) in [
        (u64::MAX, 3),
        (u64::MAX, u32::MAX),
        (terabyte, terabyte_parts),
        (terabyte, 3),
        (3 * PART_MAX_BYTES as u64, u32::MAX),
    ] {
        tree.insert(&keys.header, header(7, len, parts, 1)).unwrap();
        let (tree, keys) = (tree.clone(), keys.clone());
        let (read, largest) = guarded(move || sled_parts::get(&tree, &keys));
        assert!(read.is_err(), "len {len}, {parts} parts: {read:?}");
        assert!(
            largest < 1024 * 1024,
            "len {len}, {parts} parts: allocated {largest} bytes"
        );
    }
    tree.insert(&keys.header, header(7, 3 * PART_MAX_BYTES as u64, 3, 1))
        .unwrap();
    assert_eq!(
        sled_parts::get(&tree, &keys).unwrap(),
        Some((1, vec![5; 3 * PART_MAX_BYTES]))
    );
}

/// A journal over a sled database that holds `entries` (tree, key, value) besides what the
/// journal writes itself: what it finds at its next opening.
fn journal_over(dir: &Path, entries: &[(&str, Vec<u8>, Vec<u8>)]) -> Arc<SledJournal> {
    {
        let db = sled::open(dir.join("journal")).unwrap();
        for (tree, key, value) in entries {
            db.open_tree(tree)
                .unwrap()
                .insert(key.as_slice(), value.as_slice())
                .unwrap();
        }
        db.flush().unwrap();
    }
    // sled lets go of its lock once its threads notice the database was dropped.
    for _ in 0..500 {
        match SledJournal::open(dir) {
            Err(JournalError::Io(e)) if e.contains("lock") => std::thread::sleep(std::time::Duration::from_millis(10)),
            opened => return opened.unwrap(),
        }
    }
    panic!("sled's lock was never released");
}

fn event_key(stream: &str, version: u64) -> Vec<u8> {
    [b"e/", stream.as_bytes(), &[0], &version.to_be_bytes()].concat()
}

/// A chunk stored whole (as versions before the event log wrote them): each event as a
/// 4-byte little-endian length and its bytes.
fn legacy_chunk(events: &[&[u8]]) -> Vec<u8> {
    events
        .iter()
        .flat_map(|e| [&(e.len() as u32).to_le_bytes()[..], e].concat())
        .collect()
}

/// A stream's events as the journal reads them back.
type Events = Result<Vec<(u64, Vec<u8>)>, JournalError>;

/// Reads all of `stream`, with the largest allocation that made.
fn load_all(journal: &Arc<SledJournal>, stream: &'static str) -> (Events, usize) {
    let journal = journal.clone();
    guarded(move || futures::executor::block_on(journal.load_all(stream)))
}

/// Regression: a pointer whose length claimed 4 GiB made the reader allocate 4 GiB for the
/// chunk before reading it. It is an error now, found before anything is allocated.
#[test]
fn an_event_pointer_claiming_4_gib_is_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let pointer = |offset: u64, len: u32| -> Vec<u8> {
        [
            &[0xff; 4][..],
            &0u64.to_le_bytes(),
            &offset.to_le_bytes(),
            &len.to_le_bytes(),
            &0u32.to_le_bytes(),
        ]
        .concat()
    };
    let journal = journal_over(
        dir.path(),
        &[
            ("streams", event_key("sku/d/a", 1), pointer(32, u32::MAX)),
            ("streams", event_key("sku/d/b", 1), pointer(u64::MAX - 8, 64)),
            ("streams", event_key("sku/d/c", 1), pointer(32, 1 << 30)),
        ],
    );
    for stream in ["sku/d/a", "sku/d/b", "sku/d/c"] {
        let (loaded, largest) = load_all(&journal, stream);
        assert!(loaded.is_err(), "{stream}: {loaded:?}");
        assert!(largest < 1024 * 1024, "{stream}: allocated {largest} bytes");
    }
}

#[test]
fn legacy_chunks_with_impossible_lengths_are_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let mut huge = legacy_chunk(&[b"one"]);
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    huge.extend_from_slice(b"short");
    let journal = journal_over(
        dir.path(),
        &[
            ("streams", event_key("sku/d/a", 1), huge),
            ("streams", event_key("sku/d/b", 1), vec![1, 0]),
        ],
    );
    for stream in ["sku/d/a", "sku/d/b"] {
        let (loaded, largest) = load_all(&journal, stream);
        assert!(matches!(loaded, Err(JournalError::Corrupt(_))), "{stream}: {loaded:?}");
        assert!(largest < 1024 * 1024, "{stream}: allocated {largest} bytes");
    }
}

#[test]
fn a_wakeup_record_of_the_wrong_size_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let journal = journal_over(dir.path(), &[("streams", b"w/sku/d/a".to_vec(), vec![1, 2, 3])]);
    assert!(matches!(journal.wakeups(), Err(JournalError::Corrupt(_))));
}

/// Regression: after a snapshot of version `u64::MAX - 1`, a chunk of two events under the
/// key of version `u64::MAX` overflowed the version count (a panic in debug builds, a
/// wrapped version in release ones). Versions past the last one are corruption.
#[test]
fn events_past_the_last_version_are_corruption_not_an_overflow() {
    let dir = tempfile::tempdir().unwrap();
    // A snapshot as versions before snapshots in parts wrote it: `s/<stream>`, its version
    // (8 bytes, big-endian), then the state.
    let snapshot = [&(u64::MAX - 1).to_be_bytes()[..], b"state"].concat();
    let journal = journal_over(
        dir.path(),
        &[
            ("streams", b"s/sku/d/a".to_vec(), snapshot),
            (
                "streams",
                event_key("sku/d/a", u64::MAX),
                legacy_chunk(&[b"one", b"two"]),
            ),
        ],
    );
    let loading = journal.clone();
    let (loaded, _) = guarded(move || futures::executor::block_on(loading.load("sku/d/a")).map(|r| r.events));
    assert!(matches!(loaded, Err(JournalError::Corrupt(_))), "{loaded:?}");
}

/// Regression: an audit key too short to end with its 8-byte sequence made listing its
/// subject panic (the sequence was sliced from the key's last 8 bytes).
#[test]
fn a_short_audit_key_does_not_break_the_trail() {
    let dir = tempfile::tempdir().unwrap();
    let journal = journal_over(dir.path(), &[("audit", b"o/a\0\x01".to_vec(), vec![2])]);
    let (listed, _) = guarded(move || journal.list(&AuditSubject::Order("a".into()), None, 10));
    assert!(matches!(listed, Err(JournalError::Corrupt(_))), "{listed:?}");
}

/// Regression: a key of the vault's shred index shorter than its 8-byte time made the
/// shredder panic, and with it every later shred. It is dropped as the garbage it is.
#[test]
fn a_short_shred_index_key_is_dropped_and_shredding_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    // Before every real key of the index (whose first 8 bytes are a time), so it is due.
    let journal = journal_over(dir.path(), &[("address_shred", vec![0, 0, 0], Vec::new())]);
    let keys = actors::secrets::PlatformKeys::from_key([3; 32]);
    let sealed = keys.seal_address("o1", b"Rua A 1");
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    runtime.block_on(async {
        assert!(journal.put_new("o1", &sealed, UnixMillis(10)).await.unwrap());
        assert_eq!(journal.shred_due(UnixMillis(20), 10).await.unwrap(), 2);
        assert_eq!(journal.get("o1").await.unwrap(), None);
    });
}
