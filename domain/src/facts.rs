//! The facts aggregates send one another: what the hub needs of a confirmed order
//! (`DispatchOrder`), what the ledger needs of a sale (`SaleFacts`) and of its fulfilment
//! (`FulfilmentFacts`, with the hub's `Remedy`s). They live here, apart from the aggregates
//! that send and receive them, so that `sku`, `hub` and `ledger` depend on this module and
//! not on each other (each still re-exports the ones it is known for).

use crate::drop::SettlementTerms;
use crate::ids::{CreatorId, DropId, OrderId, PartnerId};
use crate::money::Money;
use crate::time::UnixMillis;
use serde::{Deserialize, Serialize};

/// How the buyer gets the goods. The address itself is PII and never enters the domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fulfilment {
    Delivery,
    /// Collected at a hub's pickup point.
    Pickup,
    /// Handed to the buyer at a pop-up's stall when sold (an edge's sale): fulfilled then,
    /// no hub's business.
    AtStall,
}

/// What the hub needs to know of a confirmed order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchOrder {
    pub order_id: OrderId,
    pub creator_id: CreatorId,
    /// The SKU's name, for the courier (left out of offers for discreet orders).
    pub item: String,
    pub quantity: u32,
    pub amount: Money,
    pub fulfilment: Fulfilment,
    pub discreet: bool,
    /// The buyer's pickup code; a partner proves it holds the parcel with it.
    pub pickup_code: String,
    pub confirmed_at: UnixMillis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemedyKind {
    /// Delivered (or still underway) after the promised window: a credit.
    LateDelivery,
    /// Never delivered: the rest of the order amount.
    NotDelivered,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fault {
    Partner(PartnerId),
    /// No partner held the dispatch (none eligible): the platform pays.
    Platform,
}

/// A credit owed to the buyer, booked by the creator's settlement ledger. The party at
/// fault is the partner holding the dispatch when the window was missed, else the platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remedy {
    pub kind: RemedyKind,
    pub amount: Money,
    pub at_fault: Fault,
    pub at: UnixMillis,
}

/// What the SKU knows of a confirmed order (sent from its outbox, at least once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaleFacts {
    pub order_id: OrderId,
    pub drop_id: DropId,
    pub gross: Money,
    pub terms: SettlementTerms,
    pub confirmed_at: UnixMillis,
    /// Cancelled after it was confirmed: refunded.
    pub cancelled_at: Option<UnixMillis>,
    /// Handed to the buyer when it was sold (a pop-up's sale at its stall): fulfilled then,
    /// so its return window runs from there; no hub fulfils it.
    pub handed_over_at: Option<UnixMillis>,
}

/// What the hub knows of an order's fulfilment (sent from its outbox, at least once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FulfilmentFacts {
    pub order_id: OrderId,
    pub delivered_at: Option<UnixMillis>,
    pub failed_at: Option<UnixMillis>,
    /// Every remedy of the dispatch so far, in order (the ledger books those it has not).
    pub remedies: Vec<Remedy>,
}
