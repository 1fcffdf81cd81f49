//! The hot-SKU burst: every buyer of a live drop tries to reserve the same SKU at once.
//!
//! This is the worst case for Dropline's design (one actor owns each SKU, so one SKU's
//! reserves are serialised), and the case a live drop actually produces. The burst is then
//! repeated against a bare tonic echo server with messages of the same size, so the report
//! can say how much of the gRPC ceiling Dropline reaches, and the SKU's figures are checked
//! afterwards: no load may ever sell more than was allocated.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use prost::Message as _;
use proto::bench::v1::echo_service_client::EchoServiceClient;
use proto::bench::v1::EchoRequest;
use proto::checkout::v1::checkout_service_client::CheckoutServiceClient;
use proto::checkout::v1::{ReserveOutcome, ReserveRequest};
use proto::common::v1::Money;
use proto::operator::v1::{Allocation, CreateDropRequest, GetDropRequest, SkuSpec};
use tonic::transport::Channel;

use crate::burst::{run_burst, BurstStats};
use crate::{echo, net, open_drop, open_window, unix_millis, HOLD_TTL_SECONDS};

pub(crate) const HOT_SKU: &str = "hot";
const HUB: &str = "hub-1";
const CITY: &str = "Loadville";

/// The shape of a burst, shared by the Dropline run and its echo baseline.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct LoadShape {
    /// Calls in flight at once: each worker starts its next call when the last one answers.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Calls to make in total, each by a different buyer.
    #[arg(long, default_value_t = 100_000)]
    pub attempts: usize,
    /// HTTP/2 connections the workers share round-robin.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
}

impl LoadShape {
    fn validate(&self) -> anyhow::Result<()> {
        ensure!(self.attempts > 0, "--attempts must be at least 1");
        ensure!(self.concurrency > 0, "--concurrency must be at least 1");
        ensure!(self.connections > 0, "--connections must be at least 1");
        Ok(())
    }
}

/// Arguments of `dropline-load hot-sku`.
#[derive(Debug, clap::Args)]
pub struct HotSkuArgs {
    /// The Dropline server to load.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub target: String,
    #[command(flatten)]
    pub load: LoadShape,
    /// Units of the hot SKU [default: --attempts, so every reserve can be HELD].
    #[arg(long)]
    pub stock: Option<u32>,
    /// Do not run the tonic echo baseline.
    #[arg(long)]
    pub skip_echo: bool,
    /// Seconds to wait for the target to answer, so the test can be started together with
    /// the server.
    #[arg(long, default_value_t = 30)]
    pub wait_secs: u64,
}

/// Arguments of the hidden `dropline-load echo-only`: the baseline half of `hot-sku` alone,
/// to check the generator and the machine without a Dropline server.
#[derive(Debug, clap::Args)]
pub struct EchoOnlyArgs {
    #[command(flatten)]
    pub load: LoadShape,
}

/// The hot SKU's figures after the burst, as the server reports them.
pub(crate) struct StockCheck {
    allocated: u32,
    held: u32,
    sold: u32,
    /// Units held or sold beyond the allocation, summed over pools (or over the SKU, if
    /// that is larger): anything but zero is a correctness bug.
    pub(crate) oversold: u64,
}

/// Runs `dropline-load hot-sku`.
pub async fn run(args: HotSkuArgs) -> anyhow::Result<()> {
    let load = args.load;
    load.validate()?;
    let stock = match args.stock {
        Some(stock) => stock,
        None => u32::try_from(load.attempts).context("--attempts does not fit a pool's u32 quantity: give --stock")?,
    };

    let wait = Duration::from_secs(args.wait_secs);
    eprintln!("waiting up to {} s for {} to answer", wait.as_secs(), args.target);
    net::wait_until_answering(&args.target, None, wait).await?;
    let channels = net::connect_channels(&args.target, load.connections).await?;
    let drop_id = format!("load-{}", unix_millis());
    eprintln!("creating drop {drop_id}: SKU `{HOT_SKU}` with {stock} units");
    create_hot_drop(channels[0].clone(), &drop_id, stock).await?;

    eprintln!(
        "dropline: {} reserves, {} concurrent, {} connections",
        load.attempts, load.concurrency, load.connections
    );
    let dropline = reserve_burst(&channels, &drop_id, load).await?;
    let check = check_stock(channels[0].clone(), &drop_id).await?;
    drop(channels);

    let echo = if args.skip_echo {
        None
    } else {
        eprintln!("tonic echo: the same burst against a bare echo server");
        Some(echo_burst(&drop_id, load).await)
    };

    println!(
        "hot-SKU burst: {} reserves, {} concurrent, {} connections",
        load.attempts, load.concurrency, load.connections
    );
    println!("{}", header());
    println!("{}", row("dropline reserve", &dropline));
    match &echo {
        Some(Ok(echo)) => {
            println!("{}", row("tonic echo", echo));
            let echo_rate = echo.calls_per_second();
            if echo_rate > 0.0 {
                println!("ratio dropline/echo: {:.2}", dropline.calls_per_second() / echo_rate);
            }
        }
        Some(Err(error)) => println!("{:<17}failed: {error:#}", "tonic echo"),
        None => {}
    }
    println!("outcomes: {}", outcome_summary(&dropline));
    dropline.error_examples().for_each(|line| println!("{line}"));
    if let Some(Ok(echo)) = &echo {
        if echo.error_count() > 0 {
            println!("echo errors: {}", echo.error_summary());
            echo.error_examples().for_each(|line| println!("{line}"));
        }
    }
    println!(
        "oversell: {} (allocated {}, held {}, sold {})",
        check.oversold, check.allocated, check.held, check.sold
    );

    let held_by_clients = dropline.outcome(&ReserveOutcome::Held);
    if check.oversold > 0 {
        bail!("the hot SKU is oversold by {} units", check.oversold);
    }
    if u64::from(check.held) != held_by_clients {
        bail!(
            "the server holds {} units but clients were told HELD {} times",
            check.held,
            held_by_clients
        );
    }
    if let Some(Err(error)) = echo {
        return Err(error.context("the echo baseline failed"));
    }
    Ok(())
}

/// Runs the hidden `dropline-load echo-only`.
pub async fn run_echo_only(args: EchoOnlyArgs) -> anyhow::Result<()> {
    let load = args.load;
    load.validate()?;
    let echo = echo_burst(&format!("load-{}", unix_millis()), load).await?;
    println!(
        "echo burst: {} calls, {} concurrent, {} connections",
        load.attempts, load.concurrency, load.connections
    );
    println!("{}", header());
    println!("{}", row("tonic echo", &echo));
    println!("errors: {}", echo.error_summary());
    echo.error_examples().for_each(|line| println!("{line}"));
    ensure!(echo.error_count() == 0, "{} echo calls failed", echo.error_count());
    Ok(())
}

/// Creates and opens a drop with the one hot SKU, all its stock in one pool.
pub(crate) async fn create_hot_drop(channel: Channel, drop_id: &str, stock: u32) -> anyhow::Result<()> {
    crate::create_hubs(channel.clone(), &[(HUB.to_owned(), CITY.to_owned())]).await?;
    let mut operator = crate::operator(channel);
    let (opens_at, closes_at) = open_window();
    let request = CreateDropRequest {
        drop_id: drop_id.to_owned(),
        creator_id: "load-creator".to_owned(),
        title: "Hot-SKU load test".to_owned(),
        opens_at: Some(opens_at),
        closes_at: Some(closes_at),
        hold_ttl_seconds: HOLD_TTL_SECONDS,
        skus: vec![SkuSpec {
            sku_id: HOT_SKU.to_owned(),
            name: "Hot item".to_owned(),
            price: Some(Money {
                minor_units: 2_500,
                currency: "EUR".to_owned(),
            }),
            per_buyer_limit: 1,
            allocations: vec![Allocation {
                hub_id: HUB.to_owned(),
                city: CITY.to_owned(),
                quantity: stock,
            }],
        }],
        settlement: None,
    };
    operator
        .create_drop(request)
        .await
        .with_context(|| format!("CreateDrop {drop_id} failed"))?;
    open_drop(&mut operator, drop_id).await
}

/// Reserve number `index` of the burst: its own buyer and idempotency key, one unit, and no
/// waitlist, so a reserve either holds a unit or is told SOLD_OUT at once.
fn reserve_request(drop_id: &str, index: usize) -> ReserveRequest {
    ReserveRequest {
        drop_id: drop_id.to_owned(),
        sku_id: HOT_SKU.to_owned(),
        buyer_id: format!("buyer-{index}"),
        city: CITY.to_owned(),
        hub_id: String::new(),
        quantity: 1,
        allow_partial: false,
        skip_waitlist: true,
        idempotency_key: format!("k-{index}"),
    }
}

/// The Dropline burst: `attempts` reserves of the hot SKU.
pub(crate) async fn reserve_burst(
    channels: &[Channel],
    drop_id: &str,
    load: LoadShape,
) -> anyhow::Result<BurstStats<ReserveOutcome>> {
    let clients: Arc<[CheckoutServiceClient<Channel>]> =
        channels.iter().cloned().map(CheckoutServiceClient::new).collect();
    let drop_id: Arc<str> = drop_id.into();
    run_burst(load.attempts, load.concurrency, move |index| {
        let mut client = clients[index % clients.len()].clone();
        let request = reserve_request(&drop_id, index);
        async move {
            let response = client.reserve(request).await?.into_inner();
            Ok(response.outcome())
        }
    })
    .await
}

/// The baseline burst: the same calls against a fresh echo server process, each carrying an
/// encoded reserve request of the same shape, so request sizes match the Dropline run.
async fn echo_burst(drop_id: &str, load: LoadShape) -> anyhow::Result<BurstStats<()>> {
    let (mut child, addr) = echo::spawn_child().await?;
    let result = async {
        let channels = net::connect_channels(&format!("http://{addr}"), load.connections).await?;
        let clients: Arc<[EchoServiceClient<Channel>]> = channels.into_iter().map(EchoServiceClient::new).collect();
        let drop_id: Arc<str> = drop_id.into();
        run_burst(load.attempts, load.concurrency, move |index| {
            let mut client = clients[index % clients.len()].clone();
            let payload = reserve_request(&drop_id, index).encode_to_vec();
            async move {
                client.echo(EchoRequest { payload }).await?;
                Ok(())
            }
        })
        .await
    }
    .await;
    net::stop(&mut child).await;
    result
}

/// Reads the hot SKU's figures and computes how far, if at all, it is oversold.
pub(crate) async fn check_stock(channel: Channel, drop_id: &str) -> anyhow::Result<StockCheck> {
    let mut operator = crate::operator(channel);
    let drop = operator
        .get_drop(GetDropRequest {
            drop_id: drop_id.to_owned(),
        })
        .await
        .with_context(|| format!("GetDrop {drop_id} failed"))?
        .into_inner();
    let sku = drop
        .skus
        .iter()
        .find(|sku| sku.sku_id == HOT_SKU)
        .with_context(|| format!("GetDrop {drop_id} does not list SKU `{HOT_SKU}`"))?;
    let excess =
        |allocated: u32, held: u32, sold: u32| (u64::from(held) + u64::from(sold)).saturating_sub(u64::from(allocated));
    // Per pool as well as per SKU: a pool oversold while another undersold would cancel out
    // in the SKU's totals, yet still sells stock a hub does not have.
    let pools_excess: u64 = sku
        .pools
        .iter()
        .map(|pool| excess(pool.allocated, pool.held, pool.sold))
        .sum();
    Ok(StockCheck {
        allocated: sku.allocated,
        held: sku.held,
        sold: sku.sold,
        oversold: pools_excess.max(excess(sku.allocated, sku.held, sku.sold)),
    })
}

pub(crate) fn header() -> String {
    format!(
        "{:<17}{:>8}{:>10}{:>9}{:>10}",
        "", "calls/s", "p50 ms", "p99 ms", "p999 ms"
    )
}

pub(crate) fn row<O: Ord>(name: &str, stats: &BurstStats<O>) -> String {
    format!(
        "{name:<17}{:>8.0}{:>10.1}{:>9.1}{:>10.1}",
        stats.calls_per_second(),
        stats.latency_ms(0.5),
        stats.latency_ms(0.99),
        stats.latency_ms(0.999),
    )
}

/// `HELD 99000, SOLD_OUT 1000, errors 0`: HELD and SOLD_OUT always, the outcomes a
/// one-unit, no-waitlist reserve should never produce only when they occurred.
fn outcome_summary(stats: &BurstStats<ReserveOutcome>) -> String {
    let mut parts = Vec::new();
    for outcome in [
        ReserveOutcome::Held,
        ReserveOutcome::Partial,
        ReserveOutcome::Waitlisted,
        ReserveOutcome::SoldOut,
        ReserveOutcome::Unspecified,
    ] {
        let count = stats.outcome(&outcome);
        let always = matches!(outcome, ReserveOutcome::Held | ReserveOutcome::SoldOut);
        if always || count > 0 {
            let name = outcome.as_str_name();
            let name = name.strip_prefix("RESERVE_OUTCOME_").unwrap_or(name);
            parts.push(format!("{name} {count}"));
        }
    }
    let errors = stats.error_count();
    if errors == 0 {
        parts.push("errors 0".to_owned());
    } else {
        parts.push(format!("errors {errors} ({})", stats.error_summary()));
    }
    parts.join(", ")
}
