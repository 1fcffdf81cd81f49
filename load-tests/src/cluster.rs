//! `dropline-load cluster`: what cluster mode costs and how fast it recovers, in one run.
//!
//! 1. The hot-SKU burst against one embedded `dropline serve` (sled, no NATS).
//! 2. The same burst against N `dropline serve --nats` nodes on N NATS JetStream servers
//!    (replicas = N, `sync_interval: always`), the clients spread over all nodes, so most
//!    reserves travel to the SKU's owner over NATS. Reported as a ratio of step 1.
//! 3. Takeover: kill -9 of the node owning the hot SKU, `--kills` times; each time, the time
//!    until a call routed to that SKU through a surviving node is answered again; the killed
//!    node is restarted and the cluster left to rebalance before the next kill.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use proto::checkout::v1::checkout_service_client::CheckoutServiceClient;
use testkit::{ClusterOptions, LocalCluster};
use tonic::transport::Channel;

use crate::hot_sku::{self, LoadShape};
use crate::net;

#[derive(Debug, clap::Args)]
pub struct ClusterArgs {
    /// The `dropline` binary to run as the embedded server and as the cluster's nodes.
    #[arg(long)]
    pub dropline_bin: PathBuf,
    /// Dropline nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// NATS JetStream servers (a cluster when more than one); the journal and buckets are
    /// replicated on all of them [default: --nodes].
    #[arg(long)]
    pub nats_servers: Option<usize>,
    #[command(flatten)]
    pub load: LoadShape,
    /// Node kills for the takeover percentiles (0: skip).
    #[arg(long, default_value_t = 20)]
    pub kills: usize,
    /// The nodes' lease TTL (ms) [default: the server's, 5000].
    #[arg(long, default_value_t = 5_000)]
    pub lease_ttl_ms: u64,
    /// The nodes' lease renewal interval (ms) [default: the server's, 1000].
    #[arg(long, default_value_t = 1_000)]
    pub lease_renew_ms: u64,
}

pub async fn run(args: ClusterArgs) -> anyhow::Result<()> {
    let temp = tempfile::Builder::new().prefix("dropline-load-cluster-").tempdir()?;
    let stock = u32::try_from(args.load.attempts).context("--attempts must fit a u32")?;

    // 1. Embedded.
    let mut embedded = crate::catalog::start_server(&args.dropline_bin, &temp.path().join("embedded"), None)?;
    let target = format!("http://{}", embedded.addr);
    embedded.connect(Duration::from_secs(30)).await?;
    let channels = net::connect_channels(&target, args.load.connections).await?;
    let drop_id = format!("load-{}", crate::unix_millis());
    hot_sku::create_hot_drop(channels[0].clone(), &drop_id, stock).await?;
    eprintln!(
        "embedded: {} reserves, {} concurrent",
        args.load.attempts, args.load.concurrency
    );
    let alone = hot_sku::reserve_burst(&channels, &drop_id, args.load).await?;
    let alone_check = hot_sku::check_stock(channels[0].clone(), &drop_id).await?;
    drop(channels);
    embedded.kill();

    // 2. Cluster.
    let servers = args.nats_servers.unwrap_or(args.nodes).max(1);
    eprintln!("starting {servers} NATS servers and {} Dropline nodes", args.nodes);
    let options = ClusterOptions {
        nats_servers: servers,
        lease_ttl_ms: args.lease_ttl_ms,
        lease_renew_ms: args.lease_renew_ms,
        operator_token: crate::operator_token(),
        exe: Some(args.dropline_bin.clone()),
        log_filter: std::env::var("DROPLINE_LOG").unwrap_or_else(|_| "warn".into()),
        ..ClusterOptions::new(args.nodes)
    };
    let mut cluster = LocalCluster::start(options, &temp.path().join("cluster")).await?;
    let addrs = cluster.addrs();
    let mut channels = Vec::new();
    for i in 0..args.load.connections.max(addrs.len()) {
        channels.extend(net::connect_channels(&format!("http://{}", addrs[i % addrs.len()]), 1).await?);
    }
    let cluster_drop = format!("load-{}", crate::unix_millis());
    hot_sku::create_hot_drop(channels[0].clone(), &cluster_drop, stock).await?;
    eprintln!(
        "cluster: {} reserves, {} concurrent, over {} nodes",
        args.load.attempts,
        args.load.concurrency,
        addrs.len()
    );
    let spread = hot_sku::reserve_burst(&channels, &cluster_drop, args.load).await?;
    let spread_check = hot_sku::check_stock(channels[0].clone(), &cluster_drop).await?;

    println!(
        "hot-SKU burst: {} reserves, {} concurrent; embedded vs {} nodes on {} NATS servers (R{})",
        args.load.attempts,
        args.load.concurrency,
        addrs.len(),
        cluster.nats_servers(),
        cluster.nats_servers()
    );
    println!("{}", hot_sku::header());
    println!("{}", hot_sku::row("embedded", &alone));
    println!("{}", hot_sku::row("cluster", &spread));
    println!(
        "ratio cluster/embedded: {:.2}",
        spread.calls_per_second() / alone.calls_per_second().max(f64::MIN_POSITIVE)
    );
    println!(
        "oversell: embedded {}, cluster {}; errors: embedded {}, cluster {}",
        alone_check.oversold,
        spread_check.oversold,
        alone.error_count(),
        spread.error_count()
    );
    if alone_check.oversold > 0 || spread_check.oversold > 0 {
        bail!("oversold");
    }

    // 3. Takeovers.
    if args.kills > 0 {
        let stream = format!("sku/{cluster_drop}/{}", hot_sku::HOT_SKU);
        let mut taken = Histogram::<u64>::new_with_bounds(1, 600_000, 3)?;
        for kill in 0..args.kills {
            let victim = cluster.wait_for_owner_of(&stream, Duration::from_secs(30)).await?;
            let owner = cluster.name(victim).to_string();
            let survivor = (victim + 1) % addrs.len();
            let channel = net::connect_channels(&format!("http://{}", addrs[survivor]), 1)
                .await?
                .remove(0);
            cluster.kill(victim);
            let killed = Instant::now();
            let took = served_again(channel, &cluster_drop, killed).await?;
            taken.record(took.as_millis() as u64)?;
            eprintln!(
                "kill {}: {owner} — served again after {} ms",
                kill + 1,
                took.as_millis()
            );
            cluster.restart(victim).await?;
            cluster.settled().await?;
        }
        println!(
            "takeover after kill -9 of the hot SKU's node ({} kills; lease TTL {} ms, renewal {} ms): \
             p50 {} ms, p99 {} ms, max {} ms",
            args.kills,
            args.lease_ttl_ms,
            args.lease_renew_ms,
            taken.value_at_quantile(0.5),
            taken.value_at_quantile(0.99),
            taken.max()
        );
    }
    // The nodes go first, then the NATS servers.
    drop(cluster);
    Ok(())
}

/// Time from `killed` until a call that needs the hot SKU's actor, made through a surviving
/// node, is answered again: GetOrder of an order of that SKU that does not exist (NOT_FOUND
/// comes from the actor itself; availability would come from a cache).
async fn served_again(channel: Channel, drop_id: &str, killed: Instant) -> anyhow::Result<Duration> {
    // The operator may read any order; an unknown one is NOT_FOUND from the actor itself.
    let mut client = CheckoutServiceClient::with_interceptor(channel, crate::operator_auth());
    let order_id = format!("{drop_id}.{}.ffffffffffffffff", hot_sku::HOT_SKU);
    loop {
        let answer = client
            .get_order(proto::checkout::v1::GetOrderRequest {
                order_id: order_id.clone(),
            })
            .await;
        match answer {
            Ok(_) => return Ok(killed.elapsed()),
            Err(status) if status.code() == tonic::Code::NotFound => return Ok(killed.elapsed()),
            Err(_) => {}
        }
        if killed.elapsed() > Duration::from_secs(60) {
            bail!("the hot SKU was not served again within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
