//! Why a command did not get a domain reply.

use domain::Rejection;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use thiserror::Error;

/// Serializable, so that a command routed to another node of a cluster gets the same
/// error back as it would have in-process.
#[derive(Debug, Clone, Error, Serialize, Deserialize)]
pub enum CommandError {
    /// The domain refused the command; nothing changed.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// A bounded queue (mailbox or journal) is full; nothing changed.
    #[error("overloaded: {0}")]
    Overloaded(Cow<'static, str>),
    /// No reply within the deadline; the command may or may not have taken effect.
    #[error("no reply within {0} ms")]
    Timeout(u64),
    /// The actor could not be reached or started.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The journal failed; the actor restarts from its last durable state.
    #[error("storage failure: {0}")]
    Storage(String),
    /// The journal's disk is full: the command was not acknowledged; writes resume by
    /// themselves once space is freed (reads are still served).
    #[error("storage full: {0}")]
    StorageFull(String),
}

impl CommandError {
    /// What a journal error means to the caller of a command.
    pub fn from_journal(error: crate::journal::JournalError) -> CommandError {
        match error {
            crate::journal::JournalError::NoSpace(why) => CommandError::StorageFull(why),
            other => CommandError::Storage(other.to_string()),
        }
    }
}

pub type Result<T> = std::result::Result<T, CommandError>;
