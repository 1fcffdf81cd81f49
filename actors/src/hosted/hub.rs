//! One actor per hub: its dispatches, SLA clocks and partner records.

use super::{Env, Hosted, Publication};
use crate::audit_log::{self, AuditEntry};
use crate::error::CommandError;
use crate::fulfilment::{CourierUpdate, HubLoad};
use crate::journal::BoxFuture;
use crate::limits::HUB_MAILBOX_CAPACITY;
use crate::projections::ProjectionUpdate;
use crate::telemetry::{HubCounts, SlaDeadline, SwapKind};
use domain::hub::{HubCommand, HubEvent, HubState, SwapReason};
use domain::registry::{RegistryCommand, RegistryReply, RegistryState, StatusSource};
use domain::{HubId, OrderId};
use std::sync::Arc;

impl Hosted for HubState {
    const KIND: &'static str = "hub";
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
                .ask::<RegistryState>((), RegistryCommand::GetHubSetup(hub_id))
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

    fn audit_entries(&self, events: &[HubEvent]) -> Vec<AuditEntry> {
        let Some(hub_id) = self.hub_id() else {
            return Vec::new();
        };
        events.iter().filter_map(|e| audit_log::hub_entry(hub_id, e)).collect()
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
        let mut status_requests = Vec::new();
        let mut ended = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for event in events {
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
        let counted = count_outcomes(events);
        let stats = (counted != HubCounts::default()).then(|| env.stats.clone());
        let projections = env.projections.clone();
        let bus = env.bus.clone();
        let runtime = env.runtime.clone();
        Some(Box::new(move || {
            if let Some(stats) = stats {
                stats.count_hub(hub_id.as_str(), |counts| counts.add(&counted));
            }
            if let Some(task) = ledger {
                runtime.spawn(task);
            }
            let updates = courier
                .into_iter()
                .map(|(partner, update)| ProjectionUpdate::Courier { partner, update })
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
                        if let Err(e) = bus.ask::<RegistryState>((), request).await {
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

    fn invariants(&self) -> Result<(), String> {
        self.check_invariants()
    }
}

/// The swaps, SLA misses and missed delivery windows among a durable batch's events, for the
/// server's metrics.
fn count_outcomes(events: &[HubEvent]) -> HubCounts {
    let mut counts = HubCounts::default();
    for event in events {
        match event {
            HubEvent::PartnerSwapped { swap, .. } => {
                let (kind, missed) = match &swap.reason {
                    SwapReason::MissedAcceptDeadline => (SwapKind::MissedAccept, Some(SlaDeadline::Accept)),
                    SwapReason::MissedPickupDeadline => (SwapKind::MissedPickup, Some(SlaDeadline::Pickup)),
                    SwapReason::Declined(_) => (SwapKind::Declined, None),
                    SwapReason::Failed(_) => (SwapKind::Failed, None),
                    SwapReason::PartnerUnavailable => (SwapKind::PartnerUnavailable, None),
                };
                counts.swaps[kind as usize] += 1;
                if let Some(deadline) = missed {
                    counts.sla_misses[deadline as usize] += 1;
                }
            }
            HubEvent::DeliveryOverdue { .. } => counts.sla_misses[SlaDeadline::Deliver as usize] += 1,
            HubEvent::WindowMissed { .. } => counts.window_misses += 1,
            _ => {}
        }
    }
    counts
}
