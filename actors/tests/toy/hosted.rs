//! The toy aggregate's one hosted file: its stream, its mailbox, how it starts and what it
//! publishes. Nothing else in the infrastructure had to change for it.

use super::counter::{Counter, CounterEvent};
use actors::hosted::{Env, Hosted, Publication};
use actors::journal::BoxFuture;
use actors::CommandError;

impl Hosted for Counter {
    const KIND: &'static str = "counter";
    type Key = String;

    fn stream(key: &String) -> String {
        format!("counter/{key}")
    }

    fn key_of_stream(stream: &str) -> Option<String> {
        stream.strip_prefix("counter/").map(str::to_owned)
    }

    fn mailbox_capacity() -> usize {
        64
    }

    fn initial<'a>(_: &'a String, _: &'a Env) -> BoxFuture<'a, Result<Counter, CommandError>> {
        Box::pin(async { Ok(Counter::default()) })
    }

    fn publication(&self, _: &[CounterEvent], _: &Env) -> Option<Publication> {
        None
    }
}
