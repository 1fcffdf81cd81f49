//! Creator settlement over real gRPC: a drop's orders are delivered, cancelled and returned,
//! and the creator's statement equals the orders minus fees to the minor unit; payouts are
//! bounded by what is available and idempotent; a creator sees only its own ledger;
//! reconciliation finds nothing to fix, or refunds what it cannot match; and a refund stops
//! the parcel (its courier is told) or is refused once the parcel has left its hub, so a
//! buyer never keeps both parcel and money unnoticed.

use domain::ledger::{LedgerCommand, LedgerInput, RefundReason, SaleFacts};
use proto::checkout::v1::*;
use proto::dispatch::v1::*;
use proto::operator::v1::SettlementTerms;
use proto::settlement::v1 as pb;
use proto::settlement::v1::settlement_service_client::SettlementServiceClient;
use services::auth::Authed;
use std::time::{Duration, Instant};
use testkit::*;
use tonic::Code;

const PRICE: i64 = 2_499;
const FEE_BPS: i64 = 1_250;
const DELIVERY_FEE: i64 = 333;
// Long enough for the deliveries, a refund and a return to be recorded inside the window;
// the kept order becomes available once it ends (on the driven clock of the test that uses
// it: no real waiting).
const RETURN_WINDOW_SECS: u32 = 10;
/// How long a test waits for an offer or a withdrawal on a courier's stream.
const COURIER_WAIT: Duration = Duration::from_secs(10);

/// The split, computed here independently: delivery fee first, then creator and platform
/// by largest remainder (ties to the creator).
fn expected_split(gross: i64) -> (i64, i64, i64) {
    let rest = gross - DELIVERY_FEE;
    let (mut creator, mut platform) = (rest * (10_000 - FEE_BPS) / 10_000, rest * FEE_BPS / 10_000);
    if creator + platform < rest {
        if (rest * (10_000 - FEE_BPS)) % 10_000 >= (rest * FEE_BPS) % 10_000 {
            creator += 1;
        } else {
            platform += 1;
        }
    }
    (creator, platform, DELIVERY_FEE)
}

async fn confirm(server: &TestServer, buyer: &str, quantity: u32) -> Order {
    let mut checkout = server.checkout();
    let held = checkout
        .reserve(reserve("settle", "sku", buyer, quantity))
        .await
        .unwrap()
        .into_inner();
    checkout
        .confirm(pickup(&held.order_id, PRICE * i64::from(quantity)))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap()
}

/// Polls until `done` holds for the order's settlement (booked asynchronously).
async fn settled(
    client: &mut SettlementServiceClient<Authed>,
    order_id: &str,
    done: impl Fn(&pb::OrderSettlement) -> bool,
) -> pb::OrderSettlement {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(o) = client
            .get_order_settlement(pb::GetOrderSettlementRequest {
                order_id: order_id.into(),
            })
            .await
        {
            if done(o.get_ref()) {
                return o.into_inner();
            }
        }
        assert!(Instant::now() < deadline, "order {order_id} did not settle in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn state(s: pb::SettlementState) -> impl Fn(&pb::OrderSettlement) -> bool {
    move |o| o.state == s as i32
}

#[tokio::test(start_paused = true)]
async fn a_drop_settles_to_the_minor_unit_and_each_creator_sees_only_its_own_ledger() {
    let server = TestServer::start_driven().await;
    let mut ops = settlement(&server.channel, OPERATOR_TOKEN);
    let mut credentials = Vec::new();
    for id in ["creator-1", "creator-2"] {
        let issued = ops
            .register_creator(pb::RegisterCreatorRequest {
                creator_id: id.into(),
                display_name: format!("Creator {id}"),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(issued.credential.starts_with("dlc_"));
        credentials.push(issued.credential);
    }
    let again = ops
        .register_creator(pb::RegisterCreatorRequest {
            creator_id: "creator-1".into(),
            display_name: "again".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists);
    let mut mine = settlement(&server.channel, &credentials[0]);
    let mut theirs = settlement(&server.channel, &credentials[1]);

    let courier_token = courier(&server.channel, "c1", "hub-1", 1).await;
    let mut courier = courier_client(&server.channel, &courier_token);
    let mut offers = courier.subscribe(SubscribeRequest {}).await.unwrap().into_inner();
    let mut request = drop_request("settle", &[("sku", 20)], 5, 600);
    request.skus[0].price = eur(PRICE);
    request.settlement = Some(SettlementTerms {
        platform_fee_bps: FEE_BPS as u32,
        delivery_fee_minor_units: DELIVERY_FEE,
        return_window_seconds: RETURN_WINDOW_SECS,
    });
    open_drop(&server, request).await;

    // Three orders: one cancelled before pickup (refunded), one returned, one kept.
    let returned = confirm(&server, "ana", 1).await;
    let cancelled = confirm(&server, "bo", 2).await;
    let kept = confirm(&server, "cy", 1).await;
    server
        .checkout()
        .cancel(CancelRequest {
            order_id: cancelled.order_id.clone(),
        })
        .await
        .unwrap();
    for _ in 0..3 {
        let offer = next_offer(&mut offers, COURIER_WAIT).await;
        if offer.order_id == cancelled.order_id {
            continue;
        }
        let code = [&returned, &kept]
            .iter()
            .find(|o| o.order_id == offer.order_id)
            .map(|o| o.pickup_code.clone())
            .expect("an offer of a live order");
        courier
            .accept(AcceptRequest {
                dispatch_id: offer.dispatch_id.clone(),
            })
            .await
            .unwrap();
        courier
            .mark_picked_up(MarkPickedUpRequest {
                dispatch_id: offer.dispatch_id.clone(),
                pickup_code: code,
            })
            .await
            .unwrap();
        courier
            .mark_delivered(MarkDeliveredRequest {
                dispatch_id: offer.dispatch_id.clone(),
                proof_reference: "photo".into(),
            })
            .await
            .unwrap();
    }
    let refunded = settled(&mut mine, &cancelled.order_id, state(pb::SettlementState::Refunded)).await;
    assert_eq!(refunded.gross.as_ref().unwrap().minor_units, 2 * PRICE);
    settled(
        &mut mine,
        &returned.order_id,
        state(pb::SettlementState::InReturnWindow),
    )
    .await;
    let back = ops
        .record_return(pb::RecordReturnRequest {
            order_id: returned.order_id.clone(),
            reason: "wrong size".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.state, pb::SettlementState::Returned as i32);
    // A return of an order not delivered, or already returned twice, changes nothing.
    let not_delivered = ops
        .record_return(pb::RecordReturnRequest {
            order_id: cancelled.order_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(not_delivered.code(), Code::FailedPrecondition);
    let kept_settlement = settled(&mut mine, &kept.order_id, state(pb::SettlementState::Available)).await;
    let (share, platform, delivery) = expected_split(PRICE);
    assert_eq!(
        (
            kept_settlement.creator_share,
            kept_settlement.platform_fee,
            kept_settlement.delivery_fee
        ),
        (share, platform, delivery)
    );
    // Released: wait for the release line (the state is derived from the window's end).
    let deadline = Instant::now() + Duration::from_secs(10);
    let balance = loop {
        let b = mine
            .get_balance(pb::GetBalanceRequest::default())
            .await
            .unwrap()
            .into_inner();
        if b.currencies.first().is_some_and(|c| c.available == share) || Instant::now() > deadline {
            break b;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // The balances equal the orders minus fees, to the minor unit.
    let eur = &balance.currencies[0];
    let (r_share, r_platform, _) = expected_split(PRICE);
    let (c_share, c_platform, _) = expected_split(2 * PRICE);
    assert_eq!(eur.currency, "EUR");
    assert_eq!(eur.gross_sales, 4 * PRICE);
    assert_eq!(eur.refunds, 3 * PRICE);
    assert_eq!((eur.pending, eur.available, eur.paid_out), (0, share, 0));
    assert_eq!(
        (eur.platform_fees, eur.partner_fees, eur.remedies),
        (platform, delivery, 0)
    );
    assert_eq!(r_share + r_platform + DELIVERY_FEE, PRICE);
    assert_eq!(c_share + c_platform + DELIVERY_FEE, 2 * PRICE);

    // The statement: every line, totals over the period, and the line identity.
    let statement = mine
        .get_statement(pb::GetStatementRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(statement.lines.len(), 2);
    assert!(!statement.next_page_token.is_empty());
    let mut lines = statement.lines.clone();
    let mut token = statement.next_page_token.clone();
    while !token.is_empty() {
        let page = mine
            .get_statement(pb::GetStatementRequest {
                page_size: 2,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        lines.extend(page.lines);
        token = page.next_page_token;
    }
    let kinds: Vec<i32> = lines.iter().map(|l| l.kind).collect();
    use pb::LineKind::*;
    // Sales, refund, return, release: 3 sales + 1 refund + 1 return + 1 release.
    assert_eq!(kinds.iter().filter(|k| **k == Sale as i32).count(), 3);
    assert_eq!(kinds.iter().filter(|k| **k == Refund as i32).count(), 1);
    assert_eq!(kinds.iter().filter(|k| **k == Return as i32).count(), 1);
    assert_eq!(kinds.iter().filter(|k| **k == Release as i32).count(), 1);
    assert!(lines.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
    for l in &lines {
        assert_eq!(
            l.gross,
            l.platform_fee + l.partner_fee + l.creator_net + l.remedy + l.paid_out
        );
    }
    let totals = &statement.totals[0];
    assert_eq!(totals.lines, lines.len() as u64);
    assert_eq!((totals.gross, totals.creator_net), (PRICE, share));
    assert_eq!(totals.platform_fee + totals.partner_fee, platform + delivery);

    // Payouts: never more than is available, idempotent by key.
    let money = |minor_units| {
        Some(proto::common::v1::Money {
            minor_units,
            currency: "EUR".into(),
        })
    };
    let too_much = mine
        .request_payout(pb::RequestPayoutRequest {
            creator_id: String::new(),
            amount: money(share + 1),
            idempotency_key: "payout-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(too_much.code(), Code::FailedPrecondition);
    let negative = mine
        .request_payout(pb::RequestPayoutRequest {
            creator_id: String::new(),
            amount: money(-5),
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(negative.code(), Code::InvalidArgument);
    let paid = mine
        .request_payout(pb::RequestPayoutRequest {
            creator_id: String::new(),
            amount: money(share),
            idempotency_key: "payout-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let retried = mine
        .request_payout(pb::RequestPayoutRequest {
            creator_id: String::new(),
            amount: money(share),
            idempotency_key: "payout-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paid, retried);
    let reused = mine
        .request_payout(pb::RequestPayoutRequest {
            creator_id: String::new(),
            amount: money(1),
            idempotency_key: "payout-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists);
    let after = mine
        .get_balance(pb::GetBalanceRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (after.currencies[0].available, after.currencies[0].paid_out),
        (0, share)
    );
    let payouts = mine
        .list_payouts(pb::ListPayoutsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(payouts.payouts, vec![paid]);

    // Each creator sees only its own ledger; partners and strangers see none.
    let denied = theirs
        .get_statement(pb::GetStatementRequest {
            creator_id: "creator-1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = theirs
        .get_order_settlement(pb::GetOrderSettlementRequest {
            order_id: kept.order_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let own = theirs
        .get_balance(pb::GetBalanceRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((own.creator_id.as_str(), own.currencies.len()), ("creator-2", 0));
    let partner = settlement(&server.channel, &courier_token)
        .get_balance(pb::GetBalanceRequest::default())
        .await
        .unwrap_err();
    assert_eq!(partner.code(), Code::PermissionDenied);
    let anonymous = SettlementServiceClient::new(server.channel.clone())
        .get_balance(pb::GetBalanceRequest::default())
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let creator_refunds = mine
        .refund_order(pb::RefundOrderRequest {
            order_id: kept.order_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(creator_refunds.code(), Code::PermissionDenied);

    // The live view replays every line in order, then follows new ones.
    let mut watch = mine
        .watch_settlement(pb::WatchSettlementRequest::default())
        .await
        .unwrap()
        .into_inner();
    for expected in 1..=lines.len() as u64 + 1 {
        let line = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .expect("a line in time")
            .unwrap()
            .expect("stream open");
        assert_eq!(line.seq, expected);
    }

    // Reconciliation: the ledgers match the SKU journals.
    let report = ops
        .reconcile(pb::ReconcileRequest { dry_run: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.orders, 3);
    assert!(report.differences.is_empty(), "{:?}", report.differences);
    assert!(report.balanced);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_lists_and_refunds_an_order_no_sku_journal_confirms() {
    let server = TestServer::start().await;
    open_drop(&server, drop_request("recon", &[("sku", 5)], 5, 600)).await;
    let sold = buy(&server, "recon", "sku", "ana").await.order.unwrap();
    // A sale booked with no order behind it (say, a replayed message from elsewhere).
    let ghost = domain::OrderId::parse("recon.sku.00000000deadbeef").unwrap();
    let creator = domain::CreatorId::parse("creator-1").unwrap();
    let facts = SaleFacts {
        order_id: ghost.clone(),
        drop_id: domain::DropId::parse("recon").unwrap(),
        gross: domain::Money::new(9_999, domain::Currency::parse("EUR").unwrap()),
        terms: Default::default(),
        confirmed_at: domain::UnixMillis(1),
        cancelled_at: None,
        handed_over_at: None,
    };
    server
        .platform
        .bus
        .ask::<domain::ledger::LedgerState>(creator, LedgerCommand::Sync(vec![LedgerInput::Sale(facts)]))
        .await
        .unwrap();
    let mut ops = settlement(&server.channel, OPERATOR_TOKEN);
    // The real order reaches the ledger on its own (asynchronously).
    settled(&mut ops, &sold.order_id, |_| true).await;
    let dry = ops
        .reconcile(pb::ReconcileRequest { dry_run: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dry.differences.len(), 1, "{:?}", dry.differences);
    assert_eq!(
        (
            dry.differences[0].kind.as_str(),
            dry.differences[0].order_id.as_str(),
            dry.differences[0].action.as_str()
        ),
        ("unknown_order", ghost.as_str(), "none")
    );
    assert!(!dry.balanced);
    let fixed = ops
        .reconcile(pb::ReconcileRequest { dry_run: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((fixed.refunded, fixed.differences[0].action.as_str()), (1, "refunded"));
    assert!(fixed.balanced);
    let refunded = ops
        .get_order_settlement(pb::GetOrderSettlementRequest {
            order_id: ghost.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(refunded.state, pb::SettlementState::Refunded as i32);
    let clean = ops
        .reconcile(pb::ReconcileRequest { dry_run: false })
        .await
        .unwrap()
        .into_inner();
    assert!(
        clean.differences.is_empty() && clean.balanced,
        "{:?}",
        clean.differences
    );
    server.stop().await;
}

/// A courier subscribed to hub-1's offers, and a drop selling from hub-1.
async fn courier_and_drop(
    server: &TestServer,
    partner_id: &str,
    drop_id: &str,
) -> (Courier, tonic::Streaming<DispatchUpdate>) {
    let token = courier(&server.channel, partner_id, "hub-1", 1).await;
    let mut client = courier_client(&server.channel, &token);
    let stream = client.subscribe(SubscribeRequest {}).await.unwrap().into_inner();
    open_drop(server, drop_request(drop_id, &[("sku", 10)], 5, 600)).await;
    (client, stream)
}

async fn deliver(courier: &mut Courier, dispatch_id: &str) {
    courier
        .mark_delivered(MarkDeliveredRequest {
            dispatch_id: dispatch_id.into(),
            proof_reference: "photo".into(),
        })
        .await
        .unwrap();
}

async fn tracking_stage(server: &TestServer, order_id: &str) -> i32 {
    let order = server
        .checkout()
        .get_order(GetOrderRequest {
            order_id: order_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    order.tracking.expect("a confirmed order is tracked").stage
}

async fn statement_kinds(ops: &mut SettlementServiceClient<Authed>) -> Vec<i32> {
    let statement = ops
        .get_statement(pb::GetStatementRequest {
            creator_id: "creator-1".into(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    statement.lines.iter().map(|l| l.kind).collect()
}

/// A refund booked straight in the ledger, behind the hub's back, as refunds were booked
/// before they withdrew dispatches.
async fn refund_in_ledger_only(server: &TestServer, order_id: &str) {
    let command = LedgerCommand::Refund {
        order_id: domain::OrderId::parse(order_id).unwrap(),
        reason: RefundReason::Operator("booked before refunds withdrew dispatches".into()),
    };
    let creator = domain::CreatorId::parse("creator-1").unwrap();
    server
        .platform
        .bus
        .ask::<domain::ledger::LedgerState>(creator, command)
        .await
        .unwrap();
}

async fn reconcile(ops: &mut SettlementServiceClient<Authed>, dry_run: bool) -> pb::ReconcileReport {
    ops.reconcile(pb::ReconcileRequest { dry_run })
        .await
        .unwrap()
        .into_inner()
}

fn difference<'a>(report: &'a pb::ReconcileReport, order_id: &str) -> (&'a str, &'a str) {
    let d = report
        .differences
        .iter()
        .find(|d| d.order_id == order_id)
        .unwrap_or_else(|| panic!("no difference for {order_id}: {:?}", report.differences));
    (d.kind.as_str(), d.action.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunding_an_offered_order_withdraws_it_from_its_courier() {
    let server = TestServer::start().await;
    let (mut courier, mut offers) = courier_and_drop(&server, "dora", "refund").await;
    let order = buy(&server, "refund", "sku", "ana").await.order.unwrap();
    let offer = next_offer(&mut offers, COURIER_WAIT).await;
    assert_eq!(offer.order_id, order.order_id);
    let mut ops = settlement(&server.channel, OPERATOR_TOKEN);
    settled(&mut ops, &order.order_id, state(pb::SettlementState::AwaitingDelivery)).await;

    let refund = pb::RefundOrderRequest {
        order_id: order.order_id.clone(),
        reason: "damaged at the hub".into(),
    };
    let refunded = ops.refund_order(refund.clone()).await.unwrap().into_inner();
    assert_eq!(refunded.state, pb::SettlementState::Refunded as i32);
    // The courier is told, and can neither accept nor pick up the parcel.
    let withdrawn = next_withdrawal(&mut offers, COURIER_WAIT).await;
    assert_eq!(withdrawn.dispatch_id, offer.dispatch_id);
    let accept = courier
        .accept(AcceptRequest {
            dispatch_id: offer.dispatch_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(accept.code(), Code::FailedPrecondition, "{accept:?}");
    let pickup = courier
        .mark_picked_up(MarkPickedUpRequest {
            dispatch_id: offer.dispatch_id.clone(),
            pickup_code: order.pickup_code.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(pickup.code(), Code::FailedPrecondition, "{pickup:?}");
    // The buyer sees it cancelled; a retried refund books nothing more.
    assert_eq!(
        tracking_stage(&server, &order.order_id).await,
        TrackingStage::Cancelled as i32
    );
    let again = ops.refund_order(refund).await.unwrap().into_inner();
    assert_eq!(again.state, pb::SettlementState::Refunded as i32);
    use pb::LineKind::*;
    assert_eq!(statement_kinds(&mut ops).await, [Sale as i32, Refund as i32]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_after_pickup_is_refused_and_changes_nothing_until_a_return_is_recorded() {
    let server = TestServer::start().await;
    let (mut courier, mut offers) = courier_and_drop(&server, "dora", "parcel").await;
    let order = buy(&server, "parcel", "sku", "ana").await.order.unwrap();
    let dispatch_id = next_offer(&mut offers, COURIER_WAIT).await.dispatch_id;
    pick_up(&mut courier, &dispatch_id, &order.pickup_code).await;
    let mut ops = settlement(&server.channel, OPERATOR_TOKEN);
    settled(&mut ops, &order.order_id, state(pb::SettlementState::AwaitingDelivery)).await;

    let refund = pb::RefundOrderRequest {
        order_id: order.order_id.clone(),
        reason: "the buyer changed their mind".into(),
    };
    let refused = ops.refund_order(refund.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains(&order.order_id), "{refused:?}");
    // Nothing was booked and nothing was withdrawn: the parcel is on its way.
    let unchanged = ops
        .get_order_settlement(pb::GetOrderSettlementRequest {
            order_id: order.order_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unchanged.state, pb::SettlementState::AwaitingDelivery as i32);
    use pb::LineKind::*;
    assert_eq!(statement_kinds(&mut ops).await, [Sale as i32]);
    let held = courier
        .get_dispatch(GetDispatchRequest {
            dispatch_id: dispatch_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(held.stage, DispatchStage::PickedUp as i32);
    assert_eq!(
        tracking_stage(&server, &order.order_id).await,
        TrackingStage::OnItsWay as i32
    );

    // Delivered, then returned: the return refunds the buyer, and a refund after it is
    // allowed and books nothing more.
    deliver(&mut courier, &dispatch_id).await;
    settled(&mut ops, &order.order_id, state(pb::SettlementState::InReturnWindow)).await;
    ops.record_return(pb::RecordReturnRequest {
        order_id: order.order_id.clone(),
        reason: "came back unopened".into(),
    })
    .await
    .unwrap();
    let after_return = ops.refund_order(refund).await.unwrap().into_inner();
    assert_eq!(after_return.state, pb::SettlementState::Returned as i32);
    assert_eq!(statement_kinds(&mut ops).await, [Sale as i32, Return as i32]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_reports_a_refunded_order_that_was_delivered_and_withdraws_one_still_open() {
    let server = TestServer::start().await;
    let (mut courier, mut offers) = courier_and_drop(&server, "eve", "late").await;
    let delivered = buy(&server, "late", "sku", "ana").await.order.unwrap();
    let open = buy(&server, "late", "sku", "bea").await.order.unwrap();
    let (first, second) = (
        next_offer(&mut offers, COURIER_WAIT).await,
        next_offer(&mut offers, COURIER_WAIT).await,
    );
    let (delivered_offer, open_offer) = if first.order_id == delivered.order_id {
        (first, second)
    } else {
        (second, first)
    };
    let mut ops = settlement(&server.channel, OPERATOR_TOKEN);
    for order in [&delivered, &open] {
        settled(&mut ops, &order.order_id, state(pb::SettlementState::AwaitingDelivery)).await;
        refund_in_ledger_only(&server, &order.order_id).await;
    }
    // One parcel reaches its buyer all the same.
    pick_up(&mut courier, &delivered_offer.dispatch_id, &delivered.pickup_code).await;
    deliver(&mut courier, &delivered_offer.dispatch_id).await;

    let dry = reconcile(&mut ops, true).await;
    assert_eq!(
        difference(&dry, &delivered.order_id),
        ("refunded_but_delivered", "none")
    );
    assert_eq!(difference(&dry, &open.order_id), ("refunded_not_withdrawn", "none"));
    assert_eq!(dry.differences.len(), 2, "{:?}", dry.differences);
    assert!(!dry.balanced);
    let fixed = reconcile(&mut ops, false).await;
    assert_eq!(
        difference(&fixed, &delivered.order_id),
        ("refunded_but_delivered", "none")
    );
    assert_eq!(
        difference(&fixed, &open.order_id),
        ("refunded_not_withdrawn", "withdrawn")
    );
    assert!(
        !fixed.balanced,
        "a refunded order that was delivered stays open for an operator"
    );
    // The open dispatch was withdrawn as a cancel withdraws it.
    assert_eq!(
        next_withdrawal(&mut offers, COURIER_WAIT).await.dispatch_id,
        open_offer.dispatch_id
    );
    assert_eq!(
        tracking_stage(&server, &open.order_id).await,
        TrackingStage::Cancelled as i32
    );
    let again = reconcile(&mut ops, true).await;
    assert_eq!(again.differences.len(), 1, "{:?}", again.differences);
    assert_eq!(
        difference(&again, &delivered.order_id),
        ("refunded_but_delivered", "none")
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_withdraws_the_dispatch_of_an_order_it_refunds() {
    let server = TestServer::start().await;
    let (_courier, mut offers) = courier_and_drop(&server, "fred", "mismatch").await;
    let held = server
        .checkout()
        .reserve(reserve("mismatch", "sku", "ana", 1))
        .await
        .unwrap()
        .into_inner();
    // The ledger books the order with another amount before its SKU's facts arrive (say, a
    // message replayed from elsewhere): reconciliation cannot match it and refunds it.
    let facts = SaleFacts {
        order_id: domain::OrderId::parse(&held.order_id).unwrap(),
        drop_id: domain::DropId::parse("mismatch").unwrap(),
        gross: domain::Money::new(9_999, domain::Currency::parse("EUR").unwrap()),
        terms: Default::default(),
        confirmed_at: domain::UnixMillis(1),
        cancelled_at: None,
        handed_over_at: None,
    };
    let creator = domain::CreatorId::parse("creator-1").unwrap();
    server
        .platform
        .bus
        .ask::<domain::ledger::LedgerState>(creator, LedgerCommand::Sync(vec![LedgerInput::Sale(facts)]))
        .await
        .unwrap();
    let order = server
        .checkout()
        .confirm(pickup(&held.order_id, 2_500))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    let offer = next_offer(&mut offers, COURIER_WAIT).await;
    let mut ops = settlement(&server.channel, OPERATOR_TOKEN);
    let report = reconcile(&mut ops, false).await;
    assert_eq!(difference(&report, &order.order_id), ("amount_mismatch", "refunded"));
    assert_eq!(
        next_withdrawal(&mut offers, COURIER_WAIT).await.dispatch_id,
        offer.dispatch_id
    );
    assert_eq!(
        tracking_stage(&server, &order.order_id).await,
        TrackingStage::Cancelled as i32
    );
    server.stop().await;
}
