//! The attacks of issue 20, played through the real gRPC API against a test server: each
//! one is refused with the status that says what is wrong, and nothing it aimed at changed:
//! not the address a courier sees, not a drop's stock, not a creator's ledger, not a
//! dispatch. (Transport attacks are services/tests/hygiene.rs's.)

use prost::Message;
use proto::checkout::v1::checkout_service_client::CheckoutServiceClient;
use proto::checkout::v1::*;
use proto::dispatch::v1::*;
use proto::registry::v1 as registry;
use proto::settlement::v1 as pb;
use services::auth::Authed;
use std::path::Path;
use std::time::Duration;
use testkit::*;
use tonic::{Code, Response, Status};
use tonic_types::StatusExt;

/// How long a test waits for something the server does on its own (an offer, a withdrawal,
/// a ledger line); it comes in milliseconds, the bound is for a loaded machine.
const WITHIN: Duration = Duration::from_secs(10);
/// The price of every SKU `drop_request` makes.
const PRICE: i64 = 2_500;

type Updates = tonic::Streaming<DispatchUpdate>;

/// The refusal of `result`, which must carry `code` and a message naming `named`.
fn refused<T: std::fmt::Debug>(result: Result<Response<T>, Status>, code: Code, named: &str) -> Status {
    let status = result.expect_err("the call is refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(named),
        "the refusal should name {named:?}: {status:?}"
    );
    status
}

/// CheckoutService as another storefront than `test-web`, registered now.
async fn other_storefront(server: &TestServer, storefront_id: &str) -> CheckoutServiceClient<Authed> {
    let credential = storefront_credential(std::slice::from_ref(&server.channel), OPERATOR_TOKEN, storefront_id)
        .await
        .unwrap();
    server.checkout_as(&credential)
}

/// A courier of `hub_id` and its offers, subscribed before anything is sold.
async fn subscribed_courier(server: &TestServer, partner_id: &str, hub_id: &str) -> (String, Courier, Updates) {
    let credential = courier(&server.channel, partner_id, hub_id, 1).await;
    let mut client = courier_client(&server.channel, &credential);
    let updates = client.subscribe(SubscribeRequest {}).await.unwrap().into_inner();
    (credential, client, updates)
}

fn address(recipient_name: &str, line1: &str, phone: &str) -> Address {
    Address {
        recipient_name: recipient_name.into(),
        line1: line1.into(),
        line2: String::new(),
        postal_code: "1100-001".into(),
        city: "Lisbon".into(),
        country: "PT".into(),
        phone: phone.into(),
    }
}

/// A delivery confirmation of `order_id` to `to`, paid `amount` under the usual reference.
fn delivery(order_id: &str, amount: i64, to: &Address) -> ConfirmRequest {
    ConfirmRequest {
        fulfilment: Some(confirm_request::Fulfilment::Delivery(Delivery {
            address: Some(to.clone()),
        })),
        ..pickup(order_id, amount)
    }
}

/// Reserves one unit of `drop_id`/`sku` for `buyer` as `test-web`.
async fn hold(server: &TestServer, drop_id: &str, buyer: &str) -> ReserveResponse {
    let held = server
        .checkout()
        .reserve(reserve(drop_id, "sku", buyer, 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(held.outcome(), ReserveOutcome::Held);
    held
}

/// The recipient and street of the address a courier's dispatch carries, if any.
fn seen(dispatch: &Dispatch) -> Option<(String, String)> {
    dispatch
        .address
        .as_ref()
        .map(|a| (a.recipient_name.clone(), a.line1.clone()))
}

async fn get_dispatch(courier: &mut Courier, dispatch_id: &str) -> Dispatch {
    courier
        .get_dispatch(GetDispatchRequest {
            dispatch_id: dispatch_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// What the courier that holds `dispatch_id` sees of its address now, asked both ways:
/// accepting it (again: Accept is idempotent) and reading it.
async fn address_seen(courier: &mut Courier, dispatch_id: &str) -> Option<(String, String)> {
    let accepted = courier
        .accept(AcceptRequest {
            dispatch_id: dispatch_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let read = seen(&get_dispatch(courier, dispatch_id).await);
    assert_eq!(seen(&accepted), read, "Accept and GetDispatch disagree");
    read
}

/// The order `request` confirms, which must be accepted.
async fn confirmed(checkout: &mut CheckoutServiceClient<Authed>, request: ConfirmRequest) -> Order {
    checkout.confirm(request).await.unwrap().into_inner().order.unwrap()
}

async fn in_vault(server: &TestServer, order_id: &str) -> bool {
    server.platform.addresses.get(order_id).await.unwrap().is_some()
}

async fn order_as(checkout: &mut CheckoutServiceClient<Authed>, order_id: &str) -> Order {
    checkout
        .get_order(GetOrderRequest {
            order_id: order_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// (allocated, available, held, sold, waitlisted) of the drop's SKU `sku_id`.
async fn stock(server: &TestServer, drop_id: &str, sku_id: &str) -> (u32, u32, u32, u32, u32) {
    let figures = server.drop_figures(drop_id).await;
    let sku = figures
        .skus
        .iter()
        .find(|s| s.sku_id == sku_id)
        .unwrap_or_else(|| panic!("no SKU {sku_id} in {drop_id}"));
    (sku.allocated, sku.available, sku.held, sku.sold, sku.waitlisted)
}

#[tokio::test(start_paused = true)]
async fn nobody_but_the_first_confirmation_sets_a_delivery_address_and_refused_confirms_store_none() {
    let server = TestServer::start_driven().await;
    let (courier_credential, mut courier, mut offers) = subscribed_courier(&server, "hal", "hub-1").await;
    // A hold that expires while the rest of the test runs (the shortest TTL, one second, on
    // the server's driven clock: its expiry costs no real time).
    open_drop(&server, drop_request("brief", &[("sku", 10)], 1, 1)).await;
    let expiring = hold(&server, "brief", "eli").await;
    open_drop(&server, drop_request("hijack", &[("sku", 10)], 1, 600)).await;
    let home = address("Hanna Home", "1 Rua Verdadeira", "+351 900 000 001");
    let thief = address("Ivo Thief", "9 Rua Falsa", "+351 900 000 666");
    let mut checkout = server.checkout();

    let order_id = hold(&server, "hijack", "hanna").await.order_id;
    checkout.confirm(delivery(&order_id, PRICE, &home)).await.unwrap();
    let offer = next_offer(&mut offers, WITHIN).await;
    assert_eq!(offer.order_id, order_id);
    let first = Some(("Hanna Home".to_string(), "1 Rua Verdadeira".to_string()));
    assert_eq!(address_seen(&mut courier, &offer.dispatch_id).await, first);

    // (a) The same payment and amount with another address.
    refused(
        checkout.confirm(delivery(&order_id, PRICE, &thief)).await,
        Code::AlreadyExists,
        &order_id,
    );
    // (b) Another amount, with the first address or another one.
    for to in [&home, &thief] {
        refused(
            checkout.confirm(delivery(&order_id, PRICE + 1, to)).await,
            Code::AlreadyExists,
            &order_id,
        );
    }
    // (c) The courier, with the order id its dispatch id gives away; no credential; another
    // storefront.
    let (_, leaked_order_id) = offer.dispatch_id.split_once('/').unwrap();
    assert_eq!(leaked_order_id, order_id);
    refused(
        server
            .checkout_as(&courier_credential)
            .confirm(delivery(leaked_order_id, PRICE, &thief))
            .await,
        Code::PermissionDenied,
        "storefront",
    );
    refused(
        server
            .anonymous_checkout()
            .confirm(delivery(leaked_order_id, PRICE, &thief))
            .await,
        Code::Unauthenticated,
        "token",
    );
    let mut stranger = other_storefront(&server, "stranger-web").await;
    refused(
        stranger.confirm(delivery(&order_id, PRICE, &thief)).await,
        Code::PermissionDenied,
        &order_id,
    );
    // The courier still sees the first address, and the vault holds it.
    assert_eq!(address_seen(&mut courier, &offer.dispatch_id).await, first);
    let kept = server
        .platform
        .address(&domain::OrderId::parse(&order_id).unwrap())
        .await
        .unwrap()
        .expect("the first address is kept");
    assert_eq!(Address::decode(kept.as_slice()).unwrap(), home);
    let order = order_as(&mut checkout, &order_id).await;
    assert_eq!(order.status(), OrderStatus::Confirmed);
    assert_eq!(order.fulfilment(), proto::checkout::v1::FulfilmentKind::Delivery);

    // (d) Refused confirmations store no address. A drop that does not exist:
    let ghost = "ghost.sku.00000000000000ff";
    refused(
        checkout.confirm(delivery(ghost, PRICE, &thief)).await,
        Code::NotFound,
        "ghost",
    );
    assert!(!in_vault(&server, ghost).await);
    // A wrong amount, and another storefront, on a live hold:
    let live = hold(&server, "hijack", "ivo").await.order_id;
    let wrong_amount = refused(
        checkout.confirm(delivery(&live, PRICE - 1, &thief)).await,
        Code::InvalidArgument,
        "amount",
    );
    assert!(wrong_amount.get_details_bad_request().is_some(), "{wrong_amount:?}");
    refused(
        stranger.confirm(delivery(&live, PRICE, &thief)).await,
        Code::PermissionDenied,
        &live,
    );
    assert!(!in_vault(&server, &live).await);
    assert_eq!(order_as(&mut checkout, &live).await.status(), OrderStatus::Held);
    // An expired hold:
    let expires_at = expiring.expires_at.expect("a hold expires");
    let left_ms = services::convert::millis(&expires_at) - server.platform.clock.now().0;
    assert!(left_ms <= 1_000, "a one-second hold, {left_ms} ms left");
    tokio::time::sleep(Duration::from_millis(left_ms.max(0) as u64 + 1)).await;
    refused(
        checkout.confirm(delivery(&expiring.order_id, PRICE, &thief)).await,
        Code::FailedPrecondition,
        "expired",
    );
    assert!(!in_vault(&server, &expiring.order_id).await);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pickup_code_is_never_shown_to_a_courier_and_guessing_it_locks_the_parcel_until_the_buyer_reissues_it() {
    use domain::limits::PICKUP_CODE_TRIES_MAX;
    let server = TestServer::start().await;
    let (courier_credential, mut courier, mut offers) = subscribed_courier(&server, "pia", "hub-1").await;
    open_drop(&server, drop_request("codes", &[("sku", 10)], 1, 600)).await;
    let mut checkout = server.checkout();
    let held = hold(&server, "codes", "ana").await;
    let order_id = held.order_id.clone();
    let code = confirmed(&mut checkout, pickup(&order_id, PRICE)).await.pickup_code;
    assert_eq!(code.len(), 6, "{code:?}");

    // The code is the buyer's side's only.
    let read = GetOrderRequest {
        order_id: order_id.clone(),
    };
    refused(
        server.anonymous_checkout().get_order(read.clone()).await,
        Code::Unauthenticated,
        "token",
    );
    refused(
        server.checkout_as(&courier_credential).get_order(read.clone()).await,
        Code::PermissionDenied,
        "storefront",
    );
    // No message of DispatchService has a field for it.
    let set = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET).unwrap();
    for file in set.file.iter().filter(|f| f.package() == "dropline.dispatch.v1") {
        for message in &file.message_type {
            for field in &message.field {
                assert!(
                    !field.name().contains("pickup") || message.name() == "MarkPickedUpRequest",
                    "{}.{} could carry a pickup code",
                    message.name(),
                    field.name()
                );
            }
        }
    }

    // Every dispatch the courier is sent, encoded, is searched for the code afterwards.
    let mut received = Vec::new();
    let offer = next_offer(&mut offers, WITHIN).await;
    assert_eq!(offer.order_id, order_id);
    let dispatch_id = offer.dispatch_id.clone();
    received.push(offer);
    received.push(
        courier
            .accept(AcceptRequest {
                dispatch_id: dispatch_id.clone(),
            })
            .await
            .unwrap()
            .into_inner(),
    );
    received.push(get_dispatch(&mut courier, &dispatch_id).await);

    // 300 wrong codes: a few are refused as wrong, then the dispatch is locked.
    let mut answers = Vec::new();
    let code_number: u32 = code.parse().unwrap();
    for n in 1..=300 {
        let wrong = format!("{:06}", (code_number + n) % 1_000_000);
        let status = courier
            .mark_picked_up(MarkPickedUpRequest {
                dispatch_id: dispatch_id.clone(),
                pickup_code: wrong,
            })
            .await
            .expect_err("a wrong code is refused");
        match status.code() {
            Code::InvalidArgument => assert!(status.message().contains("pickup_code"), "{status:?}"),
            Code::FailedPrecondition => assert!(status.message().contains("locked"), "{status:?}"),
            other => panic!("wrong code {n}: {other:?} {status:?}"),
        }
        answers.push(status.code());
    }
    let wrong_answers = answers.iter().take_while(|c| **c == Code::InvalidArgument).count();
    assert_eq!(
        (
            wrong_answers,
            answers[wrong_answers..].iter().all(|c| *c == Code::FailedPrecondition)
        ),
        (PICKUP_CODE_TRIES_MAX as usize - 1, true),
        "the first {} wrong codes are told they are wrong, every one after is told the dispatch is locked",
        PICKUP_CODE_TRIES_MAX - 1
    );
    // Locked: the right code is refused too, and the parcel stays at the hub.
    let right = MarkPickedUpRequest {
        dispatch_id: dispatch_id.clone(),
        pickup_code: code.clone(),
    };
    refused(
        courier.mark_picked_up(right.clone()).await,
        Code::FailedPrecondition,
        "locked",
    );
    let still = get_dispatch(&mut courier, &dispatch_id).await;
    assert_eq!(still.stage(), DispatchStage::Accepted);
    received.push(still);

    // The operator is alerted, and the trail says so without any code.
    let hub = server
        .registry()
        .get_hub(registry::GetHubRequest { hub_id: "hub-1".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(
        hub.alerts
            .iter()
            .any(|a| a.order_id == order_id && a.message.contains(&order_id) && a.message.contains("locked")),
        "{:?}",
        hub.alerts
    );
    let trail = server
        .registry()
        .list_audit_entries(registry::ListAuditEntriesRequest {
            subject: Some(registry::list_audit_entries_request::Subject::OrderId(order_id.clone())),
            page_size: 1_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        trail.entries.iter().any(|e| e.action == "pickup_locked"),
        "{:?}",
        trail.entries
    );
    for entry in &trail.entries {
        // The code would be a run of digits of its own (timestamps hold longer runs).
        let runs = |text: &str| text.split(|c: char| !c.is_ascii_digit()).any(|run| run == code);
        assert!(!runs(&entry.detail) && !runs(&entry.action), "the code in {entry:?}");
    }

    // Another storefront may not reissue the code; the buyer's device may.
    let mut stranger = other_storefront(&server, "stranger-web").await;
    let reissue = ReissuePickupCodeRequest {
        order_id: order_id.clone(),
    };
    refused(
        stranger.reissue_pickup_code(reissue.clone()).await,
        Code::PermissionDenied,
        &order_id,
    );
    assert_eq!(order_as(&mut checkout, &order_id).await.pickup_code, code);
    let reissued = server
        .checkout_as(&held.order_token)
        .reissue_pickup_code(reissue)
        .await
        .unwrap()
        .into_inner();
    let new_code = reissued.pickup_code.clone();
    assert_eq!(new_code.len(), 6, "{reissued:?}");
    assert_ne!(new_code, code);
    assert_eq!(order_as(&mut checkout, &order_id).await.pickup_code, new_code);
    refused(
        courier.mark_picked_up(right).await,
        Code::InvalidArgument,
        "pickup_code",
    );
    let picked_up = courier
        .mark_picked_up(MarkPickedUpRequest {
            dispatch_id: dispatch_id.clone(),
            pickup_code: new_code.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(picked_up.stage(), DispatchStage::PickedUp);
    received.push(picked_up);
    received.push(get_dispatch(&mut courier, &dispatch_id).await);

    for dispatch in &received {
        let bytes = dispatch.encode_to_vec();
        for secret in [&code, &new_code] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "a pickup code in {dispatch:?}"
            );
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_knows_its_caller_and_each_caller_reaches_only_its_own_orders() {
    let server = TestServer::start().await;
    open_drop(&server, drop_request("who", &[("sku", 100)], 100, 600)).await;
    let mut checkout = server.checkout();
    let mut stranger = other_storefront(&server, "stranger-web").await;
    let first = checkout
        .reserve(ReserveRequest {
            idempotency_key: "key-a".into(),
            ..reserve("who", "sku", "ana", 1)
        })
        .await
        .unwrap()
        .into_inner();
    let second = hold(&server, "who", "bo").await;
    let (x, y) = (first.order_id.clone(), second.order_id.clone());
    let stock_before = stock(&server, "who", "sku").await;
    assert_eq!(stock_before, (100, 98, 2, 0, 0));

    // Reserve: only storefronts.
    let request = reserve("who", "sku", "mallory", 1);
    refused(
        server.anonymous_checkout().reserve(request.clone()).await,
        Code::Unauthenticated,
        "storefront",
    );
    let partner = courier(&server.channel, "pat", "hub-1", 1).await;
    let creator = creator(&server.channel, "creator-1").await;
    for credential in [&partner, &creator, &first.order_token, &OPERATOR_TOKEN.to_string()] {
        refused(
            server.checkout_as(credential).reserve(request.clone()).await,
            Code::PermissionDenied,
            "storefront",
        );
    }

    // Another storefront can do nothing with this storefront's order.
    let order_x = order_as(&mut checkout, &x).await;
    refused(stranger.confirm(pickup(&x, PRICE)).await, Code::PermissionDenied, &x);
    refused(
        stranger.cancel(CancelRequest { order_id: x.clone() }).await,
        Code::PermissionDenied,
        &x,
    );
    refused(
        stranger.get_order(GetOrderRequest { order_id: x.clone() }).await,
        Code::PermissionDenied,
        &x,
    );
    let watch = stranger.watch_order(WatchOrderRequest { order_id: x.clone() }).await;
    let status = watch.expect_err("the watch is refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(&x), "{status:?}");
    // Nor with one order's token on another order.
    let mut device_x = server.checkout_as(&first.order_token);
    refused(
        device_x.get_order(GetOrderRequest { order_id: y.clone() }).await,
        Code::PermissionDenied,
        &y,
    );
    refused(device_x.confirm(pickup(&y, PRICE)).await, Code::PermissionDenied, &y);
    refused(
        device_x.cancel(CancelRequest { order_id: y.clone() }).await,
        Code::PermissionDenied,
        &y,
    );
    // The order's own token may read it, but not confirm it: Confirm records a payment,
    // which only the storefront took (the token sits on the buyer's device).
    refused(
        device_x.confirm(pickup(&x, PRICE)).await,
        Code::PermissionDenied,
        "storefront",
    );
    assert_eq!(order_as(&mut checkout, &x).await, order_x);
    // Nor with the operator's credential, beyond reading.
    let mut operator = server.checkout_as(OPERATOR_TOKEN);
    refused(
        operator.confirm(pickup(&x, PRICE)).await,
        Code::PermissionDenied,
        "storefront",
    );
    refused(
        operator.cancel(CancelRequest { order_id: x.clone() }).await,
        Code::PermissionDenied,
        "storefront",
    );
    // Nor by replaying this storefront's idempotency key, request and all.
    let replayed = refused(
        stranger
            .reserve(ReserveRequest {
                idempotency_key: "key-a".into(),
                ..reserve("who", "sku", "ana", 1)
            })
            .await,
        Code::AlreadyExists,
        "key-a",
    );
    assert!(!format!("{replayed:?}").contains(&x), "{replayed:?}");
    // Both orders are as they were, and the stock too.
    assert_eq!(order_as(&mut device_x, &x).await, order_x);
    let order_y = order_as(&mut checkout, &y).await;
    assert_eq!((order_y.status(), order_y.quantity), (OrderStatus::Held, 1));
    assert_eq!(stock(&server, "who", "sku").await, stock_before);

    // One buyer hammering Reserve is slowed down past its burst; only granted holds count.
    let burst = services::throttle::BUYER_RESERVE_BURST_DEFAULT as usize;
    let mut granted = 0;
    let mut throttled = Vec::new();
    for n in 0..3 * burst {
        match checkout.reserve(reserve("who", "sku", "bot", 1)).await {
            Ok(reply) => {
                assert_eq!(reply.into_inner().outcome(), ReserveOutcome::Held);
                granted += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.message().contains("buyer"), "{status:?}");
                let retry = status
                    .get_details_retry_info()
                    .and_then(|r| r.retry_delay)
                    .expect("RetryInfo says when to come back");
                assert!(retry > Duration::ZERO && retry <= Duration::from_secs(1), "{retry:?}");
                throttled.push(n);
            }
        }
    }
    assert!(
        throttled.first().is_some_and(|n| *n >= burst),
        "throttled within the burst of {burst}: {throttled:?}"
    );
    assert!(!throttled.is_empty(), "{granted} reserves in a row, none throttled");
    let (allocated, available, held, sold, _) = stock(&server, "who", "sku").await;
    assert_eq!((allocated, held, sold), (100, 2 + granted as u32, 0));
    assert_eq!(available + held, 100);

    // The operator reads an order, without its pickup code.
    let code = confirmed(&mut checkout, pickup(&x, PRICE)).await.pickup_code;
    assert!(!code.is_empty());
    let seen = order_as(&mut operator, &x).await;
    assert_eq!((seen.status(), seen.pickup_code.as_str()), (OrderStatus::Confirmed, ""));
    let watched = operator
        .watch_order(WatchOrderRequest { order_id: x.clone() })
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (watched.status(), watched.pickup_code.as_str()),
        (OrderStatus::Confirmed, "")
    );
    server.stop().await;
}

/// Waits for the ledger's sale line of `order_id` on a settlement watch.
async fn sale_booked(lines: &mut tonic::Streaming<pb::StatementLine>, order_id: &str) {
    loop {
        let line = tokio::time::timeout(WITHIN, lines.message())
            .await
            .expect("the sale is booked in time")
            .unwrap()
            .expect("the watch stays open");
        if line.order_id == order_id && line.kind() == pb::LineKind::Sale {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_stops_a_parcel_still_at_its_hub_and_is_refused_once_it_left() {
    let server = TestServer::start().await;
    let (_, mut courier, mut offers) = subscribed_courier(&server, "rui", "hub-1").await;
    open_drop(&server, drop_request("refunds", &[("sku", 10)], 1, 600)).await;
    let mut ops = settlement(&server.channel, OPERATOR_TOKEN);
    let mut lines = ops
        .watch_settlement(pb::WatchSettlementRequest {
            creator_id: "creator-1".into(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut checkout = server.checkout();
    let to = address("Rita Refund", "3 Rua do Reembolso", "+351 900 000 003");

    // Offered, not accepted yet: the refund withdraws it.
    let offered = hold(&server, "refunds", "rita").await.order_id;
    checkout.confirm(delivery(&offered, PRICE, &to)).await.unwrap();
    let offer = next_offer(&mut offers, WITHIN).await;
    assert_eq!(offer.order_id, offered);
    sale_booked(&mut lines, &offered).await;
    let refunded = ops
        .refund_order(pb::RefundOrderRequest {
            order_id: offered.clone(),
            reason: "out of stock at the hub".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(refunded.state(), pb::SettlementState::Refunded);
    assert_eq!(
        next_withdrawal(&mut offers, WITHIN).await.dispatch_id,
        offer.dispatch_id
    );
    refused(
        courier
            .accept(AcceptRequest {
                dispatch_id: offer.dispatch_id.clone(),
            })
            .await,
        Code::FailedPrecondition,
        &offered,
    );
    let tracking = order_as(&mut checkout, &offered).await.tracking.unwrap();
    assert_eq!(tracking.stage(), TrackingStage::Cancelled);

    // Picked up: the refund is refused and changes nothing.
    let gone = hold(&server, "refunds", "sam").await.order_id;
    let code = confirmed(&mut checkout, delivery(&gone, PRICE, &to)).await.pickup_code;
    let offer = next_offer(&mut offers, WITHIN).await;
    assert_eq!(offer.order_id, gone);
    pick_up(&mut courier, &offer.dispatch_id, &code).await;
    sale_booked(&mut lines, &gone).await;
    let balance = pb::GetBalanceRequest {
        creator_id: "creator-1".into(),
    };
    let booked = pb::GetOrderSettlementRequest { order_id: gone.clone() };
    let balance_before = ops.get_balance(balance.clone()).await.unwrap().into_inner();
    let settlement_before = ops.get_order_settlement(booked.clone()).await.unwrap().into_inner();
    assert_eq!(settlement_before.state(), pb::SettlementState::AwaitingDelivery);
    refused(
        ops.refund_order(pb::RefundOrderRequest {
            order_id: gone.clone(),
            reason: "changed my mind".into(),
        })
        .await,
        Code::FailedPrecondition,
        &gone,
    );
    assert_eq!(ops.get_balance(balance).await.unwrap().into_inner(), balance_before);
    assert_eq!(
        ops.get_order_settlement(booked).await.unwrap().into_inner(),
        settlement_before
    );
    let dispatch = get_dispatch(&mut courier, &offer.dispatch_id).await;
    assert_eq!(dispatch.stage(), DispatchStage::PickedUp);
    assert!(dispatch.address.is_some(), "the courier still has where to go");
    let tracking = order_as(&mut checkout, &gone).await.tracking.unwrap();
    assert_eq!(tracking.stage(), TrackingStage::OnItsWay);
    server.stop().await;
}

/// A drop of SKUs `tees` (5 units at hub-2) and `caps` (2 at hub-2, 1 at hub-porto-2), all
/// in Porto, up to 10 per buyer.
async fn open_porto_drop(server: &TestServer) {
    server
        .registry()
        .create_hub(registry::CreateHubRequest {
            hub: Some(hub_spec("hub-porto-2", "Porto", 1_000, 30)),
        })
        .await
        .unwrap();
    let mut request = drop_request("porto", &[("tees", 5), ("caps", 2)], 10, 600);
    for sku in &mut request.skus {
        sku.allocations[0].hub_id = "hub-2".into();
        sku.allocations[0].city = "Porto".into();
    }
    request.skus[1].allocations.push(proto::operator::v1::Allocation {
        hub_id: "hub-porto-2".into(),
        city: "Porto".into(),
        quantity: 1,
    });
    open_drop(server, request).await;
}

/// Reserves `quantity` of `sku_id` in Porto for `buyer`, at `hub_id` if one is named.
async fn reserve_in_porto(
    server: &TestServer,
    sku_id: &str,
    buyer: &str,
    quantity: u32,
    hub_id: &str,
) -> ReserveResponse {
    server
        .checkout()
        .reserve(ReserveRequest {
            city: "Porto".into(),
            hub_id: hub_id.into(),
            ..reserve("porto", sku_id, buyer, quantity)
        })
        .await
        .unwrap()
        .into_inner()
}

async fn porto_level(server: &TestServer, sku_id: &str) -> Level {
    let availability = server
        .anonymous_checkout()
        .get_availability(GetAvailabilityRequest {
            drop_id: "porto".into(),
            city: "Porto".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let sku = availability
        .skus
        .iter()
        .find(|s| s.sku_id == sku_id)
        .unwrap_or_else(|| panic!("no level for {sku_id}: {availability:?}"));
    sku.level()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waitlisted_buyer_never_strands_stock_the_city_could_sell() {
    let server = TestServer::start().await;
    open_porto_drop(&server).await;

    // Seven of five: the buyer waits, and blocks nobody.
    let greedy = reserve_in_porto(&server, "tees", "greedy", 7, "").await;
    assert_eq!(
        (greedy.outcome(), greedy.waitlist_position),
        (ReserveOutcome::Waitlisted, 1)
    );
    assert_eq!(stock(&server, "porto", "tees").await, (5, 5, 0, 0, 7));
    let one = reserve_in_porto(&server, "tees", "modest", 1, "").await;
    assert_eq!((one.outcome(), one.hub_id.as_str()), (ReserveOutcome::Held, "hub-2"));
    assert_eq!(stock(&server, "porto", "tees").await, (5, 4, 1, 0, 7));
    // A one-unit buyer would be served now, and the level says so.
    assert_eq!(porto_level(&server, "tees").await, Level::InStock);
    let four = reserve_in_porto(&server, "tees", "keen", 4, "").await;
    assert_eq!(four.outcome(), ReserveOutcome::Held);
    assert_eq!(stock(&server, "porto", "tees").await, (5, 0, 5, 0, 7));
    // Nothing free, some held: the level says WAITLIST and a one-unit buyer waits.
    assert_eq!(porto_level(&server, "tees").await, Level::Waitlist);
    let late = reserve_in_porto(&server, "tees", "late", 1, "").await;
    assert_eq!(late.outcome(), ReserveOutcome::Waitlisted);

    // A buyer pinned to an empty hub waits, and the city's other hub still sells.
    let first = reserve_in_porto(&server, "caps", "first", 1, "hub-porto-2").await;
    assert_eq!(
        (first.outcome(), first.hub_id.as_str()),
        (ReserveOutcome::Held, "hub-porto-2")
    );
    let pinned = reserve_in_porto(&server, "caps", "pinned", 1, "hub-porto-2").await;
    assert_eq!(pinned.outcome(), ReserveOutcome::Waitlisted);
    assert_eq!(porto_level(&server, "caps").await, Level::InStock);
    let anywhere = reserve_in_porto(&server, "caps", "anywhere", 1, "").await;
    assert_eq!(
        (anywhere.outcome(), anywhere.hub_id.as_str()),
        (ReserveOutcome::Held, "hub-2")
    );
    let at_hub = reserve_in_porto(&server, "caps", "at-hub", 1, "hub-2").await;
    assert_eq!(
        (at_hub.outcome(), at_hub.hub_id.as_str()),
        (ReserveOutcome::Held, "hub-2")
    );
    assert_eq!(stock(&server, "porto", "caps").await, (3, 0, 3, 0, 1));
    let pinned_order = order_as(&mut server.checkout(), &pinned.order_id).await;
    assert_eq!(pinned_order.status(), OrderStatus::Waitlisted);
    server.stop().await;
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_address_is_never_at_rest_in_the_clear_and_is_gone_once_shredded() {
    let server = TestServer::start().await;
    let (_, mut courier, mut offers) = subscribed_courier(&server, "vic", "hub-1").await;
    open_drop(&server, drop_request("vault", &[("sku", 10)], 1, 600)).await;
    let (name, street, phone) = (
        "Zebedee Quixotic-Marchbanks",
        "77 Sesquipedalian Row",
        "+351 987 654 321",
    );
    let order_id = hold(&server, "vault", "zeb").await.order_id;
    server
        .checkout()
        .confirm(delivery(&order_id, PRICE, &address(name, street, phone)))
        .await
        .unwrap();
    let offer = next_offer(&mut offers, WITHIN).await;
    assert_eq!(offer.order_id, order_id);
    assert_eq!(
        address_seen(&mut courier, &offer.dispatch_id).await,
        Some((name.to_string(), street.to_string()))
    );

    let files = files_under(server.dir.path());
    let mut bytes_read = 0;
    for file in &files {
        let bytes = std::fs::read(file).unwrap();
        bytes_read += bytes.len();
        for secret in [name, street, phone] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret:?} in the clear in {}",
                file.display()
            );
        }
    }
    assert!(bytes_read > 0, "nothing at rest under {}", server.dir.path().display());

    // Shredding, with the vault's time driven past the order's retention (the server's own
    // pass, once a minute, may come first: then this one has nothing left to shred).
    let order = domain::OrderId::parse(&order_id).unwrap();
    server.platform.keep_address_for(&order, 0).await;
    let shredded = server
        .platform
        .addresses
        .shred_due(domain::UnixMillis(i64::MAX / 2), 100)
        .await
        .unwrap();
    assert!(shredded <= 1, "{shredded} addresses shredded, one was stored");
    assert!(!in_vault(&server, &order_id).await);
    assert_eq!(address_seen(&mut courier, &offer.dispatch_id).await, None);
    assert_eq!(
        get_dispatch(&mut courier, &offer.dispatch_id).await.stage(),
        DispatchStage::Accepted
    );
    server.stop().await;
}

/// Shreds what is due at `now + ahead_ms` (the vault's time driven, not waited for) until
/// `order_id` is gone, for at most `budget` of the server's own work (the hub's hook runs
/// just after its events are durable).
async fn shredded_by(server: &TestServer, order_id: &str, ahead_ms: u64, budget: Duration) -> bool {
    let until = tokio::time::Instant::now() + budget;
    while tokio::time::Instant::now() < until {
        let at = server.platform.clock.now().plus_ms(ahead_ms);
        server.platform.addresses.shred_due(at, 1_000).await.unwrap();
        if !in_vault(server, order_id).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_follows_its_fulfilment_kept_through_the_return_window_once_delivered_and_gone_once_withdrawn() {
    let server = TestServer::start().await;
    let (_, mut courier, mut offers) = subscribed_courier(&server, "wes", "hub-1").await;
    open_drop(&server, drop_request("retain", &[("sku", 10)], 2, 600)).await;
    let mut checkout = server.checkout();
    let window = domain::limits::DEFAULT_RETURN_WINDOW_MS;

    // Delivered: kept for the return window (a return is collected from it), then shredded.
    let delivered = hold(&server, "retain", "dee").await.order_id;
    let order = confirmed(
        &mut checkout,
        delivery(
            &delivered,
            PRICE,
            &address("Dee Livered", "1 Rua Entregue", "+351 900 000 010"),
        ),
    )
    .await;
    let offer = next_offer(&mut offers, WITHIN).await;
    assert_eq!(offer.order_id, delivered);
    pick_up(&mut courier, &offer.dispatch_id, &order.pickup_code).await;
    courier
        .mark_delivered(MarkDeliveredRequest {
            dispatch_id: offer.dispatch_id.clone(),
            proof_reference: "photo-10".into(),
        })
        .await
        .unwrap();
    // A hook that shredded at once would do so within milliseconds of the delivery.
    let inside = shredded_by(&server, &delivered, window - 60_000, Duration::from_millis(500)).await;
    assert!(!inside, "shredded inside the return window");
    let after = shredded_by(&server, &delivered, window + 60_000, WITHIN).await;
    assert!(after, "kept past the return window");

    // Withdrawn by a cancel before pickup: gone at once (not at the 30-day bound).
    let cancelled = hold(&server, "retain", "cal").await.order_id;
    confirmed(
        &mut checkout,
        delivery(
            &cancelled,
            PRICE,
            &address("Cal Celled", "2 Rua Anulada", "+351 900 000 011"),
        ),
    )
    .await;
    assert_eq!(next_offer(&mut offers, WITHIN).await.order_id, cancelled);
    checkout
        .cancel(CancelRequest {
            order_id: cancelled.clone(),
        })
        .await
        .unwrap();
    let gone = shredded_by(&server, &cancelled, 1_000, WITHIN).await;
    assert!(gone, "kept after its dispatch was withdrawn");
    server.stop().await;
}
