//! One actor per SKU of a drop: its stock, holds, orders and waitlists, and the outboxes
//! that hand confirmed orders to hubs and sales to the creator's ledger.

use super::{Env, Hosted, Publication};
use crate::error::CommandError;
use crate::journal::BoxFuture;
use crate::limits::SKU_MAILBOX_CAPACITY;
use crate::projections::ProjectionUpdate;
use domain::drop::{DropCommand, DropState};
use domain::sku::{SkuCommand, SkuEvent, SkuState};
use domain::{DropId, Rejection, SkuId};

impl Hosted for SkuState {
    const KIND: &'static str = "sku";
    type Key = (DropId, SkuId);

    fn stream((drop_id, sku_id): &Self::Key) -> String {
        format!("sku/{drop_id}/{sku_id}")
    }

    fn mailbox_capacity() -> usize {
        SKU_MAILBOX_CAPACITY
    }

    fn initial<'a>((drop_id, sku_id): &'a Self::Key, env: &'a Env) -> BoxFuture<'a, Result<Self, CommandError>> {
        Box::pin(async move {
            let view = env.bus()?.ask::<DropState>(drop_id.clone(), DropCommand::Get).await?;
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
            let view = env
                .bus()?
                .ask::<DropState>(self.drop_id.clone(), DropCommand::Get)
                .await?;
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
        let watchers = &env.projections;
        let views: Vec<_> = if !watchers.wants_orders() {
            Vec::new()
        } else {
            let mut ids: Vec<_> = events
                .iter()
                .filter_map(SkuEvent::order_id)
                .filter(|id| watchers.wants_order(id))
                .collect();
            // Promotions and releases move everyone behind in the waitlist.
            if events
                .iter()
                .any(|e| matches!(e, SkuEvent::Promoted { .. } | SkuEvent::WaitlistLeft { .. }))
            {
                ids.extend(self.waitlists.values().flatten().filter(|id| watchers.wants_order(id)));
            }
            ids.sort();
            ids.dedup();
            ids.into_iter()
                .filter_map(|id| self.orders.get(id))
                .map(|o| self.order_view(o))
                .collect()
        };
        // Confirmed orders go to their hubs, and cancelled ones are withdrawn from them
        // (after a restart or at a retry: every one not acknowledged yet).
        let retry = events.iter().any(|e| matches!(e, SkuEvent::HandoverRetry { .. }));
        let handover: Vec<_> = if events.is_empty() || retry {
            self.handover
                .iter()
                .filter_map(|id| self.handover_command(id))
                .collect()
        } else {
            events
                .iter()
                .filter_map(|e| match e {
                    SkuEvent::Confirmed { order_id, .. } | SkuEvent::OrderCancelled { order_id, .. }
                        if self.handover.contains(order_id) =>
                    {
                        self.handover_command(order_id)
                    }
                    // An edge's sale booked from its upload is handed over like a confirm.
                    SkuEvent::EdgeSaleBooked { sale, .. } if self.handover.contains(&sale.order_id) => {
                        self.handover_command(&sale.order_id)
                    }
                    _ => None,
                })
                .collect()
        };
        let handover = (!handover.is_empty()).then(|| {
            let bus = env.bus.clone();
            let (drop_id, sku_id) = (self.drop_id.clone(), self.sku_id.clone());
            crate::handover::hand_over(bus, drop_id, sku_id, handover)
        });
        // Sales (and cancellations after confirmation) go to the creator's ledger, likewise.
        let sales: Vec<_> = if events.is_empty() || retry {
            self.ledger_outbox.keys().filter_map(|id| self.sale_facts(id)).collect()
        } else {
            events
                .iter()
                .filter_map(|e| match e {
                    SkuEvent::Confirmed { order_id, .. } | SkuEvent::OrderCancelled { order_id, .. }
                        if self.ledger_outbox.contains_key(order_id) =>
                    {
                        self.sale_facts(order_id)
                    }
                    SkuEvent::EdgeSaleBooked { sale, .. } if self.ledger_outbox.contains_key(&sale.order_id) => {
                        self.sale_facts(&sale.order_id)
                    }
                    _ => None,
                })
                .collect()
        };
        let ledger = (!sales.is_empty()).then(|| {
            crate::settlement::send_sales(
                env.bus.clone(),
                self.drop_id.clone(),
                self.sku_id.clone(),
                self.creator_id.clone(),
                sales,
            )
        });
        let runtime = env.runtime.clone();
        let projections = env.projections.clone();
        Some(Box::new(move || {
            let mut updates = Vec::with_capacity(1 + views.len());
            updates.push(ProjectionUpdate::Sku(figures));
            updates.extend(views.into_iter().map(ProjectionUpdate::Order));
            projections.emit(updates);
            if let Some(task) = handover {
                runtime.spawn(task);
            }
            if let Some(task) = ledger {
                runtime.spawn(task);
            }
        }))
    }

    fn decode_state(bytes: &[u8]) -> Result<Self, String> {
        crate::codec::decode_grown(bytes, &domain::sku::Edges::default())
    }

    fn snapshot_weight(&self) -> u64 {
        self.entries()
    }

    fn invariants(&self) -> Result<(), String> {
        self.check_invariants()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::drop::{DropSpec, PoolSpec, SkuSpec};
    use domain::sku::{Edges, LeaseCommand};
    use domain::{Aggregate, CityName, CreatorId, Currency, HubId, Money, StorefrontId, UnixMillis};

    fn sku() -> SkuState {
        let drop = DropSpec {
            drop_id: DropId::parse("d1").unwrap(),
            creator_id: CreatorId::parse("c1").unwrap(),
            title: "drop".into(),
            opens_at: UnixMillis(0),
            closes_at: UnixMillis(10_000_000),
            hold_ttl_ms: 5_000,
            terms: Default::default(),
            skus: vec![SkuSpec {
                sku_id: SkuId::parse("s1").unwrap(),
                name: "tote".into(),
                price: Money::new(1_500, Currency::parse("EUR").unwrap()),
                per_buyer_limit: 2,
                pools: vec![PoolSpec {
                    hub_id: HubId::parse("porto-1").unwrap(),
                    city: CityName::parse("Porto").unwrap(),
                    allocated: 9,
                }],
            }],
        };
        SkuState::new(&drop, &drop.skus[0])
    }

    #[test]
    fn a_snapshot_written_before_leases_reads_as_one_without_them() {
        let state = sku();
        // What a format 2 binary wrote: the same fields but the last, under tag 2.
        let mut old = crate::codec::encode(&state);
        let empty = postcard::to_allocvec(&Edges::default()).unwrap();
        old.truncate(old.len() - empty.len());
        old[0] = 2;
        assert_eq!(SkuState::decode_state(&old).unwrap(), state);
        let mut leased = state.clone();
        let (events, _) = leased
            .decide(
                SkuCommand::Lease(LeaseCommand {
                    edge: StorefrontId::parse("popup").unwrap(),
                    hub_id: HubId::parse("porto-1").unwrap(),
                    quantity: 4,
                    granted_max: 0,
                    key_id: "k1".into(),
                    expires_at: UnixMillis(100_000),
                    reconcile_window_ms: 3_600_000,
                }),
                UnixMillis(1_000),
            )
            .unwrap();
        for event in &events {
            leased.apply(event);
        }
        let new = crate::codec::encode(&leased);
        assert_eq!(SkuState::decode_state(&new).unwrap(), leased);
    }
}
