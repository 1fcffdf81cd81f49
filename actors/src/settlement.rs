//! The outboxes that carry order and fulfilment facts from SKU and hub actors to the
//! creators' ledgers (at least once; the ledger books each fact once).

use crate::bus::CommandBus;
use domain::hub::HubState;
use domain::ledger::{FulfilmentFacts, LedgerCommand, LedgerInput, LedgerState, SaleFacts, Synced};
use domain::limits::LEDGER_BATCH_MAX;
use domain::sku::{SkuCommand, SkuState};
use domain::{CreatorId, DropId, HubId, OrderId, SkuId};
use std::collections::{BTreeMap, HashMap};
use std::sync::Weak;
use tracing::warn;

/// Books `inputs` in a creator's ledger, in batches; returns the acknowledged ones with the
/// mark each had (what the sender records as booked). A failure leaves the rest unacknowledged.
async fn book<M: Copy>(
    bus: &Weak<dyn CommandBus>,
    creator: &CreatorId,
    inputs: Vec<(LedgerInput, M)>,
) -> Vec<(OrderId, M)> {
    let mut acknowledged = Vec::with_capacity(inputs.len());
    for chunk in inputs.chunks(LEDGER_BATCH_MAX) {
        let Some(bus) = bus.upgrade() else { break };
        let marks: HashMap<&OrderId, M> = chunk.iter().map(|(input, mark)| (input.order_id(), *mark)).collect();
        let batch = chunk.iter().map(|(input, _)| input.clone()).collect();
        match bus
            .ask_for::<LedgerState, Synced>(creator.clone(), LedgerCommand::Sync(batch))
            .await
        {
            Ok(Synced { acked, .. }) => acknowledged.extend(acked.into_iter().filter_map(|id| {
                let mark = *marks.get(&id)?;
                Some((id, mark))
            })),
            Err(e) => warn!(%creator, error = %e, "facts not booked yet; sent again at the sender's retry deadline"),
        }
    }
    acknowledged
}

/// Sends a SKU's sales to their creator's ledger, then records in the SKU what the ledger
/// acknowledged (with whether each was cancelled then). A failure leaves them in the SKU's
/// outbox, sent again at its retry deadline.
pub async fn send_sales(
    bus: Weak<dyn CommandBus>,
    drop_id: DropId,
    sku_id: SkuId,
    creator: CreatorId,
    sales: Vec<SaleFacts>,
) {
    let inputs = sales
        .into_iter()
        .map(|f| {
            let cancelled = f.cancelled_at.is_some();
            (LedgerInput::Sale(f), cancelled)
        })
        .collect();
    let synced = book(&bus, &creator, inputs).await;
    if synced.is_empty() {
        return;
    }
    let Some(bus) = bus.upgrade() else { return };
    if let Err(e) = bus
        .ask::<SkuState>((drop_id, sku_id), SkuCommand::LedgerSynced { orders: synced })
        .await
    {
        // Harmless: the ledger ignores them when they are sent again.
        warn!(error = %e, "could not record the ledger's acknowledgement");
    }
}

/// Sends a hub's fulfilment facts to the creators' ledgers, then records in the hub what
/// they acknowledged (with the mark each fact had, so facts that changed since stay).
pub async fn send_fulfilment(bus: Weak<dyn CommandBus>, hub_id: HubId, facts: Vec<(CreatorId, FulfilmentFacts, u32)>) {
    let mut by_creator: BTreeMap<CreatorId, Vec<(LedgerInput, u32)>> = BTreeMap::new();
    for (creator, f, mark) in facts {
        by_creator
            .entry(creator)
            .or_default()
            .push((LedgerInput::Fulfilment(f), mark));
    }
    let mut synced = Vec::new();
    for (creator, inputs) in by_creator {
        synced.extend(book(&bus, &creator, inputs).await);
    }
    if synced.is_empty() {
        return;
    }
    let Some(bus) = bus.upgrade() else { return };
    if let Err(e) = bus
        .ask::<HubState>(hub_id, domain::hub::HubCommand::LedgerSynced(synced))
        .await
    {
        warn!(error = %e, "could not record the ledgers' acknowledgement");
    }
}
