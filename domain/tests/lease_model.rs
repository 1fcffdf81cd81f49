//! Property tests of the SKU's leases to pop-up edges: random sequences of leases, top-ups,
//! returns, closes, offline sales at the edges, uploads (some twice, some late), online
//! buyers, expiries and restarts, checked after every step: per pool available + held +
//! sold + leased = allocated, never oversold, each edge sale booked at most once, an upload
//! again gets the first answer, and a sale an honest edge made within its lease and
//! uploaded within the window is booked.

use domain::drop::{DropSpec, PoolSpec, SaleStatus, SkuSpec};
use domain::sku::*;
use domain::*;
use proptest::prelude::*;
use std::collections::HashMap;

const POOLS: [(&str, &str, u32); 3] = [
    ("porto-1", "Porto", 12),
    ("porto-2", "Porto", 6),
    ("lisbon-1", "Lisbon", 8),
];
const WINDOW_MS: u64 = 60_000;
const EDGES: u8 = 2;

fn new_sku() -> SkuState {
    let drop = DropSpec {
        drop_id: DropId::parse("d1").unwrap(),
        creator_id: CreatorId::parse("c1").unwrap(),
        title: "pop-up drop".into(),
        opens_at: UnixMillis(1_000),
        closes_at: UnixMillis(100_000_000),
        hold_ttl_ms: 5_000,
        terms: Default::default(),
        skus: vec![SkuSpec {
            sku_id: SkuId::parse("s1").unwrap(),
            name: "tote".into(),
            price: Money::new(1_500, Currency::parse("EUR").unwrap()),
            per_buyer_limit: 3,
            pools: POOLS
                .iter()
                .map(|(hub, city, n)| PoolSpec {
                    hub_id: HubId::parse(hub).unwrap(),
                    city: CityName::parse(city).unwrap(),
                    allocated: *n,
                })
                .collect(),
        }],
    };
    let mut sku = SkuState::new(&drop, &drop.skus[0]);
    sku.apply(&SkuEvent::SaleStatusSet {
        status: SaleStatus::Open,
        at: UnixMillis(1_000),
    });
    sku
}

fn edge(i: u8) -> StorefrontId {
    StorefrontId::parse(&format!("edge-{i}")).unwrap()
}

#[derive(Debug, Clone)]
enum Step {
    Lease {
        edge: u8,
        pool: u8,
        quantity: u32,
        top_up: u32,
        ttl_ms: u32,
    },
    TopUp {
        edge: u8,
        more: u32,
        by_edge: bool,
    },
    Return {
        edge: u8,
        units: u32,
    },
    Close {
        edge: u8,
    },
    Sell {
        edge: u8,
        quantity: u32,
    },
    Upload {
        edge: u8,
        count: usize,
    },
    Reserve {
        buyer: u8,
        confirm: bool,
    },
    Cancel {
        pick: usize,
    },
    Advance {
        ms: u32,
    },
    Restart,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => (0..EDGES, 0u8..3, 1u32..8, 0u32..12, 5_000u32..120_000)
            .prop_map(|(edge, pool, quantity, top_up, ttl_ms)| Step::Lease { edge, pool, quantity, top_up, ttl_ms }),
        1 => (0..EDGES, 1u32..6, any::<bool>()).prop_map(|(edge, more, by_edge)| Step::TopUp { edge, more, by_edge }),
        1 => (0..EDGES, 1u32..3).prop_map(|(edge, units)| Step::Return { edge, units }),
        1 => prop::bool::weighted(0.3).prop_map(|close| if close { Step::Close { edge: 0 } } else { Step::Restart }),
        6 => (0..EDGES, 1u32..3).prop_map(|(edge, quantity)| Step::Sell { edge, quantity }),
        3 => (0..EDGES, 0usize..6).prop_map(|(edge, count)| Step::Upload { edge, count }),
        3 => (0u8..8, any::<bool>()).prop_map(|(buyer, confirm)| Step::Reserve { buyer, confirm }),
        1 => any::<usize>().prop_map(|pick| Step::Cancel { pick }),
        3 => (500u32..40_000).prop_map(|ms| Step::Advance { ms }),
        1 => Just(Step::Restart),
    ]
}

/// What an honest edge knows and does: it sells only what its lease still holds, before the
/// lease expires, and keeps its sales until an upload answers them.
#[derive(Debug, Default, Clone)]
struct EdgeModel {
    lease: Option<LeaseView>,
    /// Units sold locally under the current lease.
    sold: u32,
    /// Sales not answered yet, with whether they must be booked (sold within the lease by
    /// an edge whose lease no operator closed since).
    pending: Vec<(EdgeSale, bool)>,
    /// Every answer an upload gave, by order id.
    answered: HashMap<OrderId, (EdgeSale, EdgeSaleOutcome)>,
}

impl EdgeModel {
    fn holds(&self) -> u32 {
        match &self.lease {
            Some(l) if l.lease.ended.is_none() => l.lease.granted - l.lease.returned - self.sold,
            _ => 0,
        }
    }
}

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
    fn leases_never_oversell_and_book_each_edge_sale_once(steps in proptest::collection::vec(step(), 1..150)) {
        let initial = new_sku();
        let mut state = initial.clone();
        let mut log: Vec<SkuEvent> = Vec::new();
        let mut now = UnixMillis(2_000);
        let mut next_id = 0u64;
        let mut edges: Vec<EdgeModel> = vec![EdgeModel::default(); EDGES as usize];
        let mut online: Vec<OrderId> = Vec::new();
        let allocated: u32 = POOLS.iter().map(|p| p.2).sum();

        for step in steps {
            match step {
                Step::Lease { edge: e, pool, quantity, top_up, ttl_ms } => {
                    let cmd = LeaseCommand {
                        edge: edge(e),
                        hub_id: HubId::parse(POOLS[pool as usize].0).unwrap(),
                        quantity,
                        granted_max: if top_up == 0 { 0 } else { quantity + top_up },
                        key_id: format!("k{next_id}"),
                        expires_at: now.plus_ms(u64::from(ttl_ms)),
                        reconcile_window_ms: WINDOW_MS,
                    };
                    next_id += 1;
                    let free = state.pools[pool as usize].available;
                    let live = state.edges.leases.get(&edge(e)).is_some_and(|l| l.ended.is_none());
                    match run(&mut state, &mut log, SkuCommand::Lease(cmd), now) {
                        Ok(SkuReply::Lease(view)) => {
                            prop_assert!(!live && quantity <= free);
                            prop_assert_eq!(view.lease.outstanding, quantity);
                            let model = &mut edges[e as usize];
                            model.lease = Some(view);
                            model.sold = 0;
                        }
                        Ok(other) => prop_assert!(false, "a lease answered {:?}", other),
                        Err(_) => prop_assert!(live || quantity > free),
                    }
                }
                Step::TopUp { edge: e, more, by_edge } => {
                    let Some(lease) = edges[e as usize].lease.clone() else { continue };
                    let total = lease.lease.granted + more;
                    let cmd = SkuCommand::TopUpLease { edge: edge(e), granted_total: total, by_edge };
                    if let Ok(SkuReply::Lease(view)) = run(&mut state, &mut log, cmd, now) {
                        prop_assert!(view.lease.granted <= total);
                        prop_assert!(!by_edge || view.lease.granted <= lease.lease.granted_max.max(lease.lease.granted));
                        edges[e as usize].lease = Some(view);
                    }
                }
                Step::Return { edge: e, units } => {
                    let model = &edges[e as usize];
                    let Some(lease) = model.lease.clone() else { continue };
                    if units > model.holds() { continue }
                    let cmd = SkuCommand::ReturnLease { edge: edge(e), returned_total: Some(lease.lease.returned + units) };
                    if let Ok(SkuReply::Lease(view)) = run(&mut state, &mut log, cmd, now) {
                        edges[e as usize].lease = Some(view);
                    }
                }
                Step::Close { edge: e } => {
                    if let Ok(SkuReply::Lease(view)) = run(&mut state, &mut log, SkuCommand::ReturnLease { edge: edge(e), returned_total: None }, now) {
                        prop_assert_eq!(view.lease.outstanding, 0);
                        let model = &mut edges[e as usize];
                        model.lease = Some(view);
                        // Closed before their upload: these may be refunded now.
                        for (_, must_book) in &mut model.pending { *must_book = false; }
                    }
                }
                Step::Sell { edge: e, quantity } => {
                    let model = &mut edges[e as usize];
                    let Some(lease) = &model.lease else { continue };
                    if lease.lease.ended.is_some() || now >= lease.lease.expires_at || model.holds() < quantity { continue }
                    next_id += 1;
                    let sale = EdgeSale {
                        order_id: OrderId::new(&state.drop_id, &state.sku_id, next_id),
                        quantity,
                        amount: state.price.times(quantity).unwrap(),
                        fulfilment: if next_id.is_multiple_of(2) { Fulfilment::Pickup } else { Fulfilment::Delivery },
                        payment_reference: format!("card-{next_id}"),
                        pickup_code: format!("{:06}", next_id % 1_000_000),
                        receipt_mac: format!("mac-{next_id}"),
                        key_id: lease.lease.key_id.clone(),
                        sold_at: now,
                    };
                    model.sold += quantity;
                    model.pending.push((sale, true));
                }
                Step::Upload { edge: e, count } => {
                    let model = &mut edges[e as usize];
                    // Some already answered ones again (a lost reply), then the oldest pending.
                    let again: Vec<EdgeSale> = model.answered.values().take(count % 3).map(|(s, _)| s.clone()).collect();
                    let fresh: Vec<(EdgeSale, bool)> = model.pending.iter().take(count).cloned().collect();
                    let mut sales = again.clone();
                    sales.extend(fresh.iter().map(|(s, _)| s.clone()));
                    if sales.is_empty() { continue }
                    let cmd = SkuCommand::BookEdgeSales { edge: edge(e), sales };
                    match run(&mut state, &mut log, cmd, now) {
                        Ok(SkuReply::EdgeSales(upload)) => {
                            for (sale, result) in again.iter().zip(&upload.results) {
                                prop_assert_eq!(result.outcome, model.answered[&sale.order_id].1, "an upload again gets the first answer");
                            }
                            for ((sale, must_book), result) in fresh.iter().zip(&upload.results[again.len()..]) {
                                prop_assert_eq!(&result.order_id, &sale.order_id);
                                prop_assert!(result.outcome != EdgeSaleOutcome::Conflict);
                                let in_window = now.0 - sale.sold_at.0 <= WINDOW_MS as i64;
                                if *must_book && in_window {
                                    prop_assert_eq!(result.outcome, EdgeSaleOutcome::Booked, "{:?} of an honest edge in its window", sale);
                                }
                                if !in_window {
                                    prop_assert!(matches!(result.outcome, EdgeSaleOutcome::Refunded(_)), "a late upload was booked");
                                }
                                model.answered.insert(sale.order_id.clone(), (sale.clone(), result.outcome));
                            }
                            model.pending.drain(..fresh.len());
                            if model.lease.as_ref().is_some_and(|l| l.lease.key_id == upload.lease.lease.key_id) {
                                model.lease = Some(upload.lease);
                            }
                        }
                        Ok(other) => prop_assert!(false, "an upload answered {:?}", other),
                        Err(rejection) => prop_assert!(false, "an upload was refused: {:?}", rejection),
                    }
                }
                Step::Reserve { buyer, confirm } => {
                    next_id += 1;
                    let order_id = OrderId::new(&state.drop_id, &state.sku_id, next_id);
                    let params = ReserveParams {
                        storefront: StorefrontId::parse("web").unwrap(),
                        buyer: BuyerRef::from_hash_hex(format!("{buyer:032x}")),
                        city: CityName::parse(if buyer % 3 == 0 { "Lisbon" } else { "Porto" }).unwrap(),
                        hub_id: None,
                        quantity: 1,
                        allow_partial: false,
                        join_waitlist: true,
                    };
                    let cmd = SkuCommand::Reserve(ReserveCommand { order_id: order_id.clone(), params, idempotency_key: None });
                    if let Ok(SkuReply::Reservation(r)) = run(&mut state, &mut log, cmd, now) {
                        if r.outcome == ReserveOutcome::Held && confirm {
                            let cmd = ConfirmCommand {
                                order_id: order_id.clone(),
                                storefront: None,
                                address_digest: None,
                                payment_reference: "card".into(),
                                amount: state.price,
                                fulfilment: Fulfilment::Pickup,
                                discreet: false,
                                pickup_code: "111111".into(),
                                receipt_token: "tok".into(),
                            };
                            run(&mut state, &mut log, SkuCommand::Confirm(cmd), now).unwrap();
                        }
                        if r.order_id.is_some() { online.push(order_id); }
                    }
                }
                Step::Cancel { pick } => {
                    if online.is_empty() { continue }
                    let id = online[pick % online.len()].clone();
                    run(&mut state, &mut log, SkuCommand::Cancel { order_id: id, storefront: None, withdrawn: true }, now).unwrap();
                }
                Step::Advance { ms } => {
                    now = now.plus_ms(u64::from(ms));
                    run(&mut state, &mut log, SkuCommand::ExpireDue, now).unwrap();
                    prop_assert!(state.next_deadline().is_none_or(|t| t > now), "nothing due is left after ExpireDue");
                    for (i, model) in edges.iter_mut().enumerate() {
                        if let Some(view) = state.lease_view(&edge(i as u8)) {
                            if model.lease.as_ref().is_some_and(|l| l.lease.key_id == view.lease.key_id) {
                                model.lease = Some(view);
                            }
                        }
                    }
                }
                Step::Restart => {
                    let mut replayed = initial.clone();
                    for event in &log { replayed.apply(event); }
                    prop_assert_eq!(&replayed, &state);
                    state = replayed;
                }
            }
            if let Err(broken) = state.check_invariants() { prop_assert!(false, "invariant broken: {}", broken); }
            prop_assert_eq!(state.check_waitlist(now), Ok(()));
            // Never oversold: per pool, every unit is available, held, sold or leased once.
            for (i, pool) in state.pools.iter().enumerate() {
                prop_assert_eq!(pool.available + pool.held + pool.sold + state.leased(i), pool.allocated);
            }
            let sold: u32 = state.pools.iter().map(|p| p.sold).sum();
            prop_assert!(sold <= allocated);
            // Each edge sale is booked at most once, and a booked one waits for the ledger.
            let mut booked: HashMap<&OrderId, u32> = HashMap::new();
            for event in &log {
                if let SkuEvent::EdgeSaleBooked { sale, .. } = event {
                    *booked.entry(&sale.order_id).or_default() += 1;
                }
            }
            prop_assert!(booked.values().all(|&n| n == 1), "an edge sale booked twice");
            for id in booked.keys() {
                prop_assert!(state.ledger_outbox.contains_key(*id) && state.handover.contains(*id));
            }
            // What an honest edge holds is never more than its lease still holds upstream.
            for (i, model) in edges.iter().enumerate() {
                if let (Some(lease), Some(up)) = (&model.lease, state.edges.leases.get(&edge(i as u8))) {
                    if lease.lease.key_id == up.key_id && up.ended.is_none() {
                        let unsent: u32 = model.pending.iter().filter(|(s, _)| s.key_id == up.key_id).map(|(s, _)| s.quantity).sum();
                        prop_assert!(model.holds() + unsent <= up.outstanding, "edge {} holds {} + unsent {} > lease {}", i, model.holds(), unsent, up.outstanding);
                    }
                }
            }
        }
    }
}

fn leased(state: &mut SkuState, now: UnixMillis, quantity: u32, granted_max: u32) -> LeaseView {
    let cmd = LeaseCommand {
        edge: edge(0),
        hub_id: HubId::parse("porto-1").unwrap(),
        quantity,
        granted_max,
        key_id: "k1".into(),
        expires_at: now.plus_ms(10_000),
        reconcile_window_ms: WINDOW_MS,
    };
    let (events, reply) = state.decide(SkuCommand::Lease(cmd), now).unwrap();
    for e in &events {
        state.apply(e);
    }
    match reply {
        SkuReply::Lease(view) => view,
        other => panic!("{other:?}"),
    }
}

fn sale(state: &SkuState, id: u64, quantity: u32, sold_at: UnixMillis) -> EdgeSale {
    EdgeSale {
        order_id: OrderId::new(&state.drop_id, &state.sku_id, id),
        quantity,
        amount: state.price.times(quantity).unwrap(),
        fulfilment: Fulfilment::Pickup,
        payment_reference: format!("card-{id}"),
        pickup_code: "123456".into(),
        receipt_mac: "mac".into(),
        key_id: "k1".into(),
        sold_at,
    }
}

fn upload(state: &mut SkuState, sales: Vec<EdgeSale>, now: UnixMillis) -> Vec<EdgeSaleOutcome> {
    let (events, reply) = state
        .decide(SkuCommand::BookEdgeSales { edge: edge(0), sales }, now)
        .unwrap();
    for e in &events {
        state.apply(e);
    }
    match reply {
        SkuReply::EdgeSales(upload) => upload.results.into_iter().map(|r| r.outcome).collect(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn leased_units_leave_the_pool_and_sales_come_back_as_orders() {
    let mut state = new_sku();
    let now = UnixMillis(2_000);
    leased(&mut state, now, 5, 0);
    assert_eq!(state.pools[0].available, 7);
    assert_eq!(state.leased(0), 5);
    let s = sale(&state, 1, 2, UnixMillis(3_000));
    assert_eq!(
        upload(&mut state, vec![s.clone()], UnixMillis(4_000)),
        vec![EdgeSaleOutcome::Booked]
    );
    assert_eq!(
        upload(&mut state, vec![s.clone()], UnixMillis(5_000)),
        vec![EdgeSaleOutcome::Booked]
    );
    assert_eq!((state.pools[0].sold, state.leased(0)), (2, 3));
    assert_eq!(state.orders[&s.order_id].status, OrderStatus::Confirmed);
    assert!(state.sale_facts(&s.order_id).is_some());
    let mut changed = s.clone();
    changed.payment_reference = "another".into();
    assert_eq!(
        upload(&mut state, vec![changed], UnixMillis(5_000)),
        vec![EdgeSaleOutcome::Conflict]
    );
    state.check_invariants().unwrap();
}

#[test]
fn late_and_after_expiry_sales_are_refunded_and_the_lease_lapses_after_its_window() {
    let mut state = new_sku();
    let now = UnixMillis(2_000);
    let view = leased(&mut state, now, 4, 0);
    let expires_at = view.lease.expires_at;
    let in_time = sale(&state, 1, 1, UnixMillis(3_000));
    let after_expiry = sale(&state, 2, 1, expires_at);
    let too_late = sale(&state, 3, 1, UnixMillis(4_000));
    assert_eq!(
        upload(&mut state, vec![in_time], UnixMillis(50_000)),
        vec![EdgeSaleOutcome::Booked]
    );
    assert_eq!(
        upload(
            &mut state,
            vec![after_expiry, too_late],
            UnixMillis(4_000 + WINDOW_MS as i64 + 1)
        ),
        vec![
            EdgeSaleOutcome::Refunded(EdgeRefundReason::SoldOutsideLease),
            EdgeSaleOutcome::Refunded(EdgeRefundReason::ReconciledTooLate)
        ]
    );
    assert_eq!(state.edges.refunds.len(), 2);
    assert_eq!(state.next_deadline(), Some(expires_at.plus_ms(WINDOW_MS)));
    let (events, _) = state
        .decide(SkuCommand::ExpireDue, expires_at.plus_ms(WINDOW_MS))
        .unwrap();
    for e in &events {
        state.apply(e);
    }
    assert_eq!(state.leased(0), 0);
    assert_eq!(state.pools[0].available, 11);
    assert!(matches!(
        state.edges.leases[&edge(0)].ended,
        Some((LeaseEnd::Lapsed, _))
    ));
    state.check_invariants().unwrap();
}

#[test]
fn an_edge_tops_up_within_its_allowance_and_closing_returns_the_rest() {
    let mut state = new_sku();
    let now = UnixMillis(2_000);
    leased(&mut state, now, 2, 6);
    let top_up = |state: &mut SkuState, total, by_edge| {
        let cmd = SkuCommand::TopUpLease {
            edge: edge(0),
            granted_total: total,
            by_edge,
        };
        state.decide(cmd, now).map(|(events, _)| {
            for e in &events {
                state.apply(e);
            }
            events.len()
        })
    };
    assert_eq!(top_up(&mut state, 5, true), Ok(1));
    assert_eq!(top_up(&mut state, 5, true), Ok(0), "a retried top-up changes nothing");
    assert!(matches!(
        top_up(&mut state, 7, true),
        Err(Rejection::PermissionDenied(_))
    ));
    assert_eq!(top_up(&mut state, 7, false), Ok(1), "the operator may go beyond");
    assert_eq!(state.leased(0), 7);
    let (events, _) = state
        .decide(
            SkuCommand::ReturnLease {
                edge: edge(0),
                returned_total: None,
            },
            now.plus_ms(100),
        )
        .unwrap();
    for e in &events {
        state.apply(e);
    }
    assert_eq!((state.leased(0), state.pools[0].available), (0, 12));
    let late = sale(&state, 9, 1, now.plus_ms(50));
    assert_eq!(
        upload(&mut state, vec![late], now.plus_ms(200)),
        vec![EdgeSaleOutcome::Refunded(EdgeRefundReason::LeaseEnded)]
    );
    state.check_invariants().unwrap();
}
