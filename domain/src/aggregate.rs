//! The shape every event-sourced state machine in Dropline shares.

use crate::{Rejection, UnixMillis};

/// An event-sourced state machine: commands are decided against the current state without
/// changing it, and the resulting events are the only way the state changes.
pub trait Aggregate {
    type Command;
    type Event;
    type Reply;

    /// Decides what a command means now. Must not change anything: a rejection has no effect.
    fn decide(&self, command: Self::Command, now: UnixMillis) -> Result<(Vec<Self::Event>, Self::Reply), Rejection>;

    /// Applies one event. Must be deterministic: replaying the same events rebuilds the same state.
    fn apply(&mut self, event: &Self::Event);

    /// The earliest time at which a timer command is due (hold expiry, SLA deadlines).
    fn next_deadline(&self) -> Option<UnixMillis> {
        None
    }
}
