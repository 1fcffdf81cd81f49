//! The toy aggregate's domain: a counter that adds what it is told, up to a limit. Pure, as
//! every aggregate's domain is: decide, apply, nothing else.

use domain::{Aggregate, Rejection, UnixMillis};
use serde::{Deserialize, Serialize};

/// No counter goes past this.
pub const LIMIT: u64 = 1_000;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    pub total: u64,
    pub adds: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CounterCommand {
    Add(u64),
    Get,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CounterEvent {
    Added { by: u64, at: UnixMillis },
}

impl Aggregate for Counter {
    type Command = CounterCommand;
    type Event = CounterEvent;
    type Reply = u64;

    fn decide(&self, command: CounterCommand, now: UnixMillis) -> Result<(Vec<CounterEvent>, u64), Rejection> {
        match command {
            CounterCommand::Get => Ok((Vec::new(), self.total)),
            CounterCommand::Add(by) if self.total + by > LIMIT => Err(Rejection::FailedPrecondition(format!(
                "adding {by} to {} passes the limit of {LIMIT}",
                self.total
            ))),
            CounterCommand::Add(by) => Ok((vec![CounterEvent::Added { by, at: now }], self.total + by)),
        }
    }

    fn apply(&mut self, event: &CounterEvent) {
        match event {
            CounterEvent::Added { by, .. } => {
                self.total += by;
                self.adds += 1;
            }
        }
    }
}
