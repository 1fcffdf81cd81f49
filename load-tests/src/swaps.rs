//! `dropline-load swaps`: the fulfilment targets. Starts a `dropline serve`, creates one hub
//! with silent primary couriers and a backup that accepts everything, confirms `--orders`
//! orders quickly (so the hub holds that many open dispatches), and measures
//! - how long after each order's Confirm was sent its first offer reached a subscribed
//!   courier (client clock; includes the Confirm call itself, so it overstates);
//! - for every offer a silent courier lets lapse, how long after the missed accept deadline
//!   the hub decided the swap (server clock: the new offer's `offered_at`) and the new offer
//!   reached the next courier (client clock, same machine).
//!
//! It ends when every dispatch is with the backup (open, accepted). With `--cluster N`, the
//! same against N nodes on N NATS JetStream servers (R N), started as `dropline-load
//! cluster` starts them.

use crate::{catalog, net, open_window, HOLD_TTL_SECONDS};
use anyhow::{ensure, Context as _};
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use proto::checkout::v1::*;
use proto::common::v1::Money;
use proto::dispatch::v1::dispatch_service_client::DispatchServiceClient;
use proto::dispatch::v1::dispatch_update::Update;
use proto::dispatch::v1::SubscribeRequest;
use proto::operator::v1::{Allocation, CreateDropRequest, SkuSpec};
use proto::registry::v1 as registry;
use proto::registry::v1::partner_registry_service_client::PartnerRegistryServiceClient;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use testkit::{ClusterOptions, LocalCluster};
use tonic::transport::Channel;

const HUB: &str = "hub-swaps";
const CITY: &str = "Swapton";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, clap::Args)]
pub struct SwapsArgs {
    /// The `dropline` server binary to start and measure.
    #[arg(long)]
    pub dropline_bin: PathBuf,
    /// Orders confirmed, all at one hub (the open dispatches when the swaps come due).
    #[arg(long, default_value_t = 1_000)]
    pub orders: usize,
    /// The hub's accept deadline, in seconds: long enough to confirm every order first.
    #[arg(long, default_value_t = 5)]
    pub accept_secs: i64,
    /// Silent primary couriers the orders are spread over (each is suspended by the hub
    /// after enough misses; a swapped dispatch may go to another silent one first).
    #[arg(long, default_value_t = 20)]
    pub silent_partners: usize,
    /// Confirms in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Run against a local cluster of this many `dropline serve --nats` nodes on as many
    /// NATS JetStream servers (replicas = N) instead of one embedded server. Couriers
    /// subscribe round-robin over the nodes, so most offers cross the projection exchange.
    #[arg(long)]
    pub cluster: Option<usize>,
}

fn now_ms() -> i64 {
    crate::unix_millis() as i64
}

fn ms(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds * 1_000 + i64::from(ts.nanos) / 1_000_000
}

pub async fn run(args: SwapsArgs) -> anyhow::Result<()> {
    ensure!(args.orders > 0, "--orders must be at least 1");
    let temp = tempfile::Builder::new().prefix("dropline-load-swaps-").tempdir()?;
    let Some(nodes) = args.cluster else {
        let mut child = catalog::start_server(&args.dropline_bin, temp.path(), None)?;
        let target = format!("http://{}", child.addr);
        let result = async {
            child.connect(STARTUP_TIMEOUT).await?;
            measure(&args, net::connect_channels(&target, 1).await?).await
        }
        .await;
        child.kill();
        return result;
    };
    ensure!(nodes > 0, "--cluster must be at least 1");
    eprintln!("starting {nodes} NATS servers and {nodes} Dropline nodes");
    let options = ClusterOptions {
        operator_token: crate::operator_token(),
        exe: Some(args.dropline_bin.clone()),
        log_filter: std::env::var("DROPLINE_LOG").unwrap_or_else(|_| "warn".into()),
        ..ClusterOptions::new(nodes)
    };
    let cluster = LocalCluster::start(options, &temp.path().join("cluster")).await?;
    let mut channels = Vec::new();
    for addr in cluster.addrs() {
        channels.extend(net::connect_channels(&format!("http://{addr}"), 1).await?);
    }
    let result = measure(&args, channels).await;
    // The nodes go first, then the NATS servers.
    drop(cluster);
    result
}

/// The benchmark over `channels` (one per node): set-up and confirms through the first,
/// couriers round-robin over all.
async fn measure(args: &SwapsArgs, channels: Vec<Channel>) -> anyhow::Result<()> {
    let channel = channels.first().context("no channel")?.clone();
    let mut registry = PartnerRegistryServiceClient::with_interceptor(channel.clone(), crate::operator_auth());
    registry
        .create_hub(registry::CreateHubRequest {
            hub: Some(crate::hub_spec(HUB, CITY, args.accept_secs)),
        })
        .await
        .context("CreateHub")?;
    let silent_count = args.silent_partners.max(1);
    let per_silent = args.orders.div_ceil(silent_count) as u32;
    let mut partners: Vec<(String, u32, u32)> = (0..silent_count)
        .map(|i| (format!("silent-{i}"), 1, per_silent))
        .collect();
    partners.push(("backup".into(), 2, (args.orders as u32 + 10).min(100_000)));
    let mut credentials = Vec::new();
    for (partner, rank, max_open) in &partners {
        let registered = registry
            .register_partner(registry::RegisterPartnerRequest {
                partner_id: partner.clone(),
                name: partner.clone(),
                kind: registry::PartnerKind::Courier as i32,
                capabilities: vec![registry::Capability::PickupPoint as i32],
                max_open_dispatches: *max_open,
            })
            .await
            .context("RegisterPartner")?
            .into_inner();
        registry
            .set_partner_status(registry::SetPartnerStatusRequest {
                partner_id: partner.clone(),
                status: registry::PartnerStatus::Active as i32,
                reason: "benchmark".into(),
            })
            .await?;
        registry
            .assign_partner(registry::AssignPartnerRequest {
                partner_id: partner.clone(),
                hub_id: HUB.into(),
                rank: *rank,
            })
            .await?;
        credentials.push(registered.credential);
    }
    // Every courier's offers go into one channel, timed as they arrive; the backup accepts
    // each of its offers at once (so its dispatches stay open, in progress).
    let (offers_tx, mut offers_rx) = tokio::sync::mpsc::unbounded_channel();
    for (index, credential) in credentials.iter().enumerate() {
        let courier_channel = channels[index % channels.len()].clone();
        let mut client = DispatchServiceClient::with_interceptor(courier_channel, crate::Bearer::new(credential));
        let mut stream = client
            .subscribe(SubscribeRequest {})
            .await
            .context("Subscribe")?
            .into_inner();
        let is_backup = index == credentials.len() - 1;
        let tx = offers_tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(update)) = stream.message().await {
                if let Some(Update::Offer(offer)) = update.update {
                    let arrived = (Instant::now(), now_ms());
                    if is_backup {
                        let mut client = client.clone();
                        let dispatch_id = offer.dispatch_id.clone();
                        tokio::spawn(async move {
                            let _ = client.accept(proto::dispatch::v1::AcceptRequest { dispatch_id }).await;
                        });
                    }
                    if tx.send((is_backup, offer, arrived)).is_err() {
                        return;
                    }
                }
            }
        });
    }
    drop(offers_tx);

    let drop_id = format!("swaps-{}", crate::unix_millis());
    let (opens_at, closes_at) = open_window();
    let mut operator = crate::operator(channel.clone());
    operator
        .create_drop(CreateDropRequest {
            drop_id: drop_id.clone(),
            creator_id: "load-creator".into(),
            title: "swap benchmark".into(),
            opens_at: Some(opens_at),
            closes_at: Some(closes_at),
            hold_ttl_seconds: HOLD_TTL_SECONDS,
            skus: vec![SkuSpec {
                sku_id: "item".into(),
                name: "Item".into(),
                price: Some(Money {
                    minor_units: 1_000,
                    currency: "EUR".into(),
                }),
                per_buyer_limit: 1,
                allocations: vec![Allocation {
                    hub_id: HUB.into(),
                    city: CITY.into(),
                    quantity: args.orders as u32,
                }],
            }],
            settlement: None,
        })
        .await
        .context("CreateDrop")?;
    crate::open_drop(&mut operator, &drop_id).await?;

    let confirm_started: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let confirm_answered: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let credential = crate::storefront(std::slice::from_ref(&channel)).await?;
    let started = Instant::now();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(0..args.orders)
        .map(|i| {
            let mut checkout = crate::checkout(channel.clone(), &credential);
            let drop_id = drop_id.clone();
            let confirm_started = confirm_started.clone();
            let confirm_answered = confirm_answered.clone();
            async move {
                let held = checkout
                    .reserve(ReserveRequest {
                        drop_id,
                        sku_id: "item".into(),
                        buyer_id: format!("buyer-{i}"),
                        city: CITY.into(),
                        quantity: 1,
                        skip_waitlist: true,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                confirm_started
                    .lock()
                    .expect("lock")
                    .insert(held.order_id.clone(), Instant::now());
                let order_id = held.order_id.clone();
                checkout
                    .confirm(ConfirmRequest {
                        order_id: held.order_id,
                        payment_reference: format!("pay-{i}"),
                        amount: Some(Money {
                            minor_units: 1_000,
                            currency: "EUR".into(),
                        }),
                        fulfilment: Some(confirm_request::Fulfilment::Pickup(Pickup {})),
                        discreet: false,
                    })
                    .await?;
                confirm_answered.lock().expect("lock").insert(order_id, Instant::now());
                Ok(())
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    ensure!(failed == 0, "{failed} reserve/confirm calls failed");
    let confirmed_in = started.elapsed();
    println!(
        "confirmed {} orders at {HUB} in {:.2} s; accept deadline {} s",
        args.orders,
        confirmed_in.as_secs_f64(),
        args.accept_secs
    );
    ensure!(
        confirmed_in < Duration::from_secs(args.accept_secs as u64),
        "confirming took longer than the accept deadline: raise --accept-secs"
    );
    // Every silent courier ignores its offers: each swap comes due at its deadline, until
    // every dispatch is with the backup.
    let mut decided = Histogram::<u64>::new_with_bounds(1, 600_000, 3)?;
    let mut received = Histogram::<u64>::new_with_bounds(1, 600_000, 3)?;
    let mut offers = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut after_answer = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut before_answer = 0usize;
    let mut seen = std::collections::HashSet::new();
    let mut with_backup = std::collections::HashSet::new();
    let mut moved_on_suspension = 0usize;
    let deadline = Instant::now() + Duration::from_secs(args.accept_secs as u64 * 20 + 60);
    while with_backup.len() < args.orders {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some((is_backup, offer, (arrived, arrived_ms)))) = tokio::time::timeout(left, offers_rx.recv()).await
        else {
            anyhow::bail!(
                "only {} of {} dispatches reached the backup",
                with_backup.len(),
                args.orders
            );
        };
        if seen.insert(offer.order_id.clone()) {
            if let Some(sent) = confirm_started.lock().expect("lock").get(&offer.order_id) {
                offers.record(arrived.saturating_duration_since(*sent).as_micros().max(1) as u64)?;
            }
            match confirm_answered.lock().expect("lock").get(&offer.order_id) {
                Some(answered) => {
                    after_answer.record(arrived.saturating_duration_since(*answered).as_micros().max(1) as u64)?
                }
                None => before_answer += 1,
            }
        }
        match (&offer.previous_deadline_missed, &offer.offered_at) {
            // A swap after a miss names the deadline its previous holder missed.
            (Some(missed), Some(offered)) => {
                decided.record((ms(offered) - ms(missed)).max(1) as u64)?;
                received.record((arrived_ms - ms(missed)).max(1) as u64)?;
            }
            // Offers withdrawn when their courier was suspended name no missed deadline.
            _ if offer.attempt > 1 => moved_on_suspension += 1,
            _ => {}
        }
        if is_backup {
            with_backup.insert(offer.order_id.clone());
        }
    }
    println!(
        "{} swaps after a missed accept deadline; {moved_on_suspension} offers moved when their courier was suspended",
        decided.len()
    );
    let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p);
    println!(
        "first offer at a courier after Confirm was sent: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (target: p99 < 50 ms)",
        q(&offers, 0.5) as f64 / 1e3,
        q(&offers, 0.99) as f64 / 1e3,
        offers.max() as f64 / 1e3
    );
    println!(
        "first offer at a courier after the buyer's Confirm returned: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms \
         ({before_answer} of {} offers arrived before the Confirm response)",
        q(&after_answer, 0.5) as f64 / 1e3,
        q(&after_answer, 0.99) as f64 / 1e3,
        after_answer.max() as f64 / 1e3,
        args.orders
    );
    println!(
        "swap decided after the missed deadline ({} open dispatches): p50 {} ms, p99 {} ms, max {} ms (target: p99 < 100 ms)",
        args.orders,
        q(&decided, 0.5),
        q(&decided, 0.99),
        decided.max()
    );
    println!(
        "new offer at the next courier after the missed deadline: p50 {} ms, p99 {} ms, max {} ms",
        q(&received, 0.5),
        q(&received, 0.99),
        received.max()
    );
    Ok(())
}
