//! One actor per drop: its spec and sale status (the authority SKU actors catch up with).

use super::{Env, Hosted, Publication};
use crate::bus::CommandBus;
use crate::error::CommandError;
use crate::journal::BoxFuture;
use crate::projections::ProjectionUpdate;
use domain::drop::{DropEvent, DropSpec, DropState, SaleStatus};
use domain::limits::DROP_MAILBOX_CAPACITY;
use domain::sku::{SkuCommand, SkuState};
use domain::{DropId, Rejection};
use futures::{StreamExt, TryStreamExt};

/// SKU actors told about a status change at once.
const STATUS_FAN_OUT: usize = 64;

impl Hosted for DropState {
    const KIND: &'static str = "drop";
    type Key = DropId;

    fn stream(key: &DropId) -> String {
        format!("drop/{key}")
    }

    fn key_of_stream(stream: &str) -> Option<DropId> {
        DropId::parse(stream.strip_prefix("drop/")?).ok()
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
            projections.emit(vec![ProjectionUpdate::Drop {
                spec,
                status,
                just_created,
            }])
        }))
    }

    /// A drop not created yet has no spec, so its state cannot name itself: the key does.
    fn name_rejection(key: &DropId, rejection: Rejection) -> Rejection {
        match rejection {
            Rejection::NotFound { what, id } if id.is_empty() => Rejection::not_found(&what, key.as_str()),
            other => other,
        }
    }
}

/// Tells the *running* SKU actors of a drop that its sale status changed (after the drop's
/// journal recorded it). Actors that are not running are not started: every SKU actor asks
/// its drop for the status when it starts, so it catches up then. Opening a 1,000-SKU drop
/// therefore costs what its live SKUs cost, not 1,000 actor starts.
pub async fn announce_sale_status(
    bus: &dyn CommandBus,
    spec: &DropSpec,
    status: SaleStatus,
) -> Result<(), CommandError> {
    let tells: Vec<_> = spec
        .skus
        .iter()
        .map(|sku| {
            bus.tell::<SkuState>(
                (spec.drop_id.clone(), sku.sku_id.clone()),
                SkuCommand::SetSaleStatus(status),
            )
        })
        .collect();
    futures::stream::iter(tells)
        .buffer_unordered(STATUS_FAN_OUT)
        .try_collect::<()>()
        .await
}
