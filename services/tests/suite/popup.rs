//! A real `dropline serve` and a real `dropline edge` (a pop-up's till server) with a TCP
//! proxy between them that the test cuts: the till keeps selling its lease while cut off,
//! never beyond it, survives kill -9 with every acknowledged sale, and once the link is
//! back the platform books each sale once: the drop is not oversold, the creator's ledger
//! has one sale line per till sale, reconciliation finds no difference. Sales the platform
//! refuses (the lease was closed while the stall was offline) are reported as refunds.

use proto::checkout::v1::checkout_service_client::CheckoutServiceClient;
use proto::checkout::v1::*;
use proto::edge::v1::popup_service_client::PopupServiceClient;
use proto::edge::v1::{GetPopupStatusRequest, PopupStatus, SaleOutcome};
use proto::operator::v1::{CloseLeaseRequest, EdgeRefundReason, GetDropRequest, LeaseStockRequest, SkuFigures};
use proto::settlement::v1::{GetStatementRequest, LineKind, ReconcileRequest};
use services::auth::{Authed, Bearer};
use std::time::Duration;
use testkit::nemesis::proxy::{LinkMode, LinkProxy};
use testkit::*;
use tonic::transport::Channel;
use tonic::Code;

const EDGE: &str = "popup-porto";

struct Stall {
    _dir: tempfile::TempDir,
    upstream: ServeProcess,
    channel: Channel,
    proxy: LinkProxy,
    edge: ServeProcess,
    edge_command: EdgeCommand,
    credential: String,
}

impl Stall {
    fn till(&self, channel: &Channel) -> CheckoutServiceClient<Authed> {
        CheckoutServiceClient::with_interceptor(channel.clone(), Bearer::new(&self.credential).unwrap())
    }

    async fn connect_edge(&mut self) -> Channel {
        self.edge
            .connect(Duration::from_secs(60))
            .await
            .expect("the edge serves")
    }

    async fn status(&self, channel: &Channel) -> PopupStatus {
        PopupServiceClient::with_interceptor(channel.clone(), Bearer::new(&self.credential).unwrap())
            .get_status(GetPopupStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// Polls the edge's status until `done` holds (at most `within`).
    async fn until(
        &self,
        channel: &Channel,
        within: Duration,
        what: &str,
        done: impl Fn(&PopupStatus) -> bool,
    ) -> PopupStatus {
        let until = tokio::time::Instant::now() + within;
        loop {
            let status = self.status(channel).await;
            if done(&status) {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "{what}: not within {within:?}: {status:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Restores the link and waits until the edge's outbox is uploaded.
    async fn heal(&self, edge: &Channel) -> PopupStatus {
        self.proxy.set(LinkMode::Up);
        self.until(edge, Duration::from_secs(60), "uploaded", |s| {
            s.online && s.tills[0].sales_pending == 0
        })
        .await
    }

    /// Reconciliation finds no difference and every ledger balances.
    async fn assert_reconciled(&self) {
        let report = settlement(&self.channel, OPERATOR_TOKEN)
            .reconcile(ReconcileRequest { dry_run: true })
            .await
            .unwrap()
            .into_inner();
        assert!(report.differences.is_empty() && report.balanced, "{report:#?}");
    }

    async fn sku(&self) -> SkuFigures {
        operator_client(&self.channel)
            .get_drop(GetDropRequest {
                drop_id: "porto".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .skus
            .remove(0)
    }
}

/// A platform with drop `porto` (SKU `tee`, 30 units in hub-1), a lease of `leased` units
/// of it to the edge, and the edge running behind a proxy it reaches the platform through.
async fn stall(leased: u32) -> Stall {
    stall_with(leased, 0, &["--top-up-below", "0"]).await
}

/// [`stall`] with a top-up allowance and more flags for the edge.
async fn stall_with(leased: u32, top_up_max: u32, edge_args: &[&str]) -> Stall {
    let dir = tempfile::tempdir().unwrap();
    let mut upstream = ServeCommand::new(dir.path().join("platform")).unwrap().spawn().unwrap();
    let channel = upstream.connect(Duration::from_secs(60)).await.unwrap();
    create_test_hubs(&channel).await;
    creator(&channel, "creator-1").await;
    let mut operator = operator_client(&channel);
    operator
        .create_drop(drop_request("porto", &[("tee", 30)], 30, 600))
        .await
        .unwrap();
    operator
        .open_drop(proto::operator::v1::OpenDropRequest {
            drop_id: "porto".into(),
        })
        .await
        .unwrap();
    let credential = storefront_credential(std::slice::from_ref(&channel), OPERATOR_TOKEN, EDGE)
        .await
        .unwrap();
    operator
        .lease_stock(LeaseStockRequest {
            drop_id: "porto".into(),
            sku_id: "tee".into(),
            hub_id: "hub-1".into(),
            edge_id: EDGE.into(),
            quantity: leased,
            top_up_max,
            key_id: "porto-2026".into(),
            expires_at: Some(ts(3_600)),
            reconcile_window_seconds: 3_600,
        })
        .await
        .unwrap();
    let proxy = LinkProxy::start(0, upstream.addr).await.unwrap();
    let edge_command = EdgeCommand::new(
        &format!("http://{}", proxy.addr()),
        &credential,
        "porto",
        dir.path().join("edge"),
    )
    .unwrap()
    .args([
        "--offline-after-ms",
        "700",
        "--sync-secs",
        "1",
        "--availability-secs",
        "1",
    ])
    .args(edge_args.iter().copied());
    let edge = edge_command.spawn().unwrap();
    Stall {
        _dir: dir,
        upstream,
        channel,
        proxy,
        edge,
        edge_command,
        credential,
    }
}

/// Reserves `quantity` at the till and pays: the receipt, or None when the stall is sold out.
async fn sell(till: &mut CheckoutServiceClient<Authed>, quantity: u32, n: u32) -> Option<ConfirmResponse> {
    let held = till
        .reserve(ReserveRequest {
            drop_id: "porto".into(),
            sku_id: "tee".into(),
            quantity,
            idempotency_key: format!("till-1-{n}"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    if held.outcome == ReserveOutcome::SoldOut as i32 {
        return None;
    }
    assert_eq!(held.outcome, ReserveOutcome::Held as i32, "{held:?}");
    Some(
        till.confirm(ConfirmRequest {
            order_id: held.order_id.clone(),
            payment_reference: format!("card-{n}"),
            amount: eur(2_500 * i64::from(quantity)),
            fulfilment: Some(confirm_request::Fulfilment::Pickup(Pickup {})),
            discreet: false,
        })
        .await
        .unwrap()
        .into_inner(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pop_up_sells_its_lease_offline_survives_kill_9_and_is_booked_once_when_back() {
    let mut stall = stall(10).await;
    let edge = stall.connect_edge().await;
    let mut till = stall.till(&edge);
    let online = stall
        .until(&edge, Duration::from_secs(30), "online with its lease", |s| {
            s.online && s.tills.len() == 1
        })
        .await;
    assert_eq!((online.edge_id.as_str(), online.tills[0].free), (EDGE, 10));
    // The operator sees the edge online, with its lease.
    let seen = stall.sku().await.edges;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        (
            seen[0].edge_id.as_str(),
            seen[0].leased,
            seen[0].granted,
            seen[0].online
        ),
        (EDGE, 10, 10, true),
        "{seen:?}"
    );

    // Who may call the till: the edge's credential only.
    let anonymous = CheckoutServiceClient::new(edge.clone())
        .get_availability(GetAvailabilityRequest {
            drop_id: "porto".into(),
            city: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let operator = CheckoutServiceClient::with_interceptor(edge.clone(), Bearer::new(OPERATOR_TOKEN).unwrap())
        .reserve(ReserveRequest {
            drop_id: "porto".into(),
            sku_id: "tee".into(),
            quantity: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(operator.code(), Code::PermissionDenied);

    // Online: a sale is booked upstream within moments.
    let first = sell(&mut till, 2, 1).await.expect("in stock");
    let receipt = first.receipt.clone().unwrap();
    assert_eq!(receipt.receipt_token.len(), 64, "{receipt:?}");
    assert_eq!(receipt.pickup_code.len(), 6);
    stall
        .until(&edge, Duration::from_secs(30), "the first sale booked", |s| {
            s.tills[0].sales_booked == 1
        })
        .await;

    // Cut off: the till goes on selling its lease, and no more.
    stall.proxy.set(LinkMode::Cut);
    stall
        .until(&edge, Duration::from_secs(30), "offline", |s| !s.online)
        .await;
    let mut offline = Vec::new();
    for n in 2..=4 {
        offline.push(sell(&mut till, 2, n).await.expect("the lease still holds units"));
    }
    assert!(sell(&mut till, 3, 5).await.is_none(), "3 units sold from 2 left");
    let cut = stall.status(&edge).await;
    let t = &cut.tills[0];
    assert_eq!(
        (t.sold, t.free, t.sales_offline, t.sales_pending),
        (8, 2, 3, 3),
        "{cut:#?}"
    );
    // Meanwhile the platform sells the rest of the pool online: nothing of the lease.
    let mut checkout = storefront_client(&stall.channel).await;
    for b in 0..20 {
        let held = checkout
            .reserve(reserve("porto", "tee", &format!("web-{b}"), 1))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(held.outcome, ReserveOutcome::Held as i32, "buyer {b}: {held:?}");
        checkout.confirm(pickup(&held.order_id, 2_500)).await.unwrap();
    }
    let web = checkout
        .reserve(ReserveRequest {
            skip_waitlist: true,
            ..reserve("porto", "tee", "web-late", 1)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(web.outcome, ReserveOutcome::SoldOut as i32, "{web:?}");
    // Cut off, the edge falls silent: the operator sees it offline.
    let until = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let edges = stall.sku().await.edges;
        if !edges[0].online {
            assert!(edges[0].last_contact.is_some(), "{edges:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < until, "still online: {edges:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // kill -9 while offline: every acknowledged sale is still there after the restart.
    stall.edge.kill();
    stall.edge = stall.edge_command.spawn().unwrap();
    let edge = stall.connect_edge().await;
    let mut till = stall.till(&edge);
    let restarted = stall.status(&edge).await;
    assert!(!restarted.online, "{restarted:#?}");
    let t = &restarted.tills[0];
    assert_eq!((t.sold, t.sales_pending, t.sales_offline), (8, 3, 3), "{restarted:#?}");
    for sale in &offline {
        let order = sale.order.as_ref().unwrap();
        let read = till
            .get_order(GetOrderRequest {
                order_id: order.order_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (read.status, read.pickup_code.as_str()),
            (OrderStatus::Confirmed as i32, order.pickup_code.as_str())
        );
    }

    // Back online: the outbox is uploaded, each sale booked once.
    let back = stall.heal(&edge).await;
    let t = &back.tills[0];
    assert_eq!((t.sales_booked, t.sales_refunded), (4, 0), "{back:#?}");
    let sku = stall.sku().await;
    assert_eq!((sku.sold, sku.allocated, sku.available), (28, 30, 0), "{sku:?}");
    assert!(sku.sold <= sku.allocated);
    let pool = &sku.pools[0];
    assert_eq!(pool.leased, 2, "{pool:?}");
    let e = &sku.edges[0];
    assert_eq!((e.leased, e.sold, e.returned, e.online), (2, 8, 0, true), "{e:?}");
    assert!(e.last_sync.is_some());
    // On the platform a till sale is an order handed over at the stall: no hub dispatches it.
    let booked = CheckoutServiceClient::with_interceptor(stall.channel.clone(), Bearer::new(OPERATOR_TOKEN).unwrap())
        .get_order(GetOrderRequest {
            order_id: offline[0].order.as_ref().unwrap().order_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            booked.status,
            booked.fulfilment,
            booked.quantity,
            booked.tracking.clone()
        ),
        (OrderStatus::Confirmed as i32, FulfilmentKind::AtStall as i32, 2, None),
        "{booked:?}"
    );

    // The creator's ledger: one sale line per till sale, and nothing to reconcile.
    let statement = settlement(&stall.channel, OPERATOR_TOKEN)
        .get_statement(GetStatementRequest {
            creator_id: "creator-1".into(),
            page_size: 1_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut till_orders: Vec<String> = std::iter::once(&first)
        .chain(&offline)
        .map(|c| c.order.as_ref().unwrap().order_id.clone())
        .collect();
    till_orders.sort();
    let mut booked: Vec<String> = statement
        .lines
        .iter()
        .filter(|l| l.kind == LineKind::Sale as i32 && till_orders.contains(&l.order_id))
        .map(|l| l.order_id.clone())
        .collect();
    booked.sort();
    assert_eq!(booked, till_orders, "one sale line per till sale");
    stall.assert_reconciled().await;
    assert!(
        matches!(stall.upstream.try_wait(), Ok(None)),
        "the platform is still running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sales_the_platform_refuses_after_the_lease_closed_offline_are_reported_as_refunds() {
    let mut stall = stall(6).await;
    let edge = stall.connect_edge().await;
    let mut till = stall.till(&edge);
    stall
        .until(&edge, Duration::from_secs(30), "online with its lease", |s| {
            s.online && s.tills.len() == 1
        })
        .await;
    stall.proxy.set(LinkMode::Cut);
    stall
        .until(&edge, Duration::from_secs(30), "offline", |s| !s.online)
        .await;
    let a = sell(&mut till, 1, 1).await.unwrap();
    let b = sell(&mut till, 2, 2).await.unwrap();
    // The operator ends the lease meanwhile: its units go back to the pool.
    operator_client(&stall.channel)
        .close_lease(CloseLeaseRequest {
            drop_id: "porto".into(),
            sku_id: "tee".into(),
            edge_id: EDGE.into(),
        })
        .await
        .unwrap();
    assert_eq!(stall.sku().await.available, 30);
    let back = stall.heal(&edge).await;
    let t = &back.tills[0];
    assert_eq!(
        (t.sales_booked, t.sales_refunded, t.sold, t.free),
        (0, 2, 0, 0),
        "{back:#?}"
    );
    assert!(t.ended);
    let mut refunded: Vec<(&str, i32, i32)> = t
        .refunds
        .iter()
        .map(|r| (r.order_id.as_str(), r.outcome, r.refund_reason))
        .collect();
    refunded.sort();
    let mut expected = vec![
        (
            a.order.as_ref().unwrap().order_id.as_str(),
            SaleOutcome::Refunded as i32,
            EdgeRefundReason::LeaseEnded as i32,
        ),
        (
            b.order.as_ref().unwrap().order_id.as_str(),
            SaleOutcome::Refunded as i32,
            EdgeRefundReason::LeaseEnded as i32,
        ),
    ];
    expected.sort();
    assert_eq!(refunded, expected);
    // The buyer's order reads as cancelled at the till; the platform sold nothing of it.
    let read = till
        .get_order(GetOrderRequest {
            order_id: a.order.unwrap().order_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.status, OrderStatus::Cancelled as i32);
    let sku = stall.sku().await;
    assert_eq!((sku.sold, sku.available), (0, 30));
    stall.assert_reconciled().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_running_low_tops_its_lease_up_and_shows_its_own_level_beside_the_platform_s() {
    let mut stall = stall_with(4, 10, &["--top-up-below", "2", "--top-up-units", "3"]).await;
    let edge = stall.connect_edge().await;
    let mut till = stall.till(&edge);
    stall
        .until(&edge, Duration::from_secs(30), "online with its lease", |s| {
            s.online && s.tills.len() == 1
        })
        .await;
    // Three of four sold: one free, fewer than two, so the edge asks for three more.
    for n in 1..=3 {
        sell(&mut till, 1, n).await.expect("in stock");
    }
    let topped = stall
        .until(&edge, Duration::from_secs(30), "topped up", |s| s.tills[0].granted == 7)
        .await;
    assert_eq!(topped.tills[0].free, 4, "{topped:#?}");
    // Again, until the operator's allowance (10) is reached, and never beyond it.
    for n in 4..=6 {
        sell(&mut till, 1, n).await.expect("in stock");
    }
    stall
        .until(&edge, Duration::from_secs(30), "topped up to the allowance", |s| {
            s.tills[0].granted == 10
        })
        .await;
    for n in 7..=10 {
        sell(&mut till, 1, n).await.expect("in stock");
    }
    assert!(sell(&mut till, 1, 11).await.is_none(), "the allowance is spent");
    let done = stall
        .until(&edge, Duration::from_secs(30), "everything booked", |s| {
            s.tills[0].sales_booked == 10
        })
        .await;
    assert_eq!((done.tills[0].granted, done.tills[0].free), (10, 0), "{done:#?}");
    let sku = stall.sku().await;
    assert_eq!(
        (sku.sold, sku.edges[0].granted, sku.edges[0].leased),
        (10, 10, 0),
        "{sku:?}"
    );

    // The tills' levels: the platform's (fetched every second here), and the stall's own.
    let levels = till
        .get_availability(GetAvailabilityRequest {
            drop_id: "porto".into(),
            city: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let level = |city: &str| {
        levels
            .skus
            .iter()
            .find(|s| s.sku_id == "tee" && s.city == city)
            .map(|s| s.level)
    };
    assert_eq!(level("Lisbon (pop-up)"), Some(Level::SoldOut as i32), "{levels:?}");
    assert_eq!(level("Lisbon"), Some(Level::InStock as i32), "{levels:?}");
    assert!(levels.as_of.is_some());
}

/// Every RPC the edge serves to its tills (CheckoutService, PopupService), as an attacker on
/// the stall's network would call it: bytes that do not decode are INVALID_ARGUMENT whoever
/// calls; a valid message without a credential is UNAUTHENTICATED, with the platform's
/// operator credential or another storefront's PERMISSION_DENIED; nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_refuses_garbage_and_strangers_on_every_rpc() {
    use crate::hygiene::{client_streaming_rpcs, raw_call, rpcs_where, undecodable_bodies};
    let mut stall = stall(3).await;
    let edge = stall.connect_edge().await;
    stall
        .until(&edge, Duration::from_secs(30), "online with its lease", |s| {
            s.online && s.tills.len() == 1
        })
        .await;
    let rpcs = rpcs_where(|_, service| service == "CheckoutService" || service == "PopupService");
    let streaming = client_streaming_rpcs();
    assert!(rpcs.len() >= 9, "{rpcs:?}");
    let own = format!("Bearer {}", stall.credential);
    let operator = format!("Bearer {OPERATOR_TOKEN}");
    let other = format!(
        "Bearer {}",
        storefront_credential(std::slice::from_ref(&stall.channel), OPERATOR_TOKEN, "another-shop")
            .await
            .unwrap()
    );
    for (_, path) in rpcs.iter().filter(|(_, p)| !streaming.contains(p)) {
        for (what, body) in undecodable_bodies() {
            for credential in [None, Some(own.as_str())] {
                let status = raw_call(&edge, path, body.clone(), credential).await.unwrap_err();
                assert_eq!(status.code(), Code::InvalidArgument, "{path} with {what}: {status:?}");
            }
        }
        let anonymous = raw_call(&edge, path, bytes::Bytes::new(), None).await.unwrap_err();
        assert_eq!(anonymous.code(), Code::Unauthenticated, "{path}: {anonymous:?}");
        for stranger in [&operator, &other] {
            let status = raw_call(&edge, path, bytes::Bytes::new(), Some(stranger))
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::PermissionDenied, "{path}: {status:?}");
        }
    }
    // Nothing was sold or held by any of it.
    let status = stall.status(&edge).await;
    assert_eq!(
        (status.tills[0].free, status.tills[0].held, status.tills[0].sold),
        (3, 0, 0),
        "{status:#?}"
    );
}
