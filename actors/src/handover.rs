//! The SKU actor's outbox to the hubs: confirmed orders go to the hub whose pool they were
//! sold from, orders cancelled after confirmation are withdrawn from it, and each is marked
//! acknowledged in the SKU's journal once the hub answered. A crash or a failed send leaves
//! them in the SKU's `handover` set, and the SKU sends them again when it next starts and at
//! its durable retry deadline (`handover_due`, every `HANDOVER_RETRY_MS`); the hub ignores an
//! order it already has and a withdrawal it already made. So a confirmed order always reaches
//! its hub (at least once, and exactly one dispatch), and so does its cancellation.

use crate::bus::CommandBus;
use crate::CommandError;
use domain::hub::{HubCommand, HubState};
use domain::sku::{SkuCommand, SkuState};
use domain::{DropId, HubId, Rejection, SkuId};
use std::sync::Weak;
use std::time::Duration;
use tracing::warn;

/// Quick attempts per order (a burst can fill a hub's mailbox for a moment), and the first
/// back-off; beyond them the durable retry deadline takes over, so tasks never pile up.
const HANDOVER_ATTEMPTS: u32 = 3;
const HANDOVER_BACKOFF_MS: u64 = 100;

/// Sends each order's hand-over (`HubCommand::Dispatch`) or withdrawal (`HubCommand::Cancel`)
/// to its hub and records in the SKU which were acknowledged.
pub async fn hand_over(bus: Weak<dyn CommandBus>, drop_id: DropId, sku_id: SkuId, orders: Vec<(HubId, HubCommand)>) {
    let mut acknowledged = Vec::with_capacity(orders.len());
    for (hub_id, command) in orders {
        let (order_id, withdrawal) = match &command {
            HubCommand::Dispatch(order) => (order.order_id.clone(), false),
            HubCommand::Cancel { order, .. } => (order.order_id.clone(), true),
            other => unreachable!("the hand-over outbox sends dispatches and withdrawals only, not {other:?}"),
        };
        let mut backoff = HANDOVER_BACKOFF_MS;
        for attempt in 1..=HANDOVER_ATTEMPTS {
            let Some(bus) = bus.upgrade() else { return };
            match bus.ask::<HubState>(hub_id.clone(), command.clone()).await {
                Ok(_) => {
                    acknowledged.push((order_id, withdrawal));
                    break;
                }
                // The parcel left the hub before the cancel reached it: asking again cannot
                // change that. Reconciliation reports the order if it was refunded and delivered.
                Err(CommandError::Rejected(Rejection::FailedPrecondition(why))) if withdrawal => {
                    warn!(%order_id, %hub_id, reason = %why, "cancelled order's dispatch could not be withdrawn");
                    acknowledged.push((order_id, withdrawal));
                    break;
                }
                Err(e) if attempt == HANDOVER_ATTEMPTS => {
                    warn!(%order_id, %hub_id, error = %e, "order not handed to its hub yet; sent again at the SKU's retry deadline");
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(backoff)).await;
                    backoff *= 4;
                }
            }
        }
    }
    if acknowledged.is_empty() {
        return;
    }
    let Some(bus) = bus.upgrade() else { return };
    if let Err(e) = bus
        .ask::<SkuState>((drop_id, sku_id), SkuCommand::HandedOver { orders: acknowledged })
        .await
    {
        // Harmless: the hub has them; they are sent again (and ignored) at the retry deadline.
        warn!(error = %e, "could not record hand-over to hubs");
    }
}
