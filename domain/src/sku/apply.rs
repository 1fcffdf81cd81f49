//! How a SKU applies its events, and the bookkeeping they share; pools are checked after
//! every change (`assert_pool`).

use super::*;

impl SkuState {
    /// Records a change made at `at` (see [`SkuState::changed_at`]).
    pub(super) fn touch(&mut self, at: UnixMillis) {
        self.changed_at = self.changed_at.max(at);
    }

    pub(super) fn apply_event(&mut self, event: &SkuEvent) {
        if self.apply_lease_event(event) {
            return;
        }
        match event {
            SkuEvent::LedgerSynced { orders } => {
                for (id, cancelled) in orders {
                    if self.ledger_outbox.get(id) == Some(cancelled) {
                        self.ledger_outbox.remove(id);
                    }
                }
                if !self.outbox_pending() {
                    self.handover_due = None;
                }
            }
            SkuEvent::HandedOver { order_ids } => {
                for id in order_ids {
                    self.handed_over(id);
                }
            }
            SkuEvent::HandoverRetry { next } => self.handover_due = Some(*next),
            SkuEvent::SaleStatusSet { status, at } => {
                self.sale = *status;
                self.touch(*at);
            }
            SkuEvent::Held {
                order_id,
                storefront,
                buyer,
                city,
                hub_id,
                quantity,
                requested,
                allow_partial,
                expires_at,
                idempotent,
                at,
            } => {
                let pool = self.pool_index(hub_id).expect("held from a known pool");
                self.pools[pool].available -= quantity;
                self.pools[pool].held += quantity;
                self.assert_pool(pool);
                self.expiries.insert((*expires_at, order_id.clone()));
                self.add_active(buyer, *quantity);
                let record = OrderRecord {
                    order_id: order_id.clone(),
                    storefront: storefront.clone(),
                    buyer: buyer.clone(),
                    city: city.clone(),
                    pool: Some(pool),
                    requested: *requested,
                    quantity: *quantity,
                    allow_partial: *allow_partial,
                    status: OrderStatus::Held,
                    expires_at: Some(*expires_at),
                    confirmation: None,
                    updated_at: *at,
                };
                if let Some(idempotent) = idempotent {
                    let reservation = self.reservation_of(order_id, *quantity, *requested, pool, *expires_at);
                    self.record_idempotent(idempotent, reservation, *at);
                }
                self.orders.insert(order_id.clone(), Box::new(record));
                self.touch(*at);
            }
            SkuEvent::Waitlisted {
                order_id,
                storefront,
                buyer,
                city,
                requested,
                allow_partial,
                idempotent,
                at,
            }
            | SkuEvent::WaitlistedAtHub {
                order_id,
                storefront,
                buyer,
                city,
                requested,
                allow_partial,
                idempotent,
                at,
                ..
            } => {
                let pin = match event {
                    SkuEvent::WaitlistedAtHub { hub_id, .. } => {
                        Some(self.pool_index(hub_id).expect("waitlisted at a known hub"))
                    }
                    _ => None,
                };
                let queue = self.waitlists.entry(city.clone()).or_default();
                queue.push_back(order_id.clone());
                let position = queue.len() as u32;
                self.add_active(buyer, *requested);
                self.orders.insert(
                    order_id.clone(),
                    Box::new(OrderRecord {
                        order_id: order_id.clone(),
                        storefront: storefront.clone(),
                        buyer: buyer.clone(),
                        city: city.clone(),
                        pool: pin,
                        requested: *requested,
                        quantity: 0,
                        allow_partial: *allow_partial,
                        status: OrderStatus::Waitlisted,
                        expires_at: None,
                        confirmation: None,
                        updated_at: *at,
                    }),
                );
                if let Some(idempotent) = idempotent {
                    let reservation = Reservation {
                        outcome: ReserveOutcome::Waitlisted,
                        order_id: Some(order_id.clone()),
                        quantity_held: 0,
                        quantity_requested: *requested,
                        hub_id: None,
                        expires_at: None,
                        waitlist_position: Some(position),
                    };
                    self.record_idempotent(idempotent, reservation, *at);
                }
                self.touch(*at);
            }
            SkuEvent::Refused { idempotent, at } => {
                let reservation = Reservation {
                    outcome: ReserveOutcome::SoldOut,
                    order_id: None,
                    quantity_held: 0,
                    quantity_requested: idempotent.params.quantity,
                    hub_id: None,
                    expires_at: None,
                    waitlist_position: None,
                };
                self.record_idempotent(idempotent, reservation, *at);
            }
            SkuEvent::Promoted {
                order_id,
                hub_id,
                quantity,
                expires_at,
                at,
            } => {
                let pool = self.pool_index(hub_id).expect("promoted into a known pool");
                let order = self.orders.get_mut(order_id).expect("promoted order exists");
                let (city, buyer, unused) = (order.city.clone(), order.buyer.clone(), order.requested - quantity);
                order.pool = Some(pool);
                order.quantity = *quantity;
                order.status = OrderStatus::Held;
                order.expires_at = Some(*expires_at);
                order.updated_at = *at;
                self.remove_from_waitlist(&city, order_id);
                self.remove_active(&buyer, unused);
                self.pools[pool].available -= quantity;
                self.pools[pool].held += quantity;
                self.assert_pool(pool);
                self.expiries.insert((*expires_at, order_id.clone()));
                self.touch(*at);
            }
            SkuEvent::Released { order_id, reason, at } => {
                let order = self.orders.get_mut(order_id).expect("released order exists");
                let (pool, quantity, buyer, expires_at) = (
                    order.pool.expect("held orders have a pool"),
                    order.quantity,
                    order.buyer.clone(),
                    order.expires_at,
                );
                order.status = match reason {
                    ReleaseReason::Expired => OrderStatus::Expired,
                    ReleaseReason::Cancelled => OrderStatus::Cancelled,
                };
                order.updated_at = *at;
                if let Some(t) = expires_at {
                    self.expiries.remove(&(t, order_id.clone()));
                }
                self.pools[pool].held -= quantity;
                self.pools[pool].available += quantity;
                self.assert_pool(pool);
                self.remove_active(&buyer, quantity);
                self.touch(*at);
            }
            SkuEvent::WaitlistLeft { order_id, at, .. } => {
                let order = self.orders.get_mut(order_id).expect("waitlisted order exists");
                order.status = OrderStatus::Cancelled;
                order.updated_at = *at;
                let (city, buyer, requested) = (order.city.clone(), order.buyer.clone(), order.requested);
                self.remove_from_waitlist(&city, order_id);
                self.remove_active(&buyer, requested);
                self.touch(*at);
            }
            SkuEvent::Confirmed { order_id, confirmation } => {
                let order = self.orders.get_mut(order_id).expect("confirmed order exists");
                let (pool, quantity, expires_at) = (
                    order.pool.expect("held orders have a pool"),
                    order.quantity,
                    order.expires_at,
                );
                order.status = OrderStatus::Confirmed;
                order.confirmation = Some(confirmation.clone());
                order.updated_at = confirmation.confirmed_at;
                self.handover.insert(order_id.clone());
                self.queue_for_ledger(order_id, false, confirmation.confirmed_at);
                if let Some(t) = expires_at {
                    self.expiries.remove(&(t, order_id.clone()));
                }
                self.pools[pool].held -= quantity;
                self.pools[pool].sold += quantity;
                self.assert_pool(pool);
                self.revenue_minor_units += confirmation.amount.minor_units;
                self.touch(confirmation.confirmed_at);
                self.update_sold_out(confirmation.confirmed_at);
            }
            SkuEvent::OrderCancelled { order_id, at } => {
                let order = self.orders.get_mut(order_id).expect("cancelled order exists");
                let (pool, quantity, buyer) = (
                    order.pool.expect("confirmed orders have a pool"),
                    order.quantity,
                    order.buyer.clone(),
                );
                let amount = order.confirmation.as_ref().map_or(0, |c| c.amount.minor_units);
                order.status = OrderStatus::Cancelled;
                order.updated_at = *at;
                // Its hub is told to withdraw it (again: the cancel asked it first), and the
                // ledger to refund it; the retry deadline `queue_for_ledger` sets covers both.
                self.handover.insert(order_id.clone());
                self.queue_for_ledger(order_id, true, *at);
                self.pools[pool].sold -= quantity;
                self.pools[pool].available += quantity;
                self.assert_pool(pool);
                self.revenue_minor_units -= amount;
                self.remove_active(&buyer, quantity);
                self.touch(*at);
                self.update_sold_out(*at);
            }
            SkuEvent::Restocked {
                hub_id,
                city,
                quantity,
                idempotency_key,
                at,
            } => {
                let pool = match self.pool_index(hub_id) {
                    Some(i) => {
                        self.pools[i].allocated += quantity;
                        self.pools[i].available += quantity;
                        i
                    }
                    None => {
                        self.pools.push(Pool {
                            hub_id: hub_id.clone(),
                            city: city.clone(),
                            allocated: *quantity,
                            available: *quantity,
                            held: 0,
                            sold: 0,
                        });
                        self.pools.len() - 1
                    }
                };
                self.assert_pool(pool);
                if let Some(key) = idempotency_key {
                    self.restock_keys.insert(key.clone(), (hub_id.clone(), *quantity));
                }
                self.touch(*at);
                self.update_sold_out(*at);
            }
            SkuEvent::StockLeased { .. }
            | SkuEvent::LeaseToppedUp { .. }
            | SkuEvent::LeaseReturned { .. }
            | SkuEvent::LeaseLapsed { .. }
            | SkuEvent::EdgeSaleBooked { .. }
            | SkuEvent::EdgeSaleRefunded { .. } => unreachable!("lease events are applied by apply_lease_event"),
        }
    }

    /// Puts an order in the ledger outbox, with a retry deadline if none is running.
    pub(super) fn queue_for_ledger(&mut self, order_id: &OrderId, cancelled: bool, at: UnixMillis) {
        self.ledger_outbox.insert(order_id.clone(), cancelled);
        if self.handover_due.is_none() {
            self.handover_due = Some(UnixMillis(at.0 + HANDOVER_RETRY_MS));
        }
    }

    /// Takes an acknowledged order out of the outbox; the retry deadline goes with the last
    /// one.
    pub(super) fn handed_over(&mut self, order_id: &OrderId) {
        self.handover.remove(order_id);
        if !self.outbox_pending() {
            self.handover_due = None;
        }
    }

    pub(super) fn record_idempotent(&mut self, idempotent: &Idempotent, reservation: Reservation, at: UnixMillis) {
        self.idempotency.insert(
            idempotent.key.clone(),
            Box::new(IdempotencyEntry {
                params: idempotent.params.clone(),
                reservation,
                at,
            }),
        );
        self.idempotency_order.push_back((at, idempotent.key.clone()));
        while let Some((oldest, key)) = self.idempotency_order.front() {
            let expired = at.0 - oldest.0 > IDEMPOTENCY_RETENTION_MS;
            if !expired && self.idempotency_order.len() <= IDEMPOTENCY_KEYS_PER_SKU_MAX {
                break;
            }
            self.idempotency.remove(key);
            self.idempotency_order.pop_front();
        }
        // One queue entry per stored key (a key is recorded once: a repeat is answered from
        // the map), so forgetting the oldest entry forgets exactly one key.
        debug_assert_eq!(self.idempotency.len(), self.idempotency_order.len());
        debug_assert!(self.idempotency.len() <= IDEMPOTENCY_KEYS_PER_SKU_MAX);
    }

    /// Asserts the pool invariant after a change of `pool`'s counters: every unit of its
    /// allocation is available, held, sold or leased to an edge, once. O(leases), so it runs
    /// on every change: a broken count (an overflow in a release build) would sell units
    /// that do not exist.
    pub(super) fn assert_pool(&self, pool: usize) {
        let p = &self.pools[pool];
        let leased = if self.edges.leases.is_empty() {
            0
        } else {
            self.leased(pool)
        };
        assert!(
            u64::from(p.available) + u64::from(p.held) + u64::from(p.sold) + u64::from(leased)
                == u64::from(p.allocated),
            "{}/{} pool {}: available {} + held {} + sold {} + leased {leased} != allocated {}",
            self.drop_id,
            self.sku_id,
            p.hub_id,
            p.available,
            p.held,
            p.sold,
            p.allocated
        );
    }

    pub(super) fn add_active(&mut self, buyer: &BuyerRef, quantity: u32) {
        if quantity > 0 {
            *self.buyer_active.get_or_default(buyer) += quantity;
        }
    }

    pub(super) fn remove_active(&mut self, buyer: &BuyerRef, quantity: u32) {
        if let Some(n) = self.buyer_active.get_mut(buyer) {
            *n -= quantity;
            if *n == 0 {
                self.buyer_active.remove(buyer);
            }
        }
    }

    pub(super) fn remove_from_waitlist(&mut self, city: &CityName, order_id: &OrderId) {
        if let Some(queue) = self.waitlists.get_mut(city) {
            if let Some(i) = queue.iter().position(|id| id == order_id) {
                queue.remove(i);
            }
            if queue.is_empty() {
                self.waitlists.remove(city);
            }
        }
    }

    pub(super) fn update_sold_out(&mut self, at: UnixMillis) {
        let all_sold =
            self.pools.iter().all(|p| p.available == 0 && p.held == 0) && self.pools.iter().any(|p| p.sold > 0);
        self.sold_out_at = match (all_sold, self.sold_out_at) {
            (true, None) => Some(at),
            (true, kept) => kept,
            (false, _) => None,
        };
    }
}
