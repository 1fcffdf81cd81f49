//! What the cluster journal decodes never panics or hangs: the messages of a journal
//! subject (`Chunk`, with the version count that follows them) and local snapshots
//! (`LocalSnapshot`, read from sled in parts). Arbitrary bytes and mutations of valid
//! encodings (see `crate::fuzz`).

use super::*;
use crate::fuzz;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

fn chunk(first: u64, events: &[&[u8]]) -> Vec<u8> {
    postcard::to_stdvec(&Chunk {
        first,
        events: events.iter().map(|e| e.to_vec()).collect(),
    })
    .unwrap()
}

#[test]
fn journal_messages() {
    let valid = vec![
        chunk(1, &[b"one"]),
        chunk(2, &[b"two", b"three", &[0; 40]]),
        chunk(5, &[]),
        chunk(u64::MAX - 1, &[b"last"]),
    ];
    let mut runner = TestRunner::new(fuzz::config());
    runner
        .run(&(fuzz::corrupt(valid), 0..4u64), |(payload, after_version)| {
            let (taken, events) = fuzz::within_time({
                let payload = payload.clone();
                move || {
                    let mut events = Vec::new();
                    let taken = take_chunk("sku/d/s", 2, &payload, after_version, &mut events);
                    (taken, events)
                }
            });
            if taken.is_ok() {
                // The message's events after `after_version`, numbered from the next one.
                let chunk: Chunk = postcard::from_bytes(&payload).unwrap();
                let expected: Vec<(u64, Vec<u8>)> = (chunk.events.into_iter().enumerate())
                    .map(|(i, event)| (chunk.first + i as u64, event))
                    .filter(|(version, _)| *version > after_version)
                    .collect();
                prop_assert_eq!(events, expected);
            }
            Ok(())
        })
        .unwrap();
}

/// Regression: a message whose events ran past version `u64::MAX` overflowed the version
/// count (a panic in debug builds, a wrapped version in release ones).
#[test]
fn versions_past_the_last_one_are_corruption_not_an_overflow() {
    let mut events = Vec::new();
    let taken = take_chunk("sku/d/s", 7, &chunk(u64::MAX, &[b"x", b"y"]), u64::MAX - 1, &mut events);
    assert!(matches!(taken, Err(JournalError::Corrupt(_))), "{taken:?}");
    let mut events = vec![(u64::MAX, b"last".to_vec())];
    let taken = take_chunk("sku/d/s", 8, &chunk(u64::MAX, &[b"again"]), 0, &mut events);
    assert!(matches!(taken, Err(JournalError::Corrupt(_))), "{taken:?}");
}

#[test]
fn local_snapshots() {
    let valid: Vec<Vec<u8>> = [
        LocalSnapshot {
            version: 12,
            seq: 40,
            state: vec![2, 1, 2, 3],
        },
        LocalSnapshot {
            version: 0,
            seq: 0,
            state: Vec::new(),
        },
    ]
    .iter()
    .map(|s| postcard::to_stdvec(s).unwrap())
    .collect();
    let mut runner = TestRunner::new(fuzz::config());
    runner
        .run(&fuzz::corrupt(valid), |bytes| {
            let decoded = fuzz::within_time(move || {
                postcard::from_bytes::<LocalSnapshot>(&bytes).map(|s| postcard::to_stdvec(&s).unwrap())
            });
            if let Ok(encoded) = decoded {
                let again = postcard::from_bytes::<LocalSnapshot>(&encoded).unwrap();
                prop_assert_eq!(postcard::to_stdvec(&again).unwrap(), encoded);
            }
            Ok(())
        })
        .unwrap();
}
