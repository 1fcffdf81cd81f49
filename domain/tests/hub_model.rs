//! Property tests of the hub state machine: random dispatches, courier answers (right and
//! wrong partners, wrong pickup codes, retries), SLA timeouts, partner status changes and
//! restarts, cancels (before and after the hand-over). After every step: the invariants hold
//! (one holder per dispatch, loads match), swaps happen only after a miss, decline, failure
//! or the partner leaving, a withdrawn dispatch stays withdrawn, and a restart rebuilds the
//! same state. At the end, with time run far ahead, every dispatch is delivered, failed with
//! a remedy, or cancelled.

use domain::hub::*;
use domain::limits::PICKUP_CODE_TRIES_MAX;
use domain::registry::*;
use domain::sku::Fulfilment;
use domain::*;
use proptest::prelude::*;
use std::collections::BTreeSet;

const ACCEPT_MS: u64 = 5_000;
const PICKUP_MS: u64 = 10_000;
const DELIVER_MS: u64 = 20_000;
const SLOT_MS: u64 = 60_000;

fn hub_spec(capacity: u32) -> HubSpec {
    HubSpec {
        hub_id: HubId::parse("h1").unwrap(),
        name: "Lisbon North".into(),
        city: CityName::parse("Lisbon").unwrap(),
        latitude_e6: 38_736_946,
        longitude_e6: -9_142_685,
        slot_ms: SLOT_MS,
        slot_capacity: capacity,
        sla: SlaTargets {
            accept_ms: ACCEPT_MS,
            pickup_ms: PICKUP_MS,
            deliver_ms: DELIVER_MS,
        },
        probation_share_percent: 50,
        probation_exit_deliveries: 3,
        late_credit_percent: 10,
        give_up_after_ms: 3_600_000,
    }
}

fn partner(i: u8) -> PartnerId {
    PartnerId::parse(&format!("p{i}")).unwrap()
}

fn roster(statuses: &[PartnerStatus; 3]) -> Vec<RosterEntry> {
    use Capability::*;
    let caps: [&[Capability]; 3] = [
        &[Delivery, PickupPoint],
        &[Delivery, Discreet],
        &[Delivery, PickupPoint, Discreet],
    ];
    (0..3)
        .map(|i| RosterEntry {
            partner_id: partner(i as u8),
            rank: if i == 0 { 1 } else { 2 },
            status: statuses[i],
            capabilities: caps[i].iter().copied().collect(),
            max_open_dispatches: 4,
        })
        .collect()
}

fn order(n: u32, fulfilment: Fulfilment, discreet: bool, at: UnixMillis) -> DispatchOrder {
    DispatchOrder {
        order_id: OrderId::new(
            &DropId::parse("d1").unwrap(),
            &SkuId::parse("s1").unwrap(),
            u64::from(n),
        ),
        creator_id: CreatorId::parse("c1").unwrap(),
        item: "hoodie".into(),
        quantity: 1,
        amount: Money::new(2_599, Currency::parse("EUR").unwrap()),
        fulfilment,
        discreet,
        pickup_code: format!("{n:06}"),
        confirmed_at: at,
    }
}

struct Harness {
    state: HubState,
    log: Vec<HubEvent>,
    now: UnixMillis,
    version: u64,
}

impl Harness {
    fn new(capacity: u32, statuses: [PartnerStatus; 3]) -> Harness {
        let mut h = Harness {
            state: HubState::new(HubId::parse("h1").unwrap()),
            log: Vec::new(),
            now: UnixMillis(1_000_000),
            version: 0,
        };
        h.setup(capacity, statuses);
        h
    }

    fn setup(&mut self, capacity: u32, statuses: [PartnerStatus; 3]) {
        self.version += 1;
        let setup = HubSetup {
            version: self.version,
            spec: hub_spec(capacity),
            roster: roster(&statuses),
        };
        self.run(HubCommand::Setup(setup)).unwrap();
    }

    fn run(&mut self, command: HubCommand) -> Result<(Vec<HubEvent>, HubReply), Rejection> {
        let before = self.state.clone();
        let result = self.state.decide(command, self.now);
        match &result {
            Ok((events, _)) => {
                for e in events {
                    self.state.apply(e);
                }
                self.log.extend(events.iter().cloned());
            }
            Err(_) => assert_eq!(before, self.state, "a rejection changed nothing"),
        }
        self.state.check_invariants().expect("invariants");
        result
    }

    fn advance(&mut self, ms: u64) -> Vec<HubEvent> {
        self.now = UnixMillis(self.now.0 + ms as i64);
        let mut all = Vec::new();
        // Like the actor's timer: run while something is due.
        while self.state.next_deadline().is_some_and(|d| d <= self.now) {
            let (events, _) = self.run(HubCommand::ExpireDue).unwrap();
            if events.is_empty() {
                break;
            }
            all.extend(events);
        }
        all
    }

    fn restart(&mut self) {
        let mut rebuilt = HubState::new(HubId::parse("h1").unwrap());
        for e in &self.log {
            rebuilt.apply(e);
        }
        assert_eq!(rebuilt, self.state, "replaying the journal rebuilds the same hub");
    }
}

fn holder(state: &HubState, id: &OrderId) -> Option<PartnerId> {
    state.dispatch(id).and_then(|d| d.stage.holder().cloned())
}

#[test]
fn silent_partner_is_swapped_at_its_accept_deadline() {
    let mut h = Harness::new(100, [PartnerStatus::Active; 3]);
    let o = order(1, Fulfilment::Delivery, false, h.now);
    let id = o.order_id.clone();
    h.run(HubCommand::Dispatch(o)).unwrap();
    assert_eq!(holder(&h.state, &id), Some(partner(0)), "primary partner first");
    assert!(h.advance(ACCEPT_MS - 1).is_empty(), "nothing before the deadline");
    let events = h.advance(1);
    let swap = events
        .iter()
        .find_map(|e| match e {
            HubEvent::PartnerSwapped { swap, .. } => Some(swap.clone()),
            _ => None,
        })
        .expect("a swap at the deadline");
    assert_eq!(swap.from, partner(0));
    assert_eq!(swap.reason, SwapReason::MissedAcceptDeadline);
    let next = holder(&h.state, &id).expect("offered to the next partner");
    assert_ne!(next, partner(0));
    // The silent partner can no longer accept it.
    let late = h.run(HubCommand::Courier {
        partner: partner(0),
        order_id: id.clone(),
        action: CourierAction::Accept,
    });
    assert!(matches!(late, Err(Rejection::FailedPrecondition(_))), "{late:?}");
    // A partner that never had it is refused outright.
    let stranger = if next == partner(1) { partner(2) } else { partner(1) };
    let other = h.run(HubCommand::Courier {
        partner: stranger,
        order_id: id.clone(),
        action: CourierAction::Accept,
    });
    assert!(matches!(other, Err(Rejection::PermissionDenied(_))), "{other:?}");
    h.restart();
}

#[test]
fn full_slot_promises_the_next_one() {
    let mut h = Harness::new(2, [PartnerStatus::Active; 3]);
    let mut windows = Vec::new();
    for n in 0..5 {
        let (_, reply) = h
            .run(HubCommand::Dispatch(order(n, Fulfilment::Delivery, false, h.now)))
            .unwrap();
        let HubReply::Dispatch(d) = reply else { panic!() };
        windows.push((d.promised_from, d.throttled));
    }
    assert_eq!(windows[0], windows[1]);
    assert!(!windows[0].1 && !windows[1].1);
    assert_eq!(
        windows[2].0 .0,
        windows[0].0 .0 + SLOT_MS as i64,
        "third order goes to the next slot"
    );
    assert!(windows[2].1, "and is marked as throttled");
    assert_eq!(windows[4].0 .0, windows[0].0 .0 + 2 * SLOT_MS as i64);
    let view = h.state.view(h.now).unwrap();
    assert!(view.throttled);
}

#[test]
fn a_partner_that_keeps_missing_is_suspended_and_probation_is_earned() {
    let mut h = Harness::new(
        1_000,
        [PartnerStatus::Active, PartnerStatus::Probation, PartnerStatus::Active],
    );
    // p0 ignores everything: after enough misses the hub asks for its suspension.
    let mut asked = None;
    for n in 0..40 {
        h.run(HubCommand::Dispatch(order(n, Fulfilment::Delivery, false, h.now)))
            .unwrap();
        for e in h.advance(ACCEPT_MS) {
            if let HubEvent::StatusRequested { partner: p, status, .. } = e {
                if p == partner(0) {
                    asked = Some(status);
                }
            }
        }
        if asked == Some(PartnerStatus::Suspended) {
            break;
        }
    }
    assert_eq!(asked, Some(PartnerStatus::Suspended));
    // p1 delivers on time three times while on probation: the hub asks to make it active.
    let mut h = Harness::new(
        1_000,
        [
            PartnerStatus::Suspended,
            PartnerStatus::Probation,
            PartnerStatus::Suspended,
        ],
    );
    let mut promoted = false;
    for n in 0..3 {
        let o = order(100 + n, Fulfilment::Delivery, false, h.now);
        let (id, code) = (o.order_id.clone(), o.pickup_code.clone());
        h.run(HubCommand::Dispatch(o)).unwrap();
        assert_eq!(
            holder(&h.state, &id),
            Some(partner(1)),
            "probation partner takes it when nobody else can"
        );
        for action in [
            CourierAction::Accept,
            CourierAction::PickedUp { pickup_code: code },
            CourierAction::Delivered {
                proof: "photo-1".into(),
            },
        ] {
            let (events, _) = h
                .run(HubCommand::Courier {
                    partner: partner(1),
                    order_id: id.clone(),
                    action,
                })
                .unwrap();
            promoted |= events.iter().any(|e| {
                matches!(e, HubEvent::StatusRequested { partner: p, status: PartnerStatus::Active, .. } if *p == partner(1))
            });
        }
    }
    assert!(promoted);
}

#[test]
fn a_cancel_of_an_order_handed_over_but_forgotten_is_refused_not_taken_for_a_new_one() {
    // The hub keeps a bounded number of finished dispatches: one it no longer knows, whose
    // hand-over it acknowledged, may have been delivered.
    let mut h = Harness::new(100, [PartnerStatus::Active; 3]);
    let o = order(9, Fulfilment::Delivery, false, h.now);
    let refused = h
        .run(HubCommand::Cancel {
            order: o.clone(),
            handed_over: true,
        })
        .unwrap_err();
    assert!(
        matches!(&refused, Rejection::FailedPrecondition(why) if why.contains(o.order_id.as_str()) && why.contains("no longer kept")),
        "{refused:?}"
    );
    assert!(h.state.dispatch(&o.order_id).is_none());
}

#[test]
fn wrong_pickup_codes_are_counted_lock_the_dispatch_and_a_new_code_opens_it() {
    let mut h = Harness::new(100, [PartnerStatus::Active; 3]);
    let o = order(7, Fulfilment::Pickup, false, h.now);
    let (id, code) = (o.order_id.clone(), o.pickup_code.clone());
    h.run(HubCommand::Dispatch(o)).unwrap();
    let p = holder(&h.state, &id).unwrap();
    let pick_up = |h: &mut Harness, code: &str| {
        h.run(HubCommand::Courier {
            partner: p.clone(),
            order_id: id.clone(),
            action: CourierAction::PickedUp {
                pickup_code: code.into(),
            },
        })
    };
    h.run(HubCommand::Courier {
        partner: p.clone(),
        order_id: id.clone(),
        action: CourierAction::Accept,
    })
    .unwrap();
    for tries in 1..=PICKUP_CODE_TRIES_MAX {
        // Refused, and counted: the only change is the count. The wrong code that locks the
        // dispatch says so.
        let (events, reply) = pick_up(&mut h, "000000").unwrap();
        if tries < PICKUP_CODE_TRIES_MAX {
            assert!(
                matches!(reply, HubReply::Refused(Rejection::InvalidArgument(_))),
                "{reply:?}"
            );
        } else {
            assert!(
                matches!(&reply, HubReply::Refused(Rejection::FailedPrecondition(why)) if why.contains("now locked")),
                "{reply:?}"
            );
        }
        assert!(matches!(&events[..], [HubEvent::PickupCodeRefused { failures, .. }] if *failures == tries));
        assert!(matches!(h.state.dispatch(&id).unwrap().stage, Stage::Accepted { .. }));
    }
    // Locked: even the right code is refused now, and the operator is alerted.
    assert!(h.state.dispatch(&id).unwrap().pickup_locked());
    let locked = pick_up(&mut h, &code).unwrap_err();
    assert!(
        matches!(&locked, Rejection::FailedPrecondition(why) if why.contains("locked")),
        "{locked:?}"
    );
    let alerts = match h.run(HubCommand::Get).unwrap().1 {
        HubReply::Hub(view) => view.alerts,
        other => panic!("{other:?}"),
    };
    assert!(alerts
        .iter()
        .any(|a| a.order_id.as_ref() == Some(&id) && a.message.contains("locked")));
    // A new code: the old one no longer works, the new one does, and only once it is issued.
    h.run(HubCommand::ReissuePickupCode {
        order_id: id.clone(),
        pickup_code: "424242".into(),
    })
    .unwrap();
    assert!(!h.state.dispatch(&id).unwrap().pickup_locked());
    let (_, old) = pick_up(&mut h, &code).unwrap();
    assert!(matches!(old, HubReply::Refused(_)));
    let (events, reply) = pick_up(&mut h, "424242").unwrap();
    assert!(matches!(reply, HubReply::Dispatch(_)));
    assert!(matches!(&events[..], [HubEvent::PickedUp { .. }]));
    // The parcel left: its code can no longer change.
    let late = h
        .run(HubCommand::ReissuePickupCode {
            order_id: id.clone(),
            pickup_code: "111111".into(),
        })
        .unwrap_err();
    assert!(matches!(late, Rejection::FailedPrecondition(_)), "{late:?}");
    h.restart();
    assert_eq!(h.state.dispatch(&id).unwrap().order.pickup_code, "424242");
}

#[test]
fn an_order_cancelled_before_its_hand_over_is_never_dispatched() {
    let mut h = Harness::new(100, [PartnerStatus::Active; 3]);
    let o = order(1, Fulfilment::Delivery, false, h.now);
    let id = o.order_id.clone();
    // The cancel reaches the hub first: it records the order as cancelled.
    let (events, reply) = h
        .run(HubCommand::Cancel {
            order: o.clone(),
            handed_over: false,
        })
        .unwrap();
    assert!(
        matches!(events.as_slice(), [HubEvent::CancelledBeforeHandOver { .. }]),
        "{events:?}"
    );
    let HubReply::Dispatch(d) = reply else {
        panic!("{reply:?}")
    };
    assert!(matches!(d.stage, Stage::Cancelled { .. }));
    // The hand-over in flight arrives afterwards: nothing is dispatched, nobody is offered it.
    let (events, reply) = h.run(HubCommand::Dispatch(o.clone())).unwrap();
    assert!(events.is_empty(), "{events:?}");
    let HubReply::Dispatch(d) = reply else {
        panic!("{reply:?}")
    };
    assert!(matches!(d.stage, Stage::Cancelled { .. }) && d.partners.is_empty());
    let view = h.state.view(h.now).unwrap();
    assert_eq!((view.open, view.waiting), (0, 0));
    let (offers, _) = h.run(HubCommand::PendingOffers(partner(0))).unwrap();
    assert!(offers.is_empty());
    let taken = h.run(HubCommand::Courier {
        partner: partner(0),
        order_id: id.clone(),
        action: CourierAction::Accept,
    });
    assert!(matches!(taken, Err(Rejection::PermissionDenied(_))), "{taken:?}");
    // A cancel sent again (the SKU's outbox) changes nothing; the timer has nothing to run.
    let (events, _) = h
        .run(HubCommand::Cancel {
            order: o,
            handed_over: false,
        })
        .unwrap();
    assert!(events.is_empty());
    assert!(h.advance(10 * 24 * 3_600_000).is_empty());
    assert!(matches!(h.state.dispatch(&id).unwrap().stage, Stage::Cancelled { .. }));
    h.restart();
}

#[test]
fn a_withdrawal_is_refused_once_picked_up_and_no_pickup_follows_one() {
    let mut h = Harness::new(100, [PartnerStatus::Active; 3]);
    let courier = |h: &mut Harness, id: &OrderId, action: CourierAction| {
        let p = holder(&h.state, id).or_else(|| h.state.dispatch(id).unwrap().partners.last().cloned());
        h.run(HubCommand::Courier {
            partner: p.unwrap(),
            order_id: id.clone(),
            action,
        })
    };
    // Accepted, then withdrawn: its courier's pickup is refused and its load is freed.
    let first = order(1, Fulfilment::Pickup, false, h.now);
    let id = first.order_id.clone();
    h.run(HubCommand::Dispatch(first.clone())).unwrap();
    let p = holder(&h.state, &id).unwrap();
    courier(&mut h, &id, CourierAction::Accept).unwrap();
    let (events, _) = h
        .run(HubCommand::Cancel {
            order: first.clone(),
            handed_over: false,
        })
        .unwrap();
    assert!(
        matches!(events.as_slice(), [HubEvent::Cancelled { holder: Some(told), .. }] if *told == p),
        "{events:?}"
    );
    let pickup = CourierAction::PickedUp {
        pickup_code: first.pickup_code.clone(),
    };
    let late = courier(&mut h, &id, pickup);
    assert!(matches!(late, Err(Rejection::FailedPrecondition(_))), "{late:?}");
    assert!(matches!(h.state.dispatch(&id).unwrap().stage, Stage::Cancelled { .. }));
    // Picked up: the withdrawal is refused, names the order, and changes nothing.
    let second = order(2, Fulfilment::Pickup, false, h.now);
    let id = second.order_id.clone();
    h.run(HubCommand::Dispatch(second.clone())).unwrap();
    courier(&mut h, &id, CourierAction::Accept).unwrap();
    let pickup = CourierAction::PickedUp {
        pickup_code: second.pickup_code.clone(),
    };
    courier(&mut h, &id, pickup).unwrap();
    let refused = h
        .run(HubCommand::Cancel {
            order: second.clone(),
            handed_over: false,
        })
        .unwrap_err();
    assert!(
        matches!(&refused, Rejection::FailedPrecondition(why) if why.contains(id.as_str()) && why.contains("picked up")),
        "{refused:?}"
    );
    assert!(matches!(h.state.dispatch(&id).unwrap().stage, Stage::PickedUp { .. }));
    h.restart();
}

/// Runs a courier action of `who` on `id`, returning the dispatch of the reply and the events.
fn act(h: &mut Harness, who: &PartnerId, id: &OrderId, action: CourierAction) -> (Dispatch, Vec<HubEvent>) {
    let (events, reply) = h
        .run(HubCommand::Courier {
            partner: who.clone(),
            order_id: id.clone(),
            action,
        })
        .unwrap_or_else(|e| panic!("refused: {e}"));
    let HubReply::Dispatch(d) = reply else {
        panic!("a courier action replies with its dispatch")
    };
    (*d, events)
}

#[test]
fn a_couriers_repeated_updates_return_the_dispatch_as_it_is() {
    let mut h = Harness::new(100, [PartnerStatus::Active; 3]);
    let o = order(9, Fulfilment::Delivery, false, h.now);
    let (id, code) = (o.order_id.clone(), o.pickup_code.clone());
    h.run(HubCommand::Dispatch(o)).unwrap();
    let p = holder(&h.state, &id).unwrap();
    let accept = || CourierAction::Accept;
    let pick_up = || CourierAction::PickedUp {
        pickup_code: code.clone(),
    };
    let deliver = || CourierAction::Delivered {
        proof: "photo-9".into(),
    };

    let (accepted, events) = act(&mut h, &p, &id, accept());
    assert!(!events.is_empty());
    h.now = UnixMillis(h.now.0 + 1_000);
    let (again, events) = act(&mut h, &p, &id, accept());
    assert!(events.is_empty(), "a retried accept changes nothing: {events:?}");
    assert_eq!(again, accepted);

    let (picked_up, _) = act(&mut h, &p, &id, pick_up());
    let (again, events) = act(&mut h, &p, &id, pick_up());
    assert!(events.is_empty(), "a retried pickup changes nothing: {events:?}");
    assert_eq!(again, picked_up);
    let (again, events) = act(&mut h, &p, &id, accept());
    assert!(events.is_empty(), "an accept retried after the pickup changes nothing");
    assert_eq!(again, picked_up);

    h.now = UnixMillis(h.now.0 + 1_000);
    let (delivered, _) = act(&mut h, &p, &id, deliver());
    assert!(matches!(delivered.stage, Stage::Delivered { .. }));
    h.now = UnixMillis(h.now.0 + 60_000);
    for retry in [deliver(), pick_up(), accept()] {
        let name = action_name(&retry);
        let (again, events) = act(&mut h, &p, &id, retry);
        assert!(
            events.is_empty(),
            "a {name} retried after the delivery changes nothing: {events:?}"
        );
        assert_eq!(
            again, delivered,
            "a {name} retried after the delivery returns the dispatch as it is"
        );
    }
    // A retry is still checked: the wrong pickup code is refused after the delivery too.
    let wrong = h.run(HubCommand::Courier {
        partner: p.clone(),
        order_id: id.clone(),
        action: CourierAction::PickedUp {
            pickup_code: "nope".into(),
        },
    });
    assert!(matches!(wrong, Err(Rejection::InvalidArgument(_))), "{wrong:?}");
    // Another partner of the hub never had it.
    let stranger = if p == partner(1) { partner(2) } else { partner(1) };
    let other = h.run(HubCommand::Courier {
        partner: stranger,
        order_id: id,
        action: CourierAction::Accept,
    });
    assert!(matches!(other, Err(Rejection::PermissionDenied(_))), "{other:?}");
    h.restart();
}

#[derive(Debug, Clone)]
enum Step {
    Cancel(u8),
    /// A new order whose cancel reaches the hub before its hand-over.
    CancelBeforeHandOver,
    Dispatch {
        fulfilment: bool,
        discreet: bool,
    },
    Courier {
        partner: u8,
        order: u8,
        action: u8,
        good_code: bool,
    },
    Advance(u64),
    Status {
        partner: u8,
        status: u8,
    },
    Restart,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (any::<bool>(), prop::bool::weighted(0.2)).prop_map(|(f, d)| Step::Dispatch { fulfilment: f, discreet: d }),
        6 => (0u8..3, any::<u8>(), 0u8..5, prop::bool::weighted(0.9))
            .prop_map(|(partner, order, action, good_code)| Step::Courier { partner, order, action, good_code }),
        3 => prop_oneof![1u64..3_000, 3_000u64..40_000, 40_000u64..400_000].prop_map(Step::Advance),
        1 => (0u8..3, 0u8..3).prop_map(|(partner, status)| Step::Status { partner, status }),
        1 => any::<u8>().prop_map(Step::Cancel),
        1 => Just(Step::CancelBeforeHandOver),
        1 => Just(Step::Restart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn hub_invariants_hold_under_random_steps(steps in prop::collection::vec(step(), 1..120)) {
        let mut h = Harness::new(3, [PartnerStatus::Active, PartnerStatus::Active, PartnerStatus::Probation]);
        let mut statuses = [PartnerStatus::Active, PartnerStatus::Active, PartnerStatus::Probation];
        let mut orders: Vec<DispatchOrder> = Vec::new();
        let mut withdrawn: BTreeSet<OrderId> = BTreeSet::new();
        for step in steps {
            match step {
                Step::Dispatch { fulfilment, discreet } => {
                    let f = if fulfilment { Fulfilment::Delivery } else { Fulfilment::Pickup };
                    let o = order(orders.len() as u32, f, discreet, h.now);
                    orders.push(o.clone());
                    let (events, _) = h.run(HubCommand::Dispatch(o.clone())).unwrap();
                    let swapped = events.iter().any(|e| matches!(e, HubEvent::PartnerSwapped { .. }));
                    prop_assert!(!swapped, "a new dispatch swaps nothing");
                    // A retry returns the same dispatch and changes nothing.
                    let (again, _) = h.run(HubCommand::Dispatch(o)).unwrap();
                    prop_assert!(again.is_empty());
                }
                Step::Courier { partner: p, order: n, action, good_code } => {
                    if orders.is_empty() { continue; }
                    let o = &orders[n as usize % orders.len()];
                    let code = if good_code { o.pickup_code.clone() } else { "nope".into() };
                    let action = match action {
                        0 => CourierAction::Accept,
                        1 => CourierAction::Decline { reason: "too far".into() },
                        2 => CourierAction::PickedUp { pickup_code: code },
                        3 => CourierAction::Delivered { proof: "signature".into() },
                        _ => CourierAction::Failure { reason: "van broke down".into() },
                    };
                    let who = partner(p);
                    let before = h.state.dispatch(&o.order_id).cloned();
                    let result = h.run(HubCommand::Courier { partner: who.clone(), order_id: o.order_id.clone(), action: action.clone() });
                    if let Ok((events, _)) = &result {
                        for e in events {
                            if let HubEvent::PartnerSwapped { swap, .. } = e {
                                // Only the holder itself can cause a swap by its answer.
                                prop_assert_eq!(&swap.from, &who);
                                let own = matches!(swap.reason, SwapReason::Declined(_) | SwapReason::Failed(_));
                                prop_assert!(own, "{:?}", swap.reason);
                                let answered = matches!(action, CourierAction::Decline { .. } | CourierAction::Failure { .. });
                                prop_assert!(answered, "swapped by {:?}", action);
                            }
                        }
                    }
                    // Every update is idempotent: repeated at once, it returns the dispatch as it is.
                    if let Ok((_, HubReply::Dispatch(first))) = &result {
                        let again = h.run(HubCommand::Courier { partner: who.clone(), order_id: o.order_id.clone(), action: action.clone() });
                        let Ok((events, HubReply::Dispatch(second))) = again else {
                            return Err(TestCaseError::fail(format!("{action:?} repeated was refused: {again:?}")));
                        };
                        prop_assert!(events.is_empty(), "{:?} repeated changed {:?}", action, events);
                        prop_assert_eq!(first, &second);
                    }
                    // Only the holder moves a dispatch forward.
                    if before.as_ref().and_then(|d| d.stage.holder()) != Some(&who) {
                        if let Ok((events, _)) = &result {
                            prop_assert!(events.iter().all(|e| e.order_id() != Some(&o.order_id)), "{:?}", events);
                        }
                    }
                }
                Step::Advance(ms) => {
                    let now = UnixMillis(h.now.0 + ms as i64);
                    for e in h.advance(ms) {
                        if let HubEvent::PartnerSwapped { swap, .. } = e {
                            match swap.reason {
                                SwapReason::MissedAcceptDeadline | SwapReason::MissedPickupDeadline => {
                                    prop_assert!(swap.missed_deadline.is_some_and(|d| d <= now));
                                }
                                other => prop_assert!(false, "timer swapped for {:?}", other),
                            }
                        }
                    }
                }
                Step::Status { partner: p, status } => {
                    statuses[p as usize] = [PartnerStatus::Active, PartnerStatus::Probation, PartnerStatus::Suspended][status as usize];
                    let version = h.version + 1;
                    h.version = version;
                    let (events, _) = h.run(HubCommand::Setup(HubSetup { version, spec: hub_spec(3), roster: roster(&statuses) })).unwrap();
                    for e in events {
                        if let HubEvent::PartnerSwapped { swap, .. } = e {
                            prop_assert_eq!(swap.reason, SwapReason::PartnerUnavailable);
                        }
                    }
                }
                Step::Cancel(n) => {
                    if orders.is_empty() { continue; }
                    let o = &orders[n as usize % orders.len()];
                    let before = h.state.dispatch(&o.order_id).cloned().unwrap();
                    let result = h.run(HubCommand::Cancel {
        order: o.clone(),
        handed_over: false,
    });
                    let left_hub = matches!(before.stage, Stage::PickedUp { .. } | Stage::Delivered { .. } | Stage::Failed { .. });
                    prop_assert_eq!(result.is_err(), left_hub, "cancel refused exactly when the parcel left the hub");
                    if !left_hub {
                        let cancelled = matches!(h.state.dispatch(&o.order_id).unwrap().stage, Stage::Cancelled { .. });
                        prop_assert!(cancelled);
                        withdrawn.insert(o.order_id.clone());
                    }
                }
                Step::CancelBeforeHandOver => {
                    let o = order(orders.len() as u32, Fulfilment::Delivery, false, h.now);
                    orders.push(o.clone());
                    h.run(HubCommand::Cancel {
        order: o.clone(),
        handed_over: false,
    }).unwrap();
                    let (events, _) = h.run(HubCommand::Dispatch(o.clone())).unwrap();
                    prop_assert!(events.is_empty(), "a hand-over after the cancel creates nothing: {:?}", events);
                    withdrawn.insert(o.order_id);
                }
                Step::Restart => h.restart(),
            }
            for id in &withdrawn {
                let stage = &h.state.dispatch(id).unwrap().stage;
                prop_assert!(matches!(stage, Stage::Cancelled { .. }), "{} was withdrawn, now {:?}", id, stage);
            }
        }
        // Run the clock far ahead: everything ends delivered, or failed with a remedy.
        h.advance(10 * 24 * 3_600_000);
        for o in &orders {
            let d = h.state.dispatch(&o.order_id).unwrap();
            match &d.stage {
                Stage::Delivered { at, .. } => {
                    if *at > d.promised_by {
                        prop_assert!(d.remedies.iter().any(|r| r.kind == RemedyKind::LateDelivery));
                    }
                }
                Stage::Failed { .. } => {
                    let total: i64 = d.remedies.iter().map(|r| r.amount.minor_units).sum();
                    prop_assert_eq!(total, o.amount.minor_units, "a failed order is credited in full");
                }
                Stage::Cancelled { .. } => {}
                other => prop_assert!(false, "dispatch left {:?}", other),
            }
            let distinct: BTreeSet<_> = d.partners.iter().collect();
            prop_assert_eq!(distinct.len(), d.partners.len(), "never offered twice to the same partner");
        }
        h.restart();
    }
}
