//! What an aggregate needs to be hosted by an [`crate::entity::Entity`] actor, and the
//! hosting of the drop and SKU aggregates.

use crate::audit_log::{AuditEntry, AuditLog};
use crate::bus::CommandBus;
use crate::clock::Clock;
use crate::error::CommandError;
use crate::fulfilment::{CourierUpdate, HubLoad};
use crate::journal::{BoxFuture, Journal};
use crate::projections::{ProjectionUpdate, Projections};
use domain::drop::{DropCommand, DropEvent, DropState};
use domain::hub::{HubCommand, HubEvent, HubState};
use domain::ledger::{LedgerCommand, LedgerEvent, LedgerState};
use domain::limits::{
    CREATOR_MAILBOX_CAPACITY, DROP_MAILBOX_CAPACITY, HUB_MAILBOX_CAPACITY, REGISTRY_MAILBOX_CAPACITY,
    SKU_MAILBOX_CAPACITY,
};
use domain::registry::{RegistryCommand, RegistryEvent, RegistryReply, RegistryState, StatusSource};
use domain::sku::{SkuCommand, SkuEvent, SkuReply, SkuState};
use domain::{Aggregate, CreatorId, DropId, HubId, OrderId, PartnerId, Rejection, SkuId, UnixMillis};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::{Arc, Weak};

/// Everything an actor depends on, shared by all actors of a process.
pub struct Env {
    pub journal: Arc<dyn Journal>,
    pub clock: Arc<dyn Clock>,
    pub projections: Arc<Projections>,
    pub wakeups: crate::wakeups::Wakeups,
    pub audit: Arc<dyn AuditLog>,
    /// The runtime, for work a publication starts (publications run on the journal's
    /// writer thread).
    pub runtime: tokio::runtime::Handle,
    /// The platform's bus, for actors that ask other actors (a SKU asks its drop).
    pub(crate) bus: Weak<dyn CommandBus>,
}

impl Env {
    pub fn bus(&self) -> Result<Arc<dyn CommandBus>, CommandError> {
        self.bus
            .upgrade()
            .ok_or_else(|| CommandError::Unavailable("platform is shutting down".into()))
    }
}

/// Work to run once a batch is durable (updating projections).
pub type Publication = Box<dyn FnOnce() + Send>;

pub trait Hosted:
    Aggregate<Command: Send + Debug, Event: Serialize + DeserializeOwned + Send + Sync, Reply: Send>
    + Serialize
    + DeserializeOwned
    + Send
    + Sized
    + 'static
{
    type Key: Clone + Eq + Hash + Send + Sync + Debug + 'static;

    /// The journal stream of the actor with this key.
    fn stream(key: &Self::Key) -> String;

    fn mailbox_capacity() -> usize;

    /// The state before the stream's first event.
    fn initial<'a>(key: &'a Self::Key, env: &'a Env) -> BoxFuture<'a, Result<Self, CommandError>>;

    /// A command to run right after recovery, before any other (catching up with others).
    fn after_recovery<'a>(&'a self, _env: &'a Env) -> BoxFuture<'a, Result<Option<Self::Command>, CommandError>> {
        Box::pin(async { Ok(None) })
    }

    /// The key whose stream is `stream`, for aggregates with deadlines (see `wakeups`).
    fn key_of_stream(_stream: &str) -> Option<Self::Key> {
        None
    }

    /// The command a due timer sends (see `Aggregate::next_deadline`).
    fn timer_command() -> Option<Self::Command> {
        None
    }

    /// What to publish once `events` are durable; called with no events after recovery.
    fn publication(&self, events: &[Self::Event], env: &Env) -> Option<Publication>;

    /// Rough size of the state, so snapshots are taken at O(1) amortized cost per event.
    fn snapshot_weight(&self) -> u64 {
        0
    }
}

impl Hosted for DropState {
    type Key = DropId;

    fn stream(key: &DropId) -> String {
        format!("drop/{key}")
    }

    fn mailbox_capacity() -> usize {
        DROP_MAILBOX_CAPACITY
    }

    fn initial<'a>(_: &'a DropId, _: &'a Env) -> BoxFuture<'a, Result<Self, CommandError>> {
        Box::pin(async { Ok(DropState::default()) })
    }

    fn publication(&self, events: &[DropEvent], env: &Env) -> Option<Publication> {
        let spec = self.spec.clone()?;
        let status = self.status;
        let just_created = events.iter().any(|e| matches!(e, DropEvent::Created { .. }));
        let projections = env.projections.clone();
        Some(Box::new(move || {
            projections.emit(vec![ProjectionUpdate::Drop {
                spec,
                status,
                just_created,
            }])
        }))
    }
}

impl Hosted for SkuState {
    type Key = (DropId, SkuId);

    fn stream((drop_id, sku_id): &Self::Key) -> String {
        format!("sku/{drop_id}/{sku_id}")
    }

    fn mailbox_capacity() -> usize {
        SKU_MAILBOX_CAPACITY
    }

    fn initial<'a>((drop_id, sku_id): &'a Self::Key, env: &'a Env) -> BoxFuture<'a, Result<Self, CommandError>> {
        Box::pin(async move {
            let view = env.bus()?.drop_command(drop_id.clone(), DropCommand::Get).await?;
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
            let view = env.bus()?.drop_command(self.drop_id.clone(), DropCommand::Get).await?;
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

    fn snapshot_weight(&self) -> u64 {
        self.entries()
    }
}

/// The registry: one actor for every hub's configuration and every partner.
impl Hosted for RegistryState {
    type Key = ();

    fn stream(_: &()) -> String {
        "registry".into()
    }

    fn mailbox_capacity() -> usize {
        REGISTRY_MAILBOX_CAPACITY
    }

    fn initial<'a>(_: &'a (), _: &'a Env) -> BoxFuture<'a, Result<Self, CommandError>> {
        Box::pin(async { Ok(RegistryState::default()) })
    }

    fn publication(&self, events: &[RegistryEvent], env: &Env) -> Option<Publication> {
        let storefronts: Vec<_> = if events.is_empty() {
            self.storefronts.values().cloned().collect()
        } else {
            events
                .iter()
                .filter_map(|e| match e {
                    RegistryEvent::StorefrontRegistered { storefront_id, .. }
                    | RegistryEvent::StorefrontCredentialReset { storefront_id, .. } => {
                        self.storefronts.get(storefront_id).cloned()
                    }
                    _ => None,
                })
                .collect()
        };
        let creators: Vec<_> = if events.is_empty() {
            self.creators.values().cloned().collect()
        } else {
            events
                .iter()
                .filter_map(|e| match e {
                    RegistryEvent::CreatorRegistered { creator_id, .. }
                    | RegistryEvent::CreatorCredentialReset { creator_id, .. } => {
                        self.creators.get(creator_id).cloned()
                    }
                    _ => None,
                })
                .collect()
        };
        let (partners, hubs): (Vec<_>, Vec<_>) = if events.is_empty() {
            (
                self.partners.values().cloned().collect(),
                self.hubs.values().cloned().collect(),
            )
        } else {
            let mut partners = std::collections::BTreeSet::new();
            let mut hubs = std::collections::BTreeSet::new();
            for event in events {
                match event {
                    RegistryEvent::HubCreated { spec, .. } | RegistryEvent::HubUpdated { spec, .. } => {
                        hubs.insert(spec.hub_id.clone());
                    }
                    RegistryEvent::PartnerRegistered { spec, .. } | RegistryEvent::PartnerUpdated { spec, .. } => {
                        partners.insert(spec.partner_id.clone());
                    }
                    RegistryEvent::StatusChanged { partner_id, .. }
                    | RegistryEvent::Assigned { partner_id, .. }
                    | RegistryEvent::Unassigned { partner_id, .. } => {
                        partners.insert(partner_id.clone());
                    }
                    RegistryEvent::CreatorRegistered { .. }
                    | RegistryEvent::CreatorCredentialReset { .. }
                    | RegistryEvent::StorefrontRegistered { .. }
                    | RegistryEvent::StorefrontCredentialReset { .. } => {}
                }
            }
            (
                partners.iter().filter_map(|p| self.partners.get(p).cloned()).collect(),
                hubs.iter().filter_map(|h| self.hubs.get(h).cloned()).collect(),
            )
        };
        // Hubs whose setup changed get it now if their actor runs (a version check there
        // keeps an older setup from replacing a newer one).
        let mut touched: Vec<HubId> = events.iter().flat_map(|e| e.hubs_touched(self)).collect();
        touched.sort();
        touched.dedup();
        let setups: Vec<_> = touched.iter().filter_map(|h| self.setup(h)).collect();
        let audit: Vec<AuditEntry> = events.iter().filter_map(registry_audit).collect();
        let projections = env.projections.clone();
        let bus = env.bus.clone();
        let runtime = env.runtime.clone();
        Some(Box::new(move || {
            let updates = hubs
                .into_iter()
                .map(ProjectionUpdate::Hub)
                .chain(partners.into_iter().map(ProjectionUpdate::Partner))
                .chain(creators.into_iter().map(ProjectionUpdate::Creator))
                .chain(storefronts.into_iter().map(ProjectionUpdate::Storefront))
                .chain(audit.into_iter().map(ProjectionUpdate::Audit))
                .collect();
            projections.emit(updates);
            if !setups.is_empty() {
                runtime.spawn(async move {
                    let Some(bus) = bus.upgrade() else { return };
                    for setup in setups {
                        let hub_id = setup.spec.hub_id.clone();
                        if let Err(e) = bus.hub_setup_changed(setup).await {
                            tracing::warn!(%hub_id, error = %e, "hub did not take its new setup; it reads it at its next start");
                        }
                    }
                });
            }
        }))
    }

    fn snapshot_weight(&self) -> u64 {
        (self.partners.len() + self.hubs.len()) as u64
    }
}

fn registry_audit(event: &RegistryEvent) -> Option<AuditEntry> {
    let entry = |at: UnixMillis, action: &str, partner: &PartnerId, hub: Option<&HubId>, detail: String| AuditEntry {
        at,
        action: action.into(),
        order_id: None,
        partner_id: Some(partner.to_string()),
        hub_id: hub.map(ToString::to_string),
        detail,
    };
    Some(match event {
        RegistryEvent::HubCreated { .. }
        | RegistryEvent::HubUpdated { .. }
        | RegistryEvent::CreatorRegistered { .. }
        | RegistryEvent::CreatorCredentialReset { .. } => return None,
        RegistryEvent::StorefrontRegistered { .. } | RegistryEvent::StorefrontCredentialReset { .. } => return None,
        RegistryEvent::PartnerRegistered { spec, at, .. } => entry(
            *at,
            "registered",
            &spec.partner_id,
            None,
            format!("{:?} with {:?}, on probation", spec.kind, spec.capabilities),
        ),
        RegistryEvent::PartnerUpdated { spec, at } => entry(
            *at,
            "updated",
            &spec.partner_id,
            None,
            format!(
                "capabilities {:?}, at most {} open dispatches",
                spec.capabilities, spec.max_open_dispatches
            ),
        ),
        RegistryEvent::StatusChanged {
            partner_id,
            status,
            reason,
            source,
            at,
        } => {
            let by = match source {
                StatusSource::Registration => "registration".to_string(),
                StatusSource::Operator => "operator".to_string(),
                StatusSource::Hub(h) => format!("hub {h}"),
            };
            let hub = match source {
                StatusSource::Hub(h) => Some(h),
                _ => None,
            };
            entry(
                *at,
                "status_changed",
                partner_id,
                hub,
                format!("{status:?} by {by}: {reason}"),
            )
        }
        RegistryEvent::Assigned {
            partner_id,
            hub_id,
            rank,
            at,
        } => entry(*at, "assigned", partner_id, Some(hub_id), format!("rank {rank}")),
        RegistryEvent::Unassigned { partner_id, hub_id, at } => {
            entry(*at, "unassigned", partner_id, Some(hub_id), String::new())
        }
    })
}

/// One actor per hub: its dispatches, SLA clocks and partner records.
impl Hosted for HubState {
    type Key = HubId;

    fn stream(key: &HubId) -> String {
        format!("hub/{key}")
    }

    fn mailbox_capacity() -> usize {
        HUB_MAILBOX_CAPACITY
    }

    fn initial<'a>(key: &'a HubId, _: &'a Env) -> BoxFuture<'a, Result<Self, CommandError>> {
        Box::pin(async move { Ok(HubState::new(key.clone())) })
    }

    fn after_recovery<'a>(&'a self, env: &'a Env) -> BoxFuture<'a, Result<Option<HubCommand>, CommandError>> {
        Box::pin(async move {
            // The registry is the authority for the hub's configuration; catch up with it.
            let hub_id = self
                .hub_id()
                .cloned()
                .ok_or_else(|| CommandError::Storage("hub without id".into()))?;
            match env
                .bus()?
                .registry_command(RegistryCommand::GetHubSetup(hub_id))
                .await?
            {
                RegistryReply::Setup(setup) if setup.version > self.setup_version() || self.spec().is_none() => {
                    Ok(Some(HubCommand::Setup(setup)))
                }
                _ => Ok(None),
            }
        })
    }

    fn key_of_stream(stream: &str) -> Option<HubId> {
        HubId::parse(stream.strip_prefix("hub/")?).ok()
    }

    fn timer_command() -> Option<HubCommand> {
        Some(HubCommand::ExpireDue)
    }

    fn publication(&self, events: &[HubEvent], env: &Env) -> Option<Publication> {
        let hub_id = self.hub_id()?.clone();
        let now = env.clock.now();
        let load = self.load(now).map(|(open, waiting, throttled, from, by)| HubLoad {
            hub_id: hub_id.clone(),
            open,
            waiting,
            throttled,
            next_promise: (from, by),
        });
        let watchers = &env.projections;
        let mut courier = Vec::new();
        let mut tracking = Vec::new();
        let mut audit = Vec::new();
        let mut status_requests = Vec::new();
        let mut ended = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for event in events {
            if let Some(entry) = hub_audit(&hub_id, event) {
                audit.push(entry);
            }
            let end = match event {
                HubEvent::Delivered { order_id, .. } => Some((order_id, true)),
                HubEvent::Failed { order_id, .. }
                | HubEvent::Cancelled { order_id, .. }
                | HubEvent::CancelledBeforeHandOver {
                    order: domain::hub::DispatchOrder { order_id, .. },
                    ..
                } => Some((order_id, false)),
                _ => None,
            };
            if let Some((order_id, delivered)) = end {
                if self
                    .dispatch(order_id)
                    .is_some_and(|d| d.order.fulfilment == domain::sku::Fulfilment::Delivery)
                {
                    ended.push((order_id.clone(), delivered));
                }
            }
            match event {
                HubEvent::Offered { order_id, partner, .. } => {
                    if let Some(d) = self.dispatch(order_id) {
                        if d.stage.holder() == Some(partner) {
                            courier.push((
                                partner.clone(),
                                CourierUpdate::Offer {
                                    hub_id: hub_id.clone(),
                                    dispatch: Arc::new(d.clone()),
                                },
                            ));
                        }
                    }
                }
                HubEvent::PartnerSwapped { order_id, swap } => courier.push((
                    swap.from.clone(),
                    CourierUpdate::Withdrawn {
                        hub_id: hub_id.clone(),
                        order_id: order_id.clone(),
                        reason: swap.reason.describe(),
                    },
                )),
                HubEvent::Cancelled {
                    order_id,
                    holder: Some(partner),
                    ..
                } => courier.push((
                    partner.clone(),
                    CourierUpdate::Withdrawn {
                        hub_id: hub_id.clone(),
                        order_id: order_id.clone(),
                        reason: "the order was cancelled or refunded".into(),
                    },
                )),
                HubEvent::Failed {
                    order_id,
                    holder: Some(partner),
                    reason,
                    ..
                } => courier.push((
                    partner.clone(),
                    CourierUpdate::Withdrawn {
                        hub_id: hub_id.clone(),
                        order_id: order_id.clone(),
                        reason: reason.clone(),
                    },
                )),
                HubEvent::StatusRequested {
                    partner,
                    status,
                    reason,
                    ..
                } => status_requests.push(RegistryCommand::SetStatus {
                    partner_id: partner.clone(),
                    status: *status,
                    reason: reason.clone(),
                    source: StatusSource::Hub(hub_id.clone()),
                }),
                _ => {}
            }
            if let Some(id) = event.order_id() {
                if watchers.wants_orders() && seen.insert(id.clone()) && watchers.wants_order(id) {
                    if let Some(d) = self.dispatch(id) {
                        tracking.push(Arc::new(d.clone()));
                    }
                }
            }
        }
        // Money facts go to the creators' ledgers (all unacknowledged ones after a restart
        // or at a retry).
        let retry = events.iter().any(|e| matches!(e, HubEvent::LedgerRetry { .. }));
        let facts: Vec<_> = if events.is_empty() || retry {
            self.ledger_outbox()
                .filter_map(|id| self.fulfilment_facts(id))
                .collect()
        } else {
            let mut ids: Vec<&OrderId> = events
                .iter()
                .filter_map(|e| match e {
                    HubEvent::Delivered { order_id, .. }
                    | HubEvent::Failed { order_id, .. }
                    | HubEvent::WindowMissed { order_id, .. } => Some(order_id),
                    _ => None,
                })
                .collect();
            ids.sort();
            ids.dedup();
            ids.into_iter().filter_map(|id| self.fulfilment_facts(id)).collect()
        };
        let ledger =
            (!facts.is_empty()).then(|| crate::settlement::send_fulfilment(env.bus.clone(), hub_id.clone(), facts));
        let projections = env.projections.clone();
        let bus = env.bus.clone();
        let runtime = env.runtime.clone();
        Some(Box::new(move || {
            if let Some(task) = ledger {
                runtime.spawn(task);
            }
            let updates = audit
                .into_iter()
                .map(ProjectionUpdate::Audit)
                .chain(
                    courier
                        .into_iter()
                        .map(|(partner, update)| ProjectionUpdate::Courier { partner, update }),
                )
                .chain(tracking.into_iter().map(ProjectionUpdate::Tracking))
                .chain(load.map(ProjectionUpdate::HubLoad))
                .collect();
            projections.emit(updates);
            for (order_id, delivered) in &ended {
                projections.fulfilment_ended(order_id, *delivered);
            }
            if !status_requests.is_empty() {
                runtime.spawn(async move {
                    let Some(bus) = bus.upgrade() else { return };
                    for request in status_requests {
                        if let Err(e) = bus.registry_command(request).await {
                            tracing::warn!(error = %e, "partner status request not taken; asked again at the next outcome");
                        }
                    }
                });
            }
        }))
    }

    fn snapshot_weight(&self) -> u64 {
        self.len() as u64
    }
}

fn hub_audit(hub_id: &HubId, event: &HubEvent) -> Option<AuditEntry> {
    let entry =
        |at: UnixMillis, action: &str, order: &OrderId, partner: Option<&PartnerId>, detail: String| AuditEntry {
            at,
            action: action.into(),
            order_id: Some(order.to_string()),
            partner_id: partner.map(ToString::to_string),
            hub_id: Some(hub_id.to_string()),
            detail,
        };
    let ms = |t: UnixMillis| t.0;
    Some(match event {
        HubEvent::Configured { .. } | HubEvent::LedgerSynced { .. } | HubEvent::LedgerRetry { .. } => return None,
        HubEvent::StatusRequested {
            partner,
            status,
            reason,
            at,
        } => AuditEntry {
            at: *at,
            action: "status_requested".into(),
            order_id: None,
            partner_id: Some(partner.to_string()),
            hub_id: Some(hub_id.to_string()),
            detail: format!("{status:?}: {reason}"),
        },
        HubEvent::Dispatched {
            order,
            promised_from,
            promised_by,
            throttled,
            at,
            ..
        } => entry(
            *at,
            "dispatched",
            &order.order_id,
            None,
            format!(
                "window {}..{} (unix ms){}",
                ms(*promised_from),
                ms(*promised_by),
                if *throttled { ", throttled to a later slot" } else { "" }
            ),
        ),
        HubEvent::Offered {
            order_id,
            partner,
            deadline,
            at,
            ..
        } => entry(
            *at,
            "offered",
            order_id,
            Some(partner),
            format!("accept by {} (unix ms)", ms(*deadline)),
        ),
        HubEvent::Accepted {
            order_id, partner, at, ..
        } => entry(*at, "accepted", order_id, Some(partner), String::new()),
        // The codes themselves are never written to the trail.
        HubEvent::PickupCodeRefused {
            order_id,
            partner,
            failures,
            at,
        } => entry(
            *at,
            if *failures >= domain::limits::PICKUP_CODE_TRIES_MAX {
                "pickup_locked"
            } else {
                "pickup_code_refused"
            },
            order_id,
            Some(partner),
            format!("wrong pickup code ({failures} in a row)"),
        ),
        HubEvent::PickupCodeReissued { order_id, at, .. } => entry(
            *at,
            "pickup_code_reissued",
            order_id,
            None,
            "a new pickup code was issued to the buyer".into(),
        ),
        HubEvent::PickedUp {
            order_id, partner, at, ..
        } => entry(*at, "picked_up", order_id, Some(partner), String::new()),
        HubEvent::Delivered {
            order_id,
            partner,
            proof,
            on_time,
            at,
        } => entry(
            *at,
            "delivered",
            order_id,
            Some(partner),
            format!("proof {proof}, {}", if *on_time { "on time" } else { "late" }),
        ),
        HubEvent::DeliveryOverdue { order_id, partner, at } => {
            entry(*at, "delivery_overdue", order_id, Some(partner), String::new())
        }
        HubEvent::PartnerSwapped { order_id, swap } => entry(
            swap.at,
            "swapped",
            order_id,
            Some(&swap.from),
            match swap.missed_deadline {
                Some(d) => format!("{} ({} ms after it)", swap.reason.describe(), swap.at.0 - d.0),
                None => swap.reason.describe(),
            },
        ),
        HubEvent::Waiting { order_id, reason, at } => entry(*at, "no_partner", order_id, None, reason.clone()),
        HubEvent::Cancelled { order_id, holder, at } => entry(
            *at,
            "cancelled",
            order_id,
            holder.as_ref(),
            "the order was cancelled or refunded".into(),
        ),
        HubEvent::CancelledBeforeHandOver { order, at } => entry(
            *at,
            "cancelled",
            &order.order_id,
            None,
            "the order was cancelled or refunded before it reached the hub; it will not be dispatched".into(),
        ),
        HubEvent::WindowMissed { order_id, remedy } => entry(
            remedy.at,
            "remedy",
            order_id,
            None,
            format!(
                "{:?}: {} owed to the buyer, charged to {:?}",
                remedy.kind, remedy.amount, remedy.at_fault
            ),
        ),
        HubEvent::Failed {
            order_id,
            holder,
            reason,
            remedy,
            at,
        } => entry(
            *at,
            "failed",
            order_id,
            holder.as_ref(),
            format!("{reason}; {} refunded, charged to {:?}", remedy.amount, remedy.at_fault),
        ),
    })
}

/// One actor per creator: its settlement ledger.
impl Hosted for LedgerState {
    type Key = CreatorId;

    fn stream(key: &CreatorId) -> String {
        format!("creator/{key}")
    }

    fn mailbox_capacity() -> usize {
        CREATOR_MAILBOX_CAPACITY
    }

    fn initial<'a>(key: &'a CreatorId, _: &'a Env) -> BoxFuture<'a, Result<Self, CommandError>> {
        Box::pin(async move { Ok(LedgerState::new(key.clone())) })
    }

    fn key_of_stream(stream: &str) -> Option<CreatorId> {
        CreatorId::parse(stream.strip_prefix("creator/")?).ok()
    }

    fn timer_command() -> Option<LedgerCommand> {
        Some(LedgerCommand::ReleaseDue)
    }

    fn publication(&self, events: &[LedgerEvent], env: &Env) -> Option<Publication> {
        if events.is_empty() || !env.projections.wants_settlement(&self.creator_id) {
            return None;
        }
        let entries: Vec<Arc<domain::ledger::Entry>> =
            events.iter().filter_map(|e| e.entry().cloned().map(Arc::new)).collect();
        let projections = env.projections.clone();
        let creator = self.creator_id.clone();
        Some(Box::new(move || {
            projections.emit(vec![ProjectionUpdate::Settlement { creator, entries }])
        }))
    }

    fn snapshot_weight(&self) -> u64 {
        self.entries.len() as u64
    }
}

/// Replies of SKU commands, unwrapped by kind.
pub fn expect_order(reply: SkuReply) -> Result<domain::sku::OrderView, CommandError> {
    match reply {
        SkuReply::Order(view) => Ok(view),
        other => Err(CommandError::Unavailable(format!("unexpected reply {other:?}"))),
    }
}
