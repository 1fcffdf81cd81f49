//! Large values (snapshots) in sled, stored as parts of at most [`PART_MAX_BYTES`].
//!
//! sled 0.34 splits a leaf by its number of keys (more than 16), never by its size, and
//! rewrites the whole leaf on every consolidation (every 10th change to it) and whenever it
//! is paged back into its cache. A few multi-megabyte snapshots sharing a leaf with other
//! keys therefore turned every tenth append near them into a rewrite of hundreds of
//! megabytes: measured on the embedded journal, a second hot-SKU burst on the same server
//! fell from 33,000 to 5,200 reserves/s while the journal writer copied 125 MB leaves.
//! Split into parts, a leaf holds at most 16 parts, so a rewrite is bounded by
//! `16 × PART_MAX_BYTES` whatever the size of the snapshots around it.
//!
//! Layout under a value's `name` (which never contains a NUL byte): `name\0` followed by a
//! 4-byte big-endian part index. Part 0 is the header (total length, 8 bytes, and number of
//! parts, 4 bytes, both big-endian); parts 1..=n hold the bytes. A value stored whole under
//! `name` by an earlier version is still read, and removed when the value is next written.

/// The largest part: 16 of them (a full leaf) stay under sled's inline limit for its
/// default 512 KiB segments (a quarter segment), so a rewritten leaf is never a blob file.
pub const PART_MAX_BYTES: usize = 7 * 1024;

const HEADER_LEN: usize = 12;

fn part_key(name: &[u8], part: u32) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + 5);
    key.extend_from_slice(name);
    key.push(0);
    key.extend_from_slice(&part.to_be_bytes());
    key
}

fn header(bytes: &[u8]) -> Result<(u64, u32), String> {
    let bytes: [u8; HEADER_LEN] = bytes.try_into().map_err(|_| "header is not 12 bytes".to_string())?;
    let len = u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"));
    let parts = u32::from_be_bytes(bytes[8..].try_into().expect("4 bytes"));
    Ok((len, parts))
}

/// Adds to `batch` the writes that replace the value under `name` by `value`: its header,
/// its parts, and the removal of parts (or a whole legacy value) the previous one had
/// beyond them. The previous header is read from `tree`, so write one value per name per
/// batch.
pub fn put(tree: &sled::Tree, batch: &mut sled::Batch, name: &[u8], value: &[u8]) -> Result<(), String> {
    let old_parts = match tree.get(part_key(name, 0)).map_err(|e| e.to_string())? {
        Some(bytes) => header(&bytes)?.1,
        None => 0,
    };
    let parts = u32::try_from(value.len().div_ceil(PART_MAX_BYTES)).map_err(|_| "value too large".to_string())?;
    let mut head = Vec::with_capacity(HEADER_LEN);
    head.extend_from_slice(&(value.len() as u64).to_be_bytes());
    head.extend_from_slice(&parts.to_be_bytes());
    batch.insert(part_key(name, 0), head);
    for (i, part) in value.chunks(PART_MAX_BYTES).enumerate() {
        batch.insert(part_key(name, i as u32 + 1), part);
    }
    for stale in parts + 1..=old_parts {
        batch.remove(part_key(name, stale));
    }
    batch.remove(name);
    Ok(())
}

/// The value under `name`, if any; an error when its parts do not add up to its header.
pub fn get(tree: &sled::Tree, name: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let Some(head) = tree.get(part_key(name, 0)).map_err(|e| e.to_string())? else {
        return tree
            .get(name)
            .map(|legacy| legacy.map(|v| v.to_vec()))
            .map_err(|e| e.to_string());
    };
    let (len, parts) = header(&head)?;
    let mut value = Vec::with_capacity(usize::try_from(len).map_err(|_| "value too large".to_string())?);
    let mut next = 1u32;
    for item in tree.range(part_key(name, 1)..=part_key(name, parts)) {
        let (key, part) = item.map_err(|e| e.to_string())?;
        let index = u32::from_be_bytes(key[key.len() - 4..].try_into().expect("4-byte suffix"));
        if index != next {
            return Err(format!("part {next} of {parts} is missing"));
        }
        value.extend_from_slice(&part);
        next += 1;
    }
    if next != parts + 1 || value.len() as u64 != len {
        return Err(format!("{} of {parts} parts, {} of {len} bytes", next - 1, value.len()));
    }
    Ok(Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, sled::Tree) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        (dir, tree)
    }

    fn write(tree: &sled::Tree, name: &[u8], value: &[u8]) {
        let mut batch = sled::Batch::default();
        put(tree, &mut batch, name, value).unwrap();
        tree.apply_batch(batch).unwrap();
    }

    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn values_of_any_size_round_trip_and_shrinking_leaves_no_stale_parts() {
        let (_dir, tree) = tree();
        for len in [
            0,
            1,
            PART_MAX_BYTES - 1,
            PART_MAX_BYTES,
            PART_MAX_BYTES + 1,
            10 * PART_MAX_BYTES + 17,
        ] {
            let value = bytes(len, len as u8);
            write(&tree, b"s/a", &value);
            assert_eq!(get(&tree, b"s/a").unwrap(), Some(value), "length {len}");
        }
        // A neighbour whose name extends the first is separate.
        write(&tree, b"s/ab", b"other");
        // Shrinking from 11 parts to 1 removes the other 10.
        write(&tree, b"s/a", b"small");
        assert_eq!(get(&tree, b"s/a").unwrap(), Some(b"small".to_vec()));
        assert_eq!(tree.scan_prefix(b"s/a\0").count(), 2, "header and one part");
        assert_eq!(get(&tree, b"s/ab").unwrap(), Some(b"other".to_vec()));
        assert_eq!(get(&tree, b"s/none").unwrap(), None);
        // Each part stays under the limit.
        write(&tree, b"s/big", &bytes(100 * PART_MAX_BYTES, 3));
        assert!(tree
            .scan_prefix(b"s/big\0")
            .all(|item| item.unwrap().1.len() <= PART_MAX_BYTES));
    }

    #[test]
    fn a_legacy_whole_value_is_read_and_replaced() {
        let (_dir, tree) = tree();
        tree.insert(b"s/old", b"whole value".as_slice()).unwrap();
        assert_eq!(get(&tree, b"s/old").unwrap(), Some(b"whole value".to_vec()));
        write(&tree, b"s/old", b"new");
        assert_eq!(get(&tree, b"s/old").unwrap(), Some(b"new".to_vec()));
        assert!(tree.get(b"s/old").unwrap().is_none(), "legacy key removed");
    }

    #[test]
    fn a_missing_part_is_reported() {
        let (_dir, tree) = tree();
        write(&tree, b"s/a", &bytes(3 * PART_MAX_BYTES, 1));
        tree.remove(part_key(b"s/a", 2)).unwrap();
        let err = get(&tree, b"s/a").unwrap_err();
        assert!(err.contains("part 2 of 3"), "{err}");
    }
}
