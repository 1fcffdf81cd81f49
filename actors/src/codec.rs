//! How events and snapshots are encoded in the journal: postcard, a compact, stable binary
//! serde format (about a third of JSON's size and several times faster to write and read,
//! which matters because a hot SKU encodes one event per buyer). Every entry starts with a
//! one-byte format tag so a later format can be introduced beside this one.
//!
//! Format 2 added the storefront that made each order, the confirmation's address digest
//! and the pinned waitlist place. postcard is not self-describing, so entries of format 1
//! cannot be read as format 2: they are refused with a message that says so, rather than
//! misread. Format 3 added one last field to the SKU's state (its edge leases); every other
//! entry is written as in format 2, so format 2 entries read as they are, and a SKU snapshot
//! of format 2 reads as one without leases (`decode_grown`). An older binary refuses format 3.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The format tag of postcard entries written before storefronts (no longer readable).
const POSTCARD_V1: u8 = 1;
/// The format tag of postcard entries before the SKU state's edge leases.
const POSTCARD_V2: u8 = 2;
/// The format tag of postcard entries.
const POSTCARD_V3: u8 = 3;

/// Encodes a journal entry.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    encode_with_capacity(value, 128)
}

/// Encodes a journal entry into a buffer of `capacity` bytes to start with: a big value
/// whose size is about known (a snapshot, from the last one) is then written without the
/// buffer doubling (and copying, and the kernel zeroing fresh pages) all along the way.
pub fn encode_with_capacity<T: Serialize>(value: &T, capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity.max(1));
    out.push(POSTCARD_V3);
    postcard::to_io(value, &mut out).expect("journal entries serialize: writing to a Vec cannot fail");
    out
}

/// Decodes a journal entry written by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    match bytes.split_first() {
        Some((&(POSTCARD_V2 | POSTCARD_V3), body)) => postcard::from_bytes(body).map_err(|e| e.to_string()),
        Some((&POSTCARD_V1, _)) => Err(
            "entry written by an older Dropline (format 1, before storefronts); this version reads format 2: start from a new data directory".into(),
        ),
        Some((tag, _)) => Err(format!("unknown journal entry format {tag}")),
        None => Err("empty journal entry".into()),
    }
}

/// Decodes a state that gained a last field in format 3: a format 2 entry is the format 3
/// one without it (postcard writes a struct's fields one after the other, with nothing
/// between or after), so it decodes with the encoding of the field's value for "none yet"
/// (`grown_default`) appended.
pub fn decode_grown<T: DeserializeOwned, G: Serialize>(bytes: &[u8], grown_default: &G) -> Result<T, String> {
    match bytes.split_first() {
        Some((&POSTCARD_V2, body)) => {
            let mut body = body.to_vec();
            postcard::to_io(grown_default, &mut body).map_err(|e| e.to_string())?;
            postcard::from_bytes(&body).map_err(|e| e.to_string())
        }
        _ => decode(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_unknown_formats() {
        let value = (42u64, "drop-1".to_string(), Some(vec![1u32, 2, 3]));
        let bytes = encode(&value);
        assert_eq!(decode::<(u64, String, Option<Vec<u32>>)>(&bytes).unwrap(), value);
        let mut other = bytes.clone();
        other[0] = 9;
        assert!(decode::<(u64, String, Option<Vec<u32>>)>(&other)
            .unwrap_err()
            .contains("format 9"));
        assert!(decode::<u64>(&[]).is_err());
    }

    #[test]
    fn a_format_2_state_reads_with_its_grown_last_field_empty() {
        #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
        struct Before(u64, String);
        #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
        struct After(u64, String, std::collections::BTreeMap<String, u32>);
        let mut old = vec![POSTCARD_V2];
        old.extend(postcard::to_allocvec(&Before(7, "sku".into())).unwrap());
        assert!(decode::<After>(&old).is_err(), "without the field it does not decode");
        let read: After = decode_grown(&old, &std::collections::BTreeMap::<String, u32>::new()).unwrap();
        assert_eq!(read, After(7, "sku".into(), Default::default()));
        let new = encode(&After(7, "sku".into(), [("edge".to_string(), 3)].into()));
        assert_eq!(
            decode_grown::<After, _>(&new, &0u8).unwrap(),
            decode::<After>(&new).unwrap()
        );
    }
}
