//! The embedded journal on the real file system: no completion (the reply to a command)
//! runs before the write-ahead log's `fdatasync` that covers its events, as the log's own
//! storage counters show; and the log alone brings sled back to every acknowledged event.

use actors::journal::{AppendBatch, Journal, JournalError};
use actors::log::sim::{CutMode, SimDisk};
use actors::sled_journal::SledJournal;
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
    lose_sled(dir.path()).await;

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

/// Removes sled's directory once the dropped journal's writer has let go of it, keeping the
/// write-ahead log: what sled had not made durable is lost, as at a power cut.
async fn lose_sled(dir: &std::path::Path) {
    let sled_dir = dir.join("journal");
    for _ in 0..200 {
        if std::fs::remove_dir_all(&sled_dir).is_ok() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("sled's directory could not be removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_stored_or_shredded_is_in_the_log_before_the_call_returns() {
    use actors::journal::AddressVault;
    use actors::secrets::SealedAddress;
    use domain::UnixMillis;
    let dir = tempfile::tempdir().unwrap();
    let sealed = |n: u8| SealedAddress {
        salt: [n; 32],
        ciphertext: vec![n; 48],
    };
    // The log on a simulated disk whose power goes before the journal stops: no checkpoint
    // at shutdown moves the vault's records into a durable sled.
    let disk = SimDisk::new();
    let segment_bytes = actors::limits::LOG_SEGMENT_BYTES;
    {
        let journal = SledJournal::open_with_log(dir.path(), Arc::new(disk.clone()), segment_bytes).unwrap();
        let before = journal.log_stats().syncs();
        assert!(journal.put_new("d.s.1", &sealed(1), UnixMillis(5_000)).await.unwrap());
        assert!(journal.log_stats().syncs() > before, "stored before an fdatasync");
        assert!(journal.put_new("d.s.2", &sealed(2), UnixMillis(9_000)).await.unwrap());
        assert!(
            !journal.put_new("d.s.2", &sealed(3), UnixMillis(9_000)).await.unwrap(),
            "put if absent"
        );
        journal.shred_by("d.s.2", UnixMillis(1_000)).await.unwrap();
        let before = journal.log_stats().syncs();
        assert_eq!(
            journal.shred_due(UnixMillis(2_000), 10).await.unwrap(),
            1,
            "d.s.2 is due"
        );
        assert!(journal.log_stats().syncs() > before, "shredded before an fdatasync");
        disk.cut_power_after(disk.ops());
    }
    // What was not synced is gone, and sled lost everything.
    lose_sled(dir.path()).await;
    let disk = disk.after_power_cut(CutMode::DropUnsynced, 7);
    let journal = SledJournal::open_with_log(dir.path(), Arc::new(disk), segment_bytes).unwrap();
    let kept = journal
        .get("d.s.1")
        .await
        .unwrap()
        .expect("the stored address came back from the log");
    assert_eq!((kept.salt, kept.ciphertext), ([1; 32], vec![1; 48]));
    assert!(
        journal.get("d.s.2").await.unwrap().is_none(),
        "the shredded address stays shredded"
    );
    assert_eq!(
        journal.shred_due(UnixMillis(5_000), 10).await.unwrap(),
        1,
        "d.s.1's shred time came back too"
    );
}

/// A write-ahead log whose storage fails (here: the power of a simulated disk goes) stops
/// the journal: the append that met the failure and every later one are refused, and the
/// journal says why, for readiness; nothing is acknowledged that may not be on the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_log_write_refuses_every_later_write_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let disk = SimDisk::new();
    let journal =
        SledJournal::open_with_log(dir.path(), Arc::new(disk.clone()), actors::limits::LOG_SEGMENT_BYTES).unwrap();
    append_all(&journal, vec![batch("sku/d/a", 1, &["a1"], None)]).await;
    assert_eq!(journal.failure(), None);
    disk.cut_power_after(1);
    let refused = |journal: &Arc<SledJournal>, b: AppendBatch| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        journal
            .try_reserve()
            .unwrap()
            .append(b, Box::new(move |r| drop(tx.send(r))));
        rx
    };
    let first = refused(&journal, batch("sku/d/a", 2, &["a2"], None)).await.unwrap();
    assert!(first.is_err(), "an append whose sync failed is not acknowledged");
    let why = journal.failure().expect("the journal reports its failure");
    assert!(why.contains("power cut"), "{why}");
    // The disk works again, but nothing in this process may trust what it holds.
    disk.restore_power();
    let later = refused(&journal, batch("sku/d/b", 1, &["b1"], None)).await.unwrap();
    assert!(
        matches!(&later, Err(JournalError::Io(m)) if m.contains("restart to recover")),
        "{later:?}"
    );
}

/// A shredded address leaves the write-ahead logs at the next checkpoint (here: the one a
/// journal takes as it stops): the vault's changes have a log of their own whose old
/// segments a checkpoint removes, while the event log, which is kept, never holds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shredded_address_is_in_no_log_file_after_a_checkpoint() {
    use actors::journal::AddressVault;
    use actors::secrets::SealedAddress;
    use domain::UnixMillis;
    let dir = tempfile::tempdir().unwrap();
    let sealed = SealedAddress {
        salt: [0x5a; 32],
        ciphertext: vec![0xa7; 64],
    };
    let in_logs = |needle: &[u8]| -> bool {
        std::fs::read_dir(dir.path().join("log")).unwrap().any(|entry| {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            bytes.windows(needle.len()).any(|w| w == needle)
        })
    };
    {
        let journal = SledJournal::open(dir.path()).unwrap();
        append_all(&journal, vec![batch("sku/d/a", 1, &["a1"], None)]).await;
        assert!(journal.put_new("d.a.1", &sealed, UnixMillis(5_000)).await.unwrap());
        append_all(&journal, vec![batch("sku/d/a", 2, &["a2"], None)]).await;
        assert!(
            in_logs(&sealed.salt),
            "the salt is in the vault's log until a checkpoint"
        );
        journal.shred_by("d.a.1", UnixMillis(1_000)).await.unwrap();
        assert_eq!(journal.shred_due(UnixMillis(2_000), 10).await.unwrap(), 1);
    }
    // The dropped journal's writer checkpoints as it stops; reopening waits for it.
    let journal = loop {
        match SledJournal::open(dir.path()) {
            Ok(journal) => break journal,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    };
    assert!(
        !in_logs(&sealed.salt),
        "the shredded address's salt is still in a log file"
    );
    assert!(
        !in_logs(&sealed.ciphertext),
        "the shredded address is still in a log file"
    );
    assert!(journal.get("d.a.1").await.unwrap().is_none());
    let events: Vec<u64> = journal
        .load("sku/d/a")
        .await
        .unwrap()
        .events
        .iter()
        .map(|(v, _)| *v)
        .collect();
    assert_eq!(events, vec![1, 2], "the events stay in their log");
}

/// An audit entry an actor's events cause is written with them, in the same log record: once
/// the batch is acknowledged, a power cut that loses everything not synced and every sled
/// file still finds the events and the entry together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_is_durable_in_the_same_write_as_its_events() {
    use actors::audit_log::{AuditEntry, AuditLog, AuditSubject};
    use domain::UnixMillis;
    let dir = tempfile::tempdir().unwrap();
    let disk = SimDisk::new();
    let segment_bytes = actors::limits::LOG_SEGMENT_BYTES;
    let entry = AuditEntry {
        at: UnixMillis(42),
        action: "swapped".into(),
        order_id: Some("d.s.7".into()),
        partner_id: Some("courier-2".into()),
        hub_id: Some("hub-a".into()),
        detail: "missed the pickup deadline".into(),
    };
    {
        let journal = SledJournal::open_with_log(dir.path(), Arc::new(disk.clone()), segment_bytes).unwrap();
        assert!(journal.keeps_audit());
        let mut with_audit = batch("hub/hub-a", 1, &["swapped"], None);
        with_audit.audit = vec![entry.to_write()];
        append_all(&journal, vec![with_audit]).await;
        // The power goes right after the acknowledgement: no checkpoint, no sled flush.
        disk.cut_power_after(disk.ops());
    }
    lose_sled(dir.path()).await;
    let disk = disk.after_power_cut(CutMode::DropUnsynced, 3);
    let journal = SledJournal::open_with_log(dir.path(), Arc::new(disk), segment_bytes).unwrap();
    assert_eq!(journal.load("hub/hub-a").await.unwrap().events.len(), 1);
    for subject in [
        AuditSubject::Order("d.s.7".into()),
        AuditSubject::Partner("courier-2".into()),
    ] {
        let page = journal.list(&subject, None, 10).unwrap();
        assert_eq!(page.entries, vec![entry.clone()], "{subject:?}");
    }
}

/// A clean shutdown: `close` answers every append queued before it, checkpoints, and ends
/// the writer, so the data directory may go at once (the demo's temporary one did go while
/// the writer still ran, which logged a failed vault log); later appends are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_answers_what_was_queued_then_refuses_and_leaves_the_directory_free() {
    let dir = tempfile::tempdir().unwrap();
    let journal = SledJournal::open(dir.path()).unwrap();
    let mut waits = Vec::new();
    for i in 0..100u64 {
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<(), JournalError>>();
        journal.try_reserve().unwrap().append(
            batch("sku/d/closing", i + 1, &["held"], None),
            Box::new(move |r| drop(tx.send(r))),
        );
        waits.push(rx);
    }
    let closing = journal.clone();
    tokio::task::spawn_blocking(move || closing.close()).await.unwrap();
    for (i, rx) in waits.into_iter().enumerate() {
        rx.await
            .unwrap_or_else(|_| panic!("append {i} dropped unanswered"))
            .unwrap_or_else(|e| panic!("append {i}: {e}"));
    }
    assert!(matches!(journal.try_reserve().map(|_| ()), Err(JournalError::Closed)));
    // A second close does nothing.
    let again = journal.clone();
    tokio::task::spawn_blocking(move || again.close()).await.unwrap();
    // Everything is in sled: the log holds nothing to replay.
    drop(journal);
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".log") {
            copy_all(&entry.path(), &copy.path().join(&name));
        }
    }
    // Without its log segments, sled alone has every event: the close checkpointed.
    let reopened = SledJournal::open(copy.path()).unwrap();
    let recovered = reopened.load("sku/d/closing").await.unwrap();
    let versions = recovered.snapshot.as_ref().map_or(0, |(v, _)| *v) + recovered.events.len() as u64;
    assert_eq!(versions, 100);
}

fn copy_all(from: &std::path::Path, to: &std::path::Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_all(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::copy(from, to).unwrap();
    }
}
