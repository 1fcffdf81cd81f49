//! The embedded journal on the real file system: no completion (the reply to a command)
//! runs before the write-ahead log's `fdatasync` that covers its events, as the log's own
//! storage counters show; and the log alone brings sled back to every acknowledged event.

use actors::journal::{AppendBatch, Journal, JournalError};
use actors::sled_journal::SledJournal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

fn batch(stream: &str, first: u64, events: &[&str], wakeup: Option<Option<i64>>) -> AppendBatch {
    AppendBatch {
        stream: stream.into(),
        first_version: first,
        events: events.iter().map(|e| e.as_bytes().to_vec()).collect(),
        wakeup,
        ..AppendBatch::default()
    }
}

/// Appends `batches` at once; for each, the log's `fdatasync` count before the append and
/// when its completion ran.
async fn append_all(journal: &Arc<SledJournal>, batches: Vec<AppendBatch>) -> Vec<(u64, u64)> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut waits = Vec::new();
    for (i, b) in batches.into_iter().enumerate() {
        let before = journal.log_stats().syncs();
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<(), JournalError>>();
        let (journal2, seen2) = (journal.clone(), seen.clone());
        journal.try_reserve().unwrap().append(
            b,
            Box::new(move |result| {
                seen2.lock().unwrap().push((i, before, journal2.log_stats().syncs()));
                let _ = tx.send(result);
            }),
        );
        waits.push(rx);
    }
    for rx in waits {
        rx.await.unwrap().unwrap();
    }
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    seen.into_iter().map(|(_, before, at)| (before, at)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_completion_runs_before_the_sync_that_covers_it() {
    let dir = tempfile::tempdir().unwrap();
    let journal = SledJournal::open(dir.path()).unwrap();
    let batches = (0..200)
        .map(|i| batch(&format!("sku/d/s{}", i % 7), (i / 7) as u64 + 1, &["held"], None))
        .collect();
    let seen = append_all(&journal, batches).await;
    for (i, (before, at)) in seen.iter().enumerate() {
        assert!(
            at > before,
            "append {i}: completed with {at} fdatasyncs, {before} before it was handed over"
        );
    }
    // Group commit: far fewer syncs than appends.
    let syncs = seen.last().unwrap().1 - seen.first().unwrap().0;
    assert!(syncs < 200, "{syncs} fdatasyncs for 200 appends");
    // A barrier waits for what came before it, and syncs nothing of its own.
    let quiet = journal.log_stats().syncs();
    let (tx, rx) = tokio::sync::oneshot::channel();
    journal
        .try_reserve()
        .unwrap()
        .append(AppendBatch::default(), Box::new(move |r| drop(tx.send(r))));
    rx.await.unwrap().unwrap();
    assert_eq!(journal.log_stats().syncs(), quiet);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_alone_brings_back_every_acknowledged_event_and_deadline() {
    let dir = tempfile::tempdir().unwrap();
    {
        let journal = SledJournal::open(dir.path()).unwrap();
        append_all(
            &journal,
            vec![
                batch("sku/d/a", 1, &["a1", "a2"], Some(Some(1_000))),
                batch("sku/d/b", 1, &["b1"], Some(Some(2_000))),
                batch("sku/d/a", 3, &["a3"], Some(None)),
            ],
        )
        .await;
        // Dropped: the writer stops; sled's own files are then thrown away below, as if
        // everything it had not made durable was lost.
    }
    // Wait for the writer thread to let go of sled's lock.
    let sled_dir = dir.path().join("journal");
    let released = Arc::new(AtomicBool::new(false));
    for _ in 0..200 {
        if std::fs::remove_dir_all(&sled_dir).is_ok() {
            released.store(true, Ordering::SeqCst);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(released.load(Ordering::SeqCst), "sled's directory could not be removed");

    let journal = SledJournal::open(dir.path()).unwrap();
    let texts = |events: Vec<(u64, Vec<u8>)>| -> Vec<(u64, String)> {
        events
            .into_iter()
            .map(|(v, e)| (v, String::from_utf8(e).unwrap()))
            .collect()
    };
    assert_eq!(
        texts(journal.load("sku/d/a").await.unwrap().events),
        vec![(1, "a1".into()), (2, "a2".into()), (3, "a3".into())]
    );
    assert_eq!(
        texts(journal.load("sku/d/b").await.unwrap().events),
        vec![(1, "b1".into())]
    );
    assert_eq!(journal.wakeups().unwrap(), vec![("sku/d/b".to_string(), 2_000)]);
}
