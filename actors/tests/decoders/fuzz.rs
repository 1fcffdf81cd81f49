//! What the decoder property tests share (the `decoders` integration test, and the unit
//! tests of the private decoders, which include this file): how many cases a property runs,
//! mutations of valid encodings, and a guard that fails a case which hangs.
//!
//! Arbitrary bytes rarely get past a decoder's first check; a valid encoding with a bit
//! flipped, cut short, grown, or with a length field claiming gigabytes reaches the code
//! behind it. Every property therefore runs on both.
//!
//! `DROPLINE_FUZZ_CASES` runs more cases per property than the CI-sized default.

// Included by two crates (the library's unit tests, the integration test), each using a
// part of it.
#![allow(dead_code)]

use proptest::prelude::*;
use std::sync::mpsc;
use std::time::Duration;

/// Cases per property unless `DROPLINE_FUZZ_CASES` says otherwise.
const CASES_DEFAULT: u32 = 1_000;

/// The longest one decode may take: generous (a debug build on a busy machine decodes any
/// of these inputs in milliseconds), so only a loop that does not end trips it.
pub const DECODE_TIME_MAX: Duration = Duration::from_secs(20);

pub fn cases() -> u32 {
    std::env::var("DROPLINE_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(CASES_DEFAULT)
}

/// The configuration of every decoder property: `cases()` cases; a failure is reported
/// (and kept as a named regression test by whoever fixes it), not written to a file.
pub fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Runs `decode` on a thread of its own and returns what it returned; a panic in it is
/// the test's panic, and one that runs past [`DECODE_TIME_MAX`] fails the test instead of
/// hanging it.
pub fn within_time<T: Send + 'static>(decode: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, finished) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let out = decode();
        let _ = done.send(());
        out
    });
    match finished.recv_timeout(DECODE_TIME_MAX) {
        // Disconnected: the decoder panicked (its sender dropped); join says how.
        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Ok(out) => out,
            Err(panic) => std::panic::resume_unwind(panic),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("a decode ran for more than {DECODE_TIME_MAX:?}"),
    }
}

/// Byte patterns a corrupt length or count field may hold: the largest u32 and u64 (the
/// same bytes in either byte order), their halves in both orders, and postcard's varints
/// of `u32::MAX` and `u64::MAX`.
const HUGE: &[&[u8]] = &[
    &[0xff; 4],
    &[0xff; 8],
    &[0x7f, 0xff, 0xff, 0xff],
    &[0xff, 0xff, 0xff, 0x7f],
    &[0x80, 0, 0, 0, 0, 0, 0, 0],
    &[0, 0, 0, 0, 0, 0, 0, 0x80],
    &[0xff, 0xff, 0xff, 0xff, 0x0f],
    &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
];

/// One change to an encoding. Offsets are taken modulo the length of what they change, so
/// a mutation applies to an encoding of any size.
#[derive(Debug, Clone)]
pub enum Mutation {
    FlipBit {
        at: usize,
        bit: u8,
    },
    SetByte {
        at: usize,
        value: u8,
    },
    /// Keeps the first `keep` bytes (modulo the length + 1: anything from nothing to all).
    Truncate {
        keep: usize,
    },
    Append(Vec<u8>),
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Remove {
        at: usize,
        len: usize,
    },
    /// A length field claiming gigabytes: one of [`HUGE`] written over the bytes at `at`
    /// (or inserted there).
    Huge {
        at: usize,
        pattern: usize,
        insert: bool,
    },
}

impl Mutation {
    pub fn apply(&self, bytes: &mut Vec<u8>) {
        let at = |at: usize, len: usize| if len == 0 { 0 } else { at % len };
        match self {
            Mutation::FlipBit { at: i, bit } => {
                if !bytes.is_empty() {
                    let i = at(*i, bytes.len());
                    bytes[i] ^= 1 << (bit % 8);
                }
            }
            Mutation::SetByte { at: i, value } => {
                if !bytes.is_empty() {
                    let i = at(*i, bytes.len());
                    bytes[i] = *value;
                }
            }
            Mutation::Truncate { keep } => bytes.truncate(keep % (bytes.len() + 1)),
            Mutation::Append(more) => bytes.extend_from_slice(more),
            Mutation::Insert { at: i, bytes: more } => {
                let i = at(*i, bytes.len() + 1);
                bytes.splice(i..i, more.iter().copied());
            }
            Mutation::Remove { at: i, len } => {
                if !bytes.is_empty() {
                    let i = at(*i, bytes.len());
                    let end = (i + len).min(bytes.len());
                    bytes.drain(i..end);
                }
            }
            Mutation::Huge { at: i, pattern, insert } => {
                let pattern = HUGE[pattern % HUGE.len()];
                let i = at(*i, bytes.len() + 1);
                if *insert {
                    bytes.splice(i..i, pattern.iter().copied());
                } else {
                    let end = (i + pattern.len()).min(bytes.len());
                    bytes.splice(i..end, pattern.iter().copied());
                }
            }
        }
    }
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<usize>(), any::<u8>()).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::SetByte { at, value }),
        2 => any::<usize>().prop_map(|keep| Mutation::Truncate { keep }),
        1 => prop::collection::vec(any::<u8>(), 1..32).prop_map(Mutation::Append),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<usize>(), 1..16usize).prop_map(|(at, len)| Mutation::Remove { at, len }),
        3 => (any::<usize>(), any::<usize>(), any::<bool>())
            .prop_map(|(at, pattern, insert)| Mutation::Huge { at, pattern, insert }),
    ]
}

/// One of `valid` (encodings that decode), changed by one to four mutations.
pub fn mutated(valid: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    assert!(!valid.is_empty(), "mutations need a valid encoding to start from");
    (0..valid.len(), prop::collection::vec(mutation(), 1..5)).prop_map(move |(i, mutations)| {
        let mut bytes = valid[i].clone();
        for m in &mutations {
            m.apply(&mut bytes);
        }
        bytes
    })
}

/// Arbitrary bytes, or a mutation of one of `valid`: what every decoder property runs on.
pub fn corrupt(valid: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..512),
        3 => mutated(valid),
    ]
}
