//! A pop-up's till against random histories: reserves, payments, cancels, time passing,
//! the upstream's answers to uploads and changes of the lease. After every step: the till's
//! counters equal what its orders say; it never holds or sells more than its lease grants
//! (unless the upstream took units back after they were sold, which uploads then refuse);
//! an acknowledged sale is never lost and is settled at most once; replaying the events
//! rebuilds the same state.

use domain::sku::EdgeRefundReason;
use domain::till::*;
use domain::{Aggregate, CityName, Currency, DropId, HubId, Money, OrderId, Rejection, SkuId, UnixMillis};
use proptest::prelude::*;
use std::collections::BTreeMap;

fn terms(granted: u32, returned: u32, ended: bool) -> TillTerms {
    TillTerms {
        key_id: "lease-1".into(),
        hub_id: HubId::parse("porto-1").unwrap(),
        city: CityName::parse("Porto").unwrap(),
        price: Money::new(2_500, Currency::parse("EUR").unwrap()),
        granted,
        granted_max: 40,
        returned,
        booked: 0,
        started_at: UnixMillis(0),
        expires_at: UnixMillis(60_000),
        reconcile_window_ms: 20_000,
        ended,
    }
}

#[derive(Debug, Clone)]
enum Step {
    Reserve { quantity: u32, key: Option<u8> },
    Confirm { pick: usize, same_again: bool },
    Cancel { pick: usize },
    Advance { ms: u32 },
    Settle { pick: usize, outcome: u8 },
    TopUp { units: u32 },
    Return { units: u32 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => (1u32..4, proptest::option::weighted(0.3, 0u8..4)).prop_map(|(quantity, key)| Step::Reserve { quantity, key }),
        4 => (any::<usize>(), any::<bool>()).prop_map(|(pick, same_again)| Step::Confirm { pick, same_again }),
        1 => any::<usize>().prop_map(|pick| Step::Cancel { pick }),
        2 => (100u32..9_000).prop_map(|ms| Step::Advance { ms }),
        3 => (any::<usize>(), 0u8..4).prop_map(|(pick, outcome)| Step::Settle { pick, outcome }),
        1 => (1u32..5).prop_map(|units| Step::TopUp { units }),
        1 => (1u32..4).prop_map(|units| Step::Return { units }),
    ]
}

fn run(
    state: &mut TillState,
    log: &mut Vec<TillEvent>,
    command: TillCommand,
    now: UnixMillis,
) -> Result<TillReply, Rejection> {
    let (events, reply) = state.decide(command, now)?;
    for event in &events {
        state.apply(event);
    }
    log.extend(events);
    Ok(reply)
}

fn sales(state: &TillState) -> BTreeMap<OrderId, TillSale> {
    state
        .orders
        .iter()
        .filter_map(|(id, o)| match &o.state {
            TillOrderState::Sold(sale) => Some((id.clone(), sale.clone())),
            _ => None,
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn a_till_sells_within_its_lease_keeps_every_sale_and_replays_exactly(steps in proptest::collection::vec(step(), 1..150)) {
        let drop_id = DropId::parse("porto").unwrap();
        let sku_id = SkuId::parse("tee").unwrap();
        let initial = TillState::new(drop_id.clone(), sku_id.clone());
        let mut state = initial.clone();
        let mut log = Vec::new();
        let mut now = UnixMillis(1_000);
        let (mut granted, mut returned) = (10u32, 0u32);
        run(&mut state, &mut log, TillCommand::Mirror(terms(granted, returned, false)), now).unwrap();
        let mut next = 0u64;
        // Every sale acknowledged, as acknowledged, and the first settlement of each.
        let mut acknowledged: BTreeMap<OrderId, TillSale> = BTreeMap::new();
        let mut settled: BTreeMap<OrderId, Upload> = BTreeMap::new();
        // Whether the upstream took back units the till had already sold.
        let mut taken_back = false;
        for step in steps {
            match step {
                Step::Reserve { quantity, key } => {
                    next += 1;
                    let free = state.free();
                    let reply = run(&mut state, &mut log, TillCommand::Reserve {
                        order_id: OrderId::new(&drop_id, &sku_id, next),
                        quantity,
                        idempotency_key: key.map(|k| format!("k{k}")),
                        hold_ttl_ms: 5_000,
                    }, now);
                    if let Ok(TillReply::Order { order, terms }) = reply {
                        // Every order answer names the lease as the till holds it.
                        prop_assert_eq!(&terms, &state.terms);
                        if order.is_none() {
                            prop_assert!(free < quantity, "sold out with {free} free for {quantity}");
                        }
                    }
                }
                Step::Confirm { pick, same_again } => {
                    let holds: Vec<(OrderId, u32)> = state.orders.iter()
                        .filter(|(_, o)| matches!(o.state, TillOrderState::Held { .. }))
                        .map(|(id, o)| (id.clone(), o.quantity)).collect();
                    if holds.is_empty() { continue; }
                    let (order_id, quantity) = holds[pick % holds.len()].clone();
                    let confirm = TillCommand::Confirm {
                        order_id: order_id.clone(),
                        payment_reference: format!("card-{order_id}"),
                        amount: Money::new(2_500 * i64::from(quantity), Currency::parse("EUR").unwrap()),
                        pickup_code: "123456".into(),
                        offline: pick % 2 == 0,
                    };
                    if let Ok(TillReply::Order { order: Some((id, order)), terms }) = run(&mut state, &mut log, confirm.clone(), now) {
                        prop_assert_eq!(&terms, &state.terms);
                        let TillOrderState::Sold(sale) = order.state else { panic!("a confirm answered {order:?}") };
                        acknowledged.insert(id, sale);
                        if same_again {
                            // The same payment again answers the same sale and changes nothing.
                            let before = state.clone();
                            let again = run(&mut state, &mut log, confirm, now).unwrap();
                            prop_assert_eq!(&state, &before);
                            let TillReply::Order { order: Some(_), terms } = again else {
                                panic!("the same confirm again answered {again:?}")
                            };
                            prop_assert_eq!(&terms, &state.terms);
                        }
                    }
                }
                Step::Cancel { pick } => {
                    let ids: Vec<OrderId> = state.orders.keys().cloned().collect();
                    if ids.is_empty() { continue; }
                    let reply = run(&mut state, &mut log, TillCommand::Cancel { order_id: ids[pick % ids.len()].clone() }, now);
                    if let Ok(TillReply::Order { terms, .. }) = reply {
                        prop_assert_eq!(&terms, &state.terms);
                    }
                }
                Step::Advance { ms } => {
                    now = now.plus_ms(u64::from(ms));
                    if state.next_deadline().is_some_and(|d| d <= now) {
                        run(&mut state, &mut log, TillCommand::ExpireDue, now).unwrap();
                        prop_assert!(state.next_deadline().is_none_or(|d| d > now));
                    }
                }
                Step::Settle { pick, outcome } => {
                    let TillReply::Pending(pending) = run(&mut state, &mut log, TillCommand::Pending { max: 1_000 }, now).unwrap() else { panic!() };
                    if pending.is_empty() { continue; }
                    let (order_id, _) = pending[pick % pending.len()].clone();
                    let upload = match outcome {
                        0 | 1 => Upload::Booked,
                        2 => Upload::Refunded(EdgeRefundReason::ReconciledTooLate),
                        _ => Upload::Conflict,
                    };
                    // The upstream answers twice (a retried upload): the first answer holds.
                    let results = vec![(order_id.clone(), upload), (order_id.clone(), Upload::Booked)];
                    run(&mut state, &mut log, TillCommand::Settle { results: results.clone(), terms: None }, now).unwrap();
                    settled.entry(order_id.clone()).or_insert(upload);
                    run(&mut state, &mut log, TillCommand::Settle { results, terms: None }, now).unwrap();
                }
                Step::TopUp { units } => {
                    granted = (granted + units).min(40);
                    run(&mut state, &mut log, TillCommand::Mirror(terms(granted, returned, false)), now).unwrap();
                }
                Step::Return { units } => {
                    let before = state.figures();
                    returned = (returned + units).min(granted);
                    if before.sold + before.held > granted - returned {
                        taken_back = true;
                    }
                    run(&mut state, &mut log, TillCommand::Mirror(terms(granted, returned, false)), now).unwrap();
                }
            }
            state.check_invariants().map_err(TestCaseError::fail)?;
            let figures = state.figures();
            if !taken_back {
                prop_assert_eq!(figures.free + figures.held + figures.sold, granted - returned, "{:?}", figures);
            }
            // Every acknowledged sale is there as acknowledged; settled once, as first answered.
            let now_sales = sales(&state);
            for (id, sale) in &acknowledged {
                let kept = now_sales.get(id).expect("an acknowledged sale is kept");
                prop_assert_eq!((kept.quantity, kept.amount, &kept.payment_reference, kept.sold_at),
                    (sale.quantity, sale.amount, &sale.payment_reference, sale.sold_at));
                let expected = settled.get(id).copied().unwrap_or(Upload::Pending);
                prop_assert_eq!(kept.upload, expected);
            }
        }
        let mut replayed = initial;
        for event in &log {
            replayed.apply(event);
        }
        prop_assert_eq!(replayed, state);
    }
}

#[test]
fn an_ended_or_expired_lease_sells_nothing_and_sales_past_their_window_are_overdue() {
    let drop_id = DropId::parse("porto").unwrap();
    let sku_id = SkuId::parse("tee").unwrap();
    let mut state = TillState::new(drop_id.clone(), sku_id.clone());
    let mut log = Vec::new();
    let reserve = |n: u64| TillCommand::Reserve {
        order_id: OrderId::new(&drop_id, &sku_id, n),
        quantity: 1,
        idempotency_key: None,
        hold_ttl_ms: 5_000,
    };
    // No lease yet.
    assert!(matches!(
        run(&mut state, &mut log, reserve(1), UnixMillis(1_000)),
        Err(Rejection::FailedPrecondition(_))
    ));
    run(
        &mut state,
        &mut log,
        TillCommand::Mirror(terms(5, 0, false)),
        UnixMillis(1_000),
    )
    .unwrap();
    let TillReply::Order {
        order: Some((id, _)), ..
    } = run(&mut state, &mut log, reserve(2), UnixMillis(1_000)).unwrap()
    else {
        panic!()
    };
    run(
        &mut state,
        &mut log,
        TillCommand::Confirm {
            order_id: id.clone(),
            payment_reference: "card".into(),
            amount: Money::new(2_500, Currency::parse("EUR").unwrap()),
            pickup_code: "000001".into(),
            offline: true,
        },
        UnixMillis(2_000),
    )
    .unwrap();
    // The window (20 s) passes without an upload: overdue, still in the outbox.
    assert_eq!(state.next_deadline(), Some(UnixMillis(22_000)));
    run(&mut state, &mut log, TillCommand::ExpireDue, UnixMillis(22_000)).unwrap();
    let figures = state.figures();
    assert_eq!(
        (figures.overdue_sales, figures.pending_sales, figures.offline_sales),
        (1, 1, 1)
    );
    // At or after the expiry the stall sells nothing.
    assert!(matches!(
        run(&mut state, &mut log, reserve(3), UnixMillis(60_000)),
        Err(Rejection::FailedPrecondition(_))
    ));
    // Nor once the upstream ended the lease.
    run(
        &mut state,
        &mut log,
        TillCommand::Mirror(terms(5, 0, true)),
        UnixMillis(30_000),
    )
    .unwrap();
    assert_eq!(state.free(), 0);
    assert!(matches!(
        run(&mut state, &mut log, reserve(4), UnixMillis(30_000)),
        Err(Rejection::FailedPrecondition(_))
    ));
    state.check_invariants().unwrap();
}
