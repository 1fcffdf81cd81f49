//! Cluster mode on loopback: real NATS servers (the pinned 2.15.1 from
//! scripts/install-nats.sh) and real `dropline serve --nats` processes. A burst across the
//! nodes on one hot SKU sells exactly the stock; kill -9 of the node owning the SKU in the
//! middle of a burst loses no acknowledged order, oversells nothing, and the SKU is served
//! again within the lease TTL plus 2 s; a NATS server of a 3-server cluster restarting in the
//! middle of a burst loses no acknowledged order.

use proto::checkout::v1::checkout_service_client::CheckoutServiceClient;
use proto::checkout::v1::*;
use proto::operator::v1::GetDropRequest;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use testkit::*;
use tonic::transport::Channel;

/// One cluster test at a time: each runs 3 Dropline nodes and 1–3 NATS servers, and two of
/// them on 2 cores starve the lease rounds whose timing the tests check.
pub(crate) static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// 3 nodes on `nats_servers` NATS servers under `dir`, the partitions settled over them;
/// the cluster and a channel to each node.
async fn start_cluster(nats_servers: usize, dir: &std::path::Path) -> (LocalCluster, Vec<Channel>) {
    let options = ClusterOptions {
        nats_servers,
        ..ClusterOptions::new(3)
    };
    let cluster = LocalCluster::start(options, dir).await.unwrap();
    let channels = cluster.channels();
    (cluster, channels)
}

/// CheckoutService through `channel` with `credential`.
fn shop(channel: &Channel, credential: &str) -> CheckoutServiceClient<services::auth::Authed> {
    CheckoutServiceClient::with_interceptor(channel.clone(), services::auth::Bearer::new(credential).unwrap())
}

/// Registers the storefront `test-web` and waits until every node knows its credential.
async fn storefront_everywhere(channels: &[Channel]) -> String {
    storefront_credential(channels, OPERATOR_TOKEN, TEST_STOREFRONT)
        .await
        .unwrap()
}

/// Reserves and confirms as `buyer`; the order id once the confirm is acknowledged.
async fn buy_one(
    channel: Channel,
    storefront: &str,
    drop_id: &str,
    buyer: String,
) -> Result<Option<String>, tonic::Status> {
    let mut checkout = shop(&channel, storefront);
    let held = checkout.reserve(reserve(drop_id, "hot", &buyer, 1)).await?.into_inner();
    if held.order_id.is_empty() || held.outcome != ReserveOutcome::Held as i32 {
        return Ok(None);
    }
    checkout.confirm(pickup(&held.order_id, 2_500)).await?;
    Ok(Some(held.order_id))
}

struct Burst {
    acknowledged: Arc<Mutex<Vec<String>>>,
    errors: Arc<Mutex<Vec<tonic::Status>>>,
}

/// `buyers` buyers, `concurrency` at a time, spread over `channels` round-robin.
fn burst(
    channels: Vec<Channel>,
    storefront: &str,
    drop_id: &'static str,
    buyers: usize,
    concurrency: usize,
) -> (Burst, tokio::task::JoinHandle<()>) {
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (channels, acknowledged, errors, next) =
            (channels.clone(), acknowledged.clone(), errors.clone(), next.clone());
        let storefront = storefront.to_string();
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= buyers {
                    return;
                }
                let channel = channels[i % channels.len()].clone();
                match buy_one(channel, &storefront, drop_id, format!("buyer-{i}")).await {
                    Ok(Some(order)) => acknowledged.lock().unwrap().push(order),
                    Ok(None) => {}
                    Err(status) => errors.lock().unwrap().push(status),
                }
            }
        }));
    }
    let all = tokio::spawn(async move {
        for worker in workers {
            worker.await.unwrap();
        }
    });
    (Burst { acknowledged, errors }, all)
}

/// Every acknowledged order is confirmed (asked on `channel`), and the drop's figures add
/// up with at most `stock` sold. Figures reach other nodes asynchronously: read until they
/// settle.
async fn check_nothing_lost(channel: &Channel, drop_id: &str, acknowledged: &[String], stock: u32) -> u32 {
    check_orders_and_figures(channel, drop_id, acknowledged, stock, true).await
}

/// `figures_catch_up`: also require this node's cached figures to show every acknowledged
/// sale within 10 s (else the lag is only reported, while orders and oversell are still
/// checked through the actors).
async fn check_orders_and_figures(
    channel: &Channel,
    drop_id: &str,
    acknowledged: &[String],
    stock: u32,
    figures_catch_up: bool,
) -> u32 {
    // The operator reads orders (without their pickup codes).
    let mut checkout = shop(channel, OPERATOR_TOKEN);
    for order_id in acknowledged {
        // A read may meet the aftermath of the failure (an actor restarting after a failed
        // append, JetStream electing a leader again): UNAVAILABLE and DEADLINE_EXCEEDED say
        // retry, as a client would; a read changes nothing.
        let until = Instant::now() + Duration::from_secs(30);
        let order = loop {
            match checkout
                .get_order(GetOrderRequest {
                    order_id: order_id.clone(),
                })
                .await
            {
                Ok(order) => break order.into_inner(),
                Err(status)
                    if matches!(status.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded)
                        && Instant::now() < until =>
                {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(status) => panic!("{order_id}: {status:?}"),
            }
        };
        assert_eq!(
            order.status,
            OrderStatus::Confirmed as i32,
            "{order_id} lost its confirmation"
        );
    }
    let mut operator = operator_client(channel);
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        // A read right after the kill may still meet the takeover (the drop's partition
        // without an owner): UNAVAILABLE or DEADLINE_EXCEEDED say ask again.
        let drop = match operator
            .get_drop(GetDropRequest {
                drop_id: drop_id.into(),
            })
            .await
        {
            Ok(drop) => drop.into_inner(),
            Err(status)
                if matches!(status.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded)
                    && Instant::now() < until + Duration::from_secs(20) =>
            {
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
            Err(status) => panic!("GetDrop: {status}"),
        };
        let sku = &drop.skus[0];
        assert!(sku.sold <= stock, "oversold: {} sold of {stock}", sku.sold);
        assert_eq!(sku.available + sku.held + sku.sold, sku.allocated);
        if sku.sold as usize >= acknowledged.len() && sku.held == 0 || Instant::now() > until {
            if figures_catch_up {
                assert!(
                    sku.sold as usize >= acknowledged.len(),
                    "{} sold, {} acknowledged",
                    sku.sold,
                    acknowledged.len()
                );
            } else if (sku.sold as usize) < acknowledged.len() {
                eprintln!(
                    "cached figures lag: {} sold, {} acknowledged",
                    sku.sold,
                    acknowledged.len()
                );
            }
            return sku.sold;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn create_hot_drop(channel: &Channel, drop_id: &str, stock: u32) {
    create_test_hubs(channel).await;
    let mut operator = operator_client(channel);
    operator
        .create_drop(drop_request(drop_id, &[("hot", stock)], 1, 600))
        .await
        .unwrap();
    operator
        .open_drop(proto::operator::v1::OpenDropRequest {
            drop_id: drop_id.into(),
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_across_three_nodes_sells_exactly_the_stock() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (_cluster, channels) = start_cluster(1, dir.path()).await;
    let storefront = storefront_everywhere(&channels).await;
    create_hot_drop(&channels[0], "burst", 100).await;

    let (outcome, done) = burst(channels.clone(), &storefront, "burst", 600, 48);
    done.await.unwrap();
    let acknowledged = outcome.acknowledged.lock().unwrap().clone();
    let errors = outcome.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(acknowledged.len(), 100, "every unit sold once, none twice");
    let unique: BTreeSet<_> = acknowledged.iter().collect();
    assert_eq!(unique.len(), 100);
    for channel in &channels {
        assert_eq!(check_nothing_lost(channel, "burst", &acknowledged, 100).await, 100);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_owning_node_mid_burst_loses_no_acknowledged_order() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut cluster, channels) = start_cluster(1, dir.path()).await;
    let storefront = storefront_everywhere(&channels).await;
    create_hot_drop(&channels[0], "takeover", 400).await;
    let victim = cluster
        .wait_for_owner_of("sku/takeover/hot", Duration::from_secs(30))
        .await
        .expect("the hot SKU's partition has an owner");
    let owner = cluster.name(victim).to_string();
    let survivors: Vec<Channel> = (0..3).filter(|i| *i != victim).map(|i| channels[i].clone()).collect();

    let (outcome, done) = burst(survivors.clone(), &storefront, "takeover", 1_500, 32);
    // Mid-burst: some orders are in.
    while outcome.acknowledged.lock().unwrap().len() < 60 {
        assert!(!done.is_finished(), "the burst ended before 60 orders were in");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.kill(victim);
    let killed_at = Instant::now();
    // The SKU is served again once a survivor holds the partition.
    let mut checkout = CheckoutServiceClient::new(survivors[0].clone());
    loop {
        if checkout
            .get_availability(GetAvailabilityRequest {
                drop_id: "takeover".into(),
                ..Default::default()
            })
            .await
            .is_ok()
            && cluster.owner_of("sku/takeover/hot").await.is_some_and(|o| o != victim)
        {
            break;
        }
        assert!(killed_at.elapsed() < Duration::from_secs(30), "never taken over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let taken_over = killed_at.elapsed();
    done.await.unwrap();
    let acknowledged = outcome.acknowledged.lock().unwrap().clone();
    let errors = outcome.errors.lock().unwrap().clone();
    let served_again = buy_one(survivors[1].clone(), &storefront, "takeover", "after-takeover".into()).await;
    assert!(served_again.is_ok(), "{served_again:?}");
    let mut acknowledged = acknowledged;
    acknowledged.extend(served_again.unwrap());
    assert!(
        taken_over <= Duration::from_millis(cluster.options().lease_ttl_ms + 2_000),
        "taken over after {taken_over:?}"
    );
    // Calls caught by the kill fail with a retryable status, never a wrong answer.
    for status in &errors {
        assert!(
            matches!(
                status.code(),
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::NotFound
                    | tonic::Code::FailedPrecondition
            ),
            "{status:?}"
        );
    }
    let sold = check_nothing_lost(&survivors[0], "takeover", &acknowledged, 400).await;
    eprintln!(
        "kill -9 of {owner}: taken over after {taken_over:?}; {} acknowledged, {sold} sold, {} calls failed",
        acknowledged.len(),
        errors.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_restarting_mid_burst_loses_no_acknowledged_order() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut cluster, channels) = start_cluster(3, dir.path()).await;
    let storefront = storefront_everywhere(&channels).await;
    create_hot_drop(&channels[0], "natsdown", 300).await;

    let (outcome, done) = burst(channels.clone(), &storefront, "natsdown", 1_000, 32);
    while outcome.acknowledged.lock().unwrap().len() < 50 {
        assert!(!done.is_finished(), "the burst ended before 50 orders were in");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.nats().kill(1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.nats().restart(1).unwrap();
    done.await.unwrap();
    let acknowledged = outcome.acknowledged.lock().unwrap().clone();
    let errors = outcome.errors.lock().unwrap().clone();
    for status in &errors {
        assert!(
            matches!(
                status.code(),
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::NotFound
                    | tonic::Code::FailedPrecondition
            ),
            "{status:?}"
        );
    }
    // Updates the events stream did not store while it had no leader are sent again
    // (`publish_projections`): this node's figures catch up too.
    let sold = check_nothing_lost(&channels[2], "natsdown", &acknowledged, 300).await;
    eprintln!(
        "NATS server restarted mid-burst: {} acknowledged, {sold} sold, {} calls failed",
        acknowledged.len(),
        errors.len()
    );
}

/// Buys one unit for pickup through `channel`: (order id, pickup code), once acknowledged.
async fn buy_for_pickup(channel: &Channel, storefront: &str, drop_id: &str, buyer: &str) -> Option<(String, String)> {
    let mut checkout = shop(channel, storefront);
    let held = checkout
        .reserve(reserve(drop_id, "hot", buyer, 1))
        .await
        .ok()?
        .into_inner();
    let confirmed = checkout.confirm(pickup(&held.order_id, 2_500)).await.ok()?.into_inner();
    let order = confirmed.order?;
    Some((order.order_id, order.pickup_code))
}

/// A courier app: takes every offer, picks it up with the code on the label and delivers
/// it; reconnects when its stream ends or stays quiet (unanswered offers come again then).
/// Returns how many deliveries each order got acknowledged.
async fn courier_app(
    channel: Channel,
    credential: String,
    labels: Arc<Mutex<std::collections::HashMap<String, String>>>,
    delivered: Arc<Mutex<std::collections::BTreeMap<String, u32>>>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    use proto::dispatch::v1::dispatch_update::Update;
    use proto::dispatch::v1::*;
    let mut client = courier_client(&channel, &credential);
    let mut finished = std::collections::HashSet::new();
    while !*stop.borrow() {
        let Ok(stream) = client.subscribe(SubscribeRequest {}).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut stream = stream.into_inner();
        while let Ok(Ok(Some(message))) = tokio::time::timeout(Duration::from_secs(2), stream.message()).await {
            let Some(Update::Offer(offer)) = message.update else {
                continue;
            };
            // A dispatch offered again (a resubscription may meet an offer twice) is not
            // worked again: what is counted is deliveries of distinct dispatches per order.
            if finished.contains(&offer.dispatch_id) {
                continue;
            }
            // The offer can overtake the confirm's reply, which brings the label.
            let mut code = None;
            for _ in 0..100 {
                code = labels.lock().unwrap().get(&offer.order_id).cloned();
                if code.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let Some(code) = code else { continue };
            let id = offer.dispatch_id.clone();
            // Each step may hit the takeover. On UNAVAILABLE the app asks again; on any
            // other answer it reads the dispatch and goes on from its stage (an earlier
            // attempt may have taken effect although its reply was lost).
            let mut done = false;
            for _ in 0..200 {
                let stage = match client
                    .get_dispatch(GetDispatchRequest {
                        dispatch_id: id.clone(),
                    })
                    .await
                {
                    Ok(d) => DispatchStage::try_from(d.into_inner().stage).unwrap_or(DispatchStage::Unspecified),
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let step = match stage {
                    DispatchStage::Offered => client
                        .accept(AcceptRequest {
                            dispatch_id: id.clone(),
                        })
                        .await
                        .map(|_| ()),
                    DispatchStage::Accepted => client
                        .mark_picked_up(MarkPickedUpRequest {
                            dispatch_id: id.clone(),
                            pickup_code: code.clone(),
                        })
                        .await
                        .map(|_| ()),
                    DispatchStage::PickedUp => client
                        .mark_delivered(MarkDeliveredRequest {
                            dispatch_id: id.clone(),
                            proof_reference: "photo".into(),
                        })
                        .await
                        .map(|_| ()),
                    DispatchStage::Delivered => {
                        done = true;
                        break;
                    }
                    // Not (or no longer) ours to work.
                    _ => break,
                };
                if step.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            if done {
                finished.insert(offer.dispatch_id.clone());
                *delivered.lock().unwrap().entry(offer.order_id.clone()).or_default() += 1;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubs_and_ledgers_keep_their_guarantees_across_a_takeover() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut cluster, channels) = start_cluster(1, dir.path()).await;
    let storefront = storefront_everywhere(&channels).await;
    create_test_hubs(&channels[0]).await;
    let credential = courier(&channels[0], "courier-1", "hub-1", 1).await;
    let mut operator = operator_client(&channels[0]);
    operator
        .create_drop(drop_request("fulfil", &[("hot", 40)], 1, 600))
        .await
        .unwrap();
    operator
        .open_drop(proto::operator::v1::OpenDropRequest {
            drop_id: "fulfil".into(),
        })
        .await
        .unwrap();
    // The node running the hub's actor is the one killed; everyone talks to the others.
    // (Shares settled in `start_cluster`; nothing moves a lease until the kill.)
    let victim = cluster
        .owner_of("hub/hub-1")
        .await
        .expect("the hub's partition has an owner");
    let survivors: Vec<Channel> = (0..3).filter(|i| *i != victim).map(|i| channels[i].clone()).collect();

    let labels = Arc::new(Mutex::new(std::collections::HashMap::new()));
    let delivered = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let app = tokio::spawn(courier_app(
        survivors[1].clone(),
        credential,
        labels.clone(),
        delivered.clone(),
        stopped,
    ));
    let mut orders = Vec::new();
    for i in 0..40 {
        if i == 15 {
            // Mid-fulfilment: the hub's node dies.
            let until = Instant::now() + Duration::from_secs(60);
            while delivered.lock().unwrap().len() < 5 {
                assert!(Instant::now() < until, "the courier delivered nothing before the kill");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            cluster.kill(victim);
        }
        let channel = &survivors[i % 2];
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((order_id, code)) = buy_for_pickup(channel, &storefront, "fulfil", &format!("buyer-{i}")).await
            {
                labels.lock().unwrap().insert(order_id.clone(), code);
                orders.push(order_id);
                break;
            }
            assert!(Instant::now() < until, "buyer {i} could not buy");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let until = Instant::now() + Duration::from_secs(90);
    while delivered.lock().unwrap().len() < orders.len() {
        assert!(
            Instant::now() < until,
            "{} of {} delivered",
            delivered.lock().unwrap().len(),
            orders.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.send_replace(true);
    app.await.unwrap();

    // One holder per dispatch: each order was delivered once, by the one courier that held it.
    let delivered = delivered.lock().unwrap().clone();
    assert!(delivered.values().all(|n| *n == 1), "{delivered:?}");
    let hub = registry_client(&survivors[0])
        .get_hub(proto::registry::v1::GetHubRequest { hub_id: "hub-1".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hub.delivered, 40, "the hub counts each delivery once");
    // The audit trail is the same on every node: each one shows an order's delivery.
    for channel in &survivors {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let trail = registry_client(channel)
                .list_audit_entries(proto::registry::v1::ListAuditEntriesRequest {
                    subject: Some(proto::registry::v1::list_audit_entries_request::Subject::OrderId(
                        orders[0].clone(),
                    )),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let actions: Vec<String> = trail.entries.iter().map(|e| e.action.clone()).collect();
            if actions.iter().any(|a| a == "delivered") {
                assert_eq!(actions.iter().filter(|a| *a == "delivered").count(), 1, "{actions:?}");
                break;
            }
            assert!(Instant::now() < until, "no delivery in the trail: {actions:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Each fact booked once: the creator's ledger has exactly the 40 sales, and
    // reconciliation against the SKU's journal finds nothing to book or refund.
    let mut settlement = proto::settlement::v1::settlement_service_client::SettlementServiceClient::with_interceptor(
        survivors[0].clone(),
        services::auth::Bearer::new(OPERATOR_TOKEN).unwrap(),
    );
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let balance = settlement
            .get_balance(proto::settlement::v1::GetBalanceRequest {
                creator_id: "creator-1".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let eur = balance
            .currencies
            .iter()
            .find(|c| c.currency == "EUR")
            .cloned()
            .unwrap_or_default();
        if eur.gross_sales == 40 * 2_500 {
            assert_eq!(eur.refunds, 0);
            break;
        }
        assert!(eur.gross_sales < 40 * 2_500, "a sale was booked twice: {eur:?}");
        assert!(Instant::now() < until, "sales not all booked: {eur:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let report = settlement
        .reconcile(proto::settlement::v1::ReconcileRequest { dry_run: true })
        .await
        .unwrap()
        .into_inner();
    assert!(report.differences.is_empty(), "{:?}", report.differences);
    assert!(report.balanced);
    assert_eq!(report.orders, 40);
}

/// Readiness of a node cut off from every NATS server: its connection still looks up (a
/// partition is silence, not a reset), yet it can write nothing, so it must say NOT_SERVING
/// within a lease TTL or so, acknowledge no write meanwhile, and say SERVING again once the
/// link is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_nats_is_not_ready_and_acknowledges_nothing() {
    use testkit::nemesis::{LinkMode, Peer};
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let options = ClusterOptions {
        partitionable: true,
        ..ClusterOptions::new(3)
    };
    let cluster = LocalCluster::start(options, dir.path()).await.unwrap();
    let channels = cluster.channels();
    let storefront = storefront_everywhere(&channels).await;
    create_hot_drop(&channels[0], "cut", 100).await;
    let ready = |channel: Channel| async move {
        HealthClient::new(channel)
            .check(HealthCheckRequest { service: String::new() })
            .await
            .map(|r| r.into_inner().status)
    };
    assert_eq!(ready(channels[2].clone()).await.unwrap(), ServingStatus::Serving as i32);

    cluster.network().unwrap().set_all(Peer::Node(2), LinkMode::Cut);
    let cut = Instant::now();
    // Meanwhile, every write through it fails (it can neither journal nor route).
    let mut attempts = 0;
    let not_ready = loop {
        let status = ready(channels[2].clone()).await.unwrap();
        if status == ServingStatus::NotServing as i32 {
            break cut.elapsed();
        }
        assert!(
            cut.elapsed() < Duration::from_secs(20),
            "still SERVING 20 s into the cut"
        );
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            shop(&channels[2], &storefront).reserve(reserve("cut", "hot", &format!("cut-{attempts}"), 1)),
        )
        .await;
        attempts += 1;
        if let Ok(Ok(held)) = reply {
            // Only possible before its leases lapsed: then the hold is real and stays.
            let order_id = held.into_inner().order_id;
            let order = shop(&channels[0], OPERATOR_TOKEN)
                .get_order(GetOrderRequest {
                    order_id: order_id.clone(),
                })
                .await;
            assert!(
                order.is_ok(),
                "{order_id} acknowledged through the cut node, unknown elsewhere"
            );
        }
    };
    eprintln!("NOT_SERVING {:.1} s into the cut", not_ready.as_secs_f64());
    // A lease TTL (3 s here) plus the readiness check's period.
    assert!(not_ready < Duration::from_secs(8), "{not_ready:?}");
    // The other nodes take its partitions and serve everything.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        match shop(&channels[0], &storefront)
            .reserve(reserve("cut", "hot", "after-cut", 1))
            .await
        {
            Ok(_) => break,
            Err(status) => {
                assert!(Instant::now() < until, "not served by the others: {status}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    cluster.network().unwrap().heal();
    let until = Instant::now() + Duration::from_secs(30);
    while ready(channels[2].clone()).await.unwrap() != ServingStatus::Serving as i32 {
        assert!(Instant::now() < until, "not SERVING 30 s after the heal");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.settled().await.unwrap();
    cluster.stop();
}

/// The units held of the first SKU of `drop_id` as the node behind `channel` shows them
/// (`u32::MAX` when it does not answer).
async fn held_on(channel: &Channel, drop_id: &str) -> u32 {
    match operator_client(channel)
        .get_drop(GetDropRequest {
            drop_id: drop_id.into(),
        })
        .await
    {
        Ok(drop) => drop.into_inner().skus[0].held,
        Err(_) => u32::MAX,
    }
}

/// Found by the nemesis: a node that missed projection updates (here: cut off from NATS
/// while the updates were published and then lost from the events stream) showed a SKU's
/// old figures until the SKU next changed, which for a sold-out SKU is never. The owner
/// publishes the figures of its recently changed SKUs again every few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_missed_figures_catches_up_without_a_further_change() {
    use testkit::nemesis::{LinkMode, Peer};
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let options = ClusterOptions {
        partitionable: true,
        ..ClusterOptions::new(3)
    };
    let cluster = LocalCluster::start(options, dir.path()).await.unwrap();
    let channels = cluster.channels();
    let storefront = storefront_everywhere(&channels).await;
    create_hot_drop(&channels[0], "missed", 100).await;
    // A first hold, which node-1's cache shows (an uncached SKU would be read from its actor).
    let until = Instant::now() + Duration::from_secs(60);
    shop(&channels[0], &storefront)
        .reserve(reserve("missed", "hot", "m-0", 1))
        .await
        .unwrap();
    while held_on(&channels[1], "missed").await != 1 {
        assert!(Instant::now() < until, "node-1's figures before the cut");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // node-1 hears nothing for a while; meanwhile 4 more holds are made through node-0.
    cluster.network().unwrap().set_all(Peer::Node(1), LinkMode::Cut);
    let mut held = 1;
    while held < 5 {
        assert!(Instant::now() < until, "node-0 took {held} holds in 60 s");
        if shop(&channels[0], &storefront)
            .reserve(reserve("missed", "hot", &format!("m-{held}"), 1))
            .await
            .is_ok_and(|r| r.into_inner().outcome == ReserveOutcome::Held as i32)
        {
            held += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    while held_on(&channels[0], "missed").await != 5 {
        assert!(Instant::now() < until, "node-0's own figures");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The updates are lost before node-1 could read them.
    cluster
        .jetstream()
        .get_stream(actors::cluster::placement::EVENTS_STREAM)
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
    cluster.network().unwrap().heal();
    // No further change to the SKU: node-1 must still come to show the 5 holds.
    let healed = Instant::now();
    while held_on(&channels[1], "missed").await != 5 {
        assert!(
            healed.elapsed() < Duration::from_secs(30),
            "node-1 still shows {} held 30 s after the heal",
            held_on(&channels[1], "missed").await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "node-1 caught up {:.1} s after the heal",
        healed.elapsed().as_secs_f64()
    );
    cluster.stop();
}

/// Found by the nemesis (seed 7033): after kill -9 of a NATS server while the others were
/// cut from their peers, the events stream's new leader (an R3 memory replica that had
/// restarted empty) numbered new messages below what the nodes' consumers had delivered.
/// A consumer ahead of its stream passes over every new message as already delivered, the
/// owners' re-publication included, and two nodes showed a SKU's old figures for good.
/// Here every node's consumer is put ahead of the stream on purpose (deleted and created
/// again, by the same name, starting a million messages past the stream's end) while holds
/// are made and a storefront's credential is reset: each node must notice, follow the stream
/// again from its end, show the SKU's new figures, and accept the new credential only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_events_consumer_went_ahead_of_the_stream_follows_it_again() {
    use actors::cluster::placement::{events_consumer, EVENTS_STREAM};
    use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (cluster, channels) = start_cluster(1, dir.path()).await;
    let storefront = storefront_everywhere(&channels).await;
    create_hot_drop(&channels[0], "ahead", 100).await;
    let every_node_shows = |want: u32, within: Duration, what: &'static str| {
        let channels = channels.clone();
        async move {
            let since = Instant::now();
            for (i, channel) in channels.iter().enumerate() {
                loop {
                    let shown = held_on(channel, "ahead").await;
                    if shown == want {
                        break;
                    }
                    assert!(
                        since.elapsed() < within,
                        "{what}: node-{i} shows {shown} held, not {want}, after {within:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            since.elapsed()
        }
    };
    shop(&channels[0], &storefront)
        .reserve(reserve("ahead", "hot", "a-0", 1))
        .await
        .unwrap();
    every_node_shows(1, Duration::from_secs(60), "the first hold").await;
    // A second storefront, known to every node.
    let before_reset = storefront_credential(&channels, OPERATOR_TOKEN, "other-web")
        .await
        .unwrap();

    // Every node's consumer goes ahead of the stream.
    let stream = cluster.jetstream().get_stream(EVENTS_STREAM).await.unwrap();
    let last = stream.get_info().await.unwrap().state.last_sequence;
    let ahead = last + 1_000_000;
    for i in 0..channels.len() {
        let name = events_consumer(&format!("node-{i}"));
        let mut attempts = 0;
        loop {
            // The node follows its consumer again as soon as it is gone: delete and create
            // until this one, not the node's, is the one by that name.
            attempts += 1;
            assert!(attempts <= 50, "{name} could not be replaced");
            let _ = stream.delete_consumer(&name).await;
            let planted = stream
                .create_consumer_strict(pull::Config {
                    durable_name: Some(name.clone()),
                    deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: ahead },
                    ack_policy: AckPolicy::Explicit,
                    ..Default::default()
                })
                .await;
            if planted.is_ok_and(|planted| planted.cached_info().delivered.stream_sequence >= ahead - 1) {
                break;
            }
        }
    }

    // While the consumers are ahead: four more holds through node-0, and the second
    // storefront's credential is reset.
    for buyer in ["a-1", "a-2", "a-3", "a-4"] {
        let outcome = shop(&channels[0], &storefront)
            .reserve(reserve("ahead", "hot", buyer, 1))
            .await
            .unwrap()
            .into_inner()
            .outcome;
        assert_eq!(outcome, ReserveOutcome::Held as i32);
    }
    let after_reset = operator_client(&channels[0])
        .reset_storefront_credential(proto::operator::v1::ResetStorefrontCredentialRequest {
            storefront_id: "other-web".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .credential;
    // No node may keep showing one hold.
    let caught_up = every_node_shows(5, Duration::from_secs(30), "after the consumers went ahead").await;
    eprintln!(
        "every node shows the 4 new holds {:.1} s after they were made",
        caught_up.as_secs_f64()
    );
    // Every node comes to accept the new credential and to refuse the old one (it reads
    // the registry's directory again once it follows the stream again).
    let until = Instant::now() + Duration::from_secs(30);
    for (i, channel) in channels.iter().enumerate() {
        let code = |credential: String| {
            let channel = channel.clone();
            async move {
                match shop(&channel, &credential)
                    .get_order(GetOrderRequest {
                        order_id: "d.s.0".into(),
                    })
                    .await
                {
                    Ok(_) => tonic::Code::Ok,
                    Err(status) => status.code(),
                }
            }
        };
        loop {
            // Past authentication, a made-up order id is refused for what it is, not for
            // the credential.
            let (old, new) = (code(before_reset.clone()).await, code(after_reset.clone()).await);
            if old == tonic::Code::Unauthenticated && new != tonic::Code::Unauthenticated {
                break;
            }
            assert!(
                Instant::now() < until,
                "node-{i}, 30 s after the reset: the old credential {old:?}, the new {new:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Each node, the SKU's owner too (which shows its figures without the stream), comes to
    // follow a consumer that is not ahead of the stream: within its next checks (every 3 s).
    let until = Instant::now() + Duration::from_secs(15);
    for i in 0..channels.len() {
        let name = events_consumer(&format!("node-{i}"));
        loop {
            // Gone (just deleted, not yet followed again) or still ahead: not yet.
            let delivered = match stream.get_consumer::<pull::Config>(&name).await {
                Ok(consumer) => Some(consumer.cached_info().delivered.stream_sequence),
                Err(_) => None,
            };
            let last = stream.get_info().await.unwrap().state.last_sequence;
            if delivered.is_some_and(|delivered| delivered <= last) {
                break;
            }
            assert!(
                Instant::now() < until,
                "{name} delivered {delivered:?}, the stream ends at {last}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    cluster.stop();
}
