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
