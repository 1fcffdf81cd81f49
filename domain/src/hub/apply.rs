//! How a hub applies its events: to the small part of its state (`Core`: spec, roster,
//! slots, alerts, counters) and to the one dispatch an event is about. A decision in progress
//! (`Tx`) applies its own events with the same functions.

use super::*;

impl Core {
    pub(super) fn alert(
        &mut self,
        at: UnixMillis,
        order_id: Option<&OrderId>,
        partner: Option<&PartnerId>,
        message: String,
    ) {
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

    pub(super) fn stats(&mut self, partner: &PartnerId) -> &mut PartnerStats {
        self.stats.entry(partner.clone()).or_default()
    }

    /// The window promised to an order confirmed at `now`: the earliest slot that ends
    /// after the whole SLA chain could be done, or the first later one with room.
    pub(super) fn promise(&self, now: UnixMillis) -> Option<(UnixMillis, UnixMillis, bool)> {
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
pub(super) fn apply_core(core: &mut Core, event: &HubEvent) {
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
pub(super) fn apply_dispatch(slot: &mut Option<Dispatch>, core: &mut Core, event: &HubEvent) {
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
            // A dispatch is offered only while no partner holds it (placing it, or waiting):
            // an offer over a holder would leave two partners holding one dispatch.
            assert!(
                d.stage.holder().is_none(),
                "{}: offered to {partner} while {:?} holds it",
                d.order.order_id,
                d.stage.holder()
            );
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

impl HubState {
    pub(super) fn apply_event(&mut self, event: &HubEvent) {
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
}
