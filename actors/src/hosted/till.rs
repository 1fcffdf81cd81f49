//! One actor per leased SKU in a pop-up edge (`dropline edge`): the till's mirror of its
//! lease, its holds and sales, and their upload state (`domain::till`). Hosted only by an
//! edge process; a platform node never starts one.

use super::{Env, Hosted, Publication};
use crate::error::CommandError;
use crate::journal::BoxFuture;
use crate::limits::TILL_MAILBOX_CAPACITY;
use domain::till::{TillCommand, TillState};
use domain::{DropId, SkuId};

impl Hosted for TillState {
    const KIND: &'static str = "till";
    type Key = (DropId, SkuId);

    fn stream((drop_id, sku_id): &Self::Key) -> String {
        format!("till/{drop_id}/{sku_id}")
    }

    fn key_of_stream(stream: &str) -> Option<Self::Key> {
        let (drop_id, sku_id) = stream.strip_prefix("till/")?.split_once('/')?;
        Some((DropId::parse(drop_id).ok()?, SkuId::parse(sku_id).ok()?))
    }

    fn mailbox_capacity() -> usize {
        TILL_MAILBOX_CAPACITY
    }

    fn initial<'a>((drop_id, sku_id): &'a Self::Key, _: &'a Env) -> BoxFuture<'a, Result<Self, CommandError>> {
        Box::pin(async move { Ok(TillState::new(drop_id.clone(), sku_id.clone())) })
    }

    fn timer_command() -> Option<TillCommand> {
        Some(TillCommand::ExpireDue)
    }

    /// Nothing to publish: the edge's uploader reads the outbox from the actor itself.
    fn publication(&self, _: &[domain::till::TillEvent], _: &Env) -> Option<Publication> {
        None
    }

    fn snapshot_weight(&self) -> u64 {
        self.orders.len() as u64
    }

    fn invariants(&self) -> Result<(), String> {
        self.check_invariants()
    }
}
