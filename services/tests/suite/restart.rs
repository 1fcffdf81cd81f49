//! Crash safety: kill -9 of a real `dropline serve` process after acknowledged confirms,
//! then a restart on the same data directory: no acknowledged order is lost.

use proto::checkout::v1::*;
use proto::operator::v1::GetDropRequest;
use testkit::*;

/// `dropline serve` on `dir` and a new port, and a channel to it once it serves.
async fn spawn_server(dir: &std::path::Path) -> (ServeProcess, tonic::transport::Channel) {
    let mut server = ServeCommand::new(dir).unwrap().spawn().expect("dropline binary starts");
    let channel = server.connect(std::time::Duration::from_secs(60)).await.unwrap();
    (server, channel)
}

/// Buyer `b{i}` reserves one unit of `sku` in Lisbon.
fn one_unit(drop_id: &str, i: usize) -> ReserveRequest {
    ReserveRequest {
        drop_id: drop_id.into(),
        sku_id: "sku".into(),
        buyer_id: format!("b{i}"),
        city: "Lisbon".into(),
        quantity: 1,
        ..Default::default()
    }
}

async fn create_and_open(channel: &tonic::transport::Channel, request: proto::operator::v1::CreateDropRequest) {
    create_test_hubs(channel).await;
    let mut operator = operator_client(channel);
    let drop_id = request.drop_id.clone();
    operator.create_drop(request).await.unwrap();
    operator
        .open_drop(proto::operator::v1::OpenDropRequest { drop_id })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_acknowledged_confirms_loses_none_of_them() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, channel) = spawn_server(dir.path()).await;
    create_and_open(&channel, drop_request("crash", &[("sku", 500)], 1, 600)).await;
    let storefront = storefront_client(&channel).await;

    let mut tasks = Vec::new();
    for i in 0..300 {
        let mut checkout = storefront.clone();
        tasks.push(tokio::spawn(async move {
            let held = checkout.reserve(one_unit("crash", i)).await.unwrap().into_inner();
            let request = ConfirmRequest {
                order_id: held.order_id.clone(),
                payment_reference: format!("pay-{i}"),
                amount: eur(2_500),
                fulfilment: Some(confirm_request::Fulfilment::Pickup(Pickup {})),
                discreet: false,
            };
            checkout.confirm(request).await.unwrap();
            held.order_id
        }));
    }
    let mut confirmed = Vec::new();
    for task in tasks {
        confirmed.push(task.await.unwrap());
    }
    // SIGKILL: no shutdown hook runs, nothing is flushed on the way out.
    child.kill();

    let (mut child, channel) = spawn_server(dir.path()).await;
    let mut checkout = storefront_client(&channel).await;
    for order_id in &confirmed {
        let order = checkout
            .get_order(GetOrderRequest {
                order_id: order_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            order.status,
            OrderStatus::Confirmed as i32,
            "{order_id} lost its confirmation"
        );
    }
    let mut operator = operator_client(&channel);
    let figures = operator
        .get_drop(GetDropRequest {
            drop_id: "crash".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(figures.skus[0].sold, 300);
    assert_eq!(figures.skus[0].available, 200);
    child.kill();
}

/// The same crash once the SKU has a snapshot (written in parts, between batches, after a
/// quiet spell) and events after it: the restart reads both and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_a_snapshot_and_later_confirms_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, channel) = spawn_server(dir.path()).await;
    create_and_open(&channel, drop_request("snap", &[("sku", 2_000)], 1, 600)).await;
    let storefront = storefront_client(&channel).await;
    let reserve = |i: usize| {
        let mut checkout = storefront.clone();
        async move {
            checkout
                .reserve(one_unit("snap", i))
                .await
                .unwrap()
                .into_inner()
                .order_id
        }
    };
    // 1,500 holds (over the 1,000 events after which a quiet spell brings a snapshot).
    let mut held = Vec::new();
    for chunk in (0..1_500).collect::<Vec<_>>().chunks(100) {
        held.extend(futures::future::join_all(chunk.iter().map(|i| reserve(*i))).await);
    }
    // The quiet spell (500 ms) and the snapshot's slices.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let mut checkout = storefront.clone();
    for (i, order_id) in held.iter().take(100).enumerate() {
        checkout
            .confirm(ConfirmRequest {
                order_id: order_id.clone(),
                payment_reference: format!("pay-{i}"),
                amount: eur(2_500),
                fulfilment: Some(confirm_request::Fulfilment::Pickup(Pickup {})),
                discreet: false,
            })
            .await
            .unwrap();
    }
    child.kill();

    let (mut child, channel) = spawn_server(dir.path()).await;
    let mut checkout = storefront_client(&channel).await;
    for (i, order_id) in held.iter().enumerate() {
        let order = checkout
            .get_order(GetOrderRequest {
                order_id: order_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let expected = if i < 100 {
            OrderStatus::Confirmed
        } else {
            OrderStatus::Held
        };
        assert_eq!(order.status, expected as i32, "{order_id}");
    }
    let figures = operator_client(&channel)
        .get_drop(GetDropRequest { drop_id: "snap".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (figures.skus[0].sold, figures.skus[0].held, figures.skus[0].available),
        (100, 1_400, 500)
    );
    child.kill();
}

/// Holds of a crashed process still expire on time after the restart, and the waitlist is
/// promoted, although no request touches the SKU again: its deadline was durable, and the
/// wake-up scheduler starts the actor for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_expire_after_a_crash_without_any_request() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, channel) = spawn_server(dir.path()).await;
    const HOLD_SECS: u32 = 3;
    create_and_open(&channel, drop_request("wake", &[("sku", 1)], 1, HOLD_SECS)).await;
    let mut checkout = storefront_client(&channel).await;
    let held_at = std::time::Instant::now();
    let mut outcomes = Vec::new();
    for buyer in ["first", "second"] {
        let reply = checkout
            .reserve(ReserveRequest {
                drop_id: "wake".into(),
                sku_id: "sku".into(),
                buyer_id: buyer.into(),
                city: "Lisbon".into(),
                quantity: 1,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        outcomes.push((reply.outcome, reply.order_id));
    }
    assert_eq!(outcomes[0].0, ReserveOutcome::Held as i32);
    assert_eq!(outcomes[1].0, ReserveOutcome::Waitlisted as i32);
    child.kill();

    // Restart and send nothing at all; the hold expires meanwhile.
    let restarted_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let (mut child, _channel) = spawn_server(dir.path()).await;
    // The expiry plus 4 s for the wake-up scheduler to start the actor and promote.
    let expired_at = held_at + std::time::Duration::from_secs(u64::from(HOLD_SECS));
    tokio::time::sleep_until((expired_at.max(std::time::Instant::now()) + std::time::Duration::from_secs(4)).into())
        .await;
    child.kill();

    let journal = actors::sled_journal::SledJournal::open(dir.path()).unwrap();
    use actors::journal::Journal as _;
    let events: Vec<domain::sku::SkuEvent> = journal
        .load_all("sku/wake/sku")
        .await
        .unwrap()
        .iter()
        .map(|(_, bytes)| actors::codec::decode(bytes).unwrap())
        .collect();
    let promoted = events.iter().find_map(|e| match e {
        domain::sku::SkuEvent::Promoted { order_id, at, .. } => Some((order_id.as_str().to_string(), at.0)),
        _ => None,
    });
    let (order_id, at) = promoted.expect("the waitlisted buyer was promoted after the restart");
    assert_eq!(order_id, outcomes[1].1);
    assert!(
        at >= restarted_at,
        "promoted at {at}, before the restart at {restarted_at}"
    );
}
