//! `dropline demo`: a scripted multi-city live drop against an embedded platform (or a
//! local cluster with `--cluster N`), driven entirely through the real gRPC API. Thousands
//! of buyers burst in at open; some abandon their holds (which expire and return stock),
//! some wait on the waitlist (and are promoted when stock returns), the operator restocks
//! mid-drop. Simulated couriers work the orders over the DispatchService (one goes silent
//! mid-drop and is swapped out, then suspended); the report ends with an oversell check
//! against the journals, the fulfilment figures and each creator's settlement (returns,
//! payouts, statement totals) and its reconciliation. The embedded run serves the operator
//! and creator consoles on `--http-listen` from the start, printing one-time sign-in links;
//! `--linger` keeps them serving after the report.

mod cluster;
mod couriers;
mod popup;
mod settlement;

use crate::cli::DemoArgs;
use actors::limits::LIVE_ACTORS_MAX_DEFAULT;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use proto::checkout::v1::checkout_service_client::CheckoutServiceClient;
use proto::checkout::v1::*;
use proto::common::v1::Money;
use proto::operator::v1::operator_service_client::OperatorServiceClient;
use proto::operator::v1::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tonic::transport::Channel;
use tonic::Code;

use actors::cluster::journal::JetStreamJournal;
use couriers::{bump, CourierTally, Labels, HUBS};
use proto::registry::v1 as registry;
use proto::registry::v1::partner_registry_service_client::PartnerRegistryServiceClient;
use proto::settlement::v1::settlement_service_client::SettlementServiceClient;
use proto::settlement::v1::RegisterCreatorRequest;
use services::auth::{Authed, Bearer};
use testkit::{ClusterOptions, LocalCluster, TestServer};

struct DemoSku {
    id: &'static str,
    name: &'static str,
    price: i64,
    stock: [u32; 3],
    /// Share of buyers who want this SKU.
    weight: u32,
}

const SKUS: [DemoSku; 5] = [
    DemoSku {
        id: "tee-black",
        name: "Black tee",
        price: 2_500,
        stock: [120, 80, 100],
        weight: 25,
    },
    DemoSku {
        id: "hoodie",
        name: "Tour hoodie",
        price: 6_500,
        stock: [60, 40, 50],
        weight: 25,
    },
    DemoSku {
        id: "cap",
        name: "Cap",
        price: 1_800,
        stock: [150, 100, 120],
        weight: 15,
    },
    DemoSku {
        id: "poster",
        name: "Signed poster",
        price: 4_000,
        stock: [20, 15, 15],
        weight: 20,
    },
    DemoSku {
        id: "vinyl",
        name: "Live vinyl",
        price: 3_200,
        stock: [50, 30, 40],
        weight: 15,
    },
];

/// The demo's creators: (id, display name).
const CREATORS: [(&str, &str); 2] = [("creator-ana", "Ana Lima"), ("creator-bea", "Bea Costa")];

/// 12 % to the platform, 3.50 EUR per delivery to the partner, and a return window short
/// enough that the demo sees earnings become available and paid out.
const DEMO_TERMS: SettlementTerms = SettlementTerms {
    platform_fee_bps: 1_200,
    delivery_fee_minor_units: 350,
    return_window_seconds: settlement::RETURN_WINDOW_SECONDS,
};

#[derive(Default)]
struct Tally {
    held: AtomicU64,
    partial: AtomicU64,
    waitlisted: AtomicU64,
    promoted: AtomicU64,
    sold_out: AtomicU64,
    confirmed: AtomicU64,
    units: AtomicU64,
    abandoned: AtomicU64,
    too_late: AtomicU64,
    errors: AtomicU64,
}

fn ts(at: std::time::SystemTime) -> prost_types::Timestamp {
    let d = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// The demo, act by act: the platform starts, the hubs, partners, storefront and creators
/// are set up, the drops open and the buyers burst in (in a cluster, the hot SKU's node is
/// killed meanwhile), then the report: the sale, the journal audit, the node loss, the
/// fulfilment and the settlement. Fails if an acknowledged order was lost, the audit found
/// an oversell or a broken invariant, or reconciliation found differences.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let temp = tempfile::Builder::new().prefix("dropline-demo-").tempdir()?;
    let data_dir = args.data_dir.clone().unwrap_or_else(|| temp.path().to_path_buf());
    let operator_token = format!("demo-operator-{:032x}", rand::random::<u128>());
    let drop_id = format!(
        "demo-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
    );
    // The hottest SKU's node is the one killed in a cluster run; clients talk to the others.
    let hot_stream = format!("sku/{drop_id}/tee-black");
    let mut backend = Backend::start(args.cluster, &data_dir, &operator_token, &hot_stream).await?;
    let mut demo = Demo::set_up(&args, &backend.client_addrs(), operator_token, drop_id).await?;
    demo.create_drops().await?;
    let consoles = backend.serve_consoles(&args, &demo).await?;
    // A pop-up in Porto: its network drops as the stream starts; it sells offline meanwhile.
    let mut pop_up = popup::PopUp::open(
        &demo.channel(),
        backend.client_addrs()[0],
        &mut demo.operator,
        &demo.operator_token,
        &demo.drop_id,
        &data_dir,
    )
    .await?;
    let (sale, stall) = tokio::join!(demo.sell(&mut backend), pop_up.sell_out_offline());
    let (sale, ()) = (sale?, stall?);
    let mut platform = CheckoutServiceClient::with_interceptor(demo.channel(), demo.bearer.clone());
    let (edge_line, edge_differences) = pop_up.reconcile(&mut platform).await?;
    let audit = demo.audit(&backend).await?;
    sale.print(&audit.figures);
    println!("{edge_line}");
    audit.print();
    let (lost, outage) = demo.check_node_loss(sale.node_loss).await?;
    demo.fulfil(sale.confirmed, outage).await?;
    let settled = demo.settle().await?;
    if args.linger > 0 {
        linger(&args, consoles.as_ref()).await;
    }
    // The platform first: its shutdown ends the consoles' live streams, then the listener.
    backend.stop().await?;
    if let Some(consoles) = consoles {
        consoles.stop().await;
    }
    if !lost.is_empty() {
        anyhow::bail!("acknowledged orders lost in the node loss: {}", lost.join(", "));
    }
    if !audit.passed() {
        anyhow::bail!("the journal audit failed");
    }
    if !settled {
        anyhow::bail!("settlement reconciliation found differences");
    }
    if edge_differences > 0 {
        anyhow::bail!("the pop-up's sales and the platform's orders differ");
    }
    Ok(())
}

/// The consoles the demo serves over its embedded platform.
struct Consoles {
    url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Consoles {
    async fn stop(self) {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("the consoles' listener failed: {e:#}"),
            Err(e) => eprintln!("the consoles' listener panicked: {e}"),
        }
    }
}

/// `--linger`: the platform (and its consoles) keep serving after the report.
async fn linger(args: &DemoArgs, consoles: Option<&Consoles>) {
    match consoles {
        Some(c) => println!(
            "\nstill serving for {} s (Ctrl-C ends it): the consoles at {}/ (sign in with the credentials above)",
            args.linger, c.url
        ),
        None => println!("\nstill serving for {} s (Ctrl-C ends it)", args.linger),
    }
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(args.linger)) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Where the demo's platform runs.
enum Backend {
    Embedded(Box<TestServer>),
    Cluster {
        cluster: Box<LocalCluster>,
        /// For the journal audit, read from JetStream.
        journal: std::sync::Arc<JetStreamJournal>,
        /// The node to kill mid-drop: the hot SKU's.
        victim: usize,
    },
}

impl Backend {
    /// The embedded platform, or a local cluster of `cluster` NATS servers and nodes.
    async fn start(
        cluster: Option<u8>,
        data_dir: &std::path::Path,
        operator_token: &str,
        hot_stream: &str,
    ) -> anyhow::Result<Backend> {
        let Some(count) = cluster else {
            let server = TestServer::open(data_dir, operator_token, LIVE_ACTORS_MAX_DEFAULT).await?;
            return Ok(Backend::Embedded(Box::new(server)));
        };
        println!("starting a local cluster: {count} NATS JetStream servers and {count} Dropline nodes on loopback");
        let options = ClusterOptions {
            lease_ttl_ms: cluster::LEASE_TTL_MS,
            lease_renew_ms: cluster::LEASE_RENEW_MS,
            operator_token: operator_token.into(),
            // The nodes run this very binary.
            exe: Some(std::env::current_exe()?),
            logs_in_files: true,
            log_filter: std::env::var("DROPLINE_LOG").unwrap_or_else(|_| "warn".into()),
            ..ClusterOptions::new(usize::from(count))
        };
        let cluster = LocalCluster::start(options, data_dir).await?;
        let victim = cluster
            .owner_of(hot_stream)
            .await
            .ok_or_else(|| anyhow::anyhow!("no node owns the hot SKU's partition"))?;
        let journal = JetStreamJournal::open(
            cluster.jetstream(),
            &data_dir.join("demo-reader"),
            actors::cluster::placement::PARTITIONS_DEFAULT,
        )
        .await?;
        Ok(Backend::Cluster {
            cluster: Box::new(cluster),
            journal,
            victim,
        })
    }

    /// Where the clients connect: every node but the one to be killed.
    fn client_addrs(&self) -> Vec<std::net::SocketAddr> {
        match self {
            Backend::Embedded(server) => vec![server.addr],
            Backend::Cluster { cluster, victim, .. } => cluster
                .addrs()
                .into_iter()
                .enumerate()
                .filter(|(i, _)| i != victim)
                .map(|(_, a)| a)
                .collect(),
        }
    }

    fn journal(&self) -> &dyn actors::Journal {
        match self {
            Backend::Embedded(server) => server.platform.journal.as_ref(),
            Backend::Cluster { journal, .. } => journal.as_ref(),
        }
    }

    /// In a cluster: once the drop is in full swing (`confirmed` orders), kill -9 the node
    /// owning the hot SKU; its name, when, and the takeover (how long, partitions held).
    async fn lose_a_node(&mut self, confirmed: &AtomicU64, buyers: usize, opened: Instant) -> Option<NodeLoss> {
        let Backend::Cluster { cluster, victim, .. } = self else {
            return None;
        };
        let swing = Instant::now();
        while confirmed.load(Ordering::Relaxed) < (buyers as u64 / 20).max(20)
            && swing.elapsed() < Duration::from_secs(20)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let at = opened.elapsed();
        let name = cluster.name(*victim).to_string();
        let mut hubs = Vec::new();
        for (hub_id, _, _) in HUBS {
            if cluster.owner_of(&format!("hub/{hub_id}")).await == Some(*victim) {
                hubs.push(hub_id.to_string());
            }
        }
        let killed_ms = actors::Clock::now(&actors::SystemClock).0;
        let takeover = cluster.kill_and_wait_for_takeover(*victim).await;
        Some(NodeLoss {
            name,
            at,
            killed_ms,
            hubs,
            takeover,
        })
    }

    /// Serves the consoles over the embedded platform on `--http-listen` and prints how to
    /// sign in: one-time links (single use, within 10 minutes) for the operator and each
    /// creator, and the operator credential to paste. A cluster's nodes serve their own
    /// consoles on free ports, so this run serves none.
    async fn serve_consoles(&self, args: &DemoArgs, demo: &Demo) -> anyhow::Result<Option<Consoles>> {
        let Backend::Embedded(server) = self else {
            println!(
                "consoles: not served by a --cluster run (its nodes take free HTTP ports); \
                 run `dropline demo` without --cluster to look around in them"
            );
            return Ok(None);
        };
        let listener = tokio::net::TcpListener::bind(args.http_listen).await.map_err(|e| {
            anyhow::anyhow!(
                "binding the consoles' address {} (--http-listen): {e}",
                args.http_listen
            )
        })?;
        let url = format!("http://{}", listener.local_addr()?);
        let console =
            services::console::Console::new(server.platform.clone(), services::console::ConsoleSettings::default());
        let mut links = vec![("operator".to_string(), console.one_time_sign_in(&demo.operator_token)?)];
        for (creator_id, credential) in &demo.creators {
            links.push((creator_id.clone(), console.one_time_sign_in(credential)?));
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // The HTTP side as `dropline serve` has it (/metrics, /healthz, /readyz, the
        // consoles), with this console, whose one-time links were just made.
        let health = services::server::Health::new();
        health
            .set(
                services::config::health_services::LIVE,
                tonic_health::ServingStatus::Serving,
            )
            .await;
        health
            .set(
                services::config::health_services::READY,
                tonic_health::ServingStatus::Serving,
            )
            .await;
        let task = tokio::spawn(services::http::serve(
            listener,
            server.platform.clone(),
            health,
            console.router(),
            None,
            async {
                let _ = stopped.await;
            },
        ));
        println!("consoles: {url}/ (watch the drop live on the operator's board). Sign in once with:");
        for (who, token) in &links {
            println!("  {who:<12} {url}/sign-in#once={token}");
        }
        println!("  or paste the operator credential: {}", demo.operator_token);
        Ok(Some(Consoles { url, stop, task }))
    }

    async fn stop(self) -> anyhow::Result<()> {
        match self {
            Backend::Embedded(server) => server.shut_down().await,
            Backend::Cluster { cluster, .. } => {
                cluster.stop();
                Ok(())
            }
        }
    }
}

/// The node killed mid-drop.
struct NodeLoss {
    name: String,
    /// When, since the drops opened.
    at: Duration,
    /// When, on the wall clock (milliseconds since the epoch).
    killed_ms: i64,
    /// The hubs whose actors it ran.
    hubs: Vec<String>,
    /// How long until every partition it held had a new owner, and how many it held.
    takeover: anyhow::Result<(Duration, usize)>,
}

/// Where and when no node served: the killed node's hubs, from the kill until every
/// partition it held had a new owner (wall clock, milliseconds since the epoch). A
/// deadline of one of those hubs that came due then could only fire after the takeover.
pub struct Outage {
    pub hubs: Vec<String>,
    pub from_ms: i64,
    pub to_ms: i64,
}

/// The demo's clients and the people it plays: the operator, the storefront, the couriers
/// and the creators.
struct Demo {
    args: DemoArgs,
    operator_token: String,
    /// Ana's drop, and Bea's.
    drop_id: String,
    drop_b: String,
    channels: Vec<Channel>,
    bearer: Bearer,
    operator: OperatorServiceClient<Authed>,
    registry: PartnerRegistryServiceClient<Authed>,
    storefront: Bearer,
    labels: Labels,
    couriers: Arc<CourierTally>,
    stop_couriers: tokio::sync::watch::Sender<bool>,
    courier_tasks: Vec<tokio::task::JoinHandle<()>>,
    /// (creator id, credential).
    creators: Vec<(String, String)>,
    /// When the drops opened, by the clock and on the wall (seconds since the epoch).
    opened: (Instant, f64),
}

impl Demo {
    /// Connects to the platform, creates the hubs and partners, registers the storefront
    /// and starts the couriers.
    async fn set_up(
        args: &DemoArgs,
        addrs: &[std::net::SocketAddr],
        operator_token: String,
        drop_id: String,
    ) -> anyhow::Result<Demo> {
        let mut channels = Vec::new();
        for addr in addrs {
            channels.push(
                tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                    .connect()
                    .await?,
            );
        }
        let channel = channels[0].clone();
        let bearer = Bearer::new(&operator_token)?;
        let operator = OperatorServiceClient::with_interceptor(channel.clone(), bearer.clone());
        let mut registry = PartnerRegistryServiceClient::with_interceptor(channel.clone(), bearer.clone());
        let partners = couriers::set_up(&mut registry).await?;
        // The buyers shop through one storefront, as the platform's web backend would.
        let storefront = testkit::storefront_credential(&channels, &operator_token, "demo-shop").await?;
        let storefront = Bearer::new(&storefront)?;
        let labels: Labels = Arc::default();
        let tally = Arc::new(CourierTally::default());
        let (stop_couriers, couriers_stop) = tokio::sync::watch::channel(false);
        let mut courier_tasks = Vec::new();
        for (i, (_, credential, silent_after)) in partners.iter().enumerate() {
            courier_tasks.push(tokio::spawn(couriers::run_courier(
                channels[i % channels.len()].clone(),
                credential.clone(),
                *silent_after,
                labels.clone(),
                tally.clone(),
                args.seed.wrapping_add(i as u64 * 7_919),
                couriers_stop.clone(),
            )));
        }
        Ok(Demo {
            args: args.clone(),
            operator_token,
            drop_b: format!("{drop_id}-bea"),
            drop_id,
            channels,
            bearer,
            operator,
            registry,
            storefront,
            labels,
            couriers: tally,
            stop_couriers,
            courier_tasks,
            creators: Vec::new(),
            opened: (Instant::now(), 0.0),
        })
    }

    fn channel(&self) -> Channel {
        self.channels[0].clone()
    }

    /// Two creators sell at once: Ana's main drop, and Bea's smaller one.
    async fn create_drops(&mut self) -> anyhow::Result<()> {
        let now = std::time::SystemTime::now();
        let mut settlement_client = SettlementServiceClient::with_interceptor(self.channel(), self.bearer.clone());
        for (creator_id, name) in CREATORS {
            let credential = settlement_client
                .register_creator(RegisterCreatorRequest {
                    creator_id: creator_id.into(),
                    display_name: name.into(),
                })
                .await?
                .into_inner()
                .credential;
            self.creators.push((creator_id.to_string(), credential));
        }
        let skus = |divisor: u32| -> Vec<SkuSpec> {
            SKUS.iter()
                .map(|s| SkuSpec {
                    sku_id: s.id.into(),
                    name: s.name.into(),
                    price: Some(Money {
                        minor_units: s.price,
                        currency: "EUR".into(),
                    }),
                    per_buyer_limit: 2,
                    allocations: HUBS
                        .iter()
                        .zip(s.stock)
                        .map(|((hub, city, _), quantity)| Allocation {
                            hub_id: (*hub).into(),
                            city: (*city).into(),
                            quantity: quantity / divisor,
                        })
                        .collect(),
                })
                .collect()
        };
        for (id, creator_id, title, divisor) in [
            (&self.drop_id, CREATORS[0].0, "Ana's release-night drop", 1),
            (&self.drop_b, CREATORS[1].0, "Bea's studio drop", 4),
        ] {
            self.operator
                .create_drop(CreateDropRequest {
                    drop_id: id.clone(),
                    creator_id: creator_id.into(),
                    title: title.into(),
                    opens_at: Some(ts(now + Duration::from_secs(3_600))),
                    closes_at: Some(ts(now + Duration::from_secs(7_200))),
                    hold_ttl_seconds: self.args.hold_ttl_seconds,
                    skus: skus(divisor),
                    settlement: Some(DEMO_TERMS),
                })
                .await?;
        }
        println!(
            "Dropline demo: drop {}, {} SKUs in {} hubs across 2 cities (Lisbon, Porto), {} buyers, holds last {} s",
            self.drop_id,
            SKUS.len(),
            HUBS.len(),
            self.args.buyers,
            self.args.hold_ttl_seconds
        );
        Ok(())
    }

    /// The drops open early, live on stream: the buyers burst in, the operator restocks
    /// the scarcest SKU, and in a cluster the hot SKU's node is lost. Then the drops close.
    async fn sell(&mut self, backend: &mut Backend) -> anyhow::Result<Sale> {
        for id in [&self.drop_id, &self.drop_b] {
            self.operator.open_drop(OpenDropRequest { drop_id: id.clone() }).await?;
        }
        let opened = Instant::now();
        let opened_wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs_f64();
        self.opened = (opened, opened_wall);
        let tally = Arc::new(Tally::default());
        let latency = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?));
        let (progress, buyers) = self.let_the_buyers_in(&tally, &latency)?;
        let restock = self.restock_mid_drop();
        let buyers_done = async {
            for buyer in buyers {
                buyer.await?;
            }
            Ok::<_, anyhow::Error>(())
        };
        let node_loss = backend.lose_a_node(&tally.confirmed, self.args.buyers, opened);
        let (buyers_done, node_loss) = tokio::join!(buyers_done, node_loss);
        buyers_done?;
        progress.finish_with_message("done");
        let restocked = restock.await?;
        let elapsed = opened.elapsed();
        for id in [&self.drop_id, &self.drop_b] {
            self.operator
                .close_drop(CloseDropRequest { drop_id: id.clone() })
                .await?;
        }
        let latency = latency.lock().expect("histogram lock").clone();
        Ok(Sale {
            confirmed: tally.confirmed.load(Ordering::Relaxed),
            tally,
            latency,
            restocked,
            elapsed,
            opened_wall,
            node_loss,
        })
    }

    /// Every buyer as a task, `concurrency` of them shopping at once, and the progress bar.
    fn let_the_buyers_in(
        &self,
        tally: &Arc<Tally>,
        latency: &Arc<Mutex<Histogram<u64>>>,
    ) -> anyhow::Result<(ProgressBar, Vec<tokio::task::JoinHandle<()>>)> {
        let args = &self.args;
        let progress = ProgressBar::new(args.buyers as u64);
        progress.set_style(
            ProgressStyle::with_template("{spinner} buyers {bar:40} {pos}/{len} {msg}")?.progress_chars("=> "),
        );
        let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
        let patience = Duration::from_secs(u64::from(args.hold_ttl_seconds) * 3 + 2);
        let channels = &self.channels;
        let mut buyers = Vec::with_capacity(args.buyers);
        for i in 0..args.buyers {
            let buyer = Buyer {
                index: i,
                rng: StdRng::seed_from_u64(args.seed.wrapping_mul(1_000_003).wrapping_add(i as u64)),
                checkout: CheckoutServiceClient::with_interceptor(
                    channels[i % channels.len()].clone(),
                    self.storefront.clone(),
                ),
                channel: channels[i % channels.len()].clone(),
                // One buyer in five shops Bea's drop.
                drop_id: if i % 5 == 4 {
                    self.drop_b.clone()
                } else {
                    self.drop_id.clone()
                },
                tally: tally.clone(),
                latency: latency.clone(),
                patience,
                labels: self.labels.clone(),
            };
            let permits = permits.clone();
            let progress = progress.clone();
            buyers.push(tokio::spawn(async move {
                let _permit = permits.acquire_owned().await;
                buyer.shop().await;
                progress.inc(1);
            }));
        }
        Ok((progress, buyers))
    }

    /// The operator restocks the scarcest SKU once it has sold out in Lisbon.
    fn restock_mid_drop(&self) -> tokio::task::JoinHandle<Result<SkuFigures, tonic::Status>> {
        let mut operator = self.operator.clone();
        let drop_id = self.drop_id.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            operator
                .restock(RestockRequest {
                    drop_id,
                    sku_id: "poster".into(),
                    hub_id: "hub-lisbon-1".into(),
                    city: String::new(),
                    quantity: 20,
                    idempotency_key: "demo-restock-poster".into(),
                })
                .await
                .map(|r| r.into_inner())
        })
    }

    /// The operator's figures of Ana's drop, and every SKU of both drops replayed from its
    /// journal.
    async fn audit(&self, backend: &Backend) -> anyhow::Result<Audit> {
        let figures = self
            .operator
            .clone()
            .get_drop(GetDropRequest {
                drop_id: self.drop_id.clone(),
            })
            .await?
            .into_inner();
        let journal = backend.journal();
        let audit = actors::audit::audit_drop(journal, &domain::DropId::parse(&self.drop_id)?)
            .await
            .map_err(anyhow::Error::msg)?;
        let audit_b = actors::audit::audit_drop(journal, &domain::DropId::parse(&self.drop_b)?)
            .await
            .map_err(anyhow::Error::msg)?;
        let oversold: u64 = audit.iter().chain(&audit_b).map(|a| a.oversold).sum();
        let events: usize = audit.iter().chain(&audit_b).map(|a| a.events).sum();
        let broken: Vec<String> = audit
            .iter()
            .chain(&audit_b)
            .filter_map(|a| a.invariants.as_ref().err().map(|e| format!("{}: {e}", a.sku_id)))
            .collect();
        let mismatched: Vec<String> = audit
            .iter()
            .filter(|a| {
                figures
                    .skus
                    .iter()
                    .find(|s| s.sku_id == a.sku_id.as_str())
                    .is_none_or(|s| u64::from(s.sold) != a.sold || u64::from(s.held) != a.held)
            })
            .map(|a| a.sku_id.to_string())
            .collect();
        Ok(Audit {
            figures,
            skus: audit.len() + audit_b.len(),
            events,
            oversold,
            broken,
            mismatched,
        })
    }

    /// After a node loss: the takeover, and the acknowledged orders that cannot be found
    /// any more (returned, with the outage).
    async fn check_node_loss(&self, node_loss: Option<NodeLoss>) -> anyhow::Result<(Vec<String>, Option<Outage>)> {
        let Some(NodeLoss {
            name,
            at,
            killed_ms,
            hubs,
            takeover,
        }) = node_loss
        else {
            return Ok((Vec::new(), None));
        };
        let (took, held) = takeover?;
        let acknowledged = self.order_ids();
        let lost = cluster::lost_orders(self.channel(), &self.operator_token, &acknowledged).await?;
        println!(
            "node loss: kill -9 of {name} (owner of the hot SKU and {held} of {} partitions) {:.2} s into the drop; \
             every partition served again after {} ms (lease TTL {} ms, renewal {} ms); \
             acknowledged orders lost: {} of {}",
            actors::cluster::placement::PARTITIONS_DEFAULT,
            at.as_secs_f64(),
            took.as_millis(),
            cluster::LEASE_TTL_MS,
            cluster::LEASE_RENEW_MS,
            lost.len(),
            acknowledged.len()
        );
        let outage = Outage {
            hubs,
            from_ms: killed_ms,
            to_ms: killed_ms + took.as_millis() as i64,
        };
        Ok((lost, Some(outage)))
    }

    /// The confirmed orders' ids (their pickup codes are on the labels).
    fn order_ids(&self) -> Vec<String> {
        self.labels
            .lock()
            .map(|l| l.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Waits for the couriers to finish every one of the `confirmed` orders, stops them,
    /// and reports the fulfilment: deliveries, swaps, the partners and the hubs' alerts.
    async fn fulfil(&mut self, confirmed: u64, outage: Option<Outage>) -> anyhow::Result<()> {
        let hubs = self.wait_for_fulfilment(confirmed).await?;
        let _ = self.stop_couriers.send(true);
        for task in self.courier_tasks.drain(..) {
            let _ = task.await;
        }
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let c = &self.couriers;
        let delivered: u64 = hubs.iter().map(|h| h.delivered).sum();
        let failed: u64 = hubs.iter().map(|h| h.failed).sum();
        let swaps: u64 = hubs.iter().map(|h| h.swaps).sum();
        let open: u32 = hubs.iter().map(|h| h.open_dispatches).sum();
        let waiting: u32 = hubs.iter().map(|h| h.waiting_for_partner).sum();
        println!();
        println!(
            "fulfilment: {delivered} delivered, {failed} failed, {open} still open ({waiting} waiting for a partner, operator alerted) of {confirmed} orders; \
             {:.1} % delivered within the promised window; {} declines, {} failures reported",
            100.0 * n(&c.delivered_in_window) as f64 / n(&c.delivered).max(1) as f64,
            n(&c.declined),
            n(&c.failures_reported)
        );
        let swaps_seen = couriers::swaps_seen(c, outage.as_ref());
        println!(
            "partner swaps: {swaps} ({} after a missed deadline; offers ignored by the silent courier: {})",
            swaps_seen.served.decided.len() + swaps_seen.in_outage.decided.len(),
            n(&c.ignored)
        );
        if let Some(line) = swaps_seen.served.line() {
            println!(
                "  swap decided after the missed deadline{}: {line}",
                if outage.is_some() {
                    " (hubs served at the deadline)"
                } else {
                    ""
                }
            );
        }
        if let Some(line) = swaps_seen.in_outage.line() {
            println!(
                "  swap decided after a deadline that passed while its hub's node was lost and before the takeover \
                 ({} swaps; they wait for it): {line}",
                swaps_seen.in_outage.decided.len()
            );
        }
        for partner_id in ["rapido-lx", "cargo-po"] {
            let p = self
                .registry
                .get_partner(registry::GetPartnerRequest {
                    partner_id: partner_id.into(),
                })
                .await?
                .into_inner();
            let status = registry::PartnerStatus::try_from(p.status).map_or("?".into(), |s| format!("{s:?}"));
            let m = p.hubs.first().and_then(|h| h.metrics).unwrap_or_default();
            println!(
                "  {partner_id}: {status} ({}: {}); {} offers, {} missed, {} delivered on time",
                p.status_source,
                p.status_reason,
                m.offers,
                m.missed_accept + m.missed_pickup,
                m.delivered_on_time
            );
        }
        for h in &hubs {
            if let Some(alert) = h.alerts.first() {
                println!(
                    "  {} alerts: {} (latest: {})",
                    h.spec.as_ref().map_or("", |s| s.hub_id.as_str()),
                    h.alerts.len(),
                    alert.message
                );
            }
        }
        Ok(())
    }

    /// The hubs once every confirmed order is delivered or failed, or nothing moved for
    /// 10 s (only orders no partner can take are left: they wait, alerted), or after 2 min.
    async fn wait_for_fulfilment(&mut self, confirmed: u64) -> anyhow::Result<Vec<registry::Hub>> {
        let fulfilment_started = Instant::now();
        let mut hubs = Vec::new();
        let mut progress_at = (0u64, Instant::now());
        loop {
            hubs.clear();
            for (hub_id, _, _) in HUBS {
                hubs.push(
                    self.registry
                        .get_hub(registry::GetHubRequest { hub_id: hub_id.into() })
                        .await?
                        .into_inner(),
                );
            }
            let finished: u64 = hubs.iter().map(|h| h.delivered + h.failed).sum();
            if finished != progress_at.0 {
                progress_at = (finished, Instant::now());
            }
            if finished >= confirmed
                || progress_at.1.elapsed() > Duration::from_secs(10)
                || fulfilment_started.elapsed() > Duration::from_secs(120)
            {
                return Ok(hubs);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The settlement act (returns, payouts, statements, reconciliation); false if
    /// reconciliation found differences.
    async fn settle(&self) -> anyhow::Result<bool> {
        let drops = [&self.drop_id, &self.drop_b];
        settlement::report(&self.channel(), &self.bearer, &self.creators, &drops, self.order_ids()).await
    }
}

/// What the buyers did.
struct Sale {
    tally: Arc<Tally>,
    confirmed: u64,
    latency: Histogram<u64>,
    restocked: Result<SkuFigures, tonic::Status>,
    /// From open to the last buyer.
    elapsed: Duration,
    opened_wall: f64,
    node_loss: Option<NodeLoss>,
}

impl Sale {
    /// The buyers' outcomes, the restock, and each SKU of Ana's drop (`figures`).
    fn print(&self, figures: &Drop) {
        let t = &self.tally;
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let latency = &self.latency;
        println!();
        println!(
            "Drop ran {:.1} s from open to the last buyer",
            self.elapsed.as_secs_f64()
        );
        println!(
            "reserve latency: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} calls",
            latency.value_at_quantile(0.5) as f64 / 1e3,
            latency.value_at_quantile(0.99) as f64 / 1e3,
            latency.max() as f64 / 1e3,
            latency.len()
        );
        println!(
            "reserves: {} held ({} partial), {} waitlisted, {} sold out",
            n(&t.held),
            n(&t.partial),
            n(&t.waitlisted),
            n(&t.sold_out)
        );
        println!(
            "orders confirmed: {} ({} units); {} waitlisted buyers promoted and bought",
            n(&t.confirmed),
            n(&t.units),
            n(&t.promoted)
        );
        println!(
            "abandoned holds (expired, stock returned): {}; confirms after expiry refused: {}; errors: {}",
            n(&t.abandoned),
            n(&t.too_late),
            n(&t.errors)
        );
        match &self.restocked {
            Ok(sku) => println!(
                "restock: +20 '{}' at hub-lisbon-1 ({} sold, {} available after)",
                sku.name, sku.sold, sku.available
            ),
            Err(status) => println!("restock refused: {status}"),
        }
        println!();
        println!(
            "{:<12} {:>9} {:>6} {:>6} {:>9} {:>16}  sold out after",
            "SKU", "allocated", "sold", "held", "available", "revenue"
        );
        for sku in &figures.skus {
            let sold_out = sku.sold_out_at.as_ref().map_or("-".to_string(), |at| {
                format!(
                    "{:.2} s",
                    at.seconds as f64 + f64::from(at.nanos) / 1e9 - self.opened_wall
                )
            });
            let revenue = sku.price.as_ref().map_or_else(String::new, |p| {
                let minor_units = p.minor_units * i64::from(sku.sold);
                let amount = domain::money::format_minor_units(minor_units, domain::money::exponent_of(&p.currency));
                format!("{amount} {}", p.currency)
            });
            println!(
                "{:<12} {:>9} {:>6} {:>6} {:>9} {:>16}  {}",
                sku.sku_id, sku.allocated, sku.sold, sku.held, sku.available, revenue, sold_out
            );
        }
    }
}

/// The journal audit of both drops against the operator's figures of Ana's.
struct Audit {
    figures: Drop,
    skus: usize,
    events: usize,
    oversold: u64,
    /// Broken invariants ("sku: why").
    broken: Vec<String>,
    /// SKUs whose figures differ from their journal.
    mismatched: Vec<String>,
}

impl Audit {
    fn passed(&self) -> bool {
        self.oversold == 0 && self.broken.is_empty() && self.mismatched.is_empty()
    }

    fn print(&self) {
        println!();
        println!(
            "journal audit: {} SKUs of 2 drops replayed from {} events; invariants {}; figures match the journal: {}",
            self.skus,
            self.events,
            if self.broken.is_empty() {
                "hold".to_string()
            } else {
                self.broken.join("; ")
            },
            if self.mismatched.is_empty() {
                "yes".to_string()
            } else {
                format!("no ({})", self.mismatched.join(", "))
            }
        );
        println!("oversell: {}", self.oversold);
    }
}

struct Buyer {
    index: usize,
    rng: StdRng,
    /// The storefront's client: it reserves, confirms and cancels for this buyer.
    checkout: CheckoutServiceClient<Authed>,
    /// For the buyer's own device, which follows its order with the order's token.
    channel: Channel,
    drop_id: String,
    tally: Arc<Tally>,
    latency: Arc<Mutex<Histogram<u64>>>,
    patience: Duration,
    labels: Labels,
}

impl Buyer {
    async fn shop(mut self) {
        let total: u32 = SKUS.iter().map(|s| s.weight).sum();
        let mut pick = self.rng.random_range(0..total);
        let sku = SKUS.iter().find(|s| {
            if pick < s.weight {
                true
            } else {
                pick -= s.weight;
                false
            }
        });
        let sku = sku.unwrap_or(&SKUS[0]);
        let city = if self.rng.random_bool(0.6) { "Lisbon" } else { "Porto" };
        let quantity = if self.rng.random_bool(0.8) { 1 } else { 2 };
        let abandons = self.rng.random_bool(0.2);
        let request = ReserveRequest {
            drop_id: self.drop_id.clone(),
            sku_id: sku.id.into(),
            buyer_id: format!("buyer-{}", self.index),
            city: city.into(),
            hub_id: String::new(),
            quantity,
            allow_partial: self.rng.random_bool(0.3),
            skip_waitlist: false,
            idempotency_key: format!("reserve-{}", self.index),
        };
        let started = Instant::now();
        let reply = self.checkout.reserve(request).await;
        let micros = started.elapsed().as_micros() as u64;
        let _ = self.latency.lock().map(|mut h| h.record(micros.max(1)));
        let reservation = match reply {
            Ok(r) => r.into_inner(),
            Err(_) => return bump(&self.tally.errors),
        };
        match ReserveOutcome::try_from(reservation.outcome) {
            Ok(ReserveOutcome::Held | ReserveOutcome::Partial) => {
                bump(if reservation.outcome == ReserveOutcome::Partial as i32 {
                    &self.tally.partial
                } else {
                    &self.tally.held
                });
                if abandons {
                    return bump(&self.tally.abandoned);
                }
                let think = Duration::from_millis(self.rng.random_range(0..400));
                tokio::time::sleep(think).await;
                self.confirm(&reservation.order_id, sku, reservation.quantity_held)
                    .await;
            }
            Ok(ReserveOutcome::Waitlisted) => {
                bump(&self.tally.waitlisted);
                if let Some(held) = self
                    .wait_for_promotion(&reservation.order_id, &reservation.order_token)
                    .await
                {
                    if self.confirm(&reservation.order_id, sku, held).await {
                        bump(&self.tally.promoted);
                    }
                }
            }
            _ => bump(&self.tally.sold_out),
        }
    }

    /// Follows the waitlisted order until it is promoted to a hold (its quantity), ends, or
    /// the buyer's patience runs out (then leaves the waitlist).
    async fn wait_for_promotion(&mut self, order_id: &str, order_token: &str) -> Option<u32> {
        let device = Bearer::new(order_token).ok()?;
        let watch = async {
            let mut stream = CheckoutServiceClient::with_interceptor(self.channel.clone(), device)
                .watch_order(WatchOrderRequest {
                    order_id: order_id.into(),
                })
                .await
                .ok()?
                .into_inner();
            while let Ok(Some(order)) = stream.message().await {
                match OrderStatus::try_from(order.status) {
                    Ok(OrderStatus::Held) => return Some(order.quantity),
                    Ok(OrderStatus::Waitlisted) => continue,
                    _ => return None,
                }
            }
            None
        };
        match tokio::time::timeout(self.patience, watch).await {
            Ok(held) => held,
            Err(_) => {
                let _ = self
                    .checkout
                    .cancel(CancelRequest {
                        order_id: order_id.into(),
                    })
                    .await;
                None
            }
        }
    }

    async fn confirm(&mut self, order_id: &str, sku: &DemoSku, quantity: u32) -> bool {
        let fulfilment = if self.rng.random_bool(0.5) {
            confirm_request::Fulfilment::Pickup(Pickup {})
        } else {
            confirm_request::Fulfilment::Delivery(Delivery {
                address: Some(Address {
                    recipient_name: format!("Demo Buyer {}", self.index),
                    line1: format!("{} Rua Augusta", self.index % 200 + 1),
                    line2: String::new(),
                    postal_code: "1100-048".into(),
                    city: "Lisbon".into(),
                    country: "PT".into(),
                    phone: String::new(),
                }),
            })
        };
        let request = ConfirmRequest {
            order_id: order_id.into(),
            payment_reference: format!("pay-demo-{}", self.index),
            amount: Some(Money {
                minor_units: sku.price * i64::from(quantity),
                currency: "EUR".into(),
            }),
            fulfilment: Some(fulfilment),
            discreet: self.rng.random_bool(0.1),
        };
        match self.checkout.confirm(request).await {
            Ok(response) => {
                // The hub prints the pickup code on the parcel label.
                if let Some(order) = response.into_inner().order {
                    let _ = self
                        .labels
                        .lock()
                        .map(|mut l| l.insert(order.order_id, order.pickup_code));
                }
                bump(&self.tally.confirmed);
                self.tally.units.fetch_add(u64::from(quantity), Ordering::Relaxed);
                true
            }
            Err(status) if status.code() == Code::FailedPrecondition => {
                bump(&self.tally.too_late);
                false
            }
            Err(_) => {
                bump(&self.tally.errors);
                false
            }
        }
    }
}
