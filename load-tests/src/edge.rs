//! `dropline-load edge`: the pop-up edge's targets. Starts a `dropline serve` and a
//! `dropline edge` (the binary given) with a TCP proxy between them, leases the edge
//! enough stock, cuts the link and measures, in one run:
//! - an offline sale at the stall (Reserve + Confirm on the edge, acknowledged once synced
//!   in the edge's journal) from `--tills` concurrent tills;
//! - the same sale online on the platform itself (Reserve + Confirm for pickup through the
//!   storefront API, `--tills` concurrent buyers): the ratio puts the edge's figure against
//!   the platform's on the same machine in the same minute;
//! - once the link is back, how fast the outbox is booked upstream: sales from the edge's
//!   first answer after the heal until its outbox is empty, per second.
//!
//! It fails if a sale is lost or booked twice: every stall sale must be a confirmed order
//! on the platform and the SKU's sold figure must equal the sales made.

use anyhow::{ensure, Context as _};
use hdrhistogram::Histogram;
use proto::checkout::v1::checkout_service_client::CheckoutServiceClient;
use proto::checkout::v1::*;
use proto::edge::v1::popup_service_client::PopupServiceClient;
use proto::edge::v1::{GetPopupStatusRequest, PopupStatus};
use proto::operator::v1::{GetDropRequest, LeaseStockRequest, OpenDropRequest};
use services::auth::{Authed, Bearer};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use testkit::nemesis::proxy::{LinkMode, LinkProxy};
use testkit::{EdgeCommand, ServeCommand};

const STARTUP: Duration = Duration::from_secs(60);
const EDGE: &str = "bench-stall";

#[derive(Debug, clap::Args)]
pub struct EdgeArgs {
    /// The `dropline` binary (it runs both `serve` and `edge`).
    #[arg(long)]
    pub dropline_bin: PathBuf,
    /// Tills selling at once (and buyers at once in the online comparison).
    #[arg(long, default_value_t = 16)]
    pub tills: usize,
    /// Sales each till makes offline (and each buyer online).
    #[arg(long, default_value_t = 2_000)]
    pub sales_per_till: usize,
}

pub async fn run(args: EdgeArgs) -> anyhow::Result<()> {
    ensure!(
        args.tills > 0 && args.sales_per_till > 0,
        "--tills and --sales-per-till must be at least 1"
    );
    let offline_sales = args.tills * args.sales_per_till;
    let dir = tempfile::Builder::new().prefix("dropline-load-edge-").tempdir()?;
    let mut upstream = ServeCommand::new(dir.path().join("platform"))?
        .exe(&args.dropline_bin)
        .spawn()?;
    let channel = upstream.connect(STARTUP).await?;
    testkit::create_test_hubs(&channel).await;
    testkit::creator(&channel, "creator-1").await;
    let stock = u32::try_from(2 * offline_sales + 1_000).context("too many sales")?;
    let mut operator = testkit::operator_client(&channel);
    operator
        .create_drop(testkit::drop_request("bench", &[("tee", stock)], 1_000, 600))
        .await?;
    operator
        .open_drop(OpenDropRequest {
            drop_id: "bench".into(),
        })
        .await?;
    let credential =
        testkit::storefront_credential(std::slice::from_ref(&channel), testkit::OPERATOR_TOKEN, EDGE).await?;
    operator
        .lease_stock(LeaseStockRequest {
            drop_id: "bench".into(),
            sku_id: "tee".into(),
            hub_id: "hub-1".into(),
            edge_id: EDGE.into(),
            quantity: u32::try_from(offline_sales)?,
            top_up_max: 0,
            key_id: "bench-1".into(),
            expires_at: Some(testkit::ts(3_600)),
            reconcile_window_seconds: 3_600,
        })
        .await?;
    let proxy = LinkProxy::start(0, upstream.addr).await?;
    let mut edge = EdgeCommand::new(
        &format!("http://{}", proxy.addr()),
        &credential,
        "bench",
        dir.path().join("edge"),
    )?
    .args(["--sync-secs", "1", "--offline-after-ms", "1000", "--top-up-below", "0"]);
    edge.exe = Some(args.dropline_bin.clone());
    let mut edge = edge.spawn()?;
    let edge_channel = edge.connect(STARTUP).await?;
    let bearer = Bearer::new(&credential)?;
    let status = PopupServiceClient::with_interceptor(edge_channel.clone(), bearer.clone());
    until(&status, "the edge has its lease", |s| s.online && s.tills.len() == 1).await?;
    proxy.set(LinkMode::Cut);
    until(&status, "the edge is offline", |s| !s.online).await?;

    // Offline: the tills sell the lease.
    let till = CheckoutServiceClient::with_interceptor(edge_channel.clone(), bearer.clone());
    let (offline, took_offline) = sell(till, args.tills, args.sales_per_till, "till", None).await?;
    let sold = offline.len();
    ensure!(sold == offline_sales, "the stall sold {sold} of {offline_sales}");

    // Online, for comparison: the same sale on the platform itself.
    let storefront = testkit::storefront_client(&channel).await;
    let (online, took_online) = sell(storefront, args.tills, args.sales_per_till, "web", Some("Lisbon")).await?;

    // Back online: the outbox drains upstream.
    proxy.set(LinkMode::Up);
    let back = until(&status, "the edge is back online", |s| s.online).await?;
    let pending_at_heal = back.tills[0].sales_pending;
    let healed = Instant::now();
    until(&status, "the outbox drained", |s| s.tills[0].sales_pending == 0).await?;
    let drained = healed.elapsed();

    // Every stall sale is a confirmed order on the platform, once.
    let drop = operator
        .get_drop(GetDropRequest {
            drop_id: "bench".into(),
        })
        .await?
        .into_inner();
    let sku = &drop.skus[0];
    ensure!(
        u64::from(sku.sold) == (sold + online.len()) as u64,
        "the platform says {} sold; the stall sold {sold} and the web {}",
        sku.sold,
        online.len()
    );
    let after = PopupServiceClient::with_interceptor(edge_channel, bearer)
        .get_status(GetPopupStatusRequest {})
        .await?
        .into_inner();
    let t = &after.tills[0];
    ensure!(
        t.sales_booked as usize == sold && t.sales_refunded == 0,
        "{} booked and {} refunded of {sold}",
        t.sales_booked,
        t.sales_refunded
    );
    let (at_stall, on_platform) = (histogram(&offline), histogram(&online));
    let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p) as f64 / 1e3;
    let rate = |n: usize, took: Duration| n as f64 / took.as_secs_f64();
    println!(
        "edge offline sale (reserve + confirm, synced on the edge): {sold} sales from {} tills in {:.1} s ({:.0}/s); p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        args.tills,
        took_offline.as_secs_f64(),
        rate(sold, took_offline),
        q(&at_stall, 0.5),
        q(&at_stall, 0.99),
        at_stall.max() as f64 / 1e3
    );
    println!(
        "platform online sale (the same calls, {} buyers): {} sales in {:.1} s ({:.0}/s); p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        args.tills,
        online.len(),
        took_online.as_secs_f64(),
        rate(online.len(), took_online),
        q(&on_platform, 0.5),
        q(&on_platform, 0.99),
        on_platform.max() as f64 / 1e3
    );
    println!(
        "ratio edge/platform: p99 {:.2}, sales/s {:.2}",
        q(&at_stall, 0.99) / q(&on_platform, 0.99),
        rate(sold, took_offline) / rate(online.len(), took_online)
    );
    println!(
        "upload after the heal: {pending_at_heal} sales booked upstream in {:.2} s ({:.0} sales/s), each once",
        drained.as_secs_f64(),
        f64::from(pending_at_heal) / drained.as_secs_f64().max(1e-3)
    );
    edge.kill();
    upstream.kill();
    Ok(())
}

fn histogram(latencies: &[u64]) -> Histogram<u64> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    for &us in latencies {
        h.saturating_record(us);
    }
    h
}

/// `tills` concurrent sellers each making `per_till` sales (reserve 1, confirm for pickup);
/// returns each sale's latency in µs and the time taken.
async fn sell(
    client: CheckoutServiceClient<Authed>,
    tills: usize,
    per_till: usize,
    prefix: &str,
    city: Option<&str>,
) -> anyhow::Result<(Vec<u64>, Duration)> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..tills {
        let mut client = client.clone();
        let (prefix, city) = (prefix.to_string(), city.unwrap_or_default().to_string());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_till);
            for n in 0..per_till {
                let began = Instant::now();
                let held = client
                    .reserve(ReserveRequest {
                        drop_id: "bench".into(),
                        sku_id: "tee".into(),
                        buyer_id: format!("{prefix}-{t}-{n}"),
                        city: city.clone(),
                        quantity: 1,
                        skip_waitlist: true,
                        ..ReserveRequest::default()
                    })
                    .await?
                    .into_inner();
                ensure!(
                    held.outcome == ReserveOutcome::Held as i32,
                    "{prefix} {t}/{n}: {held:?}"
                );
                client
                    .confirm(ConfirmRequest {
                        order_id: held.order_id,
                        payment_reference: format!("{prefix}-card-{t}-{n}"),
                        amount: testkit::eur(2_500),
                        fulfilment: Some(confirm_request::Fulfilment::Pickup(Pickup {})),
                        discreet: false,
                    })
                    .await?;
                latencies.push(began.elapsed().as_micros() as u64);
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    let mut all = Vec::with_capacity(tills * per_till);
    for task in tasks {
        all.extend(task.await??);
    }
    Ok((all, started.elapsed()))
}

async fn until(
    status: &PopupServiceClient<Authed>,
    what: &str,
    done: impl Fn(&PopupStatus) -> bool,
) -> anyhow::Result<PopupStatus> {
    let until = Instant::now() + STARTUP;
    loop {
        let now = status.clone().get_status(GetPopupStatusRequest {}).await?.into_inner();
        if done(&now) {
            return Ok(now);
        }
        ensure!(Instant::now() < until, "{what}: not within {STARTUP:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
