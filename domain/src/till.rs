//! A pop-up edge's till: what `dropline edge` knows of one lease (its mirror of the upstream
//! SKU's `EdgeLease`), the holds and sales it makes from it at the stall, and what the
//! upstream answered when they were uploaded. One till per leased SKU.
//!
//! The till sells only what its lease still holds, online or offline: per till, always,
//! `free + held + selling = granted - returned` (saturating at 0 when the upstream took
//! units back that the till had sold meanwhile: those sales are refused upstream and
//! refunded), where `selling` counts the sales of the current lease that were not refused.
//! A sale is acknowledged only once its event is durable in the edge's own journal (the
//! shell's contract), so a sale the buyer walked away with is never lost by the edge, and
//! the upstream books each at most once by its order id. The receipt's MAC is not here:
//! the key never enters a journal; the shell computes the MAC from a sale's fields.

use crate::facts::Fulfilment;
use crate::limits::PER_BUYER_LIMIT_MAX;
use crate::sku::{EdgeRefundReason, EdgeSale, LeaseView};
use crate::{Aggregate, CityName, DropId, FieldViolation, HubId, Money, OrderId, Rejection, SkuId, UnixMillis};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Orders (holds, released holds and sales) one till keeps: a stall selling one SKU makes
/// far fewer; beyond it reserves are refused.
pub const TILL_ORDERS_MAX: usize = 200_000;
/// Sales listed per `Pending` read (and so per upload).
pub const TILL_PENDING_MAX: usize = crate::limits::EDGE_SALES_PER_UPLOAD_MAX;
/// Hold lifetimes a till accepts: a card payment at the stall takes seconds to minutes.
pub const TILL_HOLD_TTL_MS_MIN: u64 = 1_000;
pub const TILL_HOLD_TTL_MS_MAX: u64 = 3_600_000;

/// The lease as the upstream last said it (GetLease, TopUp, Upload, ReturnUnsold).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TillTerms {
    pub key_id: String,
    pub hub_id: HubId,
    pub city: CityName,
    pub price: Money,
    pub granted: u32,
    pub granted_max: u32,
    pub returned: u32,
    /// Units the upstream has booked as sold.
    pub booked: u32,
    pub started_at: UnixMillis,
    pub expires_at: UnixMillis,
    pub reconcile_window_ms: u64,
    /// Closed or lapsed upstream: nothing more is sold.
    pub ended: bool,
}

impl TillTerms {
    pub fn from_lease(view: &LeaseView) -> TillTerms {
        let lease = &view.lease;
        TillTerms {
            key_id: lease.key_id.clone(),
            hub_id: view.hub_id.clone(),
            city: view.city.clone(),
            price: view.price,
            granted: lease.granted,
            granted_max: lease.granted_max,
            returned: lease.returned,
            booked: lease.sold,
            started_at: lease.started_at,
            expires_at: lease.expires_at,
            reconcile_window_ms: lease.reconcile_window_ms,
            ended: lease.ended.is_some(),
        }
    }
}

/// Where a sale stands with the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Upload {
    /// Not booked yet: in the edge's outbox.
    Pending,
    Booked,
    /// Refused upstream, to be refunded to the buyer at the stall.
    Refunded(EdgeRefundReason),
    /// The upstream has another order with this id: nothing was booked; to be refunded.
    Conflict,
    /// The upstream could not verify its receipt: nothing was booked; to be refunded.
    ReceiptInvalid,
}

impl Upload {
    /// Whether the sale still takes a unit of the lease (booked, or about to be).
    fn takes_stock(self) -> bool {
        matches!(self, Upload::Pending | Upload::Booked)
    }

    pub fn is_refund(self) -> bool {
        matches!(self, Upload::Refunded(_) | Upload::Conflict | Upload::ReceiptInvalid)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TillSale {
    pub quantity: u32,
    pub amount: Money,
    pub payment_reference: String,
    pub pickup_code: String,
    pub key_id: String,
    pub sold_at: UnixMillis,
    /// Made while the edge could not reach the upstream.
    pub offline: bool,
    pub upload: Upload,
    /// Still pending when its reconciliation window ended: the upstream will refuse it, and
    /// the stall owes the buyer a refund unless it is booked after all.
    pub overdue: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Released {
    Cancelled,
    Expired,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TillOrderState {
    Held { expires_at: UnixMillis },
    Released { why: Released, at: UnixMillis },
    Sold(TillSale),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TillOrder {
    pub quantity: u32,
    pub created_at: UnixMillis,
    pub idempotency_key: Option<String>,
    pub state: TillOrderState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TillCommand {
    /// The lease as the upstream says it now.
    Mirror(TillTerms),
    /// Holds `quantity` units for `hold_ttl_ms`; `order_id` is made by the shell
    /// (`<drop>.<sku>.<random>`). The same idempotency key again answers the first hold.
    Reserve {
        order_id: OrderId,
        quantity: u32,
        idempotency_key: Option<String>,
        hold_ttl_ms: u64,
    },
    /// Turns a hold into a sale (picked up at the stall). The same confirmation again
    /// answers the sale; another one for the same order is refused.
    Confirm {
        order_id: OrderId,
        payment_reference: String,
        amount: Money,
        pickup_code: String,
        offline: bool,
    },
    /// Releases a hold. A sale is not cancelled here: it is the upstream's order once
    /// booked (refunds go through the platform).
    Cancel {
        order_id: OrderId,
    },
    /// Timer: releases due holds and marks sales whose window passed unbooked as overdue.
    ExpireDue,
    /// What the upstream answered for uploaded sales, and the lease after them.
    Settle {
        results: Vec<(OrderId, Upload)>,
        terms: Option<TillTerms>,
    },
    GetOrder {
        order_id: OrderId,
    },
    /// The whole till's figures (reads every order: for status pages, not per sale).
    Figures,
    /// The lease as mirrored and the stock free and held now (cheap: what a till's answers
    /// and levels need).
    Stock,
    /// Up to `max` sales not booked yet, oldest first, as the upload carries them.
    Pending {
        max: usize,
    },
    /// The latest `max` sales the upstream refused (to refund at the stall), latest first.
    Refunds {
        max: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TillEvent {
    TermsMirrored {
        terms: TillTerms,
    },
    Held {
        order_id: OrderId,
        quantity: u32,
        idempotency_key: Option<String>,
        expires_at: UnixMillis,
        at: UnixMillis,
    },
    Released {
        order_id: OrderId,
        why: Released,
        at: UnixMillis,
    },
    Sold {
        order_id: OrderId,
        sale: TillSale,
    },
    Overdue {
        order_id: OrderId,
    },
    Settled {
        order_id: OrderId,
        upload: Upload,
    },
}

/// What a till can sell now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TillStock {
    pub terms: Option<TillTerms>,
    pub free: u32,
    pub held: u32,
}

/// A till's figures, for the edge's status and console.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TillFigures {
    pub terms: Option<TillTerms>,
    /// Units the till can still hold and sell now.
    pub free: u32,
    pub held: u32,
    /// Units of sales made (any state but refused), and of those, not booked yet.
    pub sold: u32,
    pub pending_units: u32,
    pub pending_sales: u32,
    pub booked_sales: u32,
    pub refunded_sales: u32,
    pub refunded_units: u32,
    pub overdue_sales: u32,
    pub offline_sales: u32,
    pub revenue_minor_units: i64,
    /// The time of sale of the oldest sale not booked yet.
    pub oldest_pending: Option<UnixMillis>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TillReply {
    /// A hold, a sale or a released hold (`order`; `None` for a reserve: nothing free, sold
    /// out at the stall), with the lease's terms as the till holds them (what an answer to
    /// the buyer names: the hub, the city), so that a call needs one round trip to its till.
    Order {
        order: Option<(OrderId, TillOrder)>,
        terms: Option<TillTerms>,
    },
    Figures(TillFigures),
    Stock(TillStock),
    Pending(Vec<(OrderId, TillSale)>),
    Orders(Vec<(OrderId, TillOrder)>),
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TillState {
    pub drop_id: DropId,
    pub sku_id: SkuId,
    pub terms: Option<TillTerms>,
    pub orders: BTreeMap<OrderId, TillOrder>,
    /// Holds by expiry.
    expiries: BTreeSet<(UnixMillis, OrderId)>,
    /// Pending sales by the end of their reconciliation window (not yet overdue).
    windows: BTreeSet<(UnixMillis, OrderId)>,
    /// Pending sales by time of sale: the outbox, oldest first.
    outbox: BTreeSet<(UnixMillis, OrderId)>,
    idempotency: BTreeMap<String, OrderId>,
    held: u32,
    /// Units of sales that take stock, by the key id of the lease they were sold under.
    selling: BTreeMap<String, u32>,
}

impl TillState {
    pub fn new(drop_id: DropId, sku_id: SkuId) -> TillState {
        TillState {
            drop_id,
            sku_id,
            terms: None,
            orders: BTreeMap::new(),
            expiries: BTreeSet::new(),
            windows: BTreeSet::new(),
            outbox: BTreeSet::new(),
            idempotency: BTreeMap::new(),
            held: 0,
            selling: BTreeMap::new(),
        }
    }

    fn selling_now(&self) -> u32 {
        self.terms
            .as_ref()
            .and_then(|t| self.selling.get(&t.key_id))
            .copied()
            .unwrap_or(0)
    }

    /// Units the till may still hold and sell.
    pub fn free(&self) -> u32 {
        match &self.terms {
            Some(t) if !t.ended => t
                .granted
                .saturating_sub(t.returned)
                .saturating_sub(self.selling_now())
                .saturating_sub(self.held),
            _ => 0,
        }
    }

    pub fn figures(&self) -> TillFigures {
        let mut f = TillFigures {
            terms: self.terms.clone(),
            free: self.free(),
            held: self.held,
            ..TillFigures::default()
        };
        for order in self.orders.values() {
            if let TillOrderState::Sold(sale) = &order.state {
                match sale.upload {
                    Upload::Pending => {
                        f.pending_sales += 1;
                        f.pending_units += sale.quantity;
                        f.oldest_pending = Some(f.oldest_pending.map_or(sale.sold_at, |t| t.min(sale.sold_at)));
                    }
                    Upload::Booked => f.booked_sales += 1,
                    _ => {
                        f.refunded_sales += 1;
                        f.refunded_units += sale.quantity;
                    }
                }
                if sale.upload.takes_stock() {
                    f.sold += sale.quantity;
                    f.revenue_minor_units += sale.amount.minor_units;
                }
                if sale.offline {
                    f.offline_sales += 1;
                }
                if sale.overdue && sale.upload == Upload::Pending {
                    f.overdue_sales += 1;
                }
            }
        }
        f
    }

    /// The sale as its upload carries it (without the receipt MAC, which the shell adds).
    pub fn edge_sale(order_id: &OrderId, sale: &TillSale) -> EdgeSale {
        EdgeSale {
            order_id: order_id.clone(),
            quantity: sale.quantity,
            amount: sale.amount,
            fulfilment: Fulfilment::AtStall,
            payment_reference: sale.payment_reference.clone(),
            pickup_code: sale.pickup_code.clone(),
            receipt_mac: String::new(),
            key_id: sale.key_id.clone(),
            sold_at: sale.sold_at,
        }
    }

    /// Checks the till's arithmetic: the counters equal what the orders say.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut held = 0u32;
        let mut selling: BTreeMap<&str, u32> = BTreeMap::new();
        for (id, order) in &self.orders {
            match &order.state {
                TillOrderState::Held { expires_at } => {
                    held += order.quantity;
                    if !self.expiries.contains(&(*expires_at, id.clone())) {
                        return Err(format!("hold {id} has no expiry entry"));
                    }
                }
                TillOrderState::Sold(sale) if sale.upload.takes_stock() => {
                    *selling.entry(&sale.key_id).or_default() += sale.quantity;
                }
                _ => {}
            }
        }
        if held != self.held {
            return Err(format!("held {} but the holds say {held}", self.held));
        }
        let counted: BTreeMap<&str, u32> = self
            .selling
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| (k.as_str(), *n))
            .collect();
        if counted != selling {
            return Err(format!("selling {counted:?} but the sales say {selling:?}"));
        }
        if self.expiries.len()
            != self
                .orders
                .values()
                .filter(|o| matches!(o.state, TillOrderState::Held { .. }))
                .count()
        {
            return Err("an expiry entry without its hold".into());
        }
        Ok(())
    }

    fn order(&self, order_id: &OrderId) -> Result<&TillOrder, Rejection> {
        self.orders
            .get(order_id)
            .ok_or_else(|| Rejection::not_found("order", order_id.as_str()))
    }

    fn reply_order(&self, order_id: &OrderId, events: &[TillEvent]) -> TillReply {
        // A till of this one order, its counters as the order makes them.
        let mut next = TillState::new(self.drop_id.clone(), self.sku_id.clone());
        next.terms = self.terms.clone();
        if let Some(order) = self.orders.get(order_id) {
            match &order.state {
                TillOrderState::Held { expires_at } => {
                    next.held = order.quantity;
                    next.expiries.insert((*expires_at, order_id.clone()));
                }
                TillOrderState::Sold(sale) => {
                    next.count_selling(sale, true);
                    if sale.upload == Upload::Pending {
                        next.outbox.insert((sale.sold_at, order_id.clone()));
                        if !sale.overdue {
                            next.windows.insert((next.window_end(sale), order_id.clone()));
                        }
                    }
                }
                TillOrderState::Released { .. } => {}
            }
            next.orders.insert(order_id.clone(), order.clone());
        }
        for event in events {
            next.apply(event);
        }
        let order = next.orders.remove(order_id).map(|o| (order_id.clone(), o));
        TillReply::Order {
            order,
            terms: next.terms,
        }
    }

    /// An order reply with this till's terms.
    fn answer(&self, order: Option<(OrderId, TillOrder)>) -> TillReply {
        TillReply::Order {
            order,
            terms: self.terms.clone(),
        }
    }

    fn decide_reserve(
        &self,
        order_id: OrderId,
        quantity: u32,
        idempotency_key: Option<String>,
        hold_ttl_ms: u64,
        now: UnixMillis,
    ) -> Result<(Vec<TillEvent>, TillReply), Rejection> {
        let mut problems = Vec::new();
        if quantity == 0 || quantity > PER_BUYER_LIMIT_MAX {
            problems.push(FieldViolation::new(
                "quantity",
                format!("must be between 1 and {PER_BUYER_LIMIT_MAX}"),
            ));
        }
        if !(TILL_HOLD_TTL_MS_MIN..=TILL_HOLD_TTL_MS_MAX).contains(&hold_ttl_ms) {
            problems.push(FieldViolation::new(
                "hold_ttl",
                format!("must be between {TILL_HOLD_TTL_MS_MIN} and {TILL_HOLD_TTL_MS_MAX} ms"),
            ));
        }
        if !problems.is_empty() {
            return Err(Rejection::InvalidArgument(problems));
        }
        if let Some(key) = &idempotency_key {
            if let Some(first) = self.idempotency.get(key) {
                let order = self.order(first)?;
                if order.quantity != quantity {
                    return Err(Rejection::IdempotencyKeyReused { key: key.clone() });
                }
                return Ok((vec![], self.answer(Some((first.clone(), order.clone())))));
            }
        }
        if self.orders.contains_key(&order_id) {
            return Err(Rejection::AlreadyExists {
                what: "order".into(),
                id: order_id.to_string(),
            });
        }
        let terms = self.terms.as_ref().ok_or_else(|| {
            Rejection::FailedPrecondition(format!("this edge has no lease of {}/{}", self.drop_id, self.sku_id))
        })?;
        if terms.ended {
            return Err(Rejection::FailedPrecondition(format!(
                "the lease of {}/{} has ended",
                self.drop_id, self.sku_id
            )));
        }
        if now >= terms.expires_at || now < terms.started_at {
            return Err(Rejection::FailedPrecondition(format!(
                "the lease of {}/{} has expired (or not started): the stall cannot sell it",
                self.drop_id, self.sku_id
            )));
        }
        if self.orders.len() >= TILL_ORDERS_MAX {
            return Err(Rejection::Exhausted(format!(
                "this till keeps at most {TILL_ORDERS_MAX} orders"
            )));
        }
        if self.free() < quantity {
            return Ok((vec![], self.answer(None)));
        }
        let events = vec![TillEvent::Held {
            order_id: order_id.clone(),
            quantity,
            idempotency_key,
            expires_at: now.plus_ms(hold_ttl_ms),
            at: now,
        }];
        let reply = self.reply_order(&order_id, &events);
        Ok((events, reply))
    }

    fn decide_confirm(
        &self,
        order_id: OrderId,
        payment_reference: String,
        amount: Money,
        pickup_code: String,
        offline: bool,
        now: UnixMillis,
    ) -> Result<(Vec<TillEvent>, TillReply), Rejection> {
        let order = self.order(&order_id)?;
        match &order.state {
            TillOrderState::Sold(sale) => {
                if sale.payment_reference == payment_reference && sale.amount == amount {
                    return Ok((vec![], self.answer(Some((order_id, order.clone())))));
                }
                return Err(Rejection::AlreadyExists {
                    what: "sale".into(),
                    id: order_id.to_string(),
                });
            }
            TillOrderState::Released { why, .. } => {
                return Err(Rejection::FailedPrecondition(format!(
                    "order {order_id} was {}",
                    match why {
                        Released::Cancelled => "cancelled",
                        Released::Expired => "not confirmed in time",
                    }
                )))
            }
            TillOrderState::Held { expires_at } if *expires_at <= now => {
                return Err(Rejection::FailedPrecondition(format!(
                    "order {order_id} was not confirmed in time"
                )))
            }
            TillOrderState::Held { .. } => {}
        }
        let terms = self.terms.as_ref().expect("a hold was made under terms");
        if now >= terms.expires_at || terms.ended {
            return Err(Rejection::FailedPrecondition(format!(
                "the lease of {}/{} is over: the stall cannot sell any more",
                self.drop_id, self.sku_id
            )));
        }
        let expected = terms.price.times(order.quantity);
        if expected != Some(amount) {
            return Err(Rejection::field(
                "amount",
                format!(
                    "must be price x quantity: {} x {}",
                    terms.price.currency.format_amount(terms.price.minor_units),
                    order.quantity
                ),
            ));
        }
        if payment_reference.is_empty() {
            return Err(Rejection::field("payment_reference", "must not be empty"));
        }
        let events = vec![TillEvent::Sold {
            order_id: order_id.clone(),
            sale: TillSale {
                quantity: order.quantity,
                amount,
                payment_reference,
                pickup_code,
                key_id: terms.key_id.clone(),
                sold_at: now,
                offline,
                upload: Upload::Pending,
                overdue: false,
            },
        }];
        let reply = self.reply_order(&order_id, &events);
        Ok((events, reply))
    }

    fn decide_settle(&self, results: Vec<(OrderId, Upload)>, terms: Option<TillTerms>) -> Vec<TillEvent> {
        let mut events = Vec::new();
        for (order_id, upload) in results {
            let pending = matches!(
                self.orders.get(&order_id).map(|o| &o.state),
                Some(TillOrderState::Sold(sale)) if sale.upload == Upload::Pending
            );
            // Only a pending sale is settled, once: the upstream's first answer is final.
            if pending
                && upload != Upload::Pending
                && !events
                    .iter()
                    .any(|e| matches!(e, TillEvent::Settled { order_id: o, .. } if *o == order_id))
            {
                events.push(TillEvent::Settled { order_id, upload });
            }
        }
        if let Some(terms) = terms.filter(|t| self.terms.as_ref() != Some(t)) {
            events.push(TillEvent::TermsMirrored { terms });
        }
        events
    }

    fn decide_expire(&self, now: UnixMillis) -> Vec<TillEvent> {
        let mut events: Vec<TillEvent> = self
            .expiries
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, order_id)| TillEvent::Released {
                order_id: order_id.clone(),
                why: Released::Expired,
                at: now,
            })
            .collect();
        events.extend(
            self.windows
                .iter()
                .take_while(|(at, _)| *at <= now)
                .map(|(_, order_id)| TillEvent::Overdue {
                    order_id: order_id.clone(),
                }),
        );
        events
    }

    fn window_end(&self, sale: &TillSale) -> UnixMillis {
        let window = self.terms.as_ref().map_or(0, |t| t.reconcile_window_ms);
        sale.sold_at.plus_ms(window)
    }

    fn unhold(&mut self, order_id: &OrderId) -> Option<TillOrder> {
        let order = self.orders.get(order_id)?;
        if let TillOrderState::Held { expires_at } = order.state {
            self.expiries.remove(&(expires_at, order_id.clone()));
            self.held -= order.quantity;
            return Some(order.clone());
        }
        None
    }

    fn count_selling(&mut self, sale: &TillSale, add: bool) {
        if !sale.upload.takes_stock() {
            return;
        }
        let n = self.selling.entry(sale.key_id.clone()).or_default();
        if add {
            *n += sale.quantity;
        } else {
            *n -= sale.quantity;
        }
    }
}

impl Aggregate for TillState {
    type Command = TillCommand;
    type Event = TillEvent;
    type Reply = TillReply;

    fn decide(&self, command: TillCommand, now: UnixMillis) -> Result<(Vec<TillEvent>, TillReply), Rejection> {
        match command {
            TillCommand::Mirror(terms) => {
                let events = if self.terms.as_ref() == Some(&terms) {
                    vec![]
                } else {
                    vec![TillEvent::TermsMirrored { terms }]
                };
                Ok((events, TillReply::Done))
            }
            TillCommand::Reserve {
                order_id,
                quantity,
                idempotency_key,
                hold_ttl_ms,
            } => self.decide_reserve(order_id, quantity, idempotency_key, hold_ttl_ms, now),
            TillCommand::Confirm {
                order_id,
                payment_reference,
                amount,
                pickup_code,
                offline,
            } => self.decide_confirm(order_id, payment_reference, amount, pickup_code, offline, now),
            TillCommand::Cancel { order_id } => {
                let order = self.order(&order_id)?;
                match &order.state {
                    TillOrderState::Held { .. } => {
                        let events = vec![TillEvent::Released {
                            order_id: order_id.clone(),
                            why: Released::Cancelled,
                            at: now,
                        }];
                        let reply = self.reply_order(&order_id, &events);
                        Ok((events, reply))
                    }
                    TillOrderState::Released { .. } => Ok((vec![], self.answer(Some((order_id, order.clone()))))),
                    TillOrderState::Sold(_) => Err(Rejection::FailedPrecondition(format!(
                        "order {order_id} is sold: a refund goes through the platform once it is booked"
                    ))),
                }
            }
            TillCommand::ExpireDue => Ok((self.decide_expire(now), TillReply::Done)),
            TillCommand::Settle { results, terms } => Ok((self.decide_settle(results, terms), TillReply::Done)),
            TillCommand::GetOrder { order_id } => {
                let order = self.order(&order_id)?;
                Ok((vec![], self.answer(Some((order_id, order.clone())))))
            }
            TillCommand::Figures => Ok((vec![], TillReply::Figures(self.figures()))),
            TillCommand::Stock => Ok((
                vec![],
                TillReply::Stock(TillStock {
                    terms: self.terms.clone(),
                    free: self.free(),
                    held: self.held,
                }),
            )),
            TillCommand::Pending { max } => {
                let pending = self
                    .outbox
                    .iter()
                    .take(max.min(TILL_PENDING_MAX))
                    .filter_map(|(_, id)| match &self.orders.get(id)?.state {
                        TillOrderState::Sold(sale) => Some((id.clone(), sale.clone())),
                        _ => None,
                    })
                    .collect();
                Ok((vec![], TillReply::Pending(pending)))
            }
            TillCommand::Refunds { max } => {
                let mut refunds: Vec<(OrderId, TillOrder)> = self
                    .orders
                    .iter()
                    .filter(|(_, o)| matches!(&o.state, TillOrderState::Sold(sale) if sale.upload.is_refund()))
                    .map(|(id, o)| (id.clone(), o.clone()))
                    .collect();
                refunds.sort_by_key(|(_, o)| std::cmp::Reverse(o.created_at));
                refunds.truncate(max.min(TILL_PENDING_MAX));
                Ok((vec![], TillReply::Orders(refunds)))
            }
        }
    }

    fn apply(&mut self, event: &TillEvent) {
        match event {
            TillEvent::TermsMirrored { terms } => {
                // A longer window moves the overdue deadlines of pending sales.
                let window_changed = self
                    .terms
                    .as_ref()
                    .is_some_and(|t| t.reconcile_window_ms != terms.reconcile_window_ms);
                self.terms = Some(terms.clone());
                if window_changed {
                    let pending: Vec<(UnixMillis, OrderId)> = std::mem::take(&mut self.windows).into_iter().collect();
                    for (_, id) in pending {
                        if let Some(TillOrderState::Sold(sale)) = self.orders.get(&id).map(|o| &o.state) {
                            let end = self.window_end(sale);
                            self.windows.insert((end, id));
                        }
                    }
                }
            }
            TillEvent::Held {
                order_id,
                quantity,
                idempotency_key,
                expires_at,
                at,
            } => {
                self.held += quantity;
                self.expiries.insert((*expires_at, order_id.clone()));
                if let Some(key) = idempotency_key {
                    self.idempotency.insert(key.clone(), order_id.clone());
                }
                self.orders.insert(
                    order_id.clone(),
                    TillOrder {
                        quantity: *quantity,
                        created_at: *at,
                        idempotency_key: idempotency_key.clone(),
                        state: TillOrderState::Held {
                            expires_at: *expires_at,
                        },
                    },
                );
            }
            TillEvent::Released { order_id, why, at } => {
                if self.unhold(order_id).is_some() {
                    if let Some(order) = self.orders.get_mut(order_id) {
                        order.state = TillOrderState::Released { why: *why, at: *at };
                    }
                }
            }
            TillEvent::Sold { order_id, sale } => {
                self.unhold(order_id);
                self.count_selling(sale, true);
                self.outbox.insert((sale.sold_at, order_id.clone()));
                let end = self.window_end(sale);
                self.windows.insert((end, order_id.clone()));
                if let Some(order) = self.orders.get_mut(order_id) {
                    order.state = TillOrderState::Sold(sale.clone());
                }
            }
            TillEvent::Overdue { order_id } => {
                let Some(TillOrderState::Sold(sale)) = self.orders.get(order_id).map(|o| &o.state) else {
                    return;
                };
                let end = self.window_end(sale);
                self.windows.remove(&(end, order_id.clone()));
                if let Some(TillOrderState::Sold(sale)) = self.orders.get_mut(order_id).map(|o| &mut o.state) {
                    sale.overdue = true;
                }
            }
            TillEvent::Settled { order_id, upload } => {
                let Some(TillOrderState::Sold(sale)) = self.orders.get(order_id).map(|o| &o.state) else {
                    return;
                };
                let sale = sale.clone();
                self.count_selling(&sale, false);
                self.outbox.remove(&(sale.sold_at, order_id.clone()));
                let end = self.window_end(&sale);
                self.windows.remove(&(end, order_id.clone()));
                let settled = TillSale {
                    upload: *upload,
                    ..sale
                };
                self.count_selling(&settled, true);
                if let Some(order) = self.orders.get_mut(order_id) {
                    order.state = TillOrderState::Sold(settled);
                }
            }
        }
    }

    fn next_deadline(&self) -> Option<UnixMillis> {
        let hold = self.expiries.first().map(|(at, _)| *at);
        let window = self.windows.first().map(|(at, _)| *at);
        match (hold, window) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}
