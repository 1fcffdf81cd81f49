//! One actor per creator: its settlement ledger.

use super::{Env, Hosted, Publication};
use crate::error::CommandError;
use crate::journal::BoxFuture;
use crate::projections::ProjectionUpdate;
use domain::ledger::{LedgerCommand, LedgerEvent, LedgerState};
use domain::limits::CREATOR_MAILBOX_CAPACITY;
use domain::CreatorId;
use std::sync::Arc;

impl Hosted for LedgerState {
    const KIND: &'static str = "creator";
    type Key = CreatorId;

    fn stream(key: &CreatorId) -> String {
        format!("creator/{key}")
    }

    fn mailbox_capacity() -> usize {
        CREATOR_MAILBOX_CAPACITY
    }

    fn initial<'a>(key: &'a CreatorId, _: &'a Env) -> BoxFuture<'a, Result<Self, CommandError>> {
        Box::pin(async move { Ok(LedgerState::new(key.clone())) })
    }

    fn key_of_stream(stream: &str) -> Option<CreatorId> {
        CreatorId::parse(stream.strip_prefix("creator/")?).ok()
    }

    fn timer_command() -> Option<LedgerCommand> {
        Some(LedgerCommand::ReleaseDue)
    }

    fn publication(&self, events: &[LedgerEvent], env: &Env) -> Option<Publication> {
        if events.is_empty() || !env.projections.wants_settlement(&self.creator_id) {
            return None;
        }
        let entries: Vec<Arc<domain::ledger::Entry>> =
            events.iter().filter_map(|e| e.entry().cloned().map(Arc::new)).collect();
        let projections = env.projections.clone();
        let creator = self.creator_id.clone();
        Some(Box::new(move || {
            projections.emit(vec![ProjectionUpdate::Settlement { creator, entries }])
        }))
    }

    fn snapshot_weight(&self) -> u64 {
        self.entries.len() as u64
    }

    fn invariants(&self) -> Result<(), String> {
        match self.check().as_slice() {
            [] => Ok(()),
            [first, ..] => Err(first.clone()),
        }
    }
}
