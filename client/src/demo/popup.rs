//! The demo's pop-up in Porto: the operator leases it part of the Porto hub's black tees,
//! a real edge (`services::popup`, in this process, on its own journal) sells them at the
//! stall through its CheckoutService, its link to the platform (a TCP proxy here) drops as
//! the stream starts, the stall keeps selling its lease offline during the burst, and
//! when the link is back every sale is uploaded and booked once. The report's line
//! compares the stall's sales with the platform's orders.

use proto::checkout::v1::checkout_service_client::CheckoutServiceClient;
use proto::checkout::v1::*;
use proto::edge::v1::popup_service_client::PopupServiceClient;
use proto::edge::v1::{GetPopupStatusRequest, PopupStatus};
use proto::operator::v1::operator_service_client::OperatorServiceClient;
use proto::operator::v1::LeaseStockRequest;
use services::auth::{Authed, Bearer};
use services::popup::{Edge, EdgeConfig, EdgeTimings};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::nemesis::proxy::{LinkMode, LinkProxy};
use tonic::transport::Channel;

const EDGE: &str = "popup-porto";
const SKU: &str = "tee-black";
const LEASED: u32 = 24;
/// Sales the stall makes online, before its link drops.
const ONLINE_SALES: u32 = 4;

pub struct PopUp {
    proxy: LinkProxy,
    till: CheckoutServiceClient<Authed>,
    status: PopupServiceClient<Authed>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    edge: Edge,
    drop_id: String,
    sales: Vec<String>,
    offline_sales: u32,
}

impl PopUp {
    /// Leases the stall its stock, starts its edge behind a proxy and sells a few units
    /// online, then cuts the link.
    pub async fn open(
        platform: &Channel,
        upstream: std::net::SocketAddr,
        operator: &mut OperatorServiceClient<Authed>,
        operator_token: &str,
        drop_id: &str,
        data_dir: &Path,
    ) -> anyhow::Result<PopUp> {
        let credential = testkit::storefront_credential(std::slice::from_ref(platform), operator_token, EDGE).await?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
        operator
            .lease_stock(LeaseStockRequest {
                drop_id: drop_id.into(),
                sku_id: SKU.into(),
                hub_id: "hub-porto-1".into(),
                edge_id: EDGE.into(),
                quantity: LEASED,
                top_up_max: 0,
                key_id: format!("{EDGE}-{drop_id}"),
                expires_at: Some(prost_types::Timestamp {
                    seconds: now.as_secs() as i64 + 4 * 3_600,
                    nanos: 0,
                }),
                reconcile_window_seconds: 3_600,
            })
            .await?;
        let proxy = LinkProxy::start(0, upstream).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let listen = listener.local_addr()?;
        let upstream_url = format!("http://{}", proxy.addr());
        let edge = Edge::open(
            EdgeConfig {
                upstream: tonic::transport::Endpoint::from_shared(upstream_url.clone())?,
                upstream_url,
                token: credential.clone(),
                drop_id: domain::DropId::parse(drop_id).map_err(|e| anyhow::anyhow!("{drop_id}: {e}"))?,
                data_dir: data_dir.join("edge-porto"),
                listen,
                timings: EdgeTimings {
                    offline_after: Duration::from_millis(700),
                    sync_every: Duration::from_secs(1),
                    ..EdgeTimings::default()
                },
                top_up_below: 0,
                top_up_units: 1,
            },
            Arc::new(actors::SystemClock),
        )?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(services::popup::serve(edge.clone(), listener, async {
            let _ = stopped.await;
        }));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{listen}"))?
            .connect()
            .await?;
        let bearer = Bearer::new(&credential)?;
        let mut popup = PopUp {
            proxy,
            till: CheckoutServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            status: PopupServiceClient::with_interceptor(channel, bearer),
            stop,
            task,
            edge,
            drop_id: drop_id.into(),
            sales: Vec::new(),
            offline_sales: 0,
        };
        popup
            .until("the pop-up's lease reached it", |s| s.online && s.tills.len() == 1)
            .await?;
        for _ in 0..ONLINE_SALES {
            popup.sell().await?;
        }
        popup
            .until("the pop-up's online sales were booked", |s| {
                s.tills.iter().map(|t| t.sales_booked).sum::<u32>() == ONLINE_SALES
            })
            .await?;
        popup.proxy.set(LinkMode::Cut);
        popup.until("the pop-up went offline", |s| !s.online).await?;
        println!(
            "pop-up: {EDGE} in Porto leased {LEASED} '{SKU}' from hub-porto-1, sold {ONLINE_SALES} online, then its network dropped"
        );
        Ok(popup)
    }

    /// Sells at the stall until its lease is sold out (offline, while the burst runs).
    pub async fn sell_out_offline(&mut self) -> anyhow::Result<()> {
        while self.sell().await? {
            self.offline_sales += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// One sale at the till: false when the stall has nothing left.
    async fn sell(&mut self) -> anyhow::Result<bool> {
        let n = self.sales.len();
        let held = self
            .till
            .reserve(ReserveRequest {
                drop_id: self.drop_id.clone(),
                sku_id: SKU.into(),
                quantity: 1,
                idempotency_key: format!("stall-{n}"),
                ..ReserveRequest::default()
            })
            .await?
            .into_inner();
        if held.outcome != ReserveOutcome::Held as i32 {
            return Ok(false);
        }
        self.till
            .confirm(ConfirmRequest {
                order_id: held.order_id.clone(),
                payment_reference: format!("stall-card-{n}"),
                amount: Some(proto::common::v1::Money {
                    minor_units: 2_500,
                    currency: "EUR".into(),
                }),
                fulfilment: Some(confirm_request::Fulfilment::Pickup(Pickup {})),
                discreet: false,
            })
            .await?;
        self.sales.push(held.order_id);
        Ok(true)
    }

    async fn until(&mut self, what: &str, done: impl Fn(&PopupStatus) -> bool) -> anyhow::Result<PopupStatus> {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.status.get_status(GetPopupStatusRequest {}).await?.into_inner();
            if done(&status) {
                return Ok(status);
            }
            if Instant::now() > until {
                anyhow::bail!("{what}: not within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Restores the link, waits for the upload and compares every stall sale with the
    /// platform's order (read with the operator's credential): the report's line, and the
    /// differences.
    pub async fn reconcile(mut self, platform: &mut CheckoutServiceClient<Authed>) -> anyhow::Result<(String, usize)> {
        self.proxy.set(LinkMode::Up);
        let started = Instant::now();
        let status = self
            .until("the pop-up's sales were uploaded", |s| {
                s.online && s.tills.iter().all(|t| t.sales_pending == 0)
            })
            .await?;
        let uploaded: u32 = status.tills.iter().map(|t| t.sales_booked).sum();
        let mut differences = 0;
        for order_id in &self.sales {
            let order = platform
                .get_order(GetOrderRequest {
                    order_id: order_id.clone(),
                })
                .await;
            match order {
                Ok(order) if order.get_ref().status == OrderStatus::Confirmed as i32 => {}
                Ok(order) => {
                    differences += 1;
                    println!(
                        "  difference: {order_id} is {:?} on the platform",
                        order.get_ref().status
                    );
                }
                Err(status) => {
                    differences += 1;
                    println!("  difference: {order_id}: {}", status.message());
                }
            }
        }
        let refunded: u32 = status.tills.iter().map(|t| t.sales_refunded).sum();
        differences += refunded as usize;
        let line = format!(
            "edge: {} sales offline, {uploaded} uploaded, {differences} differences (back online, all booked in {:.1} s)",
            self.offline_sales,
            started.elapsed().as_secs_f64()
        );
        let _ = self.stop.send(());
        let served = self.task.await;
        self.edge.close().await;
        served??;
        Ok((line, differences))
    }
}
