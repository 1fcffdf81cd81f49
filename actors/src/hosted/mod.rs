//! What an aggregate needs to be hosted by an [`crate::entity::Entity`] actor, and one file
//! per hosted aggregate: its journal stream, how it starts and catches up, and what it
//! publishes once a batch is durable. Nothing else in the infrastructure names an
//! aggregate: the bus, the embedded registries and the cluster's wire format are generic
//! over [`Hosted`], so an aggregate is added with its domain file and one file here (and
//! its kind registered with [`crate::embedded::LocalActors::host`] where it must be served
//! to other nodes).

mod drop;
mod hub;
mod ledger;
mod registry;
mod sku;
mod till;

pub use drop::announce_sale_status;

use crate::audit_log::AuditLog;
use crate::bus::CommandBus;
use crate::clock::Clock;
use crate::error::CommandError;
use crate::journal::{BoxFuture, Journal};
use crate::projections::Projections;
use domain::{Aggregate, Rejection};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::{Arc, Weak};

/// Everything an actor depends on, shared by all actors of a process.
pub struct Env {
    pub journal: Arc<dyn Journal>,
    pub clock: Arc<dyn Clock>,
    pub projections: Arc<Projections>,
    pub wakeups: crate::wakeups::Wakeups,
    pub audit: Arc<dyn AuditLog>,
    /// The runtime, for work a publication starts (publications run on the journal's
    /// writer thread).
    pub runtime: tokio::runtime::Handle,
    /// The platform's bus, for actors that ask other actors (a SKU asks its drop).
    pub(crate) bus: Weak<dyn CommandBus>,
    /// What the actors count for the server's metrics.
    pub stats: Arc<crate::telemetry::ActorStats>,
}

impl Env {
    pub fn bus(&self) -> Result<Arc<dyn CommandBus>, CommandError> {
        self.bus
            .upgrade()
            .ok_or_else(|| CommandError::Unavailable("platform is shutting down".into()))
    }
}

/// Work to run once a batch is durable (updating projections).
pub type Publication = Box<dyn FnOnce() + Send>;

pub trait Hosted:
    Aggregate<
        Command: Send + Debug + Serialize + DeserializeOwned,
        Event: Serialize + DeserializeOwned + Send + Sync,
        Reply: Send + Debug + Serialize + DeserializeOwned,
    > + Serialize
    + DeserializeOwned
    + Send
    + Sized
    + 'static
{
    /// The kind's name: its journal streams are `KIND` or start with `KIND/`, and commands
    /// between nodes name it (so it must not change once data exists).
    const KIND: &'static str;

    type Key: Clone + Eq + Hash + Send + Sync + Debug + 'static;

    /// The journal stream of the actor with this key.
    fn stream(key: &Self::Key) -> String;

    /// The key whose stream is `stream` (the inverse of [`Hosted::stream`]).
    fn key_of_stream(stream: &str) -> Option<Self::Key>;

    fn mailbox_capacity() -> usize;

    /// The state before the stream's first event.
    fn initial<'a>(key: &'a Self::Key, env: &'a Env) -> BoxFuture<'a, Result<Self, CommandError>>;

    /// A command to run right after recovery, before any other (catching up with others).
    fn after_recovery<'a>(&'a self, _env: &'a Env) -> BoxFuture<'a, Result<Option<Self::Command>, CommandError>> {
        Box::pin(async { Ok(None) })
    }

    /// The command a due timer sends (see `Aggregate::next_deadline`).
    fn timer_command() -> Option<Self::Command> {
        None
    }

    /// What to publish once `events` are durable; called with no events after recovery.
    fn publication(&self, events: &[Self::Event], env: &Env) -> Option<Publication>;

    /// Entries of the operators' audit trail these events (just applied) cause.
    fn audit_entries(&self, _events: &[Self::Event]) -> Vec<crate::audit_log::AuditEntry> {
        Vec::new()
    }

    /// Decodes a snapshot of the state (see `codec::decode_grown` for states that grew).
    fn decode_state(bytes: &[u8]) -> Result<Self, String> {
        crate::codec::decode(bytes)
    }

    /// Rough size of the state, so snapshots are taken at O(1) amortized cost per event.
    fn snapshot_weight(&self) -> u64 {
        0
    }

    /// Every broken invariant of the state, if any (`Err` describes the first). Checked by
    /// the shell in debug builds after recovery and after applied batches (see
    /// `Entity::check`); an aggregate without such a check has none to break.
    fn invariants(&self) -> Result<(), String> {
        Ok(())
    }

    /// A rejection as the caller sees it, for states that cannot name themselves before
    /// their first event (the key does).
    fn name_rejection(_key: &Self::Key, rejection: Rejection) -> Rejection {
        rejection
    }

    /// Runs on a node that got this reply from the node owning the actor (in cluster mode),
    /// before its caller sees it: read-your-writes for the projections the actor's
    /// publication updates on its own node at once and on the others a moment later.
    fn replied_elsewhere(_reply: &Self::Reply, _projections: &Projections) {}
}

/// The kind a journal stream belongs to (see [`Hosted::KIND`]).
pub fn kind_of_stream(stream: &str) -> &str {
    stream.split_once('/').map_or(stream, |(kind, _)| kind)
}
