//! How a SKU decides: reserve, confirm, cancel, expire, restock, and the waitlist's promotions.
//! Nothing here changes the state; the events it returns do, in `apply`.

use super::*;

impl SkuState {
    pub(super) fn decide_command(
        &self,
        command: SkuCommand,
        now: UnixMillis,
    ) -> Result<(Vec<SkuEvent>, SkuReply), Rejection> {
        match command {
            SkuCommand::Reserve(cmd) => self.decide_reserve(cmd, now),
            SkuCommand::Confirm(cmd) => self.decide_confirm(cmd, now),
            SkuCommand::Cancel {
                order_id,
                storefront,
                withdrawn,
            } => self.decide_cancel(order_id, storefront.as_ref(), withdrawn, now),
            SkuCommand::ExpireDue => {
                let mut events = self.decide_expire(now);
                // Orders the hub has not acknowledged yet are sent again (see `handover`).
                if self.handover_due.is_some_and(|due| due <= now) && self.outbox_pending() {
                    events.push(SkuEvent::HandoverRetry {
                        next: UnixMillis(now.0 + HANDOVER_RETRY_MS),
                    });
                }
                Ok((events, SkuReply::Figures(self.figures())))
            }
            SkuCommand::Restock(cmd) => self.decide_restock(cmd, now),
            SkuCommand::SetSaleStatus(status) => {
                if status == self.sale {
                    return Ok((vec![], SkuReply::Figures(self.figures())));
                }
                let mut events = vec![SkuEvent::SaleStatusSet { status, at: now }];
                if status == SaleStatus::Closed {
                    self.close_waitlists(now, &mut events);
                }
                Ok((events, SkuReply::Figures(self.figures())))
            }
            SkuCommand::GetOrder { order_id } => {
                let order = self
                    .orders
                    .get(&order_id)
                    .ok_or_else(|| Rejection::not_found("order", order_id.as_str()))?;
                Ok((vec![], SkuReply::Order(self.order_view(order))))
            }
            SkuCommand::GetFigures => Ok((vec![], SkuReply::Figures(self.figures()))),
            SkuCommand::HandedOver { orders } => {
                let order_ids: Vec<OrderId> = orders
                    .into_iter()
                    .filter(|(id, withdrawn)| {
                        let cancelled = self.orders.get(id).map(|o| o.status == OrderStatus::Cancelled);
                        self.handover.contains(id) && cancelled == Some(*withdrawn)
                    })
                    .map(|(id, _)| id)
                    .collect();
                let events = if order_ids.is_empty() {
                    vec![]
                } else {
                    vec![SkuEvent::HandedOver { order_ids }]
                };
                Ok((events, SkuReply::Done))
            }
            SkuCommand::LedgerSynced { orders } => {
                let orders: Vec<(OrderId, bool)> = orders
                    .into_iter()
                    .filter(|(id, cancelled)| self.ledger_outbox.get(id) == Some(cancelled))
                    .collect();
                let events = if orders.is_empty() {
                    vec![]
                } else {
                    vec![SkuEvent::LedgerSynced { orders }]
                };
                Ok((events, SkuReply::Done))
            }
            SkuCommand::Lease(cmd) => self.decide_lease(cmd, now),
            SkuCommand::TopUpLease {
                edge,
                granted_total,
                by_edge,
            } => self.decide_top_up(edge, granted_total, by_edge, now),
            SkuCommand::ReturnLease { edge, returned_total } => self.decide_return(edge, returned_total, now),
            SkuCommand::BookEdgeSales { edge, sales } => self.decide_book_edge_sales(edge, sales, now),
            SkuCommand::GetLease { edge } => {
                let view = self
                    .lease_view(&edge)
                    .ok_or_else(|| Rejection::not_found("lease of edge", edge.as_str()))?;
                Ok((vec![], SkuReply::Lease(view)))
            }
            SkuCommand::GetLeases => Ok((
                vec![],
                SkuReply::Leases(SkuLeases {
                    leases: self.lease_views(),
                    refunds: self.edges.refunds.values().cloned().collect(),
                }),
            )),
        }
    }

    pub(super) fn reservation_of(
        &self,
        order_id: &OrderId,
        quantity: u32,
        requested: u32,
        pool: usize,
        expires_at: UnixMillis,
    ) -> Reservation {
        Reservation {
            outcome: if quantity < requested {
                ReserveOutcome::Partial
            } else {
                ReserveOutcome::Held
            },
            order_id: Some(order_id.clone()),
            quantity_held: quantity,
            quantity_requested: requested,
            hub_id: Some(self.pools[pool].hub_id.clone()),
            expires_at: Some(expires_at),
            waitlist_position: None,
        }
    }

    pub(super) fn decide_reserve(
        &self,
        cmd: ReserveCommand,
        now: UnixMillis,
    ) -> Result<(Vec<SkuEvent>, SkuReply), Rejection> {
        let ReserveCommand {
            order_id,
            params,
            idempotency_key,
        } = cmd;
        if let Some(key) = &idempotency_key {
            if let Some(entry) = self.idempotency.get(key) {
                if entry.params != params {
                    return Err(Rejection::IdempotencyKeyReused {
                        key: key.as_str().to_string(),
                    });
                }
                return Ok((vec![], SkuReply::Reservation(entry.reservation.clone())));
            }
        }
        if params.quantity == 0 {
            return Err(Rejection::field("quantity", "must be at least 1"));
        }
        if params.quantity > self.per_buyer_limit {
            return Err(Rejection::field(
                "quantity",
                format!("must be at most the per-buyer limit of {}", self.per_buyer_limit),
            ));
        }
        match self.effective_sale(now) {
            SaleStatus::Open => {}
            SaleStatus::Scheduled => {
                return Err(Rejection::FailedPrecondition(format!(
                    "drop {} has not opened yet",
                    self.drop_id
                )))
            }
            SaleStatus::Closed => {
                return Err(Rejection::FailedPrecondition(format!(
                    "drop {} is closed",
                    self.drop_id
                )))
            }
        }
        let candidates = self.city_pools(&params.city);
        if candidates.is_empty() {
            return Err(Rejection::field(
                "city",
                format!("SKU {} is not sold in {}", self.sku_id, params.city),
            ));
        }
        let candidates = match &params.hub_id {
            None => candidates,
            Some(hub) => match candidates.iter().copied().find(|&i| &self.pools[i].hub_id == hub) {
                Some(i) => vec![i],
                None => {
                    return Err(Rejection::field(
                        "hub_id",
                        format!("hub {hub} has no stock of {} for {}", self.sku_id, params.city),
                    ))
                }
            },
        };
        let active = self.buyer_active.get(&params.buyer).copied().unwrap_or(0);
        if active + params.quantity > self.per_buyer_limit {
            return Err(Rejection::BuyerLimitReached {
                limit: self.per_buyer_limit,
                active,
            });
        }
        let idempotent = idempotency_key.map(|key| Idempotent {
            key,
            params: params.clone(),
        });
        // A newcomer is served whenever stock it can use is free, waitlist or not: no request
        // waiting could be served from that stock (see `check_waitlist`), so serving the
        // newcomer passes nobody who could have had it.
        let free = candidates.iter().map(|&i| (i, self.pools[i].available));
        if let Some((best, quantity)) = serving(params.quantity, params.allow_partial, free) {
            let expires_at = now.plus_ms(self.hold_ttl_ms);
            let reply = self.reservation_of(&order_id, quantity, params.quantity, best, expires_at);
            let event = SkuEvent::Held {
                order_id,
                storefront: params.storefront,
                buyer: params.buyer,
                city: params.city,
                hub_id: self.pools[best].hub_id.clone(),
                quantity,
                requested: params.quantity,
                allow_partial: params.allow_partial,
                expires_at,
                idempotent,
                at: now,
            };
            return Ok((vec![event], SkuReply::Reservation(reply)));
        }
        // Stock may still come back in this city only if some of it is free or held.
        let may_return = candidates
            .iter()
            .any(|&i| self.pools[i].available + self.pools[i].held > 0);
        let queue_len = self.waitlists.get(&params.city).map_or(0, VecDeque::len);
        if params.join_waitlist && may_return && queue_len < WAITLIST_PER_CITY_MAX {
            let reply = Reservation {
                outcome: ReserveOutcome::Waitlisted,
                order_id: Some(order_id.clone()),
                quantity_held: 0,
                quantity_requested: params.quantity,
                hub_id: None,
                expires_at: None,
                waitlist_position: Some(queue_len as u32 + 1),
            };
            // Unpinned requests keep writing the older variant, so only journals with pinned
            // requests need a version that knows the new one.
            let event = match params.hub_id.clone() {
                None => SkuEvent::Waitlisted {
                    order_id,
                    storefront: params.storefront,
                    buyer: params.buyer,
                    city: params.city,
                    requested: params.quantity,
                    allow_partial: params.allow_partial,
                    idempotent,
                    at: now,
                },
                Some(hub_id) => SkuEvent::WaitlistedAtHub {
                    order_id,
                    storefront: params.storefront,
                    buyer: params.buyer,
                    city: params.city,
                    hub_id,
                    requested: params.quantity,
                    allow_partial: params.allow_partial,
                    idempotent,
                    at: now,
                },
            };
            return Ok((vec![event], SkuReply::Reservation(reply)));
        }
        let reply = Reservation {
            outcome: ReserveOutcome::SoldOut,
            order_id: None,
            quantity_held: 0,
            quantity_requested: params.quantity,
            hub_id: None,
            expires_at: None,
            waitlist_position: None,
        };
        let events = idempotent
            .map(|idempotent| SkuEvent::Refused { idempotent, at: now })
            .into_iter()
            .collect();
        Ok((events, SkuReply::Reservation(reply)))
    }

    pub(super) fn decide_confirm(
        &self,
        cmd: ConfirmCommand,
        now: UnixMillis,
    ) -> Result<(Vec<SkuEvent>, SkuReply), Rejection> {
        let order = self
            .orders
            .get(&cmd.order_id)
            .ok_or_else(|| Rejection::not_found("order", cmd.order_id.as_str()))?;
        order.check_storefront(cmd.storefront.as_ref())?;
        match order.status {
            OrderStatus::Confirmed => {
                let existing = order
                    .confirmation
                    .as_ref()
                    .expect("confirmed orders carry their confirmation");
                let same = existing.payment_reference == cmd.payment_reference
                    && existing.amount == cmd.amount
                    && existing.fulfilment == cmd.fulfilment
                    && existing.discreet == cmd.discreet
                    && existing.address_digest == cmd.address_digest;
                if same {
                    return Ok((vec![], SkuReply::Order(self.order_view(order))));
                }
                return Err(Rejection::AlreadyExists {
                    what: "confirmed order".into(),
                    id: cmd.order_id.to_string(),
                });
            }
            OrderStatus::Waitlisted => {
                return Err(Rejection::FailedPrecondition(
                    "order is on the waitlist: it can be confirmed once it is held".into(),
                ))
            }
            OrderStatus::Expired => {
                return Err(Rejection::FailedPrecondition(format!(
                    "the hold of order {} expired",
                    cmd.order_id
                )))
            }
            OrderStatus::Cancelled => return Err(Rejection::FailedPrecondition("order was cancelled".into())),
            OrderStatus::Held => {}
        }
        if order.expires_at.is_some_and(|t| now >= t) {
            return Err(Rejection::FailedPrecondition(format!(
                "the hold of order {} expired",
                cmd.order_id
            )));
        }
        let due = self
            .price
            .times(order.quantity)
            .ok_or_else(|| Rejection::field("amount", "amount overflows"))?;
        if cmd.amount != due {
            return Err(Rejection::field(
                "amount",
                format!("must equal price × quantity = {due}"),
            ));
        }
        let event = SkuEvent::Confirmed {
            order_id: cmd.order_id.clone(),
            confirmation: Confirmation {
                payment_reference: cmd.payment_reference,
                amount: cmd.amount,
                fulfilment: cmd.fulfilment,
                discreet: cmd.discreet,
                pickup_code: cmd.pickup_code,
                receipt_token: cmd.receipt_token,
                confirmed_at: now,
                address_digest: cmd.address_digest,
            },
        };
        self.reply_after(vec![event], &cmd.order_id)
    }

    /// The reply to a command that changes one order: its view after the events. Only the
    /// events about that order are applied, to a skeleton copy, so a hot SKU does not clone
    /// all its orders per command.
    pub(super) fn reply_after(
        &self,
        events: Vec<SkuEvent>,
        order_id: &OrderId,
    ) -> Result<(Vec<SkuEvent>, SkuReply), Rejection> {
        let mut next = self.skeleton(std::iter::once(order_id));
        for event in events.iter().filter(|e| e.order_id() == Some(order_id)) {
            next.apply(event);
        }
        let view = next.order_view(&next.orders[order_id]);
        Ok((events, SkuReply::Order(view)))
    }

    /// A copy with the scalars, pools and waitlists but only the named orders: enough to
    /// apply events about those orders and read views and figures afterwards.
    pub(super) fn skeleton<'a>(&self, order_ids: impl Iterator<Item = &'a OrderId>) -> SkuState {
        SkuState {
            drop_id: self.drop_id.clone(),
            sku_id: self.sku_id.clone(),
            name: self.name.clone(),
            price: self.price,
            per_buyer_limit: self.per_buyer_limit,
            hold_ttl_ms: self.hold_ttl_ms,
            opens_at: self.opens_at,
            closes_at: self.closes_at,
            sale: self.sale,
            pools: self.pools.clone(),
            orders: order_ids
                .filter_map(|id| self.orders.get_key_value(id))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            waitlists: self.waitlists.clone(),
            expiries: BTreeSet::new(),
            buyer_active: KeyMap::new(),
            idempotency: KeyMap::new(),
            idempotency_order: VecDeque::new(),
            restock_keys: HashMap::new(),
            revenue_minor_units: self.revenue_minor_units,
            sold_out_at: self.sold_out_at,
            changed_at: self.changed_at,
            creator_id: self.creator_id.clone(),
            handover: BTreeSet::new(),
            handover_due: None,
            terms: self.terms,
            ledger_outbox: BTreeMap::new(),
            edges: Edges {
                leases: self.edges.leases.clone(),
                refunds: BTreeMap::new(),
            },
        }
    }

    /// Waitlist promotions in `city` after stock came back, given the pools' availability
    /// as it will be once the events decided so far are applied. Requests are served in
    /// arrival order among those that can be served now; one that cannot (it wants more than
    /// any pool it may use has free, or its pinned hub is empty) keeps its place and is
    /// passed over, so it never strands stock a request behind it could take. One pass
    /// reaches the fixed point: a promotion only takes stock away, so a request passed over
    /// stays unservable for the rest of the pass. It is bounded by the city's queue
    /// (`WAITLIST_PER_CITY_MAX`), and ends early once the city has nothing free.
    pub(super) fn promote(&self, city: &CityName, available: &mut [u32], now: UnixMillis, events: &mut Vec<SkuEvent>) {
        if self.effective_sale(now) == SaleStatus::Closed {
            return;
        }
        let Some(queue) = self.waitlists.get(city) else {
            return;
        };
        let city_pools = self.city_pools(city);
        let promoted_already: BTreeSet<&OrderId> = events
            .iter()
            .filter_map(|e| match e {
                SkuEvent::Promoted { order_id, .. } => Some(order_id),
                _ => None,
            })
            .collect();
        let mut newly = Vec::new();
        for order_id in queue.iter().filter(|id| !promoted_already.contains(id)) {
            if city_pools.iter().all(|&i| available[i] == 0) {
                break;
            }
            let order = &self.orders[order_id];
            let free = pools_of(order, &city_pools).map(|i| (i, available[i]));
            let Some((pool, quantity)) = serving(order.requested, order.allow_partial, free) else {
                continue;
            };
            available[pool] -= quantity;
            newly.push(SkuEvent::Promoted {
                order_id: order_id.clone(),
                hub_id: self.pools[pool].hub_id.clone(),
                quantity,
                expires_at: now.plus_ms(self.hold_ttl_ms),
                at: now,
            });
        }
        events.extend(newly);
    }

    pub(super) fn available_now(&self) -> Vec<u32> {
        self.pools.iter().map(|p| p.available).collect()
    }

    pub(super) fn decide_cancel(
        &self,
        order_id: OrderId,
        storefront: Option<&StorefrontId>,
        withdrawn: bool,
        now: UnixMillis,
    ) -> Result<(Vec<SkuEvent>, SkuReply), Rejection> {
        let order = self
            .orders
            .get(&order_id)
            .ok_or_else(|| Rejection::not_found("order", order_id.as_str()))?;
        order.check_storefront(storefront)?;
        if order.status == OrderStatus::Confirmed && !withdrawn {
            return Err(Rejection::FailedPrecondition(format!(
                "order {order_id} is confirmed: its hub must withdraw the dispatch before it is cancelled"
            )));
        }
        let mut events = Vec::new();
        match order.status {
            OrderStatus::Held | OrderStatus::Confirmed => {
                let pool = order.pool.expect("held and confirmed orders have a pool");
                events.push(if order.status == OrderStatus::Held {
                    SkuEvent::Released {
                        order_id: order_id.clone(),
                        reason: ReleaseReason::Cancelled,
                        at: now,
                    }
                } else {
                    SkuEvent::OrderCancelled {
                        order_id: order_id.clone(),
                        at: now,
                    }
                });
                let mut available = self.available_now();
                available[pool] += order.quantity;
                self.promote(&order.city, &mut available, now, &mut events);
            }
            OrderStatus::Waitlisted => events.push(SkuEvent::WaitlistLeft {
                order_id: order_id.clone(),
                reason: LeaveReason::Cancelled,
                at: now,
            }),
            // Cancelling what has already ended is a safe retry.
            OrderStatus::Expired | OrderStatus::Cancelled => {}
        }
        self.reply_after(events, &order_id)
    }

    pub(super) fn decide_expire(&self, now: UnixMillis) -> Vec<SkuEvent> {
        let mut events = Vec::new();
        let mut available = self.available_now();
        let mut cities = BTreeSet::new();
        for (expires_at, order_id) in &self.expiries {
            if *expires_at > now {
                break;
            }
            let order = &self.orders[order_id];
            available[order.pool.expect("held orders have a pool")] += order.quantity;
            cities.insert(order.city.clone());
            events.push(SkuEvent::Released {
                order_id: order_id.clone(),
                reason: ReleaseReason::Expired,
                at: now,
            });
        }
        self.decide_lapses(now, &mut available, &mut cities, &mut events);
        if self.effective_sale(now) == SaleStatus::Closed {
            self.close_waitlists(now, &mut events);
        } else {
            for city in &cities {
                self.promote(city, &mut available, now, &mut events);
            }
        }
        events
    }

    pub(super) fn close_waitlists(&self, now: UnixMillis, events: &mut Vec<SkuEvent>) {
        for queue in self.waitlists.values() {
            for order_id in queue {
                events.push(SkuEvent::WaitlistLeft {
                    order_id: order_id.clone(),
                    reason: LeaveReason::SaleClosed,
                    at: now,
                });
            }
        }
    }

    pub(super) fn decide_restock(
        &self,
        cmd: RestockCommand,
        now: UnixMillis,
    ) -> Result<(Vec<SkuEvent>, SkuReply), Rejection> {
        if let Some(key) = &cmd.idempotency_key {
            if let Some((hub, quantity)) = self.restock_keys.get(key) {
                if hub == &cmd.hub_id && *quantity == cmd.quantity {
                    return Ok((vec![], SkuReply::Figures(self.figures())));
                }
                return Err(Rejection::IdempotencyKeyReused {
                    key: key.as_str().to_string(),
                });
            }
        }
        if cmd.quantity == 0 || cmd.quantity > POOL_UNITS_MAX {
            return Err(Rejection::field(
                "quantity",
                format!("must be between 1 and {POOL_UNITS_MAX}"),
            ));
        }
        if self.effective_sale(now) == SaleStatus::Closed {
            return Err(Rejection::FailedPrecondition(format!(
                "drop {} is closed",
                self.drop_id
            )));
        }
        let (pool, city) = match self.pool_index(&cmd.hub_id) {
            Some(i) => {
                if cmd.city.as_ref().is_some_and(|c| c != &self.pools[i].city) {
                    return Err(Rejection::field(
                        "city",
                        format!("hub {} serves {}", cmd.hub_id, self.pools[i].city),
                    ));
                }
                if self.pools[i].allocated.saturating_add(cmd.quantity) > POOL_UNITS_MAX {
                    return Err(Rejection::field(
                        "quantity",
                        format!("a pool holds at most {POOL_UNITS_MAX} units"),
                    ));
                }
                (Some(i), self.pools[i].city.clone())
            }
            None if self.pools.len() >= POOLS_PER_SKU_MAX => {
                return Err(Rejection::field(
                    "hub_id",
                    format!("at most {POOLS_PER_SKU_MAX} hubs per SKU"),
                ))
            }
            None => match &cmd.city {
                Some(city) => (None, city.clone()),
                None => {
                    return Err(Rejection::field(
                        "city",
                        format!("hub {} has no pool for this SKU yet: give its city", cmd.hub_id),
                    ))
                }
            },
        };
        let mut events = vec![SkuEvent::Restocked {
            hub_id: cmd.hub_id.clone(),
            city: city.clone(),
            quantity: cmd.quantity,
            idempotency_key: cmd.idempotency_key,
            at: now,
        }];
        let mut available = self.available_now();
        match pool {
            Some(i) => available[i] += cmd.quantity,
            None => available.push(cmd.quantity),
        }
        // Promotions are decided against the state with the restock applied (it may add a
        // pool); the skeleton holds the waitlisted orders they may name.
        let mut restocked = self.skeleton(self.waitlists.values().flatten());
        restocked.apply(&events[0]);
        restocked.promote(&city, &mut available, now, &mut events);
        for event in &events[1..] {
            restocked.apply(event);
        }
        Ok((events, SkuReply::Figures(restocked.figures())))
    }
}

/// Where a request for `requested` units is served from and how many units it gets, given
/// the pools it may use with what each has free: the fullest pool (ties go to the earlier
/// one, so the choice is deterministic), for all it asked or, if it allows a partial hold,
/// for what that pool has. None when it cannot be served now.
pub(super) fn serving(
    requested: u32,
    allow_partial: bool,
    free: impl Iterator<Item = (usize, u32)>,
) -> Option<(usize, u32)> {
    let (pool, available) = free.max_by_key(|&(i, available)| (available, std::cmp::Reverse(i)))?;
    if available >= requested {
        Some((pool, requested))
    } else if allow_partial && available > 0 {
        Some((pool, available))
    } else {
        None
    }
}

/// The pools a waitlisted order may be served from, out of its city's (`city_pools`): only
/// its pinned hub's if the buyer named one.
pub(super) fn pools_of<'a>(order: &OrderRecord, city_pools: &'a [usize]) -> impl Iterator<Item = usize> + 'a {
    let pin = order.pool;
    city_pools.iter().copied().filter(move |&i| pin.is_none_or(|p| p == i))
}
