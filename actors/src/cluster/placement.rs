//! Where things live in a cluster: the partition of every actor (by a stable hash of its
//! journal stream) and every NATS subject and key-value key Dropline uses, built here and
//! nowhere else.

/// Partitions when none are configured. Fixed for the life of a cluster: every node must
/// use the same number (the first node records it; the others check it).
pub const PARTITIONS_DEFAULT: u32 = 32;

/// The partition of an actor, from its journal stream name (`sku/<drop>/<sku>`,
/// `hub/<hub>`, `creator/<creator>`, `drop/<drop>`, `registry`). blake3 rather than the
/// standard library's hasher, which is not stable across Rust releases.
pub fn partition_of(stream: &str, partitions: u32) -> u32 {
    let hash = blake3::hash(stream.as_bytes());
    let head = u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"));
    (head % u64::from(partitions.max(1))) as u32
}

/// The JetStream stream holding every actor's journal, one subject per actor.
pub const JOURNAL_STREAM: &str = "DROPLINE_JOURNAL";
/// Subjects of [`JOURNAL_STREAM`].
pub const JOURNAL_SUBJECTS: &str = "dl.j.>";
/// Key-value buckets.
pub const LEASES_BUCKET: &str = "dropline_leases";
pub const NODES_BUCKET: &str = "dropline_nodes";
pub const WAKEUPS_BUCKET: &str = "dropline_wakeups";
pub const ADDRESSES_BUCKET: &str = "dropline_addresses";
pub const CLUSTER_BUCKET: &str = "dropline_cluster";
/// Projection updates (availability, order tracking, courier offers, statement lines,
/// directory changes, audit entries), published by the node whose actor made them; every
/// node consumes them with its own durable consumer.
pub const EVENTS_STREAM: &str = "DROPLINE_EVENTS";
pub const EVENTS_SUBJECTS: &str = "dl.e.>";

/// The subject of a node's projection updates.
pub fn events_subject(node: &str) -> String {
    format!("dl.e.{node}")
}

/// The durable consumer through which a node follows every node's projection updates.
pub fn events_consumer(node: &str) -> String {
    format!("projections-{node}")
}
/// Queue group of command subscribers (one node answers a command).
pub const COMMAND_QUEUE: &str = "dropline";

/// Actor ids are slugs (`[A-Za-z0-9_-]`), so a stream name maps to subject tokens by
/// turning its `/` separators into `.`, and back.
fn tokens(stream: &str) -> String {
    stream.replace('/', ".")
}

/// The journal subject of an actor's stream.
pub fn journal_subject(stream: &str) -> String {
    format!("dl.j.{}", tokens(stream))
}

/// The stream of a journal subject.
pub fn stream_of_journal_subject(subject: &str) -> Option<String> {
    subject.strip_prefix("dl.j.").map(|rest| rest.replace('.', "/"))
}

/// The subject a partition's owner answers commands on.
pub fn command_subject(partition: u32) -> String {
    format!("dl.c.{partition}")
}

/// The lease key of a partition.
pub fn lease_key(partition: u32) -> String {
    format!("p{partition}")
}

/// The wake-up key of a stream: under its partition, so a node taking a partition finds
/// that partition's deadlines alone.
pub fn wakeup_key(partition: u32, stream: &str) -> String {
    format!("p{partition}.{}", tokens(stream))
}

/// The stream of a wake-up key.
pub fn stream_of_wakeup_key(key: &str) -> Option<String> {
    let (_, rest) = key.split_once('.')?;
    Some(rest.replace('.', "/"))
}

/// A key-value key for an order's address.
pub fn address_key(order_id: &str) -> String {
    format!("o.{order_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_spread() {
        // Pinned: a change of hash would move every actor of a running cluster.
        assert_eq!(
            partition_of("sku/drop-1/sku-a", 32),
            partition_of("sku/drop-1/sku-a", 32)
        );
        let mut counts = [0u32; 8];
        for i in 0..8_000 {
            counts[partition_of(&format!("sku/d/s{i}"), 8) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1_200).contains(c)), "{counts:?}");
        assert_eq!(partition_of("anything", 1), 0);
    }

    #[test]
    fn subjects_and_keys_map_back_to_streams() {
        for stream in ["sku/d-1/s_2", "hub/h1", "registry", "creator/ana"] {
            assert_eq!(
                stream_of_journal_subject(&journal_subject(stream)).as_deref(),
                Some(stream)
            );
            assert_eq!(stream_of_wakeup_key(&wakeup_key(3, stream)).as_deref(), Some(stream));
        }
        assert_eq!(journal_subject("sku/d/s"), "dl.j.sku.d.s");
        assert_eq!(wakeup_key(7, "hub/h"), "p7.hub.h");
    }
}
