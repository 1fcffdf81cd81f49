//! Courier dispatch over real gRPC: offers reach subscribed couriers, a silent courier is
//! swapped out after its accept deadline (and the buyer sees it), a reconnecting courier
//! gets its unanswered offers again, partners act only on their own dispatches, and a full
//! hub promises the next slot.

use proto::checkout::v1::*;
use proto::dispatch::v1::dispatch_update::Update;
use proto::dispatch::v1::*;
use proto::registry::v1 as registry;
use std::time::{Duration, Instant};
use testkit::*;
use tonic::Code;

/// A hub with a 2-second accept deadline and its own drop.
async fn fast_hub(server: &TestServer, hub_id: &str, capacity: u32) {
    server
        .registry()
        .create_hub(registry::CreateHubRequest {
            hub: Some(hub_spec(hub_id, "Lisbon", capacity, 2)),
        })
        .await
        .unwrap();
}

fn drop_at(drop_id: &str, hub_id: &str, stock: u32) -> proto::operator::v1::CreateDropRequest {
    let mut request = drop_request(drop_id, &[("sku", stock)], 5, 600);
    request.skus[0].allocations[0].hub_id = hub_id.into();
    request
}

/// On a driven clock: the swap comes at the accept deadline to the millisecond, without real
/// waiting.
#[tokio::test(start_paused = true)]
async fn a_silent_courier_is_swapped_after_its_deadline_and_the_buyer_sees_it() {
    let server = TestServer::start_driven().await;
    fast_hub(&server, "hub-fast", 1_000).await;
    let silent = courier(&server.channel, "silent", "hub-fast", 1).await;
    let backup = courier(&server.channel, "backup", "hub-fast", 2).await;
    let mut silent_stream = courier_client(&server.channel, &silent)
        .subscribe(SubscribeRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut backup_stream = courier_client(&server.channel, &backup)
        .subscribe(SubscribeRequest {})
        .await
        .unwrap()
        .into_inner();
    open_drop(&server, drop_at("swap", "hub-fast", 10)).await;
    let confirmed = buy(&server, "swap", "sku", "ana").await;
    let order = confirmed.order.unwrap();
    let tracking = order.tracking.expect("the window is promised at confirm");
    assert!(tracking.window_by.is_some());
    let mut watch = server
        .checkout()
        .watch_order(WatchOrderRequest {
            order_id: order.order_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();

    // The primary gets the offer and says nothing.
    let offer = next_offer(&mut silent_stream, Duration::from_secs(2)).await;
    assert_eq!(offer.order_id, order.order_id);
    assert_eq!(offer.attempt, 1);
    assert!(offer.item.is_empty() || offer.item == "item sku");
    let deadline = offer.deadline.unwrap();
    let deadline_ms = services::convert::millis(&deadline);

    // The secondary gets it at the deadline.
    let swapped = next_offer(&mut backup_stream, Duration::from_secs(4)).await;
    let now_ms = server.platform.clock.now().0;
    assert_eq!(swapped.dispatch_id, offer.dispatch_id);
    assert_eq!(swapped.attempt, 2);
    assert_eq!(now_ms, deadline_ms, "the swap arrives at the deadline");
    let missed = swapped.previous_deadline_missed.expect("the missed deadline is stated");
    assert_eq!(missed, deadline);
    // Counted for /metrics once durable, before the offer went out.
    let metrics = services::telemetry::metrics::parse_samples(&services::telemetry::metrics::render(&server.platform));
    assert_eq!(
        metrics.get(r#"dropline_hub_swaps_total{hub="hub-fast",reason="missed_accept"}"#),
        Some(&1.0)
    );
    assert_eq!(
        metrics.get(r#"dropline_hub_sla_misses_total{hub="hub-fast",deadline="accept"}"#),
        Some(&1.0)
    );

    // The silent courier is told and can no longer take it.
    let mut silent_client = courier_client(&server.channel, &silent);
    let late = silent_client
        .accept(AcceptRequest {
            dispatch_id: offer.dispatch_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");

    // The buyer's WatchOrder shows the swap and a new ETA.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let message = tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), watch.message())
            .await
            .expect("the buyer hears of the swap")
            .unwrap()
            .unwrap();
        if let Some(t) = message.tracking {
            if t.partner_swaps >= 1 {
                assert!(!t.last_swap_reason.is_empty());
                assert!(t.eta.is_some());
                break;
            }
        }
    }

    // The backup delivers; a wrong pickup code changes nothing.
    let mut backup_client = courier_client(&server.channel, &backup);
    let accepted = backup_client
        .accept(AcceptRequest {
            dispatch_id: swapped.dispatch_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(accepted.stage, DispatchStage::Accepted as i32);
    let wrong = backup_client
        .mark_picked_up(MarkPickedUpRequest {
            dispatch_id: swapped.dispatch_id.clone(),
            pickup_code: "not-the-code".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::InvalidArgument);
    backup_client
        .mark_picked_up(MarkPickedUpRequest {
            dispatch_id: swapped.dispatch_id.clone(),
            pickup_code: order.pickup_code.clone(),
        })
        .await
        .unwrap();
    let delivered = backup_client
        .mark_delivered(MarkDeliveredRequest {
            dispatch_id: swapped.dispatch_id.clone(),
            proof_reference: "photo-123".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(delivered.stage, DispatchStage::Delivered as i32);
    // Idempotent: the same update again returns the dispatch as it is.
    let again = backup_client
        .mark_delivered(MarkDeliveredRequest {
            dispatch_id: swapped.dispatch_id.clone(),
            proof_reference: "photo-123".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.stage, DispatchStage::Delivered as i32);
    let final_order = server
        .checkout()
        .get_order(GetOrderRequest {
            order_id: order.order_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(final_order.tracking.unwrap().stage, TrackingStage::Delivered as i32);

    // The audit trail tells the story, per order and per partner.
    let trail = server
        .registry()
        .list_audit_entries(registry::ListAuditEntriesRequest {
            subject: Some(registry::list_audit_entries_request::Subject::OrderId(
                order.order_id.clone(),
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let actions: Vec<&str> = trail.entries.iter().rev().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "dispatched",
            "offered",
            "swapped",
            "offered",
            "accepted",
            // The wrong code tried above is on the trail (the code itself is not).
            "pickup_code_refused",
            "picked_up",
            "delivered"
        ]
    );
    let partner_trail = server
        .registry()
        .list_audit_entries(registry::ListAuditEntriesRequest {
            subject: Some(registry::list_audit_entries_request::Subject::PartnerId(
                "backup".into(),
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(partner_trail.entries.iter().any(|e| e.action == "credential_used"));
    assert!(partner_trail.entries.iter().any(|e| e.action == "assigned"));
    let hub = server
        .registry()
        .get_hub(registry::GetHubRequest {
            hub_id: "hub-fast".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((hub.delivered, hub.swaps), (1, 1));
    let silent_metrics = hub.partners.iter().find(|p| p.partner_id == "silent").unwrap();
    assert_eq!(silent_metrics.metrics.as_ref().unwrap().missed_accept, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_courier_that_reconnects_gets_its_unanswered_offers_again() {
    let server = TestServer::start().await;
    let credential = courier(&server.channel, "flaky", "hub-1", 1).await;
    open_drop(&server, drop_request("again", &[("sku", 10)], 5, 600)).await;
    // Offers made while the courier is away wait for it.
    let first = buy(&server, "again", "sku", "ana").await.order.unwrap();
    let mut client = courier_client(&server.channel, &credential);
    let mut stream = client.subscribe(SubscribeRequest {}).await.unwrap().into_inner();
    assert_eq!(
        next_offer(&mut stream, Duration::from_secs(2)).await.order_id,
        first.order_id
    );
    let second = buy(&server, "again", "sku", "bea").await.order.unwrap();
    assert_eq!(
        next_offer(&mut stream, Duration::from_secs(2)).await.order_id,
        second.order_id
    );
    drop(stream);
    // Reconnect: both unanswered offers come first, oldest first.
    let mut stream = client.subscribe(SubscribeRequest {}).await.unwrap().into_inner();
    let replayed = [
        next_offer(&mut stream, Duration::from_secs(2)).await.order_id,
        next_offer(&mut stream, Duration::from_secs(2)).await.order_id,
    ];
    assert_eq!(replayed, [first.order_id.clone(), second.order_id.clone()]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partners_act_only_on_their_own_dispatches_and_credentials_are_checked() {
    let server = TestServer::start().await;
    let mine = courier(&server.channel, "mine", "hub-1", 1).await;
    let other = courier(&server.channel, "other", "hub-2", 1).await;
    open_drop(&server, drop_request("own", &[("sku", 10)], 5, 600)).await;
    let order = buy(&server, "own", "sku", "ana").await.order.unwrap();
    let dispatch_id = format!("hub-1/{}", order.order_id);

    let mut thief = courier_client(&server.channel, &other);
    let denied = thief
        .accept(AcceptRequest {
            dispatch_id: dispatch_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let peek = thief
        .get_dispatch(GetDispatchRequest {
            dispatch_id: dispatch_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(peek.code(), Code::PermissionDenied);
    // A partner cannot read another partner's record, nor write to the registry.
    let mut as_partner =
        proto::registry::v1::partner_registry_service_client::PartnerRegistryServiceClient::with_interceptor(
            server.channel.clone(),
            services::auth::Bearer::new(&other).unwrap(),
        );
    let status = as_partner
        .get_partner(registry::GetPartnerRequest {
            partner_id: "mine".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let own = as_partner
        .get_partner(registry::GetPartnerRequest {
            partner_id: "other".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own.hubs[0].hub_id, "hub-2");
    let status = as_partner
        .set_partner_status(registry::SetPartnerStatusRequest {
            partner_id: "other".into(),
            status: registry::PartnerStatus::Active as i32,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // No credential, or a wrong one.
    let mut anonymous = dispatch_service_client::DispatchServiceClient::new(server.channel.clone());
    let status = anonymous
        .accept(AcceptRequest {
            dispatch_id: dispatch_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut forged = courier_client(&server.channel, "dlp_0000");
    let status = forged
        .accept(AcceptRequest {
            dispatch_id: dispatch_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = proto::operator::v1::operator_service_client::OperatorServiceClient::new(server.channel.clone())
        .get_drop(proto::operator::v1::GetDropRequest { drop_id: "own".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    // None of that changed anything: the rightful partner still holds the offer.
    let mut rightful = courier_client(&server.channel, &mine);
    let d = rightful
        .get_dispatch(GetDispatchRequest {
            dispatch_id: dispatch_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.stage, DispatchStage::Offered as i32);
    assert_eq!(d.attempt, 1);
    let accepted = rightful
        .accept(AcceptRequest { dispatch_id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(accepted.stage, DispatchStage::Accepted as i32);
    server.stop().await;
}

/// On a driven clock, so waiting for the next slot boundary costs no real time.
#[tokio::test(start_paused = true)]
async fn a_full_hub_promises_the_next_slot_at_confirm() {
    let server = TestServer::start_driven().await;
    fast_hub(&server, "hub-small", 2).await;
    open_drop(&server, drop_at("busy", "hub-small", 10)).await;
    // The earliest slot an order can be promised is the one holding now + the SLA's total
    // (2 s + 60 s + 600 s here); three buys straddling a slot boundary would see two
    // different "earliest" slots, so they start clear of one.
    let sla_total_ms = (2 + 60 + 600) * 1_000;
    let slot_ms = 3_600_000;
    let into_slot = (server.platform.clock.now().0 + sla_total_ms).rem_euclid(slot_ms);
    if into_slot > slot_ms - 30_000 {
        tokio::time::sleep(Duration::from_millis((slot_ms - into_slot) as u64 + 1_000)).await;
    }
    let mut windows = Vec::new();
    for buyer in ["a", "b", "c"] {
        let order = buy(&server, "busy", "sku", buyer).await.order.unwrap();
        let t = order.tracking.expect("promise at confirm");
        windows.push((t.window_from.unwrap().seconds, t.throttled));
    }
    assert_eq!(windows[0], windows[1]);
    assert!(!windows[0].1);
    assert!(windows[2].1, "the third order is told it gets a later slot");
    assert_eq!(windows[2].0, windows[0].0 + 3_600, "one 60-minute slot later");
    let hub = server
        .registry()
        .get_hub(registry::GetHubRequest {
            hub_id: "hub-small".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(hub.throttled);
    assert_eq!(
        hub.waiting_for_partner, 3,
        "no partner at this hub: the orders wait, and the operator is alerted"
    );
    assert!(!hub.alerts.is_empty());
    // Operators see the flip in the drop too.
    let drop = server
        .operator()
        .get_drop(proto::operator::v1::GetDropRequest { drop_id: "busy".into() })
        .await
        .unwrap()
        .into_inner();
    let load = drop
        .hubs
        .iter()
        .find(|h| h.hub_id == "hub-small")
        .expect("hub load in the drop");
    assert!(load.throttled);
    // A drop cannot sell from a hub that is not registered, or from a hub in another city.
    let mut bad = drop_at("nohub", "hub-nowhere", 10);
    let status = server.operator().create_drop(bad.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    bad.skus[0].allocations[0].hub_id = "hub-2".into();
    let status = server.operator().create_drop(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("Porto"), "{status:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_confirmed_order_withdraws_its_dispatch_until_pickup() {
    let server = TestServer::start().await;
    let credential = courier(&server.channel, "carla", "hub-1", 1).await;
    let mut client = courier_client(&server.channel, &credential);
    let mut stream = client.subscribe(SubscribeRequest {}).await.unwrap().into_inner();
    open_drop(&server, drop_request("cancel", &[("sku", 10)], 5, 600)).await;
    let first = buy(&server, "cancel", "sku", "ana").await.order.unwrap();
    let offer = next_offer(&mut stream, Duration::from_secs(2)).await;
    client
        .accept(AcceptRequest {
            dispatch_id: offer.dispatch_id.clone(),
        })
        .await
        .unwrap();
    let cancelled = server
        .checkout()
        .cancel(CancelRequest {
            order_id: first.order_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(cancelled.status, OrderStatus::Cancelled as i32);
    assert_eq!(cancelled.tracking.unwrap().stage, TrackingStage::Cancelled as i32);
    // The courier is told, and can no longer pick it up.
    let withdrawn = tokio::time::timeout(Duration::from_secs(2), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(withdrawn.update, Some(Update::Withdrawn(w)) if w.dispatch_id == offer.dispatch_id));
    let status = client
        .mark_picked_up(MarkPickedUpRequest {
            dispatch_id: offer.dispatch_id.clone(),
            pickup_code: first.pickup_code.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    // Once picked up, a cancel is refused and changes nothing.
    let second = buy(&server, "cancel", "sku", "bea").await.order.unwrap();
    let offer = next_offer(&mut stream, Duration::from_secs(2)).await;
    client
        .accept(AcceptRequest {
            dispatch_id: offer.dispatch_id.clone(),
        })
        .await
        .unwrap();
    client
        .mark_picked_up(MarkPickedUpRequest {
            dispatch_id: offer.dispatch_id.clone(),
            pickup_code: second.pickup_code.clone(),
        })
        .await
        .unwrap();
    let status = server
        .checkout()
        .cancel(CancelRequest {
            order_id: second.order_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let order = server
        .checkout()
        .get_order(GetOrderRequest {
            order_id: second.order_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(order.status, OrderStatus::Confirmed as i32);
    assert_eq!(order.tracking.unwrap().stage, TrackingStage::OnItsWay as i32);
    server.stop().await;
}
