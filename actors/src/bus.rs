//! The bus port: how commands reach the actor that owns a key, wherever it runs. The
//! embedded platform implements it in-process ([`crate::embedded::LocalActors`]); the
//! cluster implements it over NATS request/reply ([`crate::cluster::node::ClusterNode`]).
//!
//! One typed path for every aggregate: `bus.ask::<SkuState>(key, command)` and its
//! fire-and-forget sibling `bus.tell::<H>(key, command)`. Underneath, the port carries a
//! [`Parcel`]: the command with its type erased, which an implementation either hands to
//! a local actor as it is or encodes for another node (kind, stream, command bytes).

use crate::error::CommandError;
use crate::hosted::{Env, Hosted};
use crate::journal::BoxFuture;
use domain::reply::FromReply;
use std::any::Any;

/// A reply with its type erased (an `H::Reply` for a parcel of kind `H`).
pub type AnyReply = Box<dyn Any + Send>;

pub trait CommandBus: Send + Sync + 'static {
    /// Delivers a command to the actor of its key, starting the actor if needed, and
    /// returns its reply once durable. Use [`ask`](trait.CommandBus.html#method.ask).
    fn ask_parcel(&self, parcel: Box<dyn Parcel>) -> BoxFuture<'_, Result<AnyReply, CommandError>>;

    /// Hands a command to the actor of its key if that actor is running, without waiting
    /// for its reply and without starting it. For news an actor also reads when it starts
    /// (a drop's sale status, a hub's setup): one that is not running learns it then. Once
    /// this returns the command is queued ahead of any command sent after it. Use
    /// [`tell`](trait.CommandBus.html#method.tell).
    fn tell_parcel(&self, parcel: Box<dyn Parcel>) -> BoxFuture<'_, Result<(), CommandError>>;

    /// Wakes the actor of a journal stream for its deadline (it runs its timer command);
    /// used for actors passivated with a deadline pending and after a restart.
    fn wake(&self, stream: String) -> BoxFuture<'_, Result<(), CommandError>>;
}

impl dyn CommandBus {
    /// Runs `command` on the actor of `key` and returns its reply once it is durable.
    pub async fn ask<H: Hosted>(&self, key: H::Key, command: H::Command) -> Result<H::Reply, CommandError> {
        let reply = self.ask_parcel(Box::new(Letter::<H> { key, command })).await?;
        unwrap_reply::<H>(reply)
    }

    /// Runs `command` and returns its reply in the shape `T` the command always answers
    /// with (see `domain::reply`), e.g. `ask_for::<SkuState, OrderView>`.
    pub async fn ask_for<H: Hosted, T: FromReply<H::Reply>>(
        &self,
        key: H::Key,
        command: H::Command,
    ) -> Result<T, CommandError> {
        T::from_reply(self.ask::<H>(key, command).await?).map_err(|other| {
            CommandError::Unavailable(format!(
                "a {} command answered {other:?} where {} was expected",
                H::KIND,
                std::any::type_name::<T>()
            ))
        })
    }

    /// Hands `command` to the actor of `key` if it runs (see [`CommandBus::tell_parcel`]).
    pub async fn tell<H: Hosted>(&self, key: H::Key, command: H::Command) -> Result<(), CommandError> {
        self.tell_parcel(Box::new(Letter::<H> { key, command })).await
    }
}

/// The typed reply inside an erased one.
pub fn unwrap_reply<H: Hosted>(reply: AnyReply) -> Result<H::Reply, CommandError> {
    reply.downcast::<H::Reply>().map(|reply| *reply).map_err(|_| {
        CommandError::Unavailable(format!(
            "a {} command got a reply of another type: two kinds share the name",
            H::KIND
        ))
    })
}

/// A command on its way to its actor, its aggregate's type erased so that one bus method
/// carries every kind.
pub trait Parcel: Send + 'static {
    /// The kind of the actor it is for ([`Hosted::KIND`]).
    fn kind(&self) -> &'static str;

    /// The journal stream of the actor it is for (where it is routed in a cluster).
    fn stream(&self) -> String;

    /// The command's bytes, for another node.
    fn encode_command(&self) -> Result<Vec<u8>, CommandError>;

    /// The reply to this command from another node's bytes (running the kind's
    /// read-your-writes step, [`Hosted::replied_elsewhere`]).
    fn decode_reply(&self, bytes: &[u8], env: &Env) -> Result<AnyReply, CommandError>;

    /// The [`Letter`] inside, for the local actor.
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

/// A command for the actor of `key`: the one [`Parcel`].
pub struct Letter<H: Hosted> {
    pub key: H::Key,
    pub command: H::Command,
}

impl<H: Hosted> Parcel for Letter<H> {
    fn kind(&self) -> &'static str {
        H::KIND
    }

    fn stream(&self) -> String {
        H::stream(&self.key)
    }

    fn encode_command(&self) -> Result<Vec<u8>, CommandError> {
        wire_encode(&self.command)
    }

    fn decode_reply(&self, bytes: &[u8], env: &Env) -> Result<AnyReply, CommandError> {
        let reply: H::Reply = wire_decode(bytes)?;
        H::replied_elsewhere(&reply, env);
        Ok(Box::new(reply))
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

/// Commands and replies between nodes: postcard, like the journal.
pub fn wire_encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, CommandError> {
    postcard::to_stdvec(value).map_err(|e| CommandError::Unavailable(format!("not encodable for another node: {e}")))
}

pub fn wire_decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, CommandError> {
    postcard::from_bytes(bytes)
        .map_err(|e| CommandError::Unavailable(format!("undecodable message from another node: {e}")))
}
