//! What an aggregate needs to be hosted by an [`crate::entity::Entity`] actor, and the
//! hosting of the drop and SKU aggregates.

use crate::bus::CommandBus;
use crate::clock::Clock;
use crate::error::CommandError;
use crate::journal::{BoxFuture, Journal};
use crate::projections::Projections;
use domain::drop::{DropCommand, DropEvent, DropState};
use domain::limits::{DROP_MAILBOX_CAPACITY, SKU_MAILBOX_CAPACITY};
use domain::sku::{SkuCommand, SkuEvent, SkuReply, SkuState};
use domain::{Aggregate, DropId, Rejection, SkuId};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::{Arc, Weak};

/// Everything an actor depends on, shared by all actors of a process.
pub struct Env {
    pub journal: Arc<dyn Journal>,
    pub clock: Arc<dyn Clock>,
    pub projections: Arc<Projections>,
    pub wakeups: crate::wakeups::Wakeups,
    /// The platform's bus, for actors that ask other actors (a SKU asks its drop).
    pub(crate) bus: Weak<dyn CommandBus>,
}

impl Env {
    pub fn bus(&self) -> Result<Arc<dyn CommandBus>, CommandError> {
        self.bus
            .upgrade()
            .ok_or_else(|| CommandError::Unavailable("platform is shutting down".into()))
    }
}

/// Work to run once a batch is durable (updating projections).
pub type Publication = Box<dyn FnOnce() + Send>;

pub trait Hosted:
    Aggregate<Command: Send + Debug, Event: Serialize + DeserializeOwned + Send + Sync, Reply: Send>
    + Serialize
    + DeserializeOwned
    + Send
    + Sized
    + 'static
{
    type Key: Clone + Eq + Hash + Send + Sync + Debug + 'static;

    /// The journal stream of the actor with this key.
    fn stream(key: &Self::Key) -> String;

    fn mailbox_capacity() -> usize;

    /// The state before the stream's first event.
    fn initial<'a>(key: &'a Self::Key, env: &'a Env) -> BoxFuture<'a, Result<Self, CommandError>>;

    /// A command to run right after recovery, before any other (catching up with others).
    fn after_recovery<'a>(&'a self, _env: &'a Env) -> BoxFuture<'a, Result<Option<Self::Command>, CommandError>> {
        Box::pin(async { Ok(None) })
    }

    /// The key whose stream is `stream`, for aggregates with deadlines (see `wakeups`).
    fn key_of_stream(_stream: &str) -> Option<Self::Key> {
        None
    }

    /// The command a due timer sends (see `Aggregate::next_deadline`).
    fn timer_command() -> Option<Self::Command> {
        None
    }

    /// What to publish once `events` are durable; called with no events after recovery.
    fn publication(&self, events: &[Self::Event], env: &Env) -> Option<Publication>;

    /// Rough size of the state, so snapshots are taken at O(1) amortized cost per event.
    fn snapshot_weight(&self) -> u64 {
        0
    }
}

impl Hosted for DropState {
    type Key = DropId;

    fn stream(key: &DropId) -> String {
        format!("drop/{key}")
    }

    fn mailbox_capacity() -> usize {
        DROP_MAILBOX_CAPACITY
    }

    fn initial<'a>(_: &'a DropId, _: &'a Env) -> BoxFuture<'a, Result<Self, CommandError>> {
        Box::pin(async { Ok(DropState::default()) })
    }

    fn publication(&self, events: &[DropEvent], env: &Env) -> Option<Publication> {
        let spec = self.spec.clone()?;
        let status = self.status;
        let just_created = events.iter().any(|e| matches!(e, DropEvent::Created { .. }));
        let projections = env.projections.clone();
        Some(Box::new(move || {
            projections.availability.put_drop(spec, status, just_created)
        }))
    }
}

impl Hosted for SkuState {
    type Key = (DropId, SkuId);

    fn stream((drop_id, sku_id): &Self::Key) -> String {
        format!("sku/{drop_id}/{sku_id}")
    }

    fn mailbox_capacity() -> usize {
        SKU_MAILBOX_CAPACITY
    }

    fn initial<'a>((drop_id, sku_id): &'a Self::Key, env: &'a Env) -> BoxFuture<'a, Result<Self, CommandError>> {
        Box::pin(async move {
            let view = env.bus()?.drop_command(drop_id.clone(), DropCommand::Get).await?;
            let sku = view
                .spec
                .sku(sku_id)
                .ok_or_else(|| Rejection::not_found("SKU", sku_id.as_str()))?;
            Ok(SkuState::new(&view.spec, sku))
        })
    }

    fn after_recovery<'a>(&'a self, env: &'a Env) -> BoxFuture<'a, Result<Option<SkuCommand>, CommandError>> {
        Box::pin(async move {
            // The drop's journal is the authority for the sale status; catch up with it.
            let view = env.bus()?.drop_command(self.drop_id.clone(), DropCommand::Get).await?;
            Ok((view.recorded_status != self.sale).then_some(SkuCommand::SetSaleStatus(view.recorded_status)))
        })
    }

    fn key_of_stream(stream: &str) -> Option<Self::Key> {
        let (drop_id, sku_id) = stream.strip_prefix("sku/")?.split_once('/')?;
        Some((DropId::parse(drop_id).ok()?, SkuId::parse(sku_id).ok()?))
    }

    fn timer_command() -> Option<SkuCommand> {
        Some(SkuCommand::ExpireDue)
    }

    fn publication(&self, events: &[SkuEvent], env: &Env) -> Option<Publication> {
        let figures = self.figures();
        let watchers = &env.projections.orders;
        let views: Vec<_> = if watchers.is_empty() {
            Vec::new()
        } else {
            let mut ids: Vec<_> = events
                .iter()
                .filter_map(SkuEvent::order_id)
                .filter(|id| watchers.is_watched(id))
                .collect();
            // Promotions and releases move everyone behind in the waitlist.
            if events
                .iter()
                .any(|e| matches!(e, SkuEvent::Promoted { .. } | SkuEvent::WaitlistLeft { .. }))
            {
                ids.extend(self.waitlists.values().flatten().filter(|id| watchers.is_watched(id)));
            }
            ids.sort();
            ids.dedup();
            ids.into_iter()
                .filter_map(|id| self.orders.get(id))
                .map(|o| self.order_view(o))
                .collect()
        };
        let projections = env.projections.clone();
        Some(Box::new(move || {
            projections.availability.put_sku(figures);
            for view in views {
                projections.orders.publish(view);
            }
        }))
    }

    fn snapshot_weight(&self) -> u64 {
        self.orders.len() as u64
    }
}

/// Replies of SKU commands, unwrapped by kind.
pub fn expect_order(reply: SkuReply) -> Result<domain::sku::OrderView, CommandError> {
    match reply {
        SkuReply::Order(view) => Ok(view),
        other => Err(CommandError::Unavailable(format!("unexpected reply {other:?}"))),
    }
}
