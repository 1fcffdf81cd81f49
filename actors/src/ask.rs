//! The typed command path over the bus: `bus.ask::<H>(key, command)`, `ask_for::<H, T>` for
//! the one shape `T` of its reply, and the fire-and-forget `tell::<H>`. Each wraps the command
//! in a [`Letter`], the one [`Parcel`], so every kind travels the same erased way; `ask_many`
//! carries several commands for one actor as [`Letters`].

use crate::bus::{wire_decode, wire_encode, AnyReply, BatchParcel, CommandBus, Parcel};
use crate::error::CommandError;
use crate::hosted::Hosted;
use crate::projections::Projections;
use domain::reply::FromReply;
use std::any::Any;

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
        shaped::<H, T>(self.ask::<H>(key, command).await?)
    }

    /// Runs `commands` on the actor of `key`, in order, and returns each one's reply once
    /// durable, in the same order; one failing does not stop the others. Embedded, they are
    /// decided into one journal batch (see [`CommandBus::ask_batch_parcel`]).
    pub async fn ask_many<H: Hosted>(
        &self,
        key: H::Key,
        commands: Vec<H::Command>,
    ) -> Vec<Result<H::Reply, CommandError>> {
        let count = commands.len();
        let replies = self.ask_batch_parcel(Box::new(Letters::<H> { key, commands })).await;
        assert_eq!(replies.len(), count, "a {} batch got a reply count of its own", H::KIND);
        replies
            .into_iter()
            .map(|reply| reply.and_then(unwrap_reply::<H>))
            .collect()
    }

    /// [`ask_many`](Self::ask_many), each reply in the shape `T` its command answers with
    /// (see [`ask_for`](Self::ask_for)).
    pub async fn ask_many_for<H: Hosted, T: FromReply<H::Reply>>(
        &self,
        key: H::Key,
        commands: Vec<H::Command>,
    ) -> Vec<Result<T, CommandError>> {
        let replies = self.ask_many::<H>(key, commands).await;
        replies
            .into_iter()
            .map(|reply| reply.and_then(|reply| shaped::<H, T>(reply)))
            .collect()
    }

    /// Hands `command` to the actor of `key` if it runs (see `CommandBus::tell_parcel`).
    pub async fn tell<H: Hosted>(&self, key: H::Key, command: H::Command) -> Result<(), CommandError> {
        self.tell_parcel(Box::new(Letter::<H> { key, command })).await
    }
}

/// `reply` in the shape `T` its command always answers with.
fn shaped<H: Hosted, T: FromReply<H::Reply>>(reply: H::Reply) -> Result<T, CommandError> {
    T::from_reply(reply).map_err(|other| {
        CommandError::Unavailable(format!(
            "a {} command answered {other:?} where {} was expected",
            H::KIND,
            std::any::type_name::<T>()
        ))
    })
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

    fn decode_reply(&self, bytes: &[u8], projections: &Projections) -> Result<AnyReply, CommandError> {
        let reply: H::Reply = wire_decode(bytes)?;
        H::replied_elsewhere(&reply, projections);
        Ok(Box::new(reply))
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

/// Commands for the actor of `key`, decided in order: the one [`BatchParcel`].
pub struct Letters<H: Hosted> {
    pub key: H::Key,
    pub commands: Vec<H::Command>,
}

impl<H: Hosted> BatchParcel for Letters<H> {
    fn kind(&self) -> &'static str {
        H::KIND
    }

    fn count(&self) -> usize {
        self.commands.len()
    }

    fn into_parcels(self: Box<Self>) -> Vec<Box<dyn Parcel>> {
        let Letters { key, commands } = *self;
        commands
            .into_iter()
            .map(|command| {
                Box::new(Letter::<H> {
                    key: key.clone(),
                    command,
                }) as Box<dyn Parcel>
            })
            .collect()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}
