//! The gRPC fixtures tests share: clients with the test credentials, the test hubs, couriers
//! and creators, drops and requests, and waiting for what a server does on its own.

use crate::server::TestServer;
use proto::checkout::v1::checkout_service_client::CheckoutServiceClient;
use proto::checkout::v1::*;
use proto::common::v1::Money;
use proto::dispatch::v1::dispatch_service_client::DispatchServiceClient;
use proto::operator::v1::operator_service_client::OperatorServiceClient;
use proto::operator::v1::*;
use proto::registry::v1 as registry;
use proto::registry::v1::partner_registry_service_client::PartnerRegistryServiceClient;
use proto::settlement::v1::settlement_service_client::SettlementServiceClient;
use services::auth::{Authed, Bearer};
use std::net::SocketAddr;
use std::process::ExitStatus;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::transport::Channel;

/// The operator credential of every test server.
pub const OPERATOR_TOKEN: &str = "test-operator-credential";
/// The storefront every test server registers; `TestServer::checkout` calls as it.
pub const TEST_STOREFRONT: &str = "test-web";

pub fn operator_client(channel: &Channel) -> OperatorServiceClient<Authed> {
    OperatorServiceClient::with_interceptor(channel.clone(), Bearer::new(OPERATOR_TOKEN).unwrap())
}

pub fn registry_client(channel: &Channel) -> PartnerRegistryServiceClient<Authed> {
    PartnerRegistryServiceClient::with_interceptor(channel.clone(), Bearer::new(OPERATOR_TOKEN).unwrap())
}

/// SettlementService with `token` (a creator's credential or the operator's).
pub fn settlement(channel: &Channel, token: &str) -> SettlementServiceClient<Authed> {
    SettlementServiceClient::with_interceptor(channel.clone(), Bearer::new(token).unwrap())
}

/// Registers `storefront_id` through the first of `channels` (or, when it exists, gives it
/// a new credential), waits until every channel's server accepts the credential (a
/// cluster's other nodes learn it a moment later), and returns it. For the tests, the demo
/// and the load tests, which play both the operator and a storefront.
pub async fn storefront_credential(
    channels: &[Channel],
    operator_token: &str,
    storefront_id: &str,
) -> anyhow::Result<String> {
    let first = channels
        .first()
        .ok_or_else(|| anyhow::anyhow!("no server to register storefront {storefront_id} with"))?;
    let mut operator = OperatorServiceClient::with_interceptor(first.clone(), Bearer::new(operator_token)?);
    let issued = match operator
        .register_storefront(RegisterStorefrontRequest {
            storefront_id: storefront_id.into(),
            display_name: storefront_id.into(),
        })
        .await
    {
        Err(status) if status.code() == tonic::Code::AlreadyExists => {
            operator
                .reset_storefront_credential(ResetStorefrontCredentialRequest {
                    storefront_id: storefront_id.into(),
                })
                .await
        }
        other => other,
    };
    let credential = issued
        .map_err(|s| anyhow::anyhow!("registering storefront {storefront_id}: {}", s.message()))?
        .into_inner()
        .credential;
    for channel in channels {
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut checkout = CheckoutServiceClient::with_interceptor(channel.clone(), Bearer::new(&credential)?);
        // Past authentication, an order that does not exist is NOT_FOUND.
        while checkout
            .get_order(GetOrderRequest {
                order_id: "d.s.0".into(),
            })
            .await
            .is_err_and(|s| s.code() == tonic::Code::Unauthenticated)
        {
            if tokio::time::Instant::now() > until {
                anyhow::bail!("a server did not learn storefront {storefront_id}'s credential within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(credential)
}

/// CheckoutService as the storefront `test-web` of the server behind `channel` (registered,
/// or given a new credential when it exists).
pub async fn storefront_client(channel: &Channel) -> CheckoutServiceClient<Authed> {
    let credential = storefront_credential(std::slice::from_ref(channel), OPERATOR_TOKEN, TEST_STOREFRONT)
        .await
        .unwrap();
    CheckoutServiceClient::with_interceptor(channel.clone(), Bearer::new(&credential).unwrap())
}

/// DispatchService as a courier partner.
pub type Courier = DispatchServiceClient<Authed>;

pub fn courier_client(channel: &Channel, credential: &str) -> Courier {
    DispatchServiceClient::with_interceptor(channel.clone(), Bearer::new(credential).unwrap())
}

pub fn secs(s: u64) -> Option<prost_types::Duration> {
    Some(services::convert::duration(s * 1_000))
}

/// A hub spec with short SLA clocks for tests (accept within `accept_secs`).
pub fn hub_spec(hub_id: &str, city: &str, capacity: u32, accept_secs: u64) -> registry::HubSpec {
    registry::HubSpec {
        hub_id: hub_id.into(),
        name: format!("{city} test hub"),
        city: city.into(),
        location: Some(registry::Location {
            latitude: 38.7,
            longitude: -9.1,
        }),
        slot_minutes: 60,
        capacity_per_slot: capacity,
        sla: Some(registry::SlaTargets {
            accept_within: secs(accept_secs),
            pickup_within: secs(60),
            deliver_within: secs(600),
        }),
        ..Default::default()
    }
}

/// The hubs test drops sell from: hub-1 in Lisbon, hub-2 in Porto.
pub async fn create_test_hubs(channel: &Channel) {
    let mut registry = registry_client(channel);
    for (hub, city) in [("hub-1", "Lisbon"), ("hub-2", "Porto")] {
        registry
            .create_hub(registry::CreateHubRequest {
                hub: Some(hub_spec(hub, city, 1_000, 30)),
            })
            .await
            .unwrap();
    }
}

/// Registers a courier partner, makes it active and assigns it to `hub_id` with `rank`;
/// returns its credential.
pub async fn courier(channel: &Channel, partner_id: &str, hub_id: &str, rank: u32) -> String {
    let mut registry = registry_client(channel);
    let registered = registry
        .register_partner(registry::RegisterPartnerRequest {
            partner_id: partner_id.into(),
            name: format!("courier {partner_id}"),
            kind: registry::PartnerKind::Courier as i32,
            capabilities: vec![
                registry::Capability::Delivery as i32,
                registry::Capability::PickupPoint as i32,
                registry::Capability::Discreet as i32,
            ],
            max_open_dispatches: 100,
        })
        .await
        .unwrap()
        .into_inner();
    registry
        .set_partner_status(registry::SetPartnerStatusRequest {
            partner_id: partner_id.into(),
            status: registry::PartnerStatus::Active as i32,
            reason: "vetted".into(),
        })
        .await
        .unwrap();
    registry
        .assign_partner(registry::AssignPartnerRequest {
            partner_id: partner_id.into(),
            hub_id: hub_id.into(),
            rank,
        })
        .await
        .unwrap();
    registered.credential
}

/// Registers a creator; returns its credential.
pub async fn creator(channel: &Channel, creator_id: &str) -> String {
    settlement(channel, OPERATOR_TOKEN)
        .register_creator(proto::settlement::v1::RegisterCreatorRequest {
            creator_id: creator_id.into(),
            display_name: format!("creator {creator_id}"),
        })
        .await
        .unwrap()
        .into_inner()
        .credential
}

/// A loopback port free right now, for a server process about to start (see
/// `nats::unused_loopback_port` for why not port 0).
pub fn free_port() -> u16 {
    crate::nats::unused_loopback_port().unwrap()
}

/// Whether the server at `addr` reports SERVING within 2 s. Its port is bound before the
/// platform opens (callers wait in the backlog), so a TCP connect alone says nothing.
pub async fn serving(addr: SocketAddr) -> bool {
    services::server::is_serving(addr, Duration::from_secs(2)).await
}

/// A channel (no deadline on its calls) to the server at `addr`, once it serves.
pub async fn connect(addr: SocketAddr) -> Channel {
    connect_when_serving(addr, Duration::from_secs(60), || Ok(None))
        .await
        .unwrap()
}

/// A channel to the server at `addr` once it serves, waiting up to `within`; fails at once
/// when `exited` tells that the server's process exited instead.
pub(crate) async fn connect_when_serving(
    addr: SocketAddr,
    within: Duration,
    mut exited: impl FnMut() -> std::io::Result<Option<ExitStatus>>,
) -> anyhow::Result<Channel> {
    let until = std::time::Instant::now() + within;
    while std::time::Instant::now() < until {
        if let Some(status) = exited()? {
            anyhow::bail!("the server at {addr} exited before serving ({status}); its log is above");
        }
        if serving(addr).await {
            if let Ok(channel) = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                .connect()
                .await
            {
                return Ok(channel);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the server at {addr} did not serve within {} s", within.as_secs())
}

/// The next update on a courier's stream that `pick` takes (others are skipped), waiting at
/// most `within` for it.
pub async fn next_update<T>(
    stream: &mut tonic::Streaming<proto::dispatch::v1::DispatchUpdate>,
    within: Duration,
    pick: impl Fn(proto::dispatch::v1::dispatch_update::Update) -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let message = tokio::time::timeout(left, stream.message())
            .await
            .expect("the update in time")
            .unwrap()
            .expect("stream open");
        if let Some(update) = message.update.and_then(&pick) {
            return update;
        }
    }
}

/// The next offer on a courier's stream.
pub async fn next_offer(
    stream: &mut tonic::Streaming<proto::dispatch::v1::DispatchUpdate>,
    within: Duration,
) -> proto::dispatch::v1::Dispatch {
    use proto::dispatch::v1::dispatch_update::Update;
    next_update(stream, within, |u| match u {
        Update::Offer(d) => Some(d),
        Update::Withdrawn(_) => None,
    })
    .await
}

/// The next withdrawal on a courier's stream.
pub async fn next_withdrawal(
    stream: &mut tonic::Streaming<proto::dispatch::v1::DispatchUpdate>,
    within: Duration,
) -> proto::dispatch::v1::Withdrawal {
    use proto::dispatch::v1::dispatch_update::Update;
    next_update(stream, within, |u| match u {
        Update::Withdrawn(w) => Some(w),
        Update::Offer(_) => None,
    })
    .await
}

/// The courier accepts the dispatch and picks its parcel up.
pub async fn pick_up(courier: &mut Courier, dispatch_id: &str, pickup_code: &str) {
    courier
        .accept(proto::dispatch::v1::AcceptRequest {
            dispatch_id: dispatch_id.into(),
        })
        .await
        .unwrap();
    courier
        .mark_picked_up(proto::dispatch::v1::MarkPickedUpRequest {
            dispatch_id: dispatch_id.into(),
            pickup_code: pickup_code.into(),
        })
        .await
        .unwrap();
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
        settlement: None,
    }
}

pub async fn open_drop(server: &TestServer, request: CreateDropRequest) {
    let mut operator = server.operator();
    let drop_id = request.drop_id.clone();
    operator.create_drop(request).await.unwrap();
    operator.open_drop(OpenDropRequest { drop_id }).await.unwrap();
}

pub fn reserve(drop_id: &str, sku_id: &str, buyer: &str, quantity: u32) -> ReserveRequest {
    ReserveRequest {
        drop_id: drop_id.into(),
        sku_id: sku_id.into(),
        buyer_id: buyer.into(),
        city: "Lisbon".into(),
        quantity,
        ..Default::default()
    }
}

pub fn pickup(order_id: &str, amount: i64) -> ConfirmRequest {
    ConfirmRequest {
        order_id: order_id.into(),
        payment_reference: format!("pay-{order_id}"),
        amount: eur(amount),
        fulfilment: Some(confirm_request::Fulfilment::Pickup(Pickup {})),
        discreet: false,
    }
}

/// Reserves one unit for `buyer` and confirms it for pickup; returns the Confirm response.
pub async fn buy(
    server: &TestServer,
    drop_id: &str,
    sku_id: &str,
    buyer: &str,
) -> proto::checkout::v1::ConfirmResponse {
    let mut checkout = server.checkout();
    let held = checkout
        .reserve(reserve(drop_id, sku_id, buyer, 1))
        .await
        .unwrap()
        .into_inner();
    checkout
        .confirm(pickup(&held.order_id, 2_500))
        .await
        .unwrap()
        .into_inner()
}
