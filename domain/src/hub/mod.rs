//! A hub's dispatches: one per confirmed order sold from the hub's pool. The hub promises a
//! delivery slot it can keep (the throttle), offers the dispatch to its best eligible
//! partner, runs the SLA clocks (accept, pick up, deliver) and swaps the dispatch to the
//! next eligible partner after a missed deadline, a decline or a failure. A missed promised
//! window records a remedy; a dispatch still undelivered long after its window fails with a
//! full remedy. Partners' SLA records live here too; a hub asks the registry to demote a
//! partner whose score falls, or to end a probation that was earned.
//!
//! The hub is the authority on whether an order can still be stopped: a cancel or a refund
//! asks it first (`HubCommand::Cancel`), and it withdraws the dispatch, or refuses once the
//! parcel has been picked up, in one decision.
//!
//! Invariants (checked by `check_invariants` and the model tests):
//! - a dispatch has at most one holding partner, and a partner's load is exactly the
//!   number of dispatches it holds;
//! - a swap happens only after a missed deadline, a decline, a failure, or the partner
//!   leaving the hub (suspended, unassigned);
//! - every dispatch ends delivered, failed with a remedy, or cancelled, by its give-up time;
//! - a withdrawn dispatch is never picked up, and an order cancelled before it reached the
//!   hub is never offered;
//! - a dispatch is picked up only with its order's current pickup code, and not at all
//!   after `PICKUP_CODE_TRIES_MAX` wrong codes until a new code is issued.

pub use crate::facts::{DispatchOrder, Fault, Remedy, RemedyKind};

mod apply;
mod check;
mod decide;

use crate::facts::{Fulfilment, FulfilmentFacts};
use crate::limits::{
    COURIER_TEXT_LEN_MAX, HANDOVER_RETRY_MS, HUB_ALERTS_KEPT, HUB_FINISHED_DISPATCHES_KEPT, HUB_OPEN_DISPATCHES_MAX,
    PICKUP_CODE_TRIES_MAX, PLACE_WAITING_MAX, SLA_MIN_SAMPLE, SLA_PROBATION_BELOW_BPS, SLA_SUSPEND_BELOW_BPS,
    SLA_WINDOW,
};
use crate::registry::{Capability, HubSetup, HubSpec, PartnerStatus, RosterEntry};
use crate::{Aggregate, CreatorId, HubId, Money, OrderId, PartnerId, Rejection, UnixMillis};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// Capabilities a partner needs for an order.
pub fn required_capabilities(order: &DispatchOrder) -> BTreeSet<Capability> {
    let mut caps = BTreeSet::new();
    caps.insert(match order.fulfilment {
        Fulfilment::Delivery => Capability::Delivery,
        // A stall's sale never reaches a hub (see `Fulfilment::AtStall`); were it to, a
        // pickup point is the nearest thing.
        Fulfilment::Pickup | Fulfilment::AtStall => Capability::PickupPoint,
    });
    if order.discreet {
        caps.insert(Capability::Discreet);
    }
    caps
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// Within one decision only: between `Dispatched` or `PartnerSwapped` and the `Offered`
    /// or `Waiting` that always follows.
    Placing,
    /// No eligible partner right now; the operator is alerted, the dispatch keeps its place.
    Waiting,
    Offered {
        partner: PartnerId,
        offered_at: UnixMillis,
        deadline: UnixMillis,
    },
    Accepted {
        partner: PartnerId,
        deadline: UnixMillis,
    },
    PickedUp {
        partner: PartnerId,
        deadline: UnixMillis,
        overdue: bool,
    },
    Delivered {
        partner: PartnerId,
        at: UnixMillis,
        proof: String,
    },
    Failed {
        reason: String,
        at: UnixMillis,
    },
    /// The order was cancelled or refunded before it left the hub.
    Cancelled {
        at: UnixMillis,
    },
}

impl Stage {
    pub fn holder(&self) -> Option<&PartnerId> {
        match self {
            Stage::Offered { partner, .. } | Stage::Accepted { partner, .. } | Stage::PickedUp { partner, .. } => {
                Some(partner)
            }
            _ => None,
        }
    }

    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            Stage::Delivered { .. } | Stage::Failed { .. } | Stage::Cancelled { .. }
        )
    }

    /// The SLA deadline of the current step, if one is running.
    fn sla_deadline(&self) -> Option<UnixMillis> {
        match self {
            Stage::Offered { deadline, .. } | Stage::Accepted { deadline, .. } => Some(*deadline),
            Stage::PickedUp {
                deadline,
                overdue: false,
                ..
            } => Some(*deadline),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SwapReason {
    MissedAcceptDeadline,
    MissedPickupDeadline,
    Declined(String),
    Failed(String),
    /// The partner was suspended or unassigned from the hub before accepting.
    PartnerUnavailable,
}

impl SwapReason {
    pub fn describe(&self) -> String {
        match self {
            SwapReason::MissedAcceptDeadline => "missed the accept deadline".into(),
            SwapReason::MissedPickupDeadline => "missed the pickup deadline".into(),
            SwapReason::Declined(r) => format!("declined: {r}"),
            SwapReason::Failed(r) => format!("reported a failure: {r}"),
            SwapReason::PartnerUnavailable => "partner no longer available at this hub".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Swap {
    pub from: PartnerId,
    pub reason: SwapReason,
    /// The deadline that was missed, for swaps after a miss.
    pub missed_deadline: Option<UnixMillis>,
    pub at: UnixMillis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dispatch {
    pub order: DispatchOrder,
    /// The delivery window promised at Confirm.
    pub promised_from: UnixMillis,
    pub promised_by: UnixMillis,
    /// The hub was full for the earliest slot it could keep and promised a later one.
    pub throttled: bool,
    pub give_up_at: UnixMillis,
    pub stage: Stage,
    /// Every partner the dispatch was offered to, in order (one per offer).
    pub partners: Vec<PartnerId>,
    pub swaps: Vec<Swap>,
    pub remedies: Vec<Remedy>,
    /// Current delivery estimate told to the buyer.
    pub eta: UnixMillis,
    pub updated_at: UnixMillis,
    /// Wrong pickup codes since the order's code was last issued; at
    /// `PICKUP_CODE_TRIES_MAX` the dispatch is locked for pickup until a new code is issued.
    pub pickup_failures: u32,
}

impl Dispatch {
    /// Too many wrong pickup codes: no pickup until the buyer's side issues a new code.
    pub fn pickup_locked(&self) -> bool {
        self.pickup_failures >= PICKUP_CODE_TRIES_MAX
    }

    /// Offers made so far.
    pub fn attempt(&self) -> u32 {
        self.partners.len() as u32
    }

    /// Whether the partner lost this dispatch before (missed, declined, failed, left): it is
    /// never offered it again.
    pub fn excludes(&self, partner: &PartnerId) -> bool {
        self.swaps.iter().any(|s| &s.from == partner)
    }

    /// The promised window was missed (a remedy is recorded as it is).
    pub fn window_missed(&self) -> bool {
        !self.remedies.is_empty()
    }

    /// The earliest moment something is due for this dispatch.
    fn next_due(&self) -> Option<UnixMillis> {
        if self.stage.is_finished() {
            return None;
        }
        let mut due = self.give_up_at;
        if let Some(d) = self.stage.sla_deadline() {
            due = due.min(d);
        }
        if !self.window_missed() {
            due = due.min(self.promised_by);
        }
        Some(due)
    }

    /// An order can be stopped (cancelled, refunded) until its parcel leaves the hub.
    pub fn check_cancellable(&self) -> Result<(), Rejection> {
        match &self.stage {
            Stage::PickedUp { .. } | Stage::Delivered { .. } | Stage::Failed { .. } => {
                Err(Rejection::FailedPrecondition(format!(
                    "order {} can no longer be withdrawn from its hub: it is {}",
                    self.order.order_id,
                    stage_name(&self.stage)
                )))
            }
            _ => Ok(()),
        }
    }

    fn is_waiting(&self) -> bool {
        matches!(self.stage, Stage::Waiting)
    }
}

/// A partner's record at this hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PartnerStats {
    pub offers: u64,
    pub accepted: u64,
    pub declined: u64,
    pub missed_accept: u64,
    pub missed_pickup: u64,
    pub failures: u64,
    pub delivered: u64,
    pub delivered_on_time: u64,
    /// Last `SLA_WINDOW` scored outcomes, newest in bit 0 (1 = on time).
    pub recent: u64,
    pub recent_len: u32,
    /// On-time deliveries since the partner was last put on probation.
    pub probation_on_time: u32,
    /// Dispatches the partner holds now (offered or underway).
    pub open: u32,
}

impl PartnerStats {
    fn push(&mut self, good: bool) {
        self.recent = (self.recent << 1) | u64::from(good);
        self.recent_len = (self.recent_len + 1).min(SLA_WINDOW);
    }

    /// Share of on-time outcomes among the recent ones, in basis points, once there are
    /// enough of them to mean something.
    pub fn score_bps(&self) -> Option<u32> {
        if self.recent_len < SLA_MIN_SAMPLE {
            return None;
        }
        let mask = if self.recent_len >= 64 {
            u64::MAX
        } else {
            (1u64 << self.recent_len) - 1
        };
        Some((self.recent & mask).count_ones() * 10_000 / self.recent_len)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    pub at: UnixMillis,
    pub order_id: Option<OrderId>,
    pub partner_id: Option<PartnerId>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CourierAction {
    Accept,
    Decline { reason: String },
    PickedUp { pickup_code: String },
    Delivered { proof: String },
    Failure { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HubCommand {
    /// The registry's configuration for this hub (ignored if older than the current one).
    Setup(HubSetup),
    /// A confirmed order to fulfil; a retry returns the existing dispatch.
    Dispatch(DispatchOrder),
    Courier {
        partner: PartnerId,
        order_id: OrderId,
        action: CourierAction,
    },
    /// Runs every SLA clock, window and give-up time that is due.
    ExpireDue,
    Get,
    GetDispatch(OrderId),
    /// Offers the partner has not answered yet (sent again when a courier reconnects).
    PendingOffers(PartnerId),
    /// The order is being cancelled or refunded: withdraw its dispatch, unless the parcel
    /// already left the hub (picked up, delivered, failed), which is refused. The hub is
    /// asked before anything else changes, so it alone decides whether the order can still
    /// be stopped, and no pickup can follow a withdrawal. A hub that has not got the order
    /// yet records it as cancelled, so a hand-over arriving later creates no dispatch.
    Cancel {
        order: DispatchOrder,
        /// The hub acknowledged the order's hand-over before (its SKU's outbox no longer
        /// holds it): a hub that does not know it then has forgotten its finished dispatch,
        /// which must not be taken for "not handed over yet" (and cancelled after delivery).
        handed_over: bool,
    },
    /// The creator's ledger booked these dispatches' facts as they were (see
    /// `HubState::ledger_outbox`).
    LedgerSynced(Vec<(OrderId, u32)>),
    /// The buyer's side issued a new pickup code (the old one stops working, and a dispatch
    /// locked by wrong codes can be picked up again). Refused once the parcel left the hub.
    ReissuePickupCode {
        order_id: OrderId,
        pickup_code: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HubEvent {
    Configured {
        setup: HubSetup,
        at: UnixMillis,
    },
    Dispatched {
        order: DispatchOrder,
        promised_from: UnixMillis,
        promised_by: UnixMillis,
        throttled: bool,
        give_up_at: UnixMillis,
        at: UnixMillis,
    },
    Offered {
        order_id: OrderId,
        partner: PartnerId,
        deadline: UnixMillis,
        eta: UnixMillis,
        at: UnixMillis,
    },
    Accepted {
        order_id: OrderId,
        partner: PartnerId,
        deadline: UnixMillis,
        eta: UnixMillis,
        at: UnixMillis,
    },
    PickedUp {
        order_id: OrderId,
        partner: PartnerId,
        deadline: UnixMillis,
        eta: UnixMillis,
        at: UnixMillis,
    },
    Delivered {
        order_id: OrderId,
        partner: PartnerId,
        proof: String,
        /// Within the partner's delivery deadline (its SLA), not the buyer's window.
        on_time: bool,
        at: UnixMillis,
    },
    /// The partner holding the parcel missed its delivery deadline. No swap (the parcel is
    /// in its hands); the operator is alerted and the window remedy applies.
    DeliveryOverdue {
        order_id: OrderId,
        partner: PartnerId,
        at: UnixMillis,
    },
    /// The holder lost the dispatch; an `Offered` or `Waiting` event follows.
    PartnerSwapped {
        order_id: OrderId,
        swap: Swap,
    },
    /// No eligible partner: the operator is alerted and the dispatch keeps its place.
    Waiting {
        order_id: OrderId,
        reason: String,
        at: UnixMillis,
    },
    WindowMissed {
        order_id: OrderId,
        remedy: Remedy,
    },
    Failed {
        order_id: OrderId,
        holder: Option<PartnerId>,
        reason: String,
        remedy: Remedy,
        at: UnixMillis,
    },
    /// The order was cancelled or refunded before pickup; its holder (if any) is told.
    Cancelled {
        order_id: OrderId,
        holder: Option<PartnerId>,
        at: UnixMillis,
    },
    /// The hub asks the registry to change a partner's status, from its SLA record here.
    StatusRequested {
        partner: PartnerId,
        status: PartnerStatus,
        reason: String,
        at: UnixMillis,
    },
    /// The creator's ledger booked these dispatches' facts (the marks they had then).
    LedgerSynced {
        orders: Vec<(OrderId, u32)>,
    },
    /// Facts the ledger has not acknowledged are sent again now; again at `next` if needed.
    LedgerRetry {
        next: UnixMillis,
    },
    /// The order was cancelled or refunded before its hand-over reached the hub: it is
    /// recorded as a cancelled dispatch that was never offered, so a hand-over arriving later
    /// (one in flight, a retry from the SKU's outbox) finds it and creates nothing.
    CancelledBeforeHandOver {
        order: DispatchOrder,
        at: UnixMillis,
    },
    /// A courier gave a wrong pickup code (`failures` in a row since the code was issued).
    PickupCodeRefused {
        order_id: OrderId,
        partner: PartnerId,
        failures: u32,
        at: UnixMillis,
    },
    /// A new pickup code replaced the order's code.
    PickupCodeReissued {
        order_id: OrderId,
        pickup_code: String,
        at: UnixMillis,
    },
}

impl HubEvent {
    pub fn order_id(&self) -> Option<&OrderId> {
        match self {
            HubEvent::Configured { .. }
            | HubEvent::StatusRequested { .. }
            | HubEvent::LedgerSynced { .. }
            | HubEvent::LedgerRetry { .. } => None,
            HubEvent::Dispatched { order, .. } | HubEvent::CancelledBeforeHandOver { order, .. } => {
                Some(&order.order_id)
            }
            HubEvent::Offered { order_id, .. }
            | HubEvent::Accepted { order_id, .. }
            | HubEvent::PickedUp { order_id, .. }
            | HubEvent::Delivered { order_id, .. }
            | HubEvent::DeliveryOverdue { order_id, .. }
            | HubEvent::PartnerSwapped { order_id, .. }
            | HubEvent::Waiting { order_id, .. }
            | HubEvent::WindowMissed { order_id, .. }
            | HubEvent::Cancelled { order_id, .. }
            | HubEvent::Failed { order_id, .. }
            | HubEvent::PickupCodeRefused { order_id, .. }
            | HubEvent::PickupCodeReissued { order_id, .. } => Some(order_id),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartnerAtHub {
    pub roster: RosterEntry,
    pub stats: PartnerStats,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubView {
    pub spec: HubSpec,
    pub setup_version: u64,
    pub partners: Vec<PartnerAtHub>,
    pub open: u32,
    pub waiting: u32,
    pub delivered: u64,
    pub failed: u64,
    pub swaps: u64,
    /// The earliest slot a keepable promise would take for an order now is full.
    pub throttled: bool,
    /// The window an order confirmed now would be promised.
    pub next_promise: (UnixMillis, UnixMillis),
    pub alerts: Vec<Alert>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HubReply {
    Hub(Box<HubView>),
    Dispatch(Box<Dispatch>),
    Offers(Vec<Dispatch>),
    Done,
    /// Refused, with events recorded all the same (a wrong pickup code is counted).
    Refused(Rejection),
}

crate::reply_shapes!(HubReply {
    Hub(box HubView),
    Dispatch(box Dispatch),
    Offers(Vec<Dispatch>),
    Done,
});

/// A courier's action answers with the dispatch, or refuses with events recorded all the
/// same (`HubReply::Refused`).
impl crate::reply::FromReply<HubReply> for Result<Dispatch, Rejection> {
    fn from_reply(reply: HubReply) -> Result<Self, HubReply> {
        match reply {
            HubReply::Dispatch(dispatch) => Ok(Ok(*dispatch)),
            HubReply::Refused(rejection) => Ok(Err(rejection)),
            other => Err(other),
        }
    }
}

/// The small part of a hub's state (everything but the dispatches), cloned by `decide`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
struct Core {
    spec: Option<HubSpec>,
    setup_version: u64,
    roster: BTreeMap<PartnerId, RosterEntry>,
    stats: BTreeMap<PartnerId, PartnerStats>,
    /// Dispatches promised per slot (slot index = start / slot length), future slots only.
    slots: BTreeMap<i64, u32>,
    alerts: VecDeque<Alert>,
    /// Status changes asked of the registry and not yet seen in a setup.
    requested: BTreeMap<PartnerId, PartnerStatus>,
    open: u32,
    waiting: u32,
    delivered: u64,
    failed: u64,
    swaps: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HubState {
    hub_id: Option<HubId>,
    core: Core,
    dispatches: HashMap<OrderId, Dispatch>,
    /// Next due time of every open dispatch.
    due: BTreeSet<(UnixMillis, OrderId)>,
    /// Dispatches waiting for a partner, in order of confirmation (they keep their place).
    queue: BTreeSet<(UnixMillis, OrderId)>,
    /// Finished dispatches, oldest first, forgotten beyond `HUB_FINISHED_DISPATCHES_KEPT`.
    finished: VecDeque<OrderId>,
    /// Dispatches whose money facts (delivery, failure, remedies) the creator's ledger has
    /// not acknowledged, with their `ledger_mark` when they changed: the hub's outbox to the
    /// ledgers, sent after every durable change, after a restart and at `ledger_due`.
    ledger_outbox: BTreeMap<OrderId, u32>,
    ledger_due: Option<UnixMillis>,
}

impl HubState {
    pub fn new(hub_id: HubId) -> HubState {
        HubState {
            hub_id: Some(hub_id),
            ..HubState::default()
        }
    }

    pub fn hub_id(&self) -> Option<&HubId> {
        self.hub_id.as_ref()
    }

    pub fn spec(&self) -> Option<&HubSpec> {
        self.core.spec.as_ref()
    }

    pub fn setup_version(&self) -> u64 {
        self.core.setup_version
    }

    pub fn dispatch(&self, order_id: &OrderId) -> Option<&Dispatch> {
        self.dispatches.get(order_id)
    }

    /// What the creator's ledger needs to know of a dispatch, and its mark (the ledger's
    /// acknowledgement carries it, so facts that changed since are sent again).
    pub fn fulfilment_facts(&self, order_id: &OrderId) -> Option<(CreatorId, FulfilmentFacts, u32)> {
        let d = self.dispatches.get(order_id)?;
        let facts = FulfilmentFacts {
            order_id: order_id.clone(),
            delivered_at: match &d.stage {
                Stage::Delivered { at, .. } => Some(*at),
                _ => None,
            },
            failed_at: match &d.stage {
                Stage::Failed { at, .. } => Some(*at),
                _ => None,
            },
            remedies: d.remedies.clone(),
        };
        Some((d.order.creator_id.clone(), facts, ledger_mark(d)))
    }

    /// Orders whose facts the ledger has not acknowledged.
    pub fn ledger_outbox(&self) -> impl Iterator<Item = &OrderId> {
        self.ledger_outbox.keys()
    }

    /// Dispatches kept (open, and finished ones up to `HUB_FINISHED_DISPATCHES_KEPT`).
    pub fn len(&self) -> usize {
        self.dispatches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dispatches.is_empty()
    }

    pub fn view(&self, now: UnixMillis) -> Option<HubView> {
        let spec = self.core.spec.clone()?;
        let (from, by, throttled) = self.core.promise(now)?;
        Some(HubView {
            spec,
            setup_version: self.core.setup_version,
            partners: self
                .core
                .roster
                .values()
                .map(|roster| PartnerAtHub {
                    roster: roster.clone(),
                    stats: self.core.stats.get(&roster.partner_id).cloned().unwrap_or_default(),
                })
                .collect(),
            open: self.core.open,
            waiting: self.core.waiting,
            delivered: self.core.delivered,
            failed: self.core.failed,
            swaps: self.core.swaps,
            throttled,
            next_promise: (from, by),
            alerts: self.core.alerts.iter().cloned().collect(),
        })
    }

    /// Open and waiting dispatches, whether the hub is throttling, and the window an order
    /// confirmed now would be promised. O(full slots).
    pub fn load(&self, now: UnixMillis) -> Option<(u32, u32, bool, UnixMillis, UnixMillis)> {
        let (from, by, throttled) = self.core.promise(now)?;
        Some((self.core.open, self.core.waiting, throttled, from, by))
    }
}

/// Compares pickup codes in constant time for codes of equal length (a code's length is not
/// secret: every code has six digits), so timing tells a guesser nothing about the digits.
fn codes_match(given: &str, expected: &str) -> bool {
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

fn check_text(field: &str, text: &str) -> Result<(), Rejection> {
    if text.chars().count() > COURIER_TEXT_LEN_MAX {
        return Err(Rejection::field(
            field,
            format!("must be at most {COURIER_TEXT_LEN_MAX} characters"),
        ));
    }
    Ok(())
}

pub fn action_name(action: &CourierAction) -> &'static str {
    match action {
        CourierAction::Accept => "accept",
        CourierAction::Decline { .. } => "decline",
        CourierAction::PickedUp { .. } => "pickup",
        CourierAction::Delivered { .. } => "delivery",
        CourierAction::Failure { .. } => "failure report",
    }
}

/// A fingerprint of a dispatch's money facts: it changes with each remedy and when the
/// dispatch is delivered or fails.
fn ledger_mark(d: &Dispatch) -> u32 {
    let finished = matches!(d.stage, Stage::Delivered { .. } | Stage::Failed { .. });
    d.remedies.len() as u32 * 2 + u32::from(finished)
}

pub fn stage_name(stage: &Stage) -> &'static str {
    match stage {
        Stage::Placing => "being placed",
        Stage::Waiting => "waiting for a partner",
        Stage::Offered { .. } => "offered",
        Stage::Accepted { .. } => "accepted",
        Stage::PickedUp { .. } => "picked up",
        Stage::Delivered { .. } => "delivered",
        Stage::Failed { .. } => "failed",
        Stage::Cancelled { .. } => "cancelled",
    }
}

impl Aggregate for HubState {
    type Command = HubCommand;
    type Event = HubEvent;
    type Reply = HubReply;

    fn decide(&self, command: HubCommand, now: UnixMillis) -> Result<(Vec<HubEvent>, HubReply), Rejection> {
        self.decide_command(command, now)
    }

    fn apply(&mut self, event: &HubEvent) {
        self.apply_event(event)
    }

    fn next_deadline(&self) -> Option<UnixMillis> {
        let due = self.due.first().map(|(at, _)| *at);
        let ledger = self.ledger_due.filter(|_| !self.ledger_outbox.is_empty());
        [due, ledger].into_iter().flatten().min()
    }
}
