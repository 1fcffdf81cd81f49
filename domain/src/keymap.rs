//! [`KeyMap`]: an ordered map for the per-buyer state of a hot SKU, keyed by ids that live
//! behind a pointer (`Arc<str>`).
//!
//! A `BTreeMap<OrderId, _>` compares keys as strings, and every comparison reads the other
//! key's bytes through its pointer: with 100,000 holds a lookup makes ~30 such reads, most of
//! them cache misses, and order ids of one SKU share a long prefix (`<drop>.<sku>.`) on top.
//! On the hot-SKU benchmark the searches of the SKU's maps were 11 % of the server's CPU.
//! `KeyMap` sorts by a 64-bit hash of the key first, kept inline in the tree's nodes, and by
//! the key itself only between equal hashes: a search reads one key through its pointer, the
//! one it finds, and stays exact whatever the hashes.
//!
//! It stays a B-tree, not a hash map, for the reason `SkuState` gives: a tree grows a node at
//! a time, where a hash map rehashes everything at once (a 50–150 ms stall of the hot SKU at
//! 28k and 57k holds). Iteration is in hash order, the same on every run of a build (the
//! hasher has fixed keys), so replays and property tests see the same order every time;
//! another Rust release may hash differently, and nothing compares the order across
//! processes (lists for clients sort their own ids). Serialized it is a plain map of key to
//! value, the same bytes as a `BTreeMap<K, V>` with the entries in another order, so
//! snapshots written before it, or by another build, read back unchanged; the hashes are
//! computed again on load.

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::marker::PhantomData;
use std::ops::Index;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A key with its hash, ordered by the hash first.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Hashed<K> {
    hash: u64,
    key: K,
}

fn hash_of<Q: Hash + ?Sized>(key: &Q) -> u64 {
    // `DefaultHasher::new()` has fixed keys: the same hash for the same key on every run of
    // a build (std may change the algorithm between releases; see the module docs).
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    hasher.finish()
}

impl<K: Hash> Hashed<K> {
    fn new(key: K) -> Hashed<K> {
        Hashed {
            hash: hash_of(&key),
            key,
        }
    }
}

/// An ordered map sorted by the keys' hashes (see the module docs).
#[derive(Clone, PartialEq, Eq)]
pub struct KeyMap<K, V> {
    tree: BTreeMap<Hashed<K>, V>,
}

impl<K, V> Default for KeyMap<K, V> {
    fn default() -> Self {
        KeyMap { tree: BTreeMap::new() }
    }
}

impl<K: Hash + Ord + Clone, V> KeyMap<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// The search key for `key`. `Borrow` cannot serve here (a borrowed form of the key has
    /// no room for its hash), so the key is cloned: for the `Arc`-backed ids, a reference
    /// count.
    fn probe(key: &K) -> Hashed<K> {
        Hashed::new(key.clone())
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.tree.get(&Self::probe(key))
    }

    pub fn get_key_value(&self, key: &K) -> Option<(&K, &V)> {
        self.tree.get_key_value(&Self::probe(key)).map(|(k, v)| (&k.key, v))
    }

    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.tree.get_mut(&Self::probe(key))
    }

    pub fn contains_key(&self, key: &K) -> bool {
        self.tree.contains_key(&Self::probe(key))
    }

    /// Inserts `value` at `key`, returning the value it replaces.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.tree.insert(Hashed::new(key), value)
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        self.tree.remove(&Self::probe(key))
    }

    /// The value at `key`, inserted as `V::default()` first if absent.
    pub fn get_or_default(&mut self, key: &K) -> &mut V
    where
        V: Default,
    {
        self.tree.entry(Self::probe(key)).or_default()
    }

    /// Entries in hash order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.tree.iter().map(|(k, v)| (&k.key, v))
    }

    /// Values in hash order.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.tree.values()
    }
}

impl<K: Hash + Ord + Clone, V> Index<&K> for KeyMap<K, V> {
    type Output = V;

    /// Panics when `key` is absent, like `BTreeMap`'s index.
    fn index(&self, key: &K) -> &V {
        self.get(key).expect("no entry found for key")
    }
}

impl<K: Hash + Ord, V> FromIterator<(K, V)> for KeyMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(entries: I) -> Self {
        KeyMap {
            tree: entries.into_iter().map(|(k, v)| (Hashed::new(k), v)).collect(),
        }
    }
}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for KeyMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.tree.iter().map(|(k, v)| (&k.key, v)))
            .finish()
    }
}

impl<K: Serialize, V: Serialize> Serialize for KeyMap<K, V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.tree.len()))?;
        for (k, v) in &self.tree {
            map.serialize_entry(&k.key, v)?;
        }
        map.end()
    }
}

impl<'de, K, V> Deserialize<'de> for KeyMap<K, V>
where
    K: Deserialize<'de> + Hash + Ord,
    V: Deserialize<'de>,
{
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor<K, V>(PhantomData<(K, V)>);

        impl<'de, K, V> Visitor<'de> for MapVisitor<K, V>
        where
            K: Deserialize<'de> + Hash + Ord,
            V: Deserialize<'de>,
        {
            type Value = KeyMap<K, V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
                let mut tree = BTreeMap::new();
                while let Some((k, v)) = access.next_entry::<K, V>()? {
                    tree.insert(Hashed::new(k), v);
                }
                Ok(KeyMap { tree })
            }
        }

        deserializer.deserialize_map(MapVisitor(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every operation agrees with a `BTreeMap` given the same operations, whatever the
        /// keys (including ones that share long prefixes, like a SKU's order ids).
        #[test]
        fn behaves_like_a_btree_map(ops in prop::collection::vec((0u8..4, 0u16..300, any::<u32>()), 1..400)) {
            let mut ours: KeyMap<String, u32> = KeyMap::new();
            let mut model: BTreeMap<String, u32> = BTreeMap::new();
            for (op, k, v) in ops {
                let key = format!("drop-2026-12-01.sku-hot.{k:016x}");
                match op {
                    0 => prop_assert_eq!(ours.insert(key.clone(), v), model.insert(key, v)),
                    1 => prop_assert_eq!(ours.remove(&key), model.remove(&key)),
                    2 => {
                        *ours.get_or_default(&key) += 1;
                        *model.entry(key).or_default() += 1;
                    }
                    _ => {
                        prop_assert_eq!(ours.get(&key), model.get(&key));
                        prop_assert_eq!(ours.contains_key(&key), model.contains_key(&key));
                        prop_assert_eq!(ours.get_key_value(&key), model.get_key_value(&key));
                    }
                }
                prop_assert_eq!(ours.len(), model.len());
            }
            let mut entries: Vec<(String, u32)> = ours.iter().map(|(k, v)| (k.clone(), *v)).collect();
            entries.sort();
            let expected: Vec<(String, u32)> = model.into_iter().collect();
            prop_assert_eq!(entries, expected);
        }
    }

    #[test]
    fn serializes_as_a_btree_map_and_reads_one_back() {
        let model: BTreeMap<String, u32> = (0..50).map(|i| (format!("k-{i}"), i)).collect();
        // A snapshot written with a BTreeMap reads back as a KeyMap (postcard: the journal's
        // codec) …
        let ours: KeyMap<String, u32> =
            postcard::from_bytes(&postcard::to_allocvec(&model).expect("encodes")).expect("decodes");
        assert_eq!(ours.len(), 50);
        assert!((0..50).all(|i| ours.get(&format!("k-{i}")) == Some(&i)));
        // … and a KeyMap reads back as the same BTreeMap.
        let back: BTreeMap<String, u32> =
            postcard::from_bytes(&postcard::to_allocvec(&ours).expect("encodes")).expect("decodes");
        assert_eq!(back, model);
    }

    #[test]
    fn iteration_order_is_the_same_for_the_same_contents() {
        let forward: KeyMap<String, u32> = (0..100).map(|i| (format!("k-{i}"), i)).collect();
        let backward: KeyMap<String, u32> = (0..100).rev().map(|i| (format!("k-{i}"), i)).collect();
        assert_eq!(forward, backward);
        assert!(forward.iter().eq(backward.iter()));
    }
}
