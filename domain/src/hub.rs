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
use crate::facts::{Fulfilment, FulfilmentFacts};
use crate::limits::{
    COURIER_TEXT_LEN_MAX, HANDOVER_RETRY_MS, HUB_ALERTS_KEPT, HUB_FINISHED_DISPATCHES_KEPT, HUB_OPEN_DISPATCHES_MAX,
    PICKUP_CODE_TRIES_MAX, SLA_MIN_SAMPLE, SLA_PROBATION_BELOW_BPS, SLA_SUSPEND_BELOW_BPS, SLA_WINDOW,
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
        Fulfilment::Pickup => Capability::PickupPoint,
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

impl Core {
    fn alert(&mut self, at: UnixMillis, order_id: Option<&OrderId>, partner: Option<&PartnerId>, message: String) {
        if self.alerts.len() >= HUB_ALERTS_KEPT {
            self.alerts.pop_back();
        }
        self.alerts.push_front(Alert {
            at,
            order_id: order_id.cloned(),
            partner_id: partner.cloned(),
            message,
        });
    }

    fn stats(&mut self, partner: &PartnerId) -> &mut PartnerStats {
        self.stats.entry(partner.clone()).or_default()
    }

    /// The window promised to an order confirmed at `now`: the earliest slot that ends
    /// after the whole SLA chain could be done, or the first later one with room.
    fn promise(&self, now: UnixMillis) -> Option<(UnixMillis, UnixMillis, bool)> {
        let spec = self.spec.as_ref()?;
        let slot = spec.slot_ms as i64;
        let earliest = (now.0 + spec.sla.total_ms() as i64).div_euclid(slot);
        let mut k = earliest;
        for (&index, &count) in self.slots.range(earliest..) {
            if index != k || count < spec.slot_capacity {
                break;
            }
            k += 1;
        }
        Some((UnixMillis(k * slot), UnixMillis((k + 1) * slot), k > earliest))
    }
}

/// Applies an event to the small part of the state. Events carry everything needed.
fn apply_core(core: &mut Core, event: &HubEvent) {
    match event {
        HubEvent::Configured { setup, .. } => {
            for entry in &setup.roster {
                let was = core.roster.get(&entry.partner_id).map(|e| e.status);
                if entry.status == PartnerStatus::Probation && was != Some(PartnerStatus::Probation) {
                    core.stats(&entry.partner_id).probation_on_time = 0;
                }
            }
            core.spec = Some(setup.spec.clone());
            core.setup_version = setup.version;
            core.roster = setup.roster.iter().map(|e| (e.partner_id.clone(), e.clone())).collect();
            let roster = &core.roster;
            core.requested
                .retain(|p, status| roster.get(p).is_some_and(|e| e.status != *status));
        }
        HubEvent::Dispatched { promised_from, at, .. } => {
            core.open += 1;
            if let Some(spec) = &core.spec {
                let slot = spec.slot_ms as i64;
                *core.slots.entry(promised_from.0.div_euclid(slot)).or_default() += 1;
                // Slots that ended can never be promised again.
                let current = at.0.div_euclid(slot);
                core.slots = core.slots.split_off(&current);
            }
        }
        HubEvent::Offered { partner, .. } => {
            let stats = core.stats(partner);
            stats.offers += 1;
            stats.open += 1;
        }
        HubEvent::Accepted { partner, .. } => core.stats(partner).accepted += 1,
        HubEvent::PickedUp { .. } => {}
        HubEvent::Delivered { partner, on_time, .. } => {
            let probation = core
                .roster
                .get(partner)
                .is_some_and(|e| e.status == PartnerStatus::Probation);
            let stats = core.stats(partner);
            stats.open = stats.open.saturating_sub(1);
            stats.delivered += 1;
            if *on_time {
                stats.delivered_on_time += 1;
                if probation {
                    stats.probation_on_time += 1;
                }
            }
            stats.push(*on_time);
            core.open = core.open.saturating_sub(1);
            core.delivered += 1;
        }
        HubEvent::DeliveryOverdue { order_id, partner, at } => core.alert(
            *at,
            Some(order_id),
            Some(partner),
            format!("{partner} is past its delivery deadline for {order_id}"),
        ),
        HubEvent::PartnerSwapped { swap, .. } => {
            core.swaps += 1;
            let stats = core.stats(&swap.from);
            stats.open = stats.open.saturating_sub(1);
            match &swap.reason {
                SwapReason::MissedAcceptDeadline => {
                    stats.missed_accept += 1;
                    stats.push(false);
                }
                SwapReason::MissedPickupDeadline => {
                    stats.missed_pickup += 1;
                    stats.push(false);
                }
                SwapReason::Failed(_) => {
                    stats.failures += 1;
                    stats.push(false);
                }
                SwapReason::Declined(_) => stats.declined += 1,
                SwapReason::PartnerUnavailable => {}
            }
        }
        HubEvent::Waiting { order_id, reason, at } => {
            core.alert(
                *at,
                Some(order_id),
                None,
                format!("no eligible partner for {order_id}: {reason}"),
            );
        }
        HubEvent::WindowMissed { .. } => {}
        HubEvent::Failed {
            order_id,
            holder,
            reason,
            at,
            ..
        } => {
            if let Some(partner) = holder {
                let stats = core.stats(partner);
                stats.open = stats.open.saturating_sub(1);
                stats.failures += 1;
                stats.push(false);
            }
            core.open = core.open.saturating_sub(1);
            core.failed += 1;
            core.alert(
                *at,
                Some(order_id),
                holder.as_ref(),
                format!("{order_id} failed: {reason}"),
            );
        }
        HubEvent::Cancelled { holder, .. } => {
            if let Some(partner) = holder {
                let stats = core.stats(partner);
                stats.open = stats.open.saturating_sub(1);
            }
            core.open = core.open.saturating_sub(1);
        }
        HubEvent::LedgerSynced { .. } | HubEvent::LedgerRetry { .. } => {}
        // Never open, never offered: nothing to count.
        HubEvent::CancelledBeforeHandOver { .. } | HubEvent::PickupCodeReissued { .. } => {}
        HubEvent::PickupCodeRefused {
            order_id,
            partner,
            failures,
            at,
        } => {
            if *failures == PICKUP_CODE_TRIES_MAX {
                core.alert(
                    *at,
                    Some(order_id),
                    Some(partner),
                    format!(
                        "{order_id} locked for pickup after {failures} wrong pickup codes from {partner}; the buyer's storefront can issue a new code"
                    ),
                );
            }
        }
        HubEvent::StatusRequested {
            partner,
            status,
            reason,
            at,
        } => {
            core.requested.insert(partner.clone(), *status);
            if *status == PartnerStatus::Suspended {
                core.alert(
                    *at,
                    None,
                    Some(partner),
                    format!("asked to suspend {partner}: {reason}"),
                );
            }
        }
    }
}

/// Applies an event to its dispatch (`None` before `Dispatched`). Also keeps the hub's
/// waiting count, from the dispatch's stage before and after.
fn apply_dispatch(slot: &mut Option<Dispatch>, core: &mut Core, event: &HubEvent) {
    if let HubEvent::Dispatched {
        order,
        promised_from,
        promised_by,
        throttled,
        give_up_at,
        at,
    } = event
    {
        *slot = Some(Dispatch {
            order: order.clone(),
            promised_from: *promised_from,
            promised_by: *promised_by,
            throttled: *throttled,
            give_up_at: *give_up_at,
            stage: Stage::Placing,
            partners: Vec::new(),
            swaps: Vec::new(),
            remedies: Vec::new(),
            eta: *promised_from,
            updated_at: *at,
            pickup_failures: 0,
        });
        return;
    }
    if let HubEvent::CancelledBeforeHandOver { order, at } = event {
        // No window was promised: the window and deadlines are the moment it was cancelled.
        *slot = Some(Dispatch {
            order: order.clone(),
            promised_from: *at,
            promised_by: *at,
            throttled: false,
            give_up_at: *at,
            stage: Stage::Cancelled { at: *at },
            partners: Vec::new(),
            swaps: Vec::new(),
            remedies: Vec::new(),
            eta: *at,
            updated_at: *at,
            pickup_failures: 0,
        });
        return;
    }
    let Some(d) = slot.as_mut() else { return };
    let was_waiting = d.is_waiting();
    match event {
        HubEvent::Offered {
            partner,
            deadline,
            eta,
            at,
            ..
        } => {
            d.stage = Stage::Offered {
                partner: partner.clone(),
                offered_at: *at,
                deadline: *deadline,
            };
            d.partners.push(partner.clone());
            d.eta = *eta;
            d.updated_at = *at;
        }
        HubEvent::Accepted {
            partner,
            deadline,
            eta,
            at,
            ..
        } => {
            d.stage = Stage::Accepted {
                partner: partner.clone(),
                deadline: *deadline,
            };
            d.eta = *eta;
            d.updated_at = *at;
        }
        HubEvent::PickedUp {
            partner,
            deadline,
            eta,
            at,
            ..
        } => {
            d.stage = Stage::PickedUp {
                partner: partner.clone(),
                deadline: *deadline,
                overdue: false,
            };
            d.eta = *eta;
            d.updated_at = *at;
        }
        HubEvent::Delivered { partner, proof, at, .. } => {
            d.stage = Stage::Delivered {
                partner: partner.clone(),
                at: *at,
                proof: proof.clone(),
            };
            d.eta = *at;
            d.updated_at = *at;
        }
        HubEvent::DeliveryOverdue { at, .. } => {
            if let Stage::PickedUp { overdue, .. } = &mut d.stage {
                *overdue = true;
            }
            d.updated_at = *at;
        }
        HubEvent::PartnerSwapped { swap, .. } => {
            d.swaps.push(swap.clone());
            d.stage = Stage::Placing;
            d.updated_at = swap.at;
        }
        HubEvent::Waiting { at, .. } => {
            d.stage = Stage::Waiting;
            d.updated_at = *at;
        }
        HubEvent::WindowMissed { remedy, .. } => {
            d.remedies.push(remedy.clone());
            d.updated_at = remedy.at;
        }
        HubEvent::Failed { reason, remedy, at, .. } => {
            d.stage = Stage::Failed {
                reason: reason.clone(),
                at: *at,
            };
            d.remedies.push(remedy.clone());
            d.updated_at = *at;
        }
        HubEvent::Cancelled { at, .. } => {
            d.stage = Stage::Cancelled { at: *at };
            d.updated_at = *at;
        }
        HubEvent::PickupCodeRefused { failures, at, .. } => {
            d.pickup_failures = *failures;
            d.updated_at = *at;
        }
        HubEvent::PickupCodeReissued { pickup_code, at, .. } => {
            d.order.pickup_code = pickup_code.clone();
            d.pickup_failures = 0;
            d.updated_at = *at;
        }
        HubEvent::Configured { .. }
        | HubEvent::Dispatched { .. }
        | HubEvent::CancelledBeforeHandOver { .. }
        | HubEvent::StatusRequested { .. }
        | HubEvent::LedgerSynced { .. }
        | HubEvent::LedgerRetry { .. } => {}
    }
    match (was_waiting, d.is_waiting()) {
        (false, true) => core.waiting += 1,
        (true, false) => core.waiting = core.waiting.saturating_sub(1),
        _ => {}
    }
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

    /// Checks the invariants listed in the module documentation.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut held: BTreeMap<&PartnerId, u32> = BTreeMap::new();
        let (mut open, mut waiting) = (0u32, 0u32);
        for d in self.dispatches.values() {
            if let Some(p) = d.stage.holder() {
                *held.entry(p).or_default() += 1;
            }
            if !d.stage.is_finished() {
                open += 1;
            }
            if d.is_waiting() {
                waiting += 1;
            }
            if let Stage::Failed { .. } = d.stage {
                if d.remedies.iter().all(|r| r.kind != RemedyKind::NotDelivered) {
                    return Err(format!("{} failed without a remedy", d.order.order_id));
                }
            }
            let credited: i64 = d.remedies.iter().map(|r| r.amount.minor_units).sum();
            if credited > d.order.amount.minor_units || d.remedies.iter().any(|r| r.amount.minor_units < 0) {
                return Err(format!("{} remedies exceed the order amount", d.order.order_id));
            }
        }
        for (p, stats) in &self.core.stats {
            let h = held.get(p).copied().unwrap_or(0);
            if stats.open != h {
                return Err(format!("{p} has load {} but holds {h} dispatches", stats.open));
            }
        }
        if open != self.core.open {
            return Err(format!("open count {} but {open} open dispatches", self.core.open));
        }
        if waiting != self.core.waiting || self.queue.len() as u32 != waiting {
            return Err(format!(
                "waiting count {} / queue {} but {waiting} waiting dispatches",
                self.core.waiting,
                self.queue.len()
            ));
        }
        Ok(())
    }
}

/// A decision in progress: the small state cloned, the dispatches it touched copied on
/// first touch, and the events so far. Each event is applied here with the same functions
/// `apply` uses, so a decision sees its own effects (loads, slots) without cloning the hub.
struct Tx<'a> {
    base: &'a HubState,
    core: Core,
    touched: BTreeMap<OrderId, Option<Dispatch>>,
    events: Vec<HubEvent>,
    now: UnixMillis,
    /// A refusal that still records events (a wrong pickup code counts towards the lock).
    refusal: Option<Rejection>,
}

impl<'a> Tx<'a> {
    fn new(base: &'a HubState, now: UnixMillis) -> Tx<'a> {
        Tx {
            base,
            core: base.core.clone(),
            touched: BTreeMap::new(),
            events: Vec::new(),
            now,
            refusal: None,
        }
    }

    fn dispatch(&self, id: &OrderId) -> Option<&Dispatch> {
        match self.touched.get(id) {
            Some(d) => d.as_ref(),
            None => self.base.dispatches.get(id),
        }
    }

    fn emit(&mut self, event: HubEvent) {
        apply_core(&mut self.core, &event);
        if let Some(id) = event.order_id() {
            let base = self.base;
            let slot = self
                .touched
                .entry(id.clone())
                .or_insert_with(|| base.dispatches.get(id).cloned());
            apply_dispatch(slot, &mut self.core, &event);
        }
        self.events.push(event);
    }

    fn spec(&self) -> &HubSpec {
        self.core.spec.as_ref().expect("configured hub")
    }

    /// When the rest of the SLA chain from `step` would be done, within the promised window.
    fn eta(&self, d: &Dispatch, remaining_ms: u64) -> UnixMillis {
        UnixMillis((self.now.0 + remaining_ms as i64).max(d.promised_from.0))
    }

    /// The best eligible partner for a dispatch: lowest rank (primary first), then lowest
    /// load, then best SLA score. Partners on probation take at most the hub's probation
    /// share of assigned dispatches while an active partner could take it instead.
    fn best_partner(&self, d: &Dispatch) -> Option<PartnerId> {
        let required = required_capabilities(&d.order);
        let load = |p: &PartnerId| self.core.stats.get(p).map_or(0, |s| s.open);
        let eligible: Vec<&RosterEntry> = self
            .core
            .roster
            .values()
            .filter(|e| {
                e.status != PartnerStatus::Suspended
                    && required.is_subset(&e.capabilities)
                    && !d.excludes(&e.partner_id)
                    && load(&e.partner_id) < e.max_open_dispatches
            })
            .collect();
        let active_available = eligible.iter().any(|e| e.status == PartnerStatus::Active);
        let share = self.spec().probation_share_percent;
        let (mut total, mut on_probation) = (0u64, 0u64);
        for e in self.core.roster.values() {
            let l = u64::from(load(&e.partner_id));
            total += l;
            if e.status == PartnerStatus::Probation {
                on_probation += l;
            }
        }
        let probation_allowed =
            !active_available || (share > 0 && (on_probation + 1) * 100 <= u64::from(share) * (total + 1));
        eligible
            .into_iter()
            .filter(|e| e.status == PartnerStatus::Active || probation_allowed)
            .min_by_key(|e| {
                let score = self
                    .core
                    .stats
                    .get(&e.partner_id)
                    .and_then(PartnerStats::score_bps)
                    .unwrap_or(10_000);
                (
                    e.rank,
                    load(&e.partner_id),
                    std::cmp::Reverse(score),
                    e.partner_id.clone(),
                )
            })
            .map(|e| e.partner_id.clone())
    }

    /// Offers a dispatch to its best eligible partner, or parks it as waiting (alerting the
    /// operator) if it is not waiting already.
    fn place(&mut self, id: &OrderId) {
        let Some(d) = self.dispatch(id) else { return };
        match self.best_partner(d) {
            Some(partner) => {
                let spec = self.spec();
                let deadline = UnixMillis(self.now.0 + spec.sla.accept_ms as i64);
                let eta = self.eta(d, spec.sla.total_ms());
                self.emit(HubEvent::Offered {
                    order_id: id.clone(),
                    partner,
                    deadline,
                    eta,
                    at: self.now,
                });
            }
            None if d.is_waiting() => {}
            None => {
                let reason = if self.core.roster.is_empty() {
                    "the hub has no partners".to_string()
                } else {
                    format!(
                        "every partner with {:?} is suspended, full, or already missed it",
                        required_capabilities(&d.order)
                    )
                };
                self.emit(HubEvent::Waiting {
                    order_id: id.clone(),
                    reason,
                    at: self.now,
                });
            }
        }
    }

    /// Tries to place waiting dispatches, oldest first, while partners have room.
    fn place_waiting(&mut self) {
        if self.core.waiting == 0 {
            return;
        }
        let mut ids: Vec<(UnixMillis, OrderId)> = self
            .base
            .queue
            .iter()
            .filter(|(_, id)| !self.touched.contains_key(id))
            .take(PLACE_WAITING_MAX)
            .cloned()
            .collect();
        ids.extend(
            self.touched
                .values()
                .flatten()
                .filter(|d| d.is_waiting())
                .map(|d| (d.order.confirmed_at, d.order.order_id.clone())),
        );
        ids.sort();
        for (_, id) in ids {
            self.place(&id);
        }
    }

    fn swap(&mut self, id: &OrderId, from: PartnerId, reason: SwapReason, missed_deadline: Option<UnixMillis>) {
        self.emit(HubEvent::PartnerSwapped {
            order_id: id.clone(),
            swap: Swap {
                from,
                reason,
                missed_deadline,
                at: self.now,
            },
        });
        self.place(id);
    }

    fn remedy(&self, d: &Dispatch, kind: RemedyKind) -> Remedy {
        let credited: i64 = d.remedies.iter().map(|r| r.amount.minor_units).sum();
        let total = d.order.amount.minor_units;
        let minor_units = match kind {
            RemedyKind::LateDelivery => total * i64::from(self.spec().late_credit_percent) / 100,
            RemedyKind::NotDelivered => total - credited,
        };
        Remedy {
            kind,
            amount: Money::new(minor_units.max(0), d.order.amount.currency),
            at_fault: match d.stage.holder() {
                Some(p) => Fault::Partner(p.clone()),
                None => Fault::Platform,
            },
            at: self.now,
        }
    }

    /// Runs whatever is due for one dispatch.
    fn run_due(&mut self, id: &OrderId) {
        let now = self.now;
        let Some(d) = self.dispatch(id).cloned() else { return };
        if d.stage.is_finished() {
            return;
        }
        if d.give_up_at <= now {
            let remedy = self.remedy(&d, RemedyKind::NotDelivered);
            self.emit(HubEvent::Failed {
                order_id: id.clone(),
                holder: d.stage.holder().cloned(),
                reason: "not delivered in time; the buyer is refunded".into(),
                remedy,
                at: now,
            });
            return;
        }
        if !d.window_missed() && d.promised_by <= now {
            let remedy = self.remedy(&d, RemedyKind::LateDelivery);
            self.emit(HubEvent::WindowMissed {
                order_id: id.clone(),
                remedy,
            });
        }
        match &d.stage {
            Stage::Offered { partner, deadline, .. } if *deadline <= now => {
                self.swap(id, partner.clone(), SwapReason::MissedAcceptDeadline, Some(*deadline))
            }
            Stage::Accepted { partner, deadline } if *deadline <= now => {
                self.swap(id, partner.clone(), SwapReason::MissedPickupDeadline, Some(*deadline))
            }
            Stage::PickedUp {
                partner,
                deadline,
                overdue: false,
            } if *deadline <= now => self.emit(HubEvent::DeliveryOverdue {
                order_id: id.clone(),
                partner: partner.clone(),
                at: now,
            }),
            _ => {}
        }
    }

    /// Asks the registry to change the status of partners whose record here calls for it.
    fn review_partners(&mut self) {
        let exit = self.spec().probation_exit_deliveries;
        let mut requests = Vec::new();
        for (p, entry) in &self.core.roster {
            let Some(stats) = self.core.stats.get(p) else { continue };
            let score = stats.score_bps();
            let (status, reason) = match (entry.status, score) {
                (PartnerStatus::Suspended, _) => continue,
                (_, Some(s)) if s < SLA_SUSPEND_BELOW_BPS => (
                    PartnerStatus::Suspended,
                    format!("SLA score {}% is below {}%", s / 100, SLA_SUSPEND_BELOW_BPS / 100),
                ),
                (PartnerStatus::Active, Some(s)) if s < SLA_PROBATION_BELOW_BPS => (
                    PartnerStatus::Probation,
                    format!("SLA score {}% is below {}%", s / 100, SLA_PROBATION_BELOW_BPS / 100),
                ),
                (PartnerStatus::Probation, s)
                    if stats.probation_on_time >= exit && s.is_none_or(|s| s >= SLA_PROBATION_BELOW_BPS) =>
                {
                    (
                        PartnerStatus::Active,
                        format!("{} on-time deliveries on probation", stats.probation_on_time),
                    )
                }
                _ => continue,
            };
            if self.core.requested.get(p) != Some(&status) {
                requests.push((p.clone(), status, reason));
            }
        }
        for (partner, status, reason) in requests {
            self.emit(HubEvent::StatusRequested {
                partner,
                status,
                reason,
                at: self.now,
            });
        }
    }

    fn courier(&mut self, partner: PartnerId, id: OrderId, action: CourierAction) -> Result<(), Rejection> {
        let now = self.now;
        let d = self
            .dispatch(&id)
            .ok_or_else(|| Rejection::not_found("dispatch", id.as_str()))?
            .clone();
        let holder = d.stage.holder();
        let holds = holder == Some(&partner);
        let had_it = d.partners.contains(&partner);
        if !had_it {
            return Err(Rejection::PermissionDenied(format!(
                "dispatch {id} is not offered to {partner}"
            )));
        }
        let withdrawn = || {
            Rejection::FailedPrecondition(format!(
                "dispatch {id} is no longer {partner}'s: {}",
                d.swaps
                    .iter()
                    .rev()
                    .find(|s| s.from == partner)
                    .map_or_else(|| "it was withdrawn".into(), |s| s.reason.describe())
            ))
        };
        let wrong_code = || Rejection::field("pickup_code", "does not match the order's pickup code");
        let check_pickup_code = |code: &str| {
            if codes_match(code, &d.order.pickup_code) {
                Ok(())
            } else {
                Err(wrong_code())
            }
        };
        let sla = self.spec().sla;
        match (action, &d.stage) {
            (CourierAction::Accept, Stage::Offered { .. }) if holds => {
                let eta = self.eta(&d, sla.pickup_ms + sla.deliver_ms);
                self.emit(HubEvent::Accepted {
                    order_id: id,
                    partner,
                    deadline: UnixMillis(now.0 + sla.pickup_ms as i64),
                    eta,
                    at: now,
                });
            }
            (CourierAction::Accept, Stage::Accepted { .. } | Stage::PickedUp { .. }) if holds => {}
            (CourierAction::Accept, Stage::Delivered { partner: p, .. }) if *p == partner => {}
            (CourierAction::Decline { reason }, Stage::Offered { .. } | Stage::Accepted { .. }) if holds => {
                check_text("reason", &reason)?;
                self.swap(&id, partner, SwapReason::Declined(reason), None);
            }
            (CourierAction::Decline { .. }, _) if !holds => {
                // A retried decline: the dispatch already left this partner.
                if !d
                    .swaps
                    .iter()
                    .any(|s| s.from == partner && matches!(s.reason, SwapReason::Declined(_)))
                {
                    return Err(withdrawn());
                }
            }
            (CourierAction::PickedUp { .. }, Stage::Accepted { .. }) if holds && d.pickup_locked() => {
                return Err(Rejection::FailedPrecondition(format!(
                    "dispatch {id} is locked for pickup after {} wrong pickup codes; the buyer's storefront can issue a new code",
                    d.pickup_failures
                )));
            }
            (CourierAction::PickedUp { pickup_code }, Stage::Accepted { .. })
                if holds && !codes_match(&pickup_code, &d.order.pickup_code) =>
            {
                // Counted, so that guessing stops after a few tries; the courier is refused,
                // and told when this wrong code is the one that locks the dispatch.
                let failures = d.pickup_failures + 1;
                self.refusal = Some(if failures >= PICKUP_CODE_TRIES_MAX {
                    Rejection::FailedPrecondition(format!(
                        "wrong pickup code: dispatch {id} is now locked for pickup after {failures} wrong codes; the buyer's storefront can issue a new code"
                    ))
                } else {
                    wrong_code()
                });
                self.emit(HubEvent::PickupCodeRefused {
                    order_id: id,
                    partner,
                    failures,
                    at: now,
                });
                return Ok(());
            }
            (CourierAction::PickedUp { pickup_code }, Stage::Accepted { .. } | Stage::PickedUp { .. }) if holds => {
                check_pickup_code(&pickup_code)?;
                // Picked up already: a retry, nothing changes.
                if matches!(d.stage, Stage::Accepted { .. }) {
                    let eta = self.eta(&d, sla.deliver_ms);
                    self.emit(HubEvent::PickedUp {
                        order_id: id,
                        partner,
                        deadline: UnixMillis(now.0 + sla.deliver_ms as i64),
                        eta,
                        at: now,
                    });
                }
            }
            // Retried after the delivery: the dispatch is returned as it is (updates are
            // idempotent), still only with the order's pickup code.
            (CourierAction::PickedUp { pickup_code }, Stage::Delivered { partner: p, .. }) if *p == partner => {
                check_pickup_code(&pickup_code)?;
            }
            (CourierAction::PickedUp { .. }, Stage::Offered { .. }) if holds => {
                return Err(Rejection::FailedPrecondition(format!(
                    "accept dispatch {id} before picking it up"
                )))
            }
            (CourierAction::Delivered { proof }, Stage::PickedUp { deadline, .. }) if holds => {
                check_text("proof_reference", &proof)?;
                if proof.is_empty() {
                    return Err(Rejection::field("proof_reference", "must not be empty"));
                }
                let on_time = now <= *deadline;
                self.emit(HubEvent::Delivered {
                    order_id: id,
                    partner,
                    proof,
                    on_time,
                    at: now,
                });
                self.place_waiting();
            }
            (CourierAction::Delivered { .. }, Stage::Delivered { partner: p, .. }) if *p == partner => {}
            (CourierAction::Delivered { .. }, Stage::Offered { .. } | Stage::Accepted { .. }) if holds => {
                return Err(Rejection::FailedPrecondition(format!(
                    "mark dispatch {id} picked up before delivered"
                )))
            }
            (
                CourierAction::Failure { reason },
                Stage::Offered { .. } | Stage::Accepted { .. } | Stage::PickedUp { .. },
            ) if holds => {
                check_text("reason", &reason)?;
                self.swap(&id, partner, SwapReason::Failed(reason), None);
            }
            (CourierAction::Failure { .. }, _) if !holds => {
                if !d
                    .swaps
                    .iter()
                    .any(|s| s.from == partner && matches!(s.reason, SwapReason::Failed(_)))
                {
                    return Err(withdrawn());
                }
            }
            (_, Stage::Failed { reason, .. }) => {
                return Err(Rejection::FailedPrecondition(format!("dispatch {id} failed: {reason}")))
            }
            (_, _) if !holds => return Err(withdrawn()),
            (action, stage) => {
                return Err(Rejection::FailedPrecondition(format!(
                    "{} is not possible for dispatch {id} now ({})",
                    action_name(&action),
                    stage_name(stage)
                )))
            }
        }
        self.review_partners();
        Ok(())
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

/// Waiting dispatches tried at once after a partner frees up (bounds one decision's work).
const PLACE_WAITING_MAX: usize = 1_000;

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

impl HubState {
    /// Answers the commands that only read, without starting a decision (`Tx`).
    fn read(&self, command: &HubCommand, now: UnixMillis) -> Option<Result<(Vec<HubEvent>, HubReply), Rejection>> {
        let reply = match command {
            HubCommand::Get => HubReply::Hub(Box::new(self.view(now)?)),
            HubCommand::GetDispatch(id) => match self.dispatches.get(id) {
                Some(d) => HubReply::Dispatch(Box::new(d.clone())),
                None => return Some(Err(Rejection::not_found("dispatch", id.as_str()))),
            },
            HubCommand::PendingOffers(partner) => {
                let mut offers: Vec<Dispatch> = self
                    .dispatches
                    .values()
                    .filter(|d| matches!(&d.stage, Stage::Offered { partner: p, .. } if p == partner))
                    .cloned()
                    .collect();
                offers.sort_by(|a, b| {
                    (a.order.confirmed_at, &a.order.order_id).cmp(&(b.order.confirmed_at, &b.order.order_id))
                });
                HubReply::Offers(offers)
            }
            _ => return None,
        };
        Some(Ok((vec![], reply)))
    }
}

impl Aggregate for HubState {
    type Command = HubCommand;
    type Event = HubEvent;
    type Reply = HubReply;

    fn decide(&self, command: HubCommand, now: UnixMillis) -> Result<(Vec<HubEvent>, HubReply), Rejection> {
        let hub = || self.hub_id.as_ref().map_or("", |h| h.as_str()).to_string();
        if self.core.spec.is_none() && !matches!(command, HubCommand::Setup(_)) {
            return Err(Rejection::not_found("hub", hub()));
        }
        if let Some(read) = self.read(&command, now) {
            return read;
        }
        let mut tx = Tx::new(self, now);
        let reply = match command {
            HubCommand::Setup(setup) => {
                if Some(&setup.spec.hub_id) != self.hub_id.as_ref() {
                    return Err(Rejection::FailedPrecondition(format!(
                        "setup of hub {} sent to hub {}",
                        setup.spec.hub_id,
                        hub()
                    )));
                }
                if self.core.spec.is_some() && setup.version <= self.core.setup_version {
                    return Ok((vec![], HubReply::Done));
                }
                // Recorded even when nothing this hub uses changed, so that an older setup
                // arriving late can never replace it.
                tx.emit(HubEvent::Configured { setup, at: now });
                // Offers to partners that left or were suspended go to others; dispatches
                // already accepted stay with their partner (it may hold the parcel).
                let mut gone: Vec<(OrderId, PartnerId)> = self
                    .dispatches
                    .values()
                    .filter_map(|d| match &d.stage {
                        Stage::Offered { partner, .. }
                            if tx
                                .core
                                .roster
                                .get(partner)
                                .is_none_or(|e| e.status == PartnerStatus::Suspended) =>
                        {
                            Some((d.order.order_id.clone(), partner.clone()))
                        }
                        _ => None,
                    })
                    .collect();
                gone.sort();
                for (id, partner) in gone {
                    tx.swap(&id, partner, SwapReason::PartnerUnavailable, None);
                }
                tx.place_waiting();
                HubReply::Done
            }
            HubCommand::Dispatch(order) => {
                if let Some(existing) = self.dispatches.get(&order.order_id) {
                    return Ok((vec![], HubReply::Dispatch(Box::new(existing.clone()))));
                }
                if self.core.open as usize >= HUB_OPEN_DISPATCHES_MAX {
                    return Err(Rejection::Exhausted(format!(
                        "hub {} has {HUB_OPEN_DISPATCHES_MAX} open dispatches",
                        hub()
                    )));
                }
                let (from, by, throttled) = tx.core.promise(now).expect("configured hub");
                let give_up_at = UnixMillis(by.0 + tx.spec().give_up_after_ms as i64);
                let id = order.order_id.clone();
                tx.emit(HubEvent::Dispatched {
                    order,
                    promised_from: from,
                    promised_by: by,
                    throttled,
                    give_up_at,
                    at: now,
                });
                tx.place(&id);
                HubReply::Dispatch(Box::new(tx.dispatch(&id).expect("just dispatched").clone()))
            }
            HubCommand::Courier {
                partner,
                order_id,
                action,
            } => {
                tx.courier(partner, order_id.clone(), action)?;
                match tx.refusal.take() {
                    Some(refusal) => HubReply::Refused(refusal),
                    None => HubReply::Dispatch(Box::new(tx.dispatch(&order_id).expect("exists").clone())),
                }
            }
            HubCommand::ExpireDue => {
                let due: Vec<OrderId> = self
                    .due
                    .iter()
                    .take_while(|(at, _)| *at <= now)
                    .map(|(_, id)| id.clone())
                    .collect();
                for id in &due {
                    tx.run_due(id);
                }
                tx.place_waiting();
                tx.review_partners();
                if self.ledger_due.is_some_and(|at| at <= now) && !self.ledger_outbox.is_empty() {
                    tx.events.push(HubEvent::LedgerRetry {
                        next: UnixMillis(now.0 + HANDOVER_RETRY_MS),
                    });
                }
                HubReply::Done
            }
            HubCommand::ReissuePickupCode { order_id, pickup_code } => {
                let d = self
                    .dispatches
                    .get(&order_id)
                    .ok_or_else(|| Rejection::not_found("dispatch", order_id.as_str()))?;
                if !matches!(
                    d.stage,
                    Stage::Placing | Stage::Waiting | Stage::Offered { .. } | Stage::Accepted { .. }
                ) {
                    return Err(Rejection::FailedPrecondition(format!(
                        "order {order_id} is {}: its pickup code can no longer change",
                        stage_name(&d.stage)
                    )));
                }
                tx.emit(HubEvent::PickupCodeReissued {
                    order_id: order_id.clone(),
                    pickup_code,
                    at: now,
                });
                HubReply::Dispatch(Box::new(tx.dispatch(&order_id).expect("exists").clone()))
            }
            HubCommand::Cancel { order, handed_over } => {
                let id = order.order_id.clone();
                let Some(d) = self.dispatches.get(&id) else {
                    if handed_over {
                        return Err(Rejection::FailedPrecondition(format!(
                            "order {id} was handed to its hub and its dispatch is finished and no longer kept: it can no longer be cancelled (a parcel that comes back is refunded by recording its return)"
                        )));
                    }
                    tx.emit(HubEvent::CancelledBeforeHandOver { order, at: now });
                    let d = tx.dispatch(&id).expect("just recorded").clone();
                    return Ok((tx.events, HubReply::Dispatch(Box::new(d))));
                };
                if matches!(d.stage, Stage::Cancelled { .. }) {
                    return Ok((vec![], HubReply::Dispatch(Box::new(d.clone()))));
                }
                d.check_cancellable()?;
                let holder = d.stage.holder().cloned();
                tx.emit(HubEvent::Cancelled {
                    order_id: id.clone(),
                    holder,
                    at: now,
                });
                tx.place_waiting();
                HubReply::Dispatch(Box::new(tx.dispatch(&id).expect("exists").clone()))
            }
            HubCommand::LedgerSynced(orders) => {
                let orders: Vec<(OrderId, u32)> = orders
                    .into_iter()
                    .filter(|(id, mark)| self.ledger_outbox.get(id) == Some(mark))
                    .collect();
                if !orders.is_empty() {
                    tx.events.push(HubEvent::LedgerSynced { orders });
                }
                HubReply::Done
            }
            HubCommand::Get | HubCommand::GetDispatch(_) | HubCommand::PendingOffers(_) => {
                unreachable!("reads are answered before a decision starts")
            }
        };
        Ok((tx.events, reply))
    }

    fn apply(&mut self, event: &HubEvent) {
        apply_core(&mut self.core, event);
        match event {
            HubEvent::LedgerSynced { orders } => {
                for (id, mark) in orders {
                    if self.ledger_outbox.get(id) == Some(mark) {
                        self.ledger_outbox.remove(id);
                    }
                }
                if self.ledger_outbox.is_empty() {
                    self.ledger_due = None;
                }
            }
            HubEvent::LedgerRetry { next } => self.ledger_due = Some(*next),
            _ => {}
        }
        let Some(id) = event.order_id() else { return };
        let mut slot = self.dispatches.remove(id);
        let (before_due, before_waiting) = slot.as_ref().map_or((None, false), |d| (d.next_due(), d.is_waiting()));
        apply_dispatch(&mut slot, &mut self.core, event);
        let Some(d) = slot else { return };
        let (after_due, after_waiting) = (d.next_due(), d.is_waiting());
        if before_due != after_due {
            if let Some(at) = before_due {
                self.due.remove(&(at, id.clone()));
            }
            if let Some(at) = after_due {
                self.due.insert((at, id.clone()));
            }
        }
        if before_waiting != after_waiting {
            let key = (d.order.confirmed_at, id.clone());
            if after_waiting {
                self.queue.insert(key);
            } else {
                self.queue.remove(&key);
            }
        }
        let finished = matches!(
            event,
            HubEvent::Delivered { .. }
                | HubEvent::Failed { .. }
                | HubEvent::Cancelled { .. }
                | HubEvent::CancelledBeforeHandOver { .. }
        );
        let money_at = match event {
            HubEvent::Delivered { at, .. } | HubEvent::Failed { at, .. } => Some(*at),
            HubEvent::WindowMissed { remedy, .. } => Some(remedy.at),
            _ => None,
        };
        if let Some(at) = money_at {
            self.ledger_outbox.insert(id.clone(), ledger_mark(&d));
            if self.ledger_due.is_none() {
                self.ledger_due = Some(UnixMillis(at.0 + HANDOVER_RETRY_MS));
            }
        }
        self.dispatches.insert(id.clone(), d);
        if finished {
            self.finished.push_back(id.clone());
            // Forget the oldest finished dispatches, but none the ledger still needs.
            let mut kept = 0;
            while self.finished.len() > HUB_FINISHED_DISPATCHES_KEPT + kept {
                let Some(old) = self.finished.pop_front() else { break };
                if self.ledger_outbox.contains_key(&old) {
                    self.finished.push_back(old);
                    kept += 1;
                } else {
                    self.dispatches.remove(&old);
                }
            }
        }
    }

    fn next_deadline(&self) -> Option<UnixMillis> {
        let due = self.due.first().map(|(at, _)| *at);
        let ledger = self.ledger_due.filter(|_| !self.ledger_outbox.is_empty());
        [due, ledger].into_iter().flatten().min()
    }
}
