//! Property tests of the SKU state machine: random command sequences (reserves, some pinned
//! to a hub, confirms, cancels, expiries, restocks, closes, idempotent retries and restarts)
//! checked after every step against the invariants and a simple reference model: stock is
//! conserved, no waitlisted request could be served from free stock, and a new one-unit
//! buyer gets what the city's free and held stock says (what buyers' stock levels show).

use domain::drop::{DropSpec, PoolSpec, SaleStatus, SkuSpec};
use domain::sku::*;
use domain::*;
use proptest::prelude::*;
use std::collections::HashMap;

/// A buyer who never reserves in the generated steps: probes what a newcomer would get.
const NEWCOMER: u8 = 200;

fn spec(pools: &[(&str, &str, u32)], per_buyer_limit: u32) -> DropSpec {
    DropSpec {
        drop_id: DropId::parse("d1").unwrap(),
        creator_id: CreatorId::parse("c1").unwrap(),
        title: "test drop".into(),
        opens_at: UnixMillis(1_000),
        closes_at: UnixMillis(10_000_000),
        hold_ttl_ms: 5_000,
        terms: Default::default(),
        skus: vec![SkuSpec {
            sku_id: SkuId::parse("s1").unwrap(),
            name: "hoodie".into(),
            price: Money::new(2_500, Currency::parse("EUR").unwrap()),
            per_buyer_limit,
            pools: pools
                .iter()
                .map(|(hub, city, n)| PoolSpec {
                    hub_id: HubId::parse(hub).unwrap(),
                    city: CityName::parse(city).unwrap(),
                    allocated: *n,
                })
                .collect(),
        }],
    }
}

fn new_sku(pools: &[(&str, &str, u32)], per_buyer_limit: u32) -> SkuState {
    let drop = spec(pools, per_buyer_limit);
    let mut sku = SkuState::new(&drop, &drop.skus[0]);
    sku.apply(&SkuEvent::SaleStatusSet {
        status: SaleStatus::Open,
        at: UnixMillis(1_000),
    });
    sku
}

fn buyer(i: u8) -> BuyerRef {
    BuyerRef::from_hash_hex(format!("{i:032x}"))
}

fn order_id(id: u64) -> OrderId {
    OrderId::new(&DropId::parse("d1").unwrap(), &SkuId::parse("s1").unwrap(), id)
}

/// `quantity` units for buyer `b` in `city`, at `hub` if named, waitlist allowed.
fn wanting(b: u8, city: &str, quantity: u32, hub: Option<&str>, allow_partial: bool) -> ReserveParams {
    ReserveParams {
        storefront: storefront(),
        buyer: buyer(b),
        city: CityName::parse(city).unwrap(),
        hub_id: hub.map(|h| HubId::parse(h).unwrap()),
        quantity,
        allow_partial,
        join_waitlist: true,
    }
}

fn storefront() -> StorefrontId {
    StorefrontId::parse("web").unwrap()
}

/// One unit for buyer `b` in Lisbon, waitlist allowed, as order `id` of SKU s1.
fn lisbon_reserve(id: u64, b: u8, key: Option<&str>) -> SkuCommand {
    SkuCommand::Reserve(ReserveCommand {
        order_id: order_id(id),
        params: wanting(b, "Lisbon", 1, None, false),
        idempotency_key: key.map(|k| IdempotencyKey::parse(k).unwrap()),
    })
}

#[derive(Debug, Clone)]
enum Step {
    Reserve {
        buyer: u8,
        city: u8,
        quantity: u32,
        /// One of the city's hubs, by position among them, if the buyer names one.
        hub: Option<u8>,
        allow_partial: bool,
        join_waitlist: bool,
        key: Option<u8>,
    },
    Confirm {
        pick: usize,
    },
    Cancel {
        pick: usize,
    },
    Advance {
        ms: u32,
    },
    Restock {
        pool: u8,
        quantity: u32,
    },
    Close,
    Restart,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        // Up to 4 units: more than some pools ever hold, so requests wait that only a restock
        // can serve.
        6 => (0u8..6, 0u8..2, 1u32..5, proptest::option::weighted(0.3, 0u8..2), any::<bool>(), any::<bool>(), proptest::option::of(0u8..8))
            .prop_map(|(buyer, city, quantity, hub, allow_partial, join_waitlist, key)| Step::Reserve { buyer, city, quantity, hub, allow_partial, join_waitlist, key }),
        3 => any::<usize>().prop_map(|pick| Step::Confirm { pick }),
        2 => any::<usize>().prop_map(|pick| Step::Cancel { pick }),
        2 => (500u32..7_000).prop_map(|ms| Step::Advance { ms }),
        1 => (0u8..3, 1u32..4).prop_map(|(pool, quantity)| Step::Restock { pool, quantity }),
        1 => Just(Step::Restart),
        // Rare: closing ends most of the interesting behaviour.
        1 => prop::bool::weighted(0.1).prop_map(|close| if close { Step::Close } else { Step::Restart }),
    ]
}

const POOLS: [(&str, &str, u32); 3] = [("hub-a1", "Lisbon", 3), ("hub-a2", "Lisbon", 2), ("hub-b1", "Porto", 4)];
const CITIES: [&str; 2] = ["Lisbon", "Porto"];

/// The index in `POOLS` of the `hub`-th hub of `city` (wrapping: Porto has one).
fn pool_of_city(city: &str, hub: u8) -> usize {
    let pools: Vec<usize> = (0..POOLS.len()).filter(|&i| POOLS[i].1 == city).collect();
    pools[hub as usize % pools.len()]
}

/// The reference model's waitlist rule: a request can be served when a pool it may use (its
/// pinned hub's, or any of its city's) has all it asked for free, or, if it allows a partial
/// hold, anything free. Returns the waitlisted requests that could be served now.
fn servable_waitlisted(state: &SkuState, pins: &HashMap<OrderId, usize>) -> Vec<OrderId> {
    state
        .orders
        .values()
        .filter(|o| o.status == OrderStatus::Waitlisted)
        .filter(|o| {
            state.pools.iter().enumerate().any(|(i, p)| {
                p.city == o.city
                    && pins.get(&o.order_id).is_none_or(|&pin| pin == i)
                    && (p.available >= o.requested || (o.allow_partial && p.available > 0))
            })
        })
        .map(|o| o.order_id.clone())
        .collect()
}

/// Runs a command: applies its events to the state and the log, returns the reply.
fn run(
    state: &mut SkuState,
    log: &mut Vec<SkuEvent>,
    command: SkuCommand,
    now: UnixMillis,
) -> Result<SkuReply, Rejection> {
    let before = state.clone();
    match state.decide(command, now) {
        Ok((events, reply)) => {
            for event in &events {
                state.apply(event);
            }
            log.extend(events);
            Ok(reply)
        }
        Err(rejection) => {
            assert_eq!(&before, state, "decide must not change the state");
            Err(rejection)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn sku_never_oversells_and_replays_exactly(steps in proptest::collection::vec(step(), 1..120)) {
        let initial = new_sku(&POOLS, 4);
        let mut state = initial.clone();
        let mut log: Vec<SkuEvent> = Vec::new();
        let mut now = UnixMillis(2_000);
        let mut next_id = 0u64;
        let mut order_ids: Vec<OrderId> = Vec::new();
        // Reference model: allocation grows only by restocks; what is sold is exactly what
        // confirms added minus what cancels of confirmed orders removed.
        let mut model_allocated: u32 = POOLS.iter().map(|p| p.2).sum();
        let mut model_sold: HashMap<OrderId, u32> = HashMap::new();
        let mut keys: HashMap<u8, (ReserveParams, Reservation)> = HashMap::new();
        // Which pool each pinned request named, as the buyer asked: it may only be served there.
        let mut pins: HashMap<OrderId, usize> = HashMap::new();

        for step in steps {
            match step {
                Step::Reserve { buyer: b, city, quantity, hub, allow_partial, join_waitlist, key } => {
                    next_id += 1;
                    let city = CITIES[city as usize];
                    let pin = hub.map(|h| pool_of_city(city, h));
                    let hub_id = pin.map(|i| HubId::parse(POOLS[i].0).unwrap());
                    let params = ReserveParams { storefront: storefront(), buyer: buyer(b), city: CityName::parse(city).unwrap(), hub_id, quantity, allow_partial, join_waitlist };
                    let cmd = ReserveCommand {
                        order_id: OrderId::new(&state.drop_id, &state.sku_id, next_id),
                        params: params.clone(),
                        idempotency_key: key.map(|k| IdempotencyKey::parse(&format!("key-{k}")).unwrap()),
                    };
                    let result = run(&mut state, &mut log, SkuCommand::Reserve(cmd), now);
                    if let (Some(k), Some((old_params, old_reply))) = (key, keys.get(&key.unwrap_or(0)).cloned().filter(|_| key.is_some())) {
                        // A reused key returns the first result, or is refused if the request differs.
                        if old_params == params {
                            prop_assert_eq!(result.clone(), Ok(SkuReply::Reservation(old_reply)));
                        } else {
                            prop_assert!(matches!(result, Err(Rejection::IdempotencyKeyReused { .. })), "key {} reused: {:?}", k, result);
                        }
                    } else if let (Some(k), Ok(SkuReply::Reservation(r))) = (key, &result) {
                        keys.insert(k, (params.clone(), r.clone()));
                    }
                    if let Ok(SkuReply::Reservation(r)) = &result {
                        prop_assert!(r.quantity_held <= quantity);
                        if r.outcome == ReserveOutcome::Held { prop_assert_eq!(r.quantity_held, quantity); }
                        if let Some(id) = &r.order_id {
                            if !order_ids.contains(id) { order_ids.push(id.clone()); }
                            if let Some(pin) = pin { pins.entry(id.clone()).or_insert(pin); }
                        }
                    }
                    if let Err(Rejection::BuyerLimitReached { limit, active }) = &result {
                        prop_assert!(active + quantity > *limit);
                    }
                }
                Step::Confirm { pick } if !order_ids.is_empty() => {
                    let id = order_ids[pick % order_ids.len()].clone();
                    let quantity = state.orders[&id].quantity;
                    let cmd = ConfirmCommand {
                        order_id: id.clone(),
                        storefront: Some(storefront()),
                        address_digest: None,
                        payment_reference: format!("pay-{id}"),
                        amount: state.price.times(quantity).unwrap(),
                        fulfilment: Fulfilment::Pickup,
                        discreet: false,
                        pickup_code: "123456".into(),
                        receipt_token: "tok".into(),
                    };
                    let was_confirmed = state.orders[&id].status == OrderStatus::Confirmed;
                    let result = run(&mut state, &mut log, SkuCommand::Confirm(cmd), now);
                    if let Ok(SkuReply::Order(view)) = &result {
                        prop_assert_eq!(view.status, OrderStatus::Confirmed);
                        if !was_confirmed { model_sold.insert(id, view.quantity); }
                    }
                }
                Step::Cancel { pick } if !order_ids.is_empty() => {
                    let id = order_ids[pick % order_ids.len()].clone();
                    if let Ok(SkuReply::Order(view)) = run(&mut state, &mut log, SkuCommand::Cancel { order_id: id.clone(), storefront: None, withdrawn: true }, now) {
                        prop_assert!(view.status.is_final());
                        model_sold.remove(&id);
                    }
                }
                Step::Confirm { .. } | Step::Cancel { .. } => {}
                Step::Advance { ms } => {
                    now = now.plus_ms(u64::from(ms));
                    run(&mut state, &mut log, SkuCommand::ExpireDue, now).unwrap();
                    prop_assert!(state.next_deadline().is_none_or(|t| t > now), "nothing due is left after ExpireDue");
                }
                Step::Restock { pool, quantity } => {
                    let hub = HubId::parse(POOLS[pool as usize].0).unwrap();
                    let cmd = RestockCommand { hub_id: hub, city: None, quantity, idempotency_key: None };
                    if run(&mut state, &mut log, SkuCommand::Restock(cmd), now).is_ok() { model_allocated += quantity; }
                }
                Step::Close => {
                    run(&mut state, &mut log, SkuCommand::SetSaleStatus(SaleStatus::Closed), now).unwrap();
                    prop_assert!(state.waitlists.is_empty());
                }
                Step::Restart => {
                    // A restart rebuilds the state by replaying the journal from the start.
                    let mut replayed = initial.clone();
                    for event in &log { replayed.apply(event); }
                    prop_assert_eq!(&replayed, &state);
                    state = replayed;
                }
            }
            if let Err(broken) = state.check_invariants() { prop_assert!(false, "invariant broken: {}", broken); }
            let allocated: u32 = state.pools.iter().map(|p| p.allocated).sum();
            let sold: u32 = state.pools.iter().map(|p| p.sold).sum();
            prop_assert_eq!(allocated, model_allocated);
            prop_assert_eq!(sold, model_sold.values().sum::<u32>());
            prop_assert!(sold <= allocated);

            // The waitlist never strands stock: while the sale is open, no waitlisted request
            // could be served from what is free, and the SKU's own check agrees.
            let open = state.effective_sale(now) == SaleStatus::Open;
            let stranded = if open { servable_waitlisted(&state, &pins) } else { Vec::new() };
            prop_assert!(stranded.is_empty(), "waitlisted but servable: {:?}", stranded);
            prop_assert_eq!(state.check_waitlist(now), Ok(()));
            // Pinned requests are only ever served at their hub.
            for (id, pin) in &pins {
                let order = &state.orders[id];
                if order.status != OrderStatus::Waitlisted {
                    prop_assert_eq!(order.pool, Some(*pin), "{} served away from its pinned hub", id);
                }
            }
            // What a new one-unit buyer of each city would get, as buyers' stock levels tell it:
            // held when any of the city's stock is free, waitlisted when none is free but some
            // is held, sold out when neither.
            for city in CITIES {
                let pools = state.pools.iter().filter(|p| p.city.as_str() == city);
                let (available, held) = pools.fold((0, 0), |(a, h), p| (a + p.available, h + p.held));
                let probe = SkuCommand::Reserve(ReserveCommand {
                    order_id: OrderId::new(&state.drop_id, &state.sku_id, u64::MAX),
                    params: ReserveParams { storefront: storefront(), buyer: buyer(NEWCOMER), city: CityName::parse(city).unwrap(), hub_id: None, quantity: 1, allow_partial: false, join_waitlist: true },
                    idempotency_key: None,
                });
                let outcome = match state.decide(probe, now) {
                    Ok((_, SkuReply::Reservation(r))) => Some(r.outcome),
                    Ok((_, other)) => panic!("a reserve answered {other:?}"),
                    Err(_) => None,
                };
                let expected = if !open {
                    None
                } else if available > 0 {
                    Some(ReserveOutcome::Held)
                } else if held > 0 {
                    Some(ReserveOutcome::Waitlisted)
                } else {
                    Some(ReserveOutcome::SoldOut)
                };
                prop_assert_eq!(outcome, expected, "a newcomer to {} with {} free and {} held", city, available, held);
            }
        }
    }
}

#[test]
fn expiry_returns_stock_and_promotes_the_waitlist_head() {
    let mut sku = new_sku(&[("hub-a1", "Lisbon", 1)], 2);
    let mut log = Vec::new();
    let reserve = |id: u64, b: u8| lisbon_reserve(id, b, None);
    let first = run(&mut sku, &mut log, reserve(1, 1), UnixMillis(2_000)).unwrap();
    let second = run(&mut sku, &mut log, reserve(2, 2), UnixMillis(2_100)).unwrap();
    let SkuReply::Reservation(first) = first else { panic!() };
    let SkuReply::Reservation(second) = second else {
        panic!()
    };
    assert_eq!(first.outcome, ReserveOutcome::Held);
    assert_eq!(second.outcome, ReserveOutcome::Waitlisted);
    assert_eq!(second.waitlist_position, Some(1));
    assert_eq!(sku.next_deadline(), Some(UnixMillis(7_000)));

    run(&mut sku, &mut log, SkuCommand::ExpireDue, UnixMillis(7_000)).unwrap();
    let promoted = &sku.orders[second.order_id.as_ref().unwrap()];
    assert_eq!(promoted.status, OrderStatus::Held);
    assert_eq!(promoted.expires_at, Some(UnixMillis(12_000)));
    assert_eq!(
        sku.orders[first.order_id.as_ref().unwrap()].status,
        OrderStatus::Expired
    );
    assert_eq!(sku.pools[0].held, 1);
    sku.check_invariants().unwrap();
}

#[test]
fn confirm_after_expiry_is_refused_and_changes_nothing() {
    let mut sku = new_sku(&[("hub-a1", "Lisbon", 5)], 2);
    let mut log = Vec::new();
    let id = OrderId::new(&sku.drop_id, &sku.sku_id, 9);
    let params = ReserveParams {
        storefront: storefront(),
        buyer: buyer(1),
        city: CityName::parse("Lisbon").unwrap(),
        hub_id: None,
        quantity: 2,
        allow_partial: false,
        join_waitlist: false,
    };
    run(
        &mut sku,
        &mut log,
        SkuCommand::Reserve(ReserveCommand {
            order_id: id.clone(),
            params,
            idempotency_key: None,
        }),
        UnixMillis(2_000),
    )
    .unwrap();
    let confirm = ConfirmCommand {
        order_id: id,
        storefront: None,
        address_digest: None,
        payment_reference: "p".into(),
        amount: Money::new(5_000, Currency::parse("EUR").unwrap()),
        fulfilment: Fulfilment::Pickup,
        discreet: true,
        pickup_code: "1".into(),
        receipt_token: "t".into(),
    };
    let late = run(
        &mut sku,
        &mut log,
        SkuCommand::Confirm(confirm.clone()),
        UnixMillis(7_000),
    );
    assert!(
        matches!(&late, Err(Rejection::FailedPrecondition(why)) if why.contains("expired") && why.contains("order d1.")),
        "{late:?}"
    );
    let wrong_amount = ConfirmCommand {
        amount: Money::new(1, Currency::parse("EUR").unwrap()),
        ..confirm.clone()
    };
    assert!(matches!(
        run(&mut sku, &mut log, SkuCommand::Confirm(wrong_amount), UnixMillis(3_000)),
        Err(Rejection::InvalidArgument(_))
    ));
    assert!(run(&mut sku, &mut log, SkuCommand::Confirm(confirm), UnixMillis(3_000)).is_ok());
}

#[test]
fn reserve_before_open_and_over_the_buyer_limit_is_refused() {
    let drop = spec(&[("hub-a1", "Lisbon", 5)], 2);
    let scheduled = SkuState::new(&drop, &drop.skus[0]);
    let params = ReserveParams {
        storefront: storefront(),
        buyer: buyer(1),
        city: CityName::parse("Lisbon").unwrap(),
        hub_id: None,
        quantity: 2,
        allow_partial: false,
        join_waitlist: false,
    };
    let cmd = ReserveCommand {
        order_id: OrderId::new(&drop.drop_id, &drop.skus[0].sku_id, 1),
        params,
        idempotency_key: None,
    };
    assert!(matches!(
        scheduled.decide(SkuCommand::Reserve(cmd.clone()), UnixMillis(500)),
        Err(Rejection::FailedPrecondition(_))
    ));
    // A scheduled drop opens by itself at opens_at.
    assert!(scheduled
        .decide(SkuCommand::Reserve(cmd.clone()), UnixMillis(1_000))
        .is_ok());
    let mut open = new_sku(&[("hub-a1", "Lisbon", 5)], 2);
    let mut log = Vec::new();
    run(&mut open, &mut log, SkuCommand::Reserve(cmd.clone()), UnixMillis(2_000)).unwrap();
    let again = ReserveCommand {
        order_id: OrderId::new(&drop.drop_id, &drop.skus[0].sku_id, 2),
        ..cmd
    };
    assert_eq!(
        run(&mut open, &mut log, SkuCommand::Reserve(again), UnixMillis(2_000)),
        Err(Rejection::BuyerLimitReached { limit: 2, active: 2 })
    );
}

/// Confirms one unit (2,500 EUR) of a held order for pickup with code 123456.
fn pickup_confirm(order_id: &OrderId) -> SkuCommand {
    SkuCommand::Confirm(ConfirmCommand {
        order_id: order_id.clone(),
        storefront: None,
        address_digest: None,
        payment_reference: "p".into(),
        amount: Money::new(2_500, Currency::parse("EUR").unwrap()),
        fulfilment: Fulfilment::Pickup,
        discreet: false,
        pickup_code: "123456".into(),
        receipt_token: "t".into(),
    })
}

#[test]
fn confirmed_orders_stay_in_the_outbox_until_their_hub_acknowledges_them() {
    let mut sku = new_sku(&[("hub-a1", "Lisbon", 5)], 2);
    let mut log = Vec::new();
    let id = OrderId::new(&sku.drop_id, &sku.sku_id, 3);
    let params = ReserveParams {
        storefront: storefront(),
        buyer: buyer(1),
        city: CityName::parse("Lisbon").unwrap(),
        hub_id: None,
        quantity: 1,
        allow_partial: false,
        join_waitlist: false,
    };
    let reserve = SkuCommand::Reserve(ReserveCommand {
        order_id: id.clone(),
        params,
        idempotency_key: None,
    });
    run(&mut sku, &mut log, reserve, UnixMillis(2_000)).unwrap();
    run(&mut sku, &mut log, pickup_confirm(&id), UnixMillis(3_000)).unwrap();
    assert!(sku.handover.contains(&id));
    let (hub, order) = sku.dispatch_order(&id).expect("a confirmed order can be dispatched");
    assert_eq!((hub.as_str(), order.pickup_code.as_str()), ("hub-a1", "123456"));
    // Unacknowledged: the SKU has a deadline to send it again, even when passivated.
    let due = sku.next_deadline().expect("a retry deadline");
    assert_eq!(due, UnixMillis(3_000 + domain::limits::HANDOVER_RETRY_MS));
    run(&mut sku, &mut log, SkuCommand::ExpireDue, due).unwrap();
    assert!(matches!(log.last(), Some(SkuEvent::HandoverRetry { .. })));
    assert!(sku.next_deadline().unwrap() > due);
    // Acknowledged: out of the outbox, no deadline left; a duplicate ack changes nothing.
    let ack = SkuCommand::HandedOver {
        orders: vec![(id.clone(), false)],
    };
    run(&mut sku, &mut log, ack.clone(), UnixMillis(40_000)).unwrap();
    assert!(sku.handover.is_empty());
    // The sale still waits for the creator's ledger: the retry deadline stays until it is
    // booked; an acknowledgement of another state of the order (cancelled) does not count.
    assert!(sku.next_deadline().is_some());
    let facts = sku.sale_facts(&id).expect("sale facts of a confirmed order");
    assert_eq!((facts.gross.minor_units, facts.cancelled_at), (2_500, None));
    let stale = SkuCommand::LedgerSynced {
        orders: vec![(id.clone(), true)],
    };
    run(&mut sku, &mut log, stale, UnixMillis(40_500)).unwrap();
    assert!(sku.ledger_outbox.contains_key(&id));
    let booked = SkuCommand::LedgerSynced {
        orders: vec![(id.clone(), false)],
    };
    run(&mut sku, &mut log, booked, UnixMillis(40_600)).unwrap();
    assert!(sku.ledger_outbox.is_empty());
    assert_eq!(sku.next_deadline(), None);
    let before = log.len();
    run(&mut sku, &mut log, ack, UnixMillis(41_000)).unwrap();
    assert_eq!(log.len(), before);
}

/// A cancel asks the hub first; the SKU's outbox then tells the hub again (at least once), so
/// a lost call, or an order confirmed while it was being cancelled, still reaches the hub.
#[test]
fn a_cancelled_order_stays_in_the_outbox_until_its_hub_acknowledges_the_withdrawal() {
    let mut sku = new_sku(&[("hub-a1", "Lisbon", 5)], 2);
    let mut log = Vec::new();
    let id = OrderId::new(&sku.drop_id, &sku.sku_id, 1);
    run(&mut sku, &mut log, lisbon_reserve(1, 1, None), UnixMillis(2_000)).unwrap();
    run(&mut sku, &mut log, pickup_confirm(&id), UnixMillis(3_000)).unwrap();
    assert!(matches!(
        sku.handover_command(&id),
        Some((_, domain::hub::HubCommand::Dispatch(_)))
    ));
    // Not before its hub has withdrawn the dispatch (a cancel that raced the confirm): the
    // order stays confirmed and nothing changes.
    let early = SkuCommand::Cancel {
        order_id: id.clone(),
        storefront: None,
        withdrawn: false,
    };
    let before = log.len();
    assert!(matches!(
        run(&mut sku, &mut log, early, UnixMillis(3_500)),
        Err(Rejection::FailedPrecondition(_))
    ));
    assert_eq!(log.len(), before);
    let cancel = SkuCommand::Cancel {
        order_id: id.clone(),
        storefront: None,
        withdrawn: true,
    };
    run(&mut sku, &mut log, cancel, UnixMillis(4_000)).unwrap();
    let Some((
        hub,
        domain::hub::HubCommand::Cancel {
            order,
            handed_over: false,
        },
    )) = sku.handover_command(&id)
    else {
        panic!("a cancelled order's hub is told to withdraw it");
    };
    assert_eq!((hub.as_str(), &order.order_id), ("hub-a1", &id));
    // The hand-over that crossed the cancel is acknowledged: the withdrawal stays queued.
    let crossed = SkuCommand::HandedOver {
        orders: vec![(id.clone(), false)],
    };
    run(&mut sku, &mut log, crossed, UnixMillis(4_100)).unwrap();
    assert!(sku.handover.contains(&id));
    assert!(sku.next_deadline().is_some(), "a retry deadline while it waits");
    let withdrawn = SkuCommand::HandedOver {
        orders: vec![(id.clone(), true)],
    };
    run(&mut sku, &mut log, withdrawn, UnixMillis(4_200)).unwrap();
    assert!(sku.handover.is_empty());
    let mut replayed = new_sku(&[("hub-a1", "Lisbon", 5)], 2);
    for e in &log {
        replayed.apply(e);
    }
    assert_eq!(replayed, sku, "replaying the journal rebuilds the same SKU");
}

/// `entries` is what spaces an actor's snapshots: it must grow with everything a snapshot
/// writes, keys and waitlists included, not only with orders.
#[test]
fn entries_count_orders_keys_buyers_deadlines_and_waitlists() {
    let mut sku = new_sku(&[("hub-a1", "Lisbon", 1)], 1);
    let mut log = Vec::new();
    assert_eq!(sku.entries(), 0);
    let reserve = |id: u64, b: u8, key: &str| lisbon_reserve(id, b, Some(key));
    // A hold: its order, its key, its buyer's count and its expiry.
    run(&mut sku, &mut log, reserve(1, 1, "k-1"), UnixMillis(2_000)).unwrap();
    assert_eq!(sku.entries(), 4);
    // A waitlist place: its order, its key, its buyer's count and its place in the queue.
    run(&mut sku, &mut log, reserve(2, 2, "k-2"), UnixMillis(2_100)).unwrap();
    assert_eq!(sku.entries(), 8);
    // A retry with the same key adds nothing.
    run(&mut sku, &mut log, reserve(3, 2, "k-2"), UnixMillis(2_200)).unwrap();
    assert_eq!(sku.entries(), 8);
}

/// A SKU sold in Porto with its journal, checked after every command as the property test
/// checks it: invariants, the waitlist rule, and replaying the journal rebuilds the state.
/// Buyer `n` places order `n`.
struct Porto {
    initial: SkuState,
    state: SkuState,
    log: Vec<SkuEvent>,
}

impl Porto {
    fn new(pools: &[(&str, u32)]) -> Porto {
        let pools: Vec<(&str, &str, u32)> = pools.iter().map(|&(hub, n)| (hub, "Porto", n)).collect();
        let initial = new_sku(&pools, 10);
        Porto {
            state: initial.clone(),
            initial,
            log: Vec::new(),
        }
    }

    fn run(&mut self, command: SkuCommand) -> SkuReply {
        let now = UnixMillis(2_000);
        let reply = run(&mut self.state, &mut self.log, command, now).expect("command accepted");
        self.state.check_invariants().unwrap();
        self.state.check_waitlist(now).unwrap();
        let mut replayed = self.initial.clone();
        for event in &self.log {
            replayed.apply(event);
        }
        assert_eq!(replayed, self.state);
        reply
    }

    fn reserve(&mut self, n: u8, quantity: u32, hub: Option<&str>, allow_partial: bool) -> Reservation {
        let command = SkuCommand::Reserve(ReserveCommand {
            order_id: order_id(n.into()),
            params: wanting(n, "Porto", quantity, hub, allow_partial),
            idempotency_key: None,
        });
        match self.run(command) {
            SkuReply::Reservation(reservation) => reservation,
            other => panic!("not a reservation: {other:?}"),
        }
    }

    fn cancel(&mut self, n: u8) {
        self.run(SkuCommand::Cancel {
            order_id: order_id(n.into()),
            storefront: None,
            withdrawn: true,
        });
    }

    fn restock(&mut self, hub: &str, quantity: u32) {
        let hub_id = HubId::parse(hub).unwrap();
        self.run(SkuCommand::Restock(RestockCommand {
            hub_id,
            city: None,
            quantity,
            idempotency_key: None,
        }));
    }

    /// Order `n`'s status, units and hub, and its waitlist place.
    fn order(&self, n: u8) -> ((OrderStatus, u32, Option<HubId>), Option<u32>) {
        let view = self.state.order_view(&self.state.orders[&order_id(n.into())]);
        ((view.status, view.quantity, view.hub_id), view.waitlist_position)
    }
}

fn at(hub: &str) -> Option<HubId> {
    Some(HubId::parse(hub).unwrap())
}

use OrderStatus::{Held, Waitlisted};

#[test]
fn a_request_larger_than_the_stock_waits_without_stranding_it() {
    let mut porto = Porto::new(&[("hub-p1", 5)]);
    let big = porto.reserve(1, 7, None, false);
    assert_eq!(
        (big.outcome, big.waitlist_position),
        (ReserveOutcome::Waitlisted, Some(1))
    );
    let small = porto.reserve(2, 1, None, false);
    assert_eq!((small.outcome, small.quantity_held), (ReserveOutcome::Held, 1));
    let behind = porto.reserve(3, 6, None, false);
    assert_eq!(
        (behind.outcome, behind.waitlist_position),
        (ReserveOutcome::Waitlisted, Some(2))
    );
    // Stock coming back that is still too little for the big request leaves it waiting at
    // the head; enough of it promotes it.
    porto.cancel(2);
    assert_eq!(porto.order(1), ((Waitlisted, 0, None), Some(1)));
    assert_eq!(porto.state.pools[0].available, 5);
    porto.restock("hub-p1", 2);
    assert_eq!(porto.order(1), ((Held, 7, at("hub-p1")), None));
    assert_eq!(porto.order(3), ((Waitlisted, 0, None), Some(1)));
}

#[test]
fn a_request_passed_over_keeps_its_place_and_the_ones_behind_are_served() {
    let mut porto = Porto::new(&[("hub-p1", 2)]);
    porto.reserve(1, 2, None, false);
    porto.reserve(2, 3, None, false);
    porto.reserve(3, 1, None, false);
    porto.reserve(4, 1, None, false);
    // Two units back: the 3-unit head cannot have them, the two 1-unit requests behind can.
    porto.cancel(1);
    assert_eq!(porto.order(3).0, (Held, 1, at("hub-p1")));
    assert_eq!(porto.order(4).0, (Held, 1, at("hub-p1")));
    assert_eq!(porto.order(2), ((Waitlisted, 0, None), Some(1)));
}

#[test]
fn a_request_pinned_to_an_empty_hub_never_blocks_the_other_hub() {
    let mut porto = Porto::new(&[("hub-p1", 1), ("hub-p2", 3)]);
    assert_eq!(porto.reserve(1, 1, Some("hub-p1"), false).outcome, ReserveOutcome::Held);
    let pinned = porto.reserve(2, 1, Some("hub-p1"), false);
    assert_eq!((pinned.outcome, pinned.hub_id), (ReserveOutcome::Waitlisted, None));
    // The pin is journaled and kept, but not shown as the order's hub: no unit is there yet.
    assert!(matches!(porto.log.last(), Some(SkuEvent::WaitlistedAtHub { hub_id, .. }) if hub_id.as_str() == "hub-p1"));
    assert_eq!(porto.state.orders[&order_id(2)].pool, Some(0));
    assert_eq!(porto.order(2), ((Waitlisted, 0, None), Some(1)));
    let other = porto.reserve(3, 1, None, false);
    assert_eq!((other.outcome, other.hub_id), (ReserveOutcome::Held, at("hub-p2")));
    // The pinned hub sells out; the other hub still serves the city.
    porto.run(SkuCommand::Confirm(ConfirmCommand {
        order_id: order_id(1),
        storefront: None,
        address_digest: None,
        payment_reference: "pay-1".into(),
        amount: porto.state.price,
        fulfilment: Fulfilment::Pickup,
        discreet: false,
        pickup_code: "123456".into(),
        receipt_token: "t".into(),
    }));
    let after = porto.reserve(4, 1, None, false);
    assert_eq!((after.outcome, after.hub_id), (ReserveOutcome::Held, at("hub-p2")));
    // Stock back at the other hub is not the pinned request's to take …
    porto.cancel(3);
    assert_eq!(porto.order(2), ((Waitlisted, 0, None), Some(1)));
    assert_eq!(porto.state.pools[1].available, 2);
    // … stock back at its own hub is.
    porto.restock("hub-p1", 1);
    assert_eq!(porto.order(2), ((Held, 1, at("hub-p1")), None));
}

#[test]
fn a_head_that_allows_partial_holds_is_offered_what_is_free() {
    let mut porto = Porto::new(&[("hub-p1", 2)]);
    porto.reserve(1, 2, None, false);
    assert_eq!(porto.reserve(2, 3, None, true).outcome, ReserveOutcome::Waitlisted);
    porto.reserve(3, 1, None, false);
    porto.cancel(1);
    assert_eq!(porto.order(2), ((Held, 2, at("hub-p1")), None));
    assert_eq!(porto.state.orders[&order_id(2)].requested, 3);
    // The unit it did not get is no longer counted against its buyer.
    assert_eq!(porto.state.buyer_active.get(&buyer(2)), Some(&2));
    assert_eq!(porto.order(3), ((Waitlisted, 0, None), Some(1)));
}

/// A SKU taken over by a node whose clock is behind the former owner's: its figures still
/// say they are the latest, so caches that keep the later of two figures take them.
#[test]
fn figures_change_time_never_goes_back_when_a_later_owner_s_clock_is_behind() {
    let mut sku = new_sku(&[("hub-a1", "Lisbon", 5)], 2);
    let mut log = Vec::new();
    run(&mut sku, &mut log, lisbon_reserve(1, 1, None), UnixMillis(9_000)).unwrap();
    let before = sku.figures();
    run(&mut sku, &mut log, lisbon_reserve(2, 2, None), UnixMillis(8_000)).unwrap();
    let after = sku.figures();
    assert_eq!(after.pools[0].pool.held, before.pools[0].pool.held + 1);
    assert!(after.changed_at >= before.changed_at, "{after:?} older than {before:?}");
}
