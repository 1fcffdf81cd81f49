//! One SKU of a drop: its ring-fenced pools (one per hub), holds with their expiry, orders,
//! per-city waitlists and idempotency keys. The invariant, per pool and at every step:
//! `available + held + sold = allocated`, so a SKU never sells beyond its allocation. And
//! while the sale is open, no waitlisted request can be served from free stock (see
//! `promote` and `check_waitlist`): the waitlist never strands stock. Units leased to
//! pop-up edges (`lease.rs`) are out of the pool until sold or returned, so with them the
//! invariant reads `available + held + sold + leased = allocated`.

mod apply;
mod check;
mod decide;
mod lease;
mod view;

pub use lease::{
    EdgeLease, EdgeRefund, EdgeRefundReason, EdgeSale, EdgeSaleOutcome, EdgeSaleResult, EdgeUpload, Edges,
    LeaseCommand, LeaseEnd, LeaseFigures, LeaseView,
};

use crate::aggregate::Aggregate;
use crate::drop::{DropSpec, SaleStatus, SettlementTerms, SkuSpec};
pub use crate::facts::Fulfilment;
use crate::facts::SaleFacts;
use crate::ids::{BuyerRef, CityName, CreatorId, DropId, HubId, IdempotencyKey, OrderId, SkuId, StorefrontId};
use crate::keymap::KeyMap;
use crate::limits::*;
use crate::money::Money;
use crate::rejection::{FieldViolation, Rejection};
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
    /// Units of a hub's pool leased to an edge (a new lease, or one after the last ended).
    StockLeased {
        edge: StorefrontId,
        hub_id: HubId,
        quantity: u32,
        granted_max: u32,
        key_id: String,
        expires_at: UnixMillis,
        reconcile_window_ms: u64,
        at: UnixMillis,
    },
    LeaseToppedUp {
        edge: StorefrontId,
        quantity: u32,
        at: UnixMillis,
    },
    /// Units an edge gave back; `closed`: all it held, and the lease has ended.
    LeaseReturned {
        edge: StorefrontId,
        quantity: u32,
        closed: bool,
        at: UnixMillis,
    },
    /// The window after the lease's expiry passed: what it held went back, and it ended.
    LeaseLapsed {
        edge: StorefrontId,
        quantity: u32,
        at: UnixMillis,
    },
    /// An edge's sale, booked as a confirmed order of the lease's pool.
    EdgeSaleBooked {
        edge: StorefrontId,
        sale: EdgeSale,
        at: UnixMillis,
    },
    /// An edge's sale that could not be booked: to be refunded.
    EdgeSaleRefunded {
        edge: StorefrontId,
        sale: EdgeSale,
        reason: EdgeRefundReason,
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
            SkuEvent::EdgeSaleBooked { sale, .. } => Some(&sale.order_id),
            SkuEvent::SaleStatusSet { .. }
            | SkuEvent::Refused { .. }
            | SkuEvent::Restocked { .. }
            | SkuEvent::HandedOver { .. }
            | SkuEvent::HandoverRetry { .. }
            | SkuEvent::LedgerSynced { .. }
            | SkuEvent::StockLeased { .. }
            | SkuEvent::LeaseToppedUp { .. }
            | SkuEvent::LeaseReturned { .. }
            | SkuEvent::LeaseLapsed { .. }
            | SkuEvent::EdgeSaleRefunded { .. } => None,
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
        /// The order's hub has withdrawn its dispatch (or it has none). A confirmed order is
        /// cancelled only then: the hub alone knows whether its parcel can still be stopped,
        /// and a cancel that raced a confirm must not leave a parcel on its way to a buyer
        /// who was refunded (found by the nemesis, seed 5029).
        withdrawn: bool,
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
    /// Lease units of a hub's pool to an edge (see `lease.rs`).
    Lease(LeaseCommand),
    /// Top an edge's lease up to `granted_total` units leased in all; `by_edge`: the edge
    /// asks, within the lease's `granted_max`.
    TopUpLease {
        edge: StorefrontId,
        granted_total: u32,
        by_edge: bool,
    },
    /// Return units of an edge's lease until `returned_total` are returned in all; None:
    /// return everything it holds and close it.
    ReturnLease {
        edge: StorefrontId,
        returned_total: Option<u32>,
    },
    /// Book an edge's uploaded sales, each once by order id.
    BookEdgeSales {
        edge: StorefrontId,
        sales: Vec<EdgeSale>,
    },
    GetLease {
        edge: StorefrontId,
    },
    /// Every lease of this SKU, and the edge sales refused (to refund).
    GetLeases,
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
    /// The pop-up edges' leases of this SKU.
    pub leases: Vec<LeaseFigures>,
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
    Lease(LeaseView),
    EdgeSales(EdgeUpload),
    Leases(SkuLeases),
}

/// A SKU's leases and its refused edge sales, for operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkuLeases {
    pub leases: Vec<LeaseView>,
    pub refunds: Vec<EdgeRefund>,
}

crate::reply_shapes!(SkuReply {
    Reservation(Reservation),
    Order(OrderView),
    Figures(SkuFigures),
    Done,
    Lease(LeaseView),
    EdgeSales(EdgeUpload),
    Leases(SkuLeases),
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
    /// When the figures last changed: the latest time of any event applied, so it never
    /// goes back, whatever the clocks of the nodes that owned the SKU in turn. Caches of
    /// the figures keep the later of two by it (`AvailabilityCache::put_sku`), so a former
    /// owner's late figures never replace the current owner's.
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
    /// Leases to pop-up edges and their refused sales. The last field, and it must stay
    /// last: a snapshot written before it is read with an empty one (`actors::codec`).
    pub edges: Edges,
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
            edges: Edges::default(),
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
            + self.ledger_outbox.len()
            + self.edges.leases.len()
            + self.edges.refunds.len()) as u64
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
            handed_over_at: (c.fulfilment == Fulfilment::AtStall).then_some(c.confirmed_at),
        })
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
}

impl Aggregate for SkuState {
    type Command = SkuCommand;
    type Event = SkuEvent;
    type Reply = SkuReply;

    fn decide(&self, command: SkuCommand, now: UnixMillis) -> Result<(Vec<SkuEvent>, SkuReply), Rejection> {
        self.decide_command(command, now)
    }

    fn apply(&mut self, event: &SkuEvent) {
        self.apply_event(event)
    }

    fn next_deadline(&self) -> Option<UnixMillis> {
        let expiry = self.expiries.first().map(|(t, _)| *t);
        let close = (!self.waitlists.is_empty() && self.sale != SaleStatus::Closed).then_some(self.closes_at);
        [expiry, close, self.handover_due, self.next_lapse()]
            .into_iter()
            .flatten()
            .min()
    }
}
