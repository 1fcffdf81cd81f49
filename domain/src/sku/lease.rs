//! Leases of stock to pop-up edges. An edge (a storefront at a stall, see `dropline edge`)
//! takes units out of one hub's pool before it sells: they leave the pool's available
//! stock, so per pool, always, `available + held + sold + leased = allocated`, where
//! `leased` is what the pool's live leases still hold. The edge sells only what it holds,
//! online or offline, so the SKU can never be oversold whatever the edge does. Its sales
//! come back in uploads, booked once each by order id (an order like any other: the hub's
//! hand-over and the creator's ledger follow through the SKU's outboxes); a sale made
//! outside the lease, uploaded later than the reconciliation window, or beyond what the
//! lease held is refunded and remembered, so its upload replays the same answer. Units the
//! edge returns, and what a lease still holds once its window after expiry has passed,
//! go back to the pool (and to the waitlist, as any returned stock does).

use super::*;

/// What a SKU knows of its edges. One field of `SkuState` (its last), so a snapshot written
/// before leases reads as one with none (see `actors::codec`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edges {
    pub leases: BTreeMap<StorefrontId, EdgeLease>,
    /// Edge sales refused and to be refunded, with why: an upload of one again gets the
    /// same answer, and reports list them.
    pub refunds: BTreeMap<OrderId, EdgeRefund>,
}

/// One edge's lease of one hub's pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeLease {
    /// Index into `SkuState::pools`.
    pub pool: usize,
    /// Units the edge holds now: leased, and neither booked as sold nor returned.
    pub outstanding: u32,
    /// Units leased in all, top-ups included.
    pub granted: u32,
    /// The edge may top itself up until `granted` reaches this (the operator may go beyond).
    pub granted_max: u32,
    pub sold: u32,
    pub returned: u32,
    /// Units of uploaded sales refused and to be refunded.
    pub refunded: u32,
    /// Names the HMAC key receipts of this lease are signed with (the key itself is derived
    /// outside the domain and never stored).
    pub key_id: String,
    pub started_at: UnixMillis,
    /// The edge sells until then; uploads of its sales are booked until their window ends.
    pub expires_at: UnixMillis,
    pub reconcile_window_ms: u64,
    pub ended: Option<(LeaseEnd, UnixMillis)>,
    /// When the last upload with sales in it was booked.
    pub last_sync: Option<UnixMillis>,
}

impl EdgeLease {
    /// When what the lease still holds returns to its pool: its expiry plus the window, so
    /// every sale made before the expiry and uploaded within its window finds its units.
    pub fn lapses_at(&self) -> UnixMillis {
        self.expires_at.plus_ms(self.reconcile_window_ms)
    }

    pub fn is_live(&self) -> bool {
        self.ended.is_none()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseEnd {
    /// The edge or the operator closed it: everything it held went back.
    Closed,
    /// Its window after expiry passed: what it still held went back.
    Lapsed,
}

/// One sale an edge made from its lease, as its upload carries it. The order id is the
/// edge's (`<drop>.<sku>.<random>`), so a second upload of the sale finds the first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeSale {
    pub order_id: OrderId,
    pub quantity: u32,
    pub amount: Money,
    pub fulfilment: Fulfilment,
    pub payment_reference: String,
    pub pickup_code: String,
    /// The receipt's MAC (checked before the SKU sees the sale), kept as the order's receipt.
    pub receipt_mac: String,
    /// The key id of the lease it was sold under: a sale of an earlier lease is never booked
    /// against a later one.
    pub key_id: String,
    /// The edge's clock when it sold.
    pub sold_at: UnixMillis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EdgeRefundReason {
    /// Sold under another lease, before the lease started, at or after its expiry, or after
    /// it was closed.
    SoldOutsideLease,
    /// Uploaded more than the reconciliation window after the sale.
    ReconciledTooLate,
    /// Sold within the lease, but the lease had ended (closed or lapsed) and its units gone
    /// back to the pool before the upload came.
    LeaseEnded,
    /// More units than the lease still held.
    LeaseExhausted,
    /// The amount is not price × quantity.
    AmountMismatch,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeRefund {
    pub edge: StorefrontId,
    pub sale: EdgeSale,
    pub reason: EdgeRefundReason,
    pub at: UnixMillis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EdgeSaleOutcome {
    /// Booked as an order (now or by an earlier upload).
    Booked,
    /// Refused, to be refunded (now or by an earlier upload).
    Refunded(EdgeRefundReason),
    /// Another order or sale already has this id with different content: nothing changed.
    Conflict,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeSaleResult {
    pub order_id: OrderId,
    pub outcome: EdgeSaleOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseCommand {
    pub edge: StorefrontId,
    pub hub_id: HubId,
    pub quantity: u32,
    /// 0: the edge may not top itself up.
    pub granted_max: u32,
    pub key_id: String,
    pub expires_at: UnixMillis,
    pub reconcile_window_ms: u64,
}

/// A lease's figures, as GetDrop and WatchDrop show them per SKU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseFigures {
    pub edge: StorefrontId,
    pub hub_id: HubId,
    /// Units the lease holds now.
    pub outstanding: u32,
    pub granted: u32,
    pub sold: u32,
    pub returned: u32,
    pub refunded: u32,
    pub expires_at: UnixMillis,
    pub ended: bool,
    pub last_sync: Option<UnixMillis>,
}

/// A lease as the operator and its edge see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseView {
    pub drop_id: DropId,
    pub sku_id: SkuId,
    pub edge: StorefrontId,
    pub hub_id: HubId,
    pub city: CityName,
    pub price: Money,
    pub lease: EdgeLease,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeUpload {
    pub results: Vec<EdgeSaleResult>,
    pub lease: LeaseView,
}

impl SkuState {
    pub fn lease_view(&self, edge: &StorefrontId) -> Option<LeaseView> {
        let lease = self.edges.leases.get(edge)?;
        let pool = &self.pools[lease.pool];
        Some(LeaseView {
            drop_id: self.drop_id.clone(),
            sku_id: self.sku_id.clone(),
            edge: edge.clone(),
            hub_id: pool.hub_id.clone(),
            city: pool.city.clone(),
            price: self.price,
            lease: lease.clone(),
        })
    }

    /// Every lease's figures (at most `LEASES_PER_SKU_MAX`), by edge.
    pub fn lease_figures(&self) -> Vec<LeaseFigures> {
        self.edges
            .leases
            .iter()
            .map(|(edge, l)| LeaseFigures {
                edge: edge.clone(),
                hub_id: self.pools[l.pool].hub_id.clone(),
                outstanding: l.outstanding,
                granted: l.granted,
                sold: l.sold,
                returned: l.returned,
                refunded: l.refunded,
                expires_at: l.expires_at,
                ended: l.ended.is_some(),
                last_sync: l.last_sync,
            })
            .collect()
    }

    pub fn lease_views(&self) -> Vec<LeaseView> {
        self.edges.leases.keys().filter_map(|e| self.lease_view(e)).collect()
    }

    /// Units the live leases of pool `pool` hold.
    pub fn leased(&self, pool: usize) -> u32 {
        self.edges
            .leases
            .values()
            .filter(|l| l.pool == pool)
            .map(|l| l.outstanding)
            .sum()
    }

    /// The buyer an edge's sales are counted against: the edge itself (buyers at a stall are
    /// not known to the platform; the edge applies the per-buyer limit to its own sales).
    pub fn edge_buyer(edge: &StorefrontId) -> BuyerRef {
        BuyerRef::from_hash_hex(format!("edge-{edge}"))
    }

    /// The earliest time a live lease lapses.
    pub(super) fn next_lapse(&self) -> Option<UnixMillis> {
        self.edges
            .leases
            .values()
            .filter(|l| l.is_live())
            .map(EdgeLease::lapses_at)
            .min()
    }

    fn live_lease(&self, edge: &StorefrontId) -> Result<&EdgeLease, Rejection> {
        let lease = self
            .edges
            .leases
            .get(edge)
            .ok_or_else(|| Rejection::not_found("lease of edge", edge.as_str()))?;
        if let Some((end, _)) = lease.ended {
            return Err(Rejection::FailedPrecondition(format!(
                "the lease of edge {edge} has ended ({}): lease again to sell",
                match end {
                    LeaseEnd::Closed => "closed",
                    LeaseEnd::Lapsed => "lapsed",
                }
            )));
        }
        Ok(lease)
    }

    fn lease_reply(&self, events: &[SkuEvent], edge: &StorefrontId) -> SkuReply {
        let mut next = self.skeleton(std::iter::empty());
        for event in events {
            next.apply(event);
        }
        SkuReply::Lease(next.lease_view(edge).expect("the lease exists after its events"))
    }

    pub(super) fn decide_lease(
        &self,
        cmd: LeaseCommand,
        now: UnixMillis,
    ) -> Result<(Vec<SkuEvent>, SkuReply), Rejection> {
        let mut problems = Vec::new();
        if cmd.quantity == 0 || cmd.quantity > POOL_UNITS_MAX {
            problems.push(FieldViolation::new(
                "quantity",
                format!("must be between 1 and {POOL_UNITS_MAX}"),
            ));
        }
        if cmd.granted_max != 0 && cmd.granted_max < cmd.quantity {
            problems.push(FieldViolation::new(
                "top_up_max",
                "must be 0 (no top-ups) or at least the quantity",
            ));
        }
        if cmd.key_id.is_empty()
            || cmd.key_id.len() > LEASE_KEY_ID_LEN_MAX
            || !cmd.key_id.bytes().all(|b| b.is_ascii_graphic())
        {
            problems.push(FieldViolation::new(
                "key_id",
                format!("must be 1 to {LEASE_KEY_ID_LEN_MAX} printable ASCII characters"),
            ));
        }
        if cmd.expires_at <= now || cmd.expires_at.0 - now.0 > LEASE_DURATION_MS_MAX {
            problems.push(FieldViolation::new(
                "expires_at",
                "must be in the future, at most a week from now",
            ));
        }
        if !(RECONCILE_WINDOW_MS_MIN..=RECONCILE_WINDOW_MS_MAX).contains(&cmd.reconcile_window_ms) {
            problems.push(FieldViolation::new(
                "reconcile_window",
                format!("must be between {RECONCILE_WINDOW_MS_MIN} and {RECONCILE_WINDOW_MS_MAX} ms"),
            ));
        }
        if !problems.is_empty() {
            return Err(Rejection::InvalidArgument(problems));
        }
        let pool = self
            .pool_index(&cmd.hub_id)
            .ok_or_else(|| Rejection::field("hub_id", format!("hub {} has no pool of {}", cmd.hub_id, self.sku_id)))?;
        if let Some(lease) = self.edges.leases.get(&cmd.edge).filter(|l| l.is_live()) {
            // The same lease asked again (a retried call) gets the lease as it is.
            if lease.key_id == cmd.key_id && lease.pool == pool {
                return Ok((vec![], SkuReply::Lease(self.lease_view(&cmd.edge).expect("leased"))));
            }
            return Err(Rejection::AlreadyExists {
                what: "lease of edge".into(),
                id: cmd.edge.to_string(),
            });
        }
        if !self.edges.leases.contains_key(&cmd.edge) && self.edges.leases.len() >= LEASES_PER_SKU_MAX {
            return Err(Rejection::Exhausted(format!(
                "SKU {} already has {LEASES_PER_SKU_MAX} edge leases",
                self.sku_id
            )));
        }
        if self.effective_sale(now) == SaleStatus::Closed {
            return Err(Rejection::FailedPrecondition(format!(
                "drop {} is closed",
                self.drop_id
            )));
        }
        let available = self.pools[pool].available;
        if available < cmd.quantity {
            return Err(Rejection::FailedPrecondition(format!(
                "hub {} has {available} units of {} available, fewer than the {} asked",
                cmd.hub_id, self.sku_id, cmd.quantity
            )));
        }
        let edge = cmd.edge.clone();
        let events = vec![SkuEvent::StockLeased {
            edge: cmd.edge,
            hub_id: cmd.hub_id,
            quantity: cmd.quantity,
            granted_max: cmd.granted_max,
            key_id: cmd.key_id,
            expires_at: cmd.expires_at,
            reconcile_window_ms: cmd.reconcile_window_ms,
            at: now,
        }];
        let reply = self.lease_reply(&events, &edge);
        Ok((events, reply))
    }

    /// Tops a lease up until it has been granted `granted_total` units in all (a retry asks
    /// for the same total and changes nothing), with what the pool has free. An edge may
    /// go up to the lease's `granted_max`; the operator beyond.
    pub(super) fn decide_top_up(
        &self,
        edge: StorefrontId,
        granted_total: u32,
        by_edge: bool,
        now: UnixMillis,
    ) -> Result<(Vec<SkuEvent>, SkuReply), Rejection> {
        let lease = self.live_lease(&edge)?;
        if now >= lease.expires_at {
            return Err(Rejection::FailedPrecondition(format!(
                "the lease of edge {edge} has expired"
            )));
        }
        if by_edge && granted_total > lease.granted_max {
            return Err(Rejection::PermissionDenied(format!(
                "the lease of edge {edge} may be topped up by the edge to {} units in all",
                lease.granted_max
            )));
        }
        if granted_total > POOL_UNITS_MAX {
            return Err(Rejection::field(
                "granted_total",
                format!("must be at most {POOL_UNITS_MAX}"),
            ));
        }
        let wanted = granted_total.saturating_sub(lease.granted);
        let quantity = wanted.min(self.pools[lease.pool].available);
        let events = if quantity == 0 {
            vec![]
        } else {
            vec![SkuEvent::LeaseToppedUp {
                edge: edge.clone(),
                quantity,
                at: now,
            }]
        };
        let reply = self.lease_reply(&events, &edge);
        Ok((events, reply))
    }

    /// Returns units to the pool until `returned_total` have been returned in all (None:
    /// everything the lease holds, which closes it). Returned stock is offered to the
    /// waitlist like any other.
    pub(super) fn decide_return(
        &self,
        edge: StorefrontId,
        returned_total: Option<u32>,
        now: UnixMillis,
    ) -> Result<(Vec<SkuEvent>, SkuReply), Rejection> {
        let lease = match self.edges.leases.get(&edge) {
            // Closing what has ended is a safe retry.
            Some(lease) if !lease.is_live() && returned_total.is_none() => {
                return Ok((vec![], SkuReply::Lease(self.lease_view(&edge).expect("leased"))))
            }
            _ => self.live_lease(&edge)?,
        };
        let (quantity, closed) = match returned_total {
            None => (lease.outstanding, true),
            Some(total) => {
                let more = total.saturating_sub(lease.returned);
                if more > lease.outstanding {
                    return Err(Rejection::FailedPrecondition(format!(
                        "the lease of edge {edge} holds {} units, fewer than the {more} to return",
                        lease.outstanding
                    )));
                }
                (more, false)
            }
        };
        if quantity == 0 && !closed {
            return Ok((vec![], SkuReply::Lease(self.lease_view(&edge).expect("leased"))));
        }
        let mut events = vec![SkuEvent::LeaseReturned {
            edge: edge.clone(),
            quantity,
            closed,
            at: now,
        }];
        let mut available = self.available_now();
        available[lease.pool] += quantity;
        let city = self.pools[lease.pool].city.clone();
        self.promote(&city, &mut available, now, &mut events);
        let reply = self.lease_reply(&events[..1], &edge);
        Ok((events, reply))
    }

    /// Leases whose window after expiry has passed by `now`: what they hold goes back.
    pub(super) fn decide_lapses(
        &self,
        now: UnixMillis,
        available: &mut [u32],
        cities: &mut BTreeSet<CityName>,
        events: &mut Vec<SkuEvent>,
    ) {
        for (edge, lease) in &self.edges.leases {
            if lease.is_live() && lease.lapses_at() <= now {
                available[lease.pool] += lease.outstanding;
                cities.insert(self.pools[lease.pool].city.clone());
                events.push(SkuEvent::LeaseLapsed {
                    edge: edge.clone(),
                    quantity: lease.outstanding,
                    at: now,
                });
            }
        }
    }

    /// Books an edge's uploaded sales, each once by order id, or refuses them to be
    /// refunded (see `EdgeRefundReason`); the answer for each says which.
    pub(super) fn decide_book_edge_sales(
        &self,
        edge: StorefrontId,
        sales: Vec<EdgeSale>,
        now: UnixMillis,
    ) -> Result<(Vec<SkuEvent>, SkuReply), Rejection> {
        if sales.len() > EDGE_SALES_PER_UPLOAD_MAX {
            return Err(Rejection::field(
                "sales",
                format!("at most {EDGE_SALES_PER_UPLOAD_MAX} sales per upload"),
            ));
        }
        let mut problems = Vec::new();
        for (i, sale) in sales.iter().enumerate() {
            if sale.order_id.owner() != (self.drop_id.clone(), self.sku_id.clone()) {
                problems.push(FieldViolation::new(
                    format!("sales[{i}].order_id"),
                    format!("is not an order of {}/{}", self.drop_id, self.sku_id),
                ));
            }
            if sale.quantity == 0 || sale.quantity > PER_BUYER_LIMIT_MAX {
                problems.push(FieldViolation::new(
                    format!("sales[{i}].quantity"),
                    format!("must be between 1 and {PER_BUYER_LIMIT_MAX}"),
                ));
            }
        }
        if !problems.is_empty() {
            return Err(Rejection::InvalidArgument(problems));
        }
        let lease = self
            .edges
            .leases
            .get(&edge)
            .ok_or_else(|| Rejection::not_found("lease of edge", edge.as_str()))?;
        let mut outstanding = lease.outstanding;
        let mut events = Vec::new();
        let mut results = Vec::with_capacity(sales.len());
        let mut refunds = 0usize;
        // Sales decided earlier in this upload, and their answers: a repeat gets the same.
        let mut seen: BTreeMap<OrderId, (EdgeSale, EdgeSaleOutcome)> = BTreeMap::new();
        for sale in sales {
            let order_id = sale.order_id.clone();
            let outcome = if let Some(outcome) = self.earlier_outcome(&edge, &sale) {
                outcome
            } else if let Some((first, outcome)) = seen.get(&order_id) {
                if *first == sale {
                    *outcome
                } else {
                    EdgeSaleOutcome::Conflict
                }
            } else {
                let refuse = if sale.key_id != lease.key_id
                    || sale.sold_at < lease.started_at
                    || sale.sold_at >= lease.expires_at
                    || lease.ended.is_some_and(|(_, at)| sale.sold_at >= at)
                {
                    Some(EdgeRefundReason::SoldOutsideLease)
                } else if now.0.saturating_sub(sale.sold_at.0) > lease.reconcile_window_ms as i64 {
                    Some(EdgeRefundReason::ReconciledTooLate)
                } else if lease.ended.is_some() {
                    Some(EdgeRefundReason::LeaseEnded)
                } else if self.price.times(sale.quantity) != Some(sale.amount) {
                    Some(EdgeRefundReason::AmountMismatch)
                } else if sale.quantity > outstanding {
                    Some(EdgeRefundReason::LeaseExhausted)
                } else {
                    None
                };
                let outcome = match refuse {
                    Some(reason) => {
                        refunds += 1;
                        events.push(SkuEvent::EdgeSaleRefunded {
                            edge: edge.clone(),
                            sale: sale.clone(),
                            reason,
                            at: now,
                        });
                        EdgeSaleOutcome::Refunded(reason)
                    }
                    None => {
                        outstanding -= sale.quantity;
                        events.push(SkuEvent::EdgeSaleBooked {
                            edge: edge.clone(),
                            sale: sale.clone(),
                            at: now,
                        });
                        EdgeSaleOutcome::Booked
                    }
                };
                seen.insert(order_id.clone(), (sale, outcome));
                outcome
            };
            results.push(EdgeSaleResult { order_id, outcome });
        }
        if refunds > 0 && self.edges.refunds.len() + refunds > EDGE_REFUNDS_PER_SKU_MAX {
            return Err(Rejection::Exhausted(format!(
                "SKU {} already holds {EDGE_REFUNDS_PER_SKU_MAX} refused edge sales; nothing was booked",
                self.sku_id
            )));
        }
        let mut next = self.skeleton(std::iter::empty());
        for event in &events {
            next.apply(event);
        }
        let lease = next.lease_view(&edge).expect("leased");
        Ok((events, SkuReply::EdgeSales(EdgeUpload { results, lease })))
    }

    /// What an earlier upload decided for this sale, if it was seen before.
    fn earlier_outcome(&self, edge: &StorefrontId, sale: &EdgeSale) -> Option<EdgeSaleOutcome> {
        if let Some(refund) = self.edges.refunds.get(&sale.order_id) {
            return Some(if &refund.edge == edge && refund.sale == *sale {
                EdgeSaleOutcome::Refunded(refund.reason)
            } else {
                EdgeSaleOutcome::Conflict
            });
        }
        let order = self.orders.get(&sale.order_id)?;
        let same = order.storefront == *edge
            && order.quantity == sale.quantity
            && order.confirmation.as_ref().is_some_and(|c| {
                c.payment_reference == sale.payment_reference
                    && c.amount == sale.amount
                    && c.fulfilment == sale.fulfilment
                    && c.pickup_code == sale.pickup_code
                    && c.confirmed_at == sale.sold_at
            });
        Some(if same {
            EdgeSaleOutcome::Booked
        } else {
            EdgeSaleOutcome::Conflict
        })
    }

    /// Applies a lease event; `true` if it was one.
    pub(super) fn apply_lease_event(&mut self, event: &SkuEvent) -> bool {
        match event {
            SkuEvent::StockLeased {
                edge,
                hub_id,
                quantity,
                granted_max,
                key_id,
                expires_at,
                reconcile_window_ms,
                at,
            } => {
                let pool = self.pool_index(hub_id).expect("leased from a known pool");
                self.pools[pool].available -= quantity;
                self.edges.leases.insert(
                    edge.clone(),
                    EdgeLease {
                        pool,
                        outstanding: *quantity,
                        granted: *quantity,
                        granted_max: *granted_max,
                        sold: 0,
                        returned: 0,
                        refunded: 0,
                        key_id: key_id.clone(),
                        started_at: *at,
                        expires_at: *expires_at,
                        reconcile_window_ms: *reconcile_window_ms,
                        ended: None,
                        last_sync: None,
                    },
                );
                self.assert_pool(pool);
                self.touch(*at);
                self.update_sold_out(*at);
            }
            SkuEvent::LeaseToppedUp { edge, quantity, at } => {
                let lease = self.edges.leases.get_mut(edge).expect("topped-up lease exists");
                lease.outstanding += quantity;
                lease.granted += quantity;
                let pool = lease.pool;
                self.pools[pool].available -= quantity;
                self.assert_pool(pool);
                self.touch(*at);
                self.update_sold_out(*at);
            }
            SkuEvent::LeaseReturned {
                edge,
                quantity,
                closed,
                at,
            } => {
                let lease = self.edges.leases.get_mut(edge).expect("returned lease exists");
                lease.outstanding -= quantity;
                lease.returned += quantity;
                if *closed {
                    lease.ended = Some((LeaseEnd::Closed, *at));
                }
                let pool = lease.pool;
                self.pools[pool].available += quantity;
                self.assert_pool(pool);
                self.touch(*at);
                self.update_sold_out(*at);
            }
            SkuEvent::LeaseLapsed { edge, quantity, at } => {
                let lease = self.edges.leases.get_mut(edge).expect("lapsed lease exists");
                lease.outstanding -= quantity;
                lease.returned += quantity;
                lease.ended = Some((LeaseEnd::Lapsed, *at));
                let pool = lease.pool;
                self.pools[pool].available += quantity;
                self.assert_pool(pool);
                self.touch(*at);
                self.update_sold_out(*at);
            }
            SkuEvent::EdgeSaleBooked { edge, sale, at } => {
                let pool = self.apply_lease_counts(edge, sale, at);
                let buyer = SkuState::edge_buyer(edge);
                let city = self.pools[pool].city.clone();
                self.add_active(&buyer, sale.quantity);
                self.orders.insert(
                    sale.order_id.clone(),
                    Box::new(OrderRecord {
                        order_id: sale.order_id.clone(),
                        storefront: edge.clone(),
                        buyer,
                        city,
                        pool: Some(pool),
                        requested: sale.quantity,
                        quantity: sale.quantity,
                        allow_partial: false,
                        status: OrderStatus::Confirmed,
                        expires_at: None,
                        confirmation: Some(Confirmation {
                            payment_reference: sale.payment_reference.clone(),
                            amount: sale.amount,
                            fulfilment: sale.fulfilment,
                            discreet: false,
                            pickup_code: sale.pickup_code.clone(),
                            receipt_token: sale.receipt_mac.clone(),
                            confirmed_at: sale.sold_at,
                            address_digest: None,
                        }),
                        updated_at: *at,
                    }),
                );
                // A sale handed over at the stall is fulfilled already: no hub's business.
                if sale.fulfilment != Fulfilment::AtStall {
                    self.handover.insert(sale.order_id.clone());
                }
                self.queue_for_ledger(&sale.order_id, false, *at);
                self.revenue_minor_units += sale.amount.minor_units;
                self.touch(*at);
                self.update_sold_out(*at);
            }
            SkuEvent::EdgeSaleRefunded { edge, sale, reason, at } => {
                let lease = self.edges.leases.get_mut(edge).expect("refunding lease exists");
                lease.refunded += sale.quantity;
                lease.last_sync = Some(*at);
                self.edges.refunds.insert(
                    sale.order_id.clone(),
                    EdgeRefund {
                        edge: edge.clone(),
                        sale: sale.clone(),
                        reason: *reason,
                        at: *at,
                    },
                );
            }
            _ => return false,
        }
        true
    }

    /// The counters a booked sale moves (its lease's and its pool's); returns the pool.
    fn apply_lease_counts(&mut self, edge: &StorefrontId, sale: &EdgeSale, at: &UnixMillis) -> usize {
        let lease = self.edges.leases.get_mut(edge).expect("booking lease exists");
        lease.outstanding -= sale.quantity;
        lease.sold += sale.quantity;
        lease.last_sync = Some(*at);
        let pool = lease.pool;
        self.pools[pool].sold += sale.quantity;
        self.assert_pool(pool);
        pool
    }

    /// Checks the leases against the orders and refunds they booked. For tests and audits.
    pub(super) fn check_leases(&self) -> Result<(), String> {
        for (edge, lease) in &self.edges.leases {
            if lease.pool >= self.pools.len() {
                return Err(format!("lease of {edge} names pool {}", lease.pool));
            }
            if u64::from(lease.outstanding) + u64::from(lease.sold) + u64::from(lease.returned)
                != u64::from(lease.granted)
            {
                return Err(format!(
                    "lease of {edge}: outstanding {} + sold {} + returned {} != granted {}",
                    lease.outstanding, lease.sold, lease.returned, lease.granted
                ));
            }
            if lease.ended.is_some() && lease.outstanding != 0 {
                return Err(format!("ended lease of {edge} still holds {} units", lease.outstanding));
            }
        }
        Ok(())
    }
}
