//! The bus port: how commands reach the actor that owns a key, wherever it runs. The
//! embedded platform implements it in-process ([`crate::embedded::LocalActors`]); the
//! cluster implements it over NATS request/reply ([`crate::cluster::node::ClusterNode`]).
//!
//! The port carries a [`Parcel`]: a command with its aggregate's type erased, which an
//! implementation either hands to a local actor as it is or encodes for another node
//! (kind, stream, command bytes). Callers use the typed path over it, `crate::ask`:
//! `bus.ask::<SkuState>(key, command)` and its fire-and-forget sibling `bus.tell::<H>`.

use crate::error::CommandError;
use crate::journal::BoxFuture;
use crate::projections::Projections;
use std::any::Any;

/// A reply with its type erased (an `H::Reply` for a parcel of kind `H`).
pub type AnyReply = Box<dyn Any + Send>;

pub trait CommandBus: Send + Sync + 'static {
    /// Delivers a command to the actor of its key, starting the actor if needed, and
    /// returns its reply once durable. Callers use `bus.ask::<H>` (`crate::ask`).
    fn ask_parcel(&self, parcel: Box<dyn Parcel>) -> BoxFuture<'_, Result<AnyReply, CommandError>>;

    /// Delivers several commands to the actor of one key, to be decided in order, and returns
    /// each one's reply once durable. The embedded bus hands them to the actor as one
    /// message, decided into one journal batch (`entity::CmdBatch`); by default, as here for
    /// a cluster, each travels on its own, all at once. Callers use `bus.ask_many::<H>`.
    fn ask_batch_parcel(&self, batch: Box<dyn BatchParcel>) -> BoxFuture<'_, Vec<Result<AnyReply, CommandError>>> {
        let asks: Vec<_> = batch.into_parcels().into_iter().map(|p| self.ask_parcel(p)).collect();
        Box::pin(futures::future::join_all(asks))
    }

    /// Hands a command to the actor of its key if that actor is running, without waiting
    /// for its reply and without starting it. For news an actor also reads when it starts
    /// (a drop's sale status, a hub's setup): one that is not running learns it then. Once
    /// this returns the command is queued ahead of any command sent after it. Callers use
    /// `bus.tell::<H>` (`crate::ask`).
    fn tell_parcel(&self, parcel: Box<dyn Parcel>) -> BoxFuture<'_, Result<(), CommandError>>;

    /// Wakes the actor of a journal stream for its deadline (it runs its timer command);
    /// used for actors passivated with a deadline pending and after a restart.
    fn wake(&self, stream: String) -> BoxFuture<'_, Result<(), CommandError>>;
}

/// A command on its way to its actor, its aggregate's type erased so that one bus method
/// carries every kind.
pub trait Parcel: Send + 'static {
    /// The kind of the actor it is for (`Hosted::KIND`).
    fn kind(&self) -> &'static str;

    /// The journal stream of the actor it is for (where it is routed in a cluster).
    fn stream(&self) -> String;

    /// The command's bytes, for another node.
    fn encode_command(&self) -> Result<Vec<u8>, CommandError>;

    /// The reply to this command from another node's bytes (running the kind's
    /// read-your-writes step on this node's projections, `Hosted::replied_elsewhere`).
    fn decode_reply(&self, bytes: &[u8], projections: &Projections) -> Result<AnyReply, CommandError>;

    /// The command itself, for the local actor (a `crate::ask::Letter`).
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

/// Commands for the actor of one key, their aggregate's type erased (see
/// [`CommandBus::ask_batch_parcel`]).
pub trait BatchParcel: Send + 'static {
    /// The kind of the actor they are for (`Hosted::KIND`).
    fn kind(&self) -> &'static str;

    /// How many commands there are (and so replies to expect).
    fn count(&self) -> usize;

    /// Each command as a parcel of its own, for a bus that sends them one by one.
    fn into_parcels(self: Box<Self>) -> Vec<Box<dyn Parcel>>;

    /// The commands themselves, for the local actor (a `crate::ask::Letters`).
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

/// Commands and replies between nodes: postcard, like the journal.
pub fn wire_encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, CommandError> {
    postcard::to_stdvec(value).map_err(|e| CommandError::Unavailable(format!("not encodable for another node: {e}")))
}

pub fn wire_decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, CommandError> {
    postcard::from_bytes(bytes)
        .map_err(|e| CommandError::Unavailable(format!("undecodable message from another node: {e}")))
}
