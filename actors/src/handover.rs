//! The SKU actor's outbox to the hubs: confirmed orders go to the hub whose pool they were
//! sold from, and are marked handed over in the SKU's journal once the hub acknowledged
//! them. A crash or a failed send leaves them in the SKU's `handover` set, and the SKU sends
//! them again when it next starts and at its durable retry deadline (`handover_due`, every
//! `HANDOVER_RETRY_MS`); the hub ignores an order it already has. So a confirmed order always
//! reaches its hub: at least once, and exactly one dispatch.

use crate::bus::CommandBus;
use domain::hub::{DispatchOrder, HubCommand};
use domain::sku::SkuCommand;
use domain::{DropId, HubId, SkuId};
use std::sync::Weak;
use std::time::Duration;
use tracing::warn;

/// Quick attempts per order (a burst can fill a hub's mailbox for a moment), and the first
/// back-off; beyond them the durable retry deadline takes over, so tasks never pile up.
const HANDOVER_ATTEMPTS: u32 = 3;
const HANDOVER_BACKOFF_MS: u64 = 100;

pub async fn hand_over(bus: Weak<dyn CommandBus>, drop_id: DropId, sku_id: SkuId, orders: Vec<(HubId, DispatchOrder)>) {
    let mut delivered = Vec::with_capacity(orders.len());
    for (hub_id, order) in orders {
        let mut backoff = HANDOVER_BACKOFF_MS;
        for attempt in 1..=HANDOVER_ATTEMPTS {
            let Some(bus) = bus.upgrade() else { return };
            let order_id = order.order_id.clone();
            match bus
                .hub_command(hub_id.clone(), HubCommand::Dispatch(order.clone()))
                .await
            {
                Ok(_) => {
                    delivered.push(order_id);
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
    if delivered.is_empty() {
        return;
    }
    let Some(bus) = bus.upgrade() else { return };
    if let Err(e) = bus
        .sku_command(drop_id, sku_id, SkuCommand::HandedOver { order_ids: delivered })
        .await
    {
        // Harmless: the hub has them; they are sent again (and ignored) at the retry deadline.
        warn!(error = %e, "could not record hand-over to hubs");
    }
}
