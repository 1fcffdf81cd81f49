//! The journal port: durable, ordered event streams, one per actor, with snapshots.
//!
//! Appending is split in two so that an actor can group-commit without waiting: the actor
//! takes a permit (failing at once when the journal's queue is full, before anything
//! changed), applies its events in memory, and hands the batch over with a completion that
//! runs once the batch is durable. Completions run in append order.

use crate::secrets::SealedAddress;
use domain::UnixMillis;
use std::future::Future;
use std::pin::Pin;
use thiserror::Error;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, Clone, Error)]
pub enum JournalError {
    #[error("journal queue is full")]
    Full,
    #[error("journal is closed")]
    Closed,
    #[error("journal io: {0}")]
    Io(String),
    #[error("journal data is corrupt: {0}")]
    Corrupt(String),
    /// The journal's disk is full (`ENOSPC`, `EDQUOT`): the write was not made durable,
    /// and writes resume by themselves once space is freed.
    #[error("journal storage is full: {0}")]
    NoSpace(String),
}

/// Events to append to one stream, starting at `first_version` (versions count from 1).
/// A batch with no events and no snapshot is a barrier: its completion runs after every
/// earlier batch is durable.
#[derive(Debug, Default)]
pub struct AppendBatch {
    pub stream: String,
    pub first_version: u64,
    pub events: Vec<Vec<u8>>,
    /// The state as of `version`, replacing the stream's previous snapshot.
    pub snapshot: Option<(u64, Vec<u8>)>,
    /// A change of the stream's next deadline (Unix ms), kept for the wake-up scheduler:
    /// `Some(Some(at))` sets it, `Some(None)` clears it, `None` leaves it as it was.
    pub wakeup: Option<Option<i64>>,
    /// Entries of the audit trail the events cause, durable in the same write as them (for
    /// a journal that [`Journal::keeps_audit`]).
    pub audit: Vec<AuditWrite>,
}

/// An audit-trail entry, encoded, with the subjects it is filed under: `(b'o', order id)`,
/// `(b'p', partner id)`.
#[derive(Debug, Clone)]
pub struct AuditWrite {
    pub subjects: Vec<(u8, String)>,
    pub entry: Vec<u8>,
}

/// An encoded event with its version in its stream.
pub type Versioned = (u64, Vec<u8>);

/// Runs once the batch is durable (Ok) or failed (Err).
pub type Completion = Box<dyn FnOnce(Result<(), JournalError>) + Send>;

pub trait AppendPermit: Send {
    fn append(self: Box<Self>, batch: AppendBatch, done: Completion);
}

/// What a stream holds: its latest snapshot and the events after it.
#[derive(Debug, Default)]
pub struct Recovered {
    pub snapshot: Option<(u64, Vec<u8>)>,
    pub events: Vec<(u64, Vec<u8>)>,
}

pub trait Journal: Send + Sync + 'static {
    /// Why the journal refuses every write, if it does (its storage failed and only a
    /// restart can tell what reached the disk): health reports it.
    fn failure(&self) -> Option<String> {
        None
    }

    /// Why the journal refuses writes right now, if it does: its disk is full (until space
    /// is back, `NoSpace`) or it failed (until a restart). Batches without changes (a read's
    /// or a rejection's barrier) still go through, so an actor that sees this answers
    /// commands that would change its state with this error, changing nothing, and serves
    /// the rest.
    fn write_refusal(&self) -> Option<JournalError> {
        None
    }

    /// Whether the journal writes a batch's [`AppendBatch::audit`] with its events (the
    /// embedded journals). When not (the cluster's), the actor publishes the entries as
    /// projection updates once the batch is durable, and every node writes its copy.
    fn keeps_audit(&self) -> bool {
        false
    }

    /// The journal's figures for the server's metrics (`None`: it keeps none, as the
    /// in-memory journal of tests).
    fn figures(&self) -> Option<crate::telemetry::JournalFigures> {
        None
    }

    /// Stops the journal for a clean shutdown: what was queued is written and answered,
    /// later appends fail. Blocks until done (the embedded journal joins its writer); a
    /// journal with nothing to stop does nothing.
    fn close(&self) {}

    /// A slot in the write queue, or `Full` at once.
    fn try_reserve(&self) -> Result<Box<dyn AppendPermit>, JournalError>;

    /// The latest snapshot of a stream and every event after it.
    fn load(&self, stream: &str) -> BoxFuture<'_, Result<Recovered, JournalError>>;

    /// Every stream's next deadline, as last appended (see [`AppendBatch::wakeup`]).
    fn wakeups(&self) -> Result<Vec<(String, i64)>, JournalError>;

    /// Every event of a stream from version 1, ignoring snapshots (audits, reconciliation).
    fn load_all(&self, stream: &str) -> BoxFuture<'_, Result<Vec<Versioned>, JournalError>>;

    /// Names of the streams with events whose name starts with `prefix`, in order, at most
    /// `limit` after `after` (reconciliation walks every drop and SKU this way).
    fn streams<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<String>, JournalError>>;
}

/// Where buyers' delivery addresses are kept, sealed (`secrets::SealedAddress`), apart from
/// every journal and event: only fulfilment reads them. Each has a time after which it is
/// shredded: its salt (half of its key) and its ciphertext are deleted.
pub trait AddressVault: Send + Sync + 'static {
    /// Stores the address of `order_id` unless one is stored already (`Ok(false)`: nothing
    /// changed, whatever `sealed` holds). Durable when it returns.
    fn put_new<'a>(
        &'a self,
        order_id: &'a str,
        sealed: &'a SealedAddress,
        shred_at: UnixMillis,
    ) -> BoxFuture<'a, Result<bool, JournalError>>;
    fn get<'a>(&'a self, order_id: &'a str) -> BoxFuture<'a, Result<Option<SealedAddress>, JournalError>>;
    /// Brings the address's shred time forward to `at` (never later than it was).
    fn shred_by<'a>(&'a self, order_id: &'a str, at: UnixMillis) -> BoxFuture<'a, Result<(), JournalError>>;
    /// Shreds addresses due at `now`, at most `limit` of them; answers how many.
    fn shred_due(&self, now: UnixMillis, limit: usize) -> BoxFuture<'_, Result<usize, JournalError>>;
}

/// Checks every implementation of these ports passes (the embedded journal and the
/// in-memory one run them in their tests).
#[cfg(test)]
pub(crate) mod contract {
    use super::*;
    use crate::audit_log::{AuditEntry, AuditLog, AuditSubject};

    /// The vault keeps the first address of an order, brings shred times forward only, and
    /// shreds what is due; the audit trail lists a subject's entries newest first, in pages.
    pub(crate) async fn vault_and_audit_trail(store: &(impl AddressVault + AuditLog)) {
        let sealed = |byte: u8| SealedAddress {
            salt: [byte; 32],
            ciphertext: vec![byte; 40],
        };
        assert!(store.put_new("o1", &sealed(1), UnixMillis(100)).await.unwrap());
        assert!(!store.put_new("o1", &sealed(9), UnixMillis(900)).await.unwrap());
        assert!(store.put_new("o2", &sealed(2), UnixMillis(500)).await.unwrap());
        store.shred_by("o2", UnixMillis(50)).await.unwrap();
        store.shred_by("o1", UnixMillis(900)).await.unwrap(); // never later
        assert_eq!(store.shred_due(UnixMillis(60), 10).await.unwrap(), 1);
        assert!(store.get("o2").await.unwrap().is_none());
        assert_eq!(
            store.get("o1").await.unwrap(),
            Some(sealed(1)),
            "the first address is kept"
        );
        assert_eq!(store.shred_due(UnixMillis(99), 10).await.unwrap(), 0);
        assert_eq!(store.shred_due(UnixMillis(100), 10).await.unwrap(), 1);
        assert!(store.get("o1").await.unwrap().is_none());

        for i in 0..5 {
            let entry = AuditEntry {
                at: UnixMillis(i),
                action: format!("a{i}"),
                order_id: Some("o".into()),
                partner_id: (i % 2 == 0).then(|| "p".to_string()),
                hub_id: None,
                detail: String::new(),
            };
            AuditLog::append(store, &entry).unwrap();
        }
        let actions = |page: &crate::audit_log::AuditPage| -> Vec<String> {
            page.entries.iter().map(|e| e.action.clone()).collect()
        };
        let order = AuditSubject::Order("o".into());
        let first = store.list(&order, None, 3).unwrap();
        assert_eq!(actions(&first), ["a4", "a3", "a2"]);
        let second = store.list(&order, first.next, 3).unwrap();
        assert_eq!(actions(&second), ["a1", "a0"]);
        assert_eq!(second.next, None);
        let partner = store.list(&AuditSubject::Partner("p".into()), None, 10).unwrap();
        assert_eq!(actions(&partner), ["a4", "a2", "a0"]);
    }
}
