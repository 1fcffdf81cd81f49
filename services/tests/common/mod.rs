//! Test harness: a real server on 127.0.0.1:0 over a temporary data directory, and clients.

#![allow(dead_code)]

use proto::checkout::v1::checkout_service_client::CheckoutServiceClient;
use proto::common::v1::Money;
use proto::operator::v1::operator_service_client::OperatorServiceClient;
use proto::operator::v1::*;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::transport::Channel;

pub struct TestServer {
    pub addr: SocketAddr,
    pub platform: services::platform::Platform,
    pub channel: Channel,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let platform = services::platform::Platform::open_embedded(dir.path()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(services::server::serve(platform.clone(), listener, async {
            let _ = stopped.await;
        }));
        let channel = connect(addr).await;
        TestServer {
            addr,
            platform,
            channel,
            stop: Some(stop),
            task: Some(task),
            dir,
        }
    }

    pub fn checkout(&self) -> CheckoutServiceClient<Channel> {
        CheckoutServiceClient::new(self.channel.clone())
    }

    pub fn operator(&self) -> OperatorServiceClient<Channel> {
        OperatorServiceClient::new(self.channel.clone())
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

pub async fn connect(addr: SocketAddr) -> Channel {
    for _ in 0..200 {
        if let Ok(channel) = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            return channel;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server at {addr} never answered");
}

pub fn ts(offset_secs: i64) -> prost_types::Timestamp {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    prost_types::Timestamp {
        seconds: now + offset_secs,
        nanos: 0,
    }
}

pub fn eur(minor_units: i64) -> Option<Money> {
    Some(Money {
        minor_units,
        currency: "EUR".into(),
    })
}

/// A drop with one SKU per (sku_id, stock) in one hub of "Lisbon", open now.
pub fn drop_request(
    drop_id: &str,
    skus: &[(&str, u32)],
    per_buyer_limit: u32,
    hold_ttl_seconds: u32,
) -> CreateDropRequest {
    CreateDropRequest {
        drop_id: drop_id.into(),
        creator_id: "creator-1".into(),
        title: "test drop".into(),
        opens_at: Some(ts(-1)),
        closes_at: Some(ts(3_600)),
        hold_ttl_seconds,
        skus: skus
            .iter()
            .map(|(sku_id, stock)| SkuSpec {
                sku_id: (*sku_id).into(),
                name: format!("item {sku_id}"),
                price: eur(2_500),
                per_buyer_limit,
                allocations: vec![Allocation {
                    hub_id: "hub-1".into(),
                    city: "Lisbon".into(),
                    quantity: *stock,
                }],
            })
            .collect(),
    }
}

pub async fn open_drop(server: &TestServer, request: CreateDropRequest) {
    let mut operator = server.operator();
    let drop_id = request.drop_id.clone();
    operator.create_drop(request).await.unwrap();
    operator.open_drop(OpenDropRequest { drop_id }).await.unwrap();
}
