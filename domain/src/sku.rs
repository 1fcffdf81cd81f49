//! One SKU of a drop: its ring-fenced pools (one per hub), holds with their expiry, orders,
//! per-city waitlists and idempotency keys. The invariant, per pool and at every step:
//! `available + held + sold = allocated`, so a SKU never sells beyond its allocation. And
//! while the sale is open, no waitlisted request can be served from free stock (see
//! `promote` and `check_waitlist`): the waitlist never strands stock.

use crate::aggregate::Aggregate;
use crate::drop::{DropSpec, SaleStatus, SettlementTerms, SkuSpec};
pub use crate::facts::Fulfilment;
use crate::facts::SaleFacts;
use crate::ids::{BuyerRef, CityName, CreatorId, DropId, HubId, IdempotencyKey, OrderId, SkuId, StorefrontId};
use crate::keymap::KeyMap;
use crate::limits::*;
use crate::money::Money;
use crate::rejection::Rejection;
use crate::time::UnixMillis;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// Stock of one hub for this SKU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub hub_id: HubId,
    pub city: CityName,
    pub allocated: u32,
    pub available: u32,
    pub held: u32,
    pub sold: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderStatus {
    Waitlisted,
    Held,
    Confirmed,
    Expired,
    Cancelled,
}

impl OrderStatus {
    pub fn is_final(self) -> bool {
        matches!(self, OrderStatus::Expired | OrderStatus::Cancelled)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    pub payment_reference: String,
    pub amount: Money,
    pub fulfilment: Fulfilment,
    pub discreet: bool,
    pub pickup_code: String,
    pub receipt_token: String,
    pub confirmed_at: UnixMillis,
    /// A keyed hash of the delivery address (never the address itself): a later Confirm
    /// with another address is a different confirmation and is refused.
    pub address_digest: Option<String>,
}

/// A reservation from its first moment (held or waitlisted) to its end (expired,
/// cancelled) or its confirmation as an order. One id for the whole life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRecord {
    pub order_id: OrderId,
    /// The storefront that reserved it: with the order's token, the only one that may read,
    /// confirm or cancel it.
    pub storefront: StorefrontId,
    pub buyer: BuyerRef,
    pub city: CityName,
    /// Index into `SkuState::pools`: the pool holding the order's units once held. While
    /// waitlisted, the one pool that may serve it if the buyer named a hub (None: any pool of
    /// its city). The pin lives here rather than in a field of its own because a new field
    /// would make every snapshot written before it undecodable (postcard is not
    /// self-describing, and snapshots carry no version).
    pub pool: Option<usize>,
    pub requested: u32,
    pub quantity: u32,
    pub allow_partial: bool,
    pub status: OrderStatus,
    pub expires_at: Option<UnixMillis>,
    pub confirmation: Option<Confirmation>,
    pub updated_at: UnixMillis,
}

impl OrderRecord {
    /// A storefront may act only on the orders it reserved (`None`: the caller was checked
    /// otherwise, by the order's token or as the platform itself).
    pub fn check_storefront(&self, storefront: Option<&StorefrontId>) -> Result<(), Rejection> {
        match storefront {
            Some(caller) if caller != &self.storefront => Err(Rejection::PermissionDenied(format!(
                "order {} belongs to another storefront",
                self.order_id
            ))),
            _ => Ok(()),
        }
    }
}

/// What a buyer asks for; also what an idempotency key is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReserveParams {
    /// Who vouches for the buyer. Part of what an idempotency key is bound to, so another
    /// storefront replaying a key is refused instead of shown the first result.
    pub storefront: StorefrontId,
    pub buyer: BuyerRef,
    pub city: CityName,
    pub hub_id: Option<HubId>,
    pub quantity: u32,
    pub allow_partial: bool,
    pub join_waitlist: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReserveOutcome {
    Held,
    Partial,
    Waitlisted,
    SoldOut,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub outcome: ReserveOutcome,
    pub order_id: Option<OrderId>,
    pub quantity_held: u32,
    pub quantity_requested: u32,
    pub hub_id: Option<HubId>,
    pub expires_at: Option<UnixMillis>,
    pub waitlist_position: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Idempotent {
    pub key: IdempotencyKey,
    pub params: ReserveParams,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReleaseReason {
    Expired,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaveReason {
    Cancelled,
    SaleClosed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SkuEvent {
    SaleStatusSet {
        status: SaleStatus,
        at: UnixMillis,
    },
    Held {
        order_id: OrderId,
        storefront: StorefrontId,
        buyer: BuyerRef,
        city: CityName,
        hub_id: HubId,
        quantity: u32,
        requested: u32,
        allow_partial: bool,
        expires_at: UnixMillis,
        idempotent: Option<Idempotent>,
        at: UnixMillis,
    },
    Waitlisted {
        order_id: OrderId,
        storefront: StorefrontId,
        buyer: BuyerRef,
        city: CityName,
        requested: u32,
        allow_partial: bool,
        idempotent: Option<Idempotent>,
        at: UnixMillis,
    },
    /// Nothing could be held or queued; recorded only so the idempotency key replays it.
    Refused {
        idempotent: Idempotent,
        at: UnixMillis,
    },
    Promoted {
        order_id: OrderId,
        hub_id: HubId,
        quantity: u32,
        expires_at: UnixMillis,
        at: UnixMillis,
    },
    Released {
        order_id: OrderId,
        reason: ReleaseReason,
        at: UnixMillis,
    },
    WaitlistLeft {
        order_id: OrderId,
        reason: LeaveReason,
        at: UnixMillis,
    },
    Confirmed {
        order_id: OrderId,
        confirmation: Confirmation,
    },
    OrderCancelled {
        order_id: OrderId,
        at: UnixMillis,
    },
    Restocked {
        hub_id: HubId,
        city: CityName,
        quantity: u32,
        idempotency_key: Option<IdempotencyKey>,
        at: UnixMillis,
    },
    /// Their hub acknowledged these orders as they are: a confirmed order handed over, or
    /// the withdrawal of one cancelled since.
    HandedOver {
        order_ids: Vec<OrderId>,
    },
    /// Confirmed orders still unacknowledged are sent to their hubs (and their creator's
    /// ledger) again now; the next retry is at `next` if they still are then.
    HandoverRetry {
        next: UnixMillis,
    },
    /// The creator's ledger booked these orders as they were (`true`: cancelled).
    LedgerSynced {
        orders: Vec<(OrderId, bool)>,
    },
    /// Like `Waitlisted`, for a buyer who named a hub: only that hub's pool may serve the
    /// request. A variant of its own, last in the enum, because the journal's encoding
    /// (postcard) is not self-describing: a field added to `Waitlisted` would make every
    /// `Waitlisted` already journaled undecodable, while a new last variant leaves the
    /// indices of the others as they were. Journals written before it recorded pinned
    /// requests as `Waitlisted`; those replay unpinned, which is how they were served then.
    WaitlistedAtHub {
        order_id: OrderId,
        storefront: StorefrontId,
        buyer: BuyerRef,
        city: CityName,
        hub_id: HubId,
        requested: u32,
        allow_partial: bool,
        idempotent: Option<Idempotent>,
        at: UnixMillis,
    },
}

impl SkuEvent {
    /// The order this event changes, if any.
    pub fn order_id(&self) -> Option<&OrderId> {
        match self {
            SkuEvent::Held { order_id, .. }
            | SkuEvent::Waitlisted { order_id, .. }
            | SkuEvent::WaitlistedAtHub { order_id, .. }
            | SkuEvent::Promoted { order_id, .. }
            | SkuEvent::Released { order_id, .. }
            | SkuEvent::WaitlistLeft { order_id, .. }
            | SkuEvent::Confirmed { order_id, .. }
            | SkuEvent::OrderCancelled { order_id, .. } => Some(order_id),
            SkuEvent::SaleStatusSet { .. }
            | SkuEvent::Refused { .. }
            | SkuEvent::Restocked { .. }
            | SkuEvent::HandedOver { .. }
            | SkuEvent::HandoverRetry { .. }
            | SkuEvent::LedgerSynced { .. } => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReserveCommand {
    /// A fresh id, used only if this reserve creates a hold or a waitlist place.
    pub order_id: OrderId,
    pub params: ReserveParams,
    pub idempotency_key: Option<IdempotencyKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfirmCommand {
    pub order_id: OrderId,
    /// The storefront confirming, which must be the one that reserved; None when the buyer's
    /// own order token was checked instead.
    pub storefront: Option<StorefrontId>,
    pub address_digest: Option<String>,
    pub payment_reference: String,
    pub amount: Money,
    pub fulfilment: Fulfilment,
    pub discreet: bool,
    /// Fresh secrets, used only if this confirm creates the order.
    pub pickup_code: String,
    pub receipt_token: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestockCommand {
    pub hub_id: HubId,
    pub city: Option<CityName>,
    pub quantity: u32,
    pub idempotency_key: Option<IdempotencyKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SkuCommand {
    Reserve(ReserveCommand),
    Confirm(ConfirmCommand),
    Cancel {
        order_id: OrderId,
        /// As in [`ConfirmCommand::storefront`]; None for the order's token or the platform.
        storefront: Option<StorefrontId>,
    },
    /// Timer: expire holds that are due, and clear waitlists once the sale has closed.
    ExpireDue,
    Restock(RestockCommand),
    /// The drop's sale status changed (the drop journal is its authority).
    SetSaleStatus(SaleStatus),
    GetOrder {
        order_id: OrderId,
    },
    GetFigures,
    /// The hub acknowledged these orders (see `SkuState::handover`; `true`: the withdrawal
    /// of a cancelled order). An acknowledgement of another state of the order, such as a
    /// hand-over that crossed the order's cancel, leaves it in the outbox.
    HandedOver {
        orders: Vec<(OrderId, bool)>,
    },
    /// The creator's ledger booked these orders as they were (see `SkuState::ledger_outbox`).
    LedgerSynced {
        orders: Vec<(OrderId, bool)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderView {
    pub order_id: OrderId,
    pub storefront: StorefrontId,
    /// Confirmed, and its hub acknowledged the hand-over (nothing for it in the outbox).
    pub handed_over: bool,
    pub drop_id: DropId,
    pub sku_id: SkuId,
    pub sku_name: String,
    pub creator_id: CreatorId,
    pub status: OrderStatus,
    pub hub_id: Option<HubId>,
    pub city: CityName,
    pub quantity: u32,
    pub requested: u32,
    pub amount: Money,
    pub expires_at: Option<UnixMillis>,
    pub waitlist_position: Option<u32>,
    pub confirmation: Option<Confirmation>,
    pub updated_at: UnixMillis,
}

impl OrderView {
    /// What the order's hub needs to fulfil it, and which hub: for confirmed orders only.
    pub fn dispatch_order(&self) -> Option<(HubId, crate::facts::DispatchOrder)> {
        let c = self.confirmation.as_ref()?;
        Some((
            self.hub_id.clone()?,
            crate::facts::DispatchOrder {
                order_id: self.order_id.clone(),
                creator_id: self.creator_id.clone(),
                item: self.sku_name.clone(),
                quantity: self.quantity,
                amount: c.amount,
                fulfilment: c.fulfilment,
                discreet: c.discreet,
                pickup_code: c.pickup_code.clone(),
                confirmed_at: c.confirmed_at,
            },
        ))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolFigures {
    pub pool: Pool,
    /// The city's waitlist, reported on the city's first pool only.
    pub waitlisted: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkuFigures {
    pub drop_id: DropId,
    pub sku_id: SkuId,
    pub name: String,
    pub price: Money,
    pub per_buyer_limit: u32,
    pub sale: SaleStatus,
    pub pools: Vec<PoolFigures>,
    pub revenue: Money,
    pub sold_out_at: Option<UnixMillis>,
    pub changed_at: UnixMillis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SkuReply {
    Reservation(Reservation),
    Order(OrderView),
    Figures(SkuFigures),
    /// No longer produced (reconciliation folds the journal itself); kept so `Done` keeps its
    /// wire index between nodes of different versions during a rolling upgrade.
    Sales(Vec<(SaleFacts, bool)>),
    Done,
}

crate::reply_shapes!(SkuReply {
    Reservation(Reservation),
    Order(OrderView),
    Figures(SkuFigures),
    Done,
});

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct IdempotencyEntry {
    params: ReserveParams,
    reservation: Reservation,
    at: UnixMillis,
}

/// State of one SKU. Built from the drop spec, then changed only by `apply`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkuState {
    pub drop_id: DropId,
    pub sku_id: SkuId,
    pub name: String,
    pub price: Money,
    pub per_buyer_limit: u32,
    pub hold_ttl_ms: u64,
    pub opens_at: UnixMillis,
    pub closes_at: UnixMillis,
    pub sale: SaleStatus,
    pub pools: Vec<Pool>,
    /// Ordered maps, not hash maps, for the state that grows with every buyer: a hash map
    /// doubles and rehashes at once, which stalled a hot SKU for 50–150 ms at 28k and 57k
    /// holds; a B-tree grows a node at a time. The ones searched on every reserve sort by
    /// the key's hash first ([`KeyMap`]), so a search does not read every key it passes
    /// through its pointer. Values are boxed so an idle SKU's one-entry map is one small
    /// node, not eleven records.
    pub orders: KeyMap<OrderId, Box<OrderRecord>>,
    pub waitlists: BTreeMap<CityName, VecDeque<OrderId>>,
    pub expiries: BTreeSet<(UnixMillis, OrderId)>,
    pub buyer_active: KeyMap<BuyerRef, u32>,
    idempotency: KeyMap<IdempotencyKey, Box<IdempotencyEntry>>,
    idempotency_order: VecDeque<(UnixMillis, IdempotencyKey)>,
    restock_keys: HashMap<IdempotencyKey, (HubId, u32)>,
    pub revenue_minor_units: i64,
    pub sold_out_at: Option<UnixMillis>,
    pub changed_at: UnixMillis,
    pub creator_id: CreatorId,
    /// Orders their hub has not acknowledged as they are now (the SKU's outbox to hubs): a
    /// confirmed order is handed over, and one cancelled after confirmation is withdrawn
    /// (`HubCommand::Cancel`), after every durable change and again after every restart
    /// until acknowledged. The cancel asks the hub first; this entry makes sure the hub hears
    /// of it even when that call was lost or the order was confirmed while being cancelled.
    pub handover: BTreeSet<OrderId>,
    /// When unacknowledged orders are sent again: a deadline like hold expiries, so a SKU
    /// passivated (or crashed) with orders in its outbox is woken to send them.
    pub handover_due: Option<UnixMillis>,
    pub terms: SettlementTerms,
    /// Confirmed orders the creator's ledger has not booked as they are now (`true`: the
    /// order was cancelled after confirmation and must be refunded): the SKU's outbox to
    /// the ledger, sent like `handover` and retried at the same deadline.
    pub ledger_outbox: BTreeMap<OrderId, bool>,
}

impl SkuState {
    pub fn new(drop: &DropSpec, sku: &SkuSpec) -> SkuState {
        SkuState {
            drop_id: drop.drop_id.clone(),
            sku_id: sku.sku_id.clone(),
            name: sku.name.clone(),
            price: sku.price,
            per_buyer_limit: sku.per_buyer_limit,
            hold_ttl_ms: drop.hold_ttl_ms,
            opens_at: drop.opens_at,
            closes_at: drop.closes_at,
            sale: SaleStatus::Scheduled,
            pools: sku
                .pools
                .iter()
                .map(|p| Pool {
                    hub_id: p.hub_id.clone(),
                    city: p.city.clone(),
                    allocated: p.allocated,
                    available: p.allocated,
                    held: 0,
                    sold: 0,
                })
                .collect(),
            orders: KeyMap::new(),
            waitlists: BTreeMap::new(),
            expiries: BTreeSet::new(),
            buyer_active: KeyMap::new(),
            idempotency: KeyMap::new(),
            idempotency_order: VecDeque::new(),
            restock_keys: HashMap::new(),
            revenue_minor_units: 0,
            sold_out_at: None,
            changed_at: drop.opens_at.min(UnixMillis(0)),
            creator_id: drop.creator_id.clone(),
            handover: BTreeSet::new(),
            handover_due: None,
            terms: drop.terms,
            ledger_outbox: BTreeMap::new(),
        }
    }

    /// Puts an order in the ledger outbox, with a retry deadline if none is running.
    fn queue_for_ledger(&mut self, order_id: &OrderId, cancelled: bool, at: UnixMillis) {
        self.ledger_outbox.insert(order_id.clone(), cancelled);
        if self.handover_due.is_none() {
            self.handover_due = Some(UnixMillis(at.0 + HANDOVER_RETRY_MS));
        }
    }

    /// How many entries a snapshot of this state writes (orders and holds, idempotency keys,
    /// per-buyer counts, deadlines, waitlists, outboxes): what a snapshot costs, so the actor
    /// can space snapshots out in proportion.
    pub fn entries(&self) -> u64 {
        let waitlisted: usize = self.waitlists.values().map(VecDeque::len).sum();
        (self.orders.len()
            + self.idempotency.len()
            + self.restock_keys.len()
            + self.buyer_active.len()
            + self.expiries.len()
            + waitlisted
            + self.handover.len()
            + self.ledger_outbox.len()) as u64
    }

    /// Whether anything waits in an outbox (to a hub or to the ledger).
    pub fn outbox_pending(&self) -> bool {
        !self.handover.is_empty() || !self.ledger_outbox.is_empty()
    }

    /// What the creator's ledger needs to know of a confirmed order.
    pub fn sale_facts(&self, order_id: &OrderId) -> Option<SaleFacts> {
        let order = self.orders.get(order_id)?;
        let c = order.confirmation.as_ref()?;
        Some(SaleFacts {
            order_id: order_id.clone(),
            drop_id: self.drop_id.clone(),
            gross: c.amount,
            terms: self.terms,
            confirmed_at: c.confirmed_at,
            cancelled_at: (order.status == OrderStatus::Cancelled).then_some(order.updated_at),
        })
    }

    /// Takes an acknowledged order out of the outbox; the retry deadline goes with the last
    /// one.
    fn handed_over(&mut self, order_id: &OrderId) {
        self.handover.remove(order_id);
        if !self.outbox_pending() {
            self.handover_due = None;
        }
    }

    /// What the hub needs to fulfil a confirmed order, and which hub.
    pub fn dispatch_order(&self, order_id: &OrderId) -> Option<(HubId, crate::facts::DispatchOrder)> {
        self.order_view(self.orders.get(order_id)?).dispatch_order()
    }

    /// Indices of the pools of `city`, in order.
    fn city_pools(&self, city: &CityName) -> Vec<usize> {
        (0..self.pools.len()).filter(|&i| &self.pools[i].city == city).collect()
    }

    /// What the hand-over outbox sends an order's hub (see `handover`): a confirmed order to
    /// fulfil, or the withdrawal of one cancelled since.
    pub fn handover_command(&self, order_id: &OrderId) -> Option<(HubId, crate::hub::HubCommand)> {
        let order = self.orders.get(order_id)?;
        let (hub_id, dispatch) = self.order_view(order).dispatch_order()?;
        Some(match order.status {
            // Still in the outbox: the hub has not acknowledged a hand-over of it since.
            OrderStatus::Cancelled => (
                hub_id,
                crate::hub::HubCommand::Cancel {
                    order: dispatch,
                    handed_over: false,
                },
            ),
            _ => (hub_id, crate::hub::HubCommand::Dispatch(dispatch)),
        })
    }

    fn pool_index(&self, hub_id: &HubId) -> Option<usize> {
        self.pools.iter().position(|p| &p.hub_id == hub_id)
    }

    pub fn effective_sale(&self, now: UnixMillis) -> SaleStatus {
        self.sale.effective(self.opens_at, self.closes_at, now)
    }

    pub fn order_view(&self, order: &OrderRecord) -> OrderView {
        let waitlist_position = match order.status {
            OrderStatus::Waitlisted => self
                .waitlists
                .get(&order.city)
                .and_then(|q| q.iter().position(|id| id == &order.order_id))
                .map(|i| i as u32 + 1),
            _ => None,
        };
        OrderView {
            order_id: order.order_id.clone(),
            storefront: order.storefront.clone(),
            handed_over: order.confirmation.is_some() && !self.handover.contains(&order.order_id),
            drop_id: self.drop_id.clone(),
            sku_id: self.sku_id.clone(),
            sku_name: self.name.clone(),
            creator_id: self.creator_id.clone(),
            status: order.status,
            // A waitlisted order's pool is only its pin: none of its units are there yet.
            hub_id: order
                .pool
                .filter(|_| order.status != OrderStatus::Waitlisted)
                .map(|i| self.pools[i].hub_id.clone()),
            city: order.city.clone(),
            quantity: order.quantity,
            requested: order.requested,
            amount: self.price.times(order.quantity).unwrap_or(self.price),
            expires_at: order.expires_at,
            waitlist_position,
            confirmation: order.confirmation.clone(),
            updated_at: order.updated_at,
        }
    }

    pub fn figures(&self) -> SkuFigures {
        let mut seen_cities = BTreeSet::new();
        let pools = self
            .pools
            .iter()
            .map(|p| {
                let waitlisted = if seen_cities.insert(&p.city) {
                    self.waitlists.get(&p.city).map_or(0, |q| {
                        q.iter().filter_map(|id| self.orders.get(id)).map(|o| o.requested).sum()
                    })
                } else {
                    0
                };
                PoolFigures {
                    pool: p.clone(),
                    waitlisted,
                }
            })
            .collect();
        SkuFigures {
            drop_id: self.drop_id.clone(),
            sku_id: self.sku_id.clone(),
            name: self.name.clone(),
            price: self.price,
            per_buyer_limit: self.per_buyer_limit,
            sale: self.sale,
            pools,
            revenue: Money::new(self.revenue_minor_units, self.price.currency),
            sold_out_at: self.sold_out_at,
            changed_at: self.changed_at,
        }
    }

    /// Checks every invariant against the whole state; O(orders). For tests and audits.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut held = vec![0u32; self.pools.len()];
        let mut sold = vec![0u32; self.pools.len()];
        let mut active: HashMap<&BuyerRef, u32> = HashMap::new();
        for order in self.orders.values() {
            match order.status {
                OrderStatus::Held => held[order.pool.ok_or("held order without a pool")?] += order.quantity,
                OrderStatus::Confirmed => sold[order.pool.ok_or("confirmed order without a pool")?] += order.quantity,
                _ => {}
            }
            let counted = match order.status {
                OrderStatus::Waitlisted => order.requested,
                OrderStatus::Held | OrderStatus::Confirmed => order.quantity,
                OrderStatus::Expired | OrderStatus::Cancelled => 0,
            };
            if counted > 0 {
                *active.entry(&order.buyer).or_default() += counted;
            }
        }
        for (i, pool) in self.pools.iter().enumerate() {
            if u64::from(pool.available) + u64::from(pool.held) + u64::from(pool.sold) != u64::from(pool.allocated) {
                return Err(format!(
                    "pool {}: available {} + held {} + sold {} != allocated {}",
                    pool.hub_id, pool.available, pool.held, pool.sold, pool.allocated
                ));
            }
            if pool.held != held[i] || pool.sold != sold[i] {
                return Err(format!(
                    "pool {}: counters (held {}, sold {}) disagree with orders ({}, {})",
                    pool.hub_id, pool.held, pool.sold, held[i], sold[i]
                ));
            }
        }
        if active.len() != self.buyer_active.len() || active.iter().any(|(b, n)| self.buyer_active.get(*b) != Some(n)) {
            return Err("per-buyer totals disagree with orders".into());
        }
        for (city, queue) in &self.waitlists {
            for id in queue {
                let order = self.orders.get(id).ok_or("waitlist names an unknown order")?;
                if order.status != OrderStatus::Waitlisted || &order.city != city {
                    return Err(format!("waitlist of {city} holds {id} in status {:?}", order.status));
                }
                if order
                    .pool
                    .is_some_and(|i| self.pools.get(i).is_none_or(|p| &p.city != city))
                {
                    return Err(format!("{id} waits in {city} pinned to a hub of another city"));
                }
            }
        }
        let expiring = self.orders.values().filter(|o| o.status == OrderStatus::Held).count();
        if expiring != self.expiries.len() {
            return Err(format!(
                "{} held orders but {} expiry timers",
                expiring,
                self.expiries.len()
            ));
        }
        let revenue: i64 = self
            .orders
            .values()
            .filter(|&o| o.status == OrderStatus::Confirmed)
            .map(|o| o.confirmation.as_ref().map_or(0, |c| c.amount.minor_units))
            .sum();
        if revenue != self.revenue_minor_units {
            return Err(format!(
                "revenue {} != sum of confirmed orders {}",
                self.revenue_minor_units, revenue
            ));
        }
        Ok(())
    }

    /// Checks the waitlist rule at `now`: while the sale is open, no waitlisted request can be
    /// served from the stock that is free, so the waitlist never strands stock and a newcomer
    /// served from free stock passes nobody who could have had it. Apart from
    /// `check_invariants` because it needs the time (once the sale has closed, returned stock
    /// is no longer promoted) and because journals written before the rule may break it.
    /// O(waitlisted × pools). For tests.
    pub fn check_waitlist(&self, now: UnixMillis) -> Result<(), String> {
        if self.effective_sale(now) != SaleStatus::Open {
            return Ok(());
        }
        let available = self.available_now();
        for (city, queue) in &self.waitlists {
            let city_pools = self.city_pools(city);
            for id in queue {
                let order = self.orders.get(id).ok_or("waitlist names an unknown order")?;
                let free = pools_of(order, &city_pools).map(|i| (i, available[i]));
                if let Some((pool, quantity)) = serving(order.requested, order.allow_partial, free) {
                    return Err(format!(
                        "{id} waits in {city} for {} units while hub {} has {quantity} of them free",
                        order.requested, self.pools[pool].hub_id
                    ));
                }
            }
        }
        Ok(())
    }

    fn reservation_of(
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

    fn decide_reserve(&self, cmd: ReserveCommand, now: UnixMillis) -> Result<(Vec<SkuEvent>, SkuReply), Rejection> {
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

    fn decide_confirm(&self, cmd: ConfirmCommand, now: UnixMillis) -> Result<(Vec<SkuEvent>, SkuReply), Rejection> {
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
    fn reply_after(&self, events: Vec<SkuEvent>, order_id: &OrderId) -> Result<(Vec<SkuEvent>, SkuReply), Rejection> {
        let mut next = self.skeleton(std::iter::once(order_id));
        for event in events.iter().filter(|e| e.order_id() == Some(order_id)) {
            next.apply(event);
        }
        let view = next.order_view(&next.orders[order_id]);
        Ok((events, SkuReply::Order(view)))
    }

    /// A copy with the scalars, pools and waitlists but only the named orders: enough to
    /// apply events about those orders and read views and figures afterwards.
    fn skeleton<'a>(&self, order_ids: impl Iterator<Item = &'a OrderId>) -> SkuState {
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
    fn promote(&self, city: &CityName, available: &mut [u32], now: UnixMillis, events: &mut Vec<SkuEvent>) {
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

    fn available_now(&self) -> Vec<u32> {
        self.pools.iter().map(|p| p.available).collect()
    }

    fn decide_cancel(
        &self,
        order_id: OrderId,
        storefront: Option<&StorefrontId>,
        now: UnixMillis,
    ) -> Result<(Vec<SkuEvent>, SkuReply), Rejection> {
        let order = self
            .orders
            .get(&order_id)
            .ok_or_else(|| Rejection::not_found("order", order_id.as_str()))?;
        order.check_storefront(storefront)?;
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

    fn decide_expire(&self, now: UnixMillis) -> Vec<SkuEvent> {
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
        if self.effective_sale(now) == SaleStatus::Closed {
            self.close_waitlists(now, &mut events);
        } else {
            for city in &cities {
                self.promote(city, &mut available, now, &mut events);
            }
        }
        events
    }

    fn close_waitlists(&self, now: UnixMillis, events: &mut Vec<SkuEvent>) {
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

    fn decide_restock(&self, cmd: RestockCommand, now: UnixMillis) -> Result<(Vec<SkuEvent>, SkuReply), Rejection> {
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

    fn record_idempotent(&mut self, idempotent: &Idempotent, reservation: Reservation, at: UnixMillis) {
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
    }

    fn add_active(&mut self, buyer: &BuyerRef, quantity: u32) {
        if quantity > 0 {
            *self.buyer_active.get_or_default(buyer) += quantity;
        }
    }

    fn remove_active(&mut self, buyer: &BuyerRef, quantity: u32) {
        if let Some(n) = self.buyer_active.get_mut(buyer) {
            *n -= quantity;
            if *n == 0 {
                self.buyer_active.remove(buyer);
            }
        }
    }

    fn remove_from_waitlist(&mut self, city: &CityName, order_id: &OrderId) {
        if let Some(queue) = self.waitlists.get_mut(city) {
            if let Some(i) = queue.iter().position(|id| id == order_id) {
                queue.remove(i);
            }
            if queue.is_empty() {
                self.waitlists.remove(city);
            }
        }
    }

    fn update_sold_out(&mut self, at: UnixMillis) {
        let all_sold =
            self.pools.iter().all(|p| p.available == 0 && p.held == 0) && self.pools.iter().any(|p| p.sold > 0);
        self.sold_out_at = match (all_sold, self.sold_out_at) {
            (true, None) => Some(at),
            (true, kept) => kept,
            (false, _) => None,
        };
    }
}

/// Where a request for `requested` units is served from and how many units it gets, given
/// the pools it may use with what each has free: the fullest pool (ties go to the earlier
/// one, so the choice is deterministic), for all it asked or, if it allows a partial hold,
/// for what that pool has. None when it cannot be served now.
fn serving(requested: u32, allow_partial: bool, free: impl Iterator<Item = (usize, u32)>) -> Option<(usize, u32)> {
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
fn pools_of<'a>(order: &OrderRecord, city_pools: &'a [usize]) -> impl Iterator<Item = usize> + 'a {
    let pin = order.pool;
    city_pools.iter().copied().filter(move |&i| pin.is_none_or(|p| p == i))
}

impl Aggregate for SkuState {
    type Command = SkuCommand;
    type Event = SkuEvent;
    type Reply = SkuReply;

    fn decide(&self, command: SkuCommand, now: UnixMillis) -> Result<(Vec<SkuEvent>, SkuReply), Rejection> {
        match command {
            SkuCommand::Reserve(cmd) => self.decide_reserve(cmd, now),
            SkuCommand::Confirm(cmd) => self.decide_confirm(cmd, now),
            SkuCommand::Cancel { order_id, storefront } => self.decide_cancel(order_id, storefront.as_ref(), now),
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
        }
    }

    fn apply(&mut self, event: &SkuEvent) {
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
                self.changed_at = *at;
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
                self.changed_at = *at;
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
                self.changed_at = *at;
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
                self.expiries.insert((*expires_at, order_id.clone()));
                self.changed_at = *at;
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
                self.remove_active(&buyer, quantity);
                self.changed_at = *at;
            }
            SkuEvent::WaitlistLeft { order_id, at, .. } => {
                let order = self.orders.get_mut(order_id).expect("waitlisted order exists");
                order.status = OrderStatus::Cancelled;
                order.updated_at = *at;
                let (city, buyer, requested) = (order.city.clone(), order.buyer.clone(), order.requested);
                self.remove_from_waitlist(&city, order_id);
                self.remove_active(&buyer, requested);
                self.changed_at = *at;
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
                self.revenue_minor_units += confirmation.amount.minor_units;
                self.changed_at = confirmation.confirmed_at;
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
                self.revenue_minor_units -= amount;
                self.remove_active(&buyer, quantity);
                self.changed_at = *at;
                self.update_sold_out(*at);
            }
            SkuEvent::Restocked {
                hub_id,
                city,
                quantity,
                idempotency_key,
                at,
            } => {
                match self.pool_index(hub_id) {
                    Some(i) => {
                        self.pools[i].allocated += quantity;
                        self.pools[i].available += quantity;
                    }
                    None => self.pools.push(Pool {
                        hub_id: hub_id.clone(),
                        city: city.clone(),
                        allocated: *quantity,
                        available: *quantity,
                        held: 0,
                        sold: 0,
                    }),
                }
                if let Some(key) = idempotency_key {
                    self.restock_keys.insert(key.clone(), (hub_id.clone(), *quantity));
                }
                self.changed_at = *at;
                self.update_sold_out(*at);
            }
        }
    }

    fn next_deadline(&self) -> Option<UnixMillis> {
        let expiry = self.expiries.first().map(|(t, _)| *t);
        let close = (!self.waitlists.is_empty() && self.sale != SaleStatus::Closed).then_some(self.closes_at);
        [expiry, close, self.handover_due].into_iter().flatten().min()
    }
}
