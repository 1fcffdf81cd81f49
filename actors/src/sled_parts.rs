//! Large values (snapshots) in sled: stored in parts, written a slice at a time.
//!
//! Two properties of sled 0.34 make a whole multi-megabyte value expensive for everything
//! around it:
//! - a leaf splits by its number of keys (more than 16), never by its size, and is rewritten
//!   whole on every consolidation (every 10th change to it) and whenever it is paged back
//!   into the cache. Whole snapshots sharing leaves with the hot event keys of later drops
//!   made the journal writer copy 125 MB leaves: a second hot-SKU burst on the same server
//!   fell from 33,000 to 5,200 reserves/s.
//! - `apply_batch` holds a process-wide lock that every other read and write waits for. A
//!   35 MB snapshot of a SKU with 100,000 holds, written as one batch, held it for 180–330
//!   ms: every buyer of every drop waited that long.
//!
//! So a value is split into parts of at most [`PART_MAX_BYTES`] (a leaf of 16 parts is
//! rewritten inline, never as a blob file) and [`PartsWrite`] applies them a few at a time,
//! between other batches. The parts of a new value go under its own generation, and a last
//! small batch switches the header to it, so a reader sees the old value or the new one,
//! never a mix, and a crash part-way leaves the old one intact; older generations are
//! removed afterwards, again a few at a time.
//!
//! Keys (chosen by the caller, see [`Keys`]): the header holds the generation (8 bytes),
//! the value's length (8), its number of parts (4) and the caller's tag (8: a snapshot's
//! version), big-endian; part `i` of generation `g` is `parts ‖ g (8 bytes BE) ‖ i (4
//! bytes BE)`. Every write has a generation of its own (sled's `generate_id`, unique across
//! restarts), so a write never touches the parts a reader may be reading, even when it
//! stores the same tag again. A value an earlier version stored whole under a legacy key is
//! still read (tag 0), and removed by the next write's switch.

/// The largest part: 16 of them (a full leaf) stay under sled's inline limit for its
/// default 512 KiB segments (a quarter segment), so a rewritten leaf is never a blob file.
pub const PART_MAX_BYTES: usize = 7 * 1024;

const HEADER_LEN: usize = 28;

/// Where one value lives. `parts` must not be a prefix of any other key of the tree than
/// this value's parts.
#[derive(Debug, Clone)]
pub struct Keys {
    pub header: Vec<u8>,
    pub parts: Vec<u8>,
    pub legacy: Vec<u8>,
}

impl Keys {
    fn part(&self, generation: u64, part: u32) -> Vec<u8> {
        let mut key = Vec::with_capacity(self.parts.len() + 12);
        key.extend_from_slice(&self.parts);
        key.extend_from_slice(&generation.to_be_bytes());
        key.extend_from_slice(&part.to_be_bytes());
        key
    }
}

fn io(e: sled::Error) -> String {
    e.to_string()
}

/// A value's header.
struct Header {
    generation: u64,
    len: u64,
    parts: u32,
    tag: u64,
}

impl Header {
    fn parse(bytes: &[u8]) -> Result<Header, String> {
        let bytes: [u8; HEADER_LEN] = bytes.try_into().map_err(|_| "header is not 28 bytes".to_string())?;
        Ok(Header {
            generation: u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes")),
            len: u64::from_be_bytes(bytes[8..16].try_into().expect("8 bytes")),
            parts: u32::from_be_bytes(bytes[16..20].try_into().expect("4 bytes")),
            tag: u64::from_be_bytes(bytes[20..].try_into().expect("8 bytes")),
        })
    }

    fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HEADER_LEN);
        bytes.extend_from_slice(&self.generation.to_be_bytes());
        bytes.extend_from_slice(&self.len.to_be_bytes());
        bytes.extend_from_slice(&self.parts.to_be_bytes());
        bytes.extend_from_slice(&self.tag.to_be_bytes());
        bytes
    }
}

/// The value, if any, with its tag (0 for a legacy value).
pub fn get(tree: &sled::Tree, keys: &Keys) -> Result<Option<(u64, Vec<u8>)>, String> {
    // A write may switch the header and remove what the reader was about to read (the old
    // generation's parts, or the legacy value) in between: read again once it has moved on.
    let mut previous = None;
    for _ in 0..3 {
        let Some(head) = tree.get(&keys.header).map_err(io)? else {
            if let Some(legacy) = tree.get(&keys.legacy).map_err(io)? {
                return Ok(Some((0, legacy.to_vec())));
            }
            if tree.get(&keys.header).map_err(io)?.is_some() {
                continue;
            }
            return Ok(None);
        };
        let head = Header::parse(&head)?;
        match read_parts(tree, keys, &head)? {
            Ok(value) => return Ok(Some((head.tag, value))),
            Err(missing) if previous == Some(head.generation) => return Err(missing),
            Err(_) => previous = Some(head.generation),
        }
    }
    Err("the value kept changing while being read".into())
}

/// The parts of one generation, or why they do not add up to the header. The header's
/// length sizes nothing until the parts are found to add up to it: a corrupt header claiming
/// terabytes is an error, not an allocation. The parts are gathered as sled holds them
/// (shared, not copied), then copied once into a buffer of their total.
fn read_parts(tree: &sled::Tree, keys: &Keys, head: &Header) -> Result<Result<Vec<u8>, String>, String> {
    let Header {
        generation, len, parts, ..
    } = *head;
    let mut found = Vec::new();
    let mut total = 0u64;
    if parts > 0 {
        for item in tree.range(keys.part(generation, 0)..=keys.part(generation, parts - 1)) {
            let (key, part) = item.map_err(io)?;
            // A part's key is the prefix, the generation and its index; any other key in the
            // range is not one of them.
            let index = key
                .get(keys.parts.len() + 8..)
                .and_then(|index| <[u8; 4]>::try_from(index).ok())
                .map(u32::from_be_bytes);
            if index != u32::try_from(found.len()).ok() {
                return Ok(Err(format!(
                    "generation {generation}: part {} of {parts} is missing",
                    found.len()
                )));
            }
            total += part.len() as u64;
            if total > len {
                break;
            }
            found.push(part);
        }
    }
    if found.len() as u64 != u64::from(parts) || total != len {
        return Ok(Err(format!(
            "generation {generation}: {} of {parts} parts, {total} of {len} bytes",
            found.len()
        )));
    }
    let mut value = Vec::with_capacity(total as usize);
    for part in &found {
        value.extend_from_slice(part);
    }
    Ok(Ok(value))
}

/// Replacing a value, one slice (a sled batch of at most `slice` writes) per [`step`]:
/// the new generation's parts, then the switch of the header, then the removal of every
/// other generation's parts. Only one write per value may run at a time.
///
/// [`step`]: PartsWrite::step
pub struct PartsWrite {
    keys: Keys,
    generation: u64,
    tag: u64,
    value: Vec<u8>,
    stage: Stage,
}

enum Stage {
    /// Writing parts from this index.
    Parts(u32),
    Switch,
    /// Removing other generations' parts from this key on.
    Cleanup(Vec<u8>),
    Done,
}

impl PartsWrite {
    /// A write of `value` tagged `tag`, under `generation`: a number no other write of any
    /// value in the tree has used (from sled's `generate_id`).
    pub fn new(keys: Keys, generation: u64, tag: u64, value: Vec<u8>) -> PartsWrite {
        PartsWrite {
            keys,
            generation,
            tag,
            value,
            stage: Stage::Parts(0),
        }
    }

    /// Whether a slice has been applied already.
    pub fn started(&self) -> bool {
        !matches!(self.stage, Stage::Parts(0))
    }

    /// Bytes still held for writing.
    pub fn bytes(&self) -> usize {
        self.value.len()
    }

    fn parts(&self) -> u32 {
        u32::try_from(self.value.len().div_ceil(PART_MAX_BYTES)).expect("fewer than 2^32 parts")
    }

    /// Applies the next slice; `true` once the write is complete.
    pub fn step(&mut self, tree: &sled::Tree, slice: usize) -> sled::Result<bool> {
        let slice = slice.max(1);
        match &self.stage {
            Stage::Parts(from) => {
                let from = *from;
                let mut batch = sled::Batch::default();
                let mut index = from;
                for part in self.value.chunks(PART_MAX_BYTES).skip(from as usize).take(slice) {
                    batch.insert(self.keys.part(self.generation, index), part);
                    index += 1;
                }
                tree.apply_batch(batch)?;
                self.stage = if index >= self.parts() {
                    Stage::Switch
                } else {
                    Stage::Parts(index)
                };
            }
            Stage::Switch => {
                let head = Header {
                    generation: self.generation,
                    len: self.value.len() as u64,
                    parts: self.parts(),
                    tag: self.tag,
                };
                let mut batch = sled::Batch::default();
                batch.insert(self.keys.header.as_slice(), head.encode());
                batch.remove(self.keys.legacy.as_slice());
                tree.apply_batch(batch)?;
                self.value = Vec::new();
                self.stage = Stage::Cleanup(self.keys.parts.clone());
            }
            Stage::Cleanup(from) => {
                let mut batch = sled::Batch::default();
                let mut removed = 0;
                let mut next = None;
                for item in tree.range(from.clone()..) {
                    let (key, _) = item?;
                    if !key.starts_with(&self.keys.parts) {
                        break;
                    }
                    if removed == slice {
                        next = Some(key.to_vec());
                        break;
                    }
                    let generation = key.get(self.keys.parts.len()..self.keys.parts.len() + 8);
                    if generation == Some(self.generation.to_be_bytes().as_slice()) {
                        // Skip this generation's own parts without reading them.
                        next = self.generation.checked_add(1).map(|after| {
                            let mut key = self.keys.parts.clone();
                            key.extend_from_slice(&after.to_be_bytes());
                            key
                        });
                        break;
                    }
                    batch.remove(key);
                    removed += 1;
                }
                if removed > 0 {
                    tree.apply_batch(batch)?;
                }
                self.stage = match next {
                    Some(key) => Stage::Cleanup(key),
                    None => Stage::Done,
                };
            }
            Stage::Done => {}
        }
        Ok(matches!(self.stage, Stage::Done))
    }

    /// Runs every remaining step.
    pub fn finish(&mut self, tree: &sled::Tree, slice: usize) -> Result<(), String> {
        while !self.step(tree, slice).map_err(io)? {}
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Store {
        _dir: tempfile::TempDir,
        db: sled::Db,
        tree: sled::Tree,
    }

    fn store() -> Store {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        Store { _dir: dir, db, tree }
    }

    fn keys(name: &str) -> Keys {
        Keys {
            header: format!("S/{name}").into_bytes(),
            parts: format!("s/{name}\0").into_bytes(),
            legacy: format!("s/{name}").into_bytes(),
        }
    }

    impl Store {
        fn start(&self, name: &str, tag: u64, value: &[u8]) -> PartsWrite {
            PartsWrite::new(keys(name), self.db.generate_id().unwrap(), tag, value.to_vec())
        }

        fn write(&self, name: &str, tag: u64, value: &[u8]) {
            self.start(name, tag, value).finish(&self.tree, 4).unwrap();
        }

        fn get(&self, name: &str) -> Option<(u64, Vec<u8>)> {
            get(&self.tree, &keys(name)).unwrap()
        }

        fn parts(&self, name: &str) -> usize {
            self.tree.scan_prefix(keys(name).parts).count()
        }
    }

    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn values_of_any_size_round_trip_and_old_generations_are_removed() {
        let store = store();
        let sizes = [
            0,
            1,
            PART_MAX_BYTES - 1,
            PART_MAX_BYTES,
            PART_MAX_BYTES + 1,
            10 * PART_MAX_BYTES + 17,
        ];
        for (tag, len) in sizes.into_iter().enumerate() {
            let value = bytes(len, len as u8);
            store.write("a", tag as u64 + 1, &value);
            assert_eq!(store.get("a"), Some((tag as u64 + 1, value)), "{len}");
        }
        // A neighbour whose name extends the first is separate.
        store.write("ab", 1, b"other");
        // Only the last generation's 11 parts are left.
        assert_eq!(store.parts("a"), 11);
        store.write("a", 20, b"small");
        assert_eq!(store.get("a"), Some((20, b"small".to_vec())));
        assert_eq!(store.parts("a"), 1);
        assert_eq!(store.get("ab"), Some((1, b"other".to_vec())));
        assert_eq!(store.get("none"), None);
        store.write("big", 1, &bytes(100 * PART_MAX_BYTES, 3));
        assert!(store
            .tree
            .scan_prefix(b"s/big\0")
            .all(|item| item.unwrap().1.len() <= PART_MAX_BYTES));
    }

    #[test]
    fn until_the_switch_readers_see_the_old_value_and_each_slice_is_bounded() {
        let store = store();
        let old = bytes(5 * PART_MAX_BYTES, 1);
        store.write("a", 1, &old);
        let new = bytes(9 * PART_MAX_BYTES + 5, 2);
        let mut writing = store.start("a", 2, &new);
        // Ten parts in slices of 3: four steps, each adding at most 3 keys.
        for _ in 0..4 {
            let before = store.tree.len();
            assert!(!writing.step(&store.tree, 3).unwrap());
            assert!(store.tree.len() - before <= 3);
            assert_eq!(store.get("a"), Some((1, old.clone())));
        }
        // The switch.
        assert!(!writing.step(&store.tree, 3).unwrap());
        assert_eq!(store.get("a"), Some((2, new.clone())));
        // Then the old generation's 5 parts go, 3 at most per step.
        let mut steps = 0;
        loop {
            let before = store.tree.len();
            let done = writing.step(&store.tree, 3).unwrap();
            assert!(before - store.tree.len() <= 3);
            steps += 1;
            if done {
                break;
            }
        }
        assert!(steps <= 3, "{steps} steps");
        assert_eq!(store.parts("a"), 10);
        assert_eq!(store.get("a"), Some((2, new)));
    }

    #[test]
    fn writing_the_same_tag_again_leaves_the_parts_being_read_alone() {
        // A state encodes to different bytes at the same version (hash maps iterate in
        // another order): a second write of version 7 must not overwrite the first's parts.
        let store = store();
        let first = bytes(3 * PART_MAX_BYTES, 1);
        store.write("a", 7, &first);
        let mut again = store.start("a", 7, &bytes(3 * PART_MAX_BYTES, 2));
        again.step(&store.tree, 2).unwrap();
        assert_eq!(store.get("a"), Some((7, first)));
    }

    #[test]
    fn a_write_abandoned_before_its_switch_changes_nothing_and_the_next_one_clears_it() {
        let store = store();
        store.write("a", 5, b"kept");
        let mut abandoned = store.start("a", 9, &bytes(4 * PART_MAX_BYTES, 7));
        abandoned.step(&store.tree, 2).unwrap();
        drop(abandoned);
        assert_eq!(store.get("a"), Some((5, b"kept".to_vec())));
        store.write("a", 7, b"next");
        assert_eq!(store.get("a"), Some((7, b"next".to_vec())));
        assert_eq!(store.parts("a"), 1, "the abandoned write's parts removed too");
    }

    #[test]
    fn a_legacy_whole_value_is_read_and_replaced() {
        let store = store();
        store.tree.insert(b"s/old", b"whole value".as_slice()).unwrap();
        assert_eq!(store.get("old"), Some((0, b"whole value".to_vec())));
        store.write("old", 3, b"new");
        assert_eq!(store.get("old"), Some((3, b"new".to_vec())));
        assert!(store.tree.get(b"s/old").unwrap().is_none(), "legacy key removed");
    }

    #[test]
    fn a_missing_part_is_reported() {
        let store = store();
        store.write("a", 1, &bytes(3 * PART_MAX_BYTES, 1));
        let second = store.tree.scan_prefix(keys("a").parts).nth(1).unwrap().unwrap().0;
        store.tree.remove(second).unwrap();
        let err = get(&store.tree, &keys("a")).unwrap_err();
        assert!(err.contains("part 1 of 3"), "{err}");
    }
}
