//! The actor shell around the pure domain: one kameo actor per key of each hosted kind
//! (drop, SKU, hub, partner registry, creator ledger: `hosted/`), each a thin host for a
//! domain state machine. Actors persist through the [`journal::Journal`] port (sled in the
//! embedded platform, JetStream in a cluster) with group commit, receive commands through
//! the [`bus::CommandBus`] port (`embedded::LocalActors` in process, `cluster::ClusterNode`
//! across nodes; callers use the typed `ask::<H>` of [`ask`]), and feed read-side
//! projections after every durable batch.

pub mod ask;
pub mod audit;
pub mod audit_log;
pub mod bus;
pub mod clock;
pub mod cluster;
pub mod codec;
pub mod embedded;
pub mod entity;
pub mod error;
pub mod fulfilment;
pub mod handover;
pub mod hosted;
pub mod journal;
pub mod limits;
pub mod log;
pub mod memory_journal;
pub mod projections;
pub mod runtime;
pub mod secrets;
pub mod settlement;
pub mod settlement_feed;
pub mod sled_journal;
pub mod sled_parts;
pub mod telemetry;
pub mod wakeups;

/// The decoder property tests' helpers, shared with the `decoders` integration test.
#[cfg(test)]
#[path = "../tests/decoders/fuzz.rs"]
mod fuzz;

pub use bus::CommandBus;
pub use clock::{Clock, ManualClock, SystemClock, TokioClock};
pub use embedded::LocalActors;
pub use error::CommandError;
pub use journal::Journal;
pub use projections::Projections;
