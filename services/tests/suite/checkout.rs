//! Checkout and operator flows over real gRPC on 127.0.0.1:0.

use proto::checkout::v1::*;
use proto::operator::v1::GetDropRequest;
use std::collections::HashSet;
use std::time::Duration;
use testkit::*;
use tonic::Code;
use tonic_types::StatusExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_2000_reserves_for_100_units_holds_exactly_100() {
    let server = TestServer::start().await;
    open_drop(&server, drop_request("burst", &[("hot", 100)], 1, 600)).await;
    let mut tasks = Vec::new();
    for i in 0..2_000 {
        let mut checkout = server.checkout();
        tasks.push(tokio::spawn(async move {
            let request = ReserveRequest {
                skip_waitlist: true,
                ..reserve("burst", "hot", &format!("buyer-{i}"), 1)
            };
            checkout.reserve(request).await.map(|r| r.into_inner())
        }));
    }
    let mut held = HashSet::new();
    let mut sold_out = 0;
    for task in tasks {
        let reply = task.await.unwrap().expect("every reserve answers");
        match ReserveOutcome::try_from(reply.outcome).unwrap() {
            ReserveOutcome::Held => assert!(held.insert(reply.order_id)),
            ReserveOutcome::SoldOut => sold_out += 1,
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!(held.len(), 100);
    assert_eq!(sold_out, 1_900);
    let figures = server.drop_figures("burst").await;
    assert_eq!(
        (figures.skus[0].held, figures.skus[0].available, figures.skus[0].sold),
        (100, 0, 0)
    );
    let audit = actors::audit::audit_drop(
        server.platform.journal.as_ref(),
        &domain::DropId::parse("burst").unwrap(),
    )
    .await
    .unwrap();
    assert_eq!((audit[0].held, audit[0].oversold), (100, 0));
    audit[0].invariants.clone().unwrap();
    server.stop().await;
}

/// On a driven clock: the expiry comes at the hold's deadline to the millisecond, without
/// real waiting.
#[tokio::test(start_paused = true)]
async fn expiry_returns_stock_and_promotes_the_waitlist_which_watch_order_sees() {
    let server = TestServer::start_driven().await;
    open_drop(&server, drop_request("expiry", &[("one", 1)], 1, 3)).await;
    let mut checkout = server.checkout();
    let first = checkout
        .reserve(reserve("expiry", "one", "ana", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.outcome, ReserveOutcome::Held as i32);
    let second = checkout
        .reserve(reserve("expiry", "one", "ben", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.outcome, ReserveOutcome::Waitlisted as i32);
    assert_eq!(second.waitlist_position, 1);
    let availability = checkout
        .get_availability(GetAvailabilityRequest {
            drop_id: "expiry".into(),
            city: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(availability.skus[0].level, Level::Waitlist as i32);

    let mut watch = checkout
        .watch_order(WatchOrderRequest {
            order_id: second.order_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let now = watch.message().await.unwrap().unwrap();
    assert_eq!(now.status, OrderStatus::Waitlisted as i32);
    // The first hold's expiry promotes the waitlisted buyer.
    let promoted = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("promotion within 10 s")
        .unwrap()
        .unwrap();
    let expired_at = services::convert::millis(first.expires_at.as_ref().unwrap());
    assert_eq!(
        server.platform.clock.now().0,
        expired_at,
        "promoted at the first hold's deadline"
    );
    assert_eq!(promoted.status, OrderStatus::Held as i32);
    assert_eq!(
        promoted.expires_at.as_ref().map(services::convert::millis),
        Some(expired_at + 3_000)
    );
    let expired = checkout
        .get_order(GetOrderRequest {
            order_id: first.order_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(expired.status, OrderStatus::Expired as i32);
    let late = checkout.confirm(pickup(&first.order_id, 2_500)).await.unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    let confirmed = checkout
        .confirm(pickup(&second.order_id, 2_500))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(confirmed.order.unwrap().status, OrderStatus::Confirmed as i32);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_gives_a_receipt_without_pii_and_discreet_hides_the_product() {
    let server = TestServer::start().await;
    open_drop(&server, drop_request("receipts", &[("toy", 10)], 2, 600)).await;
    let mut checkout = server.checkout();
    let held = checkout
        .reserve(reserve("receipts", "toy", "cara", 2))
        .await
        .unwrap()
        .into_inner();
    let request = ConfirmRequest {
        fulfilment: Some(confirm_request::Fulfilment::Delivery(Delivery {
            address: Some(Address {
                recipient_name: "Cara Secret".into(),
                line1: "1 Hidden Lane".into(),
                postal_code: "1000".into(),
                city: "Lisbon".into(),
                country: "PT".into(),
                ..Default::default()
            }),
        })),
        discreet: true,
        ..pickup(&held.order_id, 5_000)
    };
    let reply = checkout.confirm(request.clone()).await.unwrap().into_inner();
    let receipt = reply.receipt.unwrap();
    assert_eq!(receipt.description, "Dropline order");
    assert_eq!(receipt.pickup_code.len(), 6);
    assert_eq!(receipt.receipt_token.len(), 32);
    let printed = format!("{receipt:?}");
    assert!(!printed.contains("Cara") && !printed.contains("Hidden") && !printed.contains("toy"));
    // Confirm again with the same content is a safe retry; different content is refused.
    let again = checkout.confirm(request.clone()).await.unwrap().into_inner();
    assert_eq!(again.receipt.unwrap().receipt_token, receipt.receipt_token);
    let changed = checkout
        .confirm(ConfirmRequest {
            payment_reference: "other".into(),
            ..request
        })
        .await
        .unwrap_err();
    assert_eq!(changed.code(), Code::AlreadyExists);
    // No buyer id or address reaches the journal.
    let journal = std::fs::read_dir(server.dir.path().join("journal")).unwrap();
    for entry in journal {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                !text.contains("\"cara\"") && !text.contains("cara\""),
                "buyer id in {}",
                path.display()
            );
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_100_times_concurrently_makes_one_hold() {
    let server = TestServer::start().await;
    open_drop(&server, drop_request("idem", &[("sku", 50)], 3, 600)).await;
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let mut checkout = server.checkout();
        tasks.push(tokio::spawn(async move {
            let request = ReserveRequest {
                idempotency_key: "key-1".into(),
                ..reserve("idem", "sku", "dan", 2)
            };
            checkout.reserve(request).await.map(|r| r.into_inner().order_id)
        }));
    }
    // One buyer's 100 calls at once: past the per-buyer burst they are told to retry later
    // (and change nothing); every other answer is the one hold.
    let mut ids = HashSet::new();
    let mut throttled = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(id) => {
                ids.insert(id);
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.get_details_retry_info().is_some(), "{status:?}");
                throttled += 1;
            }
        }
    }
    assert_eq!(ids.len(), 1);
    assert!(throttled <= 100 - services::throttle::BUYER_RESERVE_BURST_DEFAULT as usize);
    let figures = server.drop_figures("idem").await;
    assert_eq!(figures.skus[0].held, 2);
    let reused = server
        .checkout()
        .reserve(ReserveRequest {
            idempotency_key: "key-1".into(),
            ..reserve("idem", "sku", "eve", 1)
        })
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists);
    assert!(reused.message().contains("idempotency key"));
    server.stop().await;
}

/// Every bad input gets its own clear status and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_clear_statuses_and_change_nothing() {
    use tonic_types::StatusExt;
    let server = TestServer::start().await;
    open_drop(&server, drop_request("bad", &[("sku", 5)], 2, 600)).await;
    let mut checkout = server.checkout();
    let mut operator = server.operator();
    let before = operator
        .get_drop(GetDropRequest { drop_id: "bad".into() })
        .await
        .unwrap()
        .into_inner();

    let fields = |status: &tonic::Status| -> Vec<String> {
        status
            .get_details_bad_request()
            .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
            .unwrap_or_default()
    };
    let cases: Vec<(ReserveRequest, &str)> = vec![
        (reserve("", "sku", "b", 1), "drop_id"),
        (reserve(&"x".repeat(65), "sku", "b", 1), "drop_id"),
        (reserve("bad", "sk u", "b", 1), "sku_id"),
        (reserve("bad", "sku", "", 1), "buyer_id"),
        (reserve("bad", "sku", "b", 0), "quantity"),
        (reserve("bad", "sku", "b", 3), "quantity"),
        (
            ReserveRequest {
                city: "Madrid".into(),
                ..reserve("bad", "sku", "b", 1)
            },
            "city",
        ),
    ];
    for (request, field) in cases {
        let status = checkout.reserve(request.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{request:?}: {status:?}");
        assert!(
            fields(&status).iter().any(|f| f == field),
            "{request:?} should name {field}: {status:?}"
        );
    }
    assert_eq!(
        checkout
            .reserve(reserve("nope", "sku", "b", 1))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        checkout
            .reserve(reserve("bad", "nope", "b", 1))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        checkout
            .get_order(GetOrderRequest {
                order_id: "bad.sku.00000000000000ff".into()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        checkout
            .get_order(GetOrderRequest {
                order_id: "not-an-order".into()
            })
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );

    // Per-buyer limit: RESOURCE_EXHAUSTED.
    checkout.reserve(reserve("bad", "sku", "eve", 2)).await.unwrap();
    assert_eq!(
        checkout
            .reserve(reserve("bad", "sku", "eve", 1))
            .await
            .unwrap_err()
            .code(),
        Code::ResourceExhausted
    );

    // Confirm: wrong amount, unknown currency, missing fulfilment, negative money.
    let held = checkout
        .reserve(reserve("bad", "sku", "fay", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        checkout.confirm(pickup(&held.order_id, 1)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        checkout
            .confirm(pickup(&held.order_id, -2_500))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    let no_currency = ConfirmRequest {
        amount: Some(proto::common::v1::Money {
            minor_units: 2_500,
            currency: "euro".into(),
        }),
        ..pickup(&held.order_id, 2_500)
    };
    assert!(fields(&checkout.confirm(no_currency).await.unwrap_err()).contains(&"amount.currency".to_string()));
    let no_fulfilment = ConfirmRequest {
        fulfilment: None,
        ..pickup(&held.order_id, 2_500)
    };
    assert!(fields(&checkout.confirm(no_fulfilment).await.unwrap_err()).contains(&"fulfilment".to_string()));

    // Operator: closes_at before opens_at, negative price, missing timestamps, unknown drop.
    let mut backwards = drop_request("bad2", &[("sku", 5)], 2, 600);
    backwards.closes_at = Some(ts(-10));
    assert!(fields(&operator.create_drop(backwards).await.unwrap_err()).contains(&"closes_at".to_string()));
    let mut negative = drop_request("bad3", &[("sku", 5)], 2, 600);
    negative.skus[0].price = eur(-1);
    assert!(
        fields(&operator.create_drop(negative).await.unwrap_err()).contains(&"skus[0].price.minor_units".to_string())
    );
    let mut untimed = drop_request("bad4", &[("sku", 5)], 2, 600);
    untimed.opens_at = None;
    assert!(fields(&operator.create_drop(untimed).await.unwrap_err()).contains(&"opens_at".to_string()));
    assert_eq!(
        operator
            .get_drop(GetDropRequest { drop_id: "bad2".into() })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    // A drop that has not opened refuses reserves with FAILED_PRECONDITION.
    let mut later = drop_request("later", &[("sku", 5)], 2, 600);
    later.opens_at = Some(ts(600));
    operator.create_drop(later).await.unwrap();
    assert_eq!(
        checkout
            .reserve(reserve("later", "sku", "b", 1))
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );

    // Nothing but the two good reserves changed the drop.
    let after = operator
        .get_drop(GetDropRequest { drop_id: "bad".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.skus[0].allocated, after.skus[0].allocated);
    assert_eq!(after.skus[0].held, 3);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restock_promotes_the_waitlist_and_health_and_reflection_answer() {
    let server = TestServer::start().await;
    open_drop(&server, drop_request("restock", &[("sku", 1)], 1, 600)).await;
    let mut checkout = server.checkout();
    checkout.reserve(reserve("restock", "sku", "a", 1)).await.unwrap();
    let waiting = checkout
        .reserve(reserve("restock", "sku", "b", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(waiting.outcome, ReserveOutcome::Waitlisted as i32);
    let request = proto::operator::v1::RestockRequest {
        drop_id: "restock".into(),
        sku_id: "sku".into(),
        hub_id: "hub-1".into(),
        quantity: 3,
        idempotency_key: "r1".into(),
        ..Default::default()
    };
    let figures = server.operator().restock(request.clone()).await.unwrap().into_inner();
    assert_eq!((figures.allocated, figures.held, figures.available), (4, 2, 2));
    // The same restock again is a safe retry.
    assert_eq!(
        server.operator().restock(request).await.unwrap().into_inner().allocated,
        4
    );
    let promoted = checkout
        .get_order(GetOrderRequest {
            order_id: waiting.order_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(promoted.status, OrderStatus::Held as i32);

    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel.clone());
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "dropline.checkout.v1.CheckoutService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse, ServerReflectionRequest,
    };
    let mut reflection = ServerReflectionClient::new(server.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = replies.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(
        names.contains(&"dropline.checkout.v1.CheckoutService")
            && names.contains(&"dropline.operator.v1.OperatorService"),
        "{names:?}"
    );
    server.stop().await;
}

/// Opens `drop_id` with SKUs `sku-0`, `sku-1`, … of `units` units each, and returns their ids.
async fn open_drop_of(
    server: &TestServer,
    drop_id: &str,
    skus: usize,
    units: u32,
    hold_ttl_seconds: u32,
) -> Vec<String> {
    let skus: Vec<String> = (0..skus).map(|i| format!("sku-{i}")).collect();
    let stock: Vec<(&str, u32)> = skus.iter().map(|sku| (sku.as_str(), units)).collect();
    open_drop(server, drop_request(drop_id, &stock, 1, hold_ttl_seconds)).await;
    skus
}

/// Opens `drop_id` with `skus` SKUs of 5 units (`sku-0`, `sku-1`, …) and holds one unit of
/// each, one SKU after another, each by its own buyer; returns the order ids.
async fn hold_one_unit_of_each(server: &TestServer, drop_id: &str, skus: usize, hold_ttl_seconds: u32) -> Vec<String> {
    let skus = open_drop_of(server, drop_id, skus, 5, hold_ttl_seconds).await;
    let mut checkout = server.checkout();
    let mut holds = Vec::new();
    for sku in &skus {
        let held = checkout
            .reserve(reserve(drop_id, sku, &format!("buyer-{sku}"), 1))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(held.outcome(), ReserveOutcome::Held);
        holds.push(held.order_id);
    }
    holds
}

/// With at most 3 SKU actors running, reserving 12 SKUs one after another asks the least
/// recently used actors to stop early; their holds stay (each is rebuilt from the journal on
/// its next command) and can be confirmed, with the bound still kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_live_actor_bound_the_least_recently_used_stop_and_lose_nothing() {
    const BOUND: usize = 3;
    let server = TestServer::start_with_live_actors_max(BOUND).await;
    let holds = hold_one_unit_of_each(&server, "bounded", 12, 600).await;
    let mut checkout = server.checkout();
    let running_skus = || server.platform.actors.live_actors().1;
    let settled = |what: &str| {
        let what = what.to_owned();
        async move {
            // Stopping is asynchronous (a journal write may be in flight); it takes
            // milliseconds, the wait is bounded.
            for _ in 0..500 {
                if running_skus() <= BOUND {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("{} SKU actors still running {what}, bound {BOUND}", running_skus());
        }
    };
    settled("after 12 reserves").await;
    assert_eq!(running_skus(), BOUND, "the most recently used actors keep running");
    for order_id in &holds {
        let confirmed = checkout.confirm(pickup(order_id, 2_500)).await.unwrap().into_inner();
        assert_eq!(confirmed.order.unwrap().status(), OrderStatus::Confirmed);
    }
    settled("after 12 confirms").await;
    let figures = server.drop_figures("bounded").await;
    assert_eq!(figures.skus.len(), 12);
    for sku in &figures.skus {
        assert_eq!((sku.held, sku.available, sku.sold), (0, 4, 1), "{}", sku.sku_id);
    }
    server.stop().await;
}

/// Holds of SKU actors stopped early for the bound still expire on time: each stopping actor
/// hands its deadline to the wake-up scheduler, which starts it again to expire the hold.
/// On a driven clock, so "on time" is checked to the poll's 10 ms.
#[tokio::test(start_paused = true)]
async fn holds_of_actors_stopped_for_the_bound_still_expire() {
    const BOUND: usize = 2;
    let server = TestServer::start_driven_with_live_actors_max(BOUND).await;
    let clock = server.platform.clock.clone();
    // The shortest hold the API allows: one second.
    let first_held = clock.now();
    hold_one_unit_of_each(&server, "expiring", 6, 1).await;
    let last_held = clock.now();
    // Waits are bounded; what they wait for (stops, a 1 s expiry) takes far less.
    let mut expired = false;
    let mut at_most_bound = false;
    for _ in 0..1_000 {
        at_most_bound |= server.platform.actors.live_actors().1 <= BOUND;
        let figures = server.drop_figures("expiring").await;
        if figures.skus.iter().all(|sku| (sku.held, sku.available) == (0, 5)) {
            expired = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        at_most_bound,
        "the bound of {BOUND} running SKU actors was never reached"
    );
    assert!(expired, "some holds never expired");
    let seen = clock.now().0;
    assert!(
        (first_held.0 + 1_000..=last_held.0 + 1_000 + 10).contains(&seen),
        "all expired by {seen}, holds made from {} to {}",
        first_held.0,
        last_held.0
    );
    server.stop().await;
}

/// Under a bound of one running SKU actor, concurrent buyers of four SKUs make every actor
/// stop and start again all the time. No command may be lost in the hand-over: one that
/// reaches an actor on its way out is handed back and served by the next one, never
/// answered UNAVAILABLE, and every unit held is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_racing_an_actor_that_stops_for_the_bound_are_all_served() {
    const SKUS: usize = 4;
    const BUYERS: usize = 8;
    const RESERVES_PER_BUYER: usize = 40;
    let server = TestServer::start_with_live_actors_max(1).await;
    let skus = open_drop_of(&server, "churn", SKUS, 1_000, 600).await;
    let mut buyers = tokio::task::JoinSet::new();
    for b in 0..BUYERS {
        let mut checkout = server.checkout();
        let skus = skus.clone();
        buyers.spawn(async move {
            for r in 0..RESERVES_PER_BUYER {
                let sku = &skus[(b + r) % SKUS];
                let buyer = format!("buyer-{b}-{r}");
                let held = checkout
                    .reserve(reserve("churn", sku, &buyer, 1))
                    .await
                    .unwrap_or_else(|status| panic!("reserve {r} of buyer {b} on {sku} failed: {status:?}"))
                    .into_inner();
                assert_eq!(held.outcome(), ReserveOutcome::Held);
            }
        });
    }
    while let Some(done) = buyers.join_next().await {
        done.unwrap();
    }
    let figures = server.drop_figures("churn").await;
    let held: u32 = figures.skus.iter().map(|sku| sku.held).sum();
    assert_eq!(held as usize, BUYERS * RESERVES_PER_BUYER);
    server.stop().await;
}
