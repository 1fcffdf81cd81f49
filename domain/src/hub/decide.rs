//! How a hub decides: placing orders with partners, courier actions, SLA deadlines and
//! swaps, cancellations, pickup codes. A decision (`Tx`) copies only what it touches.

use super::apply::{apply_core, apply_dispatch};
use super::*;

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
    pub(super) fn new(base: &'a HubState, now: UnixMillis) -> Tx<'a> {
        Tx {
            base,
            core: base.core.clone(),
            touched: BTreeMap::new(),
            events: Vec::new(),
            now,
            refusal: None,
        }
    }

    pub(super) fn dispatch(&self, id: &OrderId) -> Option<&Dispatch> {
        match self.touched.get(id) {
            Some(d) => d.as_ref(),
            None => self.base.dispatches.get(id),
        }
    }

    pub(super) fn emit(&mut self, event: HubEvent) {
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

    pub(super) fn spec(&self) -> &HubSpec {
        self.core.spec.as_ref().expect("configured hub")
    }

    /// When the rest of the SLA chain from `step` would be done, within the promised window.
    pub(super) fn eta(&self, d: &Dispatch, remaining_ms: u64) -> UnixMillis {
        UnixMillis((self.now.0 + remaining_ms as i64).max(d.promised_from.0))
    }

    /// The best eligible partner for a dispatch: lowest rank (primary first), then lowest
    /// load, then best SLA score. Partners on probation take at most the hub's probation
    /// share of assigned dispatches while an active partner could take it instead.
    pub(super) fn best_partner(&self, d: &Dispatch) -> Option<PartnerId> {
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
    pub(super) fn place(&mut self, id: &OrderId) {
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
    pub(super) fn place_waiting(&mut self) {
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

    pub(super) fn swap(
        &mut self,
        id: &OrderId,
        from: PartnerId,
        reason: SwapReason,
        missed_deadline: Option<UnixMillis>,
    ) {
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

    pub(super) fn remedy(&self, d: &Dispatch, kind: RemedyKind) -> Remedy {
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
    pub(super) fn run_due(&mut self, id: &OrderId) {
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
    pub(super) fn review_partners(&mut self) {
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

    pub(super) fn courier(&mut self, partner: PartnerId, id: OrderId, action: CourierAction) -> Result<(), Rejection> {
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

impl HubState {
    pub(super) fn decide_command(
        &self,
        command: HubCommand,
        now: UnixMillis,
    ) -> Result<(Vec<HubEvent>, HubReply), Rejection> {
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

    /// Answers the commands that only read, without starting a decision (`Tx`).
    pub(super) fn read(
        &self,
        command: &HubCommand,
        now: UnixMillis,
    ) -> Option<Result<(Vec<HubEvent>, HubReply), Rejection>> {
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
