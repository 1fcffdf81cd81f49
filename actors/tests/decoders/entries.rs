//! Journal entries (`codec::decode`: snapshots and events of every hosted kind, audit
//! entries) and what nodes send each other (`bus::wire_decode`: every kind's commands and
//! replies).

use crate::{allocation_bound, fuzz, guarded, seeds};
use actors::audit_log::AuditEntry;
use actors::bus::{wire_decode, wire_encode};
use actors::codec;
use domain::drop::DropState;
use domain::hub::HubState;
use domain::ledger::LedgerState;
use domain::registry::RegistryState;
use domain::sku::SkuState;
use domain::Aggregate;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A decoder and its encoder, in one of the two formats.
struct Format<T> {
    decode: fn(&[u8]) -> Result<T, String>,
    encode: fn(&T) -> Vec<u8>,
}

fn journal<T: Serialize + DeserializeOwned>() -> Format<T> {
    Format {
        decode: |bytes| codec::decode(bytes),
        encode: |value| codec::encode(value),
    }
}

fn wire<T: Serialize + DeserializeOwned>() -> Format<T> {
    Format {
        decode: |bytes| wire_decode(bytes).map_err(|e| e.to_string()),
        encode: |value| wire_encode(value).expect("a decoded value encodes"),
    }
}

/// Every one of `valid` decodes; and any corruption of them (or arbitrary bytes) is an
/// error, or a value that encodes and decodes back to itself, within the time guard and
/// the allocation bound.
fn property<T: PartialEq + Send + 'static>(name: &str, valid: Vec<Vec<u8>>, format: Format<T>) {
    assert!(!valid.is_empty(), "{name}: no valid encodings to start from");
    for (i, bytes) in valid.iter().enumerate() {
        if let Err(e) = (format.decode)(bytes) {
            panic!("{name}: valid encoding {i} does not decode: {e}");
        }
    }
    let Format { decode, encode } = format;
    let mut runner = TestRunner::new(fuzz::config());
    let outcome = runner.run(&fuzz::corrupt(valid), |bytes| {
        let len = bytes.len();
        let (stable, largest) = guarded(move || match decode(&bytes) {
            Err(_) => Ok(()),
            Ok(value) => match decode(&encode(&value)) {
                Ok(again) if again == value => Ok(()),
                Ok(_) => Err("decoded, but its encoding decodes to another value".to_string()),
                Err(e) => Err(format!("decoded, but its encoding does not: {e}")),
            },
        });
        prop_assert!(stable.is_ok(), "{}", stable.unwrap_err());
        prop_assert!(
            largest <= allocation_bound(len),
            "{len} bytes made an allocation of {largest} bytes"
        );
        Ok(())
    });
    if let Err(e) = outcome {
        panic!("{name}: {e}");
    }
}

/// The four decoders of a hosted kind: its snapshots and events (journal), its commands
/// and replies (wire).
fn kind<H>(name: &str, seeds: seeds::Seeds)
where
    H: Aggregate + Serialize + DeserializeOwned + PartialEq + Send + 'static,
    H::Event: Serialize + DeserializeOwned + PartialEq + Send + 'static,
    H::Command: Serialize + DeserializeOwned + PartialEq + Send + 'static,
    H::Reply: Serialize + DeserializeOwned + PartialEq + Send + 'static,
{
    assert!(
        seeds.events.len() >= 3,
        "{name}: the seeds' life made only {} events",
        seeds.events.len()
    );
    property(&format!("{name} snapshots"), seeds.snapshots, journal::<H>());
    property(&format!("{name} events"), seeds.events, journal::<H::Event>());
    property(&format!("{name} commands"), seeds.commands, wire::<H::Command>());
    property(&format!("{name} replies"), seeds.replies, wire::<H::Reply>());
}

#[test]
fn drop_entries_and_messages() {
    kind::<DropState>("drop", seeds::drop());
}

#[test]
fn sku_entries_and_messages() {
    kind::<SkuState>("sku", seeds::sku());
}

#[test]
fn hub_entries_and_messages() {
    kind::<HubState>("hub", seeds::hub());
}

#[test]
fn ledger_entries_and_messages() {
    kind::<LedgerState>("creator ledger", seeds::ledger());
}

#[test]
fn registry_entries_and_messages() {
    kind::<RegistryState>("registry", seeds::registry());
}

#[test]
fn audit_entries() {
    property("audit entries", seeds::audit_entries(), journal::<AuditEntry>());
}

/// An entry whose format tag is not the current one is refused with a reason, whatever
/// follows the tag.
#[test]
fn entries_of_other_formats_are_refused() {
    let mut runner = TestRunner::new(fuzz::config());
    runner
        .run(
            &(
                any::<u8>().prop_filter("not the current format", |t| *t != 2),
                prop::collection::vec(any::<u8>(), 0..64),
            ),
            |(tag, body)| {
                let bytes = [vec![tag], body].concat();
                prop_assert!(codec::decode::<SkuState>(&bytes).is_err());
                Ok(())
            },
        )
        .unwrap();
    assert!(codec::decode::<SkuState>(&[]).is_err());
}
