//! The settlement side of the actor platform: live statement lines for creators watching
//! their ledger, and the outboxes that carry order and fulfilment facts from SKU and hub
//! actors to the creators' ledgers (at least once; the ledger books each fact once).

use crate::bus::CommandBus;
use domain::hub::HubState;
use domain::ledger::{Entry, FulfilmentFacts, LedgerCommand, LedgerInput, LedgerState, SaleFacts, Synced};
use domain::limits::LEDGER_BATCH_MAX;
use domain::sku::{SkuCommand, SkuState};
use domain::{CreatorId, DropId, HubId, OrderId, SkuId};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::broadcast;
use tracing::warn;

/// Lines buffered per creator for live watchers; a watcher that falls further behind reads
/// the lines it missed from the ledger (nothing is lost, see `WatchSettlement`).
pub const SETTLEMENT_FEED_BUFFER: usize = 1_024;
/// Creators with live watchers at once.
pub const SETTLEMENT_FEEDS_MAX: usize = 100_000;

/// New statement lines, by creator, for WatchSettlement.
#[derive(Default)]
pub struct SettlementFeed {
    feeds: Mutex<HashMap<CreatorId, broadcast::Sender<Arc<Entry>>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("too many settlement watches ({SETTLEMENT_FEEDS_MAX} creators at most)")]
pub struct TooManyFeeds;

impl SettlementFeed {
    pub fn subscribe(&self, creator: &CreatorId) -> Result<broadcast::Receiver<Arc<Entry>>, TooManyFeeds> {
        let mut feeds = self.feeds.lock().expect("feeds lock");
        if let Some(sender) = feeds.get(creator) {
            return Ok(sender.subscribe());
        }
        if feeds.len() >= SETTLEMENT_FEEDS_MAX {
            feeds.retain(|_, s| s.receiver_count() > 0);
            if feeds.len() >= SETTLEMENT_FEEDS_MAX {
                return Err(TooManyFeeds);
            }
        }
        let (sender, receiver) = broadcast::channel(SETTLEMENT_FEED_BUFFER);
        feeds.insert(creator.clone(), sender);
        Ok(receiver)
    }

    pub fn is_watched(&self, creator: &CreatorId) -> bool {
        self.feeds
            .lock()
            .expect("feeds lock")
            .get(creator)
            .is_some_and(|s| s.receiver_count() > 0)
    }

    pub fn publish(&self, creator: &CreatorId, entries: Vec<Arc<Entry>>) {
        let mut feeds = self.feeds.lock().expect("feeds lock");
        let Some(sender) = feeds.get(creator) else { return };
        if sender.receiver_count() == 0 {
            feeds.remove(creator);
            return;
        }
        for entry in entries {
            let _ = sender.send(entry);
        }
    }
}

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
