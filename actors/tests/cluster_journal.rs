//! The JetStream journal against a real NATS server (the pinned 2.15.1 from
//! scripts/install-nats.sh): appends are fenced by the subject's last sequence, so a node
//! that lost its partition cannot append after the new owner; recovery reads back exactly
//! what was acknowledged; local snapshots shorten the replay.

use actors::cluster::journal::JetStreamJournal;
use actors::cluster::node::ensure_storage;
use actors::journal::{AppendBatch, Journal, JournalError};
use std::sync::Arc;
use std::time::Duration;
use testkit::nats::LocalNats;

async fn append(journal: &Arc<JetStreamJournal>, batch: AppendBatch) -> Result<(), JournalError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    journal.try_reserve()?.append(
        batch,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    rx.await.expect("completion runs")
}

fn batch(stream: &str, first: u64, events: &[&str]) -> AppendBatch {
    AppendBatch {
        stream: stream.into(),
        first_version: first,
        events: events.iter().map(|e| e.as_bytes().to_vec()).collect(),
        ..AppendBatch::default()
    }
}

fn texts(events: &[(u64, Vec<u8>)]) -> Vec<(u64, String)> {
    events
        .iter()
        .map(|(v, e)| (*v, String::from_utf8(e.clone()).unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owner_cannot_append_after_the_new_owner() {
    let dir = tempfile::tempdir().unwrap();
    let nats = LocalNats::start(1, &dir.path().join("nats")).unwrap();
    let client = async_nats::connect(nats.url().as_str()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    ensure_storage(&js, 1, Duration::from_secs(5)).await.unwrap();
    let old = JetStreamJournal::open(&js, &dir.path().join("old"), 8).await.unwrap();
    let new = JetStreamJournal::open(&js, &dir.path().join("new"), 8).await.unwrap();
    let stream = "sku/d1/s1";

    // The old owner recovers the stream and appends.
    assert!(old.load(stream).await.unwrap().events.is_empty());
    append(&old, batch(stream, 1, &["a1", "a2"])).await.unwrap();

    // Its lease lapses; the new owner recovers what was acknowledged and appends.
    let recovered = new.load(stream).await.unwrap();
    assert_eq!(texts(&recovered.events), vec![(1, "a1".into()), (2, "a2".into())]);
    append(&new, batch(stream, 3, &["b3"])).await.unwrap();

    // The old owner, unaware, appends on its stale view: refused, nothing written.
    let refused = append(&old, batch(stream, 3, &["stale"])).await.unwrap_err();
    assert!(refused.to_string().contains("fenced"), "{refused}");
    let all = new.load_all(stream).await.unwrap();
    assert_eq!(texts(&all), vec![(1, "a1".into()), (2, "a2".into()), (3, "b3".into())]);

    // Group commit across queued batches, and a barrier with a snapshot.
    let (a, b) = tokio::join!(
        append(&new, batch(stream, 4, &["b4"])),
        append(&new, batch(stream, 5, &["b5", "b6"]))
    );
    a.unwrap();
    b.unwrap();
    append(
        &new,
        AppendBatch {
            stream: stream.into(),
            first_version: 7,
            snapshot: Some((6, b"state@6".to_vec())),
            ..AppendBatch::default()
        },
    )
    .await
    .unwrap();
    append(&new, batch(stream, 7, &["b7"])).await.unwrap();
    // The new owner replays from its local snapshot: only what came after it.
    let recovered = new.load(stream).await.unwrap();
    assert_eq!(recovered.snapshot, Some((6, b"state@6".to_vec())));
    assert_eq!(texts(&recovered.events), vec![(7, "b7".into())]);
    // The old owner has no snapshot of the new events: it replays the whole subject.
    let recovered = old.load(stream).await.unwrap();
    assert_eq!(recovered.snapshot, None);
    assert_eq!(recovered.events.len(), 7);
    // Having recovered, it may append again (it would own the partition again).
    append(&old, batch(stream, 8, &["a8"])).await.unwrap();

    assert_eq!(new.streams("sku/", None, 10).await.unwrap(), vec![stream.to_string()]);
    assert!(new.streams("hub/", None, 10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_are_kept_per_partition() {
    let dir = tempfile::tempdir().unwrap();
    let nats = LocalNats::start(1, &dir.path().join("nats")).unwrap();
    let client = async_nats::connect(nats.url().as_str()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    ensure_storage(&js, 1, Duration::from_secs(5)).await.unwrap();
    let journal = JetStreamJournal::open(&js, &dir.path().join("j"), 4).await.unwrap();
    let streams = ["sku/d/a", "sku/d/b", "hub/h1", "creator/c1"];
    for (i, stream) in streams.iter().enumerate() {
        journal.load(stream).await.unwrap();
        let mut b = batch(stream, 1, &["e"]);
        b.wakeup = Some(Some(1_000 + i as i64));
        append(&journal, b).await.unwrap();
    }
    // Clearing a deadline removes it.
    let mut cleared = batch("sku/d/b", 2, &["e"]);
    cleared.wakeup = Some(None);
    append(&journal, cleared).await.unwrap();
    let mut found = Vec::new();
    for partition in 0..4 {
        for (stream, at) in journal.wakeups_of(partition).await.unwrap() {
            assert_eq!(actors::cluster::placement::partition_of(&stream, 4), partition);
            found.push((stream, at));
        }
    }
    found.sort();
    assert_eq!(
        found,
        vec![
            ("creator/c1".to_string(), 1_003),
            ("hub/h1".to_string(), 1_002),
            ("sku/d/a".to_string(), 1_000)
        ]
    );
}

/// Found by the nemesis (seed 2: a NATS server killed, leases lapsing and coming back): a
/// node lost a partition and took it again while the old instance of an actor was still
/// finishing a command. The new instance loaded the subject (other nodes had appended
/// meanwhile), which refreshed the node's expected sequence, and the old instance's batch,
/// decided on its stale state, went out with that fresh sequence: the subject got version 44
/// after 48 and no node could read it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_decided_on_a_stale_state_is_fenced_even_with_a_fresh_tail() {
    let dir = tempfile::tempdir().unwrap();
    let nats = LocalNats::start(1, &dir.path().join("nats")).unwrap();
    let client = async_nats::connect(nats.url().as_str()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    ensure_storage(&js, 1, Duration::from_secs(5)).await.unwrap();
    let here = JetStreamJournal::open(&js, &dir.path().join("here"), 8).await.unwrap();
    let there = JetStreamJournal::open(&js, &dir.path().join("there"), 8).await.unwrap();
    let stream = "hub/h1";

    // This node's actor instance is at version 2.
    here.load(stream).await.unwrap();
    append(&here, batch(stream, 1, &["a1", "a2"])).await.unwrap();
    // The partition moves away; the other node appends 3 and 4.
    there.load(stream).await.unwrap();
    append(&there, batch(stream, 3, &["b3", "b4"])).await.unwrap();
    // The partition comes back: a new instance loads the subject (version 4) while the old
    // instance, still at 2, hands over a batch starting at 3.
    let recovered = here.load(stream).await.unwrap();
    assert_eq!(recovered.events.len(), 4);
    let refused = append(&here, batch(stream, 3, &["stale"])).await.unwrap_err();
    assert!(refused.to_string().contains("fenced"), "{refused}");
    // Nor may it leave a snapshot of its old state as if it were the state at the new tail.
    here.load(stream).await.unwrap();
    let refused = append(
        &here,
        AppendBatch {
            stream: stream.into(),
            first_version: 3,
            snapshot: Some((2, b"state@2".to_vec())),
            ..AppendBatch::default()
        },
    )
    .await
    .unwrap_err();
    assert!(refused.to_string().contains("fenced"), "{refused}");
    // Nothing was written; the new instance appends and every node reads it all back.
    let recovered = here.load(stream).await.unwrap();
    assert_eq!(recovered.snapshot, None);
    append(&here, batch(stream, 5, &["a5"])).await.unwrap();
    let all = there.load_all(stream).await.unwrap();
    assert_eq!(
        texts(&all),
        vec![
            (1, "a1".into()),
            (2, "a2".into()),
            (3, "b3".into()),
            (4, "b4".into()),
            (5, "a5".into())
        ]
    );
}
